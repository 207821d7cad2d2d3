#![allow(clippy::tests_outside_test_module)]
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! hv-runner on csvfs: a two-node cluster on this machine (LUN served over NBD, two
//! `csvfs mount` processes), a VM whose folder lives on the shared volume, run from node 1's
//! mount and live-migrated to a runner that opens the same folder through node 2's mount,
//! and back. The guest's disk writes continue across both switch-overs; the heartbeat
//! sequence has no gap or repeat, every disk record is valid, and fsck is clean afterwards.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use csvfs::local::LocalCluster;
use metadata_server::format::MkfsOptions;

/// Builds the binaries this test drives and returns the profile directory holding them.
fn bins() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "hv-runner",
        "-p",
        "csvfs",
        "-p",
        "csvfs-tools",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd.env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
    assert!(cmd.status().unwrap().success(), "building binaries failed");
    profile_dir
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st.success();
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Runner {
    bin: PathBuf,
    root: PathBuf,
}

impl Runner {
    fn cmd(&self, node: &str) -> Command {
        let mut c = Command::new(&self.bin);
        c.env(
            "HV_RUNNER_RUNTIME_DIR",
            self.root.join(format!("run-{node}")),
        )
        .env("HV_RUNNER_NODE", node)
        .env("RUST_LOG", "info");
        c
    }
    fn ok(&self, node: &str, args: &[&str]) -> Output {
        let o = self.cmd(node).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "hv-runner {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }
    fn receive(&self, node: &str, volume: &Path) -> (Proc, String) {
        let mut child = self
            .cmd(node)
            .args(["receive", "--listen", "127.0.0.1:0", "--volume"])
            .arg(volume)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line.strip_prefix("listening ").unwrap().trim().to_owned();
        std::thread::spawn(move || for _ in out.lines() {});
        (Proc(child), addr)
    }
}

fn seqs(console: &str) -> Vec<u64> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("seq="))
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

fn last_seq(console: &Path) -> Option<u64> {
    seqs(&std::fs::read_to_string(console).unwrap_or_default())
        .last()
        .copied()
}

#[test]
fn live_migration_between_two_csvfs_nodes() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());
    let profile = bins();
    phase("built");
    let mut cluster =
        LocalCluster::new(profile.join("csvfs"), &std::env::temp_dir(), "hv-csvfs").unwrap();
    cluster.create_lun(2 << 30).unwrap();
    cluster.start_lun_server().unwrap();
    cluster
        .mkfs(&MkfsOptions {
            label: "hv".into(),
            ..MkfsOptions::default()
        })
        .unwrap();
    let m1 = cluster.mount_node(1, Duration::from_secs(60)).unwrap();
    let m2 = cluster.mount_node(2, Duration::from_secs(60)).unwrap();
    phase("cluster mounted");
    let r = Runner {
        bin: profile.join("hv-runner"),
        root: cluster.dir.join("hv"),
    };

    let m1s = m1.to_str().unwrap().to_owned();
    r.ok(
        "n1",
        &[
            "create",
            "--volume",
            &m1s,
            "--name",
            "vm",
            "--memory",
            "64M",
            "--disk-size",
            "4M",
            "--dirty",
            "8M",
            "--dirty-rate",
            "max",
            "--heartbeat-ms",
            "20",
        ],
    );
    let dir1 = m1.join("vm");
    let dir2 = m2.join("vm");
    wait_for(Duration::from_secs(10), "vm folder on node 2", || {
        dir2.join("disk.img").exists()
    });
    let mut a = Proc(
        r.cmd("n1")
            .arg("run")
            .arg(&dir1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let console2 = dir2.join("console.log");
    wait_for(Duration::from_secs(60), "guest heartbeats", || {
        last_seq(&dir1.join("console.log")).is_some_and(|s| s >= 20)
    });

    phase("guest running on node 1");
    // node 1 -> node 2: the destination opens the folder through node 2's mount.
    let (mut b, addr) = r.receive("n2", &m2);
    r.ok("n1", &["migrate", "vm", "--to", &addr]);
    assert!(a.wait_exit(Duration::from_secs(20)));
    let s = last_seq(&console2).unwrap();
    wait_for(Duration::from_secs(60), "heartbeats on node 2", || {
        last_seq(&console2).is_some_and(|v| v >= s + 20)
    });

    phase("migrated to node 2");
    // and back to node 1.
    let (mut c, addr) = r.receive("n1", &m1);
    r.ok("n2", &["migrate", "vm", "--to", &addr]);
    assert!(b.wait_exit(Duration::from_secs(20)));
    let s = last_seq(&dir1.join("console.log")).unwrap();
    wait_for(Duration::from_secs(60), "heartbeats back on node 1", || {
        last_seq(&dir1.join("console.log")).is_some_and(|v| v >= s + 20)
    });
    r.ok("n1", &["stop", "vm"]);
    assert!(c.wait_exit(Duration::from_secs(20)));

    phase("migrated back and stopped");
    // Both nodes see the same console and disk.
    let console = std::fs::read_to_string(&console2).unwrap();
    for l in console.lines() {
        assert!(!l.contains("FAIL"), "guest reported: {l}");
    }
    let s = seqs(&console);
    for (i, &v) in s.iter().enumerate() {
        assert_eq!(v, i as u64, "heartbeat sequence broken at {i}");
    }
    assert!(s.len() >= 60);
    let n = s.len().to_string();
    let dir2s = dir2.to_str().unwrap();
    let o = r.ok("n2", &["verify-disk", dir2s, "--heartbeats", &n]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(": ok: "),
        "verify-disk: {}",
        String::from_utf8_lossy(&o.stdout)
    );

    phase("checked console and disk");
    for id in [1, 2] {
        let st = cluster.unmount_node(id, Duration::from_secs(30)).unwrap();
        assert!(st.success(), "node {id} exited with {st}");
    }
    let out = Command::new(profile.join("fsck-csvfs"))
        .args(["-n", "-f"])
        .arg(&cluster.uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
