//! The in-memory index of data logged but not yet written back to the disk.
//!
//! Non-overlapping extents keyed by start offset; a newer write splits or
//! replaces the parts of older extents it overlaps, so a lookup always sees
//! the newest data. Each extent remembers the record (`seq`) it came from so
//! that writeback removes exactly what it wrote and never a newer overwrite.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Bound;

/// Data of one extent: bytes, or zeroes (trim / write-zeroes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtentData {
    Bytes(Bytes),
    Zero,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub end: u64,
    pub seq: u64,
    pub data: ExtentData,
}

impl Extent {
    /// The part `[from, to)` of this extent starting at `start`.
    fn slice(&self, start: u64, from: u64, to: u64) -> Extent {
        let data = match &self.data {
            ExtentData::Bytes(b) => {
                ExtentData::Bytes(b.slice((from - start) as usize..(to - start) as usize))
            }
            ExtentData::Zero => ExtentData::Zero,
        };
        Extent {
            end: to,
            seq: self.seq,
            data,
        }
    }
}

#[derive(Default, Debug)]
pub struct Index {
    map: BTreeMap<u64, Extent>,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Starts of extents overlapping `[start, end)`.
    fn overlapping(&self, start: u64, end: u64) -> Vec<u64> {
        let mut keys = Vec::new();
        if let Some((&k, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                keys.push(k);
            }
        }
        keys.extend(
            self.map
                .range((Bound::Included(start), Bound::Excluded(end)))
                .map(|(&k, _)| k),
        );
        keys
    }

    /// Record that `[start, start+len)` now holds `data` from record `seq`.
    pub fn insert(&mut self, start: u64, len: u64, seq: u64, data: ExtentData) {
        if len == 0 {
            return;
        }
        let end = start + len;
        for k in self.overlapping(start, end) {
            let Some(e) = self.map.remove(&k) else {
                continue;
            };
            if k < start {
                self.map.insert(k, e.slice(k, k, start));
            }
            if e.end > end {
                self.map.insert(end, e.slice(k, end, e.end));
            }
        }
        self.map.insert(start, Extent { end, seq, data });
    }

    /// Drop the pieces of record `seq` within `[start, start+len)` (after writeback).
    pub fn remove_written(&mut self, start: u64, len: u64, seq: u64) {
        let end = start + len;
        let keys: Vec<u64> = self
            .map
            .range((Bound::Included(start), Bound::Excluded(end)))
            .filter(|(_, e)| e.seq == seq)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            self.map.remove(&k);
        }
    }

    /// The pieces overlapping `[start, start+len)`, clipped to it: (offset, extent).
    pub fn lookup(&self, start: u64, len: u64) -> Vec<(u64, Extent)> {
        let end = start + len;
        let mut out = Vec::new();
        for k in self.overlapping(start, end) {
            if let Some(e) = self.map.get(&k) {
                let from = k.max(start);
                let to = e.end.min(end);
                out.push((from, e.slice(k, from, to)));
            }
        }
        out
    }
}

/// Copy the pieces found by [`Index::lookup`] over `buf`, which holds `[start, start+buf.len())`.
/// Returns how many bytes were covered.
pub fn overlay(buf: &mut [u8], start: u64, pieces: &[(u64, Extent)]) -> u64 {
    let mut covered = 0;
    for (off, e) in pieces {
        let from = (off - start) as usize;
        let to = (e.end - start) as usize;
        match &e.data {
            ExtentData::Bytes(b) => buf[from..to].copy_from_slice(b),
            ExtentData::Zero => buf[from..to].fill(0),
        }
        covered += (to - from) as u64;
    }
    covered
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: u64 = 256;

    #[derive(Clone, Debug)]
    enum Op {
        Write { off: u64, len: u64, fill: u8 },
        Zero { off: u64, len: u64 },
        WriteBack,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..SIZE, 1..64u64, any::<u8>()).prop_map(|(off, len, fill)| Op::Write { off, len: len.min(SIZE - off), fill }),
            1 => (0..SIZE, 1..64u64).prop_map(|(off, len)| Op::Zero { off, len: len.min(SIZE - off) }),
            2 => Just(Op::WriteBack),
        ]
    }

    proptest! {
        /// Model: `logical` is what a reader must see; `disk` is written back in log
        /// order. The index over the disk must always equal the logical image.
        #[test]
        fn index_matches_byte_array_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut logical = vec![0xEEu8; SIZE as usize];
            let mut disk = logical.clone();
            let mut index = Index::new();
            let mut pending: std::collections::VecDeque<(u64, u64, u64, Option<u8>)> = Default::default();
            let mut seq = 0;
            for op in ops {
                match op {
                    Op::Write { off, len, fill } => {
                        seq += 1;
                        index.insert(off, len, seq, ExtentData::Bytes(Bytes::from(vec![fill; len as usize])));
                        logical[off as usize..(off + len) as usize].fill(fill);
                        pending.push_back((seq, off, len, Some(fill)));
                    }
                    Op::Zero { off, len } => {
                        seq += 1;
                        index.insert(off, len, seq, ExtentData::Zero);
                        logical[off as usize..(off + len) as usize].fill(0);
                        pending.push_back((seq, off, len, None));
                    }
                    Op::WriteBack => {
                        if let Some((s, off, len, fill)) = pending.pop_front() {
                            disk[off as usize..(off + len) as usize].fill(fill.unwrap_or(0));
                            index.remove_written(off, len, s);
                        }
                    }
                }
                for (start, len) in [(0u64, SIZE), (10, 37), (100, 1), (200, 56)] {
                    let mut buf = disk[start as usize..(start + len) as usize].to_vec();
                    overlay(&mut buf, start, &index.lookup(start, len));
                    prop_assert_eq!(&buf[..], &logical[start as usize..(start + len) as usize]);
                }
            }
            while let Some((s, off, len, fill)) = pending.pop_front() {
                disk[off as usize..(off + len) as usize].fill(fill.unwrap_or(0));
                index.remove_written(off, len, s);
            }
            prop_assert!(index.is_empty());
            prop_assert_eq!(disk, logical);
        }
    }
}
