//! Transfer helpers: a source's stream with an answer timeout, a rate limit,
//! and writes of synced blocks and fetched chunks.

use crate::secondary::FETCH_BACKOFF;
use anyhow::{anyhow, Result};
use mars_logger::disk::DIRECT_ALIGN;
use std::future::Future as _;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A fetched chunk whose records failed their check (`ArrivalCheck`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ArrivalRefused(pub(crate) String);

impl ArrivalRefused {
    pub(crate) fn new(file: &str, source: &str, e: impl std::fmt::Display) -> ArrivalRefused {
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
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A source's stream whose reads fail with `TimedOut` after [`ANSWER_TIMEOUT`]
/// without a byte (see there). Writes pass through.
pub(crate) struct IdleTimeout<S> {
    inner: S,
    /// Armed when a read starts waiting, restarted by every byte.
    deadline: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl<S> IdleTimeout<S> {
    pub(crate) fn new(inner: S) -> IdleTimeout<S> {
        IdleTimeout {
            inner,
            deadline: Box::pin(tokio::time::sleep(ANSWER_TIMEOUT)),
            waiting: false,
        }
    }

    pub(crate) fn into_inner(self) -> S {
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
pub(crate) async fn answer_from<T>(
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
pub(crate) struct SourceUnreachable(pub(crate) String);

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

/// Write one synced block: with O_DIRECT when there is such a handle and the block
/// is aligned, else (or when the direct write is refused) through the page cache.
/// A direct write replaces what the page cache held of the range (the kernel writes
/// dirty pages back first and drops them after), so later buffered reads see it.
pub(crate) fn write_block(
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
pub(crate) fn write_fetched(
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

pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_logger::disk::{open_direct, AlignedBuf};

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
