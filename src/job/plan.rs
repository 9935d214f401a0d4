//! The one place that decides what a run sends, shared by run-once,
//! backfill and dry-run: dry-run differs only in that it neither calls the
//! provider nor writes.
//!
//! For each claimed batch, in claim order (batches are planned one after
//! the other even when several workers claim at once, so the decisions do
//! not depend on which worker is faster):
//! - a text over the model's limit is cut, or with `--on-too-long skip`
//!   recorded as failed;
//! - a text met earlier in the batch is sent once, its vector written to
//!   every row that has it;
//! - a text an earlier batch of the run sent is not sent again: the row
//!   copies that row's vector once the earlier batch has written it;
//! - the token budget (`--max-tokens`, `--max-cost-usd`) is spent row by
//!   row: the batch is cut before the first row whose text does not fit,
//!   and the run stops there;
//! - the row budget (`--max-rows`) bounds what each claim may take.

use super::report::StopReason;
use super::units::{PlanRow, Splitter, Unit};
use crate::config::{Chunking, Config, TooLong};
use crate::db::claims::Claimed;
use crate::error::Result;
use crate::tokens::Counter;
use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Texts remembered for copying, at most: about a megabyte and a half, so
/// memory stays flat however long the backfill.
pub(crate) const EARLIER_TEXTS: usize = 20_000;

/// One text to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The row's index in the batch.
    pub row: usize,
    /// The text as sent (cut when it was too long).
    pub text: String,
    /// Its tokens, when they were counted.
    pub tokens: Option<usize>,
}

/// What to do with one batch.
#[derive(Debug, Default)]
pub struct BatchPlan {
    /// Distinct texts to send.
    pub send: Vec<Item>,
    /// For a row that is sent, the other rows of the batch with the same text.
    pub same_text: HashMap<usize, Vec<usize>>,
    /// Rows that copy the vector of a row an earlier batch sent: (row, that row's id).
    pub copy: Vec<(usize, String)>,
    /// Batches whose writes the copies wait for.
    pub wait_for: Vec<u64>,
    /// Rows not sent because their text is too long (`--on-too-long skip`), and why.
    pub too_long: Vec<(usize, String)>,
    /// Rows sent cut to the model's limit.
    pub truncated: u64,
    /// Rows from this index on are not part of the batch (a budget ran out).
    pub cut: usize,
    /// Why the run stops after this batch, when a budget cut it.
    pub stop: Option<StopReason>,
}

impl BatchPlan {
    /// Tokens of the texts to send (0 for those not counted).
    pub fn tokens(&self) -> u64 {
        self.send.iter().map(|i| i.tokens.unwrap_or(0) as u64).sum()
    }
}

/// Where the vector of a text seen earlier in the run is.
#[derive(Debug)]
enum Source {
    /// Written in this row.
    Written(Box<str>),
    /// Sent by batch `seq` for this row; there once that batch has written.
    InFlight(u64, Box<str>),
}

struct State {
    /// Rows the run may still take (`--max-rows`); `None`: no limit.
    rows_left: Option<u64>,
    /// Tokens the run may still spend, and the budget they come from.
    tokens_left: Option<(u64, StopReason)>,
    /// Set once a budget cut a batch: nothing more is taken.
    stopped: Option<StopReason>,
    /// The batch whose turn it is to be planned.
    turn: u64,
    /// Batches that have written (or given up).
    settled: HashSet<u64>,
    /// Rows planned so far, and the units (chunks) they gave.
    rows_planned: u64,
    units_planned: u64,
    earlier: HashMap<i64, Source>,
}

/// The run's plan, shared by its workers.
pub struct Planner {
    counter: Counter,
    splitter: Splitter,
    on_too_long: TooLong,
    batch_size: usize,
    /// Count every text's tokens (dry-run reports them); otherwise only
    /// when a budget needs them.
    count_always: bool,
    state: Mutex<State>,
    changed: Condvar,
}

/// What a plan is bounded by.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub batch_size: usize,
    pub on_too_long: TooLong,
    /// `--max-rows`.
    pub max_rows: Option<u64>,
    /// The tighter of `--max-tokens` and `--max-cost-usd`, in tokens.
    pub max_tokens: Option<(u64, StopReason)>,
}

/// What a run plans on: `Bounds`, and the chunks a row's text is split into.
pub struct Shape<'c> {
    pub bounds: Bounds,
    pub chunking: Option<&'c Chunking>,
}

impl Shape<'_> {
    pub fn of(cfg: &Config) -> Shape<'_> {
        Shape {
            bounds: Bounds::of(cfg),
            chunking: cfg.chunks.as_ref(),
        }
    }
}

impl Bounds {
    pub fn of(cfg: &Config) -> Bounds {
        Bounds {
            batch_size: cfg.budget.batch_size,
            on_too_long: cfg.on_too_long,
            max_rows: cfg.budget.max_rows,
            max_tokens: token_budget(cfg),
        }
    }
}

impl Planner {
    /// The plan of a run; fails on chunk sizes the model cannot take.
    pub fn new(shape: Shape<'_>, counter: Counter, count_always: bool) -> Result<Planner> {
        let Shape { bounds, chunking } = shape;
        Ok(Planner {
            splitter: Splitter::new(chunking, &counter)?,
            counter,
            on_too_long: bounds.on_too_long,
            batch_size: bounds.batch_size,
            count_always,
            state: Mutex::new(State {
                rows_left: bounds.max_rows,
                tokens_left: bounds.max_tokens,
                stopped: None,
                turn: 0,
                settled: HashSet::new(),
                rows_planned: 0,
                units_planned: 0,
                earlier: HashMap::new(),
            }),
            changed: Condvar::new(),
        })
    }

    pub fn counter(&self) -> &Counter {
        &self.counter
    }

    /// What the plan of claimed `rows` decides about: the rows, or their chunks.
    pub fn units<'r>(&self, rows: &'r [Claimed]) -> Vec<Unit<'r>> {
        self.splitter.units(rows, &self.counter)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many rows the next claim may take, or why none: a batch is
    /// about `--batch-size` inputs, so with chunks as many rows as gave that
    /// many chunks so far in the run (one row before any was split).
    pub fn claim_limit(&self) -> Result<usize, StopReason> {
        let s = self.state();
        if let Some(reason) = s.stopped {
            return Err(reason);
        }
        let batch = match (&self.splitter, s.units_planned) {
            (Splitter::Whole, _) => self.batch_size,
            (Splitter::Chunks { .. }, 0) => 1,
            (Splitter::Chunks { .. }, units) => ((self.batch_size as u64 * s.rows_planned / units)
                as usize)
                .clamp(1, self.batch_size),
        };
        match s.rows_left {
            Some(0) => Err(StopReason::MaxRows),
            Some(left) => Ok(batch.min(left as usize)),
            None => Ok(batch),
        }
    }

    /// How many rows a claim of up to `most` may take (a batch job's), or why none.
    pub fn claim_up_to(&self, most: usize) -> Result<usize, StopReason> {
        let s = self.state();
        if let Some(reason) = s.stopped {
            return Err(reason);
        }
        match s.rows_left {
            Some(0) => Err(StopReason::MaxRows),
            Some(left) => Ok(most.min(left as usize)),
            None => Ok(most),
        }
    }

    /// A claim took `n` rows (they count against `--max-rows`).
    pub fn took(&self, n: usize) {
        if let Some(left) = &mut self.state().rows_left {
            *left = left.saturating_sub(n as u64);
        }
    }

    /// `n` rows taken were not worked on after all.
    pub fn gave_back(&self, n: usize) {
        if let Some(left) = &mut self.state().rows_left {
            *left += n as u64;
        }
    }

    /// Plan batch `seq` once every earlier batch is planned.
    pub fn plan<R: PlanRow>(&self, seq: u64, rows: &[R]) -> BatchPlan {
        let mut s = self.state();
        while s.turn < seq {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let plan = self.decide(&mut s, seq, rows);
        s.turn = seq + 1;
        self.changed.notify_all();
        plan
    }

    /// Batch `seq` took nothing (or failed before planning): pass its turn.
    pub fn skip(&self, seq: u64) {
        let mut s = self.state();
        while s.turn < seq {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.turn == seq {
            s.turn = seq + 1;
        }
        s.settled.insert(seq);
        self.changed.notify_all();
    }

    /// Batch `seq` is done: the texts it sent for `written` rows are there
    /// to copy; the others are forgotten (a later batch sends them).
    pub fn settle(&self, seq: u64, written: &[&str]) {
        let written: HashSet<&str> = written.iter().copied().collect();
        let mut s = self.state();
        s.earlier.retain(|_, src| match src {
            Source::InFlight(n, row) if *n == seq => {
                if written.contains(&**row) {
                    *src = Source::Written(row.clone());
                    true
                } else {
                    false
                }
            }
            _ => true,
        });
        s.settled.insert(seq);
        self.changed.notify_all();
    }

    /// Wait until the batches `seqs` are settled.
    pub fn wait_for(&self, seqs: &[u64]) {
        let mut s = self.state();
        while !seqs.iter().all(|n| s.settled.contains(n)) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn decide<R: PlanRow>(&self, s: &mut State, seq: u64, rows: &[R]) -> BatchPlan {
        let mut plan = BatchPlan {
            cut: rows.len(),
            ..BatchPlan::default()
        };
        s.units_planned += rows.len() as u64;
        s.rows_planned += rows.iter().filter(|r| r.starts_row()).count() as u64;
        if let Some(reason) = s.stopped {
            plan.cut = 0;
            plan.stop = Some(reason);
            return plan;
        }
        // Hash of each text sent in this batch → its place in `send`.
        let mut sent_here: HashMap<i64, usize> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            let (text, cut) = match fit(row.text(), &self.counter, self.on_too_long) {
                Fit::Whole => (row.text().to_string(), false),
                Fit::Cut(cut) => (cut, true),
                Fit::TooLong { tokens, max } => {
                    plan.too_long.push((
                        i,
                        format!(
                            "too long: {tokens} tokens, the model takes {max} \
                             (--on-too-long skip; truncate would send the first {max})"
                        ),
                    ));
                    continue;
                }
            };
            // Counted only for rows that stay in the batch.
            let truncated = u64::from(cut);
            let hash = row.text_hash();
            if let Some(&k) = sent_here.get(&hash) {
                if plan.send[k].text == text {
                    plan.same_text.entry(plan.send[k].row).or_default().push(i);
                    plan.truncated += truncated;
                    continue;
                }
            }
            match s.earlier.get(&hash) {
                Some(Source::Written(from)) => {
                    plan.copy.push((i, from.to_string()));
                    plan.truncated += truncated;
                    continue;
                }
                Some(Source::InFlight(n, from)) => {
                    plan.copy.push((i, from.to_string()));
                    if !plan.wait_for.contains(n) {
                        plan.wait_for.push(*n);
                    }
                    plan.truncated += truncated;
                    continue;
                }
                None => {}
            }
            let tokens = (self.count_always || s.tokens_left.is_some()).then(|| {
                row.tokens()
                    .filter(|_| !cut)
                    .unwrap_or_else(|| self.counter.count(&text))
            });
            if let Some((left, reason)) = &mut s.tokens_left {
                let n = tokens.unwrap_or(0) as u64;
                if n > *left {
                    plan.cut = i;
                    plan.stop = Some(*reason);
                    s.stopped = Some(*reason);
                    break;
                }
                *left -= n;
            }
            sent_here.insert(hash, plan.send.len());
            if s.earlier.len() < EARLIER_TEXTS {
                s.earlier
                    .insert(hash, Source::InFlight(seq, row.id().into()));
            }
            plan.truncated += truncated;
            plan.send.push(Item {
                row: i,
                text,
                tokens,
            });
        }
        // A row is sent whole or not at all: a cut inside a row's chunks
        // moves back to its first.
        if plan.cut < rows.len() {
            while plan.cut > 0 && !rows[plan.cut].starts_row() {
                plan.cut -= 1;
            }
            let cut = plan.cut;
            plan.send.retain(|item| item.row < cut);
            plan.same_text.retain(|&i, _| i < cut);
            for same in plan.same_text.values_mut() {
                same.retain(|&j| j < cut);
            }
            plan.copy.retain(|(i, _)| *i < cut);
        }
        // Rows cut off do not count against --max-rows.
        if let Some(left) = &mut s.rows_left {
            *left += rows[plan.cut..].iter().filter(|r| r.starts_row()).count() as u64;
        }
        // Too-long rows after the cut were never part of the batch.
        let cut = plan.cut;
        plan.too_long.retain(|(i, _)| *i < cut);
        plan
    }
}

/// The budget in tokens, from `--max-tokens` and `--max-cost-usd` (whichever is tighter).
fn token_budget(cfg: &Config) -> Option<(u64, StopReason)> {
    let by_tokens = cfg.budget.max_tokens.map(|t| (t, StopReason::MaxTokens));
    let by_cost = cfg
        .budget
        .max_cost_usd
        .zip(cfg.provider.price())
        .map(|(usd, price)| {
            (
                (usd / price * 1_000_000.0).floor() as u64,
                StopReason::MaxCost,
            )
        });
    match (by_tokens, by_cost) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// What is sent for one text.
enum Fit {
    /// The text as it is.
    Whole,
    /// Its first tokens, up to the model's limit.
    Cut(String),
    /// Nothing (`--on-too-long skip`).
    TooLong { tokens: usize, max: usize },
}

/// The one rule for texts over the model's input limit.
fn fit(text: &str, counter: &Counter, on_too_long: TooLong) -> Fit {
    let Some(max) = counter.max_input() else {
        return Fit::Whole;
    };
    match (counter.over(text, max), on_too_long) {
        (None, _) => Fit::Whole,
        (Some(tokens), TooLong::Skip) => Fit::TooLong { tokens, max },
        // The local model cuts a text itself when no word boundary is left to cut at.
        (Some(_), TooLong::Truncate) => Fit::Cut(
            counter
                .truncate(text, max)
                .unwrap_or_else(|| text.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ProviderKind;

    struct Row(&'static str, String);

    impl PlanRow for Row {
        fn id(&self) -> &str {
            self.0
        }
        fn text(&self) -> &str {
            &self.1
        }
        fn text_hash(&self) -> i64 {
            // Distinct texts of these tests have distinct lengths.
            self.1.len() as i64
        }
    }

    fn rows(texts: &[(&'static str, &str)]) -> Vec<Row> {
        texts.iter().map(|(id, t)| Row(id, t.to_string())).collect()
    }

    fn planner(max_rows: Option<u64>, max_tokens: Option<u64>, on_too_long: TooLong) -> Planner {
        Planner::new(
            Shape {
                bounds: Bounds {
                    batch_size: 4,
                    on_too_long,
                    max_rows,
                    max_tokens: max_tokens.map(|t| (t, StopReason::MaxTokens)),
                },
                chunking: None,
            },
            Counter::for_model("text-embedding-3-small", ProviderKind::OpenAi),
            true,
        )
        .expect("planner")
    }

    #[test]
    fn identical_texts_are_sent_once_in_a_batch_and_copied_across_batches() {
        let p = planner(None, None, TooLong::Truncate);
        let first = rows(&[("1", "apple pie"), ("2", "plum"), ("3", "apple pie")]);
        let plan = p.plan(0, &first);
        assert_eq!(plan.send.len(), 2);
        assert_eq!(plan.same_text.get(&0), Some(&vec![2]));
        // A later batch copies from the row that sent the text, after its write.
        let second = rows(&[("4", "apple pie"), ("5", "cherry tart")]);
        let plan2 = p.plan(1, &second);
        assert_eq!(plan2.copy, vec![(0, "1".to_string())]);
        assert_eq!(plan2.wait_for, vec![0]);
        assert_eq!(plan2.send.len(), 1);
        // Once batch 0 settled without writing row 1, its text is sent again.
        p.settle(0, &["2"]);
        let plan3 = p.plan(2, &rows(&[("6", "apple pie")]));
        assert_eq!((plan3.copy.len(), plan3.send.len()), (0, 1));
    }

    #[test]
    fn a_token_budget_cuts_the_batch_at_the_first_row_that_does_not_fit() {
        // "one two three" is 3 tokens, "four" 1.
        let p = planner(None, Some(5), TooLong::Truncate);
        let batch = rows(&[
            ("1", "four"),
            ("2", "one two three"),
            ("3", "one two three four"),
        ]);
        let plan = p.plan(0, &batch);
        assert_eq!(plan.cut, 2);
        assert_eq!(plan.stop, Some(StopReason::MaxTokens));
        assert_eq!(plan.tokens(), 4);
        // Nothing more is taken.
        assert_eq!(p.claim_limit(), Err(StopReason::MaxTokens));
    }

    /// A chunk of a row: it starts the row only when it is the first.
    struct Chunk(&'static str, &'static str, bool);

    impl PlanRow for Chunk {
        fn id(&self) -> &str {
            self.0
        }
        fn text(&self) -> &str {
            self.1
        }
        fn text_hash(&self) -> i64 {
            self.1.len() as i64
        }
        fn starts_row(&self) -> bool {
            self.2
        }
    }

    #[test]
    fn a_token_budget_cuts_before_the_row_whose_chunks_do_not_all_fit() {
        // Row a: 1 + 3 tokens; row b: 1 + 3 + 4 (the last does not fit in 10).
        let p = planner(Some(10), Some(10), TooLong::Truncate);
        let chunks = [
            Chunk("0:a", "four", true),
            Chunk("1:a", "one two three", false),
            Chunk("0:b", "five", true),
            Chunk("1:b", "six seven eight", false),
            Chunk("2:b", "nine ten eleven twelve", false),
        ];
        let plan = p.plan(0, &chunks);
        assert_eq!(plan.cut, 2, "row b goes whole or not at all");
        assert_eq!(plan.send.iter().map(|i| i.row).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(plan.tokens(), 4);
        // Row b counts against --max-rows no more: 10 - 2 taken + 1 given back.
        p.took(2);
        assert_eq!(p.claim_limit(), Err(StopReason::MaxTokens));
        assert_eq!(p.state().rows_left, Some(9));
    }

    #[test]
    fn the_row_budget_bounds_each_claim_and_rows_given_back_count_again() {
        let p = planner(Some(6), None, TooLong::Truncate);
        assert_eq!(p.claim_limit(), Ok(4));
        p.took(4);
        assert_eq!(p.claim_limit(), Ok(2));
        p.gave_back(1);
        assert_eq!(p.claim_limit(), Ok(3));
        p.took(3);
        assert_eq!(p.claim_limit(), Err(StopReason::MaxRows));
    }

    #[test]
    fn too_long_texts_are_cut_or_skipped() {
        let long = "word ".repeat(9000);
        let batch = vec![Row("1", long.clone()), Row("2", "short".into())];
        let cut = planner(None, None, TooLong::Truncate).plan(0, &batch);
        assert_eq!((cut.truncated, cut.send.len()), (1, 2));
        assert!(cut.send[0]
            .tokens
            .is_some_and(|t| t <= crate::tokens::MAX_INPUT_TOKENS));
        let skip = planner(None, None, TooLong::Skip).plan(0, &batch);
        assert_eq!((skip.too_long.len(), skip.send.len()), (1, 1));
        assert!(skip.too_long[0].1.starts_with("too long: "));
    }
}
