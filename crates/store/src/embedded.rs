//! The embedded online store: one redb file, for laptops and the demo. Same semantics as DynamoDB:
//! conditions are checked and applied inside one write transaction, so two writers racing for the
//! same key cannot both win.
//!
//! Large values of bulk writes ([`OnlineStore::batch_put`]: the batch job's rows) are kept apart
//! from the B-tree, as in WiscKey: each call appends them to a new segment file beside the
//! database (`<file>.values/`, written and synced before the pointers are committed), and the
//! tree holds a small pointer. Rewriting a row then rewrites a pointer's leaf, not the row's
//! 4 KiB page: a night's 39 MB of rows cost 39 MB of sequential writes instead of about 85 MB of
//! copied pages. Each segment's live bytes are counted in the database; a segment no pointer
//! refers to any more is deleted, and segments less than half live are compacted once dead bytes
//! outweigh live ones.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};

use crate::{
    BatchStats, Clock, Condition, Guard, Item, ItemKey, OnlineStore, StoreError, SystemClock,
    is_expired, validate_item,
};

const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
/// Per value segment: (live bytes, total bytes).
const SEGMENTS: TableDefinition<u32, (u64, u64)> = TableDefinition::new("segments");

/// Encoded values of [`OnlineStore::batch_put`] at least this large go to a segment file (256
/// rather than 1 024 bytes: nights 0.542 to 0.519 s, `scripts/ab-nights.sh`, as the tree keeps
/// almost only pointers; smaller values cost about as much inline as a pointer does).
pub const SEPARATE_FROM: usize = 256;
/// By default, compaction starts once dead bytes in segments exceed both the live bytes and this
/// (see [`EmbeddedStore::with_compact_over`]).
pub const COMPACT_OVER: u64 = 64 << 20;

/// First byte of a stored value: the item itself (see [`encode`]).
const INLINE: u8 = 1;
/// First byte of a stored value: a [`Pointer`] to the item in a segment.
const POINTER: u8 = 2;

/// Reads of [`EmbeddedStore::batch_get`]: a value at most this many bytes after the previous one
/// in its segment is read in the same run, and a run spans at most [`READ_RUN`] bytes.
const READ_GAP: u64 = 16 << 10;
const READ_RUN: u64 = 1 << 20;

/// Where an item's encoding lies in a segment file.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pointer {
    segment: u32,
    offset: u64,
    len: u32,
}

impl Pointer {
    fn encode(&self) -> [u8; 17] {
        let mut b = [0u8; 17];
        b[0] = POINTER;
        b[1..5].copy_from_slice(&self.segment.to_le_bytes());
        b[5..13].copy_from_slice(&self.offset.to_le_bytes());
        b[13..17].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// The pointer a stored value holds (none: the value is inline).
    fn of(stored: &[u8]) -> Option<Pointer> {
        if stored.len() != 17 || stored[0] != POINTER {
            return None;
        }
        Some(Pointer {
            segment: u32::from_le_bytes(stored[1..5].try_into().ok()?),
            offset: u64::from_le_bytes(stored[5..13].try_into().ok()?),
            len: u32::from_le_bytes(stored[13..17].try_into().ok()?),
        })
    }
}

/// The segment files of a store.
#[derive(Debug)]
struct Segments {
    dir: PathBuf,
    /// Open files by segment. Readers hold `guard` (shared) while they resolve pointers; a
    /// segment's file is only deleted under it exclusively, after the commit that left no
    /// pointer to it, so no reader can still be about to read it.
    files: Mutex<HashMap<u32, Arc<File>>>,
    guard: RwLock<()>,
    next: AtomicU32,
}

fn segment_name(id: u32) -> String {
    format!("{id:010}.seg")
}

impl Segments {
    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    fn file(&self, id: u32) -> std::io::Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = files.get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(id))?);
        files.insert(id, f.clone());
        Ok(f)
    }

    fn read(&self, p: Pointer) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; p.len as usize];
        self.file(p.segment)?.read_exact_at(&mut buf, p.offset)?;
        Ok(buf)
    }

    /// Writes `data` as a new segment, synced (with its directory entry) before returning; an
    /// error names the segment's file (a full disk, say).
    fn create(&self, data: &[u8]) -> Result<u32, StoreError> {
        use std::io::Write;
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let path = self.path(id);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            f.write_all(data)?;
            f.sync_data()?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| StoreError::Embedded {
            path: path.display().to_string(),
            source: redb::Error::Io(e),
        })?;
        Ok(id)
    }

    /// Deletes the files of `dead` segments (their records are already gone).
    fn delete(&self, dead: &[u32]) -> std::io::Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let _exclusive = self.guard.write().unwrap_or_else(|e| e.into_inner());
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        for id in dead {
            files.remove(id);
            match std::fs::remove_file(self.path(*id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The embedded store.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    segments: Arc<Segments>,
    compact_over: u64,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

fn composite(key: &ItemKey) -> String {
    format!("{}\0{}", key.pk, key.sk)
}

fn encode(item: &Item) -> Vec<u8> {
    let mut v = Vec::with_capacity(item.data.len() + 80);
    encode_into(&mut v, item);
    v
}

/// Appends the item's encoding: the format version ([`INLINE`]), the guard, the expiry, the data.
fn encode_into(v: &mut Vec<u8>, item: &Item) {
    v.push(INLINE);
    match &item.guard {
        Some(g) => {
            v.push(1);
            v.extend_from_slice(g.as_padded().as_bytes());
        }
        None => v.push(0),
    }
    match item.expires_at {
        Some(t) => {
            v.push(1);
            v.extend_from_slice(&t.to_le_bytes());
        }
        None => v.push(0),
    }
    v.extend_from_slice(&item.data);
}

struct Stored {
    guard: Option<Guard>,
    expires_at: Option<i64>,
    data: Vec<u8>,
}

/// The item `key` (composite key `k`) from its stored encoding, unless expired at `now`.
fn live_item(
    key: &ItemKey,
    k: &str,
    bytes: Cow<'_, [u8]>,
    now: i64,
) -> Result<Option<Item>, StoreError> {
    let s = decode(k, bytes)?;
    if is_expired(s.expires_at, now) {
        return Ok(None);
    }
    Ok(Some(Item {
        key: key.clone(),
        data: s.data,
        guard: s.guard,
        expires_at: s.expires_at,
    }))
}

/// Decodes an item's encoding ([`encode_into`]); an owned one (read from a segment) keeps its
/// buffer for the data.
fn decode(key: &str, bytes: Cow<'_, [u8]>) -> Result<Stored, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: key.replace('\0', "/"),
        reason: reason.to_string(),
    };
    let mut b: &[u8] = &bytes;
    let take = |b: &mut &[u8], n: usize| -> Result<Vec<u8>, StoreError> {
        if b.len() < n {
            return Err(corrupt("truncated"));
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h.to_vec())
    };
    if take(&mut b, 1)?[0] != INLINE {
        return Err(corrupt("unknown format version"));
    }
    let guard = match take(&mut b, 1)?[0] {
        0 => None,
        _ => {
            let g = take(&mut b, crate::GUARD_WIDTH)?;
            Some(Guard::from_padded(
                std::str::from_utf8(&g).map_err(|_| corrupt("guard"))?,
            )?)
        }
    };
    let expires_at = match take(&mut b, 1)?[0] {
        0 => None,
        _ => Some(i64::from_le_bytes(
            take(&mut b, 8)?.try_into().map_err(|_| corrupt("ttl"))?,
        )),
    };
    let header = bytes.len() - b.len();
    let data = match bytes {
        Cow::Borrowed(all) => all[header..].to_vec(),
        Cow::Owned(mut all) => {
            all.drain(..header);
            all
        }
    };
    Ok(Stored {
        guard,
        expires_at,
        data,
    })
}

/// Opens the segment directory of the store at `path` (`<path>.values`), deleting the files no
/// record refers to: a segment written by a write that crashed before its commit, or one whose
/// last pointer went away just before a crash.
fn open_segments(path: &Path, records: &BTreeMap<u32, (u64, u64)>) -> std::io::Result<Segments> {
    let dir = PathBuf::from(format!("{}.values", path.display()));
    std::fs::create_dir_all(&dir)?;
    let mut next = records.keys().next_back().map_or(0, |id| id + 1);
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        next = next.max(id + 1);
        if !records.contains_key(&id) {
            tracing::info!(file = %dir.join(&name).display(), "Deleting a value segment no record refers to.");
            std::fs::remove_file(dir.join(&name))?;
        }
    }
    Ok(Segments {
        dir,
        files: Mutex::new(HashMap::new()),
        guard: RwLock::new(()),
        next: AtomicU32::new(next),
    })
}

/// Counts a replaced or removed stored value's bytes as dead in its segment (if it was a
/// pointer). A segment left without live bytes loses its record and is pushed to `dead`, for its
/// file to be deleted after the commit.
fn release(
    segments: &mut Table<u32, (u64, u64)>,
    old: Option<Pointer>,
    dead: &mut Vec<u32>,
) -> Result<(), redb::Error> {
    let Some(p) = old else { return Ok(()) };
    let record = segments.get(p.segment)?.map(|g| g.value());
    if let Some((live, total)) = record {
        let live = live.saturating_sub(u64::from(p.len));
        if live == 0 {
            segments.remove(p.segment)?;
            dead.push(p.segment);
        } else {
            segments.insert(p.segment, (live, total))?;
        }
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    /// Opens the store with an injected clock (tests of expiry).
    pub fn open_with_clock(
        path: impl AsRef<Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let err = |e: redb::Error| StoreError::Embedded {
            path: path.display().to_string(),
            source: e,
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Embedded {
                path: path.display().to_string(),
                source: redb::Error::Io(e),
            })?;
        }
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        // Create the tables once (a write transaction is a disk sync; reopening needs none).
        let records: BTreeMap<u32, (u64, u64)> = {
            let txn = db.begin_read().map_err(|e| err(e.into()))?;
            match (txn.open_table(ITEMS), txn.open_table(SEGMENTS)) {
                (Ok(_), Ok(segments)) => segments
                    .iter()
                    .map_err(|e| err(e.into()))?
                    .map(|r| r.map(|(k, v)| (k.value(), v.value())))
                    .collect::<Result<_, _>>()
                    .map_err(|e| err(e.into()))?,
                _ => {
                    drop(txn);
                    let txn = db.begin_write().map_err(|e| err(e.into()))?;
                    txn.open_table(ITEMS).map_err(|e| err(e.into()))?;
                    txn.open_table(SEGMENTS).map_err(|e| err(e.into()))?;
                    txn.commit().map_err(|e| err(e.into()))?;
                    BTreeMap::new()
                }
            }
        };
        let segments = open_segments(&path, &records).map_err(|e| err(redb::Error::Io(e)))?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path,
            clock,
            segments: Arc::new(segments),
            compact_over: COMPACT_OVER,
        })
    }

    /// Sets the dead bytes above which (and above the live bytes) segments less than half live
    /// are compacted; [`COMPACT_OVER`] by default.
    pub fn with_compact_over(mut self, bytes: u64) -> Self {
        self.compact_over = bytes;
        self
    }

    /// The directory of the store's value segments.
    pub fn values_dir(&self) -> &Path {
        &self.segments.dir
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Embedded {
            path: self.path.display().to_string(),
            source: e.into(),
        }
    }

    /// The item encoding a stored value holds: itself, or what its pointer points to.
    fn load<'v>(&self, stored: &'v [u8]) -> Result<Cow<'v, [u8]>, StoreError> {
        match Pointer::of(stored) {
            None => Ok(Cow::Borrowed(stored)),
            Some(p) => self.read_value(p).map(Cow::Owned),
        }
    }

    /// The item encoding `p` points to; an error names the segment's file.
    fn read_value(&self, p: Pointer) -> Result<Vec<u8>, StoreError> {
        self.segments.read(p).map_err(|e| StoreError::Embedded {
            path: self.segments.path(p.segment).display().to_string(),
            source: redb::Error::Io(e),
        })
    }

    /// Deletes the files of segments a committed write left without live bytes. A failure only
    /// leaves a file for the next open to delete.
    fn delete_segments(&self, dead: &[u32]) {
        if let Err(e) = self.segments.delete(dead) {
            tracing::warn!(dir = %self.segments.dir.display(), error = %e, "A dead value segment could not be deleted; the next open deletes it.");
        }
    }

    /// The segments to compact, read from `segments` in the write that may call for it: those
    /// less than half live, once the dead bytes of all segments exceed both their live bytes and
    /// `compact_over` (none before).
    fn due_for_compaction(
        &self,
        segments: &Table<u32, (u64, u64)>,
    ) -> Result<Vec<u32>, StoreError> {
        let (mut live, mut total, mut sparse) = (0u64, 0u64, Vec::new());
        for r in segments.iter().map_err(|e| self.err(e))? {
            let (id, v) = r.map_err(|e| self.err(e))?;
            let (l, t) = v.value();
            live += l;
            total += t;
            if l * 2 < t {
                sparse.push(id.value());
            }
        }
        let dead = total - live.min(total);
        Ok(match dead > live.max(self.compact_over) {
            true => sparse,
            false => Vec::new(),
        })
    }

    /// Moves the live values of the `sparse` segments into one new segment, in one write
    /// transaction (the old files are deleted after its commit). A segment another write emptied
    /// meanwhile just has nothing to move.
    fn compact(&self, sparse: &[u32]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut items = txn.open_table(ITEMS).map_err(|e| self.err(e))?;
            let mut segments = txn.open_table(SEGMENTS).map_err(|e| self.err(e))?;
            let mut moved: Vec<(String, Pointer)> = Vec::new();
            for r in items.iter().map_err(|e| self.err(e))? {
                let (k, v) = r.map_err(|e| self.err(e))?;
                if let Some(p) = Pointer::of(v.value())
                    && sparse.contains(&p.segment)
                {
                    moved.push((k.value().to_string(), p));
                }
            }
            let mut data = Vec::new();
            let mut offsets = Vec::with_capacity(moved.len());
            for (_, p) in &moved {
                offsets.push(data.len() as u64);
                data.extend_from_slice(&self.read_value(*p)?);
            }
            if !data.is_empty() {
                let id = self.segments.create(&data)?;
                let size = data.len() as u64;
                segments.insert(id, (size, size)).map_err(|e| self.err(e))?;
                for ((key, p), offset) in moved.iter().zip(offsets) {
                    let to = Pointer {
                        segment: id,
                        offset,
                        len: p.len,
                    };
                    items
                        .insert(key.as_str(), to.encode().as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            for id in sparse {
                segments.remove(*id).map_err(|e| self.err(e))?;
            }
            tracing::debug!(path = %self.path.display(), segments = sparse.len(), items = moved.len(), bytes = data.len(), "Compacted value segments.");
        }
        txn.commit().map_err(|e| self.err(e))?;
        self.delete_segments(sparse);
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| StoreError::Internal(format!("embedded store task failed: {e}")))?
    }

    fn read_live(
        &self,
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &ItemKey,
        now: i64,
    ) -> Result<Option<Item>, StoreError> {
        let k = composite(key);
        let Some(v) = table.get(k.as_str()).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        live_item(key, &k, self.load(v.value())?, now)
    }

    /// The live items of `keys` (in their order) from `table`: inline values as they are read, and
    /// values in segments in runs of neighbours, one read per run instead of one per value (a
    /// night reads tens of thousands of rows, stored next to each other in entity order).
    fn read_many(
        &self,
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        keys: &[ItemKey],
        now: i64,
    ) -> Result<Vec<Option<Item>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        let mut pointed: Vec<(usize, String, Pointer)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let k = composite(key);
            let Some(v) = table.get(k.as_str()).map_err(|e| self.err(e))? else {
                out.push(None);
                continue;
            };
            match Pointer::of(v.value()) {
                Some(p) => {
                    pointed.push((i, k, p));
                    out.push(None);
                }
                None => out.push(live_item(key, &k, Cow::Borrowed(v.value()), now)?),
            }
        }
        pointed.sort_unstable_by_key(|(_, _, p)| (p.segment, p.offset));
        let mut buf = Vec::new();
        let mut rest = pointed.as_slice();
        while let Some((_, _, first)) = rest.first() {
            // A run: values of one segment, each at most READ_GAP bytes after the last.
            let (segment, start) = (first.segment, first.offset);
            let mut end = start + u64::from(first.len);
            let mut n = 1;
            while let Some((_, _, p)) = rest.get(n) {
                let next_end = p.offset + u64::from(p.len);
                if p.segment != segment || p.offset > end + READ_GAP || next_end - start > READ_RUN
                {
                    break;
                }
                end = end.max(next_end);
                n += 1;
            }
            // The buffer only grows (zeroing it to each run's length cost as much as the reads).
            let len = (end - start) as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let buf = &mut buf[..len];
            self.segments
                .file(segment)
                .and_then(|f| f.read_exact_at(buf, start))
                .map_err(|e| StoreError::Embedded {
                    path: self.segments.path(segment).display().to_string(),
                    source: redb::Error::Io(e),
                })?;
            for (i, k, p) in &rest[..n] {
                let at = (p.offset - start) as usize;
                let bytes = buf[at..at + p.len as usize].to_vec();
                out[*i] = live_item(&keys[*i], k, Cow::Owned(bytes), now)?;
            }
            rest = &rest[n..];
        }
        Ok(out)
    }
}

#[async_trait]
impl OnlineStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &ItemKey) -> Result<Option<Item>, StoreError> {
        Ok(self
            .batch_get(std::slice::from_ref(key))
            .await?
            .pop()
            .flatten())
    }

    async fn batch_get(&self, keys: &[ItemKey]) -> Result<Vec<Option<Item>>, StoreError> {
        let keys = keys.to_vec();
        self.blocking(move |s| {
            let now = s.clock.now_ms();
            let _reading = s.segments.guard.read().unwrap_or_else(|e| e.into_inner());
            let txn = s.db.begin_read().map_err(|e| s.err(e))?;
            let table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
            s.read_many(&table, &keys, now)
        })
        .await
    }

    async fn query(&self, pk: &str, sk_from: &str, sk_to: &str) -> Result<Vec<Item>, StoreError> {
        let (pk, from, to) = (
            pk.to_string(),
            format!("{pk}\0{sk_from}"),
            format!("{pk}\0{sk_to}"),
        );
        self.blocking(move |s| {
            let now = s.clock.now_ms();
            let _reading = s.segments.guard.read().unwrap_or_else(|e| e.into_inner());
            let txn = s.db.begin_read().map_err(|e| s.err(e))?;
            let table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
            let mut out = Vec::new();
            if from >= to {
                return Ok(out);
            }
            for entry in table
                .range::<&str>(from.as_str()..to.as_str())
                .map_err(|e| s.err(e))?
            {
                let (k, v) = entry.map_err(|e| s.err(e))?;
                let key = k.value();
                let st = decode(key, s.load(v.value())?)?;
                if is_expired(st.expires_at, now) {
                    continue;
                }
                let sk = key.split_once('\0').map(|(_, sk)| sk).unwrap_or_default();
                out.push(Item {
                    key: ItemKey::new(pk.clone(), sk),
                    data: st.data,
                    guard: st.guard,
                    expires_at: st.expires_at,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn put(&self, item: &Item, condition: Condition) -> Result<(), StoreError> {
        self.put_each(std::slice::from_ref(item), condition)
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    async fn put_each(&self, items: &[Item], condition: Condition) -> Vec<Result<(), StoreError>> {
        let mut checked: Vec<Result<(), StoreError>> = Vec::with_capacity(items.len());
        for item in items {
            checked.push(validate_item(item).and_then(|()| {
                if matches!(condition, Condition::GuardAdvances | Condition::GuardEquals)
                    && item.guard.is_none()
                {
                    Err(StoreError::InvalidInput(format!(
                        "{condition:?} write of {} without a guard",
                        item.key
                    )))
                } else {
                    Ok(())
                }
            }));
        }
        let owned: Vec<Item> = items.to_vec();
        let n = owned.len();
        // One write transaction checks and writes every item: conditions see each other's
        // effects in order, as separate writes would.
        let result = self
            .blocking(move |s| {
                let now = s.clock.now_ms();
                let txn = s.db.begin_write().map_err(|e| s.err(e))?;
                let mut dead = Vec::new();
                {
                    let mut table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
                    let mut segments = txn.open_table(SEGMENTS).map_err(|e| s.err(e))?;
                    for (item, check) in owned.iter().zip(checked.iter_mut()) {
                        if check.is_err() {
                            continue;
                        }
                        let existing = s.read_live(&table, &item.key, now)?;
                        let ok = match (condition, &existing) {
                            (Condition::GuardEquals, None) => false,
                            (Condition::GuardEquals, Some(old)) => old.guard == item.guard,
                            (Condition::Always, _) | (_, None) => true,
                            (Condition::NotExists, Some(_)) => false,
                            (Condition::GuardAdvances, Some(old)) => {
                                match (&old.guard, &item.guard) {
                                    (None, _) => true,
                                    (Some(o), Some(n)) => o < n,
                                    (Some(_), None) => false,
                                }
                            }
                        };
                        if !ok {
                            *check = Err(StoreError::ConditionFailed {
                                key: item.key.clone(),
                            });
                            continue;
                        }
                        let old = table
                            .insert(composite(&item.key).as_str(), encode(item).as_slice())
                            .map_err(|e| s.err(e))?
                            .and_then(|g| Pointer::of(g.value()));
                        release(&mut segments, old, &mut dead).map_err(|e| s.err(e))?;
                    }
                }
                txn.commit().map_err(|e| s.err(e))?;
                s.delete_segments(&dead);
                Ok(checked)
            })
            .await;
        match result {
            Ok(v) => v,
            Err(e) => {
                let text = e.to_string();
                (0..n)
                    .map(|_| Err(StoreError::Internal(text.clone())))
                    .collect()
            }
        }
    }

    async fn batch_put(&self, items: &[Item]) -> Result<BatchStats, StoreError> {
        for i in items {
            validate_item(i)?;
        }
        // Encoded here: one copy of each item for the write thread, not a clone and an encoding.
        // Large ones go to one buffer, the new segment's content (see the module's docs).
        let large: usize = (items.iter())
            .map(|i| i.data.len() + 64)
            .filter(|n| *n >= SEPARATE_FROM)
            .sum();
        let mut segment = Vec::with_capacity(large);
        let encoded: Vec<(String, Result<Pointer, Vec<u8>>)> = items
            .iter()
            .map(|i| {
                let start = segment.len();
                encode_into(&mut segment, i);
                let len = segment.len() - start;
                let value = match u32::try_from(len) {
                    Ok(len) if len as usize >= SEPARATE_FROM => Ok(Pointer {
                        segment: 0, // set once the segment is written
                        offset: start as u64,
                        len,
                    }),
                    _ => Err(segment.split_off(start)),
                };
                (composite(&i.key), value)
            })
            .collect();
        self.blocking(move |s| {
            let id = match segment.is_empty() {
                true => None,
                false => Some(s.segments.create(&segment)?),
            };
            let txn = s.db.begin_write().map_err(|e| s.err(e))?;
            let mut dead = Vec::new();
            let sparse = {
                let mut table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
                let mut segments = txn.open_table(SEGMENTS).map_err(|e| s.err(e))?;
                if let Some(id) = id {
                    let size = segment.len() as u64;
                    segments.insert(id, (size, size)).map_err(|e| s.err(e))?;
                }
                for (key, value) in &encoded {
                    let pointer;
                    let stored: &[u8] = match value {
                        Ok(p) => {
                            pointer = Pointer {
                                segment: id.unwrap_or_default(),
                                ..*p
                            }
                            .encode();
                            &pointer
                        }
                        Err(inline) => inline,
                    };
                    let old = table
                        .insert(key.as_str(), stored)
                        .map_err(|e| s.err(e))?
                        .and_then(|g| Pointer::of(g.value()));
                    release(&mut segments, old, &mut dead).map_err(|e| s.err(e))?;
                }
                match id {
                    Some(_) => s.due_for_compaction(&segments)?,
                    None => Vec::new(),
                }
            };
            txn.commit().map_err(|e| s.err(e))?;
            s.delete_segments(&dead);
            if !sparse.is_empty() {
                s.compact(&sparse)?;
            }
            Ok(BatchStats {
                items: encoded.len() as u64,
                requests: 1,
                retries: 0,
            })
        })
        .await
    }

    async fn delete(&self, key: &ItemKey) -> Result<(), StoreError> {
        let k = composite(key);
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(|e| s.err(e))?;
            let mut dead = Vec::new();
            {
                let mut table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
                let mut segments = txn.open_table(SEGMENTS).map_err(|e| s.err(e))?;
                let old = table
                    .remove(k.as_str())
                    .map_err(|e| s.err(e))?
                    .and_then(|g| Pointer::of(g.value()));
                release(&mut segments, old, &mut dead).map_err(|e| s.err(e))?;
            }
            txn.commit().map_err(|e| s.err(e))?;
            s.delete_segments(&dead);
            Ok(())
        })
        .await
    }
}
