//! OpenAI's Batch API on the wire: a JSONL file of embeddings requests
//! uploaded to `/files` (purpose `batch`), a job created on it
//! (`/batches`, endpoint `/v1/embeddings`, window `24h`, the intent in its
//! `metadata`), its status read, listed, cancelled, and its output and
//! error files downloaded. Half the price of the synchronous endpoint, in a
//! rate-limit pool of its own, done within a day.
//!
//! Files travel between disk and the socket in pieces: a job of 50,000
//! texts is never held in memory. Each call is tried up to three times on
//! server errors and rate limits, except creating a job: a create whose
//! reply was lost may have made the job, so it is never repeated; the
//! intent in its metadata finds it instead ([`BatchApi::find_intent`]).

use super::http::{one_line, path_segment, read_body, retry_after, transport_message};
use super::openai::OpenAiClient;
use super::{backoff, ProviderError, RetryPolicy};
use crate::config::ProviderConfig;
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// The provider's limits on one job: requests (one text each) and file size.
pub const MAX_JOB_REQUESTS: usize = 50_000;
pub const MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// The completion window autoembed asks for (the only one OpenAI offers).
pub const WINDOW: &str = "24h";
/// The metadata key that carries the intent's id.
const INTENT_KEY: &str = "autoembed_intent";

mod job;

pub use job::{JobStatus, LineResult, RemoteJob};

/// The Files and Batch endpoints of an OpenAI-compatible base URL.
pub struct BatchApi {
    agent: ureq::Agent,
    base: String,
    api_key: Option<String>,
    wire: OpenAiClient,
}

/// The most a status, list or error reply is read of: they are small objects.
const SMALL_REPLY_BYTES: u64 = 1 << 20;
/// The most an error reply is read of, for its message.
const ERROR_BODY_BYTES: u64 = 64 * 1024;

/// Tries of a call that may be repeated.
const TRIES: u32 = 3;

impl BatchApi {
    pub fn new(cfg: &ProviderConfig) -> BatchApi {
        // Files are long: the timeout bounds each read and write, not the whole transfer.
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(cfg.request_timeout)
            .timeout_read(cfg.request_timeout)
            .timeout_write(cfg.request_timeout)
            .user_agent(concat!("autoembed/", env!("CARGO_PKG_VERSION")))
            .build();
        BatchApi {
            agent,
            base: cfg.api_base.trim_end_matches('/').to_string(),
            api_key: cfg.api_key.clone(),
            wire: OpenAiClient::new(cfg),
        }
    }

    /// One line of a job's input file: `text` embedded under `custom_id`.
    pub fn line(&self, custom_id: &str, text: &str) -> String {
        serde_json::json!({
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": self.wire.body(&[text]),
        })
        .to_string()
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let req = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => req.set("authorization", &format!("Bearer {key}")),
            None => req,
        }
    }

    /// Send the request `req` builds (with `body`, as JSON) up to
    /// [`TRIES`] times (once unless `repeatable`); the reply as JSON.
    fn json(
        &self,
        what: &str,
        repeatable: bool,
        req: impl Fn() -> ureq::Request,
        body: Option<&str>,
    ) -> Result<Value, ProviderError> {
        self.tried(what, repeatable, || {
            let sent = match body {
                Some(b) => req().set("content-type", "application/json").send_string(b),
                None => req().call(),
            };
            reply_json(what, sent.map_err(|e| self.failed(what, e))?)
        })
    }

    fn tried<T>(
        &self,
        what: &str,
        repeatable: bool,
        f: impl Fn() -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let mut attempt = 1;
        loop {
            match f() {
                Err(
                    ProviderError::Transient { retry_after, .. }
                    | ProviderError::RateLimited { retry_after, .. },
                ) if repeatable && attempt < TRIES => {
                    let wait = retry_after
                        .unwrap_or_else(|| backoff(&RetryPolicy::default(), attempt))
                        .min(Duration::from_secs(30));
                    crate::debug!("{what}: retrying in {wait:?}");
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn failed(&self, what: &str, e: ureq::Error) -> ProviderError {
        match e {
            ureq::Error::Status(status, resp) => {
                let wait = retry_after(&resp);
                let mut body = Vec::new();
                let _ = read_body(resp, &mut body, ERROR_BODY_BYTES);
                if status != 404 {
                    return self.wire.classify(status, &body, wait).in_call(what);
                }
                ProviderError::Fatal {
                    message: format!(
                        "{what}: not found (404) at {}: {}; --batch-api needs OpenAI's Batch API at --api-base (AUTOEMBED_API_BASE)",
                        self.base,
                        one_line(&String::from_utf8_lossy(&body))
                    ),
                }
            }
            ureq::Error::Transport(t) => ProviderError::Transient {
                retry_after: None,
                message: format!(
                    "{what}: cannot reach {}: {}",
                    self.base,
                    one_line(&transport_message(&t))
                ),
            },
        }
    }

    fn job(&self, what: &str, v: Value) -> Result<RemoteJob, ProviderError> {
        RemoteJob::from_json(&v).ok_or_else(|| ProviderError::Transient {
            retry_after: None,
            message: format!("{what}: unusable reply: not a batch object"),
        })
    }

    /// Upload the JSONL file at `path` (purpose `batch`); its file id.
    pub fn upload(&self, path: &Path) -> Result<String, ProviderError> {
        let what = "uploading the batch file";
        let boundary = format!("autoembed-{:016x}", crate::random::u64());
        let head = format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"autoembed.jsonl\"\r\n\
             content-type: application/jsonl\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let v = self.tried(what, true, || {
            let file = std::fs::File::open(path).map_err(|e| ProviderError::Misconfigured {
                message: format!("{what}: cannot read {}: {e}", path.display()),
            })?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            let length = head.len() as u64 + size + tail.len() as u64;
            let body = head.as_bytes().chain(file).chain(tail.as_bytes());
            self.request("POST", "/files")
                .set(
                    "content-type",
                    &format!("multipart/form-data; boundary={boundary}"),
                )
                .set("content-length", &length.to_string())
                .send(body)
                .map_err(|e| self.failed(what, e))
                .and_then(|resp| reply_json(what, resp))
        })?;
        v.get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ProviderError::Transient {
                retry_after: None,
                message: format!("{what}: unusable reply: no file id"),
            })
    }

    /// Create the job on `file_id`, with `intent` in its metadata. Sent
    /// once: a failure may still have made the job.
    pub fn create(
        &self,
        file_id: &str,
        intent: &str,
        table: &str,
    ) -> Result<RemoteJob, ProviderError> {
        let what = "creating the batch job";
        let body = serde_json::json!({
            "input_file_id": file_id,
            "endpoint": "/v1/embeddings",
            "completion_window": WINDOW,
            "metadata": {INTENT_KEY: intent, "autoembed_table": table.chars().take(500).collect::<String>()},
        });
        let body = body.to_string();
        let v = self.json(
            what,
            false,
            || self.request("POST", "/batches"),
            Some(&body),
        )?;
        self.job(what, v)
    }

    /// The job `id` as it is now.
    pub fn get(&self, id: &str) -> Result<RemoteJob, ProviderError> {
        let what = format!("reading batch job {id}");
        let path = format!("/batches/{}", path_segment(id));
        let v = self.json(&what, true, || self.request("GET", &path), None)?;
        self.job(&what, v)
    }

    /// Ask the provider to cancel job `id`; it goes `cancelling`, then
    /// `cancelled` with what it finished.
    pub fn cancel(&self, id: &str) -> Result<RemoteJob, ProviderError> {
        let what = format!("cancelling batch job {id}");
        let path = format!("/batches/{}/cancel", path_segment(id));
        let v = self.json(&what, true, || self.request("POST", &path), Some("{}"))?;
        self.job(&what, v)
    }

    /// The job whose metadata carries `intent`, among those created since
    /// `since` (Unix seconds); the list is newest first.
    pub fn find_intent(
        &self,
        intent: &str,
        since: i64,
    ) -> Result<Option<RemoteJob>, ProviderError> {
        let mut after: Option<String> = None;
        loop {
            let what = "listing batch jobs";
            let page = || {
                let req = self.request("GET", "/batches").query("limit", "100");
                match &after {
                    Some(a) => req.query("after", a),
                    None => req,
                }
            };
            let v = self.json(what, true, page, None)?;
            let jobs: Vec<RemoteJob> = v
                .get("data")
                .and_then(Value::as_array)
                .map(|d| d.iter().filter_map(RemoteJob::from_json).collect())
                .unwrap_or_default();
            if let Some(j) = jobs.iter().find(|j| j.intent.as_deref() == Some(intent)) {
                return Ok(Some(j.clone()));
            }
            let more = v.get("has_more").and_then(Value::as_bool).unwrap_or(false);
            let older = jobs.last().is_some_and(|j| j.created_at < since);
            match jobs.last() {
                Some(last) if more && !older => after = Some(last.id.clone()),
                _ => return Ok(None),
            }
        }
    }

    /// Download file `id` into `to`, in pieces.
    pub fn download(&self, id: &str, to: &Path) -> Result<(), ProviderError> {
        let what = format!("downloading batch file {id}");
        self.tried(&what, true, || {
            let resp = self
                .request("GET", &format!("/files/{}/content", path_segment(id)))
                .call()
                .map_err(|e| self.failed(&what, e))?;
            let io = |e: std::io::Error| ProviderError::Transient {
                retry_after: None,
                message: format!("{what}: {e}"),
            };
            let mut file = std::fs::File::create(to).map_err(io)?;
            std::io::copy(&mut resp.into_reader(), &mut file).map_err(io)?;
            Ok(())
        })
    }

    /// Delete file `id` at the provider (its storage is the user's).
    pub fn delete_file(&self, id: &str) -> Result<(), ProviderError> {
        let what = format!("deleting batch file {id}");
        let path = format!("/files/{}", path_segment(id));
        self.json(&what, true, || self.request("DELETE", &path), None)
            .map(|_| ())
    }

    /// Read one line of an output or error file; `None` when it is not a
    /// line of one.
    pub fn parse_line(&self, line: &str) -> Option<LineResult> {
        let v: Value = serde_json::from_str(line).ok()?;
        let custom_id = v.get("custom_id")?.as_str()?.to_string();
        let response = v.get("response").filter(|r| !r.is_null());
        let Some(response) = response else {
            let message = v
                .get("error")
                .and_then(|e| e.get("message").or(e.get("code")))
                .and_then(Value::as_str)
                .unwrap_or("no response")
                .to_string();
            return Some(LineResult::Unanswered {
                custom_id,
                message: one_line(&message),
            });
        };
        let status = response
            .get("status_code")
            .and_then(Value::as_u64)
            .unwrap_or(0) as u16;
        let body = response
            .get("body")
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let err = if status == 200 {
            match self.wire.parse_reply(&body, 1) {
                Ok(mut e) => {
                    let vector = e.vectors.pop()?;
                    return Some(LineResult::Vector {
                        custom_id,
                        vector,
                        tokens: e.tokens,
                    });
                }
                Err(e) => e,
            }
        } else {
            self.wire.classify(status, &body, None)
        };
        Some(match err {
            ProviderError::Rejected { message, .. } => LineResult::Rejected { custom_id, message },
            other => LineResult::Unanswered {
                custom_id,
                message: other.to_string(),
            },
        })
    }
}

/// A reply's body as JSON (at most a megabyte: these are small objects).
fn reply_json(what: &str, resp: ureq::Response) -> Result<Value, ProviderError> {
    let mut body = Vec::new();
    read_body(resp, &mut body, SMALL_REPLY_BYTES).map_err(|e| e.in_call(what))?;
    serde_json::from_slice(&body).map_err(|e| ProviderError::Transient {
        retry_after: None,
        message: format!("{what}: unusable reply: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> BatchApi {
        BatchApi::new(&crate::config::ProviderConfig::for_tests(
            crate::models::ProviderKind::OpenAi,
        ))
    }

    #[test]
    fn reads_vectors_refusals_and_unanswered_lines() {
        let api = api();
        let ok = r#"{"id":"r1","custom_id":"7","response":{"status_code":200,"body":{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-0.25]}],"model":"m","usage":{"prompt_tokens":3,"total_tokens":3}}},"error":null}"#;
        assert_eq!(
            api.parse_line(ok),
            Some(LineResult::Vector {
                custom_id: "7".into(),
                vector: vec![0.5, -0.25],
                tokens: Some(3)
            })
        );
        let bad = r#"{"id":"r2","custom_id":"8","response":{"status_code":400,"body":{"error":{"message":"too long","type":"invalid_request_error"}}},"error":null}"#;
        assert!(
            matches!(api.parse_line(bad), Some(LineResult::Rejected { custom_id, .. }) if custom_id == "8")
        );
        let busy = r#"{"id":"r3","custom_id":"9","response":{"status_code":500,"body":{"error":{"message":"oops"}}},"error":null}"#;
        assert!(matches!(
            api.parse_line(busy),
            Some(LineResult::Unanswered { .. })
        ));
        let expired = r#"{"id":"r4","custom_id":"10","response":null,"error":{"code":"batch_expired","message":"not executed"}}"#;
        assert_eq!(
            api.parse_line(expired),
            Some(LineResult::Unanswered {
                custom_id: "10".into(),
                message: "not executed".into()
            })
        );
        assert_eq!(api.parse_line("not json"), None);
    }
}
