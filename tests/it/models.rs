//! Model memory: autoembed records which model made each vector, `verify`
//! warns when some were made by another model than the configured one, and
//! `backfill --reembed` replaces exactly those (or all with `--reembed all`),
//! within the usual budgets, so a model switch is one command.

use crate::support::mock::Mock;
use crate::support::{autoembed, TestDb};

const SMALL: &str = "text-embedding-3-small";
const ADA: &str = "text-embedding-ada-002";

/// The `models` check of `verify --offline --json` with this model.
fn models_check(db: &TestDb, mock: &Mock, model: &str) -> serde_json::Value {
    let v = autoembed(
        db,
        mock,
        &["verify", "--offline", "--json", "--model", model],
    );
    assert_eq!(v.code, 0, "{v:?}");
    v.json()["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "models").cloned())
        .unwrap_or_else(|| panic!("no models check: {v:?}"))
}

/// Inputs the mock was sent since `from` requests, and the models they named.
fn sent_since(mock: &Mock, from: usize) -> (Vec<String>, Vec<String>) {
    let reqs = mock.requests();
    let inputs = reqs[from..].iter().flat_map(|r| r.inputs.clone()).collect();
    let models = reqs[from..]
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or_default().to_string())
        .collect();
    (inputs, models)
}

#[test]
fn a_model_switch_is_found_by_verify_and_undone_by_reembed() {
    let mut db = TestDb::new("models");
    db.products(30, 1536);
    let mock = Mock::start(1536);
    let s = db.schema.clone();
    let state = db.state_schema();

    let r = autoembed(&db, &mock, &["run-once", "--json", "--model", SMALL]);
    assert_eq!(r.json()["embedded"], 30, "{r:?}");
    let c = models_check(&db, &mock, SMALL);
    assert_eq!(
        (c["ok"].clone(), c["warning"].clone()),
        (true.into(), false.into()),
        "{c}"
    );
    assert_eq!(
        c["detail"],
        "all 30 vectors from text-embedding-3-small (1536 dimensions)"
    );
    // The table keeps its model: no row needs a record of its own.
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM {state}.vectors")),
        0
    );

    // Switch the configuration to ada; ten new rows come in.
    db.exec(&format!(
        "INSERT INTO {s}.products SELECT g, 'product ' || g FROM generate_series(31, 40) g"
    ));
    let r = autoembed(&db, &mock, &["run-once", "--json", "--model", ADA]);
    assert_eq!(r.json()["embedded"], 10, "{r:?}");
    let c = models_check(&db, &mock, ADA);
    assert_eq!(
        (c["ok"].clone(), c["warning"].clone()),
        (true.into(), true.into()),
        "{c}"
    );
    assert_eq!(
        c["detail"],
        "30 from text-embedding-3-small (1536 dimensions) of 40 vectors are not from \
         text-embedding-ada-002 (1536 dimensions): run `autoembed backfill --reembed` to replace them"
    );
    let human = autoembed(&db, &mock, &["verify", "--offline", "--model", ADA]);
    assert_eq!(human.code, 0, "a warning is not a failure: {human:?}");
    assert!(human.stdout.contains("  warn  models"), "{human:?}");
    // Seen from the old model, the ten new rows are the odd ones.
    let c = models_check(&db, &mock, SMALL);
    assert!(
        c["detail"].as_str().unwrap_or_default().starts_with(
            "10 from text-embedding-ada-002 (1536 dimensions) of 40 vectors are not from text-embedding-3-small"
        ),
        "{c}"
    );

    // One command: the 30 old rows, each once, with ada; the budget applies.
    let before = mock.requests().len();
    let r = autoembed(
        &db,
        &mock,
        &[
            "backfill",
            "--reembed",
            "--json",
            "--model",
            ADA,
            "--max-rows",
            "20",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        (
            r.json()["embedded"].as_u64(),
            r.json()["stop_reason"].as_str()
        ),
        (Some(20), Some("max_rows")),
        "{r:?}"
    );
    let r = autoembed(
        &db,
        &mock,
        &["backfill", "--reembed", "--json", "--model", ADA],
    );
    assert_eq!(r.json()["embedded"], 10, "{r:?}");
    let (mut inputs, models) = sent_since(&mock, before);
    inputs.sort();
    let mut want: Vec<String> = (1..=30).map(|i| format!("product {i}")).collect();
    want.sort();
    assert_eq!(inputs, want, "exactly the old rows, each once");
    assert!(models.iter().all(|m| m == ADA), "{models:?}");
    assert_eq!(db.correct_rows(1536), (40, 0));
    let c = models_check(&db, &mock, ADA);
    assert_eq!(c["warning"], false, "{c}");
    assert_eq!(
        c["detail"],
        "all 40 vectors from text-embedding-ada-002 (1536 dimensions)"
    );
    // ada is the table's model now, and the per-row records are gone.
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM {state}.vectors")),
        0
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {state}.models WHERE model = '{ADA}'"
        )),
        1
    );

    // Nothing left to re-embed; `all` re-embeds everything.
    let before = mock.requests().len();
    let r = autoembed(
        &db,
        &mock,
        &["backfill", "--reembed", "--json", "--model", ADA],
    );
    assert_eq!(r.json()["embedded"], 0, "{r:?}");
    assert_eq!(mock.requests().len(), before);
    let r = autoembed(
        &db,
        &mock,
        &["backfill", "--reembed", "all", "--json", "--model", ADA],
    );
    assert_eq!(r.json()["embedded"], 40, "{r:?}");
    assert_eq!(sent_since(&mock, before).0.len(), 40);
}

#[test]
fn reembed_takes_only_all_or_nothing() {
    let mut db = TestDb::new("reembedarg");
    db.products(1, 1536);
    let mock = Mock::start(1536);
    let r = autoembed(&db, &mock, &["backfill", "--reembed", "most"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("invalid --reembed \"most\""), "{r:?}");
    assert_eq!(db.correct_rows(1536), (0, 0));
}
