//! The full sync: a joining member sends the digest of each of its blocks, the
//! source answers `Same` or the block.

use crate::io::*;
use crate::meta;
use crate::secondary::Secondary;
use crate::state::*;
use anyhow::{anyhow, bail, Context, Result};
use mars_logger::disk::{open_direct, AlignedBuf};
use mars_proto::{read_data_packed, read_msg, write_msg, Codec, Msg, Unpacker};
use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const SYNC_BLOCK: u64 = 1 << 20;

/// Sync requests (`SyncBlock`) sent ahead of their answers.
const SYNC_WINDOW: usize = 16;
/// The longest a sync goes without recording its position.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// The sending half of a pipelined full sync.
struct SyncSender {
    res: String,
    disk: Arc<std::fs::File>,
    path: PathBuf,
    size: u64,
    from: u64,
    wr: tokio::io::WriteHalf<crate::PeerStream>,
    /// Every request sent, in order, for the receiving half; its capacity is the window.
    /// With the block checksums of what the local block held (set if it is equal).
    tx: tokio::sync::mpsc::Sender<(u64, usize, Vec<u32>)>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    digest: crate::digest::SyncDigest,
    /// Codecs the answers may come in.
    accept: Vec<Codec>,
}

/// Read and hash each local block from `from` on (off the async runtime, up to
/// `HASH_AHEAD` blocks at once) and ask the primary about it, at most `SYNC_WINDOW`
/// blocks ahead of the answers taken. Stops asking when the sync is paused or
/// stopped. Returns the write half for `SyncEnd`.
async fn send_sync_requests(mut s: SyncSender) -> Result<tokio::io::WriteHalf<crate::PeerStream>> {
    type Hashed = tokio::task::JoinHandle<(Vec<u8>, std::io::Result<(String, Vec<u32>)>)>;
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
                // The block checksums too, while the data is in the cache:
                // an equal block keeps these.
                let r = disk.read_exact_at(&mut buf[..len], off).map(|()| {
                    (
                        alg.digest(&buf[..len]),
                        mars_logger::csum::block_crcs(&buf[..len]),
                    )
                });
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
        let (digest, crcs) =
            digest.with_context(|| format!("reading block at {off} of {}", s.path.display()))?;
        write_msg(
            &mut s.wr,
            &Msg::SyncBlock {
                res: s.res.clone(),
                offset: off,
                len: len as u32,
                digest,
                accept: s.accept.clone(),
            },
        )
        .await?;
        permit.send((off, len, crcs));
    }
    Ok(s.wr)
}

/// Local blocks read and hashed at once by a joining member.
const HASH_AHEAD: usize = 2;
/// Answered blocks a joining member keeps before it waits for the oldest one's write
/// (so at most this many plus one writes to its disk at once).
const WRITE_AHEAD: usize = 4;

impl Secondary {
    pub(crate) async fn full_sync(&self, source: &str, sync: &mut SyncState) -> Result<()> {
        let mut s = IdleTimeout::new(
            self.connect_as_member(source)
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
                res: self.res.token(),
            },
        )
        .await?;
        let (pos, base) = match answer_from(source, read_msg(&mut s)).await? {
            // The base logfile's name from a peer: checked before it is recorded.
            Msg::SyncInfo {
                logfile: Some((name, _)),
                ..
            } if mars_logfmt::parse_logfile_name(&name).is_none() => {
                bail!("sync source {source} named a bad logfile {name:?}")
            }
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
                meta::designated_primary(&self.peer.store().lock(), &self.res).as_deref()
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
        // Resumed on a block boundary: a sync that ended its copy at an old
        // size (not a multiple of 4 KiB) and resumes after a resize would
        // otherwise hand the checksums of blocks read from an odd offset to
        // the wrong blocks.
        sync.next_offset -= sync.next_offset % mars_logger::csum::BLOCK;
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
        // The block checksums follow every block written or found equal.
        let csum = {
            let (dir, path) = (self.dir.clone(), self.disk.clone());
            tokio::task::spawn_blocking(move || mars_logger::csum::open(&dir, &path)).await??
        };
        // Pipelined: a sender task reads and hashes the local blocks and keeps up to
        // SYNC_WINDOW `SyncBlock` requests in flight; this task takes the answers in
        // order (the source answers in order on the one connection), writes what
        // differs and advances `next_offset` over the completed prefix only.
        let (rd, wr) = tokio::io::split(s.into_inner());
        let mut rd = IdleTimeout::new(rd);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, usize, Vec<u32>)>(SYNC_WINDOW);
        let mut sender = AbortOnDrop(tokio::spawn(send_sync_requests(SyncSender {
            res: self.res.token(),
            disk: disk.clone(),
            path: self.disk.clone(),
            size: self.size,
            from: sync.next_offset,
            wr,
            tx,
            stop: self.stop.clone(),
            pause: self.pause_sync.clone(),
            digest: self.sync_digest,
            accept: self.accept(),
        })));
        let mut unpacker = Unpacker::new();
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
                let Some((off, len, crcs)) = rx.recv().await else {
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
                    Msg::Same => {
                        // Equal: the checksums of what was read here are the block's.
                        csum.set_blocks(off, len as u64, &crcs);
                        // A compared block read the disk on both sides: it counts
                        // against the rate limit as a copied one does (as DRBD's
                        // checksum resync does), or a rate would not protect the
                        // device's load during a sync of mostly equal disks.
                        answered.push_back((off + len as u64, None));
                        throttle.spend(len as u64).await;
                    }
                    Msg::BlockData { offset, len: n } if offset == off && n as usize == len => {
                        let mut block = buffers
                            .pop()
                            .unwrap_or_else(|| AlignedBuf::new(SYNC_BLOCK as usize));
                        let got = answer_from(
                            source,
                            read_data_packed(
                                &mut rd,
                                &mut block.room()[..len],
                                Some(&mut unpacker),
                            ),
                        )
                        .await?;
                        if got != len {
                            bail!("{source} sent {got} bytes for a block of {len}");
                        }
                        let (d, dd, cs) = (disk.clone(), direct.clone(), csum.clone());
                        let w = tokio::task::spawn_blocking(move || {
                            let data = &block.room()[..len];
                            let _writing = cs.writing();
                            let r = write_block(&d, dd.as_deref(), data, off).and_then(|()| {
                                // A short last block is read back whole (the
                                // disk may be longer than the resource).
                                cs.written(off, &[data], &mut |b, o| d.read_exact_at(b, o))
                            });
                            drop(_writing);
                            drop(cs);
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
                    persisting = Some(spawn_persist_sync(&disk, &csum, &self.dir, sync));
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
                if let Err(p) = spawn_persist_sync(&disk, &csum, &self.dir, sync)
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r)
                {
                    tracing::warn!(resource = %self.res, "saving the sync position: {p:#}");
                }
                return Err(e);
            }
        };
        spawn_persist_sync(&disk, &csum, &self.dir, sync).await??;
        write_msg(
            &mut wr,
            &Msg::SyncEnd {
                res: self.res.token(),
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
}
