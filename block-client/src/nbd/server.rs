//! The NBD server: exports one file (through [`FileDevice`]) or any [`BlockDevice`] to many
//! clients at once over TCP or a Unix socket.
//!
//! Per connection:
//!
//! ```text
//!   accept ─► handshake (fixed newstyle; NO_ZEROES offered)
//!               │ options: GO / INFO (export + block-size info), LIST, EXPORT_NAME,
//!               │ STRUCTURED_REPLY, ABORT; anything else → NBD_REP_ERR_UNSUP
//!               ▼
//!           transmission: the connection thread reads requests (and write payloads) and
//!           hands each to the shared worker pool; workers run it on the device and send
//!           the reply under the connection's write lock, so replies go out in completion
//!           order. DISC or EOF: wait for this connection's requests in flight, then close.
//! ```
//!
//! Multi-conn is advertised: every connection shares one device, and FLUSH
//! (`fdatasync`) covers every write completed on any connection. A FUA write is durable
//! before its reply and syncs only its own range (`RWF_DSYNC`); TRIM punches holes;
//! WRITE_ZEROES uses `fallocate(ZERO_RANGE)`. The exported file is `flock`ed, so a second
//! server on the same file fails with a clear error.
//! [`ServerHandle::shutdown`] stops accepting, closes connections after their in-flight
//! requests, flushes the device and removes the Unix socket.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::proto::*;
use super::transport::{write_two, Stream};
use super::uri::{NbdAddr, NbdUri};
use crate::{BlockDevice, BlockError, FileDevice, FileOptions, WriteFlags};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (`127.0.0.1:10809`; port 0 picks a free port).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = ServeError;

    /// `unix:PATH`, an absolute path (Unix socket), or `IP:PORT`.
    fn from_str(s: &str) -> Result<ListenAddr, ServeError> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| ServeError::BadListenAddr {
                addr: s.to_string(),
            })
    }
}

/// How to serve an export.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Export name clients ask for. Default: "" (the default export).
    pub export_name: String,
    /// Open the file with `O_DIRECT`. Default: false.
    pub direct: bool,
    /// Export read-only. Default: false.
    pub read_only: bool,
    /// Worker threads shared by all connections. Default: 16.
    pub workers: u32,
    /// Largest request payload accepted, in bytes. Default: 32 MiB.
    pub max_block_bytes: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            export_name: String::new(),
            direct: false,
            read_only: false,
            workers: 16,
            max_block_bytes: DEFAULT_MAX_BLOCK_BYTES,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The file to export could not be opened (missing, or locked by another server).
    #[error("open export {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The listen address is malformed.
    #[error("bad listen address {addr:?} (want IP:PORT, unix:PATH or an absolute socket path)")]
    BadListenAddr {
        /// The address given.
        addr: String,
    },
    /// Binding the listener failed.
    #[error("listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Starting a thread failed.
    #[error("start server threads")]
    Spawn {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Waiting for a termination signal failed.
    #[error("wait for a termination signal")]
    Signal {
        /// Why.
        #[source]
        source: io::Error,
    },
}

type Job = Box<dyn FnOnce() + Send>;

/// The work queue shared by all connections' requests and the worker threads.
#[derive(Default)]
struct JobQueue {
    state: Mutex<(std::collections::VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobQueue").finish_non_exhaustive()
    }
}

impl JobQueue {
    /// Queues a job; false when the queue is closed.
    fn push(&self, job: Job) -> bool {
        let mut st = self.state.lock();
        if st.1 {
            return false;
        }
        st.0.push_back(job);
        drop(st);
        self.ready.notify_one();
        true
    }

    /// The next job, or `None` once the queue is closed and drained.
    fn pop(&self) -> Option<Job> {
        let mut st = self.state.lock();
        loop {
            if let Some(j) = st.0.pop_front() {
                return Some(j);
            }
            if st.1 {
                return None;
            }
            self.ready.wait(&mut st);
        }
    }

    /// Refuses new jobs; workers exit when the queue is empty.
    fn close(&self) {
        self.state.lock().1 = true;
        self.ready.notify_all();
    }
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => Stream::tcp(l.accept()?.0),
            Listener::Unix(l, _) => Ok(Stream::unix(l.accept()?.0)),
        }
    }
}

#[derive(Debug)]
struct Export {
    dev: Arc<dyn BlockDevice>,
    name: String,
    read_only: bool,
    max_block_bytes: u32,
    size_bytes: u64,
}

impl Export {
    fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        f
    }
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    conns: HashMap<u64, (Stream, Option<JoinHandle<()>>)>,
}

/// A running server. Dropping it shuts the server down.
#[derive(Debug)]
pub struct ServerHandle {
    addr: NbdAddr,
    export_name: String,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    export: Arc<Export>,
    connections_total: Arc<AtomicU64>,
}

impl ServerHandle {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> &NbdAddr {
        &self.addr
    }

    /// The NBD URI clients use to reach this export.
    pub fn uri(&self) -> String {
        NbdUri {
            addr: self.addr.clone(),
            export: self.export_name.clone(),
        }
        .to_string()
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.connections_total.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every connection after its in-flight requests, flushes the
    /// device and removes the Unix socket. Returns the flush result.
    pub fn shutdown(mut self) -> Result<(), BlockError> {
        self.stop_and_join();
        self.export.dev.flush()
    }

    fn stop_and_join(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept with a throwaway connection.
        let _ = Stream::connect(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept_thread.take() {
            if t.join().is_err() {
                tracing::error!("nbd accept thread panicked");
            }
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Serves the file at `path` (opened with an exclusive `flock`) on `listen`.
pub fn serve(
    path: &Path,
    listen: &ListenAddr,
    options: ServeOptions,
) -> Result<ServerHandle, ServeError> {
    let dev = FileDevice::open(
        path,
        FileOptions {
            direct: options.direct,
            read_only: options.read_only,
            lock: true,
        },
    )
    .map_err(|source| ServeError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    tracing::info!(path = %path.display(), size_bytes = dev.size_bytes(), "exporting file");
    serve_device(Arc::new(dev), listen, options)
}

/// Serves any block device on `listen` (tests export a `MemDevice` or a `FlakyDisk`).
pub fn serve_device(
    dev: Arc<dyn BlockDevice>,
    listen: &ListenAddr,
    options: ServeOptions,
) -> Result<ServerHandle, ServeError> {
    let bind_err = |source| ServeError::Bind {
        addr: format!("{listen:?}"),
        source,
    };
    let (listener, addr) = match listen {
        ListenAddr::Tcp(sa) => {
            let l = TcpListener::bind(sa).map_err(bind_err)?;
            let local = l.local_addr().map_err(bind_err)?;
            let addr = NbdAddr::Tcp {
                host: local.ip().to_string(),
                port: local.port(),
            };
            (Listener::Tcp(l), addr)
        }
        ListenAddr::Unix(p) => {
            if p.exists() {
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    return Err(bind_err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another server is listening on this socket",
                    )));
                }
                std::fs::remove_file(p).map_err(bind_err)?;
            }
            let l = UnixListener::bind(p).map_err(bind_err)?;
            (
                Listener::Unix(l, p.clone()),
                NbdAddr::Unix { path: p.clone() },
            )
        }
    };
    let export = Arc::new(Export {
        size_bytes: dev.size_bytes(),
        dev,
        name: options.export_name.clone(),
        read_only: options.read_only,
        max_block_bytes: options.max_block_bytes.clamp(4096, DEFAULT_MAX_BLOCK_BYTES),
    });
    let pool = Arc::new(JobQueue::default());
    let mut workers = Vec::new();
    for i in 0..options.workers.max(1) {
        let pool = pool.clone();
        let t = thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || {
                while let Some(job) = pool.pop() {
                    job();
                }
            })
            .map_err(|source| ServeError::Spawn { source })?;
        workers.push(t);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let connections_total = Arc::new(AtomicU64::new(0));
    let accept_thread = {
        let stop = stop.clone();
        let export = export.clone();
        let total = connections_total.clone();
        thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, export, pool, workers, stop, total))
            .map_err(|source| ServeError::Spawn { source })?
    };
    tracing::info!(%addr, export = %options.export_name, "nbd server listening");
    Ok(ServerHandle {
        addr,
        export_name: options.export_name,
        stop,
        accept_thread: Some(accept_thread),
        export,
        connections_total,
    })
}

fn accept_loop(
    listener: Listener,
    export: Arc<Export>,
    pool: Arc<JobQueue>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
) {
    let registry = Arc::new(Mutex::new(Registry::default()));
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                tracing::warn!(error = %e, "nbd accept failed");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        total.fetch_add(1, Ordering::Relaxed);
        let control = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "nbd connection setup failed");
                continue;
            }
        };
        let mut reg = registry.lock();
        let id = reg.next_id;
        reg.next_id += 1;
        let (export, tx, registry2) = (export.clone(), pool.clone(), registry.clone());
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                if let Err(e) = serve_connection(stream, &export, &tx) {
                    tracing::debug!(conn = id, error = %e, "nbd connection ended");
                }
                registry2.lock().conns.remove(&id);
            });
        match spawned {
            Ok(h) => {
                reg.conns.insert(id, (control, Some(h)));
            }
            Err(e) => tracing::warn!(error = %e, "nbd connection thread failed to start"),
        }
    }
    // Shut down: close every connection, then wait for their threads and the workers.
    let handles: Vec<JoinHandle<()>> = {
        let mut reg = registry.lock();
        reg.conns
            .values_mut()
            .filter_map(|(s, h)| {
                s.shutdown();
                h.take()
            })
            .collect()
    };
    for h in handles {
        if h.join().is_err() {
            tracing::error!("nbd connection thread panicked");
        }
    }
    pool.close();
    for w in workers {
        if w.join().is_err() {
            tracing::error!("nbd worker thread panicked");
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

/// Requests of one connection still running on workers.
#[derive(Debug, Default)]
struct InFlight {
    count: Mutex<u64>,
    idle: Condvar,
}

impl InFlight {
    fn wait_idle(&self) {
        let mut c = self.count.lock();
        while *c > 0 {
            self.idle.wait(&mut c);
        }
    }
}

/// Bytes of spare buffers one connection keeps for reuse.
const POOL_KEEP_BYTES: usize = 32 << 20;

/// The payload and reply buffers of one connection, reused: a fresh buffer per request
/// costs a page fault and a zeroing pass for every page of it, which for 1 MiB writes was
/// a few per cent of the server's CPU. A buffer handed out is at least as long as asked
/// and holds whatever an earlier request left in it; the caller uses the prefix it asked
/// for and overwrites all of it.
#[derive(Default)]
struct BufPool {
    spare: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl BufPool {
    /// A buffer of at least `len` bytes.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut v = {
            let mut g = self.spare.lock();
            let (bufs, bytes) = &mut *g;
            match bufs.pop() {
                Some(v) => {
                    *bytes -= v.len();
                    v
                }
                None => Vec::new(),
            }
        };
        if v.len() < len {
            v.resize(len, 0);
        }
        v
    }

    /// Keeps `v` for a later request, unless the pool holds enough already.
    fn give(&self, v: Vec<u8>) {
        if v.is_empty() {
            return;
        }
        let mut g = self.spare.lock();
        let (bufs, bytes) = &mut *g;
        if *bytes + v.len() <= POOL_KEEP_BYTES {
            *bytes += v.len();
            bufs.push(v);
        }
    }
}

/// A request's length as a buffer length.
fn payload_len(len: u32) -> io::Result<usize> {
    usize::try_from(len).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads a `len`-byte write payload from `rd` into a buffer of `pool` (at least `len`
/// bytes long; the payload is its prefix).
fn read_payload(rd: &mut impl Read, len: u32, pool: &BufPool) -> io::Result<Vec<u8>> {
    let n = payload_len(len)?;
    let mut v = pool.take(n);
    if let Err(e) = rd.read_exact(&mut v[..n]) {
        pool.give(v);
        return Err(e);
    }
    Ok(v)
}

fn serve_connection(stream: Stream, export: &Arc<Export>, jobs: &JobQueue) -> io::Result<()> {
    let mut hs_writer = stream.try_clone()?;
    let mut rd = BufReader::with_capacity(256 << 10, stream);
    let Some(structured) = negotiate(&mut rd, &mut hs_writer, export)? else {
        return Ok(());
    };
    let writer = Arc::new(Mutex::new(BufWriter::with_capacity(256 << 10, hs_writer)));
    let inflight = Arc::new(InFlight::default());
    let pool = Arc::new(BufPool::default());
    let r = transmission(&mut rd, &writer, export, jobs, structured, &inflight, &pool);
    inflight.wait_idle();
    let flushed = writer.lock().flush();
    rd.get_ref().shutdown();
    r.and(flushed)
}

/// Runs the option phase. `Some(structured)` means: enter transmission.
fn negotiate(rd: &mut impl Read, w: &mut Stream, export: &Export) -> io::Result<Option<bool>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    let cflags = read_u32(rd)?;
    if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol_error(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    loop {
        let magic = read_u64(rd)?;
        if magic != IHAVEOPT {
            return Err(protocol_error(format!("bad option magic {magic:#x}")));
        }
        let option = read_u32(rd)?;
        let len = read_u32(rd)?;
        if len > 65_536 {
            skip(rd, u64::from(len))?;
            write_option_reply(w, option, REP_ERR_TOO_BIG, b"option too large")?;
            continue;
        }
        let data = read_vec(rd, len)?;
        match option {
            OPT_EXPORT_NAME => {
                if data != export.name.as_bytes() {
                    // EXPORT_NAME has no error reply: the spec says to close.
                    return Ok(None);
                }
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.size_bytes.to_be_bytes());
                reply.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&reply)?;
                return Ok(Some(structured));
            }
            OPT_ABORT => {
                let _ = write_option_reply(w, option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    write_option_reply(w, option, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let name = export.name.as_bytes();
                let name_len = u32::try_from(name.len())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let mut d = name_len.to_be_bytes().to_vec();
                d.extend_from_slice(name);
                write_option_reply(w, option, REP_SERVER, &d)?;
                write_option_reply(w, option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    write_option_reply(
                        w,
                        option,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                structured = true;
                write_option_reply(w, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, _requests)) = parse_info_request(&data) else {
                    write_option_reply(w, option, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                if name != export.name.as_bytes() {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                    write_option_reply(w, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size_bytes.to_be_bytes());
                info.extend_from_slice(&export.transmission_flags().to_be_bytes());
                write_option_reply(w, option, REP_INFO, &info)?;
                // Our constraints (min 1, preferred 4096) need no client support, so the
                // block-size info is sent whether or not it was requested.
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&export.dev.block_size_bytes().to_be_bytes());
                bs.extend_from_slice(&export.max_block_bytes.to_be_bytes());
                write_option_reply(w, option, REP_INFO, &bs)?;
                write_option_reply(w, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(Some(structured));
                }
            }
            _ => {
                write_option_reply(w, option, REP_ERR_UNSUP, b"option not supported")?;
            }
        }
    }
}

/// Parses NBD_OPT_INFO/GO data: export name and the list of requested info types.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = usize::try_from(u32::from_be_bytes(data.get(0..4)?.try_into().ok()?)).ok()?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let n = usize::from(u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?));
    let list = rest.get(2..)?;
    if list.len() != n * 2 {
        return None;
    }
    let reqs = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, reqs))
}

fn error_code(op_is_write: bool, e: &BlockError) -> u32 {
    match e {
        BlockError::Device { source, .. } => errno_to_nbd_error(source.raw_os_error()),
        BlockError::OutOfRange { .. } if op_is_write => NBD_ENOSPC,
        BlockError::OutOfRange { .. } => NBD_EINVAL,
        BlockError::Unsupported { .. } => NBD_ENOTSUP,
        BlockError::Closed => NBD_ESHUTDOWN,
        BlockError::PathLost { .. } | BlockError::Open { .. } => NBD_EIO,
    }
}

fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

fn structured_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

/// Replies are written through this buffer. Inline replies stay buffered while more
/// requests are already waiting in the read buffer; workers flush after each reply.
type ReplyWriter = Mutex<BufWriter<Stream>>;

/// Answers a read or a write on the connection thread when the device can do it without
/// blocking (cached data). Returns false when the request must go to a worker.
fn try_inline(
    export: &Export,
    writer: &ReplyWriter,
    structured: bool,
    req: (u16, u16, u64, u64, u32),
    payload: &[u8],
    pool: &BufPool,
) -> io::Result<bool> {
    let (flags, cmd, cookie, offset, len) = req;
    match cmd {
        CMD_READ if len <= export.max_block_bytes && len > 0 => {
            let n =
                usize::try_from(len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let head = if structured { 20 + 8 } else { 16 };
            let mut buf = pool.take(head + n);
            if !matches!(
                export
                    .dev
                    .try_read_at_nowait(&mut buf[head..head + n], offset),
                Ok(true)
            ) {
                pool.give(buf);
                return Ok(false);
            }
            read_reply_head(&mut buf, structured, cookie, offset, len);
            let r = writer.lock().write_all(&buf[..head + n]);
            pool.give(buf);
            r.map(|()| true)
        }
        CMD_WRITE if flags & CMD_FLAG_FUA == 0 && !export.read_only && len > 0 => {
            if !matches!(export.dev.try_write_at_nowait(payload, offset), Ok(true)) {
                return Ok(false);
            }
            writer.lock().write_all(&simple_reply(0, cookie))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Fills the head of a successful read's reply in `buf`: the structured chunk header and
/// offset, or the simple reply.
fn read_reply_head(buf: &mut [u8], structured: bool, cookie: u64, offset: u64, len: u32) {
    if structured {
        let h = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, len + 8);
        buf[..20].copy_from_slice(&h);
        buf[20..28].copy_from_slice(&offset.to_be_bytes());
    } else {
        buf[..16].copy_from_slice(&simple_reply(0, cookie));
    }
}

/// The transmission phase: reads requests and hands them to workers until DISC or EOF.
fn transmission(
    rd: &mut BufReader<Stream>,
    writer: &Arc<ReplyWriter>,
    export: &Arc<Export>,
    jobs: &JobQueue,
    structured: bool,
    inflight: &Arc<InFlight>,
    pool: &Arc<BufPool>,
) -> io::Result<()> {
    loop {
        if rd.buffer().len() < REQUEST_HEADER_BYTES {
            // About to wait for the client: send the replies answered inline so far.
            writer.lock().flush()?;
        }
        let mut h = [0u8; REQUEST_HEADER_BYTES];
        match rd.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut hs = &h[..];
        let magic = read_u32(&mut hs)?;
        if magic != REQUEST_MAGIC {
            return Err(protocol_error(format!("bad request magic {magic:#x}")));
        }
        let flags = read_u16(&mut hs)?;
        let cmd = read_u16(&mut hs)?;
        let cookie = read_u64(&mut hs)?;
        let offset = read_u64(&mut hs)?;
        let len = read_u32(&mut hs)?;
        if cmd == CMD_DISC {
            return Ok(());
        }
        let payload = if cmd == CMD_WRITE {
            if len > export.max_block_bytes {
                return Err(protocol_error(format!(
                    "write of {len} bytes over the {} byte limit",
                    export.max_block_bytes
                )));
            }
            read_payload(rd, len, pool)?
        } else {
            Vec::new()
        };
        // The payload buffer may be longer than the write: its first `len` bytes.
        let n = if cmd == CMD_WRITE {
            payload_len(len)?
        } else {
            0
        };
        let req = (flags, cmd, cookie, offset, len);
        let body = &payload[..n];
        if try_inline(export, writer, structured, req, body, pool)? {
            pool.give(payload);
            continue;
        }
        *inflight.count.lock() += 1;
        let (export, writer, inflight2) = (export.clone(), writer.clone(), inflight.clone());
        let pool = pool.clone();
        let job: Job = Box::new(move || {
            let r = run_request(&export, &writer, structured, req, &payload[..n], &pool);
            pool.give(payload);
            if let Err(e) = r.and_then(|()| writer.lock().flush()) {
                tracing::debug!(error = %e, "nbd reply failed; closing connection");
                writer.lock().get_ref().shutdown();
            }
            let mut c = inflight2.count.lock();
            *c -= 1;
            if *c == 0 {
                inflight2.idle.notify_all();
            }
        });
        if !jobs.push(job) {
            return Err(io::Error::other("server is shutting down"));
        }
    }
}

/// Runs one request (flags, command, cookie, offset, length) on a worker and writes its
/// reply; `payload` is a write's data.
fn run_request(
    export: &Export,
    writer: &ReplyWriter,
    structured: bool,
    req: (u16, u16, u64, u64, u32),
    payload: &[u8],
    pool: &BufPool,
) -> io::Result<()> {
    let (flags, cmd, cookie, offset, len) = req;
    let dev = &export.dev;
    let is_write = matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if is_write && export.read_only {
        return writer.lock().write_all(&simple_reply(NBD_EPERM, cookie));
    }
    let len64 = u64::from(len);
    let result: Result<(), BlockError> = match cmd {
        CMD_READ => {
            if len > export.max_block_bytes {
                Err(BlockError::OutOfRange {
                    op: "read",
                    offset_bytes: offset,
                    len_bytes: len64,
                    size_bytes: export.size_bytes,
                })
            } else {
                let n = usize::try_from(len)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let head = if structured { 20 + 8 } else { 16 };
                let mut buf = pool.take(head + n);
                let read = dev.read_at(&mut buf[head..head + n], offset);
                let r = read.map(|()| {
                    read_reply_head(&mut buf, structured, cookie, offset, len);
                    writer.lock().write_all(&buf[..head + n])
                });
                pool.give(buf);
                match r {
                    Ok(sent) => return sent,
                    Err(e) => Err(e),
                }
            }
        }
        CMD_WRITE => dev.write_at(
            payload,
            offset,
            WriteFlags {
                fua: flags & CMD_FLAG_FUA != 0,
            },
        ),
        CMD_FLUSH => dev.flush(),
        CMD_TRIM => dev.trim(offset, len64).and_then(|()| {
            if flags & CMD_FLAG_FUA != 0 {
                dev.flush()
            } else {
                Ok(())
            }
        }),
        CMD_WRITE_ZEROES => dev.write_zeroes(offset, len64).and_then(|()| {
            if flags & CMD_FLAG_FUA != 0 {
                dev.flush()
            } else {
                Ok(())
            }
        }),
        _ => Err(BlockError::Unsupported {
            op: "unknown command",
        }),
    };
    let code = match &result {
        Ok(()) => 0,
        Err(BlockError::Unsupported { .. }) => NBD_EINVAL,
        Err(e) => {
            tracing::warn!(cmd, offset, len, error = %e, "nbd request failed");
            error_code(is_write, e)
        }
    };
    if structured && cmd == CMD_READ {
        // A read error as a structured error chunk: errno, empty message.
        let h = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6);
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(&0u16.to_be_bytes());
        return write_two(&mut *writer.lock(), &h, &body);
    }
    writer.lock().write_all(&simple_reply(code, cookie))
}

/// Entry point for `csvfs serve-lun FILE --listen ADDR`: serves `file` on `listen`
/// (`IP:PORT`, `unix:PATH` or an absolute socket path) until SIGINT or SIGTERM, then shuts
/// down cleanly (in-flight requests finish, the file is flushed, the socket removed).
pub fn run_serve_lun(file: &Path, listen: &str, options: ServeOptions) -> Result<(), ServeError> {
    let addr: ListenAddr = listen.parse()?;
    // Block the signals before any server thread starts so that only `wait` receives them.
    let signals =
        crate::sys::TerminationSignals::block().map_err(|source| ServeError::Signal { source })?;
    let handle = serve(file, &addr, options)?;
    tracing::info!(uri = %handle.uri(), "serving LUN; stop with SIGINT or SIGTERM");
    let sig = signals
        .wait()
        .map_err(|source| ServeError::Signal { source })?;
    tracing::info!(signal = sig, "shutting down LUN server");
    if let Err(e) = handle.shutdown() {
        tracing::error!(error = %e, "final flush of the LUN failed");
    }
    Ok(())
}
