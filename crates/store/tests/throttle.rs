//! A throttled table (DynamoDB Local behind the fault-injecting proxy, started by `make test`):
//! writes slow down and retry but lose nothing; a table that never recovers is a clear error after
//! bounded retries.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lambda_store::chaos::{Action, FaultProxy};
use lambda_store::dynamo::{DynamoConfig, DynamoStore};
use lambda_store::{Item, ItemKey, OnlineStore, StoreError};

fn endpoint() -> String {
    std::env::var("LAMBDA_TEST_DYNAMODB_ENDPOINT").expect(
        "LAMBDA_TEST_DYNAMODB_ENDPOINT is not set: run `make test` (it starts DynamoDB Local)",
    )
}

async fn store(endpoint: &str, table: &str, rounds: u32) -> DynamoStore {
    let mut cfg = DynamoConfig::new(table, "us-east-1");
    cfg.endpoint = Some(endpoint.to_string());
    cfg.static_credentials = Some(("test".into(), "test".into()));
    cfg.base_backoff = Duration::from_millis(5);
    cfg.max_backoff_attempts = rounds;
    DynamoStore::connect(cfg).await
}

fn items(n: usize) -> Vec<Item> {
    (0..n)
        .map(|i| Item {
            key: ItemKey::batch("throttle", &format!("u{i:05}")),
            data: format!("row {i}").into_bytes(),
            guard: None,
            expires_at: None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_table_slows_writes_down_and_loses_nothing() {
    let table = format!("lambda-throttle-{}", std::process::id());
    let direct = store(&endpoint(), &table, 12).await;
    direct.create_table().await.unwrap();
    // The first 150 BatchWriteItem requests are throttled (more than the SDK's own retries
    // last), then every third one.
    let proxy = FaultProxy::start(
        &endpoint(),
        Arc::new(|op: &str, n: u64| match op {
            "BatchWriteItem" if n < 150 || n.is_multiple_of(3) => Action::Throttle,
            _ => Action::Forward,
        }),
    )
    .await
    .unwrap();
    let throttled = store(&proxy.endpoint, &table, 12).await;
    let all = items(1_000);
    let stats = throttled.batch_put(&all).await.unwrap();
    assert_eq!(stats.items, 1_000);
    assert!(
        proxy.counters.throttled.load(Ordering::Relaxed) >= 150,
        "{:?}",
        proxy.counters
    );
    let keys: Vec<_> = all.iter().map(|i| i.key.clone()).collect();
    let got = direct.batch_get(&keys).await.unwrap();
    for (want, got) in all.iter().zip(got) {
        assert_eq!(got.as_ref(), Some(want), "{}", want.key);
    }
    direct.delete_table().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_stays_throttled_is_a_clear_error() {
    let table = format!("lambda-throttle-dead-{}", std::process::id());
    let direct = store(&endpoint(), &table, 2).await;
    direct.create_table().await.unwrap();
    let proxy = FaultProxy::start(
        &endpoint(),
        Arc::new(|op: &str, _| {
            if op == "BatchWriteItem" {
                Action::Throttle
            } else {
                Action::Forward
            }
        }),
    )
    .await
    .unwrap();
    let throttled = store(&proxy.endpoint, &table, 2).await;
    let e = throttled.batch_put(&items(30)).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Dynamo { operation: "BatchWriteItem", throttled: true, table: t, .. } if t == &table),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("BatchWriteItem") && text.contains(&table),
        "{text}"
    );
    direct.delete_table().await.unwrap();
}
