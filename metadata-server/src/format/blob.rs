//! Blob blocks (FORMAT.md §9): chains of 4 KiB metadata blocks holding a byte string that
//! does not fit in the inode: the encoded xattrs, or a long symlink target.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{check_owner, corrupt, seal, verify_raw, DecodeError, BLOCK_LEN, MAGIC_BLOB};
use crate::types::{BlockNo, InodeId};

/// Payload bytes per blob block.
pub const BLOB_DATA_BYTES: usize = 4032;

/// On-disk blob block, 4096 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBlobBlock {
    /// [`MAGIC_BLOB`].
    pub magic: U32,
    /// CRC32 of the block with this field zero.
    pub crc: U32,
    /// Owning inode.
    pub ino: U64,
    /// Next block of the chain, 0 at the end.
    pub next: U64,
    /// 1 = xattrs, 2 = symlink target.
    pub kind: u8,
    /// Reserved, zero.
    pub reserved0: u8,
    /// Payload bytes used in this block.
    pub len: U16,
    /// Reserved, zero.
    pub reserved: [u8; 36],
    /// Payload.
    pub data: [u8; BLOB_DATA_BYTES],
}

const _: () = assert!(size_of::<RawBlobBlock>() == BLOCK_LEN);

/// What a blob chain holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// Encoded extended attributes.
    Xattrs,
    /// A symbolic link target.
    Symlink,
}

/// A decoded blob block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobBlock {
    /// Owning inode.
    pub ino: InodeId,
    /// Next block.
    pub next: Option<BlockNo>,
    /// What the chain holds.
    pub kind: BlobKind,
    /// Payload (at most [`BLOB_DATA_BYTES`]).
    pub data: Vec<u8>,
}

impl BlobBlock {
    /// Encodes into 4096 bytes, CRC set.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = <RawBlobBlock as zerocopy::FromZeros>::new_zeroed();
        raw.magic = U32::new(MAGIC_BLOB);
        raw.ino = U64::new(self.ino.0);
        raw.next = U64::new(self.next.map_or(0, |b| b.0));
        raw.kind = match self.kind {
            BlobKind::Xattrs => 1,
            BlobKind::Symlink => 2,
        };
        let n = self.data.len().min(BLOB_DATA_BYTES);
        raw.data[..n].copy_from_slice(&self.data[..n]);
        raw.len = U16::new(u16::try_from(n).unwrap_or(0));
        let mut out = raw.as_bytes().to_vec();
        seal(&mut out);
        out
    }

    /// Decodes a block read at `at` of a chain of `kind` owned by `owner`.
    pub fn decode(
        bytes: &[u8],
        at: u64,
        owner: InodeId,
        kind: BlobKind,
    ) -> Result<BlobBlock, DecodeError> {
        const WHAT: &str = "blob block";
        let raw: RawBlobBlock = verify_raw(WHAT, at, bytes, MAGIC_BLOB)?;
        check_owner(WHAT, at, raw.ino.get(), owner)?;
        let found = match raw.kind {
            1 => BlobKind::Xattrs,
            2 => BlobKind::Symlink,
            k => return Err(corrupt(WHAT, at, format!("invalid blob kind {k}"))),
        };
        if found != kind {
            return Err(corrupt(
                WHAT,
                at,
                format!("{found:?} block where {kind:?} expected"),
            ));
        }
        let len = usize::from(raw.len.get());
        if len > BLOB_DATA_BYTES {
            return Err(corrupt(WHAT, at, "length out of range"));
        }
        let next = raw.next.get();
        Ok(BlobBlock {
            ino: owner,
            next: (next != 0).then_some(BlockNo(next)),
            kind,
            data: raw.data[..len].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad() {
        let b = BlobBlock {
            ino: InodeId(4),
            next: Some(BlockNo(12)),
            kind: BlobKind::Symlink,
            data: vec![7; 4000],
        };
        let e = b.encode();
        assert_eq!(
            BlobBlock::decode(&e, 0, InodeId(4), BlobKind::Symlink).unwrap(),
            b
        );
        assert!(matches!(
            BlobBlock::decode(&e, 0, InodeId(4), BlobKind::Xattrs),
            Err(DecodeError::Corrupt { .. })
        ));
        let mut c = e.clone();
        c[4000] ^= 1;
        assert!(matches!(
            BlobBlock::decode(&c, 0, InodeId(4), BlobKind::Symlink),
            Err(DecodeError::BadCrc { .. })
        ));
        let mut m = e.clone();
        m[0] = 1;
        assert!(matches!(
            BlobBlock::decode(&m, 0, InodeId(4), BlobKind::Symlink),
            Err(DecodeError::BadMagic { .. })
        ));
    }
}
