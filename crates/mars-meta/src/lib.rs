//! Cluster metadata: a Lamport-stamped, last-writer-wins key/value store.
//!
//! Every fact the cluster shares — desired state such as "who should be
//! primary" or "who is a member", and actual state such as positions, disk
//! states and sizes — is a key/value entry in a [`Store`]. Each node keeps
//! its own store; stores exchange entries and converge. This crate is pure:
//! no async, no sockets. Transport (gossip, member-to-member exchange) lives
//! elsewhere and only calls [`Store::merge`] and the anti-entropy helpers.
//!
//! # Last writer wins
//!
//! Every entry carries a [`Stamp`] `(clock, node)`. `clock` is a Lamport
//! clock: a local write ([`Store::set`], [`Store::delete`]) first advances the
//! store's clock by one, and every merged entry advances it to at least the
//! entry's clock, so a write made after seeing another write always has a
//! greater clock. Stamps are totally ordered: a higher clock wins, and equal
//! clocks are decided by the lexicographically greater node name (node names
//! are unique, so two correct writes never share a stamp). [`Store::merge`]
//! keeps, per key, the entry with the greater stamp. This merge is
//! commutative, associative and idempotent: stores that have received the
//! same set of entries, in any order and with any duplicates, are identical.
//! (Even two different entries with the *same* stamp, which only a broken
//! node could produce, are ordered deterministically by their hash.)
//!
//! # Tombstones
//!
//! Deleting a key does not remove it: it stores a tombstone, an entry with
//! `value: None`, stamped like any write. A late-arriving older write
//! therefore loses against the tombstone and cannot resurrect the key, while
//! a newer write replaces it. Tombstones remember the wall-clock time they
//! were made ([`Entry::deleted_ms`]) and are dropped by
//! [`Store::gc_tombstones`] once older than a retention period that must
//! exceed the longest time an older write can remain in flight.
//!
//! # Scopes
//!
//! The key decides who receives an entry ([`scope_of`]):
//!
//! * `c/...` — [`Scope::Cluster`]: membership, addresses, resource names;
//!   gossiped to all nodes.
//! * `r/<res>/...` — [`Scope::Resource`]: sent only among the members of
//!   resource `<res>` and to nodes that ask, so resource metadata costs
//!   nothing on nodes outside the resource.
//!
//! Keys are 1..=512 bytes of printable ASCII with one of these forms
//! ([`validate_key`]). Local writes of malformed keys are refused; remote
//! entries with malformed keys are ignored, never a panic.
//!
//! # Kinds
//!
//! Desired state (what the operator asked) and actual state (what nodes
//! report) live in separate subtrees ([`kind_of`]): `c/d/...` and
//! `r/<res>/d/...` are [`Kind::Desired`]; `c/a/...` and
//! `r/<res>/a/<node>/...` are [`Kind::Actual`]. Administrative commands only
//! write desired state; each node's daemon writes its own actual state while
//! converging towards the desired state.
//!
//! # Anti-entropy
//!
//! Gossip can lose entries, so peers periodically compare digests. Keys
//! under a prefix are spread over [`BUCKETS`] (64) buckets by a hash of the
//! key ([`bucket_of`]); a bucket's digest is the XOR of the 128-bit entry
//! hashes `blake3(key ‖ stamp ‖ value)` of its entries, maintained
//! incrementally on every change, and the prefix digest is the hash of the
//! 64 bucket digests. For scope prefixes (`"c/"`, `"r/<res>/"`) both are
//! O(1) to read. The exchange is:
//!
//! 1. compare [`Store::digest`] of the prefix — equal means done (the usual
//!    case costs 16 bytes);
//! 2. otherwise compare [`Store::bucket_digests`] and send
//!    [`Store::entries_in_buckets`] for the buckets that differ; the peer
//!    merges them (and does the same in the other direction).
//!
//! Digests use blake3 with fixed domain strings and a canonical encoding of
//! JSON values (object members in sorted order), so they are identical
//! across processes, builds and machines.
//!
//! # Persistence
//!
//! [`Store::save`] writes one file (format version [`FORMAT_VERSION`],
//! crc32c-protected) and replaces it crash-safely; [`Store::load`] reads it
//! back, returning an empty store for a missing file and an error naming
//! the file for a damaged one or one of another version.

mod admission;
mod error;
mod key;
mod persist;
pub mod schema;
mod store;

pub use error::MetaError;
pub use key::{
    kind_of, resource_prefix, scope_of, scope_prefix, validate_key, Kind, Scope, CLUSTER_PREFIX,
    MAX_KEY_LEN,
};
pub use persist::FORMAT_VERSION;
pub use store::{bucket_of, Digest, Entry, Refusal, Stamp, Store, BUCKETS, MAX_CLOCK, MAX_JUMP};

#[cfg(test)]
mod tests;
