use std::io;
use std::path::PathBuf;

use crate::FORMAT_VERSION;

/// Errors of the metadata store. File errors always name the file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A local write used a malformed key (see [`crate::validate_key`]).
    #[error("invalid metadata key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("metadata file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metadata file {} is damaged: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "metadata file {} has unsupported format version {version} (this build reads version {})",
        path.display(),
        FORMAT_VERSION
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },
}
