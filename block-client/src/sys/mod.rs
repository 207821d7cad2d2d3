//! The only unsafe code of the block layer: aligned buffers for `O_DIRECT`, the
//! `BLKGETSIZE64` ioctl, `fallocate` and `flock`, socket options, and pipes that socket
//! data is spliced into. Everything here is wrapped in safe types
//! and functions; callers outside this module never see a raw pointer.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A heap buffer whose address and length are multiples of its alignment, for `O_DIRECT`.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Vec<u8>`); no aliasing pointer
// escapes except through `&self`/`&mut self` borrows.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is `Sync`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zeroed buffer of `len` bytes aligned to `align` (a power of two). `len`
    /// is rounded up to a multiple of `align`, and at least one `align` is allocated.
    pub fn new_zeroed(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let rounded = len
            .max(1)
            .checked_next_multiple_of(align)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let layout = Layout::from_size_align(rounded, align)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `layout` has a non-zero size (rounded >= align >= 1) and a valid
        // power-of-two alignment, checked by `Layout::from_size_align`.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to a live allocation of `layout.size()` initialized (zeroed)
        // bytes owned by `self`; `&mut self` guarantees exclusive access for the borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly `layout` and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.layout.size())
            .field("align", &self.layout.align())
            .finish()
    }
}

/// `_IOR(0x12, 114, u64)` from <linux/fs.h>; not exported by the libc crate.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Size in bytes of the kernel block device open as `file` (ioctl `BLKGETSIZE64`).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: `file` keeps the descriptor open for the call; BLKGETSIZE64 writes exactly one
    // u64 through the pointer, which points to the live local `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical sector size of a kernel block device (ioctl `BLKSSZGET`).
pub fn block_device_sector_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: `file` keeps the descriptor open; BLKSSZGET writes one c_int through the
    // pointer to the live local `size`.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut size as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(size).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// How `fallocate` should change a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallocMode {
    /// Deallocate the range, keeping the file size (`PUNCH_HOLE | KEEP_SIZE`).
    PunchHole,
    /// Zero the range, keeping the file size (`ZERO_RANGE | KEEP_SIZE`).
    ZeroRange,
}

/// Calls `fallocate(2)` on `file`.
pub fn fallocate(
    file: &File,
    mode: FallocMode,
    offset_bytes: u64,
    len_bytes: u64,
) -> io::Result<()> {
    let flags = match mode {
        FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
    };
    let off = libc::off_t::try_from(offset_bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let len = libc::off_t::try_from(len_bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain syscall on a descriptor kept open by `file`; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), flags, off, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes a non-blocking exclusive `flock` on `file`. Fails with `WouldBlock` when another
/// open file description holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor kept open by `file`; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SIGINT and SIGTERM, blocked in the calling thread (and every thread it starts later) so
/// that [`TerminationSignals::wait`] can receive them synchronously.
#[derive(Debug)]
pub struct TerminationSignals {
    set: libc::sigset_t,
}

impl TerminationSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread. Call before starting threads.
    pub fn block() -> io::Result<TerminationSignals> {
        // SAFETY: `sigset_t` is a plain bit set for which all-zero bytes are a valid value;
        // it is initialized by `sigemptyset` right after.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a live, writable sigset_t owned by this frame; the signal numbers
        // are valid constants.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(TerminationSignals { set })
    }

    /// Waits for SIGINT or SIGTERM and returns its number.
    pub fn wait(&self) -> io::Result<i32> {
        let mut sig: libc::c_int = 0;
        // SAFETY: `self.set` is an initialized sigset_t and `sig` a live c_int that sigwait
        // writes once.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}

/// `preadv2(RWF_NOWAIT)`: reads only if the data is already in the page cache. Returns the
/// bytes read; fails with `WouldBlock` (EAGAIN) when it would have to wait for the device.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset_bytes: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset_bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, a live, writable slice borrowed for the whole call; the
    // count is 1 and `file` keeps the descriptor open.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `pwritev2(RWF_DSYNC)` of all of `buf`: each part is durable (data, and the metadata
/// needed to read it back) when its call returns, and only this range is written back,
/// unlike `fdatasync`, which writes back every dirty page of the file. Fails with
/// `Unsupported` when the kernel has no per-write `RWF_DSYNC` (before Linux 4.7).
pub fn pwrite_all_dsync(file: &File, buf: &[u8], offset_bytes: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let off = offset_bytes
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        let rest = &buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: `iov` describes `rest`, a live slice borrowed for the whole call, which
        // the kernel only reads; the count is 1 and `file` keeps the descriptor open.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EOPNOTSUPP | libc::EINVAL) if done == 0 => {
                        return Err(io::Error::new(io::ErrorKind::Unsupported, e));
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// `pwritev2(RWF_NOWAIT)`: writes only if it can do so without blocking. Returns the bytes
/// written; fails with `WouldBlock` (EAGAIN) when it would block.
pub fn pwrite_nowait(file: &File, buf: &[u8], offset_bytes: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset_bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, a live slice borrowed for the whole call, which the
    // kernel only reads; the count is 1 and `file` keeps the descriptor open.
    let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Asks for socket buffers of `bytes` in both directions. With `CAP_NET_ADMIN` (root)
/// `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE` set them past `net.core.wmem_max` / `rmem_max`;
/// without it, `SO_SNDBUF` / `SO_RCVBUF` ask and the kernel caps the request at those
/// limits. An error leaves the socket working with the buffers it had.
pub fn set_socket_buffers(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let val = libc::c_int::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer size out of range"))?;
    for (forced, asked) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        if let Err(e) = set_int_option(fd, forced, val) {
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(e);
            }
            set_int_option(fd, asked, val)?;
        }
    }
    Ok(())
}

/// The socket's current buffer sizes as the kernel reports them (`SO_SNDBUF`,
/// `SO_RCVBUF`; the kernel doubles a request to leave room for its bookkeeping).
pub fn socket_buffers(fd: &impl AsRawFd) -> io::Result<(usize, usize)> {
    let get = |opt| -> io::Result<usize> {
        let mut val: libc::c_int = 0;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `val` and `len` are live locals for the whole call; `len` holds the size
        // of `val`, so the kernel writes at most that many bytes into it.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_mut(&mut val).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        usize::try_from(val).map_err(|_| io::Error::other("negative socket buffer size"))
    };
    Ok((get(libc::SO_SNDBUF)?, get(libc::SO_RCVBUF)?))
}

fn set_int_option(fd: &impl AsRawFd, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: `val` is a live c_int for the whole call and the length passed is its size;
    // the kernel only reads it. The descriptor is borrowed from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            std::ptr::from_ref(&val).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
                .unwrap_or(libc::socklen_t::MAX),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A pipe that a read's data is spliced into (see
/// [`BlockDevice::submit_read_to_pipe`](crate::BlockDevice::submit_read_to_pipe)). Both
/// ends are non-blocking (except in a pipe made by `Pipe::new_blocking`, which the NBD
/// client keeps for itself): a full pipe gives `WouldBlock` instead of a wait, because the
/// one thread that fills it is also the one that must go on reading the LUN's replies.
#[derive(Debug)]
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    capacity_bytes: usize,
}

impl Pipe {
    /// A new pipe of up to `capacity_bytes` (rounded up by the kernel to a power of two of
    /// pages), or of the largest size the kernel allows below that, which
    /// [`capacity_bytes`](Self::capacity_bytes) says.
    pub fn new(capacity_bytes: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a live array of two c_ints, which pipe2 fills on success.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are new open descriptors owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Past fs.pipe-max-size (1 MiB by default) the kernel refuses (EPERM) unless the
        // process has CAP_SYS_RESOURCE; then the largest size it allows is taken.
        let mut ask = libc::c_int::try_from(capacity_bytes).unwrap_or(libc::c_int::MAX);
        while ask > 4096 {
            // SAFETY: F_SETPIPE_SZ takes an int; `wr` is open.
            if unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, ask) } >= 0 {
                break;
            }
            ask /= 2;
        }
        // SAFETY: F_GETPIPE_SZ takes no argument and returns an int; `wr` is open.
        let got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity_bytes = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        Ok(Pipe {
            rd,
            wr,
            capacity_bytes,
        })
    }

    /// Like [`new`](Self::new), but both ends block: for
    /// [`send_by_reference`](Self::send_by_reference), whose splice into a socket must wait
    /// for room the way a write does (a non-blocking pipe end makes splice(2) give up at
    /// once when the socket is full).
    pub(crate) fn new_blocking(capacity_bytes: usize) -> io::Result<Pipe> {
        let pipe = Pipe::new(capacity_bytes)?;
        for fd in [pipe.rd.as_raw_fd(), pipe.wr.as_raw_fd()] {
            // SAFETY: F_GETFL and F_SETFL take and return ints; `fd` is open (owned by
            // `pipe`).
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            // SAFETY: as above.
            if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(pipe)
    }

    /// How many bytes the pipe holds when every one of its slots holds one full page.
    /// Spliced socket data fills a slot with what one socket buffer fragment holds: often
    /// several pages (a Unix socket's are up to 32 KiB), sometimes less than one.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// The end the pipe's contents are taken from (by splice(2) or [`read`](Self::read)).
    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    /// Writes what fits of `data` without waiting; `WouldBlock` when the pipe is full (a
    /// pipe made by `new_blocking` waits for room instead).
    pub fn write(&self, data: &[u8]) -> io::Result<usize> {
        // SAFETY: `data` is a live slice for the whole call, which the kernel only reads.
        let n = unsafe { libc::write(self.wr.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Reads what is there into `buf` without waiting; `WouldBlock` when the pipe is empty.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live, writable slice for the whole call and its length bounds
        // what the kernel writes.
        let n = unsafe { libc::read(self.rd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Reads everything the pipe holds now, without waiting for more.
    pub fn read_available(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves up to `len` bytes from the socket `src` into the pipe by reference (the
    /// socket's pages, not a copy), without waiting: `WouldBlock` when the socket has
    /// nothing yet or the pipe is full, `Ok(0)` at end of stream.
    pub(crate) fn splice_from(&self, src: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        // SAFETY: both descriptors are open for the call (borrowed and owned); null offsets
        // are required for a socket and a pipe.
        let n = unsafe {
            libc::splice(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                self.wr.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Sends `header` (copied) and then `data` on the socket `sock` by reference, through
    /// this pipe, which must be empty (it is between requests: a send that failed leaves it
    /// to be dropped): vmsplice(2) puts references to `data`'s pages in the
    /// pipe (no copy) and splice(2) moves them into the socket's buffers (no copy), as much
    /// as the pipe holds at a time. The kernel reads `data`'s memory until the peer has
    /// received it, so the caller must not change it before then (see
    /// [`BlockDevice::submit_write_by_reference`](crate::BlockDevice::submit_write_by_reference)).
    /// Waits for room in the socket as a write would (its send timeout applies; the pipe
    /// must block, see [`new_blocking`](Self::new_blocking)). On an error part of the
    /// request may have been sent, and the pipe may still hold some of it: drop the pipe.
    pub(crate) fn send_by_reference(
        &self,
        sock: BorrowedFd<'_>,
        header: &[u8],
        data: &[u8],
    ) -> io::Result<()> {
        let mut queued = 0;
        while queued < header.len() {
            queued += self.write(&header[queued..]).or_else(|e| match e.kind() {
                io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            })?;
        }
        let mut sent = 0;
        while sent < data.len() {
            let rest = &data[sent..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr().cast_mut().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: `iov` describes the live slice `rest`, which the kernel only reads
            // (it takes references to its pages); the count is 1 and `wr` is open.
            let n = unsafe { libc::vmsplice(self.wr.as_raw_fd(), &raw const iov, 1, 0) };
            let n = match usize::try_from(n) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            sent += n;
            self.splice_out(sock, std::mem::take(&mut queued) + n, sent < data.len())?;
        }
        self.splice_out(sock, queued, false)
    }

    /// Moves the next `len` bytes of this pipe into the socket `sock`; `more` tells the
    /// socket that more follows at once (never on a request's last bytes, which TCP would
    /// otherwise hold back).
    fn splice_out(&self, sock: BorrowedFd<'_>, mut len: usize, more: bool) -> io::Result<()> {
        let flags = if more { libc::SPLICE_F_MORE } else { 0 };
        while len > 0 {
            // SAFETY: both descriptors are open for the call; null offsets are required for
            // a pipe and a socket.
            let m = unsafe {
                libc::splice(
                    self.rd.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    len,
                    flags,
                )
            };
            match usize::try_from(m) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => len -= m,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// True when at least one more slot is free.
    pub(crate) fn has_room(&self) -> io::Result<bool> {
        Ok(poll_one(self.wr.as_fd(), libc::POLLOUT, 0)? & libc::POLLOUT != 0)
    }
}

/// Waits until `fd` is readable, at end of stream, or in error.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>) -> io::Result<()> {
    poll_one(fd, libc::POLLIN, -1).map(|_| ())
}

/// poll(2) on one descriptor; returns its `revents` (0 on timeout). Retries on EINTR.
fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout_ms: libc::c_int,
) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is a live pollfd and the count is 1; the descriptor is borrowed open.
        let rc = unsafe { libc::poll(&raw mut p, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(p.revents);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
