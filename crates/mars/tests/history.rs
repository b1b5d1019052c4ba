//! One history per resource (issue 15): after a forced failover, no member
//! mixes the old primary's orphaned writes with the new primary's. Three real
//! marsd; alpha primary, beta and gamma up to date.

mod common;
use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn log_field(v: &serde_json::Value, node: &str, field: &str) -> u64 {
    member(v, node)["log"][field].as_u64().unwrap_or(0)
}

/// Separate 4 KiB writes, each flushed, so that each is a record of its own.
fn writes(n: &Node, blocks: &[u64], fill: u8) {
    let mut c = n.nbd("r0");
    for &b in blocks {
        assert_eq!(c.write(b * BLOCK as u64, &[fill; BLOCK], false).unwrap(), 0);
        assert_eq!(c.flush().unwrap(), 0);
    }
}

fn setup() -> (Vec<Node>, Vec<std::path::PathBuf>) {
    let nodes = start_cluster(&["alpha", "beta", "gamma"]);
    let disks = replicate_r0(&nodes, 8 * MIB);
    writes(&nodes[0], &[0, 1], 0x11);
    nodes[0].adm_ok(&["wait-resource", "r0", "uptodate", "--timeout", "60"]);
    (nodes, disks)
}

/// alpha dies (SIGKILL); once beta knows it, beta is forced primary.
fn fail_over_to_beta(nodes: &mut [Node]) {
    nodes[0].kill9();
    nodes[1].wait_view("alpha dead", |v| {
        view_nodes(v)
            .iter()
            .any(|(n, alive)| n == "alpha" && !alive)
    });
    nodes[1].adm_ok(&["primary", "--force", "r0"]);
}

/// beta stops fetching; alpha writes; then alpha dies and beta is forced
/// primary and writes. Returns once beta has written.
fn fork(nodes: &mut [Node], gamma_replays: bool) {
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    if !gamma_replays {
        nodes[2].adm_ok(&["pause-replay", "r0"]);
    }
    // alpha's writes that beta never gets.
    writes(&nodes[0], &[2, 3, 4, 5], 0xaa);
    let written = log_field(&nodes[0].view_json(), "alpha", "written");
    let field = if gamma_replays { "replayed" } else { "fetched" };
    nodes[2].wait_view("gamma has alpha's last writes", |v| {
        log_field(v, "gamma", field) >= written
    });
    fail_over_to_beta(nodes);
    nodes[1].adm_ok(&["resume-fetch", "r0"]);
    // beta's own writes: over some of alpha's blocks and beside them.
    writes(&nodes[1], &[3, 6, 7], 0xbb);
}

/// The case: gamma replayed alpha's writes past the point where beta
/// took over. It must report the split brain (never `uptodate` with another
/// disk than beta's), and `invalidate` makes it beta's image.
#[test]
fn a_member_past_the_fork_reports_split_brain_and_invalidate_repairs_it() {
    let (mut nodes, disks) = setup();
    fork(&mut nodes, true);
    // Two 4 KiB writes before the fork, three by beta after it.
    let beta_written = 2 * 4160 + 3 * 4160;
    nodes[1].wait_view("beta's writes durable", |v| {
        log_field(v, "beta", "written") >= beta_written
    });
    let mut c = nodes[1].nbd("r0");
    let beta_image = c.read(0, (8 * MIB) as u32).unwrap().1;
    drop(c);
    let v = nodes[2].wait_view("gamma reports the split brain", |v| {
        let g = member(v, "gamma");
        let r = resource(v, "r0").unwrap_or(&serde_json::Value::Null);
        if g["disk"] == "uptodate"
            && r["designated_primary"] == "beta"
            && log_field(v, "gamma", "replayed") == beta_written
        {
            // Up to date with beta's history: then it holds beta's image.
            assert!(
                read(&disks[2]) == beta_image,
                "gamma shows uptodate at beta's position with another disk: {v:#}"
            );
        }
        g["split_brain"] == true
    });
    assert_ne!(member(&v, "gamma")["disk"], "uptodate", "{v:#}");
    nodes[2].adm_ok(&["invalidate", "r0"]);
    nodes[2].wait_view("gamma up to date without split brain", |v| {
        member(v, "gamma")["disk"] == "uptodate"
            && member(v, "gamma")["split_brain"] == false
            && log_field(v, "gamma", "replayed") >= beta_written
    });
    assert!(read(&disks[2]) == read(&disks[1]), "gamma equals beta");
    let g = read(&disks[2]);
    assert!(
        g[2 * BLOCK..3 * BLOCK].iter().all(|&b| b == 0),
        "alpha's orphaned write is gone"
    );
    assert!(g[3 * BLOCK..4 * BLOCK].iter().all(|&b| b == 0xbb));
}

/// gamma fetched alpha's writes but had not replayed them: it applies alpha's
/// log only up to the fork and goes on with beta's, with no split brain, and
/// ends equal to beta.
#[test]
fn a_member_behind_the_fork_follows_the_new_primary_exactly() {
    let (mut nodes, disks) = setup();
    fork(&mut nodes, false);
    let beta_written = log_field(&nodes[1].view_json(), "beta", "written");
    // gamma knows of the failover (as an operator would check first).
    nodes[2].wait_view("gamma knows beta is primary", |v| {
        resource(v, "r0").is_some_and(|r| r["designated_primary"] == "beta")
    });
    nodes[2].adm_ok(&["resume-replay", "r0"]);
    let v = nodes[2].wait_view("gamma replays beta's history", |v| {
        assert_ne!(member(v, "gamma")["split_brain"], true, "{v:#}");
        member(v, "gamma")["disk"] == "uptodate"
            && log_field(v, "gamma", "replayed") >= beta_written
    });
    assert!(
        read(&disks[2]) == read(&disks[1]),
        "gamma differs from beta: {v:#}"
    );
    let g = read(&disks[2]);
    assert!(
        g[2 * BLOCK..3 * BLOCK].iter().all(|&b| b == 0),
        "alpha's orphaned write not applied"
    );
}

/// Found by the nemesis: alpha, killed while primary, missed beta's forced
/// failover; restarted, it still held its own log, and a planned handover to
/// it made alpha's history the primary's, dropping what beta wrote since.
/// Now the handover is refused until alpha has become beta's secondary, or,
/// once it has, alpha serves beta's image.
#[test]
fn a_former_primary_that_missed_a_failover_never_takes_over_with_its_own_log() {
    let (mut nodes, _disks) = setup();
    writes(&nodes[0], &[2, 3], 0xaa);
    fail_over_to_beta(&mut nodes);
    writes(&nodes[1], &[3, 4], 0xbb);
    let beta_image = nodes[1].nbd("r0").read(0, (8 * MIB) as u32).unwrap().1;
    nodes[0].start();
    let out = nodes[0].adm(&["primary", "r0"]);
    if out.status.success() {
        let got = nodes[0].nbd("r0").read(0, (8 * MIB) as u32).unwrap().1;
        assert!(
            got == beta_image,
            "alpha took over with another image than beta's: {}\n{:#}\n{}",
            String::from_utf8_lossy(&out.stdout),
            nodes[0].view_json(),
            nodes[0].log_text()
        );
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refused"),
            "{err}\n{:#}\n{}",
            nodes[0].view_json(),
            nodes[0].log_text()
        );
        // Once alpha follows beta, the handover goes through with beta's image.
        nodes[0].wait_view("alpha is beta's secondary", |v| {
            resource(v, "r0").is_some_and(|r| r["designated_primary"] == "beta")
                && member(v, "alpha")["role"] == "secondary"
        });
    }
}

/// Found by the nemesis: right after a forced failover, while the old
/// primary was not known dead yet, the view named the old primary as the
/// one serving and raised the new primary's `written` to the old one's.
#[test]
fn the_view_names_the_new_primary_and_its_own_log_right_after_a_failover() {
    let (mut nodes, _disks) = setup();
    nodes[1].adm_ok(&["pause-fetch", "r0"]);
    writes(&nodes[0], &[2, 3, 4], 0xaa);
    let alpha_written = log_field(&nodes[0].view_json(), "alpha", "written");
    nodes[0].kill9();
    // At once, while alpha still counts as alive.
    nodes[1].adm_ok(&["primary", "--force", "r0"]);
    let v = nodes[1].view_json();
    let r = resource(&v, "r0").expect("r0");
    assert_eq!(r["actual_primary"], "beta", "{v:#}");
    let beta = log_field(&v, "beta", "written");
    assert!(
        beta < alpha_written,
        "beta's own log, not alpha's end: {v:#}"
    );
}

/// Found by the nemesis (seed 13): a planned handover to a member whose fetch
/// was paused hung for two minutes and moved the designation anyway, leaving
/// no primary. Now it is refused up front and nothing changes.
#[test]
fn a_planned_handover_to_a_member_that_does_not_fetch_is_refused() {
    let (nodes, _disks) = setup();
    nodes[2].adm_ok(&["pause-fetch", "r0"]);
    let err = nodes[2].adm_err(&["primary", "r0"]);
    assert!(err.contains("paused"), "{err}");
    let v = nodes[0].view_json();
    let r = resource(&v, "r0").expect("r0");
    assert_eq!(r["designated_primary"], "alpha", "{v:#}");
    assert_eq!(r["actual_primary"], "alpha", "{v:#}");
}
