//! Test kit: real `marsd` processes in temporary node directories, `marsadm`
//! invocations, a small synchronous NBD client, and external tools that must
//! be installed (a missing tool fails the test loudly; it never skips).

#![allow(dead_code)]

use mars_nbd::proto::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MARSD: &str = env!("CARGO_BIN_EXE_marsd");
pub const MARSADM: &str = env!("CARGO_BIN_EXE_marsadm");

/// Who a test speaking the peer protocol itself says it is (no node: it
/// listens nowhere). An outsider: it has no certificate.
pub fn tool_node(name: &str) -> mars_proto::NodeInfo {
    mars_proto::NodeInfo {
        name: name.into(),
        listen: "127.0.0.1:1".into(),
        nbd: "127.0.0.1:2".into(),
        id: 7,
    }
}

/// An insider for tests that speak the peer protocol themselves: a node
/// directory made by `invite` + `join-cluster` through `via` (marsd never
/// started there), whose certificate makes it a node of the cluster.
pub fn tool_member(name: &str, via: &Node) -> Node {
    Node::join(name, via)
}

impl Node {
    /// This node as the peer protocol names it (`Hello`).
    pub fn info(&self) -> mars_proto::NodeInfo {
        let cfg: serde_json::Value =
            serde_json::from_slice(&read(&self.dir.join("node.json"))).expect("node.json");
        mars_proto::NodeInfo {
            name: self.name.clone(),
            listen: self.listen.clone(),
            nbd: self.nbd.clone(),
            id: cfg["node_id"].as_u64().expect("node_id"),
        }
    }

    /// Push `entries` to `to` as this node (its certificate, its `Hello`),
    /// as a peer of the cluster would; `to` must know this node already.
    pub fn push_as(&self, to: &Node, entries: Vec<mars_proto::WireEntry>) {
        use mars_proto::{client_handshake, read_msg, write_msg, Msg};
        let id = to.view_json()["cluster"]["id"]
            .as_str()
            .expect("cluster id")
            .to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut s = self.tls_connect(&to.listen).await.expect("connect");
            client_handshake(&mut s, Some(&id), &self.info())
                .await
                .expect("handshake");
            write_msg(&mut s, &Msg::Push { entries })
                .await
                .expect("push");
            match read_msg(&mut s).await.expect("answer") {
                Msg::Ok => {}
                other => panic!("push answered {other:?}"),
            }
        });
    }

    /// A TLS connection to `addr` with this node's certificate (no `Hello` yet).
    pub async fn tls_connect(&self, addr: &str) -> std::io::Result<mars_replication::PeerStream> {
        tls_connect_with(&self.dir, addr).await
    }
}

/// A TLS connection to `addr` with the credentials of the node directory `dir`
/// (or a copy of its `tls/`).
pub async fn tls_connect_with(
    dir: &Path,
    addr: &str,
) -> std::io::Result<mars_replication::PeerStream> {
    let tls = mars::tls::Tls::load(dir).map_err(std::io::Error::other)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let s = tokio_rustls::TlsConnector::from(tls.client())
        .connect(mars::tls::server_name(), tcp)
        .await?;
    Ok(mars_replication::PeerStream::Client(s))
}

/// Fail loudly when an external tool is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is not installed: apt-get install {package} (see .ci/run)"
    );
}

/// Wait for `cond` with a deadline; panics with `what` on timeout.
pub fn wait_for(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        poll(timeout, cond),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Wait for `cond` with a deadline: whether it came true in time (for callers
/// that report a timeout their own way).
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause); // polling interval, not synchronisation
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    true
}

/// A port free now (TCP and UDP: marsd gossips on its listen port), not given to
/// another test of this process, and below the kernel's ephemeral range (32768 on):
/// a port the kernel picked there could be handed out again as the source port of
/// an outgoing connection before marsd binds it (marsd then exited at start with
/// the address in use, once in a few full runs).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Processes start at different places, so that test binaries run side by side
    // by hand rarely meet.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::AcqRel) % SPAN) as u16;
        let addr = ("127.0.0.1", port);
        if std::net::TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

pub struct Node {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub name: String,
    pub listen: String,
    pub nbd: String,
    child: Option<Child>,
    pub log: PathBuf,
    /// The network namespace marsd runs in (`Net`), None: the test's own.
    pub netns: Option<String>,
    /// A command marsd is started under (e.g. `prlimit --nofile=...`).
    pub wrapper: Vec<String>,
    /// More arguments for marsd after `--dir DIR` (e.g. `--metrics ADDR`).
    pub args: Vec<String>,
}

impl Node {
    /// `marsadm create-cluster` in a fresh directory (marsd not started).
    pub fn create(name: &str) -> Node {
        let node = Node::fresh(name);
        node.adm_ok(&[
            "create-cluster",
            "--node",
            name,
            "--listen",
            &node.listen,
            "--nbd",
            &node.nbd,
        ]);
        node
    }

    /// A node directory path and free ports; nothing initialised yet.
    /// A fresh directory (nothing made in it yet), for tests that run
    /// `create-cluster` or `join-cluster` themselves.
    pub fn create_dir_only(name: &str) -> Node {
        Node::fresh(name)
    }

    fn fresh(name: &str) -> Node {
        let listen = format!("127.0.0.1:{}", free_port());
        let nbd = format!("127.0.0.1:{}", free_port());
        Node::fresh_at(name, listen, nbd, None)
    }

    fn fresh_at(name: &str, listen: String, nbd: String, netns: Option<String>) -> Node {
        // MARS_TEST_KEEP=1 keeps every node's directory and log (debugging).
        let tmp = tempfile::Builder::new()
            .prefix(&format!("mars-{name}-"))
            .disable_cleanup(std::env::var_os("MARS_TEST_KEEP").is_some())
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().join("node");
        Node {
            netns,
            log: tmp.path().join("marsd.log"),
            tmp,
            dir,
            name: name.into(),
            listen,
            nbd,
            child: None,
            wrapper: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Change a setting in `node.json` (a running marsd is restarted for it).
    pub fn set_setting(&mut self, key: &str, value: u64) {
        let running = self.child.is_some();
        if running {
            self.stop();
        }
        let cfg_path = self.dir.join("node.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg[key] = value.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        if running {
            self.start();
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A disk file of `size` bytes next to the node directory.
    pub fn disk(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .expect("disk file");
        p
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "marsd already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                // `ip netns exec` enters the namespace and execs marsd (same pid).
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, MARSD]);
                c
            }
            None if !self.wrapper.is_empty() => {
                let mut c = Command::new(&self.wrapper[0]);
                c.args(&self.wrapper[1..]).arg(MARSD);
                c
            }
            None => Command::new(MARSD),
        };
        let child = cmd
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn marsd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("marsd exited at start ({status}):\n{}", self.log_text());
            }
            if self.adm(&["view"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "marsd did not come up:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running marsd's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Send `sig` to the running marsd (SIGSTOP / SIGCONT freeze and thaw it).
    pub fn signal(&self, sig: i32) {
        let c = self.child.as_ref().expect("marsd running");
        // SAFETY: sending a signal to our own child.
        assert_eq!(unsafe { libc::kill(c.id() as i32, sig) }, 0);
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().expect("wait marsd");
            assert!(
                status.success(),
                "marsd exit status {status}:\n{}",
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn adm(&self, args: &[&str]) -> Output {
        Command::new(MARSADM)
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run marsadm")
    }

    /// Run marsadm, assert success, return stdout.
    pub fn adm_ok(&self, args: &[&str]) -> String {
        let out = self.adm(args);
        assert!(
            out.status.success(),
            "marsadm {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run marsadm, assert failure, return stderr.
    pub fn adm_err(&self, args: &[&str]) -> String {
        let out = self.adm(args);
        assert!(
            !out.status.success(),
            "marsadm {args:?} succeeded but should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !err.trim().is_empty(),
            "marsadm {args:?} failed without a message"
        );
        err
    }

    pub fn view_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.adm_ok(&["view", "--json"])).expect("view --json is JSON")
    }

    pub fn uri(&self, res: &str) -> String {
        format!("nbd://{}/{res}", self.nbd)
    }

    pub fn nbd(&self, res: &str) -> NbdClient {
        NbdClient::connect(&self.nbd, res).expect("nbd connect")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A minimal synchronous NBD client (fixed newstyle, OPT_GO, simple replies), one request at a time.
pub struct NbdClient {
    s: TcpStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

fn rd<const N: usize>(s: &mut TcpStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

impl NbdClient {
    pub fn connect(addr: &str, name: &str) -> std::io::Result<NbdClient> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let greeting = rd::<18>(&mut s)?;
        assert_eq!(
            u64::from_be_bytes(greeting[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())?;
        let payload = encode_info_request(name.as_bytes(), &[]);
        s.write_all(&encode_option_header(NBD_OPT_GO, payload.len() as u32))?;
        s.write_all(&payload)?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let h = rd::<20>(&mut s)?;
            let reply_type = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            if reply_type & NBD_REP_FLAG_ERROR != 0 {
                return Err(std::io::Error::other(format!(
                    "OPT_GO refused: {reply_type:#x}"
                )));
            }
            if reply_type == NBD_REP_INFO
                && data.len() >= 12
                && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT
            {
                size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                flags = u16::from_be_bytes([data[10], data[11]]);
            }
            if reply_type == NBD_REP_ACK {
                break;
            }
        }
        Ok(NbdClient {
            s,
            size,
            flags,
            cookie: 0,
        })
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> std::io::Result<u32> {
        self.cookie += 1;
        let req = Request {
            flags,
            kind: mars_nbd::proto::Command::from_u16(kind),
            cookie: self.cookie,
            offset,
            length,
        };
        let mut buf = encode_request(&req).to_vec();
        buf.extend_from_slice(data);
        self.s.write_all(&buf)?;
        let r = rd::<16>(&mut self.s)?;
        let (err, cookie) = parse_simple_reply(&r).map_err(std::io::Error::other)?;
        assert_eq!(cookie, self.cookie, "reply cookie");
        Ok(err)
    }

    /// Write; Ok(errno) where 0 is success.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<u32> {
        self.request(
            NBD_CMD_WRITE,
            if fua { NBD_CMD_FLAG_FUA } else { 0 },
            offset,
            data.len() as u32,
            data,
        )
    }

    pub fn flush(&mut self) -> std::io::Result<u32> {
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[])
    }

    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<(u32, Vec<u8>)> {
        let err = self.request(NBD_CMD_READ, 0, offset, len, &[])?;
        let mut data = vec![0u8; if err == 0 { len as usize } else { 0 }];
        self.s.read_exact(&mut data)?;
        Ok((err, data))
    }
}

/// Read a whole file or fail with its name.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

impl Node {
    /// `marsadm join-cluster` through `via` (which must be running), in a fresh directory.
    pub fn join(name: &str, via: &Node) -> Node {
        Node::join_as(Node::fresh(name), via)
    }

    fn join_as(node: Node, via: &Node) -> Node {
        let name = node.name.clone();
        let name = name.as_str();
        let token = via.adm_ok(&["invite"]);
        node.adm_ok(&[
            "join-cluster",
            "--node",
            name,
            "--listen",
            &node.listen,
            "--nbd",
            &node.nbd,
            "--token",
            token.trim(),
            &via.listen,
        ]);
        node
    }

    /// Poll `view --json` until `cond` holds.
    pub fn wait_view(
        &self,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.adm(&["view", "--json"]);
            if out.status.success() {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    if cond(&v) {
                        return v;
                    }
                    last = v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}; last view:\n{last:#}\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Names of the nodes a view shows, with their liveness.
pub fn view_nodes(v: &serde_json::Value) -> Vec<(String, bool)> {
    let mut n: Vec<(String, bool)> = v["cluster"]["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or("").to_string(),
                        n["alive"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

pub fn all_alive(v: &serde_json::Value, names: &[&str]) -> bool {
    let n = view_nodes(v);
    n.len() == names.len() && names.iter().all(|x| n.iter().any(|(m, a)| m == x && *a))
}

pub fn resource<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    v["resources"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

/// Start a cluster: the first node creates it, the others join through it; waits until all see all alive.
pub fn start_cluster(names: &[&str]) -> Vec<Node> {
    let mut first = Node::create(names[0]);
    first.start();
    let mut nodes = vec![first];
    for n in &names[1..] {
        let mut node = Node::join(n, &nodes[0]);
        node.start();
        nodes.push(node);
    }
    for n in &nodes {
        n.wait_view("every node alive", |v| all_alive(v, names));
    }
    nodes
}

/// Hosts on a network of their own: one network namespace per node, each with a
/// veth pair into a bridge in a switch namespace, which the test's namespace
/// joins through one more veth (address .254, so the test reaches every node). Addresses from 198.18.0.0/15, the range kept
/// for benchmarking networks, so as not to meet the machine's own. Cuts are
/// silent, as on a real network: a link set down, or two hosts given each other's
/// address at a MAC nobody has; no FIN, no RST, no error, the packets are gone.
/// Needs root (CI runs as root) and `ip` (iproute2). Removed on drop; what a
/// killed test run left behind is removed by the next one.
pub struct Net {
    id: String,
    subnet: String,
    pub namespaces: Vec<String>,
}

impl Net {
    pub fn new(hosts: usize) -> Net {
        require_tool("ip", "iproute2");
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "network namespace tests need root (CI runs them as root)"
        );
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let k = COUNT.fetch_add(1, Ordering::AcqRel);
        let pid = std::process::id();
        if k == 0 {
            sweep_stale_nets();
        }
        let n = (pid * 8 + k) % 512;
        let net = Net {
            id: format!("{pid}x{k}"),
            subnet: format!("198.{}.{}", 18 + n / 256, n % 256),
            namespaces: (0..hosts).map(|i| format!("mars-{pid}x{k}-{i}")).collect(),
        };
        // The switch: a bridge in a namespace of its own, so that the machine's
        // firewall (a FORWARD policy of DROP with bridge netfilter, as on hosts
        // that run containers) never sees the traffic between the nodes.
        let sw = net.switch();
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        // The test's own way in: one veth into the switch, address .254.
        let uplink = net.uplink();
        ip(&[
            "link", "add", &uplink, "type", "veth", "peer", "name", "upl", "netns", &sw,
        ]);
        ip(&["-n", &sw, "link", "set", "upl", "master", "br0"]);
        ip(&["-n", &sw, "link", "set", "upl", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", net.subnet),
            "dev",
            &uplink,
        ]);
        ip(&["link", "set", &uplink, "up"]);
        for i in 0..hosts {
            let ns = &net.namespaces[i];
            let port = format!("h{i}");
            ip(&["netns", "add", ns]);
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &sw, "link", "set", &port, "up"]);
            let cidr = format!("{}/24", net.addr(i));
            ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn switch(&self) -> String {
        format!("mars-{}-sw", self.id)
    }

    fn uplink(&self) -> String {
        format!("mh{}", self.id)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// Cut host `i` off from everyone (its link goes down) or reconnect it.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.switch(), "link", "set", &format!("h{i}"), state]);
    }

    /// Cut hosts `i` and `j` apart, silently (each sends the other's packets to a
    /// MAC address nobody has), or join them again; the others reach both.
    pub fn cut_pair(&self, i: usize, j: usize, cut: bool) {
        for (from, to) in [(i, j), (j, i)] {
            let (ns, dst) = (&self.namespaces[from], self.addr(to));
            if cut {
                let mac = format!("02:00:00:00:{from:02x}:{to:02x}");
                ip(&[
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    &dst,
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ]);
            } else {
                ip(&["-n", ns, "neigh", "del", &dst, "dev", "eth0"]);
            }
        }
    }

    /// A node of a cluster on host `i` (marsd not started, directory not initialised).
    fn node(&self, name: &str, i: usize) -> Node {
        let a = self.addr(i);
        Node::fresh_at(
            name,
            format!("{a}:7701"),
            format!("{a}:10809"),
            Some(self.namespaces[i].clone()),
        )
    }

    /// `start_cluster` with node `k` on host `k`.
    pub fn start_cluster(&self, names: &[&str]) -> Vec<Node> {
        let first = self.node(names[0], 0);
        first.adm_ok(&[
            "create-cluster",
            "--node",
            names[0],
            "--listen",
            &first.listen,
            "--nbd",
            &first.nbd,
        ]);
        let mut nodes = vec![first];
        nodes[0].start();
        for (i, n) in names.iter().enumerate().skip(1) {
            let mut node = Node::join_as(self.node(n, i), &nodes[0]);
            node.start();
            nodes.push(node);
        }
        for n in &nodes {
            n.adm_ok(&["wait-cluster", "--timeout", "30"]);
        }
        nodes
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Best effort: a namespace goes once its last process has exited, and its
        // veths with it (the uplink too, with the switch).
        for ns in self.namespaces.iter().chain([&self.switch()]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.uplink()])
            .output();
    }
}

/// Namespaces and links of `Net`s whose test process is gone (killed runs).
fn sweep_stale_nets() {
    // Ours are named PREFIX<pid>x<k>...; gone when that process is, or when it is
    // this one (the sweep runs before this process made any: a pid used again).
    let me = std::process::id();
    let gone = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
            .is_some_and(|pid| pid == me || !Path::new(&format!("/proc/{pid}")).exists())
    };
    let out = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in out(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if gone(name, "mars-") {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
    for line in out(&["-o", "link", "show"]).lines() {
        // "7: mb1234x0: <...": the name, without a "@peer" suffix.
        let name = line.split(':').nth(1).unwrap_or("").trim();
        let name = name.split('@').next().unwrap_or("");
        if gone(name, "mh") {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// r0 of `size` bytes created on `nodes[0]` (disk `a.img`), joined by all the
/// others (`s0.img`, ...), up to date. Returns the disks, primary first.
pub fn replicate_r0(nodes: &[Node], size: u64) -> Vec<std::path::PathBuf> {
    let a_disk = nodes[0].disk("a.img", size);
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    let mut disks = vec![a_disk];
    for (i, n) in nodes[1..].iter().enumerate() {
        n.wait_view("r0 known", |v| resource(v, "r0").is_some());
        let d = n.disk(&format!("s{i}.img"), size);
        n.adm_ok(&["join-resource", "r0", d.to_str().unwrap()]);
        disks.push(d);
    }
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    disks
}

/// The member `node` of r0 in a view (Null when absent).
pub fn member<'a>(v: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    resource(v, "r0")
        .and_then(|r| r["members"].as_array()?.iter().find(|m| m["node"] == node))
        .unwrap_or(&serde_json::Value::Null)
}

/// Blocks whose checksum in `rdir/csum` (docs/FORMAT.md) is not that of the
/// disk's bytes; marsd must have closed it (stopped or detached).
pub fn stale_checksums(rdir: &Path, disk: &Path) -> Vec<u64> {
    let c = read(&rdir.join("csum"));
    let d = read(disk);
    assert_eq!(&c[..8], b"MARSCSUM");
    let covered = u64::from_le_bytes(c[16..24].try_into().unwrap());
    assert_eq!(covered, d.len() as u64);
    assert_eq!(
        c[24] & 1,
        1,
        "closed cleanly (flags {:#x}): marsd stopped or detached",
        c[24]
    );
    d.chunks(4096)
        .enumerate()
        .filter(|(i, chunk)| {
            let at = 4096 + 4 * i;
            u32::from_le_bytes(c[at..at + 4].try_into().unwrap()) != crc32c::crc32c(chunk)
        })
        .map(|(i, _)| i as u64)
        .collect()
}
