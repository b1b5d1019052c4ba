//! Desired state, actual state, and the control loop converging one to the other.
//!
//! Commands change *desired* state (Lamport-stamped metadata entries, see
//! `crate::meta`, disseminated to the cluster by `crate::peer`) and then run
//! the same [`Daemon::reconcile`] step that the periodic loop runs, so the
//! command returns the outcome. Only `reconcile` opens, exports, unexports and
//! closes transaction loggers (the *actual* state); it holds the state lock,
//! so commands and the loop never interleave.

use crate::meta::{self, ActualEntry, MemberEntry, ResEntry, ResRef};
use crate::node::{self, NodeConfig, ResourceConfig};
use crate::peer::Peer;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use mars_api::{
    ClusterView, LogView, MemberView, NodeView, PauseKind, PausedView, Request, ResourceView,
    Response, SyncView, View,
};
use mars_logger::{Config as LoggerConfig, Logger, Status};
use mars_nbd::{BoxFut, Export, Registry};
use mars_proto::{read_msg, write_msg, Msg};
use mars_replication::{policy, LagClock, Progress, Secondary, Served, ServedSecondary};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A transaction logger served as an NBD export.
pub struct LoggerExport {
    logger: Arc<Logger>,
    open: AtomicBool,
    /// The device's NBD request statistics (kept across re-exports).
    stats: Arc<mars_nbd::DeviceStats>,
}

fn gone() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "device is no longer served here",
    )
}

impl LoggerExport {
    fn check(&self) -> std::io::Result<()> {
        if self.open.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(gone())
        }
    }
}

impl Export for LoggerExport {
    fn size(&self) -> u64 {
        self.logger.size()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFut<std::io::Result<Bytes>> {
        if let Err(e) = self.check() {
            return Box::pin(std::future::ready(Err(e)));
        }
        // Served right here when the log's index or the page cache holds the data;
        // only a read that would wait for the device goes to a blocking thread.
        if let Some(r) = self.logger.try_read_nonblocking(offset, len as u64) {
            return Box::pin(std::future::ready(r));
        }
        let logger = self.logger.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || logger.read(offset, len as u64))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFut<std::io::Result<()>> {
        let logger = self.logger.clone();
        let open = self.check();
        Box::pin(async move {
            open?;
            logger.write(offset, data, fua).await
        })
    }
    fn flush(&self) -> BoxFut<std::io::Result<()>> {
        let logger = self.logger.clone();
        let open = self.check();
        Box::pin(async move {
            open?;
            logger.flush().await
        })
    }
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFut<std::io::Result<()>> {
        let logger = self.logger.clone();
        let open = self.check();
        Box::pin(async move {
            open?;
            logger.zero(offset, len as u64, fua, true).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFut<std::io::Result<()>> {
        let logger = self.logger.clone();
        let open = self.check();
        Box::pin(async move {
            open?;
            logger.zero(offset, len as u64, fua, false).await
        })
    }
    fn begin_batch(&self) {
        self.logger.plug();
    }
    fn end_batch(&self) {
        self.logger.unplug();
    }
    fn stats(&self) -> Option<Arc<mars_nbd::DeviceStats>> {
        Some(self.stats.clone())
    }
}

/// Export name -> export, consulted by the NBD server at handshake.
#[derive(Default)]
pub struct Exports {
    map: RwLock<HashMap<String, Arc<LoggerExport>>>,
    /// Per device name, its NBD request statistics since marsd started
    /// (metrics), whether it is served now or not.
    stats: parking_lot::Mutex<BTreeMap<String, Arc<mars_nbd::DeviceStats>>>,
}

impl Exports {
    /// The statistics of device `name` (made on first use).
    fn stats_of(&self, name: &str) -> Arc<mars_nbd::DeviceStats> {
        self.stats
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Every device's NBD statistics now, by name.
    pub fn device_stats(&self) -> Vec<(String, mars_nbd::stats::Snapshot)> {
        self.stats
            .lock()
            .iter()
            .map(|(n, s)| (n.clone(), s.snapshot()))
            .collect()
    }
}

impl Registry for Exports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.map
            .read()
            .get(name)
            .map(|e| e.clone() as Arc<dyn Export>)
    }
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.read().keys().cloned().collect();
        v.sort();
        v
    }
}

/// What this node actually runs for one resource.
#[derive(Default)]
struct Actual {
    /// The incarnation it runs (0: not yet known).
    id: u64,
    /// The resource directory (where its block checksums are kept).
    dir: PathBuf,
    logger: Option<Arc<Logger>>,
    export: Option<Arc<LoggerExport>>,
    /// Why the last attempt to reach the desired state failed.
    error: Option<String>,
    retry_at: Option<Instant>,
    last_status: Status,
    /// What was last published as `r/<res>/a/<me>`.
    published: Option<ActualEntry>,
    /// Running when this member is a secondary (sync, fetch, replay).
    secondary: Option<SecondaryHandle>,
    /// When the primary's written positions became known here (lag in seconds).
    lag: LagClock,
    /// A planned handover to this node: the member that writes the log now.
    handover_from: Option<String>,
    /// `primary --force`: become primary with the data this node has.
    force_promote: bool,
    /// Logfiles a member had not replayed were deleted to free space.
    emergency: bool,
    /// Bytes the local disk holds (published for `resize`).
    disk_size: u64,
}

struct SecondaryHandle {
    /// The resource size it runs with (restarted when it changes).
    size: u64,
    progress: Arc<parking_lot::Mutex<Progress>>,
    /// Fetch and sync rate limits (bytes/s, 0: none), and the replay delay (ms).
    rates: [Arc<AtomicU64>; 3],
    prefer_source: Arc<parking_lot::Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    pauses: [Arc<AtomicBool>; 3],
    task: tokio::task::JoinHandle<()>,
}

impl SecondaryHandle {
    async fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.task.await;
    }
}

#[derive(Default)]
struct State {
    actual: BTreeMap<String, Actual>,
}

pub struct Daemon {
    pub dir: PathBuf,
    pub cfg: NodeConfig,
    pub exports: Arc<Exports>,
    pub peer: Arc<Peer>,
    /// Answers replication messages (set as the peer's data server).
    pub server: Arc<mars_replication::Server>,
    /// What `server` serves: loggers and secondaries, kept up to date with
    /// `State` (updated wherever one opens or closes).
    served: Arc<Served>,
    state: tokio::sync::Mutex<State>,
    /// A logger found no space (or no descriptor) for a write: the control
    /// loop runs the space policy at once instead of within 5 s.
    space_wanted: Arc<tokio::sync::Notify>,
    /// Incarnations this node is a member of without a local disk (logged once).
    no_disk: parking_lot::Mutex<HashSet<ResRef>>,
    /// Scrubs of this node's copies.
    scrubs: Arc<crate::scrub::Scrubs>,
    /// Verifies this node coordinates, and repairs of its copies' bad blocks.
    verifies: Arc<crate::verify::Verifies>,
    /// Beats after every round of `run_loop` (the systemd watchdog's proof of life).
    pub alive: Arc<crate::systemd::Heartbeat>,
    /// The node setting `primary_units`.
    units: crate::systemd::PrimaryUnits,
}

const RETRY_AFTER: Duration = Duration::from_secs(10);
/// How long a command waits for one node to confirm that it holds the
/// command's metadata (read-your-writes), or to answer a question.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes the node directory holds in reserve for a full filesystem
/// (`keep_space_reserve`).
const SPACE_RESERVE: u64 = 4 << 20;
const SPACE_RESERVE_FILE: &str = "space-reserve";
/// How many witnesses a resource name has (`Daemon::witnesses`).
const WITNESSES: usize = 3;
/// At a start, how long a node that would serve a resource as primary asks
/// the other members for that resource's metadata first.
const STARTUP_PULL: Duration = Duration::from_secs(5);
/// How long `primary RES` waits for a planned handover before returning.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(120);

impl Daemon {
    pub fn new(dir: &Path, cfg: NodeConfig, peer: Arc<Peer>) -> Result<Daemon> {
        let units = crate::systemd::PrimaryUnits::new(cfg.primary_units.clone())?;
        let served = Arc::new(Served::default());
        let server = Arc::new(mars_replication::Server {
            resources: node::resources_dir(dir),
            me: cfg.node.clone(),
            cluster: peer.clone(),
            served: served.clone(),
        });
        let d = Daemon {
            dir: dir.to_path_buf(),
            cfg,
            exports: Arc::new(Exports::default()),
            peer,
            server,
            served,
            state: tokio::sync::Mutex::new(State::default()),
            space_wanted: Arc::new(tokio::sync::Notify::new()),
            no_disk: Default::default(),
            scrubs: Default::default(),
            verifies: Default::default(),
            alive: Default::default(),
            units,
        };
        // Before any log writes: the room a full filesystem needs first.
        d.keep_space_reserve();
        Ok(d)
    }

    fn me(&self) -> &str {
        &self.cfg.node
    }

    fn verify_ctx(&self) -> crate::verify::Ctx {
        crate::verify::Ctx {
            peer: self.peer.clone(),
            served: self.served.clone(),
            me: self.me().to_string(),
        }
    }

    /// Desired state of the resources this node is a member of, from the
    /// metadata, with this node's disk of each from its own directory
    /// (`Daemon::local_disk`): a resource without one here is not desired.
    fn desired(&self) -> BTreeMap<String, ResourceConfig> {
        let me = self.me();
        // Every live incarnation this node is a member of, the owner of its
        // name or not: a shadowed one (a name clash) goes on being served by
        // its members until the operator deletes one. A node holds one
        // incarnation per name: the one its directory holds, else the owner.
        let wanted: Vec<(ResRef, ResEntry, MemberEntry, bool, Option<String>)> = {
            let st = self.peer.store.lock();
            meta::all_incarnations(&st)
                .into_iter()
                .filter(|(_, r)| r.members.iter().any(|m| m == me))
                .filter_map(|(rr, r)| {
                    let key = meta::member_key(&rr, me);
                    let m = meta::get::<MemberEntry>(&st, &key)?;
                    let mine = st.entry(&key).is_some_and(|e| e.stamp.node == me);
                    let primary = meta::designated_primary(&st, &rr);
                    Some((rr, r, m, mine, primary))
                })
                .collect()
        };
        let mut out = BTreeMap::new();
        for (rr, r, m, mine, designated_primary) in wanted {
            let rdir = node::resource_dir(&self.dir, &rr.name);
            let held = node::read_incarnation(&rdir);
            if out.contains_key(&rr.name) && held.as_ref() != Some(&rr) {
                continue;
            }
            let Some(disk) = self.local_disk(&rdir, held.as_ref(), &rr, &m, mine) else {
                continue;
            };
            out.insert(
                rr.name.clone(),
                ResourceConfig {
                    format: node::FORMAT,
                    designated_primary,
                    name: rr.name,
                    size: r.size,
                    resource_id: rr.id,
                    disk,
                    members: r.members,
                    attached: m.attached,
                    connected: m.connected,
                    pause_sync: m.pause_sync,
                    pause_fetch: m.pause_fetch,
                    pause_replay: m.pause_replay,
                    fetch_rate: m.fetch_rate,
                    sync_rate: m.sync_rate,
                    replay_delay_ms: m.replay_delay_ms,
                },
            );
        }
        out
    }

    /// The disk recorded in this node's directory for `rr`, for views.
    fn recorded_disk(&self, rr: &ResRef) -> Option<String> {
        let rdir = node::resource_dir(&self.dir, &rr.name);
        if node::read_incarnation(&rdir).as_ref() != Some(rr) {
            return None;
        }
        let disk = node::read_local_disk(&rdir).ok().flatten()?;
        Some(disk.display().to_string())
    }

    /// This node's disk of incarnation `rr`: the one recorded in its
    /// directory (`resources/RES/disk`, written by `create-resource` and
    /// `join-resource`), never a path from the metadata. A directory of an
    /// earlier build has none: then, once, the path in this node's own
    /// member entry is taken, if this node wrote that entry, and recorded.
    fn local_disk(
        &self,
        rdir: &Path,
        held: Option<&ResRef>,
        rr: &ResRef,
        m: &MemberEntry,
        mine: bool,
    ) -> Option<PathBuf> {
        let why = if held != Some(rr) {
            format!("{} holds no copy of it", rdir.display())
        } else {
            match node::read_local_disk(rdir) {
                Ok(Some(d)) => return Some(d),
                Ok(None) if mine && Path::new(&m.disk).is_absolute() => {
                    let disk = PathBuf::from(&m.disk);
                    match node::write_local_disk(rdir, &disk) {
                        Ok(()) => {
                            tracing::info!(resource = %rr, disk = %disk.display(), "recorded this node's disk in {} (from its own member entry, written by an earlier build)", rdir.join(node::DISK_FILE).display());
                            return Some(disk);
                        }
                        Err(e) => format!("{e:#}"),
                    }
                }
                Ok(None) => format!("{} is missing", rdir.join(node::DISK_FILE).display()),
                Err(e) => format!("{e:#}"),
            }
        };
        if self.no_disk.lock().insert(rr.clone()) {
            tracing::warn!(resource = %rr, "this node is a member of {rr} in the metadata but has no local disk of it ({why}): nothing is opened (a disk path is never taken from another node)");
        }
        None
    }

    fn logger_config(&self, r: &ResourceConfig) -> LoggerConfig {
        let mut c = LoggerConfig::new(
            &self.cfg.node,
            &node::resource_dir(&self.dir, &r.name),
            &r.disk,
            r.size,
            r.resource_id,
        );
        c.logfile_max_bytes = self.cfg.logfile_max_bytes;
        c.mem_limit_bytes = self.cfg.writeback_mem_bytes;
        c.tail_cache_bytes = self.cfg.tail_cache_bytes;
        // Spares fill the room the space policy leaves to the log anyway.
        c.spare_bytes = self.cfg.log_keep_bytes;
        let wanted = self.space_wanted.clone();
        let reserve = self.dir.join(SPACE_RESERVE_FILE);
        c.on_no_space = Some(mars_logger::SpaceHook(Arc::new(move || {
            // At once, on the logger's thread: the logger persists its applied
            // position into this room before it writes again.
            let _ = std::fs::remove_file(&reserve);
            wanted.notify_one();
        })));
        // Blocks a read finds bad are repaired from a good member first.
        if tokio::runtime::Handle::try_current().is_ok() {
            let dir = node::resource_dir(&self.dir, &r.name);
            c.repair = Some(self.verify_ctx().read_repair_hook(&r.name, &dir));
        }
        c
    }

    /// One step of the control loop: converge every resource's actual state to its desired state.
    pub async fn reconcile(&self) {
        let mut st = self.state.lock().await;
        self.reconcile_locked(&mut st, true).await;
    }

    async fn reconcile_locked(&self, st: &mut State, retry_now: bool) {
        let me = self.me().to_string();
        let desired = self.desired();
        // Resources that are no longer desired here (or are another
        // incarnation of the name now): stop everything.
        let gone: Vec<String> = st
            .actual
            .iter()
            .filter(|(k, a)| {
                desired
                    .get(*k)
                    .is_none_or(|r| a.id != 0 && a.id != r.resource_id)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for name in gone {
            if let Some(a) = st.actual.remove(&name) {
                self.stop(&name, a).await;
            }
        }
        self.remove_deleted_dirs(&desired);
        for r in desired.into_values() {
            let rdir = node::resource_dir(&self.dir, &r.name);
            if let Err(e) = self.own_dir(&rdir, &r.rref()) {
                let a = st.actual.entry(r.name.clone()).or_default();
                let msg = format!("{}: {e:#}", r.name);
                if a.error.as_deref() != Some(msg.as_str()) {
                    tracing::error!("{msg}");
                }
                a.error = Some(msg);
                continue;
            }
            let a = st.actual.entry(r.name.clone()).or_default();
            a.id = r.resource_id;
            a.dir = rdir.clone();
            a.disk_size = mars_logger::disk::disk_size(&r.disk).unwrap_or(0);
            // A member whose directory is not a log writer's (no `applied`) is a secondary.
            let designated_me = r.designated_primary.as_deref() == Some(me.as_str());
            if !designated_me {
                // A handover or forced promotion to this node that another
                // designation overtook: forgotten (a stale one would make a
                // later planned `primary` promote at once, or keep fetching
                // from a former primary as if its list were the history).
                a.handover_from = None;
                a.force_promote = false;
            }
            let writer = a.logger.is_some() || rdir.join("applied").exists();
            let other_member_designated = r
                .designated_primary
                .as_ref()
                .is_some_and(|p| *p != me && r.members.contains(p));
            if writer && r.attached && other_member_designated {
                // Another member is to be primary: stop writing, hand the log to replay.
                if let Err(e) = self.demote(&r, a).await {
                    let msg = format!("{}: cannot give up the primary role: {e:#}", r.name);
                    if a.error.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}");
                    }
                    a.error = Some(msg);
                    continue;
                }
            }
            let writer = a.logger.is_some() || rdir.join("applied").exists();
            if !writer && designated_me && r.attached && self.ready_to_promote(a) {
                if let Err(e) = self.promote(&r, a).await {
                    // Do not try again by itself: the operator decides (run `primary` again).
                    a.force_promote = false;
                    a.handover_from = None;
                    let msg = format!("{}: cannot become primary: {e:#}", r.name);
                    tracing::error!("{msg}");
                    a.error = Some(msg);
                    continue;
                }
            }
            if a.logger.is_none() && !rdir.join("applied").exists() {
                self.reconcile_secondary(&r, a, &me).await;
                continue;
            }
            if let Some(h) = self.take_secondary(&r.name, a) {
                h.stop().await;
            }
            if a.logger.as_ref().is_some_and(|l| l.size() != r.size) {
                // Resized: serve and log with the new size (clients reconnect).
                tracing::info!(resource = %r.name, size = r.size, "reopening the log for the new size");
                self.unexport(&r.name, a);
                if let Some(l) = self.take_logger(&r.name, a) {
                    a.last_status = close_logger(l).await;
                }
            }
            let want_export = r.attached && r.designated_primary.as_deref() == Some(me.as_str());
            if (!want_export || a.logger.is_none()) && a.export.is_some() {
                self.stop_serving(&r.name, a).await;
            }
            if !r.attached {
                if let Some(l) = self.take_logger(&r.name, a) {
                    a.last_status = close_logger(l).await;
                }
                a.error = None;
            } else if a.logger.is_none()
                && (retry_now || a.retry_at.is_none_or(|t| Instant::now() >= t))
            {
                let cfg = self.logger_config(&r);
                match tokio::task::spawn_blocking(move || Logger::open(cfg)).await {
                    Ok(Ok(l)) => {
                        tracing::info!(resource = %r.name, logfile = %l.status().current_logfile, "disk attached, log recovered");
                        a.logger = Some(Arc::new(l));
                        self.served.set_logger(&r.name, a.logger.clone());
                        a.error = None;
                        a.retry_at = None;
                    }
                    Ok(Err(e)) => {
                        let msg = format!("cannot attach {}: {e}", r.name);
                        if a.error.as_deref() != Some(msg.as_str()) {
                            tracing::error!("{msg}");
                        }
                        a.error = Some(msg);
                        a.retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                    Err(e) => a.error = Some(format!("cannot attach {}: {e}", r.name)),
                }
            }
            if let Some(l) = &a.logger {
                a.last_status = l.status();
                if want_export && a.export.is_none() {
                    let e = Arc::new(LoggerExport {
                        logger: l.clone(),
                        open: AtomicBool::new(true),
                        stats: self.exports.stats_of(&r.name),
                    });
                    self.exports.map.write().insert(r.name.clone(), e.clone());
                    a.export = Some(e);
                    tracing::info!(resource = %r.name, device = %self.device_uri(&r.name), "serving device");
                    self.units.serving(&r.name);
                }
            }
            // Report what this member actually does (pushed to the other members).
            let now = actual_entry(a);
            if a.published.as_ref() != Some(&now) {
                a.published = Some(now.clone());
                self.peer
                    .set(&meta::actual_key(&r.rref(), &me), meta::to_value(&now));
            }
        }
    }

    /// The old primary has stopped writing and everything it wrote is replayed here
    /// (or `--force`).
    fn ready_to_promote(&self, a: &Actual) -> bool {
        if a.force_promote {
            return true;
        }
        let (Some(from), Some(h)) = (&a.handover_from, &a.secondary) else {
            return false;
        };
        let p = h.progress.lock();
        p.source.as_deref() == Some(from.as_str())
            && p.source_complete
            && !p.syncing
            && p.consistent_from.is_none()
            && !p.split_brain
            && p.replayed >= p.fetched
    }

    /// Stop the secondary's work and make this directory a log writer's.
    async fn promote(&self, r: &ResourceConfig, a: &mut Actual) -> Result<()> {
        if let Some(h) = self.take_secondary(&r.name, a) {
            h.stop().await;
        }
        let dir = node::resource_dir(&self.dir, &r.name);
        let pos = tokio::task::spawn_blocking(move || -> Result<u64> {
            // Only a finished sync is a base: an unfinished one is no image at all.
            let Some(start) = mars_replication::synced_start(&dir) else {
                bail!("this member's disk is inconsistent (its full sync has not finished); it cannot be primary");
            };
            let pos = mars_logger::replay::promote(&dir, Some(start))?;
            mars_replication::clear_sync(&dir)?;
            Ok(pos)
        })
        .await??;
        tracing::info!(resource = %r.name, pos, forced = a.force_promote, from = ?a.handover_from, "becoming primary");
        a.force_promote = false;
        a.handover_from = None;
        a.error = None;
        a.retry_at = None;
        Ok(())
    }

    /// Stop serving and writing, write everything back, and continue as a secondary.
    async fn demote(&self, r: &ResourceConfig, a: &mut Actual) -> Result<()> {
        self.stop_serving(&r.name, a).await;
        if let Some(l) = self.take_logger(&r.name, a) {
            // The whole log is written back here (a large backlog takes a
            // while: the watchdog must not take that for a hang).
            a.last_status = self.fed(close_logger(l)).await;
        }
        let (dir, me, disk, size) = (
            node::resource_dir(&self.dir, &r.name),
            self.me().to_string(),
            r.disk.clone(),
            r.size,
        );
        let pos = tokio::task::spawn_blocking(move || -> Result<u64> {
            let pos = mars_logger::replay::demote(&dir, &me, &disk, size)?;
            mars_replication::mark_synced(&dir, pos)?;
            Ok(pos)
        })
        .await??;
        tracing::info!(resource = %r.name, pos, new_primary = ?r.designated_primary, "primary role given up; continuing as a secondary");
        a.error = None;
        a.published = None;
        Ok(())
    }

    async fn reconcile_secondary(&self, r: &ResourceConfig, a: &mut Actual, me: &str) {
        let want = r.attached;
        if a.secondary.as_ref().is_some_and(|h| h.size != r.size) {
            if let Some(h) = self.take_secondary(&r.name, a) {
                h.stop().await;
            }
        }
        match (&a.secondary, want) {
            (Some(_), false) => {
                if let Some(h) = self.take_secondary(&r.name, a) {
                    h.stop().await;
                }
            }
            (None, true) => {
                // `confirmed_for: None`: not `uptodate` before replay has
                // checked its position against the primary's own list (a
                // demoted primary may hold another history).
                let mut p0 = Progress::default();
                mars_replication::secondary::load_progress(
                    &node::resource_dir(&self.dir, &r.name),
                    r.size,
                    &mut p0,
                );
                let progress = Arc::new(parking_lot::Mutex::new(p0));
                let stop = Arc::new(AtomicBool::new(false));
                let prefer_source = Arc::new(parking_lot::Mutex::new(a.handover_from.clone()));
                let rates = [
                    Arc::new(AtomicU64::new(r.fetch_rate)),
                    Arc::new(AtomicU64::new(r.sync_rate)),
                    Arc::new(AtomicU64::new(r.replay_delay_ms)),
                ];
                // As desired from the start: the task runs at once, and a member restarted
                // with replay paused replayed a step before the flags below were set.
                let pauses = [
                    Arc::new(AtomicBool::new(r.pause_sync)),
                    Arc::new(AtomicBool::new(r.pause_fetch || !r.connected)),
                    Arc::new(AtomicBool::new(r.pause_replay)),
                ];
                let gate = Arc::new(mars_replication::verify::ReplayGate::default());
                let sec = Secondary {
                    gate: gate.clone(),
                    res: r.rref(),
                    dir: node::resource_dir(&self.dir, &r.name),
                    me: me.to_string(),
                    disk: r.disk.clone(),
                    size: r.size,
                    peer: self.peer.clone(),
                    progress: progress.clone(),
                    stop: stop.clone(),
                    pause_sync: pauses[0].clone(),
                    pause_fetch: pauses[1].clone(),
                    pause_replay: pauses[2].clone(),
                    prefer_source: prefer_source.clone(),
                    fetch_rate: rates[0].clone(),
                    sync_rate: rates[1].clone(),
                    replay_delay_ms: rates[2].clone(),
                    sync_digest: self.cfg.sync_digest,
                    fetched: Arc::new(mars_logger::fetched::FetchedChunks::new(
                        mars_replication::FETCHED_KEEP,
                    )),
                    arrivals: Default::default(),
                    avoid_sources: Default::default(),
                    fetch_avoid: Default::default(),
                    sync_unreachable: Default::default(),
                    lineage: Default::default(),
                    same_checked: Default::default(),
                    fetch_conn: Default::default(),
                };
                tracing::info!(resource = %r.name, "secondary: sync, fetch and replay");
                let task = tokio::spawn(sec.run());
                self.served.set_secondary(
                    &r.name,
                    Some(ServedSecondary {
                        progress: progress.clone(),
                        size: r.size,
                        disk: r.disk.clone(),
                        gate,
                    }),
                );
                a.secondary = Some(SecondaryHandle {
                    size: r.size,
                    progress,
                    rates,
                    prefer_source,
                    stop,
                    pauses,
                    task,
                });
            }
            _ => {}
        }
        if let Some(h) = &a.secondary {
            *h.prefer_source.lock() = a.handover_from.clone();
            h.pauses[0].store(r.pause_sync, Ordering::Release);
            // `disconnect` stops log transfer like pause-fetch does.
            h.pauses[1].store(r.pause_fetch || !r.connected, Ordering::Release);
            h.pauses[2].store(r.pause_replay, Ordering::Release);
            h.rates[0].store(r.fetch_rate, Ordering::Release);
            h.rates[1].store(r.sync_rate, Ordering::Release);
            h.rates[2].store(r.replay_delay_ms, Ordering::Release);
        }
        let written = primary_written(&self.peer.store.lock(), &r.rref());
        if let Some(h) = &a.secondary {
            let dir = node::resource_dir(&self.dir, &r.name);
            a.lag.load_once(&dir);
            a.lag.observe(written, Instant::now());
            let replayed = h.progress.lock().replayed;
            a.lag.prune(replayed);
            a.lag.save_if_due(&dir, Instant::now());
        } else {
            a.lag.observe(written, Instant::now());
        }
        let designated = r.designated_primary.clone();
        let now = Self::actual_entry_of(a, designated.as_deref(), written);
        if a.published.as_ref() != Some(&now) {
            a.published = Some(now.clone());
            self.peer
                .set(&meta::actual_key(&r.rref(), me), meta::to_value(&now));
        }
    }

    /// What this member reports about itself.
    /// What this member reports about itself, `designated` and its reported
    /// `primary_written` as this node knows them.
    fn actual_entry_of(a: &Actual, designated: Option<&str>, primary_written: u64) -> ActualEntry {
        let Some(h) = &a.secondary else {
            return actual_entry(a);
        };
        let p = h.progress.lock().clone();
        let lag = a.lag.lag(p.replayed, Instant::now());
        let paused = |i: usize| h.pauses[i].load(Ordering::Acquire);
        ActualEntry {
            role: "secondary".into(),
            disk: policy::secondary_disk(&p, paused(0), paused(2), designated, primary_written)
                .into(),
            written: primary_written,
            fetched: p.fetched,
            replayed: p.replayed,
            replayed_durable: Some(p.replayed_durable),
            isolated: if p.syncing {
                p.sync_waits_for_source
            } else {
                p.fetch_waits_for_source
            },
            error: p
                .replay_error
                .clone()
                .or(p.error.clone())
                .or(a.error.clone()),
            logfile: None,
            sync: p.syncing.then_some((p.sync_done, p.sync_total)),
            blocks_transferred: p.blocks_transferred,
            sync_rate: p.sync_rate,
            split_brain: p.split_brain,
            // Rounded to 100 ms: the entry is gossiped when it changes.
            lag_ms: lag.as_millis() as u64 / 100 * 100,
            emergency: p.cut_off,
            disk_size: a.disk_size,
            checksum_errors: mars_logger::csum::errors(&a.dir),
            bad_blocks: mars_logger::csum::unrepaired(&a.dir),
            repaired: mars_logger::csum::repaired(&a.dir),
        }
    }

    /// Make sure `rdir` is the directory of incarnation `res`: made (with its
    /// incarnation file) when missing, adopted when it names none, refused
    /// when it holds another incarnation that is not known to be deleted.
    fn own_dir(&self, rdir: &Path, res: &ResRef) -> Result<()> {
        match node::read_incarnation(rdir) {
            Some(held) if held == *res => Ok(()),
            Some(held) => bail!(
                "{} holds the logs of {held}, not of {res}: it is removed once this node hears that {held} was deleted; if {held} exists nowhere any more, remove the directory by hand",
                rdir.display()
            ),
            None => {
                std::fs::create_dir_all(rdir)
                    .with_context(|| format!("cannot create {}", rdir.display()))?;
                node::write_incarnation(rdir, res)
            }
        }
    }

    /// Remove local directories of resources deleted from the cluster.
    fn remove_deleted_dirs(&self, desired: &BTreeMap<String, ResourceConfig>) {
        let Ok(entries) = std::fs::read_dir(node::resources_dir(&self.dir)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Only what the directory says it holds: a deletion of another
            // incarnation of the name never removes it.
            let Some(held) = node::read_incarnation(&e.path()) else {
                continue;
            };
            if desired.get(&name).is_some_and(|r| r.resource_id == held.id) {
                continue;
            }
            let (deleted, removed) = {
                let store = self.peer.store.lock();
                (
                    meta::deleted(&store, &held),
                    meta::membership_deleted(&store, &held, self.me()),
                )
            };
            // A log writer's directory (`applied`: a primary's log, maybe
            // not all written back) is never removed for a membership
            // deletion alone: a member is removed by the new primary after
            // a handover, when this node is a secondary already.
            let writer = e.path().join("applied").exists();
            if deleted || (removed && !writer) {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) if deleted => {
                        tracing::info!(resource = %held, "resource deleted: removed its logs and state here")
                    }
                    Ok(()) => {
                        tracing::info!(resource = %held, "no longer a member: removed its logs and state here (the disk is left as it is)")
                    }
                    Err(err) => {
                        tracing::warn!(resource = %name, "cannot remove {}: {err}", e.path().display())
                    }
                }
            }
        }
    }

    /// Take the logger out of `a`, and out of what the replication server
    /// serves (always together: the server must not read a closed logger).
    fn take_logger(&self, name: &str, a: &mut Actual) -> Option<Arc<Logger>> {
        self.served.set_logger(name, None);
        a.logger.take()
    }

    /// Take the secondary out of `a`, and out of what the server serves.
    fn take_secondary(&self, name: &str, a: &mut Actual) -> Option<SecondaryHandle> {
        self.served.set_secondary(name, None);
        a.secondary.take()
    }

    /// Await `f` with the systemd watchdog fed meanwhile: for bounded waits
    /// and work that goes on (a unit's stop, a log's writeback) under the
    /// state lock, which would otherwise keep `run_loop` from beating.
    async fn fed<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let alive = self.alive.clone();
        let feed = tokio::spawn(async move {
            loop {
                alive.beat();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let r = f.await;
        feed.abort();
        r
    }

    /// `unexport` for good: the resource's primary unit (if any) is stopped
    /// first, while the device still answers.
    async fn stop_serving(&self, name: &str, a: &mut Actual) {
        if a.export.is_some() {
            // A bounded wait (the unit's stop, at most `UNIT_STOP_WAIT`,
            // longer than systemd's default stop timeout) under the state
            // lock: the control loop is not stuck, so the watchdog is fed
            // meanwhile (else `WatchdogSec=60s` kills marsd in the middle
            // of a handover while a mount or VM still uses the device).
            self.fed(self.units.stopping(name)).await;
        }
        self.unexport(name, a);
    }

    fn unexport(&self, name: &str, a: &mut Actual) {
        if let Some(e) = a.export.take() {
            e.open.store(false, Ordering::Release);
            self.exports.map.write().remove(name);
            tracing::info!(resource = %name, "device no longer served");
        }
    }

    async fn stop(&self, name: &str, mut a: Actual) {
        if let Some(h) = self.take_secondary(name, &mut a) {
            h.stop().await;
        }
        self.stop_serving(name, &mut a).await;
        if let Some(l) = self.take_logger(name, &mut a) {
            close_logger(l).await;
        }
    }

    /// Stop serving everything and write all logs back (daemon shutdown).
    pub async fn shutdown(&self) {
        // Scrubs first: each holds a handle of its resource's checksum table,
        // whose close is clean only when the last handle goes.
        let scrubs = self.scrubs.clone();
        let _ = tokio::task::spawn_blocking(move || scrubs.stop_all()).await;
        self.verifies.stop_all().await;
        let mut st = self.state.lock().await;
        let all: Vec<(String, Actual)> = std::mem::take(&mut st.actual).into_iter().collect();
        for (name, a) in all {
            self.stop(&name, a).await;
        }
        self.peer.save();
    }

    pub fn device_uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.cfg.nbd, name)
    }

    fn device_uri_of(store: &mars_meta::Store, node: &str, name: &str) -> Option<String> {
        let (_, n) = meta::node(store, node)?;
        Some(format!("nbd://{}/{}", n.nbd, name))
    }

    /// The periodic part of the control loop; also runs as soon as metadata changes.
    pub async fn run_loop(self: Arc<Self>) {
        let mut policy_at = Instant::now();
        let mut scrub_at = Instant::now();
        let mut repair_at = Instant::now();
        let mut space_warned: Option<Instant> = None;
        loop {
            if policy_at.elapsed() >= Duration::from_secs(5) {
                policy_at = Instant::now();
                self.apply_space_policy().await;
            }
            if scrub_at.elapsed() >= Duration::from_secs(60) {
                scrub_at = Instant::now();
                self.scrubs_due().await;
            }
            if repair_at.elapsed() >= Duration::from_secs(5) {
                repair_at = Instant::now();
                let copies: Vec<(String, PathBuf)> = {
                    let st = self.state.lock().await;
                    st.actual
                        .iter()
                        .map(|(n, a)| (n.clone(), a.dir.clone()))
                        .collect()
                };
                self.verifies.repairs_due(&self.verify_ctx(), &copies);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = self.peer.changed.notified() => {}
                _ = self.space_wanted.notified() => {
                    // A log write waits for space (it is tried again meanwhile).
                    if space_warned.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                        space_warned = Some(Instant::now());
                        tracing::warn!("a log found no space: running the space policy now");
                    }
                    self.release_space_reserve();
                    policy_at = Instant::now();
                    self.apply_space_policy().await;
                }
            }
            let mut st = self.state.lock().await;
            self.reconcile_locked(&mut st, false).await;
            drop(st);
            self.alive.beat();
        }
    }

    pub async fn handle(self: &Arc<Self>, req: Request) -> Response {
        match self.handle_inner(req).await {
            Ok(r) => r,
            Err(e) => Response::err(format!("{e:#}")),
        }
    }

    /// The witnesses of resource name `name`: the `WITNESSES` live nodes
    /// (this one included) that rank highest by a hash of the name and the
    /// node (rendezvous hashing). `create-resource` and `delete-resource`
    /// tell them, and a command that does not know a name (or must be sure
    /// of it) asks them: with the same live nodes both sides pick the same
    /// ones, so the asked set meets the told set, in a cluster of any size.
    fn witnesses(&self, name: &str) -> Vec<String> {
        let mut alive: Vec<(blake3::Hash, String)> = meta::nodes(&self.peer.store.lock())
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| self.peer.is_alive(n))
            .map(|n| {
                let mut h = blake3::Hasher::new();
                h.update(b"mars witness v1\0");
                h.update(name.as_bytes());
                h.update(b"\0");
                h.update(n.as_bytes());
                (h.finalize(), n)
            })
            .collect();
        alive.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
        alive.into_iter().take(WITNESSES).map(|(_, n)| n).collect()
    }

    /// Bring this node's cluster entries up to those of the witnesses of
    /// `name`: for a command naming a resource this node has not heard of,
    /// or must be sure of.
    async fn ask_cluster(&self, name: &str) {
        self.ask(
            &self.witnesses(name),
            &[mars_meta::CLUSTER_PREFIX.to_string()],
        )
        .await;
    }

    /// Bring this node's cluster entries and those of `rr` up to those of the
    /// live ones of `nodes`. A node restarted after a kill may have lost what
    /// gossip told it before (metadata learned by gossip is saved on a
    /// timer): a handover decided on its own view could miss that other
    /// nodes are members (found by the nemesis, seed 2014).
    async fn refresh_resource(&self, rr: &ResRef, nodes: &[String]) -> usize {
        let prefixes = [mars_meta::CLUSTER_PREFIX.to_string(), meta::res_prefix(rr)];
        self.ask(nodes, &prefixes).await
    }

    /// Anti-entropy of `prefixes` with each live one of `nodes` (other than
    /// this node) at once, each for at most `CONFIRM_TIMEOUT`, whatever their
    /// connection backoff. Returns how many answered for every prefix.
    async fn ask(&self, nodes: &[String], prefixes: &[String]) -> usize {
        let mut asks = tokio::task::JoinSet::new();
        let mut seen = HashSet::new();
        for n in nodes
            .iter()
            .filter(|n| n.as_str() != self.me() && self.peer.is_alive(n))
        {
            if !seen.insert(n.clone()) {
                continue;
            }
            let (peer, n, prefixes) = (self.peer.clone(), n.clone(), prefixes.to_vec());
            asks.spawn(async move {
                let ae = async {
                    for p in &prefixes {
                        peer.ae_now(&n, p).await?;
                    }
                    anyhow::Ok(())
                };
                match tokio::time::timeout(CONFIRM_TIMEOUT, ae).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::debug!(node = %n, "asking: {e:#}");
                        false
                    }
                    Err(_) => false,
                }
            });
        }
        asks.join_all().await.into_iter().filter(|ok| *ok).count()
    }

    /// Hand the current entries of `keys` to each of `nodes` and wait until
    /// each has merged them (at once, each for at most `CONFIRM_TIMEOUT`), so
    /// that a command's effect is visible there when it returns. Returns the
    /// nodes that did not confirm, with the reason.
    async fn confirm(&self, keys: &[String], nodes: &[String]) -> Vec<(String, String)> {
        let wire: Vec<mars_proto::WireEntry> = {
            let store = self.peer.store.lock();
            keys.iter()
                .filter_map(|k| store.entry(k).map(|e| mars_cluster::to_wire(k, e)))
                .collect()
        };
        let mut pushes = tokio::task::JoinSet::new();
        for n in nodes.iter().filter(|n| n.as_str() != self.me()).cloned() {
            let (peer, wire) = (self.peer.clone(), wire.clone());
            pushes.spawn(async move {
                let why = if !peer.is_alive(&n) {
                    Some("not reachable".to_string())
                } else {
                    match tokio::time::timeout(CONFIRM_TIMEOUT, peer.push_to(&n, wire)).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(format!("{e:#}")),
                        Err(_) => Some("no answer".to_string()),
                    }
                };
                why.map(|w| (n, w))
            });
        }
        let mut missing: Vec<(String, String)> =
            pushes.join_all().await.into_iter().flatten().collect();
        missing.sort();
        missing
    }

    /// The live incarnation named `name` (or `NAME@ID`) and its entry.
    fn res_entry(&self, name: &str) -> Result<(ResRef, ResEntry)> {
        match meta::resource(&self.peer.store.lock(), name) {
            Some(r) => Ok(r),
            None => bail!("unknown resource {name}"),
        }
    }

    /// `set-compression`: the resource's streams are fetched and synced with
    /// `codec` from the next connection on (every member reads the setting
    /// when it connects to its source).
    async fn set_compression(
        self: &Arc<Self>,
        name: &str,
        codec: &str,
        level: Option<i32>,
    ) -> Result<Response> {
        let c = match (codec, level) {
            ("off", None) => meta::Compression::default(),
            ("off", Some(_)) => bail!("set-compression {name} off takes no level"),
            ("zstd", l) => meta::Compression {
                codec: meta::LinkCodec::Zstd,
                level: l.unwrap_or(mars_proto::codec::DEFAULT_LEVEL),
            },
            (other, _) => bail!("set-compression {name}: unknown codec {other:?} (zstd or off)"),
        };
        if !c.valid() {
            bail!(
                "set-compression {name}: zstd's level is {}..={}",
                meta::COMPRESSION_LEVELS.start(),
                meta::COMPRESSION_LEVELS.end()
            );
        }
        let (rr, r) = self.res_entry(name)?;
        let key = meta::compression_key(&rr);
        self.peer.set(&key, meta::to_value(&c));
        let missing = self.confirm(&[key], &r.members).await;
        let resp = Response::ok(format!(
            "{name}: compression {} for fetch and sync (from each member's next connection)",
            c.show()
        ));
        Ok(noting(resp, &missing))
    }

    fn member_entry(&self, name: &str) -> Result<MemberEntry> {
        let (rr, r) = self.res_entry(name)?;
        if !r.members.iter().any(|m| m == self.me()) {
            bail!(
                "{} is not a member of {name} (members: {})",
                self.me(),
                r.members.join(", ")
            );
        }
        meta::get(&self.peer.store.lock(), &meta::member_key(&rr, self.me())).ok_or_else(|| {
            anyhow::anyhow!("{name}: this member's settings are missing from the metadata")
        })
    }

    async fn handle_inner(self: &Arc<Self>, req: Request) -> Result<Response> {
        let me = self.me().to_string();
        if let Some(name) = named_resource(&req) {
            // `NAME@ID` names one incarnation: only for deleting a shadowed
            // one (everything else works on names, and directories are named
            // by them).
            if name.contains('@') && !matches!(req, Request::DeleteResource { .. }) {
                bail!("{name}: an incarnation (NAME@ID) is accepted by delete-resource only; use the resource's name");
            }
            // A resource created a moment ago elsewhere: ask before refusing.
            let plain = name.split('@').next().unwrap_or(name);
            let sure = matches!(req, Request::JoinResource { .. });
            if sure || meta::resource(&self.peer.store.lock(), name).is_none() {
                self.ask_cluster(plain).await;
            }
        }
        match req {
            Request::View { name } => {
                let view = self.view_asking(name.as_deref(), true, &mut None).await?;
                Ok(Response {
                    ok: true,
                    view: Some(view),
                    ..Default::default()
                })
            }
            Request::CreateResource { name, disk } => self.create_resource(&name, &disk).await,
            Request::DeleteResource { name } => self.delete_resource(&name).await,
            Request::Primary { name, force } => self.become_primary(&name, force).await,
            Request::Invalidate { name } => self.invalidate(&name).await,
            Request::Scrub { name } => self.scrub(&name).await,
            Request::Verify {
                name,
                repair,
                rate,
                restart,
            } => self.verify(&name, repair, rate, restart).await,
            Request::Watch { .. } => {
                bail!("watch streams over the control socket only (`marsadm view --watch`)")
            }
            Request::VerifyControl { name, op } => {
                Ok(Response::ok(self.verifies.control(&name, op)?))
            }
            Request::Resize { name, bytes } => self.resize(&name, bytes).await,
            Request::SetRate { name, fetch, sync } => {
                self.set_member(&name, |m| {
                    if let Some(f) = fetch {
                        m.fetch_rate = f;
                    }
                    if let Some(s) = sync {
                        m.sync_rate = s;
                    }
                })
                .await?;
                let m = self.member_entry(&name)?;
                let show = |r: u64| {
                    if r == 0 {
                        "unlimited".to_string()
                    } else {
                        format!("{r} bytes/s")
                    }
                };
                Ok(Response::ok(format!(
                    "{name}: fetch rate {}, sync rate {}",
                    show(m.fetch_rate),
                    show(m.sync_rate)
                )))
            }
            Request::SetDelay { name, ms } => {
                let rr = self.res_entry(&name)?.0;
                let primary = meta::designated_primary(&self.peer.store.lock(), &rr);
                if ms > 0 && primary.as_deref() == Some(self.me()) {
                    bail!("{name}: this node is its primary; a delay applies to a secondary's replay (run set-delay on the secondary)");
                }
                self.set_member(&name, |m| m.replay_delay_ms = ms).await?;
                Ok(Response::ok(if ms == 0 {
                    format!("{name}: no replay delay: replay catches up")
                } else {
                    format!(
                        "{name}: replay kept {} behind the primary's writes (fetch goes on)",
                        mars_api::show_duration_ms(ms)
                    )
                }))
            }
            Request::SetCompression { name, codec, level } => {
                self.set_compression(&name, &codec, level).await
            }
            Request::Secondary { name } => {
                let (rr, r) = self.res_entry(&name)?;
                let current = meta::designated_primary(&self.peer.store.lock(), &rr);
                let mut missing = Vec::new();
                if current.as_deref() == Some(me.as_str()) {
                    let key = meta::primary_key(&rr);
                    self.peer.set(&key, serde_json::Value::Null);
                    missing = self.confirm(&[key], &r.members).await;
                }
                self.reconcile().await;
                let resp =
                    Response::ok(format!("{name}: secondary here, device not served by {me}"));
                Ok(noting(resp, &missing))
            }
            Request::Up { name } => {
                self.set_member(&name, |m| (m.attached, m.connected) = (true, true))
                    .await
            }
            Request::Down { name } => {
                self.set_member(&name, |m| (m.attached, m.connected) = (false, false))
                    .await
            }
            Request::Attach {
                name,
                rebuild_checksums,
            } => {
                if rebuild_checksums {
                    self.member_entry(&name)?;
                    let rdir = node::resource_dir(&self.dir, &name);
                    // Refused while the checksums are in use; the next open
                    // (the attach below, or the retry of one refused before)
                    // computes them from the disk.
                    let gone =
                        tokio::task::spawn_blocking(move || mars_logger::csum::discard(&rdir))
                            .await?
                            .with_context(|| format!("{name}: rebuilding the block checksums"))?;
                    tracing::info!(resource = %name, had_file = gone, "block checksums discarded: computed again from the disk at attach");
                }
                self.set_member(&name, |m| m.attached = true).await
            }
            Request::Detach { name } => self.set_member(&name, |m| m.attached = false).await,
            Request::Connect { name } => self.set_member(&name, |m| m.connected = true).await,
            Request::Disconnect { name } => self.set_member(&name, |m| m.connected = false).await,
            Request::Pause { name, what, paused } => {
                self.set_member(&name, |m| match what {
                    PauseKind::Sync => m.pause_sync = paused,
                    PauseKind::Fetch => m.pause_fetch = paused,
                    PauseKind::Replay => m.pause_replay = paused,
                })
                .await?;
                if paused && what == PauseKind::Replay {
                    self.wait_replay_stopped(&name).await?;
                }
                let verb = if paused { "paused" } else { "resumed" };
                Ok(Response::ok(
                    format!("{name}: {what:?} {verb}").to_lowercase(),
                ))
            }
            Request::LogRotate { name } => {
                let l = self.logger(&name).await?;
                match l.rotate().await {
                    Ok(Some(f)) => Ok(Response::ok(format!("{name}: now logging into {f}"))),
                    Ok(None) => Ok(Response::ok(format!(
                        "{name}: current logfile {} is still empty; not rotated",
                        l.status().current_logfile
                    ))),
                    Err(e) => bail!("{name}: log rotation failed: {e}"),
                }
            }
            Request::LogDelete { name } => {
                let (deleted, lagging) = self.delete_logs(&name, true).await?;
                let waiting = if lagging.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; later ones are kept: not every member has replayed them yet: {}",
                        lagging.join(", ")
                    )
                };
                if deleted.is_empty() {
                    Ok(Response::ok(format!("{name}: no logfile deleted (only finished, written back logfiles that every member has replayed are){waiting}")))
                } else {
                    Ok(Response::ok(format!(
                        "{name}: deleted {}{waiting}",
                        deleted.join(", ")
                    )))
                }
            }
            Request::JoinResource { name, disk } => self.join_resource(&name, &disk).await,
            Request::LeaveResource { name } => self.leave_resource(&name).await,
            Request::RemoveMember { name, node } => self.remove_member(&name, &node).await,
            Request::LeaveCluster => self.leave_cluster().await,
            Request::RemoveNode { node, force } => self.remove_node(&node, force).await,
            Request::Keyring { op } => self.keyring(op).await,
            Request::Invite { merge, ttl_secs } => {
                let kind = if merge {
                    crate::tls::InviteKind::Merge
                } else {
                    crate::tls::InviteKind::Join
                };
                let ttl_ms = ttl_secs.saturating_mul(1000);
                let t = self.peer.tls.invites().create(
                    kind,
                    ttl_ms,
                    crate::peer::now_ms(),
                    &self.peer.tls.pin,
                )?;
                tracing::info!(kind = ?kind, token = %t.id, ttl_secs, "invitation made");
                Ok(Response::ok(t.text()))
            }
            Request::MergeCluster { peer, token } => {
                let node = self.peer.merge_cluster(&peer, &token).await?;
                Ok(Response::ok(format!(
                    "merged the cluster of {node} ({peer}) into cluster {}",
                    self.peer.cluster_id()
                )))
            }
            Request::DebugBlock { nodes, blocked } => {
                self.peer.block(&nodes, blocked);
                let verb = if blocked { "blocked" } else { "unblocked" };
                Ok(Response::ok(format!("{verb} {}", nodes.join(", "))))
            }
        }
    }

    /// `primary RES` (handover: wait for all data, then switch) and `primary --force RES`
    /// (failover: switch now with the data this node has).
    async fn become_primary(self: &Arc<Self>, name: &str, force: bool) -> Result<Response> {
        let me = self.me().to_string();
        let (rr, r) = self.res_entry(name)?;
        // Decide on the cluster's metadata, not only on this node's: the
        // designated primary and every member that answers.
        let mut ask = r.members.clone();
        ask.extend(meta::designated_primary(&self.peer.store.lock(), &rr));
        ask.extend(self.witnesses(name));
        let answered = self.refresh_resource(&rr, &ask).await;
        let (rr, r) = self.res_entry(name)?;
        let current = meta::designated_primary(&self.peer.store.lock(), &rr);
        if let Some(cur) = current.as_deref().filter(|c| *c != me) {
            if !force && !self.peer.is_alive(cur) {
                bail!("{name}: the current primary {cur} cannot be reached; use `primary --force {name}` to fail over (data it did not send is lost)");
            }
        }
        let member = r.members.contains(&me);
        let mut delay_ms = 0;
        if member {
            let m = self.member_entry(name)?;
            delay_ms = m.replay_delay_ms;
            if !m.attached {
                bail!("{name}: disk is detached here; run `marsadm up {name}` first");
            }
            // A planned handover waits for this member to fetch and replay the
            // old primary's last writes: not while it does neither.
            let other = current.as_deref().is_some_and(|c| c != me);
            if !force && other && (m.pause_fetch || m.pause_replay || !m.connected) {
                bail!("{name}: refused: fetch or replay is paused here (or the resource is disconnected), so the handover could never complete; run `marsadm resume-fetch {name}`, `resume-replay {name}` or `connect {name}` first");
            }
            // A delayed replica's replay holds the old primary's last writes
            // back for the delay: the handover would leave nobody serving
            // the device that long.
            if !force && other && m.replay_delay_ms > 0 {
                bail!("{name}: refused: replay is kept {} behind the primary here (set-delay), so the handover would leave nobody serving the device for that long; run `marsadm set-delay {name} 0` first and wait for replay to catch up (`marsadm wait-resource {name} uptodate`), or `primary --force {name}` to take over now (it applies everything fetched first, so the delay ends and nothing fetched is lost)", mars_api::show_duration_ms(m.replay_delay_ms));
            }
        }
        let mut delayed_note = None;
        if !member {
            let mut missing = Vec::new();
            if current.as_deref() != Some(me.as_str()) {
                let key = meta::primary_key(&rr);
                self.peer.set(&key, serde_json::Value::String(me.clone()));
                missing = self.confirm(&[key], &r.members).await;
            }
            let resp = Response::ok(format!(
                "{name}: designated primary is now {me}; {me} is not a member yet, so no node serves the device until it joins"
            ));
            return Ok(noting(resp, &missing));
        }
        {
            let mut st = self.state.lock().await;
            let a = st.actual.entry(name.to_string()).or_default();
            if let Some(h) = &a.secondary {
                let p = h.progress.lock();
                if p.syncing || p.consistent_from.is_some() {
                    bail!("{name}: refused: this member's disk is inconsistent until its sync completes and replay passes a position (sync {} of {} bytes, then replay to {}; after a reboot of a secondary, replay must pass what may be on its disk); it cannot be primary", p.sync_done, p.sync_total, p.consistent_from.map(|c| c.to_string()).unwrap_or_else(|| "its end".into()));
                }
                if p.split_brain && !force {
                    bail!("{name}: refused: this member is in split brain with the log; use `primary --force {name}` to make its data the primary's, or `invalidate {name}` to sync it again");
                }
                // The writer's recovery applies every fetched record: a
                // delayed replica's held-back writes too (say so: the disk
                // jumps from the delayed image to the newest one fetched).
                if force && delay_ms > 0 && p.fetched > p.replayed {
                    delayed_note = Some(format!(
                        "; replay was kept {} behind (set-delay): the {} bytes of log fetched but not yet replayed were applied first, so nothing fetched is lost; the delay is cleared (set it again once this node is a secondary)",
                        mars_api::show_duration_ms(delay_ms),
                        p.fetched - p.replayed
                    ));
                }
                // A planned handover only to a member whose history replay has
                // checked against the current primary's own list: one that just
                // started (a former primary may hold another history) or that
                // has not seen the primary's list since it changed may turn out
                // to be in split brain after the old primary gave up its role,
                // and then nobody is primary.
                let confirmed = p.confirmed_for.is_some() && p.confirmed_for == current;
                if !force && current.as_deref().is_some_and(|c| c != me) && !confirmed {
                    bail!("{name}: refused: this member has not yet checked its history against the primary's log (it just started, it cannot reach the primary and fetches through another member, or the primary's log list changed a moment ago); try again once it reaches the primary (`marsadm wait-resource {name} uptodate` here waits until it has caught up and checked)");
                }
            }
            let writer =
                a.logger.is_some() || node::resource_dir(&self.dir, name).join("applied").exists();
            let member_designated = current
                .as_deref()
                .filter(|c| *c != me && r.members.iter().any(|m| m == c));
            if let Some(cur) = member_designated.filter(|_| writer && !force) {
                // A former primary that has not given up its log yet (it was
                // down or cut off when `cur` took over): its log may hold
                // another history, and taking over with it would drop what
                // `cur` wrote since.
                bail!("{name}: refused: this node still holds the log it wrote as primary before {cur} took over; it becomes a secondary of {cur} first (`marsadm wait-resource {name} uptodate`), then a handover is possible; `primary --force {name}` makes its own data the primary's instead");
            }
            let other = current.as_deref().filter(|c| *c != me);
            if let Some(cur) = other.filter(|_| writer && !force && answered == 0) {
                // `cur` is no member as far as this node knows, but nobody
                // confirmed it: this node's membership may be stale.
                bail!("{name}: refused: this node holds the log it wrote as primary, {cur} is designated, and no other node answered to confirm that {cur} is not a member that wrote since; try again once the cluster is reachable, or `primary --force {name}` to make this node's data the primary's");
            }
            if !writer {
                if force {
                    a.force_promote = true;
                } else {
                    let from = match current.as_deref().filter(|c| *c != me) {
                        Some(c) => Some(c.to_string()),
                        None => self.log_writer(&rr, &r.members),
                    };
                    match from {
                        Some(f) => a.handover_from = Some(f),
                        None => bail!("{name}: no reachable member writes its log; use `primary --force {name}` to become primary with the data this node has"),
                    }
                }
            }
        }
        if current.as_deref() != Some(me.as_str()) {
            self.peer.set(
                &meta::primary_key(&rr),
                serde_json::Value::String(me.clone()),
            );
        }
        // A delay is a secondary's: it does not come back when this node is a
        // secondary again (set it anew then). Written as is (the loop below
        // reconciles; a reconcile before the designation would forget
        // `force_promote`).
        if delay_ms > 0 {
            let mut m = self.member_entry(name)?;
            m.replay_delay_ms = 0;
            self.peer
                .set(&meta::member_key(&rr, self.me()), meta::to_value(&m));
        }
        // Wait for the old primary to stop and for its last writes to be replayed here.
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        loop {
            {
                let mut st = self.state.lock().await;
                self.reconcile_locked(&mut st, true).await;
                let a = st.actual.get(name);
                if a.is_some_and(|a| a.export.is_some()) {
                    let note = delayed_note.as_deref().unwrap_or("");
                    return outcome(&st, name, || {
                        format!(
                            "{name}: primary here, serving {}{note}",
                            self.device_uri(name)
                        )
                    });
                }
                if a.is_some_and(|a| a.logger.is_some() || a.error.is_some())
                    || node::resource_dir(&self.dir, name).join("applied").exists()
                {
                    let note = delayed_note.as_deref().unwrap_or("");
                    return outcome(&st, name, || format!("{name}: primary here{note}"));
                }
                if Instant::now() >= deadline {
                    let why = a
                        .and_then(|a| a.secondary.as_ref())
                        .map(|h| {
                            let p = h.progress.lock();
                            format!(
                                "replayed {} of {} fetched from {}{}",
                                p.replayed,
                                p.fetched,
                                p.source.as_deref().unwrap_or("nobody"),
                                if p.source_complete {
                                    ""
                                } else {
                                    ", which still writes"
                                }
                            )
                        })
                        .unwrap_or_default();
                    bail!("{name}: handover not complete after {} s ({why}); it goes on in the background (`marsadm wait-resource {name} primary`)", HANDOVER_TIMEOUT.as_secs());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Delete the logfiles of `name` that are written back here and replayed by
    /// every member. Returns the files deleted and the members that hold later
    /// ones back. `persist`: sync the disk first so that everything written back
    /// counts (`log-delete`, space shortage); else only what the persister already
    /// made durable counts (the routine space policy: a disk sync writes out all dirty
    /// pages of the disk and stalls the log's writes for as long).
    async fn delete_logs(&self, name: &str, persist: bool) -> Result<(Vec<String>, Vec<String>)> {
        let me = self.me().to_string();
        let dir = node::resource_dir(&self.dir, name);
        let logger = {
            let st = self.state.lock().await;
            st.actual.get(name).and_then(|a| a.logger.clone())
        };
        let persisted = match &logger {
            // With `persist`, what is written back (persisted first, below); else
            // what the persister made durable.
            Some(l) if persist => l.status().applied_pos,
            Some(l) => l.status().persisted_pos,
            // A secondary: what replay has durably applied (a restart resumes there).
            None => match mars_replication::persisted_replayed(&dir) {
                Some(p) => p,
                None => {
                    self.member_entry(name)?;
                    return Ok((Vec::new(), Vec::new()));
                }
            },
        };
        let (upto, lagging) = {
            let st = self.peer.store.lock();
            let Some((rr, r)) = meta::resource(&st, name) else {
                bail!("unknown resource {name}");
            };
            let members = r.members;
            let mut upto = u64::MAX;
            let mut lagging = Vec::new();
            for m in members.into_iter().filter(|m| *m != me) {
                // Durably: a member that loses power resumes there, and needs the
                // log from there on (its fetched copies are not synced).
                let replayed = meta::get::<ActualEntry>(&st, &meta::actual_key(&rr, &m))
                    .map(|a| a.replayed_durable.unwrap_or(a.replayed).min(a.replayed))
                    .unwrap_or(0);
                upto = upto.min(replayed);
                if replayed < persisted {
                    lagging.push(format!("{m} (replayed {replayed} of {persisted})"));
                }
            }
            (upto, lagging)
        };
        let deleted = match logger {
            Some(l) => {
                tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
                    // The persister persists only every few seconds.
                    if persist {
                        l.persist_now()?;
                    }
                    Ok(l.delete_applied_before(upto)?)
                })
                .await??
            }
            None => {
                let upto = upto.min(persisted);
                tokio::task::spawn_blocking(move || {
                    mars_logger::replay::delete_replayed(&dir, upto)
                })
                .await??
            }
        };
        if !deleted.is_empty() {
            tracing::info!(resource = %name, files = ?deleted, "logfiles deleted");
        }
        Ok((deleted, lagging))
    }

    /// The space policy: when the logfiles of a resource take more than
    /// `log_keep_bytes`, delete those that every member has replayed. When the
    /// log space runs out (`log_space_bytes`, `emergency_free_bytes`), emergency
    /// mode: delete what is written back here even if members have not replayed
    /// it (they will need `invalidate`), so that the primary keeps writing.
    async fn apply_space_policy(&self) {
        let names: Vec<String> = {
            let st = self.state.lock().await;
            st.actual
                .iter()
                .filter(|(_, a)| a.logger.is_some() || a.secondary.is_some())
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in names {
            let dir = node::resource_dir(&self.dir, &name);
            let used = log_bytes(&dir);
            let short = self.out_of_log_space(&dir, used);
            if short {
                // Room for the applied position, which must be persisted before
                // any logfile can go.
                self.release_space_reserve();
            }
            if used > self.cfg.log_keep_bytes || short {
                if let Err(e) = self.delete_logs(&name, short).await {
                    tracing::debug!(resource = %name, "space policy: {e:#}");
                }
            }
            let used = log_bytes(&dir);
            let spares = mars_logger::spare_bytes(&dir).unwrap_or(0);
            let over_limit = self.cfg.log_space_bytes > 0
                && spares > 0
                && used + spares > self.cfg.log_space_bytes;
            if over_limit || self.out_of_log_space(&dir, used) {
                // Spare logfiles go first: they only save time.
                let spare_dir = dir.clone();
                match tokio::task::spawn_blocking(move || mars_logger::drop_spares(&spare_dir))
                    .await
                {
                    Ok(Ok(0)) => {}
                    Ok(Ok(freed)) => {
                        tracing::warn!(resource = %name, freed, "log space short: spare logfiles removed")
                    }
                    Ok(Err(e)) => tracing::warn!(resource = %name, "removing spare logfiles: {e}"),
                    Err(e) => tracing::warn!(resource = %name, "removing spare logfiles: {e}"),
                }
                if !self.out_of_log_space(&dir, used) {
                    continue;
                }
                let Ok(l) = self.logger(&name).await else {
                    continue;
                };
                let deleted =
                    tokio::task::spawn_blocking(move || l.delete_applied_without_spares())
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r.map_err(anyhow::Error::from));
                match deleted {
                    Ok(d) if !d.is_empty() => {
                        tracing::error!(resource = %name, files = ?d, used, "EMERGENCY MODE: log space exhausted; deleted logfiles not every member has replayed; those members need `marsadm invalidate {name}`");
                        let mut st = self.state.lock().await;
                        if let Some(a) = st.actual.get_mut(&name) {
                            a.emergency = true;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(resource = %name, "emergency deletion: {e:#}"),
                }
            }
        }
        // After any deletion: the reserve back, for the next time.
        self.keep_space_reserve();
        // Emergency mode ends when no member is cut off any more: every one has
        // replayed up to the oldest logfile left, or resynced.
        let mut st = self.state.lock().await;
        let store = self.peer.store.lock();
        for (name, a) in st.actual.iter_mut().filter(|(_, a)| a.emergency) {
            let oldest = mars_logger::list_logfiles(&node::resource_dir(&self.dir, name))
                .ok()
                .and_then(|l| {
                    l.first()
                        .and_then(|e| mars_replication::logdir::logfile_start(&e.path).ok())
                })
                .unwrap_or(0);
            let Some((rr, r)) = meta::resource(&store, name) else {
                continue;
            };
            let cut_off = r.members.iter().filter(|m| **m != self.me()).any(|m| {
                meta::get::<ActualEntry>(&store, &meta::actual_key(&rr, m)).is_none_or(|e| {
                    e.emergency
                        || matches!(e.disk.as_str(), "syncing" | "inconsistent")
                        || e.replayed < oldest
                })
            });
            if !cut_off {
                tracing::info!(resource = %name, "emergency mode over: every member is in sync again");
                a.emergency = false;
            }
        }
    }

    /// The node directory keeps `SPACE_RESERVE` bytes in a file of its own
    /// while space is plentiful: when the filesystem fills up, it is given
    /// back first, so that the applied position can be persisted and
    /// replayed logfiles deleted (on a full filesystem even that small write
    /// fails, and no logfile could ever go).
    fn keep_space_reserve(&self) {
        let path = self.dir.join(SPACE_RESERVE_FILE);
        if path.exists() || free_bytes(&self.dir).is_none_or(|f| f < 2 * SPACE_RESERVE) {
            return;
        }
        let made = std::fs::File::create(&path).and_then(|f| {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open descriptor; a range within i64.
            let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, SPACE_RESERVE as i64) };
            if r != 0 {
                return Err(std::io::Error::from_raw_os_error(r));
            }
            f.sync_all()
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            tracing::debug!("space reserve: {e}");
        }
    }

    fn release_space_reserve(&self) {
        let path = self.dir.join(SPACE_RESERVE_FILE);
        if std::fs::remove_file(&path).is_ok() {
            tracing::warn!(
                bytes = SPACE_RESERVE,
                "node directory short of space: its reserve given back"
            );
        }
    }

    fn out_of_log_space(&self, dir: &Path, used: u64) -> bool {
        (self.cfg.log_space_bytes > 0 && used > self.cfg.log_space_bytes)
            || free_bytes(dir).is_some_and(|f| f < self.cfg.emergency_free_bytes)
    }

    /// The designated primary's durable log position, asked from it now (on a
    /// member that is not the primary; `None` when it cannot be asked).
    async fn primary_written_now(&self, res: &str) -> Option<(String, u64)> {
        // Only members hear the primary: a non-member has no view of the replay anyway.
        let (rr, r) = meta::resource(&self.peer.store.lock(), res)?;
        if !r.members.iter().any(|m| m == self.me()) {
            return None;
        }
        let p = meta::designated_primary(&self.peer.store.lock(), &rr)?;
        if p == self.me() || !self.peer.is_alive(&p) {
            return None;
        }
        let ask = async {
            let mut s = self.peer.connect(&p).await?;
            write_msg(&mut s, &Msg::LogStatus { res: rr.token() }).await?;
            match read_msg(&mut s).await? {
                Msg::SyncInfo { pos, .. } => Ok(pos),
                other => bail!("unexpected answer to LogStatus: {other:?}"),
            }
        };
        match tokio::time::timeout(Duration::from_secs(2), ask).await {
            Ok(Ok(pos)) => Some((p, pos)),
            Ok(Err(e)) => {
                tracing::debug!(resource = %res, primary = %p, "log status: {e:#}");
                None
            }
            Err(_) => None,
        }
    }

    /// `resize RES [BYTES]`: grow the device; every member's disk must hold it.
    async fn resize(self: &Arc<Self>, name: &str, bytes: Option<u64>) -> Result<Response> {
        let (rr, r) = self.res_entry(name)?;
        let sizes: Vec<(String, u64)> = {
            let store = self.peer.store.lock();
            r.members
                .iter()
                .map(|m| {
                    let size = meta::get::<ActualEntry>(&store, &meta::actual_key(&rr, m))
                        .map(|a| a.disk_size)
                        .unwrap_or(0);
                    (m.clone(), size)
                })
                .collect()
        };
        if let Some((m, _)) = sizes.iter().find(|(_, s)| *s == 0) {
            bail!("{name}: refused: the disk size of member {m} is not known (is it running and attached?)");
        }
        let smallest = sizes.iter().map(|(_, s)| *s).min().unwrap_or(0);
        let want = bytes.unwrap_or(smallest);
        if want < r.size {
            bail!("{name}: refused: shrinking ({} to {want} bytes) would lose data; only growing is supported", r.size);
        }
        if want == r.size {
            return Ok(Response::ok(format!("{name}: already {want} bytes")));
        }
        if let Some((m, s)) = sizes.iter().find(|(_, s)| *s < want) {
            bail!("{name}: refused: member {m}'s disk holds only {s} bytes, {want} needed");
        }
        // Its own key, not the incarnation's: a resize racing a delete
        // elsewhere cannot bring the incarnation back.
        self.peer.set(&meta::size_key(&rr), serde_json::json!(want));
        tracing::info!(resource = %name, from = r.size, to = want, "resized");
        let missing = self.confirm(&[meta::size_key(&rr)], &r.members).await;
        let mut st = self.state.lock().await;
        self.reconcile_locked(&mut st, true).await;
        let resp = outcome(&st, name, || {
            format!(
                "{name}: resized from {} to {want} bytes (new NBD connections see the new size)",
                r.size
            )
        })?;
        Ok(noting(resp, &missing))
    }

    /// `invalidate RES`: throw away this secondary's log copies and replay state, sync again.
    async fn invalidate(self: &Arc<Self>, name: &str) -> Result<Response> {
        let me = self.me().to_string();
        let m = self.member_entry(name)?;
        let (rr, _) = self.res_entry(name)?;
        let designated = meta::designated_primary(&self.peer.store.lock(), &rr);
        if designated.as_deref() == Some(me.as_str()) {
            bail!("{name}: refused: {me} is the designated primary; make another member primary first");
        }
        // The primary, or (while it is away) a member with a consistent disk: the
        // secondary task picks the same way when it syncs.
        let source = match designated.clone().filter(|d| self.peer.is_alive(d)) {
            Some(p) => p,
            None => {
                let members = mars_replication::secondary::reports(&self.peer.store.lock(), &rr);
                policy::consistent_member(&members, |m| {
                    m != me && Some(m) != designated.as_deref() && self.peer.is_alive(m)
                })
            }
            .ok_or_else(|| {
                anyhow::anyhow!("{name}: refused: no reachable primary or member with a consistent disk to sync from")
            })?,
        };
        if !m.attached {
            bail!("{name}: disk is detached here; run `marsadm up {name}` first");
        }
        let mut st = self.state.lock().await;
        let a = st.actual.entry(name.to_string()).or_default();
        if let Some(h) = self.take_secondary(name, a) {
            h.stop().await;
        }
        self.stop_serving(name, a).await;
        if let Some(l) = self.take_logger(name, a) {
            close_logger(l).await;
        }
        let dir = node::resource_dir(&self.dir, name);
        let removed = tokio::task::spawn_blocking(move || -> Result<usize> {
            let mut n = 0;
            for e in std::fs::read_dir(&dir)?.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                let state = [
                    "applied",
                    "sync",
                    mars_logger::replay::REPLAYED_FILE,
                    mars_logger::replay::HW_FILE,
                    mars_replication::LAG_CLOCK_FILE,
                ]
                .contains(&f.as_str());
                if state || f.starts_with("log-") || f.starts_with("version-") {
                    std::fs::remove_file(e.path())?;
                    n += 1;
                }
            }
            mars_logger::crashsafe::sync_dir(&dir)?;
            Ok(n)
        })
        .await??;
        tracing::warn!(resource = %name, files = removed, "invalidated: local data is no longer a replica; full sync from {source}");
        a.published = None;
        a.error = None;
        self.reconcile_locked(&mut st, true).await;
        Ok(Response::ok(format!(
            "{name}: invalidated; full sync from {source} (watch `marsadm view {name}`)"
        )))
    }

    /// The reachable member that reports writing the log of `res` (a logger attached).
    fn log_writer(&self, res: &ResRef, members: &[String]) -> Option<String> {
        let store = self.peer.store.lock();
        members
            .iter()
            .filter(|m| *m != self.me() && self.peer.is_alive(m))
            .find(|m| {
                meta::get::<ActualEntry>(&store, &meta::actual_key(res, m))
                    .is_some_and(|a| a.logfile.is_some())
            })
            .cloned()
    }

    /// After pause-replay: return once no replay step runs any more, so the disk holds still.
    async fn wait_replay_stopped(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = {
                let st = self.state.lock().await;
                st.actual
                    .get(name)
                    .and_then(|a| a.secondary.as_ref())
                    .is_some_and(|h| h.progress.lock().replaying)
            };
            if !running {
                return Ok(());
            }
            if Instant::now() > deadline {
                // The pause stays (it is what was asked): say that it is set and what
                // is still running, rather than a refusal that changed nothing.
                bail!("{name}: replay is paused, but the step it was in did not end within 60 s (a slow disk?): the disk holds still once it ends; `resume-replay {name}` undoes the pause");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn delete_resource(&self, name: &str) -> Result<Response> {
        let (rr, r) = self.res_entry(name)?;
        // Every entry of this incarnation, and no other's: its keys name its id.
        let keys = meta::keys_of(&self.peer.store.lock(), &rr);
        for k in keys.iter().rev() {
            self.peer.delete(k);
        }
        // Members hold the deletion before this returns (those that answer;
        // each stops serving at its next control-loop step, at once on the
        // news), and so do the name's witnesses, so that the name is free for
        // a `create-resource` right after on any node (which asks them).
        let mut tell = r.members.clone();
        tell.extend(self.witnesses(&rr.name));
        tell.sort();
        tell.dedup();
        let missing = self.confirm(&keys, &tell).await;
        self.reconcile().await;
        let resp = Response::ok(format!(
            "resource {} deleted (disks were left as they are)",
            rr.name
        ));
        Ok(noting(resp, &missing))
    }

    async fn join_resource(self: &Arc<Self>, name: &str, disk: &str) -> Result<Response> {
        let me = self.me().to_string();
        let (rr, r) = self.res_entry(name)?;
        if r.members.contains(&me) {
            bail!("{me} is already a member of {name}");
        }
        // A non-member has no resource entries yet (who is primary, what the
        // members report): take them from a member first.
        self.pull_resource(&rr, &r.members).await;
        let disk_path = std::fs::canonicalize(disk).with_context(|| format!("disk {disk}"))?;
        let size = mars_logger::disk::disk_size(&disk_path)
            .with_context(|| format!("disk {}", disk_path.display()))?;
        if size < r.size {
            bail!(
                "disk {} has {size} bytes, {name} needs {}",
                disk_path.display(),
                r.size
            );
        }
        if let Some(other) = self.desired().values().find(|x| x.disk == disk_path) {
            bail!(
                "disk {} is already used by resource {}",
                disk_path.display(),
                other.name
            );
        }
        let rdir = node::resource_dir(&self.dir, name);
        self.clear_deleted_dir(name).await?;
        // No reconcile between here and the membership entry: a node that
        // left this incarnation holds a tombstone of its membership, and a
        // reconcile would remove the directory made here as left over.
        let st = self.state.lock().await;
        if rdir.exists() {
            bail!(
                "{} exists (left over from an earlier membership?); remove it first",
                rdir.display()
            );
        }
        self.own_dir(&rdir, &rr)?;
        // This node's disk is recorded here, and only here, before the
        // metadata names the membership.
        if let Err(e) = node::write_local_disk(&rdir, &disk_path) {
            let _ = std::fs::remove_dir_all(&rdir);
            return Err(e);
        }
        let member = MemberEntry::up(&disk_path);
        self.peer
            .set(&meta::member_key(&rr, &me), meta::to_value(&member));
        self.peer.set(
            &meta::membership_key(&rr, &me),
            serde_json::Value::Bool(true),
        );
        drop(st);
        // The primary records the new member before this command returns (so
        // that `wait-resource` there waits for it), or this says it did not.
        let primary = meta::designated_primary(&self.peer.store.lock(), &rr);
        let keys = [meta::membership_key(&rr, &me), meta::member_key(&rr, &me)];
        let missing = match primary.filter(|p| *p != me) {
            Some(p) => self.confirm(&keys, &[p]).await,
            None => Vec::new(),
        };
        self.reconcile().await;
        let resp = Response::ok(format!(
            "{me} joined {name} as a secondary; a full sync runs (see `marsadm view {name}`)"
        ));
        Ok(noting(resp, &missing))
    }

    async fn leave_resource(self: &Arc<Self>, name: &str) -> Result<Response> {
        let me = self.me().to_string();
        let (rr, mut r) = self.res_entry(name)?;
        if !r.members.contains(&me) {
            bail!("{me} is not a member of {name}");
        }
        let primary = meta::designated_primary(&self.peer.store.lock(), &rr);
        if primary.as_deref() == Some(me.as_str()) && r.members.len() > 1 {
            bail!("{me} is the primary of {name}; hand over first (`marsadm primary {name}` on another member)");
        }
        r.members.retain(|m| *m != me);
        if r.members.is_empty() {
            return self.delete_resource(name).await;
        }
        let keys = [
            meta::membership_key(&rr, &me),
            meta::member_key(&rr, &me),
            meta::actual_key(&rr, &me),
        ];
        for k in &keys {
            self.peer.delete(k);
        }
        let missing = self.confirm(&keys, &r.members).await;
        self.reconcile().await;
        let rdir = node::resource_dir(&self.dir, name);
        let _ = std::fs::remove_dir_all(&rdir);
        let resp = Response::ok(format!("{me} left {name} (its disk was left as it is)"));
        Ok(noting(resp, &missing))
    }

    /// `migrate RES NODE --leave`, on the new primary: remove the member
    /// `node` (the former primary) from `name`. Only the designated primary
    /// that serves the resource removes another member, so that the copy
    /// removed is never the one holding writes nobody else has. The removal
    /// is a deletion of `node`'s membership, member and actual entries (a
    /// tombstone, which every node admits from any node, as it does
    /// `delete-resource`'s); `node` sees its membership gone, stops the
    /// resource and removes its directory there (its disk is left as it
    /// is), as `leave-resource` would have done.
    async fn remove_member(self: &Arc<Self>, name: &str, node: &str) -> Result<Response> {
        let me = self.me().to_string();
        if node == me {
            bail!("{node} is this node: run `marsadm leave-resource {name}` instead");
        }
        let (rr, mut r) = self.res_entry(name)?;
        if !r.members.iter().any(|m| m == node) {
            return Ok(Response::ok(format!(
                "{node} is not a member of {name} (any more)"
            )));
        }
        let primary = meta::designated_primary(&self.peer.store.lock(), &rr);
        if primary.as_deref() != Some(me.as_str()) {
            bail!(
                "{name}: only its primary removes another member, and {me} is not ({})",
                primary
                    .map(|p| format!("{p} is designated"))
                    .unwrap_or_else(|| "none is designated".into())
            );
        }
        let serving = {
            let st = self.state.lock().await;
            st.actual.get(name).is_some_and(|a| a.export.is_some())
        };
        if !serving {
            bail!("{name}: {me} is designated primary but does not serve the device yet (`marsadm wait-resource {name} primary`); a member is removed only by a primary that holds all data");
        }
        let keys = [
            meta::membership_key(&rr, node),
            meta::member_key(&rr, node),
            meta::actual_key(&rr, node),
        ];
        for k in &keys {
            self.peer.delete(k);
        }
        r.members.retain(|m| m != node);
        let mut tell = r.members.clone();
        tell.push(node.to_string());
        tell.extend(self.witnesses(name));
        tell.sort();
        tell.dedup();
        let missing = self.confirm(&keys, &tell).await;
        self.reconcile().await;
        tracing::info!(resource = %name, member = %node, "member removed");
        let resp = Response::ok(format!(
            "{node} removed from {name} (it stops there and removes its logs; its disk is left as it is)"
        ));
        Ok(noting(resp, &missing))
    }

    /// `marsadm keyring`: the gossip keys of the cluster. Install, use and
    /// remove are metadata changes, handed to every node at once (and by
    /// anti-entropy to those away): install a new key, `use` it once every
    /// node has it, then remove the old one.
    async fn keyring(self: &Arc<Self>, op: mars_api::KeyringOp) -> Result<Response> {
        use mars_api::KeyringOp;
        use mars_proto::gossip::{key_id, parse_key};
        let key_of = |k: &str| {
            parse_key(k).ok_or_else(|| {
                anyhow::anyhow!(
                    "not a gossip key: 64 hex digits, as `marsadm keyring generate` prints"
                )
            })
        };
        let ring = self.peer.keyring();
        let entry = |id: u32| format!("{}{id:08x}", meta::GOSSIP_KEY_PREFIX);
        let key = match &op {
            KeyringOp::List => {
                let lines: Vec<String> = ring
                    .ids()
                    .into_iter()
                    .map(|id| {
                        let used = if ring.primary() == Some(id) {
                            "  in use"
                        } else {
                            ""
                        };
                        format!("{id:08x}{used}")
                    })
                    .collect();
                return Ok(Response::ok(lines.join("\n")));
            }
            KeyringOp::Install { key } => {
                let k = key_of(key)?;
                let id = key_id(&k);
                if ring.ids().contains(&id) {
                    return Ok(Response::ok(format!("key {id:08x} is installed already")));
                }
                self.peer.set(
                    &entry(id),
                    serde_json::Value::String(mars_proto::gossip::key_text(&k)),
                );
                entry(id)
            }
            KeyringOp::Use { key } => {
                let id = key_id(&key_of(key)?);
                if !ring.ids().contains(&id) {
                    bail!("key {id:08x} is not installed: `marsadm keyring install` it first (on any node), then use it");
                }
                self.peer.set(
                    meta::GOSSIP_PRIMARY_KEY,
                    serde_json::Value::String(format!("{id:08x}")),
                );
                meta::GOSSIP_PRIMARY_KEY.to_string()
            }
            KeyringOp::Remove { key } => {
                let id = key_id(&key_of(key)?);
                if ring.primary() == Some(id) {
                    bail!("key {id:08x} is in use: `marsadm keyring use` another key first");
                }
                if !ring.ids().contains(&id) {
                    bail!("key {id:08x} is not installed");
                }
                self.peer.delete(&entry(id));
                entry(id)
            }
        };
        let nodes: Vec<String> = meta::nodes(&self.peer.store.lock())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let missing = self.confirm(&[key], &nodes).await;
        Ok(noting(
            Response::ok("keyring changed".to_string()),
            &missing,
        ))
    }

    /// Revoke node `n`'s certificate (the entry is kept for good; revoked
    /// first, so that this node never rotates the gossip key for itself) and
    /// delete its node entry; both in one push to at most `pushes` live nodes
    /// at once: a node that has either refuses `n` from then on (the deletion
    /// also goes by gossip), and the revocation, which gossip never carries,
    /// spreads from them by anti-entropy.
    async fn revoke(self: &Arc<Self>, n: &meta::NodeRef, pushes: usize) {
        let revoked = crate::tls::revoked_key(&n.token());
        self.peer.set(
            &revoked,
            serde_json::json!({ "at_ms": crate::peer::now_ms() }),
        );
        let node_key = meta::node_key(n);
        self.peer.delete(&node_key);
        self.peer
            .push_entries_to_live(&[&revoked, &node_key], pushes)
            .await;
    }

    /// `leave-cluster --node NAME`: revoke another node's certificate and
    /// delete its entry (a node gone for good, whose directory may still
    /// hold its keys; or, with `force`, a live one that is compromised).
    async fn remove_node(self: &Arc<Self>, name: &str, force: bool) -> Result<Response> {
        if name == self.me() {
            bail!("{name} is this node: run `marsadm leave-cluster` without --node");
        }
        let (n, member_of) = {
            let store = self.peer.store.lock();
            let Some((n, _)) = meta::node(&store, name) else {
                bail!("no node named {name} in the cluster");
            };
            let member_of: Vec<String> = meta::all_incarnations(&store)
                .into_iter()
                .filter(|(_, r)| r.members.iter().any(|m| m == name))
                .map(|(r, _)| r.name)
                .collect();
            (n, member_of)
        };
        if !member_of.is_empty() {
            bail!(
                "{name} is a member of {}: it must leave those resources first",
                member_of.join(", ")
            );
        }
        if self.peer.is_alive(name) && !force {
            bail!(
                "{name} is alive: run `marsadm leave-cluster` on it, or add --force to revoke it anyway (a compromised node)"
            );
        }
        self.revoke(&n, usize::MAX).await;
        tracing::info!(node = %n.token(), "node removed from the cluster; its certificate is revoked");
        Ok(Response::ok(format!(
            "{} removed from the cluster: its certificate is revoked",
            n.token()
        )))
    }

    /// `marsadm scrub RES`: a pass over this node's copy now.
    async fn scrub(self: &Arc<Self>, name: &str) -> Result<Response> {
        self.member_entry(name)?;
        let dir = {
            let st = self.state.lock().await;
            st.actual.get(name).map(|a| a.dir.clone())
        };
        let Some(dir) = dir else {
            bail!("{name}: disk is not attached here; run `marsadm up {name}` first");
        };
        let started = self
            .scrubs
            .start(&dir, self.cfg.scrub_rate_bytes)
            .map_err(|e| anyhow::anyhow!("{name}: {e:#}"))?;
        Ok(Response::ok(if started {
            format!("{name}: scrub started; `marsadm view {name}` shows its progress and result")
        } else {
            format!("{name}: a scrub runs already")
        }))
    }

    /// `marsadm verify RES`: compare every member's copy with the primary's
    /// from this node (started, or the one running joined).
    async fn verify(
        self: &Arc<Self>,
        name: &str,
        repair: bool,
        rate: Option<u64>,
        restart: bool,
    ) -> Result<Response> {
        self.member_entry(name)?;
        if self.verifies.running(name) {
            return Ok(Response::ok(format!("{name}: a verify runs already")));
        }
        let dir = {
            let st = self.state.lock().await;
            st.actual.get(name).map(|a| a.dir.clone())
        };
        let Some(dir) = dir else {
            bail!("{name}: disk is not attached here; run `marsadm up {name}` first");
        };
        let co = self.verify_ctx().coordinator(name, &dir, repair)?;
        co.rate
            .store(rate.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
        let from = if restart {
            0
        } else {
            crate::verify::last(&dir)
                .and_then(|l| l.resume_at)
                .unwrap_or(0)
        };
        self.verifies.start(name, co, from);
        Ok(Response::ok(if from > 0 {
            format!("{name}: verify goes on from byte {from} (where the last one stopped; --restart starts anew)")
        } else {
            format!("{name}: verify started")
        }))
    }

    /// Start the background scrubs that are due (node setting
    /// `scrub_interval_secs`).
    async fn scrubs_due(self: &Arc<Self>) {
        let dirs: Vec<PathBuf> = {
            let st = self.state.lock().await;
            st.actual.values().map(|a| a.dir.clone()).collect()
        };
        let interval = Duration::from_secs(self.cfg.scrub_interval_secs);
        for d in dirs {
            self.scrubs.due(
                &d,
                interval,
                self.cfg.scrub_rate_bytes,
                crate::peer::now_ms(),
            );
        }
    }

    async fn leave_cluster(self: &Arc<Self>) -> Result<Response> {
        /// Live nodes a leaving node tells itself (the rest learn it from them).
        const LEAVE_PUSHES: usize = 8;
        let me = self.me().to_string();
        let member_of: Vec<String> = {
            let store = self.peer.store.lock();
            meta::all_incarnations(&store)
                .into_iter()
                .filter(|(_, r)| r.members.contains(&me))
                .map(|(n, _)| n.name)
                .collect()
        };
        if !member_of.is_empty() {
            bail!(
                "{me} is still a member of {}; leave or delete those resources first",
                member_of.join(", ")
            );
        }
        let mine = meta::node(&self.peer.store.lock(), &me).map(|(n, _)| n);
        if let Some(n) = mine {
            self.revoke(&n, LEAVE_PUSHES).await;
        }
        self.peer.cluster.lock().leave();
        self.peer.save();
        let node_file = self.dir.join(node::NODE_FILE);
        let left = self.dir.join("node.json.left");
        std::fs::rename(&node_file, &left)
            .with_context(|| format!("cannot rename {}", node_file.display()))?;
        // Its keys (the CA's among them) go with it: a copy left behind could
        // mint certificates.
        let tls_dir = crate::tls::tls_dir(&self.dir);
        if let Err(e) = std::fs::remove_dir_all(&tls_dir) {
            tracing::warn!("cannot remove {}: {e}", tls_dir.display());
        }
        tracing::info!("left the cluster; marsd stops");
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::process::exit(0);
        });
        Ok(Response::ok(format!(
            "{me} left the cluster; marsd stops and {} is no longer a node directory",
            self.dir.display()
        )))
    }

    async fn logger(&self, name: &str) -> Result<Arc<Logger>> {
        self.member_entry(name)?;
        let st = self.state.lock().await;
        match st.actual.get(name).and_then(|a| a.logger.clone()) {
            Some(l) => Ok(l),
            None => bail!("{name}: disk is not attached here; run `marsadm up {name}` first"),
        }
    }

    /// Change this member's desired switches and converge.
    async fn set_member(
        self: &Arc<Self>,
        name: &str,
        f: impl FnOnce(&mut MemberEntry),
    ) -> Result<Response> {
        let mut m = self.member_entry(name)?;
        let (rr, r) = self.res_entry(name)?;
        f(&mut m);
        let key = meta::member_key(&rr, self.me());
        self.peer.set(&key, meta::to_value(&m));
        let missing = self.confirm(&[key], &r.members).await;
        let mut st = self.state.lock().await;
        self.reconcile_locked(&mut st, true).await;
        let serving = st.actual.get(name).is_some_and(|a| a.export.is_some());
        let resp = outcome(&st, name, || {
            let disk = if m.attached { "attached" } else { "detached" };
            let conn = if m.connected {
                "connected"
            } else {
                "disconnected"
            };
            let serving = if serving {
                format!(", serving {}", self.device_uri(name))
            } else {
                String::new()
            };
            format!("{name}: disk {disk}, {conn}{serving}")
        })?;
        Ok(noting(resp, &missing))
    }

    async fn create_resource(self: &Arc<Self>, name: &str, disk: &str) -> Result<Response> {
        node::check_name("resource", name)?;
        if meta::resource(&self.peer.store.lock(), name).is_some() {
            // Deleted a moment ago elsewhere? Ask before refusing.
            self.ask_cluster(name).await;
        }
        if let Some((rr, _)) = meta::resource(&self.peer.store.lock(), name) {
            bail!("resource {name} already exists ({rr})");
        }
        let disk_path = std::fs::canonicalize(disk).with_context(|| format!("disk {disk}"))?;
        let size = mars_logger::disk::disk_size(&disk_path)
            .with_context(|| format!("disk {}", disk_path.display()))?;
        if size == 0 {
            bail!(
                "disk {} is empty (0 bytes); give it the size the device should have",
                disk_path.display()
            );
        }
        if let Some(other) = self.desired().values().find(|r| r.disk == disk_path) {
            bail!(
                "disk {} is already used by resource {}",
                disk_path.display(),
                other.name
            );
        }
        let rdir = node::resource_dir(&self.dir, name);
        self.clear_deleted_dir(name).await?;
        if rdir.exists() {
            bail!("{} exists but holds no resource (left over from an interrupted delete?); remove it first", rdir.display());
        }
        let mut st = self.state.lock().await;
        if st.actual.contains_key(name) {
            bail!(
                "{name}: this node still runs an earlier incarnation of it; try again in a moment"
            );
        }
        // Attach first: a disk that cannot be attached refuses the command before any metadata changes.
        let resource_id: u64 = rand::random();
        let rr = ResRef::new(name, resource_id);
        self.own_dir(&rdir, &rr)?;
        // This node's disk is recorded here, and only here (the metadata's
        // path is for display).
        if let Err(e) = node::write_local_disk(&rdir, &disk_path) {
            let _ = std::fs::remove_dir_all(&rdir);
            return Err(e);
        }
        let cfg = ResourceConfig {
            format: node::FORMAT,
            name: name.to_string(),
            size,
            resource_id,
            disk: disk_path.clone(),
            members: vec![self.me().to_string()],
            designated_primary: Some(self.me().to_string()),
            attached: true,
            connected: true,
            pause_sync: false,
            pause_fetch: false,
            pause_replay: false,
            fetch_rate: 0,
            sync_rate: 0,
            replay_delay_ms: 0,
        };
        let lcfg = self.logger_config(&cfg);
        let logger = match tokio::task::spawn_blocking(move || Logger::open(lcfg)).await? {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&rdir);
                bail!("cannot attach {name}: {e}");
            }
        };
        let logger = Arc::new(logger);
        self.served.set_logger(name, Some(logger.clone()));
        st.actual.insert(
            name.to_string(),
            Actual {
                id: resource_id,
                logger: Some(logger),
                ..Default::default()
            },
        );
        let me = self.me().to_string();
        let member = MemberEntry::up(&disk_path);
        self.peer
            .set(&meta::member_key(&rr, &me), meta::to_value(&member));
        self.peer.set(
            &meta::primary_key(&rr),
            serde_json::Value::String(me.clone()),
        );
        self.peer.set(
            &meta::membership_key(&rr, &me),
            serde_json::Value::Bool(true),
        );
        // A statement of its own: the store's lock must be released before `set`.
        let created = self.peer.store.lock().clock() + 1;
        self.peer.set(
            &meta::res_key(&rr),
            meta::to_value(&ResEntry {
                size,
                resource_id,
                created,
                members: Vec::new(),
            }),
        );
        self.reconcile_locked(&mut st, true).await;
        drop(st);
        // The name's witnesses know before this returns (a command naming it
        // on another node asks them), and a twin made at the same instant
        // elsewhere is found and named.
        let keys = [meta::res_key(&rr), meta::membership_key(&rr, &me)];
        let missing = self.confirm(&keys, &self.witnesses(name)).await;
        let twins: Vec<String> = meta::incarnations(&self.peer.store.lock(), name)
            .into_iter()
            .filter(|(t, _)| *t != rr)
            .map(|(t, _)| t.token())
            .collect();
        let mut msg = format!(
            "resource {name} created ({size} bytes); serving {}",
            self.device_uri(name)
        );
        if !twins.is_empty() {
            msg.push_str(&format!("; WARNING: {name} was also created elsewhere at the same time ({}): `marsadm view {name}` shows both; delete one with `marsadm delete-resource NAME@ID`", twins.join(", ")));
        }
        Ok(noting(Response::ok(msg), &missing))
    }

    /// Before `create-resource` or `join-resource` under a name: a directory
    /// that holds a deleted incarnation of it (this node left or the resource
    /// was deleted a moment ago) goes now. A step of the control loop, under
    /// the state lock, stops what still runs of it (a logger must not go on
    /// writing into the directory or onto the disk of the next one) and
    /// removes the directory (`remove_deleted_dirs`).
    async fn clear_deleted_dir(&self, name: &str) -> Result<()> {
        let rdir = node::resource_dir(&self.dir, name);
        let Some(held) = node::read_incarnation(&rdir) else {
            return Ok(());
        };
        if !meta::deleted(&self.peer.store.lock(), &held) {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        self.reconcile_locked(&mut st, false).await;
        let running = st
            .actual
            .get(name)
            .is_some_and(|a| a.id == held.id || a.id == 0);
        if running || rdir.exists() {
            bail!("{name}: this node still runs or holds {held}, which was deleted (marsd's log says why it could not be removed); try again in a moment");
        }
        Ok(())
    }

    /// For resources this node is not a member of, fetch their entries from a live member.
    /// Before the first reconcile after a start: for each resource this node
    /// would serve as primary by its own metadata, ask another member for
    /// theirs (at most `STARTUP_PULL` in all). A node restarted after it
    /// missed a failover (down or cut off while another member was forced
    /// primary) would otherwise serve its old history until gossip told it
    /// (found by the nemesis: a client could write to it, and those writes
    /// were lost when it learned).
    pub async fn catch_up_before_serving(&self) {
        let me = self.me().to_string();
        // The members first, then every other node known: what this node
        // learned by gossip just before it was killed may not have been saved.
        let todo: Vec<(ResRef, Vec<String>)> = {
            let store = self.peer.store.lock();
            let nodes: Vec<String> = meta::nodes(&store).into_iter().map(|(n, _)| n).collect();
            meta::resources(&store)
                .into_iter()
                .filter(|(rr, _)| meta::designated_primary(&store, rr).as_deref() == Some(&me))
                .map(|(name, r)| {
                    let mut ask: Vec<String> = r.members;
                    ask.extend(
                        nodes
                            .iter()
                            .filter(|n| !ask.contains(n))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    ask.retain(|m| *m != me);
                    (name, ask)
                })
                .collect()
        };
        let deadline = Instant::now() + STARTUP_PULL;
        for (name, members) in todo {
            for m in members {
                let left = deadline.saturating_duration_since(Instant::now());
                // The resource's entries, and the cluster's (its members are
                // cluster entries; an exchange takes whole scopes only).
                let res_prefix = meta::res_prefix(&name);
                let pull = async {
                    self.peer.pull_from(&m, mars_meta::CLUSTER_PREFIX).await?;
                    self.peer.pull_from(&m, &res_prefix).await
                };
                match tokio::time::timeout(left, pull).await {
                    Ok(Ok(())) => {
                        tracing::info!(resource = %name, member = %m, "metadata taken up before serving");
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(resource = %name, member = %m, "could not ask before serving: {e:#}")
                    }
                    Err(_) => {
                        tracing::warn!(resource = %name, member = %m, "no answer before serving");
                        return;
                    }
                }
            }
        }
    }

    /// The view `view --json` shows. `ask`: first bring this node's metadata
    /// up to the primary's and take the primary's written position (what
    /// every `view` does; a watch does it once a second, `last_fresh` keeping
    /// the written position in between).
    pub async fn view_asking(
        &self,
        name: Option<&str>,
        ask: bool,
        last_fresh: &mut Option<u64>,
    ) -> Result<View> {
        let me = self.me().to_string();
        if let Some(n) = name {
            let (rr, r) = self.res_entry(n)?;
            // Judge on a membership at least as new as the primary's
            // (which every join and leave waits for, see `confirm`).
            let p = meta::designated_primary(&self.peer.store.lock(), &rr);
            if let Some(p) = p.filter(|p| ask && *p != me && self.peer.is_alive(p)) {
                let ask = async {
                    self.peer.ae_now(&p, mars_meta::CLUSTER_PREFIX).await?;
                    if r.members.contains(&me) {
                        self.peer.ae_now(&p, &meta::res_prefix(&rr)).await?;
                    }
                    anyhow::Ok(())
                };
                match tokio::time::timeout(CONFIRM_TIMEOUT, ask).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(primary = %p, "view: asking the primary: {e:#}")
                    }
                    Err(_) => {
                        tracing::debug!(primary = %p, "view: the primary did not answer")
                    }
                }
            }
        }
        if ask {
            self.pull_foreign(name).await;
            *last_fresh = match name {
                Some(n) => self.primary_written_now(n).await.map(|(_, w)| w),
                None => None,
            };
        }
        let st = self.state.lock().await;
        let mut view = self.view(&st, name);
        drop(st);
        settle_written(&mut view, *last_fresh);
        Ok(view)
    }

    async fn pull_foreign(&self, only: Option<&str>) {
        let me = self.me().to_string();
        let res = meta::resources(&self.peer.store.lock());
        for (rr, r) in res {
            if only.is_some_and(|o| o != rr.name) || r.members.contains(&me) {
                continue;
            }
            self.pull_resource(&rr, &r.members).await;
        }
    }

    /// Take the entries of `rr` from the first of `members` that answers.
    async fn pull_resource(&self, rr: &ResRef, members: &[String]) {
        let prefix = meta::res_prefix(rr);
        for m in members
            .iter()
            .filter(|m| *m != self.me() && self.peer.is_alive(m))
        {
            match tokio::time::timeout(CONFIRM_TIMEOUT, self.peer.pull_from(m, &prefix)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => tracing::debug!(resource = %rr, member = %m, "pull: {e:#}"),
                Err(_) => tracing::debug!(resource = %rr, member = %m, "pull: no answer"),
            }
        }
    }

    /// What `view --json` shows of the resources this node is a member of,
    /// built from this node's own state and metadata alone (no other node is
    /// asked: the metrics endpoint's source). `None` when the state lock
    /// stays taken for `wait` (reconcile holds it across long steps).
    pub async fn local_view(&self, wait: Duration) -> Option<View> {
        let st = tokio::time::timeout(wait, self.state.lock()).await.ok()?;
        let mut view = self.view(&st, None);
        drop(st);
        settle_written(&mut view, None);
        let me = view.node.clone();
        view.resources
            .retain(|r| r.members.iter().any(|m| m.node == me));
        // A name clash lists two incarnations of a name: the one this node
        // holds is the one it reports (the owner first when it holds both).
        let mut seen = HashSet::new();
        view.resources.retain(|r| seen.insert(r.name.clone()));
        Some(view)
    }

    fn view(&self, st: &State, only: Option<&str>) -> View {
        let me = self.me();
        let store = self.peer.store.lock();
        let nodes = meta::nodes(&store)
            .into_iter()
            .map(|(name, n)| NodeView {
                alive: self.peer.is_alive(&name),
                name,
                address: n.listen,
                nbd: n.nbd,
            })
            .collect();
        // The owner of each name, then incarnations a name clash shadows.
        let resources = meta::all_incarnations(&store)
            .into_iter()
            .filter(|(rr, _)| only.is_none_or(|n| n == rr.name))
            .map(|(rr, r)| {
                let name = rr.name.clone();
                let twins: Vec<String> = meta::incarnations(&store, &name)
                    .into_iter()
                    .filter(|(t, _)| *t != rr)
                    .map(|(t, e)| format!("{t} (members {})", e.members.join(", ")))
                    .collect();
                let clash = (!twins.is_empty()).then(|| {
                    format!(
                        "name clash: {name} also names {}; `marsadm delete-resource NAME@ID` deletes one",
                        twins.join(", ")
                    )
                });
                let designated = meta::designated_primary(&store, &rr);
                let a = st.actual.get(&name);
                let members: Vec<MemberView> = r
                    .members
                    .iter()
                    .map(|m| {
                        let d: Option<MemberEntry> = meta::get(&store, &meta::member_key(&rr, m));
                        let delay_ms = d.as_ref().map_or(0, |d| d.replay_delay_ms);
                        let paused = d
                            .as_ref()
                            .map(|d| PausedView {
                                sync: d.pause_sync,
                                fetch: d.pause_fetch,
                                replay: d.pause_replay,
                            })
                            .unwrap_or_default();
                        let reported: Option<ActualEntry> = if m == me {
                            a.map(|a| {
                                Self::actual_entry_of(
                                    a,
                                    designated.as_deref(),
                                    primary_written(&store, &rr),
                                )
                            })
                        } else {
                            meta::get(&store, &meta::actual_key(&rr, m))
                        };
                        let rep = reported.unwrap_or_else(|| ActualEntry {
                            role: "secondary".into(),
                            disk: "outdated".into(),
                            ..Default::default()
                        });
                        MemberView {
                            node: m.clone(),
                            role: rep.role.clone(),
                            // Blocks found bad and not repaired: not an
                            // image of the primary, whatever else it says.
                            disk: if rep.bad_blocks > 0 && rep.disk == "uptodate" {
                                "inconsistent".into()
                            } else {
                                rep.disk.clone()
                            },
                            // Wanted connected, reachable, and (a secondary) with a
                            // member it reaches to fetch or sync from.
                            connected: d.as_ref().is_some_and(|d| d.connected)
                                && (m == me || self.peer.is_alive(m))
                                && !rep.isolated,
                            log: LogView {
                                written: rep.written,
                                fetched: rep.fetched,
                                replayed: rep.replayed,
                            },
                            sync: rep.sync.map(|(done, total)| SyncView {
                                done,
                                total,
                                rate: rep.sync_rate,
                                eta_seconds: (rep.sync_rate > 0)
                                    .then(|| total.saturating_sub(done) / rep.sync_rate),
                            }),
                            sync_blocks_transferred: rep.blocks_transferred,
                            paused,
                            split_brain: rep.split_brain,
                            lag_seconds: rep.lag_ms as f64 / 1000.0,
                            emergency: rep.emergency,
                            lag_bytes: rep.written.saturating_sub(rep.replayed),
                            // This node's own from its directory (what it opens);
                            // the others' as their member entries say (display only).
                            disk_path: (m == me)
                                .then(|| self.recorded_disk(&rr))
                                .flatten()
                                .or(d.map(|d| d.disk))
                                .unwrap_or_default(),
                            logfile: rep.logfile.clone(),
                            error: rep.error.clone(),
                            checksum_errors: rep.checksum_errors,
                            repaired: rep.repaired,
                            bad_blocks: rep.bad_blocks,
                            replay_delay_seconds: delay_ms as f64 / 1000.0,
                            scrub: a
                                .filter(|_| m == me)
                                .map(|a| self.scrubs.view(&a.dir)),
                        }
                    })
                    .collect();
                // The designated primary when it serves; else any member that
                // says it serves (after a forced failover the old primary's last
                // entry may say so until it is known dead).
                let serving = |m: &&MemberView| {
                    m.role == "primary" && (m.node == me || self.peer.is_alive(&m.node))
                };
                let actual_primary = members
                    .iter()
                    .filter(serving)
                    .find(|m| designated.as_deref() == Some(m.node.as_str()))
                    .or_else(|| members.iter().find(serving))
                    .map(|m| m.node.clone());
                let device = actual_primary.as_deref().and_then(|p| {
                    if p == me {
                        Some(self.device_uri(&name))
                    } else {
                        Self::device_uri_of(&store, p, &name)
                    }
                });
                let link_sent = {
                    let l = self.served.link_stats(&name);
                    (l.frames > 0).then_some(mars_api::LinkView {
                        raw_bytes: l.raw_bytes,
                        wire_bytes: l.wire_bytes,
                        frames: l.frames,
                        compressed_frames: l.compressed_frames,
                    })
                };
                let verify = self.verifies.view(&name, a.map(|a| a.dir.as_path()));
                ResourceView {
                    name,
                    incarnation: rr.token(),
                    clash,
                    size: r.size,
                    designated_primary: designated,
                    actual_primary,
                    device,
                    members,
                    compression: meta::compression(&store, &rr).show(),
                    link_sent,
                    verify,
                }
            })
            .collect();
        View {
            node: me.to_string(),
            cluster: ClusterView {
                id: self.peer.cluster_id(),
                nodes,
            },
            resources,
        }
    }
}

/// Every member's lag is measured against what the primary wrote: the newest
/// this node knows (`fresh`: asked just now; else the serving primary's own
/// entry; a member's entry carries what it knew when it published).
fn settle_written(view: &mut View, fresh: Option<u64>) {
    for r in view.resources.iter_mut() {
        // The primary that serves now (alive), not the last entry of one
        // that died: after a forced failover its log may be ahead of the
        // new history's.
        let serving = r.actual_primary.clone();
        let written = r
            .members
            .iter()
            .filter(|m| serving.as_ref() == Some(&m.node))
            .map(|m| m.log.written)
            .chain(fresh)
            .max();
        if let Some(written) = written {
            // Not a primary's own: what it wrote is its own log (a
            // stale entry of another primary may be ahead of it).
            for m in r.members.iter_mut().filter(|m| m.role != "primary") {
                m.log.written = m.log.written.max(written);
                m.lag_bytes = m.log.written.saturating_sub(m.log.replayed);
                // Behind what the primary wrote: not up to date, whatever
                // the member knew when it published.
                if m.role == "secondary" && m.disk == "uptodate" && m.lag_bytes > 0 {
                    m.disk = "outdated".into();
                }
            }
        }
    }
}

/// Bytes the logfiles in `dir` take.
pub(crate) fn log_bytes(dir: &Path) -> u64 {
    mars_logger::list_logfiles(dir)
        .map(|l| {
            l.iter()
                .filter_map(|e| std::fs::metadata(&e.path).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Free bytes for unprivileged use on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// What the designated primary of `res` reports as durably written.
fn primary_written(store: &mars_meta::Store, res: &ResRef) -> u64 {
    meta::designated_primary(store, res)
        .and_then(|p| meta::get::<ActualEntry>(store, &meta::actual_key(res, &p)))
        .map(|e| e.written)
        .unwrap_or(0)
}

/// What this member reports about itself.
fn actual_entry(a: &Actual) -> ActualEntry {
    let status = a
        .logger
        .as_ref()
        .map(|l| l.status())
        .unwrap_or_else(|| a.last_status.clone());
    ActualEntry {
        role: if a.export.is_some() {
            "primary"
        } else {
            "secondary"
        }
        .into(),
        disk: if a.logger.is_some() {
            "uptodate"
        } else {
            "detached"
        }
        .into(),
        written: status.synced_pos,
        fetched: status.logged_pos,
        replayed: status.applied_pos,
        replayed_durable: Some(status.persisted_pos),
        error: a.error.clone().or(status.failed.clone()),
        logfile: (!status.current_logfile.is_empty()).then(|| status.current_logfile.clone()),
        sync: None,
        blocks_transferred: 0,
        sync_rate: 0,
        split_brain: false,
        lag_ms: 0,
        emergency: a.emergency,
        disk_size: a.disk_size,
        isolated: false,
        checksum_errors: mars_logger::csum::errors(&a.dir),
        bad_blocks: mars_logger::csum::unrepaired(&a.dir),
        repaired: mars_logger::csum::repaired(&a.dir),
    }
}

/// The outcome of a reconcile for `name`: its error, else `ok_msg`.
fn outcome(st: &State, name: &str, ok_msg: impl FnOnce() -> String) -> Result<Response> {
    match st.actual.get(name).and_then(|a| a.error.clone()) {
        Some(e) => bail!("{e}"),
        None => Ok(Response::ok(ok_msg())),
    }
}

async fn close_logger(l: Arc<Logger>) -> Status {
    tokio::task::spawn_blocking(move || {
        l.close();
        l.status()
    })
    .await
    .unwrap_or_default()
}

/// The resource a request names, for those that must know it (not
/// `create-resource`, whose name is new).
fn named_resource(req: &Request) -> Option<&str> {
    match req {
        Request::CreateResource { .. }
        | Request::LeaveCluster
        | Request::RemoveNode { .. }
        | Request::MergeCluster { .. }
        | Request::Invite { .. }
        | Request::Keyring { .. }
        | Request::DebugBlock { .. }
        | Request::View { name: None }
        | Request::Watch { name: None, .. } => None,
        Request::View { name: Some(name) }
        | Request::Watch {
            name: Some(name), ..
        }
        | Request::DeleteResource { name }
        | Request::Primary { name, .. }
        | Request::Secondary { name }
        | Request::Up { name }
        | Request::Down { name }
        | Request::Attach { name, .. }
        | Request::Detach { name }
        | Request::Connect { name }
        | Request::Disconnect { name }
        | Request::Pause { name, .. }
        | Request::SetRate { name, .. }
        | Request::SetDelay { name, .. }
        | Request::SetCompression { name, .. }
        | Request::LogRotate { name }
        | Request::Invalidate { name }
        | Request::Scrub { name }
        | Request::Verify { name, .. }
        | Request::VerifyControl { name, .. }
        | Request::Resize { name, .. }
        | Request::LogDelete { name }
        | Request::JoinResource { name, .. }
        | Request::LeaveResource { name }
        | Request::RemoveMember { name, .. } => Some(name),
    }
}

/// `resp` with a note naming the nodes that did not confirm the command's
/// metadata (see `Daemon::confirm`): they learn it by gossip later.
fn noting(mut resp: Response, missing: &[(String, String)]) -> Response {
    if missing.is_empty() {
        return resp;
    }
    let who: Vec<String> = missing
        .iter()
        .map(|(n, why)| format!("{n} ({why})"))
        .collect();
    let note = format!(
        "; not yet recorded by {}: they learn it by gossip once they are reached",
        who.join(", ")
    );
    resp.message = Some(resp.message.unwrap_or_default() + &note);
    resp
}
