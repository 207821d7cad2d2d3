//! `fsck.csvfs`: checks and repairs a csvfs volume (file, block device or NBD URI), with
//! e2fsck's options and exit codes: 0 clean, 1 errors corrected, 4 errors left
//! uncorrected, 8 operational error, 16 usage error, 32 cancelled (summed).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use csvfs_tools::fsck::cli::Cli;
use csvfs_tools::fsck::{self, exit, FsckError, FsckOptions, Mode};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return code_of(code);
        }
    };
    let mode = if cli.yes {
        Mode::Repair
    } else if cli.preen {
        Mode::Preen
    } else {
        Mode::ReadOnly
    };
    let opts = FsckOptions {
        mode,
        force: cli.force,
        ignore_lease: cli.ignore_lease,
        lease_wait_ms: cli.lease_wait_ms,
        progress: cli.progress || std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let dev = match block_client::open_device(&cli.target) {
        Ok(d) => d,
        Err(e) => {
            fsck::output::print_error(&cli.target, &e);
            return code_of(exit::OPERATIONAL);
        }
    };
    match fsck::run(dev, &opts) {
        Ok(report) => {
            fsck::output::print_report(&cli.target, &report, mode);
            code_of(report.exit_code())
        }
        Err(e) => {
            fsck::output::print_error(&cli.target, &e);
            let code = match e {
                FsckError::Corrupt { .. } => exit::OPERATIONAL | exit::UNCORRECTED,
                _ => exit::OPERATIONAL,
            };
            code_of(code)
        }
    }
}

fn code_of(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}
