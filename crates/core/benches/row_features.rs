//! What the batch job does per entity on a night, on one core: finalize every feature of the
//! fraud view from an encoded batch row (LZ4 undone, then one pass per aggregation and tier), and
//! encode a row (LZ4).
//!
//! Run: `cargo bench -p lambda-core --bench row_features` (or `make bench`).
//! The rows are like the 10 M-event benchmark's active users: 2 000 entities, each with events on
//! 30 of the last 90 days (4 purchases a day from a pool of 60 merchants), and 3 hours of the
//! last day.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lambda_core::agg::{empty_states, update_all};
use lambda_core::merge::{
    FeaturePlan, Partial, RowBlobs, Tier, build_batch_row, encoded_row_features_at, row_body,
};
use lambda_core::time::DAY_MS;
use lambda_core::{FeatureView, Value};

const CUTOFF: i64 = 1_767_225_600_000; // 2026-01-01

/// The encoded rows of `n` entities.
fn rows(view: &FeatureView, n: usize) -> Vec<Vec<u8>> {
    let aggs = view.aggs();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let col = |name: &str| {
        view.source
            .columns
            .iter()
            .position(|c| c.name == name)
            .expect("fraud column")
    };
    let (merchant, kind, amount, ts) = (
        col("merchant_id"),
        col("event_type"),
        col("amount"),
        col("ts"),
    );
    let width = view.source.columns.len();
    (0..n)
        .map(|e| {
            let mut partials = Vec::new();
            let mut add = |tier: Tier, start: i64, events: usize, next: &mut dyn FnMut() -> u64| {
                let mut states = empty_states(&aggs);
                for i in 0..events {
                    let r = next();
                    let mut row = vec![Value::Null; width];
                    row[merchant] = Value::Str(format!("m{:05}", (e as u64 * 7 + r % 60) % 5000));
                    row[kind] = Value::Str("purchase".into());
                    row[amount] = Value::Decimal((r % 50_000) as i128);
                    let t = start + i as i64 * 60_000;
                    row[ts] = Value::Timestamp(t);
                    update_all(&aggs, &mut states, &row, t, &format!("e{e}-{start}-{i}"));
                }
                partials.push(Partial {
                    tier,
                    start_ms: start,
                    states,
                });
            };
            for d in 0..30 {
                add(Tier::Day, CUTOFF - (1 + d * 3) * DAY_MS, 4, &mut next);
            }
            for h in 0..3 {
                add(Tier::Hour, CUTOFF - (2 + h * 5) * 3_600_000, 2, &mut next);
            }
            build_batch_row(view, CUTOFF, &partials).encode(&aggs)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let view =
        FeatureView::load(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
            .expect("example view");
    let rows = rows(&view, 2_000);
    let plan = FeaturePlan::new(&view);
    let mut g = c.benchmark_group("fraud_view/batch_rows");
    g.throughput(Throughput::Elements(rows.len() as u64));
    g.sample_size(20);
    g.bench_function("features_from_encoded_row", |b| {
        b.iter(|| {
            for r in &rows {
                let body = row_body(r).expect("row");
                let blobs = RowBlobs::parse(&body).expect("row");
                black_box(encoded_row_features_at(&plan, &blobs, CUTOFF).expect("features"));
            }
        })
    });
    let bodies: Vec<Vec<u8>> = rows
        .iter()
        .map(|r| row_body(r).expect("row").into_owned())
        .collect();
    g.bench_function("encode_row", |b| {
        b.iter(|| {
            for body in &bodies {
                black_box(RowBlobs::parse(body).expect("row").encode());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

/// The package directory of the checkout the bench runs in.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
