#![allow(clippy::tests_outside_test_module)]
//! Our LUN server (a real process) against real clients: nbdinfo, qemu-io, fio's nbd
//! engine, and our own client; plus its errors for a missing or locked file and its clean
//! shutdown.

use std::process::Command;

use block_client::{BlockDevice, NbdClient, NbdClientOptions, WriteFlags};
use csvfs_tests::block_peers::{
    free_tcp_port, lun_server_command, start_lun_server, BlockRng, BlockScratch, PeerAddr,
};

const SIZE: u64 = 64 << 20;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn nbdinfo_sees_export_flags_and_block_sizes() {
    let dir = BlockScratch::new("srv-info");
    let img = dir.sparse_file("lun.img", SIZE);
    let server = start_lun_server(&img, PeerAddr::Unix(dir.join("nbd.sock")));
    let (ok, out) = run(Command::new("nbdinfo").arg("--json").arg(server.uri()));
    assert!(ok, "nbdinfo failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], SIZE);
    for flag in [
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let (ok, out) = run(Command::new("nbdinfo").arg("--list").arg(server.uri()));
    assert!(ok && out.contains("export=\"\""), "nbdinfo --list: {out}");
}

#[test]
fn qemu_io_pattern_round_trip() {
    let dir = BlockScratch::new("srv-qemu");
    let img = dir.sparse_file("lun.img", SIZE);
    let server = start_lun_server(&img, PeerAddr::Tcp(free_tcp_port()));
    let uri = server.uri();
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0xa5 3M 64k",
        "-c",
        "write -z 5M 1M",
        "-c",
        "flush",
        &uri,
    ]));
    assert!(ok && !out.contains("failed"), "qemu-io write: {out}");
    // A second process reads the patterns back.
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0xa5 3M 64k",
        "-c",
        "read -P 0 5M 1M",
        &uri,
    ]));
    assert!(ok && !out.contains("failed"), "qemu-io read: {out}");
    // And -P really checks: a wrong pattern is reported.
    let (_, out) =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5b 0 4k", &uri]));
    assert!(
        out.contains("Pattern verification failed"),
        "qemu-io wrong pattern: {out}"
    );
    drop(server);
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0x5a));
    assert!(bytes[3 << 20..(3 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0xa5));
}

#[test]
fn fio_nbd_engine_writes_and_verifies() {
    let dir = BlockScratch::new("srv-fio");
    let img = dir.sparse_file("lun.img", SIZE);
    let server = start_lun_server(&img, PeerAddr::Unix(dir.join("nbd.sock")));
    let (ok, out) = run(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    assert!(ok, "fio failed: {out}");
    let json = &out[out.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 16 << 20);
    assert_eq!(
        job["read"]["io_bytes"],
        16 << 20,
        "verify phase read everything back"
    );
}

#[test]
fn our_client_against_our_server_process() {
    let dir = BlockScratch::new("srv-own");
    let img = dir.sparse_file("lun.img", SIZE);
    let server = start_lun_server(&img, PeerAddr::Tcp(free_tcp_port()));
    let c = NbdClient::open(&server.uri(), NbdClientOptions::default()).unwrap();
    assert_eq!(c.size_bytes(), SIZE);
    assert!(c.info().can_multi_conn());
    assert_eq!(c.connection_count(), 2);
    let mut rng = BlockRng::new(77);
    let mut data = vec![0u8; 3 << 20];
    rng.fill(&mut data);
    c.write_at(&data, 12345, WriteFlags::FUA).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(&mut back, 12345).unwrap();
    assert!(back == data);
    c.write_zeroes(12345, 4096).unwrap();
    c.trim(8 << 20, 1 << 20).unwrap();
    c.flush().unwrap();
    drop(c);
    let file = std::fs::read(&img).unwrap();
    assert!(file[12345..12345 + 4096].iter().all(|&b| b == 0));
    assert!(file[12345 + 4096..12345 + data.len()] == data[4096..]);
}

#[test]
fn missing_file_fails_clearly() {
    let dir = BlockScratch::new("srv-missing");
    let (ok, out) = run(&mut lun_server_command(
        &dir.join("nope.img"),
        &PeerAddr::Unix(dir.join("s.sock")),
    ));
    assert!(!ok, "server started on a missing file: {out}");
    assert!(out.contains("No such file"), "unclear error: {out}");
}

#[test]
fn locked_file_fails_clearly_and_shutdown_is_clean() {
    let dir = BlockScratch::new("srv-lock");
    let img = dir.sparse_file("lun.img", SIZE);
    let sock = dir.join("a.sock");
    let mut first = start_lun_server(&img, PeerAddr::Unix(sock.clone()));
    let (ok, out) = run(&mut lun_server_command(
        &img,
        &PeerAddr::Unix(dir.join("b.sock")),
    ));
    assert!(!ok, "second server on a locked file started: {out}");
    assert!(out.contains("locked"), "unclear error: {out}");
    // A client is connected while the server is asked to stop.
    let c = NbdClient::open(&first.uri(), NbdClientOptions::default()).unwrap();
    c.write_at(&[7u8; 4096], 0, WriteFlags::default()).unwrap();
    let status = first.terminate();
    assert!(status.success(), "server exit on SIGTERM: {status}");
    assert!(!sock.exists(), "socket left behind");
    assert_eq!(std::fs::read(&img).unwrap()[..4096], [7u8; 4096]);
    // The lock is gone with the process.
    let again = start_lun_server(&img, PeerAddr::Unix(sock));
    drop(again);
}
