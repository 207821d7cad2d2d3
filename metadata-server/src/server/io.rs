//! Reading and writing frames on an async byte stream; shared by the server and the client.

use crate::proto::FRAME_HEADER_BYTES;
use crate::proto::{decode_frame, decode_length, encode_frame, Frame, FrameError};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

/// Read buffer of an established connection (either side).
pub(crate) const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Why a frame could not be read or written on a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The peer closed the connection at a frame boundary.
    #[error("peer closed the connection")]
    Closed,
    /// The socket failed (or the peer closed it in the middle of a frame).
    #[error("socket")]
    Io(#[source] io::Error),
    /// The bytes were not an acceptable frame.
    #[error("bad frame")]
    Frame(#[source] FrameError),
}

/// Reads one frame whose payload may be at most `max_bytes`.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_bytes: u32,
) -> Result<Frame, WireError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    // Distinguish a clean close before the first header byte from a torn frame.
    let n = r.read(&mut header).await.map_err(WireError::Io)?;
    if n == 0 {
        return Err(WireError::Closed);
    }
    if n < FRAME_HEADER_BYTES {
        let rest = header.get_mut(n..).unwrap_or_default();
        r.read_exact(rest).await.map_err(WireError::Io)?;
    }
    let len = decode_length(header, max_bytes).map_err(WireError::Frame)?;
    let len = usize::try_from(len).map_err(|_| {
        WireError::Frame(FrameError::Oversized {
            len_bytes: u64::from(len),
            max_bytes,
        })
    })?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(WireError::Io)?;
    decode_frame(&payload).map_err(WireError::Frame)
}

/// Writes an encoded frame (from `encode_frame`).
pub(crate) async fn write_bytes<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
) -> Result<(), WireError> {
    w.write_all(bytes).await.map_err(WireError::Io)
}

/// The sending side of an established connection, shared by every thread that sends on
/// it. Frames go out whole and in the order they were given: a sender writes straight to
/// the socket (a non-blocking write, no hand-off to another thread) while nothing is
/// backed up, and otherwise appends to the backlog, which the connection's flusher task
/// ([`FrameLink::flush`]) writes as the socket takes more.
///
/// ```text
///  send_bytes ──▶ backlog empty? ── yes ─▶ write now ── all taken ─▶ done
///                     │ no                     │ socket full
///                     ▼                        ▼
///               append to backlog ◀────── rest appended ──▶ kick the flusher
///  queue ──────▶ append to backlog (no write; the caller pushes once out of its locks)
///  any write error, or close ─▶ broken: later sends fail at once, the flusher stops
/// ```
pub(crate) struct FrameLink {
    wr: OwnedWriteHalf,
    /// Bytes accepted for sending but not yet taken by the socket, in order.
    backlog: Mutex<Vec<u8>>,
    /// Wakes the flusher: bytes are waiting in the backlog, or the link broke.
    kick: Notify,
    /// A write failed or the connection was closed; later sends fail at once.
    broken: AtomicBool,
}

impl FrameLink {
    /// The sending side over `wr`.
    pub(crate) fn new(wr: OwnedWriteHalf) -> FrameLink {
        FrameLink {
            wr,
            backlog: Mutex::new(Vec::new()),
            kick: Notify::new(),
            broken: AtomicBool::new(false),
        }
    }

    /// Sends one encoded frame without blocking: written now when nothing is backed up,
    /// else queued behind what is. An error means the link is broken.
    pub(crate) fn send_bytes(&self, bytes: &[u8]) -> io::Result<()> {
        self.check()?;
        let mut backlog = self.backlog.lock();
        let sent = if backlog.is_empty() {
            self.write_some(bytes).map_err(|e| self.fail(e))?
        } else {
            0
        };
        if let Some(rest) = bytes.get(sent..).filter(|r| !r.is_empty()) {
            backlog.extend_from_slice(rest);
            drop(backlog);
            self.kick.notify_one();
        }
        Ok(())
    }

    /// Encodes `f` (at most `max_bytes` of payload) and sends it.
    pub(crate) fn send_frame(&self, f: &Frame, max_bytes: u32) -> io::Result<()> {
        let bytes = encode_frame(f, max_bytes).map_err(io::Error::other)?;
        self.send_bytes(&bytes)
    }

    /// Appends an encoded frame to the backlog without writing; [`FrameLink::push`]
    /// writes it. For callers that fix the order of frames under a lock of their own and
    /// write once they have let go of it.
    pub(crate) fn queue(&self, bytes: &[u8]) -> io::Result<()> {
        self.check()?;
        self.backlog.lock().extend_from_slice(bytes);
        Ok(())
    }

    /// Writes what the backlog holds now, as far as the socket takes it; the flusher
    /// writes the rest.
    pub(crate) fn push(&self) {
        if self.check().is_err() {
            return;
        }
        let mut backlog = self.backlog.lock();
        match self.write_backlog(&mut backlog) {
            Ok(true) => {}
            Ok(false) => {
                drop(backlog);
                self.kick.notify_one();
            }
            Err(e) => {
                drop(backlog);
                let _ = self.fail(e);
            }
        }
    }

    /// Writes the backlog until it is empty (true) or the socket is full (false).
    fn write_backlog(&self, backlog: &mut Vec<u8>) -> io::Result<bool> {
        let n = self.write_some(backlog)?;
        backlog.drain(..n);
        Ok(backlog.is_empty())
    }

    /// Writes `buf` until all of it is taken or the socket is full; returns the bytes taken.
    fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        let mut sent = 0;
        while let Some(rest) = buf.get(sent..).filter(|r| !r.is_empty()) {
            match self.wr.try_write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    fn check(&self) -> io::Result<()> {
        if self.broken.load(Ordering::Acquire) {
            return Err(io::ErrorKind::NotConnected.into());
        }
        Ok(())
    }

    /// Marks the link broken and wakes the flusher, which stops.
    fn fail(&self, e: io::Error) -> io::Error {
        self.broken.store(true, Ordering::Release);
        self.kick.notify_one();
        e
    }

    /// Ends the link: later sends fail at once, the flusher stops, and the socket is shut
    /// down in both directions now (the peer sees the end at once, even while other
    /// threads still hold the link).
    pub(crate) fn close(&self) {
        let _ = self.fail(io::ErrorKind::NotConnected.into());
        let _ = socket2::SockRef::from(self.wr.as_ref()).shutdown(std::net::Shutdown::Both);
    }

    /// The connection's flusher: writes the backlog whenever the socket takes more and,
    /// with `ping` (interval, frame size limit), sends a ping every interval. Returns why
    /// it stopped.
    pub(crate) async fn flush(&self, ping: Option<(Duration, u32)>) -> String {
        let mut tick = ping.map(|(every, _)| tokio::time::interval(every));
        let mut n: u64 = 0;
        loop {
            let ticked = match tick.as_mut() {
                Some(t) => tokio::select! {
                    () = self.kick.notified() => false,
                    _ = t.tick() => true,
                },
                None => {
                    self.kick.notified().await;
                    false
                }
            };
            if let (true, Some((_, max))) = (ticked, ping) {
                n += 1;
                if let Err(e) = self.send_frame(&Frame::Ping { nonce: n }, max) {
                    return format!("write: {e}");
                }
            }
            loop {
                if self.broken.load(Ordering::Acquire) {
                    return "connection closed or a write failed".into();
                }
                let done = {
                    let mut backlog = self.backlog.lock();
                    match self.write_backlog(&mut backlog) {
                        Ok(done) => done,
                        Err(e) => {
                            drop(backlog);
                            return format!("write: {}", self.fail(e));
                        }
                    }
                };
                if done {
                    break;
                }
                if let Err(e) = self.wr.writable().await {
                    return format!("write: {}", self.fail(e));
                }
            }
        }
    }
}

/// An error and its sources on one line, for log messages and error strings.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
