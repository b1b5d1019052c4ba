//! Logger behaviour against a plain byte-array model, recovery from damaged logs.

use bytes::Bytes;
use mars_logger::{list_logfiles, Config, Logger, LoggerError};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;

fn setup(dir: &Path) -> Config {
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(SIZE).unwrap();
    let logdir = dir.join("res");
    std::fs::create_dir_all(&logdir).unwrap();
    Config::new("alpha", &logdir, &disk, SIZE, 42)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// Random writes, zeroes and reads, checked against a byte array; then reopen and check again.
#[test]
fn random_io_matches_model_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path());
    cfg.mem_limit_bytes = 256 << 10; // exercise backpressure
    cfg.logfile_max_bytes = 512 << 10; // and rotation
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let rt = rt();
    {
        let logger = Logger::open(cfg.clone()).unwrap();
        rt.block_on(async {
            for i in 0..2000u32 {
                let off = rng.random_range(0..SIZE - 70000);
                let len = rng.random_range(1..65536u64);
                match rng.random_range(0..10) {
                    0 => {
                        logger.zero(off, len, false, i % 2 == 0).await.unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    1 => {
                        let got = logger.read(off, len).unwrap();
                        assert_eq!(
                            &got[..],
                            &model[off as usize..(off + len) as usize],
                            "read {i}"
                        );
                    }
                    2 => logger.flush().await.unwrap(),
                    _ => {
                        let fill = (i % 251) as u8;
                        logger
                            .write(off, Bytes::from(vec![fill; len as usize]), i % 7 == 0)
                            .await
                            .unwrap();
                        model[off as usize..(off + len) as usize].fill(fill);
                    }
                }
            }
        });
        let all = logger.read(0, SIZE).unwrap();
        assert!(all[..] == model[..], "full read before close");
        assert!(
            list_logfiles(&cfg.dir).unwrap().len() > 2,
            "rotation happened"
        );
        logger.close();
        let st = logger.status();
        assert_eq!(st.applied_pos, st.logged_pos);
        assert_eq!(st.persisted_pos, st.logged_pos);
    }
    let disk = std::fs::read(&cfg.disk).unwrap();
    assert!(disk == model, "disk after clean close equals model");
    let logger = Logger::open(cfg.clone()).unwrap();
    assert!(logger.read(0, SIZE).unwrap()[..] == model[..]);
    let deleted = logger.delete_applied().unwrap();
    assert!(!deleted.is_empty());
    assert_eq!(
        list_logfiles(&cfg.dir).unwrap().len(),
        1,
        "only the current logfile is left"
    );
}

/// A log that was never written back (disk reset) is applied again on open.
#[test]
fn reopen_replays_log_onto_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let rt = rt();
    {
        let logger = Logger::open(cfg.clone()).unwrap();
        rt.block_on(async {
            logger
                .write(4096, Bytes::from(vec![0xAB; 8192]), true)
                .await
                .unwrap();
            logger.zero(5000, 100, true, false).await.unwrap();
        });
        logger.close();
    }
    // Pretend writeback never happened: zero the disk and forget the applied position.
    std::fs::write(&cfg.disk, vec![0u8; SIZE as usize]).unwrap();
    // As a kill leaves it (a cleanly closed disk written behind its checksums' back is refused).
    mars_logger::csum::Csum::mark_unclean(&cfg.dir).unwrap();
    std::fs::remove_file(cfg.dir.join("applied")).unwrap();
    for v in std::fs::read_dir(&cfg.dir).unwrap() {
        let p = v.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("version-")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let logger = Logger::open(cfg.clone()).unwrap();
    let got = logger.read(4096, 8192).unwrap();
    assert!(got[..904].iter().all(|&b| b == 0xAB));
    assert!(got[904..1004].iter().all(|&b| b == 0));
    assert!(got[1004..].iter().all(|&b| b == 0xAB));
    let disk = std::fs::read(&cfg.disk).unwrap();
    assert_eq!(&disk[4096..4096 + 8192], &got[..]);
}

fn last_logfile_with_records(cfg: &Config) -> std::path::PathBuf {
    list_logfiles(&cfg.dir)
        .unwrap()
        .into_iter()
        .rev()
        .map(|e| e.path)
        .find(|p| std::fs::metadata(p).unwrap().len() > 64)
        .unwrap()
}

#[test]
fn torn_tail_is_cut_and_corruption_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let rt = rt();
    let write_some = |n: u64| {
        let logger = Logger::open(cfg.clone()).unwrap();
        rt.block_on(async {
            for i in 0..n {
                logger
                    .write(i * 4096, Bytes::from(vec![i as u8 + 1; 4096]), true)
                    .await
                    .unwrap();
            }
        });
        logger.close();
    };
    write_some(4);
    // Torn tail: cut the last record in half. The file must come back cut, the rest intact.
    let log = last_logfile_with_records(&cfg);
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len - 2000)
        .unwrap();
    std::fs::remove_file(cfg.dir.join("applied")).unwrap();
    for v in std::fs::read_dir(&cfg.dir).unwrap() {
        let p = v.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("version-")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let logger = Logger::open(cfg.clone()).unwrap();
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        64 + 3 * (64 + 4096),
        "torn record cut off"
    );
    logger.close();
    drop(logger);

    // Corruption in the middle: flip a payload bit of the first record of a fresh logfile.
    write_some(3);
    let log = last_logfile_with_records(&cfg);
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[64 + 64 + 10] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();
    std::fs::remove_file(cfg.dir.join("applied")).unwrap();
    let before: Vec<_> = list_logfiles(&cfg.dir).unwrap();
    let disk_before = std::fs::read(&cfg.disk).unwrap();
    match Logger::open(cfg.clone()) {
        Err(LoggerError::Corrupt(msg)) => {
            assert!(
                msg.contains(&log.file_name().unwrap().to_string_lossy().to_string()),
                "{msg}"
            );
            assert!(msg.contains("log position"), "{msg}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("corrupt log accepted"),
    }
    assert_eq!(
        list_logfiles(&cfg.dir).unwrap(),
        before,
        "no logfile created or removed"
    );
    let _ = disk_before;
}

#[test]
fn backpressure_bounds_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path());
    cfg.mem_limit_bytes = 1 << 20;
    let logger = std::sync::Arc::new(Logger::open(cfg).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let logger = logger.clone();
            let peak = peak.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..64u64 {
                    let off = ((t * 64 + i) * 65536) % (SIZE - 65536);
                    logger
                        .write(off, Bytes::from(vec![1u8; 65536]), false)
                        .await
                        .unwrap();
                    peak.fetch_max(
                        logger.status().mem_used_bytes,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    // One batch may overshoot the limit by at most its own size (8 MiB cap); with 64 KiB writes from 8 tasks, far less.
    let p = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!(p <= (1 << 20) + 8 * 65536 + 8 * 128, "peak {p}");
    wait_until("writeback drained", || logger.status().mem_used_bytes == 0);
}

/// The persister syncs the disk only every `persist_interval`; `persist_now` does it
/// right away (log-delete uses it), and `delete_applied_before` never deletes a
/// logfile that ends past its limit.
#[test]
fn persist_now_and_delete_applied_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path());
    cfg.persist_interval = Duration::from_secs(3600);
    cfg.idle_sync = Duration::from_millis(1);
    let logger = Logger::open(cfg.clone()).unwrap();
    let rt = rt();
    // The persister's first sync comes right away; later ones wait for the interval.
    rt.block_on(logger.write(65536, Bytes::from(vec![1u8; 512]), true))
        .unwrap();
    wait_until("the first persist", || {
        let st = logger.status();
        st.persisted_pos == st.logged_pos
    });
    rt.block_on(async {
        logger
            .write(0, Bytes::from(vec![3u8; 8192]), true)
            .await
            .unwrap();
        logger.rotate().await.unwrap().unwrap();
        logger
            .write(8192, Bytes::from(vec![4u8; 4096]), false)
            .await
            .unwrap();
    });
    let first_end = {
        let st = logger.status();
        st.logged_pos - (64 + 4096)
    };
    wait_until("writeback and the version of logfile 1", || {
        logger.status().applied_pos >= first_end && cfg.dir.join("version-000000001-alpha").exists()
    });
    let before = logger.status().persisted_pos;
    assert!(before < first_end, "persisted without being asked");
    assert!(
        logger.delete_applied().unwrap().is_empty(),
        "not persisted yet"
    );
    let p = logger.persist_now().unwrap();
    assert!(p >= first_end && logger.status().persisted_pos == p);
    assert!(logger
        .delete_applied_before(first_end - 1)
        .unwrap()
        .is_empty());
    assert!(cfg.dir.join("log-000000001-alpha").exists());
    assert_eq!(
        logger.delete_applied_before(first_end).unwrap(),
        vec!["log-000000001-alpha".to_string()]
    );
    logger.close();
}

/// The start position and the length of a logfile.
fn logfile_start_and_len(path: &Path) -> (u64, u64) {
    let b = std::fs::read(path).unwrap();
    let h = mars_logfmt::FileHeader::decode(&b).unwrap();
    (h.start_pos, b.len() as u64)
}

/// Deleted logfiles become spares and are reused as new logfiles (longer than
/// their log while current, holding the records of their earlier use after its
/// end): the log stays exact across rotation, a crash copy (recovery cuts the old
/// records as a torn tail) and a clean reopen; finished logfiles hold exactly their
/// records; a spare whose old records would lie at their places is never reused.
#[test]
fn recycled_logfiles_keep_the_log_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path());
    cfg.logfile_max_bytes = 1 << 20;
    cfg.spare_bytes = 6 << 20;
    cfg.persist_interval = Duration::from_millis(10);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let rt = rt();
    let logger = Logger::open(cfg.clone()).unwrap();
    let mut write_some = |logger: &Logger, model: &mut Vec<u8>, bytes: u64| {
        let mut done = 0;
        rt.block_on(async {
            while done < bytes {
                // Small records (buffered, padded in a recycled file) and large ones
                // (O_DIRECT batches).
                let len = if rng.random_range(0..4) == 0 {
                    rng.random_range(256 << 10..600 << 10)
                } else {
                    rng.random_range(1..20000u64)
                };
                let off = rng.random_range(0..SIZE - len);
                let fill = rng.random::<u8>() | 1;
                logger
                    .write(off, Bytes::from(vec![fill; len as usize]), false)
                    .await
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(fill);
                done += len;
            }
            logger.flush().await.unwrap();
        });
    };
    write_some(&logger, &mut model, 6 << 20);
    // An empty new logfile, made before there are spares...
    rt.block_on(logger.write(4096, Bytes::from(vec![9u8; 100]), false))
        .unwrap();
    model[4096..4196].fill(9);
    let empty = cfg.dir.join(rt.block_on(logger.rotate()).unwrap().unwrap());
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 64);
    let st = logger.status();
    wait_until("writeback", || logger.status().applied_pos == st.logged_pos);
    logger.persist_now().unwrap();
    assert!(!logger.delete_applied().unwrap().is_empty());
    let spares = mars_logger::list_spares(&cfg.dir).unwrap();
    assert!(
        spares.len() >= 2,
        "deleted logfiles kept as spares: {spares:?}"
    );
    let spare_bytes: u64 = spares.iter().map(|s| s.1).sum();
    assert!(spare_bytes <= cfg.spare_bytes);
    // ...is swapped for one of them (same name, same header).
    wait_until("the empty logfile swapped for a spare", || {
        std::fs::metadata(&empty).unwrap().len() > 64
    });
    let spares = mars_logger::list_spares(&cfg.dir).unwrap();

    // A spare whose first record has the position the next logfile starts at: its
    // old records would pass for the new ones. It is the largest, so tried first.
    rt.block_on(logger.write(0, Bytes::from(vec![5u8; 512]), false))
        .unwrap();
    model[..512].fill(5);
    let next_start = logger.status().logged_pos;
    let trap = cfg.dir.join("spare-trap");
    {
        let mut b = mars_logfmt::FileHeader {
            file_seq: 999,
            start_pos: next_start,
            start_record_seq: 1,
            created_ns: 0,
            resource_id: 42,
            parent: 0,
        }
        .encode()
        .to_vec();
        let h = mars_logfmt::RecordHeader {
            kind: mars_logfmt::Kind::Write,
            seq: 1,
            pos: next_start,
            offset: 0,
            length: 4096,
            stamp_ns: 0,
            durable_back: 0,
        };
        h.encode_into(&[7u8; 4096], &mut b);
        b.resize(8 << 20, 0);
        std::fs::write(&trap, &b).unwrap();
    }
    let name = rt.block_on(logger.rotate()).unwrap().unwrap();
    assert!(!trap.exists(), "the unusable spare is removed");
    let current = cfg.dir.join(&name);
    assert!(
        std::fs::metadata(&current).unwrap().len() < 8 << 20,
        "the unusable spare was not taken"
    );

    // Write on into recycled logfiles; look at one while it is current.
    let mut seen_recycled = false;
    for _ in 0..6 {
        write_some(&logger, &mut model, 700 << 10);
        let st = logger.status();
        let cur = cfg.dir.join(&st.current_logfile);
        let (start, len) = logfile_start_and_len(&cur);
        seen_recycled |= len > 64 + (st.logged_pos - start);
    }
    assert!(seen_recycled, "a current logfile was a recycled spare");
    assert!(
        mars_logger::list_spares(&cfg.dir).unwrap().len() < spares.len(),
        "spares were used"
    );

    // A crash copy: everything before the flush is there; recovery cuts the old
    // records after the end of the current logfile as a torn tail.
    // Quiescent first (written back, persisted, versions written), so that disk
    // and directory are copied at one moment.
    let st = logger.status();
    wait_until("writeback", || logger.status().applied_pos == st.logged_pos);
    logger.persist_now().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let mut ccfg = setup(copy.path());
    ccfg.logfile_max_bytes = cfg.logfile_max_bytes;
    std::fs::copy(&cfg.disk, &ccfg.disk).unwrap();
    for e in std::fs::read_dir(&cfg.dir).unwrap() {
        let e = e.unwrap();
        match std::fs::copy(e.path(), ccfg.dir.join(e.file_name())) {
            // A temporary file of a state update that finished meanwhile.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            r => {
                r.unwrap();
            }
        }
    }
    {
        let recovered = Logger::open(ccfg.clone()).unwrap();
        assert!(
            recovered.read(0, SIZE).unwrap()[..] == model[..],
            "crash copy recovers to the acknowledged writes"
        );
        recovered.close();
    }

    logger.close();
    drop(logger);
    for e in list_logfiles(&cfg.dir).unwrap() {
        let b = std::fs::read(&e.path).unwrap();
        let r = mars_logfmt::scan_logfile(&b);
        assert!(r.damage.is_none(), "{}: {:?}", e.name(), r.damage);
        assert_eq!(
            r.valid_end,
            b.len() as u64,
            "{} holds exactly its records",
            e.name()
        );
    }
    let logger = Logger::open(cfg.clone()).unwrap();
    assert!(logger.read(0, SIZE).unwrap()[..] == model[..]);
    logger.close();
    assert!(std::fs::read(&cfg.disk).unwrap() == model);
}

/// Emergency deletion wants the space: `delete_applied_without_spares` removes the
/// logfiles and keeps none as a spare (`delete_applied` would keep them).
#[test]
fn deletion_for_space_keeps_no_spares() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = setup(dir.path());
    cfg.logfile_max_bytes = 256 << 10;
    cfg.spare_bytes = 64 << 20;
    let rt = rt();
    let logger = Logger::open(cfg.clone()).unwrap();
    rt.block_on(async {
        for i in 0..16u64 {
            let off = (i * 65536) % SIZE;
            logger
                .write(off, Bytes::from(vec![i as u8 + 1; 65536]), false)
                .await
                .unwrap();
        }
        logger.flush().await.unwrap();
    });
    let st = logger.status();
    wait_until("writeback", || logger.status().applied_pos == st.logged_pos);
    logger.persist_now().unwrap();
    let before = list_logfiles(&cfg.dir).unwrap().len();
    assert!(before > 2, "rotation happened");
    let deleted = logger.delete_applied_without_spares().unwrap();
    assert_eq!(deleted.len(), before - 1, "all but the current logfile");
    assert!(mars_logger::list_spares(&cfg.dir).unwrap().is_empty());
    assert_eq!(list_logfiles(&cfg.dir).unwrap().len(), 1);
}

/// Every new logfile names the one before it at its start (rotation and
/// reopen); a logfile whose link names another history is refused on open,
/// and nothing is applied from it.
#[test]
fn logfiles_chain_by_parent_links_and_a_foreign_link_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let rt = rt();
    {
        let logger = Logger::open(cfg.clone()).unwrap();
        rt.block_on(async {
            logger
                .write(0, Bytes::from(vec![1u8; 4096]), true)
                .await
                .unwrap();
            logger.rotate().await.unwrap().unwrap();
            logger
                .write(4096, Bytes::from(vec![2u8; 4096]), true)
                .await
                .unwrap();
        });
        logger.close();
    }
    // Reopened: a third logfile after the second.
    Logger::open(cfg.clone()).unwrap().close();
    let logs = list_logfiles(&cfg.dir).unwrap();
    assert!(logs.len() >= 3, "{logs:?}");
    let header = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let mut h = [0u8; 64];
        h.copy_from_slice(&b[..64]);
        (h, mars_logfmt::FileHeader::decode(&h).unwrap())
    };
    for w in logs.windows(2) {
        let (pb, _) = header(&w[0].path);
        let (_, h) = header(&w[1].path);
        assert_eq!(
            h.parent,
            mars_logfmt::parent_link(&pb, h.start_pos),
            "{} names {}",
            w[1].name(),
            w[0].name()
        );
    }
    // The second logfile rewritten as a child of another logfile.
    let (_, mut h) = header(&logs[1].path);
    h.parent ^= 1;
    let mut b = std::fs::read(&logs[1].path).unwrap();
    b[..64].copy_from_slice(&h.encode());
    std::fs::write(&logs[1].path, &b).unwrap();
    std::fs::remove_file(cfg.dir.join("applied")).unwrap();
    std::fs::write(&cfg.disk, vec![0u8; SIZE as usize]).unwrap();
    mars_logger::csum::Csum::mark_unclean(&cfg.dir).unwrap();
    match Logger::open(cfg.clone()) {
        Ok(_) => panic!("opened a directory of two histories"),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("two histories") && e.contains("invalidate"),
                "{e}"
            );
        }
    }
    let disk = std::fs::read(&cfg.disk).unwrap();
    assert!(
        disk.iter().all(|&x| x == 0),
        "nothing applied from a directory of two histories"
    );
}

/// Red team (session 17): a node upgraded across 2026-12-07 holds the
/// version file of an empty logfile (two restarts of its writer without a
/// write between them: the second recovery versions the empty logfile the
/// first opened) computed by the formula without the empty-logfile rule. Its
/// writer must still start, and the next logfiles must chain as if the empty
/// logfile were not there.
#[test]
fn a_version_of_an_empty_logfile_from_before_the_empty_rule_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path());
    let rt = rt();
    let logger = Logger::open(cfg.clone()).unwrap();
    rt.block_on(logger.write(4096, Bytes::from(vec![5u8; 4096]), true))
        .unwrap();
    logger.close();
    // Opened and closed without a write: log 2 stays empty.
    Logger::open(cfg.clone()).unwrap().close();
    Logger::open(cfg.clone()).unwrap().close();
    let path = cfg.dir.join(mars_logfmt::version_file_name(2, "alpha"));
    let text = std::fs::read_to_string(&path).unwrap();
    let v = mars_logfmt::Version::from_json(&text).unwrap();
    assert_eq!(v.start_pos, v.end_pos, "log 2 is empty: {v:?}");
    // Rewrite it as the code before 2026-12-07 wrote it.
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    };
    let mut h = blake3::Hasher::new();
    h.update(b"mars-version-2");
    h.update(&unhex(&v.prev));
    h.update(&v.file_seq.to_le_bytes());
    h.update(&v.start_pos.to_le_bytes());
    h.update(&v.end_pos.to_le_bytes());
    h.update(&unhex(&v.records_digest));
    let old_digest: String = h
        .finalize()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let old = mars_logfmt::Version {
        version: old_digest,
        ..v.clone()
    };
    std::fs::write(&path, old.to_json()).unwrap();
    let opened = Logger::open(cfg.clone());
    assert!(opened.is_ok(), "{:?}", opened.err());
    let logger = opened.unwrap();
    rt.block_on(logger.write(0, Bytes::from(vec![6u8; 4096]), true))
        .unwrap();
    logger.close();
    Logger::open(cfg.clone()).unwrap().close();
    // Log 4 (log 3 is empty too) chains on the version before the empty one.
    let v4 = mars_logfmt::Version::from_json(
        &std::fs::read_to_string(cfg.dir.join(mars_logfmt::version_file_name(4, "alpha"))).unwrap(),
    )
    .unwrap();
    assert_eq!(v4.prev, v.prev, "log 4 chains past the empty logs 2 and 3");
}
