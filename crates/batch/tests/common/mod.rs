//! Helpers shared by the batch tests: data sets and the Arrow-to-value conversion.
#![allow(dead_code)]

use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use lambda_core::decode::{BatchBuilder, decode_lines, value_at};
use lambda_core::{AggFunction, ColumnType, FeatureView, Value};
use lambda_gen::{GenConfig, Rng, generate};

pub fn rows_of(batch: &RecordBatch) -> Vec<Vec<Value>> {
    (0..batch.num_rows())
        .map(|r| {
            batch
                .columns()
                .iter()
                .map(|c| value_at(c.as_ref(), r).unwrap())
                .collect()
        })
        .collect()
}

pub fn examples() -> std::path::PathBuf {
    Path::new(&manifest_dir()).join("../../examples/fraud")
}

/// Small generated data set (JSON stream, decoded by the core decoder; malformed lines dropped).
pub fn generated(view: &FeatureView) -> (RecordBatch, i64) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = GenConfig {
        events: 40_000,
        days: 3,
        users: 150,
        seed: 7,
        ..GenConfig::default()
    };
    let s = generate(&cfg, dir.path(), |_| {}).unwrap();
    assert!(s.duplicates > 0 && s.malformed > 0);
    let text = std::fs::read(dir.path().join("stream/events.jsonl")).unwrap();
    let (batch, bad) = decode_lines(&view.source, &text).unwrap();
    assert_eq!(
        bad.len() as u64,
        s.malformed,
        "exactly the malformed lines fail to decode"
    );
    (batch, cfg.end_ms)
}

/// A view with every function on every type it accepts, half of them filtered.
pub fn all_functions_view() -> FeatureView {
    let cols = [
        ("i", "int64"),
        ("f", "float64"),
        ("d", "decimal(12,3)"),
        ("s", "string"),
        ("b", "bool"),
        ("t", "timestamp"),
    ];
    let mut text = String::from(
        "name = \"all\"\nwindows = [\"5m\", \"1h\", \"1d\", \"30d\"]\n[source]\nname = \"events\"\nentity = \"user\"\nevent-time = \"ts\"\nevent-id = \"id\"\ncolumns = [\n  { name = \"id\", type = \"string\" },\n  { name = \"user\", type = \"string\" },\n",
    );
    for (c, t) in cols {
        text.push_str(&format!(
            "  {{ name = \"{c}\", type = \"{t}\", nullable = true }},\n"
        ));
    }
    text.push_str("  { name = \"ts\", type = \"timestamp\" },\n]\n");
    text.push_str("[[aggregation]]\nname = \"rows\"\nfunction = \"count\"\n");
    let mut n = 0;
    for f in AggFunction::ALL {
        for (c, t) in cols {
            if f.output_type(Some(ColumnType::parse(t).unwrap())).is_err() {
                continue;
            }
            n += 1;
            text.push_str(&format!(
                "[[aggregation]]\nname = \"{f}_{c}\"\nfunction = \"{f}\"\ninput = \"{c}\"\n"
            ));
            if n % 2 == 0 {
                text.push_str("filter = \"b OR i > 0 OR s IN ('a', 'b')\"\n");
            }
        }
    }
    FeatureView::parse(&text, Path::new("all.toml")).unwrap()
}

pub fn synthetic(view: &FeatureView, n: usize, start: i64, span: i64) -> RecordBatch {
    let mut rng = Rng::new(99);
    let mut b = BatchBuilder::new(&view.source);
    let mut prev: Option<Vec<Value>> = None;
    for k in 0..n {
        if k % 50 == 49
            && let Some(p) = &prev
        {
            b.push(p); // a delivered-twice event: identical row, same id
            continue;
        }
        let null = |rng: &mut Rng| rng.below(8) == 0;
        let row = vec![
            Value::Str(format!("id{k}")),
            Value::Str(format!("user{}", rng.below(12))),
            if null(&mut rng) {
                Value::Null
            } else {
                Value::Int(rng.below(2_000) as i64 - 1_000)
            },
            if null(&mut rng) {
                Value::Null
            } else {
                Value::Float(rng.normal() * 1e3)
            },
            if null(&mut rng) {
                Value::Null
            } else {
                Value::Decimal(rng.below(2_000_000) as i128 - 1_000_000)
            },
            if null(&mut rng) {
                Value::Null
            } else {
                Value::Str(["a", "b", "c", "dd", ""][rng.below(5) as usize].into())
            },
            if null(&mut rng) {
                Value::Null
            } else {
                Value::Bool(rng.below(2) == 0)
            },
            if null(&mut rng) {
                Value::Null
            } else {
                Value::Timestamp(rng.below(1 << 40) as i64)
            },
            Value::Timestamp(start + rng.below(span as u64) as i64),
        ];
        b.push(&row);
        prev = Some(row);
    }
    b.finish().unwrap()
}

/// Float results agree within 1e-9 relative (the documented bound; NaN equals NaN).
pub fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
