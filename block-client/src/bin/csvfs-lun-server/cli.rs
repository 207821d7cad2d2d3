//! Command line of `csvfs-lun-server`.

use std::path::PathBuf;

/// Export a file (or block device) over NBD to many clients at once.
#[derive(Debug, clap::Parser)]
#[command(name = "csvfs-lun-server", version)]
pub struct Args {
    /// The file or block device to export; it must exist and is locked while served.
    pub file: PathBuf,
    /// Where to listen: IP:PORT, unix:PATH or an absolute Unix socket path.
    /// Default: 127.0.0.1:10809.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// Export name clients ask for. Default: "" (the default export).
    #[arg(long, default_value = "")]
    pub export: String,
    /// Open the file with O_DIRECT. Default: off.
    #[arg(long)]
    pub direct: bool,
    /// Export read-only. Default: off.
    #[arg(long)]
    pub read_only: bool,
    /// Worker threads shared by all connections (count). Default: 16.
    #[arg(long, default_value_t = 16)]
    pub workers: u32,
}
