//! Sealed gossip datagrams: the membership protocol's UDP packets are
//! encrypted and authenticated with the cluster's gossip key (XChaCha20-
//! Poly1305: 192-bit random nonces, so a key needs no counter and no
//! rotation for nonce reuse). A keyring holds several keys so that one can
//! be rotated without downtime, as Serf and Consul do: install a new key on
//! every node, make it the one used for sending, remove the old one.
//!
//! ```text
//!  0 "MRSG"   4 u16 protocol version   6 u16 format (2)   8 u32 key id
//! 12 24-byte nonce   36 ciphertext of the payload, then a 16-byte tag
//! ```
//! (little-endian). The header (bytes 0..36) is the associated data. The
//! key id is the first 4 bytes of blake3(key): a receiver picks the key by
//! it, no trial decryption.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::collections::BTreeMap;

pub const MAGIC: [u8; 4] = *b"MRSG";
pub const FORMAT: u16 = 2;
pub const HEADER: usize = 36;
pub const TAG: usize = 16;
pub const KEY_LEN: usize = 32;

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not a mars datagram (magic), or shorter than a header and a tag.
    NotMars,
    /// Another protocol version or datagram format.
    Version,
    /// Sealed with a key this node does not hold.
    UnknownKey,
    /// The tag does not match: forged, damaged, or of another cluster.
    Forged,
}

/// The first 4 bytes of blake3(key).
pub fn key_id(key: &[u8; KEY_LEN]) -> u32 {
    let h = blake3::hash(key);
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The keys a node holds, and the one it seals with.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<u32, [u8; KEY_LEN]>,
    primary: Option<u32>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("Keyring")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("primary", &self.primary)
            .finish()
    }
}

impl Keyring {
    pub fn new(keys: Vec<[u8; KEY_LEN]>, primary: Option<u32>) -> Keyring {
        let keys: BTreeMap<u32, [u8; KEY_LEN]> =
            keys.into_iter().map(|k| (key_id(&k), k)).collect();
        let primary = primary.filter(|p| keys.contains_key(p));
        Keyring { keys, primary }
    }

    /// This ring sealing with `id` (if it holds that key).
    pub fn with_primary(mut self, id: u32) -> Keyring {
        if self.keys.contains_key(&id) {
            self.primary = Some(id);
        }
        self
    }

    pub fn primary(&self) -> Option<u32> {
        self.primary
    }

    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Seal `payload` with the primary key (None: no primary key).
    pub fn seal(&self, version: u16, payload: &[u8]) -> Option<Vec<u8>> {
        let id = self.primary?;
        let key = self.keys.get(&id)?;
        let nonce: [u8; 24] = rand::random();
        let mut d = Vec::with_capacity(HEADER + payload.len() + TAG);
        d.extend_from_slice(&MAGIC);
        d.extend_from_slice(&version.to_le_bytes());
        d.extend_from_slice(&FORMAT.to_le_bytes());
        d.extend_from_slice(&id.to_le_bytes());
        d.extend_from_slice(&nonce);
        let sealed = XChaCha20Poly1305::new(key.into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: payload,
                    aad: &d[..HEADER],
                },
            )
            .ok()?;
        d.extend_from_slice(&sealed);
        Some(d)
    }

    /// The payload of a datagram sealed with a key of this ring.
    pub fn open(&self, version: u16, d: &[u8]) -> Result<Vec<u8>, Drop> {
        if d.len() < HEADER + TAG || d[0..4] != MAGIC {
            return Err(Drop::NotMars);
        }
        let u16_at = |i: usize| u16::from_le_bytes([d[i], d[i + 1]]);
        if u16_at(4) != version || u16_at(6) != FORMAT {
            return Err(Drop::Version);
        }
        let id = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
        let key = self.keys.get(&id).ok_or(Drop::UnknownKey)?;
        XChaCha20Poly1305::new(key.into())
            .decrypt(
                XNonce::from_slice(&d[12..HEADER]),
                Payload {
                    msg: &d[HEADER..],
                    aad: &d[..HEADER],
                },
            )
            .map_err(|_| Drop::Forged)
    }
}

/// Parse a key as `keyring` commands show it (64 hex digits).
pub fn parse_key(s: &str) -> Option<[u8; KEY_LEN]> {
    let s = s.trim();
    if s.len() != 2 * KEY_LEN {
        return None;
    }
    let mut k = [0u8; KEY_LEN];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

pub fn key_text(k: &[u8; KEY_LEN]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sealed_datagrams_open_with_the_ring_only() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let old = Keyring::new(vec![a], Some(key_id(&a)));
        let both = Keyring::new(vec![a, b], Some(key_id(&b)));
        let d = old.seal(5, b"hello").unwrap();
        assert_eq!(both.open(5, &d).unwrap(), b"hello");
        let d2 = both.seal(5, b"new").unwrap();
        assert_eq!(old.open(5, &d2), Err(Drop::UnknownKey));
        assert_eq!(both.open(6, &d), Err(Drop::Version));
        let mut bad = d.clone();
        bad[HEADER] ^= 1;
        assert_eq!(both.open(5, &bad), Err(Drop::Forged));
        let mut bad = d.clone();
        bad[13] ^= 1; // the nonce is authenticated too
        assert_eq!(both.open(5, &bad), Err(Drop::Forged));
        assert_eq!(both.open(5, b"MRSG"), Err(Drop::NotMars));
        assert!(Keyring::default().seal(5, b"x").is_none());
        let unheld = Keyring::new(vec![a, b], Some(0xdead_beef));
        assert_eq!(unheld.primary(), None);
        assert_eq!(unheld.with_primary(key_id(&a)).primary(), Some(key_id(&a)));
        assert_eq!(
            old.clone().with_primary(key_id(&b)).primary(),
            Some(key_id(&a))
        );
        assert!(!format!("{both:?}").contains("0101"));
    }

    #[test]
    fn keys_parse_and_print() {
        let k = [0xabu8; 32];
        assert_eq!(parse_key(&key_text(&k)), Some(k));
        assert_eq!(parse_key("abc"), None);
        assert_eq!(parse_key(&"zz".repeat(32)), None);
    }

    proptest! {
        /// Any bytes: `open` answers, never panics.
        #[test]
        fn open_never_panics(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let r = Keyring::new(vec![[7u8; 32]], None);
            let _ = r.open(5, &d);
        }
    }
}
