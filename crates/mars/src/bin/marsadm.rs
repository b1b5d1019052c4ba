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
    about = "administer mars nodes and replicated resources",
    long_about = "Administer mars nodes and replicated resources.\n\n\
        marsadm works on the node directory DIR (--dir, else $MARS_DIR, else /mars). \
        create-cluster and join-cluster initialise DIR; dump-log, completions and \
        keyring generate work without a daemon; every other command talks to the \
        node's running marsd through the control socket inside DIR and fails with a \
        clear message when it is not running. A refused command changes nothing.",
    after_long_help = EXIT_STATUS_HELP
)]
struct Args {
    /// Node directory (default: $MARS_DIR, then /mars).
    #[arg(long, env = "MARS_DIR", default_value = "/mars", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

/// What `marsadm --help` (long form) and the man page say about exit codes.
const EXIT_STATUS_HELP: &str = "Exit status:
  0  success (wait-cluster, wait-resource: the condition was reached)
  1  the command failed or was refused, marsd is not running, or a wait timed out; one line on stderr says why
  2  the command line is wrong (clap's usage error), verify found copies that differ (or could not compare them), or dump-log found damage in the logfile";

/// The man page's sections after COMMANDS.
const MAN_SECTIONS: &[mars::manpage::Section] = &[
    mars::manpage::Section {
        heading: "EXIT STATUS",
        text: "0: success; for wait-cluster and wait-resource, the condition was reached.

1: the command failed or was refused (unknown resource, not a member, refused because it would lose data, peer unreachable, ...), marsd is not running, or a wait timed out. One line on stderr says why. A refused command changes nothing.

2: the command line is wrong (unknown command or option, missing argument; the usage is printed); verify found copies that differ, or could not compare some (with --repair: not everything found was repaired); or dump-log found damage in the logfile (its last line says where).",
    },
    mars::manpage::Section {
        heading: "ENVIRONMENT",
        text: "MARS_DIR: the node directory when --dir is not given (default /mars).",
    },
    mars::manpage::Section {
        heading: "FILES",
        text: "DIR/node.json: the node's identity and settings.

DIR/marsd.sock: the control socket of the running marsd (mode 0600; root and marsd's own user only).

DIR/resources/RES/: a resource's logfiles and replication state.

DIR/migrate-RES: the former primary a `migrate RES` to this node removes with --leave (written when the migration begins, removed with it).",
    },
    mars::manpage::Section {
        heading: "SEE ALSO",
        text: "marsd(8); the command contract (shared/spec/marsadm.md) and README.md of the mars sources.",
    },
];

#[derive(Subcommand)]
enum Cmd {
    /// Initialise DIR as the first node of a new cluster.
    ///
    /// Creates the node directory with a new cluster id, this node's identity
    /// and the cluster's certificate authority. Start the node afterwards with
    /// `marsd --dir DIR`. Refused if DIR is already a node directory.
    CreateCluster {
        /// This node's name (unique in the cluster).
        #[arg(long)]
        node: String,
        /// Address for peer traffic (HOST:PORT; TCP for data, UDP for gossip).
        #[arg(long)]
        listen: String,
        /// Where this node serves its primary devices over NBD (HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
    },
    /// Initialise DIR as a new node of the cluster PEER belongs to.
    ///
    /// Asks the running node at PEER to admit this one (with the token from
    /// `marsadm invite` there), and writes the node directory with the
    /// cluster's metadata and this node's certificate. Start the node
    /// afterwards with `marsd --dir DIR`.
    JoinCluster {
        /// This node's name (unique in the cluster).
        #[arg(long)]
        node: String,
        /// Address for peer traffic (HOST:PORT; TCP for data, UDP for gossip).
        #[arg(long)]
        listen: String,
        /// Where this node serves its primary devices over NBD (HOST:PORT).
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
        /// The one-time token `marsadm invite` printed on a node of the cluster
        /// (required: it proves the invitation and names the cluster's CA).
        #[arg(long)]
        token: Option<String>,
        /// Peer address (HOST:PORT, its --listen) of a running node of the cluster.
        peer: String,
    },
    /// Remove this node (with --node: another node) from the cluster.
    ///
    /// Its certificate is revoked. With --node, remove another node that is
    /// gone for good (or compromised). Refused while the node is a member of
    /// a resource (leave-resource first).
    LeaveCluster {
        /// The node to remove, from here (it must be no member of a resource).
        #[arg(long)]
        node: Option<String>,
        /// With --node: also while it is alive (its links are refused at once).
        #[arg(long, requires = "node")]
        force: bool,
    },
    /// Merge the peer's whole cluster into this one.
    ///
    /// Every node and resource of the peer's cluster becomes part of this
    /// one. Refused if a resource name exists in both clusters.
    MergeCluster {
        /// The token `marsadm invite --merge` printed on a node of the peer's cluster.
        #[arg(long)]
        token: Option<String>,
        /// Peer address (HOST:PORT) of a running node of the other cluster.
        peer: String,
    },
    /// Manage the cluster's gossip keys (list, generate, install, use, remove).
    ///
    /// Gossip datagrams are sealed with the key in use. Rotate by installing
    /// a new key (`keyring generate` prints one), using it, then removing the
    /// old one.
    #[command(subcommand)]
    Keyring(KeyringCmd),
    /// Print a one-time token for join-cluster (with --merge: merge-cluster).
    ///
    /// The token lets one new node join this cluster (`join-cluster
    /// --token`), or with --merge one other cluster merge this one into
    /// itself (`merge-cluster --token`). It is used once and expires after
    /// --ttl seconds.
    Invite {
        /// A token for `merge-cluster` instead of `join-cluster`.
        #[arg(long)]
        merge: bool,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Create RES on DISK; this node becomes its primary.
    ///
    /// The resource is sized as DISK (a file or block device); this node
    /// becomes its first member and primary and serves it as NBD export RES
    /// at its --nbd address.
    CreateResource {
        /// Resource name (also the NBD export name).
        res: String,
        /// This node's disk for RES: a file or a block device.
        disk: String,
    },
    /// Make this node a secondary of RES.
    ///
    /// DISK must be at least the resource's size. A full sync from another
    /// member starts; after it the node fetches and replays the primary's log.
    JoinResource {
        /// Resource name.
        res: String,
        /// This node's disk for RES: a file or a block device (overwritten).
        disk: String,
    },
    /// Stop being a member of RES.
    ///
    /// Refused for the primary unless it is the last member. The disk is left
    /// as it is.
    LeaveResource {
        /// Resource name.
        res: String,
    },
    /// Remove RES (its disks are left as they are).
    ///
    /// The resource is removed on all members; its devices stop being served.
    DeleteResource {
        /// Resource name.
        res: String,
    },
    /// Become primary of RES (planned handover; --force: failover).
    ///
    /// Without --force: waits until this node has all the data the current
    /// primary wrote, then switches; no data is lost. Refused if the current
    /// primary cannot be reached. With --force: become primary now with the
    /// data this node has (what it had not fetched is lost; a former primary
    /// that comes back shows a split brain).
    Primary {
        /// Failover: do not wait for the current primary.
        #[arg(long)]
        force: bool,
        /// Resource name.
        res: String,
    },
    /// Give up the primary role of RES here.
    ///
    /// The device stops being served; the resource has no primary until
    /// `primary RES` on a member.
    Secondary {
        /// Resource name.
        res: String,
    },
    /// Attach disk and connect.
    Up {
        /// Resource name.
        res: String,
    },
    /// Disconnect and detach disk (writes everything back first).
    Down {
        /// Resource name.
        res: String,
    },
    /// Attach this node's disk of RES (one half of `up`).
    ///
    /// The log is recovered and, on the primary, the device is served again.
    Attach {
        /// Resource name.
        res: String,
        /// Compute the disk's block checksums again from the disk (after it
        /// was changed on purpose while detached; refused while attached).
        #[arg(long)]
        rebuild_checksums: bool,
    },
    /// Detach this node's disk of RES (one half of `down`).
    ///
    /// The log is written back to the disk first; the device is no longer
    /// served here.
    Detach {
        /// Resource name.
        res: String,
    },
    /// Connect RES to the other members (one half of `up`).
    Connect {
        /// Resource name.
        res: String,
    },
    /// Disconnect RES from the other members (one half of `down`).
    ///
    /// On a secondary, log transfer stops (as with pause-fetch) until
    /// `connect`; a primary goes on serving and logging.
    Disconnect {
        /// Resource name.
        res: String,
    },
    /// Pause the full sync of RES on this node.
    PauseSync {
        /// Resource name.
        res: String,
    },
    /// Resume the full sync of RES on this node.
    ResumeSync {
        /// Resource name.
        res: String,
    },
    /// Pause log transfer (fetch) of RES to this node.
    PauseFetch {
        /// Resource name.
        res: String,
    },
    /// Resume log transfer (fetch) of RES to this node.
    ResumeFetch {
        /// Resource name.
        res: String,
    },
    /// Pause applying RES's log to this node's disk (replay).
    ///
    /// Fetch goes on: the log keeps arriving, the disk stays at a consistent
    /// older image.
    PauseReplay {
        /// Resource name.
        res: String,
    },
    /// Resume applying RES's log to this node's disk (replay).
    ResumeReplay {
        /// Resource name.
        res: String,
    },
    /// Limit this member's fetch and full-sync rates.
    ///
    /// Bytes per second; K, M, G suffixes are powers of 1024; 0: unlimited.
    /// Give --fetch, --sync or both.
    SetRate {
        /// Resource name.
        res: String,
        /// Fetch (log transfer) rate limit, bytes per second.
        #[arg(long, value_parser = parse_bytes)]
        fetch: Option<u64>,
        /// Full-sync rate limit, bytes per second.
        #[arg(long, value_parser = parse_bytes)]
        sync: Option<u64>,
    },
    /// Compress RES's fetch and sync streams with zstd, or not (off).
    ///
    /// zstd at --level 1..=19 (default 1), or `off` (the default). Applies
    /// from each member's next connection to its source; data that does not
    /// compress is sent raw.
    SetCompression {
        /// Resource name.
        res: String,
        /// `zstd` or `off`.
        #[arg(value_parser = ["zstd", "off"])]
        codec: String,
        /// zstd level, 1..=19 (default 1).
        #[arg(long)]
        level: Option<i32>,
    },
    /// Throw away this secondary's data and sync again.
    ///
    /// Resolves a split brain on the losing side, and emergency mode: the
    /// node's log copies and replay state are dropped and a full sync from
    /// the primary (while it is away: a member with a consistent disk)
    /// starts. Refused on the designated primary.
    Invalidate {
        /// Resource name.
        res: String,
    },
    /// Check this node's copy of RES against its block checksums now.
    ///
    /// Reads every block at the node's `scrub_rate_bytes`; `view` shows the
    /// progress and the result (a background scrub also runs every
    /// `scrub_interval_secs`).
    Scrub {
        /// Resource name.
        res: String,
    },
    /// Compare every member's copy of RES with the primary's (--repair: fix them).
    ///
    /// Block by block, while the device is in use (each copy frozen at one
    /// log position per chunk; digests move, not data), and each copy
    /// against its own block checksums. Prints each member and block range
    /// that differs. Exit status 0 when all copies agree (with --repair:
    /// when everything found was repaired), 2 when some differ or could not
    /// be compared, 1 on an error. Run it on a member; an interrupted verify
    /// goes on where it stopped.
    Verify {
        /// Resource name.
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
    /// Move RES to NODE in one command (run it on NODE).
    ///
    /// Runs on NODE, the destination. If NODE is not a member of RES it
    /// joins with --disk (as join-resource); then it waits for NODE's full
    /// sync (a progress bar on stderr), hands over (as `primary RES`: waits
    /// until NODE has all data, nothing is lost), and with --leave removes
    /// the former primary from RES once it has replayed everything (it stops
    /// there and removes its logs; its disk, a whole copy as of the
    /// handover, is left as it is; a former primary that is down is removed
    /// at once and learns it when it is back). Resumable: run the same command again after
    /// an interruption and it goes on from where RES is (no second join, no
    /// wait for a sync that is done, only --leave once NODE is primary).
    /// Refused, changing nothing, when NODE is not this node, RES is
    /// unknown, the disk is too small, NODE's copy is in split brain, or the
    /// current primary cannot be reached (a planned handover is then
    /// impossible; `primary --force RES` is the operator's decision).
    Migrate {
        /// Resource name.
        res: String,
        /// The destination node: this node (the command runs there).
        node: String,
        /// After the handover, remove the former primary from RES (the
        /// node that was primary when the migration began, recorded in
        /// DIR/migrate-RES until it is removed).
        #[arg(long)]
        leave: bool,
        /// This node's disk for RES when it is not a member yet: a file or a
        /// block device of at least the resource's size (overwritten).
        #[arg(long, value_name = "PATH")]
        disk: Option<String>,
        /// Give up waiting (for the sync, then the handover) after this many
        /// seconds; run the command again to go on. Default: no limit.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Keep this secondary's replay DURATION behind the primary's writes.
    ///
    /// A delayed replica: an undo window. Fetch goes on, so nothing is
    /// lost; `view` shows the delay. Refused on the primary. `0` ends the
    /// delay and replay catches up.
    SetDelay {
        /// Resource name.
        res: String,
        /// How far behind: `30s`, `10m`, `2h`, `1h30m`, `500ms`, or `0`.
        #[arg(value_parser = mars_api::parse_duration_ms)]
        duration: u64,
    },
    /// Pause the verify of RES this node runs.
    PauseVerify {
        /// Resource name.
        res: String,
    },
    /// Resume the paused verify of RES.
    ResumeVerify {
        /// Resource name.
        res: String,
    },
    /// Stop the verify of RES (the next `verify RES` goes on from there).
    StopVerify {
        /// Resource name.
        res: String,
    },
    /// Grow the device.
    ///
    /// To BYTES, or without it to the smallest member disk. Every member's
    /// disk must be large enough; shrinking is refused. NBD clients see the
    /// new size on their next connection.
    Resize {
        /// Resource name.
        res: String,
        /// New size in bytes (K, M, G, T suffixes: powers of 1024).
        #[arg(value_parser = parse_bytes)]
        bytes: Option<u64>,
    },
    /// Start a new logfile now.
    LogRotate {
        /// Resource name.
        res: String,
    },
    /// Delete logfiles every member has applied.
    LogDelete {
        /// Resource name.
        res: String,
    },
    /// Show status (human table, or --json).
    ///
    /// Every resource (or only RES), every member with its role, disk state,
    /// connection, sync progress and lag. --json prints one JSON object, the
    /// format that scripts and monitoring rely on (see the command contract).
    View {
        /// Only this resource.
        res: Option<String>,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Print the state, then one line per change (role, disk state,
        /// connection, split brain, emergency, sync start and end, member
        /// join and leave, nodes up and down) with a timestamp, until
        /// interrupted; with --json, the state and each event as one JSON
        /// object per line.
        #[arg(long)]
        watch: bool,
    },
    /// Wait until every node of the cluster is reachable.
    ///
    /// Exit 0 when reached, 1 on timeout.
    WaitCluster {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Wait until RES reaches CONDITION: uptodate, primary or synced.
    ///
    /// uptodate: every member has replayed everything the primary wrote and
    /// no sync is running; primary: this node serves RES; synced: no sync
    /// runs on any member. Exit 0 when reached, 1 on timeout. On a terminal,
    /// a progress bar shows the slowest sync or the lag.
    WaitResource {
        /// Resource name.
        res: String,
        /// uptodate, primary or synced.
        condition: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Test hook: drop all peer traffic to and from these nodes (simulates a network cut).
    #[command(hide = true)]
    DebugBlock { nodes: Vec<String> },
    /// Test hook: undo debug-block.
    #[command(hide = true)]
    DebugUnblock { nodes: Vec<String> },
    /// Print every record of a logfile and where it is damaged (works without marsd).
    ///
    /// Exit 2 when the logfile is damaged (the last line says where).
    DumpLog {
        /// A logfile (DIR/resources/RES/log-...).
        file: PathBuf,
        /// Also print the first bytes of each record's data.
        #[arg(long)]
        data: bool,
    },
    /// Print a shell completion script for SHELL (works without marsd).
    ///
    /// bash: `marsadm completions bash > /etc/bash_completion.d/marsadm`;
    /// zsh: write it as `_marsadm` into a directory of $fpath;
    /// fish: `marsadm completions fish > ~/.config/fish/completions/marsadm.fish`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page marsadm(1), generated from these definitions
    /// (scripts/gen-man.sh writes man/marsadm.1 with it).
    #[command(hide = true)]
    Man,
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
        Cmd::Migrate {
            res,
            node,
            leave,
            disk,
            timeout,
        } => migrate(dir, &res, &node, leave, disk, timeout),
        Cmd::SetDelay { res, duration } => say(
            dir,
            Request::SetDelay {
                name: res,
                ms: duration,
            },
        ),
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
        Cmd::View { res, json, watch } => {
            if watch {
                return view_watch(dir, res, json);
            }
            let view = get_view(dir, res)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", render(&view));
            }
            Ok(0)
        }
        Cmd::WaitCluster { timeout } => wait(dir, None, timeout, "every node reachable", |v| {
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
            let what = format!("{res} {condition}");
            let out = wait(dir, Some(res.clone()), timeout, &what, |v| {
                let r = v
                    .resources
                    .iter()
                    .find(|r| r.name == res)
                    .ok_or_else(|| anyhow::anyhow!("unknown resource {res}"))?;
                if let Some(b) = bar.as_mut() {
                    b.show(r);
                }
                Ok(check(v, r))
            });
            if let Some(b) = bar {
                b.finish();
            }
            out
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "marsadm", &mut out);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &out)?;
            Ok(0)
        }
        Cmd::Man => {
            use clap::CommandFactory;
            let page = mars::manpage::render(Args::command(), "1", MAN_SECTIONS)?;
            std::io::Write::write_all(&mut std::io::stdout().lock(), &page)?;
            Ok(0)
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

/// Check every view of `name` (all: None) marsd sends as it changes
/// (`Request::Watch`, full views: no polling) until `check` holds or
/// `timeout_s` passes. A `marsd` that is not running yet (started in the
/// background just before), or that stops meanwhile, is waited for too; any
/// other error ends the wait at once.
fn wait(
    dir: &Path,
    name: Option<String>,
    timeout_s: f64,
    what: &str,
    mut check: impl FnMut(&View) -> Result<bool>,
) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.max(0.0));
    let not_running = |e: &anyhow::Error| e.downcast_ref::<mars::control::NotRunning>().is_some();
    let mut last: Option<anyhow::Error> = None;
    loop {
        match mars::control::Watch::open(dir, name.clone(), true) {
            Ok(mut w) => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match w.next_line(Some(left)) {
                    Ok(Some(line)) => {
                        let resp: Response = serde_json::from_str(&line)?;
                        let Some(v) = resp.view.filter(|_| resp.ok) else {
                            bail!(
                                "{}",
                                resp.error.unwrap_or_else(|| "marsd sent no view".into())
                            );
                        };
                        if check(&v)? {
                            return Ok(0);
                        }
                    }
                    Ok(None) => break,
                    Err(e) if not_running(&e) => {
                        last = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            },
            Err(e) if not_running(&e) => last = Some(e),
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            match last {
                Some(e) => bail!("timed out after {timeout_s} s waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout_s} s waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `view --watch`: the view, then one line per change (`--json`: the view
/// and each event as one JSON object per line), until interrupted.
fn view_watch(dir: &Path, res: Option<String>, json: bool) -> Result<i32> {
    let mut w = mars::control::Watch::open(dir, res, false)?;
    let mut first = true;
    loop {
        let Some(line) = w.next_line(None)? else {
            continue;
        };
        if let Ok(e) = serde_json::from_str::<mars_api::Event>(&line) {
            if json {
                println!("{line}");
            } else {
                println!("{}", e.line());
            }
            continue;
        }
        let resp: Response = serde_json::from_str(&line)?;
        let Some(v) = resp.view.filter(|_| resp.ok && first) else {
            bail!(
                "{}",
                resp.error.unwrap_or_else(|| "marsd ended the watch".into())
            );
        };
        first = false;
        if json {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            print!("{}", render(&v));
        }
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
        std::thread::sleep(Duration::from_millis(50));
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

/// A wait of `migrate` that timed out: say that running it again goes on.
fn resumable(e: anyhow::Error) -> anyhow::Error {
    if format!("{e:#}").starts_with("timed out") {
        anyhow::anyhow!("{e:#}; run the same command again to go on")
    } else {
        e
    }
}

/// How long `migrate` asks again for a handover refused because this member
/// has not yet checked its history against the primary's log.
const HANDOVER_RETRY: Duration = Duration::from_secs(120);

/// `marsadm migrate RES NODE`: join (if needed), wait for the sync, hand
/// over, and with `leave` remove the former primary; each step is skipped
/// when RES is past it already, so the command resumes after an
/// interruption. The former primary is recorded in `DIR/migrate-RES` when
/// the migration begins (the view no longer names it once NODE is primary),
/// and forgotten once it is removed.
fn migrate(
    dir: &Path,
    res: &str,
    node: &str,
    leave: bool,
    disk: Option<String>,
    timeout: Option<f64>,
) -> Result<i32> {
    if !mars::meta::valid_name(res) {
        bail!("not a resource name: {res:?}");
    }
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
    let v = get_view(dir, Some(res.to_string()))?;
    let me = v.node.clone();
    if node != me {
        if !v.cluster.nodes.iter().any(|n| n.name == node) {
            bail!("{node} is not a node of this cluster: add it first (`marsadm invite` here, `marsadm join-cluster --token ...` there)");
        }
        let mut again = format!("marsadm migrate {res} {node}");
        if leave {
            again.push_str(" --leave");
        }
        if let Some(d) = &disk {
            again.push_str(&format!(" --disk {d}"));
        }
        bail!("migrate runs on the destination, and this is {me}: run `{again}` on {node}");
    }
    let find = |v: &View| -> Result<mars_api::ResourceView> {
        v.resources
            .iter()
            .find(|r| r.name == res)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("unknown resource {res}"))
    };
    let r = find(&v)?;
    if let Some(c) = &r.clash {
        bail!("{res}: {c}; resolve the name clash first");
    }
    let record = dir.join(format!("migrate-{res}"));
    let recorded = std::fs::read_to_string(&record)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| mars::meta::valid_name(s) && *s != me);
    let designated = r.designated_primary.clone();
    let handed_over = designated.as_deref() == Some(me.as_str());
    let alive = |v: &View, n: &str| v.cluster.nodes.iter().any(|x| x.name == n && x.alive);
    let unreachable = |p: &str| {
        anyhow::anyhow!(
            "{res}: the current primary {p} cannot be reached, so a planned handover to {me} is impossible; \
             bring {p} back and run this again, or, as the operator's decision, `marsadm primary --force {res}` \
             on a member makes its data the primary's (writes {p} did not send are lost)"
        )
    };
    if !handed_over {
        match designated.as_deref() {
            Some(p) if !alive(&v, p) => return Err(unreachable(p)),
            Some(_) => {}
            None => bail!("{res} has no designated primary (after `marsadm secondary {res}`): nothing to hand over from; make a member primary first"),
        }
    }
    let mine = |r: &mars_api::ResourceView| r.members.iter().find(|m| m.node == me).cloned();
    if let Some(m) = mine(&r) {
        if m.split_brain {
            bail!("{res}: {me}'s copy is in split brain with the primary's log; `marsadm invalidate {res}` here syncs it again, then run this again");
        }
        if m.disk == "detached" {
            bail!("{res}: {me}'s disk is detached; `marsadm up {res}` here first, then run this again");
        }
    } else {
        let Some(disk) = disk else {
            bail!(
                "{me} is not a member of {res}: give --disk PATH, this node's disk for it (at least {} bytes, overwritten)",
                r.size
            );
        };
        let resp = send(
            dir,
            Request::JoinResource {
                name: res.to_string(),
                // marsd's working directory is not this one.
                disk: std::path::absolute(&disk)
                    .map(|p| p.display().to_string())
                    .unwrap_or(disk),
            },
        )
        .map_err(|e| anyhow::anyhow!("{me} cannot take {res}: {e:#}"))?;
        if let Some(m) = resp.message {
            eprintln!("{m}");
        }
    }
    // Who to remove with --leave: recorded before anything else changes
    // (NODE's own view names NODE as primary once it took over).
    let from = match designated.filter(|p| *p != me) {
        Some(p) => {
            std::fs::write(&record, format!("{p}\n"))
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", record.display()))?;
            Some(p)
        }
        None => recorded,
    };
    let left = |what: &str| -> Result<f64> {
        match deadline {
            None => Ok(1e9), // about 31 years: no limit
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    bail!(
                        "{res}: timed out waiting for {what}; run the same command again to go on"
                    );
                }
                Ok((d - now).as_secs_f64())
            }
        }
    };
    // The full sync of this node's copy.
    if !handed_over {
        let mut bar = ProgressBar::new(res);
        let what = format!("{me}'s sync of {res}");
        let out = wait(dir, Some(res.to_string()), left("the sync")?, &what, |v| {
            let r = find(v)?;
            let Some(m) = mine(&r) else {
                bail!("{me} is no longer a member of {res}");
            };
            if m.split_brain {
                bail!("{res}: {me}'s copy is in split brain with the primary's log; `marsadm invalidate {res}` here syncs it again, then run this again");
            }
            bar.show(&r);
            Ok(m.sync.is_none()
                && !matches!(m.disk.as_str(), "syncing" | "inconsistent" | "detached"))
        });
        bar.finish();
        out.map_err(resumable)?;
        eprintln!("{res}: {me} is synced");
        // The planned handover.
        let v = get_view(dir, Some(res.to_string()))?;
        // The planned handover; a member that has not yet checked its
        // history against the primary's log (just after a restart of either)
        // is refused for a moment: asked again until it has.
        let mut v = v;
        let asked = Instant::now();
        loop {
            let r = find(&v)?;
            match r.designated_primary.as_deref() {
                Some(p) if p == me => break,
                Some(p) if !alive(&v, p) => return Err(unreachable(p)),
                _ => {}
            }
            let req = Request::Primary {
                name: res.to_string(),
                force: false,
            };
            match send(dir, req) {
                Ok(resp) => {
                    if let Some(m) = resp.message {
                        eprintln!("{m}");
                    }
                    break;
                }
                // Not done within the daemon's wait: it goes on, waited for below.
                Err(e) if format!("{e:#}").contains("goes on in the background") => {
                    eprintln!("{e:#}");
                    break;
                }
                Err(e) if format!("{e:#}").contains("not yet checked its history") => {
                    if left("the handover").is_err() || asked.elapsed() > HANDOVER_RETRY {
                        bail!("{e:#}; run the same command again to go on");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
            v = get_view(dir, Some(res.to_string()))?;
        }
    }
    let mut bar = ProgressBar::new(res);
    let out = wait(
        dir,
        Some(res.to_string()),
        left("the handover")?,
        &format!("{me} to serve {res}"),
        |v| {
            let r = find(v)?;
            if r.designated_primary.as_deref() != Some(me.as_str()) {
                bail!(
                "{res}: the designated primary is now {} (another command changed it); run this again to migrate to {me}",
                r.designated_primary.as_deref().unwrap_or("none")
            );
            }
            bar.show(&r);
            Ok(r.actual_primary.as_deref() == Some(me.as_str()) && r.device.is_some())
        },
    );
    bar.finish();
    out.map_err(resumable)?;
    let r = find(&get_view(dir, Some(res.to_string()))?)?;
    let device = r.device.clone().unwrap_or_default();
    if !leave {
        println!("{res}: {me} is primary, serving {device}");
        return Ok(0);
    }
    let Some(old) = from else {
        println!("{res}: {me} is primary, serving {device}; no former primary recorded here to remove (already removed, or the handover was not made by migrate on this node: `marsadm leave-resource {res}` on it)");
        return Ok(0);
    };
    if r.members.iter().any(|m| m.node == old) {
        // Its disk is left as it is: first let it replay everything up to
        // the handover, so that it holds a whole copy (unless it is down).
        let out = wait(
            dir,
            Some(res.to_string()),
            left("the former primary")?,
            &format!("{old} to replay all"),
            |v| {
                let r = find(v)?;
                if !alive(v, &old) {
                    return Ok(true);
                }
                let written = r.members.iter().map(|m| m.log.written).max().unwrap_or(0);
                Ok(r.members
                    .iter()
                    .find(|m| m.node == old)
                    .is_none_or(|m| m.disk == "uptodate" && m.log.replayed >= written))
            },
        );
        out.map_err(resumable)?;
        let resp = send(
            dir,
            Request::RemoveMember {
                name: res.to_string(),
                node: old.clone(),
            },
        )?;
        if let Some(m) = resp.message {
            eprintln!("{m}");
        }
    }
    let _ = std::fs::remove_file(&record);
    println!("{res}: {me} is primary, serving {device}; {old} is no longer a member");
    Ok(0)
}

/// One line on stderr, redrawn in place: sync progress with rate and ETA, or replay lag.
/// Not on a terminal: one line every 10 s instead.
struct ProgressBar {
    res: String,
    drawn: bool,
    tty: bool,
    last_line: Option<Instant>,
}

impl ProgressBar {
    fn new(res: &str) -> ProgressBar {
        ProgressBar {
            res: res.to_string(),
            drawn: false,
            tty: std::io::stderr().is_terminal(),
            last_line: None,
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
        if !self.tty {
            if self
                .last_line
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                eprintln!("{line}");
                self.last_line = Some(Instant::now());
            }
            return;
        }
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
            if m.repaired > 0 {
                flags.push(format!("repaired {}", m.repaired));
            }
            if m.replay_delay_seconds > 0.0 {
                flags.push(format!(
                    "delay {}",
                    mars_api::show_duration_ms((m.replay_delay_seconds * 1000.0) as u64)
                ));
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
    /// Print a new random key (installs nothing; works without marsd).
    Generate,
    /// Install KEY on every node (gossip sealed with it is accepted).
    Install {
        /// The key (64 hex digits, as `keyring generate` printed it).
        key: String,
    },
    /// Seal gossip with KEY from now on (install it first).
    Use {
        /// The key (64 hex digits, as `keyring generate` printed it).
        key: String,
    },
    /// Remove KEY from every node (not the one in use).
    Remove {
        /// The key (64 hex digits, as `keyring generate` printed it).
        key: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every visible command (nested ones too) has a one-line about, and
    /// every visible argument a help text.
    fn check_help(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {}", arg.get_id()));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let p = format!("{path} {}", sub.get_name());
            match sub.get_about() {
                Some(a) if !a.to_string().trim().is_empty() && !a.to_string().contains('\n') => {}
                _ => missing.push(format!("{p}: about")),
            }
            check_help(sub, &p, missing);
        }
    }

    #[test]
    fn every_command_and_option_has_help() {
        let mut cmd = Args::command();
        cmd.build();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        check_help(&cmd, "marsadm", &mut missing);
        assert!(missing.is_empty(), "no help text for: {missing:#?}");
    }
}
