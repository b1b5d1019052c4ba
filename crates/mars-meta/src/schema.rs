//! The metadata keys marsd uses, and typed access to them.
//!
//! | key | scope, kind | value |
//! |---|---|---|
//! | `c/d/node/<node>` | cluster, desired | [`NodeEntry`]: the node is in the cluster (tombstone: it left) |
//! | `c/d/cluster-id` | cluster, desired | cluster id this cluster adopted in a merge |
//! | `c/d/res/<res>` | cluster, desired | [`ResEntry`]: the resource exists, its size |
//! | `c/d/member/<res>/<node>` | cluster, desired | `true`: the node is a member (one key per member, so concurrent joins never overwrite each other) |
//! | `r/<res>/d/primary` | resource, desired | designated primary (node name or null) |
//! | `r/<res>/d/member/<node>` | resource, desired | [`MemberEntry`]: that member's switches and disk |
//! | `r/<res>/a/<node>` | resource, actual | [`ActualEntry`]: what that member reports |

use crate::Store;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub listen: String,
    pub nbd: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResEntry {
    pub size: u64,
    pub resource_id: u64,
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
}

pub const CLUSTER_ID_KEY: &str = "c/d/cluster-id";

pub fn node_key(node: &str) -> String {
    format!("c/d/node/{node}")
}
pub fn res_key(res: &str) -> String {
    format!("c/d/res/{res}")
}
pub fn primary_key(res: &str) -> String {
    format!("r/{res}/d/primary")
}
pub fn member_key(res: &str, node: &str) -> String {
    format!("r/{res}/d/member/{node}")
}
pub fn actual_key(res: &str, node: &str) -> String {
    format!("r/{res}/a/{node}")
}
pub fn membership_key(res: &str, node: &str) -> String {
    format!("c/d/member/{res}/{node}")
}
pub fn res_prefix(res: &str) -> String {
    format!("r/{res}/")
}

pub fn get<T: DeserializeOwned>(store: &Store, key: &str) -> Option<T> {
    store
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

pub fn to_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Live nodes of the cluster: (name, entry), by name.
pub fn nodes(store: &Store) -> Vec<(String, NodeEntry)> {
    store
        .range("c/d/node/")
        .filter_map(|(k, e)| {
            let name = k.strip_prefix("c/d/node/")?;
            let v: NodeEntry = serde_json::from_value(e.value.clone()?).ok()?;
            Some((name.to_string(), v))
        })
        .collect()
}

/// Live resources: (name, entry with its members), by name.
pub fn resources(store: &Store) -> Vec<(String, ResEntry)> {
    let names: Vec<String> = store
        .range("c/d/res/")
        .filter(|(_, e)| e.value.is_some())
        .filter_map(|(k, _)| k.strip_prefix("c/d/res/").map(str::to_string))
        .collect();
    names
        .into_iter()
        .filter_map(|n| resource(store, &n).map(|r| (n, r)))
        .collect()
}

/// One live resource with its members (from the membership keys), if it exists.
pub fn resource(store: &Store, res: &str) -> Option<ResEntry> {
    let mut r: ResEntry = get(store, &res_key(res))?;
    let prefix = format!("c/d/member/{res}/");
    r.members = store
        .range(&prefix)
        .filter(|(_, e)| e.value.is_some())
        .filter_map(|(k, _)| k.strip_prefix(prefix.as_str()).map(str::to_string))
        .collect();
    Some(r)
}

pub fn designated_primary(store: &Store, res: &str) -> Option<String> {
    store
        .get(&primary_key(res))
        .and_then(|v| v.as_str().map(str::to_string))
}
