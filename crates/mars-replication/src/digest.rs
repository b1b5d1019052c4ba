//! Block digests of the full sync: a joining member sends the digest of each of
//! its blocks, the primary answers `Same` or the block.
//!
//! The digest names its algorithm (`xxh3-128:<32 hex>`); a digest without a name
//! is blake3 (`<64 hex>`, the first format, still answered). A primary that does
//! not know the named algorithm answers with the block: a slower sync, never a
//! wrong one.

use serde::{Deserialize, Serialize};

/// The algorithm a joining member uses (node setting `sync_digest`).
///
/// `xxh3-128` (the default) is a 128-bit non-cryptographic hash, about six times
/// faster than blake3 here: the chance that two different blocks look equal by
/// accident is 2^-128 per block; a deliberately crafted collision would need the
/// writer of the primary's data to know the joining member's old block. `blake3`
/// is for those who want the cryptographic guarantee (as DRBD's `csums-alg` and
/// MARS's digest settings leave the choice to the operator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncDigest {
    #[default]
    #[serde(rename = "xxh3-128")]
    Xxh3_128,
    #[serde(rename = "blake3")]
    Blake3,
}

const XXH3_PREFIX: &str = "xxh3-128:";

impl SyncDigest {
    /// The digest of `data`, as sent in `SyncBlock`.
    pub fn digest(self, data: &[u8]) -> String {
        match self {
            SyncDigest::Xxh3_128 => {
                format!("{XXH3_PREFIX}{:032x}", xxhash_rust::xxh3::xxh3_128(data))
            }
            SyncDigest::Blake3 => blake3::hash(data).to_hex().to_string(),
        }
    }
}

/// Whether `data` has the digest `digest` (any algorithm this node knows; false for
/// one it does not know, so that the block is sent).
pub fn matches(digest: &str, data: &[u8]) -> bool {
    if let Some(hex) = digest.strip_prefix(XXH3_PREFIX) {
        return hex.len() == 32 && SyncDigest::Xxh3_128.digest(data)[XXH3_PREFIX.len()..] == *hex;
    }
    if digest.len() == 64 && !digest.contains(':') {
        return SyncDigest::Blake3.digest(data) == digest;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_their_data_only() {
        let a = vec![7u8; 1 << 20];
        let mut b = a.clone();
        b[12345] ^= 1;
        for alg in [SyncDigest::Xxh3_128, SyncDigest::Blake3] {
            let d = alg.digest(&a);
            assert!(matches(&d, &a), "{alg:?}");
            assert!(!matches(&d, &b), "{alg:?}: a flipped bit");
        }
        assert!(SyncDigest::Xxh3_128.digest(&a).starts_with("xxh3-128:"));
        assert_eq!(SyncDigest::Blake3.digest(&a).len(), 64);
    }

    #[test]
    fn unknown_or_malformed_digests_never_match() {
        let a = vec![1u8; 4096];
        let x = SyncDigest::Xxh3_128.digest(&a);
        for d in [
            "",
            "sha1:abcd",
            "xxh3-128:",
            &x[..x.len() - 1],
            &format!("{x}0"),
            &"0".repeat(64),
            &SyncDigest::Blake3.digest(&a)[..63],
        ] {
            assert!(!matches(d, &a), "{d:?}");
        }
    }

    #[test]
    fn setting_names() {
        assert_eq!(
            serde_json::to_string(&SyncDigest::Xxh3_128).unwrap(),
            "\"xxh3-128\""
        );
        assert_eq!(
            serde_json::from_str::<SyncDigest>("\"blake3\"").unwrap(),
            SyncDigest::Blake3
        );
    }
}
