//! What the plan works on: each claimed row whole, or, with a chunks table
//! (`--chunks-table`), each chunk of its text. Splitting happens here, for
//! runs and dry-runs alike, so that dry-run counts exactly the chunks and
//! tokens a run sends.
//!
//! Chunks are cut by the `text-splitter` crate on the best boundary that
//! fits (paragraphs, then lines, sentences, words), sized in the model's
//! own tokens ([`Counter::tokens`]), each repeating up to `--chunk-overlap`
//! tokens of the one before.

use super::plan::PlanRow;
use crate::config::{Chunking, DEFAULT_CHUNK_TOKENS};
use crate::db::claims::Claimed;
use crate::error::{Error, Result};
use crate::tokens::Counter;
use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use text_splitter::{ChunkConfig, ChunkSizer, TextSplitter};

/// One text the plan decides about: a row, or one chunk of it.
#[derive(Debug)]
pub struct Unit<'r> {
    /// The claimed row it belongs to (its index in the batch).
    pub row: usize,
    /// Its number among the row's chunks (from 0), with a chunks table.
    pub chunk: Option<u32>,
    pub text: &'r str,
    hash: i64,
    /// The row's id, or for a chunk `<number>:<row id>` ([`chunk_of`]).
    id: Cow<'r, str>,
}

impl PlanRow for Unit<'_> {
    fn id(&self) -> &str {
        &self.id
    }
    fn text(&self) -> &str {
        self.text
    }
    fn text_hash(&self) -> i64 {
        self.hash
    }
    fn starts_row(&self) -> bool {
        self.chunk.unwrap_or(0) == 0
    }
}

/// The chunk a unit id names: its number and its row's id.
pub fn chunk_of(unit_id: &str) -> Option<(i32, &str)> {
    let (k, id) = unit_id.split_once(':')?;
    Some((k.parse().ok()?, id))
}

/// How claimed rows become units.
pub enum Splitter {
    /// One unit a row: its whole text.
    Whole,
    /// Chunks of at most `tokens` tokens.
    Chunks(TextSplitter<Tokens>),
}

/// A chunk's size in the model's tokens, as `text-splitter` asks for it.
pub struct Tokens(Counter);

impl ChunkSizer for Tokens {
    fn size(&self, chunk: &str) -> usize {
        self.0.tokens(chunk)
    }
}

impl Splitter {
    /// The splitter `chunking` asks for; a chunk size over the model's
    /// limit is refused (it would be cut when sent).
    pub fn new(chunking: Option<&Chunking>, counter: &Counter) -> Result<Splitter> {
        let Some(c) = chunking else {
            return Ok(Splitter::Whole);
        };
        let limit = counter.max_input();
        let tokens = match (c.tokens, limit) {
            (Some(n), Some(max)) if n > max => {
                return Err(Error::config(format!(
                    "--chunk-tokens (AUTOEMBED_CHUNK_TOKENS) {n} is more than the model takes ({max} tokens): set at most {max}"
                )))
            }
            (Some(n), _) => n,
            (None, Some(max)) => DEFAULT_CHUNK_TOKENS.min(max),
            (None, None) => DEFAULT_CHUNK_TOKENS,
        };
        let config = ChunkConfig::new(tokens)
            .with_sizer(Tokens(counter.clone()))
            .with_overlap(c.overlap)
            .map_err(|_| {
                Error::config(format!(
                    "--chunk-overlap (AUTOEMBED_CHUNK_OVERLAP) {} must be less than the chunk size ({tokens} tokens, --chunk-tokens)",
                    c.overlap
                ))
            })?;
        Ok(Splitter::Chunks(TextSplitter::new(config)))
    }

    /// The units of `rows`, in order: every row gives at least one.
    pub fn units<'r>(&self, rows: &'r [Claimed]) -> Vec<Unit<'r>> {
        let mut units = Vec::with_capacity(rows.len());
        for (row, claimed) in rows.iter().enumerate() {
            let Splitter::Chunks(splitter) = self else {
                units.push(Unit {
                    row,
                    chunk: None,
                    text: &claimed.text,
                    hash: claimed.text_hash,
                    id: Cow::Borrowed(&claimed.id),
                });
                continue;
            };
            let first = units.len();
            for (k, text) in splitter.chunks(&claimed.text).enumerate() {
                units.push(chunk(row, k as u32, text, &claimed.id));
            }
            // Text the splitter trims away entirely (only Unicode spaces)
            // is still the row's text: it goes as one chunk.
            if units.len() == first {
                units.push(chunk(row, 0, &claimed.text, &claimed.id));
            }
        }
        units
    }
}

fn chunk<'r>(row: usize, k: u32, text: &'r str, id: &str) -> Unit<'r> {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    Unit {
        row,
        chunk: Some(k),
        text,
        hash: h.finish() as i64,
        id: Cow::Owned(format!("{k}:{id}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ProviderKind;

    fn claimed(id: &str, text: &str) -> Claimed {
        Claimed {
            id: id.into(),
            text: text.into(),
            text_hash: 7,
        }
    }

    #[test]
    fn long_texts_split_on_paragraphs_within_the_size_and_short_ones_stay_whole() {
        let counter = Counter::for_model("text-embedding-3-small", ProviderKind::OpenAi);
        let chunking = Chunking {
            table: "chunks".into(),
            tokens: Some(40),
            overlap: 0,
        };
        let splitter = Splitter::new(Some(&chunking), &counter).expect("splitter");
        let para = "The quick brown fox jumps over the lazy dog again and again. ".repeat(3);
        let doc = format!("{para}\n\n{para}\n\n{para}");
        let rows = [claimed("a:1", &doc), claimed("b", "short text")];
        let units = splitter.units(&rows);
        let of_a: Vec<&Unit> = units.iter().filter(|u| u.row == 0).collect();
        assert_eq!(of_a.len(), 3, "one chunk a paragraph");
        assert!(of_a.iter().all(|u| counter.tokens(u.text) <= 40));
        assert_eq!(of_a[0].text, para.trim());
        assert_eq!(of_a[1].id(), "1:a:1");
        assert_eq!(chunk_of(of_a[1].id()), Some((1, "a:1")));
        assert!(of_a[0].starts_row() && !of_a[1].starts_row());
        let b: Vec<&Unit> = units.iter().filter(|u| u.row == 1).collect();
        assert_eq!((b.len(), b[0].text), (1, "short text"));
    }

    #[test]
    fn a_chunk_size_over_the_model_limit_or_an_overlap_as_large_is_refused() {
        let counter = Counter::for_model("text-embedding-3-small", ProviderKind::OpenAi);
        let mut chunking = Chunking {
            table: "chunks".into(),
            tokens: Some(9000),
            overlap: 0,
        };
        let err = Splitter::new(Some(&chunking), &counter)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("--chunk-tokens") && e.contains("8192")));
        chunking.tokens = Some(100);
        chunking.overlap = 100;
        let err = Splitter::new(Some(&chunking), &counter)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("--chunk-overlap")));
    }
}
