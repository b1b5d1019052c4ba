//! Reading a resource directory's logfiles for fetchers: lists, chunks, and
//! where the log held here begins and ends.

use anyhow::{bail, Context, Result};
use mars_logger::disk::{AlignedBuf, DIRECT_ALIGN};
use mars_logger::Logger;
use mars_proto::LogFileInfo;
use std::path::Path;

/// Fetch answers read this many chunks ahead of the one asked for.
const FETCH_READAHEAD_CHUNKS: usize = 4;

/// Read up to `max` bytes of the logfile at `path` (number `seq`) from `offset` into
/// `buf` (a new one if it has less room): the buffer, holding what was read.
///
/// With O_DIRECT where the file system allows it and `offset` is aligned (every
/// request but the first after a fetch resumed mid-block): a fetcher catching up
/// reads logfiles the page cache no longer holds (the log is written with O_DIRECT),
/// and reading them through it cost more CPU than anything else in a catch-up
/// (new page-cache pages, then a copy out of them), and pushed the primary's own
/// data out of the cache. A direct read sees what buffered writes left in the page
/// cache (the kernel writes the range back first).
pub(crate) fn read_chunk(
    path: &Path,
    seq: u64,
    offset: u64,
    max: usize,
    mut buf: AlignedBuf,
) -> Result<AlignedBuf> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let room = max.next_multiple_of(DIRECT_ALIGN);
    if buf.capacity() < room {
        buf = AlignedBuf::new(room);
    }
    let direct = (offset.is_multiple_of(DIRECT_ALIGN as u64) && max > 0)
        .then(|| mars_logger::disk::open_direct_read(path))
        .flatten()
        .map(|d| read_direct(&d, &mut buf.room()[..room], offset))
        .transpose()?
        .flatten();
    let n = match direct {
        Some(n) => n.min(max),
        None => {
            let into = &mut buf.room()[..max];
            let mut n = 0;
            while n < max {
                let k = f.read_at(&mut into[n..], offset + n as u64)?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            // The fetcher asks for the next chunks next: have the kernel read them
            // ahead. Several chunks: the device reads them at once.
            if n == max && n > 0 {
                mars_logger::disk::start_readahead(
                    &f,
                    offset + n as u64,
                    (max * FETCH_READAHEAD_CHUNKS) as u64,
                );
            }
            n
        }
    };
    // Checked after the read: a logfile deleted and recycled meanwhile has another
    // header, written before any of its new records.
    let mut h = [0u8; mars_logfmt::FILE_HEADER_LEN];
    f.read_exact_at(&mut h, 0)?;
    if mars_logfmt::FileHeader::decode(&h).map(|h| h.file_seq) != Ok(seq) {
        bail!("logfile {} is gone (deleted)", path.display());
    }
    buf.set_len(n);
    Ok(buf)
}

/// Read whole blocks of `f` (opened with O_DIRECT) from the aligned `offset` into
/// `into`, until it is full or a read ends off a block boundary (the file's end):
/// how many bytes. None when the file system refuses such reads (EINVAL).
pub(crate) fn read_direct(
    f: &std::fs::File,
    into: &mut [u8],
    offset: u64,
) -> std::io::Result<Option<usize>> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < into.len() {
        match f.read_at(&mut into[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if !k.is_multiple_of(DIRECT_ALIGN) {
                    break;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && n == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(n))
}
/// The logger's current logfile and how far its log is durable.
pub(crate) fn durable_end_of(l: &Logger) -> (String, u64) {
    let status = l.status();
    (status.current_logfile, status.synced_pos)
}

/// The logfile in `dir` holding the records up to `pos` (the last starting
/// before it; else one starting at it), by name and start position: where a
/// full sync from this node at `pos` begins its history.
pub fn base_logfile(dir: &Path, pos: u64) -> Option<(String, u64)> {
    let logs: Vec<(String, u64)> = mars_logger::list_logfiles(dir)
        .ok()?
        .iter()
        .filter_map(|e| Some((e.name(), logfile_start(&e.path).ok()?)))
        .collect();
    logs.iter()
        .rev()
        .find(|(_, start)| *start < pos)
        .or_else(|| logs.iter().find(|(_, start)| *start == pos))
        .cloned()
}

/// Where the logfiles in `dir` end in the log stream (0 without any).
pub fn local_log_end(dir: &Path) -> u64 {
    mars_logger::list_logfiles(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let len = std::fs::metadata(&e.path).ok()?.len();
            let start = logfile_start(&e.path).ok()?;
            Some(start + len.saturating_sub(mars_logfmt::FILE_HEADER_LEN as u64))
        })
        .max()
        .unwrap_or(0)
}

/// The log stream position where the logfile at `path` starts (from its header).
pub fn logfile_start(path: &Path) -> Result<u64> {
    Ok(logfile_header(path)?.start_pos)
}

/// The file header of the logfile at `path`.
pub fn logfile_header(path: &Path) -> Result<mars_logfmt::FileHeader> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = [0u8; mars_logfmt::FILE_HEADER_LEN];
    f.read_exact_at(&mut h, 0)?;
    mars_logfmt::FileHeader::decode(&h).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Logfiles (with their start position and length) and version files of a resource directory.
/// (name, JSON) of each version file.
pub type VersionFiles = Vec<(String, String)>;

/// Whether the logfile at `path` was written by `me` and never finished (no version
/// file: a crash, not recovered yet). Without a running logger such a file may hold
/// a torn tail, or after its end the records of a recycled logfile's earlier use:
/// nothing of it is offered to fetchers until recovery has cut and versioned it.
pub(crate) fn unrecovered_own(path: &Path, me: &str) -> bool {
    let Some(name) = path
        .file_name()
        .and_then(|n| mars_logfmt::parse_logfile_name(&n.to_string_lossy()))
    else {
        return false;
    };
    name.node == me
        && path.parent().is_some_and(|d| {
            !d.join(mars_logfmt::version_file_name(name.seq, me))
                .exists()
        })
}

/// `no_logger_me`: this node's name when it runs no logger for the resource (see
/// [`unrecovered_own`]). The flag: such a logfile was held back (the list is not
/// complete: more will be offered once recovery has run).
pub fn list_for_fetch(
    dir: &Path,
    no_logger_me: Option<&str>,
) -> Result<(Vec<LogFileInfo>, VersionFiles, bool)> {
    use std::os::unix::fs::FileExt;
    let logs = mars_logger::list_logfiles(dir)?;
    let n = logs.len();
    let mut files = Vec::new();
    let mut held_back = false;
    for (i, e) in logs.into_iter().enumerate() {
        let f = std::fs::File::open(&e.path)?;
        let mut len = f.metadata()?.len();
        if no_logger_me.is_some_and(|me| unrecovered_own(&e.path, me)) {
            held_back |= len > mars_logfmt::FILE_HEADER_LEN as u64;
            len = len.min(mars_logfmt::FILE_HEADER_LEN as u64);
        }
        let mut h = [0u8; mars_logfmt::FILE_HEADER_LEN];
        if f.read_exact_at(&mut h, 0).is_err() {
            continue;
        }
        // A header of another logfile: this one was just recycled under a new name.
        let Ok(header) = mars_logfmt::FileHeader::decode(&h)
            .map_err(|_| ())
            .and_then(|h| if h.file_seq == e.seq { Ok(h) } else { Err(()) })
        else {
            continue;
        };
        files.push(LogFileInfo {
            name: e.name(),
            start_pos: header.start_pos,
            len,
            finished: i + 1 < n,
            created_ns: header.created_ns,
        });
    }
    let mut versions = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("version-") {
            if let Ok(text) = std::fs::read_to_string(e.path()) {
                versions.push((name, text));
            }
        }
    }
    Ok((files, versions, held_back))
}

/// File in a resource's directory naming the incarnation it holds.
pub const INCARNATION_FILE: &str = "incarnation";

/// Record which incarnation the directory `rdir` holds (`NAME@ID` and a newline).
pub fn write_incarnation(rdir: &Path, res: &crate::meta::ResRef) -> Result<()> {
    let path = rdir.join(INCARNATION_FILE);
    mars_logger::crashsafe::write_atomic(&path, format!("{}\n", res.token()).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The incarnation the directory `rdir` holds; None when it does not say (or
/// says something unreadable).
pub fn read_incarnation(rdir: &Path) -> Option<crate::meta::ResRef> {
    let text = std::fs::read_to_string(rdir.join(INCARNATION_FILE)).ok()?;
    crate::meta::ResRef::parse(text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fetch answers read from a logfile hold exactly the file's bytes, whether read
    /// with O_DIRECT (aligned offsets) or through the page cache (an unaligned one),
    /// at the file's end, past it, and with a buffer too small for the request.
    #[test]
    fn fetch_reads_give_the_files_bytes_direct_or_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log-000000007-alpha");
        let header = mars_logfmt::FileHeader {
            file_seq: 7,
            start_pos: 0,
            start_record_seq: 1,
            created_ns: 1,
            resource_id: 1,
            parent: 0,
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend((0..5 * DIRECT_ALIGN + 123).map(|i| (i * 31 % 251) as u8));
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            mars_logger::disk::open_direct_read(&path).is_some(),
            "the test directory's file system refuses O_DIRECT: the direct path is untested"
        );
        let len = bytes.len();
        let a = DIRECT_ALIGN;
        for (offset, max) in [
            (0, len),
            (a, 2 * a),
            (a, 2 * a + 7),
            (2 * a, 1 << 20),
            (len / a * a, 1000),
            (a + 5, 3 * a),
            (len, 100),
            (len + a, 100),
            (3 * a, 0),
        ] {
            for room in [1, 1 << 20] {
                let got = read_chunk(&path, 7, offset as u64, max, AlignedBuf::new(room))
                    .unwrap_or_else(|e| panic!("{offset}+{max}: {e:#}"));
                let want = &bytes[offset.min(len)..(offset + max).min(len)];
                assert!(got.data() == want, "{offset}+{max}, room {room}");
            }
        }
        // Another logfile under that name (deleted and recycled): refused.
        match read_chunk(&path, 8, 0, 100, AlignedBuf::new(100)) {
            Err(e) => assert!(format!("{e:#}").contains("gone"), "{e:#}"),
            Ok(b) => panic!("read {} bytes of another logfile", b.data().len()),
        }
    }
}
