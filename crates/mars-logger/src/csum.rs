//! Block checksums of a member's disk (issue 18): one crc32c per 4 KiB block,
//! kept in `resources/RES/csum` beside the resource's other state
//! (`docs/FORMAT.md`, "Block checksums").
//!
//! Every path that writes the disk updates the table right after its write
//! (writeback and recovery on the primary, replay and full sync on a
//! secondary), and makes the file durable where it makes the disk durable,
//! before the position that says "the disk holds everything up to here" is
//! persisted. Records after that position are applied again after a crash,
//! rewriting disk and checksums alike, so a crash at any moment leaves no
//! false checksum error (`docs/ARCHITECTURE.md`, "Block checksums").
//!
//! The table is held in memory (4 bytes per 4 KiB block: 1 GiB per TiB of
//! disk) and the pages of it that changed are written back at the sync points.
//! One table per file and process: [`open`] hands out handles of one shared
//! table; the last handle to go marks the file cleanly closed, with the disk's
//! size, inode and modification time, so that a disk written by someone else
//! while detached is found at the next open.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Bytes of disk per checksum.
pub const BLOCK: u64 = 4096;
/// The checksum file's name in the resource directory.
pub const FILE_NAME: &str = "csum";
const TMP_NAME: &str = ".csum.tmp";
const MAGIC: &[u8; 8] = b"MARSCSUM";
const VERSION: u32 = 1;
/// The header's length: the table starts on the next page.
pub const HEADER_LEN: u64 = 4096;
/// Bytes of the header covered by its crc32c (stored right after them).
const HEADER_FIELDS: usize = 72;
const FLAG_CLEAN: u32 = 1;
/// Checksums per page of the table (what is written back as one piece).
const PER_PAGE: usize = 1024;
/// Never more than this much disk (2^52 bytes: a 4 PiB disk, 4 TiB of table).
const MAX_COVERED: u64 = 1 << 52;

#[derive(Debug, thiserror::Error)]
pub enum CsumError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("checksum file {path} is damaged ({reason}); if the disk is known to be good, `marsadm attach RES --rebuild-checksums` computes them again from it")]
    Damaged { path: PathBuf, reason: String },
    #[error("disk {disk} was changed while it was detached ({what}): its block checksums no longer describe it; if that change was meant, `marsadm attach RES --rebuild-checksums` computes them again from the disk, else restore the disk or `marsadm invalidate RES` on a secondary")]
    ChangedWhileDetached { disk: PathBuf, what: String },
}

fn ioerr(path: &Path) -> impl FnOnce(io::Error) -> CsumError + '_ {
    move |source| CsumError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The header of a checksum file (`docs/FORMAT.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Disk bytes the table covers (its entries: this divided by 4 KiB, rounded up).
    pub covered: u64,
    /// Closed cleanly: the table and the disk agreed, and the disk's identity
    /// below was taken then.
    pub clean: bool,
    pub disk_len: u64,
    pub disk_ino: u64,
    pub disk_mtime_sec: i64,
    pub disk_mtime_nsec: u32,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.covered.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[24..28].copy_from_slice(&flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.disk_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.disk_ino.to_le_bytes());
        b[48..56].copy_from_slice(&self.disk_mtime_sec.to_le_bytes());
        b[56..60].copy_from_slice(&self.disk_mtime_nsec.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_FIELDS]);
        b[HEADER_FIELDS..HEADER_FIELDS + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Never panics, whatever `b` holds.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_FIELDS + 4 {
            return Err(format!("{} bytes, shorter than a header", b.len()));
        }
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if &b[0..8] != MAGIC {
            return Err("no MARSCSUM magic".into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "format version {version}, this build reads {VERSION}"
            ));
        }
        if u32_at(HEADER_FIELDS) != crc32c::crc32c(&b[..HEADER_FIELDS]) {
            return Err("header checksum mismatch".into());
        }
        let block = u32_at(12);
        if block as u64 != BLOCK {
            return Err(format!("block size {block}, this build uses {BLOCK}"));
        }
        let covered = u64_at(16);
        if covered > MAX_COVERED {
            return Err(format!("covers {covered} bytes, more than {MAX_COVERED}"));
        }
        let flags = u32_at(24);
        if flags & !FLAG_CLEAN != 0 || u32_at(28) != 0 || u32_at(60) != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        Ok(Header {
            covered,
            clean: flags & FLAG_CLEAN != 0,
            disk_len: u64_at(32),
            disk_ino: u64_at(40),
            disk_mtime_sec: u64_at(48) as i64,
            disk_mtime_nsec: u32_at(56),
        })
    }
}

/// Entries of a table covering `covered` bytes.
fn entries(covered: u64) -> usize {
    covered.div_ceil(BLOCK) as usize
}

/// What identifies the disk's content from outside: (length, inode, mtime s,
/// mtime ns); a block device's node changes with every boot and its mtime with
/// nothing, so only its length counts.
fn disk_identity(disk: &Path) -> io::Result<(u64, u64, i64, u32)> {
    let m = std::fs::metadata(disk)?;
    if m.file_type().is_block_device() {
        return Ok((crate::disk::disk_size(disk)?, 0, 0, 0));
    }
    Ok((m.len(), m.ino(), m.mtime(), m.mtime_nsec() as u32))
}

/// crc32c of each 4 KiB block of `data` (the last one may be shorter).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK as usize).map(crc32c::crc32c).collect()
}

fn zero_crc() -> u32 {
    static Z: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *Z.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK as usize]))
}

/// The table of one disk. Shared through [`CsumHandle`]s.
pub struct Csum {
    path: PathBuf,
    dir: PathBuf,
    disk: PathBuf,
    covered: u64,
    crcs: Vec<AtomicU32>,
    /// One bit per page of the table changed since it was last written.
    dirty: Vec<AtomicU64>,
    file: File,
    /// Held while table pages are written to the file: a page is written
    /// with the values it holds at the time, in the order they were read.
    file_lock: Mutex<()>,
    sync_lock: Mutex<()>,
    /// Writers to the disk at work, and a count bumped whenever one starts or
    /// ends: a read that mismatches while either moved raced a write.
    writers: AtomicU64,
    gen: AtomicU64,
    /// Some block was found bad (then rewrites take it off the list).
    any_bad: AtomicBool,
    /// A write failed to reach the file (the next sync reports it).
    failed: AtomicBool,
}

struct Registry {
    open: HashMap<PathBuf, (Arc<Csum>, usize)>,
    found: HashMap<PathBuf, bad::Found>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: std::sync::OnceLock<Mutex<Registry>> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        Mutex::new(Registry {
            open: HashMap::new(),
            found: HashMap::new(),
        })
    })
}

/// A handle of an open table; the last one released (or dropped) closes the
/// file cleanly.
pub struct CsumHandle(Arc<Csum>, AtomicBool);

impl std::ops::Deref for CsumHandle {
    type Target = Csum;
    fn deref(&self) -> &Csum {
        &self.0
    }
}

impl Clone for CsumHandle {
    fn clone(&self) -> Self {
        let mut r = registry().lock();
        let released = match r.open.get_mut(&self.0.path) {
            Some((c, n)) if Arc::ptr_eq(c, &self.0) && !self.1.load(Ordering::Acquire) => {
                *n += 1;
                false
            }
            // A clone of a released handle holds the table, not the file.
            _ => true,
        };
        CsumHandle(self.0.clone(), AtomicBool::new(released))
    }
}

impl CsumHandle {
    fn new(c: Arc<Csum>) -> CsumHandle {
        CsumHandle(c, AtomicBool::new(false))
    }

    /// Whether another handle than this one holds the file open (the disk's
    /// logger, replay or sync): a scrub stops when it is the last user.
    pub fn others_open(&self) -> bool {
        let r = registry().lock();
        match r.open.get(&self.0.path) {
            Some((c, n)) if Arc::ptr_eq(c, &self.0) => *n > 1,
            _ => false,
        }
    }

    /// Give the file up now (the table stays readable through this handle):
    /// a logger that closes while something still holds it.
    pub fn release(&self) {
        if self.1.swap(true, Ordering::AcqRel) {
            return;
        }
        // Under the registry's lock: an open of the same file waits until the
        // clean close is written.
        let mut r = registry().lock();
        let last = match r.open.get_mut(&self.0.path) {
            Some((c, n)) if Arc::ptr_eq(c, &self.0) => {
                *n -= 1;
                *n == 0
            }
            _ => false,
        };
        if last {
            r.open.remove(&self.0.path);
            if let Err(e) = self.0.close_clean() {
                tracing::warn!(path = %self.0.path.display(), "block checksums: closing: {e} (the next start finds them not closed cleanly, which is fine)");
            }
        }
    }
}

impl Drop for CsumHandle {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for CsumHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CsumHandle({})", self.0.path.display())
    }
}

/// Open (or build, reading the whole disk once) the checksums of `disk` kept
/// in resource directory `dir`. Refuses a disk that changed while its
/// checksums were cleanly closed, and a damaged file.
pub fn open(dir: &Path, disk: &Path) -> Result<CsumHandle, CsumError> {
    let path = dir.join(FILE_NAME);
    let mut r = registry().lock();
    if let Some((c, n)) = r.open.get_mut(&path) {
        *n += 1;
        return Ok(CsumHandle::new(c.clone()));
    }
    let c = Arc::new(Csum::load_or_build(dir, disk)?);
    c.load_found(&mut r);
    r.open.insert(path, (c.clone(), 1));
    Ok(CsumHandle::new(c))
}

/// The open table of resource directory `dir`, if some part of this process has it open.
pub fn find(dir: &Path) -> Option<CsumHandle> {
    let mut r = registry().lock();
    let (c, n) = r.open.get_mut(&dir.join(FILE_NAME))?;
    *n += 1;
    Some(CsumHandle::new(c.clone()))
}

/// Remove the checksum file of `dir` so that the next open computes it from
/// the disk (`attach --rebuild-checksums`). Refused while it is open.
pub fn discard(dir: &Path) -> io::Result<bool> {
    let path = dir.join(FILE_NAME);
    let mut r = registry().lock();
    if r.open.contains_key(&path) {
        return Err(io::Error::other(
            "the block checksums are in use (the disk is attached and running): detach first",
        ));
    }
    // Computed anew from the disk: nothing is known bad in it any more.
    if let Some(f) = r.found.get_mut(&path) {
        f.bad.clear();
    }
    bad::forget(dir)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {
            crate::crashsafe::sync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocks whose checksum did not match what the disk held (a stable
/// mismatch, read twice): the place a repair would start from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadBlocks {
    pub disk: PathBuf,
    /// Block numbers (disk offset / 4 KiB), ascending.
    pub blocks: Vec<u64>,
}

impl std::fmt::Display for BadBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block checksum mismatch in {}: {}",
            self.disk.display(),
            ranges(&self.blocks)
        )
    }
}

impl From<BadBlocks> for io::Error {
    /// EIO to an NBD client (`mars_nbd::errno_for`), with the blocks named.
    fn from(b: BadBlocks) -> io::Error {
        io::Error::other(b.to_string())
    }
}

/// Blocks as byte ranges: `[a, b) [c, d)` of the disk.
pub fn ranges(blocks: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let mut j = i;
        while j + 1 < blocks.len() && blocks[j + 1] == blocks[j] + 1 {
            j += 1;
        }
        out.push(format!(
            "bytes {}..{} (blocks {}..={})",
            blocks[i] * BLOCK,
            (blocks[j] + 1) * BLOCK,
            blocks[i],
            blocks[j]
        ));
        i = j + 1;
    }
    out.join(", ")
}

/// A snapshot of the writers' state before a disk read (see [`Csum::stable_since`]).
#[derive(Clone, Copy, Debug)]
pub struct Snap {
    writers: u64,
    gen: u64,
}

/// A write to the disk in progress (see [`Csum::writing`]).
pub struct Writing<'a>(&'a Csum);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.gen.fetch_add(1, Ordering::SeqCst);
        self.0.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a read whose block keeps being rewritten waits for a quiet moment
/// before it calls a mismatch a mismatch.
const RACE_PATIENCE: Duration = Duration::from_secs(10);

impl Csum {
    fn load_or_build(dir: &Path, disk: &Path) -> Result<Csum, CsumError> {
        let path = dir.join(FILE_NAME);
        let ident = disk_identity(disk).map_err(ioerr(disk))?;
        let disk_len = ident.0;
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Self::build(dir, disk, disk_len);
            }
            Err(e) => return Err(ioerr(&path)(e)),
        };
        let damaged = |reason: String| CsumError::Damaged {
            path: path.clone(),
            reason,
        };
        let mut hb = vec![0u8; HEADER_LEN as usize];
        let file_len = file.metadata().map_err(ioerr(&path))?.len();
        if file_len < HEADER_LEN {
            return Err(damaged(format!(
                "{file_len} bytes, shorter than its header"
            )));
        }
        file.read_exact_at(&mut hb, 0).map_err(ioerr(&path))?;
        let h = Header::decode(&hb).map_err(damaged)?;
        let n = entries(h.covered);
        let need = HEADER_LEN + 4 * n as u64;
        if file_len < need {
            return Err(damaged(format!(
                "{file_len} bytes, its table of {n} blocks needs {need}"
            )));
        }
        if disk_len < h.covered {
            return Err(CsumError::ChangedWhileDetached {
                disk: disk.to_path_buf(),
                what: format!("it is {disk_len} bytes, its checksums cover {}", h.covered),
            });
        }
        if h.clean {
            let (len, ino, sec, nsec) = ident;
            let moved = ino != h.disk_ino;
            let grown = len > h.disk_len;
            // A grown disk (an offline resize) keeps its old blocks: only those
            // beyond are computed; any other change of length, inode or time is
            // a write nobody here made.
            let what = if moved {
                Some(format!("another file now: inode {ino}, was {}", h.disk_ino))
            } else if len < h.disk_len {
                Some(format!("it shrank from {} to {len} bytes", h.disk_len))
            } else if !grown && (sec, nsec) != (h.disk_mtime_sec, h.disk_mtime_nsec) {
                Some(format!(
                    "modified at {sec}.{nsec:09}, closed at {}.{:09}",
                    h.disk_mtime_sec, h.disk_mtime_nsec
                ))
            } else {
                None
            };
            if let Some(what) = what {
                return Err(CsumError::ChangedWhileDetached {
                    disk: disk.to_path_buf(),
                    what,
                });
            }
            if grown {
                tracing::warn!(disk = %disk.display(), from = h.disk_len, to = len, "disk grew while detached: checksums of the new blocks computed from it");
            }
        }
        let mut raw = vec![0u8; 4 * n];
        file.read_exact_at(&mut raw, HEADER_LEN)
            .map_err(ioerr(&path))?;
        let crcs: Vec<AtomicU32> = raw
            .chunks_exact(4)
            .map(|c| AtomicU32::new(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        drop(raw);
        let mut c = Csum::new(dir, disk, path.clone(), file, h.covered, crcs);
        if disk_len > h.covered {
            c.grow(disk_len).map_err(ioerr(disk))?;
        }
        // Not closed cleanly from here on until the last handle goes: the
        // disk is about to be written.
        c.write_header(false, (0, 0, 0, 0)).map_err(ioerr(&path))?;
        c.sync().map_err(ioerr(&path))?;
        Ok(c)
    }

    fn new(
        dir: &Path,
        disk: &Path,
        path: PathBuf,
        file: File,
        covered: u64,
        crcs: Vec<AtomicU32>,
    ) -> Csum {
        let pages = crcs.len().div_ceil(PER_PAGE);
        Csum {
            path,
            dir: dir.to_path_buf(),
            disk: disk.to_path_buf(),
            covered,
            crcs,
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            file,
            file_lock: Mutex::new(()),
            sync_lock: Mutex::new(()),
            writers: AtomicU64::new(0),
            gen: AtomicU64::new(0),
            any_bad: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        }
    }

    /// Cover the disk up to `len` (it grew): the blocks from the last one
    /// covered on are computed from the disk.
    fn grow(&mut self, len: u64) -> io::Result<()> {
        let from = (self.covered / BLOCK) * BLOCK;
        let n = entries(len);
        self.crcs.resize_with(n, || AtomicU32::new(0));
        let pages = n.div_ceil(PER_PAGE);
        self.dirty
            .resize_with(pages.div_ceil(64), || AtomicU64::new(0));
        self.covered = len;
        let disk = File::open(&self.disk)?;
        compute_from_disk(&disk, &self.disk, from, len, |b, crc| self.set(b, crc))?;
        Ok(())
    }

    /// A new file from the whole disk (holes of a sparse file are not read).
    fn build(dir: &Path, disk: &Path, len: u64) -> Result<Csum, CsumError> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(TMP_NAME);
        let n = entries(len);
        let crcs: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        // A list of bad blocks was of the table computed before.
        bad::forget(dir).map_err(ioerr(&dir.join(BAD_FILE)))?;
        let f = File::open(disk).map_err(ioerr(disk))?;
        tracing::info!(disk = %disk.display(), bytes = len, "computing block checksums of the disk (read once)");
        let t0 = Instant::now();
        compute_from_disk(&f, disk, 0, len, |b, crc| {
            crcs[b as usize].store(crc, Ordering::Relaxed)
        })
        .map_err(ioerr(disk))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(ioerr(&tmp))?;
        let c = Csum::new(dir, disk, tmp.clone(), file, len, crcs);
        let written = (|| -> io::Result<()> {
            c.write_header(false, (0, 0, 0, 0))?;
            c.file.set_len(HEADER_LEN + 4 * n as u64)?;
            for page in 0..n.div_ceil(PER_PAGE) {
                c.write_page(page)?;
            }
            c.file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            crate::crashsafe::sync_dir(dir)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(ioerr(&path)(e));
        }
        tracing::info!(disk = %disk.display(), bytes = len, took = ?t0.elapsed(), "block checksums computed");
        Ok(Csum { path, ..c })
    }

    fn write_header(&self, clean: bool, ident: (u64, u64, i64, u32)) -> io::Result<()> {
        let h = Header {
            covered: self.covered,
            clean,
            disk_len: ident.0,
            disk_ino: ident.1,
            disk_mtime_sec: ident.2,
            disk_mtime_nsec: ident.3,
        };
        self.file.write_all_at(&h.encode(), 0)
    }

    /// The last handle went: table and disk made durable, then the header
    /// says closed cleanly with the disk's identity.
    fn close_clean(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other("an earlier write of the table failed"));
        }
        let disk = File::open(&self.disk)?;
        disk.sync_data()?;
        self.sync()?;
        let ident = disk_identity(&self.disk)?;
        self.write_header(true, ident)?;
        self.file.sync_data()
    }

    /// Disk bytes covered (the disk's length when opened).
    pub fn covered(&self) -> u64 {
        self.covered
    }

    pub fn disk_path(&self) -> &Path {
        &self.disk
    }

    /// The stored checksums of blocks `first..first+n` (those beyond the
    /// table left out).
    pub fn table(&self, first: u64, n: usize) -> Vec<u32> {
        let from = (first as usize).min(self.crcs.len());
        let to = from.saturating_add(n).min(self.crcs.len());
        self.crcs[from..to]
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .collect()
    }

    /// The stored checksum of block `b` (None beyond the table).
    pub fn get(&self, b: u64) -> Option<u32> {
        self.crcs.get(b as usize).map(|c| c.load(Ordering::Acquire))
    }

    fn set(&self, b: u64, crc: u32) {
        let Some(slot) = self.crcs.get(b as usize) else {
            return;
        };
        slot.store(crc, Ordering::SeqCst);
        let page = b as usize / PER_PAGE;
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::SeqCst);
        // A rewritten block is good again (until found bad anew).
        self.unmark(b);
    }

    /// Announce a write to the disk: reads that raced it retry instead of
    /// calling a mismatch bad. Hold the guard from before the disk write until
    /// the checksums are updated.
    pub fn writing(&self) -> Writing<'_> {
        self.writers.fetch_add(1, Ordering::SeqCst);
        self.gen.fetch_add(1, Ordering::SeqCst);
        Writing(self)
    }

    /// Take before reading the disk.
    pub fn snap(&self) -> Snap {
        Snap {
            writers: self.writers.load(Ordering::SeqCst),
            gen: self.gen.load(Ordering::SeqCst),
        }
    }

    /// No write to the disk ran at any time since `s` was taken.
    pub fn stable_since(&self, s: Snap) -> bool {
        s.writers == 0 && self.gen.load(Ordering::SeqCst) == s.gen
    }

    /// The disk now holds `bufs` (back to back) from `offset`: set the
    /// checksums of the blocks they cover, computed from them where they
    /// cover a whole block, else from the whole block read back through
    /// `read` (a partial-block write; the read is of data just written, in
    /// the page cache).
    pub fn written(
        &self,
        offset: u64,
        bufs: &[&[u8]],
        read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let end = (offset + len).min(self.covered);
        if offset >= end {
            return Ok(());
        }
        // Whole blocks: from the buffers, a block spanning two of them summed
        // across (crc32c_append).
        let mut at = offset;
        let mut crc = 0u32;
        // The current block began inside the buffers (else its start is old data).
        let mut whole = offset.is_multiple_of(BLOCK);
        for b in bufs {
            let mut b = *b;
            while !b.is_empty() && at < end {
                let block_end = ((at / BLOCK + 1) * BLOCK).min(self.covered);
                let n = (b.len() as u64).min(block_end - at) as usize;
                if whole {
                    crc = crc32c::crc32c_append(crc, &b[..n]);
                }
                at += n as u64;
                b = &b[n..];
                if at == block_end {
                    if whole {
                        self.set((block_end - 1) / BLOCK, crc);
                    }
                    crc = 0;
                    whole = true;
                }
            }
        }
        // Partial blocks at either end: from the disk.
        let first = offset / BLOCK;
        if !offset.is_multiple_of(BLOCK) {
            self.recompute(first, read)?;
        }
        let last = (end - 1) / BLOCK;
        let last_end = ((last + 1) * BLOCK).min(self.covered);
        // (Not the first block again: done above.)
        if end < last_end && (last != first || offset.is_multiple_of(BLOCK)) {
            self.recompute(last, read)?;
        }
        Ok(())
    }

    /// Apply one log record of `kind` to `disk` and to these checksums: a
    /// write of `payload` at `offset`, or `[offset, offset+len)` trimmed or
    /// zeroed (recovery and replay, record by record).
    pub fn apply_record(
        &self,
        disk: &crate::disk::Disk,
        kind: mars_logfmt::Kind,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        use mars_logfmt::Kind;
        let mut read = |b: &mut [u8], o: u64| disk.read_exact_at(b, o);
        // No `before_write` here: recovery and replay apply records again
        // after a crash, where disk and table may legitimately disagree for
        // the blocks those records write (the record puts both right), and a
        // check would call them bad. A block already known bad keeps its
        // checksum all the same (`recompute`).
        match kind {
            Kind::Write => disk
                .write_vectored_at(&[payload], offset)
                .and_then(|()| self.written(offset, &[payload], &mut read)),
            Kind::Trim => disk
                .zero_range(offset, len, true)
                .and_then(|()| self.zeroed(offset, len, &mut read)),
            Kind::WriteZeroes => disk
                .zero_range(offset, len, false)
                .and_then(|()| self.zeroed(offset, len, &mut read)),
        }
    }

    /// `[offset, offset+len)` reads as zeroes now (trim, write-zeroes).
    pub fn zeroed(
        &self,
        offset: u64,
        len: u64,
        read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = (offset + len).min(self.covered);
        if offset >= end {
            return Ok(());
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        for b in first..=last {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.covered));
            if bs >= offset && be <= end && be - bs == BLOCK {
                self.set(b, zero_crc());
            } else {
                self.recompute(b, read)?;
            }
        }
        Ok(())
    }

    /// Set the checksums of the blocks of `[offset, offset+len)` (block-aligned)
    /// to `crcs`, [`block_crcs`] of what the disk holds there (a full sync's
    /// block found equal: computed from what it read). A short last piece that
    /// is not the whole of its block (the disk goes on) is left as it is.
    pub fn set_blocks(&self, offset: u64, len: u64, crcs: &[u32]) {
        let first = offset / BLOCK;
        for (i, &c) in crcs.iter().enumerate() {
            let b = first + i as u64;
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.covered));
            if (offset + len).min(be) - bs.min(offset + len) == be.saturating_sub(bs) {
                self.set(b, c);
            }
        }
    }

    /// What a kill leaves: the file marked not closed cleanly. Tests simulate
    /// kills by dropping handles, which close cleanly.
    #[doc(hidden)]
    pub fn mark_unclean(dir: &Path) -> io::Result<()> {
        let path = dir.join(FILE_NAME);
        let f = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut hb = vec![0u8; HEADER_LEN as usize];
        f.read_exact_at(&mut hb, 0)?;
        let mut h = Header::decode(&hb).map_err(io::Error::other)?;
        h.clean = false;
        f.write_all_at(&h.encode(), 0)
    }

    fn recompute(
        &self,
        b: u64,
        read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.covered));
        if bs >= be {
            return Ok(());
        }
        // A block known bad keeps its checksum: computed from the block read
        // back, it would take in the rot outside the part just written, and
        // the rot would read as good data from then on. It stays bad (EIO)
        // until a write of the whole block or a repair.
        if self.is_bad(b) {
            return Ok(());
        }
        let mut buf = [0u8; BLOCK as usize];
        read(&mut buf[..(be - bs) as usize], bs)?;
        self.set(b, crc32c::crc32c(&buf[..(be - bs) as usize]));
        Ok(())
    }

    /// Before a write of `[offset, offset+len)` to the disk, where disk and
    /// table agree but for damage (the primary's writeback): the blocks it
    /// covers only in part are checked against their checksums (read whole:
    /// usually from the page cache), and one that mismatches is found bad
    /// now, so that the write does not recompute its rot into a valid
    /// checksum (see `recompute`). Whole blocks need nothing: their new
    /// checksum comes from the data written.
    pub fn before_write(
        &self,
        offset: u64,
        len: u64,
        read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = (offset + len).min(self.covered);
        if offset >= end {
            return Ok(());
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let last_end = ((last + 1) * BLOCK).min(self.covered);
        // The first and last block when written only in part (no allocation:
        // this runs for every write the primary's writeback applies).
        let head = (!offset.is_multiple_of(BLOCK)).then_some(first);
        let tail = (end < last_end && head != Some(last)).then_some(last);
        if head.is_none() && tail.is_none() {
            return Ok(());
        }
        let mut buf = [0u8; BLOCK as usize];
        for b in head.into_iter().chain(tail) {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.covered));
            let n = (be - bs) as usize;
            read(&mut buf[..n], bs)?;
            if self.get(b) != Some(crc32c::crc32c(&buf[..n])) {
                // Read again once (a transient error), then it is bad.
                read(&mut buf[..n], bs)?;
                if self.get(b) != Some(crc32c::crc32c(&buf[..n])) {
                    self.found(&[b]);
                }
            }
        }
        Ok(())
    }

    /// Blocks of `[offset, offset+data.len())` (block-aligned, whole blocks
    /// but for the disk's last) whose checksum differs from `data`. Blocks
    /// beyond the table are not checked.
    pub fn mismatches(&self, offset: u64, data: &[u8]) -> Vec<u64> {
        let first = offset / BLOCK;
        let mut bad = Vec::new();
        for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
            let b = first + i as u64;
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.covered));
            if bs >= self.covered || chunk.len() as u64 != be - bs {
                continue;
            }
            if self.get(b) != Some(crc32c::crc32c(chunk)) {
                bad.push(b);
            }
        }
        bad
    }

    /// The blocks of a disk read (`buf` at `offset`) whose checksum differs,
    /// among those `check(block_start, block_end)` asks for; blocks only
    /// partly in `buf` are read whole through `read`. No second look: see
    /// [`Csum::verify`].
    pub fn suspects(
        &self,
        offset: u64,
        buf: &[u8],
        check: &dyn Fn(u64, u64) -> bool,
        read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<Vec<u64>> {
        let end = (offset + buf.len() as u64).min(self.covered);
        let mut suspects = Vec::new();
        if offset >= end {
            return Ok(suspects);
        }
        let mut block = [0u8; BLOCK as usize];
        for b in offset / BLOCK..=(end - 1) / BLOCK {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.covered));
            if !check(bs, be) {
                continue;
            }
            let crc = if bs >= offset && be <= offset + buf.len() as u64 {
                let at = (bs - offset) as usize;
                crc32c::crc32c(&buf[at..at + (be - bs) as usize])
            } else {
                read(&mut block[..(be - bs) as usize], bs)?;
                crc32c::crc32c(&block[..(be - bs) as usize])
            };
            if self.get(b) != Some(crc) {
                suspects.push(b);
            }
        }
        Ok(suspects)
    }

    /// Check what a read found on the disk: `buf` holds the disk's bytes at
    /// `offset`. Every block that `check(block_start,
    /// block_end)` asks for is compared with its checksum (blocks only partly
    /// in `buf` are read whole through `read`). A mismatch is read again
    /// (a transient read error, or a write that raced the read: then again
    /// once no write runs) and the fresh bytes replace those in `buf`; a block
    /// that mismatches twice with no write in between is bad: counted, logged
    /// once, and returned.
    pub fn verify(
        &self,
        offset: u64,
        buf: &mut [u8],
        check: &dyn Fn(u64, u64) -> bool,
        read: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<Result<(), BadBlocks>> {
        let suspects = self.suspects(offset, buf, check, read)?;
        if suspects.is_empty() {
            return Ok(Ok(()));
        }
        let mut bad = Vec::new();
        let mut block = [0u8; BLOCK as usize];
        for b in suspects {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(self.covered));
            let n = (be - bs) as usize;
            let started = Instant::now();
            let mut stable_misses = 0;
            loop {
                let s = self.snap();
                read(&mut block[..n], bs)?;
                if self.get(b) == Some(crc32c::crc32c(&block[..n])) {
                    // Good now: its bytes replace what the first read found.
                    let (from, to) = (bs.max(offset), be.min(offset + buf.len() as u64));
                    buf[(from - offset) as usize..(to - offset) as usize]
                        .copy_from_slice(&block[(from - bs) as usize..(to - bs) as usize]);
                    break;
                }
                if self.stable_since(s) || started.elapsed() >= RACE_PATIENCE {
                    stable_misses += 1;
                    if stable_misses >= 2 || started.elapsed() >= RACE_PATIENCE {
                        bad.push(b);
                        break;
                    }
                } else {
                    // A write of the disk runs: look again once it is through.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        if bad.is_empty() {
            return Ok(Ok(()));
        }
        self.found(&bad);
        Ok(Err(BadBlocks {
            disk: self.disk.clone(),
            blocks: bad,
        }))
    }

    /// Write the table's entries for `[offset, offset+len)` to the file now
    /// (page cache, not synced): replay does this before its high-water mark,
    /// so that a kill keeps them as it keeps the disk's writes.
    pub fn write_through(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = (offset + len).min(self.covered);
        if offset >= end {
            return Ok(());
        }
        let (first, last) = ((offset / BLOCK) as usize, ((end - 1) / BLOCK) as usize);
        let _l = self.file_lock.lock();
        let raw: Vec<u8> = self.crcs[first..=last]
            .iter()
            .flat_map(|c| c.load(Ordering::SeqCst).to_le_bytes())
            .collect();
        self.file
            .write_all_at(&raw, HEADER_LEN + 4 * first as u64)
            .inspect_err(|_| self.failed.store(true, Ordering::Release))
    }

    fn write_page(&self, page: usize) -> io::Result<()> {
        let from = page * PER_PAGE;
        let to = (from + PER_PAGE).min(self.crcs.len());
        let raw: Vec<u8> = self.crcs[from..to]
            .iter()
            .flat_map(|c| c.load(Ordering::SeqCst).to_le_bytes())
            .collect();
        self.file.write_all_at(&raw, HEADER_LEN + 4 * from as u64)
    }

    /// Write the changed pages of the table to the file (not synced).
    pub fn flush(&self) -> io::Result<()> {
        let _l = self.file_lock.lock();
        for (w, word) in self.dirty.iter().enumerate() {
            let bits = word.swap(0, Ordering::SeqCst);
            let mut rest = bits;
            while rest != 0 {
                let i = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                if let Err(e) = self.write_page(w * 64 + i) {
                    // Written again next time.
                    word.fetch_or(rest | (1 << i), Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Make the table durable as it is now: call after the disk's sync and
    /// before persisting the position that sync covers.
    pub fn sync(&self) -> io::Result<()> {
        let _s = self.sync_lock.lock();
        self.flush()?;
        if let Err(e) = self.file.sync_data() {
            // The kernel may have dropped the pages it failed to write, and
            // reports that once: a later sync of nothing would succeed and a
            // position be persisted over a table that never reached the disk.
            // Every page is written again at the next sync.
            self.mark_all_dirty();
            return Err(e);
        }
        Ok(())
    }

    fn mark_all_dirty(&self) {
        for page in 0..self.crcs.len().div_ceil(PER_PAGE) {
            self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::SeqCst);
        }
    }
}

/// Compute the checksums of `[from, to)` of `disk` (from block-aligned),
/// handing each block's to `set`; holes of a sparse file are zero blocks,
/// not read. Logs progress every 10 s.
fn compute_from_disk(
    disk: &File,
    path: &Path,
    from: u64,
    to: u64,
    set: impl Fn(u64, u32),
) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = from;
    let mut last_log = Instant::now();
    let zero = zero_crc();
    while at < to {
        // SAFETY: plain syscall on an owned descriptor.
        let data = unsafe { libc::lseek(disk.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        let data = if data >= 0 {
            data as u64
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            to // no data from here on (a new file made with fallocate is all hole)
        } else {
            at // no SEEK_DATA here: read it
        };
        // A hole up to `data`: zero blocks (whole ones only; the block holding
        // `data` is read).
        let hole_end = (data.min(to) / BLOCK) * BLOCK;
        while at + BLOCK <= hole_end {
            set(at / BLOCK, zero);
            at += BLOCK;
        }
        if at >= to {
            break;
        }
        let n = CHUNK.min(to - at) as usize;
        disk.read_exact_at(&mut buf[..n], at)?;
        for (i, c) in buf[..n].chunks(BLOCK as usize).enumerate() {
            set(at / BLOCK + i as u64, crc32c::crc32c(c));
        }
        // Out of the page cache again: the whole disk read in readahead's
        // large folios made every later 4 KiB write into them cost as much
        // as the folio (random writes at 56 % of their speed, measured).
        // (With the chunk before: a large folio may straddle the two.)
        let drop_from = at.saturating_sub(CHUNK).max(from);
        // SAFETY: plain syscall on an owned descriptor.
        unsafe {
            libc::posix_fadvise(
                disk.as_raw_fd(),
                drop_from as i64,
                (at + n as u64 - drop_from) as i64,
                libc::POSIX_FADV_DONTNEED,
            );
        }
        at += n as u64;
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            tracing::info!(disk = %path.display(), done = at, total = to, "computing block checksums");
        }
    }
    Ok(())
}

mod bad;
pub use bad::{bad_list, errors, repaired, unrepaired, BAD_FILE};

#[cfg(test)]
mod tests;
