//! The primary's side of a freeze (see [`crate::freeze`]): writeback held at
//! a log position.

use super::{closed, Logger};
use crate::freeze::{Frozen, RangeDigest, LEASE};
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl Logger {
    /// Hold writeback at log position `at`: when it stands there (after
    /// applying what it may up to `at`), `Frozen::At`; when it is already
    /// past, it is held where it is, `Frozen::Ahead`. Waits up to `patience`
    /// (blocking); the hold lasts [`LEASE`] unless renewed by another call.
    pub fn freeze(&self, at: u64, patience: Duration) -> io::Result<Frozen> {
        let sh = &self.shared;
        let deadline = Instant::now() + patience;
        let mut wb = sh.wb.lock();
        loop {
            if wb.writer_done {
                wb.hold = None;
                return Err(closed());
            }
            let applied = sh.applied_pos.load(Ordering::Acquire);
            let lease = Instant::now() + LEASE.max(patience);
            if !wb.applying && applied >= at {
                wb.hold = Some((applied, lease));
                return Ok(if applied == at {
                    Frozen::At(at)
                } else {
                    Frozen::Ahead(applied)
                });
            }
            // Up to `at` and no further (a batch taken before may go past).
            wb.hold = Some((at, lease));
            sh.wb_cv.notify_all();
            let now = Instant::now();
            if now >= deadline {
                wb.hold = None;
                sh.wb_cv.notify_all();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "writeback did not reach log position {at} within {patience:?}: it stands at {applied}, the log is durable up to {}",
                        wb.synced_pos
                    ),
                ));
            }
            sh.hold_cv
                .wait_for(&mut wb, (deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// End a freeze: writeback goes on.
    pub fn release_freeze(&self) {
        let mut wb = self.shared.wb.lock();
        wb.hold = None;
        self.shared.wb_cv.notify_all();
    }

    /// The position writeback is frozen at; an error when it is not (the
    /// lease ran out, or it was released).
    pub fn frozen_position(&self) -> io::Result<u64> {
        let wb = self.shared.wb.lock();
        let applied = self.shared.applied_pos.load(Ordering::Acquire);
        match wb.hold {
            Some((at, until)) if at == applied && !wb.applying && Instant::now() < until => Ok(at),
            _ => Err(io::Error::other(
                "writeback is not frozen (the freeze's lease ran out): freeze again",
            )),
        }
    }

    /// Digest `[offset, offset+len)` of the disk as it is, frozen (the log
    /// position it holds, and the digest).
    pub fn frozen_digest(&self, offset: u64, len: u64) -> io::Result<(u64, RangeDigest)> {
        let at = self.frozen_position()?;
        let disk = &self.shared.disk;
        let d = crate::freeze::digest(&self.shared.csum, offset, len, &mut |b, o| {
            disk.read_exact_at(b, o)
        })?;
        // Still frozen at the same position after the read: it is of that moment.
        if self.frozen_position()? != at {
            return Err(io::Error::other("the freeze moved during the read"));
        }
        Ok((at, d))
    }

    /// The bytes of `[offset, offset+len)` of the frozen disk (raw: what the
    /// disk holds at the frozen position, not the newest data).
    pub fn frozen_read(&self, offset: u64, len: u64) -> io::Result<(u64, Vec<u8>)> {
        let at = self.frozen_position()?;
        crate::freeze::check_range(&self.shared.csum, offset, len, 64 << 20)?;
        let mut buf = vec![0u8; len as usize];
        self.shared.disk.read_exact_at(&mut buf, offset)?;
        if self.frozen_position()? != at {
            return Err(io::Error::other("the freeze moved during the read"));
        }
        Ok((at, buf))
    }

    /// Write good blocks of the frozen moment (from another copy) into the
    /// disk: they are repaired.
    pub fn frozen_repair(&self, at: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.frozen_position()? != at {
            return Err(io::Error::other(format!(
                "writeback is not frozen at log position {at}"
            )));
        }
        let disk = &self.shared.disk;
        crate::freeze::repair(
            &self.shared.csum,
            offset,
            data,
            &mut |d, o| disk.write_vectored_at(&[d], o),
            &mut || disk.sync(),
        )
    }

    /// The table, not the disk, was damaged at block `b`: its checksum becomes `crc`.
    pub fn correct_checksum(&self, b: u64, crc: u32) {
        self.shared.csum.correct(b, crc)
    }

    /// The block checksums of this logger's disk.
    pub fn checksums(&self) -> &crate::csum::Csum {
        &self.shared.csum
    }
}
