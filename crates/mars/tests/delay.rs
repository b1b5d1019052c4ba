//! A delayed replica (issue 19): `set-delay RES 5s` on a secondary keeps its
//! disk an image of the primary at least 5 s earlier while fetch goes on;
//! `set-delay RES 0` catches it up.

mod common;
use common::*;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn block(gen: u64) -> Vec<u8> {
    let mut b = vec![0xA5u8; BLOCK];
    b[..8].copy_from_slice(&gen.to_le_bytes());
    b
}

fn gen_at(disk: &[u8], b: usize) -> u64 {
    u64::from_le_bytes(disk[b * BLOCK..b * BLOCK + 8].try_into().unwrap())
}

#[test]
fn a_delayed_replica_is_the_primary_at_least_the_delay_earlier_then_catches_up() {
    let nodes = start_cluster(&["alpha", "beta"]);
    let disks = replicate_r0(&nodes, 4 * MIB);
    let err = nodes[0].adm_err(&["set-delay", "r0", "5s"]);
    assert!(err.contains("primary"), "{err}");
    assert!(nodes[1]
        .adm_err(&["set-delay", "r0", "5x"])
        .contains("unit"));
    nodes[1].adm_ok(&["set-delay", "r0", "5s"]);
    nodes[1].wait_view("beta's delay shown", |v| {
        member(v, "beta")["replay_delay_seconds"] == 5.0
    });
    assert!(nodes[1].adm_ok(&["view", "r0"]).contains("delay 5s"));

    let mut c = nodes[0].nbd("r0");
    let delay = Duration::from_secs(5);
    // Generation k goes to block 0, then to block 1; `sent[k]`: before block 0's write.
    let mut sent: Vec<Instant> = vec![Instant::now()];
    let mut seen_delayed = false;
    let mut applied_max = 0;
    for k in 1..=16u64 {
        sent.push(Instant::now());
        assert_eq!(c.write(0, &block(k), true).unwrap(), 0);
        assert_eq!(c.write(BLOCK as u64, &block(k), true).unwrap(), 0);
        // Pace the writes (not a synchronisation: the load's shape), looking
        // at beta's disk meanwhile.
        let next = Instant::now() + Duration::from_millis(500);
        while Instant::now() < next {
            let now = Instant::now();
            let d = read(&disks[1]);
            let (g0, g1) = (gen_at(&d, 0), gen_at(&d, 1));
            // One moment of the primary: block 1 is written after block 0.
            assert!(
                g1 <= g0 && g0 <= g1 + 1,
                "not an image of the primary: {g0} {g1}"
            );
            if g0 > 0 {
                let age = now.duration_since(sent[g0 as usize]);
                assert!(
                    age >= delay,
                    "generation {g0} applied {age:?} after it was written"
                );
                applied_max = applied_max.max(g0);
            } else if now.duration_since(sent[1]) >= Duration::from_secs(3) {
                seen_delayed = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(seen_delayed, "nothing was held back");
    assert!(
        applied_max > 0,
        "nothing was applied within 8 s with a 5 s delay"
    );
    // Fetch went on: beta holds everything alpha wrote, not replayed yet.
    let v = nodes[1].wait_view("beta fetched all", |v| {
        let (a, b) = (member(v, "alpha"), member(v, "beta"));
        b["log"]["fetched"].as_u64() >= a["log"]["written"].as_u64()
            && b["log"]["replayed"].as_u64() < a["log"]["written"].as_u64()
    });
    assert!(member(&v, "beta")["lag_bytes"].as_u64() > Some(0), "{v:#}");
    // No delay: replay catches up at once.
    nodes[1].adm_ok(&["set-delay", "r0", "0"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "30"]);
    let d = read(&disks[1]);
    assert_eq!((gen_at(&d, 0), gen_at(&d, 1)), (16, 16));
    nodes[1].wait_view("no delay shown", |v| {
        member(v, "beta")["replay_delay_seconds"].is_null()
    });
}

/// A planned handover to a delayed replica is refused up front: its replay
/// would hold the old primary's last writes back for the whole delay, and
/// nobody would serve the device meanwhile (the old primary gives up its
/// role at once).
#[test]
fn a_planned_handover_to_a_delayed_replica_is_refused_and_the_primary_keeps_serving() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    let _disks = replicate_r0(&nodes, 4 * MIB);
    nodes[1].adm_ok(&["set-delay", "r0", "1h"]);
    let mut c = nodes[0].nbd("r0");
    assert_eq!(c.write(0, &block(1), true).unwrap(), 0);
    nodes[1].wait_view("beta's delay shown", |v| {
        member(v, "beta")["replay_delay_seconds"] == 3600.0
    });
    let t = Instant::now();
    let err = nodes[1].adm_err(&["primary", "r0"]);
    assert!(err.contains("set-delay"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // alpha is still the primary and serves.
    assert_eq!(c.write(BLOCK as u64, &block(2), true).unwrap(), 0);
    nodes[0].wait_view("alpha still primary", |v| {
        resource(v, "r0")
            .is_some_and(|r| r["designated_primary"] == "alpha" && r["actual_primary"] == "alpha")
    });
    // A failover to it applies everything it fetched (nothing is lost), and
    // says so.
    nodes[1].wait_view("beta fetched both writes", |v| {
        let (a, b) = (member(v, "alpha"), member(v, "beta"));
        b["log"]["fetched"].as_u64() >= a["log"]["written"].as_u64()
            && a["log"]["written"].as_u64() > Some(0)
    });
    drop(c);
    nodes[0].kill9();
    let out = nodes[1].adm_ok(&["primary", "--force", "r0"]);
    assert!(out.contains("were applied first"), "{out}");
    // The delay is gone with the secondary role.
    let v = nodes[1].view_json();
    let delay = member(&v, "beta")["replay_delay_seconds"].as_f64();
    assert_eq!(delay.unwrap_or(0.0), 0.0, "{v:#}");
    let mut c = nodes[1].nbd("r0");
    let (err, got) = c.read(0, 2 * BLOCK as u32).unwrap();
    assert_eq!(err, 0);
    assert_eq!(got, [block(1), block(2)].concat(), "a fetched write lost");
}
