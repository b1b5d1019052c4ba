//! NBD_OPT_STARTTLS: the three TLS modes, client certificates, and the
//! allow-list of client addresses. Certificates are made here with rcgen; the
//! client side is tokio-rustls.

mod common;

use common::*;
use mars_nbd::proto::*;
use mars_nbd::{AllowList, NbdError, ServerOptions, Tls, TlsAcceptor};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

const FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// A CA and what it issued.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

struct Leaf {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn issue(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, "leaf");
        p.extended_key_usages = vec![purpose];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

struct Pki {
    ca: Ca,
    server: Leaf,
}

fn pki() -> Pki {
    let ca = Ca::new("nbd test CA");
    let server = ca.issue(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    Pki { ca, server }
}

fn acceptor(pki: &Pki, client_ca: Option<&Ca>) -> TlsAcceptor {
    let config = mars_nbd::tls::server_config(
        vec![pki.server.cert.clone()],
        pki.server.key.clone_key(),
        client_ca.map(|c| vec![c.der()]),
    )
    .unwrap();
    TlsAcceptor::from(config)
}

fn connector(ca: &Ca, client: Option<&Leaf>) -> TlsConnector {
    #[allow(deprecated)] // the ring provider, as the server uses
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => b.with_no_client_auth(),
        Some(c) => b
            .with_client_auth_cert(vec![c.cert.clone()], c.key.clone_key())
            .unwrap(),
    };
    TlsConnector::from(Arc::new(config))
}

fn start_with(
    reg: Arc<MemRegistry>,
    tls: Tls,
) -> (tokio::io::DuplexStream, JoinHandle<Result<(), NbdError>>) {
    let (client, server) = tokio::io::duplex(4 << 20);
    let h = tokio::spawn(async move { mars_nbd::serve_connection_with(server, reg, &tls).await });
    (client, h)
}

async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut g = [0u8; 18];
    tokio::time::timeout(T, s.read_exact(&mut g))
        .await
        .expect("greeting")
        .unwrap();
    assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
    s.write_all(&FLAGS.to_be_bytes()).await.unwrap();
}

async fn option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    opt: u32,
    data: &[u8],
) -> (u32, Vec<u8>) {
    let mut b = encode_option_header(opt, data.len() as u32).to_vec();
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
    reply(s, opt).await
}

async fn reply<S: AsyncRead + Unpin>(s: &mut S, opt: u32) -> (u32, Vec<u8>) {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    tokio::time::timeout(T, s.read_exact(&mut h))
        .await
        .expect("option reply")
        .unwrap();
    let (o, typ, len) = parse_option_reply_header(&h).unwrap();
    assert_eq!(o, opt);
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.unwrap();
    (typ, d)
}

/// NBD_OPT_GO for `name`; the reply type that ended it.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, name: &str) -> u32 {
    let (mut typ, _) = option(s, NBD_OPT_GO, &encode_info_request(name.as_bytes(), &[])).await;
    while typ == NBD_REP_INFO {
        typ = reply(s, NBD_OPT_GO).await.0;
    }
    typ
}

async fn expect_closed<S: AsyncRead + Unpin>(s: &mut S) {
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(T, s.read(&mut b))
        .await
        .expect("timeout waiting for close")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the connection closed");
}

/// Write and read back through an established transmission phase, pipelined,
/// with payloads larger than a TLS record; then NBD_CMD_DISC.
async fn exercise<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, export: &MemExport) {
    let sizes = [512usize, 70_000, 1 << 20, 4096];
    let mut off = 0u64;
    let mut burst = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let r = Request {
            flags: 0,
            kind: mars_nbd::Command::from_u16(NBD_CMD_WRITE),
            cookie: i as u64,
            offset: off,
            length: len as u32,
        };
        burst.extend_from_slice(&encode_request(&r));
        burst.extend((0..len).map(|j| (j % 251) as u8 ^ i as u8));
        off += len as u64;
    }
    s.write_all(&burst).await.unwrap();
    s.flush().await.unwrap();
    let mut seen = vec![false; sizes.len()];
    for _ in 0..sizes.len() {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        tokio::time::timeout(T, s.read_exact(&mut h))
            .await
            .expect("write reply")
            .unwrap();
        let (err, cookie) = parse_simple_reply(&h).unwrap();
        assert_eq!(err, 0);
        seen[cookie as usize] = true;
    }
    assert!(seen.iter().all(|&b| b));
    let r = Request {
        flags: 0,
        kind: mars_nbd::Command::from_u16(NBD_CMD_READ),
        cookie: 99,
        offset: 0,
        length: off as u32,
    };
    s.write_all(&encode_request(&r)).await.unwrap();
    s.flush().await.unwrap();
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(parse_simple_reply(&h).unwrap(), (0, 99));
    let mut data = vec![0u8; off as usize];
    tokio::time::timeout(T, s.read_exact(&mut data))
        .await
        .expect("read data")
        .unwrap();
    assert_eq!(data, export.snapshot()[..off as usize]);
    let mut start = 0;
    for (i, &len) in sizes.iter().enumerate() {
        for j in 0..len {
            assert_eq!(data[start + j], (j % 251) as u8 ^ i as u8);
        }
        start += len;
    }
    let disc = Request {
        flags: 0,
        kind: mars_nbd::Command::from_u16(NBD_CMD_DISC),
        cookie: 0,
        offset: 0,
        length: 0,
    };
    s.write_all(&encode_request(&disc)).await.unwrap();
    s.flush().await.unwrap();
    expect_closed(s).await;
}

/// STARTTLS, then the TLS handshake as the client `c`.
async fn start_tls(
    mut s: tokio::io::DuplexStream,
    c: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    assert_eq!(option(&mut s, NBD_OPT_STARTTLS, &[]).await.0, NBD_REP_ACK);
    c.connect(ServerName::try_from("localhost").unwrap(), s)
        .await
}

#[tokio::test]
async fn optional_tls_serves_both_and_restarts_haggling_inside_tls() {
    let pki = pki();
    let tls = Tls::Optional(acceptor(&pki, None));

    // A plaintext client is served as before.
    let (reg, export) = MemRegistry::with("vol", MemExport::new(4 << 20));
    let (mut s, h) = start_with(reg.clone(), tls.clone());
    greet(&mut s).await;
    assert_eq!(go(&mut s, "vol").await, NBD_REP_ACK);
    exercise(&mut s, &export).await;
    finish(h).await.unwrap();

    // A client that asks for TLS: options before STARTTLS are answered, and
    // after it the haggling starts again inside TLS.
    let (mut s, h) = start_with(reg, tls);
    greet(&mut s).await;
    let (typ, _) = option(&mut s, NBD_OPT_LIST, &[]).await;
    assert_eq!(typ, NBD_REP_SERVER);
    assert_eq!(reply(&mut s, NBD_OPT_LIST).await.0, NBD_REP_ACK);
    // STARTTLS with data is invalid, and the session goes on.
    assert_eq!(
        option(&mut s, NBD_OPT_STARTTLS, b"x").await.0,
        NBD_REP_ERR_INVALID
    );
    let mut t = start_tls(s, &connector(&pki.ca, None)).await.unwrap();
    assert_eq!(
        option(&mut t, NBD_OPT_STARTTLS, &[]).await.0,
        NBD_REP_ERR_INVALID,
        "a second STARTTLS inside TLS"
    );
    let (typ, _) = option(&mut t, NBD_OPT_LIST, &[]).await;
    assert_eq!(typ, NBD_REP_SERVER);
    assert_eq!(reply(&mut t, NBD_OPT_LIST).await.0, NBD_REP_ACK);
    assert_eq!(go(&mut t, "nope").await, NBD_REP_ERR_UNKNOWN);
    assert_eq!(go(&mut t, "vol").await, NBD_REP_ACK);
    exercise(&mut t, &export).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn tls_then_export_name_honours_no_zeroes() {
    let pki = pki();
    let (reg, export) = MemRegistry::with("vol", MemExport::new(4 << 20));
    let (mut s, h) = start_with(reg, Tls::Required(acceptor(&pki, None)));
    greet(&mut s).await;
    let mut t = start_tls(s, &connector(&pki.ca, None)).await.unwrap();
    t.write_all(&encode_option_header(NBD_OPT_EXPORT_NAME, 3))
        .await
        .unwrap();
    t.write_all(b"vol").await.unwrap();
    t.flush().await.unwrap();
    let mut b = [0u8; 10];
    t.read_exact(&mut b).await.unwrap();
    assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), 4 << 20);
    exercise(&mut t, &export).await;
    finish(h).await.unwrap();
}

/// Requests the client sends in the same flight as NBD_OPT_GO, inside TLS,
/// are served (they are in the TLS stream's read buffer when transmission
/// starts).
#[tokio::test]
async fn requests_pipelined_behind_go_inside_tls() {
    let pki = pki();
    let (reg, export) = MemRegistry::with("vol", MemExport::new(4 << 20));
    let (mut s, h) = start_with(reg, Tls::Optional(acceptor(&pki, None)));
    greet(&mut s).await;
    let mut t = start_tls(s, &connector(&pki.ca, None)).await.unwrap();
    let info = encode_info_request(b"vol", &[]);
    let mut b = encode_option_header(NBD_OPT_GO, info.len() as u32).to_vec();
    b.extend_from_slice(&info);
    for c in 0..8u64 {
        let r = Request {
            flags: 0,
            kind: mars_nbd::Command::from_u16(NBD_CMD_WRITE),
            cookie: c,
            offset: c * 4096,
            length: 4096,
        };
        b.extend_from_slice(&encode_request(&r));
        b.extend_from_slice(&[c as u8 + 1; 4096]);
    }
    t.write_all(&b).await.unwrap();
    t.flush().await.unwrap();
    let mut typ = reply(&mut t, NBD_OPT_GO).await.0;
    while typ == NBD_REP_INFO {
        typ = reply(&mut t, NBD_OPT_GO).await.0;
    }
    assert_eq!(typ, NBD_REP_ACK);
    for _ in 0..8 {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        tokio::time::timeout(T, t.read_exact(&mut h))
            .await
            .expect("reply")
            .unwrap();
        assert_eq!(parse_simple_reply(&h).unwrap().0, 0);
    }
    let data = export.snapshot();
    for c in 0..8usize {
        assert!(data[c * 4096..(c + 1) * 4096]
            .iter()
            .all(|&x| x == c as u8 + 1));
    }
    exercise(&mut t, &export).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn required_tls_refuses_everything_before_starttls() {
    let pki = pki();
    let (reg, export) = MemRegistry::with("vol", MemExport::new(4 << 20));
    let tls = Tls::Required(acceptor(&pki, None));

    let (mut s, h) = start_with(reg.clone(), tls.clone());
    greet(&mut s).await;
    for opt in [
        NBD_OPT_LIST,
        NBD_OPT_INFO,
        NBD_OPT_GO,
        NBD_OPT_STRUCTURED_REPLY,
        12345,
    ] {
        let data = if matches!(opt, NBD_OPT_INFO | NBD_OPT_GO) {
            encode_info_request(b"vol", &[])
        } else {
            Vec::new()
        };
        assert_eq!(
            option(&mut s, opt, &data).await.0,
            NBD_REP_ERR_TLS_REQD,
            "option {opt}"
        );
    }
    assert_eq!(
        option(&mut s, NBD_OPT_STARTTLS, b"x").await.0,
        NBD_REP_ERR_INVALID
    );
    assert_eq!(option(&mut s, NBD_OPT_ABORT, &[]).await.0, NBD_REP_ACK);
    expect_closed(&mut s).await;
    finish(h).await.unwrap();

    // EXPORT_NAME cannot be refused with an error: the connection is closed.
    let (mut s, h) = start_with(reg.clone(), tls.clone());
    greet(&mut s).await;
    s.write_all(&encode_option_header(NBD_OPT_EXPORT_NAME, 3))
        .await
        .unwrap();
    s.write_all(b"vol").await.unwrap();
    expect_closed(&mut s).await;
    assert!(matches!(finish(h).await, Err(NbdError::TlsRequired)));

    // With TLS, everything works, and TLS_REQD is never sent inside it.
    let (mut s, h) = start_with(reg, tls);
    greet(&mut s).await;
    let mut t = start_tls(s, &connector(&pki.ca, None)).await.unwrap();
    let (typ, _) = option(&mut t, NBD_OPT_LIST, &[]).await;
    assert_eq!(typ, NBD_REP_SERVER);
    assert_eq!(reply(&mut t, NBD_OPT_LIST).await.0, NBD_REP_ACK);
    assert_eq!(
        option(&mut t, NBD_OPT_STRUCTURED_REPLY, &[]).await.0,
        NBD_REP_ERR_UNSUP
    );
    assert_eq!(go(&mut t, "vol").await, NBD_REP_ACK);
    exercise(&mut t, &export).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn client_certificates_are_checked_against_the_client_ca() {
    let pki = pki();
    let client_ca = Ca::new("client CA");
    let other_ca = Ca::new("other CA");
    let good = client_ca.issue(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let foreign = other_ca.issue(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let tls = Tls::Required(acceptor(&pki, Some(&client_ca)));
    let (reg, export) = MemRegistry::with("vol", MemExport::new(4 << 20));

    for (what, cert) in [("no certificate", None), ("another CA's", Some(&foreign))] {
        let (mut s, h) = start_with(reg.clone(), tls.clone());
        greet(&mut s).await;
        // TLS 1.3: the client finishes its side before the server checks its
        // certificate, so the refusal shows on the first read at the latest.
        let refused = match start_tls(s, &connector(&pki.ca, cert)).await {
            Err(_) => true,
            Ok(mut t) => {
                let b = encode_option_header(NBD_OPT_LIST, 0);
                let _ = t.write_all(&b).await;
                let _ = t.flush().await;
                let mut r = [0u8; 1];
                !matches!(
                    tokio::time::timeout(T, t.read(&mut r)).await.expect("read"),
                    Ok(n) if n > 0
                )
            }
        };
        assert!(refused, "{what}: the server took the connection");
        match finish(h).await {
            Err(NbdError::Tls(e)) => assert!(e.contains("handshake failed"), "{what}: {e}"),
            other => panic!("{what}: server ended with {other:?}"),
        }
    }

    let (mut s, h) = start_with(reg, tls);
    greet(&mut s).await;
    let mut t = start_tls(s, &connector(&pki.ca, Some(&good)))
        .await
        .unwrap();
    assert_eq!(go(&mut t, "vol").await, NBD_REP_ACK);
    exercise(&mut t, &export).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn data_sent_behind_starttls_closes_the_connection() {
    let pki = pki();
    let (reg, _) = MemRegistry::with("vol", MemExport::new(4096));
    let (mut s, h) = start_with(reg, Tls::Optional(acceptor(&pki, None)));
    greet(&mut s).await;
    let mut b = encode_option_header(NBD_OPT_STARTTLS, 0).to_vec();
    b.extend_from_slice(&encode_option_header(NBD_OPT_LIST, 0));
    s.write_all(&b).await.unwrap();
    assert_eq!(reply(&mut s, NBD_OPT_STARTTLS).await.0, NBD_REP_ACK);
    expect_closed(&mut s).await;
    assert!(matches!(finish(h).await, Err(NbdError::Tls(_))));
}

#[tokio::test]
async fn tls_off_refuses_starttls_by_policy() {
    let (reg, export) = MemRegistry::with("vol", MemExport::new(4 << 20));
    let (mut s, h) = start_with(reg, Tls::Off);
    greet(&mut s).await;
    assert_eq!(
        option(&mut s, NBD_OPT_STARTTLS, &[]).await.0,
        NBD_REP_ERR_POLICY
    );
    assert_eq!(go(&mut s, "vol").await, NBD_REP_ACK);
    exercise(&mut s, &export).await;
    finish(h).await.unwrap();
}

/// The allow-list closes connections from other addresses at accept, before
/// the greeting; listed addresses get the greeting.
#[tokio::test]
async fn allow_list_closes_other_addresses_at_accept() {
    let (reg, _) = MemRegistry::with("vol", MemExport::new(4096));
    for (list, allowed) in [
        (vec!["10.0.0.0/8", "::1"], false),
        (vec!["10.0.0.0/8", "127.0.0.0/8"], true),
    ] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let options = ServerOptions {
            tls: Tls::Off,
            allow: Some(AllowList::parse(&list).unwrap()),
        };
        let server = tokio::spawn(mars_nbd::serve_with(l, reg.clone(), options));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 18];
        let got = tokio::time::timeout(T, s.read_exact(&mut g))
            .await
            .expect("neither greeting nor close");
        if allowed {
            got.unwrap();
            assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
        } else {
            assert!(got.is_err(), "{list:?}: a refused address got a greeting");
        }
        server.abort();
    }
}
