//! Command lines of the `csvfs` and `mount.csvfs` binaries.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// csvfs node daemon: mounts a clustered shared volume on this node.
#[derive(Debug, Parser)]
#[command(name = "csvfs", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The `csvfs` verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the volume on this node (runs in the foreground until unmounted, SIGTERM or SIGINT).
    Mount(MountArgs),
    /// Print each node of the volume with its state, the coordinator, the epoch and free space.
    State(StateArgs),
    /// Export a file over NBD (the embedded LUN server for single-machine clusters).
    ServeLun(ServeLunArgs),
    /// Run the local demo cluster: LUN, NBD, mkfs, three nodes, a sparse VM disk, state, fsck.
    Demo(DemoArgs),
}

/// `csvfs mount`.
#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// TOML file with the same settings as the flags (flags override it). Default: none.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The LUN: `nbd://host:port/export`, `nbd+unix:///export?socket=PATH`, or a file or
    /// block-device path. Required (flag or config).
    #[arg(long)]
    pub lun: Option<String>,
    /// This node's id, 1..=max nodes of the volume. Required (flag or config).
    #[arg(long)]
    pub node_id: Option<u32>,
    /// File holding the cluster secret. Required (flag or config).
    #[arg(long)]
    pub secret: Option<PathBuf>,
    /// Address the metadata server listens on when this node becomes coordinator, at
    /// mount or by taking over from a dead one; it is published in the lease. Every node
    /// needs one. Default: 127.0.0.1:0 (a free port, chosen anew at each takeover).
    #[arg(long)]
    pub listen: Option<String>,
    /// How long the kernel caches attributes and names, in milliseconds (coordinator
    /// invalidations end them earlier). Default: 1000.
    #[arg(long)]
    pub attr_ttl_ms: Option<u64>,
    /// Preallocation for sequential writers, in MiB. Default: 64.
    #[arg(long)]
    pub prealloc_mib: Option<u64>,
    /// Worker threads serving FUSE requests. Default: 64.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Timeout of one metadata request, in milliseconds. Default: 30000.
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// As coordinator: how long a node may stay disconnected before its opens are dropped,
    /// and how long after a takeover unlinked files wait for the nodes to re-announce their
    /// opens, in milliseconds. Default: 30000.
    #[arg(long)]
    pub node_grace_ms: Option<u64>,
    /// While this node hosts the coordinator, send its own metadata requests to it inside
    /// the process rather than over a loopback connection. Default: true.
    #[arg(long)]
    pub local_session: Option<bool>,
    /// Where to mount. Required (argument or config).
    pub mountpoint: Option<PathBuf>,
}

/// `csvfs state`.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// The LUN (same forms as `mount --lun`).
    #[arg(long)]
    pub lun: String,
}

/// `csvfs serve-lun`.
#[derive(Debug, Clone, Args)]
pub struct ServeLunArgs {
    /// The file to export.
    pub file: PathBuf,
    /// Address to listen on: `HOST:PORT` for TCP or `unix:PATH` for a Unix socket.
    #[arg(long)]
    pub listen: String,
    /// Export name. Default: "lun".
    #[arg(long, default_value = "lun")]
    pub export: String,
}

/// `csvfs demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Apparent size of the VM disk image, in GiB. Default: 4.
    #[arg(long, default_value_t = 4)]
    pub image_gib: u64,
    /// Bytes of real data written into the image, in MiB. Default: 256.
    #[arg(long, default_value_t = 256)]
    pub data_mib: u64,
    /// Size of the LUN file, in GiB (sparse). Default: 8.
    #[arg(long, default_value_t = 8)]
    pub lun_gib: u64,
    /// Keep the temporary directory (LUN file, logs) instead of removing it. Default: off.
    #[arg(long)]
    pub keep: bool,
}

/// `mount.csvfs SPEC DIR [-o OPTIONS]`: the helper mount(8) runs for `mount -t csvfs`.
/// SPEC is the LUN; OPTIONS carry `node_id=N,secret=PATH` and optionally `config=FILE`,
/// `listen=ADDR` and `log=FILE`; other options are ignored.
#[derive(Debug, Parser)]
#[command(name = "mount.csvfs", version, about)]
pub struct MountHelperCli {
    /// The LUN URI or path.
    pub spec: String,
    /// The mountpoint.
    pub dir: PathBuf,
    /// Comma-separated mount options.
    #[arg(short = 'o')]
    pub options: Option<String>,
    /// Sloppy: ignore unknown options (always the case). Default: off.
    #[arg(short = 's')]
    pub sloppy: bool,
    /// Fake: parse everything but do not mount. Default: off.
    #[arg(short = 'f')]
    pub fake: bool,
    /// Do not write /etc/mtab (never written). Default: off.
    #[arg(short = 'n')]
    pub no_mtab: bool,
    /// Verbose. Default: off.
    #[arg(short = 'v')]
    pub verbose: bool,
    /// Filesystem subtype given by mount(8). Default: none.
    #[arg(short = 't')]
    pub fs_type: Option<String>,
}
