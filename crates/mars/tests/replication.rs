//! Three real marsd processes replicating one resource: full sync while the
//! primary writes, fetch and replay, SIGKILL of a secondary, only differing
//! blocks cross the network.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn cluster3() -> Vec<Node> {
    start_cluster(&["alpha", "beta", "gamma"])
}

fn qemu_write(n: &Node, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &n.uri("r0")]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn secondaries_sync_fetch_replay_and_survive_sigkill() {
    require_tool("qemu-io", "qemu-utils");
    let mut nodes = cluster3();
    let size = 32 * MIB;
    // The primary's disk starts with data that is in no log: only a sync can carry it.
    let a_disk = nodes[0].disk("a.img", size);
    let pre: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&a_disk, &pre).unwrap();
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    qemu_write(
        &nodes[0],
        &["write -P 0x11 0 4M", "write -P 0x22 10M 1M", "flush"],
    );

    for n in &nodes[1..] {
        n.wait_view("r0 known", |v| resource(v, "r0").is_some());
    }
    let b_disk = nodes[1].disk("b.img", size);
    let g_disk = nodes[2].disk("g.img", size);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    qemu_write(
        &nodes[0],
        &["write -P 0x33 2M 3M", "write -z 20M 1M", "discard 24M 1M"],
    );
    nodes[2].adm_ok(&["join-resource", "r0", g_disk.to_str().unwrap()]);
    qemu_write(&nodes[0], &["write -P 0x44 30M 2M", "flush"]);

    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let v = nodes[0].view_json();
    for m in ["beta", "gamma"] {
        assert_eq!(member(&v, m)["role"], "secondary", "{v:#}");
        assert_eq!(member(&v, m)["disk"], "uptodate", "{v:#}");
    }
    let a = read(&a_disk);
    assert!(read(&b_disk) == a, "beta's disk equals the primary's");
    assert!(read(&g_disk) == a, "gamma's disk equals the primary's");

    // A secondary killed mid-stream catches up after restart.
    qemu_write(&nodes[0], &["write -P 0x55 6M 2M"]);
    nodes[1].kill9();
    qemu_write(
        &nodes[0],
        &["write -P 0x66 7M 2M", "write -P 0x77 12M 1M", "flush"],
    );
    nodes[1].start();
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let a = read(&a_disk);
    assert!(read(&b_disk) == a, "beta caught up after SIGKILL");
    assert!(read(&g_disk) == a, "gamma too");
}

#[test]
fn join_with_a_nearly_equal_disk_moves_only_the_differing_blocks() {
    let nodes = cluster3();
    let size = 16 * MIB;
    let a_disk = nodes[0].disk("a.img", size);
    let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    std::fs::write(&a_disk, &data).unwrap();
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    // beta's disk: the same, except three blocks.
    let mut nearly = data.clone();
    for blk in [1u64, 7, 12] {
        nearly[(blk * MIB + 100) as usize] ^= 0xff;
    }
    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    nodes[2].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let b_disk = nodes[1].disk("b.img", size);
    std::fs::write(&b_disk, &nearly).unwrap();
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let v = nodes[1].wait_view("beta reports its sync", |v| {
        member(v, "beta")["disk"] == "uptodate"
    });
    assert_eq!(member(&v, "beta")["sync_blocks_transferred"], 3, "{v:#}");
    assert!(read(&b_disk) == data);
    // Logfiles are deleted only once every member has replayed them.
    nodes[1].adm_ok(&["pause-replay", "r0"]);
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.write(0, &[9u8; 8192], true).unwrap(), 0);
    nodes[0].adm_ok(&["log-rotate", "r0"]);
    let rdir = nodes[0].dir.join("resources/r0");
    wait_for(
        "writeback persisted",
        std::time::Duration::from_secs(20),
        || rdir.join("version-000000001-alpha").exists(),
    );
    let out = nodes[0].adm_ok(&["log-delete", "r0"]);
    assert!(
        out.contains("not every member") && out.contains("beta"),
        "{out}"
    );
    assert!(rdir.join("log-000000001-alpha").exists());
    nodes[1].adm_ok(&["resume-replay", "r0"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    wait_for(
        "log-delete once beta replayed",
        std::time::Duration::from_secs(30),
        || {
            nodes[0].adm_ok(&["log-delete", "r0"]);
            !rdir.join("log-000000001-alpha").exists()
        },
    );
    // Refusals: joining twice, a disk too small.
    let err = nodes[1].adm_err(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    assert!(err.contains("already a member"), "{err}");
    let small = nodes[2].disk("small.img", MIB);
    let err = nodes[2].adm_err(&["join-resource", "r0", small.to_str().unwrap()]);
    assert!(err.contains("needs"), "{err}");
}

const BLOCK: u64 = 4096;

fn pattern(block: u64, generation: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    for i in 0..BLOCK / 16 {
        v.extend_from_slice(&block.to_le_bytes());
        v.extend_from_slice(&(generation ^ (i << 40)).to_le_bytes());
    }
    v
}

/// The generation a block holds (0: never written); panics on anything that is no write's content.
fn generation_of(block: u64, data: &[u8]) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let g = u64::from_le_bytes(data[8..16].try_into().unwrap());
    assert_eq!(
        data,
        &pattern(block, g)[..],
        "block {block} holds bytes no write ever wrote (torn or foreign)"
    );
    g
}

/// Anytime consistency: whenever replay is paused, the secondary's disk is the
/// primary's image after some prefix of the writes, never anything else.
#[test]
fn paused_secondary_always_holds_a_prefix_of_the_writes() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let nodes = cluster3();
    let blocks = 1024u64;
    let a_disk = nodes[0].disk("a.img", blocks * BLOCK);
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let b_disk = nodes[1].disk("b.img", blocks * BLOCK);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);

    // sent[g-1] = block written with generation g (recorded before the write is sent).
    let sent: Arc<Mutex<Vec<u64>>> = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sent, acked, stop, addr) = (
            sent.clone(),
            acked.clone(),
            stop.clone(),
            nodes[0].nbd.clone(),
        );
        std::thread::spawn(move || {
            let mut c = NbdClient::connect(&addr, "r0").unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            while !stop.load(Ordering::Relaxed) {
                let b = rng.random_range(0..blocks);
                let g = {
                    let mut s = sent.lock().unwrap();
                    s.push(b);
                    s.len() as u64
                };
                assert_eq!(c.write(b * BLOCK, &pattern(b, g), g % 50 == 0).unwrap(), 0);
                acked.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for round in 1..=6u64 {
        wait_for("writes", std::time::Duration::from_secs(60), || {
            acked.load(Ordering::Relaxed) >= round * 300
        });
        nodes[1].adm_ok(&["pause-replay", "r0"]);
        let disk = read(&b_disk);
        let sent_now = sent.lock().unwrap().clone();
        let gens: Vec<u64> = (0..blocks)
            .map(|b| generation_of(b, &disk[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]))
            .collect();
        let k = *gens.iter().max().unwrap();
        let mut expected = vec![0u64; blocks as usize];
        for (i, &b) in sent_now.iter().take(k as usize).enumerate() {
            expected[b as usize] = i as u64 + 1;
        }
        assert_eq!(
            gens, expected,
            "round {round}: the secondary is not the image after the first {k} writes"
        );
        nodes[1].adm_ok(&["resume-replay", "r0"]);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    assert!(read(&b_disk) == read(&a_disk));
}

/// A secondary that joins while the primary is in its second logfile keeps one
/// history with it across later rotations (no false split brain), reports its
/// lag in seconds while replay is paused, and detects a history that differs.
#[test]
fn midlog_sync_rotation_lag_and_split_brain() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    let size = 8 * MIB;
    let a_disk = nodes[0].disk("a.img", size);
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.write(0, &[1u8; 65536], true).unwrap(), 0);
    nodes[0].adm_ok(&["log-rotate", "r0"]);
    assert_eq!(c.write(MIB, &[2u8; 65536], true).unwrap(), 0);

    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let b_disk = nodes[1].disk("b.img", size);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    for round in 0..3u8 {
        assert_eq!(c.write(2 * MIB, &[3 + round; 65536], true).unwrap(), 0);
        nodes[0].adm_ok(&["log-rotate", "r0"]);
    }
    assert_eq!(c.write(3 * MIB, &[9u8; 4096], true).unwrap(), 0);
    // Asked on the secondary right after the write: it must not answer from a
    // position the primary published before that write.
    nodes[1].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let b = read(&b_disk);
    assert!(
        b[(3 * MIB) as usize..(3 * MIB + 4096) as usize]
            .iter()
            .all(|&x| x == 9),
        "uptodate on beta before beta had the last write"
    );
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let v = nodes[1].wait_view("beta replayed everything", |v| {
        member(v, "beta")["lag_bytes"] == 0 && member(v, "beta")["disk"] == "uptodate"
    });
    assert_eq!(member(&v, "beta")["split_brain"], false, "{v:#}");
    assert!(member(&v, "beta")["error"].is_null(), "{v:#}");
    assert!(read(&b_disk) == read(&a_disk));

    // Lag in seconds grows while replay is paused, and is 0 again after catching up.
    nodes[1].adm_ok(&["pause-replay", "r0"]);
    assert_eq!(c.write(4 * MIB, &[10u8; 65536], true).unwrap(), 0);
    let v = nodes[1].wait_view("beta lags by a second", |v| {
        member(v, "beta")["lag_seconds"].as_f64().unwrap_or(0.0) >= 1.0
    });
    assert!(
        member(&v, "beta")["lag_bytes"].as_u64().unwrap() > 0,
        "{v:#}"
    );
    assert_eq!(member(&v, "beta")["disk"], "outdated", "behind: {v:#}");
    // The primary's view measures beta's lag against what alpha wrote.
    nodes[0].wait_view("alpha sees beta behind", |v| {
        member(v, "beta")["lag_bytes"].as_u64().unwrap_or(0) > 0
            && member(v, "beta")["disk"] == "outdated"
            && member(v, "beta")["log"]["written"] == member(v, "alpha")["log"]["written"]
    });
    // Restarted with replay paused: beta's disk is the consistent image it was, not
    // a sync (it showed `syncing` until resumed, and `synced` waited for it), and
    // its lag in seconds goes on from where it was (it started from 0 again).
    nodes[1].wait_view("beta lags by 3 s", |v| {
        member(v, "beta")["lag_seconds"].as_f64().unwrap_or(0.0) >= 3.0
    });
    nodes[1].kill9();
    nodes[1].start();
    let v = nodes[1].wait_view("beta back, behind", |v| {
        member(v, "beta")["disk"] == "outdated" && member(v, "beta")["paused"]["replay"] == true
    });
    let lag = member(&v, "beta")["lag_seconds"].as_f64().unwrap_or(0.0);
    assert!(lag >= 3.0, "lag_seconds after the restart: {lag}");
    nodes[1].adm_ok(&["wait-resource", "r0", "synced", "--timeout", "30"]);
    nodes[1].adm_ok(&["resume-replay", "r0"]);
    nodes[1].wait_view("beta caught up", |v| {
        member(v, "beta")["lag_seconds"] == 0.0 && member(v, "beta")["lag_bytes"] == 0
    });

    // The primary's history changes under beta (a version that does not continue
    // beta's): beta stops replaying before that logfile and says split brain.
    // Fetch paused too: beta must not fetch the real version before the
    // forged one is in place (it did, once, in a loaded full run).
    nodes[1].adm_ok(&["pause-replay", "r0"]);
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    assert_eq!(c.write(5 * MIB, &[11u8; 65536], true).unwrap(), 0);
    let v = nodes[0].view_json();
    let current = member(&v, "alpha")["logfile"].as_str().unwrap().to_string();
    nodes[0].adm_ok(&["log-rotate", "r0"]);
    assert_eq!(c.write(6 * MIB, &[12u8; 65536], true).unwrap(), 0);
    let seq = current
        .trim_start_matches("log-")
        .split('-')
        .next()
        .unwrap();
    let vfile = nodes[0]
        .dir
        .join(format!("resources/r0/version-{seq}-alpha"));
    wait_for("version file", std::time::Duration::from_secs(20), || {
        vfile.exists()
    });
    let text = std::fs::read_to_string(&vfile).unwrap();
    let real = mars_logfmt::Version::from_json(&text).unwrap();
    let mut other = mars_logfmt::VersionBuilder::new();
    other.add_record(&[0x5A; mars_logfmt::RECORD_HEADER_LEN]); // a history beta never saw
    let forged = other.finish(
        None,
        &real.logfile,
        real.file_seq,
        real.start_pos,
        real.end_pos,
    );
    std::fs::write(&vfile, forged.to_json()).unwrap();
    let before = read(&b_disk);
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    nodes[1].adm_ok(&["resume-replay", "r0"]);
    let v = nodes[1].wait_view("beta reports split brain", |v| {
        member(v, "beta")["split_brain"] == true
    });
    let err = member(&v, "beta")["error"].as_str().unwrap_or("");
    assert!(err.contains("split brain"), "{v:#}");
    let after = read(&b_disk);
    assert_eq!(
        &after[(6 * MIB) as usize..(6 * MIB + 65536) as usize],
        &before[(6 * MIB) as usize..(6 * MIB + 65536) as usize],
        "nothing of the diverging logfile's successor was applied"
    );
    let human = nodes[1].adm_ok(&["view"]);
    assert!(human.contains("SPLIT-BRAIN"), "{human}");
}

/// A bit flipped in a secondary's copy of a logfile: the record is not applied,
/// replay stops before it, and the member reports where.
#[test]
fn bit_flip_in_a_fetched_logfile_is_detected_and_not_replayed() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    let size = 8 * MIB;
    let [_a_disk, b_disk]: [std::path::PathBuf; 2] = replicate_r0(&nodes, size).try_into().unwrap();
    nodes[1].adm_ok(&["pause-replay", "r0"]);
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.write(0, &[7u8; 65536], true).unwrap(), 0);
    assert_eq!(c.write(MIB, &[8u8; 65536], true).unwrap(), 0);
    let written = nodes[0].view_json();
    let written = member(&written, "alpha")["log"]["written"]
        .as_u64()
        .unwrap();
    let v = nodes[1].wait_view("beta fetched both writes", |v| {
        member(v, "beta")["log"]["fetched"].as_u64().unwrap_or(0) >= written
    });
    let logfile = member(&nodes[0].view_json(), "alpha")["logfile"]
        .as_str()
        .unwrap()
        .to_string();
    let path = nodes[1].dir.join("resources/r0").join(&logfile);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 1000; // inside the second write's payload
    bytes[at] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let replayed_before = member(&v, "beta")["log"]["replayed"].as_u64().unwrap();
    // Replay takes records from the fetched chunks while they are in memory (the
    // damage is on the disk, after the write): a restart empties them, so replay
    // reads the damaged file (pause-replay is kept across it).
    nodes[1].kill9();
    nodes[1].start();
    nodes[1].adm_ok(&["resume-replay", "r0"]);
    let v = nodes[1].wait_view("beta reports the corrupt record", |v| {
        member(v, "beta")["error"]
            .as_str()
            .is_some_and(|e| e.contains("corrupt"))
    });
    let err = member(&v, "beta")["error"].as_str().unwrap();
    assert!(err.contains(&logfile), "the error names the file: {err}");
    assert_eq!(
        member(&v, "beta")["disk"],
        "outdated",
        "stopped behind: {v:#}"
    );
    let b = read(&b_disk);
    assert!(
        b[..65536].iter().all(|&x| x == 7),
        "the intact first write was applied"
    );
    assert!(
        b[MIB as usize..(MIB + 65536) as usize]
            .iter()
            .all(|&x| x == 0),
        "the corrupt second write was not applied"
    );
    let replayed = member(&v, "beta")["log"]["replayed"].as_u64().unwrap();
    assert!(replayed > replayed_before && replayed < written, "{v:#}");
    assert_eq!(member(&v, "beta")["split_brain"], false);
}

/// Damage in the source's copy of a logfile (after its transport checksum, which the
/// source computes over what it read) is found when the chunk arrives: the chunk is
/// not stored, fetch stops before it and says so, and replay applies what came before.
#[test]
fn a_damaged_record_from_the_source_is_refused_on_arrival() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    // Fetches read alpha's logfile, not its memory of the recent log.
    nodes[0].set_setting("tail_cache_bytes", 0);
    let size = 8 * MIB;
    let [_a_disk, b_disk]: [std::path::PathBuf; 2] = replicate_r0(&nodes, size).try_into().unwrap();
    let (written, logfile) = two_writes_beta_paused(&nodes);
    let (bytes, second, _) = damage_second_record(&nodes, &logfile);
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    let v = nodes[1].wait_view("beta refuses the damaged record", |v| {
        member(v, "beta")["error"]
            .as_str()
            .is_some_and(|e| e.contains("not stored"))
    });
    let err = member(&v, "beta")["error"].as_str().unwrap();
    assert!(
        err.contains(&logfile) && err.contains("checksum"),
        "the error names the file and the checksum: {err}"
    );
    // Nothing of the damaged record is stored: beta's copy ends before it and
    // holds alpha's bytes up to there.
    let b_copy =
        std::fs::read(nodes[1].dir.join("resources/r0").join(&logfile)).unwrap_or_default();
    assert!(
        (b_copy.len() as u64) <= second,
        "stored {} bytes, the damaged record starts at {second}",
        b_copy.len(),
    );
    assert!(b_copy[..] == bytes[..b_copy.len()]);
    let v = nodes[1].wait_view("beta replayed what it holds", |v| {
        let m = member(v, "beta");
        m["log"]["replayed"] == m["log"]["fetched"]
    });
    let m = member(&v, "beta");
    assert!(m["log"]["fetched"].as_u64().unwrap() < written, "{v:#}");
    assert_eq!(m["disk"], "outdated", "{v:#}");
    let b = read(&b_disk);
    assert!(
        b[MIB as usize..(MIB + 65536) as usize]
            .iter()
            .all(|&x| x == 0),
        "the damaged write was not applied"
    );
}

/// The primary's copy of a logfile is damaged but gamma holds a good one: beta
/// refuses the damaged chunk from alpha, passes alpha over and fetches the rest
/// from gamma, and ends with alpha's data (its writes all applied).
#[test]
fn a_damaged_copy_at_the_primary_is_fetched_from_another_member() {
    let mut nodes = cluster3();
    nodes[0].set_setting("tail_cache_bytes", 0);
    let size = 8 * MIB;
    let disks = replicate_r0(&nodes, size);
    let (written, logfile) = two_writes_beta_paused(&nodes);
    nodes[2].wait_view("gamma holds everything", |v| {
        member(v, "gamma")["log"]["fetched"].as_u64().unwrap_or(0) >= written
    });
    let (_, _, at) = damage_second_record(&nodes, &logfile);
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    nodes[1].wait_view("beta replayed all of it, through gamma", |v| {
        member(v, "beta")["log"]["replayed"].as_u64().unwrap_or(0) >= written
    });
    let b = read(&disks[1]);
    assert!(b[..65536].iter().all(|&x| x == 7));
    assert!(
        b[MIB as usize..(MIB + 65536) as usize]
            .iter()
            .all(|&x| x == 8),
        "the write whose record is damaged at alpha came from gamma's copy"
    );
    // Beta's copy of the logfile is the undamaged one.
    let b_copy = std::fs::read(nodes[1].dir.join("resources/r0").join(&logfile)).unwrap();
    let g_copy = std::fs::read(nodes[2].dir.join("resources/r0").join(&logfile)).unwrap();
    let n = b_copy.len().min(g_copy.len());
    assert!(n as u64 > at && b_copy[..n] == g_copy[..n]);
}

/// A primary frozen (SIGSTOP) in the middle of a fetch stream keeps its TCP
/// connections alive (its kernel answers for it), so only a timeout on the
/// answer ends the stream: beta then fetches the rest from gamma. Thawed, alpha
/// goes on and all three disks end equal.
#[test]
fn a_frozen_primary_does_not_hold_up_a_fetch() {
    let nodes = cluster3();
    let size = 32 * MIB;
    let disks = replicate_r0(&nodes, size);
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    let mut c = nodes[0].nbd("r0");
    write_mib_blocks(&mut c, 0..16, 40, false);
    assert_eq!(c.flush().unwrap(), 0);
    drop(c);
    let written = log_pos(&nodes[0], "alpha", "written");
    alpha_written_back(&nodes);
    nodes[2].wait_view("gamma holds everything", |v| {
        member(v, "gamma")["log"]["fetched"].as_u64().unwrap_or(0) >= written
    });
    slow_fetch_running_on_beta(&nodes);
    nodes[0].signal(libc::SIGSTOP);
    nodes[1].adm_ok(&["set-rate", "r0", "--fetch", "0"]);
    wait_for(
        "beta replays everything while alpha is frozen",
        std::time::Duration::from_secs(90),
        || log_pos(&nodes[1], "beta", "replayed") >= written,
    );
    assert!(
        read(&disks[1]) == read(&disks[0]),
        "beta's disk equals alpha's"
    );
    nodes[0].signal(libc::SIGCONT);
    wait_identical(&nodes, &disks, 0);
}

/// Beta's fetch paused, two FUA writes on alpha: 64 KiB of 7 at 0, of 8 at 1 MiB.
/// Returns alpha's written position and its current logfile.
fn two_writes_beta_paused(nodes: &[Node]) -> (u64, String) {
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.write(0, &[7u8; 65536], true).unwrap(), 0);
    assert_eq!(c.write(MIB, &[8u8; 65536], true).unwrap(), 0);
    let v = nodes[0].view_json();
    let written = member(&v, "alpha")["log"]["written"].as_u64().unwrap();
    let logfile = member(&v, "alpha")["logfile"].as_str().unwrap().to_string();
    (written, logfile)
}

/// Flip a bit in the payload of the second write's record in alpha's copy of
/// `logfile`. Returns the file's bytes before, where the record starts and the
/// offset of the flipped byte.
fn damage_second_record(nodes: &[Node], logfile: &str) -> (Vec<u8>, u64, u64) {
    use std::os::unix::fs::FileExt;
    let a_path = nodes[0].dir.join("resources/r0").join(logfile);
    let bytes = std::fs::read(&a_path).unwrap();
    let second = mars_logfmt::scan_logfile(&bytes)
        .records
        .into_iter()
        .find(|r| r.header.offset == MIB)
        .expect("the second write's record");
    let at = second.file_offset + mars_logfmt::RECORD_HEADER_LEN as u64 + 1000;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&a_path)
        .unwrap();
    f.write_at(&[bytes[at as usize] ^ 0x20], at).unwrap();
    f.sync_all().unwrap();
    (bytes, second.file_offset, at)
}

/// Writes with FUA from a thread until stopped; returns (offset, byte) of every acknowledged write.
fn fua_writer(
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    region: u64,
) -> std::thread::JoinHandle<Vec<(u64, u8)>> {
    std::thread::spawn(move || {
        let mut c = NbdClient::connect(&addr, "r0").unwrap();
        let mut acked = Vec::new();
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let off = (i * 64 * 1024) % region;
            let byte = (i % 250) as u8 + 1;
            match c.write(off, &vec![byte; 64 * 1024], i.is_multiple_of(8)) {
                Ok(0) => acked.push((off, byte)),
                _ => break,
            }
            i += 1;
        }
        acked
    })
}

/// The link between primary and secondary is cut while the secondary fetches:
/// the primary goes on writing at full speed, the secondary lags and catches up
/// after the link is restored, and ends byte-identical.
#[test]
fn link_cut_mid_fetch_then_restored() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let nodes = cluster3();
    let size = 64 * MIB;
    let disks = replicate_r0(&nodes, size);
    let a_disk = disks[0].clone();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = fua_writer(nodes[0].nbd.clone(), stop.clone(), 48 * MIB);
    // Cut beta off from alpha (both directions) while data streams.
    wait_for("beta fetching", std::time::Duration::from_secs(30), || {
        member(&nodes[1].view_json(), "beta")["log"]["fetched"]
            .as_u64()
            .unwrap_or(0)
            > 4 * MIB
    });
    nodes[0].adm_ok(&["debug-block", "beta"]);
    nodes[1].adm_ok(&["debug-block", "alpha"]);
    let cut_at = member(&nodes[0].view_json(), "alpha")["log"]["written"]
        .as_u64()
        .unwrap();
    wait_for(
        "the primary writes on while beta is cut off",
        std::time::Duration::from_secs(30),
        || {
            member(&nodes[0].view_json(), "alpha")["log"]["written"]
                .as_u64()
                .unwrap_or(0)
                > cut_at + 16 * MIB
        },
    );
    let v = nodes[1].view_json();
    let fetched_cut = member(&v, "beta")["log"]["fetched"].as_u64().unwrap();
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(!acked.is_empty());
    let written = member(&nodes[0].view_json(), "alpha")["log"]["written"]
        .as_u64()
        .unwrap();
    assert!(
        fetched_cut < written,
        "beta could not have fetched everything through a cut link"
    );
    nodes[0].adm_ok(&["debug-unblock", "beta"]);
    nodes[1].adm_ok(&["debug-unblock", "alpha"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "90"]);
    let a = read(&a_disk);
    for d in &disks[1..] {
        assert!(read(d) == a, "{} equals the primary's disk", d.display());
    }
    // Every acknowledged write's last version is on all disks.
    let mut last = std::collections::BTreeMap::new();
    for (off, byte) in &acked {
        last.insert(*off, *byte);
    }
    for (off, byte) in last {
        assert!(a[off as usize..off as usize + 65536]
            .iter()
            .all(|&b| b == byte));
    }
}

/// The primary is killed (SIGKILL) while it writes and its secondaries fetch,
/// then restarted: every acknowledged FUA write is on its disk, and the
/// secondaries end byte-identical to it.
#[test]
fn primary_killed_and_restarted_mid_fetch() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut nodes = cluster3();
    let size = 32 * MIB;
    let disks = replicate_r0(&nodes, size);
    let a_disk = disks[0].clone();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = fua_writer(nodes[0].nbd.clone(), stop.clone(), 24 * MIB);
    wait_for(
        "secondaries fetching",
        std::time::Duration::from_secs(30),
        || {
            member(&nodes[1].view_json(), "beta")["log"]["fetched"]
                .as_u64()
                .unwrap_or(0)
                > 8 * MIB
        },
    );
    nodes[0].kill9();
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    // Only the writes acknowledged with FUA (every 8th) are promised; the last write
    // of each offset decides what must be there.
    let mut last_durable = std::collections::BTreeMap::new();
    for (i, (off, byte)) in acked.iter().enumerate() {
        let fua = (i as u64).is_multiple_of(8);
        if fua {
            last_durable.insert(*off, (i, *byte));
        }
    }
    nodes[0].start();
    nodes[0].adm_ok(&["wait-resource", "r0", "primary", "--timeout", "60"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "90"]);
    let a = read(&a_disk);
    for (off, (i, byte)) in &last_durable {
        // A later, non-FUA write to the same offset may or may not have survived.
        let later: Vec<u8> = acked[*i..]
            .iter()
            .filter(|(o, _)| o == off)
            .map(|(_, b)| *b)
            .collect();
        // The write in flight at the kill (never acknowledged) may have landed too.
        let n = acked.len() as u64;
        let in_flight = ((n * 64 * 1024) % (24 * MIB) == *off).then_some((n % 250) as u8 + 1);
        let got = a[*off as usize];
        assert!(
            later.contains(&got) || in_flight == Some(got),
            "offset {off}: acknowledged FUA write {byte} lost (disk has {got})"
        );
    }
    for d in &disks[1..] {
        let b = read(d);
        if b != a {
            let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
            panic!(
                "{} differs from the restarted primary's disk at byte {first} ({} vs {}); views:\n{:#}\n{:#}\n{:#}\nlogs:\n{}\n{}",
                d.display(),
                b[first],
                a[first],
                nodes[0].view_json(),
                nodes[1].view_json(),
                nodes[2].view_json(),
                nodes[1].log_text(),
                nodes[2].log_text()
            );
        }
    }
}

fn wait_identical(nodes: &[Node], disks: &[std::path::PathBuf], via: usize) {
    nodes[via].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "90"]);
    let first = read(&disks[0]);
    for d in &disks[1..] {
        assert!(
            read(d) == first,
            "{} differs from {}; views:\n{}",
            d.display(),
            disks[0].display(),
            nodes
                .iter()
                .map(|n| format!("{:#}", n.view_json()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Planned handover (`primary` on a secondary), failover (`primary --force`)
/// after the primary dies, the dead primary rejoining as a secondary, a real
/// split brain (a partitioned primary that went on writing), and `invalidate`
/// resolving it.
#[test]
fn handover_failover_split_brain_and_invalidate() {
    let mut nodes = cluster3();
    let size = 16 * MIB;
    let disks = replicate_r0(&nodes, size);
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.write(0, &[1u8; 1 << 20], false).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    drop(c);
    wait_identical(&nodes, &disks, 0);

    // Handover alpha -> beta: beta waits for everything alpha wrote, then serves.
    let out = nodes[1].adm_ok(&["primary", "r0"]);
    assert!(out.contains("primary here"), "{out}");
    let v = nodes[1].wait_view("beta primary, alpha secondary", |v| {
        member(v, "beta")["role"] == "primary" && member(v, "alpha")["role"] == "secondary"
    });
    let r = resource(&v, "r0").unwrap();
    assert_eq!(r["actual_primary"], "beta");
    assert_eq!(r["device"], nodes[1].uri("r0").as_str());
    assert!(
        NbdClient::connect(&nodes[0].nbd, "r0").is_err(),
        "alpha no longer serves r0"
    );
    let mut c = nodes[1].nbd("r0");
    assert_eq!(
        c.read(0, 4096).unwrap().1,
        vec![1u8; 4096],
        "beta has alpha's data"
    );
    assert_eq!(c.write(1 << 20, &[2u8; 1 << 20], true).unwrap(), 0);
    drop(c);
    wait_identical(&nodes, &disks, 1);

    // Failover: beta dies; gamma may take over only with --force.
    nodes[1].kill9();
    nodes[2].wait_view("beta dead", |v| {
        view_nodes(v).iter().any(|(n, alive)| n == "beta" && !alive)
    });
    let err = nodes[2].adm_err(&["primary", "r0"]);
    assert!(err.contains("--force"), "{err}");
    nodes[2].adm_ok(&["primary", "--force", "r0"]);
    let mut c = nodes[2].nbd("r0");
    assert_eq!(c.read(1 << 20, 4096).unwrap().1, vec![2u8; 4096]);
    assert_eq!(c.write(2 << 20, &[3u8; 1 << 20], true).unwrap(), 0);
    drop(c);
    // beta comes back: it gives up the primary role and follows gamma.
    nodes[1].start();
    nodes[2].wait_view("beta follows gamma", |v| {
        member(v, "beta")["role"] == "secondary"
            && member(v, "beta")["log"]["replayed"] == member(v, "gamma")["log"]["written"]
    });
    wait_identical(&nodes, &disks, 2);

    // Split brain: gamma is cut off but goes on writing; beta fails over meanwhile.
    for (i, n) in nodes.iter().enumerate() {
        let others: Vec<&str> = nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| (*j == 2) != (i == 2))
            .map(|(_, m)| m.name.as_str())
            .collect();
        let mut args = vec!["debug-block"];
        args.extend(others);
        n.adm_ok(&args);
    }
    let mut c = nodes[2].nbd("r0");
    assert_eq!(
        c.write(3 << 20, &[4u8; 65536], true).unwrap(),
        0,
        "gamma writes alone"
    );
    drop(c);
    nodes[1].wait_view("gamma unreachable", |v| {
        view_nodes(v)
            .iter()
            .any(|(n, alive)| n == "gamma" && !alive)
    });
    nodes[1].adm_ok(&["primary", "--force", "r0"]);
    let mut c = nodes[1].nbd("r0");
    assert_eq!(
        c.write(4 << 20, &[5u8; 65536], true).unwrap(),
        0,
        "beta writes alone"
    );
    drop(c);
    for n in &nodes {
        let all: Vec<&str> = nodes.iter().map(|m| m.name.as_str()).collect();
        let mut args = vec!["debug-unblock"];
        args.extend(all);
        n.adm_ok(&args);
    }
    let v = nodes[2].wait_view("gamma detects split brain", |v| {
        member(v, "gamma")["split_brain"] == true
    });
    assert_eq!(member(&v, "gamma")["role"], "secondary", "{v:#}");
    let human = nodes[2].adm_ok(&["view", "r0"]);
    assert!(human.contains("SPLIT-BRAIN"), "{human}");
    // The losing side throws its data away and syncs again, from the primary it sees
    // alive (split brain can be detected before gamma's gossip has beta alive again;
    // until then invalidate refuses: no reachable primary).
    nodes[2].wait_view("gamma sees beta alive", |v| {
        view_nodes(v).iter().any(|(n, alive)| n == "beta" && *alive)
    });
    let err = nodes[1].adm_err(&["invalidate", "r0"]);
    assert!(err.contains("designated primary"), "{err}");
    nodes[2].adm_ok(&["invalidate", "r0"]);
    wait_identical(&nodes, &disks, 1);
    let g = read(&disks[2]);
    assert!(
        g[(3 << 20) as usize..(3 << 20) as usize + 65536]
            .iter()
            .all(|&b| b == 0),
        "gamma's lone write is gone"
    );
    assert!(g[(4 << 20) as usize..(4 << 20) as usize + 65536]
        .iter()
        .all(|&b| b == 5));
    let v = nodes[2].view_json();
    assert_eq!(member(&v, "gamma")["split_brain"], false, "{v:#}");
}

/// `set-rate --fetch` holds log transfer under the limit (a lower bound on the
/// time: a slow machine only makes it slower); 0 lifts it.
#[test]
fn fetch_rate_limit_holds_and_lifts() {
    let nodes = start_cluster(&["alpha", "beta"]);
    let size = 16 * MIB;
    let [a_disk, b_disk]: [std::path::PathBuf; 2] = replicate_r0(&nodes, size).try_into().unwrap();
    let err = nodes[1].adm_err(&["set-rate", "r0", "--fetch", "1Q"]);
    assert!(err.contains("unit"), "{err}");
    let out = nodes[1].adm_ok(&["set-rate", "r0", "--fetch", "1M"]);
    assert!(out.contains("fetch rate 1048576 bytes/s"), "{out}");
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    let mut c = nodes[0].nbd("r0");
    write_mib_blocks(&mut c, 0..4, 1, true);
    let written = member(&nodes[0].view_json(), "alpha")["log"]["written"]
        .as_u64()
        .unwrap();
    let start = std::time::Instant::now();
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    wait_for(
        "beta fetched 4 MiB",
        std::time::Duration::from_secs(60),
        || {
            member(&nodes[1].view_json(), "beta")["log"]["fetched"]
                .as_u64()
                .unwrap_or(0)
                >= written
        },
    );
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(2500),
        "4 MiB at 1 MiB/s arrived in {took:?}"
    );
    nodes[1].adm_ok(&["set-rate", "r0", "--fetch", "0"]);
    write_mib_blocks(&mut c, 4..8, 1, true);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    assert!(read(&b_disk) == read(&a_disk));
}

/// The space policy: over `log_keep_bytes`, logfiles every member has replayed
/// go by themselves; one a member has not replayed stays.
#[test]
fn space_policy_deletes_only_what_every_member_replayed() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    // alpha and beta keep at most 1 MiB of logfiles.
    nodes[0].set_setting("log_keep_bytes", MIB);
    nodes[1].set_setting("log_keep_bytes", MIB);
    nodes[1].wait_view("alpha alive", |v| all_alive(v, &["alpha", "beta"]));
    let size = 16 * MIB;
    let [a_disk, b_disk]: [std::path::PathBuf; 2] = replicate_r0(&nodes, size).try_into().unwrap();
    let rdir = nodes[0].dir.join("resources/r0");
    let logs = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("log-"))
            .collect();
        v.sort();
        v
    };
    // beta replays the first logfile, then holds replay back: nothing it has
    // not replayed may go.
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.write(0, &[6u8; 1 << 20], true).unwrap(), 0);
    nodes[0].adm_ok(&["log-rotate", "r0"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[1].adm_ok(&["pause-replay", "r0"]);
    for i in 1..3u64 {
        assert_eq!(c.write(i * MIB, &[7u8; 1 << 20], true).unwrap(), 0);
        nodes[0].adm_ok(&["log-rotate", "r0"]);
    }
    // The policy deleting the first logfile shows that it ran; the others stay.
    wait_for(
        "the policy deletes the replayed first logfile",
        std::time::Duration::from_secs(30),
        || !rdir.join("log-000000001-alpha").exists(),
    );
    assert!(
        logs(&rdir).len() >= 3,
        "a logfile beta has not replayed was deleted: {:?}",
        logs(&rdir)
    );
    nodes[1].adm_ok(&["resume-replay", "r0"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    wait_for(
        "the policy deletes the replayed logfiles",
        std::time::Duration::from_secs(30),
        || logs(&rdir).len() <= 1,
    );
    // The secondary's copies go too (all but the one replay is in).
    let bdir = nodes[1].dir.join("resources/r0");
    wait_for(
        "beta's policy deletes its replayed copies",
        std::time::Duration::from_secs(30),
        || logs(&bdir).len() <= 1,
    );
    let out = nodes[1].adm_ok(&["log-delete", "r0"]);
    assert!(out.contains("no logfile deleted"), "{out}");
    assert!(read(&b_disk) == read(&a_disk));
}

/// Emergency mode: the log space runs out while a secondary cannot fetch; the
/// primary deletes written-back logfiles anyway and goes on writing, both sides
/// say so, and `invalidate` brings the secondary back.
#[test]
fn emergency_mode_keeps_the_primary_writing_and_invalidate_recovers() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    nodes[0].set_setting("log_space_bytes", 2 * MIB);
    let size = 16 * MIB;
    let [a_disk, b_disk]: [std::path::PathBuf; 2] = replicate_r0(&nodes, size).try_into().unwrap();
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    let mut c = nodes[0].nbd("r0");
    for i in 0..4u64 {
        assert_eq!(c.write(i * MIB, &[i as u8 + 1; 1 << 20], true).unwrap(), 0);
        nodes[0].adm_ok(&["log-rotate", "r0"]);
    }
    let v = nodes[0].wait_view("alpha in emergency mode", |v| {
        member(v, "alpha")["emergency"] == true
    });
    assert!(
        !nodes[0]
            .dir
            .join("resources/r0/log-000000001-alpha")
            .exists(),
        "{v:#}"
    );
    assert_eq!(
        c.write(5 * MIB, &[9u8; 1 << 20], true).unwrap(),
        0,
        "the primary goes on writing"
    );
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    let v = nodes[1].wait_view("beta knows it is cut off", |v| {
        member(v, "beta")["emergency"] == true
    });
    let err = member(&v, "beta")["error"].as_str().unwrap_or("");
    assert!(err.contains("invalidate"), "{v:#}");
    nodes[1].adm_ok(&["invalidate", "r0"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    assert!(read(&b_disk) == read(&a_disk));
    nodes[0].wait_view("emergency over", |v| {
        member(v, "alpha")["emergency"] == false && member(v, "beta")["emergency"] == false
    });
}

/// `resize` grows the device on every member: refused beyond the smallest
/// disk and for shrinking; new connections see the new size; data written
/// beyond the old end reaches the secondary.
#[test]
fn resize_grows_the_device_on_every_member() {
    let nodes = start_cluster(&["alpha", "beta"]);
    let a_disk = nodes[0].disk("a.img", 32 * MIB);
    let b_disk = nodes[1].disk("b.img", 24 * MIB);
    // The resource starts at 8 MiB: created on an 8 MiB disk that then grows.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a_disk)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a_disk)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[0].wait_view("both disk sizes known", |v| {
        member(v, "beta")["disk"] == "uptodate"
    });
    let err = nodes[0].adm_err(&["resize", "r0", "4M"]);
    assert!(err.contains("shrinking"), "{err}");
    let err = nodes[0].adm_err(&["resize", "r0", "28M"]);
    assert!(err.contains("beta") && err.contains("holds only"), "{err}");
    let out = nodes[0].adm_ok(&["resize", "r0"]);
    assert!(out.contains("to 25165824 bytes"), "{out}");
    let v = nodes[0].wait_view("size 24 MiB everywhere", |v| {
        resource(v, "r0").is_some_and(|r| r["size"] == 24 * MIB)
    });
    assert_eq!(resource(&v, "r0").unwrap()["size"], 24 * MIB);
    nodes[0].adm_ok(&["wait-resource", "r0", "primary", "--timeout", "30"]);
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.size, 24 * MIB, "a new connection sees the new size");
    assert_eq!(c.write(20 * MIB, &[5u8; 65536], true).unwrap(), 0);
    nodes[1].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let b = read(&b_disk);
    assert!(b[(20 * MIB) as usize..(20 * MIB + 65536) as usize]
        .iter()
        .all(|&x| x == 5));
}

fn sync_done(n: &Node, node: &str) -> Option<u64> {
    member(&n.view_json(), node)["sync"]["done"].as_u64()
}

/// A full sync killed (SIGKILL) mid-way resumes at its recorded position, which
/// only ever covers blocks already on the disk, and ends byte-identical;
/// `pause-sync` holds it where it is.
#[test]
fn sync_killed_mid_way_resumes_and_pause_sync_holds_it() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    let size = 64 * MIB;
    let a_disk = nodes[0].disk("a.img", size);
    // Every block differs from beta's zeroed disk.
    let data: Vec<u8> = (0..size)
        .map(|i| ((i / 4096) as u8) ^ (i as u8).wrapping_mul(31) | 1)
        .collect();
    std::fs::write(&a_disk, &data).unwrap();
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let b_disk = nodes[1].disk("b.img", size);
    // Join while cut off from alpha, so the rate limit is in place before the first block.
    nodes[1].adm_ok(&["debug-block", "alpha"]);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    nodes[1].adm_ok(&["set-rate", "r0", "--sync", "8M"]);
    // No source to copy from: the disk is no image and nothing is making it one.
    nodes[1].wait_view(
        "beta inconsistent and not connected without a source",
        |v| member(v, "beta")["disk"] == "inconsistent" && member(v, "beta")["connected"] == false,
    );
    nodes[1].adm_ok(&["debug-unblock", "alpha"]);
    nodes[1].wait_view("beta syncing and connected once alpha is back", |v| {
        member(v, "beta")["disk"] == "syncing" && member(v, "beta")["connected"] == true
    });
    let long = std::time::Duration::from_secs(60);
    wait_for("beta synced 20 MiB", long, || {
        sync_done(&nodes[1], "beta").is_some_and(|d| d >= 20 * MIB)
    });
    nodes[1].kill9();
    let state: serde_json::Value =
        serde_json::from_slice(&read(&nodes[1].dir.join("resources/r0/sync"))).unwrap();
    let next = state["next_offset"].as_u64().unwrap();
    assert!(state["done"] == false, "{state}");
    assert!(
        next > 0 && next < size && next.is_multiple_of(MIB),
        "killed mid-way, the recorded position is inside the disk: {state}"
    );
    // What the position claims is on beta's disk (the prefix property).
    let b = read(&b_disk);
    assert!(
        b[..next as usize] == data[..next as usize],
        "blocks below next_offset {next} are not all on beta's disk"
    );

    // Restarted, it goes on from there (only the rest is transferred), still at 8 MiB/s.
    nodes[1].start();
    wait_for("beta's sync moves on", long, || {
        sync_done(&nodes[1], "beta").is_some_and(|d| d >= next + 4 * MIB)
    });
    nodes[1].adm_ok(&["pause-sync", "r0"]);
    // Paused: the sync stops at a block boundary and records it (a block in flight
    // may still land right after the command); from then on it does not move.
    let recorded = || -> Option<u64> {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(nodes[1].dir.join("resources/r0/sync")).ok()?)
                .ok()?;
        state["next_offset"].as_u64()
    };
    wait_for("the paused sync records where it stopped", long, || {
        let shown = sync_done(&nodes[1], "beta");
        shown.is_some() && shown == recorded()
    });
    let held = sync_done(&nodes[1], "beta").expect("still syncing");
    // An observation window, not a synchronisation: nothing may move during it.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        sync_done(&nodes[1], "beta"),
        Some(held),
        "paused sync moved"
    );
    assert!(held < size, "sync completed before the pause");
    // A paused sync leaves the disk inconsistent, and the sync is not over.
    assert_eq!(
        member(&nodes[1].view_json(), "beta")["disk"],
        "inconsistent"
    );
    nodes[1].adm_err(&["wait-resource", "r0", "synced", "--timeout", "1"]);
    let state: serde_json::Value =
        serde_json::from_slice(&read(&nodes[1].dir.join("resources/r0/sync"))).unwrap();
    assert_eq!(state["next_offset"].as_u64(), Some(held), "{state}");

    nodes[1].adm_ok(&["set-rate", "r0", "--sync", "0"]);
    nodes[1].adm_ok(&["resume-sync", "r0"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let v = nodes[1].wait_view("beta uptodate", |v| member(v, "beta")["disk"] == "uptodate");
    let moved = member(&v, "beta")["sync_blocks_transferred"]
        .as_u64()
        .unwrap();
    assert!(
        moved <= (size - next) / MIB,
        "after the restart {moved} blocks moved, but only those from {next} on were missing: {v:#}"
    );
    assert!(read(&b_disk) == data, "beta's disk equals alpha's");
}

/// The serving side reads several fetch answers at once but sends them in the
/// order asked, each the file's exact bytes; a request it cannot answer (a
/// logfile that does not exist) ends the stream after the answers before it.
#[test]
fn fetch_answers_come_in_order_and_a_bad_request_ends_the_stream() {
    let mut nodes = start_cluster(&["alpha"]);
    // No answers from memory: every chunk is read from the logfile.
    nodes[0].set_setting("tail_cache_bytes", 0);
    let disk = nodes[0].disk("a.img", 16 * MIB);
    nodes[0].adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "primary", "--timeout", "30"]);
    let mut c = nodes[0].nbd("r0");
    for i in 0..6u64 {
        let data: Vec<u8> = (0..MIB).map(|j| (i * 31 + j / 512) as u8).collect();
        assert_eq!(c.write(i * MIB, &data, true).unwrap(), 0);
    }
    drop(c);
    nodes[0].adm_ok(&["log-rotate", "r0"]);
    let id = nodes[0].view_json()["cluster"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res_dir = nodes[0].dir.join("resources").join("r0");
    let r0 = resource(&nodes[0].view_json(), "r0").unwrap()["incarnation"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tool = tool_member("fetcher", &nodes[0]);
    // Data is served to members only: the tool makes itself one.
    tool.push_as(
        &nodes[0],
        vec![mars_proto::WireEntry {
            key: format!("c/d/member/{r0}/fetcher"),
            clock: 1 << 20,
            node: "fetcher".into(),
            value: Some(serde_json::json!(true)),
            deleted_ms: 0,
        }],
    );
    rt.block_on(async {
        use mars_proto::{client_handshake, read_data, read_msg, write_msg, Msg};
        let mut s = tool.tls_connect(&nodes[0].listen).await.unwrap();
        client_handshake(&mut s, Some(&id), &tool.info())
            .await
            .unwrap();
        write_msg(&mut s, &Msg::LogList { res: r0.clone() })
            .await
            .unwrap();
        let files = match read_msg(&mut s).await.unwrap() {
            Msg::Logs { files, .. } => files,
            other => panic!("expected Logs, got {other:?}"),
        };
        let f = files
            .iter()
            .find(|f| f.finished && f.len > 5 * MIB)
            .unwrap_or_else(|| panic!("no finished logfile of 6 MiB of records: {files:?}"));
        let bytes = std::fs::read(res_dir.join(&f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.len);
        // Five requests before any answer is read: three good ones, a missing
        // logfile, and one more good one that must not be answered.
        let chunk = 2 * MIB as u32;
        let fetch = |file: &str, offset: u64| Msg::Fetch {
            res: r0.clone(),
            file: file.into(),
            offset,
            max: chunk,
            accept: vec![],
        };
        for m in [
            fetch(&f.name, 0),
            fetch(&f.name, 2 * MIB),
            fetch(&f.name, 4 * MIB),
            fetch("log-000000099-alpha", 0),
            fetch(&f.name, 0),
        ] {
            write_msg(&mut s, &m).await.unwrap();
        }
        let mut got = Vec::new();
        for want in [0, 2 * MIB, 4 * MIB] {
            match read_msg(&mut s).await.unwrap() {
                Msg::Chunk { file, offset, len } => {
                    assert_eq!((file.as_str(), offset), (f.name.as_str(), want));
                    let data = read_data(&mut s).await.unwrap();
                    assert_eq!(data.len(), len as usize);
                    let end = (want + chunk as u64).min(f.len) as usize;
                    assert!(data == bytes[want as usize..end], "chunk at {want} differs");
                    got.push(want);
                }
                other => panic!("expected the chunk at {want}, got {other:?}"),
            }
        }
        assert_eq!(got, [0, 2 * MIB, 4 * MIB]);
        match read_msg(&mut s).await.unwrap() {
            Msg::Refused { reason } => {
                assert!(reason.contains("log-000000099-alpha"), "{reason}")
            }
            other => panic!("expected Refused for the missing logfile, got {other:?}"),
        }
        // Nothing after it: the connection ends.
        assert!(read_msg(&mut s).await.is_err());
    });
}

/// Members join and leave while the device is written: a join's full sync runs
/// under writes (held slow, so that they overlap it) and ends byte-identical; a
/// member leaves while writes go on and the others carry on; with the primary
/// dead, a secondary fetches what it lacks from another secondary.
#[test]
fn members_join_and_leave_while_the_device_is_written() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut nodes = cluster3();
    let size = 32 * MIB;
    let a_disk = nodes[0].disk("a.img", size);
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = fua_writer(nodes[0].nbd.clone(), stop.clone(), 24 * MIB);
    let written = |n: &Node| {
        member(&n.view_json(), "alpha")["log"]["written"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut disks = vec![a_disk.clone()];
    for (i, n) in nodes[1..].iter().enumerate() {
        let name = ["beta", "gamma"][i];
        n.wait_view("r0 known", |v| resource(v, "r0").is_some());
        let d = n.disk(&format!("s{i}.img"), size);
        // Join cut off from every source, so that the rate limit is in place
        // before the first block. 2 MiB/s: the sync of 32 MiB takes 16 s, and
        // the writer goes on meanwhile.
        let others: Vec<&str> = ["alpha", "beta", "gamma"]
            .into_iter()
            .filter(|o| *o != name)
            .collect();
        for o in &others {
            n.adm_ok(&["debug-block", o]);
        }
        n.adm_ok(&["join-resource", "r0", d.to_str().unwrap()]);
        n.adm_ok(&["set-rate", "r0", "--sync", &(2 * MIB).to_string()]);
        for o in &others {
            n.adm_ok(&["debug-unblock", o]);
        }
        // The join could not tell the primary (it said so): wait until it knows.
        nodes[0].wait_view("the primary knows the new member", |v| {
            resource(v, "r0").is_some_and(|r| {
                r["members"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["node"] == name))
            })
        });
        n.wait_view("syncing", |v| member(v, name)["disk"] == "syncing");
        let during = written(&nodes[0]);
        wait_for(
            "writes while the member syncs",
            std::time::Duration::from_secs(30),
            || written(&nodes[0]) > during + 2 * MIB,
        );
        let v = n.view_json();
        assert!(
            !member(&v, name)["sync"].is_null(),
            "the sync outlasted the writes: {v:#}"
        );
        n.adm_ok(&["set-rate", "r0", "--sync", "0"]);
        disks.push(d);
    }
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(!acked.is_empty());
    wait_identical(&nodes, &disks, 0);

    // beta leaves while the device is written; alpha and gamma carry on.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = fua_writer(nodes[0].nbd.clone(), stop.clone(), 24 * MIB);
    let at = written(&nodes[0]);
    wait_for("writing", std::time::Duration::from_secs(30), || {
        written(&nodes[0]) > at + MIB
    });
    nodes[1].adm_ok(&["leave-resource", "r0"]);
    nodes[0].wait_view("beta is no member", |v| {
        resource(v, "r0").is_some_and(|r| {
            r["members"]
                .as_array()
                .is_some_and(|m| m.len() == 2 && m.iter().all(|m| m["node"] != "beta"))
        })
    });
    let at = written(&nodes[0]);
    wait_for("writes go on", std::time::Duration::from_secs(30), || {
        written(&nodes[0]) > at + 2 * MIB
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    wait_identical(&nodes, &[disks[0].clone(), disks[2].clone()], 0);

    // beta joins again (its old disk: only what differs moves); then gamma is held
    // back, alpha dies, and gamma fetches the rest from beta.
    nodes[1].adm_ok(&["join-resource", "r0", disks[1].to_str().unwrap()]);
    wait_identical(&nodes, &disks, 0);
    nodes[2].adm_ok(&["pause-fetch", "r0"]);
    let mut c = nodes[0].nbd("r0");
    for i in 0..8u64 {
        assert_eq!(c.write(i * MIB, &[0xA0 + i as u8; 65536], true).unwrap(), 0);
    }
    let target = written(&nodes[0]);
    nodes[1].wait_view("beta has everything", |v| {
        member(v, "beta")["log"]["replayed"].as_u64().unwrap_or(0) >= target
    });
    drop(c);
    nodes[0].kill9();
    nodes[2].adm_ok(&["resume-fetch", "r0"]);
    nodes[2].wait_view("gamma fetched from beta", |v| {
        member(v, "gamma")["log"]["replayed"].as_u64().unwrap_or(0) >= target
    });
    assert!(
        read(&disks[2]) == read(&disks[1]),
        "gamma's disk equals beta's"
    );
    let g = read(&disks[2]);
    for i in 0..8u64 {
        let at = (i * MIB) as usize;
        assert!(g[at..at + 65536].iter().all(|&x| x == 0xA0 + i as u8));
    }
}

/// With the primary away, a joining member copies the disk of an up-to-date
/// secondary, which goes on replaying while the copy runs; the joiner replays the
/// log from where that disk was and ends byte-identical to it.
#[test]
fn a_member_syncs_from_a_secondary_while_the_primary_is_away() {
    let mut nodes = cluster3();
    let size = 32 * MIB;
    let [a_disk, b_disk]: [std::path::PathBuf; 2] =
        replicate_r0(&nodes[..2], size).try_into().unwrap();
    // Data that gamma's copy must carry (its disk is zeroes) ...
    let mut c = nodes[0].nbd("r0");
    for i in 0..24u64 {
        assert_eq!(
            c.write(i * MIB, &vec![0x10 + i as u8; MIB as usize], i == 23)
                .unwrap(),
            0
        );
    }
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    drop(c);
    // ... and a backlog beta has fetched but not replayed when alpha dies.
    let writes: Vec<(u64, u8)> = (0..16u64)
        .map(|i| ((i * 7 % 30) * MIB, 0x30 + i as u8))
        .collect();
    let target = backlog_on_beta(&nodes, &writes);
    nodes[0].kill9();
    nodes[2].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let g_disk = nodes[2].disk("g.img", size);
    nodes[2].adm_ok(&["join-resource", "r0", g_disk.to_str().unwrap()]);
    nodes[2].adm_ok(&["set-rate", "r0", "--sync", &(4 * MIB).to_string()]);
    nodes[2].wait_view("gamma syncing from beta", |v| {
        member(v, "gamma")["sync"]["done"].as_u64().unwrap_or(0) > 0
    });
    // beta replays its backlog while gamma copies its disk.
    nodes[1].adm_ok(&["resume-replay", "r0"]);
    nodes[2].adm_ok(&["set-rate", "r0", "--sync", "0"]);
    nodes[1].wait_view("beta replayed everything", |v| {
        member(v, "beta")["log"]["replayed"].as_u64().unwrap_or(0) >= target
    });
    let v = nodes[2].wait_view("gamma synced and replayed", |v| {
        let m = member(v, "gamma");
        m["sync"].is_null()
            && !synced_not(m)
            && m["log"]["replayed"].as_u64().unwrap_or(0) >= target
    });
    assert!(member(&v, "gamma")["error"].is_null(), "{v:#}");
    let b = read(&b_disk);
    assert!(read(&g_disk) == b, "gamma's disk equals beta's");
    for i in 0..16u64 {
        // The last write to each place wins.
        let at = (i * 7 % 30) * MIB;
        let last = (0..16u64)
            .filter(|j| j * 7 % 30 == i * 7 % 30)
            .max()
            .unwrap();
        assert_eq!(b[at as usize], 0x30 + last as u8);
    }
    // invalidate while alpha is still away: gamma copies beta's disk again. (The
    // first sync may have gone to beta before gamma declared alpha dead: alpha
    // refused the connection.)
    nodes[2].wait_view("gamma sees alpha gone", |v| {
        view_nodes(v).contains(&("alpha".to_string(), false))
    });
    let out = nodes[2].adm_ok(&["invalidate", "r0"]);
    assert!(out.contains("beta"), "{out}");
    nodes[2].wait_view("gamma synced again", |v| {
        let m = member(v, "gamma");
        m["sync"].is_null()
            && !synced_not(m)
            && m["log"]["replayed"].as_u64().unwrap_or(0) >= target
    });
    assert!(
        read(&g_disk) == b,
        "gamma's disk equals beta's after invalidate"
    );
    // alpha comes back: all three end equal.
    nodes[0].start();
    wait_identical(&nodes, &[a_disk, b_disk, g_disk], 0);
}

/// A full sync begun from the primary and resumed from a secondary whose disk is
/// behind the sync's start (the primary died mid-sync) starts the copy over from
/// that secondary: the blocks copied from the primary may hold writes beyond
/// what the secondary's log replays onto them (found in review: the joiner ended
/// `uptodate` without 16 acknowledged writes).
#[test]
fn sync_resumed_from_a_lagging_secondary_after_the_primary_dies() {
    let mut nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let size = 32 * MIB;
    let [_a_disk, b_disk]: [std::path::PathBuf; 2] =
        replicate_r0(&nodes[..2], size).try_into().unwrap();
    // beta fetches but does not replay: its disk is behind alpha's log.
    let writes: Vec<(u64, u8)> = (16..32u64).map(|i| (i * MIB, 0x40 + i as u8)).collect();
    let target = backlog_on_beta(&nodes, &writes);
    // gamma's sync starts from alpha (start_pos = target), slowly.
    nodes[2].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let g_disk = nodes[2].disk("g.img", size);
    nodes[2].adm_ok(&["join-resource", "r0", g_disk.to_str().unwrap()]);
    nodes[2].adm_ok(&["set-rate", "r0", "--sync", &MIB.to_string()]);
    nodes[2].wait_view("gamma syncing from alpha", |v| {
        member(v, "gamma")["sync"]["done"].as_u64().unwrap_or(0) > 0
    });
    // alpha dies mid-sync: gamma goes on from beta, whose disk lacks the writes above.
    nodes[0].kill9();
    nodes[2].adm_ok(&["set-rate", "r0", "--sync", "0"]);
    nodes[2].wait_view("gamma synced", |v| {
        let m = member(v, "gamma");
        m["sync"].is_null() && !synced_not(m)
    });
    nodes[1].adm_ok(&["resume-replay", "r0"]);
    nodes[1].wait_view("beta replayed everything", |v| {
        member(v, "beta")["log"]["replayed"].as_u64().unwrap_or(0) >= target
    });
    let v = nodes[2].wait_view("gamma replayed everything", |v| {
        member(v, "gamma")["log"]["replayed"].as_u64().unwrap_or(0) >= target
    });
    let (b, g) = (read(&b_disk), read(&g_disk));
    let bad: Vec<u64> = (16..32u64)
        .filter(|i| g[(i * MIB) as usize] != 0x40 + *i as u8)
        .collect();
    assert!(
        bad.is_empty(),
        "gamma ({}) lacks acknowledged writes at MiB {bad:?}",
        member(&v, "gamma")["disk"]
    );
    assert!(g == b, "gamma's disk equals beta's");
}

/// beta (`nodes[1]`) pauses replay, alpha writes 1 MiB of each `(offset, byte)` with
/// FUA, and beta fetches all of it: returns alpha's `written` then.
fn backlog_on_beta(nodes: &[Node], writes: &[(u64, u8)]) -> u64 {
    nodes[1].adm_ok(&["pause-replay", "r0"]);
    let mut c = nodes[0].nbd("r0");
    for &(at, byte) in writes {
        assert_eq!(c.write(at, &vec![byte; MIB as usize], true).unwrap(), 0);
    }
    let target = member(&nodes[0].view_json(), "alpha")["log"]["written"]
        .as_u64()
        .unwrap();
    nodes[1].wait_view("beta fetched everything", |v| {
        member(v, "beta")["log"]["fetched"].as_u64().unwrap_or(0) >= target
    });
    target
}

/// Write MiB blocks `blocks` through `c`: block i holds the byte `i + add`.
fn write_mib_blocks(c: &mut NbdClient, blocks: std::ops::Range<u64>, add: u8, fua: bool) {
    for i in blocks {
        let byte = (i as u8).wrapping_add(add);
        assert_eq!(c.write(i * MIB, &vec![byte; MIB as usize], fua).unwrap(), 0);
    }
}

/// Beta, its fetch paused with a backlog, resumes at 2 MiB/s: returns once a
/// fetch stream is running (beta fetched a MiB more).
fn slow_fetch_running_on_beta(nodes: &[Node]) {
    let before = log_pos(&nodes[1], "beta", "fetched");
    nodes[1].adm_ok(&["set-rate", "r0", "--fetch", "2M"]);
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    wait_for("beta fetching", std::time::Duration::from_secs(30), || {
        log_pos(&nodes[1], "beta", "fetched") > before + MIB
    });
}

/// The member's disk is still no image of its sync's source (`syncing`, or
/// `inconsistent` while the sync stalls).
fn synced_not(m: &serde_json::Value) -> bool {
    m["disk"] == "syncing" || m["disk"] == "inconsistent"
}

/// The primary (nodes[0], alpha) has written back to its disk file all it logged:
/// only then does the file hold what its log says.
fn alpha_written_back(nodes: &[Node]) {
    let written = log_pos(&nodes[0], "alpha", "written");
    nodes[0].wait_view("alpha wrote back its log", |v| {
        member(v, "alpha")["log"]["replayed"].as_u64().unwrap_or(0) >= written
    });
}

/// Where `node` says its log is (`fetched` or `replayed`) in `n`'s view.
fn log_pos(n: &Node, node: &str, which: &str) -> u64 {
    member(&n.view_json(), node)["log"][which]
        .as_u64()
        .unwrap_or(0)
}

/// A real cut (beta's link goes down, in network namespaces: packets vanish, no
/// FIN, no RST) in the middle of a fetch stream: beta notices within the dead-peer
/// timeout (before it did not: the stream waited in a read for the link to come
/// back, and beta showed itself connected), says why, and after the link heals
/// catches up to byte-identical disks, while alpha went on writing.
#[test]
fn a_real_link_cut_mid_fetch_is_noticed_and_healed() {
    let net = Net::new(3);
    let nodes = net.start_cluster(&["alpha", "beta", "gamma"]);
    let size = 48 * MIB;
    let disks = replicate_r0(&nodes, size);
    // A backlog for beta, fetched slowly, so that a stream is running at the cut.
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    let mut c = nodes[0].nbd("r0");
    write_mib_blocks(&mut c, 0..24, 1, false);
    assert_eq!(c.flush().unwrap(), 0);
    slow_fetch_running_on_beta(&nodes);
    net.set_link(1, false);
    let v = nodes[1].wait_view("beta notices the cut and says so", |v| {
        let m = member(v, "beta");
        m["connected"] == false && m["error"].is_string()
    });
    let why = member(&v, "beta")["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(why.contains("fetch"), "beta's error names the fetch: {why}");
    // Alpha is not slowed by the cut.
    write_mib_blocks(&mut c, 24..40, 7, true);
    drop(c);
    net.set_link(1, true);
    nodes[1].adm_ok(&["set-rate", "r0", "--fetch", "0"]);
    wait_identical(&nodes, &disks, 0);
    let v = nodes[1].view_json();
    assert_eq!(member(&v, "beta")["connected"], true, "{v:#}");
}

/// Beta and alpha cannot reach each other (a real cut in network namespaces),
/// gamma reaches both: beta fetches alpha's log from gamma, replays all of it
/// and shows itself connected; after the cut heals all three disks are equal.
#[test]
fn a_secondary_cut_off_from_the_primary_fetches_through_another_member() {
    let net = Net::new(3);
    let nodes = net.start_cluster(&["alpha", "beta", "gamma"]);
    let size = 32 * MIB;
    let disks = replicate_r0(&nodes, size);
    // Alpha stays alive in beta's view of the cluster (gamma reaches it).
    net.cut_pair(0, 1, true);
    let mut c = nodes[0].nbd("r0");
    write_mib_blocks(&mut c, 0..16, 3, false);
    assert_eq!(c.flush().unwrap(), 0);
    drop(c);
    let written = log_pos(&nodes[0], "alpha", "written");
    let v = nodes[1].wait_view("beta replays everything alpha wrote, through gamma", |v| {
        member(v, "beta")["log"]["replayed"].as_u64().unwrap_or(0) >= written
    });
    assert_eq!(member(&v, "beta")["connected"], true, "{v:#}");
    alpha_written_back(&nodes);
    assert!(
        read(&disks[1]) == read(&disks[0]),
        "beta's disk equals alpha's while still cut off from it"
    );
    net.cut_pair(0, 1, false);
    wait_identical(&nodes, &disks, 0);
}

/// A member joins while it cannot reach the primary (a real cut between the two;
/// gamma reaches both and is up to date): the primary stays alive in the
/// cluster's view, the sync cannot connect to it, and the disk is copied from
/// gamma instead, then the log comes through gamma too.
#[test]
fn a_member_cut_off_from_the_primary_syncs_from_another() {
    let net = Net::new(3);
    let nodes = net.start_cluster(&["alpha", "beta", "gamma"]);
    let size = 32 * MIB;
    let a_disk = nodes[0].disk("a.img", size);
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    let mut c = nodes[0].nbd("r0");
    for i in 0..8u64 {
        assert_eq!(
            c.write(i * 3 * MIB, &vec![i as u8 + 9; MIB as usize], false)
                .unwrap(),
            0
        );
    }
    assert_eq!(c.flush().unwrap(), 0);
    nodes[2].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let g_disk = nodes[2].disk("g.img", size);
    nodes[2].adm_ok(&["join-resource", "r0", g_disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);

    net.cut_pair(0, 1, true);
    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let b_disk = nodes[1].disk("b.img", size);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    let written = log_pos(&nodes[0], "alpha", "written");
    // Caught up through gamma; `outdated` while cut off: only the primary's own
    // list confirms that a member holds the primary's history.
    nodes[1].wait_view("beta synced from gamma and caught up", |v| {
        let m = member(v, "beta");
        matches!(m["disk"].as_str(), Some("uptodate" | "outdated"))
            && m["split_brain"] == false
            && m["log"]["replayed"].as_u64().unwrap_or(0) >= written
    });
    alpha_written_back(&nodes);
    assert!(read(&b_disk) == read(&a_disk), "beta's disk equals alpha's");
    // Writes while still cut come through gamma.
    for i in 0..4u64 {
        assert_eq!(
            c.write(i * 5 * MIB + 4096, &vec![i as u8 + 77; 65536], true)
                .unwrap(),
            0
        );
    }
    drop(c);
    let written = log_pos(&nodes[0], "alpha", "written");
    nodes[1].wait_view("beta replays the new writes through gamma", |v| {
        member(v, "beta")["log"]["replayed"].as_u64().unwrap_or(0) >= written
    });
    alpha_written_back(&nodes);
    assert!(read(&b_disk) == read(&a_disk), "beta's disk equals alpha's");
    net.cut_pair(0, 1, false);
    wait_identical(&nodes, &[a_disk, b_disk, g_disk], 0);
}

/// Not only pairs: a primary and four secondaries. Writes through qemu-io reach
/// all five disks; a secondary SIGKILLed mid-stream comes back and catches up;
/// a planned handover to the last member serves the same data, and its writes
/// reach the four others.
#[test]
fn five_members_replicate_and_hand_over() {
    let names = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let mut nodes = start_cluster(&names);
    let size = 16 * MIB;
    let disks = replicate_r0(&nodes, size);
    qemu_write(
        &nodes[0],
        &["write -P 0x51 0 4M", "write -P 0x52 6M 1M", "flush"],
    );
    nodes[2].kill9();
    qemu_write(&nodes[0], &["write -P 0x53 8M 4M", "flush"]);
    nodes[2].start();
    wait_identical(&nodes, &disks, 0);
    let a = read(&disks[0]);
    assert!(a[..4 * MIB as usize].iter().all(|&x| x == 0x51));
    assert!(a[(8 * MIB) as usize..(12 * MIB) as usize]
        .iter()
        .all(|&x| x == 0x53));

    let out = nodes[4].adm_ok(&["primary", "r0"]);
    assert!(out.contains("primary here"), "{out}");
    nodes[4].adm_ok(&["wait-resource", "r0", "primary", "--timeout", "60"]);
    qemu_write(&nodes[4], &["write -P 0x54 2M 2M", "flush"]);
    wait_identical(&nodes, &disks, 4);
    let e = read(&disks[4]);
    assert!(e[(2 * MIB) as usize..(4 * MIB) as usize]
        .iter()
        .all(|&x| x == 0x54));
    assert!(e[..2 * MIB as usize].iter().all(|&x| x == 0x51));
}

/// A real partition (network namespaces, silent drops): alpha, the primary, is cut
/// off from beta and gamma but goes on writing for its client; beta takes over
/// with `primary --force` and writes too. After the partition heals, the split
/// brain is detected and shown, `invalidate` on alpha throws away its lone writes,
/// and all three disks end equal to beta's.
#[test]
fn a_real_partition_makes_a_split_brain_that_invalidate_resolves() {
    let net = Net::new(3);
    let nodes = net.start_cluster(&["alpha", "beta", "gamma"]);
    let size = 16 * MIB;
    let disks = replicate_r0(&nodes, size);
    qemu_write(&nodes[0], &["write -P 0x61 0 1M", "flush"]);
    wait_identical(&nodes, &disks, 0);

    net.cut_pair(0, 1, true);
    net.cut_pair(0, 2, true);
    // The test still reaches alpha (through the switch): alpha writes alone.
    qemu_write(&nodes[0], &["write -P 0x62 1M 64k", "flush"]);
    nodes[1].wait_view("alpha unreachable for beta", |v| {
        view_nodes(v).contains(&("alpha".to_string(), false))
    });
    let err = nodes[1].adm_err(&["primary", "r0"]);
    assert!(err.contains("--force"), "{err}");
    nodes[1].adm_ok(&["primary", "--force", "r0"]);
    nodes[1].adm_ok(&["wait-resource", "r0", "primary", "--timeout", "60"]);
    qemu_write(&nodes[1], &["write -P 0x63 2M 64k", "flush"]);

    net.cut_pair(0, 1, false);
    net.cut_pair(0, 2, false);
    let v = nodes[0].wait_view("alpha detects the split brain", |v| {
        member(v, "alpha")["split_brain"] == true
    });
    assert_eq!(member(&v, "alpha")["role"], "secondary", "{v:#}");
    nodes[0].wait_view("alpha sees beta alive", |v| {
        view_nodes(v).contains(&("beta".to_string(), true))
    });
    nodes[0].adm_ok(&["invalidate", "r0"]);
    wait_identical(&nodes, &disks, 1);
    let a = read(&disks[0]);
    let mib = MIB as usize;
    assert!(a[..mib].iter().all(|&x| x == 0x61));
    assert!(
        a[mib..mib + 65536].iter().all(|&x| x == 0),
        "alpha's lone write is gone"
    );
    assert!(a[2 * mib..2 * mib + 65536].iter().all(|&x| x == 0x63));
    let v = nodes[0].view_json();
    assert_eq!(member(&v, "alpha")["split_brain"], false, "{v:#}");
}
