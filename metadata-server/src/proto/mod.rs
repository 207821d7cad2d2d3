//! Node-to-coordinator protocol: the messages a node sends to the metadata server and the
//! answers it gets, the frames that carry them, and the handshake proofs. Spec:
//! metadata-server/PROTOCOL.md. This module does no I/O.
//!
//! Connection state machine (both sides; any other frame in a state closes the connection):
//!
//! ```text
//!  node                                   coordinator
//!  ────                                   ───────────
//!  ClientHello{version range, node,  ──▶  check version / volume / epoch
//!    volume?, epoch, nonce_c}        ◀──  HelloRefused{reason}  → close
//!                                    ◀──  ServerHello{version, volume, epoch,
//!                                           nonce_s, proof_s = HMAC(secret, "server"‖T)}
//!  check proof_s
//!    wrong:  ClientAuth{None}        ──▶  log "node refused our proof" → close
//!    right:  ClientAuth{Some(proof_c)}──▶ check proof_c
//!                                    ◀──  AuthRefused{reason} → close
//!                                    ◀──  AuthOk
//!  ═════════════ established: frames in any order, both ways ═════════════
//!  Request{id, caller, req}          ──▶  execute (many at once)
//!                                    ◀──  Reply{id, result}        (any order)
//!                                    ◀──  Invalidate{seq, inv}     (version ≥ 2)
//!  InvalidateAck{seq}                ──▶
//!  Ping{n} / Pong{n}                 ◀─▶  liveness, either way
//! ```

mod auth;
mod frame;
mod messages;

pub use auth::Transcript;
pub use frame::{
    decode_frame, decode_length, decode_stream, encode_frame, request_kind, ClientHello, Frame,
    FrameError, Invalidation, ServerHello, FRAME_HEADER_BYTES, MAX_FRAME_BYTES,
    MAX_HANDSHAKE_FRAME_BYTES, MIN_PROTOCOL_VERSION, NONCE_BYTES, PROOF_BYTES, PROTOCOL_VERSION,
};
pub use messages::{ByteRange, Caller, Request, Response};
