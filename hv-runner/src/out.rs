//! User-facing output on stdout (the one place that prints).

/// Prints one line of command output.
#[allow(clippy::print_stdout)]
pub fn line(s: &str) {
    println!("{s}");
}
