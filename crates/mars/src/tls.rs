//! Who may talk to this node: the cluster's certificate authority, node
//! certificates, invitation tokens, and the rustls configurations of peer
//! links (see "Trust model" in docs/ARCHITECTURE.md).
//!
//! - `create-cluster` makes the cluster's CA (ECDSA P-256, rcgen) and a
//!   certificate for its node. A node's certificate names it `NAME@ID` (its
//!   identity in the metadata) as common name, and `mars-node` as DNS name
//!   (what every link checks the chain against; the identity is checked
//!   after the handshake against the node a connection was meant for).
//! - `invite` stores a one-time secret (its hash, kind and expiry) in
//!   `tls/invites.json` and prints a token: `mars1.<id>.<secret>.<pin>`,
//!   pin = blake3 of the CA certificate's DER. The joiner trusts only a
//!   server whose chain holds the pinned CA, sends the secret inside that
//!   TLS session with its public key, and gets its certificate.
//! - Every peer link is TLS 1.3 with both sides' certificates. A connection
//!   without a client certificate may only redeem a token (join, merge), in
//!   frames of at most [`PREAUTH_MAX_FRAME`] bytes.
//! - Trusted CAs are this node's own plus every `c/d/ca/<pin>` entry of the
//!   metadata (a merge brings the other cluster's); a node that left is
//!   listed under `c/d/revoked/<NAME@ID>` and refused.

use anyhow::{anyhow, bail, Context, Result};
use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mars_logger::crashsafe::write_private;

/// Directory of the node's TLS files, inside the node directory.
pub const TLS_DIR: &str = "tls";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";
pub const INVITES: &str = "invites.json";
/// The DNS name in every node certificate, checked by every link.
pub const SERVER_NAME: &str = "mars-node";
/// Largest frame a peer may send before it is authenticated (a token and a
/// public key fit in a few hundred bytes).
pub const PREAUTH_MAX_FRAME: u32 = 4096;
/// Metadata keys of trusted CAs (`c/d/ca/<pin>` = PEM) and revoked nodes
/// (`c/d/revoked/<NAME@ID>` = { "at_ms": .. }).
pub const CA_PREFIX: &str = "c/d/ca/";
pub const REVOKED_PREFIX: &str = "c/d/revoked/";
/// Validity of a node certificate; renew (leave and join again, or a later
/// `renew`) before it ends.
const NODE_CERT_YEARS: i64 = 10;
const CA_YEARS: i64 = 30;

/// The crypto provider of every TLS session (`mars_nbd::tls::provider`).
pub fn provider() -> Arc<CryptoProvider> {
    mars_nbd::tls::provider()
}

pub fn tls_dir(node_dir: &Path) -> PathBuf {
    node_dir.join(TLS_DIR)
}

/// blake3 of a certificate's DER: how a token names the CA it trusts.
pub fn pin_of(der: &[u8]) -> String {
    blake3::hash(der).to_hex().to_string()
}

pub fn ca_key_of(pin: &str) -> String {
    format!("{CA_PREFIX}{}", &pin[..pin.len().min(16)])
}

pub fn revoked_key(token: &str) -> String {
    format!("{REVOKED_PREFIX}{token}")
}

fn validity(years: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::days(1),
        now + time::Duration::days(365 * years),
    )
}

/// A new CA for a cluster: (certificate PEM, key PEM).
pub fn new_ca() -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    // Nothing of the cluster's id in it: any TLS client sees the chain
    // before it is authenticated.
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "mars cluster CA".to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (p.not_before, p.not_after) = validity(CA_YEARS);
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate for node `token` (`NAME@ID`) and `public_key` (DER
/// SubjectPublicKeyInfo), signed by the CA.
pub fn issue(ca_pem: &str, ca_key_pem: &str, token: &str, public_key: &[u8]) -> Result<String> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).context("the CA key is damaged")?;
    let ca = rcgen::CertificateParams::from_ca_cert_pem(ca_pem)
        .context("the CA certificate is damaged")?
        .self_signed(&ca_key)?;
    let spki = rcgen::SubjectPublicKeyInfo::from_der(public_key)
        .map_err(|e| anyhow!("not a public key: {e}"))?;
    let mut p = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, token.to_string());
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.serial_number = Some(rcgen::SerialNumber::from_slice(
        &rand::random::<[u8; 16]>()[..],
    ));
    (p.not_before, p.not_after) = validity(NODE_CERT_YEARS);
    Ok(p.signed_by(&spki, &ca, &ca_key)?.pem())
}

/// A new key pair: (its PEM, its public key DER).
pub fn new_key() -> Result<(String, Vec<u8>)> {
    let k = rcgen::KeyPair::generate()?;
    Ok((k.serialize_pem(), k.public_key_der()))
}

/// The identity (`NAME@ID`) a node certificate names.
pub fn identity(der: &[u8]) -> Result<String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| anyhow!("bad certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .ok_or_else(|| anyhow!("certificate without a common name"))?;
    mars_meta::schema::NodeRef::parse(cn)
        .map(|n| n.token())
        .ok_or_else(|| anyhow!("certificate names no node ({cn:?})"))
}

fn certs_of(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("bad certificate PEM: {e:?}"))?;
    if v.is_empty() {
        bail!("no certificate in PEM");
    }
    Ok(v)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Write the TLS files of a new node (keys 0600).
pub fn write_node_files(
    node_dir: &Path,
    ca_pem: &str,
    ca_key_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<()> {
    let d = tls_dir(node_dir);
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    }
    for (name, body) in [
        (CA_KEY, ca_key_pem),
        (NODE_KEY, key_pem),
        (CA_CERT, ca_pem),
        (NODE_CERT, cert_pem),
    ] {
        write_private(&d.join(name), body.as_bytes())
            .with_context(|| format!("cannot write {}", d.join(name).display()))?;
    }
    Ok(())
}

/// `create-cluster`: a CA and this node's certificate.
pub fn init_cluster(node_dir: &Path, token: &str) -> Result<()> {
    let (ca, ca_key) = new_ca()?;
    let (key, public) = new_key()?;
    let cert = issue(&ca, &ca_key, token, &public)?;
    write_node_files(node_dir, &ca, &ca_key, &cert, &key)
}

/// This node's TLS material and the configurations built from it.
pub struct Tls {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    /// Own CA certificate (PEM), sent in the chain so joiners can pin it.
    pub ca_pem: String,
    pub pin: String,
    /// blake3 of this node's certificate (its node entry names it).
    pub cert_pin: String,
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
    configs: RwLock<Configs>,
}

struct Configs {
    /// PEMs of every trusted CA, own first.
    roots: Vec<String>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl Tls {
    /// Load the node's files; a node directory made before TLS existed is refused.
    pub fn load(node_dir: &Path) -> Result<Tls> {
        let dir = tls_dir(node_dir);
        if !dir.join(NODE_CERT).exists() {
            bail!(
                "{} has no TLS certificate ({}): it was made by a mars release without authenticated links; make the node anew (create-cluster, or invite + join-cluster --token)",
                node_dir.display(),
                dir.join(NODE_CERT).display()
            );
        }
        for k in [CA_KEY, NODE_KEY] {
            check_private(&dir.join(k))?;
        }
        let ca_pem = read(&dir.join(CA_CERT))?;
        let ca = certs_of(&ca_pem)?;
        let mut chain = certs_of(&read(&dir.join(NODE_CERT))?)?;
        chain.push(ca[0].clone());
        let key_pem = read(&dir.join(NODE_KEY))?;
        let provider = provider();
        let roots = vec![ca_pem.clone()];
        let (server, client) = build(&provider, &roots, &chain, &key_pem)?;
        Ok(Tls {
            dir,
            provider,
            pin: pin_of(&ca[0]),
            cert_pin: pin_of(&chain[0]),
            ca_pem,
            chain,
            key_pem,
            configs: RwLock::new(Configs {
                roots,
                server,
                client,
            }),
        })
    }

    /// This node's identity as its certificate names it.
    pub fn identity(&self) -> Result<String> {
        identity(&self.chain[0])
    }

    pub fn server(&self) -> Arc<ServerConfig> {
        self.configs.read().server.clone()
    }

    pub fn client(&self) -> Arc<ClientConfig> {
        self.configs.read().client.clone()
    }

    /// Trust exactly `extra` (PEMs from the metadata) besides the own CA;
    /// rebuilds the configurations when that changes.
    pub fn set_roots(&self, mut extra: Vec<String>) -> Result<()> {
        extra.retain(|p| *p != self.ca_pem);
        extra.sort();
        extra.dedup();
        let mut roots = vec![self.ca_pem.clone()];
        roots.extend(extra);
        if self.configs.read().roots == roots {
            return Ok(());
        }
        let (server, client) = build(&self.provider, &roots, &self.chain, &self.key_pem)?;
        *self.configs.write() = Configs {
            roots,
            server,
            client,
        };
        Ok(())
    }

    /// The CA key, for signing certificates of invited nodes.
    pub fn ca_key_pem(&self) -> Result<String> {
        read(&self.dir.join(CA_KEY))
    }

    pub fn invites(&self) -> Invites {
        Invites {
            path: self.dir.join(INVITES),
        }
    }
}

fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .permissions()
        .mode();
    if m & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {:o}): `chmod 600` it",
            path.display(),
            m & 0o777
        );
    }
    Ok(())
}

fn build(
    provider: &Arc<CryptoProvider>,
    roots_pem: &[String],
    chain: &[CertificateDer<'static>],
    key_pem: &str,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let mut roots = RootCertStore::empty();
    for p in roots_pem {
        for c in certs_of(p)? {
            roots.add(c)?;
        }
    }
    let roots = Arc::new(roots);
    let key = || {
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow!("the node key is damaged: {e:?}"))
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.to_vec(), key()?)?;
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain.to_vec(), key()?)?;
    Ok((Arc::new(server), Arc::new(client)))
}

/// A client configuration that trusts only a server whose chain holds the
/// CA `pin` names (a joiner, or a node merging another cluster in), and
/// shows no certificate of its own.
pub fn pinned_client(pin: &str) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let c = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            pin: pin.to_string(),
            provider,
        }))
        .with_no_client_auth();
    Ok(Arc::new(c))
}

pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME)
            .expect("a valid DNS name")
            .to_owned(),
    )
}

#[derive(Debug)]
struct Pinned {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pin_of(c.as_ref()) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the peer's certificate authority is not the one the token names".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        v.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InviteKind {
    Join,
    Merge,
}

pub use mars_proto::token::Token;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Invite {
    id: String,
    /// blake3 of the secret: the file does not hold what redeems it.
    secret_hash: String,
    kind: InviteKind,
    expires_ms: u64,
}

/// Pending invitations of this node (`tls/invites.json`, 0600).
pub struct Invites {
    path: PathBuf,
}

static INVITES_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

impl Invites {
    fn load(&self) -> Result<Vec<Invite>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{} is damaged", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", self.path.display())),
        }
    }

    fn save(&self, v: &[Invite]) -> Result<()> {
        write_private(&self.path, &serde_json::to_vec_pretty(v)?)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// A new token of `kind`, valid `ttl_ms` from `now_ms`.
    pub fn create(&self, kind: InviteKind, ttl_ms: u64, now_ms: u64, pin: &str) -> Result<Token> {
        let _g = INVITES_LOCK.lock();
        let t = Token {
            id: hex(&rand::random::<[u8; 8]>()),
            secret: hex(&rand::random::<[u8; 16]>()),
            pin: pin.to_string(),
        };
        let mut v = self.load()?;
        v.retain(|i| i.expires_ms > now_ms);
        v.push(Invite {
            id: t.id.clone(),
            secret_hash: blake3::hash(t.secret.as_bytes()).to_hex().to_string(),
            kind,
            expires_ms: now_ms.saturating_add(ttl_ms),
        });
        self.save(&v)?;
        Ok(t)
    }

    /// Use up the invitation `id` if `secret` is its and it is of `kind` and
    /// not expired. A wrong secret does not use it up.
    pub fn redeem(&self, id: &str, secret: &str, kind: InviteKind, now_ms: u64) -> Result<()> {
        self.check_or_redeem(id, secret, kind, now_ms, true)
    }

    /// Whether `redeem` would accept the token now, without using it up:
    /// what is checked before anything else is told to its holder.
    pub fn check(&self, id: &str, secret: &str, kind: InviteKind, now_ms: u64) -> Result<()> {
        self.check_or_redeem(id, secret, kind, now_ms, false)
    }

    fn check_or_redeem(
        &self,
        id: &str,
        secret: &str,
        kind: InviteKind,
        now_ms: u64,
        redeem: bool,
    ) -> Result<()> {
        let _g = INVITES_LOCK.lock();
        let mut v = self.load()?;
        let Some(i) = v.iter().position(|i| i.id == id) else {
            bail!(
                "unknown or already used token (a token is used once, at the node that printed it)"
            );
        };
        let want = blake3::hash(secret.as_bytes());
        let have = blake3::Hash::from_hex(&v[i].secret_hash)
            .map_err(|_| anyhow!("{} is damaged", self.path.display()))?;
        // blake3::Hash compares in constant time.
        if want != have {
            bail!("wrong token secret");
        }
        if v[i].kind != kind {
            bail!(
                "this token is for {}, not for {}",
                kind_word(v[i].kind),
                kind_word(kind)
            );
        }
        if v[i].expires_ms <= now_ms {
            v.remove(i);
            self.save(&v)?;
            bail!("the token has expired (`marsadm invite` prints a new one)");
        }
        if !redeem {
            return Ok(());
        }
        v.remove(i);
        self.save(&v)
    }
}

fn kind_word(k: InviteKind) -> &'static str {
    match k {
        InviteKind::Join => "joining a node (`join-cluster --token`)",
        InviteKind::Merge => "merging a cluster (`merge-cluster --token`)",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invites_are_used_once_expire_and_keep_their_kind() {
        let d = tempfile::tempdir().unwrap();
        let inv = Invites {
            path: d.path().join(INVITES),
        };
        let pin = "b".repeat(64);
        let t = inv.create(InviteKind::Join, 1000, 5000, &pin).unwrap();
        assert!(inv.redeem(&t.id, "wrong", InviteKind::Join, 5001).is_err());
        assert!(inv
            .redeem(&t.id, &t.secret, InviteKind::Merge, 5001)
            .is_err());
        assert!(inv.check(&t.id, "wrong", InviteKind::Join, 5001).is_err());
        inv.check(&t.id, &t.secret, InviteKind::Join, 5001).unwrap();
        inv.redeem(&t.id, &t.secret, InviteKind::Join, 5001)
            .unwrap();
        assert!(inv.check(&t.id, &t.secret, InviteKind::Join, 5002).is_err());
        assert!(inv
            .redeem(&t.id, &t.secret, InviteKind::Join, 5002)
            .is_err());
        let t = inv.create(InviteKind::Merge, 1000, 5000, &pin).unwrap();
        assert!(inv
            .redeem(&t.id, &t.secret, InviteKind::Merge, 6000)
            .is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(INVITES))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn issued_certificates_name_the_node_and_chain_to_the_ca() {
        let (ca, ca_key) = new_ca().unwrap();
        let (_key, public) = new_key().unwrap();
        let cert = issue(&ca, &ca_key, "alpha@00000000000000ab", &public).unwrap();
        let der = certs_of(&cert).unwrap();
        assert_eq!(identity(&der[0]).unwrap(), "alpha@00000000000000ab");
        assert!(issue(&ca, &ca_key, "alpha@1", b"junk").is_err());
    }
}
