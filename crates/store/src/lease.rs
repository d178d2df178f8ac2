//! Leases on top of any [`OnlineStore`]: a lock that works across machines, with an expiry so a
//! crashed holder's lease frees itself.
//!
//! A lease is one item: its guard is a random token chosen by the holder, its expiry the end of
//! the lease. Taking it is a `NotExists` write (an expired item counts as absent), renewing and
//! releasing are `GuardEquals` writes, so only the holder of the current token can extend or end
//! it, and a holder whose lease expired and was taken over learns so at its next renewal. Used by
//! the batch scheduler (one copy of a job at a time) and by the speed layer (one reader per
//! shard). Expiry has the store's one-second resolution.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Clock, Condition, Guard, Item, ItemKey, OnlineStore, StoreError};

/// A held lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's item key.
    pub key: ItemKey,
    /// The holder's token (the item's guard).
    pub token: Guard,
    /// Who holds it (free text shown to others, e.g. `host:pid`).
    pub owner: String,
    /// Expiry, epoch seconds.
    pub expires_at: i64,
}

/// This process's name for lease tables: `host:pid` (`HOSTNAME` or `/etc/hostname`).
pub fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{}:{}", host.trim(), std::process::id())
}

/// A fresh random token (time, process id and a counter through the std hasher's random keys).
fn new_token() -> Guard {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let a = h.finish();
    h.write_u8(1);
    Guard::from_u128((u128::from(a) << 64) | u128::from(h.finish()))
}

fn expiry(clock: &dyn Clock, ttl_ms: i64) -> i64 {
    (clock.now_ms() + ttl_ms)
        .div_euclid(1000)
        .max(clock.now_ms().div_euclid(1000) + 1)
}

/// Takes the lease `key` for `ttl_ms` if it is free or expired; `None` if someone else holds it.
pub async fn try_acquire(
    store: &dyn OnlineStore,
    clock: &dyn Clock,
    key: ItemKey,
    owner: &str,
    ttl_ms: i64,
) -> Result<Option<Lease>, StoreError> {
    let lease = Lease {
        key,
        token: new_token(),
        owner: owner.to_string(),
        expires_at: expiry(clock, ttl_ms),
    };
    match store.put(&item(&lease), Condition::NotExists).await {
        Ok(()) => Ok(Some(lease)),
        Err(StoreError::ConditionFailed { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Extends a held lease by `ttl_ms` from now; `false` if it was lost (expired and taken, or
/// released), in which case the holder must stop what the lease protects.
pub async fn renew(
    store: &dyn OnlineStore,
    clock: &dyn Clock,
    lease: &mut Lease,
    ttl_ms: i64,
) -> Result<bool, StoreError> {
    let mut next = lease.clone();
    next.expires_at = expiry(clock, ttl_ms);
    match store.put(&item(&next), Condition::GuardEquals).await {
        Ok(()) => {
            *lease = next;
            Ok(true)
        }
        Err(StoreError::ConditionFailed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives a held lease up (it expires now); a lease already lost is not an error.
pub async fn release(
    store: &dyn OnlineStore,
    clock: &dyn Clock,
    lease: &Lease,
) -> Result<(), StoreError> {
    let mut done = lease.clone();
    done.expires_at = clock.now_ms().div_euclid(1000);
    match store.put(&item(&done), Condition::GuardEquals).await {
        Ok(()) | Err(StoreError::ConditionFailed { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The current holder of `key` and its expiry (epoch seconds), if the lease is held.
pub async fn holder(
    store: &dyn OnlineStore,
    key: &ItemKey,
) -> Result<Option<(String, i64)>, StoreError> {
    Ok(store.get(key).await?.map(|i| {
        (
            String::from_utf8_lossy(&i.data).into_owned(),
            i.expires_at.unwrap_or(i64::MAX),
        )
    }))
}

fn item(lease: &Lease) -> Item {
    Item {
        key: lease.key.clone(),
        data: lease.owner.as_bytes().to_vec(),
        guard: Some(lease.token.clone()),
        expires_at: Some(lease.expires_at),
    }
}
