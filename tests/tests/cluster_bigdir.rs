#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used)]
//! A directory with 100,000 entries stays usable: creates and lookups do not slow down
//! as it grows, and a listing returns every entry once.

use csvfs_tests::cluster::{ClusterSpec, TestCluster};
use metadata_server::format::MkfsOptions;
use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::path::Path;
use std::thread;
use std::time::Instant;

const ENTRIES: u32 = 100_000;
const THREADS: u32 = 16;
/// Regular files created (and timed) at the start and at the end.
const BATCH: u32 = 2_000;

/// Fills entries [from, to) with symbolic links (one metadata request each, the cheapest
/// entry to make) with THREADS threads.
fn fill_range(dir: &Path, from: u32, to: u32) {
    let mut hs = Vec::new();
    for k in 0..THREADS {
        let d = dir.to_path_buf();
        hs.push(thread::spawn(move || {
            let mut i = from + k;
            while i < to {
                std::os::unix::fs::symlink("target", d.join(format!("entry-{i:06}")))
                    .unwrap_or_else(|e| panic!("symlink entry-{i:06}: {e}"));
                i += THREADS;
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
}

/// Creates regular files [from, to) with THREADS threads; returns creates per second.
fn create_range(dir: &Path, from: u32, to: u32) -> f64 {
    let t = Instant::now();
    let mut hs = Vec::new();
    for k in 0..THREADS {
        let d = dir.to_path_buf();
        hs.push(thread::spawn(move || {
            let mut i = from + k;
            while i < to {
                OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .open(d.join(format!("entry-{i:06}")))
                    .unwrap_or_else(|e| panic!("create entry-{i:06}: {e}"));
                i += THREADS;
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    f64::from(to - from) / t.elapsed().as_secs_f64()
}

/// Stats `n` existing entries spread over [0, upto); returns lookups per second.
/// `salt` shifts the names, so repeated runs do not find them in the kernel's cache.
fn lookup_rate(dir: &Path, upto: u32, n: u32, salt: u32) -> f64 {
    let t = Instant::now();
    let step = upto / n;
    for k in 0..n {
        // Different names from the ones just created, so the kernel must ask.
        let i = (k * step + 7919 * k + salt) % upto;
        fs::symlink_metadata(dir.join(format!("entry-{i:06}"))).unwrap();
        assert!(fs::metadata(dir.join(format!("missing-{i:06}"))).is_err());
    }
    f64::from(2 * n) / t.elapsed().as_secs_f64()
}

/// The best of three create rates over [from, to), split in three runs: a burst of other
/// work on a shared machine slows one run, not all three.
fn best_create_rate(dir: &Path, from: u32, to: u32) -> f64 {
    let third = (to - from) / 3;
    let a = create_range(dir, from, from + third);
    let b = create_range(dir, from + third, from + 2 * third);
    let c = create_range(dir, from + 2 * third, to);
    a.max(b).max(c)
}

/// The best of three lookup rates (see [`best_create_rate`]).
fn best_lookup_rate(dir: &Path, upto: u32, n: u32) -> f64 {
    (0..3)
        .map(|run| lookup_rate(dir, upto, n, 1 + run * 331))
        .fold(0.0, f64::max)
}

#[test]
fn hundred_thousand_entries_stay_usable() {
    let mut spec = ClusterSpec::new("bigdir", 2);
    spec.mkfs = MkfsOptions {
        inode_count: Some(131_072),
        ..MkfsOptions::default()
    };
    let c = TestCluster::start(spec);
    let dir = c.mp(1).join("big");
    fs::create_dir(&dir).unwrap();
    let first_create = best_create_rate(&dir, 0, BATCH);
    let first_lookup = best_lookup_rate(&c.mp(2).join("big"), BATCH, 1000);
    let t = Instant::now();
    fill_range(&dir, BATCH, ENTRIES - BATCH);
    eprintln!(
        "filled {} entries in {:?}",
        ENTRIES - 2 * BATCH,
        t.elapsed()
    );
    let last_create = best_create_rate(&dir, ENTRIES - BATCH, ENTRIES);
    let last_lookup = best_lookup_rate(&c.mp(2).join("big"), ENTRIES, 1000);
    eprintln!(
        "creates/s first 2k {first_create:.0}, last 2k {last_create:.0}; \
         lookups/s at 10k {first_lookup:.0}, at 100k {last_lookup:.0}"
    );
    assert!(
        last_create > first_create / 3.0,
        "creates slowed from {first_create:.0}/s to {last_create:.0}/s"
    );
    assert!(
        last_lookup > first_lookup / 3.0,
        "lookups slowed from {first_lookup:.0}/s to {last_lookup:.0}/s"
    );
    let t = Instant::now();
    let mut seen = HashSet::new();
    for e in fs::read_dir(c.mp(2).join("big")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(seen.insert(name.clone()), "{name} listed twice");
    }
    assert_eq!(seen.len(), usize::try_from(ENTRIES).unwrap());
    eprintln!("listed {} entries in {:?}", seen.len(), t.elapsed());
    // Still writable: remove every hundredth entry, through the other node.
    for i in (0..ENTRIES).step_by(100) {
        fs::remove_file(c.mp(2).join(format!("big/entry-{i:06}"))).unwrap();
    }
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 99_000);
    c.finish();
}
