//! Logfile versions: a digest chained over all earlier logfiles.
//!
//! Format 2 (written): `version_N = blake3("mars-version-2" ++ prev_version ++ file_seq
//! ++ start_pos ++ end_pos ++ records_digest)` with `records_digest` the blake3 of the
//! 64-byte headers of logfile N's records, in order. Every header holds the crc32c of
//! the header and its payload, so the payloads are covered through their checksums:
//! hashing 64 bytes per record instead of the whole record took a fifth of the
//! daemon's CPU time on sequential writes. Format 1 (read only): the same with
//! "mars-version-1" and the blake3 of the record bytes (headers and payloads).
//! Integers little-endian. Two members that applied exactly the same records in the
//! same logfiles have equal versions; any difference (a split brain) shows in every
//! later version. Stored as JSON in `version-<seq>-<node>` beside the logfile.

use serde::{Deserialize, Serialize};

use crate::RECORD_HEADER_LEN;

/// The version of one finished logfile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub format: u16,
    pub logfile: String,
    pub file_seq: u64,
    pub start_pos: u64,
    pub end_pos: u64,
    /// blake3 of the logfile's record headers (format 2; of its record bytes in
    /// format 1), hex.
    pub records_digest: String,
    /// The previous logfile's version, hex (all zeroes for the first logfile).
    pub prev: String,
    /// This version, hex.
    pub version: String,
}

pub const ZERO_VERSION: [u8; 32] = [0; 32];

/// The version format written.
pub const VERSION_FORMAT: u16 = 2;

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
        format: u16,
        prev: &[u8; 32],
        file_seq: u64,
        start_pos: u64,
        end_pos: u64,
        records: &[u8; 32],
    ) -> [u8; 32] {
        // A logfile without records adds nothing to the history: its version
        // is the one before it, so that two ways through the same records
        // (one of them passing an empty logfile that a writer's restart or a
        // short reign left) have one version.
        if start_pos == end_pos {
            return *prev;
        }
        Self::compute_hashed(format, prev, file_seq, start_pos, end_pos, records)
    }

    /// The digest by the formula, also for a logfile without records (the
    /// version files of empty logfiles written before 2026-12-07 hold it).
    fn compute_hashed(
        format: u16,
        prev: &[u8; 32],
        file_seq: u64,
        start_pos: u64,
        end_pos: u64,
        records: &[u8; 32],
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(if format == 1 {
            b"mars-version-1"
        } else {
            b"mars-version-2"
        });
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
                let args = (
                    self.format,
                    &p,
                    self.file_seq,
                    self.start_pos,
                    self.end_pos,
                    &r,
                );
                matches!(self.format, 1 | 2)
                    && (Self::compute(args.0, args.1, args.2, args.3, args.4, args.5) == v
                        // An empty logfile's version written before the
                        // empty-logfile rule (2026-12-07): still valid.
                        || (self.start_pos == self.end_pos
                            && Self::compute_hashed(args.0, args.1, args.2, args.3, args.4, args.5)
                                == v))
            }
            _ => false,
        }
    }

    /// The digest the next logfile chains on. A logfile without records is
    /// transparent: its `prev` (equal to `version` when written since
    /// 2026-12-07; an older version file of an empty logfile holds the old
    /// formula's digest, which no new chain may depend on).
    /// A stand-in whose digest, for chaining the next version on, is `prev`
    /// (hex): the version before a logfile as another member computed it.
    pub fn chained_on(prev: &str) -> Version {
        Version {
            format: VERSION_FORMAT,
            logfile: String::new(),
            file_seq: 0,
            start_pos: 0,
            end_pos: 0,
            records_digest: hex(&ZERO_VERSION),
            prev: prev.to_string(),
            version: prev.to_string(),
        }
    }

    pub fn digest(&self) -> Option<[u8; 32]> {
        if self.start_pos == self.end_pos {
            return unhex(&self.prev);
        }
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

/// Builds a [`Version`] from the record headers of one logfile, fed in order.
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
    /// The next record's header, exactly as encoded (with its checksum).
    pub fn add_record(&mut self, header: &[u8; RECORD_HEADER_LEN]) {
        self.hasher.update(header);
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
        let v = Version::compute(
            VERSION_FORMAT,
            &prev_digest,
            file_seq,
            start_pos,
            end_pos,
            &records,
        );
        Version {
            format: VERSION_FORMAT,
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
    use crate::{Kind, RecordHeader};

    /// The header of a write record of `data` at position 0.
    fn header(data: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        let h = RecordHeader {
            kind: Kind::Write,
            seq: 1,
            pos: 0,
            offset: 4096,
            length: data.len() as u64,
            stamp_ns: 7,
            durable_back: 0,
        };
        let mut out = Vec::new();
        h.encode_into(data, &mut out);
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        hdr.copy_from_slice(&out[..RECORD_HEADER_LEN]);
        hdr
    }

    #[test]
    fn chain_differs_on_any_change() {
        let mk = |data: &[u8], prev: Option<&Version>| {
            let mut b = VersionBuilder::new();
            b.add_record(&header(data));
            b.finish(prev, "log-000000001-a", 1, 0, 64 + data.len() as u64)
        };
        let a1 = mk(b"hello", None);
        let b1 = mk(b"hello", None);
        assert_eq!(a1, b1);
        assert_eq!(a1.format, 2);
        let a2 = mk(b"world", Some(&a1));
        // A payload differing in one byte changes the header's checksum, so the digest.
        let c1 = mk(b"hellO", None);
        assert_ne!(a1.records_digest, c1.records_digest);
        let c2 = mk(b"world", Some(&c1));
        assert_ne!(a2.version, c2.version, "history difference propagates");
        assert!(a2.is_consistent());
        let parsed = Version::from_json(&a2.to_json()).unwrap();
        assert_eq!(parsed, a2);
        let tampered = a2.to_json().replace(&a2.records_digest, &c1.records_digest);
        assert!(Version::from_json(&tampered).is_err());
        // Another format number does not verify with this format's digest.
        let mut other = a2.clone();
        other.format = 1;
        assert!(!other.is_consistent());
        other.format = 3;
        assert!(!other.is_consistent());
    }

    /// Red team (session 17): a version file of an empty logfile written
    /// before 2026-12-07 (every writer restart left one: recovery versions the
    /// empty logfile it opened) holds the digest of the formula without the
    /// empty-logfile rule. It must still verify after an upgrade (else
    /// `read_version` fails and the node's recovery refuses to start), and it
    /// must chain as the new rule does (the logfile after it has the version
    /// it would have had without the empty logfile).
    #[test]
    fn an_empty_logfiles_version_written_before_the_empty_rule_still_verifies() {
        let prev = *blake3::hash(b"the version before").as_bytes();
        let records = *blake3::hash(b"").as_bytes();
        // The formula as it was (no shortcut for start == end).
        let mut h = blake3::Hasher::new();
        h.update(b"mars-version-2");
        h.update(&prev);
        h.update(&2u64.to_le_bytes());
        h.update(&500u64.to_le_bytes());
        h.update(&500u64.to_le_bytes());
        h.update(&records);
        let old = Version {
            format: 2,
            logfile: "log-000000002-a".into(),
            file_seq: 2,
            start_pos: 500,
            end_pos: 500,
            records_digest: hex(&records),
            prev: hex(&prev),
            version: hex(h.finalize().as_bytes()),
        };
        let parsed = Version::from_json(&old.to_json());
        assert!(parsed.is_ok(), "{parsed:?}");
        // Transparent in the chain like a new one.
        assert_eq!(old.digest(), Some(prev));
        // Any other digest of an empty logfile is still refused.
        let mut tampered = old.clone();
        tampered.version = hex(&[7u8; 32]);
        assert!(!tampered.is_consistent());
    }

    #[test]
    fn format_1_versions_still_verify() {
        // Written by format-1 code: the digest tag was "mars-version-1".
        let prev = ZERO_VERSION;
        let records = *blake3::hash(b"records").as_bytes();
        let v = Version {
            format: 1,
            logfile: "log-000000001-a".into(),
            file_seq: 1,
            start_pos: 0,
            end_pos: 69,
            records_digest: hex(&records),
            prev: hex(&prev),
            version: hex(&Version::compute(1, &prev, 1, 0, 69, &records)),
        };
        assert!(Version::from_json(&v.to_json()).is_ok());
    }
}
