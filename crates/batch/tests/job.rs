//! The nightly job on the embedded default: full and incremental runs give the same rows and
//! offline features, a rerun is idempotent, the rows agree with the generated SQL, a half-done
//! upload is never read torn, and bad history files are named in the error.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::{close, examples};
use datafusion::datasource::MemTable;
use lambda_batch::job::{BatchError, RunOptions, RunSummary, run};
use lambda_batch::storage::{Location, S3Options};
use lambda_core::decode::{decode_lines, value_at};
use lambda_core::merge::{BatchRow, RowBlobs, Tile, features_at};
use lambda_core::time::{DAY_MS, HOUR_MS, MINUTE_MS, served_range, tile_start};
use lambda_core::{FeatureView, Value, sql};
use lambda_gen::{GenConfig, generate};
use lambda_store::embedded::EmbeddedStore;
use lambda_store::{Item, OnlineStore};

struct Data {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    end: i64,
}

fn data() -> Data {
    let dir = tempfile::tempdir().unwrap();
    let cfg = GenConfig {
        events: 40_000,
        days: 35,
        users: 1_500,
        seed: 11,
        ..GenConfig::default()
    };
    generate(&cfg, dir.path(), |_| {}).unwrap();
    Data {
        root: dir.path().to_path_buf(),
        end: cfg.end_ms,
        _dir: dir,
    }
}

fn local(p: &Path) -> Location {
    Location::parse(&p.display().to_string(), &S3Options::default()).unwrap()
}

fn view() -> FeatureView {
    FeatureView::load(examples().join("features.toml")).unwrap()
}

async fn run_into(
    d: &Data,
    offline: &Path,
    store: &dyn OnlineStore,
    cutoff: i64,
    full: bool,
) -> RunSummary {
    run_at(
        &local(&d.root.join("history")),
        &local(offline),
        store,
        cutoff,
        full,
    )
    .await
}

async fn run_at(
    history: &Location,
    offline: &Location,
    store: &dyn OnlineStore,
    cutoff: i64,
    full: bool,
) -> RunSummary {
    let opts = RunOptions {
        view: view(),
        history: history.clone(),
        offline: offline.clone(),
        cutoff_ms: cutoff,
        full,
        row_ttl_days: 3650,
        compact_over: lambda_batch::job::COMPACT_OVER,
    };
    run(&opts, store, |_| {}).await.unwrap()
}

async fn rows(store: &dyn OnlineStore, entities: &[String]) -> BTreeMap<String, Item> {
    let keys: Vec<_> = entities
        .iter()
        .map(|e| lambda_store::ItemKey::batch("fraud_user", e))
        .collect();
    let got = store.batch_get(&keys).await.unwrap();
    entities
        .iter()
        .cloned()
        .zip(got)
        .filter_map(|(e, i)| i.map(|i| (e, i)))
        .collect()
}

fn users() -> Vec<String> {
    (0..1_500).map(|u| format!("u{u:07}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_incremental_runs_agree_and_reruns_are_idempotent() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let full_store = EmbeddedStore::open(tmp.path().join("full.redb")).unwrap();
    let inc_store = EmbeddedStore::open(tmp.path().join("inc.redb")).unwrap();
    let s = run_into(&d, &tmp.path().join("off-full"), &full_store, d.end, true).await;
    assert!(s.entities > 100 && s.rows_in > 30_000, "{s:?}");
    // Incremental: three nights in a row.
    for back in [2, 1] {
        run_into(
            &d,
            &tmp.path().join("off-inc"),
            &inc_store,
            d.end - back * DAY_MS,
            false,
        )
        .await;
    }
    let before_last = rows(&inc_store, &users()).await;
    let last = run_into(&d, &tmp.path().join("off-inc"), &inc_store, d.end, false).await;
    assert_eq!(
        last.days_computed, 1,
        "only the new night is read: {last:?}"
    );
    assert!(last.days_reused >= 30, "{last:?}");
    assert!(
        last.rows_in * 10 < s.rows_in,
        "an incremental night reads a day, not the history: {last:?} vs {s:?}"
    );
    let (a, b) = (
        rows(&full_store, &users()).await,
        rows(&inc_store, &users()).await,
    );
    assert_eq!(a.len(), s.entities);
    assert_equivalent(&a, &b, "full vs incremental");
    // Rows rewritten by the last night kept their cold block as it was stored (only the newer
    // buckets were compressed again) where a new block would hold more days, and still read as
    // the full run's rows (above).
    fn cold(i: &Item) -> Option<lambda_core::merge::ColdBlock<'_>> {
        lambda_core::merge::cold_block(&i.data).unwrap()
    }
    let carried = b
        .iter()
        .filter(|(e, i)| {
            let Some(before) = before_last.get(*e).filter(|o| o.data != i.data) else {
                return false; // not rewritten by the last night
            };
            let (Some(old), Some(now)) = (cold(before), cold(i)) else {
                return false;
            };
            let body = lambda_core::merge::row_body(&i.data).unwrap();
            let row = RowBlobs::parse(&body).unwrap();
            let days = row.day_buckets();
            let cold_until = tile_start(d.end, lambda_core::Span::days(1))
                - lambda_batch::job::COLD_AFTER_DAYS * DAY_MS;
            let fresh_cold = days.iter().filter(|x| x.0 < cold_until).count();
            old.lz4 == now.lz4 && now.live < fresh_cold
        })
        .count();
    assert!(carried > 0, "no rewritten row kept its cold block");
    // The night rewrote only the entities with events that day; the others kept older rows.
    assert!(last.rebuild.is_none(), "{last:?}");
    assert!(
        last.entities * 2 < s.entities && last.entities > 0,
        "{last:?} vs {s:?}"
    );
    let aggs = view().aggs();
    let kept = b
        .values()
        .filter(|i| BatchRow::decode(&aggs, &i.data).unwrap().cutoff_ms < d.end)
        .count();
    assert!(kept > 0, "no entity kept an older row");
    // Offline features: the night wrote the entities whose features changed; read as of the
    // cutoff (the latest row of each entity), they equal the full run's snapshot.
    let (off_full, off_inc) = (
        local(&tmp.path().join("off-full")),
        local(&tmp.path().join("off-inc")),
    );
    let full_feats = offline_features(&off_full, "2026-01-01").await;
    let mut as_of = BTreeMap::new();
    for cutoff in ["2025-12-30", "2025-12-31", "2026-01-01"] {
        as_of.extend(offline_features(&off_inc, cutoff).await);
    }
    let delta = offline_features(&off_inc, "2026-01-01").await;
    assert!(
        delta.len() < full_feats.len(),
        "{} of {}",
        delta.len(),
        full_feats.len()
    );
    let empty = features_at(&view(), None, &[], d.end).unwrap();
    for (e, got) in &as_of {
        let want = full_feats.get(e).unwrap_or(&empty);
        assert!(same_features(got, want), "{e}: {got:?} vs {want:?}");
    }
    assert!(full_feats.keys().all(|e| as_of.contains_key(e)));
    // Rerun of the same night: the same rows, and the night's features file still lists every
    // entity whose features changed that night.
    run_into(&d, &tmp.path().join("off-inc"), &inc_store, d.end, false).await;
    assert_equivalent(&rows(&inc_store, &users()).await, &a, "rerun");
    assert_eq!(
        offline_features(&off_inc, "2026-01-01").await.len(),
        delta.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_entities_get_compacted_rows_that_serve_the_same_until_the_next_night() {
    use lambda_core::merge::{COMPACT_VALIDITY, MergeError};
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let full_store = EmbeddedStore::open(tmp.path().join("full.redb")).unwrap();
    let inc_store = EmbeddedStore::open(tmp.path().join("inc.redb")).unwrap();
    let opts = |offline: &str, cutoff: i64, full: bool, compact_over: usize| RunOptions {
        view: view(),
        history: local(&d.root.join("history")),
        offline: local(&tmp.path().join(offline)),
        cutoff_ms: cutoff,
        full,
        row_ttl_days: 3650,
        compact_over,
    };
    let s = run(
        &opts("off-full", d.end, true, usize::MAX),
        &full_store,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(s.compacted, 0);
    // Nights with a low limit: the busiest entities get compacted rows, rebuilt every night
    // from their full rows kept offline.
    let mut last = RunSummary::default();
    for back in [2, 1, 0] {
        last = run(
            &opts("off-inc", d.end - back * DAY_MS, false, 1_500),
            &inc_store,
            |_| {},
        )
        .await
        .unwrap();
    }
    assert!(last.rebuild.is_none() && last.compacted > 0, "{last:?}");
    let (a, b) = (
        rows(&full_store, &users()).await,
        rows(&inc_store, &users()).await,
    );
    assert_equivalent_until(&a, &b, "compacted vs full", COMPACT_VALIDITY.millis());
    let aggs = view().aggs();
    let compacted: Vec<BatchRow> = b
        .values()
        .map(|i| BatchRow::decode(&aggs, &i.data).unwrap())
        .filter(|r| {
            r.tiers
                .iter()
                .any(|t| t.buckets.iter().any(|x| x.1 - x.0 > DAY_MS))
        })
        .collect();
    assert!(!compacted.is_empty());
    for r in &compacted {
        assert_eq!(
            r.cutoff_ms, d.end,
            "a compacted row is rewritten every night"
        );
        // Valid until the next night; later, some window cuts a merged run and it refuses.
        let stale_later = (3..=60).any(|k| {
            matches!(
                features_at(&view(), Some(r), &[], d.end + k * DAY_MS + HOUR_MS),
                Err(MergeError::Stale { .. })
            )
        });
        assert!(stale_later);
    }
    // Their offline features come from the full rows: equal to the full run's.
    let full_feats = offline_features(&local(&tmp.path().join("off-full")), "2026-01-01").await;
    let inc_feats = offline_features(&local(&tmp.path().join("off-inc")), "2026-01-01").await;
    for (e, got) in &inc_feats {
        if let Some(want) = full_feats.get(e) {
            assert!(same_features(got, want), "{e}: {got:?} vs {want:?}");
        }
    }
}

fn same_features(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Value::Float(x), Value::Float(y)) => close(*x, *y),
            _ => x == y,
        })
}

/// Two batch views serve the same features: for every entity of either, at times from the later
/// cutoff to past the longest window (no speed tiles: these tests have no events after the
/// cutoff), floats within 1e-9 relative (DataFusion merges partial aggregates in whatever order
/// its threads finish). The rows themselves may differ: an entity whose data did not change keeps
/// its older row, which serves the same.
fn assert_equivalent(a: &BTreeMap<String, Item>, b: &BTreeMap<String, Item>, what: &str) {
    assert_equivalent_until(a, b, what, i64::MAX)
}

/// [`assert_equivalent`] at the times before `cutoff + horizon_ms` only.
fn assert_equivalent_until(
    a: &BTreeMap<String, Item>,
    b: &BTreeMap<String, Item>,
    what: &str,
    horizon_ms: i64,
) {
    let v = view();
    let aggs = v.aggs();
    let decode = |m: &BTreeMap<String, Item>, e: &str| {
        m.get(e).map(|i| BatchRow::decode(&aggs, &i.data).unwrap())
    };
    let entities: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    assert!(!entities.is_empty(), "{what}: no rows");
    let cutoff = a
        .values()
        .chain(b.values())
        .map(|i| BatchRow::decode(&aggs, &i.data).unwrap().cutoff_ms)
        .max()
        .unwrap();
    for e in entities {
        let (ra, rb) = (decode(a, e), decode(b, e));
        for dt in [
            0,
            HOUR_MS + 5 * MINUTE_MS,
            13 * HOUR_MS,
            DAY_MS + 7 * HOUR_MS,
            29 * DAY_MS,
            89 * DAY_MS + 3 * HOUR_MS,
            95 * DAY_MS,
        ]
        .into_iter()
        .filter(|dt| *dt < horizon_ms)
        {
            let t = cutoff + dt;
            let fa = features_at(&v, ra.as_ref(), &[], t).unwrap();
            let fb = features_at(&v, rb.as_ref(), &[], t).unwrap();
            for (k, (x, y)) in fa.iter().zip(&fb).enumerate() {
                let ok = match (x, y) {
                    (Value::Float(x), Value::Float(y)) => close(*x, *y),
                    _ => x == y,
                };
                assert!(
                    ok,
                    "{what}: {e} {} at cutoff + {} h: {x:?} vs {y:?}",
                    v.features()[k].name,
                    dt / HOUR_MS
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rows_agree_with_the_generated_sql() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(tmp.path().join("s.redb")).unwrap();
    run_into(&d, &tmp.path().join("off"), &store, d.end, false).await;
    let v = view();
    let aggs = v.aggs();
    // The generated SQL over the same history, as of the cutoff.
    let text = std::fs::read(d.root.join("stream/events.jsonl")).unwrap();
    let (batch, _) = decode_lines(&v.source, &text).unwrap();
    let ctx = lambda_batch::session();
    ctx.register_table(
        "transactions",
        Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let out = ctx
        .sql(&sql::features_as_of(&v, "transactions", d.end))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let stored = rows(&store, &users()).await;
    let mut n = 0;
    for b in &out {
        for i in 0..b.num_rows() {
            let Value::Str(e) = value_at(b.column(0).as_ref(), i).unwrap() else {
                panic!()
            };
            let row = BatchRow::decode(&aggs, &stored[&e].data).unwrap();
            assert_eq!(row.cutoff_ms, d.end);
            let served = features_at(&v, Some(&row), &[], d.end).unwrap();
            for (k, got) in served.iter().enumerate() {
                let want = value_at(b.column(k + 1).as_ref(), i).unwrap();
                let ok = match (got, &want) {
                    (Value::Float(x), Value::Float(y)) => close(*x, *y),
                    _ => *got == want,
                };
                assert!(
                    ok,
                    "{e} {}: batch row {got:?}, SQL {want:?}",
                    v.features()[k].name
                );
                n += 1;
            }
        }
    }
    assert!(n > 100 * 35, "{n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_done_upload_is_never_read_torn() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(tmp.path().join("s.redb")).unwrap();
    let (history, offline) = (
        local(&d.root.join("history")),
        local(&tmp.path().join("off")),
    );
    half_done_upload_serves_exactly(&d, &history, &offline, &store).await;
}

/// Uploads night N into `store`, then only half of night N+1's rows; every entity must still be
/// served exactly (the rows of either night merged with speed tiles from their own cutoff).
async fn half_done_upload_serves_exactly(
    d: &Data,
    history: &Location,
    offline: &Location,
    store: &dyn OnlineStore,
) {
    let tmp = tempfile::tempdir().unwrap();
    let v = view();
    let aggs = v.aggs();
    let old = d.end - DAY_MS;
    run_at(history, offline, store, old, false).await;
    // The next night's rows, of which only half reach the store before the lookup.
    let next = EmbeddedStore::open(tmp.path().join("next.redb")).unwrap();
    run_at(history, offline, &next, d.end, false).await;
    let new_rows = rows(&next, &users()).await;
    let half: Vec<Item> = new_rows
        .values()
        .take(new_rows.len() / 2)
        .cloned()
        .collect();
    store.batch_put(&half).await.unwrap();
    // Speed tiles from every event after the old cutoff (what the speed layer holds).
    let text = std::fs::read(d.root.join("stream/events.jsonl")).unwrap();
    let (batch, _) = decode_lines(&v.source, &text).unwrap();
    let mut tiles: BTreeMap<String, BTreeMap<i64, Vec<_>>> = BTreeMap::new();
    let mut events: BTreeMap<String, Vec<(Vec<Value>, i64, String)>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..batch.num_rows() {
        let row: Vec<Value> = batch
            .columns()
            .iter()
            .map(|c| value_at(c.as_ref(), i).unwrap())
            .collect();
        let (Value::Str(id), Value::Str(e), Value::Timestamp(ts)) = (&row[0], &row[1], &row[7])
        else {
            panic!()
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        events
            .entry(e.clone())
            .or_default()
            .push((row.clone(), *ts, id.clone()));
        if *ts >= old {
            let s = tiles
                .entry(e.clone())
                .or_default()
                .entry(tile_start(*ts, v.speed.tile))
                .or_insert_with(|| lambda_core::agg::empty_states(&aggs));
            lambda_core::agg::update_all(&aggs, s, &row, *ts, id);
        }
    }
    let t = d.end; // every event is before t
    let stored = rows(store, &users()).await;
    let (mut with_new, mut with_old) = (0, 0);
    for (e, item) in &stored {
        let row = BatchRow::decode(&aggs, &item.data).unwrap();
        if row.cutoff_ms == d.end {
            with_new += 1
        } else {
            with_old += 1
        }
        let ts: Vec<Tile> = tiles
            .get(e)
            .map(|m| {
                m.iter()
                    .map(|(s, st)| Tile {
                        start_ms: *s,
                        states: st.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let served = features_at(&v, Some(&row), &ts, t).unwrap();
        for (k, f) in v.features().iter().enumerate() {
            let a = &aggs[f.aggregation];
            let (s, en) = served_range(t, f.window);
            let mut st = a.empty();
            for (r, ets, id) in events.get(e).into_iter().flatten() {
                if *ets >= s && *ets < en {
                    a.update(&mut st, r, *ets, id);
                }
            }
            let want = a.finalize(&st).unwrap();
            let ok = match (&served[k], &want) {
                (Value::Float(x), Value::Float(y)) => close(*x, *y),
                (x, y) => x == y,
            };
            assert!(
                ok,
                "{e} {}: served {:?}, want {want:?} (row cutoff {})",
                f.name, served[k], row.cutoff_ms
            );
        }
    }
    assert!(
        with_new > 10 && with_old > 10,
        "{with_new} new, {with_old} old"
    );
    let _ = (HOUR_MS, MINUTE_MS);
}

/// Reads the offline features of a cutoff: entity → values.
async fn offline_features(offline: &Location, cutoff: &str) -> BTreeMap<String, Vec<Value>> {
    let data = offline
        .get(&format!(
            "fraud_user/features/cutoff={cutoff}/part-0.parquet"
        ))
        .await
        .unwrap()
        .expect("features file");
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
            .unwrap()
            .build()
            .unwrap();
    let mut out = BTreeMap::new();
    for b in reader {
        let b = b.unwrap();
        for i in 0..b.num_rows() {
            let mut vals: Vec<Value> = b
                .columns()
                .iter()
                .map(|c| value_at(c.as_ref(), i).unwrap())
                .collect();
            let Value::Str(e) = vals.remove(0) else {
                panic!()
            };
            out.insert(e, vals);
        }
    }
    out
}

/// A view's hand-written SQL (started from `lambda-batch sql --template`) writes the offline
/// features; unchanged it agrees with the definition everywhere, a changed filter is reported as
/// drift, and wrong columns or broken SQL are errors naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_sql_writes_the_offline_features() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let history = local(&d.root.join("history"));
    let store = EmbeddedStore::open(tmp.path().join("s.redb")).unwrap();
    let generated = local(&tmp.path().join("off-generated"));
    run_at(&history, &generated, &store, d.end, false).await;
    let want = offline_features(&generated, "2026-01-01").await;
    assert!(want.len() > 100);
    let file = tmp.path().join("custom.sql");
    let template = sql::features_template(&view(), "transactions");
    let run_sql = |text: String, dir: &str| {
        std::fs::write(&file, text).unwrap();
        let mut v = view();
        v.batch.sql = Some(file.clone());
        let opts = RunOptions {
            view: v,
            history: history.clone(),
            offline: local(&tmp.path().join(dir)),
            cutoff_ms: d.end,
            full: false,
            row_ttl_days: 3650,
            compact_over: lambda_batch::job::COMPACT_OVER,
        };
        let store = &store;
        async move { (run(&opts, store, |_| {}).await, opts.offline) }
    };
    // The template itself: no drift, the same features.
    let (s, off) = run_sql(template.clone(), "off-hand").await;
    assert_eq!(s.unwrap().sql_drift, Some(0));
    let got = offline_features(&off, "2026-01-01").await;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (e, w) in &want {
        for (k, (a, b)) in got[e].iter().zip(w).enumerate() {
            let ok = match (a, b) {
                (Value::Float(x), Value::Float(y)) => close(*x, *y),
                _ => a == b,
            };
            assert!(ok, "{e} feature {k}: hand-written {a:?}, generated {b:?}");
        }
    }
    // A hand edit that counts every event type: drift, and the file holds the hand-written values.
    let edited = template.replacen(
        "INTERVAL '90 days' AND \"event_type\" = 'purchase') AS BIGINT) AS \"txn_count_90d\"",
        "INTERVAL '90 days') AS BIGINT) AS \"txn_count_90d\"",
        1,
    );
    assert_ne!(edited, template);
    let (s, off) = run_sql(edited, "off-drift").await;
    let drift = s.unwrap().sql_drift.unwrap();
    assert!(drift > 50, "{drift}");
    let got = offline_features(&off, "2026-01-01").await;
    assert!(got.iter().any(|(e, v)| v[4] != want[e][4]));
    // Wrong output type, then SQL that does not parse: errors naming the file and the column.
    let wrong = template.replacen(
        "AS BIGINT) AS \"txn_count_5m\"",
        "AS DOUBLE) AS \"txn_count_5m\"",
        1,
    );
    assert_ne!(wrong, template);
    let e = run_sql(wrong, "off-wrong").await.0.unwrap_err().to_string();
    assert!(
        e.contains("custom.sql")
            && e.contains("column 2 is `txn_count_5m` Float64, expected `txn_count_5m` Int64"),
        "{e}"
    );
    let e = run_sql("SELEKT 1".into(), "off-broken")
        .await
        .0
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("hand-written SQL") && e.contains("custom.sql"),
        "{e}"
    );
}

/// A purchase of user `u0000001` (no merchant, card presence unknown) as a history row.
fn purchase(id: &str, amount: i128, ts: i64) -> Vec<Value> {
    vec![
        Value::Str(id.into()),
        Value::Str("u0000001".into()),
        Value::Null,
        Value::Str("p".into()),
        Value::Str("purchase".into()),
        Value::Decimal(amount),
        Value::Null,
        Value::Timestamp(ts),
    ]
}

fn write_parquet(path: &Path, batch: &datafusion::arrow::array::RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

#[tokio::test]
async fn bad_history_files_are_named() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(tmp.path().join("s.redb")).unwrap();
    let day_dir = d.root.join("history/date=2025-12-31");
    // A corrupt file.
    std::fs::write(
        day_dir.join("zz-corrupt.parquet"),
        b"PAR1 this is not parquet",
    )
    .unwrap();
    let opts = RunOptions {
        view: view(),
        history: local(&d.root.join("history")),
        offline: local(&tmp.path().join("off")),
        cutoff_ms: d.end,
        full: false,
        row_ttl_days: 3650,
        compact_over: lambda_batch::job::COMPACT_OVER,
    };
    let e = run(&opts, &store, |_| {}).await.unwrap_err();
    assert!(matches!(e, BatchError::Parquet { .. }), "{e}");
    assert!(e.to_string().contains("zz-corrupt.parquet"), "{e}");
    std::fs::remove_file(day_dir.join("zz-corrupt.parquet")).unwrap();
    // A file with another schema: amount as float64.
    let v = view();
    let mut cols = v.source.columns.clone();
    cols[5].ty = lambda_core::ColumnType::Float64;
    let src = lambda_core::spec::Source {
        columns: cols,
        ..v.source.clone()
    };
    let mut b = lambda_core::decode::BatchBuilder::new(&src);
    b.push(&[
        Value::Str("x".into()),
        Value::Str("u".into()),
        Value::Null,
        Value::Str("p".into()),
        Value::Str("view".into()),
        Value::Float(1.5),
        Value::Null,
        Value::Timestamp(d.end - 1),
    ]);
    write_parquet(&day_dir.join("zz-wrong.parquet"), &b.finish().unwrap());
    let e = run(&opts, &store, |_| {}).await.unwrap_err();
    assert!(
        e.to_string().contains(
            "zz-wrong.parquet: wrong schema: column `amount` is Float64, expected Decimal128(10, 2)"
        ),
        "{e}"
    );
    std::fs::remove_file(day_dir.join("zz-wrong.parquet")).unwrap();
    // Two deliveries of one event that differ: the job refuses to guess which one is right.
    let mut b = lambda_core::decode::BatchBuilder::new(&v.source);
    for amount in [100, 200] {
        b.push(&purchase("e-conflict", amount, d.end - 1000));
    }
    write_parquet(&day_dir.join("zz-conflict.parquet"), &b.finish().unwrap());
    let e = run(&opts, &store, |_| {}).await.unwrap_err();
    assert!(
        matches!(&e, BatchError::ConflictingDuplicates { ids, .. } if ids == &["e-conflict".to_string()]),
        "{e}"
    );
    assert!(e.to_string().contains("2025-12-31"), "{e}");
    // Nor were the day's partials stored (a tier's query may finish before the check): a rerun
    // finds the conflict again instead of reusing them.
    let again = run(&opts, &store, |_| {}).await.unwrap_err();
    assert!(
        matches!(&again, BatchError::ConflictingDuplicates { .. }),
        "{again}"
    );
    // Nothing was uploaded by the failed runs.
    assert!(
        store
            .get(&lambda_store::ItemKey::batch("fraud_user", "u0000000"))
            .await
            .unwrap()
            .is_none()
    );
}

fn aws_endpoint(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `make test` (it starts the local AWS emulators)")
    })
}

fn s3_options() -> S3Options {
    S3Options {
        region: Some("us-east-1".into()),
        endpoint: Some(aws_endpoint("LAMBDA_TEST_S3_ENDPOINT")),
        static_credentials: Some(("test".into(), "test".into())),
    }
}

/// Creates a bucket on the S3 emulator (buckets come from the infra template in production).
async fn create_bucket(name: &str) {
    let url = format!("{}/{name}", aws_endpoint("LAMBDA_TEST_S3_ENDPOINT"));
    let r = reqwest::Client::new().put(&url).send().await.unwrap();
    assert!(
        r.status().is_success(),
        "creating bucket {name}: {}",
        r.status()
    );
}

/// Copies the generated local history into an S3 location through the job's own storage layer.
async fn upload_dir(from: &Path, to: &Location) {
    let mut stack = vec![from.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(from).unwrap().display().to_string();
                to.put(&rel, std::fs::read(&p).unwrap()).await.unwrap();
            }
        }
    }
}

async fn dynamo_table(name: &str) -> lambda_store::dynamo::DynamoStore {
    use lambda_store::dynamo::{DynamoConfig, DynamoStore};
    let mut cfg = DynamoConfig::new(name, "us-east-1");
    cfg.endpoint = Some(aws_endpoint("LAMBDA_TEST_DYNAMODB_ENDPOINT"));
    cfg.static_credentials = Some(("test".into(), "test".into()));
    let dynamo = DynamoStore::connect(cfg).await;
    dynamo.create_table().await.unwrap();
    dynamo
}

/// The whole job on the local AWS emulators — history and offline store on S3 (moto), batch rows
/// in DynamoDB (DynamoDB Local), both started by `make test` — gives the rows of the embedded
/// default; full and incremental agree, a rerun is idempotent, a half-done upload is never torn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_and_dynamodb_like_the_embedded_default() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let tag = format!("{}-{}", std::process::id(), d.end);
    let bucket = format!("lambda-test-{tag}");
    create_bucket(&bucket).await;
    let s3 = s3_options();
    let history = Location::parse(&format!("s3://{bucket}/events/history"), &s3).unwrap();
    upload_dir(&d.root.join("history"), &history).await;
    let (off_full, off_inc, off_torn) = (
        Location::parse(&format!("s3://{bucket}/offline-full"), &s3).unwrap(),
        Location::parse(&format!("s3://{bucket}/offline-inc"), &s3).unwrap(),
        Location::parse(&format!("s3://{bucket}/offline-torn"), &s3).unwrap(),
    );
    let full = dynamo_table(&format!("lambda-batch-full-{tag}")).await;
    let inc = dynamo_table(&format!("lambda-batch-inc-{tag}")).await;
    let s = run_at(&history, &off_full, &full, d.end, true).await;
    assert!(s.entities > 100 && s.rows_in > 30_000, "{s:?}");
    for back in [2, 1] {
        run_at(&history, &off_inc, &inc, d.end - back * DAY_MS, false).await;
    }
    let last = run_at(&history, &off_inc, &inc, d.end, false).await;
    assert_eq!(
        last.days_computed, 1,
        "only the new night is read: {last:?}"
    );
    let stored =
        lambda_batch::job::stored_days(&off_inc, "fraud_user", lambda_core::merge::Tier::Day)
            .await
            .unwrap();
    assert!(
        stored.contains("2025-12-31") && stored.len() >= 30,
        "{stored:?}"
    );
    let features = off_inc
        .get("fraud_user/features/cutoff=2026-01-01/part-0.parquet")
        .await
        .unwrap()
        .expect("features on S3");
    assert!(features.len() > 1000);
    // The embedded default over the local copy of the same history.
    let embedded = EmbeddedStore::open(tmp.path().join("e.redb")).unwrap();
    run_into(&d, &tmp.path().join("off"), &embedded, d.end, false).await;
    let (a, b, e) = (
        rows(&full, &users()).await,
        rows(&inc, &users()).await,
        rows(&embedded, &users()).await,
    );
    assert_eq!(a.len(), s.entities);
    assert_equivalent(&a, &b, "S3+DynamoDB full vs incremental");
    assert_equivalent(&a, &e, "S3+DynamoDB vs embedded");
    // A rerun of the night writes the same rows.
    run_at(&history, &off_inc, &inc, d.end, false).await;
    assert_equivalent(&rows(&inc, &users()).await, &b, "rerun on DynamoDB");
    // A half-done upload to DynamoDB is never read torn.
    let torn = dynamo_table(&format!("lambda-batch-torn-{tag}")).await;
    half_done_upload_serves_exactly(&d, &history, &off_torn, &torn).await;
    for t in [full, inc, torn] {
        t.delete_table().await.unwrap();
    }
}

/// A missing bucket or a dead endpoint is an error naming the object, and nothing is uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_history_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(tmp.path().join("s.redb")).unwrap();
    let s3 = s3_options();
    let dead = S3Options {
        endpoint: Some("http://127.0.0.1:9".into()),
        ..s3.clone()
    };
    for (text, s3) in [("s3://no-such-bucket-lambda/h", &s3), ("s3://b/h", &dead)] {
        let opts = RunOptions {
            view: view(),
            history: Location::parse(text, s3).unwrap(),
            offline: local(&tmp.path().join("off")),
            cutoff_ms: 1_767_225_600_000,
            full: false,
            row_ttl_days: 3650,
            compact_over: lambda_batch::job::COMPACT_OVER,
        };
        let e = run(&opts, &store, |_| {}).await.unwrap_err();
        let msg = format!("{e}");
        assert!(msg.contains(&format!("{text}/date=")), "{text}: {msg}");
        assert!(
            store
                .query("fraud_user#u0000000", "", "~")
                .await
                .unwrap()
                .is_empty(),
            "nothing uploaded"
        );
    }
}

/// Uploading to a throttled table (DynamoDB Local behind the fault-injecting proxy: the first 150
/// BatchWriteItem requests and then every third are throttled) slows the job down but loses no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_table_slows_the_upload_but_loses_no_row() {
    use lambda_store::chaos::{Action, FaultProxy};
    use lambda_store::dynamo::{DynamoConfig, DynamoStore};
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let table = format!("lambda-batch-throttled-{}-{}", std::process::id(), d.end);
    let direct = dynamo_table(&table).await;
    let proxy = FaultProxy::start(
        &aws_endpoint("LAMBDA_TEST_DYNAMODB_ENDPOINT"),
        Arc::new(|op: &str, n: u64| match op {
            "BatchWriteItem" if n < 150 || n.is_multiple_of(3) => Action::Throttle,
            _ => Action::Forward,
        }),
    )
    .await
    .unwrap();
    let mut cfg = DynamoConfig::new(&table, "us-east-1");
    cfg.endpoint = Some(proxy.endpoint.clone());
    cfg.static_credentials = Some(("test".into(), "test".into()));
    cfg.base_backoff = std::time::Duration::from_millis(5);
    let throttled = DynamoStore::connect(cfg).await;
    let s = run_into(&d, &tmp.path().join("off"), &throttled, d.end, false).await;
    assert!(
        proxy
            .counters
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 150
    );
    let embedded = EmbeddedStore::open(tmp.path().join("e.redb")).unwrap();
    run_into(&d, &tmp.path().join("off"), &embedded, d.end, false).await;
    let got = rows(&direct, &users()).await;
    assert_eq!(got.len(), s.entities);
    assert_equivalent(&got, &rows(&embedded, &users()).await, "throttled upload");
    direct.delete_table().await.unwrap();
}

/// Late events written into a past day's partition after its partials were stored (the speed
/// layer's late-event sink, or a correction) make the next incremental night recompute that day,
/// and the result equals a full recompute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_files_recompute_their_day() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let inc = EmbeddedStore::open(tmp.path().join("inc.redb")).unwrap();
    run_into(&d, &tmp.path().join("off-inc"), &inc, d.end - DAY_MS, false).await;
    let first = run_into(&d, &tmp.path().join("off-inc"), &inc, d.end, false).await;
    assert_eq!(first.days_computed, 1, "{first:?}");
    // Two late purchases on 2025-12-20, arriving after that day was aggregated.
    let v = view();
    let mut b = lambda_core::decode::BatchBuilder::new(&v.source);
    let t = d.end - 12 * DAY_MS + 10 * HOUR_MS;
    for (k, amount) in [(0, 12_345), (1, 99)] {
        b.push(&purchase(&format!("e-late-{k}"), amount, t + k * MINUTE_MS));
    }
    write_parquet(
        &d.root.join("history/date=2025-12-20/late-00000.parquet"),
        &b.finish().unwrap(),
    );
    let again = run_into(&d, &tmp.path().join("off-inc"), &inc, d.end, false).await;
    assert_eq!(
        again.days_computed, 2,
        "the last day's tiles and the day with late events: {again:?}"
    );
    let full = EmbeddedStore::open(tmp.path().join("full.redb")).unwrap();
    run_into(&d, &tmp.path().join("off-full"), &full, d.end, true).await;
    let (a, b) = (rows(&full, &users()).await, rows(&inc, &users()).await);
    assert_equivalent(&a, &b, "incremental with late files vs full");
    let feats = offline_features(&local(&tmp.path().join("off-inc")), "2026-01-01").await;
    let before = offline_features(&local(&tmp.path().join("off-full")), "2026-01-01").await;
    for (x, y) in feats["u0000001"].iter().zip(&before["u0000001"]) {
        let ok = match (x, y) {
            (Value::Float(x), Value::Float(y)) => close(*x, *y),
            _ => x == y,
        };
        assert!(ok, "{x:?} vs {y:?}");
    }
    // The 30-day purchase count of u0000001 includes the late events.
    let no_late = EmbeddedStore::open(tmp.path().join("no-late.redb")).unwrap();
    std::fs::remove_file(d.root.join("history/date=2025-12-20/late-00000.parquet")).unwrap();
    run_into(&d, &tmp.path().join("off-no-late"), &no_late, d.end, true).await;
    let without = offline_features(&local(&tmp.path().join("off-no-late")), "2026-01-01").await;
    assert_eq!(
        feats["u0000001"][3],
        match &without["u0000001"][3] {
            Value::Int(n) => Value::Int(n + 2),
            other => panic!("{other:?}"),
        }
    );
}

/// `lambda-batch run --from D1 --cutoff D2` backfills every night in order: offline features for
/// each cutoff, and the same online rows as a full recompute at D2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_backfill_equals_a_full_recompute() {
    let d = data();
    let tmp = tempfile::tempdir().unwrap();
    let cli = |extra: &[&str], off: &str, store: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lambda-batch"))
            .arg("run")
            .arg("--view")
            .arg(examples().join("features.toml"))
            .arg("--history")
            .arg(d.root.join("history"))
            .arg("--offline")
            .arg(tmp.path().join(off))
            .arg("--store")
            .arg(tmp.path().join(store))
            .args(["--cutoff", "2026-01-01", "--row-ttl-days", "3650"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = cli(&["--from", "2025-12-30"], "off-bf", "bf.redb");
    assert_eq!(text.matches("view fraud_user cutoff").count(), 3, "{text}");
    cli(&["--full"], "off-full", "full.redb");
    for day in ["2025-12-30", "2025-12-31", "2026-01-01"] {
        assert!(
            tmp.path()
                .join(format!(
                    "off-bf/fraud_user/features/cutoff={day}/part-0.parquet"
                ))
                .exists(),
            "{day}"
        );
    }
    let (bf, full) = (
        EmbeddedStore::open(tmp.path().join("bf.redb")).unwrap(),
        EmbeddedStore::open(tmp.path().join("full.redb")).unwrap(),
    );
    assert_equivalent(
        &rows(&bf, &users()).await,
        &rows(&full, &users()).await,
        "backfill vs full",
    );
}
