//! The shard consumer: read → decode → tile → flush → checkpoint, with an exactly-once effect on
//! the online store.
//!
//! * Every (entity, tile, shard) is one item holding the whole tile state, its applied event ids
//!   and, as its guard, the highest sequence number applied. Items are written with
//!   [`Condition::GuardAdvances`], so a replay or a zombie can never move a tile backwards.
//! * A tile first touched after a (re)start is loaded from the store; records at or below its
//!   guard are skipped. The checkpoint (position and highest event time) is written only after
//!   the tiles and sinks covering the records before it are acknowledged, so a kill at any point
//!   replays from the checkpoint into exactly the state of an uninterrupted run.
//! * Tiles are flushed every `flush_interval` (and whenever the reader is caught up), so an event
//!   is visible to serving about that long after it is read. Reading waits while a flush runs
//!   (backpressure): memory holds at most one interval of changes plus the open tiles.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use lambda_core::FeatureView;
use lambda_core::decode::EventDecoder;
use lambda_core::time::{DAY_MS, SECOND_MS};
use lambda_store::{Condition, Guard, Item, ItemKey, OnlineStore, StoreError};
use serde::{Deserialize, Serialize};

use crate::sink::{DeadLetters, LateEvents, SinkError};
use crate::source::{Record, ShardInfo, Source, SourceError};
use crate::tiler::{Applied, Seq, TileDecodeError, TileKey, Tiler, decode_tile};

/// Errors that stop a shard's consumer.
#[derive(Debug, thiserror::Error)]
pub enum SpeedError {
    /// Reading the stream.
    #[error("reading the stream")]
    Source(#[from] SourceError),
    /// Writing a sink.
    #[error("writing a sink")]
    Sink(#[from] SinkError),
    /// The online store, after retries.
    #[error("online store")]
    Store(#[from] StoreError),
    /// A stored tile cannot be read.
    #[error("stored tile {key}")]
    Tile {
        /// The item.
        key: String,
        /// The cause.
        #[source]
        source: TileDecodeError,
    },
    /// Another consumer moved this shard's checkpoint past ours: it owns the shard now.
    #[error("shard {0}: another consumer has taken it over (its checkpoint is ahead of ours)")]
    TakenOver(String),
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How often changed tiles are written (freshness).
    pub flush_interval: Duration,
    /// Records per read.
    pub batch_size: usize,
    /// How long a tile item lives after its tile ends (must exceed the batch view's reach).
    pub tile_ttl_ms: i64,
    /// Conditional writes in flight per shard.
    pub max_in_flight: usize,
    /// Flush early once this many tiles are in memory (bounds memory while catching up).
    pub max_open_tiles: usize,
    /// Wait between reads once caught up.
    pub poll_interval: Duration,
    /// Stop each shard once it is caught up (demos, tests, replays of a finite file).
    pub exit_at_end: bool,
    /// Directory of dead letters.
    pub dead_letter_dir: std::path::PathBuf,
    /// Directory (the batch history) for late events.
    pub late_dir: std::path::PathBuf,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            flush_interval: Duration::from_secs(1),
            batch_size: 10_000,
            tile_ttl_ms: 3 * DAY_MS,
            max_in_flight: 32,
            max_open_tiles: 100_000,
            poll_interval: Duration::from_millis(200),
            exit_at_end: false,
            dead_letter_dir: "data/dead-letter".into(),
            late_dir: "data/history".into(),
        }
    }
}

/// Counters of one consumer process (all shards), for logs and metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Records read.
    pub records_in: AtomicU64,
    /// Events applied to a tile.
    pub applied: AtomicU64,
    /// Duplicate deliveries skipped.
    pub duplicates: AtomicU64,
    /// Records skipped on replay (already in their tile).
    pub replayed: AtomicU64,
    /// Late events sent to the late sink.
    pub late: AtomicU64,
    /// Records sent to the dead-letter sink.
    pub dead_lettered: AtomicU64,
    /// Flushes done.
    pub flushes: AtomicU64,
    /// Tile items written.
    pub items_written: AtomicU64,
    /// Conditional writes that found a newer item (reloaded).
    pub conflicts: AtomicU64,
    /// Store errors retried.
    pub store_retries: AtomicU64,
    /// Longest flush, ms.
    pub flush_ms_max: AtomicU64,
    /// Last flush's freshness: from reading the oldest record it covers to its tiles being
    /// acknowledged, ms.
    pub freshness_ms_last: AtomicU64,
    /// Highest freshness seen, ms.
    pub freshness_ms_max: AtomicU64,
    /// Event-time lag: wall clock minus the newest event time applied, ms (last flush).
    pub event_lag_ms: AtomicI64,
    /// How far behind the stream's head the last read was (Kinesis `MillisBehindLatest`).
    pub millis_behind: AtomicI64,
    /// Freshness samples: (ms from a read to its tiles being acknowledged, records of that read);
    /// the most recent 50 000 reads.
    pub freshness: std::sync::Mutex<std::collections::VecDeque<(u32, u32)>>,
}

impl Metrics {
    fn record_freshness(&self, ms: u64, records: usize) {
        let mut f = self
            .freshness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() == 50_000 {
            f.pop_front();
        }
        f.push_back((ms.min(u64::from(u32::MAX)) as u32, records as u32));
    }

    /// The counters in the Prometheus text exposition format (served by `--metrics-addr`).
    pub fn render(&self, view: &str) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP lambda_speed_{name} {help}\n# TYPE lambda_speed_{name} {kind}\nlambda_speed_{name}{{view=\"{view}\"}} {value}\n"
            ));
        };
        metric(
            "records_total",
            "counter",
            "Records read.",
            get(&self.records_in).to_string(),
        );
        metric(
            "applied_total",
            "counter",
            "Events applied to a tile.",
            get(&self.applied).to_string(),
        );
        metric(
            "duplicates_total",
            "counter",
            "Duplicate deliveries skipped.",
            get(&self.duplicates).to_string(),
        );
        metric(
            "replayed_total",
            "counter",
            "Records skipped on replay (already in their tile).",
            get(&self.replayed).to_string(),
        );
        metric(
            "late_total",
            "counter",
            "Late events sent to the late sink.",
            get(&self.late).to_string(),
        );
        metric(
            "dead_lettered_total",
            "counter",
            "Records sent to the dead-letter sink.",
            get(&self.dead_lettered).to_string(),
        );
        metric(
            "flushes_total",
            "counter",
            "Flushes.",
            get(&self.flushes).to_string(),
        );
        metric(
            "tile_writes_total",
            "counter",
            "Tile items written.",
            get(&self.items_written).to_string(),
        );
        metric(
            "conflicts_total",
            "counter",
            "Conditional writes that found a newer tile.",
            get(&self.conflicts).to_string(),
        );
        metric(
            "store_retries_total",
            "counter",
            "Online-store calls retried (throttling, errors).",
            get(&self.store_retries).to_string(),
        );
        metric(
            "flush_ms_max",
            "gauge",
            "Longest flush, ms.",
            get(&self.flush_ms_max).to_string(),
        );
        metric(
            "event_lag_ms",
            "gauge",
            "Wall clock minus the newest event time applied, ms.",
            self.event_lag_ms.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "millis_behind_latest",
            "gauge",
            "How far behind the stream head the last read was, ms.",
            self.millis_behind.load(Ordering::Relaxed).to_string(),
        );
        for (q, name) in [(50.0, "freshness_p50_ms"), (99.0, "freshness_p99_ms")] {
            metric(
                name,
                "gauge",
                "Read to tile acknowledged, ms (record-weighted, recent reads).",
                self.freshness_percentile(q).unwrap_or(0).to_string(),
            );
        }
        out
    }

    /// Record-weighted freshness percentile `q` (0–100) in ms, over the recent reads.
    pub fn freshness_percentile(&self, q: f64) -> Option<u32> {
        let mut v: Vec<(u32, u32)> = self
            .freshness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        let total: u64 = v.iter().map(|x| u64::from(x.1)).sum();
        if total == 0 {
            return None;
        }
        v.sort_unstable();
        let target = ((q / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut acc = 0u64;
        for (ms, n) in v {
            acc += u64::from(n);
            if acc >= target {
                return Some(ms);
            }
        }
        None
    }
}

/// A shard's checkpoint: where to resume and the highest event time applied before it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Source position after the last record covered.
    pub position: Option<String>,
    /// Highest event time applied (restores the watermark).
    pub max_event_time: Option<i64>,
    /// The shard is closed and fully consumed: its children may be read.
    #[serde(default)]
    pub finished: bool,
}

/// The store key of a shard's checkpoint.
pub fn checkpoint_key(view: &str, source: &str, shard: &str) -> ItemKey {
    ItemKey::new(format!("checkpoint#{view}#{source}"), shard)
}

/// Reads a shard's checkpoint.
pub async fn load_checkpoint(
    store: &dyn OnlineStore,
    key: &ItemKey,
) -> Result<(Checkpoint, Seq), StoreError> {
    Ok(match store.get(key).await? {
        None => (Checkpoint::default(), Seq::default()),
        Some(item) => {
            let cp = serde_json::from_slice(&item.data).map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                reason: format!("checkpoint: {e}"),
            })?;
            (cp, guard_value(&item.guard))
        }
    })
}

/// Everything a shard consumer needs.
pub struct Shard<'a> {
    /// The feature view.
    pub view: &'a FeatureView,
    /// The stream.
    pub source: &'a dyn Source,
    /// The shard id.
    pub shard: String,
    /// Tiles and checkpoints.
    pub store: &'a dyn OnlineStore,
    /// Settings.
    pub config: &'a ConsumerConfig,
    /// Counters.
    pub metrics: &'a Metrics,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn guard_value(g: &Option<Guard>) -> Seq {
    g.as_ref()
        .and_then(|g| Seq::parse(g.as_padded()))
        .unwrap_or_default()
}

fn guard_of(seq: Seq) -> Guard {
    Guard::new(&seq.to_string()).unwrap_or_else(|_| Guard::from_u128(0))
}

impl Shard<'_> {
    /// Consumes the shard until `stop` turns true (then flushes and checkpoints), until it is
    /// closed and read to its end (returns `true`: finished), or, with `exit_at_end`, until it is
    /// caught up.
    pub async fn run(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<bool, SpeedError> {
        let view = self.view;
        let m = self.metrics;
        let cp_key = checkpoint_key(&view.name, &self.source.name(), &self.shard);
        let (cp, mut cp_guard) = self.retry(|| load_checkpoint(self.store, &cp_key)).await?;
        if cp.finished {
            return Ok(true);
        }
        tracing::info!(shard = %self.shard, position = ?cp.position, "Starting the shard.");
        let mut tiler = Tiler::new(view, cp.max_event_time);
        let mut reader = self
            .source
            .open(&self.shard, cp.position.as_deref())
            .await?;
        let decoder = EventDecoder::new(&view.source);
        let mut dead = DeadLetters::new(&self.config.dead_letter_dir, &self.shard);
        let mut late = LateEvents::new(&self.config.late_dir, &self.shard, &view.source);
        let mut position = cp.position.clone();
        let mut last_seq = Seq::default();
        let mut oldest_unflushed: Option<Instant> = None;
        let mut reads: Vec<(Instant, usize)> = Vec::new();
        let mut last_flush = Instant::now();
        loop {
            let stopping = *stop.borrow();
            let batch = if stopping {
                Default::default()
            } else {
                reader.next(self.config.batch_size).await?
            };
            if let Some(ms) = batch.millis_behind {
                m.millis_behind.store(ms, Ordering::Relaxed);
            }
            if !batch.records.is_empty() {
                oldest_unflushed.get_or_insert_with(Instant::now);
                reads.push((Instant::now(), batch.records.len()));
                m.records_in
                    .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
                self.apply(&batch.records, &decoder, &mut tiler, &mut dead, &mut late)
                    .await?;
                last_seq = batch.records.last().map_or(last_seq, |r| r.seq);
                position = batch.position.clone().or(position);
            }
            let due = last_flush.elapsed() >= self.config.flush_interval
                || batch.caught_up
                || stopping
                || tiler.len() >= self.config.max_open_tiles;
            if due && oldest_unflushed.is_some() {
                let started = Instant::now();
                self.flush(&mut tiler, &mut dead, &mut late).await?;
                if last_seq > cp_guard {
                    let next = Checkpoint {
                        position: position.clone(),
                        max_event_time: tiler.max_event_time(),
                        finished: false,
                    };
                    let item = Item {
                        key: cp_key.clone(),
                        data: serde_json::to_vec(&next).unwrap_or_default(),
                        guard: Some(guard_of(last_seq)),
                        expires_at: None,
                    };
                    match self
                        .retry(|| self.store.put(&item, Condition::GuardAdvances))
                        .await
                    {
                        Ok(()) => cp_guard = last_seq,
                        Err(StoreError::ConditionFailed { .. }) => {
                            return Err(SpeedError::TakenOver(self.shard.clone()));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                tiler.evict_final();
                let took = started.elapsed().as_millis() as u64;
                m.flushes.fetch_add(1, Ordering::Relaxed);
                m.flush_ms_max.fetch_max(took, Ordering::Relaxed);
                for (t, n) in reads.drain(..) {
                    m.record_freshness(t.elapsed().as_millis() as u64, n);
                }
                if let Some(t) = oldest_unflushed.take() {
                    let fresh = t.elapsed().as_millis() as u64;
                    m.freshness_ms_last.store(fresh, Ordering::Relaxed);
                    m.freshness_ms_max.fetch_max(fresh, Ordering::Relaxed);
                }
                if let Some(t) = tiler.max_event_time() {
                    m.event_lag_ms.store(now_ms() - t, Ordering::Relaxed);
                }
                last_flush = Instant::now();
            }
            if stopping {
                tracing::info!(shard = %self.shard, position = ?position, "Shard stopped cleanly.");
                return Ok(false);
            }
            if batch.closed && batch.records.is_empty() && oldest_unflushed.is_none() {
                // Everything read is flushed: mark the shard finished so its children start.
                let done = Item {
                    key: cp_key.clone(),
                    data: serde_json::to_vec(&Checkpoint {
                        position: position.clone(),
                        max_event_time: tiler.max_event_time(),
                        finished: true,
                    })
                    .unwrap_or_default(),
                    guard: Some(guard_of(Seq::MAX)),
                    expires_at: None,
                };
                match self
                    .retry(|| self.store.put(&done, Condition::GuardAdvances))
                    .await
                {
                    Ok(()) | Err(StoreError::ConditionFailed { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(shard = %self.shard, position = ?position, "Shard closed and fully consumed.");
                return Ok(true);
            }
            if batch.caught_up {
                if self.config.exit_at_end && !batch.closed {
                    tracing::info!(shard = %self.shard, position = ?position, "Shard caught up; exiting.");
                    return Ok(false);
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Decodes and applies a batch of records (loading the tiles they touch first).
    async fn apply(
        &self,
        records: &[Record],
        decoder: &EventDecoder,
        tiler: &mut Tiler,
        dead: &mut DeadLetters,
        late: &mut LateEvents,
    ) -> Result<(), SpeedError> {
        let m = self.metrics;
        let mut decoded = Vec::with_capacity(records.len());
        let mut missing: Vec<TileKey> = Vec::new();
        let mut seen = std::collections::HashSet::<TileKey, RandomState>::default();
        for r in records {
            match decoder.decode(&r.data) {
                Ok(row) => match tiler.key_of(&row) {
                    Ok(k) => {
                        if !tiler.is_loaded(&k.entity, k.tile) {
                            let key = k.tile_key();
                            if seen.insert(key.clone()) {
                                missing.push(key);
                            }
                        }
                        decoded.push((r.seq, row));
                    }
                    Err(e) => {
                        m.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        dead.push(r.seq, &e.to_string(), &r.data);
                    }
                },
                Err(e) => {
                    m.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    dead.push(r.seq, &e.to_string(), &r.data);
                }
            }
        }
        for chunk in missing.chunks(100) {
            self.load(tiler, chunk).await?;
        }
        for (seq, row) in decoded {
            let Ok(k) = tiler.key_of(&row) else { continue };
            match tiler.apply(&k, &row, seq) {
                Applied::Applied => m.applied.fetch_add(1, Ordering::Relaxed),
                Applied::Duplicate => m.duplicates.fetch_add(1, Ordering::Relaxed),
                Applied::Replayed => m.replayed.fetch_add(1, Ordering::Relaxed),
                Applied::Late => {
                    let t = k.time;
                    drop(k);
                    late.push(seq, t, row);
                    m.late.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        Ok(())
    }

    fn item_key(&self, key: &TileKey) -> ItemKey {
        ItemKey::tile(&self.view.name, &key.0, key.1, &self.shard)
    }

    /// Loads stored tiles into the tiler (absent ones start empty).
    async fn load(&self, tiler: &mut Tiler, keys: &[TileKey]) -> Result<(), SpeedError> {
        let item_keys: Vec<ItemKey> = keys.iter().map(|k| self.item_key(k)).collect();
        let items = self.retry(|| self.store.batch_get(&item_keys)).await?;
        for ((key, ik), item) in keys.iter().zip(&item_keys).zip(items) {
            let stored = match item {
                None => None,
                Some(item) => {
                    let (states, ids) =
                        decode_tile(tiler.aggs(), &item.data).map_err(|source| {
                            SpeedError::Tile {
                                key: ik.to_string(),
                                source,
                            }
                        })?;
                    Some((states, ids, guard_value(&item.guard)))
                }
            };
            tiler.insert_loaded(key.clone(), stored);
        }
        Ok(())
    }

    /// Retries a store call on errors other than a lost condition, with capped exponential
    /// backoff, until it succeeds: a throttled or unreachable store slows the consumer down
    /// (nothing is checkpointed meanwhile), it does not lose data.
    async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut wait = Duration::from_millis(50);
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(
                    e @ (StoreError::ConditionFailed { .. }
                    | StoreError::InvalidInput(_)
                    | StoreError::Corrupt { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => {
                    self.metrics.store_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(shard = %self.shard, error = %e, wait_ms = wait.as_millis() as u64, "Online store call failed; retrying.");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Makes the sinks durable, then writes every changed tile (conditionally).
    async fn flush(
        &self,
        tiler: &mut Tiler,
        dead: &mut DeadLetters,
        late: &mut LateEvents,
    ) -> Result<(), SpeedError> {
        dead.flush()?;
        for p in late.flush()? {
            tracing::info!(shard = %self.shard, file = %p.display(), "Late events written for the batch layer.");
        }
        let width = self.view.speed.tile.millis();
        let ttl = self.config.tile_ttl_ms;
        let dirty = tiler.take_dirty();
        let items: Vec<Item> = dirty
            .iter()
            .map(|(key, data, guard)| Item {
                key: self.item_key(key),
                data: data.clone(),
                guard: Some(guard_of(*guard)),
                expires_at: Some((key.1 + width + ttl).div_euclid(SECOND_MS)),
            })
            .collect();
        // Conditional writes, retried (only the failed ones) until the store takes them.
        let mut todo: Vec<usize> = (0..items.len()).collect();
        let mut reload = Vec::new();
        let mut wait = Duration::from_millis(50);
        while !todo.is_empty() {
            let batch: Vec<Item> = todo.iter().map(|&i| items[i].clone()).collect();
            let results = self.store.put_each(&batch, Condition::GuardAdvances).await;
            let mut failed = Vec::new();
            let mut last_error = None;
            for (&i, r) in todo.iter().zip(results) {
                match r {
                    Ok(()) => {
                        self.metrics.items_written.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(StoreError::ConditionFailed { .. }) => {
                        // The store already holds this tile at a newer guard (written by a
                        // consumer that got further): its content includes ours; adopt it.
                        self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                        reload.push(dirty[i].0.clone());
                    }
                    Err(e @ StoreError::InvalidInput(_)) => return Err(e.into()),
                    Err(e) => {
                        failed.push(i);
                        last_error = Some(e);
                    }
                }
            }
            if let Some(e) = last_error {
                self.metrics.store_retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(shard = %self.shard, failed = failed.len(), error = %e, wait_ms = wait.as_millis() as u64, "Tile writes failed; retrying (nothing is checkpointed meanwhile).");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            todo = failed;
        }
        for chunk in reload.chunks(100) {
            self.load(tiler, chunk).await?;
        }
        Ok(())
    }
}

/// Runs every shard of `source` in this process (one task each) until `stop` or, with
/// `exit_at_end`, until all are caught up. A shard created by resharding starts only once all of
/// its parents are finished (read to their end), so an entity's events are applied in order.
/// Returns the first error.
pub async fn run_all(
    view: Arc<FeatureView>,
    source: Arc<dyn Source>,
    store: Arc<dyn OnlineStore>,
    config: Arc<ConsumerConfig>,
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SpeedError> {
    let mut known: Vec<ShardInfo> = source.shards().await?;
    tracing::info!(shards = known.len(), source = %source.name(), "Consuming.");
    let mut finished: std::collections::HashSet<String> = Default::default();
    let mut started: std::collections::HashSet<String> = Default::default();
    let mut set = tokio::task::JoinSet::new();
    let mut first = None;
    loop {
        let ids: std::collections::HashSet<&str> = known.iter().map(|s| s.id.as_str()).collect();
        let ready: Vec<String> = known
            .iter()
            .filter(|s| !started.contains(&s.id))
            .filter(|s| {
                s.parents
                    .iter()
                    .all(|p| finished.contains(p) || !ids.contains(p.as_str()))
            })
            .map(|s| s.id.clone())
            .collect();
        for shard in ready {
            started.insert(shard.clone());
            let (view, source, store, config, metrics, stop) = (
                view.clone(),
                source.clone(),
                store.clone(),
                config.clone(),
                metrics.clone(),
                stop.clone(),
            );
            set.spawn(async move {
                let r = Shard {
                    view: &view,
                    source: source.as_ref(),
                    shard: shard.clone(),
                    store: store.as_ref(),
                    config: &config,
                    metrics: &metrics,
                }
                .run(stop)
                .await;
                (shard, r)
            });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        match done {
            Ok((shard, Ok(true))) => {
                finished.insert(shard);
                // Its children may be new: list again.
                if !*stop.borrow() {
                    known = source.shards().await?;
                }
            }
            Ok((_, Ok(false))) => {}
            Ok((shard, Err(e))) => {
                tracing::error!(%shard, error = %anyhow_chain(&e), "A shard stopped with an error.");
                first.get_or_insert(e);
            }
            Err(e) => tracing::error!(error = %e, "A shard task panicked (a bug)."),
        }
    }
    first.map_or(Ok(()), Err)
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How a consumer shares a stream's shards with other processes.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// This worker's id (unique per process, e.g. `host:pid`).
    pub worker: String,
    /// Lease length: a dead worker's shards are taken over this long after its last renewal.
    pub lease_ms: i64,
    /// How often leases are renewed and shards rebalanced (well under `lease_ms`).
    pub every: Duration,
}

struct Held {
    lease: lambda_store::lease::Lease,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<bool, SpeedError>>>,
}

impl Held {
    async fn join(&mut self) -> Option<Result<Result<bool, SpeedError>, tokio::task::JoinError>> {
        match self.task.take() {
            Some(t) => Some(t.await),
            None => None,
        }
    }
}

/// If the coordinator itself goes away (its task aborted, the process dying), its shards stop
/// with it, without a flush: exactly like a crash, which the checkpoints make harmless.
impl Drop for Held {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Runs this worker's share of `source`'s shards, coordinated through leases in `leases`
/// (KCL-style): each worker heartbeats, takes free or expired shard leases up to its fair share
/// (shards ÷ live workers, rounded up), renews them, hands one back when it holds more than its
/// share (so a new worker gets shards), and stops a shard at once if its lease was lost. A shard
/// from a reshard is taken only after its parents are finished. On `stop` every shard is flushed
/// and checkpointed and its lease released. Returns the first shard error.
#[allow(clippy::too_many_arguments)]
pub async fn run_leased(
    view: Arc<FeatureView>,
    source: Arc<dyn Source>,
    store: Arc<dyn OnlineStore>,
    leases: Arc<dyn OnlineStore>,
    config: Arc<ConsumerConfig>,
    metrics: Arc<Metrics>,
    lc: LeaseConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SpeedError> {
    use lambda_store::SystemClock;
    use lambda_store::lease::{release, renew, try_acquire};
    let scope = format!("{}#{}", view.name, source.name());
    let lease_key = |shard: &str| ItemKey::new(format!("lease#{scope}"), shard);
    let worker_key = ItemKey::new(format!("workers#{scope}"), lc.worker.clone());
    let clock = SystemClock;
    let mut held: std::collections::HashMap<String, Held> = Default::default();
    let mut finished: std::collections::HashSet<String> = Default::default();
    let mut first: Option<SpeedError> = None;
    loop {
        // Heartbeat, then count the live workers.
        let hb = Item {
            key: worker_key.clone(),
            data: lc.worker.as_bytes().to_vec(),
            guard: None,
            expires_at: Some((now_ms() + lc.lease_ms).div_euclid(SECOND_MS) + 1),
        };
        leases.put(&hb, Condition::Always).await?;
        let live_workers: Vec<String> = leases
            .query(&worker_key.pk, "", "~")
            .await?
            .into_iter()
            .map(|i| i.key.sk)
            .collect();
        let workers = live_workers.len().max(1);
        // Reap shards whose task ended.
        let ended: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.task.as_ref().is_none_or(|t| t.is_finished()))
            .map(|(s, _)| s.clone())
            .collect();
        for shard in ended {
            let Some(mut h) = held.remove(&shard) else {
                continue;
            };
            match h.join().await {
                None => {}
                Some(Ok(Ok(true))) => {
                    finished.insert(shard.clone());
                }
                Some(Ok(Ok(false))) => {}
                Some(Ok(Err(e))) => {
                    tracing::error!(%shard, error = %anyhow_chain(&e), "A shard stopped with an error.");
                    first.get_or_insert(e);
                }
                Some(Err(e)) => {
                    tracing::error!(%shard, error = %e, "A shard task panicked (a bug).")
                }
            }
            release(leases.as_ref(), &clock, &h.lease).await?;
        }
        // Renew; a lost lease stops its shard at once (another worker owns it now).
        let mut lost = Vec::new();
        for (shard, h) in held.iter_mut() {
            if !renew(leases.as_ref(), &clock, &mut h.lease, lc.lease_ms).await? {
                tracing::warn!(%shard, worker = %lc.worker, "Lease lost; stopping the shard.");
                let _ = h.stop.send(true);
                lost.push(shard.clone());
            }
        }
        for shard in lost {
            if let Some(mut h) = held.remove(&shard) {
                let _ = h.join().await;
            }
        }
        if *stop.borrow() {
            break;
        }
        // Which shards may be read: not finished, parents finished.
        let shards = source.shards().await?;
        let ids: std::collections::HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
        let keys: Vec<ItemKey> = shards
            .iter()
            .map(|s| checkpoint_key(&view.name, &source.name(), &s.id))
            .collect();
        for (s, cp) in shards.iter().zip(store.batch_get(&keys).await?) {
            if let Some(cp) = cp
                && serde_json::from_slice::<Checkpoint>(&cp.data).is_ok_and(|c| c.finished)
            {
                finished.insert(s.id.clone());
            }
        }
        let open: Vec<&ShardInfo> = shards
            .iter()
            .filter(|s| !finished.contains(&s.id))
            .collect();
        let fair = open.len().div_ceil(workers);
        // Hand one back when over the fair share, or when a live worker holds two fewer than us
        // (a new worker joined): shard counts end at most one apart.
        let mut counts: std::collections::HashMap<String, usize> =
            live_workers.iter().map(|w| (w.clone(), 0)).collect();
        for l in leases.query(&lease_key("").pk, "", "~").await? {
            if let Some(c) = counts.get_mut(String::from_utf8_lossy(&l.data).as_ref()) {
                *c += 1;
            }
        }
        // The least-loaded other live worker: we take shards only while we hold no more than it
        // (so a released shard goes to the worker that needs it, not back to us), and hand one
        // over when we hold two more.
        let others_min = counts
            .iter()
            .filter(|(w, _)| **w != lc.worker)
            .map(|(_, c)| *c)
            .min();
        let mut handed_over = false;
        if (held.len() > fair || others_min.is_some_and(|m| held.len() > m + 1))
            && let Some(shard) = held.keys().next().cloned()
            && let Some(mut h) = held.remove(&shard)
        {
            tracing::info!(%shard, worker = %lc.worker, held = held.len() + 1, fair, "Handing a shard over.");
            let _ = h.stop.send(true);
            let _ = h.join().await;
            release(leases.as_ref(), &clock, &h.lease).await?;
            handed_over = true;
        }
        for s in open {
            if handed_over || held.len() >= fair || others_min.is_some_and(|m| held.len() > m) {
                break;
            }
            if held.contains_key(&s.id)
                || !s
                    .parents
                    .iter()
                    .all(|p| finished.contains(p) || !ids.contains(p.as_str()))
            {
                continue;
            }
            let Some(lease) = try_acquire(
                leases.as_ref(),
                &clock,
                lease_key(&s.id),
                &lc.worker,
                lc.lease_ms,
            )
            .await?
            else {
                continue;
            };
            tracing::info!(shard = %s.id, worker = %lc.worker, "Took the shard's lease.");
            let (tx, rx) = tokio::sync::watch::channel(false);
            let (view, source, store, config, metrics, shard) = (
                view.clone(),
                source.clone(),
                store.clone(),
                config.clone(),
                metrics.clone(),
                s.id.clone(),
            );
            let task = tokio::spawn(async move {
                Shard {
                    view: &view,
                    source: source.as_ref(),
                    shard,
                    store: store.as_ref(),
                    config: &config,
                    metrics: &metrics,
                }
                .run(rx)
                .await
            });
            held.insert(
                s.id.clone(),
                Held {
                    lease,
                    stop: tx,
                    task: Some(task),
                },
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(lc.every) => {}
            _ = stop.changed() => {}
        }
    }
    // Clean shutdown: flush and checkpoint every shard, give the leases back, leave.
    for (_, mut h) in held.drain() {
        let _ = h.stop.send(true);
        if let Some(Ok(Err(e))) = h.join().await {
            first.get_or_insert(e);
        }
        release(leases.as_ref(), &clock, &h.lease).await?;
    }
    leases.delete(&worker_key).await?;
    first.map_or(Ok(()), Err)
}
