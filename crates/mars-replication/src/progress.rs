//! What a secondary shows: its progress, and how far behind the primary it is in seconds.

use std::time::Duration;

/// What the daemon shows about a secondary.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub syncing: bool,
    pub sync_done: u64,
    pub sync_total: u64,
    /// Until replay passes this, the disk is not a consistent image.
    pub consistent_from: Option<u64>,
    pub fetched: u64,
    pub replayed: u64,
    pub error: Option<String>,
    pub blocks_transferred: u64,
    /// A replay step is running (pause-replay waits for it to end).
    pub replaying: bool,
    /// Replay stopped: a logfile does not continue the history applied here.
    pub split_brain: bool,
    /// Bytes per second of the running full sync (over the blocks compared so far).
    pub sync_rate: u64,
    /// The member fetched from last.
    pub source: Option<String>,
    /// That member writes no log any more and everything it has is here
    /// (`fetched` is the end of its log): a planned handover may complete
    /// once replay reaches it.
    pub source_complete: bool,
    /// The source no longer has the logfiles this member needs (deleted in
    /// emergency mode): only `invalidate` (a full sync) helps.
    pub cut_off: bool,
    /// Why replay stopped or failed last (kept apart from sync/fetch errors,
    /// which a successful fetch round clears).
    pub replay_error: Option<String>,
    /// Of `replayed`, what is durable (disk synced, position persisted).
    pub replayed_durable: u64,
    /// Replay has opened its state since the task started (after a reboot it finds
    /// then how far the disk may be no consistent image).
    pub replay_opened: bool,
    /// The full sync waits for a source: no member it could copy from is reachable.
    pub sync_waits_for_source: bool,
    /// The last fetch round found no reachable member to fetch from.
    pub fetch_waits_for_source: bool,
    /// The designated primary whose own list replay last checked its
    /// position against, with nothing changed since: a confirmation is for
    /// that primary only (the view may already know of another one before
    /// replay looks again). None: what replay applied is not known yet to be
    /// the primary's history (the task just started, the list changed, the
    /// list came from another member, or replay halted); never `uptodate`.
    pub confirmed_for: Option<String>,
}

/// Lag in seconds without comparing clocks of different nodes: remembers when
/// this node first learned that the primary's log had reached each position.
/// The oldest write not replayed here was logged no later than the first
/// moment a position beyond it was known.
///
/// Kept across restarts of marsd in the resource directory (`lag-clock`, JSON
/// `[[position, unix_ms], ...]`, best effort: rewritten at most once a second),
/// so that a restarted member that is behind does not show a lag of 0 s.
#[derive(Debug, Default)]
pub struct LagClock {
    seen: std::collections::VecDeque<(u64, std::time::Instant)>,
    /// Read from the file already (once per marsd process and resource).
    loaded: bool,
    /// Changed since it was saved, and when it was saved last.
    dirty: bool,
    saved: Option<std::time::Instant>,
}

/// The lag clock's file in a resource directory.
pub const LAG_CLOCK_FILE: &str = "lag-clock";
/// Sightings kept at most (while a member lags for hours): the oldest ones stay,
/// later ones are thinned, which can only make the lag shown smaller.
const LAG_CLOCK_MAX: usize = 4096;

impl LagClock {
    pub fn observe(&mut self, written: u64, now: std::time::Instant) {
        if self.seen.back().is_none_or(|&(w, _)| written > w) {
            if self.seen.len() >= LAG_CLOCK_MAX {
                // Keep the first half; of the rest every other one.
                let keep_from = LAG_CLOCK_MAX / 2;
                let mut i = 0;
                self.seen.retain(|_| {
                    i += 1;
                    i <= keep_from || i % 2 == 0
                });
            }
            self.seen.push_back((written, now));
            self.dirty = true;
        }
    }

    /// Take up what an earlier marsd saved in `dir` (once; a missing or damaged
    /// file is nothing to take up). Times are wall-clock times of this node.
    pub fn load_once(&mut self, dir: &std::path::Path) {
        if std::mem::replace(&mut self.loaded, true) {
            return;
        }
        let Ok(text) = std::fs::read_to_string(dir.join(LAG_CLOCK_FILE)) else {
            return;
        };
        let Ok(list) = serde_json::from_str::<Vec<(u64, u64)>>(&text) else {
            return;
        };
        let (now, wall) = (std::time::Instant::now(), unix_ms());
        let mut earlier: std::collections::VecDeque<(u64, std::time::Instant)> = list
            .into_iter()
            .filter_map(|(w, ms)| {
                let age = Duration::from_millis(wall.checked_sub(ms)?);
                Some((w, now.checked_sub(age)?))
            })
            .collect();
        // Older sightings first; what this process saw beyond them goes after them.
        let last = earlier.back().map(|&(w, _)| w);
        earlier.extend(
            self.seen
                .drain(..)
                .filter(|&(w, _)| last.is_none_or(|l| w > l)),
        );
        earlier.truncate(LAG_CLOCK_MAX);
        self.seen = earlier;
    }

    /// Save to `dir` when it changed and the last save is a second old (best effort).
    pub fn save_if_due(&mut self, dir: &std::path::Path, now: std::time::Instant) {
        if !self.dirty
            || self
                .saved
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        let wall = unix_ms();
        let list: Vec<(u64, u64)> = self
            .seen
            .iter()
            .map(|&(w, t)| {
                (
                    w,
                    wall.saturating_sub(now.duration_since(t).as_millis() as u64),
                )
            })
            .collect();
        // Not synced (a display aid, not worth a device flush a second): written
        // beside and renamed over, so a reader never sees half a file.
        let tmp = dir.join(format!(".{LAG_CLOCK_FILE}.tmp"));
        let saved = serde_json::to_string(&list)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, dir.join(LAG_CLOCK_FILE)));
        if saved.is_ok() {
            self.dirty = false;
            self.saved = Some(now);
        }
    }

    /// How long the oldest write not yet replayed has been known.
    pub fn lag(&self, replayed: u64, now: std::time::Instant) -> Duration {
        self.seen
            .iter()
            .find(|&&(w, _)| w > replayed)
            .map(|&(_, t)| now.saturating_duration_since(t))
            .unwrap_or_default()
    }

    /// Forget what was replayed; keeps at most one sample per observation round.
    pub fn prune(&mut self, replayed: u64) {
        while self.seen.front().is_some_and(|&(w, _)| w <= replayed) {
            self.seen.pop_front();
            self.dirty = true;
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_clock_survives_a_restart_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let mut c = LagClock::default();
        c.load_once(dir.path()); // no file yet: nothing
        c.observe(100, start);
        c.observe(200, start + Duration::from_secs(2));
        c.save_if_due(dir.path(), start + Duration::from_secs(2));
        // Another process: what it loads keeps the ages.
        let mut d = LagClock::default();
        d.load_once(dir.path());
        let now = std::time::Instant::now();
        let lag = d.lag(50, now);
        assert!(lag >= start.elapsed(), "{lag:?}");
        assert!(d.lag(150, now) + Duration::from_millis(1500) <= lag);
        assert_eq!(d.lag(200, now), Duration::ZERO);
        // Thousands of sightings: bounded, the oldest kept.
        for i in 0..3 * LAG_CLOCK_MAX as u64 {
            d.observe(1000 + i, now);
        }
        assert!(d.seen.len() <= LAG_CLOCK_MAX);
        assert_eq!(d.seen.front().map(|s| s.0), Some(100));
        // A damaged file is nothing to take up.
        std::fs::write(dir.path().join(LAG_CLOCK_FILE), "[[1,").unwrap();
        let mut e = LagClock::default();
        e.load_once(dir.path());
        assert!(e.seen.is_empty());
    }
}
