//! `marsadm`: the admin tool (see shared/spec/marsadm.md).

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use mars::control::call;
use mars_api::{PauseKind, Request, Response, View};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "marsadm",
    version,
    about = "administer mars nodes and replicated resources"
)]
struct Args {
    /// Node directory (default: $MARS_DIR, then /mars).
    #[arg(long, env = "MARS_DIR", default_value = "/mars", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Initialise DIR as the first node of a new cluster.
    CreateCluster {
        #[arg(long)]
        node: String,
        /// Address for peer traffic (HOST:PORT).
        #[arg(long)]
        listen: String,
        /// Where this node serves its primary devices over NBD.
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
    },
    /// Initialise DIR as a new node of the cluster PEER belongs to.
    JoinCluster {
        #[arg(long)]
        node: String,
        #[arg(long)]
        listen: String,
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
        /// The one-time token `marsadm invite` printed on a node of the cluster
        /// (required: it proves the invitation and names the cluster's CA).
        #[arg(long)]
        token: Option<String>,
        peer: String,
    },
    /// Remove this node from its cluster (its certificate is revoked); with
    /// --node, remove another node that is gone for good (or compromised).
    LeaveCluster {
        /// The node to remove, from here (it must be no member of a resource).
        #[arg(long)]
        node: Option<String>,
        /// With --node: also while it is alive (its links are refused at once).
        #[arg(long, requires = "node")]
        force: bool,
    },
    /// Merge the peer's whole cluster into this one.
    MergeCluster {
        /// The token `marsadm invite --merge` printed on a node of the peer's cluster.
        #[arg(long)]
        token: Option<String>,
        peer: String,
    },
    /// The cluster's gossip keys (`list`, `generate`, `install KEY`, `use KEY`,
    /// `remove KEY`): rotate by installing a new key, using it, then removing
    /// the old one.
    #[command(subcommand)]
    Keyring(KeyringCmd),
    /// Print a one-time token that lets one new node join this cluster
    /// (`join-cluster --token`), or with --merge one other cluster merge this
    /// one into itself (`merge-cluster --token`).
    Invite {
        /// A token for `merge-cluster` instead of `join-cluster`.
        #[arg(long)]
        merge: bool,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Create RES on DISK; this node becomes its primary.
    CreateResource {
        res: String,
        disk: String,
    },
    /// Make this node a secondary of RES.
    JoinResource {
        res: String,
        disk: String,
    },
    /// Stop being a member of RES.
    LeaveResource {
        res: String,
    },
    /// Remove RES (its disks are left as they are).
    DeleteResource {
        res: String,
    },
    /// Become primary of RES (planned handover; --force: failover).
    Primary {
        #[arg(long)]
        force: bool,
        res: String,
    },
    /// Give up the primary role of RES here.
    Secondary {
        res: String,
    },
    /// Attach disk and connect.
    Up {
        res: String,
    },
    /// Disconnect and detach disk (writes everything back first).
    Down {
        res: String,
    },
    Attach {
        res: String,
        /// Compute the disk's block checksums again from the disk (after it
        /// was changed on purpose while detached; refused while attached).
        #[arg(long)]
        rebuild_checksums: bool,
    },
    Detach {
        res: String,
    },
    Connect {
        res: String,
    },
    Disconnect {
        res: String,
    },
    PauseSync {
        res: String,
    },
    ResumeSync {
        res: String,
    },
    PauseFetch {
        res: String,
    },
    ResumeFetch {
        res: String,
    },
    PauseReplay {
        res: String,
    },
    ResumeReplay {
        res: String,
    },
    /// Limit this member's fetch and full-sync rates (bytes per second; K, M, G
    /// suffixes are powers of 1024; 0: unlimited).
    SetRate {
        res: String,
        #[arg(long, value_parser = parse_bytes)]
        fetch: Option<u64>,
        #[arg(long, value_parser = parse_bytes)]
        sync: Option<u64>,
    },
    /// Compress the resource's fetch and sync streams with zstd (LEVEL
    /// 1..=19, default 1), or not (`off`, the default): from each member's
    /// next connection to its source.
    SetCompression {
        res: String,
        #[arg(value_parser = ["zstd", "off"])]
        codec: String,
        #[arg(long)]
        level: Option<i32>,
    },
    /// Throw away this secondary's data and sync again.
    Invalidate {
        res: String,
    },
    /// Check every block of this node's copy of RES against its block
    /// checksums now (at the node's `scrub_rate_bytes`); `view` shows the
    /// progress and the result.
    Scrub {
        res: String,
    },
    /// Compare every member's copy of RES with the primary's, block by
    /// block, while the device is in use (each copy frozen at one log
    /// position per chunk; digests move, not data), and check each copy
    /// against its own block checksums. Prints each member and block range
    /// that differs. Exit status 0 when all copies agree (with --repair:
    /// when everything found was repaired), 2 when some differ or could not
    /// be compared, 1 on an error. Run it on a member; an interrupted verify
    /// goes on where it stopped.
    Verify {
        res: String,
        /// Rewrite the bad blocks (and wrong checksums) of each copy from a
        /// good copy.
        #[arg(long)]
        repair: bool,
        /// Compare at most this many bytes per second (K, M, G suffixes; 0:
        /// no limit, the default).
        #[arg(long, value_parser = parse_bytes)]
        rate: Option<u64>,
        /// Start from the first block, not where an interrupted verify stopped.
        #[arg(long)]
        restart: bool,
        /// Start it and return; `marsadm view RES` shows its progress and result.
        #[arg(long)]
        no_wait: bool,
    },
    /// Pause the verify of RES this node runs.
    PauseVerify {
        res: String,
    },
    /// Resume the paused verify of RES.
    ResumeVerify {
        res: String,
    },
    /// Stop the verify of RES (the next `verify RES` goes on from there).
    StopVerify {
        res: String,
    },
    /// Grow the device.
    Resize {
        res: String,
        #[arg(value_parser = parse_bytes)]
        bytes: Option<u64>,
    },
    /// Start a new logfile now.
    LogRotate {
        res: String,
    },
    /// Delete logfiles every member has applied.
    LogDelete {
        res: String,
    },
    /// Show status (human table, or --json).
    View {
        res: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Wait until every node of the cluster is reachable.
    WaitCluster {
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Wait until RES reaches CONDITION: uptodate, primary or synced.
    WaitResource {
        res: String,
        condition: String,
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Test hook: drop all peer traffic to and from these nodes (simulates a network cut).
    #[command(hide = true)]
    DebugBlock {
        nodes: Vec<String>,
    },
    /// Test hook: undo debug-block.
    #[command(hide = true)]
    DebugUnblock {
        nodes: Vec<String>,
    },
    /// Print every record of a logfile and where it is damaged (works without marsd).
    DumpLog {
        file: PathBuf,
        /// Also print the first bytes of each record's data.
        #[arg(long)]
        data: bool,
    },
}

fn main() {
    mars::node::private_umask();
    let args = Args::parse();
    match run(&args.dir, args.cmd) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("marsadm: {e:#}");
            std::process::exit(1);
        }
    }
}

fn send(dir: &Path, req: Request) -> Result<Response> {
    let resp = call(dir, &req)?;
    if !resp.ok {
        bail!(
            "{}",
            resp.error
                .unwrap_or_else(|| "refused (no reason given)".into())
        );
    }
    Ok(resp)
}

fn say(dir: &Path, req: Request) -> Result<i32> {
    let resp = send(dir, req)?;
    if let Some(m) = resp.message {
        println!("{m}");
    }
    Ok(0)
}

/// `1048576`, `512K`, `100M`, `2G` (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown unit {c:?} in {s:?}: use K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a byte count: {s:?}"))
}

fn run(dir: &Path, cmd: Cmd) -> Result<i32> {
    let pause = |res: String, what, paused| Request::Pause {
        name: res,
        what,
        paused,
    };
    match cmd {
        Cmd::CreateCluster { node, listen, nbd } => {
            let cfg = mars::node::create_cluster(dir, &node, &listen, &nbd)?;
            println!(
                "created cluster {} with node {} in {}; start it with: marsd --dir {}",
                cfg.cluster_id,
                cfg.node,
                dir.display(),
                dir.display()
            );
            Ok(0)
        }
        Cmd::JoinCluster {
            node,
            listen,
            nbd,
            token,
            peer,
        } => {
            let Some(token) = token else {
                bail!("join-cluster needs --token TOKEN: run `marsadm invite` on a node of the cluster and pass what it prints");
            };
            mars::node::check_new_node(dir, &node, &listen, &nbd)?;
            let me = mars_proto::NodeInfo {
                name: node.clone(),
                listen: listen.clone(),
                nbd: nbd.clone(),
                id: mars::node::nonzero_id(),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let j = rt.block_on(mars::peer::join(&peer, &me, &token))?;
            let cluster_id = j.cluster_id.clone();
            mars::node::init_joined(dir, &me, j)?;
            println!(
                "{node} joined cluster {cluster_id} through {peer}; start it with: marsd --dir {}",
                dir.display()
            );
            Ok(0)
        }
        Cmd::LeaveCluster { node: None, .. } => say(dir, Request::LeaveCluster),
        Cmd::LeaveCluster {
            node: Some(node),
            force,
        } => say(dir, Request::RemoveNode { node, force }),
        Cmd::MergeCluster { peer, token } => {
            let Some(token) = token else {
                bail!("merge-cluster needs --token TOKEN: run `marsadm invite --merge` on a node of {peer}'s cluster and pass what it prints");
            };
            say(dir, Request::MergeCluster { peer, token })
        }
        Cmd::Keyring(k) => {
            let op = match k {
                KeyringCmd::Generate => {
                    let key: [u8; mars_proto::gossip::KEY_LEN] = rand::random();
                    println!("{}", mars_proto::gossip::key_text(&key));
                    return Ok(0);
                }
                KeyringCmd::List => mars_api::KeyringOp::List,
                KeyringCmd::Install { key } => mars_api::KeyringOp::Install { key },
                KeyringCmd::Use { key } => mars_api::KeyringOp::Use { key },
                KeyringCmd::Remove { key } => mars_api::KeyringOp::Remove { key },
            };
            say(dir, Request::Keyring { op })
        }
        Cmd::Invite { merge, ttl } => {
            if ttl == 0 {
                bail!("--ttl must be at least 1 second");
            }
            say(
                dir,
                Request::Invite {
                    merge,
                    ttl_secs: ttl,
                },
            )
        }
        Cmd::DebugBlock { nodes } => say(
            dir,
            Request::DebugBlock {
                nodes,
                blocked: true,
            },
        ),
        Cmd::DebugUnblock { nodes } => say(
            dir,
            Request::DebugBlock {
                nodes,
                blocked: false,
            },
        ),
        Cmd::JoinResource { res, disk } => say(dir, Request::JoinResource { name: res, disk }),
        Cmd::LeaveResource { res } => say(dir, Request::LeaveResource { name: res }),
        Cmd::Invalidate { res } => say(dir, Request::Invalidate { name: res }),
        Cmd::Scrub { res } => say(dir, Request::Scrub { name: res }),
        Cmd::Verify {
            res,
            repair,
            rate,
            restart,
            no_wait,
        } => verify(dir, res, repair, rate, restart, no_wait),
        Cmd::PauseVerify { res } => say(
            dir,
            Request::VerifyControl {
                name: res,
                op: mars_api::VerifyOp::Pause,
            },
        ),
        Cmd::ResumeVerify { res } => say(
            dir,
            Request::VerifyControl {
                name: res,
                op: mars_api::VerifyOp::Resume,
            },
        ),
        Cmd::StopVerify { res } => say(
            dir,
            Request::VerifyControl {
                name: res,
                op: mars_api::VerifyOp::Stop,
            },
        ),
        Cmd::SetRate { res, fetch, sync } => {
            if fetch.is_none() && sync.is_none() {
                bail!("set-rate {res}: give --fetch BYTES and/or --sync BYTES (per second; 0: unlimited)");
            }
            say(
                dir,
                Request::SetRate {
                    name: res,
                    fetch,
                    sync,
                },
            )
        }
        Cmd::SetCompression { res, codec, level } => say(
            dir,
            Request::SetCompression {
                name: res,
                codec,
                level,
            },
        ),
        Cmd::Resize { res, bytes } => say(dir, Request::Resize { name: res, bytes }),
        Cmd::CreateResource { res, disk } => say(dir, Request::CreateResource { name: res, disk }),
        Cmd::DeleteResource { res } => say(dir, Request::DeleteResource { name: res }),
        Cmd::Primary { force, res } => say(dir, Request::Primary { name: res, force }),
        Cmd::Secondary { res } => say(dir, Request::Secondary { name: res }),
        Cmd::Up { res } => say(dir, Request::Up { name: res }),
        Cmd::Down { res } => say(dir, Request::Down { name: res }),
        Cmd::Attach {
            res,
            rebuild_checksums,
        } => say(
            dir,
            Request::Attach {
                name: res,
                rebuild_checksums,
            },
        ),
        Cmd::Detach { res } => say(dir, Request::Detach { name: res }),
        Cmd::Connect { res } => say(dir, Request::Connect { name: res }),
        Cmd::Disconnect { res } => say(dir, Request::Disconnect { name: res }),
        Cmd::PauseSync { res } => say(dir, pause(res, PauseKind::Sync, true)),
        Cmd::ResumeSync { res } => say(dir, pause(res, PauseKind::Sync, false)),
        Cmd::PauseFetch { res } => say(dir, pause(res, PauseKind::Fetch, true)),
        Cmd::ResumeFetch { res } => say(dir, pause(res, PauseKind::Fetch, false)),
        Cmd::PauseReplay { res } => say(dir, pause(res, PauseKind::Replay, true)),
        Cmd::ResumeReplay { res } => say(dir, pause(res, PauseKind::Replay, false)),
        Cmd::LogRotate { res } => say(dir, Request::LogRotate { name: res }),
        Cmd::LogDelete { res } => say(dir, Request::LogDelete { name: res }),
        Cmd::View { res, json } => {
            let view = get_view(dir, res)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", render(&view));
            }
            Ok(0)
        }
        Cmd::WaitCluster { timeout } => wait(timeout, "every node reachable", || {
            let v = get_view(dir, None)?;
            Ok(v.cluster.nodes.iter().all(|n| n.alive))
        }),
        Cmd::WaitResource {
            res,
            condition,
            timeout,
        } => {
            let check: fn(&View, &mars_api::ResourceView) -> bool = match condition.as_str() {
                "uptodate" => |_, r| {
                    let written = r.members.iter().map(|m| m.log.written).max().unwrap_or(0);
                    r.members.iter().all(|m| {
                        m.disk == "uptodate" && m.sync.is_none() && m.log.replayed >= written
                    })
                },
                "primary" => |v, r| {
                    r.actual_primary.as_deref() == Some(v.node.as_str()) && r.device.is_some()
                },
                "synced" => |_, r| {
                    r.members.iter().all(|m| {
                        m.sync.is_none() && !matches!(m.disk.as_str(), "syncing" | "inconsistent")
                    })
                },
                other => bail!("unknown condition {other:?}: use uptodate, primary or synced"),
            };
            // On a terminal, show the slowest running sync as a progress bar.
            let mut bar = std::io::stderr()
                .is_terminal()
                .then(|| ProgressBar::new(&res));
            let out = wait(timeout, &format!("{res} {condition}"), || {
                let v = get_view(dir, Some(res.clone()))?;
                let r = v
                    .resources
                    .iter()
                    .find(|r| r.name == res)
                    .ok_or_else(|| anyhow::anyhow!("unknown resource {res}"))?;
                if let Some(b) = bar.as_mut() {
                    b.show(r);
                }
                Ok(check(&v, r))
            });
            if let Some(b) = bar {
                b.finish();
            }
            out
        }
        Cmd::DumpLog { file, data } => {
            let (text, damaged) = mars::dumplog::dump(&file, data)?;
            print!("{text}");
            if damaged {
                eprintln!(
                    "marsadm: {} is damaged (see the last line above)",
                    file.display()
                );
                return Ok(2);
            }
            Ok(0)
        }
    }
}

fn get_view(dir: &Path, res: Option<String>) -> Result<View> {
    let resp = send(dir, Request::View { name: res })?;
    resp.view
        .ok_or_else(|| anyhow::anyhow!("marsd sent no view"))
}

/// Poll `check` until it holds or `timeout_s` passes.
/// A `marsd` that is not running yet (started in the background just before) is
/// waited for too; any other error ends the wait at once.
fn wait(timeout_s: f64, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.max(0.0));
    loop {
        let not_running = match check() {
            Ok(true) => return Ok(0),
            Ok(false) => None,
            Err(e) if e.downcast_ref::<mars::control::NotRunning>().is_some() => Some(e),
            Err(e) => return Err(e),
        };
        if Instant::now() >= deadline {
            match not_running {
                Some(e) => bail!("timed out after {timeout_s} s waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout_s} s waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `marsadm verify`: start (or join) the verify, show its progress on
/// stderr, print its result; 0 when all copies agree, 2 when not.
fn verify(
    dir: &Path,
    res: String,
    repair: bool,
    rate: Option<u64>,
    restart: bool,
    no_wait: bool,
) -> Result<i32> {
    let since = mars::peer::now_ms();
    let req = Request::Verify {
        name: res.clone(),
        repair,
        rate,
        restart,
    };
    let resp = send(dir, req)?;
    if let Some(m) = resp.message {
        eprintln!("{m}");
    }
    if no_wait {
        return Ok(0);
    }
    let tty = std::io::stderr().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let last = loop {
        let v = get_view(dir, Some(res.clone()))?;
        let r = v
            .resources
            .iter()
            .find(|r| r.name == res)
            .ok_or_else(|| anyhow::anyhow!("unknown resource {res}"))?;
        let Some(vv) = r.verify.as_ref() else {
            bail!("{res}: no verify runs on this node");
        };
        match (vv.running, vv.last.as_ref()) {
            (Some((done, total)), _) => {
                let line = format!(
                    "{res} verify {:5.1}% {} of {} {}/s{}",
                    done as f64 * 100.0 / total.max(1) as f64,
                    human(done),
                    human(total),
                    human(vv.rate),
                    if vv.paused { " (paused)" } else { "" }
                );
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else if last_line.elapsed() >= Duration::from_secs(10) {
                    eprintln!("{line}");
                    last_line = Instant::now();
                }
            }
            (None, Some(l)) if l.finished_ms + 1000 >= since => break l.clone(),
            (None, _) => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if tty {
        eprintln!();
    }
    for m in &last.members {
        println!(
            "{}: {} block(s) differ: {}{}",
            m.node,
            m.differing_blocks,
            m.ranges,
            if last.repair {
                format!(" ({} repaired)", m.repaired)
            } else {
                String::new()
            }
        );
    }
    if let Some(l) = &last.lost {
        println!("no good copy of {} block(s): {l}", last.lost_blocks);
    }
    for (node, why) in &last.failed {
        println!("{node}: not compared: {why}");
    }
    if let Some(e) = &last.error {
        println!("verify ended early: {e}");
    }
    println!(
        "{res}: {} of {} compared; {}",
        human(last.compared),
        human(last.total),
        if last.clean {
            "all copies agree"
        } else {
            "copies differ"
        }
    );
    Ok(if last.clean { 0 } else { 2 })
}

/// One line on stderr, redrawn in place: sync progress with rate and ETA, or replay lag.
struct ProgressBar {
    res: String,
    drawn: bool,
}

impl ProgressBar {
    fn new(res: &str) -> ProgressBar {
        ProgressBar {
            res: res.to_string(),
            drawn: false,
        }
    }

    fn show(&mut self, r: &mars_api::ResourceView) {
        let syncing = r
            .members
            .iter()
            .filter_map(|m| m.sync.map(|s| (m, s)))
            .min_by_key(|(_, s)| s.done * 1000 / s.total.max(1));
        let line = if let Some((m, s)) = syncing {
            let frac = s.done as f64 / s.total.max(1) as f64;
            let filled = (frac * 30.0) as usize;
            format!(
                "{} sync {:<8} [{}{}] {:5.1}% {}/s ETA {}",
                self.res,
                m.node,
                "#".repeat(filled),
                "-".repeat(30 - filled.min(30)),
                frac * 100.0,
                human(s.rate),
                s.eta_seconds
                    .map(|e| format!("{e}s"))
                    .unwrap_or_else(|| "?".into())
            )
        } else {
            let lag = r.members.iter().map(|m| m.lag_bytes).max().unwrap_or(0);
            format!("{} lag {}", self.res, human(lag))
        };
        eprint!("\r\x1b[2K{line}");
        self.drawn = true;
    }

    fn finish(self) {
        if self.drawn {
            eprintln!();
        }
    }
}

fn human(bytes: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn render(v: &View) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "node {} in cluster {}", v.node, v.cluster.id);
    for n in &v.cluster.nodes {
        let _ = writeln!(
            out,
            "  node {:<16} {:<22} {}",
            n.name,
            n.address,
            if n.alive { "alive" } else { "DEAD" }
        );
    }
    if v.resources.is_empty() {
        let _ = writeln!(out, "no resources");
    }
    for r in &v.resources {
        let _ = writeln!(
            out,
            "resource {} size {} primary {} device {}",
            r.name,
            human(r.size),
            r.actual_primary.as_deref().unwrap_or("-"),
            r.device.as_deref().unwrap_or("-")
        );
        if let Some(c) = &r.clash {
            let _ = writeln!(out, "  {} {c}", r.incarnation);
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<9} {:<12} {:<10} {:>12} {:>12}  flags",
            "member", "role", "disk", "conn", "replayed", "lag"
        );
        for m in &r.members {
            let mut flags = Vec::new();
            for (on, name) in [
                (m.paused.sync, "sync-paused"),
                (m.paused.fetch, "fetch-paused"),
                (m.paused.replay, "replay-paused"),
                (m.split_brain, "SPLIT-BRAIN"),
                (m.emergency, "EMERGENCY"),
            ] {
                if on {
                    flags.push(name.to_string());
                }
            }
            if let Some(s) = &m.sync {
                let mut f = format!("sync {}/{}", human(s.done), human(s.total));
                if s.rate > 0 {
                    f.push_str(&format!(" at {}/s", human(s.rate)));
                }
                if let Some(eta) = s.eta_seconds {
                    f.push_str(&format!(" ETA {eta}s"));
                }
                flags.push(f);
            }
            if m.lag_seconds > 0.0 {
                flags.push(format!("lag {:.1}s", m.lag_seconds));
            }
            if m.checksum_errors > 0 {
                flags.push(format!("CHECKSUM-ERRORS {}", m.checksum_errors));
            }
            if let Some(sc) = &m.scrub {
                if let Some((done, total)) = sc.running {
                    flags.push(format!("scrub {}/{}", human(done), human(total)));
                }
                if let Some(l) = sc.last.as_ref().filter(|l| l.bad_blocks > 0) {
                    flags.push(format!("SCRUB-FOUND {} bad blocks", l.bad_blocks));
                }
            }
            if let Some(e) = &m.error {
                flags.push(format!("error: {e}"));
            }
            let _ = writeln!(
                out,
                "  {:<16} {:<9} {:<12} {:<10} {:>12} {:>12}  {}",
                m.node,
                m.role,
                m.disk,
                if m.connected { "connected" } else { "-" },
                human(m.log.replayed),
                human(m.lag_bytes),
                flags.join(" ")
            );
        }
    }
    out
}

#[derive(Subcommand)]
enum KeyringCmd {
    /// The installed keys (by id) and the one in use.
    List,
    /// Print a new random key (installs nothing).
    Generate,
    /// Install KEY on every node (gossip sealed with it is accepted).
    Install { key: String },
    /// Seal gossip with KEY from now on (install it first).
    Use { key: String },
    /// Remove KEY from every node (not the one in use).
    Remove { key: String },
}
