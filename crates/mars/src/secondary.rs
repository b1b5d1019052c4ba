//! A secondary member: full sync from the primary, then fetch of its
//! logfiles and replay onto the local disk.
//!
//! State files in the resource directory (crash-safe JSON):
//! - `sync`: `{"format":1,"start_pos","next_offset","end_pos","done"}`. The
//!   sync copies, block by block (1 MiB), every block whose blake3 digest
//!   differs from the primary's current data, while the primary goes on
//!   writing; then replay starts at `start_pos`, the primary's log position
//!   when the sync began. The disk is `syncing` (inconsistent) until replay
//!   has passed `end_pos`, the primary's position when the copy ended.
//!   Pipelined: up to `SYNC_WINDOW` digests are in flight while the answers
//!   are taken in order. Resumable: `next_offset` (the end of the completed
//!   prefix of blocks, written and synced) is persisted every 64 blocks (at
//!   least every second) and when the sync pauses or fails.
//! - `replayed`, `replayed.hw`: the replay position, durable and as of the
//!   last applied record (`mars_logger::replay`). After a reboot the disk
//!   is not consistent until replay passes what the replayer reports
//!   (`consistent_from`).
//!
//! Logfiles are fetched whole (from offset 0, with their file header) into
//! the resource directory under their origin's names, resuming at the local
//! file length; every chunk's crc32c is checked in transit, and every
//! record's checksum is checked by replay before it is applied.

use crate::meta;
use crate::peer::Peer;
use anyhow::{anyhow, bail, Context, Result};
use mars_logfmt::ArrivalCheck;
use mars_logger::disk::{open_direct, AlignedBuf, DIRECT_ALIGN};
use mars_logger::fetched::FetchedChunks;
use mars_logger::replay::Replayer;
use mars_proto::{read_data_into_slice, read_msg, write_msg, Msg};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::future::Future as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const SYNC_BLOCK: u64 = 1 << 20;
const FETCH_CHUNK: u32 = 4 << 20;
/// A fetched logfile's blocks are reserved this far ahead of its writes (all of it
/// when its final length is known): buffered writes into reserved blocks skip the
/// file system's delayed allocation, which cost more than the copy itself. Blocks
/// past the end of a logfile that ends earlier stay reserved until it is deleted.
const FETCH_PREALLOC: u64 = 32 << 20;
/// Fetch requests in flight on one connection.
const FETCH_WINDOW: usize = 3;
/// How long a fetcher ahead of a running replay waits for room among the fetched
/// chunks kept in memory before it writes a chunk through the page cache instead
/// (`FetchedChunks::wait_room`): about the longest replay stops for a disk sync.
const FETCH_ROOM_PATIENCE: Duration = Duration::from_millis(500);
const SYNC_FILE: &str = "sync";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SyncState {
    format: u16,
    start_pos: u64,
    next_offset: u64,
    end_pos: Option<u64>,
    done: bool,
    /// The member the blocks before `next_offset` came from (absent in files of
    /// builds before it: then the designated primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    /// The source's logfile holding the records up to `start_pos` (name,
    /// start): where this history begins (absent in older files, and from
    /// older sources: then replay finds it by position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<(String, u64)>,
}

/// What the daemon shows about a secondary.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub syncing: bool,
    pub sync_done: u64,
    pub sync_total: u64,
    /// Until replay passes this, the disk is not a consistent image.
    pub consistent_from: Option<u64>,
    pub fetched: u64,
    pub replayed: u64,
    pub error: Option<String>,
    pub blocks_transferred: u64,
    /// A replay step is running (pause-replay waits for it to end).
    pub replaying: bool,
    /// Replay stopped: a logfile does not continue the history applied here.
    pub split_brain: bool,
    /// Bytes per second of the running full sync (over the blocks compared so far).
    pub sync_rate: u64,
    /// The member fetched from last.
    pub source: Option<String>,
    /// That member writes no log any more and everything it has is here
    /// (`fetched` is the end of its log): a planned handover may complete
    /// once replay reaches it.
    pub source_complete: bool,
    /// The source no longer has the logfiles this member needs (deleted in
    /// emergency mode): only `invalidate` (a full sync) helps.
    pub cut_off: bool,
    /// Why replay stopped or failed last (kept apart from sync/fetch errors,
    /// which a successful fetch round clears).
    pub replay_error: Option<String>,
    /// Of `replayed`, what is durable (disk synced, position persisted).
    pub replayed_durable: u64,
    /// Replay has opened its state since the task started (after a reboot it finds
    /// then how far the disk may be no consistent image).
    pub replay_opened: bool,
    /// The full sync waits for a source: no member it could copy from is reachable.
    pub sync_waits_for_source: bool,
    /// The last fetch round found no reachable member to fetch from.
    pub fetch_waits_for_source: bool,
    /// What replay applied is not known yet to be the designated primary's
    /// history: the source's list changed (or the primary did) since replay
    /// last checked against it. Never `uptodate` then.
    pub history_unconfirmed: bool,
}

/// Lag in seconds without comparing clocks of different nodes: remembers when
/// this node first learned that the primary's log had reached each position.
/// The oldest write not replayed here was logged no later than the first
/// moment a position beyond it was known.
///
/// Kept across restarts of marsd in the resource directory (`lag-clock`, JSON
/// `[[position, unix_ms], ...]`, best effort: rewritten at most once a second),
/// so that a restarted member that is behind does not show a lag of 0 s.
#[derive(Debug, Default)]
pub struct LagClock {
    seen: std::collections::VecDeque<(u64, std::time::Instant)>,
    /// Read from the file already (once per marsd process and resource).
    loaded: bool,
    /// Changed since it was saved, and when it was saved last.
    dirty: bool,
    saved: Option<std::time::Instant>,
}

/// The lag clock's file in a resource directory.
pub const LAG_CLOCK_FILE: &str = "lag-clock";
/// Sightings kept at most (while a member lags for hours): the oldest ones stay,
/// later ones are thinned, which can only make the lag shown smaller.
const LAG_CLOCK_MAX: usize = 4096;

impl LagClock {
    pub fn observe(&mut self, written: u64, now: std::time::Instant) {
        if self.seen.back().is_none_or(|&(w, _)| written > w) {
            if self.seen.len() >= LAG_CLOCK_MAX {
                // Keep the first half; of the rest every other one.
                let keep_from = LAG_CLOCK_MAX / 2;
                let mut i = 0;
                self.seen.retain(|_| {
                    i += 1;
                    i <= keep_from || i % 2 == 0
                });
            }
            self.seen.push_back((written, now));
            self.dirty = true;
        }
    }

    /// Take up what an earlier marsd saved in `dir` (once; a missing or damaged
    /// file is nothing to take up). Times are wall-clock times of this node.
    pub fn load_once(&mut self, dir: &std::path::Path) {
        if std::mem::replace(&mut self.loaded, true) {
            return;
        }
        let Ok(text) = std::fs::read_to_string(dir.join(LAG_CLOCK_FILE)) else {
            return;
        };
        let Ok(list) = serde_json::from_str::<Vec<(u64, u64)>>(&text) else {
            return;
        };
        let (now, wall) = (std::time::Instant::now(), unix_ms());
        let mut earlier: std::collections::VecDeque<(u64, std::time::Instant)> = list
            .into_iter()
            .filter_map(|(w, ms)| {
                let age = Duration::from_millis(wall.checked_sub(ms)?);
                Some((w, now.checked_sub(age)?))
            })
            .collect();
        // Older sightings first; what this process saw beyond them goes after them.
        let last = earlier.back().map(|&(w, _)| w);
        earlier.extend(
            self.seen
                .drain(..)
                .filter(|&(w, _)| last.is_none_or(|l| w > l)),
        );
        earlier.truncate(LAG_CLOCK_MAX);
        self.seen = earlier;
    }

    /// Save to `dir` when it changed and the last save is a second old (best effort).
    pub fn save_if_due(&mut self, dir: &std::path::Path, now: std::time::Instant) {
        if !self.dirty
            || self
                .saved
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        let wall = unix_ms();
        let list: Vec<(u64, u64)> = self
            .seen
            .iter()
            .map(|&(w, t)| {
                (
                    w,
                    wall.saturating_sub(now.duration_since(t).as_millis() as u64),
                )
            })
            .collect();
        // Not synced (a display aid, not worth a device flush a second): written
        // beside and renamed over, so a reader never sees half a file.
        let tmp = dir.join(format!(".{LAG_CLOCK_FILE}.tmp"));
        let saved = serde_json::to_string(&list)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, dir.join(LAG_CLOCK_FILE)));
        if saved.is_ok() {
            self.dirty = false;
            self.saved = Some(now);
        }
    }

    /// How long the oldest write not yet replayed has been known.
    pub fn lag(&self, replayed: u64, now: std::time::Instant) -> Duration {
        self.seen
            .iter()
            .find(|&&(w, _)| w > replayed)
            .map(|&(_, t)| now.saturating_duration_since(t))
            .unwrap_or_default()
    }

    /// Forget what was replayed; keeps at most one sample per observation round.
    pub fn prune(&mut self, replayed: u64) {
        while self.seen.front().is_some_and(|&(w, _)| w <= replayed) {
            self.seen.pop_front();
            self.dirty = true;
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Secondary {
    pub res: String,
    pub dir: PathBuf,
    pub me: String,
    pub disk: PathBuf,
    pub size: u64,
    pub peer: Arc<Peer>,
    pub progress: Arc<Mutex<Progress>>,
    pub stop: Arc<AtomicBool>,
    pub pause_sync: Arc<AtomicBool>,
    pub pause_fetch: Arc<AtomicBool>,
    pub pause_replay: Arc<AtomicBool>,
    /// During a handover to this node: the member that wrote the log.
    pub prefer_source: Arc<Mutex<Option<String>>>,
    /// Rate limits, bytes per second (0: none).
    pub fetch_rate: Arc<std::sync::atomic::AtomicU64>,
    pub sync_rate: Arc<std::sync::atomic::AtomicU64>,
    /// How this node's full syncs compare blocks.
    pub sync_digest: crate::digest::SyncDigest,
    /// Fetched chunks kept for replay (new with every secondary task).
    pub fetched: Arc<FetchedChunks>,
    /// The arrival check of each logfile being fetched, where the last round ended.
    pub arrivals: Mutex<std::collections::HashMap<String, ArrivalCheck>>,
    /// Secondaries a full sync failed from (the primary: that could not be
    /// connected to), passed over until then.
    pub avoid_sources: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Since when each sync source could not be connected to.
    pub sync_unreachable: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Members a fetch failed from, passed over until then while another can be
    /// asked; with the error when a chunk from it was refused on arrival (its copy
    /// is damaged: not asked again before then at all).
    #[allow(clippy::type_complexity)]
    pub fetch_avoid: Mutex<std::collections::HashMap<String, (std::time::Instant, Option<String>)>>,
    /// The logfiles of the history of the source fetched from last (its list):
    /// replay follows that history where another one's logfiles lie here too.
    /// With the designated primary when it was listed: a list from before a
    /// failover says nothing of the new primary's history.
    #[allow(clippy::type_complexity)]
    pub lineage: Mutex<Option<(Option<String>, mars_logger::history::Lineage)>>,
}

/// Of the members of `res` that `eligible` lets through, the one with a consistent
/// disk (up to date or behind, no split brain, not cut off) that replayed the most:
/// a full sync can copy its disk when the primary is away. (A member whose replay
/// stopped refuses to serve; its answer says why.)
pub(crate) fn consistent_member(
    store: &mars_meta::Store,
    res: &str,
    eligible: impl Fn(&str) -> bool,
) -> Option<String> {
    meta::resource(store, res)?
        .members
        .into_iter()
        .filter(|m| eligible(m))
        .filter_map(|m| {
            let a: meta::ActualEntry = meta::get(store, &meta::actual_key(res, &m))?;
            let consistent = matches!(a.disk.as_str(), "uptodate" | "outdated")
                && !a.split_brain
                && !a.emergency;
            consistent.then_some((a.replayed, m))
        })
        .max()
        .map(|(_, m)| m)
}

/// `Progress::replaying` set while it lives (one replay round).
struct Replaying<'a>(&'a Mutex<Progress>);

impl<'a> Replaying<'a> {
    fn announce(progress: &'a Mutex<Progress>) -> Replaying<'a> {
        progress.lock().replaying = true;
        Replaying(progress)
    }
}

impl Drop for Replaying<'_> {
    fn drop(&mut self) {
        self.0.lock().replaying = false;
    }
}

/// A fetched chunk whose records failed their check (`ArrivalCheck`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ArrivalRefused(String);

impl ArrivalRefused {
    fn new(file: &str, source: &str, e: impl std::fmt::Display) -> ArrivalRefused {
        ArrivalRefused(format!(
            "{file} from {source}: {e}: not stored; {source}'s copy is damaged there: fetch \
             stops before it, asks another member that holds it, or {source} again in {} s",
            FETCH_BACKOFF.as_secs()
        ))
    }
}

/// The longest a source may send nothing while an answer is due. A process that
/// stopped (SIGSTOP, a hung disk) keeps its TCP connections alive, the kernel
/// answers keepalive probes for it; after this the read fails and another member
/// is asked. Every read of a source's stream waits for the answer to a request
/// already sent, so the timer runs only while one is due; it restarts with every
/// byte that arrives, so a slow link never times out a large answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A source's stream whose reads fail with `TimedOut` after [`ANSWER_TIMEOUT`]
/// without a byte (see there). Writes pass through.
struct IdleTimeout<S> {
    inner: S,
    /// Armed when a read starts waiting, restarted by every byte.
    deadline: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S) -> IdleTimeout<S> {
        IdleTimeout {
            inner,
            deadline: Box::pin(tokio::time::sleep(ANSWER_TIMEOUT)),
            waiting: false,
        }
    }

    fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                this.waiting = false;
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let at = tokio::time::Instant::now() + ANSWER_TIMEOUT;
                    this.deadline.as_mut().reset(at);
                }
                match this.deadline.as_mut().poll(cx) {
                    std::task::Poll::Ready(()) => {
                        this.waiting = false;
                        std::task::Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("nothing arrived for {} s", ANSWER_TIMEOUT.as_secs()),
                        )))
                    }
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `read` (of an answer from `source`, on an [`IdleTimeout`] stream), its error
/// naming the source; a timeout says what happens next.
async fn answer_from<T>(
    source: &str,
    read: impl std::future::Future<Output = std::result::Result<T, mars_proto::ProtoError>>,
) -> Result<T> {
    read.await.map_err(|e| match e {
        mars_proto::ProtoError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => anyhow!(
            "{source} sent nothing for {} s while an answer was due: asking again, or another member",
            ANSWER_TIMEOUT.as_secs()
        ),
        e => anyhow::Error::from(e).context(format!("reading from {source}")),
    })
}

/// A source that could not be connected to (no data exchanged).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SourceUnreachable(String);

/// After a chunk was refused on arrival, fetch waits this long before asking again.
const FETCH_BACKOFF: Duration = Duration::from_secs(10);

/// How long a sync that has copied blocks from the primary keeps trying to connect
/// to it before it copies from another member (and so from the first block).
const PRIMARY_PATIENCE: Duration = Duration::from_secs(30);

/// How long a member a fetch failed from (or a primary a sync could not connect
/// to, see `sync_round`) is passed over while another can be asked.
const AVOID_FAILED: Duration = Duration::from_secs(10);

/// How long a secondary that failed to serve a full sync is passed over.
const AVOID_SOURCE: Duration = Duration::from_secs(30);

/// Memory for fetched chunks kept for replay, per resource (see `FetchedChunks`).
pub const FETCHED_KEEP: usize = 48 << 20;

/// Keeps a transfer under a rate (bytes per second, read anew at every call
/// so a changed setting applies at once) by sleeping after each chunk.
pub struct Throttle {
    rate: Arc<std::sync::atomic::AtomicU64>,
    window: std::time::Instant,
    bytes: u64,
    window_rate: u64,
}

impl Throttle {
    pub fn new(rate: Arc<std::sync::atomic::AtomicU64>) -> Throttle {
        Throttle {
            rate,
            window: std::time::Instant::now(),
            bytes: 0,
            window_rate: 0,
        }
    }

    /// Account `n` bytes just moved; sleeps as long as needed to stay under the rate.
    pub async fn spend(&mut self, n: u64) {
        let rate = self.rate.load(Ordering::Acquire);
        // A new window when the rate changes or every few seconds (no credit hoarded).
        if rate != self.window_rate || self.window.elapsed() > Duration::from_secs(5) {
            self.window = std::time::Instant::now();
            self.bytes = 0;
            self.window_rate = rate;
        }
        self.bytes += n;
        if rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.window.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

fn read_sync(dir: &std::path::Path) -> Result<Option<SyncState>> {
    match std::fs::read(dir.join(SYNC_FILE)) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is damaged", dir.join(SYNC_FILE).display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn write_sync(dir: &std::path::Path, s: &SyncState) -> Result<()> {
    crate::node::save_json(&dir.join(SYNC_FILE), s)
}

/// Make the blocks written so far durable, then record how far the sync got:
/// `next_offset` never claims a block that a crash could still lose. Runs in
/// the background (the sync goes on meanwhile); only blocks whose writes have
/// returned before the call are claimed.
fn spawn_persist_sync(
    disk: &Arc<std::fs::File>,
    dir: &std::path::Path,
    s: &SyncState,
) -> tokio::task::JoinHandle<Result<()>> {
    let (disk, dir, s) = (disk.clone(), dir.to_path_buf(), s.clone());
    tokio::task::spawn_blocking(move || {
        disk.sync_data()?;
        write_sync(&dir, &s)
    })
}

/// Write one synced block: with O_DIRECT when there is such a handle and the block
/// is aligned, else (or when the direct write is refused) through the page cache.
/// A direct write replaces what the page cache held of the range (the kernel writes
/// dirty pages back first and drops them after), so later buffered reads see it.
fn write_block(
    disk: &std::fs::File,
    direct: Option<&std::fs::File>,
    data: &[u8],
    off: u64,
) -> std::io::Result<()> {
    if let Some(f) = direct {
        let aligned = (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && off.is_multiple_of(DIRECT_ALIGN as u64);
        if aligned {
            match f.write_all_at(data, off) {
                Ok(()) => return Ok(()),
                // Refused for this file or a short write left an unaligned rest:
                // the whole block again through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
    }
    disk.write_all_at(data, off)
}

/// Write a fetched chunk at `at` of a logfile: its aligned part with O_DIRECT when
/// there is such a handle and `at` is aligned (`write_block`), the rest through the
/// page cache. The parts never share a block: the buffered rest begins where the
/// aligned part ends, and the next chunk begins after it (unaligned: all buffered).
fn write_fetched(
    file: &std::fs::File,
    direct: Option<&std::fs::File>,
    data: &[u8],
    at: u64,
) -> std::io::Result<()> {
    let aligned = match direct {
        Some(_) if at.is_multiple_of(DIRECT_ALIGN as u64) => {
            data.len() / DIRECT_ALIGN * DIRECT_ALIGN
        }
        _ => 0,
    };
    if aligned > 0 {
        write_block(file, direct, &data[..aligned], at)?;
    }
    file.write_all_at(&data[aligned..], at + aligned as u64)
}

/// Sync requests (`SyncBlock`) sent ahead of their answers.
const SYNC_WINDOW: usize = 16;
/// The longest a sync goes without recording its position.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The sending half of a pipelined full sync.
struct SyncSender {
    res: String,
    disk: Arc<std::fs::File>,
    path: PathBuf,
    size: u64,
    from: u64,
    wr: tokio::net::tcp::OwnedWriteHalf,
    /// Every request sent, in order, for the receiving half; its capacity is the window.
    tx: tokio::sync::mpsc::Sender<(u64, usize)>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    digest: crate::digest::SyncDigest,
}

/// Read and hash each local block from `from` on (off the async runtime, up to
/// `HASH_AHEAD` blocks at once) and ask the primary about it, at most `SYNC_WINDOW`
/// blocks ahead of the answers taken. Stops asking when the sync is paused or
/// stopped. Returns the write half for `SyncEnd`.
async fn send_sync_requests(mut s: SyncSender) -> Result<tokio::net::tcp::OwnedWriteHalf> {
    type Hashed = tokio::task::JoinHandle<(Vec<u8>, std::io::Result<String>)>;
    let mut hashing: VecDeque<(u64, usize, Hashed)> = VecDeque::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut next = s.from;
    loop {
        // Keep HASH_AHEAD blocks being read and hashed.
        while hashing.len() < HASH_AHEAD && next < s.size {
            let len = SYNC_BLOCK.min(s.size - next) as usize;
            let mut buf = spare
                .pop()
                .unwrap_or_else(|| vec![0u8; SYNC_BLOCK as usize]);
            let (disk, off, alg) = (s.disk.clone(), next, s.digest);
            let task = tokio::task::spawn_blocking(move || {
                let r = disk
                    .read_exact_at(&mut buf[..len], off)
                    .map(|()| alg.digest(&buf[..len]));
                (buf, r)
            });
            hashing.push_back((next, len, task));
            next += len as u64;
        }
        let Some((off, len, task)) = hashing.pop_front() else {
            break; // every block asked for
        };
        let Ok(permit) = s.tx.reserve().await else {
            break; // the receiving half gave up
        };
        if s.stop.load(Ordering::Acquire) || s.pause.load(Ordering::Acquire) {
            break;
        }
        let (buf, digest) = task.await?;
        spare.push(buf);
        let digest =
            digest.with_context(|| format!("reading block at {off} of {}", s.path.display()))?;
        write_msg(
            &mut s.wr,
            &Msg::SyncBlock {
                res: s.res.clone(),
                offset: off,
                len: len as u32,
                digest,
            },
        )
        .await?;
        permit.send((off, len));
    }
    Ok(s.wr)
}

/// Replay persists its position (a disk sync) at most this often, besides every
/// `PERSIST_WINDOW` of log and when it stops.
const REPLAY_PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Local blocks read and hashed at once by a joining member.
const HASH_AHEAD: usize = 2;
/// Answered blocks a joining member keeps before it waits for the oldest one's write
/// (so at most this many plus one writes to its disk at once).
const WRITE_AHEAD: usize = 4;

/// A former primary's directory after `demote`: its disk is the image at
/// `pos`, no sync is needed, replay continues from there.
pub fn mark_synced(dir: &std::path::Path, pos: u64) -> Result<()> {
    write_sync(
        dir,
        &SyncState {
            format: 1,
            start_pos: pos,
            next_offset: 0,
            end_pos: None,
            done: true,
            source: None,
            base: None,
        },
    )
}

/// Where replay starts on this member, once its full sync is done (None while
/// a sync is unfinished or was never started: the disk is no image then).
pub fn synced_start(dir: &std::path::Path) -> Option<u64> {
    read_sync(dir)
        .ok()
        .flatten()
        .filter(|s| s.done)
        .map(|s| s.start_pos)
}

/// Forget the sync state (a new primary, or `invalidate`).
pub fn clear_sync(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(dir.join(SYNC_FILE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The replay position persisted in `dir`, if any.
pub fn persisted_replayed(dir: &std::path::Path) -> Option<u64> {
    #[derive(Deserialize)]
    struct R {
        pos: u64,
    }
    let b = std::fs::read(dir.join(mars_logger::replay::REPLAYED_FILE)).ok()?;
    serde_json::from_slice::<R>(&b).ok().map(|r| r.pos)
}

impl Secondary {
    /// The outcome of a transfer or replay round: its error (logged once while it
    /// repeats) goes to, or is cleared from, the `slot` of `view`. Returns whether
    /// the loop should wait before the next round.
    fn note_round(
        &self,
        r: Result<bool>,
        slot: impl FnOnce(&mut Progress) -> &mut Option<String>,
    ) -> bool {
        let mut p = self.progress.lock();
        let slot = slot(&mut p);
        match r {
            Ok(idle) => {
                *slot = None;
                idle
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if slot.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(resource = %self.res, "secondary: {msg}");
                }
                *slot = Some(msg);
                true
            }
        }
    }

    pub async fn run(self) {
        let mut replayer: Option<Replayer> = None;
        if let Some(pos) = persisted_replayed(&self.dir) {
            let mut p = self.progress.lock();
            p.replayed = pos;
            p.replayed_durable = pos;
            p.fetched = p.fetched.max(pos);
        }
        // Until the sync state says otherwise, this disk is not a consistent image.
        match read_sync(&self.dir) {
            Ok(Some(sync)) if sync.done => {
                let mut p = self.progress.lock();
                p.syncing = false;
                p.consistent_from = sync.end_pos;
            }
            Ok(Some(sync)) => {
                let mut p = self.progress.lock();
                p.syncing = true;
                p.sync_done = sync.next_offset;
                p.sync_total = self.size;
            }
            _ => {
                let mut p = self.progress.lock();
                p.syncing = true;
                p.sync_total = self.size;
            }
        }
        // Sync and fetch in one loop, replay in another, concurrently: a
        // secondary applies what it has while it fetches more.
        let wake = tokio::sync::Notify::new();
        let transfer = async {
            while !self.stop.load(Ordering::Acquire) {
                let r = self.transfer_round(&wake).await;
                let idle = self.note_round(r, |p| &mut p.error);
                if idle {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            wake.notify_one();
        };
        let replay = async {
            while !self.stop.load(Ordering::Acquire) {
                let r = self.replay_round(&mut replayer).await;
                let idle = self.note_round(r, |p| &mut p.replay_error);
                if idle {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
            if let Some(mut r) = replayer.take() {
                let _ = tokio::task::spawn_blocking(move || r.persist()).await;
            }
        };
        tokio::join!(transfer, replay);
    }

    /// The member to sync from: the designated primary when it is reachable, else
    /// the reachable member with a consistent disk (up to date or behind, no split
    /// brain, not cut off, replay not stopped) that has replayed the most; it serves
    /// its disk and the joiner replays the log from where that disk was.
    /// Also says whether every candidate failed a moment ago (the one returned is
    /// asked again: the member shows itself without a source meanwhile).
    fn sync_source(&self) -> Result<(String, bool)> {
        let store = self.peer.store.lock();
        let p = meta::designated_primary(&store, &self.res)
            .ok_or_else(|| anyhow!("no designated primary"))?;
        if p == self.me {
            bail!("this node is the designated primary but its disk is not up to date");
        }
        let now = std::time::Instant::now();
        let mut avoid = self.avoid_sources.lock();
        avoid.retain(|_, until| *until > now);
        let primary_alive = self.peer.is_alive(&p);
        if primary_alive && !avoid.contains_key(&p) {
            return Ok((p, false));
        }
        // The primary is away, or alive in the cluster's view but this node could
        // not connect to it a moment ago (a cut between the two alone).
        let other = consistent_member(&store, &self.res, |m| {
            m != self.me && m != p && self.peer.is_alive(m) && !avoid.contains_key(m)
        });
        match other {
            Some(m) => Ok((m, false)),
            None if primary_alive => Ok((p, true)),
            None => Err(anyhow!(
                "primary {p} is not reachable, and no reachable member has a consistent disk to copy: the sync waits for one (`marsadm view` shows which members are alive)"
            )),
        }
    }

    /// The member to fetch logfiles from: the designated primary when it is
    /// reachable, else the reachable member that holds the most of the log (a
    /// member that still writes the log first: during a handover that is the
    /// old primary). A member that failed as a source a moment ago is passed over
    /// while another can be asked: "reachable" is the cluster's view, and a link
    /// cut between this node and the primary alone leaves the primary alive in it
    /// (the others still reach it); the log then comes through another member.
    fn fetch_source(&self) -> Result<(String, bool)> {
        let now = std::time::Instant::now();
        let mut avoid = self.fetch_avoid.lock();
        avoid.retain(|_, (until, _)| *until > now);
        let mut candidates: Vec<String> = Vec::new();
        if let Some(p) = self.prefer_source.lock().clone() {
            candidates.push(p);
        }
        let store = self.peer.store.lock();
        if let Some(p) = meta::designated_primary(&store, &self.res) {
            candidates.push(p);
        }
        let members = meta::resource(&store, &self.res)
            .map(|r| r.members)
            .unwrap_or_default();
        let mut others: Vec<((bool, u64), String)> = members
            .into_iter()
            .filter_map(|m| {
                let a: meta::ActualEntry = meta::get(&store, &meta::actual_key(&self.res, &m))?;
                // Not a member whose history parted from this one's, or that was cut
                // off (replay would refuse what it offers anyway).
                if a.split_brain || (a.emergency && a.role != "primary") {
                    return None;
                }
                let writes = a.logfile.is_some();
                let holds = if writes { a.written } else { a.fetched };
                Some(((writes, holds), m))
            })
            .collect();
        others.sort_by(|a, b| b.cmp(a));
        candidates.extend(others.into_iter().map(|(_, m)| m));
        candidates.retain(|m| *m != self.me && self.peer.is_alive(m));
        if let Some(m) = candidates.iter().find(|m| !avoid.contains_key(*m)) {
            return Ok((m.clone(), false));
        }
        // Every reachable member failed a moment ago: ask the first again, unless its
        // copy was damaged (then its error stays shown until the backoff ends).
        let first = candidates
            .into_iter()
            .next()
            .ok_or_else(|| {
                anyhow!("no reachable member to fetch the log from: every other member is down or cut off from this node (`marsadm view` shows which are alive); fetch goes on when one is back")
            })?;
        if let Some((_, Some(refused))) = avoid.get(&first) {
            bail!("{refused}");
        }
        Ok((first, true))
    }

    /// One round of transfer: sync if needed, then fetch what is new. Returns true when idle.
    async fn transfer_round(&self, wake: &tokio::sync::Notify) -> Result<bool> {
        let mut sync = read_sync(&self.dir)?.unwrap_or(SyncState {
            format: 1,
            ..Default::default()
        });
        if !sync.done {
            if self.pause_sync.load(Ordering::Acquire) {
                // Not looking for a source while paused: nothing to say about one.
                self.progress.lock().sync_waits_for_source = false;
                return Ok(true);
            }
            self.sync_round(&mut sync).await?;
        }
        if self.pause_fetch.load(Ordering::Acquire) {
            self.progress.lock().fetch_waits_for_source = false;
            return Ok(true);
        }
        self.fetch_round(&sync, wake).await
    }

    /// Copy the disk from a source (see `full_sync`); after a failure, pass the
    /// source over for a while so that another one is asked. A secondary that could
    /// not serve (its replay stopped, it went away) for AVOID_SOURCE; the primary
    /// only when it could not even be connected to, at once when nothing is copied
    /// yet, else after PRIMARY_PATIENCE of that: a sync that moves to another
    /// source starts over from the first block (a primary restarting is back
    /// sooner).
    async fn sync_round(&self, sync: &mut SyncState) -> Result<()> {
        let source = self.sync_source();
        self.progress.lock().sync_waits_for_source =
            source.as_ref().map_or(true, |(_, all_failed)| *all_failed);
        let (source, _) = source?;
        let result = self.full_sync(&source, sync).await;
        // Since when the source could not be connected to (none: it could).
        let unreachable_since = {
            let mut u = self.sync_unreachable.lock();
            match &result {
                Err(e) if e.is::<SourceUnreachable>() => Some(
                    *u.entry(source.clone())
                        .or_insert_with(std::time::Instant::now),
                ),
                _ => {
                    u.remove(&source);
                    None
                }
            }
        };
        let Err(e) = result else {
            return Ok(());
        };
        let designated = meta::designated_primary(&self.peer.store.lock(), &self.res);
        let halted = self.stop.load(Ordering::Acquire) || self.pause_sync.load(Ordering::Acquire);
        let primary = designated.as_deref() == Some(source.as_str());
        let give_up_on_primary = unreachable_since
            .is_some_and(|since| sync.next_offset == 0 || since.elapsed() >= PRIMARY_PATIENCE);
        if !halted && (!primary || give_up_on_primary) {
            let wait = if primary { AVOID_FAILED } else { AVOID_SOURCE };
            self.avoid_sources
                .lock()
                .insert(source, std::time::Instant::now() + wait);
        }
        Err(e)
    }

    /// Fetch from a source what it has beyond this node's copies (see `fetch`).
    /// Returns true when there was nothing. After a failure the source is passed
    /// over for a while, so that another member is asked, if there is one; a
    /// source whose copy was refused on arrival is not asked again before the
    /// backoff ends (asking at once would read and send the same chunks ten times
    /// a second), and its refusal stays the error shown while no other member
    /// gets further.
    async fn fetch_round(&self, sync: &SyncState, wake: &tokio::sync::Notify) -> Result<bool> {
        let (source, all_failed) = match self.fetch_source() {
            Ok(found) => found,
            Err(e) => {
                let mut p = self.progress.lock();
                p.source = None;
                p.source_complete = false;
                p.fetch_waits_for_source = true;
                drop(p);
                // Shown (and logged once) until a member can be reached again.
                return Err(e.context("fetch"));
            }
        };
        self.progress.lock().fetch_waits_for_source = all_failed;
        let from = self.progress.lock().replayed.max(sync.start_pos);
        let got = match self.fetch(&source, from, wake).await {
            Ok(got) => got,
            Err(e) => {
                let halted =
                    self.stop.load(Ordering::Acquire) || self.pause_fetch.load(Ordering::Acquire);
                if !halted {
                    let refused = e.is::<ArrivalRefused>().then(|| format!("{e:#}"));
                    let wait = if refused.is_some() {
                        FETCH_BACKOFF
                    } else {
                        AVOID_FAILED
                    };
                    self.fetch_avoid
                        .lock()
                        .insert(source, (std::time::Instant::now() + wait, refused));
                }
                return Err(e);
            }
        };
        if got > 0 {
            wake.notify_one();
            return Ok(false);
        }
        let now = std::time::Instant::now();
        let refused = self
            .fetch_avoid
            .lock()
            .values()
            .find_map(|(until, r)| r.clone().filter(|_| *until > now));
        if let Some(r) = refused {
            bail!("{r}");
        }
        Ok(true)
    }

    /// One replay step (at most 64 MiB) once the sync is done. Returns true when idle.
    async fn replay_round(&self, replayer: &mut Option<Replayer>) -> Result<bool> {
        let sync = match read_sync(&self.dir)? {
            Some(s) if s.done => s,
            _ => return Ok(true), // the disk is not a base for replay yet
        };
        // Announce the step before looking at the pause flag: pause-replay sets the flag,
        // then waits while `replaying` is set, so it never returns while a step runs.
        // The guard clears it when the round ends, whichever way.
        let _announced = Replaying::announce(&self.progress);
        let r = match replayer.take() {
            Some(r) => r,
            // Opened also while paused: what it finds (the position, and after a
            // reboot how far the disk is not a consistent image) is what the member
            // reports; a member restarted with replay paused showed `syncing` until
            // resumed.
            None => self.open_replayer(sync.start_pos).await?,
        };
        if self.pause_replay.load(Ordering::Acquire) {
            // Paused: what was applied is made durable (the disk synced, the position
            // persisted), so that the logfiles before it may go while replay waits.
            let (r, persisted) = if r.position() > r.persisted_position() {
                tokio::task::spawn_blocking(move || {
                    let mut r = r;
                    let p = r.persist();
                    (r, p)
                })
                .await?
            } else {
                (r, Ok(()))
            };
            self.progress.lock().replayed_durable = r.persisted_position();
            *replayer = Some(r);
            persisted.map_err(|e| anyhow!("persisting the replay position: {e}"))?;
            return Ok(true);
        }
        let mut r = r;
        let designated = meta::designated_primary(&self.peer.store.lock(), &self.res);
        let lineage = self.lineage.lock().clone();
        match lineage {
            Some((d, _))
                if !mars_logger::history::list_usable(d.as_deref(), designated.as_deref()) =>
            {
                self.progress.lock().history_unconfirmed = true;
                *replayer = Some(r);
                return Ok(true);
            }
            Some((_, l)) => r.set_lineage(Some(l)),
            None => r.set_lineage(None),
        }
        let (r, outcome) = tokio::task::spawn_blocking(move || {
            let mut r = r;
            let o = r.step(64 << 20);
            // Not after every step: a secondary that keeps up takes a few records
            // per round, and a disk sync per round flooded the shared device with
            // flushes (the window still persists within every 128 MiB).
            let p = r.persist_if_due(REPLAY_PERSIST_INTERVAL);
            (r, o.and_then(|o| p.map(|_| o)))
        })
        .await?;
        tracing::debug!(
            resource = %self.res,
            replayed = r.position(),
            from_memory = r.bytes_from_memory(),
            "replay step"
        );
        let pos = r.position();
        let mut halted = None;
        {
            let mut p = self.progress.lock();
            if let Some(h) = r.halted() {
                // Set together, so that a view never shows one without the other.
                p.split_brain |= matches!(h, mars_logger::replay::Halt::SplitBrain { .. });
                let msg = format!("replay stopped: {h}");
                p.replay_error = Some(msg.clone());
                halted = Some(msg);
            }
            p.replayed = pos;
            p.replayed_durable = r.persisted_position();
            if p.consistent_from.is_some_and(|end| pos >= end) {
                p.consistent_from = None;
            }
            p.history_unconfirmed = halted.is_some();
        }
        *replayer = Some(r);
        if let Some(msg) = halted {
            // An error, so that the round does not clear what it just reported
            // (the step that halts returns Ok; a view in between showed
            // split_brain without its error).
            bail!("{msg}");
        }
        let o = outcome.map_err(|e| anyhow!("{e}"))?;
        Ok(o.idle || o.records == 0)
    }

    /// Open replay's state from the sync's start position and report what it found.
    async fn open_replayer(&self, start: u64) -> Result<Replayer> {
        let (dir, me, disk, size) = (
            self.dir.clone(),
            self.me.clone(),
            self.disk.clone(),
            self.size,
        );
        let mut r = tokio::task::spawn_blocking(move || {
            // Records are bounded by what the disk holds, not by the resource size
            // this node knows: after a `resize` the primary's first records beyond
            // the old end may arrive before the new size does.
            let bound = mars_logger::disk::disk_size(&disk)
                .unwrap_or(size)
                .max(size);
            Replayer::open(&dir, &me, &disk, bound, start)
        })
        .await??;
        r.use_fetched(self.fetched.clone());
        r.set_background_sync(true);
        let mut p = self.progress.lock();
        // After a reboot, unsynced writes of replay may be partly on the disk.
        if let Some(until) = r.inconsistent_until() {
            p.consistent_from = Some(p.consistent_from.map_or(until, |c| c.max(until)));
        }
        p.replayed = r.position();
        p.replayed_durable = r.persisted_position();
        p.replay_opened = true;
        if p.consistent_from.is_some_and(|end| r.position() >= end) {
            p.consistent_from = None;
        }
        Ok(r)
    }

    async fn full_sync(&self, source: &str, sync: &mut SyncState) -> Result<()> {
        let mut s = IdleTimeout::new(
            self.peer
                .connect(source)
                .await
                .map_err(|e| SourceUnreachable(format!("{e:#}")))?,
        );
        self.progress.lock().sync_waits_for_source = false; // it answers
                                                            // Asked on every (re)start: the blocks copied so far are an image at or after
                                                            // `start_pos` of the history `source` holds; the copy goes on only where the
                                                            // source is the same and its position did not go back (a primary that lost
                                                            // its unsynced tail in a crash, a secondary after a reboot). Else it starts
                                                            // over: blocks from another source may hold records the new one never had
                                                            // (the digests keep that cheap where the disks agree).
        write_msg(
            &mut s,
            &Msg::SyncStart {
                res: self.res.clone(),
            },
        )
        .await?;
        let (pos, base) = match answer_from(source, read_msg(&mut s)).await? {
            Msg::SyncInfo { pos, size, logfile } if size == self.size => (pos, logfile),
            Msg::SyncInfo { size, .. } => {
                bail!(
                    "sync source {source} has size {size}, expected {}",
                    self.size
                )
            }
            Msg::Refused { reason } => {
                bail!("sync source {source} refused the sync: {reason}")
            }
            other => bail!("unexpected answer to SyncStart: {other:?}"),
        };
        let same_source = match &sync.source {
            Some(src) => src == source,
            None => {
                meta::designated_primary(&self.peer.store.lock(), &self.res).as_deref()
                    == Some(source)
            }
        };
        let resumable = sync.next_offset > 0 && same_source && pos >= sync.start_pos;
        if !resumable {
            if sync.next_offset > 0 {
                tracing::info!(resource = %self.res, from = %source, was = ?sync.source, start_pos = sync.start_pos, pos, "full sync: another source, or its position went back: copying again from the first block");
            }
            sync.next_offset = 0;
            sync.start_pos = pos;
            sync.base = base;
            sync.source = Some(source.to_string());
            // A new sync: nothing replayed before counts (nor its high-water mark).
            mars_logger::replay::forget(&self.dir)?;
            write_sync(&self.dir, sync)?;
        }
        {
            let mut p = self.progress.lock();
            p.syncing = true;
            p.sync_total = self.size;
            p.sync_done = sync.next_offset;
        }
        tracing::info!(resource = %self.res, from = %source, start_pos = sync.start_pos, offset = sync.next_offset, "full sync");
        let disk = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.disk)
                .with_context(|| format!("disk {}", self.disk.display()))?,
        );
        // Pipelined: a sender task reads and hashes the local blocks and keeps up to
        // SYNC_WINDOW `SyncBlock` requests in flight; this task takes the answers in
        // order (the source answers in order on the one connection), writes what
        // differs and advances `next_offset` over the completed prefix only.
        let (rd, wr) = s.into_inner().into_split();
        let mut rd = IdleTimeout::new(rd);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, usize)>(SYNC_WINDOW);
        let mut sender = AbortOnDrop(tokio::spawn(send_sync_requests(SyncSender {
            res: self.res.clone(),
            disk: disk.clone(),
            path: self.disk.clone(),
            size: self.size,
            from: sync.next_offset,
            wr,
            tx,
            stop: self.stop.clone(),
            pause: self.pause_sync.clone(),
            digest: self.sync_digest,
        })));
        let halted =
            || self.stop.load(Ordering::Acquire) || self.pause_sync.load(Ordering::Acquire);
        let mut blocks = 0u64;
        let (started, from) = (std::time::Instant::now(), sync.next_offset);
        let mut throttle = Throttle::new(self.sync_rate.clone());
        // At most one background persist at a time (see `spawn_persist_sync`).
        let mut persisting: Option<tokio::task::JoinHandle<Result<()>>> = None;
        let mut last_persist = std::time::Instant::now();
        // Blocks answered, in order: where each ends, and its write to the local disk
        // (None for an equal block). `next_offset` passes a block once it and all
        // before it are written.
        // A write gives its buffer back for the next block received.
        type BlockWrite = tokio::task::JoinHandle<(AlignedBuf, std::io::Result<()>)>;
        let mut answered: VecDeque<(u64, Option<BlockWrite>)> = VecDeque::new();
        let mut buffers: Vec<AlignedBuf> = Vec::new();
        // Blocks are written with O_DIRECT where the file system allows it: no copy
        // into the page cache (the periodic disk sync writes them out anyway).
        let direct = open_direct(&self.disk).map(Arc::new);
        let disk_name = self.disk.display().to_string();
        let written =
            |r: std::result::Result<(AlignedBuf, std::io::Result<()>), tokio::task::JoinError>,
             end: u64| {
                r.map_err(anyhow::Error::from)
                    .and_then(|(buf, r)| r.map(|()| buf).map_err(anyhow::Error::from))
                    .with_context(|| format!("writing the block before {end} to {disk_name}"))
            };
        let copied: Result<()> = async {
            loop {
                if halted() {
                    bail!("sync paused or stopped at offset {}", sync.next_offset);
                }
                // Completed blocks at the front move the position on.
                let mut moved = false;
                while let Some((_, w)) = answered.front() {
                    let wait = answered.len() > WRITE_AHEAD;
                    if w.as_ref().is_some_and(|h| !h.is_finished()) && !wait {
                        break;
                    }
                    let Some((end, w)) = answered.pop_front() else {
                        break;
                    };
                    if let Some(h) = w {
                        buffers.push(written(h.await, end)?);
                    }
                    sync.next_offset = end;
                    moved = true;
                }
                // None: the sender asked for every block, or stopped (paused, or failed).
                let Some((off, len)) = rx.recv().await else {
                    // Wait for the last writes.
                    while let Some((end, w)) = answered.pop_front() {
                        if let Some(h) = w {
                            written(h.await, end)?;
                        }
                        sync.next_offset = end;
                    }
                    break;
                };
                match answer_from(source, read_msg(&mut rd)).await? {
                    Msg::Same => answered.push_back((off + len as u64, None)),
                    Msg::BlockData { offset, len: n } if offset == off && n as usize == len => {
                        let mut block = buffers
                            .pop()
                            .unwrap_or_else(|| AlignedBuf::new(SYNC_BLOCK as usize));
                        let got = answer_from(source, read_data_into_slice(&mut rd, block.room()))
                            .await?;
                        if got != len {
                            bail!("{source} sent {got} bytes for a block of {len}");
                        }
                        let (d, dd) = (disk.clone(), direct.clone());
                        let w = tokio::task::spawn_blocking(move || {
                            let r = write_block(&d, dd.as_deref(), &block.room()[..len], off);
                            (block, r)
                        });
                        answered.push_back((off + len as u64, Some(w)));
                        self.progress.lock().blocks_transferred += 1;
                        throttle.spend(len as u64).await;
                    }
                    Msg::Refused { reason } => bail!("sync source {source} refused: {reason}"),
                    other => bail!("unexpected answer to SyncBlock at {off}: {other:?}"),
                }
                if !moved {
                    continue;
                }
                {
                    let mut p = self.progress.lock();
                    p.sync_done = sync.next_offset;
                    let secs = started.elapsed().as_secs_f64();
                    if secs > 0.0 {
                        p.sync_rate = ((sync.next_offset - from) as f64 / secs) as u64;
                    }
                }
                blocks += 1;
                // Every 64 blocks, and every second when that takes longer (a slow or
                // rate-limited sync still makes progress that survives a crash).
                if blocks.is_multiple_of(64) || last_persist.elapsed() >= PERSIST_EVERY {
                    last_persist = std::time::Instant::now();
                    if let Some(p) = persisting.take() {
                        p.await??;
                    }
                    persisting = Some(spawn_persist_sync(&disk, &self.dir, sync));
                }
            }
            if sync.next_offset < self.size && halted() {
                bail!("sync paused or stopped at offset {}", sync.next_offset);
            }
            Ok(())
        }
        .await;
        // Writes still running after an error or a pause end here: none may land
        // after this sync returns (a later sync could have copied the block anew).
        for (_, w) in answered.drain(..) {
            if let Some(h) = w {
                let _ = h.await;
            }
        }
        // The last background persist ends before the final one (never a step back).
        let copied = match persisting.take() {
            Some(p) => copied.and(p.await.map_err(anyhow::Error::from).and_then(|r| r)),
            None => copied,
        };
        let wr = match copied {
            Ok(()) => match (&mut sender.0).await? {
                // Every block asked for was answered and written: all is copied.
                Ok(wr) if sync.next_offset == self.size => Ok(wr),
                Ok(_) => Err(anyhow!(
                    "sync paused or stopped at offset {}",
                    sync.next_offset
                )),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let mut wr = match wr {
            Ok(wr) => wr,
            Err(e) => {
                // Keep what was completed: a prefix of written blocks, made durable first.
                drop(sender);
                if let Err(p) = spawn_persist_sync(&disk, &self.dir, sync)
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r)
                {
                    tracing::warn!(resource = %self.res, "saving the sync position: {p:#}");
                }
                return Err(e);
            }
        };
        spawn_persist_sync(&disk, &self.dir, sync).await??;
        write_msg(
            &mut wr,
            &Msg::SyncEnd {
                res: self.res.clone(),
            },
        )
        .await?;
        let end = match answer_from(source, read_msg(&mut rd)).await? {
            Msg::SyncInfo { pos, .. } => pos,
            other => bail!("unexpected answer to SyncEnd: {other:?}"),
        };
        sync.end_pos = Some(end);
        // Replay begins in the source's logfile that held the start position.
        if let Some(base) = sync.base.clone() {
            mars_logger::replay::begin_at(&self.dir, sync.start_pos, base)?;
        }
        sync.done = true;
        write_sync(&self.dir, sync)?;
        let mut p = self.progress.lock();
        p.syncing = false;
        p.consistent_from = Some(end);
        tracing::info!(resource = %self.res, end_pos = end, blocks = p.blocks_transferred, "full sync copied; replaying from its start");
        Ok(())
    }

    /// The arrival check of logfile `name` (number `seq`) stored up to `local` bytes
    /// in `out`: where the last round left it, or resumed from the stored copy.
    async fn arrival_check(
        &self,
        name: &str,
        seq: u64,
        out: &Arc<std::fs::File>,
        local: u64,
    ) -> Result<ArrivalCheck> {
        let kept = self.arrivals.lock().remove(name);
        if let Some(c) = kept.filter(|c| c.at() == local) {
            return Ok(c);
        }
        let o = out.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            ArrivalCheck::resume(seq, local, |off, buf| o.read_exact_at(buf, off))
        })
        .await?
        .map_err(|e| match e {
            mars_logfmt::ArrivalError::Read { .. } => anyhow!("the stored copy of {name}: {e}"),
            e => anyhow!(
                "the stored copy of {name} is damaged ({e}): replay stops there too; `marsadm invalidate {}` copies the disk anew",
                self.res
            ),
        })
    }

    /// Whether the local file at `path` is a copy of the source's logfile `f`
    /// (its header says the same start position and creation time), asked before fetch appends to
    /// it. A logfile of the same name from another history (its writer's life
    /// before a failover) is set aside as `orphan-...` when replay never
    /// entered it (false: fetch it anew); one replay is in or passed makes this
    /// member's history another one.
    async fn same_logfile(
        &self,
        path: &std::path::Path,
        f: &mars_proto::LogFileInfo,
        replay_pos: u64,
    ) -> Result<bool> {
        let p = path.to_path_buf();
        let header =
            tokio::task::spawn_blocking(move || crate::daemon::logfile_header(&p).ok()).await?;
        // The creation time tells two logfiles of one name and start apart (0:
        // an older source that does not send it).
        let same = |h: &mars_logfmt::FileHeader| {
            h.start_pos == f.start_pos && (f.created_ns == 0 || h.created_ns == f.created_ns)
        };
        match header.map(|h| (same(&h), h.start_pos)) {
            Some((true, _)) => Ok(true),
            Some((false, start)) if replay_pos > start => {
                self.progress.lock().split_brain = true;
                bail!(
                    "split brain: the local {} (from log position {start}) is another logfile than the source's of that name (from {}), and replay applied it; `marsadm invalidate {}` copies the disk anew",
                    f.name,
                    f.start_pos,
                    self.res
                )
            }
            _ => {
                let to = self
                    .dir
                    .join(format!("{}{}", mars_logger::replay::ORPHAN_PREFIX, f.name));
                tracing::warn!(resource = %self.res, logfile = %f.name, "a local logfile of that name is another history's: set aside as {}", to.display());
                std::fs::rename(path, &to)?;
                self.arrivals.lock().remove(&f.name);
                Ok(false)
            }
        }
    }

    /// Fetch what `primary` has beyond this node's copies. Returns the bytes
    /// fetched; `wake` tells replay of every chunk written (it takes it from memory
    /// while it is there).
    async fn fetch(
        &self,
        primary: &str,
        replay_pos: u64,
        wake: &tokio::sync::Notify,
    ) -> Result<u64> {
        let mut s = IdleTimeout::new(self.peer.connect(primary).await?);
        self.progress.lock().fetch_waits_for_source = false; // it answers
        write_msg(
            &mut s,
            &Msg::LogList {
                res: self.res.clone(),
            },
        )
        .await?;
        let (files, versions, open) = match answer_from(primary, read_msg(&mut s)).await? {
            Msg::Logs {
                files,
                versions,
                open,
            } => (files, versions, open),
            Msg::Refused { reason } => bail!("{primary} refused: {reason}"),
            other => bail!("unexpected answer to LogList: {other:?}"),
        };
        for (name, json) in versions {
            let parsed = mars_logfmt::parse_logfile_name(
                name.strip_prefix("version-")
                    .map(|r| format!("log-{r}"))
                    .as_deref()
                    .unwrap_or(""),
            );
            match parsed {
                None => continue,
                // This node's own history is never taken from another.
                Some(n) if n.node == self.me => continue,
                Some(_) => {}
            }
            let path = self.dir.join(&name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(json.as_str())
                && mars_logfmt::Version::from_json(&json).is_ok()
            {
                mars_logger::crashsafe::write_atomic(&path, json.as_bytes())?;
            }
        }
        let mut fetched = 0u64;
        let mut end = 0u64;
        let mut complete = !open;
        let mut throttle = Throttle::new(self.fetch_rate.clone());
        // Files before the one that holds the records up to the replay position
        // are not needed (a full sync began after them); that one (where a full
        // sync's history begins, also when it ends exactly there) and all later
        // ones are.
        let first_needed = files
            .iter()
            .rposition(|f| f.start_pos < replay_pos)
            .unwrap_or(0);
        if let Some(first) = files.first() {
            // What the local copies hold (fetched in order, so contiguous from replay_pos).
            let local_end = crate::daemon::local_log_end(&self.dir).max(replay_pos);
            if first.start_pos > local_end {
                // Only the primary's deletions cut this member off; another member
                // may simply have joined later (asked when the primary failed).
                let designated = meta::designated_primary(&self.peer.store.lock(), &self.res);
                if designated.as_deref() != Some(primary) {
                    bail!(
                        "{primary} does not hold the log from position {replay_pos} on (its oldest logfile {} starts at {})",
                        first.name,
                        first.start_pos
                    );
                }
                self.progress.lock().cut_off = true;
                bail!(
                    "{primary} no longer has the log from position {replay_pos} on (its oldest logfile {} starts at {}; deleted in emergency mode?): run `marsadm invalidate {}` here for a full sync",
                    first.name,
                    first.start_pos,
                    self.res
                );
            }
        }
        self.progress.lock().cut_off = false;
        {
            let designated = meta::designated_primary(&self.peer.store.lock(), &self.res);
            let listed: Vec<mars_logger::history::Listed> = files
                .iter()
                .map(|f| mars_logger::history::Listed {
                    name: f.name.clone(),
                    start: f.start_pos,
                    end: f.start_pos + f.len.saturating_sub(mars_logfmt::FILE_HEADER_LEN as u64),
                })
                .collect();
            let from_primary = designated.as_deref() == Some(primary);
            let mut l = self.lineage.lock();
            let same = l.as_ref().is_some_and(|(d, old)| {
                *d == designated
                    && old.from_primary == from_primary
                    && old.files.len() == listed.len()
                    && old
                        .files
                        .iter()
                        .zip(&listed)
                        .all(|(a, b)| a.name == b.name && a.start == b.start)
            });
            if !same {
                // Until replay has looked at the new list.
                self.progress.lock().history_unconfirmed = true;
            }
            let lineage = mars_logger::history::Lineage {
                files: listed,
                from_primary,
            };
            *l = Some((designated, lineage));
        }
        // Checks of logfiles the source no longer lists (deleted) are dropped.
        {
            let listed: std::collections::HashSet<&str> =
                files.iter().map(|f| f.name.as_str()).collect();
            self.arrivals
                .lock()
                .retain(|name, _| listed.contains(name.as_str()));
        }
        for (i, f) in files.into_iter().enumerate() {
            let Some(file_seq) = mars_logfmt::parse_logfile_name(&f.name).map(|n| n.seq) else {
                bail!("{primary} listed a bad logfile name {:?}", f.name);
            };
            let path = self.dir.join(&f.name);
            let mut local = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if local == 0 && i < first_needed {
                continue;
            }
            if local > 0 && local < f.len && !self.same_logfile(&path, &f, replay_pos).await? {
                local = 0;
            }
            let out = Arc::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .read(true) // the arrival check resumes from what is stored
                    .write(true)
                    .truncate(false)
                    .open(&path)?,
            );
            // Aligned chunks go with O_DIRECT: a fetched logfile is read back only
            // where replay finds no chunk in memory (`FetchedChunks`), and copying every
            // fetched byte into new page-cache pages was the largest cost of a catch-up.
            let direct = open_direct(&path).map(Arc::new);
            // Every record is checked as it arrives, before it is stored (the check
            // of this file goes with the chunk being written and comes back with it).
            // Only for a file with something to fetch: resuming walks the stored copy.
            let mut check = if local < f.len {
                Some(self.arrival_check(&f.name, file_seq, &out, local).await?)
            } else {
                None
            };
            // The chunk being written (off the runtime, while the next one arrives),
            // and the local length once it is written.
            type Writing = tokio::task::JoinHandle<Result<ArrivalCheck>>;
            let mut writing: Option<(Writing, u64)> = None;
            let show_fetched = |local: u64| {
                let reached =
                    f.start_pos + local.saturating_sub(mars_logfmt::FILE_HEADER_LEN as u64);
                let mut p = self.progress.lock();
                p.fetched = p.fetched.max(reached);
                drop(p);
                wake.notify_one();
            };
            // Up to FETCH_WINDOW requests in flight: the source reads the next
            // chunk while this node writes the last one.
            let max = match self.fetch_rate.load(Ordering::Acquire) {
                0 => FETCH_CHUNK,
                // Small chunks under a low rate limit keep the stream smooth.
                // A multiple of the alignment, so that chunks stay aligned (O_DIRECT).
                r => {
                    ((r / 4).clamp(64 << 10, FETCH_CHUNK as u64) / DIRECT_ALIGN as u64
                        * DIRECT_ALIGN as u64) as u32
                }
            };
            let mut next = local;
            let mut allocated = local;
            let mut more = true;
            let mut pending = std::collections::VecDeque::new();
            let streamed: Result<()> = async {
                loop {
                    if self.stop.load(Ordering::Acquire) || self.pause_fetch.load(Ordering::Acquire)
                    {
                        more = false; // pause-fetch / disconnect: stop between chunks
                    }
                    while more && pending.len() < FETCH_WINDOW && next < f.len {
                        // A request from an unaligned place (a fetch that resumes after a
                        // short chunk) ends on an alignment boundary, so that the chunks
                        // after it can be written with O_DIRECT.
                        let ask = max - (next % DIRECT_ALIGN as u64) as u32;
                        write_msg(
                            &mut s,
                            &Msg::Fetch {
                                res: self.res.clone(),
                                file: f.name.clone(),
                                offset: next,
                                max: ask,
                            },
                        )
                        .await?;
                        pending.push_back((next, ask));
                        next += ask as u64;
                    }
                    let Some((want, asked)) = pending.pop_front() else {
                        break;
                    };
                    match answer_from(primary, read_msg(&mut s)).await? {
                        Msg::Chunk { offset, len, .. } if offset == want => {
                            if len > asked {
                                bail!(
                                    "{primary} sent a chunk of {len} bytes where at most \
                                     {asked} were asked"
                                );
                            }
                            // Chunk buffers come back from replay (or were not kept) and
                            // are used again: no allocation, zeroing or page faults per chunk.
                            let mut data = self.fetched.buffer(max as usize);
                            let got =
                                answer_from(primary, read_data_into_slice(&mut s, data.room()))
                                    .await?;
                            if got != len as usize {
                                bail!("{primary} announced {len} bytes and sent {got}");
                            }
                            data.set_len(got);
                            if offset != local {
                                self.fetched.give_back(data);
                                continue; // after a short chunk: the rest of the window is moot
                            }
                            if got < asked as usize {
                                more = false; // the source has no more of this file now
                            }
                            if got == 0 {
                                self.fetched.give_back(data);
                                continue;
                            }
                            if let Some((w, done)) = writing.take() {
                                check = Some(w.await??);
                                show_fetched(done);
                            }
                            let n = got as u64;
                            let (o, direct, at) = (out.clone(), direct.clone(), local);
                            // Blocks reserved ahead of the writes (see `FETCH_PREALLOC`).
                            let reserve = (at + n > allocated).then(|| {
                                let from = allocated.max(at);
                                let to = if f.finished {
                                    f.len
                                } else {
                                    at + n + FETCH_PREALLOC
                                };
                                allocated = to.max(at + n);
                                (from, allocated - from)
                            });
                            let (chunks, seq, name) =
                                (self.fetched.clone(), file_seq, f.name.clone());
                            let replaying = !self.pause_replay.load(Ordering::Acquire);
                            let Some(mut c) = check.take() else {
                                bail!("no arrival check for {}", f.name); // made before asking
                            };
                            let source = primary.to_string();
                            writing = Some((
                                tokio::task::spawn_blocking(move || {
                                    c.feed(data.data())
                                        .map_err(|e| ArrivalRefused::new(&name, &source, e))?;
                                    if let Some((from, len)) = reserve {
                                        mars_logger::disk::preallocate(&o, from, len);
                                    }
                                    // Direct only when the chunk stays in memory for replay;
                                    // else (replay paused or far behind) through the page
                                    // cache, where replay finds it later without the device.
                                    let keep = if replaying {
                                        chunks.wait_room(
                                            seq,
                                            &name,
                                            at,
                                            data.capacity(),
                                            FETCH_ROOM_PATIENCE,
                                        )
                                    } else {
                                        chunks.has_room(seq, &name, at, data.capacity())
                                    };
                                    let direct = direct.as_deref().filter(|_| keep);
                                    write_fetched(&o, direct, data.data(), at)?;
                                    // Written: from now on these are the file's bytes there.
                                    chunks.offer(seq, &name, at, data);
                                    Ok(c)
                                }),
                                local + n,
                            ));
                            local += n;
                            fetched += n;
                            throttle.spend(n).await;
                        }
                        other => bail!("unexpected answer to Fetch: {other:?}"),
                    }
                }
                Ok(())
            }
            .await;
            // The chunk still being written ends here, also after an error: none may
            // land after this round returns (the next one may fetch from another member).
            if let Some((w, done)) = writing.take() {
                let written = w.await;
                if streamed.is_ok() {
                    check = Some(written??);
                    show_fetched(done);
                }
            }
            streamed?;
            if local >= f.len && f.finished {
                self.arrivals.lock().remove(&f.name); // all here: nothing more to check
            } else if let Some(c) = check {
                self.arrivals.lock().insert(f.name.clone(), c);
            }
            complete &= local >= f.len;
            end = end.max(f.start_pos + local.saturating_sub(mars_logfmt::FILE_HEADER_LEN as u64));
        }
        let mut p = self.progress.lock();
        if end > 0 {
            p.fetched = end;
        }
        p.source = Some(primary.to_string());
        p.source_complete = complete;
        Ok(fetched)
    }
}

#[cfg(test)]
mod tests {

    /// An answer that trickles in (a byte every 20 s, slower per message than the
    /// 30 s limit) is read whole; a source that sends nothing times out.
    #[tokio::test(start_paused = true)]
    async fn idle_timeout_restarts_with_every_byte() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut rx = IdleTimeout::new(rx);
        let writer = tokio::spawn(async move {
            for b in 1..=5u8 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                tx.write_all(&[b]).await.unwrap();
            }
            tx // kept open, silent
        });
        let mut got = [0u8; 5];
        rx.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        let _tx = writer.await.unwrap();
        let started = tokio::time::Instant::now();
        let err = rx.read_exact(&mut got[..1]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), ANSWER_TIMEOUT);
    }
    use super::*;

    #[test]
    fn the_lag_clock_survives_a_restart_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let mut c = LagClock::default();
        c.load_once(dir.path()); // no file yet: nothing
        c.observe(100, start);
        c.observe(200, start + Duration::from_secs(2));
        c.save_if_due(dir.path(), start + Duration::from_secs(2));
        // Another process: what it loads keeps the ages.
        let mut d = LagClock::default();
        d.load_once(dir.path());
        let now = std::time::Instant::now();
        let lag = d.lag(50, now);
        assert!(lag >= start.elapsed(), "{lag:?}");
        assert!(d.lag(150, now) + Duration::from_millis(1500) <= lag);
        assert_eq!(d.lag(200, now), Duration::ZERO);
        // Thousands of sightings: bounded, the oldest kept.
        for i in 0..3 * LAG_CLOCK_MAX as u64 {
            d.observe(1000 + i, now);
        }
        assert!(d.seen.len() <= LAG_CLOCK_MAX);
        assert_eq!(d.seen.front().map(|s| s.0), Some(100));
        // A damaged file is nothing to take up.
        std::fs::write(dir.path().join(LAG_CLOCK_FILE), "[[1,").unwrap();
        let mut e = LagClock::default();
        e.load_once(dir.path());
        assert!(e.seen.is_empty());
    }

    #[test]
    fn synced_blocks_land_whether_written_direct_or_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xEEu8; 1 << 20]).unwrap();
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let direct = open_direct(&path);
        let mut model = vec![0xEEu8; 1 << 20];
        let mut block = AlignedBuf::new(64 << 10);
        assert_eq!(block.room().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(block.room().len(), 64 << 10);
        // Aligned (direct where the file system allows it), unaligned offset, odd length.
        for (i, (off, len)) in [
            (0u64, 65536usize),
            (8192, 4096),
            (1000, 65536),
            (70000, 333),
        ]
        .into_iter()
        .enumerate()
        {
            let b = block.room();
            b[..len].fill(i as u8 + 1);
            write_block(&disk, direct.as_ref(), &b[..len], off).unwrap();
            model[off as usize..off as usize + len].fill(i as u8 + 1);
            // A buffered read right after sees it (the direct write dropped cached pages).
            let mut back = vec![0u8; len];
            disk.read_exact_at(&mut back, off).unwrap();
            assert!(back.iter().all(|&x| x == i as u8 + 1), "write {i}");
        }
        assert!(std::fs::read(&path).unwrap() == model);
    }

    /// A fetched logfile grows by chunks of any length at any place (a fetch resumes
    /// after a short chunk): aligned parts go direct, the rest buffered, and the file
    /// holds exactly the bytes sent, readable right after each write.
    #[test]
    fn fetched_chunks_land_exactly_at_any_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log-000000001-alpha");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let direct = open_direct(&path);
        assert!(
            direct.is_some(),
            "the test directory's file system refuses O_DIRECT: the direct path is untested"
        );
        let mut model = Vec::new();
        let mut buf = AlignedBuf::new(1 << 20);
        // Aligned full chunk, a short one with a tail, one up to the next boundary, an
        // aligned one with a tail, and an aligned exact one.
        for (i, len) in [65536usize, 5000, 8192 - 5000, 12345, 8192]
            .into_iter()
            .enumerate()
        {
            let at = model.len() as u64;
            let room = buf.room();
            for (k, b) in room[..len].iter_mut().enumerate() {
                *b = (i * 31 + k * 7) as u8;
            }
            buf.set_len(len);
            write_fetched(&file, direct.as_ref(), buf.data(), at).unwrap();
            model.extend_from_slice(buf.data());
            let mut back = vec![0u8; len];
            file.read_exact_at(&mut back, at).unwrap();
            assert!(back == buf.data(), "chunk {i} at {at}");
        }
        assert!(std::fs::read(&path).unwrap() == model);
    }
}
