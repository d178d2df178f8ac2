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
