//! [`FlakyDisk`]: wraps a device and fails or hangs chosen operations.

use std::io;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::{BlockDevice, BlockError, WriteFlags};

/// How an injected failure looks to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// The path to the LUN is gone ([`BlockError::PathLost`]).
    PathLost,
    /// The device reports this errno ([`BlockError::Device`]).
    Device(i32),
}

/// Which operations a fault applies to (and which ones are counted for "the Nth").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// Every operation.
    All,
    /// Reads only.
    Read,
    /// Writes, write-zeroes and trims.
    Write,
    /// Flushes only.
    Flush,
}

impl OpClass {
    fn covers(self, op: OpClass) -> bool {
        self == OpClass::All || self == op
    }
}

#[derive(Debug)]
enum Mode {
    Healthy,
    /// Fail the op whose count reaches `nth` (1-based, counted over `class`).
    FailNth {
        nth: u64,
        seen: u64,
        kind: FailKind,
    },
    FailAll {
        kind: FailKind,
    },
    Hang,
}

#[derive(Debug)]
struct Control {
    mode: Mutex<(Mode, OpClass)>,
    released: Condvar,
    hung_now: Mutex<u64>,
}

/// A handle that changes a [`FlakyDisk`]'s faults while other threads use the disk.
#[derive(Debug, Clone)]
pub struct FlakyHandle(Arc<Control>);

impl FlakyHandle {
    /// Fails the `nth` operation of `class` from now (1-based) once, then behaves again.
    pub fn fail_nth(&self, class: OpClass, nth: u64, kind: FailKind) {
        *self.0.mode.lock() = (Mode::FailNth { nth, seen: 0, kind }, class);
        self.0.released.notify_all();
    }

    /// Fails every operation of `class` until [`heal`](Self::heal).
    pub fn fail_all(&self, class: OpClass, kind: FailKind) {
        *self.0.mode.lock() = (Mode::FailAll { kind }, class);
        self.0.released.notify_all();
    }

    /// Blocks every operation of `class` until [`heal`](Self::heal) (or another mode is set).
    pub fn hang(&self, class: OpClass) {
        *self.0.mode.lock() = (Mode::Hang, class);
    }

    /// Stops injecting faults and releases hung operations.
    pub fn heal(&self) {
        *self.0.mode.lock() = (Mode::Healthy, OpClass::All);
        self.0.released.notify_all();
    }

    /// Number of operations blocked in a hang right now.
    pub fn hung_ops(&self) -> u64 {
        *self.0.hung_now.lock()
    }
}

/// Wraps a device and injects failures and hangs chosen through its [`FlakyHandle`].
#[derive(Debug)]
pub struct FlakyDisk<D> {
    inner: D,
    control: Arc<Control>,
}

impl<D: BlockDevice> FlakyDisk<D> {
    /// Wraps `inner`, healthy at first.
    pub fn new(inner: D) -> FlakyDisk<D> {
        FlakyDisk {
            inner,
            control: Arc::new(Control {
                mode: Mutex::new((Mode::Healthy, OpClass::All)),
                released: Condvar::new(),
                hung_now: Mutex::new(0),
            }),
        }
    }

    /// The handle that controls faults.
    pub fn handle(&self) -> FlakyHandle {
        FlakyHandle(self.control.clone())
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Decides the fate of one operation: `Ok` to pass through, or the injected error.
    fn gate(
        &self,
        class: OpClass,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), BlockError> {
        let mut guard = self.control.mode.lock();
        loop {
            let (mode, filter) = &mut *guard;
            if !filter.covers(class) {
                return Ok(());
            }
            let kind = match mode {
                Mode::Healthy => return Ok(()),
                Mode::FailAll { kind } => *kind,
                Mode::FailNth { nth, seen, kind } => {
                    *seen += 1;
                    if *seen != *nth {
                        return Ok(());
                    }
                    let k = *kind;
                    *mode = Mode::Healthy;
                    k
                }
                Mode::Hang => {
                    *self.control.hung_now.lock() += 1;
                    self.control.released.wait(&mut guard);
                    *self.control.hung_now.lock() -= 1;
                    continue;
                }
            };
            return Err(match kind {
                FailKind::PathLost => BlockError::PathLost {
                    op,
                    source: io::Error::new(io::ErrorKind::TimedOut, "injected path loss"),
                },
                FailKind::Device(errno) => BlockError::Device {
                    op,
                    offset_bytes,
                    len_bytes,
                    source: io::Error::from_raw_os_error(errno),
                },
            });
        }
    }
}

impl<D: BlockDevice> BlockDevice for FlakyDisk<D> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn block_size_bytes(&self) -> u32 {
        self.inner.block_size_bytes()
    }

    fn max_request_bytes(&self) -> u32 {
        self.inner.max_request_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        self.gate(OpClass::Read, "read", offset_bytes, buf.len() as u64)?;
        self.inner.read_at(buf, offset_bytes)
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64, flags: WriteFlags) -> Result<(), BlockError> {
        self.gate(OpClass::Write, "write", offset_bytes, buf.len() as u64)?;
        self.inner.write_at(buf, offset_bytes, flags)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.gate(OpClass::Flush, "flush", 0, 0)?;
        self.inner.flush()
    }

    fn write_loss_count(&self) -> u64 {
        self.inner.write_loss_count()
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.gate(OpClass::Write, "write_zeroes", offset_bytes, len_bytes)?;
        self.inner.write_zeroes(offset_bytes, len_bytes)
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.gate(OpClass::Write, "trim", offset_bytes, len_bytes)?;
        self.inner.trim(offset_bytes, len_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemDevice;
    use std::time::{Duration, Instant};

    #[test]
    fn fail_nth_then_recover() {
        let d = FlakyDisk::new(MemDevice::new(4096));
        let h = d.handle();
        h.fail_nth(OpClass::Read, 2, FailKind::Device(libc::EIO));
        let mut b = [0u8; 4];
        d.read_at(&mut b, 0).unwrap();
        d.write_at(&b, 0, WriteFlags::default()).unwrap();
        let e = d.read_at(&mut b, 0).unwrap_err();
        assert!(
            matches!(&e, BlockError::Device { source, .. } if source.raw_os_error() == Some(libc::EIO))
        );
        d.read_at(&mut b, 0).unwrap();
    }

    #[test]
    fn fail_all_path_lost_until_heal() {
        let d = FlakyDisk::new(MemDevice::new(4096));
        let h = d.handle();
        h.fail_all(OpClass::All, FailKind::PathLost);
        assert!(d.flush().unwrap_err().is_path_lost());
        assert!(d
            .write_at(&[1], 0, WriteFlags::FUA)
            .unwrap_err()
            .is_path_lost());
        h.heal();
        d.flush().unwrap();
    }

    #[test]
    fn hang_until_heal() {
        let d = Arc::new(FlakyDisk::new(MemDevice::new(4096)));
        let h = d.handle();
        h.hang(OpClass::Flush);
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.flush());
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.hung_ops() == 0 {
            assert!(Instant::now() < deadline, "flush never hung");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Reads are not affected by a flush hang.
        d.read_at(&mut [0u8; 1], 0).unwrap();
        assert!(!t.is_finished());
        h.heal();
        t.join().unwrap().unwrap();
    }
}
