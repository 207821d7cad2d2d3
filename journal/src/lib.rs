//! Write-ahead log for metadata transactions. Owns the journal region of the shared LUN:
//! appends framed, checksummed records (group commit), checkpoints, and replays them after
//! a crash or a coordinator failover. It does not interpret record payloads.
//! Format: metadata-server/FORMAT.md (journal).
#![forbid(unsafe_code)]

mod ids;

pub use ids::{Epoch, Lsn};
