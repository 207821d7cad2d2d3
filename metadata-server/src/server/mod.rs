//! The coordinator's metadata server: a tokio TCP server, on its own runtime, that
//! authenticates nodes, runs their requests on the [`MetadataStore`] (on blocking worker
//! threads, many at once), keeps the nodes' caches coherent with invalidations, and tells
//! the store when a node is gone for good. Protocol: metadata-server/PROTOCOL.md.
//!
//! Per connection:
//!
//! ```text
//!  accept ─▶ handshake (limits: 4 KiB frames, handshake timeout)
//!              │ refused / wrong secret / bad frame ─▶ log reason, close
//!              ▼
//!           established ─┬─ reader: Request ─▶ cached read / open count: answer here
//!                        │                   └──▶ executor thread (executor.rs): batch,
//!                        │                        one journal wait, invalidate other
//!                        │                        nodes (acks awaited in a task), Reply
//!                        │   InvalidateAck ─▶ wake the waiting mutation
//!                        │   Ping ─▶ Pong;  silence > idle timeout ─▶ close
//!                        └─ writer: frames from a queue, flushed when the queue is empty
//!           closed ─▶ node not back within the grace period ─▶ store.node_gone(node)
//! ```
//!
//! The node in the coordinator's own process skips the socket: a local session
//! (local.rs) hands its requests straight to the in-place path or the executor and gets
//! replies and invalidations delivered in order, with the same coherence, duplicate-request
//! and node-gone rules.

mod coherence;
mod executor;
pub(crate) mod io;
mod local;
mod session;

pub use local::{LocalAccepted, LocalAck, LocalPeer, LocalRefusal, LocalServer, LocalSession};

/// Version from which replies to namespace changes carry `Response::WithAttrs`.
const WITH_ATTRS_VERSION: u32 = 4;

use crate::types::{Epoch, NodeId, VolumeId};
use crate::MetadataStore;
use coherence::Coherence;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

/// How the metadata server runs.
#[derive(Clone)]
pub struct ServerConfig {
    /// Address to listen on. Default: 127.0.0.1:0 (any free port).
    pub listen: SocketAddr,
    /// The cluster secret; must not be empty. Default: empty (refused by `start`).
    pub secret: Vec<u8>,
    /// The volume served. Default: all zeros.
    pub volume: VolumeId,
    /// This coordinator's epoch (from the lease). Default: `Epoch(1)`.
    pub epoch: Epoch,
    /// Largest frame accepted after authentication, in bytes. Default: 16 MiB.
    pub max_frame_bytes: u32,
    /// Time a peer has to complete the handshake, in milliseconds. Default: 5000.
    pub handshake_timeout_ms: u64,
    /// A session silent for this long is closed (nodes ping every second), in
    /// milliseconds. Default: 10000.
    pub idle_timeout_ms: u64,
    /// How long a mutation waits for other nodes to acknowledge invalidations, in
    /// milliseconds. Default: 2000.
    pub invalidation_timeout_ms: u64,
    /// A node disconnected for this long is declared gone (`store.node_gone`), in
    /// milliseconds. Default: 30000.
    pub node_grace_ms: u64,
    /// Requests the store executor runs between two journal waits (one group commit), at
    /// most; more wait for the next batch. Default: 256.
    pub max_in_flight_per_conn: u32,
    /// Async worker threads. Default: 2.
    pub runtime_threads: u32,
    /// Threads for blocking store calls besides the executor (a departed node's release).
    /// Default: 64.
    pub store_threads: u32,
    /// Nodes that held opens when the store was opened (for example
    /// `Store::nodes_holding_opens` after a failover). Each one that does not connect
    /// within `node_grace_ms` is declared gone. Default: empty.
    pub nodes_with_opens: Vec<NodeId>,
}

impl ServerConfig {
    /// A configuration with the defaults for everything but the four essentials.
    pub fn new(listen: SocketAddr, secret: Vec<u8>, volume: VolumeId, epoch: Epoch) -> Self {
        ServerConfig {
            listen,
            secret,
            volume,
            epoch,
            ..ServerConfig::default()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            secret: Vec::new(),
            volume: VolumeId::default(),
            epoch: Epoch(1),
            max_frame_bytes: crate::proto::MAX_FRAME_BYTES,
            handshake_timeout_ms: 5000,
            idle_timeout_ms: 10_000,
            invalidation_timeout_ms: 2000,
            node_grace_ms: 30_000,
            max_in_flight_per_conn: 256,
            runtime_threads: 2,
            store_threads: 64,
            nodes_with_opens: Vec::new(),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("secret", &"<redacted>")
            .field("volume", &self.volume)
            .field("epoch", &self.epoch)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("invalidation_timeout_ms", &self.invalidation_timeout_ms)
            .field("node_grace_ms", &self.node_grace_ms)
            .field("max_in_flight_per_conn", &self.max_in_flight_per_conn)
            .field("runtime_threads", &self.runtime_threads)
            .field("store_threads", &self.store_threads)
            .field("nodes_with_opens", &self.nodes_with_opens)
            .finish()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration cannot work.
    #[error("invalid server configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// The tokio runtime could not be built.
    #[error("start the server runtime")]
    Runtime(#[source] std::io::Error),
    /// The listening socket could not be bound.
    #[error("listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn MetadataStore>,
    pub(crate) config: ServerConfig,
    pub(crate) coherence: Coherence,
    /// The thread that runs requests the session readers cannot answer in place.
    pub(crate) executor: executor::Executor,
    /// Random id of this server instance.
    pub(crate) instance: u64,
    /// Sessions per node ever established, to tell a reconnect from the grace timer.
    pub(crate) generations: parking_lot::Mutex<HashMap<NodeId, u64>>,
    /// Nodes whose session resumed here with a protocol that re-announces opens (version 4
    /// or later) and that are not known gone or remounted since: the orphan reap waits
    /// for their `Reopen` (see `session::schedule_orphan_reap`).
    pub(crate) resumed: parking_lot::Mutex<std::collections::BTreeSet<NodeId>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Flags the shutdown (the handle, or the server itself once its store is fenced).
    pub(crate) shutdown_tx: watch::Sender<bool>,
    /// The server's runtime (local sessions start their tasks on it).
    pub(crate) runtime: tokio::runtime::Handle,
    /// The next session's connection number (TCP and local sessions share the count).
    pub(crate) next_conn: AtomicU64,
    /// Local sessions, ended when the server stops.
    pub(crate) locals: parking_lot::Mutex<Vec<std::sync::Weak<local::LocalSession>>>,
}

impl Shared {
    /// True when `result` failed because the store is fenced (see
    /// [`MetadataStore::fenced`]): then the server has stopped serving and the request is
    /// not to be answered.
    pub(crate) fn refuses<T>(&self, result: &Result<T, crate::types::FsError>) -> bool {
        matches!(result, Err(crate::types::FsError::Io(_))) && self.stop_if_fenced()
    }

    /// When the store is fenced, stops serving and returns true.
    pub(crate) fn stop_if_fenced(&self) -> bool {
        match self.store.fenced() {
            Some(reason) => {
                self.stop_serving(&reason);
                true
            }
            None => false,
        }
    }

    /// Stops serving (once): no more connections, every session closed. The nodes locate
    /// the coordinator again and resend what is pending.
    fn stop_serving(&self, reason: &str) {
        if self.shutdown_tx.send_replace(true) {
            return;
        }
        tracing::warn!(
            reason,
            "the metadata store is fenced: closing every session so the nodes turn to the new coordinator"
        );
        local::end_all(self, "coordinator fenced");
    }
}

/// The metadata server. Use [`Server::start`].
#[derive(Debug)]
pub struct Server;

/// A running server; stops it on [`ServerHandle::shutdown`] or when dropped.
pub struct ServerHandle {
    local_addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `config.listen` and serves `store` on a runtime of its own.
    pub fn start(
        store: Arc<dyn MetadataStore>,
        config: ServerConfig,
    ) -> Result<ServerHandle, ServerError> {
        if config.secret.is_empty() {
            return Err(ServerError::InvalidConfig {
                reason: "the cluster secret is empty",
            });
        }
        if config.epoch.0 == 0 {
            return Err(ServerError::InvalidConfig {
                reason: "epoch 0 is invalid",
            });
        }
        if config.max_frame_bytes < crate::proto::MAX_HANDSHAKE_FRAME_BYTES {
            return Err(ServerError::InvalidConfig {
                reason: "max_frame_bytes is smaller than a handshake frame",
            });
        }
        let threads = usize::try_from(config.runtime_threads.max(1)).unwrap_or(2);
        let store_threads = usize::try_from(config.store_threads.max(1)).unwrap_or(64);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(store_threads)
            .thread_name("csvfs-mds")
            .enable_all()
            .build()
            .map_err(ServerError::Runtime)?;
        // Bound without `block_on`, so `start` also works from inside another runtime.
        let bind_err = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let std_listener = std::net::TcpListener::bind(config.listen).map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = {
            let _ctx = runtime.enter();
            TcpListener::from_std(std_listener).map_err(bind_err)?
        };
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let executor =
            executor::Executor::start(runtime.handle().clone(), config.max_in_flight_per_conn)
                .map_err(ServerError::Runtime)?;
        let shared = Arc::new(Shared {
            store,
            executor,
            coherence: Coherence::new(Duration::from_millis(config.invalidation_timeout_ms)),
            instance: rand::random(),
            generations: parking_lot::Mutex::new(HashMap::new()),
            resumed: parking_lot::Mutex::new(std::collections::BTreeSet::new()),
            shutdown: shutdown_rx,
            shutdown_tx,
            runtime: runtime.handle().clone(),
            next_conn: AtomicU64::new(1),
            locals: parking_lot::Mutex::new(Vec::new()),
            config,
        });
        let span = tracing::info_span!(
            "metadata_server",
            volume = %shared.config.volume,
            epoch = %shared.config.epoch,
            addr = %local_addr
        );
        tracing::info!(parent: &span, "metadata server listening");
        {
            let _ctx = runtime.enter();
            let _in_span = span.enter();
            for node in &shared.config.nodes_with_opens {
                session::schedule_node_gone(*node, &shared);
            }
            session::schedule_orphan_reap(&shared);
        }
        runtime.spawn(accept_loop(listener, shared.clone()).instrument(span));
        Ok(ServerHandle {
            local_addr,
            runtime: Some(runtime),
            shared,
        })
    }
}

impl ServerHandle {
    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server as a node in this process reaches it without a socket (see
    /// [`LocalSession`]).
    pub fn local(&self) -> LocalServer {
        LocalServer::new(self.local_addr, &self.shared)
    }

    /// Nodes that have an authenticated session right now.
    pub fn connected_nodes(&self) -> Vec<NodeId> {
        self.shared.coherence.connected()
    }

    /// Stops accepting, closes every connection and stops the runtime. Store calls
    /// already running finish on their threads; their answers are not sent.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.shared.shutdown_tx.send(true);
        // Before the executor stops: a batch that still runs has nowhere to answer.
        local::end_all(&self.shared, "server shutting down");
        self.shared.executor.stop();
        if let Some(rt) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Blocking inside an async context would panic; let it wind down alone.
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
            tracing::info!(addr = %self.local_addr, "metadata server stopped");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connections allowed in the handshake phase at once.
const MAX_PENDING_HANDSHAKES: usize = 256;

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    // Connections still in their handshake, at most: unauthenticated peers cannot pile up.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, limit = MAX_PENDING_HANDSHAKES, "connection refused: too many handshakes in progress");
                        continue;
                    };
                    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.set_nodelay(true);
                    let span = tracing::info_span!("conn", conn, %peer);
                    let run = session::run(stream, peer, conn, shared.clone(), permit);
                    tokio::spawn(run.instrument(span));
                }
                Err(e) => {
                    // Out of descriptors and the like: keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
