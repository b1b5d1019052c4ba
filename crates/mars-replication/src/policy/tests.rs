//! Table tests and property tests of every replication rule.

use super::*;
use proptest::prelude::*;

const H: u64 = FILE_HEADER_LEN as u64;

fn file(name: &str, start: u64, log_bytes: u64) -> LogFileInfo {
    LogFileInfo {
        name: name.into(),
        start_pos: start,
        len: H + log_bytes,
        finished: true,
        created_ns: 7,
    }
}

fn entry(disk: &str, replayed: u64) -> ActualEntry {
    ActualEntry {
        role: "secondary".into(),
        disk: disk.into(),
        replayed,
        fetched: replayed,
        ..Default::default()
    }
}

// ---- the durable clamp ----

#[test]
fn a_writer_offers_only_what_is_durable_in_every_file() {
    let files = vec![
        file("log-1-a", 0, 100),
        file("log-2-a", 100, 50),
        // Became current after `synced` was read: longer than its log (recycled).
        file("log-3-a", 150, 4096),
        // Starts past `synced`: left out (it would make a gap).
        file("log-4-a", 400, 10),
    ];
    // (synced, what each offered file holds of the log, finished flags)
    let table: &[(Option<u64>, &[u64], &[bool])] = &[
        (None, &[100, 50, 4096, 10], &[true, true, true, true]),
        (Some(400), &[100, 50, 250, 0], &[true, true, false, false]),
        (Some(150), &[100, 50, 0], &[true, true, false]),
        (Some(120), &[100, 20], &[true, false]),
        (Some(100), &[100, 0], &[true, false]),
        (Some(0), &[0], &[false]),
    ];
    for (synced, lens, finished) in table {
        let got = offer(files.clone(), *synced);
        let got_lens: Vec<u64> = got.iter().map(|f| f.len - H).collect();
        let got_fin: Vec<bool> = got.iter().map(|f| f.finished).collect();
        assert_eq!(&got_lens[..], *lens, "synced {synced:?}");
        // Without a writer the list is as the directory lists it.
        if synced.is_some() {
            assert_eq!(&got_fin[..], *finished, "synced {synced:?}");
        }
    }
}

#[test]
fn chunks_end_where_the_log_is_durable() {
    // (start, synced, offset, max) -> bytes
    let table = [
        (0, None, 0, 100, 100),
        (0, Some(50), 0, 1000, H + 50),
        (0, Some(50), H + 40, 1000, 10),
        (0, Some(50), H + 50, 1000, 0),
        (0, Some(50), H + 60, 1000, 0),
        (100, Some(50), 0, 1000, H),
        (100, Some(150), H, 20, 20),
    ];
    for (start, synced, offset, max, want) in table {
        assert_eq!(
            chunk_limit(start, synced, offset, max),
            want,
            "{start} {synced:?} {offset} {max}"
        );
    }
}

proptest! {
    /// Whatever the directory holds, a writer never offers a byte past `synced`,
    /// never leaves a gap, and keeps the files' order; the chunk limit agrees
    /// with the list.
    #[test]
    fn the_clamp_never_offers_past_synced(
        lens in proptest::collection::vec(0u64..5000, 1..6),
        extra in proptest::collection::vec(0u64..5000, 6),
        synced in 0u64..30000,
    ) {
        let mut start = 0;
        let mut files = Vec::new();
        for (i, l) in lens.iter().enumerate() {
            // A file may hold more than its log (recycled, or torn tail).
            files.push(file(&format!("log-{}-a", i + 1), start, l + extra[i] * (i as u64 % 2)));
            start += l;
        }
        let got = offer(files.clone(), Some(synced));
        let mut prev_end = None;
        for f in &got {
            let end = f.start_pos + (f.len - H);
            prop_assert!(end <= synced.max(f.start_pos));
            prop_assert!(f.start_pos <= synced);
            if let Some(p) = prev_end {
                prop_assert!(f.start_pos <= p, "gap before {}", f.name);
            }
            prev_end = Some(end);
            let limit = chunk_limit(f.start_pos, Some(synced), 0, u64::MAX);
            prop_assert!(f.len <= limit);
        }
        prop_assert!(got.last().is_none_or(|f| !f.finished));
        prop_assert_eq!(offer(files.clone(), None), files);
    }
}

// ---- sources ----

#[test]
fn a_sync_copies_from_the_primary_else_the_best_consistent_member() {
    let members = vec![
        ("a".to_string(), Some(entry("uptodate", 0))),
        ("b".to_string(), Some(entry("outdated", 500))),
        ("c".to_string(), Some(entry("uptodate", 900))),
        (
            "d".to_string(),
            Some(ActualEntry {
                split_brain: true,
                ..entry("outdated", 2000)
            }),
        ),
        (
            "e".to_string(),
            Some(ActualEntry {
                emergency: true,
                ..entry("outdated", 3000)
            }),
        ),
        ("f".to_string(), Some(entry("syncing", 4000))),
        ("g".to_string(), None),
    ];
    let all = |_: &str| true;
    let none = |_: &str| false;
    // (designated, alive, avoided) -> choice
    type Case<'a> = (
        Option<&'a str>,
        &'a [&'a str],
        &'a [&'a str],
        Result<(&'a str, bool), ()>,
    );
    let table: &[Case] = &[
        (Some("a"), &["a", "b", "c"], &[], Ok(("a", false))),
        (Some("a"), &["b", "c"], &[], Ok(("c", false))),
        (Some("a"), &["a", "b", "c"], &["a"], Ok(("c", false))),
        (Some("a"), &["a", "b"], &["a", "b"], Ok(("a", true))),
        (Some("a"), &["b"], &[], Ok(("b", false))),
        (Some("a"), &["d", "e", "f", "g"], &[], Err(())),
        (Some("me"), &["a"], &[], Err(())),
        (None, &["a"], &[], Err(())),
    ];
    for (designated, alive, avoided, want) in table {
        let got = sync_source(
            "me",
            *designated,
            &members,
            |m| alive.contains(&m),
            |m| avoided.contains(&m),
        );
        match (want, &got) {
            (Ok((m, all_failed)), Ok((g, f))) => {
                assert_eq!(
                    (*m, *all_failed),
                    (g.as_str(), *f),
                    "{designated:?} {alive:?} {avoided:?}"
                )
            }
            (Err(()), Err(_)) => {}
            _ => panic!("{designated:?} {alive:?} {avoided:?}: {got:?}"),
        }
    }
    assert_eq!(consistent_member(&members, all), Some("c".into()));
    assert_eq!(consistent_member(&members, none), None);
}

#[test]
fn fetch_asks_the_preferred_the_primary_then_who_holds_most() {
    let writer = ActualEntry {
        role: "primary".into(),
        logfile: Some("log-9-w".into()),
        written: 10,
        ..entry("uptodate", 10)
    };
    let members = vec![
        ("p".to_string(), Some(entry("uptodate", 100))),
        ("b".to_string(), Some(entry("outdated", 300))),
        ("c".to_string(), Some(entry("outdated", 200))),
        ("w".to_string(), Some(writer)),
        (
            "s".to_string(),
            Some(ActualEntry {
                split_brain: true,
                ..entry("outdated", 900)
            }),
        ),
        (
            "x".to_string(),
            Some(ActualEntry {
                emergency: true,
                ..entry("outdated", 900)
            }),
        ),
        ("me".to_string(), Some(entry("outdated", 950))),
        ("n".to_string(), None),
    ];
    let alive = |m: &str| m != "c";
    let c = fetch_candidates("me", Some("b"), Some("p"), &members, alive);
    assert_eq!(c, ["b", "p", "w"]);
    let c = fetch_candidates("me", None, Some("p"), &members, |_| true);
    assert_eq!(c, ["p", "w", "b", "c"]);
    assert_eq!(fetch_source(&c, |m| m == "p"), Some(("w".into(), false)));
    assert_eq!(fetch_source(&c, |_| true), Some(("p".into(), true)));
    assert_eq!(fetch_source(&[], |_| false), None);
}

#[test]
fn only_a_consistent_image_is_served_to_a_joiner() {
    let good = Progress {
        replay_opened: true,
        ..Default::default()
    };
    assert!(may_serve_disk(&good));
    let bad = [
        Progress {
            syncing: true,
            ..good.clone()
        },
        Progress {
            replay_opened: false,
            ..good.clone()
        },
        Progress {
            consistent_from: Some(5),
            ..good.clone()
        },
        Progress {
            split_brain: true,
            ..good.clone()
        },
        Progress {
            cut_off: true,
            ..good.clone()
        },
        Progress {
            replay_error: Some("x".into()),
            ..good.clone()
        },
    ];
    for p in bad {
        assert!(!may_serve_disk(&p), "{p:?}");
    }
}

// ---- which logfiles to take ----

#[test]
fn a_source_that_starts_later_is_a_gap_cut_off_only_from_the_primary() {
    let files = vec![file("log-5-a", 1000, 10), file("log-6-a", 1010, 10)];
    assert_eq!(gap(&files, 999, true), Some(Gap::CutOff));
    assert_eq!(gap(&files, 999, false), Some(Gap::NotHeld));
    assert_eq!(gap(&files, 1000, true), None);
    assert_eq!(gap(&[], 0, true), None);
}

#[test]
fn the_first_file_needed_holds_the_records_up_to_the_replay_position() {
    let files = vec![
        file("log-1-a", 0, 100),
        file("log-2-a", 100, 100),
        file("log-3-a", 200, 0),
    ];
    for (pos, want) in [
        (0, 0),
        (1, 0),
        (100, 0),
        (101, 1),
        (200, 1),
        (201, 2),
        (9999, 2),
    ] {
        assert_eq!(first_needed(&files, pos), want, "{pos}");
    }
}

#[test]
fn a_local_file_of_another_history_is_set_aside_or_a_split_brain() {
    let listed = file("log-3-a", 100, 50);
    // (local header, replay position) -> what to do
    let table = [
        (Some((100, 7)), 120, LocalCopy::Same),
        (Some((100, 8)), 50, LocalCopy::SetAside),
        (Some((100, 8)), 120, LocalCopy::SplitBrain { start: 100 }),
        (Some((90, 7)), 95, LocalCopy::SplitBrain { start: 90 }),
        (Some((90, 7)), 90, LocalCopy::SetAside),
        (None, 500, LocalCopy::SetAside),
    ];
    for (local, pos, want) in table {
        assert_eq!(local_copy(local, &listed, pos), want, "{local:?} {pos}");
    }
    // A source that does not send creation times compares by start alone.
    let old = LogFileInfo {
        created_ns: 0,
        ..listed
    };
    assert_eq!(local_copy(Some((100, 8)), &old, 120), LocalCopy::Same);
}

#[test]
fn lineages_compare_by_names_and_starts() {
    let a = vec![file("log-1-a", 0, 100), file("log-2-a", 100, 5)];
    let mut b = a.clone();
    b[1].len += 1000; // grew: the same history
    assert!(same_lineage(&lineage(&a, true), &lineage(&b, true)));
    assert!(!same_lineage(&lineage(&a, true), &lineage(&b, false)));
    b[1].start_pos = 99;
    assert!(!same_lineage(&lineage(&a, true), &lineage(&b, true)));
    let l = lineage(&a, true);
    assert_eq!((l.files[1].start, l.files[1].end), (100, 105));
}

#[test]
fn a_designation_names_its_reign() {
    let a = designation("alpha", 7, "beta");
    assert_eq!(designated_name(&a), "alpha");
    assert_ne!(a, designation("alpha", 9, "alpha"));
    assert_eq!(designated_name("plain"), "plain");
}

// ---- the disk state ----

#[test]
fn the_disk_state_shown() {
    let base = Progress {
        replay_opened: true,
        replayed: 100,
        confirmed_for: Some("p".into()),
        ..Default::default()
    };
    // (progress, sync paused, replay paused, primary written) -> state
    let table: Vec<(Progress, bool, bool, u64, &str)> = vec![
        (base.clone(), false, false, 100, "uptodate"),
        (base.clone(), false, false, 101, "outdated"),
        (base.clone(), false, true, 100, "uptodate"),
        (
            Progress {
                confirmed_for: None,
                ..base.clone()
            },
            false,
            false,
            100,
            "outdated",
        ),
        (
            Progress {
                split_brain: true,
                ..base.clone()
            },
            false,
            false,
            100,
            "outdated",
        ),
        (
            Progress {
                cut_off: true,
                ..base.clone()
            },
            false,
            false,
            100,
            "outdated",
        ),
        (
            Progress {
                replay_error: Some("x".into()),
                ..base.clone()
            },
            false,
            false,
            100,
            "outdated",
        ),
        (
            Progress {
                syncing: true,
                ..base.clone()
            },
            false,
            false,
            100,
            "syncing",
        ),
        (
            Progress {
                syncing: true,
                ..base.clone()
            },
            true,
            false,
            100,
            "inconsistent",
        ),
        (
            Progress {
                syncing: true,
                sync_waits_for_source: true,
                ..base.clone()
            },
            false,
            false,
            100,
            "inconsistent",
        ),
        (
            Progress {
                consistent_from: Some(200),
                ..base.clone()
            },
            false,
            false,
            100,
            "syncing",
        ),
        (
            Progress {
                consistent_from: Some(200),
                ..base.clone()
            },
            false,
            true,
            100,
            "inconsistent",
        ),
        (
            Progress {
                consistent_from: Some(200),
                replay_error: Some("x".into()),
                ..base.clone()
            },
            false,
            false,
            100,
            "inconsistent",
        ),
    ];
    for (p, sp, rp, w, want) in table {
        assert_eq!(
            secondary_disk(&p, sp, rp, Some("p"), w),
            want,
            "{p:?} {sp} {rp} {w}"
        );
    }
}

proptest! {
    /// `uptodate` only when nothing says otherwise, whatever the flags.
    #[test]
    fn uptodate_only_when_caught_up_and_confirmed(
        flags in proptest::collection::vec(any::<bool>(), 10),
        replayed in 0u64..10, written in 0u64..10,
    ) {
        let p = Progress {
            syncing: flags[0],
            consistent_from: flags[1].then_some(5),
            split_brain: flags[2],
            cut_off: flags[3],
            replay_error: flags[4].then(|| "x".to_string()),
            sync_waits_for_source: flags[6],
            // flags[5]: the confirmation lost again (a new list, a halt).
            confirmed_for: (flags[9] && !flags[5]).then(|| "p".to_string()),
            replayed,
            ..Default::default()
        };
        let s = secondary_disk(&p, flags[7], flags[8], Some("p"), written);
        let clean = !flags[..6].iter().any(|f| *f) && flags[9] && replayed >= written;
        prop_assert_eq!(s == "uptodate", clean);
        prop_assert!(["uptodate", "outdated", "syncing", "inconsistent"].contains(&s));
    }
}
