//! Replay: apply logfiles to a disk in log order, on a node that is not the
//! writer of the log (a secondary), or that must catch up.
//!
//! The logfiles in the resource directory may still be growing (fetch
//! appends to them). [`Replayer::step`] applies every complete record from
//! the persisted position on, one at a time and in order, so the disk is at
//! every moment an image of the primary's disk after some prefix of the log
//! (*anytime consistency*; a record cut by a crash is applied again from the
//! persisted position on restart). Not so after a restart until replay is
//! back where it was: the records after the persisted position are applied
//! again over a disk that already holds later ones (see
//! `tests/replication_sim.rs`). It stops, and applies nothing further,
//! at a record whose checksum fails and when a finished logfile's version does
//! not continue the history this node applied (split brain).
//!
//! State: `replayed` in the resource directory, `{"format":1,"pos":N}`:
//! every record before stream position N is on the disk, the disk was synced
//! before it was written.

use crate::crashsafe::write_atomic;
use crate::disk::{disk_size, Disk};
use crate::logger::LoggerError;
use crate::recovery::{
    finish_version, list_logfiles, previous_version, read_applied, read_version, recover,
    write_applied, LogfileEntry, APPLIED_FILE,
};
use mars_logfmt::{FileHeader, Kind, RecordHeader, Version, FILE_HEADER_LEN, RECORD_HEADER_LEN};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const REPLAYED_FILE: &str = "replayed";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ReplayedState {
    format: u16,
    pos: u64,
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
    /// The logfile's version does not continue the history applied here.
    SplitBrain {
        file: String,
        ours: String,
        theirs: String,
    },
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
            Halt::SplitBrain { file, ours, theirs } => {
                write!(
                    f,
                    "split brain: version of {file} is {theirs} at its origin, {ours} here"
                )
            }
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

/// A logfile with its header, and the next logfile if there is one.
type Located = (LogfileEntry, FileHeader, Option<(LogfileEntry, FileHeader)>);

pub struct Replayer {
    dir: PathBuf,
    node: String,
    disk: Disk,
    size: u64,
    pos: u64,
    persisted: u64,
    halted: Option<Halt>,
    last_version: Option<Version>,
    /// The logfile whose place in this node's history was checked last.
    entered: Option<u64>,
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
    /// where a full sync began).
    pub fn open(
        dir: &Path,
        node: &str,
        disk_path: &Path,
        size: u64,
        start_pos: u64,
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
        let pos = read_state(dir)?.map(|s| s.pos).unwrap_or(start_pos);
        Ok(Replayer {
            dir: dir.to_path_buf(),
            node: node.to_string(),
            disk,
            size,
            pos,
            persisted: pos,
            halted: None,
            last_version: None,
            entered: None,
        })
    }

    /// Next stream position to apply.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn halted(&self) -> Option<&Halt> {
        self.halted.as_ref()
    }

    /// Sync the disk and persist the position.
    pub fn persist(&mut self) -> Result<(), LoggerError> {
        if self.pos == self.persisted {
            return Ok(());
        }
        self.disk
            .sync()
            .map_err(|e| LoggerError::Disk(e.to_string()))?;
        let body = serde_json::to_vec(&ReplayedState {
            format: 1,
            pos: self.pos,
        })
        .unwrap_or_default();
        let path = self.dir.join(REPLAYED_FILE);
        write_atomic(&path, &body).map_err(|e| LoggerError::io(&path, e))?;
        self.persisted = self.pos;
        Ok(())
    }

    /// The logfile holding `pos` (or starting exactly at it), its header, and the next one if any.
    fn locate(&self) -> Result<Option<Located>, LoggerError> {
        let mut with_headers = Vec::new();
        for e in list_logfiles(&self.dir).map_err(|err| LoggerError::io(&self.dir, err))? {
            let f = File::open(&e.path).map_err(|err| LoggerError::io(&e.path, err))?;
            let mut b = [0u8; FILE_HEADER_LEN];
            if f.read_exact_at(&mut b, 0).is_err() {
                continue; // still being created by fetch
            }
            match FileHeader::decode(&b) {
                Ok(h) => with_headers.push((e, h)),
                Err(err) => {
                    return Err(LoggerError::Corrupt(format!(
                        "{}: bad file header: {err}",
                        e.path.display()
                    )))
                }
            }
        }
        // The first logfile that holds `pos`, or ends exactly at it and still
        // needs its version checked (an empty logfile, or one replayed to its
        // end before the next one arrived): never jump over a logfile, or the
        // next version does not chain.
        let mut idx = None;
        for (i, (e, h)) in with_headers.iter().enumerate() {
            if h.start_pos > self.pos {
                break;
            }
            let found = match with_headers.get(i + 1) {
                None => true,
                Some((_, next)) if next.start_pos > self.pos => true,
                Some((_, next)) if next.start_pos < self.pos => false,
                Some(_) => self.must_check_version(e, h.start_pos)?,
            };
            if found {
                idx = Some(i);
                break;
            }
        }
        let Some(i) = idx else {
            if let Some((e, h)) = with_headers.first() {
                if h.start_pos > self.pos {
                    return Err(LoggerError::Corrupt(
                        Halt::Gap {
                            expected_pos: self.pos,
                            file: e.name(),
                            starts_at: h.start_pos,
                        }
                        .to_string(),
                    ));
                }
            }
            return Ok(None);
        };
        let next = with_headers.get(i + 1).cloned();
        let (e, h) = with_headers.swap_remove(i);
        Ok(Some((e, h, next)))
    }

    /// Whether a logfile that ends at the position must be checked before
    /// going on: we have no version for it yet and can chain one (it starts
    /// the log, or we have the version of the logfile before it; not so for
    /// logfiles before the position a full sync started from), or ours
    /// differs from the origin's (a split brain found before a restart stays
    /// a halt).
    fn must_check_version(
        &self,
        entry: &LogfileEntry,
        start_pos: u64,
    ) -> Result<bool, LoggerError> {
        if entry.node == self.node {
            return Ok(false); // our own logfile: versioned when it was finished
        }
        Ok(match read_version(&self.dir, entry.seq, &self.node)? {
            Some(ours) => read_version(&self.dir, entry.seq, &entry.node)?
                .is_some_and(|theirs| theirs.version != ours.version),
            None => start_pos == 0 || previous_version(&self.dir, &self.node, entry)?.is_some(),
        })
    }

    /// Apply up to `max_bytes` of complete records. Never applies a record that does not verify.
    pub fn step(&mut self, max_bytes: u64) -> Result<StepOutcome, LoggerError> {
        let mut out = StepOutcome::default();
        if let Some(h) = &self.halted {
            return Err(LoggerError::Corrupt(h.to_string()));
        }
        while out.bytes < max_bytes {
            let Some((entry, header, next)) = self.locate()? else {
                out.idle = true;
                break;
            };
            if self.entered != Some(entry.seq) {
                if !self.continues_history(&entry)? {
                    out.idle = true; // its origin's version of the previous logfile is not here yet
                    break;
                }
                if self.halted.is_some() {
                    break;
                }
                self.entered = Some(entry.seq);
            }
            let f = File::open(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?;
            let file_len = f
                .metadata()
                .map_err(|e| LoggerError::io(&entry.path, e))?
                .len();
            let mut at = FILE_HEADER_LEN as u64 + (self.pos - header.start_pos);
            let mut progressed = false;
            let mut hdr = [0u8; RECORD_HEADER_LEN];
            while out.bytes < max_bytes && at + RECORD_HEADER_LEN as u64 <= file_len {
                f.read_exact_at(&mut hdr, at)
                    .map_err(|e| LoggerError::io(&entry.path, e))?;
                let (h, crc) = match RecordHeader::decode(&hdr) {
                    Ok(x) => x,
                    Err(e) => {
                        return self.halt(Halt::Corrupt {
                            file: entry.name(),
                            pos: self.pos,
                            reason: e.to_string(),
                        })
                    }
                };
                let total = h.total_len();
                if at + total > file_len {
                    break; // the rest of this record is still being fetched
                }
                let mut payload = vec![0u8; h.payload_len() as usize];
                f.read_exact_at(&mut payload, at + RECORD_HEADER_LEN as u64)
                    .map_err(|e| LoggerError::io(&entry.path, e))?;
                let checks = RecordHeader::verify(&hdr, crc, &payload)
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
                        file: entry.name(),
                        pos: self.pos,
                        reason,
                    });
                }
                let r = match h.kind {
                    Kind::Write => self.disk.write_vectored_at(&[&payload], h.offset),
                    Kind::Trim => self.disk.zero_range(h.offset, h.length, true),
                    Kind::WriteZeroes => self.disk.zero_range(h.offset, h.length, false),
                };
                r.map_err(|e| LoggerError::Disk(e.to_string()))?;
                self.pos += total;
                at += total;
                out.records += 1;
                out.bytes += total;
                progressed = true;
            }
            // At the end of a finished logfile: check the history, then move on.
            let file_end = header.start_pos + (file_len - FILE_HEADER_LEN as u64);
            match next {
                Some((next_entry, next_header)) if self.pos == file_end => {
                    if next_header.start_pos != file_end {
                        return self.halt(Halt::Gap {
                            expected_pos: file_end,
                            file: next_entry.name(),
                            starts_at: next_header.start_pos,
                        });
                    }
                    self.check_version(&entry, header.start_pos, file_end)?;
                    if self.halted.is_some() {
                        break;
                    }
                    continue;
                }
                _ => {}
            }
            if !progressed {
                out.idle = true;
                break;
            }
        }
        Ok(out)
    }

    /// Compare our version of a finished logfile with its origin's, when the origin's is known.
    fn check_version(
        &mut self,
        entry: &LogfileEntry,
        start: u64,
        end: u64,
    ) -> Result<(), LoggerError> {
        if entry.node == self.node {
            return Ok(()); // our own logfile: its version was written when it was finished
        }
        let ours = match read_version(&self.dir, entry.seq, &self.node)? {
            Some(v) => v,
            None => {
                // Ours of the logfile before, as stored (the one in memory can be
                // older when replay went past logfiles checked before a restart), or
                // the origin's where our history begins (a full sync).
                let prev = match previous_version(&self.dir, &self.node, entry)? {
                    Some(v) => Some(v),
                    None => self.last_version.take(),
                };
                finish_version(&self.dir, &self.node, entry, start, end, prev.as_ref())?
            }
        };
        if let Some(theirs) = read_version(&self.dir, entry.seq, &entry.node)? {
            if theirs.version != ours.version {
                let h = Halt::SplitBrain {
                    file: entry.name(),
                    ours: ours.version.clone(),
                    theirs: theirs.version,
                };
                self.halt::<()>(h).ok();
                return Ok(());
            }
        }
        self.last_version = Some(ours);
        Ok(())
    }

    /// Before applying from a logfile written by another node: that node's
    /// version of the previous logfile must equal ours. This is where a node
    /// whose log went on after a failover elsewhere (a former primary) finds
    /// that the new primary's log does not continue its history. Returns false
    /// when the origin's version is not here yet (fetch brings it first).
    fn continues_history(&mut self, entry: &LogfileEntry) -> Result<bool, LoggerError> {
        if entry.node == self.node {
            return Ok(true);
        }
        let Some(prev_seq) = entry.seq.checked_sub(1) else {
            return Ok(true);
        };
        let Some(ours) = read_version(&self.dir, prev_seq, &self.node)? else {
            return Ok(true); // our history begins inside this logfile (a full sync)
        };
        let Some(theirs) = read_version(&self.dir, prev_seq, &entry.node)? else {
            return Ok(false);
        };
        if ours.version != theirs.version {
            let h = Halt::SplitBrain {
                file: entry.name(),
                ours: ours.version,
                theirs: theirs.version,
            };
            self.halt::<()>(h).ok();
        }
        Ok(true)
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

fn write_state(dir: &Path, pos: u64) -> Result<(), LoggerError> {
    let body = serde_json::to_vec(&ReplayedState { format: 1, pos })
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
    let rec = recover(dir, node, &disk, size)?;
    // A logfile of ours without records (opened at a start, never written) adds
    // nothing to the history but would collide with the new primary's next one.
    let logs = list_logfiles(dir).map_err(|e| LoggerError::io(dir, e))?;
    if let Some(last) = logs.last().filter(|l| l.node == node) {
        let len = std::fs::metadata(&last.path)
            .map_err(|e| LoggerError::io(&last.path, e))?
            .len();
        if len <= FILE_HEADER_LEN as u64 {
            remove_state_file(dir, &mars_logfmt::version_file_name(last.seq, node))?;
            remove_state_file(dir, &last.name())?;
        }
    }
    write_state(dir, rec.end_pos)?;
    remove_state_file(dir, APPLIED_FILE)?;
    Ok(rec.end_pos)
}

/// Take up the writer role after replaying (the replayer must be dropped):
/// the replayed position becomes the written-back one; `Logger::open` then
/// applies whatever was fetched beyond it, cuts a torn tail, versions the
/// logfiles and starts a new one that continues the chain. Returns the
/// position. Crash-safe like [`demote`].
pub fn promote(dir: &Path) -> Result<u64, LoggerError> {
    if let Some(a) = read_applied(dir)? {
        remove_state_file(dir, REPLAYED_FILE)?;
        return Ok(a.applied_pos);
    }
    let pos = read_state(dir)?.map(|s| s.pos).ok_or_else(|| {
        LoggerError::BadState(format!("{}: nothing replayed here", dir.display()))
    })?;
    write_applied(dir, pos)?;
    remove_state_file(dir, REPLAYED_FILE)?;
    Ok(pos)
}
