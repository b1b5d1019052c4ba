//! Per-device request statistics: counts, bytes, errors and latency
//! histograms by command, requests in flight and open connections.
//!
//! Kept with relaxed atomics only (no lock, no allocation): a request costs two
//! clock reads and four or five uncontended `fetch_add`s on the command's own
//! cache line. [`DeviceStats::snapshot`] reads them for an exposition (the
//! daemon's Prometheus endpoint); a snapshot taken while requests complete may
//! be a few requests apart between fields, never torn within one.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::proto::Command;

/// The commands requests are counted under, in [`DeviceStats::snapshot`]'s order.
pub const COMMANDS: [&str; 6] = ["read", "write", "flush", "trim", "write_zeroes", "other"];

/// Upper bounds of the latency buckets, in seconds (the last, `+Inf`, is implied).
/// From 25 µs (a read answered from memory) to 10 s (a device that hangs).
pub const LATENCY_BOUNDS: [f64; 18] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds, for the hot path (no float).
const BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// The index of `cmd` in [`COMMANDS`].
pub(crate) fn command_index(cmd: Command) -> usize {
    match cmd {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        _ => 5,
    }
}

/// One command's counters, on a cache line (or two) of its own so that
/// connections doing different commands do not share lines.
#[repr(align(128))]
#[derive(Default)]
struct CmdStats {
    /// Requests finished, by latency bucket (not cumulative; the last is +Inf).
    buckets: [AtomicU64; BUCKETS],
    /// Sum of their latencies, nanoseconds.
    sum_ns: AtomicU64,
    /// Bytes of successful requests (the request's length; 0 for flush).
    bytes: AtomicU64,
    /// Requests answered with an error (rejected before the export included).
    errors: AtomicU64,
}

/// Statistics of one exported device, shared by all its connections (hand
/// the same one to every [`crate::Export`] of the device through
/// [`crate::Export::stats`], across re-exports, so the counters stay monotonic).
#[derive(Default)]
pub struct DeviceStats {
    cmds: [CmdStats; COMMANDS.len()],
    in_flight: AtomicI64,
    connections: AtomicI64,
}

/// One command's figures at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommandSnapshot {
    pub command: &'static str,
    /// Requests finished (the histogram's count).
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
    /// Sum of the latencies, seconds.
    pub duration_sum: f64,
    /// Counts per bucket (not cumulative, as prometheus-client's encoder
    /// takes them): upper bound of [`LATENCY_BOUNDS`], then `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

/// A device's figures at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub commands: Vec<CommandSnapshot>,
    pub in_flight: u64,
    pub connections: u64,
}

impl DeviceStats {
    pub fn new() -> DeviceStats {
        DeviceStats::default()
    }

    /// A request was handed to the export.
    #[inline]
    pub(crate) fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests handed to the export that will not finish here (their
    /// connection went away with them running).
    pub(crate) fn abandoned(&self, n: usize) {
        self.in_flight.fetch_sub(n as i64, Ordering::Relaxed);
    }

    /// A request finished: `ran` whether it had been `started`.
    #[inline]
    pub(crate) fn finished(&self, cmd: usize, bytes: u32, took: Duration, error: bool, ran: bool) {
        if ran {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let Some(c) = self.cmds.get(cmd) else {
            return;
        };
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let b = BOUNDS_NS.partition_point(|&bound| bound < ns);
        c.buckets[b].fetch_add(1, Ordering::Relaxed);
        c.sum_ns.fetch_add(ns, Ordering::Relaxed);
        if error {
            c.errors.fetch_add(1, Ordering::Relaxed);
        } else if bytes > 0 {
            c.bytes.fetch_add(u64::from(bytes), Ordering::Relaxed);
        }
    }

    pub(crate) fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn disconnected(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// The figures now.
    pub fn snapshot(&self) -> Snapshot {
        let commands = COMMANDS
            .iter()
            .zip(&self.cmds)
            .map(|(name, c)| {
                let mut total = 0u64;
                let mut buckets = Vec::with_capacity(BUCKETS);
                for (i, n) in c.buckets.iter().enumerate() {
                    let n = n.load(Ordering::Relaxed);
                    total = total.saturating_add(n);
                    let bound = LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
                    buckets.push((bound, n));
                }
                CommandSnapshot {
                    command: name,
                    requests: total,
                    errors: c.errors.load(Ordering::Relaxed),
                    bytes: c.bytes.load(Ordering::Relaxed),
                    duration_sum: c.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
                    buckets,
                }
            })
            .collect();
        Snapshot {
            commands,
            in_flight: self.in_flight.load(Ordering::Relaxed).max(0) as u64,
            connections: self.connections.load(Ordering::Relaxed).max(0) as u64,
        }
    }
}

/// Counts a connection for as long as it lives.
pub(crate) struct ConnectionGuard(pub(crate) std::sync::Arc<DeviceStats>);

impl ConnectionGuard {
    pub(crate) fn new(stats: std::sync::Arc<DeviceStats>) -> ConnectionGuard {
        stats.connected();
        ConnectionGuard(stats)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the statistics cost a request, single-threaded (the clock reads
    /// included): `cargo test --release -p mars-nbd cost_per_request --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn cost_per_request() {
        let s = DeviceStats::new();
        let n = 10_000_000u32;
        let t = std::time::Instant::now();
        for i in 0..n {
            s.started();
            let start = std::time::Instant::now();
            s.finished((i % 2) as usize, 4096, start.elapsed(), false, true);
        }
        let per = t.elapsed() / n;
        eprintln!("{per:?} per request");
        assert_eq!(s.snapshot().commands[1].requests, u64::from(n / 2));
    }

    #[test]
    fn bounds_agree() {
        for (s, ns) in LATENCY_BOUNDS.iter().zip(BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
    }

    #[test]
    fn buckets_count_each_request_once_and_bounds_are_inclusive() {
        let s = DeviceStats::new();
        s.started();
        s.finished(1, 4096, Duration::from_micros(25), false, true);
        s.started();
        s.finished(1, 4096, Duration::from_micros(26), false, true);
        s.finished(1, 512, Duration::from_secs(60), true, false);
        s.finished(0, 100, Duration::ZERO, false, false);
        let snap = s.snapshot();
        let w = &snap.commands[1];
        assert_eq!(w.command, "write");
        assert_eq!((w.requests, w.errors, w.bytes), (3, 1, 8192));
        assert_eq!(w.buckets[0], (0.000_025, 1));
        assert_eq!(w.buckets[1], (0.000_05, 1));
        assert_eq!(w.buckets[17], (10.0, 0));
        assert_eq!(w.buckets[18], (f64::INFINITY, 1));
        assert!((w.duration_sum - 60.000_051).abs() < 1e-9);
        assert_eq!(snap.commands[0].requests, 1);
        assert_eq!(snap.in_flight, 0);
        s.started();
        s.abandoned(1);
        assert_eq!(s.snapshot().in_flight, 0);
    }
}
