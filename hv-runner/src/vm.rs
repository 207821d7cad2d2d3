//! A VM: its folder on the volume (`vm.toml`, `disk.img`, `console.log`, `owner.toml`,
//! `state.hvm` after `save`), its guest memory, vCPU threads and devices, and the
//! pause/resume machinery that migration and save use.
//!
//! Guest-physical layout (identity-mapped with 2 MiB pages up to 4 GiB):
//! `0x500` GDT, `0x1000` PML4, `0x2000` PDPT, `0x3000..0x7000` page directories,
//! `0x7000` boot parameters, vCPU k's 32 KiB stack below `0x80000 - k * 0x8000`, guest
//! image at `0x100000`, guest data from `0x200000` to the end of RAM, virtio-mmio window
//! at `0xd000_0000`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::devices::{self, BlkState, Serial, SerialState, VirtioBlk};
use crate::kvm::{self, GuestRam, KvmError, Machine, Vcpu, VcpuExit, VcpuState, VmState};

/// The test guest, built from fixtures/guest by build.rs.
pub static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const BOOT_PARAMS: u64 = 0x7000;
const STACK_TOP: u64 = 0x80000;
/// Stack of each vCPU (vCPU k's stack top is `STACK_TOP - k * STACK_BYTES`).
const STACK_BYTES: u64 = 0x8000;
/// Most vCPUs a VM may have (the test guest's limit; stacks fit below `STACK_TOP`).
pub const MAX_VCPUS: u32 = 8;
const GUEST_LOAD: u64 = 0x10_0000;
/// First guest-physical byte the test guest fills and dirties.
pub const GUEST_DATA_START: u64 = 0x20_0000;
const BOOT_MAGIC: u64 = 0x4856_424f_4f54_5031;
/// Owner heartbeat older than this is stale (ms).
pub const OWNER_TIMEOUT_MS: u64 = 10_000;

/// Errors of VM set-up and life cycle.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Reading or writing a file of the VM folder failed.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// vm.toml is not valid.
    #[error("invalid vm config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The VM runs elsewhere.
    #[error("vm {name} is running on node {node} (host {host}, pid {pid}, heartbeat {age_ms} ms ago); stop or migrate it there first")]
    Busy {
        /// VM name.
        name: String,
        /// Owning node.
        node: String,
        /// Owning host.
        host: String,
        /// Owning pid.
        pid: u32,
        /// Age of its heartbeat.
        age_ms: u64,
    },
    /// The VM has a saved state that `run` would discard.
    #[error("vm {0} has a saved state (state.hvm); use `hv-runner restore`")]
    HasSavedState(String),
    /// KVM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A device back-end failed.
    #[error(transparent)]
    Device(#[from] devices::DeviceError),
    /// Starting the vCPU thread failed.
    #[error("spawn vcpu thread")]
    Spawn(#[source] io::Error),
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VmError + 'a {
    move |source| VmError::File {
        what,
        path: path.to_owned(),
        source,
    }
}

/// `vm.toml`: what the VM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest RAM in MiB. Default: 64.
    pub memory_mib: u64,
    /// Number of vCPUs, 1..=8. Default: 1.
    pub vcpus: u32,
    /// Size of disk.img in bytes. Default: 16 MiB.
    pub disk_bytes: u64,
    /// Guest image; only `builtin:test-guest` exists. Default: `builtin:test-guest`.
    pub image: String,
    /// Test guest: MiB of RAM (from 2 MiB) rewritten continuously; 0 = none. Default: 8.
    pub dirty_mib: u64,
    /// Test guest: pages per second it rewrites; 0 = idle, 10^9 = as fast as it can.
    /// Default: 2000.
    pub dirty_pages_per_sec: u64,
    /// Test guest: fill all RAM above 2 MiB with a pattern at boot. Default: false.
    pub fill: bool,
    /// Test guest: heartbeat (disk record + `seq=N` line) period in ms. Default: 50.
    pub heartbeat_ms: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            vcpus: 1,
            disk_bytes: 16 << 20,
            image: "builtin:test-guest".into(),
            dirty_mib: 8,
            dirty_pages_per_sec: 2000,
            fill: false,
            heartbeat_ms: 50,
        }
    }
}

impl VmConfig {
    /// Checks limits.
    pub fn validate(&self) -> Result<(), String> {
        if !(4..=3072).contains(&self.memory_mib) {
            return Err(format!("memory_mib {} not in 4..=3072", self.memory_mib));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(format!("vcpus {} not in 1..={MAX_VCPUS}", self.vcpus));
        }
        if self.image != "builtin:test-guest" {
            return Err(format!("image {:?}: only builtin:test-guest", self.image));
        }
        if self.disk_bytes < 4096 || self.disk_bytes % 512 != 0 {
            return Err("disk_bytes must be a multiple of 512 and at least 4096".into());
        }
        if self.dirty_mib.saturating_add(2) > self.memory_mib {
            return Err("dirty_mib must leave the first 2 MiB of RAM".into());
        }
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be positive".into());
        }
        Ok(())
    }

    /// RAM size in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Paths of one VM folder.
#[derive(Debug, Clone)]
pub struct VmDir {
    /// The folder `<volume>/<name>`.
    pub dir: PathBuf,
    /// The VM name (folder name).
    pub name: String,
}

impl VmDir {
    /// A folder given as `DIR/NAME`.
    pub fn new(dir: &Path) -> Result<Self, VmError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| VmError::Config {
                path: dir.to_owned(),
                reason: "path has no VM name".into(),
            })?
            .to_owned();
        Ok(Self {
            dir: dir.to_owned(),
            name,
        })
    }
    /// `vm.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("vm.toml")
    }
    /// `disk.img`.
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    /// `console.log`.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// `owner.toml`.
    pub fn owner_path(&self) -> PathBuf {
        self.dir.join("owner.toml")
    }
    /// `state.hvm` (saved VM).
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.hvm")
    }

    /// Creates the folder, `vm.toml` and a sparse `disk.img`.
    pub fn create(&self, cfg: &VmConfig) -> Result<(), VmError> {
        cfg.validate().map_err(|reason| VmError::Config {
            path: self.config_path(),
            reason,
        })?;
        std::fs::create_dir_all(&self.dir).map_err(file_err("create folder", &self.dir))?;
        let p = self.config_path();
        if p.exists() {
            return Err(VmError::Config {
                path: p,
                reason: "already exists".into(),
            });
        }
        let text = toml::to_string(cfg).expect("config serializes");
        std::fs::write(&p, text).map_err(file_err("write", &p))?;
        let d = self.disk_path();
        let f = std::fs::File::create(&d).map_err(file_err("create", &d))?;
        f.set_len(cfg.disk_bytes).map_err(file_err("size", &d))?;
        Ok(())
    }

    /// Reads and validates `vm.toml`.
    pub fn load_config(&self) -> Result<VmConfig, VmError> {
        let p = self.config_path();
        let text = std::fs::read_to_string(&p).map_err(file_err("read", &p))?;
        let cfg: VmConfig = toml::from_str(&text).map_err(|e| VmError::Config {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        cfg.validate()
            .map_err(|reason| VmError::Config { path: p, reason })?;
        Ok(cfg)
    }
}

/// `owner.toml`: who runs the VM now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// Node name (`--node`).
    pub node: String,
    /// Host name.
    pub host: String,
    /// Runner pid.
    pub pid: u32,
    /// Last heartbeat, ms since the Unix epoch.
    pub heartbeat_unix_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

impl OwnerRecord {
    /// A record for this process.
    pub fn me(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            heartbeat_unix_ms: unix_ms(),
        }
    }

    /// Reads the owner record, if any (an unreadable record counts as absent, with a
    /// warning).
    pub fn read(dir: &VmDir) -> Option<Self> {
        let text = std::fs::read_to_string(dir.owner_path()).ok()?;
        match toml::from_str(&text) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(vm = %dir.name, error = %e, "ignoring unreadable owner record");
                None
            }
        }
    }

    /// True when the record is held by a live runner other than this process.
    pub fn live_other(&self) -> bool {
        let me = std::process::id();
        if self.host == hostname() {
            return self.pid != me && kvm::pid_alive(self.pid) && !self.stale();
        }
        !self.stale()
    }

    fn stale(&self) -> bool {
        unix_ms().saturating_sub(self.heartbeat_unix_ms) > OWNER_TIMEOUT_MS
    }

    /// Claims the VM for this process or explains who holds it.
    pub fn claim(dir: &VmDir, node: &str) -> Result<(), VmError> {
        if let Some(cur) = Self::read(dir) {
            if cur.live_other() {
                return Err(VmError::Busy {
                    name: dir.name.clone(),
                    node: cur.node,
                    host: cur.host,
                    pid: cur.pid,
                    age_ms: unix_ms().saturating_sub(cur.heartbeat_unix_ms),
                });
            }
            if cur.pid != std::process::id() {
                tracing::warn!(vm = %dir.name, node = %cur.node, pid = cur.pid, "taking over stale owner record");
            }
        }
        Self::me(node).write(dir)
    }

    /// Claims the VM only if no owner record exists (O_EXCL create), as the migration
    /// destination does at switch-over: of two processes racing, exactly one wins.
    pub fn claim_exclusive(dir: &VmDir, node: &str) -> Result<(), VmError> {
        use std::io::Write as _;
        let p = dir.owner_path();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    match Self::read(dir) {
                        Some(cur) => VmError::Busy {
                            name: dir.name.clone(),
                            node: cur.node,
                            host: cur.host,
                            pid: cur.pid,
                            age_ms: unix_ms().saturating_sub(cur.heartbeat_unix_ms),
                        },
                        None => VmError::File {
                            what: "claim",
                            path: p.clone(),
                            source: e,
                        },
                    }
                } else {
                    VmError::File {
                        what: "claim",
                        path: p.clone(),
                        source: e,
                    }
                }
            })?;
        let text = toml::to_string(&Self::me(node)).expect("owner serializes");
        f.write_all(text.as_bytes())
            .map_err(file_err("write", &p))?;
        Ok(())
    }

    /// Writes this record (atomically, via rename).
    pub fn write(&self, dir: &VmDir) -> Result<(), VmError> {
        let p = dir.owner_path();
        let tmp = dir.dir.join(format!(".owner.toml.{}", std::process::id()));
        let text = toml::to_string(self).expect("owner serializes");
        std::fs::write(&tmp, text).map_err(file_err("write", &tmp))?;
        std::fs::rename(&tmp, &p).map_err(file_err("rename", &p))
    }

    /// Removes the record if this process holds it.
    pub fn release(dir: &VmDir) {
        if let Some(cur) = Self::read(dir) {
            if cur.pid == std::process::id() && cur.host == hostname() {
                let _ = std::fs::remove_file(dir.owner_path());
            }
        }
    }
}

/// Device state carried by migration and save.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// UART registers.
    pub serial: SerialState,
    /// virtio-blk transport and queue.
    pub blk: BlkState,
}

/// Complete machine state besides RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Devices.
    pub devices: DeviceState,
}

/// The devices behind one lock.
pub struct Devices {
    /// Serial console.
    pub serial: Serial,
    /// Disk.
    pub blk: VirtioBlk,
}

#[derive(Default)]
struct RunState {
    pause_requested: bool,
    /// vCPU threads parked by a pause request.
    parked: usize,
    /// vCPU threads that have reached KVM_RUN at least once.
    entered: usize,
    stop: bool,
    exited: Option<String>,
}

/// Shared between the vCPU thread and its controllers.
struct Control {
    state: Mutex<RunState>,
    cv: Condvar,
    throttle_pct: AtomicU32,
}

/// A VM instance in this process.
pub struct Vm {
    /// Its folder.
    pub dir: VmDir,
    /// Its configuration.
    pub cfg: VmConfig,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// KVM VM.
    pub machine: Arc<Machine>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    /// Devices.
    pub devices: Arc<Mutex<Devices>>,
    control: Arc<Control>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pthreads: Mutex<Vec<libc::pthread_t>>,
    tsc_khz: u32,
    /// Set while a migration or save is in progress.
    pub migrating: AtomicBool,
    /// True while this process holds the owner record (the heartbeat refreshes it).
    owned: Mutex<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Vm {
    /// Creates the VM in this process with empty RAM; the vCPU is not started. Devices are
    /// created with `devs` state; the disk is not attached. `huge_pages`: back RAM with
    /// transparent huge pages (see [`GuestRam::new`]).
    pub fn create(
        dir: VmDir,
        cfg: VmConfig,
        devs: Option<DeviceState>,
        huge_pages: bool,
    ) -> Result<Self, VmError> {
        let ram_len = usize::try_from(cfg.ram_bytes()).expect("ram size fits usize");
        let ram = Arc::new(GuestRam::new(ram_len, huge_pages)?);
        let machine = Arc::new(Machine::new(&ram)?);
        let vcpus = (0..cfg.vcpus)
            .map(|id| machine.create_vcpu(u64::from(id)).map(Vcpu::new))
            .collect::<Result<Vec<_>, _>>()?;
        let tsc_khz = vcpus[0].tsc_khz()?;
        let devs = devs.unwrap_or(DeviceState {
            serial: SerialState::default(),
            blk: BlkState::default(),
        });
        let serial = Serial::new(&dir.console_path(), devs.serial);
        let blk = VirtioBlk::new(&dir.name, cfg.disk_bytes, devs.blk);
        Ok(Self {
            dir,
            cfg,
            ram,
            machine,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            devices: Arc::new(Mutex::new(Devices { serial, blk })),
            control: Arc::new(Control {
                state: Mutex::new(RunState::default()),
                cv: Condvar::new(),
                throttle_pct: AtomicU32::new(0),
            }),
            threads: Mutex::new(Vec::new()),
            pthreads: Mutex::new(Vec::new()),
            tsc_khz,
            migrating: AtomicBool::new(false),
            owned: Mutex::new(false),
        })
    }

    /// Loads the test guest, page tables, GDT and boot parameters, and points the vCPU at
    /// the guest entry in long mode.
    pub fn boot(&self) -> Result<(), VmError> {
        let ram = &self.ram;
        // GDT: null, 64-bit code, data.
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        ram.write(GDT, &u64s(&gdt))?;
        // PML4[0] -> PDPT, PDPT[0..4] -> PDs, PDs map 4 GiB with 2 MiB pages.
        ram.write(PML4, &u64s(&[(PML4 + 0x1000) | 3]))?;
        let pdpt: Vec<u64> = (0..4).map(|i| (PML4 + 0x2000 + i * 0x1000) | 3).collect();
        ram.write(PML4 + 0x1000, &u64s(&pdpt))?;
        let pd: Vec<u64> = (0..2048u64).map(|i| (i << 21) | 0x83).collect();
        ram.write(PML4 + 0x2000, &u64s(&pd))?;
        let c = &self.cfg;
        let dirty_bytes = c.dirty_mib << 20;
        let params = [
            BOOT_MAGIC,
            c.ram_bytes(),
            GUEST_DATA_START,
            dirty_bytes,
            c.dirty_pages_per_sec,
            c.heartbeat_ms,
            u64::from(self.tsc_khz),
            devices::VIRTIO_MMIO_BASE,
            GUEST_DATA_START,
            u64::from(c.fill),
            u64::from(c.vcpus),
            u64::from(devices::VIRTIO_BLK_GSI),
        ];
        ram.write(BOOT_PARAMS, &u64s(&params))?;
        ram.write(GUEST_LOAD, TEST_GUEST)?;
        // Every vCPU starts at the guest entry in long mode with its own stack and its
        // index in rsi; the guest decides what each one does.
        for (k, v) in (0u64..).zip(&self.vcpus) {
            let rsp = STACK_TOP - k * STACK_BYTES;
            lock(v).setup_long_mode(GUEST_LOAD, rsp, BOOT_PARAMS, k, PML4, GDT)?;
        }
        Ok(())
    }

    /// Opens `console.log` and `disk.img` from this VM's folder (through this node's path)
    /// and attaches them.
    pub fn attach_disk(&self) -> Result<(), VmError> {
        let disk = devices::open_disk(&self.dir.disk_path())?;
        let mut d = lock(&self.devices);
        d.serial.open_log()?;
        d.blk.attach(disk);
        Ok(())
    }

    /// Starts the vCPU threads and returns once each is about to enter KVM_RUN (so an
    /// incoming migration reports "resumed" when the guest really runs again).
    pub fn start(&self) -> Result<(), VmError> {
        self.ram.set_live();
        let name = self.dir.name.clone();
        for (k, vcpu) in self.vcpus.iter().enumerate() {
            let vcpu = Arc::clone(vcpu);
            let devs = Arc::clone(&self.devices);
            let ram = Arc::clone(&self.ram);
            let machine = Arc::clone(&self.machine);
            let control = Arc::clone(&self.control);
            let t = std::thread::Builder::new()
                .name(format!("vcpu{k}-{name}"))
                .spawn(move || vcpu_loop(&vcpu, &devs, &ram, &machine, &control))
                .map_err(VmError::Spawn)?;
            lock(&self.pthreads).push(std::os::unix::thread::JoinHandleExt::as_pthread_t(&t));
            lock(&self.threads).push(t);
        }
        let n = self.vcpus.len();
        let mut st = lock(&self.control.state);
        while st.entered < n && st.exited.is_none() {
            st = self
                .control
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        Ok(())
    }

    /// Parks every vCPU outside KVM_RUN with its last exit completed. Returns false when
    /// no vCPU thread runs or one has exited.
    pub fn pause(&self) -> bool {
        let pthreads = lock(&self.pthreads).clone();
        if pthreads.is_empty() {
            return false;
        }
        let mut st = lock(&self.control.state);
        st.pause_requested = true;
        while st.parked < pthreads.len() && st.exited.is_none() {
            for &t in &pthreads {
                kvm::kick_thread(t);
            }
            st = self
                .control
                .cv
                .wait_timeout(st, Duration::from_millis(1))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        st.exited.is_none()
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut st = lock(&self.control.state);
        st.pause_requested = false;
        self.control.cv.notify_all();
        drop(st);
    }

    /// Sets the share of time (0..=99 %) the vCPU is held parked, to slow a guest that
    /// dirties memory faster than migration can send it.
    pub fn set_throttle(&self, pct: u32) {
        self.control
            .throttle_pct
            .store(pct.min(99), Ordering::Relaxed);
    }

    /// Why the vCPU thread exited, if it did.
    pub fn exited(&self) -> Option<String> {
        lock(&self.control.state).exited.clone()
    }

    /// Saves vCPU, VM and device state. The vCPU must be parked.
    pub fn save_state(&self) -> Result<MachineState, VmError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| lock(v).save_state())
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.machine.save_vm_state()?;
        let d = lock(&self.devices);
        Ok(MachineState {
            vcpus,
            vm,
            devices: DeviceState {
                serial: d.serial.state(),
                blk: d.blk.state(),
            },
        })
    }

    /// Loads vCPU, VM and device state.
    pub fn load_state(&self, s: &MachineState) -> Result<(), VmError> {
        if s.vcpus.len() != self.vcpus.len() {
            return Err(VmError::Config {
                path: self.dir.config_path(),
                reason: format!(
                    "state has {} vcpus, this vm has {}",
                    s.vcpus.len(),
                    self.vcpus.len()
                ),
            });
        }
        self.machine.load_vm_state(&s.vm)?;
        for (v, state) in self.vcpus.iter().zip(&s.vcpus) {
            lock(v).load_state(state)?;
        }
        let mut d = lock(&self.devices);
        d.serial.set_state(s.devices.serial.clone());
        d.blk.set_state(s.devices.blk.clone());
        Ok(())
    }

    /// Reopens console and disk after [`Vm::close_devices`] (a cancelled switch-over).
    pub fn reopen_devices(&self) -> Result<(), VmError> {
        self.attach_disk()
    }

    /// Flushes disk and console while the guest still runs, so the flush inside the
    /// downtime ([`Vm::close_devices`]) has little left to write.
    pub fn presync_devices(&self) {
        let (disk, disk_at, log, log_at) = {
            let d = lock(&self.devices);
            (
                d.blk.disk_handle(),
                d.blk.sync.point(),
                d.serial.log_handle(),
                d.serial.sync.point(),
            )
        };
        let sync = |f: Option<std::fs::File>| {
            let ok = f.is_some_and(|f| match f.sync_data() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(vm = %self.dir.name, error = %e, "pre-switch-over flush failed");
                    false
                }
            });
            ok
        };
        let (disk_ok, log_ok) = (sync(disk), sync(log));
        let mut d = lock(&self.devices);
        if disk_ok {
            d.blk.sync.synced(disk_at);
        }
        if log_ok {
            d.serial.sync.synced(log_at);
        }
    }

    /// Flushes and closes the disk and the console log (the switch-over on the source).
    pub fn close_devices(&self) -> Result<(), VmError> {
        let mut d = lock(&self.devices);
        d.serial.close();
        d.blk.detach()?;
        Ok(())
    }

    /// Stops the vCPU thread for good and joins it.
    pub fn stop(&self) {
        {
            let mut st = lock(&self.control.state);
            st.stop = true;
            st.pause_requested = false;
            self.control.cv.notify_all();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let pthread = std::os::unix::thread::JoinHandleExt::as_pthread_t(&t);
            while !t.is_finished() {
                kvm::kick_thread(pthread);
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
        }
        lock(&self.pthreads).clear();
    }

    /// Claims the owner record for this process (`exclusive`: only if none exists).
    pub fn claim_owner(&self, node: &str, exclusive: bool) -> Result<(), VmError> {
        let mut owned = lock(&self.owned);
        if exclusive {
            OwnerRecord::claim_exclusive(&self.dir, node)?;
        } else {
            OwnerRecord::claim(&self.dir, node)?;
        }
        *owned = true;
        Ok(())
    }

    /// Refreshes the owner heartbeat if this process owns the VM.
    pub fn heartbeat_owner(&self, node: &str) {
        let owned = lock(&self.owned);
        if *owned {
            if let Err(e) = OwnerRecord::me(node).write(&self.dir) {
                tracing::warn!(vm = %self.dir.name, error = %e, "owner heartbeat failed");
            }
        }
    }

    /// Gives up the owner record.
    pub fn release_owner(&self) {
        let mut owned = lock(&self.owned);
        if *owned {
            OwnerRecord::release(&self.dir);
            *owned = false;
        }
    }

    /// Device counters.
    pub fn blk_stats(&self) -> devices::BlkStats {
        lock(&self.devices).blk.stats
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vcpu_loop(
    vcpu: &Mutex<Vcpu>,
    devs: &Mutex<Devices>,
    ram: &GuestRam,
    machine: &Machine,
    control: &Control,
) {
    let mut throttle_at = std::time::Instant::now();
    let mut entered = false;
    let reason = loop {
        {
            let mut st = lock(&control.state);
            if st.stop {
                break "stopped".to_owned();
            }
            if st.pause_requested {
                lock(vcpu).complete_pending();
                st.parked += 1;
                control.cv.notify_all();
                while st.pause_requested && !st.stop {
                    st = control
                        .cv
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                st.parked -= 1;
                continue;
            }
            if !entered {
                entered = true;
                st.entered += 1;
                control.cv.notify_all();
            }
        }
        let pct = control.throttle_pct.load(Ordering::Relaxed);
        if pct > 0 && throttle_at.elapsed() >= Duration::from_millis(10) {
            std::thread::sleep(Duration::from_micros(u64::from(pct) * 100));
            throttle_at = std::time::Instant::now();
        }
        let mut v = lock(vcpu);
        let mut idle = false;
        match v.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == devices::IDLE_PORT {
                    idle = true;
                } else if (devices::COM1..devices::COM1 + 8).contains(&port) {
                    if let Some(&b) = data.first() {
                        lock(devs).serial.write(port - devices::COM1, b);
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let b = if (devices::COM1..devices::COM1 + 8).contains(&port) {
                    lock(devs).serial.read(port - devices::COM1)
                } else {
                    0xff
                };
                data.fill(b);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match addr.checked_sub(devices::VIRTIO_MMIO_BASE) {
                    Some(off) if off < devices::VIRTIO_MMIO_LEN => {
                        lock(devs).blk.mmio_read(off, data);
                    }
                    _ => data.fill(0xff),
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some(off) = addr.checked_sub(devices::VIRTIO_MMIO_BASE) {
                    if off < devices::VIRTIO_MMIO_LEN && lock(devs).blk.mmio_write(off, data, ram) {
                        if let Err(e) = machine.pulse_irq(devices::VIRTIO_BLK_GSI) {
                            tracing::error!(error = %e, "virtio-blk interrupt failed");
                        }
                    }
                }
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => break "guest shut down (triple fault)".to_owned(),
            Ok(other) => break format!("unexpected vcpu exit {other:?}"),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => break format!("KVM_RUN failed: {e}"),
        }
        drop(v);
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    tracing::info!(reason = %reason, "vcpu thread exited");
    let mut st = lock(&control.state);
    st.exited.get_or_insert(reason);
    control.cv.notify_all();
}
