//! Least privilege for metadata from the network: which remote entries a
//! node takes into its store at all (see [`admissible`]).
//!
//! Every entry that arrives from another node (gossip, anti-entropy, push,
//! a join or merge snapshot) is checked before it is merged:
//!
//! - its key is one of the shapes of [`crate::schema`], every name and id
//!   in it well formed ([`parse_key`]): nothing else is stored, so no name
//!   that could become a path (`..`, `a/b`) enters the store;
//! - a live value decodes as that key's value (a node name where a node
//!   name belongs, a logfile name where a logfile name belongs);
//! - the actual state of a node (`r/<inc>/a/<node>`) and its member entry
//!   (`r/<inc>/d/member/<node>`) are written by that node only: a live value
//!   stamped by another node is refused (a tombstone is not: `delete-resource`
//!   on any node deletes every key of the incarnation);
//! - this node's own actual state and member entry are never replaced by a
//!   live value from elsewhere once its store holds the key (what it wrote,
//!   or a deletion of it): such a value is stamped with this node's name but
//!   this node did not write it, or it is the echo of one it wrote and lost
//!   in a crash (its next write wins again everywhere, see
//!   [`crate::Store::observe`]).
//!
//! A disk path is never taken from metadata at all: a member's disk is
//! local to it (`resources/RES/disk` in its node directory), the `disk` of a
//! [`crate::schema::MemberEntry`] is for display only.

use crate::schema::{
    ActualEntry, MemberEntry, NodeEntry, NodeRef, ResEntry, ResRef, CLUSTER_ID_KEY,
};
use crate::Entry;
use serde::de::DeserializeOwned;

/// One of the keys of [`crate::schema`], parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyShape {
    /// `c/d/node/<node>@<id>`
    Node(NodeRef),
    /// `c/d/cluster-id`
    ClusterId,
    /// `c/d/res/<inc>`
    Res(ResRef),
    /// `c/d/member/<inc>/<node>`
    Membership(ResRef, String),
    /// `c/d/size/<inc>`
    Size(ResRef),
    /// `r/<inc>/d/primary`
    Primary(ResRef),
    /// `r/<inc>/d/member/<node>`
    Member(ResRef, String),
    /// `r/<inc>/a/<node>`
    Actual(ResRef, String),
    /// `r/<inc>/d/compression`
    Compression(ResRef),
    /// `c/d/ca/<16 hex>`: a trusted CA certificate (PEM).
    Ca(String),
    /// `c/d/revoked/<node>@<id>`: a node that left; its certificate is refused.
    Revoked(NodeRef),
    /// `c/d/gossip-key/<8 hex>`: a key of the gossip keyring (64 hex digits).
    GossipKey(String),
    /// `c/d/gossip-primary`: the id of the key gossip is sealed with.
    GossipPrimary,
}

impl KeyShape {
    /// The key, as [`crate::schema`] writes it.
    pub fn key(&self) -> String {
        use crate::schema::*;
        match self {
            KeyShape::Node(n) => node_key(n),
            KeyShape::ClusterId => CLUSTER_ID_KEY.to_string(),
            KeyShape::Res(r) => res_key(r),
            KeyShape::Membership(r, n) => membership_key(r, n),
            KeyShape::Size(r) => size_key(r),
            KeyShape::Primary(r) => primary_key(r),
            KeyShape::Member(r, n) => member_key(r, n),
            KeyShape::Actual(r, n) => actual_key(r, n),
            KeyShape::Compression(r) => compression_key(r),
            KeyShape::Ca(pin) => format!("c/d/ca/{pin}"),
            KeyShape::Revoked(n) => format!("c/d/revoked/{}", n.token()),
            KeyShape::GossipKey(id) => format!("{GOSSIP_KEY_PREFIX}{id}"),
            KeyShape::GossipPrimary => GOSSIP_PRIMARY_KEY.to_string(),
        }
    }
}

/// Metadata keys of the gossip keyring (values: 64 hex digits, and the id
/// of the key in use, 8 hex digits).
pub const GOSSIP_KEY_PREFIX: &str = "c/d/gossip-key/";
pub const GOSSIP_PRIMARY_KEY: &str = "c/d/gossip-primary";

/// Whether `key` may travel by gossip (UDP, sealed with the gossip key):
/// not the CAs, revocations, the gossip keys themselves or the cluster id.
/// Those go only over authenticated TCP (anti-entropy, push, join, merge),
/// so the gossip key alone (a node that left still holds the old one until
/// the rotation that follows its leaving) cannot add a CA, lift a
/// revocation, or learn the new key. Node entries do travel by gossip: a
/// node cut off from every node it knows must still learn of a new node to
/// accept its certificate (docs/DEVELOPMENT.md: the window this leaves).
pub fn gossipable(key: &str) -> bool {
    !matches!(
        parse_key(key),
        Some(
            KeyShape::Ca(_)
                | KeyShape::Revoked(_)
                | KeyShape::GossipKey(_)
                | KeyShape::GossipPrimary
                | KeyShape::ClusterId
        )
    )
}

/// `s` if it is exactly `len` lowercase hex digits.
fn hex_of(s: &str, len: usize) -> Option<String> {
    (s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| s.to_string())
}

fn node_name(s: &str) -> Option<String> {
    crate::schema::valid_name(s).then(|| s.to_string())
}

/// The shape of `key`; `None` unless it is exactly one of the keys of
/// [`crate::schema`] with well-formed names and ids (so that
/// `parse_key(k).map(|s| s.key()) == Some(k)`).
pub fn parse_key(key: &str) -> Option<KeyShape> {
    if key == CLUSTER_ID_KEY {
        return Some(KeyShape::ClusterId);
    }
    if key == GOSSIP_PRIMARY_KEY {
        return Some(KeyShape::GossipPrimary);
    }
    if let Some(rest) = key.strip_prefix("c/d/") {
        let (kind, rest) = rest.split_once('/')?;
        return match kind {
            "node" => NodeRef::parse(rest).map(KeyShape::Node),
            "res" => ResRef::parse(rest).map(KeyShape::Res),
            "size" => ResRef::parse(rest).map(KeyShape::Size),
            "ca" => hex_of(rest, 16).map(KeyShape::Ca),
            "revoked" => NodeRef::parse(rest).map(KeyShape::Revoked),
            "gossip-key" => hex_of(rest, 8).map(KeyShape::GossipKey),
            "member" => {
                let (inc, node) = rest.split_once('/')?;
                Some(KeyShape::Membership(ResRef::parse(inc)?, node_name(node)?))
            }
            _ => None,
        };
    }
    let rest = key.strip_prefix("r/")?;
    let (inc, rest) = rest.split_once('/')?;
    let res = ResRef::parse(inc)?;
    if rest == "d/primary" {
        return Some(KeyShape::Primary(res));
    }
    if rest == "d/compression" {
        return Some(KeyShape::Compression(res));
    }
    if let Some(node) = rest.strip_prefix("d/member/") {
        return Some(KeyShape::Member(res, node_name(node)?));
    }
    let node = rest.strip_prefix("a/")?;
    Some(KeyShape::Actual(res, node_name(node)?))
}

/// Why a remote entry was not admitted (see [`admissible`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Inadmissible {
    #[error("not a metadata key of this version (or a name in it is malformed)")]
    UnknownKey,
    #[error("the value is not what this key holds: {0}")]
    BadValue(String),
    #[error("the state of node {owner} written by {writer}: only {owner} writes it")]
    NotTheOwner { owner: String, writer: String },
    #[error("it would overwrite this node's own entry with one this node did not write")]
    OwnEntry,
    #[error("a revocation is never withdrawn")]
    Unrevoke,
    #[error("the value is {0} bytes, more than this key holds")]
    TooLarge(usize),
}

/// Largest serialised live value a remote entry may carry (a trusted CA's
/// PEM: [`MAX_CA_VALUE`]): one entry must not make every node's store, and
/// the join snapshot, grow without bound.
pub const MAX_VALUE: usize = 4096;
pub const MAX_CA_VALUE: usize = 16 << 10;

fn decodes<T: DeserializeOwned>(v: &serde_json::Value) -> Result<T, Inadmissible> {
    serde_json::from_value(v.clone()).map_err(|e| Inadmissible::BadValue(e.to_string()))
}

fn check_value(shape: &KeyShape, v: &serde_json::Value) -> Result<(), Inadmissible> {
    let bad = |what: &str| Err(Inadmissible::BadValue(what.to_string()));
    match shape {
        KeyShape::Node(_) => decodes::<NodeEntry>(v).map(|_| ()),
        KeyShape::ClusterId => match v.as_str() {
            Some(id)
                if !id.is_empty()
                    && id.len() <= 64
                    && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(())
            }
            _ => bad("a cluster id is hex digits"),
        },
        KeyShape::Res(_) => decodes::<ResEntry>(v).map(|_| ()),
        KeyShape::Ca(_) => match v.as_str() {
            Some(p) if p.len() <= 16 << 10 && p.starts_with("-----BEGIN CERTIFICATE-----") => {
                Ok(())
            }
            _ => bad("a CA is one PEM certificate of at most 16 KiB"),
        },
        KeyShape::Revoked(_) => match v {
            serde_json::Value::Object(_) => Ok(()),
            _ => bad("a revocation is an object"),
        },
        KeyShape::GossipKey(_) => match v.as_str().and_then(|k| hex_of(k, 64)) {
            Some(_) => Ok(()),
            None => bad("a gossip key is 64 hex digits"),
        },
        KeyShape::GossipPrimary => match v.as_str().and_then(|k| hex_of(k, 8)) {
            Some(_) => Ok(()),
            None => bad("the gossip key in use is named by 8 hex digits"),
        },
        KeyShape::Membership(..) => decodes::<bool>(v).map(|_| ()),
        KeyShape::Size(_) => decodes::<u64>(v).map(|_| ()),
        KeyShape::Primary(_) => match v {
            serde_json::Value::Null => Ok(()),
            serde_json::Value::String(n) if crate::schema::valid_name(n) => Ok(()),
            _ => bad("a designated primary is a node name or null"),
        },
        KeyShape::Member(..) => decodes::<MemberEntry>(v).map(|_| ()),
        KeyShape::Compression(_) => match decodes::<crate::schema::Compression>(v)? {
            c if c.valid() => Ok(()),
            _ => bad("zstd's level is 1..=19, and off has none"),
        },
        KeyShape::Actual(..) => {
            let a: ActualEntry = decodes(v)?;
            match a.logfile.as_deref() {
                Some(f) if mars_logfmt::parse_logfile_name(f).is_none() => {
                    bad("`logfile` is not a logfile name")
                }
                _ => Ok(()),
            }
        }
    }
}

/// Whether this node (`me`) takes `entry`, arrived from the network under
/// `key`, into its store, where `held` is what the store holds under `key`
/// now (tombstones included). Pure; the rules are in the module
/// documentation. An entry that [`crate::Store::try_merge`] would ignore
/// anyway (older than `held`) is not refused for being older.
pub fn admissible(
    key: &str,
    entry: &Entry,
    held: Option<&Entry>,
    me: &str,
) -> Result<(), Inadmissible> {
    let shape = parse_key(key).ok_or(Inadmissible::UnknownKey)?;
    let Some(value) = &entry.value else {
        // A revoked node stays revoked: deleting the entry would let its
        // certificate in again.
        if matches!(shape, KeyShape::Revoked(_)) {
            return Err(Inadmissible::Unrevoke);
        }
        // A deletion opens nothing and names nothing: any node may delete
        // (`delete-resource` deletes every key of an incarnation).
        return Ok(());
    };
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    let max = if matches!(shape, KeyShape::Ca(_)) {
        MAX_CA_VALUE
    } else {
        MAX_VALUE
    };
    if size > max {
        return Err(Inadmissible::TooLarge(size));
    }
    check_value(&shape, value)?;
    let owner = match &shape {
        KeyShape::Member(_, n) | KeyShape::Actual(_, n) => n,
        // A node's address is written by the node itself; the node that
        // admitted it writes the first record (nothing held yet: it
        // replaces no value, nor the tombstone of a node that left), and
        // any node may delete it (leave-cluster).
        KeyShape::Node(n) => {
            let replaces = held.is_some_and(|h| entry.stamp >= h.stamp && entry != h);
            if entry.stamp.node != n.name && replaces {
                return Err(Inadmissible::NotTheOwner {
                    owner: n.name.clone(),
                    writer: entry.stamp.node.clone(),
                });
            }
            &n.name
        }
        _ => return Ok(()),
    };
    if entry.stamp.node != *owner && !matches!(shape, KeyShape::Node(_)) {
        return Err(Inadmissible::NotTheOwner {
            owner: owner.clone(),
            writer: entry.stamp.node.clone(),
        });
    }
    // This node's own: a live value from elsewhere replaces nothing this
    // node holds (what it wrote, or a deletion of it).
    if owner == me {
        if let Some(h) = held {
            if entry.stamp >= h.stamp && entry != h {
                return Err(Inadmissible::OwnEntry);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::*;
    use crate::{Stamp, Store};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const ME: &str = "beta";

    fn e(clock: u64, node: &str, value: Option<Value>) -> Entry {
        Entry {
            stamp: Stamp {
                clock,
                node: node.into(),
            },
            deleted_ms: if value.is_none() { 1 } else { 0 },
            value,
        }
    }

    fn r0() -> ResRef {
        ResRef::new("r0", 0xab)
    }

    fn member(disk: &str) -> Value {
        to_value(&MemberEntry::up(std::path::Path::new(disk)))
    }

    fn actual() -> Value {
        to_value(&ActualEntry::default())
    }

    #[test]
    fn every_key_the_schema_writes_parses_back() {
        let n = NodeRef::new("alpha", 7);
        for (k, shape) in [
            (node_key(&n), KeyShape::Node(n.clone())),
            (CLUSTER_ID_KEY.to_string(), KeyShape::ClusterId),
            (res_key(&r0()), KeyShape::Res(r0())),
            (
                membership_key(&r0(), "alpha"),
                KeyShape::Membership(r0(), "alpha".into()),
            ),
            (size_key(&r0()), KeyShape::Size(r0())),
            (primary_key(&r0()), KeyShape::Primary(r0())),
            (
                member_key(&r0(), "alpha"),
                KeyShape::Member(r0(), "alpha".into()),
            ),
            (
                actual_key(&r0(), "alpha"),
                KeyShape::Actual(r0(), "alpha".into()),
            ),
            (compression_key(&r0()), KeyShape::Compression(r0())),
        ] {
            assert_eq!(parse_key(&k), Some(shape.clone()), "{k}");
            assert_eq!(shape.key(), k);
        }
    }

    #[test]
    fn keys_of_no_known_shape_or_with_paths_in_names_are_refused() {
        let live = e(5, "tool", Some(json!(true)));
        for k in [
            "c/d/clock-ahead",
            "c/d/sim/one",
            "c/a/x",
            "r/../resources/x/d/member/beta",
            "r/..@00000000000000ab/d/member/beta",
            "r/r0@00000000000000ab/d/member/../../x",
            "r/r0@00000000000000ab/d/member/a/b",
            "r/r0@00000000000000ab/a/beta/pos",
            "r/r0@00000000000000ab/a/.x",
            "r/r0@00000000000000ab/d/other",
            "r/r0/d/primary",
            "c/d/member/r0@00000000000000ab/",
            "c/d/res/r0@00000000000000ab/x",
            "c/d/node/beta",
            "c/d/cluster-id/x",
        ] {
            assert_eq!(
                admissible(k, &live, None, ME),
                Err(Inadmissible::UnknownKey),
                "{k}"
            );
        }
    }

    #[test]
    fn values_must_be_what_the_key_holds() {
        let ok = |k: &str, v: Value| admissible(k, &e(5, "alpha", Some(v)), None, ME);
        assert!(ok(&primary_key(&r0()), json!("alpha")).is_ok());
        assert!(ok(&primary_key(&r0()), Value::Null).is_ok());
        assert!(ok(&primary_key(&r0()), json!("../x")).is_err());
        assert!(ok(&primary_key(&r0()), json!(3)).is_err());
        assert!(ok(&size_key(&r0()), json!(4096)).is_ok());
        assert!(ok(&size_key(&r0()), json!("big")).is_err());
        assert!(ok(CLUSTER_ID_KEY, json!("00ff")).is_ok());
        assert!(ok(CLUSTER_ID_KEY, json!("../x")).is_err());
        assert!(ok(&membership_key(&r0(), "beta"), json!(true)).is_ok());
        assert!(ok(&membership_key(&r0(), "beta"), json!({})).is_err());
        let mut a = ActualEntry {
            logfile: Some("log-000000001-alpha".into()),
            ..Default::default()
        };
        assert!(ok(&actual_key(&r0(), "alpha"), to_value(&a)).is_ok());
        a.logfile = Some("log-1-../../victim".into());
        assert!(ok(&actual_key(&r0(), "alpha"), to_value(&a)).is_err());
        assert!(ok(&member_key(&r0(), "alpha"), json!({"disk": 1})).is_err());
        let c = compression_key(&r0());
        assert!(ok(&c, json!({"codec": "zstd", "level": 3})).is_ok());
        assert!(ok(&c, json!({"codec": "off", "level": 0})).is_ok());
        assert!(ok(&c, json!({"codec": "zstd", "level": 22})).is_err());
        assert!(ok(&c, json!({"codec": "zstd", "level": 0})).is_err());
        assert!(ok(&c, json!({"codec": "lz4", "level": 1})).is_err());
        assert!(ok(&c, json!("zstd")).is_err());
    }

    #[test]
    fn a_nodes_state_is_written_by_that_node_only_and_deleted_by_anyone() {
        for k in [member_key(&r0(), "gamma"), actual_key(&r0(), "gamma")] {
            let v = if k.contains("/a/") {
                actual()
            } else {
                member("/x")
            };
            assert!(admissible(&k, &e(5, "gamma", Some(v.clone())), None, ME).is_ok());
            assert_eq!(
                admissible(&k, &e(5, "tool", Some(v)), None, ME),
                Err(Inadmissible::NotTheOwner {
                    owner: "gamma".into(),
                    writer: "tool".into()
                })
            );
            assert!(admissible(&k, &e(5, "tool", None), None, ME).is_ok());
        }
    }

    #[test]
    fn this_nodes_own_entries_are_not_overwritten_by_values_it_did_not_write() {
        let k = member_key(&r0(), ME);
        let mine = e(10, ME, Some(member("/dev/mine")));
        // A value stamped with this node's name, newer than what it wrote.
        let forged = e(11, ME, Some(member("/tmp/victim")));
        assert_eq!(
            admissible(&k, &forged, Some(&mine), ME),
            Err(Inadmissible::OwnEntry)
        );
        // The same stamp with another value.
        let twin = e(10, ME, Some(member("/tmp/victim")));
        assert_eq!(
            admissible(&k, &twin, Some(&mine), ME),
            Err(Inadmissible::OwnEntry)
        );
        // Its own entry coming back, or an older one (merge ignores it): fine.
        assert!(admissible(&k, &mine, Some(&mine), ME).is_ok());
        assert!(admissible(&k, &e(9, ME, Some(member("/x"))), Some(&mine), ME).is_ok());
        // A deletion (delete-resource elsewhere) is taken.
        assert!(admissible(&k, &e(11, "alpha", None), Some(&mine), ME).is_ok());
        // Another node's entry of a key is not this node's own.
        let theirs = e(10, "gamma", Some(actual()));
        let k = actual_key(&r0(), "gamma");
        assert!(admissible(&k, &e(11, "gamma", Some(actual())), Some(&theirs), ME).is_ok());
    }

    #[test]
    fn revocations_stay_node_addresses_are_their_own_and_values_are_bounded() {
        let n = NodeRef::new("gamma", 7);
        let rk = format!("c/d/revoked/{}", n.token());
        assert_eq!(
            admissible(
                &rk,
                &e(9, "gamma", None),
                Some(&e(5, "alpha", Some(json!({})))),
                ME
            ),
            Err(Inadmissible::Unrevoke)
        );
        assert!(admissible(&rk, &e(9, "alpha", Some(json!({"at_ms": 1}))), None, ME).is_ok());
        let nk = node_key(&n);
        let addr = |l: &str| json!({"listen": l, "nbd": "127.0.0.1:2"});
        let first = e(5, "alpha", Some(addr("127.0.0.1:1")));
        // The admitting node's first record, and its echo.
        assert!(admissible(&nk, &first, None, ME).is_ok());
        assert!(admissible(&nk, &first, Some(&first), ME).is_ok());
        // Another node rewriting it, or bringing back a node that left.
        let moved = e(6, "beta", Some(addr("10.9.9.9:1")));
        assert!(matches!(
            admissible(&nk, &moved, Some(&first), ME),
            Err(Inadmissible::NotTheOwner { .. })
        ));
        assert!(matches!(
            admissible(&nk, &moved, Some(&e(5, "alpha", None)), ME),
            Err(Inadmissible::NotTheOwner { .. })
        ));
        // The node itself moves; anyone deletes.
        assert!(admissible(
            &nk,
            &e(6, "gamma", Some(addr("127.0.0.1:3"))),
            Some(&first),
            ME
        )
        .is_ok());
        assert!(admissible(&nk, &e(6, "beta", None), Some(&first), ME).is_ok());
        // Huge values.
        let big = json!({"listen": "127.0.0.1:1", "nbd": "x", "pad": "A".repeat(MAX_VALUE)});
        assert!(matches!(
            admissible(
                &node_key(&NodeRef::new("junk", 1)),
                &e(5, "junk", Some(big)),
                None,
                ME
            ),
            Err(Inadmissible::TooLarge(_))
        ));
    }

    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("beta".to_string()),
            Just("gamma".to_string()),
            Just("tool".to_string()),
            Just("..".to_string()),
            Just("a/b".to_string()),
            "[a-z./-]{0,6}",
        ]
    }

    fn arb_key() -> impl Strategy<Value = String> {
        let inc = prop_oneof![
            Just(r0().token()),
            arb_name().prop_map(|n| format!("{n}@00000000000000ab")),
            arb_name(),
        ];
        (inc, arb_name(), 0..9u8, "[a-z/.@-]{0,12}").prop_map(|(inc, n, kind, junk)| match kind {
            0 => format!("c/d/node/{n}@0000000000000001"),
            1 => format!("c/d/res/{inc}"),
            2 => format!("c/d/member/{inc}/{n}"),
            3 => format!("c/d/size/{inc}"),
            4 => format!("r/{inc}/d/primary"),
            5 => format!("r/{inc}/d/member/{n}"),
            6 => format!("r/{inc}/a/{n}"),
            7 => format!("c/{junk}"),
            _ => format!("r/{inc}/{junk}"),
        })
    }

    fn arb_value() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(member("/tmp/victim"))),
            Just(Some(actual())),
            Just(Some(json!(true))),
            Just(Some(json!(4096))),
            Just(Some(json!("beta"))),
            Just(Some(json!({"listen": "x:1", "nbd": "x:2"}))),
        ]
    }

    fn arb_entry() -> impl Strategy<Value = (String, Entry)> {
        (arb_key(), 1..20u64, arb_name(), arb_value())
            .prop_map(|(k, clock, node, value)| (k, e(clock, &node, value)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// What is admitted has a key of the schema, rendered exactly as the
        /// schema renders it (so every name in it is a safe path component);
        /// a live value of a node's own state is that node's.
        #[test]
        fn admitted_entries_have_schema_keys_and_owners((k, entry) in arb_entry()) {
            if admissible(&k, &entry, None, ME).is_ok() {
                let shape = parse_key(&k);
                prop_assert!(shape.is_some(), "{k}");
                let shape = shape.unwrap();
                prop_assert_eq!(shape.key(), k.clone());
                if let (KeyShape::Member(_, n) | KeyShape::Actual(_, n), Some(_)) = (&shape, &entry.value) {
                    prop_assert_eq!(n, &entry.stamp.node);
                }
            }
        }

        /// A store that merges only admitted entries keeps this node's own
        /// member and actual entries as it wrote them (or deleted), whatever
        /// arrives in whatever order.
        #[test]
        fn own_entries_keep_what_this_node_wrote(
            remote in proptest::collection::vec(arb_entry(), 0..40),
            forged in proptest::collection::vec((0..2u8, 1..30u64, arb_value()), 0..10),
        ) {
            let mut s = Store::new(ME);
            let keys = [member_key(&r0(), ME), actual_key(&r0(), ME)];
            s.set(&keys[0], member("/dev/mine"));
            s.set(&keys[1], actual());
            let written: Vec<Value> = keys.iter().map(|k| s.get(k).cloned().unwrap()).collect();
            let mut all = remote;
            for (i, clock, value) in forged {
                all.push((keys[usize::from(i)].clone(), e(clock, ME, value)));
            }
            for (k, entry) in all {
                let held = s.entry(&k).cloned();
                if admissible(&k, &entry, held.as_ref(), ME).is_ok() {
                    s.merge(&k, entry);
                }
            }
            for (k, w) in keys.iter().zip(&written) {
                let now = s.entry(k).unwrap();
                prop_assert!(now.value.is_none() || now.value.as_ref() == Some(w), "{k}: {now:?}");
            }
        }
    }
}
