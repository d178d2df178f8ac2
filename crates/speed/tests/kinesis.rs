//! The speed layer against the local AWS emulators started by `make test` (kinesis-mock and
//! DynamoDB Local): a 2-shard stream read into DynamoDB gives the tiles of an independent
//! computation, also when a shard is split mid-stream (the children are read after the parent).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use lambda_core::agg::{empty_states, encode_states, update_all};
use lambda_core::decode::EventDecoder;
use lambda_core::time::tile_start;
use lambda_core::{FeatureView, Value};
use lambda_gen::{GenConfig, generate};
use lambda_speed::consumer::{ConsumerConfig, Metrics, run_all};
use lambda_speed::kinesis::{KinesisConfig, KinesisSource};
use lambda_speed::source::Source;
use lambda_speed::tiler::decode_tile;
use lambda_store::OnlineStore;
use lambda_store::dynamo::{DynamoConfig, DynamoStore};

const USERS: u32 = 30;

fn endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `make test` (it starts the local AWS emulators)")
    })
}

fn view() -> FeatureView {
    FeatureView::load(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
        .unwrap()
}

/// Generated lines (duplicates, out-of-order, malformed; nothing beyond the allowed lateness, so
/// per-shard watermarks do not matter).
fn lines(dir: &Path) -> Vec<Vec<u8>> {
    let cfg = GenConfig {
        events: 2_500,
        days: 1,
        users: USERS,
        seed: 21,
        duplicate_fraction: 0.03,
        late_fraction: 0.0,
        malformed_fraction: 0.005,
        ..GenConfig::default()
    };
    generate(&cfg, dir, |_| {}).unwrap();
    std::fs::read(dir.join("stream/events.jsonl"))
        .unwrap()
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

async fn wait_active(source: &KinesisSource, stream: &str) {
    for _ in 0..100 {
        let s = source
            .client()
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .unwrap();
        if s.stream_description_summary().map(|d| d.stream_status()) == Some(&StreamStatus::Active)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stream {stream} never became active");
}

/// Puts records with the user id as partition key (so an entity stays on one shard).
async fn put(source: &KinesisSource, stream: &str, lines: &[Vec<u8>]) {
    for chunk in lines.chunks(250) {
        let entries: Vec<PutRecordsRequestEntry> = chunk
            .iter()
            .map(|l| {
                let text = String::from_utf8_lossy(l);
                let key = text
                    .split("\"user_id\":\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("malformed")
                    .to_string();
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(l.clone()))
                    .partition_key(key)
                    .build()
                    .unwrap()
            })
            .collect();
        let out = source
            .client()
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
            .unwrap();
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

fn expected(v: &FeatureView, lines: &[Vec<u8>]) -> HashMap<(String, i64), Vec<u8>> {
    let aggs = v.aggs();
    let dec = EventDecoder::new(&v.source);
    let (mut want, mut seen) = (HashMap::new(), HashSet::new());
    for l in lines {
        let Ok(row) = dec.decode(l) else { continue };
        let (Value::Str(e), Value::Timestamp(t), Value::Str(id)) = (&row[1], &row[7], &row[0])
        else {
            panic!()
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        let s = want
            .entry((e.clone(), tile_start(*t, v.speed.tile)))
            .or_insert_with(|| empty_states(&aggs));
        update_all(&aggs, s, &row, *t, id);
    }
    want.into_iter()
        .map(|(k, s)| (k, encode_states(&aggs, &s)))
        .collect()
}

/// Every tile item in the table merged per (entity, tile) across shards, and the shards seen.
async fn stored(
    store: &dyn OnlineStore,
    v: &FeatureView,
) -> (HashMap<(String, i64), Vec<u8>>, HashSet<String>) {
    let aggs = v.aggs();
    let mut out: HashMap<(String, i64), Vec<lambda_core::AggState>> = HashMap::new();
    let mut shards = HashSet::new();
    for u in 0..USERS {
        let e = format!("u{u:07}");
        let pk = lambda_store::ItemKey::partition(&v.name, &e);
        for item in store.query(&pk, "tile#", "tile#~").await.unwrap() {
            let mut parts = item.key.sk.split('#').skip(1);
            let start: i64 = parts.next().unwrap().parse().unwrap();
            shards.insert(parts.next().unwrap().to_string());
            let (states, _) = decode_tile(&aggs, &item.data).unwrap();
            match out.get_mut(&(e.clone(), start)) {
                Some(s) => lambda_core::agg::merge_all(&aggs, s, &states),
                None => {
                    out.insert((e.clone(), start), states);
                }
            }
        }
    }
    (
        out.into_iter()
            .map(|(k, s)| (k, encode_states(&aggs, &s)))
            .collect(),
        shards,
    )
}

async fn consume(source: KinesisSource, store: Arc<DynamoStore>, dir: &Path) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::default());
    let (_tx, stop) = tokio::sync::watch::channel(false);
    run_all(
        Arc::new(view()),
        Arc::new(source),
        store,
        Arc::new(ConsumerConfig {
            exit_at_end: true,
            batch_size: 400,
            tile_ttl_ms: 3650 * lambda_core::time::DAY_MS,
            dead_letter_dir: dir.join("dead"),
            late_dir: dir.join("late"),
            flush_interval: Duration::from_millis(50),
            ..ConsumerConfig::default()
        }),
        metrics.clone(),
        stop,
    )
    .await
    .unwrap();
    metrics
}

async fn setup(name: &str, shards: i32) -> (KinesisSource, Arc<DynamoStore>) {
    let stream = format!("{name}-{}", std::process::id());
    let source = KinesisSource::connect(&KinesisConfig {
        stream: stream.clone(),
        region: "us-east-1".into(),
        endpoint: Some(endpoint("LAMBDA_TEST_KINESIS_ENDPOINT")),
        static_credentials: Some(("test".into(), "test".into())),
    })
    .await;
    source
        .client()
        .create_stream()
        .stream_name(&stream)
        .shard_count(shards)
        .send()
        .await
        .unwrap();
    wait_active(&source, &stream).await;
    let mut cfg = DynamoConfig::new(format!("lambda-speed-{stream}"), "us-east-1");
    cfg.endpoint = Some(endpoint("LAMBDA_TEST_DYNAMODB_ENDPOINT"));
    cfg.static_credentials = Some(("test".into(), "test".into()));
    let store = DynamoStore::connect(cfg).await;
    store.create_table().await.unwrap();
    (source, Arc::new(store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_to_dynamodb_tiles_match_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let lines = lines(dir.path());
    let (source, store) = setup("lambda-speed-basic", 2).await;
    let stream = source.name().trim_start_matches("kinesis:").to_string();
    put(&source, &stream, &lines).await;
    let m = consume(source, store.clone(), dir.path()).await;
    let v = view();
    let (got, shards) = stored(store.as_ref(), &v).await;
    assert_eq!(shards.len(), 2, "{shards:?}");
    let want = expected(&v, &lines);
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        assert_eq!(got.get(k), Some(w), "{k:?}");
    }
    let dead = m.dead_lettered.load(std::sync::atomic::Ordering::Relaxed);
    assert!(dead > 0, "malformed records are dead-lettered");
    // A second run resumes from the checkpoints: nothing is applied twice.
    let (source2, _) = (
        KinesisSource::connect(&KinesisConfig {
            stream: stream.clone(),
            region: "us-east-1".into(),
            endpoint: Some(endpoint("LAMBDA_TEST_KINESIS_ENDPOINT")),
            static_credentials: Some(("test".into(), "test".into())),
        })
        .await,
        (),
    );
    let m2 = consume(source2, store.clone(), dir.path()).await;
    assert_eq!(m2.records_in.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stored(store.as_ref(), &v).await.0, got);
    store.delete_table().await.unwrap();
    drop_stream(&stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_split_mid_stream_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lines = lines(dir.path());
    let (source, store) = setup("lambda-speed-split", 1).await;
    let stream = source.name().trim_start_matches("kinesis:").to_string();
    let (first, second) = lines.split_at(lines.len() / 2);
    put(&source, &stream, first).await;
    let parent = source.shards().await.unwrap()[0].id.clone();
    source
        .client()
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(&parent)
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .unwrap();
    wait_active(&source, &stream).await;
    put(&source, &stream, second).await;
    let shards = source.shards().await.unwrap();
    assert_eq!(shards.len(), 3, "{shards:?}");
    assert!(
        shards
            .iter()
            .filter(|s| s.parents == vec![parent.clone()])
            .count()
            == 2
    );
    consume(source, store.clone(), dir.path()).await;
    let v = view();
    let (got, seen) = stored(store.as_ref(), &v).await;
    assert_eq!(
        seen.len(),
        3,
        "parent and both children hold tiles: {seen:?}"
    );
    let want = expected(&v, &lines);
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        assert_eq!(got.get(k), Some(w), "{k:?}");
    }
    store.delete_table().await.unwrap();
    drop_stream(&stream).await;
}

/// Two consumers on a 4-shard stream split the shards through leases; when one dies (its task
/// aborted: no flush, no release) the other takes its shards over after the lease expires, and
/// the tiles still equal the independent computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_split_the_shards_and_one_takes_over() {
    use lambda_speed::consumer::{LeaseConfig, run_leased};
    let dir = tempfile::tempdir().unwrap();
    let lines = lines(dir.path());
    let (source, store) = setup("lambda-speed-leases", 4).await;
    let stream = source.name().trim_start_matches("kinesis:").to_string();
    let (first, second) = lines.split_at(lines.len() / 2);
    put(&source, &stream, first).await;
    let producer = source.clone();
    let source: Arc<dyn Source> = Arc::new(source);
    let config = Arc::new(ConsumerConfig {
        batch_size: 300,
        tile_ttl_ms: 3650 * lambda_core::time::DAY_MS,
        dead_letter_dir: dir.path().join("dead"),
        late_dir: dir.path().join("late"),
        flush_interval: Duration::from_millis(50),
        poll_interval: Duration::from_millis(100),
        ..ConsumerConfig::default()
    });
    let worker = |name: &str| {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(run_leased(
            Arc::new(view()),
            source.clone(),
            store.clone(),
            store.clone(),
            config.clone(),
            Arc::new(Metrics::default()),
            LeaseConfig {
                worker: name.to_string(),
                lease_ms: 3_000,
                every: Duration::from_millis(300),
            },
            rx,
        ));
        (tx, task)
    };
    let holders = || async {
        let mut out = HashMap::new();
        for s in source.shards().await.unwrap() {
            let key = lambda_store::ItemKey::new(
                format!("lease#fraud_user#{}", source.name()),
                s.id.clone(),
            );
            if let Some((owner, _)) = lambda_store::lease::holder(store.as_ref(), &key)
                .await
                .unwrap()
            {
                *out.entry(owner).or_insert(0) += 1;
            }
        }
        out
    };
    let (_stop_a, a) = worker("worker-a");
    let (stop_b, b) = worker("worker-b");
    let mut split = HashMap::new();
    for _ in 0..100 {
        split = holders().await;
        if split.get("worker-a") == Some(&2) && split.get("worker-b") == Some(&2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if a.is_finished() || b.is_finished() {
        panic!("a worker stopped: {:?} {:?}", a.await, b.await);
    }
    assert_eq!(split.get("worker-a"), Some(&2), "{split:?}");
    assert_eq!(split.get("worker-b"), Some(&2), "{split:?}");
    // A third worker joins: the shares even out (at most one apart, all 4 held).
    let (stop_c, c) = worker("worker-c");
    let balanced = |m: &HashMap<String, i32>| {
        let counts: Vec<i32> = ["worker-a", "worker-b", "worker-c"]
            .iter()
            .map(|w| m.get(*w).copied().unwrap_or(0))
            .collect();
        counts.iter().sum::<i32>() == 4
            && counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1
    };
    for _ in 0..150 {
        split = holders().await;
        if balanced(&split) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(balanced(&split), "{split:?}");
    stop_c.send(true).unwrap();
    c.await.unwrap().unwrap();
    // Worker A dies.
    a.abort();
    let _ = a.await;
    put(&producer, &stream, second).await;
    let v = view();
    let want = expected(&v, &lines);
    let mut got = HashMap::new();
    for _ in 0..300 {
        got = stored(store.as_ref(), &v).await.0;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        holders().await.get("worker-b"),
        Some(&4),
        "B took every shard"
    );
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        assert_eq!(got.get(k), Some(w), "{k:?}");
    }
    // B stops cleanly: leases given back.
    stop_b.send(true).unwrap();
    b.await.unwrap().unwrap();
    assert!(holders().await.is_empty());
    store.delete_table().await.unwrap();
    drop_stream(&stream).await;
}

/// A throttled table (DynamoDB Local behind the fault-injecting proxy: the first 300 PutItem
/// requests, then every third, are throttled beyond the SDK's retries) slows the consumer down
/// but loses nothing: the tiles equal the independent computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_table_loses_nothing() {
    use lambda_store::chaos::{Action, FaultProxy};
    let dir = tempfile::tempdir().unwrap();
    let lines = lines(dir.path());
    let (source, direct) = setup("lambda-speed-throttle", 2).await;
    let stream = source.name().trim_start_matches("kinesis:").to_string();
    put(&source, &stream, &lines).await;
    let proxy = FaultProxy::start(
        &endpoint("LAMBDA_TEST_DYNAMODB_ENDPOINT"),
        Arc::new(|op: &str, n: u64| match op {
            "PutItem" if n < 300 || n.is_multiple_of(3) => Action::Throttle,
            _ => Action::Forward,
        }),
    )
    .await
    .unwrap();
    let mut cfg = DynamoConfig::new(format!("lambda-speed-{stream}"), "us-east-1");
    cfg.endpoint = Some(proxy.endpoint.clone());
    cfg.static_credentials = Some(("test".into(), "test".into()));
    cfg.base_backoff = Duration::from_millis(2);
    cfg.max_attempts = 2;
    let throttled = Arc::new(DynamoStore::connect(cfg).await);
    let m = consume(source, throttled, dir.path()).await;
    assert!(
        proxy
            .counters
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 300
    );
    assert!(m.store_retries.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let v = view();
    let (got, _) = stored(direct.as_ref(), &v).await;
    let want = expected(&v, &lines);
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        assert_eq!(got.get(k), Some(w), "{k:?}");
    }
    direct.delete_table().await.unwrap();
    drop_stream(&stream).await;
}

async fn drop_stream(stream: &str) {
    let s = KinesisSource::connect(&KinesisConfig {
        stream: stream.to_string(),
        region: "us-east-1".into(),
        endpoint: Some(endpoint("LAMBDA_TEST_KINESIS_ENDPOINT")),
        static_credentials: Some(("test".into(), "test".into())),
    })
    .await;
    s.client()
        .delete_stream()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
}

/// kill -9 of `lambda-speed run --source kinesis://…` at random moments, restarted each time
/// (two runs, each into a fresh table): DynamoDB ends with exactly the tiles of the independent
/// computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_on_kinesis_and_dynamodb() {
    let dir = tempfile::tempdir().unwrap();
    let lines = lines(dir.path());
    let (source, store) = setup("lambda-speed-kill", 2).await;
    let stream = source.name().trim_start_matches("kinesis:").to_string();
    put(&source, &stream, &lines).await;
    let run = |table: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lambda-speed"))
            .arg("run")
            .arg("--view")
            .arg(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
            .arg("--source")
            .arg(format!("kinesis://{stream}"))
            .arg("--store")
            .arg(format!("dynamodb://{table}"))
            .arg("--dead-letter-dir")
            .arg(dir.path().join("dead"))
            .arg("--late-dir")
            .arg(dir.path().join("late"))
            .args([
                "--exit-at-end",
                "--tile-ttl",
                "3650d",
                "--flush-interval",
                "20ms",
            ])
            .args(["--batch-size", "100"])
            .env(
                "AWS_ENDPOINT_URL_KINESIS",
                endpoint("LAMBDA_TEST_KINESIS_ENDPOINT"),
            )
            .env(
                "AWS_ENDPOINT_URL_DYNAMODB",
                endpoint("LAMBDA_TEST_DYNAMODB_ENDPOINT"),
            )
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rng = 0x1234_u64;
    let v = view();
    let want = expected(&v, &lines);
    let mut tables = vec![store];
    let mut total_kills = 0;
    for round in 0..2 {
        if round > 0 {
            let mut cfg = DynamoConfig::new(format!("lambda-speed-{stream}-{round}"), "us-east-1");
            cfg.endpoint = Some(endpoint("LAMBDA_TEST_DYNAMODB_ENDPOINT"));
            cfg.static_credentials = Some(("test".into(), "test".into()));
            let t = DynamoStore::connect(cfg).await;
            t.create_table().await.unwrap();
            tables.push(Arc::new(t));
        }
        let table = if round == 0 {
            format!("lambda-speed-{stream}")
        } else {
            format!("lambda-speed-{stream}-{round}")
        };
        let store = tables[round].clone();
        let mut kills = 0;
        loop {
            let mut child = run(&table);
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // A random moment, later with every kill: a slow machine (cold emulators) still
            // lets a run get far enough to finish, after as many kills as it takes.
            std::thread::sleep(Duration::from_millis(80 + (rng >> 33) % 300 + 40 * kills));
            match child.try_wait().unwrap() {
                Some(status) => {
                    assert!(status.success(), "{status}");
                    break;
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    kills += 1;
                }
            }
            assert!(kills < 60, "never finished");
        }
        assert!(kills >= 1, "the schedule must actually kill ({kills})");
        total_kills += kills;
        let (got, _) = stored(store.as_ref(), &v).await;
        assert_eq!(got.len(), want.len(), "round {round}: {kills} kills");
        for (k, w) in &want {
            assert_eq!(
                got.get(k),
                Some(w),
                "round {round}: {k:?} after {kills} kills"
            );
        }
    }
    assert!(total_kills >= 3, "{total_kills} kills");
    for t in tables {
        t.delete_table().await.unwrap();
    }
    drop_stream(&stream).await;
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
