//! Opening a resource's log directory: find the logfiles, cut a torn tail,
//! refuse corruption, apply what was not yet written back, finish versions.

use crate::crashsafe::write_atomic;
use crate::disk::Disk;
use crate::logger::LoggerError;
use mars_logfmt::{
    parse_logfile_name, scan_logfile, version_file_name, DamageKind, FileHeader, Kind,
    RecordHeader, Version, VersionBuilder, FILE_HEADER_LEN, RECORD_HEADER_LEN,
};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogfileEntry {
    pub seq: u64,
    pub node: String,
    pub path: PathBuf,
}

impl LogfileEntry {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Logfiles in `dir`, ascending by sequence number.
pub fn list_logfiles(dir: &Path) -> std::io::Result<Vec<LogfileEntry>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = parse_logfile_name(&name) {
            out.push(LogfileEntry {
                seq: n.seq,
                node: n.node,
                path: e.path(),
            });
        }
    }
    out.sort_by_key(|e| e.seq);
    Ok(out)
}

/// The persisted writeback position (`applied` in the resource directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct AppliedState {
    pub format: u16,
    /// Every record before this log stream position is on the disk (disk synced).
    pub applied_pos: u64,
}

pub(crate) const APPLIED_FILE: &str = "applied";

pub(crate) fn read_applied(dir: &Path) -> Result<Option<AppliedState>, LoggerError> {
    let path = dir.join(APPLIED_FILE);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice::<AppliedState>(&b)
            .map(Some)
            .map_err(|e| LoggerError::BadState(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoggerError::io(&path, e)),
    }
}

pub(crate) fn write_applied(dir: &Path, applied_pos: u64) -> Result<(), LoggerError> {
    let path = dir.join(APPLIED_FILE);
    let s = AppliedState {
        format: 1,
        applied_pos,
    };
    let mut body = serde_json::to_vec(&s).map_err(|e| LoggerError::BadState(e.to_string()))?;
    // One length always (JSON allows the trailing blanks): the file is
    // rewritten in place and swapped, never newly allocated (see
    // `write_swapping`), so the position can be persisted on a full
    // filesystem.
    body.resize(APPLIED_LEN.max(body.len() + 1), b' ');
    if let Some(last) = body.last_mut() {
        *last = b'\n';
    }
    crate::crashsafe::write_swapping(&path, &body).map_err(|e| LoggerError::io(&path, e))
}

/// Length of the `applied` file (JSON padded with blanks, a newline last).
const APPLIED_LEN: usize = 64;

pub(crate) fn read_version(
    dir: &Path,
    seq: u64,
    node: &str,
) -> Result<Option<Version>, LoggerError> {
    let path = dir.join(version_file_name(seq, node));
    match fs::read_to_string(&path) {
        Ok(s) => Version::from_json(&s)
            .map(Some)
            .map_err(|e| LoggerError::BadState(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoggerError::io(&path, e)),
    }
}

/// The version `node`'s history has before `entry`: its own version of the
/// previous logfile; when it has none (its history began inside `entry`,
/// where a full sync started), the history before is the sync source's by
/// construction, so the origin's version of the previous logfile is adopted.
pub(crate) fn previous_version(
    dir: &Path,
    node: &str,
    entry: &LogfileEntry,
) -> Result<Option<Version>, LoggerError> {
    let Some(prev_seq) = entry.seq.checked_sub(1) else {
        return Ok(None);
    };
    // Where `entry` starts: a version of the logfile before ends there (two
    // logfiles may share a sequence number, one of another history).
    let start = read_header(&entry.path)?
        .and_then(|b| FileHeader::decode(&b).ok())
        .map(|h| h.start_pos);
    let ends_here = |v: &Version| start.is_none_or(|s| v.end_pos == s);
    if let Some(v) = read_version(dir, prev_seq, node)?.filter(ends_here) {
        return Ok(Some(v));
    }
    if let Some(v) = read_version(dir, prev_seq, &entry.node)?.filter(ends_here) {
        return Ok(Some(v));
    }
    // The writer of `entry` did not version the logfile before (it took
    // over by a full sync after it): another member's version of it, fetched
    // with the log, that ends where `entry` starts, when all of them agree.
    let Some(start) = start else {
        return Ok(None);
    };
    let prefix = format!("version-{prev_seq:09}-");
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut found: Option<Version> = None;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(other) = name.strip_prefix(&prefix) else {
            continue;
        };
        if !mars_logfmt::valid_name(other) {
            continue;
        }
        // An unreadable one is no witness (the others may be).
        let Ok(Some(v)) = read_version(dir, prev_seq, other) else {
            continue;
        };
        if v.end_pos != start {
            continue;
        }
        match &found {
            Some(f) if f.version != v.version => return Ok(None),
            Some(_) => {}
            None => found = Some(v),
        }
    }
    Ok(found)
}

/// Compute and store the version of a finished logfile holding `[start_pos, end_pos)`.
pub(crate) fn finish_version(
    dir: &Path,
    node: &str,
    entry: &LogfileEntry,
    start_pos: u64,
    end_pos: u64,
    prev: Option<&Version>,
) -> Result<Version, LoggerError> {
    let b = digest_records(&entry.path, end_pos - start_pos)?;
    store_version(dir, node, entry, start_pos, end_pos, prev, b)
}

/// Reads a logfile ahead in windows, so that reading many small records (or many
/// headers) costs no read syscall and no allocation per record.
pub(crate) struct ReadAhead {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
    window: u64,
}

impl ReadAhead {
    /// Reads of at least `window` bytes (fewer at the end of the file).
    pub(crate) fn new(window: u64) -> ReadAhead {
        ReadAhead {
            buf: Vec::new(),
            start: 0,
            window,
        }
    }

    /// The `len` bytes at `at` (which lie before `file_len`).
    pub(crate) fn get(
        &mut self,
        f: &fs::File,
        at: u64,
        len: usize,
        file_len: u64,
    ) -> std::io::Result<&[u8]> {
        use std::os::unix::fs::FileExt;
        let end = at + len as u64;
        if at < self.start || end > self.start + self.buf.len() as u64 {
            // A window read for a header also holds a payload of up to the window
            // and the next header: records of a window's size (1 MiB writes in
            // replay) cost one read each, not two.
            let want = ((len as u64).max(self.window) + 2 * RECORD_HEADER_LEN as u64)
                .min(file_len.saturating_sub(at));
            let want = want.max(len as u64) as usize;
            self.buf.resize(want, 0);
            f.read_exact_at(&mut self.buf, at)?;
            self.start = at;
        }
        let from = (at - self.start) as usize;
        Ok(&self.buf[from..from + len])
    }
}

/// The version digest of the first `len` bytes of records of the logfile at `path`
/// (records that scanned clean: each header is followed by its payload). Reads the
/// headers only, in small windows: large payloads are skipped, not read.
pub(crate) fn digest_records(path: &Path, len: u64) -> Result<VersionBuilder, LoggerError> {
    let io = |e| LoggerError::io(path, e);
    let f = fs::File::open(path).map_err(io)?;
    let end = FILE_HEADER_LEN as u64 + len;
    let mut ra = ReadAhead::new(16 << 10);
    let mut b = VersionBuilder::new();
    let mut at = FILE_HEADER_LEN as u64;
    while at < end {
        if at + RECORD_HEADER_LEN as u64 > end {
            return Err(LoggerError::Corrupt(format!(
                "{}: record at offset {at} cut short",
                path.display()
            )));
        }
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        hdr.copy_from_slice(ra.get(&f, at, RECORD_HEADER_LEN, end).map_err(io)?);
        let (h, _) = RecordHeader::decode(&hdr).map_err(|e| {
            LoggerError::Corrupt(format!("{}: record at offset {at}: {e}", path.display()))
        })?;
        b.add_record(&hdr);
        at += h.total_len();
    }
    Ok(b)
}

/// Store the version of a finished logfile whose records were digested into `b`
/// (all of them, in order, exactly as they are in the file).
pub(crate) fn store_version(
    dir: &Path,
    node: &str,
    entry: &LogfileEntry,
    start_pos: u64,
    end_pos: u64,
    prev: Option<&Version>,
    b: VersionBuilder,
) -> Result<Version, LoggerError> {
    let v = b.finish(prev, &entry.name(), entry.seq, start_pos, end_pos);
    let path = dir.join(version_file_name(entry.seq, node));
    write_atomic(&path, v.to_json().as_bytes()).map_err(|e| LoggerError::io(&path, e))?;
    Ok(v)
}

/// Where the log stream stands after recovery.
pub(crate) struct Recovered {
    pub end_pos: u64,
    pub next_record_seq: u64,
    pub next_file_seq: u64,
    pub last_version: Option<Version>,
    /// The parent link of a logfile starting at `end_pos` (0: no logfile here
    /// ends there, e.g. none at all).
    pub parent_of_next: u64,
}

/// The 64-byte header of a logfile as stored (None: shorter than a header).
pub(crate) fn read_header(path: &Path) -> Result<Option<[u8; FILE_HEADER_LEN]>, LoggerError> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).map_err(|e| LoggerError::io(path, e))?;
    let mut b = [0u8; FILE_HEADER_LEN];
    match f.read_exact_at(&mut b, 0) {
        Ok(()) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(LoggerError::io(path, e)),
    }
}

/// A logfile with a parent link must name the logfile before it (`prev`: its
/// name and header) at its start: else the directory holds two histories.
fn check_link(
    prev: Option<&(String, [u8; FILE_HEADER_LEN])>,
    entry: &LogfileEntry,
    h: &FileHeader,
) -> Result<(), LoggerError> {
    match prev {
        Some((name, b))
            if h.parent != 0
                && h.parent != mars_logfmt::parent_link(b, h.start_pos)
                && h.parent != mars_logfmt::next_link(b, h.start_pos) =>
        {
            Err(LoggerError::Corrupt(format!(
                "{}: does not continue {name} (its parent link names another logfile): the directory holds two histories, a split brain; `marsadm invalidate` of the resource on this node copies the disk anew",
                entry.path.display()
            )))
        }
        _ => Ok(()),
    }
}

/// Bring disk and logfiles to a clean state: every logfile finished and
/// versioned, every record applied, the applied position persisted.
pub(crate) fn recover(
    dir: &Path,
    node: &str,
    disk: &Disk,
    size: u64,
    csum: &crate::csum::Csum,
) -> Result<Recovered, LoggerError> {
    let logs = list_logfiles(dir).map_err(|e| LoggerError::io(dir, e))?;
    for w in logs.windows(2) {
        if w[0].seq == w[1].seq {
            return Err(LoggerError::Corrupt(format!(
                "two logfiles with sequence {}: {} and {}",
                w[0].seq,
                w[0].name(),
                w[1].name()
            )));
        }
    }
    // Every logfile names the one before it (format 3), checked before anything
    // is applied: a directory of two histories is refused unchanged.
    let mut headers = Vec::with_capacity(logs.len());
    let mut prev: Option<(String, [u8; FILE_HEADER_LEN])> = None;
    for entry in &logs {
        let b = read_header(&entry.path)?;
        if let Some(b) = b {
            if let Ok(h) = FileHeader::decode(&b) {
                check_link(prev.as_ref(), entry, &h)?;
            }
            prev = Some((entry.name(), b));
        }
        headers.push(b);
    }
    let applied = read_applied(dir)?.map(|s| s.applied_pos);
    let mut last_version = None;
    let mut expected_start: Option<u64> = None;
    let mut next_record_seq = 1;
    let mut end_pos = applied.unwrap_or(0);
    let mut applied_pos = applied;
    // The record sequence continues after the last logfile; for a skipped one we scan it once at the end.
    let mut seq_from_skipped: Option<&LogfileEntry> = None;
    // The header of the logfile before (its name too), for the parent links.
    let mut last_header: Option<(String, [u8; FILE_HEADER_LEN])> = None;
    for (i, entry) in logs.iter().enumerate() {
        let is_last = i + 1 == logs.len();
        // Finished and versioned earlier: records already applied, unless the
        // applied position says otherwise (then we scan it below). Only a version
        // of this very logfile as it is now: replay versions the part of a
        // logfile it applied, and a copy may have grown since (fetched further
        // after its history went on elsewhere and came back).
        let whole = |v: &Version, b: &[u8; FILE_HEADER_LEN]| {
            let len = fs::metadata(&entry.path).map(|m| m.len()).unwrap_or(0);
            v.logfile == entry.name()
                && FileHeader::decode(b).is_ok_and(|h| {
                    h.start_pos == v.start_pos
                        && h.start_pos + len.saturating_sub(FILE_HEADER_LEN as u64) == v.end_pos
                })
        };
        if let Some(v) = read_version(dir, entry.seq, node)? {
            if let (Some(b), true) = (
                headers[i],
                applied_pos.is_some_and(|a| a >= v.end_pos)
                    && headers[i].is_some_and(|b| whole(&v, &b)),
            ) {
                last_header = Some((entry.name(), b));
                expected_start = Some(v.end_pos);
                end_pos = v.end_pos;
                last_version = Some(v);
                seq_from_skipped = Some(entry);
                continue;
            }
        }
        let bytes = fs::read(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?;
        let report = scan_logfile(&bytes);
        let header = match &report.header {
            Ok(h) => *h,
            Err(e) if is_last && bytes.len() < FILE_HEADER_LEN => {
                // Crash while creating the file: nothing was ever logged into it.
                tracing::warn!(file = %entry.path.display(), "removing incomplete new logfile: {e}");
                fs::remove_file(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?;
                continue;
            }
            Err(e) => {
                return Err(LoggerError::Corrupt(format!(
                    "{}: bad file header: {e}",
                    entry.path.display()
                )));
            }
        };
        if header.file_seq != entry.seq {
            return Err(LoggerError::Corrupt(format!(
                "{}: header says sequence {}, name says {}",
                entry.path.display(),
                header.file_seq,
                entry.seq
            )));
        }
        if let Some(exp) = expected_start {
            if header.start_pos != exp {
                return Err(LoggerError::Corrupt(format!(
                    "{}: starts at log position {}, previous logfile ends at {exp}",
                    entry.path.display(),
                    header.start_pos
                )));
            }
        }
        let applied_from = *applied_pos.get_or_insert(header.start_pos);
        if applied_from < header.start_pos && expected_start.is_none() {
            return Err(LoggerError::Corrupt(format!(
                "applied position {applied_from} lies before the oldest logfile {} (starts at {})",
                entry.path.display(),
                header.start_pos
            )));
        }
        if let Some(d) = &report.damage {
            if d.pos < applied_from {
                // Written back, so it had been durable: not a write cut short.
                return Err(LoggerError::Corrupt(format!(
                    "{}: damaged record at log position {} (file offset {}): {}; the disk already holds the data up to log position {applied_from} (inspect with `marsadm dump-log {}`)",
                    entry.path.display(),
                    d.pos,
                    d.file_offset,
                    d.reason,
                    entry.path.display()
                )));
            }
            match d.kind {
                DamageKind::TornTail if is_last => {
                    tracing::warn!(
                        file = %entry.path.display(), offset = d.file_offset, pos = d.pos,
                        "cutting torn tail: {}", d.reason
                    );
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(&entry.path)
                        .map_err(|e| LoggerError::io(&entry.path, e))?;
                    f.set_len(report.valid_end)
                        .map_err(|e| LoggerError::io(&entry.path, e))?;
                    f.sync_all().map_err(|e| LoggerError::io(&entry.path, e))?;
                }
                _ => {
                    return Err(LoggerError::Corrupt(format!(
                        "{}: damaged record at log position {} (file offset {}): {}; nothing after it was applied (inspect with `marsadm dump-log {}`)",
                        entry.path.display(),
                        d.pos,
                        d.file_offset,
                        d.reason,
                        entry.path.display()
                    )));
                }
            }
        }
        for r in &report.records {
            let h = &r.header;
            if h.pos < applied_from {
                continue;
            }
            if h.offset + h.length > size {
                return Err(LoggerError::Corrupt(format!(
                    "{}: record at log position {} writes beyond the device end ({} > {size})",
                    entry.path.display(),
                    h.pos,
                    h.offset + h.length
                )));
            }
            let at = r.file_offset as usize + mars_logfmt::RECORD_HEADER_LEN;
            // The record rewrites disk and checksums alike (a crash may have
            // left either one newer than the other).
            // Announced like every other write of the disk: a reader sharing
            // the table (a scrub, a sync served from it) that races this one
            // looks again instead of calling the block bad.
            let _writing = csum.writing();
            let payload: &[u8] = match h.kind {
                Kind::Write => &bytes[at..at + h.length as usize],
                _ => &[],
            };
            csum.apply_record(disk, h.kind, h.offset, h.length, payload)
                .map_err(|e| LoggerError::Disk(e.to_string()))?;
        }
        seq_from_skipped = None;
        let mut hb = [0u8; FILE_HEADER_LEN];
        hb.copy_from_slice(&bytes[..FILE_HEADER_LEN]);
        last_header = Some((entry.name(), hb));
        let file_end = report.end_pos().unwrap_or(header.start_pos);
        next_record_seq = report.next_record_seq().unwrap_or(next_record_seq);
        let prev = match last_version.take() {
            Some(v) => Some(v),
            None => previous_version(dir, node, entry)?,
        };
        let v = finish_version(dir, node, entry, header.start_pos, file_end, prev.as_ref())?;
        last_version = Some(v);
        expected_start = Some(file_end);
        end_pos = file_end;
    }
    if let Some(entry) = seq_from_skipped {
        next_record_seq = scan_file_next_seq(entry)?;
    }
    disk.sync().map_err(|e| LoggerError::Disk(e.to_string()))?;
    // The checksums of what the disk now holds, durable before the position
    // that says it holds it.
    csum.sync()
        .map_err(|e| LoggerError::Disk(format!("block checksums: {e}")))?;
    write_applied(dir, end_pos)?;
    let parent_of_next = match &last_header {
        Some((_, b)) if expected_start == Some(end_pos) => mars_logfmt::next_link(b, end_pos),
        _ => 0,
    };
    Ok(Recovered {
        end_pos,
        next_record_seq,
        next_file_seq: logs.last().map(|l| l.seq + 1).unwrap_or(1),
        last_version,
        parent_of_next,
    })
}

/// Sequence number after the last record of an already finished logfile.
fn scan_file_next_seq(entry: &LogfileEntry) -> Result<u64, LoggerError> {
    let bytes = fs::read(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?;
    let report = scan_logfile(&bytes);
    match (&report.damage, report.next_record_seq()) {
        (None, Some(s)) => Ok(s),
        _ => Err(LoggerError::Corrupt(format!(
            "{}: finished logfile no longer scans cleanly: {:?}",
            entry.path.display(),
            report.damage.map(|d| d.reason)
        ))),
    }
}

/// Name prefix of spare logfiles: deleted logfiles kept to be reused as the next
/// logfile (`spare-<seq>-<node>`, the name they had). Writing into a file whose
/// blocks are allocated and written is an overwrite: O_DIRECT writes need no block
/// allocation and an fdatasync no journal commit (docs/FORMAT.md, "Recycled
/// logfiles").
pub const SPARE_PREFIX: &str = "spare-";

/// Spares smaller than this are not worth keeping.
const SPARE_MIN_BYTES: u64 = 64 << 10;

/// Spare logfiles in `dir` with their lengths, largest first.
pub fn list_spares(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(SPARE_PREFIX) {
            if let Ok(m) = e.metadata() {
                out.push((e.path(), m.len()));
            }
        }
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

/// Bytes the spare logfiles in `dir` take.
pub fn spare_bytes(dir: &Path) -> std::io::Result<u64> {
    Ok(list_spares(dir)?.iter().map(|s| s.1).sum())
}

/// Remove every spare logfile in `dir` (when space runs short). Returns the bytes freed.
pub fn drop_spares(dir: &Path) -> std::io::Result<u64> {
    remove_spares(dir, list_spares(dir)?)
}

/// Remove the `spares` listed in `dir` (listed earlier: the logger may have taken
/// some meanwhile). Returns the bytes freed.
fn remove_spares(dir: &Path, spares: Vec<(PathBuf, u64)>) -> std::io::Result<u64> {
    let mut freed = 0;
    for (path, len) in spares {
        match fs::remove_file(&path) {
            Ok(()) => freed += len,
            // The logger took it for a new logfile meanwhile: not a spare any more.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if freed > 0 {
        crate::crashsafe::sync_dir(dir)?;
    }
    Ok(freed)
}

/// A logfile is deleted: keep it as a spare while the spares stay within
/// `budget` bytes, else remove it. The caller syncs the directory. Only finished
/// logfiles come here: they hold exactly their records (rotation, close and
/// recovery cut a logfile at the end of its log), which `take_spare` relies on.
pub(crate) fn retire_logfile(dir: &Path, entry: &LogfileEntry, budget: u64) -> std::io::Result<()> {
    let len = fs::metadata(&entry.path)?.len();
    if len >= SPARE_MIN_BYTES && budget > 0 && spare_bytes(dir)? + len <= budget {
        let name = format!("{SPARE_PREFIX}{}", entry.name());
        return fs::rename(&entry.path, dir.join(name));
    }
    fs::remove_file(&entry.path)
}

/// Take the largest usable spare for a logfile starting at `start_pos`: opened for
/// writing, with its length. The records left in a spare verify by checksum, but
/// the scanner takes a record only at its place (its position matches its offset
/// from the file's `start_pos`): a spare's old records all lie at the places of its
/// first record's position `p` (it was cut at its end), so it is used only where
/// `p != start_pos`. Unusable spares are removed; one that cannot be read now stays.
fn take_spare(dir: &Path, start_pos: u64) -> Option<(fs::File, PathBuf, u64)> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let spares = list_spares(dir).ok()?;
    for (path, _) in spares {
        let usable = (|| -> std::io::Result<Option<(fs::File, u64)>> {
            let f = fs::OpenOptions::new().read(true).write(true).open(&path)?;
            let m = f.metadata()?;
            // A second name (a crash between link and unlink elsewhere) would make
            // our writes show up under it: never reuse such a file.
            if m.nlink() != 1 || m.len() < SPARE_MIN_BYTES {
                return Ok(None);
            }
            let mut first = [0u8; mars_logfmt::RECORD_HEADER_LEN];
            f.read_exact_at(&mut first, FILE_HEADER_LEN as u64)?;
            Ok(match mars_logfmt::RecordHeader::decode(&first) {
                Ok((h, _)) if h.pos != start_pos => Some((f, m.len())),
                _ => None,
            })
        })();
        match usable {
            Ok(Some((f, len))) => return Some((f, path, len)),
            Ok(None) => {
                tracing::debug!(spare = %path.display(), start_pos, "spare logfile not reusable here: removed");
                let _ = fs::remove_file(&path);
            }
            // Perhaps passing (EMFILE, ENOMEM): keep it for the next logfile; the
            // space policy removes spares when space runs short.
            Err(e) => {
                tracing::debug!(spare = %path.display(), "spare logfile not usable now: {e}");
            }
        }
    }
    None
}

/// `rename(from, to)` that fails when `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: both are NUL-terminated paths that live for the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A spare (see [`take_spare`]) with the logfile header `h` (of a logfile starting at
/// `start_pos`), renamed to `path`: over an existing `path` when `replace` (an
/// empty logfile: the rename swaps one empty logfile for another), else only where
/// nothing has that name. None when no spare is usable.
pub(crate) fn logfile_from_spare(
    dir: &Path,
    path: &Path,
    h: &[u8; FILE_HEADER_LEN],
    start_pos: u64,
    replace: bool,
) -> Result<Option<(fs::File, u64)>, LoggerError> {
    use std::os::unix::fs::FileExt;
    let Some((f, spare, len)) = take_spare(dir, start_pos) else {
        return Ok(None);
    };
    // The header first (durable), then the name: a logfile never has another's header.
    let reused = f
        .write_all_at(h, 0)
        .and_then(|()| f.sync_data())
        .and_then(|()| {
            if replace {
                fs::rename(&spare, path)
            } else {
                rename_noreplace(&spare, path)
            }
        });
    match reused {
        Ok(()) => {
            crate::crashsafe::sync_dir(dir).map_err(|e| LoggerError::io(dir, e))?;
            tracing::debug!(logfile = %path.display(), len, "logfile recycled from a spare");
            Ok(Some((f, len)))
        }
        Err(e) => {
            tracing::warn!(spare = %spare.display(), "cannot reuse spare logfile: {e}");
            let _ = fs::remove_file(&spare);
            Ok(None)
        }
    }
}

/// A new logfile: a spare (see [`take_spare`]) given the new header and name, or a
/// new file. Returns the file, its path and its length (more than the header for a
/// spare: the records of its earlier use follow, to be overwritten).
pub(crate) fn new_logfile(
    dir: &Path,
    node: &str,
    seq: u64,
    start_pos: u64,
    start_record_seq: u64,
    resource_id: u64,
    parent: u64,
) -> Result<(fs::File, PathBuf, u64), LoggerError> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(mars_logfmt::logfile_name(seq, node));
    let h = FileHeader {
        file_seq: seq,
        start_pos,
        start_record_seq,
        created_ns: crate::logger::now_ns(),
        resource_id,
        parent,
    }
    .encode();
    if let Some((f, len)) = logfile_from_spare(dir, &path, &h, start_pos, false)? {
        return Ok((f, path, len));
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| LoggerError::io(&path, e))?;
    let made = f
        .write_all_at(&h, 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| LoggerError::io(&path, e))
        .and_then(|()| crate::crashsafe::sync_dir(dir).map_err(|e| LoggerError::io(dir, e)));
    if let Err(e) = made {
        // Not left half made (no space for its header?): a later try creates it anew.
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok((f, path, FILE_HEADER_LEN as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spare the logger takes (renames) between the listing and the removal is
    /// not an error, and is not counted as freed (emergency deletion failed on it).
    #[test]
    fn spares_taken_meanwhile_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (seq, len) in [(1, 70_000u64), (2, 80_000)] {
            let name = format!("{SPARE_PREFIX}{}", mars_logfmt::logfile_name(seq, "alpha"));
            fs::File::create(d.join(name))
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        let listed = list_spares(d).unwrap();
        assert_eq!(listed.len(), 2);
        // The logger takes the larger one for a new logfile.
        fs::rename(&listed[0].0, d.join("log-000000009-alpha")).unwrap();
        assert_eq!(remove_spares(d, listed).unwrap(), 70_000);
        assert!(list_spares(d).unwrap().is_empty());
        assert!(
            d.join("log-000000009-alpha").exists(),
            "the taken spare stays"
        );
    }
}
