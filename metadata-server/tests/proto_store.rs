//! The metadata server and client over loopback TCP in front of the real journaled store on
//! an in-memory LUN, found through the lease: several nodes at once, coherence, and a
//! coordinator that dies after journaling a change but before answering, then comes back
//! (new epoch, journal replayed) — the node's retry with the same request id must not run
//! the change twice.
#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions; a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use block_client::testing::{FlakyDisk, MemDevice, OpClass};
use block_client::BlockDevice;
use metadata_server::client::{
    ClientConfig, CoordinatorLocator, InvalidationHandler, LocalCoordinator, MetadataClient,
};
use metadata_server::format::{mkfs, MkfsOptions, Superblock};
use metadata_server::lease::{self, LeaseRole};
use metadata_server::proto::{Caller, Invalidation, Request, Response};
use metadata_server::server::{Server, ServerConfig, ServerHandle};
use metadata_server::store::Store;
use metadata_server::types::{Epoch, FileKind, FsError, InodeId, NodeId, VolumeId};
use metadata_server::MetadataStore;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"store test secret";

/// The real store, with a pause after each mutation (to lose its reply on purpose) and a
/// count of what reached it.
struct Slow {
    store: Arc<Store>,
    pause_ms: AtomicU64,
    executed: AtomicU64,
}

impl MetadataStore for Slow {
    fn execute(&self, caller: &Caller, req: &Request) -> Result<Response, FsError> {
        let r = self.store.execute(caller, req);
        self.executed.fetch_add(1, Ordering::SeqCst);
        let pause = self.pause_ms.load(Ordering::SeqCst);
        if pause > 0 {
            std::thread::sleep(Duration::from_millis(pause));
        }
        r
    }
    fn node_gone(&self, node: NodeId) -> Result<(), FsError> {
        self.store.node_gone(node)
    }
}

#[derive(Default)]
struct Seen(Mutex<Vec<Invalidation>>);

impl InvalidationHandler for Seen {
    fn invalidate(&self, inv: &Invalidation) {
        self.0.lock().unwrap().push(inv.clone());
    }
}

fn lun() -> (Arc<dyn BlockDevice>, VolumeId) {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
    let volume = format(&dev);
    (dev, volume)
}

/// Formats `dev` (8 nodes, 64 KiB clusters); returns the new volume's id.
fn format(dev: &Arc<dyn BlockDevice>) -> VolumeId {
    let opts = MkfsOptions {
        max_nodes: 8,
        cluster_bytes: 64 << 10,
        ..MkfsOptions::default()
    };
    mkfs(dev.clone(), &opts, &mut |_, _| {}).unwrap();
    Superblock::read(dev.as_ref()).unwrap().superblock.volume
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Becomes coordinator for `node` at `addr`: lease, store (replaying the journal), server.
fn coordinator(
    dev: &Arc<dyn BlockDevice>,
    volume: VolumeId,
    node: u32,
    addr: SocketAddr,
) -> (Arc<Slow>, ServerHandle, Epoch) {
    let role = lease::acquire_or_find(dev, NodeId(node), addr, 100).unwrap();
    let LeaseRole::Coordinator { epoch } = role else {
        panic!("{role:?}")
    };
    let store = Arc::new(Store::open(dev.clone(), epoch).unwrap());
    let slow = Arc::new(Slow {
        store,
        pause_ms: AtomicU64::new(0),
        executed: AtomicU64::new(0),
    });
    let srv = Server::start(
        slow.clone(),
        ServerConfig::new(addr, SECRET.to_vec(), volume, epoch),
    )
    .unwrap();
    (slow, srv, epoch)
}

fn node(dev: &Arc<dyn BlockDevice>, n: u32) -> (Arc<MetadataClient>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let c = MetadataClient::connect(
        ClientConfig {
            node: NodeId(n),
            secret: SECRET.to_vec(),
            volume: None,
            locator: CoordinatorLocator::Lease(dev.clone()),
            request_timeout_ms: 5000,
            local: None,
        },
        seen.clone(),
    )
    .unwrap();
    (c, seen)
}

fn create(parent: InodeId, name: &str) -> Request {
    Request::Create {
        parent,
        name: name.as_bytes().to_vec(),
        kind: FileKind::File,
        perm: 0o644,
        rdev: 0,
        exclusive: true,
    }
}

fn list(c: &MetadataClient, dir: InodeId) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    let mut cookie = 0;
    loop {
        let r = c
            .call(
                0,
                0,
                Request::ReadDir {
                    ino: dir,
                    after_cookie: cookie,
                    max_entries: 128,
                    plus: false,
                },
            )
            .unwrap();
        let Response::Entries(es) = r else {
            panic!("{r:?}")
        };
        if es.is_empty() {
            return names;
        }
        for (e, _) in es {
            cookie = e.cookie;
            if e.name != b"." && e.name != b".." {
                names.push(e.name);
            }
        }
    }
}

#[test]
fn three_nodes_create_concurrently_and_see_each_other() {
    let (dev, volume) = lun();
    let (_store, _srv, epoch) = coordinator(&dev, volume, 1, free_addr());
    assert_eq!(epoch, Epoch(1));
    let nodes: Vec<_> = (1..=3).map(|n| node(&dev, n)).collect();
    let Response::Attr(dir) = nodes[0]
        .0
        .call(
            0,
            0,
            Request::Create {
                parent: InodeId::ROOT,
                name: b"vms".to_vec(),
                kind: FileKind::Dir,
                perm: 0o755,
                rdev: 0,
                exclusive: true,
            },
        )
        .unwrap()
    else {
        panic!("mkdir")
    };
    let threads: Vec<_> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, (c, _))| {
            (0..4).map(move |t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for k in 0..50 {
                        let name = format!("n{i}-t{t}-{k}");
                        c.call(0, 0, create(dir.ino, &name)).unwrap();
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (c, _) in &nodes {
        let names = list(c, dir.ino);
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(names.len(), 600);
        assert_eq!(unique.len(), 600);
    }
}

#[test]
fn negative_entry_on_one_node_is_invalidated_by_a_create_on_another() {
    let (dev, volume) = lun();
    let (_store, _srv, _) = coordinator(&dev, volume, 1, free_addr());
    let (a, seen_a) = node(&dev, 1);
    let (b, seen_b) = node(&dev, 2);
    let look = Request::Lookup {
        parent: InodeId::ROOT,
        name: b"disk.img".to_vec(),
    };
    assert!(matches!(b.call(0, 0, look.clone()), Err(FsError::NotFound)));
    a.call(0, 0, create(InodeId::ROOT, "disk.img")).unwrap();
    // Acknowledged to A only after B dropped the directory its negative entry belongs to.
    assert_eq!(
        *seen_b.0.lock().unwrap(),
        vec![Invalidation::Inode { ino: InodeId::ROOT }]
    );
    assert!(seen_a.0.lock().unwrap().is_empty());
    assert!(matches!(b.call(0, 0, look), Ok(Response::Attr(_))));
}

#[test]
fn other_nodes_drop_their_copies_while_the_journal_writes_the_change() {
    let flaky = FlakyDisk::new(MemDevice::new(256 << 20));
    let lun = flaky.handle();
    let dev: Arc<dyn BlockDevice> = Arc::new(flaky);
    let volume = format(&dev);
    let addr = free_addr();
    let LeaseRole::Coordinator { epoch } =
        lease::acquire_or_find(&dev, NodeId(1), addr, 100).unwrap()
    else {
        panic!("no lease")
    };
    // The real store, so requests take the batched path with its group commit.
    let store = Arc::new(Store::open(dev.clone(), epoch).unwrap());
    let _srv = Server::start(
        store,
        ServerConfig::new(addr, SECRET.to_vec(), volume, epoch),
    )
    .unwrap();
    let (a, _) = node(&dev, 1);
    let (b, seen_b) = node(&dev, 2);
    // B caches the root directory's attributes.
    b.call(0, 0, Request::GetAttr { ino: InodeId::ROOT })
        .unwrap();
    lun.hang(OpClass::Write);
    let creating = std::thread::spawn(move || a.call(0, 0, create(InodeId::ROOT, "f")));
    // The journal cannot write the create, yet B is told to drop the root directory.
    let deadline = Instant::now() + Duration::from_secs(4);
    while !seen_b
        .0
        .lock()
        .unwrap()
        .contains(&Invalidation::Inode { ino: InodeId::ROOT })
    {
        assert!(
            Instant::now() < deadline,
            "B was not invalidated while the journal write hung"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(lun.hung_ops() >= 1, "the journal write is what waits");
    assert!(
        !creating.is_finished(),
        "the create was acknowledged before it was durable"
    );
    lun.heal();
    assert!(matches!(creating.join().unwrap(), Ok(Response::Attr(_))));
    assert!(matches!(
        b.call(
            0,
            0,
            Request::Lookup {
                parent: InodeId::ROOT,
                name: b"f".to_vec(),
            }
        ),
        Ok(Response::Attr(_))
    ));
}

#[test]
fn a_change_journaled_before_a_coordinator_crash_runs_once_after_the_retry() {
    let (dev, volume) = lun();
    let addr = free_addr();
    let (store, srv, epoch1) = coordinator(&dev, volume, 1, addr);
    let (c, _) = node(&dev, 2);
    c.call(0, 0, create(InodeId::ROOT, "before")).unwrap();

    // The coordinator journals the create, then dies before answering.
    store.pause_ms.store(500, Ordering::SeqCst);
    let c2 = c.clone();
    let call = std::thread::spawn(move || c2.call(0, 0, create(InodeId::ROOT, "once")));
    let t0 = Instant::now();
    while store.executed.load(Ordering::SeqCst) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "create never reached the store"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    srv.shutdown();
    drop(store);

    // A new coordinator (the lease expired: nobody renewed it) replays the journal.
    let (store2, _srv2, epoch2) = coordinator(&dev, volume, 1, addr);
    assert!(epoch2 > epoch1);
    // The retry carries the same request id: the duplicate-request cache answers it
    // instead of failing it with Exists.
    let r = call.join().unwrap();
    assert!(matches!(r, Ok(Response::Attr(_))), "{r:?}");
    assert_eq!(c.epoch(), epoch2);
    let names = list(&c, InodeId::ROOT);
    assert_eq!(
        names.iter().filter(|n| n.as_slice() == b"once").count(),
        1,
        "{names:?}"
    );
    assert!(store2.executed.load(Ordering::SeqCst) >= 1);
}

#[test]
fn the_coordinators_own_node_is_answered_in_place_by_the_real_store_and_stays_coherent() {
    let (dev, volume) = lun();
    let addr = free_addr();
    let role = lease::acquire_or_find(&dev, NodeId(1), addr, 100).unwrap();
    let LeaseRole::Coordinator { epoch } = role else {
        panic!("{role:?}")
    };
    let store = Arc::new(Store::open(dev.clone(), epoch).unwrap());
    let srv = Server::start(
        store.clone(),
        ServerConfig::new(addr, SECRET.to_vec(), volume, epoch),
    )
    .unwrap();
    let lc = LocalCoordinator::new();
    lc.set(Some(srv.local()));
    let seen1 = Arc::new(Seen::default());
    let one = MetadataClient::connect(
        ClientConfig {
            node: NodeId(1),
            secret: SECRET.to_vec(),
            volume: None,
            locator: CoordinatorLocator::Lease(dev.clone()),
            request_timeout_ms: 5000,
            local: Some(lc.clone()),
        },
        seen1.clone(),
    )
    .unwrap();
    assert!(one.is_local());
    let (two, seen2) = node(&dev, 2);
    assert!(!two.is_local());

    // Reads and open counts are answered in place, mutations by the executor.
    let Ok(Response::Attr(f)) = one.call(0, 0, create(InodeId::ROOT, "f")) else {
        panic!("create")
    };
    assert!(
        matches!(one.call(0, 0, Request::Lookup { parent: InodeId::ROOT, name: b"f".to_vec() }), Ok(Response::Attr(a)) if a.ino == f.ino)
    );
    let opened = one.call(
        0,
        0,
        Request::Open {
            ino: f.ino,
            write: true,
        },
    );
    assert!(matches!(opened, Ok(Response::Mapped { .. })), "{opened:?}");
    // A release answered on whichever thread: its continuation takes a lock this thread
    // does not hold.
    let done = Arc::new(Mutex::new(Vec::new()));
    let d = done.clone();
    one.call_detached(
        0,
        0,
        Request::Release { ino: f.ino },
        Box::new(move |r| d.lock().unwrap().push(r.is_ok())),
    );
    let t0 = Instant::now();
    while done.lock().unwrap().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "release not answered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*done.lock().unwrap(), vec![true]);

    // Node 2 caches f; node 1 unlinks it in place of the coordinator: node 2 is told.
    assert!(two
        .call(
            0,
            0,
            Request::Lookup {
                parent: InodeId::ROOT,
                name: b"f".to_vec()
            }
        )
        .is_ok());
    one.call(
        0,
        0,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
        },
    )
    .unwrap();
    assert!(seen2
        .0
        .lock()
        .unwrap()
        .contains(&Invalidation::Inode { ino: f.ino }));
    // And the other way round: node 1 caches g, node 2 removes it.
    let Ok(Response::Attr(g)) = two.call(0, 0, create(InodeId::ROOT, "g")) else {
        panic!("create g")
    };
    assert!(one.call(0, 0, Request::GetAttr { ino: g.ino }).is_ok());
    two.call(
        0,
        0,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"g".to_vec(),
        },
    )
    .unwrap();
    assert!(seen1
        .0
        .lock()
        .unwrap()
        .contains(&Invalidation::Inode { ino: g.ino }));

    // Both nodes at once, four threads each, creating, looking up, opening and releasing.
    let nodes = [one.clone(), two.clone()];
    let threads: Vec<_> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            (0..4).map(move |t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for k in 0..40 {
                        let name = format!("n{i}-t{t}-{k}");
                        let Ok(Response::Attr(a)) = c.call(0, 0, create(InodeId::ROOT, &name))
                        else {
                            panic!("create {name}")
                        };
                        let l = Request::Lookup {
                            parent: InodeId::ROOT,
                            name: name.clone().into_bytes(),
                        };
                        assert!(matches!(c.call(0, 0, l), Ok(Response::Attr(b)) if b.ino == a.ino));
                        c.call(
                            0,
                            0,
                            Request::Open {
                                ino: a.ino,
                                write: false,
                            },
                        )
                        .unwrap();
                        c.call(0, 0, Request::Release { ino: a.ino }).unwrap();
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for c in [&one, &two] {
        let names: Vec<_> = list(c, InodeId::ROOT)
            .into_iter()
            .filter(|n| n.starts_with(b"n"))
            .collect();
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(names.len(), 320);
        assert_eq!(unique.len(), 320);
    }
}
