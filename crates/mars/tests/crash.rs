//! Crash safety: acknowledged writes survive SIGKILL of marsd; torn logfile
//! tails are cut on restart; corruption in the middle is refused, named, and
//! never applied.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BLOCK: u64 = 4096;

/// Content of block `b` (of `len` bytes) at generation `g` (never all zero).
fn pattern_of(len: u64, b: u64, g: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    for i in 0..len / 16 {
        v.extend_from_slice(&b.to_le_bytes());
        v.extend_from_slice(&(g ^ (i << 48)).to_le_bytes());
    }
    v
}

#[derive(Default)]
struct WriterState {
    /// Last acknowledged generation per block this writer owns.
    acked: std::collections::HashMap<u64, u64>,
    /// A write sent but not acknowledged when the daemon died.
    in_flight: Option<(u64, u64)>,
}

#[test]
fn acknowledged_writes_survive_sigkill_many_times() {
    // Small writes: batches go through the page cache. Small logfiles, deleted
    // every round: the kills land in recycled logfiles too (records of their
    // earlier use after the end of the log).
    sigkill_rounds(BLOCK, 2048, 3, 25, 192 << 10, 50..1500);
}

/// Writes of 320 KiB from four connections: batches go with O_DIRECT, several
/// at once through the log's I/O threads, so a kill can leave a later batch
/// written and an earlier one not. Recovery must cut such a hole as a torn tail
/// (nothing in it was acknowledged) and keep every acknowledged write.
#[test]
fn acknowledged_large_writes_survive_sigkill_with_batches_in_flight() {
    sigkill_rounds(320 << 10, 64, 4, 12, 4 << 20, 20..300);
}

/// Rounds of: `writers` connections write blocks of `block` bytes (every fifth
/// with FUA, a FLUSH every 16), marsd is SIGKILLed after a random number of
/// acknowledgments in `kill_after`, restarted, and every block must read back as
/// its last acknowledged write (or the one write in flight at the kill).
fn sigkill_rounds(
    block: u64,
    blocks: u64,
    writers: u64,
    rounds: usize,
    logfile_max: u64,
    kill_after: std::ops::Range<u64>,
) {
    let pattern = move |b: u64, g: u64| pattern_of(block, b, g);
    let mut n = Node::create("alpha");
    n.set_setting("logfile_max_bytes", logfile_max);
    n.start();
    let disk = n.disk("disk.img", block * blocks);
    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    let states: Vec<Arc<Mutex<WriterState>>> = (0..writers).map(|_| Arc::default()).collect();
    let generation = Arc::new(AtomicU64::new(1));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
    for round in 0..rounds {
        n.adm_ok(&["wait-resource", "r0", "primary", "--timeout", "20"]);
        n.adm_ok(&["log-delete", "r0"]);
        let acks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for t in 0..writers {
            let (state, acks, stop, generation) = (
                states[t as usize].clone(),
                acks.clone(),
                stop.clone(),
                generation.clone(),
            );
            let addr = n.nbd.clone();
            let seed = rng.random::<u64>();
            handles.push(std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let Ok(mut c) = NbdClient::connect(&addr, "r0") else {
                    return;
                };
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let b = rng.random_range(0..blocks / writers) * writers + t;
                    let g = generation.fetch_add(1, Ordering::Relaxed);
                    state.lock().unwrap().in_flight = Some((b, g));
                    let fua = i.is_multiple_of(5);
                    match c.write(b * block, &pattern(b, g), fua) {
                        Ok(0) => {
                            let mut s = state.lock().unwrap();
                            s.acked.insert(b, g);
                            s.in_flight = None;
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => return, // daemon died: the write stays in flight
                    }
                    i += 1;
                    if i.is_multiple_of(16) && !matches!(c.flush(), Ok(0)) {
                        return;
                    }
                }
            }));
        }
        // Kill after a random number of acknowledged writes: a random moment in the write stream.
        let target = rng.random_range(kill_after.clone());
        wait_for("acknowledged writes", Duration::from_secs(60), || {
            acks.load(Ordering::Relaxed) >= target
        });
        n.kill9();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
        n.start();
        n.adm_ok(&["wait-resource", "r0", "primary", "--timeout", "20"]);
        let mut c = n.nbd("r0");
        let mut checked = 0;
        for (t, state) in states.iter().enumerate() {
            let mut s = state.lock().unwrap();
            for blk in (0..blocks / writers).map(|k| k * writers + t as u64) {
                let (e, got) = c.read(blk * block, block as u32).unwrap();
                assert_eq!(e, 0);
                let acked = s.acked.get(&blk).copied();
                let expected = acked
                    .map(|g| pattern(blk, g))
                    .unwrap_or_else(|| vec![0; block as usize]);
                if got == expected {
                    checked += 1;
                    continue;
                }
                // Only the one write that was in flight at the kill may have landed instead.
                match s.in_flight {
                    Some((b, g)) if b == blk && got == pattern(blk, g) => {
                        s.acked.insert(blk, g);
                    }
                    _ => panic!(
                        "round {round}: block {blk} lost its acknowledged content (acked generation {acked:?}, in flight {:?})\n{}",
                        s.in_flight,
                        n.log_text()
                    ),
                }
            }
            s.in_flight = None;
        }
        assert!(checked > 0);
    }
    let holes = n
        .log_text()
        .lines()
        .filter(|l| l.contains("written while it was not yet durable"))
        .count();
    eprintln!("torn tails with valid records after them (holes cut): {holes}");
    assert!(n.log_text().contains("disk attached, log recovered"));
    assert!(
        n.log_text().contains("recycled=true"),
        "no kill landed in a recycled logfile"
    );
    // The block checksums agree with the disk after all those kills (the
    // reads above found no false mismatch either).
    n.stop();
    let stale = stale_checksums(&n.dir.join("resources/r0"), &disk);
    assert!(stale.is_empty(), "stale checksums of blocks {stale:?}");
}

fn last_logfile(n: &Node) -> std::path::PathBuf {
    let rdir = n.dir.join("resources/r0");
    let mut logs: Vec<_> = std::fs::read_dir(&rdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("log-"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > 64)
        .collect();
    logs.sort();
    logs.pop().expect("a logfile with records")
}

#[test]
fn torn_tail_is_cut_and_corrupt_middle_is_refused() {
    let mut n = Node::create("alpha");
    n.start();
    let disk = n.disk("disk.img", 1 << 20);
    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    let write_records = |n: &Node, fill: u8| {
        let mut c = n.nbd("r0");
        for i in 0..4u64 {
            assert_eq!(c.write(i * 8192, &[fill + i as u8; 8192], true).unwrap(), 0);
        }
    };
    write_records(&n, 0x10);
    n.kill9();

    // Torn tail: the last record loses its end, as if the crash hit mid-write.
    let log = last_logfile(&n);
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let out = std::process::Command::new(MARSADM)
        .arg("dump-log")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "dump-log reports damage");
    assert!(String::from_utf8_lossy(&out.stdout).contains("TORN TAIL"));
    n.start();
    n.adm_ok(&["wait-resource", "r0", "primary", "--timeout", "20"]);
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        64 + 3 * (64 + 8192),
        "torn record cut off"
    );
    assert!(n.log_text().contains("cutting torn tail"));
    let out = std::process::Command::new(MARSADM)
        .arg("dump-log")
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "clean after the cut: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut c = n.nbd("r0");
    for i in 0..3u64 {
        assert_eq!(
            c.read(i * 8192, 8192).unwrap().1,
            vec![0x10 + i as u8; 8192]
        );
    }
    drop(c);

    // Corruption in the middle: flip a bit in the first record's data of a fresh logfile.
    write_records(&n, 0x40);
    n.kill9();
    let log = last_logfile(&n);
    let mut bytes = read(&log);
    bytes[64 + 64 + 100] ^= 0x04;
    std::fs::write(&log, &bytes).unwrap();
    let disk_before = read(&disk);
    let out = std::process::Command::new(MARSADM)
        .arg("dump-log")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CORRUPT") && text.contains("file offset 64"),
        "{text}"
    );

    n.start();
    let v = n.view_json();
    let r = &v["resources"][0];
    assert!(
        r["device"].is_null(),
        "a resource with a corrupt log is not served"
    );
    let err = r["members"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = log.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        err.contains(&name) && err.contains("log position"),
        "error names file and position: {err}"
    );
    let refused = n.adm_err(&["primary", "r0"]);
    assert!(refused.contains(&name), "{refused}");
    assert!(
        read(&disk) == disk_before,
        "nothing from the corrupt logfile was applied"
    );
    assert!(n.log_text().contains(&name));
}
