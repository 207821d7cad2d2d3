//! `csvfs-lun-server`: exports one file over NBD (the embedded LUN server) until SIGINT or
//! SIGTERM. The same server `csvfs serve-lun` runs; this standalone binary lets tests and
//! single-machine setups start it as a real process.
#![forbid(unsafe_code)]

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let options = block_client::nbd::ServeOptions {
        export_name: args.export,
        direct: args.direct,
        read_only: args.read_only,
        workers: args.workers,
        ..Default::default()
    };
    match block_client::nbd::run_serve_lun(&args.file, &args.listen, options) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("csvfs-lun-server: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            tracing::error!("{msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
