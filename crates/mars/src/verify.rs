//! `marsadm verify` (issue 18) on the node that runs it, and the repair of
//! blocks this node's copy found bad (by a read, a scrub or a verify). Both
//! are `mars_replication::verify::Coordinator` runs; this module keeps them
//! per resource, records the last verify (`verify.json` in the resource
//! directory: docs/FORMAT.md) and shows them in `view`.

use crate::peer::{now_ms, Peer};
use anyhow::{bail, Result};
use mars_api::{LastVerify, MemberVerify, VerifyOp, VerifyView};
use mars_logger::csum;
use mars_replication::meta;
use mars_replication::verify::{Coordinator, VerifyReport};
use mars_replication::Served;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The last verify of a resource, in its directory on the node that ran it.
pub const LAST_FILE: &str = "verify.json";

/// How long a repair of blocks a read found bad may take before the read
/// gives the client EIO.
const READ_REPAIR_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the background repair of a copy's known bad blocks is tried.
const REPAIR_EVERY: Duration = Duration::from_secs(10);

/// What a verify or repair needs of the daemon.
#[derive(Clone)]
pub struct Ctx {
    pub peer: Arc<Peer>,
    pub served: Arc<Served>,
    pub me: String,
}

impl Ctx {
    /// A coordinator for resource `name` (directory `dir`), its members and
    /// primary as the metadata says now.
    pub fn coordinator(&self, name: &str, dir: &Path, repair: bool) -> Result<Coordinator> {
        let (rr, r) = {
            let store = self.peer.store.lock();
            match meta::resource(&store, name) {
                Some(x) => x,
                None => bail!("unknown resource {name}"),
            }
        };
        if !r.members.contains(&self.me) {
            bail!(
                "{} is not a member of {name}: run verify on a member",
                self.me
            );
        }
        let Some(primary) = meta::designated_primary(&self.peer.store.lock(), &rr) else {
            bail!("{name} has no primary: there is no copy to compare with");
        };
        Ok(Coordinator {
            cluster: self.peer.clone(),
            served: self.served.clone(),
            dir: dir.to_path_buf(),
            res: rr,
            me: self.me.clone(),
            primary,
            members: r.members.clone(),
            size: r.size,
            repair,
            rate: Arc::new(AtomicU64::new(0)),
            pause: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            report: Arc::default(),
        })
    }

    /// The logger's repair hook for resource `name`: blocks a read of this
    /// node's disk found bad, repaired from a good member before the read
    /// answers (run on a thread of its own: the reader may be anywhere).
    pub fn read_repair_hook(&self, name: &str, dir: &Path) -> mars_logger::RepairHook {
        let (ctx, name, dir) = (self.clone(), name.to_string(), dir.to_path_buf());
        let handle = tokio::runtime::Handle::current();
        mars_logger::RepairHook(Arc::new(move |blocks: &[u64]| {
            let co = ctx
                .coordinator(&name, &dir, true)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            let (me, blocks, handle) = (ctx.me.clone(), blocks.to_vec(), handle.clone());
            let run = std::thread::Builder::new()
                .name("mars-read-repair".into())
                .spawn(move || {
                    handle.block_on(async move {
                        match tokio::time::timeout(
                            READ_REPAIR_TIMEOUT,
                            co.repair_blocks(&me, &blocks),
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(anyhow::anyhow!(
                                "no good copy reached within {READ_REPAIR_TIMEOUT:?}"
                            )),
                        }
                    })
                })?;
            match run.join() {
                Ok(r) => r.map_err(|e| std::io::Error::other(format!("{e:#}"))),
                Err(_) => Err(std::io::Error::other("the repair thread panicked")),
            }
        }))
    }
}

#[derive(Default)]
struct Attempt {
    at: Option<Instant>,
    busy: bool,
    blocks: Vec<u64>,
}

struct Run {
    report: Arc<Mutex<VerifyReport>>,
    pause: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    repair: bool,
    started: Instant,
    from: u64,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Run {
    /// Its task is still running.
    fn active(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// The verifies and repairs this node runs, by resource name.
#[derive(Default)]
pub struct Verifies {
    runs: Mutex<HashMap<String, Run>>,
    /// Background repairs of known bad blocks: per resource, when the last
    /// was tried, whether it runs, and the blocks it was for.
    repairs: Mutex<HashMap<String, Attempt>>,
}

/// The last verify recorded in `dir`.
pub fn last(dir: &Path) -> Option<LastVerify> {
    let b = std::fs::read(dir.join(LAST_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

fn summarize(r: &VerifyReport, repair: bool, started_ms: u64, error: Option<String>) -> LastVerify {
    let members = r
        .differing
        .iter()
        .map(|(node, blocks)| {
            let mut b = blocks.clone();
            b.sort_unstable();
            b.dedup();
            MemberVerify {
                node: node.clone(),
                differing_blocks: b.len() as u64,
                ranges: csum::ranges(&b),
                repaired: r.repaired.get(node).copied().unwrap_or(0),
            }
        })
        .collect();
    let mut lost = r.lost.clone();
    lost.sort_unstable();
    lost.dedup();
    LastVerify {
        started_ms,
        finished_ms: now_ms(),
        compared: r.done,
        total: r.total,
        repair,
        clean: error.is_none() && r.clean(repair),
        members,
        lost_blocks: lost.len() as u64,
        lost: (!lost.is_empty()).then(|| csum::ranges(&lost)),
        failed: r
            .failed
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect(),
        resume_at: (error.is_some() && r.done < r.total).then_some(r.done),
        error,
    }
}

impl Verifies {
    pub fn running(&self, name: &str) -> bool {
        self.runs.lock().get(name).is_some_and(Run::active)
    }

    /// Start `co`'s verify from `from` (its pause, stop and report are
    /// taken over). False when one runs already.
    pub fn start(self: &Arc<Self>, name: &str, co: Coordinator, from: u64) -> bool {
        let mut runs = self.runs.lock();
        if runs.get(name).is_some_and(Run::active) {
            return false;
        }
        let started_ms = now_ms();
        let run = Run {
            report: co.report.clone(),
            pause: co.pause.clone(),
            stop: co.stop.clone(),
            repair: co.repair,
            started: Instant::now(),
            from,
            task: None,
        };
        let dir = co.dir.clone();
        let name_log = name.to_string();
        let task = tokio::spawn(async move {
            tracing::info!(resource = %name_log, from, repair = co.repair, "verify started");
            let r = co.verify(from, |_| {}).await;
            let error = r.err().map(|e| format!("{e:#}"));
            let last = summarize(&co.report.lock(), co.repair, started_ms, error);
            tracing::info!(resource = %name_log, clean = last.clean, compared = last.compared, error = ?last.error, "verify ended");
            let path = dir.join(LAST_FILE);
            let body = serde_json::to_vec_pretty(&last).unwrap_or_default();
            if let Err(e) = tokio::task::spawn_blocking(move || {
                mars_logger::crashsafe::write_atomic(&path, &body)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            {
                tracing::warn!(resource = %name_log, "cannot record the verify: {e}");
            }
        });
        runs.insert(
            name.to_string(),
            Run {
                task: Some(task),
                ..run
            },
        );
        true
    }

    pub fn control(&self, name: &str, op: VerifyOp) -> Result<String> {
        let runs = self.runs.lock();
        let Some(r) = runs.get(name).filter(|r| r.active()) else {
            bail!("no verify of {name} runs on this node (start one with `marsadm verify {name}`)");
        };
        Ok(match op {
            VerifyOp::Pause => {
                r.pause.store(true, Ordering::Release);
                format!("{name}: verify paused")
            }
            VerifyOp::Resume => {
                r.pause.store(false, Ordering::Release);
                format!("{name}: verify resumed")
            }
            VerifyOp::Stop => {
                r.stop.store(true, Ordering::Release);
                format!("{name}: verify stopped (`marsadm verify {name}` goes on from where it stopped)")
            }
        })
    }

    pub fn view(&self, name: &str, dir: Option<&Path>) -> Option<VerifyView> {
        let last = dir.and_then(last);
        let runs = self.runs.lock();
        let run = runs.get(name).filter(|r| r.active());
        if run.is_none() && last.is_none() {
            return None;
        }
        let (running, paused, repair, rate) = match run {
            Some(r) => {
                let rep = r.report.lock();
                let secs = r.started.elapsed().as_secs_f64();
                let rate = if secs > 0.0 {
                    (rep.done.saturating_sub(r.from) as f64 / secs) as u64
                } else {
                    0
                };
                (
                    Some((rep.done, rep.total)),
                    r.pause.load(Ordering::Acquire),
                    r.repair,
                    rate,
                )
            }
            None => (None, false, false, 0),
        };
        Some(VerifyView {
            running,
            paused,
            repair,
            rate,
            last,
        })
    }

    /// Stop every verify and wait for them (shutdown).
    pub async fn stop_all(&self) {
        let tasks: Vec<_> = self
            .runs
            .lock()
            .values_mut()
            .filter_map(|r| {
                r.stop.store(true, Ordering::Release);
                r.task.take()
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Repair the known bad blocks of this node's copies (found by reads,
    /// scrubs or verifies) from good members: one repair per copy at a
    /// time, blocks tried before again only after [`REPAIR_EVERY`].
    pub fn repairs_due(self: &Arc<Self>, ctx: &Ctx, copies: &[(String, PathBuf)]) {
        for (name, dir) in copies {
            let bad = csum::bad_list(dir);
            if bad.is_empty() || self.running(name) {
                continue;
            }
            {
                let mut m = self.repairs.lock();
                let a = m.entry(name.clone()).or_default();
                let recent = a.at.is_some_and(|t| t.elapsed() < REPAIR_EVERY);
                let tried = bad.iter().all(|b| a.blocks.binary_search(b).is_ok());
                if a.busy || (recent && tried) {
                    continue;
                }
                *a = Attempt {
                    at: Some(Instant::now()),
                    busy: true,
                    blocks: bad.clone(),
                };
            }
            let co = match ctx.coordinator(name, dir, true) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(resource = %name, "no repair of bad blocks now: {e:#}");
                    if let Some(a) = self.repairs.lock().get_mut(name) {
                        a.busy = false;
                    }
                    continue;
                }
            };
            let (me, name, this) = (ctx.me.clone(), name.clone(), self.clone());
            tokio::spawn(async move {
                match co.repair_blocks(&me, &bad).await {
                    Ok(done) if !done.is_empty() => {
                        tracing::info!(resource = %name, "repaired {} of {} bad blocks from a good copy", done.len(), bad.len())
                    }
                    Ok(_) => {
                        tracing::warn!(resource = %name, "bad blocks not repaired (no good copy of them): {}", csum::ranges(&bad))
                    }
                    Err(e) => tracing::warn!(resource = %name, "repair of bad blocks: {e:#}"),
                }
                if let Some(a) = this.repairs.lock().get_mut(&name) {
                    a.busy = false;
                }
            });
        }
    }
}
