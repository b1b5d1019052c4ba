//! Least privilege (issue 17, items 3 and 5): metadata from the network
//! names no path that a node opens or writes, and only root or the daemon's
//! own user talks to the control socket.

mod common;
use common::*;
use mars_proto::WireEntry;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const SIZE: u64 = 4 << 20;

/// Push `entries` to `to` as node `tool` of its cluster (a directory made by
/// invite + join-cluster) would.
fn push(tool: &Node, to: &Node, entries: Vec<WireEntry>) {
    // `to` admits the tool's certificate once it knows the tool's node entry.
    to.wait_view("the tool node known", |v| {
        view_nodes(v).iter().any(|(n, _)| *n == tool.name)
    });
    tool.push_as(to, entries);
}

fn wire(key: &str, writer: &str, value: serde_json::Value) -> WireEntry {
    WireEntry {
        key: key.into(),
        clock: 1_000_000,
        node: writer.into(),
        value: Some(value),
        deleted_ms: 0,
    }
}

fn member_on(disk: &std::path::Path) -> serde_json::Value {
    serde_json::json!({"disk": disk.display().to_string(), "attached": true, "connected": true})
}

/// Every file under `dir` with its content.
fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

/// alpha serves r0; beta is no member. Pushed entries name a victim file
/// (outside every node directory) as beta's disk of r0 and make beta a
/// member, put `..` and `/` into names, and claim alpha's own member entry
/// with the victim as its disk. Before, beta ran a full sync of r0 into the
/// victim, and alpha opened the victim as r0's disk at its next start. Now:
/// the victim and everything beside it are byte-identical afterwards, beta
/// opens nothing (it has no local disk of r0), alpha serves its own disk,
/// and every refused entry is logged with the peer and the reason.
#[test]
fn a_pushed_entry_with_a_path_in_it_changes_no_file_outside_the_node_directory() {
    let mut n = start_cluster(&["alpha", "beta"]);
    let d = n[0].disk("r0.img", SIZE);
    n[0].adm_ok(&["create-resource", "r0", d.to_str().unwrap()]);
    let mut c = n[0].nbd("r0");
    c.write(0, &vec![0x5a; 4096], true).unwrap();
    assert_eq!(c.flush().unwrap(), 0);
    drop(c);
    let inc = std::fs::read_to_string(n[0].dir.join("resources/r0/incarnation")).unwrap();
    let inc = inc.trim();

    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, vec![0xee; SIZE as usize]).unwrap();
    let before = snapshot(outside.path());

    // A node of the cluster (certificate and all) that pushes what it likes.
    let tool = tool_member("tool", &n[0]);
    let escaping = format!("{}/../../victim", outside.path().display());
    push(
        &tool,
        &n[1],
        vec![
            // beta a member of r0, its disk the victim (written "by beta").
            wire(&format!("c/d/member/{inc}/beta"), "tool", true.into()),
            wire(
                &format!("r/{inc}/d/member/beta"),
                "beta",
                member_on(&victim),
            ),
            // Names with paths in them.
            wire("r/../resources/x/d/member/beta", "beta", member_on(&victim)),
            wire(
                "c/d/res/..@0000000000000001",
                "tool",
                serde_json::json!({"size": SIZE, "resource_id": 1}),
            ),
            wire(
                &format!("c/d/member/{inc}/../../victim"),
                "tool",
                true.into(),
            ),
            wire(
                &format!("r/{inc}/a/alpha"),
                "alpha",
                serde_json::json!({"role": "primary", "disk": "uptodate", "written": 0, "fetched": 0, "replayed": 0, "logfile": "log-000000001-../../victim"}),
            ),
            wire(
                &format!("r/{inc}/d/primary"),
                "tool",
                escaping.clone().into(),
            ),
        ],
    );
    // alpha's own member entry, its disk the victim, stamped with alpha's name.
    push(
        &tool,
        &n[0],
        vec![wire(
            &format!("r/{inc}/d/member/alpha"),
            "alpha",
            member_on(&victim),
        )],
    );

    // beta either starts copying r0 into the victim (before) or says it has
    // no disk of r0 here (now).
    let changed = || snapshot(outside.path()) != before;
    wait_for(
        "beta to act on its membership",
        Duration::from_secs(60),
        || changed() || n[1].log_text().contains("has no local disk of it"),
    );
    assert!(
        !changed(),
        "beta wrote into a file outside the node directories:\n{}",
        n[1].log_text()
    );
    // alpha restarted (its store saved): it opens r0's disk and serves it,
    // writes and all.
    n[0].stop();
    n[0].start();
    n[0].wait_view("alpha serves r0 again", |v| {
        resource(v, "r0").is_some_and(|r| r["actual_primary"] == "alpha")
    });
    let mut c = n[0].nbd("r0");
    c.write(8192, &vec![0x77; 4096], true).unwrap();
    assert_eq!(c.flush().unwrap(), 0);
    let (err, data) = c.read(0, 4096).unwrap();
    assert!(
        err == 0 && data == vec![0x5a; 4096],
        "alpha serves another disk than its own (error {err}, first byte {:#x})",
        data.first().copied().unwrap_or(0)
    );
    drop(c);
    wait_for(
        "alpha's write on its own disk",
        Duration::from_secs(30),
        || changed() || read(&d)[8192..8192 + 4096] == [0x77; 4096][..],
    );

    assert!(
        !changed(),
        "a file outside the node directories changed:\nalpha:\n{}\nbeta:\n{}",
        n[0].log_text(),
        n[1].log_text()
    );
    let v = n[1].view_json();
    let r0 = resource(&v, "r0").unwrap();
    assert_ne!(r0["primary"], escaping.as_str(), "{v:#}");
    assert!(!n[1].dir.join("resources/r0").exists());
    let beta = n[1].log_text();
    for k in [
        "r/../resources/x",
        "c/d/res/..@",
        "../../victim",
        "d/primary",
    ] {
        assert!(
            beta.lines().any(|l| l.contains("metadata entry refused")
                && l.contains("peer=tool")
                && l.contains(k)),
            "no refusal of {k} logged:\n{beta}"
        );
    }
    let alpha = n[0].log_text();
    assert!(
        alpha.lines().any(|l| l.contains("metadata entry refused")
            && l.contains("d/member/alpha")
            && l.contains("own entry")),
        "{alpha}"
    );
}

/// The control socket is 0600 under umask 0000, and a caller of another
/// uid (nobody) that can reach it is refused with a clear message, and
/// logged; root still is served.
#[test]
fn the_control_socket_is_private_and_refuses_other_uids() {
    require_tool("setpriv", "util-linux");
    let mut n = Node::create("alpha");
    n.wrapper = vec![
        "sh".into(),
        "-c".into(),
        "umask 0000; exec \"$0\" \"$@\"".into(),
    ];
    n.start();
    let sock = n.dir.join("marsd.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o} under umask 0000");
    // Nothing else marsd made in the node directory is open to others.
    // Make it reachable for the test's other user, as a careless admin might.
    for p in [n.tmp.path(), n.dir.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let marsadm = n.path("marsadm");
    std::fs::copy(MARSADM, &marsadm).unwrap();
    std::fs::set_permissions(&marsadm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let disk = n.disk("r0.img", SIZE);
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&marsadm)
        .arg("--dir")
        .arg(&n.dir)
        .args(["create-resource", "r0", disk.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody was served: {err}");
    assert!(
        err.contains("permission denied") && err.contains("uid 65534"),
        "{err}"
    );
    let v = n.view_json();
    assert!(resource(&v, "r0").is_none(), "{v:#}");
    assert!(
        n.log_text().contains("control socket: refused a caller"),
        "{}",
        n.log_text()
    );
    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
}
