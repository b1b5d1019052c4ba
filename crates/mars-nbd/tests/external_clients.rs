//! Interoperability with real NBD clients: qemu-io (Debian package `qemu-utils`)
//! and nbdinfo (Debian package `libnbd-bin`). These tests FAIL if the tools are
//! missing; they are never skipped.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

const SIZE: usize = 4 << 20;

fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
    {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("`{name}` not found: install the Debian package `{package}` (apt-get install -y {package}) to run the NBD interoperability tests");
}

/// Start `serve()` on 127.0.0.1:0 in a background runtime.
fn start_server(reg: Arc<MemRegistry>) -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(mars_nbd::serve(l, reg));
        addr
    });
    (rt, addr)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("failed to spawn client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    format!("{stdout}{stderr}")
}

#[test]
fn qemu_io_write_read_pattern() {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let (reg, export) = MemRegistry::with("vol1", MemExport::new(SIZE));
    let (_rt, addr) = start_server(reg);
    let url = format!("nbd://{}:{}/vol1", addr.ip(), addr.port());
    let out = run(Command::new(&qemu_io).args([
        "-f",
        "raw",
        &url,
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "write -P 0x5c 1M 1M",
        "-c",
        "read -P 0x5c 1M 1M",
        "-c",
        "write -z 512k 128k",
        "-c",
        "read -P 0 512k 128k",
        "-c",
        "discard 3M 64k",
        "-c",
        "flush",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("read 65536/65536 bytes"), "{out}");
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
    let data = export.snapshot();
    assert!(data[..65536].iter().all(|&b| b == 0xab));
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0x5c));
    assert!(export.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

#[test]
fn qemu_io_aio_concurrent() {
    let qemu_io = require_tool("qemu-io", "qemu-utils");
    let (reg, export) = MemRegistry::with("vol1", MemExport::new(SIZE));
    let (_rt, addr) = start_server(reg);
    let url = format!("nbd://{}:{}/vol1", addr.ip(), addr.port());
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), url];
    for i in 0..32 {
        args.push("-c".into());
        args.push(format!("aio_write -P {} {}k 4k", i + 1, i * 4));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    for i in 0..32 {
        args.push("-c".into());
        args.push(format!("aio_read -P {} {}k 4k", i + 1, i * 4));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    let out = run(Command::new(&qemu_io).args(&args));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let data = export.snapshot();
    for i in 0..32usize {
        assert!(data[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn nbdinfo_json_size_and_list() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let reg = Arc::new(MemRegistry {
        exports: vec![
            ("vol1".into(), Arc::new(MemExport::new(SIZE))),
            ("other".into(), Arc::new(MemExport::new(8192))),
        ],
    });
    let (_rt, addr) = start_server(reg);
    let out = run(Command::new(&nbdinfo).args([
        "--json",
        &format!("nbd://{}:{}/vol1", addr.ip(), addr.port()),
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad json ({e}): {out}"));
    let exp = &v["exports"][0];
    assert_eq!(exp["export-size"].as_u64(), Some(SIZE as u64), "{out}");
    assert_eq!(exp["export-name"].as_str(), Some("vol1"), "{out}");
    assert_eq!(exp["is_read_only"].as_bool(), Some(false), "{out}");
    assert_eq!(exp["can_multi_conn"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_flush"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_fua"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_trim"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_zero"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["block_size_maximum"].as_u64(), Some(32 << 20), "{out}");

    let out = run(Command::new(&nbdinfo).args([
        "--json",
        "--list",
        &format!("nbd://{}:{}", addr.ip(), addr.port()),
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad json ({e}): {out}"));
    let mut names: Vec<&str> = v["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, vec!["other", "vol1"], "{out}");
}
