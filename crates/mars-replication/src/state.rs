//! The secondary's state files: `sync` (the full sync) and `replayed`.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub(crate) const SYNC_FILE: &str = "sync";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SyncState {
    pub(crate) format: u16,
    pub(crate) start_pos: u64,
    pub(crate) next_offset: u64,
    pub(crate) end_pos: Option<u64>,
    pub(crate) done: bool,
    /// The member the blocks before `next_offset` came from (absent in files of
    /// builds before it: then the designated primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) source: Option<String>,
    /// The source's logfile holding the records up to `start_pos` (name,
    /// start): where this history begins (absent in older files, and from
    /// older sources: then replay finds it by position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) base: Option<(String, u64)>,
}

pub(crate) fn read_sync(dir: &std::path::Path) -> Result<Option<SyncState>> {
    match std::fs::read(dir.join(SYNC_FILE)) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is damaged", dir.join(SYNC_FILE).display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn write_sync(dir: &std::path::Path, s: &SyncState) -> Result<()> {
    let mut body = serde_json::to_vec_pretty(s)?;
    body.push(b'\n');
    let path = dir.join(SYNC_FILE);
    mars_logger::crashsafe::write_atomic(&path, &body)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Make the blocks written so far durable, then record how far the sync got:
/// `next_offset` never claims a block that a crash could still lose. Runs in
/// the background (the sync goes on meanwhile); only blocks whose writes have
/// returned before the call are claimed.
pub(crate) fn spawn_persist_sync(
    disk: &Arc<std::fs::File>,
    csum: &mars_logger::csum::CsumHandle,
    dir: &std::path::Path,
    s: &SyncState,
) -> tokio::task::JoinHandle<Result<()>> {
    let (disk, csum, dir, s) = (disk.clone(), csum.clone(), dir.to_path_buf(), s.clone());
    tokio::task::spawn_blocking(move || {
        disk.sync_data()?;
        // The checksums of the blocks written (and found equal), durable
        // before the position that claims them.
        csum.sync()?;
        write_sync(&dir, &s)
    })
}

/// A former primary's directory after `demote`: its disk is the image at
/// `pos`, no sync is needed, replay continues from there.
pub fn mark_synced(dir: &std::path::Path, pos: u64) -> Result<()> {
    write_sync(
        dir,
        &SyncState {
            format: 1,
            start_pos: pos,
            next_offset: 0,
            end_pos: None,
            done: true,
            source: None,
            base: None,
        },
    )
}

/// Where replay starts on this member, once its full sync is done (None while
/// a sync is unfinished or was never started: the disk is no image then).
pub fn synced_start(dir: &std::path::Path) -> Option<u64> {
    read_sync(dir)
        .ok()
        .flatten()
        .filter(|s| s.done)
        .map(|s| s.start_pos)
}

/// Forget the sync state (a new primary, or `invalidate`).
pub fn clear_sync(dir: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(dir.join(SYNC_FILE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The replay position persisted in `dir`, if any.
pub fn persisted_replayed(dir: &std::path::Path) -> Option<u64> {
    #[derive(Deserialize)]
    struct R {
        pos: u64,
    }
    let b = std::fs::read(dir.join(mars_logger::replay::REPLAYED_FILE)).ok()?;
    serde_json::from_slice::<R>(&b).ok().map(|r| r.pos)
}
