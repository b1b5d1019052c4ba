//! NBD with TLS on a real marsd (`nbd_tls`, `nbd_allow` in node.json), with
//! the clients people use: qemu-io (`tls-creds-x509`) and nbdinfo (`nbds://`).
//! The certificates are made here with rcgen.

mod common;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A certificate and its key (PEM) for `names`.
    fn issue(
        &self,
        cn: &str,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![purpose];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

fn write_file(path: &Path, body: &str, mode: u32) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .expect("create file");
    f.write_all(body.as_bytes()).expect("write file");
}

/// The credentials of one test: the server's files (for node.json) and
/// client directories as qemu's `tls-creds-x509` and libnbd's
/// `tls-certificates` read them (ca-cert.pem, client-cert.pem, client-key.pem).
struct Pki {
    server_dir: PathBuf,
    /// Trusts the server; a client certificate of the cluster's CA.
    client: PathBuf,
    /// Trusts the server; no client certificate.
    anonymous: PathBuf,
    /// Trusts the server; a client certificate of another CA.
    foreign: PathBuf,
}

fn pki(root: &Path) -> Pki {
    let ca = Ca::new("mars test NBD CA");
    let other = Ca::new("someone else's CA");
    let server_dir = root.join("server-tls");
    std::fs::create_dir_all(&server_dir).expect("mkdir");
    let (cert, key) = ca.issue(
        "alpha",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write_file(&server_dir.join("server-cert.pem"), &cert, 0o644);
    write_file(&server_dir.join("server-key.pem"), &key, 0o600);
    write_file(&server_dir.join("client-ca.pem"), &ca.pem(), 0o644);

    let client_dir = |name: &str, issuer: Option<&Ca>| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        // qemu checks its own certificate against ca-cert.pem too: the issuer
        // of a client's certificate is there beside the server's CA.
        let mut cas = ca.pem();
        if let Some(issuer) = issuer.filter(|i| !std::ptr::eq(*i, &ca)) {
            cas.push_str(&issuer.pem());
        }
        write_file(&d.join("ca-cert.pem"), &cas, 0o644);
        if let Some(issuer) = issuer {
            let (cert, key) = issuer.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth);
            write_file(&d.join("client-cert.pem"), &cert, 0o644);
            write_file(&d.join("client-key.pem"), &key, 0o600);
        }
        d
    };
    Pki {
        client: client_dir("client", Some(&ca)),
        anonymous: client_dir("anonymous", None),
        foreign: client_dir("foreign", Some(&other)),
        server_dir,
    }
}

/// Set node.json keys (marsd not running).
fn configure(n: &Node, settings: serde_json::Value) {
    let path = n.dir.join("node.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("node.json"))
            .expect("node.json is JSON");
    for (k, v) in settings.as_object().expect("an object") {
        cfg[k] = v.clone();
    }
    std::fs::write(&path, cfg.to_string()).expect("write node.json");
}

fn tls_settings(p: &Pki, mode: &str, client_ca: bool) -> serde_json::Value {
    let mut t = serde_json::json!({
        "mode": mode,
        "cert": p.server_dir.join("server-cert.pem"),
        "key": p.server_dir.join("server-key.pem"),
    });
    if client_ca {
        t["client_ca"] = p
            .server_dir
            .join("client-ca.pem")
            .to_str()
            .expect("utf-8")
            .into();
    }
    t
}

/// A node with the node.json `settings` made from its credentials, started,
/// serving r0.
fn node_with(settings: impl FnOnce(&Pki) -> serde_json::Value) -> (Node, Pki) {
    let mut n = Node::create("alpha");
    let p = pki(n.tmp.path());
    configure(&n, settings(&p));
    n.start();
    let disk = n.disk("disk.img", 16 * MIB);
    n.adm_ok(&["create-resource", "r0", disk.to_str().expect("utf-8")]);
    n.adm_ok(&["wait-resource", "r0", "primary", "--timeout", "10"]);
    (n, p)
}

fn port(n: &Node) -> &str {
    n.nbd.rsplit(':').next().expect("HOST:PORT")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn qemu_io_tls(n: &Node, creds: &Path, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.arg("--object").arg(format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        creds.display()
    ));
    c.arg("--image-opts").arg(format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=r0,tls-creds=tls0",
        port(n)
    ));
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c
}

fn nbds(n: &Node, creds: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/r0?tls-certificates={}",
        port(n),
        creds.display()
    )
}

fn nbdinfo_size(uri: &str) -> u64 {
    let out = run(Command::new("nbdinfo").args(["--json", uri]));
    let info: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    info["exports"][0]["export-size"]
        .as_u64()
        .expect("export-size")
}

fn tools() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
}

/// Optional TLS: qemu-io writes and reads over TLS, nbdinfo reads the size
/// over `nbds://`, and plaintext clients (nbdinfo, the kit's client) still
/// work and see what was written over TLS.
#[test]
fn optional_tls_serves_qemu_io_nbds_and_plaintext() {
    tools();
    let (n, p) =
        node_with(|p| serde_json::json!({ "nbd_tls": tls_settings(p, "optional", false) }));
    assert!(
        n.log_text()
            .contains("NBD: TLS optional, every client address"),
        "{}",
        n.log_text()
    );
    let out = run(&mut qemu_io_tls(
        &n,
        &p.anonymous,
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 3M 64k",
            "flush",
            "read -P 0xa5 0 1M",
            "read -P 0x5a 3M 64k",
        ],
    ));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(nbdinfo_size(&nbds(&n, &p.anonymous)), 16 * MIB);
    // A client certificate is accepted, not needed, when no client CA is set.
    assert_eq!(nbdinfo_size(&nbds(&n, &p.foreign)), 16 * MIB);

    assert_eq!(nbdinfo_size(&n.uri("r0")), 16 * MIB);
    // GnuTLS sends the IP address as SNI; rustls' warning about it is kept
    // out of the log (one line per connection otherwise).
    assert!(!n.log_text().contains("SNI"), "{}", n.log_text());
    let mut c = n.nbd("r0");
    let (err, data) = c.read(0, 1 << 20).expect("read");
    assert_eq!(err, 0);
    assert!(data.iter().all(|&b| b == 0xa5));
    let (err, data) = c.read(3 * MIB, 64 << 10).expect("read");
    assert_eq!(err, 0);
    assert!(data.iter().all(|&b| b == 0x5a));
}

/// Required TLS with client certificates: plaintext clients are refused
/// (nbdinfo fails, NBD_OPT_GO gets NBD_REP_ERR_TLS_REQD), so are clients
/// without a certificate or with one from another CA; a client with the
/// cluster CA's certificate reads and writes.
#[test]
fn required_tls_refuses_plaintext_and_foreign_certificates() {
    tools();
    let (n, p) = node_with(|p| serde_json::json!({ "nbd_tls": tls_settings(p, "required", true) }));
    assert!(
        n.log_text()
            .contains("NBD: TLS required (client certificates required)"),
        "{}",
        n.log_text()
    );

    let o = output(Command::new("nbdinfo").args(["--json", &n.uri("r0")]));
    assert!(
        !o.status.success(),
        "plaintext nbdinfo was served: {}",
        text(&o)
    );
    let e = NbdClient::connect(&n.nbd, "r0")
        .err()
        .expect("a plaintext NBD_OPT_GO was served");
    assert!(
        e.to_string()
            .contains(&format!("{:#x}", mars_nbd::proto::NBD_REP_ERR_TLS_REQD)),
        "{e}"
    );

    for (what, creds) in [
        ("no client certificate", &p.anonymous),
        ("another CA's certificate", &p.foreign),
    ] {
        let o = output(Command::new("nbdinfo").args(["--json", &nbds(&n, creds)]));
        assert!(
            !o.status.success(),
            "{what}: nbdinfo was served: {}",
            text(&o)
        );
        let o = output(&mut qemu_io_tls(&n, creds, &["read 0 4k"]));
        assert!(
            !o.status.success(),
            "{what}: qemu-io was served: {}",
            text(&o)
        );
        assert!(
            !text(&o).contains("read 4096/4096 bytes"),
            "{what}: qemu-io read the device: {}",
            text(&o)
        );
    }
    assert!(
        poll(Duration::from_secs(10), || n
            .log_text()
            .matches("TLS: handshake failed")
            .count()
            >= 4),
        "the refused TLS handshakes are not logged:\n{}",
        n.log_text()
    );

    let out = run(&mut qemu_io_tls(
        &n,
        &p.client,
        &["write -P 0x3c 1M 256k", "read -P 0x3c 1M 256k"],
    ));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("read 262144/262144 bytes"), "{out}");
    assert_eq!(nbdinfo_size(&nbds(&n, &p.client)), 16 * MIB);
}

/// Connect to `to` from the source address `from` (any 127/8 address reaches
/// a listener on 127.0.0.1); whether the NBD greeting came.
fn greeted_from(from: &str, to: &str) -> bool {
    let from: std::net::SocketAddr = format!("{from}:0").parse().expect("address");
    let to: std::net::SocketAddr = to.parse().expect("address");
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&from.into()).expect("bind source address");
    s.connect(&to.into()).expect("connect");
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut g = [0u8; 18];
    match s.read_exact(&mut g) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("neither greeting nor close from {to}: {e}"),
    }
}

/// `nbd_allow`: an address not on the list is closed at accept (and logged),
/// one on it is served. (TLS off here: an `nbds://` client is refused.)
#[test]
fn allow_list_closes_other_addresses() {
    tools();
    let (n, p) = node_with(|_| serde_json::json!({ "nbd_allow": ["127.0.0.1", "10.0.0.0/8"] }));
    assert!(
        n.log_text()
            .contains("NBD: TLS off, clients from 127.0.0.1, 10.0.0.0/8"),
        "{}",
        n.log_text()
    );
    assert!(greeted_from("127.0.0.1", &n.nbd));
    assert_eq!(nbdinfo_size(&n.uri("r0")), 16 * MIB);
    // Without nbd_tls, STARTTLS is refused (ERR_POLICY) and a client that
    // asked for TLS gives up rather than going on in plaintext.
    let o = output(Command::new("nbdinfo").args(["--json", &nbds(&n, &p.anonymous)]));
    assert!(
        !o.status.success(),
        "nbds:// without TLS was served: {}",
        text(&o)
    );
    assert!(!greeted_from("127.0.0.2", &n.nbd), "127.0.0.2 was greeted");
    wait_for("the refusal logged", Duration::from_secs(10), || {
        n.log_text().contains("not on the allow-list")
    });
    assert!(n.log_text().contains("127.0.0.2"), "{}", n.log_text());
}

/// Run marsd on a node whose settings are bad: it must exit at once with one
/// line that says what is wrong.
fn refused_start(n: &Node) -> String {
    let mut child = Command::new(MARSD)
        .arg("--dir")
        .arg(&n.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn marsd");
    let mut status = None;
    let exited = poll(Duration::from_secs(30), || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    let Some(status) = status.filter(|_| exited) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("marsd started with bad NBD settings");
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(!status.success(), "{err}");
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("marsd: "), "{err}");
    last
}

#[test]
fn bad_tls_settings_refuse_to_start() {
    let n = Node::create("alpha");
    let p = pki(n.tmp.path());
    let key = p.server_dir.join("server-key.pem");

    let missing = n.tmp.path().join("nowhere.pem");
    let mut t = tls_settings(&p, "optional", false);
    t["cert"] = missing.to_str().expect("utf-8").into();
    configure(&n, serde_json::json!({ "nbd_tls": t }));
    let e = refused_start(&n);
    assert!(
        e.contains("nbd_tls.cert") && e.contains("nowhere.pem") && e.contains("cannot open"),
        "{e}"
    );

    let mut t = tls_settings(&p, "required", true);
    t["client_ca"] = p
        .server_dir
        .join("server-key.pem")
        .to_str()
        .expect("utf-8")
        .into();
    configure(&n, serde_json::json!({ "nbd_tls": t }));
    let e = refused_start(&n);
    assert!(
        e.contains("nbd_tls.client_ca") && e.contains("no certificate"),
        "{e}"
    );

    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    configure(
        &n,
        serde_json::json!({ "nbd_tls": tls_settings(&p, "optional", false) }),
    );
    let e = refused_start(&n);
    assert!(
        e.contains("nbd_tls.key") && e.contains("mode 0644") && e.contains("other users"),
        "{e}"
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");

    // A key that is not the certificate's.
    let other = Ca::new("x").issue("y", &["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let wrong_key = p.server_dir.join("wrong-key.pem");
    write_file(&wrong_key, &other.1, 0o600);
    let mut t = tls_settings(&p, "optional", false);
    t["key"] = wrong_key.to_str().expect("utf-8").into();
    configure(&n, serde_json::json!({ "nbd_tls": t }));
    let e = refused_start(&n);
    assert!(e.contains("nbd_tls:") && e.contains("wrong-key.pem"), "{e}");

    configure(
        &n,
        serde_json::json!({ "nbd_tls": tls_settings(&p, "sometimes", false) }),
    );
    let e = refused_start(&n);
    assert!(e.contains("node.json") && e.contains("sometimes"), "{e}");

    configure(
        &n,
        serde_json::json!({ "nbd_tls": tls_settings(&p, "off", false), "nbd_allow": ["10.0.0.1/8"] }),
    );
    let e = refused_start(&n);
    assert!(e.contains("nbd_allow") && e.contains("10.0.0.0/8"), "{e}");
}
