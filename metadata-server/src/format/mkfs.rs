//! Formatting a device in-process: [`Layout::compute`] decides where every region goes,
//! [`mkfs()`] writes the metadata regions (never the data region) and the journal.

use std::sync::Arc;

use block_client::{BlockDevice, BlockError, WriteFlags};

use super::{
    BitmapBlock, BitmapKind, DirBlock, DirBlockEntry, Geometry, Inode, Region, Superblock,
    VolumeState, BITMAP_BITS_PER_BLOCK, BLOCK_BYTES, DEFAULT_CLUSTER_BYTES, DRC_SLOT_BYTES,
    FORMAT_MAJOR, FORMAT_MINOR, INODE_BYTES, MAX_CLUSTER_BYTES, MAX_NODES_LIMIT, MIN_CLUSTER_BYTES,
};
use crate::types::{BlockNo, Epoch, FileKind, InodeId, Timestamp, VolumeId};

/// Inode number of lost+found on a fresh volume.
pub const LOST_FOUND_INO: InodeId = InodeId(2);

/// What to make. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkfsOptions {
    /// Cluster size in bytes: a power of two, 4 KiB..64 MiB. Default 1 MiB.
    pub cluster_bytes: u32,
    /// Volume label, at most 64 bytes of UTF-8. Default empty.
    pub label: String,
    /// Highest node id, 1..=64. Default 16.
    pub max_nodes: u32,
    /// Journal size in bytes. Default: device/32, between 4 MiB and 128 MiB.
    pub journal_bytes: Option<u64>,
    /// Inode slots. Default: one per 256 KiB of device, between 64 and 16 Mi.
    pub inode_count: Option<u64>,
    /// Metadata blocks (directory, extent and blob blocks). Default: a quarter of the inode
    /// count, at least 256.
    pub meta_blocks: Option<u64>,
    /// Duplicate-request-cache slots per node. Default 64.
    pub drc_slots_per_node: u32,
    /// Volume UUID. Default: random.
    pub volume: Option<VolumeId>,
    /// Creation time. Default: now.
    pub created: Option<Timestamp>,
    /// Directory hash seed. Default: random.
    pub hash_seed: Option<u64>,
    /// Owner of the root directory. Default 0.
    pub root_uid: u32,
    /// Group of the root directory. Default 0.
    pub root_gid: u32,
}

impl Default for MkfsOptions {
    fn default() -> MkfsOptions {
        MkfsOptions {
            cluster_bytes: DEFAULT_CLUSTER_BYTES,
            label: String::new(),
            max_nodes: 16,
            journal_bytes: None,
            inode_count: None,
            meta_blocks: None,
            drc_slots_per_node: 64,
            volume: None,
            created: None,
            hash_seed: None,
            root_uid: 0,
            root_gid: 0,
        }
    }
}

/// Why formatting failed.
#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The device is too small for the requested layout.
    #[error("device of {size_bytes} bytes is too small: {reason}")]
    TooSmall {
        /// Device size.
        size_bytes: u64,
        /// What did not fit.
        reason: String,
    },
    /// Writing a metadata region failed.
    #[error("write {what} at byte {at}")]
    Write {
        /// Which region.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Flushing the device failed.
    #[error("flush device")]
    Flush {
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Formatting the journal region failed.
    #[error("format journal")]
    Journal {
        /// Cause.
        #[source]
        source: journal::JournalError,
    },
}

/// The computed placement of every region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Device size used (rounded down to 4 KiB).
    pub device_bytes: u64,
    /// Where everything goes.
    pub geometry: Geometry,
    /// The options it was computed from.
    pub options: MkfsOptions,
}

/// What [`mkfs()`] made.
#[derive(Debug, Clone)]
pub struct MkfsReport {
    /// The superblock written.
    pub superblock: Superblock,
    /// Bytes of metadata written (excluding ranges zeroed with write_zeroes).
    pub written_bytes: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Layout {
    /// Computes the layout of a volume on a device of `device_bytes`.
    pub fn compute(device_bytes: u64, o: &MkfsOptions) -> Result<Layout, MkfsError> {
        let bad = |m: String| Err(MkfsError::InvalidOption(m));
        if !o.cluster_bytes.is_power_of_two()
            || !(MIN_CLUSTER_BYTES..=MAX_CLUSTER_BYTES).contains(&o.cluster_bytes)
        {
            return bad(format!(
                "cluster size {} is not a power of two between 4 KiB and 64 MiB",
                o.cluster_bytes
            ));
        }
        if o.max_nodes == 0 || o.max_nodes > MAX_NODES_LIMIT {
            return bad(format!(
                "max nodes {} is not in 1..={MAX_NODES_LIMIT}",
                o.max_nodes
            ));
        }
        if o.label.len() > 64 || o.label.contains('\0') {
            return bad("label longer than 64 bytes or containing NUL".into());
        }
        if o.drc_slots_per_node == 0 || o.drc_slots_per_node > 4096 {
            return bad("duplicate-request slots per node must be 1..=4096".into());
        }
        let device_bytes = device_bytes / BLOCK_BYTES * BLOCK_BYTES;
        let too_small = |reason: &str| MkfsError::TooSmall {
            size_bytes: device_bytes,
            reason: reason.to_string(),
        };
        if device_bytes < 16 * BLOCK_BYTES {
            return Err(too_small("less than 64 KiB"));
        }
        let dev_blocks = device_bytes / BLOCK_BYTES;
        let cluster = u64::from(o.cluster_bytes);
        let mib_blocks = (1 << 20) / BLOCK_BYTES;

        let lease = Region {
            start: BlockNo(1),
            len_blocks: 1 + u64::from(o.max_nodes),
        };
        let journal_bytes = match o.journal_bytes {
            Some(j) => {
                if j < 64 * 1024 || j % BLOCK_BYTES != 0 {
                    return bad(format!(
                        "journal size {j} must be a multiple of 4 KiB and >= 64 KiB"
                    ));
                }
                j
            }
            None => (device_bytes / 32).clamp(4 << 20, 128 << 20) / BLOCK_BYTES * BLOCK_BYTES,
        };
        let journal = Region {
            start: BlockNo(align_up(lease.start.0 + lease.len_blocks, mib_blocks)),
            len_blocks: journal_bytes / BLOCK_BYTES,
        };
        let drc = Region {
            start: BlockNo(journal.start.0 + journal.len_blocks),
            len_blocks: (u64::from(o.max_nodes) * u64::from(o.drc_slots_per_node) * DRC_SLOT_BYTES)
                .div_ceil(BLOCK_BYTES),
        };
        let inode_count = match o.inode_count {
            Some(n) if n >= 3 => n + 1,
            Some(n) => return bad(format!("inode count {n} is below 3")),
            None => (device_bytes / (256 << 10)).clamp(64, 16 << 20) + 1,
        };
        let meta_blocks = match o.meta_blocks {
            Some(n) if n >= 1 => n,
            Some(_) => return bad("metadata block count must be at least 1".into()),
            None => (inode_count / 4).max(256),
        };
        // Upper bound of the cluster count, to size the cluster bitmap.
        let cluster_bound = device_bytes / cluster + 1;
        let cbitmap = Region {
            start: BlockNo(drc.start.0 + drc.len_blocks),
            len_blocks: cluster_bound.div_ceil(BITMAP_BITS_PER_BLOCK),
        };
        let ibitmap = Region {
            start: BlockNo(cbitmap.start.0 + cbitmap.len_blocks),
            len_blocks: inode_count.div_ceil(BITMAP_BITS_PER_BLOCK),
        };
        let mbitmap = Region {
            start: BlockNo(ibitmap.start.0 + ibitmap.len_blocks),
            len_blocks: meta_blocks.div_ceil(BITMAP_BITS_PER_BLOCK),
        };
        let inode_table = Region {
            start: BlockNo(mbitmap.start.0 + mbitmap.len_blocks),
            len_blocks: (inode_count * INODE_BYTES).div_ceil(BLOCK_BYTES),
        };
        let meta = Region {
            start: BlockNo(inode_table.start.0 + inode_table.len_blocks),
            len_blocks: meta_blocks,
        };
        let backup = BlockNo(dev_blocks - 1);
        let data_start_bytes = align_up(meta.end_bytes(), cluster);
        let data_end = backup.0 * BLOCK_BYTES;
        if data_start_bytes >= data_end || (data_end - data_start_bytes) / cluster == 0 {
            return Err(too_small(
                "no room for a data cluster after the metadata regions",
            ));
        }
        let cluster_count = (data_end - data_start_bytes) / cluster;
        let cbitmap = Region {
            len_blocks: cluster_count.div_ceil(BITMAP_BITS_PER_BLOCK),
            ..cbitmap
        };
        let geometry = Geometry {
            cluster_bytes: o.cluster_bytes,
            max_nodes: o.max_nodes,
            lease,
            journal,
            drc,
            drc_slots_per_node: o.drc_slots_per_node,
            cluster_bitmap: cbitmap,
            inode_bitmap: ibitmap,
            meta_bitmap: mbitmap,
            inode_table,
            inode_count,
            meta,
            data_start_bytes,
            cluster_count,
            backup_superblock: backup,
        };
        Ok(Layout {
            device_bytes,
            geometry,
            options: o.clone(),
        })
    }

    /// The superblock of a fresh volume with this layout.
    pub fn superblock(
        &self,
        volume: VolumeId,
        label: &str,
        created: Timestamp,
        hash_seed: u64,
    ) -> Superblock {
        Superblock {
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            compat: 0,
            ro_compat: 0,
            incompat: 0,
            volume,
            label: label.to_string(),
            device_bytes: self.device_bytes,
            geometry: self.geometry,
            created,
            state: VolumeState::Clean,
            hash_seed,
            held_head: None,
            root: InodeId::ROOT,
            lost_found: LOST_FOUND_INO,
        }
    }
}

/// The current wall-clock time.
pub fn now() -> Timestamp {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        },
        Err(_) => Timestamp::default(),
    }
}

/// 16 random bytes from the thread-local CSPRNG.
fn random_bytes() -> [u8; 16] {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn write(dev: &dyn BlockDevice, what: &'static str, at: u64, buf: &[u8]) -> Result<(), MkfsError> {
    dev.write_at(buf, at, WriteFlags::default())
        .map_err(|source| MkfsError::Write { what, at, source })
}

fn zero(dev: &dyn BlockDevice, what: &'static str, r: Region) -> Result<(), MkfsError> {
    if r.len_blocks == 0 {
        return Ok(());
    }
    dev.write_zeroes(r.start_bytes(), r.len_bytes())
        .or_else(|_| {
            // Devices without write_zeroes: write zeros in 1 MiB pieces.
            let chunk = vec![0u8; 1 << 20];
            let mut off = r.start_bytes();
            while off < r.end_bytes() {
                let n = (r.end_bytes() - off).min(1 << 20);
                let n_usize = usize::try_from(n).expect("at most 1 MiB");
                dev.write_at(&chunk[..n_usize], off, WriteFlags::default())?;
                off += n;
            }
            Ok(())
        })
        .map_err(|source| MkfsError::Write {
            what,
            at: r.start_bytes(),
            source,
        })
}

/// Formats `dev` as an empty csvfs volume: zeroes the lease area, the duplicate-request
/// cache and the inode table, writes the bitmaps, the root directory (inode 1) with
/// lost+found (inode 2), formats the journal, then writes the superblock and its backup.
/// The inode table is zeroed because a create reads a free slot to learn its last
/// generation: a never-used slot must read as zeros (generation 1), so that anything else
/// there is damage. The data region and the metadata-block area are not written (only
/// bitmap-marked blocks are ever read). Checks for existing filesystems are the caller's
/// job (`mkfs.csvfs`).
///
/// `progress` is called with (bytes done, bytes total) as metadata is written.
pub fn mkfs(
    dev: Arc<dyn BlockDevice>,
    options: &MkfsOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MkfsReport, MkfsError> {
    let layout = Layout::compute(dev.size_bytes(), options)?;
    let g = layout.geometry;
    let created = options.created.unwrap_or_else(now);
    let volume = options.volume.unwrap_or_else(|| {
        let mut b = random_bytes();
        b[6] = (b[6] & 0x0f) | 0x40; // UUID version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        VolumeId(b)
    });
    let hash_seed = options.hash_seed.unwrap_or_else(|| {
        let b = random_bytes();
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        u64::from_le_bytes(s)
    });
    let d = dev.as_ref();
    let bitmap_blocks =
        g.cluster_bitmap.len_blocks + g.inode_bitmap.len_blocks + g.meta_bitmap.len_blocks;
    let total = (bitmap_blocks + 8) * BLOCK_BYTES;
    let mut done = 0u64;
    let mut written = 0u64;
    // A path to the LUN lost with acknowledged writes anywhere in the format fails it.
    let mark = d.write_loss_count();

    // 1. Invalidate any old superblock first, so a crash mid-mkfs leaves no volume.
    let zero_block = vec![0u8; super::BLOCK_LEN];
    write(d, "superblock", 0, &zero_block)?;
    write(
        d,
        "backup superblock",
        g.backup_superblock.0 * BLOCK_BYTES,
        &zero_block,
    )?;
    block_client::flush_since(d, mark).map_err(|source| MkfsError::Flush { source })?;

    // 2. Lease area and duplicate-request cache: zeros (never written records).
    zero(d, "lease area", g.lease)?;
    zero(d, "duplicate-request cache", g.drc)?;
    zero(d, "inode table", g.inode_table)?;

    // 3. Bitmaps, with the items of a fresh volume marked used.
    let mut root_block = BlockNo(0);
    for kind in [BitmapKind::Clusters, BitmapKind::Inodes, BitmapKind::Meta] {
        let r = g.bitmap_region(kind);
        let mut batch = Vec::with_capacity(64 * super::BLOCK_LEN);
        let mut batch_start = r.start_bytes();
        for idx in 0..r.len_blocks {
            let mut b = BitmapBlock::empty(kind, idx);
            if idx == 0 {
                match kind {
                    BitmapKind::Clusters => {}
                    BitmapKind::Inodes => {
                        // Slot 0 is reserved; 1 root, 2 lost+found.
                        for i in 0..=2 {
                            b.set(i, true);
                        }
                    }
                    BitmapKind::Meta => {
                        b.set(0, true);
                        root_block = g.meta.start;
                    }
                }
            }
            batch.extend_from_slice(&b.encode());
            if batch.len() >= 64 * super::BLOCK_LEN || idx + 1 == r.len_blocks {
                write(d, "bitmap", batch_start, &batch)?;
                done += batch.len() as u64;
                written += batch.len() as u64;
                batch_start += batch.len() as u64;
                batch.clear();
                progress(done, total);
            }
        }
    }

    // 4. Root directory and lost+found.
    let mut root = Inode::new(InodeId::ROOT, 1, FileKind::Dir, 0o755, created);
    root.uid = options.root_uid;
    root.gid = options.root_gid;
    root.nlink = 3;
    root.parent = Some(InodeId::ROOT);
    root.first_block = Some(root_block);
    root.count = 1;
    root.next_cookie = 4;
    root.meta_blocks = 1;
    let mut lf = Inode::new(LOST_FOUND_INO, 1, FileKind::Dir, 0o700, created);
    lf.nlink = 2;
    lf.parent = Some(InodeId::ROOT);
    lf.next_cookie = 3;
    let dir = DirBlock {
        dir: InodeId::ROOT,
        next: None,
        depth: 0,
        prefix: 0,
        entries: vec![DirBlockEntry {
            name: b"lost+found".to_vec(),
            ino: LOST_FOUND_INO,
            kind: FileKind::Dir,
            cookie: 3,
        }],
    };
    write(
        d,
        "root directory block",
        root_block.0 * BLOCK_BYTES,
        &dir.encode(),
    )?;
    for i in [&root, &lf] {
        write(d, "inode", g.inode_offset(i.ino), &i.encode())?;
    }
    written += BLOCK_BYTES + 2 * INODE_BYTES;

    // 5. Journal.
    journal::Journal::format(
        dev.clone(),
        g.journal.start_bytes(),
        g.journal.len_bytes(),
        Epoch(1),
    )
    .map_err(|source| MkfsError::Journal { source })?;
    block_client::flush_since(d, mark).map_err(|source| MkfsError::Flush { source })?;

    // 6. Superblock and backup, last.
    let sb = layout.superblock(volume, &options.label, created, hash_seed);
    let block = sb.encode_block();
    write(d, "backup superblock", sb.backup_offset(), &block)?;
    write(d, "superblock", 0, &block)?;
    block_client::flush_since(d, mark).map_err(|source| MkfsError::Flush { source })?;
    written += 2 * BLOCK_BYTES;
    progress(total, total);
    tracing::info!(volume = %sb.volume, clusters = g.cluster_count, inodes = g.inode_count - 1, "volume formatted");
    Ok(MkfsReport {
        superblock: sb,
        written_bytes: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_client::testing::MemDevice;

    #[test]
    fn layout_limits() {
        let l = Layout::compute(1 << 40, &MkfsOptions::default()).unwrap();
        assert!(l.geometry.cluster_count > 1_000_000);
        let big = Layout::compute(64 << 40, &MkfsOptions::default()).unwrap();
        assert!(big.geometry.data_bytes() > 63 << 40);
        assert!(Layout::compute(1 << 20, &MkfsOptions::default()).is_err());
        let o = MkfsOptions {
            cluster_bytes: 3000,
            ..MkfsOptions::default()
        };
        assert!(matches!(
            Layout::compute(1 << 30, &o),
            Err(MkfsError::InvalidOption(_))
        ));
    }

    #[test]
    fn mkfs_then_read() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        let o = MkfsOptions {
            label: "hello".into(),
            ..MkfsOptions::default()
        };
        let rep = mkfs(dev.clone(), &o, &mut |_, _| {}).unwrap();
        let r = Superblock::read(dev.as_ref()).unwrap();
        assert_eq!(r.superblock, rep.superblock);
        assert_eq!(r.copy, crate::format::SuperblockCopy::Primary);
        // Damage the primary: the backup is used.
        dev.write_at(&[0xAA; 16], 64, WriteFlags::default())
            .unwrap();
        let r = Superblock::read(dev.as_ref()).unwrap();
        assert_eq!(r.copy, crate::format::SuperblockCopy::Backup);
        assert_eq!(r.superblock.label, "hello");
        // Leftovers from an earlier use of the device do not survive in the inode table.
        let used: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        used.write_at(&vec![0xa5; 64 << 20], 0, WriteFlags::default())
            .unwrap();
        let rep = mkfs(used.clone(), &o, &mut |_, _| {}).unwrap();
        let g = rep.superblock.geometry;
        let mut table = vec![0u8; usize::try_from(g.inode_table.len_bytes()).unwrap()];
        used.read_at(&mut table, g.inode_table.start_bytes())
            .unwrap();
        let live = usize::try_from(3 * INODE_BYTES).unwrap();
        assert!(table[live..].iter().all(|b| *b == 0));
        // Not a volume at all.
        let blank: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
        assert!(matches!(
            Superblock::read(blank.as_ref()),
            Err(crate::format::SuperblockError::NotCsvfs)
        ));
    }
}
