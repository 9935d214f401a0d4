//! Turns the parsed command line, the environment, a `.env` file and the
//! defaults into one validated [`Config`], without touching the network.
//!
//! Precedence is flag, then process environment, then `.env`, then default.
//! Every error names the flag and the variable to fix, and never echoes a
//! secret (the database URL and the API key are not quoted back).

use crate::cli::{self, Cli};
use crate::error::{Error, Result};
use crate::models::{self, ProviderKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Which subcommand runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    RunOnce,
    Backfill,
    DryRun,
    Verify,
    Setup,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::RunOnce => "run-once",
            Mode::Backfill => "backfill",
            Mode::DryRun => "dry-run",
            Mode::Verify => "verify",
            Mode::Setup => "setup",
        }
    }
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub database: postgres::Config,
    /// `sslmode` and `sslrootcert`, which autoembed enforces itself.
    pub tls: crate::tls::Settings,
    pub table: String,
    pub id_column: Option<String>,
    pub text_column: String,
    /// `--text-template`: the text built from several columns, instead of `text_column`.
    pub text_template: Option<crate::template::Template>,
    pub embedding_column: String,
    pub state_schema: String,
    pub provider: ProviderConfig,
    pub budget: Budget,
    pub retry_failed: bool,
    /// `backfill --reembed`.
    pub reembed: Option<Reembed>,
    pub offline: bool,
    pub on_too_long: TooLong,
    pub setup: Setup,
    /// Batches in flight at once, each with its own connection.
    pub concurrency: usize,
    /// How long a claim holds its rows without being confirmed
    /// (`--claim-lease`); what frees the rows of a killed run behind a pooler.
    pub claim_lease: Duration,
    pub json: bool,
    pub verbosity: i8,
}

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
}

/// How to reach the embeddings API.
#[derive(Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub api_base: String,
    pub api_key: Option<String>,
    /// The variable the key came from (or would come from), for messages.
    pub key_var: &'static str,
    /// Read the key from this Supabase Vault secret once connected.
    pub vault_secret: Option<String>,
    /// The model as the user named it.
    pub model: String,
    /// Where the local model is (`--provider local` only).
    pub model_path: Option<std::path::PathBuf>,
    pub dimensions: Option<u32>,
    /// `--price-per-million`, overriding the built-in price.
    pub price_per_million: Option<f64>,
    pub request_timeout: Duration,
    /// `--provider azure`: the `api-version` query parameter.
    pub api_version: Option<String>,
    /// `--request-extra`: fields merged into every request body.
    pub request_extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ProviderConfig {
    /// The dimensions the configured model will return, when known without a call.
    pub fn expected_dimensions(&self) -> Option<u32> {
        self.dimensions
            .or_else(|| models::known_model(&self.model).map(|m| m.dimensions))
    }

    /// USD per 1M tokens: the override, else the built-in price of a known model.
    pub fn price(&self) -> Option<f64> {
        self.price_per_million
            .or_else(|| models::known_model(&self.model).map(|m| m.usd_per_million_tokens))
    }
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("kind", &self.kind)
            .field("api_base", &self.api_base)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("key_var", &self.key_var)
            .field("vault_secret", &self.vault_secret)
            .field("model", &self.model)
            .field("model_path", &self.model_path)
            .field("dimensions", &self.dimensions)
            .field("price_per_million", &self.price_per_million)
            .field("request_timeout", &self.request_timeout)
            .field("api_version", &self.api_version)
            .field("request_extra", &self.request_extra)
            .finish()
    }
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
        let mut reembed = None;
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
            cli::Command::Verify(a) => (
                Mode::Verify,
                a.common,
                cli::Budget::default(),
                a.output,
                false,
                a.offline,
            ),
            cli::Command::Setup(a) => {
                setup = Setup {
                    print_sql: a.print_sql,
                    uninstall: a.uninstall,
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

        let provider = provider_config(env, &c)?;
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
        let state_schema = env
            .pick(c.state_schema, "AUTOEMBED_STATE_SCHEMA")
            .unwrap_or_else(|| "autoembed".into());

        let backfill = mode == Mode::Backfill;
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
            database,
            tls,
            table,
            id_column,
            text_column,
            text_template,
            embedding_column,
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

pub fn describe_database(cfg: &postgres::Config) -> String {
    use postgres::config::Host;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{}:{}/{}",
        cfg.get_user().unwrap_or("?"),
        host,
        port,
        cfg.get_dbname().unwrap_or("?")
    )
}

fn database(env: &Env, flag: Option<String>) -> Result<(postgres::Config, crate::tls::Settings)> {
    if let Some(url) = env.pick(flag, "DATABASE_URL") {
        // Mask the password before anything can quote it, even if parsing fails.
        crate::output::set_secrets(passwords_in_url(&url));
        let (tls, url) = crate::tls::split(&url, |v| env.get(v))?;
        let cfg = postgres::Config::from_str(&url).map_err(|e| {
            Error::config(format!(
                "invalid --database-url (DATABASE_URL): {}",
                crate::error::describe_pg(&e)
            ))
        })?;
        if cfg.get_hosts().is_empty() {
            return Err(Error::config(
                "invalid --database-url (DATABASE_URL): it names no host",
            ));
        }
        return Ok((cfg, tls));
    }
    let Some(host) = env.get("SUPABASE_HOST") else {
        return Err(Error::config(
            "no database given: set --database-url or DATABASE_URL \
             (or SUPABASE_HOST, SUPABASE_USER, SUPABASE_PASSWORD, SUPABASE_DATABASE)",
        ));
    };
    // The TLS settings come from PGSSLMODE and PGSSLROOTCERT here.
    let (tls, rest) = crate::tls::split("", |v| env.get(v))?;
    let mut cfg = postgres::Config::from_str(&rest).map_err(|e| {
        Error::config(format!(
            "invalid PGSSLMODE: {}",
            crate::error::describe_pg(&e)
        ))
    })?;
    cfg.host(&host);
    let port = parse_num(
        env.get("SUPABASE_PORT"),
        "SUPABASE_PORT",
        "SUPABASE_PORT",
        1,
        65535,
    )?;
    cfg.port(port.unwrap_or(5432) as u16);
    cfg.dbname(
        env.get("SUPABASE_DATABASE")
            .as_deref()
            .unwrap_or("postgres"),
    );
    cfg.user(env.get("SUPABASE_USER").as_deref().unwrap_or("postgres"));
    if let Some(pw) = env.get("SUPABASE_PASSWORD") {
        crate::output::set_secrets([pw.clone()]);
        cfg.password(pw);
    }
    Ok((cfg, tls))
}

/// Every candidate password in a connection string (URL userinfo, raw and
/// percent-decoded, or a `password=` key), so they can be masked early.
fn passwords_in_url(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(rest) = url.split_once("://").map(|(_, r)| r) {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if let Some((_, pw)) = userinfo.split_once(':') {
                out.push(pw.to_string());
                out.push(crate::tls::percent_decode(pw));
            }
        }
    }
    for part in url.split(['?', '&', ' ']) {
        if let Some(pw) = part.strip_prefix("password=") {
            out.push(pw.trim_matches('\'').to_string());
            out.push(crate::tls::percent_decode(pw));
        }
    }
    out
}

fn provider_config(env: &Env, c: &cli::Common) -> Result<ProviderConfig> {
    let kind = match env.pick(c.provider.clone(), "AUTOEMBED_PROVIDER") {
        Some(name) => ProviderKind::parse(&name).ok_or_else(|| {
            Error::config(format!(
                "invalid --provider (AUTOEMBED_PROVIDER) {name:?}: expected openai, openrouter, azure, openai-compatible or local"
            ))
        })?,
        None if env.get("OPENROUTER_API_KEY").is_some() => ProviderKind::OpenRouter,
        None => ProviderKind::OpenAi,
    };
    if kind == ProviderKind::Local && !cfg!(feature = "local") {
        return Err(Error::config(
            "--provider local (AUTOEMBED_PROVIDER): this autoembed was built without the local model; \
             build it with the default features (cargo install without --no-default-features)",
        ));
    }
    let api_base = match env.pick(c.api_base.clone(), "AUTOEMBED_API_BASE") {
        None if kind == ProviderKind::Local => String::from("http://localhost"),
        None if kind == ProviderKind::Azure => env.get("AZURE_OPENAI_ENDPOINT").ok_or_else(|| {
            Error::config(
                "--provider azure needs --api-base (AUTOEMBED_API_BASE, or AZURE_OPENAI_ENDPOINT): the resource URL, https://RESOURCE.openai.azure.com",
            )
        })?,
        Some(base) => base,
        None => kind.default_base().map(str::to_string).ok_or_else(|| {
            Error::config(
                "--provider openai-compatible needs --api-base (AUTOEMBED_API_BASE), e.g. http://localhost:11434/v1",
            )
        })?,
    };
    if !(api_base.starts_with("http://") || api_base.starts_with("https://")) {
        return Err(Error::config(
            "invalid --api-base (AUTOEMBED_API_BASE): expected an http:// or https:// URL",
        ));
    }
    let api_base = api_base.trim_end_matches('/').to_string();

    let vault_secret = env.pick(
        c.api_key_vault_secret.clone(),
        "AUTOEMBED_API_KEY_VAULT_SECRET",
    );
    let (api_key, key_var) = match env.get("AUTOEMBED_API_KEY") {
        _ if vault_secret.is_some() => (None, "AUTOEMBED_API_KEY_VAULT_SECRET"),
        Some(k) => (Some(k), "AUTOEMBED_API_KEY"),
        None => match kind.key_var() {
            Some(var) => (env.get(var), var),
            None => (None, "AUTOEMBED_API_KEY"),
        },
    };
    if let Some(k) = &api_key {
        crate::output::set_secrets([k.clone()]);
    }

    let model = env
        .pick(c.model.clone(), "AUTOEMBED_MODEL")
        .unwrap_or_else(|| match kind {
            ProviderKind::Local => models::DEFAULT_LOCAL_MODEL.into(),
            _ => models::DEFAULT_MODEL.into(),
        });
    let model_path = match env.pick(c.model_path.clone(), "AUTOEMBED_MODEL_PATH") {
        _ if kind != ProviderKind::Local => None,
        Some(p) => Some(std::path::PathBuf::from(p)),
        None => Some(default_model_path(env).ok_or_else(|| {
            Error::config(
                "--provider local needs --model-path (AUTOEMBED_MODEL_PATH): neither XDG_DATA_HOME nor HOME is set",
            )
        })?),
    };
    let dimensions = parse_num(
        env.pick(c.dimensions.clone(), "AUTOEMBED_DIMENSIONS"),
        "--dimensions",
        "AUTOEMBED_DIMENSIONS",
        1,
        16000,
    )?
    .map(|d| d as u32);
    if dimensions.is_some() && kind == ProviderKind::Local {
        return Err(Error::config(
            "--dimensions (AUTOEMBED_DIMENSIONS) is not accepted by --provider local; unset it",
        ));
    }
    if let (Some(_), Some(info)) = (dimensions, models::known_model(&model)) {
        if !info.accepts_dimensions {
            return Err(Error::config(format!(
                "--dimensions (AUTOEMBED_DIMENSIONS) is not accepted by {}; unset it",
                info.name
            )));
        }
    }
    let price_per_million = parse_usd(
        env.pick(c.price_per_million.clone(), "AUTOEMBED_PRICE_PER_MILLION"),
        "--price-per-million",
        "AUTOEMBED_PRICE_PER_MILLION",
    )?;
    let request_timeout = parse_num(
        env.pick(c.request_timeout.clone(), "AUTOEMBED_REQUEST_TIMEOUT"),
        "--request-timeout",
        "AUTOEMBED_REQUEST_TIMEOUT",
        1,
        3600,
    )?
    .unwrap_or(60);
    let api_version = match env
        .pick(c.api_version.clone(), "AUTOEMBED_API_VERSION")
        .or_else(|| env.get("OPENAI_API_VERSION"))
    {
        _ if kind != ProviderKind::Azure => None,
        Some(v) if v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => Some(v),
        Some(v) => {
            return Err(Error::config(format!(
                "invalid --api-version (AUTOEMBED_API_VERSION) {v:?}: expected a version such as 2024-10-21"
            )))
        }
        None => Some(AZURE_API_VERSION.to_string()),
    };
    let request_extra = env
        .pick(c.request_extra.clone(), "AUTOEMBED_REQUEST_EXTRA")
        .map(|json| request_extra(&json))
        .transpose()?;
    Ok(ProviderConfig {
        kind,
        api_base,
        api_key,
        key_var,
        vault_secret,
        model,
        model_path,
        dimensions,
        price_per_million,
        request_timeout: Duration::from_secs(request_timeout),
        api_version,
        request_extra,
    })
}

/// The Azure OpenAI `api-version` used when none is set (the GA version
/// that takes `dimensions` and `encoding_format`).
const AZURE_API_VERSION: &str = "2024-10-21";

/// `--request-extra`: a JSON object whose fields are merged into every
/// request body; it may not replace what autoembed itself sends and reads.
fn request_extra(json: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
    let flag = "--request-extra (AUTOEMBED_REQUEST_EXTRA)";
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Error::Config(format!("{flag} is not JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(Error::Config(format!(
            "{flag} must be a JSON object, such as {{\"input_type\":\"document\"}}"
        )));
    };
    for key in ["input", "model", "encoding_format", "dimensions"] {
        if map.contains_key(key) {
            return Err(Error::Config(format!(
                "{flag} may not set {key:?}: autoembed sends it (use --model, --dimensions)"
            )));
        }
    }
    Ok(map)
}

/// Where `scripts/fetch-model.sh` puts the model:
/// `$XDG_DATA_HOME/autoembed/models/all-MiniLM-L6-v2`, by default under `~/.local/share`.
fn default_model_path(env: &Env) -> Option<std::path::PathBuf> {
    let data = match env.get("XDG_DATA_HOME").filter(|d| d.starts_with('/')) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from(env.get("HOME")?).join(".local/share"),
    };
    Some(
        data.join("autoembed/models")
            .join(models::DEFAULT_LOCAL_MODEL),
    )
}

/// A whole number in `min..=max`, or `None` when unset.
fn parse_num(
    value: Option<String>,
    flag: &str,
    var: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>> {
    let Some(v) = value else { return Ok(None) };
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(Error::config(format!(
            "invalid {flag} ({var}) {v:?}: expected a whole number from {min} to {max}"
        ))),
    }
}

/// A non-negative amount of dollars, or `None` when unset.
fn parse_usd(value: Option<String>, flag: &str, var: &str) -> Result<Option<f64>> {
    let Some(v) = value else { return Ok(None) };
    match v.trim().trim_start_matches('$').parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
        _ => Err(Error::config(format!(
            "invalid {flag} ({var}) {v:?}: expected an amount in USD such as 0.50"
        ))),
    }
}

/// A positive whole number or `unlimited`; `default` when unset.
fn parse_limit(
    value: Option<String>,
    flag: &str,
    var: &str,
    default: Option<u64>,
) -> Result<Option<u64>> {
    match value {
        None => Ok(default),
        Some(v) if v.trim().eq_ignore_ascii_case("unlimited") => Ok(None),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= 1 => Ok(Some(n)),
            _ => Err(Error::config(format!(
                "invalid {flag} ({var}) {v:?}: expected a whole number of at least 1, or unlimited"
            ))),
        },
    }
}

/// The process environment with a `.env` file behind it.
#[derive(Debug, Default)]
pub struct Env {
    dotenv: HashMap<String, String>,
}

impl Env {
    /// Load `path`, or `./.env` when it exists. A named file must exist.
    pub fn load(path: Option<&Path>) -> Result<Env> {
        let (path, required): (PathBuf, bool) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(".env"), false),
        };
        if !required && !path.exists() {
            return Ok(Env::default());
        }
        let content = std::fs::read_to_string(&path).map_err(|e| {
            Error::config(format!("cannot read --env-file {}: {e}", path.display()))
        })?;
        let iter = dotenvy::from_read_iter(content.as_bytes());
        let mut dotenv = HashMap::new();
        for item in iter {
            match item {
                Ok((k, v)) => {
                    dotenv.insert(k, v);
                }
                Err(dotenvy::Error::LineParse(line, _)) => {
                    // Name the line by number; its text may hold a secret.
                    let number = content
                        .lines()
                        .position(|l| l.trim_end() == line.trim_end() || l.contains(line.trim()))
                        .map(|i| format!(" line {}", i + 1))
                        .unwrap_or_default();
                    return Err(Error::config(format!(
                        "{}:{number} is not KEY=VALUE (fix it or name another file with --env-file)",
                        path.display()
                    )));
                }
                Err(e) => {
                    return Err(Error::config(format!(
                        "cannot read {}: {}",
                        path.display(),
                        match e {
                            dotenvy::Error::Io(io) => io.to_string(),
                            _ => "invalid content".into(),
                        }
                    )))
                }
            }
        }
        let values: Vec<String> = [
            "SUPABASE_PASSWORD",
            "AUTOEMBED_API_KEY",
            "OPENAI_API_KEY",
            "OPENROUTER_API_KEY",
        ]
        .iter()
        .filter_map(|k| dotenv.get(*k).cloned())
        .collect();
        crate::output::set_secrets(values);
        Ok(Env { dotenv })
    }

    /// The variable's value from the process environment, else from `.env`;
    /// an empty value counts as unset.
    pub fn get(&self, var: &str) -> Option<String> {
        std::env::var(var)
            .ok()
            .or_else(|| self.dotenv.get(var).cloned())
            .filter(|v| !v.is_empty())
    }

    /// The flag's value if given, else the variable's.
    fn pick(&self, flag: Option<String>, var: &str) -> Option<String> {
        flag.filter(|v| !v.is_empty()).or_else(|| self.get(var))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_passwords_in_urls_and_keyword_strings() {
        let found = passwords_in_url("postgres://u:p%40ss@h:5432/db?sslmode=disable");
        assert!(found.contains(&"p%40ss".to_string()));
        assert!(found.contains(&"p@ss".to_string()));
        let found = passwords_in_url("host=h user=u password=hunter2");
        assert!(found.contains(&"hunter2".to_string()));
    }

    #[test]
    fn limits_accept_unlimited_and_reject_zero() {
        assert_eq!(
            parse_limit(Some("unlimited".into()), "--max-rows", "V", Some(5)).ok(),
            Some(None)
        );
        assert_eq!(
            parse_limit(None, "--max-rows", "V", Some(5)).ok(),
            Some(Some(5))
        );
        let err =
            parse_limit(Some("0".into()), "--max-rows", "AUTOEMBED_MAX_ROWS", None).unwrap_err();
        assert!(err.to_string().contains("--max-rows (AUTOEMBED_MAX_ROWS)"));
    }
}
