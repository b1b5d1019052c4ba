//! The store file.
//!
//! Layout (format version 2), all integers little-endian:
//!
//! | offset     | size | content                                        |
//! |------------|------|------------------------------------------------|
//! | 0          | 8    | magic `MARSMETA`                               |
//! | 8          | 4    | format version (2)                             |
//! | 12         | 8    | body length `n`                                |
//! | 20         | n    | body: JSON `{"clock": u64, "entries": [[key, entry], ...]}` |
//! | 20 + n     | 4    | crc32c of bytes `0 .. 20 + n`                  |
//!
//! The file is replaced crash-safely (temp file, fsync, rename, fsync dir).

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Entry, MetaError, Store};

/// Version of the file format written by [`Store::save`].
/// 2: keys name resource incarnations and nodes with their ids
/// (`c/d/res/<name>@<id>`, see `schema`); a store of version 1 is refused.
pub const FORMAT_VERSION: u32 = 2;

const MAGIC: &[u8; 8] = b"MARSMETA";
const HEADER: usize = 20;
const TRAILER: usize = 4;

#[derive(Serialize)]
struct BodyRef<'a> {
    clock: u64,
    entries: Vec<(&'a str, &'a Entry)>,
}

#[derive(Deserialize)]
struct Body {
    clock: u64,
    entries: Vec<(String, Entry)>,
}

impl Store {
    /// Writes the whole store (clock and entries, tombstones included) to
    /// `path`, replacing it crash-safely.
    pub fn save(&self, path: &Path) -> Result<(), MetaError> {
        let body = BodyRef {
            clock: self.clock(),
            entries: self.range("").collect(),
        };
        let body = serde_json::to_vec(&body).map_err(|e| MetaError::Io {
            path: path.to_path_buf(),
            source: io::Error::other(e),
        })?;
        let mut out = Vec::with_capacity(HEADER + body.len() + TRAILER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        mars_logger::crashsafe::write_private(path, &out).map_err(|source| MetaError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a store saved by [`Store::save`], for node `node`. A missing
    /// file gives an empty store; a damaged file or one of another format
    /// version gives an error naming the file. Never panics.
    pub fn load(path: &Path, node: &str) -> Result<Store, MetaError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Store::new(node)),
            Err(source) => {
                return Err(MetaError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        decode(&bytes, node).map_err(|e| match e {
            Damage::Corrupt(reason) => MetaError::Corrupt {
                path: path.to_path_buf(),
                reason,
            },
            Damage::Version(version) => MetaError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            },
        })
    }
}

enum Damage {
    Corrupt(String),
    Version(u32),
}

fn decode(bytes: &[u8], node: &str) -> Result<Store, Damage> {
    let truncated = || {
        Damage::Corrupt(format!(
            "truncated: {} bytes, shorter than the {}-byte header and trailer",
            bytes.len(),
            HEADER + TRAILER
        ))
    };
    if bytes.len() < MAGIC.len() {
        return Err(truncated());
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(Damage::Corrupt("bad magic, not a mars-meta file".into()));
    }
    if bytes.len() < HEADER + TRAILER {
        return Err(truncated());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(Damage::Version(version));
    }
    let body_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let expected = usize::try_from(body_len)
        .ok()
        .and_then(|n| n.checked_add(HEADER + TRAILER));
    if expected != Some(bytes.len()) {
        return Err(Damage::Corrupt(format!(
            "length mismatch: header announces a {body_len}-byte body, file has {} bytes \
             (truncated or overwritten)",
            bytes.len()
        )));
    }
    let end = bytes.len() - TRAILER;
    let stored = u32::from_le_bytes(bytes[end..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[..end]);
    if stored != computed {
        return Err(Damage::Corrupt(format!(
            "checksum mismatch: stored crc32c {stored:08x}, computed {computed:08x}"
        )));
    }
    let body: Body = serde_json::from_slice(&bytes[HEADER..end])
        .map_err(|e| Damage::Corrupt(format!("undecodable body: {e}")))?;
    Store::from_parts(node, body.clock, body.entries).map_err(Damage::Corrupt)
}
