//! The batch/speed boundary: what a batch row holds, and how serving merges it with the speed
//! tiles after it. One rule, used by the batch layer (to build rows), serving (to answer) and the
//! parity checker (as the reference).
//!
//! A batch row for cutoff `C` holds partial states in three tiers, only for non-empty buckets:
//!
//! * **tiles** (the view's tile width) over `[C − W5, C)`, where `W5` is the longest window whose
//!   hop is 5 minutes (W < 12 h);
//! * **hours** over `[C − W1h, C)`, `W1h` the longest window with a 1-hour hop (12 h ≤ W < 12 d);
//! * **days** over `[C − W1d, C)`, `W1d` the longest window with a 1-day hop.
//!
//! Serving at `t ≥ C` computes window `W` over [`served_range`]`(t, W) = [s, t)`: it merges the
//! row's partials of the tier of `hop(W)` that lie in `[s, C)` (they align exactly, because `s` is
//! aligned to the hop) and the speed tiles that start in `[max(s, C), t)`. Speed tiles before `C`
//! are ignored when a row exists: the batch is the source of truth there (late events included).
//! Without a batch row, everything comes from speed tiles. Each row carries its own cutoff, so a
//! lookup while an upload is half done never mixes versions inside one entity.

use crate::agg::{AggError, AggState, Aggregation, decode_states, encode_states, merge_all};
use crate::codec::{CodecError, Reader, Writer};
use crate::spec::FeatureView;
use crate::time::{Span, hop, served_range};
use crate::types::Value;

/// The version byte of an encoded [`BatchRow`].
pub const BATCH_ROW_VERSION: u8 = 1;

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
    fn tag(self) -> u8 {
        match self {
            Tier::Tile => 0,
            Tier::Hour => 1,
            Tier::Day => 2,
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

/// Partial states of all aggregations over one bucket `[start, start + width)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// The tier (gives the width).
    pub tier: Tier,
    /// Bucket start, epoch ms.
    pub start_ms: i64,
    /// One state per aggregation of the view.
    pub states: Vec<AggState>,
}

/// One entity's batch view.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    /// Events before this instant are covered by the row.
    pub cutoff_ms: i64,
    /// Non-empty partials, sorted by (tier, start).
    pub partials: Vec<Partial>,
}

impl BatchRow {
    /// Encodes the row: version, cutoff, then each partial (tier, start, states blob).
    pub fn encode(&self, aggs: &[Aggregation]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(BATCH_ROW_VERSION);
        w.i64(self.cutoff_ms);
        w.u64(self.partials.len() as u64);
        for p in &self.partials {
            w.u8(p.tier.tag());
            w.i64(p.start_ms);
            w.bytes(&encode_states(aggs, &p.states));
        }
        w.buf
    }

    /// Encodes a row from already-encoded state blobs (as stored in the offline store), sorted by
    /// (tier, start); the same bytes as [`BatchRow::encode`] of the decoded partials.
    pub fn encode_raw(cutoff_ms: i64, parts: &[(Tier, i64, &[u8])]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(BATCH_ROW_VERSION);
        w.i64(cutoff_ms);
        w.u64(parts.len() as u64);
        for (tier, start, blob) in parts {
            w.u8(tier.tag());
            w.i64(*start);
            w.bytes(blob);
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
        let mut partials = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let tier = match r.u8().map_err(err)? {
                0 => Tier::Tile,
                1 => Tier::Hour,
                2 => Tier::Day,
                t => return Err(err(CodecError::Corrupt(format!("unknown tier {t}")))),
            };
            let start_ms = r.i64().map_err(err)?;
            let states = decode_states(aggs, r.bytes().map_err(err)?)?;
            partials.push(Partial {
                tier,
                start_ms,
                states,
            });
        }
        if !r.is_empty() {
            return Err(err(CodecError::Corrupt(
                "trailing bytes after the batch row".into(),
            )));
        }
        Ok(BatchRow {
            cutoff_ms,
            partials,
        })
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
) -> Result<Vec<Value>, AggError> {
    let aggs = view.aggs();
    let cutoff = row.map(|r| r.cutoff_ms);
    let tile_width = view.speed.tile.millis();
    let mut out = Vec::new();
    for f in view.features() {
        let agg = &aggs[f.aggregation];
        let (start, end) = served_range(t_ms, f.window);
        let mut state = agg.empty();
        if let (Some(row), Some(c)) = (row, cutoff) {
            let tier = Tier::of_window(f.window);
            let width = tier.width(view).millis();
            for p in row.partials.iter().filter(|p| p.tier == tier) {
                if p.start_ms >= start && p.start_ms + width <= c.min(end) {
                    agg.merge(&mut state, &p.states[f.aggregation]);
                }
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

/// Merges a set of per-bucket states (e.g. many shards' tiles of the same start) into one list.
pub fn merge_into(aggs: &[Aggregation], into: &mut Vec<AggState>, other: &[AggState]) {
    if into.is_empty() {
        into.extend(other.iter().cloned());
    } else {
        merge_all(aggs, into, other);
    }
}
