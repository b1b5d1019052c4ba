//! Replay: apply logfiles to a disk in log order, on a node that is not the
//! writer of the log (a secondary), or that must catch up.
//!
//! The logfiles in the resource directory may still be growing (fetch
//! appends to them). [`Replayer::step`] applies every complete record from
//! the current position on, one at a time and in order, so the disk is at
//! every moment an image of the primary's disk after some prefix of the log
//! (*anytime consistency*). It stops, and applies nothing further, at a
//! record whose checksum fails and when a finished logfile's version does not
//! continue the history this node applied (split brain).
//!
//! State in the resource directory (`docs/FORMAT.md`):
//!
//! - `replayed`, `{"format":1,"pos":N,"limit":L}` (crash-safe): every
//!   record before stream position N is on the disk, the disk was synced
//!   before it was written; and no record ending after L is applied before
//!   `replayed` is written again ([`Replayer::persist`], and `step` persists
//!   by itself before it would pass L; L is N plus [`PERSIST_WINDOW`]).
//! - `replayed.hw`, the *high-water mark* ([`HwMark`], [`HW_LEN`] bytes,
//!   rewritten in place with one `pwrite`, never synced): the kernel's boot
//!   id, the durable position it builds on, and the position after the last
//!   record applied. Order per record: the record to the disk (pwrite), then
//!   the mark.
//!
//! Restart ([`Replayer::open`]):
//!
//! - Same boot (a process kill; the page cache, disk and mark, survived):
//!   resume at the mark if it builds on the durable position, lies within the
//!   limit and is a record boundary of the local logfiles (the end of a
//!   complete record, or a logfile's start); else ignore it. The disk holds
//!   exactly the records before the mark, or one more whose mark was not
//!   written yet; re-applying that record changes nothing, so the disk stays
//!   a prefix image at every moment, also across kills.
//! - Another boot (or no usable mark): the unsynced writes after the durable
//!   position may be partly on the disk, partly lost, and the mark with them.
//!   Resume at the durable position; the disk is no consistent image until
//!   replay passes min(limit, end of the local logfiles)
//!   ([`Replayer::inconsistent_until`]; the daemon shows it as
//!   `consistent_from`). The mark carries this bound, so a kill before replay
//!   passes it does not forget it.
//!
//! `promote`, `demote` and [`forget`] remove the mark with `replayed`.
//! Assumption: the local logfile copies (not synced by fetch) survive a
//! reboot as far as replay read them.

use crate::crashsafe::write_atomic;
use crate::disk::{disk_size, AlignedBuf, Disk};
use crate::fetched::FetchedChunks;
use crate::history::{self, LocalFile, Next};
use crate::logger::LoggerError;
use crate::recovery::{
    finish_version, list_logfiles, previous_version, read_applied, read_version, recover,
    store_version, write_applied, LogfileEntry, ReadAhead, APPLIED_FILE,
};
use mars_logfmt::{
    FileHeader, RecordHeader, Version, VersionBuilder, FILE_HEADER_LEN, RECORD_HEADER_LEN,
};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const REPLAYED_FILE: &str = "replayed";
/// The high-water mark: where replay is, as of the last applied record (not synced).
pub const HW_FILE: &str = "replayed.hw";
/// Default: persist (sync the disk, write `replayed` with a new limit) at
/// least every this many bytes of log. Above the daemon's step (64 MiB) plus
/// the largest record (32 MiB), so the daemon's persist after each step
/// keeps the limit ahead and replay never stops to persist in a step.
pub const PERSIST_WINDOW: u64 = 128 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ReplayedState {
    format: u16,
    pos: u64,
    /// No record ending after this was applied before `replayed` is written
    /// again (absent in older files: `pos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    /// The logfile holding the records just before `pos` (or starting at it), by
    /// name and start position (absent in older files: found by position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<(String, u64)>,
    /// The logfiles replay entered after `file`: name, start position, and
    /// the position it entered each at. Written when replay enters one, so
    /// that after a kill or a reboot replay goes the same way again (with
    /// logfiles of two histories here, the way is not in the files alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    entered: Vec<(String, u64, u64)>,
}

/// Length of the high-water mark, a line of ASCII:
/// `MARSHW1 <boot id, 36> <base, 20 digits> <pos, 20> <until, 20> <crc32c, 8 hex>\n`.
pub const HW_LEN: usize = 8 + 37 + 21 + 21 + 21 + 9;
const HW_MAGIC: &[u8; 8] = b"MARSHW1 ";
const BOOT_ID_LEN: usize = 36;

/// A decoded high-water mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HwMark {
    /// `/proc/sys/kernel/random/boot_id` of the boot that wrote it.
    pub boot_id: String,
    /// The durable position (`replayed`) the writer had persisted last.
    pub base: u64,
    /// The position after the last record applied to the disk (page cache).
    pub pos: u64,
    /// The disk is no consistent image until replay passes this (0: it is).
    pub until: u64,
}

/// 36 characters of lowercase hex digits and dashes (the kernel's form).
fn valid_boot_id(b: &str) -> bool {
    b.len() == BOOT_ID_LEN
        && b.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c) || c == b'-')
}

/// The running kernel's boot id, if it can be read and looks like one.
pub fn current_boot_id() -> Option<String> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let s = s.trim().to_ascii_lowercase();
    valid_boot_id(&s).then_some(s)
}

impl HwMark {
    /// The fixed-length line (`HW_LEN` bytes). `boot_id` must be a valid boot id.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = format!(
            "MARSHW1 {} {:020} {:020} {:020} ",
            self.boot_id, self.base, self.pos, self.until
        )
        .into_bytes();
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(format!("{crc:08x}\n").as_bytes());
        debug_assert_eq!(b.len(), HW_LEN);
        b
    }

    /// `None` for anything that is not exactly one well-formed mark.
    pub fn decode(b: &[u8]) -> Option<HwMark> {
        if b.len() != HW_LEN || !b.starts_with(HW_MAGIC) || b[HW_LEN - 1] != b'\n' {
            return None;
        }
        let body = &b[..HW_LEN - 9];
        let crc = std::str::from_utf8(&b[HW_LEN - 9..HW_LEN - 1]).ok()?;
        let lower_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if crc.len() != 8 || !crc.bytes().all(lower_hex) {
            return None;
        }
        if u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(body) {
            return None;
        }
        let text = std::str::from_utf8(&body[HW_MAGIC.len()..]).ok()?;
        let mut f = text.split(' ');
        let boot_id = f.next()?.to_string();
        let mut num = || -> Option<u64> {
            let d = f.next()?;
            (d.len() == 20 && d.bytes().all(|c| c.is_ascii_digit()))
                .then(|| d.parse().ok())
                .flatten()
        };
        let (base, pos, until) = (num()?, num()?, num()?);
        if !valid_boot_id(&boot_id) || f.next() != Some("") || f.next().is_some() {
            return None;
        }
        Some(HwMark {
            boot_id,
            base,
            pos,
            until,
        })
    }
}

/// Why replay stopped for good (until an operator acts).
#[derive(Debug, PartialEq, Eq)]
pub enum Halt {
    /// A complete record failed its checks: never applied.
    Corrupt {
        file: String,
        pos: u64,
        reason: String,
    },
    /// The history applied here and the one this logfile (or the source's
    /// list) continues part: see [`crate::history`].
    SplitBrain { file: String, reason: String },
    /// Logfiles do not continue each other (a hole: a logfile is missing).
    Gap {
        expected_pos: u64,
        file: String,
        starts_at: u64,
    },
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Halt::Corrupt { file, pos, reason } => write!(
                f,
                "corrupt record in {file} at log position {pos}: {reason}; not applied"
            ),
            Halt::SplitBrain { file, reason } => write!(
                f,
                "split brain at {file}: {reason}; nothing of the other history was applied (`marsadm invalidate` of the resource here copies the disk anew)"
            ),
            Halt::Gap {
                expected_pos,
                file,
                starts_at,
            } => {
                write!(f, "log gap: need position {expected_pos}, next logfile {file} starts at {starts_at}")
            }
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct StepOutcome {
    pub records: u64,
    pub bytes: u64,
    /// Nothing more to apply right now (waiting for fetch).
    pub idle: bool,
}

/// A logfile replay entered (by name and start: a logfile's identity here)
/// and the position it entered it at.
#[derive(Clone, Debug)]
struct Entered {
    name: String,
    start: u64,
    at: u64,
}

impl Entered {
    fn new(f: &LocalFile, at: u64) -> Entered {
        Entered {
            name: f.name.clone(),
            start: f.start,
            at,
        }
    }
}

/// The logfiles in `dir` as the history rules see them, ascending by sequence
/// (ones still being created by fetch are left out), with their entries.
fn local_files(dir: &Path) -> Result<(Vec<LogfileEntry>, Vec<LocalFile>), LoggerError> {
    let mut entries = Vec::new();
    let mut files = Vec::new();
    for e in list_logfiles(dir).map_err(|err| LoggerError::io(dir, err))? {
        let f = match File::open(&e.path) {
            Ok(f) => f,
            // Deleted meanwhile (a logfile replay has passed).
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(LoggerError::io(&e.path, err)),
        };
        let mut b = [0u8; FILE_HEADER_LEN];
        if f.read_exact_at(&mut b, 0).is_err() {
            continue;
        }
        let h = FileHeader::decode(&b).map_err(|err| {
            LoggerError::Corrupt(format!("{}: bad file header: {err}", e.path.display()))
        })?;
        let len = f
            .metadata()
            .map_err(|err| LoggerError::io(&e.path, err))?
            .len();
        files.push(LocalFile {
            name: e.name(),
            seq: e.seq,
            header: b,
            start: h.start_pos,
            end: h.start_pos + (len - FILE_HEADER_LEN as u64),
            parent: h.parent,
        });
        entries.push(e);
    }
    Ok((entries, files))
}

pub struct Replayer {
    dir: PathBuf,
    node: String,
    disk: Disk,
    /// The disk's block checksums, updated with every record applied.
    csum: crate::csum::CsumHandle,
    size: u64,
    pos: u64,
    persisted: u64,
    /// When the position was last persisted (or the replayer opened).
    saved_at: std::time::Instant,
    halted: Option<Halt>,
    last_version: Option<Version>,
    /// The logfiles replay entered, with the position it entered each at (the
    /// last is the one it is in; older ones go once the durable position passes
    /// their successor's entry). Its name and start position identify a logfile.
    path: Vec<Entered>,
    /// The logfiles of the fetch source's history, when known (`set_lineage`).
    lineage: Option<history::Lineage>,
    /// The designated primary, when known (`set_primary`).
    primary: Option<String>,
    /// The durable limit: no record ending after it is applied before
    /// `replayed` says a larger one.
    limit: u64,
    window: u64,
    /// The disk is no consistent image until replay passes this.
    until: Option<u64>,
    /// This boot's id and the open high-water mark (none when the boot id is unknown).
    hw: Option<(String, File)>,
    /// Fetched chunks in memory, read instead of the logfile where they hold a record.
    fetched: Option<Arc<FetchedChunks>>,
    /// Record bytes taken from `fetched` so far.
    from_memory: u64,
    /// The version digest of the logfile being replayed, fed with each record
    /// header as it is applied: (logfile name, log position it covers up to,
    /// digest). Only when replay entered the logfile at its start; used at its end
    /// instead of reading all headers back from the file.
    digest: Option<(String, u64, VersionBuilder)>,
    /// Versions computed from `digest` (statistics for tests).
    versions_inline: u64,
    /// Disk syncs may run in the background (`set_background_sync`).
    background: bool,
    /// A freeze (`set_stop_at`): no record ending after this position is applied.
    stop_at: Option<u64>,
    /// A delayed replica (`set_delay`): no record logged less than this
    /// long ago is applied.
    delay: Option<std::time::Duration>,
    /// The background sync running: the position it makes durable, its thread.
    bg_sync: Option<(u64, std::thread::JoinHandle<std::io::Result<()>>)>,
}

/// Where replay reads records from: the fetched chunks in memory when they hold
/// the range, else the logfile (with read-ahead).
struct Source {
    fetched: Option<Arc<FetchedChunks>>,
    seq: u64,
    name: String,
    /// The chunk read from last, and the file offset of its first byte.
    mem: Option<(u64, Arc<AlignedBuf>)>,
    /// A record two chunks share, copied together.
    joined: Vec<u8>,
    ra: ReadAhead,
    /// Bytes found in memory (statistics for tests).
    from_memory: u64,
}

impl Source {
    fn get(&mut self, f: &File, at: u64, len: usize, file_len: u64) -> std::io::Result<&[u8]> {
        if let Some(fetched) = &self.fetched {
            let covers = |m: &(u64, Arc<AlignedBuf>)| {
                at >= m.0 && at + len as u64 <= m.0 + m.1.data().len() as u64
            };
            if !self.mem.as_ref().is_some_and(covers) {
                // Replay reads forward only: the chunks wholly before `at` are done
                // (their buffers go back to the fetcher).
                self.mem = None;
                fetched.consumed(self.seq, &self.name, at);
                self.mem = fetched.find(&self.name, at, len);
            }
            if let Some((off, buf)) = &self.mem {
                self.from_memory += len as u64;
                let from = (at - off) as usize;
                return Ok(&buf.data()[from..from + len]);
            }
            self.joined.resize(len, 0);
            if fetched.copy_range(&self.name, at, &mut self.joined) {
                self.from_memory += len as u64;
                return Ok(&self.joined);
            }
        }
        self.ra.get(f, at, len, file_len)
    }
}

fn read_state(dir: &Path) -> Result<Option<ReplayedState>, LoggerError> {
    let path = dir.join(REPLAYED_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| LoggerError::BadState(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoggerError::io(&path, e)),
    }
}

impl Replayer {
    /// Open replay of the logs in `dir` onto `disk`, starting at the persisted
    /// position, or at `start_pos` when nothing was replayed yet (the position
    /// where a full sync began). After a kill of the process (same boot),
    /// at the high-water mark when it is usable; after a reboot at the
    /// durable position, with [`Replayer::inconsistent_until`] set.
    pub fn open(
        dir: &Path,
        node: &str,
        disk_path: &Path,
        size: u64,
        start_pos: u64,
    ) -> Result<Replayer, LoggerError> {
        let boot = current_boot_id();
        Self::open_inner(dir, node, disk_path, size, start_pos, boot.as_deref())
    }

    fn open_inner(
        dir: &Path,
        node: &str,
        disk_path: &Path,
        size: u64,
        start_pos: u64,
        boot_id: Option<&str>,
    ) -> Result<Replayer, LoggerError> {
        let have = disk_size(disk_path).map_err(|e| LoggerError::io(disk_path, e))?;
        if have < size {
            return Err(LoggerError::DiskTooSmall {
                path: disk_path.to_path_buf(),
                have,
                need: size,
            });
        }
        let disk = Disk::open(disk_path).map_err(|e| LoggerError::io(disk_path, e))?;
        let csum = crate::csum::open(dir, disk_path)?;
        let state = read_state(dir)?;
        let durable = state.as_ref().map(|s| s.pos).unwrap_or(start_pos);
        let path: Vec<Entered> = match &state {
            Some(ReplayedState {
                file: Some((name, start)),
                entered,
                ..
            }) => std::iter::once(Entered {
                name: name.clone(),
                start: *start,
                at: durable,
            })
            .chain(entered.iter().map(|(name, start, at)| Entered {
                name: name.clone(),
                start: *start,
                at: *at,
            }))
            .collect(),
            _ => Vec::new(),
        };
        let limit = state.and_then(|s| s.limit).unwrap_or(durable).max(durable);
        let boot = boot_id.filter(|b| valid_boot_id(b)).map(str::to_string);
        if boot.is_none() {
            tracing::warn!(dir = %dir.display(), "no boot id: replay keeps no high-water mark");
        }
        let hw_path = dir.join(HW_FILE);
        let mark = match std::fs::read(&hw_path) {
            Ok(b) => HwMark::decode(&b),
            Err(_) => None,
        };
        let mut r = Replayer {
            dir: dir.to_path_buf(),
            node: node.to_string(),
            disk,
            csum,
            size,
            pos: durable,
            persisted: durable,
            saved_at: std::time::Instant::now(),
            halted: None,
            last_version: None,
            path,
            lineage: None,
            primary: None,
            limit,
            window: PERSIST_WINDOW,
            until: None,
            hw: None,
            fetched: None,
            from_memory: 0,
            digest: None,
            versions_inline: 0,
            background: false,
            stop_at: None,
            delay: None,
            bg_sync: None,
        };
        let this_boot = mark
            .clone()
            .filter(|m| boot.as_deref() == Some(m.boot_id.as_str()));
        match this_boot {
            // Nothing applied beyond the durable position.
            Some(m) if m.pos == durable => r.until = Some(m.until),
            // Killed after applying up to the mark: the page cache holds the
            // image at the mark; go on from there.
            Some(m)
                if m.base == durable
                    && m.pos > durable
                    && m.pos <= limit
                    && r.resume_at_mark(m.pos).unwrap_or(false) =>
            {
                r.pos = m.pos;
                r.until = Some(m.until);
            }
            _ => {
                if let Some(m) = &mark {
                    tracing::info!(dir = %dir.display(), ?m, durable, limit, "high-water mark not usable (another boot, or stale)");
                }
                // Records up to the limit may be on the disk (a reboot may
                // have lost some of them, and the mark); none beyond what is
                // here locally.
                let end = r.local_end().unwrap_or(limit);
                r.until = Some(limit.min(end));
            }
        }
        r.until = r.until.filter(|&u| u > r.pos);
        if let Some(u) = r.until {
            tracing::warn!(dir = %dir.display(), pos = r.pos, until = u, "disk is no consistent image until replay passes {u}");
        }
        if let Some(b) = boot {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&hw_path)
                .map_err(|e| LoggerError::io(&hw_path, e))?;
            // Exactly one mark long (a longer file, garbage, would never decode).
            f.set_len(HW_LEN as u64)
                .map_err(|e| LoggerError::io(&hw_path, e))?;
            r.hw = Some((b, f));
            r.write_mark()?;
        }
        Ok(r)
    }

    /// Where replay starts, as after a process kill (same boot) or after a
    /// reboot (any other `boot_id`): for tests. `None`: no boot id known.
    #[doc(hidden)]
    pub fn open_with_boot_id(
        dir: &Path,
        node: &str,
        disk_path: &Path,
        size: u64,
        start_pos: u64,
        boot_id: Option<&str>,
    ) -> Result<Replayer, LoggerError> {
        Self::open_inner(dir, node, disk_path, size, start_pos, boot_id)
    }

    /// Persist at least every `bytes` of log instead of [`PERSIST_WINDOW`]: for tests.
    #[doc(hidden)]
    pub fn set_persist_window(&mut self, bytes: u64) {
        self.window = bytes.max(1);
    }

    /// Until replay passes the returned position, the disk is not an image
    /// of the primary's after a prefix of the log: after a reboot, unsynced
    /// disk writes of records after the durable position may be partly on
    /// the disk. `None`: it is one now.
    pub fn inconsistent_until(&self) -> Option<u64> {
        self.until.filter(|&u| self.pos < u)
    }

    /// The position persisted last (`replayed`).
    pub fn persisted_position(&self) -> u64 {
        self.persisted
    }

    /// Write the high-water mark (one `pwrite`, not synced).
    fn write_mark(&self) -> Result<(), LoggerError> {
        let Some((boot, f)) = &self.hw else {
            return Ok(());
        };
        let m = HwMark {
            boot_id: boot.clone(),
            base: self.persisted,
            pos: self.pos,
            until: self.inconsistent_until().unwrap_or(0),
        };
        f.write_all_at(&m.encode(), 0)
            .map_err(|e| LoggerError::io(&self.dir.join(HW_FILE), e))
    }

    /// Whether replay can resume at `target`, the high-water mark after a kill:
    /// the logfiles from the durable position to it are one chain of links
    /// with no choice on the way, and `target` is the start of the last of
    /// them or the end of a complete record in it (found by walking record
    /// headers from a known boundary). If so, that logfile becomes the one
    /// replay is in, and the ones left on the way get their versions, as when
    /// replay enters each next one.
    fn resume_at_mark(&mut self, target: u64) -> Result<bool, LoggerError> {
        let (entries, files) = local_files(&self.dir)?;
        // The way replay went is in `replayed` (this build); older state files
        // name no logfiles: then only one chain of links without a choice will do.
        let (last, legacy) = match self.path.iter().rposition(|e| e.at <= target) {
            Some(k) => {
                let e = &self.path[k];
                let Some(i) = files.iter().position(|f| f.is(&e.name, e.start)) else {
                    return Ok(false);
                };
                (i, None)
            }
            None => {
                let Some(cur) = history::locate(self.pos, &files, None).ok().flatten() else {
                    return Ok(false);
                };
                let Some(chain) = history::advance(target, cur, &files) else {
                    return Ok(false);
                };
                (chain.last().copied().unwrap_or(cur), Some((cur, chain)))
            }
        };
        let (e, f) = (&entries[last], &files[last]);
        let mut pos = if (f.start..target).contains(&self.pos) {
            self.pos
        } else {
            f.start
        };
        let file = File::open(&e.path).map_err(|err| LoggerError::io(&e.path, err))?;
        let len = FILE_HEADER_LEN as u64 + (f.end - f.start);
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        while pos < target {
            let at = FILE_HEADER_LEN as u64 + (pos - f.start);
            if at + RECORD_HEADER_LEN as u64 > len {
                return Ok(false);
            }
            file.read_exact_at(&mut hdr, at)
                .map_err(|err| LoggerError::io(&e.path, err))?;
            let Ok((rh, _)) = RecordHeader::decode(&hdr) else {
                return Ok(false);
            };
            if rh.pos != pos || at + rh.total_len() > len {
                return Ok(false);
            }
            pos += rh.total_len();
        }
        if pos != target {
            return Ok(false);
        }
        if let Some((cur, chain)) = legacy {
            // The logfiles left on the way get their versions, as when replay
            // enters each next one.
            self.path.push(Entered::new(&files[cur], self.pos));
            let mut from = cur;
            for i in chain {
                if entries[from].node != self.node {
                    self.version_of(&entries[from], files[from].start, files[i].start, None)?;
                }
                self.path.push(Entered::new(&files[i], files[i].start));
                from = i;
            }
        }
        Ok(true)
    }

    /// The stream position where the local logfiles end.
    fn local_end(&self) -> Result<u64, LoggerError> {
        Ok(local_files(&self.dir)?
            .1
            .iter()
            .map(|f| f.end)
            .max()
            .unwrap_or(0))
    }

    /// Next stream position to apply.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn halted(&self) -> Option<&Halt> {
        self.halted.as_ref()
    }

    /// [`Replayer::persist`] when the last one is at least `interval` ago. Each
    /// persist syncs the disk: a device flush, and the end of the page cache's
    /// absorbing of overwrites. A crash re-applies from the persisted position
    /// (see `replayed.hw` for what that means for consistency); what delays is log
    /// deletion, which waits for the persisted position.
    pub fn persist_if_due(&mut self, interval: std::time::Duration) -> Result<(), LoggerError> {
        self.finish_background_sync(false)?;
        if self.saved_at.elapsed() < interval {
            return Ok(());
        }
        if self.background {
            return self.start_background_sync(true);
        }
        self.persist()
    }

    /// Sync the disk and persist the position.
    pub fn persist(&mut self) -> Result<(), LoggerError> {
        self.finish_background_sync(true)?;
        if self.pos == self.persisted {
            return Ok(());
        }
        self.save(self.pos.saturating_add(self.window))
    }

    /// Sync the disk, then write `replayed` (position and new limit), then
    /// the mark. The limit never drops below a pending `until`, so that a
    /// second reboot still reports the first one's damage.
    fn save(&mut self, limit: u64) -> Result<(), LoggerError> {
        // Callers let a background sync end first (it covers less; its result is
        // recorded before this one's).
        debug_assert!(self.bg_sync.is_none());
        let t0 = std::time::Instant::now();
        self.disk
            .sync()
            .map_err(|e| LoggerError::Disk(e.to_string()))?;
        // The checksums of what the disk holds, durable before the position.
        self.csum
            .sync()
            .map_err(|e| LoggerError::Disk(format!("block checksums: {e}")))?;
        tracing::debug!(pos = self.pos, limit, took = ?t0.elapsed(), "replay: disk synced");
        self.record_durable(self.pos, limit)
    }

    /// The disk holds every record before `pos` durably: write `replayed` (`pos`,
    /// and `limit`, never lowered and never below a pending `until`), then the mark.
    fn record_durable(&mut self, pos: u64, limit: u64) -> Result<(), LoggerError> {
        let limit = limit
            .max(self.limit)
            .max(self.inconsistent_until().unwrap_or(0));
        // The logfile holding the records before `pos`: the last one entered at or
        // before it. Those entered before it are behind for good.
        if let Some(k) = self.path.iter().rposition(|e| e.at <= pos) {
            self.path.drain(..k);
        }
        write_state(&self.dir, pos, Some(limit), &self.path)?;
        self.saved_at = std::time::Instant::now();
        self.persisted = pos;
        self.limit = limit;
        self.write_mark()
    }

    /// Sync the disk on another thread while replay goes on (`set_background_sync`).
    /// Replay never passes the durable limit meanwhile; when the sync has ended,
    /// `replayed` becomes the position it started at and the limit moves a window
    /// past that. Started halfway through the window, a sync usually ends before
    /// replay reaches the limit, so replay does not stop for it.
    /// Freeze replay at log position `at` (see [`crate::freeze`]): records
    /// ending after it wait until `set_stop_at(None)`.
    pub fn set_stop_at(&mut self, at: Option<u64>) {
        self.stop_at = at;
    }

    /// Keep replay `delay` behind the primary's writes (by the records'
    /// log time; `marsadm set-delay`): a record waits until it was logged
    /// that long ago. None or zero: no delay.
    pub fn set_delay(&mut self, delay: Option<std::time::Duration>) {
        self.delay = delay.filter(|d| !d.is_zero());
    }

    pub fn set_background_sync(&mut self, on: bool) {
        self.background = on;
    }

    /// Start a background sync when one is due: replay is past the middle of the
    /// window (or `force`), nothing is running, and there is something to persist.
    fn start_background_sync(&mut self, force: bool) -> Result<(), LoggerError> {
        let due = force || self.pos >= self.limit.saturating_sub(self.window / 2);
        if !self.background || self.bg_sync.is_some() || self.pos <= self.persisted || !due {
            return Ok(());
        }
        let file = self
            .disk
            .try_clone_file()
            .map_err(|e| LoggerError::Disk(e.to_string()))?;
        let pos = self.pos;
        let csum = self.csum.clone();
        let spawned = std::thread::Builder::new()
            .name("mars-replay-sync".into())
            .spawn(move || {
                let t0 = std::time::Instant::now();
                // The disk, then the checksums of what it holds (both before
                // `replayed` moves to `pos`).
                let r = file.sync_data().and_then(|()| csum.sync());
                tracing::debug!(pos, took = ?t0.elapsed(), "replay: disk synced in the background");
                r
            });
        match spawned {
            Ok(h) => self.bg_sync = Some((pos, h)),
            // No thread: the synchronous sync at the limit does the work.
            Err(e) => tracing::warn!("replay: no background sync thread: {e}"),
        }
        // The time rule counts from the start: not one sync after another.
        self.saved_at = std::time::Instant::now();
        Ok(())
    }

    /// Record the result of the background sync if it has ended (or wait for it:
    /// `wait`). A failed sync fails replay as a failed synchronous one does.
    fn finish_background_sync(&mut self, wait: bool) -> Result<(), LoggerError> {
        match &self.bg_sync {
            Some((_, h)) if wait || h.is_finished() => {}
            _ => return Ok(()),
        }
        let Some((pos, h)) = self.bg_sync.take() else {
            return Ok(());
        };
        match h.join() {
            Ok(Ok(())) => self.record_durable(pos, pos.saturating_add(self.window)),
            Ok(Err(e)) => Err(LoggerError::Disk(e.to_string())),
            Err(_) => Err(LoggerError::Disk("background disk sync panicked".into())),
        }
    }

    /// The logfiles of the fetch source's history (its list), so that replay
    /// follows that history where logfiles of another one lie here too (left
    /// from before a failover). `None`: not known (replay follows the links).
    pub fn set_lineage(&mut self, lineage: Option<history::Lineage>) {
        self.lineage = lineage;
    }

    /// The designated primary as this node knows it: records of a logfile
    /// another node wrote are applied only as far as the primary confirmed
    /// them ([`history::unconfirmed_bound`]).
    pub fn set_primary(&mut self, primary: Option<String>) {
        self.primary = primary;
    }

    /// The logfile replay is in (index into `files`), found again by name and
    /// start, or located by position when replay has none yet.
    fn current(&mut self, files: &[LocalFile]) -> Result<Option<usize>, LoggerError> {
        // The last logfile entered at or before the position (after a reboot
        // replay may be behind where it had gone: it goes the same way again).
        if let Some(e) = self.path.iter().rev().find(|e| e.at <= self.pos) {
            return match files.iter().position(|f| f.is(&e.name, e.start)) {
                Some(i) => Ok(Some(i)),
                // Where a full sync began, not fetched yet: wait for it, unless
                // the primary's history does not hold it (the primary changed
                // to another history since).
                None if self.path.len() == 1 && e.at == self.pos => {
                    // Listed, and reaching the position (or the last logfile, growing).
                    let listed = self.lineage.as_ref().is_none_or(|l| {
                        !l.from_primary
                            || l.files.iter().enumerate().any(|(k, x)| {
                                x.name == e.name
                                    && x.start == e.start
                                    && (x.end >= e.at || k + 1 == l.files.len())
                            })
                    });
                    if listed {
                        return Ok(None);
                    }
                    let h = Halt::SplitBrain {
                        file: e.name.clone(),
                        reason: format!(
                            "this node's history begins in {} at log position {} (a full sync), which the primary's history does not hold",
                            e.name, e.at
                        ),
                    };
                    self.halt(h)
                }
                None => Err(LoggerError::Corrupt(format!(
                    "logfile {} that replay is in is gone from {} (removed by hand?); `marsadm invalidate` of the resource here copies the disk anew",
                    e.name,
                    self.dir.display()
                ))),
            };
        }
        match history::locate(self.pos, files, self.lineage.as_ref()) {
            Ok(Some(i)) => {
                self.path.push(Entered::new(&files[i], self.pos));
                self.save_path()?;
                Ok(Some(i))
            }
            Ok(None) => {
                if let Some(first) = files.first().filter(|f| f.start > self.pos) {
                    return self.halt(Halt::Gap {
                        expected_pos: self.pos,
                        file: first.name.clone(),
                        starts_at: first.start,
                    });
                }
                Ok(None)
            }
            Err(reason) => self.halt(Halt::SplitBrain {
                file: files
                    .iter()
                    .find(|f| f.start < self.pos && self.pos <= f.end)
                    .map(|f| f.name.clone())
                    .unwrap_or_default(),
                reason,
            }),
        }
    }

    /// Read records from these fetched chunks where they hold them (see
    /// [`FetchedChunks`]); the logfiles otherwise.
    pub fn use_fetched(&mut self, fetched: Arc<FetchedChunks>) {
        self.fetched = Some(fetched);
    }

    /// Versions of finished logfiles computed while replaying them (the others were
    /// computed by reading their record headers back).
    pub fn versions_computed_inline(&self) -> u64 {
        self.versions_inline
    }

    /// Record bytes replay took from fetched chunks in memory instead of logfiles.
    pub fn bytes_from_memory(&self) -> u64 {
        self.from_memory
    }

    /// Apply up to `max_bytes` of complete records, following one history (see
    /// [`crate::history`]). Never applies a record that does not verify, nor one
    /// of a logfile that does not continue what was applied.
    pub fn step(&mut self, max_bytes: u64) -> Result<StepOutcome, LoggerError> {
        let mut out = StepOutcome::default();
        if let Some(h) = &self.halted {
            return Err(LoggerError::Corrupt(h.to_string()));
        }
        while out.bytes < max_bytes {
            let (entries, files) = local_files(&self.dir)?;
            let Some(ci) = self.current(&files)? else {
                out.idle = true;
                break;
            };
            // Where replay had gone on from this logfile before a restart.
            let planned = self
                .path
                .iter()
                .position(|e| e.at > self.pos)
                .map(|k| self.path[k].clone());
            if let Some(nx) = planned.as_ref().filter(|nx| nx.at == self.pos) {
                let Some(i) = files.iter().position(|f| f.is(&nx.name, nx.start)) else {
                    return Err(LoggerError::Corrupt(format!(
                        "logfile {} that replay went on with before a restart is gone from {}; `marsadm invalidate` of the resource here copies the disk anew",
                        nx.name,
                        self.dir.display()
                    )));
                };
                if !self.leave(&entries[ci], &files[ci], &entries[i], &files[i])? {
                    out.idle = true;
                    break;
                }
                continue;
            }
            let until = match history::next(self.pos, ci, &files, self.lineage.as_ref()) {
                Next::SplitBrain(reason) => {
                    let h = Halt::SplitBrain {
                        file: files[ci].name.clone(),
                        reason,
                    };
                    return self.halt(h);
                }
                Next::CutOff { file, starts_at } => {
                    return self.halt(Halt::Gap {
                        expected_pos: self.pos,
                        file,
                        starts_at,
                    })
                }
                // Going the way it went before a restart: up to where it left this
                // logfile then.
                _ if planned.is_some() => {
                    let at = planned.as_ref().map_or(self.pos, |nx| nx.at);
                    at.min(files[ci].end)
                }
                Next::Wait => {
                    out.idle = true;
                    break;
                }
                Next::Enter(i) => {
                    // After a reboot the disk may hold records of this logfile
                    // beyond the position (up to `inconsistent_until`): a history
                    // that goes on elsewhere here forked below what the disk holds.
                    if let Some(u) = self.inconsistent_until().filter(|&u| u > self.pos) {
                        if files[ci].end > self.pos {
                            let h = Halt::SplitBrain {
                                file: files[ci].name.clone(),
                                reason: format!(
                                    "after a reboot the disk may hold records of {} up to log position {u}, but the history goes on in {} from {}",
                                    files[ci].name, files[i].name, self.pos
                                ),
                            };
                            return self.halt(h);
                        }
                    }
                    if !self.leave(&entries[ci], &files[ci], &entries[i], &files[i])? {
                        out.idle = true;
                        break;
                    }
                    self.path.push(Entered::new(&files[i], self.pos));
                    self.save_path()?;
                    continue;
                }
                Next::Apply { until } => {
                    let primary = self.primary.as_deref();
                    match history::unconfirmed_bound(
                        self.pos,
                        ci,
                        &files,
                        primary,
                        self.lineage.as_ref(),
                    ) {
                        Some(bound) => until.min(bound),
                        None => until,
                    }
                }
            };
            if until <= self.pos {
                out.idle = true;
                break;
            }
            let (entry, cur) = (&entries[ci], &files[ci]);
            let name = cur.name.clone();
            let f = File::open(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?;
            // Records are applied up to this file offset; the file may hold more
            // (another history's records after a fork), which read-ahead may read
            // but replay never applies.
            let stop = FILE_HEADER_LEN as u64 + (until - cur.start);
            let file_len = FILE_HEADER_LEN as u64 + (cur.end - cur.start);
            let mut at = FILE_HEADER_LEN as u64 + (self.pos - cur.start);
            if self.pos == cur.start && self.digest.as_ref().is_none_or(|(n, _, _)| *n != name) {
                self.digest = Some((name.clone(), self.pos, VersionBuilder::new()));
            }
            let mut progressed = false;
            let mut ra = Source {
                fetched: self.fetched.clone(),
                seq: entry.seq,
                name: name.clone(),
                mem: None,
                joined: Vec::new(),
                ra: ReadAhead::new(1 << 20),
                from_memory: 0,
            };
            while out.bytes < max_bytes && at + RECORD_HEADER_LEN as u64 <= stop {
                let mut hdr = [0u8; RECORD_HEADER_LEN];
                hdr.copy_from_slice(
                    ra.get(&f, at, RECORD_HEADER_LEN, file_len)
                        .map_err(|e| LoggerError::io(&entry.path, e))?,
                );
                let (h, crc) = match RecordHeader::decode(&hdr) {
                    Ok(x) => x,
                    Err(e) => {
                        return self.halt(Halt::Corrupt {
                            file: name,
                            pos: self.pos,
                            reason: e.to_string(),
                        })
                    }
                };
                let total = h.total_len();
                if at + total > stop {
                    if until < cur.end {
                        // A fork point (or the source's end of this logfile) inside a
                        // record: not the same records on both sides.
                        let h = Halt::SplitBrain {
                            file: name.clone(),
                            reason: format!(
                                "the history followed parts at log position {until}, inside a record of {name}"
                            ),
                        };
                        return self.halt(h);
                    }
                    break; // the rest of this record is still being fetched
                }
                let payload = ra
                    .get(
                        &f,
                        at + RECORD_HEADER_LEN as u64,
                        h.payload_len() as usize,
                        file_len,
                    )
                    .map_err(|e| LoggerError::io(&entry.path, e))?;
                let checks = RecordHeader::verify(&hdr, crc, payload)
                    .map_err(|e| e.to_string())
                    .and_then(|_| {
                        if h.pos != self.pos {
                            Err(format!(
                                "record says position {}, expected {}",
                                h.pos, self.pos
                            ))
                        } else if h
                            .offset
                            .checked_add(h.length)
                            .is_none_or(|end| end > self.size)
                        {
                            Err(format!(
                                "record writes beyond the device end ({} + {} > {})",
                                h.offset, h.length, self.size
                            ))
                        } else {
                            Ok(())
                        }
                    });
                if let Err(reason) = checks {
                    return self.halt(Halt::Corrupt {
                        file: name,
                        pos: self.pos,
                        reason,
                    });
                }
                // Frozen, or too recent for a delayed replica: this record
                // waits (the step ends as if idle).
                if self.stop_at.is_some_and(|s| self.pos + total > s) {
                    break;
                }
                if let Some(d) = self.delay {
                    let now_ns = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |t| t.as_nanos() as u64);
                    if now_ns < h.stamp_ns.saturating_add(d.as_nanos() as u64) {
                        break;
                    }
                }
                // Never apply a record past the durable limit: a reboot must
                // know how far the disk may be ahead of `replayed`.
                if self.pos + total > self.limit {
                    // A background sync may raise the limit enough.
                    self.finish_background_sync(true)?;
                }
                if self.pos + total > self.limit {
                    self.save(self.pos.saturating_add(self.window.max(total)))?;
                }
                // Disk, checksums, and the checksums written through to their
                // file (page cache) before the mark: a kill keeps all three, so
                // replay resuming at the mark finds them agreeing.
                let csum = &self.csum;
                let writing = csum.writing();
                let r = csum
                    .apply_record(&self.disk, h.kind, h.offset, h.length, payload)
                    .and_then(|()| csum.write_through(h.offset, h.length));
                drop(writing);
                r.map_err(|e| LoggerError::Disk(e.to_string()))?;
                match &mut self.digest {
                    Some((n, upto, b)) if *n == name && *upto == self.pos => {
                        b.add_record(&hdr);
                        *upto += total;
                    }
                    _ => self.digest = None,
                }
                self.pos += total;
                // The mark after the record: a kill from here on re-applies nothing.
                self.write_mark()?;
                if self.background {
                    self.finish_background_sync(false)?;
                    self.start_background_sync(false)?;
                }
                at += total;
                out.records += 1;
                out.bytes += total;
                progressed = true;
            }
            self.from_memory += ra.from_memory;
            ra.mem = None;
            if let Some(fetched) = &self.fetched {
                fetched.consumed(entry.seq, &ra.name, at);
            }
            if !progressed {
                out.idle = true;
                break;
            }
        }
        Ok(out)
    }

    /// Leave `cur` at the position for `child`, which continues it there: our
    /// version of `cur` covers what was applied of it; when the child's writer
    /// has a version of `cur` up to the same position, both must be equal.
    /// Returns false to wait (a format-1/2 child whose writer's version of the
    /// logfile before it is not here yet: fetch brings it first).
    fn leave(
        &mut self,
        cur_entry: &LogfileEntry,
        cur: &LocalFile,
        child_entry: &LogfileEntry,
        child: &LocalFile,
    ) -> Result<bool, LoggerError> {
        let theirs = read_version(&self.dir, cur.seq, &child_entry.node)?
            .filter(|v| v.logfile == cur.name && v.end_pos == self.pos);
        // A format-1/2 continuation is checked by versions only (a first
        // logfile at 0, or a sibling taken at the start of a logfile not begun,
        // follows nothing to check).
        let legacy = child.parent == 0 && child.start > 0 && self.pos > cur.start;
        if legacy && child_entry.node != self.node && theirs.is_none() {
            return Ok(false);
        }
        // Nothing of `cur` applied (a sibling taken instead): no version of it.
        if cur_entry.node != self.node && self.pos > cur.start {
            // Where this member's history began inside `cur` (a full sync):
            // what came before is the source's by construction, so the
            // version before `cur` is the one the child's writer chained on
            // (a version this member picked could be another member's and
            // differ forever, even after `invalidate`); the records it
            // replayed of `cur` are still compared.
            let began_here = matches!(self.path.as_slice(), [e] if e.name == cur.name && e.start == cur.start && e.at > cur.start);
            let origin = theirs.as_ref().filter(|_| began_here);
            let ours = self.version_of(cur_entry, cur.start, self.pos, origin)?;
            if let Some(theirs) = theirs.filter(|t| t.version != ours.version) {
                let h = Halt::SplitBrain {
                    file: child.name.clone(),
                    reason: format!(
                        "the version of {} up to log position {} is {} here, {} at {}",
                        cur.name, self.pos, ours.version, theirs.version, child_entry.node
                    ),
                };
                return self.halt(h);
            }
            self.last_version = Some(ours);
        }
        self.digest = None;
        Ok(true)
    }

    /// Write the way replay went (`replayed`: the durable position and limit as
    /// they are, the logfiles entered since).
    fn save_path(&self) -> Result<(), LoggerError> {
        write_state(&self.dir, self.persisted, Some(self.limit), &self.path)
    }

    /// Our version of the part `[start, end)` of a logfile written by another
    /// node: what replay applied of it, not what the file holds beyond (records
    /// after a fork are no part of this history). Stored as
    /// `version-<seq>-<this node>`.
    fn version_of(
        &mut self,
        entry: &LogfileEntry,
        start: u64,
        end: u64,
        origin: Option<&Version>,
    ) -> Result<Version, LoggerError> {
        if let Some(v) = read_version(&self.dir, entry.seq, &self.node)?.filter(|v| {
            v.logfile == entry.name()
                && v.start_pos == start
                && v.end_pos == end
                && origin.is_none_or(|o| o.prev == v.prev)
        }) {
            return Ok(v);
        }

        // Ours of the logfile before, as stored, or, where our history begins (a
        // full sync started inside this logfile), the origin's: the disk is the
        // source's image there by construction.
        let prev = match origin {
            Some(o) => Some(Version::chained_on(&o.prev)),
            None => match previous_version(&self.dir, &self.node, entry)? {
                Some(v) => Some(v),
                None => self.last_version.take(),
            },
        };
        match self.digest.take() {
            // Every header of the part went through replay: no read-back.
            Some((n, upto, b)) if n == entry.name() && upto == end => {
                self.versions_inline += 1;
                store_version(&self.dir, &self.node, entry, start, end, prev.as_ref(), b)
            }
            _ => finish_version(&self.dir, &self.node, entry, start, end, prev.as_ref()),
        }
    }
    fn halt<T>(&mut self, h: Halt) -> Result<T, LoggerError> {
        tracing::error!(dir = %self.dir.display(), "replay stopped: {h}");
        let msg = h.to_string();
        self.halted = Some(h);
        // What was applied so far is a consistent image: keep it.
        let _ = self.persist();
        Err(LoggerError::Corrupt(msg))
    }
}

fn write_state(
    dir: &Path,
    pos: u64,
    limit: Option<u64>,
    path: &[Entered],
) -> Result<(), LoggerError> {
    let body = serde_json::to_vec(&ReplayedState {
        format: 1,
        pos,
        limit,
        file: path.first().map(|e| (e.name.clone(), e.start)),
        entered: path
            .iter()
            .skip(1)
            .map(|e| (e.name.clone(), e.start, e.at))
            .collect(),
    })
    .map_err(|e| LoggerError::BadState(e.to_string()))?;
    let path = dir.join(REPLAYED_FILE);
    write_atomic(&path, &body).map_err(|e| LoggerError::io(&path, e))
}

fn remove_state_file(dir: &Path, name: &str) -> Result<(), LoggerError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => crate::crashsafe::sync_dir(dir).map_err(|e| LoggerError::io(dir, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LoggerError::io(&path, e)),
    }
}

/// Give up the writer role (the logger must be closed): bring the directory
/// to a clean state (every logfile applied, finished and versioned) and hand
/// the end of the log to replay. Returns that position. Crash-safe: until
/// `applied` is removed, the directory is still a writer's and this can run
/// again.
pub fn demote(dir: &Path, node: &str, disk_path: &Path, size: u64) -> Result<u64, LoggerError> {
    let disk = Disk::open(disk_path).map_err(|e| LoggerError::io(disk_path, e))?;
    let csum = crate::csum::open(dir, disk_path)?;
    let rec = recover(dir, node, &disk, size, &csum)?;
    // A logfile of ours without records (opened at a start, never written)
    // stays: members may have entered it and a new primary may name it as
    // its next logfile's parent; removed, its name would be given to another
    // logfile at this node's next promotion.
    // An old mark must not move the position written here.
    remove_state_file(dir, HW_FILE)?;
    // The logfile replay is in: the writer's last (recovery checked that they
    // are one chain), so that a restart never has to guess between it and a
    // logfile of another history fetched later.
    let path: Vec<Entered> = local_files(dir)?
        .1
        .iter()
        .rev()
        .find(|f| f.end == rec.end_pos)
        .map(|f| Entered::new(f, rec.end_pos))
        .into_iter()
        .collect();
    write_state(dir, rec.end_pos, Some(rec.end_pos), &path)?;
    remove_state_file(dir, APPLIED_FILE)?;
    Ok(rec.end_pos)
}

/// Take up the writer role after replaying (the replayer must be dropped):
/// the replayed position becomes the written-back one; `Logger::open` then
/// applies whatever was fetched beyond it, cuts a torn tail, versions the
/// logfiles and starts a new one that continues the chain. Returns the
/// position. Crash-safe like [`demote`].
///
/// `start_pos`: where replay starts when it never persisted a position (a
/// finished full sync with nothing to replay after it).
pub fn promote(dir: &Path, start_pos: Option<u64>) -> Result<u64, LoggerError> {
    promote_with_boot_id(dir, start_pos, current_boot_id().as_deref())
}

/// [`promote`] as in the boot `boot_id` (the high-water mark counts only when
/// it is this boot's): for tests.
#[doc(hidden)]
pub fn promote_with_boot_id(
    dir: &Path,
    start_pos: Option<u64>,
    boot_id: Option<&str>,
) -> Result<u64, LoggerError> {
    if let Some(a) = read_applied(dir)? {
        forget(dir)?;
        return Ok(a.applied_pos);
    }
    let state = read_state(dir)?;
    let pos = state.as_ref().map(|s| s.pos).or(start_pos).ok_or_else(|| {
        LoggerError::BadState(format!("{}: nothing replayed here", dir.display()))
    })?;
    // How far replay applied: the high-water mark of a replay that was not
    // persisted at its end (same boot: the page cache holds the disk as it
    // was), else the durable position. The history kept reaches at least that
    // far; recovery applies it again from the durable position (the disk is
    // synced only then).
    let applied = std::fs::read(dir.join(HW_FILE))
        .ok()
        .and_then(|b| HwMark::decode(&b))
        .filter(|m| m.base == pos && boot_id == Some(m.boot_id.as_str()))
        .map_or(pos, |m| m.pos.max(pos));
    // The last logfile replay entered (it holds `applied`), else found by position.
    let entered = state.and_then(|s| match (s.file, s.entered.last()) {
        (_, Some((name, start, _))) => Some((name.clone(), *start)),
        (file, None) => file,
    });
    keep_one_history(dir, applied, entered)?;
    write_applied(dir, pos)?;
    forget(dir)?;
    Ok(pos)
}

/// Name prefix of logfiles of another history set aside when a member becomes
/// the writer (`orphan-log-...`; kept for inspection, never read).
pub const ORPHAN_PREFIX: &str = "orphan-";

/// Before the writer's recovery applies every local logfile from `pos` on:
/// only the history replay followed stays (see [`history::chain`]); logfiles
/// of another history (fetched before a failover) are renamed `orphan-...`,
/// and a logfile holding records after a fork is cut at the fork.
fn keep_one_history(dir: &Path, pos: u64, file: Option<(String, u64)>) -> Result<(), LoggerError> {
    let (entries, files) = local_files(dir)?;
    let cur = match file {
        Some((n, start)) => files.iter().position(|f| f.is(&n, start)),
        None => history::locate(pos, &files, None).map_err(|e| {
            LoggerError::Corrupt(format!(
                "cannot become the writer: {e}; `marsadm invalidate` of the resource here copies the disk anew"
            ))
        })?,
    };
    let Some(cur) = cur else {
        if pos == 0 {
            // Nothing applied: no history to continue. What is here (a fetch
            // cut inside the headers of two first logfiles, of two nodes) is
            // no part of this writer's log: set aside, else recovery refuses
            // two logfiles of one sequence number.
            let listed = list_logfiles(dir).map_err(|err| LoggerError::io(dir, err))?;
            for e in &listed {
                let to = dir.join(format!("{ORPHAN_PREFIX}{}", e.name()));
                tracing::warn!(logfile = %e.path.display(), "a logfile of no history this node applied set aside as {}", to.display());
                std::fs::rename(&e.path, &to).map_err(|err| LoggerError::io(&e.path, err))?;
            }
            if !listed.is_empty() {
                crate::crashsafe::sync_dir(dir).map_err(|e| LoggerError::io(dir, e))?;
            }
            return Ok(());
        }
        // Its first logfile would name no parent: members could not tell
        // whether it continues their history.
        return Err(LoggerError::BadState(format!(
            "cannot become the writer: no logfile holding log position {pos} in {} yet (a full sync ended there and fetch has not brought the log since); wait until it has, or promote another member",
            dir.display()
        )));
    };
    if files[cur].end < pos {
        // Where a full sync ended: its base logfile not fetched that far yet.
        return Err(LoggerError::BadState(format!(
            "cannot become the writer: {} holds the log only up to position {}, this node's disk is at {pos} (a full sync ended there and fetch has not brought the log since); wait until it has, or promote another member",
            files[cur].name, files[cur].end
        )));
    }
    let (keep, cuts) = history::chain(cur, pos, &files);
    // Every kept logfile up to the position holds its records as far as the
    // next one starts (a power loss can take the unsynced tail of a fetched
    // logfile, even below what replay applied): the new writer's log has no
    // hole that members behind it would need.
    if let Some(at) = keep.iter().position(|&k| k == cur) {
        for w in 0..=at {
            let f = &files[keep[w]];
            let needed = if w < at {
                files[keep[w + 1]].start
            } else {
                pos
            };
            if f.end < needed {
                return Err(LoggerError::BadState(format!(
                    "cannot become the writer: {} holds the log only up to position {}, and this node's history needs it up to {needed} (its tail was lost, e.g. in a power loss: fetch brings it back); wait until fetch has, or promote another member",
                    f.name, f.end
                )));
            }
        }
    }
    let mut changed = false;
    // Also the logfiles without a whole header (a fetch cut inside it): no
    // part of any history that can be told.
    let listed = list_logfiles(dir).map_err(|err| LoggerError::io(dir, err))?;
    let unreadable = listed.iter().filter(|e| !entries.contains(e));
    let others = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| !keep.contains(i))
        .map(|(_, e)| e);
    for e in others.chain(unreadable) {
        let to = dir.join(format!("{ORPHAN_PREFIX}{}", e.name()));
        tracing::warn!(logfile = %e.path.display(), "another history's logfile set aside as {}", to.display());
        std::fs::rename(&e.path, &to).map_err(|err| LoggerError::io(&e.path, err))?;
        changed = true;
    }
    for (i, at) in cuts {
        let (e, f) = (&entries[i], &files[i]);
        tracing::warn!(logfile = %e.path.display(), at, "cut at the fork: the records after it are another history's");
        let file = OpenOptions::new()
            .write(true)
            .open(&e.path)
            .map_err(|err| LoggerError::io(&e.path, err))?;
        file.set_len(FILE_HEADER_LEN as u64 + (at - f.start))
            .and_then(|()| file.sync_all())
            .map_err(|err| LoggerError::io(&e.path, err))?;
        changed = true;
    }
    if changed {
        crate::crashsafe::sync_dir(dir).map_err(|e| LoggerError::io(dir, e))?;
    }
    Ok(())
}

/// Where a full sync's history begins: at `pos` inside the source's logfile
/// `file` (name, start position). Written once the sync has copied the disk,
/// before replay opens, so that replay enters exactly that logfile (located
/// by position it could take another history's of the same place).
pub fn begin_at(dir: &Path, pos: u64, file: (String, u64)) -> Result<(), LoggerError> {
    let path = [Entered {
        name: file.0,
        start: file.1,
        at: pos,
    }];
    write_state(dir, pos, Some(pos), &path)
}

/// Remove replay's state (`replayed` and the high-water mark, the mark
/// first): a new full sync, or the directory becomes a writer's.
pub fn forget(dir: &Path) -> Result<(), LoggerError> {
    remove_state_file(dir, HW_FILE)?;
    remove_state_file(dir, REPLAYED_FILE)
}

/// On a replaying member: delete the local logfiles that end at or before
/// `upto` and have a successor here (so the one replay is in stays). `upto`
/// must not exceed the *durable* replay position (`replayed`): a restart
/// resumes there. Version files stay (the chain needs them). Returns the
/// names deleted.
pub fn delete_replayed(dir: &Path, upto: u64) -> Result<Vec<String>, LoggerError> {
    let keep = read_state(dir)?.and_then(|s| s.file);
    let logs = list_logfiles(dir).map_err(|e| LoggerError::io(dir, e))?;
    let mut deleted = Vec::new();
    for entry in logs.iter().take(logs.len().saturating_sub(1)) {
        let f = File::open(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?;
        let len = f
            .metadata()
            .map_err(|e| LoggerError::io(&entry.path, e))?
            .len();
        let mut b = [0u8; FILE_HEADER_LEN];
        if f.read_exact_at(&mut b, 0).is_err() {
            continue;
        }
        let Ok(h) = FileHeader::decode(&b) else {
            continue;
        };
        let end = h.start_pos + len.saturating_sub(FILE_HEADER_LEN as u64);
        // Not the logfile replay is in at its durable position (named in
        // `replayed`): a restart resumes in it.
        if end <= upto && keep.as_ref() != Some(&(entry.name(), h.start_pos)) {
            std::fs::remove_file(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?;
            deleted.push(entry.name());
        }
    }
    if !deleted.is_empty() {
        crate::crashsafe::sync_dir(dir).map_err(|e| LoggerError::io(dir, e))?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "c5dd6396-94c9-49c9-8831-c9c91e4f2c8e";

    fn mark() -> HwMark {
        HwMark {
            boot_id: BOOT.into(),
            base: 4096,
            pos: 123_456_789,
            until: u64::MAX,
        }
    }

    #[test]
    fn mark_round_trips_at_its_fixed_length() {
        let b = mark().encode();
        assert_eq!(b.len(), HW_LEN);
        assert!(b.ends_with(b"\n") && b.starts_with(b"MARSHW1 "));
        assert_eq!(HwMark::decode(&b), Some(mark()));
        let zero = HwMark {
            base: 0,
            pos: 0,
            until: 0,
            ..mark()
        };
        assert_eq!(HwMark::decode(&zero.encode()), Some(zero));
    }

    #[test]
    fn short_long_or_empty_marks_are_no_marks() {
        let b = mark().encode();
        for n in 0..b.len() {
            assert_eq!(HwMark::decode(&b[..n]), None, "cut at {n}");
        }
        let mut long = b.clone();
        long.push(b'\n');
        assert_eq!(HwMark::decode(&long), None);
        assert_eq!(HwMark::decode(&[0u8; HW_LEN]), None, "zeroes");
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let b = mark().encode();
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut x = b.clone();
                x[i] ^= 1 << bit;
                assert_eq!(HwMark::decode(&x), None, "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn garbage_with_a_valid_crc_is_no_mark() {
        // Well-formed apart from one field: the crc matches, the field does not.
        let with_crc = |body: String| {
            let mut b = body.into_bytes();
            let crc = crc32c::crc32c(&b);
            b.extend_from_slice(format!("{crc:08x}\n").as_bytes());
            b
        };
        let p = format!("{:020}", 1);
        for body in [
            format!(
                "MARSHW1 {} {p} {p} {p} ",
                "C5DD6396-94C9-49C9-8831-C9C91E4F2C8E"
            ),
            format!(
                "MARSHW1 {} {p} {p} {p} ",
                "c5dd6396-94c9-49c9-8831-c9c91e4f2c8g"
            ),
            format!("MARSHW1 {BOOT} {p} {p} {:>20} ", "+1"),
            format!("MARSHW1 {BOOT} {p} {p} {} ", "9".repeat(20)), // > u64::MAX
            format!("MARSHW1 {BOOT} {p} {p}  {:019} ", 1),
            format!("MARSHW2 {BOOT} {p} {p} {p} "),
        ] {
            let b = with_crc(body.clone());
            assert_eq!(b.len(), HW_LEN, "{body}");
            assert_eq!(HwMark::decode(&b), None, "{body}");
        }
        let ok = with_crc(format!("MARSHW1 {BOOT} {p} {p} {p} "));
        assert!(HwMark::decode(&ok).is_some());
    }

    #[test]
    fn boot_ids_are_checked() {
        assert!(valid_boot_id(BOOT));
        assert!(!valid_boot_id(""));
        assert!(!valid_boot_id(&BOOT[1..]));
        assert!(!valid_boot_id(&BOOT.replace('-', " ")));
        if let Some(b) = current_boot_id() {
            assert!(valid_boot_id(&b));
        }
    }
}
