//! `scan_logfile` on arbitrary bytes.
//!
//! Each input is scanned twice: as is, and with its checksums rewritten
//! ([`mars_fuzz::fix_logfile_checksums`]) so that the fuzzer reaches the
//! stream checks (positions, sequence numbers, lengths) behind the crc32c.
//!
//! Oracles: no panic (the recovery path runs it on whatever is on disk,
//! including `end_pos` / `next_record_seq`), and the report is
//! self-consistent: records back to back in increasing file offset, each
//! continuing the stream; `valid_end <= len`; no damage means
//! `valid_end == len`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_logfmt::{scan_logfile, DamageKind, RecordHeader, FILE_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut fixed = data.to_vec();
    mars_fuzz::fix_logfile_checksums(&mut fixed);
    if fixed != data {
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    let r = scan_logfile(data);
    let len = data.len() as u64;

    assert!(
        r.valid_end <= len,
        "valid_end {} > len {}",
        r.valid_end,
        len
    );
    if r.damage.is_none() {
        assert_eq!(r.valid_end, len, "no damage but valid_end != len");
    }

    match &r.header {
        Err(_) => {
            assert!(r.records.is_empty());
            assert_eq!(r.valid_end, 0);
            let d = r
                .damage
                .as_ref()
                .expect("bad header must be reported as damage");
            if data.len() < FILE_HEADER_LEN {
                assert_eq!(d.kind, DamageKind::TornTail);
            }
            assert_eq!(r.end_pos(), None);
            assert_eq!(r.next_record_seq(), None);
        }
        Ok(fh) => {
            assert!(r.valid_end >= FILE_HEADER_LEN as u64);
            // Records are back to back, in increasing file offset, and each
            // continues the stream (pos, seq) of the one before.
            let mut expect_off = FILE_HEADER_LEN as u64;
            let mut expect_pos = fh.start_pos;
            let mut expect_seq = fh.start_record_seq;
            for rec in &r.records {
                assert_eq!(
                    rec.file_offset, expect_off,
                    "records not contiguous/increasing"
                );
                assert_eq!(rec.header.pos, expect_pos);
                assert_eq!(rec.header.seq, expect_seq);
                let at = rec.file_offset as usize;
                let total = rec.header.total_len() as usize;
                assert!(at + total <= data.len());
                let (h, _) = RecordHeader::decode_record(&data[at..at + total])
                    .expect("scanned record does not decode on its own");
                assert_eq!(h, rec.header);
                expect_off += rec.header.total_len();
                expect_pos = expect_pos.wrapping_add(rec.header.total_len());
                expect_seq = expect_seq.wrapping_add(1);
            }
            assert_eq!(
                r.valid_end, expect_off,
                "valid_end is not the end of the last record"
            );
            if let Some(d) = &r.damage {
                assert_eq!(d.file_offset, r.valid_end);
                assert!(d.file_offset < len);
            }
            // Used by recovery and dump-log on every scanned file.
            let _ = r.end_pos();
            let _ = r.next_record_seq();
        }
    }
}
