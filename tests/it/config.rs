//! Configuration: flags beat the environment, which beats `.env`, which
//! beats defaults; every mistake is one line naming what to fix, exit 2,
//! nothing written; the API key and the database password never show.

use crate::support::mock::{Fault, Mock};
use crate::support::{autoembed, run, TestDb, API_KEY, DB_PASSWORD};

fn batch_sizes(mock: &Mock) -> Vec<usize> {
    mock.requests().iter().map(|r| r.inputs.len()).collect()
}

#[test]
fn flags_beat_the_environment_which_beats_dotenv() {
    let mut db = TestDb::new("precedence");
    db.products(100, 1536);
    std::fs::write(
        db.dir.join(".env"),
        "# settings\nAUTOEMBED_BATCH_SIZE=7\nAUTOEMBED_MAX_ROWS=7\nAUTOEMBED_CONCURRENCY=1\n",
    )
    .expect("write .env");
    let mock = Mock::start(1536);
    assert_eq!(autoembed(&db, &mock, &["run-once"]).code, 0);
    assert_eq!(batch_sizes(&mock), vec![7]);

    let mock = Mock::start(1536);
    let r = run(db
        .cmd(&mock)
        .env("AUTOEMBED_BATCH_SIZE", "5")
        .args(["run-once"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(batch_sizes(&mock), vec![5, 2]);

    let mock = Mock::start(1536);
    let r =
        run(db
            .cmd(&mock)
            .env("AUTOEMBED_BATCH_SIZE", "5")
            .args(["run-once", "--batch-size", "3"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(batch_sizes(&mock), vec![3, 3, 1]);

    // --env-file names another file, instead of ./.env.
    std::fs::write(db.dir.join("other.env"), "AUTOEMBED_MAX_ROWS=2\n").expect("write");
    let mock = Mock::start(1536);
    assert_eq!(
        autoembed(&db, &mock, &["run-once", "--env-file", "other.env"]).code,
        0
    );
    assert_eq!(batch_sizes(&mock), vec![2]);
    let r = autoembed(&db, &mock, &["run-once", "--env-file", "missing.env"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("cannot read --env-file missing.env"),
        "{r:?}"
    );
}

#[test]
fn everything_can_come_from_a_dotenv_file_with_supabase_variables() {
    let mut db = TestDb::new("supabase_env");
    db.products(12, 1536);
    let mock = Mock::start(1536);
    let host = crate::support::admin_url()
        .split('@')
        .nth(1)
        .and_then(|h| h.split(':').next())
        .unwrap_or("127.0.0.1")
        .to_string();
    let env = format!(
        "SUPABASE_HOST={host}\nSUPABASE_PORT=5432\nSUPABASE_DATABASE=test\nSUPABASE_USER=postgres\n\
         SUPABASE_PASSWORD={DB_PASSWORD}\nOPENAI_API_KEY={API_KEY}\nAUTOEMBED_TABLE={}\n\
         AUTOEMBED_STATE_SCHEMA={}\nAUTOEMBED_API_BASE={}\n",
        db.table(),
        db.state_schema(),
        mock.base
    );
    std::fs::write(db.dir.join(".env"), env).expect("write .env");
    let r = run(std::process::Command::new(env!("CARGO_BIN_EXE_autoembed"))
        .env_clear()
        .current_dir(&db.dir)
        .args(["run-once", "--json", "-vv"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["embedded"], 12);
    assert_eq!(db.correct_rows(1536), (12, 0));
}

/// Arguments, environment, and the message expected.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_settings_are_one_line_naming_the_flag_and_variable_with_exit_2() {
    let mut db = TestDb::new("badconfig");
    db.products(3, 1536);
    let mock = Mock::start(1536);
    let cases: &[Case] = &[
        (&["--batch-size", "0"], &[], "invalid --batch-size (AUTOEMBED_BATCH_SIZE) \"0\": expected a whole number from 1 to 2048"),
        (&[], &[("AUTOEMBED_BATCH_SIZE", "3000")], "invalid --batch-size (AUTOEMBED_BATCH_SIZE) \"3000\""),
        (&["--max-rows=-1"], &[], "invalid --max-rows (AUTOEMBED_MAX_ROWS) \"-1\""),
        (&["--max-seconds", "soon"], &[], "invalid --max-seconds (AUTOEMBED_MAX_SECONDS)"),
        (&["--request-timeout", "0"], &[], "invalid --request-timeout (AUTOEMBED_REQUEST_TIMEOUT)"),
        (&["--dimensions", "x"], &[], "invalid --dimensions (AUTOEMBED_DIMENSIONS)"),
        (&["--provider", "cohere"], &[], "invalid --provider (AUTOEMBED_PROVIDER) \"cohere\""),
        (&["--local-precision", "int4"], &[], "invalid --local-precision (AUTOEMBED_LOCAL_PRECISION) \"int4\": expected fp32 or int8"),
        (&["--provider", "openai-compatible"], &[("AUTOEMBED_API_BASE", "")], "needs --api-base (AUTOEMBED_API_BASE)"),
        (&["--api-base", "ftp://x"], &[], "invalid --api-base (AUTOEMBED_API_BASE)"),
        (&["--model", "text-embedding-ada-002", "--dimensions", "512"], &[], "--dimensions (AUTOEMBED_DIMENSIONS) is not accepted by text-embedding-ada-002"),
        (&[], &[("OPENAI_API_KEY", "")], "no API key for openai: set OPENAI_API_KEY (or AUTOEMBED_API_KEY)"),
        (&[], &[("DATABASE_URL", "")], "no database given: set --database-url or DATABASE_URL"),
        (&["--database-url", &format!("postgresql://u:{DB_PASSWORD}@h:notaport/db")], &[], "invalid --database-url (DATABASE_URL)"),
        (&["--table", "x.y.z.w"], &[], "--table (AUTOEMBED_TABLE) \"x.y.z.w\" is not a valid table name"),
    ];
    for (args, envs, want) in cases {
        let mut cmd = db.cmd(&mock);
        for (k, v) in *envs {
            cmd.env(k, v);
        }
        let r = run(cmd.arg("run-once").args(*args));
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.contains(want), "{args:?}: want {want:?} in {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
    }
    assert!(mock.requests().is_empty());
    let s = db.schema.clone();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {s}.products WHERE embedding IS NOT NULL"
        )),
        0
    );
    // An unknown flag is clap's usage error, also exit 2.
    assert_eq!(
        autoembed(&db, &mock, &["run-once", "--no-such-flag"]).code,
        2
    );
}

#[test]
fn a_malformed_dotenv_names_the_line_but_not_its_content() {
    let db = TestDb::new("malformed_env");
    let mock = Mock::start(1536);
    std::fs::write(
        db.dir.join(".env"),
        format!("AUTOEMBED_MODEL=x\nOPENAI_API_KEY='{API_KEY}\n"),
    )
    .expect("write");
    let r = autoembed(&db, &mock, &["run-once"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains(".env: line 2 is not KEY=VALUE"), "{r:?}");
}

#[test]
fn an_unreachable_database_is_exit_3_without_the_password() {
    let db = TestDb::new("unreachable");
    let mock = Mock::start(1536);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    for url in [
        format!("postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{port}/test"),
        format!("postgresql://no_such_role:{DB_PASSWORD}@127.0.0.1:5432/test"),
        format!("host=127.0.0.1 port={port} user=postgres password={DB_PASSWORD} dbname=test"),
    ] {
        for command in ["run-once", "dry-run"] {
            let r = run(db
                .cmd(&mock)
                .env("DATABASE_URL", &url)
                .args([command, "-vvv", "--json"])
                .env("RUST_BACKTRACE", "1"));
            assert_eq!(r.code, 3, "{url}: {r:?}");
            assert!(r.stderr.contains("cannot connect to"), "{r:?}");
            assert_eq!(r.json()["exit_code"], 3);
        }
        let r = run(db
            .cmd(&mock)
            .env("DATABASE_URL", &url)
            .args(["verify", "--json"]));
        assert_eq!(r.code, 3, "{r:?}");
        assert_eq!(r.json()["checks"][0]["name"], "database");
    }
}

#[test]
fn secrets_never_appear_even_when_the_provider_echoes_them() {
    let mut db = TestDb::new("secrets");
    db.products(3, 1536);
    let mock = Mock::start(1536);
    // A provider that quotes the key back, with the most verbose logging and backtraces on.
    mock.always(Some(Fault::openai(
        401,
        "invalid_api_key",
        &format!("Incorrect API key provided: {API_KEY}"),
    )));
    let r = run(db
        .cmd(&mock)
        .env("RUST_BACKTRACE", "1")
        .args(["run-once", "-vvv", "--json"]));
    assert_eq!(r.code, 3);
    assert!(
        r.stderr.contains("Incorrect API key provided: ***"),
        "{r:?}"
    );
    mock.always(None);
    mock.reject_inputs_containing_saying(
        "product",
        &format!("bad input near {API_KEY} / {DB_PASSWORD}"),
    );
    let r = run(db
        .cmd(&mock)
        .env("RUST_BACKTRACE", "1")
        .args(["backfill", "-vvv"]));
    assert_eq!(r.code, 1, "{r:?}");
    let st = db.state_schema();
    let errors: Vec<String> = db
        .client
        .query(&format!("SELECT last_error FROM {st}.failures"), &[])
        .expect("failures")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(errors.len(), 3);
    // verify prints the database label; never the password.
    let r = run(db.cmd(&mock).args(["verify", "-vvv", "--json"]));
    assert!(r.stdout.contains("postgres@127.0.0.1:5432/test"), "{r:?}");
}

#[test]
fn verify_checks_the_key_and_probes_unknown_models_unless_offline() {
    let mut db = TestDb::new("verify");
    db.products(10, 768);
    let mock = Mock::start(768);
    let r = run(db.cmd(&mock).env_remove("OPENAI_API_KEY").args([
        "verify",
        "--json",
        "--dimensions",
        "768",
    ]));
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["ok"], false);
    let failed: Vec<&str> = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(failed, vec!["api_key"]);
    assert_eq!(j["counts"]["pending"], 10);
    assert_eq!(j["counts"]["rows"], 10);

    let compat = [
        "verify",
        "--json",
        "--provider",
        "openai-compatible",
        "--model",
        "nomic-embed-text",
    ];
    let r = autoembed(&db, &mock, &compat);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(mock.requests().len(), 1, "one probe request");
    let mut offline = compat.to_vec();
    offline.push("--offline");
    let r = autoembed(&db, &mock, &offline);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(mock.requests().len(), 1, "--offline made a request");
    assert!(r.stdout.contains("not checked (--offline"));

    let other = Mock::start(1024);
    let mut args = compat.to_vec();
    args[0] = "verify";
    let r = autoembed(&db, &other, &args);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout
            .contains("returns 1024 dimensions but \\\"embedding\\\" is vector(768)"),
        "{r:?}"
    );
}

#[test]
fn a_wrong_password_is_exit_3_and_never_printed() {
    // scripts/dev-db.sh makes autoembed_pwtest the one role that must give a password.
    let db = TestDb::new("wrongpw");
    let mock = Mock::start(1536);
    let url = format!("postgresql://autoembed_pwtest:{DB_PASSWORD}@127.0.0.1:5432/test");
    for command in ["run-once", "verify"] {
        let r = run(db
            .cmd(&mock)
            .env("DATABASE_URL", &url)
            .env("RUST_BACKTRACE", "1")
            .args([command, "-vvv"]));
        assert_eq!(r.code, 3, "{r:?}");
        assert!(
            r.stderr
                .contains("password authentication failed for user \"autoembed_pwtest\"")
                || r.stdout.contains("password authentication failed"),
            "{r:?}"
        );
    }
    // SUPABASE_* variables take the password as it is, special characters included.
    let r = run(db
        .cmd(&mock)
        .env_remove("DATABASE_URL")
        .env("SUPABASE_HOST", "127.0.0.1")
        .env("SUPABASE_USER", "autoembed_pwtest")
        .env("SUPABASE_DATABASE", "test")
        .env("SUPABASE_PASSWORD", DB_PASSWORD)
        .args(["dry-run", "--json"]));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("password authentication failed"),
        "{r:?}"
    );
}

#[test]
fn the_env_example_file_parses_and_is_used_as_written() {
    let db = TestDb::new("envexample");
    let mock = Mock::start(1536);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example");
    // Its DATABASE_URL names the local server's postgres database, which has no products table.
    let r = run(std::process::Command::new(env!("CARGO_BIN_EXE_autoembed"))
        .env_clear()
        .current_dir(&db.dir)
        .args(["verify", "--json", "--offline", "--env-file", example]));
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    let check = |name: &str| {
        j["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    };
    assert_eq!(
        check("database").map(|c| c["detail"].clone()),
        Some("postgres@127.0.0.1:5432/postgres".into())
    );
    assert!(
        check("table")
            .map(|c| c["detail"].to_string())
            .unwrap_or_default()
            .contains("public.products"),
        "{j}"
    );
    assert_eq!(check("api_key").map(|c| c["ok"].clone()), Some(true.into()));
    drop(mock);
}
