//! Inodes (FORMAT.md §6): 1024-byte slots in the inode table; slot n is inode n, slot 0 is
//! never used. A slot is empty (all zeros, never used), free (magic set, kind 0, keeps the
//! generation for the next user) or in use.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::extent::check_sorted;
use super::{
    corrupt, is_zeroed, seal, verify_raw, DecodeError, DiskExtent, RawExtent, MAGIC_INODE,
};
use crate::types::{BlockNo, FileKind, InodeId, Timestamp};

/// Encoded size of an inode.
pub const INODE_BYTES: u64 = 1024;
/// Largest `max_nodes` a volume can have (one open counter per node in each inode).
pub const MAX_NODES_LIMIT: u32 = 64;
/// Bytes of the inline area (extents of files, targets of short symlinks).
pub const INLINE_AREA_BYTES: usize = 448;
/// Extents that fit inline.
pub const INLINE_EXTENTS: usize = 18;
/// Longest symlink target stored inline.
pub const INLINE_SYMLINK_BYTES: usize = INLINE_AREA_BYTES;
/// Bytes of encoded xattrs stored inline.
pub const INLINE_XATTR_BYTES: usize = 256;
/// Inode flag: the inode is on the held list (open somewhere or orphaned).
pub const INODE_FLAG_HELD: u8 = 1;

/// On-disk time, 16 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawTime {
    /// Seconds since the epoch.
    pub secs: I64,
    /// Nanoseconds (< 10^9).
    pub nanos: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

impl RawTime {
    fn new(t: Timestamp) -> RawTime {
        RawTime {
            secs: I64::new(t.secs),
            nanos: U32::new(t.nanos),
            reserved: U32::new(0),
        }
    }
    fn get(&self, at: u64) -> Result<Timestamp, DecodeError> {
        let nanos = self.nanos.get();
        if nanos >= 1_000_000_000 {
            return Err(corrupt("inode", at, "nanoseconds out of range"));
        }
        Ok(Timestamp {
            secs: self.secs.get(),
            nanos,
        })
    }
}

/// On-disk inode, 1024 bytes. Byte table in FORMAT.md §6.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawInode {
    /// [`MAGIC_INODE`].
    pub magic: U32,
    /// CRC32 of the 1024 bytes with this field zero.
    pub crc: U32,
    /// The inode's own number (must match its slot).
    pub ino: U64,
    /// Generation, bumped each time the slot is reused.
    pub generation: U64,
    /// [`FileKind`] code; 0 = free slot.
    pub kind: u8,
    /// Flags ([`INODE_FLAG_HELD`]).
    pub flags: u8,
    /// Files: inline extents used. Symlinks: inline target length. Otherwise 0.
    pub inline_len: U16,
    /// Permission bits (07777).
    pub perm: U32,
    /// Owner.
    pub uid: U32,
    /// Group.
    pub gid: U32,
    /// Hard links.
    pub nlink: U32,
    /// Device number.
    pub rdev: U32,
    /// Size in bytes.
    pub size: U64,
    /// Data clusters owned (sum of extent lengths).
    pub alloc_clusters: U64,
    /// Access time.
    pub atime: RawTime,
    /// Modification time.
    pub mtime: RawTime,
    /// Change time.
    pub ctime: RawTime,
    /// Creation time.
    pub crtime: RawTime,
    /// Directories: the parent directory. Otherwise 0.
    pub parent: U64,
    /// Next inode of the held list, 0 at the end.
    pub next_held: U64,
    /// Directories: first directory block. Files: first extent block (when extents are not
    /// inline). Symlinks: first blob block of a long target. 0 = none.
    pub first_block: U64,
    /// Directories: entries (without "." and ".."). Files: extents in extent blocks.
    pub count: U64,
    /// Directories: next readdir cookie to hand out.
    pub next_cookie: U64,
    /// First blob block of the xattrs when they do not fit inline, 0 = none.
    pub xattr_block: U64,
    /// Encoded xattr bytes (inline when <= 256).
    pub xattr_len: U32,
    /// Metadata blocks owned (directory, extent and blob blocks).
    pub meta_blocks: U32,
    /// Opens per node: entry n-1 counts node n's open handles.
    pub opens: [U16; MAX_NODES_LIMIT as usize],
    /// Inline extents (files) or symlink target (symlinks).
    pub area: [u8; INLINE_AREA_BYTES],
    /// Inline xattrs.
    pub xattr_inline: [u8; INLINE_XATTR_BYTES],
    /// Reserved, zero.
    pub reserved: [u8; 8],
}

const _: () = assert!(size_of::<RawInode>() == 1024);
const _: () = assert!(INLINE_EXTENTS * size_of::<RawExtent>() <= INLINE_AREA_BYTES);

/// A validated in-use inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Number.
    pub ino: InodeId,
    /// Generation.
    pub generation: u64,
    /// Kind (never `Invalid`).
    pub kind: FileKind,
    /// On the held list.
    pub held: bool,
    /// Permission bits.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links.
    pub nlink: u32,
    /// Device number.
    pub rdev: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Data clusters owned.
    pub alloc_clusters: u64,
    /// Access time.
    pub atime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// Change time.
    pub ctime: Timestamp,
    /// Creation time.
    pub crtime: Timestamp,
    /// Directories: parent.
    pub parent: Option<InodeId>,
    /// Next on the held list.
    pub next_held: Option<InodeId>,
    /// See [`RawInode::first_block`].
    pub first_block: Option<BlockNo>,
    /// See [`RawInode::count`].
    pub count: u64,
    /// Directories: next cookie.
    pub next_cookie: u64,
    /// First xattr blob block.
    pub xattr_block: Option<BlockNo>,
    /// Encoded xattr length.
    pub xattr_len: u32,
    /// Metadata blocks owned.
    pub meta_blocks: u32,
    /// Open handles per node (index n-1 for node n).
    pub opens: Vec<u16>,
    /// Files: inline extents (empty when they live in extent blocks).
    pub inline_extents: Vec<DiskExtent>,
    /// Symlinks: inline target (empty when it lives in blob blocks).
    pub inline_symlink: Vec<u8>,
    /// Inline xattrs (`xattr_len` bytes when `xattr_len <= 256`).
    pub inline_xattrs: Vec<u8>,
}

/// What an inode-table slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeSlot {
    /// Never written (all zeros).
    Empty,
    /// Freed; a new inode here takes `generation + 1`.
    Free {
        /// Generation of the last inode that used the slot.
        generation: u64,
    },
    /// In use.
    Used(Box<Inode>),
}

/// The on-disk code of a file kind.
pub fn kind_code(k: FileKind) -> u8 {
    k as u8
}

/// The file kind of an on-disk code (`None` for 0 or unknown codes).
pub fn kind_from_code(c: u8) -> Option<FileKind> {
    Some(match c {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        4 => FileKind::CharDev,
        5 => FileKind::BlockDev,
        6 => FileKind::Fifo,
        7 => FileKind::Socket,
        _ => return None,
    })
}

fn opt_block(v: u64) -> Option<BlockNo> {
    (v != 0).then_some(BlockNo(v))
}
fn opt_ino(v: u64) -> Option<InodeId> {
    (v != 0).then_some(InodeId(v))
}

impl Inode {
    /// A new in-use inode with zero size and no blocks.
    pub fn new(ino: InodeId, generation: u64, kind: FileKind, perm: u32, now: Timestamp) -> Inode {
        Inode {
            ino,
            generation,
            kind,
            held: false,
            perm: perm & 0o7777,
            uid: 0,
            gid: 0,
            nlink: 1,
            rdev: 0,
            size_bytes: 0,
            alloc_clusters: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent: None,
            next_held: None,
            first_block: None,
            count: 0,
            next_cookie: 0,
            xattr_block: None,
            xattr_len: 0,
            meta_blocks: 0,
            opens: vec![0; MAX_NODES_LIMIT as usize],
            inline_extents: Vec::new(),
            inline_symlink: Vec::new(),
            inline_xattrs: Vec::new(),
        }
    }

    /// Encodes into 1024 bytes, CRC set. Inline data longer than its area is cut (the store
    /// never produces it).
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = RawInode::new_zeroed_inode();
        raw.magic = U32::new(MAGIC_INODE);
        raw.ino = U64::new(self.ino.0);
        raw.generation = U64::new(self.generation);
        raw.kind = kind_code(self.kind);
        raw.flags = if self.held { INODE_FLAG_HELD } else { 0 };
        raw.perm = U32::new(self.perm & 0o7777);
        raw.uid = U32::new(self.uid);
        raw.gid = U32::new(self.gid);
        raw.nlink = U32::new(self.nlink);
        raw.rdev = U32::new(self.rdev);
        raw.size = U64::new(self.size_bytes);
        raw.alloc_clusters = U64::new(self.alloc_clusters);
        raw.atime = RawTime::new(self.atime);
        raw.mtime = RawTime::new(self.mtime);
        raw.ctime = RawTime::new(self.ctime);
        raw.crtime = RawTime::new(self.crtime);
        raw.parent = U64::new(self.parent.map_or(0, |i| i.0));
        raw.next_held = U64::new(self.next_held.map_or(0, |i| i.0));
        raw.first_block = U64::new(self.first_block.map_or(0, |b| b.0));
        raw.count = U64::new(self.count);
        raw.next_cookie = U64::new(self.next_cookie);
        raw.xattr_block = U64::new(self.xattr_block.map_or(0, |b| b.0));
        raw.xattr_len = U32::new(self.xattr_len);
        raw.meta_blocks = U32::new(self.meta_blocks);
        for (slot, v) in raw.opens.iter_mut().zip(&self.opens) {
            *slot = U16::new(*v);
        }
        match self.kind {
            FileKind::Symlink => {
                let n = self.inline_symlink.len().min(INLINE_AREA_BYTES);
                raw.area[..n].copy_from_slice(&self.inline_symlink[..n]);
                raw.inline_len = U16::new(u16::try_from(n).unwrap_or(0));
            }
            _ => {
                let n = self.inline_extents.len().min(INLINE_EXTENTS);
                for (i, e) in self.inline_extents[..n].iter().enumerate() {
                    raw.area[i * 24..(i + 1) * 24].copy_from_slice(e.to_raw().as_bytes());
                }
                raw.inline_len = U16::new(u16::try_from(n).unwrap_or(0));
            }
        }
        let n = self.inline_xattrs.len().min(INLINE_XATTR_BYTES);
        raw.xattr_inline[..n].copy_from_slice(&self.inline_xattrs[..n]);
        let mut out = raw.as_bytes().to_vec();
        seal(&mut out);
        out
    }

    /// The encoding of a free slot that last held generation `generation`.
    pub fn encode_free(ino: InodeId, generation: u64) -> Vec<u8> {
        let mut raw = RawInode::new_zeroed_inode();
        raw.magic = U32::new(MAGIC_INODE);
        raw.ino = U64::new(ino.0);
        raw.generation = U64::new(generation);
        let mut out = raw.as_bytes().to_vec();
        seal(&mut out);
        out
    }
}

impl RawInode {
    fn new_zeroed_inode() -> RawInode {
        <RawInode as zerocopy::FromZeros>::new_zeroed()
    }
}

impl InodeSlot {
    /// Decodes slot `ino`, read at byte `at`.
    pub fn decode(bytes: &[u8], at: u64, ino: InodeId) -> Result<InodeSlot, DecodeError> {
        const WHAT: &str = "inode";
        if bytes.len() != 1024 {
            return Err(DecodeError::Length {
                what: WHAT,
                at,
                len_bytes: bytes.len() as u64,
            });
        }
        if is_zeroed(bytes) {
            return Ok(InodeSlot::Empty);
        }
        let raw: RawInode = verify_raw(WHAT, at, bytes, MAGIC_INODE)?;
        if raw.ino.get() != ino.0 {
            return Err(corrupt(
                WHAT,
                at,
                format!("slot of {ino} holds ino {}", raw.ino.get()),
            ));
        }
        if raw.kind == 0 {
            return Ok(InodeSlot::Free {
                generation: raw.generation.get(),
            });
        }
        let kind = kind_from_code(raw.kind)
            .ok_or_else(|| corrupt(WHAT, at, format!("invalid kind {}", raw.kind)))?;
        if raw.flags & !INODE_FLAG_HELD != 0 {
            return Err(corrupt(WHAT, at, format!("unknown flags {:#x}", raw.flags)));
        }
        let perm = raw.perm.get();
        if perm & !0o7777 != 0 {
            return Err(corrupt(
                WHAT,
                at,
                format!("mode bits {perm:#o} out of range"),
            ));
        }
        let inline_len = usize::from(raw.inline_len.get());
        let mut inline_extents = Vec::new();
        let mut inline_symlink = Vec::new();
        match kind {
            FileKind::Symlink => {
                if inline_len > INLINE_AREA_BYTES {
                    return Err(corrupt(WHAT, at, "inline symlink length out of range"));
                }
                inline_symlink = raw.area[..inline_len].to_vec();
            }
            _ => {
                if inline_len > INLINE_EXTENTS {
                    return Err(corrupt(WHAT, at, "inline extent count out of range"));
                }
                for i in 0..inline_len {
                    let r = RawExtent::read_from_bytes(&raw.area[i * 24..(i + 1) * 24])
                        .map_err(|_| corrupt(WHAT, at, "inline extent"))?;
                    inline_extents.push(DiskExtent::from_raw(&r, WHAT, at)?);
                }
                check_sorted(&inline_extents, WHAT, at)?;
            }
        }
        let xattr_len = raw.xattr_len.get();
        let inline_xattrs = if xattr_len as usize <= INLINE_XATTR_BYTES {
            raw.xattr_inline[..xattr_len as usize].to_vec()
        } else {
            Vec::new()
        };
        Ok(InodeSlot::Used(Box::new(Inode {
            ino,
            generation: raw.generation.get(),
            kind,
            held: raw.flags & INODE_FLAG_HELD != 0,
            perm,
            uid: raw.uid.get(),
            gid: raw.gid.get(),
            nlink: raw.nlink.get(),
            rdev: raw.rdev.get(),
            size_bytes: raw.size.get(),
            alloc_clusters: raw.alloc_clusters.get(),
            atime: raw.atime.get(at)?,
            mtime: raw.mtime.get(at)?,
            ctime: raw.ctime.get(at)?,
            crtime: raw.crtime.get(at)?,
            parent: opt_ino(raw.parent.get()),
            next_held: opt_ino(raw.next_held.get()),
            first_block: opt_block(raw.first_block.get()),
            count: raw.count.get(),
            next_cookie: raw.next_cookie.get(),
            xattr_block: opt_block(raw.xattr_block.get()),
            xattr_len,
            meta_blocks: raw.meta_blocks.get(),
            opens: raw.opens.iter().map(|v| v.get()).collect(),
            inline_extents,
            inline_symlink,
            inline_xattrs,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ClusterNo;

    fn sample() -> Inode {
        let mut i = Inode::new(
            InodeId(5),
            3,
            FileKind::File,
            0o644,
            Timestamp {
                secs: 10,
                nanos: 20,
            },
        );
        i.size_bytes = 1 << 40;
        i.alloc_clusters = 7;
        i.opens[2] = 4;
        i.held = true;
        i.next_held = Some(InodeId(9));
        i.inline_extents = vec![
            DiskExtent {
                file_cluster: 0,
                lun_cluster: ClusterNo(100),
                len_clusters: 5,
                unwritten: true,
            },
            DiskExtent {
                file_cluster: 9,
                lun_cluster: ClusterNo(3),
                len_clusters: 2,
                unwritten: false,
            },
        ];
        i.inline_xattrs = b"abc".to_vec();
        i.xattr_len = 3;
        i
    }

    #[test]
    fn round_trip_used_free_empty() {
        let i = sample();
        let e = i.encode();
        assert_eq!(
            InodeSlot::decode(&e, 5 * 1024, InodeId(5)).unwrap(),
            InodeSlot::Used(Box::new(i))
        );
        let mut s = Inode::new(
            InodeId(6),
            1,
            FileKind::Symlink,
            0o777,
            Timestamp::default(),
        );
        s.inline_symlink = b"/some/where".to_vec();
        assert_eq!(
            InodeSlot::decode(&s.encode(), 0, InodeId(6)).unwrap(),
            InodeSlot::Used(Box::new(s))
        );
        let f = Inode::encode_free(InodeId(5), 8);
        assert_eq!(
            InodeSlot::decode(&f, 0, InodeId(5)).unwrap(),
            InodeSlot::Free { generation: 8 }
        );
        assert_eq!(
            InodeSlot::decode(&[0; 1024], 0, InodeId(5)).unwrap(),
            InodeSlot::Empty
        );
    }

    #[test]
    fn bad_inodes() {
        let e = sample().encode();
        let mut c = e.clone();
        c[500] ^= 1;
        assert!(matches!(
            InodeSlot::decode(&c, 0, InodeId(5)),
            Err(DecodeError::BadCrc { .. })
        ));
        let mut m = e.clone();
        m[3] = 0;
        assert!(matches!(
            InodeSlot::decode(&m, 0, InodeId(5)),
            Err(DecodeError::BadMagic { .. })
        ));
        assert!(matches!(
            InodeSlot::decode(&e, 0, InodeId(6)),
            Err(DecodeError::Corrupt { .. })
        ));
        let mut k = e.clone();
        k[24] = 99;
        seal(&mut k);
        assert!(matches!(
            InodeSlot::decode(&k, 0, InodeId(5)),
            Err(DecodeError::Corrupt { .. })
        ));
    }
}
