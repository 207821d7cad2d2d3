//! The only module with unsafe code: guest RAM (an anonymous mapping shared with KVM), the
//! KVM VM and vCPU file descriptors, the vCPU kick signal, and byte views of the plain
//! `kvm-bindings` structs used to move vCPU state between processes. Everything above this
//! module uses the safe types defined here.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

pub use kvm_ioctls::VcpuExit;

/// Size of a guest page in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Errors from KVM and guest-memory set-up and state transfer.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("kvm {what}")]
    Ioctl {
        /// Which call failed.
        what: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// mmap of guest RAM failed.
    #[error("map {len_bytes} bytes of guest ram")]
    Mmap {
        /// Requested size.
        len_bytes: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A guest-physical range is outside RAM.
    #[error("guest address {gpa:#x}+{len_bytes} outside ram")]
    OutOfRange {
        /// Start address.
        gpa: u64,
        /// Length.
        len_bytes: usize,
    },
    /// Reading incoming pages into guest memory failed.
    #[error("read {len_bytes} bytes into guest ram at {gpa:#x}")]
    Load {
        /// Start address.
        gpa: u64,
        /// Length.
        len_bytes: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing a frame head and guest pages to the migration stream failed.
    #[error("send {len_bytes} bytes of guest ram at {gpa:#x}")]
    Send {
        /// Start address.
        gpa: u64,
        /// Length.
        len_bytes: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Loading straight into guest memory was asked for while a vCPU may run.
    #[error("guest ram is live: pages can no longer be loaded directly")]
    Live,
    /// A saved state blob has the wrong size for its type.
    #[error("state blob {what} has {got} bytes, expected {want}")]
    BadBlob {
        /// Which structure.
        what: &'static str,
        /// Size received.
        got: usize,
        /// Size expected.
        want: usize,
    },
}

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Ioctl {
        what,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// True when `b` holds only zero bytes (word-wise, so the compiler vectorizes it).
pub fn all_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(64);
    let body = words.by_ref().all(|c| {
        c.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        }) == 0
    });
    body && words.remainder().iter().all(|&x| x == 0)
}

/// Guest RAM: one anonymous private mapping starting at guest-physical 0, plus a bitmap of
/// pages the runner itself wrote (device DMA), which KVM's dirty log does not see.
pub struct GuestRam {
    ptr: *mut u8,
    len_bytes: usize,
    map_base: *mut libc::c_void,
    map_len: usize,
    vmm_dirty: Vec<AtomicU64>,
    live: AtomicBool,
}

// SAFETY: the mapping is owned by `GuestRam` for its whole life and only accessed through
// raw-pointer copies bounded by `len_bytes`; guest RAM is shared with the guest by design,
// so concurrent access from several threads is the expected use (bytes only, no references
// into the mapping are handed out).
unsafe impl Send for GuestRam {}
// SAFETY: see `Send` above; all methods take `&self` and copy bytes in or out.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `len_bytes` (a multiple of the page size) of zeroed guest RAM, 2 MiB aligned,
    /// advised for transparent huge pages when `huge_pages` (fewer TLB and EPT misses for
    /// the guest). An incoming migration maps without: on a host whose free memory is
    /// handed back to an outer hypervisor (free page reporting works on 2 MiB blocks), a
    /// fresh huge page costs about 8 times more to fault in than 512 small ones.
    pub fn new(len_bytes: usize, huge_pages: bool) -> Result<Self, KvmError> {
        const HUGE: usize = 2 << 20;
        assert!(
            len_bytes % PAGE_SIZE == 0 && len_bytes > 0,
            "ram size is page aligned"
        );
        let map_len = len_bytes + HUGE;
        // SAFETY: anonymous mapping with no address hint: it does not alias any existing
        // Rust object; the result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KvmError::Mmap {
                len_bytes,
                source: io::Error::last_os_error(),
            });
        }
        let offset = (HUGE - (ptr as usize) % HUGE) % HUGE;
        // SAFETY: `offset < HUGE`, so `ptr + offset .. + len_bytes` lies inside the
        // `len_bytes + HUGE` bytes just mapped.
        let aligned = unsafe { ptr.cast::<u8>().add(offset) };
        let advice = if huge_pages {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advisory call on a range inside our own mapping; failure is harmless.
        unsafe { libc::madvise(aligned.cast(), len_bytes, advice) };
        let pages = len_bytes / PAGE_SIZE;
        let words = pages.div_ceil(64);
        Ok(Self {
            ptr: aligned,
            len_bytes,
            map_base: ptr,
            map_len,
            vmm_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            live: AtomicBool::new(false),
        })
    }

    /// Size of RAM in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.len_bytes / PAGE_SIZE
    }

    fn check(&self, gpa: u64, len_bytes: usize) -> Result<usize, KvmError> {
        let start = usize::try_from(gpa).map_err(|_| KvmError::OutOfRange { gpa, len_bytes })?;
        match start.checked_add(len_bytes) {
            Some(end) if end <= self.len_bytes => Ok(start),
            _ => Err(KvmError::OutOfRange { gpa, len_bytes }),
        }
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        let start = self.check(gpa, buf.len())?;
        // SAFETY: `start + buf.len() <= len_bytes` was checked, the mapping lives as long as
        // `self`, and `buf` is a distinct Rust allocation, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa` and marks the pages dirty for migration.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), KvmError> {
        let start = self.check(gpa, buf.len())?;
        // SAFETY: as in `read`: the range is inside the live mapping and `buf` does not
        // overlap it.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(start), buf.len()) };
        if !buf.is_empty() {
            for page in start / PAGE_SIZE..=(start + buf.len() - 1) / PAGE_SIZE {
                self.vmm_dirty[page / 64].fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Copies page `page` into `buf` (which must be one page long).
    pub fn read_page(&self, page: usize, buf: &mut [u8]) -> Result<(), KvmError> {
        self.read(page as u64 * PAGE_SIZE as u64, &mut buf[..PAGE_SIZE])
    }

    /// Writes one page without marking it dirty (used when loading incoming state).
    pub fn load_page(&self, page: usize, data: &[u8; PAGE_SIZE]) -> Result<(), KvmError> {
        let start = self.check(page as u64 * PAGE_SIZE as u64, PAGE_SIZE)?;
        // SAFETY: the page is inside the live mapping; `data` is a separate allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(start), PAGE_SIZE) };
        Ok(())
    }

    /// Marks RAM as live (a vCPU is about to run on it): from now on
    /// [`GuestRam::load_from`] is refused.
    pub fn set_live(&self) {
        self.live.store(true, Ordering::SeqCst);
    }

    /// Reads `len_bytes` from `r` straight into guest memory at `gpa` (no intermediate
    /// buffer), without marking pages dirty. Only for RAM that no vCPU has run on yet (an
    /// incoming migration or a restore): refused once [`GuestRam::set_live`] was called.
    pub fn load_from(&self, gpa: u64, len_bytes: usize, r: &mut impl Read) -> Result<(), KvmError> {
        let start = self.check(gpa, len_bytes)?;
        if self.live.load(Ordering::SeqCst) {
            return Err(KvmError::Live);
        }
        // SAFETY: the range is inside the live mapping (checked above). No vCPU has run on
        // this RAM (`live` is false, and it is set before any vCPU thread starts), the
        // runner's devices only touch RAM from vCPU exits, and the prefault thread only
        // calls madvise(MADV_POPULATE_WRITE), which never reads or writes page contents;
        // so this is the only access to these bytes while the slice exists.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len_bytes) };
        r.read_exact(dst).map_err(|source| KvmError::Load {
            gpa,
            len_bytes,
            source,
        })
    }

    /// Faults in (zeroed if absent) the pages of `gpa..gpa + len_bytes` with one call, which
    /// is cheaper than one page fault per page when they are then written.
    pub fn populate(&self, gpa: u64, len_bytes: usize) {
        let Ok(start) = self.check(gpa, len_bytes) else {
            return;
        };
        // SAFETY: `start..start + len_bytes` lies inside our live mapping (checked);
        // MADV_POPULATE_WRITE never alters present pages. Failure only loses the speed-up.
        unsafe {
            libc::madvise(
                self.ptr.add(start).cast(),
                len_bytes,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }

    /// True when page `page` holds only zero bytes. Reads the page in 256-byte pieces and
    /// stops at the first non-zero one, so a page with data in its first bytes costs one
    /// small copy, not a copy of the whole page.
    pub fn page_is_zero(&self, page: usize) -> bool {
        const PIECE: usize = 256;
        let Ok(start) = self.check(page as u64 * PAGE_SIZE as u64, PAGE_SIZE) else {
            return false;
        };
        let mut buf = [0u8; PIECE];
        (0..PAGE_SIZE).step_by(PIECE).all(|off| {
            // SAFETY: `start + off + PIECE <= start + PAGE_SIZE`, inside the live mapping
            // (checked above); `buf` is a separate stack array, so the ranges do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr.add(start + off), buf.as_mut_ptr(), PIECE);
            };
            all_zero(&buf)
        })
    }

    /// Writes `head` and then guest memory `gpa..gpa + len_bytes` to `fd` with `writev`
    /// (looping over short writes), so the kernel copies the pages straight from guest RAM
    /// into the socket or file: no copy of them in user space. The guest may still write
    /// those pages meanwhile; the migration's dirty log covers that, as for any read.
    pub fn send_with_head(
        &self,
        fd: BorrowedFd<'_>,
        head: &[u8],
        gpa: u64,
        len_bytes: usize,
    ) -> Result<(), KvmError> {
        let start = self.check(gpa, len_bytes)?;
        let err = |source| KvmError::Send {
            gpa,
            len_bytes,
            source,
        };
        let total = head.len() + len_bytes;
        let mut done = 0usize;
        while done < total {
            let (h, r) = if done < head.len() {
                (&head[done..], 0)
            } else {
                (&head[head.len()..], done - head.len())
            };
            let iov = [
                libc::iovec {
                    iov_base: h.as_ptr().cast_mut().cast(),
                    iov_len: h.len(),
                },
                libc::iovec {
                    // SAFETY: `r <= len_bytes` and `start + len_bytes` lies inside the live
                    // mapping (checked above), so the pointer stays inside it.
                    iov_base: unsafe { self.ptr.add(start + r) }.cast(),
                    iov_len: len_bytes - r,
                },
            ];
            let skip = usize::from(h.is_empty());
            let iov = &iov[skip..];
            // SAFETY: each iovec describes readable memory that outlives the call: `head`
            // is borrowed for the whole call, and the guest RAM range is inside the live
            // mapping owned by `self`; writev only reads them. `fd` is borrowed, so open.
            let n = unsafe {
                libc::writev(
                    fd.as_raw_fd(),
                    iov.as_ptr(),
                    libc::c_int::try_from(iov.len()).expect("two iovecs"),
                )
            };
            match usize::try_from(n) {
                Ok(0) => return Err(err(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(err(e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets page `page` to zeros if it is not already zero.
    pub fn zero_page(&self, page: usize) -> Result<(), KvmError> {
        if !self.page_is_zero(page) {
            self.load_page(page, &[0; PAGE_SIZE])?;
        }
        Ok(())
    }

    /// Pages that have never been populated in this process (so they read as zeros), or
    /// `None` when that cannot be known (mincore failed, or swap is on: a swapped-out
    /// page is not resident either).
    pub fn never_populated(&self) -> Option<Vec<bool>> {
        let swap_on = std::fs::read_to_string("/proc/swaps")
            .map(|s| s.lines().count() > 1)
            .unwrap_or(true);
        if swap_on {
            return None;
        }
        let mut vec = vec![0u8; self.pages()];
        // SAFETY: `ptr` is page aligned and `len_bytes` lies inside our live mapping;
        // `vec` has one byte per page of that range, as mincore requires.
        let r = unsafe { libc::mincore(self.ptr.cast(), self.len_bytes, vec.as_mut_ptr()) };
        if r != 0 {
            return None;
        }
        Some(vec.into_iter().map(|b| b & 1 == 0).collect())
    }

    /// Populates RAM from the end towards the start in 512 KiB chunks (MADV_POPULATE_WRITE,
    /// which never changes the content of a page already present) until `stop` is set.
    /// An incoming migration runs this beside the receiving thread, so the kernel's
    /// page clearing overlaps the network transfer.
    pub fn prefault(&self, stop: &std::sync::atomic::AtomicBool) {
        const CHUNK: usize = 512 << 10;
        let mut end = self.len_bytes;
        while end > 0 && !stop.load(Ordering::Relaxed) {
            let start = end.saturating_sub(CHUNK);
            // SAFETY: `start..end` lies inside our live mapping; MADV_POPULATE_WRITE only
            // faults pages in (zeroed if absent) and never alters present pages, so it is
            // harmless to concurrent copies into the same range.
            let r = unsafe {
                libc::madvise(
                    self.ptr.add(start).cast(),
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                return;
            }
            end = start;
        }
    }

    /// Takes (and clears) the bitmap of pages written by the runner itself.
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        self.vmm_dirty
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }

    fn host_addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `map_base`/`map_len` are exactly the mapping created in `new`, and no
        // reference into it outlives `self` (only copies are handed out).
        unsafe { libc::munmap(self.map_base, self.map_len) };
    }
}

/// A KVM VM with one memory slot (all of RAM) and an in-kernel irqchip.
pub struct Machine {
    kvm: Kvm,
    vm: VmFd,
    ram_len: u64,
    ram_addr: u64,
}

impl Machine {
    /// Creates the VM and registers `ram` as slot 0 at guest-physical 0.
    pub fn new(ram: &GuestRam) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(ioctl_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(ioctl_err("create vm"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(ioctl_err("set tss address"))?;
        vm.create_irq_chip().map_err(ioctl_err("create irqchip"))?;
        let m = Self {
            kvm,
            vm,
            ram_len: ram.len_bytes() as u64,
            ram_addr: ram.host_addr(),
        };
        m.set_dirty_logging(false)?;
        Ok(m)
    }

    /// Turns KVM dirty-page logging for RAM on or off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: self.ram_len,
            userspace_addr: self.ram_addr,
        };
        // SAFETY: `userspace_addr`/`memory_size` describe the live mapping of the GuestRam
        // this machine was created from; the runner keeps that GuestRam alive (in the same
        // `Vm` struct) for as long as the VM fd exists.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(ioctl_err("set user memory region"))
    }

    /// Returns and clears KVM's dirty bitmap for RAM (one bit per page).
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, KvmError> {
        let len = usize::try_from(self.ram_len).expect("ram size fits usize");
        self.vm
            .get_dirty_log(0, len)
            .map_err(ioctl_err("get dirty log"))
    }

    /// Creates vCPU `id` with the host's supported CPUID, its APIC id set to `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, KvmError> {
        let vcpu = self.vm.create_vcpu(id).map_err(ioctl_err("create vcpu"))?;
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("get supported cpuid"))?;
        let apic_id = u32::try_from(id).unwrap_or(u32::MAX);
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (apic_id << 24),
                0xb | 0x1f => e.edx = apic_id,
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(ioctl_err("set cpuid"))?;
        Ok(vcpu)
    }

    /// Raises an edge on interrupt line `gsi` of the in-kernel PIC and IOAPIC
    /// (KVM_IRQ_LINE up, then down).
    pub fn pulse_irq(&self, gsi: u32) -> Result<(), KvmError> {
        self.vm
            .set_irq_line(gsi, true)
            .and_then(|()| self.vm.set_irq_line(gsi, false))
            .map_err(ioctl_err("irq line"))
    }

    /// Reads VM-wide state (KVM clock, PIC and IOAPIC).
    pub fn save_vm_state(&self) -> Result<VmState, KvmError> {
        let clock = self.vm.get_clock().map_err(ioctl_err("get clock"))?;
        let mut chips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(ioctl_err("get irqchip"))?;
            chips.push(to_bytes(&chip));
        }
        Ok(VmState {
            clock_ns: clock.clock,
            irqchips: chips,
        })
    }

    /// Loads VM-wide state saved by [`Machine::save_vm_state`].
    pub fn load_vm_state(&self, s: &VmState) -> Result<(), KvmError> {
        for blob in &s.irqchips {
            let chip: kvm_irqchip = from_bytes(blob, "irqchip")?;
            self.vm
                .set_irqchip(&chip)
                .map_err(ioctl_err("set irqchip"))?;
        }
        let clock = kvm_clock_data {
            clock: s.clock_ns,
            ..Default::default()
        };
        self.vm.set_clock(&clock).map_err(ioctl_err("set clock"))
    }
}

/// VM-wide KVM state carried by a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// KVM clock in ns.
    pub clock_ns: u64,
    /// PIC master, PIC slave, IOAPIC (raw `kvm_irqchip`).
    pub irqchips: Vec<Vec<u8>>,
}

/// Everything KVM holds for one vCPU, as raw `kvm-bindings` structures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// `kvm_regs`.
    pub regs: Vec<u8>,
    /// `kvm_sregs`.
    pub sregs: Vec<u8>,
    /// `kvm_fpu`.
    pub fpu: Vec<u8>,
    /// `kvm_xsave` (legacy 4 KiB area).
    pub xsave: Vec<u8>,
    /// `kvm_xcrs`.
    pub xcrs: Vec<u8>,
    /// `kvm_lapic_state`.
    pub lapic: Vec<u8>,
    /// `kvm_vcpu_events` (pending exceptions, interrupts, NMI, SMI).
    pub events: Vec<u8>,
    /// `kvm_mp_state`.
    pub mp_state: Vec<u8>,
    /// `kvm_debugregs`.
    pub debugregs: Vec<u8>,
    /// MSR index and value pairs.
    pub msrs: Vec<(u32, u64)>,
}

/// MSRs carried by migration (those the host does not support are skipped).
const MIGRATED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock (new)
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async PF
    0x4b56_4d04, // KVM PV EOI
];

/// Plain-old-data KVM structures that may be viewed as bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]` structs of integers (and arrays/unions of integers)
/// for which every bit pattern is a valid value.
unsafe trait Pod: Sized {}
// SAFETY: all of these are bindgen-generated `#[repr(C)]` structs of integer fields,
// integer arrays and unions of those; any bit pattern is valid for them.
unsafe impl Pod for kvm_regs {}
// SAFETY: see above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: see above.
unsafe impl Pod for kvm_xsave {}
// SAFETY: see above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: see above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: see above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: see above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: see above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_irqchip {}

fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` is plain data with no padding-dependent invariants; reading its
    // `size_of::<T>()` bytes from a valid reference is sound.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn from_bytes<T: Pod>(b: &[u8], what: &'static str) -> Result<T, KvmError> {
    if b.len() != size_of::<T>() {
        return Err(KvmError::BadBlob {
            what,
            got: b.len(),
            want: size_of::<T>(),
        });
    }
    // SAFETY: the length equals `size_of::<T>()` (checked above), `read_unaligned` copes
    // with any alignment of `b`, and every bit pattern is a valid `T` (`T: Pod`).
    Ok(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

/// One vCPU: the KVM fd plus the helpers the runner needs.
pub struct Vcpu {
    fd: VcpuFd,
}

impl Vcpu {
    /// Wraps a vCPU fd.
    pub fn new(fd: VcpuFd) -> Self {
        Self { fd }
    }

    /// Enters the guest until the next exit.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, io::Error> {
        self.fd
            .run()
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    /// Completes a pending port or MMIO operation of the last exit without running any
    /// further guest instruction (KVM's `immediate_exit`), so the saved state is
    /// consistent.
    pub fn complete_pending(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// TSC frequency in kHz.
    pub fn tsc_khz(&self) -> Result<u32, KvmError> {
        self.fd.get_tsc_khz().map_err(ioctl_err("get tsc khz"))
    }

    /// Puts the vCPU in 64-bit long mode at `entry` with stack `rsp`, `rdi = arg` and
    /// `rsi = arg2`, using page tables at `cr3` and the flat GDT the runner wrote at
    /// `gdt_base`, and makes it runnable (an application processor would otherwise wait
    /// for INIT/SIPI in the in-kernel local APIC).
    pub fn setup_long_mode(
        &self,
        entry: u64,
        rsp: u64,
        arg: u64,
        arg2: u64,
        cr3: u64,
        gdt_base: u64,
    ) -> Result<(), KvmError> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl_err("get sregs"))?;
        let code = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_bindings::kvm_segment {
            selector: 0x10,
            type_: 0x3,
            l: 0,
            db: 1,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = gdt_base;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = cr3;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 1 | (1 << 4) | (1 << 5) | (1 << 31); // PE, ET, NE, PG
        sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
        self.fd.set_sregs(&sregs).map_err(ioctl_err("set sregs"))?;
        let regs = kvm_regs {
            rip: entry,
            rsp,
            rdi: arg,
            rsi: arg2,
            rflags: 2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(ioctl_err("set regs"))?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl_err("set mp state"))
    }

    /// Reads the complete vCPU state. Call only after [`Vcpu::complete_pending`].
    pub fn save_state(&self) -> Result<VcpuState, KvmError> {
        let fd = &self.fd;
        let mut msrs = Vec::new();
        for &index in MIGRATED_MSRS {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .expect("one entry fits");
            if fd.get_msrs(&mut one).map_err(ioctl_err("get msrs"))? == 1 {
                msrs.push((index, one.as_slice()[0].data));
            }
        }
        Ok(VcpuState {
            regs: to_bytes(&fd.get_regs().map_err(ioctl_err("get regs"))?),
            sregs: to_bytes(&fd.get_sregs().map_err(ioctl_err("get sregs"))?),
            fpu: to_bytes(&fd.get_fpu().map_err(ioctl_err("get fpu"))?),
            xsave: to_bytes(&fd.get_xsave().map_err(ioctl_err("get xsave"))?),
            xcrs: to_bytes(&fd.get_xcrs().map_err(ioctl_err("get xcrs"))?),
            lapic: to_bytes(&fd.get_lapic().map_err(ioctl_err("get lapic"))?),
            events: to_bytes(&fd.get_vcpu_events().map_err(ioctl_err("get events"))?),
            mp_state: to_bytes(&fd.get_mp_state().map_err(ioctl_err("get mp state"))?),
            debugregs: to_bytes(&fd.get_debug_regs().map_err(ioctl_err("get debugregs"))?),
            msrs,
        })
    }

    /// Loads a state saved by [`Vcpu::save_state`] (on this or another host).
    pub fn load_state(&self, s: &VcpuState) -> Result<(), KvmError> {
        let fd = &self.fd;
        fd.set_sregs(&from_bytes(&s.sregs, "sregs")?)
            .map_err(ioctl_err("set sregs"))?;
        fd.set_regs(&from_bytes(&s.regs, "regs")?)
            .map_err(ioctl_err("set regs"))?;
        fd.set_fpu(&from_bytes(&s.fpu, "fpu")?)
            .map_err(ioctl_err("set fpu"))?;
        let xsave: kvm_xsave = from_bytes(&s.xsave, "xsave")?;
        // SAFETY: `xsave` is a complete legacy `kvm_xsave` (4 KiB region) read by
        // KVM_GET_XSAVE; no extended (XSAVE2) area is passed, so KVM reads only
        // `size_of::<kvm_xsave>()` bytes from it.
        unsafe { fd.set_xsave(&xsave) }.map_err(ioctl_err("set xsave"))?;
        fd.set_xcrs(&from_bytes(&s.xcrs, "xcrs")?)
            .map_err(ioctl_err("set xcrs"))?;
        fd.set_lapic(&from_bytes(&s.lapic, "lapic")?)
            .map_err(ioctl_err("set lapic"))?;
        fd.set_mp_state(from_bytes(&s.mp_state, "mp_state")?)
            .map_err(ioctl_err("set mp state"))?;
        fd.set_debug_regs(&from_bytes(&s.debugregs, "debugregs")?)
            .map_err(ioctl_err("set debugregs"))?;
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        if !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::BadBlob {
                what: "msrs",
                got: entries.len(),
                want: 256,
            })?;
            fd.set_msrs(&msrs).map_err(ioctl_err("set msrs"))?;
        }
        fd.set_vcpu_events(&from_bytes(&s.events, "events")?)
            .map_err(ioctl_err("set events"))
    }
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// The signal used to kick a vCPU thread out of KVM_RUN.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR2;

/// Installs the (empty) handler for the kick signal, without SA_RESTART, so KVM_RUN returns
/// EINTR when a vCPU thread is signalled. Call once per process before starting vCPUs.
pub fn install_kick_handler() -> io::Result<()> {
    // SAFETY: zeroed `sigaction` is a valid "no flags, empty mask" value; the handler is an
    // `extern "C"` function that does nothing (async-signal-safe), and we pass valid
    // pointers to `sigemptyset`/`sigaction`.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends the kick signal to a thread (a vCPU thread's `pthread_t`).
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: `thread` comes from a `JoinHandle` the caller still holds, so it names a live
    // (or joinable, not yet joined) thread; the signal has a no-op handler installed.
    unsafe { libc::pthread_kill(thread, KICK_SIGNAL) };
}

/// True when a process with this pid exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 performs only the existence and permission check; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};
    use std::os::fd::AsFd;

    #[test]
    fn page_is_zero_sees_a_byte_anywhere_in_the_page() {
        let ram = GuestRam::new(4 * PAGE_SIZE, false).unwrap();
        assert!(ram.page_is_zero(1));
        for at in [0, 255, 256, 2048, PAGE_SIZE - 1] {
            ram.write((PAGE_SIZE + at) as u64, &[1]).unwrap();
            assert!(!ram.page_is_zero(1), "byte at {at}");
            ram.write((PAGE_SIZE + at) as u64, &[0]).unwrap();
            assert!(ram.page_is_zero(1), "byte at {at} cleared");
        }
        assert!(
            !ram.page_is_zero(4),
            "a page beyond ram is not reported zero"
        );
    }

    #[test]
    fn send_with_head_writes_head_then_guest_bytes() {
        let ram = GuestRam::new(8 * PAGE_SIZE, false).unwrap();
        let data: Vec<u8> = (0..3 * PAGE_SIZE)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        ram.write(2 * PAGE_SIZE as u64, &data).unwrap();
        let mut f = tempfile_in_tmp();
        ram.send_with_head(f.as_fd(), b"HEAD", 2 * PAGE_SIZE as u64, 3 * PAGE_SIZE)
            .unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..] == data[..], "guest bytes differ");
        assert!(matches!(
            ram.send_with_head(f.as_fd(), b"", 7 * PAGE_SIZE as u64, 2 * PAGE_SIZE),
            Err(KvmError::OutOfRange { .. })
        ));
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("hv-runner-send-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
