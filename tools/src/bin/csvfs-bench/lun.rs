//! `csvfs-bench lun`: the block layer against the reference NBD tools, in one run.
//!
//! Four workloads (sequential write and read, 1 MiB, 16 in flight; random write and read,
//! 4 KiB, 32 in flight) in three setups over Unix sockets to a file in the page cache:
//! (a) fio's nbd engine against nbdkit's file plugin: the baseline; (b) our `NbdClient`
//! against the same nbdkit export, one thread keeping 16 or 32 requests in flight
//! (`start_read`/`start_write`, as fio does); (b') the same through the blocking
//! `BlockDevice` methods from 16 or 32 threads (how FUSE workers use it); (c) fio's nbd
//! engine against our server (`block_client::nbd::serve`). Each figure is printed with its
//! ratio to (a).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use block_client::nbd::{serve, ListenAddr, ServeOptions};
use block_client::{BlockDevice, FileDevice, FileOptions, NbdClient, NbdClientOptions, WriteFlags};

use crate::output::{json_number, json_string, line, progress};

/// Options of `csvfs-bench lun`.
#[derive(Debug, clap::Args)]
pub struct LunArgs {
    /// Short run: 2 s per measurement and a 256 MiB image, under 60 s in all. Default: off.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object on stdout instead of a table. Default: off.
    #[arg(long)]
    pub json: bool,
    /// Seconds per measurement. Default: 2 with --quick, else 8.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Rounds per figure; the median is reported. Rounds run the four setups in turn so
    /// that a busy machine slows them alike. Default: 1 with --quick, else 3.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Size of the test image in MiB. Default: 256 with --quick, else 1024.
    #[arg(long)]
    pub image_mib: Option<u64>,
    /// Directory for the image and sockets (removed afterwards). Default: the temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Connections our client opens when the server allows multi-conn (count). Default: 2.
    #[arg(long, default_value_t = 2)]
    pub connections: u32,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    key: &'static str,
    label: &'static str,
    write: bool,
    random: bool,
    block_bytes: u32,
    queue_depth: u32,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        key: "seq_write_1m_qd16",
        label: "seq write 1 MiB QD16",
        write: true,
        random: false,
        block_bytes: 1 << 20,
        queue_depth: 16,
    },
    Workload {
        key: "seq_read_1m_qd16",
        label: "seq read  1 MiB QD16",
        write: false,
        random: false,
        block_bytes: 1 << 20,
        queue_depth: 16,
    },
    Workload {
        key: "rand_write_4k_qd32",
        label: "rand write 4 KiB QD32",
        write: true,
        random: true,
        block_bytes: 4096,
        queue_depth: 32,
    },
    Workload {
        key: "rand_read_4k_qd32",
        label: "rand read  4 KiB QD32",
        write: false,
        random: true,
        block_bytes: 4096,
        queue_depth: 32,
    },
];

/// One measurement.
#[derive(Debug, Clone, Copy, Default)]
struct Figure {
    mib_per_s: f64,
    iops: f64,
}

impl Figure {
    /// The figure a workload is judged by: MiB/s for sequential, IOPS for random.
    fn headline(&self, w: &Workload) -> f64 {
        if w.random {
            self.iops
        } else {
            self.mib_per_s
        }
    }
}

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until nbdkit writes its pid file, which it does once it accepts connections.
fn wait_for_ready(pid_file: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if std::fs::metadata(pid_file).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("server exited before listening: {status}");
        }
        if Instant::now() > deadline {
            bail!("nbdkit did not write {} within 15 s", pid_file.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Runs fio's nbd engine for `seconds` and returns its figure.
fn fio(
    uri: &str,
    w: &Workload,
    seconds: u64,
    size_bytes: u64,
    dir: &Path,
) -> anyhow::Result<Figure> {
    let rw = match (w.write, w.random) {
        (true, false) => "write",
        (false, false) => "read",
        (true, true) => "randwrite",
        (false, true) => "randread",
    };
    let out = Command::new("fio")
        .current_dir(dir)
        .args([
            "--name=lun",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={}", w.block_bytes),
            &format!("--iodepth={}", w.queue_depth),
            &format!("--size={size_bytes}"),
            "--time_based",
            &format!("--runtime={seconds}"),
            "--output-format=terse",
            "--terse-version=3",
        ])
        .stdin(Stdio::null())
        .output()
        .context("run fio (is fio with the nbd engine installed?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let terse = stdout
        .lines()
        .find(|l| l.starts_with("3;"))
        .with_context(|| format!("no terse line in fio output: {stdout}"))?;
    let f: Vec<&str> = terse.split(';').collect();
    let (bw_i, iops_i) = if w.write { (47, 48) } else { (6, 7) };
    let num = |i: usize| -> anyhow::Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .with_context(|| format!("fio terse field {i} missing in {terse}"))
    };
    if f.get(4) != Some(&"0") {
        bail!("fio reported error {:?}", f.get(4));
    }
    Ok(Figure {
        mib_per_s: num(bw_i)? / 1024.0,
        iops: num(iops_i)?,
    })
}

/// Drives our client from one thread keeping `queue_depth` requests in flight.
fn ours_pipelined(client: &NbdClient, w: &Workload, seconds: u64) -> anyhow::Result<Figure> {
    let bs = u64::from(w.block_bytes);
    let slots = client.size_bytes() / bs;
    let data = vec![0x5au8; usize::try_from(w.block_bytes)?];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut seq = 0u64;
    let mut next_offset = || {
        let slot = if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % slots
        } else {
            seq += 1;
            (seq - 1) % slots
        };
        slot * bs
    };
    let start = |off: u64| {
        if w.write {
            client.start_write(data.clone(), off, WriteFlags::default())
        } else {
            client.start_read(off, w.block_bytes)
        }
    };
    let mut ring = std::collections::VecDeque::new();
    for _ in 0..w.queue_depth {
        ring.push_back(start(next_offset())?);
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut ops = 0u32;
    while let Some(p) = ring.pop_front() {
        let got = p.wait().context("benchmark I/O through our client")?;
        client.recycle_buffer(got);
        ops += 1;
        if Instant::now() < until {
            ring.push_back(start(next_offset())?);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let n = f64::from(ops);
    Ok(Figure {
        iops: n / secs,
        mib_per_s: n * f64::from(w.block_bytes) / secs / f64::from(1u32 << 20),
    })
}

/// Drives our client with `queue_depth` threads, each with one request in flight.
fn ours_threads(client: &Arc<NbdClient>, w: &Workload, seconds: u64) -> anyhow::Result<Figure> {
    let size = client.size_bytes();
    let bs = u64::from(w.block_bytes);
    let slots = size / bs;
    let next = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(usize::try_from(w.queue_depth)? + 1));
    let mut threads = Vec::new();
    for t in 0..w.queue_depth {
        let (client, next, ops, stop, barrier) = (
            client.clone(),
            next.clone(),
            ops.clone(),
            stop.clone(),
            barrier.clone(),
        );
        let w = *w;
        threads.push(std::thread::spawn(
            move || -> Result<(), block_client::BlockError> {
                let mut buf = vec![0x5au8; usize::try_from(w.block_bytes).unwrap_or(4096)];
                let mut rng = 0x9e37_79b9_7f4a_7c15u64
                    ^ (u64::from(t) + 1).wrapping_mul(0xd134_2543_de82_ef95);
                let mut done = 0u64;
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let slot = if w.random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % slots
                    } else {
                        next.fetch_add(1, Ordering::Relaxed) % slots
                    };
                    if w.write {
                        client.write_at(&buf, slot * bs, WriteFlags::default())?;
                    } else {
                        client.read_at(&mut buf, slot * bs)?;
                    }
                    done += 1;
                }
                ops.fetch_add(done, Ordering::Relaxed);
                Ok(())
            },
        ));
    }
    barrier.wait();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        match t.join() {
            Ok(r) => r.context("benchmark I/O through our client")?,
            Err(_) => bail!("benchmark thread panicked"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // Op counts stay far below 2^52, so the conversion to f64 is exact.
    let n = f64::from(u32::try_from(ops.load(Ordering::Relaxed)).unwrap_or(u32::MAX));
    Ok(Figure {
        iops: n / secs,
        mib_per_s: n * f64::from(w.block_bytes) / secs / f64::from(1u32 << 20),
    })
}

fn make_image(path: &Path, size_bytes: u64) -> anyhow::Result<()> {
    let dev = FileDevice::create(path, size_bytes, FileOptions::default())?;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap_or(0) | 1;
    }
    let mut off = 0;
    while off < size_bytes {
        dev.write_at(&chunk, off, WriteFlags::default())?;
        off += chunk.len() as u64;
    }
    dev.flush()?;
    Ok(())
}

/// Runs the benchmark and prints the table (or JSON).
pub fn run(args: &LunArgs) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(if args.quick { 2 } else { 8 });
    let image_mib = args
        .image_mib
        .unwrap_or(if args.quick { 256 } else { 1024 });
    let size_bytes = image_mib << 20;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = Scratch(base.join(format!("csvfs-bench-lun-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("create {}", dir.0.display()))?;
    let image = dir.0.join("lun.img");
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let total = WORKLOADS.len() * 4 * usize::try_from(rounds)?;
    progress(&format!(
        "image {image_mib} MiB, {seconds} s per measurement, {rounds} round(s), {total} measurements (about {} s)",
        total as u64 * (seconds + 1) + 3
    ));
    make_image(&image, size_bytes).context("create the test image")?;

    // Both servers export the same image at once (nbdkit takes no lock; ours does).
    let kit_sock = dir.0.join("nbdkit.sock");
    let kit_pid = dir.0.join("nbdkit.pid");
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-P"])
        .arg(&kit_pid)
        .arg("-U")
        .arg(&kit_sock)
        .arg("file")
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("start nbdkit (is nbdkit installed?)")?;
    let mut kit = ChildGuard(child);
    wait_for_ready(&kit_pid, &mut kit.0)?;
    let kit_uri = unix_uri(&kit_sock);
    let our_sock = dir.0.join("csvfs.sock");
    let handle = serve(&image, &ListenAddr::Unix(our_sock), ServeOptions::default())?;
    let our_uri = handle.uri();
    let opts = NbdClientOptions {
        connections: args.connections,
        ..Default::default()
    };
    let c = Arc::new(NbdClient::open(&kit_uri, opts)?);

    let mut step = 0;
    let mut note = |what: &str, w: &Workload| {
        step += 1;
        progress(&format!("[{step}/{total}] {what}: {}", w.label));
    };
    let mut samples: Vec<[Vec<Figure>; 4]> = WORKLOADS.iter().map(|_| Default::default()).collect();
    for (i, w) in WORKLOADS.iter().enumerate() {
        for _ in 0..rounds {
            note("(a) fio -> nbdkit", w);
            samples[i][0].push(fio(&kit_uri, w, seconds, size_bytes, &dir.0)?);
            note("(b) csvfs client, 1 thread pipelined -> nbdkit", w);
            samples[i][1].push(ours_pipelined(&c, w, seconds)?);
            note("(b') csvfs client, blocking, QD threads -> nbdkit", w);
            samples[i][2].push(ours_threads(&c, w, seconds)?);
            note("(c) fio -> csvfs server", w);
            samples[i][3].push(fio(&our_uri, w, seconds, size_bytes, &dir.0)?);
        }
    }
    drop(c);
    drop(kit);
    handle.shutdown()?;
    let median = |v: &[Figure], w: &Workload| {
        let mut v = v.to_vec();
        v.sort_by(|x, y| x.headline(w).total_cmp(&y.headline(w)));
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let pick = |k: usize| -> [Figure; 4] {
        std::array::from_fn(|i| median(&samples[i][k], &WORKLOADS[i]))
    };
    let (baseline, client, client_threads, server) = (pick(0), pick(1), pick(2), pick(3));

    let ratio = |ours: &Figure, base: &Figure, w: &Workload| {
        let b = base.headline(w);
        if b > 0.0 {
            ours.headline(w) / b
        } else {
            f64::NAN
        }
    };
    let figure_json = |f: &Figure, base: Option<(&Figure, &Workload)>| {
        let mut j = format!(
            "{{\"mib_per_s\":{},\"iops\":{}",
            json_number(f.mib_per_s),
            json_number(f.iops)
        );
        if let Some((b, w)) = base {
            j.push_str(&format!(",\"ratio\":{}", json_number(ratio(f, b, w))));
        }
        j.push('}');
        j
    };
    if args.json {
        let mut rows = Vec::new();
        for (i, w) in WORKLOADS.iter().enumerate() {
            let a = &baseline[i];
            rows.push(format!(
                "{{\"workload\":{},\"unit\":{},\"baseline_fio_nbdkit\":{},\"client_pipelined_vs_nbdkit\":{},\"client_threads_vs_nbdkit\":{},\"fio_vs_server\":{}}}",
                json_string(w.key),
                json_string(if w.random { "IOPS" } else { "MiB/s" }),
                figure_json(a, None),
                figure_json(&client[i], Some((a, w))),
                figure_json(&client_threads[i], Some((a, w))),
                figure_json(&server[i], Some((a, w))),
            ));
        }
        line(&format!(
            "{{\"benchmark\":\"lun\",\"seconds_per_measurement\":{seconds},\"rounds\":{rounds},\"image_bytes\":{size_bytes},\"client_connections\":{},\"results\":[{}]}}",
            args.connections,
            rows.join(",")
        ));
        return Ok(());
    }
    line(&format!(
        "csvfs-bench lun: median of {rounds} round(s) of {seconds} s, {image_mib} MiB image in the page cache, Unix sockets"
    ));
    line("  (a)  fio nbd engine -> nbdkit file plugin (baseline)");
    line(&format!(
        "  (b)  csvfs NbdClient -> same export, one thread pipelining QD requests ({} connections)",
        args.connections
    ));
    line("  (b') csvfs NbdClient -> same export, blocking calls from QD threads");
    line("  (c)  fio nbd engine -> csvfs NBD server");
    line("");
    line(&format!(
        "{:<22} {:>5} {:>9} {:>9} {:>5} {:>9} {:>5} {:>9} {:>5}",
        "workload", "unit", "(a) base", "(b)", "ratio", "(b')", "ratio", "(c)", "ratio"
    ));
    for (i, w) in WORKLOADS.iter().enumerate() {
        let (a, b, bt, c) = (&baseline[i], &client[i], &client_threads[i], &server[i]);
        line(&format!(
            "{:<22} {:>5} {:>9.0} {:>9.0} {:>5.2} {:>9.0} {:>5.2} {:>9.0} {:>5.2}",
            w.label,
            if w.random { "IOPS" } else { "MiB/s" },
            a.headline(w),
            b.headline(w),
            ratio(b, a, w),
            bt.headline(w),
            ratio(bt, a, w),
            c.headline(w),
            ratio(c, a, w),
        ));
    }
    Ok(())
}
