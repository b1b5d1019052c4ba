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

    /// Hold writeback at `at`, where it must be frozen now, until the pin
    /// is dropped, whatever happens to the freeze meanwhile (its lease runs
    /// out, a thaw or another freeze by someone else): a repair or a
    /// checksum correction of the frozen moment writes under it, so that no
    /// record after `at` reaches the disk before it is done (it would be
    /// overwritten with the older data).
    pub fn pin_frozen(&self, at: u64) -> io::Result<FreezePin<'_>> {
        let mut wb = self.shared.wb.lock();
        let applied = self.shared.applied_pos.load(Ordering::Acquire);
        let frozen = match wb.hold {
            Some((h, until)) => h == applied && !wb.applying && Instant::now() < until,
            None => false,
        } || wb.pin.is_some_and(|(p, _)| p == applied && !wb.applying);
        if wb.writer_done {
            // Closed (a demotion or a stop): the disk may belong to a
            // secondary's replay already, which no freeze here holds.
            return Err(closed());
        }
        if !frozen || applied != at {
            return Err(io::Error::other(format!(
                "writeback is not frozen at log position {at} (the freeze's lease ran out?)"
            )));
        }
        wb.pin = Some((at, wb.pin.map_or(1, |(_, n)| n + 1)));
        Ok(FreezePin(self))
    }

    /// Write good blocks of the frozen moment (from another copy) into the
    /// disk: they are repaired.
    pub fn frozen_repair(&self, at: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let _pin = self.pin_frozen(at)?;
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

/// Writeback held at a frozen position while it lives ([`Logger::pin_frozen`]).
pub struct FreezePin<'a>(&'a Logger);

impl Drop for FreezePin<'_> {
    fn drop(&mut self) {
        let sh = &self.0.shared;
        let mut wb = sh.wb.lock();
        wb.pin = match wb.pin {
            Some((at, n)) if n > 1 => Some((at, n - 1)),
            _ => None,
        };
        sh.wb_cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::path::Path;

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn open(dir: &Path, size: u64) -> Logger {
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
        let logdir = dir.join("res");
        std::fs::create_dir_all(&logdir).unwrap();
        let mut cfg = crate::Config::new("alpha", &logdir, &disk, size, 42);
        cfg.idle_sync = Duration::from_millis(1);
        Logger::open(cfg).unwrap()
    }

    fn applied(l: &Logger) -> u64 {
        l.shared.applied_pos.load(Ordering::Acquire)
    }

    /// A logger closed while frozen (a demotion during a verify: its disk
    /// goes to the secondary's replay, which this freeze does not hold)
    /// takes no repair any more.
    #[test]
    fn a_closed_logger_takes_no_repair() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path(), 1 << 20);
        let at = applied(&l);
        assert_eq!(
            l.freeze(at, Duration::from_secs(5)).unwrap(),
            Frozen::At(at)
        );
        l.close();
        assert!(l.frozen_repair(at, 0, &[7u8; 4096]).is_err());
        assert!(std::fs::read(dir.path().join("disk.img")).unwrap()[..4096]
            .iter()
            .all(|&b| b == 0));
    }

    /// A repair writes blocks of the frozen moment T. Whatever happens to the
    /// freeze meanwhile (its lease runs out, another coordinator thaws it or
    /// freezes at a later position), writeback must not apply a record after
    /// T to those blocks before the repair's write is done: the repair would
    /// then lay T's data over the newer write, and with its checksum set from
    /// that data, clients would read the old data with nothing to notice.
    #[test]
    fn a_thaw_during_a_repair_never_lets_the_repair_overwrite_a_newer_write() {
        const BIG: u64 = 256 << 20;
        let dir = tempfile::tempdir().unwrap();
        let l = std::sync::Arc::new(open(dir.path(), BIG));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let last = BIG - 4096;
        rt.block_on(l.write(last, Bytes::from(vec![1u8; 4096]), false))
            .unwrap();
        rt.block_on(l.flush()).unwrap();
        let end = l.shared.logged_pos.load(Ordering::Acquire);
        wait_until("writeback", || applied(&l) >= end);
        let t = match l.freeze(end, Duration::from_secs(5)).unwrap() {
            Frozen::At(t) | Frozen::Ahead(t) => t,
        };
        // The repair: the whole disk as it is at T (its last block: 1s).
        let mut data = vec![0u8; BIG as usize];
        data[last as usize..].fill(1);
        let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let repair = {
            let (l, started) = (l.clone(), started.clone());
            std::thread::spawn(move || {
                started.store(true, Ordering::Release);
                l.frozen_repair(t, 0, &data)
            })
        };
        wait_until("the repair to start", || started.load(Ordering::Acquire));
        // Another coordinator's thaw, and a client's write of the last block.
        l.release_freeze();
        rt.block_on(l.write(last, Bytes::from(vec![2u8; 4096]), false))
            .unwrap();
        rt.block_on(l.flush()).unwrap();
        let end2 = l.shared.logged_pos.load(Ordering::Acquire);
        repair.join().unwrap().unwrap();
        wait_until("writeback of the new write", || applied(&l) >= end2);
        let got = l.read(last, 4096).unwrap();
        assert!(
            got.iter().all(|&b| b == 2),
            "the client's acknowledged, flushed write was undone by a repair of an older moment (read {:?}...)",
            &got[..4]
        );
        l.close();
    }
}
