//! Devices for tests, behind the `testing` feature: [`MemDevice`] (in memory),
//! [`FlakyDisk`] (fails or hangs chosen operations of a wrapped device) and [`CrashDisk`]
//! (a durable and a volatile image; a power cut loses exactly the unflushed writes; crashes
//! at the Nth write or flush, optionally tearing that write at a 512-byte boundary).

mod crash;
mod flaky;
mod mem;

pub use crash::{CrashDisk, CrashPoint};
pub use flaky::{FailKind, FlakyDisk, FlakyHandle, OpClass};
pub use mem::MemDevice;

/// Sector size at which [`CrashDisk`] tears writes.
pub const SECTOR_BYTES: u64 = 512;
