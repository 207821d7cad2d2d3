//! `block-lun-server`: the embedded LUN server (`block_client::nbd::run_serve_lun`) as a
//! process the block-layer tests can start, kill and restart. Usage:
//! `block-lun-server FILE --listen ADDR`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (file, listen) = match args.as_slice() {
        [file, flag, listen] if flag == "--listen" => (file, listen),
        _ => {
            tracing::error!("usage: block-lun-server FILE --listen ADDR");
            return std::process::ExitCode::from(2);
        }
    };
    let options = block_client::nbd::ServeOptions::default();
    match block_client::nbd::run_serve_lun(std::path::Path::new(file), listen, options) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            tracing::error!("block-lun-server: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
