//! The nightly batch job: Parquet history → per-day partial states (offline store) → one batch
//! row per entity (online store).
//!
//! * **Partial states** are computed by DataFusion with the core state functions
//!   ([`crate::states`]) per (entity, bucket), one history partition (`date=YYYY-MM-DD`) at a time,
//!   so only the days the job needs are read. Day-tier partials are kept for the longest
//!   1-day-hop window, hour-tier for the longest 1-hour-hop window; tile-tier partials (windows
//!   under 12 h) are recomputed each run for the hours before the cutoff.
//! * **Incremental**: a day's partials, once written, are reused by later runs (the manifest lists
//!   them); `full` recomputes them all. Both produce the same rows.
//! * **Offline store** layout: `<offline>/<view>/partials/tier=<day|hour>/date=<D>/part-0.parquet`
//!   (columns `entity`, `start`, `states`) and `<offline>/<view>/features/cutoff=<D>/part-0.parquet`
//!   (entity and every finalized feature as of the cutoff). Every file is written to a temporary
//!   name and renamed into place, so a crash never leaves a partial file visible as complete.
//! * **Online store**: one item per entity (`batch` sort key) holding its
//!   [`BatchRow`](lambda_core::merge::BatchRow) with the cutoff inside, uploaded with
//!   `batch_put`: rerunning a night writes the same bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::parquet_to_arrow_schema;
use datafusion::parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use lambda_core::agg::FastHash;
use lambda_core::decode::{arrow_schema, value_at};
use lambda_core::merge::{
    RowBlobs, Tier, compact_blobs, encoded_row_features_at, row_body, row_tiers, splice_row,
    tier_reach,
};
use lambda_core::time::{DAY_MS, format_ts, tile_start};
use lambda_core::{FeatureView, Value, sql};
use lambda_store::{Item, ItemKey, OnlineStore, StoreError};

use crate::states::register_state_functions;
use crate::storage::{Location, StorageError};

/// Errors of the batch job, each naming what and where.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A history or offline object could not be listed, read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A Parquet file does not have the expected schema.
    #[error("{url}: wrong schema: {message}")]
    Schema {
        /// The file.
        url: String,
        /// What differs.
        message: String,
    },
    /// A Parquet file is corrupt or unreadable.
    #[error("{url}: cannot read Parquet: {message}")]
    Parquet {
        /// The file.
        url: String,
        /// The reader's message.
        message: String,
    },
    /// DataFusion failed while running a query.
    #[error("query for {what} failed: {source}")]
    Query {
        /// Which step.
        what: String,
        /// The cause.
        #[source]
        source: datafusion::error::DataFusionError,
    },
    /// The online store failed.
    #[error("uploading batch rows")]
    Store(#[from] StoreError),
    /// A state could not be decoded or a feature finalized (overflow).
    #[error("building batch rows")]
    Aggregation(#[from] lambda_core::agg::AggError),
    /// A batch row could not serve its own cutoff (a bug).
    #[error("finalizing features at the cutoff")]
    Merge(#[from] lambda_core::merge::MergeError),
    /// Two different rows share an event id (deliveries of one event must be identical).
    #[error(
        "history of {date}: event ids with conflicting rows (same id, different content): {ids:?}"
    )]
    ConflictingDuplicates {
        /// The day.
        date: String,
        /// Up to five of the ids.
        ids: Vec<String>,
    },
    /// The view's hand-written SQL cannot be read, fails, or does not give the expected columns.
    #[error("hand-written SQL {file}: {message}")]
    HandWrittenSql {
        /// The SQL file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Unsupported option.
    #[error("{0}")]
    Config(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The feature view.
    pub view: FeatureView,
    /// The Parquet history (`date=YYYY-MM-DD/*.parquet` below it), local or S3.
    pub history: Location,
    /// The offline store's root, local or S3.
    pub offline: Location,
    /// Events before this instant are included (normally midnight UTC).
    pub cutoff_ms: i64,
    /// Recompute every partial instead of reusing stored ones.
    pub full: bool,
    /// Days a batch row stays in the online store (its TTL) after its newest data has left every
    /// window (the TTL is the cutoff + the longest window + these days).
    pub row_ttl_days: i64,
    /// Rows over this many encoded bytes are compacted for the online store (normally
    /// [`COMPACT_OVER`]; tests lower it).
    pub compact_over: usize,
}

/// Progress of a run, for a terminal display or logs.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A day's partials were computed.
    Day {
        /// The day.
        date: String,
        /// Rows and bytes of history read.
        rows: u64,
        /// Bytes of history read.
        bytes: u64,
        /// Days done and to do.
        done: usize,
        /// Total days to compute.
        total: usize,
    },
    /// Batch rows are being uploaded.
    Upload {
        /// Rows uploaded so far.
        done: usize,
        /// Total.
        total: usize,
    },
}

/// The outcome of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Days of history whose partials were computed this run.
    pub days_computed: usize,
    /// Days whose stored partials were reused.
    pub days_reused: usize,
    /// History rows read.
    pub rows_in: u64,
    /// History bytes read (Parquet file sizes).
    pub bytes_in: u64,
    /// Entities whose batch row was written (all of them on a rebuild, else the ones with new or
    /// changed days).
    pub entities: usize,
    /// Bytes of batch rows uploaded.
    pub row_bytes: u64,
    /// With hand-written SQL: entities whose hand-written features differ from the definition's
    /// (drift; the parity checker says where and why). `None` without hand-written SQL.
    pub sql_drift: Option<usize>,
    /// Entities in the offline features file of this cutoff: every entity on a rebuild, else the
    /// ones whose features changed since the committed view.
    pub features_written: usize,
    /// Why every row was rebuilt (`None`: only the entities whose data changed were rewritten).
    pub rebuild: Option<String>,
    /// Rows too large for one item, compacted for the online store (their full rows are kept
    /// offline; they are rewritten every night).
    pub compacted: usize,
}

/// History days computed at once (each on one partition; a day's tiers are queries of their own).
const DAYS_AT_ONCE: usize = 2;

/// (tier, bucket start, array, row): the encoded states are `arrays[array].value(row)` of the
/// [`EntityPartials`] (read files stay in their Arrow buffers, nothing is copied per partial).
type PartialBlob = (Tier, i64, u32, u32);
/// A map by entity, hashed with foldhash (std's SipHash was a visible part of the serial
/// bookkeeping between a night's first phase and its row build).
type EntityMap<V> = HashMap<String, V, FastHash>;

/// Per entity: every partial its batch row needs.
#[derive(Default)]
struct EntityPartials {
    by_entity: EntityMap<Vec<PartialBlob>>,
    arrays: Vec<BinaryArray>,
}

/// What [`RowBuild::build`] makes of one entity.
struct BuiltRow {
    /// The batch row to upload (none for an entity whose kept row still serves).
    item: Option<Item>,
    /// The full row, when `item` holds its compacted form (kept in the offline store).
    full: Option<Vec<u8>>,
    /// The entity and its features at the cutoff.
    features: (String, Vec<Value>),
}

/// Builds the batch rows and features of a night's entities (shared by the worker threads).
struct RowBuild<'a> {
    view: &'a FeatureView,
    aggs: Vec<lambda_core::Aggregation>,
    plan: lambda_core::merge::FeaturePlan,
    cutoff_ms: i64,
    /// The days whose stored buckets this run replaces (every day on a rebuild).
    changed_days: &'a BTreeSet<i64>,
    /// The partial states' arrays that [`PartialBlob`]s point into.
    arrays: &'a [BinaryArray],
    /// Previous rows by entity (empty on a rebuild).
    old: &'a EntityMap<Vec<u8>>,
    is_rebuild: bool,
    compact_over: usize,
    /// The rows' expiry, in seconds since the epoch.
    expires: i64,
}

/// At a new cold block ([`lambda_core::merge::ColdBlock`]), the days it leaves out (the newest).
/// 2 rather than 7 for fewer new blocks later (one every 19 nights instead of 14, at
/// `HOT_DAYS`, 21); the night right after a full run is the same either way (`scripts/ab-nights.sh`:
/// 0.504 against 0.500 s and 0.502 against 0.489 s, 8–10 interleaved nights; a first A/B with one
/// binary reading the value from a variable had shown 0.464 against 0.511 s, noise).
pub const COLD_AFTER_DAYS: i64 = 2;
/// A row keeps its cold block while at most this many day buckets come after it.
const HOT_DAYS: usize = 21;

impl RowBuild<'_> {
    /// Encodes a built row. It keeps the previous row's cold block when that block's buckets still
    /// in the row are the row's oldest day buckets, unchanged (only buckets at its start left the
    /// row), at most a quarter of the block is dead, and at most [`HOT_DAYS`] day buckets come
    /// after it: a night then compresses only the newer buckets. Otherwise the row gets a new cold
    /// block of its days before the last [`COLD_AFTER_DAYS`].
    fn encode(
        &self,
        blobs: &RowBlobs<'_>,
        old: Option<&[u8]>,
        prev: Option<&RowBlobs<'_>>,
    ) -> Result<Vec<u8>, BatchError> {
        let day = lambda_core::Span::days(1);
        let fresh =
            || blobs.encode_split(tile_start(self.cutoff_ms, day) - COLD_AFTER_DAYS * DAY_MS);
        let (Some(old), Some(prev)) = (old, prev) else {
            return Ok(fresh());
        };
        let Some(cold) = lambda_core::merge::cold_block(old)? else {
            return Ok(fresh());
        };
        let (old_days, new_days) = (prev.day_buckets(), blobs.day_buckets());
        if cold.live > old_days.len() {
            return Ok(fresh());
        }
        let in_cold = &old_days[..cold.live];
        let first = new_days.first().map_or(i64::MAX, |b| b.0);
        let expired = in_cold.iter().take_while(|b| b.0 < first).count();
        let kept = &in_cold[expired..];
        let unchanged = kept.len() <= new_days.len()
            && kept.iter().zip(new_days).all(|(a, b)| {
                a.0 == b.0
                    && a.1 == b.1
                    && std::ptr::eq(a.2.as_ptr(), b.2.as_ptr())
                    && a.2.len() == b.2.len()
            });
        let skip = cold.skip + RowBlobs::cold_skip(&in_cold[..expired]);
        let hot = new_days.len().saturating_sub(kept.len());
        if !unchanged || kept.is_empty() || skip * 4 > cold.raw_len || hot > HOT_DAYS {
            return Ok(fresh());
        }
        Ok(blobs.encode_reusing(&cold, skip, kept.len()))
    }

    fn item(&self, entity: &str, data: Vec<u8>) -> Item {
        Item {
            key: ItemKey::batch(&self.view.name, entity),
            data,
            guard: None,
            expires_at: Some(self.expires),
        }
    }

    /// One entity: with `parts` (its new buckets), its previous row spliced with them, encoded
    /// (compacted when too large) and its features; without (only leaving), the features of its
    /// kept row, which still serves this cutoff.
    fn build(&self, entity: &str, parts: Option<&[PartialBlob]>) -> Result<BuiltRow, BatchError> {
        let (view, c) = (self.view, self.cutoff_ms);
        // Looked up once (a map of tens of thousands of rows: each lookup is a cache miss).
        let old = self.old.get(entity).map(Vec::as_slice);
        let Some(parts) = parts else {
            return Ok(match old {
                Some(data) => {
                    let body = row_body(data)?;
                    let f = encoded_row_features_at(&self.plan, &RowBlobs::parse(&body)?, c)?;
                    BuiltRow {
                        item: None,
                        full: None,
                        features: (entity.to_string(), f),
                    }
                }
                None => {
                    let blobs = splice_row(view, c, None, |_, _| true, &[]);
                    let f = encoded_row_features_at(&self.plan, &blobs, c)?;
                    BuiltRow {
                        item: self.is_rebuild.then(|| self.item(entity, blobs.encode())),
                        full: None,
                        features: (entity.to_string(), f),
                    }
                }
            });
        };
        let fresh: Vec<(Tier, i64, &[u8])> = parts
            .iter()
            .map(|(tier, start, array, row)| {
                (
                    *tier,
                    *start,
                    self.arrays[*array as usize].value(*row as usize),
                )
            })
            .collect();
        let prev_body = old.map(row_body).transpose()?;
        let prev = prev_body.as_deref().map(RowBlobs::parse).transpose()?;
        let replaced = |tier: Tier, start: i64| {
            tier == Tier::Tile
                || self
                    .changed_days
                    .contains(&tile_start(start, lambda_core::Span::days(1)))
        };
        let blobs = splice_row(view, c, prev.as_ref(), replaced, &fresh);
        let features = encoded_row_features_at(&self.plan, &blobs, c)?;
        let data = self.encode(&blobs, old, prev.as_ref())?;
        let (data, full) = if data.len() > self.compact_over {
            (compact_blobs(view, &self.aggs, &blobs)?, Some(data))
        } else {
            (data, None)
        };
        Ok(BuiltRow {
            item: Some(self.item(entity, data)),
            full,
            features: (entity.to_string(), features),
        })
    }
}

/// Rows larger than this are compacted ([`lambda_core::merge::compact_row`]) for the online
/// store, whose items are limited (DynamoDB: 400 KB); the full row is kept offline.
pub const COMPACT_OVER: usize = 256 * 1024;

fn date_of(day_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(day_ms)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// A file of the stored partials of one tier and day (`part-0.parquet`: the partials;
/// `_inputs.json`: the history files they were computed from), below the offline store.
fn partial_file(view: &FeatureView, tier: Tier, day: i64, name: &str) -> String {
    format!(
        "{}/partials/tier={}/date={}/{name}",
        view.name,
        tier.name(),
        date_of(day)
    )
}

/// The stored partials of one tier and day, below the offline store.
fn partial_rel(view: &FeatureView, tier: Tier, day: i64) -> String {
    partial_file(view, tier, day, "part-0.parquet")
}

/// The record of the history files a stored partial was computed from.
fn inputs_rel(view: &FeatureView, tier: Tier, day: i64) -> String {
    partial_file(view, tier, day, "_inputs.json")
}

fn partial_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("entity", DataType::Utf8, false),
        Field::new(
            "start",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("states", DataType::Binary, false),
    ]))
}

/// Encodes batches as one Parquet file; `url` names it in errors.
fn parquet_bytes(
    url: &str,
    schema: SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, BatchError> {
    let perr = |e: datafusion::parquet::errors::ParquetError| BatchError::Parquet {
        url: url.to_string(),
        message: e.to_string(),
    };
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, schema, None).map_err(perr)?;
    for b in batches {
        w.write(b).map_err(perr)?;
    }
    w.close().map_err(perr)?;
    Ok(buf)
}

/// Writes batches to `rel` below `loc` in one atomic put; returns the bytes written.
async fn write_parquet(
    loc: &Location,
    rel: &str,
    schema: SchemaRef,
    batches: &[RecordBatch],
) -> Result<u64, BatchError> {
    let buf = parquet_bytes(&loc.url_of(rel), schema, batches)?;
    let n = buf.len() as u64;
    loc.put(rel, buf).await?;
    Ok(n)
}

/// Reads a Parquet file's footer only (one or two ranged reads): its metadata and Arrow schema.
async fn read_footer(
    loc: &Location,
    rel: &str,
    size: u64,
) -> Result<(ParquetMetaData, SchemaRef), BatchError> {
    let perr = |message: String| BatchError::Parquet {
        url: loc.url_of(rel),
        message,
    };
    if size < 12 {
        return Err(perr(format!(
            "{size} bytes is too small for a Parquet file"
        )));
    }
    let tail_len = size.min(64 * 1024);
    let tail = loc.get_range(rel, size - tail_len..size).await?;
    let n = tail.len();
    if &tail[n - 4..] != b"PAR1" {
        return Err(perr("no Parquet magic at the end of the file".into()));
    }
    let meta_len = u32::from_le_bytes([tail[n - 8], tail[n - 7], tail[n - 6], tail[n - 5]]) as u64;
    if meta_len + 8 > size {
        return Err(perr(format!("footer length {meta_len} exceeds the file")));
    }
    let buf = if meta_len + 8 <= tail_len {
        tail.slice(n - 8 - meta_len as usize..n - 8)
    } else {
        loc.get_range(rel, size - 8 - meta_len..size - 8).await?
    };
    let metadata = ParquetMetaDataReader::decode_metadata(&buf).map_err(|e| perr(e.to_string()))?;
    let fm = metadata.file_metadata();
    let schema = parquet_to_arrow_schema(fm.schema_descr(), fm.key_value_metadata())
        .map_err(|e| perr(e.to_string()))?;
    Ok((metadata, Arc::new(schema)))
}

/// The Parquet files (name, size) of a history partition, sorted by name.
async fn parquet_files(history: &Location, rel: &str) -> Result<Vec<(String, u64)>, BatchError> {
    Ok(history
        .list(rel)
        .await?
        .into_iter()
        .filter_map(|m| {
            let name = m.location.filename()?.to_string();
            name.ends_with(".parquet").then_some((name, m.size))
        })
        .collect())
}

/// Checks every Parquet file of a history partition (`rel`, e.g. `date=2025-01-01`) has the
/// source schema, reading only the footers; returns (rows, bytes).
async fn check_partition(
    view: &FeatureView,
    history: &Location,
    rel: &str,
    files: &[(String, u64)],
) -> Result<(u64, u64), BatchError> {
    let want = arrow_schema(&view.source);
    let (mut rows, mut bytes) = (0u64, 0u64);
    for (name, size) in files {
        let file_rel = format!("{rel}/{name}");
        let url = history.url_of(&file_rel);
        let (metadata, got) = read_footer(history, &file_rel, *size).await?;
        for field in want.fields() {
            match got.field_with_name(field.name()) {
                Err(_) => {
                    return Err(BatchError::Schema {
                        url,
                        message: format!("column `{}` is missing", field.name()),
                    });
                }
                Ok(g) if g.data_type() != field.data_type() => {
                    return Err(BatchError::Schema {
                        url,
                        message: format!(
                            "column `{}` is {}, expected {}",
                            field.name(),
                            g.data_type(),
                            field.data_type()
                        ),
                    });
                }
                Ok(_) => {}
            }
        }
        rows += metadata.file_metadata().num_rows() as u64;
        bytes += size;
    }
    Ok((rows, bytes))
}

/// Runs the partial-state query of one day for `tiers`, returning per tier the rows
/// (entity, bucket start, states blob).
async fn day_partials(
    ctx: &SessionContext,
    view: &FeatureView,
    dir_url: &str,
    day: i64,
    tiers: &[(Tier, i64, i64)],
    store: &StoreTo,
) -> Result<DayPartials, BatchError> {
    let q = |what: String| move |source| BatchError::Query { what, source };
    // Per-day table names, so several days can be computed at once in one session.
    let stamp = date_of(day).replace('-', "");
    let (raw, distinct) = (format!("raw_{stamp}"), format!("distinct_{stamp}"));
    let url =
        ListingTableUrl::parse(format!("{dir_url}/")).map_err(q(format!("history {dir_url}")))?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(arrow_schema(&view.source));
    let listing = ListingTable::try_new(config).map_err(q(format!("history {dir_url}")))?;
    ctx.register_table(raw.as_str(), Arc::new(listing))
        .map_err(q("registering the history".into()))?;
    // Deduplicate the day once (read and hashed once), then every query runs on the result.
    let what = format!("deduplicating {}", date_of(day));
    let rows = ctx
        .sql(&sql::dedup_events(view, &raw, day, day + DAY_MS))
        .await
        .map_err(q(what.clone()))?
        .collect()
        .await
        .map_err(q(what.clone()));
    ctx.deregister_table(raw.as_str()).ok();
    let rows = rows?;
    tracing::debug!(day = %date_of(day), "Day deduplicated.");
    let schema = rows
        .first()
        .map_or_else(|| arrow_schema(&view.source), |b| b.schema());
    let mem = datafusion::datasource::MemTable::try_new(schema, vec![rows]).map_err(q(what))?;
    ctx.register_table(distinct.as_str(), Arc::new(mem))
        .map_err(q("registering the day".into()))?;
    let out = partials_of_distinct(ctx, view, &distinct, day, tiers, store).await;
    ctx.deregister_table(distinct.as_str()).ok();
    out
}

/// A spawned task that is aborted when dropped: when one query of a day fails, or its duplicate
/// check finds conflicts, the day's other queries stop instead of running on unawaited (the
/// scheduler keeps its process, and retries, after a failed run).
struct Aborting<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `text` on its own task (so several queries of a day use both cores).
fn spawn_query(
    ctx: &SessionContext,
    text: String,
    what: String,
) -> Aborting<Result<Vec<RecordBatch>, BatchError>> {
    let ctx = ctx.clone();
    Aborting(tokio::spawn(async move {
        let batches = match ctx.sql(&text).await {
            Ok(df) => df.collect().await,
            Err(e) => Err(e),
        };
        batches.map_err(|source| BatchError::Query { what, source })
    }))
}

/// Runs `work` on a task of its own (aborted if this future is dropped) and returns its result.
async fn on_own_task<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, BatchError>> + Send + 'static,
) -> Result<T, BatchError> {
    let mut task = Aborting(tokio::spawn(work));
    joined(&mut task.0).await
}

/// The result of a task spawned by the job (a task that panicked is an error, not a panic).
async fn joined<T>(
    task: &mut tokio::task::JoinHandle<Result<T, BatchError>>,
) -> Result<T, BatchError> {
    task.await
        .map_err(|e| BatchError::Config(format!("a task of the job failed (a bug): {e}")))?
}

/// Where a computed day's partials are stored: the offline store, and the day's inputs recorded
/// next to them (`_inputs.json`: stored partials are reused for exactly these inputs).
#[derive(Clone)]
struct StoreTo {
    offline: Location,
    inputs: Vec<u8>,
}

/// The duplicate check and the partial queries of one deduplicated day, run at once. Each tier's
/// task converts its rows and stores its file (tiles are not stored) as soon as its query is done
/// and the duplicate check has passed (a day with conflicting duplicates stores nothing, so a
/// rerun finds the conflict again): a tier that finishes early is written while the others run.
async fn partials_of_distinct(
    ctx: &SessionContext,
    view: &FeatureView,
    table: &str,
    day: i64,
    tiers: &[(Tier, i64, i64)],
    store: &StoreTo,
) -> Result<DayPartials, BatchError> {
    let mut check = spawn_query(
        ctx,
        sql::conflicting_ids_of_distinct(view, table),
        format!("the duplicate check of {}", date_of(day)),
    );
    let (passed, checked) = tokio::sync::watch::channel(false);
    let mut queries = Vec::new();
    for (tier, from, to) in tiers {
        let (from, to) = ((*from).max(day), (*to).min(day + DAY_MS));
        if from >= to {
            continue;
        }
        let text = sql::partial_states_of_distinct(view, table, tier.width(view), from, to);
        let what = format!("{} partials of {}", tier.name(), date_of(day));
        let query = spawn_query(ctx, text, what);
        let (tier, view, store) = (*tier, view.clone(), store.clone());
        let mut checked = checked.clone();
        queries.push((
            tier,
            Aborting(tokio::spawn(async move {
                let mut query = query;
                let batches = joined(&mut query.0).await?;
                let groups: usize = batches.iter().map(RecordBatch::num_rows).sum();
                tracing::debug!(tier = tier.name(), day = %date_of(day), groups, "Tier query done.");
                let parts = to_partial_batches(&batches, view.aggregations.len())?;
                // Written on a task of its own: the night goes on with the partials in memory
                // while the file is encoded (the run awaits every write before its commit).
                let write = (tier != Tier::Tile).then(|| {
                    let parts = parts.clone();
                    Aborting(tokio::spawn(async move {
                        // Dropped unpassed: the day failed its check, and this task is aborted.
                        if checked.wait_for(|ok| *ok).await.is_ok() {
                            let rel = partial_rel(&view, tier, day);
                            write_parquet(&store.offline, &rel, partial_schema(), &parts).await?;
                            let inputs = inputs_rel(&view, tier, day);
                            store.offline.put(&inputs, store.inputs).await?;
                        }
                        Ok(())
                    }))
                });
                Ok((parts, write))
            })),
        ));
    }
    let conflicts = joined(&mut check.0).await?;
    let ids: Vec<String> = conflicts
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).filter_map(move |i| match value_at(b.column(0).as_ref(), i) {
                Ok(Value::Str(s)) => Some(s),
                _ => None,
            })
        })
        .collect();
    if !ids.is_empty() {
        return Err(BatchError::ConflictingDuplicates {
            date: date_of(day),
            ids,
        });
    }
    // The receivers outlive this send (their tasks are awaited below).
    let _ = passed.send(true);
    let mut out = DayPartials::default();
    for (tier, mut task) in queries {
        let (parts, write) = joined(&mut task.0).await?;
        out.parts.insert(tier, parts);
        out.writes.extend(write);
    }
    Ok(out)
}

/// A day's computed partials, per tier, and the tasks storing them (awaited before the commit:
/// a failed write fails the run).
#[derive(Default)]
struct DayPartials {
    parts: BTreeMap<Tier, Vec<RecordBatch>>,
    writes: Vec<Aborting<Result<(), BatchError>>>,
}

/// Converts query output (entity, bucket, one Binary per aggregation) into (entity, start, blob).
fn to_partial_batches(
    batches: &[RecordBatch],
    n_aggs: usize,
) -> Result<Vec<RecordBatch>, BatchError> {
    let mut out = Vec::new();
    let mut blob = Vec::new();
    for b in batches {
        let n = b.num_rows();
        let mut e = StringBuilder::with_capacity(n, n * 8);
        let mut s = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let cols: Vec<&BinaryArray> = (0..n_aggs)
            .map(|k| b.column(2 + k).as_any().downcast_ref::<BinaryArray>())
            .collect::<Option<_>>()
            .ok_or_else(|| BatchError::Config("state columns are not Binary".into()))?;
        // The bytes of this batch's states (the arrays may be slices of a larger output).
        let state_bytes: usize = (cols.iter())
            .map(
                |c| match (c.value_offsets().first(), c.value_offsets().last()) {
                    (Some(a), Some(z)) => (*z - *a).max(0) as usize,
                    _ => 0,
                },
            )
            .sum();
        let mut st = BinaryBuilder::with_capacity(n, state_bytes);
        // The usual column types read in place; others (an integer entity) through `value_at`.
        let (entities, starts) = (
            b.column(0).as_any().downcast_ref::<StringArray>(),
            b.column(1)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>(),
        );
        for i in 0..n {
            match entities {
                Some(a) if a.is_valid(i) => e.append_value(a.value(i)),
                _ => match value_at(b.column(0).as_ref(), i) {
                    Ok(Value::Str(x)) => e.append_value(x),
                    Ok(Value::Int(x)) => e.append_value(x.to_string()),
                    other => return Err(BatchError::Config(format!("entity value {other:?}"))),
                },
            }
            match starts {
                Some(a) if a.is_valid(i) => s.append_value(a.value(i)),
                _ => {
                    let Ok(Value::Timestamp(start)) = value_at(b.column(1).as_ref(), i) else {
                        return Err(BatchError::Config("bucket is not a timestamp".into()));
                    };
                    s.append_value(start);
                }
            }
            // One blob per bucket: version byte once, then the states (see `encode_states`).
            blob.clear();
            blob.push(lambda_core::agg::STATE_FORMAT_VERSION);
            for c in &cols {
                blob.extend_from_slice(&c.value(i)[1..]);
            }
            st.append_value(&blob);
        }
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(e.finish()),
            Arc::new(s.finish()),
            Arc::new(st.finish()),
        ];
        out.push(
            RecordBatch::try_new(partial_schema(), arrays)
                .map_err(|e| BatchError::Config(e.to_string()))?,
        );
    }
    Ok(out)
}

async fn read_partials(
    offline: &Location,
    rel: &str,
    into: &mut EntityPartials,
    tier: Tier,
    from: i64,
    to: i64,
) -> Result<(), BatchError> {
    let url = offline.url_of(rel);
    let perr = |e: &dyn std::fmt::Display| BatchError::Parquet {
        url: url.clone(),
        message: e.to_string(),
    };
    let Some(data) = offline.get(rel).await? else {
        return Err(perr(&"the stored partial file disappeared"));
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)
        .and_then(|b| b.build())
        .map_err(|e| perr(&e))?;
    for b in reader {
        add_partials(&b.map_err(|e| perr(&e))?, &url, into, tier, from, to)?;
    }
    Ok(())
}

/// Adds the partials of one (entity, start, states) batch with start in `[from, to)`; `origin`
/// names the file in errors.
fn add_partials(
    b: &RecordBatch,
    origin: &str,
    into: &mut EntityPartials,
    tier: Tier,
    from: i64,
    to: i64,
) -> Result<(), BatchError> {
    let bad = |message: &str| BatchError::Schema {
        url: origin.to_string(),
        message: message.into(),
    };
    let states = b
        .column(2)
        .as_any()
        .downcast_ref::<BinaryArray>()
        .ok_or_else(|| bad("`states` is not Binary"))?;
    let entities = b
        .column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::StringArray>()
        .ok_or_else(|| bad("`entity` is not Utf8"))?;
    let starts = b
        .column(1)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()
        .ok_or_else(|| bad("`start` is not a millisecond timestamp"))?;
    if entities.null_count() + starts.null_count() + states.null_count() > 0 {
        return Err(bad("null entity, start or states"));
    }
    into.arrays.push(states.clone());
    let array = u32::try_from(into.arrays.len() - 1)
        .map_err(|_| BatchError::Config("too many partial batches".into()))?;
    for i in 0..b.num_rows() {
        let (e, start) = (entities.value(i), starts.value(i));
        if start >= from && start < to {
            let blob = (tier, start, array, i as u32);
            match into.by_entity.get_mut(e) {
                Some(v) => v.push(blob),
                None => {
                    into.by_entity.insert(e.to_string(), vec![blob]);
                }
            }
        }
    }
    Ok(())
}

/// What one day of the history needs this run ([`plan_day`]).
struct DayPlan {
    day: i64,
    /// `date=YYYY-MM-DD`, relative to the history.
    dir: String,
    /// The day's Parquet files and sizes: stored partials are valid for exactly these inputs.
    files: Vec<(String, u64)>,
    /// `files` as recorded next to the stored partials (`_inputs.json`).
    inputs: Vec<u8>,
    /// The tiers to compute, with the range each needs.
    todo: Vec<(Tier, i64, i64)>,
}

/// Plans one day: its history files, and which of the tiers that reach it (`needs`) must be
/// computed. Stored day and hour partials are reused unless `--full` or the day's files changed
/// (late events from the speed layer, corrections); tiles are always recomputed (they only cover
/// the hours before this cutoff).
async fn plan_day(
    opts: &RunOptions,
    needs: &[(Tier, i64, i64)],
    day: i64,
) -> Result<DayPlan, BatchError> {
    let view = &opts.view;
    let dir = format!("date={}", date_of(day));
    let files = parquet_files(&opts.history, &dir).await?;
    let inputs = serde_json::to_vec(&files).unwrap_or_default();
    let mut todo: Vec<(Tier, i64, i64)> = Vec::new();
    for (tier, from, to) in needs {
        if day + DAY_MS <= *from || day >= *to {
            continue;
        }
        let stored = *tier != Tier::Tile
            && !opts.full
            && opts
                .offline
                .get(&inputs_rel(view, *tier, day))
                .await?
                .as_deref()
                == Some(inputs.as_slice())
            && opts.offline.exists(&partial_rel(view, *tier, day)).await?;
        if !stored {
            todo.push((*tier, *from, *to));
        }
    }
    Ok(DayPlan {
        day,
        dir,
        files,
        inputs,
        todo,
    })
}

/// A day computed by [`compute_day`].
struct ComputedDay {
    /// History rows and bytes read.
    rows: u64,
    bytes: u64,
    /// The day's history directory (named in errors).
    dir_url: String,
    /// Per tier, the partials (entity, start, states).
    parts: BTreeMap<Tier, Vec<RecordBatch>>,
    /// The tasks storing them.
    writes: Vec<Aborting<Result<(), BatchError>>>,
}

/// Computes the planned tiers of one day (none: `None`, every tier reused) and stores its day and
/// hour partials, each with the inputs they were computed from.
async fn compute_day(
    day_ctx: &SessionContext,
    opts: &RunOptions,
    plan: DayPlan,
) -> Result<(i64, Option<ComputedDay>), BatchError> {
    let (view, day) = (&opts.view, plan.day);
    if plan.todo.is_empty() {
        return Ok((day, None));
    }
    let (rows, bytes) = check_partition(view, &opts.history, &plan.dir, &plan.files).await?;
    let dir_url = opts.history.url_of(&plan.dir);
    let store = StoreTo {
        offline: opts.offline.clone(),
        inputs: plan.inputs,
    };
    let DayPartials { parts, writes } = if bytes > 0 {
        // Stores each tier's file as soon as it is computed.
        day_partials(day_ctx, view, &dir_url, day, &plan.todo, &store).await?
    } else {
        // No history that day: empty partial files record it as done.
        let parts: BTreeMap<Tier, Vec<RecordBatch>> =
            plan.todo.iter().map(|t| (t.0, Vec::new())).collect();
        for tier in parts.keys().filter(|t| **t != Tier::Tile) {
            let rel = partial_rel(view, *tier, day);
            write_parquet(&store.offline, &rel, partial_schema(), &[]).await?;
            let inputs = inputs_rel(view, *tier, day);
            store.offline.put(&inputs, store.inputs.clone()).await?;
        }
        DayPartials {
            parts,
            writes: Vec::new(),
        }
    };
    // The computed partials are used from memory (the stored files are the same rows).
    Ok((
        day,
        Some(ComputedDay {
            rows,
            bytes,
            dir_url,
            parts,
            writes,
        }),
    ))
}

/// Rows per `batch_put` of the upload: small enough that the last chunk, written after the
/// build, is short (2 000 instead of 5 000: nights 0.583 to 0.557 s on the embedded store, whose
/// every call is one segment file and one commit), large enough to keep the per-call cost low.
const UPLOAD_CHUNK: usize = 2_000;

/// What [`build_and_upload`] made.
struct Built {
    /// Every entity's features at the cutoff, by entity, when the features file is not
    /// encoded as they are built (with hand-written SQL, or on a rerun of the committed night).
    feature_rows: Vec<(String, Vec<Value>)>,
    /// Rows of the features file.
    features_written: usize,
    /// The full rows of compacted ones (for the offline store).
    full_rows: Vec<(String, Vec<u8>)>,
    /// Batch rows uploaded, and their bytes.
    written: usize,
    row_bytes: u64,
    /// The features file, encoded while the last rows uploaded (none with hand-written SQL).
    encoded: Option<Vec<u8>>,
}

/// How [`build_and_upload`] runs.
struct Upload<'a> {
    /// Worker threads building rows.
    threads: usize,
    /// Rows to upload (for progress).
    total: usize,
    /// Features of the committed night's file, kept for entities this rerun does not rebuild.
    previous_features: Vec<(String, Vec<Value>)>,
    /// The features file (named in errors).
    features_url: &'a str,
    /// When the run started (for the logs).
    started: Instant,
}

/// Builds the rows and features of `work` (in entity order) on worker threads while another
/// thread uploads the rows to `store` in chunks of [`UPLOAD_CHUNK`] (a failed upload stops the
/// building) and this one encodes the features file as the features come (a rerun of the
/// committed night merges the committed features in and encodes them after the build).
fn build_and_upload(
    store: &dyn OnlineStore,
    builder: &RowBuild<'_>,
    work: &[(&str, Option<&[PartialBlob]>)],
    how: Upload<'_>,
    progress: &mut impl FnMut(Progress),
) -> Result<Built, BatchError> {
    let view = builder.view;
    let (total, started) = (how.total, how.started);
    let mut feature_rows: Vec<(String, Vec<Value>)> = Vec::new();
    // The features file is encoded as the features come (the work is in entity order), unless
    // hand-written SQL replaces them or the committed night's features are merged in.
    let mut streamed = match (&view.batch.sql, how.previous_features.is_empty()) {
        (None, true) => Some(FeaturesWriter::new(view, how.features_url)?),
        _ => None,
    };
    let mut stream_error = None;
    let mut full_rows: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut written, mut row_bytes, mut features_written) = (0usize, 0u64, 0usize);
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Item>>(1);
    let (ack_tx, ack_rx) = std::sync::mpsc::channel::<usize>();
    let encoded = std::thread::scope(|scope| {
        let uploader = scope.spawn(move || -> Result<(), BatchError> {
            for chunk in rx {
                handle.block_on(store.batch_put(&chunk))?;
                // The receiver outlives this thread.
                let _ = ack_tx.send(chunk.len());
            }
            Ok(())
        });
        let mut uploaded = 0;
        let mut report = |progress: &mut dyn FnMut(Progress)| {
            for n in ack_rx.try_iter() {
                uploaded += n;
                progress(Progress::Upload {
                    done: uploaded,
                    total,
                });
            }
        };
        let mut pending: Vec<Item> = Vec::new();
        let build_one =
            |(entity, parts): &(&str, Option<&[PartialBlob]>)| builder.build(entity, *parts);
        let built_ok = par_map_each(work, how.threads, build_one, |built| {
            for BuiltRow {
                item,
                full,
                features: f,
            } in built
            {
                if let Some(item) = item {
                    row_bytes += item.data.len() as u64;
                    if let Some(full) = full {
                        full_rows.push((f.0.clone(), full));
                    }
                    pending.push(item);
                    written += 1;
                }
                features_written += 1;
                match streamed.as_mut() {
                    Some(w) => {
                        if let Err(e) = w.push(&f.0, &f.1) {
                            stream_error = Some(e);
                            return false;
                        }
                    }
                    None => feature_rows.push(f),
                }
            }
            if pending.len() >= UPLOAD_CHUNK && tx.send(std::mem::take(&mut pending)).is_err() {
                return false; // the uploader failed: its error is returned below
            }
            report(progress);
            true
        });
        if built_ok.is_ok() && !pending.is_empty() {
            let _ = tx.send(pending);
        }
        drop(tx);
        tracing::debug!(view = %view.name, elapsed_s = started.elapsed().as_secs_f64(), "Rows and features built.");
        // The features file is finished here while the last rows upload (a rerun's merged with
        // the committed night's; with hand-written SQL, encoded after its query).
        let built_ok = match stream_error.take() {
            Some(e) => Err(e),
            None => built_ok,
        };
        if !how.previous_features.is_empty() {
            let fresh: BTreeSet<String> = feature_rows.iter().map(|r| r.0.clone()).collect();
            feature_rows.extend(
                how.previous_features
                    .into_iter()
                    .filter(|(e, _)| !fresh.contains(e)),
            );
            features_written = feature_rows.len();
        }
        feature_rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let encoded = match (&built_ok, &view.batch.sql, streamed.take()) {
            (Ok(()), None, Some(w)) => Some(w.finish()),
            (Ok(()), None, None) => Some(encode_features(view, how.features_url, &feature_rows)),
            _ => None,
        };
        tracing::debug!(view = %view.name, elapsed_s = started.elapsed().as_secs_f64(), "Features encoded.");
        let uploaded_ok = uploader.join().unwrap_or_else(|_| {
            Err(BatchError::Config(
                "the upload thread panicked (a bug)".into(),
            ))
        });
        report(progress);
        built_ok.and(uploaded_ok)?;
        encoded.transpose()
    })?;
    Ok(Built {
        feature_rows,
        features_written,
        full_rows,
        written,
        row_bytes,
        encoded,
    })
}

/// What each tier of `view` needs for cutoff `c` (`[C − reach, C)`, tiers without windows left
/// out), and the days those ranges touch, ascending.
fn needed_days(view: &FeatureView, c: i64) -> (Vec<(Tier, i64, i64)>, Vec<i64>) {
    let needs: Vec<(Tier, i64, i64)> = Tier::ALL
        .into_iter()
        .map(|t| (t, c - tier_reach(view, t).millis(), c))
        .filter(|(_, f, t)| f < t)
        .collect();
    let first_day = needs
        .iter()
        .map(|(_, f, _)| tile_start(*f, lambda_core::Span::days(1)))
        .min()
        .unwrap_or(c);
    let days = (first_day..c).step_by(DAY_MS as usize).collect();
    (needs, days)
}

/// Plans every day ([`plan_day`]) concurrently, in day order: each is a listing and a few small
/// reads, and each runs on a task of its own (parsing the stored inputs is work for both cores).
async fn plan_days(
    opts: &RunOptions,
    needs: &[(Tier, i64, i64)],
    days: &[i64],
) -> Result<Vec<DayPlan>, BatchError> {
    futures::stream::iter(days.iter().map(|d| {
        let (opts, needs, d) = (opts.clone(), needs.to_vec(), *d);
        on_own_task(async move { plan_day(&opts, &needs, d).await })
    }))
    .buffered(16)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect()
}

/// The days whose rows this run rewrites: every day on a rebuild, else those whose history files
/// differ from the ones the committed batch view was built from (the new day, late files).
fn changed_days(
    days: &[i64],
    rebuild: bool,
    committed: Option<&Commit>,
    day_files: &BTreeMap<String, Vec<(String, u64)>>,
) -> BTreeSet<i64> {
    days.iter()
        .copied()
        .filter(|d| {
            rebuild
                || committed.and_then(|p| p.days.get(&date_of(*d))) != day_files.get(&date_of(*d))
        })
        .collect()
}

/// What [`gather_partials`] gathers for.
struct GatherPlan<'a> {
    /// Per tier, the range `[from, to)` of bucket starts the rows need.
    needs: &'a [(Tier, i64, i64)],
    /// The days whose partials go into the rows.
    changed: &'a BTreeSet<i64>,
    /// The days planned (for progress).
    total: usize,
}

/// Takes the days as they are computed, in day order: counts what was read (with progress), and
/// adds to `rows` the tiles' partials (recomputed every run) and the day and hour partials of the
/// changed days (from memory when computed now, else from their stored files).
async fn gather_partials(
    opts: &RunOptions,
    GatherPlan {
        needs,
        changed,
        total,
    }: GatherPlan<'_>,
    mut computed: impl futures::Stream<Item = Result<(i64, Option<ComputedDay>), BatchError>> + Unpin,
    summary: &mut RunSummary,
    rows: &mut EntityPartials,
    partial_writes: &mut Vec<Aborting<Result<(), BatchError>>>,
    progress: &mut impl FnMut(Progress),
) -> Result<(), BatchError> {
    let (view, c) = (&opts.view, opts.cutoff_ms);
    let mut n = 0;
    while let Some(result) = computed.next().await {
        let (day, done) = result?;
        n += 1;
        let mut in_memory = BTreeMap::new();
        match done {
            Some(ComputedDay {
                rows: r,
                bytes: b,
                dir_url,
                parts,
                writes,
            }) => {
                partial_writes.extend(writes);
                summary.rows_in += r;
                summary.bytes_in += b;
                if b > 0 {
                    summary.days_computed += 1;
                    progress(Progress::Day {
                        date: date_of(day),
                        rows: summary.rows_in,
                        bytes: summary.bytes_in,
                        done: n,
                        total,
                    });
                }
                let (from, to) = needs
                    .iter()
                    .find(|x| x.0 == Tier::Tile)
                    .map(|x| (x.1, x.2))
                    .unwrap_or((c, c));
                for b in parts.get(&Tier::Tile).into_iter().flatten() {
                    add_partials(b, &dir_url, rows, Tier::Tile, from, to)?;
                }
                in_memory = parts;
            }
            None => summary.days_reused += 1,
        }
        if !changed.contains(&day) {
            continue;
        }
        for (tier, from, to) in needs.iter().filter(|t| t.0 != Tier::Tile) {
            if let Some(batches) = in_memory.get(tier) {
                let url = opts.offline.url_of(&partial_rel(view, *tier, day));
                for b in batches {
                    add_partials(b, &url, rows, *tier, *from, *to)?;
                }
            } else if day + DAY_MS > *from && day < *to {
                read_partials(
                    &opts.offline,
                    &partial_rel(view, *tier, day),
                    rows,
                    *tier,
                    *from,
                    *to,
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// The entities whose features may have moved since the committed night without a change of
/// their own data (a bucket of theirs left a window: [`leaving_entities`]), and, when this run
/// builds on the committed view (`incremental`), their stored rows.
async fn leaving_with_rows(
    store: &dyn OnlineStore,
    opts: &RunOptions,
    committed: Option<&Commit>,
    changed: &BTreeSet<i64>,
    incremental: bool,
) -> Result<(BTreeSet<String>, EntityMap<Vec<u8>>), BatchError> {
    let (view, c) = (&opts.view, opts.cutoff_ms);
    let leaving = match committed {
        Some(prev) if c > prev.cutoff_ms => {
            // Found on a task of its own: reading the stored partial files is CPU work that would
            // otherwise wait for the polls of the day's queries.
            let (view, offline) = (view.clone(), opts.offline.clone());
            let (from, changed) = (prev.cutoff_ms, changed.clone());
            let mut task =
                tokio::spawn(
                    async move { leaving_entities(&view, &offline, from, c, &changed).await },
                );
            joined(&mut task).await?
        }
        _ => BTreeSet::new(),
    };
    let rows = if incremental {
        previous_rows(store, view, leaving.iter().map(String::as_str)).await?
    } else {
        EntityMap::default()
    };
    Ok((leaving, rows))
}

/// Runs the job and uploads the batch rows to `store`.
pub async fn run(
    opts: &RunOptions,
    store: &dyn OnlineStore,
    mut progress: impl FnMut(Progress),
) -> Result<RunSummary, BatchError> {
    let view = &opts.view;
    let c = opts.cutoff_ms;
    if c.rem_euclid(view.speed.tile.millis()) != 0 {
        return Err(BatchError::Config(format!(
            "cutoff {} is not aligned to the tile width {}",
            format_ts(c),
            view.speed.tile
        )));
    }
    let ctx = crate::session();
    register_state_functions(&ctx, view);
    opts.history.register(&ctx);
    // Each day's queries run on one partition: the cores are kept busy by the days and tiers
    // computed at once, and a single-phase aggregation does not encode and decode every state a
    // second time between a partial and a final phase.
    let day_ctx = SessionContext::new_with_state(
        SessionStateBuilder::new_from_existing(ctx.state())
            .with_config(ctx.copied_config().with_target_partitions(1))
            .build(),
    );
    let base = &view.name;
    let mut summary = RunSummary::default();
    let (needs, days) = needed_days(view, c);
    let mut rows = EntityPartials::default();
    let started = Instant::now();
    let total = days.len();
    // 1. Plan: which tiers each day must compute (stored partials of unchanged inputs are reused).
    let plans = plan_days(opts, &needs, &days).await?;
    tracing::debug!(view = %view.name, days = plans.len(), elapsed_s = started.elapsed().as_secs_f64(), "Planned.");
    // What the online batch view already reflects decides what this run rewrites: the entities
    // with a new or changed day, or everything (a rebuild) when there is nothing to build on.
    let day_files: BTreeMap<String, Vec<(String, u64)>> = plans
        .iter()
        .map(|p| (date_of(p.day), p.files.clone()))
        .collect();
    let committed = read_commit(view, &opts.offline, store).await?;
    let fingerprint = view_fingerprint(view);
    let rebuild = rebuild_reason(opts, committed.as_ref(), &fingerprint, &day_files);
    let changed = changed_days(&days, rebuild.is_some(), committed.as_ref(), &day_files);
    match &rebuild {
        Some(why) => {
            tracing::info!(view = %view.name, reason = %why, "Rebuilding every batch row.")
        }
        None => {
            tracing::info!(view = %view.name, changed_days = changed.len(), "Rewriting the rows of entities with new or changed days.")
        }
    }
    // 2. Compute the days that need it, a few at once (one day's file is too small to keep both
    //    cores busy); results are applied in day order.
    let day_ctx = &day_ctx;
    // Each day on a task of its own: the main task stays free to poll the others (the leaving
    // entities' reads below do not wait for a day's deduplication to yield).
    let computed = futures::stream::iter(plans.into_iter().map(|plan| {
        let (ctx, opts) = (day_ctx.clone(), opts.clone());
        on_own_task(async move { compute_day(&ctx, &opts, plan).await })
    }))
    .buffered(DAYS_AT_ONCE);
    // 3. Gather the partials of the days that changed since the committed batch view (every
    //    day on a rebuild), in day order. Meanwhile (4.) find the entities whose features may
    //    have moved without a change of their own data (a bucket of theirs left a window) and
    //    read their previous rows.
    let mut partial_writes = Vec::new();
    let gather = gather_partials(
        opts,
        GatherPlan {
            needs: &needs,
            changed: &changed,
            total,
        },
        computed,
        &mut summary,
        &mut rows,
        &mut partial_writes,
        &mut progress,
    );
    let leaving = leaving_with_rows(store, opts, committed.as_ref(), &changed, rebuild.is_none());
    let (gathered, leaving) = tokio::join!(gather, leaving);
    gathered?;
    let (leaving, mut old) = leaving?;
    tracing::info!(view = %view.name, days = total, computed = summary.days_computed, changed = changed.len(), elapsed_s = started.elapsed().as_secs_f64(), "Partial states ready.");

    // 5. Rows of the changed entities (their previous rows spliced with their new days, without
    //    decoding a state), and features for them and the leaving ones.
    // Compacted rows are rewritten every night (their validity is short), from their full rows.
    let mut full_prev: EntityMap<Vec<u8>> = EntityMap::default();
    if rebuild.is_none()
        && let Some(prev) = &committed
        && let Some(rel) = &prev.full_rows
    {
        full_prev = read_full_rows(&opts.offline, rel).await?;
        for e in full_prev.keys() {
            rows.by_entity.entry(e.clone()).or_default();
        }
    }
    let arrays = &rows.arrays;
    // Previous rows of the changed entities (to splice; the leaving ones' are read), read while
    // the lists below are made. A rebuild starts from nothing.
    let missing: Vec<String> = match rebuild {
        None => (rows.by_entity.keys())
            .filter(|e| !old.contains_key(e.as_str()))
            .cloned()
            .collect(),
        Some(_) => Vec::new(),
    };
    let reading = previous_rows(store, view, missing.iter().map(String::as_str));
    let by_entity = rows.by_entity;
    let lists = async {
        let mut changed_rows: Vec<(String, Vec<PartialBlob>)> = by_entity.into_iter().collect();
        changed_rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let only_leaving: Vec<String> = {
            let changed_set: std::collections::HashSet<&str, FastHash> =
                changed_rows.iter().map(|r| r.0.as_str()).collect();
            leaving
                .iter()
                .filter(|e| !changed_set.contains(e.as_str()))
                .cloned()
                .collect()
        };
        (changed_rows, only_leaving)
    };
    let (more, (changed_rows, only_leaving)) = tokio::join!(reading, lists);
    old.extend(more?);
    old.extend(full_prev);
    tracing::info!(view = %view.name, changed = changed_rows.len(), leaving = only_leaving.len(), previous_rows = old.len(), elapsed_s = started.elapsed().as_secs_f64(), "Previous rows read.");
    let max_reach = row_tiers(view)
        .into_iter()
        .map(|t| tier_reach(view, t).millis())
        .max()
        .unwrap_or(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    // One list of work in entity order (the features file is written as it is built): the
    // changed entities (a row to write) and the leaving ones (features from their kept rows; on a
    // rebuild they have no data inside any window any more, and an empty row records it).
    let mut work: Vec<(&str, Option<&[PartialBlob]>)> = changed_rows
        .iter()
        .map(|(e, p)| (e.as_str(), Some(p.as_slice())))
        .chain(only_leaving.iter().map(|e| (e.as_str(), None)))
        .collect();
    work.sort_by(|a, b| a.0.cmp(b.0));
    let is_rebuild = rebuild.is_some();
    let builder = RowBuild {
        view,
        aggs: view.aggs(),
        plan: lambda_core::merge::FeaturePlan::new(view),
        cutoff_ms: c,
        changed_days: &changed,
        arrays,
        old: &old,
        is_rebuild,
        compact_over: opts.compact_over,
        // A row is kept until its newest data has left every window, plus the configured days.
        expires: (c + max_reach).div_euclid(1000) + opts.row_ttl_days * 86_400,
    };
    // Rows are uploaded on another thread while the next ones are built.
    let total = changed_rows.len() + if is_rebuild { only_leaving.len() } else { 0 };
    let features_rel = format!("{base}/features/cutoff={}/part-0.parquet", date_of(c));
    let features_url = opts.offline.url_of(&features_rel);
    // Rerunning the committed night keeps the entities its features file already lists (the rerun
    // only finds what changed since that night's commit).
    let previous_features = match &committed {
        Some(prev) if rebuild.is_none() && prev.cutoff_ms == c => {
            read_features(&opts.offline, &features_rel).await?
        }
        _ => Vec::new(),
    };
    let Built {
        mut feature_rows,
        features_written,
        full_rows,
        written,
        row_bytes,
        encoded,
    } = build_and_upload(
        store,
        &builder,
        &work,
        Upload {
            threads,
            total,
            previous_features,
            features_url: &features_url,
            started,
        },
        &mut progress,
    )?;
    // The previous rows are freed on another thread while the features file and the commit are
    // written (tens of thousands of allocations).
    drop(builder);
    let _ = std::thread::Builder::new().spawn(move || drop(old));
    summary.row_bytes = row_bytes;
    summary.compacted = full_rows.len();
    summary.entities = written;
    summary.features_written = features_written;
    summary.rebuild = rebuild.clone();
    tracing::info!(view = %view.name, rows = written, features = features_written, elapsed_s = started.elapsed().as_secs_f64(), "Batch rows built and uploaded.");
    if let Some(file) = &view.batch.sql {
        let hand = hand_written_features(&ctx, opts, file).await?;
        let with_data: BTreeSet<&str> = changed_rows.iter().map(|r| r.0.as_str()).collect();
        let drift = sql_drift(&feature_rows, &with_data, &hand);
        if drift > 0 {
            tracing::warn!(view = %view.name, file = %file.display(), entities = drift, "Hand-written SQL differs from the feature definition (run the parity checker for where and why).");
        }
        summary.sql_drift = Some(drift);
        feature_rows = hand;
    }
    let parquet = match encoded {
        Some(p) => p,
        None => encode_features(view, &features_url, &feature_rows)?,
    };
    opts.offline.put(&features_rel, parquet).await?;
    for mut write in partial_writes {
        joined(&mut write.0).await?;
    }
    tracing::info!(view = %view.name, elapsed_s = started.elapsed().as_secs_f64(), "Offline features written.");
    // Only now does the online view reflect this run: the next one builds on it.
    commit_night(
        opts,
        store,
        committed.as_ref(),
        (fingerprint, day_files),
        &full_rows,
    )
    .await?;
    tracing::debug!(view = %view.name, elapsed_s = started.elapsed().as_secs_f64(), "Committed.");
    Ok(summary)
}

/// The stored batch rows of `entities` (absent ones are left out).
/// Keys per `batch_get` of [`previous_rows`], and calls at once.
const READ_CHUNK: usize = 2_500;
const READS_AT_ONCE: usize = 2;

async fn previous_rows(
    store: &dyn OnlineStore,
    view: &FeatureView,
    entities: impl Iterator<Item = &str>,
) -> Result<EntityMap<Vec<u8>>, BatchError> {
    let entities: Vec<&str> = entities.collect();
    let mut out = EntityMap::with_capacity_and_hasher(entities.len(), FastHash::default());
    // A few chunks at once: the embedded store reads each on a thread of its own.
    let mut chunks = futures::stream::iter(entities.chunks(READ_CHUNK).map(|chunk| async move {
        let keys: Vec<ItemKey> = chunk
            .iter()
            .map(|e| ItemKey::batch(&view.name, e))
            .collect();
        Ok::<_, BatchError>((chunk, store.batch_get(&keys).await?))
    }))
    .buffered(READS_AT_ONCE);
    while let Some(read) = chunks.next().await {
        let (chunk, items) = read?;
        for (e, item) in chunk.iter().zip(items) {
            if let Some(item) = item {
                out.insert(e.to_string(), item.data);
            }
        }
    }
    Ok(out)
}

/// The rows of an offline features file (entity, feature values), or none if it does not exist.
async fn read_features(
    offline: &Location,
    rel: &str,
) -> Result<Vec<(String, Vec<Value>)>, BatchError> {
    let url = offline.url_of(rel);
    let perr = |e: &dyn std::fmt::Display| BatchError::Parquet {
        url: url.clone(),
        message: e.to_string(),
    };
    let Some(data) = offline.get(rel).await? else {
        return Ok(Vec::new());
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)
        .and_then(|b| b.build())
        .map_err(|e| perr(&e))?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.map_err(|e| perr(&e))?;
        for i in 0..b.num_rows() {
            let mut vals = b
                .columns()
                .iter()
                .map(|c| value_at(c.as_ref(), i))
                .collect::<Result<Vec<Value>, String>>()
                .map_err(|e| perr(&e))?;
            match vals.remove(0) {
                Value::Str(e) => out.push((e, vals)),
                other => return Err(perr(&format!("row {i}: entity is {other:?}"))),
            }
        }
    }
    Ok(out)
}

/// Maps `f` over `items` on `threads` threads that take chunks of 256 in turn (a busy entity costs
/// far more than an idle one), handing each chunk's results to `sink` on the calling thread, in
/// input order, as soon as they are ready (the threads are started once for all the chunks).
/// Stops at the first error (returned) or when `sink` returns false.
fn par_map_each<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R, BatchError> + Sync,
    mut sink: impl FnMut(Vec<R>) -> bool,
) -> Result<(), BatchError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let chunks: Vec<&[T]> = items.chunks(256).collect();
    let (next, stop) = (AtomicUsize::new(0), AtomicBool::new(false));
    let (chunks, next, stop, f) = (&chunks, &next, &stop, &f);
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<Vec<R>, BatchError>)>();
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let tx = tx.clone();
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = chunks.get(i) else { break };
                        let r: Result<Vec<R>, BatchError> = chunk.iter().map(f).collect();
                        if tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        // Results arrive in any order; they are handed on in input order.
        let mut ready = BTreeMap::new();
        let (mut expected, mut result, mut more) = (0, Ok(()), true);
        for (i, r) in rx {
            if result.is_err() || !more {
                continue;
            }
            ready.insert(i, r);
            while let Some(r) = ready.remove(&expected) {
                expected += 1;
                match r {
                    Ok(built) => more = sink(built),
                    Err(e) => result = Err(e),
                }
                if result.is_err() || !more {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let panicked = workers.into_iter().any(|w| w.join().is_err());
        if panicked && result.is_ok() {
            result = Err(BatchError::Config(
                "a worker thread panicked (a bug)".into(),
            ));
        }
        result
    })
}

/// What the online batch view reflects, recorded after a run's rows and features are written:
/// at `<offline>/<view>/view/_commit.json`, and its id in the online store (so a run pointed at
/// another store, or after a crash between the two writes, rebuilds instead of building on rows
/// that are not there).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Commit {
    /// Unique per run.
    id: String,
    /// The run's cutoff.
    cutoff_ms: i64,
    /// [`view_fingerprint`] of the view the rows were built with.
    fingerprint: String,
    /// Per history day (`YYYY-MM-DD`) the rows were built from: its Parquet files (name, size).
    days: BTreeMap<String, Vec<(String, u64)>>,
    /// The offline file holding the full rows of the entities whose online rows are compacted.
    #[serde(default)]
    full_rows: Option<String>,
}

/// Reads a full-rows file written by [`run`]: (entity, full encoded row) pairs.
async fn read_full_rows(offline: &Location, rel: &str) -> Result<EntityMap<Vec<u8>>, BatchError> {
    let bad = |message: String| BatchError::Parquet {
        url: offline.url_of(rel),
        message,
    };
    let Some(data) = offline.get(rel).await? else {
        return Err(bad("the committed full-rows file is missing".into()));
    };
    let mut r = lambda_core::codec::Reader::new(&data);
    let n = r.u64().map_err(|e| bad(e.to_string()))?;
    let mut out = EntityMap::default();
    for _ in 0..n {
        let e = r.str().map_err(|e| bad(e.to_string()))?.to_string();
        let row = r.bytes().map_err(|e| bad(e.to_string()))?.to_vec();
        out.insert(e, row);
    }
    Ok(out)
}

fn commit_rel(view: &FeatureView) -> String {
    format!("{}/view/_commit.json", view.name)
}

/// The online store's record of the last commit: a key no entity's row can have.
fn commit_key(view: &FeatureView) -> ItemKey {
    ItemKey::new(ItemKey::partition(&view.name, ""), "batch-commit")
}

/// The committed view, if the offline record and the online store agree on it.
async fn read_commit(
    view: &FeatureView,
    offline: &Location,
    store: &dyn OnlineStore,
) -> Result<Option<Commit>, BatchError> {
    let Some(bytes) = offline.get(&commit_rel(view)).await? else {
        return Ok(None);
    };
    let commit: Commit = match serde_json::from_slice(&bytes) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(file = %offline.url_of(&commit_rel(view)), error = %e, "Unreadable commit record: rebuilding every row.");
            return Ok(None);
        }
    };
    let online = store.get(&commit_key(view)).await?;
    Ok(online
        .is_some_and(|i| i.data == commit.id.as_bytes())
        .then_some(commit))
}

/// Commits the night of `opts`: the full rows of compacted entities go to a file of their own,
/// then the commit record (the view's fingerprint and the history files of each day it reflects)
/// to the offline and the online store; the previous commit's full rows file is then deleted.
async fn commit_night(
    opts: &RunOptions,
    store: &dyn OnlineStore,
    previous: Option<&Commit>,
    (fingerprint, days): (String, BTreeMap<String, Vec<(String, u64)>>),
    full_rows: &[(String, Vec<u8>)],
) -> Result<(), BatchError> {
    let view = &opts.view;
    let id = format!(
        "{}-{}-{}",
        date_of(opts.cutoff_ms),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let commit = Commit {
        full_rows: (!full_rows.is_empty())
            .then(|| format!("{}/view/full-rows-{id}.bin", view.name)),
        id,
        cutoff_ms: opts.cutoff_ms,
        fingerprint,
        days,
    };
    if let Some(rel) = &commit.full_rows {
        let mut w = lambda_core::codec::Writer::default();
        w.u64(full_rows.len() as u64);
        for (e, data) in full_rows {
            w.bytes(e.as_bytes());
            w.bytes(data);
        }
        opts.offline.put(rel, w.buf).await?;
    }
    write_commit(view, &opts.offline, store, &commit).await?;
    if let Some(rel) = previous.and_then(|p| p.full_rows.as_ref())
        && Some(rel) != commit.full_rows.as_ref()
    {
        opts.offline.delete(rel).await?;
    }
    Ok(())
}

async fn write_commit(
    view: &FeatureView,
    offline: &Location,
    store: &dyn OnlineStore,
    commit: &Commit,
) -> Result<(), BatchError> {
    let json = serde_json::to_vec_pretty(commit).map_err(|e| BatchError::Config(e.to_string()))?;
    offline.put(&commit_rel(view), json).await?;
    store
        .put(
            &Item {
                key: commit_key(view),
                data: commit.id.as_bytes().to_vec(),
                guard: None,
                expires_at: None,
            },
            lambda_store::Condition::Always,
        )
        .await?;
    Ok(())
}

/// A hash of everything the stored rows' meaning depends on (row format, source, aggregations,
/// windows, tile width): a different one means the rows cannot be built on.
fn view_fingerprint(view: &FeatureView) -> String {
    let text = format!(
        "{}|{:?}|{:?}|{:?}",
        lambda_core::merge::BATCH_ROW_VERSION,
        view.source,
        view.aggregations,
        view.speed.tile
    );
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// Why this run must rebuild every row instead of rewriting only the entities whose days
/// changed; `None` if it can build on the committed view.
fn rebuild_reason(
    opts: &RunOptions,
    committed: Option<&Commit>,
    fingerprint: &str,
    day_files: &BTreeMap<String, Vec<(String, u64)>>,
) -> Option<String> {
    let view = &opts.view;
    if opts.full {
        return Some("--full".into());
    }
    if view.batch.sql.is_some() {
        return Some("the view has hand-written SQL (it reads every day)".into());
    }
    if !row_tiers(view).iter().any(|t| *t != Tier::Tile) {
        return Some("the view has no window of a day or more (nothing is stored)".into());
    }
    let Some(prev) = committed else {
        return Some("no committed batch view in this offline store and online store".into());
    };
    if prev.fingerprint != fingerprint {
        return Some("the view definition changed since the committed batch view".into());
    }
    if opts.cutoff_ms < prev.cutoff_ms {
        return Some(format!(
            "the cutoff is before the committed view's ({})",
            format_ts(prev.cutoff_ms)
        ));
    }
    // Late files only add events; a file removed or rewritten may remove an entity from a day,
    // which only a rebuild notices.
    for (date, files) in day_files {
        if let Some(old) = prev.days.get(date)
            && !old.iter().all(|f| files.contains(f))
        {
            return Some(format!("history of {date} lost or rewrote a file"));
        }
    }
    None
}

/// The entities with a bucket that leaves one of the view's windows between the committed
/// cutoff and `cutoff` (their features change without a change of their data), from the
/// stored partial files: day files for day windows, hour files for hour windows and for tile
/// windows (day files when the view has no hour tier, a superset). Each file is read once, and
/// the days in `rewritten` are skipped (their entities get new rows anyway).
async fn leaving_entities(
    view: &FeatureView,
    offline: &Location,
    prev_cutoff: i64,
    cutoff: i64,
    rewritten: &BTreeSet<i64>,
) -> Result<BTreeSet<String>, BatchError> {
    let tiers = row_tiers(view);
    // Per stored file (tier, day): the bucket ranges [from, to) that leave a window.
    let mut files: BTreeMap<(Tier, i64), Vec<(i64, i64)>> = BTreeMap::new();
    for w in lambda_core::merge::distinct_windows(view) {
        let source = match Tier::of_window(w) {
            Tier::Tile if tiers.contains(&Tier::Hour) => Tier::Hour,
            Tier::Tile => Tier::Day,
            t => t,
        };
        let (from, to) = (prev_cutoff - w.millis(), cutoff - w.millis());
        let mut day = tile_start(from, lambda_core::Span::days(1));
        while day < to {
            if !rewritten.contains(&day) {
                files.entry((source, day)).or_default().push((from, to));
            }
            day += DAY_MS;
        }
    }
    let mut out = BTreeSet::new();
    for ((source, day), ranges) in files {
        let width = source.width(view).millis();
        let rel = partial_rel(view, source, day);
        let Some(data) = offline.get(&rel).await? else {
            continue;
        };
        let url = offline.url_of(&rel);
        let perr = |e: &dyn std::fmt::Display| BatchError::Parquet {
            url: url.clone(),
            message: e.to_string(),
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(data).map_err(|e| perr(&e))?;
        let mask =
            datafusion::parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), [0, 1]);
        for b in builder
            .with_projection(mask)
            .build()
            .map_err(|e| perr(&e))?
        {
            let b = b.map_err(|e| perr(&e))?;
            let bad = || BatchError::Schema {
                url: url.clone(),
                message: "expected `entity` Utf8 and `start` timestamp columns".into(),
            };
            let entities = b
                .column(0)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::StringArray>()
                .ok_or_else(bad)?;
            let starts = b
                .column(1)
                .as_any()
                .downcast_ref::<datafusion::arrow::array::TimestampMillisecondArray>()
                .ok_or_else(bad)?;
            for i in 0..b.num_rows() {
                let s = starts.value(i);
                let leaves = ranges.iter().any(|(from, to)| s < *to && s + width > *from);
                if leaves && !out.contains(entities.value(i)) {
                    out.insert(entities.value(i).to_string());
                }
            }
        }
    }
    Ok(out)
}

/// How many entities the hand-written SQL's features (`hand`) differ on from the definition's
/// (`ours`), compared on the entities with data (a rebuild: every one): entities whose data all
/// left the windows are not rows of the hand-written SQL.
fn sql_drift(
    ours: &[(String, Vec<Value>)],
    with_data: &BTreeSet<&str>,
    hand: &[(String, Vec<Value>)],
) -> usize {
    let ours: BTreeMap<&str, &Vec<Value>> = ours
        .iter()
        .filter(|(e, _)| with_data.contains(e.as_str()))
        .map(|(e, v)| (e.as_str(), v))
        .collect();
    hand.iter()
        .filter(|(e, v)| ours.get(e.as_str()).is_none_or(|o| !same_values(o, v)))
        .count()
        + ours.len().saturating_sub(hand.len())
}

/// Equal feature values; floats within 1e-9 relative (engines sum in different orders).
fn same_values(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Value::Float(x), Value::Float(y)) => {
                x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-300)
            }
            _ => x == y,
        })
}

/// The Arrow schema of the finalized features: `entity`, then every feature with its output type.
pub fn features_schema(view: &FeatureView) -> SchemaRef {
    let mut fields = vec![Field::new("entity", DataType::Utf8, false)];
    fields.extend(
        feature_columns(view)
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable)),
    );
    Arc::new(Schema::new(fields))
}

/// The finalized features of `view` as columns, in its feature order (NULL where a function
/// has no value, e.g. the min of no rows).
fn feature_columns(view: &FeatureView) -> Vec<lambda_core::spec::Column> {
    view.features()
        .iter()
        .map(|f| lambda_core::spec::Column {
            name: f.name.clone(),
            ty: view.aggregations[f.aggregation].aggregation.output_type,
            nullable: true,
        })
        .collect()
}

/// Runs the view's hand-written SQL (`{{cutoff}}` substituted, the source table over the history
/// days its longest window needs) and returns its rows, after checking they have exactly the
/// columns and types of [`features_schema`].
async fn hand_written_features(
    ctx: &SessionContext,
    opts: &RunOptions,
    file: &std::path::Path,
) -> Result<Vec<(String, Vec<Value>)>, BatchError> {
    let view = &opts.view;
    let bad = |message: String| BatchError::HandWrittenSql {
        file: file.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    let c = opts.cutoff_ms;
    let longest = view
        .features()
        .iter()
        .map(|f| f.window.millis() + lambda_core::time::hop(f.window).millis())
        .max()
        .unwrap_or(0);
    let mut urls = Vec::new();
    let mut day = tile_start(c - longest, lambda_core::Span::days(1));
    while day < c {
        let rel = format!("date={}", date_of(day));
        if !opts.history.list(&rel).await?.is_empty() {
            urls.push(
                ListingTableUrl::parse(format!("{}/", opts.history.url_of(&rel)))
                    .map_err(|e| bad(e.to_string()))?,
            );
        }
        day += DAY_MS;
    }
    let table = view.source.name.as_str();
    ctx.deregister_table(table).ok();
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let source: Arc<dyn datafusion::catalog::TableProvider> = if urls.is_empty() {
        let schema = arrow_schema(&view.source);
        Arc::new(
            datafusion::datasource::MemTable::try_new(schema, vec![vec![]])
                .map_err(|e| bad(e.to_string()))?,
        )
    } else {
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(arrow_schema(&view.source));
        Arc::new(ListingTable::try_new(config).map_err(|e| bad(e.to_string()))?)
    };
    ctx.register_table(table, source)
        .map_err(|e| bad(e.to_string()))?;
    let df = ctx
        .sql(&sql::render_template(&text, c))
        .await
        .map_err(|e| bad(e.to_string()))?;
    let want = features_schema(view);
    let got = df.schema().as_arrow().clone();
    if got.fields().len() != want.fields().len() {
        return Err(bad(format!(
            "{} columns, expected {}: {}",
            got.fields().len(),
            want.fields().len(),
            want.fields()
                .iter()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (k, (g, w)) in got.fields().iter().zip(want.fields()).enumerate() {
        if g.name() != w.name() || g.data_type() != w.data_type() {
            return Err(bad(format!(
                "column {} is `{}` {}, expected `{}` {}",
                k + 1,
                g.name(),
                g.data_type(),
                w.name(),
                w.data_type()
            )));
        }
    }
    let batches = df.collect().await.map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for b in &batches {
        for i in 0..b.num_rows() {
            let mut vals = Vec::with_capacity(b.num_columns());
            for col in b.columns() {
                vals.push(value_at(col.as_ref(), i).map_err(|e| bad(e.to_string()))?);
            }
            let entity = match vals.remove(0) {
                Value::Str(e) => e,
                other => return Err(bad(format!("row {i}: entity is {other:?}"))),
            };
            out.push((entity, vals));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Encodes the finalized features (entity + one column per feature, documented output types) as
/// Parquet; `url` names the file in errors.
fn encode_features(
    view: &FeatureView,
    url: &str,
    rows: &[(String, Vec<Value>)],
) -> Result<Vec<u8>, BatchError> {
    let mut w = FeaturesWriter::new(view, url)?;
    for (entity, values) in rows {
        w.push(entity, values)?;
    }
    w.finish()
}

/// Rows per row group of the features file (a multiple of the batches it is written in).
const FEATURES_ROW_GROUP: usize = 32_768;

/// Encodes an offline features file as its rows arrive, in entity order, in batches of 8 192
/// rows (the Parquet writer encodes each batch's pages at once) and row groups of
/// [`FEATURES_ROW_GROUP`] rows.
struct FeaturesWriter<'a> {
    url: &'a str,
    schema: SchemaRef,
    entities: datafusion::arrow::array::StringBuilder,
    values: lambda_core::decode::BatchBuilder,
    writer: ArrowWriter<Vec<u8>>,
    last: Option<String>,
    rows: usize,
}

impl<'a> FeaturesWriter<'a> {
    fn new(view: &FeatureView, url: &'a str) -> Result<Self, BatchError> {
        let schema = features_schema(view);
        // Row groups of 32 768 entities, each closed as it fills: the end of the build encodes
        // only the last one (one row group for the whole file left about 8 ms of encoding after
        // the last row was built, on one core).
        let props = datafusion::parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(FEATURES_ROW_GROUP))
            .build();
        let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))
            .map_err(|e| Self::error(url, e))?;
        Ok(FeaturesWriter {
            url,
            schema,
            entities: datafusion::arrow::array::StringBuilder::new(),
            values: lambda_core::decode::BatchBuilder::for_columns(&feature_columns(view)),
            writer,
            last: None,
            rows: 0,
        })
    }

    fn error(url: &str, e: impl std::fmt::Display) -> BatchError {
        BatchError::Parquet {
            url: url.to_string(),
            message: e.to_string(),
        }
    }

    /// Appends an entity's features; entities must come in order.
    fn push(&mut self, entity: &str, values: &[Value]) -> Result<(), BatchError> {
        if self.last.as_deref().is_some_and(|last| last > entity) {
            return Err(BatchError::Config(format!(
                "features of `{entity}` came after those of `{}` (a bug)",
                self.last.as_deref().unwrap_or_default()
            )));
        }
        // The previous entity's buffer is reused: no allocation per row.
        match &mut self.last {
            Some(last) => {
                last.clear();
                last.push_str(entity);
            }
            None => self.last = Some(entity.to_string()),
        }
        self.entities.append_value(entity);
        self.values.push(values);
        self.rows += 1;
        if self.values.len() >= 8_192 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BatchError> {
        let values = self.values.finish().map_err(|e| Self::error(self.url, e))?;
        let mut columns: Vec<datafusion::arrow::array::ArrayRef> =
            vec![Arc::new(self.entities.finish())];
        columns.extend(values.columns().iter().cloned());
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| Self::error(self.url, e))?;
        self.writer
            .write(&batch)
            .map_err(|e| Self::error(self.url, e))
    }

    /// The file's bytes.
    fn finish(mut self) -> Result<Vec<u8>, BatchError> {
        if !self.values.is_empty() {
            self.flush()?;
        }
        self.writer
            .into_inner()
            .map_err(|e| Self::error(self.url, e))
    }
}

/// The dates of stored partials of `tier` (for tests and status output).
pub async fn stored_days(
    offline: &Location,
    view: &str,
    tier: Tier,
) -> Result<BTreeSet<String>, BatchError> {
    Ok(offline
        .list(&format!("{view}/partials/tier={}", tier.name()))
        .await?
        .iter()
        .filter_map(|m| {
            m.location
                .parts()
                .find_map(|p| p.as_ref().strip_prefix("date=").map(String::from))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_query_task_is_cancelled() {
        // The task's future owns `guard`: cancelling the task drops it, which closes the channel.
        let (guard, closed) = tokio::sync::oneshot::channel::<()>();
        let task = Aborting(tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        }));
        drop(task);
        // Bounded so that a task left running fails the test instead of hanging it.
        let dropped = tokio::time::timeout(std::time::Duration::from_secs(10), closed).await;
        assert!(
            matches!(dropped, Ok(Err(_))),
            "the task still holds its guard"
        );
    }

    #[test]
    fn par_map_each_hands_on_every_result_in_input_order() {
        let items: Vec<u64> = (0..10_000).collect();
        let mut seen = Vec::new();
        par_map_each(
            &items,
            3,
            |x| Ok(x * 2),
            |chunk| {
                seen.extend(chunk);
                true
            },
        )
        .unwrap();
        assert_eq!(seen, items.iter().map(|x| x * 2).collect::<Vec<_>>());
    }

    #[test]
    fn par_map_each_stops_at_the_first_error_and_when_the_sink_says_so() {
        let items: Vec<u64> = (0..10_000).collect();
        let mut handed = 0;
        let err = par_map_each(
            &items,
            2,
            |x| match *x {
                3_000 => Err(BatchError::Config("item 3000".into())),
                x => Ok(x),
            },
            |chunk| {
                handed += chunk.len();
                true
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("item 3000"), "{err}");
        // Every chunk before the failing one, none after it.
        assert_eq!(handed, 3_000 / 256 * 256);
        let mut chunks = 0;
        par_map_each(
            &items,
            2,
            |x| Ok(*x),
            |_| {
                chunks += 1;
                chunks < 3
            },
        )
        .unwrap();
        assert_eq!(chunks, 3);
    }
}
