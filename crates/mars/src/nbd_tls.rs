//! The NBD server's TLS and address settings (`nbd_tls`, `nbd_allow` in
//! `node.json`), read once when marsd starts. Every problem is a one-line
//! refusal to start naming the setting and the file.

use crate::node::{NbdTls, NbdTlsMode, NodeConfig};
use anyhow::{anyhow, bail, Result};
use mars_nbd::{AllowList, ServerOptions, Tls, TlsAcceptor};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What the NBD server offers and to whom, from the node's settings.
pub fn server_options(dir: &Path, cfg: &NodeConfig) -> Result<ServerOptions> {
    let allow = if cfg.nbd_allow.is_empty() {
        None
    } else {
        Some(AllowList::parse(&cfg.nbd_allow).map_err(|e| anyhow!("nbd_allow: {e}"))?)
    };
    let tls = match &cfg.nbd_tls {
        None => Tls::Off,
        Some(t) if t.mode == NbdTlsMode::Off => Tls::Off,
        Some(t) => {
            let acceptor = acceptor(dir, t)?;
            match t.mode {
                NbdTlsMode::Required => Tls::Required(acceptor),
                _ => Tls::Optional(acceptor),
            }
        }
    };
    Ok(ServerOptions { tls, allow })
}

/// One line for the start-up log: the TLS mode and the allow-list.
pub fn describe(cfg: &NodeConfig, options: &ServerOptions) -> String {
    let client_certs = cfg
        .nbd_tls
        .as_ref()
        .is_some_and(|t| t.client_ca.is_some() && t.mode != NbdTlsMode::Off);
    let mut s = format!("TLS {}", options.tls.mode_name());
    if client_certs {
        s.push_str(" (client certificates required)");
    }
    match &options.allow {
        None => s.push_str(", every client address"),
        Some(a) => s.push_str(&format!(", clients from {a}")),
    }
    s
}

fn acceptor(dir: &Path, t: &NbdTls) -> Result<TlsAcceptor> {
    let cert_path = dir.join(&t.cert);
    let chain = certificates("nbd_tls.cert", &cert_path)?;
    let key_path = dir.join(&t.key);
    let key = private_key("nbd_tls.key", &key_path)?;
    let client_ca = match &t.client_ca {
        None => None,
        Some(p) => Some(certificates("nbd_tls.client_ca", &dir.join(p))?),
    };
    let config = mars_nbd::tls::server_config(chain, key, client_ca).map_err(|e| {
        anyhow!(
            "nbd_tls: {} with {}: {e}",
            cert_path.display(),
            key_path.display()
        )
    })?;
    Ok(TlsAcceptor::from(config))
}

fn read(what: &str, path: &PathBuf) -> Result<(Vec<u8>, u32)> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| anyhow!("{what} {}: cannot open: {e}", path.display()))?;
    let mode = f
        .metadata()
        .map_err(|e| anyhow!("{what} {}: {e}", path.display()))?
        .permissions()
        .mode();
    let mut body = Vec::new();
    f.read_to_end(&mut body)
        .map_err(|e| anyhow!("{what} {}: cannot read: {e}", path.display()))?;
    Ok((body, mode))
}

fn certificates(what: &str, path: &PathBuf) -> Result<Vec<CertificateDer<'static>>> {
    let (body, _) = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&body)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{what} {}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{what} {}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

fn private_key(what: &str, path: &PathBuf) -> Result<PrivateKeyDer<'static>> {
    // The mode of the file opened, not of whatever the path names later.
    let (body, mode) = read(what, path)?;
    if mode & 0o007 != 0 {
        bail!(
            "{what} {}: the private key is accessible to other users (mode {:04o}); chmod o-rwx it (0600 or 0640)",
            path.display(),
            mode & 0o7777
        );
    }
    PrivateKeyDer::from_pem_slice(&body).map_err(|e| {
        anyhow!(
            "{what} {}: no usable PEM private key in it (PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}
