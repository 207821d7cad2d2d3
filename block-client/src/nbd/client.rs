//! [`NbdClient`]: a pipelined NBD client usable from many threads at once.
//!
//! ```text
//!  caller threads ──(lock writer; register cookie → waiter; write request)──► socket
//!        ▲                                                                      │
//!        └──── waiter (one-shot channel) ◄── reader thread: match reply cookie ◄┘
//! ```
//!
//! Each connection has one writer lock and one reader thread; any number of requests are
//! in flight, matched by cookie. When the server advertises NBD_FLAG_CAN_MULTI_CONN the
//! client opens several connections and spreads requests over them round-robin.
//!
//! Connection state machine (per connection slot):
//!
//! ```text
//!   Empty ──connect+handshake──► Live ──read/write error, bad reply, request timeout──► Dead
//!     ▲                                                                                 │
//!     └──────────── next request on this slot (back-off, until reconnect_timeout) ◄─────┘
//! ```
//!
//! When a connection dies every request in flight on it is woken with "lost". Reads,
//! writes, trims and write-zeroes are idempotent and are resent on a new connection until
//! `reconnect_timeout_ms` has passed since the request began; then the caller gets
//! [`BlockError::PathLost`]. A flush in flight is never resent (a failed flush is final):
//! it fails with `PathLost`. If writes acknowledged on a connection that then died were not
//! covered by a successful flush, the next flush fails once with `PathLost` as well, because
//! a restarted server may have lost them. An error reply is [`BlockError::Device`] with the
//! server's errno, and the connection stays usable.

use std::collections::HashMap;
use std::io::{self, BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::proto::*;
use super::transport::{write_two, Stream};
use super::uri::NbdUri;
use crate::{BlockDevice, BlockError, WriteFlags};

/// Tuning of an [`NbdClient`].
#[derive(Debug, Clone)]
pub struct NbdClientOptions {
    /// Connections to open when the server advertises multi-conn. Default: 2.
    pub connections: u32,
    /// Timeout for connecting and negotiating, in milliseconds. Default: 5000.
    pub connect_timeout_ms: u64,
    /// Time a request may wait for its reply before the connection is declared dead, in
    /// milliseconds. Default: 30000.
    pub request_timeout_ms: u64,
    /// How long a request keeps retrying over new connections after its connection was
    /// lost before it fails with `PathLost`, in milliseconds. Default: 30000.
    pub reconnect_timeout_ms: u64,
    /// Ask for structured replies. Default: true.
    pub structured_replies: bool,
}

impl Default for NbdClientOptions {
    fn default() -> Self {
        NbdClientOptions {
            connections: 2,
            connect_timeout_ms: 5000,
            request_timeout_ms: 30_000,
            reconnect_timeout_ms: 30_000,
            structured_replies: true,
        }
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size of the export in bytes.
    pub size_bytes: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub transmission_flags: u16,
    /// Minimum block size in bytes (1 when the server gave none).
    pub min_block_bytes: u32,
    /// Preferred block size in bytes.
    pub preferred_block_bytes: u32,
    /// Largest request payload in bytes.
    pub max_block_bytes: u32,
    /// Structured replies are in use.
    pub structured_replies: bool,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }

    /// The server advertised NBD_FLAG_CAN_MULTI_CONN.
    pub fn can_multi_conn(&self) -> bool {
        self.has(TFLAG_CAN_MULTI_CONN)
    }

    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.has(TFLAG_READ_ONLY)
    }
}

/// How a request ended, as seen by its waiter.
#[derive(Debug)]
enum ReplyError {
    /// The server answered with this NBD error.
    Errno(u32),
    /// The connection died or timed out.
    Lost(io::Error),
}

type Reply = Result<Vec<u8>, ReplyError>;

#[derive(Debug)]
struct Waiter {
    tx: mpsc::SyncSender<Reply>,
    offset: u64,
    /// Read buffer (reads only; empty otherwise).
    buf: Vec<u8>,
    /// First error chunk of a structured reply.
    error: Option<u32>,
}

#[derive(Debug, Default)]
struct ConnState {
    pending: HashMap<u64, Waiter>,
    dead: Option<String>,
}

#[derive(Debug)]
struct Conn {
    writer: Mutex<Stream>,
    control: Stream,
    state: Mutex<ConnState>,
    next_cookie: AtomicU64,
    structured: bool,
    /// Highest client write sequence acknowledged (non-FUA) on this connection.
    max_write_seq: AtomicU64,
    loss_reported: AtomicBool,
}

fn lost(kind: io::ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

impl Conn {
    /// Marks the connection dead and wakes every waiter with "lost".
    fn kill(&self, why: &str) {
        let waiters = {
            let mut st = self.state.lock();
            if st.dead.is_none() {
                st.dead = Some(why.to_string());
            }
            std::mem::take(&mut st.pending)
        };
        self.control.shutdown();
        for (_, w) in waiters {
            // A waiter that gave up already dropped its receiver; nothing to tell it.
            let _ = w.tx.send(Err(ReplyError::Lost(lost(
                io::ErrorKind::ConnectionAborted,
                why,
            ))));
        }
    }

    fn is_dead(&self) -> bool {
        self.state.lock().dead.is_some()
    }

    /// Sends one request and waits for its reply.
    fn call(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
        timeout: Duration,
    ) -> Reply {
        let (tx, rx) = mpsc::sync_channel(1);
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let buf = if cmd == CMD_READ {
            let n = usize::try_from(len)
                .map_err(|e| ReplyError::Lost(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            vec![0u8; n]
        } else {
            Vec::new()
        };
        {
            let mut st = self.state.lock();
            if let Some(why) = &st.dead {
                return Err(ReplyError::Lost(lost(
                    io::ErrorKind::NotConnected,
                    why.clone(),
                )));
            }
            st.pending.insert(
                cookie,
                Waiter {
                    tx,
                    offset,
                    buf,
                    error: None,
                },
            );
        }
        let header = encode_request(flags, cmd, cookie, offset, len);
        let sent = {
            let mut w = self.writer.lock();
            write_two(&mut *w, &header, data)
        };
        if let Err(e) = sent {
            self.kill(&format!("send request: {e}"));
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let why = format!("no reply within {} ms", timeout.as_millis());
                self.kill(&why);
                Err(ReplyError::Lost(lost(io::ErrorKind::TimedOut, why)))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ReplyError::Lost(lost(
                io::ErrorKind::ConnectionAborted,
                "connection closed while the request was in flight",
            ))),
        }
    }

    fn take_waiter(&self, cookie: u64) -> io::Result<Waiter> {
        self.state
            .lock()
            .pending
            .remove(&cookie)
            .ok_or_else(|| protocol_error(format!("reply for unknown cookie {cookie}")))
    }

    fn put_waiter(&self, cookie: u64, w: Waiter) {
        let mut st = self.state.lock();
        // On a dead connection the waiter is dropped, which wakes its caller with "lost".
        if st.dead.is_none() {
            st.pending.insert(cookie, w);
        }
    }

    /// Reads replies until the connection fails; runs on the connection's reader thread.
    fn reader_loop(&self, rd: &mut impl Read) -> io::Result<()> {
        loop {
            let magic = read_u32(rd)?;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = read_u32(rd)?;
                    let cookie = read_u64(rd)?;
                    let mut w = self.take_waiter(cookie)?;
                    if error != 0 {
                        let _ = w.tx.send(Err(ReplyError::Errno(error)));
                        continue;
                    }
                    if !w.buf.is_empty() {
                        if self.structured {
                            return Err(protocol_error(
                                "simple reply to a read after structured replies were negotiated",
                            ));
                        }
                        rd.read_exact(&mut w.buf)?;
                    }
                    let _ = w.tx.send(Ok(w.buf));
                }
                STRUCTURED_REPLY_MAGIC => {
                    let flags = read_u16(rd)?;
                    let kind = read_u16(rd)?;
                    let cookie = read_u64(rd)?;
                    let len = read_u32(rd)?;
                    let mut w = self.take_waiter(cookie)?;
                    match kind {
                        REPLY_TYPE_NONE => skip(rd, u64::from(len))?,
                        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                            let at = read_u64(rd)?;
                            let n = if kind == REPLY_TYPE_OFFSET_DATA {
                                len.checked_sub(8)
                                    .ok_or_else(|| protocol_error("short data chunk"))?
                            } else {
                                read_u32(rd)?
                            };
                            let rel = at
                                .checked_sub(w.offset)
                                .and_then(|r| usize::try_from(r).ok())
                                .ok_or_else(|| protocol_error("data chunk before the request"))?;
                            let n = usize::try_from(n)
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                            let dst = w
                                .buf
                                .get_mut(rel..rel.saturating_add(n))
                                .ok_or_else(|| protocol_error("data chunk outside the request"))?;
                            if kind == REPLY_TYPE_OFFSET_DATA {
                                rd.read_exact(dst)?;
                            } else {
                                dst.fill(0);
                            }
                        }
                        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                            let err = read_u32(rd)?;
                            skip(
                                rd,
                                u64::from(
                                    len.checked_sub(4)
                                        .ok_or_else(|| protocol_error("short error chunk"))?,
                                ),
                            )?;
                            w.error.get_or_insert(if err == 0 { NBD_EIO } else { err });
                        }
                        _ => skip(rd, u64::from(len))?,
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        let r = match w.error {
                            Some(e) => Err(ReplyError::Errno(e)),
                            None => Ok(std::mem::take(&mut w.buf)),
                        };
                        let _ = w.tx.send(r);
                    } else {
                        self.put_waiter(cookie, w);
                    }
                }
                other => return Err(protocol_error(format!("bad reply magic {other:#x}"))),
            }
        }
    }
}

/// Negotiates with a freshly connected server (fixed newstyle, NBD_OPT_GO with a fallback
/// to NBD_OPT_EXPORT_NAME) and returns the export's description.
fn handshake(s: &mut Stream, export: &str, want_structured: bool) -> io::Result<ExportInfo> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(protocol_error(format!(
            "not an NBD server (magic {magic:#x})"
        )));
    }
    let style = read_u64(s)?;
    if style == OLDSTYLE_MAGIC {
        return Err(protocol_error(
            "server speaks oldstyle negotiation, which is not supported",
        ));
    }
    if style != IHAVEOPT {
        return Err(protocol_error(format!("bad newstyle magic {style:#x}")));
    }
    let hflags = read_u16(s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error(
            "server does not support fixed newstyle negotiation",
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    std::io::Write::write_all(s, &cflags.to_be_bytes())?;

    let mut structured = false;
    if want_structured {
        write_option(s, OPT_STRUCTURED_REPLY, &[])?;
        let (reply, data) = read_option_reply(s, OPT_STRUCTURED_REPLY)?;
        structured = reply == REP_ACK;
        if !structured && reply & REP_FLAG_ERROR == 0 {
            return Err(protocol_error(format!(
                "unexpected reply {reply:#x} to STRUCTURED_REPLY ({} bytes)",
                data.len()
            )));
        }
    }

    let name = export.as_bytes();
    let name_len =
        u32::try_from(name.len()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut go = Vec::with_capacity(8 + name.len());
    go.extend_from_slice(&name_len.to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    write_option(s, OPT_GO, &go)?;
    let mut info = ExportInfo {
        size_bytes: 0,
        transmission_flags: 0,
        min_block_bytes: 1,
        preferred_block_bytes: 4096,
        max_block_bytes: DEFAULT_MAX_BLOCK_BYTES,
        structured_replies: structured,
    };
    let mut got_export = false;
    loop {
        let (reply, data) = read_option_reply(s, OPT_GO)?;
        match reply {
            REP_ACK => break,
            REP_INFO => {
                let mut d = data.as_slice();
                match read_u16(&mut d)? {
                    INFO_EXPORT => {
                        info.size_bytes = read_u64(&mut d)?;
                        info.transmission_flags = read_u16(&mut d)?;
                        got_export = true;
                    }
                    INFO_BLOCK_SIZE => {
                        info.min_block_bytes = read_u32(&mut d)?.max(1);
                        info.preferred_block_bytes = read_u32(&mut d)?;
                        info.max_block_bytes = read_u32(&mut d)?;
                    }
                    _ => {}
                }
            }
            REP_ERR_UNSUP => {
                // Old server: NBD_OPT_EXPORT_NAME has no error path; a missing export closes.
                write_option(s, OPT_EXPORT_NAME, name)?;
                info.size_bytes = read_u64(s)?;
                info.transmission_flags = read_u16(s)?;
                if !no_zeroes {
                    skip(s, 124)?;
                }
                got_export = true;
                break;
            }
            e if e & REP_FLAG_ERROR != 0 => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                let what = match e {
                    REP_ERR_UNKNOWN => "server has no such export",
                    REP_ERR_POLICY => "server refused by policy",
                    _ => "server refused the export",
                };
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{what} {export:?} (error {e:#x}: {msg})"),
                ));
            }
            other => {
                return Err(protocol_error(format!(
                    "unexpected option reply {other:#x}"
                )))
            }
        }
    }
    if !got_export {
        return Err(protocol_error("server sent no NBD_INFO_EXPORT before ACK"));
    }
    let p = info.preferred_block_bytes;
    if !p.is_power_of_two() || p < 512 {
        info.preferred_block_bytes = 4096;
    }
    if info.max_block_bytes == 0 || info.max_block_bytes > DEFAULT_MAX_BLOCK_BYTES {
        info.max_block_bytes = DEFAULT_MAX_BLOCK_BYTES;
    }
    Ok(info)
}

fn read_option_reply(s: &mut Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let magic = read_u64(s)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(protocol_error(format!("bad option reply magic {magic:#x}")));
    }
    let opt = read_u32(s)?;
    if opt != option {
        return Err(protocol_error(format!(
            "reply for option {opt}, expected {option}"
        )));
    }
    let reply = read_u32(s)?;
    let len = read_u32(s)?;
    if len > 1 << 20 {
        return Err(protocol_error("option reply too large"));
    }
    let data = read_vec(s, len)?;
    Ok((reply, data))
}

#[derive(Debug)]
struct Shared {
    uri: NbdUri,
    options: NbdClientOptions,
    info: ExportInfo,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next_slot: AtomicUsize,
    write_seq: AtomicU64,
    flushed_seq: AtomicU64,
    lost_unflushed: AtomicBool,
    closed: AtomicBool,
    reconnects: AtomicU64,
}

/// A pipelined NBD client; a [`BlockDevice`] usable from many threads at once.
#[derive(Debug)]
pub struct NbdClient {
    shared: Shared,
}

fn connect(uri: &NbdUri, options: &NbdClientOptions) -> io::Result<(Arc<Conn>, ExportInfo)> {
    let timeout = Duration::from_millis(options.connect_timeout_ms.max(1));
    let mut s = Stream::connect(&uri.addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let info = handshake(&mut s, &uri.export, options.structured_replies)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(Some(Duration::from_millis(
        options.request_timeout_ms.max(1),
    )))?;
    let conn = Arc::new(Conn {
        writer: Mutex::new(s.try_clone()?),
        control: s.try_clone()?,
        state: Mutex::new(ConnState::default()),
        next_cookie: AtomicU64::new(1),
        structured: info.structured_replies,
        max_write_seq: AtomicU64::new(0),
        loss_reported: AtomicBool::new(false),
    });
    let reader_conn = conn.clone();
    thread::Builder::new()
        .name("nbd-reply-reader".into())
        .spawn(move || {
            let mut rd = BufReader::with_capacity(256 << 10, s);
            let why = match reader_conn.reader_loop(&mut rd) {
                Ok(()) => "reader stopped".to_string(),
                Err(e) => format!("receive reply: {e}"),
            };
            reader_conn.kill(&why);
        })?;
    Ok((conn, info))
}

impl NbdClient {
    /// Connects to the export named by an NBD URI (`nbd://host:port/export` or
    /// `nbd+unix:///export?socket=PATH`).
    pub fn open(uri: &str, options: NbdClientOptions) -> Result<NbdClient, BlockError> {
        let parsed: NbdUri = uri.parse().map_err(|e: super::UriError| BlockError::Open {
            target: uri.to_string(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })?;
        NbdClient::connect(parsed, options)
    }

    /// Connects to a parsed URI.
    pub fn connect(uri: NbdUri, options: NbdClientOptions) -> Result<NbdClient, BlockError> {
        let (first, info) = connect(&uri, &options).map_err(|source| BlockError::Open {
            target: uri.to_string(),
            source,
        })?;
        let n = if info.can_multi_conn() {
            options.connections.max(1)
        } else {
            1
        };
        let mut slots = vec![Mutex::new(Some(first))];
        for _ in 1..n {
            // Extra connections are opened now so that a misbehaving server fails early.
            let (c, _) = connect(&uri, &options).map_err(|source| BlockError::Open {
                target: uri.to_string(),
                source,
            })?;
            slots.push(Mutex::new(Some(c)));
        }
        tracing::debug!(%uri, size_bytes = info.size_bytes, connections = n, structured = info.structured_replies, "nbd export opened");
        Ok(NbdClient {
            shared: Shared {
                uri,
                options,
                info,
                slots,
                next_slot: AtomicUsize::new(0),
                write_seq: AtomicU64::new(0),
                flushed_seq: AtomicU64::new(0),
                lost_unflushed: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                reconnects: AtomicU64::new(0),
            },
        })
    }

    /// What the server told us about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// The URI this client is connected to.
    pub fn uri(&self) -> &NbdUri {
        &self.shared.uri
    }

    /// Number of connections (more than one only with multi-conn).
    pub fn connection_count(&self) -> usize {
        self.shared.slots.len()
    }

    /// How many times a lost connection was re-established.
    pub fn reconnect_count(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Sends NBD_CMD_DISC on every connection and refuses further work.
    pub fn close(&self) {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for slot in &self.shared.slots {
            if let Some(c) = slot.lock().take() {
                let h = encode_request(0, CMD_DISC, 0, 0, 0);
                // Best effort: the server may already be gone.
                let _ = std::io::Write::write_all(&mut *c.writer.lock(), &h);
                c.kill("client closed");
            }
        }
    }

    /// A live connection for the next request, reconnecting (with back-off) if needed.
    fn conn(&self, started: Instant) -> Result<Arc<Conn>, io::Error> {
        let sh = &self.shared;
        let i = sh.next_slot.fetch_add(1, Ordering::Relaxed) % sh.slots.len();
        let mut slot = sh.slots[i].lock();
        if sh.closed.load(Ordering::SeqCst) {
            return Err(lost(io::ErrorKind::NotConnected, "client closed"));
        }
        if let Some(c) = slot.as_ref() {
            if !c.is_dead() {
                return Ok(c.clone());
            }
            let c = slot.take().expect("checked above");
            self.note_lost(&c);
        }
        let deadline = started + Duration::from_millis(sh.options.reconnect_timeout_ms);
        let mut backoff = Duration::from_millis(10);
        loop {
            match connect(&sh.uri, &sh.options) {
                Ok((c, info)) => {
                    if info.size_bytes != sh.info.size_bytes {
                        tracing::warn!(uri = %sh.uri, old = sh.info.size_bytes, new = info.size_bytes, "export size changed across reconnect");
                    }
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(uri = %sh.uri, slot = i, "nbd connection re-established");
                    *slot = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(uri = %sh.uri, error = %e, "nbd reconnect failed; backing off");
                    thread::sleep(backoff.min(deadline - now));
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// Records that `c` died; remembers if it had acknowledged writes no flush covered.
    fn note_lost(&self, c: &Conn) {
        if c.loss_reported.swap(true, Ordering::SeqCst) {
            return;
        }
        if c.max_write_seq.load(Ordering::SeqCst) > self.shared.flushed_seq.load(Ordering::SeqCst) {
            self.shared.lost_unflushed.store(true, Ordering::SeqCst);
        }
    }

    /// One request, retried over new connections while it is idempotent.
    fn request(
        &self,
        op: &'static str,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Vec<u8>, BlockError> {
        let sh = &self.shared;
        let started = Instant::now();
        let timeout = Duration::from_millis(sh.options.request_timeout_ms.max(1));
        let deadline = started + Duration::from_millis(sh.options.reconnect_timeout_ms);
        loop {
            let conn = self
                .conn(started)
                .map_err(|source| BlockError::PathLost { op, source })?;
            match conn.call(cmd, flags, offset, len, data, timeout) {
                Ok(buf) => {
                    if cmd == CMD_WRITE && flags & CMD_FLAG_FUA == 0
                        || cmd == CMD_WRITE_ZEROES
                        || cmd == CMD_TRIM
                    {
                        let seq = sh.write_seq.fetch_add(1, Ordering::SeqCst) + 1;
                        conn.max_write_seq.fetch_max(seq, Ordering::SeqCst);
                    }
                    return Ok(buf);
                }
                Err(ReplyError::Errno(e)) => {
                    return Err(BlockError::Device {
                        op,
                        offset_bytes: offset,
                        len_bytes: u64::from(len),
                        source: io::Error::from_raw_os_error(nbd_error_to_errno(e)),
                    })
                }
                Err(ReplyError::Lost(source)) => {
                    self.note_lost(&conn);
                    if cmd == CMD_FLUSH
                        || Instant::now() >= deadline
                        || sh.closed.load(Ordering::SeqCst)
                    {
                        return Err(BlockError::PathLost { op, source });
                    }
                    tracing::debug!(op, offset, error = %source, "nbd request lost with its connection; resending");
                }
            }
        }
    }

    fn chunk_bytes(&self) -> u64 {
        u64::from(self.shared.info.max_block_bytes.max(4096))
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

fn len_u32(n: u64) -> u32 {
    u32::try_from(n).expect("chunks are at most max_block_bytes, a u32")
}

impl BlockDevice for NbdClient {
    fn size_bytes(&self) -> u64 {
        self.shared.info.size_bytes
    }

    fn block_size_bytes(&self) -> u32 {
        self.shared.info.preferred_block_bytes
    }

    fn max_request_bytes(&self) -> u32 {
        self.shared.info.max_block_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        self.check_range("read", offset_bytes, buf.len() as u64)?;
        let chunk = usize::try_from(self.chunk_bytes()).unwrap_or(usize::MAX);
        let mut off = offset_bytes;
        for part in buf.chunks_mut(chunk) {
            let n = part.len() as u64;
            let data = self.request("read", CMD_READ, 0, off, len_u32(n), &[])?;
            part.copy_from_slice(&data);
            off += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset_bytes: u64, flags: WriteFlags) -> Result<(), BlockError> {
        self.check_range("write", offset_bytes, buf.len() as u64)?;
        let native_fua = self.shared.info.has(TFLAG_SEND_FUA);
        let f = if flags.fua && native_fua {
            CMD_FLAG_FUA
        } else {
            0
        };
        let chunk = usize::try_from(self.chunk_bytes()).unwrap_or(usize::MAX);
        let mut off = offset_bytes;
        for part in buf.chunks(chunk) {
            let n = part.len() as u64;
            self.request("write", CMD_WRITE, f, off, len_u32(n), part)?;
            off += n;
        }
        if flags.fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        let sh = &self.shared;
        if sh.lost_unflushed.swap(false, Ordering::SeqCst) {
            return Err(BlockError::PathLost {
                op: "flush",
                source: lost(
                    io::ErrorKind::ConnectionReset,
                    "writes acknowledged on a connection that was later lost may not be durable",
                ),
            });
        }
        if !sh.info.has(TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        let seq = sh.write_seq.load(Ordering::SeqCst);
        self.request("flush", CMD_FLUSH, 0, 0, 0, &[])?;
        sh.flushed_seq.fetch_max(seq, Ordering::SeqCst);
        Ok(())
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.check_range("write_zeroes", offset_bytes, len_bytes)?;
        let chunk = self.chunk_bytes();
        let mut done = 0;
        while done < len_bytes {
            let n = (len_bytes - done).min(chunk);
            if self.shared.info.has(TFLAG_SEND_WRITE_ZEROES) {
                self.request(
                    "write_zeroes",
                    CMD_WRITE_ZEROES,
                    0,
                    offset_bytes + done,
                    len_u32(n),
                    &[],
                )?;
            } else {
                let zeros = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
                self.request(
                    "write_zeroes",
                    CMD_WRITE,
                    0,
                    offset_bytes + done,
                    len_u32(n),
                    &zeros,
                )?;
            }
            done += n;
        }
        Ok(())
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.check_range("trim", offset_bytes, len_bytes)?;
        if !self.shared.info.has(TFLAG_SEND_TRIM) {
            // Trimmed contents are unspecified; doing nothing is a valid trim.
            return Ok(());
        }
        let chunk = self.chunk_bytes();
        let mut done = 0;
        while done < len_bytes {
            let n = (len_bytes - done).min(chunk);
            self.request("trim", CMD_TRIM, 0, offset_bytes + done, len_u32(n), &[])?;
            done += n;
        }
        Ok(())
    }
}

/// Opens any supported target as a shared [`BlockDevice`]: an NBD URI (`nbd://`,
/// `nbd+unix://`) or a path to a file or block device.
pub fn open_device(target: &str) -> Result<Arc<dyn BlockDevice>, BlockError> {
    if target.starts_with("nbd://") || target.starts_with("nbd+unix://") {
        Ok(Arc::new(NbdClient::open(
            target,
            NbdClientOptions::default(),
        )?))
    } else {
        Ok(Arc::new(crate::FileDevice::open(
            target,
            crate::FileOptions::default(),
        )?))
    }
}
