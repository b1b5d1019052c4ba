//! The metadata keys marsd uses, and typed access to them.
//!
//! Names are not identities. A resource *incarnation* (one
//! `create-resource`) and a node (one `create-cluster` or `join-cluster`)
//! each draw a random 64-bit id, and every key that concerns them names the
//! id beside the name (`<name>@<id as 16 hex digits>`, see [`ResRef`] and
//! [`NodeRef`]). A tombstone is a deleted key, so it names the id too: the
//! deletion of one incarnation of `r0` can never touch another incarnation
//! of `r0`, whatever the clocks say, and a node that left cannot remove a
//! new node of its name.
//!
//! | key | scope, kind | value |
//! |---|---|---|
//! | `c/d/node/<node>@<id>` | cluster, desired | [`NodeEntry`]: the node is in the cluster (tombstone: it left) |
//! | `c/d/cluster-id` | cluster, desired | cluster id this cluster adopted in a merge |
//! | `c/d/res/<res>@<id>` | cluster, desired | [`ResEntry`]: the incarnation exists, its size (tombstone: deleted) |
//! | `c/d/member/<res>@<id>/<node>` | cluster, desired | `true`: the node is a member (one key per member, so concurrent joins never overwrite each other) |
//! | `c/d/size/<res>@<id>` | cluster, desired | the size after `resize` (overrides the entry's) |
//! | `r/<res>@<id>/d/primary` | resource, desired | designated primary (node name or null) |
//! | `r/<res>@<id>/d/member/<node>` | resource, desired | [`MemberEntry`]: that member's switches and disk |
//! | `r/<res>@<id>/a/<node>` | resource, actual | [`ActualEntry`]: what that member reports |
//! | `r/<res>@<id>/d/compression` | resource, desired | [`Compression`]: the codec of fetch and sync streams (absent: off) |
//!
//! A name resolves to its live incarnation. Two live incarnations of one
//! name can only come from `create-resource` on both sides of a partition
//! (a merge refuses live clashes, `create-resource` refuses a name it
//! knows), or from a node back after the tombstones' retention with a
//! long-deleted one. Then the one created last (then the higher id) owns the
//! name for commands and views everywhere ([`resources`]); the other is
//! shadowed ([`shadowed`]): views report the clash, its members go on
//! serving it (a node holds one incarnation per name), until the operator
//! deletes one of them by `NAME@ID`.

use crate::Store;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub listen: String,
    pub nbd: String,
    /// blake3 (hex) of the DER of the node's certificate: a peer link is
    /// accepted only with exactly this certificate for this identity.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResEntry {
    pub size: u64,
    pub resource_id: u64,
    /// The Lamport clock when `create-resource` made it: of two live
    /// incarnations of one name, the later owns the name.
    #[serde(default)]
    pub created: u64,
    /// Derived from the `c/d/member/<res>/<node>` keys when read (see [`resource`]); not stored.
    #[serde(default, skip_serializing)]
    pub members: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    pub disk: String,
    pub attached: bool,
    pub connected: bool,
    #[serde(default)]
    pub pause_sync: bool,
    #[serde(default)]
    pub pause_fetch: bool,
    #[serde(default)]
    pub pause_replay: bool,
    /// Fetch rate limit in bytes per second (0: none).
    #[serde(default)]
    pub fetch_rate: u64,
    /// Full-sync rate limit in bytes per second of transferred blocks (0: none).
    #[serde(default)]
    pub sync_rate: u64,
    /// A delayed replica: replay stays this far behind the primary's writes
    /// (`marsadm set-delay`; 0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replay_delay_ms: u64,
}

impl MemberEntry {
    /// A new member on `disk`: attached, connected, nothing paused.
    pub fn up(disk: &std::path::Path) -> MemberEntry {
        MemberEntry {
            disk: disk.display().to_string(),
            attached: true,
            connected: true,
            pause_sync: false,
            pause_fetch: false,
            pause_replay: false,
            fetch_rate: 0,
            sync_rate: 0,
            replay_delay_ms: 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActualEntry {
    pub role: String,
    pub disk: String,
    pub written: u64,
    pub fetched: u64,
    pub replayed: u64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub logfile: Option<String>,
    /// (done, total) bytes while a full sync runs.
    #[serde(default)]
    pub sync: Option<(u64, u64)>,
    /// Blocks a full sync had to transfer (the rest were equal).
    #[serde(default)]
    pub blocks_transferred: u64,
    /// Bytes per second of the running full sync.
    #[serde(default)]
    pub sync_rate: u64,
    /// Replay stopped because the log does not continue this member's history.
    #[serde(default)]
    pub split_brain: bool,
    /// How long the oldest write this member has not replayed has been waiting, in
    /// milliseconds (0 when it has replayed everything it knows of).
    #[serde(default)]
    pub lag_ms: u64,
    /// Emergency mode: on a primary, logfiles a member had not replayed were
    /// deleted to free space; on a secondary, it was cut off that way and
    /// needs `invalidate`.
    #[serde(default)]
    pub emergency: bool,
    /// Bytes this member's disk holds (0: unknown); `resize` needs every one.
    #[serde(default)]
    pub disk_size: u64,
    /// What `replayed` is of it durably (the disk synced, the position persisted):
    /// where the member resumes after losing power. Logfiles are deleted only
    /// behind every member's durable position. None from nodes before it existed
    /// (then `replayed` counts).
    #[serde(default)]
    pub replayed_durable: Option<u64>,
    /// A secondary that reaches no member to fetch or sync from (views show it
    /// not `connected`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
    /// Blocks of this member's disk found not to match their checksums
    /// since its marsd started (issue 18).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checksum_errors: u64,
    /// Of those, blocks not rewritten since: the disk is no good image while
    /// there are any (views never show it `uptodate`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bad_blocks: u64,
    /// Blocks repaired from a good copy (or whose checksum was corrected)
    /// since the node's marsd started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repaired: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub const CLUSTER_ID_KEY: &str = "c/d/cluster-id";

/// Compression of a resource's fetch and sync streams (`marsadm
/// set-compression`): a member asks its sources for this codec, and a source
/// compresses at `level` what gets smaller (see `mars_proto::codec`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    pub codec: LinkCodec,
    /// zstd's level, 1..=19 (0 with `off`).
    #[serde(default)]
    pub level: i32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkCodec {
    #[default]
    Off,
    Zstd,
}

/// Levels of zstd a resource may set.
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

impl Compression {
    /// Whether `level` goes with `codec`.
    pub fn valid(&self) -> bool {
        match self.codec {
            LinkCodec::Off => self.level == 0,
            LinkCodec::Zstd => COMPRESSION_LEVELS.contains(&self.level),
        }
    }

    /// As views show it: `off`, `zstd:1`.
    pub fn show(&self) -> String {
        match self.codec {
            LinkCodec::Off => "off".into(),
            LinkCodec::Zstd => format!("zstd:{}", self.level),
        }
    }
}

/// Which remote entries a node takes at all (least privilege): see the module.
pub use crate::admission::{
    admissible, gossipable, parse_key, Inadmissible, KeyShape, GOSSIP_KEY_PREFIX,
    GOSSIP_PRIMARY_KEY,
};

/// Names of resources and nodes: 1..=64 of `[A-Za-z0-9_.-]`, not starting
/// with `.` or `-` (so never `@` or `/`, which keys use as separators).
pub use mars_logfmt::valid_name;

/// `<name>@<16 hex digits>` into (name, id); `None` unless well formed.
fn parse_token(token: &str) -> Option<(String, u64)> {
    let (name, id) = token.rsplit_once('@')?;
    if !valid_name(name) || id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((name.to_string(), u64::from_str_radix(id, 16).ok()?))
}

/// One incarnation of a resource: its name and the id `create-resource` drew.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResRef {
    pub name: String,
    pub id: u64,
}

impl ResRef {
    pub fn new(name: &str, id: u64) -> ResRef {
        ResRef {
            name: name.to_string(),
            id,
        }
    }
    /// `<name>@<id>`: how keys, the data protocol and `delete-resource NAME@ID` name it.
    pub fn token(&self) -> String {
        format!("{}@{:016x}", self.name, self.id)
    }
    /// The inverse of [`ResRef::token`]; `None` for anything else.
    pub fn parse(token: &str) -> Option<ResRef> {
        parse_token(token).map(|(name, id)| ResRef { name, id })
    }
}

impl std::fmt::Display for ResRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.token())
    }
}

/// One node: its name and the id it drew when it was made a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeRef {
    pub name: String,
    pub id: u64,
}

impl NodeRef {
    pub fn new(name: &str, id: u64) -> NodeRef {
        NodeRef {
            name: name.to_string(),
            id,
        }
    }
    pub fn token(&self) -> String {
        format!("{}@{:016x}", self.name, self.id)
    }
    pub fn parse(token: &str) -> Option<NodeRef> {
        parse_token(token).map(|(name, id)| NodeRef { name, id })
    }
}

/// Where node entries live: `c/d/node/NAME@ID`.
pub const NODE_KEY_PREFIX: &str = "c/d/node/";
pub fn node_key(node: &NodeRef) -> String {
    format!("{NODE_KEY_PREFIX}{}", node.token())
}
pub fn res_key(res: &ResRef) -> String {
    format!("c/d/res/{}", res.token())
}
pub fn primary_key(res: &ResRef) -> String {
    format!("r/{}/d/primary", res.token())
}
pub fn member_key(res: &ResRef, node: &str) -> String {
    format!("r/{}/d/member/{node}", res.token())
}
pub fn actual_key(res: &ResRef, node: &str) -> String {
    format!("r/{}/a/{node}", res.token())
}
pub fn membership_key(res: &ResRef, node: &str) -> String {
    format!("c/d/member/{}/{node}", res.token())
}
/// The size after `resize` (the incarnation's own key is written only by
/// `create-resource`: a resize racing a delete cannot bring it back).
pub fn size_key(res: &ResRef) -> String {
    format!("c/d/size/{}", res.token())
}
pub fn compression_key(res: &ResRef) -> String {
    format!("r/{}/d/compression", res.token())
}
pub fn res_prefix(res: &ResRef) -> String {
    format!("r/{}/", res.token())
}

/// Every key that belongs to incarnation `res`, tombstones included: the
/// resource scope and the cluster entries naming it.
pub fn keys_of(store: &Store, res: &ResRef) -> Vec<String> {
    let members = format!("c/d/member/{}/", res.token());
    let scope = res_prefix(res);
    std::iter::once(res_key(res))
        .chain(std::iter::once(size_key(res)))
        .chain(store.range(&members).map(|(k, _)| k.to_string()))
        .chain(store.range(&scope).map(|(k, _)| k.to_string()))
        .collect()
}

pub fn get<T: DeserializeOwned>(store: &Store, key: &str) -> Option<T> {
    store
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

pub fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Live entries under `prefix` whose key ends in a `<name>@<id>` token, decoded:
/// (name, id, value), in key order (so by name, then id).
fn live_tokens<'a, T: DeserializeOwned>(
    store: &'a Store,
    prefix: &'a str,
) -> impl Iterator<Item = (String, u64, T)> + 'a {
    store.range(prefix).filter_map(move |(k, e)| {
        let (name, id) = parse_token(k.strip_prefix(prefix)?)?;
        let v: T = serde_json::from_value(e.value.clone()?).ok()?;
        Some((name, id, v))
    })
}

/// Keeps, per name, the entry with the lowest id (the owner of the name); by
/// name. (Entries of one name are adjacent in key order, `<name>@` being
/// their common prefix, but names are not in order: `r00@` sorts before
/// `r0@`.)
fn owners<T>(all: impl Iterator<Item = (String, u64, T)>) -> Vec<(String, u64, T)> {
    let mut out: Vec<(String, u64, T)> = Vec::new();
    for (name, id, v) in all {
        match out.last_mut() {
            Some(last) if last.0 == name => {
                if id < last.1 {
                    *last = (name, id, v);
                }
            }
            _ => out.push((name, id, v)),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Live nodes of the cluster: (name, entry), by name.
pub fn nodes(store: &Store) -> Vec<(String, NodeEntry)> {
    owners(live_tokens::<NodeEntry>(store, NODE_KEY_PREFIX))
        .into_iter()
        .map(|(name, _, e)| (name, e))
        .collect()
}

/// The live node named `name`, with its id.
pub fn node(store: &Store, name: &str) -> Option<(NodeRef, NodeEntry)> {
    if !valid_name(name) {
        return None;
    }
    let prefix = format!("c/d/node/{name}@");
    store
        .range(&prefix)
        .filter_map(|(k, e)| {
            let r = NodeRef::parse(k.strip_prefix(NODE_KEY_PREFIX)?)?;
            let v: NodeEntry = serde_json::from_value(e.value.clone()?).ok()?;
            Some((r, v))
        })
        .min_by_key(|(r, _)| r.id)
}

fn live_incarnations(store: &Store) -> impl Iterator<Item = (ResRef, ResEntry)> + '_ {
    live_tokens::<ResEntry>(store, "c/d/res/")
        .filter(|(_, id, e)| e.resource_id == *id)
        .map(|(name, id, e)| (ResRef { name, id }, e))
}

/// Of live incarnations of one name, the one of highest rank owns it: the
/// one created last (a node back after the tombstones' retention with a
/// long-deleted incarnation cannot take the name from a live one), then
/// the higher id.
fn owner_rank(r: &ResRef, e: &ResEntry) -> (u64, u64) {
    (e.created, r.id)
}

/// All live incarnations, the owner of each name first, by name.
fn by_name(store: &Store) -> Vec<Vec<(ResRef, ResEntry)>> {
    let mut groups: std::collections::BTreeMap<String, Vec<(ResRef, ResEntry)>> =
        std::collections::BTreeMap::new();
    for (r, e) in live_incarnations(store) {
        groups.entry(r.name.clone()).or_default().push((r, e));
    }
    groups.into_values().map(|g| ranked(store, g)).collect()
}

/// Incarnations of one name, the owner first (see [`owns`]), with members.
fn ranked(store: &Store, mut g: Vec<(ResRef, ResEntry)>) -> Vec<(ResRef, ResEntry)> {
    g.sort_by_key(|(r, e)| std::cmp::Reverse(owner_rank(r, e)));
    g.into_iter()
        .map(|(r, e)| {
            let e = with_members(store, &r, e);
            (r, e)
        })
        .collect()
}

/// Live resources, one per name (the owner of the name): (incarnation, entry
/// with its members), by name.
pub fn resources(store: &Store) -> Vec<(ResRef, ResEntry)> {
    by_name(store)
        .into_iter()
        .filter_map(|g| g.into_iter().next())
        .collect()
}

/// Every live incarnation: per name, the owner first, then those a name
/// clash shadows; by name.
pub fn all_incarnations(store: &Store) -> Vec<(ResRef, ResEntry)> {
    by_name(store).into_iter().flatten().collect()
}

/// Live incarnations that share their name with its owner (see the module
/// documentation).
pub fn shadowed(store: &Store) -> Vec<(ResRef, ResEntry)> {
    by_name(store)
        .into_iter()
        .flat_map(|g| g.into_iter().skip(1))
        .collect()
}

/// Every live incarnation of `name`, its owner first.
pub fn incarnations(store: &Store, name: &str) -> Vec<(ResRef, ResEntry)> {
    if !valid_name(name) {
        return Vec::new();
    }
    let prefix = format!("c/d/res/{name}@");
    let g: Vec<(ResRef, ResEntry)> = store
        .range(&prefix)
        .filter_map(|(k, e)| {
            let r = ResRef::parse(k.strip_prefix("c/d/res/")?)?;
            let v: ResEntry = serde_json::from_value(e.value.clone()?).ok()?;
            (v.resource_id == r.id).then_some((r, v))
        })
        .collect();
    ranked(store, g)
}

fn with_members(store: &Store, res: &ResRef, mut e: ResEntry) -> ResEntry {
    if let Some(size) = get::<u64>(store, &size_key(res)) {
        e.size = size;
    }
    let prefix = format!("c/d/member/{}/", res.token());
    e.members = store
        .range(&prefix)
        .filter(|(_, e)| e.value.is_some())
        .filter_map(|(k, _)| k.strip_prefix(prefix.as_str()).map(str::to_string))
        .collect();
    e
}

/// The live resource named `name` (or, for `NAME@ID`, that very incarnation
/// while it lives), with its members.
pub fn resource(store: &Store, name: &str) -> Option<(ResRef, ResEntry)> {
    if let Some(r) = ResRef::parse(name) {
        return incarnation(store, &r).map(|e| (r, e));
    }
    incarnations(store, name).into_iter().next()
}

/// Incarnation `res` with its members, while it lives.
pub fn incarnation(store: &Store, res: &ResRef) -> Option<ResEntry> {
    let e: ResEntry = get(store, &res_key(res))?;
    (e.resource_id == res.id).then(|| with_members(store, res, e))
}

/// True once incarnation `res` was deleted (its entry is a tombstone).
pub fn deleted(store: &Store, res: &ResRef) -> bool {
    store.entry(&res_key(res)).is_some_and(|e| e.is_tombstone())
}

/// Whether `node`'s membership of `res` was deleted (`leave-resource`, or
/// `migrate --leave` on the new primary): a tombstone, not just no entry
/// (a node that has not yet learned of its membership holds none).
pub fn membership_deleted(store: &Store, res: &ResRef, node: &str) -> bool {
    store
        .entry(&membership_key(res, node))
        .is_some_and(|e| e.is_tombstone())
}

/// The compression of `res`'s streams (off unless set).
pub fn compression(store: &Store, res: &ResRef) -> Compression {
    get::<Compression>(store, &compression_key(res))
        .filter(Compression::valid)
        .unwrap_or_default()
}

pub fn designated_primary(store: &Store, res: &ResRef) -> Option<String> {
    store
        .get(&primary_key(res))
        .and_then(|v| v.as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn create(s: &mut Store, name: &str, id: u64, members: &[&str]) -> ResRef {
        let r = ResRef::new(name, id);
        s.set(&res_key(&r), json!({ "size": 1, "resource_id": id }));
        for m in members {
            s.set(&membership_key(&r, m), json!(true));
        }
        r
    }

    #[test]
    fn tokens() {
        let r = ResRef::new("r0", 0xab);
        assert_eq!(r.token(), "r0@00000000000000ab");
        assert_eq!(ResRef::parse(&r.token()), Some(r));
        for bad in [
            "r0",
            "r0@",
            "r0@ab",
            "@00000000000000ab",
            "r/0@00000000000000ab",
            "r0@00000000000000ag",
            "r0@000000000000000ab",
            "-r@00000000000000ab",
        ] {
            assert_eq!(ResRef::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_resolve_to_their_live_incarnation() {
        let mut s = Store::new("n1");
        let old = create(&mut s, "r0", 5, &["a"]);
        for k in keys_of(&s, &old) {
            s.delete(&k, 1);
        }
        assert!(resource(&s, "r0").is_none());
        assert!(deleted(&s, &old));
        let new = create(&mut s, "r0", 9, &["b"]);
        let other = create(&mut s, "r00", 1, &["c"]);
        let (r, e) = resource(&s, "r0").unwrap();
        assert_eq!((r, e.members), (new.clone(), vec!["b".to_string()]));
        assert_eq!(resource(&s, &new.token()).unwrap().0, new);
        assert!(resource(&s, &old.token()).is_none());
        let all: Vec<ResRef> = resources(&s).into_iter().map(|(r, _)| r).collect();
        assert_eq!(all, vec![new.clone(), other]);
        // A second live incarnation of a name (made on both sides of a
        // partition, same creation clock): the higher id owns the name, the
        // other is shadowed (and still found by its token).
        let twin = create(&mut s, "r0", 7, &["c"]);
        assert_eq!(resource(&s, "r0").unwrap().0, new);
        let shadow: Vec<ResRef> = shadowed(&s).into_iter().map(|(r, _)| r).collect();
        assert_eq!(shadow, vec![twin.clone()]);
        assert_eq!(resource(&s, &twin.token()).unwrap().0, twin);
        assert_eq!(incarnations(&s, "r0").len(), 2);
        // One created later owns the name, whatever its id: a long-deleted
        // incarnation coming back cannot take it from a live one.
        let later = ResRef::new("r0", 2);
        s.set(
            &res_key(&later),
            json!({ "size": 1, "resource_id": 2, "created": 1000 }),
        );
        assert_eq!(resource(&s, "r0").unwrap().0, later);
        // An entry whose id disagrees with its key is no incarnation.
        s.set(
            "c/d/res/r1@0000000000000001",
            json!({ "size": 1, "resource_id": 2 }),
        );
        assert!(resource(&s, "r1").is_none());
    }

    #[test]
    fn a_node_that_left_is_not_its_successor() {
        let mut s = Store::new("n1");
        let old = NodeRef::new("b", 1);
        s.set(&node_key(&old), json!({ "listen": "x:1", "nbd": "x:2" }));
        s.delete(&node_key(&old), 1);
        assert!(node(&s, "b").is_none());
        let new = NodeRef::new("b", 2);
        s.set(&node_key(&new), json!({ "listen": "y:1", "nbd": "y:2" }));
        // The old node's tombstone, however new its stamp, is another key.
        let mut t = s.entry(&node_key(&old)).unwrap().clone();
        t.stamp.clock += 100;
        s.merge(&node_key(&old), t);
        assert_eq!(node(&s, "b").unwrap().0, new);
        assert_eq!(nodes(&s).len(), 1);
    }
}
