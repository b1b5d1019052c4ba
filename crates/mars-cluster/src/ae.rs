//! Anti-entropy between two stores, as a pure message step.
//!
//! The initiator sends [`start`]; then both sides feed every message they
//! receive to [`respond`], merge the entries it returns, and send its reply
//! (if any) back. When two stores agree, the exchange is one digest and
//! `InSync` (a few dozen bytes, whatever the store size); otherwise the
//! bucket digests (64 x 16 bytes) and the entries of differing buckets only.
//!
//! ```text
//! A -> B  Digest(prefix, dA)
//! B -> A  InSync                      if dA == dB
//!         Buckets(prefix, [dB_i])     else
//! A -> B  Entries(A's entries in differing buckets, want = those buckets)
//! B -> A  Entries(B's entries in the wanted buckets, want = [])
//! ```

use crate::to_wire;
use mars_meta::{Store, BUCKETS};
use mars_proto::{Msg, WireEntry};

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn start(store: &Store, prefix: &str) -> Msg {
    Msg::Digest {
        prefix: prefix.to_string(),
        digest: hex(&store.digest(prefix)),
    }
}

fn entries(store: &Store, prefix: &str, buckets: &[u16]) -> Vec<WireEntry> {
    store
        .entries_in_buckets(prefix, buckets)
        .iter()
        .map(|(k, e)| to_wire(k, e))
        .collect()
}

/// Keep only entries under `prefix`: a peer cannot plant other keys through an exchange.
fn within(prefix: &str, entries: Vec<WireEntry>) -> Vec<WireEntry> {
    entries
        .into_iter()
        .filter(|w| mars_meta::scope_prefix(&w.key) == Some(prefix))
        .collect()
}

/// Handle one anti-entropy (or push/pull) message: the reply to send, and the entries to merge.
pub fn respond(store: &Store, msg: Msg) -> (Option<Msg>, Vec<WireEntry>) {
    match msg {
        Msg::Digest { prefix, digest } => {
            if digest == hex(&store.digest(&prefix)) {
                (Some(Msg::InSync), Vec::new())
            } else {
                let digests = store
                    .bucket_digests(&prefix)
                    .iter()
                    .map(|d| hex(d))
                    .collect();
                (Some(Msg::Buckets { prefix, digests }), Vec::new())
            }
        }
        Msg::Buckets { prefix, digests } => {
            let mine = store.bucket_digests(&prefix);
            let want: Vec<u16> = (0..BUCKETS)
                .filter(|&i| digests.get(i).map(String::as_str) != Some(hex(&mine[i]).as_str()))
                .map(|i| i as u16)
                .collect();
            if want.is_empty() {
                return (None, Vec::new());
            }
            let entries = entries(store, &prefix, &want);
            (
                Some(Msg::Entries {
                    prefix,
                    entries,
                    want,
                }),
                Vec::new(),
            )
        }
        Msg::Entries {
            prefix,
            entries: theirs,
            want,
        } => {
            let scope = prefix.clone();
            let want: Vec<u16> = want
                .into_iter()
                .filter(|&b| (b as usize) < BUCKETS)
                .collect();
            let reply = (!want.is_empty()).then(|| Msg::Entries {
                entries: entries(store, &prefix, &want),
                prefix,
                want: Vec::new(),
            });
            (reply, within(&scope, theirs))
        }
        Msg::Push { entries } => (Some(Msg::Ok), entries),
        Msg::Pull { prefix } => {
            let all: Vec<u16> = (0..BUCKETS as u16).collect();
            (
                Some(Msg::Entries {
                    entries: entries(store, &prefix, &all),
                    prefix,
                    want: Vec::new(),
                }),
                Vec::new(),
            )
        }
        _ => (None, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::from_wire;
    use serde_json::json;

    /// Run a whole exchange between two stores in memory.
    fn exchange(a: &mut Store, b: &mut Store, prefix: &str) -> usize {
        let mut msgs = 0;
        let mut to_b = Some(start(a, prefix));
        while let Some(m) = to_b.take() {
            msgs += 1;
            let (reply, merge) = respond(b, m);
            for w in merge {
                let (k, e) = from_wire(w);
                b.merge(&k, e);
            }
            let Some(r) = reply else { break };
            msgs += 1;
            let (next, merge) = respond(a, r);
            for w in merge {
                let (k, e) = from_wire(w);
                a.merge(&k, e);
            }
            to_b = next;
        }
        msgs
    }

    #[test]
    fn stores_converge_and_agreeing_stores_exchange_two_messages() {
        let mut a = Store::new("a");
        let mut b = Store::new("b");
        for i in 0..100 {
            a.set(&format!("c/d/node/n{i}"), json!(i));
        }
        b.set("c/d/node/n5", json!("newer"));
        b.set("c/d/res/r1", json!({"members": ["b"]}));
        b.set("r/r1/d/primary", json!("b"));
        exchange(&mut a, &mut b, "c/");
        assert_eq!(a.digest("c/"), b.digest("c/"));
        // a wrote n5 with clock 6, b with clock 1: a's write wins on both sides.
        assert_eq!(a.get("c/d/node/n5"), Some(&json!(5)));
        assert_eq!(b.get("c/d/node/n5"), Some(&json!(5)));
        assert_eq!(a.get("c/d/res/r1"), Some(&json!({"members": ["b"]})));
        assert!(a.get("r/r1/d/primary").is_none(), "other scope untouched");
        assert_eq!(exchange(&mut a, &mut b, "c/"), 2, "digest + InSync");
    }
}
