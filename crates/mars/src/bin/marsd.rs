//! `marsd --dir DIR`: one mars node, in the foreground, logging to stderr.

use anyhow::{bail, Context, Result};
use clap::Parser;
use mars::daemon::Daemon;
use mars::node;
use mars::systemd;
use sd_notify::NotifyState;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "marsd",
    version,
    about = "mars node daemon: replicated block devices served over NBD",
    long_about = "mars node daemon: replicated block devices served over NBD.\n\n\
        Runs one node of a mars cluster in the foreground, on the node directory DIR \
        that `marsadm create-cluster` or `marsadm join-cluster` initialised: it \
        replicates the node's resources with the other nodes (peer traffic and gossip \
        on the node's listen address) and serves the resources it is primary of as NBD \
        exports (on its NBD address). marsadm talks to it through the control socket \
        DIR/marsd.sock. Logs go to stderr (MARS_LOG sets the filter, e.g. \
        MARS_LOG=debug). SIGTERM or SIGINT stops it cleanly: every log is written back \
        first.\n\n\
        Under systemd (Type=notify) it reports READY=1 once the node directory is \
        loaded and the peer, control and NBD listeners serve, STATUS= lines, \
        STOPPING=1 at shutdown, and with WatchdogSec= pings the watchdog while its \
        control loop runs.",
    after_long_help = EXIT_STATUS_HELP
)]
struct Args {
    /// Node directory (default: $MARS_DIR, then /mars).
    #[arg(long, env = "MARS_DIR", default_value = "/mars")]
    dir: PathBuf,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (overrides the
    /// node setting `metrics` in node.json; `off`: not served). Default: the
    /// setting, else off. Anyone who reaches the address can read them.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Print the man page marsd(8), generated from these definitions, and exit
    /// (scripts/gen-man.sh writes man/marsd.8 with it).
    #[arg(long, hide = true)]
    man: bool,
}

/// What `marsd --help` (long form) and the man page say about exit codes.
const EXIT_STATUS_HELP: &str = "Exit status:
  0  stopped cleanly by SIGTERM or SIGINT
  1  refused to start (DIR is not an initialised node directory, a port is taken, another marsd runs on DIR, a setting is wrong) or a fatal error; one line on stderr says why
  2  the command line is wrong";

/// The man page's sections after OPTIONS.
const MAN_SECTIONS: &[mars::manpage::Section] = &[
    mars::manpage::Section {
        heading: "EXIT STATUS",
        text: "0: stopped cleanly by SIGTERM or SIGINT (every log written back).

1: refused to start, with a one-line reason on stderr: DIR is not an initialised node directory, a port is taken, another marsd runs on DIR, or a setting in DIR/node.json is wrong; or a fatal error.

2: the command line is wrong.

Killed by a signal (SIGKILL, or SIGABRT from the systemd watchdog): the next start recovers every acknowledged write from the logs.",
    },
    mars::manpage::Section {
        heading: "ENVIRONMENT",
        text: "MARS_DIR: the node directory when --dir is not given (default /mars).

MARS_LOG: the log filter (tracing EnvFilter syntax; default info).

NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID: set by systemd for Type=notify and WatchdogSec= (see sd_notify(3)).",
    },
    mars::manpage::Section {
        heading: "FILES",
        text: "DIR/node.json: the node's identity and settings, read at start. Among them metrics (HOST:PORT where Prometheus metrics are served, as --metrics), and primary_units, a map from resource name to a systemd unit that marsd starts (systemctl start) where this node serves the resource's device and stops (systemctl stop, waited for) before it stops serving it.

DIR/marsd.sock: the control socket (mode 0600).

DIR/marsd.lock: held while marsd runs on DIR.

contrib/systemd/marsd.service, contrib/systemd/mars-resource@.service in the mars sources: the units (installed by scripts/install.sh).",
    },
    mars::manpage::Section {
        heading: "SEE ALSO",
        text: "marsadm(1), systemd.service(5), sd_notify(3).",
    },
];

/// Keep freed heap memory in the process for the next request's buffers instead of
/// returning it to the kernel: the daemon allocates and frees megabytes per second
/// (request payloads, log batches, fetched chunks), and memory given back and taken
/// again costs a page fault per page, far more on a VM whose host reclaims freed
/// guest pages (virtio-balloon free page reporting; +9 % on sequential writes
/// there). The heap stays at its high-water mark, which the memory settings bound.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        // Allocations up to 64 MiB come from the heap (not from mmap, unmapped on free).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        // Never shrink the heap's top on free.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
    let args = Args::parse();
    if args.man {
        use clap::CommandFactory;
        let page = mars::manpage::render(Args::command(), "8", MAN_SECTIONS);
        let written =
            page.and_then(|p| std::io::Write::write_all(&mut std::io::stdout().lock(), &p));
        if let Err(e) = written {
            eprintln!("marsd: {e}");
            std::process::exit(1);
        }
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MARS_LOG")
                // rustls warns of every client (GnuTLS: qemu, libnbd) that sends an IP
                // address as TLS SNI: harmless, and one line per NBD connection.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,rustls::msgs::handshake=error")
                }),
        )
        .init();
    raise_fd_limit();
    if let Err(e) = run(&args.dir, args.metrics.as_deref()) {
        eprintln!("marsd: {e:#}");
        std::process::exit(1);
    }
}

/// Hold an exclusive lock on DIR/marsd.lock for the life of the process.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("marsd.lock");
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on an owned descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another marsd is already running on {}", dir.display());
    }
    Ok(f)
}

fn bind_tcp(what: &str, addr: &str) -> Result<std::net::TcpListener> {
    let sa = node::check_addr(what, addr)?;
    let l = std::net::TcpListener::bind(sa)
        .map_err(|e| anyhow::anyhow!("cannot listen on {what} address {addr}: {e}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn run(dir: &Path, metrics_flag: Option<&str>) -> Result<()> {
    node::private_umask();
    systemd::status("loading the node directory");
    let cfg = node::load_node(dir)?;
    let metrics_addr = match metrics_flag {
        Some("off") => None,
        Some(a) => Some(a.to_string()),
        None => cfg.metrics.clone(),
    };
    if node::private_node_dir(dir)? {
        tracing::warn!(
            "{} was accessible by other users: made it 0700 (it holds the logs and the disk records)",
            dir.display()
        );
    }
    let nbd_options = mars::nbd_tls::server_options(dir, &cfg)?;
    let _lock = lock_dir(dir)?;
    let tls = std::sync::Arc::new(mars::tls::Tls::load(dir)?);
    let want = mars_meta::schema::NodeRef::new(&cfg.node, cfg.node_id).token();
    if tls.identity()? != want {
        anyhow::bail!(
            "the certificate in {} is not this node's ({want})",
            mars::tls::tls_dir(dir).display()
        );
    }
    let nbd = bind_tcp("NBD", &cfg.nbd)?;
    let metrics = metrics_addr
        .as_deref()
        .map(|a| bind_tcp("metrics (--metrics)", a))
        .transpose()?;
    let peer = bind_tcp("peer (--listen)", &cfg.listen)?;
    let udp =
        std::net::UdpSocket::bind(node::check_addr("--listen", &cfg.listen)?).map_err(|e| {
            anyhow::anyhow!("cannot listen on gossip (UDP) address {}: {e}", cfg.listen)
        })?;
    let sock_path = dir.join(mars_api::SOCKET_NAME);
    let ctl = mars::control::bind(&sock_path)?;
    ctl.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("marsd")
        // Reads are served inline unless they must wait for the disk: a few blocking
        // threads suffice, and an unbounded pool only piles up threads under load.
        .max_blocking_threads(64)
        .build()?;
    rt.block_on(async move {
        let nbd = tokio::net::TcpListener::from_std(nbd)?;
        let peer_tcp = tokio::net::TcpListener::from_std(peer)?;
        let peer = mars::peer::Peer::start(
            mars::peer::PeerSetup {
                dir: dir.to_path_buf(),
                me: mars_proto::NodeInfo {
                    name: cfg.node.clone(),
                    listen: cfg.listen.clone(),
                    nbd: cfg.nbd.clone(),
                    id: cfg.node_id,
                },
                cluster_id: cfg.cluster_id.clone(),
                former_ids: cfg.former_cluster_ids.clone(),
                udp,
                tls,
            },
            peer_tcp,
        )?;
        let daemon = Arc::new(Daemon::new(dir, cfg.clone(), peer.clone())?);
        peer.set_data_server(daemon.server.clone());
        let ctl = tokio::net::UnixListener::from_std(ctl)?;
        systemd::status("asking the other nodes for metadata before serving");
        daemon.catch_up_before_serving().await;
        systemd::status("attaching disks");
        daemon.reconcile().await;
        tracing::info!(node = %cfg.node, cluster = %cfg.cluster_id, nbd = %cfg.nbd, listen = %cfg.listen, "marsd started");
        tracing::info!("NBD: {}", mars::nbd_tls::describe(&cfg, &nbd_options));
        let registry: Arc<dyn mars_nbd::Registry> = daemon.exports.clone();
        tokio::spawn(async move {
            if let Err(e) = mars_nbd::serve_with(nbd, registry, nbd_options).await {
                tracing::error!("NBD server stopped: {e}");
            }
        });
        tokio::spawn(mars::control::serve(ctl, daemon.clone()));
        if let (Some(l), Some(addr)) = (metrics, &metrics_addr) {
            let l = tokio::net::TcpListener::from_std(l)?;
            let source = mars::metrics::Source::new(daemon.clone());
            tokio::spawn(mars::metrics::serve(l, source.render()));
            tracing::info!("metrics: http://{addr}/metrics");
        }
        tokio::spawn(daemon.clone().run_loop());
        // The peer listener serves since Peer::start, the NBD and control
        // listeners from the tasks above (their sockets were bound before:
        // a connection made now is answered).
        let serving = format!("serving: peer {}, NBD {}, node {}", cfg.listen, cfg.nbd, cfg.node);
        systemd::notify(&[NotifyState::Ready, NotifyState::Status(&serving)]);
        daemon.alive.beat();
        tokio::spawn(systemd::watchdog(daemon.alive.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping: writing back all logs");
        systemd::notify(&[NotifyState::Stopping, NotifyState::Status("stopping: writing back all logs")]);
        daemon.shutdown().await;
        let _ = std::fs::remove_file(&sock_path);
        tracing::info!("stopped");
        anyhow::Ok(())
    })?;
    // Blocking pool threads may still be parked; do not wait for them.
    std::process::exit(0);
}

/// Raise the soft limit on open files to the hard limit: a node serves many
/// resources (logfiles, disks, syncers' files) and peers, and running out
/// of descriptors must not be what stops a log.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer for getrlimit, a valid in-pointer for setrlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::info!(from = old, to = lim.rlim_cur, "raised the open-file limit");
            } else {
                tracing::warn!(limit = old, "could not raise the open-file limit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_has_help() {
        let cmd = Args::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            assert!(
                arg.get_help().is_some(),
                "marsd --{} has no help",
                arg.get_id()
            );
        }
    }
}
