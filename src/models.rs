//! The models and providers autoembed knows without asking anyone: their
//! names, sizes, prices and how they count tokens. A leaf: everything that
//! needs to know a model (configuration, token counting, providers, checks)
//! looks here, and this module looks nowhere.

pub const DEFAULT_MODEL: &str = "text-embedding-3-small";
/// The model `--provider local` runs unless `--model` names another.
pub const DEFAULT_LOCAL_MODEL: &str = "all-MiniLM-L6-v2";

/// Which API dialect and defaults to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    OpenRouter,
    Compatible,
    /// Azure OpenAI: a deployment of a resource, `api-key` header.
    Azure,
    /// The built-in model, in this process (feature `local`).
    Local,
}

impl ProviderKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "openai" => Some(Self::OpenAi),
            "openrouter" => Some(Self::OpenRouter),
            "openai-compatible" | "compatible" => Some(Self::Compatible),
            "azure" | "azure-openai" => Some(Self::Azure),
            "local" => Some(Self::Local),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::OpenRouter => "openrouter",
            Self::Compatible => "openai-compatible",
            Self::Azure => "azure",
            Self::Local => "local",
        }
    }

    pub fn default_base(self) -> Option<&'static str> {
        match self {
            Self::OpenAi => Some("https://api.openai.com/v1"),
            Self::OpenRouter => Some("https://openrouter.ai/api/v1"),
            Self::Compatible | Self::Azure | Self::Local => None,
        }
    }

    /// The provider-specific variable that holds the key, after `AUTOEMBED_API_KEY`.
    pub fn key_var(self) -> Option<&'static str> {
        match self {
            Self::OpenAi => Some("OPENAI_API_KEY"),
            Self::OpenRouter => Some("OPENROUTER_API_KEY"),
            Self::Azure => Some("AZURE_OPENAI_API_KEY"),
            Self::Compatible | Self::Local => None,
        }
    }

    /// The model name as this provider expects it on the wire.
    pub fn wire_model(self, model: &str) -> String {
        match self {
            Self::OpenRouter if !model.contains('/') => format!("openai/{model}"),
            Self::OpenAi => model.strip_prefix("openai/").unwrap_or(model).to_string(),
            _ => model.to_string(),
        }
    }
}

/// How the local model's dense layers compute (`--local-precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// The model's own weights: the vectors sentence-transformers gives.
    #[default]
    Fp32,
    /// Weights quantised per channel at load, activations per token: faster,
    /// within cosine 0.99 of fp32.
    Int8,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Some(Self::Fp32),
            "int8" => Some(Self::Int8),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Int8 => "int8",
        }
    }
}

/// What autoembed knows about a model without asking the API.
#[derive(Debug, Clone, Copy)]
pub struct ModelInfo {
    pub name: &'static str,
    pub dimensions: u32,
    pub accepts_dimensions: bool,
    pub usd_per_million_tokens: f64,
    /// Counted with OpenAI's `cl100k_base` encoding.
    pub cl100k: bool,
}

const MODELS: &[ModelInfo] = &[
    ModelInfo {
        name: "text-embedding-3-small",
        dimensions: 1536,
        accepts_dimensions: true,
        usd_per_million_tokens: 0.02,
        cl100k: true,
    },
    ModelInfo {
        name: "text-embedding-3-large",
        dimensions: 3072,
        accepts_dimensions: true,
        usd_per_million_tokens: 0.13,
        cl100k: true,
    },
    ModelInfo {
        name: "text-embedding-ada-002",
        dimensions: 1536,
        accepts_dimensions: false,
        usd_per_million_tokens: 0.10,
        cl100k: true,
    },
    ModelInfo {
        name: DEFAULT_LOCAL_MODEL,
        dimensions: 384,
        accepts_dimensions: false,
        usd_per_million_tokens: 0.0,
        cl100k: false,
    },
];

/// The known model `name` refers to, with or without the `openai/` prefix.
pub fn known_model(name: &str) -> Option<&'static ModelInfo> {
    let bare = name.strip_prefix("openai/").unwrap_or(name);
    MODELS.iter().find(|m| m.name == bare)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_model_names_follow_the_provider() {
        assert_eq!(
            ProviderKind::OpenRouter.wire_model("text-embedding-3-small"),
            "openai/text-embedding-3-small"
        );
        assert_eq!(
            ProviderKind::OpenAi.wire_model("openai/text-embedding-3-small"),
            "text-embedding-3-small"
        );
        assert_eq!(
            ProviderKind::Compatible.wire_model("nomic-embed-text"),
            "nomic-embed-text"
        );
    }
}
