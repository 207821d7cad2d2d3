//! csvfs administration tools: `mkfs.csvfs`, `fsck.csvfs`, and `csvfs-bench`, which prints
//! measured figures side by side with a baseline from the same run.
#![forbid(unsafe_code)]

pub mod fsck;
pub mod mkfs;
