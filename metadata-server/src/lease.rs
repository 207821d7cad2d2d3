//! The coordinator lease and node heartbeats on the LUN: who is coordinator, at which
//! address and epoch, and which nodes are alive. All lease logic lives here; the record
//! layout is `format::lease` (FORMAT.md §3).
//!
//! Acquisition is a delta lease in the manner of sanlock: it needs no compare-and-swap on
//! the disk, only the assumption that a write lands within the settle delay.
//!
//! ```text
//!  read lease ──▶ never written / released ───────────────────────────┐
//!      │                                                              ▼
//!      └─▶ held by someone: watch its renewal counter for the     write {me, epoch+1,
//!          lease timeout (polling)                                 counter+1, my addr}
//!            ├─ counter moved ─▶ live ─▶ Follower{owner, addr, epoch}     │ FUA
//!            └─ never moved  ─▶ expired ────────────────────────────────▶│
//!                                                                 wait settle delay
//!                                                                         │
//!                                                                  read back: mine?
//!                                                 yes ─▶ Coordinator{epoch}  no ─▶ Follower
//! ```
//!
//! [`acquire_or_find`] runs the whole diagram once (at mount). A running follower watches
//! with a [`LeaseWatcher`] instead, polled every few hundred milliseconds: it remembers
//! when it first saw the current renewal counter and reports the lease expired once the
//! counter has not moved for the lease's own `timeout_ms`; [`race`] then runs the right
//! half of the diagram (write epoch+1, settle, read back). Every follower that saw the
//! expiry may race; the last write to land wins, the others read it back and follow.
//!
//! Heartbeats: node n writes its slot (counter + 1, wall time, the epoch it last saw, its
//! data-path state). FORMAT.md §3 has no state field yet, so the state travels in the
//! slot's `addr` field: empty for Direct, `redirected:<reason>` for Redirected. When the
//! format gains a field, only `encode_state`/`decode_state` change.
//!
//! The [`LeaseKeeper`] renews (counter + wall time) every interval. It stops and reports
//! the lease lost when the record names another owner or epoch, or when no renewal has
//! succeeded for half the lease timeout (write errors, or the process was paused), so it
//! gives up well before anyone can take over. Self-fencing: a [`LeaseGuard`] taken from
//! the keeper answers, without I/O, whether this node may still act as coordinator (not
//! lost, last successful renewal started less than half the timeout ago); the store
//! checks it before every request, so a coordinator that was paused or cut off refuses
//! work from the moment its guard lapses, even before its keeper thread runs again.

use crate::format::lease::{LeaseKind, LeaseRecord};
use crate::format::{DecodeError, Geometry, Superblock, SuperblockError, BLOCK_LEN};
use crate::types::{Epoch, NodeId, Timestamp, VolumeId};
use block_client::{BlockDevice, BlockError, WriteFlags};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The superblock (which locates the lease area) could not be read.
    #[error("read the superblock to find the lease area")]
    Superblock(#[source] SuperblockError),
    /// A lease-area block could not be read.
    #[error("read {what} at byte {at}")]
    Read {
        /// Which record.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// A lease-area block could not be written.
    #[error("write {what} at byte {at}")]
    Write {
        /// Which record.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// A record is damaged or of the wrong kind or volume.
    #[error("corrupt {what}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// Cause.
        #[source]
        source: DecodeError,
    },
    /// No node holds the coordinator lease.
    #[error("no coordinator holds the lease")]
    NoCoordinator,
    /// The lease names an address that does not parse.
    #[error("lease of {node} has an invalid address {addr:?}")]
    BadAddress {
        /// Owner.
        node: NodeId,
        /// What it says.
        addr: String,
    },
    /// The node id has no slot in this volume.
    #[error("{node} is outside the volume's node range 1..={max_nodes}")]
    NodeOutOfRange {
        /// The node.
        node: NodeId,
        /// Highest node id of the volume.
        max_nodes: u32,
    },
    /// The timeout asked for cannot be stored or is zero.
    #[error("invalid lease timeout of {timeout_ms} ms")]
    BadTimeout {
        /// The value given.
        timeout_ms: u64,
    },
    /// The keeper thread could not be started.
    #[error("start the lease keeper thread")]
    Thread(#[source] std::io::Error),
}

/// What `acquire_or_find` found this node to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRole {
    /// This node now holds the lease with this epoch and must keep it renewed.
    Coordinator {
        /// The new epoch.
        epoch: Epoch,
    },
    /// Another node holds a live lease.
    Follower {
        /// The coordinator.
        coordinator: NodeId,
        /// Its metadata-server address.
        addr: SocketAddr,
        /// Its epoch.
        epoch: Epoch,
    },
}

/// The current holder of the coordinator lease as recorded on the LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorInfo {
    /// The owner.
    pub node: NodeId,
    /// Its metadata-server address.
    pub addr: SocketAddr,
    /// Its epoch.
    pub epoch: Epoch,
    /// Renewal counter at the time of reading.
    pub counter: u64,
}

/// A node's data-path state, as reported in its heartbeat slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// The node reads and writes the LUN directly.
    Direct,
    /// The node's data I/O goes through the coordinator.
    Redirected {
        /// Why (for `csvfs state`).
        reason: String,
    },
}

/// One node's heartbeat slot as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// The node.
    pub node: NodeId,
    /// Its reported state.
    pub state: NodeState,
    /// Heartbeat counter.
    pub counter: u64,
    /// Epoch the node last saw.
    pub epoch: Epoch,
    /// Wall time of the last heartbeat (the node's clock).
    pub time: Timestamp,
}

/// The lease area read whole, for `csvfs state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseArea {
    /// The coordinator lease record (`None`: never written).
    pub lease: Option<LeaseRecord>,
    /// Every heartbeat slot that was ever written, by node id.
    pub slots: Vec<SlotInfo>,
}

/// Prefix of a heartbeat's address field that carries a redirected state.
const REDIRECTED_PREFIX: &str = "redirected:";

/// This machine's wall time, as lease and heartbeat records carry it.
pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos(),
    }
}

fn geometry(dev: &Arc<dyn BlockDevice>) -> Result<(Geometry, VolumeId), LeaseError> {
    let sb = Superblock::read(dev.as_ref()).map_err(LeaseError::Superblock)?;
    Ok((sb.superblock.geometry, sb.superblock.volume))
}

fn read_record(
    dev: &Arc<dyn BlockDevice>,
    what: &'static str,
    at: u64,
    kind: LeaseKind,
    volume: VolumeId,
) -> Result<Option<LeaseRecord>, LeaseError> {
    let mut buf = vec![0u8; BLOCK_LEN];
    dev.read_at(&mut buf, at)
        .map_err(|source| LeaseError::Read { what, at, source })?;
    let rec =
        LeaseRecord::decode(&buf, at).map_err(|source| LeaseError::Corrupt { what, source })?;
    if let Some(r) = &rec {
        if r.kind != kind || r.volume != volume {
            return Err(LeaseError::Corrupt {
                what,
                source: DecodeError::Corrupt {
                    what,
                    at,
                    reason: format!(
                        "record of kind {:?} for volume {} where {kind:?} of {volume} belongs",
                        r.kind, r.volume
                    ),
                },
            });
        }
    }
    Ok(rec)
}

fn write_record(
    dev: &Arc<dyn BlockDevice>,
    what: &'static str,
    at: u64,
    rec: &LeaseRecord,
) -> Result<(), LeaseError> {
    let block = rec
        .encode_block()
        .map_err(|source| LeaseError::Corrupt { what, source })?;
    dev.write_at(&block, at, WriteFlags::FUA)
        .map_err(|source| LeaseError::Write { what, at, source })
}

fn info(rec: &LeaseRecord) -> Result<Option<CoordinatorInfo>, LeaseError> {
    let Some(node) = rec.node else {
        return Ok(None);
    };
    let addr = rec.addr.parse().map_err(|_| LeaseError::BadAddress {
        node,
        addr: rec.addr.clone(),
    })?;
    Ok(Some(CoordinatorInfo {
        node,
        addr,
        epoch: rec.epoch,
        counter: rec.counter,
    }))
}

/// Reads the coordinator lease record (`None`: never written).
fn read_lease(dev: &Arc<dyn BlockDevice>) -> Result<Option<LeaseRecord>, LeaseError> {
    let (g, volume) = geometry(dev)?;
    read_record(
        dev,
        "coordinator lease",
        g.lease_offset(),
        LeaseKind::Coordinator,
        volume,
    )
}

/// Reads who holds the lease. Does not judge whether the lease is still renewed.
pub fn find_coordinator(dev: &Arc<dyn BlockDevice>) -> Result<CoordinatorInfo, LeaseError> {
    match read_lease(dev)? {
        Some(r) => info(&r)?.ok_or(LeaseError::NoCoordinator),
        None => Err(LeaseError::NoCoordinator),
    }
}

/// Checks a racer's node and timeout; returns the timeout as stored, the lease's byte
/// offset and the volume.
fn racer_args(
    dev: &Arc<dyn BlockDevice>,
    node: NodeId,
    timeout_ms: u64,
) -> Result<(u32, u64, VolumeId), LeaseError> {
    let timeout_u32 = u32::try_from(timeout_ms)
        .ok()
        .filter(|t| *t > 0)
        .ok_or(LeaseError::BadTimeout { timeout_ms })?;
    let (g, volume) = geometry(dev)?;
    if g.heartbeat_offset(node).is_none() {
        return Err(LeaseError::NodeOutOfRange {
            node,
            max_nodes: g.max_nodes,
        });
    }
    Ok((timeout_u32, g.lease_offset(), volume))
}

/// Takes the coordinator lease when it is free or expired (not renewed within its
/// timeout, as observed here), or reports the live coordinator. `timeout_ms` is the lease
/// timeout this node promises to renew within if it wins. Blocks for up to about twice
/// the lease timeout.
pub fn acquire_or_find(
    dev: &Arc<dyn BlockDevice>,
    node: NodeId,
    my_addr: SocketAddr,
    timeout_ms: u64,
) -> Result<LeaseRole, LeaseError> {
    let (timeout_u32, at, volume) = racer_args(dev, node, timeout_ms)?;
    const WHAT: &str = "coordinator lease";
    let read = || read_record(dev, WHAT, at, LeaseKind::Coordinator, volume);
    let span = tracing::info_span!("lease_acquire", %node, %volume);
    let _enter = span.enter();

    let mut seen = read()?;
    if let Some(held) = seen.clone().filter(|r| r.node.is_some()) {
        // Watch the renewal counter for the owner's timeout (and at least ours).
        let watch = Duration::from_millis(u64::from(held.timeout_ms).max(timeout_ms));
        let poll = (watch / 10).clamp(Duration::from_millis(5), Duration::from_millis(500));
        let start = Instant::now();
        tracing::info!(owner = ?held.node, epoch = %held.epoch, watch_ms = watch.as_millis(), "lease held; watching its renewals");
        loop {
            std::thread::sleep(poll);
            let now = read()?;
            match &now {
                Some(r)
                    if r.counter != held.counter
                        || r.epoch != held.epoch
                        || r.node != held.node =>
                {
                    if let Some(i) = info(r)? {
                        tracing::info!(coordinator = %i.node, epoch = %i.epoch, addr = %i.addr, "lease is live; following");
                        return Ok(LeaseRole::Follower {
                            coordinator: i.node,
                            addr: i.addr,
                            epoch: i.epoch,
                        });
                    }
                    // Released meanwhile: free now.
                    seen = now;
                    break;
                }
                _ => {}
            }
            if start.elapsed() >= watch {
                tracing::info!(owner = ?held.node, epoch = %held.epoch, "lease expired");
                seen = now;
                break;
            }
        }
    }
    race_record(dev, node, my_addr, timeout_u32, &read, seen)
}

/// Writes `{node, epoch+1, counter+1, my_addr}` over the record last `seen`, waits the
/// settle delay and reads back: whoever's write landed last holds the lease.
fn race_record(
    dev: &Arc<dyn BlockDevice>,
    node: NodeId,
    my_addr: SocketAddr,
    timeout_ms: u32,
    read: &dyn Fn() -> Result<Option<LeaseRecord>, LeaseError>,
    seen: Option<LeaseRecord>,
) -> Result<LeaseRole, LeaseError> {
    const WHAT: &str = "coordinator lease";
    let (g, volume) = geometry(dev)?;
    let at = g.lease_offset();
    let (epoch, counter) = match &seen {
        // Counters come from the disk: never overflow on a damaged value.
        Some(r) => (
            Epoch(r.epoch.0.saturating_add(1)),
            r.counter.wrapping_add(1),
        ),
        None => (Epoch(1), 1),
    };
    let mine = LeaseRecord {
        kind: LeaseKind::Coordinator,
        volume,
        node: Some(node),
        timeout_ms,
        epoch,
        counter,
        time: now(),
        addr: my_addr.to_string(),
    };
    write_record(dev, WHAT, at, &mine)?;
    // Let a competitor's write in flight land before reading back.
    std::thread::sleep(settle_delay(u64::from(timeout_ms)));
    match read()? {
        Some(r) if r.node == Some(node) && r.epoch == epoch && r.counter >= counter => {
            tracing::info!(%epoch, addr = %my_addr, "acquired the coordinator lease");
            Ok(LeaseRole::Coordinator { epoch })
        }
        Some(r) => match info(&r)? {
            Some(i) => {
                tracing::info!(coordinator = %i.node, epoch = %i.epoch, "lost the lease race; following");
                Ok(LeaseRole::Follower {
                    coordinator: i.node,
                    addr: i.addr,
                    epoch: i.epoch,
                })
            }
            None => Err(LeaseError::NoCoordinator),
        },
        None => Err(LeaseError::NoCoordinator),
    }
}

/// How long a racer waits between its write and the read-back: a quarter of the lease
/// timeout, at least 10 ms, at most 5 s.
pub fn settle_delay(timeout_ms: u64) -> Duration {
    Duration::from_millis((timeout_ms / 4).clamp(10, 5000))
}

/// Races for a lease that a [`LeaseWatcher`] reported expired or free (`seen` is the
/// record it judged). Re-reads the record first: when it changed meanwhile (the owner
/// renewed, or another node won), nobody writes and the current holder is reported.
/// Blocks for the settle delay.
pub fn race(
    dev: &Arc<dyn BlockDevice>,
    node: NodeId,
    my_addr: SocketAddr,
    timeout_ms: u64,
    seen: Option<&LeaseRecord>,
) -> Result<LeaseRole, LeaseError> {
    let (timeout_u32, at, volume) = racer_args(dev, node, timeout_ms)?;
    let read = || read_record(dev, "coordinator lease", at, LeaseKind::Coordinator, volume);
    let span = tracing::info_span!("lease_race", %node, %volume);
    let _enter = span.enter();
    let now = read()?;
    if now.as_ref() != seen {
        // Renewed by its owner, or won by another node: follow. Released meanwhile: race.
        if let Some(i) = now.as_ref().map(info).transpose()?.flatten() {
            return Ok(LeaseRole::Follower {
                coordinator: i.node,
                addr: i.addr,
                epoch: i.epoch,
            });
        }
    }
    race_record(dev, node, my_addr, timeout_u32, &read, now)
}

/// What a [`LeaseWatcher`] concluded from one look at the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchVerdict {
    /// The owner renewed within its timeout (or this is the first look at this counter).
    Live(CoordinatorInfo),
    /// The lease is free (never written or released), or its owner has not renewed it for
    /// its timeout: race for it with [`race`], passing this record.
    Takeable(Option<LeaseRecord>),
}

/// Watches the coordinator lease from a follower; see the module doc.
#[derive(Debug, Default)]
pub struct LeaseWatcher {
    /// The record last seen and when its counter was first seen.
    last: Option<(LeaseRecord, Instant)>,
}

impl LeaseWatcher {
    /// A watcher that has seen nothing yet.
    pub fn new() -> LeaseWatcher {
        LeaseWatcher::default()
    }

    /// Reads the lease once and judges it. The timeout is the record's own `timeout_ms`
    /// (the owner's promise), measured on this node's monotonic clock from the first look
    /// at the current counter; a record with timeout 0 is judged with `default_timeout_ms`.
    pub fn poll(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        default_timeout_ms: u64,
    ) -> Result<WatchVerdict, LeaseError> {
        let Some(rec) = read_lease(dev)? else {
            self.last = None;
            return Ok(WatchVerdict::Takeable(None));
        };
        let Some(i) = info(&rec)? else {
            self.last = None;
            return Ok(WatchVerdict::Takeable(Some(rec)));
        };
        let since = match &self.last {
            Some((r, t))
                if r.counter == rec.counter && r.epoch == rec.epoch && r.node == rec.node =>
            {
                *t
            }
            _ => Instant::now(),
        };
        self.last = Some((rec.clone(), since));
        let timeout_ms = match rec.timeout_ms {
            0 => default_timeout_ms,
            t => u64::from(t),
        };
        if since.elapsed() >= Duration::from_millis(timeout_ms) {
            tracing::info!(owner = %i.node, epoch = %i.epoch, counter = i.counter, timeout_ms, "coordinator lease expired: not renewed within its timeout");
            return Ok(WatchVerdict::Takeable(Some(rec)));
        }
        Ok(WatchVerdict::Live(i))
    }
}

#[derive(Debug, Default)]
struct KeeperStatus {
    lost: Option<String>,
    renewals: u64,
}

/// State shared by a keeper's thread and its guards.
#[derive(Debug)]
struct KeeperShared {
    status: Mutex<KeeperStatus>,
    /// When the last successful renewal (or the acquisition) started.
    renewed_at: Mutex<Instant>,
    /// Half the lease timeout: how long this node acts on one renewal.
    valid_for: Duration,
}

impl KeeperShared {
    fn check(&self) -> Result<(), String> {
        if let Some(why) = &self.status.lock().lost {
            return Err(why.clone());
        }
        let age = self.renewed_at.lock().elapsed();
        if age >= self.valid_for {
            return Err(format!(
                "lease not renewed for {} ms (limit {} ms)",
                age.as_millis(),
                self.valid_for.as_millis()
            ));
        }
        Ok(())
    }
}

/// Answers, without I/O, whether the coordinator holding a [`LeaseKeeper`] may still act
/// as coordinator; see the module doc. Cheap to clone and to check.
#[derive(Debug, Clone)]
pub struct LeaseGuard(Arc<KeeperShared>);

impl LeaseGuard {
    /// `Ok` while the lease is held and was renewed less than half its timeout ago; the
    /// reason otherwise. Once it fails it never succeeds again: the keeper has given up.
    pub fn check(&self) -> Result<(), String> {
        self.0.check()
    }
}

/// Renews the coordinator lease in the background. Dropping it stops renewing (without
/// releasing); [`LeaseKeeper::release`] releases the lease so another node can take it
/// at once.
#[derive(Debug)]
pub struct LeaseKeeper {
    stop: Arc<AtomicBool>,
    shared: Arc<KeeperShared>,
    thread: Option<JoinHandle<()>>,
    dev: Arc<dyn BlockDevice>,
    node: NodeId,
    epoch: Epoch,
}

impl LeaseKeeper {
    /// Starts renewing the lease this node acquired with `epoch`, every `interval_ms`.
    /// Call it right after winning: the lease counts as renewed when this is called.
    pub fn start(
        dev: Arc<dyn BlockDevice>,
        node: NodeId,
        epoch: Epoch,
        interval_ms: u64,
    ) -> Result<LeaseKeeper, LeaseError> {
        let (g, volume) = geometry(&dev)?;
        let at = g.lease_offset();
        let interval = Duration::from_millis(interval_ms.max(1));
        let timeout = renew_timeout(&dev, at, volume).unwrap_or(interval * 3);
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(KeeperShared {
            status: Mutex::new(KeeperStatus::default()),
            // The lease was written before the racer's settle delay: count from there.
            renewed_at: Mutex::new(
                Instant::now()
                    .checked_sub(settle_delay(
                        u64::try_from(timeout.as_millis()).unwrap_or(0),
                    ))
                    .unwrap_or_else(Instant::now),
            ),
            valid_for: timeout / 2,
        });
        let thread = {
            let (dev, stop, shared) = (dev.clone(), stop.clone(), shared.clone());
            std::thread::Builder::new()
                .name("csvfs-lease".into())
                .spawn(move || {
                    let span = tracing::info_span!("lease_keeper", %node, %epoch);
                    let _e = span.enter();
                    while !stop.load(Ordering::Acquire) {
                        // Give up at half the lease timeout, before anyone may take it over;
                        // also after a pause of the whole process (SIGSTOP, a stall).
                        let stale = shared.check().err();
                        let started = Instant::now();
                        let lost = match stale {
                            Some(why) => Some(why),
                            None => match renew_once(&dev, at, volume, node, epoch) {
                                Ok(()) => {
                                    *shared.renewed_at.lock() = started;
                                    shared.status.lock().renewals += 1;
                                    None
                                }
                                Err(RenewError::Taken(why)) => Some(why),
                                Err(RenewError::Io(e)) => {
                                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                                    None
                                }
                            },
                        };
                        if let Some(why) = lost {
                            tracing::error!("coordinator lease lost: {why}");
                            shared.status.lock().lost = Some(why);
                            return;
                        }
                        std::thread::sleep(interval);
                    }
                })
                .map_err(LeaseError::Thread)?
        };
        Ok(LeaseKeeper {
            stop,
            shared,
            thread: Some(thread),
            dev,
            node,
            epoch,
        })
    }

    /// A guard that tells whether this node may still act as coordinator.
    pub fn guard(&self) -> LeaseGuard {
        LeaseGuard(self.shared.clone())
    }

    /// The epoch the keeper renews.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// True once the lease is lost; the keeper has stopped and this node must stop
    /// acting as coordinator.
    pub fn is_lost(&self) -> bool {
        self.shared.status.lock().lost.is_some()
    }

    /// Why the lease was lost, once it is.
    pub fn lost_reason(&self) -> Option<String> {
        self.shared.status.lock().lost.clone()
    }

    /// Successful renewals so far.
    pub fn renewals(&self) -> u64 {
        self.shared.status.lock().renewals
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops renewing and releases the lease (owner cleared, epoch kept), so another node
    /// can take it without waiting for the timeout.
    pub fn release(mut self) -> Result<(), LeaseError> {
        self.halt();
        let (g, volume) = geometry(&self.dev)?;
        let at = g.lease_offset();
        const WHAT: &str = "coordinator lease";
        match read_record(&self.dev, WHAT, at, LeaseKind::Coordinator, volume)? {
            Some(mut r) if r.node == Some(self.node) && r.epoch == self.epoch => {
                r.node = None;
                r.counter = r.counter.wrapping_add(1);
                r.time = now();
                write_record(&self.dev, WHAT, at, &r)
            }
            _ => Ok(()),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.halt();
    }
}

enum RenewError {
    Taken(String),
    Io(LeaseError),
}

fn renew_timeout(dev: &Arc<dyn BlockDevice>, at: u64, volume: VolumeId) -> Option<Duration> {
    read_record(dev, "coordinator lease", at, LeaseKind::Coordinator, volume)
        .ok()
        .flatten()
        .map(|r| Duration::from_millis(u64::from(r.timeout_ms)))
}

fn renew_once(
    dev: &Arc<dyn BlockDevice>,
    at: u64,
    volume: VolumeId,
    node: NodeId,
    epoch: Epoch,
) -> Result<(), RenewError> {
    const WHAT: &str = "coordinator lease";
    let rec = read_record(dev, WHAT, at, LeaseKind::Coordinator, volume).map_err(RenewError::Io)?;
    match rec {
        Some(mut r) if r.node == Some(node) && r.epoch == epoch => {
            r.counter = r.counter.wrapping_add(1);
            r.time = now();
            write_record(dev, WHAT, at, &r).map_err(RenewError::Io)
        }
        Some(r) => Err(RenewError::Taken(format!(
            "the lease now names {} at {}",
            r.node
                .map_or_else(|| "no owner".to_string(), |n| n.to_string()),
            r.epoch
        ))),
        None => Err(RenewError::Taken("the lease record was erased".into())),
    }
}

fn encode_state(state: &NodeState) -> String {
    match state {
        NodeState::Direct => String::new(),
        NodeState::Redirected { reason } => {
            // The field holds 256 bytes; cut the reason at a character boundary.
            let mut s = format!("{REDIRECTED_PREFIX}{reason}");
            let max = crate::format::lease::MAX_ADDR_BYTES;
            if s.len() > max {
                let mut cut = max;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
            }
            s
        }
    }
}

fn decode_state(field: &str) -> NodeState {
    match field.strip_prefix(REDIRECTED_PREFIX) {
        Some(reason) => NodeState::Redirected {
            reason: reason.to_string(),
        },
        None => NodeState::Direct,
    }
}

/// Writes `node`'s heartbeat: counter + 1, wall time, the epoch it last saw and its state.
pub fn heartbeat(
    dev: &Arc<dyn BlockDevice>,
    node: NodeId,
    epoch: Epoch,
    state: &NodeState,
) -> Result<u64, LeaseError> {
    let (g, volume) = geometry(dev)?;
    let at = g.heartbeat_offset(node).ok_or(LeaseError::NodeOutOfRange {
        node,
        max_nodes: g.max_nodes,
    })?;
    const WHAT: &str = "heartbeat slot";
    let counter = read_record(dev, WHAT, at, LeaseKind::Heartbeat, volume)?
        .map_or(0, |r| r.counter)
        .wrapping_add(1);
    let rec = LeaseRecord {
        kind: LeaseKind::Heartbeat,
        volume,
        node: Some(node),
        timeout_ms: 0,
        epoch,
        counter,
        time: now(),
        addr: encode_state(state),
    };
    write_record(dev, WHAT, at, &rec)?;
    Ok(counter)
}

/// Reads the coordinator lease and every heartbeat slot that was ever written.
pub fn read_all(dev: &Arc<dyn BlockDevice>) -> Result<LeaseArea, LeaseError> {
    let (g, volume) = geometry(dev)?;
    let lease = read_record(
        dev,
        "coordinator lease",
        g.lease_offset(),
        LeaseKind::Coordinator,
        volume,
    )?;
    let mut slots = Vec::new();
    for n in 1..=g.max_nodes {
        let node = NodeId(n);
        let Some(at) = g.heartbeat_offset(node) else {
            continue;
        };
        if let Some(r) = read_record(dev, "heartbeat slot", at, LeaseKind::Heartbeat, volume)? {
            slots.push(SlotInfo {
                node,
                state: decode_state(&r.addr),
                counter: r.counter,
                epoch: r.epoch,
                time: r.time,
            });
        }
    }
    Ok(LeaseArea { lease, slots })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{mkfs, MkfsOptions};
    use block_client::testing::{FailKind, FlakyDisk, MemDevice, OpClass};

    fn volume() -> Arc<dyn BlockDevice> {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        let opts = MkfsOptions {
            max_nodes: 8,
            ..MkfsOptions::default()
        };
        mkfs(dev.clone(), &opts, &mut |_, _| {}).unwrap();
        dev
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn free_lease_is_taken_with_epoch_1_and_published() {
        let dev = volume();
        assert!(matches!(
            find_coordinator(&dev),
            Err(LeaseError::NoCoordinator)
        ));
        let t0 = Instant::now();
        let role = acquire_or_find(&dev, NodeId(1), addr(7001), 200).unwrap();
        assert_eq!(role, LeaseRole::Coordinator { epoch: Epoch(1) });
        assert!(
            t0.elapsed() < Duration::from_millis(200),
            "a free lease is not waited out"
        );
        let c = find_coordinator(&dev).unwrap();
        assert_eq!((c.node, c.addr, c.epoch), (NodeId(1), addr(7001), Epoch(1)));
    }

    #[test]
    fn live_lease_is_not_taken() {
        let dev = volume();
        let role = acquire_or_find(&dev, NodeId(1), addr(7001), 300).unwrap();
        let LeaseRole::Coordinator { epoch } = role else {
            panic!("{role:?}")
        };
        let keeper = LeaseKeeper::start(dev.clone(), NodeId(1), epoch, 50).unwrap();
        let role = acquire_or_find(&dev, NodeId(2), addr(7002), 300).unwrap();
        assert_eq!(
            role,
            LeaseRole::Follower {
                coordinator: NodeId(1),
                addr: addr(7001),
                epoch: Epoch(1)
            }
        );
        assert!(keeper.renewals() > 0);
        assert!(!keeper.is_lost());
    }

    #[test]
    fn expired_lease_is_taken_with_a_higher_epoch_and_the_old_keeper_sees_it_lost() {
        let dev = volume();
        let role = acquire_or_find(&dev, NodeId(1), addr(7001), 200).unwrap();
        assert_eq!(role, LeaseRole::Coordinator { epoch: Epoch(1) });
        // Node 1 never renews: after the timeout node 2 takes over.
        let t0 = Instant::now();
        let role = acquire_or_find(&dev, NodeId(2), addr(7002), 200).unwrap();
        assert_eq!(role, LeaseRole::Coordinator { epoch: Epoch(2) });
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "waited out the timeout"
        );
        assert_eq!(find_coordinator(&dev).unwrap().addr, addr(7002));
        let stale = LeaseKeeper::start(dev.clone(), NodeId(1), Epoch(1), 20).unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        while !stale.is_lost() {
            assert!(Instant::now() < end, "stale keeper did not notice");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stale.lost_reason().unwrap().contains("node 2"));
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let dev = volume();
        acquire_or_find(&dev, NodeId(1), addr(7001), 1000).unwrap();
        let keeper = LeaseKeeper::start(dev.clone(), NodeId(1), Epoch(1), 50).unwrap();
        keeper.release().unwrap();
        let t0 = Instant::now();
        let role = acquire_or_find(&dev, NodeId(3), addr(7003), 1000).unwrap();
        assert_eq!(role, LeaseRole::Coordinator { epoch: Epoch(2) });
        assert!(t0.elapsed() < Duration::from_millis(900));
    }

    #[test]
    fn keeper_gives_up_when_it_cannot_write() {
        let mem = volume();
        let flaky = Arc::new(FlakyDisk::new(mem));
        let handle = flaky.handle();
        let dev: Arc<dyn BlockDevice> = flaky;
        acquire_or_find(&dev, NodeId(1), addr(7001), 1000).unwrap();
        let keeper = LeaseKeeper::start(dev.clone(), NodeId(1), Epoch(1), 20).unwrap();
        // Renewing well first, so the give-up is counted from a real renewal.
        let t0 = Instant::now();
        while keeper.renewals() < 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "keeper never renewed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.fail_all(OpClass::Write, FailKind::PathLost);
        let t0 = Instant::now();
        while !keeper.is_lost() {
            assert!(t0.elapsed() < Duration::from_secs(3), "keeper kept going");
            std::thread::sleep(Duration::from_millis(5));
        }
        // At about half the timeout: well before anyone else could take the lease.
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
    }

    #[test]
    fn watcher_reports_expiry_once_the_counter_stops_and_one_racer_wins() {
        let dev = volume();
        let role = acquire_or_find(&dev, NodeId(1), addr(7001), 300).unwrap();
        assert_eq!(role, LeaseRole::Coordinator { epoch: Epoch(1) });
        let keeper = LeaseKeeper::start(dev.clone(), NodeId(1), Epoch(1), 30).unwrap();
        let mut w2 = LeaseWatcher::new();
        let mut w3 = LeaseWatcher::new();
        // While renewed: live, for longer than the timeout.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(500) {
            assert!(matches!(w2.poll(&dev, 300).unwrap(), WatchVerdict::Live(_)));
            std::thread::sleep(Duration::from_millis(20));
        }
        // The coordinator dies (stops renewing, keeps the record).
        drop(keeper);
        let dead = Instant::now();
        let (seen2, seen3) = loop {
            let (a, b) = (w2.poll(&dev, 300).unwrap(), w3.poll(&dev, 300).unwrap());
            if let (WatchVerdict::Takeable(a), WatchVerdict::Takeable(b)) = (a, b) {
                break (a, b);
            }
            assert!(dead.elapsed() < Duration::from_secs(3), "expiry not seen");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(dead.elapsed() >= Duration::from_millis(300));
        // Both race at once: exactly one wins, the other follows it.
        let d2 = dev.clone();
        let r2 = std::thread::spawn(move || race(&d2, NodeId(2), addr(7002), 300, seen2.as_ref()));
        let r3 = race(&dev, NodeId(3), addr(7003), 300, seen3.as_ref()).unwrap();
        let r2 = r2.join().unwrap().unwrap();
        let winners: Vec<_> = [&r2, &r3]
            .into_iter()
            .filter(|r| matches!(r, LeaseRole::Coordinator { .. }))
            .collect();
        assert_eq!(winners.len(), 1, "{r2:?} {r3:?}");
        let c = find_coordinator(&dev).unwrap();
        assert_eq!(c.epoch, Epoch(2));
        let loser = if matches!(r2, LeaseRole::Coordinator { .. }) {
            &r3
        } else {
            &r2
        };
        assert!(
            matches!(loser, LeaseRole::Follower { coordinator, epoch: Epoch(2), .. } if *coordinator == c.node)
        );
        // A late racer with the old record does not write: it follows the winner.
        let late = race(&dev, NodeId(4), addr(7004), 300, seen3.as_ref()).unwrap();
        assert!(matches!(
            late,
            LeaseRole::Follower {
                epoch: Epoch(2),
                ..
            }
        ));
    }

    #[test]
    fn guard_lapses_when_the_keeper_cannot_renew_and_stays_lapsed() {
        let mem = volume();
        let flaky = Arc::new(FlakyDisk::new(mem));
        let handle = flaky.handle();
        let dev: Arc<dyn BlockDevice> = flaky;
        acquire_or_find(&dev, NodeId(1), addr(7001), 400).unwrap();
        let keeper = LeaseKeeper::start(dev.clone(), NodeId(1), Epoch(1), 20).unwrap();
        let guard = keeper.guard();
        std::thread::sleep(Duration::from_millis(100));
        assert!(guard.check().is_ok());
        handle.fail_all(OpClass::Write, FailKind::PathLost);
        let t0 = Instant::now();
        while guard.check().is_ok() {
            assert!(t0.elapsed() < Duration::from_secs(2), "guard never lapsed");
            std::thread::sleep(Duration::from_millis(2));
        }
        // At most half the timeout after the last renewal.
        assert!(
            t0.elapsed() <= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        handle.heal();
        std::thread::sleep(Duration::from_millis(100));
        assert!(guard.check().is_err(), "a lapsed guard came back");
        assert!(keeper.is_lost());
    }

    #[test]
    fn heartbeats_and_read_all() {
        let dev = volume();
        acquire_or_find(&dev, NodeId(1), addr(7001), 100).unwrap();
        assert_eq!(
            heartbeat(&dev, NodeId(3), Epoch(1), &NodeState::Direct).unwrap(),
            1
        );
        assert_eq!(
            heartbeat(&dev, NodeId(3), Epoch(1), &NodeState::Direct).unwrap(),
            2
        );
        let red = NodeState::Redirected {
            reason: "path to the LUN lost".into(),
        };
        heartbeat(&dev, NodeId(4), Epoch(1), &red).unwrap();
        assert!(matches!(
            heartbeat(&dev, NodeId(9), Epoch(1), &NodeState::Direct),
            Err(LeaseError::NodeOutOfRange { .. })
        ));
        let area = read_all(&dev).unwrap();
        let lease = area.lease.unwrap();
        assert_eq!((lease.node, lease.epoch), (Some(NodeId(1)), Epoch(1)));
        assert_eq!(area.slots.len(), 2);
        assert_eq!(area.slots[0].node, NodeId(3));
        assert_eq!(area.slots[0].counter, 2);
        assert_eq!(area.slots[0].state, NodeState::Direct);
        assert_eq!(area.slots[1].state, red);
    }
}
