//! Decode + aggregate throughput for the fraud view on one core.
//!
//! Run: `cargo bench -p lambda-core --bench decode_aggregate` (or `make bench`).
//! Each iteration decodes 100 000 JSON events (the generator's format: string and number
//! amounts, RFC 3339 and epoch-millisecond timestamps, NULL merchants) and applies them to the
//! per-(entity, 5-minute tile) states of all 7 fraud aggregations, as the speed layer does.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lambda_core::agg::{AggState, FastHash, empty_states, update_all};
use lambda_core::time::tile_start;
use lambda_core::{EventDecoder, FeatureView, Value};

/// `n` JSON events, 4 per second, users drawn uniformly from 10 000 (`zipf == false`: nearly every
/// event opens a new (user, tile) state, the worst case) or Zipf-skewed (s = 1.1) over n/100 users
/// as `lambda-gen` draws them.
fn lines(n: usize, zipf: bool) -> Vec<String> {
    let users = (n / 100).max(1_000);
    let mut cdf: Vec<f64> = (1..=users).map(|k| 1.0 / (k as f64).powf(1.1)).collect();
    let total: f64 = cdf.iter().sum();
    let mut acc = 0.0;
    for c in cdf.iter_mut() {
        acc += *c / total;
        *c = acc;
    }
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let r = next();
            let ts = 1_767_000_000_000i64 + i as i64 * 250;
            let amount = if r % 4 == 0 { format!("{}.{:02}", r % 5000, r % 100) } else { format!("\"{}.{:02}\"", r % 5000, r % 100) };
            let merchant = if r % 50 == 0 { "null".to_string() } else { format!("\"m{:05}\"", (r >> 8) % 5000) };
            let kind = ["purchase", "purchase", "purchase", "view"][(r >> 20) as usize % 4];
            let ts_text = if r % 10 == 0 { ts.to_string() } else { format!("\"{}\"", lambda_core::time::format_ts(ts)) };
            format!(
                "{{\"event_id\":\"e{i:012}\",\"user_id\":\"u{:07}\",\"merchant_id\":{merchant},\"product_id\":\"p{:06}\",\"event_type\":\"{kind}\",\"amount\":{amount},\"card_present\":true,\"ts\":{ts_text}}}",
                if zipf {
                    cdf.partition_point(|&c| c < (r >> 11) as f64 / (1u64 << 53) as f64) as u64
                } else {
                    (r >> 32) % 10_000
                },
                (r >> 40) % 20_000
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let view =
        FeatureView::load(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
            .expect("example view");
    for (label, zipf) in [("uniform_users", false), ("zipf_users", true)] {
        bench_input(c, &view, label, &lines(100_000, zipf));
    }
}

fn bench_input(c: &mut Criterion, view: &FeatureView, label: &str, input: &[String]) {
    let aggs = view.aggs();
    let dec = EventDecoder::new(&view.source);
    let (e, t, id) = (
        view.source.entity,
        view.source.event_time,
        view.source.event_id,
    );
    let tile = view.speed.tile;

    let mut g = c.benchmark_group(format!("fraud_view/{label}"));
    g.throughput(Throughput::Elements(input.len() as u64));
    g.sample_size(20);
    g.bench_function("decode", |b| {
        let mut row = Vec::new();
        b.iter(|| {
            for l in input {
                dec.decode_into(l.as_bytes(), &mut row).expect("valid");
                black_box(&row);
            }
        })
    });
    g.bench_function("decode+aggregate", |b| {
        let mut row = Vec::new();
        b.iter(|| {
            // Entities are interned to dense ids (looked up by &str, no allocation), tiles keyed by
            // (entity id, tile start): the layout the speed layer uses.
            let mut entities: HashMap<Box<str>, u32, FastHash> = HashMap::default();
            let mut tiles: HashMap<(u32, i64), Vec<AggState>, FastHash> = HashMap::default();
            for l in input {
                dec.decode_into(l.as_bytes(), &mut row).expect("valid");
                let (Value::Str(entity), Value::Timestamp(ts), Value::Str(event_id)) =
                    (&row[e], &row[t], &row[id])
                else {
                    unreachable!()
                };
                let key_tile = tile_start(*ts, tile);
                let next = entities.len() as u32;
                let eid = match entities.get(entity.as_str()) {
                    Some(id) => *id,
                    None => *entities.entry(entity.as_str().into()).or_insert(next),
                };
                let states = tiles
                    .entry((eid, key_tile))
                    .or_insert_with(|| empty_states(&aggs));
                update_all(&aggs, states, &row, *ts, event_id);
            }
            black_box(tiles.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
