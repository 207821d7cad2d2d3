//! One byte stream to an NBD peer: TCP or a Unix socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::uri::NbdAddr;

/// Socket buffer size asked for in each direction: room for a few 1 MiB requests, so
/// a large write is handed to the kernel in one call instead of blocking and waking
/// several times while the peer drains a 208 KiB default buffer.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Gives a new connection's socket [`SOCKET_BUFFER_BYTES`] of buffer each way. Where
/// the kernel refuses, the socket keeps its default buffers and works as before.
fn buffers(s: &impl std::os::fd::AsRawFd) {
    if let Err(e) = crate::sys::set_socket_buffers(s, SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "socket buffers left at the default");
    } else if tracing::enabled!(tracing::Level::TRACE) {
        if let Ok((send, receive)) = crate::sys::socket_buffers(s) {
            tracing::trace!(send, receive, "socket buffers");
        }
    }
}

/// A connected stream (TCP or Unix).
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
}

impl Stream {
    /// A new TCP connection (connected or accepted), set up as every NBD connection is:
    /// no Nagle delay, [`SOCKET_BUFFER_BYTES`] of buffer each way.
    pub(crate) fn tcp(s: TcpStream) -> io::Result<Stream> {
        s.set_nodelay(true)?;
        buffers(&s);
        Ok(Stream::Tcp(s))
    }

    /// A new Unix-socket connection (connected or accepted), with
    /// [`SOCKET_BUFFER_BYTES`] of buffer each way.
    pub(crate) fn unix(s: UnixStream) -> Stream {
        buffers(&s);
        Stream::Unix(s)
    }

    /// Connects to `addr`, giving up after `timeout`.
    pub fn connect(addr: &NbdAddr, timeout: Duration) -> io::Result<Stream> {
        match addr {
            NbdAddr::Tcp { host, port } => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "host resolved to no address");
                for sa in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => return Stream::tcp(s),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            NbdAddr::Unix { path } => UnixStream::connect(path).map(Stream::unix),
        }
    }

    /// A second handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    /// Shuts both directions down, waking any thread blocked on the socket.
    pub fn shutdown(&self) {
        // Errors mean the socket is already closed, which is the goal.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sets the read timeout (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the write timeout (`None`: block forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes all of `head` then all of `body`, with as few system calls as possible.
pub fn write_two(w: &mut impl Write, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut head = head;
    let mut body = body;
    while !head.is_empty() {
        let n = w.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(body)])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < head.len() {
            head = &head[n..];
        } else {
            body = &body[n - head.len()..];
            head = &[];
        }
    }
    w.write_all(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connections_get_large_socket_buffers_on_both_ends() {
        let path = crate::nbd::tests::sock("sockbuf");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let (plain, _) = UnixStream::pair().unwrap();
        let (default_snd, _) = crate::sys::socket_buffers(&plain).unwrap();

        let client = Stream::connect(
            &NbdAddr::Unix { path: path.clone() },
            Duration::from_secs(5),
        )
        .unwrap();
        // The server's side: what its listener does with an accepted socket.
        let accepted = Stream::unix(listener.accept().unwrap().0);
        let (Stream::Unix(client), Stream::Unix(accepted)) = (client, accepted) else {
            panic!("a unix address gave a TCP stream");
        };

        // The kernel reports twice what was asked. Without CAP_NET_ADMIN the request is
        // capped at net.core.wmem_max, which may be below the ask but never below the
        // default.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        for s in [&client, &accepted] {
            let (snd, _) = crate::sys::socket_buffers(s).unwrap();
            assert!(
                snd > default_snd,
                "send buffer {snd} not above the default {default_snd}"
            );
            if root {
                assert!(
                    snd >= SOCKET_BUFFER_BYTES,
                    "send buffer {snd} below the ask"
                );
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}
