//! Wire frames: what travels on a node-to-coordinator TCP connection, and how a frame is
//! turned into bytes and back. Spec: metadata-server/PROTOCOL.md §2–§5.
//!
//! A frame on the wire is a 4-byte little-endian payload length followed by the payload,
//! the bincode 1.3 encoding (fixed-width little-endian integers) of one [`Frame`]. The
//! decoder never trusts a length it read: the prefix is checked against the connection's
//! limit before any buffer is allocated, and bincode's own allocation limit is set to the
//! payload size, so a hostile length inside the payload cannot make it allocate either.

use super::messages::{Caller, Request, Response};
use crate::types::{Epoch, FsError, InodeId, NodeId, RequestId, VolumeId};
use bincode::Options;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks first.
pub const PROTOCOL_VERSION: u32 = 4;

/// The oldest protocol version this build still accepts (at least the previous one).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Largest payload of a frame after authentication, in bytes (16 MiB).
pub const MAX_FRAME_BYTES: u32 = 16 << 20;

/// Largest payload of a frame before authentication completes, in bytes. An
/// unauthenticated peer can never make the other side allocate more than this.
pub const MAX_HANDSHAKE_FRAME_BYTES: u32 = 4096;

/// Size of the length prefix in front of every frame, in bytes.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Length of the random challenge each side sends, in bytes.
pub const NONCE_BYTES: usize = 32;

/// Length of an HMAC-SHA256 proof, in bytes.
pub const PROOF_BYTES: usize = 32;

/// A coherence message from the coordinator: a node's cached copy of something is stale.
/// The node drops it (kernel caches included) and acknowledges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Invalidation {
    /// The attributes, data pages, extent map and (for a directory) listing of an inode.
    Inode {
        /// The inode whose cached state is stale.
        ino: InodeId,
    },
    /// A directory entry (positive or negative) `name` in `parent`.
    Entry {
        /// The directory.
        parent: InodeId,
        /// The name in it.
        name: Vec<u8>,
    },
    /// Everything the node caches about the volume: sent when the coordinator cannot name
    /// what went stale (it restarted, or the node missed too many invalidations while it
    /// was disconnected).
    All,
}

/// The first frame of a connection, from the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// Highest protocol version the node speaks.
    pub version: u32,
    /// Lowest protocol version the node accepts.
    pub min_version: u32,
    /// The node.
    pub node: NodeId,
    /// The volume the node expects, when it knows it.
    pub volume: Option<VolumeId>,
    /// Highest coordinator epoch the node has seen (`Epoch(0)` when none). A coordinator
    /// with a lower epoch is stale and refuses the node.
    pub epoch: Epoch,
    /// The node had a session before (this is a reconnect): it may cache volume state.
    pub resumed: bool,
    /// The node's challenge.
    pub nonce: [u8; NONCE_BYTES],
}

/// The coordinator's answer to a [`ClientHello`] it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// The version both sides speak from now on.
    pub version: u32,
    /// The volume the coordinator serves.
    pub volume: VolumeId,
    /// The coordinator's epoch.
    pub epoch: Epoch,
    /// Random id of this server instance; changes when the coordinator restarts.
    pub instance: u64,
    /// The coordinator's challenge.
    pub nonce: [u8; NONCE_BYTES],
    /// HMAC proving the coordinator knows the cluster secret (PROTOCOL.md §3).
    pub proof: [u8; PROOF_BYTES],
}

/// One frame. Variant 0 is never valid and is refused by the decoder, so a zeroed buffer
/// never decodes as a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Never valid.
    Invalid,
    /// Node → coordinator: opens the handshake.
    ClientHello(ClientHello),
    /// Coordinator → node: accepts the hello and proves the secret.
    ServerHello(ServerHello),
    /// Coordinator → node: refuses the hello (version, volume or epoch); then closes.
    HelloRefused {
        /// Why, for the node's log.
        reason: String,
    },
    /// Node → coordinator: the node's proof, or `None` when the coordinator's proof was
    /// wrong and the node gives up (it closes right after).
    ClientAuth {
        /// HMAC proving the node knows the cluster secret.
        proof: Option<[u8; PROOF_BYTES]>,
    },
    /// Coordinator → node: the node is authenticated; requests may flow.
    AuthOk,
    /// Coordinator → node: the node's proof was wrong; then closes.
    AuthRefused {
        /// Why, for the node's log.
        reason: String,
    },
    /// Node → coordinator: one metadata request.
    Request {
        /// Request id, the same on every retry.
        id: RequestId,
        /// Who asks.
        caller: Caller,
        /// What.
        req: Request,
    },
    /// Coordinator → node: the answer to the request with this id.
    Reply {
        /// The request answered.
        id: RequestId,
        /// Its result.
        result: Result<Response, FsError>,
    },
    /// Coordinator → node (version 2+): drop a cached copy, then acknowledge `seq`.
    Invalidate {
        /// Per-connection sequence number to acknowledge.
        seq: u64,
        /// What is stale.
        inv: Invalidation,
    },
    /// Node → coordinator (version 2+): the invalidation `seq` is done.
    InvalidateAck {
        /// The acknowledged sequence number.
        seq: u64,
    },
    /// Either way: liveness probe; the peer answers with `Pong` carrying the same value.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The ping's value.
        nonce: u64,
    },
}

impl Frame {
    /// Short name of the frame kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Invalid => "invalid",
            Frame::ClientHello(_) => "client-hello",
            Frame::ServerHello(_) => "server-hello",
            Frame::HelloRefused { .. } => "hello-refused",
            Frame::ClientAuth { .. } => "client-auth",
            Frame::AuthOk => "auth-ok",
            Frame::AuthRefused { .. } => "auth-refused",
            Frame::Request { .. } => "request",
            Frame::Reply { .. } => "reply",
            Frame::Invalidate { .. } => "invalidate",
            Frame::InvalidateAck { .. } => "invalidate-ack",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
        }
    }
}

/// Short name of a request kind, for logs and spans.
pub fn request_kind(req: &Request) -> &'static str {
    match req {
        Request::Lookup { .. } => "lookup",
        Request::GetAttr { .. } => "getattr",
        Request::SetAttr { .. } => "setattr",
        Request::Create { .. } => "create",
        Request::Symlink { .. } => "symlink",
        Request::ReadLink { .. } => "readlink",
        Request::Link { .. } => "link",
        Request::Unlink { .. } => "unlink",
        Request::Rmdir { .. } => "rmdir",
        Request::Rename { .. } => "rename",
        Request::ReadDir { .. } => "readdir",
        Request::StatFs => "statfs",
        Request::GetXattr { .. } => "getxattr",
        Request::SetXattr { .. } => "setxattr",
        Request::ListXattr { .. } => "listxattr",
        Request::RemoveXattr { .. } => "removexattr",
        Request::Open { .. } => "open",
        Request::Release { .. } => "release",
        Request::GetExtents { .. } => "getextents",
        Request::Allocate { .. } => "allocate",
        Request::Commit { .. } => "commit",
        Request::Fallocate { .. } => "fallocate",
        Request::Fsync { .. } => "fsync",
        Request::CreateOpen { .. } => "createopen",
        Request::Reopen { .. } => "reopen",
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the connection allows.
    #[error("frame of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    Oversized {
        /// Announced payload length.
        len_bytes: u64,
        /// The limit in force.
        max_bytes: u32,
    },
    /// The payload is not a valid bincode `Frame`.
    #[error("malformed frame of {len_bytes} bytes")]
    Malformed {
        /// Payload length.
        len_bytes: u64,
        /// The decoder's complaint.
        #[source]
        source: bincode::Error,
    },
    /// The payload decoded to variant 0 (`Frame::Invalid`).
    #[error("frame kind 0 (invalid)")]
    InvalidKind,
    /// A frame could not be serialized.
    #[error("encode {kind} frame")]
    Encode {
        /// Frame kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: bincode::Error,
    },
}

fn codec(limit_bytes: u32) -> impl Options {
    bincode::options()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(u64::from(limit_bytes))
        .reject_trailing_bytes()
}

/// Encodes `frame` with its length prefix. Fails with `Oversized` when the payload would
/// exceed `max_bytes`.
pub fn encode_frame(frame: &Frame, max_bytes: u32) -> Result<Vec<u8>, FrameError> {
    let payload = codec(max_bytes)
        .serialize(frame)
        .map_err(|source| match *source {
            bincode::ErrorKind::SizeLimit => FrameError::Oversized {
                len_bytes: u64::from(max_bytes).saturating_add(1),
                max_bytes,
            },
            _ => FrameError::Encode {
                kind: frame.kind(),
                source,
            },
        })?;
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::Oversized {
        len_bytes: u64::try_from(payload.len()).unwrap_or(u64::MAX),
        max_bytes,
    })?;
    if len > max_bytes {
        return Err(FrameError::Oversized {
            len_bytes: u64::from(len),
            max_bytes,
        });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Reads a length prefix and checks it against `max_bytes`. Returns the payload length.
pub fn decode_length(header: [u8; FRAME_HEADER_BYTES], max_bytes: u32) -> Result<u32, FrameError> {
    let len = u32::from_le_bytes(header);
    if len > max_bytes {
        return Err(FrameError::Oversized {
            len_bytes: u64::from(len),
            max_bytes,
        });
    }
    Ok(len)
}

/// Decodes one payload (without its length prefix). Trailing bytes, unknown variants,
/// truncated data and `Frame::Invalid` are errors; nothing here panics.
pub fn decode_frame(payload: &[u8]) -> Result<Frame, FrameError> {
    let len_bytes = u64::try_from(payload.len()).unwrap_or(u64::MAX);
    let limit = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let frame: Frame = codec(limit)
        .deserialize(payload)
        .map_err(|source| FrameError::Malformed { len_bytes, source })?;
    if matches!(frame, Frame::Invalid) {
        return Err(FrameError::InvalidKind);
    }
    Ok(frame)
}

/// Decodes a whole buffer holding frames back to back (prefix + payload each), as a
/// stream reader would, checking each prefix against `max_bytes`. Used by tests and
/// fuzzing; the network code reads frame by frame.
pub fn decode_stream(mut buf: &[u8], max_bytes: u32) -> Result<Vec<Frame>, FrameError> {
    let mut frames = Vec::new();
    while buf.len() >= FRAME_HEADER_BYTES {
        let (head, rest) = buf.split_at(FRAME_HEADER_BYTES);
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header.copy_from_slice(head);
        let len = decode_length(header, max_bytes)?;
        let len = usize::try_from(len).map_err(|_| FrameError::Oversized {
            len_bytes: u64::from(len),
            max_bytes,
        })?;
        if rest.len() < len {
            break;
        }
        let (payload, rest) = rest.split_at(len);
        frames.push(decode_frame(payload)?);
        buf = rest;
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Attr, FileKind, Timestamp};
    use rand::{Rng, RngCore, SeedableRng};

    fn attr(ino: u64) -> Attr {
        Attr {
            ino: InodeId(ino),
            generation: 1,
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size_bytes: 42,
            allocated_bytes: 0,
            rdev: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::ClientHello(ClientHello {
                version: PROTOCOL_VERSION,
                min_version: MIN_PROTOCOL_VERSION,
                node: NodeId(3),
                volume: Some(VolumeId([7; 16])),
                epoch: Epoch(9),
                resumed: true,
                nonce: [1; NONCE_BYTES],
            }),
            Frame::ServerHello(ServerHello {
                version: 2,
                volume: VolumeId([7; 16]),
                epoch: Epoch(9),
                instance: 77,
                nonce: [2; NONCE_BYTES],
                proof: [3; PROOF_BYTES],
            }),
            Frame::ClientAuth {
                proof: Some([4; PROOF_BYTES]),
            },
            Frame::AuthOk,
            Frame::Request {
                id: RequestId(5),
                caller: Caller {
                    node: NodeId(3),
                    request: RequestId(5),
                    uid: 1000,
                    gid: 1000,
                },
                req: Request::Lookup {
                    parent: InodeId::ROOT,
                    name: b"vm1".to_vec(),
                },
            },
            Frame::Reply {
                id: RequestId(5),
                result: Ok(Response::Attr(attr(12))),
            },
            Frame::Reply {
                id: RequestId(6),
                result: Err(FsError::Io("disk".into())),
            },
            Frame::Invalidate {
                seq: 1,
                inv: Invalidation::Entry {
                    parent: InodeId::ROOT,
                    name: b"x".to_vec(),
                },
            },
            Frame::InvalidateAck { seq: 1 },
            Frame::Ping { nonce: 8 },
        ]
    }

    #[test]
    fn frames_round_trip() {
        for f in samples() {
            let bytes = encode_frame(&f, MAX_FRAME_BYTES).unwrap();
            let back = decode_stream(&bytes, MAX_FRAME_BYTES).unwrap();
            assert_eq!(back, vec![f]);
        }
    }

    #[test]
    fn invalid_kind_and_trailing_bytes_are_refused() {
        let zero = [0u8; 4];
        assert!(matches!(decode_frame(&zero), Err(FrameError::InvalidKind)));
        let mut bytes = encode_frame(&Frame::AuthOk, MAX_FRAME_BYTES).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode_frame(&bytes[FRAME_HEADER_BYTES..]),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn oversized_prefix_is_refused_before_allocation() {
        let header = (MAX_HANDSHAKE_FRAME_BYTES + 1).to_le_bytes();
        assert!(matches!(
            decode_length(header, MAX_HANDSHAKE_FRAME_BYTES),
            Err(FrameError::Oversized { .. })
        ));
        let big = Frame::Reply {
            id: RequestId(1),
            result: Ok(Response::Bytes(vec![0; 5000])),
        };
        assert!(matches!(
            encode_frame(&big, MAX_HANDSHAKE_FRAME_BYTES),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn hostile_inner_length_does_not_allocate() {
        // A Reply whose Bytes vector claims 2^60 elements.
        let mut payload = Vec::new();
        payload.extend_from_slice(&8u32.to_le_bytes()); // variant Reply
        payload.extend_from_slice(&1u64.to_le_bytes()); // id
        payload.extend_from_slice(&0u32.to_le_bytes()); // Ok
        payload.extend_from_slice(&3u32.to_le_bytes()); // Response::Bytes
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            decode_frame(&payload),
            Err(FrameError::Malformed { .. })
        ));
    }

    /// Fuzz-style: random bytes, and valid frames with random mutations, never panic the
    /// decoder (they decode or give an error).
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .map(|f| encode_frame(f, MAX_FRAME_BYTES).unwrap())
            .collect();
        for round in 0..200_000u32 {
            let mut buf = if round % 2 == 0 {
                let len = rng.gen_range(0..256);
                let mut b = vec![0u8; len];
                rng.fill_bytes(&mut b);
                b
            } else {
                let mut b = valid[rng.gen_range(0..valid.len())].clone();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
                if rng.gen_bool(0.2) {
                    let cut = rng.gen_range(0..b.len());
                    b.truncate(cut);
                }
                b
            };
            let _ = decode_stream(&buf, MAX_FRAME_BYTES);
            if buf.len() > FRAME_HEADER_BYTES {
                let _ = decode_frame(&buf[FRAME_HEADER_BYTES..]);
            }
            buf.clear();
        }
    }
}
