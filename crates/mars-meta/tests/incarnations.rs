//! Randomized histories of resource incarnations (issue 16): concurrent
//! create, delete and re-create of same-named resources, joins and leaves on
//! several nodes, partitions (each side its own history, as two clusters
//! before a merge) and heals, with entries exchanged in any order. At the
//! end every store is the same, and an incarnation is gone exactly when a
//! `delete-resource` of that very incarnation was issued: never because
//! another incarnation of its name was deleted.

use mars_meta::schema::{self, ResRef};
use mars_meta::Store;
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeSet;

const NODES: usize = 4;
const NAMES: [&str; 2] = ["r0", "r1"];

#[derive(Clone, Debug)]
enum Op {
    Create { node: usize, name: usize },
    Delete { node: usize, name: usize },
    Join { node: usize, name: usize },
    Leave { node: usize, name: usize },
    Sync { from: usize, to: usize },
    Partition { side: u8 },
    Heal,
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NODES;
    let r = 0..NAMES.len();
    prop_oneof![
        3 => (n.clone(), r.clone()).prop_map(|(node, name)| Op::Create { node, name }),
        2 => (n.clone(), r.clone()).prop_map(|(node, name)| Op::Delete { node, name }),
        2 => (n.clone(), r.clone()).prop_map(|(node, name)| Op::Join { node, name }),
        1 => (n.clone(), r).prop_map(|(node, name)| Op::Leave { node, name }),
        6 => (n.clone(), n).prop_map(|(from, to)| Op::Sync { from, to }),
        1 => any::<u8>().prop_map(|side| Op::Partition { side }),
        1 => Just(Op::Heal),
    ]
}

/// Everything `from` holds, merged into `to`, in a shuffled order (`seed`).
fn sync(stores: &mut [Store], from: usize, to: usize, seed: u64) {
    if from == to {
        return;
    }
    let mut entries: Vec<(String, mars_meta::Entry)> = stores[from]
        .range("")
        .map(|(k, e)| (k.to_string(), e.clone()))
        .collect();
    // A fixed shuffle: gossip delivers in any order.
    let n = entries.len();
    for i in 0..n {
        let j = (seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(i as u64)
            % n as u64) as usize;
        entries.swap(i, j);
    }
    for (k, e) in entries {
        stores[to].merge(&k, e);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn incarnations_are_deleted_only_by_their_own_delete_and_all_converge(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        let mut stores: Vec<Store> = (0..NODES).map(|i| Store::new(&format!("n{i}"))).collect();
        let mut created: BTreeSet<ResRef> = BTreeSet::new();
        let mut deleted: BTreeSet<ResRef> = BTreeSet::new();
        let mut next_id = 1u64;
        let mut side = 0u8;
        let same_side = |side: u8, a: usize, b: usize| (side >> a) & 1 == (side >> b) & 1;
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Create { node, name } => {
                    let s = &mut stores[node];
                    let me = format!("n{node}");
                    if schema::resource(s, NAMES[name]).is_none() {
                        let rr = ResRef::new(NAMES[name], next_id);
                        next_id += 1;
                        let created_clock = s.clock() + 1;
                        s.set(&schema::res_key(&rr), json!({
                            "size": 1, "resource_id": rr.id, "created": created_clock
                        }));
                        s.set(&schema::membership_key(&rr, &me), json!(true));
                        s.set(&schema::primary_key(&rr), json!(me));
                        created.insert(rr);
                    }
                }
                Op::Delete { node, name } => {
                    let s = &mut stores[node];
                    if let Some((rr, _)) = schema::resource(s, NAMES[name]) {
                        for k in schema::keys_of(s, &rr) {
                            s.delete(&k, 1000);
                        }
                        deleted.insert(rr);
                    }
                }
                Op::Join { node, name } => {
                    let s = &mut stores[node];
                    let me = format!("n{node}");
                    if let Some((rr, r)) = schema::resource(s, NAMES[name]) {
                        if !r.members.contains(&me) {
                            s.set(&schema::membership_key(&rr, &me), json!(true));
                            s.set(&schema::member_key(&rr, &me), json!({"disk": "/d"}));
                        }
                    }
                }
                Op::Leave { node, name } => {
                    let s = &mut stores[node];
                    let me = format!("n{node}");
                    if let Some((rr, r)) = schema::resource(s, NAMES[name]) {
                        if r.members.contains(&me) && r.members.len() > 1 {
                            s.delete(&schema::membership_key(&rr, &me), 1000);
                            s.delete(&schema::member_key(&rr, &me), 1000);
                        }
                    }
                }
                Op::Sync { from, to } => {
                    if same_side(side, from, to) {
                        sync(&mut stores, from, to, step as u64);
                    }
                }
                Op::Partition { side: s } => side = s,
                Op::Heal => side = 0,
            }
        }
        // Heal and exchange until everyone has everything.
        for round in 0..2 {
            for from in 0..NODES {
                for to in 0..NODES {
                    sync(&mut stores, from, to, round);
                }
            }
        }
        let all = |s: &Store| -> Vec<(String, mars_meta::Entry)> {
            s.range("").map(|(k, e)| (k.to_string(), e.clone())).collect()
        };
        let first = all(&stores[0]);
        for s in &stores[1..] {
            prop_assert!(all(s) == first, "stores differ after healing");
        }
        let s = &stores[0];
        for rr in &created {
            let live = schema::incarnation(s, rr).is_some();
            prop_assert_eq!(
                live,
                !deleted.contains(rr),
                "{} live={} deleted={}", rr, live, deleted.contains(rr)
            );
        }
        // Nothing live that nobody created, and every name resolves to a
        // live incarnation of it.
        let mut live: Vec<ResRef> = schema::resources(s).into_iter().map(|(r, _)| r).collect();
        live.extend(schema::shadowed(s).into_iter().map(|(r, _)| r));
        for rr in &live {
            prop_assert!(created.contains(rr) && !deleted.contains(rr), "{}", rr);
        }
    }
}
