#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions unwrap too: a failure is the test failing.
#![allow(clippy::unwrap_used)]
//! POSIX model test: random sequences of file-system calls run on a csvfs mount and on a
//! local directory must give the same results: contents, sizes, modes, file link counts,
//! directory listings and errors (errno). Half of the calls go through a second node, so
//! the model also checks cross-node coherence.

use csvfs_tests::cluster::{ClusterSpec, TestCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const PATHS: &[&str] = &[
    "a", "b", "c", "d1", "d2", "d1/a", "d1/b", "d2/a", "d2/c", "d1/d3", "d1/d3/a", "l1",
];

/// One call and its arguments.
#[derive(Debug, Clone)]
enum Op {
    Create(usize, u32),
    Write(usize, u64, Vec<u8>),
    Append(usize, Vec<u8>),
    Truncate(usize, u64),
    Read(usize),
    Mkdir(usize, u32),
    Rmdir(usize),
    Unlink(usize),
    Rename(usize, usize),
    Link(usize, usize),
    Symlink(usize, usize),
    ReadLink(usize),
    Chmod(usize, u32),
    Stat(usize),
    List(usize),
}

/// Indices of PATHS used as files and as directories by the calls that make them (other
/// calls pick any path, so kinds still get mixed up and errors still get compared).
const FILES: &[usize] = &[0, 1, 2, 5, 6, 7, 8, 10, 11];
const DIRS: &[usize] = &[3, 4, 9];

fn random_op(rng: &mut StdRng) -> Op {
    let p = |rng: &mut StdRng| rng.gen_range(0..PATHS.len());
    let f = |rng: &mut StdRng| FILES[rng.gen_range(0..FILES.len())];
    let dd = |rng: &mut StdRng| DIRS[rng.gen_range(0..DIRS.len())];
    let data = |rng: &mut StdRng| {
        let n: u32 = rng.gen_range(0..20000);
        let b: u8 = rng.gen();
        (0..n)
            .map(|i| b.wrapping_add(u8::try_from(i % 251).unwrap_or(0)))
            .collect::<Vec<u8>>()
    };
    // Weighted towards calls that create state, so later calls have something to act on.
    match rng.gen_range(0..22) {
        0..=2 => Op::Create(f(rng), [0o644, 0o600, 0o755][rng.gen_range(0..3)]),
        3..=5 => Op::Write(f(rng), rng.gen_range(0..3_000_000), data(rng)),
        6 => Op::Append(f(rng), data(rng)),
        7 => Op::Truncate(f(rng), [0, 1, 4095, 70000, 2_000_000][rng.gen_range(0..5)]),
        8 | 9 => Op::Read(f(rng)),
        10 | 11 => Op::Mkdir(dd(rng), [0o755, 0o700][rng.gen_range(0..2)]),
        12 => Op::Rmdir(dd(rng)),
        13 => Op::Unlink(p(rng)),
        14 => Op::Rename(p(rng), p(rng)),
        15 => Op::Link(p(rng), p(rng)),
        16 => Op::Symlink(p(rng), p(rng)),
        17 => Op::ReadLink(p(rng)),
        18 => Op::Chmod(p(rng), [0o600, 0o640, 0o755, 0o444][rng.gen_range(0..4)]),
        19 | 20 => Op::Stat(p(rng)),
        _ => Op::List(p(rng)),
    }
}

/// What a call returned, in a form both file systems must agree on.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Err(i32),
    Bytes(Vec<u8>),
    Stat {
        kind: &'static str,
        perm: u32,
        size: u64,
        nlink: Option<u64>,
    },
    Names(Vec<String>),
}

fn errno(e: std::io::Error) -> Outcome {
    Outcome::Err(e.raw_os_error().unwrap_or(-1))
}

fn run(root: &Path, op: &Op) -> Outcome {
    let at = |i: usize| -> PathBuf { root.join(PATHS[i]) };
    let r: std::io::Result<Outcome> = (|| {
        Ok(match op {
            Op::Create(i, mode) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(*mode)
                    .open(at(*i))?;
                Outcome::Done
            }
            Op::Write(i, off, d) => {
                let f = OpenOptions::new().write(true).open(at(*i))?;
                std::os::unix::fs::FileExt::write_all_at(&f, d, *off)?;
                Outcome::Done
            }
            Op::Append(i, d) => {
                let mut f = OpenOptions::new().append(true).open(at(*i))?;
                f.write_all(d)?;
                Outcome::Done
            }
            Op::Truncate(i, n) => {
                OpenOptions::new().write(true).open(at(*i))?.set_len(*n)?;
                Outcome::Done
            }
            Op::Read(i) => {
                let mut v = Vec::new();
                fs::File::open(at(*i))?.read_to_end(&mut v)?;
                Outcome::Bytes(v)
            }
            Op::Mkdir(i, mode) => {
                fs::DirBuilder::new().mode(*mode).create(at(*i))?;
                Outcome::Done
            }
            Op::Rmdir(i) => {
                fs::remove_dir(at(*i))?;
                Outcome::Done
            }
            Op::Unlink(i) => {
                fs::remove_file(at(*i))?;
                Outcome::Done
            }
            Op::Rename(i, j) => {
                fs::rename(at(*i), at(*j))?;
                Outcome::Done
            }
            Op::Link(i, j) => {
                fs::hard_link(at(*i), at(*j))?;
                Outcome::Done
            }
            Op::Symlink(i, j) => {
                std::os::unix::fs::symlink(PATHS[*i], at(*j))?;
                Outcome::Done
            }
            Op::ReadLink(i) => {
                Outcome::Bytes(fs::read_link(at(*i))?.into_os_string().into_encoded_bytes())
            }
            Op::Chmod(i, mode) => {
                let m = fs::symlink_metadata(at(*i))?;
                if m.file_type().is_symlink() {
                    return Ok(Outcome::Done);
                }
                fs::set_permissions(at(*i), fs::Permissions::from_mode(*mode))?;
                Outcome::Done
            }
            Op::Stat(i) => {
                let m = fs::symlink_metadata(at(*i))?;
                let ft = m.file_type();
                let kind = if ft.is_dir() {
                    "dir"
                } else if ft.is_symlink() {
                    "symlink"
                } else {
                    "file"
                };
                Outcome::Stat {
                    kind,
                    perm: if ft.is_symlink() {
                        0
                    } else {
                        m.mode() & 0o7777
                    },
                    // Directory sizes are file-system specific.
                    size: if ft.is_dir() { 0 } else { m.len() },
                    // Directory link counts differ between file systems (btrfs: 1).
                    nlink: (!ft.is_dir()).then_some(m.nlink()),
                }
            }
            Op::List(i) => {
                let mut v: Vec<String> = fs::read_dir(at(*i))?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<_, _>>()?;
                v.sort();
                Outcome::Names(v)
            }
        })
    })();
    r.unwrap_or_else(errno)
}

#[test]
fn posix_model_matches_a_local_directory() {
    let c = TestCluster::start(ClusterSpec::new("posix", 2));
    let seeds: Vec<u64> = match std::env::var("CSVFS_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("CSVFS_MODEL_SEED is a number")],
        Err(_) => vec![1, 2, 3, 4],
    };
    for seed in seeds {
        let local = std::env::temp_dir().join(format!("posix-model-{}-{seed}", std::process::id()));
        fs::create_dir_all(&local).unwrap();
        let remote = [
            c.mp(1).join(format!("s{seed}")),
            c.mp(2).join(format!("s{seed}")),
        ];
        fs::create_dir(&remote[0]).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut history = Vec::new();
        let mut succeeded = 0u32;
        for step in 0..400 {
            let op = random_op(&mut rng);
            let node = rng.gen_range(0..2);
            let want = run(&local, &op);
            let got = run(&remote[node], &op);
            history.push(format!("{step}: node {} {op:?}", node + 1));
            if !matches!(want, Outcome::Err(_)) {
                succeeded += 1;
            }
            if got != want {
                let tail = history[history.len().saturating_sub(15)..].join("\n");
                panic!(
                    "seed {seed} step {step}: {op:?} on node {}\n  csvfs: {got:?}\n  local: {want:?}\nlast calls:\n{tail}",
                    node + 1
                );
            }
        }
        // A model run where almost every call fails compares little.
        eprintln!("seed {seed}: {succeeded} of 400 calls succeeded");
        assert!(
            succeeded >= 120,
            "seed {seed}: only {succeeded} calls succeeded"
        );
        // Final full comparison of every path from both nodes.
        for (i, path) in PATHS.iter().enumerate() {
            let want = run(&local, &Op::Stat(i));
            for (n, r) in remote.iter().enumerate() {
                assert_eq!(
                    run(r, &Op::Stat(i)),
                    want,
                    "seed {seed}: final stat {} on node {}",
                    path,
                    n + 1
                );
                assert_eq!(
                    run(r, &Op::Read(i)),
                    run(&local, &Op::Read(i)),
                    "seed {seed}: final read {}",
                    path
                );
            }
        }
        fs::remove_dir_all(&local).unwrap();
    }
    c.finish();
}
