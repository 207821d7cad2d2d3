//! Allocation bitmap blocks (FORMAT.md §5): one bit per data cluster, inode slot or
//! metadata block; bit set = in use. Bit `i` of block `k` tracks item
//! `k * BITMAP_BITS_PER_BLOCK + i`, least significant bit of each byte first.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{corrupt, seal, verify_raw, DecodeError, BLOCK_LEN, MAGIC_BITMAP};

/// Bytes of bits in one bitmap block.
pub const BITMAP_BYTES: usize = 4064;
/// Items tracked by one bitmap block.
pub const BITMAP_BITS_PER_BLOCK: u64 = 4064 * 8;

/// On-disk bitmap block, 4096 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBitmapBlock {
    /// [`MAGIC_BITMAP`].
    pub magic: U32,
    /// CRC32 of the block with this field zero.
    pub crc: U32,
    /// Which bitmap: 1 clusters, 2 inodes, 3 metadata blocks.
    pub kind: u8,
    /// Reserved, zero.
    pub reserved0: [u8; 7],
    /// Index of this block within its bitmap.
    pub index: U64,
    /// Reserved, zero.
    pub reserved1: U64,
    /// The bits.
    pub bits: [u8; BITMAP_BYTES],
}

const _: () = assert!(size_of::<RawBitmapBlock>() == BLOCK_LEN);

/// Which bitmap a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapKind {
    /// Data clusters.
    Clusters,
    /// Inode slots.
    Inodes,
    /// Metadata blocks.
    Meta,
}

impl BitmapKind {
    fn code(self) -> u8 {
        match self {
            BitmapKind::Clusters => 1,
            BitmapKind::Inodes => 2,
            BitmapKind::Meta => 3,
        }
    }
}

/// A decoded bitmap block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapBlock {
    /// Which bitmap.
    pub kind: BitmapKind,
    /// Index of the block within its bitmap.
    pub index: u64,
    /// `BITMAP_BYTES` bytes of bits.
    pub bits: Vec<u8>,
}

impl BitmapBlock {
    /// An all-free block.
    pub fn empty(kind: BitmapKind, index: u64) -> BitmapBlock {
        BitmapBlock {
            kind,
            index,
            bits: vec![0; BITMAP_BYTES],
        }
    }

    /// Whether bit `i` (0..BITMAP_BITS_PER_BLOCK) is set.
    pub fn get(&self, i: u64) -> bool {
        let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
        self.bits.get(byte).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Sets or clears bit `i`; out-of-range bits are ignored.
    pub fn set(&mut self, i: u64, v: bool) {
        let byte = usize::try_from(i / 8).unwrap_or(usize::MAX);
        if let Some(b) = self.bits.get_mut(byte) {
            if v {
                *b |= 1 << (i % 8);
            } else {
                *b &= !(1 << (i % 8));
            }
        }
    }

    /// Encodes into 4096 bytes, CRC set.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = RawBitmapBlock {
            magic: U32::new(MAGIC_BITMAP),
            crc: U32::new(0),
            kind: self.kind.code(),
            reserved0: [0; 7],
            index: U64::new(self.index),
            reserved1: U64::new(0),
            bits: [0; BITMAP_BYTES],
        };
        let n = self.bits.len().min(BITMAP_BYTES);
        raw.bits[..n].copy_from_slice(&self.bits[..n]);
        let mut out = raw.as_bytes().to_vec();
        seal(&mut out);
        out
    }

    /// Decodes a block read at byte `at`, expecting bitmap `kind` and block `index`.
    pub fn decode(
        bytes: &[u8],
        at: u64,
        kind: BitmapKind,
        index: u64,
    ) -> Result<BitmapBlock, DecodeError> {
        const WHAT: &str = "bitmap block";
        let raw: RawBitmapBlock = verify_raw(WHAT, at, bytes, MAGIC_BITMAP)?;
        if raw.kind != kind.code() {
            return Err(corrupt(
                WHAT,
                at,
                format!("kind {} where {kind:?} expected", raw.kind),
            ));
        }
        if raw.index.get() != index {
            return Err(corrupt(
                WHAT,
                at,
                format!("index {} where {index} expected", raw.index.get()),
            ));
        }
        Ok(BitmapBlock {
            kind,
            index,
            bits: raw.bits.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_bits() {
        let mut b = BitmapBlock::empty(BitmapKind::Clusters, 3);
        b.set(0, true);
        b.set(9, true);
        b.set(BITMAP_BITS_PER_BLOCK - 1, true);
        b.set(9, false);
        let e = b.encode();
        let d = BitmapBlock::decode(&e, 4096, BitmapKind::Clusters, 3).unwrap();
        assert!(d.get(0) && !d.get(9) && d.get(BITMAP_BITS_PER_BLOCK - 1) && !d.get(1));
        assert_eq!(d, b);
    }

    #[test]
    fn bad_crc_magic_kind_index() {
        let e = BitmapBlock::empty(BitmapKind::Inodes, 1).encode();
        let mut c = e.clone();
        c[100] = 1;
        assert!(matches!(
            BitmapBlock::decode(&c, 0, BitmapKind::Inodes, 1),
            Err(DecodeError::BadCrc { .. })
        ));
        let mut m = e.clone();
        m[2] = 0;
        assert!(matches!(
            BitmapBlock::decode(&m, 0, BitmapKind::Inodes, 1),
            Err(DecodeError::BadMagic { .. })
        ));
        assert!(matches!(
            BitmapBlock::decode(&e, 0, BitmapKind::Meta, 1),
            Err(DecodeError::Corrupt { .. })
        ));
        assert!(matches!(
            BitmapBlock::decode(&e, 0, BitmapKind::Inodes, 2),
            Err(DecodeError::Corrupt { .. })
        ));
    }
}
