//! One plan for run and dry-run: whatever the budgets, batch size or
//! concurrency, dry-run's `would_embed` and `estimated_tokens` are the
//! run's `embedded` and `tokens`, and a budget names itself as the reason
//! the run stopped.

use crate::support::mock::Mock;
use crate::support::{autoembed, TestDb};

/// 400 rows of mixed texts: short, long, too long for the model, the same
/// text in many rows (within and across batches), blank.
fn mixed(name: &str) -> TestDb {
    let mut db = TestDb::new(name);
    db.products(400, 1536);
    let s = db.schema.clone();
    db.exec(&format!(
        "UPDATE {s}.products SET embedding_text = repeat('a longer description of a product ', 40) || product_id_internal
           WHERE product_id_internal % 5 = 0;
         UPDATE {s}.products SET embedding_text = 'the same text ' || (product_id_internal % 3)
           WHERE product_id_internal % 7 = 0;
         UPDATE {s}.products SET embedding_text = repeat('overflow ', 9000) || product_id_internal
           WHERE product_id_internal IN (42, 250);
         UPDATE {s}.products SET embedding_text = CASE WHEN product_id_internal % 2 = 0 THEN '' ELSE E'  \\t ' END
           WHERE product_id_internal % 11 = 0;"
    ));
    db
}

fn reset(db: &mut TestDb) {
    let (s, state) = (db.schema.clone(), db.state_schema());
    db.exec(&format!(
        "UPDATE {s}.products SET embedding = NULL;
         DROP SCHEMA IF EXISTS {state} CASCADE;"
    ));
}

#[test]
fn dry_run_decides_exactly_what_the_run_then_does_at_any_concurrency() {
    let mut db = mixed("oneplan");
    let mock = Mock::start(1536);
    let settings: &[&[&str]] = &[
        &[],
        &["--batch-size", "7"],
        &["--max-rows", "120", "--batch-size", "50"],
        &["--max-tokens", "900"],
        &["--max-tokens", "25000", "--batch-size", "30"],
        &["--max-cost-usd", "0.0003", "--batch-size", "40"],
        &["--on-too-long", "skip"],
        &[
            "--on-too-long",
            "skip",
            "--max-rows",
            "60",
            "--batch-size",
            "20",
        ],
    ];
    for args in settings {
        let mut reasons = Vec::new();
        for concurrency in ["1", "8"] {
            reset(&mut db);
            let with = |cmd: &'static str| {
                let mut a = vec![cmd, "--json", "--concurrency", concurrency];
                a.extend_from_slice(args);
                a
            };
            let dry = autoembed(&db, &mock, &with("dry-run"));
            assert_eq!(dry.code, 0, "{dry:?}");
            let run = autoembed(&db, &mock, &with("run-once"));
            assert!(run.code == 0 || run.code == 1, "{run:?}");
            let (d, r) = (dry.json(), run.json());
            let what = format!("{args:?} at --concurrency {concurrency}: dry-run {d}, run {r}");
            assert_eq!(d["would_embed"], r["embedded"], "{what}");
            assert_eq!(d["estimated_tokens"], r["tokens"], "{what}");
            assert_eq!(d["too_long"], r["failed"], "{what}");
            assert_eq!(d["truncated"], r["truncated"], "{what}");
            assert_eq!(r["changed"], 0, "{what}");
            // Every row embedded holds the vector of its text (of its first
            // 8,192 tokens, for the two texts cut to the model's limit).
            let (whole, cut) = db.correct_rows(1536);
            assert_eq!(whole + cut, r["embedded"].as_i64().unwrap_or(-1), "{what}");
            assert_eq!(cut, r["truncated"].as_i64().unwrap_or(-1), "{what}");
            reasons.push(r["stop_reason"].clone());
        }
        assert_eq!(
            reasons[0], reasons[1],
            "{args:?}: the stop reason depends on concurrency"
        );
    }
}

#[test]
fn a_token_budget_below_one_batch_embeds_the_rows_that_fit() {
    let mut db = mixed("smallbudget");
    let mock = Mock::start(1536);
    for concurrency in ["1", "8"] {
        reset(&mut db);
        let r = autoembed(
            &db,
            &mock,
            &[
                "run-once",
                "--json",
                "--max-tokens",
                "900",
                "--concurrency",
                concurrency,
            ],
        );
        assert_eq!(r.code, 0, "{r:?}");
        let j = r.json();
        let embedded = j["embedded"].as_u64().unwrap_or(0);
        assert!(
            embedded > 0,
            "nothing embedded under a budget below one batch: {j}"
        );
        assert!(j["tokens"].as_u64().unwrap_or(u64::MAX) <= 900, "{j}");
        assert_eq!(j["stop_reason"], "max_tokens", "{j}");
        assert!(j["pending_after"].as_i64().unwrap_or(0) > 0, "{j}");
        // The oldest ids first: the rows embedded are the first ones.
        let s = db.schema.clone();
        let last = db.count(&format!(
            "SELECT max(product_id_internal) FROM {s}.products WHERE embedding IS NOT NULL"
        ));
        let first_pending = db.count(&format!(
            "SELECT min(product_id_internal) FROM {s}.products WHERE embedding IS NULL \
             AND embedding_text ~ '[^ \\t]'"
        ));
        assert!(last < first_pending, "{j}");
    }
}
