//! The serving rule: a batch row built from the events before the cutoff, merged with speed tiles
//! of the events after it, gives at every time t exactly the features computed directly over each
//! served window — for every t in the day after the cutoff, and for windows of every hop.

use std::collections::BTreeMap;
use std::path::Path;

use lambda_core::agg::{empty_states, update_all};
use lambda_core::merge::{
    BatchRow, COMPACT_VALIDITY, FeaturePlan, MergeError, Partial, RowBlobs, Tier, Tile,
    build_batch_row, cold_block, compact_blobs, compact_row, encoded_row_features_at, features_at,
    features_at_cutoff, row_body, row_features_at, splice_row, tier_reach,
};
use lambda_core::time::{DAY_MS, MINUTE_MS, served_range, tile_start};
use lambda_core::{FeatureView, Value};

fn view() -> FeatureView {
    let text = std::fs::read_to_string(
        Path::new(&manifest_dir()).join("../../examples/fraud/features.toml"),
    )
    .unwrap();
    // Add windows of every hop tier: 5m, 11h (5-min hop), 12h, 1d (1-hour hop), 12d, 30d (1-day hop).
    let text = text.replace(
        r#"windows = ["5m", "1h", "1d", "30d", "90d"]"#,
        r#"windows = ["5m", "11h", "12h", "1d", "12d", "30d"]"#,
    );
    FeatureView::parse(&text, Path::new("features.toml")).unwrap()
}

struct Ev {
    row: Vec<Value>,
    ts: i64,
    id: String,
}

fn events(view: &FeatureView, from: i64, to: i64, n: usize) -> Vec<Ev> {
    let mut x: u64 = 12345;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let ts = from + (next() % (to - from) as u64) as i64;
            let kind = if next() % 4 == 0 { "view" } else { "purchase" };
            let row = vec![
                Value::Str(format!("e{i}")),
                Value::Str("u1".into()),
                if next() % 10 == 0 {
                    Value::Null
                } else {
                    Value::Str(format!("m{}", next() % 7))
                },
                Value::Str("p1".into()),
                Value::Str(kind.into()),
                Value::Decimal((next() % 100_000) as i128),
                Value::Bool(true),
                Value::Timestamp(ts),
            ];
            assert_eq!(row.len(), view.source.columns.len());
            Ev {
                row,
                ts,
                id: format!("e{i}"),
            }
        })
        .collect()
}

fn batch_row(view: &FeatureView, evs: &[Ev], cutoff: i64) -> BatchRow {
    let aggs = view.aggs();
    let mut buckets: BTreeMap<(Tier, i64), Vec<_>> = BTreeMap::new();
    for tier in Tier::ALL {
        let reach = tier_reach(view, tier).millis();
        let width = tier.width(view);
        for e in evs
            .iter()
            .filter(|e| e.ts < cutoff && e.ts >= cutoff - reach)
        {
            let s = buckets
                .entry((tier, tile_start(e.ts, width)))
                .or_insert_with(|| empty_states(&aggs));
            update_all(&aggs, s, &e.row, e.ts, &e.id);
        }
    }
    let partials: Vec<Partial> = buckets
        .into_iter()
        .map(|((tier, start_ms), states)| Partial {
            tier,
            start_ms,
            states,
        })
        .collect();
    let row = build_batch_row(view, cutoff, &partials);
    // The row survives its encoding.
    assert_eq!(BatchRow::decode(&aggs, &row.encode(&aggs)).unwrap(), row);
    // What the batch job writes to the offline store: the features at the cutoff, computed
    // directly over the events and through the general merge.
    let at_cutoff = features_at_cutoff(view, &row).unwrap();
    assert!(
        same(&at_cutoff, &direct(view, evs, cutoff)),
        "features at the cutoff"
    );
    assert_eq!(
        at_cutoff,
        features_at(view, Some(&row), &[], cutoff).unwrap()
    );
    row
}

fn tiles(view: &FeatureView, evs: &[Ev], from: i64) -> Vec<Tile> {
    let aggs = view.aggs();
    let mut m: BTreeMap<i64, Vec<_>> = BTreeMap::new();
    for e in evs.iter().filter(|e| e.ts >= from) {
        let s = m
            .entry(tile_start(e.ts, view.speed.tile))
            .or_insert_with(|| empty_states(&aggs));
        update_all(&aggs, s, &e.row, e.ts, &e.id);
    }
    m.into_iter()
        .map(|(start_ms, states)| Tile { start_ms, states })
        .collect()
}

fn direct(view: &FeatureView, evs: &[Ev], t: i64) -> Vec<Value> {
    let aggs = view.aggs();
    view.features()
        .iter()
        .map(|f| {
            let a = &aggs[f.aggregation];
            let (s, e) = served_range(t, f.window);
            let mut st = a.empty();
            for ev in evs.iter().filter(|ev| ev.ts >= s && ev.ts < e) {
                a.update(&mut st, &ev.row, ev.ts, &ev.id);
            }
            a.finalize(&st).unwrap()
        })
        .collect()
}

fn same(a: &[Value], b: &[Value]) -> bool {
    a.iter().zip(b).all(|(x, y)| match (x, y) {
        (Value::Float(p), Value::Float(q)) => (p - q).abs() <= 1e-9 * p.abs().max(q.abs()).max(1.0),
        _ => x == y,
    })
}

#[test]
fn batch_row_plus_tiles_equals_direct_aggregation_at_every_time_after_the_cutoff() {
    let v = view();
    let cutoff = 200 * DAY_MS;
    let evs = events(&v, cutoff - 40 * DAY_MS, cutoff + 2 * DAY_MS, 20_000);
    let row = batch_row(&v, &evs, cutoff);
    let speed = tiles(&v, &evs, cutoff);
    // The compacted row (for an entity too busy for one item) is smaller and serves the same
    // until its validity ends.
    let compact = compact_row(&v, &row);
    let aggs = v.aggs();
    assert!(
        compact.encode(&aggs).len() < row.encode(&aggs).len(),
        "{} vs {} bytes",
        compact.encode(&aggs).len(),
        row.encode(&aggs).len()
    );
    let (encoded, encoded_compact) = (row.encode(&aggs), compact.encode(&aggs));
    // The nightly job compacts the encoded row: the same bytes.
    let body = row_body(&encoded).unwrap();
    assert_eq!(
        compact_blobs(&v, &aggs, &RowBlobs::parse(&body).unwrap()).unwrap(),
        encoded_compact,
        "compacting the encoded row"
    );
    let plan = FeaturePlan::new(&v);
    let mut checked = 0;
    // Every 7 minutes + 13 s through the two days after the cutoff, from the cutoff itself, then
    // every 11 h 7 min for 40 days: a row never goes stale (an entity whose events did not change
    // keeps its row for as long as its windows reach).
    let mut t = cutoff;
    while t < cutoff + 42 * DAY_MS {
        let now: Vec<Ev> = evs
            .iter()
            .filter(|e| e.ts < t)
            .map(|e| Ev {
                row: e.row.clone(),
                ts: e.ts,
                id: e.id.clone(),
            })
            .collect();
        let tiles_now: Vec<Tile> = speed.iter().filter(|x| x.start_ms < t).cloned().collect();
        // Tiles hold only events already seen at t (the tile containing t is partial).
        let tiles_now = if tiles_now
            .last()
            .is_some_and(|x| x.start_ms + v.speed.tile.millis() > t)
        {
            let mut ts = tiles(&v, &now, cutoff);
            ts.retain(|x| x.start_ms < t);
            ts
        } else {
            tiles_now
        };
        let served = features_at(&v, Some(&row), &tiles_now, t).unwrap();
        let want = direct(&v, &now, t);
        match features_at(&v, Some(&compact), &tiles_now, t) {
            Ok(c) => assert!(
                same(&c, &want),
                "compacted row at cutoff + {} min",
                (t - cutoff) / MINUTE_MS
            ),
            Err(MergeError::Stale { .. }) => {
                assert!(
                    t >= cutoff + COMPACT_VALIDITY.millis(),
                    "stale too early: {t}"
                )
            }
            Err(e) => panic!("{e}"),
        }
        // (Much later every window has passed the merged runs and the row is exact again.)
        if t > cutoff + COMPACT_VALIDITY.millis() + DAY_MS && t < cutoff + 10 * DAY_MS {
            assert!(matches!(
                features_at(&v, Some(&compact), &tiles_now, t),
                Err(MergeError::Stale { .. })
            ));
        }
        assert!(
            same(&served, &want),
            "t = cutoff + {} min\nserved {served:?}\nwant   {want:?}",
            (t - cutoff) / MINUTE_MS
        );
        // Without tiles after the cutoff (an idle entity), the batch job's one-pass merge agrees
        // with serving bit for bit.
        assert_eq!(
            row_features_at(&v, &row, t).unwrap(),
            features_at(&v, Some(&row), &[], t).unwrap()
        );
        // Merging straight from the encoded row gives the same, for full and compacted rows.
        assert_eq!(
            encoded_row_features_at(
                &plan,
                &RowBlobs::parse(&row_body(&encoded).unwrap()).unwrap(),
                t
            )
            .unwrap(),
            row_features_at(&v, &row, t).unwrap()
        );
        assert_eq!(
            encoded_row_features_at(
                &plan,
                &RowBlobs::parse(&row_body(&encoded_compact).unwrap()).unwrap(),
                t
            ),
            row_features_at(&v, &compact, t)
        );
        checked += 1;
        t += if t < cutoff + 2 * DAY_MS {
            7 * MINUTE_MS + 13_000
        } else {
            11 * 60 * MINUTE_MS + 7 * MINUTE_MS
        };
    }
    assert!(checked > 460, "{checked}");
    assert!(matches!(
        features_at(&v, Some(&row), &speed, cutoff - 1),
        Err(MergeError::BeforeCutoff { .. })
    ));
    assert!(matches!(
        row_features_at(&v, &row, cutoff - 1),
        Err(MergeError::BeforeCutoff { .. })
    ));
}

#[test]
fn splicing_an_old_row_with_new_days_equals_building_the_row_anew() {
    let v = view();
    let aggs = v.aggs();
    let old_cutoff = 200 * DAY_MS;
    let cutoff = old_cutoff + 3 * DAY_MS;
    let evs = events(&v, old_cutoff - 40 * DAY_MS, cutoff, 20_000);
    let old = batch_row(&v, &evs, old_cutoff).encode(&aggs);
    let want = batch_row(&v, &evs, cutoff);
    // The new days' buckets, encoded, as the batch job reads them from its partial files.
    let new_row = batch_row(&v, &evs, cutoff);
    let fresh: Vec<(Tier, i64, Vec<u8>)> = new_row
        .tiers
        .iter()
        .flat_map(|t| {
            t.buckets
                .iter()
                .filter(|(s, _, _)| *s >= old_cutoff - DAY_MS)
                .map(|(s, _, st)| (t.tier, *s, lambda_core::agg::encode_states(&aggs, st)))
        })
        .collect();
    let fresh: Vec<(Tier, i64, &[u8])> = fresh
        .iter()
        .map(|(t, s, b)| (*t, *s, b.as_slice()))
        .collect();
    // The last old day is recomputed too (as a late file would make the job do).
    let old_body = row_body(&old).unwrap();
    let old_blobs = RowBlobs::parse(&old_body).unwrap();
    let spliced = splice_row(
        &v,
        cutoff,
        Some(&old_blobs),
        |_, s| s >= old_cutoff - DAY_MS,
        &fresh,
    );
    let spliced = spliced.encode();
    assert_eq!(
        RowBlobs::parse(&row_body(&spliced).unwrap())
            .unwrap()
            .encode(),
        spliced
    );
    assert_eq!(BatchRow::decode(&aggs, &spliced).unwrap(), want);
    assert_eq!(spliced, want.encode(&aggs));
    // Claiming nothing keeps the old buckets: a stale old day would survive, so the test can fail.
    let wrong = splice_row(&v, cutoff, Some(&old_blobs), |_, _| false, &fresh).encode();
    assert_ne!(wrong, spliced);
}

/// A row stored in two blocks reads exactly as the plain row, and keeps its cold block night
/// after night: the buckets that leave the row are skipped, only the others are compressed.
#[test]
fn rows_in_two_blocks_read_as_plain_rows_and_carry_their_cold_block() {
    let v = view();
    let aggs = v.aggs();
    let first = 200 * DAY_MS;
    let evs = events(&v, first - 40 * DAY_MS, first + 5 * DAY_MS, 20_000);
    let row = batch_row(&v, &evs, first);
    let plain = row.encode(&aggs);
    let body = row_body(&plain).unwrap();
    let blobs = RowBlobs::parse(&body).unwrap();
    let split = blobs.encode_split(first - 7 * DAY_MS);
    assert_ne!(split, plain);
    assert_eq!(row_body(&split).unwrap(), body);
    assert_eq!(BatchRow::decode(&aggs, &split).unwrap(), row);
    let cold = cold_block(&split).unwrap().expect("a cold block");
    let days = blobs.day_buckets();
    let old_days = days.iter().filter(|b| b.0 < first - 7 * DAY_MS).count();
    assert_eq!((cold.skip, cold.live), (0, old_days));
    assert!(cold_block(&plain).unwrap().is_none());
    // Nights later: days left the row at the front, new ones came at the end.
    let (mut prev, mut prev_cold_skip) = (split, 0);
    for night in 1..=3 {
        let c = first + night * DAY_MS;
        let want = batch_row(&v, &evs, c);
        let fresh_row = want.encode(&aggs);
        let fresh_body = row_body(&fresh_row).unwrap();
        let fresh_blobs = RowBlobs::parse(&fresh_body).unwrap();
        let prev_body = row_body(&prev).unwrap();
        let prev_blobs = RowBlobs::parse(&prev_body).unwrap();
        let cold = cold_block(&prev).unwrap().unwrap();
        let (prev_days, new_days) = (prev_blobs.day_buckets(), fresh_blobs.day_buckets());
        let expired = prev_days[..cold.live]
            .iter()
            .take_while(|b| b.0 < new_days[0].0)
            .count();
        assert!(expired > 0, "a day leaves the 30-day row every night");
        let skip = cold.skip + RowBlobs::cold_skip(&prev_days[..expired]);
        let next = fresh_blobs.encode_reusing(&cold, skip, cold.live - expired);
        // The cold block is carried as it was stored.
        let carried = cold_block(&next).unwrap().unwrap();
        assert_eq!(carried.lz4, cold.lz4);
        assert!(carried.skip > prev_cold_skip);
        assert_eq!(row_body(&next).unwrap(), fresh_body, "night {night}");
        assert_eq!(BatchRow::decode(&aggs, &next).unwrap(), want);
        prev_cold_skip = carried.skip;
        prev = next;
    }
    // A damaged header is an error, not a panic.
    let mut bad = prev.clone();
    bad[2] = 0x7f; // a skip past the block's end
    assert!(row_body(&bad).is_err());
    assert!(row_body(&prev[..prev.len() / 2]).is_err());
}

#[test]
fn without_a_batch_row_tiles_alone_serve_and_stale_tiles_before_the_cutoff_are_ignored() {
    let v = view();
    let cutoff = 200 * DAY_MS;
    let evs = events(&v, cutoff - 2 * DAY_MS, cutoff + 3 * 3_600_000, 3_000);
    let t = cutoff + 2 * 3_600_000 + 17 * MINUTE_MS;
    let now: Vec<Ev> = evs
        .iter()
        .filter(|e| e.ts < t)
        .map(|e| Ev {
            row: e.row.clone(),
            ts: e.ts,
            id: e.id.clone(),
        })
        .collect();
    let all_tiles = tiles(&v, &now, i64::MIN);
    // No batch row: tiles only, covering only the windows' reach that tiles exist for.
    let served = features_at(&v, None, &all_tiles, t).unwrap();
    assert!(same(&served, &direct(&v, &now, t)));
    // With a row, tiles before the cutoff (here: a wrong, "speed-layer" version) are ignored.
    let row = batch_row(&v, &now, cutoff);
    let mut corrupted = all_tiles.clone();
    for tile in corrupted.iter_mut().filter(|x| x.start_ms < cutoff) {
        tile.states = lambda_core::agg::empty_states(&v.aggs());
    }
    assert!(same(
        &features_at(&v, Some(&row), &corrupted, t).unwrap(),
        &direct(&v, &now, t)
    ));
}

/// The package directory of the checkout the test runs in (read at run time: a test binary reused
/// from a target directory shared with another checkout must not look into that checkout).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
