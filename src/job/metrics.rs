//! `watch --metrics-addr`: what a watcher has done, for Prometheus, served
//! on an address of its own (off by default). Counters of rows embedded and
//! failed, requests, tokens and 429s, and gauges of the pending rows and of
//! the time of the last successful write, updated after each round; the
//! exposition format is `prometheus-client`'s.

use super::report::RunReport;
use crate::error::{Error, Result};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The metrics of one watcher.
pub struct Metrics {
    embedded: Counter,
    failed: Counter,
    requests: Counter,
    tokens: Counter,
    rate_limited: Counter,
    pending: Gauge,
    last_write: Gauge,
}

impl Metrics {
    /// Listen on `addr` and serve `GET /metrics` from a thread of its own.
    pub fn serve(addr: &str) -> Result<Metrics> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            Error::Config(format!(
                "cannot listen on --metrics-addr (AUTOEMBED_METRICS_ADDR) {addr}: {e}"
            ))
        })?;
        let m = Metrics {
            embedded: Counter::default(),
            failed: Counter::default(),
            requests: Counter::default(),
            tokens: Counter::default(),
            rate_limited: Counter::default(),
            pending: Gauge::default(),
            last_write: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("autoembed");
        registry.register(
            "rows_embedded",
            "Rows whose vector was written",
            m.embedded.clone(),
        );
        registry.register(
            "rows_failed",
            "Rows the provider rejected, recorded as failed",
            m.failed.clone(),
        );
        registry.register(
            "requests",
            "Requests to the embeddings API",
            m.requests.clone(),
        );
        registry.register("tokens", "Tokens the provider reported", m.tokens.clone());
        registry.register(
            "rate_limited",
            "Replies of 429 (rate limited)",
            m.rate_limited.clone(),
        );
        registry.register(
            "pending_rows",
            "Rows without a vector after the last round",
            m.pending.clone(),
        );
        registry.register(
            "last_write_timestamp_seconds",
            "When a vector was last written (Unix time; 0 before the first)",
            m.last_write.clone(),
        );
        if let Ok(bound) = listener.local_addr() {
            crate::info!("metrics on http://{bound}/metrics");
        }
        let registry = Arc::new(registry);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream, &registry);
            }
        });
        Ok(m)
    }

    /// Add what a round did.
    pub fn record(&self, r: &RunReport) {
        self.embedded.inc_by(r.embedded);
        self.failed.inc_by(r.failed);
        self.requests.inc_by(r.requests);
        self.tokens.inc_by(r.tokens);
        self.rate_limited.inc_by(r.rate_limited);
        if let Some(p) = r.pending_after {
            self.pending.set(p);
        }
        if r.embedded > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            self.last_write.set(now);
        }
    }
}

/// One HTTP exchange: `GET /metrics` gets the registry, anything else 404.
fn answer(mut stream: TcpStream, registry: &Registry) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    // The request's head, up to its blank line (or 8 KB).
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, kind, body) = if path == "/metrics" || path.starts_with("/metrics?") {
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Err(_) => ("500 Internal Server Error", "text/plain", String::new()),
        }
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
}
