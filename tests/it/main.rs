//! autoembed's integration tests, in one binary: each module runs the real
//! `autoembed` binary against the local PostgreSQL (a schema of its own per
//! test, so they run in parallel) and the mock provider, and checks what a
//! user would: the exact vector in the exact row, the exit code, the text.

mod access;
mod batch_api;
mod chunks;
mod claims;
mod config;
mod faults;
mod local;
mod models;
mod pacing;
mod plan;
mod pooler;
mod provider;
mod run;
mod schemas;
mod supabase;
mod support;
mod tls;
mod tokens;
mod watch;
