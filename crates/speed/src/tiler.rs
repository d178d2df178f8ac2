//! The speed layer's pure core (no I/O): per-entity event-time tiles of one shard, with the
//! exactly-once bookkeeping that makes a replay harmless.
//!
//! Every (entity, tile) of a shard is one [`TileEntry`]: the mergeable states of every
//! aggregation, the hashes of the event ids applied (so a duplicate delivery is applied once,
//! also after a restart, since the ids travel with the tile), and the highest sequence number
//! applied (the store item's guard: a record at or below it is already in the tile).
//!
//! Lateness follows `lambda_core::time`: the shard's watermark is its highest event time minus
//! the out-of-orderness; an event before `watermark − allowed lateness` is late and not applied.

use std::borrow::Cow;
use std::collections::HashSet;

use foldhash::fast::RandomState;
use lambda_core::agg::{AggError, decode_states, empty_states, encode_states, update_all};
use lambda_core::codec::{CodecError, Reader, Writer};
use lambda_core::time::{is_late, tile_is_final, tile_start, watermark};
use lambda_core::{AggState, Aggregation, FeatureView, Span, Value};

/// A record's position in its shard: a non-negative integer of up to 64 decimal digits (Kinesis
/// sequence numbers have 56; a store guard holds 64), ordered numerically.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq {
    hi: u128,
    lo: u128,
}

const LO_DIGITS: usize = 38;
const LO_BASE: u128 = 100_000_000_000_000_000_000_000_000_000_000_000_000; // 10^38

impl Seq {
    /// The largest value, 64 nines (above every real sequence number; fits a store guard).
    pub const MAX: Seq = Seq {
        hi: 100_000_000_000_000_000_000_000_000 - 1, // 10^26 - 1
        lo: LO_BASE - 1,
    };

    /// Parses decimal digits (leading zeros allowed); `None` if not digits or too long.
    pub fn parse(text: &str) -> Option<Seq> {
        let t = text.trim_start_matches('0');
        if !text.bytes().all(|b| b.is_ascii_digit()) || t.len() > 64 {
            return None;
        }
        let split = t.len().saturating_sub(LO_DIGITS);
        let (h, l) = t.split_at(split);
        Some(Seq {
            hi: if h.is_empty() { 0 } else { h.parse().ok()? },
            lo: if l.is_empty() { 0 } else { l.parse().ok()? },
        })
    }
}

impl From<u128> for Seq {
    fn from(n: u128) -> Seq {
        Seq {
            hi: n / LO_BASE,
            lo: n % LO_BASE,
        }
    }
}

impl std::fmt::Display for Seq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.hi == 0 {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}{:038}", self.hi, self.lo)
        }
    }
}

/// Format version of a tile item's payload.
pub const TILE_FORMAT_VERSION: u8 = 1;

/// (entity, tile start in epoch ms).
pub type TileKey = (String, i64);

/// One (entity, tile) of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct TileEntry {
    /// One state per aggregation of the view.
    pub states: Vec<AggState>,
    /// XXH3 hashes of the event ids applied.
    pub ids: HashSet<u64, RandomState>,
    /// Highest sequence number applied (0: none).
    pub guard: Seq,
    /// Changed since the last flush.
    pub dirty: bool,
}

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied to its tile.
    Applied,
    /// Its event id was already in the tile: a duplicate delivery.
    Duplicate,
    /// At or below the tile's guard: already applied before a restart.
    Replayed,
    /// Behind the watermark by more than the allowed lateness: not applied (goes to the late sink).
    Late,
}

/// Why a decoded row cannot be tiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The entity, event time or event id is missing or of the wrong kind.
    #[error("column `{column}`: {problem}")]
    Bad {
        /// The column.
        column: String,
        /// What is wrong.
        problem: String,
    },
}

/// Encodes a tile's payload: version, states, then the sorted id hashes (equal tiles give equal
/// bytes).
pub fn encode_tile(
    aggs: &[Aggregation],
    states: &[AggState],
    ids: &HashSet<u64, RandomState>,
) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(TILE_FORMAT_VERSION);
    w.bytes(&encode_states(aggs, states));
    let mut sorted: Vec<u64> = ids.iter().copied().collect();
    sorted.sort_unstable();
    w.u64(sorted.len() as u64);
    for id in sorted {
        w.u64(id);
    }
    w.buf
}

/// A stored tile payload cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TileDecodeError {
    /// The framing is wrong.
    #[error("tile payload: {0}")]
    Codec(#[from] CodecError),
    /// A state is wrong.
    #[error("tile payload")]
    State(#[from] AggError),
}

/// Decodes a tile's payload into its states and id hashes.
pub fn decode_tile(
    aggs: &[Aggregation],
    bytes: &[u8],
) -> Result<(Vec<AggState>, HashSet<u64, RandomState>), TileDecodeError> {
    let mut r = Reader::new(bytes);
    let v = r.u8()?;
    if v != TILE_FORMAT_VERSION {
        return Err(CodecError::Corrupt(format!(
            "tile format version {v}, expected {TILE_FORMAT_VERSION}"
        ))
        .into());
    }
    let states = decode_states(aggs, r.bytes()?)?;
    let n = r.u64()?;
    let mut ids =
        HashSet::with_capacity_and_hasher(n.min(1 << 20) as usize, RandomState::default());
    for _ in 0..n {
        ids.insert(r.u64()?);
    }
    if !r.is_empty() {
        return Err(CodecError::Corrupt("trailing bytes after a tile".into()).into());
    }
    Ok((states, ids))
}

/// The tiles of one shard.
#[derive(Debug)]
pub struct Tiler {
    aggs: Vec<Aggregation>,
    entity: usize,
    time: usize,
    id: usize,
    names: [String; 3],
    tile: Span,
    out_of_orderness: Span,
    allowed_lateness: Span,
    /// Per entity, its open tiles by start (an entity has few open tiles at once).
    tiles: std::collections::HashMap<String, Vec<(i64, TileEntry)>, RandomState>,
    max_event_time: i64,
}

fn text_of(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::Str(s) => Some(Cow::Borrowed(s)),
        Value::Int(i) => Some(Cow::Owned(i.to_string())),
        _ => None,
    }
}

/// Where a row goes: its entity, tile start, event time and event id (borrowed from the row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowKey<'a> {
    /// The entity.
    pub entity: Cow<'a, str>,
    /// Start of its tile.
    pub tile: i64,
    /// Its event time.
    pub time: i64,
    /// Its event id.
    pub id: Cow<'a, str>,
}

impl RowKey<'_> {
    /// The owned (entity, tile) key.
    pub fn tile_key(&self) -> TileKey {
        (self.entity.to_string(), self.tile)
    }
}

impl Tiler {
    /// A tiler for `view`, starting from a restored highest event time (from the checkpoint).
    pub fn new(view: &FeatureView, max_event_time: Option<i64>) -> Tiler {
        let s = &view.source;
        Tiler {
            aggs: view.aggs(),
            entity: s.entity,
            time: s.event_time,
            id: s.event_id,
            names: [
                s.columns[s.entity].name.clone(),
                s.columns[s.event_time].name.clone(),
                s.columns[s.event_id].name.clone(),
            ],
            tile: view.speed.tile,
            out_of_orderness: view.speed.out_of_orderness,
            allowed_lateness: view.speed.allowed_lateness,
            tiles: Default::default(),
            max_event_time: max_event_time.unwrap_or(i64::MIN),
        }
    }

    /// The aggregations (for encoding).
    pub fn aggs(&self) -> &[Aggregation] {
        &self.aggs
    }

    /// The highest event time applied so far (`None` before the first event).
    pub fn max_event_time(&self) -> Option<i64> {
        (self.max_event_time != i64::MIN).then_some(self.max_event_time)
    }

    /// The shard's watermark (`i64::MIN` before the first event).
    pub fn watermark(&self) -> i64 {
        if self.max_event_time == i64::MIN {
            i64::MIN
        } else {
            watermark(self.max_event_time, self.out_of_orderness)
        }
    }

    /// The tile a row belongs to, and its event time and id.
    pub fn key_of<'a>(&self, row: &'a [Value]) -> Result<RowKey<'a>, KeyError> {
        let bad = |k: usize, problem: &str| KeyError::Bad {
            column: self.names[k].clone(),
            problem: problem.into(),
        };
        let entity = text_of(&row[self.entity]).ok_or_else(|| bad(0, "not a string or integer"))?;
        let Value::Timestamp(t) = row[self.time] else {
            return Err(bad(1, "not a timestamp"));
        };
        let id = text_of(&row[self.id]).ok_or_else(|| bad(2, "not a string or integer"))?;
        Ok(RowKey {
            entity,
            tile: tile_start(t, self.tile),
            time: t,
            id,
        })
    }

    /// Whether the tile is in memory (else its stored item must be loaded first).
    pub fn is_loaded(&self, entity: &str, tile: i64) -> bool {
        self.tiles
            .get(entity)
            .is_some_and(|v| v.iter().any(|(s, _)| *s == tile))
    }

    /// Puts a tile loaded from the store (or a fresh one if it has no item) in memory.
    pub fn insert_loaded(
        &mut self,
        key: TileKey,
        stored: Option<(Vec<AggState>, HashSet<u64, RandomState>, Seq)>,
    ) {
        let entry = match stored {
            Some((states, ids, guard)) => TileEntry {
                states,
                ids,
                guard,
                dirty: false,
            },
            None => TileEntry {
                states: empty_states(&self.aggs),
                ids: HashSet::default(),
                guard: Seq::default(),
                dirty: false,
            },
        };
        let v = self.tiles.entry(key.0).or_default();
        match v.iter_mut().find(|(s, _)| *s == key.1) {
            Some(slot) => slot.1 = entry,
            None => v.push((key.1, entry)),
        }
    }

    /// Applies one record (its tile must be loaded, see [`Tiler::is_loaded`]; an unloaded tile
    /// starts empty).
    pub fn apply(&mut self, key: &RowKey<'_>, row: &[Value], seq: Seq) -> Applied {
        let (t, id) = (key.time, key.id.as_ref());
        if is_late(t, self.watermark(), self.allowed_lateness) {
            return Applied::Late;
        }
        let aggs = &self.aggs;
        let tiles = match self.tiles.get_mut(key.entity.as_ref()) {
            Some(v) => v,
            None => self.tiles.entry(key.entity.to_string()).or_default(),
        };
        let pos = match tiles.iter().position(|(s, _)| *s == key.tile) {
            Some(p) => p,
            None => {
                tiles.push((
                    key.tile,
                    TileEntry {
                        states: empty_states(aggs),
                        ids: HashSet::default(),
                        guard: Seq::default(),
                        dirty: false,
                    },
                ));
                tiles.len() - 1
            }
        };
        let entry = &mut tiles[pos].1;
        // The watermark advances exactly as in the first run, replay or not, so lateness decisions
        // after a restart are the same.
        self.max_event_time = self.max_event_time.max(t);
        if seq <= entry.guard {
            return Applied::Replayed;
        }
        // The guard moves for duplicates too (and the tile is rewritten), so the stored guard is
        // the tile's last record whatever the flush timing was.
        entry.guard = seq;
        entry.dirty = true;
        if !entry.ids.insert(xxhash_rust::xxh3::xxh3_64(id.as_bytes())) {
            return Applied::Duplicate;
        }
        update_all(aggs, &mut entry.states, row, t, id);
        entry.dirty = true;
        Applied::Applied
    }

    /// The changed tiles as (key, payload, guard), marked clean.
    pub fn take_dirty(&mut self) -> Vec<(TileKey, Vec<u8>, Seq)> {
        let aggs = &self.aggs;
        let mut out: Vec<_> = self
            .tiles
            .iter_mut()
            .flat_map(|(entity, v)| v.iter_mut().map(move |(s, e)| (entity, s, e)))
            .filter(|(_, _, e)| e.dirty)
            .map(|(entity, s, e)| {
                e.dirty = false;
                (
                    (entity.clone(), *s),
                    encode_tile(aggs, &e.states, &e.ids),
                    e.guard,
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Forgets clean tiles that can no longer change (final); returns how many.
    pub fn evict_final(&mut self) -> usize {
        let (wm, tile, lateness) = (self.watermark(), self.tile, self.allowed_lateness);
        let before = self.len();
        self.tiles.retain(|_, v| {
            v.retain(|(start, e)| e.dirty || !tile_is_final(*start, tile, wm, lateness));
            !v.is_empty()
        });
        before - self.len()
    }

    /// Tiles in memory.
    pub fn len(&self) -> usize {
        self.tiles.values().map(Vec::len).sum()
    }

    /// No tiles in memory.
    pub fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }

    /// A tile in memory, if loaded.
    pub fn get(&self, entity: &str, tile: i64) -> Option<&TileEntry> {
        self.tiles
            .get(entity)?
            .iter()
            .find(|(s, _)| *s == tile)
            .map(|(_, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::Seq;

    #[test]
    fn sequence_numbers_order_numerically_and_round_trip() {
        let k = "49680561374606741574544151889783622783685134021740724242";
        let a = Seq::parse(k).unwrap();
        assert_eq!(a.to_string(), k);
        assert!(
            a < Seq::parse("49680561374606741574544151889783622783685134021740724243").unwrap()
        );
        assert!(a > Seq::parse("9680561374606741574544151889783622783685134021740724242").unwrap());
        assert!(Seq::from(7) < Seq::from(10));
        assert_eq!(Seq::parse("000123").unwrap(), Seq::from(123));
        assert_eq!(Seq::parse("0").unwrap(), Seq::default());
        assert!(Seq::parse("12a").is_none());
        assert!(a < Seq::MAX);
        assert_eq!(Seq::MAX.to_string(), "9".repeat(64));
        assert!(Seq::parse(&"9".repeat(65)).is_none());
    }
}
