//! End to end: the generator's output is deterministic, matches the source schema of the shipped
//! feature definition, and its JSON stream decodes with the core decoder except for exactly the
//! malformed lines.

use std::path::Path;

use lambda_core::FeatureView;
use lambda_core::decode::{arrow_schema, decode_lines};
use lambda_gen::{GenConfig, generate};

fn view() -> FeatureView {
    FeatureView::load(Path::new(&manifest_dir()).join("../examples/fraud/features.toml")).unwrap()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn same_seed_same_bytes_and_schema_matches_the_definition() {
    let cfg = GenConfig {
        events: 30_000,
        days: 4,
        users: 100,
        seed: 3,
        ..GenConfig::default()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sa = generate(&cfg, a.path(), |_| {}).unwrap();
    let sb = generate(&cfg, b.path(), |_| {}).unwrap();
    assert_eq!(sa, sb);
    assert_eq!(
        files(a.path()),
        files(b.path()),
        "same seed must give the same bytes"
    );
    let other = tempfile::tempdir().unwrap();
    generate(
        &GenConfig {
            seed: 4,
            ..cfg.clone()
        },
        other.path(),
        |_| {},
    )
    .unwrap();
    assert_ne!(files(a.path()), files(other.path()));

    // Hive partitions by date, one per day.
    let parts: Vec<String> = std::fs::read_dir(a.path().join("history"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(parts.len(), 4);
    assert!(
        parts.iter().all(|p| p.starts_with("date=2025-12-")),
        "{parts:?}"
    );

    // The generator's schema is the definition's source schema.
    assert_eq!(lambda_gen::schema(), arrow_schema(&view().source));

    // Shape of the data: duplicates, disorder, late and malformed records are all present.
    assert!(sa.duplicates > 50 && sa.duplicates < 300, "{sa:?}");
    assert!(sa.out_of_order > 150 && sa.out_of_order < 500, "{sa:?}");
    assert_eq!(sa.parquet_rows, sa.events + sa.duplicates);
    assert_eq!(sa.json_lines, sa.events + sa.duplicates + sa.malformed);

    let text = std::fs::read(a.path().join("stream/events.jsonl")).unwrap();
    let (batch, bad) = decode_lines(&view().source, &text).unwrap();
    assert_eq!(batch.num_rows() as u64, sa.events + sa.duplicates);
    assert_eq!(bad.len() as u64, sa.malformed);
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
