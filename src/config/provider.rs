//! How to reach the embeddings API: the provider, its URL, key, model and
//! the options sent with every request, resolved from flags and variables.

use super::env::{parse_num, parse_usd, Env};
use crate::cli;
use crate::error::{Error, Result};
use crate::models::{self, Precision, ProviderKind};
use std::time::Duration;

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
    /// How the local model computes (`--local-precision`).
    pub local_precision: Precision,
    pub dimensions: Option<u32>,
    /// `--price-per-million`, overriding the built-in price.
    pub price_per_million: Option<f64>,
    pub request_timeout: Duration,
    /// `--provider azure`: the `api-version` query parameter.
    pub api_version: Option<String>,
    /// `--request-extra`: fields merged into every request body.
    pub request_extra: Option<serde_json::Map<String, serde_json::Value>>,
    /// `--batch-api`: rows go as the provider's batch jobs, at its batch price.
    pub batch_api: bool,
}

impl ProviderConfig {
    /// The dimensions the configured model will return, when known without a call.
    pub fn expected_dimensions(&self) -> Option<u32> {
        self.dimensions
            .or_else(|| models::known_model(&self.model).map(|m| m.dimensions))
    }

    /// USD per 1M tokens: the override, else the built-in price of a known
    /// model; half of it for batch jobs (`--batch-api`).
    pub fn price(&self) -> Option<f64> {
        let price = self
            .price_per_million
            .or_else(|| models::known_model(&self.model).map(|m| m.usd_per_million_tokens))?;
        Some(if self.batch_api {
            price * BATCH_PRICE_RATIO
        } else {
            price
        })
    }
}

#[cfg(test)]
impl ProviderConfig {
    /// OpenAI's settings with a dummy key and an unreachable base, for unit tests.
    pub fn for_tests(kind: ProviderKind) -> ProviderConfig {
        ProviderConfig {
            kind,
            api_base: "http://127.0.0.1:9".into(),
            api_key: Some("k".into()),
            key_var: "OPENAI_API_KEY",
            vault_secret: None,
            price_per_million: None,
            model: "text-embedding-3-small".into(),
            model_path: None,
            local_precision: Precision::Fp32,
            dimensions: None,
            request_timeout: Duration::from_secs(1),
            api_version: None,
            request_extra: None,
            batch_api: false,
        }
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
            .field("local_precision", &self.local_precision)
            .field("dimensions", &self.dimensions)
            .field("price_per_million", &self.price_per_million)
            .field("request_timeout", &self.request_timeout)
            .field("api_version", &self.api_version)
            .field("request_extra", &self.request_extra)
            .field("batch_api", &self.batch_api)
            .finish()
    }
}

pub(super) fn provider_config(env: &Env, c: &cli::Common) -> Result<ProviderConfig> {
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
    let local_precision = match env.pick(c.local_precision.clone(), "AUTOEMBED_LOCAL_PRECISION") {
        None => Precision::Fp32,
        Some(p) => Precision::parse(&p).ok_or_else(|| {
            Error::config(format!(
                "invalid --local-precision (AUTOEMBED_LOCAL_PRECISION) {p:?}: expected fp32 or int8"
            ))
        })?,
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
        local_precision,
        dimensions,
        price_per_million,
        request_timeout: Duration::from_secs(request_timeout),
        api_version,
        request_extra,
        batch_api: false,
    })
}

/// What a batch job costs of the synchronous price (OpenAI's Batch API: half).
pub const BATCH_PRICE_RATIO: f64 = 0.5;

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
