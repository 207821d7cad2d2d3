//! Reading and writing frames on an async byte stream; shared by the server and the client.

use crate::proto::FRAME_HEADER_BYTES;
use crate::proto::{decode_frame, decode_length, Frame, FrameError};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
