//! What a run measured, and its markdown rendering.

use serde::{Deserialize, Serialize};

/// Mean and maximum over nodes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Rates {
    pub mean: f64,
    pub max: f64,
}

impl Rates {
    pub fn of(values: &[f64]) -> Rates {
        if values.is_empty() {
            return Rates::default();
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let max = values.iter().copied().fold(f64::MIN, f64::max);
        Rates { mean, max }
    }
}

/// What each node sent per second during the steady-state window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Traffic {
    pub secs: f64,
    /// SWIM datagrams (probes, acks, gossip, announce/feed), UDP payload bytes.
    pub gossip_msgs: Rates,
    pub gossip_bytes: Rates,
    /// Anti-entropy frames (both sides of the exchanges), encoded frame bytes.
    pub ae_msgs: Rates,
    pub ae_bytes: Rates,
    /// Resource pushes (none expected in steady state).
    pub push_msgs: Rates,
    /// `Join` and `Joined` frames (bootstrap only).
    #[serde(default)]
    pub join_bytes: Rates,
}

/// How one entry spread.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    /// Nodes that must get the entry, the writer included.
    pub targets: usize,
    pub reached: usize,
    /// Virtual ms from the write until the last target had it; None if some never did.
    pub ms: Option<u64>,
    /// Targets that got it over TCP (anti-entropy or push) rather than gossip.
    pub via_tcp: usize,
}

impl Spread {
    /// Probe periods (rounds) the spread took, rounded up.
    pub fn rounds(&self, probe_period_ms: u64) -> Option<u64> {
        self.ms.map(|ms| ms.div_ceil(probe_period_ms))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub nodes: u32,
    pub seed: u64,
    pub resources: u32,
    pub loss: f64,
    pub probe_period_ms: u64,
    /// Started from a converged cluster (no bootstrap measured).
    #[serde(default)]
    pub warm: bool,
    /// Virtual ms after the last node started until 99% of the nodes saw all others alive.
    pub members_converged_99_ms: Option<u64>,
    /// Virtual ms after the last node started until every node saw all others alive.
    pub members_converged_ms: Option<u64>,
    /// ... until every node's "c/" store was the same.
    pub meta_converged_ms: Option<u64>,
    /// ... until, in addition, no node had anything queued for retransmission.
    pub quiet_ms: Option<u64>,
    /// Fewest live members a node saw at the end of the bootstrap phase.
    pub min_members_seen: usize,
    /// What each node sent in total from its start to the end of the bootstrap phase
    /// (`secs` is 1: the rates are totals).
    pub bootstrap: Traffic,
    pub steady: Traffic,
    pub cluster_key: Spread,
    pub resource_key: Spread,
    /// Resource entries that reached a node outside the resource (must be 0).
    pub leaks: u64,
    /// MemberDown notifications; no node fails, so every one is a false positive.
    pub downs: u64,
    pub events: u64,
    pub virtual_secs: f64,
    pub wall_secs: f64,
    pub peak_rss_mib: Option<f64>,
}

fn opt_secs(ms: Option<u64>) -> String {
    ms.map_or("not reached".to_string(), |ms| {
        format!("{:.1}", ms as f64 / 1000.0)
    })
}

fn opt_rounds(ms: Option<u64>, period: u64) -> String {
    ms.map_or("-".to_string(), |ms| ms.div_ceil(period).to_string())
}

fn pair(r: &Rates, scale: f64) -> String {
    let fmt = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    format!("{} / {}", fmt(r.mean / scale), fmt(r.max / scale))
}

/// The results as markdown tables.
pub fn markdown(reports: &[Report]) -> String {
    let mut s = String::new();
    s.push_str("### Convergence and dissemination\n\n");
    s.push_str(
        "Times are virtual, membership and store convergence counted from the last node's start; \
         a round is one probe period.\n\n",
    );
    s.push_str(
        "| N | 99% of nodes see all: rounds | all nodes see all: rounds (s) | `c/` stores equal (s) \
         | quiet (s) | new `c/` key at all nodes: rounds (ms) | of which by TCP \
         | `r/` key at all members (ms) | `r/` entries at non-members | false downs |\n",
    );
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        let p = r.probe_period_ms;
        let ck = &r.cluster_key;
        let ck_cell = match ck.ms {
            Some(ms) => format!("{} ({ms})", ms.div_ceil(p)),
            None => format!("{} of {} nodes", ck.reached, ck.targets),
        };
        let rk = &r.resource_key;
        let rk_cell = match rk.ms {
            Some(ms) => format!("{ms} ({} members)", rk.targets),
            None => format!("{} of {} members", rk.reached, rk.targets),
        };
        let members = match r.members_converged_ms {
            _ if r.warm => "warm start".to_string(),
            Some(ms) => format!("{} ({})", ms.div_ceil(p), opt_secs(Some(ms))),
            None => format!(
                "not reached (fewest seen {} of {})",
                r.min_members_seen,
                r.nodes - 1
            ),
        };
        let (members_99, meta, quiet) = if r.warm {
            ("-".to_string(), "-".to_string(), "-".to_string())
        } else {
            (
                opt_rounds(r.members_converged_99_ms, p),
                opt_secs(r.meta_converged_ms),
                opt_secs(r.quiet_ms),
            )
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.nodes,
            members_99,
            members,
            meta,
            quiet,
            ck_cell,
            ck.via_tcp,
            rk_cell,
            r.leaks,
            r.downs,
        ));
    }
    s.push_str("\n### Steady-state traffic per node, once quiet (mean / max over nodes)\n\n");
    s.push_str(
        "| N | window (s) | gossip msg/s | gossip B/s | AE msg/s | AE B/s | total B/s (mean) |\n",
    );
    s.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        let t = &r.steady;
        s.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {:.0} |\n",
            r.nodes,
            t.secs,
            pair(&t.gossip_msgs, 1.0),
            pair(&t.gossip_bytes, 1.0),
            pair(&t.ae_msgs, 1.0),
            pair(&t.ae_bytes, 1.0),
            t.gossip_bytes.mean + t.ae_bytes.mean,
        ));
    }
    if reports.iter().any(|r| !r.warm) {
        s.push_str("\n### Bootstrap: total sent per node until quiet (mean / max over nodes)\n\n");
        s.push_str("| N | gossip msgs | gossip KiB | AE msgs | AE KiB | join KiB |\n");
        s.push_str("|---:|---:|---:|---:|---:|---:|\n");
        for r in reports.iter().filter(|r| !r.warm) {
            let t = &r.bootstrap;
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.nodes,
                pair(&t.gossip_msgs, 1.0),
                pair(&t.gossip_bytes, 1024.0),
                pair(&t.ae_msgs, 1.0),
                pair(&t.ae_bytes, 1024.0),
                pair(&t.join_bytes, 1024.0),
            ));
        }
    }
    s.push_str("\n### Cost of the simulation\n\n");
    s.push_str("| N | start | virtual s | events | wall s | peak RSS MiB |\n");
    s.push_str("|---:|---|---:|---:|---:|---:|\n");
    for r in reports {
        s.push_str(&format!(
            "| {} | {} | {:.0} | {} | {:.1} | {} |\n",
            r.nodes,
            if r.warm { "warm" } else { "cold" },
            r.virtual_secs,
            r.events,
            r.wall_secs,
            r.peak_rss_mib
                .map_or("-".to_string(), |m| format!("{m:.0}")),
        ));
    }
    s
}
