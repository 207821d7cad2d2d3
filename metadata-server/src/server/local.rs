//! Local sessions: the node that hosts the coordinator talks to it inside its own process,
//! without a socket, a frame encoding or a reader task on either side.
//!
//! ```text
//!  node thread ── LocalSession::request ─┬─▶ answered in place (reads, open counts),
//!                                        │   on the calling thread
//!                                        └─▶ store executor (mutations: batch, journal)
//!  replies and invalidations ─▶ LocalSink ─▶ LocalPeer::deliver, in order, on the thread
//!                                            that pushes (the caller, or the executor)
//!  the node's InvalidateAck ──▶ LocalSession::ack
//! ```
//!
//! Everything else is what a TCP session does: the hello is checked the same way (node id,
//! protocol version, volume, epoch) and the cluster secret must be the server's; the session
//! has its own connection number for coherence; requests keep their ids, so the duplicate-
//! request cache works across a failover; a fresh mount drops what the node's previous
//! mount held open; and the session ends when the server stops or a newer session of the
//! node replaces it, after which the node reconnects (locally or over TCP) and re-sends.

use super::coherence::FrameSink;
use super::executor::{Job, ReplyTo};
use super::session;
use super::Shared;
use crate::proto::{request_kind, Caller, ClientHello, Frame, Request};
use crate::types::{Epoch, NodeId, VolumeId};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;
use tracing::Instrument;

/// The node's end of a local session.
pub trait LocalPeer: Send + Sync {
    /// A frame for the node, `Reply` or `Invalidate`, in the order a TCP session would
    /// carry them, one at a time, on whichever thread sends them: a node thread whose
    /// request was answered in place, the store executor, or a server task. Must be short,
    /// must not block, and must not call the session. An invalidation is acknowledged
    /// with `ack`, from another thread once the node has dropped what it names.
    fn deliver(&self, frame: Frame, ack: &LocalAck);

    /// The session ended; the node should connect again. Called once. Frames that were
    /// being delivered at that moment may still arrive; they are valid answers.
    fn ended(&self, reason: &str);
}

/// Acknowledges the invalidations of one local session.
#[derive(Clone)]
pub struct LocalAck {
    shared: Weak<Shared>,
    node: NodeId,
    conn: u64,
}

impl fmt::Debug for LocalAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalAck")
            .field("node", &self.node)
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl LocalAck {
    /// The node dropped what invalidation `seq` named. Ignored once the session ended.
    pub fn ack(&self, seq: u64) {
        if let Some(s) = self.shared.upgrade() {
            s.coherence.ack(self.node, self.conn, seq);
        }
    }
}

/// A coordinator running in this process, as a node may reach it without a socket. Holds
/// the server weakly: a stopped server refuses new sessions.
#[derive(Clone)]
pub struct LocalServer {
    addr: SocketAddr,
    shared: Weak<Shared>,
}

impl fmt::Debug for LocalServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// What a local session agreed on, as a TCP server's hello says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAccepted {
    /// The protocol version of the session.
    pub version: u32,
    /// The volume served.
    pub volume: VolumeId,
    /// The coordinator's epoch.
    pub epoch: Epoch,
    /// The server instance.
    pub instance: u64,
}

/// Why a local session was not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalRefusal {
    /// The server has stopped (or is stopping): find the coordinator again.
    #[error("the coordinator in this process has stopped")]
    Gone,
    /// The hello was refused (node id, protocol version, volume or epoch).
    #[error("{0}")]
    Refused(String),
    /// The node's cluster secret is not the coordinator's.
    #[error("cluster secret mismatch")]
    SecretMismatch,
}

impl LocalServer {
    pub(super) fn new(addr: SocketAddr, shared: &Arc<Shared>) -> LocalServer {
        LocalServer {
            addr,
            shared: Arc::downgrade(shared),
        }
    }

    /// The address the server listens on for other nodes (as the lease names it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// True while the server runs.
    pub fn is_running(&self) -> bool {
        self.shared.upgrade().is_some_and(|s| !*s.shutdown.borrow())
    }

    /// Opens a session for the node of `hello`, which knows `secret`; `peer` gets its
    /// frames. The node of a fresh mount (`hello.resumed` false) first has the opens of its
    /// previous mount released, as over TCP.
    pub async fn connect(
        &self,
        hello: &ClientHello,
        secret: &[u8],
        peer: Arc<dyn LocalPeer>,
    ) -> Result<(Arc<LocalSession>, LocalAccepted), LocalRefusal> {
        let shared = self.shared.upgrade().ok_or(LocalRefusal::Gone)?;
        if *shared.shutdown.borrow() {
            return Err(LocalRefusal::Gone);
        }
        let node = hello.node;
        let version = session::check_hello(&shared, hello).map_err(|reason| {
            tracing::warn!("local session refused: {reason}");
            LocalRefusal::Refused(reason)
        })?;
        if secret != shared.config.secret.as_slice() {
            tracing::warn!(
                "{node}: local session refused: the node does not know the cluster secret"
            );
            return Err(LocalRefusal::SecretMismatch);
        }
        let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("session", %node, version, conn, local = true);
        if !hello.resumed {
            // On the server's runtime, like a TCP session's.
            let (s, sp) = (shared.clone(), span.clone());
            let released = shared.runtime.spawn(
                async move { session::release_previous_mount(node, &s).await }.instrument(sp),
            );
            if released.await.is_err() {
                return Err(LocalRefusal::Gone);
            }
        }
        let sink = Arc::new(LocalSink {
            frames: Mutex::new(VecDeque::new()),
            deliver: Mutex::new(()),
            closed: AtomicBool::new(false),
            peer,
            ack: LocalAck {
                shared: Arc::downgrade(&shared),
                node,
                conn,
            },
        });
        let session = Arc::new(LocalSession {
            shared: shared.clone(),
            node,
            conn,
            version,
            sink: sink.clone(),
            over: AtomicBool::new(false),
            stop: Arc::new(Notify::new()),
            span: span.clone(),
        });
        {
            let mut locals = shared.locals.lock();
            locals.retain(|w| w.strong_count() > 0);
            locals.push(Arc::downgrade(&session));
        }
        // `ServerHandle::stop` flags the shutdown before it ends the registered sessions:
        // either it saw this one, or this sees the flag.
        if *shared.shutdown.borrow() {
            session.end("server shutting down");
            return Err(LocalRefusal::Gone);
        }
        let kick = Arc::new(Notify::new());
        let begun = {
            let _in = span.enter();
            session::begin(
                &shared,
                node,
                conn,
                version,
                hello.resumed,
                sink,
                kick.clone(),
            )
        };
        if !begun {
            session.end("overtaken by a newer session of the same node");
            return Err(LocalRefusal::Gone);
        }
        if session.is_over() {
            // Ended (the server stopped) while it attached: detach what `begin` attached.
            let _rt = shared.runtime.enter();
            session::ended(&shared, node, conn);
            return Err(LocalRefusal::Gone);
        }
        let weak = Arc::downgrade(&session);
        let stop = session.stop.clone();
        let mut shutdown = shared.shutdown.clone();
        shared.runtime.spawn(
            async move {
                let reason = tokio::select! {
                    _ = shutdown.changed() => "server shutting down",
                    _ = kick.notified() => "replaced by a newer session of the same node",
                    _ = stop.notified() => return,
                };
                if let Some(s) = weak.upgrade() {
                    s.end(reason);
                }
            }
            .instrument(span),
        );
        let accepted = LocalAccepted {
            version,
            volume: shared.config.volume,
            epoch: shared.config.epoch,
            instance: shared.instance,
        };
        Ok((session, accepted))
    }
}

/// One node's session with the coordinator in its own process.
pub struct LocalSession {
    shared: Arc<Shared>,
    node: NodeId,
    conn: u64,
    version: u32,
    sink: Arc<LocalSink>,
    over: AtomicBool,
    /// Stops the task that watches for the server's shutdown.
    stop: Arc<Notify>,
    span: tracing::Span,
}

impl fmt::Debug for LocalSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSession")
            .field("node", &self.node)
            .field("conn", &self.conn)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl LocalSession {
    /// Runs the request `caller.request` of the session's node: in place when the store
    /// can answer it from memory (the reply is delivered before this returns), else on the
    /// store executor. False when the session has ended (the request did not run here).
    pub fn request(&self, caller: Caller, req: Request) -> bool {
        if self.is_over() {
            return false;
        }
        if caller.node != self.node {
            let _in = self.span.enter();
            tracing::error!(claimed = %caller.node, "request of another node on a local session");
            drop(_in);
            self.end("protocol violation: request of another node");
            return false;
        }
        let (shared, node, conn, version) = (&self.shared, self.node, self.conn, self.version);
        let to = ReplyTo {
            node,
            conn,
            version,
        };
        let id = caller.request;
        if let Some((start, result)) = session::try_now(shared, node, conn, version, &caller, &req)
        {
            let _in = self.span.enter();
            if shared.refuses(&result) {
                // The server stopped serving (this session ended): the node sends the
                // request again to the next coordinator.
                return false;
            }
            to.send(shared, start, &req, id, result);
            return true;
        }
        let span =
            tracing::debug_span!(parent: &self.span, "request", %id, op = request_kind(&req));
        let job = Job {
            shared: shared.clone(),
            to,
            id,
            caller,
            req,
            slot: None,
            span,
        };
        if !shared.executor.submit(job) {
            self.end("server shutting down");
            return false;
        }
        true
    }

    /// Ends the session from the node's side (the node closes or unmounts).
    pub fn close(&self) {
        self.end("node closed the session");
    }

    /// True once the session has ended.
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    fn end(&self, reason: &str) {
        if self.over.swap(true, Ordering::AcqRel) {
            return;
        }
        self.sink.close();
        self.stop.notify_one();
        {
            let _rt = self.shared.runtime.enter();
            let _in = self.span.enter();
            tracing::info!("node connection closed: {reason}");
            session::ended(&self.shared, self.node, self.conn);
        }
        self.sink.peer.ended(reason);
    }
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        self.end("session dropped");
    }
}

/// Ends every local session of the server (it stops).
pub(super) fn end_all(shared: &Shared, reason: &str) {
    let sessions: Vec<Arc<LocalSession>> = shared
        .locals
        .lock()
        .drain(..)
        .filter_map(|w| w.upgrade())
        .collect();
    for s in sessions {
        s.end(reason);
    }
}

/// Frames to a local node: queued in order, delivered by whichever thread pushes.
struct LocalSink {
    frames: Mutex<VecDeque<Frame>>,
    /// Held while delivering, so frames reach the node in the order they were queued.
    deliver: Mutex<()>,
    closed: AtomicBool,
    peer: Arc<dyn LocalPeer>,
    ack: LocalAck,
}

impl LocalSink {
    /// Takes no more frames. What is queued is still delivered by the push that follows
    /// its queueing: a reply and the invalidations queued right after it stay together.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

impl FrameSink for LocalSink {
    fn queue(&self, f: Frame) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        self.frames.lock().push_back(f);
        true
    }

    fn push(&self) {
        let _order = self.deliver.lock();
        loop {
            let Some(f) = self.frames.lock().pop_front() else {
                return;
            };
            self.peer.deliver(f, &self.ack);
        }
    }
}
