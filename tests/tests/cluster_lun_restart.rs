#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used)]
//! The LUN server restarted under load: four threads of the test process overwrite 1 MiB
//! slots of one file through the coordinator's mount while `csvfs serve-lun` is stopped
//! (SIGTERM) and started again at once, well inside the coordinator's lease. No write
//! fails: the ones in flight across the restart wait for the new server. Every
//! acknowledged write reads back byte-exact on the writing node and on a node mounted
//! afterwards, the node keeps working, and fsck -n is clean. The one error allowed is the
//! report that writes acknowledged on the lost connections may not be durable (the NBD
//! client cannot tell a clean stop of its server from a crash): the file's handle open
//! across the restart fails its next fsync once with EIO, and only that file's.
//!
//! The writers hold the file open in the very process that starts the new server, so the
//! server's `execve` must not close an inherited descriptor of that file (closing one
//! flushes the file, which waits for the LUN): see `csvfs::local`.

use csvfs_tests::cluster::{pattern, ClusterSpec, TestCluster};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes per write, and per slot of the file.
const SLOT: usize = 1 << 20;
/// Writer threads; each owns `SLOTS_PER_WRITER` consecutive slots.
const WRITERS: usize = 4;
const SLOTS_PER_WRITER: usize = 8;
const SLOTS: usize = WRITERS * SLOTS_PER_WRITER;
/// Writes acknowledged after the restart before the writers stop.
const WRITES_AFTER: u64 = 64;
/// Longest any wait of this test may take.
const LIMIT: Duration = Duration::from_secs(30);

/// The bytes of write number `seq` (counted from 1) of slot `slot`.
fn slot_data(slot: usize, seq: u64, buf: &mut [u8]) {
    pattern(((slot as u64) << 32) | seq, buf);
}

/// Where slot `slot` starts in the file.
fn slot_offset(slot: usize) -> u64 {
    (slot * SLOT) as u64
}

/// One writer's state, shared with the test thread.
#[derive(Default)]
struct Writer {
    /// Per owned slot: the last acknowledged write's number (0: never written).
    acked: Mutex<Vec<u64>>,
    /// When each acknowledged write was started and when it returned.
    times: Mutex<Vec<(Instant, Instant)>>,
    /// Writes acknowledged so far.
    done: AtomicU64,
    /// The first failed write.
    error: Mutex<Option<String>>,
}

/// Overwrites writer `w`'s slots round-robin until `stop`.
fn write_slots(f: &File, w: usize, me: &Writer, stop: &AtomicBool) {
    let mut buf = vec![0u8; SLOT];
    let mut seqs = [0u64; SLOTS_PER_WRITER];
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let slot = w * SLOTS_PER_WRITER + i;
        let seq = seqs[i] + 1;
        slot_data(slot, seq, &mut buf);
        let started = Instant::now();
        if let Err(e) = f.write_all_at(&buf, slot_offset(slot)) {
            *me.error.lock().unwrap() = Some(format!("write {seq} of slot {slot}: {e}"));
            return;
        }
        me.times.lock().unwrap().push((started, Instant::now()));
        seqs[i] = seq;
        me.acked.lock().unwrap()[i] = seq;
        me.done.fetch_add(1, Ordering::SeqCst);
        i = (i + 1) % seqs.len();
    }
}

/// Reads the whole file at `path` and compares every slot with its last acknowledged write.
fn check_contents(path: &Path, acked: &[u64]) {
    assert_eq!(acked.len(), SLOTS);
    let f = File::open(path).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        slot_offset(SLOTS),
        "{} has the wrong size",
        path.display()
    );
    let (mut got, mut want) = (vec![0u8; SLOT], vec![0u8; SLOT]);
    for (slot, &seq) in acked.iter().enumerate() {
        f.read_exact_at(&mut got, slot_offset(slot)).unwrap();
        if seq == 0 {
            want.fill(0);
        } else {
            slot_data(slot, seq, &mut want);
        }
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{}: slot {slot} differs from its write {seq} from byte {at} on",
                path.display()
            );
        }
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < LIMIT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn writes_in_flight_survive_a_lun_server_restart() {
    let t0 = Instant::now();
    let mut c = TestCluster::start(ClusterSpec::new("lun-restart", 2));
    // The loss of acknowledged writes, found by a flush of node 1 and reported by the
    // fsync below (or the close of a handle the reads open). A flush that was in flight
    // when the server stopped fails too.
    c.expect_error("writes of the file may not be durable");
    c.expect_error("were lost with their path before a flush");
    c.expect_error(r#"error=flush on the LUN"#);
    let path = c.mp(1).join("slots.bin");
    let f = Arc::new(
        OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap(),
    );
    f.set_len(slot_offset(SLOTS)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<Arc<Writer>> = (0..WRITERS)
        .map(|_| {
            let w = Writer::default();
            *w.acked.lock().unwrap() = vec![0; SLOTS_PER_WRITER];
            Arc::new(w)
        })
        .collect();
    let threads: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(i, me)| {
            let (f, me, stop) = (f.clone(), me.clone(), stop.clone());
            thread::spawn(move || write_slots(&f, i, &me, &stop))
        })
        .collect();
    let done = || writers.iter().map(|w| w.done.load(Ordering::SeqCst)).sum();
    let failed = || writers.iter().any(|w| w.error.lock().unwrap().is_some());
    // Every writer has written, so every slot range is allocated and the writes that
    // follow overwrite mapped extents.
    wait_until("the first writes", || {
        failed()
            || writers
                .iter()
                .all(|w| w.done.load(Ordering::SeqCst) >= SLOTS_PER_WRITER as u64)
    });
    let before: u64 = done();
    let t_stop = Instant::now();
    c.local.stop_lun_server();
    let stopped = t_stop.elapsed();
    c.local.start_lun_server().expect("restart the LUN server");
    let t_up = Instant::now();
    eprintln!(
        "LUN server stopped in {stopped:?}, serving again after {:?}; {before} writes \
         acknowledged before",
        t_up - t_stop
    );
    let after_restart: u64 = done();
    wait_until("writes after the restart", || {
        failed() || done() >= after_restart + WRITES_AFTER
    });
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    for (i, w) in writers.iter().enumerate() {
        if let Some(e) = w.error.lock().unwrap().as_ref() {
            panic!("writer {i} failed across the LUN server restart: {e}");
        }
    }
    // Writes started before the new server was up returned after it was: they waited for
    // the LUN and were acknowledged, not failed.
    let times: Vec<(Instant, Instant)> = writers
        .iter()
        .flat_map(|w| w.times.lock().unwrap().clone())
        .collect();
    let waited = times.iter().filter(|(s, e)| *s < t_up && *e > t_up).count();
    let across = times
        .iter()
        .filter(|(s, e)| *s < t_stop && *e > t_up)
        .count();
    eprintln!(
        "{} writes acknowledged, {} after the restart; {waited} were in flight when the \
         server came back, {across} of them since before it was stopped",
        done(),
        done() - after_restart
    );
    assert!(
        waited > 0,
        "no write was in flight across the restart; the test proves nothing"
    );
    let acked: Vec<u64> = writers
        .iter()
        .flat_map(|w| w.acked.lock().unwrap().clone())
        .collect();

    // Every acknowledged write is there, byte-exact, on the writing node...
    check_contents(&path, &acked);
    // ...and, once committed, on a node that maps the file afresh. Writes the stopped
    // server acknowledged and no flush covered may not be durable: the handle open across
    // the restart reports that once, at its next fsync, whichever flush found it (this
    // fsync's, or a periodic commit's).
    match f.sync_all() {
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "fsync: {e}");
            eprintln!("first fsync after the restart: {e}");
            f.sync_all().expect("the second fsync after the restart");
        }
        Ok(()) => eprintln!("no acknowledged write was lost with its connection"),
    }
    drop(f);
    c.unmount(2);
    c.mount(2);
    check_contents(&c.mp(2).join("slots.bin"), &acked);

    // The node keeps working: a new file written, fsynced and read back on both nodes.
    let mut data = vec![0u8; 3 * SLOT + 4096];
    pattern(0xAF7E2, &mut data);
    let after = c.mp(1).join("after.bin");
    let g = File::create(&after).unwrap();
    g.write_all_at(&data, 0).unwrap();
    g.sync_all().unwrap();
    drop(g);
    assert!(
        std::fs::read(&after).unwrap() == data,
        "after.bin on node 1"
    );
    assert!(
        std::fs::read(c.mp(2).join("after.bin")).unwrap() == data,
        "after.bin on node 2"
    );
    c.finish();
    eprintln!("done in {:?}", t0.elapsed());
}
