//! Random byte corruption of the metadata blocks of a small volume, a few thousand seeds:
//! fsck never panics or hangs; it reports (or refuses with an error), a repairing run
//! either fixes everything it reports or says it cannot, and after a repair that fixed
//! everything a read-only run finds the volume clean. Opening the metadata store on the
//! damaged volume never panics either: it opens or refuses with an error.
//! `CSVFS_FUZZ_SEEDS` sets the number of seeds (default 2000).
#![allow(clippy::tests_outside_test_module)]

#[path = "../../fixtures/damage/damage.rs"]
mod damage;

use std::sync::Arc;

use block_client::testing::MemDevice;
use block_client::{BlockDevice, WriteFlags};
use csvfs_tools::fsck::{self, FsckOptions, Mode};
use metadata_server::store::Store;
use metadata_server::types::Epoch;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seeds() -> u64 {
    std::env::var("CSVFS_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

#[test]
fn random_metadata_corruption_never_panics_and_repairs_converge() {
    let dev = Arc::new(MemDevice::new(16 << 20));
    let mut b = damage::Builder::format(dev.clone());
    b.standard_tree();
    let blocks = b.metadata_blocks();
    let image = dev.image();
    let mut errors = 0u64;
    let mut repaired = 0u64;
    let mut store_opened = 0u64;
    for seed in 0..seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = Arc::new(MemDevice::from_image(image.clone()));
        for _ in 0..rng.gen_range(1..=2) {
            let blk = blocks[rng.gen_range(0..blocks.len())];
            for _ in 0..rng.gen_range(1..=8) {
                let at = blk * 4096 + rng.gen_range(0..4096u64);
                let v: u8 = rng.gen();
                d.write_at(&[v], at, WriteFlags::default()).unwrap();
            }
        }
        // The store on a copy: open (replay, load, reap) or a clear error, never a panic.
        let copy = Arc::new(MemDevice::from_image(d.image()));
        let dev: Arc<dyn BlockDevice> = copy;
        match Store::open(dev, Epoch(2)) {
            Ok(s) => {
                let _ = s.shutdown();
                store_opened += 1;
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        let ro = FsckOptions {
            mode: Mode::ReadOnly,
            force: true,
            ..FsckOptions::default()
        };
        let first = fsck::run(d.clone(), &ro);
        let rep = fsck::run(
            d.clone(),
            &FsckOptions {
                mode: Mode::Repair,
                ..ro.clone()
            },
        );
        let Ok(rep) = rep else {
            errors += 1;
            continue;
        };
        if let Ok(first) = &first {
            assert_eq!(
                first.kinds(),
                rep.kinds(),
                "seed {seed}: -n and -y disagree"
            );
        }
        if rep.findings.iter().any(|f| !f.repairable) {
            continue;
        }
        repaired += u64::from(!rep.findings.is_empty());
        let again =
            fsck::run(d.clone(), &ro).unwrap_or_else(|e| panic!("seed {seed}: after repair: {e}"));
        assert!(
            again.findings.is_empty(),
            "seed {seed}: still damaged after repair: {:#?}\nfirst repair: {:#?}",
            again.findings,
            rep.findings
        );
    }
    assert!(
        repaired > seeds() / 4,
        "only {repaired} seeds needed a repair"
    );
    eprintln!(
        "{} seeds: {repaired} repaired, {errors} refused with an error; the store opened {store_opened} of them",
        seeds()
    );
}

/// A volume the store filled and left with transactions in its journal (no shutdown), with
/// random bytes of its journal region and metadata changed: fsck replays what is intact,
/// reports the rest, repairs, and then finds the volume clean; the store opens or refuses.
#[test]
fn random_corruption_with_a_full_journal() {
    use metadata_server::proto::{Caller, Request};
    use metadata_server::types::{FileKind, InodeId, NodeId, RequestId};
    use metadata_server::MetadataStore;

    let dev = Arc::new(MemDevice::new(16 << 20));
    damage::Builder::format(dev.clone());
    let blocks = {
        let b = damage::Builder::open(dev.clone());
        let j = b.g.journal;
        let mut v: Vec<u64> = (j.start.0..j.start.0 + 64).collect();
        v.extend(b.metadata_blocks());
        v
    };
    {
        let d: Arc<dyn BlockDevice> = dev.clone();
        let s = Store::open(d, Epoch(1)).unwrap();
        for i in 0..40u64 {
            let c = Caller {
                node: NodeId(1),
                request: RequestId(i + 1),
                uid: 0,
                gid: 0,
            };
            let kind = if i % 5 == 0 {
                FileKind::Dir
            } else {
                FileKind::File
            };
            s.execute(
                &c,
                &Request::Create {
                    parent: InodeId::ROOT,
                    name: format!("e{i}").into_bytes(),
                    kind,
                    perm: 0o644,
                    rdev: 0,
                    exclusive: true,
                },
            )
            .unwrap();
        }
        // Dropped without shutdown: the transactions stay in the journal.
    }
    let image = dev.image();
    let intact = fsck::run(
        Arc::new(MemDevice::from_image(image.clone())),
        &FsckOptions::default(),
    )
    .unwrap();
    assert!(intact.findings.is_empty(), "{:#?}", intact.findings);
    assert!(intact.journal_records > 0);
    for seed in 0..seeds() / 4 {
        let mut rng = StdRng::seed_from_u64(1_000_000 + seed);
        let d = Arc::new(MemDevice::from_image(image.clone()));
        let blk = blocks[rng.gen_range(0..blocks.len())];
        for _ in 0..rng.gen_range(1..=8) {
            let at = blk * 4096 + rng.gen_range(0..4096u64);
            d.write_at(&[rng.gen()], at, WriteFlags::default()).unwrap();
        }
        let copy: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_image(d.image()));
        if let Ok(s) = Store::open(copy, Epoch(2)) {
            let _ = s.shutdown();
        }
        let ro = FsckOptions {
            mode: Mode::ReadOnly,
            force: true,
            ..FsckOptions::default()
        };
        let _ = fsck::run(d.clone(), &ro);
        let Ok(rep) = fsck::run(
            d.clone(),
            &FsckOptions {
                mode: Mode::Repair,
                ..ro.clone()
            },
        ) else {
            continue;
        };
        if rep.findings.iter().any(|f| !f.repairable) {
            continue;
        }
        let again = fsck::run(d.clone(), &ro).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            again.findings.is_empty(),
            "seed {seed}: still damaged after repair: {:#?}\nfirst repair: {:#?}",
            again.findings,
            rep.findings
        );
        assert_eq!(
            again.journal_records, 0,
            "seed {seed}: the repair emptied the journal"
        );
    }
}
