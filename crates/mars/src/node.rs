//! The node directory.
//!
//! ```text
//! DIR/node.json                     identity and settings (NodeConfig)
//! DIR/marsd.lock                    flock held by the running marsd
//! DIR/marsd.sock                    control socket
//! DIR/meta.store                    cluster metadata (mars-meta Store: Lamport-stamped entries)
//! DIR/resources/<res>/log-*, version-*, applied   transaction log (mars-logger)
//! DIR/resources/<res>/incarnation, disk   the incarnation held, this node's disk of it
//! ```
//! Every JSON file is replaced crash-safely (write temp, fsync, rename, fsync dir).

use anyhow::{anyhow, bail, Context, Result};
use mars_logger::crashsafe::write_atomic;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

pub const NODE_FILE: &str = "node.json";
pub const RESOURCES_DIR: &str = "resources";
/// 2: `node_id`; the metadata names resources and nodes with their ids.
pub const FORMAT: u16 = 2;

fn default_logfile_bytes() -> u64 {
    256 << 20
}
fn default_mem_bytes() -> u64 {
    256 << 20
}

fn default_log_keep_bytes() -> u64 {
    4 << 30
}

fn default_tail_cache_bytes() -> u64 {
    64 << 20
}

fn default_emergency_free_bytes() -> u64 {
    256 << 20
}

/// 32 MiB/s: a 1 TiB copy in about 9 hours.
fn default_scrub_rate() -> u64 {
    32 << 20
}

/// A week, as Ceph's deep scrub and most ZFS schedules.
fn default_scrub_interval() -> u64 {
    7 * 24 * 3600
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub format: u16,
    pub cluster_id: String,
    pub node: String,
    /// Drawn when this directory was made a node: the node's identity with its name.
    pub node_id: u64,
    /// Peer traffic address.
    pub listen: String,
    /// Where this node serves its primary devices over NBD.
    pub nbd: String,
    /// Rotate logfiles at this size.
    #[serde(default = "default_logfile_bytes")]
    pub logfile_max_bytes: u64,
    /// Per resource: bound on data logged but not yet written back.
    #[serde(default = "default_mem_bytes")]
    pub writeback_mem_bytes: u64,
    /// Space policy: when a resource's logfiles take more than this, those
    /// that every member has replayed are deleted automatically.
    #[serde(default = "default_log_keep_bytes")]
    pub log_keep_bytes: u64,
    /// Emergency mode: when a resource's logfiles take more than this (0: no
    /// limit) or the node directory's filesystem has less than
    /// `emergency_free_bytes` free, written-back logfiles are deleted even if a
    /// member has not replayed them; such members need `invalidate`.
    #[serde(default)]
    pub log_space_bytes: u64,
    #[serde(default = "default_emergency_free_bytes")]
    pub emergency_free_bytes: u64,
    /// Per resource on its primary: the last this many bytes of log are kept in
    /// memory to answer fetches without reading the device (0: none).
    #[serde(default = "default_tail_cache_bytes")]
    pub tail_cache_bytes: u64,
    /// How a full sync that this node joins compares blocks.
    #[serde(default)]
    pub sync_digest: crate::digest::SyncDigest,
    /// Scrub (issue 18): the read rate of a pass over a copy's blocks, bytes
    /// per second (0: no limit), and how old the last pass of a resource may
    /// get before a background one starts (0: only `marsadm scrub`).
    #[serde(default = "default_scrub_rate")]
    pub scrub_rate_bytes: u64,
    #[serde(default = "default_scrub_interval")]
    pub scrub_interval_secs: u64,
    /// Cluster ids this node had before merges (peers still using them are accepted).
    #[serde(default)]
    pub former_cluster_ids: Vec<String>,
    /// NBD over TLS (`NBD_OPT_STARTTLS`); absent: plaintext only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_tls: Option<NbdTls>,
    /// Client addresses and CIDR prefixes allowed to connect to the NBD port;
    /// empty (the default): every address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd_allow: Vec<String>,
    /// Where to serve Prometheus metrics (`HOST:PORT`, page `/metrics`);
    /// absent: not served. `marsd --metrics` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Per resource, a systemd unit that marsd starts (`systemctl start`)
    /// where this node serves the resource's device, and stops before it
    /// stops serving it (`crate::systemd::PrimaryUnits`); empty: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub primary_units: BTreeMap<String, String>,
}

/// `nbd_tls` in `node.json`. Paths are absolute or relative to the node
/// directory; the files are read when marsd starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTls {
    #[serde(default)]
    pub mode: NbdTlsMode,
    /// PEM: this node's certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1); not readable by others.
    pub key: PathBuf,
    /// PEM: CA certificates; when set, every client must present a
    /// certificate one of them issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTlsMode {
    /// STARTTLS refused (`NBD_REP_ERR_POLICY`); the files are not read.
    Off,
    /// TLS when the client asks for it, plaintext otherwise.
    #[default]
    Optional,
    /// Nothing but STARTTLS before TLS (the NBD spec's FORCEDTLS).
    Required,
}

/// Desired state of one resource on this node, derived from the metadata
/// (`crate::meta`) each time the control loop runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceConfig {
    pub format: u16,
    pub name: String,
    pub size: u64,
    /// Random id fixed at creation (also in every logfile header).
    pub resource_id: u64,
    /// This node's local disk.
    pub disk: PathBuf,
    pub members: Vec<String>,
    pub designated_primary: Option<String>,
    pub attached: bool,
    pub connected: bool,
    #[serde(default)]
    pub pause_sync: bool,
    #[serde(default)]
    pub pause_fetch: bool,
    #[serde(default)]
    pub pause_replay: bool,
    #[serde(default)]
    pub fetch_rate: u64,
    #[serde(default)]
    pub sync_rate: u64,
    #[serde(default)]
    pub replay_delay_ms: u64,
}

/// Node and resource names: 1..=64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if !mars_logfmt::valid_name(name) {
        bail!(
            "invalid {what} name {name:?}: use 1 to 64 letters, digits, '_', '.', '-' (not first)"
        );
    }
    Ok(())
}

/// Check that `addr` is HOST:PORT and resolves.
pub fn check_addr(what: &str, addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("invalid {what} address {addr:?}: expected HOST:PORT"))?
        .next()
        .ok_or_else(|| anyhow!("{what} address {addr:?} resolves to nothing"))
}

pub fn load_node(dir: &Path) -> Result<NodeConfig> {
    let path = dir.join(NODE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} is not an initialised mars node directory (no {NODE_FILE}); run `marsadm create-cluster` or `marsadm join-cluster` first", dir.display())
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let cfg: NodeConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if cfg.format != FORMAT {
        bail!(
            "{}: format {} is not supported by this build (expects {FORMAT})",
            path.display(),
            cfg.format
        );
    }
    Ok(cfg)
}

pub fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut body = serde_json::to_vec_pretty(value)?;
    body.push(b'\n');
    write_atomic(path, &body).with_context(|| format!("cannot write {}", path.display()))
}

pub fn resources_dir(dir: &Path) -> PathBuf {
    dir.join(RESOURCES_DIR)
}

pub fn resource_dir(dir: &Path, name: &str) -> PathBuf {
    resources_dir(dir).join(name)
}

/// Create the node directory `dir` (if needed) and make it 0700 whatever
/// the umask: it holds the disk records (`resources/RES/disk`, which marsd
/// opens as root), the logs (every write to the devices) and `marsd.lock`;
/// nobody else may read, replace or lock anything in it. Whether it was
/// wider before.
pub fn private_node_dir(dir: &Path) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))?;
    Ok(true)
}

/// Files and directories marsd and marsadm create are theirs alone (logs
/// hold every write to the devices): umask 077 whatever the caller's.
pub fn private_umask() {
    // SAFETY: umask only sets the process's file mode creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// `marsadm create-cluster`: initialise DIR as the first node of a new cluster.
pub fn create_cluster(dir: &Path, node: &str, listen: &str, nbd: &str) -> Result<NodeConfig> {
    check_name("node", node)?;
    check_addr("--listen", listen)?;
    check_addr("--nbd", nbd)?;
    if dir.join(NODE_FILE).exists() {
        bail!(
            "{} is already initialised as a mars node; refusing to overwrite it",
            dir.display()
        );
    }
    let (id, cluster_id) = (nonzero_id(), format!("{:032x}", rand::random::<u128>()));
    private_node_dir(dir)?;
    crate::tls::init_cluster(dir, &mars_meta::schema::NodeRef::new(node, id).token())?;
    write_node(dir, node, id, listen, nbd, &cluster_id)
}

/// A random id for a new node or resource incarnation (never 0, which means "none").
pub fn nonzero_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// Write a new node directory's `node.json` (default settings).
fn write_node(
    dir: &Path,
    node: &str,
    node_id: u64,
    listen: &str,
    nbd: &str,
    cluster_id: &str,
) -> Result<NodeConfig> {
    std::fs::create_dir_all(resources_dir(dir))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg = NodeConfig {
        format: FORMAT,
        cluster_id: cluster_id.to_string(),
        node: node.to_string(),
        node_id,
        listen: listen.to_string(),
        nbd: nbd.to_string(),
        logfile_max_bytes: default_logfile_bytes(),
        writeback_mem_bytes: default_mem_bytes(),
        log_keep_bytes: default_log_keep_bytes(),
        sync_digest: Default::default(),
        scrub_rate_bytes: default_scrub_rate(),
        scrub_interval_secs: default_scrub_interval(),
        log_space_bytes: 0,
        emergency_free_bytes: default_emergency_free_bytes(),
        tail_cache_bytes: default_tail_cache_bytes(),
        former_cluster_ids: Vec::new(),
        nbd_tls: None,
        nbd_allow: Vec::new(),
        metrics: None,
        primary_units: BTreeMap::new(),
    };
    save_json(&dir.join(NODE_FILE), &cfg)?;
    Ok(cfg)
}

/// `marsadm join-cluster`: initialise DIR as a node of an existing cluster.
pub fn init_joined(
    dir: &Path,
    me: &mars_proto::NodeInfo,
    j: crate::peer::JoinedCluster,
) -> Result<NodeConfig> {
    private_node_dir(dir)?;
    crate::tls::write_node_files(dir, &j.ca_cert, &j.ca_key, &j.cert, &j.key)?;
    let (node, entries) = (me.name.as_str(), j.entries);
    let mut store = mars_meta::Store::new(node);
    store.trust_clock(entries.iter().map(|w| w.clock).max().unwrap_or(0));
    for w in entries {
        let (k, e) = mars_cluster::from_wire(w);
        mars_cluster::merge_remote(&mut store, mars_cluster::Admission::Schema, "join", &k, e);
    }
    store
        .save(&dir.join("meta.store"))
        .map_err(|e| anyhow!("{e}"))?;
    // node.json last: a directory without it is not a node, whatever else it holds.
    write_node(dir, node, me.id, &me.listen, &me.nbd, &j.cluster_id)
}

/// Check that DIR can become a new node (join-cluster, create-cluster).
pub fn check_new_node(dir: &Path, node: &str, listen: &str, nbd: &str) -> Result<()> {
    check_name("node", node)?;
    check_addr("--listen", listen)?;
    check_addr("--nbd", nbd)?;
    if dir.join(NODE_FILE).exists() {
        bail!(
            "{} is already initialised as a mars node; refusing to overwrite it",
            dir.display()
        );
    }
    Ok(())
}

/// Persist a cluster id adopted in a merge.
pub fn update_cluster_id(node_file: &Path, id: &str, former: &[String]) -> Result<()> {
    let text = std::fs::read_to_string(node_file)
        .with_context(|| format!("cannot read {}", node_file.display()))?;
    let mut cfg: NodeConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged", node_file.display()))?;
    cfg.cluster_id = id.to_string();
    cfg.former_cluster_ids = former.to_vec();
    save_json(node_file, &cfg)
}

impl ResourceConfig {
    /// The incarnation this configuration is of.
    pub fn rref(&self) -> mars_meta::schema::ResRef {
        mars_meta::schema::ResRef::new(&self.name, self.resource_id)
    }
}

pub use mars_replication::logdir::{read_incarnation, write_incarnation, INCARNATION_FILE};

/// In a resource directory: the path of this node's disk of the incarnation
/// the directory holds. The one place marsd takes a disk path from: a disk
/// path never comes from another node (the `disk` of a member entry in the
/// metadata is shown, never opened).
pub const DISK_FILE: &str = "disk";

#[derive(Serialize, Deserialize)]
struct LocalDisk {
    format: u16,
    disk: PathBuf,
}

/// Record `disk` as this node's disk of the resource in `rdir` (crash-safe).
pub fn write_local_disk(rdir: &Path, disk: &Path) -> Result<()> {
    if !disk.is_absolute() {
        bail!("disk path {} is not absolute", disk.display());
    }
    save_json(
        &rdir.join(DISK_FILE),
        &LocalDisk {
            format: 1,
            disk: disk.to_path_buf(),
        },
    )
}

/// This node's disk of the resource in `rdir`: `Ok(None)` when the file is
/// missing, an error when it is damaged.
pub fn read_local_disk(rdir: &Path) -> Result<Option<PathBuf>> {
    let path = rdir.join(DISK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let d: LocalDisk =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if d.format != 1 || !d.disk.is_absolute() {
        bail!(
            "{}: format {} or a relative path ({}) is not supported",
            path.display(),
            d.format,
            d.disk.display()
        );
    }
    Ok(Some(d.disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"format":2,"cluster_id":"c","node":"alpha","node_id":7,
        "listen":"127.0.0.1:7701","nbd":"127.0.0.1:10809"}"#;

    #[test]
    fn files_without_nbd_settings_load_and_stay_without_them() {
        let cfg: NodeConfig = serde_json::from_str(OLD).unwrap();
        assert_eq!(cfg.nbd_tls, None);
        assert!(cfg.nbd_allow.is_empty());
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(
            !text.contains("nbd_tls") && !text.contains("nbd_allow"),
            "{text}"
        );
    }

    #[test]
    fn nbd_tls_mode_defaults_to_optional_and_round_trips() {
        let mut v: serde_json::Value = serde_json::from_str(OLD).unwrap();
        v["nbd_tls"] = serde_json::json!({"cert": "tls/cert.pem", "key": "/k.pem"});
        v["nbd_allow"] = serde_json::json!(["10.0.0.0/8"]);
        let cfg: NodeConfig = serde_json::from_value(v.clone()).unwrap();
        let t = cfg.nbd_tls.clone().unwrap();
        assert_eq!(t.mode, NbdTlsMode::Optional);
        assert_eq!(t.cert, PathBuf::from("tls/cert.pem"));
        assert_eq!(t.client_ca, None);
        let again: NodeConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);

        for (bad, says) in [
            (
                serde_json::json!({"mode": "sometimes", "cert": "c", "key": "k"}),
                "sometimes",
            ),
            (serde_json::json!({"cert": "c"}), "key"),
            (
                serde_json::json!({"cert": "c", "key": "k", "ca": "x"}),
                "ca",
            ),
        ] {
            v["nbd_tls"] = bad;
            let e = serde_json::from_value::<NodeConfig>(v.clone()).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
