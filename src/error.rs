//! The one error type of autoembed and the exit code each kind maps to.
//!
//! Messages are short and lowercase, and say what to fix (a flag, a variable,
//! a command). They never contain a secret: nothing here formats the database
//! URL or the API key, and `output` redacts both again before anything is
//! printed, as a second line of defence.

use std::fmt;

/// Why a run stopped before its work was done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag, a variable, `.env` or the table's shape is wrong. Exit 2; nothing
    /// was written and no API call was made.
    #[error("{0}")]
    Config(String),
    /// The database is unreachable, refused the credentials, or failed mid-run.
    /// Exit 3; batches that were committed stay.
    #[error("database: {0}")]
    Database(String),
    /// The embeddings provider refused the key or the quota is spent. Exit
    /// 3; rows of the failed request stay pending.
    #[error("provider: {0}")]
    Provider(String),
    /// The provider kept failing (server errors, timeouts, unusable replies,
    /// rate limits) past the retries: it may pass. Exit 3; rows stay
    /// pending; `watch` waits and tries again.
    #[error("provider: {0}")]
    Unavailable(String),
}

impl Error {
    pub fn config(msg: impl fmt::Display) -> Self {
        Error::Config(msg.to_string())
    }

    /// Exit code of a run that ended with this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Database(_) | Error::Provider(_) | Error::Unavailable(_) => 3,
        }
    }

    /// Whether what stopped the run may pass by itself (the provider down
    /// or rate limiting, the database connection lost or a lock held):
    /// `watch` waits and carries on; a key, a grant or a setting won't.
    pub fn may_pass(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Database(_))
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        Error::Database(describe_pg(&e))
    }
}

/// One line for a postgres error: the server's message when there is one,
/// else the client's own, without the `Display` chain's repetition.
pub fn describe_pg(e: &postgres::Error) -> String {
    use postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => {
            return "gave up waiting for a lock another session holds on the table or the state \
                    schema (a migration, a long transaction: pg_locks shows which; lock_timeout \
                    bounds the wait); autoembed held nothing meanwhile, and the next run carries on"
                .to_string()
        }
        Some(c) if *c == SqlState::QUERY_CANCELED => {
            return "a statement was cancelled (statement_timeout, or an operator); \
                    raise statement_timeout for this role if it is lower than a second"
                .to_string()
        }
        _ => {}
    }
    if let Some(db) = e.as_db_error() {
        let mut s = db.message().to_string();
        if let Some(detail) = db.detail() {
            s.push_str(" (");
            s.push_str(detail);
            s.push(')');
        }
        return s;
    }
    if e.is_closed() {
        return "the connection was closed".to_string();
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
