//! Record and logfile header decoders on arbitrary bytes.
//!
//! Each input is decoded as is, and again with its checksums rewritten
//! (see `mars_fuzz::fix_record_checksum`) to reach the field checks.
//!
//! Oracles: no panic; whatever decodes re-encodes to exactly the bytes it came
//! from (so the decoder accepts nothing the encoder would not write). The
//! encoders write the current format version; an input of an older version
//! that this build still reads is compared with the encoding given that
//! version (and its checksum): what that version's encoder wrote.
//!
//! The encoders write zero into the reserved fields (record: flags at 44..48;
//! file header: 12..16 and 56..60, see docs/FORMAT.md).
//! With `MARS_FUZZ_IGNORE_RESERVED=1` in the environment the round-trip check
//! skips those fields (and the checksum, which covers them), so fuzzing can go
//! on past that known finding; unset, a decoder accepting nonzero reserved
//! bytes is a crash.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mars_logfmt::{FileHeader, RecordHeader, FILE_HEADER_LEN, MAX_PAYLOAD, RECORD_HEADER_LEN};

fn ignore_reserved() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("MARS_FUZZ_IGNORE_RESERVED").is_some_and(|v| v != "0"))
}

/// Compare encoder output with the input, optionally masking the 64-byte
/// header's reserved fields and checksum (`ranges`).
fn assert_round_trip(what: &str, enc: &[u8], input: &[u8], ranges: &[std::ops::Range<usize>]) {
    if ignore_reserved() {
        let mask = |b: &[u8]| {
            let mut b = b.to_vec();
            for r in ranges {
                b[r.clone()].fill(0);
            }
            b
        };
        assert_eq!(
            mask(enc),
            mask(input),
            "{what} does not round-trip (reserved fields masked)"
        );
    } else {
        assert_eq!(enc, input, "{what} does not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Again with the checksums made right, to get past them to the field checks.
    let mut fixed = data.to_vec();
    mars_fuzz::fix_logfile_checksums(&mut fixed); // file header at 0
    mars_fuzz::fix_record_checksum(&mut fixed); // record at 0
    if fixed != data {
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    // Header only (no checksum check): must agree with the whole-record decoder.
    let header_only = RecordHeader::decode(data);

    if let Ok((h, payload)) = RecordHeader::decode_record(data) {
        let (h2, _crc) = header_only.expect("decode_record ok but decode failed");
        assert_eq!(h, h2);
        assert_eq!(payload.len() as u64, h.payload_len() as u64);
        assert!(h.payload_len() <= MAX_PAYLOAD);
        assert!(h.offset.checked_add(h.length).is_some());
        let total = h.total_len() as usize;
        assert_eq!(total, RECORD_HEADER_LEN + payload.len());
        assert!(total <= data.len());

        let mut out = Vec::with_capacity(total);
        h.encode_into(payload, &mut out);
        assert_eq!(out.len(), total);
        if out[4..6] != data[4..6] {
            // An older version: its encoder wrote the same fields under its number.
            out[4..6].copy_from_slice(&data[4..6]);
            assert!(mars_fuzz::fix_record_checksum(&mut out));
        }
        assert_round_trip("record", &out, &data[..total], &[44..48, 60..64]);
    }

    if let Ok(fh) = FileHeader::decode(data) {
        let mut enc = fh.encode();
        if enc[8..10] != data[8..10] {
            enc[8..10].copy_from_slice(&data[8..10]);
            mars_fuzz::fix_logfile_checksums(&mut enc);
        }
        assert_round_trip(
            "file header",
            &enc,
            &data[..FILE_HEADER_LEN],
            &[12..16, 56..64],
        );
        assert_eq!(FileHeader::decode(&enc), Ok(fh));
    }
}
