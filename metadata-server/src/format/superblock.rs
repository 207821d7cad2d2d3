//! The superblock (block 0, backup in the last 4 KiB of the device). FORMAT.md §2.

use std::sync::Arc;

use block_client::{BlockDevice, BlockError};
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    corrupt, seal, verify, DecodeError, Geometry, Region, BLOCK_BYTES, BLOCK_LEN, FORMAT_MAJOR,
    FORMAT_MINOR, MAGIC_SUPERBLOCK, MAX_CLUSTER_BYTES, MIN_CLUSTER_BYTES,
};
use crate::format::inode::MAX_NODES_LIMIT;
use crate::format::{BitmapKind, BITMAP_BITS_PER_BLOCK, DRC_SLOT_BYTES, INODE_BYTES};
use crate::types::{BlockNo, InodeId, Timestamp, VolumeId};

/// Encoded size of the superblock; it sits at the start of a 4 KiB block whose rest is zero.
pub const SUPERBLOCK_BYTES: usize = 512;

/// Feature bits. Unknown incompat bits refuse the mount, unknown ro-compat bits force
/// read-only, unknown compat bits are ignored. Version 1.0 defines none.
pub mod features {
    /// Compat bits this code knows.
    pub const COMPAT_KNOWN: u64 = 0;
    /// Read-only-compat bits this code knows.
    pub const RO_COMPAT_KNOWN: u64 = 0;
    /// Incompat bits this code knows.
    pub const INCOMPAT_KNOWN: u64 = 0;
}

/// On-disk superblock, 512 bytes, little-endian. Byte table in FORMAT.md §2.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSuperblock {
    /// [`MAGIC_SUPERBLOCK`].
    pub magic: U32,
    /// CRC32 of the 512 bytes with this field zero.
    pub crc: U32,
    /// Format major version.
    pub major: U16,
    /// Format minor version.
    pub minor: U16,
    /// Reserved, zero.
    pub reserved0: U32,
    /// Compatible feature bits.
    pub compat: U64,
    /// Read-only-compatible feature bits.
    pub ro_compat: U64,
    /// Incompatible feature bits.
    pub incompat: U64,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Label, UTF-8, NUL padded.
    pub label: [u8; 64],
    /// Cluster size in bytes (power of two, 4 KiB..64 MiB).
    pub cluster_bytes: U32,
    /// Highest node id.
    pub max_nodes: U32,
    /// Device size in bytes at mkfs.
    pub device_bytes: U64,
    /// Lease area first block.
    pub lease_start: U64,
    /// Lease area length in blocks (1 + max_nodes).
    pub lease_blocks: U64,
    /// Journal first block.
    pub journal_start: U64,
    /// Journal length in blocks.
    pub journal_blocks: U64,
    /// Duplicate-request cache first block.
    pub drc_start: U64,
    /// Duplicate-request cache length in blocks.
    pub drc_blocks: U64,
    /// Cluster bitmap first block.
    pub cbitmap_start: U64,
    /// Cluster bitmap length in blocks.
    pub cbitmap_blocks: U64,
    /// Inode bitmap first block.
    pub ibitmap_start: U64,
    /// Inode bitmap length in blocks.
    pub ibitmap_blocks: U64,
    /// Metadata-block bitmap first block.
    pub mbitmap_start: U64,
    /// Metadata-block bitmap length in blocks.
    pub mbitmap_blocks: U64,
    /// Inode table first block.
    pub inode_start: U64,
    /// Inode slots (including unused slot 0).
    pub inode_count: U64,
    /// Metadata-block area first block.
    pub meta_start: U64,
    /// Metadata-block area length in blocks.
    pub meta_blocks: U64,
    /// Data region first byte (cluster aligned).
    pub data_start_bytes: U64,
    /// Data clusters.
    pub cluster_count: U64,
    /// Block of the backup superblock.
    pub backup_block: U64,
    /// Creation time, seconds since the epoch.
    pub created_secs: I64,
    /// Creation time, nanoseconds.
    pub created_nanos: U32,
    /// Volume state: 1 clean, 2 in use by a coordinator.
    pub state: U32,
    /// Seed of the directory name hash.
    pub hash_seed: U64,
    /// First inode of the held list (open or orphaned inodes), 0 when empty.
    pub held_head: U64,
    /// Root directory inode.
    pub root_ino: U64,
    /// lost+found inode.
    pub lost_found_ino: U64,
    /// Duplicate-request cache slots per node.
    pub drc_slots_per_node: U32,
    /// Reserved, zero.
    pub reserved1: U32,
    /// Reserved, zero.
    pub reserved: [u8; 168],
}

const _: () = assert!(size_of::<RawSuperblock>() == SUPERBLOCK_BYTES);

/// Volume state recorded in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// Cleanly shut down: the journal is empty and every structure is home.
    Clean,
    /// A coordinator has (or had, if it crashed) the volume open: replay the journal.
    InUse,
}

/// Which copy of the superblock was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockCopy {
    /// The copy at byte 0.
    Primary,
    /// The backup at the end of the device (the primary was unreadable or damaged).
    Backup,
}

/// A validated superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Format major version.
    pub major: u16,
    /// Format minor version.
    pub minor: u16,
    /// Compatible feature bits.
    pub compat: u64,
    /// Read-only-compatible feature bits.
    pub ro_compat: u64,
    /// Incompatible feature bits.
    pub incompat: u64,
    /// Volume UUID.
    pub volume: VolumeId,
    /// Label.
    pub label: String,
    /// Device size in bytes at mkfs.
    pub device_bytes: u64,
    /// Layout.
    pub geometry: Geometry,
    /// Creation time.
    pub created: Timestamp,
    /// Clean or in use.
    pub state: VolumeState,
    /// Seed of the directory name hash.
    pub hash_seed: u64,
    /// First inode of the held list, if any.
    pub held_head: Option<InodeId>,
    /// Root directory.
    pub root: InodeId,
    /// lost+found directory.
    pub lost_found: InodeId,
}

/// Why the superblock could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SuperblockError {
    /// The device could not be read.
    #[error("read superblock at byte {at}")]
    Read {
        /// Byte offset.
        at: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The device is too small to hold a csvfs volume.
    #[error("device of {size_bytes} bytes is too small for a csvfs volume")]
    TooSmall {
        /// Device size.
        size_bytes: u64,
    },
    /// Neither copy has the csvfs magic: not a csvfs volume.
    #[error("not a csvfs volume (no superblock magic at byte 0 or at the end of the device)")]
    NotCsvfs,
    /// Both copies are damaged.
    #[error("both superblock copies are damaged (primary: {primary}; backup: {backup})")]
    Damaged {
        /// What is wrong with the primary.
        primary: DecodeError,
        /// What is wrong with the backup.
        backup: DecodeError,
    },
    /// The format major version is not one this code reads.
    #[error(
        "unsupported csvfs format version {major}.{minor} (this build reads {FORMAT_MAJOR}.x)"
    )]
    Unsupported {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
    /// Incompatible features this code does not know.
    #[error("volume uses unknown incompatible features {bits:#x}")]
    IncompatFeatures {
        /// The unknown bits.
        bits: u64,
    },
    /// The volume is not the one expected.
    #[error("wrong volume: expected {expected}, found {found}")]
    WrongVolume {
        /// Expected UUID.
        expected: VolumeId,
        /// UUID found.
        found: VolumeId,
    },
}

/// The result of [`Superblock::read`].
#[derive(Debug, Clone)]
pub struct SuperblockRead {
    /// The validated superblock.
    pub superblock: Superblock,
    /// Which copy it came from.
    pub copy: SuperblockCopy,
    /// Unknown read-only-compatible features are set: mount read-only.
    pub read_only: bool,
}

fn region(start: u64, len: u64) -> Region {
    Region {
        start: BlockNo(start),
        len_blocks: len,
    }
}

impl Superblock {
    /// Encodes into a full 4 KiB block (superblock then zeros), CRC set.
    pub fn encode_block(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut label = [0u8; 64];
        let lb = self.label.as_bytes();
        let n = lb.len().min(64);
        label[..n].copy_from_slice(&lb[..n]);
        let raw = RawSuperblock {
            magic: U32::new(MAGIC_SUPERBLOCK),
            crc: U32::new(0),
            major: U16::new(self.major),
            minor: U16::new(self.minor),
            reserved0: U32::new(0),
            compat: U64::new(self.compat),
            ro_compat: U64::new(self.ro_compat),
            incompat: U64::new(self.incompat),
            uuid: self.volume.0,
            label,
            cluster_bytes: U32::new(g.cluster_bytes),
            max_nodes: U32::new(g.max_nodes),
            device_bytes: U64::new(self.device_bytes),
            lease_start: U64::new(g.lease.start.0),
            lease_blocks: U64::new(g.lease.len_blocks),
            journal_start: U64::new(g.journal.start.0),
            journal_blocks: U64::new(g.journal.len_blocks),
            drc_start: U64::new(g.drc.start.0),
            drc_blocks: U64::new(g.drc.len_blocks),
            cbitmap_start: U64::new(g.cluster_bitmap.start.0),
            cbitmap_blocks: U64::new(g.cluster_bitmap.len_blocks),
            ibitmap_start: U64::new(g.inode_bitmap.start.0),
            ibitmap_blocks: U64::new(g.inode_bitmap.len_blocks),
            mbitmap_start: U64::new(g.meta_bitmap.start.0),
            mbitmap_blocks: U64::new(g.meta_bitmap.len_blocks),
            inode_start: U64::new(g.inode_table.start.0),
            inode_count: U64::new(g.inode_count),
            meta_start: U64::new(g.meta.start.0),
            meta_blocks: U64::new(g.meta.len_blocks),
            data_start_bytes: U64::new(g.data_start_bytes),
            cluster_count: U64::new(g.cluster_count),
            backup_block: U64::new(g.backup_superblock.0),
            created_secs: I64::new(self.created.secs),
            created_nanos: U32::new(self.created.nanos),
            state: U32::new(match self.state {
                VolumeState::Clean => 1,
                VolumeState::InUse => 2,
            }),
            hash_seed: U64::new(self.hash_seed),
            held_head: U64::new(self.held_head.map_or(0, |i| i.0)),
            root_ino: U64::new(self.root.0),
            lost_found_ino: U64::new(self.lost_found.0),
            drc_slots_per_node: U32::new(g.drc_slots_per_node),
            reserved1: U32::new(0),
            reserved: [0; 168],
        };
        let mut block = vec![0u8; BLOCK_LEN];
        block[..SUPERBLOCK_BYTES].copy_from_slice(raw.as_bytes());
        seal(&mut block[..SUPERBLOCK_BYTES]);
        block
    }

    /// Decodes and validates a superblock from the first 512 bytes of `bytes`; `at` is the
    /// byte offset it was read from. Checks magic, CRC, version and the layout (every region
    /// inside the device, in order, not overlapping). Feature bits are checked by the caller
    /// ([`Superblock::check_features`]).
    pub fn decode(bytes: &[u8], at: u64) -> Result<Superblock, DecodeError> {
        const WHAT: &str = "superblock";
        let b = bytes.get(..SUPERBLOCK_BYTES).ok_or(DecodeError::Length {
            what: WHAT,
            at,
            len_bytes: bytes.len() as u64,
        })?;
        verify(WHAT, at, b, MAGIC_SUPERBLOCK)?;
        let raw = RawSuperblock::read_from_bytes(b).map_err(|_| DecodeError::Length {
            what: WHAT,
            at,
            len_bytes: b.len() as u64,
        })?;
        let cluster_bytes = raw.cluster_bytes.get();
        if !cluster_bytes.is_power_of_two()
            || !(MIN_CLUSTER_BYTES..=MAX_CLUSTER_BYTES).contains(&cluster_bytes)
        {
            return Err(corrupt(
                WHAT,
                at,
                format!("cluster size {cluster_bytes} out of range"),
            ));
        }
        let max_nodes = raw.max_nodes.get();
        if max_nodes == 0 || max_nodes > MAX_NODES_LIMIT {
            return Err(corrupt(
                WHAT,
                at,
                format!("max nodes {max_nodes} out of range"),
            ));
        }
        let state = match raw.state.get() {
            1 => VolumeState::Clean,
            2 => VolumeState::InUse,
            s => return Err(corrupt(WHAT, at, format!("invalid volume state {s}"))),
        };
        let label_end = raw.label.iter().position(|b| *b == 0).unwrap_or(64);
        let label = String::from_utf8(raw.label[..label_end].to_vec())
            .map_err(|_| corrupt(WHAT, at, "label is not UTF-8"))?;
        let g = Geometry {
            cluster_bytes,
            max_nodes,
            lease: region(raw.lease_start.get(), raw.lease_blocks.get()),
            journal: region(raw.journal_start.get(), raw.journal_blocks.get()),
            drc: region(raw.drc_start.get(), raw.drc_blocks.get()),
            drc_slots_per_node: raw.drc_slots_per_node.get(),
            cluster_bitmap: region(raw.cbitmap_start.get(), raw.cbitmap_blocks.get()),
            inode_bitmap: region(raw.ibitmap_start.get(), raw.ibitmap_blocks.get()),
            meta_bitmap: region(raw.mbitmap_start.get(), raw.mbitmap_blocks.get()),
            inode_table: region(
                raw.inode_start.get(),
                raw.inode_count
                    .get()
                    .saturating_mul(INODE_BYTES)
                    .div_ceil(BLOCK_BYTES),
            ),
            inode_count: raw.inode_count.get(),
            meta: region(raw.meta_start.get(), raw.meta_blocks.get()),
            data_start_bytes: raw.data_start_bytes.get(),
            cluster_count: raw.cluster_count.get(),
            backup_superblock: BlockNo(raw.backup_block.get()),
        };
        let device_bytes = raw.device_bytes.get();
        check_layout(&g, device_bytes).map_err(|reason| corrupt(WHAT, at, reason))?;
        let opt_ino = |v: u64| (v != 0).then_some(InodeId(v));
        let held_head = opt_ino(raw.held_head.get());
        if let Some(h) = held_head {
            if !g.inode_valid(h) {
                return Err(corrupt(
                    WHAT,
                    at,
                    format!("held list head {h} out of range"),
                ));
            }
        }
        let root = InodeId(raw.root_ino.get());
        let lost_found = InodeId(raw.lost_found_ino.get());
        if !g.inode_valid(root) || !g.inode_valid(lost_found) {
            return Err(corrupt(WHAT, at, "root or lost+found inode out of range"));
        }
        let created_nanos = raw.created_nanos.get();
        if created_nanos >= 1_000_000_000 {
            return Err(corrupt(WHAT, at, "creation time nanoseconds out of range"));
        }
        Ok(Superblock {
            major: raw.major.get(),
            minor: raw.minor.get(),
            compat: raw.compat.get(),
            ro_compat: raw.ro_compat.get(),
            incompat: raw.incompat.get(),
            volume: VolumeId(raw.uuid),
            label,
            device_bytes,
            geometry: g,
            created: Timestamp {
                secs: raw.created_secs.get(),
                nanos: created_nanos,
            },
            state,
            hash_seed: raw.hash_seed.get(),
            held_head,
            root,
            lost_found,
        })
    }

    /// Checks version and feature bits. Returns `true` when the volume must be used
    /// read-only (unknown read-only-compatible features).
    pub fn check_features(&self) -> Result<bool, SuperblockError> {
        if self.major != FORMAT_MAJOR {
            return Err(SuperblockError::Unsupported {
                major: self.major,
                minor: self.minor,
            });
        }
        let unknown_incompat = self.incompat & !features::INCOMPAT_KNOWN;
        if unknown_incompat != 0 {
            return Err(SuperblockError::IncompatFeatures {
                bits: unknown_incompat,
            });
        }
        Ok(self.ro_compat & !features::RO_COMPAT_KNOWN != 0)
    }

    /// Reads the superblock: the primary copy, or the backup when the primary is damaged.
    /// Refuses unknown format majors and incompat features.
    pub fn read(dev: &dyn BlockDevice) -> Result<SuperblockRead, SuperblockError> {
        let size_bytes = dev.size_bytes();
        if size_bytes < 2 * BLOCK_BYTES {
            return Err(SuperblockError::TooSmall { size_bytes });
        }
        let mut buf = vec![0u8; BLOCK_LEN];
        dev.read_at(&mut buf, 0)
            .map_err(|source| SuperblockError::Read { at: 0, source })?;
        let primary = Superblock::decode(&buf, 0);
        let (superblock, copy) = match primary {
            Ok(sb) => (sb, SuperblockCopy::Primary),
            Err(perr) => {
                let backup_at = (size_bytes / BLOCK_BYTES - 1) * BLOCK_BYTES;
                dev.read_at(&mut buf, backup_at)
                    .map_err(|source| SuperblockError::Read {
                        at: backup_at,
                        source,
                    })?;
                match Superblock::decode(&buf, backup_at) {
                    Ok(sb) => {
                        tracing::warn!(error = %perr, "primary superblock damaged; using the backup");
                        (sb, SuperblockCopy::Backup)
                    }
                    Err(berr) => {
                        let no_magic = |e: &DecodeError| matches!(e, DecodeError::BadMagic { .. });
                        if no_magic(&perr) && no_magic(&berr) {
                            return Err(SuperblockError::NotCsvfs);
                        }
                        return Err(SuperblockError::Damaged {
                            primary: perr,
                            backup: berr,
                        });
                    }
                }
            }
        };
        let read_only = superblock.check_features()?;
        Ok(SuperblockRead {
            superblock,
            copy,
            read_only,
        })
    }

    /// [`Superblock::read`] on a shared device handle.
    pub fn read_arc(dev: &Arc<dyn BlockDevice>) -> Result<SuperblockRead, SuperblockError> {
        Superblock::read(dev.as_ref())
    }

    /// Reads the superblock and checks it belongs to `expected`.
    pub fn read_expecting(
        dev: &dyn BlockDevice,
        expected: VolumeId,
    ) -> Result<SuperblockRead, SuperblockError> {
        let r = Superblock::read(dev)?;
        if r.superblock.volume != expected {
            return Err(SuperblockError::WrongVolume {
                expected,
                found: r.superblock.volume,
            });
        }
        Ok(r)
    }

    /// Byte offset of the primary superblock (always 0).
    pub const fn primary_offset() -> u64 {
        0
    }

    /// Byte offset of the backup superblock.
    pub fn backup_offset(&self) -> u64 {
        self.geometry.backup_superblock.0 * BLOCK_BYTES
    }

    /// The minor version this code writes, for callers that rewrite the superblock.
    pub const fn current_minor() -> u16 {
        FORMAT_MINOR
    }
}

/// Checks that the regions are in order, non-overlapping and inside the device.
fn check_layout(g: &Geometry, device_bytes: u64) -> Result<(), String> {
    if device_bytes % BLOCK_BYTES != 0 || device_bytes < 2 * BLOCK_BYTES {
        return Err(format!(
            "device size {device_bytes} is not a multiple of 4 KiB"
        ));
    }
    let dev_blocks = device_bytes / BLOCK_BYTES;
    if g.backup_superblock.0 != dev_blocks - 1 {
        return Err("backup superblock is not the last block".into());
    }
    if g.lease.start.0 != 1 || g.lease.len_blocks != 1 + u64::from(g.max_nodes) {
        return Err("lease area misplaced".into());
    }
    if g.drc_slots_per_node == 0 {
        return Err("no duplicate-request cache slots".into());
    }
    let drc_need = (u64::from(g.max_nodes) * u64::from(g.drc_slots_per_node) * DRC_SLOT_BYTES)
        .div_ceil(BLOCK_BYTES);
    if g.drc.len_blocks < drc_need {
        return Err("duplicate-request cache region too small".into());
    }
    if g.journal.len_blocks < 16 {
        return Err("journal region too small".into());
    }
    if g.inode_count < 3 {
        return Err("fewer than 3 inode slots".into());
    }
    for (kind, r) in [
        (BitmapKind::Clusters, g.cluster_bitmap),
        (BitmapKind::Inodes, g.inode_bitmap),
        (BitmapKind::Meta, g.meta_bitmap),
    ] {
        if r.len_blocks != g.bitmap_bits(kind).div_ceil(BITMAP_BITS_PER_BLOCK) {
            return Err(format!("{kind:?} bitmap has the wrong length"));
        }
    }
    let order = [
        g.lease,
        g.journal,
        g.drc,
        g.cluster_bitmap,
        g.inode_bitmap,
        g.meta_bitmap,
        g.inode_table,
        g.meta,
    ];
    let mut end = 1u64;
    for r in order {
        if r.start.0 < end {
            return Err(format!(
                "region at block {} overlaps the one before",
                r.start.0
            ));
        }
        end = r
            .start
            .0
            .checked_add(r.len_blocks)
            .ok_or_else(|| "region length overflows".to_string())?;
    }
    if g.data_start_bytes < end * BLOCK_BYTES
        || g.data_start_bytes % u64::from(g.cluster_bytes) != 0
    {
        return Err("data region misplaced".into());
    }
    let data_end = g
        .cluster_count
        .checked_mul(u64::from(g.cluster_bytes))
        .and_then(|n| n.checked_add(g.data_start_bytes))
        .ok_or_else(|| "data region overflows".to_string())?;
    if data_end > g.backup_superblock.0 * BLOCK_BYTES {
        return Err("data region runs past the backup superblock".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Layout, MkfsOptions};

    fn sample() -> Superblock {
        let layout = Layout::compute(256 << 20, &MkfsOptions::default()).unwrap();
        layout.superblock(
            VolumeId([7; 16]),
            "test",
            Timestamp { secs: 5, nanos: 6 },
            99,
        )
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let block = sb.encode_block();
        let back = Superblock::decode(&block, 0).unwrap();
        assert_eq!(back, sb);
        assert!(!back.check_features().unwrap());
    }

    #[test]
    fn bad_crc_and_magic() {
        let mut block = sample().encode_block();
        block[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&block, 0),
            Err(DecodeError::BadCrc { .. })
        ));
        block[0] ^= 1;
        assert!(matches!(
            Superblock::decode(&block, 0),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn features_refuse_and_force_read_only() {
        let mut sb = sample();
        sb.ro_compat = 1 << 40;
        assert!(sb.check_features().unwrap());
        sb.incompat = 1 << 3;
        assert!(matches!(
            sb.check_features(),
            Err(SuperblockError::IncompatFeatures { bits: 8 })
        ));
        let mut sb = sample();
        sb.major = 2;
        assert!(matches!(
            sb.check_features(),
            Err(SuperblockError::Unsupported { major: 2, .. })
        ));
    }

    #[test]
    fn bad_layout_is_corrupt() {
        let mut sb = sample();
        sb.geometry.cluster_count += 1_000_000;
        let block = sb.encode_block();
        assert!(matches!(
            Superblock::decode(&block, 0),
            Err(DecodeError::Corrupt { .. })
        ));
    }
}
