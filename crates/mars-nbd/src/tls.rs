//! TLS for NBD (`NBD_OPT_STARTTLS`), server side, with rustls and the `ring`
//! provider. The caller (marsd) reads the certificate files and hands the
//! parsed chain, key and optional client CA to [`server_config`].

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
pub use tokio_rustls::TlsAcceptor;

/// How a server treats TLS.
#[derive(Clone, Default)]
pub enum Tls {
    /// Plaintext only: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS when the client asks for it with `NBD_OPT_STARTTLS`, plaintext
    /// otherwise (SELECTIVETLS with no TLS-only export).
    Optional(TlsAcceptor),
    /// FORCEDTLS: before `NBD_OPT_STARTTLS` every option but `ABORT` is
    /// answered with `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME`
    /// closes the connection.
    Required(TlsAcceptor),
}

impl Tls {
    pub fn mode_name(&self) -> &'static str {
        match self {
            Tls::Off => "off",
            Tls::Optional(_) => "optional",
            Tls::Required(_) => "required",
        }
    }
}

/// The crypto provider of every TLS session of mars (NBD and peer links):
/// `ring` rather than aws-lc-rs (which builds with cmake, slowly; rustls
/// deprecated `ring` for lacking post-quantum key exchange, it is still a
/// maintained provider with X25519, P-256 and P-384), with AES-128-GCM
/// first, then AES-256-GCM, ChaCha20-Poly1305: a full sync moves every byte
/// of a disk through it, and AES-128 is the fastest of the three here.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

/// A rustls server configuration (TLS 1.2 and 1.3, [`provider`]): the certificate
/// chain (leaf first) and its key; with `client_ca`, every client must present
/// a certificate issued by one of those certificates.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<Vec<CertificateDer<'static>>>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => {
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots
                    .add(ca)
                    .map_err(|e| format!("client CA certificate: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(Arc::new(config))
}
