use super::*;
use proptest::prelude::*;
use std::os::unix::fs::FileExt;

fn rng_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A resource directory and a disk of `len` bytes of random data.
fn setup(len: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("res");
    std::fs::create_dir(&dir).unwrap();
    let disk = t.path().join("disk");
    std::fs::write(&disk, rng_bytes(len as u64, len)).unwrap();
    (t, dir, disk)
}

/// Every block's stored checksum is that of the disk's bytes.
fn assert_matches_disk(c: &Csum, disk: &Path) {
    let data = std::fs::read(disk).unwrap();
    assert_eq!(c.covered(), data.len() as u64);
    for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
        assert_eq!(
            c.get(i as u64),
            Some(crc32c::crc32c(chunk)),
            "block {i} of {}",
            data.len()
        );
    }
}

fn reader(disk: &Path) -> impl FnMut(&mut [u8], u64) -> io::Result<()> {
    let f = File::open(disk).unwrap();
    move |buf, off| f.read_exact_at(buf, off)
}

#[test]
fn built_from_the_disk_and_reloaded() {
    // Not a multiple of the block size: the last block is short.
    let (_t, dir, disk) = setup(300 * 1024 + 100);
    {
        let c = open(&dir, &disk).unwrap();
        assert_matches_disk(&c, &disk);
        // A second handle shares the table.
        let d = find(&dir).unwrap();
        assert_eq!(d.get(3), c.get(3));
    }
    // Closed cleanly: loads again without rebuilding.
    let h = Header::decode(&std::fs::read(dir.join(FILE_NAME)).unwrap()).unwrap();
    assert!(h.clean);
    let c = open(&dir, &disk).unwrap();
    assert_matches_disk(&c, &disk);
    let h = Header::decode(&std::fs::read(dir.join(FILE_NAME)).unwrap()).unwrap();
    assert!(!h.clean, "open marks it in use");
}

#[test]
fn sparse_holes_are_zero_blocks() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let disk = t.path().join("disk");
    let f = File::create(&disk).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&[7u8; 5000], (10 << 20) + 123).unwrap();
    drop(f);
    let c = open(&dir, &disk).unwrap();
    assert_matches_disk(&c, &disk);
}

#[test]
fn writes_whole_and_partial_blocks() {
    let len = 256 * 1024;
    let (_t, dir, disk) = setup(len);
    let c = open(&dir, &disk).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut read = reader(&disk);
    // (offset, buffer sizes): aligned, unaligned both ends, inside one block,
    // buffers that split blocks, the disk's end.
    let cases: Vec<(u64, Vec<usize>)> = vec![
        (0, vec![4096]),
        (8192, vec![100, 3996, 8192]),
        (4096 * 5 + 17, vec![9000]),
        (4096 * 9 + 1, vec![10]),
        (4096 * 12, vec![1, 2, 3, 4090, 4096, 5000]),
        (len as u64 - 5000, vec![5000]),
        (len as u64 - 4096, vec![2000, 2096]),
    ];
    for (i, (off, sizes)) in cases.into_iter().enumerate() {
        let bufs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| rng_bytes(1000 + i as u64 * 10 + j as u64, n))
            .collect();
        let flat = bufs.concat();
        f.write_all_at(&flat, off).unwrap();
        let refs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        let _w = c.writing();
        c.written(off, &refs, &mut read).unwrap();
        assert_matches_disk(&c, &disk);
    }
    // Zeroes: whole blocks, and partial ones at both ends.
    for (off, n) in [(4096u64, 8192u64), (4096 * 20 + 5, 4096 * 3), (7, 9)] {
        f.write_all_at(&vec![0u8; n as usize], off).unwrap();
        c.zeroed(off, n, &mut read).unwrap();
        assert_matches_disk(&c, &disk);
    }
    // Writes beyond the covered disk change nothing (and do not fail).
    c.written(len as u64 + 100, &[&[1u8; 10]], &mut read)
        .unwrap();
    assert_matches_disk(&c, &disk);
}

#[test]
fn synced_tables_survive_a_kill() {
    let (_t, dir, disk) = setup(1 << 20);
    let c = Csum::load_or_build(&dir, &disk).unwrap();
    let f = OpenOptions::new().write(true).open(&disk).unwrap();
    let data = rng_bytes(5, 3 * 4096);
    f.write_all_at(&data, 4096 * 200).unwrap();
    c.written(4096 * 200, &[&data], &mut reader(&disk)).unwrap();
    c.sync().unwrap();
    // Killed: no clean close. The next open loads what was synced.
    drop(c);
    let c = Csum::load_or_build(&dir, &disk).unwrap();
    assert_matches_disk(&c, &disk);
    // Written through (replay's way) without a sync: in the file too.
    let data = rng_bytes(6, 4096);
    f.write_all_at(&data, 4096 * 7).unwrap();
    c.written(4096 * 7, &[&data], &mut reader(&disk)).unwrap();
    c.write_through(4096 * 7, 4096).unwrap();
    drop(c);
    let c = Csum::load_or_build(&dir, &disk).unwrap();
    assert_matches_disk(&c, &disk);
}

#[test]
fn a_bad_block_is_found_counted_once_and_good_again_when_rewritten() {
    let (_t, dir, disk) = setup(64 * 4096);
    let c = open(&dir, &disk).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    // Flip one bit of block 9 behind the table's back.
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 9 * 4096 + 77).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], 9 * 4096 + 77).unwrap();
    let mut read = reader(&disk);
    let all = |_: u64, _: u64| true;
    for _ in 0..3 {
        let mut buf = vec![0u8; 16 * 4096];
        read(&mut buf, 0).unwrap();
        let bad = c.verify(0, &mut buf, &all, &mut read).unwrap().unwrap_err();
        assert_eq!(bad.blocks, vec![9]);
        assert!(bad.to_string().contains("bytes 36864..40960"), "{bad}");
    }
    assert_eq!(errors(&dir), 1, "counted once");
    // Blocks not asked for are not checked; an unaligned read checks the
    // edge blocks whole.
    let mut buf = vec![0u8; 4096];
    read(&mut buf, 9 * 4096).unwrap();
    assert!(c
        .verify(9 * 4096, &mut buf, &|_, _| false, &mut read)
        .unwrap()
        .is_ok());
    let mut buf = vec![0u8; 100];
    read(&mut buf, 9 * 4096 + 4000).unwrap();
    assert!(c
        .verify(9 * 4096 + 4000, &mut buf, &all, &mut read)
        .unwrap()
        .is_err());
    // Rewritten: good again; found bad again later counts again.
    let data = rng_bytes(9, 4096);
    f.write_all_at(&data, 9 * 4096).unwrap();
    c.written(9 * 4096, &[&data], &mut read).unwrap();
    let mut buf = vec![0u8; 64 * 4096];
    read(&mut buf, 0).unwrap();
    assert!(c.verify(0, &mut buf, &all, &mut read).unwrap().is_ok());
    f.write_all_at(&[data[0] ^ 1], 9 * 4096).unwrap();
    read(&mut buf, 0).unwrap();
    assert!(c.verify(0, &mut buf, &all, &mut read).unwrap().is_err());
    assert_eq!(errors(&dir), 2);
}

#[test]
fn a_transient_mismatch_is_read_again() {
    let (_t, dir, disk) = setup(16 * 4096);
    let c = open(&dir, &disk).unwrap();
    let good = std::fs::read(&disk).unwrap();
    let mut read = reader(&disk);
    let mut buf = good[..8 * 4096].to_vec();
    buf[4096 * 3 + 5] ^= 0xFF; // what a flaky first read returned
    assert!(c
        .verify(0, &mut buf, &|_, _| true, &mut read)
        .unwrap()
        .is_ok());
    assert_eq!(
        buf,
        good[..8 * 4096],
        "the good bytes read again replace the bad ones"
    );
    assert_eq!(errors(&dir), 0);
}

#[test]
fn a_disk_changed_while_detached_is_refused_until_rebuilt() {
    let (_t, dir, disk) = setup(32 * 4096);
    drop(open(&dir, &disk).unwrap());
    // Someone writes the disk (its mtime moves).
    let f = OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(b"someone else", 4096).unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    f.set_modified(later).unwrap();
    drop(f);
    let e = open(&dir, &disk).unwrap_err();
    assert!(matches!(e, CsumError::ChangedWhileDetached { .. }), "{e}");
    assert!(e.to_string().contains("--rebuild-checksums"), "{e}");
    // A disk that shrank too.
    // The way out: discard, then the next open computes them from the disk.
    assert!(discard(&dir).unwrap());
    let c = open(&dir, &disk).unwrap();
    assert_matches_disk(&c, &disk);
    assert!(discard(&dir).is_err(), "refused while open");
    drop(c);
    // Not closed cleanly (killed): a changed disk is fine, the log rewrites it.
    let c = Csum::load_or_build(&dir, &disk).unwrap();
    drop(c);
    let f = OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_modified(later + Duration::from_secs(5)).unwrap();
    drop(f);
    assert!(Csum::load_or_build(&dir, &disk).is_ok());
}

#[test]
fn a_disk_that_grew_gets_the_new_blocks() {
    let (_t, dir, disk) = setup(10 * 4096 + 10);
    drop(open(&dir, &disk).unwrap());
    let f = OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&rng_bytes(3, 20000), 10 * 4096 + 10)
        .unwrap();
    drop(f);
    let c = open(&dir, &disk).unwrap();
    assert_matches_disk(&c, &disk);
    drop(c);
    // A shrunk one is refused.
    let f = OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(4096).unwrap();
    drop(f);
    assert!(matches!(
        open(&dir, &disk),
        Err(CsumError::ChangedWhileDetached { .. })
    ));
}

#[test]
fn damaged_files_are_refused_with_a_clear_error() {
    let (_t, dir, disk) = setup(8 * 4096);
    drop(open(&dir, &disk).unwrap());
    let path = dir.join(FILE_NAME);
    let good = std::fs::read(&path).unwrap();
    // Every bit of the header's fields and checksum.
    for bit in 0..(HEADER_FIELDS + 4) * 8 {
        let mut b = good.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&path, &b).unwrap();
        match Csum::load_or_build(&dir, &disk) {
            Err(CsumError::Damaged { reason, .. }) => assert!(!reason.is_empty()),
            Err(e) => panic!("bit {bit}: {e}"),
            Ok(_) => panic!("bit {bit}: accepted"),
        }
    }
    // Truncated: in the header, in the table.
    for len in [0, 10, 100, HEADER_LEN as usize, good.len() - 1] {
        std::fs::write(&path, &good[..len]).unwrap();
        let e = Csum::load_or_build(&dir, &disk).err().unwrap();
        assert!(e.to_string().contains("damaged"), "{len}: {e}");
        assert!(e.to_string().contains("--rebuild-checksums"), "{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the file holds, decoding and opening never panic.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..9000), keep_magic in any::<bool>()) {
        let _ = Header::decode(&bytes);
        let (_t, dir, disk) = setup(4 * 4096);
        let mut bytes = bytes;
        if keep_magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(MAGIC);
        }
        std::fs::write(dir.join(FILE_NAME), &bytes).unwrap();
        let _ = Csum::load_or_build(&dir, &disk);
    }

    /// Valid headers with any field values round-trip; decoding a header with
    /// random bytes after its fields never panics.
    #[test]
    fn headers_round_trip(covered in 0..MAX_COVERED, clean in any::<bool>(), len in any::<u64>(), ino in any::<u64>(), sec in any::<i64>(), nsec in any::<u32>()) {
        let h = Header { covered, clean, disk_len: len, disk_ino: ino, disk_mtime_sec: sec, disk_mtime_nsec: nsec };
        prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
    }
}

/// Red team (session 15): a partial-block write recomputes the block's
/// checksum from the whole block read back from the disk, rot included: a
/// block found bad (or rotten and not yet found) that a client rewrites only
/// in part gets a checksum of the rotten bytes, leaves the bad list, and from
/// then on reads return the rot with no error.
#[test]
fn a_partial_rewrite_does_not_bless_rot_elsewhere_in_its_block() {
    let (_t, dir, disk) = setup(16 * 4096);
    let c = open(&dir, &disk).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    // Rot at byte 77 of block 3, behind the table's back.
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 3 * 4096 + 77).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], 3 * 4096 + 77).unwrap();
    let mut read = reader(&disk);
    let all = |_: u64, _: u64| true;
    let mut buf = vec![0u8; 4096];
    read(&mut buf, 3 * 4096).unwrap();
    assert!(c
        .verify(3 * 4096, &mut buf, &all, &mut read)
        .unwrap()
        .is_err());
    assert_eq!(unrepaired(&dir), 1);
    // A client writes 512 bytes elsewhere in that block (writeback: disk, then table).
    let data = [0xabu8; 512];
    f.write_all_at(&data, 3 * 4096 + 2048).unwrap();
    c.written(3 * 4096 + 2048, &[&data], &mut read).unwrap();
    // The rot at byte 77 is still there: a read of the block must still fail.
    let mut buf = vec![0u8; 4096];
    read(&mut buf, 3 * 4096).unwrap();
    assert_eq!(buf[77], b[0] ^ 0x10, "the rot is still on the disk");
    assert!(
        c.verify(3 * 4096, &mut buf, &all, &mut read)
            .unwrap()
            .is_err(),
        "a partial rewrite gave the rotten block a fresh checksum: its rot now reads as good data"
    );
}

/// After a failed fdatasync every page of the table is written again (the
/// marking covers exactly the table's pages: no write past its end).
#[test]
fn every_page_is_written_again_after_a_failed_sync() {
    let (_t, dir, disk) = setup(3 * PER_PAGE * 4096 + 5 * 4096 + 100);
    let c = open(&dir, &disk).unwrap();
    c.mark_all_dirty();
    c.sync().unwrap();
    drop(c);
    let c = open(&dir, &disk).unwrap();
    assert_matches_disk(&c, &disk);
}

/// Rot nobody has read yet, in a block a client rewrites only in part: the
/// check before the write (`before_write`, as writeback, recovery and replay
/// call it) finds it, so the partial rewrite does not give it a valid
/// checksum; a write of the whole block then makes it good again.
#[test]
fn rot_not_yet_found_is_found_before_a_partial_rewrite() {
    let (_t, dir, disk) = setup(16 * 4096);
    let c = open(&dir, &disk).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 5 * 4096 + 9).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], 5 * 4096 + 9).unwrap();
    let mut read = reader(&disk);
    let all = |_: u64, _: u64| true;
    let data = [0x5au8; 512];
    c.before_write(5 * 4096 + 1024, 512, &mut read).unwrap();
    assert_eq!(unrepaired(&dir), 1, "found before the write");
    f.write_all_at(&data, 5 * 4096 + 1024).unwrap();
    c.written(5 * 4096 + 1024, &[&data], &mut read).unwrap();
    let mut buf = vec![0u8; 4096];
    read(&mut buf, 5 * 4096).unwrap();
    assert!(c
        .verify(5 * 4096, &mut buf, &all, &mut read)
        .unwrap()
        .is_err());
    // A whole-block write replaces the rot: good again.
    let whole = [0x33u8; 4096];
    c.before_write(5 * 4096, 4096, &mut read).unwrap();
    f.write_all_at(&whole, 5 * 4096).unwrap();
    c.written(5 * 4096, &[&whole], &mut read).unwrap();
    assert_eq!(unrepaired(&dir), 0);
    let mut buf = vec![0u8; 4096];
    read(&mut buf, 5 * 4096).unwrap();
    assert!(c
        .verify(5 * 4096, &mut buf, &all, &mut read)
        .unwrap()
        .is_ok());
    // A clean block partly rewritten stays good (no false error).
    c.before_write(7 * 4096 + 100, 200, &mut read).unwrap();
    f.write_all_at(&[1u8; 200], 7 * 4096 + 100).unwrap();
    c.written(7 * 4096 + 100, &[&[1u8; 200]], &mut read)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    read(&mut buf, 7 * 4096).unwrap();
    assert!(c
        .verify(7 * 4096, &mut buf, &all, &mut read)
        .unwrap()
        .is_ok());
    assert_eq!(unrepaired(&dir), 0);
}

/// A damaged bad-block list naming blocks beyond the disk: those are none
/// of its blocks (a background repair of block 2^60 computed its offset
/// with an overflow, a panic in a debug build that ended the repair task
/// for good), and the copy is not held inconsistent for them.
#[test]
fn a_bad_list_with_blocks_beyond_the_disk_keeps_only_the_disks() {
    let (t, built, disk) = setup(64 << 10);
    // A table built (and closed) in another directory, then copied: the
    // list is read at the first open of a directory in a process.
    drop(open(&built, &disk).unwrap());
    let dir = t.path().join("res2");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(built.join(FILE_NAME), dir.join(FILE_NAME)).unwrap();
    std::fs::write(
        dir.join(BAD_FILE),
        format!(r#"{{"format":1,"bad":[3,16,{}]}}"#, 1u64 << 60),
    )
    .unwrap();
    let c = open(&dir, &disk).unwrap();
    assert_eq!(bad_list(&dir), vec![3]);
    drop(c);
}
