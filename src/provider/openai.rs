//! The OpenAI wire format, as spoken by OpenAI, OpenRouter, Azure OpenAI
//! (a deployment's URL with `api-version`, the key in `api-key`) and the
//! OpenAI-compatible servers (Ollama, text-embeddings-inference, vLLM, LM
//! Studio). One blocking request per call, mapped to [`ProviderError`] kinds.
//!
//! Robust to the dialects' differences: `encoding_format` is always sent, an
//! item may be a float array or a base64 string, `index` and `usage` may be
//! missing, errors may be nested (`{"error":{...}}`) or flat, and an HTTP 200
//! may carry an error body (OpenRouter).

use super::http::{one_line, path_segment, read_body, retry_after, transport_message};
use super::{Embedder, Embeddings, ProviderError};
use crate::config::ProviderConfig;
use crate::models::ProviderKind;
use crate::pacing::Limits;
use base64::Engine;
use serde_json::Value;
use std::time::Duration;

/// Replies larger than this are refused (2048 inputs of 3072 floats as JSON
/// text stay well below it).
const MAX_REPLY_BYTES: u64 = 512 * 1024 * 1024;

pub struct OpenAiClient {
    agent: ureq::Agent,
    url: String,
    kind: ProviderKind,
    api_key: Option<String>,
    key_var: &'static str,
    model: String,
    dimensions: Option<u32>,
    /// `--request-extra`, merged into every body.
    extra: serde_json::Map<String, Value>,
}

impl OpenAiClient {
    pub fn new(cfg: &ProviderConfig) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout(cfg.request_timeout)
            .user_agent(concat!("autoembed/", env!("CARGO_PKG_VERSION")))
            .build();
        let url = match (cfg.kind, &cfg.api_version) {
            (ProviderKind::Azure, Some(version)) => format!(
                "{}/openai/deployments/{}/embeddings?api-version={version}",
                cfg.api_base,
                path_segment(&cfg.model)
            ),
            _ => format!("{}/embeddings", cfg.api_base),
        };
        OpenAiClient {
            agent,
            url,
            kind: cfg.kind,
            api_key: cfg.api_key.clone(),
            key_var: cfg.key_var,
            model: cfg.kind.wire_model(&cfg.model),
            dimensions: cfg.dimensions,
            extra: cfg.request_extra.clone().unwrap_or_default(),
        }
    }

    /// base64 halves the reply size; compatible servers are sent `float`,
    /// since some older ones answer 400 to `base64`.
    fn encoding(&self) -> &'static str {
        match self.kind {
            ProviderKind::Compatible => "float",
            _ => "base64",
        }
    }

    fn request_body(&self, inputs: &[&str]) -> String {
        self.body(inputs).to_string()
    }

    /// The JSON body of a request for `inputs` (a batch job's line holds one).
    pub(super) fn body(&self, inputs: &[&str]) -> Value {
        let mut body = serde_json::json!({
            "model": self.model,
            "input": inputs,
            "encoding_format": self.encoding(),
        });
        if let Some(d) = self.dimensions {
            body["dimensions"] = d.into();
        }
        if let Value::Object(fields) = &mut body {
            for (k, v) in &self.extra {
                fields.insert(k.clone(), v.clone());
            }
        }
        body
    }

    pub(super) fn classify(
        &self,
        status: u16,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> ProviderError {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let err = parsed
            .as_ref()
            .map(ErrorBody::from_json)
            .unwrap_or_default();
        let message = if err.message.is_empty() {
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string()
        } else {
            err.message.clone()
        };
        let message = one_line(&message);
        let key_hint = match &self.api_key {
            Some(_) => format!("check the key in {}", self.key_var),
            None => format!("no key was sent; set {}", self.key_var),
        };
        if err.code == "insufficient_quota" || err.kind == "insufficient_quota" {
            return ProviderError::Fatal {
                message: format!(
                    "quota exhausted (insufficient_quota): {message}; add credit for the key in {}",
                    self.key_var
                ),
            };
        }
        match status {
            401 => ProviderError::Fatal {
                message: format!("the API key was refused (401): {message}; {key_hint}"),
            },
            403 => ProviderError::Fatal {
                message: format!("access denied (403): {message}; {key_hint}"),
            },
            402 => ProviderError::Fatal {
                message: format!("out of credits (402): {message}; add credit for the key in {}", self.key_var),
            },
            404 => ProviderError::Fatal {
                message: format!(
                    "not found (404) at {}: {message}; check --api-base (AUTOEMBED_API_BASE) and --model (AUTOEMBED_MODEL)",
                    self.url
                ),
            },
            400 | 413 | 422 => ProviderError::Rejected { status, message },
            429 => ProviderError::RateLimited {
                retry_after: retry_after.or_else(|| retry_hint_in_message(&message)),
                message: format!("429: {message}"),
            },
            _ => ProviderError::Transient {
                retry_after,
                message: format!("HTTP {status}: {message}"),
            },
        }
    }

    pub(super) fn parse_reply(
        &self,
        body: &[u8],
        n_inputs: usize,
    ) -> Result<Embeddings, ProviderError> {
        let garbage = |why: &str| ProviderError::Transient {
            retry_after: None,
            message: format!("unusable reply: {why}"),
        };
        let reply: Reply =
            serde_json::from_slice(body).map_err(|e| garbage(&format!("unexpected JSON ({e})")))?;
        if reply.error.is_some() {
            // OpenRouter can answer HTTP 200 with an error body.
            let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let status = ErrorBody::from_json(&json).status.unwrap_or(500);
            return Err(self.classify(if status == 200 { 500 } else { status }, body, None));
        }
        let data = reply.data.ok_or_else(|| garbage("no data array"))?;
        if data.len() != n_inputs {
            return Err(garbage(&format!(
                "{} vectors for {} inputs",
                data.len(),
                n_inputs
            )));
        }
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; n_inputs];
        for (pos, item) in data.into_iter().enumerate() {
            let index = item.index.map_or(pos, |i| i as usize);
            let slot = slots
                .get_mut(index)
                .ok_or_else(|| garbage(&format!("index {index} out of range")))?;
            if slot.is_some() {
                return Err(garbage(&format!("index {index} repeated")));
            }
            let vector = item
                .embedding
                .ok_or_else(|| garbage("item without embedding"))?
                .0;
            if vector.is_empty() || vector.iter().any(|x| !x.is_finite()) {
                return Err(garbage("empty or non-finite vector"));
            }
            *slot = Some(vector);
        }
        let vectors: Vec<Vec<f32>> = slots.into_iter().map(|v| v.unwrap_or_default()).collect();
        let dim = vectors[0].len();
        if vectors.iter().any(|v| v.len() != dim) {
            return Err(garbage("vectors of different lengths"));
        }
        let tokens = reply.usage.and_then(|u| u.prompt_tokens.or(u.total_tokens));
        Ok(Embeddings {
            vectors,
            tokens,
            ..Embeddings::default()
        })
    }
}

/// A successful reply, read without building a JSON tree: replies of 2048
/// vectors are tens of megabytes.
#[derive(serde::Deserialize)]
struct Reply {
    #[serde(default)]
    data: Option<Vec<Item>>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(serde::Deserialize)]
struct Item {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    embedding: Option<Floats>,
}

#[derive(serde::Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

/// An embedding as either a float array or a base64 string of
/// little-endian float32s.
struct Floats(Vec<f32>);

impl<'de> serde::Deserialize<'de> for Floats {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Floats;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of numbers or a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Floats, E> {
                decode_base64(v)
                    .map(Floats)
                    .ok_or_else(|| E::custom("bad base64 embedding"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Floats, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1536));
                while let Some(x) = seq.next_element::<f64>()? {
                    out.push(x as f32);
                }
                Ok(Floats(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl Embedder for OpenAiClient {
    fn embed(&self, inputs: &[&str]) -> Result<Embeddings, ProviderError> {
        if inputs.is_empty() {
            return Ok(Embeddings {
                tokens: Some(0),
                ..Embeddings::default()
            });
        }
        let mut req = self
            .agent
            .post(&self.url)
            .set("content-type", "application/json");
        if let Some(key) = &self.api_key {
            req = match self.kind {
                ProviderKind::Azure => req.set("api-key", key),
                _ => req.set("authorization", &format!("Bearer {key}")),
            };
        }
        if self.kind == ProviderKind::OpenRouter {
            req = req.set("x-title", "autoembed");
        }
        match req.send_string(&self.request_body(inputs)) {
            Ok(resp) => {
                let limits = Limits::from_headers(|name| resp.header(name));
                let mut reply = with_body_buffer(|buf| {
                    read_body(resp, buf, MAX_REPLY_BYTES)?;
                    self.parse_reply(buf, inputs.len())
                })?;
                reply.limits = limits;
                Ok(reply)
            }
            Err(ureq::Error::Status(status, resp)) => {
                let retry_after = retry_after(&resp);
                let mut body = Vec::new();
                let _ = read_body(resp, &mut body, MAX_REPLY_BYTES);
                Err(self.classify(status, &body, retry_after))
            }
            Err(ureq::Error::Transport(t)) => Err(ProviderError::Transient {
                retry_after: None,
                message: format!(
                    "cannot reach {}: {}",
                    self.url,
                    one_line(&transport_message(&t))
                ),
            }),
        }
    }
}

/// Run `f` with this thread's reply buffer, emptied. Each worker's request
/// thread lives as long as the run, so one buffer serves all its replies and
/// memory does not grow with the number of requests.
fn with_body_buffer<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.clear();
        let out = f(&mut buf);
        // Don't keep a huge buffer around after an unusually large reply.
        if buf.capacity() > 64 << 20 {
            *buf = Vec::new();
        }
        out
    })
}

/// Little-endian IEEE-754 float32s, standard alphabet with padding.
fn decode_base64(s: &str) -> Option<Vec<f32>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.len() % 4 != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// The error fields of a nested (`{"error":{...}}`) or flat body.
#[derive(Debug, Default)]
struct ErrorBody {
    message: String,
    code: String,
    kind: String,
    /// OpenRouter's numeric `code`, which stands for an HTTP status.
    status: Option<u16>,
}

impl ErrorBody {
    fn from_json(v: &Value) -> ErrorBody {
        let inner = match v.get("error") {
            Some(Value::String(s)) => {
                return ErrorBody {
                    message: s.clone(),
                    ..ErrorBody::default()
                };
            }
            Some(e @ Value::Object(_)) => e,
            _ => v,
        };
        let text = |k: &str| match inner.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        ErrorBody {
            message: text("message"),
            code: text("code"),
            kind: text("type"),
            status: inner
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok()),
        }
    }
}

/// `Please try again in 2.812s` / `in 120ms` in an OpenAI 429 message.
fn retry_hint_in_message(msg: &str) -> Option<Duration> {
    let rest = &msg[msg.find("try again in ")? + "try again in ".len()..];
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let value: f64 = num.parse().ok()?;
    let unit = &rest[num.len()..];
    if unit.starts_with("ms") {
        Some(Duration::from_secs_f64(value / 1000.0))
    } else if unit.starts_with('s') {
        Some(Duration::from_secs_f64(value))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_azure_deployment_goes_in_the_path_encoded_and_extra_fields_in_the_body() {
        assert_eq!(path_segment("prod-embeddings_v2.1"), "prod-embeddings_v2.1");
        assert_eq!(path_segment("a b/c?d"), "a%20b%2Fc%3Fd");
        let mut extra = serde_json::Map::new();
        extra.insert("input_type".into(), "document".into());
        let c = OpenAiClient::new(&ProviderConfig {
            kind: ProviderKind::Azure,
            api_base: "https://r.openai.azure.com".into(),
            api_key: Some("k".into()),
            key_var: "AZURE_OPENAI_API_KEY",
            vault_secret: None,
            price_per_million: None,
            model: "my deployment".into(),
            model_path: None,
            local_precision: Default::default(),
            dimensions: Some(256),
            request_timeout: Duration::from_secs(1),
            api_version: Some("2024-10-21".into()),
            request_extra: Some(extra),
            batch_api: false,
        });
        assert_eq!(
            c.url,
            "https://r.openai.azure.com/openai/deployments/my%20deployment/embeddings?api-version=2024-10-21"
        );
        let body: Value = serde_json::from_str(&c.request_body(&["x"])).unwrap();
        assert_eq!(body["input_type"], "document");
        assert_eq!(body["dimensions"], 256);
        assert_eq!(body["input"][0], "x");
    }

    fn client(kind: ProviderKind) -> OpenAiClient {
        OpenAiClient::new(&ProviderConfig::for_tests(kind))
    }

    #[test]
    fn maps_results_by_index_and_accepts_base64_and_floats() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(
            [1.5f32, -2.0]
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let body = format!(
            r#"{{"data":[{{"index":1,"embedding":"{b64}"}},{{"index":0,"embedding":[0.25,0.5]}}],"usage":{{"prompt_tokens":7}}}}"#
        );
        let e = client(ProviderKind::OpenAi)
            .parse_reply(body.as_bytes(), 2)
            .unwrap();
        assert_eq!(e.vectors, vec![vec![0.25, 0.5], vec![1.5, -2.0]]);
        assert_eq!(e.tokens, Some(7));
    }

    #[test]
    fn rejects_wrong_count_repeated_index_and_mixed_lengths() {
        let c = client(ProviderKind::OpenAi);
        for body in [
            r#"{"data":[{"index":0,"embedding":[1.0]}]}"#,
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":0,"embedding":[2.0]}]}"#,
            r#"{"data":[{"index":0,"embedding":[1.0]},{"index":1,"embedding":[2.0,3.0]}]}"#,
            r#"{"data":[]}"#,
            "not json",
        ] {
            let err = c.parse_reply(body.as_bytes(), 2).unwrap_err();
            assert!(
                matches!(err, ProviderError::Transient { .. }),
                "{body}: {err:?}"
            );
        }
    }

    #[test]
    fn an_error_body_with_http_200_is_an_error() {
        let c = client(ProviderKind::OpenRouter);
        let body = br#"{"error":{"code":402,"message":"Insufficient credits"}}"#;
        assert!(matches!(
            c.parse_reply(body, 1),
            Err(ProviderError::Fatal { .. })
        ));
        let body = br#"{"error":{"code":503,"message":"No provider available"}}"#;
        assert!(matches!(
            c.parse_reply(body, 1),
            Err(ProviderError::Transient { .. })
        ));
    }

    #[test]
    fn classifies_flat_and_nested_errors() {
        let c = client(ProviderKind::OpenAi);
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(matches!(
            c.classify(429, quota, None),
            ProviderError::Fatal { .. }
        ));
        let flat = br#"{"message":"batch size 64 > maximum allowed batch size 32","code":413,"type":"Validation"}"#;
        assert_eq!(
            c.classify(413, flat, None),
            ProviderError::Rejected {
                status: 413,
                message: "batch size 64 > maximum allowed batch size 32".into()
            }
        );
        let limited = br#"{"error":{"message":"Rate limit reached. Please try again in 2.5s.","code":"rate_limit_exceeded"}}"#;
        assert!(matches!(
            c.classify(429, limited, None),
            ProviderError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_millis(2500)
        ));
    }
}
