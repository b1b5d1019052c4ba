//! Metadata an operator can trust (issue 16): resource and node identities
//! across merges, clocks that cannot be poisoned, and commands whose effect
//! is visible on the next node as soon as they return.

mod common;
use common::*;
use mars_proto::WireEntry;

const SIZE: u64 = 4 << 20;

/// Push `entries` to `to` as a peer of its cluster would: as `to` itself,
/// with its own certificate (a tool node would stay in the cluster as a dead
/// node).
fn push(to: &Node, entries: Vec<WireEntry>) {
    to.push_as(to, entries);
}

fn entry(key: &str, clock: u64) -> WireEntry {
    WireEntry {
        key: key.into(),
        clock,
        node: "tool".into(),
        value: Some(serde_json::json!(clock)),
        deleted_ms: 0,
    }
}

fn nbd_write(n: &Node, res: &str, offset: u64, fill: u8) {
    let mut c = n.nbd(res);
    c.write(offset, &vec![fill; 4096], true).unwrap();
    assert_eq!(c.flush().unwrap(), 0);
}

fn nbd_read(n: &Node, res: &str, offset: u64) -> Vec<u8> {
    let (err, data) = n.nbd(res).read(offset, 4096).unwrap();
    assert_eq!(err, 0, "read error from {}", n.name);
    data
}

/// Cluster X serves r0 on alpha, replicated to beta. Cluster Y once had an r0
/// and deleted it, and a node named beta that left; its clocks are far
/// ahead of X's. After the merge, X's r0 and X's beta are untouched on every
/// node: the tombstones name the deleted incarnation and the node that left.
#[test]
fn a_merge_never_deletes_a_live_resource_or_node_of_the_same_name() {
    let x = start_cluster(&["alpha", "beta"]);
    let d = x[0].disk("r0.img", SIZE);
    x[0].adm_ok(&["create-resource", "r0", d.to_str().unwrap()]);
    let d = x[1].disk("r0.img", SIZE);
    x[1].adm_ok(&["join-resource", "r0", d.to_str().unwrap()]);
    nbd_write(&x[0], "r0", 8192, 0x5a);
    x[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);

    let y = start_cluster(&["gamma", "beta"]);
    // Y's clock far ahead of X's (a long-lived cluster).
    push(
        &y[0],
        vec![entry("c/d/size/ahead@0000000000000001", 1_000_000)],
    );
    let d = y[0].disk("y0.img", SIZE);
    y[0].adm_ok(&["create-resource", "r0", d.to_str().unwrap()]);
    y[0].adm_ok(&["delete-resource", "r0"]);
    y[0].adm_ok(&["create-resource", "r9", d.to_str().unwrap()]);
    y[1].adm_ok(&["leave-cluster"]);
    y[0].wait_view("Y's beta gone", |v| view_nodes(v).len() == 1);

    let t = y[0].adm_ok(&["invite", "--merge"]);
    x[0].adm_ok(&["merge-cluster", "--token", t.trim(), &y[0].listen]);
    // alpha holds Y's entries now; `up` converges it at once.
    x[0].adm_ok(&["up", "r0"]);
    for n in [&x[0], &x[1], &y[0]] {
        let v = n.wait_view("r9 known after the merge", |v| {
            resource(v, "r9").is_some() && all_alive(v, &["alpha", "beta", "gamma"])
        });
        let r0 = resource(&v, "r0").unwrap_or_else(|| panic!("{}: r0 is gone: {v:#}", n.name));
        assert_eq!(
            r0["actual_primary"],
            "alpha",
            "{}: {v:#}\n{}",
            n.name,
            n.log_text()
        );
        let beta = v["cluster"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "beta")
            .unwrap();
        assert_eq!(beta["address"], x[1].listen.as_str(), "X's beta is the one");
    }
    // Still served and replicated, logs and all.
    assert_eq!(nbd_read(&x[0], "r0", 8192), vec![0x5a; 4096]);
    nbd_write(&x[0], "r0", 0, 0x33);
    x[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    assert!(x[0].dir.join("resources/r0").is_dir());
    assert!(x[1].dir.join("resources/r0").is_dir());
    for l in [x[0].log_text(), x[1].log_text()] {
        assert!(!l.contains("resource deleted"), "{l}");
    }
}

/// A single wild clock is refused with a logged reason; so is a batch that
/// walks the clock up in legal steps (only its first step is taken); local
/// writes go on and the node restarts. (A store at the very maximum still
/// loads and takes writes: mars-meta's unit tests.)
#[test]
fn a_clock_at_the_maximum_does_not_stop_a_node_and_a_wild_one_is_refused() {
    let mut n = start_cluster(&["alpha"]);
    let max = mars_meta::MAX_CLOCK;
    let step = mars_meta::MAX_JUMP;
    // One entry far ahead: refused, nothing changes.
    push(
        &n[0],
        vec![entry("c/d/size/wild@0000000000000001", step * 4)],
    );
    assert!(n[0].log_text().contains("metadata entry refused"));
    // Climb to the maximum in steps each within the limit of the one before.
    let mut climb = Vec::new();
    let mut c = 0;
    while c < max {
        c = (c + step).min(max);
        climb.push(entry("c/d/size/climb@0000000000000001", c));
    }
    push(&n[0], climb);
    let d = n[0].disk("r0.img", SIZE);
    n[0].adm_ok(&["create-resource", "r0", d.to_str().unwrap()]);
    nbd_write(&n[0], "r0", 0, 0x11);
    n[0].kill9();
    n[0].start();
    n[0].wait_view("alpha back", |v| {
        resource(v, "r0").is_some_and(|r| r["actual_primary"] == "alpha")
    });
    assert_eq!(nbd_read(&n[0], "r0", 0), vec![0x11; 4096]);
    let d = n[0].disk("r1.img", SIZE);
    n[0].adm_ok(&["create-resource", "r1", d.to_str().unwrap()]);
    n[0].stop();
    n[0].start();
    n[0].wait_view("r1 after a restart", |v| resource(v, "r1").is_some());
}

/// The README's steps back to back, each on another node, with no waits in
/// between: every command sees what the one before did.
#[test]
fn commands_see_the_effect_of_the_one_before_on_any_node() {
    let n = start_cluster(&["alpha", "beta", "gamma"]);
    let d = n[0].disk("r0.img", SIZE);
    n[0].adm_ok(&["create-resource", "r0", d.to_str().unwrap()]);
    nbd_write(&n[0], "r0", 4096, 0x42);
    // beta has not heard of r0 yet: it asks instead of refusing.
    let d = n[1].disk("r0.img", SIZE);
    n[1].adm_ok(&["join-resource", "r0", d.to_str().unwrap()]);
    // The primary knows beta joined: this waits for beta's sync.
    n[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let v = n[0].view_json();
    let m = member(&v, "beta");
    assert_eq!(m["disk"], "uptodate", "{v:#}");
    assert!(
        m["log"]["replayed"].as_u64().unwrap_or(0) >= v_written(&v),
        "{v:#}"
    );
    // gamma joins; wait-resource on beta (not the primary) sees gamma too.
    let d = n[2].disk("r0.img", SIZE);
    n[2].adm_ok(&["join-resource", "r0", d.to_str().unwrap()]);
    n[1].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    let v = n[1].view_json();
    assert_eq!(member(&v, "gamma")["disk"], "uptodate", "{v:#}");
    // Handover on gamma, then the device on gamma at once.
    n[2].adm_ok(&["primary", "r0"]);
    assert_eq!(nbd_read(&n[2], "r0", 4096), vec![0x42; 4096]);
    // pause on beta, visible in alpha's view at once.
    n[1].adm_ok(&["pause-replay", "r0"]);
    let v = n[0].view_json();
    assert_eq!(member(&v, "beta")["paused"]["replay"], true, "{v:#}");
    n[1].adm_ok(&["resume-replay", "r0"]);
    // beta leaves; gamma's wait-resource does not wait for it.
    n[1].adm_ok(&["leave-resource", "r0"]);
    let v = n[2].view_json();
    assert!(member(&v, "beta").is_null(), "{v:#}");
    n[2].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    // Deleted on gamma; created again on beta at once, under the same name.
    n[0].adm_ok(&["leave-resource", "r0"]);
    n[2].adm_ok(&["delete-resource", "r0"]);
    let d = n[1].disk("again.img", SIZE);
    n[1].adm_ok(&["create-resource", "r0", d.to_str().unwrap()]);
    let d = n[0].disk("again.img", SIZE);
    n[0].adm_ok(&["join-resource", "r0", d.to_str().unwrap()]);
    n[1].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    // gamma names r0 (it has not heard of the new one): it asks.
    let v: serde_json::Value =
        serde_json::from_str(&n[2].adm_ok(&["view", "r0", "--json"])).unwrap();
    let r = resource(&v, "r0").expect("the new r0");
    assert_eq!(r["actual_primary"], "beta", "{v:#}");
}

fn v_written(v: &serde_json::Value) -> u64 {
    member(v, "alpha")["log"]["written"].as_u64().unwrap_or(0)
}

/// `create-resource r0` on both sides of a cut: after the heal both
/// incarnations live on, each served by its member, and every view names the
/// clash; deleting one by `NAME@ID` leaves the other alone.
#[test]
fn a_name_made_twice_in_a_partition_is_a_clash_both_served_until_one_goes() {
    let n = start_cluster(&["alpha", "beta"]);
    n[0].adm_ok(&["debug-block", "beta"]);
    n[1].adm_ok(&["debug-block", "alpha"]);
    let down = |who: &'static str| {
        move |v: &serde_json::Value| view_nodes(v).iter().any(|(x, a)| x == who && !a)
    };
    n[0].wait_view("beta down", down("beta"));
    n[1].wait_view("alpha down", down("alpha"));
    for (i, fill) in [(0usize, 0xa1u8), (1, 0xb2)] {
        let d = n[i].disk("r0.img", SIZE);
        n[i].adm_ok(&["create-resource", "r0", d.to_str().unwrap()]);
        nbd_write(&n[i], "r0", 0, fill);
    }
    n[0].adm_ok(&["debug-unblock", "beta"]);
    n[1].adm_ok(&["debug-unblock", "alpha"]);
    let clash = |v: &serde_json::Value| {
        v["resources"].as_array().is_some_and(|rs| {
            rs.iter()
                .filter(|r| r["name"] == "r0" && r["clash"].is_string())
                .count()
                == 2
        })
    };
    let v = n[0].wait_view("the clash in alpha's view", clash);
    n[1].wait_view("the clash in beta's view", clash);
    // Each member goes on serving its own.
    assert_eq!(nbd_read(&n[0], "r0", 0), vec![0xa1; 4096]);
    assert_eq!(nbd_read(&n[1], "r0", 0), vec![0xb2; 4096]);
    // Delete beta's, by its incarnation, on alpha.
    let betas = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "r0" && r["members"][0]["node"] == "beta")
        .unwrap()["incarnation"]
        .as_str()
        .unwrap()
        .to_string();
    n[0].adm_ok(&["delete-resource", &betas]);
    for x in &n {
        x.wait_view("one r0 left", |v| {
            v["resources"].as_array().is_some_and(|rs| {
                rs.len() == 1 && rs[0]["name"] == "r0" && rs[0]["clash"].is_null()
            })
        });
    }
    assert_eq!(nbd_read(&n[0], "r0", 0), vec![0xa1; 4096]);
    wait_for(
        "beta's copy removed",
        std::time::Duration::from_secs(30),
        || !n[1].dir.join("resources/r0").exists(),
    );
}
