//! `mount.csvfs SPEC DIR -o OPTIONS`: what mount(8) runs for `mount -t csvfs`. It starts
//! `csvfs mount` in the background (its own process group, output to a log file) and
//! returns once the mount is up, or fails with the node's own error message.
//!
//! Options: `node_id=N`, `secret=PATH` (both required unless `config=FILE` gives them),
//! `config=FILE`, `listen=ADDR`, `log=FILE` (default `/var/log/csvfs/<dir>.log`); mount(8)'s
//! generic options (`rw`, `defaults`, `_netdev`, ...) are ignored.

use crate::cli::MountHelperCli;
use crate::local::{is_mounted, log_tail, wait_for, LocalError};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Why the helper failed.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// An option is malformed.
    #[error("bad mount option {0:?}")]
    BadOption(String),
    /// A required option is missing.
    #[error("missing mount option {0}= (give it with -o or in config=FILE)")]
    Missing(&'static str),
    /// The daemon could not be started or did not mount.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The daemon exited before mounting.
    #[error("csvfs mount exited with {status}:\n{tail}")]
    Exited {
        /// Its status.
        status: std::process::ExitStatus,
        /// The end of its log.
        tail: String,
    },
    /// A file step failed.
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
}

/// Runs the helper.
pub fn run(cli: &MountHelperCli) -> Result<(), HelperError> {
    let mut node_id = None;
    let mut secret = None;
    let mut config = None;
    let mut listen = None;
    let mut log = None;
    for opt in cli.options.iter().flat_map(|o| o.split(',')) {
        let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
        match k {
            "node_id" | "node-id" => node_id = Some(v.to_string()),
            "secret" => secret = Some(v.to_string()),
            "config" => config = Some(v.to_string()),
            "listen" => listen = Some(v.to_string()),
            "log" => log = Some(PathBuf::from(v)),
            _ => {}
        }
        if matches!(
            k,
            "node_id" | "node-id" | "secret" | "config" | "listen" | "log"
        ) && v.is_empty()
        {
            return Err(HelperError::BadOption(opt.to_string()));
        }
    }
    if config.is_none() {
        if node_id.is_none() {
            return Err(HelperError::Missing("node_id"));
        }
        if secret.is_none() {
            return Err(HelperError::Missing("secret"));
        }
    }
    let exe = std::env::current_exe().map_err(|source| HelperError::Io {
        what: "find",
        path: PathBuf::from("csvfs"),
        source,
    })?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg("--lun").arg(&cli.spec);
    for (flag, v) in [
        ("--node-id", &node_id),
        ("--secret", &secret),
        ("--config", &config),
        ("--listen", &listen),
    ] {
        if let Some(v) = v {
            cmd.arg(flag).arg(v);
        }
    }
    cmd.arg(&cli.dir);
    if cli.fake {
        return Ok(());
    }
    let log = log.unwrap_or_else(|| {
        let name: String = cli
            .dir
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from("/var/log/csvfs").join(format!("{name}.log"))
    });
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(|source| HelperError::Io {
            what: "create log directory",
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|source| HelperError::Io {
            what: "open log",
            path: log.clone(),
            source,
        })?;
    let err = out.try_clone().map_err(|source| HelperError::Io {
        what: "open log",
        path: log.clone(),
        source,
    })?;
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|source| HelperError::Io {
            what: "start",
            path: PathBuf::from("csvfs mount"),
            source,
        })?;
    let dir = cli.dir.clone();
    let mut exited = None;
    wait_for("the mount", Duration::from_secs(90), || {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return Ok(Some(()));
        }
        Ok(is_mounted(&dir).then_some(()))
    })?;
    if let Some(status) = exited {
        return Err(HelperError::Exited {
            status,
            tail: log_tail(&log, 2000),
        });
    }
    Ok(())
}
