//! Replication policy: every rule of what a member offers, whom it copies
//! from, which of the source's logfiles it takes, and what its disk is shown
//! as. Pure: no tokio, no files, no clock (what a rule needs is passed in),
//! so that the daemon and the seeded simulations run exactly these rules.
//!
//! Which logfile replay enters next, and when a history is a split brain, are
//! in [`mars_logger::history`] (replay calls them); this module feeds them the
//! source's list ([`lineage`]).

use crate::meta::ActualEntry;
use crate::progress::Progress;
use mars_logfmt::FILE_HEADER_LEN;
use mars_logger::history::{Lineage, Listed};
use mars_proto::LogFileInfo;

// ---- what a member offers: the durable clamp ----

/// How many bytes of a logfile that starts at log position `start` are durable
/// when the writer's log is durable up to `synced` (header included).
pub fn durable_len(start: u64, synced: u64) -> u64 {
    FILE_HEADER_LEN as u64 + synced.saturating_sub(start)
}

/// The list a member offers: every logfile as it lies here, or, when this
/// member writes the log (`synced`: how far it is durable), clamped to what
/// is durable, so that a secondary never applies a write that a crash of the
/// primary could undo. Every file is clamped, not only the current one: a
/// logfile that became current after `synced` was read (a recycled one is
/// longer than its log) is offered up to nothing; one that starts past
/// `synced` is left out (listed, it would end the one before at `synced` and
/// make a gap). A clamped logfile, and the last one, will grow: not finished.
pub fn offer(mut files: Vec<LogFileInfo>, synced: Option<u64>) -> Vec<LogFileInfo> {
    if let Some(synced) = synced {
        files.retain(|f| f.start_pos <= synced);
        for f in files.iter_mut() {
            let durable = durable_len(f.start_pos, synced);
            if durable < f.len {
                f.len = durable;
                f.finished = false;
            }
        }
        if let Some(last) = files.last_mut() {
            last.finished = false;
        }
    }
    files
}

/// At most how many bytes of a logfile starting at `start` a member sends from
/// `offset` when asked for `max`: all it has, or (it writes the log, durable
/// up to `synced`) no more than what is durable, as [`offer`] lists it.
pub fn chunk_limit(start: u64, synced: Option<u64>, offset: u64, max: u64) -> u64 {
    match synced {
        Some(synced) => max.min(durable_len(start, synced).saturating_sub(offset)),
        None => max,
    }
}

// ---- whom to copy from ----

/// Whether a secondary's disk may be copied by a joining member's full sync:
/// a consistent image that replay moves forward (not syncing, replay opened,
/// no split brain, not cut off, replay not stopped).
pub fn may_serve_disk(p: &Progress) -> bool {
    !(p.syncing
        || !p.replay_opened
        || p.consistent_from.is_some()
        || p.split_brain
        || p.cut_off
        || p.replay_error.is_some())
}

/// The members of a resource and what each reports of itself (its actual
/// entry), as the metadata has it.
pub type Reports = [(String, Option<ActualEntry>)];

/// Of `members` that `eligible` lets through, the one with a consistent disk
/// (up to date or behind, no split brain, not cut off) that replayed the most:
/// a full sync can copy its disk when the primary is away.
pub fn consistent_member(members: &Reports, eligible: impl Fn(&str) -> bool) -> Option<String> {
    members
        .iter()
        .filter(|(m, _)| eligible(m))
        .filter_map(|(m, a)| {
            let a = a.as_ref()?;
            let consistent = matches!(a.disk.as_str(), "uptodate" | "outdated")
                && !a.split_brain
                && !a.emergency;
            consistent.then_some((a.replayed, m))
        })
        .max()
        .map(|(_, m)| m.to_string())
}

/// The source chosen, and whether every candidate failed a moment ago (it is
/// asked again; the member shows itself without a source meanwhile).
pub type Choice = Result<(String, bool), String>;

/// The member a full sync copies from: the designated primary when it is
/// reachable and was not just given up on (`avoided`), else the reachable
/// member with a consistent disk that has replayed the most (it serves its
/// disk, and the joiner replays the log from where that disk was).
pub fn sync_source(
    me: &str,
    designated: Option<&str>,
    members: &Reports,
    alive: impl Fn(&str) -> bool,
    avoided: impl Fn(&str) -> bool,
) -> Choice {
    let p = designated.ok_or("no designated primary")?;
    if p == me {
        return Err("this node is the designated primary but its disk is not up to date".into());
    }
    let primary_alive = alive(p);
    if primary_alive && !avoided(p) {
        return Ok((p.to_string(), false));
    }
    // The primary is away, or alive in the cluster's view but this node could
    // not connect to it a moment ago (a cut between the two alone).
    let other = consistent_member(members, |m| m != me && m != p && alive(m) && !avoided(m));
    match other {
        Some(m) => Ok((m, false)),
        None if primary_alive => Ok((p.to_string(), true)),
        None => Err(format!(
            "primary {p} is not reachable, and no reachable member has a consistent disk to copy: the sync waits for one (`marsadm view` shows which members are alive)"
        )),
    }
}

/// The members to fetch the log from, best first: the one preferred (during a
/// handover to this node: the old primary), the designated primary, then the
/// other reachable members that hold the most of the log (one that still
/// writes the log first), leaving out those whose history parted from this
/// one's or that were cut off (replay would refuse what they offer).
pub fn fetch_candidates(
    me: &str,
    prefer: Option<&str>,
    designated: Option<&str>,
    members: &Reports,
    alive: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut candidates: Vec<String> = prefer
        .into_iter()
        .chain(designated)
        .map(String::from)
        .collect();
    let mut others: Vec<((bool, u64), &str)> = members
        .iter()
        .filter_map(|(m, a)| {
            let a = a.as_ref()?;
            if a.split_brain || (a.emergency && a.role != "primary") {
                return None;
            }
            let writes = a.logfile.is_some();
            let holds = if writes { a.written } else { a.fetched };
            Some(((writes, holds), m.as_str()))
        })
        .collect();
    others.sort_by(|a, b| b.cmp(a));
    candidates.extend(others.into_iter().map(|(_, m)| m.to_string()));
    candidates.retain(|m| m != me && alive(m));
    let mut seen = std::collections::HashSet::new();
    candidates.retain(|m| seen.insert(m.clone()));
    candidates
}

/// Of the fetch candidates, the first not passed over (`avoided`); when every
/// one was, the first again (`true`: all failed a moment ago).
pub fn fetch_source(
    candidates: &[String],
    avoided: impl Fn(&str) -> bool,
) -> Option<(String, bool)> {
    match candidates.iter().find(|m| !avoided(m)) {
        Some(m) => Some((m.clone(), false)),
        None => candidates.first().map(|m| (m.clone(), true)),
    }
}

// ---- which of the source's logfiles to take ----

/// Whether a source's list is the primary's whole history (replay may take
/// it as [`Lineage::from_primary`]): the source is the designated primary and
/// wrote the log when it listed, or it is the member this node takes over
/// from in a planned handover (`handover_from`: the old writer, whose whole
/// log becomes the new primary's history). A designated primary that does
/// not write yet (a handover or failover under way, or its disk detached)
/// lists only the copy it fetched: another member may hold more of the old
/// writer's log, and records of it the new primary's history does not have.
pub fn authoritative(
    source: &str,
    designated: Option<&str>,
    writes: bool,
    handover_from: Option<&str>,
) -> bool {
    (writes && designated == Some(source)) || handover_from == Some(source)
}

/// The designated primary of a resource together with the stamp of its
/// designation (`name#clock.node`): a list taken under one reign of a node is
/// no guide after another (the same node designated again after a failover
/// away and back may have another history than the one listed then).
pub fn designation(name: &str, clock: u64, by: &str) -> String {
    format!("{name}#{clock}.{by}")
}

/// The primary's name in a [`designation`].
pub fn designated_name(designation: &str) -> &str {
    designation.split('#').next().unwrap_or(designation)
}

/// The source's list as replay follows it (`from_primary`: see [`authoritative`]).
pub fn lineage(files: &[LogFileInfo], from_primary: bool) -> Lineage {
    Lineage {
        files: files
            .iter()
            .map(|f| Listed {
                name: f.name.clone(),
                start: f.start_pos,
                end: f
                    .start_pos
                    .saturating_add(f.len.saturating_sub(FILE_HEADER_LEN as u64)),
            })
            .collect(),
        from_primary,
    }
}

/// Whether two lists name the same logfiles at the same places (a list that
/// did not change needs no new look by replay before the member is shown
/// `uptodate`).
pub fn same_lineage(a: &Lineage, b: &Lineage) -> bool {
    a.from_primary == b.from_primary
        && a.files.len() == b.files.len()
        && a.files
            .iter()
            .zip(&b.files)
            .all(|(x, y)| x.name == y.name && x.start == y.start)
}

/// Why the source's list cannot continue this member's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gap {
    /// The designated primary no longer has the log from the member's
    /// position on (deleted in emergency mode): only a full sync helps.
    CutOff,
    /// Another member does not hold it (it may have joined later): ask another.
    NotHeld,
}

/// Whether the source's oldest logfile starts after everything held here
/// (`local_end`: where the local copies end, at least the replay position).
pub fn gap(files: &[LogFileInfo], local_end: u64, from_designated: bool) -> Option<Gap> {
    let first = files.first()?;
    (first.start_pos > local_end).then_some(if from_designated {
        Gap::CutOff
    } else {
        Gap::NotHeld
    })
}

/// The index of the first listed logfile replay needs from `replay_pos` on:
/// the last one starting before it (it holds the records up to it, also where
/// a full sync's history begins at its very end), else the first. Files before
/// it are fetched only where a copy of them is here already.
pub fn first_needed(files: &[LogFileInfo], replay_pos: u64) -> usize {
    files
        .iter()
        .rposition(|f| f.start_pos < replay_pos)
        .unwrap_or(0)
}

/// What to do with a local file of a listed logfile's name that is shorter
/// than the listed one, before appending to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalCopy {
    /// A copy of the listed logfile: append.
    Same,
    /// Another logfile of that name (its writer's life before a failover)
    /// that replay never entered: set it aside and fetch the listed one anew.
    SetAside,
    /// Another logfile of that name, and replay applied it (it starts at
    /// `start`, before the replay position): this member's history parted.
    SplitBrain { start: u64 },
}

/// See [`LocalCopy`]. `local`: the local file's header (start, creation
/// time), None when unreadable. A listed creation time of 0 (an older source
/// that does not send it) compares by start alone.
pub fn local_copy(local: Option<(u64, u64)>, listed: &LogFileInfo, replay_pos: u64) -> LocalCopy {
    match local {
        Some((start, created))
            if start == listed.start_pos
                && (listed.created_ns == 0 || created == listed.created_ns) =>
        {
            LocalCopy::Same
        }
        Some((start, _)) if replay_pos > start => LocalCopy::SplitBrain { start },
        _ => LocalCopy::SetAside,
    }
}

// ---- what the disk is shown as ----

/// A secondary's disk state in `view` (DRBD's and MARS's words), with
/// `designated` the primary as this node knows it now and `primary_written`
/// what it reported as durably written.
pub fn secondary_disk(
    p: &Progress,
    sync_paused: bool,
    replay_paused: bool,
    designated: Option<&str>,
    primary_written: u64,
) -> &'static str {
    // Not yet a consistent image, and nothing is making it one (Inconsistent):
    // the copy paused or without a source to copy from, or replay towards the
    // end of the copy paused or stopped.
    let stalled = if p.syncing {
        sync_paused || p.sync_waits_for_source
    } else {
        replay_paused || p.replay_error.is_some()
    };
    if (p.syncing || p.consistent_from.is_some()) && stalled {
        "inconsistent"
    } else if p.syncing || p.consistent_from.is_some() {
        "syncing"
    } else if p.split_brain
        || p.cut_off
        || p.replay_error.is_some()
        || p.confirmed_for.as_deref() != designated
        || p.replayed < primary_written
    {
        // A consistent but old image (OutDated): behind the primary's log, or
        // stopped behind it, or not yet checked against the primary's history.
        "outdated"
    } else {
        "uptodate"
    }
}

#[cfg(test)]
mod tests;
