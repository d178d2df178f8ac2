//! The one behaviour suite every [`OnlineStore`] implementation must pass (run by the tests of
//! this crate against the embedded store and against DynamoDB Local). It panics on the first
//! failure, like a test; `prefix` keeps each run's keys unique.

use std::sync::Arc;

use crate::{Condition, Guard, Item, ItemKey, ManualClock, OnlineStore, StoreError};

/// 2100-01-01T00:00:00Z, the suite's injected "now" (see [`run_all`]).
const BASE_S: i64 = 4_102_444_800;

fn item(pk: &str, sk: &str, data: &[u8], guard: Option<u128>, expires_at: Option<i64>) -> Item {
    Item {
        key: ItemKey::new(pk, sk),
        data: data.to_vec(),
        guard: guard.map(Guard::from_u128),
        expires_at,
    }
}

/// Runs every case. `clock` must be the clock the store was built with, set to a time the
/// suite then moves forward.
pub async fn run_all(store: Arc<dyn OnlineStore>, clock: &ManualClock, prefix: &str) {
    // Times in the real clock's future: DynamoDB Local deletes items whose TTL has passed in
    // real time (within about a second), whatever the injected clock says.
    clock.set(BASE_S * 1000);
    round_trip(store.as_ref(), prefix).await;
    not_exists(store.as_ref(), prefix).await;
    guard_advances(store.as_ref(), prefix).await;
    races(store.clone(), prefix).await;
    query_ranges(store.as_ref(), prefix).await;
    batches(store.as_ref(), prefix).await;
    expiry(store.as_ref(), clock, prefix).await;
    invalid_input(store.as_ref(), prefix).await;
    leases(store.clone(), clock, prefix).await;
    put_each(store.as_ref(), prefix).await;
    large_values(store.as_ref(), prefix).await;
}

/// Bytes of a large test value: `len` bytes, different for each `seed`.
fn large(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Large values (the batch job's rows, which the embedded store keeps in segment files): written
/// in bulk beside small ones, read by `get`, `batch_get` and `query`, overwritten in bulk (twice:
/// idempotent) and singly (large and small), and deleted.
async fn large_values(s: &dyn OnlineStore, p: &str) {
    let pk = format!("{p}-large#u1");
    let exp = Some(BASE_S + 3_600);
    let mut items: Vec<Item> = (0..10u8)
        .map(|k| {
            item(
                &pk,
                &format!("row#{k}"),
                &large(k, 3_000 + k as usize),
                None,
                exp,
            )
        })
        .collect();
    items.push(item(&pk, "row#small", b"small", Some(3), exp));
    s.batch_put(&items).await.unwrap();
    let mut want: Vec<(String, Option<Vec<u8>>)> = items
        .iter()
        .map(|i| (i.key.sk.clone(), Some(i.data.clone())))
        .collect();
    check_large(s, &pk, &want).await;
    let got = s.get(&items[3].key).await.unwrap().unwrap();
    assert_eq!((got.guard, got.expires_at), (None, exp));
    // Half rewritten in bulk, twice (idempotent), one singly large, one singly small, one deleted.
    let newer: Vec<Item> = items[..5]
        .iter()
        .map(|i| Item {
            data: large(99, 2_500),
            ..i.clone()
        })
        .collect();
    s.batch_put(&newer).await.unwrap();
    s.batch_put(&newer).await.unwrap();
    s.put(
        &item(&pk, "row#5", &large(7, 5_000), None, None),
        Condition::Always,
    )
    .await
    .unwrap();
    s.put(
        &item(&pk, "row#6", b"small now", None, None),
        Condition::Always,
    )
    .await
    .unwrap();
    s.delete(&items[7].key).await.unwrap();
    for w in want.iter_mut().take(5) {
        w.1 = Some(large(99, 2_500));
    }
    want[5].1 = Some(large(7, 5_000));
    want[6].1 = Some(b"small now".to_vec());
    want[7].1 = None;
    check_large(s, &pk, &want).await;
}

/// Checks that `get`, `batch_get` and `query` in partition `pk` find the data of `want` (none:
/// absent).
async fn check_large(s: &dyn OnlineStore, pk: &str, want: &[(String, Option<Vec<u8>>)]) {
    for (sk, data) in want {
        let got = s.get(&ItemKey::new(pk, sk)).await.unwrap();
        assert_eq!(got.map(|i| i.data), *data, "get {sk}");
    }
    let keys: Vec<ItemKey> = want.iter().map(|(sk, _)| ItemKey::new(pk, sk)).collect();
    let got: Vec<Option<Vec<u8>>> = s
        .batch_get(&keys)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.map(|i| i.data))
        .collect();
    assert_eq!(got, want.iter().map(|w| w.1.clone()).collect::<Vec<_>>());
    let queried: Vec<(String, Vec<u8>)> = s
        .query(pk, "row#", "row$")
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.key.sk, i.data))
        .collect();
    let mut present: Vec<(String, Vec<u8>)> = want
        .iter()
        .filter_map(|(sk, d)| Some((sk.clone(), d.clone()?)))
        .collect();
    present.sort();
    assert_eq!(queried, present);
}

/// `put_each`: every item's condition on its own, one result per item, in order.
async fn put_each(s: &dyn OnlineStore, p: &str) {
    let pk = format!("{p}-each#u1");
    let old = item(&pk, "tile#1#s", b"old", Some(10), None);
    s.put(&old, Condition::Always).await.unwrap();
    let items = vec![
        item(&pk, "tile#1#s", b"older", Some(9), None),
        item(&pk, "tile#2#s", b"new", Some(1), None),
        item(&pk, "tile#3#s", b"newer", Some(5), None),
    ];
    let mut many = items.clone();
    for k in 0..60 {
        many.push(item(
            &pk,
            &format!("tile#{:03}#x", 100 + k),
            b"x",
            Some(1),
            None,
        ));
    }
    let r = s.put_each(&many, Condition::GuardAdvances).await;
    assert_eq!(r.len(), many.len());
    assert!(
        matches!(r[0], Err(StoreError::ConditionFailed { .. })),
        "{:?}",
        r[0]
    );
    assert!(r[1..].iter().all(|x| x.is_ok()), "{r:?}");
    assert_eq!(
        s.get(&old.key).await.unwrap(),
        Some(old.clone()),
        "not moved backwards"
    );
    assert_eq!(s.get(&items[2].key).await.unwrap(), Some(items[2].clone()));
    assert_eq!(s.query(&pk, "tile#", "tile#~").await.unwrap().len(), 63);
    assert_eq!(
        s.query(&pk, "", "~").await.unwrap().len(),
        63,
        "empty lower bound"
    );
    // Replaying the same writes: each fails its condition, nothing changes.
    let again = s.put_each(&many[1..], Condition::GuardAdvances).await;
    assert!(
        again
            .iter()
            .all(|x| matches!(x, Err(StoreError::ConditionFailed { .. })))
    );
}

/// Leases: one holder at a time (also under a race), only the holder renews or releases, an
/// expired lease is taken over and its old holder learns it at renewal.
async fn leases(s: Arc<dyn OnlineStore>, clock: &ManualClock, p: &str) {
    use crate::lease::{holder, release, renew, try_acquire};
    let now_s = BASE_S + 100;
    clock.set(now_s * 1000);
    let key = ItemKey::new(format!("{p}-lease#job"), "lock");
    let mut a = try_acquire(s.as_ref(), clock, key.clone(), "a", 30_000)
        .await
        .unwrap()
        .expect("a free lease is taken");
    assert_eq!(a.expires_at, now_s + 30);
    assert!(
        try_acquire(s.as_ref(), clock, key.clone(), "b", 30_000)
            .await
            .unwrap()
            .is_none(),
        "held: b cannot take it"
    );
    assert_eq!(
        holder(s.as_ref(), &key).await.unwrap(),
        Some(("a".into(), now_s + 30))
    );
    clock.set((now_s + 20) * 1000);
    assert!(renew(s.as_ref(), clock, &mut a, 30_000).await.unwrap());
    assert_eq!(a.expires_at, now_s + 50);
    clock.set((now_s + 40) * 1000);
    assert!(
        try_acquire(s.as_ref(), clock, key.clone(), "b", 30_000)
            .await
            .unwrap()
            .is_none(),
        "renewed: still a's"
    );
    // a stalls past its expiry: b takes over, a's renewal and release fail to touch b's lease.
    clock.set((now_s + 50) * 1000);
    let b = try_acquire(s.as_ref(), clock, key.clone(), "b", 30_000)
        .await
        .unwrap()
        .expect("expired lease is taken over");
    assert!(!renew(s.as_ref(), clock, &mut a, 30_000).await.unwrap());
    release(s.as_ref(), clock, &a).await.unwrap();
    assert_eq!(holder(s.as_ref(), &key).await.unwrap().unwrap().0, "b");
    // b releases: free at once.
    release(s.as_ref(), clock, &b).await.unwrap();
    assert_eq!(holder(s.as_ref(), &key).await.unwrap(), None);
    // Eight racers on a free lease: exactly one wins.
    let key2 = ItemKey::new(format!("{p}-lease#race"), "lock");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (s, k) = (s.clone(), key2.clone());
        let c = crate::ManualClock::new(crate::Clock::now_ms(clock));
        tasks.push(tokio::spawn(async move {
            try_acquire(s.as_ref(), c.as_ref(), k, &format!("r{i}"), 30_000)
                .await
                .unwrap()
                .is_some()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn round_trip(s: &dyn OnlineStore, p: &str) {
    let pk = format!("{p}-rt#u1");
    assert_eq!(s.get(&ItemKey::new(&pk, "batch")).await.unwrap(), None);
    let it = item(&pk, "batch", b"\x01states", Some(42), Some(BASE_S + 86_400));
    s.put(&it, Condition::Always).await.unwrap();
    assert_eq!(s.get(&it.key).await.unwrap(), Some(it.clone()));
    let it2 = item(&pk, "batch", b"", None, None);
    s.put(&it2, Condition::Always).await.unwrap();
    assert_eq!(
        s.get(&it.key).await.unwrap(),
        Some(it2),
        "empty data, no guard, no ttl"
    );
    s.delete(&it.key).await.unwrap();
    assert_eq!(s.get(&it.key).await.unwrap(), None);
    s.delete(&it.key).await.unwrap(); // deleting an absent item is fine
}

async fn not_exists(s: &dyn OnlineStore, p: &str) {
    let it = item(&format!("{p}-ne#u1"), "batch", b"first", None, None);
    s.put(&it, Condition::NotExists).await.unwrap();
    let again = item(&it.key.pk, "batch", b"second", None, None);
    let e = s.put(&again, Condition::NotExists).await.unwrap_err();
    assert!(matches!(e, StoreError::ConditionFailed { .. }), "{e}");
    assert_eq!(s.get(&it.key).await.unwrap().unwrap().data, b"first");
}

async fn guard_advances(s: &dyn OnlineStore, p: &str) {
    let pk = format!("{p}-ga#u1");
    let w = |g: u128, d: &[u8]| item(&pk, "tile#0000000000000#shard-0", d, Some(g), None);
    s.put(&w(5, b"5"), Condition::GuardAdvances).await.unwrap();
    for stale in [3u128, 5] {
        let e = s
            .put(&w(stale, b"stale"), Condition::GuardAdvances)
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::ConditionFailed { .. }),
            "guard {stale}: {e}"
        );
    }
    // Numeric, not lexicographic: 10 > 9, and Kinesis-sized sequence numbers work.
    s.put(&w(9, b"9"), Condition::GuardAdvances).await.unwrap();
    s.put(&w(10, b"10"), Condition::GuardAdvances)
        .await
        .unwrap();
    let big = Guard::new("49590338271490256608559692538361571095921575989136588898").unwrap();
    let mut it = w(0, b"big");
    it.guard = Some(big.clone());
    s.put(&it, Condition::GuardAdvances).await.unwrap();
    let got = s.get(&it.key).await.unwrap().unwrap();
    assert_eq!(
        (got.data.as_slice(), got.guard),
        (b"big".as_slice(), Some(big))
    );
    let mut no_guard = w(0, b"x");
    no_guard.guard = None;
    assert!(matches!(
        s.put(&no_guard, Condition::GuardAdvances).await,
        Err(StoreError::InvalidInput(_))
    ));
}

async fn races(s: Arc<dyn OnlineStore>, p: &str) {
    // Eight writers race to create the same item: exactly one wins.
    let key_pk = format!("{p}-race#u1");
    let mut tasks = Vec::new();
    for w in 0..8u8 {
        let (s, pk) = (s.clone(), key_pk.clone());
        tasks.push(tokio::spawn(async move {
            s.put(&item(&pk, "batch", &[w], None, None), Condition::NotExists)
                .await
        }));
    }
    let mut wins = Vec::new();
    for (w, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(()) => wins.push(w as u8),
            Err(StoreError::ConditionFailed { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(wins.len(), 1, "exactly one writer must win, got {wins:?}");
    assert_eq!(
        s.get(&ItemKey::new(&key_pk, "batch"))
            .await
            .unwrap()
            .unwrap()
            .data,
        wins
    );
    // Two guarded writers (a zombie with an old sequence number and the live one): whatever the
    // order, the newest guard ends up stored.
    for round in 0..5 {
        let pk = format!("{p}-race2-{round}#u1");
        let (a, b) = (s.clone(), s.clone());
        let (pa, pb) = (pk.clone(), pk.clone());
        let old = tokio::spawn(async move {
            a.put(
                &item(&pa, "t", b"old", Some(10), None),
                Condition::GuardAdvances,
            )
            .await
        });
        let new = tokio::spawn(async move {
            b.put(
                &item(&pb, "t", b"new", Some(20), None),
                Condition::GuardAdvances,
            )
            .await
        });
        let (ro, rn) = (old.await.unwrap(), new.await.unwrap());
        rn.unwrap();
        assert!(ro.is_ok() || matches!(ro, Err(StoreError::ConditionFailed { .. })));
        let got = s.get(&ItemKey::new(&pk, "t")).await.unwrap().unwrap();
        assert_eq!(
            (got.data.as_slice(), got.guard),
            (b"new".as_slice(), Some(Guard::from_u128(20)))
        );
    }
}

async fn query_ranges(s: &dyn OnlineStore, p: &str) {
    let pk = ItemKey::partition(&format!("{p}-q"), "u1");
    let other = ItemKey::partition(&format!("{p}-q"), "u10");
    let mut items = vec![item(&pk, "batch", b"b", None, None)];
    for t in [0i64, 300_000, 600_000, 900_000] {
        for shard in ["shard-0", "shard-1"] {
            let k = ItemKey::tile(&format!("{p}-q"), "u1", t, shard);
            items.push(item(&k.pk, &k.sk, t.to_string().as_bytes(), None, None));
        }
    }
    items.push(item(
        &other,
        "tile#0000000300000#shard-0",
        b"other",
        None,
        None,
    ));
    s.batch_put(&items).await.unwrap();
    let from = ItemKey::tile("x", "x", 300_000, "").sk;
    let to = ItemKey::tile("x", "x", 900_000, "").sk;
    let got = s.query(&pk, &from, &to).await.unwrap();
    let sks: Vec<&str> = got.iter().map(|i| i.key.sk.as_str()).collect();
    assert_eq!(
        sks,
        [
            "tile#0000000300000#shard-0",
            "tile#0000000300000#shard-1",
            "tile#0000000600000#shard-0",
            "tile#0000000600000#shard-1"
        ]
    );
    // The serving lookup: the batch row and every tile, in one query.
    let all = s.query(&pk, "batch", "tile#~").await.unwrap();
    assert_eq!(all.len(), 9);
    assert_eq!(all[0].key.sk, "batch");
    assert!(s.query(&pk, "tile#9", "tile#1").await.unwrap().is_empty());
}

async fn batches(s: &dyn OnlineStore, p: &str) {
    // More than one request's worth (DynamoDB: 25 items per write, 100 keys per read).
    let items: Vec<Item> = (0..250)
        .map(|i| {
            item(
                &format!("{p}-b#u{i}"),
                "batch",
                format!("v{i}").as_bytes(),
                None,
                None,
            )
        })
        .collect();
    let stats = s.batch_put(&items).await.unwrap();
    assert_eq!(stats.items, 250);
    // Idempotent: the same upload again changes nothing.
    s.batch_put(&items).await.unwrap();
    let mut keys: Vec<ItemKey> = items.iter().map(|i| i.key.clone()).collect();
    keys.push(ItemKey::new(format!("{p}-b#missing"), "batch"));
    keys.push(keys[3].clone());
    let got = s.batch_get(&keys).await.unwrap();
    assert_eq!(got.len(), 252);
    for (i, g) in got.iter().take(250).enumerate() {
        assert_eq!(g.as_ref().unwrap().data, format!("v{i}").as_bytes());
    }
    assert_eq!(got[250], None);
    assert_eq!(got[251].as_ref().unwrap().data, b"v3");
    // The same key twice in one batch: the last one wins.
    let dup = vec![
        item(&format!("{p}-b#d"), "batch", b"1", None, None),
        item(&format!("{p}-b#d"), "batch", b"2", None, None),
    ];
    s.batch_put(&dup).await.unwrap();
    assert_eq!(s.get(&dup[0].key).await.unwrap().unwrap().data, b"2");
}

async fn expiry(s: &dyn OnlineStore, clock: &ManualClock, p: &str) {
    let now_s = BASE_S;
    clock.set(now_s * 1000);
    let pk = format!("{p}-ttl#u1");
    let live = item(&pk, "tile#0000000000000#s", b"live", None, Some(now_s + 10));
    let forever = item(&pk, "tile#0000000300000#s", b"forever", None, None);
    s.batch_put(&[live.clone(), forever.clone()]).await.unwrap();
    assert_eq!(s.get(&live.key).await.unwrap(), Some(live.clone()));
    assert_eq!(s.query(&pk, "tile#", "tile#~").await.unwrap().len(), 2);
    clock.set((now_s + 10) * 1000);
    assert_eq!(s.get(&live.key).await.unwrap(), None, "expired at its ttl");
    assert_eq!(
        s.batch_get(std::slice::from_ref(&live.key)).await.unwrap(),
        vec![None]
    );
    assert_eq!(
        s.query(&pk, "tile#", "tile#~").await.unwrap(),
        vec![forever]
    );
    // An expired item does not block a create.
    s.put(
        &item(&pk, "tile#0000000000000#s", b"reborn", None, None),
        Condition::NotExists,
    )
    .await
    .unwrap();
    assert_eq!(s.get(&live.key).await.unwrap().unwrap().data, b"reborn");
}

async fn invalid_input(s: &dyn OnlineStore, p: &str) {
    let big = item(
        &format!("{p}-big#u1"),
        "batch",
        &vec![0u8; crate::MAX_ITEM_BYTES],
        None,
        None,
    );
    assert!(matches!(
        s.put(&big, Condition::Always).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        s.batch_put(&[big]).await,
        Err(StoreError::InvalidInput(_))
    ));
    let empty = item("", "batch", b"", None, None);
    assert!(matches!(
        s.put(&empty, Condition::Always).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(Guard::new("12a").is_err());
    assert!(Guard::new(&"9".repeat(65)).is_err());
}
