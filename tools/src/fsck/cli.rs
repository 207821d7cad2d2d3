//! The command line of `fsck.csvfs` (built as the `fsck-csvfs` binary): e2fsck's options.

use clap::Parser;

/// Check a csvfs volume and optionally repair it.
#[derive(Debug, Parser)]
#[command(name = "fsck.csvfs", version)]
pub struct Cli {
    /// Open read-only and answer "no" to every repair. Default.
    #[arg(short = 'n', conflicts_with_all = ["yes", "preen"])]
    pub no: bool,
    /// Repair everything without asking.
    #[arg(short = 'y', conflicts_with = "preen")]
    pub yes: bool,
    /// Preen: repair automatically, print only problems.
    #[arg(short = 'p', short_alias = 'a')]
    pub preen: bool,
    /// Check even when the volume is marked clean.
    #[arg(short = 'f')]
    pub force: bool,
    /// Repair even when the coordinator lease looks live (dangerous).
    #[arg(long)]
    pub ignore_lease: bool,
    /// How long to watch a held lease for renewals, in ms. Default: the lease's timeout.
    #[arg(long, value_name = "MS")]
    pub lease_wait_ms: Option<u64>,
    /// Show progress on stderr (unit: items checked). Default: when stderr is a terminal.
    #[arg(short = 'C', long)]
    pub progress: bool,
    /// Accepted for compatibility with `fsck -t`; ignored.
    #[arg(short = 't', hide = true)]
    pub fstype: Option<String>,
    /// The volume: a file, a block device, or an NBD URI (`nbd://host:port/export`, `nbd+unix:///export?socket=PATH`).
    pub target: String,
}
