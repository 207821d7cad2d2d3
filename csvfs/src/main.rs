//! csvfs node daemon. Will own the FUSE mount of a shared volume on one node: the
//! metadata client and cache, the direct data path to the LUN, and the metadata server it
//! hosts when elected coordinator. Spec: ../shared/DESIGN.md (csvfs).
#![forbid(unsafe_code)]

fn main() {}
