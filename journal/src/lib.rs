//! Write-ahead log for metadata transactions. Owns the journal region of the shared LUN:
//! appends framed, checksummed records with group commit, moves the tail on checkpoint,
//! and replays the log after a crash or a coordinator failover. It does not interpret
//! record payloads. Main type: [`Journal`] (`format`, `open` → replayed [`Record`]s,
//! `submit`/`wait_durable`/`append`, `checkpoint`); errors [`JournalError`] and
//! [`ReplayError`]. Format: metadata-server/FORMAT.md, section "Journal".
//!
//! Guarantees: a record whose `wait_durable` returned Ok is replayed by every later open
//! until it is checkpointed; replay returns a gap-free run of complete records in Lsn order
//! and never a record written after a torn one; a damaged record that had been durable
//! stops the open with [`ReplayError::Corrupt`]; leftovers of a crashed or fenced writer
//! after the head are never replayed.
#![forbid(unsafe_code)]

mod error;
pub mod format;
mod ids;
mod replay;
mod wal;

pub use error::{JournalError, ReplayError};
pub use ids::{Epoch, Lsn};
pub use replay::Record;
pub use wal::{Journal, ReplaySummary};
