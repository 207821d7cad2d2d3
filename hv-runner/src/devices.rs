//! Emulated devices: a 16550 UART on port 0x3f8 whose output goes to `console.log`, a
//! virtio-blk device over virtio-mmio (virtio 1.x, one split virtqueue) backed by
//! `disk.img`, and the idle port (an `outb` to 0x510 makes the vCPU thread sleep up to 1 ms,
//! so an idle test guest costs no host CPU).
//!
//! Requests are executed synchronously when the guest writes QueueNotify, so there is never
//! a request in flight while the vCPU is parked: the device state saved for migration is
//! just the registers and ring indices ([`crate::vm::DeviceState`]). Completions set
//! InterruptStatus bit 0 (the driver clears it through InterruptACK) and, unless the
//! driver set VIRTQ_AVAIL_F_NO_INTERRUPT, raise an edge on [`VIRTIO_BLK_GSI`] of the
//! in-kernel interrupt controllers (the vCPU thread pulses the line via KVM_IRQ_LINE when
//! [`VirtioBlk::mmio_write`] asks for it). A device error sets DEVICE_NEEDS_RESET and
//! InterruptStatus bit 1 (configuration change) and interrupts too.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kvm::GuestRam;

/// First port of the serial console.
pub const COM1: u16 = 0x3f8;
/// Port the guest writes to when it has nothing to do.
pub const IDLE_PORT: u16 = 0x510;
/// Guest-physical base of the virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of the virtio-mmio window.
pub const VIRTIO_MMIO_LEN: u64 = 0x200;
/// Interrupt line (GSI) of the virtio-blk device: IRQ 5 of the PIC (and IOAPIC pin 5).
pub const VIRTIO_BLK_GSI: u32 = 5;
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const QUEUE_MAX: u16 = 256;
const SECTOR: u64 = 512;

/// Errors from the device back-ends.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Opening the disk image failed.
    #[error("open disk {path}")]
    OpenDisk {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Opening or writing the console log failed.
    #[error("console log {path}")]
    Console {
        /// Log path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Flushing the disk failed.
    #[error("flush disk")]
    Flush(#[source] io::Error),
}

/// Which writes to a backing file are known durable: writes are numbered, a sync covers
/// every write numbered before it started. A switch-over skips the fdatasync (milliseconds
/// inside the downtime) when nothing was written since the last one.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncMark {
    written: u64,
    synced: u64,
}

impl SyncMark {
    /// Records one write.
    fn wrote(&mut self) {
        self.written += 1;
    }
    /// Number of the last write, to pass to [`SyncMark::synced`] after a sync that started
    /// now.
    pub fn point(&self) -> u64 {
        self.written
    }
    /// A sync that started at `point` succeeded.
    pub fn synced(&mut self, point: u64) {
        self.synced = self.synced.max(point);
    }
    /// True when every write is covered by a successful sync.
    fn clean(&self) -> bool {
        self.synced >= self.written
    }
}

/// Saved state of the UART registers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SerialState {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
}

/// A minimal 16550: transmit only, always ready.
pub struct Serial {
    state: SerialState,
    out: Option<File>,
    /// Durability of the log's lines.
    pub sync: SyncMark,
    line: Vec<u8>,
    path: PathBuf,
}

impl Serial {
    /// A UART that will log to `path`; output is dropped until [`Serial::open_log`].
    pub fn new(path: &Path, state: SerialState) -> Self {
        Self {
            state,
            out: None,
            sync: SyncMark::default(),
            line: Vec::new(),
            path: path.to_owned(),
        }
    }

    /// Opens the log for append. Called when the VM starts running on this node (at the
    /// switch-over for an incoming migration), so the file size is read then, after the
    /// previous node closed it.
    pub fn open_log(&mut self) -> Result<(), DeviceError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|source| DeviceError::Console {
                path: self.path.clone(),
                source,
            })?;
        self.out = Some(out);
        Ok(())
    }

    fn dlab(&self) -> bool {
        self.state.lcr & 0x80 != 0
    }

    fn emit(&mut self, b: u8) {
        self.line.push(b);
        if b == b'\n' || self.line.len() >= 256 {
            self.flush_line();
        }
    }

    fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.write_all(&self.line) {
                tracing::warn!(path = %self.path.display(), error = %e, "console write failed");
            }
            self.sync.wrote();
        }
        self.line.clear();
    }

    /// Guest `out` to `port` (offset from COM1).
    pub fn write(&mut self, offset: u16, v: u8) {
        match (offset, self.dlab()) {
            (0, false) => self.emit(v),
            (0, true) => self.state.dll = v,
            (1, false) => self.state.ier = v & 0x0f,
            (1, true) => self.state.dlm = v,
            (3, _) => self.state.lcr = v,
            (4, _) => self.state.mcr = v & 0x1f,
            (7, _) => self.state.scr = v,
            _ => {}
        }
    }

    /// Guest `in` from `port` (offset from COM1).
    pub fn read(&self, offset: u16) -> u8 {
        match (offset, self.dlab()) {
            (0, true) => self.state.dll,
            (1, true) => self.state.dlm,
            (1, false) => self.state.ier,
            (2, _) => 0x01, // no interrupt pending
            (3, _) => self.state.lcr,
            (4, _) => self.state.mcr,
            (5, _) => 0x60, // THR empty, transmitter empty
            (6, _) => 0xb0, // CTS, DSR, DCD
            (7, _) => self.state.scr,
            _ => 0,
        }
    }

    /// Writes out a partial line and closes the log (synced unless nothing was written
    /// since the last sync); returns the register state.
    pub fn close(&mut self) -> SerialState {
        self.flush_line();
        if let Some(out) = self.out.take() {
            if !self.sync.clean() {
                let point = self.sync.point();
                match out.sync_data() {
                    Ok(()) => self.sync.synced(point),
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "console sync failed")
                    }
                }
            }
        }
        self.state.clone()
    }

    /// Replaces the register state (incoming migration).
    pub fn set_state(&mut self, s: SerialState) {
        self.state = s;
    }

    /// A second handle on the log file (to sync it without holding the device).
    pub fn log_handle(&self) -> Option<File> {
        self.out.as_ref().and_then(|f| f.try_clone().ok())
    }

    /// Register state (for migration; call [`Serial::close`] at switch-over).
    pub fn state(&self) -> SerialState {
        self.state.clone()
    }
}

/// Saved state of the virtio-blk transport and its queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BlkState {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queue_num: u16,
    queue_ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
    interrupt_status: u32,
}

/// Counters of virtio-blk requests, for `status`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BlkStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
}

/// virtio-blk device over virtio-mmio.
pub struct VirtioBlk {
    state: BlkState,
    disk: Option<File>,
    capacity_sectors: u64,
    id: [u8; 20],
    /// Request counters.
    pub stats: BlkStats,
    /// Durability of the guest's writes.
    pub sync: SyncMark,
}

const F_VERSION_1: u64 = 1 << 32;
const F_BLK_FLUSH: u64 = 1 << 9;
const DEVICE_FEATURES: u64 = F_VERSION_1 | F_BLK_FLUSH;
const STATUS_NEEDS_RESET: u32 = 0x40;

/// Opens a disk image for the device.
pub fn open_disk(path: &Path) -> Result<File, DeviceError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| DeviceError::OpenDisk {
            path: path.to_owned(),
            source,
        })
}

struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl VirtioBlk {
    /// A device for a disk of `capacity_bytes` with the given state; the disk file is
    /// attached with [`VirtioBlk::attach`].
    pub fn new(name: &str, capacity_bytes: u64, state: BlkState) -> Self {
        let mut id = [0u8; 20];
        let s = format!("hv-{name}");
        let n = s.len().min(20);
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        Self {
            state,
            disk: None,
            capacity_sectors: capacity_bytes / SECTOR,
            id,
            stats: BlkStats::default(),
            sync: SyncMark::default(),
        }
    }

    /// Attaches the backing file.
    pub fn attach(&mut self, disk: File) {
        self.disk = Some(disk);
    }

    /// A second handle on the backing file (to flush it without holding the device).
    pub fn disk_handle(&self) -> Option<File> {
        self.disk.as_ref().and_then(|d| d.try_clone().ok())
    }

    /// Flushes (fdatasync, unless every write is already synced) and closes the backing
    /// file; returns the device state.
    pub fn detach(&mut self) -> Result<BlkState, DeviceError> {
        if let Some(disk) = self.disk.take() {
            if !self.sync.clean() {
                let point = self.sync.point();
                if let Err(e) = disk.sync_data() {
                    self.disk = Some(disk);
                    return Err(DeviceError::Flush(e));
                }
                self.sync.synced(point);
            }
        }
        Ok(self.state.clone())
    }

    /// Replaces the transport state (incoming migration).
    pub fn set_state(&mut self, s: BlkState) {
        self.state = s;
    }

    /// Device state for migration.
    pub fn state(&self) -> BlkState {
        self.state.clone()
    }

    /// Guest MMIO read at `offset` in the window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let v: u32 = match offset {
            0x000 => 0x7472_6976,
            0x004 => 2,
            0x008 => 2,
            0x00c => 0x554d_4551,
            0x010 => match self.state.device_features_sel {
                0 => (DEVICE_FEATURES & 0xffff_ffff) as u32,
                1 => (DEVICE_FEATURES >> 32) as u32,
                _ => 0,
            },
            0x034 => u32::from(QUEUE_MAX),
            0x044 => u32::from(self.state.queue_ready),
            0x060 => self.state.interrupt_status,
            0x070 => self.state.status,
            0x0fc => 0,
            0x100 => (self.capacity_sectors & 0xffff_ffff) as u32,
            0x104 => (self.capacity_sectors >> 32) as u32,
            0x114 => 0, // blk_size etc. are not offered
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Guest MMIO write at `offset` in the window. Returns true when the device interrupt
    /// must be raised.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], ram: &GuestRam) -> bool {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        let s = &mut self.state;
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            0x014 => s.device_features_sel = v,
            0x020 => match s.driver_features_sel {
                0 => s.driver_features = lo(s.driver_features),
                1 => s.driver_features = hi(s.driver_features),
                _ => {}
            },
            0x024 => s.driver_features_sel = v,
            0x030 => s.queue_sel = v,
            0x038 if s.queue_sel == 0 => {
                s.queue_num = u16::try_from(v).unwrap_or(0).min(QUEUE_MAX);
            }
            0x044 if s.queue_sel == 0 => s.queue_ready = v == 1,
            0x050 => return self.process_queue(ram),
            0x064 => s.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    *s = BlkState::default();
                } else {
                    // FEATURES_OK only sticks when the driver accepted a subset of ours.
                    let mut v = v;
                    if v & 8 != 0 && s.driver_features & !DEVICE_FEATURES != 0 {
                        v &= !8;
                    }
                    s.status = v;
                }
            }
            0x080 if s.queue_sel == 0 => s.desc = lo(s.desc),
            0x084 if s.queue_sel == 0 => s.desc = hi(s.desc),
            0x090 if s.queue_sel == 0 => s.avail = lo(s.avail),
            0x094 if s.queue_sel == 0 => s.avail = hi(s.avail),
            0x0a0 if s.queue_sel == 0 => s.used = lo(s.used),
            0x0a4 if s.queue_sel == 0 => s.used = hi(s.used),
            _ => {}
        }
        false
    }

    fn read_u16(ram: &GuestRam, gpa: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        ram.read(gpa, &mut b).ok()?;
        Some(u16::from_le_bytes(b))
    }

    fn read_desc(&self, ram: &GuestRam, idx: u16) -> Option<Desc> {
        let mut b = [0u8; 16];
        ram.read(self.state.desc + u64::from(idx) * 16, &mut b)
            .ok()?;
        let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Desc {
            addr: u64at(0),
            len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes(b[12..14].try_into().expect("2 bytes")),
            next: u16::from_le_bytes(b[14..16].try_into().expect("2 bytes")),
        })
    }

    /// Executes every new request; returns true when the interrupt must be raised.
    fn process_queue(&mut self, ram: &GuestRam) -> bool {
        let s = &self.state;
        if !s.queue_ready || s.queue_num == 0 || s.status & 4 == 0 {
            return false;
        }
        let num = s.queue_num;
        let Some(avail_idx) = Self::read_u16(ram, s.avail + 2) else {
            return self.fail("avail ring outside ram");
        };
        let mut completed = false;
        while self.state.next_avail != avail_idx {
            let slot = u64::from(self.state.next_avail % num);
            let Some(head) = Self::read_u16(ram, self.state.avail + 4 + slot * 2) else {
                return self.fail("avail ring entry outside ram");
            };
            let Some(written) = self.execute(ram, head) else {
                return self.fail("malformed descriptor chain");
            };
            let used_slot = u64::from(self.state.next_used % num);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&written.to_le_bytes());
            if ram
                .write(self.state.used + 4 + used_slot * 8, &elem)
                .is_err()
            {
                return self.fail("used ring outside ram");
            }
            self.state.next_avail = self.state.next_avail.wrapping_add(1);
            self.state.next_used = self.state.next_used.wrapping_add(1);
            if ram
                .write(self.state.used + 2, &self.state.next_used.to_le_bytes())
                .is_err()
            {
                return self.fail("used ring outside ram");
            }
            self.state.interrupt_status |= INT_USED_RING;
            completed = true;
        }
        let flags = Self::read_u16(ram, self.state.avail).unwrap_or(0);
        completed && flags & AVAIL_F_NO_INTERRUPT == 0
    }

    /// Marks the device broken; returns true (the configuration-change interrupt).
    fn fail(&mut self, why: &str) -> bool {
        tracing::warn!(why, "virtio-blk: device needs reset");
        self.state.status |= STATUS_NEEDS_RESET;
        self.state.interrupt_status |= INT_CONFIG;
        true
    }

    /// Runs one request; returns the number of bytes written into guest memory.
    fn execute(&mut self, ram: &GuestRam, head: u16) -> Option<u32> {
        let num = self.state.queue_num;
        let mut chain = Vec::new();
        let mut idx = head;
        loop {
            if idx >= num || chain.len() >= usize::from(num) {
                return None;
            }
            let d = self.read_desc(ram, idx)?;
            let more = d.flags & 1 != 0;
            let next = d.next;
            chain.push(d);
            if !more {
                break;
            }
            idx = next;
        }
        let (hdr, rest) = chain.split_first()?;
        let (status, data) = rest.split_last()?;
        if hdr.len < 16 || status.len < 1 || status.flags & 2 == 0 || hdr.flags & 2 != 0 {
            return None;
        }
        let mut h = [0u8; 16];
        ram.read(hdr.addr, &mut h).ok()?;
        let req_type = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let mut written: u32 = 0;
        let st: u8 = match (req_type, self.disk.as_ref()) {
            (_, None) => 1,
            (0 | 1, Some(disk)) => {
                let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
                let in_range = sector
                    .checked_mul(SECTOR)
                    .and_then(|o| o.checked_add(total))
                    .is_some_and(|end| end <= self.capacity_sectors * SECTOR);
                if !in_range || data.iter().any(|d| (d.flags & 2 != 0) != (req_type == 0)) {
                    1
                } else {
                    let mut off = sector * SECTOR;
                    let mut ok = true;
                    for d in data {
                        let mut buf = vec![0u8; usize::try_from(d.len).ok()?];
                        let r = if req_type == 0 {
                            disk.read_exact_at(&mut buf, off)
                                .map_err(|e| e.to_string())
                                .and_then(|()| ram.write(d.addr, &buf).map_err(|e| e.to_string()))
                        } else {
                            ram.read(d.addr, &mut buf)
                                .map_err(|e| e.to_string())
                                .and_then(|()| {
                                    disk.write_all_at(&buf, off).map_err(|e| e.to_string())
                                })
                        };
                        if let Err(e) = r {
                            tracing::warn!(sector, error = %e, "virtio-blk i/o failed");
                            ok = false;
                            break;
                        }
                        if req_type == 0 {
                            written += d.len;
                        }
                        off += u64::from(d.len);
                    }
                    if req_type == 0 {
                        self.stats.reads += 1;
                    } else {
                        self.stats.writes += 1;
                        self.sync.wrote();
                    }
                    u8::from(!ok)
                }
            }
            (4, Some(disk)) => {
                self.stats.flushes += 1;
                let point = self.sync.point();
                match disk.sync_data() {
                    Ok(()) => {
                        self.sync.synced(point);
                        0
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "virtio-blk flush failed");
                        1
                    }
                }
            }
            (8, Some(_)) => match data.first() {
                Some(d) if d.flags & 2 != 0 => {
                    let n = usize::try_from(d.len).ok()?.min(20);
                    ram.write(d.addr, &self.id[..n]).ok()?;
                    written += u32::try_from(n).ok()?;
                    0
                }
                _ => 1,
            },
            _ => 2,
        };
        ram.write(status.addr, &[st]).ok()?;
        Some(written + 1)
    }
}
