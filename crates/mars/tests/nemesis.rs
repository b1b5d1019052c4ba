//! The nemesis (issue 15): three real marsd, each in a network namespace of
//! its own, driven through a seeded random schedule of flushed writes,
//! SIGKILLs and restarts, planned handovers, forced failovers, link cuts and
//! heals, paused and resumed fetch and replay, and `invalidate`.
//!
//! The test keeps a model of every history a primary wrote (a forced failover
//! begins a new one from the new primary's position in the history it
//! followed) and checks:
//!
//! - after every step, every member that can reach the designated primary,
//!   knows it, and says `uptodate` holds exactly the image of the primary's
//!   history at the position it replayed (its replay paused for the read);
//! - a new primary's device is the image of some history at its position;
//! - at the end, with every link healed and every node running, members in
//!   split brain are invalidated, and all disks are byte-identical to the
//!   primary's history at its end.
//!
//! `NEMESIS_SEED=S` runs one seed, `NEMESIS_SEEDS=N` seeds 0..N (default 4,
//! about a minute), `NEMESIS_STEPS=K` steps each (default 60); `scripts/nemesis.sh` runs seeds
//! for as long as asked. Every step goes to a history file (its path is
//! printed first) so that a failure can be replayed from its seed.

// Nodes are indices into several parallel vectors (nodes, disks, running, linked).
#![allow(clippy::needless_range_loop)]

mod common;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write as _;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const BLOCK: u64 = 4096;
const NAMES: [&str; 3] = ["n0", "n1", "n2"];

/// One history: where it forked from its parent, and its writes in order.
struct Hist {
    parent: Option<(usize, u64)>,
    /// (log position after the write, offset, data)
    writes: Vec<(u64, u64, Vec<u8>)>,
}

struct Model {
    hists: Vec<Hist>,
    cur: usize,
}

impl Model {
    /// The image of history `h` at log position `pos`.
    fn image(&self, h: usize, pos: u64) -> Vec<u8> {
        let hist = &self.hists[h];
        let mut img = match hist.parent {
            Some((p, fork)) => self.image(p, pos.min(fork)),
            None => vec![0u8; SIZE as usize],
        };
        for (at, off, data) in &hist.writes {
            if *at > pos {
                break;
            }
            img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        img
    }

    /// Where history `h` ends.
    fn end(&self, h: usize) -> u64 {
        let hist = &self.hists[h];
        hist.writes
            .last()
            .map(|w| w.0)
            .or(hist.parent.map(|p| p.1))
            .unwrap_or(0)
    }
}

struct Nemesis {
    seed: u64,
    rng: StdRng,
    net: Net,
    nodes: Vec<Node>,
    running: Vec<bool>,
    linked: Vec<bool>,
    primary: usize,
    /// The history each node writes when it is primary.
    writer_hist: [Option<usize>; 3],
    model: Model,
    disks: Vec<std::path::PathBuf>,
    history: std::fs::File,
    history_path: std::path::PathBuf,
    stats: Stats,
}

/// What a run did (printed at the end; the checks must have compared disks).
#[derive(Debug, Default)]
struct Stats {
    writes: u64,
    kills: u64,
    restarts: u64,
    cuts: u64,
    handovers: u64,
    failovers: u64,
    invalidates: u64,
    pauses: u64,
    /// Disks of `uptodate` members compared with the model.
    compared: u64,
}

fn field(v: &serde_json::Value, node: &str, f: &str) -> u64 {
    member(v, node)["log"][f].as_u64().unwrap_or(0)
}

fn designated(v: &serde_json::Value) -> Option<String> {
    resource(v, "r0")?["designated_primary"]
        .as_str()
        .map(String::from)
}

impl Nemesis {
    fn new(seed: u64) -> Nemesis {
        let net = Net::new(3);
        let nodes = net.start_cluster(&NAMES);
        let disks = replicate_r0(&nodes, SIZE);
        let history_path = std::env::temp_dir().join(format!(
            "mars-nemesis-{}-seed-{seed}.log",
            std::process::id()
        ));
        eprintln!("nemesis seed {seed}: history in {}", history_path.display());
        let history = std::fs::File::create(&history_path).expect("history file");
        Nemesis {
            seed,
            rng: StdRng::seed_from_u64(seed),
            net,
            nodes,
            running: vec![true; 3],
            linked: vec![true; 3],
            primary: 0,
            writer_hist: [Some(0), None, None],
            model: Model {
                hists: vec![Hist {
                    parent: None,
                    writes: Vec::new(),
                }],
                cur: 0,
            },
            disks,
            history,
            history_path,
            stats: Stats::default(),
        }
    }

    fn note(&mut self, what: String) {
        let _ = writeln!(self.history, "{what}");
        let _ = self.history.flush();
    }

    fn fail(&self, what: String) -> ! {
        // The node directories, kept for a post-mortem.
        let keep = self.history_path.with_extension("nodes");
        for n in &self.nodes {
            let to = keep.join(&n.name);
            let _ = std::fs::create_dir_all(&to);
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(n.tmp.path())
                .arg(&to)
                .status();
        }
        eprintln!("node directories kept in {}", keep.display());
        let h = std::fs::read_to_string(&self.history_path).unwrap_or_default();
        let logs: String = self
            .nodes
            .iter()
            .map(|n| {
                let t = n.log_text();
                let tail: Vec<&str> = t.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} log (last lines):\n{}\n", n.name, tail.join("\n"))
            })
            .collect();
        panic!(
            "nemesis seed {} failed: {what}\nhistory ({}):\n{h}\n{logs}",
            self.seed,
            self.history_path.display()
        );
    }

    /// Nodes that run and are on the network.
    fn reachable(&self, i: usize) -> bool {
        self.running[i] && self.linked[i]
    }

    fn view(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.nodes[i].adm(&["view", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    // ---- the steps ----

    /// Follow the cluster's choice of primary: two primaries forced on two
    /// sides of a cut (or on a node that forgot the other's designation in a
    /// SIGKILL) are resolved by the metadata, last writer wins; the loser's
    /// history is abandoned (its writes after the fork are lost, as in DRBD
    /// and MARS after a split brain) and it reports the split brain.
    fn follow_designation(&mut self, views: &[usize]) {
        for &i in views {
            if !self.reachable(i) {
                continue;
            }
            let Some(d) = self.view(i).and_then(|v| designated(&v)) else {
                continue;
            };
            let Some(q) = NAMES.iter().position(|n| *n == d) else {
                continue;
            };
            if q == self.primary {
                continue;
            }
            let Some(h) = self.writer_hist[q] else {
                self.fail(format!("{d} is designated but never became primary here"));
            };
            self.note(format!(
                "the cluster chose {d} (history {h}) over {} (history {})",
                NAMES[self.primary], self.model.cur
            ));
            self.primary = q;
            self.model.cur = h;
            return;
        }
    }

    fn step(&mut self, k: usize) {
        self.follow_designation(&[self.primary]);
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=39 => self.write(),
            40..=49 => self.kill(),
            50..=59 => self.restart(),
            60..=66 => self.cut(),
            67..=74 => self.heal(),
            75..=80 => self.handover(),
            81..=87 => self.failover(),
            88..=93 => self.pause_or_resume(),
            _ => self.invalidate_split(),
        }
        self.check(k);
    }

    fn write(&mut self) {
        let p = self.primary;
        if !self.reachable(p) {
            return;
        }
        let Ok(mut c) = NbdClient::connect(&self.nodes[p].nbd, "r0") else {
            // Not serving (yet): a primary that restarted or just took over.
            self.note(format!("write: {} does not serve r0 now", NAMES[p]));
            return;
        };
        let n = self.rng.random_range(1..=4);
        for _ in 0..n {
            let off = self.rng.random_range(0..SIZE / BLOCK) * BLOCK;
            let len = BLOCK as usize * self.rng.random_range(1..=2);
            let len = len.min((SIZE - off) as usize);
            let data: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
            let w = c.write(off, &data, false);
            let f = c.flush();
            if !matches!((&w, &f), (Ok(0), Ok(0))) {
                self.fail(format!(
                    "write to {} at {off} failed: {w:?} {f:?}",
                    NAMES[p]
                ));
            }
            let v = self.nodes[p].view_json();
            let pos = field(&v, NAMES[p], "written");
            let cur = self.model.cur;
            if pos <= self.model.end(cur) {
                self.fail(format!(
                    "{}'s written position {pos} did not grow with a write",
                    NAMES[p]
                ));
            }
            self.model.hists[cur].writes.push((pos, off, data));
            self.stats.writes += 1;
            self.note(format!(
                "write {} bytes at {off} on {} -> {pos}",
                len, NAMES[p]
            ));
        }
    }

    fn kill(&mut self) {
        let up: Vec<usize> = (0..3).filter(|&i| self.running[i]).collect();
        if up.len() < 2 {
            return;
        }
        let i = up[self.rng.random_range(0..up.len())];
        self.nodes[i].kill9();
        self.running[i] = false;
        self.stats.kills += 1;
        self.note(format!("kill -9 {}", NAMES[i]));
    }

    fn restart(&mut self) {
        let down: Vec<usize> = (0..3).filter(|&i| !self.running[i]).collect();
        if down.is_empty() {
            return;
        }
        let i = down[self.rng.random_range(0..down.len())];
        self.nodes[i].start();
        self.running[i] = true;
        self.stats.restarts += 1;
        self.note(format!("restart {}", NAMES[i]));
    }

    fn cut(&mut self) {
        if self.linked.iter().any(|l| !l) {
            return;
        }
        let i = self.rng.random_range(0..3);
        self.net.set_link(i, false);
        self.linked[i] = false;
        self.stats.cuts += 1;
        self.note(format!("cut {}", NAMES[i]));
    }

    fn heal(&mut self) {
        for i in 0..3 {
            if !self.linked[i] {
                self.net.set_link(i, true);
                self.linked[i] = true;
                self.note(format!("heal {}", NAMES[i]));
            }
        }
    }

    /// A secondary that is reachable, knows the designated primary, and is
    /// up to date with it.
    fn uptodate_secondary(&self, i: usize) -> bool {
        if i == self.primary || !self.reachable(i) {
            return false;
        }
        self.view(i).is_some_and(|v| {
            let m = member(&v, NAMES[i]);
            designated(&v).as_deref() == Some(NAMES[self.primary])
                && m["disk"] == "uptodate"
                && m["role"] == "secondary"
        })
    }

    fn handover(&mut self) {
        let p = self.primary;
        if !self.reachable(p) {
            return;
        }
        let cands: Vec<usize> = (0..3).filter(|&i| self.uptodate_secondary(i)).collect();
        if cands.is_empty() {
            return;
        }
        let x = cands[self.rng.random_range(0..cands.len())];
        self.note(format!("handover {} -> {}", NAMES[p], NAMES[x]));
        let out = self.nodes[x].adm(&["primary", "r0"]);
        if !out.status.success() {
            // Refused (it says why): the primary stays.
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            self.note(format!("  refused: {}", err.trim()));
            if self.view(x).and_then(|v| designated(&v)).as_deref() == Some(NAMES[x]) {
                self.fail(format!("a refused handover left {} designated", NAMES[x]));
            }
            return;
        }
        self.primary = x;
        self.writer_hist[x] = Some(self.model.cur);
        self.stats.handovers += 1;
        // Same history: the new primary's device is its image at its end.
        let end = self.model.end(self.model.cur);
        self.check_primary_image(x, Some(end));
    }

    fn failover(&mut self) {
        let p = self.primary;
        // Mostly when the primary is gone or cut off, sometimes while it runs.
        if self.reachable(p) && self.rng.random_range(0..4) != 0 {
            return;
        }
        let cands: Vec<usize> = (0..3)
            .filter(|&i| i != p && self.reachable(i))
            .filter(|&i| {
                self.view(i).is_some_and(|v| {
                    let m = member(&v, NAMES[i]);
                    m["split_brain"] == false
                        && matches!(m["disk"].as_str(), Some("uptodate" | "outdated"))
                })
            })
            .collect();
        if cands.is_empty() {
            return;
        }
        let x = cands[self.rng.random_range(0..cands.len())];
        self.note(format!(
            "primary --force on {} (was {})",
            NAMES[x], NAMES[p]
        ));
        let out = self.nodes[x].adm(&["primary", "--force", "r0"]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            self.note(format!("  refused: {}", err.trim()));
            return;
        }
        self.primary = x;
        self.stats.failovers += 1;
        let v = self.nodes[x].view_json();
        let fork = field(&v, NAMES[x], "written");
        // The history it followed: the one whose image its device is.
        let img = self.primary_image(x);
        let parent = (0..self.model.hists.len())
            .rev()
            .find(|&h| fork <= self.model.end(h) && self.model.image(h, fork) == img);
        let Some(parent) = parent else {
            let at = (0..self.model.hists.len())
                .flat_map(|h| {
                    let img = &img;
                    let m = &self.model;
                    let mut ends: Vec<u64> = m.hists[h].writes.iter().map(|w| w.0).collect();
                    ends.insert(0, m.hists[h].parent.map_or(0, |p| p.1));
                    ends.into_iter()
                        .filter(move |&e| m.image(h, e) == *img)
                        .map(move |e| (h, e))
                })
                .collect::<Vec<_>>();
            self.fail(format!(
                "{} became primary at {fork} with a device that is no history's image there (it is the image of (history, position) {at:?}):\n{v:#}",
                NAMES[x]
            ));
        };
        self.model.hists.push(Hist {
            parent: Some((parent, fork)),
            writes: Vec::new(),
        });
        self.model.cur = self.model.hists.len() - 1;
        self.writer_hist[x] = Some(self.model.cur);
        self.note(format!(
            "  {} primary at {fork}: history {} forks from {parent}",
            NAMES[x], self.model.cur
        ));
    }

    fn pause_or_resume(&mut self) {
        let i = self.rng.random_range(0..3);
        if i == self.primary || !self.running[i] {
            return;
        }
        let what = [
            "pause-fetch",
            "resume-fetch",
            "pause-replay",
            "resume-replay",
        ][self.rng.random_range(0..4)];
        let out = self.nodes[i].adm(&[what, "r0"]);
        self.stats.pauses += 1;
        self.note(format!(
            "{what} on {}: {}",
            NAMES[i],
            if out.status.success() {
                "ok"
            } else {
                "refused"
            }
        ));
    }

    fn invalidate_split(&mut self) {
        for i in 0..3 {
            if i == self.primary || !self.reachable(i) {
                continue;
            }
            let split = self
                .view(i)
                .is_some_and(|v| member(&v, NAMES[i])["split_brain"] == true);
            if split {
                let out = self.nodes[i].adm(&["invalidate", "r0"]);
                self.stats.invalidates += 1;
                self.note(format!(
                    "invalidate on {}: {}",
                    NAMES[i],
                    if out.status.success() {
                        "ok"
                    } else {
                        "refused"
                    }
                ));
            }
        }
    }

    // ---- the checks ----

    fn primary_image(&self, p: usize) -> Vec<u8> {
        let mut img = None;
        let served = poll(Duration::from_secs(30), || {
            img = NbdClient::connect(&self.nodes[p].nbd, "r0")
                .ok()
                .and_then(|mut c| c.read(0, SIZE as u32).ok())
                .filter(|(err, _)| *err == 0)
                .map(|(_, data)| data);
            img.is_some()
        });
        match img {
            Some(img) if served => img,
            _ => self.fail(format!("{} does not serve r0", NAMES[p])),
        }
    }

    fn check_primary_image(&mut self, p: usize, at: Option<u64>) {
        let img = self.primary_image(p);
        let cur = self.model.cur;
        let at = at.unwrap_or_else(|| self.model.end(cur));
        if img != self.model.image(cur, at) {
            self.fail(format!(
                "{}'s device is not its history's image at {at}",
                NAMES[p]
            ));
        }
    }

    /// Every member that can reach the primary, knows it and says `uptodate`
    /// holds the image of the primary's history at its replayed position.
    fn check(&mut self, k: usize) {
        let p = self.primary;
        if !self.reachable(p) {
            return;
        }
        for i in 0..3 {
            if i == p || !self.reachable(i) {
                continue;
            }
            // Given a moment to catch up (more comparisons); not uptodate after
            // it, the member is not checked this step.
            let mut v = None;
            poll(Duration::from_millis(1500), || {
                v = self.view(i);
                v.as_ref().is_none_or(|v| {
                    let m = member(v, NAMES[i]);
                    let up = designated(v).as_deref() == Some(NAMES[p]) && m["disk"] == "uptodate";
                    // Not worth waiting for: split, or fetch or replay paused.
                    let stuck = m["split_brain"] == true
                        || m["paused"]["fetch"] == true
                        || m["paused"]["replay"] == true;
                    up || stuck
                })
            });
            let Some(v) = v else { continue };
            let m = member(&v, NAMES[i]);
            if designated(&v).as_deref() != Some(NAMES[p]) || m["disk"] != "uptodate" {
                continue;
            }
            // A still image: replay paused while the disk is read.
            let paused_before = m["paused"]["replay"] == true;
            if !self.nodes[i].adm(&["pause-replay", "r0"]).status.success() {
                continue;
            }
            let v = self.view(i);
            let disk = read(&self.disks[i]);
            if !paused_before {
                self.nodes[i].adm(&["resume-replay", "r0"]);
            }
            let Some(v) = v else { continue };
            let m = member(&v, NAMES[i]);
            if designated(&v).as_deref() != Some(NAMES[p]) || m["disk"] != "uptodate" {
                continue;
            }
            let pos = field(&v, NAMES[i], "replayed");
            let cur = self.model.cur;
            if pos > self.model.end(cur) {
                self.fail(format!(
                    "step {k}: {} says uptodate at {pos}, beyond the primary's history end {}:\n{v:#}",
                    NAMES[i],
                    self.model.end(cur)
                ));
            }
            self.stats.compared += 1;
            if disk != self.model.image(cur, pos) {
                let first = disk
                    .iter()
                    .zip(self.model.image(cur, pos))
                    .position(|(a, b)| *a != b);
                self.fail(format!(
                    "step {k}: {} says uptodate at {pos} but its disk differs from the primary's history there (first at byte {first:?}):\n{v:#}",
                    NAMES[i]
                ));
            }
        }
    }

    /// Heal, restart, invalidate split-brain members; all disks end equal.
    fn finish(&mut self) {
        self.note("finish: heal, restart, resume".into());
        self.heal();
        for i in 0..3 {
            if !self.running[i] {
                self.nodes[i].start();
                self.running[i] = true;
            }
        }
        // Every node agrees on the primary (after the metadata settled).
        let mut ds: Vec<Option<String>> = Vec::new();
        let agree = poll(Duration::from_secs(60), || {
            ds = (0..3)
                .map(|i| self.view(i).and_then(|v| designated(&v)))
                .collect();
            ds[0].is_some() && ds.iter().all(|d| *d == ds[0])
        });
        if !agree {
            self.fail(format!("the nodes do not agree on the primary: {ds:?}"));
        }
        self.follow_designation(&[0, 1, 2]);
        let p = self.primary;
        for i in 0..3 {
            if i != p {
                self.nodes[i].adm(&["resume-fetch", "r0"]);
                self.nodes[i].adm(&["resume-replay", "r0"]);
            }
        }
        // The designated primary serves again (after a restart it recovers).
        self.check_primary_image(p, None);
        let end = self.model.end(self.model.cur);
        let caught_up = poll(Duration::from_secs(180), || {
            let mut done = true;
            for i in 0..3 {
                if i == p {
                    continue;
                }
                let Some(v) = self.view(i) else {
                    done = false;
                    continue;
                };
                let m = member(&v, NAMES[i]);
                // The operator's step: a member in split brain, or one whose
                // log nobody holds any more (it was away while the others
                // were invalidated and dropped their old logs, as MARS asks
                // too), is copied anew.
                let needs_copy = m["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("no longer has the log"));
                if m["split_brain"] == true || needs_copy {
                    let out = self.nodes[i].adm(&["invalidate", "r0"]);
                    let ok = out.status.success();
                    self.note(format!("finish: invalidate {}: {ok}", NAMES[i]));
                    done = false;
                    continue;
                }
                if m["disk"] != "uptodate"
                    || field(&v, NAMES[i], "replayed") < end
                    || designated(&v).as_deref() != Some(NAMES[p])
                {
                    done = false;
                }
            }
            done
        });
        if !caught_up {
            let views: Vec<String> = (0..3)
                .map(|i| format!("{:#}", self.view(i).unwrap_or_default()))
                .collect();
            self.fail(format!(
                "the members do not all reach the primary's end {end}:\n{}",
                views.join("\n")
            ));
        }
        let want = self.model.image(self.model.cur, end);
        for i in 0..3 {
            if i == p {
                continue;
            }
            // Replay settled at the end: read the disk with replay paused.
            self.nodes[i].adm_ok(&["pause-replay", "r0"]);
            let disk = read(&self.disks[i]);
            self.nodes[i].adm_ok(&["resume-replay", "r0"]);
            if disk != want {
                self.fail(format!(
                    "{}'s disk differs from the primary's history at its end",
                    NAMES[i]
                ));
            }
        }
        self.note("finish: all disks equal".into());
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{name} is a number")))
}

#[test]
fn members_hold_one_history_under_a_nemesis() {
    let seeds: Vec<u64> = match env_u64("NEMESIS_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("NEMESIS_SEEDS").unwrap_or(4)).collect(),
    };
    let steps = env_u64("NEMESIS_STEPS").unwrap_or(60) as usize;
    let started = Instant::now();
    let mut compared = 0;
    for seed in seeds {
        let mut n = Nemesis::new(seed);
        for k in 0..steps {
            n.step(k);
        }
        n.finish();
        eprintln!(
            "nemesis seed {seed}: {steps} steps, {} histories, {:?}, {:.0?} so far",
            n.model.hists.len(),
            n.stats,
            started.elapsed()
        );
        compared += n.stats.compared;
        let _ = std::fs::remove_file(&n.history_path);
    }
    assert!(
        compared > 0,
        "no step compared a member's disk with the model"
    );
}
