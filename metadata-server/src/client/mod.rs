//! The node's client stub for the metadata server: one authenticated TCP connection to the
//! coordinator, shared by every thread of the node, with many requests in flight and
//! replies matched by request id. Protocol: metadata-server/PROTOCOL.md. When the
//! coordinator runs in this very process ([`ClientConfig::local`]), the session is a local
//! one instead (PROTOCOL.md section 8): the same states and rules below, without the socket,
//! the pings or the reader task; replies come on the coordinator's thread that sends them.
//!
//! ```text
//!            connect()  ── locate (fixed address, or the lease on the LUN)
//!                │          ── handshake; wrong secret / refused ─▶ ConnectError at once;
//!                │             unreachable ─▶ retry with back-off ─▶ ConnectError::Unreachable
//!                ▼
//!   ┌──────▶ connected ── call(): register (id, request) as pending, send; reply ─▶ caller
//!   │            │         Invalidate ─▶ handler thread ─▶ InvalidateAck
//!   │            │ socket error, or silent coordinator (pings unanswered)
//!   │            ▼
//!   │       disconnected ── calls wait as pending; a pending call unanswered for
//!   │            │           request_timeout_ms while disconnected fails with
//!   │            │           FsError::Io("coordinator unreachable ...")
//!   │            │ re-locate (re-reads the lease), back-off 50 ms … 1 s
//!   └────────────┘ on success: every pending request is sent again with the SAME id;
//!                  the store's duplicate-request cache makes it run once; a session
//!                  with a higher epoch (a failover) first raises a local
//!                  Invalidation::All, since the new coordinator knows no caches
//! ```
//!
//! A calling thread writes its request frame to the socket itself (a non-blocking write
//! under the connection's lock); only what the socket does not take at once is left for
//! the connection's flusher task, which also sends the pings. Replies are read by one
//! task on the client's runtime, which hands each to its waiting caller.
//!
//! Request ids start at the wall clock in nanoseconds when the client starts and count up
//! by one, so a restarted node never reuses an id it sent before (unless the clock went
//! back by more than the ids it used).

use crate::lease::{self, LeaseError};
use crate::proto::{
    encode_frame, request_kind, Caller, ClientHello, Frame, Invalidation, Request, Response,
    Transcript, MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES, MIN_PROTOCOL_VERSION, NONCE_BYTES,
    PROTOCOL_VERSION,
};
use crate::server::io::{read_frame, write_bytes, FrameLink, WireError, READ_BUFFER_BYTES};
use crate::server::{LocalAck, LocalPeer, LocalRefusal, LocalServer, LocalSession};
use crate::types::{Epoch, FileKind, FsError, NodeId, RequestId, VolumeId};
use block_client::BlockDevice;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::BufReader;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tracing::Instrument;

/// Where the coordinator is.
#[derive(Clone)]
pub enum CoordinatorLocator {
    /// A fixed address (tests, or a cluster with a static coordinator).
    Fixed(SocketAddr),
    /// Read the coordinator's address and epoch from the lease record on the LUN; read it
    /// again before every reconnect.
    Lease(Arc<dyn BlockDevice>),
}

impl fmt::Debug for CoordinatorLocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoordinatorLocator::Fixed(a) => write!(f, "Fixed({a})"),
            CoordinatorLocator::Lease(d) => write!(f, "Lease({d:?})"),
        }
    }
}

/// How a node connects to the coordinator.
#[derive(Clone)]
pub struct ClientConfig {
    /// This node.
    pub node: NodeId,
    /// The cluster secret.
    pub secret: Vec<u8>,
    /// The volume expected, when known; a coordinator serving another volume is refused.
    pub volume: Option<VolumeId>,
    /// Where the coordinator is.
    pub locator: CoordinatorLocator,
    /// How long a call (or `connect`) waits for an unreachable coordinator before it fails,
    /// in milliseconds. A reachable coordinator is waited for as long as it answers pings.
    pub request_timeout_ms: u64,
    /// The coordinator when it runs in this process (the node that hosts it): reached
    /// without a socket while it is the one the locator names. `None`: always TCP.
    pub local: Option<Arc<LocalCoordinator>>,
}

/// Where a node's own process publishes the coordinator it hosts, for its client to reach
/// it without a socket ([`LocalSession`]). Set while hosting, cleared when it stops.
#[derive(Debug, Default)]
pub struct LocalCoordinator {
    server: Mutex<Option<LocalServer>>,
}

impl LocalCoordinator {
    /// Nothing hosted yet.
    pub fn new() -> Arc<LocalCoordinator> {
        Arc::new(LocalCoordinator::default())
    }

    /// The coordinator this process hosts now (`None`: none).
    pub fn set(&self, server: Option<LocalServer>) {
        *self.server.lock() = server;
    }

    /// The hosted coordinator, if it serves at `addr` and runs.
    fn at(&self, addr: SocketAddr) -> Option<LocalServer> {
        self.server
            .lock()
            .as_ref()
            .filter(|s| s.addr() == addr && s.is_running())
            .cloned()
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("node", &self.node)
            .field("secret", &"<redacted>")
            .field("volume", &self.volume)
            .field("locator", &self.locator)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("local", &self.local.is_some())
            .finish()
    }
}

/// Receives the coordinator's invalidations. Called on a client thread, one at a time; the
/// client acknowledges each invalidation to the coordinator after `invalidate` returns.
pub trait InvalidationHandler: Send + Sync {
    /// Drop the cached state `inv` names.
    fn invalidate(&self, inv: &Invalidation);

    /// Sees `inv` first, in the order frames arrive and before any later reply is handed to
    /// its caller; `stamp` counts the invalidations seen so far, this one included (see
    /// [`MetadataClient::call_stamped`]). Called on the connection's reader, or, on a local
    /// session, on the coordinator's thread that sends it (its store executor, or a node
    /// thread whose request was answered in place). Must be short, must not block and must
    /// not take a lock that the node holds while it calls this client. The default does
    /// nothing.
    fn observe(&self, _stamp: u64, _inv: &Invalidation) {}
}

/// Why `connect` failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration cannot work.
    #[error("invalid client configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// The client's runtime or threads could not be started.
    #[error("start the metadata client runtime")]
    Runtime(#[source] std::io::Error),
    /// The coordinator could not be found in the lease on the LUN.
    #[error("find the coordinator in the lease")]
    Locate(#[source] LeaseError),
    /// No coordinator answered within the timeout.
    #[error("coordinator unreachable at {target} within {timeout_ms} ms")]
    Unreachable {
        /// Where it was looked for.
        target: String,
        /// The timeout.
        timeout_ms: u64,
        /// The last failure.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator refused the hello (protocol version, volume or epoch).
    #[error("coordinator at {addr} refused the connection: {reason}")]
    Refused {
        /// The coordinator.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The coordinator refused this node's proof: the node's cluster secret is wrong.
    #[error("coordinator at {addr} refused authentication (wrong cluster secret?): {reason}")]
    AuthRefused {
        /// The coordinator.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The coordinator's proof does not match this node's cluster secret: one of the two
    /// has the wrong secret (or the peer is not a coordinator of this cluster).
    #[error("cluster secret mismatch: the coordinator at {addr} did not prove this node's cluster secret")]
    SecretMismatch {
        /// The peer.
        addr: SocketAddr,
    },
    /// The coordinator's epoch is older than one this node has seen: it is stale.
    #[error("coordinator at {addr} is stale ({epoch}, node has seen {seen})")]
    StaleCoordinator {
        /// The peer.
        addr: SocketAddr,
        /// Its epoch.
        epoch: Epoch,
        /// The highest this node has seen.
        seen: Epoch,
    },
    /// The coordinator broke the protocol during the handshake.
    #[error("protocol error with coordinator at {addr}: {reason}")]
    Protocol {
        /// The peer.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
}

impl ConnectError {
    /// True when retrying the same coordinator later can help (network trouble), false
    /// when it is refused for a reason that will not go away by itself.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectError::Unreachable { .. }
                | ConnectError::Locate(_)
                | ConnectError::Protocol { .. }
                | ConnectError::StaleCoordinator { .. }
        )
    }
}

struct Pending {
    caller: Caller,
    req: Request,
    registered: Instant,
    /// Gets the answer and the invalidation stamp when it was read.
    done: Done,
}

/// A continuation run with a detached call's answer (see
/// [`MetadataClient::call_detached`]).
pub type Then = Box<dyn FnOnce(Result<Response, FsError>) + Send>;

/// Where the answer of a pending call goes.
enum Done {
    /// To the thread waiting in `call_stamped`, with the invalidation stamp.
    Wait(std::sync::mpsc::SyncSender<(Result<Response, FsError>, u64)>),
    /// To a continuation, run on the thread that read the answer.
    Then(Then),
}

/// The failure of a call on a closed client.
fn closed() -> FsError {
    FsError::Io("metadata client is closed".into())
}

impl Done {
    /// Hands over the answer. Never called with the state lock held: a continuation may
    /// take other locks of the node.
    fn finish(self, result: Result<Response, FsError>, stamp: u64) {
        match self {
            Done::Wait(tx) => {
                let _ = tx.try_send((result, stamp));
            }
            Done::Then(f) => f(result.map(Response::into_answer)),
        }
    }
}

/// The current session's way to the coordinator.
#[derive(Clone)]
enum Conn {
    /// A TCP connection.
    Tcp(Arc<FrameLink>),
    /// The coordinator in this process.
    Local(Arc<LocalSession>),
}

struct State {
    pending: BTreeMap<RequestId, Pending>,
    conn: Option<Conn>,
    disconnected_since: Option<Instant>,
    epoch: Epoch,
    volume: Option<VolumeId>,
    addr: SocketAddr,
    instance: u64,
    last_error: String,
    /// Sessions established so far (1 after `connect`).
    sessions: u64,
    /// Protocol version of the current (or last) session.
    version: u32,
}

/// The reading half of an established session.
type Reader = BufReader<OwnedReadHalf>;

/// Where to acknowledge an invalidation: its sequence number and the session's link.
enum Ack {
    /// On a TCP session.
    Tcp(u64, Arc<FrameLink>),
    /// On a local session.
    Local(u64, LocalAck),
}

struct Inner {
    cfg: ClientConfig,
    state: Mutex<State>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// Invalidations for the handler thread, with the sequence number and connection to
    /// acknowledge them on (`None`: raised locally, nothing to acknowledge).
    handler_tx: std::sync::mpsc::Sender<(Invalidation, Option<Ack>)>,
    /// Sees every invalidation on the reader (`InvalidationHandler::observe`).
    observer: Arc<dyn InvalidationHandler>,
    /// Invalidations seen so far (received, or raised locally).
    seen: AtomicU64,
    /// A session is established now.
    up: AtomicBool,
}

impl Inner {
    /// Hands the answer to request `id` to its caller, stamped with the invalidations seen
    /// so far.
    fn answer(&self, id: RequestId, result: Result<Response, FsError>) {
        let p = self.state.lock().pending.remove(&id);
        if let Some(p) = p {
            p.done.finish(result, self.seen.load(Ordering::Acquire));
        }
    }

    /// An invalidation arrived: observed now, handed to the handler thread, which drops
    /// what it names and then acknowledges it with `ack`. False when the handler has
    /// stopped (then nothing would acknowledge invalidations any more).
    fn invalidated(&self, inv: Invalidation, ack: Ack) -> bool {
        self.observe(&inv);
        self.handler_tx.send((inv, Some(ack))).is_ok()
    }

    /// Counts `inv` and shows it to the observer, before anything read after it.
    fn observe(&self, inv: &Invalidation) {
        let stamp = self.seen.fetch_add(1, Ordering::AcqRel) + 1;
        self.observer.observe(stamp, inv);
    }
}

/// A connection to the coordinator's metadata server. Share it (`Arc`) between threads.
pub struct MetadataClient {
    inner: Arc<Inner>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl fmt::Debug for MetadataClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataClient")
            .field("node", &self.inner.cfg.node)
            .field("coordinator", &self.coordinator_addr())
            .field("epoch", &self.epoch())
            .finish()
    }
}

/// The transport of a session that was established.
enum Transport {
    /// A TCP connection, authenticated.
    Tcp {
        rd: OwnedReadHalf,
        wr: OwnedWriteHalf,
    },
    /// A local session, and how it tells that it ended.
    Local(Arc<LocalSession>, Arc<SessionEnd>),
}

/// A handshake that succeeded.
struct Session {
    transport: Transport,
    addr: SocketAddr,
    epoch: Epoch,
    volume: VolumeId,
    version: u32,
    instance: u64,
}

impl MetadataClient {
    /// Connects to the coordinator. Waits up to `cfg.request_timeout_ms` for a reachable
    /// one; a refusal (wrong secret, wrong volume, no common version) fails at once.
    pub fn connect(
        cfg: ClientConfig,
        handler: Arc<dyn InvalidationHandler>,
    ) -> Result<Arc<MetadataClient>, ConnectError> {
        if cfg.node.0 == 0 {
            return Err(ConnectError::InvalidConfig {
                reason: "node id 0 is invalid",
            });
        }
        if cfg.secret.is_empty() {
            return Err(ConnectError::InvalidConfig {
                reason: "the cluster secret is empty",
            });
        }
        if cfg.request_timeout_ms == 0 {
            return Err(ConnectError::InvalidConfig {
                reason: "request_timeout_ms is 0",
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("csvfs-mdc")
            .enable_all()
            .build()
            .map_err(ConnectError::Runtime)?;
        let (handler_tx, handler_rx) = std::sync::mpsc::channel::<(Invalidation, Option<Ack>)>();
        let node = cfg.node;
        let observer = handler.clone();
        std::thread::Builder::new()
            .name("csvfs-mdc-inval".into())
            .spawn(move || {
                let span = tracing::debug_span!("invalidations", %node);
                let _enter = span.enter();
                while let Ok((inv, ack)) = handler_rx.recv() {
                    handler.invalidate(&inv);
                    match ack {
                        Some(Ack::Tcp(seq, link)) => {
                            let _ = link.send_frame(&Frame::InvalidateAck { seq }, MAX_FRAME_BYTES);
                        }
                        Some(Ack::Local(seq, to)) => to.ack(seq),
                        None => {}
                    }
                }
            })
            .map_err(ConnectError::Runtime)?;
        let start_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                pending: BTreeMap::new(),
                conn: None,
                disconnected_since: None,
                epoch: Epoch(0),
                volume: cfg.volume,
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                instance: 0,
                last_error: String::new(),
                sessions: 0,
                version: PROTOCOL_VERSION,
            }),
            next_id: AtomicU64::new(start_ns.max(1)),
            closed: AtomicBool::new(false),
            handler_tx,
            observer,
            seen: AtomicU64::new(0),
            up: AtomicBool::new(false),
            cfg,
        });
        let span = tracing::info_span!("metadata_client", node = %inner.cfg.node);
        let timeout = Duration::from_millis(inner.cfg.request_timeout_ms);
        // Run on the client's runtime and wait here (not `block_on`), so `connect` also
        // works from a thread that is inside another runtime.
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let first_inner = inner.clone();
        let first = async move {
            let inner = first_inner;
            let r = async {
                let deadline = Instant::now() + timeout;
                let mut backoff = Duration::from_millis(50);
                loop {
                    match establish(&inner, false).await {
                        Ok(s) => return Ok(s),
                        Err(e) if e.is_transient() && Instant::now() + backoff < deadline => {
                            tracing::debug!(error = %chain(&e), "coordinator not reachable yet");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                        Err(ConnectError::Unreachable { target, source, .. }) => {
                            return Err(ConnectError::Unreachable {
                                target,
                                timeout_ms: inner.cfg.request_timeout_ms,
                                source,
                            })
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            .await;
            let _ = done_tx.send(r);
        };
        runtime.spawn(first.instrument(span.clone()));
        let session = match done_rx.recv() {
            Ok(r) => r?,
            Err(_) => {
                return Err(ConnectError::Runtime(io_err(
                    "the connect task stopped without an answer".into(),
                )))
            }
        };
        let live = install(&inner, session);
        runtime.spawn(run(inner.clone(), live).instrument(span.clone()));
        runtime.spawn(reaper(inner.clone()).instrument(span));
        Ok(Arc::new(MetadataClient {
            inner,
            runtime: Mutex::new(Some(runtime)),
        }))
    }

    /// Runs `req` at the coordinator as `uid`/`gid` of this node and waits for the answer.
    /// Callable from many threads at once. A lost connection is re-established and the
    /// request re-sent with the same id; if the coordinator stays unreachable for
    /// `request_timeout_ms`, fails with `FsError::Io("coordinator unreachable ...")`.
    /// The attributes a `Response::WithAttrs` carries along are dropped (see
    /// [`call_stamped`](Self::call_stamped)).
    pub fn call(&self, uid: u32, gid: u32, req: Request) -> Result<Response, FsError> {
        self.call_stamped(uid, gid, req)
            .0
            .map(Response::into_answer)
    }

    /// [`call`](Self::call) for a node that caches: returns the answer as sent (a namespace
    /// change may come as `Response::WithAttrs`) and the invalidation stamp when it was
    /// read, that is how many invalidations the reader had seen (and shown to
    /// [`InvalidationHandler::observe`]) before it. Whatever the answer names may be
    /// cached unless an invalidation with a higher stamp names it too.
    pub fn call_stamped(
        &self,
        uid: u32,
        gid: u32,
        req: Request,
    ) -> (Result<Response, FsError>, u64) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(uid, gid, req, Done::Wait(tx));
        rx.recv().unwrap_or_else(|_| {
            // Errors are not cached: their stamp does not matter.
            (Err(closed()), self.inner.seen.load(Ordering::Acquire))
        })
    }

    /// Runs `req` at the coordinator like [`call`](Self::call), without waiting: `then`
    /// gets the answer (or the failure) on the thread that reads it from the coordinator;
    /// on a local session, on the coordinator's thread that answers, which may be this one
    /// before `call_detached` returns. So it must be short, must not block, must not call
    /// this client and must not take a lock that the node holds while it calls this
    /// client. A lost connection is re-established and the request re-sent, as for `call`.
    /// For requests whose caller needs no answer, such as `Release`: no thread waits and
    /// none is woken.
    pub fn call_detached(&self, uid: u32, gid: u32, req: Request, then: Then) {
        self.submit(uid, gid, req, Done::Then(then));
    }

    /// Registers `req` as pending and sends it; `done` gets the answer. A request the
    /// coordinator's protocol version does not carry runs split into older ones
    /// ([`call_split`](Self::call_split)) on this thread; a closed client or a request too
    /// large for a frame fails at once.
    fn submit(&self, uid: u32, gid: u32, req: Request, done: Done) {
        let inner = &self.inner;
        // Errors are not cached: their stamp does not matter.
        let fail = |done: Done, e: FsError| done.finish(Err(e), inner.seen.load(Ordering::Acquire));
        if inner.closed.load(Ordering::Acquire) {
            return fail(done, closed());
        }
        let id = RequestId(inner.next_id.fetch_add(1, Ordering::Relaxed));
        let caller = Caller {
            node: inner.cfg.node,
            request: id,
            uid,
            gid,
        };
        // Encoded before the lock is taken; a request too large for a frame fails here.
        let frame = Frame::Request {
            id,
            caller,
            req: req.clone(),
        };
        let Ok(bytes) = encode_frame(&frame, MAX_FRAME_BYTES) else {
            tracing::warn!(op = request_kind(&req), "request does not fit in a frame");
            return fail(done, FsError::TooBig);
        };
        let link = {
            let mut st = inner.state.lock();
            // Checked again under the lock: `close` drains `pending` under it.
            if inner.closed.load(Ordering::Acquire) {
                drop(st);
                return fail(done, closed());
            }
            if req.since_version() > st.version {
                drop(st);
                // A stamp from before the first of its requests: no later one is missed.
                let stamp = inner.seen.load(Ordering::Acquire);
                return done.finish(self.call_split(uid, gid, req), stamp);
            }
            st.pending.insert(
                id,
                Pending {
                    caller,
                    req,
                    registered: Instant::now(),
                    done,
                },
            );
            st.conn.clone()
        };
        // Sent from this thread, outside the state lock. If the session breaks first, the
        // request stays pending and the next session sends it again with the same id.
        match link {
            Some(Conn::Tcp(link)) => {
                let _ = link.send_bytes(&bytes);
            }
            Some(Conn::Local(session)) => {
                // May answer on this thread (its state lock is not held here).
                if let Frame::Request { caller, req, .. } = frame {
                    let _ = session.request(caller, req);
                }
            }
            None => {}
        }
    }

    /// Runs a request the coordinator's protocol version does not carry as the older
    /// requests it combines (not in one transaction).
    fn call_split(&self, uid: u32, gid: u32, req: Request) -> Result<Response, FsError> {
        match req {
            Request::CreateOpen {
                parent,
                name,
                perm,
                exclusive,
                write,
            } => {
                let create = Request::Create {
                    parent,
                    name,
                    kind: FileKind::File,
                    perm,
                    rdev: 0,
                    exclusive,
                };
                let ino = match self.call(uid, gid, create)? {
                    Response::Attr(a) => a.ino,
                    other => {
                        return Err(FsError::Io(format!(
                            "unexpected answer to create: {other:?}"
                        )))
                    }
                };
                self.call(uid, gid, Request::Open { ino, write })
            }
            other => Err(FsError::Io(format!(
                "the coordinator's protocol version is too old for {}",
                request_kind(&other)
            ))),
        }
    }

    /// True while a session with the coordinator is established: what this node cached
    /// is then kept current by the coordinator's invalidations.
    pub fn is_connected(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// True while the session is a local one: the coordinator runs in this process and is
    /// reached without a socket ([`ClientConfig::local`]).
    pub fn is_local(&self) -> bool {
        matches!(self.inner.state.lock().conn, Some(Conn::Local(_)))
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.inner.cfg.node
    }

    /// The coordinator's epoch (the highest seen).
    pub fn epoch(&self) -> Epoch {
        self.inner.state.lock().epoch
    }

    /// The address of the coordinator this client is (or was last) connected to.
    pub fn coordinator_addr(&self) -> SocketAddr {
        self.inner.state.lock().addr
    }

    /// The volume the coordinator serves.
    pub fn volume(&self) -> Option<VolumeId> {
        self.inner.state.lock().volume
    }

    /// Sessions established with a coordinator so far: 1 after `connect`, one more per
    /// reconnect.
    pub fn sessions(&self) -> u64 {
        self.inner.state.lock().sessions
    }

    /// Closes the connection; pending and later calls fail. Also done on drop.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let (pending, conn) = {
            let mut st = self.inner.state.lock();
            (std::mem::take(&mut st.pending), st.conn.take())
        };
        if let Some(Conn::Local(session)) = conn {
            session.close();
        }
        for (_, p) in pending {
            p.done.finish(Err(closed()), 0);
        }
        if let Some(rt) = self.runtime.lock().take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for MetadataClient {
    fn drop(&mut self) {
        self.close();
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::server::io::error_chain(e)
}

fn io_err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// Finds the coordinator: its address and, from the lease, its epoch.
async fn locate(inner: &Inner) -> Result<(SocketAddr, Option<Epoch>), ConnectError> {
    match &inner.cfg.locator {
        CoordinatorLocator::Fixed(a) => Ok((*a, None)),
        CoordinatorLocator::Lease(dev) => {
            let dev = dev.clone();
            let found = tokio::task::spawn_blocking(move || lease::find_coordinator(&dev))
                .await
                .map_err(|e| ConnectError::Unreachable {
                    target: "lease".into(),
                    timeout_ms: inner.cfg.request_timeout_ms,
                    source: io_err(format!("lease reader failed: {e}")),
                })?
                .map_err(ConnectError::Locate)?;
            Ok((found.addr, Some(found.epoch)))
        }
    }
}

/// One attempt: locate, connect, handshake; or, when the coordinator runs in this process,
/// a local session.
async fn establish(inner: &Arc<Inner>, resumed: bool) -> Result<Session, ConnectError> {
    let (addr, lease_epoch) = locate(inner).await?;
    let timeout_ms = inner.cfg.request_timeout_ms;
    let (seen, volume) = {
        let st = inner.state.lock();
        (st.epoch.max(lease_epoch.unwrap_or(Epoch(0))), st.volume)
    };
    let mut nonce = [0u8; NONCE_BYTES];
    rand::Rng::fill(&mut rand::thread_rng(), &mut nonce[..]);
    let hello = ClientHello {
        version: PROTOCOL_VERSION,
        min_version: MIN_PROTOCOL_VERSION,
        node: inner.cfg.node,
        volume,
        epoch: seen,
        resumed,
        nonce,
    };
    if let Some(server) = inner.cfg.local.as_ref().and_then(|l| l.at(addr)) {
        return establish_local(inner, &server, &hello).await;
    }
    let attempt = Duration::from_millis(timeout_ms.clamp(100, 5000));
    let unreachable = |source: std::io::Error| ConnectError::Unreachable {
        target: addr.to_string(),
        timeout_ms,
        source,
    };
    let stream = match tokio::time::timeout(attempt, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(e)),
        Err(_) => return Err(unreachable(io_err("connect timed out".into()))),
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let hs = async {
        send(&mut wr, &Frame::ClientHello(hello.clone()), addr).await?;
        let sh = match read_frame(&mut rd, MAX_HANDSHAKE_FRAME_BYTES).await {
            Ok(Frame::ServerHello(sh)) => sh,
            Ok(Frame::HelloRefused { reason }) => {
                return Err(ConnectError::Refused { addr, reason })
            }
            Ok(other) => {
                return Err(ConnectError::Protocol {
                    addr,
                    reason: format!("expected server-hello, got {}", other.kind()),
                })
            }
            Err(e) => return Err(wire(addr, &e)),
        };
        if sh.version < MIN_PROTOCOL_VERSION || sh.version > PROTOCOL_VERSION {
            return Err(ConnectError::Protocol {
                addr,
                reason: format!("coordinator chose unsupported version {}", sh.version),
            });
        }
        let t = Transcript::new(&hello, sh.version, sh.volume, sh.epoch, sh.nonce);
        if !t.verify_server(&inner.cfg.secret, &sh.proof) {
            let _ = send(&mut wr, &Frame::ClientAuth { proof: None }, addr).await;
            return Err(ConnectError::SecretMismatch { addr });
        }
        if sh.epoch < seen {
            return Err(ConnectError::StaleCoordinator {
                addr,
                epoch: sh.epoch,
                seen,
            });
        }
        if let Some(v) = volume {
            if v != sh.volume {
                return Err(ConnectError::Refused {
                    addr,
                    reason: format!("serves volume {}, expected {v}", sh.volume),
                });
            }
        }
        let proof = t.client_proof(&inner.cfg.secret);
        send(&mut wr, &Frame::ClientAuth { proof: Some(proof) }, addr).await?;
        match read_frame(&mut rd, MAX_HANDSHAKE_FRAME_BYTES).await {
            Ok(Frame::AuthOk) => {}
            Ok(Frame::AuthRefused { reason }) => {
                return Err(ConnectError::AuthRefused { addr, reason })
            }
            Ok(other) => {
                return Err(ConnectError::Protocol {
                    addr,
                    reason: format!("expected auth-ok, got {}", other.kind()),
                })
            }
            Err(e) => return Err(wire(addr, &e)),
        }
        Ok(sh)
    };
    let sh = match tokio::time::timeout(attempt, hs).await {
        Ok(r) => r?,
        Err(_) => return Err(unreachable(io_err("handshake timed out".into()))),
    };
    Ok(Session {
        transport: Transport::Tcp { rd, wr },
        addr,
        epoch: sh.epoch,
        volume: sh.volume,
        version: sh.version,
        instance: sh.instance,
    })
}

/// A local session with the coordinator this process hosts.
async fn establish_local(
    inner: &Arc<Inner>,
    server: &LocalServer,
    hello: &ClientHello,
) -> Result<Session, ConnectError> {
    let addr = server.addr();
    let end = Arc::new(SessionEnd::default());
    let peer = Arc::new(Peer {
        inner: Arc::downgrade(inner),
        end: end.clone(),
    });
    match server.connect(hello, &inner.cfg.secret, peer).await {
        Ok((session, accepted)) => Ok(Session {
            transport: Transport::Local(session, end),
            addr,
            epoch: accepted.epoch,
            volume: accepted.volume,
            version: accepted.version,
            instance: accepted.instance,
        }),
        Err(LocalRefusal::Gone) => Err(ConnectError::Unreachable {
            target: addr.to_string(),
            timeout_ms: inner.cfg.request_timeout_ms,
            source: io_err(LocalRefusal::Gone.to_string()),
        }),
        Err(LocalRefusal::Refused(reason)) => Err(ConnectError::Refused { addr, reason }),
        Err(LocalRefusal::SecretMismatch) => Err(ConnectError::SecretMismatch { addr }),
    }
}

/// How a local session tells the client that it ended.
#[derive(Default)]
struct SessionEnd {
    reason: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl SessionEnd {
    fn end(&self, reason: &str) {
        self.reason.lock().get_or_insert_with(|| reason.to_string());
        self.notify.notify_one();
    }

    async fn wait(&self) -> String {
        loop {
            if let Some(r) = self.reason.lock().clone() {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

/// The client's end of a local session: what the TCP reader does with a frame, done on the
/// thread that delivers it.
struct Peer {
    inner: std::sync::Weak<Inner>,
    end: Arc<SessionEnd>,
}

impl LocalPeer for Peer {
    fn deliver(&self, frame: Frame, ack: &LocalAck) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        match frame {
            Frame::Reply { id, result } => inner.answer(id, result),
            Frame::Invalidate { seq, inv } => {
                if !inner.invalidated(inv, Ack::Local(seq, ack.clone())) {
                    self.end.end("invalidation handler stopped");
                }
            }
            other => tracing::warn!(kind = other.kind(), "unexpected frame on a local session"),
        }
    }

    fn ended(&self, reason: &str) {
        self.end.end(reason);
    }
}

fn wire(addr: SocketAddr, e: &WireError) -> ConnectError {
    match e {
        WireError::Frame(_) => ConnectError::Protocol {
            addr,
            reason: chain(e),
        },
        _ => ConnectError::Unreachable {
            target: addr.to_string(),
            timeout_ms: 0,
            source: io_err(chain(e)),
        },
    }
}

async fn send(wr: &mut OwnedWriteHalf, f: &Frame, addr: SocketAddr) -> Result<(), ConnectError> {
    let bytes = encode_frame(f, MAX_HANDSHAKE_FRAME_BYTES).map_err(|e| ConnectError::Protocol {
        addr,
        reason: chain(&e),
    })?;
    write_bytes(wr, &bytes).await.map_err(|e| wire(addr, &e))
}

/// A session made current, as its serving loop needs it.
enum Live {
    /// The reading half and the link of a TCP session.
    Tcp(Reader, Arc<FrameLink>),
    /// A local session, and how it tells that it ended.
    Local(Arc<SessionEnd>),
}

/// Makes `s` the current session: records what it learned and re-sends every pending
/// request with its id.
fn install(inner: &Inner, s: Session) -> Live {
    let mut st = inner.state.lock();
    if st.instance != 0 && st.instance != s.instance {
        tracing::info!(addr = %s.addr, epoch = %s.epoch, "connected to a new coordinator instance");
    }
    if st.epoch != Epoch(0) && s.epoch > st.epoch {
        // A new coordinator after a failover knows nothing of what this node caches: drop
        // all of it (the handler runs it next, before any later invalidation).
        tracing::info!(old = %st.epoch, new = %s.epoch, "coordinator epoch changed; dropping every cache");
        inner.observe(&Invalidation::All);
        let _ = inner.handler_tx.send((Invalidation::All, None));
    }
    st.epoch = st.epoch.max(s.epoch);
    st.volume = Some(s.volume);
    st.addr = s.addr;
    st.instance = s.instance;
    st.sessions += 1;
    st.disconnected_since = None;
    st.version = s.version;
    // A request sent before a failover to a coordinator of an older protocol version
    // cannot be carried: it fails (it never ran there).
    let too_new: Vec<RequestId> = st
        .pending
        .iter()
        .filter(|(_, p)| p.req.since_version() > s.version)
        .map(|(id, _)| *id)
        .collect();
    let failed: Vec<Pending> = too_new
        .iter()
        .filter_map(|id| st.pending.remove(id))
        .collect();
    let resent = st.pending.len();
    let (live, local) = match s.transport {
        Transport::Tcp { rd, wr } => {
            let link = Arc::new(FrameLink::new(wr));
            for (id, p) in &st.pending {
                let f = Frame::Request {
                    id: *id,
                    caller: p.caller,
                    req: p.req.clone(),
                };
                // A request that fits no frame was failed when it was first sent; a broken
                // link ends this session, and the next one sends everything pending again.
                if let Ok(bytes) = encode_frame(&f, MAX_FRAME_BYTES) {
                    let _ = link.send_bytes(&bytes);
                }
            }
            st.conn = Some(Conn::Tcp(link.clone()));
            // Buffered from here on (the handshake read exactly its frames): one read
            // syscall takes every reply that has arrived, not two per frame.
            let rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
            (Live::Tcp(rd, link), None)
        }
        Transport::Local(session, end) => {
            // Sent below, outside the state lock (an answer may come on this thread);
            // requests submitted from now on are sent by their callers.
            let again: Vec<(Caller, Request)> = st
                .pending
                .values()
                .map(|p| (p.caller, p.req.clone()))
                .collect();
            st.conn = Some(Conn::Local(session.clone()));
            (Live::Local(end), Some((session, again)))
        }
    };
    inner.up.store(true, Ordering::Release);
    drop(st);
    if let Some((session, again)) = local {
        if inner.closed.load(Ordering::Acquire) {
            // Closed while this session was being opened: `close` did not see it.
            inner.state.lock().conn = None;
            session.close();
        } else {
            for (caller, req) in again {
                let _ = session.request(caller, req);
            }
        }
    }
    for p in failed {
        let e = FsError::Io(format!(
            "the coordinator's protocol version {} is too old for {}",
            s.version,
            request_kind(&p.req)
        ));
        p.done.finish(Err(e), 0);
    }
    let is_local = matches!(live, Live::Local(_));
    tracing::info!(addr = %s.addr, epoch = %s.epoch, version = s.version, resent, local = is_local, "connected to coordinator");
    live
}

/// Serves sessions forever: the current one, then reconnects.
async fn run(inner: Arc<Inner>, first: Live) {
    let mut live = first;
    loop {
        let reason = match live {
            Live::Tcp(rd, link) => serve(&inner, rd, &link).await,
            Live::Local(end) => end.wait().await,
        };
        let gone = {
            let mut st = inner.state.lock();
            inner.up.store(false, Ordering::Release);
            st.disconnected_since = Some(Instant::now());
            st.last_error = reason.clone();
            st.conn.take()
        };
        if let Some(Conn::Local(session)) = gone {
            session.close();
        }
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        tracing::warn!("lost the coordinator connection: {reason}; reconnecting");
        let mut backoff = Duration::from_millis(50);
        let session = loop {
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            match establish(&inner, true).await {
                Ok(s) => break s,
                Err(e) => {
                    let msg = chain(&e);
                    if e.is_transient() {
                        tracing::debug!(error = %msg, "reconnect failed");
                    } else {
                        tracing::error!(error = %msg, "coordinator refused this node");
                    }
                    inner.state.lock().last_error = msg;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        live = install(&inner, session);
    }
}

/// One established session until it breaks; returns why.
async fn serve(inner: &Arc<Inner>, mut rd: Reader, link: &Arc<FrameLink>) -> String {
    let timeout_ms = inner.cfg.request_timeout_ms;
    let ping = Duration::from_millis((timeout_ms / 4).clamp(100, 1000));
    let dead_after = Duration::from_millis(timeout_ms.clamp(1000, 5000)).max(ping * 3);
    let flusher = link.clone();
    let mut writer = tokio::spawn(
        async move { flusher.flush(Some((ping, MAX_FRAME_BYTES))).await }.in_current_span(),
    );
    let reason = loop {
        let read = tokio::select! {
            r = tokio::time::timeout(dead_after, read_frame(&mut rd, MAX_FRAME_BYTES)) => r,
            w = &mut writer => {
                break match w {
                    Ok(why) => why,
                    Err(e) => format!("writer task failed: {e}"),
                };
            }
        };
        let frame = match read {
            Err(_) => break format!("coordinator silent for {} ms", dead_after.as_millis()),
            Ok(Err(WireError::Closed)) => break "coordinator closed the connection".into(),
            Ok(Err(e)) => break chain(&e),
            Ok(Ok(f)) => f,
        };
        match frame {
            Frame::Reply { id, result } => inner.answer(id, result),
            Frame::Invalidate { seq, inv } => {
                if !inner.invalidated(inv, Ack::Tcp(seq, link.clone())) {
                    break "invalidation handler stopped".into();
                }
            }
            Frame::Ping { nonce } => {
                let _ = link.send_frame(&Frame::Pong { nonce }, MAX_FRAME_BYTES);
            }
            Frame::Pong { .. } => {}
            other => break format!("protocol violation: unexpected {} frame", other.kind()),
        }
    };
    writer.abort();
    // Later sends on this session fail at once; what is pending goes out on the next.
    link.close();
    reason
}

/// Fails calls that have waited too long for an unreachable coordinator.
async fn reaper(inner: Arc<Inner>) {
    let timeout = Duration::from_millis(inner.cfg.request_timeout_ms);
    let mut tick = tokio::time::interval(
        (timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(200)),
    );
    loop {
        tick.tick().await;
        let mut expired = Vec::new();
        let last;
        {
            let mut st = inner.state.lock();
            let Some(since) = st.disconnected_since else {
                continue;
            };
            let now = Instant::now();
            let ids: Vec<RequestId> = st
                .pending
                .iter()
                .filter(|(_, p)| now.duration_since(p.registered.max(since)) >= timeout)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(p) = st.pending.remove(&id) {
                    expired.push(p);
                }
            }
            last = st.last_error.clone();
        }
        if !expired.is_empty() {
            tracing::warn!(
                count = expired.len(),
                "failing calls: coordinator unreachable for {} ms",
                timeout.as_millis()
            );
        }
        for p in expired {
            p.done.finish(
                Err(FsError::Io(format!(
                    "coordinator unreachable for {} ms: {last}",
                    timeout.as_millis()
                ))),
                0,
            );
        }
    }
}
