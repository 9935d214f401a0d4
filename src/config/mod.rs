//! Turns the parsed command line, the environment, a `.env` file and the
//! defaults into one validated [`Config`], without touching the network.
//!
//! Precedence is flag, then process environment, then `.env`, then default.
//! Every error names the flag and the variable to fix, and never echoes a
//! secret (the database URL and the API key are not quoted back).

mod database;
mod env;
mod provider;

pub use database::describe_database;
pub use env::Env;
pub use provider::ProviderConfig;

use crate::cli::{self, Cli};
use crate::error::{Error, Result};
use crate::models::ProviderKind;
use database::database;
use env::{parse_limit, parse_num, parse_usd};
use provider::provider_config;
use std::time::Duration;

/// Which subcommand runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    RunOnce,
    Backfill,
    Watch,
    DryRun,
    Verify,
    Setup,
    /// `batch-jobs`: list or cancel the provider's batch jobs.
    BatchJobs,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::RunOnce => "run-once",
            Mode::Backfill => "backfill",
            Mode::Watch => "watch",
            Mode::DryRun => "dry-run",
            Mode::Verify => "verify",
            Mode::Setup => "setup",
            Mode::BatchJobs => "batch-jobs",
        }
    }
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// `watch`: how often it looks for pending rows when nothing wakes it.
    pub poll_interval: Duration,
    /// `watch --metrics-addr`: where Prometheus metrics are served.
    pub metrics_addr: Option<String>,
    pub database: postgres::Config,
    /// `sslmode` and `sslrootcert`, which autoembed enforces itself.
    pub tls: crate::tls::Settings,
    pub table: String,
    pub id_column: Option<String>,
    pub text_column: String,
    /// `--text-template`: the text built from several columns, instead of `text_column`.
    pub text_template: Option<crate::template::Template>,
    pub embedding_column: String,
    /// `--chunks-table`: each row's text is split into chunks, embedded
    /// into that table's rows instead of a column of the row.
    pub chunks: Option<Chunking>,
    pub state_schema: String,
    pub provider: ProviderConfig,
    pub budget: Budget,
    pub retry_failed: bool,
    /// `backfill --reembed`.
    pub reembed: Option<Reembed>,
    pub offline: bool,
    pub on_too_long: TooLong,
    pub setup: Setup,
    /// `batch-jobs --cancel`: a job id, or `all`.
    pub cancel_jobs: Option<String>,
    /// Batches in flight at once, each with its own connection.
    pub concurrency: usize,
    /// How long a claim holds its rows without being confirmed
    /// (`--claim-lease`); what frees the rows of a killed run behind a pooler.
    pub claim_lease: Duration,
    pub json: bool,
    pub verbosity: i8,
}

/// `--chunks-table`, `--chunk-tokens`, `--chunk-overlap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunking {
    /// The chunks table, as SQL writes it.
    pub table: String,
    /// The most tokens of a chunk; `None`: [`DEFAULT_CHUNK_TOKENS`], or the
    /// model's limit when lower.
    pub tokens: Option<usize>,
    /// Tokens a chunk repeats of the one before.
    pub overlap: usize,
}

/// A chunk's size unless `--chunk-tokens` says otherwise.
pub const DEFAULT_CHUNK_TOKENS: usize = 512;
/// The overlap of chunks unless `--chunk-overlap` says otherwise.
pub const DEFAULT_CHUNK_OVERLAP: usize = 50;

/// What to do with a text over the model's input limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooLong {
    /// Send its first tokens, up to the limit.
    Truncate,
    /// Don't send it; record the row as failed.
    Skip,
}

/// `backfill --reembed`: which rows that have a vector are embedded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reembed {
    /// Those another model (or size) made.
    Changed,
    /// All of them.
    All,
}

/// What `setup` does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup {
    pub print_sql: bool,
    pub uninstall: bool,
    /// Also the trigger that sends NOTIFY for `watch`.
    pub notify: bool,
}

/// How much one run may do.
#[derive(Debug, Clone)]
pub struct Budget {
    pub batch_size: usize,
    pub max_rows: Option<u64>,
    pub max_seconds: Option<Duration>,
    pub max_attempts: u32,
    pub max_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    pub tokens_per_minute: Option<u64>,
    pub requests_per_minute: Option<u64>,
}

/// Batches in flight at once unless `--concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// The same for the local model, which computes one batch at a time on
/// every core: a second worker claims and writes while the first computes.
pub const DEFAULT_LOCAL_CONCURRENCY: usize = 2;

/// How long a claim lasts unless `--claim-lease` says otherwise (or twice
/// `--request-timeout`, when that is longer): a request and its write fit well inside it.
pub const DEFAULT_CLAIM_LEASE: Duration = Duration::from_secs(120);
/// A lease must outlast a request by this much (the write follows it).
const MIN_LEASE_MARGIN: Duration = Duration::from_secs(2);

/// Upper bound on inputs in one embeddings request (OpenAI's limit).
pub const MAX_BATCH: usize = 2048;

impl Config {
    /// Resolve `cli` against the process environment and the `.env` file.
    pub fn resolve(cli: Cli) -> Result<Config> {
        let env = Env::load(cli.command.output().env_file.as_deref())?;
        Self::resolve_with(cli, &env)
    }

    fn resolve_with(cli: Cli, env: &Env) -> Result<Config> {
        let mut setup = Setup::default();
        let mut poll_interval = None;
        let mut metrics_addr = None;
        let mut reembed = None;
        let mut cancel_jobs = None;
        let (mode, c, budget_args, out, retry_failed, offline) = match cli.command {
            cli::Command::RunOnce(a) => (Mode::RunOnce, a.common, a.budget, a.output, false, false),
            cli::Command::Backfill(a) => {
                reembed = match a.reembed.as_deref() {
                    None => None,
                    Some("changed") => Some(Reembed::Changed),
                    Some("all") => Some(Reembed::All),
                    Some(other) => {
                        return Err(Error::config(format!(
                            "invalid --reembed {other:?}: expected nothing (rows another model embedded) or all"
                        )))
                    }
                };
                (
                    Mode::Backfill,
                    a.common,
                    a.budget,
                    a.output,
                    a.retry_failed,
                    false,
                )
            }
            cli::Command::DryRun(a) => (Mode::DryRun, a.common, a.budget, a.output, false, false),
            cli::Command::Watch(a) => {
                poll_interval = a.poll_interval;
                metrics_addr = a.metrics_addr;
                (Mode::Watch, a.common, a.budget, a.output, false, false)
            }
            cli::Command::Verify(a) => (
                Mode::Verify,
                a.common,
                cli::Budget::default(),
                a.output,
                false,
                a.offline,
            ),
            cli::Command::BatchJobs(a) => {
                cancel_jobs = a.cancel;
                let budget = cli::Budget {
                    batch_api: true,
                    ..cli::Budget::default()
                };
                (Mode::BatchJobs, a.common, budget, a.output, false, false)
            }
            cli::Command::Setup(a) => {
                setup = Setup {
                    print_sql: a.print_sql,
                    uninstall: a.uninstall,
                    notify: a.notify,
                };
                (
                    Mode::Setup,
                    a.common,
                    cli::Budget::default(),
                    a.output,
                    false,
                    true,
                )
            }
        };

        let mut provider = provider_config(env, &c)?;
        provider.batch_api = batch_api(env, budget_args.batch_api, mode, &provider)?;
        let (database, tls) = database(env, c.database_url)?;
        let table = env
            .pick(c.table, "AUTOEMBED_TABLE")
            .unwrap_or_else(|| "products".into());
        let id_column = env.pick(c.id_column, "AUTOEMBED_ID_COLUMN");
        let text_column = env.pick(c.text_column, "AUTOEMBED_TEXT_COLUMN");
        let text_template = match env.pick(c.text_template, "AUTOEMBED_TEXT_TEMPLATE") {
            None => None,
            Some(_) if text_column.is_some() => {
                return Err(Error::config(
                    "--text-template (AUTOEMBED_TEXT_TEMPLATE) replaces --text-column (AUTOEMBED_TEXT_COLUMN): set one of them",
                ))
            }
            Some(t) => Some(crate::template::Template::parse(&t).map_err(|e| {
                Error::Config(format!("--text-template (AUTOEMBED_TEXT_TEMPLATE): {e}"))
            })?),
        };
        let text_column = text_column.unwrap_or_else(|| "embedding_text".into());
        let embedding_column = env
            .pick(c.embedding_column, "AUTOEMBED_EMBEDDING_COLUMN")
            .unwrap_or_else(|| "embedding".into());
        let chunks = chunking(env, c.chunks_table, c.chunk_tokens, c.chunk_overlap)?;
        if chunks.is_some() && provider.batch_api {
            return Err(Error::config(
                "--batch-api (AUTOEMBED_BATCH_API) does not embed into --chunks-table (AUTOEMBED_CHUNKS_TABLE) yet: unset one of them",
            ));
        }
        let state_schema = env
            .pick(c.state_schema, "AUTOEMBED_STATE_SCHEMA")
            .unwrap_or_else(|| "autoembed".into());

        // A backfill and a watch run until nothing is left: no row or time budget by default.
        let backfill = matches!(mode, Mode::Backfill | Mode::Watch);
        let metrics_addr = env
            .pick(metrics_addr, "AUTOEMBED_METRICS_ADDR")
            .filter(|_| mode == Mode::Watch);
        if let Some(a) = &metrics_addr {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(Error::config(format!(
                    "invalid --metrics-addr (AUTOEMBED_METRICS_ADDR) {a:?}: expected HOST:PORT, such as 127.0.0.1:9464"
                )));
            }
        }
        let poll_interval = match env.pick(poll_interval, "AUTOEMBED_POLL_INTERVAL") {
            None => Duration::from_secs(1),
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) if (0.05..=3600.0).contains(&s) => Duration::from_secs_f64(s),
                _ => {
                    return Err(Error::config(format!(
                        "invalid --poll-interval (AUTOEMBED_POLL_INTERVAL) {v:?}: expected seconds from 0.05 to 3600"
                    )))
                }
            },
        };
        let batch_size = parse_num(
            env.pick(budget_args.batch_size, "AUTOEMBED_BATCH_SIZE"),
            "--batch-size",
            "AUTOEMBED_BATCH_SIZE",
            1,
            MAX_BATCH as u64,
        )?
        .unwrap_or(100) as usize;
        let max_rows = parse_limit(
            env.pick(budget_args.max_rows, "AUTOEMBED_MAX_ROWS"),
            "--max-rows",
            "AUTOEMBED_MAX_ROWS",
            if backfill { None } else { Some(1000) },
        )?;
        let max_seconds = parse_limit(
            env.pick(budget_args.max_seconds, "AUTOEMBED_MAX_SECONDS"),
            "--max-seconds",
            "AUTOEMBED_MAX_SECONDS",
            if backfill { None } else { Some(480) },
        )?
        .map(Duration::from_secs);
        let max_attempts = parse_num(
            env.pick(budget_args.max_attempts, "AUTOEMBED_MAX_ATTEMPTS"),
            "--max-attempts",
            "AUTOEMBED_MAX_ATTEMPTS",
            1,
            1000,
        )?
        .unwrap_or(5) as u32;

        let max_tokens = parse_limit(
            env.pick(budget_args.max_tokens, "AUTOEMBED_MAX_TOKENS"),
            "--max-tokens",
            "AUTOEMBED_MAX_TOKENS",
            None,
        )?;
        let max_cost_usd = parse_usd(
            env.pick(budget_args.max_cost_usd, "AUTOEMBED_MAX_COST_USD"),
            "--max-cost-usd",
            "AUTOEMBED_MAX_COST_USD",
        )?;
        if max_cost_usd.is_some() && provider.price().is_none() {
            return Err(Error::config(format!(
                "--max-cost-usd (AUTOEMBED_MAX_COST_USD) needs a price, and {} has none built in: set --price-per-million (AUTOEMBED_PRICE_PER_MILLION)",
                provider.model
            )));
        }
        let tokens_per_minute = parse_num(
            env.pick(budget_args.tokens_per_minute, "AUTOEMBED_TOKENS_PER_MINUTE"),
            "--tokens-per-minute",
            "AUTOEMBED_TOKENS_PER_MINUTE",
            1,
            u64::MAX >> 12,
        )?;
        let requests_per_minute = parse_num(
            env.pick(
                budget_args.requests_per_minute,
                "AUTOEMBED_REQUESTS_PER_MINUTE",
            ),
            "--requests-per-minute",
            "AUTOEMBED_REQUESTS_PER_MINUTE",
            1,
            u64::MAX >> 12,
        )?;
        let on_too_long = match env.pick(budget_args.on_too_long, "AUTOEMBED_ON_TOO_LONG").as_deref() {
            None | Some("truncate") => TooLong::Truncate,
            Some("skip") => TooLong::Skip,
            Some(other) => {
                return Err(Error::config(format!(
                    "invalid --on-too-long (AUTOEMBED_ON_TOO_LONG) {other:?}: expected truncate or skip"
                )))
            }
        };
        let concurrency = parse_num(
            env.pick(budget_args.concurrency, "AUTOEMBED_CONCURRENCY"),
            "--concurrency",
            "AUTOEMBED_CONCURRENCY",
            1,
            64,
        )?
        .map_or(
            match provider.kind {
                ProviderKind::Local => DEFAULT_LOCAL_CONCURRENCY,
                _ => DEFAULT_CONCURRENCY,
            },
            |n| n as usize,
        );
        let claim_lease = parse_num(
            env.pick(budget_args.claim_lease, "AUTOEMBED_CLAIM_LEASE"),
            "--claim-lease",
            "AUTOEMBED_CLAIM_LEASE",
            1,
            7 * 24 * 3600,
        )?
        .map_or(
            DEFAULT_CLAIM_LEASE.max(provider.request_timeout * 2),
            Duration::from_secs,
        );
        if claim_lease < provider.request_timeout + MIN_LEASE_MARGIN {
            return Err(Error::config(format!(
                "--claim-lease (AUTOEMBED_CLAIM_LEASE) must be at least {} seconds longer than \
                 --request-timeout (AUTOEMBED_REQUEST_TIMEOUT, {} s): a request must end before its rows' claim does",
                MIN_LEASE_MARGIN.as_secs(),
                provider.request_timeout.as_secs()
            )));
        }
        let verbosity = if out.quiet {
            -1
        } else {
            out.verbose.min(3) as i8
        };
        Ok(Config {
            mode,
            poll_interval,
            metrics_addr,
            database,
            tls,
            table,
            id_column,
            text_column,
            text_template,
            embedding_column,
            chunks,
            state_schema,
            provider,
            budget: Budget {
                batch_size,
                max_rows,
                max_seconds,
                max_attempts,
                max_tokens,
                max_cost_usd,
                tokens_per_minute,
                requests_per_minute,
            },
            retry_failed,
            reembed,
            offline,
            on_too_long,
            setup,
            cancel_jobs,
            concurrency,
            claim_lease,
            json: out.json,
            verbosity,
        })
    }

    /// Strings that must never be printed: the API key and the database password.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(k) = &self.provider.api_key {
            out.push(k.clone());
        }
        if let Some(p) = self.database.get_password() {
            out.push(String::from_utf8_lossy(p).into_owned());
        }
        out
    }

    /// Host, port, database and user, for messages (never the password).
    pub fn database_label(&self) -> String {
        describe_database(&self.database)
    }
}

/// `--batch-api`: for run-once, backfill and dry-run, with OpenAI's Batch API.
fn batch_api(env: &Env, flag: bool, mode: Mode, provider: &ProviderConfig) -> Result<bool> {
    let on = match env.pick(flag.then(|| "true".to_string()), "AUTOEMBED_BATCH_API") {
        None => false,
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "" | "0" | "false" | "no" | "off" => false,
            _ => {
                return Err(Error::config(format!(
                    "invalid AUTOEMBED_BATCH_API {v:?}: expected true or false"
                )))
            }
        },
    };
    if !on {
        return Ok(false);
    }
    if mode == Mode::Watch {
        return Err(Error::config(
            "--batch-api (AUTOEMBED_BATCH_API) is for run-once and backfill: batch jobs take up to a day, and watch is for rows as they change; unset it for watch",
        ));
    }
    if provider.kind != ProviderKind::OpenAi {
        return Err(Error::config(format!(
            "--batch-api (AUTOEMBED_BATCH_API) works with --provider openai only (OpenAI's Batch API), not {}",
            provider.kind.name()
        )));
    }
    Ok(matches!(
        mode,
        Mode::RunOnce | Mode::Backfill | Mode::DryRun | Mode::Verify
    ))
}

/// `--chunks-table` and the sizes of its chunks, which mean nothing without it.
fn chunking(
    env: &Env,
    table: Option<String>,
    tokens: Option<String>,
    overlap: Option<String>,
) -> Result<Option<Chunking>> {
    let tokens = parse_num(
        env.pick(tokens, "AUTOEMBED_CHUNK_TOKENS"),
        "--chunk-tokens",
        "AUTOEMBED_CHUNK_TOKENS",
        16,
        crate::tokens::MAX_INPUT_TOKENS as u64,
    )?
    .map(|n| n as usize);
    let overlap = parse_num(
        env.pick(overlap, "AUTOEMBED_CHUNK_OVERLAP"),
        "--chunk-overlap",
        "AUTOEMBED_CHUNK_OVERLAP",
        0,
        crate::tokens::MAX_INPUT_TOKENS as u64,
    )?
    .map(|n| n as usize);
    let Some(table) = env
        .pick(table, "AUTOEMBED_CHUNKS_TABLE")
        .filter(|t| !t.trim().is_empty())
    else {
        if tokens.is_some() || overlap.is_some() {
            return Err(Error::config(
                "--chunk-tokens and --chunk-overlap (AUTOEMBED_CHUNK_TOKENS, AUTOEMBED_CHUNK_OVERLAP) size the chunks of --chunks-table (AUTOEMBED_CHUNKS_TABLE): set it too",
            ));
        }
        return Ok(None);
    };
    let overlap = overlap.unwrap_or(DEFAULT_CHUNK_OVERLAP);
    if overlap >= tokens.unwrap_or(DEFAULT_CHUNK_TOKENS) {
        return Err(Error::config(format!(
            "--chunk-overlap (AUTOEMBED_CHUNK_OVERLAP) {overlap} must be less than --chunk-tokens (AUTOEMBED_CHUNK_TOKENS, {})",
            tokens.unwrap_or(DEFAULT_CHUNK_TOKENS)
        )));
    }
    Ok(Some(Chunking {
        table,
        tokens,
        overlap,
    }))
}
