//! The shared online-store suite against both implementations: the embedded redb store and
//! DynamoDB Local (started by `make test`; its endpoint comes from `LAMBDA_TEST_DYNAMODB_ENDPOINT`).

use std::sync::Arc;

use lambda_store::dynamo::{DynamoConfig, DynamoStore};
use lambda_store::embedded::EmbeddedStore;
use lambda_store::{ManualClock, OnlineStore, suite};

fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(0);
    let store =
        EmbeddedStore::open_with_clock(dir.path().join("online.redb"), clock.clone()).unwrap();
    suite::run_all(Arc::new(store), &clock, &unique("t")).await;
}

/// The emulator endpoint. Missing means the test was run outside `make test`: that is an error,
/// not a skip, so CI can never silently not test DynamoDB.
pub fn dynamodb_endpoint() -> String {
    std::env::var("LAMBDA_TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!("LAMBDA_TEST_DYNAMODB_ENDPOINT is not set: run `make test` (it starts DynamoDB Local), or `eval \"$(scripts/emulators.sh up)\"` first")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_store_passes_the_suite() {
    let mut cfg = DynamoConfig::new(unique("lambda-test"), "us-east-1");
    cfg.endpoint = Some(dynamodb_endpoint());
    cfg.static_credentials = Some(("test".into(), "test".into()));
    let clock = ManualClock::new(0);
    let store = DynamoStore::connect_with_clock(cfg, clock.clone()).await;
    store.create_table().await.unwrap();
    store.healthcheck().await.unwrap();
    suite::run_all(Arc::new(store.clone()), &clock, "t").await;
    store.delete_table().await.unwrap();
}

#[tokio::test]
async fn dynamodb_errors_name_the_table_and_operation() {
    let mut cfg = DynamoConfig::new(unique("lambda-missing"), "us-east-1");
    cfg.endpoint = Some(dynamodb_endpoint());
    cfg.static_credentials = Some(("test".into(), "test".into()));
    let store = DynamoStore::connect(cfg.clone()).await;
    let e = store.healthcheck().await.unwrap_err().to_string();
    assert!(e.contains("DescribeTable") && e.contains(&cfg.table), "{e}");
    let e = store
        .get(&lambda_store::ItemKey::batch("v", "u"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("GetItem") && e.contains("ResourceNotFoundException"),
        "{e}"
    );
}

#[tokio::test]
async fn a_dead_service_is_a_clear_error() {
    // Nothing listens on port 9 (discard) of 127.0.0.1: connection refused.
    let mut cfg = DynamoConfig::new("t", "us-east-1");
    cfg.endpoint = Some("http://127.0.0.1:9".into());
    cfg.static_credentials = Some(("test".into(), "test".into()));
    cfg.max_attempts = 2;
    let store = DynamoStore::connect(cfg).await;
    let e = store.healthcheck().await.unwrap_err().to_string();
    assert!(e.contains("DescribeTable on table `t` failed"), "{e}");
}

/// The `.seg` files of an embedded store's value segments.
fn segment_files(store: &EmbeddedStore) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.values_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

fn row(sk: &str, seed: u8) -> lambda_store::Item {
    lambda_store::Item {
        key: lambda_store::ItemKey::new("batch#v", sk),
        data: (0..2_000).map(|i| (i as u8).wrapping_add(seed)).collect(),
        guard: None,
        expires_at: None,
    }
}

async fn data_of(store: &EmbeddedStore, sk: &str) -> Option<Vec<u8>> {
    let key = lambda_store::ItemKey::new("batch#v", sk);
    store.get(&key).await.unwrap().map(|i| i.data)
}

#[tokio::test]
async fn embedded_segments_die_with_their_last_row_and_orphans_go_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("online.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let rows: Vec<_> = (0..10).map(|k| row(&format!("e{k}"), 1)).collect();
    store.batch_put(&rows).await.unwrap();
    assert_eq!(segment_files(&store).len(), 1);
    // Every row rewritten: the first segment has no live row left, so it is deleted.
    let newer: Vec<_> = (0..10).map(|k| row(&format!("e{k}"), 2)).collect();
    store.batch_put(&newer).await.unwrap();
    let files = segment_files(&store);
    assert_eq!(files.len(), 1, "{files:?}");
    // Removing the last rows one way or another kills the segment too.
    for r in &newer[..5] {
        store.delete(&r.key).await.unwrap();
    }
    let small = |sk: &str| lambda_store::Item {
        data: b"small".to_vec(),
        ..row(sk, 0)
    };
    let smalls: Vec<_> = (5..10).map(|k| small(&format!("e{k}"))).collect();
    store
        .put_each(&smalls, lambda_store::Condition::Always)
        .await
        .into_iter()
        .for_each(|r| r.unwrap());
    assert!(segment_files(&store).is_empty());
    store.batch_put(&rows).await.unwrap();
    drop(store);
    // A segment a crashed write left behind (no record refers to it) is deleted at open, and
    // new segments are numbered after it.
    let orphan = dir.path().join("online.redb.values/0000000099.seg");
    std::fs::write(&orphan, b"half a segment").unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    assert!(!orphan.exists());
    for r in &rows {
        assert_eq!(data_of(&store, &r.key.sk).await, Some(r.data.clone()));
    }
    store.batch_put(&newer[..1]).await.unwrap();
    assert!(
        segment_files(&store).contains(&"0000000100.seg".to_string()),
        "{:?}",
        segment_files(&store)
    );
}

#[tokio::test]
async fn embedded_compaction_moves_the_live_rows_of_sparse_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("online.redb"))
        .unwrap()
        .with_compact_over(0);
    // Each batch rewrites nine shared rows and adds one of its own: older segments keep one live
    // row in ten, until dead bytes outweigh live ones and they are compacted.
    let mut latest = std::collections::BTreeMap::new();
    for b in 0..6u8 {
        let mut batch: Vec<_> = (0..9).map(|k| row(&format!("shared{k}"), b)).collect();
        batch.push(row(&format!("own{b}"), 100 + b));
        store.batch_put(&batch).await.unwrap();
        for r in &batch {
            latest.insert(r.key.sk.clone(), r.data.clone());
        }
        for (sk, data) in &latest {
            assert_eq!(
                data_of(&store, sk).await.as_ref(),
                Some(data),
                "{sk} after batch {b}"
            );
        }
    }
    // Without compaction each of the six segments would still hold a live row. With it, twice
    // (after batches 2 and 4) the sparse ones were merged: four files are left.
    let files = segment_files(&store);
    assert!(files.len() <= 4, "{files:?}");
}

#[tokio::test]
async fn embedded_a_failed_segment_write_names_the_file_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("online.redb")).unwrap();
    let rows: Vec<_> = (0..10).map(|k| row(&format!("e{k}"), 1)).collect();
    store.batch_put(&rows).await.unwrap();
    // The next segment's file cannot be created (a directory of that name stands in the way).
    std::fs::create_dir(store.values_dir().join("0000000001.seg")).unwrap();
    let newer: Vec<_> = (0..10).map(|k| row(&format!("e{k}"), 2)).collect();
    let err = store.batch_put(&newer).await.unwrap_err().to_string();
    assert!(err.contains("0000000001.seg"), "{err}");
    for r in &rows {
        assert_eq!(data_of(&store, &r.key.sk).await, Some(r.data.clone()));
    }
}

/// `batch_get` reads the values of a segment in runs of neighbours: every requested key still
/// gets its own item, in request order, whatever the order, duplicates, missing keys, inline
/// values, segments, distances between values (more than a run's gap) and sizes (more than a
/// run) of the request.
#[tokio::test]
async fn embedded_batch_get_reads_runs_of_neighbours_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("online.redb")).unwrap();
    let sized = |sk: &str, seed: u8, len: usize| lambda_store::Item {
        data: (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect(),
        ..row(sk, seed)
    };
    // Segment 1: 700 rows of 2 000 bytes (more than a run), a 40 KB one (past a run's gap) and
    // a 350 KB one, then more rows; segment 2: rows written later; and small (inline) values.
    let mut first: Vec<_> = (0..700)
        .map(|k| row(&format!("a{k:03}"), k as u8))
        .collect();
    first.push(sized("b-gap", 7, 40_000));
    first.push(sized("b-huge", 9, 350_000));
    first.extend((0..50).map(|k| row(&format!("c{k:03}"), k as u8)));
    store.batch_put(&first).await.unwrap();
    let second: Vec<_> = (0..20).map(|k| row(&format!("d{k:03}"), 3)).collect();
    store.batch_put(&second).await.unwrap();
    let smalls: Vec<_> = (0..5)
        .map(|k| lambda_store::Item {
            data: vec![k; 10],
            ..row(&format!("s{k}"), 0)
        })
        .collect();
    store.batch_put(&smalls).await.unwrap();
    let all: Vec<_> = first.iter().chain(&second).chain(&smalls).collect();
    // Every other row, backwards, with a repeat and keys that do not exist.
    let mut wanted: Vec<String> = all
        .iter()
        .step_by(2)
        .rev()
        .map(|i| i.key.sk.clone())
        .collect();
    wanted.extend(["b-gap", "b-huge", "a001", "missing", "d019", "s4", "a001"].map(String::from));
    let keys: Vec<_> = wanted
        .iter()
        .map(|sk| lambda_store::ItemKey::new("batch#v", sk))
        .collect();
    let got = store.batch_get(&keys).await.unwrap();
    assert_eq!(got.len(), keys.len());
    for (sk, item) in wanted.iter().zip(&got) {
        let expected = all.iter().find(|i| &i.key.sk == sk).map(|i| &i.data);
        assert_eq!(item.as_ref().map(|i| &i.data), expected, "{sk}");
        if let Some(i) = item {
            assert_eq!(&i.key.sk, sk);
        }
    }
}
