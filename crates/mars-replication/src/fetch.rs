//! Fetch: copy the source's logfiles, checked record by record as they arrive.

use crate::io::*;
use crate::meta;
use crate::policy;
use crate::secondary::Secondary;
use anyhow::{anyhow, bail, Result};
use mars_logfmt::ArrivalCheck;
use mars_logger::disk::{open_direct, DIRECT_ALIGN};
use mars_proto::{read_data_packed, read_msg, write_msg, Msg, Unpacker};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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

impl Secondary {
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
        // Checked once per logfile and task: only fetch itself (setting a file
        // aside) replaces a local logfile while the task runs.
        let key = (f.name.clone(), f.start_pos, f.created_ns);
        if self.same_checked.lock().contains(&key) {
            return Ok(true);
        }
        let p = path.to_path_buf();
        let header =
            tokio::task::spawn_blocking(move || crate::logdir::logfile_header(&p).ok()).await?;
        match policy::local_copy(header.map(|h| (h.start_pos, h.created_ns)), f, replay_pos) {
            policy::LocalCopy::Same => {
                self.same_checked.lock().insert(key);
                Ok(true)
            }
            policy::LocalCopy::SplitBrain { start } => {
                self.progress.lock().split_brain = true;
                bail!(
                    "split brain: the local {} (from log position {start}) is another logfile than the source's of that name (from {}), and replay applied it; `marsadm invalidate {}` copies the disk anew",
                    f.name,
                    f.start_pos,
                    self.res
                )
            }
            policy::LocalCopy::SetAside => {
                let to = self
                    .dir
                    .join(format!("{}{}", mars_logger::replay::ORPHAN_PREFIX, f.name));
                tracing::warn!(resource = %self.res, logfile = %f.name, "a local logfile of that name is another history's: set aside as {}", to.display());
                std::fs::rename(path, &to)?;
                self.arrivals.lock().remove(&f.name);
                // Replay reads fetched chunks by name: none of the old file's.
                self.fetched.forget(&f.name);
                Ok(false)
            }
        }
    }

    /// Fetch what `primary` has beyond this node's copies. Returns the bytes
    /// fetched; `wake` tells replay of every chunk written (it takes it from memory
    /// while it is there).
    pub(crate) async fn fetch(
        &self,
        primary: &str,
        replay_pos: u64,
        wake: &tokio::sync::Notify,
    ) -> Result<u64> {
        // The last round's connection to this source when it is fresh enough;
        // one the source has closed meanwhile is replaced once.
        let kept = self.fetch_conn.lock().take().filter(|c| {
            c.source == primary
                && c.used.elapsed() < FETCH_CONN_KEEP
                && !self.peer.is_blocked(primary)
        });
        let mut fresh = kept.is_none();
        let mut s = match kept {
            Some(c) => c.stream,
            None => IdleTimeout::new(self.connect_as_member(primary).await?),
        };
        let listed = loop {
            if fresh {
                break self.list_logs(&mut s, primary).await?;
            }
            // A kept connection that was closed, reset, or does not answer
            // within KEPT_ANSWER (a cut link drops packets silently) is
            // replaced by a new one, which fails at once where the link is cut.
            match tokio::time::timeout(KEPT_ANSWER, self.list_logs(&mut s, primary)).await {
                Ok(Ok(m)) => break m,
                Ok(Err(_)) | Err(_) => {
                    fresh = true;
                    s = IdleTimeout::new(self.connect_as_member(primary).await?);
                }
            }
        };
        self.progress.lock().fetch_waits_for_source = false; // it answers
                                                             // The codecs this round's chunks may come in (the resource's
                                                             // setting now; a change applies from the next round).
        let accept = self.accept();
        let mut unpacker = Unpacker::new();
        let (files, versions, open, writes) = match listed {
            Msg::Logs {
                files,
                versions,
                open,
                writes,
            } => (files, versions, open, writes),
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
                // Names from a peer: exactly as this build writes them, or not at all.
                Some(n) if mars_logfmt::version_file_name(n.seq, &n.node) != name => continue,
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
        let first_needed = policy::first_needed(&files, replay_pos);
        let (designated, epoch) = {
            let store = self.peer.store().lock();
            let d = meta::designated_primary(&store, &self.res);
            (d, crate::secondary::designation(&store, &self.res))
        };
        let from_primary = designated.as_deref() == Some(primary);
        let handover_from = self.prefer_source.lock().clone();
        let authoritative = policy::authoritative(
            primary,
            designated.as_deref(),
            writes,
            handover_from.as_deref(),
        );
        // What the local copies hold (fetched in order, so contiguous from replay_pos).
        let local_end = crate::logdir::local_log_end(&self.dir).max(replay_pos);
        match (policy::gap(&files, local_end, from_primary), files.first()) {
            (Some(policy::Gap::NotHeld), Some(first)) => bail!(
                "{primary} does not hold the log from position {replay_pos} on (its oldest logfile {} starts at {})",
                first.name,
                first.start_pos
            ),
            (Some(policy::Gap::CutOff), Some(first)) => {
                self.progress.lock().cut_off = true;
                bail!(
                    "{primary} no longer has the log from position {replay_pos} on (its oldest logfile {} starts at {}; deleted in emergency mode?): run `marsadm invalidate {}` here for a full sync",
                    first.name,
                    first.start_pos,
                    self.res
                );
            }
            _ => {}
        }
        self.progress.lock().cut_off = false;
        {
            let lineage = policy::lineage(&files, authoritative);
            let mut l = self.lineage.lock();
            let same = l
                .as_ref()
                .is_some_and(|(d, old)| *d == epoch && policy::same_lineage(old, &lineage));
            if !same {
                // Until replay has looked at the new list.
                self.progress.lock().confirmed_for = None;
            }
            *l = Some((epoch, lineage));
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
            let Some(file_seq) = mars_logfmt::parse_logfile_name(&f.name)
                .filter(|n| mars_logfmt::logfile_name(n.seq, &n.node) == f.name)
                .map(|n| n.seq)
            else {
                bail!("{primary} listed a bad logfile name {:?}", f.name);
            };
            let path = self.dir.join(&f.name);
            let mut local = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if local == 0 && i < first_needed {
                continue;
            }
            // A local file of that name is compared with the listed one (start and
            // creation time) before it is appended to, and also when it is complete
            // but replay still needs it (i >= first_needed): a logfile of the same
            // name and start from another history must never be taken for it.
            if local > 0
                && (local < f.len || i >= first_needed)
                && !self.same_logfile(&path, &f, replay_pos).await?
            {
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
                                res: self.res.token(),
                                file: f.name.clone(),
                                offset: next,
                                max: ask,
                                accept: accept.clone(),
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
                        Msg::Chunk { file, offset, len } if offset == want && file == f.name => {
                            if len > asked {
                                bail!(
                                    "{primary} sent a chunk of {len} bytes where at most \
                                     {asked} were asked"
                                );
                            }
                            // Chunk buffers come back from replay (or were not kept) and
                            // are used again: no allocation, zeroing or page faults per chunk.
                            let mut data = self.fetched.buffer(max as usize);
                            // At most the chunk announced: a compressed frame may not
                            // hold more (nor take more memory than that to read).
                            let room = &mut data.room()[..(len as usize).min(max as usize)];
                            let got = answer_from(
                                primary,
                                read_data_packed(&mut s, room, Some(&mut unpacker)),
                            )
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
                                // Never more than a bounded step ahead: the listed
                                // length comes from the peer.
                                let to = if f.finished {
                                    f.len.min(at + n + 8 * FETCH_PREALLOC)
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
        drop(p);
        // Every request of this round was answered: the next round may ask here.
        *self.fetch_conn.lock() = Some(FetchConn {
            source: primary.to_string(),
            stream: s,
            used: std::time::Instant::now(),
        });
        Ok(fetched)
    }

    /// Ask `source` on `s` for its logfiles of this resource.
    async fn list_logs(&self, s: &mut IdleTimeout<crate::PeerStream>, source: &str) -> Result<Msg> {
        write_msg(
            s,
            &Msg::LogList {
                res: self.res.token(),
            },
        )
        .await?;
        answer_from(source, read_msg(s)).await
    }
}

/// The connection of a fetch round that ended with every request answered,
/// kept for the next round (see `Secondary::fetch_conn`).
pub struct FetchConn {
    source: String,
    stream: IdleTimeout<crate::PeerStream>,
    used: std::time::Instant,
}

/// A kept fetch connection is used again only this soon after its round: the
/// source closes a connection that sends nothing for 30 s (an idle secondary
/// asks ten times a second; a paused one starts anew).
const FETCH_CONN_KEEP: Duration = Duration::from_secs(10);
/// How long a kept connection may take to answer a logfile list (a listing of
/// one directory) before it is given up for a new one.
const KEPT_ANSWER: Duration = Duration::from_secs(3);
