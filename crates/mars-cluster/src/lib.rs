//! Cluster membership and metadata dissemination, without I/O.
//!
//! [`Cluster`] wraps a [foca](https://docs.rs/foca) SWIM instance (failure
//! detection, membership, piggybacked broadcasts) and the node's metadata
//! [`Store`]. Events go in (`handle_gossip`, `handle_timer`, `set`, ...),
//! effects come out ([`Effect`]): UDP datagrams to send and timers to
//! schedule. `marsd` moves the effects over real sockets; `mars-sim` moves
//! them through a simulated network with thousands of nodes. The same code
//! runs in both.
//!
//! Why foca: SWIM's per-node traffic is constant in the cluster size (one
//! probe per period, a fixed fan-out of gossip, broadcasts piggybacked on
//! both, a bounded packet size), foca does no I/O of its own and carries
//! custom broadcasts. chitchat, the other candidate, sends its full digest
//! every round, which grows with the cluster.
//!
//! What travels where:
//! - cluster-wide entries (`c/...`: nodes, addresses, resource names and
//!   members) are foca custom broadcasts, plus anti-entropy with one random
//!   live node per round ([`ae`]) that repairs anything a broadcast missed;
//! - resource entries (`r/<res>/...`) are pushed by the writer to the
//!   resource's members over TCP and repaired by anti-entropy among members;
//!   other nodes pull them when they need them.

pub mod ae;

use foca::{
    BroadcastHandler, Config, Foca, Identity, Invalidates, Notification, PostcardCodec, Runtime,
    Timer,
};
use mars_meta::{schema, scope_of, Entry, Scope, Stamp, Store};
use mars_proto::WireEntry;
use parking_lot::Mutex;
use rand10::rngs::StdRng;
use rand10::SeedableRng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

pub use foca::Timer as FocaTimer;

/// A node's identity in the membership protocol. `bump` grows each time the
/// node (re)starts, so a restarted node wins over its old incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId {
    pub name: String,
    pub addr: SocketAddr,
    pub bump: u32,
}

impl Identity for NodeId {
    // foca compares addresses for every update it applies: keep that free of allocations.
    type Addr = SocketAddr;
    fn renew(&self) -> Option<Self> {
        Some(NodeId {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// What the caller must do.
#[derive(Debug)]
pub enum Effect {
    /// Send this datagram to that node's gossip (UDP) address.
    Send {
        to: NodeId,
        data: Vec<u8>,
    },
    /// Call [`Cluster::handle_timer`] with this timer after the delay.
    Schedule {
        timer: Timer<NodeId>,
        after: Duration,
    },
    /// A node became reachable / was declared down.
    Up(NodeId),
    Down(NodeId),
}

pub fn to_wire(key: &str, e: &Entry) -> WireEntry {
    WireEntry {
        key: key.to_string(),
        clock: e.stamp.clock,
        node: e.stamp.node.clone(),
        value: e.value.clone(),
        deleted_ms: e.deleted_ms,
    }
}

pub fn from_wire(w: WireEntry) -> (String, Entry) {
    (
        w.key,
        Entry {
            stamp: Stamp {
                clock: w.clock,
                node: w.node,
            },
            value: w.value,
            deleted_ms: w.deleted_ms,
        },
    )
}

/// A broadcast's identity: newer stamps of the same key replace older ones in foca's backlog.
pub struct BroadcastKey {
    key: String,
    stamp: Stamp,
}

impl Invalidates for BroadcastKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.key == other.key && self.stamp >= other.stamp
    }
}

#[derive(Debug)]
pub struct BadBroadcast(String);

impl std::fmt::Display for BadBroadcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad metadata broadcast: {}", self.0)
    }
}
impl std::error::Error for BadBroadcast {}

/// Receives cluster-wide entries piggybacked on SWIM messages.
pub struct MetaBroadcasts {
    store: Arc<Mutex<Store>>,
    changed: Arc<Mutex<Vec<String>>>,
    admission: Admission,
}

impl BroadcastHandler<NodeId> for MetaBroadcasts {
    type Key = BroadcastKey;
    type Error = BadBroadcast;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<BroadcastKey>, BadBroadcast> {
        let w: WireEntry = serde_json::from_slice(data).map_err(|e| BadBroadcast(e.to_string()))?;
        if !matches!(scope_of(&w.key), Some(Scope::Cluster)) {
            return Err(BadBroadcast(format!("key {:?} is not cluster-wide", w.key)));
        }
        let (key, entry) = from_wire(w);
        if self.admission == Admission::Schema && !schema::gossipable(&key) {
            // Not taken from gossip (trust entries travel over authenticated
            // links only); ignored, not an error, so that the rest of the
            // datagram (membership) still counts.
            tracing::debug!(key, "trust entry ignored in gossip");
            return Ok(None);
        }
        let stamp = entry.stamp.clone();
        if sender.is_none() {
            // Our own add_broadcast: the entry is already in the store; disseminate it
            // unless a newer one replaced it meanwhile. (Found by mars-sim: without
            // this, cluster-wide entries spread only by anti-entropy.)
            let current = self
                .store
                .lock()
                .entry(&key)
                .is_some_and(|e| e.stamp == stamp);
            return Ok(current.then_some(BroadcastKey { key, stamp }));
        }
        let from = sender.map(|s| s.name.as_str()).unwrap_or("?");
        if merge_remote(&mut self.store.lock(), self.admission, from, &key, entry) {
            self.changed.lock().push(key.clone());
            Ok(Some(BroadcastKey { key, stamp }))
        } else {
            Ok(None)
        }
    }
}

/// Which remote entries a store takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Only what `mars_meta::schema::admissible` admits (marsd).
    Schema,
    /// Any well-formed key (the simulator's own keys; tests).
    AnyKey,
}

/// Merge one remote entry from peer `from` into `store`, if admitted: the
/// one way remote entries enter a store (gossip, anti-entropy, push, join
/// and merge snapshots). Whether the store changed; a refusal is logged
/// (rate-limited) with the peer, the writer and the reason.
pub fn merge_remote(
    store: &mut Store,
    admission: Admission,
    from: &str,
    key: &str,
    entry: Entry,
) -> bool {
    if admission == Admission::Schema {
        if let Err(why) = schema::admissible(key, &entry, store.entry(key), store.node()) {
            if why == schema::Inadmissible::OwnEntry {
                // Seen, though not taken: this node's next write of the key wins.
                let _ = store.observe(entry.stamp.clock);
            }
            refused(from, key, &entry.stamp, &why);
            return false;
        }
    }
    let stamp = entry.stamp.clone();
    match store.try_merge(key, entry) {
        Ok(changed) => changed,
        Err(why) => {
            refused(from, key, &stamp, &why);
            false
        }
    }
}

/// At most this many refusals are logged per [`REFUSAL_LOG_PERIOD`]; the
/// rest are counted and the count logged once the period is over.
const REFUSAL_LOG_BURST: u32 = 20;
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

struct RefusalLog {
    since: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

static REFUSAL_LOG: Mutex<RefusalLog> = Mutex::new(RefusalLog {
    since: None,
    logged: 0,
    suppressed: 0,
});

/// A remote entry the store would not take: logged with the peer it came
/// from, its writer and the reason, at most [`REFUSAL_LOG_BURST`] lines per
/// [`REFUSAL_LOG_PERIOD`] (a flood of bad entries must not fill the log).
fn refused(from: &str, key: &str, stamp: &mars_meta::Stamp, why: &dyn std::fmt::Display) {
    let mut log = REFUSAL_LOG.lock();
    let now = std::time::Instant::now();
    if log
        .since
        .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_PERIOD)
    {
        if log.suppressed > 0 {
            tracing::warn!(
                suppressed = log.suppressed,
                "metadata entries refused and not logged in the last {REFUSAL_LOG_PERIOD:?}"
            );
        }
        *log = RefusalLog {
            since: Some(now),
            logged: 0,
            suppressed: 0,
        };
    }
    if log.logged >= REFUSAL_LOG_BURST {
        log.suppressed += 1;
        return;
    }
    log.logged += 1;
    drop(log);
    let mut shown: String = key.chars().take(80).collect();
    if shown.len() < key.len() {
        shown.push_str("...");
    }
    let writer: String = stamp.node.chars().take(80).collect();
    tracing::warn!(peer = %from, key = %shown, writer = %writer, clock = stamp.clock, "metadata entry refused: {why}");
}

#[derive(Default)]
struct Collect {
    effects: Vec<Effect>,
}

impl Runtime<NodeId> for Collect {
    fn notify(&mut self, n: Notification<'_, NodeId>) {
        match n {
            Notification::MemberUp(id) => self.effects.push(Effect::Up(id.clone())),
            Notification::MemberDown(id) => self.effects.push(Effect::Down(id.clone())),
            _ => {}
        }
    }
    fn send_to(&mut self, to: NodeId, data: &[u8]) {
        self.effects.push(Effect::Send {
            to,
            data: data.to_vec(),
        });
    }
    fn submit_after(&mut self, timer: Timer<NodeId>, after: Duration) {
        self.effects.push(Effect::Schedule { timer, after });
    }
}

/// Settings of the membership protocol.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Expected cluster size (tunes how often updates are retransmitted and
    /// suspicion timeouts). [`Cluster::new`] raises it to the number of nodes
    /// its store already knows.
    pub size_hint: u32,
    /// SWIM probe period.
    pub probe_period: Duration,
    /// Which remote entries the store takes (fixed at [`Cluster::new`]).
    pub admission: Admission,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            size_hint: 16,
            probe_period: Duration::from_millis(500),
            admission: Admission::Schema,
        }
    }
}

fn foca_config(c: &ClusterConfig) -> Config {
    let mut cfg = Config::new_lan(NonZeroU32::new(c.size_hint.max(1)).unwrap_or(NonZeroU32::MIN));
    cfg.probe_period = c.probe_period;
    cfg.probe_rtt = c.probe_period / 2;
    // A probe whose ping or ack is lost is retried through this many other
    // members before the target is suspected. At 5 % datagram loss a direct
    // probe fails 1 time in 10 and each indirect one (4 datagrams) 1 in 5:
    // with 3 helpers (foca's default) 1 probe in 1,500 ends in a suspicion,
    // with 5 about 1 in 40,000. Every suspicion and its refutation is
    // gossiped to the whole cluster, so their number per second grows with
    // N: at 1,000 nodes they kept every node's backlog busy (18 datagrams/s
    // per node instead of 4). Costs nothing while probes are answered.
    cfg.num_indirect_probes = std::num::NonZeroUsize::new(5).unwrap_or(cfg.num_indirect_probes);
    // foca's LAN rule (memberlist's): 4 probe periods per decade of cluster
    // size, so that a refutation has the O(log N) rounds it needs to reach
    // every suspecting node; never under 6 periods. A fixed 3 s let 5 %
    // datagram loss turn suspicions into false Downs at 1,000 nodes (mars-sim).
    let decades = f64::from(c.size_hint.max(1)).log10().max(1.0);
    cfg.suspect_to_down_after = (c.probe_period * 6).max(c.probe_period.mul_f64(4.0 * decades));
    cfg.remove_down_after = Some(Duration::from_secs(3600));
    cfg
}

/// Nodes with a live `c/d/node/*` entry in this store (the node itself included once it wrote its own).
pub fn nodes_in_store(store: &Store) -> u32 {
    u32::try_from(schema::nodes(store).len()).unwrap_or(u32::MAX)
}

/// A batch of entries merged by other means ([`Cluster::merge_entries`]) is
/// passed on by gossip only when it is at most this long. A larger batch is
/// a bulk transfer (a join, a merge of two clusters, anti-entropy between
/// stores that differ a lot, as during a cold start): anti-entropy spreads
/// it too, and broadcasting it would queue every entry for
/// `max_transmissions` sends on every node that merges it. That multiplied
/// the bootstrap gossip of a 1,000-node cluster and kept millions of
/// entries queued (mars-sim).
pub const REBROADCAST_MAX: usize = 8;

/// How many of the nodes it knows of (a `c/d/node/*` entry) but does not
/// see alive a node should announce itself to in one anti-entropy round,
/// when `missing` are. An announce is answered by a Feed of up to
/// `max_packet_size` bytes: in steady state nothing is missing and this
/// costs nothing; after a burst of joins a node repairs up to 8 missing
/// pairs (both directions) per round instead of waiting for its probe
/// round-robin (N probe periods) or the other node's.
pub fn repair_announces(missing: usize) -> usize {
    missing.min(8)
}

pub struct Cluster {
    foca: Foca<NodeId, PostcardCodec, StdRng, MetaBroadcasts>,
    size_hint: u32,
    store: Arc<Mutex<Store>>,
    changed: Arc<Mutex<Vec<String>>>,
    admission: Admission,
    rt: Collect,
}

impl Cluster {
    pub fn new(me: NodeId, store: Arc<Mutex<Store>>, cfg: &ClusterConfig, seed: u64) -> Cluster {
        let changed = Arc::new(Mutex::new(Vec::new()));
        let handler = MetaBroadcasts {
            store: store.clone(),
            changed: changed.clone(),
            admission: cfg.admission,
        };
        // Start tuned for the cluster the store already knows (a node that just
        // joined has every node entry): foca's retransmission count set for 16
        // nodes during a burst of joins leaves pairs that never hear of each other.
        let size_hint = cfg.size_hint.max(nodes_in_store(&store.lock()));
        let cfg = ClusterConfig {
            size_hint,
            ..cfg.clone()
        };
        let foca = Foca::with_custom_broadcast(
            me,
            foca_config(&cfg),
            StdRng::seed_from_u64(seed),
            PostcardCodec,
            handler,
        );
        Cluster {
            foca,
            size_hint,
            store,
            changed,
            admission: cfg.admission,
            rt: Collect::default(),
        }
    }

    pub fn store(&self) -> &Arc<Mutex<Store>> {
        &self.store
    }

    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Effects accumulated since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.rt.effects)
    }

    /// Keys changed by remote updates since the last call.
    pub fn take_changed(&self) -> Vec<String> {
        std::mem::take(&mut *self.changed.lock())
    }

    /// Start talking to a known node (join, restart, merge).
    pub fn announce(&mut self, to: NodeId) {
        if let Err(e) = self.foca.announce(to, &mut self.rt) {
            tracing::debug!("announce: {e}");
        }
    }

    pub fn handle_gossip(&mut self, data: &[u8]) {
        if let Err(e) = self.foca.handle_data(data, &mut self.rt) {
            tracing::debug!("gossip datagram dropped: {e}");
        }
    }

    pub fn handle_timer(&mut self, timer: Timer<NodeId>) {
        if let Err(e) = self.foca.handle_timer(timer, &mut self.rt) {
            tracing::debug!("gossip timer: {e}");
        }
    }

    /// Leave: tell the others this node goes away.
    pub fn leave(&mut self) {
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            tracing::debug!("leave: {e}");
        }
    }

    /// Disseminate an entry that is already in the store (cluster-wide keys only).
    pub fn broadcast(&mut self, key: &str, entry: &Entry) {
        if !matches!(scope_of(key), Some(Scope::Cluster)) {
            return;
        }
        if self.admission == Admission::Schema && !schema::gossipable(key) {
            return;
        }
        let data = serde_json::to_vec(&to_wire(key, entry)).unwrap_or_default();
        if let Err(e) = self.foca.add_broadcast(&data) {
            tracing::warn!("cannot broadcast {key}: {e}");
        }
    }

    /// Write locally and disseminate.
    pub fn set(&mut self, key: &str, value: serde_json::Value) -> Entry {
        let e = self.store.lock().set(key, value);
        self.broadcast(key, &e);
        e
    }

    pub fn delete(&mut self, key: &str, now_ms: u64) -> Option<Entry> {
        let e = self.store.lock().delete(key, now_ms)?;
        self.broadcast(key, &e);
        Some(e)
    }

    /// Merge entries learned by other means (anti-entropy, push, join, merge).
    /// Returns the keys that changed. Changed cluster-wide ones are passed on
    /// by gossip when there are at most [`REBROADCAST_MAX`] of them (a bulk
    /// transfer is left to anti-entropy).
    pub fn merge_entries(&mut self, entries: Vec<WireEntry>) -> Vec<String> {
        self.merge_entries_from("a peer", entries)
    }

    /// [`Cluster::merge_entries`] from peer `from` (named in the log of refusals).
    pub fn merge_entries_from(&mut self, from: &str, entries: Vec<WireEntry>) -> Vec<String> {
        let mut changed = Vec::new();
        let mut fresh = Vec::new();
        for w in entries {
            let (key, entry) = from_wire(w);
            let merged = merge_remote(
                &mut self.store.lock(),
                self.admission,
                from,
                &key,
                entry.clone(),
            );
            if merged {
                if fresh.len() <= REBROADCAST_MAX {
                    fresh.push((key.clone(), entry));
                }
                changed.push(key);
            }
        }
        if fresh.len() <= REBROADCAST_MAX {
            for (key, entry) in fresh {
                self.broadcast(&key, &entry);
            }
        }
        changed
    }

    /// Members foca currently considers alive (not including this node).
    pub fn live_members(&self) -> Vec<NodeId> {
        self.foca.iter_members().map(|m| m.id().clone()).collect()
    }

    pub fn num_members(&self) -> usize {
        self.foca.num_members()
    }

    /// Take these nodes as alive members without gossiping about them. For
    /// a simulator's warm start; a daemon learns its members by gossip.
    pub fn add_members(&mut self, ids: impl IntoIterator<Item = NodeId>) {
        let members = ids.into_iter().map(foca::Member::alive);
        if let Err(e) = self.foca.apply_many(members, false, &mut self.rt) {
            tracing::debug!("add_members: {e}");
        }
    }

    /// Retune for the cluster's size (retransmissions, suspicion timeout).
    pub fn set_size_hint(&mut self, cfg: &ClusterConfig) {
        match self.foca.set_config(foca_config(cfg)) {
            Ok(()) => self.size_hint = cfg.size_hint,
            Err(e) => tracing::debug!("gossip config: {e}"),
        }
    }

    /// The cluster size foca is tuned for.
    pub fn size_hint(&self) -> u32 {
        self.size_hint
    }

    /// Membership updates and metadata broadcasts still queued for
    /// retransmission: 0 once this node has passed on everything it learned.
    pub fn backlog(&self) -> usize {
        self.foca.updates_backlog() + self.foca.custom_broadcast_backlog()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(name: &str, store: Store) -> Cluster {
        let id = NodeId {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            bump: 0,
        };
        let cfg = ClusterConfig {
            admission: Admission::AnyKey,
            ..ClusterConfig::default()
        };
        Cluster::new(id, Arc::new(Mutex::new(store)), &cfg, 1)
    }

    #[test]
    fn a_daemons_cluster_takes_only_admissible_entries() {
        let id = NodeId {
            name: "beta".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            bump: 0,
        };
        let store = Arc::new(Mutex::new(Store::new("beta")));
        let mut c = Cluster::new(id, store.clone(), &ClusterConfig::default(), 1);
        let r = schema::ResRef::new("r0", 1);
        let mine = schema::member_key(&r, "beta");
        c.set(
            &mine,
            json!({"disk": "/dev/mine", "attached": true, "connected": true}),
        );
        let before = store.lock().entry(&mine).cloned();
        let mut tool = Store::new("tool");
        // Stamped with this node's name, newer than what it wrote: not its own.
        let forged_mine = WireEntry {
            key: mine.clone(),
            clock: 50,
            node: "beta".into(),
            value: Some(json!({"disk": "/tmp/victim", "attached": true, "connected": true})),
            deleted_ms: 0,
        };
        let changed = c.merge_entries_from(
            "tool",
            vec![
                wire(&mut tool, "c/d/sim/one"),
                wire(&mut tool, "r/../resources/x/d/member/beta"),
                wire(&mut tool, &schema::actual_key(&r, "gamma")),
                forged_mine.clone(),
            ],
        );
        assert!(changed.is_empty(), "{changed:?}");
        assert_eq!(store.lock().entry(&mine).cloned(), before);
        // Seen though refused: this node's next write wins over the forged entry.
        let next = c.set(
            &mine,
            json!({"disk": "/dev/mine", "attached": false, "connected": true}),
        );
        assert!(next.stamp.clock > forged_mine.clock);
        // An entry of a known shape from its owner is taken.
        let mut gamma = Store::new("gamma");
        let e = gamma.set(&schema::actual_key(&r, "gamma"), json!({"role": "secondary", "disk": "uptodate", "written": 0, "fetched": 0, "replayed": 0}));
        let changed =
            c.merge_entries_from("gamma", vec![to_wire(&schema::actual_key(&r, "gamma"), &e)]);
        assert_eq!(changed.len(), 1);
    }

    fn wire(writer: &mut Store, key: &str) -> WireEntry {
        let e = writer.set(key, json!(1));
        to_wire(key, &e)
    }

    #[test]
    fn small_merges_are_gossiped_bulk_merges_are_not() {
        let mut c = cluster("a", Store::new("a"));
        let mut other = Store::new("b");
        c.merge_entries(vec![wire(&mut other, "c/d/sim/one")]);
        assert_eq!(c.backlog(), 1, "a single repaired entry is passed on");
        let bulk: Vec<WireEntry> = (0..REBROADCAST_MAX + 1)
            .map(|i| wire(&mut other, &format!("c/d/sim/k{i}")))
            .collect();
        let changed = c.merge_entries(bulk);
        assert_eq!(changed.len(), REBROADCAST_MAX + 1);
        assert_eq!(c.backlog(), 1, "a bulk transfer is left to anti-entropy");
    }

    #[test]
    fn suspicion_timeout_grows_with_the_cluster() {
        let at = |n| {
            foca_config(&ClusterConfig {
                size_hint: n,
                ..ClusterConfig::default()
            })
        };
        assert_eq!(at(16).suspect_to_down_after, Duration::from_secs(3));
        assert_eq!(at(1000).suspect_to_down_after, Duration::from_secs(6));
        assert_eq!(at(10_000).suspect_to_down_after, Duration::from_secs(8));
        assert_eq!(at(1000).max_transmissions.get(), 12);
        assert_eq!(at(1000).num_indirect_probes.get(), 5);
    }

    #[test]
    fn new_tunes_for_the_nodes_in_the_store() {
        let mut store = Store::new("a");
        for i in 0..100 {
            let key = schema::node_key(&schema::NodeRef::new(&format!("n{i}"), i + 1));
            store.set(
                &key,
                json!({ "listen": "127.0.0.1:7000", "nbd": "127.0.0.1:10809" }),
            );
        }
        assert_eq!(nodes_in_store(&store), 100);
        assert_eq!(cluster("a", store).size_hint(), 100);
        assert_eq!(cluster("a", Store::new("a")).size_hint(), 16);
    }
}
