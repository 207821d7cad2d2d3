//! `csvfs mount`: bring one node of the cluster up and serve the mount until it goes away.
//!
//! ```text
//!  open LUN ─▶ read + validate superblock ─▶ read secret
//!     ─▶ lease: acquire_or_find ─┬─ Coordinator{epoch}: host (below)
//!                                └─ Follower: nothing to host
//!     ─▶ connect the metadata client (coordinator found through the lease)
//!     ─▶ heartbeat, periodic commit and role threads
//!     ─▶ FUSE session (AutoUnmount through fusermount when present)
//!     ─▶ runs until unmounted, SIGTERM or SIGINT ─▶ commit, close, release the lease
//!
//!  host(epoch): keep the lease (LeaseKeeper) ─▶ open the store (journal replay) under
//!               the keeper's guard ─▶ start the server on --listen (already in the lease)
//! ```
//!
//! The role thread makes every node a candidate for coordinator, all the time:
//!
//! ```text
//!            ┌────────────── follower ◀──────────────────────────────┐
//!            │ poll the lease every 250 ms (LeaseWatcher)            │
//!            │ counter still for the lease timeout, or released      │ guard lapsed (lease
//!            ▼                                                       │ taken, not renewed
//!   race: write epoch+1, settle, read back ── lost ─▶ follower       │ in time, paused):
//!            │ won                                                   │ store fenced,
//!            ▼                                                       │ server stopped,
//!   host(epoch): replay, serve, "node N took over as coordinator" ─▶ coordinator
//! ```
//!
//! Every node's metadata client finds the new address in the lease and resends what was in
//! flight with the same request ids; the duplicate-request cache, kept in the journal,
//! makes each run once. While no coordinator exists, metadata calls wait (up to the
//! request timeout) and data I/O to extents already mapped goes on directly.
//!
//! Allocation after a takeover: clusters handed to a node (its preallocation included) are
//! written into the file's extent map as unwritten extents in the same journaled
//! transaction as the bitmap change, so the new coordinator's replay sees them as
//! allocated to that file and never hands them to another file. Which node may convert an
//! unwritten cluster (its claim) is coordinator memory only and is lost with the old
//! coordinator; so a coordinator that took over grants no claim for `CLAIM_GRACE`, in
//! which every surviving node reconnects and commits, ending the claims it held, before
//! another node can be given one of those clusters.

use crate::cache::{DirCache, Lesson};
use crate::config::MountConfig;
use crate::data::DataPath;
use crate::fuse::{CsvFs, Invalidator};
use crate::meta::Metadata;
use block_client::{open_device, BlockDevice, BlockError};
use metadata_server::client::{
    ClientConfig, ConnectError, CoordinatorLocator, InvalidationHandler, LocalCoordinator,
    MetadataClient, Then,
};
use metadata_server::format::{Superblock, SuperblockError};
use metadata_server::lease::{
    self, LeaseError, LeaseKeeper, LeaseRole, LeaseWatcher, NodeState, WatchVerdict,
};
use metadata_server::proto::{Invalidation, Request, Response};
use metadata_server::server::{Server, ServerConfig, ServerError, ServerHandle};
use metadata_server::store::{Store, StoreError};
use metadata_server::types::{Epoch, FsError, NodeId, VolumeId};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Lease timeout this node promises to renew within when it is coordinator. A dead
/// coordinator is replaced after about this plus the settle delay (a quarter of it) plus
/// the journal replay; a live one gives up after half of it without a renewal.
pub const LEASE_TIMEOUT_MS: u64 = 4000;
/// Lease renewal interval.
pub const LEASE_RENEW_MS: u64 = 500;
/// How often a follower looks at the lease.
const WATCH_MS: u64 = 250;
/// After a takeover, how long the new coordinator grants no claim on unwritten clusters
/// (the old coordinator's claims are unknown): long enough for every node to reconnect
/// (a silent coordinator is given up after 5 s, a hung handshake after 5 s more at worst;
/// a dead one at once) and to commit once (every second), which ends its old claims.
const CLAIM_GRACE: Duration = Duration::from_secs(8);
/// Heartbeat interval of every node.
pub(crate) const HEARTBEAT_MS: u64 = 1000;
/// Interval of the background commit of pending writes.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Why a mount could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The LUN could not be opened or reached.
    #[error("open the LUN {lun}")]
    OpenLun {
        /// The LUN URI or path.
        lun: String,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The LUN does not hold a usable csvfs volume (not csvfs, unsupported version, ...).
    #[error("read the superblock of {lun}")]
    Superblock {
        /// The LUN.
        lun: String,
        /// Why.
        #[source]
        source: SuperblockError,
    },
    /// The secret file could not be read.
    #[error("read the cluster secret {path}")]
    ReadSecret {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The secret file is empty.
    #[error("the cluster secret file {path} is empty")]
    EmptySecret {
        /// The file.
        path: PathBuf,
    },
    /// The node id does not fit the volume.
    #[error("{node} is outside this volume's node ids 1..={max_nodes}")]
    NodeOutOfRange {
        /// The node.
        node: NodeId,
        /// Highest node id of the volume.
        max_nodes: u32,
    },
    /// The listen address could not be bound.
    #[error("bind the metadata server address {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Taking or finding the coordinator lease failed.
    #[error("take or find the coordinator lease")]
    Lease(#[source] LeaseError),
    /// This node won the lease but could not open the metadata store.
    #[error("open the metadata store as coordinator ({epoch})")]
    OpenStore {
        /// The epoch won.
        epoch: Epoch,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// This node won the lease but could not start the metadata server.
    #[error("start the metadata server")]
    StartServer(#[source] ServerError),
    /// The coordinator could not be reached or refused this node.
    #[error("connect to the coordinator")]
    Connect(#[source] ConnectError),
    /// The first request to the coordinator failed.
    #[error("ask the coordinator for the volume's usage")]
    FirstRequest(#[source] FsError),
    /// A thread or runtime could not be started.
    #[error("start {what}")]
    Start {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The FUSE mount failed.
    #[error("mount FUSE at {mountpoint}")]
    Fuse {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The metadata client as the node's [`Metadata`] service, with the node's directory
/// cache in front: a directory's attributes and a name known not to exist are answered
/// here while the coordinator keeps the cache current (see [`DirCache`]).
struct ClientMeta {
    client: Arc<MetadataClient>,
    cache: Arc<DirCache>,
    /// Told which directories a request changes while it waits for the coordinator.
    kernel: Arc<Invalidator>,
}

impl Metadata for ClientMeta {
    fn call(&self, uid: u32, gid: u32, req: Request) -> Result<Response, FsError> {
        if self.client.is_connected() {
            match &req {
                Request::GetAttr { ino } => {
                    if let Some(a) = self.cache.attr(*ino) {
                        return Ok(Response::Attr(a));
                    }
                }
                Request::Lookup { parent, name } if self.cache.absent(*parent, name) => {
                    return Err(FsError::NotFound);
                }
                _ => {}
            }
        }
        self.call_stamped(uid, gid, req).0
    }

    fn call_stamped(&self, uid: u32, gid: u32, req: Request) -> (Result<Response, FsError>, u64) {
        let lesson = Lesson::of(&req);
        let _changing = self.kernel.changing(&req);
        let (result, stamp) = self.client.call_stamped(uid, gid, req);
        self.cache.learn(lesson, &result, stamp);
        (result.map(Response::into_answer), stamp)
    }

    fn call_detached(&self, uid: u32, gid: u32, req: Request, then: Then) {
        if matches!(Lesson::of(&req), Lesson::None) {
            self.client.call_detached(uid, gid, req, then);
        } else {
            // The directory cache learns from the answer and its stamp: wait for both.
            then(self.call(uid, gid, req));
        }
    }
}

/// Coordinator invalidations to the directory cache, the data path and the kernel.
struct Handler {
    kernel: Arc<Invalidator>,
    cache: Arc<DirCache>,
    /// The client, once connected: a new coordinator is told which files are open here.
    client: Arc<OnceLock<Weak<MetadataClient>>>,
    /// The highest coordinator epoch this node re-announced its opens to (or first connected
    /// to): once per new epoch, however many `Invalidation::All` arrive.
    announced: Arc<AtomicU64>,
    /// Invalidation stamp of the last takeover (`Invalidation::All`): answers read before
    /// it came from an earlier coordinator.
    takeover_stamp: AtomicU64,
}

impl Handler {
    /// After a takeover (`Invalidation::All` on an epoch change): re-announces this node's
    /// open files to the new coordinator, which keeps open counts in memory only. From its
    /// own thread, so the invalidation thread never waits for the coordinator.
    fn reannounce_opens(&self) {
        let Some(client) = self.client.get().and_then(Weak::upgrade) else {
            return;
        };
        let Some(data) = self.kernel.data() else {
            return;
        };
        let epoch = client.epoch();
        if self.announced.fetch_max(epoch.0, Ordering::SeqCst) >= epoch.0 {
            return;
        }
        let stamp = self.takeover_stamp.load(Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("reopen".into())
            .spawn(move || {
                // Until it is counted: a coordinator that frees orphans nobody re-announced
                // must hear of these. A newer takeover re-announces on its own.
                let mut backoff = Duration::from_millis(200);
                for attempt in 1..=REOPEN_ATTEMPTS {
                    if client.epoch() != epoch {
                        return;
                    }
                    // Sent with nothing open too: the coordinator waits for every
                    // resumed node's announcement before it frees unlinked files.
                    let opens = data.reopen_snapshot(stamp, epoch);
                    let files = opens.len();
                    match client.call(0, 0, Request::Reopen { epoch, opens }) {
                        Ok(_) => {
                            info!(%epoch, files, "re-announced open files to the coordinator");
                            // Created across the takeover and recorded after the snapshot.
                            let late = data.reopen_counted(epoch);
                            if late > 0 {
                                info!(%epoch, files = late, "counted files created across the takeover");
                            }
                            return;
                        }
                        Err(e) => {
                            warn!(%epoch, files, attempt, error = %e, "could not re-announce open files");
                        }
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start re-announcing open files");
        }
    }
}

impl InvalidationHandler for Handler {
    fn invalidate(&self, inv: &Invalidation) {
        match inv {
            Invalidation::Inode { ino } => self.kernel.inode(*ino),
            Invalidation::Entry { parent, name } => self.kernel.entry(*parent, name),
            Invalidation::All => {
                self.kernel.all();
                self.reannounce_opens();
            }
        }
    }

    fn observe(&self, stamp: u64, inv: &Invalidation) {
        if matches!(inv, Invalidation::All) {
            self.takeover_stamp.fetch_max(stamp, Ordering::SeqCst);
        }
        self.cache.observe(stamp, inv);
    }
}

/// Tries of re-announcing the open files to a new coordinator (about 15 s with back-off).
const REOPEN_ATTEMPTS: u32 = 10;

/// Heartbeats newer than this (by the writer's clock) count as a node that may be mounted.
const ALIVE_WITHIN: Duration = Duration::from_secs(10);

/// True when a node other than `me` may still be mounted: it wrote a heartbeat within
/// [`ALIVE_WITHIN`], or the heartbeats cannot be read. Such a node may hold files open and
/// writes under claims, so a new coordinator gives it the takeover grace.
fn others_alive(lun: &Arc<dyn BlockDevice>, me: NodeId) -> bool {
    let area = match lease::read_all(lun) {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot read the heartbeats; assuming other nodes are mounted");
            return true;
        }
    };
    let now = lease::now();
    let within_ms = i64::try_from(ALIVE_WITHIN.as_millis()).unwrap_or(i64::MAX);
    area.slots
        .iter()
        .any(|s| s.node != me && crate::output::age_ms(now, s.time) < within_ms)
}

/// Reads the cluster secret: the file's bytes without trailing whitespace.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, MountError> {
    let mut bytes = std::fs::read(path).map_err(|source| MountError::ReadSecret {
        path: path.to_path_buf(),
        source,
    })?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(MountError::EmptySecret {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Opens the LUN and validates its superblock.
pub fn open_volume(lun: &str) -> Result<(Arc<dyn BlockDevice>, Superblock), MountError> {
    let dev = open_device(lun).map_err(|source| MountError::OpenLun {
        lun: lun.to_string(),
        source,
    })?;
    let sb = Superblock::read_arc(&dev).map_err(|source| MountError::Superblock {
        lun: lun.to_string(),
        source,
    })?;
    if sb.read_only {
        warn!("volume has unknown read-only-compatible features; writes will fail");
    }
    Ok((dev, sb.superblock))
}

/// A concrete address for `listen`: port 0 is replaced by a free port, so the address can
/// be published in the lease before the server binds it. The returned listener keeps the
/// port taken until the server is about to bind it.
fn reserve_addr(listen: SocketAddr) -> Result<(SocketAddr, Option<TcpListener>), MountError> {
    if listen.port() != 0 {
        return Ok((listen, None));
    }
    let err = |source| MountError::Listen {
        addr: listen,
        source,
    };
    let l = TcpListener::bind(listen).map_err(err)?;
    let addr = l.local_addr().map_err(err)?;
    Ok((addr, Some(l)))
}

/// What this node hosts as coordinator.
struct Hosted {
    server: ServerHandle,
    keeper: LeaseKeeper,
    store: Arc<Store>,
    epoch: Epoch,
}

impl Hosted {
    /// Stops serving at once: the store refuses further work, the server closes every
    /// connection, the lease is left as it is (it is lost already).
    fn fence(self, why: &str) {
        self.store.fence(why);
        self.server.shutdown();
        drop(self.keeper);
    }

    /// Clean stop at unmount: store shut down (clean), lease released.
    fn shutdown(self) {
        self.server.shutdown();
        if let Err(e) = self.store.shutdown() {
            tracing::error!(error = %e, "closing the metadata store failed");
        }
        if let Err(e) = self.keeper.release() {
            warn!(error = %e, "releasing the coordinator lease failed");
        }
    }
}

/// What a node needs to become coordinator, at mount or by taking over.
struct Candidate {
    lun: Arc<dyn BlockDevice>,
    node: NodeId,
    volume: VolumeId,
    secret: Vec<u8>,
    listen: SocketAddr,
    /// The server's `node_grace_ms` when this node is coordinator.
    node_grace_ms: u64,
    hosted: parking_lot::Mutex<Option<Hosted>>,
    /// Where this node's client finds the coordinator it hosts (see `host`).
    local: Arc<LocalCoordinator>,
}

impl Candidate {
    /// Hosts the coordinator for the lease just won with `epoch` at `addr`: keeps the lease,
    /// replays the journal, serves. Returns how many records were replayed.
    /// `takeover`: other nodes may still be writing under claims the previous coordinator
    /// granted (it died or left while they stayed mounted).
    fn host(
        &self,
        epoch: Epoch,
        addr: SocketAddr,
        reserved: Option<TcpListener>,
        takeover: bool,
    ) -> Result<u64, MountError> {
        // Renewing first: the replay must not eat into the lease timeout.
        let keeper = LeaseKeeper::start(self.lun.clone(), self.node, epoch, LEASE_RENEW_MS)
            .map_err(MountError::Lease)?;
        let store = Arc::new(
            Store::open(self.lun.clone(), epoch)
                .map_err(|source| MountError::OpenStore { epoch, source })?,
        );
        store.set_lease_guard(keeper.guard());
        if takeover {
            store.hold_claims_for(CLAIM_GRACE);
            // Until the nodes re-announce their opens (the server ends the grace).
            store.hold_orphans();
        } else {
            // No other node is mounted, so none holds a file open: orphans go now rather
            // than when the server's node grace ends.
            store.reap_orphans().map_err(|e| MountError::OpenStore {
                epoch,
                source: StoreError::Load(e),
            })?;
        }
        let mut config = ServerConfig::new(addr, self.secret.clone(), self.volume, epoch);
        config.nodes_with_opens = store.nodes_holding_opens();
        config.node_grace_ms = self.node_grace_ms;
        drop(reserved);
        let server = Server::start(store.clone(), config).map_err(MountError::StartServer)?;
        let replayed = store.stats().replayed_records;
        self.local.set(Some(server.local()));
        *self.hosted.lock() = Some(Hosted {
            server,
            keeper,
            store,
            epoch,
        });
        Ok(replayed)
    }

    fn is_hosting(&self) -> bool {
        self.hosted.lock().is_some()
    }

    /// One step of the role thread; see the module doc.
    fn step(&self, watcher: &mut LeaseWatcher) {
        let lapsed = {
            let hosted = self.hosted.lock();
            match hosted.as_ref() {
                Some(h) => h.keeper.guard().check().err().map(|why| (why, h.epoch)),
                None => None,
            }
        };
        if let Some((why, epoch)) = lapsed {
            self.local.set(None);
            if let Some(h) = self.hosted.lock().take() {
                h.fence(&why);
            }
            info!(node = %self.node, %epoch, reason = %why, "this node stopped acting as coordinator; following");
            *watcher = LeaseWatcher::new();
            return;
        }
        if self.is_hosting() {
            return;
        }
        let seen = match watcher.poll(&self.lun, LEASE_TIMEOUT_MS) {
            Ok(WatchVerdict::Live(_)) => return,
            Ok(WatchVerdict::Takeable(seen)) => seen,
            Err(e) => {
                tracing::debug!(error = %e, "reading the coordinator lease failed");
                return;
            }
        };
        let started = Instant::now();
        let (addr, reserved) = match reserve_addr(self.listen) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot take over: no listen address");
                return;
            }
        };
        match lease::race(&self.lun, self.node, addr, LEASE_TIMEOUT_MS, seen.as_ref()) {
            Ok(LeaseRole::Coordinator { epoch }) => {
                let replay_start = Instant::now();
                match self.host(epoch, addr, reserved, true) {
                    Ok(replayed) => info!(
                        "node {} took over as coordinator, epoch {}, replayed {replayed} records in {} ms (takeover {} ms, serving at {addr})",
                        self.node.0,
                        epoch.0,
                        replay_start.elapsed().as_millis(),
                        started.elapsed().as_millis()
                    ),
                    Err(e) => tracing::error!(
                        error = %error_chain(&e),
                        %epoch,
                        "won the coordinator lease but cannot serve; letting it expire"
                    ),
                }
            }
            Ok(LeaseRole::Follower {
                coordinator, epoch, ..
            }) => {
                info!(%coordinator, %epoch, "another node holds the coordinator lease; following")
            }
            Err(e) => warn!(error = %e, "racing for the coordinator lease failed"),
        }
        *watcher = LeaseWatcher::new();
    }
}

/// `e` and its sources, joined with ": ".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn fusermount_present() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .any(|d| d.join("fusermount3").is_file() || d.join("fusermount").is_file())
}

/// Runs a mount in the foreground until it is unmounted or the process is told to stop.
pub fn run(cfg: &MountConfig) -> Result<(), MountError> {
    let (lun, sb) = open_volume(&cfg.lun)?;
    let secret = read_secret(&cfg.secret)?;
    let g = &sb.geometry;
    if cfg.node.0 == 0 || cfg.node.0 > g.max_nodes {
        return Err(MountError::NodeOutOfRange {
            node: cfg.node,
            max_nodes: g.max_nodes,
        });
    }
    let span = tracing::info_span!(
        "node",
        volume = %sb.volume,
        node = cfg.node.0,
        epoch = tracing::field::Empty
    );
    let _enter = span.enter();

    let candidate = Arc::new(Candidate {
        lun: lun.clone(),
        node: cfg.node,
        volume: sb.volume,
        secret: secret.clone(),
        listen: cfg.listen,
        node_grace_ms: cfg.node_grace_ms,
        hosted: parking_lot::Mutex::new(None),
        local: LocalCoordinator::new(),
    });
    let (my_addr, reserved) = reserve_addr(cfg.listen)?;
    // A lease with an owner that this node wins was expired: its owner died, maybe with
    // other nodes still mounted. A free lease (its owner unmounted cleanly) says nothing
    // about the others: their recent heartbeats do.
    let owned = lease::find_coordinator(&lun).is_ok() || others_alive(&lun, cfg.node);
    let role = lease::acquire_or_find(&lun, cfg.node, my_addr, LEASE_TIMEOUT_MS)
        .map_err(MountError::Lease)?;
    match role {
        LeaseRole::Coordinator { epoch } => {
            span.record("epoch", epoch.0);
            let replayed = candidate.host(epoch, my_addr, reserved, owned)?;
            info!(%epoch, addr = %my_addr, replayed, "this node is coordinator");
        }
        LeaseRole::Follower {
            coordinator,
            addr,
            epoch,
        } => {
            span.record("epoch", epoch.0);
            info!(%coordinator, %addr, %epoch, "following the coordinator");
        }
    }

    let invalidator = Invalidator::new().map_err(|source| MountError::Start {
        what: "the invalidation thread",
        source,
    })?;
    let cache = Arc::new(DirCache::new());
    let client_slot = Arc::new(OnceLock::new());
    let announced = Arc::new(AtomicU64::new(0));
    let client = MetadataClient::connect(
        ClientConfig {
            node: cfg.node,
            secret,
            volume: Some(sb.volume),
            locator: CoordinatorLocator::Lease(lun.clone()),
            request_timeout_ms: cfg.request_timeout_ms,
            local: cfg.local_session.then(|| candidate.local.clone()),
        },
        Arc::new(Handler {
            kernel: invalidator.clone(),
            cache: cache.clone(),
            client: client_slot.clone(),
            announced: announced.clone(),
            takeover_stamp: AtomicU64::new(0),
        }),
    )
    .map_err(MountError::Connect)?;
    let _ = client_slot.set(Arc::downgrade(&client));
    // The first coordinator counted every open of this node itself.
    announced.fetch_max(client.epoch().0, Ordering::SeqCst);
    let meta: Arc<dyn Metadata> = Arc::new(ClientMeta {
        client: client.clone(),
        cache,
        kernel: invalidator.clone(),
    });
    // One round trip before mounting, so a refusing coordinator fails the mount, not the
    // first `ls`.
    meta.call(0, 0, Request::StatFs)
        .map_err(MountError::FirstRequest)?;

    let data = Arc::new(DataPath::new(
        lun.clone(),
        meta.clone(),
        u64::from(g.cluster_bytes),
        cfg.prealloc_bytes,
    ));
    invalidator.set_data(data.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let background = start_background(&candidate, &client, &data, &stop, &span)?;

    let pool = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(cfg.workers)
        .thread_name("csvfs-worker")
        .enable_all()
        .build()
        .map_err(|source| MountError::Start {
            what: "the worker pool",
            source,
        })?;
    let fs = CsvFs::new(
        meta,
        data.clone(),
        pool.handle().clone(),
        cfg.attr_ttl,
        span.clone(),
    );

    let mut options = vec![
        fuser::MountOption::FSName(cfg.lun.clone()),
        fuser::MountOption::Subtype("csvfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
    ];
    let auto_unmount = fusermount_present();
    if auto_unmount {
        options.push(fuser::MountOption::AutoUnmount);
    }
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.mount_options = options;
    fuse_cfg.acl = fuser::SessionACL::All;
    let readers = crate::fuse::fuse_readers();
    fuse_cfg.n_threads = Some(crate::fuse::fuse_threads(readers));
    fuse_cfg.clone_fd = true;
    fuse_cfg.readers = Some(readers);
    let mut session =
        fuser::Session::new(fs, &cfg.mountpoint, &fuse_cfg).map_err(|source| MountError::Fuse {
            mountpoint: cfg.mountpoint.clone(),
            source,
        })?;
    invalidator.set_notifier(session.notifier());
    let mut unmounter = session.unmount_callable();
    let mountpoint = cfg.mountpoint.clone();
    pool.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            warn!("cannot watch SIGTERM/SIGINT; unmount with umount");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: unmounting"),
            _ = int.recv() => info!("SIGINT: unmounting"),
        }
        // A direct unmount rather than fuser's unmounter: with fusermount's auto-unmount
        // the latter only closes the socket and leaves the unmount to fusermount.
        if let Err(e) = crate::local::unmount(&mountpoint) {
            warn!(error = %e, mountpoint = %mountpoint.display(), "unmount failed");
            if let Err(e) = unmounter.unmount() {
                warn!(error = %e, "fuser unmount failed");
            }
        }
    });
    info!(
        mountpoint = %cfg.mountpoint.display(),
        auto_unmount,
        coordinator = candidate.is_hosting(),
        "mounted"
    );
    let result = session.run();
    info!("unmounted");

    stop.store(true, Ordering::SeqCst);
    for t in background {
        let _ = t.join();
    }
    if let Err(e) = data.commit_all() {
        tracing::error!(error = %e, "final commit failed");
    }
    client.close();
    pool.shutdown_timeout(Duration::from_secs(2));
    candidate.local.set(None);
    let hosted = candidate.hosted.lock().take();
    if let Some(h) = hosted {
        h.shutdown();
    }
    result.map_err(|source| MountError::Fuse {
        mountpoint: cfg.mountpoint.clone(),
        source,
    })
}

/// Starts the heartbeat, periodic-commit and role threads.
fn start_background(
    candidate: &Arc<Candidate>,
    client: &Arc<MetadataClient>,
    data: &Arc<DataPath>,
    stop: &Arc<AtomicBool>,
    span: &tracing::Span,
) -> Result<Vec<std::thread::JoinHandle<()>>, MountError> {
    let start = |what: &'static str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(what.into())
            .spawn(f)
            .map_err(|source| MountError::Start { what, source })
    };
    let node = candidate.node;
    let hb = {
        let (lun, client, stop, span) = (
            candidate.lun.clone(),
            client.clone(),
            stop.clone(),
            span.clone(),
        );
        start(
            "csvfs-heartbeat",
            Box::new(move || {
                let _e = span.enter();
                let mut failing = false;
                while !stop.load(Ordering::SeqCst) {
                    match lease::heartbeat(&lun, node, client.epoch(), &NodeState::Direct) {
                        Ok(_) => failing = false,
                        Err(e) if !failing => {
                            warn!(error = %e, "heartbeat failed");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                    sleep_unless(&stop, Duration::from_millis(HEARTBEAT_MS));
                }
            }),
        )?
    };
    let role = {
        let (candidate, stop, span) = (candidate.clone(), stop.clone(), span.clone());
        start(
            "csvfs-role",
            Box::new(move || {
                let _e = span.enter();
                let mut watcher = LeaseWatcher::new();
                while !stop.load(Ordering::SeqCst) {
                    candidate.step(&mut watcher);
                    sleep_unless(&stop, Duration::from_millis(WATCH_MS));
                }
            }),
        )?
    };
    let committer = {
        let (data, stop, span) = (data.clone(), stop.clone(), span.clone());
        start(
            "csvfs-commit",
            Box::new(move || {
                let _e = span.enter();
                while !stop.load(Ordering::SeqCst) {
                    sleep_unless(&stop, COMMIT_INTERVAL);
                    let _ = data.commit_all();
                }
            }),
        )?
    };
    Ok(vec![hb, role, committer])
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !stop.load(Ordering::SeqCst) && !left.is_zero() {
        let s = step.min(left);
        std::thread::sleep(s);
        left -= s;
    }
}
