//! The DynamoDB online store (aws-sdk-dynamodb), for AWS and for DynamoDB Local in tests.
//!
//! * Conditional writes use `ConditionExpression`s that treat an expired item as absent.
//! * `batch_put` sends `BatchWriteItem` requests of 25 items, up to `concurrency` at once, and
//!   retries unprocessed items with exponential backoff and full jitter, so a throttled table slows
//!   the writer down instead of failing it (up to `max_backoff_attempts`).
//! * `batch_get` sends `BatchGetItem` requests of 100 keys, up to `concurrency` at once, and
//!   retries unprocessed keys likewise.
//! * The SDK's own standard retry mode (with `max_attempts`) handles throttled single requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    PutRequest, ScalarAttributeType, TimeToLiveSpecification, WriteRequest,
};
use tokio::task::JoinSet;

use crate::{
    BatchStats, Clock, Condition, Guard, Item, ItemKey, OnlineStore, StoreError, SystemClock,
    is_expired, validate_item,
};

/// The API actions this backend calls at run time (reads and writes), checked against the IAM
/// roles in `infra/` by a test.
pub const DATA_ACTIONS_READ: &[&str] = &[
    "dynamodb:GetItem",
    "dynamodb:BatchGetItem",
    "dynamodb:Query",
];
/// Write actions of the data path.
pub const DATA_ACTIONS_WRITE: &[&str] = &[
    "dynamodb:PutItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:DeleteItem",
];
/// Actions of the start-up health check.
pub const HEALTHCHECK_ACTIONS: &[&str] = &["dynamodb:DescribeTable"];

/// Where and how to reach the table.
#[derive(Debug, Clone)]
pub struct DynamoConfig {
    /// Table name.
    pub table: String,
    /// AWS region (e.g. `eu-west-1`).
    pub region: String,
    /// Custom endpoint for AWS-compatible services (DynamoDB Local); `None` for AWS.
    pub endpoint: Option<String>,
    /// Static credentials (emulators); `None` uses the standard provider chain.
    pub static_credentials: Option<(String, String)>,
    /// Concurrent `BatchWriteItem` (and `BatchGetItem`) requests.
    pub concurrency: usize,
    /// Attempts for the SDK's standard retry mode (throttling, 5xx).
    pub max_attempts: u32,
    /// Rounds of retrying unprocessed items before giving up.
    pub max_backoff_attempts: u32,
    /// First backoff delay (ours and the SDK's); doubles each round, capped at 5 s, with full
    /// jitter.
    pub base_backoff: Duration,
}

impl DynamoConfig {
    /// Defaults for a table in a region.
    pub fn new(table: impl Into<String>, region: impl Into<String>) -> Self {
        DynamoConfig {
            table: table.into(),
            region: region.into(),
            endpoint: None,
            static_credentials: None,
            concurrency: 8,
            max_attempts: 8,
            max_backoff_attempts: 12,
            base_backoff: Duration::from_millis(50),
        }
    }
}

/// The DynamoDB store.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    cfg: Arc<DynamoConfig>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table", &self.cfg.table)
            .field("endpoint", &self.cfg.endpoint)
            .finish()
    }
}

/// Builds a DynamoDB client from the config (region, endpoint, credentials, retries).
pub async fn client(cfg: &DynamoConfig) -> Client {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).region(Region::new(cfg.region.clone()));
    if let Some((id, secret)) = &cfg.static_credentials {
        loader =
            loader.credentials_provider(Credentials::new(id, secret, None, None, "lambda-static"));
    }
    let shared = loader.load().await;
    let mut b = aws_sdk_dynamodb::config::Builder::from(&shared).retry_config(
        RetryConfig::standard()
            .with_max_attempts(cfg.max_attempts)
            .with_initial_backoff(cfg.base_backoff),
    );
    if let Some(ep) = &cfg.endpoint {
        b = b.endpoint_url(ep);
    }
    Client::from_conf(b.build())
}

fn dynamo_err<E: ProvideErrorMetadata + std::error::Error + 'static>(
    operation: &'static str,
    table: &str,
    e: aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> StoreError {
    let code = e.code().unwrap_or_default().to_string();
    let throttled = matches!(
        code.as_str(),
        "ProvisionedThroughputExceededException" | "ThrottlingException" | "RequestLimitExceeded"
    );
    StoreError::Dynamo {
        operation,
        table: table.to_string(),
        message: format!("{}", DisplayErrorContext(&e)),
        throttled,
    }
}

fn key_map(key: &ItemKey) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_string(), AttributeValue::S(key.pk.clone())),
        ("sk".to_string(), AttributeValue::S(key.sk.clone())),
    ])
}

fn item_map(item: &Item) -> HashMap<String, AttributeValue> {
    let mut m = key_map(&item.key);
    m.insert(
        "data".into(),
        AttributeValue::B(Blob::new(item.data.clone())),
    );
    if let Some(g) = &item.guard {
        m.insert("guard".into(), AttributeValue::S(g.as_padded().to_string()));
    }
    if let Some(t) = item.expires_at {
        m.insert("ttl".into(), AttributeValue::N(t.to_string()));
    }
    m
}

fn from_map(m: &HashMap<String, AttributeValue>) -> Result<Item, StoreError> {
    let s = |k: &str| m.get(k).and_then(|v| v.as_s().ok()).cloned();
    let (Some(pk), Some(sk)) = (s("pk"), s("sk")) else {
        return Err(StoreError::Corrupt {
            key: format!("{m:?}"),
            reason: "missing pk/sk".into(),
        });
    };
    let key = ItemKey::new(pk, sk);
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: key.to_string(),
        reason: reason.into(),
    };
    let data = match m.get("data") {
        Some(AttributeValue::B(b)) => b.as_ref().to_vec(),
        _ => return Err(corrupt("missing binary `data`")),
    };
    let guard = match s("guard") {
        Some(g) => Some(Guard::from_padded(&g)?),
        None => None,
    };
    let expires_at = match m.get("ttl") {
        Some(AttributeValue::N(n)) => Some(
            n.parse::<i64>()
                .map_err(|_| corrupt("`ttl` is not an integer"))?,
        ),
        None => None,
        Some(_) => return Err(corrupt("`ttl` is not a number")),
    };
    Ok(Item {
        key,
        data,
        guard,
        expires_at,
    })
}

/// Runs `task` on every chunk, up to `concurrency` tasks at once, handing each result to `each`
/// as it comes; the first error (named by `what`) stops it.
async fn bounded<C, R, Fut>(
    concurrency: usize,
    mut chunks: impl Iterator<Item = C>,
    task: impl Fn(C) -> Fut,
    mut each: impl FnMut(R),
    what: &str,
) -> Result<(), StoreError>
where
    Fut: std::future::Future<Output = Result<R, StoreError>> + Send + 'static,
    R: Send + 'static,
{
    let mut set = JoinSet::new();
    loop {
        while set.len() < concurrency.max(1) {
            let Some(chunk) = chunks.next() else { break };
            set.spawn(task(chunk));
        }
        let Some(done) = set.join_next().await else {
            return Ok(());
        };
        each(done.map_err(|e| StoreError::Internal(format!("{what} task failed: {e}")))??);
    }
}

/// Full-jitter exponential backoff: a random delay in [0, min(cap, base·2^attempt)).
fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = Duration::from_secs(5);
    let max = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut x =
        nanos ^ 0x9e37_79b9_7f4a_7c15 ^ (attempt as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    Duration::from_nanos(x % (max.as_nanos() as u64).max(1))
}

impl DynamoStore {
    /// Connects to the table (no request is sent; see [`DynamoStore::healthcheck`]).
    pub async fn connect(cfg: DynamoConfig) -> Self {
        Self::connect_with_clock(cfg, Arc::new(SystemClock)).await
    }

    /// Connects with an injected clock (tests of expiry).
    pub async fn connect_with_clock(cfg: DynamoConfig, clock: Arc<dyn Clock>) -> Self {
        DynamoStore {
            client: client(&cfg).await,
            cfg: Arc::new(cfg),
            clock,
        }
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.cfg.table
    }

    /// Checks the table exists and is active (fail early, with a clear message, at start-up).
    pub async fn healthcheck(&self) -> Result<(), StoreError> {
        let out = self
            .client
            .describe_table()
            .table_name(&self.cfg.table)
            .send()
            .await
            .map_err(|e| dynamo_err("DescribeTable", &self.cfg.table, e))?;
        let status = out
            .table()
            .and_then(|t| t.table_status())
            .map(|s| s.as_str().to_string());
        match status.as_deref() {
            Some("ACTIVE") | Some("UPDATING") => Ok(()),
            other => Err(StoreError::Dynamo {
                operation: "DescribeTable",
                table: self.cfg.table.clone(),
                message: format!("table status is {other:?}, not ACTIVE"),
                throttled: false,
            }),
        }
    }

    /// Creates the table as `infra/lambda.template.json` declares it (pk/sk strings, on-demand,
    /// TTL on `ttl`), if it does not exist. Used by `init` and by the tests.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let t = &self.cfg.table;
        let build = |e: aws_sdk_dynamodb::error::BuildError| StoreError::Internal(e.to_string());
        let res = self
            .client
            .create_table()
            .table_name(t)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(build)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("sk")
                    .key_type(KeyType::Range)
                    .build()
                    .map_err(build)?,
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(build)?,
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("sk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(build)?,
            )
            .send()
            .await;
        match res {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceInUseException") => return Ok(()),
            Err(e) => return Err(dynamo_err("CreateTable", t, e)),
        }
        self.client
            .update_time_to_live()
            .table_name(t)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name("ttl")
                    .enabled(true)
                    .build()
                    .map_err(build)?,
            )
            .send()
            .await
            .map_err(|e| dynamo_err("UpdateTimeToLive", t, e))?;
        Ok(())
    }

    /// Deletes the table (tests clean up after themselves).
    pub async fn delete_table(&self) -> Result<(), StoreError> {
        self.client
            .delete_table()
            .table_name(&self.cfg.table)
            .send()
            .await
            .map_err(|e| dynamo_err("DeleteTable", &self.cfg.table, e))?;
        Ok(())
    }

    /// The underlying client (for `init` and tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Waits before retrying the `left` unprocessed keys or items (`what`) of `operation`, or
    /// gives up after `max_backoff_attempts` rounds.
    async fn back_off(
        &self,
        operation: &'static str,
        left: usize,
        what: &str,
        attempt: &mut u32,
    ) -> Result<(), StoreError> {
        if *attempt >= self.cfg.max_backoff_attempts {
            return Err(StoreError::Dynamo {
                operation,
                table: self.cfg.table.clone(),
                message: format!("{left} {what} still unprocessed after {attempt} retries"),
                throttled: true,
            });
        }
        let wait = backoff(self.cfg.base_backoff, *attempt);
        tracing::debug!(table = %self.cfg.table, operation, unprocessed = left, attempt = *attempt, wait_ms = wait.as_millis() as u64, "Retrying unprocessed {what}.");
        tokio::time::sleep(wait).await;
        *attempt += 1;
        Ok(())
    }

    /// One `BatchGetItem` of at most 100 keys, retrying unprocessed keys with backoff.
    async fn get_chunk(
        &self,
        keys: Vec<HashMap<String, AttributeValue>>,
    ) -> Result<Vec<Item>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        let mut pending = keys;
        let mut attempt = 0;
        while !pending.is_empty() {
            let ka = KeysAndAttributes::builder()
                .set_keys(Some(pending))
                .build()
                .map_err(|e| StoreError::Internal(e.to_string()))?;
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.cfg.table, ka)
                .send()
                .await
                .map_err(|e| dynamo_err("BatchGetItem", &self.cfg.table, e))?;
            for m in out
                .responses()
                .and_then(|r| r.get(&self.cfg.table))
                .into_iter()
                .flatten()
            {
                found.push(from_map(m)?);
            }
            pending = out
                .unprocessed_keys()
                .and_then(|u| u.get(&self.cfg.table))
                .map(|k| k.keys().to_vec())
                .unwrap_or_default();
            if !pending.is_empty() {
                self.back_off("BatchGetItem", pending.len(), "keys", &mut attempt)
                    .await?;
            }
        }
        Ok(found)
    }

    async fn write_chunk(&self, chunk: Vec<Item>) -> Result<BatchStats, StoreError> {
        let mut pending: Vec<WriteRequest> = Vec::with_capacity(chunk.len());
        for i in &chunk {
            let put = PutRequest::builder()
                .set_item(Some(item_map(i)))
                .build()
                .map_err(|e| StoreError::Internal(e.to_string()))?;
            pending.push(WriteRequest::builder().put_request(put).build());
        }
        let mut stats = BatchStats {
            items: chunk.len() as u64,
            ..Default::default()
        };
        let mut attempt = 0;
        while !pending.is_empty() {
            stats.requests += 1;
            let sent = self
                .client
                .batch_write_item()
                .request_items(&self.cfg.table, pending.clone())
                .send()
                .await
                .map_err(|e| dynamo_err("BatchWriteItem", &self.cfg.table, e));
            match sent {
                Ok(out) => {
                    pending = out
                        .unprocessed_items()
                        .and_then(|m| m.get(&self.cfg.table))
                        .cloned()
                        .unwrap_or_default();
                }
                // Throttled even after the SDK's own retries (or its retry quota ran out): the
                // whole request is unprocessed; back off below and send it again, so a throttled
                // table slows the writer down instead of failing it.
                Err(StoreError::Dynamo {
                    throttled: true,
                    message,
                    ..
                }) if attempt < self.cfg.max_backoff_attempts => {
                    tracing::warn!(table = %self.cfg.table, items = pending.len(), attempt, %message, "BatchWriteItem throttled; backing off.");
                }
                Err(e) => return Err(e),
            }
            if !pending.is_empty() {
                stats.retries += 1;
                self.back_off("BatchWriteItem", pending.len(), "items", &mut attempt)
                    .await?;
            }
        }
        Ok(stats)
    }
}

#[async_trait]
impl OnlineStore for DynamoStore {
    fn backend(&self) -> &'static str {
        "dynamodb"
    }

    async fn get(&self, key: &ItemKey) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.cfg.table)
            .set_key(Some(key_map(key)))
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem", &self.cfg.table, e))?;
        let now = self.clock.now_ms();
        match out.item() {
            Some(m) => {
                let item = from_map(m)?;
                Ok((!is_expired(item.expires_at, now)).then_some(item))
            }
            None => Ok(None),
        }
    }

    async fn batch_get(&self, keys: &[ItemKey]) -> Result<Vec<Option<Item>>, StoreError> {
        let mut found: HashMap<ItemKey, Item> = HashMap::new();
        let mut unique: Vec<&ItemKey> = keys.iter().collect();
        unique.sort();
        unique.dedup();
        // Requests of 100 keys, up to `concurrency` at once (the batch job reads a night's
        // previous rows this way: tens of thousands of keys).
        let chunks: Vec<Vec<_>> = unique
            .chunks(100)
            .map(|c| c.iter().map(|k| key_map(k)).collect())
            .collect();
        let get = |chunk| {
            let this = self.clone();
            async move { this.get_chunk(chunk).await }
        };
        let each = |items: Vec<Item>| found.extend(items.into_iter().map(|i| (i.key.clone(), i)));
        bounded(
            self.cfg.concurrency,
            chunks.into_iter(),
            get,
            each,
            "batch get",
        )
        .await?;
        let now = self.clock.now_ms();
        Ok(keys
            .iter()
            .map(|k| {
                found
                    .get(k)
                    .filter(|i| !is_expired(i.expires_at, now))
                    .cloned()
            })
            .collect())
    }

    async fn query(&self, pk: &str, sk_from: &str, sk_to: &str) -> Result<Vec<Item>, StoreError> {
        let mut out = Vec::new();
        if sk_from >= sk_to {
            return Ok(out);
        }
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            // DynamoDB refuses an empty key value: an empty lower bound is "from the start".
            let mut req = self
                .client
                .query()
                .table_name(&self.cfg.table)
                .expression_attribute_values(":pk", AttributeValue::S(pk.to_string()))
                .expression_attribute_values(":b", AttributeValue::S(sk_to.to_string()));
            req = if sk_from.is_empty() {
                req.key_condition_expression("pk = :pk AND sk <= :b")
            } else {
                req.key_condition_expression("pk = :pk AND sk BETWEEN :a AND :b")
                    .expression_attribute_values(":a", AttributeValue::S(sk_from.to_string()))
            };
            let page = req
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| dynamo_err("Query", &self.cfg.table, e))?;
            let now = self.clock.now_ms();
            for m in page.items() {
                let item = from_map(m)?;
                // BETWEEN is inclusive; the range is half-open.
                if item.key.sk.as_str() < sk_to && !is_expired(item.expires_at, now) {
                    out.push(item);
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn put(&self, item: &Item, condition: Condition) -> Result<(), StoreError> {
        validate_item(item)?;
        let now_s = self.clock.now_ms().div_euclid(1000);
        let mut req = self
            .client
            .put_item()
            .table_name(&self.cfg.table)
            .set_item(Some(item_map(item)));
        // An expired item counts as absent, as in the embedded store.
        let absent = "(attribute_not_exists(pk) OR (attribute_exists(#ttl) AND #ttl <= :now))";
        match condition {
            Condition::Always => {}
            Condition::NotExists => {
                req = req
                    .condition_expression(absent)
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":now", AttributeValue::N(now_s.to_string()));
            }
            Condition::GuardAdvances => {
                let Some(g) = &item.guard else {
                    return Err(StoreError::InvalidInput(format!(
                        "GuardAdvances write of {} without a guard",
                        item.key
                    )));
                };
                req = req
                    .condition_expression(format!(
                        "{absent} OR attribute_not_exists(guard) OR guard < :g"
                    ))
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":now", AttributeValue::N(now_s.to_string()))
                    .expression_attribute_values(
                        ":g",
                        AttributeValue::S(g.as_padded().to_string()),
                    );
            }
            Condition::GuardEquals => {
                let Some(g) = &item.guard else {
                    return Err(StoreError::InvalidInput(format!(
                        "GuardEquals write of {} without a guard",
                        item.key
                    )));
                };
                req = req
                    .condition_expression(
                        "attribute_exists(pk) AND (attribute_not_exists(#ttl) OR #ttl > :now) AND guard = :g",
                    )
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":now", AttributeValue::N(now_s.to_string()))
                    .expression_attribute_values(
                        ":g",
                        AttributeValue::S(g.as_padded().to_string()),
                    );
            }
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(StoreError::ConditionFailed {
                    key: item.key.clone(),
                })
            }
            Err(e) => Err(dynamo_err("PutItem", &self.cfg.table, e)),
        }
    }

    async fn put_each(&self, items: &[Item], condition: Condition) -> Vec<Result<(), StoreError>> {
        // Conditional writes cannot be batched (BatchWriteItem has no conditions): send them in
        // parallel, bounded.
        let limit = self.cfg.concurrency.max(1) * 4;
        let mut out: Vec<Option<Result<(), StoreError>>> = (0..items.len()).map(|_| None).collect();
        let mut set = JoinSet::new();
        let mut next = 0;
        loop {
            while set.len() < limit && next < items.len() {
                let (this, item, i) = (self.clone(), items[next].clone(), next);
                set.spawn(async move { (i, this.put(&item, condition).await) });
                next += 1;
            }
            match set.join_next().await {
                None => break,
                Some(Ok((i, r))) => out[i] = Some(r),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "A conditional write task failed (a bug).");
                }
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(StoreError::Internal(
                        "a conditional write task failed".into(),
                    ))
                })
            })
            .collect()
    }

    async fn batch_put(&self, items: &[Item]) -> Result<BatchStats, StoreError> {
        for i in items {
            validate_item(i)?;
        }
        // BatchWriteItem rejects two writes of the same key in one request: keep the last.
        let mut last: HashMap<&ItemKey, usize> = HashMap::new();
        for (i, it) in items.iter().enumerate() {
            last.insert(&it.key, i);
        }
        let mut order: Vec<usize> = last.into_values().collect();
        order.sort_unstable();
        let unique: Vec<Item> = order.into_iter().map(|i| items[i].clone()).collect();
        let mut total = BatchStats::default();
        // Chunks of 25 taken from the end (each key is written once, so the order is free).
        let mut rest = unique;
        let chunks = std::iter::from_fn(move || {
            (!rest.is_empty()).then(|| rest.split_off(rest.len().saturating_sub(25)))
        });
        let write = |chunk| {
            let this = self.clone();
            async move { this.write_chunk(chunk).await }
        };
        let each = |s: BatchStats| {
            total.items += s.items;
            total.requests += s.requests;
            total.retries += s.retries;
        };
        bounded(self.cfg.concurrency, chunks, write, each, "batch write").await?;
        Ok(total)
    }

    async fn delete(&self, key: &ItemKey) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(&self.cfg.table)
            .set_key(Some(key_map(key)))
            .send()
            .await
            .map_err(|e| dynamo_err("DeleteItem", &self.cfg.table, e))?;
        Ok(())
    }
}
