//! The in-memory metadata state of the store and its transaction builder.
//!
//! Every structure is cached decoded; a mutation changes the cache and marks what it
//! touched in the current [`Txn`]; [`Meta::finish_txn`] encodes the touched structures into
//! one physical-redo [`Transaction`] and keeps the bytes in the overlay (committed, not yet
//! home) until the next checkpoint. A failed mutation reloads the state from disk + overlay.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use block_client::{BlockDevice, WriteFlags};

use super::claims::Claims;
use super::extmap;
use crate::format::{
    name_hash, BitmapBlock, BitmapKind, BlobBlock, BlobKind, DecodeError, DirBlock, DirBlockEntry,
    DiskExtent, DrcSlot, ExtentBlock, Geometry, Inode, InodeSlot, Superblock, Transaction,
    TxnWrite, BITMAP_BITS_PER_BLOCK, BLOB_DATA_BYTES, BLOCK_BYTES, BLOCK_LEN, DIR_MAX_DEPTH,
    DRC_SLOT_BYTES, EXTENTS_PER_BLOCK, INLINE_EXTENTS, INLINE_SYMLINK_BYTES, INLINE_XATTR_BYTES,
    INODE_BYTES,
};
use crate::types::{BlockNo, ClusterNo, FsError, InodeId, NodeId, RequestId};

/// Words of a bitmap block (32512 bits / 64).
const WORDS_PER_BLOCK: usize = 508;

pub(crate) fn io_err(what: &str, e: impl std::fmt::Display) -> FsError {
    FsError::Io(format!("{what}: {e}"))
}

pub(crate) fn corrupt_err(e: &DecodeError) -> FsError {
    FsError::Corrupt(e.to_string())
}

/// An allocation bitmap held as words.
#[derive(Debug)]
pub(crate) struct Bitmap {
    pub kind: BitmapKind,
    pub words: Vec<u64>,
    pub bits: u64,
    pub free: u64,
    pub rotor: u64,
}

impl Bitmap {
    pub fn get(&self, i: u64) -> bool {
        let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
        self.words.get(w).is_some_and(|x| x & (1 << (i % 64)) != 0)
    }

    fn set_raw(&mut self, i: u64, v: bool) {
        let Ok(w) = usize::try_from(i / 64) else {
            return;
        };
        let Some(x) = self.words.get_mut(w) else {
            return;
        };
        let m = 1u64 << (i % 64);
        let was = *x & m != 0;
        if v && !was {
            *x |= m;
            self.free -= 1;
        } else if !v && was {
            *x &= !m;
            self.free += 1;
        }
    }

    /// First free bit at or after `from` (wrapping), if any.
    fn find_free(&self, from: u64) -> Option<u64> {
        if self.free == 0 || self.bits == 0 {
            return None;
        }
        let nwords = self.bits.div_ceil(64);
        let start = from % self.bits;
        let sw = start / 64;
        for k in 0..=nwords {
            let wi = (sw + k) % nwords;
            let w = self.words[usize::try_from(wi).ok()?];
            if w == u64::MAX {
                continue;
            }
            let mut bit = 0;
            if k == 0 {
                bit = start % 64;
            }
            while bit < 64 {
                let i = wi * 64 + bit;
                if i >= self.bits {
                    break;
                }
                if w & (1 << bit) == 0 {
                    return Some(i);
                }
                bit += 1;
            }
        }
        None
    }

    /// Length of the free run starting at `i`, at most `max`.
    fn run_len(&self, i: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max && i + n < self.bits && !self.get(i + n) {
            n += 1;
        }
        n
    }

    fn encode_block(&self, index: u64) -> Vec<u8> {
        let mut b = BitmapBlock::empty(self.kind, index);
        let first = usize::try_from(index)
            .unwrap_or(usize::MAX)
            .saturating_mul(WORDS_PER_BLOCK);
        for k in 0..WORDS_PER_BLOCK {
            let mut w = self.words.get(first + k).copied().unwrap_or(0);
            // Bits past the item count are in use in memory (never allocated) but zero on disk.
            let item0 = (first + k) as u64 * 64;
            if item0 >= self.bits {
                w = 0;
            } else if self.bits - item0 < 64 {
                w &= (1u64 << (self.bits - item0)) - 1;
            }
            b.bits[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b.encode()
    }
}

/// A leaf of a file's extent map: an extent block, or the inline list (`block: None`).
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub block: Option<BlockNo>,
    pub extents: Vec<DiskExtent>,
    pub dirty: bool,
    /// The `next` pointer last written for this block.
    pub written_next: Option<BlockNo>,
}

/// A cached inode with its extent map, xattrs and symlink target.
#[derive(Debug, Clone)]
pub(crate) struct CInode {
    pub inode: Inode,
    pub leaves: Vec<Leaf>,
    pub symlink: Vec<u8>,
    pub symlink_blocks: Vec<BlockNo>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub xattr_blocks: Vec<BlockNo>,
}

impl CInode {
    pub fn extents(&self) -> Vec<DiskExtent> {
        self.leaves
            .iter()
            .flat_map(|l| l.extents.iter().copied())
            .collect()
    }
    pub fn extent_count(&self) -> usize {
        self.leaves.iter().map(|l| l.extents.len()).sum()
    }
}

/// One block of a directory.
#[derive(Debug, Clone)]
pub(crate) struct DirBlk {
    pub block: BlockNo,
    pub depth: u8,
    pub prefix: u64,
    pub next: Option<BlockNo>,
    pub entries: Vec<DirBlockEntry>,
    pub dirty: bool,
}

/// A loaded directory: its blocks and the rebuilt extendible-hash table.
#[derive(Debug, Clone, Default)]
pub(crate) struct DirState {
    pub blocks: Vec<DirBlk>,
    pub table: Vec<u32>,
    pub global_depth: u8,
    pub by_cookie: BTreeMap<u64, Vec<u8>>,
}

/// What the current transaction touched.
#[derive(Debug, Default)]
pub(crate) struct Txn {
    pub inodes: BTreeSet<InodeId>,
    pub dirs: BTreeSet<InodeId>,
    pub bitmaps: BTreeSet<(u8, u64)>,
    pub raw: BTreeMap<u64, Vec<u8>>,
    pub sb: bool,
    pub mutated: bool,
}

/// Counters for tests and monitoring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Metadata reads from the device (cache misses).
    pub device_reads: u64,
    /// Directory blocks examined by name lookups.
    pub dir_blocks_examined: u64,
    /// Name lookups done.
    pub dir_lookups: u64,
    /// Transactions submitted to the journal.
    pub transactions: u64,
    /// Bytes of the last transaction's payload.
    pub last_txn_bytes: u64,
    /// Largest transaction payload so far.
    pub max_txn_bytes: u64,
    /// Checkpoints done.
    pub checkpoints: u64,
    /// Journal records replayed when the store was opened.
    pub replayed_records: u64,
}

/// The whole in-memory state, guarded by the store lock.
#[derive(Debug)]
pub(crate) struct Meta {
    pub dev: Arc<dyn BlockDevice>,
    pub sb: Superblock,
    pub g: Geometry,
    pub clusters: Bitmap,
    pub inode_map: Bitmap,
    pub meta_map: Bitmap,
    pub inodes: HashMap<InodeId, CInode>,
    pub dirs: HashMap<InodeId, DirState>,
    /// Committed bytes not yet written home, by byte offset.
    pub overlay: HashMap<u64, Vec<u8>>,
    /// The held list in memory: ino -> previous on the list.
    pub held_prev: HashMap<InodeId, Option<InodeId>>,
    pub drc: HashMap<(NodeId, u32), DrcSlot>,
    /// Free inode slots whose next generation is known (the slot's last generation + 1),
    /// so a create does not read the slot from the LUN. An entry exists only while the
    /// slot is free in the inode bitmap: allocation removes it, freeing puts it back.
    /// Filled by freeing and by [`Meta::next_generation`]'s batched reads.
    pub slot_gens: HashMap<InodeId, u64>,
    /// While set, [`Meta::read`] refuses to go to the device (it sets `missed` and fails):
    /// used to answer read-only requests without blocking when everything is cached.
    pub cached_only: bool,
    /// A read was refused because of `cached_only`.
    pub missed: bool,
    pub txn: Txn,
    pub stats: StoreStats,
    /// Who may convert which unwritten cluster; memory only, kept across a rollback.
    pub claims: Claims,
    /// Open handles of nodes on protocol version 4 or later, by inode and node index
    /// (node id − 1). Memory only, kept across a rollback: after a takeover the nodes
    /// re-announce theirs (`Reopen`). Counts of older nodes are on disk (`Inode::opens`).
    pub opens: HashMap<InodeId, Vec<u32>>,
    /// Recent requests that changed [`Meta::opens`], per node, so a resent one counts once.
    pub open_ids: HashMap<NodeId, RecentIds>,
    /// Nodes whose `Reopen` this coordinator counted: a node re-announces once per
    /// takeover, so a second one (another request id) is ignored.
    pub reopened: std::collections::HashSet<NodeId>,
    /// While set, a dead inode that nobody is known to hold stays held instead of being
    /// freed: after a takeover the nodes have not re-announced their opens yet. Cleared by
    /// [`Meta::reap_orphans`].
    pub orphan_grace: bool,
}

/// The most recent request ids of one node, bounded.
#[derive(Debug, Default)]
pub(crate) struct RecentIds {
    set: std::collections::HashSet<RequestId>,
    order: std::collections::VecDeque<RequestId>,
}

/// Request ids remembered per node in [`Meta::open_ids`].
const RECENT_OPEN_IDS: usize = 4096;

impl RecentIds {
    /// Records `id`; false if it was recorded already.
    pub fn insert(&mut self, id: RequestId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_OPEN_IDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    /// True if `id` is recorded.
    pub fn contains(&self, id: RequestId) -> bool {
        self.set.contains(&id)
    }

    /// Forgets `id` (its request failed, so a resend must run).
    pub fn remove(&mut self, id: RequestId) {
        self.set.remove(&id);
    }
}

/// Inode slots read at once when a create finds its slot's generation unknown.
const SLOT_READ_BATCH: u64 = 64;

/// Most entries kept in [`Meta::slot_gens`]; past it, freed slots are read again later.
pub(crate) const MAX_CACHED_SLOT_GENS: usize = 1 << 16;

fn u(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Meta {
    /// Reads `len` bytes at `at`, overlay first.
    pub fn read(&mut self, at: u64, len: usize) -> Result<Vec<u8>, FsError> {
        if let Some(b) = self.overlay.get(&at) {
            if b.len() == len {
                return Ok(b.clone());
            }
        }
        if self.cached_only {
            self.missed = true;
            return Err(FsError::Io(format!("metadata at byte {at} is not cached")));
        }
        let mut buf = vec![0u8; len];
        self.stats.device_reads += 1;
        self.dev
            .read_at(&mut buf, at)
            .map_err(|e| io_err(&format!("read metadata at byte {at}"), e))?;
        Ok(buf)
    }

    /// Runs `f` with device reads refused: `None` if it needed one (what it changed in
    /// memory before the refusal is the caller's to judge; reads change nothing).
    pub fn without_device_reads<T>(&mut self, f: impl FnOnce(&mut Meta) -> T) -> Option<T> {
        self.cached_only = true;
        self.missed = false;
        let r = f(self);
        self.cached_only = false;
        if std::mem::take(&mut self.missed) {
            return None;
        }
        Some(r)
    }

    /// Records that `node`'s request `id` changed the in-memory open counts; false if it
    /// had already (a resend).
    pub fn note_open_id(&mut self, node: NodeId, id: RequestId) -> bool {
        self.open_ids.entry(node).or_default().insert(id)
    }

    /// True if `node`'s request `id` changed the in-memory open counts already.
    pub fn open_id_seen(&self, node: NodeId, id: RequestId) -> bool {
        self.open_ids.get(&node).is_some_and(|ids| ids.contains(id))
    }

    /// Loads superblock-derived state (bitmaps, DRC, held list) from disk + overlay.
    pub fn load(
        dev: Arc<dyn BlockDevice>,
        sb: Superblock,
        overlay: HashMap<u64, Vec<u8>>,
    ) -> Result<Meta, FsError> {
        let g = sb.geometry;
        let empty = |kind| Bitmap {
            kind,
            words: Vec::new(),
            bits: 0,
            free: 0,
            rotor: 0,
        };
        let mut m = Meta {
            dev,
            sb,
            g,
            clusters: empty(BitmapKind::Clusters),
            inode_map: empty(BitmapKind::Inodes),
            meta_map: empty(BitmapKind::Meta),
            inodes: HashMap::new(),
            dirs: HashMap::new(),
            overlay,
            held_prev: HashMap::new(),
            drc: HashMap::new(),
            slot_gens: HashMap::new(),
            cached_only: false,
            missed: false,
            txn: Txn::default(),
            stats: StoreStats::default(),
            claims: Claims::default(),
            opens: HashMap::new(),
            open_ids: HashMap::new(),
            reopened: std::collections::HashSet::new(),
            orphan_grace: false,
        };
        // The superblock itself may be newer in the overlay.
        if let Some(b) = m.overlay.get(&0).cloned() {
            m.sb = Superblock::decode(&b, 0).map_err(|e| corrupt_err(&e))?;
        }
        for kind in [BitmapKind::Clusters, BitmapKind::Inodes, BitmapKind::Meta] {
            let bm = m.load_bitmap(kind)?;
            match kind {
                BitmapKind::Clusters => m.clusters = bm,
                BitmapKind::Inodes => m.inode_map = bm,
                BitmapKind::Meta => m.meta_map = bm,
            }
        }
        m.load_drc()?;
        m.load_held()?;
        Ok(m)
    }

    fn load_bitmap(&mut self, kind: BitmapKind) -> Result<Bitmap, FsError> {
        let r = self.g.bitmap_region(kind);
        let bits = self.g.bitmap_bits(kind);
        let mut words = Vec::with_capacity(u(r.len_blocks) * WORDS_PER_BLOCK);
        for idx in 0..r.len_blocks {
            let at = r.start_bytes() + idx * BLOCK_BYTES;
            let raw = self.read(at, BLOCK_LEN)?;
            let b = BitmapBlock::decode(&raw, at, kind, idx).map_err(|e| corrupt_err(&e))?;
            for k in 0..WORDS_PER_BLOCK {
                let mut w = [0u8; 8];
                w.copy_from_slice(&b.bits[k * 8..k * 8 + 8]);
                words.push(u64::from_le_bytes(w));
            }
        }
        // Bits past the end count as used so they are never allocated.
        let nwords = u(bits.div_ceil(64));
        words.truncate(nwords);
        if let Some(last) = words.last_mut() {
            if bits % 64 != 0 {
                *last |= !((1u64 << (bits % 64)) - 1);
            }
        }
        let used: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let pad = nwords as u64 * 64 - bits;
        Ok(Bitmap {
            kind,
            words,
            bits,
            free: bits - (used - pad),
            rotor: 0,
        })
    }

    fn load_drc(&mut self) -> Result<(), FsError> {
        let total = u64::from(self.g.max_nodes) * u64::from(self.g.drc_slots_per_node);
        let bytes_len = total * DRC_SLOT_BYTES;
        let start = self.g.drc.start_bytes();
        let mut buf = vec![0u8; u(bytes_len)];
        self.stats.device_reads += 1;
        self.dev
            .read_at(&mut buf, start)
            .map_err(|e| io_err("read duplicate-request cache", e))?;
        for i in 0..total {
            let at = start + i * DRC_SLOT_BYTES;
            let slot_bytes = match self.overlay.get(&at) {
                Some(b) => b.clone(),
                None => buf[u(i * DRC_SLOT_BYTES)..u((i + 1) * DRC_SLOT_BYTES)].to_vec(),
            };
            match DrcSlot::decode(&slot_bytes, at) {
                Ok(Some(s)) => {
                    let node = NodeId(
                        u32::try_from(i / u64::from(self.g.drc_slots_per_node) + 1).unwrap_or(0),
                    );
                    let slot = u32::try_from(i % u64::from(self.g.drc_slots_per_node)).unwrap_or(0);
                    if s.node == node {
                        self.drc.insert((node, slot), s);
                    }
                }
                Ok(None) => {}
                // A damaged cache slot only loses duplicate detection for one request.
                Err(e) => tracing::warn!(error = %e, "ignoring damaged duplicate-request slot"),
            }
        }
        Ok(())
    }

    fn load_held(&mut self) -> Result<(), FsError> {
        let mut prev = None;
        let mut cur = self.sb.held_head;
        let mut n = 0u64;
        while let Some(ino) = cur {
            n += 1;
            if n > self.g.inode_count || self.held_prev.contains_key(&ino) {
                return Err(FsError::Corrupt("held list has a cycle".into()));
            }
            let next = self.inode(ino)?.inode.next_held;
            self.held_prev.insert(ino, prev);
            prev = Some(ino);
            cur = next;
        }
        Ok(())
    }

    // ----- inodes -----

    /// The cached inode, loaded if needed. `Stale` if the inode is not in use.
    pub fn inode(&mut self, ino: InodeId) -> Result<&mut CInode, FsError> {
        if !self.inodes.contains_key(&ino) {
            let c = self.load_inode(ino)?;
            self.inodes.insert(ino, c);
        }
        self.inodes.get_mut(&ino).ok_or(FsError::Stale)
    }

    fn load_inode(&mut self, ino: InodeId) -> Result<CInode, FsError> {
        if !self.g.inode_valid(ino) || !self.inode_map.get(ino.0) {
            return Err(FsError::Stale);
        }
        let at = self.g.inode_offset(ino);
        let raw = self.read(at, u(INODE_BYTES))?;
        let inode = match InodeSlot::decode(&raw, at, ino).map_err(|e| corrupt_err(&e))? {
            InodeSlot::Used(i) => *i,
            _ => {
                return Err(FsError::Corrupt(format!(
                    "{ino} is marked in use but its slot is free"
                )))
            }
        };
        let mut c = CInode {
            leaves: Vec::new(),
            symlink: Vec::new(),
            symlink_blocks: Vec::new(),
            xattrs: BTreeMap::new(),
            xattr_blocks: Vec::new(),
            inode,
        };
        let limit = u64::from(c.inode.meta_blocks) + 1;
        match c.inode.kind {
            crate::types::FileKind::Dir => {}
            crate::types::FileKind::Symlink => {
                if let Some(first) = c.inode.first_block {
                    let (data, blocks) = self.read_blob(ino, first, BlobKind::Symlink, limit)?;
                    c.symlink = data;
                    c.symlink_blocks = blocks;
                } else {
                    c.symlink = c.inode.inline_symlink.clone();
                }
            }
            _ => {
                if let Some(first) = c.inode.first_block {
                    let mut cur = Some(first);
                    let mut n = 0u64;
                    let mut seen = std::collections::HashSet::new();
                    while let Some(b) = cur {
                        n += 1;
                        if n > limit || !self.g.meta_valid(b) || !seen.insert(b) {
                            return Err(FsError::Corrupt(format!(
                                "extent chain of {ino} is broken"
                            )));
                        }
                        let at = b.0 * BLOCK_BYTES;
                        let raw = self.read(at, BLOCK_LEN)?;
                        let eb = ExtentBlock::decode(&raw, at, ino).map_err(|e| corrupt_err(&e))?;
                        cur = eb.next;
                        c.leaves.push(Leaf {
                            block: Some(b),
                            extents: eb.extents,
                            dirty: false,
                            written_next: eb.next,
                        });
                    }
                } else if !c.inode.inline_extents.is_empty() {
                    c.leaves.push(Leaf {
                        block: None,
                        extents: c.inode.inline_extents.clone(),
                        dirty: false,
                        written_next: None,
                    });
                }
                let all = c.extents();
                crate::format::check_sorted(&all, "extent map", at).map_err(|e| corrupt_err(&e))?;
                if all.iter().any(|e| !e.fits(&self.g)) {
                    return Err(FsError::Corrupt(format!(
                        "{ino} has an extent past the volume"
                    )));
                }
            }
        }
        if let Some(first) = c.inode.xattr_block {
            let (data, blocks) = self.read_blob(ino, first, BlobKind::Xattrs, limit)?;
            c.xattrs =
                decode_xattrs(&data).ok_or_else(|| FsError::Corrupt(format!("xattrs of {ino}")))?;
            c.xattr_blocks = blocks;
        } else {
            c.xattrs = decode_xattrs(&c.inode.inline_xattrs)
                .ok_or_else(|| FsError::Corrupt(format!("xattrs of {ino}")))?;
        }
        Ok(c)
    }

    fn read_blob(
        &mut self,
        ino: InodeId,
        first: BlockNo,
        kind: BlobKind,
        limit: u64,
    ) -> Result<(Vec<u8>, Vec<BlockNo>), FsError> {
        let mut data = Vec::new();
        let mut blocks = Vec::new();
        let mut cur = Some(first);
        while let Some(b) = cur {
            if blocks.len() as u64 >= limit || !self.g.meta_valid(b) || blocks.contains(&b) {
                return Err(FsError::Corrupt(format!("blob chain of {ino} is broken")));
            }
            let at = b.0 * BLOCK_BYTES;
            let raw = self.read(at, BLOCK_LEN)?;
            let bb = BlobBlock::decode(&raw, at, ino, kind).map_err(|e| corrupt_err(&e))?;
            data.extend_from_slice(&bb.data);
            blocks.push(b);
            cur = bb.next;
        }
        Ok((data, blocks))
    }

    /// Marks an inode as changed in this transaction.
    pub fn touch(&mut self, ino: InodeId) {
        self.txn.mutated = true;
        self.txn.inodes.insert(ino);
    }

    // ----- bitmaps -----

    fn bitmap_mut(&mut self, kind: BitmapKind) -> &mut Bitmap {
        match kind {
            BitmapKind::Clusters => &mut self.clusters,
            BitmapKind::Inodes => &mut self.inode_map,
            BitmapKind::Meta => &mut self.meta_map,
        }
    }

    /// Sets or clears a bit and marks its block dirty.
    pub fn set_bit(&mut self, kind: BitmapKind, i: u64, v: bool) {
        self.txn.mutated = true;
        let code = match kind {
            BitmapKind::Clusters => 1,
            BitmapKind::Inodes => 2,
            BitmapKind::Meta => 3,
        };
        self.txn.bitmaps.insert((code, i / BITMAP_BITS_PER_BLOCK));
        self.bitmap_mut(kind).set_raw(i, v);
    }

    /// Allocates a free inode slot.
    pub fn alloc_inode_slot(&mut self) -> Result<InodeId, FsError> {
        let from = self.inode_map.rotor;
        let i = self.inode_map.find_free(from).ok_or(FsError::NoSpace)?;
        self.set_bit(BitmapKind::Inodes, i, true);
        self.inode_map.rotor = i + 1;
        Ok(InodeId(i))
    }

    /// The generation a new inode in the just-allocated slot `ino` takes: one more than
    /// the slot's last. Unknown slots are read from the LUN (overlay first) together with
    /// the next free slots after them, whose generations are kept for later creates. A slot
    /// that cannot be read or does not decode fails the create (a guessed generation could
    /// repeat an (inode, generation) pair that a node still holds).
    pub fn next_generation(&mut self, ino: InodeId) -> Result<u64, FsError> {
        if let Some(generation) = self.slot_gens.remove(&ino) {
            return Ok(generation);
        }
        let slot_bytes = usize::try_from(INODE_BYTES).unwrap_or(1024);
        let count = SLOT_READ_BATCH
            .min(self.g.inode_count.saturating_sub(ino.0))
            .max(1);
        let at = self.g.inode_offset(ino);
        let mut buf = vec![0u8; slot_bytes * u(count)];
        self.stats.device_reads += 1;
        self.dev
            .read_at(&mut buf, at)
            .map_err(|e| io_err(&format!("read inode slot of {ino} at byte {at}"), e))?;
        let mut own = None;
        for (k, chunk) in (0u64..).zip(buf.chunks_exact(slot_bytes)) {
            let slot = InodeId(ino.0 + k);
            if k > 0
                && (self.inode_map.get(slot.0)
                    || self.slot_gens.contains_key(&slot)
                    || self.slot_gens.len() >= MAX_CACHED_SLOT_GENS)
            {
                continue;
            }
            let slot_at = self.g.inode_offset(slot);
            let bytes = match self.overlay.get(&slot_at) {
                Some(b) if b.len() == slot_bytes => b.as_slice(),
                _ => chunk,
            };
            let generation = match InodeSlot::decode(bytes, slot_at, slot) {
                Ok(InodeSlot::Empty) => Ok(1),
                Ok(InodeSlot::Free { generation }) => Ok(generation + 1),
                Ok(InodeSlot::Used(i)) => Ok(i.generation + 1),
                Err(e) => Err(corrupt_err(&e)),
            };
            if k == 0 {
                own = Some(generation);
            } else if let Ok(g) = generation {
                self.slot_gens.insert(slot, g);
            }
        }
        own.unwrap_or_else(|| Err(FsError::Io(format!("inode slot of {ino} not read"))))
    }

    /// Allocates one metadata block.
    pub fn alloc_meta(&mut self) -> Result<BlockNo, FsError> {
        let from = self.meta_map.rotor;
        let i = self.meta_map.find_free(from).ok_or(FsError::NoSpace)?;
        self.set_bit(BitmapKind::Meta, i, true);
        self.meta_map.rotor = i + 1;
        Ok(BlockNo(self.g.meta.start.0 + i))
    }

    /// Frees one metadata block.
    pub fn free_meta(&mut self, b: BlockNo) {
        if let Some(i) = self.g.meta_index(b) {
            self.set_bit(BitmapKind::Meta, i, false);
        }
    }

    /// Allocates a run of up to `want` clusters, preferring to start at `goal`.
    pub fn alloc_clusters(&mut self, goal: Option<u64>, want: u64) -> Option<(ClusterNo, u64)> {
        if want == 0 {
            return None;
        }
        let want = want.min(u64::from(u32::MAX));
        let bm = &self.clusters;
        let mut pick = None;
        if let Some(gl) = goal {
            if gl < bm.bits && !bm.get(gl) {
                pick = Some((gl, bm.run_len(gl, want)));
            }
        }
        if pick.is_none() {
            // First run of the wanted length from the rotor; else the longest seen.
            let mut best: Option<(u64, u64)> = None;
            let mut pos = bm.rotor;
            let mut scanned = 0u64;
            while scanned < bm.bits {
                let Some(i) = bm.find_free(pos) else { break };
                let dist = if i >= pos { i - pos } else { bm.bits - pos + i };
                scanned += dist;
                if scanned >= bm.bits {
                    break;
                }
                let n = bm.run_len(i, want);
                if best.is_none_or(|(_, bn)| n > bn) {
                    best = Some((i, n));
                }
                if n >= want {
                    break;
                }
                scanned += n.max(1);
                pos = (i + n.max(1)) % bm.bits;
            }
            pick = best;
        }
        let (start, n) = pick?;
        if n == 0 {
            return None;
        }
        for c in start..start + n {
            self.set_bit(BitmapKind::Clusters, c, true);
        }
        self.clusters.rotor = start + n;
        Some((ClusterNo(start), n))
    }

    /// Frees a run of clusters.
    pub fn free_clusters(&mut self, start: ClusterNo, n: u64) {
        for c in start.0..start.0 + n {
            self.set_bit(BitmapKind::Clusters, c, false);
        }
    }

    // ----- directories -----

    /// The loaded directory state of `dir` (which must be a directory).
    pub fn dir(&mut self, dir: InodeId) -> Result<&mut DirState, FsError> {
        if !self.dirs.contains_key(&dir) {
            let d = self.load_dir(dir)?;
            self.dirs.insert(dir, d);
        }
        self.dirs.get_mut(&dir).ok_or(FsError::Stale)
    }

    fn load_dir(&mut self, dir: InodeId) -> Result<DirState, FsError> {
        let (first, limit, count) = {
            let c = self.inode(dir)?;
            if c.inode.kind != crate::types::FileKind::Dir {
                return Err(FsError::NotDir);
            }
            (
                c.inode.first_block,
                u64::from(c.inode.meta_blocks) + 1,
                c.inode.count,
            )
        };
        let seed = self.sb.hash_seed;
        let mut st = DirState::default();
        let mut cur = first;
        let mut seen = std::collections::HashSet::new();
        while let Some(b) = cur {
            if st.blocks.len() as u64 >= limit || !self.g.meta_valid(b) || !seen.insert(b) {
                return Err(FsError::Corrupt(format!(
                    "directory chain of {dir} is broken"
                )));
            }
            let at = b.0 * BLOCK_BYTES;
            let raw = self.read(at, BLOCK_LEN)?;
            let db = DirBlock::decode(&raw, at, dir).map_err(|e| corrupt_err(&e))?;
            db.check_hashes(seed, at).map_err(|e| corrupt_err(&e))?;
            for e in &db.entries {
                if st.by_cookie.insert(e.cookie, e.name.clone()).is_some() {
                    return Err(FsError::Corrupt(format!("duplicate cookie in {dir}")));
                }
            }
            cur = db.next;
            st.blocks.push(DirBlk {
                block: b,
                depth: db.depth,
                prefix: db.prefix,
                next: db.next,
                entries: db.entries,
                dirty: false,
            });
        }
        if st.by_cookie.len() as u64 != count {
            return Err(FsError::Corrupt(format!(
                "{dir}: entry count does not match its blocks"
            )));
        }
        st.rebuild_table()
            .map_err(|r| FsError::Corrupt(format!("{dir}: {r}")))?;
        Ok(st)
    }

    // ----- transaction -----

    /// Encodes everything the transaction touched. Returns `None` if nothing changed. The
    /// caller puts the writes into the overlay once the journal accepted them.
    pub fn finish_txn(&mut self) -> Result<Option<Transaction>, FsError> {
        let txn = std::mem::take(&mut self.txn);
        let mut writes: BTreeMap<u64, Vec<u8>> = txn.raw;
        // Files: normalize extent storage and write dirty leaves.
        for ino in &txn.inodes {
            if self.inodes.contains_key(ino) {
                self.store_extents(*ino, &mut writes)?;
            }
        }
        // Dirs may allocate nothing here; encode dirty blocks.
        for d in &txn.dirs {
            if let Some(st) = self.dirs.get_mut(d) {
                for b in st.blocks.iter_mut().filter(|b| b.dirty) {
                    // The entries are lent to the encoder, not copied (a full block holds
                    // over a hundred names).
                    let db = DirBlock {
                        dir: *d,
                        next: b.next,
                        depth: b.depth,
                        prefix: b.prefix,
                        entries: std::mem::take(&mut b.entries),
                    };
                    writes.insert(b.block.0 * BLOCK_BYTES, db.encode());
                    b.entries = db.entries;
                    b.dirty = false;
                }
            }
        }
        for ino in &txn.inodes {
            if let Some(c) = self.inodes.get(ino) {
                writes.insert(self.g.inode_offset(*ino), c.inode.encode());
            }
        }
        for (code, idx) in &self
            .txn
            .bitmaps
            .clone()
            .union(&txn.bitmaps)
            .copied()
            .collect::<BTreeSet<_>>()
        {
            let (bm, region) = match code {
                1 => (&self.clusters, self.g.cluster_bitmap),
                2 => (&self.inode_map, self.g.inode_bitmap),
                _ => (&self.meta_map, self.g.meta_bitmap),
            };
            writes.insert(
                region.start_bytes() + idx * BLOCK_BYTES,
                bm.encode_block(*idx),
            );
        }
        self.txn = Txn::default();
        if txn.sb || writes.contains_key(&0) {
            // Both copies, so the backup never holds a stale held list or state.
            let block = self.sb.encode_block();
            writes.insert(self.sb.backup_offset(), block.clone());
            writes.insert(0, block);
        }
        if writes.is_empty() {
            return Ok(None);
        }
        let mut t = Transaction::default();
        for (offset_bytes, bytes) in writes {
            t.writes.push(TxnWrite {
                offset_bytes,
                bytes,
            });
        }
        Ok(Some(t))
    }

    /// Puts a file's extents inline or in extent blocks and encodes the dirty leaves.
    fn store_extents(
        &mut self,
        ino: InodeId,
        writes: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result<(), FsError> {
        let Some(c) = self.inodes.get(&ino) else {
            return Ok(());
        };
        if matches!(
            c.inode.kind,
            crate::types::FileKind::Dir | crate::types::FileKind::Symlink
        ) {
            return Ok(());
        }
        let total = c.extent_count();
        let mut leaves = c.leaves.clone();
        let chain = leaves.iter().any(|l| l.block.is_some());
        if total <= INLINE_EXTENTS {
            if chain || leaves.len() > 1 {
                for l in &leaves {
                    if let Some(b) = l.block {
                        self.free_meta(b);
                    }
                }
                let all: Vec<DiskExtent> = leaves.iter().flat_map(|l| l.extents.clone()).collect();
                leaves = if all.is_empty() {
                    Vec::new()
                } else {
                    vec![Leaf {
                        block: None,
                        extents: all,
                        dirty: true,
                        written_next: None,
                    }]
                };
            }
            leaves.retain(|l| !l.extents.is_empty());
            let c = self.inodes.get_mut(&ino).ok_or(FsError::Stale)?;
            c.inode.inline_extents = leaves
                .first()
                .map(|l| l.extents.clone())
                .unwrap_or_default();
            c.inode.first_block = None;
            c.inode.count = 0;
            for l in &mut leaves {
                l.dirty = false;
            }
            c.leaves = leaves;
        } else {
            // Chain mode: every non-empty leaf gets a block; leaves hold <= 168 extents.
            let mut out: Vec<Leaf> = Vec::new();
            for l in leaves {
                if l.extents.is_empty() {
                    if let Some(b) = l.block {
                        self.free_meta(b);
                    }
                    continue;
                }
                if l.extents.len() > EXTENTS_PER_BLOCK {
                    let first_block = l.block;
                    for (k, chunk) in l.extents.chunks(EXTENTS_PER_BLOCK / 2).enumerate() {
                        out.push(Leaf {
                            block: if k == 0 { first_block } else { None },
                            extents: chunk.to_vec(),
                            dirty: true,
                            written_next: None,
                        });
                    }
                } else {
                    out.push(l);
                }
            }
            for l in out.iter_mut() {
                if l.block.is_none() {
                    l.block = Some(self.alloc_meta()?);
                    l.dirty = true;
                }
            }
            let n = out.len();
            for i in 0..n {
                let next = out.get(i + 1).and_then(|l| l.block);
                if out[i].written_next != next {
                    out[i].dirty = true;
                }
                if out[i].dirty {
                    let b = out[i].block.expect("every leaf has a block in chain mode");
                    let eb = ExtentBlock {
                        ino,
                        next,
                        extents: out[i].extents.clone(),
                    };
                    writes.insert(b.0 * BLOCK_BYTES, eb.encode());
                    out[i].dirty = false;
                    out[i].written_next = next;
                }
            }
            let c = self.inodes.get_mut(&ino).ok_or(FsError::Stale)?;
            c.inode.inline_extents = Vec::new();
            c.inode.first_block = out.first().and_then(|l| l.block);
            c.inode.count = total as u64;
            c.leaves = out;
        }
        let c = self.inodes.get_mut(&ino).ok_or(FsError::Stale)?;
        c.inode.alloc_clusters = c
            .leaves
            .iter()
            .flat_map(|l| &l.extents)
            .map(|e| u64::from(e.len_clusters))
            .sum();
        c.inode.meta_blocks = u32::try_from(
            c.leaves.iter().filter(|l| l.block.is_some()).count()
                + c.xattr_blocks.len()
                + c.symlink_blocks.len(),
        )
        .unwrap_or(u32::MAX);
        Ok(())
    }

    /// Replaces the file's extent list with the result of `f` on the whole list, keeping
    /// leaves that are unchanged. For maps of many leaves only the leaves overlapping
    /// `[a, b)` (and their neighbours) are rebuilt.
    pub fn modify_extents<R>(
        &mut self,
        ino: InodeId,
        a: u64,
        b: u64,
        f: impl FnOnce(&mut Vec<DiskExtent>, &mut Meta) -> Result<R, FsError>,
    ) -> Result<R, FsError> {
        self.touch(ino);
        let mut leaves = std::mem::take(&mut self.inode(ino)?.leaves);
        // Leaves to rebuild: those overlapping [a-1, b+1), or the one where `a` would go.
        let lo = a.saturating_sub(1);
        let hi = b.saturating_add(1);
        let mut first = None;
        let mut last = None;
        for (i, l) in leaves.iter().enumerate() {
            let (Some(s), Some(e)) = (l.extents.first(), l.extents.last()) else {
                continue;
            };
            if s.file_cluster < hi && e.file_end() > lo {
                first.get_or_insert(i);
                last = Some(i);
            }
        }
        let (i, j) = match (first, last) {
            (Some(i), Some(j)) => (i, j),
            _ => {
                if leaves.is_empty() {
                    leaves.push(Leaf {
                        block: None,
                        extents: Vec::new(),
                        dirty: true,
                        written_next: None,
                    });
                }
                let k = leaves
                    .iter()
                    .rposition(|l| l.extents.first().is_some_and(|e| e.file_cluster <= a))
                    .unwrap_or(0);
                (k, k)
            }
        };
        let mut sub: Vec<DiskExtent> = leaves[i..=j]
            .iter()
            .flat_map(|l| l.extents.clone())
            .collect();
        let blocks: Vec<Option<BlockNo>> = leaves[i..=j].iter().map(|l| l.block).collect();
        let result = f(&mut sub, self);
        extmap::merge(&mut sub);
        // Rebuild leaves i..=j from `sub`, reusing their blocks in order.
        let pieces: Vec<Vec<DiskExtent>> = if sub.is_empty() {
            Vec::new()
        } else {
            sub.chunks(EXTENTS_PER_BLOCK).map(|c| c.to_vec()).collect()
        };
        let mut new_leaves = Vec::new();
        let mut bi = blocks.into_iter();
        for p in pieces {
            new_leaves.push(Leaf {
                block: bi.next().flatten(),
                extents: p,
                dirty: true,
                written_next: None,
            });
        }
        for rest in bi.flatten() {
            self.free_meta(rest);
        }
        if i > 0 {
            leaves[i - 1].dirty = true;
        }
        leaves.splice(i..=j, new_leaves);
        self.inode(ino)?.leaves = leaves;
        result
    }
}

impl DirState {
    /// Rebuilds the hash table from the blocks; errors if they do not partition the space.
    pub fn rebuild_table(&mut self) -> Result<(), String> {
        let gd = self.blocks.iter().map(|b| b.depth).max().unwrap_or(0);
        if gd > DIR_MAX_DEPTH {
            return Err("depth too large".into());
        }
        self.global_depth = gd;
        if self.blocks.is_empty() {
            self.table.clear();
            return Ok(());
        }
        let size = 1usize << gd;
        let mut table = vec![u32::MAX; size];
        for (idx, b) in self.blocks.iter().enumerate() {
            let step = 1usize << b.depth;
            let mut slot = usize::try_from(b.prefix).map_err(|_| "prefix".to_string())?;
            while slot < size {
                if table[slot] != u32::MAX {
                    return Err("directory blocks overlap in hash space".into());
                }
                table[slot] = u32::try_from(idx).map_err(|_| "too many blocks".to_string())?;
                slot += step;
            }
        }
        if table.contains(&u32::MAX) {
            return Err("directory blocks do not cover the hash space".into());
        }
        self.table = table;
        Ok(())
    }

    /// Index of the block that holds hash `h`.
    pub fn block_for(&self, h: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let mask = (1u64 << self.global_depth) - 1;
        let slot = usize::try_from(h & mask).ok()?;
        self.table.get(slot).map(|i| *i as usize)
    }

    /// Finds an entry.
    pub fn find(&self, seed: u64, name: &[u8]) -> Option<&DirBlockEntry> {
        let bi = self.block_for(name_hash(seed, name))?;
        self.blocks[bi].entries.iter().find(|e| e.name == name)
    }
}

/// Encodes xattrs: name_len u8 | value_len u32 | name | value, sorted by name.
pub(crate) fn encode_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in x {
        out.push(u8::try_from(k.len()).expect("names are <= 255 bytes"));
        out.extend_from_slice(
            &u32::try_from(v.len())
                .expect("values are <= 64 KiB")
                .to_le_bytes(),
        );
        out.extend_from_slice(k);
        out.extend_from_slice(v);
    }
    out
}

/// Decodes xattrs; `None` if malformed.
pub(crate) fn decode_xattrs(b: &[u8]) -> Option<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut m = BTreeMap::new();
    let mut p = 0usize;
    while p < b.len() {
        let nl = usize::from(*b.get(p)?);
        let mut l4 = [0u8; 4];
        l4.copy_from_slice(b.get(p + 1..p + 5)?);
        let vl = usize::try_from(u32::from_le_bytes(l4)).ok()?;
        let name = b.get(p + 5..p + 5 + nl)?.to_vec();
        let val = b.get(p + 5 + nl..p + 5 + nl + vl)?.to_vec();
        if nl == 0 {
            return None;
        }
        m.insert(name, val);
        p += 5 + nl + vl;
    }
    Some(m)
}

/// Writes a byte string as a blob chain, reusing `old` blocks; returns the new chain.
pub(crate) fn store_blob(
    m: &mut Meta,
    ino: InodeId,
    kind: BlobKind,
    data: &[u8],
    old: &[BlockNo],
) -> Result<Vec<BlockNo>, FsError> {
    let pieces: Vec<&[u8]> = data.chunks(BLOB_DATA_BYTES).collect();
    let mut blocks = Vec::new();
    for k in 0..pieces.len() {
        blocks.push(match old.get(k) {
            Some(b) => *b,
            None => m.alloc_meta()?,
        });
    }
    for b in old.iter().skip(pieces.len()) {
        m.free_meta(*b);
    }
    for (k, p) in pieces.iter().enumerate() {
        let bb = BlobBlock {
            ino,
            next: blocks.get(k + 1).copied(),
            kind,
            data: p.to_vec(),
        };
        m.txn.raw.insert(blocks[k].0 * BLOCK_BYTES, bb.encode());
    }
    m.txn.mutated = true;
    Ok(blocks)
}

/// Whether a symlink target is stored inline.
pub(crate) fn symlink_inline(len: usize) -> bool {
    len <= INLINE_SYMLINK_BYTES
}

/// Whether encoded xattrs are stored inline.
pub(crate) fn xattrs_inline(len: usize) -> bool {
    len <= INLINE_XATTR_BYTES
}

/// Largest single write of a checkpoint, in bytes.
const HOME_RUN_BYTES: usize = 1 << 20;

/// Writes the overlay home (sorted by offset, adjacent pieces in one write) and flushes.
pub(crate) fn write_home(
    dev: &dyn BlockDevice,
    overlay: &HashMap<u64, Vec<u8>>,
) -> Result<(), FsError> {
    let mark = dev.write_loss_count();
    let mut keys: Vec<u64> = overlay.keys().copied().collect();
    keys.sort_unstable();
    // Adjacent pieces (inode slots next to each other, consecutive blocks) go out as one
    // write of at most HOME_RUN_BYTES.
    let mut run: Vec<u8> = Vec::new();
    let mut run_at = 0u64;
    for k in keys {
        let bytes = &overlay[&k];
        let contiguous = run_at + run.len() as u64 == k;
        if !run.is_empty() && (!contiguous || run.len() + bytes.len() > HOME_RUN_BYTES) {
            dev.write_at(&run, run_at, WriteFlags::default())
                .map_err(|e| io_err(&format!("write metadata home at byte {run_at}"), e))?;
            run.clear();
        }
        if run.is_empty() {
            run_at = k;
        }
        run.extend_from_slice(bytes);
    }
    if !run.is_empty() {
        dev.write_at(&run, run_at, WriteFlags::default())
            .map_err(|e| io_err(&format!("write metadata home at byte {run_at}"), e))?;
    }
    block_client::flush_since(dev, mark).map_err(|e| io_err("flush after checkpoint", e))
}
