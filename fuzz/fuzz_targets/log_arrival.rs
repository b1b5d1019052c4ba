//! `ArrivalCheck` (a fetcher's check of logfile bytes as they arrive) on arbitrary
//! bytes, fed in arbitrary pieces.
//!
//! The first byte picks the piece size and the logfile number; the rest is the
//! logfile, checked as is and with its checksums rewritten
//! ([`mars_fuzz::fix_logfile_checksums`]) so that the fuzzer gets past the crc32c.
//!
//! Oracles: no panic; the verdict does not depend on how the bytes are cut into
//! pieces; after an accepted prefix, `resume` from the stored prefix and the rest
//! fed gives the same verdict; a logfile `scan_logfile` finds undamaged passes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_logfmt::{scan_logfile, ArrivalCheck, FileHeader};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, file)) = data.split_first() else {
        return;
    };
    check(pick, file);
    let mut fixed = file.to_vec();
    mars_fuzz::fix_logfile_checksums(&mut fixed);
    if fixed != file {
        check(pick, &fixed);
    }
});

fn check(pick: u8, file: &[u8]) {
    let piece = 1 + (pick as usize % 97) * 13;
    // The number the header names, so that the record checks are reached.
    let seq = FileHeader::decode(file).map(|h| h.file_seq).unwrap_or(pick as u64);
    let whole = ArrivalCheck::new(seq).feed(file);
    let mut c = ArrivalCheck::new(seq);
    let mut cut = Ok(());
    for p in file.chunks(piece) {
        cut = c.feed(p);
        if cut.is_err() {
            break;
        }
    }
    assert_eq!(whole, cut, "the verdict depends on the pieces ({piece})");
    if whole.is_ok() {
        assert_eq!(c.at(), file.len() as u64);
    }
    let r = scan_logfile(file);
    if r.header.is_ok() && r.damage.is_none() {
        assert_eq!(whole, Ok(()), "an undamaged logfile was refused");
    }
    // Stored up to a point the check accepted, then resumed from the stored bytes.
    let split = (pick as usize * 7919) % (file.len() + 1);
    if ArrivalCheck::new(seq).feed(&file[..split]).is_ok() {
        let mut r = ArrivalCheck::resume(seq, split as u64, |off, buf| {
            buf.copy_from_slice(&file[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .expect("a prefix the check accepted does not resume");
        assert_eq!(r.at(), split as u64);
        assert_eq!(r.feed(&file[split..]), whole, "resumed at {split}");
    }
}
