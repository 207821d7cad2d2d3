//! One node connection on the server: handshake, then the request loop.

use super::coherence::FrameSink;
use super::executor::{Job, ReplyTo};
use super::io::{
    error_chain as chain, read_frame, write_bytes, FrameLink, WireError, READ_BUFFER_BYTES,
};
use super::Shared;
use crate::proto::{
    encode_frame, request_kind, Caller, ClientHello, Frame, Request, Response, ServerHello,
    Transcript, MAX_HANDSHAKE_FRAME_BYTES, MIN_PROTOCOL_VERSION, NONCE_BYTES, PROTOCOL_VERSION,
};
use crate::types::{FsError, NodeId};
use crate::MetadataStore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// The first protocol version whose nodes re-announce their opens (`Reopen`) after a
/// takeover.
const REOPEN_VERSION: u32 = 4;
/// How often the orphan reap looks again for re-announcements it waits for.
const REOPEN_POLL: Duration = Duration::from_millis(250);

/// The result of a successful handshake.
struct Established {
    node: NodeId,
    version: u32,
    resumed: bool,
}

/// Serves one connection until it closes. Every way it can end is logged here, once.
/// `handshaking` is held until the handshake ends, successful or not.
pub(super) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    conn: u64,
    shared: Arc<Shared>,
    handshaking: OwnedSemaphorePermit,
) {
    let (mut rd, mut wr) = stream.into_split();
    let timeout = Duration::from_millis(shared.config.handshake_timeout_ms);
    let outcome = tokio::time::timeout(timeout, handshake(&mut rd, &mut wr, &shared)).await;
    drop(handshaking);
    let est = match outcome {
        Ok(Ok(est)) => est,
        Ok(Err(reason)) => {
            tracing::warn!(%peer, "connection refused during handshake: {reason}");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, timeout_ms = shared.config.handshake_timeout_ms, "connection closed: handshake not completed in time");
            return;
        }
    };
    let node = est.node;
    let span = tracing::info_span!("session", %node, version = est.version);
    established(rd, wr, conn, est, shared.clone())
        .instrument(span)
        .await;
    ended(&shared, node, conn);
}

/// Session `conn` of `node` ended: if it was the node's current one, the node is declared
/// gone unless it comes back within the grace period. Call inside the server's runtime.
pub(super) fn ended(shared: &Arc<Shared>, node: NodeId, conn: u64) {
    if shared.coherence.detach(node, conn) {
        schedule_node_gone(node, shared);
    }
}

async fn send_pre_auth(wr: &mut OwnedWriteHalf, frame: &Frame) -> Result<(), String> {
    let bytes = encode_frame(frame, MAX_HANDSHAKE_FRAME_BYTES)
        .map_err(|e| format!("encode {}: {e}", frame.kind()))?;
    write_bytes(wr, &bytes)
        .await
        .map_err(|e| format!("send {}: {}", frame.kind(), chain(&e)))
}

async fn refuse_hello(wr: &mut OwnedWriteHalf, reason: String) -> String {
    let _ = send_pre_auth(
        wr,
        &Frame::HelloRefused {
            reason: reason.clone(),
        },
    )
    .await;
    let _ = wr.shutdown().await;
    reason
}

/// The checks of a node's hello that need no secret: a valid node id, a common protocol
/// version (returned), the volume the node expects and an epoch it has not outgrown.
pub(super) fn check_hello(shared: &Shared, hello: &ClientHello) -> Result<u32, String> {
    let cfg = &shared.config;
    let node = hello.node;
    if node.0 == 0 {
        return Err("node id 0 is invalid".into());
    }
    let lowest = hello.min_version.max(MIN_PROTOCOL_VERSION);
    let version = hello.version.min(PROTOCOL_VERSION);
    if version < lowest {
        return Err(format!(
            "{node}: no common protocol version (node speaks {}..={}, coordinator {}..={})",
            hello.min_version, hello.version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
        ));
    }
    if let Some(v) = hello.volume {
        if v != cfg.volume {
            return Err(format!(
                "{node}: wrong volume (node expects {v}, coordinator serves {})",
                cfg.volume
            ));
        }
    }
    if hello.epoch > cfg.epoch {
        return Err(format!(
            "{node}: stale coordinator (node has seen {}, this coordinator has {})",
            hello.epoch, cfg.epoch
        ));
    }
    Ok(version)
}

/// Runs the handshake; on failure returns the reason to log.
async fn handshake(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    shared: &Shared,
) -> Result<Established, String> {
    let cfg = &shared.config;
    let hello: ClientHello = match read_frame(rd, MAX_HANDSHAKE_FRAME_BYTES).await {
        Ok(Frame::ClientHello(h)) => h,
        Ok(other) => {
            return Err(format!(
                "unauthenticated frame: expected client-hello, got {}",
                other.kind()
            ))
        }
        Err(e) => return Err(format!("reading client-hello: {}", chain(&e))),
    };
    let node = hello.node;
    let version = match check_hello(shared, &hello) {
        Ok(v) => v,
        Err(reason) => return Err(refuse_hello(wr, reason).await),
    };
    let mut server_nonce = [0u8; NONCE_BYTES];
    rand::Rng::fill(&mut rand::thread_rng(), &mut server_nonce[..]);
    let transcript = Transcript::new(&hello, version, cfg.volume, cfg.epoch, server_nonce);
    send_pre_auth(
        wr,
        &Frame::ServerHello(ServerHello {
            version,
            volume: cfg.volume,
            epoch: cfg.epoch,
            instance: shared.instance,
            nonce: server_nonce,
            proof: transcript.server_proof(&cfg.secret),
        }),
    )
    .await?;
    match read_frame(rd, MAX_HANDSHAKE_FRAME_BYTES).await {
        Ok(Frame::ClientAuth { proof: Some(proof) }) => {
            if !transcript.verify_client(&cfg.secret, &proof) {
                let reason = format!(
                    "{node}: authentication failed: the node does not know the cluster secret"
                );
                let _ = send_pre_auth(
                    wr,
                    &Frame::AuthRefused {
                        reason: "authentication failed: wrong cluster secret".into(),
                    },
                )
                .await;
                let _ = wr.shutdown().await;
                return Err(reason);
            }
        }
        Ok(Frame::ClientAuth { proof: None }) => {
            return Err(format!(
                "{node} refused the coordinator's proof: the cluster secrets differ"
            ))
        }
        Ok(other) => {
            return Err(format!(
                "{node}: unauthenticated frame: expected client-auth, got {}",
                other.kind()
            ))
        }
        Err(e) => return Err(format!("{node}: reading client-auth: {}", chain(&e))),
    }
    send_pre_auth(wr, &Frame::AuthOk).await?;
    Ok(Established {
        node,
        version,
        resumed: hello.resumed,
    })
}

/// The request loop of an authenticated session.
async fn established(
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    conn: u64,
    est: Established,
    shared: Arc<Shared>,
) {
    let node = est.node;
    let version = est.version;
    let max = shared.config.max_frame_bytes;
    // Buffered from here on (the handshake read exactly its frames): one read syscall
    // takes every request frame that has arrived, not two per frame.
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    if !est.resumed {
        // A fresh mount: whatever a previous incarnation of this node held open is gone.
        // Done before its first request is read, so its new opens are never dropped.
        release_previous_mount(node, &shared).await;
    }
    let link = Arc::new(FrameLink::new(wr));
    // However this session ends (also when the runtime drops it at shutdown), nothing is
    // sent on it afterwards, not even a reply that a store thread finishes later.
    let _closing = CloseOnDrop(link.clone());
    let out = Arc::new(SessionOut {
        link: link.clone(),
        max,
    });
    let kick = Arc::new(Notify::new());
    if !begin(
        &shared,
        node,
        conn,
        version,
        est.resumed,
        out.clone(),
        kick.clone(),
    ) {
        return;
    }
    let flusher = link.clone();
    let writer = tokio::spawn(
        async move {
            let why = flusher.flush(None).await;
            tracing::debug!("writing to the node stopped: {why}");
        }
        .in_current_span(),
    );
    // Requests read but not yet running. The reader only stops reading (and answering
    // pings and acks) past this bound, so a busy store does not look like a dead link.
    let queued = Arc::new(Semaphore::new(MAX_QUEUED_PER_CONN));
    let idle = Duration::from_millis(shared.config.idle_timeout_ms);
    let mut shutdown = shared.shutdown.clone();
    let (reason, unexpected): (String, bool) = loop {
        let frame = tokio::select! {
            _ = shutdown.changed() => break ("server shutting down".into(), false),
            _ = kick.notified() => {
                break ("replaced by a newer session of the same node".into(), false)
            }
            r = tokio::time::timeout(idle, read_frame(&mut rd, max)) => r,
        };
        let frame = match frame {
            Err(_) => break (format!("no frame for {} ms", idle.as_millis()), true),
            Ok(Err(WireError::Closed)) => break ("node closed the connection".into(), false),
            Ok(Err(e)) => break (chain(&e), true),
            Ok(Ok(f)) => f,
        };
        match frame {
            Frame::Request { id, caller, req } => {
                if caller.node != node || caller.request != id {
                    break (
                        format!(
                            "protocol violation: request {id} claims {} / {}",
                            caller.node, caller.request
                        ),
                        true,
                    );
                }
                // A request the store can answer from memory without waiting (reads, and
                // open counts) is answered here: no task and no blocking-thread hand-off.
                if let Some((start, result)) = try_now(&shared, node, conn, version, &caller, &req)
                {
                    if shared.refuses(&result) {
                        // Not answered: the node sends it again to the next coordinator.
                        continue;
                    }
                    ReplyTo {
                        node,
                        conn,
                        version,
                    }
                    .send(&shared, start, &req, id, result);
                    continue;
                }
                let Ok(slot) = queued.clone().acquire_owned().await else {
                    break ("request queue closed".into(), true);
                };
                let span = tracing::debug_span!("request", %id, op = request_kind(&req));
                let job = Job {
                    shared: shared.clone(),
                    to: ReplyTo {
                        node,
                        conn,
                        version,
                    },
                    id,
                    caller,
                    req,
                    slot: Some(slot),
                    span,
                };
                if !shared.executor.submit(job) {
                    break ("server shutting down".into(), false);
                }
            }
            Frame::InvalidateAck { seq } => shared.coherence.ack(node, conn, seq),
            Frame::Ping { nonce } => {
                if out.queue(Frame::Pong { nonce }) {
                    out.push();
                }
            }
            Frame::Pong { .. } => {}
            other => {
                break (
                    format!("protocol violation: unexpected {} frame", other.kind()),
                    true,
                )
            }
        }
    };
    if unexpected {
        tracing::warn!("node connection closed: {reason}");
    } else {
        tracing::info!("node connection closed: {reason}");
    }
    writer.abort();
}

/// Registers an established session of `node` with coherence (a newer session of the node
/// that holds it already wins: false then, and the caller closes), sends it the
/// invalidations it missed, and counts it. TCP and local sessions alike.
pub(super) fn begin(
    shared: &Shared,
    node: NodeId,
    conn: u64,
    version: u32,
    resumed: bool,
    out: Arc<dyn FrameSink>,
    kick: Arc<Notify>,
) -> bool {
    // Register before anything is sent so missed invalidations go out first.
    let Some(first) = shared
        .coherence
        .attach(node, conn, version, resumed, out.clone(), kick)
    else {
        tracing::info!("node connection closed: overtaken by a newer session of the same node");
        return false;
    };
    for f in first {
        let _ = out.queue(f);
    }
    out.push();
    *shared.generations.lock().entry(node).or_insert(0) += 1;
    {
        // A resumed node re-announces its opens after a takeover; a fresh mount holds
        // nothing from before (its previous mount's opens were released above).
        let mut resumed_nodes = shared.resumed.lock();
        if resumed && version >= REOPEN_VERSION {
            resumed_nodes.insert(node);
        } else {
            resumed_nodes.remove(&node);
        }
    }
    tracing::info!(resumed, "node connected");
    true
}

/// Closes a link when dropped.
struct CloseOnDrop(Arc<FrameLink>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Runs a request in place when the store can answer it without blocking; returns the
/// coherence mark taken before it ran and the answer. Only requests that make nothing stale
/// elsewhere qualify: no invalidation is sent for them.
pub(super) fn try_now(
    shared: &Shared,
    node: NodeId,
    conn: u64,
    version: u32,
    caller: &Caller,
    req: &Request,
) -> Option<(u64, Result<Response, FsError>)> {
    if !req.is_read_only() && !matches!(req, Request::Open { .. } | Request::Release { .. }) {
        return None;
    }
    let start = shared.coherence.mark(node, conn);
    let result = shared.store.try_execute_now(caller, req, version)?;
    Some((start, result))
}

/// Requests of one connection read and waiting to run, at most.
const MAX_QUEUED_PER_CONN: usize = 4096;

/// Frames to one node: encoded and queued on its connection's link (a reply too large for
/// a frame becomes a `TooBig` answer instead), written by whichever thread pushes.
struct SessionOut {
    link: Arc<FrameLink>,
    max: u32,
}

impl FrameSink for SessionOut {
    fn queue(&self, f: Frame) -> bool {
        let bytes = match encode_frame(&f, self.max) {
            Ok(b) => b,
            Err(e) => {
                let Frame::Reply { id, .. } = f else {
                    tracing::warn!(error = %e, "frame does not fit; not sent");
                    return true;
                };
                // A reply too large for a frame: tell the node instead of dropping it.
                tracing::warn!(error = %e, "frame does not fit; sending an error instead");
                let small = Frame::Reply {
                    id,
                    result: Err(FsError::TooBig),
                };
                match encode_frame(&small, self.max) {
                    Ok(b) => b,
                    Err(_) => return true,
                }
            }
        };
        self.link.queue(&bytes).is_ok()
    }

    fn push(&self) {
        self.link.push();
    }
}

/// Runs `f` on the store on tokio's blocking pool (a store call may wait for the device);
/// `Err` when it panicked.
async fn on_store<T: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&dyn MetadataStore) -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let store = shared.store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref())).await
}

/// Tells the store that the previous mount of `node` is gone (its opens are released).
pub(super) async fn release_previous_mount(node: NodeId, shared: &Arc<Shared>) {
    match on_store(shared, move |s| s.node_gone(node)).await {
        Ok(Ok(())) => tracing::debug!("released the opens of the node's previous mount"),
        Ok(Err(e)) => tracing::error!(
            error = %e,
            "store could not release the opens of the node's previous mount"
        ),
        Err(e) => tracing::error!(error = %e, "node_gone panicked"),
    }
}

/// After the node grace period, the store frees unlinked inodes that no node re-announced
/// as open (see `MetadataStore::reap_orphans`). Nodes that reconnected here but whose
/// `Reopen` the store has not counted yet (it may wait behind a backlog) are waited for,
/// up to one more grace period: freeing before it counts would free files still open
/// there. A node declared gone meanwhile is not waited for.
pub(super) fn schedule_orphan_reap(shared: &Arc<Shared>) {
    let grace = Duration::from_millis(shared.config.node_grace_ms);
    let shared = shared.clone();
    tokio::spawn(
        async move {
            tokio::time::sleep(grace).await;
            let waited_since = tokio::time::Instant::now();
            loop {
                let resumed: Vec<NodeId> = shared.resumed.lock().iter().copied().collect();
                let asked = resumed.clone();
                let waiting = match on_store(&shared, move |s| s.awaiting_reopen(&asked)).await {
                    Ok(waiting) => waiting,
                    Err(e) => {
                        // Not knowing is not "nobody": freeing now could free files still
                        // open on a resumed node, so wait out the second grace.
                        tracing::error!(error = %e, "awaiting_reopen panicked; waiting for every resumed node");
                        resumed
                    }
                };
                if waiting.is_empty() {
                    break;
                }
                if waited_since.elapsed() >= grace {
                    tracing::warn!(
                        nodes = ?waiting,
                        "nodes did not re-announce their open files in time; freeing unlinked files nobody else holds"
                    );
                    break;
                }
                tracing::debug!(nodes = ?waiting, "orphan reap waits for re-announcements");
                tokio::time::sleep(REOPEN_POLL).await;
            }
            match on_store(&shared, |s| s.reap_orphans()).await {
                Ok(Ok(n)) => tracing::debug!(freed = n, "orphan grace ended"),
                Ok(Err(e)) => tracing::error!(error = %e, "store could not free orphans"),
                Err(e) => tracing::error!(error = %e, "reap_orphans panicked"),
            }
        }
        .instrument(tracing::info_span!("orphan_reap")),
    );
}

/// After the grace period, a node that did not come back is gone for good. Also used at
/// start for the nodes the store says hold opens (generation 0: never connected here).
pub(super) fn schedule_node_gone(node: NodeId, shared: &Arc<Shared>) {
    let generation = shared.generations.lock().get(&node).copied().unwrap_or(0);
    let grace = Duration::from_millis(shared.config.node_grace_ms);
    let shared = shared.clone();
    tokio::spawn(
        async move {
            tokio::time::sleep(grace).await;
            let now = shared.generations.lock().get(&node).copied().unwrap_or(0);
            if now != generation || shared.coherence.is_connected(node) {
                return;
            }
            tracing::info!(
                grace_ms = grace.as_millis(),
                "node did not come back; releasing its opens"
            );
            shared.resumed.lock().remove(&node);
            match on_store(&shared, move |s| s.node_gone(node)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "store could not release the node's opens")
                }
                Err(e) => tracing::error!(error = %e, "node_gone panicked"),
            }
        }
        .instrument(tracing::info_span!("node_gone", %node)),
    );
}
