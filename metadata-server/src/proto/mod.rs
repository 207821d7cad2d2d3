//! Node-to-coordinator protocol: the messages a node sends to the metadata server and the
//! answers it gets. Spec: metadata-server/PROTOCOL.md. This module does no I/O.

mod messages;

pub use messages::{ByteRange, Caller, Request, Response};
