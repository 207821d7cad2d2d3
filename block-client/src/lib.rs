//! Block layer to the shared LUN. Owns the [`BlockDevice`] trait that every other crate
//! uses to reach the volume, and its implementations: a pipelined NBD client
//! ([`NbdClient`]: TCP and Unix sockets, many requests in flight, multi-conn, reconnect), a
//! local file or kernel block-device backend ([`FileDevice`]), an NBD server that exports a
//! file to many clients at once ([`nbd::serve`], [`nbd::run_serve_lun`]), and, behind the
//! `testing` feature, fault-injecting devices (`testing::{MemDevice, FlakyDisk, CrashDisk}`).
//! It does not know what is stored on the LUN.
//!
//! Errors tell "the path to the LUN is gone" ([`BlockError::PathLost`]) from "the device
//! returned an error" ([`BlockError::Device`]); redirected I/O keys on that difference.
//! Unsafe code lives only in `sys` (aligned buffers, ioctls, fallocate, flock, signals,
//! socket options, and the [`Pipe`] a read's data is spliced into).
//!
//! A large read can skip this process's memory: [`BlockDevice::submit_read_to_pipe`] has
//! the NBD client splice the reply's data from its socket into a [`Pipe`] (the node then
//! splices that pipe into `/dev/fuse`).
//!
//! Opening the LUN, whatever it is:
//!
//! ```no_run
//! use std::sync::Arc;
//! use block_client::{BlockDevice, WriteFlags};
//! let lun: Arc<dyn BlockDevice> = block_client::open_device("nbd://127.0.0.1:10809/")?;
//! // or "nbd+unix:///?socket=/run/lun.sock", or "/dev/sdb", or "/var/lib/lun.img"
//! lun.write_at(&[0u8; 4096], 0, WriteFlags::FUA)?;
//! # Ok::<(), block_client::BlockError>(())
//! ```
//!
//! Async callers (tokio) use `spawn_blocking`, or keep many requests in flight from one
//! thread with [`NbdClient::start_read`] / [`NbdClient::start_write`].
//!
//! Spec: ../shared/DESIGN.md (block-client); NBD: the NBD protocol document
//! (`doc/proto.md` of the NBD project).

mod device;
mod file;
pub mod nbd;
mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use device::{
    flush_since, AsyncIo, BlockDevice, BlockError, Completion, PipeCompletion, WriteFlags,
};
pub use file::{FileDevice, FileOptions};
pub use nbd::client::open_device;
pub use nbd::{NbdClient, NbdClientOptions};
pub use sys::Pipe;
