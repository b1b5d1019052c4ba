//! Scrub (issue 18): a pass over every block of this node's copy of a
//! resource, at a rate limit, comparing what the disk returns with the
//! block checksums (`mars_logger::csum`). A block found bad is counted in the
//! member's `checksum_errors` and logged once (repair from a good member is
//! not built yet: docs/DEVELOPMENT.md).
//!
//! Started by `marsadm scrub RES`, or in the background once the last pass
//! of a resource is `scrub_interval_secs` old (node settings `scrub_rate_bytes`
//! and `scrub_interval_secs`). Reads go around the page cache (O_DIRECT where
//! the file system has it): a block the cache still holds from before the
//! device damaged it would hide the damage. A write that races a read is
//! told from damage by the checksum table's own write count
//! (`Csum::verify` looks again once the write is through).

use anyhow::{bail, Result};
use mars_logger::csum::{self, CsumHandle, BLOCK};
use mars_logger::disk::{AlignedBuf, DIRECT_ALIGN};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a resource's last finished pass is kept (resource directory).
pub const LAST_FILE: &str = "scrub.json";
/// Bytes read at once.
const CHUNK: usize = 1 << 20;

// What a pass found, as kept in `scrub.json` and shown in the view: the
// view's own types (`mars_api`), one shape for both.
pub use mars_api::{LastScrub, ScrubError as ErrorKind, ScrubView};

#[derive(Default)]
struct Slot {
    running: Option<(u64, u64)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The scrubs of this node's resources.
#[derive(Default)]
pub struct Scrubs(Mutex<HashMap<PathBuf, Slot>>);

impl Scrubs {
    /// Start a pass over the copy in resource directory `dir` at `rate`
    /// bytes per second (0: no limit). False when one runs already; an error
    /// when the disk is not open here (no checksums to compare with).
    pub fn start(self: &Arc<Self>, dir: &Path, rate: u64) -> Result<bool> {
        let Some(handle) = csum::find(dir) else {
            bail!("the disk is not open here (attach it first): nothing to scrub");
        };
        let stop = {
            let mut m = self.0.lock();
            let slot = m.entry(dir.to_path_buf()).or_default();
            if slot.running.is_some() {
                return Ok(false);
            }
            slot.running = Some((0, handle.covered()));
            slot.stop = Arc::new(AtomicBool::new(false));
            slot.stop.clone()
        };
        let (me, dir) = (self.clone(), dir.to_path_buf());
        let key = dir.clone();
        let spawned = std::thread::Builder::new()
            .name("mars-scrub".into())
            .spawn(move || {
                let last = pass(&handle, rate, &stop, |done, total| {
                    if let Some(s) = me.0.lock().get_mut(&dir) {
                        s.running = Some((done, total));
                    }
                });
                drop(handle);
                if let Err(e) = mars_logger::crashsafe::write_atomic(
                    &dir.join(LAST_FILE),
                    &serde_json::to_vec(&last).unwrap_or_default(),
                ) {
                    tracing::warn!(dir = %dir.display(), "cannot record the scrub: {e}");
                }
                if let Some(s) = me.0.lock().get_mut(&dir) {
                    s.running = None;
                }
            });
        let mut m = self.0.lock();
        match spawned {
            Ok(h) => {
                if let Some(slot) = m.get_mut(&key) {
                    slot.thread = Some(h);
                }
                Ok(true)
            }
            Err(e) => {
                if let Some(slot) = m.get_mut(&key) {
                    slot.running = None;
                }
                Err(e.into())
            }
        }
    }

    /// Stop every pass and wait for them to end (their handles of the
    /// checksum tables gone, so that the last close of each is clean): the
    /// daemon's shutdown, before its resources close.
    pub fn stop_all(&self) {
        let threads: Vec<_> = self
            .0
            .lock()
            .values_mut()
            .filter_map(|s| {
                s.stop.store(true, Ordering::Release);
                s.thread.take()
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }

    pub fn view(&self, dir: &Path) -> ScrubView {
        ScrubView {
            running: self.0.lock().get(dir).and_then(|s| s.running),
            last: last(dir),
        }
    }

    /// Start a pass where the last one is older than `interval` (or none was
    /// made: counted from when the resource directory was made).
    pub fn due(self: &Arc<Self>, dir: &Path, interval: Duration, rate: u64, now_ms: u64) {
        if interval.is_zero() || csum::find(dir).is_none() {
            return;
        }
        // A pass stopped early (a detach, the daemon's stop) is not a pass:
        // the next one is due at once.
        let since = last(dir)
            .filter(|l| l.error != Some(ErrorKind::Stopped))
            .map(|l| l.finished_ms)
            .or_else(|| {
                let m = std::fs::metadata(dir).ok()?.modified().ok()?;
                Some(m.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
            });
        if since.is_some_and(|t| now_ms.saturating_sub(t) >= interval.as_millis() as u64) {
            if let Ok(true) = self.start(dir, rate) {
                tracing::info!(dir = %dir.display(), "background scrub started");
            }
        }
    }
}

/// The last finished pass over the copy in `dir`.
pub fn last(dir: &Path) -> Option<LastScrub> {
    serde_json::from_slice(&std::fs::read(dir.join(LAST_FILE)).ok()?).ok()
}

/// One pass over every block the checksum table covers.
fn pass(
    handle: &CsumHandle,
    rate: u64,
    stop: &AtomicBool,
    mut progress: impl FnMut(u64, u64),
) -> LastScrub {
    let total = handle.covered();
    let disk = handle.disk_path().to_path_buf();
    let mut out = LastScrub::default();
    let direct = mars_logger::disk::open_direct_read(&disk);
    let file = match direct.as_ref().map(|f| f.try_clone()) {
        Some(Ok(f)) => Ok(f),
        _ => std::fs::File::open(&disk),
    };
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(disk = %disk.display(), "scrub cannot open the disk: {e}");
            out.error = Some(ErrorKind::ReadFailed);
            out.finished_ms = now_ms();
            return out;
        }
    };
    tracing::info!(disk = %disk.display(), bytes = total, rate, "scrub started");
    let started = Instant::now();
    let mut buf = AlignedBuf::new(CHUNK);
    let mut block = AlignedBuf::new(BLOCK as usize);
    let mut offset = 0u64;
    while offset < total {
        if stop.load(Ordering::Acquire) || !handle.others_open() {
            out.error = Some(ErrorKind::Stopped);
            break;
        }
        let len = (total - offset).min(CHUNK as u64) as usize;
        // O_DIRECT reads whole aligned pieces; the table covers whole blocks
        // but for the disk's last.
        let want = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let r = read_at(&file, &mut buf.room()[..want], offset).map(|n| n.min(len));
        let n = match r {
            Ok(n) if n == len => n,
            Ok(n) => {
                tracing::error!(disk = %disk.display(), offset, "scrub: the disk ends at {} (the table covers {total})", offset + n as u64);
                out.error = Some(ErrorKind::ReadFailed);
                break;
            }
            Err(e) => {
                tracing::error!(disk = %disk.display(), offset, "scrub: read failed: {e}");
                out.error = Some(ErrorKind::ReadFailed);
                break;
            }
        };
        let mut read_block = |b: &mut [u8], at: u64| -> std::io::Result<()> {
            let room = &mut block.room()[..BLOCK as usize];
            let got = read_at(&file, room, at)?;
            if got < b.len() {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            b.copy_from_slice(&room[..b.len()]);
            Ok(())
        };
        match handle.verify(offset, &mut buf.room()[..n], &|_, _| true, &mut read_block) {
            Ok(Ok(())) => {}
            Ok(Err(bad)) => out.bad_blocks += bad.blocks.len() as u64,
            Err(e) => {
                tracing::error!(disk = %disk.display(), offset, "scrub: read failed: {e}");
                out.error = Some(ErrorKind::ReadFailed);
                break;
            }
        }
        offset += n as u64;
        out.scanned = offset;
        progress(offset, total);
        // The rate limit: never ahead of `rate` bytes per second since the start.
        if rate > 0 {
            let due = Duration::from_secs_f64(offset as f64 / rate as f64);
            // (In slices: a stop, or the last other user gone, ends the pass
            // at once, not after a long sleep.)
            let until = started + due;
            while Instant::now() < until && !stop.load(Ordering::Acquire) && handle.others_open() {
                let left = until.saturating_duration_since(Instant::now());
                std::thread::sleep(left.min(Duration::from_millis(50))); // pacing, not synchronisation
            }
        }
    }
    out.finished_ms = now_ms();
    tracing::info!(disk = %disk.display(), scanned = out.scanned, bad_blocks = out.bad_blocks, "scrub ended");
    out
}

/// `pread` until `buf` is full or the file ends: the bytes read.
fn read_at(f: &std::fs::File, buf: &mut [u8], mut offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                offset += n as u64;
                if n % DIRECT_ALIGN != 0 {
                    break; // the end of the file (O_DIRECT reads no further from there)
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn now_ms() -> u64 {
    crate::peer::now_ms()
}
