//! `marsadm view --watch`: the changes between two views, as events (what
//! `drbdsetup events2` gives DRBD users). Pure: the daemon diffs the view
//! it computed last with the one it computes now.

use crate::{MemberView, ResourceView, View};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One change a watcher saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it was seen (ms since the epoch).
    pub ts_ms: u64,
    /// What changed: `node-join`, `node-leave`, `node-up`, `node-down`,
    /// `resource-created`, `resource-deleted`, `primary` (the resource's
    /// actual primary), `member-join`, `member-leave`, `role`, `disk`,
    /// `connection`, `split-brain`, `emergency`, `sync-start`, `sync-end`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Value>,
}

impl Event {
    fn new(ts_ms: u64, event: &str, resource: Option<&str>, node: Option<&str>) -> Event {
        Event {
            ts_ms,
            event: event.into(),
            resource: resource.map(str::to_string),
            node: node.map(str::to_string),
            old: None,
            new: None,
        }
    }

    fn change(mut self, old: impl Into<Value>, new: impl Into<Value>) -> Event {
        self.old = Some(old.into());
        self.new = Some(new.into());
        self
    }

    /// One line for humans: `TIME RES/NODE EVENT OLD -> NEW`.
    pub fn line(&self) -> String {
        let who = match (&self.resource, &self.node) {
            (Some(r), Some(n)) => format!("{r}/{n}"),
            (Some(r), None) => r.clone(),
            (None, Some(n)) => n.clone(),
            (None, None) => "-".into(),
        };
        let show = |v: &Option<Value>| match v {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => "-".into(),
            Some(v) => v.to_string(),
        };
        let mut out = format!("{} {who} {}", iso_ms(self.ts_ms), self.event);
        if self.old.is_some() || self.new.is_some() {
            out += &format!(" {} -> {}", show(&self.old), show(&self.new));
        }
        out
    }
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn iso_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

fn sync_value(m: &MemberView) -> Value {
    match &m.sync {
        Some(s) => serde_json::json!({ "done": s.done, "total": s.total }),
        None => Value::Null,
    }
}

/// What happened to a member seen in both views.
fn member_events(ts: u64, res: &str, p: &MemberView, n: &MemberView, out: &mut Vec<Event>) {
    let ev = |e: &str| Event::new(ts, e, Some(res), Some(&n.node));
    if p.role != n.role {
        out.push(ev("role").change(p.role.clone(), n.role.clone()));
    }
    if p.disk != n.disk {
        out.push(ev("disk").change(p.disk.clone(), n.disk.clone()));
    }
    if p.connected != n.connected {
        out.push(ev("connection").change(p.connected, n.connected));
    }
    if p.split_brain != n.split_brain {
        out.push(ev("split-brain").change(p.split_brain, n.split_brain));
    }
    if p.emergency != n.emergency {
        out.push(ev("emergency").change(p.emergency, n.emergency));
    }
    match (&p.sync, &n.sync) {
        (None, Some(_)) => out.push(ev("sync-start").change(Value::Null, sync_value(n))),
        (Some(_), None) => out.push(ev("sync-end").change(sync_value(p), Value::Null)),
        _ => {}
    }
}

fn resource_events(ts: u64, p: &ResourceView, n: &ResourceView, out: &mut Vec<Event>) {
    let res = n.name.as_str();
    if p.actual_primary != n.actual_primary {
        out.push(
            Event::new(ts, "primary", Some(res), None)
                .change(p.actual_primary.clone(), n.actual_primary.clone()),
        );
    }
    for pm in &p.members {
        if !n.members.iter().any(|m| m.node == pm.node) {
            out.push(Event::new(ts, "member-leave", Some(res), Some(&pm.node)));
        }
    }
    for nm in &n.members {
        match p.members.iter().find(|m| m.node == nm.node) {
            Some(pm) => member_events(ts, res, pm, nm, out),
            None => {
                out.push(
                    Event::new(ts, "member-join", Some(res), Some(&nm.node))
                        .change(Value::Null, nm.role.clone()),
                );
                // A sync that began with the join is no change of a member
                // seen before: said here, so that its end has a start.
                if nm.sync.is_some() {
                    out.push(
                        Event::new(ts, "sync-start", Some(res), Some(&nm.node))
                            .change(Value::Null, sync_value(nm)),
                    );
                }
            }
        }
    }
}

/// The events that lead from view `prev` to view `next`, seen at `ts_ms`:
/// nodes, then resources in `next`'s order, then each resource's members.
pub fn events(prev: &View, next: &View, ts_ms: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for pn in &prev.cluster.nodes {
        if !next.cluster.nodes.iter().any(|n| n.name == pn.name) {
            out.push(Event::new(ts_ms, "node-leave", None, Some(&pn.name)));
        }
    }
    for nn in &next.cluster.nodes {
        match prev.cluster.nodes.iter().find(|n| n.name == nn.name) {
            None => out.push(Event::new(ts_ms, "node-join", None, Some(&nn.name))),
            Some(pn) if pn.alive != nn.alive => {
                let e = if nn.alive { "node-up" } else { "node-down" };
                out.push(Event::new(ts_ms, e, None, Some(&nn.name)));
            }
            Some(_) => {}
        }
    }
    for pr in &prev.resources {
        if !next.resources.iter().any(|r| r.name == pr.name) {
            out.push(Event::new(ts_ms, "resource-deleted", Some(&pr.name), None));
        }
    }
    for nr in &next.resources {
        match prev.resources.iter().find(|r| r.name == nr.name) {
            Some(pr) => resource_events(ts_ms, pr, nr, &mut out),
            None => {
                out.push(Event::new(ts_ms, "resource-created", Some(&nr.name), None));
                resource_events(
                    ts_ms,
                    &ResourceView {
                        name: nr.name.clone(),
                        ..ResourceView::default()
                    },
                    nr,
                    &mut out,
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterView, NodeView, SyncView};

    fn member(node: &str, role: &str, disk: &str) -> MemberView {
        MemberView {
            node: node.into(),
            role: role.into(),
            disk: disk.into(),
            connected: true,
            ..MemberView::default()
        }
    }

    fn view(nodes: &[(&str, bool)], members: Vec<MemberView>, primary: Option<&str>) -> View {
        View {
            node: "alpha".into(),
            cluster: ClusterView {
                id: "c".into(),
                nodes: nodes
                    .iter()
                    .map(|(n, a)| NodeView {
                        name: n.to_string(),
                        alive: *a,
                        ..NodeView::default()
                    })
                    .collect(),
            },
            resources: vec![ResourceView {
                name: "r0".into(),
                actual_primary: primary.map(str::to_string),
                members,
                ..ResourceView::default()
            }],
        }
    }

    fn kinds(e: &[Event]) -> Vec<(String, Option<String>)> {
        e.iter()
            .map(|e| (e.event.clone(), e.node.clone()))
            .collect()
    }

    #[test]
    fn no_change_no_event() {
        let v = view(
            &[("alpha", true)],
            vec![member("alpha", "primary", "uptodate")],
            Some("alpha"),
        );
        assert!(events(&v, &v, 1).is_empty());
    }

    #[test]
    fn a_handover_a_kill_and_a_sync() {
        let nodes = [("alpha", true), ("beta", true), ("gamma", true)];
        let a = view(
            &nodes,
            vec![
                member("alpha", "primary", "uptodate"),
                member("beta", "secondary", "uptodate"),
            ],
            Some("alpha"),
        );
        // gamma joins and syncs.
        let mut g = member("gamma", "secondary", "syncing");
        g.sync = Some(SyncView {
            done: 0,
            total: 8,
            ..SyncView::default()
        });
        let mut b = a.clone();
        b.resources[0].members.push(g.clone());
        assert_eq!(
            kinds(&events(&a, &b, 2)),
            vec![
                ("member-join".into(), Some("gamma".into())),
                ("sync-start".into(), Some("gamma".into()))
            ]
        );
        let mut c = b.clone();
        c.resources[0].members[2].sync = None;
        c.resources[0].members[2].disk = "uptodate".into();
        let e = events(&b, &c, 3);
        assert_eq!(
            kinds(&e),
            vec![
                ("disk".into(), Some("gamma".into())),
                ("sync-end".into(), Some("gamma".into()))
            ]
        );
        assert_eq!(
            e[0].line(),
            "1970-01-01T00:00:00.003Z r0/gamma disk syncing -> uptodate"
        );
        // A handover to beta.
        let mut d = c.clone();
        d.resources[0].actual_primary = Some("beta".into());
        d.resources[0].members[0].role = "secondary".into();
        d.resources[0].members[1].role = "primary".into();
        assert_eq!(
            kinds(&events(&c, &d, 4)),
            vec![
                ("primary".into(), None),
                ("role".into(), Some("alpha".into())),
                ("role".into(), Some("beta".into()))
            ]
        );
        // gamma killed.
        let mut f = d.clone();
        f.cluster.nodes[2].alive = false;
        f.resources[0].members[2].connected = false;
        assert_eq!(
            kinds(&events(&d, &f, 5)),
            vec![
                ("node-down".into(), Some("gamma".into())),
                ("connection".into(), Some("gamma".into()))
            ]
        );
        // gamma leaves; the resource goes.
        let mut h = f.clone();
        h.resources[0].members.pop();
        assert_eq!(
            kinds(&events(&f, &h, 6)),
            vec![("member-leave".into(), Some("gamma".into()))]
        );
        let mut i = h.clone();
        i.resources.clear();
        assert_eq!(
            kinds(&events(&h, &i, 7)),
            vec![("resource-deleted".into(), None)]
        );
    }

    #[test]
    fn iso_times() {
        assert_eq!(iso_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_ms(1_796_620_617_981), "2026-12-07T05:16:57.981Z");
        assert_eq!(iso_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
