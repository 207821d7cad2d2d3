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
        if rep.findings.iter().any(|f| f.action.starts_with("cannot")) {
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
