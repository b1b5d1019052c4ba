//! Crash-safe replacement of small files: write a temporary file, fsync it,
//! rename it over the target, fsync the directory. After a crash the target
//! holds either the old or the new content, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

pub fn write_atomic(path: &Path, content: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, content, None)
}

/// [`write_atomic`] of a file only its owner may read (mode 0600, whatever
/// the umask and whatever a stale temp file had): keys, tokens.
pub fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, content, Some(0o600))
}

fn write_atomic_mode(path: &Path, content: &[u8], mode: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let (dir, tmp) = dir_and_tmp(path)?;
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if let Some(m) = mode {
        // A temp file left by a crash keeps its mode on open: start anew.
        let _ = fs::remove_file(&tmp);
        opts.mode(m);
    }
    let written = opts
        .open(&tmp)
        .and_then(|mut f| {
            if let Some(m) = mode {
                f.set_permissions(fs::Permissions::from_mode(m))?;
            }
            f.write_all(content)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        // A full filesystem: the partial temp file must not keep its space.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// [`write_atomic`] that needs no new space once it has run: `content`
/// goes into the temp file left by the previous call (overwritten in place),
/// which is then swapped with `path` (`renameat2(RENAME_EXCHANGE)`), so the
/// old content stays allocated as the next call's temp file. On a full
/// filesystem the swap still works (the `applied` position must be
/// persisted before any logfile can be deleted). Keep `content` the same
/// length from call to call. Falls back to [`write_atomic`] where the
/// filesystem cannot swap.
pub fn write_swapping(path: &Path, content: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    let (dir, tmp) = dir_and_tmp(path)?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Not through a symlink someone left in the directory.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all_at(content, 0)?;
        f.set_len(content.len() as u64)?;
        f.sync_all()?;
    }
    if !path.exists() {
        fs::rename(&tmp, path)?;
        sync_dir(dir)?;
        // A temp file for the next call, made now while there is room (best
        // effort: without it the next call allocates one).
        let _ = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|f| {
                f.write_all_at(content, 0)?;
                f.sync_all()
            });
        return Ok(());
    }
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
    };
    let (from, to) = (c(&tmp)?, c(path)?);
    // SAFETY: two valid NUL-terminated paths relative to the current directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
            return write_atomic(path, content);
        }
        return Err(e);
    }
    sync_dir(dir)
}

/// The directory of `path` and the temp file beside it (`.NAME.tmp`).
fn dir_and_tmp(path: &Path) -> io::Result<(&Path, std::path::PathBuf)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok((dir, dir.join(format!(".{}.tmp", name.to_string_lossy()))))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        super::write_atomic(&p, b"one").unwrap();
        super::write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temporary left behind"
        );
    }
}
