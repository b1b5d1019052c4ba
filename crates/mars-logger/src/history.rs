//! Which logfile replay takes next: the rules of one history, as pure code (no
//! files, no clock). Replay (`replay.rs`) lists the local logfiles and asks
//! [`next`]; the replication simulation drives the same replay, so it runs
//! these rules too.
//!
//! Every logfile of format 3 names its parent ([`mars_logfmt::parent_link`]):
//! the logfile, by its whole header, whose records up to the new logfile's
//! start came before its first record. A member is *in* one logfile at one
//! position; it enters a child only at exactly the child's start, so what it
//! applied is always one chain of links. A child that starts before the
//! member's position forks from what the member applied: a split brain, never
//! a skip. Logfiles without a link (formats 1 and 2) follow the old rule: the
//! next sequence number continues the previous logfile.
//!
//! `lineage`: the logfiles the fetch source lists (its history), when known.
//! Children outside it are another history's (left over from before a
//! failover) and are not taken; a source whose history holds other records at
//! the member's position is a split brain too.

use mars_logfmt::{parent_link, FILE_HEADER_LEN};

/// A local logfile as the rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalFile {
    pub name: String,
    pub seq: u64,
    /// The file header exactly as stored (links name it).
    pub header: [u8; FILE_HEADER_LEN],
    pub start: u64,
    /// Stream position after the last complete byte here (start + records length).
    pub end: u64,
    /// The parent link from the header (0: none or unknown).
    pub parent: u64,
}

impl LocalFile {
    /// Whether this is the logfile of that name starting there (a name alone
    /// may be another logfile's, of an earlier life of its writer).
    pub fn is(&self, name: &str, start: u64) -> bool {
        self.name == name && self.start == start
    }
}

/// A logfile of the source's history: name, start and end positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// The fetch source's history as it listed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    pub files: Vec<Listed>,
    /// The source is the designated primary: its list is its whole history up
    /// to where its log is durable, and no member has anything of it beyond.
    pub from_primary: bool,
}

/// What replay does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Apply records of the current logfile up to (not beyond) this position.
    Apply { until: u64 },
    /// Enter this logfile (index into the files given): it continues exactly
    /// the history applied, at the current position.
    Enter(usize),
    /// Nothing to do until more arrives.
    Wait,
    /// The member's history and another part here: stop, say why.
    SplitBrain(String),
    /// The primary no longer has the log from the member's position on
    /// (deleted there): only a full sync helps. The primary's first logfile.
    CutOff { file: String, starts_at: u64 },
}

/// A member at `pos` beyond the end of the primary's whole list, off the
/// primary's logfiles, has records the primary's history does not have (no
/// member has anything of the primary's log beyond where it is durable; a
/// member on the primary's last logfile may be past the listed end, which
/// grows while fetch goes on).
fn beyond_the_primary(pos: u64, lineage: Option<&Lineage>) -> Option<String> {
    let l = lineage.filter(|l| l.from_primary)?;
    let end = l.files.iter().map(|x| x.end).max().unwrap_or(0);
    (pos > end).then(|| {
        format!("this node applied up to log position {pos}, beyond the primary's log end {end}: records the primary's history does not have")
    })
}

/// Whether `f` continues `cur` (names it as parent at its start).
pub fn is_child(cur: &LocalFile, f: &LocalFile) -> bool {
    if f.is(&cur.name, cur.start) {
        return false;
    }
    if f.start < cur.start {
        return false;
    }
    if f.parent != 0 {
        f.parent == parent_link(&cur.header, f.start)
    } else {
        // Format 1/2 (or a writer that knew no parent): the next number.
        f.seq == cur.seq + 1
    }
}

/// Whether `f` continues what a member at `pos` in `cur` applied: as a
/// child of `cur`, or as the child of an empty logfile at `pos` that does (a
/// writer that restarted, or a primary that took over and handed over again
/// before a write, leaves empty logfiles; the next one names the last of
/// them). Empty: here, or in the source's history (a local copy may hold
/// another history's records after that start, never applied: the member is
/// at `pos`). A member at the very start of `cur` applied nothing of it:
/// what continues `cur`'s ancestors there continues it too.
fn continues_at(
    ours: &Ours,
    f: &LocalFile,
    files: &[LocalFile],
    pos: u64,
    lineage: Option<&Lineage>,
) -> bool {
    let empty = |e: &LocalFile| {
        e.start == pos
            && (e.end == pos
                || lineage.is_some_and(|l| {
                    l.files
                        .iter()
                        .any(|y| e.is(&y.name, y.start) && y.end == pos)
                }))
    };
    let mut at = f;
    // Each step goes to a distinct empty logfile: at most `files.len()` steps.
    for _ in 0..=files.len() {
        if (at.start == pos && at.parent != 0 && ours.links.contains(&at.parent))
            || ours.files.iter().any(|o| is_child(o, at))
        {
            return true;
        }
        let parent = files
            .iter()
            .find(|e| empty(e) && !e.is(&at.name, at.start) && is_child(e, at));
        match parent {
            Some(e) => at = e,
            None => return false,
        }
    }
    false
}

/// What a member at `pos` in `cur` applied, for [`continues_at`]: `cur`, and
/// when nothing of it is applied its ancestors there; and the links of those
/// that start at `pos` (they name what was applied up to `pos` even where
/// that logfile is not here, deleted once replayed: a logfile at `pos` with
/// the same link continues it, as an empty logfile passes its link on,
/// `mars_logfmt::next_link`). Found once per step: every candidate is
/// checked against it.
struct Ours<'a> {
    files: Vec<&'a LocalFile>,
    links: Vec<u64>,
}

fn ours_at<'a>(cur: &'a LocalFile, files: &'a [LocalFile], pos: u64) -> Ours<'a> {
    let mut ours = vec![cur];
    if pos == cur.start {
        let mut a = cur;
        for _ in 0..files.len() {
            let Some(p) = files
                .iter()
                .find(|p| !p.is(&a.name, a.start) && is_child(p, a))
            else {
                break;
            };
            ours.push(p);
            if p.start != pos {
                break;
            }
            a = p;
        }
    }
    let links = ours
        .iter()
        .filter(|o| o.start == pos && o.parent != 0)
        .map(|o| o.parent)
        .collect();
    Ours { files: ours, links }
}

/// Whether what the member applied (its logfile starting at `pos`, see
/// [`ours_at`]) descends, through logfiles that start at `pos` too (empty
/// ones), from a logfile the source lists up to `pos` at least.
fn ancestor_listed(ours: &Ours, pos: u64, lineage: &Lineage) -> bool {
    ours.files.iter().skip(1).any(|p| {
        lineage
            .files
            .iter()
            .any(|x| p.is(&x.name, x.start) && x.end >= pos)
    })
}

fn listed(lineage: Option<&Lineage>, f: &LocalFile) -> bool {
    lineage.is_none_or(|l| l.files.iter().any(|x| f.is(&x.name, x.start)))
}

/// Whether a list taken from a fetch source while `listed_under` was the
/// designated primary may guide replay now that `designated` is: only while
/// the primary is the same. After a failover what a member has may be the old
/// primary's orphans; replay waits for a list taken under the new primary.
pub fn list_usable(listed_under: Option<&str>, designated: Option<&str>) -> bool {
    listed_under == designated
}

/// The next step of a member at `pos` inside `files[cur]`.
pub fn next(pos: u64, cur: usize, files: &[LocalFile], lineage: Option<&Lineage>) -> Next {
    let Some(c) = files.get(cur) else {
        return Next::Wait;
    };
    let ours = ours_at(c, files, pos);
    // Nothing of this logfile applied yet: a sibling the source lists (a
    // logfile starting here that continues the same parent, or any first
    // logfile at 0) is as good, and the source's history goes that way.
    if pos == c.start && lineage.is_some() && !listed(lineage, c) {
        let sibling = (0..files.len()).find(|&i| {
            let f = &files[i];
            !f.is(&c.name, c.start)
                && f.start == pos
                && listed(lineage, f)
                && (pos == 0
                    || (f.parent != 0 && f.parent == c.parent)
                    || continues_at(&ours, f, files, pos, lineage))
        });
        if let Some(i) = sibling {
            return Next::Enter(i);
        }
    }
    // The source's history holds other records at this position.
    if let Some(l) = lineage {
        if let Some(x) = l
            .files
            .iter()
            .find(|x| !c.is(&x.name, x.start) && x.start <= pos && pos < x.end)
        {
            // Unless that logfile may continue ours right here (it does when its
            // link names our logfile, or an empty logfile here that continues
            // ours; not here yet, or an empty one the source lists here not
            // here yet: wait for it).
            let empty_missing = l.files.iter().any(|y| {
                y.start == pos && y.end == pos && !files.iter().any(|f| f.is(&y.name, y.start))
            });
            let ours_next = x.start == pos
                && (empty_missing
                    || files
                        .iter()
                        .filter(|f| f.is(&x.name, x.start))
                        .all(|f| continues_at(&ours, f, files, pos, Some(l))));
            if !ours_next {
                return Next::SplitBrain(format!(
                    "this node applied {} up to log position {pos}; the source's history has {} there (from {})",
                    c.name, x.name, x.start
                ));
            }
        }
    }
    // Children: also, for a member that applied nothing of its logfile, a
    // logfile here that continues what it applied (an empty logfile passes
    // its parent link on, see `mars_logfmt::next_link`).
    let children: Vec<usize> = (0..files.len())
        .filter(|&i| {
            let f = &files[i];
            (is_child(c, f)
                || (pos == c.start
                    && f.start == pos
                    && f.seq > c.seq
                    && continues_at(&ours, f, files, pos, lineage)))
                && listed(lineage, f)
        })
        .collect();
    // The primary's whole history is listed: a member whose logfile it does not
    // hold, and that has no child of it to go on with, is off that history.
    if let Some(l) = lineage.filter(|l| l.from_primary) {
        let follows = listed(lineage, c) || children.iter().any(|&i| files[i].start >= pos);
        if !follows {
            if l.files.iter().any(|x| x.start == pos) {
                return Next::Wait; // it may be a child of ours, not fetched yet
            }
            if let Some(msg) = beyond_the_primary(pos, lineage) {
                return Next::SplitBrain(msg);
            }
            if let Some(first) = l.files.first().filter(|f| f.start > pos) {
                return Next::CutOff {
                    file: first.name.clone(),
                    starts_at: first.start,
                };
            }
            // Nothing of this logfile applied: what the member applied ends
            // where its parent reaches this logfile's start. A primary that
            // lists that parent up to here (or a logfile at 0, when nothing
            // at all was applied) holds all of it; this (empty) logfile it
            // does not have (a writer's restart starts a new logfile; a
            // former primary's empty one was not fetched). Its history goes
            // on from here: wait for it.
            if pos == c.start && (pos == 0 || ancestor_listed(&ours, pos, l)) {
                return Next::Wait;
            }
            return Next::SplitBrain(format!(
                "this node applied {} up to log position {pos}; the primary's history does not hold {}",
                c.name, c.name
            ));
        }
    }
    // The primary's list no longer holds this logfile, and the local copy ends
    // before its child starts (its tail was lost, e.g. in a power loss, and the
    // primary deleted the logfile): nobody will send the rest (the last record
    // here may be torn too); only a full sync helps (waiting would wait forever).
    if lineage.is_some_and(|l| l.from_primary) {
        let first_child = children.iter().map(|&i| &files[i]).min_by_key(|f| f.start);
        if let Some(f) = first_child.filter(|f| !listed(lineage, c) && f.start > c.end) {
            return Next::CutOff {
                file: f.name.clone(),
                starts_at: f.start,
            };
        }
    }
    if let Some(&i) = children.iter().find(|&&i| files[i].start < pos) {
        let f = &files[i];
        return Next::SplitBrain(format!(
            "{} continues {} from log position {}, but this node applied {} up to {pos}",
            f.name, c.name, f.start, c.name
        ));
    }
    if let Some(&i) = children
        .iter()
        .filter(|&&i| files[i].start == pos)
        .min_by_key(|&&i| (files[i].seq, &files[i].name))
    {
        return Next::Enter(i);
    }
    let mut stop = children
        .iter()
        .map(|&i| files[i].start)
        .min()
        .unwrap_or(u64::MAX);
    // The source's copy of this logfile ends where the source's next logfile
    // starts: its history goes on elsewhere there (that logfile may not be here
    // yet), so nothing beyond is applied. A source's last logfile may still grow.
    if let Some(l) = lineage {
        if let Some(k) = l.files.iter().position(|x| c.is(&x.name, x.start)) {
            if k + 1 < l.files.len() {
                let end = l.files[k].end;
                if pos > end {
                    return Next::SplitBrain(format!(
                        "this node applied {} up to log position {pos}; the source's history leaves it at {end}",
                        c.name
                    ));
                }
                stop = stop.min(end);
            }
        }
    }
    let until = stop.min(c.end);
    if pos < until {
        Next::Apply { until }
    } else {
        Next::Wait
    }
}

/// Where a member at `pos` is when it does not know its logfile (no persisted
/// one): the logfile holding records before `pos` up to it, or, when none
/// does, one that starts at `pos` (the first by sequence: an empty logfile
/// before its child). `Err` when two hold records before `pos` (what was
/// applied came from one of them; nothing tells which) or none holds `pos`.
pub fn locate(
    pos: u64,
    files: &[LocalFile],
    lineage: Option<&Lineage>,
) -> Result<Option<usize>, String> {
    if let Some(msg) = beyond_the_primary(pos, lineage) {
        return Err(msg);
    }
    let inside: Vec<usize> = (0..files.len())
        .filter(|&i| files[i].start < pos && pos <= files[i].end)
        .collect();
    match inside.len() {
        1 => return Ok(Some(inside[0])),
        0 => {}
        _ => {
            let names: Vec<&str> = inside.iter().map(|&i| files[i].name.as_str()).collect();
            return Err(format!(
                "split brain: logfiles {} all hold log position {pos}; this node's history is one of them",
                names.join(", ")
            ));
        }
    }
    let at = (0..files.len())
        .filter(|&i| files[i].start == pos)
        .min_by_key(|&i| {
            (
                !listed(lineage, &files[i]),
                files[i].seq,
                files[i].name.clone(),
            )
        });
    if at.is_some() {
        return Ok(at);
    }
    // Before every logfile here (a fetch still to come) or after them all.
    Ok(None)
}

/// The logfiles a member went through from `files[cur]` to reach `pos` (after
/// a kill, replay's mark may lie in a later logfile than its durable position):
/// at every step exactly one child starting at or before `pos`. `None` when
/// that is not so (two children: which one was taken is not known; or `pos`
/// lies beyond the logfile reached).
pub fn advance(pos: u64, cur: usize, files: &[LocalFile]) -> Option<Vec<usize>> {
    let mut chain = Vec::new();
    let mut at = cur;
    loop {
        let kids: Vec<usize> = (0..files.len())
            .filter(|&i| is_child(&files[at], &files[i]) && files[i].start <= pos)
            .collect();
        match kids.as_slice() {
            [] => return (pos <= files[at].end).then_some(chain),
            [k] => {
                if chain.contains(k) || *k == cur {
                    return None;
                }
                chain.push(*k);
                at = *k;
            }
            _ => return None,
        }
    }
}

/// The logfiles of the history a member at `pos` inside `files[cur]` has, for
/// when it becomes the writer: its ancestors (by links), `cur`, and the
/// descendants that continue what it applied as far as they are one chain (at
/// every step one child, the first to start; in `cur` only children starting
/// at or after `pos`: one that starts before is another history's, whose
/// records the member did not apply). Returns the indices to keep, in order,
/// and the cuts: a logfile that holds more than its child's start (another
/// history's records after a fork) is cut there. Every other logfile is
/// another history's.
pub fn chain(cur: usize, pos: u64, files: &[LocalFile]) -> (Vec<usize>, Vec<(usize, u64)>) {
    let mut before = Vec::new();
    let mut at = cur;
    loop {
        let parents: Vec<usize> = (0..files.len())
            .filter(|&j| j != at && !before.contains(&j) && is_child(&files[j], &files[at]))
            .collect();
        match parents.as_slice() {
            [p] => {
                before.push(*p);
                at = *p;
            }
            _ => break,
        }
    }
    before.reverse();
    let mut keep = before;
    keep.push(cur);
    at = cur;
    loop {
        // Only children this copy of their parent reaches: after a hole (a
        // fetch that has not brought the parent's end yet) nothing continues.
        let kids: Vec<usize> = (0..files.len())
            .filter(|&i| {
                !keep.contains(&i)
                    && is_child(&files[at], &files[i])
                    && files[i].start >= pos
                    && files[i].start <= files[at].end
            })
            .collect();
        let Some(first) = kids.iter().map(|&i| files[i].start).min() else {
            break;
        };
        let at_first: Vec<usize> = kids
            .into_iter()
            .filter(|&i| files[i].start == first)
            .collect();
        match at_first.as_slice() {
            [k] => {
                keep.push(*k);
                at = *k;
            }
            _ => break,
        }
    }
    let cuts = keep
        .windows(2)
        .filter(|w| files[w[0]].end > files[w[1]].start)
        .map(|w| (w[0], files[w[1]].start))
        .collect();
    (keep, cuts)
}

/// How far a member at `pos` inside `files[cur]` may apply when the primary
/// has not confirmed its history (None: no bound).
///
/// Records of a logfile that another node than the designated `primary`
/// wrote are the old writer's history: after a failover its records beyond
/// where the new primary took over are orphans, and only the primary's own
/// list ([`Lineage::from_primary`]) or a local logfile continuing this one
/// (its link names where the history went on) tells where that was. Without
/// either, nothing more is applied (a list from another member, or from the
/// primary before it writes, may hold the orphans). A logfile the primary
/// wrote, or no primary known, needs no bound.
pub fn unconfirmed_bound(
    pos: u64,
    cur: usize,
    files: &[LocalFile],
    primary: Option<&str>,
    lineage: Option<&Lineage>,
) -> Option<u64> {
    if lineage.is_some_and(|l| l.from_primary) {
        return None;
    }
    let primary = primary?;
    let c = files.get(cur)?;
    let writer = mars_logfmt::parse_logfile_name(&c.name).map(|n| n.node);
    if writer.as_deref() == Some(primary) {
        return None;
    }
    let child = files
        .iter()
        .filter(|f| is_child(c, f) && f.start >= pos)
        .map(|f| f.start)
        .min();
    Some(child.unwrap_or(pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mars_logfmt::FileHeader;

    fn file(seq: u64, node: &str, start: u64, end: u64, parent: u64, created: u64) -> LocalFile {
        let h = FileHeader {
            file_seq: seq,
            start_pos: start,
            start_record_seq: 1,
            created_ns: created,
            resource_id: 7,
            parent,
        }
        .encode();
        LocalFile {
            name: mars_logfmt::logfile_name(seq, node),
            seq,
            header: h,
            start,
            end,
            parent,
        }
    }

    fn child_of(p: &LocalFile, seq: u64, node: &str, start: u64, end: u64) -> LocalFile {
        file(
            seq,
            node,
            start,
            end,
            parent_link(&p.header, start),
            seq * 1000 + start,
        )
    }

    fn source(files: Vec<Listed>) -> Lineage {
        Lineage {
            files,
            from_primary: false,
        }
    }

    fn listed_all(files: &[&LocalFile]) -> Vec<Listed> {
        files
            .iter()
            .map(|f| Listed {
                name: f.name.clone(),
                start: f.start,
                end: f.end,
            })
            .collect()
    }

    /// A member that entered an empty logfile (a writer's restart made it) at
    /// its start applied only its parent: a primary that lists the parent up
    /// to there, and not the empty one (it went when its writer gave up the
    /// role), holds all of it. Wait, then follow the logfile that continues
    /// the parent there; not a split brain (seen in a migrate test).
    #[test]
    fn an_empty_logfile_the_primary_dropped_is_no_split_brain() {
        let a1 = file(1, "alpha", 0, 428_480, 0, 1);
        let a2 = child_of(&a1, 2, "alpha", 428_480, 428_480);
        let files = vec![a1.clone(), a2.clone()];
        let only_a1 = Lineage {
            files: listed_all(&[&a1]),
            from_primary: true,
        };
        assert_eq!(next(428_480, 1, &files, Some(&only_a1)), Next::Wait);
        // The history goes on in another child of a1 at that position.
        let g3 = child_of(&a1, 3, "gamma", 428_480, 500_000);
        let files = vec![a1.clone(), a2.clone(), g3.clone()];
        let on = Lineage {
            files: listed_all(&[&a1, &g3]),
            from_primary: true,
        };
        assert_eq!(next(428_480, 1, &files, Some(&on)), Next::Enter(2));
        // Records of a2 applied, or a parent listed short of a2's start:
        // still a split brain.
        let a2_full = child_of(&a1, 2, "alpha", 428_480, 430_000);
        let files = vec![a1.clone(), a2_full];
        assert!(matches!(
            next(429_000, 1, &files, Some(&only_a1)),
            Next::SplitBrain(_)
        ));
        let a1_short = Lineage {
            files: vec![Listed {
                name: a1.name.clone(),
                start: 0,
                end: 428_000,
            }],
            from_primary: true,
        };
        let files = vec![a1.clone(), a2.clone()];
        assert!(matches!(
            next(428_480, 1, &files, Some(&a1_short)),
            Next::SplitBrain(_) | Next::CutOff { .. }
        ));
    }

    /// Red team (session 17): a member entered the empty logfile a writer's
    /// restart made (a2 at p), and deleted a1, which it had replayed
    /// (`delete_replayed` keeps only the logfile replay is in). The next
    /// logfile (the writer restarted again, or gamma took over in a handover)
    /// passes a2's parent link on (`next_link`): it names a1, which is not
    /// here any more. It continues what the member applied (a1 up to p, the
    /// link a2 names too): enter it; not a split brain, nor a wait forever.
    /// Until 2026-12-07 it named a2 and was a plain child.
    #[test]
    fn a_passed_on_link_is_followed_when_the_parent_was_deleted_here() {
        let p = 428_480;
        let a1 = file(1, "alpha", 0, p, 0, 1);
        let a2 = child_of(&a1, 2, "alpha", p, p);
        // next_link(a2, p): a1's link at p, passed on.
        assert_eq!(mars_logfmt::next_link(&a2.header, p), a2.parent);
        for (seq, node) in [(3, "alpha"), (3, "gamma")] {
            let n = child_of(&a1, seq, node, p, 500_000);
            assert_eq!(n.parent, a2.parent);
            let files = vec![a2.clone(), n.clone()];
            // The primary's list holds the empty logfile (kept since 2026-12-07).
            let primary = Lineage {
                files: listed_all(&[&a1, &a2, &n]),
                from_primary: true,
            };
            assert_eq!(next(p, 0, &files, Some(&primary)), Next::Enter(1), "{node}");
            // The list of a primary that deleted a1 too.
            let primary = Lineage {
                files: listed_all(&[&a2, &n]),
                from_primary: true,
            };
            assert_eq!(next(p, 0, &files, Some(&primary)), Next::Enter(1), "{node}");
            // Another member's list, or none.
            let other = source(listed_all(&[&a2, &n]));
            assert_eq!(next(p, 0, &files, Some(&other)), Next::Enter(1), "{node}");
            assert_eq!(next(p, 0, &files, None), Next::Enter(1), "{node}");
        }
    }

    /// Red team (session 17): a writer in a restart loop on an idle device
    /// leaves one empty logfile per restart, all at one position, all with
    /// the same (passed-on) link. A member in the first of them, its parent
    /// deleted here, takes one step per empty logfile; each step must stay
    /// cheap (here: 1500 logfiles, the whole walk well under 20 s).
    #[test]
    fn many_empty_logfiles_at_one_position_stay_cheap() {
        let p = 1000;
        let a1 = file(1, "a", 0, p, 0, 1);
        let n = 1500u64;
        let files: Vec<LocalFile> = (2..2 + n)
            .map(|seq| child_of(&a1, seq, "a", p, p))
            .collect();
        let l = Lineage {
            files: listed_all(&files.iter().collect::<Vec<_>>()),
            from_primary: true,
        };
        let t = std::time::Instant::now();
        assert_eq!(next(p, 0, &files, None), Next::Enter(1));
        // The whole walk, one step per logfile (before the red-team fix here,
        // each step cost n² link hashes with the parent deleted: minutes).
        for k in 0..files.len() - 1 {
            assert_eq!(next(p, k, &files, Some(&l)), Next::Enter(k + 1), "{k}");
        }
        assert_eq!(next(p, files.len() - 1, &files, Some(&l)), Next::Wait);
        let took = t.elapsed();
        assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    }

    /// The primary no longer lists a's logfile, whose local copy lost its tail
    /// before b's child starts: cut off (only a full sync helps), not a wait.
    #[test]
    fn a_lost_tail_the_primary_no_longer_lists_is_cut_off() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let b6 = child_of(&a5, 6, "b", 320, 400);
        let files = vec![a5.clone(), b6.clone()];
        let from_b = Lineage {
            files: listed_all(&[&b6]),
            from_primary: true,
        };
        assert_eq!(
            next(300, 0, &files, Some(&from_b)),
            Next::CutOff {
                file: b6.name.clone(),
                starts_at: 320
            }
        );
        // Also before the local end (its last record may be torn).
        assert!(matches!(
            next(250, 0, &files, Some(&from_b)),
            Next::CutOff { .. }
        ));
    }

    /// A member that knows b is primary applies a's logfile only as far as b
    /// confirmed it (its own list) or a logfile continuing it shows; without
    /// either, not beyond where it is (the rest may be a's orphans).
    #[test]
    fn the_old_writers_log_waits_for_the_new_primarys_word() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let b6 = child_of(&a5, 6, "b", 200, 260);
        let alone = vec![a5.clone()];
        let both = vec![a5.clone(), b6.clone()];
        let from_b = Lineage {
            files: listed_all(&[&a5, &b6]),
            from_primary: true,
        };
        let from_c = source(listed_all(&[&a5]));
        // (files, pos, primary, lineage) -> bound
        #[allow(clippy::type_complexity)]
        let table: Vec<(
            &[LocalFile],
            u64,
            Option<&str>,
            Option<&Lineage>,
            Option<u64>,
        )> = vec![
            (&alone, 150, Some("b"), None, Some(150)),
            (&alone, 150, Some("b"), Some(&from_c), Some(150)),
            (&alone, 150, Some("b"), Some(&from_b), None),
            (&alone, 150, Some("a"), None, None),
            (&alone, 150, None, None, None),
            (&both, 150, Some("b"), None, Some(200)),
            (&both, 150, Some("b"), Some(&from_c), Some(200)),
            (&both, 250, Some("b"), None, Some(250)),
        ];
        for (files, pos, primary, l, want) in table {
            assert_eq!(
                unconfirmed_bound(pos, 0, files, primary, l),
                want,
                "{} files, {pos}, {primary:?}, {l:?}",
                files.len()
            );
        }
    }

    /// The history: a writes log 5 to 300, b had it up to 200 and was
    /// forced primary (log-6-b from 200). c, wherever it is in log-5-a, either
    /// goes on into b's logfile at exactly 200 or reports the split brain.
    #[test]
    fn a_forced_failover_is_entered_only_at_its_fork_point() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let b6 = child_of(&a5, 6, "b", 200, 260);
        let files = vec![a5.clone(), b6.clone()];
        for lineage in [None, Some(source(listed_all(&[&a5, &b6])))] {
            let l = lineage.as_ref();
            // Behind the fork: apply up to it, not beyond.
            assert_eq!(next(150, 0, &files, l), Next::Apply { until: 200 });
            // At it: enter b's logfile.
            assert_eq!(next(200, 0, &files, l), Next::Enter(1));
            // Past it: a's orphaned records were applied.
            assert!(matches!(next(250, 0, &files, l), Next::SplitBrain(_)));
            assert!(matches!(next(300, 0, &files, l), Next::SplitBrain(_)));
        }
    }

    /// The source's history tells the fork before its logfile arrived here.
    #[test]
    fn the_sources_list_shows_a_fork_before_the_logfile_arrives() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let b6 = child_of(&a5, 6, "b", 200, 260);
        let files = vec![a5.clone()];
        let mut b_copy = listed_all(&[&a5, &b6]);
        b_copy[0].end = 200; // b's copy of log-5-a ends at the fork
        assert!(matches!(
            next(250, 0, &files, Some(&source(b_copy.clone()))),
            Next::SplitBrain(_)
        ));
        // Behind the fork nothing is wrong yet: replay goes on in log-5-a up to
        // where the source's copy ends, and waits there for b's logfile.
        assert_eq!(
            next(150, 0, &files, Some(&source(b_copy.clone()))),
            Next::Apply { until: 200 }
        );
        assert_eq!(
            next(200, 0, &files, Some(&source(b_copy.clone()))),
            Next::Wait
        );
        // Past where the source's copy ends, with its next logfile listed: the
        // source's history left log-5-a there.
        assert!(matches!(
            next(250, 0, &files, Some(&source(b_copy.clone()))),
            Next::SplitBrain(_)
        ));
        // A source that is merely behind (its copy ends before us) says nothing.
        let behind = vec![Listed {
            name: a5.name.clone(),
            start: 100,
            end: 180,
        }];
        assert_eq!(
            next(250, 0, &files, Some(&source(behind.clone()))),
            Next::Apply { until: 300 }
        );
    }

    /// A writer behind forked from an earlier logfile (b had log 4 up to 150
    /// and wrote log-5-b): c, already in a's log 5, is on another history.
    #[test]
    fn a_fork_from_an_earlier_logfile_is_a_split_brain() {
        let a4 = file(4, "a", 0, 180, 0, 1);
        let a5 = child_of(&a4, 5, "a", 180, 300);
        let b5 = child_of(&a4, 5, "b", 150, 220);
        let files = vec![a4.clone(), a5.clone(), b5.clone()];
        let lineage = listed_all(&[&a4, &b5]);
        let mut b_view = lineage.clone();
        b_view[0].end = 150;
        assert!(matches!(
            next(190, 1, &files, Some(&source(b_view.clone()))),
            Next::SplitBrain(_)
        ));
        // In log 4 behind 150: apply to 150, then b's logfile.
        assert_eq!(
            next(100, 0, &files, Some(&source(b_view.clone()))),
            Next::Apply { until: 150 }
        );
        assert_eq!(
            next(150, 0, &files, Some(&source(b_view.clone()))),
            Next::Enter(2)
        );
        // Past 150 in log 4: split brain (b's child starts before us).
        assert!(matches!(
            next(170, 0, &files, Some(&source(b_view.clone()))),
            Next::SplitBrain(_)
        ));
    }

    /// Children outside the source's history (left from the old primary) are
    /// not taken and do not stop replay.
    #[test]
    fn orphans_outside_the_sources_history_are_passed_over() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let a6 = child_of(&a5, 6, "a", 300, 400); // a's orphan, fetched before the failover
        let b6 = child_of(&a5, 6, "b", 200, 260);
        let b7 = child_of(&b6, 7, "b", 260, 500);
        let files = vec![a5.clone(), a6, b6.clone(), b7.clone()];
        let mut lineage = listed_all(&[&a5, &b6, &b7]);
        lineage[0].end = 200;
        assert_eq!(
            next(200, 0, &files, Some(&source(lineage.clone()))),
            Next::Enter(2)
        );
        assert_eq!(
            next(260, 2, &files, Some(&source(lineage.clone()))),
            Next::Enter(3)
        );
        assert_eq!(
            next(300, 3, &files, Some(&source(lineage.clone()))),
            Next::Apply { until: 500 }
        );
        // Without the source's list, the orphan child in log 5 ahead of 200 is a
        // child like b's: replay stops at 200 and enters the first by sequence.
        assert_eq!(next(150, 0, &files, None), Next::Apply { until: 200 });
    }

    /// Rotation: the writer's next logfile names the one before at its end.
    #[test]
    fn rotations_chain_and_wait_for_the_rest() {
        let a1 = file(1, "a", 0, 100, 0, 1);
        let a2 = child_of(&a1, 2, "a", 100, 100);
        let files = vec![a1.clone(), a2.clone()];
        assert_eq!(next(40, 0, &files, None), Next::Apply { until: 100 });
        assert_eq!(next(100, 0, &files, None), Next::Enter(1));
        assert_eq!(next(100, 1, &files, None), Next::Wait);
        // Not fetched to its end yet: apply what is here, then wait.
        let short = vec![
            LocalFile {
                end: 60,
                ..a1.clone()
            },
            a2.clone(),
        ];
        assert_eq!(next(60, 0, &short, None), Next::Wait);
    }

    /// A logfile whose link names another header (a different logfile of the
    /// same name from an earlier life of its writer) is no child.
    #[test]
    fn links_name_a_header_not_a_file_name() {
        let old = file(5, "a", 100, 300, 0, 1);
        let new = file(5, "a", 100, 300, 0, 2);
        let child = child_of(&new, 6, "a", 300, 350);
        assert!(is_child(&new, &child));
        assert!(!is_child(&old, &child));
        let files = vec![old, child];
        assert_eq!(next(300, 0, &files, None), Next::Wait);
    }

    /// Format 1/2 logfiles follow by sequence, and forks behind us still stop replay.
    #[test]
    fn legacy_logfiles_follow_by_sequence() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let b6 = file(6, "b", 200, 260, 0, 2);
        let files = vec![a5, b6];
        assert_eq!(next(200, 0, &files, None), Next::Enter(1));
        assert!(matches!(next(250, 0, &files, None), Next::SplitBrain(_)));
    }

    /// At a logfile's start nothing of it was applied: the source's sibling
    /// (same parent, same place; or another first logfile at 0) is taken.
    #[test]
    fn a_sibling_the_source_lists_replaces_a_logfile_not_begun() {
        let a1 = file(1, "a", 0, 0, 0, 1);
        let b1 = file(1, "b", 0, 90, 0, 2);
        let files = vec![a1.clone(), b1.clone()];
        let l = source(listed_all(&[&b1]));
        assert_eq!(next(0, 0, &files, Some(&l)), Next::Enter(1));
        let a5 = file(5, "a", 0, 100, 0, 3);
        let a6 = child_of(&a5, 6, "a", 100, 100);
        let b6 = child_of(&a5, 6, "b", 100, 150);
        let files = vec![a5.clone(), a6, b6.clone()];
        let l = source(listed_all(&[&a5, &b6]));
        assert_eq!(next(100, 1, &files, Some(&l)), Next::Enter(2));
        // Once a record of it is applied, no more.
        let a6_begun = child_of(&a5, 6, "a", 100, 120);
        let files = vec![a5.clone(), a6_begun, b6];
        assert!(matches!(
            next(110, 1, &files, Some(&l)),
            Next::SplitBrain(_)
        ));
    }

    /// With the primary's whole list: a member on a logfile the primary does not
    /// hold is off its history (or cut off, when the primary's log starts later).
    #[test]
    fn off_the_primarys_history_or_cut_off() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let c9 = file(9, "c", 500, 700, 0, 2);
        let files = vec![a5.clone(), c9.clone()];
        let primary = |l: Vec<Listed>| Lineage {
            files: l,
            from_primary: true,
        };
        assert_eq!(
            next(250, 0, &files, Some(&primary(listed_all(&[&c9])))),
            Next::CutOff {
                file: c9.name.clone(),
                starts_at: 500
            }
        );
        let b4 = file(4, "b", 0, 400, 0, 3);
        let b5 = child_of(&b4, 5, "b", 400, 800);
        assert!(matches!(
            next(250, 0, &files, Some(&primary(listed_all(&[&b4, &b5])))),
            Next::SplitBrain(_)
        ));
        // Listed: on it.
        assert_eq!(
            next(250, 0, &files, Some(&primary(listed_all(&[&a5])))),
            Next::Apply { until: 300 }
        );
    }

    /// Ahead of the primary's end, with no logfile of its own at the position
    /// (a full sync from a primary that then lost its role): stop.
    #[test]
    fn a_member_beyond_the_primarys_end_is_told_even_without_a_logfile() {
        let b9 = file(9, "b", 100, 200, 0, 1);
        let l = Lineage {
            files: listed_all(&[&b9]),
            from_primary: true,
        };
        assert!(locate(300, std::slice::from_ref(&b9), Some(&l)).is_err());
        // On the primary's last logfile past its listed end: fetch went on
        // after the list was taken, nothing wrong.
        let longer = LocalFile {
            end: 300,
            ..b9.clone()
        };
        assert_eq!(
            next(250, 0, std::slice::from_ref(&longer), Some(&l)),
            Next::Apply { until: 300 }
        );
        // Off the primary's logfiles and past its end: records it does not have.
        let c7 = file(7, "c", 100, 300, 0, 9);
        assert!(matches!(next(300, 0, &[c7], Some(&l)), Next::SplitBrain(_)));
        assert_eq!(locate(300, std::slice::from_ref(&b9), None), Ok(None));
    }

    #[test]
    fn advance_follows_one_chain_or_gives_up() {
        let a1 = file(1, "a", 0, 100, 0, 1);
        let a2 = child_of(&a1, 2, "a", 100, 250);
        let a3 = child_of(&a2, 3, "a", 250, 300);
        let files = vec![a1.clone(), a2.clone(), a3];
        assert_eq!(advance(50, 0, &files), Some(vec![]));
        assert_eq!(advance(120, 0, &files), Some(vec![1]));
        assert_eq!(advance(280, 0, &files), Some(vec![1, 2]));
        assert_eq!(advance(301, 0, &files), None);
        let b2 = child_of(&a1, 2, "b", 80, 200);
        let forked = vec![a1, a2, b2];
        assert_eq!(advance(150, 0, &forked), None);
    }

    /// A member of b's history that also holds a's orphans becomes the writer:
    /// the orphans go, log-5-a is cut at the fork.
    #[test]
    fn the_writers_chain_drops_another_historys_logfiles() {
        let a4 = file(4, "a", 0, 100, 0, 1);
        let a5 = child_of(&a4, 5, "a", 100, 300);
        let a6 = child_of(&a5, 6, "a", 300, 400);
        let b6 = child_of(&a5, 6, "b", 200, 260);
        let b7 = child_of(&b6, 7, "b", 260, 270);
        let files = vec![a4, a5, a6, b6, b7];
        let (keep, cuts) = chain(3, 230, &files);
        assert_eq!(keep, vec![0, 1, 3, 4]);
        assert_eq!(cuts, vec![(1, 200)]);
        // In a5 before the fork: the first child (b's, at 200) is the chain.
        let (keep, _) = chain(1, 150, &files);
        assert_eq!(keep, vec![0, 1, 3, 4]);
        // In a5 past b's fork (a's orphans applied, b's logfiles fetched but no
        // split brain seen yet): a's history is this member's, b's goes.
        let (keep, cuts) = chain(1, 250, &files);
        assert_eq!(keep, vec![0, 1, 2]);
        assert!(cuts.is_empty());
        // A copy of a5 fetched only up to 180 (a hole before 200): nothing after it.
        let mut holed = files.clone();
        holed[1].end = 180;
        let (keep, _) = chain(1, 150, &holed);
        assert_eq!(keep, vec![0, 1]);
    }

    #[test]
    fn locate_refuses_two_logfiles_holding_the_position() {
        let a5 = file(5, "a", 100, 300, 0, 1);
        let b6 = child_of(&a5, 6, "b", 200, 260);
        let files = vec![a5, b6];
        assert_eq!(locate(150, &files, None), Ok(Some(0)));
        assert!(locate(250, &files, None).is_err());
        // At 200 a5 holds records before it, b6 none: a5 (then the rules enter b6).
        assert_eq!(locate(200, &files, None), Ok(Some(0)));
        assert_eq!(locate(100, &files, None), Ok(Some(0)));
        assert_eq!(locate(50, &files, None), Ok(None));
    }
}
