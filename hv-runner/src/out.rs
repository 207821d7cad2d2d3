//! User-facing output on stdout (the one place that prints).

use std::io::Write;

/// Prints one line of command output. A closed stdout (the reader went away) is not an
/// error for the runner: the VM must not die because nobody reads its messages.
pub fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}
