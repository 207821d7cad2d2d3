use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use block_client::testing::{CrashDisk, MemDevice};
use block_client::BlockDevice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::format::{mkfs, Inode, MkfsOptions};
use crate::proto::ByteRange;
use crate::types::{
    Attr, FallocMode, FileKind, InodeId, RenameFlags, RequestId, SetAttr, XattrMode,
};

struct Client {
    node: NodeId,
    next: u64,
    /// The protocol version of the node's session.
    version: u32,
}

impl Client {
    fn new(node: u32) -> Client {
        Client {
            node: NodeId(node),
            next: 1,
            version: crate::proto::PROTOCOL_VERSION,
        }
    }
    /// A node of protocol version 3, whose open counts are journaled.
    fn legacy(node: u32) -> Client {
        Client {
            version: 3,
            ..Client::new(node)
        }
    }
    fn caller(&mut self) -> Caller {
        self.next += 1;
        Caller {
            node: self.node,
            request: RequestId(self.next),
            uid: 1000,
            gid: 1000,
        }
    }
    fn run(&mut self, s: &Store, req: Request) -> Result<Response, FsError> {
        let c = self.caller();
        s.execute_as(&c, &req, self.version)
    }
}

fn opts(cluster: u32) -> MkfsOptions {
    MkfsOptions {
        cluster_bytes: cluster,
        journal_bytes: Some(4 << 20),
        volume: Some(VolumeId([9; 16])),
        hash_seed: Some(42),
        ..MkfsOptions::default()
    }
}

fn fresh(size: u64, o: &MkfsOptions) -> (Arc<dyn BlockDevice>, Store) {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(size));
    mkfs(dev.clone(), o, &mut |_, _| {}).unwrap();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    (dev, s)
}

fn attr(r: Result<Response, FsError>) -> Attr {
    match r.unwrap() {
        Response::Attr(a) => a,
        other => panic!("expected Attr, got {other:?}"),
    }
}

fn create(
    c: &mut Client,
    s: &Store,
    parent: InodeId,
    name: &str,
    kind: FileKind,
) -> Result<Attr, FsError> {
    c.run(
        s,
        Request::Create {
            parent,
            name: name.as_bytes().to_vec(),
            kind,
            perm: 0o644,
            rdev: 0,
            exclusive: true,
        },
    )
    .map(|r| match r {
        Response::Attr(a) => a,
        other => panic!("expected Attr, got {other:?}"),
    })
}

fn names(c: &mut Client, s: &Store, dir: InodeId) -> BTreeMap<Vec<u8>, (InodeId, FileKind)> {
    let mut out = BTreeMap::new();
    let mut after = 0;
    loop {
        let r = c
            .run(
                s,
                Request::ReadDir {
                    ino: dir,
                    after_cookie: after,
                    max_entries: 37,
                    plus: false,
                },
            )
            .unwrap();
        let Response::Entries(es) = r else {
            panic!("entries")
        };
        if es.is_empty() {
            break;
        }
        for (e, _) in es {
            after = e.cookie;
            if e.name != b"." && e.name != b".." {
                assert!(
                    out.insert(e.name, (e.ino, e.kind)).is_none(),
                    "readdir returned a name twice"
                );
            }
        }
    }
    out
}

fn extents(c: &mut Client, s: &Store, ino: InodeId) -> Vec<crate::types::Extent> {
    match c
        .run(
            s,
            Request::GetExtents {
                ino,
                offset_bytes: 0,
                len_bytes: u64::MAX / 2,
            },
        )
        .unwrap()
    {
        Response::Mapped { extents, .. } => extents,
        other => panic!("{other:?}"),
    }
}

#[test]
fn fresh_volume_has_root_and_lost_found() {
    let (_d, s) = fresh(64 << 20, &opts(64 << 10));
    let mut c = Client::new(1);
    let n = names(&mut c, &s, InodeId::ROOT);
    assert_eq!(n.len(), 1);
    assert_eq!(n[&b"lost+found".to_vec()], (InodeId(2), FileKind::Dir));
    let root = attr(c.run(&s, Request::GetAttr { ino: InodeId::ROOT }));
    assert_eq!(root.nlink, 3);
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    assert_eq!(st.free_clusters, st.total_clusters);
    assert_eq!(st.free_inodes, st.total_inodes - 2);
}

#[test]
fn namespace_basics_and_reopen() {
    let (dev, s) = fresh(64 << 20, &opts(64 << 10));
    let mut c = Client::new(1);
    let d = create(&mut c, &s, InodeId::ROOT, "vm1", FileKind::Dir).unwrap();
    let f = create(&mut c, &s, d.ino, "disk.img", FileKind::File).unwrap();
    assert!(matches!(
        create(&mut c, &s, d.ino, "disk.img", FileKind::File),
        Err(FsError::Exists)
    ));
    let l = attr(c.run(
        &s,
        Request::Lookup {
            parent: d.ino,
            name: b"disk.img".to_vec(),
        },
    ));
    assert_eq!(l.ino, f.ino);
    assert_eq!(attr(c.run(&s, Request::GetAttr { ino: d.ino })).nlink, 2);
    assert_eq!(
        attr(c.run(&s, Request::GetAttr { ino: InodeId::ROOT })).nlink,
        4
    );
    // symlink, long symlink, link
    let t = "x".repeat(3000);
    let sl = attr(c.run(
        &s,
        Request::Symlink {
            parent: d.ino,
            name: b"long".to_vec(),
            target: t.as_bytes().to_vec(),
        },
    ));
    assert!(
        matches!(c.run(&s, Request::ReadLink { ino: sl.ino }), Ok(Response::Bytes(b)) if b == t.as_bytes())
    );
    let linked = attr(c.run(
        &s,
        Request::Link {
            ino: f.ino,
            new_parent: InodeId::ROOT,
            new_name: b"hard".to_vec(),
        },
    ));
    assert_eq!(linked.nlink, 2);
    // xattrs: small and large
    for (name, len) in [("user.a", 10usize), ("user.big", 5000)] {
        c.run(
            &s,
            Request::SetXattr {
                ino: f.ino,
                name: name.as_bytes().to_vec(),
                value: vec![7; len],
                mode: XattrMode::Create,
            },
        )
        .unwrap();
    }
    assert!(matches!(
        c.run(
            &s,
            Request::SetXattr {
                ino: f.ino,
                name: b"user.a".to_vec(),
                value: vec![1],
                mode: XattrMode::Create,
            }
        ),
        Err(FsError::Exists)
    ));
    // rmdir non-empty
    assert!(matches!(
        c.run(
            &s,
            Request::Rmdir {
                parent: InodeId::ROOT,
                name: b"vm1".to_vec()
            }
        ),
        Err(FsError::NotEmpty)
    ));
    s.shutdown().unwrap();
    drop(s);
    let s = Store::open(dev.clone(), Epoch(2)).unwrap();
    let n = names(&mut c, &s, d.ino);
    assert_eq!(
        n.keys().cloned().collect::<Vec<_>>(),
        vec![b"disk.img".to_vec(), b"long".to_vec()]
    );
    assert!(
        matches!(c.run(&s, Request::ReadLink { ino: sl.ino }), Ok(Response::Bytes(b)) if b == t.as_bytes())
    );
    assert!(matches!(
        c.run(&s, Request::GetXattr { ino: f.ino, name: b"user.big".to_vec() }),
        Ok(Response::Bytes(b)) if b == vec![7; 5000]
    ));
    assert!(
        matches!(c.run(&s, Request::ListXattr { ino: f.ino }), Ok(Response::Names(n)) if n.len() == 2)
    );
    assert_eq!(attr(c.run(&s, Request::GetAttr { ino: f.ino })).nlink, 2);
}

#[test]
fn rename_semantics() {
    let (_d, s) = fresh(64 << 20, &opts(64 << 10));
    let mut c = Client::new(1);
    let r = InodeId::ROOT;
    let a = create(&mut c, &s, r, "a", FileKind::Dir).unwrap();
    let b = create(&mut c, &s, a.ino, "b", FileKind::Dir).unwrap();
    let f = create(&mut c, &s, r, "f", FileKind::File).unwrap();
    let g = create(&mut c, &s, r, "g", FileKind::File).unwrap();
    let ren = |c: &mut Client, p: InodeId, n: &str, np: InodeId, nn: &str, flags: RenameFlags| {
        c.run(
            &s,
            Request::Rename {
                parent: p,
                name: n.as_bytes().to_vec(),
                new_parent: np,
                new_name: nn.as_bytes().to_vec(),
                flags,
            },
        )
    };
    let none = RenameFlags::default();
    // cycle
    assert!(matches!(
        ren(&mut c, r, "a", b.ino, "x", none),
        Err(FsError::Invalid(_))
    ));
    assert!(matches!(
        ren(&mut c, r, "a", a.ino, "x", none),
        Err(FsError::Invalid(_))
    ));
    // noreplace
    let nr = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    assert!(matches!(
        ren(&mut c, r, "f", r, "g", nr),
        Err(FsError::Exists)
    ));
    // file over dir / dir over file
    assert!(matches!(
        ren(&mut c, r, "f", r, "a", none),
        Err(FsError::IsDir)
    ));
    assert!(matches!(
        ren(&mut c, r, "a", r, "f", none),
        Err(FsError::NotDir)
    ));
    // replace: g is freed
    ren(&mut c, r, "f", r, "g", none).unwrap();
    assert!(matches!(
        c.run(&s, Request::GetAttr { ino: g.ino }),
        Err(FsError::Stale)
    ));
    assert_eq!(
        names(&mut c, &s, r).get(b"g".as_slice()).map(|x| x.0),
        Some(f.ino)
    );
    // exchange a file and a dir across directories
    let ex = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    ren(&mut c, r, "g", a.ino, "b", ex).unwrap();
    assert_eq!(names(&mut c, &s, r)[b"g".as_slice()].0, b.ino);
    assert_eq!(names(&mut c, &s, a.ino)[b"b".as_slice()].0, f.ino);
    assert_eq!(attr(c.run(&s, Request::GetAttr { ino: a.ino })).nlink, 2);
    assert_eq!(attr(c.run(&s, Request::GetAttr { ino: r })).nlink, 5);
    let dotdot = attr(c.run(
        &s,
        Request::Lookup {
            parent: b.ino,
            name: b"..".to_vec(),
        },
    ));
    assert_eq!(dotdot.ino, r);
    // dir replaces empty dir
    let e = create(&mut c, &s, r, "e", FileKind::Dir).unwrap();
    ren(&mut c, r, "g", r, "e", none).unwrap();
    assert!(matches!(
        c.run(&s, Request::GetAttr { ino: e.ino }),
        Err(FsError::Stale)
    ));
    assert_eq!(attr(c.run(&s, Request::GetAttr { ino: r })).nlink, 5);
}

#[test]
fn allocate_commit_truncate_punch() {
    let cs: u64 = 64 << 10;
    let (dev, s) = fresh(64 << 20, &opts(64 << 10));
    let mut c = Client::new(1);
    let f = create(&mut c, &s, InodeId::ROOT, "f", FileKind::File).unwrap();
    let Response::Mapped { extents: got, .. } = c
        .run(
            &s,
            Request::Allocate {
                ino: f.ino,
                offset_bytes: 0,
                len_bytes: 3 * cs,
                hint_bytes: 5 * cs,
            },
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        got.len(),
        1,
        "a sequential allocation is one contiguous run"
    );
    assert_eq!(got[0].len_bytes, 8 * cs);
    assert!(got[0].unwritten);
    let a = attr(c.run(
        &s,
        Request::Commit {
            ino: f.ino,
            written: vec![ByteRange {
                offset_bytes: 0,
                len_bytes: 2 * cs + 1,
            }],
            size_bytes: 2 * cs + 1,
        },
    ));
    assert_eq!(a.size_bytes, 2 * cs + 1);
    let ex = extents_of(&mut c, &s, f.ino);
    assert_eq!(ex, vec![(0, 3, false), (3, 5, true)]);
    // Write a marker into cluster 1 then truncate to 1.5 clusters: the tail is zeroed.
    let lun1 = extents(&mut c, &s, f.ino)[0].lun_offset_bytes + cs;
    dev.write_at(
        &vec![0xAB; usize::try_from(cs).unwrap()],
        lun1,
        Default::default(),
    )
    .unwrap();
    c.run(
        &s,
        Request::SetAttr {
            ino: f.ino,
            set: SetAttr {
                size_bytes: Some(cs + cs / 2),
                ..Default::default()
            },
        },
    )
    .unwrap();
    let mut buf = vec![0u8; usize::try_from(cs).unwrap()];
    dev.read_at(&mut buf, lun1).unwrap();
    assert!(buf[..usize::try_from(cs / 2).unwrap()]
        .iter()
        .all(|b| *b == 0xAB));
    assert!(buf[usize::try_from(cs / 2).unwrap()..]
        .iter()
        .all(|b| *b == 0));
    assert_eq!(extents_of(&mut c, &s, f.ino), vec![(0, 2, false)]);
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    assert_eq!(st.total_clusters - st.free_clusters, 2);
    // Punch cluster 0, zero-range cluster 1.
    c.run(
        &s,
        Request::Fallocate {
            ino: f.ino,
            offset_bytes: 0,
            len_bytes: cs,
            mode: FallocMode::PunchHole,
        },
    )
    .unwrap();
    assert_eq!(extents_of(&mut c, &s, f.ino), vec![(1, 1, false)]);
    c.run(
        &s,
        Request::Fallocate {
            ino: f.ino,
            offset_bytes: cs,
            len_bytes: cs,
            mode: FallocMode::ZeroRange,
        },
    )
    .unwrap();
    assert_eq!(extents_of(&mut c, &s, f.ino), vec![(1, 1, true)]);
    let a = attr(c.run(
        &s,
        Request::Fallocate {
            ino: f.ino,
            offset_bytes: 4 * cs,
            len_bytes: 2 * cs,
            mode: FallocMode::Allocate,
        },
    ));
    assert_eq!(a.size_bytes, 6 * cs);
    assert_eq!(a.allocated_bytes, 3 * cs);
}

#[test]
fn unwritten_clusters_are_claimed_by_one_node_until_it_commits() {
    let cs: u64 = 64 << 10;
    let (_dev, s) = fresh(64 << 20, &opts(64 << 10));
    let (mut a, mut b) = (Client::new(1), Client::new(2));
    let f = create(&mut a, &s, InodeId::ROOT, "f", FileKind::File).unwrap();
    let alloc = |c: &mut Client, cluster: u64, n: u64| -> Vec<(u64, u64, bool)> {
        let req = Request::Allocate {
            ino: f.ino,
            offset_bytes: cluster * cs + 4096,
            len_bytes: (n - 1) * cs + 4096,
            hint_bytes: 0,
        };
        let Ok(Response::Mapped { extents, .. }) = c.run(&s, req) else {
            panic!("allocate failed")
        };
        extents
            .iter()
            .map(|e| (e.file_offset_bytes / cs, e.len_bytes / cs, e.unwritten))
            .collect()
    };
    assert_eq!(alloc(&mut a, 0, 2), vec![(0, 2, true)]);
    assert_eq!(
        alloc(&mut a, 0, 1),
        vec![(0, 2, true)],
        "the holder asks again, and gets the unwritten clusters ahead as well"
    );
    // Node 2 gets the cluster no one holds, not the two node 1 holds.
    assert_eq!(alloc(&mut b, 0, 3), vec![(2, 1, true)]);
    let commit = |c: &mut Client, written: Vec<ByteRange>| {
        attr(c.run(
            &s,
            Request::Commit {
                ino: f.ino,
                written,
                size_bytes: 0,
            },
        ))
    };
    // Node 1 commits cluster 0 only: both of its claims end, cluster 1 stays unwritten.
    commit(
        &mut a,
        vec![ByteRange {
            offset_bytes: 4096,
            len_bytes: 4096,
        }],
    );
    assert_eq!(alloc(&mut b, 0, 2), vec![(0, 1, false), (1, 2, true)]);
    assert_eq!(alloc(&mut a, 1, 2), vec![], "node 2 holds clusters 1 and 2");
    // A release of its last open ends node 2's claims as well.
    b.run(
        &s,
        Request::Open {
            ino: f.ino,
            write: true,
        },
    )
    .unwrap();
    b.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(alloc(&mut a, 1, 2), vec![(1, 2, true)]);
}

fn extents_of(c: &mut Client, s: &Store, ino: InodeId) -> Vec<(u64, u64, bool)> {
    let cs = u64::from(s.geometry().cluster_bytes);
    extents(c, s, ino)
        .iter()
        .map(|e| (e.file_offset_bytes / cs, e.len_bytes / cs, e.unwritten))
        .collect()
}

#[test]
fn fragmented_file_uses_extent_blocks_and_survives_reopen() {
    let cs: u64 = 4096;
    let (dev, s) = fresh(64 << 20, &opts(4096));
    let mut c = Client::new(1);
    let f = create(&mut c, &s, InodeId::ROOT, "frag", FileKind::File).unwrap();
    let g = create(&mut c, &s, InodeId::ROOT, "other", FileKind::File).unwrap();
    // Interleave allocations so no two clusters of `frag` are contiguous.
    for i in 0..600u64 {
        for (ino, off) in [(f.ino, 2 * i), (g.ino, i)] {
            c.run(
                &s,
                Request::Allocate {
                    ino,
                    offset_bytes: off * cs,
                    len_bytes: cs,
                    hint_bytes: 0,
                },
            )
            .unwrap();
        }
    }
    let before = extents(&mut c, &s, f.ino);
    assert_eq!(before.len(), 600);
    // Commit every third cluster: flags split nothing (extents are one cluster each).
    let written: Vec<ByteRange> = (0..600u64)
        .step_by(3)
        .map(|i| ByteRange {
            offset_bytes: 2 * i * cs,
            len_bytes: cs,
        })
        .collect();
    c.run(
        &s,
        Request::Commit {
            ino: f.ino,
            written,
            size_bytes: 1200 * cs,
        },
    )
    .unwrap();
    let stats = s.stats();
    assert!(
        stats.max_txn_bytes < 64 << 10,
        "an allocation rewrites few extent blocks: {stats:?}"
    );
    let before = extents(&mut c, &s, f.ino);
    s.shutdown().unwrap();
    drop(s);
    let s = Store::open(dev, Epoch(2)).unwrap();
    assert_eq!(extents(&mut c, &s, f.ino), before);
    // Truncate back to inline size, then to zero; all clusters return.
    c.run(
        &s,
        Request::SetAttr {
            ino: f.ino,
            set: SetAttr {
                size_bytes: Some(10 * cs),
                ..Default::default()
            },
        },
    )
    .unwrap();
    assert_eq!(extents(&mut c, &s, f.ino).len(), 5);
    c.run(
        &s,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"frag".to_vec(),
        },
    )
    .unwrap();
    c.run(
        &s,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"other".to_vec(),
        },
    )
    .unwrap();
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    assert_eq!(st.free_clusters, st.total_clusters);
}

#[test]
fn enospc_corrupts_nothing() {
    let (dev, s) = fresh(16 << 20, &opts(64 << 10));
    let mut c = Client::new(1);
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    let total = st.total_clusters;
    let cs = 64u64 << 10;
    let f = create(&mut c, &s, InodeId::ROOT, "big", FileKind::File).unwrap();
    let r = c.run(
        &s,
        Request::Allocate {
            ino: f.ino,
            offset_bytes: 0,
            len_bytes: (total + 1) * cs,
            hint_bytes: 0,
        },
    );
    assert!(matches!(r, Err(FsError::NoSpace)));
    c.run(
        &s,
        Request::Allocate {
            ino: f.ino,
            offset_bytes: 0,
            len_bytes: total * cs,
            hint_bytes: 0,
        },
    )
    .unwrap();
    let g = create(&mut c, &s, InodeId::ROOT, "g", FileKind::File).unwrap();
    assert!(matches!(
        c.run(
            &s,
            Request::Allocate {
                ino: g.ino,
                offset_bytes: 0,
                len_bytes: 1,
                hint_bytes: 0,
            }
        ),
        Err(FsError::NoSpace)
    ));
    // Fill the inodes.
    let mut n = 0;
    loop {
        match create(&mut c, &s, InodeId::ROOT, &format!("f{n}"), FileKind::File) {
            Ok(_) => n += 1,
            Err(FsError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(n > 10);
    s.shutdown().unwrap();
    drop(s);
    let s = Store::open(dev, Epoch(2)).unwrap();
    assert_eq!(names(&mut c, &s, InodeId::ROOT).len(), n + 3);
    c.run(
        &s,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"big".to_vec(),
        },
    )
    .unwrap();
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    assert_eq!(st.free_clusters, total);
    create(&mut c, &s, InodeId::ROOT, "again", FileKind::File).unwrap();
}

#[test]
fn retried_request_runs_once_also_after_crash() {
    let disk = Arc::new(CrashDisk::new(32 << 20));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    mkfs(dev.clone(), &opts(64 << 10), &mut |_, _| {}).unwrap();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    let caller = Caller {
        node: NodeId(3),
        request: RequestId(77),
        uid: 0,
        gid: 0,
    };
    let req = Request::Create {
        parent: InodeId::ROOT,
        name: b"once".to_vec(),
        kind: FileKind::File,
        perm: 0o600,
        rdev: 0,
        exclusive: true,
    };
    let first = s.execute(&caller, &req).unwrap();
    assert_eq!(s.execute(&caller, &req).unwrap(), first);
    drop(s);
    disk.power_cut();
    let s = Store::open(dev, Epoch(2)).unwrap();
    assert_eq!(s.execute(&caller, &req).unwrap(), first);
    let other = Caller {
        request: RequestId(78),
        ..caller
    };
    assert!(matches!(s.execute(&other, &req), Err(FsError::Exists)));
}

/// Nodes before protocol version 4 do not re-announce their opens: their counts are on disk.
#[test]
fn unlinked_open_file_keeps_clusters_until_last_close() {
    let disk = Arc::new(CrashDisk::new(32 << 20));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    mkfs(dev.clone(), &opts(64 << 10), &mut |_, _| {}).unwrap();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    let mut a = Client::legacy(1);
    let mut b = Client::legacy(2);
    let f = create(&mut a, &s, InodeId::ROOT, "f", FileKind::File).unwrap();
    let g = create(&mut a, &s, InodeId::ROOT, "g", FileKind::File).unwrap();
    for ino in [f.ino, g.ino] {
        a.run(
            &s,
            Request::Allocate {
                ino,
                offset_bytes: 0,
                len_bytes: 4 << 16,
                hint_bytes: 0,
            },
        )
        .unwrap();
    }
    a.run(
        &s,
        Request::Open {
            ino: f.ino,
            write: true,
        },
    )
    .unwrap();
    a.run(
        &s,
        Request::Open {
            ino: f.ino,
            write: false,
        },
    )
    .unwrap();
    b.run(
        &s,
        Request::Open {
            ino: f.ino,
            write: false,
        },
    )
    .unwrap();
    b.run(
        &s,
        Request::Open {
            ino: g.ino,
            write: false,
        },
    )
    .unwrap();
    for n in ["f", "g"] {
        a.run(
            &s,
            Request::Unlink {
                parent: InodeId::ROOT,
                name: n.as_bytes().to_vec(),
            },
        )
        .unwrap();
    }
    assert_eq!(used_clusters(&mut a, &s), 8);
    a.run(&s, Request::Release { ino: f.ino }).unwrap();
    a.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 8, "node 2 still has f open");
    // Crash: the opens are on disk, so f and g stay until their holders let go.
    drop(s);
    disk.power_cut();
    let s = Store::open(dev.clone(), Epoch(2)).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 8);
    assert_eq!(s.nodes_holding_opens(), vec![NodeId(2)]);
    b.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 4);
    assert!(matches!(
        a.run(&s, Request::GetAttr { ino: f.ino }),
        Err(FsError::Stale)
    ));
    s.node_gone(NodeId(2)).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0);
    assert!(s.nodes_holding_opens().is_empty());
    drop(s);
    disk.power_cut();
    let s = Store::open(dev, Epoch(3)).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0);
}

#[test]
fn crash_keeps_every_acknowledged_change() {
    let disk = Arc::new(CrashDisk::new(32 << 20));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    mkfs(
        dev.clone(),
        &MkfsOptions {
            inode_count: Some(1000),
            ..opts(64 << 10)
        },
        &mut |_, _| {},
    )
    .unwrap();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    let mut c = Client::new(1);
    let mut expect = BTreeSet::new();
    for i in 0..300 {
        let name = format!("file-{i}");
        create(&mut c, &s, InodeId::ROOT, &name, FileKind::File).unwrap();
        expect.insert(name.into_bytes());
        if i % 7 == 0 {
            let victim = format!("file-{}", i / 2);
            if expect.remove(victim.as_bytes()) {
                c.run(
                    &s,
                    Request::Unlink {
                        parent: InodeId::ROOT,
                        name: victim.into_bytes(),
                    },
                )
                .unwrap();
            }
        }
    }
    // Force at least one checkpoint in the middle and some journal-only changes after it.
    s.checkpoint().unwrap();
    for i in 300..350 {
        let name = format!("file-{i}");
        create(&mut c, &s, InodeId::ROOT, &name, FileKind::File).unwrap();
        expect.insert(name.into_bytes());
    }
    drop(s);
    disk.power_cut();
    let s = Store::open(dev, Epoch(2)).unwrap();
    let got: BTreeSet<Vec<u8>> = names(&mut c, &s, InodeId::ROOT)
        .into_keys()
        .filter(|n| n != b"lost+found")
        .collect();
    assert_eq!(got, expect);
}

#[test]
fn hundred_thousand_entries_lookup_and_create_stay_constant() {
    let o = MkfsOptions {
        cluster_bytes: 1 << 20,
        journal_bytes: Some(16 << 20),
        inode_count: Some(101_000),
        meta_blocks: Some(4096),
        volume: Some(VolumeId([1; 16])),
        hash_seed: Some(7),
        ..MkfsOptions::default()
    };
    let (dev, s) = fresh(160 << 20, &o);
    let mut c = Client::new(1);
    let d = create(&mut c, &s, InodeId::ROOT, "big", FileKind::Dir).unwrap();
    let mut early_txn = 0;
    for i in 0..100_000u32 {
        create(&mut c, &s, d.ino, &format!("entry-{i:06}"), FileKind::File).unwrap();
        if i == 100 {
            early_txn = s.stats().max_txn_bytes;
        }
    }
    let st = s.stats();
    // A create (with a block split at most) touches a bounded number of structures:
    // the largest transaction did not grow with the directory.
    assert!(st.max_txn_bytes <= early_txn.max(20 << 10), "{st:?}");
    s.shutdown().unwrap();
    drop(s);
    let s = Store::open(dev, Epoch(2)).unwrap();
    // Warm the directory once, then every lookup examines exactly one block and reads
    // nothing from the device.
    c.run(
        &s,
        Request::Lookup {
            parent: d.ino,
            name: b"entry-000000".to_vec(),
        },
    )
    .unwrap();
    let before = s.stats();
    for i in (0..100_000u32).step_by(97) {
        let r = c.run(
            &s,
            Request::Lookup {
                parent: d.ino,
                name: format!("entry-{i:06}").into_bytes(),
            },
        );
        assert!(r.is_ok(), "entry-{i:06}");
    }
    assert!(matches!(
        c.run(
            &s,
            Request::Lookup {
                parent: d.ino,
                name: b"missing".to_vec()
            }
        ),
        Err(FsError::NotFound)
    ));
    let after = s.stats();
    let lookups = after.dir_lookups - before.dir_lookups;
    assert_eq!(
        after.dir_blocks_examined - before.dir_blocks_examined,
        lookups
    );
    // Attribute loads of the found inodes may read; directory blocks may not.
    assert!(after.device_reads - before.device_reads <= lookups);
    assert_eq!(names(&mut c, &s, d.ino).len(), 100_000);
}

/// The model: directory contents, kinds, link counts and sizes.
#[derive(Default)]
struct Model {
    dirs: HashMap<InodeId, BTreeMap<Vec<u8>, InodeId>>,
    kind: HashMap<InodeId, FileKind>,
    nlink: HashMap<InodeId, u32>,
    parent: HashMap<InodeId, InodeId>,
    size: HashMap<InodeId, u64>,
}

impl Model {
    fn is_ancestor(&self, anc: InodeId, mut x: InodeId) -> bool {
        loop {
            if x == anc {
                return true;
            }
            match self.parent.get(&x) {
                Some(p) if *p != x => x = *p,
                _ => return false,
            }
        }
    }
    fn drop_link(&mut self, ino: InodeId) {
        let k = self.kind[&ino];
        if k == FileKind::Dir {
            self.dirs.remove(&ino);
            self.kind.remove(&ino);
            self.nlink.remove(&ino);
            self.parent.remove(&ino);
        } else {
            let n = self.nlink.get_mut(&ino).unwrap();
            *n -= 1;
            if *n == 0 {
                self.kind.remove(&ino);
                self.nlink.remove(&ino);
                self.size.remove(&ino);
            }
        }
    }
    fn dir_nlink(&self, d: InodeId) -> u32 {
        2 + u32::try_from(
            self.dirs[&d]
                .values()
                .filter(|i| self.kind[i] == FileKind::Dir)
                .count(),
        )
        .unwrap()
    }
}

fn kind_of(e: &Result<Response, FsError>) -> String {
    match e {
        Ok(_) => "ok".into(),
        Err(e) => format!("{:?}", std::mem::discriminant(e)),
    }
}

#[test]
fn model_random_operations() {
    for seed in 0..6u64 {
        model_run(seed, 400);
    }
}

fn model_run(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let disk = Arc::new(CrashDisk::new(48 << 20));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    mkfs(dev.clone(), &opts(64 << 10), &mut |_, _| {}).unwrap();
    let mut s = Store::open(dev.clone(), Epoch(1)).unwrap();
    let mut epoch = 1;
    let mut c = Client::new(1);
    let mut m = Model::default();
    m.dirs.insert(InodeId::ROOT, BTreeMap::new());
    m.kind.insert(InodeId::ROOT, FileKind::Dir);
    m.parent.insert(InodeId::ROOT, InodeId::ROOT);
    let lf = InodeId(2);
    m.dirs
        .get_mut(&InodeId::ROOT)
        .unwrap()
        .insert(b"lost+found".to_vec(), lf);
    m.dirs.insert(lf, BTreeMap::new());
    m.kind.insert(lf, FileKind::Dir);
    m.parent.insert(lf, InodeId::ROOT);
    let pool = ["a", "b", "c", "d", "e"];
    for step in 0..steps {
        let dirs: Vec<InodeId> = {
            let mut v: Vec<_> = m.dirs.keys().copied().collect();
            v.sort();
            v
        };
        let pd = dirs[rng.gen_range(0..dirs.len())];
        let nd = dirs[rng.gen_range(0..dirs.len())];
        let n = pool[rng.gen_range(0..pool.len())].as_bytes().to_vec();
        let nn = pool[rng.gen_range(0..pool.len())].as_bytes().to_vec();
        let op = rng.gen_range(0..100);
        let (req, expect): (Request, Result<(), &str>) = if op < 30 {
            let kind = if rng.gen_bool(0.3) {
                FileKind::Dir
            } else {
                FileKind::File
            };
            let exp = if m.dirs[&pd].contains_key(&n) {
                Err("Exists")
            } else {
                Ok(())
            };
            (
                Request::Create {
                    parent: pd,
                    name: n.clone(),
                    kind,
                    perm: 0o644,
                    rdev: 0,
                    exclusive: true,
                },
                exp,
            )
        } else if op < 45 {
            let exp = match m.dirs[&pd].get(&n) {
                None => Err("NotFound"),
                Some(i) if m.kind[i] == FileKind::Dir => Err("IsDir"),
                Some(_) => Ok(()),
            };
            (
                Request::Unlink {
                    parent: pd,
                    name: n.clone(),
                },
                exp,
            )
        } else if op < 55 {
            let exp = match m.dirs[&pd].get(&n) {
                None => Err("NotFound"),
                Some(i) if m.kind[i] != FileKind::Dir => Err("NotDir"),
                Some(i) if !m.dirs[i].is_empty() => Err("NotEmpty"),
                Some(_) => Ok(()),
            };
            (
                Request::Rmdir {
                    parent: pd,
                    name: n.clone(),
                },
                exp,
            )
        } else if op < 85 {
            let flags = match rng.gen_range(0..4) {
                0 => RenameFlags {
                    noreplace: true,
                    exchange: false,
                },
                1 => RenameFlags {
                    noreplace: false,
                    exchange: true,
                },
                _ => RenameFlags::default(),
            };
            let src = m.dirs[&pd].get(&n).copied();
            let dst = m.dirs[&nd].get(&nn).copied();
            let exp = match (src, dst) {
                (None, _) => Err("NotFound"),
                (Some(_), None) if flags.exchange => Err("NotFound"),
                (Some(s), Some(d)) if flags.exchange => {
                    if s == d {
                        Ok(())
                    } else if (m.kind[&s] == FileKind::Dir && pd != nd && m.is_ancestor(s, nd))
                        || (m.kind[&d] == FileKind::Dir && pd != nd && m.is_ancestor(d, pd))
                    {
                        Err("Invalid")
                    } else {
                        Ok(())
                    }
                }
                (Some(_), Some(_)) if flags.noreplace => Err("Exists"),
                (Some(s), Some(d)) if s == d => Ok(()),
                (Some(s), Some(d))
                    if m.kind[&s] == FileKind::Dir && m.kind[&d] != FileKind::Dir =>
                {
                    Err("NotDir")
                }
                (Some(s), Some(d))
                    if m.kind[&s] != FileKind::Dir && m.kind[&d] == FileKind::Dir =>
                {
                    Err("IsDir")
                }
                (Some(_), Some(d)) if m.kind[&d] == FileKind::Dir && !m.dirs[&d].is_empty() => {
                    Err("NotEmpty")
                }
                (Some(s), _) if m.kind[&s] == FileKind::Dir && pd != nd && m.is_ancestor(s, nd) => {
                    Err("Invalid")
                }
                _ => Ok(()),
            };
            (
                Request::Rename {
                    parent: pd,
                    name: n.clone(),
                    new_parent: nd,
                    new_name: nn.clone(),
                    flags,
                },
                exp,
            )
        } else if op < 93 {
            let files: Vec<InodeId> = {
                let mut v: Vec<_> = m
                    .kind
                    .iter()
                    .filter(|(_, k)| **k == FileKind::File)
                    .map(|(i, _)| *i)
                    .collect();
                v.sort();
                v
            };
            if files.is_empty() {
                continue;
            }
            let f = files[rng.gen_range(0..files.len())];
            let exp = if m.dirs[&nd].contains_key(&nn) {
                Err("Exists")
            } else {
                Ok(())
            };
            (
                Request::Link {
                    ino: f,
                    new_parent: nd,
                    new_name: nn.clone(),
                },
                exp,
            )
        } else {
            let files: Vec<InodeId> = {
                let mut v: Vec<_> = m
                    .kind
                    .iter()
                    .filter(|(_, k)| **k == FileKind::File)
                    .map(|(i, _)| *i)
                    .collect();
                v.sort();
                v
            };
            if files.is_empty() {
                continue;
            }
            let f = files[rng.gen_range(0..files.len())];
            (
                Request::SetAttr {
                    ino: f,
                    set: SetAttr {
                        size_bytes: Some(rng.gen_range(0..1_000_000)),
                        ..Default::default()
                    },
                },
                Ok(()),
            )
        };
        let got = c.run(&s, req.clone());
        let want = match expect {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        let got_name = match &got {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e:?}")
                .split(['(', ' '])
                .next()
                .unwrap()
                .to_string(),
        };
        assert_eq!(
            got_name,
            want,
            "seed {seed} step {step}: {req:?} gave {}",
            kind_of(&got)
        );
        if got.is_err() {
            continue;
        }
        // Apply to the model.
        match req {
            Request::Create {
                parent, name, kind, ..
            } => {
                let a = attr(got);
                m.dirs.get_mut(&parent).unwrap().insert(name, a.ino);
                m.kind.insert(a.ino, kind);
                if kind == FileKind::Dir {
                    m.dirs.insert(a.ino, BTreeMap::new());
                    m.parent.insert(a.ino, parent);
                } else {
                    m.nlink.insert(a.ino, 1);
                    m.size.insert(a.ino, 0);
                }
            }
            Request::Unlink { parent, name } | Request::Rmdir { parent, name } => {
                let i = m.dirs.get_mut(&parent).unwrap().remove(&name).unwrap();
                m.drop_link(i);
            }
            Request::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                let s_ino = m.dirs[&parent][&name];
                let d_ino = m.dirs[&new_parent].get(&new_name).copied();
                if flags.exchange {
                    let d_ino = d_ino.unwrap();
                    m.dirs.get_mut(&parent).unwrap().insert(name, d_ino);
                    m.dirs.get_mut(&new_parent).unwrap().insert(new_name, s_ino);
                    if m.kind[&s_ino] == FileKind::Dir {
                        m.parent.insert(s_ino, new_parent);
                    }
                    if m.kind[&d_ino] == FileKind::Dir {
                        m.parent.insert(d_ino, parent);
                    }
                } else if d_ino != Some(s_ino) {
                    if let Some(d) = d_ino {
                        m.drop_link(d);
                    }
                    m.dirs.get_mut(&parent).unwrap().remove(&name);
                    m.dirs.get_mut(&new_parent).unwrap().insert(new_name, s_ino);
                    if m.kind[&s_ino] == FileKind::Dir {
                        m.parent.insert(s_ino, new_parent);
                    }
                }
            }
            Request::Link {
                ino,
                new_parent,
                new_name,
            } => {
                m.dirs.get_mut(&new_parent).unwrap().insert(new_name, ino);
                *m.nlink.get_mut(&ino).unwrap() += 1;
            }
            Request::SetAttr { ino, set } => {
                m.size.insert(ino, set.size_bytes.unwrap());
            }
            _ => {}
        }
        // Now and then: clean reopen, or a power cut (everything was acknowledged).
        if step % 97 == 96 {
            epoch += 1;
            if rng.gen_bool(0.5) {
                s.shutdown().unwrap();
                drop(s);
            } else {
                drop(s);
                disk.power_cut();
            }
            s = Store::open(dev.clone(), Epoch(epoch)).unwrap();
        }
    }
    // Compare everything.
    let mut dirs: Vec<_> = m.dirs.keys().copied().collect();
    dirs.sort();
    for d in dirs {
        let got = names(&mut c, &s, d);
        let want: BTreeMap<Vec<u8>, (InodeId, FileKind)> = m.dirs[&d]
            .iter()
            .map(|(k, v)| (k.clone(), (*v, m.kind[v])))
            .collect();
        assert_eq!(got, want, "seed {seed}: directory {d}");
        let a = attr(c.run(&s, Request::GetAttr { ino: d }));
        assert_eq!(a.nlink, m.dir_nlink(d), "seed {seed}: nlink of dir {d}");
    }
    for (ino, n) in &m.nlink {
        let a = attr(c.run(&s, Request::GetAttr { ino: *ino }));
        assert_eq!(a.nlink, *n, "seed {seed}: nlink of {ino}");
        assert_eq!(a.size_bytes, m.size[ino], "seed {seed}: size of {ino}");
    }
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    assert_eq!(
        st.total_inodes - st.free_inodes,
        m.kind.len() as u64,
        "seed {seed}: inodes in use"
    );
}

/// The namespace as paths -> (kind, size); what a crash must preserve.
type Tree = BTreeMap<String, (FileKind, u64)>;

fn walk(
    c: &mut Client,
    s: &Store,
    dir: InodeId,
    prefix: &str,
    out: &mut Tree,
    inodes: &mut BTreeSet<InodeId>,
    clusters: &mut u64,
) {
    inodes.insert(dir);
    for (name, (ino, kind)) in names(c, s, dir) {
        let a = attr(c.run(s, Request::GetAttr { ino }));
        let path = format!("{prefix}/{}", String::from_utf8(name).unwrap());
        if inodes.insert(ino) {
            *clusters += a.allocated_bytes / u64::from(s.geometry().cluster_bytes);
        }
        if kind == FileKind::Dir {
            out.insert(path.clone(), (kind, 0));
            walk(c, s, ino, &path, out, inodes, clusters);
        } else {
            out.insert(path, (kind, a.size_bytes));
        }
    }
}

/// Runs a seeded workload; returns the tree after every acknowledged op and the tree the
/// op in flight at a crash would have made.
fn crash_workload(s: &Store, c: &mut Client, seed: u64, ops: usize) -> (Tree, Option<Tree>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acked: Tree = BTreeMap::new();
    acked.insert("/lost+found".into(), (FileKind::Dir, 0));
    let cs = u64::from(s.geometry().cluster_bytes);
    let mut dirs = vec![(InodeId::ROOT, String::new())];
    for i in 0..ops {
        let (dino, dpath) = dirs[rng.gen_range(0..dirs.len())].clone();
        let name = format!("n{}", rng.gen_range(0..12));
        let path = format!("{dpath}/{name}");
        let mut next = acked.clone();
        let op = rng.gen_range(0..10);
        let r: Result<(), FsError> = match op {
            0..=3 => {
                let kind = if op == 0 {
                    FileKind::Dir
                } else {
                    FileKind::File
                };
                if acked.contains_key(&path) {
                    continue;
                }
                next.insert(path.clone(), (kind, 0));
                create(c, s, dino, &name, kind).map(|a| {
                    if kind == FileKind::Dir {
                        dirs.push((a.ino, path.clone()));
                    }
                })
            }
            4 | 5 => {
                let Some((FileKind::File, _)) = acked.get(&path) else {
                    continue;
                };
                let Ok(a) = c.run(
                    s,
                    Request::Lookup {
                        parent: dino,
                        name: name.clone().into_bytes(),
                    },
                ) else {
                    return (acked, None);
                };
                let Response::Attr(a) = a else { panic!() };
                let len = rng.gen_range(1..4) * cs;
                let off = rng.gen_range(0..6) * cs;
                if c.run(
                    s,
                    Request::Allocate {
                        ino: a.ino,
                        offset_bytes: off,
                        len_bytes: len,
                        hint_bytes: 0,
                    },
                )
                .is_err()
                {
                    return (acked, None);
                }
                let size = (off + len).max(a.size_bytes);
                next.insert(path.clone(), (FileKind::File, size));
                c.run(
                    s,
                    Request::Commit {
                        ino: a.ino,
                        written: vec![ByteRange {
                            offset_bytes: off,
                            len_bytes: len,
                        }],
                        size_bytes: size,
                    },
                )
                .map(|_| ())
            }
            6 => {
                let Some((FileKind::File, _)) = acked.get(&path) else {
                    continue;
                };
                next.remove(&path);
                c.run(
                    s,
                    Request::Unlink {
                        parent: dino,
                        name: name.clone().into_bytes(),
                    },
                )
                .map(|_| ())
            }
            7 => {
                let Some((FileKind::File, size)) = acked.get(&path).copied() else {
                    continue;
                };
                let Ok(Response::Attr(a)) = c.run(
                    s,
                    Request::Lookup {
                        parent: dino,
                        name: name.clone().into_bytes(),
                    },
                ) else {
                    return (acked, None);
                };
                let new = size / 2;
                next.insert(path.clone(), (FileKind::File, new));
                c.run(
                    s,
                    Request::SetAttr {
                        ino: a.ino,
                        set: SetAttr {
                            size_bytes: Some(new),
                            ..Default::default()
                        },
                    },
                )
                .map(|_| ())
            }
            _ => {
                // Rename a file within its directory.
                let Some((FileKind::File, size)) = acked.get(&path).copied() else {
                    continue;
                };
                let to = format!("r{i}");
                next.remove(&path);
                next.insert(format!("{dpath}/{to}"), (FileKind::File, size));
                c.run(
                    s,
                    Request::Rename {
                        parent: dino,
                        name: name.clone().into_bytes(),
                        new_parent: dino,
                        new_name: to.into_bytes(),
                        flags: RenameFlags::default(),
                    },
                )
                .map(|_| ())
            }
        };
        match r {
            Ok(()) => acked = next,
            Err(FsError::Io(_)) => return (acked, Some(next)),
            Err(e) => panic!("seed {seed} op {i}: unexpected {e}"),
        }
    }
    (acked, None)
}

fn check_after_crash(dev: Arc<dyn BlockDevice>, acked: &Tree, pending: Option<&Tree>, what: &str) {
    let s =
        Store::open(dev, Epoch(9)).unwrap_or_else(|e| panic!("{what}: open after crash: {e:?}"));
    let mut c = Client::new(2);
    let mut tree = BTreeMap::new();
    let mut inodes = BTreeSet::new();
    let mut clusters = 0;
    walk(
        &mut c,
        &s,
        InodeId::ROOT,
        "",
        &mut tree,
        &mut inodes,
        &mut clusters,
    );
    assert!(
        &tree == acked || Some(&tree) == pending,
        "{what}: tree after crash\n got {tree:?}\nwant {acked:?}\n  or {pending:?}"
    );
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    assert_eq!(
        st.total_inodes - st.free_inodes,
        inodes.len() as u64,
        "{what}: inodes leaked or lost"
    );
    assert_eq!(
        st.total_clusters - st.free_clusters,
        clusters,
        "{what}: clusters leaked or lost"
    );
}

#[test]
fn crash_at_every_write_of_a_workload() {
    for seed in [5, 11] {
        crash_sweep(seed);
    }
}

fn crash_sweep(seed: u64) {
    let o = MkfsOptions {
        journal_bytes: Some(128 << 10),
        inode_count: Some(200),
        meta_blocks: Some(256),
        ..opts(64 << 10)
    };
    let size = 12 << 20;
    let fresh_disk = || {
        let disk = Arc::new(CrashDisk::new(size));
        let dev: Arc<dyn BlockDevice> = disk.clone();
        mkfs(dev.clone(), &o, &mut |_, _| {}).unwrap();
        (disk, dev)
    };
    // Count the writes of the whole workload once.
    let (disk, dev) = fresh_disk();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    let base = disk.writes_seen();
    let (full, _) = crash_workload(&s, &mut Client::new(1), seed, 120);
    let total = disk.writes_seen() - base;
    assert!(
        s.stats().checkpoints > 0,
        "the workload must cross checkpoints"
    );
    drop(s);
    disk.power_cut();
    check_after_crash(dev, &full, None, "no crash");
    let mut points = 0;
    for n in 1..=total {
        for tear in [None, Some(1)] {
            if tear.is_some() && n % 3 != 0 {
                continue;
            }
            let (disk, dev) = fresh_disk();
            let s = Store::open(dev.clone(), Epoch(1)).unwrap();
            disk.tear_writes(tear);
            disk.crash_at(block_client::testing::CrashPoint::Write(n));
            let (acked, pending) = crash_workload(&s, &mut Client::new(1), seed, 120);
            drop(s);
            disk.power_cut();
            check_after_crash(
                dev,
                &acked,
                pending.as_ref(),
                &format!("crash at write {n} tear {tear:?}"),
            );
            points += 1;
        }
    }
    eprintln!("crash sweep seed {seed}: {total} writes, {points} crash points");
    assert!(points > 100, "only {points} crash points");
}

#[test]
fn concurrent_creates_share_journal_commits() {
    let o = MkfsOptions {
        inode_count: Some(5000),
        meta_blocks: Some(1024),
        ..opts(64 << 10)
    };
    let (dev, s) = fresh(64 << 20, &o);
    let s = Arc::new(s);
    let mut c = Client::new(1);
    let shared = create(&mut c, &s, InodeId::ROOT, "shared", FileKind::Dir).unwrap();
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(1 + t % 4);
                c.next = u64::from(t + 1) << 32;
                let own =
                    create(&mut c, &s, InodeId::ROOT, &format!("t{t}"), FileKind::Dir).unwrap();
                for i in 0..300 {
                    create(&mut c, &s, shared.ino, &format!("t{t}-{i}"), FileKind::File).unwrap();
                    create(&mut c, &s, own.ino, &format!("f{i}"), FileKind::File).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(names(&mut c, &s, shared.ino).len(), 2400);
    s.shutdown().unwrap();
    drop(s);
    let s = Store::open(dev, Epoch(2)).unwrap();
    assert_eq!(names(&mut c, &s, shared.ino).len(), 2400);
    for t in 0..8 {
        let d = attr(c.run(
            &s,
            Request::Lookup {
                parent: InodeId::ROOT,
                name: format!("t{t}").into_bytes(),
            },
        ));
        assert_eq!(names(&mut c, &s, d.ino).len(), 300);
    }
}

/// Create rate on a real file with real flushes; run by hand:
/// `cargo test --release -p metadata-server --lib create_rate -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, run by hand"]
fn create_rate_on_a_file() {
    let path = std::env::temp_dir().join(format!("csvfs-create-rate-{}", std::process::id()));
    for threads in [1u32, 16] {
        let dev: Arc<dyn BlockDevice> = Arc::new(
            block_client::FileDevice::create(&path, 1 << 30, block_client::FileOptions::default())
                .unwrap(),
        );
        let o = MkfsOptions {
            inode_count: Some(100_000),
            ..opts(1 << 20)
        };
        mkfs(dev.clone(), &o, &mut |_, _| {}).unwrap();
        let s = Arc::new(Store::open(dev, Epoch(1)).unwrap());
        let per = 4000 / threads;
        let start = std::time::Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut c = Client::new(1 + t % 16);
                    for i in 0..per {
                        create(
                            &mut c,
                            &s,
                            InodeId::ROOT,
                            &format!("{t}-{i}"),
                            FileKind::File,
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{threads} threads: {:.0} creates/s",
            f64::from(per * threads) / secs
        );
        s.shutdown().unwrap();
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn metadata_block_exhaustion_is_enospc_and_consistent() {
    let o = MkfsOptions {
        inode_count: Some(3000),
        meta_blocks: Some(12),
        ..opts(64 << 10)
    };
    let (dev, s) = fresh(32 << 20, &o);
    let mut c = Client::new(1);
    let d = create(&mut c, &s, InodeId::ROOT, "d", FileKind::Dir).unwrap();
    let mut made = 0;
    let err = loop {
        match create(
            &mut c,
            &s,
            d.ino,
            &format!("a-rather-long-file-name-to-fill-blocks-{made:05}"),
            FileKind::File,
        ) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, FsError::NoSpace), "{err:?}");
    assert!(made > 100);
    // Large xattrs need blocks too.
    let f = create(&mut c, &s, InodeId::ROOT, "x", FileKind::File);
    if let Ok(f) = f {
        let r = c.run(
            &s,
            Request::SetXattr {
                ino: f.ino,
                name: b"user.big".to_vec(),
                value: vec![1; 60_000],
                mode: XattrMode::Any,
            },
        );
        assert!(matches!(r, Err(FsError::NoSpace)), "{r:?}");
    }
    let mut tree = BTreeMap::new();
    let mut inodes = BTreeSet::new();
    let mut clusters = 0;
    walk(
        &mut c,
        &s,
        InodeId::ROOT,
        "",
        &mut tree,
        &mut inodes,
        &mut clusters,
    );
    let before = tree.clone();
    drop(s);
    let s = Store::open(dev, Epoch(2)).unwrap();
    let mut tree = BTreeMap::new();
    let mut inodes = BTreeSet::new();
    walk(
        &mut c,
        &s,
        InodeId::ROOT,
        "",
        &mut tree,
        &mut inodes,
        &mut clusters,
    );
    assert_eq!(tree, before);
    let Response::StatFs(st) = c.run(&s, Request::StatFs).unwrap() else {
        panic!()
    };
    assert_eq!(st.total_inodes - st.free_inodes, inodes.len() as u64);
    // Removing entries makes room again.
    for i in 0..made {
        c.run(
            &s,
            Request::Unlink {
                parent: d.ino,
                name: format!("a-rather-long-file-name-to-fill-blocks-{i:05}").into_bytes(),
            },
        )
        .unwrap();
    }
    c.run(
        &s,
        Request::Rmdir {
            parent: InodeId::ROOT,
            name: b"d".to_vec(),
        },
    )
    .unwrap();
    create(&mut c, &s, InodeId::ROOT, "after", FileKind::Dir).unwrap();
}

#[test]
fn readdir_cookies_are_stable_across_changes() {
    let o = MkfsOptions {
        inode_count: Some(1000),
        ..opts(64 << 10)
    };
    let (_d, s) = fresh(64 << 20, &o);
    let mut c = Client::new(1);
    let d = create(&mut c, &s, InodeId::ROOT, "d", FileKind::Dir).unwrap();
    for i in 0..200 {
        create(&mut c, &s, d.ino, &format!("e{i}"), FileKind::File).unwrap();
    }
    let page = |c: &mut Client, after: u64| -> Vec<(Vec<u8>, u64)> {
        match c
            .run(
                &s,
                Request::ReadDir {
                    ino: d.ino,
                    after_cookie: after,
                    max_entries: 50,
                    plus: false,
                },
            )
            .unwrap()
        {
            Response::Entries(es) => es.into_iter().map(|(e, _)| (e.name, e.cookie)).collect(),
            other => panic!("{other:?}"),
        }
    };
    let first = page(&mut c, 0);
    assert_eq!(first.len(), 50);
    assert_eq!(first[0].0, b".");
    assert_eq!(first[1].0, b"..");
    let seen: BTreeSet<Vec<u8>> = first.iter().map(|(n, _)| n.clone()).collect();
    // Change the directory between pages: many inserts force block splits; remove some
    // names not yet listed.
    for i in 200..600 {
        create(&mut c, &s, d.ino, &format!("e{i}"), FileKind::File).unwrap();
    }
    let mut removed = BTreeSet::new();
    for i in (100..200).step_by(2) {
        let n = format!("e{i}").into_bytes();
        if !seen.contains(&n) {
            c.run(
                &s,
                Request::Unlink {
                    parent: d.ino,
                    name: n.clone(),
                },
            )
            .unwrap();
            removed.insert(n);
        }
    }
    let mut after = first.last().unwrap().1;
    let mut rest = Vec::new();
    loop {
        let p = page(&mut c, after);
        if p.is_empty() {
            break;
        }
        after = p.last().unwrap().1;
        rest.extend(p.into_iter().map(|(n, _)| n));
    }
    let mut all: Vec<Vec<u8>> = seen.iter().cloned().collect();
    all.extend(rest.iter().cloned());
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(unique.len(), all.len(), "no entry is returned twice");
    for i in 0..200 {
        let n = format!("e{i}").into_bytes();
        assert!(
            unique.contains(&n) || removed.contains(&n),
            "entry e{i} present before the listing was missed"
        );
    }
    for n in &removed {
        assert!(!rest.contains(n), "a removed entry was listed");
    }
}

fn create_open(name: &str, exclusive: bool) -> Request {
    Request::CreateOpen {
        parent: InodeId::ROOT,
        name: name.as_bytes().to_vec(),
        perm: 0o640,
        exclusive,
        write: true,
    }
}

fn mapped_attr(r: Result<Response, FsError>) -> Attr {
    match r.unwrap() {
        Response::Mapped { attr, extents } => {
            assert!(extents.is_empty(), "a new file has no extents");
            attr
        }
        other => panic!("expected Mapped, got {other:?}"),
    }
}

fn free_inodes(c: &mut Client, s: &Store) -> u64 {
    let Response::StatFs(st) = c.run(s, Request::StatFs).unwrap() else {
        panic!("statfs")
    };
    st.free_inodes
}

/// With a node of protocol version 3, whose open counts are journaled with the create.
#[test]
fn create_open_creates_and_opens_in_one_durable_transaction() {
    let disk = Arc::new(CrashDisk::new(32 << 20));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    mkfs(dev.clone(), &opts(64 << 10), &mut |_, _| {}).unwrap();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    let mut a = Client::legacy(1);
    let free0 = free_inodes(&mut a, &s);
    let t0 = s.stats().transactions;
    let f = mapped_attr(a.run(&s, create_open("f", true)));
    assert_eq!(
        s.stats().transactions,
        t0 + 1,
        "create and open are one transaction"
    );
    assert_eq!(
        (f.kind, f.perm, f.uid, f.nlink),
        (FileKind::File, 0o640, 1000, 1)
    );
    assert_eq!(free_inodes(&mut a, &s), free0 - 1);
    // O_EXCL on an existing name fails and changes nothing.
    assert!(matches!(
        a.run(&s, create_open("f", true)),
        Err(FsError::Exists)
    ));
    // Without O_EXCL the existing file is opened again (no new inode).
    let again = mapped_attr(a.run(&s, create_open("f", false)));
    assert_eq!((again.ino, again.generation), (f.ino, f.generation));
    assert_eq!(free_inodes(&mut a, &s), free0 - 1);
    // A directory under that name is not a file to open.
    create(&mut a, &s, InodeId::ROOT, "d", FileKind::Dir).unwrap();
    assert!(matches!(
        a.run(&s, create_open("d", false)),
        Err(FsError::Exists)
    ));
    // The opens are journaled: after a power cut they hold the unlinked file.
    a.run(
        &s,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
        },
    )
    .unwrap();
    drop(s);
    disk.power_cut();
    let s = Store::open(dev.clone(), Epoch(2)).unwrap();
    assert_eq!(s.nodes_holding_opens(), vec![NodeId(1)]);
    assert!(matches!(
        a.run(&s, Request::GetAttr { ino: f.ino }),
        Ok(Response::Attr(_))
    ));
    a.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert!(
        a.run(&s, Request::GetAttr { ino: f.ino }).is_ok(),
        "the second open still holds it"
    );
    a.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert!(matches!(
        a.run(&s, Request::GetAttr { ino: f.ino }),
        Err(FsError::Stale)
    ));
    assert!(s.nodes_holding_opens().is_empty());
}

#[test]
fn create_open_retry_runs_once() {
    let (_d, s) = fresh(64 << 20, &opts(64 << 10));
    let mut a = Client::new(1);
    let free0 = free_inodes(&mut a, &s);
    let caller = a.caller();
    let req = create_open("r", true);
    let first = s.execute(&caller, &req);
    let f = mapped_attr(first.clone());
    let t = s.stats().transactions;
    // The retry (same node, same request id) gets the same answer, not EEXIST, and does
    // not create or open anything again.
    let retry = s.execute(&caller, &req);
    assert_eq!(retry, first);
    assert_eq!(s.stats().transactions, t);
    assert_eq!(free_inodes(&mut a, &s), free0 - 1);
    a.run(
        &s,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"r".to_vec(),
        },
    )
    .unwrap();
    a.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(
        free_inodes(&mut a, &s),
        free0,
        "one release frees it: the retry did not open it twice"
    );
    // A new request (new id) for the same name is a new create.
    assert!(matches!(
        a.run(&s, create_open("r", true)),
        Ok(Response::Mapped { .. })
    ));
}

/// A volume on a [`FlakyDisk`] with one file created (the root directory is cached and the
/// store has read a batch of inode slots); the cache of known slot generations is then
/// emptied so the next create must read its slot.
fn flaky_store_with_cold_slots() -> (
    block_client::testing::FlakyHandle,
    Arc<MemDevice>,
    Store,
    Client,
) {
    use block_client::testing::FlakyDisk;
    let mem = Arc::new(MemDevice::new(64 << 20));
    let flaky = FlakyDisk::new(mem.clone());
    let handle = flaky.handle();
    let dev: Arc<dyn BlockDevice> = Arc::new(flaky);
    mkfs(dev.clone(), &opts(64 << 10), &mut |_, _| {}).unwrap();
    let s = Store::open(dev, Epoch(1)).unwrap();
    let mut a = Client::new(1);
    create(&mut a, &s, InodeId::ROOT, "first", FileKind::File).unwrap();
    s.inner.lock().meta.slot_gens.clear();
    (handle, mem, s, a)
}

/// The slot the allocator hands out next.
fn next_slot(s: &Store) -> InodeId {
    let g = s.inner.lock();
    let m = &g.meta;
    (0..m.g.inode_count)
        .map(|i| (i + m.inode_map.rotor) % m.g.inode_count)
        .find(|i| *i >= 1 && !m.inode_map.get(*i))
        .map(InodeId)
        .unwrap()
}

#[test]
fn create_fails_with_eio_when_the_slot_cannot_be_read() {
    use block_client::testing::{FailKind, OpClass};
    let (handle, _mem, s, mut a) = flaky_store_with_cold_slots();
    let free0 = free_inodes(&mut a, &s);
    let reads0 = s.stats().device_reads;
    handle.fail_nth(OpClass::Read, 1, FailKind::Device(EIO));
    let r = create(&mut a, &s, InodeId::ROOT, "x", FileKind::File);
    assert!(matches!(r, Err(FsError::Io(_))), "{r:?}");
    assert!(s.stats().device_reads > reads0, "the slot was read");
    // Nothing of the failed create is left: no name, no allocated slot, store usable.
    assert!(!names(&mut a, &s, InodeId::ROOT).contains_key(b"x".as_slice()));
    assert_eq!(free_inodes(&mut a, &s), free0);
    let x = create(&mut a, &s, InodeId::ROOT, "x", FileKind::File).unwrap();
    assert_eq!(free_inodes(&mut a, &s), free0 - 1);
    assert_eq!(x.generation, 1, "a never used slot starts at generation 1");
}

/// errno EIO.
const EIO: i32 = 5;

#[test]
fn create_fails_with_eio_on_a_corrupt_slot_and_never_guesses_a_generation() {
    let (_handle, mem, s, mut a) = flaky_store_with_cold_slots();
    let slot = next_slot(&s);
    let at = s.geometry().inode_offset(slot);
    mem.write_at(&[0xa5; 1024], at, WriteFlags::default())
        .unwrap();
    let free0 = free_inodes(&mut a, &s);
    for _ in 0..2 {
        let r = create(&mut a, &s, InodeId::ROOT, "y", FileKind::File);
        assert!(matches!(r, Err(FsError::Corrupt(_))), "{r:?}");
        assert_eq!(free_inodes(&mut a, &s), free0);
        assert!(!names(&mut a, &s, InodeId::ROOT).contains_key(b"y".as_slice()));
    }
    // Once the slot holds a freed inode of generation 7 again, the create takes 8.
    mem.write_at(&Inode::encode_free(slot, 7), at, WriteFlags::default())
        .unwrap();
    let y = create(&mut a, &s, InodeId::ROOT, "y", FileKind::File).unwrap();
    assert_eq!((y.ino, y.generation), (slot, 8));
}

#[test]
fn slot_generations_are_read_in_batches_and_kept_for_freed_slots() {
    let (_handle, _mem, s, mut a) = flaky_store_with_cold_slots();
    let mut seen = BTreeSet::new();
    let reads = s.stats().device_reads;
    let mut made = Vec::new();
    for i in 0..200 {
        let f = create(&mut a, &s, InodeId::ROOT, &format!("g{i}"), FileKind::File).unwrap();
        assert!(seen.insert((f.ino, f.generation)), "{f:?} repeats");
        made.push(f);
    }
    let batch_reads = s.stats().device_reads - reads;
    assert!(
        batch_reads <= 200 / 64 + 2,
        "{batch_reads} reads for 200 creates"
    );
    // Free some, then make the allocator come back to them: their generations are known
    // (freeing kept them), so reusing them reads nothing and takes generation + 1.
    for f in &made[..10] {
        let i = made.iter().position(|m| m.ino == f.ino).unwrap();
        a.run(
            &s,
            Request::Unlink {
                parent: InodeId::ROOT,
                name: format!("g{i}").into_bytes(),
            },
        )
        .unwrap();
    }
    s.inner.lock().meta.inode_map.rotor = made[0].ino.0;
    let reads = s.stats().device_reads;
    for (k, old) in made[..10].iter().enumerate() {
        let f = create(&mut a, &s, InodeId::ROOT, &format!("h{k}"), FileKind::File).unwrap();
        assert_eq!((f.ino, f.generation), (old.ino, old.generation + 1));
        assert!(seen.insert((f.ino, f.generation)), "{f:?} repeats");
    }
    assert_eq!(s.stats().device_reads, reads, "reused slots read nothing");
    // After a restart nothing is cached: the slots are read again and still give the
    // same next generations.
    let dev = s.dev.clone();
    s.shutdown().unwrap();
    drop(s);
    let s = Store::open(dev, Epoch(2)).unwrap();
    let mut a = Client::new(1);
    for f in &made[..10] {
        a.run(
            &s,
            Request::Unlink {
                parent: InodeId::ROOT,
                name: format!("h{}", made.iter().position(|m| m.ino == f.ino).unwrap())
                    .into_bytes(),
            },
        )
        .unwrap();
    }
    s.inner.lock().meta.slot_gens.clear();
    s.inner.lock().meta.inode_map.rotor = made[0].ino.0;
    for old in &made[..10] {
        let f = create(&mut a, &s, InodeId::ROOT, "again", FileKind::File).unwrap();
        assert_eq!((f.ino, f.generation), (old.ino, old.generation + 2));
        a.run(
            &s,
            Request::Unlink {
                parent: InodeId::ROOT,
                name: b"again".to_vec(),
            },
        )
        .unwrap();
    }
}

#[test]
fn reads_are_answered_in_place_only_when_nothing_can_block() {
    let (dev, s) = fresh(64 << 20, &opts(64 << 10));
    let mut a = Client::new(1);
    let f = create(&mut a, &s, InodeId::ROOT, "f", FileKind::File).unwrap();
    let caller = a.caller();
    let getattr = Request::GetAttr { ino: f.ino };
    assert!(matches!(
        s.try_execute_read(&caller, &getattr),
        Some(Ok(Response::Attr(x))) if x.ino == f.ino
    ));
    assert!(matches!(
        s.try_execute_read(
            &caller,
            &Request::Lookup {
                parent: InodeId::ROOT,
                name: b"none".to_vec()
            }
        ),
        Some(Err(FsError::NotFound))
    ));
    // Mutations, Fsync and a busy store are left to `execute`.
    assert!(s
        .try_execute_read(&caller, &create_open("g", true))
        .is_none());
    assert!(s
        .try_execute_read(&caller, &Request::Fsync { ino: f.ino })
        .is_none());
    {
        let _busy = s.inner.lock();
        assert!(s.try_execute_read(&caller, &getattr).is_none());
    }
    // After a restart the inode is not cached: no device read in place.
    s.shutdown().unwrap();
    drop(s);
    let s = Store::open(dev, Epoch(2)).unwrap();
    let reads = s.stats().device_reads;
    assert!(s.try_execute_read(&caller, &getattr).is_none());
    assert_eq!(s.stats().device_reads, reads);
    assert!(matches!(a.run(&s, getattr.clone()), Ok(Response::Attr(_))));
    assert!(matches!(
        s.try_execute_read(&caller, &getattr),
        Some(Ok(Response::Attr(_)))
    ));
}

#[test]
fn checkpoint_writes_adjacent_pieces_together() {
    let disk = Arc::new(CrashDisk::new(64 << 20));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    mkfs(dev.clone(), &opts(64 << 10), &mut |_, _| {}).unwrap();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    let mut a = Client::new(1);
    let mut made = BTreeMap::new();
    for i in 0..100 {
        let f = create(&mut a, &s, InodeId::ROOT, &format!("c{i}"), FileKind::File).unwrap();
        made.insert(format!("c{i}").into_bytes(), (f.ino, FileKind::File));
    }
    let pieces = s.inner.lock().meta.overlay.len() as u64;
    let writes = disk.writes_seen();
    s.checkpoint().unwrap();
    let home_writes = disk.writes_seen() - writes;
    assert!(
        home_writes * 4 < pieces,
        "{home_writes} writes for {pieces} pieces"
    );
    drop(s);
    disk.power_cut();
    let s = Store::open(dev, Epoch(2)).unwrap();
    let mut seen = names(&mut a, &s, InodeId::ROOT);
    seen.remove(b"lost+found".as_slice());
    assert_eq!(seen, made);
    for (ino, _) in made.values() {
        assert!(matches!(
            a.run(&s, Request::GetAttr { ino: *ino }),
            Ok(Response::Attr(x)) if x.ino == *ino
        ));
    }
}

/// A fresh 32 MiB volume on a disk that can lose unflushed writes, with its store (epoch 1).
fn crash_volume() -> (Arc<CrashDisk>, Arc<dyn BlockDevice>, Store) {
    let disk = Arc::new(CrashDisk::new(32 << 20));
    let dev: Arc<dyn BlockDevice> = disk.clone();
    mkfs(dev.clone(), &opts(64 << 10), &mut |_, _| {}).unwrap();
    let s = Store::open(dev.clone(), Epoch(1)).unwrap();
    (disk, dev, s)
}

fn unlink_root(c: &mut Client, s: &Store, name: &str) {
    c.run(
        s,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: name.as_bytes().to_vec(),
        },
    )
    .unwrap();
}

fn used_clusters(c: &mut Client, s: &Store) -> u64 {
    let Response::StatFs(st) = c.run(s, Request::StatFs).unwrap() else {
        panic!("statfs")
    };
    st.total_clusters - st.free_clusters
}

fn allocate_all(c: &mut Client, s: &Store, ino: InodeId, len_bytes: u64) {
    c.run(
        s,
        Request::Allocate {
            ino,
            offset_bytes: 0,
            len_bytes,
            hint_bytes: 0,
        },
    )
    .unwrap();
}

fn open_req(ino: InodeId) -> Request {
    Request::Open { ino, write: true }
}

#[test]
fn open_counts_of_current_nodes_are_kept_in_memory_and_still_hold_unlinked_files() {
    let (_d, s) = fresh(32 << 20, &opts(64 << 10));
    let (mut a, mut b) = (Client::new(1), Client::new(2));
    let f = create(&mut a, &s, InodeId::ROOT, "f", FileKind::File).unwrap();
    allocate_all(&mut a, &s, f.ino, 4 << 16);
    let t0 = s.stats().transactions;
    a.run(&s, open_req(f.ino)).unwrap();
    b.run(&s, open_req(f.ino)).unwrap();
    b.run(&s, open_req(f.ino)).unwrap();
    b.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(
        s.stats().transactions,
        t0,
        "opens and releases journal nothing"
    );
    unlink_root(&mut a, &s, "f");
    assert_eq!(used_clusters(&mut a, &s), 4, "open on nodes 1 and 2");
    a.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 4, "node 2 still has it open");
    // A resend of a release that ran (same request id) counts once.
    let last = b.caller();
    s.execute(&last, &Request::Release { ino: f.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0, "the last close frees it");
    s.execute(&last, &Request::Release { ino: f.ino }).unwrap();
    assert!(matches!(
        a.run(&s, Request::GetAttr { ino: f.ino }),
        Err(FsError::Stale)
    ));
    // A resent open counts once too: one release then frees the file.
    let g = create(&mut a, &s, InodeId::ROOT, "g", FileKind::File).unwrap();
    allocate_all(&mut a, &s, g.ino, 2 << 16);
    let open = a.caller();
    s.execute(&open, &open_req(g.ino)).unwrap();
    s.execute(&open, &open_req(g.ino)).unwrap();
    unlink_root(&mut a, &s, "g");
    assert_eq!(used_clusters(&mut a, &s), 2);
    a.run(&s, Request::Release { ino: g.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0);
}

#[test]
fn after_a_takeover_unlinked_files_wait_for_the_nodes_to_reannounce_their_opens() {
    let (disk, dev, s) = crash_volume();
    let (mut a, mut b) = (Client::new(1), Client::new(2));
    let mut files = Vec::new();
    for name in ["kept", "dropped", "later"] {
        let f = create(&mut a, &s, InodeId::ROOT, name, FileKind::File).unwrap();
        allocate_all(&mut a, &s, f.ino, 2 << 16);
        files.push(f.ino);
    }
    let [kept, dropped, later] = files[..] else {
        panic!()
    };
    b.run(&s, open_req(kept)).unwrap();
    b.run(&s, open_req(kept)).unwrap();
    a.run(&s, open_req(dropped)).unwrap();
    b.run(&s, open_req(later)).unwrap();
    for name in ["kept", "dropped"] {
        unlink_root(&mut a, &s, name);
    }
    assert_eq!(used_clusters(&mut a, &s), 6);
    // The coordinator dies; its counts die with it. The new one holds every orphan.
    drop(s);
    disk.power_cut();
    let s = Store::open(dev.clone(), Epoch(2)).unwrap();
    s.hold_orphans();
    assert_eq!(used_clusters(&mut a, &s), 6);
    // Unlinked during the grace with nothing counted yet: held too.
    unlink_root(&mut a, &s, "later");
    assert_eq!(used_clusters(&mut a, &s), 6);
    // Node 2 re-announces; a resend meant for an older epoch counts nothing.
    let stale = Request::Reopen {
        epoch: Epoch(1),
        opens: vec![(kept, 5)],
    };
    b.run(&s, stale).unwrap();
    let reopen = Request::Reopen {
        epoch: Epoch(2),
        opens: vec![(kept, 2), (later, 1), (InodeId(999_999), 1)],
    };
    let caller = b.caller();
    s.execute(&caller, &reopen).unwrap();
    s.execute(&caller, &reopen).unwrap();
    // A second re-announcement (another request id) counts nothing either.
    b.run(&s, reopen).unwrap();
    // Node 1 never re-announces `dropped` (it went away): the grace ends and frees it.
    assert_eq!(s.reap_orphans().unwrap(), 1);
    assert_eq!(used_clusters(&mut a, &s), 4);
    b.run(&s, Request::Release { ino: kept }).unwrap();
    b.run(&s, Request::Release { ino: later }).unwrap();
    assert_eq!(
        used_clusters(&mut a, &s),
        2,
        "kept: one of two handles left"
    );
    b.run(&s, Request::Release { ino: kept }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0);
    drop(s);
    disk.power_cut();
    let s = Store::open(dev, Epoch(3)).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0);
}

#[test]
fn a_create_open_answered_from_the_duplicate_cache_after_a_takeover_is_counted_once() {
    let (disk, dev, s) = crash_volume();
    let mut a = Client::new(1);
    let caller = a.caller();
    let req = create_open("c", true);
    let f = mapped_attr(s.execute(&caller, &req));
    allocate_all(&mut a, &s, f.ino, 2 << 16);
    drop(s);
    disk.power_cut();
    let s = Store::open(dev, Epoch(2)).unwrap();
    s.hold_orphans();
    // The answer was lost: the node resends the create twice (two reconnects).
    assert_eq!(mapped_attr(s.execute(&caller, &req)).ino, f.ino);
    assert_eq!(mapped_attr(s.execute(&caller, &req)).ino, f.ino);
    unlink_root(&mut a, &s, "c");
    s.reap_orphans().unwrap();
    assert_eq!(
        used_clusters(&mut a, &s),
        2,
        "the resent create counted its open"
    );
    a.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0, "once");
}

#[test]
fn open_counts_answered_without_blocking_count_like_the_blocking_path() {
    let (_d, s) = fresh(32 << 20, &opts(64 << 10));
    let (mut a, mut b) = (Client::new(1), Client::new(2));
    let v = crate::proto::PROTOCOL_VERSION;
    let f = create(&mut a, &s, InodeId::ROOT, "f", FileKind::File).unwrap();
    allocate_all(&mut a, &s, f.ino, 2 << 16);
    let open = b.caller();
    assert!(matches!(
        s.try_execute_now(&open, &open_req(f.ino), v),
        Some(Ok(Response::Mapped { .. }))
    ));
    // A resend goes to the blocking path, which answers without counting again.
    assert!(s.try_execute_now(&open, &open_req(f.ino), v).is_none());
    s.execute(&open, &open_req(f.ino)).unwrap();
    let second = b.caller();
    assert!(s.try_execute_now(&second, &open_req(f.ino), v).is_some());
    let release = b.caller();
    assert_eq!(
        s.try_execute_now(&release, &Request::Release { ino: f.ino }, v),
        Some(Ok(Response::Done))
    );
    // Nodes before version 4 and requests that would free something are not answered here.
    let old = b.caller();
    assert!(s
        .try_execute_now(&old, &Request::Release { ino: f.ino }, 3)
        .is_none());
    unlink_root(&mut a, &s, "f");
    assert_eq!(used_clusters(&mut a, &s), 2, "one handle of node 2 left");
    let last = b.caller();
    assert!(s
        .try_execute_now(&last, &Request::Release { ino: f.ino }, v)
        .is_none());
    s.execute(&last, &Request::Release { ino: f.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), 0);
}

#[test]
fn open_counts_survive_the_rollback_of_a_failed_request() {
    let (_d, s) = fresh(32 << 20, &opts(64 << 10));
    let (mut a, mut b) = (Client::new(1), Client::new(2));
    let f = create(&mut a, &s, InodeId::ROOT, "f", FileKind::File).unwrap();
    allocate_all(&mut a, &s, f.ino, 2 << 16);
    b.run(&s, open_req(f.ino)).unwrap();
    unlink_root(&mut a, &s, "f");
    let used = used_clusters(&mut a, &s);
    // What a request that fails after changing state does: reload from disk and overlay.
    s.rollback(&mut s.inner.lock());
    assert_eq!(used_clusters(&mut a, &s), used);
    // Node 2's open still counts: its release frees the unlinked file.
    b.run(&s, Request::Release { ino: f.ino }).unwrap();
    assert_eq!(used_clusters(&mut a, &s), used - 2);
}
