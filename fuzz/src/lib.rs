//! Helpers shared by the fuzz targets.

use mars_logfmt::{RecordHeader, FILE_HEADER_LEN, RECORD_HEADER_LEN};

/// Rewrite the checksums of `buf` seen as a logfile: the file header's (if
/// `buf` is at least a header long) and those of the records that follow it,
/// as far as they are laid back to back and their headers decode.
///
/// Random bytes almost never carry a right crc32c, so without this the fuzzer
/// rarely gets past the checksum checks; with it, it can mutate positions,
/// sequence numbers and lengths freely and still produce "valid" files.
pub fn fix_logfile_checksums(buf: &mut [u8]) {
    if buf.len() < FILE_HEADER_LEN {
        return;
    }
    let crc = crc32c::crc32c(&buf[..60]);
    buf[60..64].copy_from_slice(&crc.to_le_bytes());
    let mut at = FILE_HEADER_LEN;
    while fix_record_checksum(&mut buf[at..]) {
        let Ok((h, _)) = RecordHeader::decode(&buf[at..]) else {
            break;
        };
        at += h.total_len() as usize;
    }
}

/// Rewrite the checksum of the record at the start of `buf` if its header
/// decodes and its payload is complete; returns whether it did.
pub fn fix_record_checksum(buf: &mut [u8]) -> bool {
    let Ok((h, _)) = RecordHeader::decode(buf) else {
        return false;
    };
    let end = RECORD_HEADER_LEN + h.payload_len() as usize;
    if buf.len() < end {
        return false;
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..60]), &buf[RECORD_HEADER_LEN..end]);
    buf[60..64].copy_from_slice(&crc.to_le_bytes());
    true
}
