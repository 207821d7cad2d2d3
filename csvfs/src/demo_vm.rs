//! The demo's live-migration step: a small test VM (`hv-runner`, `builtin:test-guest`) whose
//! folder lives on the shared volume runs from node 1's mount and is live-migrated, while
//! the guest writes, to a runner that opens the same folder through node 2's mount. Node 3's
//! mount is the independent witness: the guest's `seq=N` console lines must continue past
//! the switch-over with no gap or repeat, no `MEMFAIL`/`DISKFAIL`, and every heartbeat must
//! have a valid record on the disk (`hv-runner verify-disk`, run on node 3).
//!
//! Every `hv-runner` child is killed when the step leaves early ([`Child`]'s drop), so the
//! demo's teardown finds no process holding files on the mounts. Without a usable
//! `/dev/kvm` the step says SKIPPED.
//!
//! Sequence (runtime dirs and logs under `<demo dir>/hv/`):
//!
//! ```text
//! create --volume m1 --name vm-live ─▶ n1: run m1/vm-live ─▶ console shows seq=..
//!   n2: receive --listen 127.0.0.1:0 --volume m2 ─▶ "listening ADDR"
//!   n1: migrate vm-live --to ADDR ─▶ report; n1 runner exits
//!   console (read on node 3) continues ─▶ n2: stop vm-live ─▶ check console on node 3
//!   n3: verify-disk m3/vm-live --heartbeats N
//! ```

use crate::demo::DemoError;
use crate::local::LocalCluster;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The VM's folder name on the volume (`vm1`..`vm3` are the demo's earlier folders).
pub(crate) const VM_NAME: &str = "vm-live";
/// How long the guest may take to print its first heartbeats (guests may be emulated).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a migration may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long short commands (create, stop) and process exits may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Heartbeats to see before migrating, and after the switch-over.
const HEARTBEATS_BEFORE: u64 = 5;
/// See [`HEARTBEATS_BEFORE`].
const HEARTBEATS_AFTER: u64 = 10;

/// Why the live-migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStepError {
    /// A file or directory operation failed.
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
    /// An `hv-runner` process could not be started.
    #[error("start hv-runner {what}")]
    Spawn {
        /// Which command.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An `hv-runner` command failed.
    #[error("hv-runner {what} exited with {status}; log {log}:\n{tail}")]
    Command {
        /// Which command.
        what: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout_ms} ms waiting for {what}; log {log}:\n{tail}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The deadline.
        timeout_ms: u64,
        /// The most relevant log file.
        log: PathBuf,
        /// The end of it.
        tail: String,
    },
    /// The guest's console or disk shows lost, repeated or corrupt work.
    #[error("guest check failed on {path}: {detail}")]
    Guest {
        /// The console or disk file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl From<VmStepError> for DemoError {
    fn from(e: VmStepError) -> DemoError {
        DemoError::Io {
            what: "live-migrate a running VM",
            path: PathBuf::from(VM_NAME),
            source: std::io::Error::other(e),
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmStepError + 'a {
    move |source| VmStepError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A child process that is killed and reaped when dropped, unless it has exited already.
struct Child {
    child: std::process::Child,
    what: &'static str,
    log: PathBuf,
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Child {
    /// Waits (polling, up to `timeout`) for the process to exit; fails unless it succeeded.
    fn wait_success(&mut self, timeout: Duration) -> Result<(), VmStepError> {
        let status = poll(self.what, timeout, &self.log, || {
            self.child.try_wait().map_err(io("wait for", &self.log))
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(VmStepError::Command {
                what: self.what,
                status,
                log: self.log.clone(),
                tail: crate::local::log_tail(&self.log, 2000),
            })
        }
    }

    /// Fails if the process has exited (whatever its status).
    fn check_running(&mut self) -> Result<(), VmStepError> {
        match self.child.try_wait().map_err(io("wait for", &self.log))? {
            None => Ok(()),
            Some(status) => Err(VmStepError::Command {
                what: self.what,
                status,
                log: self.log.clone(),
                tail: crate::local::log_tail(&self.log, 2000),
            }),
        }
    }
}

/// Polls `f` until it returns `Some`, or fails after `timeout` naming `log`.
fn poll<T>(
    what: &'static str,
    timeout: Duration,
    log: &Path,
    mut f: impl FnMut() -> Result<Option<T>, VmStepError>,
) -> Result<T, VmStepError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(VmStepError::Timeout {
                what,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                log: log.to_path_buf(),
                tail: crate::local::log_tail(log, 2000),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Builds `hv-runner` commands for one node: its own runtime dir, logs to files.
struct Runner {
    bin: PathBuf,
    dir: PathBuf,
}

impl Runner {
    /// Starts `hv-runner --node NODE --runtime-dir DIR/run-NODE ARGS`, stdout to
    /// `DIR/NAME.out` and stderr to `DIR/NAME.log`.
    fn spawn(
        &self,
        node: &str,
        what: &'static str,
        name: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<Child, VmStepError> {
        let run_dir = self.dir.join(format!("run-{node}"));
        std::fs::create_dir_all(&run_dir).map_err(io("create", &run_dir))?;
        let out_path = self.dir.join(format!("{name}.out"));
        let log = self.dir.join(format!("{name}.log"));
        let out = File::create(&out_path).map_err(io("create", &out_path))?;
        let err = File::create(&log).map_err(io("create", &log))?;
        let child = Command::new(&self.bin)
            .arg("--node")
            .arg(node)
            .arg("--runtime-dir")
            .arg(&run_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| VmStepError::Spawn { what, source })?;
        Ok(Child { child, what, log })
    }

    /// Runs a command to completion (with a deadline) and returns its stdout.
    fn run(
        &self,
        node: &str,
        what: &'static str,
        name: &str,
        args: &[&std::ffi::OsStr],
        timeout: Duration,
    ) -> Result<String, VmStepError> {
        let mut c = self.spawn(node, what, name, args)?;
        c.wait_success(timeout)?;
        let out = self.dir.join(format!("{name}.out"));
        std::fs::read_to_string(&out).map_err(io("read", &out))
    }
}

/// The `hv-runner` binary next to `exe`, if there is one.
fn find_hv_runner(exe: &Path) -> Option<PathBuf> {
    Some(exe.parent()?.join("hv-runner")).filter(|p| p.is_file())
}

/// Finds `hv-runner`, building it under `cargo run` when it is missing.
fn hv_runner(exe: &Path, say: fn(&str)) -> Option<PathBuf> {
    if let Some(p) = find_hv_runner(exe) {
        return Some(p);
    }
    let cargo = std::env::var_os("CARGO")?;
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")?;
    say("      building hv-runner (cargo build --release -p hv-runner)");
    let built = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "hv-runner",
            "--bin",
            "hv-runner",
        ])
        .current_dir(Path::new(&manifest).join(".."))
        .status()
        .is_ok_and(|s| s.success());
    if built {
        find_hv_runner(exe)
    } else {
        None
    }
}

/// The `seq=N` values of the complete lines of a console, and any failure line.
fn read_console(path: &Path) -> Result<(Vec<u64>, Option<String>), VmStepError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io("read", path)(e)),
    };
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut seqs = Vec::new();
    let mut fail = None;
    for line in complete.lines() {
        if line.contains("MEMFAIL") || line.contains("DISKFAIL") {
            fail.get_or_insert_with(|| line.to_string());
        }
        if let Some(n) = line.strip_prefix("seq=") {
            let n = n.trim().parse().map_err(|_| VmStepError::Guest {
                path: path.to_path_buf(),
                detail: format!("unreadable console line {line:?}"),
            })?;
            seqs.push(n);
        }
    }
    Ok((seqs, fail))
}

/// The last heartbeat on the console; fails on a MEMFAIL/DISKFAIL line.
fn last_seq(path: &Path) -> Result<Option<u64>, VmStepError> {
    let (seqs, fail) = read_console(path)?;
    if let Some(line) = fail {
        return Err(VmStepError::Guest {
            path: path.to_path_buf(),
            detail: format!("guest reported {line:?}"),
        });
    }
    Ok(seqs.last().copied())
}

/// The demo step: see the module doc. `say` is the demo's progress output.
pub(crate) fn step(cluster: &LocalCluster, say: fn(&str)) -> Result<(), DemoError> {
    Ok(run(cluster, say)?)
}

fn run(cluster: &LocalCluster, say: fn(&str)) -> Result<(), VmStepError> {
    let kvm = Path::new("/dev/kvm");
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        say(&format!(
            "      SKIPPED: cannot open /dev/kvm ({e}); no VM was run"
        ));
        return Ok(());
    }
    let Some(bin) = hv_runner(&cluster.exe, say) else {
        say("      SKIPPED: no hv-runner next to this csvfs binary");
        say("      (build it with `cargo build --release -p hv-runner` and rerun the demo)");
        return Ok(());
    };
    let mp = |id: u32| {
        cluster.mountpoint(id).map_err(|e| VmStepError::Io {
            what: "find the mountpoint of node",
            path: PathBuf::from(id.to_string()),
            source: std::io::Error::other(e),
        })
    };
    let (m1, m2, m3) = (mp(1)?, mp(2)?, mp(3)?);
    let dir = cluster.dir.join("hv");
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let r = Runner { bin, dir };
    let os = |s: &'static str| std::ffi::OsStr::new(s);

    r.run(
        "n1",
        "create",
        "create",
        &[
            os("create"),
            os("--volume"),
            m1.as_os_str(),
            os("--name"),
            os(VM_NAME),
            os("--memory"),
            os("64M"),
            os("--disk-size"),
            os("16M"),
        ],
        COMMAND_TIMEOUT,
    )?;
    say(&format!(
        "      node 1 created {VM_NAME}/ (64 MiB RAM, 16 MiB disk, test guest)"
    ));

    let vm1 = m1.join(VM_NAME);
    let console3 = m3.join(VM_NAME).join("console.log");
    let mut src = r.spawn(
        "n1",
        "run (node 1)",
        "run-n1",
        &[os("run"), vm1.as_os_str()],
    )?;
    let log = src.log.clone();
    let before = poll("guest heartbeats on node 1", BOOT_TIMEOUT, &log, || {
        src.check_running()?;
        Ok(last_seq(&console3)?.filter(|&s| s + 1 >= HEARTBEATS_BEFORE))
    })?;
    say(&format!(
        "      guest running on node 1: console (read on node 3) at seq={before}"
    ));

    let mut dst = r.spawn(
        "n2",
        "receive (node 2)",
        "receive-n2",
        &[
            os("receive"),
            os("--listen"),
            os("127.0.0.1:0"),
            os("--volume"),
            m2.as_os_str(),
        ],
    )?;
    let out = r.dir.join("receive-n2.out");
    let log = dst.log.clone();
    let addr = poll("hv-runner receive to listen", COMMAND_TIMEOUT, &log, || {
        dst.check_running()?;
        let text = std::fs::read_to_string(&out).map_err(io("read", &out))?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("listening "))
            .filter(|_| text.contains('\n'))
            .map(|a| a.trim().to_string()))
    })?;
    say(&format!("      node 2 waits for the VM at {addr}"));

    let report = r.run(
        "n1",
        "migrate",
        "migrate",
        &[
            os("migrate"),
            os(VM_NAME),
            os("--to"),
            std::ffi::OsStr::new(&addr),
        ],
        MIGRATE_TIMEOUT,
    )?;
    match report.lines().find(|l| l.starts_with("migrated ")) {
        Some(line) => say(&format!("      {line}")),
        None => say(&format!("      migrate report: {}", report.trim())),
    }
    src.wait_success(COMMAND_TIMEOUT)?;
    dst.check_running()?;
    let switched = last_seq(&console3)?.unwrap_or(0);
    let after = poll("guest heartbeats on node 2", BOOT_TIMEOUT, &log, || {
        dst.check_running()?;
        Ok(last_seq(&console3)?.filter(|&s| s >= switched + HEARTBEATS_AFTER))
    })?;
    say(&format!(
        "      guest running on node 2: seq={switched} at the switch-over, now seq={after}"
    ));

    r.run(
        "n2",
        "stop",
        "stop",
        &[os("stop"), os(VM_NAME)],
        COMMAND_TIMEOUT,
    )?;
    dst.wait_success(COMMAND_TIMEOUT)?;

    let (seqs, fail) = read_console(&console3)?;
    if let Some(line) = fail {
        return Err(VmStepError::Guest {
            path: console3,
            detail: format!("guest reported {line:?}"),
        });
    }
    if let Some((i, &v)) = (0u64..).zip(&seqs).find(|&(i, &v)| v != i) {
        return Err(VmStepError::Guest {
            path: console3,
            detail: format!("heartbeat {i} is seq={v}: a gap or a repeat"),
        });
    }
    let count = u64::try_from(seqs.len()).unwrap_or(u64::MAX);
    // The disk records, checked by the runner's own checker through node 3's mount.
    let vm3 = m3.join(VM_NAME);
    let count_arg = count.to_string();
    r.run(
        "n3",
        "verify-disk",
        "verify-disk",
        &[
            os("verify-disk"),
            vm3.as_os_str(),
            os("--heartbeats"),
            std::ffi::OsStr::new(&count_arg),
        ],
        COMMAND_TIMEOUT,
    )?;
    say(&format!(
        "      node 3 checked: seq=0..{} without gap or repeat, no MEMFAIL/DISKFAIL, \
         {count} valid disk records",
        count.saturating_sub(1)
    ));
    Ok(())
}
