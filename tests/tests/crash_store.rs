//! Crash consistency of the metadata store on a crash device: a seeded random workload
//! (create, mkdir, rename, unlink, rmdir, link, allocate + commit, truncate, setattr)
//! runs through `Store` on a `CrashDisk`; power is cut at the Nth device write, for every
//! N over the run, with and without torn writes. After each cut:
//!
//! - fsck (read-only, replaying the journal in memory) finds nothing;
//! - the reopened store shows exactly the acknowledged operations, plus at most the one
//!   operation that was in flight, applied whole (never half);
//! - fsck finds nothing after the store's own recovery either.
//!
//! `CSVFS_CRASH_LONG=1` runs more seeds and longer workloads (for the benchmark machine).
#![allow(clippy::tests_outside_test_module)]

use std::collections::BTreeMap;
use std::sync::Arc;

use block_client::testing::{CrashDisk, CrashPoint};
use block_client::BlockDevice;
use csvfs_tools::fsck::{self, FsckOptions, Mode};
use metadata_server::format::{mkfs, MkfsOptions};
use metadata_server::proto::{ByteRange, Caller, Request, Response};
use metadata_server::store::Store;
use metadata_server::types::{
    Epoch, FileKind, FsError, InodeId, NodeId, RenameFlags, RequestId, SetAttr, VolumeId,
};
use metadata_server::MetadataStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 24 << 20;
const CLUSTER: u64 = 64 << 10;

/// What one path is in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: FileKind,
    /// Identity of the inode (hard links share it).
    obj: u64,
}

/// Attributes of one inode in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Obj {
    size: u64,
    perm: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    paths: BTreeMap<String, Node>,
    objs: BTreeMap<u64, Obj>,
    next_obj: u64,
}

/// The state as compared: path -> (kind, size, perm, nlink, link group).
type View = BTreeMap<String, (FileKind, u64, u32, u32, String)>;

impl Model {
    fn view(&self) -> View {
        let mut first: BTreeMap<u64, String> = BTreeMap::new();
        let mut links: BTreeMap<u64, u32> = BTreeMap::new();
        for (p, n) in &self.paths {
            first.entry(n.obj).or_insert_with(|| p.clone());
            *links.entry(n.obj).or_insert(0) += 1;
        }
        self.paths
            .iter()
            .map(|(p, n)| {
                let o = &self.objs[&n.obj];
                let nlink = if n.kind == FileKind::Dir {
                    let subdirs = self
                        .paths
                        .iter()
                        .filter(|(q, m)| m.kind == FileKind::Dir && parent_of(q) == p.as_str())
                        .count();
                    2 + u32::try_from(subdirs).expect("few directories")
                } else {
                    links[&n.obj]
                };
                let size = if n.kind == FileKind::Dir { 0 } else { o.size };
                (
                    p.clone(),
                    (n.kind, size, o.perm, nlink, first[&n.obj].clone()),
                )
            })
            .collect()
    }

    fn dirs(&self) -> Vec<String> {
        let mut v = vec![String::new()];
        v.extend(
            self.paths
                .iter()
                .filter(|(_, n)| n.kind == FileKind::Dir)
                .map(|(p, _)| p.clone()),
        );
        v
    }

    fn children(&self, dir: &str) -> usize {
        self.paths.keys().filter(|p| parent_of(p) == dir).count()
    }
}

fn parent_of(p: &str) -> &str {
    p.rfind('/').map_or("", |i| &p[..i])
}

fn name_of(p: &str) -> &str {
    p.rfind('/').map_or(p, |i| &p[i + 1..])
}

struct Client {
    next: u64,
}

impl Client {
    fn caller(&mut self) -> Caller {
        self.next += 1;
        Caller {
            node: NodeId(1),
            request: RequestId(self.next),
            uid: 0,
            gid: 0,
        }
    }
}

/// Looks a path up in the store.
fn lookup(s: &Store, c: &mut Client, path: &str) -> Result<InodeId, FsError> {
    let mut ino = InodeId::ROOT;
    if path.is_empty() {
        return Ok(ino);
    }
    for part in path.split('/') {
        let r = s.execute(
            &c.caller(),
            &Request::Lookup {
                parent: ino,
                name: part.as_bytes().to_vec(),
            },
        )?;
        match r {
            Response::Attr(a) => ino = a.ino,
            other => panic!("lookup answered {other:?}"),
        }
    }
    Ok(ino)
}

/// Reads the whole tree (except lost+found) from the store.
fn read_view(s: &Store) -> View {
    let mut c = Client { next: 1 << 40 };
    let mut out = View::new();
    let mut first: BTreeMap<u64, String> = BTreeMap::new();
    let mut todo = vec![(String::new(), InodeId::ROOT)];
    while let Some((path, ino)) = todo.pop() {
        let mut after = 0;
        loop {
            let r = s
                .execute(
                    &c.caller(),
                    &Request::ReadDir {
                        ino,
                        after_cookie: after,
                        max_entries: 1000,
                        plus: true,
                    },
                )
                .expect("readdir");
            let Response::Entries(list) = r else {
                panic!("readdir answered {r:?}")
            };
            if list.is_empty() {
                break;
            }
            for (e, a) in list {
                after = e.cookie;
                if e.name == b"." || e.name == b".." || (path.is_empty() && e.name == b"lost+found")
                {
                    continue;
                }
                let a = a.expect("readdirplus attributes");
                let name = String::from_utf8(e.name).expect("utf-8 names");
                let p = if path.is_empty() {
                    name
                } else {
                    format!("{path}/{name}")
                };
                let group = first.entry(a.ino.0).or_insert_with(|| p.clone()).clone();
                let size = if a.kind == FileKind::Dir {
                    0
                } else {
                    a.size_bytes
                };
                out.insert(p.clone(), (a.kind, size, a.perm, a.nlink, group));
                if a.kind == FileKind::Dir {
                    todo.push((p, a.ino));
                }
            }
        }
    }
    // Link groups are named by the first path found; renumber by the smallest path.
    let mut groups: BTreeMap<String, String> = BTreeMap::new();
    for (p, v) in &out {
        let g = groups.entry(v.4.clone()).or_insert_with(|| p.clone());
        if p < g {
            *g = p.clone();
        }
    }
    out.into_iter()
        .map(|(p, mut v)| {
            v.4 = groups[&v.4].clone();
            (p, v)
        })
        .collect()
}

fn normalize(mut v: View) -> View {
    let mut groups: BTreeMap<String, String> = BTreeMap::new();
    for (p, x) in &v {
        let g = groups.entry(x.4.clone()).or_insert_with(|| p.clone());
        if p < g {
            *g = p.clone();
        }
    }
    for x in v.values_mut() {
        x.4 = groups[&x.4].clone();
    }
    v
}

/// One operation of the workload, decided against the model.
#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Mkdir(String),
    Unlink(String),
    Rmdir(String),
    Rename(String, String),
    Link(String, String),
    Write(String, u64, u64),
    Truncate(String, u64),
    Chmod(String, u32),
}

fn pick_op(rng: &mut StdRng, m: &Model) -> Op {
    let dirs = m.dirs();
    let files: Vec<&String> = m
        .paths
        .iter()
        .filter(|(_, n)| n.kind == FileKind::File)
        .map(|(p, _)| p)
        .collect();
    let fresh_name = |rng: &mut StdRng, dir: &str| loop {
        let n = format!("n{}", rng.gen_range(0..40));
        let p = if dir.is_empty() {
            n
        } else {
            format!("{dir}/{n}")
        };
        if !m.paths.contains_key(&p) {
            return p;
        }
    };
    loop {
        let r = rng.gen_range(0..100);
        let dir = dirs[rng.gen_range(0..dirs.len())].clone();
        match r {
            0..=19 => return Op::Create(fresh_name(rng, &dir)),
            20..=29 if dir.matches('/').count() < 3 => return Op::Mkdir(fresh_name(rng, &dir)),
            30..=39 if !files.is_empty() => {
                return Op::Unlink(files[rng.gen_range(0..files.len())].clone())
            }
            40..=44 => {
                let empty: Vec<&String> = dirs
                    .iter()
                    .filter(|d| !d.is_empty() && m.children(d) == 0)
                    .collect();
                if !empty.is_empty() {
                    return Op::Rmdir(empty[rng.gen_range(0..empty.len())].clone());
                }
            }
            45..=54 => {
                let all: Vec<&String> = m.paths.keys().collect();
                if !all.is_empty() {
                    let src = all[rng.gen_range(0..all.len())].clone();
                    let dst = fresh_name(rng, &dir);
                    // Never move a directory into itself.
                    if !(dst.starts_with(&format!("{src}/"))) && dir.matches('/').count() < 3 {
                        return Op::Rename(src, dst);
                    }
                }
            }
            55..=59 if !files.is_empty() => {
                let src = files[rng.gen_range(0..files.len())].clone();
                return Op::Link(src, fresh_name(rng, &dir));
            }
            60..=79 if !files.is_empty() => {
                let f = files[rng.gen_range(0..files.len())].clone();
                let off = rng.gen_range(0..8) * CLUSTER + rng.gen_range(0..CLUSTER);
                let len = rng.gen_range(1..3 * CLUSTER);
                return Op::Write(f, off, len);
            }
            80..=89 if !files.is_empty() => {
                let f = files[rng.gen_range(0..files.len())].clone();
                return Op::Truncate(f, rng.gen_range(0..6 * CLUSTER));
            }
            90..=99 if !m.paths.is_empty() => {
                let all: Vec<&String> = m.paths.keys().collect();
                return Op::Chmod(
                    all[rng.gen_range(0..all.len())].clone(),
                    rng.gen_range(0..0o1000),
                );
            }
            _ => {}
        }
    }
}

/// Applies `op` to the model.
fn apply(m: &mut Model, op: &Op) {
    match op {
        Op::Create(p) | Op::Mkdir(p) => {
            let kind = if matches!(op, Op::Mkdir(_)) {
                FileKind::Dir
            } else {
                FileKind::File
            };
            m.next_obj += 1;
            let perm = if kind == FileKind::Dir { 0o755 } else { 0o644 };
            m.objs.insert(m.next_obj, Obj { size: 0, perm });
            m.paths.insert(
                p.clone(),
                Node {
                    kind,
                    obj: m.next_obj,
                },
            );
        }
        Op::Unlink(p) | Op::Rmdir(p) => {
            m.paths.remove(p);
        }
        Op::Rename(src, dst) => {
            let moved: Vec<(String, Node)> = m
                .paths
                .iter()
                .filter(|(p, _)| *p == src || p.starts_with(&format!("{src}/")))
                .map(|(p, n)| (p.clone(), n.clone()))
                .collect();
            for (p, _) in &moved {
                m.paths.remove(p);
            }
            for (p, n) in moved {
                let np = format!("{dst}{}", &p[src.len()..]);
                m.paths.insert(np, n);
            }
        }
        Op::Link(src, dst) => {
            let n = m.paths[src].clone();
            m.paths.insert(dst.clone(), n);
        }
        Op::Write(p, off, len) => {
            let o = m.paths[p].obj;
            let obj = m.objs.get_mut(&o).expect("object");
            obj.size = obj.size.max(off + len);
        }
        Op::Truncate(p, size) => {
            let o = m.paths[p].obj;
            m.objs.get_mut(&o).expect("object").size = *size;
        }
        Op::Chmod(p, perm) => {
            let o = m.paths[p].obj;
            m.objs.get_mut(&o).expect("object").perm = *perm;
        }
    }
}

/// Runs `op` on the store. `Err` only for failures of the device (after a crash).
fn execute(s: &Store, c: &mut Client, op: &Op) -> Result<(), FsError> {
    let req = |c: &mut Client, r: Request| s.execute(&c.caller(), &r).map(|_| ());
    match op {
        Op::Create(p) | Op::Mkdir(p) => {
            let parent = lookup(s, c, parent_of(p))?;
            let (kind, perm) = if matches!(op, Op::Mkdir(_)) {
                (FileKind::Dir, 0o755)
            } else {
                (FileKind::File, 0o644)
            };
            req(
                c,
                Request::Create {
                    parent,
                    name: name_of(p).as_bytes().to_vec(),
                    kind,
                    perm,
                    rdev: 0,
                    exclusive: true,
                },
            )
        }
        Op::Unlink(p) | Op::Rmdir(p) => {
            let parent = lookup(s, c, parent_of(p))?;
            let name = name_of(p).as_bytes().to_vec();
            if matches!(op, Op::Rmdir(_)) {
                req(c, Request::Rmdir { parent, name })
            } else {
                req(c, Request::Unlink { parent, name })
            }
        }
        Op::Rename(src, dst) => {
            let parent = lookup(s, c, parent_of(src))?;
            let new_parent = lookup(s, c, parent_of(dst))?;
            req(
                c,
                Request::Rename {
                    parent,
                    name: name_of(src).as_bytes().to_vec(),
                    new_parent,
                    new_name: name_of(dst).as_bytes().to_vec(),
                    flags: RenameFlags::default(),
                },
            )
        }
        Op::Link(src, dst) => {
            let ino = lookup(s, c, src)?;
            let new_parent = lookup(s, c, parent_of(dst))?;
            req(
                c,
                Request::Link {
                    ino,
                    new_parent,
                    new_name: name_of(dst).as_bytes().to_vec(),
                },
            )
        }
        Op::Write(p, off, len) => {
            let ino = lookup(s, c, p)?;
            req(
                c,
                Request::Allocate {
                    ino,
                    offset_bytes: *off,
                    len_bytes: *len,
                    hint_bytes: 0,
                },
            )?;
            // The data would be written to the LUN here; then the commit.
            let start = off / CLUSTER * CLUSTER;
            let end = (off + len).div_ceil(CLUSTER) * CLUSTER;
            req(
                c,
                Request::Commit {
                    ino,
                    written: vec![ByteRange {
                        offset_bytes: start,
                        len_bytes: end - start,
                    }],
                    size_bytes: off + len,
                },
            )
        }
        Op::Truncate(p, size) => {
            let ino = lookup(s, c, p)?;
            req(
                c,
                Request::SetAttr {
                    ino,
                    set: SetAttr {
                        size_bytes: Some(*size),
                        ..SetAttr::default()
                    },
                },
            )
        }
        Op::Chmod(p, perm) => {
            let ino = lookup(s, c, p)?;
            req(
                c,
                Request::SetAttr {
                    ino,
                    set: SetAttr {
                        perm: Some(*perm),
                        ..SetAttr::default()
                    },
                },
            )
        }
    }
}

fn mkfs_image() -> Vec<u8> {
    let d = Arc::new(CrashDisk::new(SIZE));
    let o = MkfsOptions {
        cluster_bytes: u32::try_from(CLUSTER).expect("64 KiB fits"),
        journal_bytes: Some(512 << 10),
        inode_count: Some(1024),
        meta_blocks: Some(512),
        max_nodes: 4,
        drc_slots_per_node: 16,
        volume: Some(VolumeId([7; 16])),
        hash_seed: Some(99),
        ..MkfsOptions::default()
    };
    mkfs(d.clone(), &o, &mut |_, _| {}).expect("mkfs");
    d.durable_image()
}

/// What a run left behind: the model of every acknowledged operation, and the operation
/// in flight when the device failed (if any).
struct Outcome {
    acked: Model,
    in_flight: Option<Op>,
}

fn workload(d: &Arc<CrashDisk>, seed: u64, ops: u64) -> Outcome {
    let mut m = Model::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let dev: Arc<dyn BlockDevice> = d.clone();
    let Ok(s) = Store::open(dev, Epoch(1)) else {
        return Outcome {
            acked: m,
            in_flight: None,
        };
    };
    let mut c = Client { next: 0 };
    for _ in 0..ops {
        let op = pick_op(&mut rng, &m);
        match execute(&s, &mut c, &op) {
            Ok(()) => apply(&mut m, &op),
            Err(e) => {
                assert!(
                    d.is_crashed(),
                    "seed {seed}: {op:?} failed without a crash: {e}"
                );
                return Outcome {
                    acked: m,
                    in_flight: Some(op),
                };
            }
        }
    }
    Outcome {
        acked: m,
        in_flight: None,
    }
}

fn fsck_clean(d: &Arc<CrashDisk>, what: &str) {
    let r = fsck::run(
        d.clone(),
        &FsckOptions {
            mode: Mode::ReadOnly,
            force: true,
            ..FsckOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: fsck failed: {e}"));
    assert!(
        r.findings.is_empty(),
        "{what}: fsck found {:#?}",
        r.findings
    );
}

fn verify(d: &Arc<CrashDisk>, out: &Outcome, what: &str) {
    fsck_clean(d, &format!("{what}, before recovery"));
    let dev: Arc<dyn BlockDevice> = d.clone();
    let s = Store::open(dev, Epoch(2)).unwrap_or_else(|e| panic!("{what}: store open: {e}"));
    let got = read_view(&s);
    let acked = normalize(out.acked.view());
    if got != acked {
        let mut with = out.acked.clone();
        let op = out.in_flight.clone().unwrap_or_else(|| {
            panic!("{what}: state differs from the acknowledged operations:\n got {got:#?}\nwant {acked:#?}")
        });
        apply(&mut with, &op);
        let with = normalize(with.view());
        assert!(
            got == with,
            "{what}: state is neither before nor after {op:?}:\n got {got:#?}\nbefore {acked:#?}\nafter {with:#?}"
        );
    }
    s.shutdown()
        .unwrap_or_else(|e| panic!("{what}: shutdown: {e}"));
    drop(s);
    fsck_clean(d, &format!("{what}, after recovery"));
}

fn long() -> bool {
    std::env::var("CSVFS_CRASH_LONG").is_ok_and(|v| v == "1")
}

#[test]
fn power_cut_at_every_write_keeps_every_acknowledged_operation() {
    let image = mkfs_image();
    let (seeds, ops): (Vec<u64>, u64) = if long() {
        ((1..=8).collect(), 400)
    } else {
        (vec![1, 2, 3], 120)
    };
    let mut points = 0u64;
    for seed in seeds {
        // Count the writes of an uninterrupted run, and check that run too.
        let d = Arc::new(CrashDisk::from_image(image.clone()));
        let base = d.writes_seen();
        let full = workload(&d, seed, ops);
        let total = d.writes_seen() - base;
        d.power_cut();
        verify(&d, &full, &format!("seed {seed}, no crash"));
        for tear in [None, Some(1), Some(3)] {
            for n in 1..=total {
                let d = Arc::new(CrashDisk::from_image(image.clone()));
                d.tear_writes(tear);
                d.crash_at(CrashPoint::Write(n));
                let out = workload(&d, seed, ops);
                d.power_cut();
                verify(
                    &d,
                    &out,
                    &format!("seed {seed}, crash at write {n}/{total}, tear {tear:?}"),
                );
                points += 1;
            }
        }
    }
    assert!(points >= 1000, "only {points} crash points");
    eprintln!("{points} crash points verified");
}
