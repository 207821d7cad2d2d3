//! The metadata operations, executed on the in-memory state under the store lock. Each
//! mutation changes the cache and marks what it touched; the caller turns that into one
//! journal transaction.

use block_client::WriteFlags;

use super::claims::CLAIM_AHEAD_BYTES;
use super::extmap;
use super::meta::{
    encode_xattrs, io_err, store_blob, symlink_inline, xattrs_inline, CInode, DirBlk, Meta,
};
use crate::format::{
    name_hash, valid_name, BlobKind, DirBlockEntry, DiskExtent, Inode, DIR_ENTRIES_BYTES,
    DIR_MAX_DEPTH, MAX_FILE_BYTES, MAX_NAME_BYTES, MAX_SYMLINK_BYTES,
};
use crate::proto::{ByteRange, Caller, Response};
use crate::types::{
    Attr, ClusterNo, DirEntry, Extent, FallocMode, FileKind, FsError, InodeId, NodeId, RenameFlags,
    SetAttr, StatFs, TimeSet, Timestamp, XattrMode,
};

/// Largest xattr value, in bytes.
pub const MAX_XATTR_VALUE_BYTES: usize = 65536;
/// Largest total of encoded xattrs of one inode, in bytes.
pub const MAX_XATTR_TOTAL_BYTES: usize = 65536 + 4096;
/// Most hard links of one inode.
pub const MAX_LINKS: u32 = 65000;

const S_ISGID: u32 = 0o2000;

fn now() -> Timestamp {
    crate::format::now()
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > MAX_NAME_BYTES as usize {
        return Err(FsError::NameTooLong);
    }
    if !valid_name(name) {
        return Err(FsError::Invalid("bad file name".into()));
    }
    Ok(())
}

impl Meta {
    fn cs(&self) -> u64 {
        u64::from(self.g.cluster_bytes)
    }

    /// Attributes of a cached inode.
    pub fn attr_of(&self, c: &CInode) -> Attr {
        let i = &c.inode;
        Attr {
            ino: i.ino,
            generation: i.generation,
            kind: i.kind,
            perm: i.perm,
            uid: i.uid,
            gid: i.gid,
            nlink: i.nlink,
            size_bytes: i.size_bytes,
            allocated_bytes: c
                .leaves
                .iter()
                .flat_map(|l| &l.extents)
                .map(|e| u64::from(e.len_clusters))
                .sum::<u64>()
                * self.cs(),
            rdev: i.rdev,
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.crtime,
        }
    }

    /// Attributes of `ino`.
    pub fn attr(&mut self, ino: InodeId) -> Result<Attr, FsError> {
        self.inode(ino)?;
        let c = self.inodes.get(&ino).ok_or(FsError::Stale)?;
        Ok(self.attr_of(c))
    }

    fn to_extent(&self, e: &DiskExtent) -> Extent {
        Extent {
            file_offset_bytes: e.file_cluster * self.cs(),
            lun_offset_bytes: self.g.cluster_offset(e.lun_cluster),
            len_bytes: u64::from(e.len_clusters) * self.cs(),
            unwritten: e.unwritten,
        }
    }

    /// Extents of `ino` overlapping [off, off+len).
    pub fn mapped(&mut self, ino: InodeId, off: u64, len: u64) -> Result<Response, FsError> {
        let attr = self.attr(ino)?;
        let cs = self.cs();
        let a = off / cs;
        let b = off.saturating_add(len).div_ceil(cs);
        let exts = self.inode(ino)?.extents();
        let extents = exts
            .iter()
            .filter(|e| e.file_end() > a && e.file_cluster < b)
            .map(|e| self.to_extent(e))
            .collect();
        Ok(Response::Mapped { attr, extents })
    }

    fn dir_inode(&mut self, dir: InodeId) -> Result<(), FsError> {
        if self.inode(dir)?.inode.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(())
    }

    /// Looks a name up in a directory: (ino, kind) of the entry.
    pub fn lookup_entry(
        &mut self,
        parent: InodeId,
        name: &[u8],
    ) -> Result<Option<(InodeId, FileKind)>, FsError> {
        self.dir_inode(parent)?;
        let seed = self.sb.hash_seed;
        self.stats.dir_lookups += 1;
        let st = self.dir(parent)?;
        let found = st.find(seed, name).map(|e| (e.ino, e.kind));
        let examined = u64::from(!st.blocks.is_empty());
        self.stats.dir_blocks_examined += examined;
        Ok(found)
    }

    /// Lookup request.
    pub fn lookup(&mut self, parent: InodeId, name: &[u8]) -> Result<Attr, FsError> {
        if name == b"." {
            self.dir_inode(parent)?;
            return self.attr(parent);
        }
        if name == b".." {
            self.dir_inode(parent)?;
            let p = self.inode(parent)?.inode.parent.unwrap_or(parent);
            return self.attr(p);
        }
        check_name(name)?;
        match self.lookup_entry(parent, name)? {
            Some((ino, _)) => self.attr(ino),
            None => Err(FsError::NotFound),
        }
    }

    // ----- directory entry changes -----

    fn dir_insert(
        &mut self,
        dir: InodeId,
        name: &[u8],
        ino: InodeId,
        kind: FileKind,
    ) -> Result<(), FsError> {
        let seed = self.sb.hash_seed;
        let h = name_hash(seed, name);
        let cookie = {
            let c = self.inode(dir)?;
            let ck = c.inode.next_cookie.max(3);
            c.inode.next_cookie = ck + 1;
            c.inode.count += 1;
            ck
        };
        self.touch(dir);
        self.txn.dirs.insert(dir);
        // Make sure the directory has a block.
        if self.dir(dir)?.blocks.is_empty() {
            let b = self.alloc_meta()?;
            let st = self.dir(dir)?;
            st.blocks.push(DirBlk {
                block: b,
                depth: 0,
                prefix: 0,
                next: None,
                entries: Vec::new(),
                dirty: true,
            });
            st.table = vec![0];
            st.global_depth = 0;
            self.inode(dir)?.inode.first_block = Some(b);
            self.inode(dir)?.inode.meta_blocks += 1;
        }
        let entry = DirBlockEntry {
            name: name.to_vec(),
            ino,
            kind,
            cookie,
        };
        loop {
            let st = self.dir(dir)?;
            let bi = st
                .block_for(h)
                .ok_or_else(|| FsError::Corrupt(format!("{dir}: empty hash table")))?;
            let used: usize = st.blocks[bi]
                .entries
                .iter()
                .map(|e| 18 + e.name.len())
                .sum();
            if used + 18 + name.len() <= DIR_ENTRIES_BYTES {
                let blk = &mut st.blocks[bi];
                blk.entries.push(entry);
                blk.dirty = true;
                st.by_cookie.insert(cookie, name.to_vec());
                return Ok(());
            }
            // Split block bi.
            if st.blocks[bi].depth >= DIR_MAX_DEPTH {
                return Err(FsError::NoSpace);
            }
            let nb = self.alloc_meta()?;
            self.inode(dir)?.inode.meta_blocks += 1;
            let st = self.dir(dir)?;
            let d = st.blocks[bi].depth;
            if d == st.global_depth {
                let t = st.table.clone();
                st.table.extend_from_slice(&t);
                st.global_depth += 1;
            }
            let old = &mut st.blocks[bi];
            let (stay, go): (Vec<_>, Vec<_>) = std::mem::take(&mut old.entries)
                .into_iter()
                .partition(|e| name_hash(seed, &e.name) & (1 << d) == 0);
            old.entries = stay;
            old.depth = d + 1;
            old.dirty = true;
            let new_blk = DirBlk {
                block: nb,
                depth: d + 1,
                prefix: old.prefix | (1 << d),
                next: old.next,
                entries: go,
                dirty: true,
            };
            old.next = Some(nb);
            let new_prefix = new_blk.prefix;
            st.blocks.push(new_blk);
            let ni = u32::try_from(st.blocks.len() - 1).map_err(|_| FsError::NoSpace)?;
            let step = 1usize << (d + 1);
            let mut slot = usize::try_from(new_prefix).map_err(|_| FsError::NoSpace)?;
            while slot < st.table.len() {
                st.table[slot] = ni;
                slot += step;
            }
        }
    }

    fn dir_remove(&mut self, dir: InodeId, name: &[u8]) -> Result<DirBlockEntry, FsError> {
        let seed = self.sb.hash_seed;
        self.touch(dir);
        self.txn.dirs.insert(dir);
        let st = self.dir(dir)?;
        let bi = st
            .block_for(name_hash(seed, name))
            .ok_or(FsError::NotFound)?;
        let blk = &mut st.blocks[bi];
        let pos = blk
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or(FsError::NotFound)?;
        let e = blk.entries.remove(pos);
        blk.dirty = true;
        st.by_cookie.remove(&e.cookie);
        let c = self.inode(dir)?;
        c.inode.count = c.inode.count.saturating_sub(1);
        Ok(e)
    }

    fn dir_set_ino(
        &mut self,
        dir: InodeId,
        name: &[u8],
        ino: InodeId,
        kind: FileKind,
    ) -> Result<(), FsError> {
        let seed = self.sb.hash_seed;
        self.touch(dir);
        self.txn.dirs.insert(dir);
        let st = self.dir(dir)?;
        let bi = st
            .block_for(name_hash(seed, name))
            .ok_or(FsError::NotFound)?;
        let blk = &mut st.blocks[bi];
        let e = blk
            .entries
            .iter_mut()
            .find(|e| e.name == name)
            .ok_or(FsError::NotFound)?;
        e.ino = ino;
        e.kind = kind;
        blk.dirty = true;
        Ok(())
    }

    // ----- inode life -----

    fn new_inode(
        &mut self,
        caller: &Caller,
        parent: InodeId,
        kind: FileKind,
        perm: u32,
    ) -> Result<InodeId, FsError> {
        let ino = self.alloc_inode_slot()?;
        let generation = self.next_generation(ino)?;
        let t = now();
        let (pgid, pperm) = {
            let p = &self.inode(parent)?.inode;
            (p.gid, p.perm)
        };
        let mut inode = Inode::new(ino, generation, kind, perm, t);
        inode.uid = caller.uid;
        inode.gid = caller.gid;
        if pperm & S_ISGID != 0 {
            inode.gid = pgid;
            if kind == FileKind::Dir {
                inode.perm |= S_ISGID;
            }
        }
        if kind == FileKind::Dir {
            inode.nlink = 2;
            inode.parent = Some(parent);
            inode.next_cookie = 3;
        }
        self.inodes.insert(
            ino,
            CInode {
                inode,
                leaves: Vec::new(),
                symlink: Vec::new(),
                symlink_blocks: Vec::new(),
                xattrs: Default::default(),
                xattr_blocks: Vec::new(),
            },
        );
        if kind == FileKind::Dir {
            self.dirs.insert(ino, Default::default());
        }
        self.touch(ino);
        Ok(ino)
    }

    /// Frees an inode and everything it owns.
    fn free_inode(&mut self, ino: InodeId) -> Result<(), FsError> {
        if self.inode(ino)?.inode.held {
            self.held_remove(ino)?;
        }
        let dir_blocks: Vec<_> = if self.inode(ino)?.inode.kind == FileKind::Dir {
            self.dir(ino)?.blocks.iter().map(|b| b.block).collect()
        } else {
            Vec::new()
        };
        let c = self.inodes.remove(&ino).ok_or(FsError::Stale)?;
        self.opens.remove(&ino);
        for e in c.extents() {
            self.free_clusters(e.lun_cluster, u64::from(e.len_clusters));
        }
        for l in &c.leaves {
            if let Some(b) = l.block {
                self.free_meta(b);
            }
        }
        for b in c
            .xattr_blocks
            .iter()
            .chain(&c.symlink_blocks)
            .chain(&dir_blocks)
        {
            self.free_meta(*b);
        }
        self.dirs.remove(&ino);
        self.txn.dirs.remove(&ino);
        self.txn.inodes.remove(&ino);
        self.txn.raw.insert(
            self.g.inode_offset(ino),
            Inode::encode_free(ino, c.inode.generation),
        );
        self.set_bit(crate::format::BitmapKind::Inodes, ino.0, false);
        if self.slot_gens.len() < super::meta::MAX_CACHED_SLOT_GENS {
            self.slot_gens.insert(ino, c.inode.generation + 1);
        }
        Ok(())
    }

    /// Open handles of older nodes, persisted in the inode.
    fn persisted_opens(c: &CInode) -> u32 {
        c.inode.opens.iter().map(|v| u32::from(*v)).sum()
    }

    /// Open handles of `ino` counted in memory (nodes of protocol version 4 or later).
    fn volatile_opens(&self, ino: InodeId) -> u32 {
        self.opens
            .get(&ino)
            .map_or(0, |v| v.iter().fold(0u32, |a, n| a.saturating_add(*n)))
    }

    /// Unlinked: no name left (a directory keeps only its own "." link).
    fn is_dead(c: &CInode) -> bool {
        c.inode.nlink == 0 || (c.inode.kind == FileKind::Dir && c.inode.nlink <= 1)
    }

    /// After nlink or opens changed: free the inode, hold it, or release the hold. An
    /// inode is held (on the on-disk list) while it is dead or has persisted opens; a dead
    /// one is freed once nobody holds it, except during the orphan grace after a takeover.
    fn settle(&mut self, ino: InodeId) -> Result<(), FsError> {
        let c = self.inode(ino)?;
        let persisted = Self::persisted_opens(c);
        let held = c.inode.held;
        let dead = Self::is_dead(c);
        let opens = persisted.saturating_add(self.volatile_opens(ino));
        if dead && opens == 0 && !self.orphan_grace {
            return self.free_inode(ino);
        }
        let want_held = dead || persisted > 0;
        if want_held && !held {
            self.held_insert(ino)?;
        } else if !want_held && held {
            self.held_remove(ino)?;
        }
        Ok(())
    }

    fn held_insert(&mut self, ino: InodeId) -> Result<(), FsError> {
        let head = self.sb.held_head;
        {
            let c = self.inode(ino)?;
            c.inode.held = true;
            c.inode.next_held = head;
        }
        self.touch(ino);
        if let Some(h) = head {
            self.held_prev.insert(h, Some(ino));
        }
        self.held_prev.insert(ino, None);
        self.sb.held_head = Some(ino);
        self.txn.sb = true;
        Ok(())
    }

    fn held_remove(&mut self, ino: InodeId) -> Result<(), FsError> {
        let prev = self.held_prev.remove(&ino).flatten();
        let next = {
            let c = self.inode(ino)?;
            let n = c.inode.next_held;
            c.inode.held = false;
            c.inode.next_held = None;
            n
        };
        self.touch(ino);
        match prev {
            Some(p) => {
                self.inode(p)?.inode.next_held = next;
                self.touch(p);
            }
            None => {
                self.sb.held_head = next;
                self.txn.sb = true;
            }
        }
        if let Some(n) = next {
            self.held_prev.insert(n, prev);
        }
        Ok(())
    }

    // ----- requests -----

    /// Create (file, dir, device, fifo, socket).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        caller: &Caller,
        parent: InodeId,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        rdev: u32,
        exclusive: bool,
    ) -> Result<Attr, FsError> {
        if matches!(kind, FileKind::Symlink | FileKind::Invalid) {
            return Err(FsError::Invalid(
                "create of a symlink or invalid kind".into(),
            ));
        }
        if name == b"." || name == b".." {
            return Err(FsError::Exists);
        }
        check_name(name)?;
        if let Some((ino, k)) = self.lookup_entry(parent, name)? {
            if exclusive || kind != FileKind::File || k != FileKind::File {
                return Err(FsError::Exists);
            }
            return self.attr(ino);
        }
        if kind == FileKind::Dir && self.inode(parent)?.inode.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        self.reserve_create()?;
        let ino = self.new_inode(caller, parent, kind, perm)?;
        self.inode(ino)?.inode.rdev = rdev;
        self.dir_insert(parent, name, ino, kind)?;
        let t = now();
        let p = self.inode(parent)?;
        p.inode.mtime = t;
        p.inode.ctime = t;
        if kind == FileKind::Dir {
            p.inode.nlink += 1;
        }
        self.touch(parent);
        self.attr(ino)
    }

    /// Checks there is room for a new inode and a possible directory split.
    fn reserve_create(&self) -> Result<(), FsError> {
        if self.inode_map.free == 0 || self.meta_map.free < 2 {
            return Err(FsError::NoSpace);
        }
        Ok(())
    }

    /// Symlink.
    pub fn symlink(
        &mut self,
        caller: &Caller,
        parent: InodeId,
        name: &[u8],
        target: &[u8],
    ) -> Result<Attr, FsError> {
        if name == b"." || name == b".." {
            return Err(FsError::Exists);
        }
        check_name(name)?;
        if target.is_empty() || target.len() > MAX_SYMLINK_BYTES {
            return Err(if target.is_empty() {
                FsError::NotFound
            } else {
                FsError::NameTooLong
            });
        }
        if self.lookup_entry(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        self.reserve_create()?;
        if !symlink_inline(target.len()) && self.meta_map.free < 4 {
            return Err(FsError::NoSpace);
        }
        let ino = self.new_inode(caller, parent, FileKind::Symlink, 0o777)?;
        let blocks = if symlink_inline(target.len()) {
            Vec::new()
        } else {
            store_blob(self, ino, BlobKind::Symlink, target, &[])?
        };
        {
            let c = self.inode(ino)?;
            c.symlink = target.to_vec();
            c.inode.size_bytes = target.len() as u64;
            if blocks.is_empty() {
                c.inode.inline_symlink = target.to_vec();
            } else {
                c.inode.first_block = blocks.first().copied();
                c.inode.meta_blocks = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
            }
            c.symlink_blocks = blocks;
        }
        self.dir_insert(parent, name, ino, FileKind::Symlink)?;
        let t = now();
        let p = self.inode(parent)?;
        p.inode.mtime = t;
        p.inode.ctime = t;
        self.touch(parent);
        self.attr(ino)
    }

    /// Readlink.
    pub fn readlink(&mut self, ino: InodeId) -> Result<Vec<u8>, FsError> {
        let c = self.inode(ino)?;
        if c.inode.kind != FileKind::Symlink {
            return Err(FsError::Invalid("not a symbolic link".into()));
        }
        Ok(c.symlink.clone())
    }

    /// Link.
    pub fn link(
        &mut self,
        ino: InodeId,
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<Attr, FsError> {
        if new_name == b"." || new_name == b".." {
            return Err(FsError::Exists);
        }
        check_name(new_name)?;
        let (kind, nlink) = {
            let c = self.inode(ino)?;
            (c.inode.kind, c.inode.nlink)
        };
        if kind == FileKind::Dir {
            return Err(FsError::NotPermitted);
        }
        if nlink == 0 {
            return Err(FsError::NotFound);
        }
        if nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        if self.lookup_entry(new_parent, new_name)?.is_some() {
            return Err(FsError::Exists);
        }
        if self.meta_map.free < 2 {
            return Err(FsError::NoSpace);
        }
        self.dir_insert(new_parent, new_name, ino, kind)?;
        let t = now();
        let c = self.inode(ino)?;
        c.inode.nlink += 1;
        c.inode.ctime = t;
        self.touch(ino);
        let p = self.inode(new_parent)?;
        p.inode.mtime = t;
        p.inode.ctime = t;
        self.touch(new_parent);
        self.attr(ino)
    }

    /// Unlink.
    pub fn unlink(&mut self, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        if name == b"." || name == b".." {
            return Err(FsError::IsDir);
        }
        check_name(name)?;
        let (ino, kind) = self.lookup_entry(parent, name)?.ok_or(FsError::NotFound)?;
        if kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        self.dir_remove(parent, name)?;
        let t = now();
        let p = self.inode(parent)?;
        p.inode.mtime = t;
        p.inode.ctime = t;
        self.touch(parent);
        let c = self.inode(ino)?;
        c.inode.nlink = c.inode.nlink.saturating_sub(1);
        c.inode.ctime = t;
        self.touch(ino);
        self.settle(ino)
    }

    /// Rmdir.
    pub fn rmdir(&mut self, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        if name == b"." {
            return Err(FsError::Invalid("rmdir of \".\"".into()));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        check_name(name)?;
        let (ino, kind) = self.lookup_entry(parent, name)?.ok_or(FsError::NotFound)?;
        if kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if self.inode(ino)?.inode.count != 0 {
            return Err(FsError::NotEmpty);
        }
        self.dir_remove(parent, name)?;
        let t = now();
        let p = self.inode(parent)?;
        p.inode.nlink = p.inode.nlink.saturating_sub(1);
        p.inode.mtime = t;
        p.inode.ctime = t;
        self.touch(parent);
        let c = self.inode(ino)?;
        c.inode.nlink = 0;
        c.inode.ctime = t;
        self.touch(ino);
        self.settle(ino)
    }

    /// True when `anc` is `ino` or one of its ancestors.
    fn is_ancestor(&mut self, anc: InodeId, mut ino: InodeId) -> Result<bool, FsError> {
        let mut steps = 0u64;
        loop {
            if ino == anc {
                return Ok(true);
            }
            let p = self.inode(ino)?.inode.parent;
            match p {
                Some(p) if p != ino => ino = p,
                _ => return Ok(false),
            }
            steps += 1;
            if steps > self.g.inode_count {
                return Err(FsError::Corrupt(
                    "directory parent chain has a cycle".into(),
                ));
            }
        }
    }

    /// Rename.
    pub fn rename(
        &mut self,
        parent: InodeId,
        name: &[u8],
        new_parent: InodeId,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        if flags.noreplace && flags.exchange {
            return Err(FsError::Invalid(
                "RENAME_NOREPLACE with RENAME_EXCHANGE".into(),
            ));
        }
        for n in [name, new_name] {
            if n == b"." || n == b".." {
                return Err(FsError::Invalid("rename of \".\" or \"..\"".into()));
            }
            check_name(n)?;
        }
        self.dir_inode(new_parent)?;
        let (src, skind) = self.lookup_entry(parent, name)?.ok_or(FsError::NotFound)?;
        let dst = self.lookup_entry(new_parent, new_name)?;
        if flags.exchange {
            let (dino, dkind) = dst.ok_or(FsError::NotFound)?;
            if dino == src {
                return Ok(());
            }
            // Neither may become its own ancestor.
            if skind == FileKind::Dir
                && parent != new_parent
                && self.is_ancestor(src, new_parent)?
            {
                return Err(FsError::Invalid(
                    "rename would create a directory cycle".into(),
                ));
            }
            if dkind == FileKind::Dir && parent != new_parent && self.is_ancestor(dino, parent)? {
                return Err(FsError::Invalid(
                    "rename would create a directory cycle".into(),
                ));
            }
            self.dir_set_ino(parent, name, dino, dkind)?;
            self.dir_set_ino(new_parent, new_name, src, skind)?;
            let t = now();
            if parent != new_parent {
                if skind == FileKind::Dir {
                    self.inode(src)?.inode.parent = Some(new_parent);
                }
                if dkind == FileKind::Dir {
                    self.inode(dino)?.inode.parent = Some(parent);
                }
                let sd = i64::from(skind == FileKind::Dir) - i64::from(dkind == FileKind::Dir);
                self.adjust_nlink(parent, -sd)?;
                self.adjust_nlink(new_parent, sd)?;
            }
            for i in [src, dino, parent, new_parent] {
                self.inode(i)?.inode.ctime = t;
                self.touch(i);
            }
            for p in [parent, new_parent] {
                self.inode(p)?.inode.mtime = t;
            }
            return Ok(());
        }
        if let Some((dino, dkind)) = dst {
            if flags.noreplace {
                return Err(FsError::Exists);
            }
            if dino == src {
                return Ok(());
            }
            match (skind == FileKind::Dir, dkind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    if self.inode(dino)?.inode.count != 0 {
                        return Err(FsError::NotEmpty);
                    }
                }
                (false, false) => {}
            }
        }
        if skind == FileKind::Dir && parent != new_parent && self.is_ancestor(src, new_parent)? {
            return Err(FsError::Invalid(
                "rename would create a directory cycle".into(),
            ));
        }
        if self.meta_map.free < 2 {
            return Err(FsError::NoSpace);
        }
        let t = now();
        // Remove the target if present.
        if let Some((dino, dkind)) = dst {
            self.dir_remove(new_parent, new_name)?;
            let c = self.inode(dino)?;
            if dkind == FileKind::Dir {
                c.inode.nlink = 0;
            } else {
                c.inode.nlink = c.inode.nlink.saturating_sub(1);
            }
            c.inode.ctime = t;
            self.touch(dino);
            if dkind == FileKind::Dir {
                self.adjust_nlink(new_parent, -1)?;
            }
            self.settle(dino)?;
        }
        self.dir_remove(parent, name)?;
        self.dir_insert(new_parent, new_name, src, skind)?;
        if skind == FileKind::Dir && parent != new_parent {
            self.inode(src)?.inode.parent = Some(new_parent);
            self.adjust_nlink(parent, -1)?;
            self.adjust_nlink(new_parent, 1)?;
        }
        self.inode(src)?.inode.ctime = t;
        self.touch(src);
        for p in [parent, new_parent] {
            let c = self.inode(p)?;
            c.inode.mtime = t;
            c.inode.ctime = t;
            self.touch(p);
        }
        Ok(())
    }

    fn adjust_nlink(&mut self, ino: InodeId, d: i64) -> Result<(), FsError> {
        let c = self.inode(ino)?;
        let n = i64::from(c.inode.nlink) + d;
        c.inode.nlink = u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        self.touch(ino);
        Ok(())
    }

    /// Readdir.
    pub fn readdir(
        &mut self,
        ino: InodeId,
        after: u64,
        max: u32,
        plus: bool,
    ) -> Result<Response, FsError> {
        self.dir_inode(ino)?;
        let parent = self.inode(ino)?.inode.parent.unwrap_or(ino);
        let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
        let mut out: Vec<(DirEntry, Option<Attr>)> = Vec::new();
        let dots = [(1u64, b".".to_vec(), ino), (2u64, b"..".to_vec(), parent)];
        for (cookie, name, i) in dots {
            if after < cookie && out.len() < max {
                let attr = if plus { Some(self.attr(i)?) } else { None };
                out.push((
                    DirEntry {
                        name,
                        ino: i,
                        kind: FileKind::Dir,
                        cookie,
                    },
                    attr,
                ));
            }
        }
        let seed = self.sb.hash_seed;
        let mut found = Vec::new();
        {
            let st = self.dir(ino)?;
            for (cookie, name) in st.by_cookie.range(after.saturating_add(1).max(3)..) {
                if out.len() + found.len() >= max {
                    break;
                }
                if let Some(e) = st.find(seed, name) {
                    found.push(DirEntry {
                        name: name.clone(),
                        ino: e.ino,
                        kind: e.kind,
                        cookie: *cookie,
                    });
                }
            }
        }
        for e in found {
            let attr = if plus { Some(self.attr(e.ino)?) } else { None };
            out.push((e, attr));
        }
        Ok(Response::Entries(out))
    }

    /// Statfs.
    pub fn statfs(&self) -> StatFs {
        StatFs {
            cluster_size_bytes: self.g.cluster_bytes,
            total_clusters: self.g.cluster_count,
            free_clusters: self.clusters.free,
            total_inodes: self.g.inode_count - 1,
            free_inodes: self.inode_map.free,
            max_name_bytes: MAX_NAME_BYTES,
        }
    }

    // ----- xattrs -----

    fn store_xattrs(&mut self, ino: InodeId) -> Result<(), FsError> {
        let (enc, old) = {
            let c = self.inode(ino)?;
            (encode_xattrs(&c.xattrs), c.xattr_blocks.clone())
        };
        if enc.len() > MAX_XATTR_TOTAL_BYTES {
            return Err(FsError::TooBig);
        }
        let blocks = if xattrs_inline(enc.len()) {
            for b in &old {
                self.free_meta(*b);
            }
            Vec::new()
        } else {
            store_blob(self, ino, BlobKind::Xattrs, &enc, &old)?
        };
        let c = self.inode(ino)?;
        c.inode.xattr_len = u32::try_from(enc.len()).unwrap_or(u32::MAX);
        c.inode.inline_xattrs = if blocks.is_empty() { enc } else { Vec::new() };
        c.inode.xattr_block = blocks.first().copied();
        let other = c
            .inode
            .meta_blocks
            .saturating_sub(u32::try_from(c.xattr_blocks.len()).unwrap_or(0));
        c.inode.meta_blocks = other + u32::try_from(blocks.len()).unwrap_or(0);
        c.xattr_blocks = blocks;
        c.inode.ctime = now();
        self.touch(ino);
        Ok(())
    }

    /// Getxattr.
    pub fn getxattr(&mut self, ino: InodeId, name: &[u8]) -> Result<Vec<u8>, FsError> {
        self.inode(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(FsError::NoData)
    }

    /// Setxattr.
    pub fn setxattr(
        &mut self,
        ino: InodeId,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<(), FsError> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Invalid("xattr name length".into()));
        }
        if value.len() > MAX_XATTR_VALUE_BYTES {
            return Err(FsError::TooBig);
        }
        let c = self.inode(ino)?;
        let exists = c.xattrs.contains_key(name);
        match mode {
            XattrMode::Create if exists => return Err(FsError::Exists),
            XattrMode::Replace if !exists => return Err(FsError::NoData),
            _ => {}
        }
        let mut trial = c.xattrs.clone();
        trial.insert(name.to_vec(), value.to_vec());
        let enc_len = encode_xattrs(&trial).len();
        if enc_len > MAX_XATTR_TOTAL_BYTES {
            return Err(FsError::TooBig);
        }
        if !xattrs_inline(enc_len) && self.meta_map.free < 20 {
            return Err(FsError::NoSpace);
        }
        self.inode(ino)?.xattrs = trial;
        self.touch(ino);
        self.store_xattrs(ino)
    }

    /// Listxattr.
    pub fn listxattr(&mut self, ino: InodeId) -> Result<Vec<Vec<u8>>, FsError> {
        Ok(self.inode(ino)?.xattrs.keys().cloned().collect())
    }

    /// Removexattr.
    pub fn removexattr(&mut self, ino: InodeId, name: &[u8]) -> Result<(), FsError> {
        if !self.inode(ino)?.xattrs.contains_key(name) {
            return Err(FsError::NoData);
        }
        self.touch(ino);
        self.inode(ino)?.xattrs.remove(name);
        self.store_xattrs(ino)
    }

    // ----- opens -----

    /// Open by `node`. With `persist` (a node of protocol version 3 or older, which does
    /// not re-announce its opens) the count is journaled in the inode; otherwise it is
    /// kept in memory only.
    pub fn open(&mut self, node: NodeId, ino: InodeId, persist: bool) -> Result<Response, FsError> {
        let idx = self.node_index(node)?;
        let c = self.inode(ino)?;
        if persist {
            let v = c.inode.opens[idx];
            if v == u16::MAX {
                return Err(FsError::Invalid(
                    "too many opens of one inode on one node".into(),
                ));
            }
            c.inode.opens[idx] = v + 1;
            self.touch(ino);
            self.settle(ino)?;
            return self.mapped(ino, 0, u64::MAX);
        }
        // Counted only once the answer is there: a failed open holds nothing.
        let r = self.mapped(ino, 0, u64::MAX)?;
        self.add_volatile(ino, idx, 1);
        Ok(r)
    }

    /// `open` of a node of protocol version 4 or later, answered only from memory: `None`
    /// when that needs a device read (nothing was counted then).
    pub fn open_cached(&mut self, node: NodeId, ino: InodeId) -> Option<Result<Response, FsError>> {
        let idx = match self.node_index(node) {
            Ok(i) => i,
            Err(e) => return Some(Err(e)),
        };
        let r = self.without_device_reads(|m| m.mapped(ino, 0, u64::MAX))?;
        if r.is_ok() {
            self.add_volatile(ino, idx, 1);
        }
        Some(r)
    }

    /// `release` of a node of protocol version 4 or later when it only lowers a count in
    /// memory: the inode is cached, linked, not held and counted open by the node. `None`
    /// otherwise (nothing changed then).
    pub fn release_cached(&mut self, node: NodeId, ino: InodeId) -> Option<()> {
        let idx = self.node_index(node).ok()?;
        let c = self.inodes.get(&ino)?;
        if Self::is_dead(c) || c.inode.held || Self::persisted_opens(c) > 0 {
            return None;
        }
        let n = self.opens.get(&ino).map_or(0, |v| v[idx]);
        if n == 0 {
            return None;
        }
        self.drop_volatile(ino, idx, 1);
        if n == 1 {
            self.claims.release(ino, node);
        }
        Some(())
    }

    fn node_index(&self, node: NodeId) -> Result<usize, FsError> {
        if node.0 == 0 || node.0 > self.g.max_nodes {
            return Err(FsError::Invalid(format!(
                "{node} is not a node of this volume"
            )));
        }
        usize::try_from(node.0 - 1).map_err(|_| FsError::Invalid("node".into()))
    }

    /// Release of one open by `node`: an in-memory count first (or, with `persist`, the
    /// journaled one first), then the other kind. An inode that is gone already has nothing
    /// to release.
    pub fn release(&mut self, node: NodeId, ino: InodeId, persist: bool) -> Result<(), FsError> {
        let idx = self.node_index(node)?;
        let in_memory = self.opens.get(&ino).map_or(0, |v| v[idx]);
        let c = match self.inode(ino) {
            Ok(c) => c,
            Err(FsError::Stale) => return Ok(()),
            Err(e) => return Err(e),
        };
        let on_disk = c.inode.opens[idx];
        let from_disk = on_disk > 0 && (persist || in_memory == 0);
        if from_disk {
            c.inode.opens[idx] = on_disk - 1;
            self.touch(ino);
        } else if in_memory > 0 {
            self.drop_volatile(ino, idx, 1);
        } else {
            // Nothing to release (e.g. released by node_gone already).
            return Ok(());
        }
        let left = if from_disk { on_disk - 1 } else { on_disk };
        if left == 0 && self.opens.get(&ino).map_or(0, |v| v[idx]) == 0 {
            // Its last open here: nothing of the node's is left uncommitted in the file.
            self.claims.release(ino, node);
        }
        self.settle(ino)
    }

    /// Raises the in-memory count of node index `idx` on `ino` by `n`.
    fn add_volatile(&mut self, ino: InodeId, idx: usize, n: u32) {
        let nodes = usize::try_from(self.g.max_nodes).unwrap_or(64);
        let v = self.opens.entry(ino).or_insert_with(|| vec![0; nodes]);
        v[idx] = v[idx].saturating_add(n);
    }

    /// Lowers the in-memory count of node index `idx` on `ino` by `n`.
    fn drop_volatile(&mut self, ino: InodeId, idx: usize, n: u32) {
        if let Some(v) = self.opens.get_mut(&ino) {
            v[idx] = v[idx].saturating_sub(n);
            if v.iter().all(|c| *c == 0) {
                self.opens.remove(&ino);
            }
        }
    }

    /// A node's open handles after a takeover (`Reopen`): added to what this coordinator
    /// counted for it already (requests resent across the takeover). Inodes that are gone
    /// are skipped. Only a node's first `Reopen` counts; a second one is ignored.
    pub fn reopen(&mut self, node: NodeId, opens: &[(InodeId, u32)]) -> Result<(), FsError> {
        self.node_index(node)?;
        if self.reopened.contains(&node) {
            tracing::info!(%node, "ignoring a second re-announcement of the node's opens");
            return Ok(());
        }
        self.count_opens(node, opens)?;
        self.reopened.insert(node);
        Ok(())
    }

    /// Adds open handles of `node` to the in-memory counts; inodes that are gone are
    /// skipped. All or nothing: an inode that cannot be read fails the call before anything
    /// counts, so the node's retry counts everything once.
    pub fn count_opens(&mut self, node: NodeId, opens: &[(InodeId, u32)]) -> Result<(), FsError> {
        let idx = self.node_index(node)?;
        let mut live = Vec::with_capacity(opens.len());
        for (ino, n) in opens {
            match self.inode(*ino) {
                Ok(_) => live.push((*ino, *n)),
                Err(FsError::Stale | FsError::NotFound | FsError::Invalid(_)) => {}
                Err(e) => return Err(e),
            }
        }
        for (ino, n) in live {
            self.add_volatile(ino, idx, n);
        }
        Ok(())
    }

    /// Drops every open of `node`.
    pub fn node_gone(&mut self, node: NodeId) -> Result<(), FsError> {
        let idx = self.node_index(node)?;
        self.claims.release_node(node);
        self.open_ids.remove(&node);
        self.reopened.remove(&node);
        let counted: Vec<InodeId> = self
            .opens
            .iter()
            .filter(|(_, v)| v[idx] != 0)
            .map(|(ino, _)| *ino)
            .collect();
        for ino in counted {
            self.drop_volatile(ino, idx, u32::MAX);
            self.settle(ino)?;
        }
        let held: Vec<InodeId> = self.held_prev.keys().copied().collect();
        for ino in held {
            let c = self.inode(ino)?;
            if c.inode.opens[idx] != 0 {
                c.inode.opens[idx] = 0;
                self.touch(ino);
                self.settle(ino)?;
            }
        }
        Ok(())
    }

    /// Ends the orphan grace: frees held inodes that nobody holds (after a crash or
    /// failover, once the nodes had time to re-announce their opens). Returns how many.
    pub fn reap_orphans(&mut self) -> Result<u64, FsError> {
        self.orphan_grace = false;
        let held: Vec<InodeId> = self.held_prev.keys().copied().collect();
        let mut n = 0;
        for ino in held {
            let c = self.inode(ino)?;
            let unheld = Self::is_dead(c) && Self::persisted_opens(c) == 0;
            if unheld && self.volatile_opens(ino) == 0 {
                n += 1;
            }
            self.settle(ino)?;
        }
        Ok(n)
    }

    // ----- data allocation -----

    fn file_inode(&mut self, ino: InodeId) -> Result<(), FsError> {
        match self.inode(ino)?.inode.kind {
            FileKind::File => Ok(()),
            FileKind::Dir => Err(FsError::IsDir),
            _ => Err(FsError::Invalid("not a regular file".into())),
        }
    }

    /// Maps every hole of file clusters [a, b) to new unwritten clusters; `required` of them
    /// must succeed (else `NoSpace` before anything changes), the rest is best effort.
    fn allocate_range(
        &mut self,
        ino: InodeId,
        a: u64,
        b: u64,
        extra_end: u64,
    ) -> Result<u64, FsError> {
        let exts = self.inode(ino)?.extents();
        let holes = extmap::holes(&exts, a, b);
        let need: u64 = holes.iter().map(|(s, e)| e - s).sum();
        if need > self.clusters.free {
            return Err(FsError::NoSpace);
        }
        // Best-effort preallocation past b, up to the next mapped cluster.
        let mut extra_holes = Vec::new();
        if extra_end > b {
            let next_mapped = exts
                .iter()
                .find(|e| e.file_end() > b)
                .map(|e| e.file_cluster);
            let end = next_mapped.map_or(extra_end, |n| n.min(extra_end));
            if end > b && self.clusters.free > need {
                let room = self.clusters.free - need;
                extra_holes.push((b, end.min(b + room)));
            }
        }
        if need == 0 && extra_holes.is_empty() {
            return Ok(b);
        }
        let mut all_holes = holes;
        all_holes.extend(extra_holes);
        let upto = all_holes.last().map_or(b, |h| h.1.max(b));
        let (lo, hi) = (a, upto);
        self.modify_extents(ino, lo, hi, |ext, m| {
            for (s, e) in all_holes {
                let mut pos = s;
                while pos < e {
                    let goal = extmap::find(ext, pos.saturating_sub(1))
                        .filter(|p| p.file_end() == pos)
                        .map(|p| p.lun_end());
                    let Some((start, got)) = m.alloc_clusters(goal, e - pos) else {
                        return Err(FsError::NoSpace);
                    };
                    extmap::insert(
                        ext,
                        DiskExtent {
                            file_cluster: pos,
                            lun_cluster: start,
                            len_clusters: u32::try_from(got).unwrap_or(u32::MAX),
                            unwritten: true,
                        },
                    );
                    pos += got;
                }
            }
            Ok(())
        })?;
        Ok(upto)
    }

    /// Allocate request from `node`: allocates, then claims the range's unwritten clusters.
    pub fn allocate(
        &mut self,
        node: NodeId,
        ino: InodeId,
        off: u64,
        len: u64,
        hint: u64,
    ) -> Result<Response, FsError> {
        self.file_inode(ino)?;
        let end = off.checked_add(len).ok_or(FsError::FileTooLarge)?;
        if end > MAX_FILE_BYTES {
            return Err(FsError::FileTooLarge);
        }
        if len == 0 {
            return self.mapped(ino, off, 0);
        }
        let cs = self.cs();
        let a = off / cs;
        let b = end.div_ceil(cs);
        let extra = end.saturating_add(hint).min(MAX_FILE_BYTES).div_ceil(cs);
        let upto = self.allocate_range(ino, a, b, extra)?;
        // Already allocated unwritten clusters ahead (a preallocation, a fallocated file)
        // are claimed too, up to `CLAIM_AHEAD_BYTES`: a writer moving through them then
        // needs one Allocate per window, not one per cluster.
        let ahead = a.saturating_add((CLAIM_AHEAD_BYTES / cs).max(1));
        let claim_end = upto.max(extra).max(ahead).min(MAX_FILE_BYTES.div_ceil(cs));
        self.claimed_map(node, ino, off, claim_end * cs - off)
    }

    /// The answer to `node`'s Allocate of [off, off+len): written extents as they are,
    /// and the unwritten clusters of the range that `node` now holds the claim of
    /// (claimed here unless another node holds them; those are left out).
    pub fn claimed_map(
        &mut self,
        node: NodeId,
        ino: InodeId,
        off: u64,
        len: u64,
    ) -> Result<Response, FsError> {
        let attr = self.attr(ino)?;
        let cs = self.cs();
        let a = off / cs;
        let b = off.saturating_add(len).div_ceil(cs);
        let exts = self.inode(ino)?.extents();
        let mut extents = Vec::new();
        for e in exts
            .iter()
            .filter(|e| e.file_end() > a && e.file_cluster < b)
        {
            if !e.unwritten {
                extents.push(self.to_extent(e));
                continue;
            }
            // Runs of clusters this node holds, each as an extent of its own.
            let mut run: Option<DiskExtent> = None;
            for fc in e.file_cluster.max(a)..e.file_end().min(b) {
                if self.claims.take(ino, fc, node) {
                    let r = run.get_or_insert(DiskExtent {
                        file_cluster: fc,
                        lun_cluster: ClusterNo(e.lun_cluster.0 + (fc - e.file_cluster)),
                        len_clusters: 0,
                        unwritten: true,
                    });
                    r.len_clusters += 1;
                } else if let Some(r) = run.take() {
                    extents.push(self.to_extent(&r));
                }
            }
            if let Some(r) = run {
                extents.push(self.to_extent(&r));
            }
        }
        Ok(Response::Mapped { attr, extents })
    }

    /// Commit request.
    pub fn commit(
        &mut self,
        ino: InodeId,
        written: &[ByteRange],
        size: u64,
    ) -> Result<Attr, FsError> {
        self.file_inode(ino)?;
        if size > MAX_FILE_BYTES {
            return Err(FsError::FileTooLarge);
        }
        let cs = self.cs();
        for r in written {
            if r.len_bytes == 0 {
                continue;
            }
            let end = r
                .offset_bytes
                .checked_add(r.len_bytes)
                .ok_or(FsError::FileTooLarge)?;
            let (a, b) = (r.offset_bytes / cs, end.div_ceil(cs));
            self.modify_extents(ino, a, b, |ext, _| {
                extmap::set_unwritten(ext, a, b, false);
                Ok(())
            })?;
        }
        let t = now();
        let c = self.inode(ino)?;
        if size > c.inode.size_bytes {
            c.inode.size_bytes = size;
        }
        c.inode.mtime = t;
        c.inode.ctime = t;
        self.touch(ino);
        self.attr(ino)
    }

    /// Zeroes file bytes [from, to) on the LUN where they lie in written clusters.
    fn zero_written(&mut self, ino: InodeId, from: u64, to: u64) -> Result<(), FsError> {
        if from >= to {
            return Ok(());
        }
        let cs = self.cs();
        let exts = self.inode(ino)?.extents();
        let mark = self.dev.write_loss_count();
        let mut pos = from;
        let mut any = false;
        while pos < to {
            let fc = pos / cs;
            let cend = ((fc + 1) * cs).min(to);
            if let Some(e) = extmap::find(&exts, fc) {
                if !e.unwritten {
                    let lun = self
                        .g
                        .cluster_offset(ClusterNo(e.lun_cluster.0 + (fc - e.file_cluster)))
                        + pos % cs;
                    self.dev
                        .write_zeroes(lun, cend - pos)
                        .or_else(|_| {
                            let z = vec![0u8; usize::try_from(cend - pos).unwrap_or(0)];
                            self.dev.write_at(&z, lun, WriteFlags::default())
                        })
                        .map_err(|e| io_err("zero a partial cluster", e))?;
                    any = true;
                }
            }
            pos = cend;
        }
        if any {
            block_client::flush_since(&*self.dev, mark)
                .map_err(|e| io_err("flush zeroed data", e))?;
        }
        Ok(())
    }

    /// Frees the clusters of file clusters >= `from_cluster`.
    fn free_from(&mut self, ino: InodeId, from_cluster: u64) -> Result<(), FsError> {
        self.modify_extents(ino, from_cluster, u64::MAX, |ext, m| {
            for (start, n) in extmap::remove_range(ext, from_cluster, u64::MAX) {
                m.free_clusters(start, n);
            }
            Ok(())
        })
    }

    /// Setattr.
    pub fn setattr(&mut self, ino: InodeId, set: &SetAttr) -> Result<Attr, FsError> {
        let kind = self.inode(ino)?.inode.kind;
        let t = now();
        if let Some(size) = set.size_bytes {
            match kind {
                FileKind::File => {}
                FileKind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("size change of a special file".into())),
            }
            if size > MAX_FILE_BYTES {
                return Err(FsError::FileTooLarge);
            }
            let old = self.inode(ino)?.inode.size_bytes;
            if size < old {
                let cs = self.cs();
                let keep = size.div_ceil(cs);
                // Zero the tail of the last kept cluster so a later extension reads zeros.
                self.zero_written(ino, size, (keep * cs).min(old))?;
                self.free_from(ino, keep)?;
            }
            let c = self.inode(ino)?;
            c.inode.size_bytes = size;
            if size != old {
                c.inode.mtime = t;
            }
        }
        let c = self.inode(ino)?;
        if let Some(p) = set.perm {
            c.inode.perm = p & 0o7777;
        }
        if let Some(u) = set.uid {
            c.inode.uid = u;
        }
        if let Some(g) = set.gid {
            c.inode.gid = g;
        }
        let ts = |s: TimeSet| match s {
            TimeSet::Now => t,
            TimeSet::At(x) => x,
        };
        if let Some(a) = set.atime {
            c.inode.atime = ts(a);
        }
        if let Some(m) = set.mtime {
            c.inode.mtime = ts(m);
        }
        c.inode.ctime = t;
        self.touch(ino);
        self.attr(ino)
    }

    /// Fallocate.
    pub fn fallocate(
        &mut self,
        ino: InodeId,
        off: u64,
        len: u64,
        mode: FallocMode,
    ) -> Result<Attr, FsError> {
        self.file_inode(ino)?;
        if len == 0 {
            return Err(FsError::Invalid("fallocate of zero bytes".into()));
        }
        let end = off.checked_add(len).ok_or(FsError::FileTooLarge)?;
        if end > MAX_FILE_BYTES {
            return Err(FsError::FileTooLarge);
        }
        let cs = self.cs();
        let t = now();
        match mode {
            FallocMode::Allocate | FallocMode::KeepSize => {
                let (a, b) = (off / cs, end.div_ceil(cs));
                self.allocate_range(ino, a, b, b)?;
                let c = self.inode(ino)?;
                if mode == FallocMode::Allocate && end > c.inode.size_bytes {
                    c.inode.size_bytes = end;
                    c.inode.mtime = t;
                }
            }
            FallocMode::PunchHole => {
                let (fa, fb) = (off.div_ceil(cs), end / cs);
                let head_end = (fa * cs).min(end);
                self.zero_written(ino, off, head_end)?;
                if fb >= fa {
                    self.zero_written(ino, (fb * cs).max(head_end), end)?;
                    self.modify_extents(ino, fa, fb, |ext, m| {
                        for (start, n) in extmap::remove_range(ext, fa, fb) {
                            m.free_clusters(start, n);
                        }
                        Ok(())
                    })?;
                }
            }
            FallocMode::ZeroRange => {
                let (fa, fb) = (off.div_ceil(cs), end / cs);
                let head_end = (fa * cs).min(end);
                self.zero_written(ino, off, head_end)?;
                if fb >= fa {
                    self.zero_written(ino, (fb * cs).max(head_end), end)?;
                    self.allocate_range(ino, fa, fb, fb)?;
                    self.modify_extents(ino, fa, fb, |ext, _| {
                        extmap::set_unwritten(ext, fa, fb, true);
                        Ok(())
                    })?;
                }
                let c = self.inode(ino)?;
                if end > c.inode.size_bytes {
                    c.inode.size_bytes = end;
                }
                c.inode.mtime = t;
            }
        }
        let c = self.inode(ino)?;
        c.inode.ctime = t;
        self.touch(ino);
        self.attr(ino)
    }
}
