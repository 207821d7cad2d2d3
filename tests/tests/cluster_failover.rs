#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used)]
//! Coordinator failover across real node processes: the coordinator is killed with
//! SIGKILL while one node streams fsynced records and another creates files; a survivor
//! takes the lease over with a higher epoch, every acknowledged record and file is there
//! exactly once, and the namespace keeps working. While no coordinator exists, I/O to
//! extents already mapped goes on between two survivors. Then the new coordinator is paused
//! (SIGSTOP) past its lease timeout: the last node takes over, and the paused one, once
//! resumed, fences itself and follows instead of writing metadata again. A file one node
//! holds open and another unlinked before the kill keeps its clusters through the takeover
//! (the holder re-announces its opens) until its last close. fsck -n is clean at the end.

use block_client::open_device;
use csvfs_tests::cluster::{csvfs_exe, pattern, ClusterSpec, TestCluster};
use metadata_server::lease::{find_coordinator, CoordinatorInfo};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Bytes per streamed record.
const RECORD: usize = 4096;
/// The coordinators' node grace (`--node-grace-ms`): after a takeover, unlinked files wait
/// this long for the nodes to re-announce their opens before the unclaimed ones are freed.
const NODE_GRACE: Duration = Duration::from_millis(3000);

/// Free bytes of the file system mounted at `mp` (`stat -f`, which asks the coordinator).
fn free_bytes(mp: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(mp)
        .output()
        .unwrap();
    assert!(out.status.success(), "stat -f {}", mp.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

/// The longest a takeover may take (lease timeout 4 s + settle + replay, on a busy machine).
const TAKEOVER_LIMIT: Duration = Duration::from_secs(25);

fn record(seq: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD];
    pattern(seq + 1, &mut r);
    r[..8].copy_from_slice(&seq.to_le_bytes());
    r
}

fn coordinator(c: &TestCluster) -> CoordinatorInfo {
    find_coordinator(&open_device(&c.uri()).unwrap()).unwrap()
}

/// The StateInfo `csvfs state` printed for node `id`.
fn state_info(text: &str, id: u32) -> Option<&str> {
    let mut lines = text.lines();
    let node = format!("node {id}");
    lines.find(|l| {
        l.strip_prefix("Node")
            .and_then(|r| r.split(':').nth(1))
            .is_some_and(|n| n.trim().trim_end_matches(" (coordinator)") == node)
    })?;
    lines
        .next()?
        .strip_prefix("StateInfo")?
        .split(':')
        .nth(1)
        .map(str::trim)
}

/// Waits until the lease names a coordinator other than `old` with a higher epoch, and
/// `csvfs state` shows it. Returns it and how long it took.
fn wait_takeover(
    c: &TestCluster,
    old: &CoordinatorInfo,
    since: Instant,
) -> (CoordinatorInfo, Duration) {
    loop {
        let now = coordinator(c);
        if now.node != old.node && now.epoch > old.epoch {
            let took = since.elapsed();
            let out = Command::new(csvfs_exe())
                .args(["state", "--lun", &c.uri()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "csvfs state failed: {text}");
            let want = format!(
                "Coordinator : {} at {} (epoch {}",
                now.node, now.addr, now.epoch.0
            );
            assert!(
                text.contains(&want),
                "csvfs state does not show {want:?}:\n{text}"
            );
            assert!(
                text.contains(&format!("{} (coordinator)", now.node)),
                "csvfs state does not mark {}:\n{text}",
                now.node
            );
            return (now, took);
        }
        assert!(
            since.elapsed() < TAKEOVER_LIMIT,
            "no takeover within {TAKEOVER_LIMIT:?}: lease still {now:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `n` 1 MiB files named `tag`-k into `dir` and fsyncs each.
fn write_files(dir: &Path, tag: &str, n: u64) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for k in 0..n {
        let rel = PathBuf::from(format!("{tag}-{k}"));
        let seed = tag.bytes().map(u64::from).sum::<u64>() * 1000 + k;
        pattern(seed, &mut buf);
        let mut f = File::create(dir.join(&rel)).unwrap();
        f.write_all(&buf).unwrap();
        f.sync_all().unwrap();
        out.push((rel, seed));
    }
    out
}

fn check_files(root: &Path, files: &[(PathBuf, u64)]) {
    let mut want = vec![0u8; 1 << 20];
    for (rel, seed) in files {
        pattern(*seed, &mut want);
        let got =
            fs::read(root.join(rel)).unwrap_or_else(|e| panic!("read {}: {e}", rel.display()));
        assert!(
            got == want,
            "{} differs under {}",
            rel.display(),
            root.display()
        );
    }
}

/// Streams fsynced records into `path` until `stop`; returns how many were acknowledged.
fn stream_records(path: PathBuf, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> u64 {
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        f.write_all_at(&record(seq), seq * RECORD as u64)
            .unwrap_or_else(|e| panic!("write record {seq}: {e}"));
        f.sync_data()
            .unwrap_or_else(|e| panic!("fsync record {seq}: {e}"));
        seq += 1;
        acked.store(seq, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(5));
    }
    seq
}

/// Creates files until `stop`, each with `create_new` (a create that ran twice would fail
/// with EEXIST) and fsynced; returns how many were acknowledged.
fn create_files(dir: PathBuf, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> u64 {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let p = dir.join(format!("f{n}"));
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("create f{n}: {e}"));
        f.write_all(format!("file {n}\n").as_bytes()).unwrap();
        f.sync_all().unwrap_or_else(|e| panic!("fsync f{n}: {e}"));
        n += 1;
        acked.store(n, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(5));
    }
    n
}

fn check_stream(path: &Path, acked: u64) {
    let data = fs::read(path).unwrap();
    assert_eq!(
        data.len() % RECORD,
        0,
        "{} is torn: {} bytes",
        path.display(),
        data.len()
    );
    let n = (data.len() / RECORD) as u64;
    assert_eq!(
        n,
        acked,
        "{}: {n} records, {acked} acknowledged",
        path.display()
    );
    for (i, r) in data.chunks(RECORD).enumerate() {
        assert!(
            r == record(i as u64).as_slice(),
            "{} record {i} is wrong",
            path.display()
        );
    }
}

fn check_created(dir: &Path, acked: u64) {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..acked).map(|n| format!("f{n}")).collect();
    want.sort();
    assert_eq!(names, want, "files created in {}", dir.display());
    for n in 0..acked {
        let text = fs::read_to_string(dir.join(format!("f{n}"))).unwrap();
        assert_eq!(text, format!("file {n}\n"));
    }
}

/// Waits until `counter` is at least `target`.
fn wait_count(what: &str, counter: &AtomicU64, target: u64) {
    let t = Instant::now();
    while counter.load(Ordering::SeqCst) < target {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what} stuck at {}",
            counter.load(Ordering::SeqCst)
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the log file `path` contains `line`.
fn wait_log(path: &Path, line: &str) {
    wait_log_line(path, &[line]);
}

/// Waits until one line of `path` holds every one of `parts`.
fn wait_log_line(path: &Path, parts: &[&str]) {
    let t = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never logged a line with {parts:?}:\n{}",
            path.display(),
            csvfs::local::log_tail(path, 3000)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_failover() {
    let t0 = Instant::now();
    let mut spec = ClusterSpec::new("failover", 3);
    spec.mount_flags = vec!["--node-grace-ms".into(), NODE_GRACE.as_millis().to_string()];
    let mut c = TestCluster::start(spec);
    let first = coordinator(&c);
    assert_eq!(first.node.0, 1, "node 1 mounts first and is coordinator");

    // Files written and fsynced from every node.
    let mut files = Vec::new();
    for id in 1..=3 {
        files.extend(write_files(&c.mp(id), &format!("n{id}"), 3));
    }
    fs::create_dir(c.mp(3).join("created")).unwrap();

    // A writer on node 2 and a creator on node 3 run across the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let (records, created) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (p, s, a) = (c.mp(2).join("stream.log"), stop.clone(), records.clone());
        thread::spawn(move || stream_records(p, s, a))
    };
    let creator = {
        let (p, s, a) = (c.mp(3).join("created"), stop.clone(), created.clone());
        thread::spawn(move || create_files(p, s, a))
    };
    wait_count("records before the kill", &records, 20);
    wait_count("creates before the kill", &created, 20);

    // A file both survivors hold open, its extents written and mapped on both. Node 3
    // writes and fsyncs it through the handle it keeps, so no close of it (whose release
    // may trim preallocation later and so invalidate node 2's layout) is still in flight.
    let mapped_len = 1usize << 20;
    let mut buf = vec![0u8; mapped_len];
    pattern(77, &mut buf);
    let open_rw = |id: u32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(c.mp(id).join("mapped.bin"))
            .unwrap()
    };
    // A new file on node `id` holding `data`, fsynced; its handle stays open.
    let create_synced = |id: u32, name: &str, data: &[u8]| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(c.mp(id).join(name))
            .unwrap();
        f.write_all_at(data, 0).unwrap();
        f.sync_all().unwrap();
        f
    };
    let on3 = create_synced(3, "mapped.bin", &buf);
    let on2 = open_rw(2);
    let mut got = vec![0u8; mapped_len];
    on2.read_exact_at(&mut got, 0).unwrap();
    assert!(got == buf);

    // A file node 2 holds open and node 3 unlinks. The coordinator that takes over counts
    // no opens at first: only node 2's re-announcement keeps the file's clusters.
    let orphan_len = 4usize << 20;
    let mut orphan = vec![0u8; orphan_len];
    pattern(79, &mut orphan);
    let held = create_synced(2, "orphan.bin", &orphan);
    fs::remove_file(c.mp(3).join("orphan.bin")).unwrap();

    // The coordinator's own node reaches it inside its process; the others over TCP.
    let dir = c.local.dir.clone();
    let log = move |id: u32| dir.join(format!("node{id}.log"));
    wait_log(&log(1), "connected to coordinator");
    for (id, how) in [(1, "local=true"), (2, "local=false"), (3, "local=false")] {
        let text = fs::read_to_string(log(id)).unwrap_or_default();
        let first_session = text
            .lines()
            .find(|l| l.contains("connected to coordinator"))
            .unwrap_or_default();
        assert!(
            first_session.contains(how),
            "node {id} did not connect with {how}: {first_session:?}"
        );
    }

    let killed = Instant::now();
    c.kill(1);
    let before = (
        records.load(Ordering::SeqCst),
        created.load(Ordering::SeqCst),
    );

    // While no coordinator exists, I/O to mapped extents goes on: node 3 writes, node 2
    // reads it back, both straight on the LUN.
    let io_start = Instant::now();
    pattern(78, &mut buf[..64 << 10]);
    on3.write_all_at(&buf[..64 << 10], 4096).unwrap();
    on2.read_exact_at(&mut got[..64 << 10], 4096).unwrap();
    let io_took = io_start.elapsed();
    assert!(
        got[..64 << 10] == buf[..64 << 10],
        "node 2 does not read node 3's write"
    );
    assert_eq!(
        coordinator(&c).node,
        first.node,
        "the direct I/O was meant to run before any takeover; it took {io_took:?}"
    );
    assert!(
        io_took < Duration::from_secs(2),
        "direct I/O took {io_took:?} without a coordinator"
    );
    drop((on3, on2));
    let (second, took) = wait_takeover(&c, &first, killed);
    let taken = Instant::now();
    eprintln!(
        "{} took over at {} {:?} after the kill",
        second.node, second.epoch, took
    );
    assert!(second.node.0 == 2 || second.node.0 == 3);
    // The node that took over turns to its own coordinator without a socket.
    let epoch = format!("epoch={} ", second.epoch);
    wait_log_line(
        &log(second.node.0),
        &["connected to coordinator", &epoch, "local=true"],
    );
    // Both streams go on after the takeover.
    wait_count("records after the takeover", &records, before.0 + 20);
    wait_count("creates after the takeover", &created, before.1 + 20);
    stop.store(true, Ordering::SeqCst);
    let n_records = writer.join().unwrap();
    let n_created = creator.join().unwrap();
    eprintln!(
        "{n_records} records and {n_created} files acknowledged ({} and {} before the kill)",
        before.0, before.1
    );

    // Everything acknowledged, exactly once, from both survivors.
    for id in [2, 3] {
        let root = c.mp(id);
        check_files(&root, &files);
        check_stream(&root.join("stream.log"), n_records);
        check_created(&root.join("created"), n_created);
    }

    // The namespace works: create on one node, rename on the other, unlink on the first.
    fs::write(c.mp(2).join("after.txt"), b"after the takeover\n").unwrap();
    fs::rename(c.mp(3).join("after.txt"), c.mp(3).join("renamed.txt")).unwrap();
    assert_eq!(
        fs::read(c.mp(2).join("renamed.txt")).unwrap(),
        b"after the takeover\n"
    );
    fs::remove_file(c.mp(2).join("renamed.txt")).unwrap();
    assert!(!c.mp(3).join("renamed.txt").exists());

    // The orphan grace has ended: node 2's re-announced open still holds the unlinked
    // file, whole; its last close frees it.
    thread::sleep((NODE_GRACE + Duration::from_secs(1)).saturating_sub(taken.elapsed()));
    let mut got = vec![0u8; orphan_len];
    held.read_exact_at(&mut got, 0).unwrap();
    assert!(got == orphan, "the unlinked file held open changed");
    let free_before = free_bytes(&c.mp(3));
    drop(held);
    let t = Instant::now();
    loop {
        let free = free_bytes(&c.mp(3));
        if free >= free_before + orphan_len as u64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "closing the unlinked file freed {} bytes, not its {orphan_len}: it was freed while open",
            free.saturating_sub(free_before)
        );
        thread::sleep(Duration::from_millis(100));
    }

    // `csvfs state` takes free space from the live coordinator through a local mount. Node
    // 1's last heartbeat is more than five heartbeat periods old once 6.5 s have passed.
    thread::sleep(Duration::from_millis(6500).saturating_sub(killed.elapsed()));
    let out = Command::new(csvfs_exe())
        .args(["state", "--lun", &c.uri()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from the coordinator (statfs through"),
        "free space not from the coordinator:\n{text}"
    );
    // The killed node stopped heartbeating: Unavailable; the survivors are Direct.
    for (id, want) in [(1, "Unavailable"), (2, "Direct"), (3, "Direct")] {
        assert_eq!(state_info(&text, id), Some(want), "node {id} in:\n{text}");
    }

    // Fencing: pause the new coordinator past its lease timeout; the other survivor takes
    // over, and the paused one, resumed, must stop acting as coordinator.
    let other = if second.node.0 == 2 { 3 } else { 2 };
    let paused_at = Instant::now();
    c.signal(second.node.0, libc::SIGSTOP);
    let (third, took3) = wait_takeover(&c, &second, paused_at);
    assert_eq!(third.node.0, other);
    assert!(third.epoch > second.epoch);
    eprintln!(
        "{} took over at {} {:?} after the pause",
        third.node, third.epoch, took3
    );
    let during = write_files(&c.mp(other), "during-pause", 2);
    c.signal(second.node.0, libc::SIGCONT);
    // The resumed node follows the new coordinator: its writes land through it.
    let resumed = write_files(&c.mp(second.node.0), "after-resume", 2);
    check_files(&c.mp(other), &resumed);
    check_files(&c.mp(second.node.0), &during);
    let now = coordinator(&c);
    assert_eq!(
        (now.node, now.epoch),
        (third.node, third.epoch),
        "the paused coordinator took the lease back"
    );
    let paused_log = c.local.dir.join(format!("node{}.log", second.node.0));
    wait_log(&paused_log, "this node stopped acting as coordinator");
    wait_log(
        &c.local.dir.join(format!("node{other}.log")),
        &format!(
            "node {other} took over as coordinator, epoch {}",
            third.epoch.0
        ),
    );

    // The paused coordinator's lease keeper reports the loss at ERROR: declared.
    c.expect_error("coordinator lease lost");
    c.finish();
    eprintln!("cluster_failover ran in {:?}", t0.elapsed());
}
