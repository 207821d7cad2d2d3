//! The runner process around one VM: the control socket (`<runtime-dir>/<name>.sock`), the
//! owner heartbeat, and the commands the CLI sends (status, stop, save, migrate).
//!
//! Control protocol: the client sends one JSON [`Request`] line; the runner answers with
//! zero or more `{"progress": "..."}` lines and one final [`Reply`] line.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::migration::{self, MigrateError, MigrateOptions, Report};
use crate::vm::Vm;

/// Errors of the runner process.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The control socket could not be set up.
    #[error("control socket {path}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another runner serves this VM name here.
    #[error("a runner for vm {name} already listens on {path}")]
    AlreadyRunning {
        /// VM name.
        name: String,
        /// Socket path.
        path: PathBuf,
    },
    /// Talking to a runner failed.
    #[error("control request to {path}")]
    Client {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The runner answered with an error.
    #[error("{0}")]
    Remote(String),
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Report state.
    Status,
    /// Stop the VM (flush and close its disk) and exit.
    Stop,
    /// Save the VM into its folder and exit.
    Save,
    /// Live-migrate the VM.
    Migrate(MigrateOptions),
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// VM name.
    pub name: String,
    /// VM folder.
    pub dir: PathBuf,
    /// Node name.
    pub node: String,
    /// Runner pid.
    pub pid: u32,
    /// `running`, `migrating` or `exited: <reason>`.
    pub state: String,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Disk reads, writes, flushes so far.
    pub disk_ops: [u64; 3],
}

/// Final reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// Error message when not ok.
    pub error: Option<String>,
    /// Status (for `status`).
    pub status: Option<Status>,
    /// Migration figures (for `migrate`).
    pub report: Option<Report>,
}

impl Reply {
    fn ok() -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
            report: None,
        }
    }
    fn err(e: &dyn std::error::Error) -> Self {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Self {
            ok: false,
            error: Some(msg),
            status: None,
            report: None,
        }
    }
}

/// Path of the control socket of `name`.
pub fn socket_path(runtime_dir: &Path, name: &str) -> PathBuf {
    runtime_dir.join(format!("{name}.sock"))
}

/// Serves `vm` (already started) until it stops, is saved or migrates away. Returns why.
pub fn serve(vm: Vm, node: &str, runtime_dir: &Path) -> Result<String, RunnerError> {
    let vm = Arc::new(vm);
    let path = socket_path(runtime_dir, &vm.dir.name);
    let sock_err = |source| RunnerError::Socket {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(runtime_dir).map_err(sock_err)?;
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(RunnerError::AlreadyRunning {
                name: vm.dir.name.clone(),
                path,
            });
        }
        std::fs::remove_file(&path).map_err(sock_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(sock_err)?;
    let (tx, rx) = mpsc::channel::<String>();
    {
        let vm = Arc::clone(&vm);
        let node = node.to_owned();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let vm = Arc::clone(&vm);
                    let node = node.clone();
                    let tx = tx.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || handle(conn, &vm, &node, &tx));
                }
            })
            .map_err(sock_err)?;
    }
    tracing::info!(vm = %vm.dir.name, node, socket = %path.display(), "vm running");
    let reason = loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(reason) => break reason,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(r) = vm.exited() {
                    if !vm.migrating.load(Ordering::SeqCst) {
                        break r;
                    }
                }
                vm.heartbeat_owner(node);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break "control thread ended".into(),
        }
    };
    vm.stop();
    if let Err(e) = vm.close_devices() {
        tracing::error!(vm = %vm.dir.name, error = %e, "closing devices failed");
    }
    vm.release_owner();
    let _ = std::fs::remove_file(&path);
    tracing::info!(vm = %vm.dir.name, reason = %reason, "runner exits");
    Ok(reason)
}

fn send(conn: &mut UnixStream, v: &impl Serialize) {
    let mut line = serde_json::to_vec(v).expect("reply serializes");
    line.push(b'\n');
    let _ = conn.write_all(&line);
}

fn handle(conn: UnixStream, vm: &Vm, node: &str, exit: &mpsc::Sender<String>) {
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() {
        return;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return send(&mut w, &Reply::err(&e)),
    };
    match req {
        Request::Status => {
            let state = if vm.migrating.load(Ordering::SeqCst) {
                "migrating".to_owned()
            } else if let Some(r) = vm.exited() {
                format!("exited: {r}")
            } else {
                "running".to_owned()
            };
            let s = vm.blk_stats();
            let mut r = Reply::ok();
            r.status = Some(Status {
                name: vm.dir.name.clone(),
                dir: vm.dir.dir.clone(),
                node: node.to_owned(),
                pid: std::process::id(),
                state,
                memory_mib: vm.cfg.memory_mib,
                disk_ops: [s.reads, s.writes, s.flushes],
            });
            send(&mut w, &r);
        }
        Request::Stop => {
            if vm.migrating.swap(true, Ordering::SeqCst) {
                return send(
                    &mut w,
                    &Reply::err(&MigrateError::AlreadyMigrating(vm.dir.name.clone())),
                );
            }
            vm.pause();
            send(&mut w, &Reply::ok());
            let _ = exit.send("stopped by request".into());
        }
        Request::Save => {
            if vm.migrating.swap(true, Ordering::SeqCst) {
                return send(
                    &mut w,
                    &Reply::err(&MigrateError::AlreadyMigrating(vm.dir.name.clone())),
                );
            }
            match migration::save(vm, node) {
                Ok(()) => {
                    send(&mut w, &Reply::ok());
                    let _ = exit.send(format!("saved to {}", vm.dir.state_path().display()));
                }
                Err(e) => {
                    vm.migrating.store(false, Ordering::SeqCst);
                    send(&mut w, &Reply::err(&e));
                }
            }
        }
        Request::Migrate(opts) => {
            if vm.migrating.swap(true, Ordering::SeqCst) {
                return send(
                    &mut w,
                    &Reply::err(&MigrateError::AlreadyMigrating(vm.dir.name.clone())),
                );
            }
            tracing::info!(vm = %vm.dir.name, to = %opts.to, "migration starts");
            let mut w2 = match w.try_clone() {
                Ok(w2) => w2,
                Err(e) => return send(&mut w, &Reply::err(&e)),
            };
            let mut progress = |msg: &str| {
                tracing::info!(vm = %vm.dir.name, "{msg}");
                send(&mut w2, &serde_json::json!({ "progress": msg }));
            };
            match migration::migrate(vm, node, &opts, &mut progress) {
                Ok(report) => {
                    tracing::info!(vm = %vm.dir.name, ?report, "migration done");
                    let mut r = Reply::ok();
                    r.report = Some(report);
                    send(&mut w, &r);
                    let _ = exit.send(format!("migrated to {}", opts.to));
                }
                Err(e) => {
                    vm.migrating.store(false, Ordering::SeqCst);
                    send(&mut w, &Reply::err(&e));
                }
            }
        }
    }
}

/// Sends `req` to the runner of `name`; progress lines go to `progress`.
pub fn request(
    runtime_dir: &Path,
    name: &str,
    req: &Request,
    progress: &mut dyn FnMut(&str),
) -> Result<Reply, RunnerError> {
    let path = socket_path(runtime_dir, name);
    let cerr = |source| RunnerError::Client {
        path: path.clone(),
        source,
    };
    let mut conn = UnixStream::connect(&path).map_err(cerr)?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    conn.write_all(&line).map_err(cerr)?;
    for l in BufReader::new(conn).lines() {
        let l = l.map_err(cerr)?;
        let v: serde_json::Value = serde_json::from_str(&l)
            .map_err(|e| RunnerError::Remote(format!("bad reply line: {e}")))?;
        if let Some(p) = v.get("progress").and_then(|p| p.as_str()) {
            progress(p);
            continue;
        }
        let r: Reply = serde_json::from_value(v)
            .map_err(|e| RunnerError::Remote(format!("bad reply: {e}")))?;
        if !r.ok {
            return Err(RunnerError::Remote(r.error.unwrap_or_default()));
        }
        return Ok(r);
    }
    Err(RunnerError::Remote(
        "runner closed the connection without a reply".into(),
    ))
}
