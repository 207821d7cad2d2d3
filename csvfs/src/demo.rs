//! `csvfs demo`: a three-node cluster on this machine, verified end to end.
//!
//! Steps (each prints what it does to stderr; any mismatch fails the demo with a
//! non-zero exit, and the cluster is torn down in every case):
//!
//! 1. a sparse LUN file, served over NBD by a `csvfs serve-lun` child
//! 2. mkfs (in-process, through NBD)
//! 3. three `csvfs mount` nodes, three mountpoints (node 1 becomes coordinator)
//! 4. one folder per VM, each made from a different node, seen from every node
//! 5. a multi-GiB sparse VM disk written from node 1, verified byte for byte from 2 and 3
//! 6. a small VM run by `hv-runner` on node 1, live-migrated to node 2 while it writes,
//!    its console and disk records checked through node 3 (`demo_vm`)
//! 7. coordinator failover: the coordinator node's process is killed (SIGKILL); a survivor
//!    takes the lease over with a higher epoch and serves (`failover_step`); the image,
//!    the VM's folder and the files written before are checked from both survivors, and
//!    both write more
//! 8. `csvfs state`
//! 9. clean unmount of every node still running
//! 10. fsck of the volume (`fsck-csvfs` next to this binary, built on first use under cargo)

use crate::cli::DemoArgs;
use crate::local::{LocalCluster, LocalError};
use crate::output::{human_bytes, print_state};
use crate::state::{read_state, StateError};
use metadata_server::format::MkfsOptions;
use metadata_server::lease::{self, CoordinatorInfo};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up or driving the cluster failed.
    #[error(transparent)]
    Cluster(#[from] LocalError),
    /// A file operation through a mount failed.
    #[error("{what} {path}")]
    Io {
        /// The step.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Data read back differs from what was written.
    #[error("{path} differs at byte {offset_bytes}: {detail}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// First differing offset.
        offset_bytes: u64,
        /// What differs.
        detail: String,
    },
    /// `csvfs state` failed.
    #[error("csvfs state")]
    State(#[from] StateError),
    /// A node did not exit cleanly.
    #[error("node {node} exited with {status} on unmount")]
    NodeExit {
        /// The node.
        node: u32,
        /// Its status.
        status: std::process::ExitStatus,
    },
    /// fsck found problems.
    #[error("fsck.csvfs reported problems ({status}):\n{output}")]
    Fsck {
        /// Its status.
        status: std::process::ExitStatus,
        /// Its output.
        output: String,
    },
    /// The coordinator lease could not be read.
    #[error("read the coordinator lease")]
    Lease(#[source] metadata_server::lease::LeaseError),
    /// The current executable could not be found.
    #[error("find the csvfs executable")]
    Exe(#[source] std::io::Error),
}

/// Nodes in the demo cluster.
const NODES: [u32; 3] = [1, 2, 3];
/// Size of each data chunk written into the image.
const CHUNK_BYTES: u64 = 4 << 20;
/// How long a node may take to mount.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// The demo's state shared by the steps.
struct Demo {
    args: DemoArgs,
    cluster: LocalCluster,
    image: Option<Image>,
}

/// The VM disk image written in step 5.
struct Image {
    /// Path relative to the volume root.
    rel: PathBuf,
    size_bytes: u64,
    /// Offsets of the data chunks.
    chunks: Vec<u64>,
}

type Step = (&'static str, fn(&mut Demo) -> Result<(), DemoError>);

/// The demo's steps, in order.
const STEPS: &[Step] = &[
    ("create a sparse LUN file and serve it over NBD", step_lun),
    ("format the volume (mkfs)", step_mkfs),
    ("mount the volume on three nodes", step_mount),
    ("create a folder per VM, one from each node", step_folders),
    ("write a sparse VM disk from node 1", step_write_image),
    (
        "verify the disk byte for byte from nodes 2 and 3",
        step_verify_image,
    ),
    ("live-migrate a running VM, node 1 to 2", |d| {
        crate::demo_vm::step(&d.cluster, say)
    }),
    (
        "kill the coordinator (kill -9): a survivor takes over",
        step_failover,
    ),
    ("show the volume state (csvfs state)", step_state),
    ("unmount every node", step_unmount),
    ("check the volume (fsck)", step_fsck),
];

fn say(msg: &str) {
    eprintln!("csvfs demo: {msg}");
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DemoError + 'a {
    move |source| DemoError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Deterministic bytes for the chunk at `offset`: an xorshift stream seeded by it.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    let mut x = offset ^ 0x9E37_79B9_7F4A_7C15;
    for word in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        word.copy_from_slice(&b[..word.len()]);
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(DemoError::Exe)?;
    let mut cluster = LocalCluster::new(exe, &std::env::temp_dir(), "csvfs-demo")?;
    cluster.remove_dir = !args.keep;
    say(&format!("working directory {}", cluster.dir.display()));
    watch_signals(cluster.emergency_cleanup(), !args.keep);
    let mut demo = Demo {
        args,
        cluster,
        image: None,
    };
    let total = STEPS.len();
    let started = Instant::now();
    for (i, (name, step)) in STEPS.iter().enumerate() {
        say(&format!("[{}/{total}] {name}", i + 1));
        let t = Instant::now();
        if let Err(e) = step(&mut demo) {
            say(&format!("step {} failed: {name}", i + 1));
            say("logs:");
            for l in demo.cluster.logs() {
                say(&format!("  {}", l.display()));
            }
            if !demo.args.keep {
                say("(run with --keep to keep the logs)");
            }
            return Err(e);
        }
        say(&format!("      done in {:.1} s", t.elapsed().as_secs_f64()));
    }
    say(&format!(
        "all {total} steps passed in {:.1} s; cleaning up",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// On SIGINT or SIGTERM, tears the cluster down and exits (status 130): the children run
/// in their own process groups and would otherwise outlive an interrupted demo.
fn watch_signals(cleanup: crate::local::EmergencyCleanup, remove_dir: bool) {
    let spawned = std::thread::Builder::new()
        .name("demo-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                say("interrupted: stopping the cluster");
                cleanup.run(remove_dir);
                std::process::exit(130);
            });
        });
    if spawned.is_err() {
        say("cannot watch for Ctrl-C; an interrupted demo may leave processes behind");
    }
}

fn step_lun(d: &mut Demo) -> Result<(), DemoError> {
    let size = d.args.lun_gib << 30;
    d.cluster.create_lun(size)?;
    say(&format!(
        "      LUN file {} ({}, sparse)",
        d.cluster.lun_path.display(),
        human_bytes(size)
    ));
    d.cluster.start_lun_server()?;
    say(&format!("      serving it at {}", d.cluster.uri));
    Ok(())
}

fn step_mkfs(d: &mut Demo) -> Result<(), DemoError> {
    let report = d.cluster.mkfs(&MkfsOptions {
        label: "demo".into(),
        ..MkfsOptions::default()
    })?;
    let sb = &report.superblock;
    say(&format!(
        "      volume {} : {} of data in {} clusters of {}",
        sb.volume,
        human_bytes(sb.geometry.data_bytes()),
        sb.geometry.cluster_count,
        human_bytes(u64::from(sb.geometry.cluster_bytes))
    ));
    Ok(())
}

fn step_mount(d: &mut Demo) -> Result<(), DemoError> {
    // Node 1 first, so it wins the coordinator lease; then the others together.
    let mp = d.cluster.mount_node(1, MOUNT_TIMEOUT)?;
    say(&format!(
        "      node 1 mounted at {} (coordinator)",
        mp.display()
    ));
    for id in &NODES[1..] {
        d.cluster.spawn_node(*id, &[])?;
    }
    for id in &NODES[1..] {
        let mp = d.cluster.wait_mounted(*id, MOUNT_TIMEOUT)?;
        say(&format!("      node {id} mounted at {}", mp.display()));
    }
    Ok(())
}

fn step_folders(d: &mut Demo) -> Result<(), DemoError> {
    for id in NODES {
        let dir = d.cluster.mountpoint(id)?.join(format!("vm{id}"));
        std::fs::create_dir(&dir).map_err(io("create folder", &dir))?;
        std::fs::write(
            dir.join("vm.toml"),
            format!("name = \"vm{id}\"\nmemory_mib = 256\ndisk = \"disk.img\"\n"),
        )
        .map_err(io("write config in", &dir))?;
        say(&format!("      node {id} created vm{id}/"));
    }
    for id in NODES {
        let root = d.cluster.mountpoint(id)?;
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .map_err(io("list", &root))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.starts_with("vm"))
            .collect();
        names.sort();
        if names != ["vm1", "vm2", "vm3"] {
            return Err(DemoError::Mismatch {
                path: root,
                offset_bytes: 0,
                detail: format!("node {id} lists {names:?}, expected [vm1, vm2, vm3]"),
            });
        }
        check_configs(&root, id, &names)?;
        say(&format!(
            "      node {id} sees vm1/ vm2/ vm3/ with their configs"
        ));
    }
    Ok(())
}

/// Checks that each VM folder's `vm.toml` under `root` names its VM, as read on node `id`.
fn check_configs(root: &Path, id: u32, vms: &[impl AsRef<str>]) -> Result<(), DemoError> {
    for vm in vms {
        let vm = vm.as_ref();
        let cfg = root.join(vm).join("vm.toml");
        let text = std::fs::read_to_string(&cfg).map_err(io("read", &cfg))?;
        if !text.contains(&format!("name = \"{vm}\"")) {
            return Err(DemoError::Mismatch {
                path: cfg,
                offset_bytes: 0,
                detail: format!("node {id} reads {text:?}"),
            });
        }
    }
    Ok(())
}

fn step_write_image(d: &mut Demo) -> Result<(), DemoError> {
    let size = d.args.image_gib << 30;
    let count = (d.args.data_mib << 20).div_ceil(CHUNK_BYTES).max(1);
    let stride = size / count;
    // Spread over the image, deliberately not cluster aligned.
    let chunks: Vec<u64> = (0..count)
        .map(|i| (i * stride + (i % 7) * 4096 + 512).min(size - CHUNK_BYTES))
        .collect();
    let rel = PathBuf::from("vm1/disk.img");
    let path = d.cluster.mountpoint(1)?.join(&rel);
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(io("create", &path))?;
    f.set_len(size).map_err(io("size", &path))?;
    let mut buf = vec![0u8; usize::try_from(CHUNK_BYTES).unwrap_or(4 << 20)];
    let t = Instant::now();
    for &off in &chunks {
        pattern(off, &mut buf);
        f.write_all_at(&buf, off).map_err(io("write", &path))?;
    }
    f.sync_all().map_err(io("fsync", &path))?;
    drop(f);
    let secs = t.elapsed().as_secs_f64();
    let written = count * CHUNK_BYTES;
    say(&format!(
        "      {}: {} apparent, {} of data in {count} chunks at spread offsets, {:.0} MiB/s",
        rel.display(),
        human_bytes(size),
        human_bytes(written),
        written as f64 / secs.max(1e-9) / f64::from(1u32 << 20)
    ));
    d.image = Some(Image {
        rel,
        size_bytes: size,
        chunks,
    });
    Ok(())
}

/// Opens the image at `path` and checks its size.
fn open_image(path: &Path, img: &Image) -> Result<File, DemoError> {
    let f = File::open(path).map_err(io("open", path))?;
    let len = f.metadata().map_err(io("stat", path))?.len();
    if len != img.size_bytes {
        return Err(DemoError::Mismatch {
            path: path.to_path_buf(),
            offset_bytes: 0,
            detail: format!("size {len}, expected {}", img.size_bytes),
        });
    }
    Ok(f)
}

/// Reads the whole image through one node and compares every byte with what was written
/// (the patterned chunks, zeros everywhere else).
fn verify_image(path: &Path, img: &Image) -> Result<f64, DemoError> {
    let mut f = open_image(path, img)?;
    let block = 4u64 << 20;
    let mut got = vec![0u8; usize::try_from(block).unwrap_or(4 << 20)];
    let mut want = vec![0u8; got.len()];
    let mut chunk = vec![0u8; usize::try_from(CHUNK_BYTES).unwrap_or(4 << 20)];
    let mut pos = 0u64;
    let t = Instant::now();
    f.seek(SeekFrom::Start(0)).map_err(io("seek", path))?;
    // Chunks are sorted; track the first one that can still overlap `pos`.
    let mut first = 0usize;
    while pos < img.size_bytes {
        let n = block.min(img.size_bytes - pos);
        let n_usize = usize::try_from(n).unwrap_or(0);
        f.read_exact(&mut got[..n_usize])
            .map_err(io("read", path))?;
        want[..n_usize].fill(0);
        while first < img.chunks.len() && img.chunks[first] + CHUNK_BYTES <= pos {
            first += 1;
        }
        for &c in img.chunks[first..].iter().take_while(|&&c| c < pos + n) {
            pattern(c, &mut chunk);
            let a = c.max(pos);
            let b = (c + CHUNK_BYTES).min(pos + n);
            let (wa, wb) = (
                usize::try_from(a - pos).unwrap_or(0),
                usize::try_from(b - pos).unwrap_or(0),
            );
            let (ca, cb) = (
                usize::try_from(a - c).unwrap_or(0),
                usize::try_from(b - c).unwrap_or(0),
            );
            want[wa..wb].copy_from_slice(&chunk[ca..cb]);
        }
        if got[..n_usize] != want[..n_usize] {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(DemoError::Mismatch {
                path: path.to_path_buf(),
                offset_bytes: pos + i as u64,
                detail: format!("read {:#04x}, expected {:#04x}", got[i], want[i]),
            });
        }
        pos += n;
    }
    Ok(img.size_bytes as f64 / t.elapsed().as_secs_f64().max(1e-9) / f64::from(1u32 << 20))
}

fn step_verify_image(d: &mut Demo) -> Result<(), DemoError> {
    let Some(img) = d.image.as_ref() else {
        return Ok(());
    };
    for id in &NODES[1..] {
        let path = d.cluster.mountpoint(*id)?.join(&img.rel);
        let rate = verify_image(&path, img)?;
        say(&format!(
            "      node {id}: all {} identical ({rate:.0} MiB/s)",
            human_bytes(img.size_bytes)
        ));
    }
    Ok(())
}

fn step_state(d: &mut Demo) -> Result<(), DemoError> {
    let st = read_state(&d.cluster.uri)?;
    let _ = std::io::stderr().flush();
    print_state(&st);
    let _ = std::io::stdout().flush();
    Ok(())
}

/// The node named in the coordinator lease.
fn coordinator(d: &Demo) -> Result<CoordinatorInfo, DemoError> {
    let dev = block_client::open_device(&d.cluster.uri).map_err(|source| {
        DemoError::Cluster(LocalError::OpenLun {
            uri: d.cluster.uri.clone(),
            source,
        })
    })?;
    lease::find_coordinator(&dev).map_err(DemoError::Lease)
}

/// Every file of the folder `dir` with its bytes, sorted by name.
fn folder_contents(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, DemoError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let e = e.map_err(io("list", dir))?;
        let path = e.path();
        if e.file_type().map_err(io("stat", &path))?.is_file() {
            let bytes = std::fs::read(&path).map_err(io("read", &path))?;
            out.push((e.file_name().to_string_lossy().into_owned(), bytes));
        }
    }
    out.sort();
    Ok(out)
}

/// Checks the image's size and every patterned chunk (the holes were checked in step 6).
fn verify_chunks(path: &Path, img: &Image) -> Result<(), DemoError> {
    let f = open_image(path, img)?;
    let n = usize::try_from(CHUNK_BYTES).unwrap_or(4 << 20);
    let (mut got, mut want) = (vec![0u8; n], vec![0u8; n]);
    for &c in &img.chunks {
        f.read_exact_at(&mut got, c).map_err(io("read", path))?;
        pattern(c, &mut want);
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            return Err(DemoError::Mismatch {
                path: path.to_path_buf(),
                offset_bytes: c + i as u64,
                detail: format!("read {:#04x}, expected {:#04x}", got[i], want[i]),
            });
        }
    }
    Ok(())
}

/// How long a survivor may take to become coordinator after the kill.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes each survivor writes after the takeover.
const AFTER_BYTES: usize = 8 << 20;

fn step_failover(d: &mut Demo) -> Result<(), DemoError> {
    let old = coordinator(d)?;
    let survivors: Vec<u32> = NODES.iter().copied().filter(|&n| n != old.node.0).collect();
    let witness = survivors.last().copied().unwrap_or(NODES[2]);
    // The VM's folder as a survivor sees it before the kill (absent when the VM step was
    // skipped).
    let vm_dir = Path::new(crate::demo_vm::VM_NAME);
    let vm_before = {
        let dir = d.cluster.mountpoint(witness)?.join(vm_dir);
        if dir.is_dir() {
            Some(folder_contents(&dir)?)
        } else {
            None
        }
    };
    say(&format!(
        "      {} is coordinator at {} ({}); killing its process",
        old.node, old.addr, old.epoch
    ));
    let killed = Instant::now();
    d.cluster.kill_node(old.node.0)?;
    let new = crate::local::wait_for("a survivor to take over", TAKEOVER_TIMEOUT, || {
        Ok(coordinator(d)
            .ok()
            .filter(|c| c.node != old.node && c.epoch > old.epoch))
    })?;
    let took = killed.elapsed();
    // The first metadata operation through each survivor after the takeover.
    for &id in &survivors {
        let dir = d
            .cluster
            .mountpoint(id)?
            .join(format!("after-failover-{id}"));
        std::fs::create_dir(&dir).map_err(io("create folder", &dir))?;
    }
    say(&format!(
        "      {} took over as coordinator at {} ({}), {:.1} s after the kill; \
         serving again {:.1} s after it",
        new.node,
        new.addr,
        new.epoch,
        took.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    ));
    for &id in &survivors {
        let root = d.cluster.mountpoint(id)?;
        if let Some(img) = d.image.as_ref() {
            verify_chunks(&root.join(&img.rel), img)?;
        }
        if let Some(before) = &vm_before {
            let dir = root.join(vm_dir);
            if folder_contents(&dir)? != *before {
                return Err(DemoError::Mismatch {
                    path: dir,
                    offset_bytes: 0,
                    detail: "the VM's folder changed across the failover".into(),
                });
            }
        }
        check_configs(&root, id, &["vm1", "vm2", "vm3"])?;
        say(&format!(
            "      node {id}: the disk image's data, {} and vm1..vm3 intact",
            if vm_before.is_some() {
                "the VM's folder"
            } else {
                "(no VM folder: the VM step was skipped)"
            }
        ));
    }
    // Both survivors write more, each checked through the other.
    let mut buf = vec![0u8; AFTER_BYTES];
    for &id in &survivors {
        let path = d
            .cluster
            .mountpoint(id)?
            .join(format!("after-failover-{id}"))
            .join("data.bin");
        pattern(u64::from(id) << 40, &mut buf);
        let mut f = File::create(&path).map_err(io("create", &path))?;
        f.write_all(&buf).map_err(io("write", &path))?;
        f.sync_all().map_err(io("fsync", &path))?;
    }
    for (&a, &b) in survivors.iter().zip(survivors.iter().rev()) {
        let path = d
            .cluster
            .mountpoint(b)?
            .join(format!("after-failover-{a}"))
            .join("data.bin");
        let got = std::fs::read(&path).map_err(io("read", &path))?;
        pattern(u64::from(a) << 40, &mut buf);
        if got != buf {
            return Err(DemoError::Mismatch {
                path,
                offset_bytes: 0,
                detail: format!("node {a}'s file reads differently on node {b}"),
            });
        }
    }
    say(&format!(
        "      nodes {survivors:?} each wrote {} after the takeover, read back on the other",
        human_bytes(AFTER_BYTES as u64)
    ));
    Ok(())
}

fn step_unmount(d: &mut Demo) -> Result<(), DemoError> {
    // Followers first, the coordinator last; nodes killed earlier are skipped.
    let coord = coordinator(d).ok().map(|c| c.node.0);
    let mut order: Vec<u32> = NODES
        .iter()
        .rev()
        .copied()
        .filter(|&n| d.cluster.node_pid(n).is_some())
        .collect();
    order.sort_by_key(|&n| Some(n) == coord);
    for id in order {
        let status = d.cluster.unmount_node(id, Duration::from_secs(30))?;
        if !status.success() {
            return Err(DemoError::NodeExit { node: id, status });
        }
        say(&format!("      node {id} unmounted"));
    }
    // The coordinator checkpointed on its way out: the on-disk bitmap is exact now.
    let st = read_state(&d.cluster.uri)?;
    let g = &st.superblock.geometry;
    let cl = u64::from(g.cluster_bytes);
    say(&format!(
        "      volume after unmount: {} used, {} free of {}",
        human_bytes((g.cluster_count - st.free_clusters.min(g.cluster_count)) * cl),
        human_bytes(st.free_clusters * cl),
        human_bytes(g.data_bytes())
    ));
    Ok(())
}

/// The fsck binary next to `exe`, if there is one.
fn find_fsck(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    ["fsck-csvfs", "fsck.csvfs"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

fn step_fsck(d: &mut Demo) -> Result<(), DemoError> {
    let mut fsck = find_fsck(&d.cluster.exe);
    if fsck.is_none() {
        // Under `cargo run`, build it: `cargo run -p csvfs` builds only csvfs's binaries.
        if let (Some(cargo), Some(manifest)) = (
            std::env::var_os("CARGO"),
            std::env::var_os("CARGO_MANIFEST_DIR"),
        ) {
            say("      building fsck-csvfs (cargo build --release -p csvfs-tools)");
            let built = Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "-q",
                    "-p",
                    "csvfs-tools",
                    "--bin",
                    "fsck-csvfs",
                ])
                .current_dir(Path::new(&manifest).join(".."))
                .status()
                .is_ok_and(|s| s.success());
            if built {
                fsck = find_fsck(&d.cluster.exe);
            }
        }
    }
    let Some(fsck) = fsck else {
        say("      SKIPPED: no fsck-csvfs next to this csvfs binary");
        say("      (build it with `cargo build --release -p csvfs-tools` and rerun the demo)");
        return Ok(());
    };
    say(&format!("      {} -n -f {}", fsck.display(), d.cluster.uri));
    let out = Command::new(&fsck)
        .arg("-n")
        .arg("-f")
        .arg(&d.cluster.uri)
        .output()
        .map_err(io("run", &fsck))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(DemoError::Fsck {
            status: out.status,
            output: text,
        });
    }
    for line in text.lines() {
        say(&format!("      {line}"));
    }
    d.cluster.stop_lun_server();
    Ok(())
}
