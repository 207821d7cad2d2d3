//! `csvfs-bench fs`: the file system against its own LUN, in one run.
//!
//! Two LUN files of the same host file system, each served over NBD by its own `csvfs
//! serve-lun` (Unix socket): the raw LUN, which fio's nbd engine measures (the baseline),
//! and the volume's LUN, formatted (in-process mkfs) and mounted by three `csvfs mount`
//! nodes, through which fio runs the same workloads on node 1 (libaio, O_DIRECT, 32 in
//! flight). The two are measured in rounds, each workload on both targets back to back and
//! the order swapped every round, so that a busy neighbour on a shared machine slows both
//! sides of a ratio alike; the table gives the median of each side and the median of the
//! per-round ratios with their range. Last, metadata rates: create, stat, rename, unlink
//! per second from one node, then from three nodes at once, in two layouts:
//!
//! - unique directory per thread (mdtest's `-u`): each thread works in a directory of its
//!   own, so nothing in the kernel serializes the threads. This is the figure the goals
//!   are stated against.
//! - one shared directory: every thread of every node works on its own names in one
//!   directory. Linux takes the parent directory's inode lock exclusively for
//!   `open(O_CREAT)`, rename and unlink, so on one node the lookup and create of one name
//!   must finish before the next starts in that directory, whatever the thread count.
//!
//! Both targets are preconditioned alike: written once in full before their timed runs
//! (a layout pass, 1 MiB writes), and before every timed run both LUN files' dirty pages
//! are written back. So each run measures overwrites of blocks the host file system has
//! already allocated, from a clean page cache: not the host's block allocation, and not
//! the writeback of the run before it, which otherwise moves the raw sequential write
//! figure by a factor of three from run to run.
//!
//! Beside each rate, the CPU time the whole machine spent per I/O or per create
//! (`/proc/stat`, every process): on a shared, noisy machine the cost of an operation is
//! steadier than its rate, and it shows what the mount adds over the raw LUN.
//!
//! `--meta-only` skips fio (and needs no fio); `--fio-only` skips the metadata part.
//! Needs the `csvfs` binary next to this one.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use metadata_server::format::{mkfs, MkfsOptions};

use crate::output::{json_number, json_string, line, progress};

/// Options of `csvfs-bench fs`.
#[derive(Debug, clap::Args)]
pub struct FsArgs {
    /// Short run: 3 s per measurement, a 512 MiB file, 2000 files per node. Default: off.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object on stdout instead of a table. Default: off.
    #[arg(long)]
    pub json: bool,
    /// Seconds per fio measurement. Default: 3 with --quick, else 8.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Rounds of fio measurements (each workload on the raw LUN and through the mount, in
    /// turn); medians are reported. Default: 3.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Size of the fio file in MiB. Default: 512 with --quick, else 2048.
    #[arg(long)]
    pub file_mib: Option<u64>,
    /// Files per node in the metadata measurement (count). Default: 2000 with --quick,
    /// else 10000.
    #[arg(long)]
    pub files: Option<u32>,
    /// Threads per node in the metadata measurement (count). Default: 8.
    #[arg(long, default_value_t = 8)]
    pub threads: u32,
    /// Directory for the LUN, sockets and mountpoints (removed afterwards). Default: the
    /// temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run only the metadata measurement (no fio, raw or through the mount). Default: off.
    #[arg(long, conflicts_with = "fio_only")]
    pub meta_only: bool,
    /// Run only the fio measurements (raw LUN and through the mount), no metadata rates.
    /// Default: off.
    #[arg(long)]
    pub fio_only: bool,
    /// One more argument for every `csvfs mount` of the rig, before the mountpoint
    /// (repeat it for several; e.g. `--mount-arg=--local-session --mount-arg=false` to
    /// compare settings). Default: none.
    #[arg(long = "mount-arg", allow_hyphen_values = true)]
    pub mount_args: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    key: &'static str,
    label: &'static str,
    rw: &'static str,
    write: bool,
    block_bytes: u32,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        key: "seq_write_1m_qd32",
        label: "seq write 1 MiB QD32",
        rw: "write",
        write: true,
        block_bytes: 1 << 20,
    },
    Workload {
        key: "seq_read_1m_qd32",
        label: "seq read  1 MiB QD32",
        rw: "read",
        write: false,
        block_bytes: 1 << 20,
    },
    Workload {
        key: "rand_write_4k_qd32",
        label: "rand write 4 KiB QD32",
        rw: "randwrite",
        write: true,
        block_bytes: 4096,
    },
    Workload {
        key: "rand_read_4k_qd32",
        label: "rand read  4 KiB QD32",
        rw: "randread",
        write: false,
        block_bytes: 4096,
    },
];

const QUEUE_DEPTH: u32 = 32;

#[derive(Debug, Clone, Copy, Default)]
struct Figure {
    mib_per_s: f64,
    iops: f64,
    /// CPU time the whole machine spent per I/O while fio ran, in µs.
    cpu_us_per_io: f64,
}

/// Clock ticks per second of `/proc/stat` (USER_HZ: 100 on every Linux architecture).
const USER_HZ: f64 = 100.0;

/// CPU time the machine has spent busy since boot (every state but idle and iowait), in
/// seconds, summed over its CPUs.
fn cpu_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Ok(busy / USER_HZ)
}

/// Everything started, torn down on drop.
struct Rig {
    dir: PathBuf,
    servers: Vec<Child>,
    nodes: Vec<(u32, Child, PathBuf)>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.nodes {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for (_, c, mp) in &mut self.nodes {
            let start = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(15) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            if is_mounted(mp) {
                let _ = Command::new("umount").arg("-l").arg(&*mp).status();
            }
        }
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else {
        return false;
    };
    let want = canon.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()) && l.contains("csvfs"))
        })
        .unwrap_or(false)
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !f()? {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let g = f.try_clone()?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// Writes the whole target once (1 MiB writes, 32 in flight), so the timed runs overwrite
/// allocated blocks.
fn fio_layout(target: &[String], size_bytes: u64, dir: &Path) -> anyhow::Result<()> {
    let mut args = vec![
        "--name=layout".to_string(),
        "--rw=write".to_string(),
        "--bs=1M".to_string(),
        format!("--iodepth={QUEUE_DEPTH}"),
        format!("--size={size_bytes}"),
        "--output-format=terse".to_string(),
    ];
    args.extend(target.iter().cloned());
    run_fio(&args, dir).map(drop)
}

/// Runs fio with `args` in `dir` and returns its standard output; fails with its output
/// when fio does.
fn run_fio(args: &[String], dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("fio")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run fio (is fio installed?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "fio {args:?} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Writes back the LUN files' dirty pages, so the next run starts from a clean page cache.
fn settle(luns: &[&Path]) -> anyhow::Result<()> {
    for lun in luns {
        File::open(lun)
            .and_then(|f| f.sync_data())
            .with_context(|| format!("write back {}", lun.display()))?;
    }
    Ok(())
}

/// Makes a sparse LUN file of `bytes` at `lun`, serves it over NBD on the Unix socket
/// `sock` with `csvfs serve-lun` (the rig stops it), and returns its URI.
fn serve(rig: &mut Rig, exe: &Path, lun: &Path, bytes: u64, sock: &Path) -> anyhow::Result<String> {
    File::create(lun)?.set_len(bytes)?;
    let name = lun.file_stem().unwrap_or_default().to_string_lossy();
    let (o, e) = log_file(&rig.dir.join(format!("serve-{name}.log")))?;
    let server = Command::new(exe)
        .arg("serve-lun")
        .arg(lun)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(["--export", "lun"])
        .stdout(o)
        .stderr(e)
        .spawn()
        .context("start csvfs serve-lun")?;
    rig.servers.push(server);
    wait_until("the LUN server", Duration::from_secs(20), || {
        Ok(std::os::unix::net::UnixStream::connect(sock).is_ok())
    })?;
    Ok(format!("nbd+unix:///lun?socket={}", sock.display()))
}

/// The middle value of `v` (the upper one of an even count); 0 when empty.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One workload's rounds on both targets.
#[derive(Debug, Default)]
struct Paired {
    raw: Vec<Figure>,
    fs: Vec<Figure>,
}

impl Paired {
    /// The rate the workload is judged by: MiB/s for 1 MiB blocks, else IOPS.
    fn headline(w: &Workload, f: &Figure) -> f64 {
        if w.block_bytes >= 1 << 20 {
            f.mib_per_s
        } else {
            f.iops
        }
    }

    /// Mount over raw LUN of each round.
    fn ratios(&self, w: &Workload) -> Vec<f64> {
        self.raw
            .iter()
            .zip(&self.fs)
            .map(|(r, f)| {
                let b = Self::headline(w, r);
                if b > 0.0 {
                    Self::headline(w, f) / b
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The median of each field over the rounds of one side.
    fn median_of(v: &[Figure]) -> Figure {
        let field = |f: fn(&Figure) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        Figure {
            mib_per_s: field(|f| f.mib_per_s),
            iops: field(|f| f.iops),
            cpu_us_per_io: field(|f| f.cpu_us_per_io),
        }
    }
}

/// Runs fio and returns its figure. `target` is the fio arguments naming the target.
fn fio(
    target: &[String],
    w: &Workload,
    seconds: u64,
    size_bytes: u64,
    dir: &Path,
) -> anyhow::Result<Figure> {
    let mut args = vec![
        "--name=bench".to_string(),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.block_bytes),
        format!("--iodepth={QUEUE_DEPTH}"),
        format!("--size={size_bytes}"),
        "--time_based".to_string(),
        format!("--runtime={seconds}"),
        "--output-format=terse".to_string(),
        "--terse-version=3".to_string(),
    ];
    args.extend(target.iter().cloned());
    let busy_before = cpu_busy_secs()?;
    let stdout = run_fio(&args, dir)?;
    let terse = stdout
        .lines()
        .find(|l| l.starts_with("3;"))
        .with_context(|| format!("no terse line in fio output: {stdout}"))?;
    let f: Vec<&str> = terse.split(';').collect();
    if f.get(4) != Some(&"0") {
        bail!("fio reported error {:?}", f.get(4));
    }
    let (bw_i, iops_i) = if w.write { (47, 48) } else { (6, 7) };
    let num = |i: usize| -> anyhow::Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .with_context(|| format!("fio terse field {i} missing in {terse}"))
    };
    let busy = cpu_busy_secs()? - busy_before;
    let iops = num(iops_i)?;
    let ios = iops * seconds as f64;
    Ok(Figure {
        mib_per_s: num(bw_i)? / 1024.0,
        iops,
        cpu_us_per_io: if ios > 0.0 { busy * 1e6 / ios } else { 0.0 },
    })
}

/// Metadata rates (ops/s) of one phase over `roots` (one per node), `files` names per node.
#[derive(Debug, Clone, Copy, Default)]
struct MetaRates {
    create: f64,
    stat: f64,
    rename: f64,
    unlink: f64,
    /// CPU time the whole machine spent per create, in µs.
    create_cpu_us: f64,
}

/// Where the threads of a metadata phase put their files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Each thread of each node in a directory of its own (made before the clock starts).
    UniqueDirPerThread,
    /// Every thread of every node in the one root directory, each on its own names.
    SharedDir,
}

impl Layout {
    fn key(self) -> &'static str {
        match self {
            Self::UniqueDirPerThread => "unique_dir",
            Self::SharedDir => "shared_dir",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::UniqueDirPerThread => "unique directory per thread",
            Self::SharedDir => "one shared directory",
        }
    }
}

/// One metadata phase: `files` names per node spread over `threads` threads per node, on
/// the node roots in `roots` (the same directory seen through each node's mount).
fn meta_phase(
    roots: &[PathBuf],
    files: u32,
    threads: u32,
    tag: &str,
    layout: Layout,
) -> anyhow::Result<MetaRates> {
    let mut dirs: Vec<Vec<PathBuf>> = Vec::new();
    for (n, root) in roots.iter().enumerate() {
        let mut per_thread = Vec::new();
        for t in 0..threads {
            per_thread.push(match layout {
                Layout::SharedDir => root.clone(),
                Layout::UniqueDirPerThread => {
                    let d = root.join(format!("{tag}-{n}-t{t}"));
                    std::fs::create_dir(&d).with_context(|| format!("create {}", d.display()))?;
                    d
                }
            });
        }
        dirs.push(per_thread);
    }
    let run = |op: &'static str| -> anyhow::Result<(f64, f64)> {
        let busy_before = cpu_busy_secs()?;
        let start = Instant::now();
        let mut hs = Vec::new();
        for (n, per_thread) in dirs.iter().enumerate() {
            for (t, dir) in (0..threads).zip(per_thread) {
                let dir = dir.clone();
                let tag = format!("{tag}-{n}");
                hs.push(thread::spawn(move || -> std::io::Result<()> {
                    let mut i = t;
                    while i < files {
                        let a = dir.join(format!("{tag}-{i}"));
                        let b = dir.join(format!("{tag}-{i}.r"));
                        match op {
                            "create" => {
                                OpenOptions::new().create_new(true).write(true).open(&a)?;
                            }
                            "stat" => {
                                std::fs::metadata(&a)?;
                            }
                            "rename" => std::fs::rename(&a, &b)?,
                            _ => std::fs::remove_file(&b)?,
                        }
                        i += threads;
                    }
                    Ok(())
                }));
            }
        }
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("{op} thread panicked"))?
                .with_context(|| format!("{op} through the mount ({})", layout.label()))?;
        }
        let total = f64::from(files) * roots.len() as f64;
        let rate = total / start.elapsed().as_secs_f64();
        Ok((rate, (cpu_busy_secs()? - busy_before) * 1e6 / total))
    };
    let (create, create_cpu_us) = run("create")?;
    Ok(MetaRates {
        create,
        stat: run("stat")?.0,
        rename: run("rename")?.0,
        unlink: run("unlink")?.0,
        create_cpu_us,
    })
}

/// Metadata rates of one layout: from node 1 alone, then from all three nodes at once.
#[derive(Debug, Clone, Copy)]
struct MetaResult {
    layout: Layout,
    one: MetaRates,
    three: MetaRates,
}

/// Runs both layouts, unique directories first. `mounts` are the three node mountpoints.
fn meta_all(mounts: &[PathBuf], files: u32, threads: u32) -> anyhow::Result<Vec<MetaResult>> {
    let mut out = Vec::new();
    for (k, layout) in [Layout::UniqueDirPerThread, Layout::SharedDir]
        .into_iter()
        .enumerate()
    {
        let first = mounts.first().context("no node mounts")?;
        progress(&format!(
            "metadata, {}: {files} files per node, {threads} threads per node",
            layout.label()
        ));
        let one_name = format!("meta-{}-1", layout.key());
        std::fs::create_dir(first.join(&one_name))?;
        let one = meta_phase(
            &[first.join(&one_name)],
            files,
            threads,
            &format!("a{k}"),
            layout,
        )?;
        let three_name = format!("meta-{}-3", layout.key());
        std::fs::create_dir(first.join(&three_name))?;
        let roots: Vec<PathBuf> = mounts.iter().map(|m| m.join(&three_name)).collect();
        // The other nodes may not have seen the new directory yet: wait until they do.
        for r in &roots {
            wait_until(
                &format!("{} to appear", r.display()),
                Duration::from_secs(10),
                || Ok(r.is_dir()),
            )?;
        }
        let three = meta_phase(&roots, files, threads, &format!("b{k}"), layout)?;
        out.push(MetaResult { layout, one, three });
    }
    Ok(out)
}

/// Runs the benchmark.
pub fn run(args: &FsArgs) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(if args.quick { 3 } else { 8 });
    let file_bytes = args.file_mib.unwrap_or(if args.quick { 512 } else { 2048 }) << 20;
    let files = args.files.unwrap_or(if args.quick { 2000 } else { 10_000 });
    let exe = std::env::current_exe()?
        .parent()
        .map(|d| d.join("csvfs"))
        .filter(|p| p.is_file())
        .context("no csvfs binary next to csvfs-bench: cargo build --release -p csvfs")?;
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!("csvfs-bench-fs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rig = Rig {
        dir: dir.clone(),
        servers: Vec::new(),
        nodes: Vec::new(),
    };
    std::fs::write(dir.join("secret"), "csvfs-bench-fs-secret\n")?;
    let lun = dir.join("lun.img");
    let uri = serve(
        &mut rig,
        &exe,
        &lun,
        (file_bytes * 2).max(8 << 30),
        &dir.join("lun.sock"),
    )?;
    let raw_lun = dir.join("raw.img");
    let raw_uri = if args.meta_only {
        None
    } else {
        Some(serve(
            &mut rig,
            &exe,
            &raw_lun,
            file_bytes,
            &dir.join("raw.sock"),
        )?)
    };

    progress("mkfs and three node mounts");
    let dev = block_client::open_device(&uri)?;
    mkfs(dev, &MkfsOptions::default(), &mut |_, _| {})?;
    for id in 1..=3u32 {
        let mp = dir.join(format!("node{id}"));
        std::fs::create_dir_all(&mp)?;
        let (o, e) = log_file(&dir.join(format!("node{id}.log")))?;
        let child = Command::new(&exe)
            .arg("mount")
            .arg("--lun")
            .arg(&uri)
            .args(["--node-id", &id.to_string()])
            .arg("--secret")
            .arg(dir.join("secret"))
            .args(&args.mount_args)
            .arg(&mp)
            .stdout(o)
            .stderr(e)
            .spawn()
            .context("start csvfs mount")?;
        rig.nodes.push((id, child, mp.clone()));
        if id == 1 {
            wait_until("node 1 to mount", Duration::from_secs(60), || {
                Ok(is_mounted(&mp))
            })?;
        }
    }
    for (id, _, mp) in &rig.nodes {
        wait_until(
            &format!("node {id} to mount"),
            Duration::from_secs(60),
            || Ok(is_mounted(mp)),
        )?;
    }
    let mp1 = dir.join("node1");

    let mut paired: Vec<Paired> = Vec::new();
    if let Some(raw_uri) = raw_uri {
        let raw_target = vec!["--ioengine=nbd".to_string(), format!("--uri={raw_uri}")];
        let fs_target = vec![
            "--ioengine=libaio".to_string(),
            "--direct=1".to_string(),
            format!("--filename={}", mp1.join("bench.img").display()),
        ];
        progress("layout: both targets written once in full");
        fio_layout(&raw_target, file_bytes, &dir)?;
        fio_layout(&fs_target, file_bytes, &dir)?;
        paired = WORKLOADS.iter().map(|_| Paired::default()).collect();
        let luns = [lun.as_path(), raw_lun.as_path()];
        for round in 0..args.rounds {
            progress(&format!(
                "round {} of {}: fio's nbd engine on the raw LUN and fio libaio O_DIRECT through node 1, in turn",
                round + 1,
                args.rounds
            ));
            for (w, p) in WORKLOADS.iter().zip(&mut paired) {
                // The order swaps every round: neither side always runs first.
                for raw_side in [round % 2 == 0, round % 2 != 0] {
                    settle(&luns)?;
                    if raw_side {
                        p.raw.push(fio(&raw_target, w, seconds, file_bytes, &dir)?);
                    } else {
                        p.fs.push(fio(&fs_target, w, seconds, file_bytes, &dir)?);
                    }
                }
            }
        }
    }

    let meta = if args.fio_only {
        Vec::new()
    } else {
        let mounts: Vec<PathBuf> = rig.nodes.iter().map(|(_, _, mp)| mp.clone()).collect();
        meta_all(&mounts, files, args.threads)?
    };
    drop(rig);

    if args.json {
        let mut parts = Vec::new();
        for (w, p) in WORKLOADS.iter().zip(&paired) {
            let (r, f) = (Paired::median_of(&p.raw), Paired::median_of(&p.fs));
            let ratios = p.ratios(w);
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(0.0, f64::max);
            parts.push(format!(
                "{}: {{\"rounds\": {}, \"raw_mib_s\": {}, \"raw_iops\": {}, \"raw_cpu_us_per_io\": {}, \"fs_mib_s\": {}, \"fs_iops\": {}, \"fs_cpu_us_per_io\": {}, \"ratio\": {}, \"ratio_min\": {}, \"ratio_max\": {}}}",
                json_string(w.key),
                ratios.len(),
                json_number(r.mib_per_s),
                json_number(r.iops),
                json_number(r.cpu_us_per_io),
                json_number(f.mib_per_s),
                json_number(f.iops),
                json_number(f.cpu_us_per_io),
                json_number(median(&ratios)),
                json_number(lo),
                json_number(hi)
            ));
        }
        for m in &meta {
            for (nodes, r) in [("one_node", m.one), ("three_nodes", m.three)] {
                parts.push(format!(
                    "{}: {{\"create\": {}, \"stat\": {}, \"rename\": {}, \"unlink\": {}, \"create_cpu_us\": {}}}",
                    json_string(&format!("meta_{}_{nodes}", m.layout.key())),
                    json_number(r.create),
                    json_number(r.stat),
                    json_number(r.rename),
                    json_number(r.unlink),
                    json_number(r.create_cpu_us)
                ));
            }
        }
        line(&format!("{{{}}}", parts.join(", ")));
        return Ok(());
    }
    if !paired.is_empty() {
        line(&format!(
            "csvfs-bench fs: median of {} round(s) of {} s per run, {} MiB file, {QUEUE_DEPTH} in flight",
            args.rounds,
            seconds,
            file_bytes >> 20
        ));
        line(&format!(
            "{:<24} {:>22} {:>22} {:>7} {:>12}   {:>21}",
            "workload",
            "raw LUN (fio nbd)",
            "csvfs mount (fio)",
            "ratio",
            "ratio range",
            "CPU µs/IO raw, mount"
        ));
    }
    for (w, p) in WORKLOADS.iter().zip(&paired) {
        let (r, f) = (Paired::median_of(&p.raw), Paired::median_of(&p.fs));
        let unit = if w.block_bytes >= 1 << 20 {
            "MiB/s"
        } else {
            "IOPS"
        };
        let ratios = p.ratios(w);
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        line(&format!(
            "{:<24} {:>16.0} {unit:<5} {:>16.0} {unit:<5} {:>7.2} {:>12}   {:>10.1} {:>10.1}",
            w.label,
            Paired::headline(w, &r),
            Paired::headline(w, &f),
            median(&ratios),
            format!("{lo:.2}-{hi:.2}"),
            r.cpu_us_per_io,
            f.cpu_us_per_io
        ));
    }
    if !paired.is_empty() {
        line("(ratio: median over the rounds of mount / raw LUN measured back to back; rates and CPU: medians of each side)");
        line("(CPU: busy time of the whole machine, every process, from fio's start to its exit, per I/O of its timed run)");
    }
    for m in &meta {
        line(&format!(
            "metadata, {} ({files} files per node, {} threads per node):",
            m.layout.label(),
            args.threads
        ));
        if m.layout == Layout::SharedDir {
            line(
                "  (serialized per node: the kernel holds the directory's inode lock \
                 exclusively for each create, rename and unlink in it)",
            );
        }
        line(&format!(
            "  {:<22} {:>10} {:>10} {:>10} {:>10}",
            "ops/s", "create", "stat", "rename", "unlink"
        ));
        for (name, r) in [("one node", m.one), ("three nodes at once", m.three)] {
            line(&format!(
                "  {:<22} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                name, r.create, r.stat, r.rename, r.unlink
            ));
        }
        line(&format!(
            "  three nodes / one node (create): {:.2}",
            if m.one.create > 0.0 {
                m.three.create / m.one.create
            } else {
                0.0
            }
        ));
        line(&format!(
            "  CPU µs per create (whole machine): one node {:.0}, three nodes at once {:.0}",
            m.one.create_cpu_us, m.three.create_cpu_us
        ));
    }
    Ok(())
}
