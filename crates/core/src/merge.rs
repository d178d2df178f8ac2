//! The batch/speed boundary: what a batch row holds, and how serving merges it with the speed
//! tiles after it. One rule, used by the batch layer (to build rows), serving (to answer) and the
//! parity checker (as the reference).
//!
//! The batch job computes partial states per bucket in three tiers (tiles of the view's width for
//! windows with a 5-minute hop, hours for a 1-hour hop, days for a 1-day hop), reaching back
//! `[C − W, C)` for the longest window of each tier. From them it builds one [`BatchRow`] per
//! entity: for each window length `W`, the per-hop partials of the tail that slides out while the
//! row is valid (`[C − W, C − W + ROW_VALIDITY)`), and one merged state for the rest.
//!
//! Serving at `t ≥ C` computes window `W` over [`served_range`]`(t, W) = [s, t)`: it merges the
//! tail partials that start at or after `s` (they align exactly, because `s` is aligned to the hop),
//! the merged rest, and the speed tiles that start in `[max(s, C), t)`. Speed tiles before `C`
//! are ignored when a row exists: the batch is the source of truth there (late events included).
//! Without a batch row, everything comes from speed tiles. Each row carries its own cutoff, so a
//! lookup while an upload is half done never mixes versions inside one entity.

use crate::agg::{
    AggError, AggState, Aggregation, decode_states, empty_states, encode_states, merge_all,
};
use crate::codec::{CodecError, Reader, Writer};
use crate::spec::FeatureView;
use crate::time::{Span, format_ts, hop, served_range};
use crate::types::Value;

/// The version byte of an encoded [`BatchRow`].
pub const BATCH_ROW_VERSION: u8 = 2;

/// The three tiers of partial states in a batch row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// The view's tile width (serves windows with a 5-minute hop).
    Tile,
    /// One hour.
    Hour,
    /// One day.
    Day,
}

impl Tier {
    /// All tiers.
    pub const ALL: [Tier; 3] = [Tier::Tile, Tier::Hour, Tier::Day];
    /// The bucket width of this tier for a view.
    pub fn width(self, view: &FeatureView) -> Span {
        match self {
            Tier::Tile => view.speed.tile,
            Tier::Hour => Span::hours(1),
            Tier::Day => Span::days(1),
        }
    }
    /// The tier that serves a window.
    pub fn of_window(window: Span) -> Tier {
        let h = hop(window);
        if h == Span::minutes(5) {
            Tier::Tile
        } else if h == Span::hours(1) {
            Tier::Hour
        } else {
            Tier::Day
        }
    }
    /// The tier's name in paths (`tile`, `hour`, `day`).
    pub fn name(self) -> &'static str {
        match self {
            Tier::Tile => "tile",
            Tier::Hour => "hour",
            Tier::Day => "day",
        }
    }
}

/// How far back before the cutoff each tier must reach for `view` (zero when no window uses it).
pub fn tier_reach(view: &FeatureView, tier: Tier) -> Span {
    view.aggregations
        .iter()
        .flat_map(|a| a.windows.iter().copied())
        .filter(|w| Tier::of_window(*w) == tier)
        .max()
        .unwrap_or(Span::from_millis(0))
}

/// Partial states of all aggregations over one bucket `[start, start + width)` of a tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// The tier (gives the width).
    pub tier: Tier,
    /// Bucket start, epoch ms.
    pub start_ms: i64,
    /// One state per aggregation of the view.
    pub states: Vec<AggState>,
}

/// How long after its cutoff a batch row serves exactly. The nightly job replaces rows daily; a
/// row older than this is reported as stale instead of silently serving a shifted window.
pub const ROW_VALIDITY: Span = Span::days(2);

/// What a batch row keeps for one window length `W`.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPart {
    /// The window length.
    pub window: Span,
    /// Per-hop partials over the tail `[C − W, min(C, C − W + ROW_VALIDITY))`, ascending: the part
    /// of the window that slides out while the row is valid.
    pub tail: Vec<(i64, Vec<AggState>)>,
    /// Everything else before the cutoff, `[min(C, C − W + ROW_VALIDITY), C)`, merged.
    pub rest: Vec<AggState>,
}

/// One entity's batch view: for each distinct window length of the view, a sliding tail of
/// per-hop partials plus one merged state for the rest. Aggregations that do not use a window
/// carry empty states in it. A busy entity's row stays small: its size grows with the number of
/// hops in the tail, not with the window length.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    /// Events before this instant are covered by the row.
    pub cutoff_ms: i64,
    /// One entry per distinct window, ascending.
    pub windows: Vec<WindowPart>,
}

/// Why a batch row cannot serve a time.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// The row is older than [`ROW_VALIDITY`] at the time asked (the nightly job is late).
    #[error(
        "batch row of cutoff {cutoff} cannot serve {at}: it is valid until {valid_until} (the batch job is late)"
    )]
    Stale {
        /// The row's cutoff.
        cutoff: String,
        /// The time asked.
        at: String,
        /// End of validity.
        valid_until: String,
    },
    /// Asked for a time before the row's cutoff.
    #[error("batch row of cutoff {cutoff} cannot serve {at}, which is before its cutoff")]
    BeforeCutoff {
        /// The row's cutoff.
        cutoff: String,
        /// The time asked.
        at: String,
    },
    /// Finalizing or decoding states failed.
    #[error(transparent)]
    Agg(#[from] AggError),
}

/// The distinct window lengths of a view, ascending.
pub fn distinct_windows(view: &FeatureView) -> Vec<Span> {
    let mut w: Vec<Span> = view
        .aggregations
        .iter()
        .flat_map(|a| a.windows.iter().copied())
        .collect();
    w.sort();
    w.dedup();
    w
}

/// Builds an entity's batch row for `cutoff` from its tier partials (any order; partials outside
/// what the row needs are ignored).
pub fn build_batch_row(view: &FeatureView, cutoff_ms: i64, partials: &[Partial]) -> BatchRow {
    let aggs = view.aggs();
    let mut windows = Vec::new();
    for w in distinct_windows(view) {
        let tier = Tier::of_window(w);
        let width = tier.width(view).millis();
        let head = cutoff_ms - w.millis();
        let tail_end = cutoff_ms.min(head + ROW_VALIDITY.millis());
        let uses: Vec<bool> = view
            .aggregations
            .iter()
            .map(|a| a.windows.contains(&w))
            .collect();
        let mut tail: Vec<(i64, Vec<AggState>)> = Vec::new();
        let mut rest = empty_states(&aggs);
        let mut mine: Vec<&Partial> = partials
            .iter()
            .filter(|p| p.tier == tier && p.start_ms >= head && p.start_ms + width <= cutoff_ms)
            .collect();
        mine.sort_by_key(|p| p.start_ms);
        for p in mine {
            let target = if p.start_ms < tail_end {
                if tail.last().map(|t| t.0) != Some(p.start_ms) {
                    tail.push((p.start_ms, empty_states(&aggs)));
                }
                &mut tail.last_mut().expect("just pushed").1
            } else {
                &mut rest
            };
            for (i, a) in aggs.iter().enumerate() {
                if uses[i] {
                    a.merge(&mut target[i], &p.states[i]);
                }
            }
        }
        windows.push(WindowPart {
            window: w,
            tail,
            rest,
        });
    }
    BatchRow { cutoff_ms, windows }
}

impl BatchRow {
    /// Encodes the row: version, cutoff, then per window its length, tail and rest.
    pub fn encode(&self, aggs: &[Aggregation]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(BATCH_ROW_VERSION);
        w.i64(self.cutoff_ms);
        w.u64(self.windows.len() as u64);
        for part in &self.windows {
            w.i64(part.window.millis());
            w.u64(part.tail.len() as u64);
            for (start, states) in &part.tail {
                w.i64(*start);
                w.bytes(&encode_states(aggs, states));
            }
            w.bytes(&encode_states(aggs, &part.rest));
        }
        w.buf
    }

    /// Decodes a row written by [`BatchRow::encode`] for the same aggregations.
    pub fn decode(aggs: &[Aggregation], bytes: &[u8]) -> Result<BatchRow, AggError> {
        let err = |source| AggError::Codec {
            aggregation: "(batch row)".into(),
            source,
        };
        let mut r = Reader::new(bytes);
        let v = r.u8().map_err(err)?;
        if v != BATCH_ROW_VERSION {
            return Err(err(CodecError::UnknownVersion(v, BATCH_ROW_VERSION)));
        }
        let cutoff_ms = r.i64().map_err(err)?;
        let n = r.u64().map_err(err)? as usize;
        let mut windows = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let window = Span::from_millis(r.i64().map_err(err)?);
            let k = r.u64().map_err(err)? as usize;
            let mut tail = Vec::with_capacity(k.min(1024));
            for _ in 0..k {
                let start = r.i64().map_err(err)?;
                tail.push((start, decode_states(aggs, r.bytes().map_err(err)?)?));
            }
            let rest = decode_states(aggs, r.bytes().map_err(err)?)?;
            windows.push(WindowPart { window, tail, rest });
        }
        if !r.is_empty() {
            return Err(err(CodecError::Corrupt(
                "trailing bytes after the batch row".into(),
            )));
        }
        Ok(BatchRow { cutoff_ms, windows })
    }
}

/// A speed tile of one entity (all shards already merged, or one per shard: merging is the same).
#[derive(Debug, Clone, PartialEq)]
pub struct Tile {
    /// Tile start, epoch ms.
    pub start_ms: i64,
    /// One state per aggregation.
    pub states: Vec<AggState>,
}

/// Every feature of `view` for one entity at time `t`, in [`FeatureView::features`] order, from
/// its batch row (if any) and its speed tiles.
pub fn features_at(
    view: &FeatureView,
    row: Option<&BatchRow>,
    tiles: &[Tile],
    t_ms: i64,
) -> Result<Vec<Value>, MergeError> {
    let aggs = view.aggs();
    let cutoff = row.map(|r| r.cutoff_ms);
    if let Some(c) = cutoff
        && t_ms < c
    {
        return Err(MergeError::BeforeCutoff {
            cutoff: format_ts(c),
            at: format_ts(t_ms),
        });
    }
    let tile_width = view.speed.tile.millis();
    let mut out = Vec::new();
    for f in view.features() {
        let agg = &aggs[f.aggregation];
        let (start, end) = served_range(t_ms, f.window);
        let mut state = agg.empty();
        if let (Some(row), Some(c)) = (row, cutoff)
            && let Some(part) = row.windows.iter().find(|p| p.window == f.window)
        {
            let tail_end = c.min(c - f.window.millis() + ROW_VALIDITY.millis());
            if start > tail_end && start < c {
                // The merged rest would stick out of the window: the row is too old.
                return Err(MergeError::Stale {
                    cutoff: format_ts(c),
                    at: format_ts(t_ms),
                    valid_until: format_ts(c + ROW_VALIDITY.millis()),
                });
            }
            if start < c {
                for (s, states) in &part.tail {
                    if *s >= start {
                        agg.merge(&mut state, &states[f.aggregation]);
                    }
                }
                agg.merge(&mut state, &part.rest[f.aggregation]);
            }
        }
        let from = cutoff.map_or(start, |c| start.max(c));
        for tile in tiles {
            if tile.start_ms >= from && tile.start_ms < end && tile.start_ms + tile_width > from {
                agg.merge(&mut state, &tile.states[f.aggregation]);
            }
        }
        out.push(agg.finalize(&state)?);
    }
    Ok(out)
}

/// Every feature of `view` at the row's own cutoff from the row alone (what the batch job writes
/// to the offline store): equal to [`features_at`]`(view, Some(row), &[], row.cutoff_ms)`, but a
/// window without tail partials is finalized from its rest without copying it.
pub fn features_at_cutoff(view: &FeatureView, row: &BatchRow) -> Result<Vec<Value>, MergeError> {
    let aggs = view.aggs();
    let mut out = Vec::new();
    for f in view.features() {
        let agg = &aggs[f.aggregation];
        let Some(part) = row.windows.iter().find(|p| p.window == f.window) else {
            out.push(agg.finalize(&agg.empty())?);
            continue;
        };
        // At the cutoff the window is [c − W, c): every tail partial and the rest.
        // Same merge order as `features_at` (tail, then rest), so float states agree bit for bit.
        if part.tail.is_empty() {
            out.push(agg.finalize(&part.rest[f.aggregation])?);
        } else {
            let mut state = agg.empty();
            for (_, states) in &part.tail {
                agg.merge(&mut state, &states[f.aggregation]);
            }
            agg.merge(&mut state, &part.rest[f.aggregation]);
            out.push(agg.finalize(&state)?);
        }
    }
    Ok(out)
}

/// Merges a set of per-bucket states (e.g. many shards' tiles of the same start) into one list.
pub fn merge_into(aggs: &[Aggregation], into: &mut Vec<AggState>, other: &[AggState]) {
    if into.is_empty() {
        into.extend(other.iter().cloned());
    } else {
        merge_all(aggs, into, other);
    }
}
