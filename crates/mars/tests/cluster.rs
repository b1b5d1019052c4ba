//! Several real marsd processes on loopback: join, gossip, liveness, merge, refusals, partitions.

mod common;
use common::*;
use mars_proto::{client_handshake, read_msg, write_msg, Msg, NodeInfo, ProtoError};

fn start_cluster(names: &[&str]) -> Vec<Node> {
    let nodes = common::start_cluster(names);
    for n in &nodes {
        n.adm_ok(&["wait-cluster", "--timeout", "30"]);
    }
    nodes
}

#[test]
fn join_view_agrees_primary_spreads_dead_node_catches_up() {
    let names = ["alpha", "beta", "gamma"];
    let mut nodes = start_cluster(&names);
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| n.view_json()["cluster"]["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "one cluster id: {ids:?}");
    for n in &nodes {
        let v = n.view_json();
        for other in &nodes {
            let entry = v["cluster"]["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == other.name.as_str())
                .unwrap();
            assert_eq!(
                entry["address"],
                other.listen.as_str(),
                "{} sees {}'s address",
                n.name,
                other.name
            );
        }
    }

    // A resource created on alpha is seen everywhere; primary issued on beta changes the designated primary everywhere.
    let disk = nodes[0].disk("r0.img", 8 << 20);
    nodes[0].adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    for n in &nodes {
        n.wait_view("r0 with primary alpha", |v| {
            resource(v, "r0").is_some_and(|r| r["designated_primary"] == "alpha")
        });
    }
    nodes[1].adm_ok(&["primary", "r0"]);
    for n in &nodes {
        n.wait_view("designated primary beta", |v| {
            resource(v, "r0").is_some_and(|r| r["designated_primary"] == "beta")
        });
    }
    // alpha stopped serving once it was no longer the designated primary.
    nodes[0].wait_view("alpha not serving", |v| {
        resource(v, "r0").is_some_and(|r| r["actual_primary"].is_null())
    });

    // gamma dies: shown dead. A change made meanwhile reaches it after restart.
    nodes[2].kill9();
    for n in &nodes[..2] {
        n.wait_view("gamma dead", |v| {
            view_nodes(v).contains(&("gamma".to_string(), false))
        });
    }
    let disk1 = nodes[0].disk("r1.img", 8 << 20);
    nodes[0].adm_ok(&["create-resource", "r1", disk1.to_str().unwrap()]);
    nodes[2].start();
    nodes[2].wait_view("gamma catches up", |v| {
        resource(v, "r1").is_some() && all_alive(v, &names)
    });
    for n in &nodes[..2] {
        n.wait_view("gamma alive again", |v| all_alive(v, &names));
    }
    // alpha takes r0 back (beta is alive, so no --force is needed).
    nodes[0].adm_ok(&["primary", "r0"]);
    nodes[0].adm_ok(&["wait-resource", "r0", "primary", "--timeout", "20"]);
    for n in &nodes {
        n.wait_view("designated primary alpha", |v| {
            resource(v, "r0").is_some_and(|r| {
                r["designated_primary"] == "alpha" && r["actual_primary"] == "alpha"
            })
        });
    }
}

#[test]
fn clusters_merge_and_overlapping_names_are_refused() {
    let a = start_cluster(&["alpha", "beta"]);
    let b = start_cluster(&["gamma", "delta"]);
    let da = a[0].disk("ra.img", 4 << 20);
    a[0].adm_ok(&["create-resource", "ra", da.to_str().unwrap()]);
    let db = b[0].disk("rb.img", 4 << 20);
    b[0].adm_ok(&["create-resource", "rb", db.to_str().unwrap()]);

    // A third cluster holding a resource named like one of A's: refused, nothing changes.
    let c = start_cluster(&["epsilon"]);
    let dc = c[0].disk("ra.img", 4 << 20);
    c[0].adm_ok(&["create-resource", "ra", dc.to_str().unwrap()]);
    let c_id = c[0].view_json()["cluster"]["id"].clone();
    let t = c[0].adm_ok(&["invite", "--merge"]);
    let err = a[0].adm_err(&["merge-cluster", "--token", t.trim(), &c[0].listen]);
    assert!(err.contains("ra") && err.contains("both"), "{err}");
    assert_eq!(c[0].view_json()["cluster"]["id"], c_id);
    assert_eq!(view_nodes(&a[0].view_json()).len(), 2);

    // A and B merge into A's cluster.
    let a_id = a[0].view_json()["cluster"]["id"].clone();
    let t = b[0].adm_ok(&["invite", "--merge"]);
    a[0].adm_ok(&["merge-cluster", "--token", t.trim(), &b[0].listen]);
    let names = ["alpha", "beta", "delta", "gamma"];
    for n in a.iter().chain(b.iter()) {
        n.wait_view("one merged cluster", |v| {
            all_alive(v, &names)
                && v["cluster"]["id"] == a_id
                && resource(v, "ra").is_some()
                && resource(v, "rb").is_some()
        });
    }
    // The merge survives a restart of a node of the absorbed cluster.
    let mut b = b;
    b[1].kill9();
    b[1].start();
    b[1].wait_view("delta back in the merged cluster", |v| {
        v["cluster"]["id"] == a_id && all_alive(v, &names)
    });
}

#[test]
fn peers_of_other_versions_or_names_are_refused() {
    let nodes = start_cluster(&["alpha"]);
    // An insider: a node directory of this cluster (never started), with its certificate.
    let tool = tool_member("tool", &nodes[0]);
    let before = nodes[0].view_json();
    let me = tool.info();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Another protocol version: refused at the handshake.
        let mut s = tool.tls_connect(&nodes[0].listen).await.unwrap();
        let id = before["cluster"]["id"].as_str().unwrap().to_string();
        write_msg(
            &mut s,
            &Msg::Hello {
                version: 99,
                cluster_id: Some(id.clone()),
                node: me.clone(),
            },
        )
        .await
        .unwrap();
        match read_msg(&mut s).await.unwrap() {
            Msg::Refused { reason } => assert!(reason.contains("version"), "{reason}"),
            other => panic!("expected Refused, got {other:?}"),
        }
        // A Hello that claims another node than the certificate: refused.
        let mut s = tool.tls_connect(&nodes[0].listen).await.unwrap();
        let err = client_handshake(
            &mut s,
            Some(&id),
            &NodeInfo {
                name: "alpha".into(),
                ..me.clone()
            },
        )
        .await
        .unwrap_err();
        assert!(format!("{err}").contains("certificate"), "{err}");
        // Garbage: the connection is closed, nothing else happens.
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(&nodes[0].listen)
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxx")
            .await
            .unwrap();
        assert!(matches!(
            read_msg(&mut s).await,
            Err(ProtoError::Io(_)) | Err(_)
        ));
        // A join under a name already in the cluster is refused (and does
        // not use up the token).
        let token = nodes[0].adm_ok(&["invite"]);
        let err = mars::peer::join(
            &nodes[0].listen,
            &NodeInfo {
                name: "alpha".into(),
                id: 99,
                ..me.clone()
            },
            token.trim(),
        )
        .await
        .err()
        .expect("refused");
        assert!(
            format!("{err:#}").contains("already in the cluster"),
            "{err:#}"
        );
    });
    // Garbage datagrams on the gossip port are dropped too.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"not a mars datagram at all", &nodes[0].listen)
        .unwrap();
    let after = nodes[0].view_json();
    assert_eq!(view_nodes(&after), view_nodes(&before), "nothing changed");
    assert!(nodes[0].log_text().contains("refusing peer"));
}

#[test]
fn partitioned_groups_agree_on_one_winner_after_healing() {
    let names = ["alpha", "beta", "gamma", "delta"];
    let nodes = start_cluster(&names);
    let disk = nodes[0].disk("r0.img", 4 << 20);
    nodes[0].adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    for n in &nodes {
        n.wait_view("r0 everywhere", |v| resource(v, "r0").is_some());
    }
    // Cut {alpha, beta} from {gamma, delta}.
    for (side, other) in [
        (&nodes[..2], ["gamma", "delta"]),
        (&nodes[2..], ["alpha", "beta"]),
    ] {
        for n in side {
            n.adm_ok(&["debug-block", other[0], other[1]]);
        }
    }
    for n in &nodes[..2] {
        n.wait_view("the other side dead", |v| {
            view_nodes(v).iter().filter(|(_, a)| !a).count() == 2
        });
    }
    // Both sides change the same key: the designated primary of r0.
    nodes[1].adm_ok(&["primary", "r0"]);
    nodes[2].adm_ok(&["primary", "--force", "r0"]);
    // Heal.
    for n in &nodes {
        let others: Vec<&str> = names.iter().copied().filter(|x| *x != n.name).collect();
        let mut args = vec!["debug-unblock"];
        args.extend(others);
        n.adm_ok(&args);
    }
    for n in &nodes {
        n.wait_view("healed", |v| all_alive(v, &names));
    }
    let winner = nodes[0].wait_view("a winner", |v| {
        resource(v, "r0").is_some_and(|r| r["designated_primary"].is_string())
    });
    let _ = winner;
    // Every node ends with the same winner (one of the two writes).
    let seen = || -> Vec<serde_json::Value> {
        nodes
            .iter()
            .map(|n| {
                resource(&n.view_json(), "r0")
                    .map(|r| r["designated_primary"].clone())
                    .unwrap_or_default()
            })
            .collect()
    };
    let agreed = poll(std::time::Duration::from_secs(30), || {
        let s = seen();
        s.iter().all(|x| *x == s[0]) && (s[0] == "beta" || s[0] == "gamma")
    });
    assert!(agreed, "nodes disagree after healing: {:?}", seen());
}

#[test]
fn leave_cluster_is_refused_for_members_and_removes_the_node() {
    let names = ["alpha", "beta", "gamma"];
    let mut nodes = start_cluster(&names);
    let disk = nodes[2].disk("r0.img", 4 << 20);
    nodes[2].adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    let err = nodes[2].adm_err(&["leave-cluster"]);
    assert!(err.contains("member of r0"), "{err}");
    nodes[2].adm_ok(&["delete-resource", "r0"]);
    nodes[2].adm_ok(&["leave-cluster"]);
    for n in &nodes[..2] {
        n.wait_view("gamma gone", |v| {
            view_nodes(v).iter().all(|(name, _)| name != "gamma")
        });
        n.adm_ok(&["wait-cluster", "--timeout", "10"]);
    }
    assert!(
        !nodes[2].dir.join("node.json").exists(),
        "the directory is no longer a node"
    );
    nodes[2].kill9();
    // wait-cluster times out while a node is down.
    nodes[1].kill9();
    nodes[0].wait_view("beta dead", |v| {
        view_nodes(v).contains(&("beta".to_string(), false))
    });
    let err = nodes[0].adm_err(&["wait-cluster", "--timeout", "1"]);
    assert!(err.contains("timed out"), "{err}");
}
