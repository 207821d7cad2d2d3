//! `csvfs`: the node daemon's command line (mount, state, serve-lun, demo).
#![forbid(unsafe_code)]

use anyhow::Result;
use clap::Parser;
use csvfs::cli::{Cli, Command};

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Mount(_) | Command::State(_) | Command::ServeLun(_) | Command::Demo(_) => {
            anyhow::bail!("not wired yet")
        }
    }
}
