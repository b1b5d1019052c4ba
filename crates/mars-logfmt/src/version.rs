//! Logfile versions: a digest chained over all earlier logfiles.
//!
//! `version_N = blake3("mars-version-1" ++ prev_version ++ file_seq ++ start_pos ++ end_pos
//! ++ blake3(records of logfile N))`, integers little-endian. Two members that
//! applied exactly the same records in the same logfiles have equal versions;
//! any difference (a split brain) shows in every later version. Stored as JSON
//! in `version-<seq>-<node>` beside the logfile.

use serde::{Deserialize, Serialize};

/// The version of one finished logfile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub format: u16,
    pub logfile: String,
    pub file_seq: u64,
    pub start_pos: u64,
    pub end_pos: u64,
    /// blake3 of the record bytes of the logfile (after the file header), hex.
    pub records_digest: String,
    /// The previous logfile's version, hex (all zeroes for the first logfile).
    pub prev: String,
    /// This version, hex.
    pub version: String,
}

pub const ZERO_VERSION: [u8; 32] = [0; 32];

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Version {
    fn compute(
        prev: &[u8; 32],
        file_seq: u64,
        start_pos: u64,
        end_pos: u64,
        records: &[u8; 32],
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"mars-version-1");
        h.update(prev);
        h.update(&file_seq.to_le_bytes());
        h.update(&start_pos.to_le_bytes());
        h.update(&end_pos.to_le_bytes());
        h.update(records);
        *h.finalize().as_bytes()
    }

    /// Recompute the chained digest from the fields; false if the file was altered.
    pub fn is_consistent(&self) -> bool {
        match (
            unhex(&self.prev),
            unhex(&self.records_digest),
            unhex(&self.version),
        ) {
            (Some(p), Some(r), Some(v)) => {
                self.format == 1
                    && Self::compute(&p, self.file_seq, self.start_pos, self.end_pos, &r) == v
            }
            _ => false,
        }
    }

    pub fn digest(&self) -> Option<[u8; 32]> {
        unhex(&self.version)
    }

    pub fn to_json(&self) -> String {
        // Serialising a plain struct of strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    pub fn from_json(s: &str) -> Result<Version, String> {
        let v: Version = serde_json::from_str(s).map_err(|e| e.to_string())?;
        if !v.is_consistent() {
            return Err("version digest does not match its fields".into());
        }
        Ok(v)
    }
}

/// Builds a [`Version`] from the records of one logfile, fed in order.
pub struct VersionBuilder {
    hasher: blake3::Hasher,
}

impl Default for VersionBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl VersionBuilder {
    pub fn new() -> Self {
        VersionBuilder {
            hasher: blake3::Hasher::new(),
        }
    }
    pub fn update(&mut self, record_bytes: &[u8]) {
        self.hasher.update(record_bytes);
    }
    pub fn finish(
        self,
        prev: Option<&Version>,
        logfile: &str,
        file_seq: u64,
        start_pos: u64,
        end_pos: u64,
    ) -> Version {
        let prev_digest = prev.and_then(|p| p.digest()).unwrap_or(ZERO_VERSION);
        let records = *self.hasher.finalize().as_bytes();
        let v = Version::compute(&prev_digest, file_seq, start_pos, end_pos, &records);
        Version {
            format: 1,
            logfile: logfile.to_string(),
            file_seq,
            start_pos,
            end_pos,
            records_digest: hex(&records),
            prev: hex(&prev_digest),
            version: hex(&v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn chain_differs_on_any_change() {
        let mk = |data: &[u8], prev: Option<&Version>| {
            let mut b = VersionBuilder::new();
            b.update(data);
            b.finish(prev, "log-000000001-a", 1, 0, data.len() as u64)
        };
        let a1 = mk(b"hello", None);
        let b1 = mk(b"hello", None);
        assert_eq!(a1, b1);
        let a2 = mk(b"world", Some(&a1));
        let c1 = mk(b"hellO", None);
        let c2 = mk(b"world", Some(&c1));
        assert_ne!(a2.version, c2.version, "history difference propagates");
        assert!(a2.is_consistent());
        let parsed = Version::from_json(&a2.to_json()).unwrap();
        assert_eq!(parsed, a2);
        let tampered = a2.to_json().replace(&a2.records_digest, &c1.records_digest);
        assert!(Version::from_json(&tampered).is_err());
    }
}
