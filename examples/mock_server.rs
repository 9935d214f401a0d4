//! A stand-in embeddings server for trying autoembed without an API key.
//!
//! It answers `POST /v1/embeddings` in OpenAI's wire format with vectors that
//! are a deterministic function of the text (not meaningful embeddings), on
//! 127.0.0.1. `scripts/demo.sh` uses it; point autoembed at it with
//! `--provider openai-compatible --api-base <printed URL>`.
//!
//! ```text
//! cargo run --example mock_server -- [PORT] [DIMENSIONS]
//! ```

use autoembed_mock as mock;

fn main() {
    let mut args = std::env::args().skip(1);
    let port = args.next().unwrap_or_else(|| "0".into());
    let dims = args.next().and_then(|d| d.parse().ok()).unwrap_or(1536);
    let server = mock::Mock::start_on(&format!("127.0.0.1:{port}"), dims);
    println!("{}", server.base);
    loop {
        std::thread::park();
    }
}
