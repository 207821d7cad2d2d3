//! Block layer to the shared LUN. Owns the [`BlockDevice`] trait that every other crate
//! uses to reach the volume, and its implementations: a pipelined NBD client (TCP and Unix
//! sockets, many requests in flight, reconnect), a local file or kernel block-device
//! backend, an NBD server that exports a file to many clients at once, and, behind the
//! `testing` feature, fault-injecting devices. It does not know what is stored on the LUN.
//! Errors tell "the path to the LUN is gone" ([`BlockError::PathLost`]) from "the device
//! returned an error" ([`BlockError::Device`]); redirected I/O keys on that difference.
//! Unsafe code lives only in `sys` (aligned buffers, ioctls, fallocate, flock).
//! Spec: ../shared/DESIGN.md (block-client); NBD: the NBD protocol document
//! (`doc/proto.md` of the NBD project).

mod device;
mod file;
pub mod nbd;
mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use device::{BlockDevice, BlockError, WriteFlags};
pub use file::{FileDevice, FileOptions};
pub use nbd::client::open_device;
pub use nbd::{NbdClient, NbdClientOptions};
