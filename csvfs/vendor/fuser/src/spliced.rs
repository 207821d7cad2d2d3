//! csvfs patch: requests read from `/dev/fuse` with splice(2).
//!
//! Spliced, the kernel moves a write's data into the pipe as the writer's own pages, by
//! reference, instead of copying it into the daemon's buffer. The request's header and
//! arguments are read out of the pipe; the data stays there for
//! [`Filesystem::write_spliced`](crate::Filesystem::write_spliced), which may splice it on
//! (to a socket, say) without ever copying it through the daemon.
//!
//! The kernel fails a request (EIO) whose pages do not fit the pipe's slots, one per page
//! plus one for the header, so the pipe must hold `max_write` and two more pages:
//! [`RequestPipe::new`] refuses a smaller one.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

use crate::channel::Channel;

/// Bytes of `fuse_in_header`.
const IN_HEADER_BYTES: usize = 40;
/// Bytes of `fuse_write_in` (ABI 7.9 and later).
const WRITE_IN_BYTES: usize = 40;
/// `FUSE_WRITE`.
const OPCODE_WRITE: u32 = 16;
/// A splicing event loop goes back to reading requests after this many requests in a row
/// that were not large writes.
pub(crate) const SPLICE_SMALL_RUN: usize = 8;
/// Requests up to this size are read out of the pipe whole, in one system call; only a
/// larger write leaves its data in the pipe.
pub(crate) const SPLICE_WRITE_MIN_BYTES: usize = 64 << 10;

/// The data of a write request, left in a pipe by the kernel (see
/// [`Filesystem::write_spliced`](crate::Filesystem::write_spliced)).
#[derive(Clone, Copy, Debug)]
pub struct SplicedWrite<'a> {
    pipe: BorrowedFd<'a>,
    len: usize,
}

impl SplicedWrite<'_> {
    /// Bytes of data: the next `len` bytes in [`pipe`](Self::pipe).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a write of no data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pipe's read end. The data is its next [`len`](Self::len) bytes; whatever is
    /// left of them when the request's handler returns is dropped unread.
    pub fn pipe(&self) -> BorrowedFd<'_> {
        self.pipe
    }

    /// Reads the data out of the pipe (a copy).
    ///
    /// # Errors
    /// The read's error, or `UnexpectedEof` when the pipe holds less than `len` bytes
    /// (some were taken already).
    pub fn read_to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        read_exact(self.pipe, &mut out)?;
        Ok(out)
    }
}

/// An event loop's pipe for spliced requests.
#[derive(Debug)]
pub(crate) struct RequestPipe {
    rd: OwnedFd,
    wr: OwnedFd,
    capacity_bytes: usize,
    /// Where unread data is spliced to be dropped.
    null: File,
}

impl RequestPipe {
    /// A pipe of at least `bytes`, or an error when the kernel will not size one so.
    pub(crate) fn new(bytes: usize) -> io::Result<RequestPipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a live array of two c_ints, which pipe2 fills on success.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are new open descriptors owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The read end does not wait: a request's bytes are all in the pipe once the splice
        // returns, so a read that finds it empty has been told a wrong length.
        // SAFETY: F_SETFL takes an int; `rd` is open.
        if unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let ask = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pipe size"))?;
        // SAFETY: F_SETPIPE_SZ takes an int; `wr` is open.
        if unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, ask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_GETPIPE_SZ takes no argument and returns an int; `wr` is open.
        let got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity_bytes = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        if capacity_bytes < bytes {
            return Err(io::Error::other(format!(
                "pipe holds {capacity_bytes} bytes, {bytes} asked"
            )));
        }
        Ok(RequestPipe {
            rd,
            wr,
            capacity_bytes,
            null: File::options().write(true).open("/dev/null")?,
        })
    }

    /// Waits for the next request and moves it into the pipe; returns its size. Retries
    /// what reading the device retries (ENOENT: the request was interrupted; EINTR; EAGAIN).
    pub(crate) fn receive(&self, ch: &Channel) -> nix::Result<usize> {
        loop {
            // SAFETY: both descriptors are open for the call; null offsets are required for
            // a character device and a pipe.
            let n = unsafe {
                libc::splice(
                    ch.as_fd().as_raw_fd(),
                    std::ptr::null_mut(),
                    self.wr.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.capacity_bytes,
                    0,
                )
            };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => match Errno::last() {
                    Errno::ENOENT | Errno::EINTR | Errno::EAGAIN => {}
                    e => return Err(e),
                },
            }
        }
    }

    /// Reads the request of `size` bytes from the pipe into `buf`: all of it, or, for a
    /// large write, its header and arguments only. Returns the bytes of `buf` that hold the
    /// request, and the length of the data left in the pipe (0 when none is).
    pub(crate) fn take_request(&self, buf: &mut [u8], size: usize) -> io::Result<(usize, usize)> {
        let short = || io::Error::new(io::ErrorKind::InvalidData, "short FUSE request");
        if size <= SPLICE_WRITE_MIN_BYTES || size < IN_HEADER_BYTES + WRITE_IN_BYTES {
            let b = buf.get_mut(..size).ok_or_else(short)?;
            read_exact(self.rd.as_fd(), b)?;
            return Ok((size, 0));
        }
        let head = IN_HEADER_BYTES + WRITE_IN_BYTES;
        read_exact(self.rd.as_fd(), &mut buf[..head])?;
        let field = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let (len, opcode) = (field(0) as usize, field(4));
        let data_len = size - head;
        // fuse_write_in.size sits at byte 16 of the arguments.
        if opcode != OPCODE_WRITE || len != size || field(IN_HEADER_BYTES + 16) as usize != data_len
        {
            let b = buf.get_mut(head..size).ok_or_else(short)?;
            read_exact(self.rd.as_fd(), b)?;
            return Ok((size, 0));
        }
        // The header as if the write carried no data: the data stays in the pipe.
        let head_u32 = u32::try_from(head).unwrap_or(u32::MAX);
        buf[0..4].copy_from_slice(&head_u32.to_ne_bytes());
        buf[IN_HEADER_BYTES + 16..IN_HEADER_BYTES + 20].copy_from_slice(&0u32.to_ne_bytes());
        Ok((head, data_len))
    }

    /// The spliced data of a write of `len` bytes.
    pub(crate) fn data(&self, len: usize) -> SplicedWrite<'_> {
        SplicedWrite {
            pipe: self.rd.as_fd(),
            len,
        }
    }

    /// Drops whatever the handler left in the pipe, without copying it.
    pub(crate) fn discard_rest(&self) -> io::Result<()> {
        loop {
            let mut left: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int to the live `left`; `rd` is open.
            if unsafe { libc::ioctl(self.rd.as_raw_fd(), libc::FIONREAD, &raw mut left) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let Ok(left @ 1..) = usize::try_from(left) else {
                return Ok(());
            };
            // SAFETY: both descriptors are open for the call; the pipe needs a null offset,
            // and /dev/null ignores its own.
            let n = unsafe {
                libc::splice(
                    self.rd.as_raw_fd(),
                    std::ptr::null_mut(),
                    self.null.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes from the non-blocking `fd`; `UnexpectedEof` when it
/// holds fewer.
fn read_exact(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a live, writable slice for the whole call and its length bounds
        // what the kernel writes.
        let n = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Err(io::ErrorKind::UnexpectedEof.into()),
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}
