//! The log's recent records, kept in memory for fetchers.
//!
//! A secondary that keeps up asks for the records the primary logged moments
//! ago. The primary writes large batches with O_DIRECT, so those bytes are not
//! in its page cache: without this cache every fetch answer is a device read on
//! the device the log is being written to. The cache holds the record headers
//! and the requests' own payload buffers (`Bytes`, shared, no copy) of the last
//! `limit` bytes of log, keyed by logfile and file offset: exactly the bytes of
//! the logfile there.

use bytes::Bytes;
use mars_logfmt::RECORD_HEADER_LEN;
use std::collections::VecDeque;

struct Cached {
    file_seq: u64,
    /// File offset of the record's header.
    offset: u64,
    hdr: [u8; RECORD_HEADER_LEN],
    data: Option<Bytes>,
}

impl Cached {
    fn len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.data.as_ref().map_or(0, |d| d.len() as u64)
    }
}

pub(crate) struct TailCache {
    recs: VecDeque<Cached>,
    bytes: u64,
    limit: u64,
}

impl TailCache {
    pub(crate) fn new(limit: u64) -> TailCache {
        TailCache {
            recs: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// A record now in logfile `file_seq` at `offset`, right after the ones before
    /// (records arrive in log order; a gap or an older position starts afresh).
    pub(crate) fn push(
        &mut self,
        file_seq: u64,
        offset: u64,
        hdr: &[u8; RECORD_HEADER_LEN],
        data: Option<&Bytes>,
    ) {
        if self.limit == 0 {
            return;
        }
        if let Some(last) = self.recs.back() {
            let follows = (last.file_seq == file_seq && last.offset + last.len() == offset)
                || last.file_seq < file_seq;
            if !follows {
                self.clear();
            }
        }
        let rec = Cached {
            file_seq,
            offset,
            hdr: *hdr,
            data: data.cloned(),
        };
        self.bytes += rec.len();
        self.recs.push_back(rec);
        while self.bytes > self.limit {
            let Some(old) = self.recs.pop_front() else {
                break;
            };
            self.bytes -= old.len();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.recs.clear();
        self.bytes = 0;
    }

    /// [`TailCache::read_into`] into a new buffer (tests).
    #[cfg(test)]
    pub(crate) fn read(&self, file_seq: u64, offset: u64, max: usize) -> Option<Vec<u8>> {
        let mut out = vec![0u8; max];
        let n = self.read_into(file_seq, offset, &mut out)?;
        out.truncate(n);
        Some(out)
    }

    /// The bytes of logfile `file_seq` from file `offset` on, as far as the cache
    /// holds them contiguously, copied to the start of `out` (at most its length).
    /// Returns how many; None if it does not hold `offset`.
    pub(crate) fn read_into(&self, file_seq: u64, offset: u64, out: &mut [u8]) -> Option<usize> {
        // The first record that ends after `offset` in this file.
        let i = self
            .recs
            .partition_point(|r| (r.file_seq, r.offset + r.len()) <= (file_seq, offset));
        let first = self.recs.get(i)?;
        if first.file_seq != file_seq || first.offset > offset {
            return None;
        }
        let mut n = 0;
        let mut at = offset;
        for r in self.recs.range(i..) {
            // Records of one logfile in the cache are back to back (see `push`).
            if r.file_seq != file_seq || r.offset > at {
                break;
            }
            let skip = (at - r.offset) as usize;
            let hdr_part = &r.hdr[skip.min(RECORD_HEADER_LEN)..];
            let data_skip = skip.saturating_sub(RECORD_HEADER_LEN);
            let data_part = r.data.as_ref().map_or(&[][..], |d| &d[data_skip..]);
            for part in [hdr_part, data_part] {
                let take = part.len().min(out.len() - n);
                out[n..n + take].copy_from_slice(&part[..take]);
                n += take;
            }
            at = r.offset + r.len();
            if n == out.len() {
                break;
            }
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of 64 + `n` bytes with recognisable content, and the file they make.
    fn fill(cache: &mut TailCache, file_seq: u64, start: u64, sizes: &[usize], file: &mut Vec<u8>) {
        let mut at = start;
        for (k, &n) in sizes.iter().enumerate() {
            let mut hdr = [0u8; RECORD_HEADER_LEN];
            for (j, b) in hdr.iter_mut().enumerate() {
                *b = (at as usize + j) as u8 ^ 0x5a;
            }
            let data = (n > 0).then(|| Bytes::from(vec![k as u8 + 1; n]));
            cache.push(file_seq, at, &hdr, data.as_ref());
            file.resize(at as usize, 0);
            file.extend_from_slice(&hdr);
            if let Some(d) = &data {
                file.extend_from_slice(d);
            }
            at += (RECORD_HEADER_LEN + n) as u64;
        }
    }

    #[test]
    fn reads_equal_the_file_and_stop_where_the_cache_does() {
        let mut c = TailCache::new(1 << 20);
        let mut file = Vec::new();
        fill(&mut c, 7, 64, &[100, 0, 4096, 1, 300], &mut file);
        let end = file.len();
        for offset in [64, 65, 127, 128, 164, 228, 229, 4000, end - 1] {
            for max in [1, 10, 64, 500, 10_000] {
                let got = c.read(7, offset as u64, max).expect("cached");
                let want = &file[offset..(offset + max).min(end)];
                assert_eq!(got, want, "offset {offset} max {max}");
            }
        }
        assert_eq!(c.read(7, end as u64, 10), None, "nothing after the end");
        assert_eq!(c.read(7, 10, 10), None, "the file header is not cached");
        assert_eq!(c.read(6, 64, 10), None, "another logfile");
        assert_eq!(c.read(8, 64, 10), None, "another logfile");
    }

    #[test]
    fn old_records_leave_and_a_new_logfile_follows() {
        let mut c = TailCache::new(1000);
        let mut file = Vec::new();
        fill(&mut c, 1, 64, &[300, 300, 300], &mut file);
        assert_eq!(
            c.read(1, 64, 10),
            None,
            "the first record left (over 1000 bytes)"
        );
        assert!(c.read(1, 64 + 364, 10).is_some());
        let mut next = Vec::new();
        fill(&mut c, 2, 64, &[100], &mut next);
        let got = c.read(1, 64 + 364, 10_000).expect("cached");
        assert_eq!(got, &file[64 + 364..], "stops at the end of its logfile");
        assert_eq!(c.read(2, 64, 10_000).expect("cached"), &next[64..]);
        // Positions given back (a failed write) and written again: starts afresh.
        let mut again = Vec::new();
        fill(&mut c, 2, 64, &[50], &mut again);
        assert_eq!(c.read(1, 64 + 364, 10), None);
        assert_eq!(c.read(2, 64, 10_000).expect("cached"), &again[64..]);
    }
}
