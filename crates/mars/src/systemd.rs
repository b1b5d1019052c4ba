//! systemd integration: readiness and status (`sd_notify`), the watchdog,
//! and the per-resource units started where a resource is primary.
//!
//! - [`notify`]: `READY=1`, `STATUS=...`, `STOPPING=1` to `$NOTIFY_SOCKET`
//!   (nothing without it: marsd run by hand).
//! - [`Heartbeat`] and [`watchdog`]: `WATCHDOG=1` every half `$WATCHDOG_USEC`
//!   while the daemon's control loop has completed a round within the last
//!   `$WATCHDOG_USEC`; a loop stuck longer gets no more pings, and systemd
//!   restarts marsd (`WatchdogSec=`, `Restart=on-failure`).
//! - [`PrimaryUnits`]: the node setting `primary_units` (resource name ->
//!   unit name): `systemctl start UNIT` once this node serves the resource's
//!   device, `systemctl stop UNIT` before it stops serving it (and waits for
//!   it, so that a mount or a VM on the device is shut down while the device
//!   still answers).

use sd_notify::NotifyState;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Send `states` to the service manager, if marsd runs under one.
/// A failure is logged once (a notify socket that went away must not stop
/// the daemon).
pub fn notify(states: &[NotifyState]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot notify the service manager ($NOTIFY_SOCKET): {e}");
        }
    }
}

/// `STATUS=text` (shown by `systemctl status marsd`).
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// When the daemon's control loop last completed a round.
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Release);
    }

    /// How long ago the last beat was (since creation before the first).
    pub fn age(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Acquire)))
    }
}

/// Ping the watchdog every half `$WATCHDOG_USEC` while `alive` beats
/// (returns at once when the watchdog is off).
pub async fn watchdog(alive: Arc<Heartbeat>) {
    let Some(limit) = sd_notify::watchdog_enabled() else {
        return;
    };
    tracing::info!(limit = ?limit, "systemd watchdog on: pinging every {:?} while the control loop runs", limit / 2);
    ping_while_alive(&alive, limit, || notify(&[NotifyState::Watchdog])).await
}

/// Call `ping` every half `limit` while `alive` beat within the last `limit`.
async fn ping_while_alive(alive: &Heartbeat, limit: Duration, mut ping: impl FnMut()) {
    let mut stalled = false;
    let mut tick = tokio::time::interval((limit / 2).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let age = alive.age();
        if age < limit {
            if stalled {
                tracing::info!("the control loop runs again: watchdog pings resumed");
                stalled = false;
            }
            ping();
        } else if !stalled {
            stalled = true;
            tracing::error!(
                "the control loop has not completed a round for {age:?}: no watchdog ping (systemd restarts marsd after WatchdogSec)"
            );
        }
    }
}

/// How long a stop of a primary unit may take before marsd stops serving the
/// device anyway (systemd's own default stop timeout is 90 s).
const UNIT_STOP_WAIT: Duration = Duration::from_secs(100);

/// The node setting `primary_units` at work. Calls of `systemctl` run one at a
/// time, in the order they were asked for, on a thread of their own.
pub struct PrimaryUnits {
    units: BTreeMap<String, String>,
    jobs: std::sync::OnceLock<std::sync::mpsc::Sender<Job>>,
}

struct Job {
    verb: &'static str,
    unit: String,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl PrimaryUnits {
    /// Refuses unit names `systemctl` would take for something else.
    pub fn new(units: BTreeMap<String, String>) -> anyhow::Result<PrimaryUnits> {
        for (res, unit) in &units {
            let ok = !unit.is_empty()
                && !unit.starts_with('-')
                && unit.len() <= 255
                && unit
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
            if !ok {
                anyhow::bail!("primary_units in node.json: {unit:?} (for resource {res}) is not a systemd unit name");
            }
        }
        Ok(PrimaryUnits {
            units,
            jobs: Default::default(),
        })
    }

    fn send(&self, verb: &'static str, res: &str) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let unit = self.units.get(res)?.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let jobs = self.jobs.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name("marsd-units".into())
                .spawn(move || {
                    for job in rx {
                        run_systemctl(job.verb, &job.unit);
                        if let Some(d) = job.done {
                            let _ = d.send(());
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start the thread that runs systemctl: {e}");
            }
            tx
        });
        let job = Job {
            verb,
            unit,
            done: Some(tx),
        };
        jobs.send(job).ok().map(|()| rx)
    }

    /// This node serves `res`'s device now: start its unit (not waited for).
    pub fn serving(&self, res: &str) {
        self.send("start", res);
    }

    /// This node is about to stop serving `res`'s device: stop its unit and
    /// wait for that (at most `UNIT_STOP_WAIT`).
    pub async fn stopping(&self, res: &str) {
        let Some(done) = self.send("stop", res) else {
            return;
        };
        if tokio::time::timeout(UNIT_STOP_WAIT, done).await.is_err() {
            tracing::error!(resource = %res, "the primary unit did not stop within {UNIT_STOP_WAIT:?}: the device stops being served anyway");
        }
    }
}

fn run_systemctl(verb: &str, unit: &str) {
    tracing::info!(unit, "systemctl {verb} {unit}");
    match std::process::Command::new("systemctl")
        .args([verb, unit])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => tracing::error!(
            unit,
            "systemctl {verb} {unit} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => tracing::error!(unit, "cannot run systemctl {verb} {unit}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Pings go on while the loop beats, stop when it stalls for the limit,
    /// and resume when it beats again.
    #[tokio::test(start_paused = true)]
    async fn pings_only_while_the_loop_beats() {
        let alive = Arc::new(Heartbeat::default());
        let pings = Arc::new(AtomicUsize::new(0));
        let limit = Duration::from_secs(10);
        let p = pings.clone();
        let a = alive.clone();
        let task = tokio::spawn(async move {
            ping_while_alive(&a, limit, || {
                p.fetch_add(1, Ordering::Relaxed);
            })
            .await
        });
        let count = || pings.load(Ordering::Relaxed);
        // Beating every second for 30 s: a ping every 5 s.
        for _ in 0..30 {
            alive.beat();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let beating = count();
        assert!((6..=7).contains(&beating), "{beating} pings in 30 s");
        // Stalled: at most the pings within the limit after the last beat.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let stalled = count() - beating;
        assert!(stalled <= 2, "{stalled} pings while stalled");
        let before = count();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(count(), before, "no ping while stalled");
        // Beating again: pings again.
        for _ in 0..20 {
            alive.beat();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(count() - before >= 3, "pings resumed");
        task.abort();
    }

    #[test]
    fn unit_names_are_checked() {
        let ok = |u: &str| PrimaryUnits::new([("r0".to_string(), u.to_string())].into()).is_ok();
        assert!(ok("mars-resource@r0.service"));
        assert!(ok("srv-r0.mount"));
        assert!(ok("vm\\x2dr0.service"));
        assert!(!ok(""));
        assert!(!ok("--now"));
        assert!(!ok("a b.service"));
        assert!(!ok("a;b.service"));
        assert!(!ok("../x.service"));
    }
}
