//! save/load: round trip, damage detection, version check.

use std::path::Path;

use mars_meta::{Entry, MetaError, Stamp, Store, FORMAT_VERSION};
use serde_json::json;

fn sample() -> Store {
    let mut s = Store::new("n1");
    s.set(
        "c/d/members/n1",
        json!({"addr": "10.0.0.1:7777", "weight": 1.5}),
    );
    s.set("c/a/addr/n1", json!("10.0.0.1"));
    s.set("r/vol/d/primary", json!("n1"));
    s.set("r/vol/a/n1/pos", json!(u64::MAX));
    s.set(
        "r/vol/a/n1/list",
        json!([1, -2, 3.25, null, true, "x", {"z": {}}]),
    );
    s.delete("c/a/addr/n1", 123_456);
    s.merge(
        "r/other/d/size",
        Entry {
            stamp: Stamp {
                clock: 40,
                node: "n7".into(),
            },
            value: Some(json!(1e300)),
            deleted_ms: 0,
        },
    );
    s
}

fn state(s: &Store) -> Vec<(String, Entry)> {
    s.range("")
        .map(|(k, e)| (k.to_string(), e.clone()))
        .collect()
}

fn assert_names(e: &MetaError, path: &Path) {
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    let s = sample();
    s.save(&path).unwrap();
    let l = Store::load(&path, "n1").unwrap();
    assert_eq!(state(&l), state(&s));
    assert_eq!(l.clock(), s.clock());
    assert_eq!(l.node(), "n1");
    for p in ["c/", "r/vol/", "r/other/", ""] {
        assert_eq!(l.digest(p), s.digest(p));
        assert_eq!(l.bucket_digests(p), s.bucket_digests(p));
    }
    assert!(l.entry("c/a/addr/n1").unwrap().is_tombstone());
    assert_eq!(l.entry("c/a/addr/n1").unwrap().deleted_ms, 123_456);

    // a write after reload is newer than everything saved
    let mut l = l;
    assert!(l.set("c/d/x", json!(1)).stamp.clock > 40);

    // saving again replaces the file, leaving nothing else behind
    l.save(&path).unwrap();
    assert_eq!(state(&Store::load(&path, "n1").unwrap()), state(&l));
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn empty_store_round_trip_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    let s = Store::load(&path, "n2").unwrap();
    assert!(s.is_empty());
    assert_eq!(s.clock(), 0);
    assert_eq!(s.node(), "n2");
    s.save(&path).unwrap();
    let l = Store::load(&path, "n2").unwrap();
    assert!(l.is_empty());
}

#[test]
fn the_loaded_clock_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    let mut s = Store::new("n1");
    s.set("c/d/x", json!(1));
    // a stale merge advances the clock beyond every stored entry
    s.merge(
        "c/d/x",
        Entry {
            stamp: Stamp {
                clock: 0,
                node: "n0".into(),
            },
            value: None,
            deleted_ms: 1,
        },
    );
    s.merge(
        "c/d/y",
        Entry {
            stamp: Stamp {
                clock: 99,
                node: "n0".into(),
            },
            value: Some(json!(1)),
            deleted_ms: 0,
        },
    );
    s.delete("c/d/y", 5);
    s.gc_tombstones(1000, 0); // drops the only entry with clock 100
    assert_eq!(s.clock(), 100);
    s.save(&path).unwrap();
    assert_eq!(Store::load(&path, "n1").unwrap().clock(), 100);
}

#[test]
fn every_bit_flip_is_detected_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    sample().save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    for bit in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&path, &bad).unwrap();
        match Store::load(&path, "n1") {
            Ok(_) => panic!("flip of bit {bit} not detected"),
            Err(e) => assert_names(&e, &path),
        }
    }
}

#[test]
fn every_truncation_is_detected_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    sample().save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    for len in 0..good.len() {
        std::fs::write(&path, &good[..len]).unwrap();
        let e = Store::load(&path, "n1").expect_err("truncated file accepted");
        assert_names(&e, &path);
        assert!(matches!(e, MetaError::Corrupt { .. }), "{len}: {e}");
    }
    // trailing garbage too
    let mut long = good.clone();
    long.push(0);
    std::fs::write(&path, &long).unwrap();
    assert_names(&Store::load(&path, "n1").unwrap_err(), &path);
}

/// A well-formed file (valid crc) with the given version and body.
fn craft(version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = b"MARSMETA".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn crafted_file_layout_matches_save() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    std::fs::write(&path, craft(FORMAT_VERSION, br#"{"clock":3,"entries":[["c/d/k",{"stamp":{"clock":2,"node":"n"},"value":7,"deleted_ms":0}]]}"#)).unwrap();
    let s = Store::load(&path, "me").unwrap();
    assert_eq!(s.get("c/d/k"), Some(&json!(7)));
    assert_eq!(s.clock(), 3);
}

#[test]
fn unknown_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    std::fs::write(&path, craft(3, br#"{"clock":0,"entries":[]}"#)).unwrap();
    let e = Store::load(&path, "n1").unwrap_err();
    assert!(
        matches!(e, MetaError::UnsupportedVersion { version: 3, .. }),
        "{e}"
    );
    assert_names(&e, &path);
    assert!(e.to_string().contains("version 3"), "{e}");
}

#[test]
fn bad_content_with_valid_checksum_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.bin");
    let entry = r#"{"stamp":{"clock":2,"node":"n"},"value":7,"deleted_ms":0}"#;
    let bodies = [
        "not json".to_string(),
        r#"{"clock":0}"#.to_string(),
        format!(r#"{{"clock":0,"entries":[["bad key",{entry}]]}}"#),
        format!(r#"{{"clock":0,"entries":[["c/d/k",{entry}],["c/d/k",{entry}]]}}"#),
    ];
    for body in bodies {
        std::fs::write(&path, craft(FORMAT_VERSION, body.as_bytes())).unwrap();
        let e = Store::load(&path, "n1").expect_err(&body);
        assert!(matches!(e, MetaError::Corrupt { .. }), "{e}");
        assert_names(&e, &path);
    }
    std::fs::write(&path, b"something else entirely").unwrap();
    assert_names(&Store::load(&path, "n1").unwrap_err(), &path);
    // Any clock loads (remote clocks are bounded when merged; a store's own
    // writes may pass the merge maximum), and takes another write.
    for body in [
        r#"{"clock":0,"entries":[["c/d/k",{"stamp":{"clock":18446744073709551615,"node":"n"},"value":7,"deleted_ms":0}]]}"#,
        r#"{"clock":18446744073709551615,"entries":[]}"#,
    ] {
        std::fs::write(&path, craft(FORMAT_VERSION, body.as_bytes())).unwrap();
        let mut s = Store::load(&path, "n1").expect(body);
        s.set("c/d/j", serde_json::json!(1));
        s.save(&path).unwrap();
        Store::load(&path, "n1").unwrap();
    }
}

#[test]
fn io_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("meta.bin");
    let e = sample().save(&path).unwrap_err();
    assert!(matches!(e, MetaError::Io { .. }), "{e}");
    assert_names(&e, &path);
    // a directory where the file should be
    let e = Store::load(dir.path(), "n1").unwrap_err();
    assert_names(&e, dir.path());
}
