//! The coordinator lease and node heartbeats on the LUN: who is coordinator, at which
//! address and epoch, and which nodes are alive. All lease logic lives here; the record
//! layout is `format::lease` (FORMAT.md §3). Robust failover and self-fencing grow here.
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
//! Heartbeats: node n writes its slot (counter + 1, wall time, the epoch it last saw, its
//! data-path state). FORMAT.md §3 has no state field yet, so the state travels in the
//! slot's `addr` field: empty for Direct, `redirected:<reason>` for Redirected. When the
//! format gains a field, only `encode_state`/`decode_state` change.
//!
//! The [`LeaseKeeper`] renews (counter + wall time) every interval. It stops and reports
//! the lease lost when the record names another owner or epoch, or when it could not
//! renew for half the lease timeout (so it gives up well before anyone can take over).

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

fn now() -> Timestamp {
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

/// Reads who holds the lease. Does not judge whether the lease is still renewed.
pub fn find_coordinator(dev: &Arc<dyn BlockDevice>) -> Result<CoordinatorInfo, LeaseError> {
    let (g, volume) = geometry(dev)?;
    let rec = read_record(
        dev,
        "coordinator lease",
        g.lease_offset(),
        LeaseKind::Coordinator,
        volume,
    )?;
    match rec {
        Some(r) => info(&r)?.ok_or(LeaseError::NoCoordinator),
        None => Err(LeaseError::NoCoordinator),
    }
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
    let at = g.lease_offset();
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
        timeout_ms: timeout_u32,
        epoch,
        counter,
        time: now(),
        addr: my_addr.to_string(),
    };
    write_record(dev, WHAT, at, &mine)?;
    // Let a competitor's write in flight land before reading back.
    std::thread::sleep(Duration::from_millis((timeout_ms / 4).clamp(10, 5000)));
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

#[derive(Debug, Default)]
struct KeeperStatus {
    lost: Option<String>,
    renewals: u64,
}

/// Renews the coordinator lease in the background. Dropping it stops renewing (without
/// releasing); [`LeaseKeeper::release`] releases the lease so another node can take it
/// at once.
#[derive(Debug)]
pub struct LeaseKeeper {
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<KeeperStatus>>,
    thread: Option<JoinHandle<()>>,
    dev: Arc<dyn BlockDevice>,
    node: NodeId,
    epoch: Epoch,
}

impl LeaseKeeper {
    /// Starts renewing the lease this node acquired with `epoch`, every `interval_ms`.
    pub fn start(
        dev: Arc<dyn BlockDevice>,
        node: NodeId,
        epoch: Epoch,
        interval_ms: u64,
    ) -> Result<LeaseKeeper, LeaseError> {
        let (g, volume) = geometry(&dev)?;
        let at = g.lease_offset();
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(KeeperStatus::default()));
        let interval = Duration::from_millis(interval_ms.max(1));
        let thread = {
            let (dev, stop, status) = (dev.clone(), stop.clone(), status.clone());
            std::thread::Builder::new()
                .name("csvfs-lease".into())
                .spawn(move || {
                    let span = tracing::info_span!("lease_keeper", %node, %epoch);
                    let _e = span.enter();
                    let mut last_ok = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        let lost = match renew_once(&dev, at, volume, node, epoch) {
                            Ok(()) => {
                                last_ok = Instant::now();
                                status.lock().renewals += 1;
                                None
                            }
                            Err(RenewError::Taken(why)) => Some(why),
                            Err(RenewError::Io(e)) => {
                                // Give up at half the lease timeout, before anyone may take it.
                                let timeout =
                                    renew_timeout(&dev, at, volume).unwrap_or(interval * 3);
                                if last_ok.elapsed() >= timeout / 2 {
                                    Some(format!(
                                        "could not renew for {} ms: {e}",
                                        last_ok.elapsed().as_millis()
                                    ))
                                } else {
                                    tracing::warn!(error = %e, "lease renewal failed; retrying");
                                    None
                                }
                            }
                        };
                        if let Some(why) = lost {
                            tracing::error!("coordinator lease lost: {why}");
                            status.lock().lost = Some(why);
                            return;
                        }
                        std::thread::sleep(interval);
                    }
                })
                .map_err(LeaseError::Thread)?
        };
        Ok(LeaseKeeper {
            stop,
            status,
            thread: Some(thread),
            dev,
            node,
            epoch,
        })
    }

    /// The epoch the keeper renews.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// True once the lease is lost; the keeper has stopped and this node must stop
    /// acting as coordinator.
    pub fn is_lost(&self) -> bool {
        self.status.lock().lost.is_some()
    }

    /// Why the lease was lost, once it is.
    pub fn lost_reason(&self) -> Option<String> {
        self.status.lock().lost.clone()
    }

    /// Successful renewals so far.
    pub fn renewals(&self) -> u64 {
        self.status.lock().renewals
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
