//! End-to-end speed-layer benchmark against the local AWS emulators: Kinesis (kinesis-mock) →
//! `lambda-speed` consumer → DynamoDB (DynamoDB Local).
//!
//! Run: `scripts/bench-speed.sh [EVENTS] [SHARDS]` (starts and stops the emulators), or with the
//! emulators' environment loaded: `cargo run --release -p lambda-speed --example e2e -- 50000 4`.
//!
//! * backlog (default): fills a stream with generated events first (kinesis-mock is slow to
//!   accept them), then times the consumer draining it with the default 1-second flush:
//!   records/s end to end and the freshness of each read (from reading a record to its tile
//!   being acknowledged by DynamoDB);
//! * `live RATE` (third and fourth arguments): the consumer runs while a producer puts RATE
//!   records/s; freshness is then what serving sees in steady state.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use lambda_core::FeatureView;
use lambda_speed::consumer::{ConsumerConfig, Metrics, run_all};
use lambda_speed::kinesis::{KinesisConfig, KinesisSource};
use lambda_store::dynamo::{DynamoConfig, DynamoStore};

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        eprintln!("{var} is not set: run scripts/bench-speed.sh (it starts the emulators)");
        std::process::exit(2)
    })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let events: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let shards: i32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let view = Arc::new(
        FeatureView::load(format!(
            "{}{}",
            manifest_dir(),
            "/../../examples/fraud/features.toml"
        ))
        .expect("fraud view"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = lambda_gen::GenConfig {
        events,
        days: 1,
        ..lambda_gen::GenConfig::default()
    };
    lambda_gen::generate(&cfg, dir.path(), |_| {}).expect("generate");
    let text = std::fs::read(dir.path().join("stream/events.jsonl")).expect("stream");
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let live: Option<u64> = (args.get(2).map(String::as_str) == Some("live"))
        .then(|| args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1_000));
    let stream = format!("bench-{}", std::process::id());
    let source = KinesisSource::connect(&KinesisConfig {
        stream: stream.clone(),
        region: "us-east-1".into(),
        endpoint: Some(env("LAMBDA_TEST_KINESIS_ENDPOINT")),
        static_credentials: Some(("test".into(), "test".into())),
    })
    .await;
    let k = source.client().clone();
    k.create_stream()
        .stream_name(&stream)
        .shard_count(shards)
        .send()
        .await
        .expect("create stream");
    loop {
        let s = k
            .describe_stream_summary()
            .stream_name(&stream)
            .send()
            .await
            .expect("describe");
        if s.stream_description_summary().map(|d| d.stream_status()) == Some(&StreamStatus::Active)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(rate) = live {
        return live_run(view, source, &lines, &stream, shards, rate, dir.path()).await;
    }
    let started = Instant::now();
    let mut puts = tokio::task::JoinSet::new();
    for chunk in lines.chunks(500) {
        let entries = entries(chunk);
        let (k, stream) = (k.clone(), stream.clone());
        puts.spawn(async move {
            k.put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
        });
        while puts.len() >= 8 {
            puts.join_next()
                .await
                .expect("task")
                .expect("join")
                .expect("put");
        }
    }
    while let Some(r) = puts.join_next().await {
        r.expect("join").expect("put");
    }
    eprintln!(
        "filled the stream with {} records in {:.1} s",
        lines.len(),
        started.elapsed().as_secs_f64()
    );
    let store = bench_table(&stream).await;
    let metrics = Arc::new(Metrics::default());
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    run_all(
        view,
        Arc::new(source),
        store.clone(),
        Arc::new(ConsumerConfig {
            exit_at_end: true,
            tile_ttl_ms: 3650 * lambda_core::time::DAY_MS,
            dead_letter_dir: dir.path().join("dead"),
            late_dir: dir.path().join("late"),
            ..ConsumerConfig::default()
        }),
        metrics.clone(),
        stop,
    )
    .await
    .expect("consume");
    let secs = t.elapsed().as_secs_f64();
    let n = metrics.records_in.load(Ordering::Relaxed);
    println!(
        "kinesis-mock ({shards} shards) -> lambda-speed -> DynamoDB Local: {n} records in {secs:.1} s = {:.0} records/s; {} tile writes; freshness p50 {} ms, p99 {} ms, max {} ms",
        n as f64 / secs,
        metrics.items_written.load(Ordering::Relaxed),
        metrics.freshness_percentile(50.0).unwrap_or(0),
        metrics.freshness_percentile(99.0).unwrap_or(0),
        metrics.freshness_ms_max.load(Ordering::Relaxed),
    );
    store.delete_table().await.expect("delete table");
    let _ = k.delete_stream().stream_name(&stream).send().await;
}

fn entries(chunk: &[&[u8]]) -> Vec<PutRecordsRequestEntry> {
    chunk
        .iter()
        .map(|l| {
            let t = String::from_utf8_lossy(l);
            let key = t
                .split("\"user_id\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("x")
                .to_string();
            PutRecordsRequestEntry::builder()
                .data(Blob::new(l.to_vec()))
                .partition_key(key)
                .build()
                .expect("entry")
        })
        .collect()
}

/// The consumer follows the stream while a producer puts `rate` records/s.
async fn live_run(
    view: Arc<FeatureView>,
    source: KinesisSource,
    lines: &[&[u8]],
    stream: &str,
    shards: i32,
    rate: u64,
    dir: &std::path::Path,
) {
    let k = source.client().clone();
    let store = bench_table(stream).await;
    let metrics = Arc::new(Metrics::default());
    let (tx, stop) = tokio::sync::watch::channel(false);
    let consumer = tokio::spawn(run_all(
        view,
        Arc::new(source),
        store.clone(),
        Arc::new(ConsumerConfig {
            tile_ttl_ms: 3650 * lambda_core::time::DAY_MS,
            dead_letter_dir: dir.join("dead"),
            late_dir: dir.join("late"),
            ..ConsumerConfig::default()
        }),
        metrics.clone(),
        stop,
    ));
    // Put `rate` records per second in 10 slices of 100 ms.
    let per_slice = (rate / 10).max(1) as usize;
    let t = Instant::now();
    let mut next = Instant::now();
    for chunk in lines.chunks(per_slice) {
        k.put_records()
            .stream_name(stream)
            .set_records(Some(entries(chunk)))
            .send()
            .await
            .expect("put");
        next += Duration::from_millis(100);
        tokio::time::sleep_until(next.into()).await;
    }
    let put_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.send(true).expect("stop");
    consumer.await.expect("join").expect("consume");
    let n = metrics.records_in.load(Ordering::Relaxed);
    println!(
        "live: producer {:.0} records/s for {put_secs:.0} s into {shards} shards; consumer read {n}; freshness p50 {} ms, p99 {} ms, max {} ms",
        n as f64 / put_secs,
        metrics.freshness_percentile(50.0).unwrap_or(0),
        metrics.freshness_percentile(99.0).unwrap_or(0),
        metrics.freshness_ms_max.load(Ordering::Relaxed),
    );
    store.delete_table().await.expect("delete table");
    let _ = k.delete_stream().stream_name(stream).send().await;
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

/// The benchmark's table on DynamoDB Local, created (named after the stream).
async fn bench_table(stream: &str) -> Arc<DynamoStore> {
    let mut dcfg = DynamoConfig::new(format!("bench-{stream}"), "us-east-1");
    dcfg.endpoint = Some(env("LAMBDA_TEST_DYNAMODB_ENDPOINT"));
    dcfg.static_credentials = Some(("test".into(), "test".into()));
    let store = Arc::new(DynamoStore::connect(dcfg).await);
    store.create_table().await.expect("table");
    store
}
