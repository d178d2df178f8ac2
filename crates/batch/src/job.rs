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
//! * **Online store**: one item per entity (`batch` sort key) holding its [`BatchRow`] with the
//!   cutoff inside, uploaded with `batch_put`: rerunning a night writes the same bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::arrow::parquet_to_arrow_schema;
use datafusion::parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use lambda_core::decode::{arrow_schema, value_at};
use lambda_core::merge::{Partial, Tier, build_batch_row, features_at_cutoff, tier_reach};
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
    /// Days a batch row stays valid in the online store (its TTL) after the cutoff.
    pub row_ttl_days: i64,
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
    /// Entities with a batch row.
    pub entities: usize,
    /// Bytes of batch rows uploaded.
    pub row_bytes: u64,
    /// With hand-written SQL: entities whose hand-written features differ from the definition's
    /// (drift; the parity checker says where and why). `None` without hand-written SQL.
    pub sql_drift: Option<usize>,
}

/// History days computed at once (each day's query also runs on several threads).
const DAYS_AT_ONCE: usize = 2;

/// (tier, bucket start, array, row): the encoded states are `arrays[array].value(row)` of the
/// [`EntityPartials`] (read files stay in their Arrow buffers, nothing is copied per partial).
type PartialBlob = (Tier, i64, u32, u32);
/// Per entity: every partial its batch row needs.
#[derive(Default)]
struct EntityPartials {
    by_entity: HashMap<String, Vec<PartialBlob>>,
    arrays: Vec<BinaryArray>,
}
/// A built batch row and the entity's finalized features at the cutoff.
type BuiltRow = (Item, (String, Vec<Value>));

fn date_of(day_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(day_ms)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
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
) -> Result<BTreeMap<Tier, Vec<RecordBatch>>, BatchError> {
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
    let schema = rows
        .first()
        .map_or_else(|| arrow_schema(&view.source), |b| b.schema());
    let mem = datafusion::datasource::MemTable::try_new(schema, vec![rows]).map_err(q(what))?;
    ctx.register_table(distinct.as_str(), Arc::new(mem))
        .map_err(q("registering the day".into()))?;
    let out = partials_of_distinct(ctx, view, &distinct, day, tiers).await;
    ctx.deregister_table(distinct.as_str()).ok();
    out
}

/// The duplicate check and the partial queries of one deduplicated day.
async fn partials_of_distinct(
    ctx: &SessionContext,
    view: &FeatureView,
    table: &str,
    day: i64,
    tiers: &[(Tier, i64, i64)],
) -> Result<BTreeMap<Tier, Vec<RecordBatch>>, BatchError> {
    let q = |what: String| move |source| BatchError::Query { what, source };
    let what = format!("the duplicate check of {}", date_of(day));
    let conflicts = ctx
        .sql(&sql::conflicting_ids_of_distinct(view, table))
        .await
        .map_err(q(what.clone()))?
        .collect()
        .await
        .map_err(q(what))?;
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
    let mut out = BTreeMap::new();
    for (tier, from, to) in tiers {
        let (from, to) = ((*from).max(day), (*to).min(day + DAY_MS));
        if from >= to {
            continue;
        }
        let text = sql::partial_states_of_distinct(view, table, tier.width(view), from, to);
        let what = format!("{} partials of {}", tier.name(), date_of(day));
        let batches = ctx
            .sql(&text)
            .await
            .map_err(q(what.clone()))?
            .collect()
            .await
            .map_err(q(what))?;
        out.insert(
            *tier,
            to_partial_batches(&batches, view.aggregations.len())?,
        );
    }
    Ok(out)
}

/// Converts query output (entity, bucket, one Binary per aggregation) into (entity, start, blob).
fn to_partial_batches(
    batches: &[RecordBatch],
    n_aggs: usize,
) -> Result<Vec<RecordBatch>, BatchError> {
    let mut out = Vec::new();
    for b in batches {
        let mut e = StringBuilder::new();
        let mut s = TimestampMillisecondBuilder::new().with_timezone("UTC");
        let mut st = BinaryBuilder::new();
        let cols: Vec<&BinaryArray> = (0..n_aggs)
            .map(|k| b.column(2 + k).as_any().downcast_ref::<BinaryArray>())
            .collect::<Option<_>>()
            .ok_or_else(|| BatchError::Config("state columns are not Binary".into()))?;
        for i in 0..b.num_rows() {
            let entity = match value_at(b.column(0).as_ref(), i) {
                Ok(Value::Str(x)) => x,
                Ok(Value::Int(x)) => x.to_string(),
                other => return Err(BatchError::Config(format!("entity value {other:?}"))),
            };
            let Ok(Value::Timestamp(start)) = value_at(b.column(1).as_ref(), i) else {
                return Err(BatchError::Config("bucket is not a timestamp".into()));
            };
            // One blob per bucket: version byte once, then the states (see `encode_states`).
            let mut blob = vec![lambda_core::agg::STATE_FORMAT_VERSION];
            for c in &cols {
                blob.extend_from_slice(&c.value(i)[1..]);
            }
            e.append_value(&entity);
            s.append_value(start);
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
    let base = &view.name;
    let mut summary = RunSummary::default();
    // What each tier needs: [C - reach, C).
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
    let mut days = Vec::new();
    let mut d = first_day;
    while d < c {
        days.push(d);
        d += DAY_MS;
    }
    let partial_path = |tier: Tier, day: i64| {
        format!(
            "{base}/partials/tier={}/date={}/part-0.parquet",
            tier.name(),
            date_of(day)
        )
    };
    let inputs_path = |tier: Tier, day: i64| {
        format!(
            "{base}/partials/tier={}/date={}/_inputs.json",
            tier.name(),
            date_of(day)
        )
    };
    let mut rows = EntityPartials::default();
    let started = Instant::now();
    let total = days.len();
    // 1. Plan: which tiers each day must compute (stored partials of unchanged inputs are reused).
    let mut plans = Vec::with_capacity(days.len());
    for day in &days {
        let dir = format!("date={}", date_of(*day));
        // The day's history files: stored partials are valid only for exactly these inputs, so
        // files added later (late events from the speed layer, corrections) recompute the day.
        let files = parquet_files(&opts.history, &dir).await?;
        let inputs = serde_json::to_vec(&files).unwrap_or_default();
        // Stored tiers (day, hour) are reused unless --full; tiles are always recomputed (they only
        // cover the hours before this cutoff).
        let mut todo: Vec<(Tier, i64, i64)> = Vec::new();
        for (tier, from, to) in &needs {
            if *day + DAY_MS <= *from || *day >= *to {
                continue;
            }
            let stored = *tier != Tier::Tile
                && !opts.full
                && opts
                    .offline
                    .get(&inputs_path(*tier, *day))
                    .await?
                    .as_deref()
                    == Some(inputs.as_slice())
                && opts.offline.exists(&partial_path(*tier, *day)).await?;
            if *tier == Tier::Tile || opts.full || !stored {
                todo.push((*tier, *from, *to));
            }
        }
        plans.push((*day, dir, files, inputs, todo));
    }
    // 2. Compute the days that need it, a few at once (one day's file is too small to keep both
    //    cores busy); results are applied in day order.
    let ctx = &ctx;
    let partial_path = &partial_path;
    let inputs_path = &inputs_path;
    let mut computed = futures::stream::iter(plans.into_iter().map(
        |(day, dir, files, inputs, todo)| async move {
            if todo.is_empty() {
                return Ok::<_, BatchError>((day, None));
            }
            let (r, b) = check_partition(view, &opts.history, &dir, &files).await?;
            let parts = if b > 0 {
                day_partials(ctx, view, &opts.history.url_of(&dir), day, &todo).await?
            } else {
                // No history that day: empty partial files record it as done.
                todo.iter().map(|t| (t.0, Vec::new())).collect()
            };
            let mut tiles = Vec::new();
            for (tier, batches) in parts {
                if tier == Tier::Tile {
                    tiles = batches;
                } else {
                    write_parquet(
                        &opts.offline,
                        &partial_path(tier, day),
                        partial_schema(),
                        &batches,
                    )
                    .await?;
                    opts.offline
                        .put(&inputs_path(tier, day), inputs.clone())
                        .await?;
                }
            }
            Ok((day, Some((r, b, opts.history.url_of(&dir), tiles))))
        },
    ))
    .buffered(DAYS_AT_ONCE);
    // 3. Gather every partial the rows need, in day order.
    let mut n = 0;
    while let Some(result) = computed.next().await {
        let (day, done) = result?;
        n += 1;
        match done {
            Some((r, b, dir_url, tiles)) => {
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
                for b in &tiles {
                    add_partials(b, &dir_url, &mut rows, Tier::Tile, from, to)?;
                }
            }
            None => summary.days_reused += 1,
        }
        for (tier, from, to) in needs.iter().filter(|t| t.0 != Tier::Tile) {
            if day + DAY_MS > *from && day < *to {
                read_partials(
                    &opts.offline,
                    &partial_path(*tier, day),
                    &mut rows,
                    *tier,
                    *from,
                    *to,
                )
                .await?;
            }
        }
    }
    tracing::info!(view = %view.name, days = total, computed = summary.days_computed, elapsed_s = started.elapsed().as_secs_f64(), "Partial states ready.");

    // Batch rows, finalized features, upload.
    let aggs = view.aggs();
    let expires = c.div_euclid(1000) + opts.row_ttl_days * 86_400;
    // Rows are independent: build them on every core (order is kept: chunks are concatenated).
    let arrays = &rows.arrays;
    let mut rows: Vec<(String, Vec<PartialBlob>)> = rows.by_entity.into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = rows.len().div_ceil(threads).max(1);
    let built: Vec<Result<Vec<BuiltRow>, BatchError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(chunk)
            .map(|part| {
                let aggs = &aggs;
                scope.spawn(move || {
                    let mut out = Vec::with_capacity(part.len());
                    for (entity, parts) in part {
                        let partials = parts
                            .iter()
                            .map(|(tier, start_ms, array, row)| {
                                let blob = arrays[*array as usize].value(*row as usize);
                                Ok(Partial {
                                    tier: *tier,
                                    start_ms: *start_ms,
                                    states: lambda_core::agg::decode_states(aggs, blob)?,
                                })
                            })
                            .collect::<Result<Vec<_>, lambda_core::agg::AggError>>()?;
                        let row = build_batch_row(view, c, &partials);
                        let features = features_at_cutoff(view, &row)?;
                        let item = Item {
                            key: ItemKey::batch(&view.name, entity),
                            data: row.encode(aggs),
                            guard: None,
                            expires_at: Some(expires),
                        };
                        out.push((item, (entity.clone(), features)));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(BatchError::Config(
                        "a row-building thread panicked (a bug)".into(),
                    ))
                })
            })
            .collect()
    });
    let mut items = Vec::with_capacity(rows.len());
    let mut feature_rows: Vec<(String, Vec<Value>)> = Vec::with_capacity(rows.len());
    for part in built {
        for (item, f) in part? {
            summary.row_bytes += item.data.len() as u64;
            items.push(item);
            feature_rows.push(f);
        }
    }
    summary.entities = items.len();
    tracing::info!(view = %view.name, entities = items.len(), elapsed_s = started.elapsed().as_secs_f64(), "Batch rows built.");
    if let Some(file) = &view.batch.sql {
        let hand = hand_written_features(ctx, opts, file).await?;
        let ours: BTreeMap<&str, &Vec<Value>> =
            feature_rows.iter().map(|(e, v)| (e.as_str(), v)).collect();
        let drift = hand
            .iter()
            .filter(|(e, v)| ours.get(e.as_str()).is_none_or(|o| !same_values(o, v)))
            .count()
            + ours.len().saturating_sub(hand.len());
        if drift > 0 {
            tracing::warn!(view = %view.name, file = %file.display(), entities = drift, "Hand-written SQL differs from the feature definition (run the parity checker for where and why).");
        }
        summary.sql_drift = Some(drift);
        feature_rows = hand;
    }
    // The features file is encoded on another core while the rows upload.
    let features_rel = format!("{base}/features/cutoff={}/part-0.parquet", date_of(c));
    let encoding = {
        let (view, url) = (view.clone(), opts.offline.url_of(&features_rel));
        tokio::task::spawn_blocking(move || encode_features(&view, &url, &feature_rows))
    };
    let total = items.len();
    for (i, chunk) in items.chunks(5_000).enumerate() {
        store.batch_put(chunk).await?;
        progress(Progress::Upload {
            done: (i * 5_000 + chunk.len()).min(total),
            total,
        });
    }
    tracing::info!(view = %view.name, elapsed_s = started.elapsed().as_secs_f64(), "Batch rows uploaded.");
    let parquet = encoding
        .await
        .map_err(|_| BatchError::Config("encoding the features file panicked (a bug)".into()))??;
    opts.offline.put(&features_rel, parquet).await?;
    tracing::info!(view = %view.name, elapsed_s = started.elapsed().as_secs_f64(), "Offline features written.");
    Ok(summary)
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
    for f in view.features() {
        let ty = view.aggregations[f.aggregation].aggregation.output_type;
        fields.push(Field::new(&f.name, ty.arrow_type(), true));
    }
    Arc::new(Schema::new(fields))
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
    let feats = view.features();
    let schema = features_schema(view);
    let source = lambda_core::spec::Source {
        name: "features".into(),
        columns: std::iter::once(lambda_core::spec::Column {
            name: "entity".into(),
            ty: lambda_core::ColumnType::String,
            nullable: false,
        })
        .chain(feats.iter().map(|f| lambda_core::spec::Column {
            name: f.name.clone(),
            ty: view.aggregations[f.aggregation].aggregation.output_type,
            nullable: true,
        }))
        .collect(),
        entity: 0,
        event_time: 0,
        event_id: 0,
    };
    let mut b = lambda_core::decode::BatchBuilder::new(&source);
    for (e, vals) in rows {
        let mut r = vec![Value::Str(e.clone())];
        r.extend(vals.iter().cloned());
        b.push(&r);
    }
    let batch = b.finish().map_err(|e| BatchError::Config(e.to_string()))?;
    let batch = RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
        .map_err(|e| BatchError::Config(e.to_string()))?;
    parquet_bytes(url, schema, &[batch])
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
