//! Error types: [`JournalError`] for format, append and checkpoint; [`ReplayError`] for
//! opening (replay).

use block_client::BlockError;

use crate::ids::{Epoch, Lsn};

/// Why formatting, appending to or checkpointing the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal region does not fit the device or is too small or misaligned.
    #[error("invalid journal region at byte {start_bytes} ({len_bytes} bytes): {reason}")]
    InvalidRegion {
        /// Region start on the device.
        start_bytes: u64,
        /// Region length.
        len_bytes: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// There is not enough free space: checkpoint, then retry.
    #[error("journal full: {needed_bytes} bytes needed, {free_bytes} free")]
    Full {
        /// Bytes the record needs (including wrap padding).
        needed_bytes: u64,
        /// Bytes free now.
        free_bytes: u64,
    },
    /// The record can never fit, even in an empty journal.
    #[error(
        "record of {len_bytes} bytes exceeds the journal's largest record of {max_bytes} bytes"
    )]
    RecordTooLarge {
        /// Payload length.
        len_bytes: u64,
        /// Largest payload the journal can hold.
        max_bytes: u64,
    },
    /// An earlier write or flush failed; the journal refuses all work until reopened.
    #[error("an earlier journal write or flush failed; reopen and replay the journal")]
    PreviousIoFailed,
    /// Writing records to the log area failed.
    #[error("write journal records from {lsn} at byte {at_bytes}")]
    WriteRecords {
        /// First record of the failed write.
        lsn: Lsn,
        /// Device offset of the write.
        at_bytes: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Flushing the device after a journal write failed.
    #[error("flush journal up to {lsn}")]
    Flush {
        /// Last record of the batch being made durable.
        lsn: Lsn,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Writing a journal header copy (format or checkpoint) failed.
    #[error("write journal header at byte {at_bytes}")]
    WriteHeader {
        /// Device offset of the header copy.
        at_bytes: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// `wait_durable` was asked for a record that was never submitted.
    #[error("{lsn} was never submitted (next is {next})")]
    NotSubmitted {
        /// Requested.
        lsn: Lsn,
        /// Next Lsn to be assigned.
        next: Lsn,
    },
    /// `checkpoint` was asked to release records that are not durable yet.
    #[error("cannot checkpoint up to {upto}: only up to {durable} is durable")]
    CheckpointBeyondDurable {
        /// Requested.
        upto: Lsn,
        /// Durable watermark.
        durable: Lsn,
    },
}

/// Why opening (replaying) the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The journal region does not fit the device or is misaligned.
    #[error("invalid journal region at byte {start_bytes} ({len_bytes} bytes): {reason}")]
    InvalidRegion {
        /// Region start on the device.
        start_bytes: u64,
        /// Region length.
        len_bytes: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Reading the journal failed.
    #[error("read journal at byte {at_bytes}")]
    Read {
        /// Device offset of the read.
        at_bytes: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The journal is damaged in a way a crash cannot explain; the volume must not be
    /// mounted (run fsck).
    #[error("journal corrupt: {what} (at byte {at_bytes})")]
    Corrupt {
        /// What is damaged.
        what: String,
        /// Device offset of the damage.
        at_bytes: u64,
    },
    /// A coordinator with a newer epoch has opened this journal: we are fenced.
    #[error("journal was opened by a coordinator of {journal}, newer than our {ours}")]
    Fenced {
        /// Our epoch.
        ours: Epoch,
        /// Epoch in the journal header.
        journal: Epoch,
    },
    /// Writing the header that starts the new session failed.
    #[error("write journal header at byte {at_bytes}")]
    WriteHeader {
        /// Device offset of the header copy.
        at_bytes: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Flushing the new session's header failed.
    #[error("flush journal header")]
    Flush {
        /// Cause.
        #[source]
        source: BlockError,
    },
}
