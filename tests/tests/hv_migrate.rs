#![allow(clippy::tests_outside_test_module)]
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
//! hv-runner end to end: the real binary as processes on one machine, VMs in a temporary
//! "volume" directory. Live migration there and back (serial sequence, disk records,
//! memory checks, RAM compared byte for byte at switch-over), a destination killed
//! mid-migration, save/restore across processes, the owner record, and the convergence
//! policy. Guests are small (64-128 MiB) so the file runs in seconds.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// KVM guests are CPU-bound and the machine is small: run one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Path of the hv-runner binary, built once for this profile.
fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "hv-runner", "--bin", "hv-runner"]);
        if release {
            cmd.arg("--release");
        }
        let target_dir = profile_dir.parent().unwrap();
        cmd.env("CARGO_TARGET_DIR", target_dir);
        let st = cmd.status().unwrap();
        assert!(st.success(), "building hv-runner failed");
        let p = profile_dir.join("hv-runner");
        assert!(p.exists(), "{} missing", p.display());
        p
    })
}

struct Env {
    root: PathBuf,
    volume: PathBuf,
}

impl Env {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("hvtest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let volume = root.join("volume");
        std::fs::create_dir_all(&volume).unwrap();
        Self { root, volume }
    }
    fn rt(&self, node: &str) -> PathBuf {
        self.root.join(format!("run-{node}"))
    }
    fn cmd(&self, node: &str) -> Command {
        let mut c = Command::new(bin());
        c.env("HV_RUNNER_RUNTIME_DIR", self.rt(node))
            .env("HV_RUNNER_NODE", node)
            .env("RUST_LOG", "info");
        c
    }
    fn output(&self, node: &str, args: &[&str]) -> Output {
        self.cmd(node).args(args).output().unwrap()
    }
    fn ok(&self, node: &str, args: &[&str]) -> String {
        let o = self.output(node, args);
        assert!(
            o.status.success(),
            "hv-runner {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn vm_dir(&self, name: &str) -> PathBuf {
        self.volume.join(name)
    }
    fn create(&self, name: &str, extra: &[&str]) {
        let v = self.volume.to_str().unwrap().to_owned();
        let mut args = vec!["create", "--volume", &v, "--name", name];
        args.extend_from_slice(extra);
        self.ok("a", &args);
    }
    fn run(&self, node: &str, name: &str) -> Proc {
        let dir = self.vm_dir(name);
        let child = self
            .cmd(node)
            .arg("run")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.root.join(format!("{node}-run.log"))).unwrap())
            .spawn()
            .unwrap();
        let p = Proc { child };
        let sock = self.rt(node).join(format!("{name}.sock"));
        wait_for(Duration::from_secs(20), "control socket", || sock.exists());
        p
    }
    /// Starts `receive` on an ephemeral port; returns the process, its address and its
    /// stderr reader.
    fn receive(&self, node: &str) -> (Proc, String, BufReader<std::process::ChildStderr>) {
        let mut child = self
            .cmd(node)
            .args(["receive", "--listen", "127.0.0.1:0", "--volume"])
            .arg(&self.volume)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected receive output {line:?}"))
            .trim()
            .to_owned();
        // Keep stdout drained so the process never blocks on it.
        std::thread::spawn(move || for _ in out.lines() {});
        let err = BufReader::new(child.stderr.take().unwrap());
        (Proc { child }, addr, err)
    }
    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.vm_dir(name).join("console.log")).unwrap_or_default()
    }
    fn last_seq(&self, name: &str) -> Option<u64> {
        seqs(&self.console(name)).last().copied()
    }
    fn wait_seq(&self, name: &str, at_least: u64) {
        wait_for(Duration::from_secs(30), &format!("seq {at_least}"), || {
            self.last_seq(name).is_some_and(|s| s >= at_least)
        });
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Waits for exit with a deadline; returns success.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Heartbeat numbers of the complete lines (the runner may be mid-write of the last one).
fn seqs(console: &str) -> Vec<u64> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("seq="))
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

/// Pages vCPU 1 has rewritten, from the last complete `work cpu1=N` line (0 before the
/// first one); the values must never go backwards.
fn cpu1_work(console: &str) -> u64 {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    let w: Vec<u64> = complete
        .lines()
        .filter_map(|l| l.strip_prefix("work cpu1="))
        .map(|s| s.trim().parse().unwrap())
        .collect();
    assert!(
        w.windows(2).all(|p| p[0] <= p[1]),
        "vCPU 1 work counter went backwards: {w:?}"
    );
    w.last().copied().unwrap_or(0)
}

/// Console: heartbeats 0..n without gap or repeat, no memory or disk failure reported.
fn check_console(console: &str) -> u64 {
    for l in console.lines() {
        assert!(
            !l.contains("MEMFAIL") && !l.contains("DISKFAIL"),
            "guest reported: {l}"
        );
    }
    let s = seqs(console);
    for (i, &v) in s.iter().enumerate() {
        assert_eq!(v, i as u64, "heartbeat sequence broken at line {i}: {s:?}");
    }
    s.len() as u64
}

/// Disk: a valid record for every heartbeat 0..n (records are written before the
/// heartbeat line is printed), checked by `hv-runner verify-disk`.
fn check_disk(env: &Env, name: &str, n: u64) {
    let dir = env.vm_dir(name);
    let out = env.ok(
        "a",
        &[
            "verify-disk",
            dir.to_str().unwrap(),
            "--heartbeats",
            &n.to_string(),
        ],
    );
    assert!(out.contains(": ok: "), "verify-disk: {out}");
}

fn migrate(env: &Env, node: &str, name: &str, to: &str, extra: &[&str]) -> Output {
    let mut args = vec!["migrate", name, "--to", to];
    args.extend_from_slice(extra);
    env.output(node, &args)
}

fn report(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "migrate failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    let json = text.lines().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str(json).unwrap()
}

fn same_ram(dump: &Path) {
    let a = std::fs::read(dump.join("src.ram")).unwrap();
    let b = std::fs::read(dump.join("dst.ram")).unwrap();
    assert_eq!(a.len(), b.len());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("destination RAM differs from source RAM at byte {i:#x}");
    }
    // The guest really ran: its filled/dirtied area is not all zero.
    assert!(a[0x20_0000..].iter().any(|&x| x != 0), "guest RAM is empty");
    std::fs::remove_file(dump.join("src.ram")).unwrap();
    std::fs::remove_file(dump.join("dst.ram")).unwrap();
}

#[test]
fn live_migration_there_and_back_keeps_guest_intact() {
    let _s = serial();
    let env = Env::new("there-and-back");
    env.create(
        "vm1",
        &[
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--dirty",
            "16M",
            "--dirty-rate",
            "max",
            "--fill",
            "--heartbeat-ms",
            "10",
        ],
    );
    let mut a = env.run("a", "vm1");
    env.wait_seq("vm1", 20);
    let console = env.console("vm1");
    assert!(
        console.contains("guest: vcpu 1 running"),
        "vCPU 1 never started"
    );
    // The disk's first request completed through its interrupt (the guest waits for it
    // with hlt; every later heartbeat does the same).
    assert!(
        console.contains(" irqs=1\n"),
        "no completion interrupt: {console}"
    );

    // A second runner on another "node" is refused while the VM runs.
    let o = env.output("b", &["run", env.vm_dir("vm1").to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is running on node a"),
        "unexpected refusal: {err}"
    );

    let dump = env.root.join("dump");
    std::fs::create_dir_all(&dump).unwrap();
    let dump_s = dump.to_str().unwrap().to_owned();
    let (mut b, addr_b, _eb) = env.receive("b");
    let r = report(&migrate(
        &env,
        "a",
        "vm1",
        &addr_b,
        &["--debug-dump-dir", &dump_s],
    ));
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0);
    assert!(
        r["pages_sent"].as_u64().unwrap() > 16 * 256,
        "filled guest sent too few pages: {r}"
    );
    assert!(
        a.wait_exit(Duration::from_secs(10)),
        "source runner failed after migration"
    );
    same_ram(&dump);
    let owner = std::fs::read_to_string(env.vm_dir("vm1").join("owner.toml")).unwrap();
    assert!(
        owner.contains("node = \"b\""),
        "owner after migration: {owner}"
    );

    let work_before = cpu1_work(&env.console("vm1"));
    let s = env.last_seq("vm1").unwrap();
    env.wait_seq("vm1", s + 20);
    assert!(b.running());
    assert!(
        cpu1_work(&env.console("vm1")) > work_before,
        "vCPU 1 made no progress after the migration"
    );

    // And back, to a fresh runner on node a.
    let (mut a2, addr_a, _ea) = env.receive("a");
    let r = report(&migrate(
        &env,
        "b",
        "vm1",
        &addr_a,
        &["--debug-dump-dir", &dump_s],
    ));
    assert!(r["total_ms"].as_f64().unwrap() > 0.0);
    assert!(
        b.wait_exit(Duration::from_secs(10)),
        "runner b failed after migration"
    );
    same_ram(&dump);
    let work_before = cpu1_work(&env.console("vm1"));
    let s = env.last_seq("vm1").unwrap();
    env.wait_seq("vm1", s + 20);
    assert!(
        cpu1_work(&env.console("vm1")) > work_before,
        "vCPU 1 made no progress after the migration back"
    );
    env.ok("a", &["stop", "vm1"]);
    assert!(a2.wait_exit(Duration::from_secs(10)));
    assert!(
        !env.vm_dir("vm1").join("owner.toml").exists(),
        "owner record left after stop"
    );

    let n = check_console(&env.console("vm1"));
    assert!(n >= 60, "only {n} heartbeats");
    check_disk(&env, "vm1", n);
}

#[test]
fn destination_killed_mid_migration_leaves_vm_on_source() {
    let _s = serial();
    let env = Env::new("dest-killed");
    env.create(
        "vm2",
        &[
            "--memory",
            "256M",
            "--dirty",
            "8M",
            "--fill",
            "--heartbeat-ms",
            "10",
        ],
    );
    let mut a = env.run("a", "vm2");
    wait_for(Duration::from_secs(60), "fill", || {
        env.console("vm2").contains("fill done")
    });
    env.wait_seq("vm2", 5);

    let (mut b, addr_b, mut eb) = env.receive("b");
    let vol = env.volume.clone();
    let mig = std::thread::spawn({
        let bin = bin().to_owned();
        let rt = env.rt("a");
        move || {
            let _ = vol;
            Command::new(bin)
                .env("HV_RUNNER_RUNTIME_DIR", rt)
                .env("HV_RUNNER_NODE", "a")
                .args(["migrate", "vm2", "--to", &addr_b])
                .output()
                .unwrap()
        }
    });
    // Kill the destination as soon as it has accepted the VM (during the full pass).
    let mut line = String::new();
    loop {
        line.clear();
        assert!(eb.read_line(&mut line).unwrap() > 0, "receiver ended early");
        if line.contains("incoming vm") {
            break;
        }
    }
    b.kill();
    let o = mig.join().unwrap();
    assert!(
        !o.status.success(),
        "migration to a killed destination reported success"
    );
    assert!(a.running(), "source runner died");

    // The guest keeps running on the source.
    let s = env.last_seq("vm2").unwrap();
    env.wait_seq("vm2", s + 10);
    let st = env.ok("a", &["status", "vm2"]);
    assert!(st.contains("running"), "status: {st}");
    let owner = std::fs::read_to_string(env.vm_dir("vm2").join("owner.toml")).unwrap();
    assert!(owner.contains("node = \"a\""), "owner: {owner}");

    // A later migration succeeds.
    let (mut c, addr_c, _ec) = env.receive("c");
    report(&migrate(&env, "a", "vm2", &addr_c, &[]));
    assert!(a.wait_exit(Duration::from_secs(10)));
    let s = env.last_seq("vm2").unwrap();
    env.wait_seq("vm2", s + 10);
    env.ok("c", &["stop", "vm2"]);
    assert!(c.wait_exit(Duration::from_secs(10)));
    let n = check_console(&env.console("vm2"));
    check_disk(&env, "vm2", n);
}

#[test]
fn save_on_one_node_restore_on_another() {
    let _s = serial();
    let env = Env::new("save-restore");
    env.create(
        "vm3",
        &[
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--dirty",
            "8M",
            "--heartbeat-ms",
            "10",
        ],
    );
    let mut a = env.run("a", "vm3");
    env.wait_seq("vm3", 15);
    env.ok("a", &["save", "vm3"]);
    assert!(a.wait_exit(Duration::from_secs(10)));
    let dir = env.vm_dir("vm3");
    assert!(dir.join("state.hvm").exists());
    let saved_at = env.last_seq("vm3").unwrap();
    let work_saved = cpu1_work(&env.console("vm3"));

    // `run` refuses a VM with a saved state; `restore` on node b resumes it.
    let o = env.output("b", &["run", dir.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("saved state"));
    let child = env
        .cmd("b")
        .arg("restore")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut b = Proc { child };
    env.wait_seq("vm3", saved_at + 20);
    assert!(
        cpu1_work(&env.console("vm3")) > work_saved,
        "vCPU 1 made no progress after the restore"
    );
    assert!(
        !dir.join("state.hvm").exists(),
        "state file kept after restore"
    );
    env.ok("b", &["stop", "vm3"]);
    assert!(b.wait_exit(Duration::from_secs(10)));
    let n = check_console(&env.console("vm3"));
    check_disk(&env, "vm3", n);

    // The checker fails on a damaged record: flip one bit of record 1 (sector 1).
    let disk = dir.join("disk.img");
    let mut d = std::fs::read(&disk).unwrap();
    d[512 + 100] ^= 1;
    std::fs::write(&disk, &d).unwrap();
    let o = env.output("a", &["verify-disk", dir.to_str().unwrap()]);
    assert!(!o.status.success(), "verify-disk passed a damaged disk");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("BAD sector 1: record 1 word 12 is wrong")
            && out.contains("BAD no record for heartbeat 1"),
        "verify-disk output: {out}"
    );
}

#[test]
fn non_converging_guest_is_cancelled_or_throttled() {
    let _s = serial();
    let env = Env::new("converge");
    env.create(
        "vm4",
        &[
            "--memory",
            "64M",
            "--dirty",
            "4M",
            "--dirty-rate",
            "max",
            "--heartbeat-ms",
            "10",
        ],
    );
    let mut a = env.run("a", "vm4");
    env.wait_seq("vm4", 10);

    // On a 4 MB/s link the guest (rewriting 2 MiB continuously) dirties faster than the
    // link carries pages: the migration must be cancelled within 5 rounds or 10 s.
    let (_b, addr_b, _eb) = env.receive("b");
    let t = Instant::now();
    let first = std::thread::spawn({
        let bin = bin().to_owned();
        let rt = env.rt("a");
        let addr = addr_b.clone();
        move || {
            Command::new(bin)
                .env("HV_RUNNER_RUNTIME_DIR", rt)
                .args(["migrate", "vm4", "--to", &addr, "--max-bandwidth-mbps", "4"])
                .output()
                .unwrap()
        }
    });
    // A second migration of the same VM while the first runs is refused.
    wait_for(Duration::from_secs(10), "status migrating", || {
        env.ok("a", &["status", "vm4"]).contains("migrating")
    });
    let o2 = migrate(&env, "a", "vm4", &addr_b, &[]);
    assert!(!o2.status.success());
    let err2 = String::from_utf8_lossy(&o2.stderr);
    assert!(
        err2.contains("already in progress"),
        "second migration: {err2}"
    );
    let o = first.join().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not converge"), "unexpected error: {err}");
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "detection took {:?}",
        t.elapsed()
    );
    assert!(a.running());
    let s = env.last_seq("vm4").unwrap();
    env.wait_seq("vm4", s + 5);

    // With throttling the same migration completes (stop-and-copy at the round cap).
    let (mut c, addr_c, _ec) = env.receive("c");
    let r = report(&migrate(
        &env,
        "a",
        "vm4",
        &addr_c,
        &[
            "--max-bandwidth-mbps",
            "6",
            "--on-no-converge",
            "throttle",
            "--max-rounds",
            "8",
        ],
    ));
    assert!(
        r["throttle_pct"].as_u64().unwrap() > 0,
        "no throttling reported: {r}"
    );
    assert!(a.wait_exit(Duration::from_secs(10)));
    let s = env.last_seq("vm4").unwrap();
    env.wait_seq("vm4", s + 5);
    env.ok("c", &["stop", "vm4"]);
    assert!(c.wait_exit(Duration::from_secs(10)));
    check_console(&env.console("vm4"));
}

#[test]
fn receive_refuses_another_protocol_version() {
    use std::io::{Read, Write};
    let _s = serial();
    let env = Env::new("version");
    let (mut b, addr, _eb) = env.receive("b");
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A hello of protocol version 1.
    c.write_all(b"HVMIGRT\0\x01\0\0\0").unwrap();
    let mut head = [0u8; 5];
    c.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x1f, "expected an ERROR reply");
    let mut msg = vec![0u8; u32::from_le_bytes(head[1..].try_into().unwrap()) as usize];
    c.read_exact(&mut msg).unwrap();
    let msg: String = serde_json::from_slice(&msg).unwrap();
    assert!(
        msg.contains("migration protocol version 1 not supported"),
        "refusal: {msg}"
    );
    // The destination keeps listening for the next attempt.
    std::thread::sleep(Duration::from_millis(200));
    assert!(b.running());
}
