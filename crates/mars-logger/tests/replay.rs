//! Replay of a primary's logfiles on another node: equal disks at the end,
//! a prefix image after every step, growing files, corruption and split brain.

use bytes::Bytes;
use mars_logfmt::{scan_logfile, FileHeader, Kind, VersionBuilder};
use mars_logger::disk::AlignedBuf;
use mars_logger::fetched::FetchedChunks;
use mars_logger::history::{Lineage, Listed};
use mars_logger::replay::{HwMark, Replayer, HW_FILE, HW_LEN};
use mars_logger::{list_logfiles, Config, Logger};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SIZE: u64 = 1 << 20;

/// A primary's logs after random writes; returns (primary dir, primary disk).
fn primary_logs(root: &Path, writes: u32) -> (PathBuf, PathBuf) {
    let disk = root.join("a.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    let dir = root.join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = Config::new("alpha", &dir, &disk, SIZE, 7);
    cfg.logfile_max_bytes = 64 << 10;
    let logger = Logger::open(cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    rt.block_on(async {
        for i in 0..writes {
            let off = rng.random_range(0..SIZE - 8192);
            let len = rng.random_range(1..8192u64);
            if i % 9 == 0 {
                logger.zero(off, len, false, i % 2 == 0).await.unwrap();
            } else {
                logger
                    .write(
                        off,
                        Bytes::from(vec![(i % 250) as u8 + 1; len as usize]),
                        false,
                    )
                    .await
                    .unwrap();
            }
        }
    });
    logger.close();
    (dir, disk)
}

/// A secondary directory holding copies of the primary's logfiles and versions.
fn secondary(root: &Path, from: &Path) -> (PathBuf, PathBuf) {
    let dir = root.join("b");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("log-") || name.starts_with("version-") {
            std::fs::copy(&p, dir.join(&name)).unwrap();
        }
    }
    let disk = root.join("b.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    (dir, disk)
}

/// The image after applying the first `n` records of all logfiles to zeroes.
fn images(dir: &Path) -> Vec<Vec<u8>> {
    let mut img = vec![0u8; SIZE as usize];
    let mut out = vec![img.clone()];
    for e in list_logfiles(dir).unwrap() {
        let bytes = std::fs::read(&e.path).unwrap();
        let r = scan_logfile(&bytes);
        for rec in r.records {
            let h = rec.header;
            let (o, l) = (h.offset as usize, h.length as usize);
            match h.kind {
                Kind::Write => {
                    let at = rec.file_offset as usize + 64;
                    img[o..o + l].copy_from_slice(&bytes[at..at + l]);
                }
                _ => img[o..o + l].fill(0),
            }
            out.push(img.clone());
        }
    }
    out
}

#[test]
fn replay_reaches_the_primary_image_through_prefix_images_only() {
    let root = tempfile::tempdir().unwrap();
    let (adir, adisk) = primary_logs(root.path(), 300);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    assert!(list_logfiles(&bdir).unwrap().len() > 3, "several logfiles");
    let imgs = images(&bdir);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    let mut applied = 0usize;
    loop {
        let o = r.step(1).unwrap(); // one record at a time
        applied += o.records as usize;
        let disk = std::fs::read(&bdisk).unwrap();
        assert!(
            disk == imgs[applied],
            "after {applied} records the disk is not the prefix image"
        );
        if o.idle {
            break;
        }
    }
    assert_eq!(applied, imgs.len() - 1);
    assert!(
        std::fs::read(&bdisk).unwrap() == std::fs::read(&adisk).unwrap(),
        "equal to the primary"
    );
    assert!(r.halted().is_none(), "versions agree: no split brain");
    // Our versions were written and equal the origin's.
    let seq = list_logfiles(&bdir).unwrap()[0].seq;
    let ours = std::fs::read_to_string(bdir.join(format!("version-{seq:09}-beta"))).unwrap();
    let theirs = std::fs::read_to_string(bdir.join(format!("version-{seq:09}-alpha"))).unwrap();
    assert_eq!(
        mars_logfmt::Version::from_json(&ours).unwrap().version,
        mars_logfmt::Version::from_json(&theirs).unwrap().version
    );
    // Restart: resumes from the persisted position, applies nothing twice.
    r.persist().unwrap();
    let pos = r.position();
    drop(r);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    assert_eq!(r.position(), pos);
    assert_eq!(r.step(u64::MAX).unwrap().records, 0);
}

#[test]
fn growing_logfile_is_applied_record_by_record() {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 40);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let first = list_logfiles(&bdir).unwrap().remove(0);
    for e in list_logfiles(&bdir).unwrap().into_iter().skip(1) {
        std::fs::remove_file(e.path).unwrap();
    }
    let full = std::fs::read(&first.path).unwrap();
    let recs = scan_logfile(&full).records;
    assert!(recs.len() >= 3);
    // Only part of the third record has arrived.
    let cut = recs[2].file_offset as usize + 70;
    std::fs::write(&first.path, &full[..cut]).unwrap();
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    let o = r.step(u64::MAX).unwrap();
    assert_eq!((o.records, o.idle), (2, true));
    std::fs::write(&first.path, &full).unwrap();
    let o = r.step(u64::MAX).unwrap();
    assert_eq!(o.records as usize, recs.len() - 2);
}

/// `persist_if_due` persists only once the interval has passed since the last
/// persist (each persist syncs the disk); `persist` always does.
#[test]
fn persist_if_due_waits_for_its_interval() {
    use std::time::Duration;
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 10);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    let o = r.step(u64::MAX).unwrap();
    assert!(o.records > 0);
    let at = r.position();
    r.persist_if_due(Duration::from_secs(3600)).unwrap();
    assert_eq!(r.persisted_position(), 0, "just opened: not due");
    r.persist_if_due(Duration::ZERO).unwrap();
    assert_eq!(r.persisted_position(), at);
    // Reopened, it starts from the persisted position.
    drop(r);
    let r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    assert_eq!(r.persisted_position(), at);
}

/// Offer every logfile of `dir` to `chunks` in pieces of `piece` bytes (records
/// straddle pieces), as the fetcher does after writing them.
fn offer_all(dir: &Path, chunks: &FetchedChunks, piece: usize) {
    for e in list_logfiles(dir).unwrap() {
        let bytes = std::fs::read(&e.path).unwrap();
        for (k, part) in bytes.chunks(piece).enumerate() {
            let mut b = AlignedBuf::new(part.len());
            b.room().copy_from_slice(part);
            b.set_len(part.len());
            chunks.offer(e.seq, &e.name(), (k * piece) as u64, b);
        }
    }
}

/// With the fetched chunks in memory, replay takes every record from there (none
/// from the files), through the same prefix images; what replay passed is dropped.
#[test]
fn records_from_fetched_chunks_give_the_same_prefix_images() {
    let root = tempfile::tempdir().unwrap();
    let (adir, adisk) = primary_logs(root.path(), 300);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let imgs = images(&bdir);
    let chunks = Arc::new(FetchedChunks::new(64 << 20));
    offer_all(&bdir, &chunks, 3000);
    let held = chunks.bytes();
    assert!(held > 0);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    r.use_fetched(chunks.clone());
    let (mut applied, mut bytes) = (0usize, 0u64);
    loop {
        let o = r.step(1).unwrap();
        applied += o.records as usize;
        bytes += o.bytes;
        assert!(
            std::fs::read(&bdisk).unwrap() == imgs[applied],
            "after {applied} records the disk is not the prefix image"
        );
        if o.idle {
            break;
        }
    }
    assert_eq!(applied, imgs.len() - 1);
    assert!(std::fs::read(&bdisk).unwrap() == std::fs::read(&adisk).unwrap());
    assert_eq!(
        r.bytes_from_memory(),
        bytes,
        "every record byte came from memory"
    );
    let files = list_logfiles(&bdir).unwrap().len() as u64;
    assert_eq!(
        r.versions_computed_inline(),
        files - 1,
        "every finished logfile's version came from its replay, none read back"
    );
    assert!(chunks.bytes() < held, "chunks replay passed are dropped");
}

/// Versions computed while replaying (headers digested as records are applied)
/// equal the origin's; a replayer that starts inside a logfile (after a restart)
/// reads that one's headers back instead, with the same result.
#[test]
fn versions_from_replay_and_from_read_back_agree() {
    let root = tempfile::tempdir().unwrap();
    let (adir, adisk) = primary_logs(root.path(), 300);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let files = list_logfiles(&bdir).unwrap();
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    // Stop inside a logfile after the first.
    let total: u64 = images(&bdir).len() as u64 - 1;
    let mut applied = 0;
    while applied < total / 2 {
        applied += r.step(1).unwrap().records;
    }
    let inline_before = r.versions_computed_inline();
    assert!(inline_before >= 1);
    r.persist().unwrap();
    drop(r);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    while !r.step(u64::MAX).unwrap().idle {}
    assert!(
        r.halted().is_none(),
        "no split brain: our versions equal the origin's"
    );
    assert!(std::fs::read(&bdisk).unwrap() == std::fs::read(&adisk).unwrap());
    let finished = files.len() as u64 - 1;
    assert_eq!(
        inline_before + r.versions_computed_inline(),
        finished - 1,
        "all but the logfile the restart fell into were versioned while replayed"
    );
    for f in &files[..files.len() - 1] {
        let ours =
            std::fs::read_to_string(bdir.join(format!("version-{:09}-beta", f.seq))).unwrap();
        let theirs =
            std::fs::read_to_string(bdir.join(format!("version-{:09}-alpha", f.seq))).unwrap();
        assert_eq!(
            mars_logfmt::Version::from_json(&ours).unwrap().version,
            mars_logfmt::Version::from_json(&theirs).unwrap().version,
            "{}",
            f.name()
        );
    }
}

/// With disk syncs in the background, replay never applies a record past the
/// durable limit written in `replayed`, `replayed` only names record boundaries
/// replay had passed, and replay need not stop for a sync: background syncs
/// raise the limit as it goes.
#[test]
fn background_syncs_keep_the_durable_limit_ahead_of_replay() {
    let root = tempfile::tempdir().unwrap();
    let (adir, adisk) = primary_logs(root.path(), 300);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let imgs = images(&bdir);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    r.set_persist_window(16 << 10);
    r.set_background_sync(true);
    let state = || -> (u64, u64) {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bdir.join("replayed")).unwrap()).unwrap();
        (v["pos"].as_u64().unwrap(), v["limit"].as_u64().unwrap())
    };
    let mut boundaries = vec![0u64];
    let mut persisted_seen = std::collections::BTreeSet::new();
    let mut applied = 0usize;
    loop {
        let o = r.step(1).unwrap();
        applied += o.records as usize;
        boundaries.push(r.position());
        assert!(std::fs::read(&bdisk).unwrap() == imgs[applied]);
        let (pos, limit) = state();
        assert!(r.position() <= limit, "applied past the durable limit");
        assert!(
            pos <= r.position() && boundaries.contains(&pos),
            "replayed {pos}"
        );
        persisted_seen.insert(pos);
        if o.idle {
            break;
        }
    }
    r.persist().unwrap();
    assert_eq!(state().0, r.position());
    assert!(std::fs::read(&bdisk).unwrap() == std::fs::read(&adisk).unwrap());
    assert!(
        persisted_seen.len() > 3,
        "the position moved on as replay went: {persisted_seen:?}"
    );
}

/// Another node's logfile of the same number appears while replay is inside one
/// (a failover elsewhere started its own log there): replay stops as a split brain
/// instead of going on in the other file.
#[test]
fn another_logfile_of_the_same_number_mid_file_is_a_split_brain() {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 300);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let files = list_logfiles(&bdir).unwrap();
    let second = &files[1];
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    // Into the second logfile, past its first record.
    let first_recs = scan_logfile(&std::fs::read(&files[0].path).unwrap())
        .records
        .len();
    let mut applied = 0;
    while applied < first_recs + 2 {
        applied += r.step(1).unwrap().records as usize;
    }
    let pos = r.position();
    // Another writer's logfile of the same number and the same records, but of
    // another history (its own header: another logfile, though a child of the
    // first at the same place), which the source lists.
    let other = format!("log-{:09}-omega", second.seq);
    let mut bytes = std::fs::read(&second.path).unwrap();
    let mut h = FileHeader::decode(&bytes[..64]).unwrap();
    h.created_ns += 1;
    bytes[..64].copy_from_slice(&h.encode());
    std::fs::write(bdir.join(&other), &bytes).unwrap();
    let lineage = |with: &str| {
        let mut l = Vec::new();
        for (i, e) in list_logfiles(&bdir).unwrap().into_iter().enumerate() {
            if i == 0 || e.name() == with {
                let b = std::fs::read(&e.path).unwrap();
                let h = FileHeader::decode(&b[..64]).unwrap();
                l.push(Listed {
                    name: e.name(),
                    start: h.start_pos,
                    end: h.start_pos + b.len() as u64 - 64,
                });
            }
        }
        Lineage {
            files: l,
            from_primary: true,
        }
    };
    // The source lists the other logfile: its history has other records at
    // this position (the other logfile is no child of the one replay is in).
    r.set_lineage(Some(lineage(&other)));
    let err = r.step(u64::MAX).unwrap_err().to_string();
    assert!(err.contains("split brain") && err.contains(&other), "{err}");
    assert_eq!(r.position(), pos, "nothing applied from the other file");
    // After a restart with a `replayed` of an older build (no logfile named),
    // the two logfiles holding the position cannot be told apart: stop.
    drop(r);
    std::fs::write(
        bdir.join("replayed"),
        format!("{{\"format\":1,\"pos\":{pos},\"limit\":{pos}}}"),
    )
    .unwrap();
    std::fs::remove_file(bdir.join(HW_FILE)).unwrap();
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    assert_eq!(r.position(), pos);
    let err = r.step(u64::MAX).unwrap_err().to_string();
    assert!(err.contains("split brain"), "{err}");
    assert_eq!(
        r.position(),
        pos,
        "nothing applied after the restart either"
    );
    // With the logfile named (this build), replay knows which one it is in.
    std::fs::write(
        bdir.join("replayed"),
        format!(
            "{{\"format\":1,\"pos\":{pos},\"limit\":{pos},\"file\":[\"{}\",{}]}}",
            second.name(),
            h.start_pos
        ),
    )
    .unwrap();
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    r.set_lineage(Some(lineage(&second.name())));
    assert!(r.step(u64::MAX).unwrap().records > 0);
}

/// Replay of 40 writes whose fourth record has a payload bit flipped, in the
/// logfile or (`in_memory`) only in the fetched chunk replay takes it from: it
/// stops there, names the file, and the disk holds the three good records only.
fn damaged_record_halts_replay(in_memory: bool) -> Replayer {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 40);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let first = list_logfiles(&bdir).unwrap().remove(0);
    let mut bytes = std::fs::read(&first.path).unwrap();
    let recs = scan_logfile(&bytes).records;
    let victim = recs[3].file_offset as usize + 64 + 1;
    bytes[victim] ^= 0x80;
    let chunks = Arc::new(FetchedChunks::new(64 << 20));
    if in_memory {
        let mut b = AlignedBuf::new(bytes.len());
        b.room().copy_from_slice(&bytes);
        b.set_len(bytes.len());
        chunks.offer(first.seq, &first.name(), 0, b);
    } else {
        std::fs::write(&first.path, &bytes).unwrap();
    }
    let imgs = images(&adir);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    r.use_fetched(chunks);
    let err = r.step(u64::MAX).unwrap_err().to_string();
    assert!(
        err.contains(&first.name()) && err.contains("corrupt"),
        "{err}"
    );
    assert!(
        std::fs::read(&bdisk).unwrap() == imgs[3],
        "the three good records, nothing else"
    );
    r
}

/// A record whose bytes in memory are damaged is refused like one in a file: the
/// chunks get the same checks (checksums, positions).
#[test]
fn a_damaged_chunk_in_memory_halts_replay() {
    damaged_record_halts_replay(true);
}

#[test]
fn corrupt_record_halts_with_the_consistent_prefix() {
    let mut r = damaged_record_halts_replay(false);
    assert!(r.step(u64::MAX).is_err(), "stays stopped");
}

#[test]
fn different_history_is_a_split_brain() {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 200);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    // The origin claims another history for its first logfile.
    let first = list_logfiles(&bdir).unwrap().remove(0);
    let vpath = bdir.join(format!("version-{:09}-alpha", first.seq));
    let v = mars_logfmt::Version::from_json(&std::fs::read_to_string(&vpath).unwrap()).unwrap();
    let mut b = VersionBuilder::new();
    b.add_record(&[0xA5; mars_logfmt::RECORD_HEADER_LEN]);
    let other = b.finish(None, &v.logfile, v.file_seq, v.start_pos, v.end_pos);
    std::fs::write(&vpath, other.to_json()).unwrap();
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    let _ = r.step(u64::MAX);
    assert!(
        matches!(
            r.halted(),
            Some(mars_logger::replay::Halt::SplitBrain { .. })
        ),
        "{:?}",
        r.halted()
    );
    let end_of_first = v.end_pos;
    assert_eq!(
        r.position(),
        end_of_first,
        "nothing of the next logfile applied"
    );
}

/// A primary that logs `groups` of 4 KiB writes, each group ending with a
/// rotation or (`restart_between`) a close and reopen of the logger.
fn primary_with(root: &Path, groups: &[u32], restart_between: bool) -> (PathBuf, PathBuf) {
    let disk = root.join("a.img");
    std::fs::File::create(&disk).unwrap().set_len(SIZE).unwrap();
    let dir = root.join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = Config::new("alpha", &dir, &disk, SIZE, 7);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut logger = Logger::open(cfg.clone()).unwrap();
    for (g, &n) in groups.iter().enumerate() {
        rt.block_on(async {
            for i in 0..n {
                let off = u64::from(i) * 4096;
                let data = Bytes::from(vec![g as u8 + 1; 4096]);
                logger.write(off, data, false).await.unwrap();
            }
        });
        if restart_between {
            logger.close();
            drop(logger);
            logger = Logger::open(cfg.clone()).unwrap();
        } else {
            rt.block_on(logger.rotate()).unwrap();
        }
    }
    logger.close();
    (dir, disk)
}

fn copy_file(from: &Path, to: &Path, name: &str) {
    std::fs::copy(from.join(name), to.join(name)).unwrap();
}

/// A restart of the primary without writes leaves an empty logfile; replay
/// must pass through it (and chain its version), not jump over it.
#[test]
fn empty_logfile_between_restarts_is_not_a_split_brain() {
    let root = tempfile::tempdir().unwrap();
    // Logfile 2 stays empty: the primary restarts twice without a write in between.
    let (adir, adisk) = primary_with(root.path(), &[5, 0, 5, 5], true);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let names: Vec<_> = list_logfiles(&bdir)
        .unwrap()
        .iter()
        .map(|e| e.name())
        .collect();
    assert!(
        std::fs::metadata(bdir.join(&names[1])).unwrap().len() == 64,
        "logfile 2 is empty: {names:?}"
    );
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    while !r.step(u64::MAX).unwrap().idle {}
    assert!(r.halted().is_none(), "{:?}", r.halted());
    assert!(std::fs::read(&bdisk).unwrap() == std::fs::read(&adisk).unwrap());
}

/// Replay reaches the end of a logfile before the next one is fetched: when
/// it arrives, the finished logfile's version is still checked and chained.
#[test]
fn logfile_finished_before_its_successor_arrives_is_still_versioned() {
    let root = tempfile::tempdir().unwrap();
    let (adir, adisk) = primary_with(root.path(), &[5, 5, 5], false);
    let bdir = root.path().join("b");
    std::fs::create_dir_all(&bdir).unwrap();
    let bdisk = root.path().join("b.img");
    std::fs::File::create(&bdisk)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let logs = list_logfiles(&adir).unwrap();
    assert!(logs.len() >= 3);
    // Only the first logfile has arrived: replay applies it and waits.
    copy_file(&adir, &bdir, &logs[0].name());
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    assert!(r.step(u64::MAX).unwrap().idle);
    // Then the rest, with the origin's versions.
    for e in std::fs::read_dir(&adir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        if name.starts_with("log-") || name.starts_with("version-") {
            copy_file(&adir, &bdir, &name);
        }
    }
    while !r.step(u64::MAX).unwrap().idle {}
    assert!(r.halted().is_none(), "{:?}", r.halted());
    assert!(std::fs::read(&bdisk).unwrap() == std::fs::read(&adisk).unwrap());
    let ours = bdir.join(format!("version-{:09}-beta", logs[0].seq));
    assert!(ours.exists(), "the first logfile's version was computed");
}

/// A split brain must stay a halt when the replayer restarts (marsd restarted).
#[test]
fn split_brain_halt_survives_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 200);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let first = list_logfiles(&bdir).unwrap().remove(0);
    let vpath = bdir.join(format!("version-{:09}-alpha", first.seq));
    let v = mars_logfmt::Version::from_json(&std::fs::read_to_string(&vpath).unwrap()).unwrap();
    let mut b = VersionBuilder::new();
    b.add_record(&[0xA5; mars_logfmt::RECORD_HEADER_LEN]);
    let other = b.finish(None, &v.logfile, v.file_seq, v.start_pos, v.end_pos);
    std::fs::write(&vpath, other.to_json()).unwrap();
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    let _ = r.step(u64::MAX);
    assert!(r.halted().is_some());
    drop(r);
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    let o = r.step(u64::MAX);
    assert!(
        matches!(
            r.halted(),
            Some(mars_logger::replay::Halt::SplitBrain { .. })
        ) && r.position() == v.end_pos,
        "after a restart: {o:?}, position {} (split brain at {})",
        r.position(),
        v.end_pos
    );
    assert!(r.step(u64::MAX).is_err(), "stays stopped");
}

const BOOT: &str = "11111111-2222-4333-8444-555555555555";

fn open_in_boot(dir: &Path, disk: &Path, boot: &str) -> Replayer {
    Replayer::open_with_boot_id(dir, "beta", disk, SIZE, 0, Some(boot)).unwrap()
}

fn put_mark(dir: &Path, m: &HwMark) {
    std::fs::write(dir.join(HW_FILE), m.encode()).unwrap();
}

/// A replayer that persisted, then applied more: (durable position, position reached).
fn killed_after_unpersisted_records(dir: &Path, disk: &Path) -> (u64, u64) {
    let mut r = open_in_boot(dir, disk, BOOT);
    for _ in 0..5 {
        assert_eq!(r.step(1).unwrap().records, 1);
    }
    r.persist().unwrap();
    let durable = r.position();
    for _ in 0..5 {
        assert_eq!(r.step(1).unwrap().records, 1);
    }
    let reached = r.position();
    assert!(std::fs::read(dir.join(HW_FILE)).unwrap().len() == HW_LEN);
    (durable, reached)
}

#[test]
fn high_water_mark_is_taken_only_when_it_fits() {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 300);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let (durable, reached) = killed_after_unpersisted_records(&bdir, &bdisk);
    assert!(reached > durable);
    let good = HwMark::decode(&std::fs::read(bdir.join(HW_FILE)).unwrap()).unwrap();
    assert_eq!((good.base, good.pos, good.until), (durable, reached, 0));

    // Same boot, fitting: go on at the mark, consistent.
    let r = open_in_boot(&bdir, &bdisk, BOOT);
    assert_eq!((r.position(), r.inconsistent_until()), (reached, None));
    drop(r);

    // Not usable: start at the durable position and report the disk
    // inconsistent past everything that may have been applied.
    let second = &list_logfiles(&bdir).unwrap()[1];
    let mut h = [0u8; mars_logfmt::FILE_HEADER_LEN];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&second.path).unwrap(),
        &mut h,
        0,
    )
    .unwrap();
    let second_start = mars_logfmt::FileHeader::decode(&h).unwrap().start_pos;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("missing", Vec::new()),
        ("garbage", b"hello, world\n".repeat(9)),
        ("short", good.encode()[..HW_LEN - 1].to_vec()),
        (
            "another boot",
            HwMark {
                boot_id: "99999999-2222-4333-8444-555555555555".into(),
                ..good.clone()
            }
            .encode(),
        ),
        (
            "not a record boundary",
            HwMark {
                pos: reached - 1,
                ..good.clone()
            }
            .encode(),
        ),
        (
            "inside a record",
            HwMark {
                pos: reached + 1,
                ..good.clone()
            }
            .encode(),
        ),
        (
            "other base",
            HwMark {
                base: durable + 1,
                ..good.clone()
            }
            .encode(),
        ),
        (
            "behind the durable position",
            HwMark {
                pos: durable - 1,
                ..good.clone()
            }
            .encode(),
        ),
        (
            "past the limit",
            HwMark {
                pos: durable + (1 << 40),
                ..good.clone()
            }
            .encode(),
        ),
    ];
    for (what, bytes) in bad {
        if bytes.is_empty() {
            let _ = std::fs::remove_file(bdir.join(HW_FILE));
        } else {
            std::fs::write(bdir.join(HW_FILE), &bytes).unwrap();
        }
        let r = open_in_boot(&bdir, &bdisk, BOOT);
        assert_eq!(r.position(), durable, "{what}");
        assert!(
            r.inconsistent_until().is_some_and(|u| u >= reached),
            "{what}: {:?}",
            r.inconsistent_until()
        );
        drop(r);
        // The new mark carries the report across a kill.
        let r = open_in_boot(&bdir, &bdisk, BOOT);
        assert_eq!(r.position(), durable, "{what}");
        assert!(r.inconsistent_until().is_some(), "{what}");
    }

    // A logfile's start is a boundary too (walked to from nowhere).
    put_mark(
        &bdir,
        &HwMark {
            pos: second_start,
            ..good.clone()
        },
    );
    assert!(second_start > durable);
    let r = open_in_boot(&bdir, &bdisk, BOOT);
    assert_eq!(r.position(), second_start);
    drop(r);

    // The mark at the durable position itself: consistent there.
    put_mark(
        &bdir,
        &HwMark {
            pos: durable,
            ..good.clone()
        },
    );
    let r = open_in_boot(&bdir, &bdisk, BOOT);
    assert_eq!((r.position(), r.inconsistent_until()), (durable, None));
}

#[test]
fn promote_leaves_no_mark_behind() {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_logs(root.path(), 60);
    let (bdir, bdisk) = secondary(root.path(), &adir);
    let (durable, _) = killed_after_unpersisted_records(&bdir, &bdisk);
    assert_eq!(mars_logger::replay::promote(&bdir, None).unwrap(), durable);
    assert!(!bdir.join(HW_FILE).exists());
    assert!(!bdir.join(mars_logger::replay::REPLAYED_FILE).exists());
}

/// Red team (session 17): a restart of the primary without writes leaves an
/// empty logfile (2); the member enters it, persists, and deletes logfile 1
/// (replayed). The primary restarts again: logfile 3 passes logfile 2's parent
/// link on (it names logfile 1, not here any more). Replay goes on into it.
#[test]
fn a_passed_on_link_is_followed_after_the_parent_was_deleted() {
    let root = tempfile::tempdir().unwrap();
    let (adir, adisk) = primary_with(root.path(), &[5, 0, 5], true);
    let bdir = root.path().join("b");
    std::fs::create_dir_all(&bdir).unwrap();
    let bdisk = root.path().join("b.img");
    std::fs::File::create(&bdisk)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let logs = list_logfiles(&adir).unwrap();
    assert!(logs.len() >= 3, "{logs:?}");
    copy_file(&adir, &bdir, &logs[0].name());
    copy_file(&adir, &bdir, &logs[1].name());
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    while !r.step(u64::MAX).unwrap().idle {}
    r.persist().unwrap();
    let at = r.position();
    drop(r);
    let deleted = mars_logger::replay::delete_replayed(&bdir, at).unwrap();
    assert_eq!(deleted, vec![logs[0].name()]);
    for e in std::fs::read_dir(&adir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        if (name.starts_with("log-") && name != logs[0].name()) || name.starts_with("version-") {
            copy_file(&adir, &bdir, &name);
        }
    }
    let mut r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    while !r.step(u64::MAX).unwrap().idle {}
    assert!(r.halted().is_none(), "{:?}", r.halted());
    assert!(std::fs::read(&bdisk).unwrap() == std::fs::read(&adisk).unwrap());
}

/// Red team (session 17, history simulation seed 63098): a member at position
/// 0 holds only the first bytes of two first logfiles (fetches from two
/// writers cut inside their headers). Forced to become the writer, it
/// starts its log; recovery must not refuse "two logfiles with sequence 1".
#[test]
fn a_member_at_zero_with_two_cut_headers_can_become_the_writer() {
    let root = tempfile::tempdir().unwrap();
    let (adir, _) = primary_with(root.path(), &[2], false);
    let first = list_logfiles(&adir).unwrap().remove(0);
    let bytes = std::fs::read(&first.path).unwrap();
    let bdir = root.path().join("b");
    std::fs::create_dir_all(&bdir).unwrap();
    let bdisk = root.path().join("b.img");
    std::fs::File::create(&bdisk)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    std::fs::write(
        bdir.join(mars_logfmt::logfile_name(1, "alpha")),
        &bytes[..29],
    )
    .unwrap();
    std::fs::write(
        bdir.join(mars_logfmt::logfile_name(1, "gamma")),
        &bytes[..30],
    )
    .unwrap();
    let r = Replayer::open(&bdir, "beta", &bdisk, SIZE, 0).unwrap();
    drop(r);
    assert_eq!(mars_logger::replay::promote(&bdir, Some(0)).unwrap(), 0);
    let cfg = Config::new("beta", &bdir, &bdisk, SIZE, 7);
    let opened = Logger::open(cfg);
    assert!(opened.is_ok(), "{:?}", opened.err());
    opened.unwrap().close();
}
