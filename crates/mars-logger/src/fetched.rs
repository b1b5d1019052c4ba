//! Fetched logfile bytes kept in memory for replay.
//!
//! A secondary writes every chunk it fetches into its copy of the logfile, and replay
//! used to read the same bytes back from there. The fetcher now also offers each
//! chunk here once it is written; replay takes records from it while it is here and
//! reads the file otherwise. A chunk holds exactly the bytes written at its place in
//! the file (offered only after a successful write), so taking them from memory
//! changes nothing replay checks: checksums, positions and versions are verified the
//! same way.
//!
//! Bounded: a chunk that does not fit is not kept (replay reads the file for it);
//! chunks replay has passed are dropped, their buffers kept for the fetcher to use
//! again. One `FetchedChunks` belongs to one secondary task (an `invalidate` or a
//! restart starts a new one, empty), so a logfile fetched again under the same name
//! after a split brain never meets chunks of its earlier copy.

use crate::disk::AlignedBuf;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Chunk {
    /// The logfile's sequence number and name.
    seq: u64,
    name: String,
    /// File offset of the first byte.
    offset: u64,
    data: Arc<AlignedBuf>,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.data().len() as u64
    }
}

#[derive(Default)]
struct Inner {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    spare: Vec<AlignedBuf>,
    /// Fetchers in `wait_room` (tests wait for one to be there).
    waiting: usize,
}

impl Inner {
    /// A chunk there would continue the kept run: right after the last chunk of the
    /// same logfile, or the start of a later logfile's.
    fn continues(&self, seq: u64, name: &str, offset: u64) -> bool {
        match self.chunks.back() {
            Some(last) if last.name == name => last.end() == offset,
            Some(last) => last.seq < seq,
            None => true,
        }
    }
}

pub struct FetchedChunks {
    inner: Mutex<Inner>,
    /// Told when replay takes chunks away (room for the fetcher).
    room: Condvar,
    cap_bytes: usize,
}

/// Buffers kept for reuse beyond those holding chunks.
const SPARE_MAX: usize = 4;

impl FetchedChunks {
    /// Keeps chunks in at most `cap_bytes` of buffers.
    pub fn new(cap_bytes: usize) -> FetchedChunks {
        FetchedChunks {
            inner: Mutex::new(Inner::default()),
            room: Condvar::new(),
            cap_bytes,
        }
    }

    /// A buffer with room for `capacity` bytes: one given back, or a new one.
    pub fn buffer(&self, capacity: usize) -> AlignedBuf {
        let mut inner = self.inner.lock();
        while let Some(b) = inner.spare.pop() {
            if b.capacity() >= capacity {
                return b;
            }
        }
        drop(inner);
        AlignedBuf::new(capacity)
    }

    /// A buffer no longer needed (kept for `buffer`).
    pub fn give_back(&self, buf: AlignedBuf) {
        let mut inner = self.inner.lock();
        if inner.spare.len() < SPARE_MAX {
            inner.spare.push(buf);
        }
    }

    /// Whether `offer` would keep a chunk of logfile `name` at `offset` in a buffer of
    /// `capacity` bytes now. Only the single fetcher offers, and only replay takes
    /// chunks away, so a yes holds until that fetcher offers it.
    pub fn has_room(&self, seq: u64, name: &str, offset: u64, capacity: usize) -> bool {
        let inner = self.inner.lock();
        inner.continues(seq, name, offset) && inner.bytes + capacity <= self.cap_bytes
    }

    /// [`FetchedChunks::has_room`], waiting up to `patience` for replay to take chunks
    /// away when the chunk continues the kept run but does not fit yet. A fetcher
    /// ahead of a running replay waits a moment instead of writing the chunk through
    /// the page cache, where replay would read it back: on the machines measured that
    /// path cost several times the CPU per byte and halved a catch-up
    /// (docs/BENCHMARKS.md). Not for a paused replay: nothing would take chunks.
    pub fn wait_room(
        &self,
        seq: u64,
        name: &str,
        offset: u64,
        capacity: usize,
        patience: Duration,
    ) -> bool {
        let deadline = Instant::now() + patience;
        let mut inner = self.inner.lock();
        loop {
            if !inner.continues(seq, name, offset) {
                return false;
            }
            if inner.bytes + capacity <= self.cap_bytes {
                return true;
            }
            inner.waiting += 1;
            let timed_out = self.room.wait_until(&mut inner, deadline).timed_out();
            inner.waiting -= 1;
            if timed_out {
                return inner.continues(seq, name, offset)
                    && inner.bytes + capacity <= self.cap_bytes;
            }
        }
    }

    /// `data` is now the content of logfile `name` (sequence `seq`) at `offset`: it
    /// was written there. Kept when it continues the kept run (`has_room`), else
    /// given back. What is kept stays until replay passes it: after a chunk that was
    /// not kept, the chunks of that logfile are not kept either (replay finds them in
    /// the file), until replay has taken everything kept.
    pub fn offer(&self, seq: u64, name: &str, offset: u64, data: AlignedBuf) {
        let mut inner = self.inner.lock();
        // Memory held is the buffer's room, whatever the chunk's length.
        let held = data.capacity();
        let keep = !data.data().is_empty()
            && inner.continues(seq, name, offset)
            && inner.bytes + held <= self.cap_bytes;
        if !keep {
            if inner.spare.len() < SPARE_MAX {
                inner.spare.push(data);
            }
            return;
        }
        inner.bytes += held;
        inner.chunks.push_back(Chunk {
            seq,
            name: name.to_string(),
            offset,
            data: Arc::new(data),
        });
    }

    /// The kept chunk of logfile `name` that holds all of `[at, at + len)`, with the
    /// file offset of its first byte.
    pub fn find(&self, name: &str, at: u64, len: usize) -> Option<(u64, Arc<AlignedBuf>)> {
        let inner = self.inner.lock();
        let end = at.checked_add(len as u64)?;
        inner
            .chunks
            .iter()
            .find(|c| c.name == name && c.offset <= at && end <= c.end())
            .map(|c| (c.offset, c.data.clone()))
    }

    /// Copy `[at, at + dst.len())` of logfile `name` into `dst` from consecutive kept
    /// chunks (a record that two chunks share). False when they do not hold it all.
    pub fn copy_range(&self, name: &str, at: u64, dst: &mut [u8]) -> bool {
        let inner = self.inner.lock();
        let Some(end) = at.checked_add(dst.len() as u64) else {
            return false;
        };
        let Some(first) = inner
            .chunks
            .iter()
            .position(|c| c.name == name && c.offset <= at && at < c.end())
        else {
            return false;
        };
        let mut pos = at;
        for c in inner.chunks.iter().skip(first) {
            if c.name != name || (pos != at && c.offset != pos) {
                return false;
            }
            let from = (pos - c.offset) as usize;
            let n = ((end - pos) as usize).min(c.data.data().len() - from);
            let to = (pos - at) as usize;
            dst[to..to + n].copy_from_slice(&c.data.data()[from..from + n]);
            pos += n as u64;
            if pos == end {
                return true;
            }
        }
        false
    }

    /// Replay has applied logfile `seq`/`name` up to file offset `upto`: drop the
    /// chunks wholly before that (and those of earlier logfiles).
    pub fn consumed(&self, seq: u64, name: &str, upto: u64) {
        let mut inner = self.inner.lock();
        while let Some(c) = inner.chunks.front() {
            let passed = c.seq < seq || (c.name == name && c.end() <= upto);
            if !passed {
                break;
            }
            let Some(c) = inner.chunks.pop_front() else {
                break;
            };
            inner.bytes -= c.data.capacity();
            if let Ok(b) = Arc::try_unwrap(c.data) {
                if inner.spare.len() < SPARE_MAX {
                    inner.spare.push(b);
                }
            }
            self.room.notify_all();
        }
    }

    /// Drop every chunk of logfile `name`: its local copy was set aside as
    /// another history's (a logfile of the same name and start replay must not
    /// take these bytes for).
    pub fn forget(&self, name: &str) {
        let mut inner = self.inner.lock();
        let before = inner.chunks.len();
        let mut freed = 0;
        inner.chunks.retain(|c| {
            let keep = c.name != name;
            if !keep {
                freed += c.data.capacity();
            }
            keep
        });
        inner.bytes -= freed;
        if inner.chunks.len() != before {
            self.room.notify_all();
        }
    }

    /// Fetchers waiting in [`FetchedChunks::wait_room`].
    pub fn room_waiters(&self) -> usize {
        self.inner.lock().waiting
    }

    /// Memory the kept chunks hold (their buffers' room).
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new(bytes.len().max(1));
        b.room()[..bytes.len()].copy_from_slice(bytes);
        b.set_len(bytes.len());
        b
    }

    #[test]
    fn keeps_runs_finds_copies_and_drops_what_replay_passed() {
        let c = FetchedChunks::new(10);
        let file: Vec<u8> = (0..40u8).collect();
        c.offer(1, "log-1-a", 20, buf(&file[20..24]));
        // Not after the last chunk of the same file: not kept, nothing dropped.
        c.offer(1, "log-1-a", 30, buf(&file[30..34]));
        assert!(c.find("log-1-a", 30, 1).is_none());
        let (off, d) = c.find("log-1-a", 21, 3).unwrap();
        assert_eq!((off, d.data()), (20, &file[20..24]));
        drop(d);
        c.offer(1, "log-1-a", 24, buf(&file[24..28]));
        // Over the bound (4 + 4 + 4 > 10): not kept (and `has_room` said so).
        assert!(c.has_room(1, "log-1-a", 28, 2) && !c.has_room(1, "log-1-a", 28, 4));
        assert!(
            !c.has_room(1, "log-1-a", 27, 1),
            "not where the last chunk ends"
        );
        c.offer(1, "log-1-a", 28, buf(&file[28..32]));
        assert_eq!(c.bytes(), 8);
        assert!(c.find("log-1-a", 28, 1).is_none());
        // A range two chunks share is copied; one they do not hold is refused.
        let mut dst = [0u8; 6];
        assert!(c.copy_range("log-1-a", 21, &mut dst));
        assert_eq!(dst, file[21..27]);
        assert!(!c.copy_range("log-1-a", 23, &mut [0u8; 6]));
        assert!(!c.copy_range("log-1-b", 21, &mut [0u8; 2]));
        assert!(c.find("log-1-b", 21, 1).is_none());
        // An earlier logfile's chunk never follows a later one's.
        c.offer(0, "log-0-a", 0, buf(&file[0..2]));
        assert!(c.find("log-0-a", 0, 2).is_none());
        // Replay passed them: dropped, their buffers serve the next chunks.
        c.consumed(2, "log-2-a", 0);
        assert_eq!(c.bytes(), 0);
        c.offer(2, "log-2-a", 0, buf(&file[0..4]));
        c.consumed(2, "log-2-a", 3);
        assert_eq!(
            c.bytes(),
            4,
            "the chunk stays until replay passed all of it"
        );
        c.consumed(2, "log-2-a", 4);
        assert_eq!(c.bytes(), 0);
        assert!(c.buffer(4).capacity() >= 4);
    }

    #[test]
    fn a_fetcher_waits_for_room_only_while_replay_takes_chunks() {
        let c = Arc::new(FetchedChunks::new(8));
        c.offer(1, "log-1-a", 0, buf(&[1; 4]));
        c.offer(1, "log-1-a", 4, buf(&[2; 4]));
        let patience = Duration::from_secs(30);
        // Full: without anyone taking chunks the wait ends at its deadline, unanswered.
        let t = Instant::now();
        assert!(!c.wait_room(1, "log-1-a", 8, 4, Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        // A chunk that does not continue the run is refused at once, whatever the patience.
        let t = Instant::now();
        assert!(!c.wait_room(1, "log-1-a", 12, 4, patience));
        assert!(t.elapsed() < patience);
        // Replay takes the first chunk: the waiting fetcher gets its room.
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_room(1, "log-1-a", 8, 4, patience))
        };
        while c.room_waiters() == 0 {
            std::thread::yield_now();
        }
        c.consumed(1, "log-1-a", 4);
        let t = Instant::now();
        assert!(waiter.join().unwrap(), "room after replay took a chunk");
        assert!(t.elapsed() < patience);
        c.offer(1, "log-1-a", 8, buf(&[3; 4]));
        assert_eq!(c.bytes(), 8);
    }
}
