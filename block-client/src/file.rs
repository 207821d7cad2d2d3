//! [`FileDevice`]: a raw file or a kernel block device (`/dev/sdX` of an iSCSI session,
//! `/dev/nbdX`) used as the LUN. Positional I/O (`pread`/`pwrite`) so any number of threads
//! share one descriptor; optional `O_DIRECT` through aligned bounce buffers; `fdatasync` on
//! flush; FUA writes with `RWF_DSYNC`, which writes back only their own range; `fallocate`
//! for trim and write-zeroes, with a fallback to writing zeros (write-zeroes) or doing
//! nothing (trim, whose contents are unspecified).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::sys::{self, AlignedBuf, FallocMode};
use crate::{BlockDevice, BlockError, WriteFlags};

/// Alignment of `O_DIRECT` buffers, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;
/// Largest bounce buffer used for one `O_DIRECT` chunk.
const DIRECT_CHUNK_BYTES: usize = 4 << 20;
/// Largest buffered write done inline when the kernel has no `RWF_NOWAIT` for writes.
const INLINE_BUFFERED_WRITE_BYTES: usize = 64 << 10;
/// Size of the zero buffer used when `fallocate` cannot zero a range.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FileOptions {
    /// Open with `O_DIRECT`, bypassing the page cache. Default: false.
    pub direct: bool,
    /// Open read-only; writes, trims and flushes of writes fail. Default: false.
    pub read_only: bool,
    /// Take an exclusive `flock` so a second server cannot export the same file.
    /// Default: false.
    pub lock: bool,
}

/// A file or kernel block device used as a [`BlockDevice`].
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    block_size_bytes: u32,
    direct: bool,
    read_only: bool,
    is_block_device: bool,
    /// Cleared the first time `fallocate(ZERO_RANGE)` reports it is unsupported.
    zero_range_ok: AtomicBool,
    /// Cleared the first time `fallocate(PUNCH_HOLE)` reports it is unsupported.
    punch_hole_ok: AtomicBool,
    /// Cleared the first time `preadv2(RWF_NOWAIT)` reports it is unsupported.
    nowait_read_ok: AtomicBool,
    /// Cleared the first time `pwritev2(RWF_NOWAIT)` reports it is unsupported.
    nowait_write_ok: AtomicBool,
}

fn device_err(
    op: &'static str,
    offset_bytes: u64,
    len_bytes: u64,
    source: io::Error,
) -> BlockError {
    // A kernel block device whose transport went away reports these; that is a lost path,
    // not a bad request.
    let path_gone = matches!(
        source.raw_os_error(),
        Some(libc::ENXIO | libc::ENODEV | libc::ENOTCONN | libc::ESHUTDOWN)
    );
    if path_gone {
        BlockError::PathLost { op, source }
    } else {
        BlockError::Device {
            op,
            offset_bytes,
            len_bytes,
            source,
        }
    }
}

/// What a failed `RWF_NOWAIT` call means: "would block" (or any error: the blocking path
/// repeats the request and reports it), and remember when the kernel does not support it.
fn nowait_outcome(flag: &AtomicBool, e: io::Error) -> Result<bool, BlockError> {
    if matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    ) {
        flag.store(false, Ordering::Relaxed);
    }
    Ok(false)
}

fn usize_len(len_bytes: u64) -> io::Result<usize> {
    usize::try_from(len_bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

impl FileDevice {
    /// Opens an existing file or block device.
    pub fn open(path: impl AsRef<Path>, options: FileOptions) -> Result<FileDevice, BlockError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source: io::Error| BlockError::Open {
            target: path.display().to_string(),
            source,
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!options.read_only);
        if options.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(&path).map_err(open_err)?;
        if options.lock {
            sys::try_lock_exclusive(&file).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    open_err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "file is locked by another process (another server exports it)",
                    ))
                } else {
                    open_err(e)
                }
            })?;
        }
        let meta = file.metadata().map_err(open_err)?;
        let is_block_device = meta.file_type().is_block_device();
        let (size_bytes, block_size_bytes) = if is_block_device {
            let size = sys::block_device_size(&file).map_err(open_err)?;
            let sector = sys::block_device_sector_size(&file).unwrap_or(512).max(512);
            (size, sector.max(4096))
        } else if meta.file_type().is_file() {
            (meta.len(), 4096)
        } else {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            )));
        };
        Ok(FileDevice {
            file,
            path,
            size_bytes,
            block_size_bytes,
            direct: options.direct,
            read_only: options.read_only,
            is_block_device,
            zero_range_ok: AtomicBool::new(true),
            punch_hole_ok: AtomicBool::new(!is_block_device),
            nowait_read_ok: AtomicBool::new(!options.direct),
            nowait_write_ok: AtomicBool::new(!options.direct && !options.read_only),
        })
    }

    /// Creates (or truncates) a regular file of `size_bytes` and opens it.
    pub fn create(
        path: impl AsRef<Path>,
        size_bytes: u64,
        options: FileOptions,
    ) -> Result<FileDevice, BlockError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .and_then(|f| f.set_len(size_bytes).map(|()| f))
            .map_err(|source| BlockError::Open {
                target: path.display().to_string(),
                source,
            })?;
        drop(file);
        FileDevice::open(path, options)
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn check_writable(
        &self,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::Device {
                op,
                offset_bytes,
                len_bytes,
                source: io::Error::from_raw_os_error(libc::EROFS),
            });
        }
        Ok(())
    }

    /// Aligned range `[start, end)` covering `[offset, offset+len)`.
    fn aligned_span(offset_bytes: u64, len_bytes: u64) -> (u64, u64) {
        let a = DIRECT_ALIGN as u64;
        let start = offset_bytes / a * a;
        let end = (offset_bytes + len_bytes).div_ceil(a) * a;
        (start, end)
    }

    fn direct_read(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let want = (buf.len() - done).min(DIRECT_CHUNK_BYTES);
            let off = offset_bytes + done as u64;
            let (start, end) = Self::aligned_span(off, want as u64);
            let span = usize_len(end - start)?;
            let mut bounce = AlignedBuf::new_zeroed(span, DIRECT_ALIGN)?;
            let b = &mut bounce.as_mut_slice()[..span];
            self.read_exact_at_eof_zero(b, start)?;
            let skip = usize_len(off - start)?;
            buf[done..done + want].copy_from_slice(&b[skip..skip + want]);
            done += want;
        }
        Ok(())
    }

    /// `read_exact_at`, except that bytes past the end of a file whose size is not a
    /// multiple of the alignment read as zeros (the bounce buffer may reach past it).
    fn read_exact_at_eof_zero(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self
                .file
                .read_at(&mut buf[done..], offset_bytes + done as u64)
            {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset_bytes`; with `fua`, durable when it returns. A FUA
    /// write syncs only its own range (`RWF_DSYNC`), not every dirty page of the file: a
    /// small durable write (a journal block, a heartbeat) costs the same however much else
    /// is dirty. Kernels without `RWF_DSYNC` get the write and then `fdatasync`.
    fn write_all_at(&self, buf: &[u8], offset_bytes: u64, fua: bool) -> io::Result<()> {
        if !fua {
            return self.file.write_all_at(buf, offset_bytes);
        }
        match sys::pwrite_all_dsync(&self.file, buf, offset_bytes) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                self.file.write_all_at(buf, offset_bytes)?;
                self.file.sync_data()
            }
            r => r,
        }
    }

    fn direct_write(&self, buf: &[u8], offset_bytes: u64, fua: bool) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let want = (buf.len() - done).min(DIRECT_CHUNK_BYTES);
            let off = offset_bytes + done as u64;
            let (start, end) = Self::aligned_span(off, want as u64);
            let span = usize_len(end - start)?;
            let mut bounce = AlignedBuf::new_zeroed(span, DIRECT_ALIGN)?;
            let b = &mut bounce.as_mut_slice()[..span];
            let skip = usize_len(off - start)?;
            if skip != 0 || want != span {
                // Read-modify-write of the partial head/tail blocks. Not atomic against a
                // concurrent unaligned write to the same 4 KiB block; callers that write
                // concurrently use aligned I/O.
                self.read_exact_at_eof_zero(b, start)?;
            }
            b[skip..skip + want].copy_from_slice(&buf[done..done + want]);
            // Do not extend a regular file past its size with the aligned tail.
            let limit = usize_len(self.size_bytes.saturating_sub(start))?.min(span);
            let limit = limit.next_multiple_of(DIRECT_ALIGN).min(span);
            self.write_all_at(&b[..limit], start, fua)?;
            done += want;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        let mut done = 0u64;
        while done < len_bytes {
            let n = (len_bytes - done).min(ZERO_CHUNK_BYTES as u64);
            let n_usize =
                usize_len(n).map_err(|e| device_err("write_zeroes", offset_bytes, len_bytes, e))?;
            self.write_at(
                &zeros[..n_usize],
                offset_bytes + done,
                WriteFlags::default(),
            )?;
            done += n;
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        self.check_range("read", offset_bytes, len)?;
        let r = if self.direct {
            self.direct_read(buf, offset_bytes)
        } else {
            self.file.read_exact_at(buf, offset_bytes)
        };
        r.map_err(|e| device_err("read", offset_bytes, len, e))
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64, flags: WriteFlags) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        self.check_range("write", offset_bytes, len)?;
        self.check_writable("write", offset_bytes, len)?;
        let r = if self.direct {
            self.direct_write(buf, offset_bytes, flags.fua)
        } else {
            self.write_all_at(buf, offset_bytes, flags.fua)
        };
        let op = if flags.fua { "write (fua)" } else { "write" };
        r.map_err(|e| device_err(op, offset_bytes, len, e))
    }

    fn try_read_at_nowait(&self, buf: &mut [u8], offset_bytes: u64) -> Result<bool, BlockError> {
        self.check_range("read", offset_bytes, buf.len() as u64)?;
        if !self.nowait_read_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match sys::pread_nowait(&self.file, buf, offset_bytes) {
            Ok(n) => Ok(n == buf.len()),
            Err(e) => nowait_outcome(&self.nowait_read_ok, e),
        }
    }

    fn try_write_at_nowait(&self, buf: &[u8], offset_bytes: u64) -> Result<bool, BlockError> {
        self.check_range("write", offset_bytes, buf.len() as u64)?;
        if self.direct || self.read_only {
            return Ok(false);
        }
        if self.nowait_write_ok.load(Ordering::Relaxed) {
            match sys::pwrite_nowait(&self.file, buf, offset_bytes) {
                Ok(n) => return Ok(n == buf.len()),
                Err(e) => {
                    let supported = nowait_outcome(&self.nowait_write_ok, e)?;
                    if self.nowait_write_ok.load(Ordering::Relaxed) {
                        return Ok(supported);
                    }
                }
            }
        }
        // The kernel cannot say (no RWF_NOWAIT for buffered writes on this filesystem). A
        // small buffered write only copies into the page cache and blocks only under
        // dirty-page throttling, so it is treated as non-blocking.
        if buf.len() > INLINE_BUFFERED_WRITE_BYTES {
            return Ok(false);
        }
        self.file
            .write_all_at(buf, offset_bytes)
            .map_err(|e| device_err("write", offset_bytes, buf.len() as u64, e))?;
        Ok(true)
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| device_err("flush", 0, 0, e))
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.check_range("write_zeroes", offset_bytes, len_bytes)?;
        self.check_writable("write_zeroes", offset_bytes, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        // A regular file gets a hole: it reads as zeros and gives the space back, as
        // NBD's WRITE_ZEROES without NO_HOLE allows (ZERO_RANGE would allocate the whole
        // range, which turns mkfs of a sparse 1 TiB LUN file into gigabytes). A block
        // device keeps ZERO_RANGE first.
        let zero_range = (&self.zero_range_ok, FallocMode::ZeroRange);
        let punch_hole = (&self.punch_hole_ok, FallocMode::PunchHole);
        let order = if self.is_block_device {
            [zero_range, punch_hole]
        } else {
            [punch_hole, zero_range]
        };
        for (flag, mode) in order {
            if !flag.load(Ordering::Relaxed) {
                continue;
            }
            match sys::fallocate(&self.file, mode, offset_bytes, len_bytes) {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                    ) =>
                {
                    tracing::debug!(path = %self.path.display(), ?mode, "fallocate unsupported, falling back");
                    flag.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(device_err("write_zeroes", offset_bytes, len_bytes, e)),
            }
        }
        self.write_zero_buffers(offset_bytes, len_bytes)
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.check_range("trim", offset_bytes, len_bytes)?;
        self.check_writable("trim", offset_bytes, len_bytes)?;
        if len_bytes == 0 || !self.punch_hole_ok.load(Ordering::Relaxed) || self.is_block_device {
            // Trimmed contents are unspecified: doing nothing is a valid trim.
            return Ok(());
        }
        match sys::fallocate(&self.file, FallocMode::PunchHole, offset_bytes, len_bytes) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                ) =>
            {
                self.punch_hole_ok.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(device_err("trim", offset_bytes, len_bytes, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bc-file-{}-{name}", std::process::id()));
        dir
    }

    fn round_trip(direct: bool) {
        let path = temp_path(if direct { "direct" } else { "buffered" });
        let dev = FileDevice::create(
            &path,
            1 << 20,
            FileOptions {
                direct,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(dev.size_bytes(), 1 << 20);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        dev.write_at(&data, 1234, WriteFlags::FUA).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 1234).unwrap();
        assert_eq!(back, data);
        // Neighbours untouched.
        let mut head = vec![1u8; 1234];
        dev.read_at(&mut head, 0).unwrap();
        assert!(head.iter().all(|&b| b == 0));
        dev.flush().unwrap();
        dev.write_zeroes(2000, 5000).unwrap();
        let mut z = vec![1u8; 5000];
        dev.read_at(&mut z, 2000).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        let mut tail = vec![0u8; 1234 + 10_000 - 7000];
        dev.read_at(&mut tail, 7000).unwrap();
        assert_eq!(tail, data[7000 - 1234..]);
        dev.trim(0, 1 << 20).unwrap();
        let err = dev.read_at(&mut [0u8; 16], (1 << 20) - 8).unwrap_err();
        assert!(matches!(err, BlockError::OutOfRange { .. }));
        drop(dev);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn buffered_round_trip() {
        round_trip(false);
    }

    #[test]
    fn direct_round_trip() {
        round_trip(true);
    }

    #[test]
    fn nowait_paths_match_blocking_paths() {
        let path = temp_path("nowait");
        let dev = FileDevice::create(&path, 1 << 20, FileOptions::default()).unwrap();
        let data = vec![0x3cu8; 8192];
        if !dev.try_write_at_nowait(&data, 4096).unwrap() {
            dev.write_at(&data, 4096, WriteFlags::default()).unwrap();
        }
        let mut back = vec![0u8; 8192];
        // Just written, so cached: a non-blocking read must succeed and see the data.
        assert!(dev.try_read_at_nowait(&mut back, 4096).unwrap());
        assert_eq!(back, data);
        assert!(matches!(
            dev.try_read_at_nowait(&mut back, (1 << 20) - 10),
            Err(BlockError::OutOfRange { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn missing_file_is_open_error() {
        let err = FileDevice::open("/nonexistent/lun.img", FileOptions::default()).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }));
    }

    #[test]
    fn second_lock_is_refused() {
        let path = temp_path("lock");
        let opts = FileOptions {
            lock: true,
            ..Default::default()
        };
        let _a = FileDevice::create(&path, 4096, opts).unwrap();
        let err = FileDevice::open(&path, opts).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }), "{err}");
        assert!(format!("{:?}", err).contains("locked"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn read_only_refuses_writes() {
        let path = temp_path("ro");
        drop(FileDevice::create(&path, 4096, FileOptions::default()).unwrap());
        let dev = FileDevice::open(
            &path,
            FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            dev.write_at(&[1], 0, WriteFlags::default()),
            Err(BlockError::Device { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
