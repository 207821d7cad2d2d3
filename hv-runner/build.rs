#![allow(clippy::print_stdout)] // cargo reads build-script directives from stdout
//! Builds the test guest (fixtures/guest) into a flat binary with gcc and objcopy; the
//! runner embeds it with `include_bytes!` from OUT_DIR.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest = manifest.join("../fixtures/guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    for f in ["start.S", "guest.c", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    let elf = out.join("guest.elf");
    run(
        Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()))
            .args([
                "-ffreestanding",
                "-nostdlib",
                "-fno-pic",
                "-fno-pie",
                "-no-pie",
                "-mno-red-zone",
                "-mgeneral-regs-only",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-O2",
                "-static",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wl,--build-id=none",
                "-Wl,--no-warn-rwx-segments",
            ])
            .arg("-T")
            .arg(guest.join("link.ld"))
            .arg(guest.join("start.S"))
            .arg(guest.join("guest.c"))
            .arg("-o")
            .arg(&elf),
    );
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(out.join("guest.bin")));
}
