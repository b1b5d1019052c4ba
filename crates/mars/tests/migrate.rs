//! `marsadm migrate RES NODE [--leave]` (issue 19 item 4) with three real
//! marsd while a client writes (the test kit's NBD client, and qemu-io in the
//! first test): NODE joins, syncs, takes over, and the former
//! primary is removed; interrupted by SIGKILL of the destination mid-sync or
//! of the old primary, and resumed by running the same command again.

mod common;
use common::*;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// The writer cycles over this many blocks at the start of the device.
const BLOCKS: usize = 256;

fn block(b: usize, gen: u64) -> Vec<u8> {
    let mut d = vec![(b % 251) as u8; BLOCK];
    d[..8].copy_from_slice(&gen.to_le_bytes());
    d
}

fn gen_at(disk: &[u8], b: usize) -> u64 {
    u64::from_le_bytes(disk[b * BLOCK..b * BLOCK + 8].try_into().unwrap())
}

/// What the client wrote: per block the last acknowledged generation, and
/// the one write that was in flight when the connection ended (it may or
/// may not have reached the log).
struct Written {
    acked: Vec<u64>,
    in_flight: Option<(usize, u64)>,
}

impl Written {
    fn check(&self, disk: &[u8], who: &str) {
        for (b, &g) in self.acked.iter().enumerate() {
            let on = gen_at(disk, b);
            let untouched = vec![(b % 253) as u8 + 1; BLOCK];
            if g == 0 && disk[b * BLOCK..(b + 1) * BLOCK] == untouched[..] {
                continue; // never written (the pattern of `setup`)
            }
            let maybe = self.in_flight == Some((b, on));
            assert!(
                on == g || maybe,
                "{who}: block {b} holds generation {on}, the last acknowledged is {g}"
            );
            assert_eq!(
                disk[b * BLOCK + 8..(b + 1) * BLOCK],
                block(b, on)[8..],
                "{who}: block {b}"
            );
        }
    }
}

/// A client writing to `node`'s device (FUA, one request at a time) until
/// stopped or its connection ends (the handover, a kill).
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Written>,
}

impl Writer {
    fn start(node: &Node) -> Writer {
        let mut c = node.nbd("r0");
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut w = Written {
                acked: vec![0; BLOCKS],
                in_flight: None,
            };
            let mut gen = 0u64;
            while !s.load(Ordering::Relaxed) {
                gen += 1;
                let b = (gen as usize * 7) % BLOCKS;
                match c.write((b * BLOCK) as u64, &block(b, gen), true) {
                    Ok(0) => {
                        w.acked[b] = gen;
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        w.in_flight = Some((b, gen));
                        break;
                    }
                }
            }
            w
        });
        Writer {
            stop,
            count,
            thread,
        }
    }

    fn wait_writes(&self, n: u64) {
        wait_for("the client's writes", Duration::from_secs(30), || {
            self.count.load(Ordering::Relaxed) >= n || self.thread.is_finished()
        });
        assert!(
            self.count.load(Ordering::Relaxed) >= n,
            "the writer stopped"
        );
    }

    fn finish(self) -> Written {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("writer")
    }
}

/// The client of the test: qemu-io, one process per 4 KiB write
/// (FUA through `-c flush`), into blocks after the test kit writer's. It
/// writes to the first of `addrs` that serves and goes on to the next when
/// a write fails (the handover: NBD has no redirect, a client reconnects).
struct QemuWriter {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<QemuWritten>,
}

/// Blocks the qemu-io writer cycles over, after the kit writer's.
const QEMU_BLOCKS: usize = 64;

/// Per block the pattern byte last acknowledged and those of writes that
/// failed after it (they may or may not have reached the log); and how many
/// writes each address acknowledged.
struct QemuWritten {
    acked: Vec<Option<u8>>,
    maybe: Vec<Vec<u8>>,
    /// Every pattern written or tried per block.
    tried: Vec<Vec<u8>>,
    per_addr: Vec<u64>,
}

impl QemuWriter {
    fn start(uris: Vec<String>) -> QemuWriter {
        require_tool("qemu-io", "qemu-utils");
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut w = QemuWritten {
                acked: vec![None; QEMU_BLOCKS],
                maybe: vec![Vec::new(); QEMU_BLOCKS],
                tried: vec![Vec::new(); QEMU_BLOCKS],
                per_addr: vec![0; uris.len()],
            };
            let mut at = 0;
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let k = (i * 5) % QEMU_BLOCKS;
                let p = (i % 250) as u8 + 1;
                let off = (BLOCKS + k) * BLOCK;
                w.tried[k].push(p);
                let out = Command::new("qemu-io")
                    .args(["-f", "raw", &uris[at]])
                    .args(["-c", &format!("write -P {p} {off} 4k"), "-c", "flush"])
                    .output()
                    .expect("run qemu-io");
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                if out.status.success()
                    && text.contains("wrote 4096/4096")
                    && !text.contains("failed")
                {
                    w.acked[k] = Some(p);
                    w.maybe[k].clear();
                    w.per_addr[at] += 1;
                    n.fetch_add(1, Ordering::Relaxed);
                } else {
                    // Not acknowledged: it may have reached the log.
                    w.maybe[k].push(p);
                    if at + 1 < uris.len() && w.per_addr[at] > 0 {
                        at += 1;
                    }
                    std::thread::sleep(Duration::from_millis(50)); // pacing retries against a device not served yet, not synchronisation
                }
            }
            w
        });
        QemuWriter {
            stop,
            count,
            thread,
        }
    }

    fn wait_writes(&self, n: u64) {
        wait_for("qemu-io's writes", Duration::from_secs(60), || {
            self.count.load(Ordering::Relaxed) >= n
        });
    }

    fn finish(self) -> QemuWritten {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("qemu-io writer")
    }
}

impl QemuWritten {
    /// A disk that stopped following at some moment (a member removed while
    /// qemu-io went on writing to the new primary): equal to `current`
    /// outside qemu-io's blocks; in them, some pattern qemu-io wrote there,
    /// or the block as it was.
    fn check_earlier(&self, disk: &[u8], current: &[u8], who: &str) {
        let (lo, hi) = (BLOCKS * BLOCK, (BLOCKS + QEMU_BLOCKS) * BLOCK);
        assert_eq!(disk.len(), current.len());
        if let Some(i) = (0..disk.len()).find(|&i| (i < lo || i >= hi) && disk[i] != current[i]) {
            panic!("{who}'s disk differs from gamma's at byte {i}");
        }
        for k in 0..QEMU_BLOCKS {
            let b = BLOCKS + k;
            let got = &disk[b * BLOCK..(b + 1) * BLOCK];
            let ok = |p: u8| got.iter().all(|&x| x == p);
            assert!(
                ok((b % 253) as u8 + 1) || self.tried[k].iter().any(|&p| ok(p)),
                "{who}: qemu-io's block {b} holds {:?}.., never written there",
                &got[..4]
            );
        }
    }

    fn check(&self, disk: &[u8], who: &str) {
        for k in 0..QEMU_BLOCKS {
            let b = BLOCKS + k;
            let got = &disk[b * BLOCK..(b + 1) * BLOCK];
            let ok = |p: u8| got.iter().all(|&x| x == p);
            let untouched = (b % 253) as u8 + 1;
            let fine = match self.acked[k] {
                Some(p) => ok(p) || self.maybe[k].iter().any(|&m| ok(m)),
                None => ok(untouched) || self.maybe[k].iter().any(|&m| ok(m)),
            };
            assert!(
                fine,
                "{who}: qemu-io's block {b} holds {:?}.., acknowledged {:?}, maybe {:?}",
                &got[..4],
                self.acked[k],
                self.maybe[k]
            );
        }
    }
}

fn members(v: &serde_json::Value) -> Vec<String> {
    let mut m: Vec<String> = resource(v, "r0").unwrap()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node"].as_str().unwrap().to_string())
        .collect();
    m.sort();
    m
}

/// r0 on alpha (its disk filled with a pattern of `size` bytes, so that a
/// full sync moves data), beta a secondary, up to date. Disks: alpha, beta.
fn setup(nodes: &[Node], size: u64) -> Vec<std::path::PathBuf> {
    let a = nodes[0].path("a.img");
    let mut data = vec![0u8; size as usize];
    for (i, c) in data.chunks_mut(BLOCK).enumerate() {
        c.fill((i % 253) as u8 + 1);
    }
    std::fs::write(&a, &data).unwrap();
    nodes[0].adm_ok(&["create-resource", "r0", a.to_str().unwrap()]);
    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let b = nodes[1].disk("b.img", size);
    nodes[1].adm_ok(&["join-resource", "r0", b.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "120"]);
    vec![a, b]
}

fn spawn_migrate(node: &Node, args: &[&str]) -> Child {
    Command::new(MARSADM)
        .arg("--dir")
        .arg(&node.dir)
        .args(["migrate", "r0", &node.name])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("marsadm migrate")
}

/// Once gamma is a member (migrate joined it), slow its sync down and wait
/// until it is under way.
fn slow_sync_under_way(gamma: &Node) {
    gamma.wait_view("gamma a member", |v| !member(v, "gamma").is_null());
    gamma.adm_ok(&["set-rate", "r0", "--sync", "4M"]);
    gamma.wait_view("gamma's sync under way", |v| {
        let s = &member(v, "gamma")["sync"];
        s["done"].as_u64() > Some(0) && s["done"].as_u64() < s["total"].as_u64()
    });
}

/// After a migration to gamma with --leave: gamma serves r0, alpha is no
/// member and has removed its directory for r0.
fn check_migrated(nodes: &[Node]) {
    let v = nodes[2].view_json();
    let r = resource(&v, "r0").unwrap();
    assert_eq!(r["designated_primary"], "gamma", "{v:#}");
    assert_eq!(r["actual_primary"], "gamma", "{v:#}");
    assert_eq!(r["device"], format!("nbd://{}/r0", nodes[2].nbd), "{v:#}");
    assert_eq!(members(&v), ["beta", "gamma"], "{v:#}");
    nodes[0].wait_view("alpha no longer a member", |v| {
        members(v) == ["beta", "gamma"]
    });
    let rdir = nodes[0].dir.join("resources").join("r0");
    wait_for(
        "alpha to remove its r0 directory",
        Duration::from_secs(30),
        || !rdir.exists(),
    );
    nodes[1].wait_view("beta sees the new members", |v| {
        members(v) == ["beta", "gamma"]
    });
}

/// Stop every node; all three disks are equal and hold every acknowledged write.
fn check_disks(nodes: &mut [Node], disks: &[std::path::PathBuf], w: &Written) {
    check_disks_but(nodes, disks, w, None);
}

/// [`check_disks`]; with `q`, alpha (removed while qemu-io went on writing
/// to gamma) holds gamma's data as of its removal in qemu-io's blocks.
fn check_disks_but(
    nodes: &mut [Node],
    disks: &[std::path::PathBuf],
    w: &Written,
    q: Option<&QemuWritten>,
) {
    nodes[2].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    for n in nodes.iter_mut() {
        n.stop();
    }
    let g = read(&disks[2]);
    w.check(&g, "gamma");
    if let Some(q) = q {
        q.check(&g, "gamma's disk");
        q.check_earlier(&read(&disks[0]), &g, "alpha");
    }
    let all = [(&disks[0], "alpha"), (&disks[1], "beta")];
    for (d, who) in all.into_iter().skip(usize::from(q.is_some())) {
        let x = read(d);
        assert_eq!(x.len(), g.len());
        if let Some(i) = (0..g.len()).find(|&i| x[i] != g[i]) {
            panic!("{who}'s disk differs from gamma's at byte {i}");
        }
    }
}

#[test]
fn migrate_moves_a_resource_while_a_client_writes() {
    let mut nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let size = 16 * MIB;
    let mut disks = setup(&nodes, size);
    let g = nodes[2].disk("g.img", size);
    let g_arg = g.to_str().unwrap().to_string();
    let small = nodes[2].disk("small.img", MIB);
    let w = Writer::start(&nodes[0]);
    w.wait_writes(50);
    // qemu-io writes too, to alpha and after the handover to gamma.
    let qw = QemuWriter::start(vec![nodes[0].uri("r0"), nodes[2].uri("r0")]);
    qw.wait_writes(5);

    // Refused, changing nothing.
    let err = nodes[0].adm_err(&["migrate", "r0", "gamma", "--disk", "/x"]);
    assert!(
        err.contains("run `marsadm migrate r0 gamma --disk /x` on gamma"),
        "{err}"
    );
    let err = nodes[2].adm_err(&["migrate", "r0", "delta"]);
    assert!(err.contains("delta is not a node of this cluster"), "{err}");
    let err = nodes[2].adm_err(&["migrate", "r9", "gamma", "--disk", &g_arg]);
    assert!(err.contains("unknown resource r9"), "{err}");
    let err = nodes[2].adm_err(&["migrate", "r0", "gamma"]);
    assert!(err.contains("--disk PATH"), "{err}");
    let err = nodes[2].adm_err(&["migrate", "r0", "gamma", "--disk", small.to_str().unwrap()]);
    assert!(err.contains("gamma cannot take r0"), "{err}");
    assert!(err.contains("needs"), "{err}");
    assert!(member(&nodes[2].view_json(), "gamma").is_null());

    let out = nodes[2].adm(&[
        "migrate",
        "r0",
        "gamma",
        "--leave",
        "--disk",
        &g_arg,
        "--timeout",
        "180",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "migrate failed: {stderr}\n{}",
        nodes[2].log_text()
    );
    assert!(stdout.contains("gamma is primary"), "{stdout}");
    assert!(stdout.contains("alpha is no longer a member"), "{stdout}");
    assert!(stderr.contains("joined r0"), "{stderr}");
    // The client wrote until alpha stopped serving at the handover.
    let written = w.finish();
    assert!(
        written.in_flight.is_some(),
        "the client's connection outlived the handover"
    );
    // qemu-io goes on writing, now to gamma.
    let before = qw.count.load(Ordering::Relaxed);
    qw.wait_writes(before + 5);
    let qwritten = qw.finish();
    assert!(
        qwritten.per_addr.iter().all(|&n| n > 0),
        "qemu-io wrote to alpha and to gamma: {:?}",
        qwritten.per_addr
    );
    check_migrated(&nodes);
    // The device on gamma holds the client's acknowledged writes.
    let mut c = nodes[2].nbd("r0");
    let (err, data) = c.read(0, (BLOCKS * BLOCK) as u32).unwrap();
    assert_eq!(err, 0);
    written.check(&data, "gamma's device");
    let (err, data) = c.read(0, ((BLOCKS + QEMU_BLOCKS) * BLOCK) as u32).unwrap();
    assert_eq!(err, 0);
    qwritten.check(&data, "gamma's device");
    // Done: running it again changes nothing and says so.
    let out = nodes[2].adm_ok(&["migrate", "r0", "gamma", "--leave"]);
    assert!(out.contains("no former primary recorded"), "{out}");
    disks.push(g);
    check_disks_but(&mut nodes, &disks, &written, Some(&qwritten));
}

#[test]
fn migrate_resumes_after_the_destination_is_killed_mid_sync() {
    let mut nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let size = 128 * MIB;
    let mut disks = setup(&nodes, size);
    let g = nodes[2].disk("g.img", size);
    let g_arg = g.to_str().unwrap().to_string();
    let w = Writer::start(&nodes[0]);
    w.wait_writes(20);
    let mut m = spawn_migrate(&nodes[2], &["--leave", "--disk", &g_arg]);
    slow_sync_under_way(&nodes[2]);
    // The destination dies mid-sync, and the operator's migrate with it.
    nodes[2].kill9();
    let _ = m.kill();
    let _ = m.wait();
    nodes[2].start();
    nodes[2].adm_ok(&["set-rate", "r0", "--sync", "0"]);
    // Resumed without --leave: gamma takes over, alpha stays a member.
    let out = nodes[2].adm(&["migrate", "r0", "gamma", "--timeout", "180"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "migrate failed: {stderr}\n{}",
        nodes[2].log_text()
    );
    assert!(!stderr.contains("joined"), "joined again: {stderr}");
    let written = w.finish();
    let v = nodes[2].view_json();
    assert_eq!(members(&v), ["alpha", "beta", "gamma"], "{v:#}");
    assert_eq!(resource(&v, "r0").unwrap()["actual_primary"], "gamma");
    // Later, --leave alone removes the former primary (recorded at the start).
    let out = nodes[2].adm_ok(&["migrate", "r0", "gamma", "--leave"]);
    assert!(out.contains("alpha is no longer a member"), "{out}");
    check_migrated(&nodes);
    disks.push(g);
    check_disks(&mut nodes, &disks, &written);
}

#[test]
fn migrate_resumes_after_the_old_primary_is_killed() {
    let mut nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let size = 128 * MIB;
    let mut disks = setup(&nodes, size);
    let g = nodes[2].disk("g.img", size);
    let g_arg = g.to_str().unwrap().to_string();
    let w = Writer::start(&nodes[0]);
    w.wait_writes(20);
    let mut m = spawn_migrate(
        &nodes[2],
        &["--leave", "--disk", &g_arg, "--timeout", "300"],
    );
    slow_sync_under_way(&nodes[2]);
    nodes[0].kill9();
    let written = w.finish();
    nodes[2].wait_view("alpha seen down", |v| {
        view_nodes(v)
            .iter()
            .any(|(n, alive)| n == "alpha" && !alive)
    });
    // The sync goes on from beta; then the handover cannot be planned.
    nodes[2].adm_ok(&["set-rate", "r0", "--sync", "0"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = m.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "migrate did not end");
        std::thread::sleep(Duration::from_millis(100)); // polling a child, not synchronisation
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(m.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        !status.success(),
        "migrate succeeded without alpha: {stderr}"
    );
    assert!(stderr.contains("alpha cannot be reached"), "{stderr}");
    assert!(stderr.contains("primary --force r0"), "{stderr}");
    // Run again while alpha is down: refused at once, nothing changed.
    let err = nodes[2].adm_err(&["migrate", "r0", "gamma", "--leave"]);
    assert!(err.contains("alpha cannot be reached"), "{err}");
    let v = nodes[2].view_json();
    assert_eq!(resource(&v, "r0").unwrap()["designated_primary"], "alpha");
    // Alpha back: the same command goes on and completes.
    nodes[0].start();
    nodes[2].wait_view("alpha seen up", |v| {
        all_alive(v, &["alpha", "beta", "gamma"])
    });
    let out = nodes[2].adm(&["migrate", "r0", "gamma", "--leave", "--timeout", "180"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "migrate failed: {stderr}\n{}",
        nodes[2].log_text()
    );
    assert!(!stderr.contains("joined"), "joined again: {stderr}");
    check_migrated(&nodes);
    disks.push(g);
    check_disks(&mut nodes, &disks, &written);
}
