//! csvfs metadata: the on-disk format (`format`, spec in FORMAT.md), the node-to-coordinator
//! protocol (`proto`, spec in PROTOCOL.md), the journaled metadata store that applies
//! namespace and allocation changes, the coordinator lease, and the TCP server hosted by
//! the node that holds the lease, with its client stub. `format` and `proto` do no I/O.
#![forbid(unsafe_code)]
