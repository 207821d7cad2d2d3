//! Cluster test harness: a LUN file served over NBD by `csvfs serve-lun` and N `csvfs
//! mount` node processes, each in its own process group with its own mountpoint and log
//! (see `csvfs::local`). Waits poll with deadlines. On drop every process is killed and
//! every mount detached. [`TestCluster::finish`] unmounts the nodes cleanly, runs fsck -n
//! in-process on the LUN and fails on any finding, and fails the test if a log holds an
//! ERROR line the test did not declare with [`TestCluster::expect_error`].

use csvfs::local::{is_mounted, LocalCluster};
use csvfs_tools::fsck::{self, FsckOptions, Mode};
use metadata_server::format::MkfsOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Deterministic test bytes for `seed`: an xorshift stream.
pub fn pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

/// How long a node may take to mount.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// The workspace's release `csvfs` binary, built once per test process.
pub fn csvfs_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ lives in the workspace")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "csvfs", "--bin", "csvfs"])
            .current_dir(&root)
            .status()
            .expect("run cargo build for the csvfs binary");
        assert!(status.success(), "building the csvfs binary failed");
        // The test binary is target/release/deps/<name>; csvfs sits in target/release.
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in target/<profile>/deps");
        let p = dir.join("csvfs");
        assert!(p.is_file(), "no csvfs binary at {}", p.display());
        p
    })
    .clone()
}

/// Settings of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Name (directory prefix).
    pub name: String,
    /// Node ids to mount, started in order (the first one becomes coordinator).
    pub nodes: Vec<u32>,
    /// LUN size in bytes (sparse file).
    pub lun_bytes: u64,
    /// mkfs options.
    pub mkfs: MkfsOptions,
    /// Extra `csvfs mount` flags for every node.
    pub mount_flags: Vec<String>,
}

impl ClusterSpec {
    /// `nodes` nodes on an 8 GiB LUN with default mkfs options.
    pub fn new(name: &str, nodes: u32) -> ClusterSpec {
        ClusterSpec {
            name: name.to_string(),
            nodes: (1..=nodes).collect(),
            lun_bytes: 8 << 30,
            mkfs: MkfsOptions::default(),
            mount_flags: Vec::new(),
        }
    }
}

/// A running test cluster; see the module doc.
#[derive(Debug)]
pub struct TestCluster {
    /// The processes.
    pub local: LocalCluster,
    expected_errors: Vec<String>,
    finished: bool,
    flags: Vec<String>,
}

impl TestCluster {
    /// Starts a cluster: LUN, NBD server, mkfs, then every node mounted.
    pub fn start(spec: ClusterSpec) -> TestCluster {
        let exe = csvfs_exe();
        let mut local = LocalCluster::new(exe, &std::env::temp_dir(), &spec.name)
            .expect("create cluster directory");
        local.node_env = vec![("RUST_LOG".into(), "info".into())];
        let mut c = TestCluster {
            local,
            // A worker answering a request the kernel dropped while the mount went away
            // (fuser logs that at ERROR): nothing is lost, there is no one to answer.
            expected_errors: vec![
                "Failed to send FUSE reply: No such file or directory".to_string(),
                "Failed to send FUSE reply: No such device".to_string(),
            ],
            finished: false,
            flags: spec.mount_flags.clone(),
        };
        c.local.create_lun(spec.lun_bytes).expect("create LUN");
        c.local.start_lun_server().expect("start LUN server");
        c.local.mkfs(&spec.mkfs).expect("mkfs");
        let mut rest = spec.nodes.iter();
        if let Some(&first) = rest.next() {
            c.mount(first);
        }
        let rest: Vec<u32> = rest.copied().collect();
        for &id in &rest {
            c.spawn(id);
        }
        for &id in &rest {
            c.local
                .wait_mounted(id, MOUNT_TIMEOUT)
                .unwrap_or_else(|e| panic!("node {id} did not mount: {e}"));
        }
        c
    }

    fn spawn(&mut self, id: u32) {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.local
            .spawn_node(id, &flags)
            .unwrap_or_else(|e| panic!("start node {id}: {e}"));
    }

    /// Starts node `id` (again) and waits for its mount.
    pub fn mount(&mut self, id: u32) -> PathBuf {
        self.spawn(id);
        self.local
            .wait_mounted(id, MOUNT_TIMEOUT)
            .unwrap_or_else(|e| panic!("node {id} did not mount: {e}"))
    }

    /// Mountpoint of node `id`.
    pub fn mp(&self, id: u32) -> PathBuf {
        self.local.mountpoint(id).expect("node exists")
    }

    /// The LUN URI.
    pub fn uri(&self) -> String {
        self.local.uri.clone()
    }

    /// Declares that logs may contain ERROR lines containing `pattern`.
    pub fn expect_error(&mut self, pattern: &str) {
        self.expected_errors.push(pattern.to_string());
    }

    /// Kills node `id` with SIGKILL.
    pub fn kill(&mut self, id: u32) {
        self.local.kill_node(id).expect("kill node");
    }

    /// Sends signal `sig` to node `id` (SIGSTOP pauses it, SIGCONT resumes it).
    pub fn signal(&self, id: u32, sig: i32) {
        let pid = self.local.node_pid(id).expect("node runs");
        // A plain kill(2) through the `kill` utility keeps unsafe code out of tests.
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Unmounts node `id` cleanly and checks it exited with success.
    pub fn unmount(&mut self, id: u32) {
        let status = self
            .local
            .unmount_node(id, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("unmount node {id}: {e}"));
        assert!(status.success(), "node {id} exited with {status}");
        assert!(!is_mounted(&self.mp(id)), "node {id} still mounted");
    }

    /// ERROR lines in the logs that no `expect_error` pattern covers.
    pub fn unexpected_errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        for log in self.local.logs() {
            let Ok(text) = std::fs::read_to_string(&log) else {
                continue;
            };
            for line in text.lines() {
                if line.contains(" ERROR ")
                    && !self
                        .expected_errors
                        .iter()
                        .any(|p| line.contains(p.as_str()))
                {
                    out.push(format!("{}: {line}", log.display()));
                }
            }
        }
        out
    }

    /// Runs fsck -n on the LUN in-process; panics on any finding.
    pub fn fsck(&self) {
        let dev = block_client::open_device(&self.local.uri).expect("open LUN for fsck");
        let report = fsck::run(
            dev,
            &FsckOptions {
                mode: Mode::ReadOnly,
                force: true,
                ..FsckOptions::default()
            },
        )
        .expect("fsck runs");
        assert!(
            report.findings.is_empty(),
            "fsck -n found problems: {:#?}",
            report.findings
        );
    }

    /// Unmounts every running node (coordinator last), runs fsck -n, and checks the logs.
    pub fn finish(mut self) {
        let mut ids: Vec<u32> = self
            .local
            .nodes()
            .iter()
            .filter(|n| is_mounted(&n.mountpoint))
            .map(|n| n.id)
            .collect();
        ids.sort_unstable();
        for id in ids.into_iter().rev() {
            self.unmount(id);
        }
        self.fsck();
        self.finished = true;
        let errors = self.unexpected_errors();
        assert!(
            errors.is_empty(),
            "undeclared ERROR lines:\n{}",
            errors.join("\n")
        );
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the evidence: logs stay in the directory.
            self.local.remove_dir = false;
            eprintln!("cluster logs kept in {}", self.local.dir.display());
            return;
        }
        if !self.finished {
            let errors = self.unexpected_errors();
            if !errors.is_empty() {
                self.local.remove_dir = false;
                panic!("undeclared ERROR lines:\n{}", errors.join("\n"));
            }
        }
    }
}
