//! `csvfs`: the node daemon's command line (mount, state, serve-lun, demo). Invoked as
//! `mount.csvfs` (a link to this binary) it is the mount(8) helper.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::Parser;
use csvfs::cli::{Cli, Command, MountHelperCli};
use csvfs::config::MountConfig;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

fn init_tracing() {
    // fuser logs a reply to a request the kernel already dropped (an interrupted call, or
    // one in flight at unmount) as an error; there is nothing to act on, so the default
    // filter hides it.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,fuser::reply=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> Result<()> {
    let invoked_as = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if invoked_as == "mount.csvfs" {
        let cli = MountHelperCli::parse();
        return csvfs::helper::run(&cli).context("mount.csvfs");
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Mount(args) => {
            init_tracing();
            let cfg = MountConfig::resolve(&args).context("mount settings")?;
            csvfs::mount::run(&cfg).context("csvfs mount")
        }
        Command::State(args) => {
            let st = csvfs::state::read_state(&args.lun).context("csvfs state")?;
            csvfs::output::print_state(&st);
            Ok(())
        }
        Command::ServeLun(args) => {
            init_tracing();
            let options = block_client::nbd::ServeOptions {
                export_name: args.export.clone(),
                ..block_client::nbd::ServeOptions::default()
            };
            block_client::nbd::run_serve_lun(&args.file, &args.listen, options)
                .context("csvfs serve-lun")
        }
        Command::Demo(args) => {
            if std::env::var_os("RUST_LOG").is_some() {
                init_tracing();
            }
            csvfs::demo::run(args).context("csvfs demo")
        }
    }
}
