//! Real NBD peers for the block-layer tests: nbdkit, qemu-nbd and our own LUN server
//! started as child processes, each killed (SIGKILL) and reaped when its guard drops, plus a
//! scratch directory and a small deterministic random generator.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a peer may take to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct BlockScratch {
    path: PathBuf,
}

impl BlockScratch {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> BlockScratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("csvfs-block-{tag}-{}-{n}", std::process::id()));
        // A leftover from an earlier run with the same pid is stale.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        BlockScratch { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates a sparse file of `size_bytes` inside the directory.
    pub fn sparse_file(&self, name: &str, size_bytes: u64) -> PathBuf {
        let p = self.join(name);
        let f = std::fs::File::create(&p).expect("create image");
        f.set_len(size_bytes).expect("size image");
        p
    }
}

impl Drop for BlockScratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TCP port that was free a moment ago, below the kernel's ephemeral range.
///
/// A port from that range (what binding port 0 returns) can be taken between this call
/// and the server's bind by the local end of any outgoing connection, and a probe
/// connecting to it then may even connect to itself; ports below the range are handed out
/// only on request. The start is spread by process id and time so parallel tests rarely try
/// the same ports.
pub fn free_tcp_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768)
        .clamp(12_000, 49_152);
    let span = u32::from(low - 10_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = nanos ^ std::process::id().wrapping_mul(2_654_435_761);
    for i in 0..span {
        let port = 10_000 + (seed.wrapping_add(i.wrapping_mul(7_919)) % span);
        let port = u16::try_from(port).expect("below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port between 10000 and {low}");
}

/// Where a peer listens.
#[derive(Debug, Clone)]
pub enum PeerAddr {
    /// A Unix socket.
    Unix(PathBuf),
    /// 127.0.0.1 and a port.
    Tcp(u16),
}

impl PeerAddr {
    /// The NBD URI of the default export at this address.
    pub fn uri(&self) -> String {
        match self {
            PeerAddr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            PeerAddr::Tcp(port) => format!("nbd://127.0.0.1:{port}/"),
        }
    }

    /// True once an NBD server there sends its greeting: a connection the kernel accepted
    /// on the listening socket is not enough, the server may still be setting up.
    fn accepts(&self) -> bool {
        fn greets(mut s: impl std::io::Read) -> bool {
            let mut magic = [0u8; 8];
            s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
        }
        let wait = Some(Duration::from_secs(2));
        match self {
            PeerAddr::Unix(p) => {
                UnixStream::connect(p).is_ok_and(|s| s.set_read_timeout(wait).is_ok() && greets(s))
            }
            PeerAddr::Tcp(port) => TcpStream::connect(("127.0.0.1", *port))
                .is_ok_and(|s| s.set_read_timeout(wait).is_ok() && greets(s)),
        }
    }
}

/// A running peer process; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct BlockPeer {
    child: Option<Child>,
    /// Where it listens.
    pub addr: PeerAddr,
    name: String,
}

impl BlockPeer {
    /// Spawns `cmd` and waits (polling, with a deadline) until `addr` accepts connections.
    pub fn spawn(name: &str, mut cmd: Command, addr: PeerAddr) -> BlockPeer {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut peer = BlockPeer {
            child: Some(child),
            addr,
            name: name.to_string(),
        };
        peer.wait_ready();
        peer
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if self.addr.accepts() {
                return;
            }
            let child = self.child.as_mut().expect("child present until drop");
            if let Some(status) = child.try_wait().expect("poll child") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("{} exited before listening ({status}): {err}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen within {START_DEADLINE:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The NBD URI of its default export.
    pub fn uri(&self) -> String {
        self.addr.uri()
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (with a deadline) for a clean exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("peer still running");
        let pid = c.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().expect("poll child") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("{} did not exit after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for BlockPeer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nbdkit with `plugin_args` (e.g. `["memory", "64M"]`) behind optional `filters`, at `addr`.
pub fn start_nbdkit(addr: PeerAddr, filters: &[&str], plugin_args: &[&str]) -> BlockPeer {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent"]);
    match &addr {
        PeerAddr::Unix(p) => {
            cmd.arg("-U").arg(p);
        }
        PeerAddr::Tcp(port) => {
            cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
        }
    }
    for f in filters {
        cmd.arg(format!("--filter={f}"));
    }
    cmd.args(plugin_args);
    BlockPeer::spawn("nbdkit", cmd, addr)
}

/// qemu-nbd exporting the raw `image` on the Unix socket `sock` to up to 8 clients.
pub fn start_qemu_nbd(image: &Path, sock: &Path) -> BlockPeer {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-t", "-e", "8", "--cache=writeback", "-k"])
        .arg(sock)
        .arg(image);
    BlockPeer::spawn("qemu-nbd", cmd, PeerAddr::Unix(sock.to_path_buf()))
}

/// Our LUN server (the `block-lun-server` binary of this crate) exporting `image`.
pub fn start_lun_server(image: &Path, addr: PeerAddr) -> BlockPeer {
    BlockPeer::spawn("block-lun-server", lun_server_command(image, &addr), addr)
}

/// The command that starts our LUN server; for tests that expect it to fail.
pub fn lun_server_command(image: &Path, addr: &PeerAddr) -> Command {
    let mut cmd = Command::new(lun_server_binary());
    cmd.arg(image).arg("--listen");
    match addr {
        PeerAddr::Unix(p) => cmd.arg(format!("unix:{}", p.display())),
        PeerAddr::Tcp(port) => cmd.arg(format!("127.0.0.1:{port}")),
    };
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Path of the `block-lun-server` binary, which cargo builds beside the running test
/// (`target/<profile>/`) before it runs this crate's integration tests.
pub fn lun_server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("block-lun-server")
}

/// A small deterministic xorshift generator for reproducible random offsets and data.
#[derive(Debug, Clone)]
pub struct BlockRng(u64);

impl BlockRng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> BlockRng {
        BlockRng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A `usize` in `0..n`.
    pub fn below_usize(&mut self, n: usize) -> usize {
        let v = self.below(u64::try_from(n).expect("usize fits in u64"));
        usize::try_from(v).expect("below n, which is a usize")
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
