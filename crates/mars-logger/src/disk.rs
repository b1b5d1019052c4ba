//! Positional I/O on the resource's disk (a plain file or a block device).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

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

    /// Write several buffers that lie back to back starting at `offset`.
    pub fn write_vectored_at(&self, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
        if bufs.len() == 1 {
            return self.file.write_all_at(bufs[0], offset);
        }
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
                    self.file.as_raw_fd(),
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
            if rc == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
        }
        Ok(())
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
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], at)?;
            at += n as u64;
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
