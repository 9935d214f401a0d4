//! Building one SQL statement together with its parameters, so that the
//! placeholder numbers and the parameter list can never disagree, and the
//! expressions every statement shares (a text's hash, the blank-text rule)
//! are written once.

use postgres::types::{ToSql, Type};
use postgres::{Error, GenericClient, Row};

/// Quote an identifier the way `quote_ident` does, always.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// At most `max` bytes of `name`, cut on a character boundary: a name built
/// from the user's names must fit PostgreSQL's 63 bytes.
pub fn cut(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Quote a string as an SQL literal (for DDL, where parameters cannot go).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quote a function or `DO` body with a dollar tag that does not occur in
/// it (`$autoembed$`, else `$autoembed_1$`, ...), so that no name inside
/// can end it early.
pub fn dollar_quote(body: &str) -> String {
    let mut tag = "$autoembed$".to_string();
    let mut n = 0;
    while body.contains(&tag) {
        n += 1;
        tag = format!("$autoembed_{n}$");
    }
    format!("{tag}{body}{tag}")
}

/// A statement's parameters, numbered in the order they are bound. Errors
/// are the driver's own, so that callers can tell a retryable one.
#[derive(Default)]
pub struct Params<'a> {
    values: Vec<(Value<'a>, Type)>,
}

/// A bound value: borrowed from the caller, or kept by the statement.
enum Value<'a> {
    Borrowed(&'a (dyn ToSql + Sync)),
    Owned(Box<dyn ToSql + Sync + 'a>),
}

impl<'a> Params<'a> {
    /// Bind `value` as `ty`; returns its placeholder (`$1`, `$2`, ...).
    pub fn bind(&mut self, value: &'a (dyn ToSql + Sync), ty: Type) -> String {
        self.values.push((Value::Borrowed(value), ty));
        format!("${}", self.values.len())
    }

    /// Bind a value computed for this statement alone.
    pub fn bind_owned(&mut self, value: impl ToSql + Sync + 'a, ty: Type) -> String {
        self.values.push((Value::Owned(Box::new(value)), ty));
        format!("${}", self.values.len())
    }

    /// `now()` plus `d`, `d` bound (in milliseconds).
    pub fn bind_later(&mut self, d: std::time::Duration) -> String {
        let ms = d.as_millis().min(i64::MAX as u128) as i64;
        format!(
            "now() + {} * interval '1 millisecond'",
            self.bind_owned(ms, Type::INT8)
        )
    }

    fn typed(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        self.values
            .iter()
            .map(|(v, ty)| {
                let v: &(dyn ToSql + Sync) = match v {
                    Value::Borrowed(v) => *v,
                    Value::Owned(v) => v.as_ref(),
                };
                (v, ty.clone())
            })
            .collect()
    }

    pub fn query(&self, c: &mut impl GenericClient, sql: &str) -> Result<Vec<Row>, Error> {
        c.query_typed(sql, &self.typed())
    }

    pub fn execute(&self, c: &mut impl GenericClient, sql: &str) -> Result<u64, Error> {
        c.execute_typed(sql, &self.typed())
    }
}

/// When this statement's backend started: with `pg_backend_pid()`, what
/// names the backend (a pid alone may be reused).
pub const BACKEND_START: &str =
    "(SELECT a.backend_start FROM pg_stat_get_activity(pg_backend_pid()) a)";

/// Whether the backend `pid`, started at `start`, is gone. A backend of
/// another role shows no `backend_start` (it counts as alive); a pid reused
/// by a new backend has another `backend_start` (the old one is gone).
pub fn backend_gone(pid: &str, start: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM pg_stat_get_activity({pid}) a \
         WHERE a.backend_start IS NULL OR a.backend_start = {start})"
    )
}

/// The 64-bit hash of a text column as the write compares it: of its bytes
/// (the `C` collation), so that two texts that differ only in case hash
/// differently even under a nondeterministic collation.
pub fn text_hash(text: &str) -> String {
    format!("hashtextextended({text}::text COLLATE \"C\", 0)")
}

/// A text that is sent: not NULL, and not blank (empty or only ASCII
/// whitespace: the API rejects empty input, and a vector of nothing means
/// nothing). Matched on the bytes (the `C` collation): a nondeterministic
/// collation refuses regular expressions. The one place this rule is
/// written; setup's index repeats it in its predicate, so that blank rows
/// are not in the index at all.
pub fn has_text(text: &str) -> String {
    format!("coalesce({text}::text COLLATE \"C\" ~ '[^ \\t\\n\\r\\f\\v]', false)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_order_of_binding() {
        let (a, b) = (1i32, "x");
        let mut p = Params::default();
        assert_eq!(p.bind(&a, Type::INT4), "$1");
        assert_eq!(p.bind(&b, Type::TEXT), "$2");
        assert_eq!(p.values.len(), 2);
    }

    #[test]
    fn identifiers_and_literals_are_quoted_never_pasted() {
        assert_eq!(quote_ident(r#"My "Shop""#), r#""My ""Shop""""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(dollar_quote(" x "), "$autoembed$ x $autoembed$");
        assert_eq!(
            dollar_quote(" \"a$autoembed$b\" "),
            "$autoembed_1$ \"a$autoembed$b\" $autoembed_1$"
        );
        assert_eq!(
            text_hash("t.\"x\""),
            "hashtextextended(t.\"x\"::text COLLATE \"C\", 0)"
        );
    }
}
