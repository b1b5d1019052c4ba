//! Faults that pass do not stick (issue 16): a full node directory and a
//! process out of file descriptors delay writes; they never fail the device
//! for good, and nothing acknowledged is lost.

mod common;
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const CHUNK: usize = 256 << 10;

/// Writes chunk after chunk with FUA over the device, each filled with its
/// number; records what was acknowledged. Stops after `total` bytes or when
/// told; returns the first error.
fn writer(
    nbd: String,
    total: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut c = NbdClient::connect(&nbd, "r0").map_err(|e| e.to_string())?;
        let mut i = 0u64;
        while i * (CHUNK as u64) < total && !stop.load(Ordering::Acquire) {
            let slot = i % (SIZE / CHUNK as u64);
            let fill = (i % 251) as u8 + 1;
            let err = c
                .write(slot * CHUNK as u64, &vec![fill; CHUNK], true)
                .map_err(|e| e.to_string())?;
            if err != 0 {
                return Err(format!("write {i} answered error {err}"));
            }
            acked.lock().unwrap()[slot as usize] = fill;
            i += 1;
            done.store(i * CHUNK as u64, Ordering::Release);
        }
        Ok(())
    })
}

fn check_disk(n: &Node, acked: &[u8]) {
    let mut c = n.nbd("r0");
    for (slot, fill) in acked.iter().enumerate() {
        let (err, data) = c.read(slot as u64 * CHUNK as u64, CHUNK as u32).unwrap();
        assert_eq!(err, 0);
        assert!(
            data.iter().all(|b| b == fill),
            "chunk {slot}: acknowledged {fill}, read {}",
            data[0]
        );
    }
}

/// The node directory on a 24 MiB tmpfs, filled to the last byte while a
/// client writes with FUA, then emptied: every write is acknowledged (the
/// log waits for the space policy and the operator instead of failing), and
/// after SIGKILL and restart the device holds every acknowledged write.
#[test]

fn a_full_node_directory_delays_writes_and_loses_nothing() {
    require_tool("mount", "mount");
    let mut n = Node::create("alpha");
    n.set_setting("logfile_max_bytes", 2 * MIB);
    n.set_setting("log_keep_bytes", 4 * MIB);
    n.set_setting("emergency_free_bytes", MIB);
    // Move the node directory onto its own small filesystem.
    let stash = n.path("stash");
    run(Command::new("cp").arg("-a").arg(&n.dir).arg(&stash));
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&n.dir));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(n.dir.clone());
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", stash.display()))
        .arg(&n.dir));
    n.start();
    let disk = n.disk("r0.img", SIZE);
    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);

    let acked = Arc::new(Mutex::new(vec![0u8; (SIZE / CHUNK as u64) as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let w = writer(n.nbd.clone(), 96 * MIB, stop, acked.clone(), done.clone());
    wait_for("8 MiB written", Duration::from_secs(60), || {
        done.load(Ordering::Acquire) >= 8 * MIB
    });
    // Fill the filesystem to the last byte.
    let filler = n.dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xeeu8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0xee]);
    }
    wait_for("the log found no space", Duration::from_secs(60), || {
        n.log_text().contains("asking for space")
    });
    let stalled_at = done.load(Ordering::Acquire);
    // Space comes back: the writes go on.
    std::fs::remove_file(&filler).unwrap();
    wait_for("writes go on", Duration::from_secs(60), || {
        done.load(Ordering::Acquire) > stalled_at + 8 * MIB
    });
    if let Err(e) = w.join().unwrap() {
        panic!("not every write acknowledged: {e}\n{}", n.log_text());
    }
    assert!(!n.log_text().contains("logger failed"), "{}", n.log_text());
    let acked = acked.lock().unwrap().clone();
    check_disk(&n, &acked);
    n.kill9();
    n.start();
    n.wait_view("r0 served again", |v| {
        resource(v, "r0").is_some_and(|r| r["actual_primary"] == "alpha")
    });
    check_disk(&n, &acked);
}

/// marsd under a limit of 600 open files, 700 idle connections to its peer
/// port: connections beyond its cap are closed, and the log still opens new
/// logfiles (rotations) and takes every write.
#[test]
fn idle_peer_connections_cannot_take_every_file_descriptor() {
    require_tool("prlimit", "util-linux");
    let mut n = Node::create("alpha");
    n.wrapper = vec!["prlimit".into(), "--nofile=600:600".into()];
    n.start();
    let disk = n.disk("r0.img", SIZE);
    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    let idle: Vec<std::net::TcpStream> = (0..700)
        .filter_map(|_| std::net::TcpStream::connect(&n.listen).ok())
        .collect();
    assert!(idle.len() > 600, "only {} connections opened", idle.len());
    wait_for("the cap refuses the rest", Duration::from_secs(30), || {
        n.log_text().contains("refusing peer connections")
    });
    let acked = Arc::new(Mutex::new(vec![0u8; (SIZE / CHUNK as u64) as usize]));
    let done = Arc::new(AtomicU64::new(0));
    let w = writer(
        n.nbd.clone(),
        16 * MIB,
        Arc::new(AtomicBool::new(false)),
        acked.clone(),
        done,
    );
    for _ in 0..8 {
        n.adm_ok(&["log-rotate", "r0"]);
    }
    w.join().unwrap().expect("every write acknowledged");
    for _ in 0..4 {
        n.adm_ok(&["log-rotate", "r0"]);
    }
    drop(idle);
    let acked = acked.lock().unwrap().clone();
    check_disk(&n, &acked);
    assert!(!n.log_text().contains("logger failed"), "{}", n.log_text());
}
