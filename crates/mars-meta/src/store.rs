//! The store: entries, Lamport clock, incremental bucket digests.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;

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

#[derive(Clone, Debug)]
struct Slot {
    entry: Entry,
    /// `entry_hash(key, entry)`, cached so replacing the entry needs no rehash.
    hash: Digest,
    bucket: u16,
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
    map: BTreeMap<String, Slot>,
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
            map: BTreeMap::new(),
            scopes: BTreeMap::new(),
        }
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
            Some(slot) if !slot.entry.is_tombstone() => Some(self.write(key, None, now_ms)),
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
        let clock = entry.stamp.clock;
        if clock > MAX_CLOCK {
            return Err(Refusal::ClockAboveMax { clock });
        }
        if clock - self.anchor.min(clock) > MAX_JUMP {
            return Err(Refusal::ClockJump {
                clock,
                local: self.anchor,
            });
        }
        if entry.value.is_some() {
            entry.deleted_ms = 0;
        }
        self.clock = self.clock.max(clock);
        let hash = entry_hash(key, &entry);
        if let Some(old) = self.map.get(key) {
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

    /// The live value of `key`; `None` if absent or deleted.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).and_then(|s| s.entry.value.as_ref())
    }

    /// The entry of `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.map.get(key).map(|s| &s.entry)
    }

    /// Live and tombstone entries whose key starts with `prefix`, in key
    /// order. `range("")` yields everything.
    pub fn range<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> {
        self.slots(prefix).map(|(k, s)| (k, &s.entry))
    }

    fn slots<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Slot)> {
        self.map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, s)| (k.as_str(), s))
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
        self.map.retain(|key, slot| {
            let old =
                slot.entry.is_tombstone() && now_ms.saturating_sub(slot.entry.deleted_ms) > keep_ms;
            if old {
                unaccount(scopes, key, slot);
            }
            !old
        });
        before - self.map.len()
    }

    fn put(&mut self, key: &str, entry: Entry, hash: Digest) {
        let bucket = bucket_of(key);
        let scope = scope_prefix(key).expect("key validated before put");
        let digests = self
            .scopes
            .entry(scope.to_string())
            .or_insert_with(|| ScopeDigests {
                count: 0,
                buckets: [ZERO; BUCKETS],
            });
        let b = &mut digests.buckets[usize::from(bucket)];
        xor_into(b, &hash);
        match self.map.get_mut(key) {
            Some(slot) => {
                xor_into(b, &slot.hash);
                slot.entry = entry;
                slot.hash = hash;
            }
            None => {
                digests.count += 1;
                self.map.insert(
                    key.to_string(),
                    Slot {
                        entry,
                        hash,
                        bucket,
                    },
                );
            }
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
            if store.map.contains_key(&key) {
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

fn unaccount(scopes: &mut BTreeMap<String, ScopeDigests>, key: &str, slot: &Slot) {
    let Some(scope) = scope_prefix(key) else {
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
