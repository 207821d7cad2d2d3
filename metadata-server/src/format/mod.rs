//! The csvfs on-disk format, version 1.0. Specified byte for byte by
//! `metadata-server/FORMAT.md`; a change to one is a change to both.
//!
//! Every structure is a `#[repr(C)]` `Raw*` struct of little-endian `zerocopy` fields with a
//! compile-time size check, parsed into a validated type before anything uses it. Every
//! metadata structure starts with a 4-byte magic and a CRC32 (`crc32fast`) of the whole
//! structure computed with the CRC field set to zero (see [`seal`] and [`verify`]).
//!
//! ```text
//!  byte 0                                                                 end of device
//!  | SB | lease area | journal | DRC | cbitmap | ibitmap | mbitmap | inodes | meta | data ... | SB backup |
//! ```
//!
//! Decoding does no I/O. The few helpers that touch the LUN ([`Superblock::read`],
//! [`mkfs()`]) only use the [`block_client::BlockDevice`] trait.

mod bitmap;
mod blob;
mod dir;
mod drc;
mod extent;
mod inode;
pub mod lease;
mod mkfs;
mod superblock;
mod txn;

pub use bitmap::{BitmapBlock, BitmapKind, RawBitmapBlock, BITMAP_BITS_PER_BLOCK};
pub use blob::{BlobBlock, BlobKind, RawBlobBlock, BLOB_DATA_BYTES};
pub use dir::{
    dir_entry_bytes, name_hash, valid_name, DirBlock, DirBlockEntry, RawDirBlock,
    DIR_ENTRIES_BYTES, DIR_ENTRY_HEADER_BYTES, DIR_MAX_DEPTH,
};
pub use drc::{DrcPayload, DrcSlot, RawDrcSlot, DRC_DATA_BYTES, DRC_SLOT_BYTES};
pub use extent::{
    check_sorted, DiskExtent, ExtentBlock, RawExtent, RawExtentBlock, EXTENTS_PER_BLOCK,
    EXTENT_FLAG_UNWRITTEN,
};
pub use inode::{
    kind_code, kind_from_code, Inode, InodeSlot, RawInode, RawTime, INLINE_AREA_BYTES,
    INLINE_EXTENTS, INLINE_SYMLINK_BYTES, INLINE_XATTR_BYTES, INODE_BYTES, INODE_FLAG_HELD,
    MAX_NODES_LIMIT,
};
pub use mkfs::{mkfs, now, Layout, MkfsError, MkfsOptions, MkfsReport, LOST_FOUND_INO};
pub use superblock::{
    features, RawSuperblock, Superblock, SuperblockCopy, SuperblockError, SuperblockRead,
    VolumeState, SUPERBLOCK_BYTES,
};
pub use txn::{Transaction, TxnWrite, TXN_MAGIC};

use crate::types::{BlockNo, ClusterNo, InodeId, NodeId};

/// Size of a metadata block and of the addressing unit [`BlockNo`], in bytes.
pub const BLOCK_BYTES: u64 = 4096;
/// [`BLOCK_BYTES`] as a buffer length.
pub const BLOCK_LEN: usize = 4096;
/// Format major version written by this code. A different major refuses to mount.
pub const FORMAT_MAJOR: u16 = 1;
/// Format minor version written by this code. A newer minor with the same major mounts.
pub const FORMAT_MINOR: u16 = 0;
/// Longest file name in bytes.
pub const MAX_NAME_BYTES: u32 = 255;
/// Longest symbolic link target in bytes.
pub const MAX_SYMLINK_BYTES: usize = 4095;
/// Largest file size in bytes (2^50, 1 PiB).
pub const MAX_FILE_BYTES: u64 = 1 << 50;
/// Smallest cluster size in bytes.
pub const MIN_CLUSTER_BYTES: u32 = 4096;
/// Largest cluster size in bytes.
pub const MAX_CLUSTER_BYTES: u32 = 64 << 20;
/// Default cluster size in bytes.
pub const DEFAULT_CLUSTER_BYTES: u32 = 1 << 20;

/// Builds a little-endian magic from four ASCII bytes.
const fn magic(b: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*b)
}

/// Magic of the superblock, "CSVS".
pub const MAGIC_SUPERBLOCK: u32 = magic(b"CSVS");
/// Magic of a lease or heartbeat record, "CSVL".
pub const MAGIC_LEASE: u32 = magic(b"CSVL");
/// Magic of a bitmap block, "CSVB".
pub const MAGIC_BITMAP: u32 = magic(b"CSVB");
/// Magic of an inode, "CSVI".
pub const MAGIC_INODE: u32 = magic(b"CSVI");
/// Magic of an extent block, "CSVE".
pub const MAGIC_EXTENT: u32 = magic(b"CSVE");
/// Magic of a directory block, "CSVD".
pub const MAGIC_DIR: u32 = magic(b"CSVD");
/// Magic of a blob block (xattrs, long symlink targets), "CSVX".
pub const MAGIC_BLOB: u32 = magic(b"CSVX");
/// Magic of a duplicate-request-cache slot, "CSVR".
pub const MAGIC_DRC: u32 = magic(b"CSVR");

/// Why a structure could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer has the wrong length for the structure.
    #[error("{what} at byte {at}: buffer of {len_bytes} bytes has the wrong size")]
    Length {
        /// Which structure.
        what: &'static str,
        /// Byte offset on the LUN.
        at: u64,
        /// Length of the buffer given.
        len_bytes: u64,
    },
    /// The magic number is wrong.
    #[error("{what} at byte {at}: bad magic {found:#010x}")]
    BadMagic {
        /// Which structure.
        what: &'static str,
        /// Byte offset on the LUN.
        at: u64,
        /// The magic found.
        found: u32,
    },
    /// The CRC does not match the contents.
    #[error("{what} at byte {at}: checksum mismatch")]
    BadCrc {
        /// Which structure.
        what: &'static str,
        /// Byte offset on the LUN.
        at: u64,
    },
    /// The magic and CRC are right but a field is out of range.
    #[error("{what} at byte {at}: {reason}")]
    Corrupt {
        /// Which structure.
        what: &'static str,
        /// Byte offset on the LUN.
        at: u64,
        /// What is wrong.
        reason: String,
    },
}

impl DecodeError {
    /// Byte offset on the LUN of the structure that failed to decode.
    pub fn at(&self) -> u64 {
        match self {
            DecodeError::Length { at, .. }
            | DecodeError::BadMagic { at, .. }
            | DecodeError::BadCrc { at, .. }
            | DecodeError::Corrupt { at, .. } => *at,
        }
    }
}

pub(crate) fn corrupt(what: &'static str, at: u64, reason: impl Into<String>) -> DecodeError {
    DecodeError::Corrupt {
        what,
        at,
        reason: reason.into(),
    }
}

/// CRC32 of `bytes` with bytes 4..8 (the CRC field of every structure) taken as zero.
pub fn crc_of(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if bytes.len() < 8 {
        h.update(bytes);
        return h.finalize();
    }
    h.update(&bytes[..4]);
    h.update(&[0u8; 4]);
    h.update(&bytes[8..]);
    h.finalize()
}

/// Writes the CRC of an encoded structure into its bytes 4..8.
pub fn seal(bytes: &mut [u8]) {
    let crc = crc_of(bytes);
    if bytes.len() >= 8 {
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Checks length, magic (bytes 0..4) and CRC (bytes 4..8) of an encoded structure.
pub fn verify(
    what: &'static str,
    at: u64,
    bytes: &[u8],
    expect_magic: u32,
) -> Result<(), DecodeError> {
    if bytes.len() < 8 {
        return Err(DecodeError::Length {
            what,
            at,
            len_bytes: bytes.len() as u64,
        });
    }
    let found = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != expect_magic {
        return Err(DecodeError::BadMagic { what, at, found });
    }
    let stored = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if stored != crc_of(bytes) {
        return Err(DecodeError::BadCrc { what, at });
    }
    Ok(())
}

/// Checks magic and CRC like [`verify`], then reads the raw layout `T` from `bytes`.
pub(crate) fn verify_raw<T: zerocopy::FromBytes>(
    what: &'static str,
    at: u64,
    bytes: &[u8],
    expect_magic: u32,
) -> Result<T, DecodeError> {
    verify(what, at, bytes, expect_magic)?;
    T::read_from_bytes(bytes).map_err(|_| DecodeError::Length {
        what,
        at,
        len_bytes: bytes.len() as u64,
    })
}

/// Checks that a block names, in its `ino` field, the inode that points to it.
pub(crate) fn check_owner(
    what: &'static str,
    at: u64,
    found_ino: u64,
    owner: InodeId,
) -> Result<(), DecodeError> {
    if found_ino != owner.0 {
        return Err(corrupt(
            what,
            at,
            format!("owned by ino {found_ino} not {owner}"),
        ));
    }
    Ok(())
}

/// True when every byte is zero (a structure that was never written).
pub fn is_zeroed(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

/// A region of the LUN, in 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First block.
    pub start: BlockNo,
    /// Length in blocks.
    pub len_blocks: u64,
}

impl Region {
    /// Byte offset of the first block.
    pub fn start_bytes(&self) -> u64 {
        self.start.0 * BLOCK_BYTES
    }
    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len_blocks * BLOCK_BYTES
    }
    /// Byte offset just past the region.
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes() + self.len_bytes()
    }
    /// True when `block` lies inside the region.
    pub fn contains(&self, block: BlockNo) -> bool {
        block.0 >= self.start.0 && block.0 - self.start.0 < self.len_blocks
    }
}

/// Where things are on a formatted volume: computed from a validated [`Superblock`].
/// All offsets are bytes on the LUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cluster size in bytes.
    pub cluster_bytes: u32,
    /// Highest node id (node ids are 1..=max_nodes).
    pub max_nodes: u32,
    /// Lease area: block 0 the coordinator lease, block n the heartbeat of node n.
    pub lease: Region,
    /// Journal region.
    pub journal: Region,
    /// Duplicate-request cache: `drc_slots_per_node` slots of [`DRC_SLOT_BYTES`] per node.
    pub drc: Region,
    /// Slots per node in the duplicate-request cache.
    pub drc_slots_per_node: u32,
    /// Cluster allocation bitmap.
    pub cluster_bitmap: Region,
    /// Inode allocation bitmap.
    pub inode_bitmap: Region,
    /// Metadata-block allocation bitmap.
    pub meta_bitmap: Region,
    /// Inode table.
    pub inode_table: Region,
    /// Number of inode slots, including the unused slot 0.
    pub inode_count: u64,
    /// Metadata-block area (directory, extent and blob blocks).
    pub meta: Region,
    /// Data region start, in bytes (cluster aligned).
    pub data_start_bytes: u64,
    /// Number of data clusters.
    pub cluster_count: u64,
    /// Block of the backup superblock (the last 4 KiB of the device at mkfs).
    pub backup_superblock: BlockNo,
}

impl Geometry {
    /// Byte offset on the LUN of a data cluster.
    pub fn cluster_offset(&self, c: ClusterNo) -> u64 {
        self.data_start_bytes + c.0 * u64::from(self.cluster_bytes)
    }
    /// The cluster holding LUN byte `lun_offset_bytes`, if it is in the data region.
    pub fn cluster_at(&self, lun_offset_bytes: u64) -> Option<ClusterNo> {
        let rel = lun_offset_bytes.checked_sub(self.data_start_bytes)?;
        let c = rel / u64::from(self.cluster_bytes);
        (c < self.cluster_count).then_some(ClusterNo(c))
    }
    /// Byte offset on the LUN of an inode slot.
    pub fn inode_offset(&self, ino: InodeId) -> u64 {
        self.inode_table.start_bytes() + ino.0 * INODE_BYTES
    }
    /// True when `ino` names a slot of the inode table (1..inode_count).
    pub fn inode_valid(&self, ino: InodeId) -> bool {
        ino.0 >= 1 && ino.0 < self.inode_count
    }
    /// True when `b` is a block of the metadata-block area.
    pub fn meta_valid(&self, b: BlockNo) -> bool {
        self.meta.contains(b)
    }
    /// Index of a metadata block inside the metadata-block area (its bit in the meta bitmap).
    pub fn meta_index(&self, b: BlockNo) -> Option<u64> {
        self.meta_valid(b).then(|| b.0 - self.meta.start.0)
    }
    /// Byte offset of the coordinator lease record.
    pub fn lease_offset(&self) -> u64 {
        self.lease.start_bytes()
    }
    /// Byte offset of the heartbeat slot of `node`, or `None` for node 0 or past max nodes.
    pub fn heartbeat_offset(&self, node: NodeId) -> Option<u64> {
        (node.0 >= 1 && node.0 <= self.max_nodes)
            .then(|| self.lease.start_bytes() + u64::from(node.0) * BLOCK_BYTES)
    }
    /// Byte offset of duplicate-request-cache slot `slot` of `node`.
    pub fn drc_slot_offset(&self, node: NodeId, slot: u32) -> Option<u64> {
        if node.0 < 1 || node.0 > self.max_nodes || slot >= self.drc_slots_per_node {
            return None;
        }
        let index = u64::from(node.0 - 1) * u64::from(self.drc_slots_per_node) + u64::from(slot);
        Some(self.drc.start_bytes() + index * DRC_SLOT_BYTES)
    }
    /// The bitmap region of `kind`.
    pub fn bitmap_region(&self, kind: BitmapKind) -> Region {
        match kind {
            BitmapKind::Clusters => self.cluster_bitmap,
            BitmapKind::Inodes => self.inode_bitmap,
            BitmapKind::Meta => self.meta_bitmap,
        }
    }
    /// Number of bits a bitmap of `kind` tracks.
    pub fn bitmap_bits(&self, kind: BitmapKind) -> u64 {
        match kind {
            BitmapKind::Clusters => self.cluster_count,
            BitmapKind::Inodes => self.inode_count,
            BitmapKind::Meta => self.meta.len_blocks,
        }
    }
    /// Total data capacity in bytes.
    pub fn data_bytes(&self) -> u64 {
        self.cluster_count * u64::from(self.cluster_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FileKind, Timestamp};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Runs every decoder on `b` (resealed or not); none may panic.
    fn decode_all(b: &[u8]) {
        let ino = InodeId(5);
        let _ = Superblock::decode(b, 0);
        let _ = lease::LeaseRecord::decode(b, 0);
        let _ = BitmapBlock::decode(b, 0, BitmapKind::Clusters, 0);
        if b.len() >= 1024 {
            let _ = InodeSlot::decode(&b[..1024], 0, ino);
        }
        let _ = ExtentBlock::decode(b, 0, ino);
        let _ = DirBlock::decode(b, 0, ino).map(|d| d.check_hashes(1, 0));
        let _ = BlobBlock::decode(b, 0, ino, BlobKind::Xattrs);
        if b.len() >= 512 {
            let _ = DrcSlot::decode(&b[..512], 0);
        }
        let _ = Transaction::decode(b, 0);
    }

    #[test]
    fn decoders_never_panic_on_damaged_input() {
        let mut rng = StdRng::seed_from_u64(1);
        let layout = Layout::compute(1 << 30, &MkfsOptions::default()).expect("layout");
        let mut inode = Inode::new(InodeId(5), 1, FileKind::File, 0o644, Timestamp::default());
        inode.inline_extents = vec![DiskExtent {
            file_cluster: 0,
            lun_cluster: ClusterNo(1),
            len_clusters: 2,
            unwritten: false,
        }];
        let mut valid: Vec<Vec<u8>> = vec![
            layout
                .superblock(
                    crate::types::VolumeId([1; 16]),
                    "x",
                    Timestamp::default(),
                    3,
                )
                .encode_block(),
            BitmapBlock::empty(BitmapKind::Clusters, 0).encode(),
            DirBlock {
                dir: InodeId(5),
                next: None,
                depth: 1,
                prefix: 1,
                entries: vec![DirBlockEntry {
                    name: b"abc".to_vec(),
                    ino: InodeId(9),
                    kind: FileKind::File,
                    cookie: 3,
                }],
            }
            .encode(),
            ExtentBlock {
                ino: InodeId(5),
                next: None,
                extents: inode.inline_extents.clone(),
            }
            .encode(),
        ];
        let mut ib = inode.encode();
        ib.resize(4096, 0);
        valid.push(ib);
        for _ in 0..20_000 {
            let mut b = valid[rng.gen_range(0..valid.len())].clone();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            if rng.gen_bool(0.7) {
                // Reseal so the damage gets past the CRC into the field checks.
                let n = match rng.gen_range(0..3) {
                    0 => 512,
                    1 => 1024,
                    _ => 4096,
                };
                seal(&mut b[..n]);
            }
            decode_all(&b);
            let cut = rng.gen_range(0..b.len());
            decode_all(&b[..cut]);
        }
    }
}
