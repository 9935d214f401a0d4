//! A stand-in embeddings server for trying autoembed without an API key.
//!
//! It answers `POST /v1/embeddings` in OpenAI's wire format with vectors that
//! are a deterministic function of the text (not meaningful embeddings), on
//! 127.0.0.1. `scripts/demo.sh` uses it; point autoembed at it with
//! `--provider openai-compatible --api-base <printed URL>`.
//!
//! ```text
//! cargo run --example mock_server -- [PORT] [DIMENSIONS] [LATENCY_MS]
//! ```

use autoembed_mock as mock;

fn main() {
    let mut args = std::env::args().skip(1);
    let port = args.next().unwrap_or_else(|| "0".into());
    let dims = args.next().and_then(|d| d.parse().ok()).unwrap_or(1536);
    let latency_ms: u64 = args.next().and_then(|d| d.parse().ok()).unwrap_or(0);
    let server = mock::Mock::start_on(&format!("127.0.0.1:{port}"), dims);
    server.latency(std::time::Duration::from_millis(latency_ms));
    println!("{}", server.base);
    loop {
        std::thread::park();
    }
}
