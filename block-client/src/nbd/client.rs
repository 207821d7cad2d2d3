//! [`NbdClient`]: a pipelined NBD client usable from many threads at once.
//!
//! ```text
//!  caller threads ──(lock writer; register cookie → waiter; write request)──► socket
//!        ▲                                                                      │
//!        └──── waiter (one-shot channel) ◄── reader thread: match reply cookie ◄┘
//! ```
//!
//! Each connection has one writer lock, one reader thread and one watchdog thread (which
//! kills the connection when a request waited past the request timeout); any number of
//! requests are in flight, matched by cookie. A request started with `submit` has no
//! waiting thread: the reader thread runs its completion. When the server advertises NBD_FLAG_CAN_MULTI_CONN the
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
//! covered by a successful flush, a restarted server may have lost them: the client counts
//! such losses ([`BlockDevice::write_loss_count`]), and [`crate::flush_since`] fails with
//! `PathLost` for every caller whose writes began before one, however many flushes ran
//! since. An error reply is [`BlockError::Device`] with the
//! server's errno, and the connection stays usable.

use super::reply_buf::ReplyBuf;
use std::collections::HashMap;
use std::io::{self, BufRead, Read};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::proto::*;
use super::transport::{write_two, Stream};
use super::uri::NbdUri;
use crate::{AsyncIo, BlockDevice, BlockError, Completion, Pipe, PipeCompletion, WriteFlags};

/// Requests whose payload is at most this size are batched with others into one send.
const COMBINE_MAX_BYTES: usize = 64 << 10;
/// Size asked for a connection's pipe for writes sent by reference: one 1 MiB write (256
/// pages) and its header in two rounds. It is `fs.pipe-max-size` by default, the most a
/// process without CAP_SYS_RESOURCE may ask for.
const BY_REFERENCE_PIPE_BYTES: usize = 1 << 20;
/// Buffer of a connection's reply reader. A large read's data is read straight into the
/// read buffer except the part already buffered with its header, which is copied, so the
/// buffer is kept small enough that this copy stays a small part of a 1 MiB read, and
/// large enough that one receive takes many small replies. After a read into a pipe the
/// next fill is held to one reply header (see [`ReplyBuf`]), so a stream of such reads
/// leaves all its data in the socket, for the splice.
const REPLY_BUFFER_BYTES: usize = 64 << 10;
/// Bytes of a reply's header up to its data: a simple reply's, or a structured reply's
/// with the offset of a data chunk.
const SIMPLE_HEADER_BYTES: usize = 16;
const STRUCTURED_DATA_HEADER_BYTES: usize = 28;

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
    /// A read into a pipe whose data did not all go into the pipe; its data was dropped.
    /// `fit`: how many bytes went in before the pipe filled up (`None`: it did not fill
    /// up, the chunks of a structured reply came out of order).
    NotInPipe { fit: Option<usize> },
}

type Reply = Result<Vec<u8>, ReplyError>;

/// Who hears a request's reply.
enum Notify {
    /// A caller thread waiting on the channel.
    Wait(mpsc::SyncSender<Reply>),
    /// A completion, run by whichever thread learns the outcome (usually the reader).
    Call(Box<dyn FnOnce(Reply) + Send>),
    /// The completion of a read into a pipe ([`Waiter::pipe`]); run like `Call`.
    Pipe(Box<dyn FnOnce(Result<Pipe, ReplyError>) + Send>),
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Notify::Wait(_) => "Wait",
            Notify::Call(_) => "Call",
            Notify::Pipe(_) => "Pipe",
        })
    }
}

impl Notify {
    fn send(self, r: Reply) {
        match self {
            // A waiter that gave up already dropped its receiver; nothing to tell it.
            Notify::Wait(tx) => {
                let _ = tx.send(r);
            }
            Notify::Call(f) => f(r),
            // A read into a pipe that succeeds ends in `Waiter::end_pipe`, with the pipe.
            Notify::Pipe(f) => f(r.and(Err(ReplyError::NotInPipe { fit: None }))),
        }
    }
}

/// A read whose data goes into a pipe instead of [`Waiter::buf`].
#[derive(Debug)]
struct PipeSink {
    pipe: Pipe,
    /// Bytes of the read.
    len: usize,
    /// Bytes of the read in the pipe so far (in order from the start of the read).
    filled: usize,
    /// Some data could not go into the pipe and was dropped: the read ends in
    /// [`ReplyError::NotInPipe`].
    spilled: bool,
    /// Bytes in the pipe when it filled up, if it did.
    full_at: Option<usize>,
}

/// Zeros for the holes of a structured reply to a read into a pipe.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl PipeSink {
    /// Moves the next `n` bytes of the stream into the pipe: what the reader has buffered
    /// already by a copy, the rest spliced from the socket. When the pipe fills up the
    /// rest is read and dropped, and the sink is spilled.
    fn take_from(&mut self, rd: &mut ReplyBuf<Stream>, n: usize) -> io::Result<()> {
        let mut left = n;
        if !self.spilled {
            let have = rd.buffer();
            let k = have.len().min(left);
            let mut put = 0;
            while put < k {
                match self.pipe.write(&have[put..k]) {
                    Ok(m) => put += m,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.full(put);
                        break;
                    }
                }
            }
            rd.consume(put);
            left -= put;
            self.filled += put;
        }
        // Now the reader's buffer is empty or `left` is 0: the socket is next in line.
        let mut stalls = 0;
        while !self.spilled && left > 0 {
            let sock = rd.get_ref().as_fd();
            match self.pipe.splice_from(sock, left) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(m) => {
                    left -= m;
                    self.filled += m;
                    stalls = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Either the socket has nothing yet, or the pipe is full. A pipe that
                    // has a free slot but still takes nothing from a readable socket
                    // counts as full after a few tries.
                    stalls += 1;
                    if !self.pipe.has_room()? || stalls > 8 {
                        self.full(0);
                    } else {
                        crate::sys::wait_readable(sock)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if left > 0 {
            skip(rd, left as u64)?;
        }
        Ok(())
    }

    /// Appends `n` zero bytes (a hole of a structured reply).
    fn zeros(&mut self, n: usize) {
        let mut left = n;
        while !self.spilled && left > 0 {
            match self.pipe.write(&ZEROS[..left.min(ZEROS.len())]) {
                Ok(m) => {
                    left -= m;
                    self.filled += m;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.full(0),
            }
        }
    }

    /// The pipe is full with `pending` more bytes not yet counted in `filled`.
    fn full(&mut self, pending: usize) {
        self.spilled = true;
        self.full_at.get_or_insert(self.filled + pending);
    }
}

#[derive(Debug)]
struct Waiter {
    tx: Notify,
    /// When the request was sent; the watchdog kills a connection whose oldest request has
    /// waited past the request timeout.
    started: Instant,
    offset: u64,
    /// Read buffer (reads only; empty otherwise).
    buf: Vec<u8>,
    /// Where a read into a pipe puts its data (then `buf` is empty).
    pipe: Option<PipeSink>,
    /// Bytes of the read covered by structured data and hole chunks so far.
    covered: usize,
    /// First error chunk of a structured reply.
    error: Option<u32>,
}

impl Waiter {
    /// Ends a read into a pipe whose reply is complete: the completion gets the pipe, or
    /// the reply's error, or [`ReplyError::NotInPipe`] when data was dropped. A reply that
    /// did not cover the read is a protocol error (the connection ends).
    fn end_pipe(mut self) -> io::Result<()> {
        let Some(sink) = self.pipe.take() else {
            return Err(protocol_error("a read into a pipe lost its pipe"));
        };
        let r = match self.error {
            Some(e) => Err(ReplyError::Errno(e)),
            None if self.covered != sink.len => {
                let why = format!("read reply covered {} of {} bytes", self.covered, sink.len);
                self.tx
                    .send(Err(ReplyError::Lost(protocol_error(why.clone()))));
                return Err(protocol_error(why));
            }
            None if sink.spilled || sink.filled != sink.len => {
                Err(ReplyError::NotInPipe { fit: sink.full_at })
            }
            None => Ok(sink.pipe),
        };
        match self.tx {
            Notify::Pipe(f) => f(r),
            other => other.send(Err(ReplyError::NotInPipe { fit: None })),
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct ConnState {
    pending: HashMap<u64, Waiter>,
    dead: Option<String>,
}

#[derive(Debug)]
struct Conn {
    /// The socket, and the spare buffer small requests are batched in while it is sent.
    writer: Mutex<(Stream, Vec<u8>)>,
    /// Encoded small requests waiting for the socket.
    outq: Mutex<Vec<u8>>,
    control: Stream,
    state: Mutex<ConnState>,
    next_cookie: AtomicU64,
    structured: bool,
    /// Highest client write sequence acknowledged (non-FUA) on this connection.
    max_write_seq: AtomicU64,
    loss_reported: AtomicBool,
    /// Set with `state.dead`, for checks that should not take the lock.
    dead: AtomicBool,
    /// The pipe writes sent by reference go through, made at the first one (`None` until
    /// then, and again after a send failed half way). Used only by the `writer` holder.
    by_reference: Mutex<Option<Pipe>>,
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
                self.dead.store(true, Ordering::SeqCst);
            }
            std::mem::take(&mut st.pending)
        };
        self.control.shutdown();
        for (_, w) in waiters {
            w.tx.send(Err(ReplyError::Lost(lost(
                io::ErrorKind::ConnectionAborted,
                why,
            ))));
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Registers and sends one request; the receiver gets its reply.
    fn start(
        &self,
        req: &Req,
        data: &[u8],
        buf: Vec<u8>,
    ) -> Result<mpsc::Receiver<Reply>, ReplyError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.register(req, data, buf, None, Notify::Wait(tx), false)
            .map_err(|(e, _, _)| e)?;
        Ok(rx)
    }

    /// Registers `notify` for one request and sends it, `data` by reference when
    /// `by_reference` (see [`BlockDevice::submit_write_by_reference`]); hands `notify` and
    /// `pipe` back, unused, when the connection is dead already.
    fn register(
        &self,
        req: &Req,
        data: &[u8],
        buf: Vec<u8>,
        pipe: Option<PipeSink>,
        notify: Notify,
        by_reference: bool,
    ) -> Result<(), (ReplyError, Notify, Option<PipeSink>)> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.state.lock();
            if let Some(why) = &st.dead {
                let e = ReplyError::Lost(lost(io::ErrorKind::NotConnected, why.clone()));
                return Err((e, notify, pipe));
            }
            st.pending.insert(
                cookie,
                Waiter {
                    tx: notify,
                    started: Instant::now(),
                    offset: req.offset,
                    buf,
                    pipe,
                    covered: 0,
                    error: None,
                },
            );
        }
        let header = encode_request(req.flags, req.cmd, cookie, req.offset, req.len);
        let sent = if by_reference {
            self.send_by_reference(&header, data)
        } else {
            self.send(&header, data)
        };
        if let Err(e) = sent {
            self.kill(&format!("send request: {e}"));
        }
        Ok(())
    }

    /// Waits for the reply of a started request.
    fn finish(&self, rx: &mpsc::Receiver<Reply>, timeout: Duration) -> Reply {
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

    /// Sends one request. Small requests are queued and sent in batches by whichever caller
    /// holds the socket (one system call for many requests); large ones are written directly.
    fn send(&self, header: &[u8], data: &[u8]) -> io::Result<()> {
        if data.len() > COMBINE_MAX_BYTES {
            let mut w = self.writer.lock();
            self.drain_queue(&mut w)?;
            write_two(&mut w.0, header, data)?;
            drop(w);
        } else {
            let mut q = self.outq.lock();
            q.extend_from_slice(header);
            q.extend_from_slice(data);
        }
        self.send_queued()
    }

    /// Sends what is queued unless another caller holds the socket. Whoever finds the
    /// socket free sends everything queued; a caller that finds it busy leaves its request
    /// to the holder, who checks the queue again after unlocking.
    fn send_queued(&self) -> io::Result<()> {
        loop {
            let Some(mut w) = self.writer.try_lock() else {
                return Ok(());
            };
            self.drain_queue(&mut w)?;
            drop(w);
            if self.outq.lock().is_empty() {
                return Ok(());
            }
        }
    }

    /// Sends one request with its data by reference (see
    /// [`BlockDevice::submit_write_by_reference`]): the data's pages go into the socket
    /// through the connection's pipe, without a copy. Copies, like [`send`](Self::send),
    /// when no pipe can be made.
    fn send_by_reference(&self, header: &[u8], data: &[u8]) -> io::Result<()> {
        {
            let mut w = self.writer.lock();
            self.drain_queue(&mut w)?;
            let mut slot = self.by_reference.lock();
            if slot.is_none() {
                *slot = Pipe::new_blocking(BY_REFERENCE_PIPE_BYTES)
                    .inspect_err(|e| tracing::debug!(error = %e, "no pipe for writes by reference"))
                    .ok();
            }
            match slot.as_ref() {
                Some(pipe) => {
                    if let Err(e) = pipe.send_by_reference(w.0.as_fd(), header, data) {
                        // What the pipe still holds belongs to a request cut in two.
                        *slot = None;
                        return Err(e);
                    }
                }
                None => write_two(&mut w.0, header, data)?,
            }
        }
        // Small requests queued meanwhile.
        self.send_queued()
    }

    /// Sends everything queued. `w` is the socket with its spare batch buffer; the queue
    /// and the spare swap places so that no batch allocates.
    fn drain_queue(&self, w: &mut (Stream, Vec<u8>)) -> io::Result<()> {
        let (stream, batch) = w;
        loop {
            {
                let mut q = self.outq.lock();
                if q.is_empty() {
                    return Ok(());
                }
                std::mem::swap(&mut *q, batch);
            }
            let r = std::io::Write::write_all(stream, batch);
            batch.clear();
            r?;
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
        match &st.dead {
            None => {
                st.pending.insert(cookie, w);
            }
            Some(why) => {
                let e = ReplyError::Lost(lost(io::ErrorKind::ConnectionAborted, why.clone()));
                drop(st);
                w.tx.send(Err(e));
            }
        }
    }

    /// Reads replies until the connection fails; runs on the connection's reader thread.
    /// A request whose reply was being read when the connection failed hears "lost", like
    /// every request still waiting (see [`Conn::kill`]): a completion is never dropped.
    fn reader_loop(&self, rd: &mut ReplyBuf<Stream>) -> io::Result<()> {
        let header_bytes = if self.structured {
            STRUCTURED_DATA_HEADER_BYTES
        } else {
            SIMPLE_HEADER_BYTES
        };
        loop {
            let mut in_hand = None;
            match self.read_reply(rd, &mut in_hand) {
                // Another read into a pipe is likely next: leave its data in the socket.
                Ok(into_pipe) => rd.cap(if into_pipe { header_bytes } else { 0 }),
                Err(e) => {
                    if let Some(w) = in_hand {
                        let why = format!("receive reply: {e}");
                        w.tx.send(Err(ReplyError::Lost(lost(e.kind(), why))));
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Reads one reply (or one chunk of a structured reply). The waiter of the request it
    /// answers stays in `in_hand` until it is told or put back. Returns whether the reply
    /// was to a read into a pipe.
    fn read_reply(
        &self,
        rd: &mut ReplyBuf<Stream>,
        in_hand: &mut Option<Waiter>,
    ) -> io::Result<bool> {
        let magic = read_u32(rd)?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = read_u32(rd)?;
                let cookie = read_u64(rd)?;
                let w = in_hand.insert(self.take_waiter(cookie)?);
                let into_pipe = w.pipe.is_some();
                if error != 0 {
                    return Self::tell(in_hand, Err(ReplyError::Errno(error))).map(|()| into_pipe);
                }
                if self.structured && (into_pipe || !w.buf.is_empty()) {
                    return Err(protocol_error(
                        "simple reply to a read after structured replies were negotiated",
                    ));
                }
                if let Some(sink) = w.pipe.as_mut() {
                    let n = sink.len;
                    sink.take_from(rd, n)?;
                    w.covered = n;
                    return Self::end_pipe(in_hand).map(|()| true);
                }
                rd.read_exact(&mut w.buf)?;
                let buf = std::mem::take(&mut w.buf);
                Self::tell(in_hand, Ok(buf)).map(|()| false)
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = read_u16(rd)?;
                let kind = read_u16(rd)?;
                let cookie = read_u64(rd)?;
                let len = read_u32(rd)?;
                let w = in_hand.insert(self.take_waiter(cookie)?);
                let into_pipe = w.pipe.is_some();
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
                        if let Some(sink) = w.pipe.as_mut() {
                            if rel.checked_add(n).is_none_or(|end| end > sink.len) {
                                return Err(protocol_error("data chunk outside the request"));
                            }
                            // Chunks may come in any order; a pipe takes them only in order,
                            // so one out of order spills the read.
                            if rel != sink.filled {
                                sink.spilled = true;
                            }
                            if kind == REPLY_TYPE_OFFSET_DATA {
                                sink.take_from(rd, n)?;
                            } else {
                                sink.zeros(n);
                            }
                        } else {
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
                        w.covered += n;
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
                if flags & REPLY_FLAG_DONE == 0 {
                    if let Some(w) = in_hand.take() {
                        self.put_waiter(cookie, w);
                    }
                    return Ok(into_pipe);
                }
                if into_pipe {
                    return Self::end_pipe(in_hand).map(|()| true);
                }
                let r = match w.error {
                    Some(e) => Err(ReplyError::Errno(e)),
                    // The buffer is recycled: every byte must have come from the reply.
                    None if w.covered != w.buf.len() => {
                        return Err(protocol_error(format!(
                            "structured read reply covered {} of {} bytes",
                            w.covered,
                            w.buf.len()
                        )))
                    }
                    None => Ok(std::mem::take(&mut w.buf)),
                };
                Self::tell(in_hand, r).map(|()| false)
            }
            other => Err(protocol_error(format!("bad reply magic {other:#x}"))),
        }
    }

    /// Tells the waiter in hand its outcome.
    fn tell(in_hand: &mut Option<Waiter>, r: Reply) -> io::Result<()> {
        if let Some(w) = in_hand.take() {
            w.tx.send(r);
        }
        Ok(())
    }

    /// Ends the read into a pipe in hand (see [`Waiter::end_pipe`]).
    fn end_pipe(in_hand: &mut Option<Waiter>) -> io::Result<()> {
        in_hand.take().map_or(Ok(()), Waiter::end_pipe)
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

/// One request as the client issues it.
#[derive(Debug, Clone, Copy)]
struct Req {
    op: &'static str,
    cmd: u16,
    flags: u16,
    offset: u64,
    len: u32,
}

impl Req {
    /// A read of `len` bytes at `offset`.
    fn read(offset: u64, len: u32) -> Req {
        Req {
            op: "read",
            cmd: CMD_READ,
            flags: 0,
            offset,
            len,
        }
    }
}

/// A request started with [`NbdClient::start_read`] or [`NbdClient::start_write`].
/// Dropping it without waiting abandons the reply (the request still runs on the server).
#[derive(Debug)]
pub struct Pending<'a> {
    client: &'a NbdClient,
    req: Req,
    data: Vec<u8>,
    inflight: Option<(Arc<Conn>, mpsc::Receiver<Reply>)>,
    started: Instant,
}

impl Pending<'_> {
    /// Waits for the reply: the data for a read, an empty vector for a write.
    pub fn wait(mut self) -> Result<Vec<u8>, BlockError> {
        let client = self.client;
        if let Some((conn, rx)) = self.inflight.take() {
            let reply = conn.finish(&rx, client.timeout());
            if let Some(r) = client.complete(&self.req, &conn, reply, self.started) {
                return r;
            }
        }
        // Lost with its connection (or never sent): resend on the blocking path.
        client.request(&self.req, &self.data)
    }
}

impl NbdClient {
    /// Returns a buffer obtained from [`Pending::wait`] of a read for reuse.
    pub fn recycle_buffer(&self, buf: Vec<u8>) {
        self.recycle(buf);
    }
}

#[derive(Debug)]
struct Shared {
    uri: NbdUri,
    options: NbdClientOptions,
    info: ExportInfo,
    slots: Vec<RwLock<Option<Arc<Conn>>>>,
    next_slot: AtomicUsize,
    /// Counts acknowledged writes; shared with asynchronous completions.
    write_seq: Arc<AtomicU64>,
    flushed_seq: AtomicU64,
    /// Connections lost with acknowledged writes no flush covered.
    write_losses: AtomicU64,
    closed: AtomicBool,
    reconnects: AtomicU64,
    /// Recycled read buffers.
    buffers: Mutex<Vec<Vec<u8>>>,
    /// Largest read sent into a pipe: lowered when a read finds its pipe full.
    pipe_fit: Arc<AtomicU32>,
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
        writer: Mutex::new((s.try_clone()?, Vec::with_capacity(64 << 10))),
        outq: Mutex::new(Vec::with_capacity(64 << 10)),
        control: s.try_clone()?,
        state: Mutex::new(ConnState::default()),
        next_cookie: AtomicU64::new(1),
        structured: info.structured_replies,
        max_write_seq: AtomicU64::new(0),
        loss_reported: AtomicBool::new(false),
        dead: AtomicBool::new(false),
        by_reference: Mutex::new(None),
    });
    let reader_conn = conn.clone();
    thread::Builder::new()
        .name("nbd-reply-reader".into())
        .spawn(move || {
            let mut rd = ReplyBuf::with_capacity(REPLY_BUFFER_BYTES, s);
            let why = match reader_conn.reader_loop(&mut rd) {
                Ok(()) => "reader stopped".to_string(),
                Err(e) => format!("receive reply: {e}"),
            };
            reader_conn.kill(&why);
        })?;
    let watched = Arc::downgrade(&conn);
    let timeout = Duration::from_millis(options.request_timeout_ms.max(1));
    thread::Builder::new()
        .name("nbd-watchdog".into())
        .spawn(move || watchdog(&watched, timeout))?;
    Ok((conn, info))
}

/// Kills the connection once a request on it has waited `timeout` for its reply, which
/// wakes every request in flight with "lost". Blocking callers time out by themselves;
/// requests started with `submit` have no waiting caller, so without this a server that
/// stops answering would leave them in flight for good. Ends with the connection.
fn watchdog(conn: &Weak<Conn>, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        thread::sleep(tick);
        let Some(c) = conn.upgrade() else {
            return;
        };
        let oldest = {
            let st = c.state.lock();
            if st.dead.is_some() {
                return;
            }
            st.pending.values().map(|w| w.started).min()
        };
        if oldest.is_some_and(|t| t.elapsed() >= timeout) {
            c.kill(&format!("no reply within {} ms", timeout.as_millis()));
            return;
        }
    }
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
        let mut slots = vec![RwLock::new(Some(first))];
        for _ in 1..n {
            // Extra connections are opened now so that a misbehaving server fails early.
            let (c, _) = connect(&uri, &options).map_err(|source| BlockError::Open {
                target: uri.to_string(),
                source,
            })?;
            slots.push(RwLock::new(Some(c)));
        }
        tracing::debug!(%uri, size_bytes = info.size_bytes, connections = n, structured = info.structured_replies, "nbd export opened");
        let pipe_fit = Arc::new(AtomicU32::new(info.max_block_bytes));
        Ok(NbdClient {
            shared: Shared {
                uri,
                options,
                info,
                slots,
                next_slot: AtomicUsize::new(0),
                write_seq: Arc::new(AtomicU64::new(0)),
                flushed_seq: AtomicU64::new(0),
                write_losses: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                reconnects: AtomicU64::new(0),
                buffers: Mutex::new(Vec::new()),
                pipe_fit,
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
            if let Some(c) = slot.write().take() {
                let h = encode_request(0, CMD_DISC, 0, 0, 0);
                // Best effort: the server may already be gone.
                let _ = std::io::Write::write_all(&mut c.writer.lock().0, &h);
                c.kill("client closed");
            }
        }
    }

    /// A live connection for the next request, reconnecting (with back-off) if needed.
    fn conn(&self, started: Instant) -> Result<Arc<Conn>, io::Error> {
        let sh = &self.shared;
        let i = sh.next_slot.fetch_add(1, Ordering::Relaxed) % sh.slots.len();
        if sh.closed.load(Ordering::SeqCst) {
            return Err(lost(io::ErrorKind::NotConnected, "client closed"));
        }
        if let Some(c) = sh.slots[i].read().as_ref() {
            if !c.is_dead() {
                return Ok(c.clone());
            }
        }
        // Slow path: one caller per slot reconnects while the others wait for it.
        let mut slot = sh.slots[i].write();
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
            self.shared.write_losses.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(uri = %self.shared.uri, "a connection to the LUN was lost with acknowledged writes no flush covered");
        }
    }

    /// Notes every connection that died but was not yet replaced (its death is otherwise
    /// noticed only when a request picks its slot), so that a flush cannot cover for its
    /// writes and a loss count is current.
    fn note_dead(&self) {
        for slot in &self.shared.slots {
            let dead = slot.read().as_ref().filter(|c| c.is_dead()).cloned();
            if let Some(c) = dead {
                self.note_lost(&c);
            }
        }
    }

    /// One request, retried over new connections while it is idempotent.
    fn request(&self, req: &Req, data: &[u8]) -> Result<Vec<u8>, BlockError> {
        let started = Instant::now();
        loop {
            let conn = self
                .conn(started)
                .map_err(|source| BlockError::PathLost { op: req.op, source })?;
            let buf = self.read_buffer(req);
            let timeout = self.timeout();
            let reply = conn
                .start(req, data, buf)
                .and_then(|rx| conn.finish(&rx, timeout));
            if let Some(result) = self.complete(req, &conn, reply, started) {
                return result;
            }
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.shared.options.request_timeout_ms.max(1))
    }

    /// Turns a reply into the caller's result; `None` means "resend on a new connection".
    fn complete(
        &self,
        req: &Req,
        conn: &Conn,
        reply: Reply,
        started: Instant,
    ) -> Option<Result<Vec<u8>, BlockError>> {
        let sh = &self.shared;
        match reply {
            Ok(buf) => {
                note_acked(req, &sh.write_seq, conn);
                Some(Ok(buf))
            }
            Err(ReplyError::Errno(e)) => Some(Err(device_error(req, e))),
            Err(ReplyError::NotInPipe { .. }) => Some(Err(not_in_pipe())),
            Err(ReplyError::Lost(source)) => {
                self.note_lost(conn);
                let deadline = started + Duration::from_millis(sh.options.reconnect_timeout_ms);
                if req.cmd == CMD_FLUSH
                    || Instant::now() >= deadline
                    || sh.closed.load(Ordering::SeqCst)
                {
                    return Some(Err(BlockError::PathLost { op: req.op, source }));
                }
                tracing::debug!(op = req.op, offset = req.offset, error = %source, "nbd request lost with its connection; resending");
                None
            }
        }
    }

    /// Starts a read of `len_bytes` at `offset_bytes` without waiting for it; many can be in
    /// flight from one thread. [`Pending::wait`] returns the data. A request lost with its
    /// connection is resent by `wait`, exactly as the blocking methods do.
    pub fn start_read(&self, offset_bytes: u64, len_bytes: u32) -> Result<Pending<'_>, BlockError> {
        self.check_range("read", offset_bytes, u64::from(len_bytes))?;
        if len_bytes > self.shared.info.max_block_bytes {
            return Err(BlockError::OutOfRange {
                op: "read",
                offset_bytes,
                len_bytes: u64::from(len_bytes),
                size_bytes: u64::from(self.shared.info.max_block_bytes),
            });
        }
        Ok(self.start_pending(Req::read(offset_bytes, len_bytes), Vec::new()))
    }

    /// Starts a write of `data` (at most [`BlockDevice::max_request_bytes`]) without waiting
    /// for it. [`Pending::wait`] reports the outcome.
    pub fn start_write(
        &self,
        data: Vec<u8>,
        offset_bytes: u64,
        flags: WriteFlags,
    ) -> Result<Pending<'_>, BlockError> {
        let len = data.len() as u64;
        self.check_range("write", offset_bytes, len)?;
        let len_bytes = u32::try_from(len)
            .ok()
            .filter(|&l| l <= self.shared.info.max_block_bytes)
            .ok_or(BlockError::OutOfRange {
                op: "write",
                offset_bytes,
                len_bytes: len,
                size_bytes: u64::from(self.shared.info.max_block_bytes),
            })?;
        if flags.fua && !self.shared.info.has(TFLAG_SEND_FUA) {
            return Err(BlockError::Unsupported {
                op: "write with FUA",
            });
        }
        let f = if flags.fua { CMD_FLAG_FUA } else { 0 };
        let req = Req {
            op: "write",
            cmd: CMD_WRITE,
            flags: f,
            offset: offset_bytes,
            len: len_bytes,
        };
        Ok(self.start_pending(req, data))
    }

    fn start_pending(&self, req: Req, data: Vec<u8>) -> Pending<'_> {
        let started = Instant::now();
        let inflight = match self.conn(started) {
            Ok(conn) => {
                let buf = self.read_buffer(&req);
                match conn.start(&req, &data, buf) {
                    Ok(rx) => Some((conn, rx)),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        Pending {
            client: self,
            req,
            data,
            inflight,
            started,
        }
    }

    /// A buffer of exactly `len` bytes for a read reply, reused when possible so that large
    /// reads do not pay for zeroing fresh memory each time.
    fn read_buffer(&self, req: &Req) -> Vec<u8> {
        if req.cmd != CMD_READ {
            return Vec::new();
        }
        let n = usize::try_from(req.len).unwrap_or(usize::MAX);
        let mut b = {
            let mut pool = self.shared.buffers.lock();
            match pool.iter().position(|b| b.capacity() >= n) {
                Some(i) => pool.swap_remove(i),
                None => Vec::new(),
            }
        };
        b.resize(n, 0);
        b.truncate(n);
        b
    }

    fn recycle(&self, buf: Vec<u8>) {
        let mut pool = self.shared.buffers.lock();
        if pool.len() < 64 && buf.capacity() > 0 {
            pool.push(buf);
        }
    }

    fn chunk_bytes(&self) -> u64 {
        u64::from(self.shared.info.max_block_bytes.max(4096))
    }
}

impl NbdClient {
    /// The next connection, if it is live: asynchronous requests never wait to reconnect.
    fn live_conn(&self) -> Option<Arc<Conn>> {
        let sh = &self.shared;
        let i = sh.next_slot.fetch_add(1, Ordering::Relaxed) % sh.slots.len();
        if sh.closed.load(Ordering::SeqCst) {
            return None;
        }
        sh.slots[i]
            .read()
            .as_ref()
            .filter(|c| !c.is_dead())
            .cloned()
    }

    /// Sends `req` with `done` as its completion (see [`BlockDevice::submit`]), its data by
    /// reference when `by_reference`.
    fn start_async(
        &self,
        req: Req,
        data: &[u8],
        done: Completion,
        by_reference: bool,
    ) -> Result<(), Completion> {
        let Some(conn) = self.async_conn(&req) else {
            return Err(done);
        };
        let seq = self.shared.write_seq.clone();
        let acked_on = conn.clone();
        let notify = Notify::Call(Box::new(move |reply: Reply| {
            done(match reply {
                Ok(buf) => {
                    note_acked(&req, &seq, &acked_on);
                    Ok(buf)
                }
                Err(e) => Err(async_error(&req, e)),
            });
        }));
        let buf = self.read_buffer(&req);
        send_async(&conn, &req, data, buf, None, notify, by_reference);
        Ok(())
    }

    /// Starts an asynchronous write (see [`BlockDevice::submit`] and
    /// [`BlockDevice::submit_write_by_reference`]).
    fn submit_write(
        &self,
        buf: &[u8],
        offset_bytes: u64,
        done: Completion,
        by_reference: bool,
    ) -> Result<(), Completion> {
        let Ok(len) = u32::try_from(buf.len()) else {
            return Err(done);
        };
        let req = Req {
            op: "write",
            cmd: CMD_WRITE,
            flags: 0,
            offset: offset_bytes,
            len,
        };
        self.start_async(req, buf, done, by_reference)
    }

    /// The connection for an asynchronous request: `None` when the request is too large,
    /// lies outside the device, or no connection is live (the caller then takes the
    /// blocking path).
    fn async_conn(&self, req: &Req) -> Option<Arc<Conn>> {
        if req.len > self.shared.info.max_block_bytes
            || self
                .check_range(req.op, req.offset, u64::from(req.len))
                .is_err()
        {
            return None;
        }
        self.live_conn()
    }

    /// Sends a read whose data goes into `pipe` (see [`BlockDevice::submit_read_to_pipe`]).
    fn start_pipe_read(
        &self,
        req: Req,
        pipe: Pipe,
        done: PipeCompletion,
    ) -> Result<(), (Pipe, PipeCompletion)> {
        let Ok(len) = usize::try_from(req.len) else {
            return Err((pipe, done));
        };
        if req.len > self.pipe_read_max_bytes() {
            return Err((pipe, done));
        }
        let Some(conn) = self.async_conn(&req) else {
            return Err((pipe, done));
        };
        let fit_max = self.shared.pipe_fit.clone();
        let notify = Notify::Pipe(Box::new(move |reply: Result<Pipe, ReplyError>| {
            if let Err(ReplyError::NotInPipe { fit: Some(fit) }) = &reply {
                // This transport fills pipes before this size (its socket buffers hold less
                // than a page each): larger reads stop trying, instead of being read twice
                // each time.
                let limit = u32::try_from(fit / 4 * 3).unwrap_or(u32::MAX);
                if fit_max.fetch_min(limit, Ordering::Relaxed) > limit {
                    tracing::debug!(fit, limit, "reads into a pipe limited");
                }
            }
            done(reply.map_err(|e| async_error(&req, e)));
        }));
        let sink = PipeSink {
            pipe,
            len,
            filled: 0,
            spilled: false,
            full_at: None,
        };
        send_async(&conn, &req, &[], Vec::new(), Some(sink), notify, false);
        Ok(())
    }
}

/// Registers and sends an asynchronous request on `conn`, its data by reference when
/// `by_reference`. On a connection that died since it was picked, the completion hears so
/// at once (the caller retries on the blocking path).
fn send_async(
    conn: &Conn,
    req: &Req,
    data: &[u8],
    buf: Vec<u8>,
    pipe: Option<PipeSink>,
    notify: Notify,
    by_reference: bool,
) {
    if let Err((e, notify, _)) = conn.register(req, data, buf, pipe, notify, by_reference) {
        notify.send(Err(e));
    }
}

/// What an asynchronous request's completion hears for a failed reply.
fn async_error(req: &Req, e: ReplyError) -> BlockError {
    match e {
        ReplyError::Errno(e) => device_error(req, e),
        ReplyError::Lost(source) => BlockError::PathLost { op: req.op, source },
        ReplyError::NotInPipe { .. } => not_in_pipe(),
    }
}

/// The error of a read into a pipe whose data did not all fit the pipe.
fn not_in_pipe() -> BlockError {
    BlockError::Unsupported {
        op: "read into a pipe",
    }
}

/// Counts an acknowledged write (no FUA) against the connection it was acknowledged on,
/// for the "lost before a flush" check.
fn note_acked(req: &Req, write_seq: &AtomicU64, conn: &Conn) {
    if req.cmd == CMD_WRITE && req.flags & CMD_FLAG_FUA == 0
        || req.cmd == CMD_WRITE_ZEROES
        || req.cmd == CMD_TRIM
    {
        let seq = write_seq.fetch_add(1, Ordering::SeqCst) + 1;
        conn.max_write_seq.fetch_max(seq, Ordering::SeqCst);
    }
}

/// The error for a request the server failed with NBD error `e`.
fn device_error(req: &Req, e: u32) -> BlockError {
    BlockError::Device {
        op: req.op,
        offset_bytes: req.offset,
        len_bytes: u64::from(req.len),
        source: io::Error::from_raw_os_error(nbd_error_to_errno(e)),
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

    fn submit(&self, io: AsyncIo<'_>, done: Completion) -> Result<(), Completion> {
        match io {
            AsyncIo::Read {
                offset_bytes,
                len_bytes,
            } => self.start_async(Req::read(offset_bytes, len_bytes), &[], done, false),
            AsyncIo::Write { buf, offset_bytes } => {
                self.submit_write(buf, offset_bytes, done, false)
            }
        }
    }

    fn submit_write_by_reference(
        &self,
        buf: &[u8],
        offset_bytes: u64,
        done: Completion,
    ) -> Result<(), Completion> {
        self.submit_write(buf, offset_bytes, done, true)
    }

    fn pipe_read_max_bytes(&self) -> u32 {
        self.shared.pipe_fit.load(Ordering::Relaxed)
    }

    fn submit_read_to_pipe(
        &self,
        offset_bytes: u64,
        len_bytes: u32,
        pipe: Pipe,
        done: PipeCompletion,
    ) -> Result<(), (Pipe, PipeCompletion)> {
        self.start_pipe_read(Req::read(offset_bytes, len_bytes), pipe, done)
    }

    fn recycle_buffer(&self, buf: Vec<u8>) {
        self.recycle(buf);
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        self.check_range("read", offset_bytes, buf.len() as u64)?;
        let chunk = usize::try_from(self.chunk_bytes()).unwrap_or(usize::MAX);
        let mut off = offset_bytes;
        for part in buf.chunks_mut(chunk) {
            let n = part.len() as u64;
            let req = Req::read(off, len_u32(n));
            let data = self.request(&req, &[])?;
            part.copy_from_slice(&data);
            self.recycle(data);
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
            let req = Req {
                op: "write",
                cmd: CMD_WRITE,
                flags: f,
                offset: off,
                len: len_u32(n),
            };
            self.request(&req, part)?;
            off += n;
        }
        if flags.fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        let sh = &self.shared;
        // Before the sequence is read: a connection that died unnoticed must count its
        // writes as lost, not as covered by this flush.
        self.note_dead();
        if !sh.info.has(TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        let seq = sh.write_seq.load(Ordering::SeqCst);
        let req = Req {
            op: "flush",
            cmd: CMD_FLUSH,
            flags: 0,
            offset: 0,
            len: 0,
        };
        self.request(&req, &[])?;
        sh.flushed_seq.fetch_max(seq, Ordering::SeqCst);
        Ok(())
    }

    fn write_loss_count(&self) -> u64 {
        self.note_dead();
        self.shared.write_losses.load(Ordering::SeqCst)
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.check_range("write_zeroes", offset_bytes, len_bytes)?;
        let chunk = self.chunk_bytes();
        let mut done = 0;
        while done < len_bytes {
            let n = (len_bytes - done).min(chunk);
            if self.shared.info.has(TFLAG_SEND_WRITE_ZEROES) {
                let req = Req {
                    op: "write_zeroes",
                    cmd: CMD_WRITE_ZEROES,
                    flags: 0,
                    offset: offset_bytes + done,
                    len: len_u32(n),
                };
                self.request(&req, &[])?;
            } else {
                let zeros = vec![0u8; usize::try_from(n).unwrap_or(usize::MAX)];
                let req = Req {
                    op: "write_zeroes",
                    cmd: CMD_WRITE,
                    flags: 0,
                    offset: offset_bytes + done,
                    len: len_u32(n),
                };
                self.request(&req, &zeros)?;
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
            let req = Req {
                op: "trim",
                cmd: CMD_TRIM,
                flags: 0,
                offset: offset_bytes + done,
                len: len_u32(n),
            };
            self.request(&req, &[])?;
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
