//! Freezing a copy at one log position, for `verify` and repair (issue 18).
//!
//! Two copies of a resource can be compared block by block only where both
//! hold the same moment of its history. The primary's disk holds the log up
//! to where writeback stands, a secondary's up to where replay stands; both
//! move. A freeze holds one of them at a log position T (a record boundary
//! of the resource's log stream): the primary's writeback applies no record
//! ending after T ([`crate::Logger::freeze`]), a secondary's replay none
//! (the replay gate in `mars_replication`). New writes are still logged and
//! fetched meanwhile; reads of the primary lay what is not written back over
//! the disk as always. A freeze is leased: a coordinator that goes away
//! holds nothing for long.
//!
//! While frozen, a copy's disk is read raw ([`digest`], [`read`]), and a
//! repair writes good blocks of the same moment into it ([`repair`]).

use crate::csum::{block_crcs, Csum, BLOCK};
use std::io;
use std::time::Duration;

/// How long a freeze holds without being renewed.
pub const LEASE: Duration = Duration::from_secs(10);

/// How long a freeze waits for its copy to reach the position asked for.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// What a freeze found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frozen {
    /// Held at the position asked for.
    At(u64),
    /// Already past it: held where it is (ask all copies for this one).
    Ahead(u64),
}

/// A frozen range: the crc32c of each 4 KiB block as read from the disk now,
/// and the checksum table's entry for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeDigest {
    pub data: Vec<u32>,
    pub table: Vec<u32>,
}

impl RangeDigest {
    /// As sent on the wire: `n` data crcs, then `n` table crcs, little endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * self.data.len());
        for c in self.data.iter().chain(&self.table) {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    /// The digest of `blocks` blocks from `b`; None when it is not that.
    pub fn decode(b: &[u8], blocks: usize) -> Option<RangeDigest> {
        if b.len() != 8 * blocks {
            return None;
        }
        let all: Vec<u32> = b
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (data, table) = all.split_at(blocks);
        Some(RangeDigest {
            data: data.to_vec(),
            table: table.to_vec(),
        })
    }
}

/// Check a range asked for by a peer against the table's disk: block-aligned
/// start, inside the disk, at most `max` bytes.
pub fn check_range(csum: &Csum, offset: u64, len: u64, max: u64) -> io::Result<()> {
    let end = offset.checked_add(len);
    if !offset.is_multiple_of(BLOCK)
        || len == 0
        || len > max
        || end.is_none_or(|e| e > csum.covered())
        || (!len.is_multiple_of(BLOCK) && end != Some(csum.covered()))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "range {offset}+{len} is not whole 4 KiB blocks of the disk ({} bytes) or longer than {max}",
                csum.covered()
            ),
        ));
    }
    Ok(())
}

/// Read `[offset, offset+len)` of a frozen disk through `read`, and digest it.
pub fn digest(
    csum: &Csum,
    offset: u64,
    len: u64,
    read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<RangeDigest> {
    check_range(csum, offset, len, u64::MAX)?;
    // In pieces through one small buffer: each piece is checksummed while
    // it is still in the CPU's cache (a whole chunk read first, then
    // checksummed, went through memory twice, and was zeroed first).
    const PIECE: u64 = 1 << 20;
    let mut buf = vec![0u8; PIECE.min(len) as usize];
    let mut data = Vec::with_capacity(len.div_ceil(BLOCK) as usize);
    let mut at = offset;
    while at < offset + len {
        let n = PIECE.min(offset + len - at) as usize;
        read(&mut buf[..n], at)?;
        data.extend(block_crcs(&buf[..n]));
        at += n as u64;
    }
    let table = csum.table(offset / BLOCK, data.len());
    Ok(RangeDigest { data, table })
}

/// Write `data` (good blocks of the same moment, from another copy) at
/// `offset` of a frozen disk through `write`, make it durable with `sync`,
/// and set its checksums: the blocks are repaired.
pub fn repair(
    csum: &Csum,
    offset: u64,
    data: &[u8],
    write: &mut dyn FnMut(&[u8], u64) -> io::Result<()>,
    sync: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<()> {
    check_range(csum, offset, data.len() as u64, u64::MAX)?;
    {
        // Reads racing the write look again rather than call it bad.
        let _w = csum.writing();
        write(data, offset)?;
        csum.repaired(offset, data);
    }
    sync()?;
    csum.sync()
}
