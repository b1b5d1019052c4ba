//! What the seeded simulations (`replication_sim.rs`, `history_sim.rs`) share:
//! write contents, temporary directories on tmpfs, and the seed loop.
#![allow(dead_code)]

use mars_logger::Logger;
use mars_proto::LogFileInfo;
use mars_replication::{logdir, policy};
use rand::rngs::StdRng;
use rand::Rng;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The logfiles a member offers, as the daemon lists them for a fetcher: its
/// directory (`logdir::list_for_fetch`), and, when it writes the log, only
/// what is durable (`policy::offer`, the durable clamp the daemon runs).
pub fn offered(dir: &Path, writer: Option<&Logger>) -> Vec<LogFileInfo> {
    // Asked before listing, as the daemon does.
    let synced = writer.map(|l| l.status().synced_pos);
    let (files, _, _) = logdir::list_for_fetch(dir, None).unwrap();
    policy::offer(files, synced)
}

/// Content of write `id`: every byte depends on the write and its place.
pub fn pattern(id: u64, len: u64) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A temporary directory in `MARS_SIM_TMP`, else on /dev/shm where there is one.
pub fn sim_tempdir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("MARS_SIM_TMP")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

/// The seeds to run: `MARS_SIM_SEED=S` only S, else `MARS_SIM_SEEDS` of them
/// (`default` when unset) from `MARS_SIM_FIRST` (0 when unset).
pub fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("MARS_SIM_SEED") {
        return vec![s.parse().expect("MARS_SIM_SEED is a number")];
    }
    let n = std::env::var("MARS_SIM_SEEDS")
        .ok()
        .map(|s| s.parse().expect("MARS_SIM_SEEDS is a number"))
        .unwrap_or(default);
    let first: u64 = std::env::var("MARS_SIM_FIRST")
        .ok()
        .map(|s| s.parse().expect("MARS_SIM_FIRST is a number"))
        .unwrap_or(0);
    (first..first + n).collect()
}

/// Run `run` for every seed; a failure names the seed (`what` says which
/// simulation) and how to run it alone. Prints the count and the time.
pub fn for_each_seed(default: u64, what: &str, mut run: impl FnMut(u64)) {
    let started = std::time::Instant::now();
    let seeds = seeds(default);
    let verbose = std::env::var_os("MARS_SIM_VERBOSE").is_some();
    for &seed in &seeds {
        if verbose {
            eprintln!("{what}: seed {seed}");
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what} failed at seed {seed}; reproduce with MARS_SIM_SEED={seed}: {msg}");
        }
    }
    eprintln!("{what}: {} seeds in {:.1?}", seeds.len(), started.elapsed());
}

/// One fetch of a logfile over a link: copy `src` into `dst` from `local` up
/// to `end` in chunks of random sizes (each picked from `sizes`: an upper
/// bound, or 0 for the rest); with `cuts`, any chunk may be the last, cut
/// inside (the link dies). `seen` hears of every chunk (offset, length, cut).
/// Returns whether the copy was cut.
#[allow(clippy::too_many_arguments)]
pub fn copy_chunks(
    rng: &mut StdRng,
    src: &Path,
    dst: &Path,
    mut local: u64,
    end: u64,
    sizes: &[u64],
    cuts: bool,
    mut seen: impl FnMut(u64, u64, bool),
) -> bool {
    let src = File::open(src).unwrap();
    let out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(dst)
        .unwrap();
    while local < end {
        let left = end - local;
        let mut n = match sizes[rng.random_range(0..sizes.len())] {
            0 => left,
            max => rng.random_range(1..=max),
        }
        .min(left);
        let cut = cuts && rng.random_bool(0.05);
        if cut {
            n = rng.random_range(0..n); // the link dies inside this chunk
        }
        let mut buf = vec![0u8; n as usize];
        src.read_exact_at(&mut buf, local).unwrap();
        out.write_all_at(&buf, local).unwrap();
        seen(local, n, cut);
        local += n;
        if cut {
            return true;
        }
    }
    false
}
