//! [`CrashDisk`]: a disk with a volatile write cache, for crash-consistency tests.
//!
//! State machine:
//!
//! ```text
//!            write/trim/zero ──► pending (volatile, in order)      FUA write ──► durable + pending
//!   Running ─ flush ──► pending applied to durable, cleared
//!      │
//!      │ Nth write or flush reached (crash_at)      the crashing write is lost, or with
//!      ▼                                             `tear_sectors = k` its first k sectors
//!   Crashed ── every op fails PathLost               (up to 512-byte boundaries) are durable
//!      │
//!      │ power_cut()  (also allowed while Running)
//!      ▼
//!   Running again with contents = durable image; every unflushed write is gone
//! ```

use std::io;

use parking_lot::Mutex;

use super::SECTOR_BYTES;
use crate::{BlockDevice, BlockError, WriteFlags};

/// Where a [`CrashDisk`] crashes. Counts are 1-based and count from when the crash point was
/// set; "writes" are `write_at`, `write_zeroes` and `trim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Crash instead of performing the Nth write.
    Write(u64),
    /// Crash instead of performing the Nth flush (its pending writes stay volatile).
    Flush(u64),
}

#[derive(Debug)]
struct PendingWrite {
    offset: usize,
    /// `None` means zeros (write_zeroes or trim).
    data: Option<Vec<u8>>,
    len: usize,
}

#[derive(Debug)]
struct State {
    durable: Vec<u8>,
    pending: Vec<PendingWrite>,
    crash_at: Option<CrashPoint>,
    tear_sectors: Option<u64>,
    writes_since_arm: u64,
    flushes_since_arm: u64,
    writes_total: u64,
    flushes_total: u64,
    crashed: bool,
}

/// A disk whose writes stay volatile until flushed (or written with FUA). See the module
/// documentation for its states.
#[derive(Debug)]
pub struct CrashDisk {
    state: Mutex<State>,
    size_bytes: u64,
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("in-memory device offsets fit in usize (checked by check_range)")
}

fn crashed_err(op: &'static str) -> BlockError {
    BlockError::PathLost {
        op,
        source: io::Error::new(
            io::ErrorKind::BrokenPipe,
            "crash disk has crashed (power cut pending)",
        ),
    }
}

impl State {
    fn apply(image: &mut [u8], w: &PendingWrite) {
        let dst = &mut image[w.offset..w.offset + w.len];
        match &w.data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
    }

    /// Counts one write; returns true when this write is the crash point.
    fn count_write(&mut self) -> bool {
        self.writes_total += 1;
        self.writes_since_arm += 1;
        matches!(self.crash_at, Some(CrashPoint::Write(n)) if n == self.writes_since_arm)
    }

    fn write(&mut self, op: &'static str, w: PendingWrite, fua: bool) -> Result<(), BlockError> {
        if self.crashed {
            return Err(crashed_err(op));
        }
        if self.count_write() {
            self.crashed = true;
            if let Some(k) = self.tear_sectors {
                // Persist the head of the write up to the k-th sector boundary after its start.
                let start = w.offset as u64;
                let boundary = (start / SECTOR_BYTES + k) * SECTOR_BYTES;
                let keep = to_usize(boundary.saturating_sub(start).min(w.len as u64));
                let head = PendingWrite {
                    offset: w.offset,
                    len: keep,
                    data: w.data.as_ref().map(|d| d[..keep].to_vec()),
                };
                Self::apply(&mut self.durable, &head);
            }
            return Err(crashed_err(op));
        }
        if fua {
            Self::apply(&mut self.durable, &w);
        }
        self.pending.push(w);
        Ok(())
    }
}

impl CrashDisk {
    /// A zero-filled disk of `size_bytes`.
    pub fn new(size_bytes: u64) -> CrashDisk {
        CrashDisk::from_image(vec![0; to_usize(size_bytes)])
    }

    /// A disk whose durable contents are `image`.
    pub fn from_image(image: Vec<u8>) -> CrashDisk {
        CrashDisk {
            size_bytes: image.len() as u64,
            state: Mutex::new(State {
                durable: image,
                pending: Vec::new(),
                crash_at: None,
                tear_sectors: None,
                writes_since_arm: 0,
                flushes_since_arm: 0,
                writes_total: 0,
                flushes_total: 0,
                crashed: false,
            }),
        }
    }

    /// Arms a crash at `point` (counting from now). Replaces any earlier crash point.
    pub fn crash_at(&self, point: CrashPoint) {
        let mut s = self.state.lock();
        s.crash_at = Some(point);
        s.writes_since_arm = 0;
        s.flushes_since_arm = 0;
    }

    /// When a write crashes, persist its first `sectors` 512-byte sectors (counted to
    /// absolute sector boundaries) instead of none of it. `None` (the default) loses it all.
    pub fn tear_writes(&self, sectors: Option<u64>) {
        self.state.lock().tear_sectors = sectors;
    }

    /// Crashes now: every later operation fails with `PathLost` until [`power_cut`](Self::power_cut).
    pub fn crash_now(&self) {
        self.state.lock().crashed = true;
    }

    /// Power cut: drops every unflushed write, disarms the crash point and makes the disk
    /// usable again with only its durable contents (as after a reboot).
    pub fn power_cut(&self) {
        let mut s = self.state.lock();
        s.pending.clear();
        s.crashed = false;
        s.crash_at = None;
        s.writes_since_arm = 0;
        s.flushes_since_arm = 0;
    }

    /// True after a crash point was reached and before the next power cut.
    pub fn is_crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// A copy of the durable image (what survives a power cut now).
    pub fn durable_image(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }

    /// A copy of what reads return now (durable image plus volatile writes).
    pub fn current_image(&self) -> Vec<u8> {
        let s = self.state.lock();
        let mut img = s.durable.clone();
        for w in &s.pending {
            State::apply(&mut img, w);
        }
        img
    }

    /// Number of writes not yet made durable.
    pub fn unflushed_writes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Writes (`write_at`, `write_zeroes`, `trim`) seen since creation, including a crashing one.
    pub fn writes_seen(&self) -> u64 {
        self.state.lock().writes_total
    }

    /// Flushes seen since creation, including a crashing one.
    pub fn flushes_seen(&self) -> u64 {
        self.state.lock().flushes_total
    }

    fn zero_op(
        &self,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), BlockError> {
        self.check_range(op, offset_bytes, len_bytes)?;
        let w = PendingWrite {
            offset: to_usize(offset_bytes),
            len: to_usize(len_bytes),
            data: None,
        };
        self.state.lock().write(op, w, false)
    }
}

impl BlockDevice for CrashDisk {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        self.check_range("read", offset_bytes, buf.len() as u64)?;
        let s = self.state.lock();
        if s.crashed {
            return Err(crashed_err("read"));
        }
        let start = to_usize(offset_bytes);
        let end = start + buf.len();
        buf.copy_from_slice(&s.durable[start..end]);
        for w in &s.pending {
            let (ws, we) = (w.offset, w.offset + w.len);
            let (lo, hi) = (ws.max(start), we.min(end));
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[lo - start..hi - start];
            match &w.data {
                Some(d) => dst.copy_from_slice(&d[lo - ws..hi - ws]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64, flags: WriteFlags) -> Result<(), BlockError> {
        self.check_range("write", offset_bytes, buf.len() as u64)?;
        let w = PendingWrite {
            offset: to_usize(offset_bytes),
            len: buf.len(),
            data: Some(buf.to_vec()),
        };
        self.state.lock().write("write", w, flags.fua)
    }

    fn flush(&self) -> Result<(), BlockError> {
        let mut s = self.state.lock();
        if s.crashed {
            return Err(crashed_err("flush"));
        }
        s.flushes_total += 1;
        s.flushes_since_arm += 1;
        if matches!(s.crash_at, Some(CrashPoint::Flush(n)) if n == s.flushes_since_arm) {
            s.crashed = true;
            return Err(crashed_err("flush"));
        }
        let pending = std::mem::take(&mut s.pending);
        for w in &pending {
            State::apply(&mut s.durable, w);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.zero_op("write_zeroes", offset_bytes, len_bytes)
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.zero_op("trim", offset_bytes, len_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(d: &CrashDisk, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        d.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn power_cut_loses_exactly_unflushed_writes() {
        let d = CrashDisk::new(8192);
        d.write_at(&[1; 100], 0, WriteFlags::default()).unwrap();
        d.flush().unwrap();
        d.write_at(&[2; 100], 50, WriteFlags::default()).unwrap();
        d.write_at(&[3; 10], 1000, WriteFlags::FUA).unwrap();
        d.write_zeroes(0, 10).unwrap();
        assert_eq!(read(&d, 0, 12), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(read(&d, 48, 4), [1, 1, 2, 2]);
        assert_eq!(d.unflushed_writes(), 3);
        d.power_cut();
        let img = d.current_image();
        assert!(img[..100].iter().all(|&b| b == 1));
        assert!(img[100..1000].iter().all(|&b| b == 0));
        assert!(
            img[1000..1010].iter().all(|&b| b == 3),
            "FUA write survives"
        );
        assert_eq!(d.unflushed_writes(), 0);
    }

    #[test]
    fn crash_at_write_then_all_ops_fail_until_power_cut() {
        let d = CrashDisk::new(4096);
        d.crash_at(CrashPoint::Write(2));
        d.write_at(&[1; 10], 0, WriteFlags::default()).unwrap();
        let e = d.write_at(&[2; 10], 10, WriteFlags::FUA).unwrap_err();
        assert!(e.is_path_lost());
        assert!(matches!(
            d.read_at(&mut [0; 1], 0),
            Err(BlockError::PathLost { .. })
        ));
        assert!(matches!(d.flush(), Err(BlockError::PathLost { .. })));
        d.power_cut();
        assert!(read(&d, 0, 20).iter().all(|&b| b == 0));
    }

    #[test]
    fn crash_at_flush_keeps_writes_volatile() {
        let d = CrashDisk::new(4096);
        d.write_at(&[1; 10], 0, WriteFlags::default()).unwrap();
        d.crash_at(CrashPoint::Flush(1));
        assert!(d.flush().unwrap_err().is_path_lost());
        d.power_cut();
        assert_eq!(read(&d, 0, 10), [0; 10]);
    }

    #[test]
    fn torn_write_keeps_whole_leading_sectors() {
        let d = CrashDisk::new(4096);
        d.tear_writes(Some(1));
        d.crash_at(CrashPoint::Write(1));
        d.write_at(&[7; 1500], 100, WriteFlags::FUA).unwrap_err();
        d.power_cut();
        let img = d.current_image();
        assert!(img[100..512].iter().all(|&b| b == 7));
        assert!(img[512..1600].iter().all(|&b| b == 0));
        assert!(img[..100].iter().all(|&b| b == 0));
    }

    #[test]
    fn flush_makes_durable_in_order() {
        let d = CrashDisk::new(4096);
        d.write_at(&[1; 10], 0, WriteFlags::default()).unwrap();
        d.write_at(&[2; 5], 0, WriteFlags::FUA).unwrap();
        d.write_at(&[3; 2], 0, WriteFlags::default()).unwrap();
        d.flush().unwrap();
        d.power_cut();
        assert_eq!(read(&d, 0, 10), [3, 3, 2, 2, 2, 1, 1, 1, 1, 1]);
        assert_eq!(d.writes_seen(), 3);
        assert_eq!(d.flushes_seen(), 1);
    }
}
