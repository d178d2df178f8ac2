//! Speed-layer throughput on one core: decode + dedup + tiling + state update, per record, and
//! a flush (encode changed tiles, evict final ones) every 10 000 records, as `lambda-speed` does
//! it (the `Tiler`, without the store).
//!
//! Run: `cargo bench -p lambda-speed --bench tiler` (or `make bench`). Input: 200 000 records
//! from `lambda-gen` (Zipf users, 0.5 % duplicates, out-of-order and late events, malformed
//! lines), the fraud view's 7 aggregations.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lambda_core::{EventDecoder, FeatureView};
use lambda_speed::tiler::Tiler;

fn bench(c: &mut Criterion) {
    let view =
        FeatureView::load(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
            .expect("fraud view");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = lambda_gen::GenConfig {
        events: 200_000,
        days: 7,
        ..lambda_gen::GenConfig::default()
    };
    lambda_gen::generate(&cfg, dir.path(), |_| {}).expect("generate");
    let text = std::fs::read(dir.path().join("stream/events.jsonl")).expect("stream");
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let decoder = EventDecoder::new(&view.source);
    let mut g = c.benchmark_group("speed_path");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.sample_size(10);
    g.bench_function("decode_dedup_tile_update", |b| {
        b.iter(|| {
            let mut tiler = Tiler::new(&view, None);
            let mut row = Vec::new();
            for (seq, line) in lines.iter().enumerate() {
                if decoder.decode_into(line, &mut row).is_err() {
                    continue;
                }
                if let Ok(key) = tiler.key_of(&row) {
                    black_box(tiler.apply(
                        &key,
                        &row,
                        lambda_speed::tiler::Seq::from(seq as u128 + 1),
                    ));
                }
                // A flush as the consumer does it (about every second at 10 k records/s/shard):
                // encode the changed tiles, forget the final ones.
                if seq % 10_000 == 9_999 {
                    black_box(tiler.take_dirty().len());
                    tiler.evict_final();
                }
            }
            black_box(tiler.take_dirty().len())
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
