//! Lease area records (FORMAT.md §3): the coordinator lease at the first block of the lease
//! area, and one heartbeat slot per node in the blocks after it (node n at block n). Each
//! record is 512 bytes at the start of its own 4 KiB block, so that nodes never share a
//! block they write. The lease *logic* (delta lease, renewal, fencing) lives in
//! `metadata_server::lease`; this module only encodes and decodes.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{corrupt, is_zeroed, seal, verify, DecodeError, BLOCK_LEN, MAGIC_LEASE};
use crate::types::{Epoch, NodeId, Timestamp, VolumeId};

/// Encoded size of a lease or heartbeat record.
pub const LEASE_RECORD_BYTES: usize = 512;
/// Longest network address string in a record, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;

/// On-disk lease or heartbeat record, 512 bytes. Byte table in FORMAT.md §3.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawLeaseRecord {
    /// [`MAGIC_LEASE`].
    pub magic: U32,
    /// CRC32 of the 512 bytes with this field zero.
    pub crc: U32,
    /// 1 = coordinator lease, 2 = node heartbeat.
    pub kind: U16,
    /// Reserved, zero.
    pub reserved0: U16,
    /// Reserved, zero.
    pub reserved1: U32,
    /// UUID of the volume the record belongs to.
    pub volume: [u8; 16],
    /// Lease: the owning node (0 = released). Heartbeat: the slot's node.
    pub node: U32,
    /// Lease: the lease timeout the owner promises to renew within, in ms.
    pub timeout_ms: U32,
    /// Lease: the coordinator epoch. Heartbeat: the epoch the node last saw.
    pub epoch: U64,
    /// Incremented by every renewal or heartbeat.
    pub counter: U64,
    /// Wall-clock time of the write, seconds.
    pub time_secs: I64,
    /// Wall-clock time of the write, nanoseconds.
    pub time_nanos: U32,
    /// Length of `addr` in bytes.
    pub addr_len: U16,
    /// Reserved, zero.
    pub reserved2: U16,
    /// Network address ("host:port"), UTF-8, `addr_len` bytes then zeros.
    pub addr: [u8; MAX_ADDR_BYTES],
    /// Reserved, zero.
    pub reserved: [u8; 184],
}

const _: () = assert!(size_of::<RawLeaseRecord>() == LEASE_RECORD_BYTES);

/// Which kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// The coordinator lease.
    Coordinator,
    /// A node's heartbeat slot.
    Heartbeat,
}

/// A decoded lease-area record: the coordinator lease or a node heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Which kind.
    pub kind: LeaseKind,
    /// The volume.
    pub volume: VolumeId,
    /// Lease: owner (`None` = released). Heartbeat: the slot's node.
    pub node: Option<NodeId>,
    /// Lease timeout in ms (lease records; 0 in heartbeats).
    pub timeout_ms: u32,
    /// Lease: coordinator epoch. Heartbeat: the epoch the node last saw.
    pub epoch: Epoch,
    /// Renewal or heartbeat counter.
    pub counter: u64,
    /// When it was written (writer's wall clock).
    pub time: Timestamp,
    /// Network address of the writer ("host:port"), possibly empty.
    pub addr: String,
}

/// The coordinator lease record.
pub type CoordinatorLease = LeaseRecord;
/// A node heartbeat record.
pub type Heartbeat = LeaseRecord;

impl LeaseRecord {
    /// Encodes into a full 4 KiB block (record then zeros), CRC set. An address longer than
    /// [`MAX_ADDR_BYTES`] is an error.
    pub fn encode_block(&self) -> Result<Vec<u8>, DecodeError> {
        let a = self.addr.as_bytes();
        if a.len() > MAX_ADDR_BYTES {
            return Err(corrupt("lease record", 0, "address longer than 256 bytes"));
        }
        let mut addr = [0u8; MAX_ADDR_BYTES];
        addr[..a.len()].copy_from_slice(a);
        let raw = RawLeaseRecord {
            magic: U32::new(MAGIC_LEASE),
            crc: U32::new(0),
            kind: U16::new(match self.kind {
                LeaseKind::Coordinator => 1,
                LeaseKind::Heartbeat => 2,
            }),
            reserved0: U16::new(0),
            reserved1: U32::new(0),
            volume: self.volume.0,
            node: U32::new(self.node.map_or(0, |n| n.0)),
            timeout_ms: U32::new(self.timeout_ms),
            epoch: U64::new(self.epoch.0),
            counter: U64::new(self.counter),
            time_secs: I64::new(self.time.secs),
            time_nanos: U32::new(self.time.nanos),
            addr_len: U16::new(u16::try_from(a.len()).unwrap_or(0)),
            reserved2: U16::new(0),
            addr,
            reserved: [0; 184],
        };
        let mut block = vec![0u8; BLOCK_LEN];
        block[..LEASE_RECORD_BYTES].copy_from_slice(raw.as_bytes());
        seal(&mut block[..LEASE_RECORD_BYTES]);
        Ok(block)
    }

    /// Decodes a record from the first 512 bytes of `bytes` (read at byte `at`). A record
    /// that was never written (all zeros) decodes as `Ok(None)`.
    pub fn decode(bytes: &[u8], at: u64) -> Result<Option<LeaseRecord>, DecodeError> {
        const WHAT: &str = "lease record";
        let b = bytes.get(..LEASE_RECORD_BYTES).ok_or(DecodeError::Length {
            what: WHAT,
            at,
            len_bytes: bytes.len() as u64,
        })?;
        if is_zeroed(b) {
            return Ok(None);
        }
        verify(WHAT, at, b, MAGIC_LEASE)?;
        let raw = RawLeaseRecord::read_from_bytes(b).map_err(|_| DecodeError::Length {
            what: WHAT,
            at,
            len_bytes: b.len() as u64,
        })?;
        let kind = match raw.kind.get() {
            1 => LeaseKind::Coordinator,
            2 => LeaseKind::Heartbeat,
            k => return Err(corrupt(WHAT, at, format!("invalid record kind {k}"))),
        };
        let addr_len = usize::from(raw.addr_len.get());
        let addr = raw
            .addr
            .get(..addr_len)
            .ok_or_else(|| corrupt(WHAT, at, "address length out of range"))?;
        let addr = String::from_utf8(addr.to_vec())
            .map_err(|_| corrupt(WHAT, at, "address is not UTF-8"))?;
        let nanos = raw.time_nanos.get();
        if nanos >= 1_000_000_000 {
            return Err(corrupt(WHAT, at, "nanoseconds out of range"));
        }
        let node = raw.node.get();
        Ok(Some(LeaseRecord {
            kind,
            volume: VolumeId(raw.volume),
            node: (node != 0).then_some(NodeId(node)),
            timeout_ms: raw.timeout_ms.get(),
            epoch: Epoch(raw.epoch.get()),
            counter: raw.counter.get(),
            time: Timestamp {
                secs: raw.time_secs.get(),
                nanos,
            },
            addr,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> LeaseRecord {
        LeaseRecord {
            kind: LeaseKind::Coordinator,
            volume: VolumeId([3; 16]),
            node: Some(NodeId(4)),
            timeout_ms: 10_000,
            epoch: Epoch(17),
            counter: 12345,
            time: Timestamp {
                secs: 1_700_000_000,
                nanos: 42,
            },
            addr: "127.0.0.1:7000".into(),
        }
    }

    #[test]
    fn round_trip_and_zero() {
        let b = rec().encode_block().unwrap();
        assert_eq!(LeaseRecord::decode(&b, 4096).unwrap(), Some(rec()));
        assert_eq!(LeaseRecord::decode(&[0u8; 4096], 4096).unwrap(), None);
        let mut hb = rec();
        hb.kind = LeaseKind::Heartbeat;
        hb.addr.clear();
        let b = hb.encode_block().unwrap();
        assert_eq!(LeaseRecord::decode(&b, 8192).unwrap(), Some(hb));
    }

    #[test]
    fn bad_crc_magic_kind() {
        let mut b = rec().encode_block().unwrap();
        b[50] ^= 0xff;
        assert!(matches!(
            LeaseRecord::decode(&b, 0),
            Err(DecodeError::BadCrc { .. })
        ));
        let mut b = rec().encode_block().unwrap();
        b[1] = 0;
        assert!(matches!(
            LeaseRecord::decode(&b, 0),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut b = rec().encode_block().unwrap();
        b[8] = 9;
        seal(&mut b[..LEASE_RECORD_BYTES]);
        assert!(matches!(
            LeaseRecord::decode(&b, 0),
            Err(DecodeError::Corrupt { .. })
        ));
        let mut long = rec();
        long.addr = "x".repeat(300);
        assert!(long.encode_block().is_err());
    }
}
