//! Deterministic replication simulation: a real primary [`Logger`], a
//! simulated fetch (the daemon's `secondary.rs`: copy each logfile's durable
//! bytes from the local length on, versions too) with cuts at arbitrary bytes,
//! and a real [`Replayer`] with random budgets, persist windows, pauses,
//! persists, kills and reboots.
//!
//! Per seed, after every replay step, the secondary disk must be exactly
//! what the model says:
//!
//! - The replayer's position is always a record boundary of the primary's
//!   write sequence. It never goes back, also across a kill (drop without
//!   `persist`; the page cache, disk and high-water mark, survives): the
//!   reopened replayer starts where the killed one was. After a *reboot*
//!   (another boot id, and a power loss: every 4 KiB page of the disk written
//!   since the last sync is randomly the synced or the newer content, and the
//!   unsynced mark file is kept, lost, cut or garbage) it starts at the
//!   persisted position and must report the disk inconsistent at least until
//!   the position reached before the reboot.
//! - The disk equals the model of the secondary's page cache: every record
//!   the replayer applied, in the order it applied them (after a reboot, over
//!   the mixed image).
//! - *Anytime consistency*: whenever the replayer does not report the disk
//!   inconsistent, at every step, the disk is the primary's image after a
//!   prefix of its writes (the position's); and always at or past `high`,
//!   the furthest position reached before a reboot.
//! - At the end the disk equals the primary's (model and real disk) and no
//!   halt happened; with corruption, replay stops exactly at the damaged
//!   record, the disk is the image before it, and nothing later is applied.
//!
//! Determinism: every decision comes from the seed. The logger's idle sync
//! is switched off (one hour), so the synced position only moves on flushes,
//! FUA writes, rotations and closes, all issued by the simulation; version
//! files are written by the logger's persister thread, so the simulation
//! waits for them before copying (their content does not depend on timing).
//!
//! `MARS_SIM_SEEDS=N` runs seeds `0..N` (default 64), `MARS_SIM_SEED=S` only
//! seed `S`, `MARS_SIM_TRACE=1` prints every action. A failure names its
//! seed; `--nocapture` shows what the seeds exercised (kills, cuts, ...).

use bytes::Bytes;
use mars_logfmt::{scan_logfile, RECORD_HEADER_LEN};
use mars_logger::replay::{Halt, Replayer, HW_FILE};
use mars_logger::{list_logfiles, Config, Logger};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod simkit;
use simkit::{file_len, pattern};

const SIZE: u64 = 1 << 20;
const PRIMARY: &str = "alpha";
const SECONDARY: &str = "beta";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Write,
    Trim,
    Zeroes,
}

/// One acknowledged write of the primary, in log order.
#[derive(Clone, Debug)]
struct Rec {
    kind: OpKind,
    id: u64,
    offset: u64,
    len: u64,
}

fn apply(img: &mut [u8], r: &Rec) {
    let (o, l) = (r.offset as usize, r.len as usize);
    match r.kind {
        OpKind::Write => img[o..o + l].copy_from_slice(&pattern(r.id, r.len)),
        OpKind::Trim | OpKind::Zeroes => img[o..o + l].fill(0),
    }
}

/// The primary's writes and their log positions: `ends[k]` is the stream
/// position after the first `k` records.
struct Model {
    recs: Vec<Rec>,
    ends: Vec<u64>,
}

impl Model {
    fn k_of(&self, pos: u64) -> Option<usize> {
        self.ends.binary_search(&pos).ok()
    }
}

/// The image after a prefix, computed incrementally.
struct Prefix {
    k: usize,
    img: Vec<u8>,
}

impl Prefix {
    fn at(&mut self, m: &Model, k: usize) -> &[u8] {
        if k < self.k {
            self.k = 0;
            self.img.fill(0);
        }
        for r in &m.recs[self.k..k] {
            apply(&mut self.img, r);
        }
        self.k = k;
        &self.img
    }
}

#[derive(Default, Debug)]
struct Stats {
    writes: u64,
    flushes: u64,
    rotations: u64,
    restarts: u64,
    fetch_rounds: u64,
    cuts: u64,
    steps: u64,
    pauses: u64,
    kills: u64,
    reboots: u64,
    /// Persists `step` did by itself (the limit was reached).
    self_persists: u64,
    /// Persisted positions that moved to a place before the step that saw it.
    synced_behind: u64,
    persists: u64,
    /// Steps while the replayer reported the disk inconsistent (after a reboot), and how many of those showed a non-prefix image.
    window_steps: u64,
    non_prefix: u64,
    corrupt_header: u64,
    corrupt_payload: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.rotations += o.rotations;
        self.restarts += o.restarts;
        self.fetch_rounds += o.fetch_rounds;
        self.cuts += o.cuts;
        self.steps += o.steps;
        self.pauses += o.pauses;
        self.kills += o.kills;
        self.reboots += o.reboots;
        self.self_persists += o.self_persists;
        self.synced_behind += o.synced_behind;
        self.persists += o.persists;
        self.window_steps += o.window_steps;
        self.non_prefix += o.non_prefix;
        self.corrupt_header += o.corrupt_header;
        self.corrupt_payload += o.corrupt_payload;
    }
}

struct Corruption {
    /// Index of the damaged record (= number of records before it).
    k: usize,
    file: String,
}

struct Sim {
    rng: StdRng,
    _root: tempfile::TempDir,
    cfg: Config,
    bdir: PathBuf,
    bdisk: PathBuf,
    rt: tokio::runtime::Runtime,
    logger: Option<Logger>,
    model: Model,
    // The secondary.
    replayer: Option<Replayer>,
    /// What the secondary's disk must hold (its page cache survives a kill).
    page: Vec<u8>,
    /// The disk as of the replayer's last sync (what a power loss keeps for sure).
    synced: Vec<u8>,
    /// Records applied by the replayer (its position), and as of its last persist.
    k: usize,
    persisted_k: usize,
    /// Most records ever applied before a reboot: below it the disk may be no prefix image.
    high: usize,
    /// The current boot's id, and the replayer's persist window (per seed).
    boot: u64,
    window: u64,
    /// Disk syncs of replay in the background (`Replayer::set_background_sync`).
    background: bool,
    pause_left: u32,
    corruption: Option<Corruption>,
    halted: bool,
    prefix: Prefix,
    stats: Stats,
    /// `MARS_SIM_TRACE=1`: print every action.
    trace: bool,
}

/// The simulation's files live in `MARS_SIM_TMP`, else `/dev/shm` when there
/// is one (tmpfs: fsyncs cost nothing, page-cache semantics are the same for
/// process kills), else the usual temporary directory.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn boot_id(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn open_replayer(dir: &Path, disk: &Path, boot: u64, window: u64, background: bool) -> Replayer {
    let mut r =
        Replayer::open_with_boot_id(dir, SECONDARY, disk, SIZE, 0, Some(&boot_id(boot))).unwrap();
    r.set_persist_window(window);
    r.set_background_sync(background);
    r
}

impl Sim {
    /// The secondary's replayer, opened again in the current boot.
    fn open_replayer(&self) -> Replayer {
        open_replayer(
            &self.bdir,
            &self.bdisk,
            self.boot,
            self.window,
            self.background,
        )
    }

    fn new(seed: u64, background: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let root = simkit::sim_tempdir("mars-replication-sim");
        let adir = root.path().join("a");
        let bdir = root.path().join("b");
        std::fs::create_dir_all(&adir).unwrap();
        std::fs::create_dir_all(&bdir).unwrap();
        let adisk = root.path().join("a.img");
        let bdisk = root.path().join("b.img");
        for d in [&adisk, &bdisk] {
            File::create(d).unwrap().set_len(SIZE).unwrap();
        }
        let mut cfg = Config::new(PRIMARY, &adir, &adisk, SIZE, 7);
        cfg.logfile_max_bytes = rng.random_range(8u64 << 10..=160 << 10);
        cfg.idle_sync = Duration::from_secs(3600); // no timed syncs: durability only from the simulation's ops
        cfg.persist_interval = Duration::from_millis(1); // versions of finished logfiles appear at once
        let logger = Logger::open(cfg.clone()).unwrap();
        let window = match rng.random_range(0..3) {
            0 => rng.random_range(1..=4096),
            1 => rng.random_range(4097..=256 << 10),
            _ => mars_logger::replay::PERSIST_WINDOW,
        };
        let replayer = open_replayer(&bdir, &bdisk, 1, window, background);
        Sim {
            rng,
            _root: root,
            cfg,
            bdir,
            bdisk,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            logger: Some(logger),
            model: Model {
                recs: Vec::new(),
                ends: vec![0],
            },
            replayer: Some(replayer),
            page: vec![0; SIZE as usize],
            synced: vec![0; SIZE as usize],
            k: 0,
            persisted_k: 0,
            high: 0,
            boot: 1,
            window,
            background,
            pause_left: 0,
            corruption: None,
            halted: false,
            prefix: Prefix {
                k: 0,
                img: vec![0; SIZE as usize],
            },
            stats: Stats::default(),
            trace: std::env::var_os("MARS_SIM_TRACE").is_some(),
        }
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!(
                "[k {} persisted {} high {} boot {}] {}",
                self.k,
                self.persisted_k,
                self.high,
                self.boot,
                what()
            );
        }
    }

    fn logger(&self) -> &Logger {
        self.logger.as_ref().expect("primary running")
    }

    // ---- the primary ----

    fn random_range(&mut self) -> (u64, u64) {
        let len = match self.rng.random_range(0..10) {
            0..6 => self.rng.random_range(1..=4096),
            6..9 => self.rng.random_range(4097..=65536),
            _ => self.rng.random_range(65537..=262144),
        };
        let mut off = self.rng.random_range(0..=SIZE - len);
        if self.rng.random_bool(0.3) {
            off &= !4095; // aligned: trims punch real holes
        }
        (off, len)
    }

    fn log_write(&mut self, kind: OpKind) {
        let (offset, len) = self.random_range();
        let fua = self.rng.random_bool(0.1);
        let id = self.model.recs.len() as u64 + 1;
        let logger = self.logger.as_ref().unwrap();
        self.rt
            .block_on(async {
                match kind {
                    OpKind::Write => {
                        logger
                            .write(offset, Bytes::from(pattern(id, len)), fua)
                            .await
                    }
                    OpKind::Trim => logger.zero(offset, len, fua, true).await,
                    OpKind::Zeroes => logger.zero(offset, len, fua, false).await,
                }
            })
            .unwrap();
        let payload = if kind == OpKind::Write { len } else { 0 };
        let end = self.model.ends.last().unwrap() + RECORD_HEADER_LEN as u64 + payload;
        self.model.recs.push(Rec {
            kind,
            id,
            offset,
            len,
        });
        self.model.ends.push(end);
        assert_eq!(self.logger().status().logged_pos, end, "log position");
        self.trace(|| format!("{kind:?} #{id} {offset}+{len} fua {fua} -> pos {end}"));
        self.stats.writes += 1;
    }

    fn flush(&mut self) {
        let logger = self.logger.as_ref().unwrap();
        self.rt.block_on(logger.flush()).unwrap();
        let st = self.logger().status();
        assert_eq!(st.synced_pos, st.logged_pos, "flush syncs everything");
        self.stats.flushes += 1;
    }

    fn rotate(&mut self) {
        let logger = self.logger.as_ref().unwrap();
        let r = self.rt.block_on(logger.rotate()).unwrap();
        self.trace(|| format!("rotate -> {r:?}"));
        self.stats.rotations += 1;
    }

    fn restart_primary(&mut self) {
        if let Some(l) = self.logger.take() {
            l.close();
        }
        self.logger = Some(Logger::open(self.cfg.clone()).unwrap());
        self.trace(|| format!("primary restarted: {:?}", self.logger().status()));
        self.stats.restarts += 1;
    }

    fn primary_op(&mut self) {
        match self.rng.random_range(0..100) {
            0..68 => self.log_write(OpKind::Write),
            68..75 => self.log_write(OpKind::Trim),
            75..82 => self.log_write(OpKind::Zeroes),
            82..93 => self.flush(),
            93..98 => self.rotate(),
            _ => self.restart_primary(),
        }
    }

    // ---- fetch ----

    /// Copy the primary's version files (after waiting for the ones of finished logfiles).
    fn copy_versions(&mut self) {
        let adir = self.cfg.dir.clone();
        let logs = list_logfiles(&adir).unwrap();
        for (i, e) in logs.iter().enumerate() {
            if i + 1 == logs.len() {
                break; // the current (or, after close, last) logfile has no version yet
            }
            let name = format!("version-{:09}-{PRIMARY}", e.seq);
            let st = self.logger.as_ref().map(|l| l.status());
            let what = format!(
                "{name} (logfiles {:?}, status {st:?})",
                logs.iter().map(|e| e.name()).collect::<Vec<_>>()
            );
            wait_until(&what, || adir.join(&name).exists());
        }
        for e in std::fs::read_dir(&adir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("version-") {
                let text = std::fs::read(&p).unwrap();
                let dst = self.bdir.join(&name);
                if std::fs::read(&dst).ok().as_deref() != Some(&text[..]) {
                    let tmp = self.bdir.join(format!(".{name}.tmp"));
                    std::fs::write(&tmp, &text).unwrap();
                    std::fs::rename(&tmp, &dst).unwrap();
                }
            }
        }
    }

    /// One fetch round as `fetch.rs` does it: the logfiles offered, in order,
    /// each from its local length; a cut ends the round anywhere.
    fn fetch(&mut self, cuts: bool) {
        self.stats.fetch_rounds += 1;
        if !cuts || self.rng.random_bool(0.5) {
            self.copy_versions();
        }
        // What the primary offers (the daemon's list and durable clamp).
        for f in simkit::offered(&self.cfg.dir, self.logger.as_ref()) {
            let (name, end) = (f.name.clone(), f.len);
            let e_path = self.cfg.dir.join(&name);
            let dst = self.bdir.join(&name);
            let local = file_len(&dst);
            if local >= end {
                continue;
            }
            let trace = self.trace;
            let cut = simkit::copy_chunks(
                &mut self.rng,
                &e_path,
                &dst,
                local,
                end,
                &[100, 8192, 65536, 0],
                cuts,
                |at, n, cut| {
                    if trace {
                        eprintln!("fetch {name} {at}+{n} of {end} cut {cut}");
                    }
                },
            );
            if cut {
                self.stats.cuts += 1;
                return;
            }
        }
    }

    // ---- the secondary ----

    fn replay_step(&mut self) {
        let budget = match self.rng.random_range(0..5) {
            0 => 1,
            1 => self.rng.random_range(1..=4096),
            2 => self.rng.random_range(1..=65536),
            3 => 1 << 20,
            _ => u64::MAX,
        };
        let r = self.replayer.as_mut().unwrap();
        let persisted_before = r.persisted_position();
        let res = r.step(budget);
        let pos = r.position();
        let persisted = r.persisted_position();
        let halt = r.halted().map(|h| format!("{h:?}"));
        self.stats.steps += 1;
        let k = self
            .model
            .k_of(pos)
            .unwrap_or_else(|| panic!("replay position {pos} is not a record boundary"));
        assert!(
            k >= self.k,
            "replay went back from {} to {k} records",
            self.k
        );
        assert!(k <= self.model.recs.len(), "replayed more than was written");
        let persisted_k = self
            .model
            .k_of(persisted)
            .unwrap_or_else(|| panic!("persisted position {persisted} is not a record boundary"));
        assert!(
            (self.persisted_k..=k).contains(&persisted_k),
            "persisted {persisted_k} records, before {}, now at {k}",
            self.persisted_k
        );
        let resynced = persisted != persisted_before;
        // The page cache is the synced image plus the records applied since: the
        // disk was synced at the new persisted position (with background syncs that
        // may lie before this step's start), so the synced image moves there.
        if resynced {
            if persisted_k < self.k {
                self.stats.synced_behind += 1; // a background sync from an earlier step
            }
            for i in self.persisted_k..persisted_k {
                apply(&mut self.synced, &self.model.recs[i]);
            }
        }
        for i in self.k..k {
            apply(&mut self.page, &self.model.recs[i]);
        }
        if resynced && res.is_ok() {
            self.stats.self_persists += 1;
        }
        self.persisted_k = persisted_k;
        let applied = (k - self.k) as u64;
        self.trace(|| format!("step({budget}) -> k {k}: {res:?}, halt {halt:?}"));
        self.k = k;
        match res {
            Ok(o) => {
                assert_eq!(o.records, applied, "records reported by step");
                assert!(halt.is_none(), "halted without an error: {halt:?}");
            }
            Err(e) => {
                let c = self.corruption.as_ref().unwrap_or_else(|| {
                    panic!("replay failed without corruption: {e}; halt: {halt:?}")
                });
                assert_eq!(k, c.k, "stopped at the damaged record, not before or after");
                let expected_pos = self.model.ends[c.k];
                match self.replayer.as_ref().unwrap().halted() {
                    Some(Halt::Corrupt { file, pos, .. }) => {
                        assert_eq!(
                            (file, *pos),
                            (&c.file, expected_pos),
                            "halt names the record"
                        )
                    }
                    other => panic!("expected a corrupt halt, got {other:?}: {e}"),
                }
                self.halted = true;
                assert_eq!(self.persisted_k, k, "a halt persists what was applied");
            }
        }
        self.check_disk();
    }

    fn check_disk(&mut self) {
        let disk = std::fs::read(&self.bdisk).unwrap();
        if disk != self.page {
            let at = disk.iter().zip(&self.page).position(|(a, b)| a != b);
            panic!(
                "secondary disk differs from the model at byte {at:?} ({} records replayed, high {})",
                self.k, self.high
            );
        }
        let prefix = self.prefix.at(&self.model, self.k) == &self.page[..];
        let until = self.replayer.as_ref().unwrap().inconsistent_until();
        if until.is_none() {
            assert!(
                prefix,
                "the replayer reports a consistent disk: it must be the prefix image"
            );
        } else {
            self.stats.window_steps += 1;
            self.stats.non_prefix += u64::from(!prefix);
        }
        if self.k >= self.high {
            assert!(
                prefix,
                "at or past the furthest position before a reboot the disk must be the prefix image"
            );
        }
    }

    fn persist(&mut self) {
        self.replayer.as_mut().unwrap().persist().unwrap();
        self.persisted_k = self.k;
        self.synced.copy_from_slice(&self.page);
        self.stats.persists += 1;
    }

    /// SIGKILL of the secondary: no persist; the page cache (disk, mark and
    /// logfile copies) stays. The restarted replayer goes on where it was.
    fn kill(&mut self) {
        let until = self.replayer.as_ref().unwrap().inconsistent_until();
        self.replayer = None;
        let r = self.open_replayer();
        assert_eq!(
            r.position(),
            self.model.ends[self.k],
            "restarts at the high-water mark"
        );
        assert_eq!(r.persisted_position(), self.model.ends[self.persisted_k]);
        assert_eq!(
            r.inconsistent_until(),
            until,
            "a kill keeps what a reboot left"
        );
        self.replayer = Some(r);
        self.trace(|| "kill".into());
        self.halted = false;
        self.stats.kills += 1;
        self.check_disk();
    }

    /// Power loss and reboot of the secondary: every page written since the
    /// last sync keeps its synced or its newer content, at random; the
    /// unsynced mark is kept, lost, cut or garbage; synced files and (an
    /// assumption of replay) the logfile copies stay. The new boot's
    /// replayer starts at the persisted position and reports the disk
    /// inconsistent at least until the position reached before.
    fn reboot(&mut self) {
        self.replayer = None;
        self.high = self.high.max(self.k);
        const PAGE: usize = 4096;
        for (p, s) in self.page.chunks_mut(PAGE).zip(self.synced.chunks(PAGE)) {
            if p != s && self.rng.random_bool(0.5) {
                p.copy_from_slice(s);
            }
        }
        // A power loss, not a clean stop: the checksums say so (dropping the
        // replayer closed them cleanly).
        mars_logger::csum::Csum::mark_unclean(&self.bdir).unwrap();
        std::fs::write(&self.bdisk, &self.page).unwrap();
        self.synced.copy_from_slice(&self.page); // what survived is on the disk now
        let hw = self.bdir.join(HW_FILE);
        match self.rng.random_range(0..4) {
            0 => {}
            1 => {
                let _ = std::fs::remove_file(&hw);
            }
            2 => {
                let b = std::fs::read(&hw).unwrap_or_default();
                let n = self.rng.random_range(0..=b.len());
                std::fs::write(&hw, &b[..n]).unwrap();
            }
            _ => {
                let junk: Vec<u8> = (0..self.rng.random_range(0..200))
                    .map(|_| self.rng.random())
                    .collect();
                std::fs::write(&hw, junk).unwrap();
            }
        }
        self.boot += 1;
        let r = self.open_replayer();
        assert_eq!(
            r.position(),
            self.model.ends[self.persisted_k],
            "after a reboot replay restarts at the persisted position"
        );
        if self.high > self.persisted_k {
            let until = r.inconsistent_until();
            assert!(
                until.is_some_and(|u| u >= self.model.ends[self.high]),
                "after a reboot the disk is reported inconsistent up to where replay had been ({}), not {until:?}",
                self.model.ends[self.high]
            );
        }
        self.replayer = Some(r);
        self.trace(|| "reboot".into());
        self.k = self.persisted_k;
        self.halted = false;
        self.stats.reboots += 1;
        self.check_disk();
    }

    /// Flip one bit of a complete record in the secondary's copy that was never applied.
    fn corrupt(&mut self) -> bool {
        let from = self.k.max(self.high);
        let mut candidates = Vec::new();
        for e in list_logfiles(&self.bdir).unwrap() {
            let bytes = std::fs::read(&e.path).unwrap();
            for r in scan_logfile(&bytes).records {
                let k = self.model.k_of(r.header.pos).unwrap();
                if k >= from {
                    candidates.push((
                        e.path.clone(),
                        e.name(),
                        k,
                        r.file_offset,
                        r.header.total_len(),
                    ));
                }
            }
        }
        if candidates.is_empty() {
            return false;
        }
        let (path, name, k, at, total) =
            candidates.swap_remove(self.rng.random_range(0..candidates.len()));
        let byte = self.rng.random_range(0..total);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at + byte).unwrap();
        b[0] ^= 1 << self.rng.random_range(0..8);
        f.write_all_at(&b, at + byte).unwrap();
        if byte < RECORD_HEADER_LEN as u64 {
            self.stats.corrupt_header += 1;
        } else {
            self.stats.corrupt_payload += 1;
        }
        self.corruption = Some(Corruption { k, file: name });
        true
    }

    fn secondary_op(&mut self, corrupt: bool) {
        if self.pause_left > 0 {
            self.pause_left -= 1;
            return;
        }
        match self.rng.random_range(0..100) {
            0..35 => self.fetch(true),
            35..75 => self.replay_step(),
            75..85 => self.persist(),
            85..89 => self.kill(),
            89..91 => self.reboot(),
            91..96 => {
                self.pause_left = self.rng.random_range(1..=30);
                self.stats.pauses += 1;
            }
            _ => {
                if corrupt && self.corruption.is_none() {
                    self.corrupt();
                }
            }
        }
    }

    /// Fetch everything, replay to the end, compare with the primary.
    fn finish(&mut self, corrupt: bool) {
        // A few more writes, so that the corruption variant always has records left to damage.
        for _ in 0..3 {
            self.log_write(OpKind::Write);
        }
        self.flush();
        self.fetch(false);
        if corrupt && self.corruption.is_none() {
            assert!(self.corrupt(), "unreplayed records to damage");
        }
        self.logger.take().unwrap().close();
        self.copy_versions();
        self.fetch(false);
        let all = self.model.recs.len();
        let mut guard = 0;
        while self.k < all && !self.halted {
            self.replay_step();
            guard += 1;
            assert!(
                guard < 100_000,
                "replay makes no progress at {} of {all}",
                self.k
            );
        }
        let adisk = std::fs::read(&self.cfg.disk).unwrap();
        assert!(
            adisk == self.prefix.at(&self.model, all),
            "primary disk after writeback equals the model"
        );
        match &self.corruption {
            None => {
                assert_eq!(self.k, all);
                assert!(
                    self.replayer.as_ref().unwrap().halted().is_none(),
                    "no halt: {:?}",
                    self.replayer.as_ref().unwrap().halted()
                );
                assert!(
                    std::fs::read(&self.bdisk).unwrap() == adisk,
                    "equal to the primary"
                );
                // Every finished logfile: our version equals the origin's.
                for e in list_logfiles(&self.bdir).unwrap() {
                    let ours = self.bdir.join(format!("version-{:09}-{SECONDARY}", e.seq));
                    let theirs = self.bdir.join(format!("version-{:09}-{PRIMARY}", e.seq));
                    if let (Ok(a), Ok(b)) = (
                        std::fs::read_to_string(ours),
                        std::fs::read_to_string(theirs),
                    ) {
                        let (a, b) = (
                            mars_logfmt::Version::from_json(&a).unwrap(),
                            mars_logfmt::Version::from_json(&b).unwrap(),
                        );
                        assert_eq!(a.version, b.version, "version of {}", e.name());
                    }
                }
            }
            Some(c) => {
                let ck = c.k;
                assert!(self.halted, "the damaged record stopped replay");
                assert_eq!(self.k, ck);
                // Stays stopped, also across a restart, and applies nothing more.
                assert!(self.replayer.as_mut().unwrap().step(u64::MAX).is_err());
                self.kill();
                assert_eq!(
                    self.k, ck,
                    "the halt persisted the position before the damage"
                );
                let r = self.replayer.as_mut().unwrap();
                assert!(r.step(u64::MAX).is_err(), "halts again after a restart");
                assert_eq!(r.position(), self.model.ends[ck]);
                assert!(
                    std::fs::read(&self.bdisk).unwrap() == self.prefix.at(&self.model, ck),
                    "the image before the damaged record, nothing after it"
                );
            }
        }
    }
}

fn run_seed(seed: u64, corrupt: bool, background: bool) -> Stats {
    let mut sim = Sim::new(seed, background);
    let actions = sim.rng.random_range(100..=250);
    for _ in 0..actions {
        if sim.rng.random_bool(0.45) {
            sim.primary_op();
        } else {
            sim.secondary_op(corrupt);
        }
    }
    sim.finish(corrupt);
    std::mem::take(&mut sim.stats)
}

fn run_all(corrupt: bool, background: bool) -> Stats {
    let mut total = Stats::default();
    let what =
        format!("replication simulation (corrupt: {corrupt}, background syncs: {background})");
    simkit::for_each_seed(64, &what, |seed| {
        total.add(&run_seed(seed, corrupt, background))
    });
    eprintln!("{total:?}");
    total
}

#[test]
fn replicas_are_prefix_images_under_kills_cuts_and_pauses() {
    run_all(false, false);
}

#[test]
fn a_damaged_record_stops_replay_exactly_there() {
    run_all(true, false);
}

/// The same with replay's disk syncs in the background, as the daemon runs it.
/// Not bit-for-bit repeatable: when a sync thread ends decides at which step the
/// persisted position moves (a failing seed may need a few runs to fail again);
/// every check holds at every step all the same.
#[test]
fn replicas_are_prefix_images_with_background_syncs() {
    let a = run_all(false, true);
    let b = run_all(true, true);
    assert!(
        a.synced_behind + b.synced_behind > 0,
        "no background sync ended after the step that started it: the path is not exercised"
    );
}

/// The stronger claim: after a kill the disk is a prefix image at every
/// moment. Three records (write 1 and write 2 to the same place, write 3
/// elsewhere) are applied and the replayer is killed without persisting: the
/// restarted one goes on at the high-water mark, re-applies nothing, and the
/// disk stays the image after all three. A reboot instead (another boot id):
/// replay starts again at the durable position, re-applies write 1 over
/// write 2 (no prefix image) and says so until it is past write 3.
#[test]
fn after_a_kill_replay_resumes_at_the_high_water_mark_and_a_reboot_is_reported() {
    let root = tempfile::tempdir().unwrap();
    let (adir, bdir) = (root.path().join("a"), root.path().join("b"));
    let (adisk, bdisk) = (root.path().join("a.img"), root.path().join("b.img"));
    for d in [&adir, &bdir] {
        std::fs::create_dir_all(d).unwrap();
    }
    for d in [&adisk, &bdisk] {
        File::create(d).unwrap().set_len(SIZE).unwrap();
    }
    let recs = [
        Rec {
            kind: OpKind::Write,
            id: 1,
            offset: 0,
            len: 4096,
        },
        Rec {
            kind: OpKind::Write,
            id: 2,
            offset: 0,
            len: 4096,
        },
        Rec {
            kind: OpKind::Write,
            id: 3,
            offset: 8192,
            len: 4096,
        },
    ];
    let logger = Logger::open(Config::new(PRIMARY, &adir, &adisk, SIZE, 7)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for r in &recs {
        rt.block_on(logger.write(r.offset, Bytes::from(pattern(r.id, r.len)), false))
            .unwrap();
    }
    logger.close();
    for e in list_logfiles(&adir).unwrap() {
        std::fs::copy(&e.path, bdir.join(e.name())).unwrap();
    }
    let images: Vec<Vec<u8>> = (0..=recs.len())
        .map(|k| {
            let mut img = vec![0u8; SIZE as usize];
            recs[..k].iter().for_each(|r| apply(&mut img, r));
            img
        })
        .collect();
    let end = 3 * (RECORD_HEADER_LEN as u64 + 4096);
    let disk = || std::fs::read(&bdisk).unwrap();

    // The real boot id: what marsd does.
    let mut r = Replayer::open(&bdir, SECONDARY, &bdisk, SIZE, 0).unwrap();
    assert_eq!(r.step(u64::MAX).unwrap().records, 3);
    let durable = r.persisted_position();
    assert!(
        durable < end,
        "the first record made replay persist its limit, no more"
    );
    drop(r); // killed before persisting: the disk (page cache) holds all three
    let mut r = Replayer::open(&bdir, SECONDARY, &bdisk, SIZE, 0).unwrap();
    assert_eq!(r.position(), end, "resumes at the high-water mark");
    assert_eq!(r.inconsistent_until(), None);
    assert_eq!(r.step(1).unwrap().records, 0, "nothing re-applied");
    assert!(disk() == images[3], "still the image after all three");
    drop(r);

    // Another boot: the durable position, and the disk reported inconsistent.
    let other = "00000000-0000-4000-8000-000000000099";
    let mut r =
        Replayer::open_with_boot_id(&bdir, SECONDARY, &bdisk, SIZE, 0, Some(other)).unwrap();
    assert_eq!(r.position(), durable);
    assert_eq!(r.inconsistent_until(), Some(end));
    assert_eq!(r.step(1).unwrap().records, 1); // write 1 again, over write 2
    assert!(!images.contains(&disk()), "no prefix image, and reported");
    assert_eq!(r.inconsistent_until(), Some(end));
    drop(r); // a kill in this boot keeps the report
    let mut r =
        Replayer::open_with_boot_id(&bdir, SECONDARY, &bdisk, SIZE, 0, Some(other)).unwrap();
    assert_eq!(r.position(), RECORD_HEADER_LEN as u64 + 4096);
    assert_eq!(r.inconsistent_until(), Some(end));
    assert_eq!(r.step(u64::MAX).unwrap().records, 2);
    assert_eq!(r.inconsistent_until(), None);
    assert!(disk() == images[3]);
}
