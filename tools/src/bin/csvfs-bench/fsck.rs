//! `csvfs-bench fsck`: the volume tools and the journal.
//!
//! 1. mkfs of a 1 TiB sparse volume (in-process, on a sparse file).
//! 2. fsck (read-only, forced) of that volume after the metadata store filled it with
//!    `--files` files in `--dirs` directories and one fragmented file of `--big-gib` GiB
//!    (allocated one cluster at a time, interleaved with a second file, so every cluster is
//!    its own extent). The data region is never written: the volume stays sparse.
//! 3. Journal commit throughput (records of 256 bytes, `append` = submit + wait for group
//!    commit) with 1 and 16 writers on a LUN served over NBD by our server, next to the
//!    baseline measured in the same run: the rate of 4 KiB write + flush pairs on the same
//!    NBD connection, and on the backing file directly (the raw LUN).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use block_client::nbd::{serve, ListenAddr, ServeOptions};
use block_client::{BlockDevice, FileDevice, FileOptions, NbdClient, NbdClientOptions, WriteFlags};
use clap::Args;
use csvfs_tools::fsck::{self, FsckOptions, Mode};
use journal::{Epoch as JEpoch, Journal};
use metadata_server::format::{mkfs, MkfsOptions};
use metadata_server::proto::{Caller, Request, Response};
use metadata_server::store::Store;
use metadata_server::types::{Epoch, FileKind, InodeId, NodeId, RequestId};
use metadata_server::MetadataStore;

use crate::output::{json_number, line, progress};

/// Options of `csvfs-bench fsck`.
#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Scratch directory for the sparse images. Default: the system temp directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Files to create for the fsck measurement (count). Default: 100000.
    #[arg(long, default_value_t = 100_000)]
    files: u64,
    /// Directories to spread them over (count). Default: 1000.
    #[arg(long, default_value_t = 1000)]
    dirs: u64,
    /// Size of the fragmented file in GiB. Default: 10.
    #[arg(long, default_value_t = 10)]
    big_gib: u64,
    /// Seconds per journal throughput measurement. Default: 5.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients filling the volume (count). Default: 16.
    #[arg(long, default_value_t = 16)]
    fill_threads: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sparse_file(path: &std::path::Path, size_bytes: u64) -> anyhow::Result<Arc<dyn BlockDevice>> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size_bytes)?;
    drop(f);
    Ok(Arc::new(FileDevice::open(path, FileOptions::default())?))
}

fn execute(s: &Store, node: u32, req: &mut u64, r: Request) -> anyhow::Result<Response> {
    *req += 1;
    let c = Caller {
        node: NodeId(node),
        request: RequestId(*req),
        uid: 0,
        gid: 0,
    };
    s.execute(&c, &r).map_err(|e| anyhow::anyhow!("{r:?}: {e}"))
}

fn create(
    s: &Store,
    node: u32,
    req: &mut u64,
    parent: InodeId,
    name: String,
    kind: FileKind,
) -> anyhow::Result<InodeId> {
    match execute(
        s,
        node,
        req,
        Request::Create {
            parent,
            name: name.into_bytes(),
            kind,
            perm: 0o644,
            rdev: 0,
            exclusive: true,
        },
    )? {
        Response::Attr(a) => Ok(a.ino),
        other => bail!("create answered {other:?}"),
    }
}

/// Fills the volume: dirs, files spread over them by `threads` clients, then the big file.
fn fill(s: &Arc<Store>, a: &FsckArgs, cluster_bytes: u64) -> anyhow::Result<()> {
    let mut req = 0;
    let mut dirs = Vec::new();
    for d in 0..a.dirs {
        dirs.push(create(
            s,
            1,
            &mut req,
            InodeId::ROOT,
            format!("dir{d:04}"),
            FileKind::Dir,
        )?);
    }
    let dirs = Arc::new(dirs);
    let next = Arc::new(AtomicU64::new(0));
    let threads = a.fill_threads.clamp(1, 64);
    let mut hs = Vec::new();
    for t in 0..threads {
        let (s, dirs, next) = (s.clone(), dirs.clone(), next.clone());
        let total = a.files;
        let node = u32::try_from(t % 4 + 1).expect("small");
        hs.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let mut req = (t + 1) << 40;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return Ok(());
                }
                let d = dirs[usize::try_from(i % dirs.len() as u64).expect("index")];
                create(&s, node, &mut req, d, format!("file{i:06}"), FileKind::File)?;
                if i % 10_000 == 0 {
                    progress(&format!("created {i} files"));
                }
            }
        }));
    }
    for h in hs {
        h.join()
            .map_err(|_| anyhow::anyhow!("a fill thread panicked"))??;
    }
    let big = create(
        s,
        1,
        &mut req,
        InodeId::ROOT,
        "big.img".into(),
        FileKind::File,
    )?;
    let filler = create(
        s,
        1,
        &mut req,
        InodeId::ROOT,
        "filler.img".into(),
        FileKind::File,
    )?;
    let clusters = (a.big_gib << 30) / cluster_bytes;
    for k in 0..clusters {
        for ino in [big, filler] {
            execute(
                s,
                1,
                &mut req,
                Request::Allocate {
                    ino,
                    offset_bytes: k * cluster_bytes,
                    len_bytes: cluster_bytes,
                    hint_bytes: 0,
                },
            )?;
        }
        if k % 2048 == 0 {
            progress(&format!("fragmented file: {k}/{clusters} clusters"));
        }
    }
    Ok(())
}

/// Rate of (4 KiB write, flush) pairs on `dev` for `seconds`.
fn flush_rate(dev: &dyn BlockDevice, at: u64, seconds: u64) -> anyhow::Result<f64> {
    let buf = vec![0x5au8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        dev.write_at(&buf, at + (n % 64) * 4096, WriteFlags::default())?;
        dev.flush()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Journal appends per second with `writers` threads for `seconds`.
fn journal_rate(j: &Arc<Journal>, writers: u64, seconds: u64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for _ in 0..writers {
        let (j, stop, count) = (j.clone(), stop.clone(), count.clone());
        hs.push(std::thread::spawn(move || -> anyhow::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                match j.append(vec![0xa5; 256]) {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(journal::JournalError::Full { .. }) => {
                        let _ = j.checkpoint(j.durable_lsn());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        }));
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::SeqCst);
    for h in hs {
        h.join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    Ok(count.load(Ordering::SeqCst) as f64 / start.elapsed().as_secs_f64())
}

/// Runs the benchmark.
pub fn run(a: &FsckArgs) -> anyhow::Result<()> {
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = Scratch(base.join(format!("csvfs-bench-fsck-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;

    // 1. mkfs of 1 TiB.
    let img = dir.0.join("vol.img");
    let dev = sparse_file(&img, 1 << 40)?;
    progress("mkfs of a 1 TiB sparse volume");
    let t = Instant::now();
    let rep = mkfs(dev.clone(), &MkfsOptions::default(), &mut |_, _| {})?;
    let mkfs_s = t.elapsed().as_secs_f64();
    let cluster_bytes = u64::from(rep.superblock.geometry.cluster_bytes);

    // 2. Fill through the store, then fsck.
    progress(&format!(
        "filling: {} files in {} directories and a {} GiB fragmented file",
        a.files, a.dirs, a.big_gib
    ));
    let t = Instant::now();
    let store = Arc::new(
        Store::open(dev.clone(), Epoch(1)).map_err(|e| anyhow::anyhow!("open store: {e}"))?,
    );
    fill(&store, a, cluster_bytes)?;
    store
        .shutdown()
        .map_err(|e| anyhow::anyhow!("shutdown: {e}"))?;
    drop(store);
    let fill_s = t.elapsed().as_secs_f64();
    let used_bytes = std::fs::metadata(&img).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    })?;
    progress("fsck -n -f");
    let t = Instant::now();
    let report = fsck::run(
        dev.clone(),
        &FsckOptions {
            mode: Mode::ReadOnly,
            force: true,
            ..FsckOptions::default()
        },
    )?;
    let fsck_s = t.elapsed().as_secs_f64();
    if !report.findings.is_empty() {
        bail!(
            "fsck found {} problems on a volume the store made: {:?}",
            report.findings.len(),
            report.findings.first()
        );
    }
    drop(dev);
    let _ = std::fs::remove_file(&img);

    // 3. Journal throughput over NBD, and the flush baselines.
    // A real LUN has its blocks allocated: write the image out so neither figure pays for
    // the backing file system allocating blocks.
    let lun = dir.0.join("lun.img");
    let raw = sparse_file(&lun, 256 << 20)?;
    let zeros = vec![0u8; 1 << 20];
    for mib in 0..256u64 {
        raw.write_at(&zeros, mib << 20, WriteFlags::default())?;
    }
    raw.flush()?;
    // Warm-up (the first flushes after writing the image out pay for it), not reported.
    flush_rate(raw.as_ref(), 200 << 20, 1)?;
    let handle = serve(
        &lun,
        &ListenAddr::Unix(dir.0.join("lun.sock")),
        ServeOptions::default(),
    )?;
    let client: Arc<dyn BlockDevice> =
        Arc::new(NbdClient::open(&handle.uri(), NbdClientOptions::default())?);
    progress("NBD: write + flush rate");
    let nbd_rate = flush_rate(client.as_ref(), 200 << 20, a.seconds)?;
    Journal::format(client.clone(), 1 << 20, 64 << 20, JEpoch(1))?;
    let (j, _) = Journal::open(client.clone(), 1 << 20, 64 << 20, JEpoch(1))?;
    let j = Arc::new(j);
    progress("journal over NBD, 1 writer");
    let j1 = journal_rate(&j, 1, a.seconds)?;
    progress("journal over NBD, 16 writers");
    let j16 = journal_rate(&j, 16, a.seconds)?;
    drop(j);
    drop(client);
    drop(handle);
    progress("raw LUN: write + flush rate");
    let raw_rate = flush_rate(raw.as_ref(), 200 << 20, a.seconds)?;
    drop(raw);

    if a.json {
        line(&format!(
            "{{\"mkfs_1tib_s\":{},\"fill_s\":{},\"fsck_s\":{},\"fsck_inodes\":{},\"fsck_dirs\":{},\"image_used_bytes\":{used_bytes},\"raw_write_flush_per_s\":{},\"nbd_write_flush_per_s\":{},\"journal_1_writer_tx_per_s\":{},\"journal_16_writers_tx_per_s\":{}}}",
            json_number(mkfs_s),
            json_number(fill_s),
            json_number(fsck_s),
            report.inodes,
            report.directories,
            json_number(raw_rate),
            json_number(nbd_rate),
            json_number(j1),
            json_number(j16),
        ));
        return Ok(());
    }
    line("csvfs-bench fsck");
    line(&format!(
        "  mkfs.csvfs, 1 TiB sparse volume           {:>10.1} ms",
        mkfs_s * 1000.0
    ));
    line(&format!(
        "  fill through the store ({} files, {} dirs, {} GiB fragmented file)  {fill_s:.1} s, image uses {} MiB",
        a.files,
        a.dirs,
        a.big_gib,
        used_bytes >> 20
    ));
    line(&format!(
        "  fsck.csvfs -n -f ({} inodes, {} directories)  {fsck_s:>10.2} s",
        report.inodes, report.directories
    ));
    line("  journal commits on a LUN served over NBD (256-byte records)");
    line(&format!(
        "    baseline: raw LUN (file) write+flush    {raw_rate:>10.0} /s"
    ));
    line(&format!(
        "    baseline: NBD write+flush               {nbd_rate:>10.0} /s"
    ));
    line(&format!(
        "    journal, 1 writer                       {j1:>10.0} tx/s  ({:.2}x NBD flush rate)",
        j1 / nbd_rate.max(1e-9)
    ));
    line(&format!(
        "    journal, 16 writers (group commit)      {j16:>10.0} tx/s  ({:.2}x NBD flush rate)",
        j16 / nbd_rate.max(1e-9)
    ));
    Ok(())
}
