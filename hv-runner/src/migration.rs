//! Live migration and save/restore. The wire and file format is specified in
//! hv-runner/MIGRATION.md; this module follows it.
//!
//! Source state machine:
//! ```text
//!  Hello ──► FullPass ──► Rounds ──(expected downtime ≤ budget)──► Paused ──► State sent
//!    │          │            │ (no convergence: cancel, or throttle)     │
//!    └──────────┴────────────┴──── any error: Cancel, resume on source ◄──┤ (no Ready)
//!                                                                         ▼
//!                     Ready ──► flush+close disk, release owner ──► Commit ──► Resumed: exit
//!                       (Commit not acknowledged: the owner record decides who runs)
//! ```
//! The destination resumes only after Commit, and claims the owner record with an
//! exclusive create first, so the VM never runs on both.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::kvm::{GuestRam, PAGE_SIZE};
use crate::vm::{MachineState, OwnerRecord, Vm, VmConfig, VmDir, VmError};

/// Stream magic.
pub const MAGIC: [u8; 8] = *b"HVMIGRT\0";
/// Protocol version spoken by this runner.
pub const VERSION: u32 = 4;
/// Oldest protocol version accepted (version 3 lacked SYNC, which such a source never
/// sends; version 2's device raised no interrupt, version 1 also had a different page
/// frame, vCPU state and RESUMED reply).
pub const MIN_VERSION: u32 = 3;

const T_PAGES: u8 = 8;
const T_ROUND: u8 = 2;
const T_STATE: u8 = 3;
const T_COMMIT: u8 = 4;
const T_CANCEL: u8 = 5;
const T_ZERO: u8 = 6;
const T_END: u8 = 7;
const T_SYNC: u8 = 9;
const R_HELLO_OK: u8 = 0x10;
const R_READY: u8 = 0x11;
const R_RESUMED: u8 = 0x12;
const R_SYNCED: u8 = 0x13;
const R_ERROR: u8 = 0x1f;
const MAX_JSON: u32 = 64 << 20;
/// Most pages a receiver accepts in one PAGES frame.
const MAX_RUN_PAGES: usize = 1024;

/// Errors of a migration, save or restore.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The stream failed.
    #[error("migration stream {step}")]
    Io {
        /// Protocol step.
        step: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The peer sent something that breaks the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer refused.
    #[error("peer refused: {0}")]
    Refused(String),
    /// The guest dirties memory faster than the link carries it.
    #[error("guest does not converge: {dirty_pages} pages dirty after {rounds} rounds, expected downtime {expected_ms} ms over budget {budget_ms} ms")]
    NoConvergence {
        /// Rounds done.
        rounds: u32,
        /// Pages dirty at the last check.
        dirty_pages: u64,
        /// Expected stop-and-copy time.
        expected_ms: u64,
        /// Budget.
        budget_ms: u64,
    },
    /// A migration or save of this VM is already running.
    #[error("a migration of vm {0} is already in progress")]
    AlreadyMigrating(String),
    /// The vCPU is gone.
    #[error("vm is not running")]
    NotRunning,
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// KVM or guest memory failed.
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
}

fn io_err(step: &'static str) -> impl FnOnce(io::Error) -> MigrateError {
    move |source| MigrateError::Io { step, source }
}

/// First message of a stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// VM name (its folder name on the volume).
    pub vm_name: String,
    /// The VM configuration.
    pub config: VmConfig,
    /// Source node.
    pub source_node: String,
    /// Debug: directory where both sides dump RAM at switch-over (`src.ram`, `dst.ram`).
    pub debug_dump_dir: Option<PathBuf>,
}

/// What to do when the guest does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum NoConverge {
    /// Cancel the migration; the VM keeps running on the source.
    Cancel,
    /// Slow the vCPU down step by step, then stop-and-copy at the round cap.
    Throttle,
}

/// Tunables of one migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Destination `HOST:PORT`.
    pub to: String,
    /// Downtime budget in ms.
    pub max_downtime_ms: u64,
    /// Cap on dirty rounds.
    pub max_rounds: u32,
    /// Policy for a guest that does not converge.
    pub on_no_converge: NoConverge,
    /// Debug: dump RAM on both sides at switch-over into this directory.
    pub debug_dump_dir: Option<PathBuf>,
    /// Cap on the stream rate in MB/s (0 = none), like a slower link.
    #[serde(default)]
    pub max_bandwidth_mbps: u64,
}

/// Figures of a finished migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Hello to destination resume, ms.
    pub total_ms: f64,
    /// Source pause to destination resume, ms, on the source's clock: pause to the arrival
    /// of the destination's RESUMED (an upper bound, by half a round trip).
    pub downtime_ms: f64,
    /// Dirty rounds after the full pass.
    pub rounds: u32,
    /// Pages sent with data.
    pub pages_sent: u64,
    /// Pages sent as zero markers.
    pub zero_pages_sent: u64,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Highest vCPU throttle applied, %.
    pub throttle_pct: u32,
    /// Measured stream bandwidth, MB/s.
    pub bandwidth_mbps: f64,
}

/// Most pages in one PAGES frame the source sends (1 MiB; a receiver accepts up to
/// `MAX_RUN_PAGES`).
const RUN_PAGES: usize = 256;
/// Tag, pfn and count of a PAGES frame.
const RUN_HEAD: usize = 13;

struct Out<W: Write + AsFd> {
    /// Small frames (markers, JSON); flushed before each PAGES frame.
    w: BufWriter<W>,
    ram: Arc<GuestRam>,
    bytes: u64,
    pages: u64,
    zeros: u64,
    /// The pending PAGES frame: `run_len` consecutive non-zero pages from `run_start`.
    /// Its head and data leave in one `writev` straight from guest RAM.
    run_start: usize,
    run_len: usize,
    limit_bytes_per_s: u64,
    t0: Instant,
}

impl<W: Write + AsFd> Out<W> {
    fn new(w: W, ram: Arc<GuestRam>) -> Self {
        Self {
            w: BufWriter::with_capacity(64 << 10, w),
            ram,
            bytes: 0,
            pages: 0,
            zeros: 0,
            run_start: 0,
            run_len: 0,
            limit_bytes_per_s: 0,
            t0: Instant::now(),
        }
    }
    /// Counts `len` bytes about to be sent and, under a bandwidth cap, waits until they
    /// are due.
    fn pace(&mut self, len: usize) {
        self.bytes += len as u64;
        if self.limit_bytes_per_s > 0 {
            let allowed = self.limit_bytes_per_s as f64 * self.t0.elapsed().as_secs_f64();
            let ahead = self.bytes as f64 - allowed;
            if ahead > 65536.0 {
                std::thread::sleep(Duration::from_secs_f64(
                    ahead / self.limit_bytes_per_s as f64,
                ));
            }
        }
    }
    fn raw(&mut self, b: &[u8]) -> Result<(), MigrateError> {
        self.pace(b.len());
        self.w.write_all(b).map_err(io_err("send"))
    }
    /// Writes the pending run of pages as one PAGES frame.
    fn end_run(&mut self) -> Result<(), MigrateError> {
        if self.run_len == 0 {
            return Ok(());
        }
        let n = self.run_len;
        self.run_len = 0;
        let mut head = [0u8; RUN_HEAD];
        head[0] = T_PAGES;
        head[1..9].copy_from_slice(&(self.run_start as u64).to_le_bytes());
        head[9..].copy_from_slice(&u32::try_from(n).expect("run fits u32").to_le_bytes());
        self.pace(RUN_HEAD + n * PAGE_SIZE);
        // Frames queued before this one leave first.
        self.w.flush().map_err(io_err("send"))?;
        let gpa = self.run_start as u64 * PAGE_SIZE as u64;
        self.ram
            .send_with_head(self.w.get_ref().as_fd(), &head, gpa, n * PAGE_SIZE)?;
        Ok(())
    }
    fn put(&mut self, b: &[u8]) -> Result<(), MigrateError> {
        self.end_run()?;
        self.raw(b)
    }
    fn json<T: Serialize>(&mut self, tag: u8, v: &T) -> Result<(), MigrateError> {
        let body = serde_json::to_vec(v).expect("state serializes");
        let len = u32::try_from(body.len())
            .map_err(|_| MigrateError::Protocol("state too large".into()))?;
        self.put(&[tag])?;
        self.put(&len.to_le_bytes())?;
        self.put(&body)
    }
    fn flush(&mut self) -> Result<(), MigrateError> {
        self.end_run()?;
        self.w.flush().map_err(io_err("flush"))
    }
    /// Sends page `page`: skipped when zero and `skip_zero`, a zero marker when zero,
    /// else its data (consecutive pages go out together in one PAGES frame). The zero
    /// check reads the page in place and stops at its first non-zero bytes.
    fn page(&mut self, page: usize, skip_zero: bool) -> Result<(), MigrateError> {
        if self.run_len == RUN_PAGES || (self.run_len > 0 && page != self.run_start + self.run_len)
        {
            self.end_run()?;
        }
        if self.ram.page_is_zero(page) {
            self.end_run()?;
            if !skip_zero {
                self.zeros += 1;
                self.raw(&[T_ZERO])?;
                self.raw(&(page as u64).to_le_bytes())?;
            }
            return Ok(());
        }
        if self.run_len == 0 {
            self.run_start = page;
        }
        self.run_len += 1;
        self.pages += 1;
        Ok(())
    }
    fn hello(&mut self, h: &Hello) -> Result<(), MigrateError> {
        self.put(&MAGIC)?;
        self.put(&VERSION.to_le_bytes())?;
        let body = serde_json::to_vec(h).expect("hello serializes");
        let len = u32::try_from(body.len())
            .map_err(|_| MigrateError::Protocol("hello too large".into()))?;
        self.put(&len.to_le_bytes())?;
        self.put(&body)
    }
}

fn read_u8(r: &mut impl Read, step: &'static str) -> Result<u8, MigrateError> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).map_err(io_err(step))?;
    Ok(b[0])
}
fn read_u32(r: &mut impl Read, step: &'static str) -> Result<u32, MigrateError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(io_err(step))?;
    Ok(u32::from_le_bytes(b))
}
fn read_u64(r: &mut impl Read, step: &'static str) -> Result<u64, MigrateError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(io_err(step))?;
    Ok(u64::from_le_bytes(b))
}
fn read_json<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
    step: &'static str,
) -> Result<T, MigrateError> {
    let len = read_u32(r, step)?;
    if len > MAX_JSON {
        return Err(MigrateError::Protocol(format!(
            "{step}: {len} byte message"
        )));
    }
    let mut body =
        vec![0u8; usize::try_from(len).map_err(|_| MigrateError::Protocol("length".into()))?];
    r.read_exact(&mut body).map_err(io_err(step))?;
    serde_json::from_slice(&body).map_err(|e| MigrateError::Protocol(format!("{step}: {e}")))
}
fn read_reply(r: &mut impl Read, step: &'static str, want: u8) -> Result<(), MigrateError> {
    let tag = read_u8(r, step)?;
    if tag == want {
        return Ok(());
    }
    if tag == R_ERROR {
        let msg: String = read_json(r, step)?;
        return Err(MigrateError::Refused(msg));
    }
    Err(MigrateError::Protocol(format!(
        "{step}: unexpected reply {tag:#x}"
    )))
}

/// Ends a pass or round: sends SYNC `round` and waits for the destination's SYNCED
/// `round`, so everything sent before is loaded into its RAM, not just queued in socket
/// buffers.
fn sync<W: Write + AsFd>(
    out: &mut Out<W>,
    r: &mut impl Read,
    round: u32,
) -> Result<(), MigrateError> {
    out.put(&[T_SYNC])?;
    out.put(&round.to_le_bytes())?;
    out.flush()?;
    read_reply(r, "synced", R_SYNCED)?;
    let got = read_u32(r, "synced")?;
    if got != round {
        return Err(MigrateError::Protocol(format!(
            "synced round {got}, expected {round}"
        )));
    }
    Ok(())
}

fn ones(bitmap: &[u64], pages: usize) -> impl Iterator<Item = usize> + '_ {
    bitmap
        .iter()
        .enumerate()
        .flat_map(move |(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
        .filter(move |&p| p < pages)
}

fn dump_ram(vm: &Vm, path: &Path) -> Result<(), MigrateError> {
    let mut f = BufWriter::new(std::fs::File::create(path).map_err(io_err("debug dump"))?);
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in 0..vm.ram.pages() {
        vm.ram.read_page(p, &mut buf)?;
        f.write_all(&buf).map_err(io_err("debug dump"))?;
    }
    f.flush().map_err(io_err("debug dump"))
}

/// Progress callback: one human-readable line per event.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

/// Live-migrates the running `vm` to `opts.to`. On `Ok` the VM runs on the destination and
/// has been stopped here; on `Err` it still runs here.
pub fn migrate(
    vm: &Vm,
    node: &str,
    opts: &MigrateOptions,
    progress: Progress<'_>,
) -> Result<Report, MigrateError> {
    let start = Instant::now();
    let stream = TcpStream::connect(&opts.to).map_err(io_err("connect"))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err("connect"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io_err("connect"))?);
    let mut out = Out::new(stream, Arc::clone(&vm.ram));
    out.limit_bytes_per_s = opts.max_bandwidth_mbps.saturating_mul(1_000_000);
    let hello = Hello {
        vm_name: vm.dir.name.clone(),
        config: vm.cfg.clone(),
        source_node: node.to_owned(),
        debug_dump_dir: opts.debug_dump_dir.clone(),
    };
    out.hello(&hello)?;
    out.flush()?;
    read_reply(&mut reader, "hello", R_HELLO_OK)?;
    let _peer_version = read_u32(&mut reader, "hello")?;
    progress(&format!("connected to {}, protocol v{VERSION}", opts.to));

    let result = precopy_and_switch(vm, node, opts, &mut out, &mut reader, start, progress);
    match result {
        Ok(r) => Ok(r),
        Err((e, paused, closed)) => {
            // Before Commit: the destination will never run the VM. Tell it, then resume.
            let _ = out.put(&[T_CANCEL]);
            let _ = out.flush();
            vm.machine.set_dirty_logging(false).ok();
            vm.set_throttle(0);
            if closed {
                vm.reopen_devices()?;
                vm.claim_owner(node, false)?;
            }
            if paused {
                vm.resume();
            }
            tracing::warn!(vm = %vm.dir.name, error = %e, "migration cancelled, vm keeps running here");
            Err(e)
        }
    }
}

type Fail = (MigrateError, bool, bool);

fn precopy_and_switch<W: Write + AsFd>(
    vm: &Vm,
    node: &str,
    opts: &MigrateOptions,
    out: &mut Out<W>,
    reader: &mut impl Read,
    start: Instant,
    progress: Progress<'_>,
) -> Result<Report, Fail> {
    let f = |e: MigrateError| (e, false, false);
    let pages = vm.ram.pages();
    vm.machine
        .set_dirty_logging(true)
        .map_err(|e| f(e.into()))?;
    vm.machine.take_dirty_log().map_err(|e| f(e.into()))?;
    vm.ram.take_vmm_dirty();

    // Full pass: zero pages are skipped (destination RAM starts zeroed).
    let t = Instant::now();
    // Pages never populated on this host are zero: skip them without reading.
    let untouched = vm.ram.never_populated();
    for p in 0..pages {
        if untouched.as_ref().is_some_and(|u| u[p]) {
            continue;
        }
        out.page(p, true).map_err(f)?;
    }
    // ROUND 0 marks the end of the full pass (the destination stops prefaulting).
    out.put(&[T_ROUND]).map_err(f)?;
    out.put(&0u32.to_le_bytes()).map_err(f)?;
    // The pass ends when the destination has loaded it: what still sits in socket buffers
    // would otherwise be drained during the downtime, and the bandwidth overestimated.
    sync(out, reader, 0).map_err(f)?;
    let pass_s = t.elapsed().as_secs_f64();
    let mut bw = if out.bytes > (256 << 10) && pass_s > 0.0 {
        out.bytes as f64 / pass_s
    } else {
        1e9
    };
    progress(&format!(
        "full pass: {} pages, {} MB in {:.0} ms ({:.0} MB/s)",
        out.pages,
        out.bytes >> 20,
        pass_s * 1e3,
        bw / 1e6
    ));

    let budget_s = opts.max_downtime_ms as f64 / 1e3;
    let rounds_start = Instant::now();
    let mut rounds = 0u32;
    let mut throttle = 0u32;
    let final_set: Vec<u64>;
    loop {
        let mut dirty = vm.machine.take_dirty_log().map_err(|e| f(e.into()))?;
        for (d, v) in dirty.iter_mut().zip(vm.ram.take_vmm_dirty()) {
            *d |= v;
        }
        let n: u64 = dirty.iter().map(|w| u64::from(w.count_ones())).sum();
        let expected_s = (n * PAGE_SIZE as u64) as f64 / bw;
        if expected_s <= budget_s
            || (rounds >= opts.max_rounds && opts.on_no_converge == NoConverge::Throttle)
        {
            final_set = dirty;
            break;
        }
        let stuck = rounds >= 5 || rounds_start.elapsed() >= Duration::from_secs(10);
        if stuck || rounds >= opts.max_rounds {
            match opts.on_no_converge {
                NoConverge::Cancel => {
                    return Err(f(MigrateError::NoConvergence {
                        rounds,
                        dirty_pages: n,
                        expected_ms: u64::try_from(
                            Duration::from_secs_f64(expected_s.min(1e9)).as_millis(),
                        )
                        .unwrap_or(u64::MAX),
                        budget_ms: opts.max_downtime_ms,
                    }))
                }
                NoConverge::Throttle => {
                    throttle = (throttle + 20).min(95);
                    vm.set_throttle(throttle);
                    progress(&format!("not converging: throttling vcpu to {throttle}%"));
                }
            }
        }
        rounds += 1;
        let t = Instant::now();
        let before = out.bytes;
        out.put(&[T_ROUND]).map_err(f)?;
        out.put(&rounds.to_le_bytes()).map_err(f)?;
        for p in ones(&dirty, pages) {
            out.page(p, false).map_err(f)?;
        }
        sync(out, reader, rounds).map_err(f)?;
        let sent = out.bytes - before;
        let el = t.elapsed().as_secs_f64();
        if sent > (256 << 10) && el > 0.0 {
            bw = sent as f64 / el;
        }
        progress(&format!(
            "round {rounds}: {n} dirty pages, {} KB in {:.1} ms, expected downtime {:.1} ms",
            sent >> 10,
            el * 1e3,
            expected_s * 1e3
        ));
    }

    // Stop and copy.
    vm.presync_devices();
    if !vm.pause() {
        return Err(f(MigrateError::NotRunning));
    }
    let paused_at = Instant::now();
    let fp = |e: MigrateError| (e, true, false);
    let mut dirty = final_set;
    let last = vm.machine.take_dirty_log().map_err(|e| fp(e.into()))?;
    for ((d, k), v) in dirty.iter_mut().zip(last).zip(vm.ram.take_vmm_dirty()) {
        *d |= k | v;
    }
    out.put(&[T_ROUND]).map_err(fp)?;
    out.put(&(rounds + 1).to_le_bytes()).map_err(fp)?;
    let final_pages: u64 = dirty.iter().map(|w| u64::from(w.count_ones())).sum();
    for p in ones(&dirty, pages) {
        out.page(p, false).map_err(fp)?;
    }
    tracing::debug!(us = paused_at.elapsed().as_micros(), "final pages queued");
    let state = vm.save_state().map_err(|e| fp(e.into()))?;
    out.json(T_STATE, &state).map_err(fp)?;
    out.flush().map_err(fp)?;
    if let Some(d) = &opts.debug_dump_dir {
        dump_ram(vm, &d.join("src.ram")).map_err(fp)?;
    }
    tracing::debug!(us = paused_at.elapsed().as_micros(), "state sent");
    read_reply(reader, "ready", R_READY).map_err(fp)?;
    // Switch-over: the disk and console are handed to the destination.
    tracing::debug!(us = paused_at.elapsed().as_micros(), "destination ready");
    vm.close_devices().map_err(|e| (e.into(), true, true))?;
    tracing::debug!(us = paused_at.elapsed().as_micros(), "devices closed");
    vm.release_owner();
    tracing::debug!(
        us = paused_at.elapsed().as_micros(),
        "devices closed, owner released"
    );
    let commit = out.put(&[T_COMMIT]).and_then(|()| out.flush());
    if let Err(e) = commit {
        return Err((e, true, true));
    }
    let resumed = read_reply(reader, "resumed", R_RESUMED);
    // One clock: pause to the arrival of RESUMED, both on this host's monotonic clock.
    let downtime = paused_at.elapsed();
    match resumed {
        Ok(()) => {}
        // An explicit refusal: the destination did not start the VM; take it back.
        Err(e @ MigrateError::Refused(_)) => return Err((e, true, true)),
        Err(e) => {
            // Commit was sent: the destination may be running. The owner record decides.
            progress("no answer to commit; checking the owner record");
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Some(o) = OwnerRecord::read(&vm.dir) {
                    if o.pid != std::process::id() || o.host != crate::vm::hostname() {
                        tracing::warn!(vm = %vm.dir.name, owner = %o.node, "destination took the vm without acknowledging");
                        return Ok(Report::default());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            match vm.claim_owner(node, true) {
                Ok(()) => {
                    vm.reopen_devices().map_err(|e| (e.into(), true, false))?;
                    vm.machine.set_dirty_logging(false).ok();
                    vm.resume();
                    return Err((e, false, false));
                }
                Err(_) => return Ok(Report::default()),
            }
        }
    }
    let total = start.elapsed();
    let downtime_ms = downtime.as_secs_f64() * 1e3;
    progress(&format!(
        "switched over: {final_pages} pages in the final copy"
    ));
    Ok(Report {
        total_ms: total.as_secs_f64() * 1e3,
        downtime_ms,
        rounds,
        pages_sent: out.pages,
        zero_pages_sent: out.zeros,
        bytes_sent: out.bytes,
        throttle_pct: throttle,
        bandwidth_mbps: bw / 1e6,
    })
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Saves the running `vm` into `state.hvm` in its folder (RAM, vCPU and device state) and
/// leaves it paused with its disk closed; the caller then stops the process.
pub fn save(vm: &Vm, node: &str) -> Result<(), MigrateError> {
    if !vm.pause() {
        return Err(MigrateError::NotRunning);
    }
    let tmp = vm.dir.dir.join("state.hvm.tmp");
    let r = (|| {
        let file = std::fs::File::create(&tmp).map_err(io_err("create state file"))?;
        let mut out = Out::new(file, Arc::clone(&vm.ram));
        out.hello(&Hello {
            vm_name: vm.dir.name.clone(),
            config: vm.cfg.clone(),
            source_node: node.to_owned(),
            debug_dump_dir: None,
        })?;
        for p in 0..vm.ram.pages() {
            out.page(p, true)?;
        }
        let state = vm.save_state()?;
        out.json(T_STATE, &state)?;
        out.put(&[T_END])?;
        out.flush()?;
        let file = out.w.into_inner().map_err(|e| MigrateError::Io {
            step: "write state file",
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err("sync state file"))?;
        vm.close_devices()?;
        std::fs::rename(&tmp, vm.dir.state_path()).map_err(io_err("rename state file"))?;
        Ok(())
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        vm.resume();
        return Err(e);
    }
    vm.release_owner();
    Ok(())
}

/// Reads a stream (an incoming migration with `replies`, or a state file without) into a
/// new VM in `volume`, and starts it. Returns the running VM.
pub fn receive(
    input: &mut impl Read,
    mut replies: Option<&mut dyn Write>,
    volume: &Path,
    node: &str,
    expect_name: Option<&str>,
) -> Result<Vm, MigrateError> {
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic).map_err(io_err("hello"))?;
    if magic != MAGIC {
        return Err(MigrateError::Protocol("bad magic".into()));
    }
    let version = read_u32(input, "hello")?;
    let refuse = |replies: &mut Option<&mut dyn Write>, msg: String| {
        if let Some(w) = replies.as_mut() {
            let body = serde_json::to_vec(&msg).expect("string serializes");
            let mut m = vec![R_ERROR];
            m.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
            m.extend_from_slice(&body);
            let _ = w.write_all(&m);
            let _ = w.flush();
        }
        MigrateError::Refused(msg)
    };
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(refuse(
            &mut replies,
            format!("migration protocol version {version} not supported: this runner speaks {MIN_VERSION}..={VERSION}; run the same hv-runner version on both nodes"),
        ));
    }
    let hello: Hello = read_json(input, "hello")?;
    if let Some(n) = expect_name {
        if n != hello.vm_name {
            return Err(MigrateError::Protocol(format!(
                "state is for vm {}, not {n}",
                hello.vm_name
            )));
        }
    }
    if hello.vm_name.is_empty() || hello.vm_name.contains('/') || hello.vm_name.starts_with('.') {
        return Err(refuse(
            &mut replies,
            format!("bad vm name {:?}", hello.vm_name),
        ));
    }
    let dir = VmDir::new(&volume.join(&hello.vm_name))?;
    if !dir.disk_path().exists() {
        return Err(refuse(
            &mut replies,
            format!("{} not found on this node", dir.disk_path().display()),
        ));
    }
    if let Err(why) = hello.config.validate() {
        return Err(refuse(&mut replies, format!("config: {why}")));
    }
    let vm = match Vm::create(dir, hello.config.clone(), None, false) {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(&mut replies, format!("create vm: {e}"))),
    };
    if let Some(w) = replies.as_mut() {
        let mut m = vec![R_HELLO_OK];
        m.extend_from_slice(&VERSION.to_le_bytes());
        w.write_all(&m).map_err(io_err("hello reply"))?;
        w.flush().map_err(io_err("hello reply"))?;
    }
    tracing::info!(vm = %hello.vm_name, from = %hello.source_node, "incoming vm");
    let stop_prefault = Arc::new(AtomicBool::new(false));
    let mut prefault = if replies.is_some() {
        let ram = Arc::clone(&vm.ram);
        let stop = Arc::clone(&stop_prefault);
        std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || ram.prefault(&stop))
            .ok()
    } else {
        None
    };
    let _stop_on_exit = StopOnDrop(Arc::clone(&stop_prefault));
    let pages = vm.ram.pages();
    let mut have_state = false;
    loop {
        let tag = read_u8(input, "frame")?;
        match tag {
            T_PAGES => {
                let pfn = usize::try_from(read_u64(input, "pages")?).unwrap_or(usize::MAX);
                let count = usize::try_from(read_u32(input, "pages")?).unwrap_or(usize::MAX);
                if count == 0 || count > MAX_RUN_PAGES || pfn.saturating_add(count) > pages {
                    return Err(MigrateError::Protocol(format!(
                        "pages {pfn}+{count} beyond ram or run limit"
                    )));
                }
                let gpa = pfn as u64 * PAGE_SIZE as u64;
                vm.ram.populate(gpa, count * PAGE_SIZE);
                vm.ram.load_from(gpa, count * PAGE_SIZE, input)?;
            }
            T_ZERO => {
                let pfn = usize::try_from(read_u64(input, "page")?).unwrap_or(usize::MAX);
                if pfn >= pages {
                    return Err(MigrateError::Protocol(format!("page {pfn} beyond ram")));
                }
                vm.ram.zero_page(pfn)?;
            }
            T_ROUND => {
                // The full pass is over: the rest are few pages; stop competing for CPU
                // and the mm lock before the switch-over.
                stop_prefault.store(true, Ordering::Relaxed);
                let r = read_u32(input, "round")?;
                tracing::debug!(round = r, "round");
            }
            T_SYNC => {
                // Everything before this frame is loaded: say so.
                let r = read_u32(input, "sync")?;
                if let Some(w) = replies.as_mut() {
                    let mut m = [R_SYNCED, 0, 0, 0, 0];
                    m[1..].copy_from_slice(&r.to_le_bytes());
                    w.write_all(&m).map_err(io_err("synced"))?;
                    w.flush().map_err(io_err("synced"))?;
                }
            }
            T_STATE => {
                stop_prefault.store(true, Ordering::Relaxed);
                if let Some(t) = prefault.take() {
                    let _ = t.join();
                }
                let t_state = Instant::now();
                let state: MachineState = read_json(input, "state")?;
                if let Err(e) = vm.load_state(&state) {
                    return Err(refuse(&mut replies, format!("load state: {e}")));
                }
                tracing::debug!(us = t_state.elapsed().as_micros(), "state loaded");
                have_state = true;
                if let Some(w) = replies.as_mut() {
                    w.write_all(&[R_READY]).map_err(io_err("ready"))?;
                    w.flush().map_err(io_err("ready"))?;
                }
            }
            T_COMMIT | T_END if have_state => break,
            T_CANCEL => {
                return Err(MigrateError::Refused(
                    "source cancelled the migration".into(),
                ))
            }
            other => {
                return Err(MigrateError::Protocol(format!(
                    "unexpected frame {other:#x}"
                )))
            }
        }
    }
    let t_commit = Instant::now();
    // Switch-over on this side.
    if let Some(d) = &hello.debug_dump_dir {
        dump_ram(&vm, &d.join("dst.ram"))?;
    }
    let claimed = vm.claim_owner(node, replies.is_some());
    if let Err(e) = claimed {
        return Err(refuse(&mut replies, format!("claim vm: {e}")));
    }
    let started = vm.attach_disk().and_then(|()| vm.start());
    if let Err(e) = started {
        vm.release_owner();
        return Err(refuse(&mut replies, format!("start vm: {e}")));
    }
    tracing::debug!(us = t_commit.elapsed().as_micros(), "resumed after commit");
    if let Some(w) = replies.as_mut() {
        // The VM runs here now whatever happens to this reply.
        let _ = w.write_all(&[R_RESUMED]).and_then(|()| w.flush());
    }
    Ok(vm)
}
