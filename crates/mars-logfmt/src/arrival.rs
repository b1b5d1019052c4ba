//! Checking a logfile as it arrives: in order, in pieces of any size (a fetcher's
//! chunks), before any of it is stored.
//!
//! [`ArrivalCheck::feed`] takes the bytes of one logfile from where the last piece
//! ended: the file header, then every record, whose header must decode, sit at its
//! place (stream position and sequence number following from the file header) and
//! whose checksum must match once its payload is complete. A record may span any
//! number of pieces: its checksum is computed as the bytes come.
//!
//! [`ArrivalCheck::resume`] picks up a logfile stored earlier up to some length
//! (after a restart): it walks the record headers of the stored prefix (each was
//! checked when it arrived) and computes the checksum of a record the prefix holds
//! only part of.

use crate::record::{DecodeError, FileHeader, RecordHeader, FILE_HEADER_LEN, RECORD_HEADER_LEN};

/// What was wrong, and where in the logfile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArrivalError {
    #[error("file header: {0}")]
    FileHeader(DecodeError),
    #[error("file header: logfile number {found}, expected {expected}")]
    WrongFile { found: u64, expected: u64 },
    #[error("record at file offset {offset} (log position {pos}): {err}")]
    Record {
        offset: u64,
        pos: u64,
        err: DecodeError,
    },
    #[error("log position or record sequence overflows at file offset {0}")]
    Overflow(u64),
    #[error("reading the stored logfile at {offset}: {reason}")]
    Read { offset: u64, reason: String },
}

/// A record whose payload is arriving.
#[derive(Debug, Clone)]
struct Payload {
    /// File offset and stream position of the record.
    offset: u64,
    pos: u64,
    stored: u32,
    crc: u32,
    left: u32,
}

/// The state of one logfile's arrival check (see the module documentation).
#[derive(Debug, Clone)]
pub struct ArrivalCheck {
    file_seq: u64,
    /// File offset of the next byte.
    at: u64,
    /// The header (file or record) being gathered, and how much of it.
    head: [u8; RECORD_HEADER_LEN],
    have: usize,
    payload: Option<Payload>,
    /// Stream position and sequence number the next record must carry (known once
    /// the file header arrived).
    next: Option<(u64, u64)>,
}

// The header buffer holds both kinds of header.
const _: () = assert!(FILE_HEADER_LEN == RECORD_HEADER_LEN);

impl ArrivalCheck {
    /// A check of logfile number `file_seq` from its first byte on.
    pub fn new(file_seq: u64) -> ArrivalCheck {
        ArrivalCheck {
            file_seq,
            at: 0,
            head: [0; RECORD_HEADER_LEN],
            have: 0,
            payload: None,
            next: None,
        }
    }

    /// File offset of the next byte expected.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Check `data`, the logfile's bytes from [`ArrivalCheck::at`] on. After an error
    /// the check is of no further use: start again ([`ArrivalCheck::resume`]) from
    /// what was stored.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ArrivalError> {
        while !data.is_empty() {
            if let Some(p) = &mut self.payload {
                let n = (p.left as usize).min(data.len());
                p.crc = crc32c::crc32c_append(p.crc, &data[..n]);
                p.left -= n as u32;
                self.at += n as u64;
                data = &data[n..];
                if p.left > 0 {
                    continue;
                }
                let (offset, pos, stored, computed) = (p.offset, p.pos, p.stored, p.crc);
                self.payload = None;
                if computed != stored {
                    return Err(ArrivalError::Record {
                        offset,
                        pos,
                        err: DecodeError::BadChecksum { stored, computed },
                    });
                }
                continue;
            }
            let n = (RECORD_HEADER_LEN - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            self.at += n as u64;
            data = &data[n..];
            if self.have == RECORD_HEADER_LEN {
                self.have = 0;
                self.header_complete()?;
            }
        }
        Ok(())
    }

    /// The header in `head` is complete; it started at `at - 64`.
    fn header_complete(&mut self) -> Result<(), ArrivalError> {
        let offset = self.at - RECORD_HEADER_LEN as u64;
        let Some((pos, seq)) = self.next else {
            let h = FileHeader::decode(&self.head).map_err(ArrivalError::FileHeader)?;
            if h.file_seq != self.file_seq {
                return Err(ArrivalError::WrongFile {
                    found: h.file_seq,
                    expected: self.file_seq,
                });
            }
            self.next = Some((h.start_pos, h.start_record_seq));
            return Ok(());
        };
        let err = |err| ArrivalError::Record { offset, pos, err };
        let (h, stored) = RecordHeader::decode(&self.head).map_err(err)?;
        if h.pos != pos || h.seq != seq {
            return Err(err(DecodeError::OutOfPlace {
                found_pos: h.pos,
                found_seq: h.seq,
                pos,
                seq,
            }));
        }
        let (Some(next_pos), Some(next_seq)) = (pos.checked_add(h.total_len()), seq.checked_add(1))
        else {
            return Err(ArrivalError::Overflow(offset));
        };
        self.next = Some((next_pos, next_seq));
        let crc = crc32c::crc32c(&self.head[..60]);
        if h.payload_len() == 0 {
            if crc != stored {
                return Err(err(DecodeError::BadChecksum {
                    stored,
                    computed: crc,
                }));
            }
        } else {
            self.payload = Some(Payload {
                offset,
                pos,
                stored,
                crc,
                left: h.payload_len(),
            });
        }
        Ok(())
    }

    /// The check of logfile number `file_seq` stored up to `len` bytes, continued from
    /// there: `read_at(offset, buf)` fills `buf` from the stored file. Reads the file
    /// header, every record header, and the part of a record the prefix holds only
    /// partly (the payloads of complete records were checked when they arrived).
    pub fn resume<R>(file_seq: u64, len: u64, mut read_at: R) -> Result<ArrivalCheck, ArrivalError>
    where
        R: FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    {
        let mut c = ArrivalCheck::new(file_seq);
        let mut read = |offset: u64, buf: &mut [u8]| {
            read_at(offset, buf).map_err(|e| ArrivalError::Read {
                offset,
                reason: e.to_string(),
            })
        };
        let mut buf = Vec::new();
        while c.at < len {
            let left = c.payload.as_ref().map(|p| p.left as u64);
            let n = match left {
                // A whole payload was checked when it arrived: skipped.
                Some(left) if c.at + left <= len => {
                    c.payload = None;
                    c.at += left;
                    continue;
                }
                // A payload stored only in part: read and summed.
                Some(_) => (len - c.at) as usize,
                None => ((len - c.at) as usize).min(RECORD_HEADER_LEN - c.have),
            };
            buf.resize(n, 0);
            read(c.at, &mut buf)?;
            c.feed(&buf)?;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;

    /// A logfile of `n` records of varied kinds and sizes.
    fn logfile(seq: u64, n: u64) -> Vec<u8> {
        let fh = FileHeader {
            file_seq: seq,
            start_pos: 1000,
            start_record_seq: 7,
            created_ns: 1,
            resource_id: 2,
            parent: 0,
        };
        let mut out = fh.encode().to_vec();
        let mut pos = 1000;
        for i in 0..n {
            let (kind, len) = match i % 3 {
                0 => (Kind::Write, 1 + (i * 977) % 9000),
                1 => (Kind::Trim, 4096),
                _ => (Kind::Write, 4096),
            };
            let h = RecordHeader {
                kind,
                seq: 7 + i,
                pos,
                offset: i * 4096,
                length: len,
                stamp_ns: i,
                durable_back: 0,
            };
            let payload: Vec<u8> = (0..h.payload_len())
                .map(|b| (b as u64 * 7 + i) as u8)
                .collect();
            h.encode_into(&payload, &mut out);
            pos += h.total_len();
        }
        out
    }

    fn feed_in_pieces(c: &mut ArrivalCheck, data: &[u8], piece: usize) -> Result<(), ArrivalError> {
        for p in data.chunks(piece) {
            c.feed(p)?;
        }
        Ok(())
    }

    #[test]
    fn a_whole_logfile_passes_in_pieces_of_any_size() {
        let f = logfile(5, 40);
        for piece in [1, 7, 63, 64, 65, 4096, 100_000] {
            let mut c = ArrivalCheck::new(5);
            feed_in_pieces(&mut c, &f, piece).unwrap();
            assert_eq!(c.at(), f.len() as u64);
        }
    }

    #[test]
    fn every_flipped_bit_is_caught_at_its_record() {
        let f = logfile(5, 12);
        for at in (0..f.len()).step_by(37) {
            let mut bad = f.clone();
            bad[at] ^= 0x10;
            let mut c = ArrivalCheck::new(5);
            let err = feed_in_pieces(&mut c, &bad, 1000).expect_err("a flipped bit passed");
            match err {
                ArrivalError::FileHeader(_) | ArrivalError::WrongFile { .. } => {
                    assert!(at < FILE_HEADER_LEN)
                }
                ArrivalError::Record { offset, .. } => {
                    assert!(
                        offset as usize <= at,
                        "reported at {offset}, flipped at {at}"
                    )
                }
                other => panic!("{other}"),
            }
        }
        let mut c = ArrivalCheck::new(6);
        assert!(matches!(
            c.feed(&f),
            Err(ArrivalError::WrongFile {
                found: 5,
                expected: 6
            })
        ));
    }

    #[test]
    fn a_record_out_of_place_is_refused() {
        // Two logfiles' records spliced: positions do not follow.
        let a = logfile(5, 4);
        let mut c = ArrivalCheck::new(5);
        c.feed(&a).unwrap();
        let b = logfile(5, 2);
        let err = c.feed(&b[FILE_HEADER_LEN..]).unwrap_err();
        assert!(
            matches!(
                err,
                ArrivalError::Record {
                    err: DecodeError::OutOfPlace { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn resumes_from_any_stored_length() {
        let f = logfile(5, 20);
        for len in (0..f.len()).step_by(53).chain([FILE_HEADER_LEN, f.len()]) {
            let mut c = ArrivalCheck::resume(5, len as u64, |off, buf| {
                buf.copy_from_slice(&f[off as usize..off as usize + buf.len()]);
                Ok(())
            })
            .unwrap();
            assert_eq!(c.at(), len as u64);
            c.feed(&f[len..]).unwrap();
            // And a flip after the resume point is still caught.
            if len + 10 < f.len() {
                let mut bad = f[len..].to_vec();
                bad[10] ^= 1;
                let mut c = ArrivalCheck::resume(5, len as u64, |off, buf| {
                    buf.copy_from_slice(&f[off as usize..off as usize + buf.len()]);
                    Ok(())
                })
                .unwrap();
                assert!(c.feed(&bad).is_err(), "flip after a resume at {len}");
            }
        }
        let err =
            ArrivalCheck::resume(5, 100, |_, _| Err(std::io::Error::other("gone"))).unwrap_err();
        assert!(matches!(err, ArrivalError::Read { offset: 0, .. }), "{err}");
    }
}
