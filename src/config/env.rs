//! Values from flags, the process environment and a `.env` file, and the
//! parsers that turn them into numbers, each error naming its flag and variable.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A whole number in `min..=max`, or `None` when unset.
pub(super) fn parse_num(
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
pub(super) fn parse_usd(value: Option<String>, flag: &str, var: &str) -> Result<Option<f64>> {
    let Some(v) = value else { return Ok(None) };
    match v.trim().trim_start_matches('$').parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(Some(x)),
        _ => Err(Error::config(format!(
            "invalid {flag} ({var}) {v:?}: expected an amount in USD such as 0.50"
        ))),
    }
}

/// A positive whole number or `unlimited`; `default` when unset.
pub(super) fn parse_limit(
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
    pub(super) fn pick(&self, flag: Option<String>, var: &str) -> Option<String> {
        flag.filter(|v| !v.is_empty()).or_else(|| self.get(var))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
