#![allow(clippy::tests_outside_test_module)]
//! Faults on the path to the LUN: device errors from nbdkit's error filter, a hung server,
//! our server killed and restarted under load, and a power cut through the NBD server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_client::nbd::{serve_device, ListenAddr, ServeOptions};
use block_client::testing::{CrashDisk, CrashPoint};
use block_client::{BlockDevice, BlockError, NbdClient, NbdClientOptions, WriteFlags};
use csvfs_tests::block_peers::{
    free_tcp_port, start_lun_server, start_nbdkit, BlockRng, BlockScratch, PeerAddr,
};

#[test]
fn nbdkit_error_filter_gives_typed_device_error_and_client_stays_usable() {
    let dir = BlockScratch::new("fault-err");
    let trigger = dir.join("trigger");
    std::fs::write(&trigger, b"").unwrap();
    let peer = start_nbdkit(
        PeerAddr::Unix(dir.join("nbd.sock")),
        &["error"],
        &[
            "memory",
            "16M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", trigger.display()),
        ],
    );
    let c = NbdClient::open(&peer.uri(), NbdClientOptions::default()).unwrap();
    c.write_at(&[3u8; 8192], 4096, WriteFlags::default())
        .unwrap();
    let mut buf = [0u8; 8192];
    for _ in 0..3 {
        let e = c.read_at(&mut buf, 4096).unwrap_err();
        assert!(
            !e.is_path_lost(),
            "device error reported as path loss: {e:?}"
        );
        assert!(
            matches!(&e, BlockError::Device { source, offset_bytes: 4096, .. } if source.raw_os_error() == Some(libc::EIO)),
            "{e:?}"
        );
    }
    std::fs::remove_file(&trigger).unwrap();
    c.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [3u8; 8192]);
    assert_eq!(
        c.reconnect_count(),
        0,
        "errors must not cost the connection"
    );
}

#[test]
fn hung_server_becomes_path_lost_after_timeouts() {
    let dir = BlockScratch::new("fault-hang");
    let peer = start_nbdkit(
        PeerAddr::Unix(dir.join("nbd.sock")),
        &["delay"],
        &["memory", "16M", "delay-read=30"],
    );
    let opts = NbdClientOptions {
        request_timeout_ms: 300,
        reconnect_timeout_ms: 700,
        ..Default::default()
    };
    let c = NbdClient::open(&peer.uri(), opts).unwrap();
    c.write_at(&[1u8; 4096], 0, WriteFlags::default()).unwrap();
    let t0 = Instant::now();
    let e = c.read_at(&mut [0u8; 4096], 0).unwrap_err();
    assert!(
        matches!(e, BlockError::PathLost { op: "read", .. }),
        "{e:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    // Writes are not delayed: the client reconnects and keeps working.
    c.write_at(&[2u8; 4096], 0, WriteFlags::FUA).unwrap();
}

#[test]
fn server_killed_and_restarted_client_reconnects_and_finishes() {
    let dir = BlockScratch::new("fault-restart");
    let img = dir.sparse_file("lun.img", 64 << 20);
    let addr = PeerAddr::Tcp(free_tcp_port());
    let mut server = start_lun_server(&img, addr.clone());
    let opts = NbdClientOptions {
        reconnect_timeout_ms: 20_000,
        ..Default::default()
    };
    let c = Arc::new(NbdClient::open(&server.uri(), opts).unwrap());
    let block = 64u64 << 10;
    let per_thread = 96u64;
    let mark = c.write_loss_count();
    let progress = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (c, progress) = (c.clone(), progress.clone());
            std::thread::spawn(move || {
                let mut rng = BlockRng::new(100 + t);
                for i in 0..per_thread {
                    let mut data = vec![0u8; usize::try_from(block).unwrap()];
                    rng.fill(&mut data);
                    c.write_at(&data, (t * per_thread + i) * block, WriteFlags::default())
                        .unwrap();
                    progress.fetch_add(1, Ordering::SeqCst);
                    if i % 8 == 0 {
                        // Give the kill a chance to land while requests are in flight.
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.load(Ordering::SeqCst) < 40 {
        assert!(Instant::now() < deadline, "writers made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    server.kill();
    let at_kill = progress.load(Ordering::SeqCst);
    let restarted = start_lun_server(&img, addr);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        at_kill < 4 * per_thread,
        "all writes finished before the kill; test proves nothing"
    );
    assert!(c.reconnect_count() >= 1);
    // Every write is there.
    for t in 0..4u64 {
        let mut rng = BlockRng::new(100 + t);
        for i in 0..per_thread {
            let mut want = vec![0u8; usize::try_from(block).unwrap()];
            rng.fill(&mut want);
            let mut got = vec![0u8; want.len()];
            c.read_at(&mut got, (t * per_thread + i) * block).unwrap();
            assert!(got == want, "block {t}/{i} lost across the restart");
        }
    }
    // Writes acknowledged by the killed server were never flushed: a flush succeeds, but
    // one that must answer for writes begun before the kill says they may be lost, every
    // time; one for writes begun after the restart does not.
    c.flush().unwrap();
    for _ in 0..2 {
        let e = block_client::flush_since(&*c, mark).unwrap_err();
        assert!(
            matches!(e, BlockError::PathLost { op: "flush", .. }),
            "{e:?}"
        );
    }
    let after = c.write_loss_count();
    c.write_at(&[7u8; 4096], 0, WriteFlags::default()).unwrap();
    block_client::flush_since(&*c, after).unwrap();
    drop(restarted);
}

#[test]
fn client_fails_typed_when_server_stays_down() {
    let dir = BlockScratch::new("fault-down");
    let img = dir.sparse_file("lun.img", 1 << 20);
    let mut server = start_lun_server(&img, PeerAddr::Unix(dir.join("nbd.sock")));
    let opts = NbdClientOptions {
        reconnect_timeout_ms: 300,
        ..Default::default()
    };
    let c = NbdClient::open(&server.uri(), opts).unwrap();
    c.write_at(&[1u8; 512], 0, WriteFlags::FUA).unwrap();
    server.kill();
    let e = c.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(e.is_path_lost(), "{e:?}");
    let e = c
        .write_at(&[1u8; 512], 0, WriteFlags::default())
        .unwrap_err();
    assert!(matches!(e, BlockError::PathLost { .. }), "{e:?}");
}

#[test]
fn crash_disk_behind_nbd_loses_exactly_unflushed_writes() {
    let dir = BlockScratch::new("fault-crash");
    let disk = Arc::new(CrashDisk::new(4 << 20));
    let server = serve_device(
        disk.clone(),
        &ListenAddr::Unix(dir.join("nbd.sock")),
        ServeOptions::default(),
    )
    .unwrap();
    let c = NbdClient::open(&server.uri(), NbdClientOptions::default()).unwrap();
    c.write_at(&[1u8; 4096], 0, WriteFlags::default()).unwrap();
    c.flush().unwrap();
    c.write_at(&[2u8; 4096], 4096, WriteFlags::default())
        .unwrap();
    c.write_at(&[3u8; 4096], 8192, WriteFlags::FUA).unwrap();
    c.write_zeroes(0, 512).unwrap();
    let mut buf = vec![0u8; 12288];
    c.read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0) && buf[512..4096].iter().all(|&b| b == 1));
    assert!(buf[4096..8192].iter().all(|&b| b == 2));
    disk.power_cut();
    c.read_at(&mut buf, 0).unwrap();
    assert!(
        buf[..4096].iter().all(|&b| b == 1),
        "flushed write lost or unflushed zeroing kept"
    );
    assert!(
        buf[4096..8192].iter().all(|&b| b == 0),
        "unflushed write survived the power cut"
    );
    assert!(buf[8192..].iter().all(|&b| b == 3), "FUA write lost");
    // A crash at the next flush: the client sees a device error, nothing more is durable.
    c.write_at(&[4u8; 4096], 4096, WriteFlags::default())
        .unwrap();
    disk.crash_at(CrashPoint::Flush(1));
    let e = c.flush().unwrap_err();
    assert!(matches!(e, BlockError::Device { op: "flush", .. }), "{e:?}");
    disk.power_cut();
    c.read_at(&mut buf[..4096], 4096).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
}
