//! autoembed keeps a PostgreSQL pgvector column filled with embeddings.
//!
//! The binary is a thin shell over [`run`]: parse ([`cli`]), resolve
//! ([`config`]), check the table ([`checks`]), then one subcommand: the
//! batch loop ([`job`]: run-once, backfill, dry-run), the checks report
//! ([`verify`]) or the DDL ([`setup`]). All SQL lives in [`db`], all HTTP
//! and the local model in [`provider`], and everything printed passes
//! [`output`]'s redaction. `docs/architecture.md` draws how a row travels.
//!
//! Modules import only modules below them; the leaves ([`error`],
//! [`output`], [`signals`], [`models`], [`cli`], `template`, `random`)
//! import none of the others.

mod checks;
pub mod cli;
pub mod config;
mod db;
pub mod error;
mod job;
pub mod models;
pub mod output;
mod pacing;
mod provider;
mod random;
mod setup;
pub mod signals;
mod template;
mod tls;
mod tokens;
mod verify;

use config::{Config, Mode};
use signals::Stop;

/// Run the configured subcommand; print its summary or JSON; return the exit code.
pub fn run(cfg: &Config, stop: &Stop) -> i32 {
    output::set_secrets(cfg.secrets());
    output::set_level(cfg.verbosity);
    match cfg.mode {
        Mode::Verify => {
            let report = verify::verify(cfg, stop);
            emit(
                cfg,
                || serde_json::to_string(&report).unwrap_or_default(),
                || report.human(),
            );
            report.exit_code
        }
        Mode::Setup => match setup::command(cfg) {
            Ok(out) => {
                emit(
                    cfg,
                    || serde_json::json!({"command": "setup", "done": out}).to_string(),
                    || out.join("\n"),
                );
                0
            }
            Err(e) => {
                report_error("setup", cfg.json, &e);
                e.exit_code()
            }
        },
        Mode::BatchJobs => match job::batch_api::list::command(cfg) {
            Ok(report) => {
                emit(
                    cfg,
                    || serde_json::to_string(&report).unwrap_or_default(),
                    || report.human(),
                );
                0
            }
            Err(e) => {
                report_error("batch-jobs", cfg.json, &e);
                e.exit_code()
            }
        },
        Mode::Watch => match job::watch::run(cfg, stop) {
            Ok(code) => code,
            Err(e) => {
                report_error("watch", cfg.json, &e);
                e.exit_code()
            }
        },
        Mode::RunOnce | Mode::Backfill | Mode::DryRun => match job::run(cfg, stop) {
            Ok(report) => {
                if let job::report::Report::Run(r) = &report {
                    if let Some(e) = &r.error {
                        output::log(-2, &format!("error: {e}"));
                    }
                }
                emit(cfg, || report.json(), || report.human());
                report.exit_code()
            }
            Err(e) => {
                report_error(cfg.mode.name(), cfg.json, &e);
                e.exit_code()
            }
        },
    }
}

fn emit(cfg: &Config, json: impl FnOnce() -> String, human: impl FnOnce() -> String) {
    if cfg.json {
        output::print(&json());
    } else {
        output::print(&human());
    }
}

/// An error that ended the run before it did anything: one line on stderr,
/// and with `--json` one object on stdout, so scripts always get JSON.
pub fn report_error(command: &str, json: bool, e: &error::Error) {
    output::log(-2, &format!("error: {e}"));
    if json {
        let v = serde_json::json!({
            "command": command,
            "ok": false,
            "error": output::redact(&e.to_string()),
            "exit_code": e.exit_code(),
        });
        output::print(&v.to_string());
    }
}
