//! OpenAI's Files and Batch endpoints, as the real API answers them: a JSONL
//! file uploaded as `multipart/form-data` (purpose `batch`), a job created
//! on it (`/v1/embeddings`, window `24h`, `metadata`), its status polled
//! (`validating`, `in_progress`, `finalizing`, `completed`, `expired`,
//! `cancelling`, `cancelled`, `failed`), listed newest first with `after`
//! paging, cancelled, and its output and error files downloaded.
//!
//! A job's status moves only when a test says so ([`crate::Mock::set_batch_status`])
//! or, with [`crate::Mock::complete_batches_after`], once that long has passed
//! since it was created (the benchmark). A job that ends computes its
//! output then: each request embedded as the embeddings endpoint would,
//! written in reverse order (the real API does not keep the input's order);
//! a request with the reject marker goes to the error file with its 400;
//! an expired or cancelled job answers its first half and lists the rest in
//! the error file as `batch_expired` or `batch_cancelled`.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The provider's limits on one job's file.
pub const MAX_REQUESTS: usize = 50_000;
pub const MAX_FILE_BYTES: usize = 200 * 1024 * 1024;

/// A job as the test sees it.
#[derive(Debug, Clone)]
pub struct BatchJob {
    pub id: String,
    pub status: String,
    pub metadata: Value,
    /// The requests in its input file.
    pub requests: usize,
    pub input_file_id: String,
}

#[derive(Debug)]
struct Job {
    id: String,
    input_file_id: String,
    status: String,
    metadata: Value,
    created_at: u64,
    created: Instant,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Option<Value>,
    requests: usize,
    completed: usize,
    failed: usize,
}

/// What the Batch endpoints keep.
#[derive(Debug, Default)]
pub struct Batches {
    files: HashMap<String, Vec<u8>>,
    jobs: Vec<Job>,
    next: u64,
    /// Jobs complete by themselves this long after they were created.
    pub complete_after: Option<Duration>,
    /// Bytes uploaded, over all files.
    pub uploaded_bytes: u64,
    /// Requests to the Files and Batch endpoints, by `METHOD path`.
    pub calls: Vec<String>,
}

/// How a job's requests are answered when it ends.
pub struct Answer<'a> {
    pub dims: usize,
    pub reject_marker: Option<&'a str>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn error(status: u16, message: &str) -> (u16, String) {
    (
        status,
        json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})
            .to_string(),
    )
}

impl Batches {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{:06}", self.next)
    }

    pub fn jobs(&self) -> Vec<BatchJob> {
        self.jobs
            .iter()
            .map(|j| BatchJob {
                id: j.id.clone(),
                status: j.status.clone(),
                metadata: j.metadata.clone(),
                requests: j.requests,
                input_file_id: j.input_file_id.clone(),
            })
            .collect()
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Move job `id` to `status`, computing its files when it ends.
    pub fn set_status(&mut self, id: &str, status: &str, answer: &Answer<'_>) {
        let Some(k) = self.jobs.iter().position(|j| j.id == id) else {
            panic!("no batch job {id}");
        };
        let terminal = matches!(status, "completed" | "expired" | "cancelled" | "failed");
        if terminal && self.jobs[k].output_file_id.is_none() && status != "failed" {
            let input = self
                .files
                .get(&self.jobs[k].input_file_id)
                .cloned()
                .unwrap_or_default();
            let (output, errors, done, failed) = run_requests(&input, status, answer);
            if !output.is_empty() {
                let f = self.id("file-out");
                self.files.insert(f.clone(), output);
                self.jobs[k].output_file_id = Some(f);
            }
            if !errors.is_empty() {
                let f = self.id("file-err");
                self.files.insert(f.clone(), errors);
                self.jobs[k].error_file_id = Some(f);
            }
            self.jobs[k].completed = done;
            self.jobs[k].failed = failed;
        }
        self.jobs[k].status = status.to_string();
    }

    /// Answer one request to `/v1/files...` or `/v1/batches...`.
    pub fn respond(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
        answer: &Answer<'_>,
    ) -> (u16, String, &'static str) {
        self.calls
            .push(format!("{method} {}", path.split('?').next().unwrap_or("")));
        let (route, query) = path.split_once('?').unwrap_or((path, ""));
        let parts: Vec<&str> = route.trim_start_matches("/v1/").split('/').collect();
        let json = "application/json";
        // Jobs whose time has come complete before any answer.
        if let Some(after) = self.complete_after {
            let due: Vec<String> = self
                .jobs
                .iter()
                .filter(|j| {
                    matches!(j.status.as_str(), "validating" | "in_progress")
                        && j.created.elapsed() >= after
                })
                .map(|j| j.id.clone())
                .collect();
            for id in due {
                self.set_status(&id, "completed", answer);
            }
        }
        let (status, text) = match (method, parts.as_slice()) {
            ("POST", ["files"]) => self.upload(headers, body),
            ("GET", ["files", id, "content"]) => match self.files.get(*id) {
                Some(bytes) => {
                    return (
                        200,
                        String::from_utf8_lossy(bytes).into_owned(),
                        "application/octet-stream",
                    )
                }
                None => error(404, &format!("No such File object: {id}")),
            },
            ("DELETE", ["files", id]) => match self.files.remove(*id) {
                Some(_) => (
                    200,
                    json!({"id": id, "object": "file", "deleted": true}).to_string(),
                ),
                None => error(404, &format!("No such File object: {id}")),
            },
            ("POST", ["batches"]) => self.create(body, answer),
            ("GET", ["batches"]) => self.list(query),
            ("GET", ["batches", id]) => match self.jobs.iter().find(|j| j.id == *id) {
                Some(j) => (200, object(j).to_string()),
                None => error(404, &format!("No batch found with id '{id}'.")),
            },
            ("POST", ["batches", id, "cancel"]) => {
                let id = id.to_string();
                match self.jobs.iter_mut().find(|j| j.id == id) {
                    Some(j)
                        if matches!(
                            j.status.as_str(),
                            "validating" | "in_progress" | "finalizing"
                        ) =>
                    {
                        j.status = "cancelling".into();
                        (200, object(j).to_string())
                    }
                    Some(j) => error(
                        400,
                        &format!("Cannot cancel a batch with status '{}'.", j.status),
                    ),
                    None => error(404, &format!("No batch found with id '{id}'.")),
                }
            }
            _ => error(404, "not found"),
        };
        (status, text, json)
    }

    fn upload(&mut self, headers: &[(String, String)], body: &[u8]) -> (u16, String) {
        let Some(boundary) = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .and_then(|(_, v)| v.split("boundary=").nth(1))
            .map(|b| b.trim_matches('"').to_string())
        else {
            return error(400, "expected multipart/form-data");
        };
        let mut purpose = None;
        let mut file = None;
        let delimiter = format!("--{boundary}");
        for part in split(body, delimiter.as_bytes()) {
            let Some(end) = find(part, b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&part[..end]);
            let mut content = &part[end + 4..];
            if content.ends_with(b"\r\n") {
                content = &content[..content.len() - 2];
            }
            if head.contains("name=\"purpose\"") {
                purpose = Some(String::from_utf8_lossy(content).into_owned());
            } else if head.contains("name=\"file\"") {
                file = Some(content.to_vec());
            }
        }
        match (purpose.as_deref(), file) {
            (Some("batch"), Some(bytes)) => {
                if bytes.len() > MAX_FILE_BYTES {
                    return error(400, "File is too large: the maximum is 200 MB.");
                }
                let id = self.id("file-in");
                let n = bytes.len();
                self.uploaded_bytes += n as u64;
                self.files.insert(id.clone(), bytes);
                (
                    200,
                    json!({"id": id, "object": "file", "bytes": n, "created_at": now_secs(),
                           "filename": "batch.jsonl", "purpose": "batch", "status": "processed"})
                    .to_string(),
                )
            }
            (Some(p), _) if p != "batch" => error(400, &format!("Invalid purpose: {p}")),
            _ => error(400, "expected the fields purpose and file"),
        }
    }

    fn create(&mut self, body: &[u8], answer: &Answer<'_>) -> (u16, String) {
        let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let Some(file) = req["input_file_id"].as_str() else {
            return error(400, "Missing required parameter: 'input_file_id'.");
        };
        if req["endpoint"] != "/v1/embeddings" {
            return error(400, "Invalid 'endpoint': expected /v1/embeddings.");
        }
        if req["completion_window"] != "24h" {
            return error(400, "Invalid 'completion_window': expected 24h.");
        }
        let Some(input) = self.files.get(file) else {
            return error(400, &format!("No such File object: {file}"));
        };
        let problem = validate(input);
        let requests = input
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        let id = self.id("batch_");
        let created_at = now_secs();
        self.jobs.push(Job {
            id: id.clone(),
            input_file_id: file.to_string(),
            status: "validating".into(),
            metadata: req.get("metadata").cloned().unwrap_or(Value::Null),
            created_at,
            created: Instant::now(),
            output_file_id: None,
            error_file_id: None,
            errors: problem.map(|(line, message)| {
                json!({"object": "list", "data": [{"code": "invalid_request", "message": message, "param": null, "line": line}]})
            }),
            requests,
            completed: 0,
            failed: 0,
        });
        if self.jobs.last().is_some_and(|j| j.errors.is_some()) {
            self.set_status(&id, "failed", answer);
        } else if self.complete_after.is_some() {
            self.set_status(&id, "in_progress", answer);
        }
        let job = self.jobs.last().map(object).unwrap_or(Value::Null);
        (200, job.to_string())
    }

    fn list(&self, query: &str) -> (u16, String) {
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        };
        let limit: usize = param("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(20)
            .clamp(1, 100);
        // Newest first.
        let mut newest: Vec<&Job> = self.jobs.iter().rev().collect();
        if let Some(after) = param("after") {
            match newest.iter().position(|j| j.id == after) {
                Some(k) => newest.drain(..=k),
                None => return error(400, &format!("No batch found with id '{after}'.")),
            };
        }
        let has_more = newest.len() > limit;
        newest.truncate(limit);
        let data: Vec<Value> = newest.iter().map(|j| object(j)).collect();
        (
            200,
            json!({"object": "list", "data": data,
                   "first_id": newest.first().map(|j| j.id.clone()),
                   "last_id": newest.last().map(|j| j.id.clone()),
                   "has_more": has_more})
            .to_string(),
        )
    }
}

/// The batch object, as `GET /v1/batches/{id}` returns it.
fn object(j: &Job) -> Value {
    let at = |s: &str| (j.status == s).then_some(j.created_at + 1);
    json!({
        "id": j.id,
        "object": "batch",
        "endpoint": "/v1/embeddings",
        "errors": j.errors,
        "input_file_id": j.input_file_id,
        "completion_window": "24h",
        "status": j.status,
        "output_file_id": j.output_file_id,
        "error_file_id": j.error_file_id,
        "created_at": j.created_at,
        "in_progress_at": null,
        "expires_at": j.created_at + 86_400,
        "finalizing_at": null,
        "completed_at": at("completed"),
        "failed_at": at("failed"),
        "expired_at": at("expired"),
        "cancelling_at": null,
        "cancelled_at": at("cancelled"),
        "request_counts": {"total": j.requests, "completed": j.completed, "failed": j.failed},
        "metadata": j.metadata,
    })
}

/// Why the provider refuses a job's file at validation: (line, message).
fn validate(input: &[u8]) -> Option<(usize, String)> {
    let mut ids = std::collections::HashSet::new();
    let mut inputs = 0usize;
    for (n, line) in input
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if n >= MAX_REQUESTS {
            return Some((
                n + 1,
                format!("The file has more than {MAX_REQUESTS} requests."),
            ));
        }
        let Ok(req) = serde_json::from_slice::<Value>(line) else {
            return Some((n + 1, "Invalid JSON on this line.".into()));
        };
        let Some(id) = req["custom_id"].as_str() else {
            return Some((n + 1, "Missing custom_id.".into()));
        };
        if !ids.insert(id.to_string()) {
            return Some((n + 1, format!("Duplicate custom_id: {id}.")));
        }
        if req["method"] != "POST" || req["url"] != "/v1/embeddings" {
            return Some((
                n + 1,
                "The url must be /v1/embeddings, with method POST.".into(),
            ));
        }
        inputs += match &req["body"]["input"] {
            Value::Array(a) => a.len(),
            _ => 1,
        };
        if inputs > MAX_REQUESTS {
            return Some((
                n + 1,
                format!("More than {MAX_REQUESTS} embedding inputs in one batch."),
            ));
        }
    }
    (inputs == 0).then(|| (0, "The file has no requests.".into()))
}

/// Run a job's requests: (output file, error file, completed, failed).
fn run_requests(
    input: &[u8],
    status: &str,
    answer: &Answer<'_>,
) -> (Vec<u8>, Vec<u8>, usize, usize) {
    let lines: Vec<Value> = input
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    // An expired or cancelled job got through its first half.
    let answered = match status {
        "completed" => lines.len(),
        _ => lines.len() / 2,
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let (mut done, mut failed) = (0, 0);
    for (n, req) in lines.iter().enumerate().rev() {
        let custom_id = req["custom_id"].clone();
        let id = format!("batch_req_{n}");
        if n >= answered {
            let code = if status == "expired" {
                "batch_expired"
            } else {
                "batch_cancelled"
            };
            let line = json!({"id": id, "custom_id": custom_id, "response": null,
                "error": {"code": code, "message": "This request could not be executed before the completion window expired."}});
            err.extend_from_slice(line.to_string().as_bytes());
            err.push(b'\n');
            continue;
        }
        let body = &req["body"];
        let inputs = crate::inputs_of(body);
        let rejected = inputs.is_empty()
            || inputs.iter().any(String::is_empty)
            || answer
                .reject_marker
                .is_some_and(|m| inputs.iter().any(|i| i.contains(m)));
        if rejected {
            failed += 1;
            let line = json!({"id": id, "custom_id": custom_id, "response": {"status_code": 400,
                "request_id": format!("req_{n}"),
                "body": {"error": {"message": "This model's maximum context length is 8192 tokens, however you requested 9000 tokens.",
                                   "type": "invalid_request_error", "param": null, "code": null}}},
                "error": null});
            err.extend_from_slice(line.to_string().as_bytes());
            err.push(b'\n');
            continue;
        }
        done += 1;
        let dims = body["dimensions"]
            .as_u64()
            .map_or(answer.dims, |d| d as usize);
        let reply = crate::fast_reply(&inputs, dims, &body["model"]);
        let reply: Value = serde_json::from_str(&reply).unwrap_or(Value::Null);
        let line = json!({"id": id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": format!("req_{n}"), "body": reply},
            "error": null});
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    (out, err, done, failed)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The parts of a multipart body between `delimiter`s.
fn split<'a>(body: &'a [u8], delimiter: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = body;
    while let Some(k) = find(rest, delimiter) {
        if k > 0 {
            parts.push(&rest[..k]);
        }
        rest = &rest[k + delimiter.len()..];
    }
    parts
}
