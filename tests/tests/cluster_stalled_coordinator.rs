#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used)]
//! A node keeps serving file data while more of its requests wait for a stalled
//! coordinator than it has FUSE event loops reading `/dev/fuse`: an event loop whose
//! handler waits hands its turn to a parked one (csvfs/src/fuse.rs, `fuse_readers`).

use csvfs_tests::cluster::{pattern, ClusterSpec, TestCluster};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Requests left waiting for the stopped coordinator: more than the event loops that read
/// at once on any machine (`fuse_readers` is at most 8).
const WAITERS: usize = 12;
const FILE_BYTES: usize = 1 << 20;

#[test]
fn reads_go_on_while_requests_wait_for_a_stalled_coordinator() {
    let mut c = TestCluster::start(ClusterSpec::new("stalled", 2));
    let mp = c.mp(2);

    // A file written and fsynced on node 2 (its clusters written, its layout known there),
    // and one directory per waiter: the kernel lets one mkdir at a time into a directory.
    let mut data = vec![0u8; FILE_BYTES];
    pattern(7, &mut data);
    let path = mp.join("data.img");
    let mut f = File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    for i in 0..WAITERS {
        fs::create_dir(mp.join(format!("d{i}"))).unwrap();
    }
    let file = OpenOptions::new().read(true).open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    file.read_exact_at(&mut buf, 0).unwrap();

    // The coordinator (node 1) stops answering; node 2's mkdirs wait for it.
    c.signal(1, libc::SIGSTOP);
    let stopped = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..WAITERS)
        .map(|i| {
            let (dir, done) = (mp.join(format!("d{i}/new")), done.clone());
            thread::spawn(move || {
                let r = fs::create_dir(&dir);
                done.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));

    // Reads of the open file are answered meanwhile, before any mkdir could finish (no
    // node takes over before the lease timeout of 4 s).
    for i in 0..256usize {
        let off = (i * 4096 * 7) % FILE_BYTES;
        file.read_exact_at(&mut buf, off as u64).unwrap();
        assert_eq!(buf, data[off..off + 4096], "read at {off}");
    }
    let waited = done.load(Ordering::SeqCst);
    let elapsed = stopped.elapsed();
    assert_eq!(
        waited, 0,
        "{waited} mkdirs finished before the reads did ({elapsed:?} after the stop): the \
         reads waited for the coordinator"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "reads took until {elapsed:?} after the stop"
    );

    // Node 1 dies; node 2 takes over and the waiting mkdirs complete there.
    c.kill(1);
    for w in waiters {
        w.join().unwrap().unwrap();
    }
    for i in 0..WAITERS {
        assert!(mp.join(format!("d{i}/new")).is_dir(), "d{i}/new");
    }
    drop(file);
    c.finish();
}
