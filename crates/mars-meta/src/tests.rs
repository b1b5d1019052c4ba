//! Unit and property tests of the store (persistence is in tests/persist.rs).

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::*;

const KEYS: &[&str] = &[
    "c/d/members/n1",
    "c/d/members/n2",
    "c/a/addr/n1",
    "c/a/addr/n2",
    "r/v1/d/primary",
    "r/v1/a/n1/pos",
    "r/v1/a/n2/pos",
    "r/v2/d/primary",
    "r/v2/a/n3/size",
    "r/v10/d/primary",
];
const SCOPES: &[&str] = &["c/", "r/v1/", "r/v2/", "r/v10/"];
const NODES: &[&str] = &["n1", "n2", "n3"];

fn entry(clock: u64, node: &str, value: Option<Value>, deleted_ms: u64) -> Entry {
    Entry {
        stamp: Stamp {
            clock,
            node: node.to_string(),
        },
        value,
        deleted_ms,
    }
}

fn state(s: &Store) -> Vec<(String, Entry)> {
    s.range("")
        .map(|(k, e)| (k.to_string(), e.clone()))
        .collect()
}

/// Everything observable must agree, and the incremental digests must
/// equal digests computed from scratch.
fn assert_same(a: &Store, b: &Store) {
    assert_eq!(state(a), state(b));
    assert_eq!(a.clock(), b.clock());
    for k in KEYS {
        assert_eq!(a.get(k), b.get(k), "{k}");
    }
    for p in SCOPES.iter().chain(&["", "r/", "c/d/"]) {
        assert_eq!(a.digest(p), b.digest(p), "digest {p}");
        assert_eq!(a.bucket_digests(p), b.bucket_digests(p), "buckets {p}");
    }
    assert_incremental_ok(a);
    assert_incremental_ok(b);
}

fn assert_incremental_ok(s: &Store) {
    for p in SCOPES {
        assert_eq!(s.bucket_digests(p), s.scan_buckets(p).to_vec(), "scope {p}");
    }
}

fn value_of(v: u8) -> Value {
    match v % 4 {
        0 => json!(v),
        1 => json!(format!("s{v}")),
        2 => json!({"b": v, "a": [v, null, true]}),
        _ => json!(null),
    }
}

/// A remote entry: random key, small clock (many ties), random node, value
/// or tombstone. Includes distinct entries with equal stamps.
fn arb_entry() -> impl Strategy<Value = (String, Entry)> {
    (
        0..KEYS.len(),
        1..6u64,
        0..NODES.len(),
        prop::option::of(0u8..8),
        0..1000u64,
    )
        .prop_map(|(k, clock, n, v, del)| {
            let value = v.map(value_of);
            let deleted_ms = if value.is_none() { del } else { 0 };
            (
                KEYS[k].to_string(),
                entry(clock, NODES[n], value, deleted_ms),
            )
        })
}

fn apply(node: &str, entries: &[(String, Entry)]) -> Store {
    let mut s = Store::new(node);
    for (k, e) in entries {
        s.merge(k, e.clone());
    }
    s
}

/// Anti-entropy as the transport would do it: digest, then bucket digests,
/// then the entries of differing buckets, `from` -> `to`.
fn pull(to: &mut Store, from: &Store) -> usize {
    let mut sent = 0;
    for p in SCOPES {
        if to.digest(p) == from.digest(p) {
            continue;
        }
        let (mine, theirs) = (to.bucket_digests(p), from.bucket_digests(p));
        let differ: Vec<u16> = (0..BUCKETS as u16)
            .filter(|&b| mine[usize::from(b)] != theirs[usize::from(b)])
            .collect();
        for (k, e) in from.entries_in_buckets(p, &differ) {
            sent += 1;
            to.merge(&k, e);
        }
    }
    sent
}

#[derive(Clone, Debug)]
enum Op {
    Set(usize, usize, u8),
    Delete(usize, usize, u64),
    /// Send a subset (mask over the sender's entries) from one node to another.
    Gossip(usize, usize, u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..NODES.len(), 0..KEYS.len(), any::<u8>()).prop_map(|(n, k, v)| Op::Set(n, k, v)),
        (0..NODES.len(), 0..KEYS.len(), 0..1000u64).prop_map(|(n, k, t)| Op::Delete(n, k, t)),
        (0..NODES.len(), 0..NODES.len(), any::<u64>()).prop_map(|(a, b, m)| Op::Gossip(a, b, m)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Same set of entries, any order, with duplicates, in one go or via two
    /// partial stores merged together: identical stores.
    #[test]
    fn merge_is_commutative_associative_idempotent(
        (entries, shuffled, dups, split) in prop::collection::vec(arb_entry(), 0..40)
            .prop_flat_map(|v| {
                let n = v.len();
                (
                    Just(v.clone()),
                    Just(v).prop_shuffle(),
                    prop::collection::vec(any::<prop::sample::Index>(), 0..20),
                    0..=n,
                )
            })
    ) {
        let a = apply("x", &entries);

        let mut with_dups = shuffled.clone();
        if !entries.is_empty() {
            for i in &dups {
                with_dups.push(entries[i.index(entries.len())].clone());
            }
        }
        with_dups.extend(shuffled.iter().rev().cloned());
        let b = apply("x", &with_dups);
        assert_same(&a, &b);

        // associativity: (first part) merged with (second part as a store)
        let mut c = apply("x", &shuffled[..split]);
        let d = apply("y", &shuffled[split..]);
        for (k, e) in d.range("") {
            c.merge(k, e.clone());
        }
        assert_same(&a, &c);

        // re-merging everything changes nothing
        let mut e = a.clone();
        for (k, en) in &entries {
            prop_assert!(!e.merge(k, en.clone()));
        }
        assert_same(&a, &e);
    }

    /// Nodes writing, deleting and gossiping partially, then one round of
    /// bucket anti-entropy: all stores converge, with equal digests.
    #[test]
    fn simulated_nodes_converge(ops in prop::collection::vec(arb_op(), 0..60)) {
        let mut stores: Vec<Store> = NODES.iter().map(|n| Store::new(n)).collect();
        for op in ops {
            match op {
                Op::Set(n, k, v) => {
                    stores[n].set(KEYS[k], value_of(v));
                }
                Op::Delete(n, k, t) => {
                    stores[n].delete(KEYS[k], t);
                }
                Op::Gossip(a, b, mask) => {
                    let sent: Vec<_> = state(&stores[a])
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| mask >> (i % 64) & 1 == 1)
                        .map(|(_, kv)| kv)
                        .collect();
                    for (k, e) in sent {
                        stores[b].merge(&k, e);
                    }
                }
            }
        }
        let (first, rest) = stores.split_at_mut(1);
        for s in rest.iter() {
            pull(&mut first[0], s);
        }
        for s in rest.iter_mut() {
            pull(s, &first[0]);
        }
        for s in &stores[1..] {
            prop_assert_eq!(state(&stores[0]), state(s));
            for p in SCOPES {
                prop_assert_eq!(stores[0].digest(p), s.digest(p));
                prop_assert_eq!(stores[0].bucket_digests(p), s.bucket_digests(p));
            }
            // converged: a further exchange sends nothing
            let mut again = s.clone();
            prop_assert_eq!(pull(&mut again, &stores[0]), 0);
        }
        for s in &stores {
            assert_incremental_ok(s);
        }
    }

    /// Two stores that differ in one entry differ in exactly that entry's
    /// bucket of its scope, and in that scope's digest only.
    #[test]
    fn one_differing_entry_one_differing_bucket(
        entries in prop::collection::vec(arb_entry(), 0..40),
        k in 0..KEYS.len(),
        v in prop::option::of(0u8..8),
    ) {
        let a = apply("x", &entries);
        let mut b = a.clone();
        let key = KEYS[k];
        prop_assert!(b.merge(key, entry(100, "n9", v.map(value_of), 7)));
        let scope = scope_prefix(key).unwrap();
        let bucket = usize::from(bucket_of(key));
        prop_assert_ne!(a.digest(scope), b.digest(scope));
        prop_assert_ne!(a.digest(""), b.digest(""));
        let (da, db) = (a.bucket_digests(scope), b.bucket_digests(scope));
        for i in 0..BUCKETS {
            prop_assert_eq!(da[i] == db[i], i != bucket, "bucket {}", i);
        }
        for p in SCOPES.iter().filter(|p| **p != scope) {
            prop_assert_eq!(a.digest(p), b.digest(p));
            prop_assert_eq!(a.bucket_digests(p), b.bucket_digests(p));
        }
        prop_assert_eq!(
            b.entries_in_buckets(scope, &[bucket as u16])
                .into_iter()
                .filter(|(kk, _)| kk == key)
                .count(),
            1
        );
        assert_incremental_ok(&b);
    }
}

#[test]
fn local_write_after_merge_has_greater_clock() {
    let mut s = Store::new("n1");
    assert_eq!(s.clock(), 0);
    assert!(s.merge("c/d/x", entry(100, "n2", Some(json!(1)), 0)));
    assert_eq!(s.clock(), 100);
    let e = s.set("c/d/y", json!(2));
    assert!(e.stamp.clock > 100);
    assert_eq!(e.stamp.node, "n1");
    // a stale entry still advances the clock
    assert!(!s.merge("c/d/x", entry(50, "n3", Some(json!(3)), 0)));
    let e = s.set("c/d/x", json!(4));
    assert_eq!(e.stamp.clock, 102);
    assert_eq!(s.get("c/d/x"), Some(&json!(4)));
    // a tombstone with a far greater clock: the next local write is beyond it
    assert!(s.merge("c/d/x", entry(500, "a", None, 1)));
    assert_eq!(s.clock(), 500);
    assert!(s.set("c/d/z", json!(0)).stamp.clock > 500);
}

#[test]
fn set_overrides_everything_seen() {
    let mut s = Store::new("a");
    s.merge("c/d/x", entry(7, "zzz", Some(json!("remote")), 0));
    // local node "a" < "zzz", but the local write has a greater clock
    let e = s.set("c/d/x", json!("local"));
    assert_eq!(e.stamp.clock, 8);
    assert_eq!(s.get("c/d/x"), Some(&json!("local")));
}

#[test]
fn equal_clocks_greater_node_wins_everywhere() {
    let lo = entry(5, "alpha", Some(json!("lo")), 0);
    let hi = entry(5, "beta", Some(json!("hi")), 0);
    let mut a = Store::new("n1");
    let mut b = Store::new("n2");
    assert!(a.merge("c/d/k", lo.clone()));
    assert!(a.merge("c/d/k", hi.clone()));
    assert!(b.merge("c/d/k", hi.clone()));
    assert!(!b.merge("c/d/k", lo.clone()));
    assert_eq!(a.get("c/d/k"), Some(&json!("hi")));
    assert_same(&a, &b);
    assert!(
        Stamp {
            clock: 5,
            node: "beta".into()
        } > Stamp {
            clock: 5,
            node: "alpha".into()
        }
    );
    assert!(
        Stamp {
            clock: 6,
            node: "a".into()
        } > Stamp {
            clock: 5,
            node: "z".into()
        }
    );
}

#[test]
fn equal_stamps_different_values_are_resolved_deterministically() {
    let x = entry(5, "n", Some(json!("x")), 0);
    let y = entry(5, "n", None, 9);
    let mut a = Store::new("a");
    let mut b = Store::new("b");
    a.merge("r/v/d/k", x.clone());
    a.merge("r/v/d/k", y.clone());
    b.merge("r/v/d/k", y);
    b.merge("r/v/d/k", x);
    assert_eq!(state(&a), state(&b));
    assert_eq!(a.digest("r/v/"), b.digest("r/v/"));
}

#[test]
fn tombstone_blocks_older_write_newer_write_revives() {
    let mut s = Store::new("n1");
    s.set("c/d/k", json!(1)); // clock 1
    let t = s.delete("c/d/k", 1234).unwrap(); // clock 2
    assert_eq!(t.stamp.clock, 2);
    assert_eq!(t.value, None);
    assert_eq!(t.deleted_ms, 1234);
    assert_eq!(s.get("c/d/k"), None);
    assert!(s.entry("c/d/k").unwrap().is_tombstone());
    // late, older write from elsewhere: no resurrection
    assert!(!s.merge("c/d/k", entry(1, "n9", Some(json!("old")), 0)));
    assert!(!s.merge("c/d/k", entry(2, "n0", Some(json!("old")), 0)));
    assert_eq!(s.get("c/d/k"), None);
    // newer write: revives
    assert!(s.merge("c/d/k", entry(2, "n2", Some(json!("new")), 0)));
    assert_eq!(s.get("c/d/k"), Some(&json!("new")));
    assert!(s.merge("c/d/k", entry(3, "a", None, 99)));
    assert_eq!(s.get("c/d/k"), None);
    assert!(s.merge("c/d/k", entry(4, "a", Some(json!("newer")), 0)));
    assert_eq!(s.get("c/d/k"), Some(&json!("newer")));

    // the same on a remote store receiving the tombstone before the write
    let mut r = Store::new("n2");
    assert!(r.merge("c/d/k", t));
    assert!(!r.merge("c/d/k", entry(1, "n1", Some(json!(1)), 0)));
    assert_eq!(r.get("c/d/k"), None);
}

#[test]
fn delete_of_absent_or_deleted_key_is_none() {
    let mut s = Store::new("n1");
    assert!(s.delete("c/d/k", 1).is_none());
    assert!(s.delete("not a key", 1).is_none());
    s.set("c/d/k", json!(1));
    assert!(s.delete("c/d/k", 1).is_some());
    let clock = s.clock();
    assert!(s.delete("c/d/k", 2).is_none());
    assert_eq!(s.clock(), clock);
}

#[test]
fn gc_drops_only_old_tombstones() {
    let mut s = Store::new("n1");
    s.set("c/d/old", json!(1));
    s.set("c/d/young", json!(1));
    s.set("r/v/d/live", json!(1));
    s.set("r/v/d/old", json!(1));
    s.delete("c/d/old", 100);
    s.delete("c/d/young", 900);
    s.delete("r/v/d/old", 0);
    assert_eq!(s.gc_tombstones(1000, 500), 2);
    assert!(s.entry("c/d/old").is_none());
    assert!(s.entry("r/v/d/old").is_none());
    assert!(s.entry("c/d/young").unwrap().is_tombstone());
    assert_eq!(s.get("r/v/d/live"), Some(&json!(1)));
    assert_eq!(s.gc_tombstones(1000, 500), 0);
    // exactly keep_ms old is kept; older is dropped
    assert_eq!(s.gc_tombstones(1400, 500), 0);
    assert_eq!(s.gc_tombstones(1401, 500), 1);
    // a clock running backwards drops nothing
    s.delete("r/v/d/live", 5000);
    assert_eq!(s.gc_tombstones(10, 0), 0);
    // digests follow: the cluster scope is now empty
    assert_eq!(s.digest("c/"), Store::new("x").digest("c/"));
    for p in ["c/", "r/v/"] {
        assert_eq!(s.bucket_digests(p), s.scan_buckets(p).to_vec());
    }
    assert_eq!(s.len(), 1);
}

#[test]
fn malformed_keys_are_refused_and_change_nothing() {
    let mut s = Store::new("n1");
    s.set("c/d/k", json!(1));
    s.merge("r/v/d/k", entry(3, "n2", Some(json!(2)), 0));
    let before = s.clone();
    let long = format!("c/{}", "x".repeat(MAX_KEY_LEN - 1));
    let bad = [
        "",
        "c/",
        "c",
        "x/y",
        "r/v",
        "r/v/",
        "r//d/k",
        "/c/d",
        "c/d/\u{e9}t\u{e9}",
        "c/d/\n",
        "c/d/\u{7f}",
        "c/d/\0",
        long.as_str(),
    ];
    for key in bad {
        assert!(
            !s.merge(key, entry(1000, "z", Some(json!("bad")), 0)),
            "{key:?}"
        );
        assert!(s.try_set(key, json!(1)).is_err(), "{key:?}");
        assert!(validate_key(key).is_err());
    }
    assert_same(&before, &s);
    // a clock beyond MAX_CLOCK is refused as well
    assert!(!s.merge("c/d/k", entry(MAX_CLOCK + 1, "z", Some(json!(0)), 0)));
    assert!(!s.merge("c/d/k", entry(u64::MAX, "z", None, 0)));
    assert_same(&before, &s);
    // so is a jump of more than MAX_JUMP over this store's clock
    assert_eq!(
        s.try_merge("c/d/k", entry(MAX_JUMP + 4, "z", Some(json!(0)), 0)),
        Err(Refusal::ClockJump {
            clock: MAX_JUMP + 4,
            local: 1
        })
    );
    assert_same(&before, &s);
    assert!(s.merge("c/d/k", entry(MAX_JUMP, "z", Some(json!(0)), 0)));
    // the longest legal key works
    let longest = &long[..MAX_KEY_LEN];
    assert!(s.merge(longest, entry(1, "z", Some(json!(0)), 0)));
}

#[test]
fn try_set_error_names_the_key() {
    let mut s = Store::new("n1");
    let e = s.try_set("x/y", json!(1)).unwrap_err();
    assert!(e.to_string().contains("x/y"), "{e}");
    let e = s.try_set(&"x".repeat(5000), json!(1)).unwrap_err();
    assert!(e.to_string().len() < 300, "{e}");
    assert_eq!(s.clock(), 0);
}

#[test]
#[should_panic(expected = "invalid metadata key")]
fn set_of_malformed_key_panics() {
    Store::new("n1").set("nope", json!(1));
}

#[test]
fn live_values_have_no_deleted_ms() {
    let mut s = Store::new("n1");
    assert!(s.merge("c/d/k", entry(1, "n2", Some(json!(1)), 77)));
    assert_eq!(s.entry("c/d/k").unwrap().deleted_ms, 0);
    assert_eq!(s.set("c/d/j", json!(1)).deleted_ms, 0);
}

#[test]
fn range_is_prefix_and_key_ordered() {
    let mut s = Store::new("n1");
    for k in KEYS.iter().rev() {
        s.set(k, json!(k));
    }
    s.delete("r/v1/a/n1/pos", 1);
    let keys: Vec<&str> = s.range("r/v1/").map(|(k, _)| k).collect();
    assert_eq!(keys, ["r/v1/a/n1/pos", "r/v1/a/n2/pos", "r/v1/d/primary"]);
    assert!(s.range("r/v1/").any(|(_, e)| e.is_tombstone()));
    assert_eq!(s.range("").count(), KEYS.len());
    assert_eq!(s.range("c/a/").count(), 2);
    assert_eq!(s.range("zzz").count(), 0);
    // "r/v1/" must not include "r/v10/"
    assert!(s.range("r/v1/").all(|(k, _)| !k.starts_with("r/v10/")));
}

#[test]
fn buckets_cover_the_prefix() {
    let mut s = Store::new("n1");
    for i in 0..500 {
        s.set(&format!("c/d/k{i}"), json!(i));
    }
    let all: Vec<u16> = (0..BUCKETS as u16).collect();
    let mut got = s.entries_in_buckets("c/", &all);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, state(&s));
    assert!(s.entries_in_buckets("c/", &[64, 1000]).is_empty());
    let some = s.entries_in_buckets("c/", &[3]);
    assert!(!some.is_empty() && some.len() < 50);
    assert!(some.iter().all(|(k, _)| bucket_of(k) == 3));
    // every bucket is used with 500 keys
    assert!(s.bucket_digests("c/").iter().all(|d| *d != [0; 16]));
    assert!(all.iter().all(|b| usize::from(*b) < BUCKETS));
}

#[test]
fn scanned_and_incremental_digests_agree() {
    let mut s = Store::new("n1");
    s.set("r/v/d/a", json!(1));
    s.set("r/v/a/n1/b", json!(2));
    // "r/" and "" are scanned; "r/v/" is incremental; same entries -> same digest
    assert_eq!(s.digest("r/"), s.digest("r/v/"));
    assert_eq!(s.digest(""), s.digest("r/v/"));
    assert_eq!(s.bucket_digests(""), s.bucket_digests("r/v/"));
    s.set("c/d/x", json!(3));
    assert_ne!(s.digest(""), s.digest("r/v/"));
    assert_eq!(s.digest("r/"), s.digest("r/v/"));
    // empty prefixes have the digest of nothing
    assert_eq!(s.digest("r/none/"), Store::new("z").digest(""));
    assert_eq!(s.bucket_digests("r/none/"), vec![[0u8; 16]; BUCKETS]);
}

#[test]
fn digests_are_stable_across_processes() {
    // Golden values: changing them breaks mixed-version clusters.
    let mut s = Store::new("n1");
    s.merge(
        "c/d/members/n1",
        entry(
            1,
            "n1",
            Some(json!({"addr": "10.0.0.1:7777", "w": [1, 2.5, null]})),
            0,
        ),
    );
    s.merge("c/d/members/n2", entry(2, "n2", None, 1000));
    assert_eq!(bucket_of("c/d/members/n1"), GOLDEN_BUCKET);
    assert_eq!(hex(&s.digest("c/")), GOLDEN_DIGEST);
    assert_eq!(hex(&Store::new("x").digest("c/")), GOLDEN_EMPTY);
}

const GOLDEN_BUCKET: u16 = 35;
const GOLDEN_DIGEST: &str = "ee12ad4f96645018710fc3c21d73e0eb";
const GOLDEN_EMPTY: &str = "1a18c1a1014324145fdac51e8fdec3ba";

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The poisoned clock of issue 16: an entry at exactly the merge maximum,
/// then local writes. The store must keep taking writes and keep loading.
#[test]
fn entry_at_the_maximum_clock_does_not_poison_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.store");
    let mut s = Store::new("n1");
    // walk up to the maximum in legal jumps: one per local write
    let mut c = 0;
    while c < MAX_CLOCK {
        c = (c + MAX_JUMP - 1).min(MAX_CLOCK);
        assert!(s.merge("c/d/k", entry(c, "z", Some(json!(c)), 0)));
        if c < MAX_CLOCK {
            s.set("c/d/step", json!(c));
            c += 1;
        }
    }
    assert_eq!(s.clock(), MAX_CLOCK);
    for i in 0..3 {
        let e = s.set("c/d/mine", json!(i));
        assert!(e.stamp.clock > MAX_CLOCK);
        s.save(&path).unwrap();
        s = Store::load(&path, "n1").unwrap();
    }
    assert!(s.set("c/d/mine", json!(9)).stamp.clock > MAX_CLOCK + 3);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever remote clocks arrive (any u64) and however local writes,
    /// saves and loads interleave: a store that loads takes another write
    /// whose stamp exceeds every clock it holds, and saves and loads again.
    #[test]
    fn a_loaded_store_always_takes_another_write(
        ops in proptest::collection::vec(
            prop_oneof![
                any::<u64>().prop_map(Some),
                (0u64..1 << 50).prop_map(Some),
                Just(None),
            ],
            1..40,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.store");
        let mut s = Store::new("n1");
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Some(clock) => {
                    let before = s.clock();
                    let took = s.merge(&format!("c/d/k{}", i % 5), entry(clock, "z", Some(json!(i)), 0));
                    prop_assert!(!took || (clock <= MAX_CLOCK && clock <= before.saturating_add(MAX_JUMP)));
                }
                None => {
                    s.save(&path).unwrap();
                    s = Store::load(&path, "n1").unwrap();
                }
            }
            let highest = s.range("").map(|(_, e)| e.stamp.clock).max().unwrap_or(0);
            let e = s.set("c/d/mine", json!(i));
            prop_assert!(e.stamp.clock > highest);
            prop_assert!(e.stamp.clock <= MAX_CLOCK + 64);
        }
        s.save(&path).unwrap();
        let back = Store::load(&path, "n1").unwrap();
        prop_assert!(back.clock() == s.clock());
    }
}

/// A batch of entries each one step above the one before (red team, session
/// 13): only the first step is taken; the next must wait for a local write.
#[test]
fn a_batch_cannot_walk_the_clock() {
    let mut s = Store::new("n1");
    s.set("c/d/mine", json!(0));
    let mut took = 0;
    for i in 1..=16u64 {
        if s.merge("c/d/walk", entry(i * MAX_JUMP, "z", Some(json!(i)), 0)) {
            took += 1;
        }
    }
    assert_eq!(took, 1);
    assert_eq!(s.clock(), MAX_JUMP);
    // After a local write the anchor moved: one more step.
    s.set("c/d/mine", json!(1));
    assert!(s.merge("c/d/walk", entry(2 * MAX_JUMP, "z", Some(json!(2)), 0)));
    assert!(!s.merge("c/d/walk", entry(3 * MAX_JUMP + 2, "z", Some(json!(3)), 0)));
}

/// A join's snapshot of an old cluster (clocks beyond a fresh store's
/// allowance) is taken whole once trusted (red team, session 13).
#[test]
fn a_trusted_bulk_transfer_takes_clocks_beyond_the_allowance() {
    let mut s = Store::new("n1");
    let far = MAX_JUMP * 4;
    assert!(!s.merge("c/d/k", entry(far, "z", Some(json!(1)), 0)));
    s.trust_clock(far);
    assert!(s.merge("c/d/k", entry(far, "z", Some(json!(1)), 0)));
    assert!(s.set("c/d/mine", json!(1)).stamp.clock > far);
    // Never beyond the maximum.
    let mut t = Store::new("n2");
    t.trust_clock(u64::MAX);
    assert!(!t.merge("c/d/k", entry(MAX_CLOCK + 1, "z", Some(json!(1)), 0)));
}

#[test]
fn a_membership_is_deleted_only_by_a_tombstone_and_a_rejoin_undoes_it() {
    use crate::schema::{membership_deleted, membership_key, ResRef};
    let r0 = ResRef::new("r0", 0xab);
    let key = membership_key(&r0, "alpha");
    let mut s = Store::new("alpha");
    // Nothing known yet (a node that has not learned of its membership).
    assert!(!membership_deleted(&s, &r0, "alpha"));
    s.set(&key, json!(true));
    assert!(!membership_deleted(&s, &r0, "alpha"));
    // The new primary's removal (`migrate --leave`), merged here.
    assert!(s.merge(&key, entry(s.clock() + 1, "gamma", None, 1)));
    assert!(membership_deleted(&s, &r0, "alpha"));
    assert!(!membership_deleted(&s, &r0, "beta"));
    // Joined again: a live entry newer than the tombstone.
    s.set(&key, json!(true));
    assert!(!membership_deleted(&s, &r0, "alpha"));
}
