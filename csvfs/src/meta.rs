//! How the node reaches the metadata service: one blocking call per request, made from
//! many threads at once. The real implementation is the metadata client stub connected to
//! the coordinator; unit tests plug in an in-memory store.

use metadata_server::client::Then;
use metadata_server::proto::{Request, Response};
use metadata_server::types::FsError;

/// A metadata service the node sends its requests to.
pub trait Metadata: Send + Sync {
    /// Runs `req` with the credentials of the calling process and waits for the answer.
    fn call(&self, uid: u32, gid: u32, req: Request) -> Result<Response, FsError>;

    /// [`call`](Self::call) answered by the coordinator itself (never from a cache here),
    /// with the answer's invalidation stamp: how many coordinator invalidations, takeovers
    /// included, the node had seen before the answer arrived (see
    /// `MetadataClient::call_stamped`). This default answers with stamp 0.
    fn call_stamped(&self, uid: u32, gid: u32, req: Request) -> (Result<Response, FsError>, u64) {
        (self.call(uid, gid, req), 0)
    }

    /// Runs `req` without waiting; `then` gets the answer, perhaps on another thread, and
    /// must be short and must not call this service. This default waits and runs `then`
    /// on the calling thread.
    fn call_detached(&self, uid: u32, gid: u32, req: Request, then: Then) {
        then(self.call(uid, gid, req));
    }
}

/// An answer of the wrong kind for its request: a protocol bug on the other side.
pub fn unexpected(what: &str, got: &Response) -> FsError {
    FsError::Io(format!("unexpected answer to {what}: {got:?}"))
}
