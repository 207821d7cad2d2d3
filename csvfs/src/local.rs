//! A cluster on one machine, made of real processes: one `csvfs serve-lun` exporting a
//! sparse LUN file over NBD (Unix socket), and N `csvfs mount` node processes, each with
//! its own mountpoint and log. Used by `csvfs demo` and by the cluster tests.
//!
//! Every child runs in its own process group; [`LocalCluster`] kills and unmounts
//! everything it started when dropped, including after a failure. Waiting is always
//! polling with a deadline, never a fixed sleep.
//!
//! Children are started from one thread of this process (the spawner) whose file
//! descriptor table holds nothing but stdin, stdout and stderr, so a child never inherits a
//! descriptor the caller holds on a csvfs mount: `execve` closes every inherited
//! close-on-exec descriptor, and closing a descriptor of a FUSE file flushes it, which
//! waits for the writes in flight on that file and for the node's answer to FLUSH. While
//! the LUN server is down both wait for the LUN, so a LUN server started again by a process
//! with files open on a mount would wait inside its own `execve` for itself.

use metadata_server::format::{mkfs, MkfsError, MkfsOptions, MkfsReport};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

/// Why a local cluster step failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file or directory step failed.
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
    /// A child process could not be started.
    #[error("start {what}")]
    Spawn {
        /// Which process.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A process exited before it was ready.
    #[error("{what} exited with {status} before it was ready; log {log}:\n{tail}")]
    Exited {
        /// Which process.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout_ms: u64,
    },
    /// The LUN could not be opened for mkfs.
    #[error("open the LUN {uri} for mkfs")]
    OpenLun {
        /// The URI.
        uri: String,
        /// Why.
        #[source]
        source: block_client::BlockError,
    },
    /// mkfs failed.
    #[error("mkfs")]
    Mkfs(#[source] MkfsError),
    /// No such node in this cluster.
    #[error("node {0} was never started")]
    NoSuchNode(u32),
}

/// One node process.
#[derive(Debug)]
pub struct NodeProc {
    /// Node id.
    pub id: u32,
    /// Its mountpoint.
    pub mountpoint: PathBuf,
    /// Its log file (stderr and stdout).
    pub log: PathBuf,
    child: Option<Child>,
}

/// A one-machine cluster; see the module doc.
#[derive(Debug)]
pub struct LocalCluster {
    /// The `csvfs` binary.
    pub exe: PathBuf,
    /// Working directory holding the LUN, socket, secret, logs and mountpoints.
    pub dir: PathBuf,
    /// The LUN file.
    pub lun_path: PathBuf,
    /// The LUN's NBD URI.
    pub uri: String,
    /// The cluster secret file.
    pub secret: PathBuf,
    /// Remove `dir` on drop. Default: true.
    pub remove_dir: bool,
    /// Extra environment for node processes (e.g. RUST_LOG).
    pub node_env: Vec<(String, String)>,
    server: Option<Child>,
    server_log: PathBuf,
    nodes: Vec<NodeProc>,
    registry: Arc<Mutex<Registry>>,
}

/// What a [`LocalCluster`] started, shared with [`EmergencyCleanup`].
#[derive(Debug, Default)]
struct Registry {
    pids: Vec<u32>,
    mountpoints: Vec<PathBuf>,
    dir: Option<PathBuf>,
}

/// Tears a cluster down from another thread (a signal watcher) when the thread that owns
/// the [`LocalCluster`] cannot run its drop: SIGTERM to every child, detach every mount.
#[derive(Debug, Clone)]
pub struct EmergencyCleanup(Arc<Mutex<Registry>>);

impl EmergencyCleanup {
    /// Stops every process the cluster started and detaches its mounts. With
    /// `remove_dir`, also deletes the working directory once nothing is mounted there.
    pub fn run(&self, remove_dir: bool) {
        let reg = self.0.lock();
        for &pid in &reg.pids {
            terminate(pid);
        }
        for mp in &reg.mountpoints {
            let _ = wait_for("unmount", Duration::from_secs(5), || {
                Ok((!is_mounted(mp)).then_some(()))
            });
            force_unmount(mp);
        }
        if remove_dir && reg.mountpoints.iter().all(|m| !is_mounted(m)) {
            if let Some(d) = &reg.dir {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LocalError + 'a {
    move |source| LocalError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Drops `pid` from the processes [`EmergencyCleanup`] signals, once it has been reaped
/// (its number may be reused).
fn forget_pid(registry: &Mutex<Registry>, pid: u32) {
    registry.lock().pids.retain(|&p| p != pid);
}

/// Polls `f` every few milliseconds until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>, LocalError>,
) -> Result<T, LocalError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(LocalError::Timeout {
                what: what.to_string(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// True when `path` is the mount point of a mounted csvfs (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    // No canonicalize: resolving the path would send a request into the very mount being
    // checked (and race its unmount).
    let Ok(canon) = std::path::absolute(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| {
        let mut f = l.split(' ');
        let mp = f.nth(4);
        let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
        mp == Some(want.as_str()) && fstype.is_some_and(|t| t.contains("csvfs"))
    })
}

/// Mount points of csvfs mounts on this machine whose LUN (the mount's source) is `lun`.
pub fn mounts_of(lun: &str) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let want = lun.replace(' ', "\\040");
    info.lines()
        .filter_map(|l| {
            let mp = l.split(' ').nth(4)?;
            let mut rest = l.split(" - ").nth(1)?.split(' ');
            let (fstype, source) = (rest.next()?, rest.next()?);
            (fstype.contains("csvfs") && source == want)
                .then(|| PathBuf::from(mp.replace("\\040", " ")))
        })
        .collect()
}

/// The last `max_bytes` of a log file, for error messages.
pub fn log_tail(path: &Path, max_bytes: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let start = s.len().saturating_sub(max_bytes);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// Sends SIGTERM to a process.
pub fn terminate(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Unmounts `path`: a plain unmount first, a lazy detach when it is busy.
pub fn unmount(path: &Path) -> std::io::Result<()> {
    use nix::mount::{umount2, MntFlags};
    match umount2(path, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            umount2(path, MntFlags::MNT_DETACH).map_err(std::io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Detaches a mount left behind by a killed node.
pub fn force_unmount(path: &Path) {
    if is_mounted(path) {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A job for the spawner thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// The spawner thread's queue, or `None` when its descriptor table could not be made its
/// own (jobs then run on the calling thread).
fn spawner() -> Option<&'static mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (jobs, queue) = mpsc::channel::<SpawnJob>();
            let (ready, started) = mpsc::channel();
            std::thread::Builder::new()
                .name("csvfs-spawner".into())
                .spawn(move || {
                    let detached = detach_fd_table();
                    let ok = detached.is_ok();
                    let _ = ready.send(detached);
                    if !ok {
                        return;
                    }
                    for job in queue {
                        // A panicking job must not take the spawner with it; its caller
                        // sees the dropped reply channel.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .ok()?;
            match started.recv() {
                Ok(Ok(())) => Some(jobs),
                Ok(Err(e)) => {
                    tracing::warn!(
                        error = %e,
                        "no private descriptor table for starting children; they inherit \
                         this process's descriptors"
                    );
                    None
                }
                Err(_) => None,
            }
        })
        .as_ref()
}

/// Gives the calling thread a descriptor table of its own and closes everything in it but
/// stdin, stdout and stderr. The copy is taken without closing anything; the closes only
/// drop this thread's references (the rest of the process keeps its descriptors).
fn detach_fd_table() -> std::io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES)?;
    // thread-self: this thread's table, which is no longer the process's.
    let fds: Vec<i32> = std::fs::read_dir("/proc/thread-self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // The directory's own descriptor is in the list and already closed: EBADF.
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// Runs `f` on the spawner thread, whose descriptor table holds only stdin, stdout and
/// stderr (see the module doc), and returns its result; `None` if `f` panicked. Processes
/// `f` starts inherit none of this process's descriptors. `f` must not hand a descriptor
/// it opens to another thread: the number means nothing outside the spawner's table.
fn run_on_spawner<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let Some(jobs) = spawner() else {
        return Some(f());
    };
    let (reply, result) = mpsc::sync_channel(1);
    let job: SpawnJob = Box::new(move || {
        let _ = reply.send(f());
    });
    jobs.send(job).ok()?;
    result.recv().ok()
}

impl LocalCluster {
    /// A cluster in a new directory under `parent`, using the `csvfs` binary `exe`.
    pub fn new(exe: PathBuf, parent: &Path, name: &str) -> Result<LocalCluster, LocalError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() % 1_000_000_000)
            .unwrap_or(0);
        // Start the spawner before this cluster mounts anything: its table is a copy of
        // this process's, and closing a copy of a descriptor on a mount flushes that file.
        let _ = spawner();
        let dir = parent.join(format!("{name}-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let lun_path = dir.join("lun.img");
        let sock = dir.join("lun.sock");
        Ok(LocalCluster {
            exe,
            uri: format!("nbd+unix:///lun?socket={}", sock.display()),
            lun_path,
            secret: dir.join("secret"),
            server_log: dir.join("serve-lun.log"),
            dir,
            remove_dir: true,
            node_env: Vec::new(),
            registry: Arc::new(Mutex::new(Registry::default())),
            server: None,
            nodes: Vec::new(),
        })
    }

    /// A handle that can tear this cluster down from another thread.
    pub fn emergency_cleanup(&self) -> EmergencyCleanup {
        self.registry.lock().dir = Some(self.dir.clone());
        EmergencyCleanup(self.registry.clone())
    }

    /// Creates the sparse LUN file and a random cluster secret.
    pub fn create_lun(&self, size_bytes: u64) -> Result<(), LocalError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&self.lun_path)
            .map_err(io_err("create LUN file", &self.lun_path))?;
        f.set_len(size_bytes)
            .map_err(io_err("size LUN file", &self.lun_path))?;
        let mut rnd = [0u8; 32];
        File::open("/dev/urandom")
            .and_then(|mut u| u.read_exact(&mut rnd))
            .map_err(io_err("read", Path::new("/dev/urandom")))?;
        let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&self.secret, format!("{hex}\n"))
            .map_err(io_err("write secret", &self.secret))?;
        Ok(())
    }

    /// Starts the `csvfs` binary with `args`, stdout and stderr to `log` (appended to, or
    /// truncated first with `truncate`), from the spawner thread (see the module doc).
    fn spawn(
        &self,
        what: &str,
        args: &[&std::ffi::OsStr],
        log: &Path,
        truncate: bool,
    ) -> Result<Child, LocalError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        for (k, v) in &self.node_env {
            cmd.env(k, v);
        }
        let (what, log) = (what.to_string(), log.to_path_buf());
        let gone = LocalError::Spawn {
            what: what.clone(),
            source: std::io::Error::other("the spawner thread failed"),
        };
        run_on_spawner(move || {
            let out = OpenOptions::new()
                .create(true)
                .append(!truncate)
                .write(true)
                .truncate(truncate)
                .open(&log)
                .map_err(io_err("create log", &log))?;
            let err = out.try_clone().map_err(io_err("open log", &log))?;
            cmd.stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|source| LocalError::Spawn { what, source })
        })
        .unwrap_or(Err(gone))
    }

    /// Starts `csvfs serve-lun` on the LUN file and waits until it accepts connections.
    /// Its log is appended to, so a restarted server's log keeps the earlier runs.
    pub fn start_lun_server(&mut self) -> Result<(), LocalError> {
        let sock = self.dir.join("lun.sock");
        let listen = format!("unix:{}", sock.display());
        let child = self.spawn(
            "serve-lun",
            &[
                "serve-lun".as_ref(),
                self.lun_path.as_os_str(),
                "--listen".as_ref(),
                listen.as_ref(),
                "--export".as_ref(),
                "lun".as_ref(),
            ],
            &self.server_log.clone(),
            false,
        )?;
        self.registry.lock().pids.push(child.id());
        self.server = Some(child);
        let log = self.server_log.clone();
        wait_for("the LUN server socket", Duration::from_secs(20), || {
            if let Some(c) = self.server.as_mut() {
                if let Some(status) = c.try_wait().map_err(io_err("wait for serve-lun", &log))? {
                    return Err(LocalError::Exited {
                        what: "serve-lun".into(),
                        status,
                        log: log.clone(),
                        tail: log_tail(&log, 2000),
                    });
                }
            }
            Ok(std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|_| ()))
        })
    }

    /// Formats the LUN in-process through the NBD server.
    pub fn mkfs(&self, options: &MkfsOptions) -> Result<MkfsReport, LocalError> {
        let dev = block_client::open_device(&self.uri).map_err(|source| LocalError::OpenLun {
            uri: self.uri.clone(),
            source,
        })?;
        mkfs(dev, options, &mut |_, _| {}).map_err(LocalError::Mkfs)
    }

    /// Starts node `id` (`csvfs mount`) without waiting for its mount.
    pub fn spawn_node(&mut self, id: u32, extra: &[&str]) -> Result<(), LocalError> {
        let mountpoint = self.dir.join(format!("node{id}"));
        std::fs::create_dir_all(&mountpoint).map_err(io_err("create mountpoint", &mountpoint))?;
        let log = self.dir.join(format!("node{id}.log"));
        let id_s = id.to_string();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "mount".as_ref(),
            "--lun".as_ref(),
            self.uri.as_ref(),
            "--node-id".as_ref(),
            id_s.as_ref(),
            "--secret".as_ref(),
            self.secret.as_os_str(),
        ];
        args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
        args.push(mountpoint.as_os_str());
        let child = self.spawn(&format!("node {id}"), &args, &log, true)?;
        self.nodes.retain(|n| n.id != id);
        {
            let mut reg = self.registry.lock();
            reg.pids.push(child.id());
            reg.mountpoints.push(mountpoint.clone());
        }
        self.nodes.push(NodeProc {
            id,
            mountpoint,
            log,
            child: Some(child),
        });
        Ok(())
    }

    /// Waits until node `id` is mounted, failing early if its process exits.
    pub fn wait_mounted(&mut self, id: u32, timeout: Duration) -> Result<PathBuf, LocalError> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or(LocalError::NoSuchNode(id))?;
        let (mp, log) = (node.mountpoint.clone(), node.log.clone());
        wait_for(&format!("node {id} to mount"), timeout, || {
            if let Some(c) = node.child.as_mut() {
                if let Some(status) = c.try_wait().map_err(io_err("wait for node", &log))? {
                    return Err(LocalError::Exited {
                        what: format!("node {id}"),
                        status,
                        log: log.clone(),
                        tail: log_tail(&log, 3000),
                    });
                }
            }
            Ok(is_mounted(&mp).then_some(()))
        })?;
        Ok(mp)
    }

    /// Starts node `id` and waits for its mount.
    pub fn mount_node(&mut self, id: u32, timeout: Duration) -> Result<PathBuf, LocalError> {
        self.spawn_node(id, &[])?;
        self.wait_mounted(id, timeout)
    }

    /// The mountpoint of node `id`.
    pub fn mountpoint(&self, id: u32) -> Result<PathBuf, LocalError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.mountpoint.clone())
            .ok_or(LocalError::NoSuchNode(id))
    }

    /// The process id of node `id` while it runs.
    pub fn node_pid(&self, id: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .and_then(|n| n.child.as_ref())
            .map(Child::id)
    }

    /// The nodes started so far.
    pub fn nodes(&self) -> &[NodeProc] {
        &self.nodes
    }

    /// Log files of the LUN server and every node.
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut v = vec![self.server_log.clone()];
        v.extend(self.nodes.iter().map(|n| n.log.clone()));
        v
    }

    /// Unmounts node `id` cleanly (SIGTERM) and waits for its process to exit.
    /// Returns its exit status.
    pub fn unmount_node(
        &mut self,
        id: u32,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, LocalError> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or(LocalError::NoSuchNode(id))?;
        let Some(child) = node.child.as_mut() else {
            return Err(LocalError::NoSuchNode(id));
        };
        terminate(child.id());
        let status = wait_for(&format!("node {id} to exit"), timeout, || {
            child.try_wait().map_err(io_err("wait for node", &node.log))
        })?;
        forget_pid(&self.registry, child.id());
        node.child = None;
        Ok(status)
    }

    /// Kills node `id` with SIGKILL (a crash) and detaches its mount if it is left.
    pub fn kill_node(&mut self, id: u32) -> Result<(), LocalError> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or(LocalError::NoSuchNode(id))?;
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            forget_pid(&self.registry, c.id());
        }
        let mp = node.mountpoint.clone();
        // With fusermount's auto-unmount the mount goes away by itself; without it, detach.
        let gone = wait_for(
            "the killed node's mount to go",
            Duration::from_secs(5),
            || Ok((!is_mounted(&mp)).then_some(())),
        );
        if gone.is_err() {
            force_unmount(&mp);
        }
        Ok(())
    }

    /// Stops everything: nodes (SIGTERM, then SIGKILL), mounts, the LUN server.
    pub fn shutdown(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                if matches!(c.try_wait(), Ok(None)) {
                    terminate(c.id());
                }
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let exited = wait_for("node exit", Duration::from_secs(10), || {
                    Ok(c.try_wait().ok().flatten())
                });
                if exited.is_err() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            force_unmount(&n.mountpoint);
        }
        if let Some(mut s) = self.server.take() {
            terminate(s.id());
            let exited = wait_for("LUN server exit", Duration::from_secs(10), || {
                Ok(s.try_wait().ok().flatten())
            });
            if exited.is_err() {
                let _ = s.kill();
                let _ = s.wait();
            }
        }
    }

    /// Stops the LUN server (SIGTERM: it finishes the requests in flight, flushes the LUN
    /// file and removes its socket) and waits for it to exit.
    pub fn stop_lun_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            terminate(s.id());
            let exited = wait_for("LUN server exit", Duration::from_secs(10), || {
                Ok(s.try_wait().ok().flatten())
            });
            if exited.is_err() {
                let _ = s.kill();
                let _ = s.wait();
            }
            forget_pid(&self.registry, s.id());
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
        if self.remove_dir {
            for n in &self.nodes {
                if is_mounted(&n.mountpoint) {
                    // Never delete through a live mount.
                    return;
                }
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
