//! The one place `csvfs-bench` prints to stdout: result tables and JSON. Progress goes to
//! stderr through [`progress`].
#![allow(clippy::print_stdout)]

/// Prints one line of the result to stdout.
pub fn line(text: &str) {
    println!("{text}");
}

/// Prints a progress note to stderr.
pub fn progress(text: &str) {
    eprintln!("csvfs-bench: {text}");
}

/// Quotes a string as a JSON string literal.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A finite number as JSON (non-finite values become `null`).
pub fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".to_string()
    }
}
