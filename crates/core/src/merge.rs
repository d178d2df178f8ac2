//! The batch/speed boundary: what a batch row holds, and how serving merges it with the speed
//! tiles after it. One rule, used by the batch layer (to build rows), serving (to answer) and the
//! parity checker (as the reference).
//!
//! The batch job computes partial states per bucket in three tiers (tiles of the view's width for
//! windows with a 5-minute hop, hours for a 1-hour hop, days for a 1-day hop), reaching back
//! `[C − R, C)` where `R` is the longest window of the tier ([`tier_reach`]). A [`BatchRow`] keeps
//! those buckets as they are, per tier, without merging them: a row is therefore exact at *every*
//! time after its cutoff, not only the night after it. An entity whose events did not change is
//! not rewritten by the next night; its row keeps its older cutoff and stays correct, because the
//! buckets of a window are chosen at lookup time.
//!
//! Serving at `t ≥ C` computes window `W` over [`served_range`]`(t, W) = [s, t)`: it merges the
//! row's buckets of the window's tier that start at or after `s`, newest first (they align
//! exactly, because `s` is aligned to the hop), and the speed tiles that start in
//! `[max(s, C), t)`. Speed tiles before `C` are ignored when a row exists: the batch is the source
//! of truth there (late events included). Without a batch row, everything comes from speed tiles.
//! Each row carries its own cutoff, so a lookup while an upload is half done never mixes versions
//! inside one entity.

use crate::agg::{
    AggError, AggState, Aggregation, decode_states, encode_states, merge_all, merge_encoded_states,
};
use crate::codec::{CodecError, Reader, Writer};
use crate::spec::FeatureView;
use crate::time::{Span, format_ts, hop, served_range};
use crate::types::Value;

/// The version byte of an encoded [`BatchRow`].
pub const BATCH_ROW_VERSION: u8 = 3;

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

/// One tier's buckets in a batch row.
#[derive(Debug, Clone, PartialEq)]
pub struct TierBuckets {
    /// The tier (gives the bucket width).
    pub tier: Tier,
    /// `(start, end, one state per aggregation)`, ascending, inside [`row_range`]: one bucket of
    /// the tier's width each, except in a compacted row (see [`compact_row`]).
    pub buckets: Vec<(i64, i64, Vec<AggState>)>,
}

/// One entity's batch view: its cutoff and, for every tier a window of the view uses, the
/// per-bucket partial states over [`row_range`]. Nothing is merged ahead of time, so the row
/// serves every time after its cutoff exactly and never goes stale.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    /// Events before this instant are covered by the row.
    pub cutoff_ms: i64,
    /// One entry per tier with a non-zero [`tier_reach`], in [`Tier::ALL`] order.
    pub tiers: Vec<TierBuckets>,
}

/// An encoded bucket: `(start, end, states encoded by [`encode_states`])`.
pub type EncodedBucket<'a> = (i64, i64, &'a [u8]);

/// A batch row in encoded form, borrowing the encoded states of every bucket: what the nightly
/// job splices (old buckets of an entity plus its new days) without decoding any state.
#[derive(Debug, Clone, PartialEq)]
pub struct RowBlobs<'a> {
    /// The row's cutoff.
    pub cutoff_ms: i64,
    /// Per tier, `(start, end, states encoded by [`encode_states`])`, ascending.
    pub tiers: Vec<(Tier, Vec<EncodedBucket<'a>>)>,
}

/// Why a batch row cannot serve a time.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// A compacted row (see [`compact_row`]) merged buckets that a window asked at this time would
    /// cut: the nightly job is late.
    #[error(
        "batch row of cutoff {cutoff} cannot serve {at}: it is compacted and valid until {valid_until} (the batch job is late)"
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

/// The tiers a batch row of `view` holds (those with a non-zero reach), in [`Tier::ALL`] order.
pub fn row_tiers(view: &FeatureView) -> Vec<Tier> {
    Tier::ALL
        .into_iter()
        .filter(|t| tier_reach(view, *t).millis() > 0)
        .collect()
}

/// The bucket starts a row of cutoff `C` keeps for `tier`: `[C − reach, C − width]`, returned as
/// the half-open `[C − reach, C)` (a bucket starting in it ends at or before `C`, because the
/// cutoff is aligned to every width).
pub fn row_range(view: &FeatureView, tier: Tier, cutoff_ms: i64) -> (i64, i64) {
    (cutoff_ms - tier_reach(view, tier).millis(), cutoff_ms)
}

/// Builds an entity's batch row for `cutoff` from its tier partials (any order; partials outside
/// what the row needs are ignored, partials of the same bucket are merged).
pub fn build_batch_row(view: &FeatureView, cutoff_ms: i64, partials: &[Partial]) -> BatchRow {
    let aggs = view.aggs();
    let tiers = row_tiers(view)
        .into_iter()
        .map(|tier| {
            let (from, to) = row_range(view, tier, cutoff_ms);
            let mut mine: Vec<&Partial> = partials
                .iter()
                .filter(|p| p.tier == tier && p.start_ms >= from && p.start_ms < to)
                .collect();
            mine.sort_by_key(|p| p.start_ms);
            let width = tier.width(view).millis();
            let mut buckets: Vec<(i64, i64, Vec<AggState>)> = Vec::with_capacity(mine.len());
            for p in mine {
                match buckets.last_mut() {
                    Some((s, _, states)) if *s == p.start_ms => merge_all(&aggs, states, &p.states),
                    _ => buckets.push((p.start_ms, p.start_ms + width, p.states.clone())),
                }
            }
            TierBuckets { tier, buckets }
        })
        .collect();
    BatchRow { cutoff_ms, tiers }
}

fn tier_code(tier: Tier) -> u8 {
    match tier {
        Tier::Tile => 0,
        Tier::Hour => 1,
        Tier::Day => 2,
    }
}

fn row_err(source: CodecError) -> AggError {
    AggError::Codec {
        aggregation: "(batch row)".into(),
        source,
    }
}

/// Row bodies are stored as they are (tiny rows).
const RAW: u8 = 0;
/// Row bodies are LZ4 blocks prefixed with their size (the same strings repeat across buckets).
const LZ4: u8 = 1;
/// Row bodies in two LZ4 blocks (see [`ColdBlock`]): the oldest day buckets, "cold", and the rest.
/// After the layout byte: the bytes at the cold block's start that no longer belong to the row,
/// its live buckets, the length of the body's part before the day buckets, the cold block's
/// length, the cold block, then the rest (the body without its day buckets' cold part).
const SPLIT: u8 = 2;

/// The cold block of a row stored in two blocks: its oldest day buckets, compressed once and
/// carried from night to night while they stay in the row, so that a night compresses only the
/// newer buckets. Buckets that leave the row are skipped (their bytes stay in the block) until the
/// job writes a new cold block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColdBlock<'a> {
    /// The block as stored (LZ4, prefixed with its uncompressed size).
    pub lz4: &'a [u8],
    /// Its uncompressed size.
    pub raw_len: usize,
    /// Bytes at its start that belong to buckets no longer in the row.
    pub skip: usize,
    /// The live buckets in it: the row's first `live` day buckets.
    pub live: usize,
}

/// The cold block of an encoded batch row, if it is stored in two blocks.
pub fn cold_block(bytes: &[u8]) -> Result<Option<ColdBlock<'_>>, AggError> {
    if bytes.len() < 2 || bytes[1] != SPLIT {
        return Ok(None);
    }
    let h = split_header(bytes)?;
    let raw_len = h
        .cold
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| row_err(CodecError::Corrupt("truncated cold block".into())))?;
    Ok(Some(ColdBlock {
        lz4: h.cold,
        raw_len,
        skip: h.skip,
        live: h.live,
    }))
}

/// The fields of a [`SPLIT`] row.
struct SplitHeader<'a> {
    skip: usize,
    live: usize,
    before: usize,
    cold: &'a [u8],
    rest: &'a [u8],
}

fn split_header(bytes: &[u8]) -> Result<SplitHeader<'_>, AggError> {
    let mut r = Reader::new(&bytes[2..]);
    let mut field = || r.u64().map(|v| v as usize).map_err(row_err);
    let (skip, live, before, cold_len) = (field()?, field()?, field()?, field()?);
    let at = bytes.len() - r.remaining();
    if cold_len > bytes.len() - at {
        return Err(row_err(CodecError::Corrupt("truncated cold block".into())));
    }
    Ok(SplitHeader {
        skip,
        live,
        before,
        cold: &bytes[at..at + cold_len],
        rest: &bytes[at + cold_len..],
    })
}

/// Writes one bucket of a row body: its start, its length, its states.
fn put_bucket(w: &mut Writer, (start, end, blob): &EncodedBucket<'_>) {
    w.i64(*start);
    w.i64(end - start);
    w.bytes(blob);
}

/// The body of an encoded batch row (what [`RowBlobs::parse`] reads), its compression undone.
pub fn row_body(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, AggError> {
    let mut r = Reader::new(bytes);
    let v = r.u8().map_err(row_err)?;
    if v != BATCH_ROW_VERSION {
        return Err(row_err(CodecError::UnknownVersion(v, BATCH_ROW_VERSION)));
    }
    match r.u8().map_err(row_err)? {
        RAW => Ok(std::borrow::Cow::Borrowed(&bytes[2..])),
        LZ4 => lz4_flex::block::decompress_size_prepended(&bytes[2..])
            .map(std::borrow::Cow::Owned)
            .map_err(|e| row_err(CodecError::Corrupt(format!("compressed batch row: {e}")))),
        SPLIT => {
            let h = split_header(bytes)?;
            let lz4 = |b: &[u8]| {
                lz4_flex::block::decompress_size_prepended(b)
                    .map_err(|e| row_err(CodecError::Corrupt(format!("compressed batch row: {e}"))))
            };
            let (cold, rest) = (lz4(h.cold)?, lz4(h.rest)?);
            if h.skip > cold.len() || h.before > rest.len() {
                return Err(row_err(CodecError::Corrupt("split batch row".into())));
            }
            let mut body = Vec::with_capacity(rest.len() + cold.len() - h.skip);
            body.extend_from_slice(&rest[..h.before]);
            body.extend_from_slice(&cold[h.skip..]);
            body.extend_from_slice(&rest[h.before..]);
            Ok(std::borrow::Cow::Owned(body))
        }
        other => Err(row_err(CodecError::Corrupt(format!(
            "unknown batch row compression {other}"
        )))),
    }
}

impl<'a> RowBlobs<'a> {
    /// Reads the structure of a row body ([`row_body`]) without decoding any state.
    pub fn parse(body: &'a [u8]) -> Result<RowBlobs<'a>, AggError> {
        let mut r = Reader::new(body);
        let cutoff_ms = r.i64().map_err(row_err)?;
        let n = r.u64().map_err(row_err)? as usize;
        let mut tiers = Vec::with_capacity(n.min(3));
        for _ in 0..n {
            let tier = match r.u8().map_err(row_err)? {
                0 => Tier::Tile,
                1 => Tier::Hour,
                2 => Tier::Day,
                other => {
                    return Err(row_err(CodecError::Corrupt(format!(
                        "unknown tier {other} in a batch row"
                    ))));
                }
            };
            let k = r.u64().map_err(row_err)? as usize;
            let mut buckets = Vec::with_capacity(k.min(4096));
            for _ in 0..k {
                let start = r.i64().map_err(row_err)?;
                let end = start + r.i64().map_err(row_err)?;
                buckets.push((start, end, r.bytes().map_err(row_err)?));
            }
            tiers.push((tier, buckets));
        }
        if !r.is_empty() {
            return Err(row_err(CodecError::Corrupt(
                "trailing bytes after the batch row".into(),
            )));
        }
        Ok(RowBlobs { cutoff_ms, tiers })
    }

    /// Encodes the row: the version, the compression, then the body: cutoff, and per tier its
    /// code and its `(start, length, states)` buckets.
    pub fn encode(&self) -> Vec<u8> {
        let body = self.body();
        let mut out = vec![BATCH_ROW_VERSION];
        if body.len() < 128 {
            out.push(RAW);
            out.extend_from_slice(&body);
        } else {
            out.push(LZ4);
            out.extend_from_slice(&lz4_flex::block::compress_prepend_size(&body));
        }
        out
    }

    /// Encodes the row with its day buckets that start before `cold_until` in a block of their
    /// own (see [`ColdBlock`]); as [`RowBlobs::encode`] when there are none, or when the day
    /// tier is not the last.
    pub fn encode_split(&self, cold_until: i64) -> Vec<u8> {
        let Some(days) = self.split_days() else {
            return self.encode();
        };
        let n = days.iter().take_while(|b| b.0 < cold_until).count();
        if n == 0 {
            return self.encode();
        }
        let mut w = Writer::default();
        days[..n].iter().for_each(|b| put_bucket(&mut w, b));
        let cold = lz4_flex::block::compress_prepend_size(&w.buf);
        self.encode_with_cold(&cold, 0, n)
    }

    /// Encodes the row keeping a previous row's cold block: the row's first `live` day buckets
    /// must be the block's buckets after its first `skip` bytes (what [`ColdBlock`] and
    /// [`RowBlobs::cold_skip`] give). Only the other buckets are compressed.
    pub fn encode_reusing(&self, cold: &ColdBlock<'_>, skip: usize, live: usize) -> Vec<u8> {
        self.encode_with_cold(cold.lz4, skip, live)
    }

    /// The bytes that `expired` buckets at the start of a cold block take (added to its skip when
    /// they leave the row).
    pub fn cold_skip(expired: &[EncodedBucket<'_>]) -> usize {
        let mut w = Writer::default();
        expired.iter().for_each(|b| put_bucket(&mut w, b));
        w.buf.len()
    }

    /// The day tier's buckets (none if the row has no day tier).
    pub fn day_buckets(&self) -> &[EncodedBucket<'a>] {
        self.tiers
            .iter()
            .find(|t| t.0 == Tier::Day)
            .map_or(&[], |t| t.1.as_slice())
    }

    /// The day tier's buckets, if it is the body's last tier (as [`row_tiers`] orders them).
    fn split_days(&self) -> Option<&[EncodedBucket<'a>]> {
        match self.tiers.last() {
            Some((Tier::Day, days)) => Some(days),
            _ => None,
        }
    }

    /// The split encoding with `cold` as the block of the first `live` day buckets; the plain
    /// encoding if the day tier is not the last, or has fewer buckets (a caller's bug).
    fn encode_with_cold(&self, cold: &[u8], skip: usize, live: usize) -> Vec<u8> {
        if self.split_days().is_none_or(|days| live > days.len()) {
            return self.encode();
        }
        // The body without the first `live` day buckets, and where they would be.
        let mut w = Writer::default();
        w.i64(self.cutoff_ms);
        w.u64(self.tiers.len() as u64);
        let mut before = 0;
        for (tier, buckets) in &self.tiers {
            w.u8(tier_code(*tier));
            w.u64(buckets.len() as u64);
            let from = if *tier == Tier::Day {
                before = w.buf.len();
                live
            } else {
                0
            };
            buckets[from..].iter().for_each(|b| put_bucket(&mut w, b));
        }
        let rest = lz4_flex::block::compress_prepend_size(&w.buf);
        let mut out = Writer::default();
        out.u8(BATCH_ROW_VERSION);
        out.u8(SPLIT);
        out.u64(skip as u64);
        out.u64(live as u64);
        out.u64(before as u64);
        out.u64(cold.len() as u64);
        out.buf.reserve(cold.len() + rest.len());
        out.buf.extend_from_slice(cold);
        out.buf.extend_from_slice(&rest);
        out.buf
    }

    /// The uncompressed body (see [`RowBlobs::encode`]).
    pub fn body(&self) -> Vec<u8> {
        let size: usize = self
            .tiers
            .iter()
            .flat_map(|t| t.1.iter().map(|b| b.2.len() + 16))
            .sum();
        let mut w = Writer::default();
        w.buf.reserve(size + 32);
        w.i64(self.cutoff_ms);
        w.u64(self.tiers.len() as u64);
        for (tier, buckets) in &self.tiers {
            w.u8(tier_code(*tier));
            w.u64(buckets.len() as u64);
            buckets.iter().for_each(|b| put_bucket(&mut w, b));
        }
        w.buf
    }
}

impl BatchRow {
    /// Encodes the row (see [`RowBlobs::encode`]; each bucket's states by [`encode_states`]).
    pub fn encode(&self, aggs: &[Aggregation]) -> Vec<u8> {
        type Owned = (i64, i64, Vec<u8>);
        let blobs: Vec<(Tier, Vec<Owned>)> = self
            .tiers
            .iter()
            .map(|t| {
                let b = t
                    .buckets
                    .iter()
                    .map(|(s, e, states)| (*s, *e, encode_states(aggs, states)))
                    .collect();
                (t.tier, b)
            })
            .collect();
        RowBlobs {
            cutoff_ms: self.cutoff_ms,
            tiers: blobs
                .iter()
                .map(|(t, b)| {
                    let b = b.iter().map(|(s, e, v)| (*s, *e, v.as_slice())).collect();
                    (*t, b)
                })
                .collect(),
        }
        .encode()
    }

    /// Decodes a row written by [`BatchRow::encode`] for the same aggregations.
    pub fn decode(aggs: &[Aggregation], bytes: &[u8]) -> Result<BatchRow, AggError> {
        let body = row_body(bytes)?;
        let blobs = RowBlobs::parse(&body)?;
        let tiers = blobs
            .tiers
            .into_iter()
            .map(|(tier, buckets)| {
                let buckets = buckets
                    .into_iter()
                    .map(|(s, e, b)| Ok((s, e, decode_states(aggs, b)?)))
                    .collect::<Result<Vec<_>, AggError>>()?;
                Ok(TierBuckets { tier, buckets })
            })
            .collect::<Result<Vec<_>, AggError>>()?;
        Ok(BatchRow {
            cutoff_ms: blobs.cutoff_ms,
            tiers,
        })
    }

    /// The buckets of one tier (empty if the row has none).
    pub fn buckets(&self, tier: Tier) -> &[(i64, i64, Vec<AggState>)] {
        self.tiers
            .iter()
            .find(|t| t.tier == tier)
            .map_or(&[], |t| t.buckets.as_slice())
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
    if let Some(c) = cutoff {
        not_before(c, t_ms)?;
    }
    let tile_width = view.speed.tile.millis();
    let mut out = Vec::new();
    for f in view.features() {
        let agg = &aggs[f.aggregation];
        let (start, end) = served_range(t_ms, f.window);
        let mut state = agg.empty();
        if let Some(row) = row {
            // Newest first: the same order as `row_features_at`, so float states agree bit for bit.
            for (s, e, states) in row.buckets(Tier::of_window(f.window)).iter().rev() {
                if *s < start {
                    if *e > start {
                        return Err(stale(row, t_ms));
                    }
                    break;
                }
                agg.merge(&mut state, &states[f.aggregation]);
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

/// Every feature of `view` at time `t ≥ row.cutoff_ms` from the row alone, without speed tiles
/// (what the batch job writes to the offline store): equal to
/// [`features_at`]`(view, Some(row), &[], t)`, computed like the batch job does, by
/// [`encoded_row_features_at`] over the row's encoding (one pass per aggregation and tier).
pub fn row_features_at(
    view: &FeatureView,
    row: &BatchRow,
    t_ms: i64,
) -> Result<Vec<Value>, MergeError> {
    not_before(row.cutoff_ms, t_ms)?;
    let encoded = row.encode(&view.aggs());
    let body = row_body(&encoded)?;
    encoded_row_features_at(&FeaturePlan::new(view), &RowBlobs::parse(&body)?, t_ms)
}

/// What finalizing a view's features from encoded rows needs, prepared once (the batch job
/// finalizes thousands of rows with one).
#[derive(Debug, Clone)]
pub struct FeaturePlan {
    aggs: Vec<Aggregation>,
    /// Per tier (in [`Tier::ALL`] order), per aggregation: its windows of that tier and their
    /// feature index, shortest first.
    by_tier: Vec<Vec<Vec<(Span, usize)>>>,
    features: usize,
}

impl FeaturePlan {
    /// The plan of `view`.
    pub fn new(view: &FeatureView) -> FeaturePlan {
        let aggs = view.aggs();
        let features = view.features();
        let by_tier = Tier::ALL
            .iter()
            .map(|tier| {
                (0..aggs.len())
                    .map(|k| {
                        let mut w: Vec<(Span, usize)> = features
                            .iter()
                            .enumerate()
                            .filter(|(_, f)| {
                                f.aggregation == k && Tier::of_window(f.window) == *tier
                            })
                            .map(|(i, f)| (f.window, i))
                            .collect();
                        w.sort_by_key(|x| x.0);
                        w
                    })
                    .collect()
            })
            .collect();
        FeaturePlan {
            aggs,
            by_tier,
            features: features.len(),
        }
    }
}

/// Every feature at `t` from an encoded row alone, merging every state straight from its bytes
/// (no per-bucket state is built; distinct strings are borrowed), newest bucket first like
/// [`features_at`], so the values agree bit for bit. Each aggregation walks a tier's buckets once
/// for all its windows (the shorter window's value is taken on the way to the longer one).
pub fn encoded_row_features_at(
    plan: &FeaturePlan,
    row: &RowBlobs<'_>,
    t_ms: i64,
) -> Result<Vec<Value>, MergeError> {
    not_before(row.cutoff_ms, t_ms)?;
    let aggs = &plan.aggs;
    let mut out: Vec<Option<Value>> = vec![None; plan.features];
    for (tier, buckets) in &row.tiers {
        let ti = Tier::ALL.iter().position(|x| x == tier).unwrap_or(0);
        // Per aggregation: its windows, shortest first (window starts at t descend).
        let wanted = &plan.by_tier[ti];
        if wanted.iter().all(Vec::is_empty) {
            continue;
        }
        // The start of each aggregation's next window to close, kept as the pass advances (it
        // was recomputed for every bucket and aggregation: 4% of the pass).
        let start = |k: usize, j: usize| {
            wanted[k]
                .get(j)
                .map_or(i64::MIN, |w| served_range(t_ms, w.0).0)
        };
        // Distinct sets sized for about two values a bucket up front (growing a set rehashes it).
        let hint = (buckets.len() * 2).min(4096);
        let mut states: Vec<Acc<'_>> = aggs.iter().map(|a| Acc::new(a, hint)).collect();
        let mut next = vec![0usize; aggs.len()];
        let mut until: Vec<i64> = (0..aggs.len()).map(|k| start(k, 0)).collect();
        for (s, e, blob) in buckets.iter().rev() {
            let mut open = false;
            for k in 0..aggs.len() {
                while *s < until[k] {
                    if *e > until[k] {
                        return Err(MergeError::Stale {
                            cutoff: format_ts(row.cutoff_ms),
                            at: format_ts(t_ms),
                            valid_until: format_ts(row.cutoff_ms + COMPACT_VALIDITY.millis()),
                        });
                    }
                    out[wanted[k][next[k]].1] = Some(states[k].finalize(&aggs[k])?);
                    next[k] += 1;
                    until[k] = start(k, next[k]);
                }
                open |= next[k] < wanted[k].len();
            }
            if !open {
                break;
            }
            let mut r = Reader::new(blob);
            let v = r.u8().map_err(row_err)?;
            if v != crate::agg::STATE_FORMAT_VERSION {
                return Err(row_err(CodecError::UnknownVersion(
                    v,
                    crate::agg::STATE_FORMAT_VERSION,
                ))
                .into());
            }
            for (k, agg) in aggs.iter().enumerate() {
                if next[k] < wanted[k].len() {
                    states[k].merge_encoded(agg, &mut r)?;
                } else {
                    agg.decode(&mut r)?;
                }
            }
        }
        for k in 0..aggs.len() {
            for (_, i) in &wanted[k][next[k]..] {
                out[*i] = Some(states[k].finalize(&aggs[k])?);
            }
        }
    }
    // Tiers the row does not hold (no buckets kept): empty states.
    for per_agg in &plan.by_tier {
        for (k, windows) in per_agg.iter().enumerate() {
            for (_, i) in windows {
                if out[*i].is_none() {
                    out[*i] = Some(aggs[k].finalize(&aggs[k].empty())?);
                }
            }
        }
    }
    Ok(out.into_iter().map(|v| v.expect("filled above")).collect())
}

/// A state being merged from encoded buckets: `count_distinct` borrows its strings.
enum Acc<'a> {
    State(AggState),
    Distinct(crate::agg::DistinctRef<'a>),
}

impl<'a> Acc<'a> {
    fn new(agg: &Aggregation, distinct_hint: usize) -> Acc<'a> {
        match agg.function {
            crate::AggFunction::CountDistinct => {
                Acc::Distinct(crate::agg::DistinctRef::with_capacity(distinct_hint))
            }
            _ => Acc::State(agg.empty()),
        }
    }
    fn merge_encoded(&mut self, agg: &Aggregation, r: &mut Reader<'a>) -> Result<(), AggError> {
        match self {
            Acc::State(s) => agg.merge_encoded(s, r),
            Acc::Distinct(d) => d.merge_encoded(agg, r),
        }
    }
    fn finalize(&self, agg: &Aggregation) -> Result<Value, AggError> {
        match self {
            Acc::State(s) => agg.finalize(s),
            Acc::Distinct(d) => {
                i64::try_from(d.len())
                    .map(Value::Int)
                    .map_err(|_| AggError::Overflow {
                        aggregation: agg.name.clone(),
                        output: agg.output_type,
                    })
            }
        }
    }
}

/// Every feature of `view` at the row's own cutoff from the row alone:
/// [`row_features_at`]`(view, row, row.cutoff_ms)`.
pub fn features_at_cutoff(view: &FeatureView, row: &BatchRow) -> Result<Vec<Value>, MergeError> {
    row_features_at(view, row, row.cutoff_ms)
}

/// Merges a set of per-bucket states (e.g. many shards' tiles of the same start) into one list.
pub fn merge_into(aggs: &[Aggregation], into: &mut Vec<AggState>, other: &[AggState]) {
    if into.is_empty() {
        into.extend(other.iter().cloned());
    } else {
        merge_all(aggs, into, other);
    }
}

/// Builds the row of cutoff `cutoff_ms` from an entity's previous (not compacted) row and its
/// new buckets without decoding a state: keeps the old buckets inside [`row_range`] that
/// `replaced` does not claim (the days recomputed this run), adds `fresh` (tier, bucket start,
/// encoded states; one entry per bucket) inside the range, and sorts each tier by start. With no
/// old row, or with `replaced` claiming everything, its encoding equals encoding
/// [`build_batch_row`] over the same buckets.
pub fn splice_row<'a>(
    view: &FeatureView,
    cutoff_ms: i64,
    old: Option<&RowBlobs<'a>>,
    replaced: impl Fn(Tier, i64) -> bool,
    fresh: &[(Tier, i64, &'a [u8])],
) -> RowBlobs<'a> {
    let tiers = row_tiers(view)
        .into_iter()
        .map(|tier| {
            let (from, to) = row_range(view, tier, cutoff_ms);
            let inside = |s: i64| s >= from && s < to;
            let width = tier.width(view).millis();
            let mut buckets: Vec<EncodedBucket<'a>> = old
                .and_then(|o| o.tiers.iter().find(|t| t.0 == tier))
                .map(|t| {
                    t.1.iter()
                        .filter(|(s, _, _)| inside(*s) && !replaced(tier, *s))
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            buckets.extend(
                fresh
                    .iter()
                    .filter(|(t, s, _)| *t == tier && inside(*s))
                    .map(|(_, s, b)| (*s, *s + width, *b)),
            );
            buckets.sort_by_key(|b| b.0);
            (tier, buckets)
        })
        .collect();
    RowBlobs { cutoff_ms, tiers }
}

/// How long a compacted row serves exactly after its cutoff (the nightly job rewrites it daily).
pub const COMPACT_VALIDITY: Span = Span::days(2);

/// A row of cutoff `cutoff_ms` cannot serve a time before it.
fn not_before(cutoff_ms: i64, t_ms: i64) -> Result<(), MergeError> {
    if t_ms < cutoff_ms {
        return Err(MergeError::BeforeCutoff {
            cutoff: format_ts(cutoff_ms),
            at: format_ts(t_ms),
        });
    }
    Ok(())
}

fn stale(row: &BatchRow, t_ms: i64) -> MergeError {
    MergeError::Stale {
        cutoff: format_ts(row.cutoff_ms),
        at: format_ts(t_ms),
        valid_until: format_ts(row.cutoff_ms + COMPACT_VALIDITY.millis()),
    }
}

/// A smaller row for an entity too busy for one item (DynamoDB's 400 KB): buckets that no window
/// boundary crosses during [`COMPACT_VALIDITY`] after the cutoff are merged into one per run, so
/// the row serves exactly until `cutoff + COMPACT_VALIDITY` and refuses ([`MergeError::Stale`])
/// after it. The buckets each window drops while the row is valid stay single. The nightly job
/// keeps the full row offline and rewrites a compacted row every night (from the encoded row:
/// [`compact_blobs`]).
pub fn compact_row(view: &FeatureView, row: &BatchRow) -> BatchRow {
    let aggs = view.aggs();
    let tiers = row
        .tiers
        .iter()
        .map(|t| {
            let spans: Vec<(i64, i64)> = t.buckets.iter().map(|b| (b.0, b.1)).collect();
            let buckets = compaction_runs(view, t.tier, row.cutoff_ms, &spans)
                .into_iter()
                .map(|run| {
                    let (s, e) = (spans[run.start].0, spans[run.end - 1].1);
                    let mut states = t.buckets[run.start].2.clone();
                    for b in &t.buckets[run.start + 1..run.end] {
                        merge_all(&aggs, &mut states, &b.2);
                    }
                    (s, e, states)
                })
                .collect();
            TierBuckets {
                tier: t.tier,
                buckets,
            }
        })
        .collect();
    BatchRow {
        cutoff_ms: row.cutoff_ms,
        tiers,
    }
}

/// [`compact_row`] of an encoded row, encoded (`compact_row(view, &decoded).encode(aggs)`): the
/// buckets that stay single are copied as they are, and each merged run is merged from its
/// encoded states (a busy entity's row holds a distinct set per day: decoding them all cost
/// most of its night).
pub fn compact_blobs(
    view: &FeatureView,
    aggs: &[Aggregation],
    row: &RowBlobs<'_>,
) -> Result<Vec<u8>, AggError> {
    // The runs of each tier, with the index of their merged states in `merged` (none: single).
    let mut merged: Vec<Vec<u8>> = Vec::new();
    let mut plans = Vec::with_capacity(row.tiers.len());
    for (tier, buckets) in &row.tiers {
        let spans: Vec<(i64, i64)> = buckets.iter().map(|b| (b.0, b.1)).collect();
        let mut plan = Vec::new();
        for run in compaction_runs(view, *tier, row.cutoff_ms, &spans) {
            if run.len() == 1 {
                plan.push((run, None));
                continue;
            }
            let mut states = decode_states(aggs, buckets[run.start].2)?;
            for b in &buckets[run.start + 1..run.end] {
                merge_encoded_states(aggs, &mut states, b.2)?;
            }
            merged.push(encode_states(aggs, &states));
            plan.push((run, Some(merged.len() - 1)));
        }
        plans.push(plan);
    }
    let tiers = row
        .tiers
        .iter()
        .zip(plans)
        .map(|((tier, buckets), plan)| {
            let out = plan
                .into_iter()
                .map(|(run, m)| match m {
                    None => buckets[run.start],
                    Some(j) => (
                        buckets[run.start].0,
                        buckets[run.end - 1].1,
                        merged[j].as_slice(),
                    ),
                })
                .collect();
            (*tier, out)
        })
        .collect();
    Ok(RowBlobs {
        cutoff_ms: row.cutoff_ms,
        tiers,
    }
    .encode())
}

/// The runs of buckets (`spans`: ascending `(start, end)` of one tier of a row of cutoff `c`)
/// that [`compact_row`] merges into one bucket each, as index ranges covering every bucket.
fn compaction_runs(
    view: &FeatureView,
    tier: Tier,
    c: i64,
    spans: &[(i64, i64)],
) -> Vec<std::ops::Range<usize>> {
    let v = COMPACT_VALIDITY.millis();
    // Window starts move through [c − W, c − W + V] while the row is valid.
    let zones: Vec<(i64, i64)> = distinct_windows(view)
        .into_iter()
        .filter(|w| Tier::of_window(*w) == tier)
        .map(|w| (c - w.millis(), c - w.millis() + v))
        .collect();
    let single = |s: i64| zones.iter().any(|(a, b)| s >= *a && s < *b);
    // A merged run [from, to) must not contain a window start strictly inside it.
    let crosses = |from: i64, to: i64| zones.iter().any(|(a, b)| *a < to && *b > from);
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut run_open = false;
    for (i, (s, e)) in spans.iter().enumerate() {
        let run_start = runs.last().map_or(*s, |r| spans[r.start].0);
        if single(*s) {
            runs.push(i..i + 1);
            run_open = false;
        } else if run_open && !crosses(run_start, *e) {
            runs.last_mut().expect("an open run has a bucket").end = i + 1;
        } else {
            runs.push(i..i + 1);
            run_open = true;
        }
    }
    runs
}
