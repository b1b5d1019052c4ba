//! Verify and repair (issue 18) with three real marsd: bits flipped in the
//! secondaries' disks, in the primary's disk (at rest and under writes), and
//! in the primary's checksum file, at different blocks of different
//! members, are found by `marsadm verify`, repaired by `verify --repair` and
//! by reads; clients never get wrong data; a block bad on every member is
//! EIO; the disks are equal at the end. A verify under a write load finds
//! no false difference.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn flip_bit(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
}

fn pattern(block: u64, g: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (block as u8).wrapping_mul(29) ^ (i as u8).wrapping_mul(3) ^ g | 2)
        .collect()
}

/// Write `n` blocks of generation `g`, the last with FUA.
fn fill(c: &mut NbdClient, n: u64, g: u8) {
    for b in 0..n {
        assert_eq!(c.write(b * BLOCK, &pattern(b, g), b + 1 == n).unwrap(), 0);
    }
}

fn written_back(v: &serde_json::Value) -> bool {
    let m = member(v, "alpha");
    m["log"]["replayed"].as_u64() >= m["log"]["written"].as_u64()
}

/// `marsadm verify` with its exit status and stdout.
fn verify(n: &Node, args: &[&str]) -> (i32, String) {
    let mut a = vec!["verify", "r0"];
    a.extend_from_slice(args);
    let out = n.adm(&a);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 2,
        "verify {args:?}: exit {code}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, stdout)
}

fn line_of<'a>(out: &'a str, node: &str) -> Option<&'a str> {
    out.lines().find(|l| l.starts_with(&format!("{node}: ")))
}

fn assert_all_equal(disks: &[std::path::PathBuf]) {
    let first = read(&disks[0]);
    for d in &disks[1..] {
        assert!(
            read(d) == first,
            "{} differs from {}",
            d.display(),
            disks[0].display()
        );
    }
    for d in &disks[1..] {
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&disks[0])
            .arg(d)
            .output()
            .expect("qemu-img");
        assert!(out.status.success(), "qemu-img compare: {out:?}");
    }
}

#[test]
fn verify_finds_rot_in_every_member_and_repairs_it() {
    require_tool("qemu-img", "qemu-utils");
    let mut nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let size = 16 * MIB;
    let disks = replicate_r0(&nodes, size);
    let blocks = size / BLOCK;
    let mut c = nodes[0].nbd("r0");
    fill(&mut c, blocks, 1);
    drop(c);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[0].wait_view("alpha wrote everything back", written_back);
    let (code, out) = verify(&nodes[0], &[]);
    assert_eq!(code, 0, "equal copies: {out}");
    assert!(out.contains("all copies agree"), "{out}");

    // The primary's checksum file itself: one entry damaged while alpha is
    // down (the table is read at start).
    nodes[0].kill9();
    flip_bit(&nodes[0].dir.join("resources/r0/csum"), 4096 + 4 * 30 + 1);
    nodes[0].start();
    nodes[0].wait_view("alpha serves r0 again", |v| {
        resource(v, "r0").is_some_and(|r| r["device"].is_string())
    });
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    // Rot at rest in different blocks of every member (two in beta).
    flip_bit(&disks[1], 10 * BLOCK + 5);
    flip_bit(&disks[1], 11 * BLOCK + 5);
    flip_bit(&disks[2], 20 * BLOCK + 77);
    flip_bit(&disks[0], 50 * BLOCK + 4095);
    // Verify from a secondary: it reports, and repairs nothing.
    let (code, out) = verify(&nodes[1], &["--restart"]);
    assert_eq!(code, 2, "{out}");
    let beta = line_of(&out, "beta").unwrap_or_else(|| panic!("beta listed: {out}"));
    assert!(
        beta.contains("2 block(s)") && beta.contains("blocks 10..=11"),
        "{out}"
    );
    let gamma = line_of(&out, "gamma").unwrap_or_else(|| panic!("gamma listed: {out}"));
    assert!(gamma.contains("blocks 20..=20"), "{out}");
    let alpha = line_of(&out, "alpha").unwrap_or_else(|| panic!("alpha listed: {out}"));
    assert!(
        alpha.contains("blocks 30..=30") && alpha.contains("blocks 50..=50"),
        "{out}"
    );
    assert!(out.contains("copies differ"), "{out}");
    // Still there: verify without --repair changes no disk.
    assert_ne!(
        read(&disks[1])[10 * BLOCK as usize..11 * BLOCK as usize],
        pattern(10, 1)[..]
    );

    let (code, out) = verify(&nodes[0], &["--repair", "--restart"]);
    assert_eq!(code, 0, "everything repaired: {out}");
    let (code, out) = verify(&nodes[0], &["--restart"]);
    assert_eq!(code, 0, "after the repair: {out}");
    let v = nodes[0].view_json();
    let last = &resource(&v, "r0").unwrap()["verify"]["last"];
    assert_eq!(last["clean"], true, "{v:#}");
    for n in ["alpha", "beta", "gamma"] {
        assert_eq!(member(&v, n)["disk"], "uptodate", "{v:#}");
    }
    // Clients read the written data everywhere.
    let mut c = nodes[0].nbd("r0");
    for b in [10, 11, 20, 30, 50] {
        assert_eq!(c.read(b * BLOCK, BLOCK as u32).unwrap(), (0, pattern(b, 1)));
    }
    drop(c);
    // The repaired blocks are on the disks, and the checksum files agree
    // with them once closed.
    for n in nodes.iter_mut() {
        n.stop();
    }
    assert_all_equal(&disks);
    for (n, d) in nodes.iter().zip(&disks) {
        assert_eq!(
            stale_checksums(&n.dir.join("resources/r0"), d),
            Vec::<u64>::new()
        );
    }
}

/// A read of a block rotten on the primary is answered with the good data,
/// repaired from a member; a block rotten on every member is EIO.
#[test]
fn a_read_of_rot_is_repaired_from_a_member_and_eio_only_without_a_good_copy() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    let size = 4 * MIB;
    let disks = replicate_r0(&nodes, size);
    let mut c = nodes[0].nbd("r0");
    fill(&mut c, 64, 3);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[0].wait_view("alpha wrote everything back", written_back);

    flip_bit(&disks[0], 7 * BLOCK + 9);
    for _ in 0..3 {
        assert_eq!(c.read(7 * BLOCK, BLOCK as u32).unwrap(), (0, pattern(7, 3)));
    }
    assert_eq!(
        read(&disks[0])[7 * BLOCK as usize..8 * BLOCK as usize],
        pattern(7, 3)[..]
    );
    let v = nodes[0].wait_view("alpha counts one error, one repair", |v| {
        member(v, "alpha")["checksum_errors"] == 1 && member(v, "alpha")["repaired"] == 1
    });
    assert_eq!(member(&v, "alpha")["disk"], "uptodate", "{v:#}");

    // Rot on the secondary is repaired in the background once found (by
    // its scrub here).
    flip_bit(&disks[1], 12 * BLOCK + 1);
    nodes[1].adm_ok(&["scrub", "r0"]);
    nodes[1].wait_view("beta repaired from alpha", |v| {
        member(v, "beta")["repaired"] == 1 && member(v, "beta")["disk"] == "uptodate"
    });
    assert_eq!(
        read(&disks[1])[12 * BLOCK as usize..13 * BLOCK as usize],
        pattern(12, 3)[..]
    );

    // The same block rotten on both: no good copy, EIO, never data.
    flip_bit(&disks[0], 20 * BLOCK + 3);
    flip_bit(&disks[1], 20 * BLOCK + 3000);
    for _ in 0..2 {
        let (e, got) = c.read(20 * BLOCK, BLOCK as u32).unwrap();
        assert_eq!(e, 5, "EIO, not data (got {} bytes)", got.len());
    }
    let v = nodes[0].wait_view("alpha's copy shown inconsistent", |v| {
        member(v, "alpha")["disk"] == "inconsistent"
    });
    assert!(
        member(&v, "alpha")["bad_blocks"].as_u64() >= Some(1),
        "{v:#}"
    );
    let (code, out) = verify(&nodes[0], &["--restart"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no good copy of 1 block(s)"), "{out}");
    // The list of bad blocks outlives a restart: alpha is not shown
    // uptodate after it either.
    drop(c);
    nodes[0].kill9();
    nodes[0].start();
    let v = nodes[0].wait_view("alpha's copy still inconsistent after a restart", |v| {
        member(v, "alpha")["disk"] == "inconsistent"
    });
    assert_eq!(member(&v, "alpha")["bad_blocks"], 1, "{v:#}");
    nodes[0].wait_view("alpha serves r0 again", |v| {
        resource(v, "r0").is_some_and(|r| r["device"].is_string())
    });
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.read(20 * BLOCK, BLOCK as u32).unwrap().0, 5);
    // The client writes the block anew: good again.
    assert_eq!(c.write(20 * BLOCK, &pattern(20, 4), true).unwrap(), 0);
    assert_eq!(
        c.read(20 * BLOCK, BLOCK as u32).unwrap(),
        (0, pattern(20, 4))
    );
    nodes[0].wait_view("alpha's copy good again", |v| {
        member(v, "alpha")["disk"] == "uptodate" && member(v, "alpha")["bad_blocks"] == 0
    });
}

/// While a client keeps writing, verify compares every copy at consistent
/// points: no false difference; rot planted meanwhile in a block nobody
/// writes is found and repaired, and all disks are equal at the end.
#[test]
fn verify_under_a_write_load_finds_no_false_difference() {
    require_tool("qemu-img", "qemu-utils");
    let mut nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let size = 32 * MIB;
    let disks = replicate_r0(&nodes, size);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (addr_node, stop) = (nodes[0].nbd("r0"), stop.clone());
        std::thread::spawn(move || {
            let mut c = addr_node;
            let mut g = 0u8;
            let mut writes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                g = g.wrapping_add(1);
                // The first 4 MiB only; the rest is left alone.
                for b in (0..1024u64).step_by(7) {
                    assert_eq!(c.write(b * BLOCK, &pattern(b, g), false).unwrap(), 0);
                    writes += 1;
                }
                assert_eq!(c.flush().unwrap(), 0);
            }
            writes
        })
    };
    let (code, out) = verify(&nodes[0], &["--restart"]);
    assert_eq!(code, 0, "no false difference under writes: {out}");
    flip_bit(&disks[2], 3000 * BLOCK + 8);
    let (code, out) = verify(&nodes[0], &["--repair", "--restart"]);
    assert_eq!(code, 0, "{out}");
    let gamma = line_of(&out, "gamma").unwrap_or_else(|| panic!("gamma listed: {out}"));
    assert!(
        gamma.contains("blocks 3000..=3000") && gamma.contains("(1 repaired)"),
        "{out}"
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    for n in nodes.iter_mut() {
        n.stop();
    }
    assert_all_equal(&disks);
}

/// Red team: the repair messages are a way to write another member's disk.
/// A member that is not the primary (here gamma's credentials, used by a
/// tool) may restore only what the target copy's own checksums say was
/// written: other data, and a checksum that is not of the block's data,
/// are refused, and alpha's disk is unchanged.
#[test]
fn a_member_cannot_write_other_data_into_another_copy() {
    use mars_proto::{client_handshake, read_msg, write_data, write_msg, Msg};
    let nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let disks = replicate_r0(&nodes, 4 * MIB);
    let mut c = nodes[0].nbd("r0");
    fill(&mut c, 16, 5);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[0].wait_view("alpha wrote everything back", written_back);
    let before = read(&disks[0]);
    let v = nodes[0].view_json();
    let id = v["cluster"]["id"].as_str().unwrap().to_string();
    let inc = resource(&v, "r0").unwrap()["incarnation"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answers = rt.block_on(async {
        let mut out = Vec::new();
        for attempt in 0..2 {
            let mut s = nodes[2].tls_connect(&nodes[0].listen).await.unwrap();
            client_handshake(&mut s, Some(&id), &nodes[2].info())
                .await
                .unwrap();
            let res = inc.clone();
            write_msg(
                &mut s,
                &Msg::Freeze {
                    res,
                    at: 0,
                    offset: 0,
                    len: 0,
                },
            )
            .await
            .unwrap();
            let at = match read_msg(&mut s).await.unwrap() {
                Msg::Frozen { pos, .. } => pos,
                other => panic!("freeze answered {other:?}"),
            };
            // Frozen where alpha stands now.
            let res = inc.clone();
            write_msg(
                &mut s,
                &Msg::Freeze {
                    res,
                    at,
                    offset: 0,
                    len: 0,
                },
            )
            .await
            .unwrap();
            assert!(
                matches!(read_msg(&mut s).await.unwrap(), Msg::Frozen { pos, .. } if pos == at)
            );
            let res = inc.clone();
            if attempt == 0 {
                let evil = vec![0xEEu8; BLOCK as usize];
                let len = evil.len() as u32;
                write_msg(
                    &mut s,
                    &Msg::FrozenRepair {
                        res,
                        at,
                        offset: 2 * BLOCK,
                        len,
                    },
                )
                .await
                .unwrap();
                write_data(&mut s, &evil).await.unwrap();
            } else {
                write_msg(
                    &mut s,
                    &Msg::FrozenCorrect {
                        res,
                        at,
                        block: 3,
                        crc: 0x1234_5678,
                    },
                )
                .await
                .unwrap();
            }
            out.push(read_msg(&mut s).await.unwrap());
        }
        out
    });
    for a in &answers {
        match a {
            Msg::Refused { reason } => assert!(
                reason.contains("only the primary may rewrite") || reason.contains("not corrected"),
                "{reason}"
            ),
            other => panic!("a member's rewrite answered {other:?}"),
        }
    }
    assert!(read(&disks[0]) == before, "alpha's disk unchanged");
    assert_eq!(c.read(3 * BLOCK, BLOCK as u32).unwrap(), (0, pattern(3, 5)));
    let (code, out) = verify(&nodes[0], &["--restart"]);
    assert_eq!(code, 0, "{out}");
}

/// Red team: a secondary whose replay is paused (a routine operation: a
/// backup of its disk) cannot be brought to the primary's position, so a
/// repair of the primary's known bad block waits for it in vain. It must not
/// hold the primary's writeback meanwhile: the background repair, tried
/// again and again, would freeze writeback most of the time.
#[test]
fn a_paused_secondary_does_not_stall_the_primarys_writeback() {
    let nodes = start_cluster(&["alpha", "beta"]);
    let disks = replicate_r0(&nodes, 4 * MIB);
    let mut c = nodes[0].nbd("r0");
    fill(&mut c, 64, 3);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[0].wait_view("alpha wrote everything back", written_back);
    nodes[1].adm_ok(&["pause-replay", "r0"]);
    // Alpha moves on past where beta's replay stands.
    fill(&mut c, 8, 4);
    nodes[0].wait_view("alpha wrote everything back", written_back);
    // Rot in alpha's disk, found by a read: a known bad block.
    flip_bit(&disks[0], 40 * BLOCK + 9);
    let (e, _) = c.read(40 * BLOCK, BLOCK as u32).unwrap();
    nodes[0].wait_view("alpha knows the bad block", |v| {
        member(v, "alpha")["bad_blocks"].as_u64() >= Some(1) || e == 0
    });
    // Writes go on; each is written back promptly, while the background
    // repair of the bad block keeps trying.
    let t0 = std::time::Instant::now();
    let mut worst = std::time::Duration::ZERO;
    let mut g = 10u8;
    while t0.elapsed() < std::time::Duration::from_secs(30) {
        g = g.wrapping_add(1);
        assert_eq!(c.write(0, &pattern(0, g), true).unwrap(), 0);
        let t = std::time::Instant::now();
        nodes[0].wait_view("alpha writes back", written_back);
        worst = worst.max(t.elapsed());
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(
        worst < std::time::Duration::from_secs(4),
        "the primary's writeback was held {worst:?} by a repair waiting for a paused secondary"
    );
    nodes[1].adm_ok(&["resume-replay", "r0"]);
}

/// Red team: a member that is not the primary must not make the primary's
/// table bless rot. Gamma (its own credentials) freezes alpha, digests a
/// block whose disk copy rotted, and asks for alpha's checksum of it to be
/// "corrected" to the rotten data's: then alpha's reads would serve the rot
/// without an error, and no read, scrub or verify would find it again.
#[test]
fn a_member_cannot_make_the_primary_bless_rot() {
    use mars_proto::{client_handshake, read_data, read_msg, write_msg, Msg};
    let nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let disks = replicate_r0(&nodes, 4 * MIB);
    let mut c = nodes[0].nbd("r0");
    fill(&mut c, 16, 5);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[0].wait_view("alpha wrote everything back", written_back);
    flip_bit(&disks[0], 3 * BLOCK + 100);
    let v = nodes[0].view_json();
    let id = v["cluster"]["id"].as_str().unwrap().to_string();
    let inc = resource(&v, "r0").unwrap()["incarnation"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = rt.block_on(async {
        let mut s = nodes[2].tls_connect(&nodes[0].listen).await.unwrap();
        client_handshake(&mut s, Some(&id), &nodes[2].info())
            .await
            .unwrap();
        let mut at = 0;
        let mut crc = None;
        for _ in 0..3 {
            let res = inc.clone();
            write_msg(
                &mut s,
                &Msg::Freeze {
                    res,
                    at,
                    offset: 3 * BLOCK,
                    len: BLOCK,
                },
            )
            .await
            .unwrap();
            match read_msg(&mut s).await.unwrap() {
                Msg::Frozen { pos, digest } => {
                    at = pos;
                    if digest {
                        let d = read_data(&mut s).await.unwrap();
                        crc = Some(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
                        break;
                    }
                }
                other => panic!("freeze answered {other:?}"),
            }
        }
        let crc = crc.expect("a digest of the frozen block");
        write_msg(
            &mut s,
            &Msg::FrozenCorrect {
                res: inc.clone(),
                at,
                block: 3,
                crc,
            },
        )
        .await
        .unwrap();
        read_msg(&mut s).await.unwrap()
    });
    assert!(
        matches!(&answer, Msg::Refused { .. }),
        "gamma's correction of alpha's table answered {answer:?}"
    );
    // Alpha's client gets the written data (repaired from a member), never the rot.
    assert_eq!(c.read(3 * BLOCK, BLOCK as u32).unwrap(), (0, pattern(3, 5)));
}

/// Red team: reads of several rotten blocks at once on the primary (two
/// clients) run a repair each. A repair's thaw must not let go of the other
/// repair's freeze halfway through (it then fails, and its client gets EIO
/// although a good copy exists).
#[test]
fn concurrent_read_repairs_all_answer_good_data() {
    let nodes = start_cluster(&["alpha", "beta"]);
    let disks = replicate_r0(&nodes, 4 * MIB);
    let mut c = nodes[0].nbd("r0");
    fill(&mut c, 64, 3);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    nodes[0].wait_view("alpha wrote everything back", written_back);
    for b in 10..40 {
        flip_bit(&disks[0], b * BLOCK + 7);
    }
    let readers: Vec<_> = (0..3u64)
        .map(|k| {
            let mut c = nodes[0].nbd("r0");
            std::thread::spawn(move || {
                let mut bad = Vec::new();
                for b in (10 + k * 10)..(20 + k * 10) {
                    let (e, got) = c.read(b * BLOCK, BLOCK as u32).unwrap();
                    if e != 0 || got != pattern(b, 3) {
                        bad.push((b, e));
                    }
                }
                bad
            })
        })
        .collect();
    let bad: Vec<(u64, u32)> = readers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    assert!(
        bad.is_empty(),
        "blocks answered with an error although beta holds them good: {bad:?}"
    );
    drop(c);
}
