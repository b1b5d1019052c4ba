//! Record and logfile header encoding.

use thiserror::Error;

/// Format version written into every file header and record header.
/// History: 1 = first format (2026-11); 2 = record bytes 56..60 hold
/// `durable_back` (2026-11-27; version 1 has zero there, which means the same:
/// "everything before this record was durable").
pub const FORMAT_VERSION: u16 = 2;
/// Format version of the logfile header written now. History: 1 and 2 as
/// [`FORMAT_VERSION`]; 3 = bytes 12..16 and 56..60 hold the `parent` link
/// (2026-12-06). Older headers read with `parent` 0 (unknown).
pub const FILE_FORMAT_VERSION: u16 = 3;
/// Oldest format version this build reads.
pub const FORMAT_VERSION_MIN: u16 = 1;

/// `"MRSL"` read as little-endian u32: starts every record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"MRSL");
/// Starts every logfile.
pub const FILE_MAGIC: [u8; 8] = *b"MARSLOG\0";

pub const RECORD_HEADER_LEN: usize = 64;
pub const FILE_HEADER_LEN: usize = 64;
/// Largest payload of one record (the NBD maximum request size).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What a record does to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// `length` bytes of payload to write at `offset`.
    Write = 1,
    /// Discard `[offset, offset+length)`: reads return zeroes afterwards.
    Trim = 2,
    /// Write zeroes to `[offset, offset+length)`.
    WriteZeroes = 3,
}

impl Kind {
    pub fn from_u16(v: u16) -> Option<Kind> {
        match v {
            1 => Some(Kind::Write),
            2 => Some(Kind::Trim),
            3 => Some(Kind::WriteZeroes),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::Trim => "trim",
            Kind::WriteZeroes => "write-zeroes",
        }
    }
}

/// Why bytes did not decode.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("short buffer: need {need} bytes, have {have}")]
    Short { need: usize, have: usize },
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported format version {0} (this build reads versions {FORMAT_VERSION_MIN} to {FORMAT_VERSION})")]
    BadVersion(u16),
    #[error("unknown record kind {0}")]
    BadKind(u16),
    #[error("inconsistent lengths: kind {kind:?} length {length} payload {payload_len}")]
    BadLength {
        kind: Kind,
        length: u64,
        payload_len: u32,
    },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error(
        "record out of place: has pos {found_pos} seq {found_seq}, expected pos {pos} seq {seq}"
    )]
    OutOfPlace {
        found_pos: u64,
        found_seq: u64,
        pos: u64,
        seq: u64,
    },
    #[error("reserved field at byte {0} is not zero (written by a newer format?)")]
    Reserved(usize),
    #[error("bad header length {0}")]
    BadHeaderLen(u32),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One record header. Byte layout (little-endian, 64 bytes):
///
/// ```text
///  0 u32 magic "MRSL"      4 u16 format version    6 u16 kind
///  8 u64 seq (record number in the resource, from 1)
/// 16 u64 pos (byte position of this record in the log stream)
/// 24 u64 offset (disk byte offset)       32 u64 length (disk bytes affected)
/// 40 u32 payload_len (= length for Write, else 0)
/// 44 u32 flags (0; reserved)             48 u64 stamp_ns (wall clock when logged)
/// 56 u32 durable_back (version 2; 0 in version 1)
///                                         60 u32 crc32c(bytes 0..60 ++ payload)
/// ```
///
/// `durable_back`: when the writer wrote this record, the log was durable
/// (fdatasync'ed) at least up to stream position `pos - durable_back`. Recovery
/// uses it to tell a torn tail from corruption when the writer has several
/// writes in flight at once (docs/FORMAT.md, "Torn tail or corruption").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: Kind,
    pub seq: u64,
    pub pos: u64,
    pub offset: u64,
    pub length: u64,
    pub stamp_ns: u64,
    /// The log was durable up to `pos - durable_back` when this record was written.
    pub durable_back: u32,
}

impl RecordHeader {
    /// Stream position up to which the log was durable when this record was written.
    pub fn durable_point(&self) -> u64 {
        self.pos.saturating_sub(self.durable_back as u64)
    }

    pub fn payload_len(&self) -> u32 {
        match self.kind {
            Kind::Write => self.length as u32,
            _ => 0,
        }
    }
    /// Bytes this record occupies in the stream (header + payload).
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.payload_len() as u64
    }

    /// Append header and payload to `out`. `payload` must be `payload_len()` long.
    pub fn encode_into(&self, payload: &[u8], out: &mut Vec<u8>) {
        assert_eq!(payload.len(), self.payload_len() as usize, "payload length");
        let start = out.len();
        out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.kind as u16).to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.pos.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.payload_len().to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.stamp_ns.to_le_bytes());
        out.extend_from_slice(&self.durable_back.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 60]), payload);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(payload);
    }

    /// Decode and sanity-check a header (not the checksum: that needs the payload).
    pub fn decode(b: &[u8]) -> Result<(RecordHeader, u32), DecodeError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Short {
                need: RECORD_HEADER_LEN,
                have: b.len(),
            });
        }
        let magic = u32_at(b, 0);
        if magic != RECORD_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = u16_at(b, 4);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(DecodeError::BadVersion(version));
        }
        let kind_raw = u16_at(b, 6);
        let kind = Kind::from_u16(kind_raw).ok_or(DecodeError::BadKind(kind_raw))?;
        let h = RecordHeader {
            kind,
            seq: u64_at(b, 8),
            pos: u64_at(b, 16),
            offset: u64_at(b, 24),
            length: u64_at(b, 32),
            stamp_ns: u64_at(b, 48),
            durable_back: u32_at(b, 56),
        };
        if u32_at(b, 44) != 0 {
            return Err(DecodeError::Reserved(44));
        }
        if version == 1 && h.durable_back != 0 {
            return Err(DecodeError::Reserved(56));
        }
        let payload_len = u32_at(b, 40);
        let ok = match kind {
            Kind::Write => h.length == payload_len as u64 && payload_len <= MAX_PAYLOAD,
            Kind::Trim | Kind::WriteZeroes => payload_len == 0,
        } && h.offset.checked_add(h.length).is_some();
        if !ok {
            return Err(DecodeError::BadLength {
                kind,
                length: h.length,
                payload_len,
            });
        }
        Ok((h, u32_at(b, 60)))
    }

    /// Check the stored checksum against header bytes and payload.
    pub fn verify(header_bytes: &[u8], stored: u32, payload: &[u8]) -> Result<(), DecodeError> {
        if header_bytes.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Short {
                need: RECORD_HEADER_LEN,
                have: header_bytes.len(),
            });
        }
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header_bytes[..60]), payload);
        if computed != stored {
            return Err(DecodeError::BadChecksum { stored, computed });
        }
        Ok(())
    }

    /// Decode a whole record (header + payload) from the start of `b`.
    pub fn decode_record(b: &[u8]) -> Result<(RecordHeader, &[u8]), DecodeError> {
        let (h, crc) = Self::decode(b)?;
        let end = RECORD_HEADER_LEN + h.payload_len() as usize;
        if b.len() < end {
            return Err(DecodeError::Short {
                need: end,
                have: b.len(),
            });
        }
        let payload = &b[RECORD_HEADER_LEN..end];
        Self::verify(b, crc, payload)?;
        Ok((h, payload))
    }
}

/// The header at the start of every logfile. Byte layout (little-endian, 64 bytes):
///
/// ```text
///  0 [u8;8] magic "MARSLOG\0"   8 u16 format version   10 u16 header length (64)
/// 12 u32 parent, low half (format 3; 0 before)   16 u64 file seq (the <seq> of the name)
/// 24 u64 start_pos (stream position of the first record)
/// 32 u64 start_record_seq (seq of the first record)
/// 40 u64 created_ns            48 u64 resource id (random, fixed at create-resource)
/// 56 u32 parent, high half (format 3; 0 before)   60 u32 crc32c(bytes 0..60)
/// ```
///
/// `parent` names the history this logfile continues: [`parent_link`] of the
/// header of the logfile whose records up to `start_pos` came before this
/// logfile's first record. 0: none (the log's first logfile, at position 0) or
/// unknown (a format-1/2 header, or a writer that had no logfile of the
/// history before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub file_seq: u64,
    pub start_pos: u64,
    pub start_record_seq: u64,
    pub created_ns: u64,
    pub resource_id: u64,
    /// The history this logfile continues ([`parent_link`]); 0 = none or unknown.
    pub parent: u64,
}

/// The link a logfile starting at `at` stores to name the logfile (by its whole
/// 64-byte header, `parent_header`) whose records before `at` it continues:
/// the first 8 bytes of `blake3("mars-parent-3" ‖ parent_header ‖ at)`, never 0.
///
/// A header is unique to one logfile of one writer (it holds the creation time
/// in nanoseconds, the sequence number and start position), and a writer
/// writes each position of its logfile once; so equal links mean the same
/// records up to `at`, by induction over the chain of links. 64 bits tell
/// histories apart by accident (no defence against crafted logfiles, like
/// versions).
pub fn parent_link(parent_header: &[u8; FILE_HEADER_LEN], at: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"mars-parent-3");
    h.update(parent_header);
    h.update(&at.to_le_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_bytes()[..8]);
    u64::from_le_bytes(b).max(1)
}

/// The link the logfile after `header`'s, starting at `at`, stores: the
/// [`parent_link`] of that logfile, or, when it holds no records (it starts
/// at `at` itself), the link it stores: an empty logfile passes its parent on,
/// so that whoever lacks it (a writer's restart left it; a former primary
/// never sent it) still finds the logfile the records before `at` are in.
pub fn next_link(header: &[u8; FILE_HEADER_LEN], at: u64) -> u64 {
    match FileHeader::decode(header) {
        Ok(h) if h.start_pos == at && h.parent != 0 => h.parent,
        _ => parent_link(header, at),
    }
}

impl FileHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&FILE_MAGIC);
        b[8..10].copy_from_slice(&FILE_FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(FILE_HEADER_LEN as u16).to_le_bytes());
        b[12..16].copy_from_slice(&(self.parent as u32).to_le_bytes());
        b[56..60].copy_from_slice(&((self.parent >> 32) as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.file_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.start_pos.to_le_bytes());
        b[32..40].copy_from_slice(&self.start_record_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.created_ns.to_le_bytes());
        b[48..56].copy_from_slice(&self.resource_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<FileHeader, DecodeError> {
        if b.len() < FILE_HEADER_LEN {
            return Err(DecodeError::Short {
                need: FILE_HEADER_LEN,
                have: b.len(),
            });
        }
        if b[0..8] != FILE_MAGIC {
            return Err(DecodeError::BadMagic(u32_at(b, 0)));
        }
        let version = u16_at(b, 8);
        if !(FORMAT_VERSION_MIN..=FILE_FORMAT_VERSION).contains(&version) {
            return Err(DecodeError::BadVersion(version));
        }
        let hlen = u16_at(b, 10) as u32;
        if hlen as usize != FILE_HEADER_LEN {
            return Err(DecodeError::BadHeaderLen(hlen));
        }
        let stored = u32_at(b, 60);
        let computed = crc32c::crc32c(&b[..60]);
        if stored != computed {
            return Err(DecodeError::BadChecksum { stored, computed });
        }
        let parent = if version >= 3 {
            u32_at(b, 12) as u64 | (u32_at(b, 56) as u64) << 32
        } else {
            for at in [12, 56] {
                if u32_at(b, at) != 0 {
                    return Err(DecodeError::Reserved(at));
                }
            }
            0
        };
        Ok(FileHeader {
            parent,
            file_seq: u64_at(b, 16),
            start_pos: u64_at(b, 24),
            start_record_seq: u64_at(b, 32),
            created_ns: u64_at(b, 40),
            resource_id: u64_at(b, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Write), Just(Kind::Trim), Just(Kind::WriteZeroes)]
    }

    proptest! {
        #[test]
        fn record_round_trip(kind in kind_strategy(), seq: u64, pos: u64, offset in 0u64..1<<50,
                             len in 0u64..5000, stamp: u64, back: u32, fill: u8) {
            let h = RecordHeader { kind, seq, pos, offset, length: len, stamp_ns: stamp, durable_back: back };
            let payload = vec![fill; h.payload_len() as usize];
            let mut out = Vec::new();
            h.encode_into(&payload, &mut out);
            prop_assert_eq!(out.len() as u64, h.total_len());
            let (d, p) = RecordHeader::decode_record(&out).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn any_single_bit_flip_is_detected(len in 1u64..300, bit in 0usize..8*(64+300)) {
            let h = RecordHeader { kind: Kind::Write, seq: 7, pos: 99, offset: 4096, length: len, stamp_ns: 1, durable_back: 3 };
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            h.encode_into(&payload, &mut out);
            let bit = bit % (out.len() * 8);
            out[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(RecordHeader::decode_record(&out).is_err());
        }

        /// A link names one header at one position: any other header or position
        /// gives another link (64 bits: a collision here would be a failed test).
        #[test]
        fn parent_links_tell_headers_and_positions_apart(seq: u64, start: u64, created: u64,
                                                        at: u64, bit in 0usize..60*8) {
            let h = FileHeader { file_seq: seq, start_pos: start, start_record_seq: 1,
                                 created_ns: created, resource_id: 9, parent: 0 }.encode();
            let link = parent_link(&h, at);
            prop_assert_ne!(link, 0);
            prop_assert_ne!(link, parent_link(&h, at ^ 1));
            let mut other = h;
            other[bit / 8] ^= 1 << (bit % 8);
            prop_assert_ne!(link, parent_link(&other, at));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RecordHeader::decode_record(&bytes);
            let _ = FileHeader::decode(&bytes);
        }
    }

    fn sample_header(parent: u64) -> FileHeader {
        FileHeader {
            file_seq: 3,
            start_pos: 1000,
            start_record_seq: 17,
            created_ns: 5,
            resource_id: 0xfeed,
            parent,
        }
    }

    /// Format-2 headers (reserved bytes zero) still read, with no parent; a
    /// format-2 header with reserved bytes set is refused.
    #[test]
    fn format_2_headers_read_with_unknown_parent() {
        let h = sample_header(0);
        let mut b = h.encode();
        b[8..10].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FileHeader::decode(&b).unwrap(), h);
        b[13] = 1;
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(FileHeader::decode(&b), Err(DecodeError::Reserved(12)));
    }

    #[test]
    fn file_header_round_trip_and_flip() {
        let h = sample_header(0x1234_5678_9abc_def0);
        let mut b = h.encode();
        assert_eq!(FileHeader::decode(&b).unwrap(), h);
        assert_eq!(u16_at(&b, 8), FILE_FORMAT_VERSION);
        b[20] ^= 4;
        assert!(matches!(
            FileHeader::decode(&b),
            Err(DecodeError::BadChecksum { .. })
        ));
    }
}
