//! csvfs cluster harness: starts LUN servers, nodes and fault proxies as real processes for
//! the integration and failure-injection tests in `tests/tests/`.
#![forbid(unsafe_code)]

pub mod block_peers;
pub mod cluster;
