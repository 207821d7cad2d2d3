//! Extents (24 bytes each, inline in the inode or in extent blocks) and extent blocks
//! (FORMAT.md §7). An extent maps `len_clusters` clusters of a file, starting at file
//! cluster `file_cluster`, to the data clusters starting at `lun_cluster`.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    check_owner, corrupt, seal, verify_raw, DecodeError, Geometry, BLOCK_LEN, MAGIC_EXTENT,
};
use crate::types::{BlockNo, ClusterNo, InodeId};

/// Extents in one extent block.
pub const EXTENTS_PER_BLOCK: usize = 168;
/// Extent flag: allocated but not written; reads return zeros.
pub const EXTENT_FLAG_UNWRITTEN: u32 = 1;

/// On-disk extent, 24 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtent {
    /// First file cluster (file byte offset / cluster size).
    pub file_cluster: U64,
    /// First data cluster on the LUN.
    pub lun_cluster: U64,
    /// Length in clusters, at least 1.
    pub len_clusters: U32,
    /// Bit 0: unwritten. Other bits reserved, zero.
    pub flags: U32,
}

const _: () = assert!(size_of::<RawExtent>() == 24);

/// A validated extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskExtent {
    /// First file cluster.
    pub file_cluster: u64,
    /// First data cluster.
    pub lun_cluster: ClusterNo,
    /// Length in clusters (>= 1).
    pub len_clusters: u32,
    /// Reads return zeros until a commit clears the flag.
    pub unwritten: bool,
}

impl DiskExtent {
    /// File cluster just past the extent.
    pub fn file_end(&self) -> u64 {
        self.file_cluster + u64::from(self.len_clusters)
    }
    /// Data cluster just past the extent.
    pub fn lun_end(&self) -> u64 {
        self.lun_cluster.0 + u64::from(self.len_clusters)
    }
    /// Encodes.
    pub fn to_raw(&self) -> RawExtent {
        RawExtent {
            file_cluster: U64::new(self.file_cluster),
            lun_cluster: U64::new(self.lun_cluster.0),
            len_clusters: U32::new(self.len_clusters),
            flags: U32::new(if self.unwritten {
                EXTENT_FLAG_UNWRITTEN
            } else {
                0
            }),
        }
    }
    /// Decodes; `what`/`at` locate the containing structure for errors.
    pub fn from_raw(
        raw: &RawExtent,
        what: &'static str,
        at: u64,
    ) -> Result<DiskExtent, DecodeError> {
        let len = raw.len_clusters.get();
        let flags = raw.flags.get();
        if len == 0 {
            return Err(corrupt(what, at, "extent of zero clusters"));
        }
        if flags & !EXTENT_FLAG_UNWRITTEN != 0 {
            return Err(corrupt(
                what,
                at,
                format!("unknown extent flags {flags:#x}"),
            ));
        }
        let e = DiskExtent {
            file_cluster: raw.file_cluster.get(),
            lun_cluster: ClusterNo(raw.lun_cluster.get()),
            len_clusters: len,
            unwritten: flags & EXTENT_FLAG_UNWRITTEN != 0,
        };
        if e.file_cluster.checked_add(u64::from(len)).is_none()
            || e.lun_cluster.0.checked_add(u64::from(len)).is_none()
        {
            return Err(corrupt(what, at, "extent overflows"));
        }
        Ok(e)
    }
    /// True when the extent lies inside the volume's data region.
    pub fn fits(&self, g: &Geometry) -> bool {
        self.lun_end() <= g.cluster_count
    }
}

/// Checks that extents are sorted by file cluster and do not overlap.
pub fn check_sorted(
    extents: &[DiskExtent],
    what: &'static str,
    at: u64,
) -> Result<(), DecodeError> {
    for w in extents.windows(2) {
        if w[1].file_cluster < w[0].file_end() {
            return Err(corrupt(what, at, "extents overlap or are out of order"));
        }
    }
    Ok(())
}

/// On-disk extent block, 4096 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtentBlock {
    /// [`MAGIC_EXTENT`].
    pub magic: U32,
    /// CRC32 of the block with this field zero.
    pub crc: U32,
    /// Owning inode.
    pub ino: U64,
    /// Next extent block of the chain, 0 at the end.
    pub next: U64,
    /// Extents used in this block (1..=168).
    pub count: U32,
    /// Reserved, zero.
    pub reserved: [u8; 36],
    /// Extents, sorted by file cluster; unused entries zero.
    pub extents: [RawExtent; EXTENTS_PER_BLOCK],
}

const _: () = assert!(size_of::<RawExtentBlock>() == BLOCK_LEN);

/// A decoded extent block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentBlock {
    /// Owning inode.
    pub ino: InodeId,
    /// Next block of the chain.
    pub next: Option<BlockNo>,
    /// Extents in this block.
    pub extents: Vec<DiskExtent>,
}

impl ExtentBlock {
    /// Encodes into 4096 bytes, CRC set. At most [`EXTENTS_PER_BLOCK`] extents are written.
    pub fn encode(&self) -> Vec<u8> {
        let zero = RawExtent {
            file_cluster: U64::new(0),
            lun_cluster: U64::new(0),
            len_clusters: U32::new(0),
            flags: U32::new(0),
        };
        let mut raw = RawExtentBlock {
            magic: U32::new(MAGIC_EXTENT),
            crc: U32::new(0),
            ino: U64::new(self.ino.0),
            next: U64::new(self.next.map_or(0, |b| b.0)),
            count: U32::new(0),
            reserved: [0; 36],
            extents: [zero; EXTENTS_PER_BLOCK],
        };
        let n = self.extents.len().min(EXTENTS_PER_BLOCK);
        for (slot, e) in raw.extents.iter_mut().zip(&self.extents[..n]) {
            *slot = e.to_raw();
        }
        raw.count = U32::new(u32::try_from(n).unwrap_or(0));
        let mut out = raw.as_bytes().to_vec();
        seal(&mut out);
        out
    }

    /// Decodes a block read at byte `at` that `owner` points to.
    pub fn decode(bytes: &[u8], at: u64, owner: InodeId) -> Result<ExtentBlock, DecodeError> {
        const WHAT: &str = "extent block";
        let raw: RawExtentBlock = verify_raw(WHAT, at, bytes, MAGIC_EXTENT)?;
        check_owner(WHAT, at, raw.ino.get(), owner)?;
        let count = usize::try_from(raw.count.get()).unwrap_or(usize::MAX);
        if count == 0 || count > EXTENTS_PER_BLOCK {
            return Err(corrupt(
                WHAT,
                at,
                format!("extent count {count} out of range"),
            ));
        }
        let extents = raw.extents[..count]
            .iter()
            .map(|r| DiskExtent::from_raw(r, WHAT, at))
            .collect::<Result<Vec<_>, _>>()?;
        check_sorted(&extents, WHAT, at)?;
        let next = raw.next.get();
        Ok(ExtentBlock {
            ino: owner,
            next: (next != 0).then_some(BlockNo(next)),
            extents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(f: u64, l: u64, n: u32, u: bool) -> DiskExtent {
        DiskExtent {
            file_cluster: f,
            lun_cluster: ClusterNo(l),
            len_clusters: n,
            unwritten: u,
        }
    }

    #[test]
    fn round_trip() {
        let b = ExtentBlock {
            ino: InodeId(9),
            next: Some(BlockNo(77)),
            extents: (0..EXTENTS_PER_BLOCK as u64)
                .map(|i| ext(i * 2, 1000 + i, 1, i % 2 == 0))
                .collect(),
        };
        let e = b.encode();
        assert_eq!(ExtentBlock::decode(&e, 4096, InodeId(9)).unwrap(), b);
    }

    #[test]
    fn bad_blocks() {
        let b = ExtentBlock {
            ino: InodeId(9),
            next: None,
            extents: vec![ext(0, 5, 3, false), ext(10, 1, 1, true)],
        };
        let e = b.encode();
        let mut c = e.clone();
        c[70] ^= 4;
        assert!(matches!(
            ExtentBlock::decode(&c, 0, InodeId(9)),
            Err(DecodeError::BadCrc { .. })
        ));
        let mut m = e.clone();
        m[0] = b'X';
        assert!(matches!(
            ExtentBlock::decode(&m, 0, InodeId(9)),
            Err(DecodeError::BadMagic { .. })
        ));
        assert!(matches!(
            ExtentBlock::decode(&e, 0, InodeId(8)),
            Err(DecodeError::Corrupt { .. })
        ));
        let overlap = ExtentBlock {
            ino: InodeId(9),
            next: None,
            extents: vec![ext(0, 5, 3, false), ext(2, 1, 1, true)],
        };
        assert!(matches!(
            ExtentBlock::decode(&overlap.encode(), 0, InodeId(9)),
            Err(DecodeError::Corrupt { .. })
        ));
    }
}
