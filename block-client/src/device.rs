//! The `BlockDevice` trait and its error type.

use std::fmt;
use std::io;

use crate::sys::Pipe;

/// Flags for a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
}

impl WriteFlags {
    /// A write with force-unit-access set.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// Why a block operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The path to the LUN is gone: connection lost, refused or timed out. The device
    /// itself may be fine; another path (redirected I/O) may still reach it.
    #[error("path to the LUN lost during {op}")]
    PathLost {
        /// The operation that was in flight.
        op: &'static str,
        /// What broke.
        #[source]
        source: io::Error,
    },
    /// The device answered and reported an error for this request.
    #[error("device error during {op} at byte {offset_bytes} ({len_bytes} bytes)")]
    Device {
        /// The operation.
        op: &'static str,
        /// Byte offset of the request.
        offset_bytes: u64,
        /// Length of the request.
        len_bytes: u64,
        /// The error the device reported (errno where known).
        #[source]
        source: io::Error,
    },
    /// The request reaches past the end of the device or is otherwise malformed.
    #[error("{op} of {len_bytes} bytes at byte {offset_bytes} is outside the device of {size_bytes} bytes")]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// Byte offset of the request.
        offset_bytes: u64,
        /// Length of the request.
        len_bytes: u64,
        /// Size of the device.
        size_bytes: u64,
    },
    /// The device does not support this operation.
    #[error("{op} is not supported by this device")]
    Unsupported {
        /// The operation.
        op: &'static str,
    },
    /// Opening or negotiating with the device failed.
    #[error("open {target}")]
    Open {
        /// What was being opened (path or URI).
        target: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The device was closed and refuses further work.
    #[error("device is closed")]
    Closed,
}

impl BlockError {
    /// True when the failure is the loss of the path to the LUN rather than a device error.
    pub fn is_path_lost(&self) -> bool {
        matches!(self, BlockError::PathLost { .. } | BlockError::Closed)
    }
}

/// Where an asynchronous request reports: its outcome (the data of a read, an empty vector
/// for a write). It runs on the device's completion thread, so it must not block.
pub type Completion = Box<dyn FnOnce(Result<Vec<u8>, BlockError>) + Send>;

/// Where a read into a pipe reports (see [`BlockDevice::submit_read_to_pipe`]): the pipe,
/// now holding the read's bytes after what it held before, or why it does not. On an error
/// the pipe is gone (its contents are unknown) and the read did not happen or its data was
/// dropped: a device error, a lost path, or [`BlockError::Unsupported`] when the data could
/// not go through the pipe (it filled up, or the server sent the reply in a shape that does
/// not fit one); the caller reads again with [`BlockDevice::read_at`]. It runs on the
/// device's completion thread, so it must not block.
pub type PipeCompletion = Box<dyn FnOnce(Result<Pipe, BlockError>) + Send>;

/// An asynchronous request (see [`BlockDevice::submit`]).
#[derive(Debug, Clone, Copy)]
pub enum AsyncIo<'a> {
    /// Read `len_bytes` at `offset_bytes`.
    Read {
        /// Where on the device.
        offset_bytes: u64,
        /// How many bytes.
        len_bytes: u32,
    },
    /// Write `buf` at `offset_bytes`, without FUA; `buf` is sent before `submit` returns.
    Write {
        /// The data.
        buf: &'a [u8],
        /// Where on the device.
        offset_bytes: u64,
    },
}

/// One shared block device (the LUN). Implementations are usable at the same time from
/// many threads; async callers use `tokio::task::spawn_blocking` or an implementation's
/// own async methods. Offsets and lengths are in bytes.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;

    /// Preferred I/O block size in bytes (a power of two, at least 512).
    fn block_size_bytes(&self) -> u32 {
        4096
    }

    /// Largest single request in bytes; larger requests are split by the implementation.
    fn max_request_bytes(&self) -> u32 {
        32 << 20
    }

    /// Reads `buf.len()` bytes starting at `offset_bytes`.
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError>;

    /// Writes `buf` at `offset_bytes`. With `flags.fua` the data is durable on return.
    fn write_at(&self, buf: &[u8], offset_bytes: u64, flags: WriteFlags) -> Result<(), BlockError>;

    /// Makes every completed write durable. A flush does not answer for writes that a
    /// path to the LUN acknowledged and then lost before any flush covered them (a LUN
    /// server that restarted may have dropped them): a caller that must know uses
    /// [`flush_since`] with a mark from [`write_loss_count`](Self::write_loss_count).
    fn flush(&self) -> Result<(), BlockError>;

    /// How many times so far writes that this device acknowledged were lost with their path
    /// to the LUN before a flush covered them. Take it before a group of writes and pass it
    /// to [`flush_since`] after them. Never falls; stays 0 for a device whose acknowledged
    /// writes cannot be lost that way (the default).
    fn write_loss_count(&self) -> u64 {
        0
    }

    /// Writes zeros over a range (may deallocate it).
    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError>;

    /// Discards a range; its contents become unspecified.
    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError>;

    /// Reads like [`read_at`](Self::read_at), but only if that cannot block (the data is
    /// cached). Returns `Ok(false)`, with `buf` unspecified, when it would block or the
    /// device cannot tell; the caller then uses `read_at`. Servers use it to answer cached
    /// reads inline instead of handing them to a worker thread.
    fn try_read_at_nowait(&self, buf: &mut [u8], offset_bytes: u64) -> Result<bool, BlockError> {
        let _ = (buf, offset_bytes);
        Ok(false)
    }

    /// Writes like [`write_at`](Self::write_at) without FUA, but only if that cannot block.
    /// Returns `Ok(false)` when it would block or the device cannot tell; the caller then
    /// uses `write_at` with the same data (a partial write is completed by that rewrite).
    fn try_write_at_nowait(&self, buf: &[u8], offset_bytes: u64) -> Result<bool, BlockError> {
        let _ = (buf, offset_bytes);
        Ok(false)
    }

    /// Starts `io` and reports its outcome to `done` instead of waiting. Returns `done`
    /// unused when the device cannot start it now (no asynchronous requests, no live
    /// connection, too large); the caller then uses `read_at`/`write_at`. A request lost
    /// with its connection is not resent: `done` gets the path-lost error, and a retry with
    /// the blocking methods resends it.
    fn submit(&self, io: AsyncIo<'_>, done: Completion) -> Result<(), Completion> {
        let _ = io;
        Err(done)
    }

    /// Starts a write of `buf` at `offset_bytes` like [`submit`](Self::submit), but the
    /// device may send `buf`'s pages by reference instead of copying them (the NBD client
    /// splices them into its socket), so it may go on reading that memory after this
    /// returns. The caller keeps the memory unchanged until `done` reports success. After
    /// `done` reports a failure the memory may still be read at any later time (a request
    /// that a LUN server cut off from this node had queued), so the caller must never
    /// change it again: unmap it, or leak it. `done` handed back unused (the device cannot
    /// start the write now) means nothing of `buf` was taken. The default copies, like
    /// `submit`.
    fn submit_write_by_reference(
        &self,
        buf: &[u8],
        offset_bytes: u64,
        done: Completion,
    ) -> Result<(), Completion> {
        self.submit(AsyncIo::Write { buf, offset_bytes }, done)
    }

    /// Largest read [`submit_read_to_pipe`](Self::submit_read_to_pipe) takes now; 0 when
    /// the device has no pipe path (the default). It may fall while the device runs: a
    /// read that found its pipe full lowers it to what such a pipe holds from this device.
    fn pipe_read_max_bytes(&self) -> u32 {
        0
    }

    /// Starts a read of `len_bytes` at `offset_bytes` whose data the device appends to
    /// `pipe` (spliced from its socket where it can, so the data is not copied through this
    /// process) and reports to `done`. Returns `pipe` and `done` unused when the device
    /// cannot do that now (no such path, no live connection, too large); the caller then
    /// uses [`submit`](Self::submit) or [`read_at`](Self::read_at). The default cannot.
    fn submit_read_to_pipe(
        &self,
        offset_bytes: u64,
        len_bytes: u32,
        pipe: Pipe,
        done: PipeCompletion,
    ) -> Result<(), (Pipe, PipeCompletion)> {
        let _ = (offset_bytes, len_bytes);
        Err((pipe, done))
    }

    /// Hands back the buffer of a read that [`submit`](Self::submit) delivered, once the
    /// caller is done with it, so that the next read reuses it instead of allocating and
    /// zeroing a fresh one. The default drops it.
    fn recycle_buffer(&self, buf: Vec<u8>) {
        drop(buf);
    }

    /// Checks that a request lies inside the device.
    fn check_range(
        &self,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), BlockError> {
        let size_bytes = self.size_bytes();
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(BlockError::OutOfRange {
                op,
                offset_bytes,
                len_bytes,
                size_bytes,
            }),
        }
    }
}

/// Flushes `dev`, then fails with [`BlockError::PathLost`] if acknowledged writes were lost
/// with their path since `mark` (a [`BlockDevice::write_loss_count`] taken before the
/// writes this flush must make durable): those writes may be gone although the flush
/// succeeded, and the caller must write them again or report them lost.
pub fn flush_since<D: BlockDevice + ?Sized>(dev: &D, mark: u64) -> Result<(), BlockError> {
    dev.flush()?;
    let now = dev.write_loss_count();
    if now > mark {
        return Err(BlockError::PathLost {
            op: "flush",
            source: std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!(
                    "writes acknowledged on a path to the LUN that was later lost may not be durable ({} loss(es) since they began)",
                    now - mark
                ),
            ),
        });
    }
    Ok(())
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn block_size_bytes(&self) -> u32 {
        (**self).block_size_bytes()
    }
    fn max_request_bytes(&self) -> u32 {
        (**self).max_request_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        (**self).read_at(buf, offset_bytes)
    }
    fn write_at(&self, buf: &[u8], offset_bytes: u64, flags: WriteFlags) -> Result<(), BlockError> {
        (**self).write_at(buf, offset_bytes, flags)
    }
    fn flush(&self) -> Result<(), BlockError> {
        (**self).flush()
    }
    fn write_loss_count(&self) -> u64 {
        (**self).write_loss_count()
    }
    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        (**self).write_zeroes(offset_bytes, len_bytes)
    }
    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        (**self).trim(offset_bytes, len_bytes)
    }
    fn try_read_at_nowait(&self, buf: &mut [u8], offset_bytes: u64) -> Result<bool, BlockError> {
        (**self).try_read_at_nowait(buf, offset_bytes)
    }
    fn try_write_at_nowait(&self, buf: &[u8], offset_bytes: u64) -> Result<bool, BlockError> {
        (**self).try_write_at_nowait(buf, offset_bytes)
    }
    fn submit(&self, io: AsyncIo<'_>, done: Completion) -> Result<(), Completion> {
        (**self).submit(io, done)
    }
    fn submit_write_by_reference(
        &self,
        buf: &[u8],
        offset_bytes: u64,
        done: Completion,
    ) -> Result<(), Completion> {
        (**self).submit_write_by_reference(buf, offset_bytes, done)
    }
    fn pipe_read_max_bytes(&self) -> u32 {
        (**self).pipe_read_max_bytes()
    }
    fn submit_read_to_pipe(
        &self,
        offset_bytes: u64,
        len_bytes: u32,
        pipe: Pipe,
        done: PipeCompletion,
    ) -> Result<(), (Pipe, PipeCompletion)> {
        (**self).submit_read_to_pipe(offset_bytes, len_bytes, pipe, done)
    }
    fn recycle_buffer(&self, buf: Vec<u8>) {
        (**self).recycle_buffer(buf);
    }
}
