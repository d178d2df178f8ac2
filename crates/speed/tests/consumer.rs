//! The speed layer on the embedded default: tiles equal an independent computation over the same
//! events (duplicates, out-of-order, late and malformed records included), and kill -9 at random
//! moments plus restarts end in exactly the store of an uninterrupted run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lambda_core::agg::{empty_states, encode_states, update_all};
use lambda_core::decode::EventDecoder;
use lambda_core::time::{is_late, tile_start, watermark};
use lambda_core::{FeatureView, Value};
use lambda_gen::{GenConfig, generate};
use lambda_speed::consumer::{ConsumerConfig, Metrics, run_all};
use lambda_speed::source::FileSource;
use lambda_speed::tiler::decode_tile;
use lambda_store::embedded::EmbeddedStore;
use lambda_store::{Item, OnlineStore};

const USERS: u32 = 40;

fn view() -> FeatureView {
    FeatureView::load(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
        .unwrap()
}

/// A small stream with every kind of trouble, at a high rate of each.
fn stream(dir: &Path, seed: u64) -> PathBuf {
    stream_of(dir, seed, 6_000)
}

fn stream_of(dir: &Path, seed: u64, events: u64) -> PathBuf {
    let cfg = GenConfig {
        events,
        days: 2,
        users: USERS,
        seed,
        duplicate_fraction: 0.03,
        out_of_order_fraction: 0.05,
        late_fraction: 0.01,
        malformed_fraction: 0.01,
        ..GenConfig::default()
    };
    generate(&cfg, dir, |_| {}).unwrap();
    dir.join("stream/events.jsonl")
}

/// Every live tile item, per entity.
async fn tiles(store: &dyn OnlineStore, view: &FeatureView) -> BTreeMap<String, Vec<Item>> {
    let mut out = BTreeMap::new();
    for u in 0..USERS {
        let e = format!("u{u:07}");
        let items = store
            .query(
                &lambda_store::ItemKey::partition(&view.name, &e),
                "tile#",
                "tile#~",
            )
            .await
            .unwrap();
        if !items.is_empty() {
            out.insert(e, items);
        }
    }
    out
}

fn config(dir: &Path) -> ConsumerConfig {
    ConsumerConfig {
        exit_at_end: true,
        batch_size: 700,
        tile_ttl_ms: 3650 * lambda_core::time::DAY_MS,
        dead_letter_dir: dir.join("dead"),
        late_dir: dir.join("late"),
        ..ConsumerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiles_match_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let file = stream(dir.path(), 5);
    let v = view();
    let store = Arc::new(EmbeddedStore::open(dir.path().join("s.redb")).unwrap());
    let metrics = Arc::new(Metrics::default());
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    run_all(
        Arc::new(v.clone()),
        Arc::new(FileSource::new(&file)),
        store.clone(),
        Arc::new(config(dir.path())),
        metrics.clone(),
        stop,
    )
    .await
    .unwrap();

    // Independently: arrival order, first delivery of an id wins, an event is late when it is
    // behind the highest event time seen before it by more than out-of-orderness + lateness.
    let aggs = v.aggs();
    let dec = EventDecoder::new(&v.source);
    let text = std::fs::read(&file).unwrap();
    let (mut want, mut seen) = (HashMap::new(), HashSet::new());
    let (mut max_t, mut bad, mut late, mut dups) = (i64::MIN, 0u64, 0u64, 0u64);
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(row) = dec.decode(line) else {
            bad += 1;
            continue;
        };
        let (Value::Str(e), Value::Timestamp(t), Value::Str(id)) = (&row[1], &row[7], &row[0])
        else {
            panic!("{row:?}")
        };
        let wm = if max_t == i64::MIN {
            i64::MIN
        } else {
            watermark(max_t, v.speed.out_of_orderness)
        };
        if is_late(*t, wm, v.speed.allowed_lateness) {
            late += 1;
            continue;
        }
        max_t = max_t.max(*t);
        if !seen.insert(id.clone()) {
            dups += 1;
            continue;
        }
        let states = want
            .entry((e.clone(), tile_start(*t, v.speed.tile)))
            .or_insert_with(|| empty_states(&aggs));
        update_all(&aggs, states, &row, *t, id);
    }
    assert!(bad > 30 && late > 30 && dups > 100, "{bad} {late} {dups}");
    let m = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(m(&metrics.dead_lettered), bad);
    assert_eq!(m(&metrics.late), late);
    assert_eq!(m(&metrics.duplicates), dups);
    let got = tiles(store.as_ref(), &v).await;
    let mut n = 0;
    for (e, items) in &got {
        for item in items {
            let start: i64 = item.key.sk.split('#').nth(1).unwrap().parse().unwrap();
            let (states, _) = decode_tile(&aggs, &item.data).unwrap();
            let expected = want
                .remove(&(e.clone(), start))
                .unwrap_or_else(|| panic!("unexpected tile {e} {start}"));
            assert_eq!(
                encode_states(&aggs, &states),
                encode_states(&aggs, &expected),
                "{e} tile {start}"
            );
            n += 1;
        }
    }
    assert!(want.is_empty(), "{} tiles missing", want.len());
    assert!(n > 1000, "{n}");
    // Nothing lost: dead letters name the reason, late events are Parquet in the history layout.
    let dead = std::fs::read_to_string(dir.path().join("dead/events.jsonl.jsonl")).unwrap();
    assert_eq!(dead.lines().count() as u64, bad);
    assert!(dead.lines().all(|l| l.contains("\"reason\"")));
    let mut late_rows = 0;
    for day in std::fs::read_dir(dir.path().join("late")).unwrap() {
        let day = day.unwrap().path();
        assert!(
            day.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("date=")
        );
        for f in std::fs::read_dir(&day).unwrap() {
            let f = std::fs::File::open(f.unwrap().path()).unwrap();
            let r = parquet::file::reader::SerializedFileReader::new(f).unwrap();
            late_rows += parquet::file::reader::FileReader::metadata(&r)
                .file_metadata()
                .num_rows() as u64;
        }
    }
    assert_eq!(late_rows, late);
}

/// A tiny deterministic PRNG (SplitMix64) for the kill schedule.
fn next(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn consumer(file: &Path, store: &Path, dir: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-speed"));
    c.arg("run")
        .arg("--view")
        .arg(Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"))
        .arg("--source")
        .arg(file)
        .arg("--store")
        .arg(store)
        .arg("--dead-letter-dir")
        .arg(dir.join("dead"))
        .arg("--late-dir")
        .arg(dir.join("late"))
        .args([
            "--exit-at-end",
            "--tile-ttl",
            "3650d",
            "--flush-interval",
            "5ms",
            "--batch-size",
            "150",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// kill -9 at random moments (several runs, different schedules), restart each time: the store
/// ends with exactly the tiles (states, ids and guards) of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_end_in_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let file = stream_of(dir.path(), 9, 15_000);
    let v = view();
    let clean_path = dir.path().join("clean.redb");
    assert!(
        consumer(&file, &clean_path, &dir.path().join("c"))
            .status()
            .unwrap()
            .success()
    );
    let clean = tiles(&EmbeddedStore::open(&clean_path).unwrap(), &v).await;
    assert!(clean.values().map(Vec::len).sum::<usize>() > 1000);
    let mut rng = 0x5eed_u64;
    let mut total_kills = 0;
    for round in 0..3 {
        let path = dir.path().join(format!("killed-{round}.redb"));
        let mut kills = 0;
        loop {
            let mut child = consumer(&file, &path, &dir.path().join(format!("k{round}")))
                .spawn()
                .unwrap();
            let wait_ms = 10 + next(&mut rng) % 150;
            std::thread::sleep(std::time::Duration::from_millis(wait_ms));
            match child.try_wait().unwrap() {
                Some(status) => {
                    assert!(status.success(), "round {round}: {status}");
                    break;
                }
                None => {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                }
            }
            assert!(kills < 200, "never finished");
        }
        total_kills += kills;
        let got = tiles(&EmbeddedStore::open(&path).unwrap(), &v).await;
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            clean.keys().collect::<Vec<_>>(),
            "round {round}"
        );
        for (e, items) in &clean {
            let diff = items
                .iter()
                .zip(&got[e])
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("{} (guard {:?} vs {:?})", a.key, a.guard, b.guard));
            assert!(
                diff.is_none() && items.len() == got[e].len(),
                "round {round} ({kills} kills): entity {e}: {} vs {} tiles, first difference {diff:?}",
                items.len(),
                got[e].len()
            );
        }
    }
    eprintln!("kills: {total_kills}");
    assert!(
        total_kills >= 10,
        "the schedule must actually kill ({total_kills})"
    );
}

/// SIGTERM: the consumer stops reading, flushes, checkpoints the end of what it read, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_checkpoints_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = stream(dir.path(), 3);
    let path = dir.path().join("s.redb");
    let cmd = consumer(&file, &path, dir.path());
    let args: Vec<_> = cmd
        .get_args()
        .filter(|a| *a != "--exit-at-end")
        .map(|a| a.to_owned())
        .collect();
    let mut follow = std::process::Command::new(cmd.get_program());
    follow
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    follow
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"));
    let mut child = follow.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "it follows the file");
    // Prometheus metrics while it runs.
    let body = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let records: u64 = body
        .lines()
        .find(|l| l.starts_with("lambda_speed_records_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{body}"));
    assert!(records > 6_000, "{body}");
    assert!(body.contains("lambda_speed_freshness_p99_ms{view=\"fraud_user\"}"));
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = status.expect("exits within 5 s of SIGTERM");
    assert!(status.success(), "{status}");
    let store = EmbeddedStore::open(&path).unwrap();
    let source = FileSource::new(&file);
    let key = lambda_speed::consumer::checkpoint_key(
        "fraud_user",
        &lambda_speed::source::Source::name(&source),
        file.file_name().unwrap().to_str().unwrap(),
    );
    let (cp, _) = lambda_speed::consumer::load_checkpoint(&store, &key)
        .await
        .unwrap();
    assert_eq!(
        cp.position,
        Some(std::fs::metadata(&file).unwrap().len().to_string()),
        "everything read is checkpointed"
    );
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
