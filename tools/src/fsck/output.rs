//! User-facing output of fsck: findings, the summary and progress. The one place of fsck
//! that prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use super::{FsckReport, Mode};

/// Prints a progress line on stderr.
pub fn progress(what: &str, done: u64, total: u64) {
    let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    eprintln!("fsck.csvfs: {what}: {done}/{total} ({pct}%)");
}

/// Prints the findings and a summary on stdout, the way e2fsck does.
pub fn print_report(target: &str, report: &FsckReport, mode: Mode) {
    for n in &report.notes {
        println!("{target}: {n}");
    }
    if report.skipped_clean {
        println!("{target}: clean (use -f to check anyway)");
        return;
    }
    for f in &report.findings {
        let verb = match mode {
            Mode::ReadOnly => "would fix",
            _ if !f.repairable => "not fixed",
            _ => "fixed",
        };
        println!("{}", f.message);
        println!("    {verb}: {}", f.action);
    }
    println!(
        "{target}: {} inodes, {} directories, {}/{} clusters in use",
        report.inodes, report.directories, report.clusters_used, report.clusters_total
    );
    match (report.findings.is_empty(), report.repaired) {
        (true, false) => println!("{target}: clean"),
        (true, true) => println!("{target}: journal replayed; FILE SYSTEM WAS MODIFIED"),
        (false, true) => println!(
            "{target}: {} problem(s) found; FILE SYSTEM WAS MODIFIED",
            report.findings.len()
        ),
        (false, false) => println!(
            "{target}: {} problem(s) found and left uncorrected (run with -y to repair)",
            report.findings.len()
        ),
    }
}

/// Prints an operational error on stderr.
pub fn print_error(target: &str, err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    eprintln!("fsck.csvfs: {target}: {msg}");
}
