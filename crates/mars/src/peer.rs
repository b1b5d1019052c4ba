//! The network side of the cluster: gossip datagrams (UDP) and the peer
//! protocol (TCP) on the node's `--listen` address, anti-entropy rounds, and
//! the client calls `marsadm join-cluster` and `merge-cluster` use.
//!
//! Gossip datagrams are sealed with the cluster's gossip key
//! (`mars_proto::gossip`: XChaCha20-Poly1305, a keyring in the metadata so
//! the key can be rotated without downtime). Datagrams that do not open with
//! a key of the ring are dropped (and logged once per sender).
//!
//! Peer connections are short: connect, TLS 1.3 with both sides'
//! certificates (the `tls` module), handshake (`Hello` / `Welcome` or
//! `Refused`), one exchange, close. A connection without a client
//! certificate may only redeem an invitation token (join, merge), in frames
//! of a few KiB. An unreachable peer is retried with exponential backoff
//! (0.5 s doubling to 30 s).

use crate::meta::{self, NodeEntry};
use crate::tls::{self, InviteKind, Tls, Token};
use anyhow::{anyhow, bail, Context, Result};
use mars_cluster::{ae, Cluster, ClusterConfig, Effect, FocaTimer, NodeId};
use mars_meta::Store;
use mars_proto::gossip::Keyring;
use mars_proto::{
    client_handshake, read_msg, read_msg_max, write_msg, Msg, NodeInfo, WireEntry, PROTOCOL_VERSION,
};
use mars_replication::PeerStream;
use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify};

/// Senders of dropped datagrams remembered for logging once each (spoofed
/// addresses must not grow it without end).
const WARNED_MAX: usize = 1024;
pub const AE_INTERVAL: Duration = Duration::from_secs(2);
/// How long deletions (tombstones) are kept before they are dropped: 30 days.
const TOMBSTONE_KEEP_MS: u64 = 30 * 24 * 3600 * 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake, and a peer's first message after it, may take:
/// a connection that says nothing is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a rotation of the gossip key, how long the old keys stay
/// installed (nodes that were not reached get the new one meanwhile).
const ROTATION_GRACE: Duration = Duration::from_secs(10);
/// The longest a served connection waits for the peer's next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection whose peer stops answering (a cut link drops packets silently: no
/// FIN, no RST) fails after about this long on the side that asked for it:
/// keepalive probes after 3 s of silence, every second, and TCP_USER_TIMEOUT for
/// requests sent but not acknowledged. Without it a fetch or sync blocked in a
/// read would wait for the link to come back, never asking another member, and
/// show itself connected.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// Socket options of every peer connection: no Nagle delay, keepalive, and on the
/// connecting side (which only sends small requests) TCP_USER_TIMEOUT. Not on the
/// serving side: it streams data, and a receiver that stops reading for a while
/// (a low rate limit, a slow disk) would make its zero-window probes time out.
fn tune_stream(s: &TcpStream, connecting: bool) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(3))
        .with_interval(Duration::from_secs(1))
        .with_retries(7);
    let mut r = sock.set_tcp_keepalive(&keepalive);
    if connecting {
        r = r.and_then(|()| sock.set_tcp_user_timeout(Some(DEAD_PEER_TIMEOUT)));
    }
    if let Err(e) = r {
        tracing::warn!("peer socket options: {e}");
    }
}

/// Peer connections served at once from addresses nodes of the cluster
/// listen on, and from all other addresses (marsd raises its descriptor
/// limit far above their sum at start: `raise_fd_limit`).
pub const MAX_NODE_CONNECTIONS: usize = 384;
pub const MAX_OTHER_CONNECTIONS: usize = 128;
/// Of those, from one address some node listens on (several nodes may
/// share one), and from any other address (an IPv6 /64 counts as one).
pub const MAX_PER_NODE_IP: usize = 256;
pub const MAX_PER_OTHER_IP: usize = 16;

/// Failed peer connections are logged at most [`CONN_LOG_BURST`] times per
/// [`CONN_LOG_PERIOD`], then counted: anyone who reaches the port can fail
/// a TLS handshake thousands of times a second, and each must not cost a
/// line on disk.
const CONN_LOG_BURST: u32 = 20;
const CONN_LOG_PERIOD: Duration = Duration::from_secs(10);

struct ConnLog(Mutex<(Option<Instant>, u32, u64)>);

static CONN_LOG: ConnLog = ConnLog(Mutex::new((None, 0, 0)));

impl ConnLog {
    /// Whether to log this one; `Some(n)`: yes, and `n` were suppressed
    /// before it.
    fn admit(&self) -> Option<u64> {
        let mut g = self.0.lock();
        let now = Instant::now();
        let mut suppressed = 0;
        if g.0.is_none_or(|t| now.duration_since(t) >= CONN_LOG_PERIOD) {
            suppressed = g.2;
            *g = (Some(now), 0, 0);
        }
        if g.1 >= CONN_LOG_BURST {
            g.2 += 1;
            return None;
        }
        g.1 += 1;
        Some(suppressed)
    }
}

/// The unit a per-address cap counts: an IPv4 address, an IPv6 /64.
fn address_group(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        other => other,
    }
}

/// A connection counted against its address; released on drop.
struct IpSlot(
    Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    std::net::IpAddr,
);

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.0.lock();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

pub struct Peer {
    pub me: NodeInfo,
    cluster_id: RwLock<String>,
    /// Ids this node had before merges; peers still using them are accepted until they switch.
    former_ids: RwLock<Vec<String>>,
    pub cluster: Mutex<Cluster>,
    pub store: Arc<Mutex<Store>>,
    store_path: PathBuf,
    node_file: PathBuf,
    udp: UdpSocket,
    udp_send: std::net::UdpSocket,
    /// Per node name, the addresses the membership protocol sees alive: a
    /// node that left and a new node of its name (after a merge, both may be
    /// known for a while) are told apart by address, so that one going down
    /// does not take the other with it. (Not by incarnation: a restarted
    /// node's new identity replaces the old one without an Up, and only the
    /// new one goes Down.)
    alive: Mutex<HashMap<String, HashSet<SocketAddr>>>,
    /// Test hook (`marsadm debug-block`): peers this node neither sends to nor accepts.
    blocked: Mutex<HashSet<String>>,
    timers: mpsc::UnboundedSender<FocaTimer<NodeId>>,
    /// Woken when metadata or liveness changed (the control loop listens).
    pub changed: Notify,
    dirty: AtomicBool,
    backoff: Mutex<HashMap<String, (Instant, Duration)>>,
    warned: Mutex<HashSet<SocketAddr>>,
    size_hint: std::sync::atomic::AtomicU32,
    /// Serves the replication messages (sync, log list, fetch).
    data: std::sync::OnceLock<Arc<mars_replication::Server>>,
    /// Certificates, trusted CAs, invitations.
    pub tls: Arc<Tls>,
    /// The gossip keys (from the metadata).
    keyring: RwLock<Arc<Keyring>>,
    /// A rotation of the gossip key after a revocation is under way here.
    rotating: AtomicBool,
    /// Gossip datagrams and bytes sent and received (metrics).
    pub gossip: GossipCounters,
}

/// Gossip (UDP) traffic since start, as sealed datagrams on the wire.
#[derive(Debug, Default)]
pub struct GossipCounters {
    pub sent_datagrams: std::sync::atomic::AtomicU64,
    pub sent_bytes: std::sync::atomic::AtomicU64,
    pub received_datagrams: std::sync::atomic::AtomicU64,
    pub received_bytes: std::sync::atomic::AtomicU64,
    /// Received datagrams dropped: not sealed with a key of the keyring.
    pub dropped_datagrams: std::sync::atomic::AtomicU64,
}

impl GossipCounters {
    fn count(n: &std::sync::atomic::AtomicU64, bytes: &std::sync::atomic::AtomicU64, len: usize) {
        n.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// What replication needs of the cluster: the store, who is alive, connections.
impl mars_replication::Cluster for Peer {
    fn store(&self) -> &Mutex<Store> {
        &self.store
    }

    fn is_alive(&self, node: &str) -> bool {
        Peer::is_alive(self, node)
    }

    fn is_blocked(&self, node: &str) -> bool {
        Peer::is_blocked(self, node)
    }

    fn connect<'a>(
        &'a self,
        node: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<PeerStream>> + Send + 'a>> {
        Box::pin(Peer::connect(self, node))
    }
}

pub struct PeerSetup {
    pub dir: PathBuf,
    pub me: NodeInfo,
    pub cluster_id: String,
    pub former_ids: Vec<String>,
    pub udp: std::net::UdpSocket,
    pub tls: Arc<Tls>,
}

impl Peer {
    pub fn start(setup: PeerSetup, tcp: TcpListener) -> Result<Arc<Peer>> {
        let store_path = setup.dir.join("meta.store");
        let store = Store::load(&store_path, &setup.me.name).map_err(|e| anyhow!("{e}"))?;
        let store = Arc::new(Mutex::new(store));
        let addr: SocketAddr = crate::node::check_addr("--listen", &setup.me.listen)?;
        let bump = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        let id = NodeId {
            name: setup.me.name.clone(),
            addr,
            bump,
        };
        let cluster = Cluster::new(id, store.clone(), &ClusterConfig::default(), rand::random());
        setup.udp.set_nonblocking(true)?;
        // Sends go through a plain clone: tokio's try_send_to fails until the socket was seen writable.
        let udp_send = setup.udp.try_clone()?;
        let udp = UdpSocket::from_std(setup.udp)?;
        let (timers, timer_rx) = mpsc::unbounded_channel();
        let peer = Arc::new(Peer {
            me: setup.me.clone(),
            cluster_id: RwLock::new(setup.cluster_id),
            former_ids: RwLock::new(setup.former_ids),
            cluster: Mutex::new(cluster),
            store,
            store_path,
            node_file: setup.dir.join(crate::node::NODE_FILE),
            udp,
            udp_send,
            alive: Mutex::new(HashMap::new()),
            blocked: Mutex::new(HashSet::new()),
            timers,
            changed: Notify::new(),
            dirty: AtomicBool::new(false),
            backoff: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
            data: std::sync::OnceLock::new(),
            size_hint: std::sync::atomic::AtomicU32::new(ClusterConfig::default().size_hint),
            tls: setup.tls.clone(),
            keyring: RwLock::new(Arc::new(Keyring::default())),
            rotating: AtomicBool::new(false),
            gossip: GossipCounters::default(),
        });
        // The cluster's first node makes the first gossip key.
        if peer.store.lock().get(meta::GOSSIP_PRIMARY_KEY).is_none() {
            let key: [u8; mars_proto::gossip::KEY_LEN] = rand::random();
            let id = format!("{:08x}", mars_proto::gossip::key_id(&key));
            peer.set(
                &format!("{}{id}", meta::GOSSIP_KEY_PREFIX),
                serde_json::Value::String(mars_proto::gossip::key_text(&key)),
            );
            peer.set(meta::GOSSIP_PRIMARY_KEY, serde_json::Value::String(id));
        }
        peer.refresh_keyring();
        // This node's CA is trusted by the cluster (a merge brings it to the other side).
        let ca_key = tls::ca_key_of(&setup.tls.pin);
        let ca = serde_json::Value::String(setup.tls.ca_pem.clone());
        if peer.store.lock().get(&ca_key) != Some(&ca) {
            peer.set(&ca_key, ca);
        }
        peer.refresh_roots();
        // This node is in the cluster with its current addresses.
        let entry = meta::to_value(&NodeEntry {
            listen: setup.me.listen.clone(),
            nbd: setup.me.nbd.clone(),
            cert: setup.tls.cert_pin.clone(),
        });
        let key = meta::node_key(&meta::NodeRef::new(&setup.me.name, setup.me.id));
        if peer.store.lock().get(&key) != Some(&entry) {
            peer.set(&key, entry);
        }
        tokio::spawn(peer.clone().udp_loop());
        tokio::spawn(peer.clone().timer_loop(timer_rx));
        tokio::spawn(peer.clone().tcp_loop(tcp));
        tokio::spawn(peer.clone().ae_loop());
        peer.announce_known();
        Ok(peer)
    }

    /// The addresses nodes of the cluster listen on.
    fn node_ips(&self) -> HashSet<std::net::IpAddr> {
        meta::nodes(&self.store.lock())
            .iter()
            .filter_map(|(_, n)| n.listen.parse::<SocketAddr>().ok().map(|a| a.ip()))
            .collect()
    }

    pub fn set_data_server(&self, d: Arc<mars_replication::Server>) {
        let _ = self.data.set(d);
    }

    pub fn cluster_id(&self) -> String {
        self.cluster_id.read().clone()
    }

    fn accepts_id(&self, id: &str) -> bool {
        *self.cluster_id.read() == id || self.former_ids.read().iter().any(|f| f == id)
    }

    pub fn is_alive(&self, node: &str) -> bool {
        node == self.me.name || self.alive.lock().contains_key(node)
    }

    pub fn block(&self, nodes: &[String], blocked: bool) {
        let mut b = self.blocked.lock();
        for n in nodes {
            if blocked {
                b.insert(n.clone());
            } else {
                b.remove(n);
            }
        }
    }

    fn is_blocked(&self, node: &str) -> bool {
        self.blocked.lock().contains(node)
    }

    /// Write an entry, disseminate it (cluster-wide: gossip; resource: push to members).
    pub fn set(self: &Arc<Self>, key: &str, value: serde_json::Value) {
        let e = self.cluster.lock().set(key, value);
        self.after_local_change(key, e);
    }

    pub fn delete(self: &Arc<Self>, key: &str) {
        let e = self.cluster.lock().delete(key, now_ms());
        if let Some(e) = e {
            self.after_local_change(key, e);
        }
    }

    fn after_local_change(self: &Arc<Self>, key: &str, e: mars_meta::Entry) {
        // Desired state (what an operator asked) is on disk before the command returns;
        // actual state (reported positions) is saved with the next round.
        if matches!(mars_meta::kind_of(key), Some(mars_meta::Kind::Desired)) {
            self.save();
        } else {
            self.dirty.store(true, Ordering::Release);
        }
        self.trust_changed(&[key]);
        self.changed.notify_waiters();
        self.flush_effects();
        if let Some(res) = key.strip_prefix("r/").and_then(|k| k.split('/').next()) {
            let wire = mars_cluster::to_wire(key, &e);
            let members = self.members_of(res);
            for m in members.into_iter().filter(|m| *m != self.me.name) {
                let p = self.clone();
                let w = wire.clone();
                tokio::spawn(async move {
                    if let Err(e) = p.push_to(&m, vec![w]).await {
                        tracing::debug!(peer = %m, "push failed (anti-entropy will repair): {e}");
                    }
                });
            }
        }
    }

    pub fn members_of(&self, res: &str) -> Vec<String> {
        meta::resource(&self.store.lock(), res)
            .map(|(_, r)| r.members)
            .unwrap_or_default()
    }

    fn addr_of(&self, node: &str) -> Option<String> {
        meta::node(&self.store.lock(), node).map(|(_, n)| n.listen)
    }

    fn flush_effects(self: &Arc<Self>) {
        let (effects, changed) = {
            let mut c = self.cluster.lock();
            (c.take_effects(), c.take_changed())
        };
        if !changed.is_empty() {
            self.on_remote_change(&changed);
        }
        for e in effects {
            match e {
                Effect::Send { to, data } => {
                    if self.is_blocked(&to.name) {
                        continue;
                    }
                    let Some(d) = self.keyring.read().seal(PROTOCOL_VERSION, &data) else {
                        continue;
                    };
                    match self.udp_send.send_to(&d, to.addr) {
                        Ok(n) => GossipCounters::count(
                            &self.gossip.sent_datagrams,
                            &self.gossip.sent_bytes,
                            n,
                        ),
                        Err(e) => tracing::debug!(peer = %to.name, "gossip send: {e}"),
                    }
                }
                Effect::Schedule { timer, after } => {
                    let tx = self.timers.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = tx.send(timer);
                    });
                }
                Effect::Up(id) => {
                    tracing::info!(node = %id.name, "node is up");
                    self.alive
                        .lock()
                        .entry(id.name)
                        .or_default()
                        .insert(id.addr);
                    self.changed.notify_waiters();
                }
                Effect::Down(id) => {
                    tracing::warn!(node = %id.name, "node is down");
                    let mut alive = self.alive.lock();
                    if let Some(addrs) = alive.get_mut(&id.name) {
                        addrs.remove(&id.addr);
                        if addrs.is_empty() {
                            alive.remove(&id.name);
                        }
                    }
                    self.changed.notify_waiters();
                }
            }
        }
    }

    fn on_remote_change(self: &Arc<Self>, keys: &[String]) {
        self.dirty.store(true, Ordering::Release);
        if keys.iter().any(|k| k == meta::CLUSTER_ID_KEY) {
            let id = self
                .store
                .lock()
                .get(meta::CLUSTER_ID_KEY)
                .and_then(|v| v.as_str().map(str::to_string));
            if let Some(id) = id {
                self.adopt_cluster_id(&id);
            }
        }
        self.trust_changed(keys);
        self.changed.notify_waiters();
    }

    /// Trusted CAs or gossip keys changed (here or elsewhere): use them.
    fn trust_changed<K: AsRef<str>>(self: &Arc<Self>, keys: &[K]) {
        // A revocation, or a node's entry deleted (it left: its revocation
        // may come later, or from a node this one does not hear from).
        let left = |k: &str| {
            k.starts_with(meta::NODE_KEY_PREFIX)
                && self
                    .store
                    .lock()
                    .entry(k)
                    .is_some_and(|e| e.value.is_none())
        };
        if keys
            .iter()
            .any(|k| k.as_ref().starts_with(tls::REVOKED_PREFIX) || left(k.as_ref()))
        {
            self.rotate_after_revocation();
        }
        if keys.iter().any(|k| k.as_ref().starts_with(tls::CA_PREFIX)) {
            self.refresh_roots();
        }
        if keys.iter().any(|k| {
            k.as_ref().starts_with(meta::GOSSIP_KEY_PREFIX)
                || k.as_ref() == meta::GOSSIP_PRIMARY_KEY
        }) {
            self.refresh_keyring();
        }
    }

    /// A node left (its revocation arrived): the node that left still holds
    /// the gossip key, so the live node with the smallest name (not revoked)
    /// makes a new key, hands it to every live node over the authenticated
    /// links (keys never travel by gossip), uses it, and after
    /// `ROTATION_GRACE` removes the old ones. A node that was away gets the
    /// new key by anti-entropy.
    fn rotate_after_revocation(self: &Arc<Self>) {
        let me = self.me.name.clone();
        let (live_nodes, revoked_me): (Vec<String>, bool) = {
            let store = self.store.lock();
            let mine = meta::NodeRef::new(&me, self.me.id).token();
            (
                meta::nodes(&store).into_iter().map(|(n, _)| n).collect(),
                store.get(&tls::revoked_key(&mine)).is_some(),
            )
        };
        if revoked_me {
            return;
        }
        let smaller_alive = {
            let alive = self.alive.lock();
            live_nodes.iter().any(|n| *n < me && alive.contains_key(n))
        };
        if smaller_alive || self.rotating.swap(true, Ordering::AcqRel) {
            return;
        }
        let p = self.clone();
        tokio::spawn(async move {
            let key: [u8; mars_proto::gossip::KEY_LEN] = rand::random();
            let id = format!("{:08x}", mars_proto::gossip::key_id(&key));
            let key_entry = format!("{}{id}", meta::GOSSIP_KEY_PREFIX);
            tracing::info!(key = %id, "a node left: rotating the gossip key");
            p.set(
                &key_entry,
                serde_json::Value::String(mars_proto::gossip::key_text(&key)),
            );
            p.push_to_live(&key_entry).await;
            p.set(
                meta::GOSSIP_PRIMARY_KEY,
                serde_json::Value::String(id.clone()),
            );
            p.push_to_live(meta::GOSSIP_PRIMARY_KEY).await;
            tokio::time::sleep(ROTATION_GRACE).await;
            let old: Vec<String> = p
                .store
                .lock()
                .range(meta::GOSSIP_KEY_PREFIX)
                .filter(|(k, e)| *k != key_entry && e.value.is_some())
                .map(|(k, _)| k.to_string())
                .collect();
            for k in old {
                p.delete(&k);
            }
            tracing::info!(key = %id, "gossip key rotated; the old ones are removed");
            p.rotating.store(false, Ordering::Release);
        });
    }

    /// Push the entry of `key` to every live node at once, each for at most
    /// `EXCHANGE_TIMEOUT` (those not reached get it by anti-entropy).
    async fn push_to_live(self: &Arc<Self>, key: &str) {
        self.push_entries_to_live(&[key], usize::MAX).await
    }

    /// Push the entries of `keys` in one message to at most `max` live nodes
    /// (chosen at random) at once, each for at most `EXCHANGE_TIMEOUT`.
    pub async fn push_entries_to_live(self: &Arc<Self>, keys: &[&str], max: usize) {
        use rand::seq::SliceRandom;
        let wire: Vec<WireEntry> = {
            let store = self.store.lock();
            keys.iter()
                .filter_map(|k| store.entry(k).map(|e| mars_cluster::to_wire(k, e)))
                .collect()
        };
        if wire.is_empty() {
            return;
        }
        let mut live: Vec<String> = self.alive.lock().keys().cloned().collect();
        live.shuffle(&mut rand::rng());
        live.truncate(max);
        let mut pushes = tokio::task::JoinSet::new();
        for n in live {
            let (p, wire) = (self.clone(), wire.clone());
            pushes.spawn(async move {
                let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, p.push_to(&n, wire)).await;
            });
        }
        pushes.join_all().await;
    }

    /// Seal and open gossip with the keys the metadata lists.
    pub fn refresh_keyring(&self) {
        let ring = {
            let store = self.store.lock();
            let keys: Vec<[u8; mars_proto::gossip::KEY_LEN]> = store
                .range(meta::GOSSIP_KEY_PREFIX)
                .filter_map(|(_, e)| mars_proto::gossip::parse_key(e.value.as_ref()?.as_str()?))
                .collect();
            let primary = store
                .get(meta::GOSSIP_PRIMARY_KEY)
                .and_then(|v| v.as_str())
                .and_then(|h| u32::from_str_radix(h, 16).ok());
            (Keyring::new(keys, primary), primary.is_some())
        };
        let (ring, named) = ring;
        if ring.ids().is_empty() && !self.keyring.read().ids().is_empty() {
            // Every key deleted (no command does that: the key in use cannot
            // be removed): keep the keys held so far rather than fall silent.
            tracing::error!("the metadata lists no gossip key: keeping the keys held so far (`marsadm keyring install` one)");
            return;
        }
        let ring = if named && ring.primary().is_none() {
            // A primary key this node does not hold (not arrived yet, or
            // named by a member that holds it alone): keep sealing with the
            // key used so far if it is still installed, else with any
            // installed key, rather than falling silent (every node would
            // see every other down, and replication would stop).
            let before = self.keyring.read().primary();
            let fallback = before
                .filter(|p| ring.ids().contains(p))
                .or_else(|| ring.ids().first().copied());
            tracing::error!(
                fallback = ?fallback.map(|id| format!("{id:08x}")),
                "the gossip key in use is not installed here: gossip is sealed with the key used before until it is (`marsadm keyring list`)"
            );
            match fallback {
                Some(id) => ring.with_primary(id),
                None => ring,
            }
        } else {
            ring
        };
        *self.keyring.write() = Arc::new(ring);
    }

    /// The gossip keys this node holds, and the one in use.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.read().clone()
    }

    /// Trust the CAs the metadata lists (this cluster's, and those of
    /// clusters merged into it).
    pub fn refresh_roots(&self) {
        // Only an entry whose key is its certificate's pin (a pasted-in
        // certificate under another key is ignored).
        let pems: Vec<String> = self
            .store
            .lock()
            .range(tls::CA_PREFIX)
            .filter_map(|(k, e)| {
                let pem = e.value.as_ref()?.as_str()?;
                let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
                (tls::ca_key_of(&tls::pin_of(&der)) == k).then(|| pem.to_string())
            })
            .collect();
        if let Err(e) = self.tls.set_roots(pems) {
            tracing::error!("a trusted CA in the metadata is damaged: {e:#}");
        }
    }

    /// A certificate's identity may talk to this node: it is not revoked
    /// (`leave-cluster`), and it is the node expected (`expect`, the node
    /// this connection was opened to) with the id the metadata knows.
    /// The certificate `der` (chained to a trusted CA by rustls) may talk
    /// to this node: the node it names is not revoked, is a live node of the
    /// metadata whose entry names exactly this certificate (a certificate
    /// minted with a CA key for a live node or a new one gets nowhere), and
    /// is the node expected (`expect`, the node this connection was opened
    /// to). Returns the identity.
    fn check_identity(&self, der: &[u8], expect: Option<&str>) -> Result<(String, meta::NodeRef)> {
        let ident = tls::identity(der)?;
        let r = meta::NodeRef::parse(&ident)
            .ok_or_else(|| anyhow!("certificate names no node ({ident})"))?;
        let store = self.store.lock();
        let left = store
            .entry(&meta::node_key(&r))
            .is_some_and(|e| e.value.is_none());
        if left || store.get(&tls::revoked_key(&ident)).is_some() {
            bail!("{ident} left the cluster: its certificate is revoked");
        }
        if let Some(n) = expect {
            if r.name != n {
                bail!("the address of {n} answered with the certificate of {ident}");
            }
        }
        // A node the cluster admitted: the node that invited it records its
        // entry (with its certificate) before it hands the certificate out,
        // and the entry reaches the others by gossip and anti-entropy. Until
        // it has, the newcomer is let in only while the sealed gossip shows
        // it alive (a broadcast can be missed, and a node cut off from the
        // one that admitted it learns the entry from the newcomer itself).
        // A certificate of the CA alone is not enough: every node holds the
        // CA key, so one that left could mint one for a new name (and it
        // loses the gossip key when it leaves).
        match meta::get::<NodeEntry>(&store, &meta::node_key(&r)) {
            Some(entry) if entry.cert != tls::pin_of(der) => {
                bail!("the certificate of {ident} is not the one the cluster recorded for it")
            }
            Some(_) => {}
            // The gossip knows nodes by name only: a live name recorded for
            // another identity (a certificate minted for `NAME@<other id>`)
            // is not this one.
            None if meta::node(&store, &r.name).is_some() => bail!(
                "{ident} is not a node of this cluster: the cluster records {} under another identity",
                r.name
            ),
            None if self.alive.lock().contains_key(&r.name) => {}
            None => bail!(
                "{ident} is not a node of this cluster here (no entry for it, and the gossip does not show it: it was never admitted, or its admission has not arrived yet)"
            ),
        }
        Ok((ident, r))
    }

    /// Switch to another cluster id (after a merge), keeping the old one acceptable.
    fn adopt_cluster_id(&self, id: &str) {
        let old = self.cluster_id();
        if old == id {
            return;
        }
        tracing::info!(from = %old, to = %id, "cluster merged: adopting cluster id");
        self.former_ids.write().push(old);
        *self.cluster_id.write() = id.to_string();
        if let Err(e) = crate::node::update_cluster_id(&self.node_file, id, &self.former_ids.read())
        {
            tracing::error!("cannot persist the new cluster id: {e:#}");
        }
    }

    /// Announce to up to `max` of these nodes, chosen at random.
    fn announce_to(self: &Arc<Self>, names: &[String], max: usize) {
        use rand::seq::SliceRandom;
        let mut targets: Vec<NodeId> = {
            let st = self.store.lock();
            names
                .iter()
                .filter_map(|n| {
                    let (_, e) = meta::node(&st, n)?;
                    Some(NodeId {
                        name: n.clone(),
                        addr: e.listen.parse().ok()?,
                        bump: 0,
                    })
                })
                .collect()
        };
        targets.shuffle(&mut rand::rng());
        targets.truncate(max);
        if targets.is_empty() {
            return;
        }
        {
            let mut c = self.cluster.lock();
            for t in targets {
                c.announce(t);
            }
        }
        self.flush_effects();
    }

    fn announce_known(self: &Arc<Self>) {
        let nodes = meta::nodes(&self.store.lock());
        let mut targets: Vec<NodeId> = nodes
            .into_iter()
            .filter(|(n, _)| *n != self.me.name)
            .filter_map(|(name, e)| {
                Some(NodeId {
                    name,
                    addr: e.listen.parse().ok()?,
                    bump: 0,
                })
            })
            .collect();
        // A few are enough: foca spreads the rest.
        use rand::seq::SliceRandom;
        targets.shuffle(&mut rand::rng());
        targets.truncate(3);
        {
            let mut c = self.cluster.lock();
            for t in targets {
                c.announce(t);
            }
        }
        self.flush_effects();
    }

    async fn udp_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = match self.udp.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("gossip recv: {e}");
                    continue;
                }
            };
            let ring = self.keyring();
            let payload = match ring.open(PROTOCOL_VERSION, &buf[..n]) {
                Ok(p) => {
                    GossipCounters::count(
                        &self.gossip.received_datagrams,
                        &self.gossip.received_bytes,
                        n,
                    );
                    p
                }
                Err(why) => {
                    self.gossip
                        .dropped_datagrams
                        .fetch_add(1, Ordering::Relaxed);
                    let mut w = self.warned.lock();
                    if w.len() >= WARNED_MAX {
                        w.clear();
                    }
                    if w.insert(from) {
                        tracing::warn!(%from, ?why, "dropping gossip datagram: not sealed with a key of this cluster's keyring (another cluster, another version, a key not installed here, or forged)");
                    }
                    continue;
                }
            };
            self.cluster.lock().handle_gossip(&payload);
            self.flush_effects();
        }
    }

    async fn timer_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<FocaTimer<NodeId>>) {
        while let Some(t) = rx.recv().await {
            self.cluster.lock().handle_timer(t);
            self.flush_effects();
        }
    }

    async fn ae_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(AE_INTERVAL);
        loop {
            tick.tick().await;
            let live: Vec<String> = self.alive.lock().keys().cloned().collect();
            let known: Vec<String> = meta::nodes(&self.store.lock())
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| *n != self.me.name)
                .collect();
            // One random live node (or, when none is known alive, one known node) for the cluster scope.
            // Nodes we know of but do not see alive: announce to a couple of them each round
            // (a lost announce or a missed membership update must not keep a node out for long).
            let missing: Vec<String> = known
                .iter()
                .filter(|n| !live.contains(n))
                .cloned()
                .collect();
            self.announce_to(&missing, mars_cluster::repair_announces(missing.len()));
            // Retransmissions and suspicion timeouts follow the cluster's size.
            let size = known.len() as u32 + 1;
            if size != self.size_hint.swap(size, Ordering::AcqRel) {
                let cfg = ClusterConfig {
                    size_hint: size,
                    ..ClusterConfig::default()
                };
                self.cluster.lock().set_size_hint(&cfg);
            }
            let pool = if live.is_empty() { known } else { live.clone() };
            if let Some(n) = pick(&pool) {
                let p = self.clone();
                tokio::spawn(async move { p.ae_with(&n, "c/").await });
            }
            let resources = meta::all_incarnations(&self.store.lock());
            for (res, r) in resources {
                // Members repair among themselves; a non-member that wrote an entry of the
                // resource (e.g. `primary` issued there) keeps offering it to a member.
                let wrote_here = || {
                    self.store
                        .lock()
                        .range(&meta::res_prefix(&res))
                        .any(|(_, e)| e.stamp.node == self.me.name)
                };
                if !r.members.contains(&self.me.name) && !wrote_here() {
                    continue;
                }
                let others: Vec<String> = r
                    .members
                    .iter()
                    .filter(|m| **m != self.me.name)
                    .cloned()
                    .collect();
                if let Some(n) = pick(&others) {
                    let p = self.clone();
                    let prefix = meta::res_prefix(&res);
                    tokio::spawn(async move { p.ae_with(&n, &prefix).await });
                }
            }
            // Tombstones are kept long enough for every node that was away to hear of them.
            if self.store.lock().gc_tombstones(now_ms(), TOMBSTONE_KEEP_MS) > 0 {
                self.dirty.store(true, Ordering::Release);
            }
            if self.dirty.swap(false, Ordering::AcqRel) {
                self.save();
            }
        }
    }

    pub fn save(&self) {
        let r = self.store.lock().save(&self.store_path);
        if let Err(e) = r {
            tracing::error!("cannot save metadata: {e}");
            self.dirty.store(true, Ordering::Release);
        }
    }

    fn backoff_ok(&self, node: &str) -> bool {
        self.backoff
            .lock()
            .get(node)
            .is_none_or(|(until, _)| Instant::now() >= *until)
    }

    fn note_result(&self, node: &str, ok: bool) {
        let mut b = self.backoff.lock();
        if ok {
            b.remove(node);
        } else {
            let next = b
                .get(node)
                .map(|(_, d)| (*d * 2).min(Duration::from_secs(30)))
                .unwrap_or(Duration::from_millis(500));
            b.insert(node.to_string(), (Instant::now() + next, next));
        }
    }

    /// Open a connection to `node`, authenticate both sides, and complete
    /// the handshake.
    pub(crate) async fn connect(&self, node: &str) -> Result<PeerStream> {
        if self.is_blocked(node) {
            bail!("{node} is blocked (debug-block)");
        }
        let addr = self
            .addr_of(node)
            .ok_or_else(|| anyhow!("unknown node {node}"))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| anyhow!("connect to {node} ({addr}) timed out"))?
            .with_context(|| format!("connect to {node} ({addr})"))?;
        tune_stream(&tcp, true);
        let connector = tokio_rustls::TlsConnector::from(self.tls.client());
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(tls::server_name(), tcp),
        )
        .await
        .map_err(|_| anyhow!("TLS handshake with {node} ({addr}) timed out"))?
        .with_context(|| format!("TLS handshake with {node} ({addr})"))?;
        let der = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| anyhow!("{node} ({addr}) showed no certificate"))?;
        self.check_identity(der, Some(node))
            .with_context(|| format!("{node} ({addr})"))?;
        let mut s = PeerStream::Client(tls);
        let id = self.cluster_id();
        tokio::time::timeout(
            EXCHANGE_TIMEOUT,
            client_handshake(&mut s, Some(&id), &self.me),
        )
        .await
        .map_err(|_| anyhow!("handshake with {node} timed out"))??;
        Ok(s)
    }

    /// Run an exchange where both sides answer with `ae::respond` until one has nothing to say.
    async fn converse(self: &Arc<Self>, node: &str, first: Msg) -> Result<Vec<String>> {
        let mut s = self.connect(node).await?;
        let mut changed = Vec::new();
        let mut next = Some(first);
        let fut = async {
            while let Some(m) = next.take() {
                write_msg(&mut s, &m).await?;
                if matches!(m, Msg::Entries { ref want, .. } if want.is_empty()) {
                    break; // the last step of anti-entropy: nothing comes back
                }
                let reply = read_msg(&mut s).await?;
                if let Msg::Refused { reason } = reply {
                    bail!("refused: {reason}");
                }
                let (n, merge) = ae::respond(&self.store.lock(), reply);
                changed.extend(self.merge(node, merge));
                next = n;
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("exchange with {node} timed out"))??;
        Ok(changed)
    }

    /// Merge entries from peer `from` (only what `schema::admissible` admits).
    fn merge(self: &Arc<Self>, from: &str, entries: Vec<WireEntry>) -> Vec<String> {
        if entries.is_empty() {
            return Vec::new();
        }
        let changed = self.cluster.lock().merge_entries_from(from, entries);
        if !changed.is_empty() {
            self.on_remote_change(&changed);
        }
        self.flush_effects();
        changed
    }

    pub async fn ae_with(self: &Arc<Self>, node: &str, prefix: &str) {
        if !self.backoff_ok(node) {
            return;
        }
        let first = ae::start(&self.store.lock(), prefix);
        let r = self.converse(node, first).await;
        if let Err(e) = &r {
            tracing::debug!(peer = %node, prefix, "anti-entropy: {e:#}");
        }
        self.note_result(node, r.is_ok());
    }

    /// Anti-entropy with `node` now, whatever its connection backoff (a
    /// command waits for the answer), and whether it was completed.
    pub async fn ae_now(self: &Arc<Self>, node: &str, prefix: &str) -> Result<()> {
        let first = ae::start(&self.store.lock(), prefix);
        let r = self.converse(node, first).await.map(|_| ());
        self.note_result(node, r.is_ok());
        r
    }

    pub async fn push_to(self: &Arc<Self>, node: &str, entries: Vec<WireEntry>) -> Result<()> {
        self.converse(node, Msg::Push { entries }).await.map(|_| ())
    }

    /// Fetch everything under `prefix` from `node` (a non-member asking about a resource).
    pub async fn pull_from(self: &Arc<Self>, node: &str, prefix: &str) -> Result<()> {
        self.converse(
            node,
            Msg::Pull {
                prefix: prefix.to_string(),
            },
        )
        .await
        .map(|_| ())
    }

    async fn tcp_loop(self: Arc<Self>, listener: TcpListener) {
        // A cap on peer connections served at once: idle connections from
        // anyone must not take every file descriptor of the process (a log
        // rotation needs one).
        // Two pools: addresses some node listens on, and all others, so that
        // strangers cannot take the slots nodes need (issue 17 authenticates
        // the nodes themselves).
        let node_slots = Arc::new(tokio::sync::Semaphore::new(MAX_NODE_CONNECTIONS));
        let other_slots = Arc::new(tokio::sync::Semaphore::new(MAX_OTHER_CONNECTIONS));
        let per_ip: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
        let (mut refused, mut last_warned) = (0u64, None::<Instant>);
        let mut known: (Option<Instant>, HashSet<std::net::IpAddr>) = (None, HashSet::new());
        loop {
            match listener.accept().await {
                Ok((s, from)) => {
                    if known
                        .0
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
                    {
                        known = (Some(Instant::now()), self.node_ips());
                    }
                    let is_node = known.1.contains(&from.ip());
                    // One address (an IPv6 /64) holds a share of its pool only.
                    let (cap, pool) = if is_node {
                        (MAX_PER_NODE_IP, &node_slots)
                    } else {
                        (MAX_PER_OTHER_IP, &other_slots)
                    };
                    let who = address_group(from.ip());
                    let ip_slot = {
                        let mut m = per_ip.lock();
                        let n = m.entry(who).or_insert(0);
                        (*n < cap).then(|| {
                            *n += 1;
                            IpSlot(per_ip.clone(), who)
                        })
                    };
                    let slot =
                        ip_slot.and_then(|i| pool.clone().try_acquire_owned().ok().map(|s| (s, i)));
                    let Some(slot) = slot else {
                        refused += 1;
                        if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            last_warned = Some(Instant::now());
                            tracing::warn!(%from, refused, "refusing peer connections: too many open from this address or in all");
                        }
                        drop(s);
                        continue;
                    };
                    let p = self.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        // No limit on the whole connection: a full sync streams for
                        // as long as the disk takes. Silent peers end by the idle
                        // timeout and the keepalive (`tune_stream`).
                        if let Err(e) = p.serve(s).await {
                            if let Some(suppressed) = CONN_LOG.admit() {
                                if suppressed > 0 {
                                    tracing::info!(suppressed, "peer connection errors not logged in the last {CONN_LOG_PERIOD:?}");
                                }
                                tracing::info!(%from, "peer connection: {e:#}");
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("peer accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve(self: &Arc<Self>, tcp: TcpStream) -> Result<()> {
        tune_stream(&tcp, false);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.server());
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| anyhow!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}"))?
            .context("TLS handshake")?;
        let checked = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| self.check_identity(c, None));
        let mut s = PeerStream::Server(tls);
        let Some(checked) = checked else {
            return self.serve_unauthenticated(s).await;
        };
        let (ident, cert_node) = match checked {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("refusing peer: {e:#}");
                let _ = write_msg(
                    &mut s,
                    &Msg::Refused {
                        reason: format!("{e:#}"),
                    },
                )
                .await;
                return Err(e);
            }
        };
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_msg(&mut s))
            .await
            .map_err(|_| anyhow!("no Hello within {HANDSHAKE_TIMEOUT:?}"))?
            .context("handshake")?;
        let Msg::Hello {
            version,
            cluster_id,
            node,
        } = hello
        else {
            write_msg(
                &mut s,
                &Msg::Refused {
                    reason: "expected Hello".into(),
                },
            )
            .await?;
            bail!("peer did not start with Hello");
        };
        let refusal = if version != PROTOCOL_VERSION {
            Some(format!(
                "protocol version {version} not supported (this node speaks {PROTOCOL_VERSION}): run the same mars release on every node of the cluster"
            ))
        } else if node.name != cert_node.name || node.id != cert_node.id {
            Some(format!(
                "the Hello names {}@{:016x}, the certificate {ident}",
                node.name, node.id
            ))
        } else if cluster_id.as_deref().is_none_or(|id| !self.accepts_id(id)) {
            Some(format!(
                "{ident} belongs to another cluster ({})",
                cluster_id.as_deref().unwrap_or("none")
            ))
        } else if self.is_blocked(&node.name) {
            Some("blocked (debug-block)".to_string())
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::warn!(peer = %node.name, "refusing peer: {reason}");
            let _ = write_msg(
                &mut s,
                &Msg::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
            bail!("refused {}: {reason}", node.name);
        }
        let ours = self.cluster_id();
        write_msg(
            &mut s,
            &Msg::Welcome {
                cluster_id: ours.clone(),
                node: self.me.name.clone(),
            },
        )
        .await?;
        loop {
            // A peer that says nothing for this long is gone (one that went silent
            // within a data stream is caught by the socket's keepalive).
            let next = tokio::time::timeout(IDLE_TIMEOUT, read_msg(&mut s)).await;
            let Ok(next) = next else {
                bail!("{} sent nothing for {IDLE_TIMEOUT:?}", node.name);
            };
            let msg = match next {
                Ok(m) => m,
                Err(mars_proto::ProtoError::Io(e))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    return Ok(())
                }
                Err(e) => bail!("from {}: {e}", node.name),
            };
            // A cut made while the connection was open (fetchers keep theirs
            // between rounds) ends it at the next request, as a real cut would.
            if self.is_blocked(&node.name) {
                bail!("{} is blocked (debug-block)", node.name);
            }
            // A revocation (or the node's entry deleted) that arrived while
            // the connection was open ends it too, not only the next handshake.
            {
                let store = self.store.lock();
                let left = store
                    .entry(&meta::node_key(&cert_node))
                    .is_some_and(|e| e.value.is_none());
                if left || store.get(&tls::revoked_key(&ident)).is_some() {
                    bail!(
                        "{ident} left the cluster: its certificate is revoked (connection ended)"
                    );
                }
            }
            let reply = match msg {
                m @ (Msg::Digest { .. }
                | Msg::Buckets { .. }
                | Msg::Entries { .. }
                | Msg::Push { .. }
                | Msg::Pull { .. }) => {
                    let (reply, merge) = ae::respond(&self.store.lock(), m);
                    self.merge(&node.name, merge);
                    match reply {
                        Some(r) => r,
                        None => return Ok(()),
                    }
                }
                m @ (Msg::SyncStart { .. }
                | Msg::LogStatus { .. }
                | Msg::SyncEnd { .. }
                | Msg::SyncBlock { .. }
                | Msg::LogList { .. }
                | Msg::Fetch { .. }
                | Msg::Freeze { .. }
                | Msg::FrozenRead { .. }
                | Msg::FrozenRepair { .. }
                | Msg::FrozenCorrect { .. }
                | Msg::Thaw { .. }) => {
                    let Some(d) = self.data.get().cloned() else {
                        write_msg(
                            &mut s,
                            &Msg::Refused {
                                reason: "not ready".into(),
                            },
                        )
                        .await?;
                        continue;
                    };
                    d.serve_data(m, &mut s, &node.name).await?;
                    continue;
                }
                m => {
                    let reason = format!("unexpected message {}", msg_name(&m));
                    tracing::warn!(peer = %node.name, "refusing peer: {reason}");
                    write_msg(
                        &mut s,
                        &Msg::Refused {
                            reason: reason.clone(),
                        },
                    )
                    .await?;
                    bail!("{reason}");
                }
            };
            write_msg(&mut s, &reply).await?;
        }
    }

    /// A connection without a certificate: it may redeem one invitation
    /// token (join, or merge), in frames of at most `PREAUTH_MAX_FRAME`
    /// bytes, and learns nothing before the token is accepted.
    async fn serve_unauthenticated(self: &Arc<Self>, mut s: PeerStream) -> Result<()> {
        let first = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            read_msg_max(&mut s, tls::PREAUTH_MAX_FRAME),
        )
        .await
        .map_err(|_| anyhow!("unauthenticated peer sent nothing within {HANDSHAKE_TIMEOUT:?}"))?
        .context("unauthenticated peer")?;
        let refuse = |reason: String| Msg::Refused { reason };
        match first {
            Msg::Join {
                token_id,
                secret,
                node,
                public_key,
            } => {
                let reply = match self.admit_joiner(&token_id, &secret, &node, &public_key) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(joiner = %node.name, "refusing a join: {e:#}");
                        refuse(format!("{e:#}"))
                    }
                };
                write_msg(&mut s, &reply).await?;
                Ok(())
            }
            Msg::MergeToken {
                token_id,
                secret,
                node,
            } => {
                let now = now_ms();
                if let Err(e) =
                    self.tls
                        .invites()
                        .redeem(&token_id, &secret, InviteKind::Merge, now)
                {
                    tracing::warn!(peer = %node.name, "refusing a merge: {e:#}");
                    write_msg(&mut s, &refuse(format!("{e:#}"))).await?;
                    return Ok(());
                }
                write_msg(&mut s, &Msg::Ok).await?;
                let next = tokio::time::timeout(EXCHANGE_TIMEOUT, read_msg(&mut s))
                    .await
                    .map_err(|_| anyhow!("{} sent no Merge", node.name))??;
                let Msg::Merge {
                    cluster_id,
                    entries,
                } = next
                else {
                    bail!(
                        "{} sent {} after its merge token",
                        node.name,
                        msg_name(&next)
                    );
                };
                let reply = self.handle_merge(&node, cluster_id, entries);
                write_msg(&mut s, &reply).await?;
                Ok(())
            }
            other => {
                let reason = "authenticate first: this node talks only to nodes of its cluster (a certificate), or to the holder of a token from `marsadm invite`".to_string();
                let _ = write_msg(&mut s, &refuse(reason)).await;
                bail!("unauthenticated peer sent {}: refused", msg_name(&other))
            }
        }
    }

    /// Check a joiner, use up its token, record it, and certify its key.
    fn admit_joiner(
        self: &Arc<Self>,
        token_id: &str,
        secret: &str,
        node: &NodeInfo,
        public_key: &[u8],
    ) -> Result<Msg> {
        // The token first: who holds none learns nothing of the cluster
        // (not which node names or ids exist or left).
        self.tls
            .invites()
            .check(token_id, secret, InviteKind::Join, now_ms())?;
        crate::node::check_name("node", &node.name)
            .map_err(|_| anyhow!("invalid node name {:?}", node.name))?;
        crate::node::check_addr("--listen", &node.listen)?;
        crate::node::check_addr("--nbd", &node.nbd)?;
        if node.id == 0 {
            bail!("{} has no node id (a tool of another version?)", node.name);
        }
        if meta::node(&self.store.lock(), &node.name).is_some() {
            bail!("a node named {} is already in the cluster", node.name);
        }
        let token = meta::NodeRef::new(&node.name, node.id).token();
        if self.store.lock().get(&tls::revoked_key(&token)).is_some() {
            bail!("{token} left the cluster before; join with a new node id");
        }
        self.tls
            .invites()
            .redeem(token_id, secret, InviteKind::Join, now_ms())?;
        let ca_key = self.tls.ca_key_pem()?;
        let cert = tls::issue(&self.tls.ca_pem, &ca_key, &token, public_key)?;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
            .map_err(|e| anyhow!("the certificate just made is damaged: {e:?}"))?;
        self.set(
            &meta::node_key(&meta::NodeRef::new(&node.name, node.id)),
            meta::to_value(&NodeEntry {
                listen: node.listen.clone(),
                nbd: node.nbd.clone(),
                cert: tls::pin_of(&der),
            }),
        );
        self.save();
        tracing::info!(node = %node.name, listen = %node.listen, "node joined the cluster");
        Ok(Msg::Joined {
            cluster_id: self.cluster_id(),
            entries: self.cluster_entries(),
            cert,
            ca_cert: self.tls.ca_pem.clone(),
            ca_key,
        })
    }

    fn cluster_entries(&self) -> Vec<WireEntry> {
        self.store
            .lock()
            .range("c/")
            .map(|(k, e)| mars_cluster::to_wire(k, e))
            .collect()
    }

    /// Another cluster asks to merge into its cluster (`cluster_id`): adopt it if no resource or node name clashes.
    fn handle_merge(
        self: &Arc<Self>,
        from: &NodeInfo,
        cluster_id: String,
        entries: Vec<WireEntry>,
    ) -> Msg {
        let mut theirs = Store::new("_");
        let top = entries.iter().map(|w| w.clock).max().unwrap_or(0);
        theirs.trust_clock(top);
        for w in &entries {
            let (k, e) = mars_cluster::from_wire(w.clone());
            theirs.merge(&k, e);
        }
        // Names, not ids, decide a clash: two live resources of one name
        // cannot both be served. Entries of other incarnations (tombstones
        // of deleted ones among them) name their ids and touch nothing live.
        let live_names = |st: &Store| -> Vec<String> {
            meta::all_incarnations(st)
                .into_iter()
                .map(|(r, _)| r.name)
                .collect()
        };
        let (our_res, our_nodes) = {
            let st = self.store.lock();
            (live_names(&st), meta::nodes(&st))
        };
        let mut clash: Vec<String> = live_names(&theirs)
            .into_iter()
            .filter(|n| our_res.contains(n))
            .collect();
        clash.dedup();
        if !clash.is_empty() {
            return Msg::Refused {
                reason: format!(
                    "resource names exist in both clusters: {}",
                    clash.join(", ")
                ),
            };
        }
        let node_clash: Vec<String> = meta::nodes(&theirs)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| our_nodes.iter().any(|(o, _)| o == n))
            .collect();
        if !node_clash.is_empty() {
            return Msg::Refused {
                reason: format!(
                    "node names exist in both clusters: {}",
                    node_clash.join(", ")
                ),
            };
        }
        tracing::info!(peer = %from.name, into = %cluster_id, "merging this cluster into another");
        self.store.lock().trust_clock(top);
        self.merge(&from.name, entries);
        self.set(
            meta::CLUSTER_ID_KEY,
            serde_json::Value::String(cluster_id.clone()),
        );
        self.adopt_cluster_id(&cluster_id);
        self.save();
        if let Ok(addr) = from.listen.parse() {
            self.cluster.lock().announce(NodeId {
                name: from.name.clone(),
                addr,
                bump: 0,
            });
            self.flush_effects();
        }
        Msg::Merged {
            cluster_id,
            entries: self.cluster_entries(),
        }
    }

    /// `merge-cluster --token TOKEN PEER`: bring the peer's whole cluster
    /// into this one (the token is from `invite --merge` on the peer's side).
    pub async fn merge_cluster(self: &Arc<Self>, peer_addr: &str, token: &str) -> Result<String> {
        let token = Token::parse(token)?;
        let mut s = pinned_connect(peer_addr, &token).await?;
        let their_node = tls_peer_identity(&s)?;
        let ours = self.cluster_id();
        let exchange = async {
            write_msg(
                &mut s,
                &Msg::MergeToken {
                    token_id: token.id.clone(),
                    secret: token.secret.clone(),
                    node: self.me.clone(),
                },
            )
            .await?;
            match read_msg(&mut s).await? {
                Msg::Ok => {}
                Msg::Refused { reason } => bail!("{peer_addr} refused the merge: {reason}"),
                other => bail!("{peer_addr} answered {}", msg_name(&other)),
            }
            write_msg(
                &mut s,
                &Msg::Merge {
                    cluster_id: ours.clone(),
                    entries: self.cluster_entries(),
                },
            )
            .await?;
            anyhow::Ok((their_node, read_msg(&mut s).await?))
        };
        let (their_node, answer) = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                anyhow!("{peer_addr} did not answer the merge within {EXCHANGE_TIMEOUT:?}")
            })??;
        match answer {
            Msg::Merged { entries, .. } => {
                let top = entries.iter().map(|w| w.clock).max().unwrap_or(0);
                self.store.lock().trust_clock(top);
                self.merge(peer_addr, entries);
                self.refresh_roots();
                self.save();
                self.announce_known();
                Ok(their_node)
            }
            Msg::Refused { reason } => bail!("{peer_addr} refused the merge: {reason}"),
            other => bail!("{peer_addr} answered {}", msg_name(&other)),
        }
    }
}

fn msg_name(m: &Msg) -> String {
    format!("{m:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or("?")
        .to_string()
}

fn pick(v: &[String]) -> Option<String> {
    use rand::seq::IndexedRandom;
    v.choose(&mut rand::rng()).cloned()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What `join-cluster` receives: the cluster, and this node's TLS material.
pub struct JoinedCluster {
    pub cluster_id: String,
    pub entries: Vec<WireEntry>,
    pub cert: String,
    pub key: String,
    pub ca_cert: String,
    pub ca_key: String,
}

/// TCP and TLS to `peer_addr`, trusting only the CA the token pins.
async fn pinned_connect(peer_addr: &str, token: &Token) -> Result<PeerStream> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer_addr))
        .await
        .map_err(|_| anyhow!("connect to {peer_addr} timed out"))?
        .with_context(|| format!("cannot reach {peer_addr}"))?;
    let connector = tokio_rustls::TlsConnector::from(tls::pinned_client(&token.pin)?);
    let s = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connector.connect(tls::server_name(), tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS handshake with {peer_addr} timed out"))?
    .with_context(|| format!("{peer_addr} is not a node of the cluster the token names"))?;
    Ok(PeerStream::Client(s))
}

/// The node name the certificate of the other side of `s` names.
fn tls_peer_identity(s: &PeerStream) -> Result<String> {
    let c = match s {
        PeerStream::Client(c) => c.get_ref().1.peer_certificates(),
        PeerStream::Server(c) => c.get_ref().1.peer_certificates(),
    };
    let ident = tls::identity(
        c.and_then(|c| c.first())
            .ok_or_else(|| anyhow!("the peer showed no certificate"))?,
    )?;
    Ok(meta::NodeRef::parse(&ident)
        .map(|r| r.name)
        .unwrap_or(ident))
}

/// `marsadm join-cluster --token TOKEN PEER`: ask a running node to admit
/// this node; returns the cluster and this node's certificate.
pub async fn join(peer_addr: &str, me: &NodeInfo, token: &str) -> Result<JoinedCluster> {
    let token = Token::parse(token)?;
    let mut s = pinned_connect(peer_addr, &token).await?;
    let (key, public_key) = tls::new_key()?;
    write_msg(
        &mut s,
        &Msg::Join {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            node: me.clone(),
            public_key,
        },
    )
    .await?;
    match tokio::time::timeout(EXCHANGE_TIMEOUT, read_msg(&mut s))
        .await
        .map_err(|_| anyhow!("{peer_addr} did not answer"))??
    {
        Msg::Joined {
            cluster_id,
            entries,
            cert,
            ca_cert,
            ca_key,
        } => {
            let want = meta::NodeRef::new(&me.name, me.id).token();
            let got = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
                .map_err(|e| anyhow!("{peer_addr} sent a damaged certificate: {e:?}"))
                .and_then(|c| tls::identity(&c))?;
            if got != want {
                bail!("{peer_addr} certified {got}, not {want}");
            }
            let ca = rustls::pki_types::CertificateDer::from_pem_slice(ca_cert.as_bytes())
                .map_err(|e| anyhow!("{peer_addr} sent a damaged CA: {e:?}"))?;
            if tls::pin_of(&ca) != token.pin {
                bail!("{peer_addr} sent another CA than the token names");
            }
            Ok(JoinedCluster {
                cluster_id,
                entries,
                cert,
                key,
                ca_cert,
                ca_key,
            })
        }
        Msg::Refused { reason } => bail!("{peer_addr} refused: {reason}"),
        other => bail!("{peer_addr} answered {}", msg_name(&other)),
    }
}
