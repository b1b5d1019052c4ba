//! Link compression (issue 17 item 7) with real marsd: a resource set to
//! zstd is synced and caught up with compressed data frames, ends
//! byte-identical, and the source's view shows fewer bytes on the wire than
//! it sent; random data goes raw (no more than the frame headers on top).

mod common;
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Compressible bytes, as a file system's metadata and text are: words with
/// a position in them, nothing repeating exactly at a short period.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(
            format!("block {i:012} of the replicated device, written by alpha; ").as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn log_pos(n: &Node, node: &str, which: &str) -> u64 {
    member(&n.view_json(), node)["log"][which]
        .as_u64()
        .unwrap_or(0)
}

/// (raw bytes, bytes on the wire, frames, compressed frames) that `n` sent of r0.
fn link_sent(n: &Node) -> (u64, u64, u64, u64) {
    let v = n.view_json();
    let l = &resource(&v, "r0").expect("r0 in the view")["link_sent"];
    let f = |k: &str| l[k].as_u64().unwrap_or(0);
    (
        f("raw_bytes"),
        f("wire_bytes"),
        f("frames"),
        f("compressed_frames"),
    )
}

fn write_all(n: &Node, at: u64, data: &[u8]) {
    let mut c = n.nbd("r0");
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        assert_eq!(c.write(at + i as u64 * MIB, piece, false).unwrap(), 0);
    }
    assert_eq!(c.flush().unwrap(), 0);
}

/// Beta fetch paused, `data` written at `at` on alpha, fetch resumed: waits
/// until beta replayed all of it and both disks are equal.
fn catch_up(nodes: &[Node], disks: &[std::path::PathBuf], at: u64, data: &[u8]) {
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    write_all(&nodes[0], at, data);
    let written = log_pos(&nodes[0], "alpha", "written");
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    wait_for(
        "beta replays everything alpha wrote",
        Duration::from_secs(90),
        || log_pos(&nodes[1], "beta", "replayed") >= written,
    );
    wait_for(
        "beta's disk equals alpha's",
        Duration::from_secs(30),
        || read(&disks[1]) == read(&disks[0]),
    );
}

#[test]
fn compressed_sync_and_catch_up_end_identical_with_fewer_bytes_on_the_wire() {
    let nodes = start_cluster(&["alpha", "beta"]);
    let size = 32 * MIB;
    // Alpha's disk holds compressible data that is in no log: the full sync
    // carries it.
    let a_disk = nodes[0].disk("a.img", size);
    std::fs::write(&a_disk, text(size as usize, 0)).unwrap();
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    // Settings that are no setting are refused, and change nothing.
    nodes[0].adm_err(&["set-compression", "r0", "zstd", "--level", "22"]);
    nodes[0].adm_err(&["set-compression", "r0", "off", "--level", "1"]);
    nodes[0].adm_err(&["set-compression", "r0", "lz4"]);
    let v = nodes[0].view_json();
    assert_eq!(resource(&v, "r0").unwrap()["compression"], "off");
    let out = nodes[0].adm_ok(&["set-compression", "r0", "zstd"]);
    assert!(out.contains("zstd:1"), "{out}");
    nodes[1].wait_view("r0 with compression known", |v| {
        resource(v, "r0").is_some_and(|r| r["compression"] == "zstd:1")
    });
    let b_disk = nodes[1].disk("b.img", size);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let disks = vec![a_disk, b_disk];
    assert!(read(&disks[1]) == read(&disks[0]), "synced disks are equal");
    // Every block differed (beta's disk was zeros): all 32 went compressed
    // (besides them, fetch may have sent a small chunk of the log).
    let (raw, wire, frames, packed) = link_sent(&nodes[0]);
    assert!(raw >= size, "alpha sent the whole disk: {raw}");
    assert!(packed >= 32, "{packed} of {frames} compressed");
    assert!(wire * 4 < raw, "sync: {wire} bytes on the wire for {raw}");

    // Catch-up of compressible writes.
    catch_up(&nodes, &disks, 0, &text(16 * MIB as usize, 7));
    let (raw2, wire2, frames2, packed2) = link_sent(&nodes[0]);
    assert!(
        raw2 - raw >= 16 * MIB,
        "the log was fetched: {}",
        raw2 - raw
    );
    assert!(packed2 > packed, "fetched chunks went compressed");
    assert!(
        (wire2 - wire) * 2 < raw2 - raw,
        "catch-up: {} bytes on the wire for {}",
        wire2 - wire,
        raw2 - raw
    );

    // Random writes go raw: on the wire the data and frame headers, no more.
    catch_up(&nodes, &disks, 8 * MIB, &random(12 * MIB as usize, 3));
    let (raw3, wire3, frames3, _) = link_sent(&nodes[0]);
    assert!(raw3 - raw2 >= 12 * MIB);
    assert!(
        wire3 - wire2 <= raw3 - raw2 + 20 * (frames3 - frames2),
        "random data: {} bytes on the wire for {} in {} frames",
        wire3 - wire2,
        raw3 - raw2,
        frames3 - frames2
    );
    let _ = frames2;

    // Off: the next connections ask for raw frames only.
    nodes[0].adm_ok(&["set-compression", "r0", "off"]);
    nodes[1].wait_view("compression off known", |v| {
        resource(v, "r0").is_some_and(|r| r["compression"] == "off")
    });
    catch_up(&nodes, &disks, 0, &text(4 * MIB as usize, 11));
    let (raw4, wire4, frames4, packed4) = link_sent(&nodes[0]);
    assert!(raw4 > raw3 && frames4 > frames3);
    assert_eq!(
        wire4 - wire3,
        raw4 - raw3 + 16 * (frames4 - frames3),
        "raw frames only"
    );
    let _ = packed4;
}
