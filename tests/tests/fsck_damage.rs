//! fsck.csvfs against every kind of damage `fixtures/damage` makes: a read-only run
//! reports exactly that damage (exit 4), a repairing run fixes it (exit 1), and a second
//! read-only run finds the volume clean (exit 0).
#![allow(clippy::tests_outside_test_module)]

#[path = "../../fixtures/damage/damage.rs"]
mod damage;

use std::sync::Arc;

use block_client::testing::MemDevice;
use block_client::BlockDevice;
use csvfs_tools::fsck::{self, FindingKind, FsckOptions, Mode};
use damage::{Builder, Damage, Tree};
use metadata_server::format::{BitmapKind, Superblock, SuperblockCopy};
use metadata_server::types::ClusterNo;

const SIZE: u64 = 32 << 20;

fn volume() -> (Arc<MemDevice>, Builder, Tree) {
    let dev = Arc::new(MemDevice::new(SIZE));
    let mut b = Builder::format(dev.clone());
    let t = b.standard_tree();
    (dev, b, t)
}

fn run(dev: &Arc<MemDevice>, mode: Mode) -> fsck::FsckReport {
    let opts = FsckOptions {
        mode,
        force: true,
        ..FsckOptions::default()
    };
    fsck::run(dev.clone(), &opts).unwrap_or_else(|e| panic!("fsck {mode:?}: {e}"))
}

fn expected(d: Damage) -> FindingKind {
    match d {
        Damage::BadPrimarySuperblock => FindingKind::BadPrimarySuperblock,
        Damage::BadChecksum => FindingKind::BadChecksum,
        Damage::LeakedClusters => FindingKind::LeakedClusters,
        Damage::OwnedClustersFree => FindingKind::OwnedClustersFree,
        Damage::CrossLinkedClusters => FindingKind::CrossLinkedClusters,
        Damage::WrongLinkCount => FindingKind::WrongLinkCount,
        Damage::EntryToFreeInode => FindingKind::EntryToFreeInode,
        Damage::OrphanInode => FindingKind::OrphanInode,
        Damage::DirectoryCycle => FindingKind::DirectoryCycle,
        Damage::ExtentBeyondVolume => FindingKind::ExtentBeyondVolume,
        Damage::UnwrittenFlag => FindingKind::UnwrittenFlag,
    }
}

#[test]
fn undamaged_volume_is_clean() {
    let (dev, _, _) = volume();
    let r = run(&dev, Mode::ReadOnly);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert_eq!(r.exit_code(), 0);
    let r = run(&dev, Mode::Repair);
    assert_eq!(r.exit_code(), 0);
    assert!(!r.repaired);
}

#[test]
fn every_damage_is_reported_then_repaired() {
    for d in Damage::ALL {
        let (dev, mut b, t) = volume();
        b.damage(&t, d);
        let before = dev.image();
        let r = run(&dev, Mode::ReadOnly);
        assert_eq!(r.kinds(), vec![expected(d)], "{d:?}: {:#?}", r.findings);
        assert_eq!(r.exit_code(), 4, "{d:?}");
        assert!(dev.image() == before, "{d:?}: -n wrote to the device");
        for f in &r.findings {
            assert!(!f.message.is_empty() && !f.action.is_empty());
        }
        let r = run(&dev, Mode::Repair);
        assert_eq!(r.kinds(), vec![expected(d)], "{d:?}: {:#?}", r.findings);
        assert_eq!(r.exit_code(), 1, "{d:?}");
        let r = run(&dev, Mode::ReadOnly);
        assert!(
            r.findings.is_empty(),
            "{d:?} after repair: {:#?}",
            r.findings
        );
        assert_eq!(r.exit_code(), 0, "{d:?}");
    }
}

#[test]
fn repairs_keep_the_data() {
    // Cross-linked: /a/f2 gets a copy of /a/b/f1's bytes, and f1 keeps its own.
    let (dev, mut b, t) = volume();
    let f1 = b.extents(t.f1);
    b.damage(&t, Damage::CrossLinkedClusters);
    run(&dev, Mode::Repair);
    let b = Builder::open(dev.clone());
    assert_eq!(b.extents(t.f1), f1);
    let f2 = b.extents(t.f2);
    assert_ne!(f2[1].lun_cluster, f1[0].lun_cluster);
    let cb = u64::from(b.g.cluster_bytes);
    for k in 0..u64::from(f2[1].len_clusters) {
        let mut buf = vec![0u8; 16];
        let at = b.g.cluster_offset(ClusterNo(f2[1].lun_cluster.0 + k)) + cb / 2;
        dev.read_at(&mut buf, at).unwrap();
        assert!(buf
            .iter()
            .all(|x| *x == damage::pattern(f1[0].lun_cluster.0 + k)));
        assert!(b.bit(BitmapKind::Clusters, f2[1].lun_cluster.0 + k));
    }

    // Orphan: the file is in /lost+found with its link count.
    let (dev, mut b, t) = volume();
    b.damage(&t, Damage::OrphanInode);
    run(&dev, Mode::Repair);
    let b = Builder::open(dev.clone());
    let (_, lf) = b.dir_block(b.sb.lost_found.0);
    let name = format!("#{}", t.f1);
    assert!(lf
        .entries
        .iter()
        .any(|e| e.name == name.as_bytes() && e.ino.0 == t.f1));
    assert_eq!(b.inode(t.f1).nlink, 1);

    // Primary superblock: rewritten from the backup.
    let (dev, mut b, t) = volume();
    b.damage(&t, Damage::BadPrimarySuperblock);
    assert_eq!(
        Superblock::read(dev.as_ref()).unwrap().copy,
        SuperblockCopy::Backup
    );
    run(&dev, Mode::Repair);
    assert_eq!(
        Superblock::read(dev.as_ref()).unwrap().copy,
        SuperblockCopy::Primary
    );
}

#[test]
fn clean_volume_is_skipped_without_force() {
    let (dev, _, _) = volume();
    let r = fsck::run(
        dev.clone(),
        &FsckOptions {
            force: false,
            ..FsckOptions::default()
        },
    )
    .unwrap();
    assert!(r.skipped_clean);
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn live_lease_refuses_repair_and_stale_lease_does_not() {
    use metadata_server::format::lease::{LeaseKind, LeaseRecord};
    use metadata_server::types::{Epoch, NodeId};
    let (dev, b, _) = volume();
    let at = b.g.lease_offset();
    let volume = b.sb.volume;
    let rec = move |counter: u64| LeaseRecord {
        kind: LeaseKind::Coordinator,
        volume,
        node: Some(NodeId(2)),
        timeout_ms: 100,
        epoch: Epoch(3),
        counter,
        time: metadata_server::format::now(),
        addr: "10.0.0.2:7000".into(),
    };
    dev.write_at(
        &rec(1).encode_block().unwrap(),
        at,
        block_client::WriteFlags::default(),
    )
    .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 2;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                dev.write_at(
                    &rec(n).encode_block().unwrap(),
                    at,
                    block_client::WriteFlags::default(),
                )
                .unwrap();
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let opts = FsckOptions {
        mode: Mode::Repair,
        lease_wait_ms: Some(200),
        ..FsckOptions::default()
    };
    let e = fsck::run(dev.clone(), &opts).unwrap_err();
    assert!(
        matches!(e, fsck::FsckError::LeaseLive { node: 2, .. }),
        "{e}"
    );
    // Read-only checks still run, with a note.
    let r = run(&dev, Mode::ReadOnly);
    assert!(r.notes.iter().any(|n| n.contains("node 2")));
    // --ignore-lease repairs anyway.
    let r = fsck::run(
        dev.clone(),
        &FsckOptions {
            ignore_lease: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(r.exit_code(), 0);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    renewer.join().unwrap();
    // A lease nobody renews belongs to a dead coordinator: repair goes ahead.
    let r = fsck::run(dev.clone(), &opts).unwrap();
    assert_eq!(r.exit_code(), 0);
    assert!(r.notes.iter().any(|n| n.contains("not renewed")));
}

#[test]
fn fsck_over_nbd() {
    use block_client::nbd::{serve, ListenAddr, ServeOptions};
    use block_client::{NbdClient, NbdClientOptions};
    let dir = std::env::temp_dir().join(format!("csvfs-fsck-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("vol.img");
    let (dev, mut b, t) = volume();
    b.damage(&t, Damage::OrphanInode);
    std::fs::write(&img, dev.image()).unwrap();
    let handle = serve(
        &img,
        &ListenAddr::Unix(dir.join("s.sock")),
        ServeOptions::default(),
    )
    .unwrap();
    let client: Arc<dyn BlockDevice> =
        Arc::new(NbdClient::open(&handle.uri(), NbdClientOptions::default()).unwrap());
    let opts = |mode| FsckOptions {
        mode,
        force: true,
        ..FsckOptions::default()
    };
    let r = fsck::run(client.clone(), &opts(Mode::ReadOnly)).unwrap();
    assert_eq!(r.kinds(), vec![FindingKind::OrphanInode]);
    assert_eq!(
        fsck::run(client.clone(), &opts(Mode::Repair))
            .unwrap()
            .exit_code(),
        1
    );
    assert_eq!(
        fsck::run(client.clone(), &opts(Mode::ReadOnly))
            .unwrap()
            .exit_code(),
        0
    );
    drop(client);
    drop(handle);
    std::fs::remove_dir_all(&dir).unwrap();
}
