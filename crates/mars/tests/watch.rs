//! `marsadm view --watch --json` (issue 19): the state, then one JSON object
//! per change. Read while a sync, a handover and a SIGKILL of a secondary
//! happen: each event is there once, in order.

mod common;
use common::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn watch_reports_a_sync_a_handover_and_a_kill_once_each_in_order() {
    let mut nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let size = 128 * MIB;
    let a_disk = nodes[0].disk("a.img", size);
    nodes[0].adm_ok(&["create-resource", "r0", a_disk.to_str().unwrap()]);
    // Data for gamma's sync to copy (it must take more than a tick of the watch).
    let mut c = nodes[0].nbd("r0");
    let chunk = vec![0x5Au8; 1 << 20];
    for i in 0..96u64 {
        assert_eq!(c.write(i * MIB, &chunk, i == 95).unwrap(), 0);
    }
    drop(c);
    nodes[1].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let b_disk = nodes[1].disk("b.img", size);
    nodes[1].adm_ok(&["join-resource", "r0", b_disk.to_str().unwrap()]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);

    let mut child = Command::new(MARSADM)
        .arg("--dir")
        .arg(&nodes[1].dir)
        .args(["view", "r0", "--watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("marsadm view --watch");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value =
                serde_json::from_str(&line).expect("one JSON object per line");
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the state first");
    assert!(resource(&first, "r0").is_some(), "{first}");
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut until = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !events.iter().any(pred) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(e) => events.push(e),
                Err(_) => panic!("no {what} event; got {events:#?}"),
            }
        }
    };
    let is = |ev: &'static str, node: &'static str| {
        move |e: &serde_json::Value| e["event"] == ev && e["node"] == node
    };

    // A sync: gamma joins.
    nodes[2].wait_view("r0 known", |v| resource(v, "r0").is_some());
    let g_disk = nodes[2].disk("g.img", size);
    nodes[2].adm_ok(&["join-resource", "r0", g_disk.to_str().unwrap()]);
    until("sync-end of gamma", &is("sync-end", "gamma"));
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    // A handover to beta.
    nodes[1].adm_ok(&["primary", "r0"]);
    until("beta primary", &is("role", "beta"));
    until("alpha secondary", &is("role", "alpha"));
    // gamma killed.
    nodes[2].kill9();
    until("gamma down", &is("node-down", "gamma"));
    // A moment more for anything that would come twice.
    while let Ok(e) = rx.recv_timeout(Duration::from_secs(2)) {
        events.push(e);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();

    let pos = |ev: &str, node: &str| -> usize {
        let hits: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e["event"] == ev && e["node"] == node)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(hits.len(), 1, "{ev} of {node} once: {events:#?}");
        hits[0]
    };
    let join = pos("member-join", "gamma");
    let start = pos("sync-start", "gamma");
    let end = pos("sync-end", "gamma");
    let beta = pos("role", "beta");
    let alpha = pos("role", "alpha");
    let down = pos("node-down", "gamma");
    assert!(join <= start && start < end, "{events:#?}");
    assert!(
        end < beta.min(alpha) && beta.max(alpha) < down,
        "{events:#?}"
    );
    assert_eq!(events[beta]["new"], "primary");
    assert_eq!(events[alpha]["new"], "secondary");
    assert_eq!(events[end]["old"]["total"], size);
    // The actual primary goes to beta (through none while neither serves).
    let primary: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "primary" && !e["new"].is_null())
        .collect();
    assert_eq!(primary.len(), 1, "{events:#?}");
    assert_eq!(primary[0]["new"], "beta");
    for e in &events {
        assert!(e["ts_ms"].as_u64().is_some(), "a timestamp: {e}");
    }
    nodes[2].start();
}
