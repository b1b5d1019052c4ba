//! Deterministic in-process simulator of mars cluster membership and
//! metadata dissemination.
//!
//! It runs the real sans-I/O state machine, [`mars_cluster::Cluster`] (foca
//! SWIM membership plus the metadata store), for N nodes over a simulated
//! network:
//!
//! - virtual time in milliseconds and one event queue whose ties are broken
//!   by insertion order, and one seeded RNG: a run is a pure function of its
//!   [`SimConfig`];
//! - every [`Effect::Send`] becomes a datagram delivered to the target's
//!   `handle_gossip` after a uniform random delay (and lost with probability
//!   [`SimConfig::loss`]); every [`Effect::Schedule`] a timer event;
//! - marsd's anti-entropy loop: every [`SimConfig::ae_interval_ms`]
//!   (jittered per node) each node announces to up to eight nodes of its store
//!   that it does not see alive, retunes foca for the store's node count,
//!   runs one [`ae`] exchange of `"c/"` with a random live node, and one of
//!   `"r/<res>/"` with a random other member of each resource its own store
//!   (`c/d/res/<res>`, `c/d/member/<res>/<node>`) says it belongs to. The
//!   TCP exchange is simulated message by message with the same delays, no
//!   loss, and its size counted as the encoded frames;
//! - a resource write is `set` on the writer plus a `Msg::Push` to each
//!   other member, as `marsd` does.
//!
//! [`run`] plays the whole scenario and returns a [`Report`]: bootstrap and
//! convergence, a steady-state traffic window, the spread of one new
//! cluster-wide entry and of one resource entry, and a check that resource
//! entries never reach nodes outside the resource.

mod report;

pub use report::{markdown, Rates, Report, Spread, Traffic};

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mars_cluster::{
    ae, from_wire, to_wire, Admission, Cluster, ClusterConfig, Effect, FocaTimer, NodeId,
};
use mars_meta::{resource_prefix, schema, scope_of, Scope, Stamp, Store, CLUSTER_PREFIX};
use mars_proto::{Msg, FRAME_HEADER_LEN};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: u32,
    pub seed: u64,
    /// Resources, each with 2-4 distinct random member nodes.
    pub resources: u32,
    /// Cluster size the nodes tune foca for (retransmissions, suspicion), at
    /// least: `Cluster::new` raises it to the nodes the store knows at start.
    /// `None` does what marsd does: start from `ClusterConfig::default()` and
    /// follow the number of nodes in the store at every anti-entropy round.
    pub size_hint: Option<u32>,
    /// SWIM probe period; one "round".
    pub probe_period_ms: u64,
    /// Nodes start evenly spread over this window, from t = 0.
    pub start_window_ms: u64,
    /// Network delay of every datagram and TCP message: uniform in min..=max.
    pub delay_min_ms: u64,
    pub delay_max_ms: u64,
    /// Probability that a datagram is lost (TCP messages are never lost).
    pub loss: f64,
    /// Mean interval between a node's anti-entropy rounds.
    pub ae_interval_ms: u64,
    /// Length of the steady-state traffic window.
    pub steady_ms: u64,
    /// Stop waiting for bootstrap convergence after this much virtual time.
    pub converge_limit_ms: u64,
    /// Stop waiting for one entry to spread after this much virtual time.
    pub spread_limit_ms: u64,
    /// Progress lines on stderr.
    pub verbose: bool,
    /// Skip the bootstrap: start from a converged cluster, for sizes whose
    /// bootstrap does not fit in memory or time. Every node starts at t = 0
    /// with all others in its foca membership (`Cluster::add_members`) and
    /// the size hint fixed at N. The stores hold only the resources' `r/`
    /// entries (no `c/d/node`, `c/d/res` or `c/d/member`: at 5,000 nodes
    /// those alone would be 15,000 entries on each of 5,000 stores), so
    /// resource membership comes from the simulator's table. Measures the
    /// steady state, the spread of new entries and the scope check.
    pub warm: bool,
}

impl SimConfig {
    /// The standard scenario: N nodes, N/2 resources, 500 ms probe period
    /// (marsd's), nodes started within 1 s, 1-5 ms delay, no loss,
    /// anti-entropy every 2 s, a 60 s steady-state window.
    pub fn new(nodes: u32, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            seed,
            resources: (nodes / 2).max(1),
            size_hint: None,
            probe_period_ms: 500,
            start_window_ms: 1000,
            delay_min_ms: 1,
            delay_max_ms: 5,
            loss: 0.0,
            ae_interval_ms: 2000,
            steady_ms: 60_000,
            converge_limit_ms: 600_000,
            spread_limit_ms: 120_000,
            verbose: false,
            warm: false,
        }
    }
}

/// Messages and bytes one node sent, by channel.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    gossip_msgs: u64,
    gossip_bytes: u64,
    ae_msgs: u64,
    ae_bytes: u64,
    push_msgs: u64,
    push_bytes: u64,
    join_bytes: u64,
}

/// The TCP traffic kinds the simulator tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chan {
    AntiEntropy,
    Push,
    /// `marsadm join-cluster`: `Join`, answered by `Joined` with every cluster-wide entry.
    Join,
}

/// How a node learned an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Gossip,
    Tcp(Chan),
}

enum Event {
    Start(u32),
    Datagram {
        to: u32,
        data: Vec<u8>,
    },
    Timer {
        node: u32,
        timer: FocaTimer<NodeId>,
    },
    AeTick(u32),
    Tcp {
        from: u32,
        to: u32,
        chan: Chan,
        msg: Msg,
    },
}

/// An event in the queue, ordered by (time, insertion counter), earliest first.
struct Queued {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse to pop the earliest first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Node {
    cluster: Cluster,
    /// The size foca is tuned for.
    size_hint: u32,
    started: bool,
    /// Resources this node is a member of (the simulator's ground truth;
    /// the node itself acts only on what its store says).
    resources: Vec<u32>,
    sent: Counters,
}

struct Resource {
    name: String,
    members: Vec<u32>,
}

/// One entry whose spread is being timed.
struct Watch {
    key: String,
    stamp: Stamp,
    since: u64,
    target: Vec<bool>,
    seen: Vec<bool>,
    remaining: usize,
    via_tcp: usize,
    done_at: Option<u64>,
}

impl Watch {
    fn spread(&self) -> Spread {
        let targets = self.target.iter().filter(|&&t| t).count();
        Spread {
            targets,
            reached: targets - self.remaining,
            ms: self.done_at.map(|t| t - self.since),
            via_tcp: self.via_tcp,
        }
    }
}

pub struct Sim {
    cfg: SimConfig,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Queued>,
    rng: StdRng,
    nodes: Vec<Node>,
    by_name: HashMap<String, u32>,
    resources: Vec<Resource>,
    res_by_name: HashMap<String, u32>,
    watch: Option<Watch>,
    /// Nodes whose daemon runs, in start order (join seeds are drawn from them).
    running: Vec<u32>,
    /// Resource entries merged by a node outside the resource.
    leaks: u64,
    /// MemberDown notifications (no node ever fails here: all are false).
    downs: u64,
    events: u64,
    last_start: u64,
}

fn node_name(i: u32) -> String {
    format!("n{i}")
}

/// A unique, never contacted, loopback-range address per node (an identity only).
fn node_addr(i: u32) -> SocketAddr {
    let [_, a, b, c] = i.to_be_bytes();
    SocketAddr::from((Ipv4Addr::new(127, a, b, c), 7000))
}

/// Node `i`'s key `c/d/node/<name>@<id>` (its id: `i + 1`).
fn node_key(i: u32) -> String {
    schema::node_key(&schema::NodeRef::new(&node_name(i), u64::from(i) + 1))
}

/// The value of `c/d/node/<name>@<id>`: marsd's `NodeEntry`.
fn node_entry(i: u32) -> serde_json::Value {
    let addr = node_addr(i);
    let nbd = SocketAddr::new(addr.ip(), 10809);
    json!({ "listen": addr.to_string(), "nbd": nbd.to_string() })
}

/// `mars_proto::encode_frame(msg).len()`, counted without building the frame
/// (a bootstrap anti-entropy exchange at 2,000 nodes is about 1 MB).
fn frame_len(msg: &Msg) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // As encode_frame: serialising our own messages cannot fail.
    let _ = serde_json::to_writer(&mut count, msg);
    FRAME_HEADER_LEN as u64 + count.0
}

fn ms_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl Sim {
    /// Builds the nodes and resources and schedules the node starts.
    pub fn new(mut cfg: SimConfig) -> Sim {
        assert!(cfg.nodes >= 2, "simulate at least 2 nodes");
        if cfg.warm {
            // The stores have no node entries to follow.
            cfg.size_hint.get_or_insert(cfg.nodes);
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let ccfg = ClusterConfig {
            size_hint: cfg.size_hint.unwrap_or(ClusterConfig::default().size_hint),
            probe_period: Duration::from_millis(cfg.probe_period_ms),
            admission: Admission::AnyKey,
        };
        let mut nodes = Vec::with_capacity(cfg.nodes as usize);
        let mut by_name = HashMap::with_capacity(cfg.nodes as usize);
        for i in 0..cfg.nodes {
            let name = node_name(i);
            let id = NodeId {
                name: name.clone(),
                addr: node_addr(i),
                bump: 0,
            };
            let store = Arc::new(Mutex::new(Store::new(&name)));
            let cluster = Cluster::new(id, store, &ccfg, rng.random());
            nodes.push(Node {
                cluster,
                size_hint: ccfg.size_hint,
                started: false,
                resources: Vec::new(),
                sent: Counters::default(),
            });
            by_name.insert(name, i);
        }
        let mut resources = Vec::with_capacity(cfg.resources as usize);
        let mut res_by_name = HashMap::with_capacity(cfg.resources as usize);
        for r in 0..cfg.resources {
            let want = rng.random_range(2..=4).min(cfg.nodes as usize);
            let mut members: Vec<u32> = Vec::with_capacity(want);
            while members.len() < want {
                let m = rng.random_range(0..cfg.nodes);
                if !members.contains(&m) {
                    members.push(m);
                }
            }
            for &m in &members {
                nodes[m as usize].resources.push(r);
            }
            // The incarnation's token, as keys and scopes name it.
            let name = schema::ResRef::new(&format!("vol{r}"), u64::from(r) + 1).token();
            res_by_name.insert(name.clone(), r);
            resources.push(Resource { name, members });
        }
        let mut sim = Sim {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            rng,
            nodes,
            by_name,
            resources,
            res_by_name,
            watch: None,
            running: Vec::new(),
            leaks: 0,
            downs: 0,
            events: 0,
            last_start: 0,
            cfg,
        };
        if sim.cfg.warm {
            sim.warm_start();
            return sim;
        }
        for i in 0..sim.cfg.nodes {
            let at = u64::from(i) * sim.cfg.start_window_ms / u64::from(sim.cfg.nodes);
            sim.last_start = at;
            sim.schedule(at, Event::Start(i));
        }
        sim
    }

    /// The nodes' initial `ClusterConfig` (marsd: `ClusterConfig::default()`).
    fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            size_hint: self
                .cfg
                .size_hint
                .unwrap_or(ClusterConfig::default().size_hint),
            probe_period: Duration::from_millis(self.cfg.probe_period_ms),
            admission: Admission::AnyKey,
        }
    }

    /// Starts every node at t = 0 knowing all the others; see [`SimConfig::warm`].
    fn warm_start(&mut self) {
        let ids: Vec<NodeId> = self
            .nodes
            .iter()
            .map(|n| n.cluster.identity().clone())
            .collect();
        // Adding N-1 members costs O(N²) per node in foca: spread it over two threads.
        let half = self.nodes.len().div_ceil(2);
        let (first, second) = self.nodes.split_at_mut(half);
        let timers: Vec<Vec<(FocaTimer<NodeId>, Duration)>> = std::thread::scope(|scope| {
            let ids = &ids;
            let handles: Vec<_> = [(0, first), (half, second)]
                .into_iter()
                .map(|(offset, chunk)| {
                    scope.spawn(move || {
                        let mut timers = Vec::with_capacity(chunk.len());
                        for (k, node) in chunk.iter_mut().enumerate() {
                            let others = ids.iter().enumerate().filter(|&(j, _)| j != offset + k);
                            node.cluster.add_members(others.map(|(_, id)| id.clone()));
                            // Keep the timers foca set on going online, drop the N-1 Ups.
                            let effects = node.cluster.take_effects().into_iter();
                            timers.push(
                                effects
                                    .filter_map(|e| match e {
                                        Effect::Schedule { timer, after } => Some((timer, after)),
                                        _ => None,
                                    })
                                    .collect(),
                            );
                        }
                        timers
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("warm-start thread"))
                .collect()
        });
        for (i, node_timers) in (0..self.cfg.nodes).zip(timers) {
            self.nodes[i as usize].started = true;
            for (timer, after) in node_timers {
                self.schedule(ms_ceil(after), Event::Timer { node: i, timer });
            }
            let first_ae = self.rng.random_range(0..self.cfg.ae_interval_ms);
            self.schedule(first_ae, Event::AeTick(i));
        }
        // Resource entries, already on every member.
        for r in 0..self.resources.len() {
            let (name, members) = (
                self.resources[r].name.clone(),
                self.resources[r].members.clone(),
            );
            let prefix = resource_prefix(&name);
            let mut entries = Vec::new();
            for (k, &m) in members.iter().enumerate() {
                let store = self.nodes[m as usize].cluster.store().clone();
                let mut store = store.lock();
                if k == 0 {
                    let key = format!("{prefix}d/primary");
                    entries.push((key.clone(), store.set(&key, json!(node_name(m)))));
                }
                let key = format!("{prefix}d/member/{}", node_name(m));
                entries.push((key.clone(), store.set(&key, json!({ "attached": true }))));
            }
            for &m in &members {
                let mut store = self.nodes[m as usize].cluster.store().lock();
                for (key, entry) in &entries {
                    store.merge(key, entry.clone());
                }
            }
        }
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Queued {
            at,
            seq: self.seq,
            event,
        });
    }

    fn delay(&mut self) -> u64 {
        self.rng
            .random_range(self.cfg.delay_min_ms..=self.cfg.delay_max_ms)
    }

    /// Processes every event due at or before `t`; the clock ends at `t`.
    pub fn run_until(&mut self, t: u64) {
        while self.queue.peek().is_some_and(|q| q.at <= t) {
            let Some(q) = self.queue.pop() else { break };
            self.now = q.at;
            self.events += 1;
            self.dispatch(q.event);
        }
        self.now = self.now.max(t);
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Start(i) => self.start(i),
            Event::Datagram { to, data } => {
                if self.nodes[to as usize].started {
                    let node = &mut self.nodes[to as usize];
                    node.cluster.handle_gossip(&data);
                    let changed = node.cluster.take_changed();
                    self.note_changes(to, &changed, Via::Gossip);
                    self.flush(to);
                }
            }
            Event::Timer { node, timer } => {
                self.nodes[node as usize].cluster.handle_timer(timer);
                self.flush(node);
            }
            Event::AeTick(i) => self.ae_tick(i),
            Event::Tcp {
                from,
                to,
                chan,
                msg,
            } => self.deliver_tcp(from, to, chan, msg),
        }
    }

    /// Node `i` is set up: the first node founds the cluster; every other
    /// one joins through a random running node (`marsadm join-cluster`),
    /// and its daemon starts when the answer arrives.
    fn start(&mut self, i: u32) {
        if self.running.is_empty() {
            self.start_daemon(i);
            return;
        }
        let seed = self.running[self.rng.random_range(0..self.running.len())];
        // Tokens and certificates are not modelled: the simulation is of
        // the metadata the join carries.
        let join = Msg::Join {
            token_id: String::new(),
            secret: String::new(),
            node: mars_proto::NodeInfo {
                name: format!("n{i}"),
                listen: String::new(),
                nbd: String::new(),
                id: u64::from(i) + 1,
            },
            public_key: Vec::new(),
        };
        self.send_tcp(i, seed, Chan::Join, join);
    }

    /// What marsd does on start: write its node entry if the store lacks it,
    /// write the entries of its resources, announce to up to three nodes of
    /// its store, and start the anti-entropy loop.
    fn start_daemon(&mut self, i: u32) {
        let name = node_name(i);
        // marsd builds its Cluster at start, on the store join-cluster wrote:
        // Cluster::new tunes foca for the nodes that store already knows.
        let ccfg = self.cluster_config();
        let seed = self.rng.random();
        let node = &mut self.nodes[i as usize];
        let (id, store) = (
            node.cluster.identity().clone(),
            node.cluster.store().clone(),
        );
        node.cluster = Cluster::new(id, store, &ccfg, seed);
        node.size_hint = node.cluster.size_hint();
        node.started = true;
        self.running.push(i);
        let (key, entry) = (node_key(i), node_entry(i));
        let node = &mut self.nodes[i as usize];
        if node.cluster.store().lock().get(&key) != Some(&entry) {
            node.cluster.set(&key, entry);
        }
        // marsd's keys: every member adds its own membership key and member
        // entry; the first member also creates the resource and is its primary.
        for r in node.resources.clone() {
            let res_name = self.resources[r as usize].name.clone();
            let prefix = resource_prefix(&res_name);
            self.nodes[i as usize]
                .cluster
                .set(&format!("c/d/member/{res_name}/{name}"), json!(true));
            if self.resources[r as usize].members[0] == i {
                self.nodes[i as usize].cluster.set(
                    &format!("c/d/res/{res_name}"),
                    json!({ "size": 1u64 << 30, "resource_id": u64::from(r) + 1 }),
                );
                self.write_resource_entry(i, r, &format!("{prefix}d/primary"), json!(name));
            }
            let member = json!({
                "disk": format!("/dev/mars/{res_name}"),
                "attached": true,
                "connected": true,
                "pause_sync": false,
                "pause_fetch": false,
                "pause_replay": false,
            });
            self.write_resource_entry(i, r, &format!("{prefix}d/member/{name}"), member);
        }
        let known = self.known_nodes(i);
        for &n in known.choose_multiple(&mut self.rng, 3) {
            let to = self.nodes[n as usize].cluster.identity().clone();
            self.nodes[i as usize].cluster.announce(to);
        }
        let first_ae = self.rng.random_range(0..self.cfg.ae_interval_ms);
        self.schedule(self.now + first_ae, Event::AeTick(i));
        self.flush(i);
    }

    /// Carries out the effects a node's state machine produced.
    fn flush(&mut self, i: u32) {
        for effect in self.nodes[i as usize].cluster.take_effects() {
            match effect {
                Effect::Send { to, data } => {
                    let sent = &mut self.nodes[i as usize].sent;
                    sent.gossip_msgs += 1;
                    sent.gossip_bytes += data.len() as u64;
                    let Some(&to) = self.by_name.get(&to.name) else {
                        continue;
                    };
                    if self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss) {
                        continue;
                    }
                    let at = self.now + self.delay();
                    self.schedule(at, Event::Datagram { to, data });
                }
                Effect::Schedule { timer, after } => {
                    self.schedule(self.now + ms_ceil(after), Event::Timer { node: i, timer });
                }
                Effect::Up(_) => {}
                Effect::Down(_) => self.downs += 1,
            }
        }
    }

    fn send_tcp(&mut self, from: u32, to: u32, chan: Chan, msg: Msg) {
        let bytes = frame_len(&msg);
        let sent = &mut self.nodes[from as usize].sent;
        match chan {
            Chan::AntiEntropy => {
                sent.ae_msgs += 1;
                sent.ae_bytes += bytes;
            }
            Chan::Push => {
                sent.push_msgs += 1;
                sent.push_bytes += bytes;
            }
            Chan::Join => sent.join_bytes += bytes,
        }
        let at = self.now + self.delay();
        self.schedule(
            at,
            Event::Tcp {
                from,
                to,
                chan,
                msg,
            },
        );
    }

    fn deliver_tcp(&mut self, from: u32, to: u32, chan: Chan, msg: Msg) {
        if let Msg::Joined { entries, .. } = msg {
            // marsadm stores the cluster's entries as they are, then marsd starts.
            let store = self.nodes[to as usize].cluster.store().clone();
            for w in entries {
                let (key, entry) = from_wire(w);
                store.lock().merge(&key, entry);
            }
            self.start_daemon(to);
            return;
        }
        if !self.nodes[to as usize].started {
            return; // connection refused
        }
        if let Msg::Join { .. } = msg {
            // The seed adds the joiner's node entry and sends every cluster-wide entry.
            self.nodes[to as usize]
                .cluster
                .set(&node_key(from), node_entry(from));
            self.flush(to);
            let entries = {
                let store = self.nodes[to as usize].cluster.store().lock();
                store
                    .range(CLUSTER_PREFIX)
                    .map(|(k, e)| to_wire(k, e))
                    .collect()
            };
            let reply = Msg::Joined {
                cluster_id: "sim".to_string(),
                entries,
                cert: String::new(),
                ca_cert: String::new(),
                ca_key: String::new(),
            };
            self.send_tcp(to, from, Chan::Join, reply);
            return;
        }
        let (reply, entries) = {
            let store = self.nodes[to as usize].cluster.store().lock();
            ae::respond(&store, msg)
        };
        if !entries.is_empty() {
            let changed = self.nodes[to as usize].cluster.merge_entries(entries);
            self.note_changes(to, &changed, Via::Tcp(chan));
            self.flush(to);
        }
        if let Some(reply) = reply {
            self.send_tcp(to, from, chan, reply);
        }
    }

    /// One round of marsd's anti-entropy loop on node `i`: announce to up
    /// to eight (`repair_announces`) nodes of the store that are not seen
    /// alive, retune foca for the store's node count, exchange "c/" with a random live node (any known
    /// node while none is alive), and each resource the store says `i`
    /// belongs to with a random other member.
    fn ae_tick(&mut self, i: u32) {
        let live: HashSet<u32> = self.nodes[i as usize]
            .cluster
            .live_members()
            .iter()
            .filter_map(|id| self.by_name.get(&id.name).copied())
            .collect();
        let known = self.known_nodes(i);
        let missing: Vec<u32> = known
            .iter()
            .copied()
            .filter(|n| !live.contains(n))
            .collect();
        let repair = mars_cluster::repair_announces(missing.len());
        for &n in missing.choose_multiple(&mut self.rng, repair) {
            let to = self.nodes[n as usize].cluster.identity().clone();
            self.nodes[i as usize].cluster.announce(to);
        }
        let size = known.len() as u32 + 1;
        if self.cfg.size_hint.is_none() && size != self.nodes[i as usize].size_hint {
            let ccfg = ClusterConfig {
                size_hint: size,
                probe_period: Duration::from_millis(self.cfg.probe_period_ms),
                admission: Admission::AnyKey,
            };
            let node = &mut self.nodes[i as usize];
            node.cluster.set_size_hint(&ccfg);
            node.size_hint = size;
        }
        self.flush(i);
        let mut pool: Vec<u32> = if live.is_empty() {
            known
        } else {
            live.into_iter().collect()
        };
        pool.sort_unstable(); // HashSet order is not deterministic
        if let Some(&peer) = pool.choose(&mut self.rng) {
            let msg = ae::start(
                &self.nodes[i as usize].cluster.store().lock(),
                CLUSTER_PREFIX,
            );
            self.send_tcp(i, peer, Chan::AntiEntropy, msg);
        }
        for r in self.nodes[i as usize].resources.clone() {
            let Some(members) = self.known_members(i, r) else {
                continue;
            };
            let others: Vec<u32> = members.into_iter().filter(|&m| m != i).collect();
            if others.is_empty() {
                continue;
            }
            let peer = others[self.rng.random_range(0..others.len())];
            let prefix = resource_prefix(&self.resources[r as usize].name);
            let msg = ae::start(&self.nodes[i as usize].cluster.store().lock(), &prefix);
            self.send_tcp(i, peer, Chan::AntiEntropy, msg);
        }
        let ae = self.cfg.ae_interval_ms;
        let next = self.rng.random_range(ae * 4 / 5..=ae * 6 / 5);
        self.schedule(self.now + next, Event::AeTick(i));
    }

    /// Other nodes with a live `c/d/node/<name>` entry in node `i`'s store.
    fn known_nodes(&self, i: u32) -> Vec<u32> {
        let store = self.nodes[i as usize].cluster.store().lock();
        schema::nodes(&store)
            .into_iter()
            .filter_map(|(name, _)| self.by_name.get(&name).copied())
            .filter(|&n| n != i)
            .collect()
    }

    /// Members of resource `r` as node `i`'s store has them (`c/d/res/<res>`
    /// and one live `c/d/member/<res>/<node>` per member, as marsd reads
    /// them), if they include `i`.
    fn known_members(&self, i: u32, r: u32) -> Option<Vec<u32>> {
        if self.cfg.warm {
            let members = &self.resources[r as usize].members;
            return members.contains(&i).then(|| members.clone());
        }
        let res = &self.resources[r as usize].name;
        let store = self.nodes[i as usize].cluster.store().lock();
        store.get(&format!("c/d/res/{res}"))?;
        let prefix = format!("c/d/member/{res}/");
        let members: Vec<u32> = store
            .range(&prefix)
            .filter(|(_, e)| e.value.is_some())
            .filter_map(|(k, _)| self.by_name.get(k.strip_prefix(prefix.as_str())?).copied())
            .collect();
        members.contains(&i).then_some(members)
    }

    /// Writes a resource entry on `writer` and pushes it to the other members it knows.
    fn write_resource_entry(
        &mut self,
        writer: u32,
        r: u32,
        key: &str,
        value: serde_json::Value,
    ) -> Stamp {
        let entry = self.nodes[writer as usize].cluster.set(key, value);
        let members = self.known_members(writer, r).unwrap_or_default();
        for m in members.into_iter().filter(|&m| m != writer) {
            let msg = Msg::Push {
                entries: vec![to_wire(key, &entry)],
            };
            self.send_tcp(writer, m, Chan::Push, msg);
        }
        entry.stamp
    }

    fn is_member(&self, i: u32, res: &str) -> bool {
        self.res_by_name
            .get(res)
            .is_some_and(|&r| self.resources[r as usize].members.contains(&i))
    }

    fn note_changes(&mut self, i: u32, keys: &[String], via: Via) {
        for key in keys {
            if let Some(Scope::Resource(res)) = scope_of(key) {
                if !self.is_member(i, res) {
                    self.leaks += 1;
                }
            }
            let Some(w) = self.watch.as_mut() else {
                continue;
            };
            if w.key != *key || w.seen[i as usize] {
                continue;
            }
            let fresh = self.nodes[i as usize]
                .cluster
                .store()
                .lock()
                .entry(key)
                .is_some_and(|e| e.stamp >= w.stamp);
            if fresh {
                w.seen[i as usize] = true;
                if w.target[i as usize] {
                    w.remaining -= 1;
                    if via != Via::Gossip {
                        w.via_tcp += 1;
                    }
                    if w.remaining == 0 {
                        w.done_at = Some(self.now);
                    }
                }
            }
        }
    }

    fn start_watch(&mut self, key: &str, stamp: Stamp, writer: u32, target: Vec<bool>) {
        let n = self.nodes.len();
        let mut seen = vec![false; n];
        seen[writer as usize] = true;
        let remaining = target
            .iter()
            .enumerate()
            .filter(|&(j, &t)| t && j != writer as usize)
            .count();
        let done_at = (remaining == 0).then_some(self.now);
        self.watch = Some(Watch {
            key: key.to_string(),
            stamp,
            since: self.now,
            target,
            seen,
            remaining,
            via_tcp: 0,
            done_at,
        });
    }

    /// Runs until the watched entry reached all its targets (or the limit); returns its spread.
    fn finish_watch(&mut self) -> Spread {
        let limit = self.now + self.cfg.spread_limit_ms;
        while self.watch.as_ref().is_some_and(|w| w.done_at.is_none()) && self.now < limit {
            self.run_until(self.now + self.cfg.probe_period_ms);
        }
        self.watch.take().map(|w| w.spread()).unwrap_or_default()
    }

    /// How many nodes see every other node alive, and the fewest live members any node sees.
    fn membership(&self) -> (usize, usize) {
        let full = self.nodes.len() - 1;
        let complete = self
            .nodes
            .iter()
            .filter(|n| n.cluster.num_members() == full)
            .count();
        let min = self
            .nodes
            .iter()
            .map(|n| n.cluster.num_members())
            .min()
            .unwrap_or(0);
        (complete, min)
    }

    /// Every node's "c/" store is the same.
    fn meta_converged(&self) -> bool {
        let first = self.nodes[0].cluster.store().lock().digest(CLUSTER_PREFIX);
        self.nodes
            .iter()
            .all(|n| n.cluster.store().lock().digest(CLUSTER_PREFIX) == first)
    }

    fn backlog(&self) -> usize {
        self.nodes.iter().map(|n| n.cluster.backlog()).sum()
    }

    fn counters(&self) -> Vec<Counters> {
        self.nodes.iter().map(|n| n.sent).collect()
    }

    /// Resource entries stored on nodes outside their resource.
    fn stray_resource_entries(&self) -> u64 {
        let mut stray = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            let store = node.cluster.store().lock();
            for (key, _) in store.range("r/") {
                if let Some(Scope::Resource(res)) = scope_of(key) {
                    if !self.is_member(i as u32, res) {
                        stray += 1;
                    }
                }
            }
        }
        stray
    }

    fn log(&self, wall: &Instant, what: &str) {
        if self.cfg.verbose {
            eprintln!(
                "[n={} t={:.1}s wall={:.1}s events={}] {what}",
                self.cfg.nodes,
                self.now as f64 / 1000.0,
                wall.elapsed().as_secs_f64(),
                self.events
            );
        }
    }
}

/// Per-node totals sent between two snapshots.
fn totals(before: &[Counters], after: &[Counters]) -> Traffic {
    traffic(before, after, 1.0)
}

fn traffic(before: &[Counters], after: &[Counters], secs: f64) -> Traffic {
    let rate = |f: fn(&Counters) -> u64| {
        let per_node: Vec<f64> = before
            .iter()
            .zip(after)
            .map(|(b, a)| {
                if secs > 0.0 {
                    (f(a) - f(b)) as f64 / secs
                } else {
                    0.0
                }
            })
            .collect();
        Rates::of(&per_node)
    };
    Traffic {
        secs,
        gossip_msgs: rate(|c| c.gossip_msgs),
        gossip_bytes: rate(|c| c.gossip_bytes),
        ae_msgs: rate(|c| c.ae_msgs),
        ae_bytes: rate(|c| c.ae_bytes),
        push_msgs: rate(|c| c.push_msgs),
        join_bytes: rate(|c| c.join_bytes),
    }
}

fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak resident memory of this process (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_mib("VmHWM:")
}

fn rss_mib() -> Option<f64> {
    proc_status_mib("VmRSS:")
}

/// What the bootstrap phase measured: virtual ms after the last node's start.
#[derive(Default)]
struct Bootstrap {
    members_99_ms: Option<u64>,
    members_ms: Option<u64>,
    meta_ms: Option<u64>,
    quiet_ms: Option<u64>,
    min_members_seen: usize,
}

/// How long after membership and stores converged the bootstrap phase waits
/// for every retransmission backlog to be empty.
const QUIET_GRACE_MS: u64 = 30_000;

/// Runs until every node sees all others alive, all "c/" stores are equal
/// and no node has anything left to retransmit (or the limit, or
/// [`QUIET_GRACE_MS`] after convergence), checking once per probe period.
fn bootstrap(sim: &mut Sim, wall: &Instant) -> Bootstrap {
    let cfg = sim.cfg.clone();
    let n = cfg.nodes as usize;
    let t0 = sim.last_start;
    let mut b = Bootstrap::default();
    let (mut t, mut next_log, mut last_log) = (t0, t0, Instant::now());
    loop {
        sim.run_until(t);
        let elapsed = t - t0;
        let (complete, min) = sim.membership();
        b.min_members_seen = min;
        if b.members_99_ms.is_none() && complete * 100 >= n * 99 {
            b.members_99_ms = Some(elapsed);
        }
        if b.members_ms.is_none() && complete == n {
            b.members_ms = Some(elapsed);
            sim.log(wall, "membership converged");
        }
        if b.meta_ms.is_none() && sim.meta_converged() {
            b.meta_ms = Some(elapsed);
            sim.log(wall, "cluster metadata converged");
        }
        if b.members_ms.is_some() && b.meta_ms.is_some() && sim.backlog() == 0 {
            b.quiet_ms = Some(elapsed);
            sim.log(wall, "quiet");
            return b;
        }
        // Under datagram loss SWIM keeps refuting suspicions, so some node
        // may always have an update queued: give up on quiet after a while.
        let converged = b.members_ms.zip(b.meta_ms).map(|(m, s)| m.max(s));
        if converged.is_some_and(|c| elapsed >= c + QUIET_GRACE_MS) {
            sim.log(wall, "converged, never quiet");
            return b;
        }
        if elapsed >= cfg.converge_limit_ms {
            sim.log(wall, "bootstrap limit reached");
            return b;
        }
        if cfg.verbose && (t >= next_log || last_log.elapsed() > Duration::from_secs(30)) {
            (next_log, last_log) = (t + 10_000, Instant::now());
            let rss = rss_mib().map_or(String::new(), |m| format!(", RSS {m:.0} MiB"));
            let backlog = sim.backlog();
            sim.log(
                wall,
                &format!("{complete} of {n} nodes see all, fewest live members seen {min}, backlog {backlog}{rss}"),
            );
        }
        t += cfg.probe_period_ms;
    }
}

/// Plays the scenario:
///
/// 1. bootstrap: node i starts at i/N of the start window, writes marsd's
///    keys — `c/d/node/<name>`; for each of its resources
///    `c/d/member/<res>/<name>` and `r/<res>/d/member/<name>` (pushed to the
///    members it knows); as a resource's first member also `c/d/res/<res>`
///    and `r/<res>/d/primary` — and announces itself to a random node
///    started before it; run until every node sees all others alive, all
///    "c/" stores are equal and no node has anything left to retransmit
///    (checked once per probe period);
/// 2. steady state: count what every node sends during the window;
/// 3. a random node sets a new cluster-wide key: time until every node has it;
/// 4. a random member of a random resource moves its primary (set + push):
///    time until every member has it;
/// 5. count resource entries that ever reached a non-member.
pub fn run(cfg: &SimConfig) -> Report {
    let wall = Instant::now();
    let mut sim = Sim::new(cfg.clone());
    let period = cfg.probe_period_ms;

    // 1. Bootstrap (or a warm start and one anti-entropy round for foca's timers to run).
    let boot = if cfg.warm {
        sim.run_until(cfg.ae_interval_ms);
        sim.log(&wall, "warm start done");
        Bootstrap {
            min_members_seen: sim.membership().1,
            ..Bootstrap::default()
        }
    } else {
        bootstrap(&mut sim, &wall)
    };
    let bootstrap_traffic = totals(
        &vec![Counters::default(); cfg.nodes as usize],
        &sim.counters(),
    );

    // 2. Steady state.
    let before = sim.counters();
    sim.run_until(sim.now + cfg.steady_ms);
    let steady = traffic(&before, &sim.counters(), cfg.steady_ms as f64 / 1000.0);
    sim.log(&wall, "steady-state window done");

    // 3. A new cluster-wide entry.
    let writer = sim.rng.random_range(0..cfg.nodes);
    let key = "c/d/sim/probe";
    let entry = sim.nodes[writer as usize]
        .cluster
        .set(key, json!({ "written_at_ms": sim.now }));
    sim.flush(writer);
    sim.start_watch(key, entry.stamp, writer, vec![true; cfg.nodes as usize]);
    let cluster_key = sim.finish_watch();
    sim.log(&wall, "cluster-wide entry spread");

    // 4. A resource entry: a member moves the primary to another member.
    let r = sim.rng.random_range(0..cfg.resources);
    let members = sim.resources[r as usize].members.clone();
    let writer = members[sim.rng.random_range(0..members.len())];
    let new_primary = *members.iter().find(|&&m| m != writer).unwrap_or(&writer);
    let key = format!(
        "{}d/primary",
        resource_prefix(&sim.resources[r as usize].name)
    );
    let stamp = sim.write_resource_entry(writer, r, &key, json!(node_name(new_primary)));
    let target = (0..cfg.nodes).map(|i| members.contains(&i)).collect();
    sim.start_watch(&key, stamp, writer, target);
    let resource_key = sim.finish_watch();
    sim.log(&wall, "resource entry spread");

    // 5. Scope check.
    let leaks = sim.leaks + sim.stray_resource_entries();

    Report {
        nodes: cfg.nodes,
        seed: cfg.seed,
        resources: cfg.resources,
        loss: cfg.loss,
        probe_period_ms: period,
        warm: cfg.warm,
        members_converged_99_ms: boot.members_99_ms,
        members_converged_ms: boot.members_ms,
        meta_converged_ms: boot.meta_ms,
        quiet_ms: boot.quiet_ms,
        min_members_seen: boot.min_members_seen,
        bootstrap: bootstrap_traffic,
        steady,
        cluster_key,
        resource_key,
        leaks,
        downs: sim.downs,
        events: sim.events,
        virtual_secs: sim.now as f64 / 1000.0,
        wall_secs: wall.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifty_nodes_converge_spread_and_keep_resource_entries_among_members() {
        let mut cfg = SimConfig::new(50, 7);
        cfg.steady_ms = 5_000;
        let r = run(&cfg);
        assert!(
            r.members_converged_ms.is_some(),
            "membership did not converge: {r:?}"
        );
        assert!(
            r.meta_converged_ms.is_some(),
            "cluster metadata did not converge: {r:?}"
        );
        assert_eq!(r.cluster_key.reached, 50);
        assert!(r.cluster_key.ms.is_some());
        assert!(r.resource_key.targets >= 2);
        assert_eq!(r.resource_key.reached, r.resource_key.targets);
        assert!(r.resource_key.ms.unwrap() < 1000, "{r:?}");
        assert_eq!(r.leaks, 0, "resource entries reached non-members");
        assert_eq!(r.downs, 0, "no node fails, none may be declared down");
    }

    #[test]
    fn cluster_entries_spread_by_gossip() {
        let mut cfg = SimConfig::new(50, 7);
        cfg.steady_ms = 5_000;
        let r = run(&cfg);
        assert_eq!(r.cluster_key.reached, 50);
        assert!(
            r.cluster_key.via_tcp < 10,
            "{} of 49 nodes needed anti-entropy",
            r.cluster_key.via_tcp
        );
        assert!(r.cluster_key.ms.unwrap() <= 2_000, "{r:?}");
    }

    /// Issue 16: a cold start converges in O(log N) rounds, and a new
    /// cluster-wide key spreads in a few. Fast enough for debug CI; the
    /// fixes of issue 16 part 5 show from a few hundred nodes up, which
    /// [`thousand_nodes_converge_in_thirty_seconds`] checks (ignored: about
    /// 3 min in release).
    #[test]
    fn cold_start_converges_within_bounds() {
        let mut cfg = SimConfig::new(200, 11);
        cfg.steady_ms = 2_000;
        cfg.converge_limit_ms = 40_000;
        let r = run(&cfg);
        check_bounds(&r, 10_000, 1_500);
    }

    /// The bounds of [`cold_start_converges_within_bounds`] with 5 % of the
    /// datagrams lost: nothing may be lost for good.
    #[test]
    fn cold_start_converges_under_five_percent_loss() {
        let mut cfg = SimConfig::new(100, 5);
        cfg.steady_ms = 2_000;
        cfg.converge_limit_ms = 40_000;
        cfg.loss = 0.05;
        let r = run(&cfg);
        check_bounds(&r, 15_000, 2_500);
    }

    /// The bound at its size: 1,000 nodes converge in under 30 s
    /// (about 3 min in a release build: `cargo test --release -p mars-sim --
    /// --ignored`).
    #[test]
    #[ignore]
    fn thousand_nodes_converge_in_thirty_seconds() {
        let mut cfg = SimConfig::new(1000, 1);
        cfg.steady_ms = 2_000;
        cfg.converge_limit_ms = 60_000;
        let r = run(&cfg);
        check_bounds(&r, 30_000, 2_000);
    }

    fn check_bounds(r: &Report, converge_ms: u64, spread_ms: u64) {
        eprintln!("{}", markdown(std::slice::from_ref(r)));
        let members = r.members_converged_ms.expect("membership converged");
        assert!(
            members <= converge_ms,
            "full membership after {members} ms: {r:?}"
        );
        let meta = r.meta_converged_ms.expect("c/ stores converged");
        assert!(
            meta <= converge_ms,
            "c/ stores equal after {meta} ms: {r:?}"
        );
        assert!(r.quiet_ms.is_some(), "never quiet: {r:?}");
        let spread = r.cluster_key.ms.expect("new c/ key reached every node");
        assert!(spread <= spread_ms, "new c/ key took {spread} ms: {r:?}");
        assert_eq!(r.resource_key.reached, r.resource_key.targets, "{r:?}");
        assert_eq!(r.downs, 0, "no node fails, none may be declared down");
        assert_eq!(r.leaks, 0);
    }

    #[test]
    fn frame_len_is_the_encoded_frame_length() {
        let store = {
            let mut s = Store::new("n0");
            s.set("c/d/node/n0@1", node_entry(0));
            s.set("c/d/x", json!({ "s": "\u{e9}\"\\", "n": [1, 2.5, null] }));
            s
        };
        let entries: Vec<_> = store.range("").map(|(k, e)| to_wire(k, e)).collect();
        for msg in [
            Msg::InSync,
            Msg::Push {
                entries: entries.clone(),
            },
            Msg::Joined {
                cluster_id: "sim".to_string(),
                entries,
                cert: String::new(),
                ca_cert: String::new(),
                ca_key: String::new(),
            },
            ae::start(&store, CLUSTER_PREFIX),
        ] {
            assert_eq!(frame_len(&msg), mars_proto::encode_frame(&msg).len() as u64);
        }
    }

    #[test]
    fn runs_are_deterministic() {
        let mut cfg = SimConfig::new(12, 3);
        cfg.steady_ms = 2_000;
        let (a, b) = (run(&cfg), run(&cfg));
        assert_eq!(a.events, b.events);
        assert_eq!(a.members_converged_ms, b.members_converged_ms);
        assert_eq!(a.cluster_key.ms, b.cluster_key.ms);
        assert_eq!(a.steady.gossip_bytes.mean, b.steady.gossip_bytes.mean);
    }
}
