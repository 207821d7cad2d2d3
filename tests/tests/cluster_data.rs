#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used)]
//! The data path across real node processes: a 64 GiB sparse image written at random
//! offsets on one node and checked on another, two nodes writing disjoint blocks of the
//! same unwritten clusters at once, an fsynced file surviving kill -9 of its writer, and a
//! full volume answering ENOSPC without damage.

use csvfs::local::is_mounted;
use csvfs_tests::cluster::{pattern, ClusterSpec, TestCluster};
use metadata_server::format::MkfsOptions;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

/// A small deterministic generator for offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn cluster_data() {
    let mut c = TestCluster::start(ClusterSpec::new("data", 3));
    sparse_64gib_image_written_on_a_checked_on_b(&c);
    two_nodes_write_disjoint_blocks_of_shared_unwritten_clusters(&c);
    fallocate_and_punch_hole_are_seen_everywhere(&c);
    fsynced_file_survives_kill_of_its_writer(&mut c);
    c.finish();
}

fn sparse_64gib_image_written_on_a_checked_on_b(c: &TestCluster) {
    let t = Instant::now();
    let size: u64 = 64 << 30;
    let writes = 400u64;
    let slot = size / writes;
    let mut rng = Rng(0x1234_5678);
    let mut regions = Vec::new();
    for i in 0..writes {
        let len = 4096 * (1 + rng.next() % 64); // 4 KiB .. 256 KiB
        let off = i * slot + (rng.next() % (slot - len)) / 512 * 512;
        regions.push((off, len));
    }
    let path = c.mp(1).join("big.img");
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    // Random order, so allocation is not sequential.
    let mut order: Vec<usize> = (0..regions.len()).collect();
    for i in (1..order.len()).rev() {
        let j = usize::try_from(rng.next() % (i as u64 + 1)).unwrap();
        order.swap(i, j);
    }
    let mut buf = vec![0u8; 256 << 10];
    for &i in &order {
        let (off, len) = regions[i];
        let b = &mut buf[..usize::try_from(len).unwrap()];
        pattern(off, b);
        f.write_all_at(b, off).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    eprintln!(
        "wrote {writes} regions into a 64 GiB image in {:?}",
        t.elapsed()
    );
    let f = File::open(c.mp(2).join("big.img")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    let mut want = vec![0u8; 256 << 10];
    for &(off, len) in &regions {
        let n = usize::try_from(len).unwrap();
        let (g, w) = (&mut buf[..n], &mut want[..n]);
        f.read_exact_at(g, off).unwrap();
        pattern(off, w);
        assert!(g == w, "region at {off} ({len} bytes) differs on node 2");
    }
    // Holes between regions read as zeros: the 64 KiB before each region's slot end.
    let mut hole = vec![1u8; 65536];
    for i in (0..writes).step_by(7) {
        let end_of_slot = (i + 1) * slot;
        let (off, len) = regions[usize::try_from(i).unwrap()];
        if off + len + 65536 <= end_of_slot {
            f.read_exact_at(&mut hole, end_of_slot - 65536).unwrap();
            assert!(
                hole.iter().all(|&b| b == 0),
                "hole before {end_of_slot} not zero"
            );
        }
    }
    // Space used is the written clusters, not 64 GiB.
    let used = fs::metadata(c.mp(2).join("big.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        used.blocks() * 512 < 2 << 30,
        "sparse image uses {} bytes",
        used.blocks() * 512
    );
    eprintln!("checked on node 2 in {:?} total", t.elapsed());
}

/// Nodes 1 and 2 write the even and the odd 4 KiB blocks of one fresh sparse file at the
/// same time, so every cluster is first written by both while still unwritten; node 3 then
/// checks every block. Without a single converter per cluster, each node's commit zeroes
/// the other's uncommitted blocks as "unwritten remainder".
fn two_nodes_write_disjoint_blocks_of_shared_unwritten_clusters(c: &TestCluster) {
    const BLOCK: usize = 4096;
    const BLOCKS: u64 = 2048; // 8 clusters of 1 MiB
    let t = Instant::now();
    for round in 0..2u64 {
        let name = format!("shared-{round}.bin");
        let f = File::create(c.mp(1).join(&name)).unwrap();
        f.set_len(BLOCKS * BLOCK as u64).unwrap();
        drop(f);
        let start = Barrier::new(2);
        thread::scope(|s| {
            for (node, parity) in [(1u32, 0u64), (2, 1)] {
                let path = c.mp(node).join(&name);
                let start = &start;
                s.spawn(move || {
                    let f = OpenOptions::new().write(true).open(&path).unwrap();
                    let mut buf = vec![0u8; BLOCK];
                    start.wait();
                    for b in (parity..BLOCKS).step_by(2) {
                        pattern(round << 32 | b, &mut buf);
                        f.write_all_at(&buf, b * BLOCK as u64).unwrap();
                    }
                    f.sync_all().unwrap();
                });
            }
        });
        let f = File::open(c.mp(3).join(&name)).unwrap();
        assert_eq!(f.metadata().unwrap().len(), BLOCKS * BLOCK as u64);
        let (mut got, mut want) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
        let mut lost = Vec::new();
        for b in 0..BLOCKS {
            f.read_exact_at(&mut got, b * BLOCK as u64).unwrap();
            pattern(round << 32 | b, &mut want);
            if got != want {
                lost.push(b);
            }
        }
        assert!(
            lost.is_empty(),
            "round {round}: {} of {BLOCKS} blocks differ on node 3, first {:?}",
            lost.len(),
            &lost[..lost.len().min(8)]
        );
    }
    eprintln!(
        "two nodes wrote interleaved blocks of shared clusters in {:?}",
        t.elapsed()
    );
}

fn fallocate(args: &[&str], path: &std::path::Path) {
    let st = std::process::Command::new("fallocate")
        .args(args)
        .arg(path)
        .status()
        .expect("run fallocate(1)");
    assert!(st.success(), "fallocate {args:?} failed");
}

fn fallocate_and_punch_hole_are_seen_everywhere(c: &TestCluster) {
    use std::os::unix::fs::MetadataExt;
    let mut data = vec![0u8; 8 << 20];
    pattern(11, &mut data);
    let a = c.mp(1).join("punch.bin");
    fs::write(&a, &data).unwrap();
    let blocks_before = fs::metadata(&a).unwrap().blocks();
    // Punch 3 MiB + 100 bytes starting mid-cluster: edges are zeroed, the middle freed.
    let (off, len) = (1_500_000u64, (3 << 20) + 100);
    fallocate(&["-p", "-o", &off.to_string(), "-l", &len.to_string()], &a);
    let (o, l) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
    data[o..o + l].fill(0);
    for id in [1, 2, 3] {
        let got = fs::read(c.mp(id).join("punch.bin")).unwrap();
        assert_eq!(got.len(), data.len(), "punch changed the size on node {id}");
        assert!(got == data, "punched range not zero on node {id}");
    }
    let blocks_after = fs::metadata(c.mp(2).join("punch.bin")).unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "punch freed nothing: {blocks_before} -> {blocks_after}"
    );
    // Preallocation extends the size and reads as zeros everywhere.
    let b = c.mp(2).join("prealloc.bin");
    fallocate(&["-l", "5MiB"], &b);
    let got = fs::read(c.mp(3).join("prealloc.bin")).unwrap();
    assert_eq!(got.len(), 5 << 20);
    assert!(
        got.iter().all(|&x| x == 0),
        "preallocated range leaked data"
    );
    // Keep-size preallocation leaves the size alone.
    fallocate(&["-n", "-o", "0", "-l", "32MiB"], &b);
    assert_eq!(
        fs::metadata(c.mp(1).join("prealloc.bin")).unwrap().len(),
        5 << 20
    );
}

fn fsynced_file_survives_kill_of_its_writer(c: &mut TestCluster) {
    // Node 2 is not the coordinator: killing it is a node crash, not a failover.
    let mut data = vec![0u8; (24 << 20) + 4321];
    pattern(42, &mut data);
    let path = c.mp(2).join("durable.bin");
    let mut f = File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    // Keep it open and keep writing elsewhere in it: the crash happens mid-use.
    let tail = vec![7u8; 1 << 20];
    f.write_all_at(&tail, 64 << 20).unwrap();
    c.expect_error("Failed to send FUSE reply");
    let mp2 = c.mp(2);
    c.kill(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(&mp2) {
        assert!(
            Instant::now() < deadline,
            "killed node's mount did not go away"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(f);
    let mut got = Vec::new();
    File::open(c.mp(3).join("durable.bin"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got.len() >= data.len(), "fsynced size lost: {}", got.len());
    assert!(
        got[..data.len()] == data[..],
        "fsynced data differs on node 3"
    );
    // The node comes back and sees its file.
    c.mount(2);
    let again = fs::read(c.mp(2).join("durable.bin")).unwrap();
    assert!(again[..data.len()] == data[..]);
}

#[test]
fn cluster_enospc() {
    let mut spec = ClusterSpec::new("enospc", 2);
    spec.lun_bytes = 256 << 20;
    spec.mkfs = MkfsOptions {
        cluster_bytes: 1 << 20,
        ..MkfsOptions::default()
    };
    let c = TestCluster::start(spec);
    let chunk = vec![0x5au8; 1 << 20];
    let path = c.mp(1).join("fill");
    let mut f = File::create(&path).unwrap();
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&chunk) {
            Ok(()) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(written < 512 << 20, "a 256 MiB volume took {written} bytes");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "got {err}");
    assert_ne!(err.kind(), ErrorKind::Other);
    drop(f);
    assert!(written > 64 << 20, "only {written} bytes fit");
    // Everything written before ENOSPC reads back, from the other node.
    let mut got = Vec::new();
    File::open(c.mp(2).join("fill"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got.len() as u64 >= written);
    assert!(got[..usize::try_from(written).unwrap()]
        .iter()
        .all(|&b| b == 0x5a));
    // Free the space; writing works again from the other node.
    fs::remove_file(c.mp(2).join("fill")).unwrap();
    let mut g = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(c.mp(2).join("after"))
        .unwrap();
    for _ in 0..32 {
        g.write_all(&chunk).unwrap();
    }
    g.sync_all().unwrap();
    drop(g);
    assert_eq!(fs::metadata(c.mp(1).join("after")).unwrap().len(), 32 << 20);
    c.finish();
}
