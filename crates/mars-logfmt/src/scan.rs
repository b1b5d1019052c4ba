//! Scanning a whole logfile: which records are good, and where (and how) it is damaged.
//!
//! Recovery policy: a bad record is *corruption* (an incident: reported, never
//! applied, never cut silently) when a valid record after it says that the log
//! was durable beyond the bad record's position when it was written (its
//! `durable_point`). Otherwise it is a *torn tail*: writes cut short by a crash
//! (the writer has several writes in flight, so a crash can leave a later one
//! written and an earlier one not: a hole followed by valid records), none of
//! which can have been acknowledged as durable; cut off on recovery. Records of
//! format version 1 say "everything before me was durable", so with them any
//! valid record after a bad one makes it corruption, as before.
//!
//! A valid record is one at its place: its `pos` says where in the file it
//! lies (`start_pos` + offset after the file header). A recycled logfile (see
//! `docs/FORMAT.md`) holds the records of its earlier use after the end of the
//! log; they verify by checksum but never lie at their place, so they end the
//! log like any other torn tail.

use crate::record::{
    DecodeError, FileHeader, RecordHeader, FILE_HEADER_LEN, RECORD_HEADER_LEN, RECORD_MAGIC,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedRecord {
    pub header: RecordHeader,
    /// Byte offset of the record header inside the file.
    pub file_offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// Incomplete or invalid last record(s), nothing valid after: a crash cut the write.
    TornTail,
    /// A bad record with valid records after it.
    Corrupt,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub kind: DamageKind,
    /// File offset of the first bad byte.
    pub file_offset: u64,
    /// Log stream position that the bad record should have had.
    pub pos: u64,
    /// Human-readable reason (the decode error).
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct ScanReport {
    pub header: Result<FileHeader, DecodeError>,
    pub records: Vec<ScannedRecord>,
    /// File offset just after the last good record (the length to keep when cutting a torn tail).
    pub valid_end: u64,
    pub damage: Option<Damage>,
}

impl ScanReport {
    /// Stream position just after the last good record.
    pub fn end_pos(&self) -> Option<u64> {
        let h = self.header.as_ref().ok()?;
        h.start_pos
            .checked_add(self.valid_end.checked_sub(FILE_HEADER_LEN as u64)?)
    }
    /// Sequence number the next record must carry.
    pub fn next_record_seq(&self) -> Option<u64> {
        let h = self.header.as_ref().ok()?;
        Some(
            self.records
                .last()
                .map(|r| r.header.seq + 1)
                .unwrap_or(h.start_record_seq),
        )
    }
}

/// Check the record at `at`, given the position and sequence it must have.
fn check_record(buf: &[u8], at: usize, pos: u64, seq: u64) -> Result<RecordHeader, DecodeError> {
    let (h, _) = RecordHeader::decode_record(&buf[at..])?;
    if h.pos != pos || h.seq != seq {
        return Err(DecodeError::OutOfPlace {
            found_pos: h.pos,
            found_seq: h.seq,
            pos,
            seq,
        });
    }
    Ok(h)
}

/// Scan a complete logfile held in `buf`.
pub fn scan_logfile(buf: &[u8]) -> ScanReport {
    let header = FileHeader::decode(buf);
    let fh = match &header {
        Ok(h) => *h,
        Err(e) => {
            let kind = if buf.len() < FILE_HEADER_LEN {
                DamageKind::TornTail
            } else {
                DamageKind::Corrupt
            };
            let reason = format!("file header: {e}");
            return ScanReport {
                header,
                records: Vec::new(),
                valid_end: 0,
                damage: Some(Damage {
                    kind,
                    file_offset: 0,
                    pos: 0,
                    reason,
                }),
            };
        }
    };
    let mut records = Vec::new();
    let mut at = FILE_HEADER_LEN;
    let mut pos = fh.start_pos;
    let mut seq = fh.start_record_seq;
    let mut damage = None;
    while at < buf.len() {
        match check_record(buf, at, pos, seq) {
            Ok(h) => {
                // A crafted header could push positions past u64: that is damage, not a panic.
                let (Some(next_pos), Some(next_seq)) =
                    (pos.checked_add(h.total_len()), seq.checked_add(1))
                else {
                    let reason = "log position or record sequence overflows".to_string();
                    damage = Some(Damage {
                        kind: DamageKind::Corrupt,
                        file_offset: at as u64,
                        pos,
                        reason,
                    });
                    break;
                };
                records.push(ScannedRecord {
                    header: h,
                    file_offset: at as u64,
                });
                at += h.total_len() as usize;
                pos = next_pos;
                seq = next_seq;
            }
            Err(e) => {
                let later = durable_reach_after(buf, at + 1, fh.start_pos, pos, seq);
                let kind = match later {
                    Some((reach, _)) if reach > pos => DamageKind::Corrupt,
                    _ => DamageKind::TornTail,
                };
                let mut reason = describe(buf, at, &e);
                if let (DamageKind::TornTail, Some((_, n))) = (&kind, later) {
                    reason.push_str(&format!(
                        "; followed by {n} valid record(s) written while it was not yet durable (writes in flight at a crash)"
                    ));
                }
                damage = Some(Damage {
                    kind,
                    file_offset: at as u64,
                    pos,
                    reason,
                });
                break;
            }
        }
    }
    ScanReport {
        header,
        records,
        valid_end: at.min(buf.len()) as u64,
        damage,
    }
}

fn describe(buf: &[u8], at: usize, e: &DecodeError) -> String {
    if buf[at..].iter().all(|&b| b == 0) {
        return format!("zero-filled tail ({} bytes)", buf.len() - at);
    }
    if let DecodeError::OutOfPlace { found_pos, pos, .. } = e {
        if found_pos < pos {
            return format!(
                "{e}: an older record, as left after the end of the log by an earlier use of a recycled logfile"
            );
        }
    }
    e.to_string()
}

/// Of the valid records that continue this stream at or after `from`, at their
/// place (position matching the offset in a file starting at `start_pos`): the
/// furthest stream position up to which one of them says the log was durable
/// when it was written, and how many there are. None when there is no such record.
fn durable_reach_after(
    buf: &[u8],
    from: usize,
    start_pos: u64,
    pos: u64,
    seq: u64,
) -> Option<(u64, usize)> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut reach = None;
    let mut i = from;
    while i + RECORD_HEADER_LEN <= buf.len() {
        if buf[i..i + 4] == magic {
            if let Ok((h, _)) = RecordHeader::decode_record(&buf[i..]) {
                let at_place = (i - FILE_HEADER_LEN) as u64;
                if h.pos > pos && h.seq > seq && h.pos.checked_sub(start_pos) == Some(at_place) {
                    let (r, n) = reach.unwrap_or((0, 0));
                    reach = Some((r.max(h.durable_point()), n + 1));
                    // Records do not overlap: skip this one's bytes.
                    i += h.total_len() as usize;
                    continue;
                }
            }
        }
        i += 1;
    }
    reach
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;

    fn build(n: u64) -> Vec<u8> {
        build_at(500, 10, n)
    }

    /// A logfile starting at stream position `start` with record seq `seq`, of
    /// records written when all before them was durable (as format version 1 says).
    fn build_at(start: u64, seq: u64, n: u64) -> Vec<u8> {
        build_durable(start, seq, n, |_| 0)
    }

    /// Like `build_at`; record `i` says the log was durable up to `back(i)` bytes
    /// before it.
    fn build_durable(start: u64, seq: u64, n: u64, back: impl Fn(u64) -> u32) -> Vec<u8> {
        let fh = FileHeader {
            file_seq: 1,
            start_pos: start,
            start_record_seq: seq,
            created_ns: 0,
            resource_id: 1,
            parent: 0,
        };
        let mut buf = fh.encode().to_vec();
        let mut pos = start;
        for i in 0..n {
            let h = RecordHeader {
                kind: Kind::Write,
                seq: seq + i,
                pos,
                offset: i * 512,
                length: 512,
                stamp_ns: 0,
                durable_back: back(i),
            };
            h.encode_into(&[i as u8; 512], &mut buf);
            pos += h.total_len();
        }
        buf
    }

    #[test]
    fn clean_file() {
        let buf = build(5);
        let r = scan_logfile(&buf);
        assert_eq!(r.records.len(), 5);
        assert!(r.damage.is_none());
        assert_eq!(r.valid_end, buf.len() as u64);
        assert_eq!(r.end_pos(), Some(500 + 5 * (64 + 512)));
        assert_eq!(r.next_record_seq(), Some(15));
    }

    #[test]
    fn truncated_tail_is_torn() {
        let buf = build(5);
        for cut in [1usize, 30, 64, 100, 575] {
            let r = scan_logfile(&buf[..buf.len() - cut]);
            assert_eq!(r.records.len(), 4, "cut {cut}");
            let d = r.damage.expect("damage");
            assert_eq!(d.kind, DamageKind::TornTail);
            assert_eq!(d.file_offset, 64 + 4 * 576);
        }
    }

    #[test]
    fn flip_in_middle_is_corrupt_and_in_last_is_torn() {
        let mut buf = build(5);
        buf[64 + 576 + 100] ^= 0x10; // payload of record 2
        let r = scan_logfile(&buf);
        assert_eq!(r.records.len(), 1);
        let d = r.damage.expect("damage");
        assert_eq!(d.kind, DamageKind::Corrupt);
        assert_eq!(d.pos, 500 + 576);

        let mut buf = build(5);
        let last = buf.len() - 10;
        buf[last] ^= 1;
        let r = scan_logfile(&buf);
        assert_eq!(r.records.len(), 4);
        assert_eq!(r.damage.expect("damage").kind, DamageKind::TornTail);
    }

    /// Several writes in flight: the crash left a hole (record 2 never written),
    /// records 3 and 4 written. None of them was durable when 3 and 4 were
    /// written: a torn tail, cut at the hole.
    #[test]
    fn hole_before_records_written_while_it_was_not_durable_is_torn() {
        const REC: u64 = 576;
        // Records 2..5 written while the log was durable up to record 2's start.
        let buf = build_durable(
            500,
            10,
            5,
            |i| if i >= 2 { ((i - 2) * REC) as u32 } else { 0 },
        );
        let mut holed = buf.clone();
        let hole = 64 + 2 * REC as usize;
        holed[hole..hole + REC as usize].fill(0);
        let r = scan_logfile(&holed);
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.valid_end, hole as u64);
        let d = r.damage.expect("damage");
        assert_eq!(d.kind, DamageKind::TornTail, "{d:?}");
        assert_eq!(d.pos, 500 + 2 * REC);
        assert!(
            d.reason.contains("followed by 2 valid record(s)"),
            "{}",
            d.reason
        );

        // A bit flip in record 3 while record 4 says record 3 was durable before
        // it: corruption, although record 4 itself came later than the hole.
        let buf = build_durable(500, 10, 5, |i| if i == 4 { 1 } else { 0 });
        let mut flipped = buf.clone();
        flipped[64 + 3 * REC as usize + 100] ^= 1;
        let d = scan_logfile(&flipped).damage.expect("damage");
        assert_eq!(d.kind, DamageKind::Corrupt, "{d:?}");

        // The same flip where record 4 was written while record 3 was not yet
        // durable (durable point exactly at record 3's start): torn.
        let buf = build_durable(500, 10, 5, |i| if i == 4 { REC as u32 } else { 0 });
        let mut flipped = buf.clone();
        flipped[64 + 3 * REC as usize + 100] ^= 1;
        let d = scan_logfile(&flipped).damage.expect("damage");
        assert_eq!(d.kind, DamageKind::TornTail, "{d:?}");
    }

    #[test]
    fn zero_tail_is_torn() {
        let mut buf = build(3);
        buf.extend_from_slice(&[0u8; 4096]);
        let r = scan_logfile(&buf);
        assert_eq!(r.records.len(), 3);
        let d = r.damage.expect("damage");
        assert_eq!(d.kind, DamageKind::TornTail);
        assert!(d.reason.contains("zero"), "{}", d.reason);
    }

    /// A recycled logfile: the new header and records over the start of an older
    /// logfile, whose remaining records verify by checksum but lie elsewhere in the
    /// stream.
    fn recycled(old_start: u64, old_seq: u64, new_records: u64) -> Vec<u8> {
        let mut buf = build_at(old_start, old_seq, 8);
        let new = build(new_records);
        buf[..new.len()].copy_from_slice(&new);
        buf
    }

    #[test]
    fn records_of_a_recycled_logfiles_earlier_use_end_the_log() {
        // Older history (the usual case), a later one (another member's history
        // after a split brain), and one whose records would continue this one's seq.
        for (old_start, old_seq) in [(0, 1), (100_000, 900), (500 + 2 * 576 + 64, 12)] {
            let buf = recycled(old_start, old_seq, 3);
            let r = scan_logfile(&buf);
            assert_eq!(r.records.len(), 3, "old start {old_start}");
            assert_eq!(r.valid_end, 64 + 3 * 576);
            let d = r.damage.expect("damage");
            assert_eq!(d.kind, DamageKind::TornTail, "old start {old_start}: {d:?}");
        }
        let r = scan_logfile(&recycled(0, 1, 3));
        assert!(
            r.damage.expect("damage").reason.contains("recycled"),
            "an older record is named as such"
        );
        // Corruption among the new records is still corruption.
        let mut buf = recycled(0, 1, 5);
        buf[64 + 576 + 100] ^= 0x10;
        let r = scan_logfile(&buf);
        assert_eq!(r.records.len(), 1);
        assert_eq!(r.damage.expect("damage").kind, DamageKind::Corrupt);
    }

    #[test]
    fn bad_file_header() {
        let mut buf = build(2);
        buf[3] ^= 1;
        let r = scan_logfile(&buf);
        assert!(r.header.is_err());
        assert_eq!(r.damage.expect("damage").kind, DamageKind::Corrupt);
        assert_eq!(
            scan_logfile(&buf[..10]).damage.expect("d").kind,
            DamageKind::TornTail
        );
    }

    #[test]
    fn positions_near_u64_max_are_damage_not_panics() {
        // Found by the log_scan fuzz target: a valid header with start_pos = u64::MAX.
        let fh = FileHeader {
            file_seq: 1,
            start_pos: u64::MAX,
            start_record_seq: 1,
            created_ns: 0,
            resource_id: 0,
            parent: 0,
        };
        let r = scan_logfile(&fh.encode());
        assert_eq!(r.end_pos(), Some(u64::MAX));
        let fh = FileHeader {
            file_seq: 1,
            start_pos: u64::MAX - 63,
            start_record_seq: u64::MAX,
            created_ns: 0,
            resource_id: 0,
            parent: 0,
        };
        let mut buf = fh.encode().to_vec();
        let h = RecordHeader {
            kind: Kind::Trim,
            seq: u64::MAX,
            pos: u64::MAX - 63,
            offset: 0,
            length: 1,
            stamp_ns: 0,
            durable_back: 0,
        };
        h.encode_into(&[], &mut buf);
        let r = scan_logfile(&buf);
        assert!(r.records.is_empty());
        assert_eq!(r.damage.expect("damage").kind, DamageKind::Corrupt);
    }

    #[test]
    fn version_1_records_must_have_zero_durable_back() {
        let mut buf = build(1);
        buf[64 + 4] = 1; // record format version 1
        buf[64 + 56] = 9;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[64..124]), &buf[128..]);
        buf[124..128].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            RecordHeader::decode_record(&buf[64..]),
            Err(crate::DecodeError::Reserved(56))
        ));
        buf[64 + 56] = 0;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[64..124]), &buf[128..]);
        buf[124..128].copy_from_slice(&crc.to_le_bytes());
        let (h, _) = RecordHeader::decode_record(&buf[64..]).expect("version 1 still reads");
        assert_eq!(h.durable_point(), h.pos);
    }

    #[test]
    fn nonzero_reserved_fields_are_refused() {
        let mut buf = build(1);
        buf[64 + 44] = 1;
        // Fix the crc so only the reserved field is wrong.
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[64..124]), &buf[128..]);
        buf[124..128].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            RecordHeader::decode_record(&buf[64..]),
            Err(crate::DecodeError::Reserved(44))
        ));
    }
}
