//! The store executor: one thread runs every request the session readers could not answer
//! in place, in batches.
//!
//! ```text
//!  session readers ──Job──▶ channel ──▶ executor thread
//!                                        take what is queued (up to max_in_flight_per_conn)
//!                                        store.submit_as each (journal records queued),
//!                                          and its invalidations sent to other nodes
//!                                        store.wait_durable(highest Lsn): one group commit
//!                                          (the other nodes drop their copies meanwhile)
//!                                        replies queued per connection
//!                                        one socket write per connection
//!                                        (replies that wait for other nodes' acks: a task)
//! ```
//!
//! Requests of all connections share the store lock anyway, so one thread loses no
//! parallelism; it saves a thread hand-off, a journal wait and a socket write per request.

use super::coherence::FrameSink;
use super::{Shared, WITH_ATTRS_VERSION};
use crate::proto::{Caller, Frame, Request, Response};
use crate::types::{FsError, Lsn, NodeId, RequestId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

/// How long [`Executor::stop`] waits for the batch that runs.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One request for the executor.
pub(super) struct Job {
    pub(super) shared: Arc<Shared>,
    pub(super) to: ReplyTo,
    pub(super) id: RequestId,
    pub(super) caller: Caller,
    pub(super) req: Request,
    /// The connection's queue slot, free once the request ran (none for a local session,
    /// whose callers are the node's own threads).
    pub(super) slot: Option<OwnedSemaphorePermit>,
    pub(super) span: tracing::Span,
}

/// The executor's queue and thread.
pub(crate) struct Executor {
    tx: parking_lot::Mutex<Option<mpsc::Sender<Job>>>,
    /// The thread, and a channel that disconnects when it ends.
    thread: parking_lot::Mutex<Option<(std::thread::JoinHandle<()>, mpsc::Receiver<()>)>>,
    /// Set by [`Executor::stop`]: queued requests are dropped, not run.
    stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

impl Executor {
    /// Starts the executor thread, running up to `max_batch` requests between two journal
    /// waits; acks are awaited on `runtime`.
    pub(crate) fn start(
        runtime: tokio::runtime::Handle,
        max_batch: u32,
    ) -> std::io::Result<Executor> {
        let (tx, rx) = mpsc::channel::<Job>();
        let max_batch = usize::try_from(max_batch.max(1)).unwrap_or(256);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("csvfs-mds-store".into())
            .spawn(move || {
                run(&rx, &runtime, max_batch, &stop);
                drop(done_tx);
            })?;
        Ok(Executor {
            tx: parking_lot::Mutex::new(Some(tx)),
            thread: parking_lot::Mutex::new(Some((thread, done_rx))),
            stopping,
        })
    }

    /// Queues `job`; false if the executor is stopped (the server is shutting down).
    pub(super) fn submit(&self, job: Job) -> bool {
        self.tx
            .lock()
            .as_ref()
            .is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Stops taking requests, lets the batch that runs finish, drops what is queued (the
    /// nodes resend it to the next coordinator) and waits for the thread, at most
    /// [`STOP_WAIT`]: once this returns, the server calls the store no more, unless a
    /// batch is stuck on the device (then the thread is left to end on its own; the store
    /// is fenced or shut down by the caller).
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.tx.lock().take());
        let Some((t, done)) = self.thread.lock().take() else {
            return;
        };
        if t.thread().id() == std::thread::current().id() {
            return;
        }
        match done.recv_timeout(STOP_WAIT) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    wait_ms = STOP_WAIT.as_millis(),
                    "the store executor is still busy; not waiting for it"
                );
            }
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if t.join().is_err() {
                    tracing::error!("the store executor panicked");
                }
            }
        }
    }
}

fn run(
    rx: &mpsc::Receiver<Job>,
    runtime: &tokio::runtime::Handle,
    max_batch: usize,
    stopping: &AtomicBool,
) {
    while let Ok(first) = rx.recv() {
        if stopping.load(Ordering::SeqCst) {
            continue;
        }
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_batch(batch, runtime);
        }));
        if ran.is_err() {
            // The batch's requests get no reply; their nodes resend them after reconnecting.
            tracing::error!("the store executor panicked while answering a batch");
        }
    }
}

/// A request that ran, waiting for the journal.
struct Ran {
    job: Job,
    start: u64,
    result: Result<Response, FsError>,
    /// Invalidations sent for it, whose acks its reply waits for.
    waits: Vec<super::coherence::AckWait>,
}

fn run_batch(batch: Vec<Job>, runtime: &tokio::runtime::Handle) {
    let Some(store) = batch.first().map(|j| j.shared.store.clone()) else {
        return;
    };
    let mut ran = Vec::with_capacity(batch.len());
    let mut upto = Lsn(0);

    for job in batch {
        let _span = job.span.enter();
        if !job.shared.coherence.is_current(job.to.node, job.to.conn) {
            // Its session was replaced or closed while it waited (after a node's new mount
            // released the old mount's opens, it must not run). A reply could not be
            // delivered anyway; a node that reconnected resends it with the same id.
            tracing::debug!("dropping a request of a closed session");
            continue;
        }
        let start = job.shared.coherence.mark(job.to.node, job.to.conn);
        let submitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            job.shared
                .store
                .submit_as(&job.caller, &job.req, job.to.version)
        }));
        let (result, lsn) = match submitted {
            Ok(s) => (s.result, s.lsn),
            Err(_) => {
                tracing::error!("store call panicked");
                (
                    Err(FsError::Io("coordinator store call failed".into())),
                    Lsn(0),
                )
            }
        };
        upto = upto.max(lsn);
        // Other nodes drop what this change makes stale while the journal writes it: the
        // acks and the write overlap instead of adding up. Dropping a cache early is
        // harmless; if the write fails, the change is answered with the error anyway.
        let waits = match &result {
            Ok(resp) => job
                .shared
                .coherence
                .send_invalidations(job.to.node, &job.req, resp),
            Err(_) => Vec::new(),
        };
        drop(_span);
        ran.push(Ran {
            job,
            start,
            result,
            waits,
        });
    }
    // One group commit for the whole batch.
    let durable = if upto > Lsn(0) {
        store.wait_durable(upto)
    } else {
        Ok(())
    };
    let io_failed = matches!(durable, Err(FsError::Io(_)))
        || ran.iter().any(|r| matches!(r.result, Err(FsError::Io(_))));
    if io_failed && ran.first().is_some_and(|r| r.job.shared.stop_if_fenced()) {
        // No longer coordinator: nothing is answered; the nodes send it all again to the
        // next one.
        return;
    }
    let mut sinks: Vec<Arc<dyn FrameSink>> = Vec::new();
    for r in ran {
        let Ran {
            job,
            start,
            result,
            waits,
        } = r;
        let Job {
            shared,
            to,
            id,
            req,
            slot,
            span,
            ..
        } = job;
        drop(slot);
        // A failed journal write fails the whole batch: even a read may have seen what
        // did not become durable.
        let result = match &durable {
            Err(e) => Err(e.clone()),
            Ok(()) => result,
        };
        let _entered = span.enter();
        if waits.is_empty() {
            if let Some(sink) = to.queue(&shared, start, &req, id, result) {
                if !sinks
                    .iter()
                    .any(|s| std::ptr::addr_eq(Arc::as_ptr(s), Arc::as_ptr(&sink)))
                {
                    sinks.push(sink);
                }
            }
            continue;
        }
        drop(_entered);
        runtime.spawn(
            async move {
                shared.coherence.await_acks(waits).await;
                to.send(&shared, start, &req, id, result);
            }
            .instrument(span),
        );
    }
    for s in sinks {
        s.push();
    }
}

/// Where a reply goes: the node's connection and its protocol version.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplyTo {
    pub(super) node: NodeId,
    pub(super) conn: u64,
    /// The session's protocol version.
    pub(super) version: u32,
}

impl ReplyTo {
    /// Queues the reply (with the invalidations it raced, see the coherence module) on the
    /// connection and returns the connection's sink to push; `None` if the session is gone
    /// (the node will retry).
    pub(super) fn queue(
        self,
        shared: &Shared,
        start: u64,
        req: &Request,
        id: RequestId,
        result: Result<Response, FsError>,
    ) -> Option<Arc<dyn FrameSink>> {
        // From version 4 a namespace change carries the new attributes of the directories
        // it changed, so the node's cached copies of them stay current.
        let result = match result {
            Ok(answer) if self.version >= WITH_ATTRS_VERSION => {
                let attrs = shared.store.changed_attrs(req);
                if attrs.is_empty() {
                    Ok(answer)
                } else {
                    Ok(Response::WithAttrs {
                        answer: Box::new(answer),
                        attrs,
                    })
                }
            }
            r => r,
        };
        let reply = Frame::Reply { id, result };
        let sink = shared
            .coherence
            .reply_queued(self.node, self.conn, start, req, reply);
        if sink.is_none() {
            tracing::debug!("session gone before the reply; the node will retry");
        }
        sink
    }

    /// Queues the reply and writes it.
    pub(super) fn send(
        self,
        shared: &Shared,
        start: u64,
        req: &Request,
        id: RequestId,
        result: Result<Response, FsError>,
    ) {
        if let Some(sink) = self.queue(shared, start, req, id, result) {
            sink.push();
        }
    }
}
