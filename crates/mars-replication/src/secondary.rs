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

use crate::io::*;
use crate::meta;
use crate::progress::Progress;
use crate::state::*;
use crate::{policy, Cluster};
use anyhow::{anyhow, bail, Result};
use mars_logfmt::ArrivalCheck;
use mars_logger::fetched::FetchedChunks;
use mars_logger::replay::Replayer;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Secondary {
    /// The incarnation replicated (its name: `res.name`).
    pub res: meta::ResRef,
    pub dir: PathBuf,
    pub me: String,
    pub disk: PathBuf,
    pub size: u64,
    pub peer: Arc<dyn Cluster>,
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
    /// How far replay stays behind the primary's writes, ms (0: none).
    pub replay_delay_ms: Arc<std::sync::atomic::AtomicU64>,
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
    /// Local logfiles (name, start, creation time) fetch found to be the
    /// source's logfile of that name (`same_logfile`).
    pub same_checked: Mutex<std::collections::HashSet<(String, u64, u64)>>,
    /// The connection of the last fetch round that ended cleanly (every request
    /// answered), to its source, and when: the next round asks on it instead of
    /// opening another (a mutual TLS handshake ten times a second per idle
    /// resource was most of an idle node's CPU).
    pub fetch_conn: Mutex<Option<crate::fetch::FetchConn>>,
    /// Replay as a freeze (verify, repair) holds it.
    pub gate: Arc<crate::verify::ReplayGate>,
}

/// The designated primary of `res` with its reign ([`policy::designation`]).
pub fn designation(store: &mars_meta::Store, res: &meta::ResRef) -> Option<String> {
    let e = store.entry(&meta::primary_key(res))?;
    let name: String = serde_json::from_value(e.value.clone()?).ok()?;
    Some(policy::designation(&name, e.stamp.clock, &e.stamp.node))
}

/// The members of `res` and what each reports of itself.
pub fn reports(
    store: &mars_meta::Store,
    res: &meta::ResRef,
) -> Vec<(String, Option<meta::ActualEntry>)> {
    meta::incarnation(store, res)
        .map(|r| r.members)
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let a = meta::get(store, &meta::actual_key(res, &m));
            (m, a)
        })
        .collect()
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

/// After a chunk was refused on arrival, fetch waits this long before asking again.
pub(crate) const FETCH_BACKOFF: Duration = Duration::from_secs(10);

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

/// Replay persists its position (a disk sync) at most this often, besides every
/// `PERSIST_WINDOW` of log and when it stops.
const REPLAY_PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// What the resource directory `dir` says of a secondary's progress
/// (replayed, durable, whether a full sync is done): set before the task
/// runs, so that a view never shows a moment's default (a demoted primary
/// showed a sync that never ran).
pub fn load_progress(dir: &std::path::Path, size: u64, p: &mut Progress) {
    if let Some(pos) = persisted_replayed(dir) {
        p.replayed = pos;
        p.replayed_durable = pos;
        p.fetched = p.fetched.max(pos);
    }
    // Until the sync state says otherwise, this disk is not a consistent image.
    match read_sync(dir) {
        Ok(Some(sync)) if sync.done => {
            p.syncing = false;
            p.consistent_from = sync.end_pos;
        }
        Ok(Some(sync)) => {
            p.syncing = true;
            p.sync_done = sync.next_offset;
            p.sync_total = size;
        }
        _ => {
            p.syncing = true;
            p.sync_total = size;
        }
    }
}

impl Secondary {
    /// A connection to `node` for this resource's data that first hands over
    /// this member's membership entry: a source serves members only, and one
    /// that has not heard of this member yet (it joined a moment ago, while
    /// the primary was away) learns it here instead of refusing.
    pub(crate) async fn connect_as_member(&self, node: &str) -> Result<crate::PeerStream> {
        crate::verify::connect_as_member(&*self.peer, &self.res, &self.me, node).await
    }

    /// The codecs this member asks its sources for: the resource's
    /// compression setting (`marsadm set-compression`), read per connection.
    pub(crate) fn accept(&self) -> Vec<mars_proto::Codec> {
        let c = meta::compression(&self.peer.store().lock(), &self.res);
        match c.codec {
            meta::LinkCodec::Off => Vec::new(),
            meta::LinkCodec::Zstd => vec![mars_proto::Codec::Zstd],
        }
    }

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
        // The disk's block checksums, held while the task runs (sync, replay
        // and serving share them); a disk changed while detached, or a damaged
        // checksum file, keeps the task here until the operator acts.
        let Some(_csum) = self.open_checksums().await else {
            return;
        };
        let mut replayer: Option<Replayer> = None;
        load_progress(&self.dir, self.size, &mut self.progress.lock());
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
                        _ = self.gate.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
            self.gate.set_position(None);
            if let Some(mut r) = replayer.take() {
                let _ = tokio::task::spawn_blocking(move || r.persist()).await;
            }
        };
        tokio::join!(transfer, replay);
    }

    /// Open the block checksums of the disk (built from it when there are
    /// none); while that is refused, say why and try again every second.
    /// None: stopped meanwhile.
    async fn open_checksums(&self) -> Option<mars_logger::csum::CsumHandle> {
        let mut said: Option<String> = None;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            let (dir, disk) = (self.dir.clone(), self.disk.clone());
            let r = tokio::task::spawn_blocking(move || mars_logger::csum::open(&dir, &disk))
                .await
                .map_err(|e| anyhow!("{e}"))
                .and_then(|r| r.map_err(anyhow::Error::from));
            match r {
                Ok(c) => {
                    if said.is_some() {
                        self.progress.lock().error = None;
                    }
                    return Some(c);
                }
                Err(e) => {
                    let msg = format!("cannot attach {}: {e:#}", self.res.name);
                    if said.as_deref() != Some(msg.as_str()) {
                        tracing::error!(resource = %self.res, "{msg}");
                    }
                    self.progress.lock().error = Some(msg.clone());
                    said = Some(msg);
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The member to sync from: the designated primary when it is reachable, else
    /// the reachable member with a consistent disk (up to date or behind, no split
    /// brain, not cut off, replay not stopped) that has replayed the most; it serves
    /// its disk and the joiner replays the log from where that disk was.
    /// Also says whether every candidate failed a moment ago (the one returned is
    /// asked again: the member shows itself without a source meanwhile).
    fn sync_source(&self) -> Result<(String, bool)> {
        let (designated, members) = {
            let store = self.peer.store().lock();
            let d = meta::designated_primary(&store, &self.res);
            (d, reports(&store, &self.res))
        };
        let now = std::time::Instant::now();
        let mut avoid = self.avoid_sources.lock();
        avoid.retain(|_, until| *until > now);
        policy::sync_source(
            &self.me,
            designated.as_deref(),
            &members,
            |m| self.peer.is_alive(m),
            |m| avoid.contains_key(m),
        )
        .map_err(|e| anyhow!(e))
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
        let prefer = self.prefer_source.lock().clone();
        let (designated, members) = {
            let store = self.peer.store().lock();
            let d = meta::designated_primary(&store, &self.res);
            (d, reports(&store, &self.res))
        };
        let candidates = policy::fetch_candidates(
            &self.me,
            prefer.as_deref(),
            designated.as_deref(),
            &members,
            |m| self.peer.is_alive(m),
        );
        let Some((first, all_failed)) =
            policy::fetch_source(&candidates, |m| avoid.contains_key(m))
        else {
            bail!("no reachable member to fetch the log from: every other member is down or cut off from this node (`marsadm view` shows which are alive); fetch goes on when one is back");
        };
        // Every reachable member failed a moment ago: ask the first again, unless its
        // copy was damaged (then its error stays shown until the backoff ends).
        if all_failed {
            if let Some((_, Some(refused))) = avoid.get(&first) {
                bail!("{refused}");
            }
        }
        Ok((first, all_failed))
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
        let designated = meta::designated_primary(&self.peer.store().lock(), &self.res);
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
        let paused = self.pause_replay.load(Ordering::Acquire);
        self.gate.set_paused(paused);
        if paused {
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
        let designated = meta::designated_primary(&self.peer.store().lock(), &self.res);
        let lineage = self.lineage.lock().clone();
        let lineage_now = lineage.clone();
        let lineage_for = lineage.as_ref().map(|(d, l)| (d.clone(), l.from_primary));
        let epoch = designation(&self.peer.store().lock(), &self.res);
        match lineage {
            Some((d, _)) if !mars_logger::history::list_usable(d.as_deref(), epoch.as_deref()) => {
                self.progress.lock().confirmed_for = None;
                *replayer = Some(r);
                return Ok(true);
            }
            Some((_, l)) => r.set_lineage(Some(l)),
            None => r.set_lineage(None),
        }
        r.set_primary(designated.clone());
        // A freeze (verify, repair) may hold replay at a position.
        let (step, stop) = self.gate.begin_step();
        r.set_stop_at(stop);
        r.set_delay(Some(Duration::from_millis(
            self.replay_delay_ms.load(Ordering::Acquire),
        )));
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
        step.done(r.position());
        tracing::debug!(
            resource = %self.res,
            replayed = r.position(),
            from_memory = r.bytes_from_memory(),
            "replay step"
        );
        let pos = r.position();
        let mut halted = None;
        {
            // The lineage lock first (the fetcher's order: lineage, then progress),
            // held while the outcome is set: a list the fetcher takes meanwhile
            // marks the member unconfirmed after this, never before.
            let current_list = self.lineage.lock();
            let list_changed = *current_list != lineage_now;
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
            // Confirmed only by the primary's own list (see `policy::authoritative`):
            // another member's may lack the logfiles that show this member past a
            // fork, or list an old logfile of the primary's name from another reign.
            let confirmed = lineage_for
                .as_ref()
                .filter(|(_, from_primary)| *from_primary)
                .and_then(|(d, _)| d.as_deref())
                .map(|d| policy::designated_name(d).to_string());
            // A list the fetcher took meanwhile is not checked yet: it keeps the
            // member unconfirmed until the next round looks at it.
            p.confirmed_for = confirmed.filter(|_| halted.is_none() && !list_changed);
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
        self.gate.set_position(Some(r.position()));
        if p.consistent_from.is_some_and(|end| r.position() >= end) {
            p.consistent_from = None;
        }
        Ok(r)
    }
}
