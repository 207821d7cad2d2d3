//! Directory blocks (FORMAT.md §8): extendible hashing over 4 KiB metadata blocks.
//!
//! A directory owns a chain of blocks (`inode.first_block`, then each block's `next`).
//! Each block has a local depth `d` and a prefix `p < 2^d`, and holds exactly the entries
//! whose name hash `h` satisfies `h mod 2^d == p`. The blocks of a directory partition the
//! hash space, so the in-memory lookup table (2^D slots for the largest depth D) is rebuilt
//! from the chain alone and is never stored. A full block splits into two of depth `d + 1`.
//! "." and ".." are not stored: ".." is the directory inode's `parent` field.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::inode::kind_from_code;
use super::{
    check_owner, corrupt, seal, verify_raw, DecodeError, BLOCK_LEN, MAGIC_DIR, MAX_NAME_BYTES,
};
use crate::types::{BlockNo, FileKind, InodeId};

/// Bytes of entry space in a directory block.
pub const DIR_ENTRIES_BYTES: usize = 4032;
/// Fixed part of an entry: ino (8), cookie (8), kind (1), name length (1).
pub const DIR_ENTRY_HEADER_BYTES: usize = 18;
/// Largest local depth of a directory block.
pub const DIR_MAX_DEPTH: u8 = 32;

/// On-disk directory block, 4096 bytes.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawDirBlock {
    /// [`MAGIC_DIR`].
    pub magic: U32,
    /// CRC32 of the block with this field zero.
    pub crc: U32,
    /// The directory that owns the block.
    pub ino: U64,
    /// Next block of the directory's chain, 0 at the end.
    pub next: U64,
    /// Hash prefix: entries here have `hash mod 2^depth == prefix`.
    pub prefix: U64,
    /// Local depth (0..=32).
    pub depth: u8,
    /// Reserved, zero.
    pub reserved0: u8,
    /// Entries in the block.
    pub count: U16,
    /// Bytes of `entries` in use.
    pub used: U16,
    /// Reserved, zero.
    pub reserved: [u8; 26],
    /// Packed entries: ino u64, cookie u64, kind u8, name_len u8, name; then zeros.
    pub entries: [u8; DIR_ENTRIES_BYTES],
}

const _: () = assert!(size_of::<RawDirBlock>() == BLOCK_LEN);

/// One entry of a directory block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirBlockEntry {
    /// Name (1..=255 bytes, no '/' or NUL).
    pub name: Vec<u8>,
    /// Inode it names.
    pub ino: InodeId,
    /// Kind of that inode.
    pub kind: FileKind,
    /// Readdir cookie, unique in the directory, >= 3.
    pub cookie: u64,
}

/// Encoded size of an entry with a name of `name_len` bytes.
pub fn dir_entry_bytes(name_len: usize) -> usize {
    DIR_ENTRY_HEADER_BYTES + name_len
}

/// The directory name hash: FNV-1a over the volume's hash seed and the name, then the
/// splitmix64 finalizer. Stable for the life of the format.
pub fn name_hash(seed: u64, name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(name) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// True when `name` is a valid entry name.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES as usize
        && !name.contains(&b'/')
        && !name.contains(&0)
        && name != b"."
        && name != b".."
}

/// A decoded directory block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirBlock {
    /// Owning directory.
    pub dir: InodeId,
    /// Next block of the chain.
    pub next: Option<BlockNo>,
    /// Local depth.
    pub depth: u8,
    /// Hash prefix.
    pub prefix: u64,
    /// Entries.
    pub entries: Vec<DirBlockEntry>,
}

impl DirBlock {
    /// Bytes of entry space used.
    pub fn used_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| dir_entry_bytes(e.name.len()))
            .sum()
    }

    /// True when an entry with a name of `name_len` bytes still fits.
    pub fn fits(&self, name_len: usize) -> bool {
        self.used_bytes() + dir_entry_bytes(name_len) <= DIR_ENTRIES_BYTES
    }

    /// True when `hash` belongs to this block.
    pub fn owns_hash(&self, hash: u64) -> bool {
        let mask = if self.depth >= 64 {
            u64::MAX
        } else {
            (1u64 << self.depth) - 1
        };
        hash & mask == self.prefix
    }

    /// Encodes into 4096 bytes, CRC set. Entries that do not fit are an error of the
    /// caller; they are cut here.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = <RawDirBlock as zerocopy::FromZeros>::new_zeroed();
        raw.magic = U32::new(MAGIC_DIR);
        raw.ino = U64::new(self.dir.0);
        raw.next = U64::new(self.next.map_or(0, |b| b.0));
        raw.prefix = U64::new(self.prefix);
        raw.depth = self.depth;
        let mut pos = 0usize;
        let mut count = 0u16;
        for e in &self.entries {
            let need = dir_entry_bytes(e.name.len());
            let Ok(name_len) = u8::try_from(e.name.len()) else {
                continue;
            };
            if pos + need > DIR_ENTRIES_BYTES {
                break;
            }
            let d = &mut raw.entries[pos..pos + need];
            d[0..8].copy_from_slice(&e.ino.0.to_le_bytes());
            d[8..16].copy_from_slice(&e.cookie.to_le_bytes());
            d[16] = e.kind as u8;
            d[17] = name_len;
            d[18..].copy_from_slice(&e.name);
            pos += need;
            count += 1;
        }
        raw.count = U16::new(count);
        raw.used = U16::new(u16::try_from(pos).unwrap_or(0));
        let mut out = raw.as_bytes().to_vec();
        seal(&mut out);
        out
    }

    /// Decodes a block read at byte `at` that directory `owner` points to.
    pub fn decode(bytes: &[u8], at: u64, owner: InodeId) -> Result<DirBlock, DecodeError> {
        const WHAT: &str = "directory block";
        let raw: RawDirBlock = verify_raw(WHAT, at, bytes, MAGIC_DIR)?;
        check_owner(WHAT, at, raw.ino.get(), owner)?;
        let depth = raw.depth;
        if depth > DIR_MAX_DEPTH {
            return Err(corrupt(WHAT, at, format!("depth {depth} too large")));
        }
        let prefix = raw.prefix.get();
        if prefix >> depth != 0 {
            return Err(corrupt(WHAT, at, "prefix wider than depth"));
        }
        let used = usize::from(raw.used.get());
        if used > DIR_ENTRIES_BYTES {
            return Err(corrupt(WHAT, at, "used bytes out of range"));
        }
        let area = &raw.entries[..used];
        let mut entries = Vec::with_capacity(usize::from(raw.count.get()));
        let mut pos = 0usize;
        while pos < used {
            let hdr = area
                .get(pos..pos + DIR_ENTRY_HEADER_BYTES)
                .ok_or_else(|| corrupt(WHAT, at, "entry header past used bytes"))?;
            let mut ino8 = [0u8; 8];
            ino8.copy_from_slice(&hdr[0..8]);
            let mut cookie8 = [0u8; 8];
            cookie8.copy_from_slice(&hdr[8..16]);
            let kind = kind_from_code(hdr[16])
                .ok_or_else(|| corrupt(WHAT, at, format!("entry kind {}", hdr[16])))?;
            let name_len = usize::from(hdr[17]);
            let name = area
                .get(pos + DIR_ENTRY_HEADER_BYTES..pos + DIR_ENTRY_HEADER_BYTES + name_len)
                .ok_or_else(|| corrupt(WHAT, at, "entry name past used bytes"))?;
            if !valid_name(name) {
                return Err(corrupt(WHAT, at, "invalid entry name"));
            }
            let ino = u64::from_le_bytes(ino8);
            let cookie = u64::from_le_bytes(cookie8);
            if ino == 0 || cookie < 3 {
                return Err(corrupt(WHAT, at, "entry with inode 0 or cookie < 3"));
            }
            entries.push(DirBlockEntry {
                name: name.to_vec(),
                ino: InodeId(ino),
                kind,
                cookie,
            });
            pos += dir_entry_bytes(name_len);
        }
        if entries.len() != usize::from(raw.count.get()) {
            return Err(corrupt(WHAT, at, "entry count does not match the entries"));
        }
        let next = raw.next.get();
        Ok(DirBlock {
            dir: owner,
            next: (next != 0).then_some(BlockNo(next)),
            depth,
            prefix,
            entries,
        })
    }

    /// Checks that every entry's hash belongs to the block.
    pub fn check_hashes(&self, seed: u64, at: u64) -> Result<(), DecodeError> {
        for e in &self.entries {
            if !self.owns_hash(name_hash(seed, &e.name)) {
                return Err(corrupt(
                    "directory block",
                    at,
                    "entry hashed to the wrong block",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> DirBlock {
        DirBlock {
            dir: InodeId(1),
            next: Some(BlockNo(500)),
            depth: 3,
            prefix: 5,
            entries: vec![
                DirBlockEntry {
                    name: b"hello".to_vec(),
                    ino: InodeId(7),
                    kind: FileKind::File,
                    cookie: 3,
                },
                DirBlockEntry {
                    name: vec![b'x'; 255],
                    ino: InodeId(8),
                    kind: FileKind::Dir,
                    cookie: 99,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let b = block();
        assert_eq!(DirBlock::decode(&b.encode(), 0, InodeId(1)).unwrap(), b);
        let empty = DirBlock {
            dir: InodeId(2),
            next: None,
            depth: 0,
            prefix: 0,
            entries: vec![],
        };
        assert_eq!(
            DirBlock::decode(&empty.encode(), 0, InodeId(2)).unwrap(),
            empty
        );
    }

    #[test]
    fn bad_blocks() {
        let e = block().encode();
        let mut c = e.clone();
        c[80] ^= 1;
        assert!(matches!(
            DirBlock::decode(&c, 0, InodeId(1)),
            Err(DecodeError::BadCrc { .. })
        ));
        let mut m = e.clone();
        m[0] = 0;
        assert!(matches!(
            DirBlock::decode(&m, 0, InodeId(1)),
            Err(DecodeError::BadMagic { .. })
        ));
        assert!(matches!(
            DirBlock::decode(&e, 0, InodeId(2)),
            Err(DecodeError::Corrupt { .. })
        ));
        let mut slash = block();
        slash.entries[0].name = b"a/b".to_vec();
        assert!(matches!(
            DirBlock::decode(&slash.encode(), 0, InodeId(1)),
            Err(DecodeError::Corrupt { .. })
        ));
        let mut wide = block();
        wide.prefix = 8;
        assert!(matches!(
            DirBlock::decode(&wide.encode(), 0, InodeId(1)),
            Err(DecodeError::Corrupt { .. })
        ));
    }

    #[test]
    fn hash_is_stable_and_seeded() {
        assert_eq!(name_hash(0, b"a"), name_hash(0, b"a"));
        assert_ne!(name_hash(0, b"a"), name_hash(1, b"a"));
        assert_ne!(name_hash(0, b"a"), name_hash(0, b"b"));
    }
}
