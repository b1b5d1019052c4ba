//! Blocks found bad, per resource directory: counted since this process
//! started (`checksum_errors`, `repaired`), and the list of those not
//! rewritten since kept across restarts in `csum.bad` (docs/FORMAT.md), so
//! that a copy with rot found before a restart is not shown `uptodate` after
//! it.

use super::{ranges, registry, Csum, BLOCK};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

/// The file beside `csum` that lists its disk's unrepaired bad blocks.
pub const BAD_FILE: &str = "csum.bad";

/// What was found in one disk (survives a reopen in the process; `bad`
/// survives a restart through [`BAD_FILE`]).
#[derive(Default)]
pub(super) struct Found {
    pub count: u64,
    pub repaired: u64,
    pub bad: BTreeSet<u64>,
}

#[derive(Serialize, Deserialize)]
struct BadFile {
    format: u32,
    /// Block numbers (disk offset / 4 KiB), ascending.
    bad: Vec<u64>,
}

/// The list kept in `dir` (none, or an unreadable file: empty, with a warning).
fn load(dir: &Path) -> BTreeSet<u64> {
    let path = dir.join(BAD_FILE);
    match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<BadFile>(&b) {
            Ok(f) if f.format == 1 => f.bad.into_iter().collect(),
            Ok(f) => {
                tracing::warn!(path = %path.display(), format = f.format, "bad-block list of an unknown format: ignored");
                BTreeSet::new()
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "bad-block list unreadable ({e}): ignored (a scrub or verify finds the blocks again)");
                BTreeSet::new()
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), "bad-block list unreadable ({e}): ignored");
            BTreeSet::new()
        }
    }
}

/// Write the list of `dir` (removed when empty). A failure is logged: the
/// list in memory stays right, only a restart would forget it.
fn save(dir: &Path, bad: &BTreeSet<u64>) {
    let path = dir.join(BAD_FILE);
    let r = if bad.is_empty() {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    } else {
        let f = BadFile {
            format: 1,
            bad: bad.iter().copied().collect(),
        };
        serde_json::to_vec(&f)
            .map_err(io::Error::other)
            .and_then(|b| crate::crashsafe::write_atomic(&path, &b))
    };
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), "writing the bad-block list: {e}");
    }
}

/// Forget the list kept in `dir` (its checksums are computed anew from the
/// disk); the caller clears the one in memory.
pub(super) fn forget(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(BAD_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn with_found<T>(dir: &Path, f: impl FnOnce(&Found) -> T) -> Option<T> {
    registry()
        .lock()
        .found
        .get(&dir.join(super::FILE_NAME))
        .map(f)
}

/// Bad blocks found in the disk of resource directory `dir` since this process started.
pub fn errors(dir: &Path) -> u64 {
    with_found(dir, |f| f.count).unwrap_or(0)
}

/// Blocks of the disk of resource directory `dir` found bad and not written
/// since (a repair, or the client's own rewrite, takes a block off).
pub fn unrepaired(dir: &Path) -> u64 {
    with_found(dir, |f| f.bad.len() as u64).unwrap_or(0)
}

/// Those blocks, ascending.
pub fn bad_list(dir: &Path) -> Vec<u64> {
    with_found(dir, |f| f.bad.iter().copied().collect()).unwrap_or_default()
}

/// Blocks of the disk of `dir` repaired (rewritten from a good copy, or their
/// checksum corrected) since this process started.
pub fn repaired(dir: &Path) -> u64 {
    with_found(dir, |f| f.repaired).unwrap_or(0)
}

impl Csum {
    /// Take the list kept in the directory (at open, under the registry's
    /// lock; once per process).
    pub(super) fn load_found(&self, r: &mut super::Registry) {
        // Blocks beyond this disk (a damaged list, or one of a larger disk)
        // are none of its blocks: a repair of them would compute offsets
        // past the end (or overflow).
        let blocks = self.crcs.len() as u64;
        let f = r.found.entry(self.path.clone()).or_insert_with(|| Found {
            bad: load(&self.dir)
                .into_iter()
                .filter(|b| *b < blocks)
                .collect(),
            ..Found::default()
        });
        if !f.bad.is_empty() {
            self.any_bad.store(true, Ordering::Relaxed);
        }
    }

    pub(super) fn is_bad(&self, b: u64) -> bool {
        self.any_bad.load(Ordering::Relaxed)
            && registry()
                .lock()
                .found
                .get(&self.path)
                .is_some_and(|f| f.bad.contains(&b))
    }

    /// Block `b` was written whole (or repaired): off the list.
    pub(super) fn unmark(&self, b: u64) {
        if !self.any_bad.load(Ordering::Relaxed) {
            return;
        }
        let mut r = registry().lock();
        if let Some(f) = r.found.get_mut(&self.path) {
            if f.bad.remove(&b) {
                save(&self.dir, &f.bad);
            }
        }
    }

    /// Count and log blocks found bad (each once until rewritten), and keep
    /// the list.
    pub(super) fn found(&self, blocks: &[u64]) {
        self.any_bad.store(true, Ordering::Relaxed);
        let new: Vec<u64> = {
            let mut r = registry().lock();
            let f = r.found.entry(self.path.clone()).or_default();
            let new: Vec<u64> = blocks
                .iter()
                .copied()
                .filter(|b| f.bad.insert(*b))
                .collect();
            f.count += new.len() as u64;
            if !new.is_empty() {
                save(&self.dir, &f.bad);
            }
            new
        };
        if !new.is_empty() {
            tracing::error!(disk = %self.disk.display(), resource_dir = %self.dir.display(), "block checksum mismatch (the disk returned other data than was written): {}", ranges(&new));
        }
    }

    /// Blocks found bad by a comparison with other copies (`verify`): on the
    /// list as if a read had found them.
    pub fn mark_bad(&self, blocks: &[u64]) {
        self.found(blocks)
    }

    /// The disk now holds `data` at `offset` (block-aligned), copied from a
    /// good member: the checksums of its blocks are set from it, the blocks
    /// leave the list, and they count as repaired.
    pub fn repaired(&self, offset: u64, data: &[u8]) {
        let crcs = super::block_crcs(data);
        self.set_blocks(offset, data.len() as u64, &crcs);
        self.count_repaired(crcs.len() as u64);
        tracing::info!(disk = %self.disk.display(), "repaired from a good copy: {}", ranges(&(offset / BLOCK..offset / BLOCK + crcs.len() as u64).collect::<Vec<_>>()));
    }

    /// The table was wrong, not the disk: block `b`'s checksum becomes `crc`
    /// (what the disk holds, and every other copy agrees with).
    pub fn correct(&self, b: u64, crc: u32) {
        self.set(b, crc);
        self.unmark(b);
        self.count_repaired(1);
        tracing::info!(disk = %self.disk.display(), block = b, "block checksum corrected (the table was damaged, the disk agrees with the other copies)");
    }

    fn count_repaired(&self, n: u64) {
        let mut r = registry().lock();
        r.found.entry(self.path.clone()).or_default().repaired += n;
    }
}
