//! `--text-template`: a row's text built from several columns, such as
//! `{name} by {brand}\n\n{description}`. Parsed here, without I/O, into
//! literal pieces and column names; the database renders it (`db::target`
//! builds the SQL expression from quoted names and literals), so that the
//! hash, the compare-and-set and dry-run's tokens see exactly what is sent.

use std::fmt;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(String),
    /// A column name, exactly as the catalog stores it.
    Column(String),
}

/// A parsed template: at least one column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Template {
    /// Parse `{column}` placeholders; `{{` and `}}` are literal braces, and
    /// `\n`, `\t` in the text are a line break and a tab (a template is
    /// usually given on one command line or one `.env` line).
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(TemplateError(format!(
                                    "unclosed {{ before {name:?} (write {{{{ for a literal brace)"
                                )))
                            }
                        }
                    }
                    if name.is_empty() {
                        return Err(TemplateError("an empty {} names no column".into()));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Column(name));
                }
                '}' => {
                    return Err(TemplateError(
                        "a } that closes nothing (write }} for a literal brace)".into(),
                    ))
                }
                '\\' if chars.peek() == Some(&'n') => {
                    chars.next();
                    literal.push('\n');
                }
                '\\' if chars.peek() == Some(&'t') => {
                    chars.next();
                    literal.push('\t');
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Column(_))) {
            return Err(TemplateError(
                "names no column: write columns as {name}".into(),
            ));
        }
        Ok(Template { pieces })
    }

    /// The columns the template reads, each once, in order of appearance.
    pub fn columns(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in &self.pieces {
            if let Piece::Column(c) = p {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(s: &str) -> Piece {
        Piece::Column(s.into())
    }
    fn lit(s: &str) -> Piece {
        Piece::Literal(s.into())
    }

    #[test]
    fn placeholders_literals_and_escaped_braces() {
        let t = Template::parse(r"{name} by {brand}\n\n{description} {{x}} {name}").unwrap();
        assert_eq!(
            t.pieces,
            vec![
                col("name"),
                lit(" by "),
                col("brand"),
                lit("\n\n"),
                col("description"),
                lit(" {x} "),
                col("name"),
            ]
        );
        assert_eq!(t.columns(), vec!["name", "brand", "description"]);
        assert_eq!(
            Template::parse("{My Col}").unwrap().pieces,
            vec![col("My Col")]
        );
    }

    #[test]
    fn malformed_templates_say_what_is_wrong() {
        for (bad, says) in [
            ("{name", "unclosed {"),
            ("name}", "closes nothing"),
            ("{}", "empty {}"),
            ("no columns", "names no column"),
            ("{{name}}", "names no column"),
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.0.contains(says), "{bad}: {e}");
        }
    }
}
