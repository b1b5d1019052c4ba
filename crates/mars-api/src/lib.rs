//! Types shared by `marsd` and `marsadm`.
//!
//! The control socket (`DIR/marsd.sock`) carries one JSON [`Request`] per
//! line from `marsadm` and one JSON [`Response`] per line back. [`View`] is
//! the `marsadm view --json` document of `shared/spec/marsadm.md`; fields may
//! be added, never removed or renamed.

use serde::{Deserialize, Serialize};

mod events;
pub use events::{events, iso_ms, Event};

/// Name of the control socket inside the node directory.
pub const SOCKET_NAME: &str = "marsd.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    CreateResource {
        name: String,
        disk: String,
    },
    DeleteResource {
        name: String,
    },
    Primary {
        name: String,
        force: bool,
    },
    Secondary {
        name: String,
    },
    Up {
        name: String,
    },
    Down {
        name: String,
    },
    Attach {
        name: String,
        /// Throw the block checksums away first and compute them again from
        /// the disk (a disk changed on purpose while detached).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        rebuild_checksums: bool,
    },
    Detach {
        name: String,
    },
    Connect {
        name: String,
    },
    Disconnect {
        name: String,
    },
    Pause {
        name: String,
        what: PauseKind,
        paused: bool,
    },
    /// Rate limits of this member's fetch and sync, bytes per second (0: none;
    /// `None`: unchanged).
    SetRate {
        name: String,
        fetch: Option<u64>,
        sync: Option<u64>,
    },
    /// Compression of the resource's fetch and sync streams: `codec` is
    /// `zstd` or `off`; `level` (zstd, 1..=19) defaults to 1.
    SetCompression {
        name: String,
        codec: String,
        level: Option<i32>,
    },
    LogRotate {
        name: String,
    },
    /// Throw away this secondary's data and sync it again.
    Invalidate {
        name: String,
    },
    /// Start a scrub of this node's copy now.
    Scrub {
        name: String,
    },
    /// Compare every member's copy with the primary's (this node
    /// coordinates; it must be a member): started, or the one running
    /// joined. `restart`: from the first block, not where an interrupted
    /// one stopped. `rate`: bytes per second compared (0: no limit).
    Verify {
        name: String,
        #[serde(default)]
        repair: bool,
        #[serde(default)]
        rate: Option<u64>,
        #[serde(default)]
        restart: bool,
    },
    /// Keep this secondary's replay `ms` behind the primary's writes (0: none).
    SetDelay {
        name: String,
        ms: u64,
    },
    /// Send the view (a `Response`), then, on the same connection, one
    /// `Event` per line for every change (`full`: the whole `View` in a
    /// `Response` whenever it changed), until the caller goes away.
    Watch {
        name: Option<String>,
        #[serde(default)]
        full: bool,
    },
    /// Pause, resume or stop the verify this node runs.
    VerifyControl {
        name: String,
        op: VerifyOp,
    },
    /// Grow the device to `bytes` (default: the smallest member disk).
    Resize {
        name: String,
        bytes: Option<u64>,
    },
    LogDelete {
        name: String,
    },
    View {
        name: Option<String>,
    },
    JoinResource {
        name: String,
        disk: String,
    },
    LeaveResource {
        name: String,
    },
    /// `migrate --leave` on the new primary: remove `node` (another member,
    /// not the designated primary) from the resource.
    RemoveMember {
        name: String,
        node: String,
    },
    LeaveCluster,
    /// Remove another node (one that is gone for good, or compromised):
    /// revoke its certificate and delete its entry, from this node.
    RemoveNode {
        node: String,
        /// Also while it is alive.
        force: bool,
    },
    MergeCluster {
        peer: String,
        /// From `invite --merge` on the peer's cluster.
        token: String,
    },
    /// The gossip keyring, cluster-wide.
    Keyring {
        op: KeyringOp,
    },
    /// A one-time token for joining a node (or, `merge`, merging a cluster).
    Invite {
        merge: bool,
        ttl_secs: u64,
    },
    /// Test hook: drop all traffic to and from these nodes (partition tests).
    DebugBlock {
        nodes: Vec<String>,
        blocked: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PauseKind {
    Sync,
    Fetch,
    Replay,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// One line saying what went wrong and, where there is one, what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was done, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<View>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: Some(message.into()),
            ..Default::default()
        }
    }
    pub fn err(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub node: String,
    pub cluster: ClusterView,
    pub resources: Vec<ResourceView>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub id: String,
    pub nodes: Vec<NodeView>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub alive: bool,
    /// Where the node serves its primary devices (extension).
    #[serde(default)]
    pub nbd: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceView {
    pub name: String,
    /// `NAME@ID`: this incarnation of the name (a resource deleted and
    /// created again under its name is another incarnation).
    #[serde(default)]
    pub incarnation: String,
    /// Another live incarnation has this name (made on both sides of a
    /// partition): what it is and how to resolve it. The owner of the name
    /// is listed first; a shadowed incarnation's members go on serving it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clash: Option<String>,
    pub size: u64,
    pub designated_primary: Option<String>,
    pub actual_primary: Option<String>,
    pub device: Option<String>,
    pub members: Vec<MemberView>,
    /// Compression of fetch and sync streams: `off` or `zstd:LEVEL`
    /// (extension; `marsadm set-compression`).
    #[serde(default)]
    pub compression: String,
    /// The resource's data this node sent to fetching and syncing members
    /// since it started (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_sent: Option<LinkView>,
    /// The verify this node runs or ran last (`marsadm verify`; extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyView>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyOp {
    Pause,
    Resume,
    Stop,
}

/// A verify, as the node that coordinates it sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyView {
    /// Bytes compared so far and in all, while one runs.
    pub running: Option<(u64, u64)>,
    #[serde(default)]
    pub paused: bool,
    /// It repairs what it finds.
    #[serde(default)]
    pub repair: bool,
    /// Bytes per second compared so far.
    #[serde(default)]
    pub rate: u64,
    /// The last one that ended.
    pub last: Option<LastVerify>,
}

/// A verify that ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastVerify {
    /// When it started and ended (ms since the epoch).
    pub started_ms: u64,
    pub finished_ms: u64,
    /// Bytes compared, of `total`.
    pub compared: u64,
    pub total: u64,
    pub repair: bool,
    /// Every copy agreed (or, with repair, was repaired) and none failed.
    pub clean: bool,
    /// Members whose copy differed in some block.
    pub members: Vec<MemberVerify>,
    /// Blocks no copy held good (as ranges), and how many.
    #[serde(default)]
    pub lost_blocks: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// Members that could not be compared: (node, why).
    #[serde(default)]
    pub failed: Vec<(String, String)>,
    /// Why it ended before the end (stopped, the primary unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the next `verify` goes on from (it ended before the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_at: Option<u64>,
}

/// One member's result in a verify.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberVerify {
    pub node: String,
    /// Blocks whose data or checksum differed from the good copy.
    pub differing_blocks: u64,
    /// Those blocks as byte ranges.
    pub ranges: String,
    /// Of them, repaired.
    pub repaired: u64,
}

/// Data frames sent on peer links: bytes of data, bytes on the wire (less
/// where compression paid off), frames and compressed frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkView {
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub frames: u64,
    pub compressed_frames: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub node: String,
    /// `primary` or `secondary`.
    pub role: String,
    /// `uptodate`, `syncing`, `inconsistent`, `outdated` or `detached`.
    pub disk: String,
    pub connected: bool,
    pub log: LogView,
    pub sync: Option<SyncView>,
    pub paused: PausedView,
    pub split_brain: bool,
    pub emergency: bool,
    /// `written - replayed` (extension).
    #[serde(default)]
    pub lag_bytes: u64,
    /// Seconds since the oldest write this member has not replayed was logged
    /// by the primary, as far as this member knows; 0 when it has replayed
    /// everything (extension).
    #[serde(default)]
    pub lag_seconds: f64,
    /// The local disk path (extension).
    #[serde(default)]
    pub disk_path: String,
    /// The current logfile (extension).
    #[serde(default)]
    pub logfile: Option<String>,
    /// Blocks the last full sync had to transfer (the others were equal) (extension).
    #[serde(default)]
    pub sync_blocks_transferred: u64,
    /// Last error of this member, e.g. why its disk could not be attached (extension).
    #[serde(default)]
    pub error: Option<String>,
    /// Blocks of this member's disk found not to match their block checksums
    /// since its marsd started.
    #[serde(default)]
    pub checksum_errors: u64,
    /// Blocks of this member's disk repaired from a good copy (or whose
    /// checksum was corrected) since its marsd started.
    #[serde(default)]
    pub repaired: u64,
    /// Its replay is kept this many seconds behind the primary's writes
    /// (`marsadm set-delay`; extension).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub replay_delay_seconds: f64,
    /// Blocks of this member's disk known bad and not repaired (then its
    /// disk is never shown `uptodate`; extension).
    #[serde(default)]
    pub bad_blocks: u64,
    /// This node's own copy: the scrub running (bytes read of the total) and
    /// the last one that ended (None for other members: extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrub: Option<ScrubView>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogView {
    pub written: u64,
    pub fetched: u64,
    pub replayed: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncView {
    pub done: u64,
    pub total: u64,
    /// Bytes per second compared so far (extension).
    #[serde(default)]
    pub rate: u64,
    /// Seconds to go at that rate (extension).
    #[serde(default)]
    pub eta_seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedView {
    pub sync: bool,
    pub fetch: bool,
    pub replay: bool,
}

/// What `marsadm keyring` does (keys are 64 hex digits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyringOp {
    List,
    Install { key: String },
    Use { key: String },
    Remove { key: String },
}

/// A scrub of a member's copy (`marsadm scrub`), as its own node sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubView {
    /// Bytes read so far and in all, while a pass runs.
    pub running: Option<(u64, u64)>,
    /// The last pass that ended.
    pub last: Option<LastScrub>,
}

/// A scrub pass that ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastScrub {
    /// When (ms since the epoch).
    pub finished_ms: u64,
    /// Bytes it read.
    pub scanned: u64,
    /// Blocks that did not match their checksums.
    pub bad_blocks: u64,
    /// It stopped before the end (the message is in the node's log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ScrubError>,
}

/// Why a scrub pass stopped before the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScrubError {
    /// The disk was closed (detach, role change, shutdown).
    Stopped,
    /// A read of the disk failed.
    ReadFailed,
}

fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

/// A duration in ms as `set-delay` takes it: `90s`, `10m`, `2h`, `1h30m`.
pub fn show_duration_ms(ms: u64) -> String {
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 || out.is_empty() {
        out += &format!("{s}s");
    }
    out
}

/// Parse `30s`, `10m`, `2h`, `1h30m`, `500ms`, `0` (a bare number: seconds) into ms.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an empty duration".into());
    }
    if let Ok(n) = t.parse::<u64>() {
        return n
            .checked_mul(1000)
            .ok_or_else(|| format!("{s:?} is too long"));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            1
        } else {
            match c {
                's' => 1000,
                'm' => 60_000,
                'h' => 3_600_000,
                'd' => 86_400_000,
                _ => return Err(format!("unknown unit {c:?} in {s:?}: use ms, s, m, h or d")),
            }
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("not a duration: {s:?} (like 30s, 10m, 2h)"))?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
    }
    if !num.is_empty() {
        return Err(format!(
            "{s:?}: a number without a unit at the end (like 30s, 10m, 2h)"
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn durations_parse_and_show() {
        assert_eq!(parse_duration_ms("0"), Ok(0));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("5"), Ok(5_000));
        assert!(parse_duration_ms("5x").is_err());
        assert!(parse_duration_ms("h").is_err());
        assert!(parse_duration_ms("10m5").is_err());
        assert!(parse_duration_ms("99999999999999999999h").is_err());
        assert_eq!(show_duration_ms(5_400_000), "1h30m");
        assert_eq!(show_duration_ms(5_000), "5s");
        assert_eq!(show_duration_ms(0), "0s");
        assert_eq!(show_duration_ms(1500), "1500ms");
    }
}
