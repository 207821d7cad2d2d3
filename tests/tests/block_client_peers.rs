#![allow(clippy::tests_outside_test_module)]
//! Our NBD client against real servers started by the test: nbdkit (memory and file
//! plugins, Unix socket and TCP) and qemu-nbd.

use std::sync::Arc;

use block_client::{BlockDevice, BlockError, NbdClient, NbdClientOptions, Pipe, WriteFlags};
use csvfs_tests::block_peers::{
    free_tcp_port, start_nbdkit, start_qemu_nbd, BlockRng, BlockScratch, PeerAddr,
};

const SIZE: u64 = 64 << 20;

/// A read into a pipe, waited for, and what it put there.
fn pipe_read(c: &NbdClient, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let pipe = Pipe::new(2 << 20).expect("pipe");
    let (tx, rx) = std::sync::mpsc::channel();
    let len_u32 = u32::try_from(len).expect("length");
    let done = Box::new(move |r| tx.send(r).expect("send the outcome"));
    if c.submit_read_to_pipe(offset, len_u32, pipe, done).is_err() {
        panic!("the client refused a read into a pipe");
    }
    let pipe = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("completion")?;
    Ok(pipe.read_available().expect("read the pipe"))
}

/// A write whose data goes by reference (spliced from `data`'s pages), waited for; `data`
/// is scribbled over right after, so a completion reported before the server had the data
/// would show in the model comparisons. A refused start (that connection not live) is retried after blocking
/// reads, which reconnect.
fn write_by_reference(c: &NbdClient, data: &mut [u8], offset: u64) {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut done: block_client::Completion =
        Box::new(move |r| tx.send(r).expect("send the outcome"));
    let mut tries = 0;
    while let Err(refused) = c.submit_write_by_reference(data, offset, done) {
        tries += 1;
        assert!(tries < 32, "the client keeps refusing writes by reference");
        for _ in 0..tries {
            c.read_at(&mut [0u8; 512], 0).expect("read");
        }
        done = refused;
    }
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("completion");
    assert!(r.expect("write by reference").is_empty());
    data.fill(0xA5);
}

/// Random round trips (buffered, by reference and into a pipe) checked against a local model, FUA, flush, trim, write-zeroes, then
/// 64 concurrent requests from 8 threads.
fn exercise(uri: &str, seed: u64) -> Arc<NbdClient> {
    let c = Arc::new(NbdClient::open(uri, NbdClientOptions::default()).expect("open"));
    assert_eq!(c.size_bytes(), SIZE);
    let mut rng = BlockRng::new(seed);
    // Model of the first 8 MiB; the export starts zeroed (sparse file or memory).
    let model_len = 8usize << 20;
    let mut model = vec![0u8; model_len];
    c.write_zeroes(0, model_len as u64)
        .expect("zero model range");
    for i in 0..200 {
        let len = 1 + rng.below_usize(300_000);
        let off = rng.below_usize(model_len - len);
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        let flags = if i % 5 == 0 {
            WriteFlags::FUA
        } else {
            WriteFlags::default()
        };
        // Writes by reference carry no FUA; the FUA ones (every fifth) stay copied.
        if i % 4 == 1 && flags == WriteFlags::default() {
            model[off..off + len].copy_from_slice(&data);
            write_by_reference(&c, &mut data, off as u64);
        } else {
            c.write_at(&data, off as u64, flags).expect("write");
            model[off..off + len].copy_from_slice(&data);
        }
        if i % 3 == 0 {
            let rlen = 1 + rng.below_usize(400_000);
            let roff = rng.below_usize(model_len - rlen);
            let mut back = vec![0u8; rlen];
            c.read_at(&mut back, roff as u64).expect("read");
            assert!(
                back == model[roff..roff + rlen],
                "read at {roff}+{rlen} differs from model"
            );
            // The same bytes spliced into a pipe (zeros written for the holes a server
            // may send in a structured reply).
            let piped = pipe_read(&c, roff as u64, rlen).expect("read into a pipe");
            assert!(
                piped == model[roff..roff + rlen],
                "read into a pipe at {roff}+{rlen} differs from model"
            );
        }
    }
    c.flush().expect("flush");
    // Write-zeroes reads back as zeros; trim leaves the neighbours alone.
    c.write_zeroes(1 << 20, 256 << 10).expect("write_zeroes");
    model[1 << 20..(1 << 20) + (256 << 10)].fill(0);
    c.trim(4 << 20, 1 << 20).expect("trim");
    let mut back = vec![0u8; model_len];
    c.read_at(&mut back, 0).expect("read all");
    assert!(
        back[..4 << 20] == model[..4 << 20],
        "data before the trimmed range changed"
    );
    assert!(
        back[5 << 20..] == model[5 << 20..],
        "data after the trimmed range changed"
    );
    // Past the end: typed error, nothing sent.
    assert!(matches!(
        c.read_at(&mut [0u8; 8], SIZE - 4),
        Err(BlockError::OutOfRange { .. })
    ));

    // 8 threads × 8 requests in flight each = 64 concurrent requests.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut rng = BlockRng::new(seed ^ ((t + 1) * 0x9e37_79b9));
                let mut inner = Vec::new();
                for k in 0..8u64 {
                    let c = c.clone();
                    let mut data = vec![0u8; 16 << 10];
                    rng.fill(&mut data);
                    inner.push(std::thread::spawn(move || {
                        let off = (16 << 20) + (t * 8 + k) * (16 << 10);
                        c.write_at(&data, off, WriteFlags::default())
                            .expect("concurrent write");
                        let mut back = vec![0u8; data.len()];
                        c.read_at(&mut back, off).expect("concurrent read");
                        assert!(back == data);
                    }));
                }
                for h in inner {
                    h.join().expect("request thread");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    c.flush().expect("flush");
    c
}

#[test]
fn client_against_nbdkit_memory_unix() {
    let dir = BlockScratch::new("kit-mem");
    let peer = start_nbdkit(
        PeerAddr::Unix(dir.join("nbd.sock")),
        &[],
        &["memory", "64M"],
    );
    let c = exercise(&peer.uri(), 1);
    assert!(
        c.info().structured_replies,
        "nbdkit offers structured replies"
    );
}

#[test]
fn client_against_nbdkit_memory_tcp() {
    let peer = start_nbdkit(PeerAddr::Tcp(free_tcp_port()), &[], &["memory", "64M"]);
    exercise(&peer.uri(), 2);
}

#[test]
fn client_against_nbdkit_file() {
    let dir = BlockScratch::new("kit-file");
    let img = dir.sparse_file("lun.img", SIZE);
    let peer = start_nbdkit(
        PeerAddr::Unix(dir.join("nbd.sock")),
        &[],
        &["file", img.to_str().unwrap()],
    );
    exercise(&peer.uri(), 3);
}

#[test]
fn client_against_qemu_nbd() {
    let dir = BlockScratch::new("qemu");
    let img = dir.sparse_file("lun.img", SIZE);
    let peer = start_qemu_nbd(&img, &dir.join("nbd.sock"));
    let c = exercise(&peer.uri(), 4);
    drop(c);
    drop(peer);
    // The data reached the file itself.
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[16 << 20..(16 << 20) + (1 << 20)]
        .iter()
        .any(|&b| b != 0));
}

#[test]
fn client_splits_at_server_max_block_size() {
    let dir = BlockScratch::new("kit-bs");
    let peer = start_nbdkit(
        PeerAddr::Unix(dir.join("nbd.sock")),
        &["blocksize-policy"],
        &[
            "memory",
            "64M",
            "blocksize-maximum=64K",
            "blocksize-error-policy=error",
        ],
    );
    let c = NbdClient::open(&peer.uri(), NbdClientOptions::default()).unwrap();
    assert_eq!(c.max_request_bytes(), 64 << 10);
    let mut data = vec![0u8; 1 << 20];
    BlockRng::new(9).fill(&mut data);
    c.write_at(&data, 0, WriteFlags::default()).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(&mut back, 0).unwrap();
    assert!(back == data);
}
