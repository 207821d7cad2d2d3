//! `mkfs.csvfs` (built as `mkfs-csvfs`): makes a csvfs volume on a file, a block device or
//! an NBD export. See `tools::mkfs` for the checks it does first.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use csvfs_tools::mkfs::{run, MkfsCli, MkfsOutcome};

/// Metadata to write above which a progress bar is shown, in bytes.
const PROGRESS_THRESHOLD_BYTES: u64 = 16 << 20;

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = MkfsCli::parse();
    let bar = indicatif::ProgressBar::hidden();
    let mut shown = false;
    let quiet = cli.quiet;
    let mut progress = |done: u64, total: u64| {
        if quiet || total < PROGRESS_THRESHOLD_BYTES {
            return;
        }
        if !shown {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "writing metadata {bar:40} {bytes}/{total_bytes}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            shown = true;
        }
        bar.set_position(done);
    };
    let start = std::time::Instant::now();
    let result = run(&cli, &mut progress);
    bar.finish_and_clear();
    match result {
        Ok(MkfsOutcome::DryRun(layout)) => {
            if !quiet {
                let g = layout.geometry;
                println!("dry run: nothing written to {}", cli.target);
                println!("device size      {} bytes", layout.device_bytes);
                println!("cluster size     {} bytes", g.cluster_bytes);
                println!(
                    "data clusters    {} ({} bytes)",
                    g.cluster_count,
                    g.data_bytes()
                );
                println!("inodes           {}", g.inode_count - 1);
                println!("metadata blocks  {}", g.meta.len_blocks);
                println!(
                    "journal          {} bytes at byte {}",
                    g.journal.len_bytes(),
                    g.journal.start_bytes()
                );
                println!("max nodes        {}", g.max_nodes);
            }
            ExitCode::SUCCESS
        }
        Ok(MkfsOutcome::Made {
            report,
            secret_written,
        }) => {
            if !quiet {
                let sb = &report.superblock;
                let g = &sb.geometry;
                println!("made csvfs volume {} on {}", sb.volume, cli.target);
                if !sb.label.is_empty() {
                    println!("label            {}", sb.label);
                }
                println!("cluster size     {} bytes", g.cluster_bytes);
                println!(
                    "data clusters    {} ({} bytes)",
                    g.cluster_count,
                    g.data_bytes()
                );
                println!("inodes           {}", g.inode_count - 1);
                println!("journal          {} bytes", g.journal.len_bytes());
                println!("max nodes        {}", g.max_nodes);
                println!(
                    "metadata written {} bytes in {:.2} s",
                    report.written_bytes,
                    start.elapsed().as_secs_f64()
                );
                if let Some(p) = &cli.secret_file {
                    if secret_written {
                        println!("cluster secret   written to {} (mode 0600)", p.display());
                    } else {
                        println!("cluster secret   {} exists; left as it is", p.display());
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = format!("mkfs.csvfs: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(1)
        }
    }
}
