//! Positional I/O on the resource's disk (a plain file or a block device).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Buffered writes to the disk go out in pieces of at most this size, ending on
/// multiples of it. The page cache sizes the folios it creates after the writes
/// (Linux with large folios, e.g. ext4 since 6.16): one 1 MiB write leaves 1 MiB
/// or 2 MiB folios, and every later small write into such a folio walks all of its
/// blocks (ext4_block_write_begin / block_commit_write), which made random 4 KiB
/// writeback after a sequential pass several times more expensive.
pub const WRITE_CHUNK: u64 = 64 << 10;

/// Alignment of O_DIRECT buffers, file offsets and lengths (covers 512 and 4096 byte
/// sectors).
pub const DIRECT_ALIGN: usize = 4096;

/// Open `path` for O_DIRECT writes; None where the file system does not support it
/// (tmpfs): the caller writes through the page cache then.
pub fn open_direct(path: &Path) -> Option<File> {
    open_direct_with(path, OpenOptions::new().write(true), "writes")
}

/// Open `path` for O_DIRECT reads; None where the file system does not support it.
pub fn open_direct_read(path: &Path) -> Option<File> {
    open_direct_with(path, OpenOptions::new().read(true), "reads")
}

fn open_direct_with(path: &Path, opts: &mut OpenOptions, what: &str) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match opts.custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(path = %path.display(), "no O_DIRECT {what}: {e}");
            None
        }
    }
}

/// A buffer whose bytes start on a `DIRECT_ALIGN` boundary, for O_DIRECT I/O (its
/// heap memory does not move when the value does). Holds `len` bytes of data in
/// room for `capacity`.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Zeroed room for `capacity` bytes, no data yet.
    pub fn new(capacity: usize) -> AlignedBuf {
        let raw = vec![0u8; capacity + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { raw, start, len: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.raw.len() - DIRECT_ALIGN
    }

    /// The whole room, to read into (then `set_len`).
    pub fn room(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        &mut self.raw[self.start..self.start + cap]
    }

    /// The first `len` bytes of the room are the data (at most the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    pub fn data(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// The local disk of a resource, opened read-write and buffered.
pub struct Disk {
    file: File,
    is_block_device: bool,
}

/// Size in bytes of a file or block device.
pub fn disk_size(path: &Path) -> io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if meta.file_type().is_block_device() {
        let f = File::open(path)?;
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the ioctl writes one u64 into `size`, which outlives the call.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else if meta.is_file() {
        Ok(meta.len())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ))
    }
}

impl Disk {
    pub fn open(path: &Path) -> io::Result<Disk> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let is_block_device = file.metadata()?.file_type().is_block_device();
        Ok(Disk {
            file,
            is_block_device,
        })
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Write several buffers that lie back to back starting at `offset`, in pieces
    /// of at most [`WRITE_CHUNK`] bytes that end on multiples of it.
    pub fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut piece: Vec<&[u8]> = Vec::new();
        let mut piece_start = offset;
        let mut pos = offset;
        for b in bufs {
            let mut b = *b;
            while !b.is_empty() {
                let chunk_end = (pos / WRITE_CHUNK + 1) * WRITE_CHUNK;
                let n = b.len().min((chunk_end - pos) as usize);
                piece.push(&b[..n]);
                b = &b[n..];
                pos += n as u64;
                if pos == chunk_end {
                    self.write_piece(&piece, piece_start)?;
                    piece.clear();
                    piece_start = pos;
                }
            }
        }
        self.write_piece(&piece, piece_start)
    }

    fn write_piece(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        match bufs {
            [] => Ok(()),
            [one] => self.file.write_all_at(one, offset),
            _ => pwritev_all(&self.file, bufs, offset),
        }
    }

    /// Read `buf.len()` bytes at `offset` only if they are all in the page cache
    /// (`preadv2(RWF_NOWAIT)`): `None` when that would have to wait for the device
    /// (or on a short read), so that the caller can retry in a blocking context.
    pub fn try_read_cached_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        read_nowait(&self.file, buf, offset)
    }

    /// Make `[offset, offset+len)` read as zeroes. `deallocate`: free the space if possible (trim).
    pub fn zero_range(&self, offset: u64, len: u64, deallocate: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.is_block_device {
            let modes = if deallocate {
                [
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                ]
            } else {
                [
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                ]
            };
            for mode in modes {
                // SAFETY: plain syscall on an owned descriptor.
                let rc = unsafe {
                    libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64)
                };
                if rc == 0 {
                    return Ok(());
                }
            }
        }
        let zeroes = vec![0u8; len.min(WRITE_CHUNK) as usize];
        let mut at = offset;
        while at < offset + len {
            let chunk_end = (at / WRITE_CHUNK + 1) * WRITE_CHUNK;
            let n = (offset + len).min(chunk_end) - at;
            self.file.write_all_at(&zeroes[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    /// Start (not wait for) writing a range out to stable storage.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        start_writeback(&self.file, offset, len);
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Another handle of the same open file (for a sync on another thread: it
    /// sees the same writeback errors).
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: start writeback of dirty pages in
/// the range without waiting. Only a hint that makes a later fdatasync cheaper;
/// durability still comes from fdatasync, so errors are ignored here.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on an owned descriptor.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// `posix_fadvise(WILLNEED)`: start reading the range into the page cache in the
/// background. Only a hint, so errors are ignored.
pub fn start_readahead(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on an owned descriptor.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

/// `fallocate(FALLOC_FL_KEEP_SIZE)`: reserve blocks for `[offset, offset+len)` without
/// changing the file's length, so that buffered writes there later need no delayed
/// allocation per page (much cheaper for a file written front to back in large
/// chunks). Only a hint: errors (file systems without fallocate) are ignored.
pub fn preallocate(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on an owned descriptor.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        );
    }
}

/// `pwritev` of all of `bufs` (back to back from `offset`), retrying partial writes
/// and splitting at `IOV_MAX` (1024) buffers.
pub fn pwritev_all(file: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let n = iov.len().min(first + 1024) - first;
        // SAFETY: iov[first..first+n] point into the borrowed `bufs`, alive for the call.
        let rc = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov[first..].as_ptr(),
                n as i32,
                offset as i64,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let mut done = rc as usize;
        offset += done as u64;
        while first < iov.len() && done >= iov[first].iov_len {
            done -= iov[first].iov_len;
            first += 1;
        }
        if done > 0 {
            iov[first].iov_base = (iov[first].iov_base as usize + done) as *mut libc::c_void;
            iov[first].iov_len -= done;
        }
    }
    Ok(())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn read_nowait(file: &File, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `iov` points into `buf`, exclusively borrowed for the call.
        let rc =
            unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_NOWAIT) };
        if rc >= 0 {
            // Short (partly cached, or the end of the file): let the blocking path decide.
            return (rc as usize == buf.len()).then_some(Ok(()));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // EAGAIN: not cached. EOPNOTSUPP/ENOSYS/EINVAL: kernel or file system without RWF_NOWAIT.
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => return None,
            _ => return Some(Err(e)),
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn read_nowait(_file: &File, _buf: &mut [u8], _offset: u64) -> Option<io::Result<()>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty file `f` in `dir`, open for reading and writing.
    fn scratch_file(dir: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap()
    }

    #[test]
    fn pwritev_all_writes_many_buffers_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = scratch_file(dir.path());
        // More buffers than IOV_MAX, with empty ones mixed in.
        let chunks: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize])
            .collect();
        let bufs: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        pwritev_all(&f, &bufs, 100).unwrap();
        let want: Vec<u8> = chunks.concat();
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, 100).unwrap();
        assert_eq!(got, want);
        // A cached range reads without waiting (or the kernel lacks RWF_NOWAIT: None).
        let mut back = vec![0u8; 64];
        if let Some(r) = read_nowait(&f, &mut back, 100) {
            r.unwrap();
            assert_eq!(&back[..], &want[..64]);
        }
        // Past the end: short, so None.
        assert!(read_nowait(&f, &mut back, want.len() as u64 + 90).is_none());
    }

    #[test]
    fn preallocate_reserves_blocks_and_keeps_the_length() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let f = scratch_file(dir.path());
        f.write_all_at(b"head", 0).unwrap();
        preallocate(&f, 4, 8 << 20);
        let m = f.metadata().unwrap();
        assert_eq!(
            m.len(),
            4,
            "the length is the data's, not the reservation's"
        );
        // 512-byte units; ext4, xfs and tmpfs reserve; a file system without
        // fallocate leaves only the data's block (the hint is then a no-op).
        assert!(
            m.blocks() >= (8 << 20) / 512 || m.blocks() <= 8,
            "{} blocks",
            m.blocks()
        );
        // Writes into the reservation read back; the length grows with them.
        f.write_all_at(&[7u8; 10000], 4096).unwrap();
        let mut back = vec![0u8; 10000];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        assert_eq!(f.metadata().unwrap().len(), 4096 + 10000);
    }

    #[test]
    fn disk_writes_in_chunks_land_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0xEEu8; 1 << 20]).unwrap();
        let disk = Disk::open(&path).unwrap();
        let mut model = vec![0xEEu8; 1 << 20];
        // Buffers of all sizes across chunk boundaries, at odd offsets.
        let mut seed = 12345u64;
        for round in 0..40u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let offset = (seed >> 33) % (600 << 10);
            let sizes = [1usize, 4096, 70_000, 131_072, 3, 65_536, 200_001];
            let bufs: Vec<Vec<u8>> = sizes
                .iter()
                .take(1 + (round as usize % sizes.len()))
                .enumerate()
                .map(|(i, &n)| vec![(round * 7 + i as u64) as u8; n])
                .collect();
            let refs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
            disk.write_vectored_at(&refs, offset).unwrap();
            let flat = bufs.concat();
            model[offset as usize..offset as usize + flat.len()].copy_from_slice(&flat);
            // Zeroes in between (fallocate on a file; the chunked loop serves block devices).
            if round % 5 == 0 {
                let (zo, zl) = (offset + 17, 150_000u64);
                disk.zero_range(zo, zl, false).unwrap();
                model[zo as usize..(zo + zl) as usize].fill(0);
            }
        }
        assert!(std::fs::read(&path).unwrap() == model);
    }
}
