//! A mock OpenAI-compatible embeddings server on a loopback port.
//!
//! It speaks the real wire format (`../shared/docs/provider-api.md`): float or
//! base64 replies by `encoding_format`, `index` and `usage` in every reply,
//! nested error bodies, rate-limit headers. Its vectors are a deterministic
//! function of the text ([`vector_for`]), so a test can check the exact
//! vector stored in the exact row. Faults are scripted per request, or
//! injected at a rate, or triggered by a marker in an input.
//!
//! Shared by the integration tests (`tests/it`), `examples/mock_server.rs`
//! and the benchmark (`examples/bench.rs`), as a dev-dependency.

mod batches;

use base64::Engine;
pub use batches::BatchJob;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The vector the mock returns for `text`: 24-bit values in [-1, 1), exactly
/// representable as f32, so they survive JSON, base64 and pgvector unchanged.
pub fn vector_for(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..dims as u64)
        .map(|k| {
            let mut z = h.wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as i32 - (1 << 23)) as f32 / (1u32 << 23) as f32
        })
        .collect()
}

/// Tokens the mock reports for a text: cl100k_base, as OpenAI counts.
pub fn tokens_for(text: &str) -> u64 {
    tiktoken_rs::cl100k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// A per-minute limit the mock enforces as OpenAI does: a bucket that refills
/// continuously at `per_minute / 60` a second and holds `burst` worth of it
/// (OpenAI may enforce a minute's limit over shorter periods).
#[derive(Debug, Clone)]
struct Limit {
    per_minute: u64,
    cap: f64,
    level: f64,
    at: Instant,
}

impl Limit {
    fn new(per_minute: u64, burst: Duration) -> Limit {
        let cap = per_minute as f64 / 60.0 * burst.as_secs_f64();
        Limit {
            per_minute,
            cap,
            level: cap,
            at: Instant::now(),
        }
    }

    fn rate(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    fn refill(&mut self, now: Instant) {
        self.level = (self.level + self.rate() * (now - self.at).as_secs_f64()).min(self.cap);
        self.at = now;
    }

    /// How long until `n` fits, when it does not fit now.
    fn short(&self, n: f64) -> Option<Duration> {
        (self.level < n.min(self.cap))
            .then(|| Duration::from_secs_f64((n.min(self.cap) - self.level) / self.rate()))
    }

    /// `x-ratelimit-{limit,remaining,reset}-{what}`.
    fn headers(&self, what: &str) -> Vec<(String, String)> {
        let reset = ((self.cap - self.level).max(0.0) / self.rate() * 1000.0).ceil();
        vec![
            (
                format!("x-ratelimit-limit-{what}"),
                self.per_minute.to_string(),
            ),
            (
                format!("x-ratelimit-remaining-{what}"),
                (self.level.max(0.0) as u64).to_string(),
            ),
            (format!("x-ratelimit-reset-{what}"), format!("{reset}ms")),
        ]
    }
}

/// What to do with one request instead of answering it normally.
#[derive(Debug, Clone)]
pub enum Fault {
    /// No fault: answer normally (to interleave faults in a script).
    Pass,
    /// Answer with this status, body and extra headers.
    Status {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Wait this long, then answer normally (longer than the client's timeout: a timeout).
    Delay(Duration),
    /// Send half a reply, then close the connection.
    Reset,
    /// HTTP 200 with this body.
    Body(String),
    /// A valid reply with one vector too few.
    WrongCount,
    /// A valid reply whose vectors have one dimension too many.
    WrongDims,
    /// A valid reply with index 0 twice.
    RepeatedIndex,
    /// A valid reply whose second item has no index.
    MissingIndex,
}

impl Fault {
    /// An OpenAI-style error: `{"error":{"message","type","param","code"}}`.
    pub fn openai(status: u16, code: &str, message: &str) -> Fault {
        Fault::Status {
            status,
            body: json!({"error": {"message": message, "type": code, "param": null, "code": code}})
                .to_string(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Fault {
        if let Fault::Status { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When the mock answered it.
    pub at: Instant,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub inputs: Vec<String>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where a held request says it arrived, and waits to be released.
type Gate = (Sender<()>, Arc<Mutex<Receiver<()>>>);

#[derive(Default)]
struct State {
    dims: usize,
    script: VecDeque<Fault>,
    /// Inputs containing this marker make the request fail with 400.
    reject_marker: Option<String>,
    /// The message of that 400, when not the default one.
    reject_message: Option<String>,
    /// Inputs containing this marker make the request fail with 500, every
    /// time (a model server that crashes on one input).
    crash_marker: Option<String>,
    /// More inputs than this in one request: 413, as text-embeddings-inference says it.
    max_inputs: Option<usize>,
    /// Every request fails with one of these faults at this rate (0..1), chosen by a seeded generator.
    fault_rate: f64,
    rate_faults: Vec<Fault>,
    rng: u64,
    /// Always answer with this fault (provider down, bad key).
    always: Option<Fault>,
    /// Answer floats even when base64 is asked for (LM Studio).
    ignore_base64: bool,
    latency: Duration,
    seen: Vec<Seen>,
    /// How many requests got a fault instead of a normal answer.
    faults_served: usize,
    /// Per-minute limits on tokens and on requests, answered with 429.
    tokens_limit: Option<Limit>,
    requests_limit: Option<Limit>,
    /// Send the `x-ratelimit-*` headers of those limits.
    limit_headers: bool,
    /// 429s the limits caused, and the tokens the mock accepted.
    rate_limited: usize,
    tokens_accepted: u64,
    hold: Option<Gate>,
    /// The Files and Batch endpoints' files and jobs.
    batches: batches::Batches,
    /// Hold each call to the Files and Batch endpoints named (`POST
    /// /v1/batches`), once it has done its work, before its reply.
    hold_batch_call: Option<(String, Gate)>,
    /// Calls to the Files and Batch endpoints starting with this (`GET
    /// /v1/files/`) answer 500, this many more times.
    failing_batch_calls: Option<(String, usize)>,
}

/// A running mock server; it stops when the process ends.
#[derive(Clone)]
pub struct Mock {
    pub base: String,
    state: Arc<Mutex<State>>,
}

impl Mock {
    /// Start on an ephemeral loopback port with `dims`-dimension vectors.
    pub fn start(dims: usize) -> Mock {
        Mock::start_on("127.0.0.1:0", dims)
    }

    pub fn start_on(addr: &str, dims: usize) -> Mock {
        // Load the encoding the replies' usage is counted with now, not
        // while the first requests wait (it takes a second in a debug build).
        tokens_for("");
        let listener = TcpListener::bind(addr).expect("bind mock server");
        let port = listener.local_addr().expect("mock address").port();
        let state = Arc::new(Mutex::new(State {
            dims,
            rng: 0x2545_f491_4f6c_dd1d,
            ..State::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, state));
            }
        });
        Mock {
            base: format!("http://127.0.0.1:{port}/v1"),
            state,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Answer the next requests with these faults, in order.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.with(|s| s.script.extend(faults));
    }
    pub fn reject_inputs_containing(&self, marker: &str) {
        self.with(|s| s.reject_marker = Some(marker.to_string()));
    }
    /// Like [`Mock::reject_inputs_containing`], with this message.
    pub fn reject_inputs_containing_saying(&self, marker: &str, message: &str) {
        self.with(|s| {
            s.reject_marker = Some(marker.to_string());
            s.reject_message = Some(message.to_string());
        });
    }
    pub fn crash_on_inputs_containing(&self, marker: &str) {
        self.with(|s| s.crash_marker = Some(marker.to_string()));
    }
    pub fn max_inputs(&self, n: usize) {
        self.with(|s| s.max_inputs = Some(n));
    }
    pub fn fault_rate(&self, rate: f64, faults: Vec<Fault>) {
        self.with(|s| {
            s.fault_rate = rate;
            s.rate_faults = faults;
        });
    }
    pub fn always(&self, fault: Option<Fault>) {
        self.with(|s| s.always = fault);
    }
    pub fn ignore_base64(&self) {
        self.with(|s| s.ignore_base64 = true);
    }
    pub fn latency(&self, d: Duration) {
        self.with(|s| s.latency = d);
    }
    /// Stop holding requests (see [`Mock::hold`]).
    pub fn unhold(&self) {
        self.with(|s| s.hold = None);
    }

    /// Hold every request until [`Held::release`]; [`Held::wait_for`]
    /// waits until one has arrived.
    pub fn hold(&self) -> Held {
        let (arrived_tx, arrived_rx) = channel();
        let (release_tx, release_rx) = channel();
        self.with(|s| s.hold = Some((arrived_tx, Arc::new(Mutex::new(release_rx)))));
        Held {
            arrived: arrived_rx,
            release: release_tx,
        }
    }

    pub fn faults_served(&self) -> usize {
        self.with(|s| s.faults_served)
    }

    /// Enforce OpenAI-style per-minute limits (tokens, requests), each
    /// allowing `burst` worth at once; with `headers`, every reply says how
    /// much is left (`x-ratelimit-*`), as OpenAI's do.
    pub fn rate_limits(
        &self,
        tokens_per_minute: Option<u64>,
        requests_per_minute: Option<u64>,
        burst: Duration,
        headers: bool,
    ) {
        self.with(|s| {
            s.tokens_limit = tokens_per_minute.map(|n| Limit::new(n, burst));
            s.requests_limit = requests_per_minute.map(|n| Limit::new(n, burst));
            s.limit_headers = headers;
        });
    }

    /// Hold every `call` (`POST /v1/batches`, `POST /v1/files`) once it has
    /// done its work (the job created, the file stored), before its reply:
    /// a client killed meanwhile never heard of what it made.
    pub fn hold_batch_call(&self, call: &str) -> Held {
        let (arrived_tx, arrived_rx) = channel();
        let (release_tx, release_rx) = channel();
        self.with(|s| {
            s.hold_batch_call = Some((
                call.to_string(),
                (arrived_tx, Arc::new(Mutex::new(release_rx))),
            ))
        });
        Held {
            arrived: arrived_rx,
            release: release_tx,
        }
    }

    /// Answer the next `times` calls starting with `call` (`GET /v1/files/`)
    /// with a 500 (`retry-after-ms: 10`, so that retries are quick).
    pub fn fail_batch_calls(&self, call: &str, times: usize) {
        self.with(|s| s.failing_batch_calls = Some((call.to_string(), times)));
    }

    /// Stop holding the calls [`Mock::hold_batch_call`] named.
    pub fn unhold_batch_calls(&self) {
        self.with(|s| s.hold_batch_call = None);
    }

    /// The batch jobs created so far, oldest first.
    pub fn batch_jobs(&self) -> Vec<BatchJob> {
        self.with(|s| s.batches.jobs())
    }

    /// Files stored (inputs not deleted, outputs, error files).
    pub fn batch_files(&self) -> usize {
        self.with(|s| s.batches.file_count())
    }

    /// Requests made to the Files and Batch endpoints, as `METHOD path`.
    pub fn batch_calls(&self) -> Vec<String> {
        self.with(|s| s.batches.calls.clone())
    }

    /// Bytes of input files uploaded.
    pub fn batch_uploaded_bytes(&self) -> u64 {
        self.with(|s| s.batches.uploaded_bytes)
    }

    /// Move batch job `id` to `status`; a job that ends (`completed`,
    /// `expired`, `cancelled`) gets its output and error files then.
    pub fn set_batch_status(&self, id: &str, status: &str) {
        self.with(|s| {
            let marker = s.reject_marker.clone();
            let answer = batches::Answer {
                dims: s.dims,
                reject_marker: marker.as_deref(),
            };
            s.batches.set_status(id, status, &answer)
        });
    }

    /// Jobs go `in_progress` at once and `completed` this long after creation.
    pub fn complete_batches_after(&self, d: Duration) {
        self.with(|s| s.batches.complete_after = Some(d));
    }

    /// 429s answered because of [`Mock::rate_limits`], and tokens accepted.
    pub fn rate_limited(&self) -> (usize, u64) {
        self.with(|s| (s.rate_limited, s.tokens_accepted))
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }

    /// Every input the mock was sent, in order, over all requests that it answered with vectors.
    pub fn embedded_inputs(&self) -> Vec<String> {
        self.requests().into_iter().flat_map(|r| r.inputs).collect()
    }
}

/// The test's handle on held requests.
pub struct Held {
    arrived: Receiver<()>,
    release: Sender<()>,
}

impl Held {
    /// Wait, 30 s at most, until a request has arrived and is held; panic
    /// naming `what` when none does.
    pub fn wait_for(&self, what: &str) {
        if self
            .arrived
            .recv_timeout(std::time::Duration::from_secs(30))
            .is_err()
        {
            panic!("{what} never arrived at the mock");
        }
    }

    pub fn release(&self) {
        let _ = self.release.send(());
    }
}

fn serve(stream: TcpStream, state: Arc<Mutex<State>>) {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let method = line.split_whitespace().next().unwrap_or("GET").to_string();
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut headers = Vec::new();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if path.starts_with("/v1/files") || path.starts_with("/v1/batches") {
            if !respond_batches(&mut out, &state, &method, &path, &headers, &body) {
                return;
            }
            continue;
        }
        if !respond(&mut out, &state, path, headers, &body) {
            return;
        }
    }
}

/// The texts of an embeddings request body: `input`, a string or an array.
fn inputs_of(body: &Value) -> Vec<String> {
    match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(xs) => xs
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// Answer one request to the Files or Batch endpoints.
fn respond_batches(
    out: &mut TcpStream,
    state: &Arc<Mutex<State>>,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> bool {
    let (status, text, kind, hold) = {
        let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        if let Some(Fault::Status { status, body, .. }) = &s.always {
            return send(out, *status, body, &[]);
        }
        let call = format!("{method} {path}");
        if let Some((prefix, left)) = &mut s.failing_batch_calls {
            if *left > 0 && call.starts_with(prefix.as_str()) {
                *left -= 1;
                let body = json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}});
                return send(out, 500, &body.to_string(), &[("retry-after-ms", "10")]);
            }
        }
        let marker = s.reject_marker.clone();
        let answer = batches::Answer {
            dims: s.dims,
            reject_marker: marker.as_deref(),
        };
        let (status, text, kind) = s.batches.respond(method, path, headers, body, &answer);
        let call = format!("{method} {}", path.split('?').next().unwrap_or(""));
        let hold = match &s.hold_batch_call {
            Some((held, gate)) if *held == call => Some(gate.clone()),
            _ => None,
        };
        (status, text, kind, hold)
    };
    if let Some((arrived, release)) = hold {
        let _ = arrived.send(());
        let _ = release.lock().map(|r| r.recv());
    }
    send_typed(out, status, &text, kind)
}

/// Answer one request; false when the connection must close.
fn respond(
    out: &mut TcpStream,
    state: &Arc<Mutex<State>>,
    path: String,
    headers: Vec<(String, String)>,
    body: &[u8],
) -> bool {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let inputs = inputs_of(&body);
    let limited = {
        let limits = {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.tokens_limit.is_some() || s.requests_limit.is_some()
        };
        let tokens: u64 = if limits {
            inputs.iter().map(|t| tokens_for(t)).sum()
        } else {
            0
        };
        let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let now = Instant::now();
        // The longest wait, and which limit asks for it.
        let mut wait: Option<(Duration, &str)> = None;
        for (limit, n, what) in [
            (&mut s.tokens_limit, tokens as f64, "tokens per min (TPM)"),
            (&mut s.requests_limit, 1.0, "requests per min (RPM)"),
        ] {
            if let Some(l) = limit {
                l.refill(now);
                if let Some(w) = l.short(n) {
                    if wait.is_none_or(|(longest, _)| w > longest) {
                        wait = Some((w, what));
                    }
                }
            }
        }
        if wait.is_none() {
            for (limit, n) in [
                (&mut s.tokens_limit, tokens as f64),
                (&mut s.requests_limit, 1.0),
            ] {
                if let Some(l) = limit {
                    l.level -= n;
                }
            }
            if limits {
                s.tokens_accepted += tokens;
            }
        } else {
            s.rate_limited += 1;
        }
        let mut hs = Vec::new();
        if s.limit_headers {
            if let Some(l) = &s.tokens_limit {
                hs.extend(l.headers("tokens"));
            }
            if let Some(l) = &s.requests_limit {
                hs.extend(l.headers("requests"));
            }
        }
        if s.requests_limit.is_none() {
            hs.push(("x-ratelimit-remaining-requests".into(), "4999".into()));
        }
        (wait, tokens, hs)
    };
    let (rate_wait, rate_tokens, rate_headers) = limited;
    let rate_headers: Vec<(&str, &str)> = rate_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if let Some((wait, what)) = rate_wait {
        let requested = if what.starts_with("tokens") {
            rate_tokens
        } else {
            1
        };
        let msg = format!(
            "Rate limit reached for text-embedding-3-small in organization org-mock on {what}: Requested {requested}. Please try again in {:.3}s. Visit https://platform.openai.com/account/rate-limits to learn more.",
            wait.as_secs_f64()
        );
        return send(
            out,
            429,
            &json!({"error": {"message": msg, "type": "tokens", "param": null, "code": "rate_limit_exceeded"}}).to_string(),
            &rate_headers,
        );
    }
    let (fault, dims, ignore_base64, latency, hold, reject, too_many, reject_message) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let fault = s
            .always
            .clone()
            .or_else(|| s.script.pop_front())
            .or_else(|| {
                if s.fault_rate > 0.0 && !s.rate_faults.is_empty() {
                    s.rng ^= s.rng << 13;
                    s.rng ^= s.rng >> 7;
                    s.rng ^= s.rng << 17;
                    let roll = (s.rng % 1_000_000) as f64 / 1_000_000.0;
                    if roll < s.fault_rate {
                        let pick = (s.rng >> 20) as usize % s.rate_faults.len();
                        return Some(s.rate_faults[pick].clone());
                    }
                }
                None
            });
        let crashes = s
            .crash_marker
            .as_ref()
            .is_some_and(|m| inputs.iter().any(|i| i.contains(m.as_str())));
        let fault = if crashes {
            Some(Fault::openai(
                500,
                "server_error",
                "The server had an error while processing your request.",
            ))
        } else {
            fault
        };
        if !matches!(fault, None | Some(Fault::Pass)) {
            s.faults_served += 1;
        }
        let reject = s
            .reject_marker
            .as_ref()
            .and_then(|m| inputs.iter().position(|i| i.contains(m.as_str())));
        let too_many = s.max_inputs.filter(|m| inputs.len() > *m);
        (
            fault,
            s.dims,
            s.ignore_base64,
            s.latency,
            s.hold.clone(),
            reject,
            too_many,
            s.reject_message.clone(),
        )
    };
    if let Some((arrived, release)) = hold {
        let _ = arrived.send(());
        let _ = release.lock().map(|r| r.recv());
    }
    if !latency.is_zero() {
        std::thread::sleep(latency);
    }
    let record = |s: &Arc<Mutex<State>>| {
        s.lock().unwrap_or_else(|e| e.into_inner()).seen.push(Seen {
            at: Instant::now(),
            path: path.clone(),
            headers: headers.clone(),
            body: body.clone(),
            inputs: inputs.clone(),
        })
    };
    // Azure's shape too: /openai/deployments/NAME/embeddings?api-version=...
    if !path
        .split('?')
        .next()
        .unwrap_or("")
        .ends_with("/embeddings")
    {
        return send(out, 404, &json!({"error": {"message": "not found", "type": "invalid_request_error", "code": "not_found"}}).to_string(), &[]);
    }
    if inputs.is_empty() || inputs.iter().any(String::is_empty) {
        return send(out, 400, &json!({"error": {"message": "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", "type": "invalid_request_error", "param": null, "code": null}}).to_string(), &[]);
    }
    // Like text-embedding-3-*, honour `dimensions` when it is sent.
    let dims = body["dimensions"].as_u64().map_or(dims, |d| d as usize);
    let base64 = body["encoding_format"] == "base64" && !ignore_base64;
    if base64 && matches!(fault, None | Some(Fault::Pass)) && too_many.is_none() && reject.is_none()
    {
        // The common case, fast: the benchmark must never wait on the mock.
        record(state);
        return send(
            out,
            200,
            &fast_reply(&inputs, dims, &body["model"]),
            &rate_headers,
        );
    }
    let mut vectors: Vec<Vec<f32>> = inputs.iter().map(|t| vector_for(t, dims)).collect();
    let mut indices: Vec<usize> = (0..vectors.len()).collect();
    let missing_index = matches!(fault, Some(Fault::MissingIndex));
    match fault {
        Some(Fault::Status {
            status,
            body,
            headers,
        }) => {
            let hs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            return send(out, status, &body, &hs);
        }
        Some(Fault::Delay(d)) => std::thread::sleep(d),
        Some(Fault::Reset) => {
            let _ = out.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"object\":\"list\",\"data\":[");
            let _ = out.flush();
            let _ = out.shutdown(Shutdown::Both);
            return false;
        }
        Some(Fault::Body(b)) => return send(out, 200, &b, &[]),
        Some(Fault::WrongCount) => {
            vectors.pop();
            indices.pop();
        }
        Some(Fault::WrongDims) => vectors.iter_mut().for_each(|v| v.push(0.5)),
        Some(Fault::RepeatedIndex) => {
            if indices.len() > 1 {
                indices[1] = 0;
            } else {
                indices[0] = 1;
            }
        }
        Some(Fault::Pass | Fault::MissingIndex) | None => {}
    }
    if let Some(n) = too_many {
        let msg = format!(
            "batch size {} > maximum allowed batch size {n}",
            inputs.len()
        );
        return send(
            out,
            413,
            &json!({"message": msg, "code": 413, "type": "Validation"}).to_string(),
            &[],
        );
    }
    if let Some(i) = reject {
        let msg = reject_message.unwrap_or_else(|| format!("This model's maximum context length is 8192 tokens, however you requested 9000 tokens (input {i})."));
        return send(out, 400, &json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}}).to_string(), &[]);
    }
    record(state);
    let data: Vec<Value> = vectors
        .iter()
        .zip(&indices)
        .map(|(v, i)| {
            let embedding = if base64 {
                let mut bytes = Vec::with_capacity(v.len() * 4);
                for f in v {
                    bytes.extend_from_slice(&f.to_le_bytes());
                }
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            if missing_index && *i == 1 {
                json!({"object": "embedding", "embedding": embedding})
            } else {
                json!({"object": "embedding", "index": i, "embedding": embedding})
            }
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|t| tokens_for(t)).sum();
    let reply = json!({
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    send(out, 200, &reply.to_string(), &rate_headers)
}

/// Base64 vectors by (text, dimensions).
type EncodedCache = std::collections::HashMap<(String, usize), Arc<String>>;

/// The base64 of the mock's vector for each text, cached across requests.
fn encoded(text: &str, dims: usize) -> Arc<String> {
    static CACHE: std::sync::OnceLock<Mutex<EncodedCache>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (text.to_string(), dims);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return hit.clone();
    }
    let mut bytes = Vec::with_capacity(dims * 4);
    for f in vector_for(text, dims) {
        bytes.extend_from_slice(&f.to_le_bytes());
    }
    let value = Arc::new(base64::engine::general_purpose::STANDARD.encode(bytes));
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() < 300_000 {
        map.insert(key, value.clone());
    }
    value
}

/// [`tokens_for`], remembered: the benchmark sends the same texts run after run.
fn cached_tokens(text: &str) -> u64 {
    static CACHE: std::sync::OnceLock<Mutex<std::collections::HashMap<String, u64>>> =
        std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(n) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(text) {
        return *n;
    }
    let n = tokens_for(text);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() < 300_000 {
        map.insert(text.to_string(), n);
    }
    n
}

fn fast_reply(inputs: &[String], dims: usize, model: &Value) -> String {
    let mut out = String::with_capacity(inputs.len() * (dims * 16 / 3 + 64) + 128);
    out.push_str(r#"{"object":"list","data":["#);
    for (i, text) in inputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"object":"embedding","index":{i},"embedding":""#
        ));
        out.push_str(&encoded(text, dims));
        out.push_str(r#""}"#);
    }
    let tokens: u64 = inputs.iter().map(|t| cached_tokens(t)).sum();
    out.push_str(&format!(
        r#"],"model":{model},"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}"#
    ));
    out
}

fn send(out: &mut TcpStream, status: u16, body: &str, headers: &[(&str, &str)]) -> bool {
    send_with(out, status, body, "application/json", headers)
}

fn send_typed(out: &mut TcpStream, status: u16, body: &str, kind: &str) -> bool {
    send_with(out, status, body, kind, &[])
}

fn send_with(
    out: &mut TcpStream,
    status: u16,
    body: &str,
    kind: &str,
    headers: &[(&str, &str)],
) -> bool {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n",
        reason(status),
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes()).is_ok()
        && out.write_all(body.as_bytes()).is_ok()
        && out.flush().is_ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
