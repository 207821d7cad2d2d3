//! Duplicate-request cache slots (FORMAT.md §4). Each node has `drc_slots_per_node` slots of
//! 512 bytes; request `r` of node `n` uses slot `r mod drc_slots_per_node` of `n`. A slot holds
//! the encoded response of a mutation, or a marker that the request ran but its response
//! (an extent map) was too large to keep: a retry then answers from current state without
//! running the side effects again.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{corrupt, is_zeroed, seal, verify_raw, DecodeError, MAGIC_DRC};
use crate::types::{NodeId, RequestId};

/// Encoded size of a slot.
pub const DRC_SLOT_BYTES: u64 = 512;
/// Payload bytes in a slot.
pub const DRC_DATA_BYTES: usize = 480;

/// On-disk duplicate-request-cache slot, 512 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawDrcSlot {
    /// [`MAGIC_DRC`].
    pub magic: U32,
    /// CRC32 of the 512 bytes with this field zero.
    pub crc: U32,
    /// Node that sent the request.
    pub node: U32,
    /// 1 = outcome stored, 2 = executed, outcome too large to keep.
    pub kind: U16,
    /// Bytes of `data` used.
    pub len: U16,
    /// The request id.
    pub request: U64,
    /// Reserved, zero.
    pub reserved: U64,
    /// bincode-encoded `Result<Response, FsError>`.
    pub data: [u8; DRC_DATA_BYTES],
}

const _: () = assert!(size_of::<RawDrcSlot>() == 512);

/// What a slot remembers about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrcPayload {
    /// The encoded outcome (bincode of `Result<Response, FsError>`).
    Outcome(Vec<u8>),
    /// The request ran; its response was too large to keep.
    Executed,
}

/// A decoded slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrcSlot {
    /// Node.
    pub node: NodeId,
    /// Request.
    pub request: RequestId,
    /// What is remembered.
    pub payload: DrcPayload,
}

impl DrcSlot {
    /// Encodes into 512 bytes. An outcome longer than [`DRC_DATA_BYTES`] is stored as
    /// [`DrcPayload::Executed`].
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = <RawDrcSlot as zerocopy::FromZeros>::new_zeroed();
        raw.magic = U32::new(MAGIC_DRC);
        raw.node = U32::new(self.node.0);
        raw.request = U64::new(self.request.0);
        match &self.payload {
            DrcPayload::Outcome(d) if d.len() <= DRC_DATA_BYTES => {
                raw.kind = U16::new(1);
                raw.data[..d.len()].copy_from_slice(d);
                raw.len = U16::new(u16::try_from(d.len()).unwrap_or(0));
            }
            _ => raw.kind = U16::new(2),
        }
        let mut out = raw.as_bytes().to_vec();
        seal(&mut out);
        out
    }

    /// Decodes a slot read at `at`; a never-used slot (zeros) is `Ok(None)`.
    pub fn decode(bytes: &[u8], at: u64) -> Result<Option<DrcSlot>, DecodeError> {
        const WHAT: &str = "duplicate-request slot";
        if bytes.len() != 512 {
            return Err(DecodeError::Length {
                what: WHAT,
                at,
                len_bytes: bytes.len() as u64,
            });
        }
        if is_zeroed(bytes) {
            return Ok(None);
        }
        let raw: RawDrcSlot = verify_raw(WHAT, at, bytes, MAGIC_DRC)?;
        let len = usize::from(raw.len.get());
        let payload = match raw.kind.get() {
            1 if len <= DRC_DATA_BYTES => DrcPayload::Outcome(raw.data[..len].to_vec()),
            2 => DrcPayload::Executed,
            k => {
                return Err(corrupt(
                    WHAT,
                    at,
                    format!("invalid slot kind {k} or length {len}"),
                ))
            }
        };
        if raw.node.get() == 0 {
            return Err(corrupt(WHAT, at, "node 0"));
        }
        Ok(Some(DrcSlot {
            node: NodeId(raw.node.get()),
            request: RequestId(raw.request.get()),
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad() {
        let s = DrcSlot {
            node: NodeId(2),
            request: RequestId(77),
            payload: DrcPayload::Outcome(vec![1, 2, 3]),
        };
        let e = s.encode();
        assert_eq!(DrcSlot::decode(&e, 0).unwrap(), Some(s));
        let big = DrcSlot {
            node: NodeId(2),
            request: RequestId(78),
            payload: DrcPayload::Outcome(vec![1; 1000]),
        };
        assert_eq!(
            DrcSlot::decode(&big.encode(), 0).unwrap().unwrap().payload,
            DrcPayload::Executed
        );
        assert_eq!(DrcSlot::decode(&[0; 512], 0).unwrap(), None);
        let mut c = e.clone();
        c[40] ^= 1;
        assert!(matches!(
            DrcSlot::decode(&c, 0),
            Err(DecodeError::BadCrc { .. })
        ));
        let mut m = e.clone();
        m[0] ^= 1;
        assert!(matches!(
            DrcSlot::decode(&m, 0),
            Err(DecodeError::BadMagic { .. })
        ));
    }
}
