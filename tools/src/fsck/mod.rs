//! The csvfs volume checker behind `fsck.csvfs`, as a library so tests and the benchmark
//! run it in-process.
//!
//! ```text
//!  superblock (primary, else backup) ─► lease (refuse to repair a live volume)
//!    ─► journal: replay complete records into an in-memory overlay of the device
//!    ─► bitmaps ─► inodes ─► per inode: extents / directory blocks / blobs
//!    ─► cross-linked clusters ─► namespace walk from the root (entries, cycles, orphans,
//!       link counts, parents) ─► held list ─► bitmaps against what is really owned
//!    ─► DRC slots and lease records
//!    ─► -n: throw the overlay away      -y/-p: write it back (home blocks, flush, then the
//!                                              emptied journal, flush)
//! ```
//!
//! Every repair is made in the overlay in both modes, so a read-only run reports exactly
//! what a repairing run fixes. Findings carry a [`FindingKind`] for tests and a sentence for
//! people. Exit codes follow e2fsck: see [`exit`].

mod check;
pub mod cli;
mod dirs;
pub mod output;
pub mod overlay;

use std::sync::Arc;

use block_client::{BlockDevice, BlockError};
use metadata_server::format::SuperblockError;

pub use check::check;

/// e2fsck exit-code bits; a run returns their sum.
pub mod exit {
    /// No errors.
    pub const CLEAN: i32 = 0;
    /// Errors were found and corrected.
    pub const CORRECTED: i32 = 1;
    /// Errors were left uncorrected.
    pub const UNCORRECTED: i32 = 4;
    /// Operational error (I/O, unreadable superblocks, live lease).
    pub const OPERATIONAL: i32 = 8;
    /// Usage or syntax error.
    pub const USAGE: i32 = 16;
    /// Cancelled by the user.
    pub const CANCELLED: i32 = 32;
}

/// What fsck may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `-n`: change nothing, answer "no" to every repair.
    ReadOnly,
    /// `-y`: repair everything.
    Repair,
    /// `-p`: repair everything that is safe without asking (here: everything), quietly.
    Preen,
}

impl Mode {
    /// True for the modes that write.
    pub fn repairs(self) -> bool {
        !matches!(self, Mode::ReadOnly)
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct FsckOptions {
    /// Read-only, repair or preen.
    pub mode: Mode,
    /// Check even when the volume is marked clean.
    pub force: bool,
    /// Repair even when the coordinator lease looks live.
    pub ignore_lease: bool,
    /// How long to watch a held lease for renewals, in ms. Default: the lease's own timeout
    /// (at most 30 s).
    pub lease_wait_ms: Option<u64>,
    /// Print progress on stderr.
    pub progress: bool,
}

impl Default for FsckOptions {
    fn default() -> FsckOptions {
        FsckOptions {
            mode: Mode::ReadOnly,
            force: true,
            ignore_lease: false,
            lease_wait_ms: None,
            progress: false,
        }
    }
}

/// Kinds of inconsistency, for callers that act on them (tests, scripts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingKind {
    /// The primary superblock is damaged; the backup was used.
    BadPrimarySuperblock,
    /// The backup superblock is damaged or disagrees with the primary.
    BadBackupSuperblock,
    /// The journal is corrupt (a durable record is damaged).
    JournalCorrupt,
    /// A metadata block or structure fails its checksum or cannot be decoded.
    BadChecksum,
    /// Clusters are marked in use but no file owns them.
    LeakedClusters,
    /// Clusters are owned by a file but marked free.
    OwnedClustersFree,
    /// Clusters are owned by more than one file (or twice by one).
    CrossLinkedClusters,
    /// Metadata blocks marked in use but owned by nothing, or owned but marked free, or
    /// owned twice.
    MetaBlockAccounting,
    /// Inode slots marked in use but free, or in use but marked free.
    InodeAccounting,
    /// An inode's link count differs from the entries that name it.
    WrongLinkCount,
    /// A directory entry names an inode that is not in use.
    EntryToFreeInode,
    /// An in-use inode that no directory names.
    OrphanInode,
    /// A directory entry that makes a cycle (or a second link to a directory).
    DirectoryCycle,
    /// An extent reaches past the end of the data region.
    ExtentBeyondVolume,
    /// Written clusters wholly past the end of a file (they must be unwritten).
    UnwrittenFlag,
    /// A counter in an inode (entries, clusters, metadata blocks, extents) is wrong.
    WrongCounter,
    /// A directory's parent pointer or entry kinds disagree with the tree.
    DirectoryStructure,
    /// The held list (open or unlinked inodes) is inconsistent.
    HeldList,
    /// A lease-area or duplicate-request-cache record is damaged.
    BadRecord,
}

/// One inconsistency, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind.
    pub kind: FindingKind,
    /// A sentence for a person: what is wrong, where (inode numbers and paths).
    pub message: String,
    /// What fsck does (or would do) about it.
    pub action: String,
    /// False when fsck cannot repair it (the action says why).
    pub repairable: bool,
}

/// What a run found and did.
#[derive(Debug, Clone)]
pub struct FsckReport {
    /// Inconsistencies found, in the order found.
    pub findings: Vec<Finding>,
    /// True when repairs were written to the device.
    pub repaired: bool,
    /// Journal records replayed.
    pub journal_records: usize,
    /// The volume was clean and not checked (no `-f`).
    pub skipped_clean: bool,
    /// In-use inodes checked.
    pub inodes: u64,
    /// Directories walked.
    pub directories: u64,
    /// Clusters owned by files.
    pub clusters_used: u64,
    /// Data clusters on the volume.
    pub clusters_total: u64,
    /// Notes that are not errors (journal replayed, lease state).
    pub notes: Vec<String>,
}

impl FsckReport {
    /// The e2fsck-style exit code of this run.
    pub fn exit_code(&self) -> i32 {
        if self.findings.is_empty() {
            if self.repaired {
                // The journal was replayed: the file system was modified.
                return exit::CORRECTED;
            }
            return exit::CLEAN;
        }
        let left = self.findings.iter().any(|f| !f.repairable);
        match (self.repaired, left) {
            (true, false) => exit::CORRECTED,
            (true, true) => exit::CORRECTED | exit::UNCORRECTED,
            (false, _) => exit::UNCORRECTED,
        }
    }

    /// The kinds found, sorted, without duplicates.
    pub fn kinds(&self) -> Vec<FindingKind> {
        let mut k: Vec<FindingKind> = self.findings.iter().map(|f| f.kind).collect();
        k.sort();
        k.dedup();
        k
    }
}

/// Why fsck could not do its job (exit code 8).
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    /// Neither superblock copy is usable (or the device holds no csvfs volume).
    #[error("read superblock")]
    Superblock {
        /// Cause.
        #[source]
        source: SuperblockError,
    },
    /// The coordinator lease is being renewed: a coordinator has the volume open.
    #[error("volume is in use: coordinator node {node} ({addr}) renewed its lease during the check; stop the cluster or pass --ignore-lease")]
    LeaseLive {
        /// Owner node.
        node: u32,
        /// Its address.
        addr: String,
    },
    /// Reading or writing the device failed.
    #[error("{what} at byte {at}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The metadata is damaged beyond what fsck can repair (for example the root
    /// directory); the findings so far are in the report printed before.
    #[error("cannot continue: {what}")]
    Corrupt {
        /// What is damaged.
        what: String,
        /// Byte offset of the damage.
        at: u64,
    },
}

/// Runs fsck on `dev`. See [`check`].
pub fn run(dev: Arc<dyn BlockDevice>, opts: &FsckOptions) -> Result<FsckReport, FsckError> {
    check(dev, opts)
}
