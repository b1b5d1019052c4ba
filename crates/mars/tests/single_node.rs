//! One node end to end: marsadm commands, real NBD clients, ext4 on the device.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn node_with_resource(size: u64) -> (Node, std::path::PathBuf) {
    let mut n = Node::create("alpha");
    n.start();
    let disk = n.disk("disk.img", size);
    let out = n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    assert!(out.contains("r0"), "{out}");
    n.adm_ok(&["wait-resource", "r0", "primary", "--timeout", "10"]);
    (n, disk)
}

#[test]
fn view_json_has_the_contract_fields() {
    let (n, disk) = node_with_resource(64 * MIB);
    let v = n.view_json();
    assert_eq!(v["node"], "alpha");
    assert!(v["cluster"]["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(v["cluster"]["nodes"][0]["name"], "alpha");
    assert_eq!(v["cluster"]["nodes"][0]["address"], n.listen.as_str());
    assert_eq!(v["cluster"]["nodes"][0]["alive"], true);
    let r = &v["resources"][0];
    assert_eq!(r["name"], "r0");
    assert_eq!(r["size"], 64 * MIB);
    assert_eq!(r["designated_primary"], "alpha");
    assert_eq!(r["actual_primary"], "alpha");
    assert_eq!(r["device"], n.uri("r0").as_str());
    let m = &r["members"][0];
    assert_eq!(m["node"], "alpha");
    assert_eq!(m["role"], "primary");
    assert_eq!(m["disk"], "uptodate");
    assert_eq!(m["connected"], true);
    for k in ["written", "fetched", "replayed"] {
        assert!(m["log"][k].is_u64(), "log.{k}");
    }
    assert!(m["sync"].is_null());
    for k in ["sync", "fetch", "replay"] {
        assert_eq!(m["paused"][k], false);
    }
    assert_eq!(m["split_brain"], false);
    assert_eq!(m["emergency"], false);

    // Writes move the log positions; wait-resource uptodate waits for writeback.
    let mut c = n.nbd("r0");
    assert_eq!(c.write(0, &[7u8; 4096], true).unwrap(), 0);
    n.adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "10"]);
    let v = n.view_json();
    let log = &v["resources"][0]["members"][0]["log"];
    assert!(log["written"].as_u64().unwrap() >= 4096);
    assert_eq!(log["replayed"], log["written"]);
    assert_eq!(
        &read(&disk)[..4096],
        &[7u8; 4096][..],
        "written back to the disk"
    );

    let human = n.adm_ok(&["view"]);
    assert!(
        human.contains("r0") && human.contains("primary") && human.contains("uptodate"),
        "{human}"
    );
}

#[test]
fn qemu_io_patterns_and_nbdcopy_round_trip() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("nbdinfo", "libnbd-bin");
    let (n, disk) = node_with_resource(32 * MIB);
    let uri = n.uri("r0");
    let out = run(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0xa5 0 1M",
        "-c",
        "write -P 0x5a 512k 64k",
        "-c",
        "write -z 2M 128k",
        "-c",
        "discard 3M 64k",
        "-c",
        "flush",
        "-c",
        "read -P 0xa5 0 512k",
        "-c",
        "read -P 0x5a 512k 64k",
        "-c",
        "read -P 0xa5 576k 448k",
        "-c",
        "read -P 0 2M 128k",
        "-c",
        "read -P 0 3M 64k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");

    let info = run(Command::new("nbdinfo").args(["--json", &uri]));
    let info: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo json");
    assert_eq!(info["exports"][0]["export-size"], 32 * MIB);
    assert_eq!(info["exports"][0]["can_flush"], true);
    assert_eq!(info["exports"][0]["can_fua"], true);

    // nbdcopy a random file in and out: byte-identical.
    let src = n.path("src.bin");
    let data: Vec<u8> = (0..32 * MIB)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(&uri));
    let dst = n.path("dst.bin");
    run(Command::new("nbdcopy").arg(&uri).arg(&dst));
    assert!(read(&dst) == data, "nbdcopy out differs from nbdcopy in");
    n.adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "20"]);
    assert!(read(&disk) == data, "disk after writeback differs");
}

#[test]
fn ext4_over_nbdfuse_and_loop_device() {
    require_tool("nbdfuse", "nbdfuse");
    require_tool("losetup", "mount");
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("fusermount3", "fuse3");
    let (n, _disk) = node_with_resource(128 * MIB);
    let fuse_dir = n.path("fuse");
    let mnt = n.path("mnt");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fuse = Command::new("nbdfuse")
        .arg(&fuse_dir)
        .arg(n.uri("r0"))
        .spawn()
        .expect("nbdfuse");
    let dev_file = fuse_dir.join("nbd");
    wait_for(
        "nbdfuse to expose the device",
        Duration::from_secs(20),
        || {
            std::fs::metadata(&dev_file)
                .map(|m| m.len() == 128 * MIB)
                .unwrap_or(false)
        },
    );
    struct Cleanup<'a> {
        loopdev: Option<String>,
        mnt: &'a std::path::Path,
        fuse_dir: &'a std::path::Path,
    }
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.mnt).output();
            if let Some(l) = &self.loopdev {
                let _ = Command::new("losetup").args(["-d", l]).output();
            }
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(self.fuse_dir)
                .output();
        }
    }
    let mut cleanup = Cleanup {
        loopdev: None,
        mnt: &mnt,
        fuse_dir: &fuse_dir,
    };
    let loopdev = run(Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&dev_file))
    .trim()
    .to_string();
    cleanup.loopdev = Some(loopdev.clone());
    run(Command::new("mkfs.ext4").args(["-q", "-F", &loopdev]));
    run(Command::new("mount").arg(&loopdev).arg(&mnt));
    let mut files = Vec::new();
    for i in 0..20u32 {
        let p = mnt.join(format!("file{i}"));
        let data: Vec<u8> = (0..(i as usize + 1) * 100_000)
            .map(|j| (j as u32 ^ i.wrapping_mul(77)) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        files.push((p, data));
    }
    run(&mut Command::new("sync"));
    run(Command::new("umount").arg(&mnt));
    let fsck = run(Command::new("fsck.ext4").args(["-n", "-f", &loopdev]));
    assert!(fsck.contains("files"), "{fsck}");
    run(Command::new("mount").arg(&loopdev).arg(&mnt));
    for (p, data) in &files {
        assert!(&read(p) == data, "{} differs after remount", p.display());
    }
    run(Command::new("umount").arg(&mnt));
    drop(cleanup);
    let _ = fuse.wait();
}

#[test]
fn commands_refuse_clearly_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nothing");
    // marsadm against a directory that is not a node.
    let out = Command::new(MARSADM)
        .arg("--dir")
        .arg(&dir)
        .arg("view")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an initialised"),
        "{:?}",
        out
    );
    // marsd on it: one line, non-zero.
    let out = Command::new(MARSD).arg("--dir").arg(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an initialised"), "{err}");

    let mut n = Node::create("alpha");
    // Daemon not running.
    let err = n.adm_err(&["view"]);
    assert!(err.contains("not running"), "{err}");
    // wait-* wait for a daemon that is not running yet (a script that starts marsd
    // in the background and waits at once), and say so when it never comes.
    let err = n.adm_err(&["wait-cluster", "--timeout", "0.3"]);
    assert!(
        err.contains("timed out") && err.contains("not running"),
        "{err}"
    );
    let mut waiter = Command::new(MARSADM)
        .arg("--dir")
        .arg(&n.dir)
        .args(["wait-cluster", "--timeout", "60"])
        .spawn()
        .unwrap();
    // create-cluster twice.
    let err = n.adm_err(&["create-cluster", "--node", "x", "--listen", "127.0.0.1:1"]);
    assert!(err.contains("already initialised"), "{err}");
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "wait-cluster returned before marsd started"
    );
    n.start();
    assert!(
        waiter.wait().unwrap().success(),
        "wait-cluster after marsd started"
    );
    // A second marsd on the same directory.
    let out = Command::new(MARSD)
        .arg("--dir")
        .arg(&n.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{out:?}"
    );

    let disk = n.disk("disk.img", 16 * MIB);
    let err = n.adm_err(&[
        "create-resource",
        "r0",
        n.path("missing.img").to_str().unwrap(),
    ]);
    assert!(err.contains("missing.img"), "{err}");
    let empty = n.disk("empty.img", 0);
    let err = n.adm_err(&["create-resource", "r0", empty.to_str().unwrap()]);
    assert!(err.contains("empty"), "{err}");
    let err = n.adm_err(&["create-resource", "bad/name", disk.to_str().unwrap()]);
    assert!(err.contains("invalid resource name"), "{err}");
    assert!(
        n.view_json()["resources"].as_array().unwrap().is_empty(),
        "refused creates left nothing"
    );

    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    let err = n.adm_err(&["create-resource", "r0", disk.to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
    let other = n.disk("other.img", 16 * MIB);
    let err = n.adm_err(&["create-resource", "r1", disk.to_str().unwrap()]);
    assert!(err.contains("already used"), "{err}");
    for cmd in [
        "primary",
        "secondary",
        "up",
        "down",
        "log-rotate",
        "log-delete",
        "pause-replay",
    ] {
        let err = n.adm_err(&[cmd, "nosuch"]);
        assert!(err.contains("unknown resource nosuch"), "{cmd}: {err}");
    }
    let err = n.adm_err(&["wait-resource", "r0", "bogus"]);
    assert!(err.contains("unknown condition"), "{err}");
    n.adm_ok(&["create-resource", "r1", other.to_str().unwrap()]);
    assert_eq!(n.view_json()["resources"].as_array().unwrap().len(), 2);

    // Ports taken: a second node configured on the same NBD port cannot start.
    let mut m = Node::create("beta");
    let cfg_path = m.dir.join("node.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&read(&cfg_path)).unwrap();
    cfg["nbd"] = n.nbd.clone().into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = Command::new(MARSD)
        .arg("--dir")
        .arg(&m.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on NBD address") && err.lines().count() == 1,
        "{err}"
    );
    m.kill9();
}

#[test]
fn roles_up_down_rotate_delete_and_restart_keep_data() {
    require_tool("nbdinfo", "libnbd-bin");
    let (mut n, disk) = node_with_resource(16 * MIB);
    let served = |n: &Node| {
        Command::new("nbdinfo")
            .arg(n.uri("r0"))
            .output()
            .unwrap()
            .status
            .success()
    };
    let mut c = n.nbd("r0");
    assert_eq!(c.write(4096, &[1u8; 8192], false).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);

    let out = n.adm_ok(&["log-rotate", "r0"]);
    assert!(out.contains("log-000000002-alpha"), "{out}");
    let out = n.adm_ok(&["log-rotate", "r0"]);
    assert!(out.contains("empty"), "{out}");
    n.adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "10"]);
    // The version of the finished logfile is written by writeback; log-delete needs it.
    let rdir = n.dir.join("resources/r0");
    wait_for("version of logfile 1", Duration::from_secs(10), || {
        rdir.join("version-000000001-alpha").exists()
    });
    wait_for(
        "log-delete to delete logfile 1",
        Duration::from_secs(10),
        || {
            n.adm_ok(&["log-delete", "r0"]);
            !rdir.join("log-000000001-alpha").exists()
        },
    );
    assert!(
        rdir.join("log-000000002-alpha").exists(),
        "current logfile kept"
    );

    n.adm_ok(&["secondary", "r0"]);
    assert!(!served(&n), "secondary: device not served");
    assert!(
        c.read(0, 512).is_err() || c.read(0, 512).map(|(e, _)| e != 0).unwrap_or(true),
        "old connection cut off"
    );
    assert!(n.view_json()["resources"][0]["actual_primary"].is_null());
    n.adm_ok(&["primary", "r0"]);
    assert!(served(&n));

    n.adm_ok(&["down", "r0"]);
    assert!(!served(&n));
    assert_eq!(
        n.view_json()["resources"][0]["members"][0]["disk"],
        "detached"
    );
    assert_eq!(
        &read(&disk)[4096..4096 + 8192],
        &[1u8; 8192][..],
        "down writes everything back"
    );
    n.adm_ok(&["up", "r0"]);
    n.adm_ok(&["wait-resource", "r0", "primary", "--timeout", "10"]);

    for (p, key) in [
        ("pause-replay", "replay"),
        ("pause-fetch", "fetch"),
        ("pause-sync", "sync"),
    ] {
        n.adm_ok(&[p, "r0"]);
        assert_eq!(
            n.view_json()["resources"][0]["members"][0]["paused"][key],
            true
        );
    }
    n.adm_ok(&["resume-replay", "r0"]);
    assert_eq!(
        n.view_json()["resources"][0]["members"][0]["paused"]["replay"],
        false
    );

    // Clean restart keeps data and desired state.
    n.stop();
    n.start();
    n.adm_ok(&["wait-resource", "r0", "primary", "--timeout", "10"]);
    let mut c = n.nbd("r0");
    let (e, data) = c.read(4096, 8192).unwrap();
    assert_eq!(e, 0);
    assert_eq!(data, vec![1u8; 8192]);
    assert_eq!(
        n.view_json()["resources"][0]["members"][0]["paused"]["fetch"],
        true
    );

    n.adm_ok(&["delete-resource", "r0"]);
    assert!(!served(&n));
    assert!(!rdir.exists());
    assert!(n.view_json()["resources"].as_array().unwrap().is_empty());
}

#[test]
fn out_of_range_requests_get_errors_and_change_nothing() {
    let (n, disk) = node_with_resource(MIB);
    let mut c = n.nbd("r0");
    assert_eq!(c.size, MIB);
    assert_eq!(
        c.write(MIB - 512, &[9u8; 1024], false).unwrap(),
        mars_nbd::proto::NBD_ENOSPC
    );
    assert_eq!(c.read(MIB, 512).unwrap().0, mars_nbd::proto::NBD_EINVAL);
    assert_eq!(
        c.read(u64::MAX - 10, 512).unwrap().0,
        mars_nbd::proto::NBD_EINVAL
    );
    assert_eq!(c.flush().unwrap(), 0);
    n.adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "10"]);
    assert!(read(&disk).iter().all(|&b| b == 0), "nothing written");
    assert_eq!(
        n.view_json()["resources"][0]["members"][0]["log"]["written"],
        0
    );
}
