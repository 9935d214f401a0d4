//! Tokens and money: exact counts for OpenAI models, inputs cut (or skipped)
//! at the model's limit, requests kept under the per-request limit, and
//! budgets that stop a run before a request would pass them.

use crate::support::mock::{tokens_for, Mock};
use crate::support::{autoembed, TestDb};

#[test]
fn dry_run_counts_exactly_the_tokens_the_run_then_pays_for() {
    let mut db = TestDb::new("exacttokens");
    db.products(60, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = repeat('Crème brûlée, 東京タワー 🍮 naïve café ', ((product_id_internal % 7) + 1)::int) || product_id_internal
         WHERE product_id_internal % 2 = 0"
    ));
    let mock = Mock::start(1536);
    let dry = autoembed(
        &db,
        &mock,
        &["dry-run", "--json", "--price-per-million", "1.5"],
    )
    .json();
    assert_eq!(dry["tokens_exact"], true);
    let run = autoembed(&db, &mock, &["run-once", "--json"]).json();
    assert_eq!(run["embedded"], 60);
    assert_eq!(
        dry["estimated_tokens"], run["tokens"],
        "dry-run {dry} vs run {run}"
    );
    let sent: u64 = mock.embedded_inputs().iter().map(|t| tokens_for(t)).sum();
    assert_eq!(run["tokens"].as_u64(), Some(sent));
    let cost = dry["estimated_cost_usd"].as_f64().unwrap_or(-1.0);
    assert!((cost - sent as f64 * 1.5 / 1e6).abs() < 1e-12, "{dry}");
}

/// Three products; the second holds 9,000 tokens (" word" is one token in cl100k_base).
fn three_rows_one_too_long(name: &str) -> TestDb {
    let mut db = TestDb::new(name);
    db.products(3, 1536);
    let s = db.schema.clone();
    db.exec(&format!("UPDATE {s}.products SET embedding_text = repeat(' word', 9000) WHERE product_id_internal = 2"));
    db
}

#[test]
fn too_long_texts_are_cut_by_default_or_skipped_and_recorded() {
    let db = three_rows_one_too_long("toolong");
    let mock = Mock::start(1536);
    let dry = autoembed(&db, &mock, &["dry-run", "--json", "--on-too-long", "skip"]).json();
    assert_eq!(
        (dry["would_embed"].as_u64(), dry["too_long"].as_u64()),
        (Some(2), Some(1))
    );
    let r = autoembed(&db, &mock, &["run-once", "--json", "--on-too-long", "skip"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        (r.json()["embedded"].as_u64(), r.json()["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(
        r.stderr
            .contains("too long: 9000 tokens, the model takes 8192 (--on-too-long skip"),
        "{r:?}"
    );
    assert!(mock.embedded_inputs().iter().all(|t| tokens_for(t) <= 8192));
    // No request ever failed for length.
    assert_eq!(r.json()["requests"], 1);

    let mut db = three_rows_one_too_long("toolong2");
    let mock = Mock::start(1536);
    let dry = autoembed(&db, &mock, &["dry-run", "--json"]).json();
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (
            j["embedded"].as_u64(),
            j["truncated"].as_u64(),
            j["requests"].as_u64()
        ),
        (Some(3), Some(1), Some(1))
    );
    let cut = " word".repeat(8192);
    assert_eq!(
        db.vector(&db.table(), "product_id_internal", "2"),
        Some(crate::support::mock::vector_for(&cut, 1536))
    );
    assert_eq!(dry["truncated"], 1);
    assert_eq!(dry["estimated_tokens"], j["tokens"]);
}

#[test]
fn a_batch_over_300k_tokens_is_split_before_it_is_sent() {
    let mut db = TestDb::new("bigbatch");
    db.products(40, 1536);
    let s = db.schema.clone();
    // 40 texts of 8,000 tokens: 320,000 in one batch of 100.
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = product_id_internal || repeat(' word', 7999)"
    ));
    let mock = Mock::start(1536);
    let r = autoembed(&db, &mock, &["run-once", "--json", "--concurrency", "1"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["failed"].as_u64()),
        (Some(40), Some(0))
    );
    // Two requests, none of them rejected: it was split before sending.
    assert_eq!(j["requests"], 2);
    for req in mock.requests() {
        let tokens: u64 = req.inputs.iter().map(|t| tokens_for(t)).sum();
        assert!(tokens <= 300_000, "a request of {tokens} tokens");
    }
    assert_eq!(db.correct_rows(1536), (40, 0));
}

#[test]
fn token_and_cost_budgets_embed_the_rows_that_fit_and_stop_there() {
    let mut db = TestDb::new("budgets");
    db.products(100, 1536);
    let mock = Mock::start(1536);
    let per_batch: u64 = (1..=10).map(|i| tokens_for(&format!("product {i}"))).sum();
    let limit = per_batch * 3 + per_batch / 2;
    // The rows, oldest first, whose tokens fit in the budget.
    let mut fits = 0;
    let mut spent = 0;
    for i in 1..=100 {
        let t = tokens_for(&format!("product {i}"));
        if spent + t > limit {
            break;
        }
        spent += t;
        fits += 1;
    }
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--batch-size",
            "10",
            "--concurrency",
            "1",
            "--max-tokens",
            &limit.to_string(),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["stop_reason"], "max_tokens");
    assert!(j["tokens"].as_u64().unwrap_or(u64::MAX) <= limit, "{j}");
    assert_eq!(
        (j["embedded"].as_u64(), j["pending_after"].as_i64()),
        (Some(fits), Some(100 - fits as i64))
    );
    assert_eq!(j["tokens"].as_u64(), Some(spent));

    // --max-cost-usd, priced at $1 a token here: the same budget in dollars.
    let mock = Mock::start(1536);
    let usd = format!("{limit}");
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--json",
            "--batch-size",
            "10",
            "--concurrency",
            "1",
            "--max-cost-usd",
            &usd,
            "--price-per-million",
            "1000000",
        ],
    );
    let j = r.json();
    assert_eq!(
        (j["stop_reason"].as_str(), j["embedded"].as_u64()),
        (Some("max_cost"), Some(fits)),
        "{j}"
    );

    // A cost budget needs a price.
    let r = autoembed(
        &db,
        &mock,
        &[
            "run-once",
            "--provider",
            "openai-compatible",
            "--model",
            "nomic-embed-text",
            "--max-cost-usd",
            "1",
        ],
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("--max-cost-usd (AUTOEMBED_MAX_COST_USD) needs a price"),
        "{r:?}"
    );
}

#[test]
fn identical_texts_in_a_batch_are_sent_once_and_written_to_every_row() {
    let mut db = TestDb::new("dupes");
    db.products(30, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'same text' WHERE product_id_internal % 3 = 0"
    ));
    let mock = Mock::start(1536);
    let dry = autoembed(&db, &mock, &["dry-run", "--json"]).json();
    let r = autoembed(&db, &mock, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 30);
    assert_eq!(dry["estimated_tokens"], r.json()["tokens"]);
    let sent = mock.embedded_inputs();
    assert_eq!(
        sent.len(),
        21,
        "10 identical texts should be one input: {sent:?}"
    );
    assert_eq!(sent.iter().filter(|t| t.as_str() == "same text").count(), 1);
    assert_eq!(db.correct_rows(1536), (30, 0));
}

#[test]
fn identical_texts_across_the_batches_of_a_run_are_sent_once() {
    // 60 rows, 12 distinct texts, batches of 5 over 4 workers: each text
    // turns up in many batches.
    let mut db = TestDb::new("dupesrun");
    db.products(60, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = 'colour ' || (product_id_internal % 12)"
    ));
    let mock = Mock::start(1536);
    let args = ["--json", "--batch-size", "5", "--concurrency", "4"];
    let r = autoembed(&db, &mock, &[&["backfill"][..], &args].concat());
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 60, "{r:?}");
    assert_eq!(db.correct_rows(1536), (60, 0));
    // Workers in flight at once may each send a text the other has not
    // written yet; with one worker, each text goes exactly once.
    let (sent, distinct) = crate::support::sent_and_distinct(&mock);
    assert!(
        sent < 60 && distinct == 12,
        "{sent} sent, {distinct} distinct"
    );
    let mock = Mock::start(1536);
    db.exec(&format!("UPDATE {s}.products SET embedding = NULL"));
    let one = ["--json", "--batch-size", "5", "--concurrency", "1"];
    let dry = autoembed(&db, &mock, &[&["dry-run"][..], &one].concat()).json();
    let r = autoembed(&db, &mock, &[&["backfill"][..], &one].concat());
    assert_eq!(r.json()["embedded"], 60, "{r:?}");
    assert_eq!(mock.embedded_inputs().len(), 12);
    assert_eq!(dry["estimated_tokens"], r.json()["tokens"], "{dry} {r:?}");
    assert_eq!(db.correct_rows(1536), (60, 0));
}
