//! Writer thread, writeback thread and the public [`Logger`] handle.

use crate::disk::{disk_size, open_direct, Disk};
use crate::index::{overlay, ExtentData, Index};
use crate::recovery::{
    self, finish_version, new_logfile, store_version, write_applied, LogfileEntry,
};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use mars_logfmt::{
    Kind, RecordHeader, Version, VersionBuilder, FILE_HEADER_LEN, FORMAT_VERSION,
    RECORD_HEADER_LEN, RECORD_MAGIC,
};
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::sync::oneshot;

#[derive(Debug, Error)]
pub enum LoggerError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("disk: {0}")]
    Disk(String),
    #[error("corrupt log: {0}")]
    Corrupt(String),
    #[error("bad state file: {0}")]
    BadState(String),
    #[error("{0}")]
    Csum(#[from] crate::csum::CsumError),
    #[error("disk {path} is {have} bytes, smaller than the resource size {need}")]
    DiskTooSmall { path: PathBuf, have: u64, need: u64 },
}

impl LoggerError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        LoggerError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Settings of one logger.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name (logfile suffix).
    pub node: String,
    /// Directory of the resource's logfiles and state.
    pub dir: PathBuf,
    /// The local disk (file or block device).
    pub disk: PathBuf,
    /// Device size in bytes.
    pub size: u64,
    /// Random id fixed at resource creation, written into every logfile header.
    pub resource_id: u64,
    /// Rotate to a new logfile when the current one reaches this size.
    pub logfile_max_bytes: u64,
    /// Bound on data logged but not yet written back; writers wait beyond it.
    pub mem_limit_bytes: u64,
    /// Sync the log without being asked once this much is unsynced (writeback only applies synced records).
    pub sync_batch_bytes: u64,
    /// Sync the log after this long idle with unsynced data.
    pub idle_sync: Duration,
    /// Sync the disk and persist the applied position at most this often while
    /// writeback progresses (and at close, and when asked: `persist_now`, which
    /// `log-delete` uses). Each disk sync writes out the disk's dirty pages and flushes
    /// the device cache, which stalls the log's own syncs; the longer the interval,
    /// the more overwrites the page cache absorbs. What it costs: after a crash,
    /// recovery applies the log from the last persisted position again.
    pub persist_interval: Duration,
    /// Write large batches to the log with O_DIRECT where the file system allows it.
    pub direct_io: bool,
    /// Deleted logfiles are kept as spares, up to this many bytes, and reused as new
    /// logfiles (0: delete them).
    pub spare_bytes: u64,
    /// The last this many bytes of log are kept in memory for fetchers
    /// (`Logger::read_recent`; 0: none).
    pub tail_cache_bytes: u64,
    /// Called (from the logger's threads, often) while a log write or rotation
    /// finds no space or no file descriptor and is tried again: the owner frees
    /// space at once (marsd runs its space policy). It must not block.
    pub on_no_space: Option<SpaceHook>,
    /// Called (blocking, from the reading thread) with blocks of the disk a
    /// read found bad: repair them from a good copy (the owner freezes this
    /// logger and another member's copy at one log position and copies the
    /// blocks over); returns the blocks repaired. The read then looks again.
    pub repair: Option<RepairHook>,
}

/// See [`Config::repair`].
#[derive(Clone)]
pub struct RepairHook(pub Arc<RepairFn>);

/// Repairs blocks of the disk; returns those it repaired.
pub type RepairFn = dyn Fn(&[u64]) -> io::Result<Vec<u64>> + Send + Sync;

impl std::fmt::Debug for RepairHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepairHook")
    }
}

/// See [`Config::on_no_space`].
#[derive(Clone)]
pub struct SpaceHook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for SpaceHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpaceHook")
    }
}

impl Config {
    pub fn new(node: &str, dir: &Path, disk: &Path, size: u64, resource_id: u64) -> Config {
        Config {
            node: node.to_string(),
            dir: dir.to_path_buf(),
            disk: disk.to_path_buf(),
            size,
            resource_id,
            logfile_max_bytes: 256 << 20,
            mem_limit_bytes: 256 << 20,
            sync_batch_bytes: 16 << 20,
            idle_sync: Duration::from_millis(5),
            persist_interval: Duration::from_secs(10),
            direct_io: true,
            spare_bytes: 1 << 30,
            tail_cache_bytes: 64 << 20,
            on_no_space: None,
            repair: None,
        }
    }
}

/// Positions in the log stream and other counters, for `view`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// End of what is in the logfile (survives a crash of the daemon).
    pub logged_pos: u64,
    /// End of what is on stable storage (fdatasync of the log).
    pub synced_pos: u64,
    /// End of what is written back to the disk.
    pub applied_pos: u64,
    /// End of what is written back, with the disk synced and the position persisted.
    pub persisted_pos: u64,
    pub current_logfile: String,
    pub mem_used_bytes: u64,
    /// Set when the logger stopped accepting writes after an I/O error.
    pub failed: Option<String>,
}

type Reply = oneshot::Sender<io::Result<()>>;

enum Op {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
        reply: Reply,
    },
    Zero {
        offset: u64,
        len: u64,
        fua: bool,
        trim: bool,
        reply: Reply,
    },
    Rotate {
        reply: oneshot::Sender<io::Result<Option<String>>>,
    },
    /// Spares appeared: an empty new current logfile is swapped for one.
    TakeSpare,
    Shutdown,
}

impl Op {
    fn payload_len(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
    }

    /// Bytes the request's record takes in the log stream (none for the others).
    fn log_len(&self) -> u64 {
        match self {
            Op::Write { data, .. } => RECORD_HEADER_LEN as u64 + data.len() as u64,
            Op::Zero { .. } => RECORD_HEADER_LEN as u64,
            _ => 0,
        }
    }
}

struct WbEntry {
    seq: u64,
    end_pos: u64,
    offset: u64,
    len: u64,
    kind: Kind,
    data: Option<Bytes>,
    /// The record header as written (with `data`, the record's bytes in the logfile).
    hdr: [u8; RECORD_HEADER_LEN],
}

impl WbEntry {
    fn mem(&self) -> u64 {
        self.data.as_ref().map(|d| d.len() as u64).unwrap_or(0) + RECORD_MEM_OVERHEAD
    }
}

const RECORD_MEM_OVERHEAD: u64 = 128;

struct FinishedLog {
    entry: LogfileEntry,
    start_pos: u64,
    end_pos: u64,
    /// Digest of the logfile's records, fed by writeback as it applies them (so that
    /// the version needs no reading back of the logfile).
    digest: Option<VersionBuilder>,
}

/// Writeback's queue: records in log order, and where a logfile ends.
enum WbItem {
    Record(WbEntry),
    /// Boxed: rare, and large (the digest state); records are many.
    EndOfFile(Box<FinishedLog>),
}

impl WbItem {
    fn end_pos(&self) -> u64 {
        match self {
            WbItem::Record(e) => e.end_pos,
            WbItem::EndOfFile(f) => f.end_pos,
        }
    }
}

#[derive(Default)]
struct WbState {
    queue: VecDeque<WbItem>,
    finished: VecDeque<Box<FinishedLog>>,
    mem_used: u64,
    synced_pos: u64,
    writer_done: bool,
    writeback_done: bool,
    /// A freeze (`Logger::freeze`): writeback applies no record ending after
    /// this position until the lease runs out or the freeze is released.
    hold: Option<(u64, Instant)>,
    /// Writeback is applying a batch it took (the disk is not at `applied_pos`).
    applying: bool,
    /// Repairs writing into the frozen disk now (`Logger::pin_frozen`): the
    /// position, and how many. Writeback stays there until they are done,
    /// whatever the lease, a release or another freeze says meanwhile.
    pin: Option<(u64, usize)>,
}

impl WbState {
    /// The position writeback may apply records up to now (a lease that ran
    /// out, or a writer that is done, holds nothing).
    fn hold_limit(&self) -> u64 {
        if let Some((at, _)) = self.pin {
            return at;
        }
        match self.hold {
            Some((at, until)) if !self.writer_done && Instant::now() < until => at,
            _ => u64::MAX,
        }
    }
}

/// What the syncer needs to know about the log, and who waits for it to be durable.
struct SyncState {
    /// The current logfile, opened once per syncer thread (the writer swaps them on
    /// rotation, after syncing the old one): each open file learns of a writeback
    /// error by itself, so two syncs running at once both see it.
    files: Vec<Arc<File>>,
    path: PathBuf,
    /// The highest target of the syncs running now (a waiter at or below it is
    /// covered by one of them).
    syncing_to: u64,
    /// End of what the writer has written into the logfile.
    written_pos: u64,
    /// End of what is on stable storage. Only grows.
    synced_pos: u64,
    /// FUA writes and FLUSHes: acknowledged once `synced_pos >= target`. Targets ascend.
    waiters: VecDeque<(u64, Reply)>,
    /// The writer has finished; exit once nothing is left to do.
    stop: bool,
}

struct Shared {
    cfg: Config,
    disk: Disk,
    /// The disk's block checksums: updated by writeback, checked by reads.
    csum: crate::csum::CsumHandle,
    index: Mutex<Index>,
    /// Lock order: `sync` and `wb` are never held together; `failed` may be taken
    /// while holding either.
    sync: Mutex<SyncState>,
    /// The syncer waits here for waiters, a full batch, or the idle timeout.
    sync_cv: Condvar,
    wb: Mutex<WbState>,
    /// Writeback waits here for work; the writer waits here for memory.
    wb_cv: Condvar,
    mem_cv: Condvar,
    /// The persister waits here for applied records or the end of writeback.
    persist_cv: Condvar,
    /// Freezes wait here for writeback to reach, or stop at, their position.
    hold_cv: Condvar,
    logged_pos: AtomicU64,
    /// Log bytes written with O_DIRECT (statistics).
    direct_bytes: AtomicU64,
    /// Tests: the I/O thread's job with this number (from 1) fails with ENOSPC.
    #[cfg(test)]
    fail_io_job: AtomicU64,
    /// Tests: the I/O thread's job with this number (from 1) is written as if
    /// O_DIRECT had been refused.
    #[cfg(test)]
    refuse_io_job: AtomicU64,
    /// Tests: the refused job waits for this.
    #[cfg(test)]
    release_io: std::sync::atomic::AtomicBool,
    /// Tests: how often a batch waited for room in the pipeline.
    #[cfg(test)]
    room_waits: AtomicU64,
    /// Tests: batches completed while an earlier one was not.
    #[cfg(test)]
    out_of_order: AtomicU64,
    #[cfg(test)]
    io_jobs: AtomicU64,
    /// Tests: most batches in flight at once.
    #[cfg(test)]
    max_inflight: AtomicU64,
    applied_pos: AtomicU64,
    persisted_pos: AtomicU64,
    /// Order of the log's I/O jobs where they share a page.
    io_order: IoOrder,
    /// The records of the last `tail_cache_bytes` of log, for fetchers.
    tail: Mutex<crate::tail::TailCache>,
    /// Held while syncing the disk and writing `applied` (the persister, `persist_now`).
    persist_lock: Mutex<()>,
    current_logfile: Mutex<String>,
    failed: Mutex<Option<String>>,
}

/// How long a log write that finds no space or no file descriptor (see
/// [`transient`]) is tried again while the space policy frees some, before
/// the error reaches the client.
const TRANSIENT_RETRY_FOR: Duration = Duration::from_secs(20);

/// Errors that pass: no space in the node directory's filesystem (or quota),
/// no file descriptor left in the process or the system.
pub fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE)
    )
}

/// Run a log write; while it fails with a [`transient`] error, ask for space
/// (`Config::on_no_space`) and try again, for at most `TRANSIENT_RETRY_FOR`.
/// Rewriting the same bytes at the same offset is harmless.
fn retrying<T>(shared: &Shared, f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    retrying_for(shared, TRANSIENT_RETRY_FOR, f)
}

/// How long writeback and version files wait for space: they hold no client
/// (writers wait for memory once the writeback queue is full), and failing
/// them fails the logger for good.
const BACKGROUND_RETRY_FOR: Duration = Duration::from_secs(3600);

/// [`retrying`] for at most `limit`.
fn retrying_for<T>(
    shared: &Shared,
    limit: Duration,
    mut f: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    let mut warned = false;
    let mut persisted_at: Option<Instant> = None;
    loop {
        match f() {
            Err(e) if transient(&e) && start.elapsed() < limit => {
                shared.no_space();
                let full = matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
                if full && persisted_at.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                    persisted_at = Some(Instant::now());
                    // The hook gave back what its owner keeps in reserve: take
                    // the moment to persist the applied position (a few bytes),
                    // without which no logfile can be deleted.
                    let _ = shared.persist();
                }
                if !warned {
                    warned = true;
                    tracing::warn!(resource_dir = %shared.cfg.dir.display(), "log write: {e}; asking for space and trying again");
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            r => {
                if warned && r.is_ok() {
                    tracing::info!(resource_dir = %shared.cfg.dir.display(), waited = ?start.elapsed(), "log write went through after space was freed");
                }
                return r;
            }
        }
    }
}

impl Shared {
    /// Ask the owner of the logger to free space now (see `Config::on_no_space`).
    fn no_space(&self) {
        if let Some(h) = &self.cfg.on_no_space {
            (h.0)();
        }
    }

    fn fail(&self, what: String) {
        tracing::error!(resource_dir = %self.cfg.dir.display(), "logger failed: {what}");
        let mut f = self.failed.lock();
        if f.is_none() {
            *f = Some(what);
        }
    }

    /// The log is durable up to `pos`: acknowledge the waiters it covers and let
    /// writeback apply the records before it. Callable from any thread; `synced_pos`
    /// never moves backwards.
    fn advance_synced(&self, pos: u64) {
        let mut ready = Vec::new();
        {
            let mut s = self.sync.lock();
            if pos > s.synced_pos {
                s.synced_pos = pos;
            }
            while s.waiters.front().is_some_and(|(t, _)| *t <= s.synced_pos) {
                if let Some((_, r)) = s.waiters.pop_front() {
                    ready.push(r);
                }
            }
        }
        {
            let mut wb = self.wb.lock();
            if pos > wb.synced_pos {
                wb.synced_pos = pos;
                self.wb_cv.notify_all();
            }
        }
        for r in ready {
            let _ = r.send(Ok(()));
        }
    }

    /// fdatasync `file` (the current logfile, or the one just finished) so that
    /// everything before log position `target` is durable, then acknowledge what
    /// that covers. Refused once the logger failed: a sync after a failed one proves
    /// nothing, so nothing may be reported durable any more. Syncs run concurrently
    /// only on distinct open files of the logfile (the kernel reports a writeback
    /// error once per open file: two syncs racing on one could see one failure
    /// between them, and the other would report as durable what it lost).
    fn sync_log(&self, file: &File, path: &Path, target: u64) -> io::Result<()> {
        if let Some(f) = self.failed.lock().clone() {
            return Err(io::Error::other(f));
        }
        if self.sync.lock().synced_pos >= target {
            return Ok(());
        }
        match file.sync_data() {
            Ok(()) => {
                self.advance_synced(target);
                Ok(())
            }
            Err(e) => {
                self.fail_sync(path, &e);
                Err(e)
            }
        }
    }

    /// Sync the disk, then persist what writeback has applied so far. Returns the
    /// persisted position.
    fn persist(&self) -> io::Result<u64> {
        let _p = self.persist_lock.lock();
        let applied = self.applied_pos.load(Ordering::Acquire);
        let persisted = self.persisted_pos.load(Ordering::Acquire);
        if applied <= persisted {
            return Ok(persisted);
        }
        if let Err(e) = self.disk.sync() {
            // The disk's page cache state is unknown after a failed sync.
            let msg = format!("persisting applied position: disk sync: {e}");
            self.fail(msg.clone());
            return Err(io::Error::other(msg));
        }
        // The checksums of what the disk holds, durable before the position
        // (records after the old one are applied again after a crash,
        // rewriting disk and checksums: tried again later).
        if let Err(e) = self.csum.sync() {
            if transient(&e) {
                self.no_space();
            }
            tracing::warn!(resource_dir = %self.cfg.dir.display(), "persisting applied position (tried again later): block checksums: {e}");
            return Err(io::Error::new(
                e.kind(),
                format!("persisting applied position: block checksums: {e}"),
            ));
        }
        match write_applied(&self.cfg.dir, applied) {
            Ok(()) => {
                self.persisted_pos.store(applied, Ordering::Release);
                Ok(applied)
            }
            Err(e) => {
                // The old position stays on disk (replay from it is correct, only
                // longer): tried again next time, the logger goes on. A full
                // node directory or no file descriptor left passes.
                let kind = match &e {
                    LoggerError::Io { source, .. } => {
                        if transient(source) {
                            self.no_space();
                        }
                        source.kind()
                    }
                    _ => io::ErrorKind::Other,
                };
                tracing::warn!(resource_dir = %self.cfg.dir.display(), "persisting applied position (tried again later): {e}");
                Err(io::Error::new(
                    kind,
                    format!("persisting applied position: {e}"),
                ))
            }
        }
    }

    /// After a failed fdatasync nothing more may be acknowledged as durable: the
    /// page cache state is unknown. Fails the logger and every waiter.
    fn fail_sync(&self, path: &Path, e: &io::Error) {
        self.fail(format!("fdatasync of {}: {e}", path.display()));
        let waiters: Vec<_> = self.sync.lock().waiters.drain(..).collect();
        for (_, r) in waiters {
            let _ = r.send(Err(io::Error::new(e.kind(), format!("fdatasync: {e}"))));
        }
    }
}

/// Handle to a running transaction logger. Cheap to share behind an `Arc`.
pub struct Logger {
    shared: Arc<Shared>,
    tx: Sender<Op>,
    /// The writer's state: its thread holds the lock while it processes a batch; a
    /// caller with a small request takes it (`try_lock`) to log right away when the
    /// writer is idle.
    writer: Arc<Mutex<Writer>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "resource is shutting down")
}

impl Logger {
    /// Recover the resource directory (see `recovery`) and start logging into a new logfile.
    pub fn open(cfg: Config) -> Result<Logger, LoggerError> {
        let have = disk_size(&cfg.disk).map_err(|e| LoggerError::io(&cfg.disk, e))?;
        if have < cfg.size {
            return Err(LoggerError::DiskTooSmall {
                path: cfg.disk.clone(),
                have,
                need: cfg.size,
            });
        }
        let disk = Disk::open(&cfg.disk).map_err(|e| LoggerError::io(&cfg.disk, e))?;
        let csum = crate::csum::open(&cfg.dir, &cfg.disk)?;
        let rec = recovery::recover(&cfg.dir, &cfg.node, &disk, cfg.size, &csum)?;
        let (file, path, file_cap) = new_logfile(
            &cfg.dir,
            &cfg.node,
            rec.next_file_seq,
            rec.end_pos,
            rec.next_record_seq,
            cfg.resource_id,
            rec.parent_of_next,
        )?;
        let entry = LogfileEntry {
            seq: rec.next_file_seq,
            node: cfg.node.clone(),
            path,
        };
        let file = Arc::new(file);
        let shared = Arc::new(Shared {
            disk,
            csum,
            index: Mutex::new(Index::new()),
            sync: Mutex::new(SyncState {
                files: open_for_sync(&entry.path).map_err(|e| LoggerError::io(&entry.path, e))?,
                syncing_to: 0,
                path: entry.path.clone(),
                written_pos: rec.end_pos,
                synced_pos: rec.end_pos,
                waiters: VecDeque::new(),
                stop: false,
            }),
            sync_cv: Condvar::new(),
            wb: Mutex::new(WbState {
                synced_pos: rec.end_pos,
                ..Default::default()
            }),
            wb_cv: Condvar::new(),
            hold_cv: Condvar::new(),
            mem_cv: Condvar::new(),
            persist_cv: Condvar::new(),
            logged_pos: AtomicU64::new(rec.end_pos),
            direct_bytes: AtomicU64::new(0),
            #[cfg(test)]
            fail_io_job: AtomicU64::new(0),
            #[cfg(test)]
            refuse_io_job: AtomicU64::new(0),
            #[cfg(test)]
            release_io: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            room_waits: AtomicU64::new(0),
            #[cfg(test)]
            out_of_order: AtomicU64::new(0),
            #[cfg(test)]
            io_jobs: AtomicU64::new(0),
            #[cfg(test)]
            max_inflight: AtomicU64::new(0),
            applied_pos: AtomicU64::new(rec.end_pos),
            persisted_pos: AtomicU64::new(rec.end_pos),
            io_order: IoOrder::default(),
            tail: Mutex::new(crate::tail::TailCache::new(cfg.tail_cache_bytes)),
            persist_lock: Mutex::new(()),
            current_logfile: Mutex::new(entry.name()),
            failed: Mutex::new(None),
            cfg,
        });
        let cfg_direct = shared.cfg.direct_io;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (io_tx, io_rx) = crossbeam_channel::unbounded();
        let (io_done_tx, io_done_rx) = crossbeam_channel::unbounded();
        let direct = if cfg_direct {
            open_direct(&entry.path)
        } else {
            None
        };
        let writer = Writer {
            rotate_retry_at: None,
            shared: shared.clone(),
            file,
            file_cap,
            entry,
            file_start_pos: rec.end_pos,
            pos: rec.end_pos,
            next_seq: rec.next_record_seq,
            now: Vec::new(),
            direct: direct.map(Arc::new),
            spare: Vec::new(),
            inflight: VecDeque::new(),
            io_tx: Some(io_tx),
            io_done: io_done_rx.clone(),
            done_early: BTreeMap::new(),
            next_job: 1,
            closed: false,
            inline_batch: Vec::with_capacity(1),
        };
        let writer = Arc::new(Mutex::new(writer));
        let w_thread = writer.clone();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| LoggerError::Disk(format!("spawn {name}: {e}")))
        };
        let (wb_shared, p_shared, io_shared, last_version) = (
            shared.clone(),
            shared.clone(),
            shared.clone(),
            rec.last_version,
        );
        let mut threads = vec![
            spawn(
                "mars-log-writer",
                Box::new(move || Writer::run(w_thread, rx, io_done_rx)),
            )?,
            spawn(
                "mars-writeback",
                Box::new(move || writeback_loop(wb_shared)),
            )?,
            spawn(
                "mars-persist",
                Box::new(move || persist_loop(p_shared, last_version)),
            )?,
        ];
        for me in 0..IO_THREADS {
            let (io_shared, io_rx, io_done_tx) =
                (io_shared.clone(), io_rx.clone(), io_done_tx.clone());
            threads.push(spawn(
                &format!("mars-log-io{me}"),
                Box::new(move || io_loop(io_shared, io_rx, io_done_tx)),
            )?);
        }
        drop((io_rx, io_done_tx));
        for me in 0..SYNCERS {
            let s_shared = shared.clone();
            threads.push(spawn(
                &format!("mars-log-sync{me}"),
                Box::new(move || sync_loop(s_shared, me)),
            )?);
        }
        Ok(Logger {
            shared,
            tx,
            writer,
            threads: Mutex::new(threads),
        })
    }

    pub fn size(&self) -> u64 {
        self.shared.cfg.size
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.shared.cfg.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request beyond the end of the device",
            )),
        }
    }

    async fn submit(&self, op: Op, rx: oneshot::Receiver<io::Result<()>>) -> io::Result<()> {
        if let Some(f) = self.shared.failed.lock().clone() {
            return Err(io::Error::other(f));
        }
        // Between `plug` and `unplug` on this thread, small requests wait in the plug
        // and are logged together; a larger one empties the plug first. (Requests in
        // flight together have no order in NBD: when the writer is busy, the plug's
        // go through its queue and a later batch may be logged inline before them.)
        let op = match self.plug_push(op) {
            Ok(()) => return rx.await.map_err(|_| closed())?,
            Err(op) => op,
        };
        // A small request is logged right here when the writer is idle: no hand-off to
        // its thread and back. The rules are the same (`Writer::process` either way).
        let op = match self.try_process_now(op) {
            Ok(()) => return rx.await.map_err(|_| closed())?,
            Err(op) => op,
        };
        self.tx.send(op).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// Start collecting the small requests submitted on this thread (until `unplug`,
    /// which must follow on the same thread with no `.await` between): they are
    /// logged as one batch, one `pwritev` for all, instead of one each. A server calls
    /// this around starting the requests it read from a client in one go.
    pub fn plug(&self) {
        PLUG.with(|p| {
            let mut p = p.borrow_mut();
            // Anything still here was left by a caller that panicked before `unplug`:
            // never acknowledged, its waiters gone. Dropped, not logged (it may not even
            // be this logger's). The vector's room stays for this round.
            p.ops.clear();
            p.log_len = 0;
            p.owner = self.id();
        });
    }

    /// Log what was collected since `plug` and stop collecting.
    pub fn unplug(&self) {
        if self.flush_plug() {
            PLUG.with(|p| p.borrow_mut().owner = 0);
        }
    }

    /// Log what this thread's plug holds now, if it collects for this logger (it
    /// goes on collecting). Returns whether it does.
    fn flush_plug(&self) -> bool {
        let Some(ops) = PLUG.with(|p| {
            let mut p = p.borrow_mut();
            (p.owner == self.id()).then(|| p.take())
        }) else {
            return false;
        };
        let ops = self.submit_batch(ops);
        PLUG.with(|p| p.borrow_mut().give_back(ops));
        true
    }

    /// Put `op` into this thread's plug if one is collecting for this logger and the
    /// request is small (logging what the plug holds first when it would not fit);
    /// otherwise give `op` back, after logging what the plug holds.
    fn plug_push(&self, op: Op) -> Result<(), Op> {
        let small = op.payload_len() <= INLINE_MAX;
        let (collecting, fits) = PLUG.with(|p| {
            let p = p.borrow();
            (p.owner == self.id(), p.log_len + op.log_len() < PLUG_MAX)
        });
        if !collecting {
            return Err(op);
        }
        if !(small && fits) {
            self.flush_plug();
            if !small {
                return Err(op);
            }
        }
        PLUG.with(|p| {
            let mut p = p.borrow_mut();
            p.log_len += op.log_len();
            p.ops.push(op);
        });
        Ok(())
    }

    /// Log `ops` (small requests, in this order): on this thread when the writer is
    /// idle, else through its queue. Returns the emptied vector.
    fn submit_batch(&self, mut ops: Vec<Op>) -> Vec<Op> {
        if ops.is_empty() {
            return ops;
        }
        if let Some(mut w) = self.writer.try_lock() {
            let payload = ops.iter().map(Op::payload_len).sum();
            if w.can_process_now(payload) {
                w.process(&mut ops);
                ops.clear();
                return ops;
            }
        }
        for op in ops.drain(..) {
            // A closed queue drops the op: its waiter gets "shutting down".
            let _ = self.tx.send(op);
        }
        ops
    }

    /// Process `op` on the calling thread if that cannot block: the writer is idle, the
    /// payload is small (buffered, no O_DIRECT), no rotation is due and memory is
    /// available. Otherwise give it back for the writer thread.
    fn try_process_now(&self, op: Op) -> Result<(), Op> {
        if op.payload_len() > INLINE_MAX {
            return Err(op);
        }
        let Some(mut w) = self.writer.try_lock() else {
            return Err(op);
        };
        if !w.can_process_now(op.payload_len()) {
            return Err(op);
        }
        let mut batch = std::mem::take(&mut w.inline_batch);
        batch.push(op);
        w.process(&mut batch);
        w.inline_batch = batch;
        Ok(())
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.submit(
            Op::Write {
                offset,
                data,
                fua,
                reply,
            },
            rx,
        )
        .await
    }

    /// Trim (`trim = true`, may deallocate) or write zeroes.
    pub async fn zero(&self, offset: u64, len: u64, fua: bool, trim: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.submit(
            Op::Zero {
                offset,
                len,
                fua,
                trim,
                reply,
            },
            rx,
        )
        .await
    }

    /// Make every write acknowledged so far durable. Not a message to the writer: an
    /// acknowledged write is in the logfile, so its end is at most `written_pos` now,
    /// and the flush waits (with the FUA writes) for the syncer to pass that position.
    pub async fn flush(&self) -> io::Result<()> {
        if let Some(f) = self.shared.failed.lock().clone() {
            return Err(io::Error::other(f));
        }
        let rx = {
            let mut s = self.shared.sync.lock();
            if s.synced_pos >= s.written_pos {
                return Ok(());
            }
            if s.stop {
                // The syncer is gone (a failed logger at shutdown): nothing will answer.
                return Err(closed());
            }
            let (reply, rx) = oneshot::channel();
            let target = s.written_pos;
            s.waiters.push_back((target, reply));
            rx
        };
        self.shared.sync_cv.notify_one();
        rx.await.map_err(|_| closed())?
    }

    /// Start a new logfile now. `None` when the current one is still empty.
    pub async fn rotate(&self) -> io::Result<Option<String>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Op::Rotate { reply }).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// [`Logger::read`] that never waits for the device: `None` when part of the range
    /// must come from the disk and is not in the page cache (`preadv2(RWF_NOWAIT)`);
    /// then call `read` from a blocking context.
    pub fn try_read_nonblocking(&self, offset: u64, len: u64) -> Option<io::Result<Bytes>> {
        if let Err(e) = self.check_range(offset, len) {
            return Some(Err(e));
        }
        let pieces = self.shared.index.lock().lookup(offset, len);
        if let [(off, e)] = &pieces[..] {
            if *off == offset && e.end == offset + len {
                if let ExtentData::Bytes(b) = &e.data {
                    return Some(Ok(b.clone()));
                }
            }
        }
        let covered: u64 = pieces.iter().map(|(o, e)| e.end - o).sum();
        let mut buf = vec![0u8; len as usize];
        if covered < len {
            match self.shared.disk.try_read_cached_at(&mut buf, offset)? {
                Ok(()) => {}
                Err(e) => return Some(Err(e)),
            }
            // Checked against the block checksums; a block only partly read
            // is read whole from the page cache. Anything else (a mismatch, a
            // block not cached) goes the blocking way, which looks again.
            let disk = &self.shared.disk;
            let mut read = |b: &mut [u8], o: u64| match disk.try_read_cached_at(b, o) {
                Some(r) => r,
                None => Err(io::ErrorKind::WouldBlock.into()),
            };
            let check = |bs: u64, be: u64| !covers(&pieces, bs, be);
            match self.shared.csum.suspects(offset, &buf, &check, &mut read) {
                Ok(s) if s.is_empty() => {}
                _ => return None,
            }
        }
        overlay(&mut buf, offset, &pieces);
        Some(Ok(Bytes::from(buf)))
    }

    /// Read the newest data (blocking: call from a blocking context).
    pub fn read(&self, offset: u64, len: u64) -> io::Result<Bytes> {
        self.check_range(offset, len)?;
        let pieces = self.shared.index.lock().lookup(offset, len);
        if let [(off, e)] = &pieces[..] {
            if *off == offset && e.end == offset + len {
                if let ExtentData::Bytes(b) = &e.data {
                    return Ok(b.clone());
                }
            }
        }
        let mut buf = vec![0u8; len as usize];
        self.read_pieces(offset, &mut buf, &pieces)?;
        Ok(Bytes::from(buf))
    }

    /// [`Logger::read`] into `buf` (blocking).
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let pieces = self.shared.index.lock().lookup(offset, buf.len() as u64);
        self.read_pieces(offset, buf, &pieces)
    }

    /// Fill `buf` (at `offset`) from the disk where `pieces` (the index's newer data)
    /// do not cover it, then lay the pieces over it.
    fn read_pieces(
        &self,
        offset: u64,
        buf: &mut [u8],
        pieces: &[(u64, crate::index::Extent)],
    ) -> io::Result<()> {
        let covered: u64 = pieces.iter().map(|(o, e)| e.end - o).sum();
        if covered < buf.len() as u64 {
            self.shared.disk.read_exact_at(buf, offset)?;
            self.check_disk_read(offset, buf, pieces)?;
        }
        overlay(buf, offset, pieces);
        Ok(())
    }

    /// Check what a read found on the disk against the block checksums: the
    /// blocks whose bytes come from the disk (not those the index's newer data
    /// covers whole). A mismatch is read again; a block bad twice is an error
    /// (EIO to an NBD client), never data.
    fn check_disk_read(
        &self,
        offset: u64,
        buf: &mut [u8],
        pieces: &[(u64, crate::index::Extent)],
    ) -> io::Result<()> {
        let disk = &self.shared.disk;
        let check = |bs: u64, be: u64| !covers(pieces, bs, be);
        let bad = match self
            .shared
            .csum
            .verify(offset, buf, &check, &mut |b, o| disk.read_exact_at(b, o))?
        {
            Ok(()) => return Ok(()),
            Err(bad) => bad,
        };
        // The disk returned other data than was written for these blocks:
        // repaired from a good copy, the read looks again; else EIO.
        if !self.repair(&bad) {
            return Err(bad.into());
        }
        disk.read_exact_at(buf, offset)?;
        match self
            .shared
            .csum
            .verify(offset, buf, &check, &mut |b, o| disk.read_exact_at(b, o))?
        {
            Ok(()) => Ok(()),
            Err(bad) => Err(bad.into()),
        }
    }

    /// Repair `bad` through the owner's hook: whether all of it was.
    fn repair(&self, bad: &crate::csum::BadBlocks) -> bool {
        let Some(hook) = &self.shared.cfg.repair else {
            return false;
        };
        match (hook.0)(&bad.blocks) {
            Ok(done) => bad.blocks.iter().all(|b| done.contains(b)),
            Err(e) => {
                tracing::warn!(disk = %bad.disk.display(), "repair of {} from a good copy failed: {e}", crate::csum::ranges(&bad.blocks));
                false
            }
        }
    }

    /// Blocks of the disk found bad since start (by reads).
    pub fn checksum_errors(&self) -> u64 {
        crate::csum::errors(&self.shared.cfg.dir)
    }

    pub fn status(&self) -> Status {
        let (synced_pos, mem_used_bytes) = {
            let wb = self.shared.wb.lock();
            (wb.synced_pos, wb.mem_used)
        };
        Status {
            logged_pos: self.shared.logged_pos.load(Ordering::Acquire),
            synced_pos,
            applied_pos: self.shared.applied_pos.load(Ordering::Acquire),
            persisted_pos: self.shared.persisted_pos.load(Ordering::Acquire),
            current_logfile: self.shared.current_logfile.lock().clone(),
            mem_used_bytes,
            failed: self.shared.failed.lock().clone(),
        }
    }

    /// The bytes of this node's logfile number `file_seq` from file `offset` on, at
    /// most `out.len()`, copied to the start of `out`, if the log's recent records
    /// in memory hold them (a fetcher that keeps up asks for those: no device read
    /// for them): how many; None if not. What is returned is in the logfile, but not
    /// necessarily durable: the caller limits the length of `out`.
    pub fn read_recent(&self, file_seq: u64, offset: u64, out: &mut [u8]) -> Option<usize> {
        self.shared.tail.lock().read_into(file_seq, offset, out)
    }

    /// Sync the disk and persist the written-back position now (instead of waiting
    /// for the persister's interval). Returns the persisted position. Blocking.
    pub fn persist_now(&self) -> io::Result<u64> {
        self.shared.persist()
    }

    /// Delete logfiles that are finished, versioned and entirely written back
    /// (with the position persisted): up to `spare_bytes` of them are kept as spares
    /// for reuse. Returns the names deleted.
    pub fn delete_applied(&self) -> Result<Vec<String>, LoggerError> {
        self.delete_applied_before(u64::MAX)
    }

    /// [`Logger::delete_applied`] when space is what is wanted: the logfiles are
    /// removed, none is kept as a spare (emergency deletion).
    pub fn delete_applied_without_spares(&self) -> Result<Vec<String>, LoggerError> {
        self.delete_applied_upto(u64::MAX, 0)
    }

    /// [`Logger::delete_applied`], limited to logfiles that end at or before `limit`
    /// (the caller checked that every member replayed that far).
    pub fn delete_applied_before(&self, limit: u64) -> Result<Vec<String>, LoggerError> {
        self.delete_applied_upto(limit, self.shared.cfg.spare_bytes)
    }

    /// Delete as [`Logger::delete_applied_before`]; up to `spare_budget` bytes of
    /// spares are kept.
    fn delete_applied_upto(
        &self,
        limit: u64,
        spare_budget: u64,
    ) -> Result<Vec<String>, LoggerError> {
        let cfg = &self.shared.cfg;
        let persisted = self.shared.persisted_pos.load(Ordering::Acquire).min(limit);
        let current = self.shared.current_logfile.lock().clone();
        let mut deleted = Vec::new();
        for entry in recovery::list_logfiles(&cfg.dir).map_err(|e| LoggerError::io(&cfg.dir, e))? {
            if entry.name() == current {
                continue;
            }
            match recovery::read_version(&cfg.dir, entry.seq, &entry.node)? {
                Some(v) if v.end_pos <= persisted => {
                    recovery::retire_logfile(&cfg.dir, &entry, spare_budget)
                        .map_err(|e| LoggerError::io(&entry.path, e))?;
                    deleted.push(entry.name());
                }
                _ => {}
            }
        }
        if !deleted.is_empty() {
            crate::crashsafe::sync_dir(&cfg.dir).map_err(|e| LoggerError::io(&cfg.dir, e))?;
            if spare_budget > 0 {
                // A closed logger takes none.
                let _ = self.tx.send(Op::TakeSpare);
            }
        }
        Ok(deleted)
    }

    /// Stop accepting requests, write everything back, persist. Blocking.
    pub fn close(&self) {
        let _ = self.tx.send(Op::Shutdown);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        // Nothing writes the disk any more: the checksum file is closed
        // cleanly now, even while an NBD connection still holds this logger.
        self.shared.csum.release();
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    shared: Arc<Shared>,
    /// A rotation failed for want of space or a descriptor: not again before then.
    rotate_retry_at: Option<Instant>,
    file: Arc<File>,
    /// Length of the current logfile beyond which nothing was ever written: more than
    /// the log's end in a recycled logfile (records of its earlier use lie there).
    file_cap: u64,
    entry: LogfileEntry,
    file_start_pos: u64,
    /// Stream position of the next record.
    pos: u64,
    next_seq: u64,
    /// Replies to send once the batch is in the logfile.
    now: Vec<Reply>,
    /// The current logfile opened with O_DIRECT, for large batches (None where the
    /// file system refuses O_DIRECT).
    direct: Option<Arc<File>>,
    /// Bounce buffers for O_DIRECT writes (aligned slices are taken from them), ready
    /// for reuse.
    spare: Vec<Vec<u8>>,
    /// Batches handed to the I/O thread, oldest first: they complete (index,
    /// writeback queue, acknowledgments) in this order, on this thread.
    inflight: VecDeque<Inflight>,
    /// Jobs for the I/O thread (None once the writer has stopped).
    io_tx: Option<Sender<IoJob>>,
    /// The I/O threads' answers, one per job, in any order.
    io_done: Receiver<IoDone>,
    /// Answers that came before those of earlier jobs, by job number.
    done_early: BTreeMap<u64, IoDone>,
    /// Number of the next job (from 1; see `IoOrder`).
    next_job: u64,
    /// Set once the writer has stopped: nothing is processed any more.
    closed: bool,
    /// Reused for requests processed on the caller's thread.
    inline_batch: Vec<Op>,
}

/// Padding after buffered writes into recycled logfiles (see `Writer::padded_end`).
static ZEROS: [u8; DIRECT_ALIGN as usize] = [0; DIRECT_ALIGN as usize];

/// Requests with at most this much payload may be logged on the caller's thread.
const INLINE_MAX: u64 = 64 << 10;

/// A plug holds less than this much log: below `DIRECT_MIN`, so that its batch is a
/// buffered write the caller's thread completes (never one for the I/O threads).
const PLUG_MAX: u64 = DIRECT_MIN;

/// Small requests collected on one thread between `Logger::plug` and `unplug`.
struct Plug {
    /// The logger collecting (`Logger::id`); 0 while none is.
    owner: usize,
    ops: Vec<Op>,
    log_len: u64,
}

impl Plug {
    fn take(&mut self) -> Vec<Op> {
        self.log_len = 0;
        std::mem::take(&mut self.ops)
    }

    /// Keep the vector's room for the next batch.
    fn give_back(&mut self, ops: Vec<Op>) {
        if self.ops.is_empty() && ops.capacity() > self.ops.capacity() {
            self.ops = ops;
        }
    }
}

thread_local! {
    static PLUG: std::cell::RefCell<Plug> = const {
        std::cell::RefCell::new(Plug {
            owner: 0,
            ops: Vec::new(),
            log_len: 0,
        })
    };
}

/// A batch takes at most this much payload from the queue. Small enough that a
/// client's requests in flight make several batches, written at once by the I/O
/// threads (fio 1 MiB writes at QD8: 8 MiB in flight, four batches), large enough
/// that a batch of 4 KiB writes stays one `pwritev`.
const BATCH_BYTES_MAX: u64 = 2 << 20;
const BATCH_OPS_MAX: usize = 512;
/// Batches at least this large get `sync_file_range` right away, so that the next
/// fdatasync has little left to write.
const START_WRITEBACK_MIN: u64 = 256 << 10;
/// Batches of this size and up (and at most `DIRECT_MAX`) are written with O_DIRECT:
/// no copy into the page cache and no dirty pages to write back later, at the price
/// of a copy into an aligned buffer and of waiting for the device. Smaller batches
/// (random small writes) go through the page cache, so their acknowledgment is not
/// delayed by the device.
const DIRECT_MIN: u64 = 256 << 10;
const DIRECT_MAX: u64 = 16 << 20;
const DIRECT_ALIGN: u64 = crate::disk::DIRECT_ALIGN as u64;

/// `pwrite` all of `buf` at `offset` on an O_DIRECT file. `buf`, its length and `offset`
/// are `DIRECT_ALIGN`ed. Returns how much was written before an error (with the error).
fn write_direct_at(f: &File, mut buf: &[u8], mut offset: u64) -> (usize, io::Result<()>) {
    let mut done = 0;
    while !buf.is_empty() {
        match f.write_at(buf, offset) {
            Ok(0) => return (done, Err(io::ErrorKind::WriteZero.into())),
            // A short O_DIRECT write ends on a sector boundary, not necessarily on
            // DIRECT_ALIGN: let the caller write the rest through the page cache.
            Ok(n) if n % DIRECT_ALIGN as usize != 0 => {
                return (done + n, Err(io::ErrorKind::Interrupted.into()))
            }
            Ok(n) => {
                done += n;
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Err(e)),
        }
    }
    (done, Ok(()))
}

/// Threads writing batches to the log at once (see `io_loop`).
const IO_THREADS: usize = 4;
/// Batches in flight to the I/O threads at most (one being written by each, the rest
/// waiting): the writer thread fills the next bounce buffer while the device writes
/// the others. Their payload (at most `MAX_INFLIGHT` x `BATCH_BYTES_MAX`, unless one
/// request alone is larger) is not counted in `mem_used` until they complete.
const MAX_INFLIGHT: usize = 6;

/// A batch handed to the I/O thread (or being completed): its requests and records,
/// and where it went in the log.
struct Inflight {
    /// The I/O job's number (0: written on the writer thread).
    job: u64,
    ops: Vec<Op>,
    entries: Vec<WbEntry>,
    start_pos: u64,
    start_seq: u64,
    file_offset: u64,
    len: u64,
}

/// Where a batch's bytes go: `[start, end)` of the logfile, held in a bounce buffer
/// from `skew` on, whose first byte belongs at file offset `base` (`start` rounded
/// down). `[a, b)` is the aligned middle, written with O_DIRECT.
struct DirectLayout {
    skew: usize,
    base: u64,
    start: u64,
    a: u64,
    b: u64,
    end: u64,
}

struct IoJob {
    id: u64,
    buf: Vec<u8>,
    layout: DirectLayout,
    file: Arc<File>,
    direct: Arc<File>,
}

struct IoDone {
    id: u64,
    buf: Vec<u8>,
    res: io::Result<()>,
    /// O_DIRECT was refused (EINVAL); the batch went through the page cache.
    refused: bool,
}

/// The log's I/O threads (`IO_THREADS`): each writes one batch the writer
/// thread prepared, several at once (the device takes them at once: fio writes
/// this VM's disk at 1.0 GB/s with one 16 MiB request at a time, 1.4 GB/s with
/// two), while the writer prepares the next. Batches finish in any order; the
/// writer completes them in log order. The page two neighbouring batches share is
/// written in order (`IoOrder`).
fn io_loop(shared: Arc<Shared>, jobs: Receiver<IoJob>, done: Sender<IoDone>) {
    while let Ok(job) = jobs.recv() {
        let order = || shared.io_order.wait_for_earlier(job.id);
        let write = || {
            let mut refused = false;
            let res = retrying(&shared, || {
                let (r, rf) = write_layout(
                    &shared,
                    &job.file,
                    &job.direct,
                    &job.buf,
                    &job.layout,
                    order,
                );
                refused |= rf;
                r
            });
            (res, refused)
        };
        // A panic must not leave the writer and the later jobs waiting for this job
        // forever: it becomes this job's error.
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            let r = test_io(&shared, &jobs, &job, order).unwrap_or_else(write);
            #[cfg(not(test))]
            let r = write();
            r
        }));
        let (res, refused) =
            written.unwrap_or_else(|_| (Err(io::Error::other("log I/O thread panicked")), false));
        shared.io_order.finished(job.id);
        let answer = IoDone {
            id: job.id,
            buf: job.buf,
            res,
            refused,
        };
        if done.send(answer).is_err() {
            return;
        }
    }
}

/// Tests: the job the test picked fails with ENOSPC or is written as if O_DIRECT had
/// been refused (None: write it as usual).
#[cfg(test)]
fn test_io(
    shared: &Shared,
    jobs: &Receiver<IoJob>,
    job: &IoJob,
    order: impl Fn(),
) -> Option<(io::Result<()>, bool)> {
    let n = shared.io_jobs.fetch_add(1, Ordering::Relaxed) + 1;
    let fail = n == shared.fail_io_job.load(Ordering::Relaxed);
    let refuse = n == shared.refuse_io_job.load(Ordering::Relaxed);
    if !fail && !refuse {
        return None;
    }
    // Only once the writer has handed over the next batch (failure), or the test
    // says so (refusal), or after a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    // With several I/O threads the next job may be taken at once: handed over
    // means queued, or already picked up by another thread.
    let wait = || {
        if refuse {
            !shared.release_io.load(Ordering::Acquire)
        } else {
            jobs.is_empty() && shared.io_jobs.load(Ordering::Relaxed) <= n
        }
    };
    while wait() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if fail {
        return Some((Err(io::Error::from_raw_os_error(libc::ENOSPC)), false));
    }
    order();
    let l = &job.layout;
    let data = &job.buf[l.skew + (l.start - l.base) as usize..l.skew + (l.end - l.base) as usize];
    Some((job.file.write_all_at(data, l.start), true))
}

/// The memory page size (4 KiB where unknown).
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => DIRECT_ALIGN,
    })
}

/// Order among the log's I/O jobs: a batch's first partial page is the page the
/// batch before it ends in, which that batch writes with zeros after its end (see
/// `Writer::padded_end`). Both go through the page cache; the later batch writes
/// its part only once every earlier job has finished, so its bytes land on the
/// zeros and not under them.
#[derive(Default)]
struct IoOrder {
    state: Mutex<IoOrderState>,
    cv: Condvar,
}

#[derive(Default)]
struct IoOrderState {
    /// Every job up to this number has finished.
    upto: u64,
    /// Finished jobs after `upto`.
    later: std::collections::BTreeSet<u64>,
}

impl IoOrder {
    fn finished(&self, id: u64) {
        let mut s = self.state.lock();
        s.later.insert(id);
        loop {
            let next = s.upto + 1;
            if !s.later.remove(&next) {
                break;
            }
            s.upto = next;
        }
        self.cv.notify_all();
    }

    fn wait_for_earlier(&self, id: u64) {
        let mut s = self.state.lock();
        while s.upto + 1 < id {
            self.cv.wait(&mut s);
        }
    }
}

/// The records' bytes as they go into the logfile: each header, then its payload.
fn record_slices(entries: &[WbEntry]) -> Vec<&[u8]> {
    let mut bufs: Vec<&[u8]> = Vec::with_capacity(2 * entries.len());
    for e in entries {
        bufs.push(&e.hdr[..]);
        if let Some(d) = &e.data {
            bufs.push(&d[..]);
        }
    }
    bufs
}

/// The same error for another reply (ENOSPC must reach the client as ENOSPC).
fn copy_error(e: &io::Error, msg: &str) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), msg.to_string()),
    }
}

/// Copy the records of a batch that goes to `[start, start+len)` of the logfile into
/// `buf`, laid out as in the file. None when the batch has no whole aligned block (or
/// no aligned buffer could be had): write it through the page cache instead.
fn fill_bounce(
    buf: &mut Vec<u8>,
    entries: &[WbEntry],
    start: u64,
    len: u64,
    padded_end: u64,
) -> Option<DirectLayout> {
    let end = start + len;
    let base = start / DIRECT_ALIGN * DIRECT_ALIGN;
    let a = start.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let b = end / DIRECT_ALIGN * DIRECT_ALIGN;
    if b <= a {
        return None;
    }
    let need = (padded_end.max(end) - base) as usize;
    if buf.len() < need + DIRECT_ALIGN as usize {
        *buf = vec![0u8; need + DIRECT_ALIGN as usize];
    }
    let skew = buf.as_ptr().align_offset(DIRECT_ALIGN as usize);
    if skew >= DIRECT_ALIGN as usize {
        return None;
    }
    let out = &mut buf[skew..skew + need];
    let mut at = (start - base) as usize;
    for e in entries {
        out[at..at + RECORD_HEADER_LEN].copy_from_slice(&e.hdr);
        at += RECORD_HEADER_LEN;
        if let Some(d) = &e.data {
            out[at..at + d.len()].copy_from_slice(d);
            at += d.len();
        }
    }
    out[at..].fill(0);
    Some(DirectLayout {
        skew,
        base,
        start,
        a,
        b,
        end: base + need as u64,
    })
}

/// Aligned middles of at least this size are written as two halves at once: the
/// device writes 16 MiB at 1.4 GB/s with two requests in flight against 1.0 GB/s
/// with one (fio, this VM). A crash can then leave the second half written and the
/// first not: the records' durable field (docs/FORMAT.md) makes recovery call that
/// hole a torn tail, not corruption.
const SPLIT_MIN: u64 = 1 << 20;

/// Write `part` (the file's bytes `[from, to)`) with O_DIRECT; what O_DIRECT does
/// not take (refused, short) goes through the page cache. Returns the bytes written
/// with O_DIRECT and whether O_DIRECT was refused.
fn write_direct_or_buffered(
    file: &File,
    direct: &File,
    part: &[u8],
    from: u64,
) -> (u64, io::Result<bool>) {
    let (done, r) = write_direct_at(direct, part, from);
    let res = match r {
        Ok(()) => Ok(false),
        Err(e) => {
            let refused = e.raw_os_error() == Some(libc::EINVAL);
            if refused {
                tracing::warn!("O_DIRECT log write refused ({e}); writing through the page cache");
            }
            if refused || e.kind() == io::ErrorKind::Interrupted {
                file.write_all_at(&part[done..], from + done as u64)
                    .map(|()| refused)
            } else {
                Err(e)
            }
        }
    };
    (done as u64, res)
}

/// Write a filled bounce buffer: the whole aligned blocks in the middle with
/// O_DIRECT, as two concurrent halves when large (`SPLIT_MIN`); then, once `order`
/// returns (the batches before this one are written), the partial blocks at both
/// ends through the page cache (so that no block is written both ways). Returns
/// whether O_DIRECT was refused (the rest then went through the page cache).
fn write_layout(
    shared: &Shared,
    file: &File,
    direct: &File,
    buf: &[u8],
    l: &DirectLayout,
    order: impl Fn(),
) -> (io::Result<()>, bool) {
    let part = |from: u64, to: u64| {
        &buf[l.skew + (from - l.base) as usize..l.skew + (to - l.base) as usize]
    };
    let mut refused = false;
    let res = (|| {
        let m = if l.b - l.a >= SPLIT_MIN {
            (l.a + (l.b - l.a) / 2) / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            l.b
        };
        if page_size() > DIRECT_ALIGN {
            // Pages larger than the blocks: the middle could share a page with the
            // batch before's partial block (page-cache and O_DIRECT writes of one page
            // at once). Write after that batch, as with one I/O thread.
            order();
        }
        let (first, second) = std::thread::scope(|s| {
            let second_half = || write_direct_or_buffered(file, direct, part(m, l.b), m);
            // No thread to be had (EAGAIN under a process limit): one half after the other.
            let second = (m < l.b).then(|| {
                std::thread::Builder::new()
                    .name("mars-log-io-half".into())
                    .spawn_scoped(s, second_half)
                    .map_err(|_| second_half)
            });
            let first = write_direct_or_buffered(file, direct, part(l.a, m), l.a);
            let second = second.map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| (0, Err(io::Error::other("log write thread panicked")))),
                Err(second_half) => second_half(),
            });
            (first, second)
        });
        for (done, r) in std::iter::once(first).chain(second) {
            shared.direct_bytes.fetch_add(done, Ordering::Relaxed);
            refused |= r?;
        }
        if page_size() <= DIRECT_ALIGN {
            order();
        }
        if l.a > l.start {
            file.write_all_at(part(l.start, l.a), l.start)?;
        }
        if l.end > l.b {
            file.write_all_at(part(l.b, l.end), l.b)?;
        }
        Ok(())
    })();
    (res, refused)
}

/// The header bytes of record `h` with `payload`: exactly what
/// `RecordHeader::encode_into` writes before its copy of the payload (checked by a
/// test), so that the payload itself can be written from the request's buffer.
fn encode_header(h: &RecordHeader, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut b = [0u8; RECORD_HEADER_LEN];
    b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&(h.kind as u16).to_le_bytes());
    b[8..16].copy_from_slice(&h.seq.to_le_bytes());
    b[16..24].copy_from_slice(&h.pos.to_le_bytes());
    b[24..32].copy_from_slice(&h.offset.to_le_bytes());
    b[32..40].copy_from_slice(&h.length.to_le_bytes());
    b[40..44].copy_from_slice(&h.payload_len().to_le_bytes());
    // 44..48 flags stay zero.
    b[48..56].copy_from_slice(&h.stamp_ns.to_le_bytes());
    b[56..60].copy_from_slice(&h.durable_back.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..60]), payload);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

impl Writer {
    fn run(writer: Arc<Mutex<Writer>>, rx: Receiver<Op>, io_done: Receiver<IoDone>) {
        let mut batch: Vec<Op> = Vec::new();
        loop {
            // While batches are in flight, their completions are as urgent as new work.
            let busy = !writer.lock().inflight.is_empty();
            let first = if busy {
                crossbeam_channel::select! {
                    recv(rx) -> op => op,
                    recv(io_done) -> done => {
                        let mut w = writer.lock();
                        match done {
                            Ok(done) => w.on_io_done(done),
                            // No I/O thread (it cannot end before the writer): fails
                            // what is in flight.
                            Err(_) => w.drain(),
                        }
                        continue;
                    }
                }
            } else {
                rx.recv()
            };
            let Ok(first) = first else { break };
            let mut bytes = first.payload_len();
            batch.push(first);
            while bytes < BATCH_BYTES_MAX && batch.len() < BATCH_OPS_MAX {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.payload_len();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            let shutdown = batch.iter().any(|op| matches!(op, Op::Shutdown));
            let mut w = writer.lock();
            w.wait_for_memory(bytes);
            w.process(&mut batch);
            if shutdown {
                w.closed = true;
                break;
            }
        }
        let mut w = writer.lock();
        w.closed = true;
        if w.sync_now().is_ok() {
            if let Err(e) = w.cut_at_end() {
                tracing::warn!(logfile = %w.entry.path.display(), "cutting the logfile at its end: {e}");
            }
        }
        // Ends the I/O thread (nothing is in flight after the sync).
        w.io_tx = None;
        {
            let mut s = w.shared.sync.lock();
            s.stop = true;
            w.shared.sync_cv.notify_all();
        }
        let mut wb = w.shared.wb.lock();
        wb.writer_done = true;
        w.shared.wb_cv.notify_all();
    }

    /// Whether a request with `payload` bytes can be processed without blocking.
    fn can_process_now(&self, payload: u64) -> bool {
        if self.closed
            || !self.inflight.is_empty()
            || self.pos - self.file_start_pos >= self.shared.cfg.logfile_max_bytes
        {
            return false;
        }
        let wb = self.shared.wb.lock();
        wb.mem_used + payload + RECORD_MEM_OVERHEAD <= self.shared.cfg.mem_limit_bytes
    }

    /// Backpressure: wait until the not-yet-written-back data leaves room.
    fn wait_for_memory(&mut self, incoming: u64) {
        let limit = self.shared.cfg.mem_limit_bytes;
        let mut wb = self.shared.wb.lock();
        while wb.mem_used > 0
            && wb.mem_used + incoming > limit
            && self.shared.failed.lock().is_none()
        {
            if wb.synced_pos < self.pos {
                // Writeback only takes synced records: sync so that it can make room.
                drop(wb);
                let _ = self.sync_now();
                wb = self.shared.wb.lock();
                if wb.synced_pos < self.pos {
                    // The syncer is publishing the same position: let it finish.
                    self.shared
                        .mem_cv
                        .wait_for(&mut wb, Duration::from_millis(1));
                }
                continue;
            }
            self.shared
                .mem_cv
                .wait_for(&mut wb, Duration::from_millis(100));
        }
    }

    /// fdatasync the current logfile on this thread (rotation, shutdown, memory
    /// pressure); routine syncs are the syncer's.
    fn sync_now(&mut self) -> io::Result<()> {
        self.drain();
        if self.shared.sync.lock().synced_pos >= self.pos {
            return Ok(());
        }
        self.shared.sync_log(&self.file, &self.entry.path, self.pos)
    }

    fn process(&mut self, batch: &mut Vec<Op>) {
        // Batches complete in log order: one handed to the I/O thread waits for room
        // first (that wait may find a failed write and give its positions back, so
        // positions are taken after it); one written on this thread waits for all in
        // flight just before it is written (below).
        let pipelined = self.can_pipeline(batch);
        if pipelined {
            #[cfg(test)]
            if self.inflight.len() >= MAX_INFLIGHT {
                self.shared.room_waits.fetch_add(1, Ordering::Relaxed);
            }
            while self.inflight.len() >= MAX_INFLIGHT {
                self.complete_front();
            }
        }
        if let Some(f) = self.shared.failed.lock().clone() {
            for op in batch.drain(..) {
                reply_err(op, &f);
            }
            return;
        }
        if self.pos - self.file_start_pos >= self.shared.cfg.logfile_max_bytes
            && self.rotate_retry_at.is_none_or(|t| Instant::now() >= t)
        {
            match self.rotate() {
                Ok(_) => self.rotate_retry_at = None,
                // No new logfile for want of space or a descriptor, the old one
                // durable and still current: the log goes on in it (longer than
                // `logfile_max_bytes`), and rotation is tried again in a moment.
                Err(LoggerError::Io { source, .. })
                    if transient(&source) && self.shared.failed.lock().is_none() =>
                {
                    self.shared.no_space();
                    if self.rotate_retry_at.is_none() {
                        tracing::warn!(resource_dir = %self.shared.cfg.dir.display(), "log rotation: {source}; the current logfile goes on, tried again shortly");
                    }
                    // Out of space: at the next batch already (the reserve the
                    // hook gave back must go to a new logfile, not to more of
                    // this one, or nothing can ever be deleted); out of
                    // descriptors: in a moment.
                    let full = matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
                    let after = if full {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(200)
                    };
                    self.rotate_retry_at = Some(Instant::now() + after);
                }
                Err(e) => {
                    // The old logfile may not be durable (or no new one exists): nothing of
                    // this batch is logged, and nothing more will be.
                    let msg = format!("log rotation: {e}");
                    self.shared.fail(msg.clone());
                    for op in batch.drain(..) {
                        reply_err(op, &msg);
                    }
                    return;
                }
            }
        }
        let start_pos = self.pos;
        let start_seq = self.next_seq;
        let stamp_ns = now_ns();
        // How far the log is durable now: recovery tells a hole left by writes in
        // flight at a crash (torn) from damage to durable records (corrupt) by it.
        let synced = self.shared.sync.lock().synced_pos;
        let mut entries = Vec::with_capacity(batch.len());
        for op in batch.iter() {
            let (kind, offset, length, data) = match op {
                Op::Write { offset, data, .. } => {
                    (Kind::Write, *offset, data.len() as u64, Some(data))
                }
                Op::Zero {
                    offset, len, trim, ..
                } => (
                    if *trim { Kind::Trim } else { Kind::WriteZeroes },
                    *offset,
                    *len,
                    None,
                ),
                Op::Rotate { .. } | Op::TakeSpare | Op::Shutdown => continue,
            };
            let h = RecordHeader {
                kind,
                seq: self.next_seq,
                pos: self.pos,
                offset,
                length,
                stamp_ns,
                durable_back: u32::try_from(self.pos.saturating_sub(synced)).unwrap_or(u32::MAX),
            };
            let hdr = encode_header(&h, data.map(|d| &d[..]).unwrap_or(&[]));
            self.next_seq += 1;
            self.pos += h.total_len();
            entries.push(WbEntry {
                seq: h.seq,
                end_pos: self.pos,
                offset,
                len: length,
                kind,
                data: data.cloned(),
                hdr,
            });
        }
        let file_offset = FILE_HEADER_LEN as u64 + (start_pos - self.file_start_pos);
        let len = self.pos - start_pos;
        let direct = (DIRECT_MIN..=DIRECT_MAX).contains(&len) && self.direct.is_some();
        if pipelined && direct {
            let mut buf = self.spare.pop().unwrap_or_default();
            match (
                self.direct.clone(),
                fill_bounce(
                    &mut buf,
                    &entries,
                    file_offset,
                    len,
                    self.padded_end(file_offset + len),
                ),
            ) {
                (Some(direct), Some(layout)) => {
                    let id = self.next_job;
                    self.next_job += 1;
                    let job = IoJob {
                        id,
                        buf,
                        layout,
                        file: self.file.clone(),
                        direct,
                    };
                    let sent = self.io_tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
                    self.inflight.push_back(Inflight {
                        job: id,
                        ops: std::mem::take(batch),
                        entries,
                        start_pos,
                        start_seq,
                        file_offset,
                        len,
                    });
                    #[cfg(test)]
                    self.shared
                        .max_inflight
                        .fetch_max(self.inflight.len() as u64, Ordering::Relaxed);
                    if !sent {
                        // No I/O thread (it cannot end before the writer): fail the batch.
                        self.shared.io_order.finished(id);
                        let front = self.inflight.len() - 1;
                        if let Some(inf) = self.inflight.remove(front) {
                            self.complete(inf, Err(io::Error::other("log I/O thread gone")));
                        }
                    }
                    return;
                }
                _ => self.spare.push(buf),
            }
        }
        // Written here: after every batch in flight. If one of them failed, it gave
        // back the positions this batch took: take them again.
        if !self.inflight.is_empty() {
            let end = self.pos;
            self.drain();
            if self.pos != end {
                return self.process(batch);
            }
        }
        let res = if entries.is_empty() {
            Ok(())
        } else if direct {
            self.write_direct_here(&entries, file_offset, len)
        } else {
            let mut slices = record_slices(&entries);
            let pad = (self.padded_end(file_offset + len) - (file_offset + len)) as usize;
            slices.push(&ZEROS[..pad]);
            let r = retrying(&self.shared, || {
                crate::disk::pwritev_all(&self.file, &slices, file_offset)
            });
            if r.is_ok() && len >= START_WRITEBACK_MIN {
                crate::disk::start_writeback(&self.file, file_offset, len);
            }
            r
        };
        let inf = Inflight {
            job: 0,
            ops: std::mem::take(batch),
            entries,
            start_pos,
            start_seq,
            file_offset,
            len,
        };
        *batch = self.complete(inf, res);
    }

    /// Whether `batch` may be handed to the I/O thread: records only (a rotation or
    /// shutdown waits for everything before it), O_DIRECT-sized, in the current logfile.
    fn can_pipeline(&self, batch: &[Op]) -> bool {
        let len: u64 = batch.iter().map(Op::log_len).sum();
        self.io_tx.is_some()
            && self.direct.is_some()
            && (DIRECT_MIN..=DIRECT_MAX).contains(&len)
            && batch
                .iter()
                .all(|op| matches!(op, Op::Write { .. } | Op::Zero { .. }))
            && self.pos - self.file_start_pos < self.shared.cfg.logfile_max_bytes
    }

    /// A batch is in the logfile (`res` Ok) or not: publish it (writeback queue,
    /// index, written position) and acknowledge, or cut it off and give its positions
    /// back. Returns the emptied op vector for reuse.
    fn complete(&mut self, inf: Inflight, res: io::Result<()>) -> Vec<Op> {
        let Inflight {
            job: _,
            mut ops,
            entries,
            start_pos,
            start_seq,
            file_offset,
            len,
        } = inf;
        if let Err(e) = res {
            // Undo: cut what may have been written, give the positions back. The
            // next batch reuses these positions and record numbers: if the cut
            // fails, a stale record could pass for the next one, so stop instead.
            let msg = format!("log write to {}: {e}", self.entry.path.display());
            tracing::error!("{msg}");
            match self.file.set_len(file_offset) {
                Ok(()) => self.file_cap = file_offset,
                Err(cut) => self
                    .shared
                    .fail(format!("{msg}; cutting the partial batch: {cut}")),
            }
            self.pos = start_pos;
            self.next_seq = start_seq;
            for op in ops.drain(..) {
                match op {
                    Op::Write { reply, .. } | Op::Zero { reply, .. } => {
                        let _ = reply.send(Err(copy_error(&e, &msg)));
                    }
                    other => self.finish_op(other),
                }
            }
            return ops;
        }
        let entries_empty = entries.is_empty();
        if !entries_empty {
            let end = start_pos + len;
            self.shared.logged_pos.store(end, Ordering::Release);
            {
                let mut tail = self.shared.tail.lock();
                let mut at = file_offset;
                for e in &entries {
                    tail.push(self.entry.seq, at, &e.hdr, e.data.as_ref());
                    at += RECORD_HEADER_LEN as u64 + e.data.as_ref().map_or(0, |d| d.len() as u64);
                }
            }
            // The index before any acknowledgment: a read after it must see the data.
            {
                let mut index = self.shared.index.lock();
                for e in &entries {
                    let data = match &e.data {
                        Some(d) => ExtentData::Bytes(d.clone()),
                        None => ExtentData::Zero,
                    };
                    index.insert(e.offset, e.len, e.seq, data);
                }
            }
            let mut wb = self.shared.wb.lock();
            for e in entries {
                wb.mem_used += e.mem();
                wb.queue.push_back(WbItem::Record(e));
            }
            // Writeback only takes synced records: it is woken by the sync that covers these.
        }
        // Acknowledge: plain writes now (they are in the logfile); FUA writes and
        // flushes once a sync covers everything written so far.
        let target = start_pos + len;
        let mut rest = Vec::new();
        let mut wake = false;
        {
            let mut s = self.shared.sync.lock();
            // Batches complete in log order, back to back (counted for the tests).
            #[cfg(test)]
            if !entries_empty && s.written_pos != start_pos {
                self.shared.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            let was_clean = s.written_pos <= s.synced_pos;
            s.written_pos = s.written_pos.max(target);
            for op in ops.drain(..) {
                match op {
                    Op::Write {
                        fua: false, reply, ..
                    }
                    | Op::Zero {
                        fua: false, reply, ..
                    } => self.now.push(reply),
                    Op::Write { reply, .. } | Op::Zero { reply, .. } => {
                        if s.synced_pos >= target {
                            self.now.push(reply);
                        } else {
                            s.waiters.push_back((target, reply));
                            wake = true;
                        }
                    }
                    other => rest.push(other),
                }
            }
            let unsynced = s.written_pos - s.synced_pos;
            // The syncer sleeps while all is synced: tell it that the idle clock runs.
            wake |= unsynced > 0 && (was_clean || unsynced >= self.shared.cfg.sync_batch_bytes);
        }
        if wake {
            self.shared.sync_cv.notify_one();
        }
        for r in self.now.drain(..) {
            let _ = r.send(Ok(()));
        }
        for op in rest {
            self.finish_op(op);
        }
        ops
    }

    /// The answer for job `id`: one that came early, or the next ones from the I/O
    /// threads until it comes.
    fn wait_done(&mut self, id: u64) -> IoDone {
        loop {
            if let Some(d) = self.done_early.remove(&id) {
                return d;
            }
            match self.io_done.recv() {
                Ok(d) => {
                    self.done_early.insert(d.id, d);
                }
                Err(_) => {
                    return IoDone {
                        id,
                        buf: Vec::new(),
                        res: Err(io::Error::other("log I/O thread gone")),
                        refused: false,
                    }
                }
            }
        }
    }

    /// Wait for the oldest batch in flight and complete it.
    fn complete_front(&mut self) {
        let Some(id) = self.inflight.front().map(|f| f.job) else {
            return;
        };
        let done = self.wait_done(id);
        self.complete_io(done);
    }

    /// Complete every batch in flight.
    fn drain(&mut self) {
        while !self.inflight.is_empty() {
            self.complete_front();
        }
    }

    /// An I/O thread finished a job: complete the batches in flight, oldest first,
    /// as far as their jobs are finished.
    fn on_io_done(&mut self, done: IoDone) {
        self.done_early.insert(done.id, done);
        while let Some(id) = self.inflight.front().map(|f| f.job) {
            let Some(d) = self.done_early.remove(&id) else {
                break;
            };
            self.complete_io(d);
        }
    }

    fn keep_buffer(&mut self, buf: Vec<u8>) {
        if buf.capacity() > 0 && self.spare.len() < MAX_INFLIGHT {
            self.spare.push(buf);
        }
    }

    /// The oldest batch in flight was written (or not): `done` is its job's answer.
    fn complete_io(&mut self, done: IoDone) {
        let Some(front) = self.inflight.pop_front() else {
            return;
        };
        if done.refused {
            // The device or file system wants something else: page cache from now on.
            self.direct = None;
        }
        self.keep_buffer(done.buf);
        let Err(e) = done.res else {
            self.complete(front, Ok(()));
            return;
        };
        // Later batches are cut off with this one (they may be written already, but
        // the log must not have a hole): wait for them, then give all positions back.
        let mut later = Vec::new();
        while let Some(inf) = self.inflight.pop_front() {
            let d = self.wait_done(inf.job);
            self.keep_buffer(d.buf);
            later.push(inf);
        }
        let msg = format!("log write of an earlier batch failed: {e}");
        let code = e.raw_os_error();
        self.complete(front, Err(e));
        for inf in later {
            for op in inf.ops {
                match op {
                    Op::Write { reply, .. } | Op::Zero { reply, .. } => {
                        // The same errno (ENOSPC stays ENOSPC for the client).
                        let err = match code {
                            Some(c) => io::Error::from_raw_os_error(c),
                            None => io::Error::other(msg.clone()),
                        };
                        let _ = reply.send(Err(err));
                    }
                    other => self.finish_op(other),
                }
            }
        }
    }

    /// Write the records of a large batch on this thread (see [`write_layout`]).
    fn write_direct_here(&mut self, entries: &[WbEntry], start: u64, len: u64) -> io::Result<()> {
        let mut buf = self.spare.pop().unwrap_or_default();
        let res = match (
            self.direct.clone(),
            fill_bounce(&mut buf, entries, start, len, self.padded_end(start + len)),
        ) {
            (Some(direct), Some(layout)) => {
                let mut refused = false;
                let res = retrying(&self.shared, || {
                    let (r, rf) =
                        write_layout(&self.shared, &self.file, &direct, &buf, &layout, || {});
                    refused |= rf;
                    r
                });
                if refused {
                    self.direct = None;
                }
                res
            }
            _ => retrying(&self.shared, || {
                crate::disk::pwritev_all(&self.file, &record_slices(entries), start)
            }),
        };
        self.spare.push(buf);
        res
    }

    fn finish_op(&mut self, op: Op) {
        match op {
            Op::Write { reply, .. } | Op::Zero { reply, .. } => {
                let _ = reply.send(Ok(()));
            }
            Op::Rotate { reply } => {
                let res = if self.pos == self.file_start_pos {
                    Ok(None)
                } else {
                    self.rotate()
                        .map(Some)
                        .map_err(|e| io::Error::other(e.to_string()))
                };
                let _ = reply.send(res);
            }
            Op::TakeSpare => {
                // Errors before the rename leave the empty logfile in place (handled
                // inside); one after it (the directory sync, opening the new file)
                // leaves the name uncertain: stop, as for a failed log sync.
                if let Err(e) = self.take_spare() {
                    self.shared
                        .fail(format!("swapping the empty logfile for a spare: {e}"));
                }
            }
            Op::Shutdown => {}
        }
    }

    /// An empty current logfile that is new (it would grow by appends) is replaced
    /// by a spare with the same name and header, so that the log overwrites.
    fn take_spare(&mut self) -> Result<(), LoggerError> {
        if self.pos != self.file_start_pos || self.file_cap > FILE_HEADER_LEN as u64 {
            return Ok(());
        }
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let path = self.entry.path.clone();
        // The same header, byte for byte: a fetcher may have copied it already.
        let mut h = [0u8; FILE_HEADER_LEN];
        self.file
            .read_exact_at(&mut h, 0)
            .map_err(|e| LoggerError::io(&path, e))?;
        let Some((file, cap)) =
            recovery::logfile_from_spare(&cfg.dir, &path, &h, self.file_start_pos, true)?
        else {
            return Ok(());
        };
        self.switch_file(file, cap, path)
    }

    /// Log into `file` (at `path`, `cap` bytes long) from now on.
    fn switch_file(&mut self, file: File, cap: u64, path: PathBuf) -> Result<(), LoggerError> {
        let direct = self
            .direct
            .is_some()
            .then(|| open_direct(&path))
            .flatten()
            .map(Arc::new);
        let files = open_for_sync(&path).map_err(|e| LoggerError::io(&path, e))?;
        {
            let mut s = self.shared.sync.lock();
            s.files = files;
            s.path = path;
        }
        self.file = Arc::new(file);
        self.file_cap = cap;
        self.direct = direct;
        Ok(())
    }

    /// File offset of the end of the log in the current logfile.
    fn end_offset(&self) -> u64 {
        FILE_HEADER_LEN as u64 + (self.pos - self.file_start_pos)
    }

    /// A finished logfile holds exactly its records: cut a recycled one at the end
    /// of its log (durably, before it counts as finished), so that it is an exact
    /// copy for readers and a spare whose old records all lie at one place.
    fn cut_at_end(&mut self) -> io::Result<()> {
        let end = self.end_offset();
        if self.file_cap > end {
            self.file.set_len(end)?;
            self.file.sync_data()?;
            self.file_cap = end;
        }
        Ok(())
    }

    /// Where a buffered write ending at file offset `end` should end: at the next
    /// page boundary inside a recycled logfile (zeros after the records), so that
    /// the kernel never reads a partly overwritten page of the old content first.
    fn padded_end(&self, end: u64) -> u64 {
        if end >= self.file_cap {
            end
        } else {
            end.next_multiple_of(DIRECT_ALIGN).min(self.file_cap)
        }
    }

    fn rotate(&mut self) -> Result<String, LoggerError> {
        let t0 = Instant::now();
        // Everything in the old file must be durable before the syncer moves on to the new one.
        self.sync_now()
            .map_err(|e| LoggerError::io(&self.entry.path, e))?;
        if let Err(e) = self.cut_at_end() {
            // Its fdatasync may have failed: nothing may be acknowledged after it.
            self.shared.fail(format!(
                "cutting {} at its end: {e}",
                self.entry.path.display()
            ));
            return Err(LoggerError::io(&self.entry.path, e));
        }
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let seq = self.entry.seq + 1;
        // The new logfile names this one, at its end, as its parent (or this
        // one's parent, when it holds no records).
        let mut old_header = [0u8; FILE_HEADER_LEN];
        self.file
            .read_exact_at(&mut old_header, 0)
            .map_err(|e| LoggerError::io(&self.entry.path, e))?;
        let (file, path, file_cap) = new_logfile(
            &cfg.dir,
            &cfg.node,
            seq,
            self.pos,
            self.next_seq,
            cfg.resource_id,
            mars_logfmt::next_link(&old_header, self.pos),
        )?;
        if let Err(e) = self.switch_file(file, file_cap, path.clone()) {
            // Not left behind: a retry creates it anew (it would find it and
            // fail), and recovery would take it for the current logfile.
            let removed =
                std::fs::remove_file(&path).and_then(|()| crate::crashsafe::sync_dir(&cfg.dir));
            if let Err(r) = removed {
                self.shared.fail(format!(
                    "removing the new logfile {} after: {e}: {r}",
                    path.display()
                ));
            }
            return Err(e);
        }
        let new_entry = LogfileEntry {
            seq,
            node: cfg.node.clone(),
            path,
        };
        let old = std::mem::replace(&mut self.entry, new_entry);
        {
            // Writeback finishes the digest when it gets here, after the file's last record.
            let mut wb = self.shared.wb.lock();
            wb.queue.push_back(WbItem::EndOfFile(Box::new(FinishedLog {
                entry: old,
                start_pos: self.file_start_pos,
                end_pos: self.pos,
                digest: None,
            })));
            self.shared.wb_cv.notify_all();
        }
        self.file_start_pos = self.pos;
        let name = self.entry.name();
        *self.shared.current_logfile.lock() = name.clone();
        let recycled = self.file_cap > FILE_HEADER_LEN as u64;
        tracing::info!(logfile = %name, pos = self.pos, recycled, took = ?t0.elapsed(), "log rotated");
        Ok(name)
    }
}

/// The syncer: fdatasync of the logfile whenever someone waits for durability (FUA
/// writes, FLUSH), when `sync_batch_bytes` are unsynced, or `idle_sync` after data
/// became unsynced. One sync covers everything written before it started (group
/// commit), and only then does `synced_pos` (and with it writeback) move on.
///
/// Several syncer threads (`SYNCERS`): while one waits for its fdatasync, another
/// starts the next one for the waiters the first does not cover, so a client that
/// flushes after every write does not wait for a sync that started before its write
/// plus a whole second one from scratch.
fn sync_loop(shared: Arc<Shared>, me: usize) {
    let mut deadline: Option<Instant> = None;
    let mut s = shared.sync.lock();
    loop {
        if shared.failed.lock().is_some() {
            // Nothing may be reported durable any more.
            if !s.waiters.is_empty() {
                let waiters: Vec<_> = s.waiters.drain(..).collect();
                drop(s);
                for (_, r) in waiters {
                    let _ = r.send(Err(io::Error::other("logger failed")));
                }
                s = shared.sync.lock();
                continue;
            }
            if s.stop {
                return;
            }
            shared.sync_cv.wait(&mut s);
            continue;
        }
        let unsynced = s.written_pos.saturating_sub(s.synced_pos);
        if unsynced == 0 {
            deadline = None;
            if s.stop {
                return;
            }
            shared.sync_cv.wait(&mut s);
            continue;
        }
        // What the syncs running now do not cover.
        let covered = s.synced_pos.max(s.syncing_to);
        if s.written_pos <= covered {
            // The other syncer covers it all: wait for its result (or new work).
            shared.sync_cv.wait(&mut s);
            continue;
        }
        let waiting = s.waiters.back().is_some_and(|(t, _)| *t > covered);
        let urgent = waiting || s.stop || s.written_pos - covered >= shared.cfg.sync_batch_bytes;
        if !urgent {
            let d = *deadline.get_or_insert_with(|| Instant::now() + shared.cfg.idle_sync);
            if Instant::now() < d {
                shared.sync_cv.wait_until(&mut s, d);
                continue;
            }
        }
        deadline = None;
        let (file, path, target) = (s.files[me].clone(), s.path.clone(), s.written_pos);
        s.syncing_to = s.syncing_to.max(target);
        drop(s);
        // Errors are handled inside (the logger fails, waiters get the error).
        let failed = shared.sync_log(&file, &path, target).is_err();
        s = shared.sync.lock();
        // The waiters this sync covers have their answers (`advance_synced`); work it did
        // not cover, this thread finds at the top of the loop. The other syncers need
        // this result only to stop: after a failure (they answer nothing more), and at
        // shutdown (one waiting for this sync to cover everything must see that it
        // did, or it would wait forever). Waking them after every sync cost three
        // futex wake-ups per FLUSH and a round of their lock.
        if failed || s.stop {
            shared.sync_cv.notify_all();
        }
    }
}

/// Syncer threads. Measured with 4 KiB random writes and about one flush per write
/// (bench/run.sh's row, recycled logfile): 3 syncers 43-46k IOPS against 38-39k
/// with 2; 4 were no better than 3.
const SYNCERS: usize = 3;

/// One open file of the logfile per syncer, apart from the writer's own (which the
/// writer syncs at rotation and shutdown). Opened before anything is written to it,
/// so that each learns of any writeback error.
fn open_for_sync(path: &Path) -> io::Result<Vec<Arc<File>>> {
    (0..SYNCERS)
        .map(|_| OpenOptions::new().write(true).open(path).map(Arc::new))
        .collect()
}

fn reply_err(op: Op, msg: &str) {
    let e = || Err(io::Error::other(msg.to_string()));
    match op {
        Op::Write { reply, .. } | Op::Zero { reply, .. } => {
            let _ = reply.send(e());
        }
        Op::Rotate { reply } => {
            let _ = reply.send(Err(io::Error::other(msg.to_string())));
        }
        Op::TakeSpare | Op::Shutdown => {}
    }
}

const WRITEBACK_BATCH_BYTES: u64 = 32 << 20;

/// Applies synced records to the disk in log order, and digests them for the
/// versions of their logfiles. Never blocks on disk syncs: those, and writing the
/// versions, are the persister's work.
fn writeback_loop(shared: Arc<Shared>) {
    let mut digest = VersionBuilder::new();
    loop {
        let (batch, eof, done) = {
            let mut wb = shared.wb.lock();
            let mut hold;
            loop {
                hold = wb.hold_limit();
                let ready = wb
                    .queue
                    .front()
                    .is_some_and(|e| e.end_pos() <= wb.synced_pos && e.end_pos() <= hold);
                // Once the writer is done (its last sync behind it), records still
                // unsynced never will be (the logger failed): stop at them.
                if ready || (wb.writer_done && wb.pin.is_none()) {
                    break;
                }
                match wb.hold {
                    // Held: look again when the lease runs out (a pin's end
                    // notifies).
                    Some((_, until)) if wb.pin.is_none() => {
                        let wait = until.saturating_duration_since(Instant::now());
                        shared
                            .wb_cv
                            .wait_for(&mut wb, wait.max(Duration::from_millis(1)));
                    }
                    _ => shared.wb_cv.wait(&mut wb),
                }
            }
            let mut batch = Vec::new();
            let mut eof = None;
            let mut bytes = 0;
            while let Some(item) = wb.queue.front() {
                if item.end_pos() > wb.synced_pos
                    || item.end_pos() > hold
                    || bytes >= WRITEBACK_BATCH_BYTES
                {
                    break;
                }
                match wb.queue.pop_front() {
                    Some(WbItem::Record(e)) => {
                        bytes += e.len;
                        batch.push(e);
                    }
                    Some(WbItem::EndOfFile(f)) => {
                        // The end of a logfile closes the batch: its digest is complete after it.
                        eof = Some(f);
                        break;
                    }
                    None => break,
                }
            }
            let stuck = wb
                .queue
                .front()
                .is_some_and(|e| e.end_pos() > wb.synced_pos);
            wb.applying = !batch.is_empty();
            (batch, eof, wb.writer_done && (wb.queue.is_empty() || stuck))
        };
        if !batch.is_empty() {
            // A sparse disk file on a full filesystem: tried again (the same
            // bytes at the same places) while space is freed.
            if let Err(e) = retrying_for(&shared, BACKGROUND_RETRY_FOR, || {
                apply_batch(&shared.disk, &shared.csum, &batch)
            }) {
                shared.fail(format!("writeback to {}: {e}", shared.cfg.disk.display()));
                // Keep the records in memory (reads stay correct) and retry later;
                // at shutdown, give up: they are in the log, and the next open
                // applies them again (the applied position stays before them).
                let mut wb = shared.wb.lock();
                wb.applying = false;
                shared.hold_cv.notify_all();
                if wb.writer_done {
                    wb.writeback_done = true;
                    shared.persist_cv.notify_all();
                    return;
                }
                if let Some(f) = eof {
                    wb.queue.push_front(WbItem::EndOfFile(f));
                }
                for e in batch.into_iter().rev() {
                    wb.queue.push_front(WbItem::Record(e));
                }
                drop(wb);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            for e in &batch {
                digest.add_record(&e.hdr);
            }
            let freed: u64 = batch.iter().map(|e| e.mem()).sum();
            {
                let mut index = shared.index.lock();
                for e in &batch {
                    index.remove_written(e.offset, e.len, e.seq);
                }
            }
            if let Some(last) = batch.last() {
                shared.applied_pos.store(last.end_pos, Ordering::Release);
            }
            let mut wb = shared.wb.lock();
            wb.mem_used -= freed;
            wb.applying = false;
            shared.mem_cv.notify_all();
            shared.persist_cv.notify_all();
            shared.hold_cv.notify_all();
        }
        if let Some(mut f) = eof {
            f.digest = Some(std::mem::take(&mut digest));
            let mut wb = shared.wb.lock();
            wb.finished.push_back(f);
            shared.persist_cv.notify_all();
        }
        if done {
            let mut wb = shared.wb.lock();
            wb.writeback_done = true;
            shared.persist_cv.notify_all();
            return;
        }
    }
}

/// Syncs the disk and persists the applied position (at most once per
/// `persist_interval`, and at the end), and writes the versions of finished
/// logfiles once writeback has applied them.
fn persist_loop(shared: Arc<Shared>, mut last_version: Option<Version>) {
    let interval = shared.cfg.persist_interval;
    // Writeback wakes this thread after every batch (finished logfiles get their
    // versions right away), but the disk is synced only once per interval: each
    // sync is a device flush, and back-to-back ones slow down the log's own syncs,
    // on which FUA writes and FLUSHes wait.
    let mut next_disk_sync = Instant::now();
    loop {
        let done = {
            let mut wb = shared.wb.lock();
            if !wb.writeback_done {
                // Checked under the lock writeback notifies under: work that arrived
                // since the last round is not slept through (no lost wakeup).
                let applied = shared.applied_pos.load(Ordering::Acquire);
                let versions = wb.finished.front().is_some_and(|f| f.end_pos <= applied);
                let unpersisted = applied > shared.persisted_pos.load(Ordering::Acquire);
                let now = Instant::now();
                let wait = if versions {
                    None
                } else if next_disk_sync > now {
                    Some(next_disk_sync - now)
                } else if unpersisted {
                    None
                } else {
                    Some(interval)
                };
                if let Some(wait) = wait {
                    shared.persist_cv.wait_for(&mut wb, wait);
                }
            }
            wb.writeback_done
        };
        let applied = shared.applied_pos.load(Ordering::Acquire);
        loop {
            let next = {
                let mut wb = shared.wb.lock();
                match wb.finished.front() {
                    Some(f) if f.end_pos <= applied => wb.finished.pop_front(),
                    _ => None,
                }
            };
            let Some(mut f) = next else { break };
            let cfg = &shared.cfg;
            let prev = last_version.as_ref();
            let mut v = match f.digest.take() {
                Some(d) => store_version(
                    &cfg.dir,
                    &cfg.node,
                    &f.entry,
                    f.start_pos,
                    f.end_pos,
                    prev,
                    d,
                ),
                None => finish_version(&cfg.dir, &cfg.node, &f.entry, f.start_pos, f.end_pos, prev),
            };
            // No space or descriptor for the version file: ask for space and
            // try again (from the logfile itself) rather than fail for good.
            let since = Instant::now();
            while let Err(LoggerError::Io { source, .. }) = &v {
                if !transient(source) || since.elapsed() >= BACKGROUND_RETRY_FOR {
                    break;
                }
                shared.no_space();
                std::thread::sleep(Duration::from_millis(100));
                v = finish_version(&cfg.dir, &cfg.node, &f.entry, f.start_pos, f.end_pos, prev);
            }
            match v {
                Ok(v) => last_version = Some(v),
                Err(e) => shared.fail(format!("version of {}: {e}", f.entry.name())),
            }
        }
        if applied > shared.persisted_pos.load(Ordering::Acquire)
            && (done || Instant::now() >= next_disk_sync)
        {
            next_disk_sync = Instant::now() + interval;
            // Errors fail the logger inside.
            let _ = shared.persist();
        }
        if done {
            return;
        }
    }
}

/// Whether `pieces` (clipped and in order, from [`Index::lookup`]) cover all of
/// `[start, end)`.
fn covers(pieces: &[(u64, crate::index::Extent)], start: u64, end: u64) -> bool {
    let first = pieces.partition_point(|(_, e)| e.end <= start);
    let mut at = start;
    for (off, e) in &pieces[first..] {
        if *off > at {
            return false;
        }
        at = at.max(e.end);
        if at >= end {
            return true;
        }
    }
    false
}

/// Apply records in log order; runs of back-to-back writes go out as one `pwritev`.
/// The block checksums follow each write (computed from the records' buffers,
/// still in memory; a partial block read back from the page cache).
fn apply_batch(disk: &Disk, csum: &crate::csum::Csum, batch: &[WbEntry]) -> io::Result<()> {
    // Reads that race the batch look again instead of calling a block bad.
    let _writing = csum.writing();
    let mut read = |b: &mut [u8], o: u64| disk.read_exact_at(b, o);
    let mut i = 0;
    while i < batch.len() {
        let e = &batch[i];
        match (&e.kind, &e.data) {
            (Kind::Write, Some(d)) => {
                let mut bufs: Vec<&[u8]> = vec![&d[..]];
                let mut end = e.offset + e.len;
                let mut j = i + 1;
                while j < batch.len()
                    && batch[j].kind == Kind::Write
                    && batch[j].offset == end
                    && bufs.len() < 1024
                {
                    if let Some(d) = &batch[j].data {
                        bufs.push(&d[..]);
                    }
                    end += batch[j].len;
                    j += 1;
                }
                // No sync_file_range hint here (there was one for runs of 1 MiB and
                // more): it made every byte go to the device right away, twice the
                // device traffic of the log alone, where the page cache would absorb
                // overwrites until the persister's sync.
                csum.before_write(e.offset, end - e.offset, &mut read)?;
                disk.write_vectored_at(&bufs, e.offset)?;
                csum.written(e.offset, &bufs, &mut read)?;
                i = j;
            }
            (kind, _) => {
                csum.before_write(e.offset, e.len, &mut read)?;
                disk.zero_range(e.offset, e.len, *kind == Kind::Trim)?;
                csum.zeroed(e.offset, e.len, &mut read)?;
                i += 1;
            }
        }
    }
    Ok(())
}

mod freeze;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn encode_header_matches_logfmt_encoding() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..300 {
            let kind = [Kind::Write, Kind::Trim, Kind::WriteZeroes][i % 3];
            let len = (next() % 9000) as usize;
            let payload: Vec<u8> = if kind == Kind::Write {
                (0..len).map(|_| next() as u8).collect()
            } else {
                Vec::new()
            };
            let h = RecordHeader {
                kind,
                seq: next(),
                pos: next(),
                offset: next() >> 4,
                length: if kind == Kind::Write {
                    len as u64
                } else {
                    next() >> 40
                },
                stamp_ns: next(),
                durable_back: next() as u32,
            };
            let mut want = Vec::new();
            h.encode_into(&payload, &mut want);
            let got = encode_header(&h, &payload);
            assert_eq!(&want[..RECORD_HEADER_LEN], &got[..], "record {i}");
            assert_eq!(&want[RECORD_HEADER_LEN..], &payload[..]);
            let (back, payload_back) = RecordHeader::decode_record(&want).unwrap();
            assert_eq!(back, h);
            assert_eq!(payload_back, &payload[..]);
        }
    }

    const SIZE: u64 = 4 << 20;

    fn setup(dir: &Path) -> Config {
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
        let logdir = dir.join("res");
        std::fs::create_dir_all(&logdir).unwrap();
        Config::new("alpha", &logdir, &disk, SIZE, 42)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Positions read in an order that makes `applied <= synced <= logged` a valid check
    /// even while they move (all three only grow).
    fn positions(l: &Logger) -> (u64, u64, u64) {
        let applied = l.shared.applied_pos.load(Ordering::Acquire);
        let synced = l.shared.wb.lock().synced_pos;
        let logged = l.shared.logged_pos.load(Ordering::Acquire);
        (applied, synced, logged)
    }

    fn records_in_current_logfile(l: &Logger) -> usize {
        let path = l.shared.sync.lock().path.clone();
        let bytes = std::fs::read(path).unwrap();
        let report = mars_logfmt::scan_logfile(&bytes);
        assert!(report.damage.is_none(), "{:?}", report.damage);
        report.records.len()
    }

    /// The syncer's contract: a plain write is acknowledged once it is in the logfile,
    /// without waiting for a sync; writeback never touches the disk for a record that
    /// is not synced; FUA writes and flushes are acknowledged only with the log synced
    /// past them; the idle timeout and the batch size start a sync on their own.
    #[test]
    fn syncer_acknowledgment_and_writeback_rules() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.idle_sync = Duration::from_secs(3600);
        cfg.sync_batch_bytes = u64::MAX;
        let rt = rt();
        let logger = Logger::open(cfg.clone()).unwrap();
        let (a0, s0, l0) = positions(&logger);
        assert_eq!((a0, s0), (l0, l0));
        rt.block_on(async {
            for i in 0..10u64 {
                logger
                    .write(i * 4096, Bytes::from(vec![7u8; 4096]), false)
                    .await
                    .unwrap();
            }
        });
        // Acknowledged: in the logfile, readable, but not synced, hence not written back.
        assert_eq!(records_in_current_logfile(&logger), 10);
        assert!(logger.read(0, 4096).unwrap().iter().all(|&b| b == 7));
        // An observation window, not a synchronisation: nothing may sync or write
        // back during it (no sync is due: idle_sync is an hour, the batch unbounded).
        std::thread::sleep(Duration::from_millis(200));
        let (a, s, l) = positions(&logger);
        assert!(l > l0);
        assert_eq!(s, s0, "nothing asked for a sync");
        assert_eq!(a, a0, "writeback must not apply unsynced records");
        assert!(
            std::fs::read(&cfg.disk).unwrap()[..40960]
                .iter()
                .all(|&b| b == 0),
            "disk untouched"
        );
        // A flush covers everything acknowledged before it.
        rt.block_on(logger.flush()).unwrap();
        let (_, s, l2) = positions(&logger);
        assert!(s >= l2 && l2 == l, "flush acknowledged before the sync");
        wait_until("writeback after the sync", || positions(&logger).0 == l);
        // FUA: acknowledged only once synced past it.
        rt.block_on(logger.write(0, Bytes::from(vec![9u8; 512]), true))
            .unwrap();
        let (_, s, l3) = positions(&logger);
        assert!(l3 > l && s >= l3, "FUA write acknowledged before the sync");
        // Trim and write-zeroes with FUA too.
        rt.block_on(logger.zero(8192, 4096, true, true)).unwrap();
        let (_, s, l4) = positions(&logger);
        assert!(l4 > l3 && s >= l4);
        // A flush with nothing new to sync is acknowledged right away.
        rt.block_on(logger.flush()).unwrap();
        logger.close();
        drop(logger);

        // The idle timeout syncs on its own.
        cfg.idle_sync = Duration::from_millis(20);
        let logger = Logger::open(cfg.clone()).unwrap();
        rt.block_on(logger.write(0, Bytes::from(vec![1u8; 4096]), false))
            .unwrap();
        let l = positions(&logger).2;
        wait_until("idle sync and writeback", || {
            let (a, s, _) = positions(&logger);
            s >= l && a >= l
        });
        logger.close();
        drop(logger);

        // So does a full batch.
        cfg.idle_sync = Duration::from_secs(3600);
        cfg.sync_batch_bytes = 64 << 10;
        let logger = Logger::open(cfg.clone()).unwrap();
        rt.block_on(async {
            for i in 0..32u64 {
                logger
                    .write(i * 4096, Bytes::from(vec![2u8; 4096]), false)
                    .await
                    .unwrap();
            }
        });
        let l = positions(&logger).2;
        // The last writes may stay below the batch size: everything up to there is synced.
        wait_until("batch sync", || {
            positions(&logger).1 + (64 << 10) + 4160 >= l
        });
        assert!(positions(&logger).1 > l0);
        logger.close();
        let (a, s, l2) = positions(&logger);
        assert_eq!((a, s), (l2, l2), "close syncs and writes back everything");
    }

    /// Requests submitted between `plug` and `unplug` are logged when unplugged, as
    /// few batches, in the order they were submitted: overlapping writes end with the
    /// last one's data, a large write in the middle goes after the small ones before
    /// it (it empties the plug), a FUA write is acknowledged only once synced, and
    /// more than `PLUG_MAX` of them make several batches without reordering.
    #[test]
    fn plugged_requests_are_logged_at_unplug_in_submit_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.idle_sync = Duration::from_secs(3600);
        cfg.sync_batch_bytes = u64::MAX;
        let rt = rt();
        let logger = Arc::new(Logger::open(cfg.clone()).unwrap());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut futs: Vec<BoxFuture> = Vec::new();
        let mut want: Vec<(u64, u64)> = Vec::new(); // (disk offset, length) in log order
        let write = |off: u64, len: usize, byte: u8, fua: bool| -> BoxFuture {
            let l = logger.clone();
            Box::pin(async move { l.write(off, Bytes::from(vec![byte; len]), fua).await })
        };
        logger.plug();
        for (i, (off, byte)) in [(0u64, 1u8), (4096, 2), (0, 3), (2048, 4)]
            .iter()
            .enumerate()
        {
            futs.push(write(*off, 4096, *byte, i == 1));
            want.push((*off, 4096));
        }
        futs.push(Box::pin({
            let l = logger.clone();
            async move { l.zero(65536, 8192, false, true).await }
        }));
        want.push((65536, 8192));
        for f in &mut futs {
            assert!(
                f.as_mut().poll(&mut cx).is_pending(),
                "acknowledged while plugged"
            );
        }
        assert_eq!(
            records_in_current_logfile(&logger),
            0,
            "logged while plugged"
        );
        // Large: logged after the five before it, before the ones after it.
        let mut big = write(1 << 20, INLINE_MAX as usize + 4096, 5, false);
        want.push((1 << 20, INLINE_MAX + 4096));
        let _ = big.as_mut().poll(&mut cx);
        rt.block_on(big).unwrap();
        assert_eq!(records_in_current_logfile(&logger), 6);
        // More than a plug holds: several batches, still in order.
        let n = (PLUG_MAX / 4096) as usize * 2 + 3;
        for i in 0..n {
            let off = (2 << 20) + (i as u64 % 64) * 4096;
            let mut f = write(off, 4096, 10 + (i % 200) as u8, false);
            want.push((off, 4096));
            let _ = f.as_mut().poll(&mut cx);
            futs.push(f);
        }
        logger.unplug();
        rt.block_on(async {
            for f in futs {
                f.await.unwrap();
            }
        });
        // The FUA write's acknowledgement says the log is synced past it.
        let synced = logger.shared.sync.lock().synced_pos;
        assert!(synced > 0, "FUA write acknowledged without a sync");
        let path = logger.shared.sync.lock().path.clone();
        let report = mars_logfmt::scan_logfile(&std::fs::read(path).unwrap());
        assert!(report.damage.is_none(), "{:?}", report.damage);
        let got: Vec<(u64, u64)> = report
            .records
            .iter()
            .map(|r| (r.header.offset, r.header.length))
            .collect();
        assert_eq!(got, want, "log order is submit order");
        // Overlapping writes: the last submitted wins where they overlap.
        let head = logger.read(0, 8192).unwrap();
        assert!(head[..2048].iter().all(|&b| b == 3));
        assert!(head[2048..6144].iter().all(|&b| b == 4));
        assert!(head[6144..].iter().all(|&b| b == 2));
        for i in n - 64..n {
            let off = (2 << 20) + (i as u64 % 64) * 4096;
            let byte = 10 + (i % 200) as u8;
            assert!(
                logger.read(off, 4096).unwrap().iter().all(|&b| b == byte),
                "write {i}"
            );
        }
        // Unplugged: a request is logged right away again.
        rt.block_on(logger.write(0, Bytes::from(vec![7u8; 512]), false))
            .unwrap();
        assert_eq!(records_in_current_logfile(&logger), want.len() + 1);
        logger.close();
    }

    type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send>>;

    /// A logger that failed with records logged but not synced must still close
    /// (writeback used to wait forever for a sync that could no longer come), must
    /// not report them durable, and must leave them to recovery.
    #[test]
    fn a_failed_logger_closes_and_acknowledges_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.idle_sync = Duration::from_secs(3600);
        cfg.sync_batch_bytes = u64::MAX;
        let rt = rt();
        let logger = Logger::open(cfg.clone()).unwrap();
        rt.block_on(async {
            for i in 0..8u64 {
                logger
                    .write(i * 4096, Bytes::from(vec![5u8; 4096]), false)
                    .await
                    .unwrap();
            }
        });
        let (_, s0, l) = positions(&logger);
        assert!(s0 < l);
        logger
            .shared
            .fail("test: as after a failed fdatasync".into());
        assert!(rt.block_on(logger.flush()).is_err(), "flush after failure");
        assert!(rt
            .block_on(logger.write(0, Bytes::from(vec![1u8; 512]), false))
            .is_err());
        let t0 = Instant::now();
        logger.close();
        assert!(t0.elapsed() < Duration::from_secs(10), "close hung");
        let st = logger.status();
        assert_eq!(st.synced_pos, s0, "nothing synced after the failure");
        assert_eq!(st.applied_pos, s0, "nothing unsynced written back");
        drop(logger);
        // The records are in the logfile: recovery applies them.
        let logger = Logger::open(cfg.clone()).unwrap();
        assert!(logger.read(0, 8 * 4096).unwrap().iter().all(|&b| b == 5));
    }

    /// Many concurrent writers with FUA writes, flushes and rotations: the positions
    /// always satisfy `applied <= synced <= logged`, every durable acknowledgment is
    /// covered by `synced`, and the data comes out right.
    #[test]
    fn syncer_invariants_under_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.logfile_max_bytes = 256 << 10;
        cfg.mem_limit_bytes = 512 << 10;
        cfg.sync_batch_bytes = 128 << 10;
        cfg.idle_sync = Duration::from_millis(2);
        let logger = Arc::new(Logger::open(cfg.clone()).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (logger, stop) = (logger.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (a, s, l) = positions(&logger);
                    assert!(a <= s && s <= l, "applied {a} synced {s} logged {l}");
                    n += 1;
                }
                n
            })
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..6u64 {
                let logger = logger.clone();
                tasks.push(tokio::spawn(async move {
                    // Each task owns its own 256 KiB area, so its last write is what must be read.
                    let base = t * (256 << 10);
                    for i in 0..300u64 {
                        let off = base + (i * 4096) % (256 << 10);
                        let fill = (t * 37 + i) as u8;
                        let before = logger.shared.logged_pos.load(Ordering::Acquire);
                        match i % 5 {
                            0 => {
                                logger
                                    .write(off, Bytes::from(vec![fill; 4096]), true)
                                    .await
                                    .unwrap();
                                let synced = logger.shared.sync.lock().synced_pos;
                                assert!(synced > before, "FUA acknowledged before its sync");
                            }
                            1 => {
                                logger
                                    .write(off, Bytes::from(vec![fill; 4096]), false)
                                    .await
                                    .unwrap();
                                // What the flush must cover: everything acknowledged, so at
                                // least up to `written_pos` now (`logged_pos` may already count
                                // records of other tasks that are not acknowledged yet).
                                let after = logger.shared.sync.lock().written_pos;
                                logger.flush().await.unwrap();
                                let synced = logger.shared.sync.lock().synced_pos;
                                assert!(synced >= after, "flush acknowledged before its sync");
                            }
                            _ => {
                                logger
                                    .write(off, Bytes::from(vec![fill; 4096]), false)
                                    .await
                                    .unwrap();
                            }
                        }
                        let got = logger.read(off, 4096).unwrap();
                        assert!(got.iter().all(|&b| b == fill), "read back task {t} op {i}");
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        stop.store(true, Ordering::Relaxed);
        assert!(sampler.join().unwrap() > 0);
        assert!(list_logfiles_len(&cfg.dir) > 2, "rotation happened");
        logger.close();
        let st = logger.status();
        assert_eq!(st.applied_pos, st.logged_pos);
        assert_eq!(st.synced_pos, st.logged_pos);
        assert!(st.failed.is_none());
    }

    /// Versions come from a digest that writeback feeds from memory: they must be
    /// exactly what hashing the logfiles gives (other nodes recompute them from their
    /// copies of the files).
    #[test]
    fn versions_from_memory_equal_versions_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.logfile_max_bytes = 96 << 10;
        cfg.idle_sync = Duration::from_millis(1);
        let rt = rt();
        for round in 0..2u64 {
            let logger = Logger::open(cfg.clone()).unwrap();
            rt.block_on(async {
                for i in 0..200u64 {
                    let off = (i * 7919 * 512) % (SIZE - 65536);
                    match i % 6 {
                        0 => logger.zero(off, 3000, false, true).await.unwrap(),
                        1 => logger.zero(off, 5000, i % 4 == 1, false).await.unwrap(),
                        _ => logger
                            .write(
                                off,
                                Bytes::from(vec![(i + round) as u8; 1 + (i as usize * 331) % 9000]),
                                i % 5 == 0,
                            )
                            .await
                            .unwrap(),
                    }
                }
                logger.rotate().await.unwrap();
            });
            logger.close();
        }
        let mut prev: Option<Version> = None;
        let mut checked = 0;
        for entry in crate::recovery::list_logfiles(&cfg.dir).unwrap() {
            let Some(v) = crate::recovery::read_version(&cfg.dir, entry.seq, "alpha").unwrap()
            else {
                continue;
            };
            let b = crate::recovery::digest_records(&entry.path, v.end_pos - v.start_pos).unwrap();
            let want = b.finish(
                prev.as_ref(),
                &entry.name(),
                entry.seq,
                v.start_pos,
                v.end_pos,
            );
            assert_eq!(v, want, "version of {}", entry.name());
            prev = Some(v);
            checked += 1;
        }
        assert!(checked > 10, "only {checked} versions");
    }

    /// Every logfile in `dir`, in order, with its scan; none may be damaged.
    fn undamaged_logfiles(dir: &Path) -> Vec<(Vec<u8>, mars_logfmt::ScanReport)> {
        let mut out = Vec::new();
        for entry in crate::recovery::list_logfiles(dir).unwrap() {
            let bytes = std::fs::read(&entry.path).unwrap();
            let report = mars_logfmt::scan_logfile(&bytes);
            assert!(
                report.damage.is_none(),
                "{}: {:?}",
                entry.name(),
                report.damage
            );
            out.push((bytes, report));
        }
        out
    }

    fn direct_and_buffered_writes(cfg: Config, expect_direct: bool) {
        let logger = Arc::new(Logger::open(cfg.clone()).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let region = SIZE / 4;
        let models = rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..4u64 {
                let logger = logger.clone();
                tasks.push(tokio::spawn(async move {
                    let mut model = vec![0u8; region as usize];
                    for i in 0..40u64 {
                        // Odd sizes, so that batches start and end anywhere in a block.
                        let len = if i % 3 == 0 {
                            1 + i * 37
                        } else {
                            70_001 + (i * 16_411) % 630_000
                        };
                        let off = (i * 91_331) % (region - len);
                        let fill = (t * 50 + i) as u8 | 1;
                        logger
                            .write(
                                t * region + off,
                                Bytes::from(vec![fill; len as usize]),
                                i % 9 == 0,
                            )
                            .await
                            .unwrap();
                        model[off as usize..(off + len) as usize].fill(fill);
                    }
                    model
                }));
            }
            let mut models = Vec::new();
            for t in tasks {
                models.push(t.await.unwrap());
            }
            models
        });
        let image: Vec<u8> = models.concat();
        assert!(
            logger.read(0, SIZE).unwrap()[..] == image[..],
            "reads see the writes"
        );
        let direct = logger.shared.direct_bytes.load(Ordering::Relaxed);
        assert_eq!(direct > 0, expect_direct, "O_DIRECT bytes: {direct}");
        // What fetchers get from memory is what the logfiles hold.
        let mut from_memory = 0;
        for e in recovery::list_logfiles(&cfg.dir).unwrap() {
            let bytes = std::fs::read(&e.path).unwrap();
            let mut off = FILE_HEADER_LEN;
            while off < bytes.len() {
                let mut got = vec![0u8; 100_003];
                if let Some(n) = logger.read_recent(e.seq, off as u64, &mut got) {
                    got.truncate(n);
                    assert!(!got.is_empty());
                    assert!(
                        got[..] == bytes[off..off + got.len()],
                        "{} at {off}",
                        e.name()
                    );
                    from_memory += got.len();
                }
                off += 100_003;
            }
        }
        assert!(
            from_memory > 1 << 20,
            "the recent log is in memory: {from_memory}"
        );
        logger.close();
        assert!(
            std::fs::read(&cfg.disk).unwrap() == image,
            "disk after close"
        );
        let mut records = 0;
        for (bytes, report) in undamaged_logfiles(&cfg.dir) {
            assert_eq!(
                report.valid_end,
                bytes.len() as u64,
                "nothing after the last record"
            );
            records += report.records.len();
        }
        assert_eq!(records, 160);
        // And recovery accepts the logfiles (a reopen replays nothing, all is applied).
        let logger = Logger::open(cfg.clone()).unwrap();
        assert!(logger.read(0, SIZE).unwrap()[..] == image[..]);
    }

    /// One write of this size is an O_DIRECT batch by itself.
    const CHUNK: u64 = 300 << 10;

    fn chunk(fill: u8) -> Bytes {
        Bytes::from(vec![fill; CHUNK as usize])
    }

    /// A logger in `dir` and a runtime for the pipeline tests.
    fn pipeline_setup(dir: &Path) -> (Config, Arc<Logger>, tokio::runtime::Runtime) {
        let cfg = setup(dir);
        let logger = Arc::new(Logger::open(cfg.clone()).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        (cfg, logger, rt)
    }

    /// A large batch whose write fails while the next one is already in flight: both
    /// are refused (ENOSPC reaches the writer of the failed one), the log is cut
    /// before them, the logger goes on, and after a reopen the disk holds exactly the
    /// acknowledged writes.
    #[test]
    fn a_failed_pipelined_write_cuts_it_and_the_batches_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, logger, rt) = pipeline_setup(dir.path());
        // Job 2 fails, once job 3 is queued behind it: a write before (ok), the held
        // write A (ENOSPC) and a write B issued while A is being written (refused too).
        logger.shared.fail_io_job.store(2, Ordering::Relaxed);
        let mut image = vec![0u8; SIZE as usize];
        rt.block_on(logger.write(0, chunk(1), false)).unwrap();
        image[..CHUNK as usize].fill(1);
        let (a, b) = rt.block_on(async {
            let l = logger.clone();
            let a = tokio::spawn(async move { l.write(CHUNK, chunk(2), false).await });
            wait_until("write A in the I/O thread", || {
                logger.shared.io_jobs.load(Ordering::Relaxed) >= 2
            });
            let b = logger.write(2 * CHUNK, chunk(3), true).await;
            (a.await.unwrap(), b)
        });
        assert!(
            logger.shared.max_inflight.load(Ordering::Relaxed) >= 2,
            "batches were pipelined"
        );
        assert_eq!(
            a.map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOSPC)),
            "ENOSPC kept"
        );
        assert!(b.is_err(), "the batch after the failed one is refused too");
        // Later writes land where the refused ones were.
        rt.block_on(logger.write(3 * CHUNK, chunk(4), false))
            .unwrap();
        image[3 * CHUNK as usize..4 * CHUNK as usize].fill(4);
        // The logger goes on after the failure.
        rt.block_on(logger.write(0, Bytes::from(vec![7u8; 4096]), true))
            .unwrap();
        image[..4096].fill(7);
        assert!(logger.read(0, SIZE).unwrap()[..] == image[..], "reads");
        logger.close();
        drop(logger);
        // The log holds exactly the acknowledged writes: replayed from the start, it
        // gives the image.
        let mut replayed = vec![0u8; SIZE as usize];
        for (bytes, report) in undamaged_logfiles(&cfg.dir) {
            for r in &report.records {
                let h = &r.header;
                assert_eq!(h.kind, Kind::Write);
                let at = r.file_offset as usize + RECORD_HEADER_LEN;
                replayed[h.offset as usize..(h.offset + h.length) as usize]
                    .copy_from_slice(&bytes[at..at + h.length as usize]);
            }
        }
        assert!(
            replayed == image,
            "the log replays to the acknowledged writes"
        );
        let logger = Logger::open(cfg.clone()).unwrap();
        assert!(
            logger.read(0, SIZE).unwrap()[..] == image[..],
            "after reopen"
        );
    }

    /// O_DIRECT refused while batches are in flight: the next batch (now written
    /// through the page cache on the writer thread) waits for the ones still in
    /// flight, so batches complete in log order (`complete` counts any that do not),
    /// although the I/O threads finished the later ones first.
    #[test]
    fn o_direct_refused_mid_pipeline_keeps_log_order() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, logger, rt) = pipeline_setup(dir.path());
        logger.shared.refuse_io_job.store(1, Ordering::Relaxed);
        let sh = logger.shared.clone();
        let n = MAX_INFLIGHT as u64 + 1;
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..n {
                let l = logger.clone();
                tasks.push(tokio::spawn(async move {
                    l.write(i * CHUNK, chunk(i as u8 + 1), false).await
                }));
                // The first is held by an I/O thread; the next ones are written by
                // the others but wait behind it; the last waits for room.
                if i == 0 {
                    wait_until("first taken", || sh.io_jobs.load(Ordering::Relaxed) >= 1);
                } else if i < n - 1 {
                    wait_until("queued", || sh.max_inflight.load(Ordering::Relaxed) > i);
                } else {
                    wait_until("last waits", || sh.room_waits.load(Ordering::Relaxed) >= 1);
                }
            }
            sh.release_io.store(true, Ordering::Release);
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        assert!(logger.shared.max_inflight.load(Ordering::Relaxed) >= 2);
        assert_eq!(
            logger.shared.out_of_order.load(Ordering::Relaxed),
            0,
            "batches completed out of log order"
        );
        let mut image = vec![0u8; SIZE as usize];
        for i in 0..n as usize {
            image[i * CHUNK as usize..(i + 1) * CHUNK as usize].fill(i as u8 + 1);
        }
        assert!(logger.read(0, SIZE).unwrap()[..] == image[..], "reads");
        logger.close();
        drop(logger);
        assert!(std::fs::read(&cfg.disk).unwrap() == image, "disk");
        let records: usize = undamaged_logfiles(&cfg.dir)
            .iter()
            .map(|(_, r)| r.records.len())
            .sum();
        assert_eq!(records, n as usize);
    }

    /// Large batches go to the logfile with O_DIRECT (middle blocks) and the page
    /// cache (partial blocks at both ends): the logfile holds exactly the records.
    #[test]
    fn large_batches_written_with_o_direct_keep_the_log_exact() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.logfile_max_bytes = 3 << 20;
        let supported = open_direct(&cfg.disk).is_some();
        direct_and_buffered_writes(cfg, supported);
    }

    /// Without O_DIRECT (switched off, or refused by the file system) everything goes
    /// through the page cache.
    #[test]
    fn without_o_direct_large_batches_use_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.logfile_max_bytes = 3 << 20;
        cfg.direct_io = false;
        direct_and_buffered_writes(cfg, false);
    }

    /// The persister syncs the disk at most once per `persist_interval` however often
    /// writeback makes progress (each sync is a device flush), and still keeps up.
    #[test]
    fn disk_is_synced_at_most_once_per_persist_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = setup(dir.path());
        cfg.persist_interval = Duration::from_millis(300);
        cfg.idle_sync = Duration::from_millis(1);
        let logger = Logger::open(cfg).unwrap();
        let rt = rt();
        let mut seen = vec![logger.shared.persisted_pos.load(Ordering::Acquire)];
        let t0 = Instant::now();
        let mut i = 0u64;
        rt.block_on(async {
            while t0.elapsed() < Duration::from_millis(1200) {
                logger
                    .write(
                        (i * 4096) % SIZE,
                        Bytes::from(vec![i as u8; 4096]),
                        i.is_multiple_of(3),
                    )
                    .await
                    .unwrap();
                i += 1;
                let p = logger.shared.persisted_pos.load(Ordering::Acquire);
                if seen.last() != Some(&p) {
                    seen.push(p);
                }
            }
        });
        // Writeback advanced all the time; persisting it happened at most every 300 ms.
        assert!(seen.len() >= 3, "persisted position did not move: {seen:?}");
        assert!(
            seen.len() <= 6,
            "persisted {} times in 1.2 s",
            seen.len() - 1
        );
        logger.close();
        let st = logger.status();
        assert_eq!(st.persisted_pos, st.logged_pos, "close persists everything");
    }

    fn list_logfiles_len(dir: &Path) -> usize {
        crate::recovery::list_logfiles(dir).unwrap().len()
    }
}
