//! Prometheus metrics: `marsd --metrics HOST:PORT` (or the node setting
//! `metrics` in `node.json`) serves them at `http://HOST:PORT/metrics`.
//!
//! Off by default. What is shown comes from three places, read at each
//! scrape (nothing is computed when nobody scrapes):
//!
//! - the resources and members as `marsadm view --json` shows them, from the
//!   same builder ([`Daemon::local_view`]: this node's state and metadata,
//!   without asking other nodes), for the resources this node is a member of;
//! - the NBD request statistics of each device served here since start
//!   ([`mars_nbd::DeviceStats`], relaxed atomics on the request path);
//! - the node: its directory's filesystem, logfile bytes per resource, the
//!   cluster's nodes as the membership protocol sees them, gossip traffic.
//!
//! The exposition is written by `prometheus-client` (the official Rust
//! client): the OpenMetrics text format when the scraper's `Accept` asks for
//! it (Prometheus does), else the Prometheus text format 0.0.4.
//!
//! The HTTP side is a small HTTP/1.x responder on the daemon's tokio runtime
//! rather than an HTTP crate: one read-only page needs none of a general
//! server's features (keep-alive, bodies, chunking, upgrades), and a strict
//! one is easier to bound: the request head must arrive within
//! [`READ_TIMEOUT`] and fit in [`MAX_REQUEST`] bytes, at most
//! [`MAX_CONNECTIONS`] are served at once, [`MAX_PER_ADDRESS`] to one client
//! address (others are closed at accept), the
//! reply must be taken within [`WRITE_TIMEOUT`], and every connection is closed
//! after one reply. Only `GET` and `HEAD` of `/metrics` (a query string is
//! ignored) are answered with metrics; other paths get 404, other methods 405,
//! anything malformed 400, an oversized head 431, a slow one 408.

use crate::daemon::Daemon;
use mars_api::View;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// The largest request head read (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request head (a scraper sends it
/// at once).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the reply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections served at once to one client address: a client that holds
/// connections open (slowly sending, or never) cannot take every slot from a
/// scraper elsewhere.
pub const MAX_PER_ADDRESS: usize = 4;
/// How long a scrape waits for the daemon's state (held by reconcile across
/// long steps) before it answers with the last view it built.
const VIEW_WAIT: Duration = Duration::from_secs(2);

/// The exposition format asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4.
    Prometheus,
    /// The OpenMetrics text format 1.0.0.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Renders the metrics page (`None`: it could not be written, a 500).
pub type Render = Arc<dyn Fn(Format) -> BoxFut<Option<String>> + Send + Sync>;

/// Serve `/metrics` on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_addr: PerAddr = Default::default();
    let mut warned: Option<Instant> = None;
    loop {
        let (stream, ip) = match listener.accept().await {
            Ok((s, a)) => (s, a.ip()),
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    warned = Some(Instant::now());
                    tracing::warn!("metrics: accept: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: closed at once (a scraper tries again next interval).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        {
            let mut m = per_addr.lock();
            let n = m.entry(ip).or_insert(0);
            if *n >= MAX_PER_ADDRESS {
                continue;
            }
            *n += 1;
        }
        let render = render.clone();
        let per_addr = per_addr.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _addr = AddrSlot(per_addr, ip);
            handle(stream, &render).await;
        });
    }
}

type PerAddr = Arc<parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One connection of a client address, given back when dropped.
struct AddrSlot(PerAddr, std::net::IpAddr);

impl Drop for AddrSlot {
    fn drop(&mut self) {
        let mut m = self.0.lock();
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// An HTTP answer other than the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Timeout,
    TooLarge,
}

impl Refusal {
    fn status(self) -> &'static str {
        match self {
            Refusal::BadRequest => "400 Bad Request",
            Refusal::NotFound => "404 Not Found",
            Refusal::MethodNotAllowed => "405 Method Not Allowed",
            Refusal::Timeout => "408 Request Timeout",
            Refusal::TooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// A request for the metrics page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsRequest {
    pub format: Format,
    /// `HEAD`: headers only.
    pub head: bool,
}

/// Parse a request head (up to and including the empty line).
pub fn parse_request(head: &[u8]) -> Result<MetricsRequest, Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| Refusal::BadRequest)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().ok_or(Refusal::BadRequest)?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Err(Refusal::BadRequest);
    }
    let mut format = Format::Prometheus;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or(Refusal::BadRequest)?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(Refusal::BadRequest);
        }
        if name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text") {
            format = Format::OpenMetrics;
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Err(Refusal::NotFound);
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Refusal::MethodNotAllowed),
    };
    Ok(MetricsRequest { format, head })
}

/// Why no request head was read.
enum HeadError {
    /// The client went away (or an I/O error) before a whole head.
    Gone,
    /// Bytes arrived, then EOF before the head's end.
    Truncated,
    TooLarge,
}

/// Read a request head into `buf`: its length (through the empty line).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<usize, HeadError> {
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Err(HeadError::TooLarge);
        }
        let n = match s.read(&mut buf[len..]).await {
            Ok(n) => n,
            Err(_) => return Err(HeadError::Gone),
        };
        if n == 0 {
            return Err(if len == 0 {
                HeadError::Gone
            } else {
                HeadError::Truncated
            });
        }
        // Look for the end from just before the new bytes (it may straddle).
        let from = len.saturating_sub(3);
        len += n;
        let seen = &buf[from..len];
        if let Some(i) = find(seen, b"\r\n\r\n") {
            return Ok(from + i + 4);
        }
        if let Some(i) = find(seen, b"\n\n") {
            return Ok(from + i + 2);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Answer one connection: one request, one reply, closed.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, render: &Render) {
    let mut buf = vec![0u8; MAX_REQUEST];
    let parsed = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut s, &mut buf)).await {
        Ok(Ok(len)) => parse_request(&buf[..len]),
        Ok(Err(HeadError::Gone)) => return,
        Ok(Err(HeadError::Truncated)) => Err(Refusal::BadRequest),
        Ok(Err(HeadError::TooLarge)) => Err(Refusal::TooLarge),
        Err(_) => Err(Refusal::Timeout),
    };
    let (status, ctype, body, head) = match parsed {
        Ok(r) => match render(r.format).await {
            Some(body) => ("200 OK", r.format.content_type(), body, r.head),
            None => (
                "500 Internal Server Error",
                "text/plain; charset=utf-8",
                "metrics could not be written\n".to_string(),
                r.head,
            ),
        },
        Err(e) => (
            e.status(),
            "text/plain; charset=utf-8",
            format!("{}\n", e.status()),
            false,
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head {
        reply.extend_from_slice(body.as_bytes());
    }
    let write = async {
        s.write_all(&reply).await?;
        s.shutdown().await
    };
    if let Ok(Err(e)) = tokio::time::timeout(WRITE_TIMEOUT, write).await {
        tracing::debug!("metrics: reply: {e}");
    }
}

/// The daemon's side: builds a [`Snapshot`] per scrape.
pub struct Source {
    daemon: Arc<Daemon>,
    /// The last view built, for a scrape that finds the state taken.
    last: tokio::sync::Mutex<Option<(Instant, View)>>,
}

impl Source {
    pub fn new(daemon: Arc<Daemon>) -> Arc<Source> {
        Arc::new(Source {
            daemon,
            last: Default::default(),
        })
    }

    /// A [`Render`] of this source's metrics.
    pub fn render(self: &Arc<Self>) -> Render {
        let me = self.clone();
        Arc::new(move |format| {
            let me = me.clone();
            Box::pin(async move { encode(&me.snapshot().await, format).ok() })
        })
    }

    /// Everything a scrape shows, now.
    pub async fn snapshot(&self) -> Snapshot {
        let d = &self.daemon;
        let (view, view_age) = {
            let mut last = self.last.lock().await;
            match d.local_view(VIEW_WAIT).await {
                Some(v) => {
                    *last = Some((Instant::now(), v.clone()));
                    (Some(v), 0.0)
                }
                None => match last.as_ref() {
                    Some((at, v)) => (Some(v.clone()), at.elapsed().as_secs_f64()),
                    None => (None, f64::NAN),
                },
            }
        };
        let names: Vec<String> = view
            .iter()
            .flat_map(|v| v.resources.iter().map(|r| r.name.clone()))
            .collect();
        let devices = d
            .exports
            .device_stats()
            .into_iter()
            .filter(|(n, _)| names.contains(n))
            .collect();
        let dir = d.dir.clone();
        let fs_names = names.clone();
        let (fs, log_used) = tokio::task::spawn_blocking(move || {
            let used = fs_names
                .iter()
                .map(|n| {
                    let b = crate::daemon::log_bytes(&crate::node::resource_dir(&dir, n));
                    (n.clone(), b)
                })
                .collect::<Vec<_>>();
            (fs_space(&dir), used)
        })
        .await
        .unwrap_or_default();
        let g = &d.peer.gossip;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            node: d.cfg.node.clone(),
            cluster_id: d.peer.cluster_id(),
            view,
            view_age,
            devices,
            log_used,
            fs,
            emergency_free_bytes: d.cfg.emergency_free_bytes,
            gossip: [
                load(&g.sent_datagrams),
                load(&g.sent_bytes),
                load(&g.received_datagrams),
                load(&g.received_bytes),
                load(&g.dropped_datagrams),
            ],
        }
    }
}

/// Size and free bytes (for unprivileged use) of the filesystem holding `dir`.
fn fs_space(dir: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((
        (st.f_blocks as u64).saturating_mul(frsize),
        (st.f_bavail as u64).saturating_mul(frsize),
    ))
}

/// What one scrape shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub node: String,
    pub cluster_id: String,
    /// The resources this node is a member of (`None`: no view yet).
    pub view: Option<View>,
    /// Seconds since the view was built (0: for this scrape; NaN: none).
    pub view_age: f64,
    pub devices: Vec<(String, mars_nbd::stats::Snapshot)>,
    /// Bytes of logfiles per resource in the node directory.
    pub log_used: Vec<(String, u64)>,
    /// The node directory's filesystem: size and free bytes.
    pub fs: Option<(u64, u64)>,
    pub emergency_free_bytes: u64,
    /// Gossip: datagrams and bytes sent, received, and datagrams dropped.
    pub gossip: [u64; 5],
}

/// The exposition of `snap` in `format`.
pub fn encode(snap: &Snapshot, format: Format) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap.clone()));
    let mut out = String::new();
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
    }
    Ok(out)
}

type Labels = Vec<(&'static str, String)>;

/// One family of samples: a name (without unit or `_total`), help, unit.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
}

fn fam<'a>(name: &'a str, unit: Option<Unit>, help: &'a str) -> Family<'a> {
    Family { name, help, unit }
}

/// A family of gauges (none at all, not even its description, without rows).
fn gauges(enc: &mut DescriptorEncoder, f: Family, rows: &[(Labels, f64)]) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(f.name, f.help, f.unit.as_ref(), MetricType::Gauge)?;
    for (l, v) in rows {
        m.encode_family(l)?.encode_gauge(v)?;
    }
    Ok(())
}

fn counters(enc: &mut DescriptorEncoder, f: Family, rows: &[(Labels, u64)]) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(f.name, f.help, f.unit.as_ref(), MetricType::Counter)?;
    for (l, v) in rows {
        m.encode_family(l)?
            .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
    }
    Ok(())
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The disk states a member can be in (`view --json`'s `disk`).
pub const DISK_STATES: [&str; 5] = [
    "uptodate",
    "syncing",
    "inconsistent",
    "outdated",
    "detached",
];

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        // The node.
        {
            let mut m = e.encode_descriptor(
                "mars_node",
                "This node: its name, cluster id and marsd version (always 1).",
                None,
                MetricType::Info,
            )?;
            let l: Labels = vec![
                ("node", self.node.clone()),
                ("cluster", self.cluster_id.clone()),
                ("version", env!("CARGO_PKG_VERSION").to_string()),
            ];
            m.encode_info(&l)?;
        }
        if let Some((size, free)) = self.fs {
            gauges(
                e,
                fam(
                    "mars_node_dir_filesystem_size",
                    Some(Unit::Bytes),
                    "Size of the filesystem holding the node directory (logs).",
                ),
                &[(vec![], size as f64)],
            )?;
            gauges(
                e,
                fam(
                    "mars_node_dir_filesystem_free",
                    Some(Unit::Bytes),
                    "Free bytes (for unprivileged use) on the filesystem holding the node directory.",
                ),
                &[(vec![], free as f64)],
            )?;
        }
        gauges(
            e,
            fam(
                "mars_emergency_free",
                Some(Unit::Bytes),
                "Setting emergency_free_bytes: below this much free space logfiles that members have not replayed are deleted (emergency mode).",
            ),
            &[(vec![], self.emergency_free_bytes as f64)],
        )?;
        gauges(
            e,
            fam(
                "mars_metrics_view_age",
                Some(Unit::Seconds),
                "Age of the resource view shown (0: built for this scrape; older when the daemon's state was busy).",
            ),
            &[(vec![], self.view_age)],
        )?;
        let g = &self.gossip;
        for (i, (name, unit, help)) in [
            (
                "mars_gossip_sent_datagrams",
                None,
                "Gossip (membership) datagrams sent.",
            ),
            (
                "mars_gossip_sent",
                Some(Unit::Bytes),
                "Gossip bytes sent (sealed datagrams).",
            ),
            (
                "mars_gossip_received_datagrams",
                None,
                "Gossip datagrams received and accepted.",
            ),
            (
                "mars_gossip_received",
                Some(Unit::Bytes),
                "Gossip bytes received and accepted.",
            ),
            (
                "mars_gossip_dropped_datagrams",
                None,
                "Gossip datagrams dropped: not sealed with a key of the cluster's keyring.",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            counters(e, fam(name, unit, help), &[(vec![], g[i])])?;
        }
        let Some(view) = &self.view else {
            return Ok(());
        };
        // The cluster as this node sees it.
        let up: Vec<(Labels, f64)> = view
            .cluster
            .nodes
            .iter()
            .map(|n| (vec![("node", n.name.clone())], flag(n.alive)))
            .collect();
        gauges(
            e,
            fam(
                "mars_cluster_node_up",
                None,
                "1 when the membership protocol sees the node alive (this node: 1).",
            ),
            &up,
        )?;
        let peers: Vec<_> = view
            .cluster
            .nodes
            .iter()
            .filter(|n| n.name != self.node)
            .collect();
        gauges(
            e,
            fam("mars_cluster_peers", None, "Other nodes of the cluster."),
            &[(vec![], peers.len() as f64)],
        )?;
        gauges(
            e,
            fam(
                "mars_cluster_peers_alive",
                None,
                "Other nodes of the cluster seen alive.",
            ),
            &[(vec![], peers.iter().filter(|n| n.alive).count() as f64)],
        )?;
        // Resources.
        let res = |r: &mars_api::ResourceView| -> Labels { vec![("resource", r.name.clone())] };
        let rows = |f: &dyn Fn(&mars_api::ResourceView) -> f64| -> Vec<(Labels, f64)> {
            view.resources.iter().map(|r| (res(r), f(r))).collect()
        };
        gauges(
            e,
            fam(
                "mars_resource_size",
                Some(Unit::Bytes),
                "Size of the resource's device.",
            ),
            &rows(&|r| r.size as f64),
        )?;
        gauges(
            e,
            fam(
                "mars_resource_served",
                None,
                "1 when a member serves the device as primary.",
            ),
            &rows(&|r| flag(r.device.is_some())),
        )?;
        let used: Vec<(Labels, f64)> = self
            .log_used
            .iter()
            .map(|(n, b)| (vec![("resource", n.clone())], *b as f64))
            .collect();
        gauges(
            e,
            fam(
                "mars_resource_log_used",
                Some(Unit::Bytes),
                "Bytes the resource's logfiles take in this node's directory.",
            ),
            &used,
        )?;
        let link = |f: &dyn Fn(&mars_api::LinkView) -> u64| -> Vec<(Labels, u64)> {
            view.resources
                .iter()
                .map(|r| (res(r), r.link_sent.map(|l| f(&l)).unwrap_or(0)))
                .collect()
        };
        counters(
            e,
            fam(
                "mars_resource_link_sent_data",
                Some(Unit::Bytes),
                "Log and disk data this node sent to fetching and syncing members, before compression.",
            ),
            &link(&|l| l.raw_bytes),
        )?;
        counters(
            e,
            fam(
                "mars_resource_link_sent_wire",
                Some(Unit::Bytes),
                "The same data as sent on the wire (after compression).",
            ),
            &link(&|l| l.wire_bytes),
        )?;
        // Members, as this node sees them.
        let members: Vec<(&mars_api::ResourceView, &mars_api::MemberView)> = view
            .resources
            .iter()
            .flat_map(|r| r.members.iter().map(move |m| (r, m)))
            .collect();
        let ml = |r: &mars_api::ResourceView, m: &mars_api::MemberView| -> Labels {
            vec![("resource", r.name.clone()), ("member", m.node.clone())]
        };
        let mg = |f: &dyn Fn(&mars_api::ResourceView, &mars_api::MemberView) -> f64| {
            members
                .iter()
                .map(|(r, m)| (ml(r, m), f(r, m)))
                .collect::<Vec<_>>()
        };
        let mc = |f: &dyn Fn(&mars_api::MemberView) -> u64| {
            members
                .iter()
                .map(|(r, m)| (ml(r, m), f(m)))
                .collect::<Vec<_>>()
        };
        counters(
            e,
            fam(
                "mars_member_log_written",
                Some(Unit::Bytes),
                "Log position the primary has durably written (the resource's log stream grows over all logfiles since creation).",
            ),
            &mc(&|m| m.log.written),
        )?;
        counters(
            e,
            fam(
                "mars_member_log_fetched",
                Some(Unit::Bytes),
                "Log position this member holds.",
            ),
            &mc(&|m| m.log.fetched),
        )?;
        counters(
            e,
            fam(
                "mars_member_log_replayed",
                Some(Unit::Bytes),
                "Log position this member has applied to its disk (the primary: written back).",
            ),
            &mc(&|m| m.log.replayed),
        )?;
        gauges(
            e,
            fam(
                "mars_member_lag",
                Some(Unit::Bytes),
                "Log bytes the primary wrote that this member has not replayed.",
            ),
            &mg(&|_, m| m.lag_bytes as f64),
        )?;
        gauges(
            e,
            fam(
                "mars_member_lag",
                Some(Unit::Seconds),
                "Age of the oldest write this member has not replayed, as far as it knows (0: none).",
            ),
            &mg(&|_, m| m.lag_seconds),
        )?;
        gauges(
            e,
            fam(
                "mars_member_replay_delay",
                Some(Unit::Seconds),
                "How far the member's replay is kept behind the primary's writes on purpose (marsadm set-delay; 0: none).",
            ),
            &mg(&|_, m| m.replay_delay_seconds),
        )?;
        gauges(
            e,
            fam(
                "mars_member_sync_done",
                Some(Unit::Bytes),
                "Bytes of the running full sync compared or copied (0: none runs).",
            ),
            &mg(&|_, m| m.sync.map(|s| s.done as f64).unwrap_or(0.0)),
        )?;
        gauges(
            e,
            fam(
                "mars_member_sync_total",
                Some(Unit::Bytes),
                "Bytes the running full sync covers (0: none runs).",
            ),
            &mg(&|_, m| m.sync.map(|s| s.total as f64).unwrap_or(0.0)),
        )?;
        gauges(
            e,
            fam(
                "mars_member_sync_rate",
                Some(Unit::Other("bytes_per_second".into())),
                "Rate of the running full sync (0: none runs).",
            ),
            &mg(&|_, m| m.sync.map(|s| s.rate as f64).unwrap_or(0.0)),
        )?;
        gauges(
            e,
            fam(
                "mars_member_primary",
                None,
                "1 when the member reports that it serves the device (role primary).",
            ),
            &mg(&|_, m| flag(m.role == "primary")),
        )?;
        gauges(
            e,
            fam(
                "mars_member_designated_primary",
                None,
                "1 when the member is the resource's designated primary.",
            ),
            &mg(&|r, m| flag(r.designated_primary.as_deref() == Some(m.node.as_str()))),
        )?;
        let states: Vec<(Labels, f64)> = members
            .iter()
            .flat_map(|(r, m)| {
                DISK_STATES.iter().map(move |s| {
                    let mut l = ml(r, m);
                    l.push(("state", s.to_string()));
                    (l, flag(m.disk == *s))
                })
            })
            .collect();
        gauges(
            e,
            fam(
                "mars_member_disk_state",
                None,
                "1 for the member's disk state (uptodate, syncing, inconsistent, outdated, detached), 0 for the others.",
            ),
            &states,
        )?;
        gauges(
            e,
            fam(
                "mars_member_connected",
                None,
                "1 when the member is wanted connected, reachable, and (a secondary) reaches a member to fetch or sync from.",
            ),
            &mg(&|_, m| flag(m.connected)),
        )?;
        gauges(
            e,
            fam(
                "mars_member_split_brain",
                None,
                "1 when the member's log and the primary's histories diverged (resolve with invalidate).",
            ),
            &mg(&|_, m| flag(m.split_brain)),
        )?;
        gauges(
            e,
            fam(
                "mars_member_emergency",
                None,
                "1 when logfiles the member needed were deleted to free space (it needs invalidate).",
            ),
            &mg(&|_, m| flag(m.emergency)),
        )?;
        let paused: Vec<(Labels, f64)> = members
            .iter()
            .flat_map(|(r, m)| {
                [
                    ("sync", m.paused.sync),
                    ("fetch", m.paused.fetch),
                    ("replay", m.paused.replay),
                ]
                .into_iter()
                .map(move |(what, p)| {
                    let mut l = ml(r, m);
                    l.push(("what", what.to_string()));
                    (l, flag(p))
                })
            })
            .collect();
        gauges(
            e,
            fam(
                "mars_member_paused",
                None,
                "1 when the member's sync, fetch or replay is paused by the operator.",
            ),
            &paused,
        )?;
        gauges(
            e,
            fam(
                "mars_member_error",
                None,
                "1 when the member reports an error (the text is in marsadm view).",
            ),
            &mg(&|_, m| flag(m.error.is_some())),
        )?;
        counters(
            e,
            fam(
                "mars_member_checksum_errors",
                None,
                "Blocks of the member's disk found not to match their checksums since its marsd started.",
            ),
            &mc(&|m| m.checksum_errors),
        )?;
        counters(
            e,
            fam(
                "mars_member_repaired_blocks",
                None,
                "Blocks of the member's disk repaired from a good copy (or whose checksum was corrected) since its marsd started.",
            ),
            &mc(&|m| m.repaired),
        )?;
        gauges(
            e,
            fam(
                "mars_member_bad_blocks",
                None,
                "Blocks of the member's disk known bad and not repaired (its disk is then not shown uptodate).",
            ),
            &mg(&|_, m| m.bad_blocks as f64),
        )?;
        // Scrubs of this node's own copies, and the verify this node coordinates.
        let scrubs: Vec<(Labels, &mars_api::ScrubView)> = members
            .iter()
            .filter_map(|(r, m)| Some((ml(r, m), m.scrub.as_ref()?)))
            .collect();
        let scrub_rows = |f: &dyn Fn(&mars_api::ScrubView) -> Option<f64>| {
            scrubs
                .iter()
                .filter_map(|(l, s)| Some((l.clone(), f(s)?)))
                .collect::<Vec<_>>()
        };
        gauges(
            e,
            fam(
                "mars_member_scrub_running",
                None,
                "1 while a scrub of this node's copy runs.",
            ),
            &scrub_rows(&|s| Some(flag(s.running.is_some()))),
        )?;
        gauges(
            e,
            fam(
                "mars_member_scrub_last_end",
                Some(Unit::Other("timestamp_seconds".into())),
                "When the last scrub of this node's copy ended (seconds since the epoch).",
            ),
            &scrub_rows(&|s| Some(s.last?.finished_ms as f64 / 1000.0)),
        )?;
        gauges(
            e,
            fam(
                "mars_member_scrub_last_bad_blocks",
                None,
                "Blocks the last scrub of this node's copy found not matching their checksums.",
            ),
            &scrub_rows(&|s| Some(s.last?.bad_blocks as f64)),
        )?;
        let verifies: Vec<(Labels, &mars_api::VerifyView)> = view
            .resources
            .iter()
            .filter_map(|r| Some((res(r), r.verify.as_ref()?)))
            .collect();
        let verify_rows = |f: &dyn Fn(&mars_api::VerifyView) -> Option<f64>| {
            verifies
                .iter()
                .filter_map(|(l, v)| Some((l.clone(), f(v)?)))
                .collect::<Vec<_>>()
        };
        gauges(
            e,
            fam(
                "mars_resource_verify_running",
                None,
                "1 while a verify this node coordinates runs (marsadm verify).",
            ),
            &verify_rows(&|v| Some(flag(v.running.is_some()))),
        )?;
        gauges(
            e,
            fam(
                "mars_resource_verify_last_end",
                Some(Unit::Other("timestamp_seconds".into())),
                "When the last verify this node coordinated ended (seconds since the epoch).",
            ),
            &verify_rows(&|v| Some(v.last.as_ref()?.finished_ms as f64 / 1000.0)),
        )?;
        gauges(
            e,
            fam(
                "mars_resource_verify_last_clean",
                None,
                "1 when every copy agreed in the last verify (or was repaired) and none failed.",
            ),
            &verify_rows(&|v| Some(flag(v.last.as_ref()?.clean))),
        )?;
        gauges(
            e,
            fam(
                "mars_resource_verify_last_lost_blocks",
                None,
                "Blocks no copy held good in the last verify.",
            ),
            &verify_rows(&|v| Some(v.last.as_ref()?.lost_blocks as f64)),
        )?;
        // NBD devices served here.
        let dl = |n: &str, c: &str| -> Labels {
            vec![("resource", n.to_string()), ("command", c.to_string())]
        };
        let per_cmd = |f: &dyn Fn(&mars_nbd::stats::CommandSnapshot) -> u64| {
            self.devices
                .iter()
                .flat_map(|(n, s)| s.commands.iter().map(move |c| (dl(n, c.command), f(c))))
                .collect::<Vec<_>>()
        };
        counters(
            e,
            fam(
                "mars_nbd_requests",
                None,
                "NBD requests answered, by command (rejected ones included).",
            ),
            &per_cmd(&|c| c.requests),
        )?;
        counters(
            e,
            fam(
                "mars_nbd_request_errors",
                None,
                "NBD requests answered with an error, by command.",
            ),
            &per_cmd(&|c| c.errors),
        )?;
        counters(
            e,
            fam(
                "mars_nbd_request",
                Some(Unit::Bytes),
                "Bytes of successful NBD requests, by command (read, written, trimmed, zeroed).",
            ),
            &per_cmd(&|c| c.bytes),
        )?;
        if !self.devices.is_empty() {
            let mut m = e.encode_descriptor(
                "mars_nbd_request_duration",
                "Time from an NBD request's start (its payload received, the export called) to its reply being queued, by command.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (n, s) in &self.devices {
                for c in &s.commands {
                    m.encode_family(&dl(n, c.command))?
                        .encode_histogram::<NoLabelSet>(
                            c.duration_sum,
                            c.requests,
                            &c.buckets,
                            None,
                        )?;
                }
            }
        }
        let dev = |f: &dyn Fn(&mars_nbd::stats::Snapshot) -> u64| {
            self.devices
                .iter()
                .map(|(n, s)| (vec![("resource", n.clone())], f(s) as f64))
                .collect::<Vec<_>>()
        };
        gauges(
            e,
            fam(
                "mars_nbd_requests_in_flight",
                None,
                "NBD requests being processed.",
            ),
            &dev(&|s| s.in_flight),
        )?;
        gauges(
            e,
            fam("mars_nbd_connections", None, "Open NBD connections."),
            &dev(&|s| s.connections),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
