//! TLS to the database, with `sslmode` as libpq users know it.
//!
//! rust-postgres understands only `disable`, `prefer` and `require`, and
//! leaves checking the certificate to the connector. This module reads
//! `sslmode` and `sslrootcert` itself (from the connection string, else
//! `PGSSLMODE` / `PGSSLROOTCERT`), hands rust-postgres a string it accepts,
//! and builds a rustls connector that checks what the mode promises:
//!
//! | sslmode | encrypted | certificate checked against sslrootcert | host name checked |
//! |---|---|---|---|
//! | disable | no | | |
//! | prefer (default) | if the server offers it | no | no |
//! | require | yes | only if sslrootcert is given (as libpq does) | no |
//! | verify-ca | yes | yes | no |
//! | verify-full | yes | yes | yes |
//!
//! A failed verification is a configuration error (exit 2), never a silent
//! downgrade.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }

    /// What rust-postgres is told: it only negotiates, we verify.
    fn for_postgres(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            _ => "require",
        }
    }
}

/// The TLS settings of a connection string.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub root_cert: Option<PathBuf>,
}

/// Take `sslmode` and `sslrootcert` out of a URL or key=value connection
/// string; return the settings and the string rust-postgres can parse.
/// `env` supplies `PGSSLMODE` and `PGSSLROOTCERT` when the string has none.
pub fn split(conn: &str, env: impl Fn(&str) -> Option<String>) -> Result<(Settings, String)> {
    let mut mode = None;
    let mut root = None;
    let rest;
    if conn.contains("://") {
        let (base, query) = conn.split_once('?').unwrap_or((conn, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => mode = Some(percent_decode(v)),
                Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
                _ => kept.push(pair),
            }
        }
        rest = (base.to_string(), kept.join("&"));
    } else {
        let mut kept = Vec::new();
        for token in conn.split_whitespace() {
            match token.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.trim_matches('\'').to_string()),
                Some(("sslrootcert", v)) => root = Some(v.trim_matches('\'').to_string()),
                _ => kept.push(token),
            }
        }
        rest = (kept.join(" "), String::new());
    }
    let mode_text = mode
        .or_else(|| env("PGSSLMODE"))
        .unwrap_or_else(|| "prefer".into());
    let mode = Mode::parse(&mode_text).ok_or_else(|| {
        Error::config(format!(
            "invalid sslmode {mode_text:?} in --database-url (DATABASE_URL): expected disable, prefer, require, verify-ca or verify-full"
        ))
    })?;
    let root_cert = root.or_else(|| env("PGSSLROOTCERT")).map(PathBuf::from);
    if matches!(mode, Mode::VerifyCa | Mode::VerifyFull) && root_cert.is_none() {
        return Err(Error::config(format!(
            "sslmode={} needs sslrootcert=PATH (the CA certificate to check the server against) in --database-url (DATABASE_URL) or PGSSLROOTCERT",
            mode.name()
        )));
    }
    let (base, query) = rest;
    let sep = if conn.contains("://") {
        if query.is_empty() {
            format!("{base}?sslmode={}", mode.for_postgres())
        } else {
            format!("{base}?{query}&sslmode={}", mode.for_postgres())
        }
    } else {
        format!("{base} sslmode={}", mode.for_postgres())
    };
    Ok((Settings { mode, root_cert }, sep))
}

/// The rustls connector for these settings.
pub fn connector(settings: &Settings) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verify = match (&settings.root_cert, settings.mode) {
        (Some(path), Mode::Require | Mode::VerifyCa | Mode::VerifyFull) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::config(format!("cannot read sslrootcert {}: {e}", path.display()))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::config(format!(
                    "sslrootcert {} holds no certificate",
                    path.display()
                )));
            }
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| Error::config(format!("sslrootcert {}: {e}", path.display())))?;
            Some(inner)
        }
        _ => None,
    };
    let verifier = Verifier {
        inner: verify,
        check_name: settings.mode == Mode::VerifyFull,
        provider: provider.clone(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Checks the chain when there is a root certificate, the name only for
/// verify-full; without a root certificate (prefer, require) it only
/// encrypts, as libpq does.
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `%XX` escapes decoded, as in a URL; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_sslmode_and_sslrootcert_out_of_urls_and_keyword_strings() {
        let (s, rest) = split("postgresql://u:p@h:5432/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x", |_| None).unwrap();
        assert_eq!(
            (s.mode, s.root_cert),
            (Mode::VerifyFull, Some(PathBuf::from("/tmp/ca.pem")))
        );
        assert_eq!(
            rest,
            "postgresql://u:p@h:5432/db?application_name=x&sslmode=require"
        );
        let (s, rest) = split(
            "host=h sslmode=verify-ca sslrootcert=/ca.pem user=u",
            |_| None,
        )
        .unwrap();
        assert_eq!(s.mode, Mode::VerifyCa);
        assert_eq!(rest, "host=h user=u sslmode=require");
        let (s, _) = split("postgresql://h/db", |v| {
            (v == "PGSSLMODE").then(|| "disable".to_string())
        })
        .unwrap();
        assert_eq!(s.mode, Mode::Disable);
        let err = split("postgresql://h/db?sslmode=verify-full", |_| None).unwrap_err();
        assert!(err.to_string().contains("needs sslrootcert=PATH"));
        assert!(split("postgresql://h/db?sslmode=sometimes", |_| None).is_err());
    }
}
