//! The embedded online store: one redb file, for laptops and the demo. Same semantics as DynamoDB:
//! conditions are checked and applied inside one write transaction, so two writers racing for the
//! same key cannot both win.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{
    BatchStats, Clock, Condition, Guard, Item, ItemKey, OnlineStore, StoreError, SystemClock,
    is_expired, validate_item,
};

const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");

/// The embedded store.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    clock: Arc<dyn Clock>,
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
    v.push(1u8); // format version
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
    v
}

struct Stored {
    guard: Option<Guard>,
    expires_at: Option<i64>,
    data: Vec<u8>,
}

fn decode(key: &str, bytes: &[u8]) -> Result<Stored, StoreError> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        key: key.replace('\0', "/"),
        reason: reason.to_string(),
    };
    let mut b = bytes;
    let take = |b: &mut &[u8], n: usize| -> Result<Vec<u8>, StoreError> {
        if b.len() < n {
            return Err(corrupt("truncated"));
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Ok(h.to_vec())
    };
    if take(&mut b, 1)?[0] != 1 {
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
    Ok(Stored {
        guard,
        expires_at,
        data: b.to_vec(),
    })
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
        // Create the table once (a write transaction is a disk sync; reopening needs none).
        let exists = db
            .begin_read()
            .map_err(|e| err(e.into()))?
            .open_table(ITEMS)
            .is_ok();
        if !exists {
            let txn = db.begin_write().map_err(|e| err(e.into()))?;
            txn.open_table(ITEMS).map_err(|e| err(e.into()))?;
            txn.commit().map_err(|e| err(e.into()))?;
        }
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path,
            clock,
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Embedded {
            path: self.path.display().to_string(),
            source: e.into(),
        }
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
        let s = decode(&k, v.value())?;
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
            let txn = s.db.begin_read().map_err(|e| s.err(e))?;
            let table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
            keys.iter().map(|k| s.read_live(&table, k, now)).collect()
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
                let st = decode(key, v.value())?;
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
                {
                    let mut table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
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
                        table
                            .insert(composite(&item.key).as_str(), encode(item).as_slice())
                            .map_err(|e| s.err(e))?;
                    }
                }
                txn.commit().map_err(|e| s.err(e))?;
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
        let encoded: Vec<(String, Vec<u8>)> = items
            .iter()
            .map(|i| (composite(&i.key), encode(i)))
            .collect();
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(|e| s.err(e))?;
            {
                let mut table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
                for (key, value) in &encoded {
                    table
                        .insert(key.as_str(), value.as_slice())
                        .map_err(|e| s.err(e))?;
                }
            }
            txn.commit().map_err(|e| s.err(e))?;
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
            {
                let mut table = txn.open_table(ITEMS).map_err(|e| s.err(e))?;
                table.remove(k.as_str()).map_err(|e| s.err(e))?;
            }
            txn.commit().map_err(|e| s.err(e))?;
            Ok(())
        })
        .await
    }
}
