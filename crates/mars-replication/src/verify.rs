//! Verify and repair (issue 18): every member's copy of a resource compared
//! with the primary's, block by block, at consistent points while the device
//! is in use, and bad blocks rewritten from good copies.
//!
//! Per chunk of the disk, every copy is frozen at one log position T
//! (`mars_logger::freeze`: the primary's writeback, a secondary's replay),
//! each digests its chunk (a crc32c per 4 KiB read from its disk, and its
//! checksum table's entry: 8 bytes per block on the wire, not the data),
//! [`judge`] decides which copy holds the good block and which need it, the
//! bad blocks are copied from a good copy of the same moment, and the copies
//! are let go. The same steps repair the blocks one copy found bad by a read
//! or a scrub ([`Coordinator::repair_blocks`]).

use crate::meta;
use crate::serve::{Served, Server};
use crate::{Cluster, PeerStream};
use anyhow::{anyhow, bail, Result};
use mars_logger::csum::{self, CsumHandle, BLOCK};
use mars_logger::freeze::{Frozen, RangeDigest, LEASE, PATIENCE};
use mars_logger::Logger;
use mars_proto::{read_data, read_msg, write_data, write_msg, Msg, WireEntry};
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest range digested in one request (the answer: 8 bytes per block).
pub const MAX_DIGEST: u64 = 64 << 20;
/// Largest range read or repaired in one request.
pub const MAX_REPAIR: u32 = 8 << 20;
/// The chunk a verify freezes the copies for.
pub const CHUNK: u64 = 32 << 20;
/// How long a freeze waits for a secondary's replay that does not move.
pub const STALL: Duration = Duration::from_secs(5);
/// Rounds of freezing before a verify gives up on bringing the copies to one
/// position.
const MAX_ROUNDS: usize = 20;

/// A secondary's replay as a freeze sees it: where it stands, and where a
/// freeze asks it to stop. The replay loop takes a step only through
/// [`ReplayGate::begin_step`] and reports where it stands after it.
#[derive(Default)]
pub struct ReplayGate {
    state: Mutex<GateState>,
    cv: Condvar,
    /// Wakes the replay loop (a freeze asks it to move up to its position).
    pub wake: tokio::sync::Notify,
}

#[derive(Default)]
struct GateState {
    /// Replay's position while a replayer is open.
    pos: Option<u64>,
    stop: Option<(u64, Instant)>,
    stepping: bool,
    /// The stop the running step began with.
    step_stop: Option<u64>,
    /// Repairs writing into the frozen disk now ([`ReplayGate::pin`]).
    pinned: usize,
    /// Replay is paused (`pause-replay`): it will not move to a position.
    paused: bool,
}

impl GateState {
    /// The position cannot move now: no step runs, or the one running
    /// began with a stop it has reached.
    fn still(&self, pos: u64) -> bool {
        !self.stepping || self.step_stop.is_some_and(|s| s <= pos)
    }
}

/// A replay step in progress (see [`ReplayGate::begin_step`]).
pub struct Step<'a>(&'a ReplayGate, bool);

impl Step<'_> {
    /// The step ended with replay at `pos`.
    pub fn done(mut self, pos: u64) {
        self.1 = true;
        let mut g = self.0.state.lock();
        g.stepping = false;
        g.pos = Some(pos);
        self.0.cv.notify_all();
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        if !self.1 {
            // Ended without a position (the replayer was lost): unknown.
            let mut g = self.0.state.lock();
            g.stepping = false;
            g.pos = None;
            self.0.cv.notify_all();
        }
    }
}

impl ReplayGate {
    /// Replay begins a step: where it must stop (a freeze), and the guard to
    /// report its position with.
    pub fn begin_step(&self) -> (Step<'_>, Option<u64>) {
        let mut g = self.state.lock();
        g.stepping = true;
        // A repair writing: no record at all (whatever the freeze says now).
        let stop = match g.pos {
            Some(pos) if g.pinned > 0 => Some(pos),
            _ => g
                .stop
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(at, _)| at),
        };
        g.step_stop = stop;
        (Step(self, false), stop)
    }

    /// Replay stands at `pos` (opened), or is closed (None).
    pub fn set_position(&self, pos: Option<u64>) {
        let mut g = self.state.lock();
        g.pos = pos;
        self.cv.notify_all();
    }

    /// Replay is paused, or goes on (the replay loop says so each round).
    pub fn set_paused(&self, paused: bool) {
        let mut g = self.state.lock();
        if g.paused != paused {
            g.paused = paused;
            self.cv.notify_all();
        }
    }

    /// Hold replay at `at` (see `Logger::freeze`, the same contract). A
    /// replay that is paused, or that does not move for [`STALL`], is not
    /// waited for: the coordinator holds the primary's writeback meanwhile.
    pub fn freeze(&self, at: u64, patience: Duration) -> io::Result<Frozen> {
        let deadline = Instant::now() + patience;
        let mut g = self.state.lock();
        let mut seen = (g.pos, Instant::now());
        loop {
            let lease = Instant::now() + LEASE.max(patience);
            let Some(pos) = g.pos else {
                g.stop = None;
                return Err(io::Error::other(
                    "replay does not run here (a full sync runs, or the copy is stopped)",
                ));
            };
            if g.still(pos) && pos >= at {
                g.stop = Some((pos, lease));
                return Ok(if pos == at {
                    Frozen::At(at)
                } else {
                    Frozen::Ahead(pos)
                });
            }
            let now = Instant::now();
            if g.pos != seen.0 {
                seen = (g.pos, now);
            }
            let stalled = !g.stepping && now.duration_since(seen.1) >= STALL;
            if g.paused || stalled {
                g.stop = None;
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "replay stands at {pos}, before log position {at}, and {}",
                        if g.paused {
                            "is paused"
                        } else {
                            "does not move (behind on fetching?)"
                        }
                    ),
                ));
            }
            g.stop = Some((at, lease));
            self.wake.notify_one();
            if now >= deadline {
                g.stop = None;
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("replay did not reach log position {at} within {patience:?}: it stands at {pos} (paused, or behind on fetching?)"),
                ));
            }
            self.cv
                .wait_for(&mut g, (deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// End a freeze.
    pub fn thaw(&self) {
        self.state.lock().stop = None;
        self.wake.notify_one();
    }

    /// Frozen at `at` now (lease running, no step, replay there).
    fn check(&self, at: u64) -> io::Result<()> {
        Self::frozen(&self.state.lock(), at)
    }

    fn frozen(g: &GateState, at: u64) -> io::Result<()> {
        let held = match g.stop {
            Some((s, until)) => s == at && Instant::now() < until,
            None => false,
        } || g.pinned > 0;
        if held && g.pos == Some(at) && g.still(at) {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "replay is not frozen at log position {at} (the freeze's lease ran out?)"
            )))
        }
    }

    /// Hold replay at `at`, where it must be frozen now, until the pin is
    /// dropped, whatever happens to the freeze meanwhile (its lease runs
    /// out, a thaw or another freeze by someone else): a repair writes the
    /// frozen moment's blocks under it, so that replay applies no later
    /// record to them before it is done (it would be overwritten).
    pub fn pin(&self, at: u64) -> io::Result<GatePin<'_>> {
        let mut g = self.state.lock();
        Self::frozen(&g, at)?;
        g.pinned += 1;
        Ok(GatePin(self))
    }
}

/// Replay held while it lives ([`ReplayGate::pin`]).
pub struct GatePin<'a>(&'a ReplayGate);

impl Drop for GatePin<'_> {
    fn drop(&mut self) {
        self.0.state.lock().pinned -= 1;
        self.0.cv.notify_all();
        self.0.wake.notify_one();
    }
}

/// This node's copy of a resource, as a freeze works on it.
pub enum LocalCopy {
    /// The primary's: its logger's disk.
    Primary(Arc<Logger>),
    /// A secondary's: its disk, its checksums and its replay.
    Replica {
        gate: Arc<ReplayGate>,
        disk: File,
        csum: CsumHandle,
    },
}

fn not_at(at: u64, pos: u64) -> io::Error {
    io::Error::other(format!("frozen at log position {pos}, not {at}"))
}

impl LocalCopy {
    /// The copy of `res` (resource directory `dir`) the daemon runs now.
    pub fn of(served: &Served, res: &str, dir: &Path) -> Result<LocalCopy> {
        let sr = served.get(res);
        if let Some(l) = sr.logger {
            return Ok(LocalCopy::Primary(l));
        }
        let Some(sec) = sr.secondary else {
            bail!("no copy of {res} runs here (its disk is detached?)");
        };
        let Some(csum) = csum::find(dir) else {
            bail!("the block checksums of {res} are not open here");
        };
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&sec.disk)
            .map_err(|e| anyhow!("{}: {e}", sec.disk.display()))?;
        Ok(LocalCopy::Replica {
            gate: sec.gate.clone(),
            disk,
            csum,
        })
    }

    fn csum(&self) -> &csum::Csum {
        match self {
            LocalCopy::Primary(l) => l.checksums(),
            LocalCopy::Replica { csum, .. } => csum,
        }
    }

    pub fn freeze(&self, at: u64) -> io::Result<Frozen> {
        match self {
            LocalCopy::Primary(l) => l.freeze(at, PATIENCE),
            LocalCopy::Replica { gate, .. } => gate.freeze(at, PATIENCE),
        }
    }

    pub fn thaw(&self) {
        match self {
            LocalCopy::Primary(l) => l.release_freeze(),
            LocalCopy::Replica { gate, .. } => gate.thaw(),
        }
    }

    /// Freeze at `at` and, when there, digest `len` bytes from `offset`.
    pub fn freeze_digest(
        &self,
        at: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<(u64, Option<RangeDigest>)> {
        match self.freeze(at)? {
            Frozen::At(p) if len > 0 => Ok((p, Some(self.digest(p, offset, len)?))),
            Frozen::At(p) | Frozen::Ahead(p) => Ok((p, None)),
        }
    }

    pub fn digest(&self, at: u64, offset: u64, len: u64) -> io::Result<RangeDigest> {
        if len > MAX_DIGEST {
            return Err(io::Error::other(format!("digest of {len} bytes asked for")));
        }
        match self {
            LocalCopy::Primary(l) => {
                let (p, d) = l.frozen_digest(offset, len)?;
                if p != at {
                    return Err(not_at(at, p));
                }
                Ok(d)
            }
            LocalCopy::Replica { gate, disk, csum } => {
                gate.check(at)?;
                let d = mars_logger::freeze::digest(csum, offset, len, &mut |b, o| {
                    disk.read_exact_at(b, o)
                })?;
                gate.check(at)?;
                Ok(d)
            }
        }
    }

    pub fn read(&self, at: u64, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        if len > MAX_REPAIR {
            return Err(io::Error::other(format!("read of {len} bytes asked for")));
        }
        match self {
            LocalCopy::Primary(l) => {
                let (p, d) = l.frozen_read(offset, len as u64)?;
                if p != at {
                    return Err(not_at(at, p));
                }
                Ok(d)
            }
            LocalCopy::Replica { gate, disk, csum } => {
                gate.check(at)?;
                mars_logger::freeze::check_range(csum, offset, len as u64, MAX_REPAIR as u64)?;
                let mut buf = vec![0u8; len as usize];
                disk.read_exact_at(&mut buf, offset)?;
                gate.check(at)?;
                Ok(buf)
            }
        }
    }

    /// Write good blocks of the frozen moment. Unless `trusted` (asked by
    /// this node's operator or by the resource's primary, which decides
    /// the data anyway), only blocks whose checksum in this copy's own table
    /// is that of the data are accepted: another member can restore what
    /// this copy's table says was written, never write anything else.
    pub fn repair(&self, at: u64, offset: u64, data: &[u8], trusted: bool) -> io::Result<()> {
        if !trusted {
            let want = self
                .csum()
                .table(offset / BLOCK, data.len().div_ceil(BLOCK as usize));
            if csum::block_crcs(data) != want {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "repair data disagrees with this copy's block checksums: only the primary may rewrite such blocks",
                ));
            }
        }
        match self {
            LocalCopy::Primary(l) => l.frozen_repair(at, offset, data),
            LocalCopy::Replica { gate, disk, csum } => {
                let _pin = gate.pin(at)?;
                mars_logger::freeze::repair(
                    csum,
                    offset,
                    data,
                    &mut |d, o| disk.write_all_at(d, o),
                    &mut || disk.sync_data(),
                )
            }
        }
    }

    /// The table is wrong at `block`, the disk right: correct the table to
    /// `crc`, which must be that of what the disk holds there now. Unless
    /// `trusted` (as for [`LocalCopy::repair`]) it is refused: the table is
    /// what tells rot from data, and a correction to what the disk holds
    /// would make a rotten block read as good (another member cannot know
    /// better than this copy's table, the primary decides the data).
    pub fn correct(&self, at: u64, block: u64, crc: u32, trusted: bool) -> io::Result<()> {
        if !trusted {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("block {block}: only the primary may correct a copy's checksums: the table is not corrected"),
            ));
        }
        let covered = self.csum().covered();
        if block.checked_mul(BLOCK).is_none_or(|o| o >= covered) {
            return Err(io::Error::other(format!(
                "block {block} is beyond the disk"
            )));
        }
        let len = BLOCK.min(covered - block * BLOCK);
        let d = self.digest(at, block * BLOCK, len)?;
        if d.data.first() != Some(&crc) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "block {block} does not hold data of that checksum: the table is not corrected"
                ),
            ));
        }
        let c = self.csum();
        match self {
            LocalCopy::Primary(l) => {
                let _pin = l.pin_frozen(at)?;
                c.correct(block, crc);
            }
            LocalCopy::Replica { gate, .. } => {
                let _pin = gate.pin(at)?;
                c.correct(block, crc);
            }
        }
        c.sync()
    }

    /// Blocks that differ from the good copy and were not repaired: listed
    /// as bad, so that this copy is not shown up to date.
    pub fn mark_bad(&self, blocks: &[u64]) {
        let c = self.csum();
        let inside: Vec<u64> = blocks
            .iter()
            .copied()
            .filter(|b| b * BLOCK < c.covered())
            .collect();
        c.mark_bad(&inside);
    }
}

/// Per block of a chunk, what must be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Copy `to`'s data is not the good block: copy it from `from`.
    Copy { block: u64, to: usize, from: usize },
    /// Copy `side`'s data is good, its checksum table wrong: set it to `crc`.
    Correct { block: u64, side: usize, crc: u32 },
    /// No copy holds the good block (every copy's data disagrees with its
    /// own checksum): the copies in `bad` cannot be repaired.
    Lost { block: u64, bad: Vec<usize> },
}

/// What to do about the blocks of a chunk starting at block `first`, given
/// each copy's digest of it (`sides`, all of one frozen moment) and which
/// is the primary's. Pure: the rule is shared by verify, scrub and reads.
///
/// The good block is the primary's where its data agrees with its own
/// checksum (it is what was written); else that of a copy whose data agrees
/// with its own checksum and with the primary's checksum (the primary's
/// disk rotted, its table did not), else of any copy whose data agrees with
/// its own checksum (the primary's table is damaged too). A copy whose data
/// differs gets the good block; one whose data is good but whose table
/// differs gets its table corrected.
pub fn judge(first: u64, sides: &[&RangeDigest], primary: usize) -> Vec<Fix> {
    let mut fixes = Vec::new();
    let Some(p) = sides.get(primary) else {
        return fixes;
    };
    let n = sides
        .iter()
        .map(|s| s.data.len().min(s.table.len()))
        .min()
        .unwrap_or(0);
    for i in 0..n {
        let block = first + i as u64;
        let consistent = |s: usize| sides[s].data[i] == sides[s].table[i];
        if sides
            .iter()
            .all(|s| s.data[i] == p.data[i] && s.table[i] == p.data[i])
        {
            continue;
        }
        let good = if consistent(primary) {
            Some(p.data[i])
        } else {
            let cands: Vec<usize> = (0..sides.len()).filter(|&s| consistent(s)).collect();
            // The primary's table names the block (its disk rotted); else a
            // copy that holds the primary's data (its table rotted: the
            // data is confirmed by another copy); only then any other.
            cands
                .iter()
                .find(|&&s| sides[s].data[i] == p.table[i])
                .or_else(|| cands.iter().find(|&&s| sides[s].data[i] == p.data[i]))
                .or(cands.first())
                .map(|&s| sides[s].data[i])
        };
        let Some(g) = good else {
            fixes.push(Fix::Lost {
                block,
                bad: (0..sides.len()).collect(),
            });
            continue;
        };
        let from = if p.data[i] == g {
            primary
        } else {
            (0..sides.len())
                .find(|&s| sides[s].data[i] == g)
                .unwrap_or(primary)
        };
        for (s, side) in sides.iter().enumerate() {
            if side.data[i] != g {
                fixes.push(Fix::Copy { block, to: s, from });
            } else if side.table[i] != g {
                fixes.push(Fix::Correct {
                    block,
                    side: s,
                    crc: g,
                });
            }
        }
    }
    fixes
}

impl Server {
    /// `from` is the designated primary of `res`: it decides the data.
    fn sent_by_primary(&self, res: &str, from: &str) -> bool {
        let store = self.cluster.store().lock();
        meta::resource(&store, res)
            .and_then(|(rr, _)| meta::designated_primary(&store, &rr))
            .is_some_and(|p| p == from)
    }

    fn local_copy(&self, res: &str) -> Result<Arc<LocalCopy>> {
        let dir = self.res_dir(res)?;
        Ok(Arc::new(LocalCopy::of(&self.served, res, &dir)?))
    }

    /// Answer a freeze message (see `Msg::Freeze` and the ones after it).
    pub(crate) async fn serve_frozen(
        &self,
        msg: Msg,
        s: &mut PeerStream,
        from: &str,
    ) -> Result<()> {
        match msg {
            Msg::Freeze {
                res,
                at,
                offset,
                len,
            } => {
                if len > MAX_DIGEST {
                    bail!("a digest of {len} bytes is more than {MAX_DIGEST}");
                }
                let copy = self.local_copy(&res)?;
                let (pos, d) =
                    tokio::task::spawn_blocking(move || copy.freeze_digest(at, offset, len))
                        .await??;
                let digest = d.is_some();
                write_msg(s, &Msg::Frozen { pos, digest }).await?;
                if let Some(d) = d {
                    write_data(s, &d.encode()).await?;
                }
            }
            Msg::FrozenRead {
                res,
                at,
                offset,
                len,
            } => {
                let copy = self.local_copy(&res)?;
                let data =
                    tokio::task::spawn_blocking(move || copy.read(at, offset, len)).await??;
                write_msg(s, &Msg::BlockData { offset, len }).await?;
                write_data(s, &data).await?;
            }
            Msg::FrozenRepair {
                res,
                at,
                offset,
                len,
            } => {
                if len > MAX_REPAIR {
                    bail!("a repair of {len} bytes is more than {MAX_REPAIR}");
                }
                let data = read_data(s).await?;
                if data.len() != len as usize {
                    bail!("repair data of {} bytes, {len} announced", data.len());
                }
                let copy = self.local_copy(&res)?;
                // The primary decides the data; any other member may only
                // restore what this copy's checksums say (`LocalCopy::repair`).
                let trusted = self.sent_by_primary(&res, from);
                tokio::task::spawn_blocking(move || copy.repair(at, offset, &data, trusted))
                    .await??;
                write_msg(s, &Msg::Ok).await?;
            }
            Msg::FrozenCorrect {
                res,
                at,
                block,
                crc,
            } => {
                let copy = self.local_copy(&res)?;
                let trusted = self.sent_by_primary(&res, from);
                tokio::task::spawn_blocking(move || copy.correct(at, block, crc, trusted))
                    .await??;
                write_msg(s, &Msg::Ok).await?;
            }
            Msg::Thaw { res } => {
                if let Ok(copy) = self.local_copy(&res) {
                    copy.thaw();
                }
                write_msg(s, &Msg::Ok).await?;
            }
            other => bail!("not a freeze message: {other:?}"),
        }
        Ok(())
    }
}

/// A connection to `node` for `res`'s data that first hands over this
/// member's membership entry: a source serves members only, and one that
/// has not heard of this member yet (it joined a moment ago) learns it here
/// instead of refusing.
pub async fn connect_as_member(
    peer: &dyn Cluster,
    res: &meta::ResRef,
    me: &str,
    node: &str,
) -> Result<PeerStream> {
    let mut s = peer.connect(node).await?;
    let key = meta::membership_key(res, me);
    let entry = peer.store().lock().entry(&key).map(|e| WireEntry {
        key: key.clone(),
        clock: e.stamp.clock,
        node: e.stamp.node.clone(),
        value: e.value.clone(),
        deleted_ms: e.deleted_ms,
    });
    if let Some(e) = entry {
        write_msg(&mut s, &Msg::Push { entries: vec![e] }).await?;
        match read_msg(&mut s).await? {
            Msg::Ok => {}
            Msg::Refused { reason } => bail!("{node} refused this member's entry: {reason}"),
            other => bail!("{node} answered a push with {other:?}"),
        }
    }
    Ok(s)
}

/// One member's copy, as the coordinator reaches it.
enum Copy {
    Local(Arc<LocalCopy>),
    Remote(Box<PeerStream>),
}

fn expect_ok(node: &str, m: Msg) -> Result<()> {
    match m {
        Msg::Ok => Ok(()),
        Msg::Refused { reason } => bail!("{node}: {reason}"),
        other => bail!("{node} answered {other:?}"),
    }
}

/// Run `f` on a local copy off the async runtime (its disk I/O blocks).
async fn blocking<T: Send + 'static>(
    c: &Arc<LocalCopy>,
    f: impl FnOnce(&LocalCopy) -> io::Result<T> + Send + 'static,
) -> Result<T> {
    let c = c.clone();
    Ok(tokio::task::spawn_blocking(move || f(&c)).await??)
}

/// Send `msg` to `node` and read its answer (a refusal is an error).
async fn ask(s: &mut PeerStream, node: &str, msg: Msg) -> Result<Msg> {
    write_msg(s, &msg).await?;
    match read_msg(s).await? {
        Msg::Refused { reason } => bail!("{node}: {reason}"),
        m => Ok(m),
    }
}

impl Copy {
    async fn freeze(
        &mut self,
        node: &str,
        res: &str,
        at: u64,
        offset: u64,
        len: u64,
    ) -> Result<(u64, Option<RangeDigest>)> {
        let s = match self {
            Copy::Local(c) => return blocking(c, move |c| c.freeze_digest(at, offset, len)).await,
            Copy::Remote(s) => &mut **s,
        };
        let res = res.to_string();
        match ask(
            s,
            node,
            Msg::Freeze {
                res,
                at,
                offset,
                len,
            },
        )
        .await?
        {
            Msg::Frozen { pos, digest: false } => Ok((pos, None)),
            Msg::Frozen { pos, digest: true } => {
                let b = read_data(s).await?;
                let blocks = len.div_ceil(BLOCK) as usize;
                let d = RangeDigest::decode(&b, blocks).ok_or_else(|| {
                    anyhow!(
                        "{node} sent a digest of {} bytes for {blocks} blocks",
                        b.len()
                    )
                })?;
                Ok((pos, Some(d)))
            }
            other => bail!("{node} answered a freeze with {other:?}"),
        }
    }

    async fn read(
        &mut self,
        node: &str,
        res: &str,
        at: u64,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>> {
        let s = match self {
            Copy::Local(c) => return blocking(c, move |c| c.read(at, offset, len)).await,
            Copy::Remote(s) => &mut **s,
        };
        let res = res.to_string();
        match ask(
            s,
            node,
            Msg::FrozenRead {
                res,
                at,
                offset,
                len,
            },
        )
        .await?
        {
            Msg::BlockData { offset: o, len: l } if o == offset && l == len => {
                let d = read_data(s).await?;
                if d.len() != len as usize {
                    bail!("{node} sent {} bytes, {len} announced", d.len());
                }
                Ok(d)
            }
            other => bail!("{node} answered a read with {other:?}"),
        }
    }

    async fn repair(
        &mut self,
        node: &str,
        res: &str,
        at: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<()> {
        let s = match self {
            Copy::Local(c) => {
                return blocking(c, move |c| c.repair(at, offset, &data, true)).await;
            }
            Copy::Remote(s) => &mut **s,
        };
        let res = res.to_string();
        let len = data.len() as u32;
        write_msg(
            s,
            &Msg::FrozenRepair {
                res,
                at,
                offset,
                len,
            },
        )
        .await?;
        write_data(s, &data).await?;
        expect_ok(node, read_msg(s).await?)
    }

    async fn correct(
        &mut self,
        node: &str,
        res: &str,
        at: u64,
        block: u64,
        crc: u32,
    ) -> Result<()> {
        let s = match self {
            Copy::Local(c) => return blocking(c, move |c| c.correct(at, block, crc, true)).await,
            Copy::Remote(s) => &mut **s,
        };
        let res = res.to_string();
        expect_ok(
            node,
            ask(
                s,
                node,
                Msg::FrozenCorrect {
                    res,
                    at,
                    block,
                    crc,
                },
            )
            .await?,
        )
    }

    async fn thaw(&mut self, node: &str, res: &str) -> Result<()> {
        let s = match self {
            Copy::Local(c) => {
                c.thaw();
                return Ok(());
            }
            Copy::Remote(s) => &mut **s,
        };
        let res = res.to_string();
        expect_ok(node, ask(s, node, Msg::Thaw { res }).await?)
    }
}

/// One member in a verify or repair.
struct Member {
    node: String,
    copy: Option<Copy>,
}

/// Progress and result of a verify, as `view` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// Bytes compared so far, of `total`.
    pub done: u64,
    pub total: u64,
    /// Per member: blocks whose data or checksum differed from the good copy.
    pub differing: BTreeMap<String, Vec<u64>>,
    /// Per member: blocks repaired (copied from a good copy, or a checksum corrected).
    pub repaired: BTreeMap<String, u64>,
    /// Blocks no copy holds good.
    pub lost: Vec<u64>,
    /// Members that could not be compared, and why.
    pub failed: BTreeMap<String, String>,
}

impl VerifyReport {
    /// All compared copies agree (or were repaired), none failed.
    pub fn clean(&self, repair: bool) -> bool {
        let unrepaired = self.differing.iter().any(|(node, blocks)| {
            !repair || self.repaired.get(node).copied().unwrap_or(0) < blocks.len() as u64
        });
        self.failed.is_empty() && self.lost.is_empty() && !unrepaired
    }
}

/// Runs a verify (or a repair of blocks one copy found bad) of one resource.
pub struct Coordinator {
    pub cluster: Arc<dyn Cluster>,
    pub served: Arc<Served>,
    /// This node's resource directory of `res`.
    pub dir: std::path::PathBuf,
    pub res: meta::ResRef,
    pub me: String,
    /// The member whose copy is the reference (the primary).
    pub primary: String,
    /// Every member, the primary included.
    pub members: Vec<String>,
    /// Bytes compared (whole blocks: a last partial block is not).
    pub size: u64,
    pub repair: bool,
    /// Bytes per second (0: no limit).
    pub rate: Arc<AtomicU64>,
    pub pause: Arc<AtomicBool>,
    pub stop: Arc<AtomicBool>,
    pub report: Arc<Mutex<VerifyReport>>,
}

/// One freeze at a time per resource among the coordinators of this node
/// (a verify's chunk, a read's repair, the background repair): a freeze is
/// not owned, so one coordinator's thaw (or its freeze at another position)
/// let go of another's halfway through, which then failed (a client read
/// got EIO although a good copy existed).
fn serial(res: &meta::ResRef) -> Arc<tokio::sync::Mutex<()>> {
    static ALL: std::sync::OnceLock<
        Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    ALL.get_or_init(Default::default)
        .lock()
        .entry(res.token())
        .or_default()
        .clone()
}

impl Coordinator {
    async fn connect_all(&self) -> Vec<Member> {
        let mut out = Vec::new();
        for node in &self.members {
            let copy = if *node == self.me {
                match LocalCopy::of(&self.served, &self.res.name, &self.dir) {
                    Ok(c) => Some(Copy::Local(Arc::new(c))),
                    Err(e) => {
                        self.fail(node, format!("{e:#}"));
                        None
                    }
                }
            } else {
                match connect_as_member(&*self.cluster, &self.res, &self.me, node).await {
                    Ok(s) => Some(Copy::Remote(Box::new(s))),
                    Err(e) => {
                        self.fail(node, format!("not reachable: {e:#}"));
                        None
                    }
                }
            };
            out.push(Member {
                node: node.clone(),
                copy,
            });
        }
        out
    }

    fn fail(&self, node: &str, why: String) {
        tracing::warn!(resource = %self.res, member = node, "verify: {why}");
        self.report
            .lock()
            .failed
            .entry(node.to_string())
            .or_insert(why);
    }

    /// Freeze every reachable copy at one position and digest the chunk
    /// (`len` 0: freeze only): the position, and each member's digest (None
    /// for a member that failed: it is out of this run).
    async fn freeze_all(
        &self,
        members: &mut [Member],
        mut at: u64,
        offset: u64,
        len: u64,
    ) -> Result<(u64, Vec<Option<RangeDigest>>)> {
        let wire = self.res.token();
        for _ in 0..MAX_ROUNDS {
            let mut set = tokio::task::JoinSet::new();
            for (i, m) in members.iter_mut().enumerate() {
                if let Some(mut c) = m.copy.take() {
                    let (node, wire) = (m.node.clone(), wire.clone());
                    set.spawn(async move {
                        let r = c.freeze(&node, &wire, at, offset, len).await;
                        (i, c, r)
                    });
                }
            }
            let mut got: Vec<Option<(u64, Option<RangeDigest>)>> = vec![None; members.len()];
            while let Some(j) = set.join_next().await {
                let (i, c, r) = j?;
                match r {
                    Ok(x) => {
                        members[i].copy = Some(c);
                        got[i] = Some(x);
                    }
                    Err(e) => self.fail(&members[i].node, format!("{e:#}")),
                }
            }
            if !members
                .iter()
                .any(|m| m.node == self.primary && m.copy.is_some())
            {
                let why = self
                    .report
                    .lock()
                    .failed
                    .get(&self.primary)
                    .cloned()
                    .unwrap_or_default();
                bail!(
                    "the primary {} cannot be compared with: {why}",
                    self.primary
                );
            }
            let top = got.iter().flatten().map(|(p, _)| *p).max().unwrap_or(at);
            let all_there = got
                .iter()
                .flatten()
                .all(|(p, d)| *p == at && (len == 0 || d.is_some()));
            if all_there && top == at {
                return Ok((
                    at,
                    got.into_iter().map(|g| g.and_then(|(_, d)| d)).collect(),
                ));
            }
            at = top;
        }
        bail!("the copies did not come to one log position in {MAX_ROUNDS} rounds")
    }

    async fn thaw_all(&self, members: &mut [Member]) {
        let wire = self.res.token();
        for m in members.iter_mut() {
            if let Some(c) = m.copy.as_mut() {
                if let Err(e) = c.thaw(&m.node, &wire).await {
                    m.copy = None;
                    self.fail(&m.node, format!("{e:#}"));
                }
            }
        }
    }

    /// Copy `[block, block+n)` from member `from` to member `to`, all frozen
    /// at `at`; the bytes must be the good ones (`good`: their crc32c).
    async fn copy_blocks(
        &self,
        members: &mut [Member],
        at: u64,
        (from, to): (usize, usize),
        block: u64,
        good: &[u32],
    ) -> Result<()> {
        let wire = self.res.token();
        let offset = block * BLOCK;
        let len = (good.len() as u64 * BLOCK).min(self.size.saturating_sub(offset)) as u32;
        let src = members[from].node.clone();
        let data = match members[from].copy.as_mut() {
            Some(c) => c.read(&src, &wire, at, offset, len).await?,
            None => bail!("{src} is out of this run"),
        };
        if csum::block_crcs(&data) != good {
            bail!("{src}'s blocks changed under the freeze: not copied");
        }
        let dst = members[to].node.clone();
        match members[to].copy.as_mut() {
            Some(c) => c.repair(&dst, &wire, at, offset, data).await,
            None => bail!("{dst} is out of this run"),
        }
    }

    /// Carry out `fixes` (of one frozen chunk at `at`, digests `ds`).
    async fn apply(
        &self,
        members: &mut [Member],
        at: u64,
        first: u64,
        ds: &[RangeDigest],
        fixes: &[Fix],
    ) {
        let wire = self.res.token();
        // Runs of blocks with the same source and target go in one copy.
        let mut runs: Vec<(usize, usize, u64, u64)> = Vec::new();
        for f in fixes {
            match f {
                Fix::Copy { block, to, from } => match runs.last_mut() {
                    Some((rf, rt, b, n))
                        if rf == from
                            && rt == to
                            && *b + *n == *block
                            && *n * BLOCK < MAX_REPAIR as u64 =>
                    {
                        *n += 1
                    }
                    _ => runs.push((*from, *to, *block, 1)),
                },
                Fix::Correct { block, side, crc } => {
                    let node = members[*side].node.clone();
                    let r = match members[*side].copy.as_mut() {
                        Some(c) => c.correct(&node, &wire, at, *block, *crc).await,
                        None => continue,
                    };
                    match r {
                        Ok(()) => *self.report.lock().repaired.entry(node).or_default() += 1,
                        Err(e) => self.fail(&node, format!("correcting a checksum: {e:#}")),
                    }
                }
                Fix::Lost { .. } => {}
            }
        }
        for (from, to, block, n) in runs {
            let i = (block - first) as usize;
            let good = &ds[from].data[i..i + n as usize];
            let node = members[to].node.clone();
            match self.copy_blocks(members, at, (from, to), block, good).await {
                Ok(()) => *self.report.lock().repaired.entry(node).or_default() += n,
                Err(e) => self.fail(
                    &node,
                    format!("repairing blocks {block}..{}: {e:#}", block + n),
                ),
            }
        }
    }

    /// Verify the whole disk from `from` (a multiple of the chunk, to resume).
    pub async fn verify(&self, from: u64, on_chunk: impl Fn(u64)) -> Result<()> {
        let total = (self.size / BLOCK) * BLOCK;
        {
            let mut r = self.report.lock();
            r.total = total;
            r.done = from.min(total);
        }
        let mut members = self.connect_all().await;
        let primary = members
            .iter()
            .position(|m| m.node == self.primary)
            .ok_or_else(|| anyhow!("{} is not among the members", self.primary))?;
        let started = Instant::now();
        let mut at = 0;
        let mut offset = from.min(total);
        while offset < total {
            while self.pause.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if self.stop.load(Ordering::Acquire) {
                bail!("stopped");
            }
            let len = CHUNK.min(total - offset);
            let serial = serial(&self.res);
            let _one = serial.lock().await;
            let (pos, ds) = self.freeze_all(&mut members, at, offset, len).await?;
            at = pos;
            let present: Vec<usize> = (0..members.len()).filter(|&i| ds[i].is_some()).collect();
            let digests: Vec<RangeDigest> = present.iter().filter_map(|&i| ds[i].clone()).collect();
            let Some(p) = present.iter().position(|&i| i == primary) else {
                bail!("the primary {} dropped out", self.primary);
            };
            let refs: Vec<&RangeDigest> = digests.iter().collect();
            let first = offset / BLOCK;
            let fixes = judge(first, &refs, p);
            if !fixes.is_empty() {
                self.record(&members, &present, &fixes);
                if self.repair {
                    // Indices of `fixes` are into `present`: map them back.
                    let mapped: Vec<Fix> = fixes.iter().map(|f| remap(f, &present)).collect();
                    let mut by_member: Vec<RangeDigest> =
                        vec![RangeDigest::default(); members.len()];
                    for (k, &i) in present.iter().enumerate() {
                        by_member[i] = digests[k].clone();
                    }
                    self.apply(&mut members, at, first, &by_member, &mapped)
                        .await;
                } else {
                    self.mark(&members, &present, &fixes).await;
                }
            }
            self.thaw_all(&mut members).await;
            drop(_one);
            offset += len;
            self.report.lock().done = offset;
            on_chunk(offset);
            let rate = self.rate.load(Ordering::Relaxed);
            if rate > 0 {
                let due = Duration::from_secs_f64((offset - from) as f64 / rate as f64);
                let el = started.elapsed();
                if due > el {
                    tokio::time::sleep(due - el).await;
                }
            }
        }
        Ok(())
    }

    fn record(&self, members: &[Member], present: &[usize], fixes: &[Fix]) {
        let mut r = self.report.lock();
        for f in fixes {
            match f {
                Fix::Copy { block, to, .. }
                | Fix::Correct {
                    block, side: to, ..
                } => {
                    r.differing
                        .entry(members[present[*to]].node.clone())
                        .or_default()
                        .push(*block);
                }
                Fix::Lost { block, bad } => {
                    r.lost.push(*block);
                    for s in bad {
                        r.differing
                            .entry(members[present[*s]].node.clone())
                            .or_default()
                            .push(*block);
                    }
                }
            }
        }
    }

    /// Without repair: the local copy's differing blocks are listed bad (the
    /// remote ones list theirs when their reads or scrubs find them).
    async fn mark(&self, members: &[Member], present: &[usize], fixes: &[Fix]) {
        for (k, &i) in present.iter().enumerate() {
            let Some(Copy::Local(c)) = members[i].copy.as_ref() else {
                continue;
            };
            let blocks: Vec<u64> = fixes
                .iter()
                .filter_map(|f| match f {
                    Fix::Copy { block, to, .. } if *to == k => Some(*block),
                    Fix::Lost { block, bad } if bad.contains(&k) => Some(*block),
                    _ => None,
                })
                .collect();
            if !blocks.is_empty() {
                c.mark_bad(&blocks);
            }
        }
    }

    /// Repair `blocks` of member `bad` (found bad by its reads or its scrub)
    /// from a good copy: returns the blocks repaired.
    pub async fn repair_blocks(&self, bad: &str, blocks: &[u64]) -> Result<Vec<u64>> {
        let mut members = self.connect_all().await;
        let Some(target) = members.iter().position(|m| m.node == bad) else {
            bail!("{bad} is not among the members");
        };
        let primary = members.iter().position(|m| m.node == self.primary);
        let mut repaired = Vec::new();
        let mut at = 0;
        // Runs of consecutive blocks, each frozen and judged on its own.
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len()
                && blocks[j] == blocks[j - 1] + 1
                && (j - i) as u64 * BLOCK < MAX_REPAIR as u64
            {
                j += 1;
            }
            let first = blocks[i];
            let offset = first * BLOCK;
            let len = ((j - i) as u64 * BLOCK).min(self.size.saturating_sub(offset));
            if len == 0 {
                break;
            }
            let serial = serial(&self.res);
            let _one = serial.lock().await;
            let (pos, ds) = self.freeze_all(&mut members, at, offset, len).await?;
            at = pos;
            let present: Vec<usize> = (0..members.len()).filter(|&k| ds[k].is_some()).collect();
            let digests: Vec<RangeDigest> = present.iter().filter_map(|&k| ds[k].clone()).collect();
            let refs: Vec<&RangeDigest> = digests.iter().collect();
            let p = primary
                .and_then(|p| present.iter().position(|&k| k == p))
                .unwrap_or(0);
            let fixes: Vec<Fix> = judge(first, &refs, p)
                .iter()
                .map(|f| remap(f, &present))
                .filter(|f| match f {
                    Fix::Copy { to, .. } | Fix::Correct { side: to, .. } => *to == target,
                    Fix::Lost { .. } => false,
                })
                .collect();
            let mut by_member: Vec<RangeDigest> = vec![RangeDigest::default(); members.len()];
            for (k, &m) in present.iter().enumerate() {
                by_member[m] = digests[k].clone();
            }
            let before = self.report.lock().repaired.get(bad).copied().unwrap_or(0);
            self.apply(&mut members, at, first, &by_member, &fixes)
                .await;
            let after = self.report.lock().repaired.get(bad).copied().unwrap_or(0);
            if after > before {
                repaired.extend(fixes.iter().filter_map(|f| match f {
                    Fix::Copy { block, .. } | Fix::Correct { block, .. } => Some(*block),
                    Fix::Lost { .. } => None,
                }));
            }
            self.thaw_all(&mut members).await;
            i = j;
        }
        Ok(repaired)
    }
}

/// A fix with copy indices into `present` turned into member indices.
fn remap(f: &Fix, present: &[usize]) -> Fix {
    match f {
        Fix::Copy { block, to, from } => Fix::Copy {
            block: *block,
            to: present[*to],
            from: present[*from],
        },
        Fix::Correct { block, side, crc } => Fix::Correct {
            block: *block,
            side: present[*side],
            crc: *crc,
        },
        Fix::Lost { block, bad } => Fix::Lost {
            block: *block,
            bad: bad.iter().map(|s| present[*s]).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(data: &[u32], table: &[u32]) -> RangeDigest {
        RangeDigest {
            data: data.to_vec(),
            table: table.to_vec(),
        }
    }

    #[test]
    fn equal_copies_need_nothing() {
        let a = side(&[1, 2], &[1, 2]);
        let b = side(&[1, 2], &[1, 2]);
        assert!(judge(0, &[&a, &b], 0).is_empty());
    }

    #[test]
    fn a_rotten_secondary_block_is_copied_from_the_primary() {
        let p = side(&[1, 2], &[1, 2]);
        let s = side(&[1, 9], &[1, 2]);
        assert_eq!(
            judge(10, &[&p, &s], 0),
            vec![Fix::Copy {
                block: 11,
                to: 1,
                from: 0
            }]
        );
    }

    #[test]
    fn a_rotten_primary_block_is_copied_from_a_good_secondary() {
        let p = side(&[1, 9], &[1, 2]);
        let s = side(&[1, 2], &[1, 2]);
        let t = side(&[1, 2], &[1, 2]);
        assert_eq!(
            judge(0, &[&s, &p, &t], 1),
            vec![Fix::Copy {
                block: 1,
                to: 1,
                from: 0
            }]
        );
    }

    #[test]
    fn a_damaged_table_is_corrected_not_the_data() {
        let p = side(&[1, 2], &[1, 7]);
        let s = side(&[1, 2], &[1, 2]);
        assert_eq!(
            judge(0, &[&p, &s], 0),
            vec![Fix::Correct {
                block: 1,
                side: 0,
                crc: 2
            }]
        );
    }

    #[test]
    fn a_self_consistent_secondary_that_differs_takes_the_primarys_block() {
        let p = side(&[5], &[5]);
        let s = side(&[6], &[6]);
        assert_eq!(
            judge(0, &[&p, &s], 0),
            vec![Fix::Copy {
                block: 0,
                to: 1,
                from: 0
            }]
        );
    }

    /// The primary's table entry rotted (its data is good), and one
    /// secondary holds another block that agrees with its own table (a
    /// copy restored from elsewhere and its checksums rebuilt, say): the
    /// copy that confirms the primary's data is the good one. The first
    /// self-consistent copy was taken, and its block copied over the
    /// primary's and the good secondary's.
    #[test]
    fn a_primary_with_a_rotten_table_keeps_the_data_another_copy_confirms() {
        let p = side(&[9], &[7]);
        let odd = side(&[5], &[5]);
        let good = side(&[9], &[9]);
        assert_eq!(
            judge(0, &[&p, &odd, &good], 0),
            vec![
                Fix::Correct {
                    block: 0,
                    side: 0,
                    crc: 9
                },
                Fix::Copy {
                    block: 0,
                    to: 1,
                    from: 0
                }
            ]
        );
    }

    #[test]
    fn a_block_bad_everywhere_is_lost() {
        let p = side(&[8], &[5]);
        let s = side(&[9], &[5]);
        assert_eq!(
            judge(0, &[&p, &s], 0),
            vec![Fix::Lost {
                block: 0,
                bad: vec![0, 1]
            }]
        );
    }

    #[test]
    fn bad_in_different_blocks_of_different_members() {
        let p = side(&[1, 2, 3], &[1, 2, 3]);
        let s = side(&[0, 2, 3], &[1, 2, 3]);
        let t = side(&[1, 2, 0], &[1, 2, 3]);
        let f = judge(0, &[&p, &s, &t], 0);
        assert_eq!(
            f,
            vec![
                Fix::Copy {
                    block: 0,
                    to: 1,
                    from: 0
                },
                Fix::Copy {
                    block: 2,
                    to: 2,
                    from: 0
                }
            ]
        );
    }

    /// A repair writing into a secondary's frozen disk holds replay where
    /// it is, even when the freeze is thawed (another coordinator) or moved
    /// on meanwhile: a record applied during the write would be overwritten
    /// with the older moment's data.
    #[test]
    fn a_pinned_gate_lets_no_step_apply_whatever_the_freeze_says() {
        let g = std::sync::Arc::new(ReplayGate::default());
        g.set_position(Some(100));
        assert_eq!(
            g.freeze(100, Duration::from_secs(1)).unwrap(),
            Frozen::At(100)
        );
        let pin = g.pin(100).unwrap();
        g.thaw();
        let (step, stop) = g.begin_step();
        assert_eq!(stop, Some(100), "a step began past a pinned position");
        step.done(100);
        // Another coordinator freezes further on: still held.
        let frozen = {
            let g = g.clone();
            std::thread::spawn(move || g.freeze(200, Duration::from_millis(200)))
        };
        std::thread::sleep(Duration::from_millis(50));
        let (step, stop) = g.begin_step();
        assert_eq!(stop, Some(100));
        step.done(100);
        assert!(frozen.join().unwrap().is_err());
        drop(pin);
        let (step, stop) = g.begin_step();
        assert_eq!(stop, None, "the pin outlived the repair");
        step.done(150);
        assert!(g.pin(100).is_err(), "pinned where replay no longer stands");
    }

    /// A paused replay is not waited for (the coordinator holds the
    /// primary's writeback meanwhile).
    #[test]
    fn a_paused_replay_refuses_a_freeze_ahead_of_it_at_once() {
        let g = ReplayGate::default();
        g.set_position(Some(100));
        g.set_paused(true);
        let t = Instant::now();
        assert!(g.freeze(200, Duration::from_secs(10)).is_err());
        assert!(t.elapsed() < Duration::from_secs(1));
        // Where it stands, it is frozen all the same.
        assert_eq!(
            g.freeze(100, Duration::from_secs(1)).unwrap(),
            Frozen::At(100)
        );
    }

    #[test]
    fn digest_wire_form_round_trips_and_refuses_other_lengths() {
        let d = side(&[1, 2, 3], &[4, 5, 6]);
        assert_eq!(RangeDigest::decode(&d.encode(), 3), Some(d.clone()));
        assert_eq!(RangeDigest::decode(&d.encode(), 2), None);
        assert_eq!(RangeDigest::decode(&[0u8; 7], 1), None);
    }
}
