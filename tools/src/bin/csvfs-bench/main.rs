//! `csvfs-bench`: prints measured figures side by side with a baseline measured in the same
//! run on the same machine. One subcommand per benchmark, each in its own module:
//! `lun` (block layer: our NBD client and server against fio and nbdkit).
#![forbid(unsafe_code)]

mod fs;
mod fsck;
mod lun;
mod migrate;
mod output;

use clap::{Parser, Subcommand};

/// csvfs benchmarks: each prints our figures next to a baseline from the same run.
#[derive(Debug, Parser)]
#[command(name = "csvfs-bench", version)]
struct Cli {
    /// The benchmark to run.
    #[command(subcommand)]
    command: Command,
}

/// One benchmark per subcommand.
#[derive(Debug, Subcommand)]
enum Command {
    /// The LUN path: fio's nbd engine and our NBD client against nbdkit's file plugin, and
    /// fio against our NBD server.
    Lun(lun::LunArgs),
    /// The file system: fio through a csvfs mount against fio's nbd engine on the raw LUN,
    /// and metadata rates (create, stat, rename, unlink) from one node and from three.
    Fs(fs::FsArgs),
    /// Live migration: hv-runner against QEMU over loopback (idle, filled, busy guests).
    Migrate(migrate::MigrateArgs),
    /// Volume tools and journal: mkfs of 1 TiB, fsck of 100,000 files, journal commits
    /// over NBD against the LUN's write+flush rate.
    Fsck(fsck::FsckArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Fs(args) => fs::run(&args),
        Command::Lun(args) => lun::run(&args),
        Command::Migrate(args) => migrate::run(&args),
        Command::Fsck(args) => fsck::run(&args),
    }
}
