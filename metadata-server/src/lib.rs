//! csvfs metadata: the on-disk format (`format`, spec in FORMAT.md), the node-to-coordinator
//! protocol ([`proto`], spec in PROTOCOL.md), the journaled metadata store that applies
//! namespace and allocation changes, the coordinator lease, and the TCP server hosted by
//! the node that holds the lease, with its client stub. `format` and `proto` do no I/O.
#![forbid(unsafe_code)]

pub mod client;
pub mod format;
pub mod lease;
pub mod proto;
pub mod server;
pub mod store;
pub mod types;

use proto::{Caller, Request, Response};
use types::{Attr, FsError, Lsn, NodeId};

/// A request that ran, with the journal record its answer depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The answer, valid once `lsn` is durable.
    pub result: Result<Response, FsError>,
    /// The record to wait for; `Lsn(0)` when there is none.
    pub lsn: Lsn,
}

impl Submitted {
    /// An answer that waits for nothing.
    pub fn now(result: Result<Response, FsError>) -> Submitted {
        Submitted {
            result,
            lsn: Lsn(0),
        }
    }
}

/// The coordinator's metadata engine as the server sees it: executes one request on behalf
/// of a caller, durably (journaled) before it returns. A request whose `(node, request)` was
/// already executed returns the recorded answer without running again.
pub trait MetadataStore: Send + Sync {
    /// Executes `req` for `caller`.
    fn execute(&self, caller: &Caller, req: &Request) -> Result<Response, FsError>;

    /// Executes `req` for `caller` on a session of protocol `version` (requests whose
    /// effect depends on the node's version, such as how open counts are kept). The
    /// default ignores the version.
    fn execute_as(
        &self,
        caller: &Caller,
        req: &Request,
        version: u32,
    ) -> Result<Response, FsError> {
        let _ = version;
        self.execute(caller, req)
    }

    /// Runs `req` like [`execute_as`](Self::execute_as) but does not wait for the journal:
    /// the answer counts once [`wait_durable`](Self::wait_durable) of its `lsn` returned,
    /// so one wait serves many requests. The default runs `execute_as` (durable at once).
    fn submit_as(&self, caller: &Caller, req: &Request, version: u32) -> Submitted {
        Submitted::now(self.execute_as(caller, req, version))
    }

    /// Returns once every journal record up to `lsn` is durable. The default has none.
    fn wait_durable(&self, lsn: Lsn) -> Result<(), FsError> {
        let _ = lsn;
        Ok(())
    }

    /// Answers a request at once when that cannot block (see
    /// [`try_execute_read`](Self::try_execute_read)); a store may answer some mutations this
    /// way too, those that change only memory (open counts of nodes of `version` 4 or
    /// later). `None`: use [`execute_as`](Self::execute_as) on a thread that may block. The
    /// default answers read-only requests through `try_execute_read`.
    fn try_execute_now(
        &self,
        caller: &Caller,
        req: &Request,
        version: u32,
    ) -> Option<Result<Response, FsError>> {
        let _ = version;
        if req.is_read_only() {
            self.try_execute_read(caller, req)
        } else {
            None
        }
    }

    /// Answers a read-only request at once when that cannot block: no lock to wait for,
    /// no device read, no journal wait. `None` when it would block or `req` is a mutation
    /// or `Fsync`: the caller then uses [`execute`](Self::execute) on a thread that may
    /// block. The default never answers.
    fn try_execute_read(
        &self,
        _caller: &Caller,
        _req: &Request,
    ) -> Option<Result<Response, FsError>> {
        None
    }

    /// After the namespace change `req` succeeded: the current attributes of the
    /// directories it changed, and for a rename of the directory it moved (what a
    /// [`Response::WithAttrs`] carries). Empty for any other request. Read after the change,
    /// so they may include later changes too; every change after this one is still
    /// invalidated as usual. The default knows none.
    fn changed_attrs(&self, _req: &Request) -> Vec<Attr> {
        Vec::new()
    }

    /// Ends the grace after the store was opened during which unlinked inodes are kept
    /// although no node is known to hold them open (nodes re-announce their opens after a
    /// takeover): frees those nobody holds. Returns how many. The default frees nothing.
    fn reap_orphans(&self) -> Result<u64, FsError> {
        Ok(0)
    }

    /// Of `nodes`, those whose re-announcement (`Reopen`) the store still waits for before
    /// its orphan grace may end: none once the grace is over or when it never began. The
    /// default waits for none.
    fn awaiting_reopen(&self, _nodes: &[NodeId]) -> Vec<NodeId> {
        Vec::new()
    }

    /// Why the store refuses all further work because this node is no longer coordinator
    /// (its lease lapsed, or a newer coordinator fenced it); `None` while it may serve. The
    /// server then stops answering and closes every session, so the nodes find the new
    /// coordinator and send their requests there. The default never refuses.
    fn fenced(&self) -> Option<String> {
        None
    }

    /// A node is gone for good (crashed or cut off past its lease): drop its opens, so that
    /// unlinked inodes it held open are freed.
    fn node_gone(&self, node: NodeId) -> Result<(), FsError>;
}
