//! Desired state, actual state, and the control loop converging one to the other.
//!
//! Commands change *desired* state (persisted in `resource.json`) and then run
//! the same [`Daemon::reconcile`] step that the periodic loop runs, so the
//! command returns the outcome. Only `reconcile` opens, exports, unexports and
//! closes transaction loggers (the *actual* state); it holds the state lock,
//! so commands and the loop never interleave.

use crate::node::{self, NodeConfig, ResourceConfig};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use mars_api::{
    ClusterView, LogView, MemberView, NodeView, PauseKind, PausedView, Request, ResourceView,
    Response, View,
};
use mars_logger::{Config as LoggerConfig, Logger, Status};
use mars_nbd::{BoxFut, Export, Registry};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A transaction logger served as an NBD export.
pub struct LoggerExport {
    logger: Arc<Logger>,
    open: AtomicBool,
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
        let logger = self.logger.clone();
        let open = self.check();
        Box::pin(async move {
            open?;
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
}

/// Export name -> export, consulted by the NBD server at handshake.
#[derive(Default)]
pub struct Exports {
    map: RwLock<HashMap<String, Arc<LoggerExport>>>,
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
    logger: Option<Arc<Logger>>,
    export: Option<Arc<LoggerExport>>,
    /// Why the last attempt to reach the desired state failed.
    error: Option<String>,
    retry_at: Option<Instant>,
    last_status: Status,
}

#[derive(Default)]
struct State {
    desired: BTreeMap<String, ResourceConfig>,
    actual: BTreeMap<String, Actual>,
}

pub struct Daemon {
    pub dir: PathBuf,
    pub cfg: NodeConfig,
    pub exports: Arc<Exports>,
    state: tokio::sync::Mutex<State>,
}

const RETRY_AFTER: Duration = Duration::from_secs(10);

impl Daemon {
    pub fn new(dir: &Path, cfg: NodeConfig) -> Result<Daemon> {
        let mut state = State::default();
        for r in node::load_resources(dir)? {
            state.desired.insert(r.name.clone(), r);
        }
        Ok(Daemon {
            dir: dir.to_path_buf(),
            cfg,
            exports: Arc::new(Exports::default()),
            state: tokio::sync::Mutex::new(state),
        })
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
        c
    }

    /// One step of the control loop: converge every resource's actual state to its desired state.
    pub async fn reconcile(&self) {
        let mut st = self.state.lock().await;
        self.reconcile_locked(&mut st, true).await;
    }

    async fn reconcile_locked(&self, st: &mut State, retry_now: bool) {
        let me = &self.cfg.node;
        // Resources that are no longer desired: stop everything.
        let gone: Vec<String> = st
            .actual
            .keys()
            .filter(|k| !st.desired.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            if let Some(a) = st.actual.remove(&name) {
                self.stop(&name, a).await;
            }
        }
        let desired: Vec<ResourceConfig> = st.desired.values().cloned().collect();
        for r in desired {
            let a = st.actual.entry(r.name.clone()).or_default();
            let want_export = r.attached && r.designated_primary.as_deref() == Some(me.as_str());
            if (!want_export || a.logger.is_none()) && a.export.is_some() {
                self.unexport(&r.name, a);
            }
            if !r.attached {
                if let Some(l) = a.logger.take() {
                    a.last_status = close_logger(l).await;
                }
                a.error = None;
                continue;
            }
            if a.logger.is_none() {
                if !retry_now && a.retry_at.is_some_and(|t| Instant::now() < t) {
                    continue;
                }
                let cfg = self.logger_config(&r);
                match tokio::task::spawn_blocking(move || Logger::open(cfg)).await {
                    Ok(Ok(l)) => {
                        tracing::info!(resource = %r.name, logfile = %l.status().current_logfile, "disk attached, log recovered");
                        a.logger = Some(Arc::new(l));
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
                        continue;
                    }
                    Err(e) => {
                        a.error = Some(format!("cannot attach {}: {e}", r.name));
                        continue;
                    }
                }
            }
            if let Some(l) = &a.logger {
                a.last_status = l.status();
                if want_export && a.export.is_none() {
                    let e = Arc::new(LoggerExport {
                        logger: l.clone(),
                        open: AtomicBool::new(true),
                    });
                    self.exports.map.write().insert(r.name.clone(), e.clone());
                    a.export = Some(e);
                    tracing::info!(resource = %r.name, device = %self.device_uri(&r.name), "serving device");
                }
            }
        }
    }

    fn unexport(&self, name: &str, a: &mut Actual) {
        if let Some(e) = a.export.take() {
            e.open.store(false, Ordering::Release);
            self.exports.map.write().remove(name);
            tracing::info!(resource = %name, "device no longer served");
        }
    }

    async fn stop(&self, name: &str, mut a: Actual) {
        self.unexport(name, &mut a);
        if let Some(l) = a.logger.take() {
            close_logger(l).await;
        }
    }

    /// Stop serving everything and write all logs back (daemon shutdown).
    pub async fn shutdown(&self) {
        let mut st = self.state.lock().await;
        let all: Vec<(String, Actual)> = std::mem::take(&mut st.actual).into_iter().collect();
        for (name, a) in all {
            self.stop(&name, a).await;
        }
    }

    pub fn device_uri(&self, name: &str) -> String {
        format!("nbd://{}/{}", self.cfg.nbd, name)
    }

    /// The periodic part of the control loop.
    pub async fn run_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let mut st = self.state.lock().await;
            self.reconcile_locked(&mut st, false).await;
        }
    }

    pub async fn handle(&self, req: Request) -> Response {
        match self.handle_inner(req).await {
            Ok(r) => r,
            Err(e) => Response::err(format!("{e:#}")),
        }
    }

    async fn handle_inner(&self, req: Request) -> Result<Response> {
        let mut st = self.state.lock().await;
        let me = self.cfg.node.clone();
        match req {
            Request::View { name } => {
                if let Some(n) = &name {
                    known(&st, n)?;
                }
                Ok(Response {
                    ok: true,
                    view: Some(self.view(&st, name.as_deref())),
                    ..Default::default()
                })
            }
            Request::CreateResource { name, disk } => {
                self.create_resource(&mut st, &name, &disk).await
            }
            Request::DeleteResource { name } => {
                known(&st, &name)?;
                st.desired.remove(&name);
                self.reconcile_locked(&mut st, true).await;
                let rdir = node::resource_dir(&self.dir, &name);
                // resource.json first: a crash in between leaves a directory that is ignored.
                let _ = std::fs::remove_file(rdir.join(node::RESOURCE_FILE));
                std::fs::remove_dir_all(&rdir)
                    .with_context(|| format!("cannot remove {}", rdir.display()))?;
                Ok(Response::ok(format!(
                    "resource {name} deleted (its disk was left as it is)"
                )))
            }
            Request::Primary { name, force: _ } => {
                let r = known(&st, &name)?.clone();
                if !r.attached {
                    bail!("{name}: disk is detached here; run `marsadm up {name}` first");
                }
                if r.designated_primary.as_deref() == Some(me.as_str())
                    && self.is_serving(&st, &name)
                {
                    return Ok(Response::ok(format!(
                        "{name}: already primary here, serving {}",
                        self.device_uri(&name)
                    )));
                }
                self.change(&mut st, &name, |r| r.designated_primary = Some(me.clone()))?;
                self.reconcile_locked(&mut st, true).await;
                self.outcome(
                    &st,
                    &name,
                    || format!("{name}: primary here, serving {}", self.device_uri(&name)),
                    |s| s,
                )
            }
            Request::Secondary { name } => {
                known(&st, &name)?;
                self.change(&mut st, &name, |r| r.designated_primary = None)?;
                self.reconcile_locked(&mut st, true).await;
                Ok(Response::ok(format!(
                    "{name}: secondary here, device no longer served"
                )))
            }
            Request::Up { name } => self.set_flags(&mut st, &name, Some(true), Some(true)).await,
            Request::Down { name } => {
                self.set_flags(&mut st, &name, Some(false), Some(false))
                    .await
            }
            Request::Attach { name } => self.set_flags(&mut st, &name, Some(true), None).await,
            Request::Detach { name } => self.set_flags(&mut st, &name, Some(false), None).await,
            Request::Connect { name } => self.set_flags(&mut st, &name, None, Some(true)).await,
            Request::Disconnect { name } => self.set_flags(&mut st, &name, None, Some(false)).await,
            Request::Pause { name, what, paused } => {
                known(&st, &name)?;
                self.change(&mut st, &name, |r| match what {
                    PauseKind::Sync => r.pause_sync = paused,
                    PauseKind::Fetch => r.pause_fetch = paused,
                    PauseKind::Replay => r.pause_replay = paused,
                })?;
                let verb = if paused { "paused" } else { "resumed" };
                Ok(Response::ok(
                    format!("{name}: {what:?} {verb}").to_lowercase(),
                ))
            }
            Request::LogRotate { name } => {
                let l = self.logger(&st, &name)?;
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
                let l = self.logger(&st, &name)?;
                let deleted = tokio::task::spawn_blocking(move || l.delete_applied()).await??;
                if deleted.is_empty() {
                    Ok(Response::ok(format!("{name}: no logfile can be deleted yet (only finished, fully written back ones are)")))
                } else {
                    Ok(Response::ok(format!(
                        "{name}: deleted {}",
                        deleted.join(", ")
                    )))
                }
            }
        }
    }

    fn is_serving(&self, st: &State, name: &str) -> bool {
        st.actual.get(name).is_some_and(|a| a.export.is_some())
    }

    fn logger(&self, st: &State, name: &str) -> Result<Arc<Logger>> {
        known(st, name)?;
        match st.actual.get(name).and_then(|a| a.logger.clone()) {
            Some(l) => Ok(l),
            None => bail!("{name}: disk is not attached here; run `marsadm up {name}` first"),
        }
    }

    /// Persist a change of desired state.
    fn change(
        &self,
        st: &mut State,
        name: &str,
        f: impl FnOnce(&mut ResourceConfig),
    ) -> Result<()> {
        let mut r = known(st, name)?.clone();
        f(&mut r);
        node::save_json(
            &node::resource_dir(&self.dir, name).join(node::RESOURCE_FILE),
            &r,
        )?;
        st.desired.insert(name.to_string(), r);
        Ok(())
    }

    /// Report the outcome of a reconcile for `name`: its error, else `ok_msg`.
    fn outcome(
        &self,
        st: &State,
        name: &str,
        ok_msg: impl FnOnce() -> String,
        err_ctx: impl FnOnce(String) -> String,
    ) -> Result<Response> {
        match st.actual.get(name).and_then(|a| a.error.clone()) {
            Some(e) => bail!("{}", err_ctx(e)),
            None => Ok(Response::ok(ok_msg())),
        }
    }

    async fn set_flags(
        &self,
        st: &mut State,
        name: &str,
        attached: Option<bool>,
        connected: Option<bool>,
    ) -> Result<Response> {
        known(st, name)?;
        self.change(st, name, |r| {
            if let Some(a) = attached {
                r.attached = a;
            }
            if let Some(c) = connected {
                r.connected = c;
            }
        })?;
        self.reconcile_locked(st, true).await;
        let r = known(st, name)?.clone();
        self.outcome(
            st,
            name,
            || {
                let disk = if r.attached { "attached" } else { "detached" };
                let conn = if r.connected {
                    "connected"
                } else {
                    "disconnected"
                };
                let serving = if self.is_serving(st, name) {
                    format!(", serving {}", self.device_uri(name))
                } else {
                    String::new()
                };
                format!("{name}: disk {disk}, {conn}{serving}")
            },
            |e| e,
        )
    }

    async fn create_resource(&self, st: &mut State, name: &str, disk: &str) -> Result<Response> {
        node::check_name("resource", name)?;
        if st.desired.contains_key(name) {
            bail!("resource {name} already exists");
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
        if let Some(other) = st.desired.values().find(|r| r.disk == disk_path) {
            bail!(
                "disk {} is already used by resource {}",
                disk_path.display(),
                other.name
            );
        }
        let rdir = node::resource_dir(&self.dir, name);
        if rdir.exists() {
            bail!("{} exists but holds no resource (left over from an interrupted delete?); remove it first", rdir.display());
        }
        std::fs::create_dir_all(&rdir)
            .with_context(|| format!("cannot create {}", rdir.display()))?;
        let r = ResourceConfig {
            format: node::FORMAT,
            name: name.to_string(),
            size,
            resource_id: rand::random(),
            disk: disk_path,
            members: vec![self.cfg.node.clone()],
            designated_primary: Some(self.cfg.node.clone()),
            attached: true,
            connected: true,
            pause_sync: false,
            pause_fetch: false,
            pause_replay: false,
        };
        if let Err(e) = node::save_json(&rdir.join(node::RESOURCE_FILE), &r) {
            let _ = std::fs::remove_dir_all(&rdir);
            return Err(e);
        }
        st.desired.insert(name.to_string(), r);
        self.reconcile_locked(st, true).await;
        if let Some(err) = st.actual.get(name).and_then(|a| a.error.clone()) {
            // Refused: leave nothing behind.
            st.desired.remove(name);
            self.reconcile_locked(st, true).await;
            let _ = std::fs::remove_dir_all(&rdir);
            bail!("{err}");
        }
        Ok(Response::ok(format!(
            "resource {name} created ({size} bytes); serving {}",
            self.device_uri(name)
        )))
    }

    fn view(&self, st: &State, only: Option<&str>) -> View {
        let me = &self.cfg.node;
        let resources = st
            .desired
            .values()
            .filter(|r| only.is_none_or(|n| n == r.name))
            .map(|r| {
                let a = st.actual.get(&r.name);
                let serving = a.is_some_and(|a| a.export.is_some());
                let attached = a.is_some_and(|a| a.logger.is_some());
                let status = a
                    .map(|a| {
                        a.logger
                            .as_ref()
                            .map(|l| l.status())
                            .unwrap_or_else(|| a.last_status.clone())
                    })
                    .unwrap_or_default();
                let members = r
                    .members
                    .iter()
                    .map(|m| {
                        if m == me {
                            MemberView {
                                node: m.clone(),
                                role: if serving { "primary" } else { "secondary" }.into(),
                                disk: if attached { "uptodate" } else { "detached" }.into(),
                                connected: r.connected,
                                log: LogView {
                                    written: status.synced_pos,
                                    fetched: status.logged_pos,
                                    replayed: status.applied_pos,
                                },
                                sync: None,
                                paused: PausedView {
                                    sync: r.pause_sync,
                                    fetch: r.pause_fetch,
                                    replay: r.pause_replay,
                                },
                                split_brain: false,
                                emergency: false,
                                lag_bytes: status.synced_pos.saturating_sub(status.applied_pos),
                                disk_path: r.disk.display().to_string(),
                                logfile: (!status.current_logfile.is_empty())
                                    .then(|| status.current_logfile.clone()),
                                error: a.and_then(|a| a.error.clone()).or(status.failed.clone()),
                            }
                        } else {
                            MemberView {
                                node: m.clone(),
                                role: "secondary".into(),
                                disk: "outdated".into(),
                                ..Default::default()
                            }
                        }
                    })
                    .collect();
                ResourceView {
                    name: r.name.clone(),
                    size: r.size,
                    designated_primary: r.designated_primary.clone(),
                    actual_primary: serving.then(|| me.clone()),
                    device: serving.then(|| self.device_uri(&r.name)),
                    members,
                }
            })
            .collect();
        View {
            node: me.clone(),
            cluster: ClusterView {
                id: self.cfg.cluster_id.clone(),
                nodes: vec![NodeView {
                    name: me.clone(),
                    address: self.cfg.listen.clone(),
                    alive: true,
                    nbd: self.cfg.nbd.clone(),
                }],
            },
            resources,
        }
    }
}

fn known<'a>(st: &'a State, name: &str) -> Result<&'a ResourceConfig> {
    match st.desired.get(name) {
        Some(r) => Ok(r),
        None => bail!("unknown resource {name}"),
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
