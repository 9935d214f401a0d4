//! What the plan works on: each claimed row whole, or, with a chunks table
//! (`--chunks-table`), each chunk of its text. Splitting happens here, for
//! runs and dry-runs alike, so that dry-run counts exactly the chunks and
//! tokens a run sends.
//!
//! Chunks are cut by the `text-splitter` crate on the best boundary that
//! fits (paragraphs, then lines, sentences, words), sized in the model's
//! own tokens ([`Counter::tokens`]), each repeating up to `--chunk-overlap`
//! tokens of the one before.

use crate::config::{Chunking, DEFAULT_CHUNK_TOKENS};
use crate::db::claims::Claimed;
use crate::error::{Error, Result};
use crate::tokens::Counter;
use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use text_splitter::{ChunkConfig, ChunkSizer, TextSplitter};

/// A text as the plan sees it (a row, or a chunk of one: this module):
/// its id, text and the text's hash.
pub trait PlanRow {
    fn id(&self) -> &str;
    fn text(&self) -> &str;
    fn text_hash(&self) -> i64;
    /// Whether it begins a row: a budget cuts a batch only there, so that
    /// a row is sent whole (all its chunks) or not at all.
    fn starts_row(&self) -> bool {
        true
    }
    /// Its tokens, when they were counted already (a chunk's, when it was cut).
    fn tokens(&self) -> Option<usize> {
        None
    }
}

/// One text the plan decides about: a row, or one chunk of it.
#[derive(Debug)]
pub struct Unit<'r> {
    /// The claimed row it belongs to (its index in the batch).
    pub row: usize,
    /// Its number among the row's chunks (from 0), with a chunks table.
    pub chunk: Option<u32>,
    pub text: &'r str,
    /// A chunk's tokens, counted when it was cut.
    tokens: Option<usize>,
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
    fn tokens(&self) -> Option<usize> {
        self.tokens
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
    /// Chunks of at most `tokens` tokens, repeating `overlap` of the one before.
    Chunks { tokens: usize, overlap: usize },
}

/// A chunk's size in the model's tokens, as `text-splitter` asks for it:
/// counted.
struct Tokens<'c>(&'c Counter);

impl ChunkSizer for Tokens<'_> {
    fn size(&self, chunk: &str) -> usize {
        self.0.tokens(chunk)
    }
}

/// A chunk's size from one encoding of the whole text: the tokens of that
/// encoding it overlaps. The splitter asks for the sizes of many slices,
/// about seven times the text in all, so this makes splitting several
/// times cheaper; since a slice's own encoding can differ at its two ends,
/// every chunk is counted afterwards, and a text with one over the size is
/// split again by counting ([`Tokens`]).
struct Boundaries<'t> {
    text: &'t str,
    /// Where each token of `text` ends, in bytes.
    ends: Vec<usize>,
    counter: &'t Counter,
}

impl ChunkSizer for Boundaries<'_> {
    fn size(&self, chunk: &str) -> usize {
        let start = (chunk.as_ptr() as usize).wrapping_sub(self.text.as_ptr() as usize);
        let end = start.wrapping_add(chunk.len());
        if chunk.is_empty() || end > self.text.len() || start > end {
            return self.counter.tokens(chunk);
        }
        // Tokens ending after the start and beginning before the end.
        let first = self.ends.partition_point(|&e| e <= start);
        let last = (self.ends.partition_point(|&e| e < end) + 1).min(self.ends.len());
        last.saturating_sub(first)
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
        if ChunkConfig::new(tokens).with_overlap(c.overlap).is_err() {
            return Err(Error::config(format!(
                "--chunk-overlap (AUTOEMBED_CHUNK_OVERLAP) {} must be less than the chunk size ({tokens} tokens, --chunk-tokens)",
                c.overlap
            )));
        }
        Ok(Splitter::Chunks {
            tokens,
            overlap: c.overlap,
        })
    }

    /// The units of `rows`, in order, sized by `counter`: every row gives at least one.
    pub fn units<'r>(&self, rows: &'r [Claimed], counter: &Counter) -> Vec<Unit<'r>> {
        let mut units = Vec::with_capacity(rows.len());
        for (row, claimed) in rows.iter().enumerate() {
            let &Splitter::Chunks { tokens, overlap } = self else {
                units.push(Unit {
                    row,
                    chunk: None,
                    text: &claimed.text,
                    tokens: None,
                    hash: claimed.text_hash,
                    id: Cow::Borrowed(&claimed.id),
                });
                continue;
            };
            let chunks = chunks(&claimed.text, tokens, overlap, counter);
            for (k, (text, tokens)) in chunks.into_iter().enumerate() {
                units.push(chunk(row, k as u32, text, tokens, &claimed.id));
            }
        }
        units
    }
}

/// The chunks of `text`, each with its tokens, every one within `tokens`:
/// sized from one encoding of the text when the counter gives one, else
/// (or when a chunk came out over the size) by counting every slice. Text
/// the splitter trims away entirely (only Unicode spaces) is still the
/// row's text: it goes as one chunk.
fn chunks<'t>(
    text: &'t str,
    tokens: usize,
    overlap: usize,
    counter: &Counter,
) -> Vec<(&'t str, usize)> {
    let by_boundaries = counter.token_ends(text).and_then(|ends| {
        let sizer = Boundaries {
            text,
            ends,
            counter,
        };
        let chunks = split(text, sizer, tokens, overlap, counter)?;
        chunks.iter().all(|(_, n)| *n <= tokens).then_some(chunks)
    });
    let chunks = by_boundaries
        .or_else(|| split(text, Tokens(counter), tokens, overlap, counter))
        .unwrap_or_default();
    if chunks.is_empty() {
        return vec![(text, counter.tokens(text))];
    }
    chunks
}

/// `text` split by `sizer`, each chunk with its tokens counted; `None` when
/// the sizes make no configuration (checked when the splitter was made).
fn split<'t, S: ChunkSizer>(
    text: &'t str,
    sizer: S,
    tokens: usize,
    overlap: usize,
    counter: &Counter,
) -> Option<Vec<(&'t str, usize)>> {
    let config = ChunkConfig::new(tokens)
        .with_sizer(sizer)
        .with_overlap(overlap)
        .ok()?;
    Some(
        TextSplitter::new(config)
            .chunks(text)
            .map(|c| (c, counter.tokens(c)))
            .collect(),
    )
}

fn chunk<'r>(row: usize, k: u32, text: &'r str, tokens: usize, id: &str) -> Unit<'r> {
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    Unit {
        row,
        chunk: Some(k),
        text,
        tokens: Some(tokens),
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
        let units = splitter.units(&rows, &counter);
        let of_a: Vec<&Unit> = units.iter().filter(|u| u.row == 0).collect();
        assert_eq!(of_a.len(), 3, "one chunk a paragraph");
        assert!(of_a.iter().all(|u| counter.tokens(u.text) <= 40));
        assert!(of_a
            .iter()
            .all(|u| u.tokens == Some(counter.tokens(u.text))));
        assert_eq!(of_a[0].text, para.trim());
        assert_eq!(of_a[1].id(), "1:a:1");
        assert_eq!(chunk_of(of_a[1].id()), Some((1, "a:1")));
        assert!(of_a[0].starts_row() && !of_a[1].starts_row());
        let b: Vec<&Unit> = units.iter().filter(|u| u.row == 1).collect();
        assert_eq!((b.len(), b[0].text), (1, "short text"));
    }

    #[test]
    fn sizing_from_one_encoding_cuts_where_counting_every_slice_does() {
        let counter = Counter::for_model("text-embedding-3-small", ProviderKind::OpenAi);
        let text: String = (0..200)
            .map(|i| {
                format!(
                    "Section {i}. The keepers lived in small stone cottages; ünïcödé, 跑步鞋 and \
                     emoji 👟 too.{}",
                    if i % 7 == 0 { "\n\n" } else { " " }
                )
            })
            .collect();
        let ends = counter.token_ends(&text).expect("cl100k boundaries");
        let by_boundaries = ChunkConfig::new(128)
            .with_sizer(Boundaries {
                text: &text,
                ends,
                counter: &counter,
            })
            .with_overlap(20)
            .expect("config");
        let by_counting = ChunkConfig::new(128)
            .with_sizer(Tokens(&counter))
            .with_overlap(20)
            .expect("config");
        let a: Vec<&str> = TextSplitter::new(by_boundaries).chunks(&text).collect();
        let b: Vec<&str> = TextSplitter::new(by_counting).chunks(&text).collect();
        assert!(a.len() > 10);
        assert_eq!(a, b);
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
