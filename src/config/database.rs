//! The database to connect to: `--database-url` (`DATABASE_URL`), or one
//! built from the `SUPABASE_*` variables, with its TLS settings, and every
//! password in it, to redact.

use super::env::{parse_num, Env};
use crate::error::{Error, Result};
use std::str::FromStr;

/// `user@host:port/database` for messages: never the password.
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

pub(super) fn database(
    env: &Env,
    flag: Option<String>,
) -> Result<(postgres::Config, crate::tls::Settings)> {
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
}
