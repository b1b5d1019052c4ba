//! Writer thread, writeback thread and the public [`Logger`] handle.

use crate::disk::{disk_size, Disk};
use crate::index::{overlay, ExtentData, Index};
use crate::recovery::{self, finish_version, new_logfile, write_applied, LogfileEntry};
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mars_logfmt::{Kind, RecordHeader, Version, FILE_HEADER_LEN};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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
    /// Persist the applied position at least this often while writeback progresses.
    pub persist_interval: Duration,
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
            persist_interval: Duration::from_secs(1),
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
    Flush {
        reply: Reply,
    },
    Rotate {
        reply: oneshot::Sender<io::Result<Option<String>>>,
    },
    Shutdown,
}

impl Op {
    fn payload_len(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
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
}

#[derive(Default)]
struct WbState {
    queue: VecDeque<WbEntry>,
    finished: VecDeque<FinishedLog>,
    mem_used: u64,
    synced_pos: u64,
    writer_done: bool,
    writeback_done: bool,
}

struct Shared {
    cfg: Config,
    disk: Disk,
    index: Mutex<Index>,
    wb: Mutex<WbState>,
    /// Writeback waits here for work; the writer waits here for memory.
    wb_cv: Condvar,
    mem_cv: Condvar,
    /// The persister waits here for applied records or the end of writeback.
    persist_cv: Condvar,
    logged_pos: AtomicU64,
    applied_pos: AtomicU64,
    persisted_pos: AtomicU64,
    current_logfile: Mutex<String>,
    failed: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, what: String) {
        tracing::error!(resource_dir = %self.cfg.dir.display(), "logger failed: {what}");
        let mut f = self.failed.lock();
        if f.is_none() {
            *f = Some(what);
        }
    }
}

/// Handle to a running transaction logger. Cheap to share behind an `Arc`.
pub struct Logger {
    shared: Arc<Shared>,
    tx: Sender<Op>,
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
        let rec = recovery::recover(&cfg.dir, &cfg.node, &disk, cfg.size)?;
        let (file, path) = new_logfile(
            &cfg.dir,
            &cfg.node,
            rec.next_file_seq,
            rec.end_pos,
            rec.next_record_seq,
            cfg.resource_id,
        )?;
        let entry = LogfileEntry {
            seq: rec.next_file_seq,
            node: cfg.node.clone(),
            path,
        };
        let shared = Arc::new(Shared {
            disk,
            index: Mutex::new(Index::new()),
            wb: Mutex::new(WbState {
                synced_pos: rec.end_pos,
                ..Default::default()
            }),
            wb_cv: Condvar::new(),
            mem_cv: Condvar::new(),
            persist_cv: Condvar::new(),
            logged_pos: AtomicU64::new(rec.end_pos),
            applied_pos: AtomicU64::new(rec.end_pos),
            persisted_pos: AtomicU64::new(rec.end_pos),
            current_logfile: Mutex::new(entry.name()),
            failed: Mutex::new(None),
            cfg,
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = Writer {
            shared: shared.clone(),
            file,
            entry,
            file_start_pos: rec.end_pos,
            pos: rec.end_pos,
            next_seq: rec.next_record_seq,
            unsynced_bytes: 0,
            buf: Vec::with_capacity(1 << 20),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| LoggerError::Disk(format!("spawn {name}: {e}")))
        };
        let (wb_shared, p_shared, last_version) =
            (shared.clone(), shared.clone(), rec.last_version);
        let threads = vec![
            spawn("mars-log-writer", Box::new(move || writer.run(rx)))?,
            spawn(
                "mars-writeback",
                Box::new(move || writeback_loop(wb_shared)),
            )?,
            spawn(
                "mars-persist",
                Box::new(move || persist_loop(p_shared, last_version)),
            )?,
        ];
        Ok(Logger {
            shared,
            tx,
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
        self.tx.send(op).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
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

    pub async fn flush(&self) -> io::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.submit(Op::Flush { reply }, rx).await
    }

    /// Start a new logfile now. `None` when the current one is still empty.
    pub async fn rotate(&self) -> io::Result<Option<String>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Op::Rotate { reply }).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
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
        let covered: u64 = pieces.iter().map(|(o, e)| e.end - o).sum();
        let mut buf = vec![0u8; len as usize];
        if covered < len {
            self.shared.disk.read_exact_at(&mut buf, offset)?;
        }
        overlay(&mut buf, offset, &pieces);
        Ok(Bytes::from(buf))
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

    /// Delete logfiles that are finished, versioned, entirely written back
    /// (with the position persisted) and end at or before `upto` (what every
    /// other member has replayed). Returns the names deleted.
    pub fn delete_applied(&self, upto: u64) -> Result<Vec<String>, LoggerError> {
        let cfg = &self.shared.cfg;
        let persisted = self.shared.persisted_pos.load(Ordering::Acquire).min(upto);
        let current = self.shared.current_logfile.lock().clone();
        let mut deleted = Vec::new();
        for entry in recovery::list_logfiles(&cfg.dir).map_err(|e| LoggerError::io(&cfg.dir, e))? {
            if entry.name() == current {
                continue;
            }
            match recovery::read_version(&cfg.dir, entry.seq, &entry.node)? {
                Some(v) if v.end_pos <= persisted => {
                    std::fs::remove_file(&entry.path)
                        .map_err(|e| LoggerError::io(&entry.path, e))?;
                    deleted.push(entry.name());
                }
                _ => {}
            }
        }
        if !deleted.is_empty() {
            crate::crashsafe::sync_dir(&cfg.dir).map_err(|e| LoggerError::io(&cfg.dir, e))?;
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
    }
}

impl Drop for Logger {
    fn drop(&mut self) {
        self.close();
    }
}

struct Writer {
    shared: Arc<Shared>,
    file: File,
    entry: LogfileEntry,
    file_start_pos: u64,
    /// Stream position of the next record.
    pos: u64,
    next_seq: u64,
    unsynced_bytes: u64,
    buf: Vec<u8>,
}

const BATCH_BYTES_MAX: u64 = 8 << 20;
const BATCH_OPS_MAX: usize = 512;

impl Writer {
    fn run(mut self, rx: Receiver<Op>) {
        let mut batch: Vec<Op> = Vec::new();
        'outer: loop {
            let first = if self.unsynced_bytes > 0 {
                match rx.recv_timeout(self.shared.cfg.idle_sync) {
                    Ok(op) => op,
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = self.sync();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(op) => op,
                    Err(_) => break,
                }
            };
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
            self.wait_for_memory(bytes);
            self.process(&mut batch);
            if shutdown {
                break 'outer;
            }
        }
        let _ = self.sync();
        let mut wb = self.shared.wb.lock();
        wb.writer_done = true;
        self.shared.wb_cv.notify_all();
    }

    /// Backpressure: wait until the not-yet-written-back data leaves room.
    fn wait_for_memory(&mut self, incoming: u64) {
        let limit = self.shared.cfg.mem_limit_bytes;
        let mut wb = self.shared.wb.lock();
        while wb.mem_used > 0
            && wb.mem_used + incoming > limit
            && self.shared.failed.lock().is_none()
        {
            if self.unsynced_bytes > 0 {
                // Writeback only takes synced records: sync so that it can make room.
                drop(wb);
                let _ = self.sync();
                wb = self.shared.wb.lock();
                continue;
            }
            self.shared
                .mem_cv
                .wait_for(&mut wb, Duration::from_millis(100));
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        if self.unsynced_bytes == 0 {
            return Ok(());
        }
        if let Err(e) = self.file.sync_data() {
            // After a failed fdatasync the page cache state is unknown: stop for good.
            self.shared
                .fail(format!("fdatasync of {}: {e}", self.entry.path.display()));
            return Err(e);
        }
        self.unsynced_bytes = 0;
        let mut wb = self.shared.wb.lock();
        wb.synced_pos = self.pos;
        self.shared.wb_cv.notify_all();
        Ok(())
    }

    fn process(&mut self, batch: &mut Vec<Op>) {
        if let Some(f) = self.shared.failed.lock().clone() {
            for op in batch.drain(..) {
                reply_err(op, &f);
            }
            return;
        }
        if self.pos - self.file_start_pos >= self.shared.cfg.logfile_max_bytes {
            if let Err(e) = self.rotate() {
                self.shared.fail(format!("log rotation: {e}"));
            }
        }
        self.buf.clear();
        let start_pos = self.pos;
        let start_seq = self.next_seq;
        let mut need_sync = false;
        let mut entries = Vec::new();
        let stamp_ns = now_ns();
        for op in batch.iter() {
            let (kind, offset, length, fua, data) = match op {
                Op::Write {
                    offset, data, fua, ..
                } => (Kind::Write, *offset, data.len() as u64, *fua, Some(data)),
                Op::Zero {
                    offset,
                    len,
                    fua,
                    trim,
                    ..
                } => (
                    if *trim { Kind::Trim } else { Kind::WriteZeroes },
                    *offset,
                    *len,
                    *fua,
                    None,
                ),
                Op::Flush { .. } => {
                    need_sync = true;
                    continue;
                }
                Op::Rotate { .. } | Op::Shutdown => continue,
            };
            need_sync |= fua;
            let h = RecordHeader {
                kind,
                seq: self.next_seq,
                pos: self.pos,
                offset,
                length,
                stamp_ns,
            };
            h.encode_into(data.map(|d| &d[..]).unwrap_or(&[]), &mut self.buf);
            self.next_seq += 1;
            self.pos += h.total_len();
            entries.push(WbEntry {
                seq: h.seq,
                end_pos: self.pos,
                offset,
                len: length,
                kind,
                data: data.cloned(),
            });
        }
        let file_offset = FILE_HEADER_LEN as u64 + (start_pos - self.file_start_pos);
        if !self.buf.is_empty() {
            if let Err(e) = self.file.write_all_at(&self.buf, file_offset) {
                // Undo: cut what may have been written, give the positions back.
                let _ = self.file.set_len(file_offset);
                self.pos = start_pos;
                self.next_seq = start_seq;
                let msg = format!("log write to {}: {e}", self.entry.path.display());
                tracing::error!("{msg}");
                for op in batch.drain(..) {
                    match op {
                        Op::Write { reply, .. } | Op::Zero { reply, .. } => {
                            let _ = reply.send(Err(io::Error::new(e.kind(), msg.clone())));
                        }
                        other => self.finish_op(other, Ok(())),
                    }
                }
                return;
            }
            // Start writing these pages out now, so that the next fdatasync has little left to do.
            crate::disk::start_writeback(&self.file, file_offset, self.buf.len() as u64);
            self.unsynced_bytes += self.buf.len() as u64;
            self.shared.logged_pos.store(self.pos, Ordering::Release);
        }
        let sync_result = if need_sync || self.unsynced_bytes >= self.shared.cfg.sync_batch_bytes {
            self.sync()
        } else {
            Ok(())
        };
        if !entries.is_empty() {
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
                wb.queue.push_back(e);
            }
            self.shared.wb_cv.notify_all();
        }
        for op in batch.drain(..) {
            let r = match &sync_result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            self.finish_op(op, r);
        }
    }

    fn finish_op(&mut self, op: Op, r: io::Result<()>) {
        match op {
            Op::Write { reply, .. } | Op::Zero { reply, .. } | Op::Flush { reply } => {
                let _ = reply.send(r);
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
            Op::Shutdown => {}
        }
    }

    fn rotate(&mut self) -> Result<String, LoggerError> {
        self.unsynced_bytes += 1; // force a sync even if nothing is pending
        self.sync()
            .map_err(|e| LoggerError::io(&self.entry.path, e))?;
        let cfg = &self.shared.cfg;
        let seq = self.entry.seq + 1;
        let (file, path) = new_logfile(
            &cfg.dir,
            &cfg.node,
            seq,
            self.pos,
            self.next_seq,
            cfg.resource_id,
        )?;
        let new_entry = LogfileEntry {
            seq,
            node: cfg.node.clone(),
            path,
        };
        let old = std::mem::replace(&mut self.entry, new_entry);
        {
            let mut wb = self.shared.wb.lock();
            wb.finished.push_back(FinishedLog {
                entry: old,
                start_pos: self.file_start_pos,
                end_pos: self.pos,
            });
            self.shared.wb_cv.notify_all();
        }
        self.file = file;
        self.file_start_pos = self.pos;
        let name = self.entry.name();
        *self.shared.current_logfile.lock() = name.clone();
        tracing::info!(logfile = %name, pos = self.pos, "log rotated");
        Ok(name)
    }
}

fn reply_err(op: Op, msg: &str) {
    let e = || Err(io::Error::other(msg.to_string()));
    match op {
        Op::Write { reply, .. } | Op::Zero { reply, .. } | Op::Flush { reply } => {
            let _ = reply.send(e());
        }
        Op::Rotate { reply } => {
            let _ = reply.send(Err(io::Error::other(msg.to_string())));
        }
        Op::Shutdown => {}
    }
}

const WRITEBACK_BATCH_BYTES: u64 = 32 << 20;

/// Applies synced records to the disk in log order. Never blocks on disk syncs:
/// those, and logfile versions, are the persister's work.
fn writeback_loop(shared: Arc<Shared>) {
    loop {
        let (batch, done) = {
            let mut wb = shared.wb.lock();
            loop {
                let ready = wb.queue.front().is_some_and(|e| e.end_pos <= wb.synced_pos);
                if ready || (wb.writer_done && wb.queue.is_empty()) {
                    break;
                }

                shared.wb_cv.wait(&mut wb);
            }
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(e) = wb.queue.front() {
                if e.end_pos > wb.synced_pos || bytes >= WRITEBACK_BATCH_BYTES {
                    break;
                }
                bytes += e.len;
                if let Some(e) = wb.queue.pop_front() {
                    batch.push(e);
                }
            }
            (batch, wb.writer_done && wb.queue.is_empty())
        };
        if !batch.is_empty() {
            if let Err(e) = apply_batch(&shared.disk, &batch) {
                shared.fail(format!("writeback to {}: {e}", shared.cfg.disk.display()));
                // Keep the records in memory (reads stay correct) and retry later.
                let mut wb = shared.wb.lock();
                for e in batch.into_iter().rev() {
                    wb.queue.push_front(e);
                }
                drop(wb);
                std::thread::sleep(Duration::from_secs(1));
                continue;
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
            shared.mem_cv.notify_all();
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
    loop {
        let done = {
            let mut wb = shared.wb.lock();
            if !wb.writeback_done {
                shared
                    .persist_cv
                    .wait_for(&mut wb, shared.cfg.persist_interval);
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
            let Some(f) = next else { break };
            let cfg = &shared.cfg;
            match finish_version(
                &cfg.dir,
                &cfg.node,
                &f.entry,
                f.start_pos,
                f.end_pos,
                last_version.as_ref(),
            ) {
                Ok(v) => last_version = Some(v),
                Err(e) => shared.fail(format!("version of {}: {e}", f.entry.name())),
            }
        }
        if applied > shared.persisted_pos.load(Ordering::Acquire) {
            let r =
                shared.disk.sync().map_err(|e| e.to_string()).and_then(|_| {
                    write_applied(&shared.cfg.dir, applied).map_err(|e| e.to_string())
                });
            match r {
                Ok(()) => shared.persisted_pos.store(applied, Ordering::Release),
                Err(e) => shared.fail(format!("persisting applied position: {e}")),
            }
        }
        if done {
            return;
        }
    }
}

/// Apply records in log order; runs of back-to-back writes go out as one `pwritev`.
fn apply_batch(disk: &Disk, batch: &[WbEntry]) -> io::Result<()> {
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
                disk.write_vectored_at(&bufs, e.offset)?;
                if end - e.offset >= 1 << 20 {
                    disk.start_writeback(e.offset, end - e.offset);
                }
                i = j;
            }
            (kind, _) => {
                disk.zero_range(e.offset, e.len, *kind == Kind::Trim)?;
                i += 1;
            }
        }
    }
    Ok(())
}
