//! Three real marsd processes replicating one resource: full sync while the
//! primary writes, fetch and replay, SIGKILL of a secondary, only differing
//! blocks cross the network.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn cluster3() -> Vec<Node> {
    let names = ["alpha", "beta", "gamma"];
    let mut first = Node::create(names[0]);
    first.start();
    let mut nodes = vec![first];
    for n in &names[1..] {
        let mut node = Node::join(n, &nodes[0]);
        node.start();
        nodes.push(node);
    }
    for n in &nodes {
        n.wait_view("every node alive", |v| all_alive(v, &names));
    }
    nodes
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

fn member<'a>(v: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    resource(v, "r0").and_then(|r| r["members"].as_array()?.iter().find(|m| m["node"] == node)).unwrap_or(&serde_json::Value::Null)
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
    qemu_write(&nodes[0], &["write -P 0x11 0 4M", "write -P 0x22 10M 1M", "flush"]);

    for n in &nodes[1..] {
        n.wait_view("r0 known", |v| resource(v, "r0").is_some());
    }
    let b_disk = nodes[1].disk("b.img", size);
    let g_disk = nodes[2].disk("g.img", size);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    qemu_write(&nodes[0], &["write -P 0x33 2M 3M", "write -z 20M 1M", "discard 24M 1M"]);
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
    qemu_write(&nodes[0], &["write -P 0x66 7M 2M", "write -P 0x77 12M 1M", "flush"]);
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
    let v = nodes[1].wait_view("beta reports its sync", |v| member(v, "beta")["disk"] == "uptodate");
    assert_eq!(member(&v, "beta")["sync_blocks_transferred"], 3, "{v:#}");
    assert!(read(&b_disk) == data);
    // Refusals: joining twice, a disk too small.
    let err = nodes[1].adm_err(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    assert!(err.contains("already a member"), "{err}");
    let small = nodes[2].disk("small.img", MIB);
    let err = nodes[2].adm_err(&["join-resource", "r0", small.to_str().unwrap()]);
    assert!(err.contains("needs"), "{err}");
}
