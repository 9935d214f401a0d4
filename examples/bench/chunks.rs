//! The `chunks` scenario: `--chunk-docs` documents of 2,000 to 20,000
//! tokens (paragraphs of about 60 tokens, every one distinct, so that none is
//! copied instead of embedded) backfilled into a chunks table
//! (`--chunks-table`, 512-token chunks, the default 50-token overlap),
//! against the plain path writing the same vectors: a table whose rows are
//! exactly those chunks' texts, one vector a row. Both at mock latency 0 ms,
//! into `vector(384)` (`--dimensions 384`) without a vector index (the HNSW
//! index costs both the same and is pgvector's), in turns. Dry-run's chunks
//! and tokens are checked against the run's.

use super::{autoembed, exec, fail, median, query_i64, reset, Measured, Opts, SCHEMA};
use autoembed_mock as mock;
use postgres::Client;

const DIMS: &str = "384";

pub fn chunks(opts: &Opts, db: &mut Client) {
    let n = opts.chunk_docs;
    println!("## Long documents as chunks, mock latency 0 ms\n");
    let docs = format!("{SCHEMA}.docs");
    let chunks = format!("{SCHEMA}.doc_chunks");
    let plain = format!("{SCHEMA}.doc_plain");
    exec(
        db,
        &format!(
            "DROP TABLE IF EXISTS {chunks}, {plain}, {docs};
             CREATE TABLE {docs} (id bigint PRIMARY KEY, body text);
             INSERT INTO {docs}
             SELECT g, (SELECT string_agg(format('Section %s of document %s. %s', p, g,
                          (ARRAY['The harbour master keeps a log of every ship that enters, with its tonnage, its cargo and the name of its captain, and the log goes back two hundred years.',
                                 'Lighthouses along this coast were first lit with oil, then with gas, and finally with electricity; the keepers lived in small stone cottages beside them.',
                                 'Tides here rise and fall by more than ten metres, so the fishing boats rest on the mud twice a day and the quay is built high above the water.',
                                 'In winter the storms come from the west, and the sea wall has been rebuilt three times since the great flood that took the old market square.',
                                 'The museum shows charts drawn by hand, brass instruments, and letters written by sailors to their families while they waited for a fair wind.',
                                 'Every summer a regatta fills the bay with sails, and the town holds a fair with music, grilled fish and a race of rowing boats around the island.'])[1 + (g * 7 + p) % 6]),
                          E'\\n\\n')
                     FROM generate_series(1, 55 + abs(hashint4(g::int)) % 490) p)
             FROM generate_series(1, {n}) g;"
        ),
    );
    exec(db, &format!("VACUUM ANALYZE {docs}"));
    let mock = mock::Mock::start(384);
    let chunked = |opts: &Opts, args: &[&str]| -> Measured {
        let mut args: Vec<&str> = args.to_vec();
        args.extend([
            "--table",
            &docs,
            "--text-column",
            "body",
            "--chunks-table",
            &chunks,
        ]);
        args.extend(["--dimensions", DIMS]);
        autoembed(opts, &mock, "unused", &args)
    };
    let setup = chunked(opts, &["setup"]);
    if setup.json.is_null() {
        fail("setup of the chunks table failed");
    }
    exec(
        db,
        &format!("DROP INDEX IF EXISTS {SCHEMA}.doc_chunks_embedding_hnsw"),
    );
    let dry = chunked(opts, &["dry-run", "--max-rows", "unlimited"]).json;

    // The first chunked run is untimed: it fills the mock's cache of
    // vectors and gives the plain table its texts.
    let first = chunked(opts, &["backfill"]);
    check(&first, &dry, n);
    exec(
        db,
        &format!(
            "CREATE TABLE {plain} AS SELECT (source_id * 100000 + chunk_index) AS product_id_internal,
                    chunk_text AS embedding_text, NULL::vector({DIMS}) AS embedding FROM {chunks};
             ALTER TABLE {plain} ADD PRIMARY KEY (product_id_internal);"
        ),
    );
    let vectors = query_i64(db, &format!("SELECT count(*) FROM {plain}"));
    let (mut chunk_rates, mut plain_rates, mut chunk_rss, mut plain_rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.runs.max(3) {
        exec(db, &format!("TRUNCATE {chunks}"));
        reset(db, &plain);
        let c = chunked(opts, &["backfill"]);
        check(&c, &dry, n);
        chunk_rates.push(vectors as f64 / c.seconds);
        chunk_rss.push(c.max_rss_kb as f64 / 1024.0);
        reset(db, &plain);
        let p = autoembed(opts, &mock, &plain, &["backfill", "--dimensions", DIMS]);
        if p.json["embedded"].as_i64() != Some(vectors) {
            fail(&format!("the plain backfill embedded {}", p.json));
        }
        plain_rates.push(vectors as f64 / p.seconds);
        plain_rss.push(p.max_rss_kb as f64 / 1024.0);
    }
    let tokens = dry["estimated_tokens"].as_u64().unwrap_or(0);
    println!(
        "{n} documents, {} tokens ({} a document on average), {vectors} chunks of at most 512 tokens; dry-run's chunks and tokens equal the run's.\n",
        tokens,
        tokens / n.max(1) as u64
    );
    println!(
        "| path | vectors/s (median of {}) | peak RSS (MB) |",
        chunk_rates.len()
    );
    println!("|---|---|---|");
    let (cr, pr) = (median(chunk_rates.clone()), median(plain_rates.clone()));
    println!(
        "| chunked: {n} documents into {vectors} chunks | {cr:.0} | {:.0} |",
        median(chunk_rss)
    );
    println!(
        "| plain: {vectors} rows of the same texts | {pr:.0} | {:.0} |",
        median(plain_rss)
    );
    let ratios: Vec<f64> = chunk_rates
        .iter()
        .zip(&plain_rates)
        .map(|(c, p)| c / p)
        .collect();
    println!(
        "\nchunked vs plain, pair by pair: {}; median **{:.2}**.\n",
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(ratios)
    );
}

/// A chunked backfill embedded every document, as many chunks and tokens as dry-run said.
fn check(m: &Measured, dry: &serde_json::Value, n: i64) {
    let j = &m.json;
    if j["embedded"].as_i64() != Some(n)
        || j["chunks"] != dry["chunks"]
        || j["tokens"] != dry["estimated_tokens"]
    {
        fail(&format!(
            "the chunked backfill disagrees with dry-run: {j} vs {dry}"
        ));
    }
}
