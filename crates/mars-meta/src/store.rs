//! The store: entries, Lamport clock, incremental bucket digests.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::key::{is_scope_prefix, scope_prefix, validate_key};
use crate::MetaError;

/// Number of anti-entropy buckets per prefix.
pub const BUCKETS: usize = 64;

/// Highest Lamport clock accepted from another node (merge). Entries above
/// it are refused, so that a buggy or hostile peer cannot push the clock
/// near `u64::MAX`: below this bound there are always 2^62 (billions of
/// billions of) local writes left.
pub const MAX_CLOCK: u64 = 1 << 62;

/// How far remote entries may take this store's clock beyond its anchor:
/// the clock of its own last write (or where it was loaded or made). A
/// correct cluster's clock grows by about one per round of writes (at
/// 10,000 writes a second, 2^48 lasts 890 years), so an entry this far
/// ahead is the sign of a broken or hostile writer and is refused rather
/// than spending the clock's headroom. Bounded from the anchor, not from
/// the current clock: a batch of entries each 2^48 above the one before
/// cannot walk the clock to the maximum (only one step per local write).
pub const MAX_JUMP: u64 = 1 << 48;

/// Why a remote entry was refused by [`Store::try_merge`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed key: {0}")]
    Key(&'static str),
    #[error("clock {clock} above the maximum {MAX_CLOCK}")]
    ClockAboveMax { clock: u64 },
    #[error(
        "clock {clock} is more than {MAX_JUMP} ahead of this store's own last write at {local}"
    )]
    ClockJump { clock: u64, local: u64 },
}

/// A 128-bit digest.
pub type Digest = [u8; 16];

const ZERO: Digest = [0; 16];

/// (clock, node): a total order. A higher clock wins; on equal clocks the
/// lexicographically greater node name wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub clock: u64,
    pub node: String,
}

/// One stamped value (or tombstone) of a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub stamp: Stamp,
    /// `None` = tombstone (deleted).
    pub value: Option<Value>,
    /// Wall-clock ms when the tombstone was made (for dropping it later); 0
    /// for live values.
    pub deleted_ms: u64,
}

impl Entry {
    /// True if this entry is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// One key and its entry, as a store holds it. Immutable once made, and
/// shared ([`Arc`]) by every store of the process that holds the same key
/// with the same entry (see [`intern`]): a process that holds many replicas
/// of one cluster's metadata (the simulator holds one per simulated node)
/// keeps each distinct entry once. A real node has one store, where this
/// costs one hash-map lookup per change.
#[derive(Debug)]
struct Slot {
    key: Box<str>,
    entry: Entry,
    /// `entry_hash(key, entry)`, cached so replacing the entry needs no rehash.
    hash: Digest,
    bucket: u16,
}

/// A store's element: a shared [`Slot`], ordered and looked up by its key
/// (so the store's map is a set of pointers, one word per entry).
#[derive(Clone, Debug)]
struct Held(Arc<Slot>);

impl Held {
    fn key(&self) -> &str {
        &self.0.key
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(other.key())
    }
}
impl Borrow<str> for Held {
    fn borrow(&self) -> &str {
        self.key()
    }
}

/// The process-wide table of slots held by stores, by entry hash (which
/// covers the key). Only memory is shared: a slot is reused only if its key
/// and entry are equal to the new one, so what a store holds, and every
/// answer it gives, is the same as with a slot of its own.
struct Interner {
    slots: HashMap<Digest, Arc<Slot>>,
    /// Table size after the last sweep of slots no store holds any more.
    swept: usize,
}

static INTERNER: Mutex<Option<Interner>> = Mutex::new(None);

/// A shared slot for (key, entry, hash), made if no store holds an equal one.
fn intern(key: &str, entry: Entry, hash: Digest) -> Arc<Slot> {
    let mut guard = INTERNER.lock().unwrap_or_else(|e| e.into_inner());
    let table = guard.get_or_insert_with(|| Interner {
        slots: HashMap::new(),
        swept: 0,
    });
    if let Some(slot) = table.slots.get(&hash) {
        if *slot.key == *key && slot.entry == entry {
            return Arc::clone(slot);
        }
        // A 128-bit hash collision: keep this entry to itself.
        return Arc::new(Slot {
            key: key.into(),
            entry,
            hash,
            bucket: bucket_of(key),
        });
    }
    // Drop the slots that only this table still holds once it has doubled
    // since the last sweep: amortized O(1) per change, and never more than
    // about twice the slots the stores hold.
    if table.slots.len() >= 2 * table.swept.max(1024) {
        table.slots.retain(|_, s| Arc::strong_count(s) > 1);
        table.swept = table.slots.len();
    }
    let slot = Arc::new(Slot {
        key: key.into(),
        entry,
        hash,
        bucket: bucket_of(key),
    });
    table.slots.insert(hash, Arc::clone(&slot));
    slot
}

#[derive(Clone, Debug)]
struct ScopeDigests {
    count: usize,
    buckets: [Digest; BUCKETS],
}

/// A Lamport-stamped, last-writer-wins key/value store. See the crate
/// documentation for the model.
#[derive(Clone, Debug)]
pub struct Store {
    node: String,
    clock: u64,
    /// The clock of this store's own last write (or at load): remote entries
    /// may be at most [`MAX_JUMP`] above it.
    anchor: u64,
    /// The entries, by key.
    map: BTreeSet<Held>,
    /// Per scope prefix (`"c/"` or `"r/<res>/"`): XOR of the entry hashes of each
    /// bucket, maintained on every change.
    scopes: BTreeMap<String, ScopeDigests>,
}

impl Store {
    /// An empty store for node `node`. Node names must be unique in the
    /// cluster: they break ties between writes with equal clocks.
    pub fn new(node: &str) -> Store {
        Store {
            node: node.to_string(),
            clock: 0,
            anchor: 0,
            map: BTreeSet::new(),
            scopes: BTreeMap::new(),
        }
    }

    /// A bulk transfer the operator asked for (a `join-cluster` snapshot, a
    /// `merge-cluster` of another cluster) brings clocks up to `clock`: take
    /// them, up to [`MAX_CLOCK`], however far above this store's own writes
    /// (a fresh store's anchor is 0).
    pub fn trust_clock(&mut self, clock: u64) {
        self.anchor = self.anchor.max(clock.min(MAX_CLOCK));
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The Lamport clock: at least every clock this store has seen.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// Number of entries, tombstones included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Local write: the clock advances by one (so it exceeds every clock
    /// seen) and the entry is stamped (clock, own node). Returns the entry to
    /// disseminate.
    ///
    /// # Panics
    /// If `key` is malformed (see [`crate::validate_key`]); use
    /// [`Store::try_set`] for keys that are not known to be well formed.
    pub fn set(&mut self, key: &str, value: Value) -> Entry {
        match self.try_set(key, value) {
            Ok(entry) => entry,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Store::set`] that refuses malformed keys instead of panicking.
    pub fn try_set(&mut self, key: &str, value: Value) -> Result<Entry, MetaError> {
        if let Err(reason) = validate_key(key) {
            let mut shown: String = key.chars().take(80).collect();
            if shown.len() < key.len() {
                shown.push_str("...");
            }
            return Err(MetaError::InvalidKey { key: shown, reason });
        }
        Ok(self.write(key, Some(value), 0))
    }

    /// Local delete: replaces the value by a tombstone stamped like a local
    /// write, remembering `now_ms` for [`Store::gc_tombstones`]. Returns the
    /// tombstone to disseminate, or `None` if the key is absent or already
    /// deleted.
    pub fn delete(&mut self, key: &str, now_ms: u64) -> Option<Entry> {
        match self.map.get(key) {
            Some(Held(slot)) if !slot.entry.is_tombstone() => Some(self.write(key, None, now_ms)),
            _ => None,
        }
    }

    fn write(&mut self, key: &str, value: Option<Value>, deleted_ms: u64) -> Entry {
        self.clock = self.clock.saturating_add(1);
        self.anchor = self.clock;
        let entry = Entry {
            stamp: Stamp {
                clock: self.clock,
                node: self.node.clone(),
            },
            value,
            deleted_ms,
        };
        let hash = entry_hash(key, &entry);
        self.put(key, entry.clone(), hash);
        entry
    }

    /// Merges a remote entry: keeps whichever of the stored and the given
    /// entry has the greater stamp, and advances the local clock to at least
    /// the entry's clock. Returns true if the store changed (the entry is
    /// news and should be passed on); false also for a refused entry (see
    /// [`Store::try_merge`] for the reason).
    pub fn merge(&mut self, key: &str, entry: Entry) -> bool {
        self.try_merge(key, entry).unwrap_or(false)
    }

    /// [`Store::merge`] that says why it refused an entry. Never panics: a
    /// malformed key, a clock above [`MAX_CLOCK`] or more than [`MAX_JUMP`]
    /// ahead of this store's clock is refused and changes nothing. Two
    /// different entries with equal stamps (which correct nodes never
    /// produce) are ordered by their hash, so every store still picks the
    /// same one. A live value's `deleted_ms` is treated as 0.
    pub fn try_merge(&mut self, key: &str, mut entry: Entry) -> Result<bool, Refusal> {
        validate_key(key).map_err(Refusal::Key)?;
        self.observe(entry.stamp.clock)?;
        if entry.value.is_some() {
            entry.deleted_ms = 0;
        }
        let hash = entry_hash(key, &entry);
        if let Some(Held(old)) = self.map.get(key) {
            let order = entry
                .stamp
                .cmp(&old.entry.stamp)
                .then_with(|| hash.cmp(&old.hash));
            if order != Ordering::Greater {
                return Ok(false);
            }
        }
        self.put(key, entry, hash);
        Ok(true)
    }

    /// A remote clock seen: refused above `MAX_CLOCK` or more than
    /// `MAX_JUMP` beyond this store's own last write, else the clock
    /// advances to it. [`Store::try_merge`] does this for every entry; a
    /// remote entry not merged for a reason of the caller's (see
    /// `schema::admissible`) still counts as seen through it, so that this
    /// node's next write of that key wins over it everywhere.
    pub fn observe(&mut self, clock: u64) -> Result<(), Refusal> {
        if clock > MAX_CLOCK {
            return Err(Refusal::ClockAboveMax { clock });
        }
        if clock - self.anchor.min(clock) > MAX_JUMP {
            return Err(Refusal::ClockJump {
                clock,
                local: self.anchor,
            });
        }
        self.clock = self.clock.max(clock);
        Ok(())
    }

    /// The live value of `key`; `None` if absent or deleted.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).and_then(|s| s.0.entry.value.as_ref())
    }

    /// The entry of `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.map.get(key).map(|s| &s.0.entry)
    }

    /// Live and tombstone entries whose key starts with `prefix`, in key
    /// order. `range("")` yields everything.
    pub fn range<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        self.slots(prefix).map(|(k, s)| (k, &s.entry))
    }

    fn slots<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Slot)> {
        self.map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |h| h.key().starts_with(prefix))
            .map(|h| (h.key(), &*h.0))
    }

    /// Drops tombstones made more than `keep_ms` before `now_ms` (wall
    /// clock). Returns how many were dropped.
    ///
    /// `keep_ms` must exceed the longest time an older write can still be in
    /// flight: once its tombstone is gone, a late older write resurrects the
    /// key.
    pub fn gc_tombstones(&mut self, now_ms: u64, keep_ms: u64) -> usize {
        let scopes = &mut self.scopes;
        let before = self.map.len();
        self.map.retain(|Held(slot)| {
            let old =
                slot.entry.is_tombstone() && now_ms.saturating_sub(slot.entry.deleted_ms) > keep_ms;
            if old {
                unaccount(scopes, slot);
            }
            !old
        });
        before - self.map.len()
    }

    fn put(&mut self, key: &str, entry: Entry, hash: Digest) {
        let slot = intern(key, entry, hash);
        let scope = scope_prefix(key).expect("key validated before put");
        if !self.scopes.contains_key(scope) {
            let empty = ScopeDigests {
                count: 0,
                buckets: [ZERO; BUCKETS],
            };
            self.scopes.insert(scope.to_string(), empty);
        }
        let digests = self.scopes.get_mut(scope).expect("inserted above");
        let b = &mut digests.buckets[usize::from(slot.bucket)];
        xor_into(b, &hash);
        match self.map.replace(Held(slot)) {
            Some(Held(old)) => xor_into(b, &old.hash),
            None => digests.count += 1,
        }
    }

    /// 128-bit digest of all entries (key, stamp, value) under `prefix`:
    /// equal, with overwhelming probability, iff the entries are equal.
    /// O(1) for scope prefixes (`"c/"`, `"r/<res>/"`); other prefixes are
    /// computed by scanning.
    pub fn digest(&self, prefix: &str) -> Digest {
        digest_of_buckets(&self.bucket_array(prefix))
    }

    /// Digests of the [`BUCKETS`] buckets under `prefix` (an entry's bucket
    /// is [`bucket_of`] its key). Cheap for scope prefixes.
    pub fn bucket_digests(&self, prefix: &str) -> Vec<Digest> {
        self.bucket_array(prefix).to_vec()
    }

    /// All entries under `prefix` in the given buckets (to send to a peer
    /// whose bucket digests differ). Bucket numbers >= [`BUCKETS`] are
    /// ignored.
    pub fn entries_in_buckets(&self, prefix: &str, buckets: &[u16]) -> Vec<(String, Entry)> {
        let mut wanted = [false; BUCKETS];
        for &b in buckets {
            if let Some(w) = wanted.get_mut(usize::from(b)) {
                *w = true;
            }
        }
        self.slots(prefix)
            .filter(|(_, s)| wanted[usize::from(s.bucket)])
            .map(|(k, s)| (k.to_string(), s.entry.clone()))
            .collect()
    }

    fn bucket_array(&self, prefix: &str) -> [Digest; BUCKETS] {
        if is_scope_prefix(prefix) {
            return self
                .scopes
                .get(prefix)
                .map_or([ZERO; BUCKETS], |d| d.buckets);
        }
        self.scan_buckets(prefix)
    }

    /// Bucket digests computed from scratch (the slow path, and the
    /// reference the incremental digests are tested against).
    pub(crate) fn scan_buckets(&self, prefix: &str) -> [Digest; BUCKETS] {
        let mut buckets = [ZERO; BUCKETS];
        for (key, slot) in self.slots(prefix) {
            xor_into(
                &mut buckets[usize::from(slot.bucket)],
                &entry_hash(key, &slot.entry),
            );
        }
        buckets
    }

    /// Builds a store from decoded entries (used by load). Fails on a
    /// malformed key or a duplicate key. Any clock loads: remote clocks are
    /// bounded when merged, and a store's own writes may take its clock
    /// above [`MAX_CLOCK`] (a store that loads can always take another write
    /// and be saved and loaded again).
    pub(crate) fn from_parts(
        node: &str,
        clock: u64,
        entries: Vec<(String, Entry)>,
    ) -> Result<Store, String> {
        let mut store = Store::new(node);
        store.clock = clock;
        store.anchor = clock;
        for (key, mut entry) in entries {
            if let Err(reason) = validate_key(&key) {
                return Err(format!("entry {key:?}: {reason}"));
            }
            if store.map.contains(key.as_str()) {
                return Err(format!("entry {key:?} appears twice"));
            }
            if entry.value.is_some() {
                entry.deleted_ms = 0;
            }
            store.clock = store.clock.max(entry.stamp.clock);
            let hash = entry_hash(&key, &entry);
            store.put(&key, entry, hash);
        }
        store.anchor = store.clock;
        Ok(store)
    }
}

fn unaccount(scopes: &mut BTreeMap<String, ScopeDigests>, slot: &Slot) {
    let Some(scope) = scope_prefix(&slot.key) else {
        return;
    };
    if let Some(d) = scopes.get_mut(scope) {
        xor_into(&mut d.buckets[usize::from(slot.bucket)], &slot.hash);
        d.count -= 1;
        if d.count == 0 {
            scopes.remove(scope);
        }
    }
}

fn xor_into(acc: &mut Digest, h: &Digest) {
    for (a, b) in acc.iter_mut().zip(h) {
        *a ^= b;
    }
}

fn truncate(hash: blake3::Hash) -> Digest {
    let mut d = ZERO;
    d.copy_from_slice(&hash.as_bytes()[..16]);
    d
}

/// The anti-entropy bucket of `key`, in `0..BUCKETS`. Deterministic across
/// processes and builds.
pub fn bucket_of(key: &str) -> u16 {
    let mut h = blake3::Hasher::new();
    h.update(b"mars-meta bucket v1\0");
    h.update(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    (u64::from_le_bytes(first) % BUCKETS as u64) as u16
}

/// blake3 of the canonical encoding of (key, stamp, value, deleted_ms),
/// truncated to 128 bits. Object members are hashed in sorted order, so the
/// hash does not depend on how a JSON map happens to be ordered.
fn entry_hash(key: &str, entry: &Entry) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"mars-meta entry v1\0");
    put_bytes(&mut h, key.as_bytes());
    h.update(&entry.stamp.clock.to_le_bytes());
    put_bytes(&mut h, entry.stamp.node.as_bytes());
    match &entry.value {
        None => {
            h.update(b"T");
            h.update(&entry.deleted_ms.to_le_bytes());
        }
        Some(v) => {
            h.update(b"V");
            hash_value(&mut h, v);
        }
    }
    truncate(h.finalize())
}

fn put_bytes(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hash_value(h: &mut blake3::Hasher, v: &Value) {
    match v {
        Value::Null => {
            h.update(b"n");
        }
        Value::Bool(b) => {
            h.update(if *b { b"t" } else { b"f" });
        }
        Value::Number(n) => {
            h.update(b"#");
            put_bytes(h, n.to_string().as_bytes());
        }
        Value::String(s) => {
            h.update(b"s");
            put_bytes(h, s.as_bytes());
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(h, item);
            }
        }
        Value::Object(map) => {
            h.update(b"{");
            h.update(&(map.len() as u64).to_le_bytes());
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            for (k, item) in members {
                put_bytes(h, k.as_bytes());
                hash_value(h, item);
            }
        }
    }
}

fn digest_of_buckets(buckets: &[Digest; BUCKETS]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"mars-meta digest v1\0");
    for b in buckets {
        h.update(b);
    }
    truncate(h.finalize())
}

#[cfg(test)]
mod sharing {
    use super::*;
    use serde_json::json;

    fn held<'a>(s: &'a Store, key: &str) -> &'a Arc<Slot> {
        &s.map.get(key).expect("key present").0
    }

    #[test]
    fn equal_entries_are_held_once_and_stores_stay_independent() {
        let mut a = Store::new("sharing-a");
        let mut b = Store::new("sharing-b");
        let e = a.set("c/d/sharing/x", json!({ "listen": "127.0.0.1:7000" }));
        assert!(b.merge("c/d/sharing/x", e.clone()));
        assert!(Arc::ptr_eq(
            held(&a, "c/d/sharing/x"),
            held(&b, "c/d/sharing/x")
        ));
        // A write on one store changes only that store.
        b.set("c/d/sharing/x", json!(2));
        assert_eq!(a.get("c/d/sharing/x"), e.value.as_ref());
        assert_eq!(b.get("c/d/sharing/x"), Some(&json!(2)));
        assert_eq!(a.bucket_digests("c/"), a.scan_buckets("c/").to_vec());
        assert_eq!(b.bucket_digests("c/"), b.scan_buckets("c/").to_vec());
        // A tombstone and its collection touch one store only.
        b.delete("c/d/sharing/x", 1);
        assert_eq!(b.gc_tombstones(10, 1), 1);
        assert!(b.entry("c/d/sharing/x").is_none());
        assert_eq!(a.entry("c/d/sharing/x"), Some(&e));
        assert_eq!(b.digest("c/"), Store::new("sharing-c").digest("c/"));
    }

    #[test]
    fn slots_no_store_holds_are_swept() {
        for i in 0..5000 {
            let mut s = Store::new("sharing-sweep");
            s.set(&format!("c/d/sweep/{i}"), json!(i));
        }
        let table = INTERNER.lock().unwrap_or_else(|e| e.into_inner());
        let left = table.as_ref().map_or(0, |t| t.slots.len());
        // Without sweeping all 5,000 would be left (other tests, running in
        // parallel, hold a few slots of their own).
        assert!(left < 5000, "{left} slots left in the table");
    }
}
