//! # lambda-store
//!
//! The online store that batch rows and speed tiles are written to and serving reads from, behind
//! one small trait ([`OnlineStore`]) with two implementations: [`dynamo::DynamoStore`] (AWS
//! DynamoDB) and [`embedded::EmbeddedStore`] (a local redb file, the laptop default). One test
//! suite ([`suite`]) runs against both, so they behave the same.
//!
//! ## Table design
//!
//! One table, partition key `pk` (S) = `<view>#<entity>`, sort key `sk` (S):
//!
//! * `batch` — the batch view of the entity, with its own cutoff inside the data;
//! * `tile#<tile start ms, 13 digits>#<shard>` — one speed tile of one shard.
//!
//! Attributes: `data` (B, the encoded states), `guard` (S, optional: the highest stream sequence
//! number applied, zero-padded to [`GUARD_WIDTH`] digits so string order is numeric order),
//! `ttl` (N, epoch seconds, optional). A serving lookup is one `Query` on `pk` from `batch` to the
//! last tile: one partition, items sorted by `sk`; with eventually consistent reads it costs 0.5
//! read units per 4 KB returned (a busy entity with a 90-day batch row of ~20 KB and a day of tiles
//! at ~300 B each is ~12 units). Items are capped at [`MAX_ITEM_BYTES`] (DynamoDB's limit is
//! 400 KB): a tile covers 5 minutes of one entity, and the batch row holds per-day partial states.
//!
//! Expiry: an item whose `ttl` has passed is treated as absent by every operation of both
//! backends (DynamoDB deletes expired items lazily, up to days later, so reads filter them).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

pub mod chaos;
pub mod dynamo;
pub mod embedded;
pub mod iam;
pub mod lease;
pub mod suite;

/// Width of a guard (sequence number) after zero-padding; Kinesis sequence numbers have up to 56
/// digits.
pub const GUARD_WIDTH: usize = 64;

/// Largest item accepted (data plus keys), below DynamoDB's 400 KB limit.
pub const MAX_ITEM_BYTES: usize = 350 * 1024;

/// The key of an item.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemKey {
    /// Partition key: `<view>#<entity>`.
    pub pk: String,
    /// Sort key: `batch` or `tile#…`.
    pub sk: String,
}

impl ItemKey {
    /// A key.
    pub fn new(pk: impl Into<String>, sk: impl Into<String>) -> Self {
        ItemKey {
            pk: pk.into(),
            sk: sk.into(),
        }
    }
    /// The partition key of an entity of a view.
    pub fn partition(view: &str, entity: &str) -> String {
        format!("{view}#{entity}")
    }
    /// The key of an entity's batch row.
    pub fn batch(view: &str, entity: &str) -> Self {
        ItemKey::new(Self::partition(view, entity), "batch")
    }
    /// The key of one speed tile of one shard.
    pub fn tile(view: &str, entity: &str, tile_start_ms: i64, shard: &str) -> Self {
        ItemKey::new(
            Self::partition(view, entity),
            format!("tile#{tile_start_ms:013}#{shard}"),
        )
    }
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pk, self.sk)
    }
}

/// A monotonically increasing write guard, e.g. a stream sequence number, compared numerically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Guard(String);

impl Guard {
    /// A guard from decimal digits (a Kinesis sequence number, an offset). Errors on non-digits or
    /// more than [`GUARD_WIDTH`] digits.
    pub fn new(digits: &str) -> Result<Guard, StoreError> {
        let d = digits.trim_start_matches('0');
        if !digits.bytes().all(|b| b.is_ascii_digit()) || digits.is_empty() || d.len() > GUARD_WIDTH
        {
            return Err(StoreError::InvalidInput(format!(
                "guard `{digits}` must be 1 to {GUARD_WIDTH} decimal digits"
            )));
        }
        Ok(Guard(format!("{d:0>GUARD_WIDTH$}")))
    }
    /// A guard from an integer.
    pub fn from_u128(n: u128) -> Guard {
        Guard(format!("{n:0>GUARD_WIDTH$}"))
    }
    /// The zero-padded form stored in the table.
    pub fn as_padded(&self) -> &str {
        &self.0
    }
    /// Parses the stored, padded form.
    pub fn from_padded(s: &str) -> Result<Guard, StoreError> {
        Guard::new(s)
    }
}

/// One stored item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Its key.
    pub key: ItemKey,
    /// The payload (encoded aggregation states).
    pub data: Vec<u8>,
    /// Optional write guard (see [`Condition::GuardAdvances`]).
    pub guard: Option<Guard>,
    /// Expiry, epoch seconds: from then on the item is absent.
    pub expires_at: Option<i64>,
}

/// The condition of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Write unconditionally.
    Always,
    /// Only if no (live) item has this key.
    NotExists,
    /// Only if no live item exists, or the stored guard is lower than the new item's guard: a
    /// replay or a zombie writer can never move an item backwards.
    GuardAdvances,
    /// Only if a live item exists and its guard equals the new item's guard: the holder of a
    /// lease (see [`lease`]) renews or gives it up, and nobody else can.
    GuardEquals,
}

/// What a batch write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Items written.
    pub items: u64,
    /// Requests sent (including retries).
    pub requests: u64,
    /// Retries of unprocessed items or throttled requests.
    pub retries: u64,
}

/// Errors of the online store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write lost: the condition did not hold.
    #[error("conditional write of {key} failed: the item exists or has a newer guard")]
    ConditionFailed {
        /// The item's key.
        key: ItemKey,
    },
    /// The caller passed something invalid (too large, bad key).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// DynamoDB failed (after retries), naming the operation and table.
    #[error("DynamoDB {operation} on table `{table}` failed: {message}")]
    Dynamo {
        /// The API call.
        operation: &'static str,
        /// The table.
        table: String,
        /// The service's error, with its code.
        message: String,
        /// True when throttling or a capacity limit caused it (retrying later may succeed).
        throttled: bool,
    },
    /// The embedded database failed.
    #[error("embedded store {path}: {source}")]
    Embedded {
        /// The database file.
        path: String,
        /// The cause.
        #[source]
        source: redb::Error,
    },
    /// A stored item could not be read back (corrupt or written by something else).
    #[error("stored item {key} is malformed: {reason}")]
    Corrupt {
        /// The item's key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A bug in our code (a task panicked, an invariant broke).
    #[error("internal error (likely a bug in lambda): {0}")]
    Internal(String),
}

/// The current time, injectable for tests of expiry.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the epoch, UTC.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock tests set by hand.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn new(ms: i64) -> Arc<Self> {
        Arc::new(ManualClock(std::sync::atomic::AtomicI64::new(ms)))
    }
    /// Moves the clock to `ms`.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, std::sync::atomic::Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The online store: items keyed by (pk, sk), conditional writes, expiry.
#[async_trait]
pub trait OnlineStore: Send + Sync + fmt::Debug {
    /// `"dynamodb"` or `"embedded"`, for logs and metrics.
    fn backend(&self) -> &'static str;
    /// One item, if present and not expired.
    async fn get(&self, key: &ItemKey) -> Result<Option<Item>, StoreError>;
    /// Many items, in the order of `keys`.
    async fn batch_get(&self, keys: &[ItemKey]) -> Result<Vec<Option<Item>>, StoreError>;
    /// The live items of partition `pk` with `sk_from <= sk < sk_to`, sorted by `sk`.
    async fn query(&self, pk: &str, sk_from: &str, sk_to: &str) -> Result<Vec<Item>, StoreError>;
    /// Writes one item under `condition`; [`StoreError::ConditionFailed`] if it does not hold.
    async fn put(&self, item: &Item, condition: Condition) -> Result<(), StoreError>;
    /// Writes many items unconditionally (idempotent: the same items twice give the same state).
    async fn batch_put(&self, items: &[Item]) -> Result<BatchStats, StoreError>;
    /// Writes each item under `condition`, independently (not a transaction): one result per
    /// item, in order. Backends do it faster than one [`OnlineStore::put`] after another (one
    /// local transaction; parallel requests on DynamoDB).
    async fn put_each(&self, items: &[Item], condition: Condition) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            out.push(self.put(i, condition).await);
        }
        out
    }
    /// Deletes an item (absent is fine).
    async fn delete(&self, key: &ItemKey) -> Result<(), StoreError>;
}

/// Opens the online store named by `text`: `dynamodb://TABLE` (checked reachable with
/// `DescribeTable`; `region`, optional `endpoint` for emulators) or a redb file path (the
/// embedded default; its large values live in the directory `<path>.values` beside it). The
/// binaries' `--store` and `--leases` flags go through here.
pub async fn open(
    text: &str,
    region: &str,
    endpoint: Option<&str>,
) -> Result<std::sync::Arc<dyn OnlineStore>, StoreError> {
    Ok(match text.strip_prefix("dynamodb://") {
        Some(table) => {
            let mut cfg = dynamo::DynamoConfig::new(table, region);
            cfg.endpoint = endpoint.map(String::from);
            let s = dynamo::DynamoStore::connect(cfg).await;
            s.healthcheck().await?;
            std::sync::Arc::new(s)
        }
        None => std::sync::Arc::new(embedded::EmbeddedStore::open(text)?),
    })
}

/// Checks an item before writing it, identically for every backend.
pub fn validate_item(item: &Item) -> Result<(), StoreError> {
    if item.key.pk.is_empty() || item.key.sk.is_empty() {
        return Err(StoreError::InvalidInput(format!(
            "empty key part in {}",
            item.key
        )));
    }
    if item.key.pk.contains('\0') || item.key.sk.contains('\0') {
        return Err(StoreError::InvalidInput(format!(
            "key {} contains a NUL byte",
            item.key
        )));
    }
    let size = item.key.pk.len() + item.key.sk.len() + item.data.len() + GUARD_WIDTH + 16;
    if size > MAX_ITEM_BYTES {
        return Err(StoreError::InvalidInput(format!(
            "item {} is {size} bytes, over the {MAX_ITEM_BYTES}-byte limit",
            item.key
        )));
    }
    Ok(())
}

/// True if an item with this expiry is absent at `now_ms`.
pub fn is_expired(expires_at: Option<i64>, now_ms: i64) -> bool {
    expires_at.is_some_and(|t| t * 1000 <= now_ms)
}
