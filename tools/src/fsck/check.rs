//! The passes of fsck (see the module documentation of `fsck` for their order).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_client::{BlockDevice, WriteFlags};
use journal::{Epoch as JEpoch, Journal, ReplayError};
use metadata_server::format::lease::LeaseRecord;
use metadata_server::format::{
    BitmapBlock, BitmapKind, BlobBlock, BlobKind, DirBlock, DirBlockEntry, DiskExtent, DrcSlot,
    ExtentBlock, Geometry, Inode, InodeSlot, Superblock, SuperblockCopy, Transaction, VolumeState,
    BITMAP_BITS_PER_BLOCK, BLOCK_BYTES, DRC_SLOT_BYTES, EXTENTS_PER_BLOCK, INLINE_EXTENTS,
    INLINE_SYMLINK_BYTES, INLINE_XATTR_BYTES, INODE_BYTES,
};
use metadata_server::types::{BlockNo, ClusterNo, FileKind, InodeId};

use super::dirs::{layout, partitions};
use super::overlay::Overlay;
use super::{Finding, FindingKind, FsckError, FsckOptions, FsckReport};

/// A bit per item.
#[derive(Debug, Clone)]
struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    fn new(len: u64) -> Bits {
        let n = usize::try_from(len.div_ceil(64)).expect("bitmaps of this volume fit in memory");
        Bits {
            words: vec![0; n],
            len,
        }
    }
    fn idx(i: u64) -> (usize, u64) {
        (
            usize::try_from(i / 64).expect("bit index fits in memory"),
            1u64 << (i % 64),
        )
    }
    fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, m) = Bits::idx(i);
        self.words[w] & m != 0
    }
    fn set(&mut self, i: u64, v: bool) {
        if i >= self.len {
            return;
        }
        let (w, m) = Bits::idx(i);
        if v {
            self.words[w] |= m;
        } else {
            self.words[w] &= !m;
        }
    }
    fn set_range(&mut self, start: u64, end: u64, v: bool) {
        for i in start..end.min(self.len) {
            self.set(i, v);
        }
    }
}

/// The decoded blocks of a chain (block number, contents) and why it broke, if it did.
type Chain<T> = (Vec<(u64, T)>, Option<String>);

/// A file's extent map as fsck sees it.
#[derive(Debug, Clone, Default)]
struct FileMap {
    extents: Vec<DiskExtent>,
    chain: Vec<u64>,
    dirty: bool,
}

/// A directory as fsck sees it.
#[derive(Debug, Clone, Default)]
struct DirModel {
    entries: Vec<DirBlockEntry>,
    blocks: Vec<u64>,
    dirty: bool,
    decoded_entries: u64,
}

/// One finding before its paths are known: `{path:N}` in texts is replaced at the end.
struct Pending {
    kind: FindingKind,
    message: String,
    action: String,
    fixable: bool,
}

fn ip(ino: u64) -> String {
    format!("{{path:{ino}}}")
}

struct Checker<'a> {
    dev: Arc<dyn BlockDevice>,
    opts: &'a FsckOptions,
    sb: Superblock,
    g: Geometry,
    cluster_bytes: u64,
    pending: Vec<Pending>,
    notes: Vec<String>,
    inodes: BTreeMap<u64, Inode>,
    dirty_inodes: BTreeSet<u64>,
    cleared: BTreeSet<u64>,
    files: BTreeMap<u64, FileMap>,
    dirs: BTreeMap<u64, DirModel>,
    /// Blob chains (symlink target or xattrs) per inode.
    blobs: BTreeMap<u64, Vec<u64>>,
    meta_owner: HashMap<u64, u64>,
    seen_meta: HashSet<u64>,
    seen_inodes: BTreeSet<u64>,
    cbits: Bits,
    ibits: Bits,
    mbits: Bits,
    bad_bitmap_blocks: [BTreeSet<u64>; 3],
    seen_clusters: Bits,
    meta_cursor: u64,
    cluster_cursor: u64,
    final_clusters: Option<Bits>,
    names: HashMap<u64, (u64, Vec<u8>)>,
    sb_dirty: bool,
    backup_dirty: bool,
    last_progress: Instant,
}

fn kind_index(k: BitmapKind) -> usize {
    match k {
        BitmapKind::Clusters => 0,
        BitmapKind::Inodes => 1,
        BitmapKind::Meta => 2,
    }
}

fn kind_name(k: BitmapKind) -> &'static str {
    match k {
        BitmapKind::Clusters => "cluster",
        BitmapKind::Inodes => "inode",
        BitmapKind::Meta => "metadata-block",
    }
}

fn file_kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "directory",
        FileKind::Symlink => "symbolic link",
        FileKind::CharDev => "character device",
        FileKind::BlockDev => "block device",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
        FileKind::Invalid => "invalid",
    }
}

fn usize_of(v: u64) -> Result<usize, FsckError> {
    usize::try_from(v).map_err(|_| FsckError::Corrupt {
        what: format!("length {v} does not fit in memory"),
        at: 0,
    })
}

/// Runs every pass on `base`; see the module documentation of `fsck`.
pub fn check(base: Arc<dyn BlockDevice>, opts: &FsckOptions) -> Result<FsckReport, FsckError> {
    let read =
        Superblock::read(base.as_ref()).map_err(|source| FsckError::Superblock { source })?;
    let overlay = Arc::new(Overlay::new(base.clone()));
    let dev: Arc<dyn BlockDevice> = overlay.clone();
    let sb = read.superblock.clone();
    let g = sb.geometry;
    let mut c = Checker {
        dev: dev.clone(),
        opts,
        cluster_bytes: u64::from(g.cluster_bytes),
        sb,
        g,
        pending: Vec::new(),
        notes: Vec::new(),
        inodes: BTreeMap::new(),
        dirty_inodes: BTreeSet::new(),
        cleared: BTreeSet::new(),
        files: BTreeMap::new(),
        dirs: BTreeMap::new(),
        blobs: BTreeMap::new(),
        meta_owner: HashMap::new(),
        seen_meta: HashSet::new(),
        seen_inodes: BTreeSet::new(),
        cbits: Bits::new(g.cluster_count),
        ibits: Bits::new(g.inode_count),
        mbits: Bits::new(g.meta.len_blocks),
        bad_bitmap_blocks: Default::default(),
        seen_clusters: Bits::new(g.cluster_count),
        meta_cursor: 0,
        cluster_cursor: 0,
        final_clusters: None,
        names: HashMap::new(),
        sb_dirty: false,
        backup_dirty: false,
        last_progress: Instant::now(),
    };
    if read.copy == SuperblockCopy::Backup {
        c.find(
            FindingKind::BadPrimarySuperblock,
            "the primary superblock (byte 0) is damaged; the backup at the end of the device is intact".into(),
            "rewrote the primary superblock from the backup".into(),
        );
        c.sb_dirty = true;
    } else {
        c.check_backup()?;
    }
    c.check_lease()?;
    let (journal_records, journal_reset, journal_epoch) = c.replay_journal()?;
    if read.copy == SuperblockCopy::Primary && journal_records > 0 {
        // The journal may have rewritten the superblock (held list, state).
        let b = c.read(0, 4096)?;
        if let Ok(sb) = Superblock::decode(&b, 0) {
            c.sb = sb;
        }
    }
    let mut report = FsckReport {
        findings: Vec::new(),
        repaired: false,
        journal_records,
        skipped_clean: false,
        inodes: 0,
        directories: 0,
        clusters_used: 0,
        clusters_total: g.cluster_count,
        notes: Vec::new(),
    };
    if !opts.force
        && c.sb.state == VolumeState::Clean
        && journal_records == 0
        && c.pending.is_empty()
    {
        report.skipped_clean = true;
        report.notes = std::mem::take(&mut c.notes);
        return Ok(report);
    }
    c.load_bitmaps()?;
    c.load_inodes()?;
    let root = c.sb.root.0;
    if c.inodes.get(&root).is_none_or(|i| i.kind != FileKind::Dir) {
        c.pending.push(Pending {
            kind: FindingKind::BadChecksum,
            message: format!("the root directory (inode {root}) is damaged or not a directory"),
            action: "cannot repair: the namespace has no root".into(),
            fixable: false,
        });
        report.findings = c.resolve();
        report.notes = c.notes;
        return Ok(report);
    }
    c.load_structures()?;
    c.cross_links()?;
    let (refs, subdirs) = c.namespace()?;
    c.link_counts(&refs, &subdirs);
    c.held_list(&refs);
    c.records()?;
    c.write_model()?;
    c.bitmaps()?;
    let changed = c.sb_dirty || !c.pending.is_empty() || journal_reset;
    if changed {
        c.sb.state = VolumeState::Clean;
        let block = c.sb.encode_block();
        c.write(0, &block)?;
        if c.backup_dirty || read.copy == SuperblockCopy::Backup {
            c.write(c.sb.backup_offset(), &block)?;
        }
    }
    if journal_reset {
        Journal::format(
            dev.clone(),
            g.journal.start_bytes(),
            g.journal.len_bytes(),
            journal_epoch,
        )
        .map_err(|e| FsckError::Corrupt {
            what: format!("reset the journal: {e}"),
            at: g.journal.start_bytes(),
        })?;
    }
    report.inodes = c.inodes.len() as u64;
    report.directories = c.dirs.len() as u64;
    report.clusters_used = c.final_clusters.as_ref().map_or(0, |b| {
        b.words.iter().map(|w| u64::from(w.count_ones())).sum()
    });
    report.findings = c.resolve();
    report.notes = std::mem::take(&mut c.notes);
    if opts.mode.repairs() && changed {
        overlay
            .write_back((g.journal.start_bytes(), g.journal.len_bytes()))
            .map_err(|source| FsckError::Io {
                what: "write repairs",
                at: 0,
                source,
            })?;
        report.repaired = true;
    }
    Ok(report)
}

impl Checker<'_> {
    fn find(&mut self, kind: FindingKind, message: String, action: String) {
        tracing::debug!(?kind, %message, "fsck finding");
        self.pending.push(Pending {
            kind,
            message,
            action,
            fixable: true,
        });
    }

    fn progress(&mut self, what: &str, done: u64, total: u64) {
        if self.opts.progress && self.last_progress.elapsed() >= Duration::from_millis(500) {
            self.last_progress = Instant::now();
            super::output::progress(what, done, total);
        }
    }

    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>, FsckError> {
        let mut b = vec![0u8; len];
        self.dev
            .read_at(&mut b, at)
            .map_err(|source| FsckError::Io {
                what: "read",
                at,
                source,
            })?;
        Ok(b)
    }

    fn read_block(&self, b: u64) -> Result<Vec<u8>, FsckError> {
        self.read(b * BLOCK_BYTES, 4096)
    }

    fn write(&self, at: u64, bytes: &[u8]) -> Result<(), FsckError> {
        self.dev
            .write_at(bytes, at, WriteFlags::default())
            .map_err(|source| FsckError::Io {
                what: "write",
                at,
                source,
            })
    }

    fn path_of(&self, ino: u64) -> String {
        if ino == self.sb.root.0 {
            return "/".into();
        }
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == self.sb.root.0 {
                parts.reverse();
                return format!("/{}", parts.join("/"));
            }
            match self.names.get(&cur) {
                Some((parent, name)) => {
                    parts.push(String::from_utf8_lossy(name).into_owned());
                    cur = *parent;
                }
                None => break,
            }
        }
        String::new()
    }

    fn resolve(&self) -> Vec<Finding> {
        let fix = |s: &str| -> String {
            let mut out = String::new();
            let mut rest = s;
            while let Some(i) = rest.find("{path:") {
                out.push_str(&rest[..i]);
                let after = &rest[i + 6..];
                let Some(j) = after.find('}') else {
                    out.push_str(&rest[i..]);
                    rest = "";
                    break;
                };
                let ino: u64 = after[..j].parse().unwrap_or(0);
                let p = self.path_of(ino);
                if p.is_empty() {
                    out.push_str(&format!("inode {ino} (not in any directory)"));
                } else {
                    out.push_str(&format!("inode {ino} ({p})"));
                }
                rest = &after[j + 1..];
            }
            out.push_str(rest);
            out
        };
        self.pending
            .iter()
            .map(|p| Finding {
                kind: p.kind,
                message: fix(&p.message),
                action: if p.fixable {
                    fix(&p.action)
                } else {
                    p.action.clone()
                },
                repairable: p.fixable,
            })
            .collect()
    }

    // ---- superblock, lease, journal -------------------------------------------------

    fn check_backup(&mut self) -> Result<(), FsckError> {
        let at = self.sb.backup_offset();
        if at + 4096 > self.dev.size_bytes() {
            self.find(
                FindingKind::BadBackupSuperblock,
                format!("the backup superblock location (byte {at}) is past the end of the device"),
                "cannot repair: the device shrank".into(),
            );
            if let Some(p) = self.pending.last_mut() {
                p.fixable = false;
            }
            return Ok(());
        }
        let b = self.read(at, 4096)?;
        match Superblock::decode(&b, at) {
            Ok(bk) if bk.volume == self.sb.volume && bk.geometry == self.sb.geometry => {}
            Ok(_) => {
                self.find(
                    FindingKind::BadBackupSuperblock,
                    format!(
                        "the backup superblock (byte {at}) describes a different layout or volume"
                    ),
                    "rewrote the backup superblock from the primary".into(),
                );
                self.backup_dirty = true;
            }
            Err(e) => {
                self.find(
                    FindingKind::BadBackupSuperblock,
                    format!("the backup superblock is damaged: {e}"),
                    "rewrote the backup superblock from the primary".into(),
                );
                self.backup_dirty = true;
            }
        }
        Ok(())
    }

    fn check_lease(&mut self) -> Result<(), FsckError> {
        let at = self.g.lease_offset();
        let b = self.read(at, 4096)?;
        let rec = match LeaseRecord::decode(&b, at) {
            Ok(r) => r,
            Err(_) => return Ok(()), // reported with the other lease records
        };
        let Some(rec) = rec else { return Ok(()) };
        let Some(node) = rec.node else { return Ok(()) };
        if !self.opts.mode.repairs() {
            self.notes.push(format!(
                "the coordinator lease is held by node {node} ({}, {}); if that coordinator is running, it may change the volume while it is checked",
                rec.addr, rec.epoch
            ));
            return Ok(());
        }
        if self.opts.ignore_lease {
            self.notes.push(format!(
                "the coordinator lease is held by node {node}; ignored as asked"
            ));
            return Ok(());
        }
        let wait = self
            .opts
            .lease_wait_ms
            .unwrap_or_else(|| u64::from(rec.timeout_ms).min(30_000));
        std::thread::sleep(Duration::from_millis(wait));
        let b2 = self.read(at, 4096)?;
        if let Ok(Some(now)) = LeaseRecord::decode(&b2, at) {
            if now.counter != rec.counter || now.epoch != rec.epoch {
                return Err(FsckError::LeaseLive {
                    node: node.0,
                    addr: now.addr,
                });
            }
        }
        self.notes.push(format!(
            "the coordinator lease is held by node {node} ({}) but was not renewed for {wait} ms: its coordinator is gone",
            rec.addr
        ));
        Ok(())
    }

    /// Returns (records replayed, whether the journal must be emptied, its epoch).
    fn replay_journal(&mut self) -> Result<(usize, bool, JEpoch), FsckError> {
        let j = self.g.journal;
        let summary =
            match Journal::replay_read_only(self.dev.as_ref(), j.start_bytes(), j.len_bytes()) {
                Ok(s) => s,
                Err(ReplayError::Read { at_bytes, source }) => {
                    return Err(FsckError::Io {
                        what: "read journal",
                        at: at_bytes,
                        source,
                    })
                }
                Err(e) => {
                    self.find(
                        FindingKind::JournalCorrupt,
                        format!("the journal cannot be replayed: {e}"),
                        "emptied the journal; the transactions in it are lost".into(),
                    );
                    return Ok((0, true, JEpoch(1)));
                }
            };
        let size = self.dev.size_bytes();
        let mut applied = 0usize;
        for rec in &summary.records {
            let txn = match Transaction::decode(&rec.payload, rec.lsn.0) {
                Ok(t) => t,
                Err(e) => {
                    self.find(
                        FindingKind::JournalCorrupt,
                        format!(
                            "journal record {} does not hold a valid transaction: {e}",
                            rec.lsn
                        ),
                        "replayed the records before it and emptied the journal".into(),
                    );
                    return Ok((applied, true, summary.epoch));
                }
            };
            let bad = txn.writes.iter().any(|w| {
                let end = w.offset_bytes.checked_add(w.bytes.len() as u64);
                end.is_none_or(|e| e > size)
                    || (w.offset_bytes < j.end_bytes() && end.is_some_and(|e| e > j.start_bytes()))
            });
            if bad {
                self.find(
                    FindingKind::JournalCorrupt,
                    format!(
                        "journal record {} writes outside the metadata regions",
                        rec.lsn
                    ),
                    "replayed the records before it and emptied the journal".into(),
                );
                return Ok((applied, true, summary.epoch));
            }
            for w in &txn.writes {
                self.write(w.offset_bytes, &w.bytes)?;
            }
            applied += 1;
        }
        if applied > 0 {
            self.notes.push(format!(
                "replayed {applied} journal transaction(s) ({} to {})",
                summary.tail_lsn,
                summary.next_lsn.0.saturating_sub(1)
            ));
        }
        Ok((applied, applied > 0, summary.epoch))
    }

    // ---- bitmaps and inodes ------------------------------------------------------------

    fn load_bitmaps(&mut self) -> Result<(), FsckError> {
        for kind in [BitmapKind::Clusters, BitmapKind::Inodes, BitmapKind::Meta] {
            let r = self.g.bitmap_region(kind);
            let nbits = self.g.bitmap_bits(kind);
            let mut idx = 0u64;
            while idx < r.len_blocks {
                let n = (r.len_blocks - idx).min(256);
                let at = r.start_bytes() + idx * BLOCK_BYTES;
                let buf = self.read(at, usize_of(n * BLOCK_BYTES)?)?;
                for k in 0..n {
                    let i = idx + k;
                    let lo = usize_of(k * BLOCK_BYTES)?;
                    let bytes = &buf[lo..lo + 4096];
                    let bat = at + k * BLOCK_BYTES;
                    match BitmapBlock::decode(bytes, bat, kind, i) {
                        Ok(b) => {
                            let first = i * BITMAP_BITS_PER_BLOCK;
                            let last = (first + BITMAP_BITS_PER_BLOCK).min(nbits);
                            let target = match kind {
                                BitmapKind::Clusters => &mut self.cbits,
                                BitmapKind::Inodes => &mut self.ibits,
                                BitmapKind::Meta => &mut self.mbits,
                            };
                            for item in first..last {
                                if b.get(item - first) {
                                    target.set(item, true);
                                }
                            }
                        }
                        Err(e) => {
                            self.find(
                                FindingKind::BadChecksum,
                                format!("{} bitmap block {i} is damaged: {e}", kind_name(kind)),
                                "rebuilt it from what the files and directories own".into(),
                            );
                            self.bad_bitmap_blocks[kind_index(kind)].insert(i);
                        }
                    }
                }
                idx += n;
            }
        }
        Ok(())
    }

    fn inode_bitmap_block_bad(&self, ino: u64) -> bool {
        self.bad_bitmap_blocks[1].contains(&(ino / BITMAP_BITS_PER_BLOCK))
    }

    fn load_inodes(&mut self) -> Result<(), FsckError> {
        let total = self.g.inode_count;
        let mut ino = 1u64;
        while ino < total {
            let candidate = |c: &Checker<'_>, i: u64| c.ibits.get(i) || c.inode_bitmap_block_bad(i);
            if !candidate(self, ino) {
                ino += 1;
                continue;
            }
            let mut end = ino + 1;
            while end < total && end - ino < 1024 && candidate(self, end) {
                end += 1;
            }
            let at = self.g.inode_offset(InodeId(ino));
            let buf = self.read(at, usize_of((end - ino) * INODE_BYTES)?)?;
            for i in ino..end {
                let lo = usize_of((i - ino) * INODE_BYTES)?;
                let bytes = &buf[lo..lo + 1024];
                let iat = at + (i - ino) * INODE_BYTES;
                let marked = self.ibits.get(i);
                match InodeSlot::decode(bytes, iat, InodeId(i)) {
                    Ok(InodeSlot::Used(inode)) => {
                        self.seen_inodes.insert(i);
                        self.inodes.insert(i, *inode);
                    }
                    Ok(InodeSlot::Empty | InodeSlot::Free { .. }) => {
                        if marked {
                            self.find(
                                FindingKind::InodeAccounting,
                                format!("inode {i} is marked in use but its slot is free"),
                                "marked it free".into(),
                            );
                        }
                    }
                    Err(e) => {
                        if marked {
                            self.find(
                                FindingKind::BadChecksum,
                                format!("inode {i} is damaged: {e}"),
                                format!("cleared inode {i}; entries naming it are removed"),
                            );
                            self.seen_inodes.insert(i);
                            self.write(iat, &[0u8; 1024])?;
                        }
                    }
                }
            }
            self.progress("reading inodes", end, total);
            ino = end;
        }
        Ok(())
    }

    // ---- per-inode structures ----------------------------------------------------------

    /// Walks a chain of metadata blocks. Returns the decoded items with their block numbers
    /// and, when the chain is damaged, why.
    fn walk_chain<T>(
        &mut self,
        ino: u64,
        first: Option<BlockNo>,
        what: &str,
        decode: impl Fn(&[u8], u64) -> Result<(T, Option<BlockNo>), String>,
    ) -> Result<Chain<T>, FsckError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut next = first;
        while let Some(b) = next {
            let b = b.0;
            if !self.g.meta_valid(BlockNo(b)) {
                return Ok((
                    out,
                    Some(format!(
                        "its {what} chain points to block {b}, outside the metadata area"
                    )),
                ));
            }
            if !seen.insert(b) {
                return Ok((
                    out,
                    Some(format!("its {what} chain loops back to block {b}")),
                ));
            }
            if let Some(owner) = self.meta_owner.get(&b) {
                let owner = *owner;
                self.seen_meta.insert(b);
                return Ok((
                    out,
                    Some(format!(
                        "its {what} chain uses metadata block {b}, which {} also uses",
                        ip(owner)
                    )),
                ));
            }
            self.seen_meta.insert(b);
            let bytes = self.read_block(b)?;
            match decode(&bytes, b * BLOCK_BYTES) {
                Ok((item, nx)) => {
                    self.meta_owner.insert(b, ino);
                    out.push((b, item));
                    next = nx;
                }
                Err(e) => return Ok((out, Some(format!("its {what} block {b} is damaged: {e}")))),
            }
            if out.len() > 1 << 22 {
                return Ok((out, Some(format!("its {what} chain is impossibly long"))));
            }
        }
        Ok((out, None))
    }

    fn load_structures(&mut self) -> Result<(), FsckError> {
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        let total = inos.len() as u64;
        for (n, ino) in inos.into_iter().enumerate() {
            self.load_one(ino)?;
            self.progress("checking inodes", n as u64, total);
        }
        Ok(())
    }

    fn load_one(&mut self, ino: u64) -> Result<(), FsckError> {
        let Some(inode) = self.inodes.get(&ino).cloned() else {
            return Ok(());
        };
        let mut meta_count = 0u64;
        match inode.kind {
            FileKind::File => meta_count += self.load_file(ino, &inode)?,
            FileKind::Dir => meta_count += self.load_dir(ino, &inode)?,
            FileKind::Symlink => {
                if !self.load_symlink(ino, &inode)? {
                    return Ok(());
                }
                meta_count += self.blobs.get(&ino).map_or(0, |b| b.len() as u64);
            }
            _ => {}
        }
        meta_count += self.load_xattrs(ino, &inode)?;
        if u64::from(inode.meta_blocks) != meta_count {
            self.find(
                FindingKind::WrongCounter,
                format!(
                    "{} says it owns {} metadata blocks but owns {meta_count}",
                    ip(ino),
                    inode.meta_blocks
                ),
                "corrected the count".into(),
            );
            self.dirty_inodes.insert(ino);
        }
        Ok(())
    }

    fn load_file(&mut self, ino: u64, inode: &Inode) -> Result<u64, FsckError> {
        let mut fm = FileMap::default();
        if inode.first_block.is_some() {
            let (items, broken) = self.walk_chain(ino, inode.first_block, "extent", |b, at| {
                ExtentBlock::decode(b, at, InodeId(ino))
                    .map(|x| (x.extents, x.next))
                    .map_err(|e| e.to_string())
            })?;
            for (b, ex) in items {
                fm.chain.push(b);
                fm.extents.extend(ex);
            }
            if let Some(why) = broken {
                self.find(
                    FindingKind::BadChecksum,
                    format!("{}: {why}", ip(ino)),
                    "cut its extent list there; the lost ranges read as zeros".into(),
                );
                fm.dirty = true;
            } else if inode.count != fm.extents.len() as u64 {
                self.find(
                    FindingKind::WrongCounter,
                    format!(
                        "{} says it has {} extents in extent blocks but has {}",
                        ip(ino),
                        inode.count,
                        fm.extents.len()
                    ),
                    "corrected the count".into(),
                );
                fm.dirty = true;
            }
            if !inode.inline_extents.is_empty() {
                self.find(
                    FindingKind::WrongCounter,
                    format!("{} has both inline extents and extent blocks", ip(ino)),
                    "kept the extent blocks".into(),
                );
                fm.dirty = true;
            }
        } else {
            fm.extents = inode.inline_extents.clone();
        }
        // Sorted, not overlapping in the file.
        let mut sorted = true;
        for w in fm.extents.windows(2) {
            if w[1].file_cluster < w[0].file_end() {
                sorted = false;
            }
        }
        if !sorted {
            self.find(
                FindingKind::BadChecksum,
                format!(
                    "{} has extents out of order or overlapping in the file",
                    ip(ino)
                ),
                "sorted them and dropped the overlapping ones".into(),
            );
            fm.extents.sort_by_key(|e| e.file_cluster);
            let mut kept: Vec<DiskExtent> = Vec::new();
            for e in fm.extents.drain(..) {
                if kept.last().is_none_or(|l| e.file_cluster >= l.file_end()) {
                    kept.push(e);
                }
            }
            fm.extents = kept;
            fm.dirty = true;
        }
        let decoded_sum: u64 = fm.extents.iter().map(|e| u64::from(e.len_clusters)).sum();
        if decoded_sum != inode.alloc_clusters {
            self.find(
                FindingKind::WrongCounter,
                format!(
                    "{} says it owns {} clusters but its extents hold {decoded_sum}",
                    ip(ino),
                    inode.alloc_clusters
                ),
                "corrected the count".into(),
            );
            self.dirty_inodes.insert(ino);
        }
        // Extents past the end of the data region.
        let cc = self.g.cluster_count;
        let mut kept = Vec::with_capacity(fm.extents.len());
        for e in std::mem::take(&mut fm.extents) {
            self.seen_clusters
                .set_range(e.lun_cluster.0, e.lun_end(), true);
            if e.lun_end() <= cc {
                kept.push(e);
                continue;
            }
            self.find(
                FindingKind::ExtentBeyondVolume,
                format!(
                    "{}: file clusters {}..{} map to data clusters {}..{}, past the end of the data region ({cc} clusters)",
                    ip(ino),
                    e.file_cluster,
                    e.file_end(),
                    e.lun_cluster,
                    e.lun_end()
                ),
                "dropped the part past the end; it reads as zeros".into(),
            );
            fm.dirty = true;
            if e.lun_cluster.0 < cc {
                let len = u32::try_from(cc - e.lun_cluster.0).expect("shorter than the extent");
                kept.push(DiskExtent {
                    len_clusters: len,
                    ..e
                });
            }
        }
        fm.extents = kept;
        // Written clusters wholly past the end of the file.
        let eof = inode.size_bytes.div_ceil(self.cluster_bytes);
        let mut out = Vec::with_capacity(fm.extents.len());
        for e in std::mem::take(&mut fm.extents) {
            if e.unwritten || e.file_end() <= eof {
                out.push(e);
                continue;
            }
            let cut = e.file_cluster.max(eof);
            self.find(
                FindingKind::UnwrittenFlag,
                format!(
                    "{} (size {} bytes) has written clusters {}..{} past its end; they must be marked unwritten",
                    ip(ino),
                    inode.size_bytes,
                    cut,
                    e.file_end()
                ),
                "marked them unwritten".into(),
            );
            fm.dirty = true;
            if cut > e.file_cluster {
                let head = u32::try_from(cut - e.file_cluster).expect("inside the extent");
                out.push(DiskExtent {
                    len_clusters: head,
                    ..e
                });
                out.push(DiskExtent {
                    file_cluster: cut,
                    lun_cluster: ClusterNo(e.lun_cluster.0 + u64::from(head)),
                    len_clusters: e.len_clusters - head,
                    unwritten: true,
                });
            } else {
                out.push(DiskExtent {
                    unwritten: true,
                    ..e
                });
            }
        }
        fm.extents = out;
        let meta = fm.chain.len() as u64;
        self.files.insert(ino, fm);
        Ok(meta)
    }

    fn load_dir(&mut self, ino: u64, inode: &Inode) -> Result<u64, FsckError> {
        let seed = self.sb.hash_seed;
        let (items, broken) = self.walk_chain(ino, inode.first_block, "directory", |b, at| {
            let d = DirBlock::decode(b, at, InodeId(ino)).map_err(|e| e.to_string())?;
            let next = d.next;
            Ok((d, next))
        })?;
        let mut dm = DirModel::default();
        let mut pairs = Vec::new();
        let mut misplaced = false;
        for (b, d) in items {
            dm.blocks.push(b);
            pairs.push((d.depth, d.prefix));
            if d.check_hashes(seed, b * BLOCK_BYTES).is_err() {
                misplaced = true;
            }
            dm.entries.extend(d.entries);
        }
        dm.decoded_entries = dm.entries.len() as u64;
        if let Some(why) = broken {
            self.find(
                FindingKind::BadChecksum,
                format!("directory {}: {why}", ip(ino)),
                "rebuilt the directory from its readable blocks; lost entries' inodes go to /lost+found".into(),
            );
            dm.dirty = true;
        } else if misplaced || !partitions(&pairs) {
            self.find(
                FindingKind::DirectoryStructure,
                format!("the hash index of directory {} is inconsistent", ip(ino)),
                "rebuilt the directory index".into(),
            );
            dm.dirty = true;
        }
        let mut names = HashSet::new();
        let before = dm.entries.len();
        dm.entries.retain(|e| names.insert(e.name.clone()));
        if dm.entries.len() != before {
            self.find(
                FindingKind::DirectoryStructure,
                format!("directory {} holds the same name more than once", ip(ino)),
                "kept the first entry of each name".into(),
            );
            dm.dirty = true;
        }
        if broken_is_none_and_count_differs(inode, &dm) {
            self.find(
                FindingKind::WrongCounter,
                format!(
                    "directory {} says it has {} entries but has {}",
                    ip(ino),
                    inode.count,
                    dm.decoded_entries
                ),
                "corrected the count".into(),
            );
            self.dirty_inodes.insert(ino);
        }
        let max_cookie = dm.entries.iter().map(|e| e.cookie).max().unwrap_or(2);
        if inode.next_cookie <= max_cookie {
            self.find(
                FindingKind::WrongCounter,
                format!(
                    "directory {} would hand out readdir cookie {} again",
                    ip(ino),
                    inode.next_cookie
                ),
                "moved its next cookie past the largest in use".into(),
            );
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.next_cookie = max_cookie + 1;
            }
            self.dirty_inodes.insert(ino);
        }
        let meta = dm.blocks.len() as u64;
        self.dirs.insert(ino, dm);
        Ok(meta)
    }

    /// Returns false when the symlink was cleared.
    fn load_symlink(&mut self, ino: u64, inode: &Inode) -> Result<bool, FsckError> {
        let inline = usize::try_from(inode.size_bytes).is_ok_and(|s| s <= INLINE_SYMLINK_BYTES);
        if inline {
            if inode.inline_symlink.len() as u64 != inode.size_bytes || inode.first_block.is_some()
            {
                self.find(
                    FindingKind::WrongCounter,
                    format!(
                        "symbolic link {} has size {} but an inline target of {} bytes",
                        ip(ino),
                        inode.size_bytes,
                        inode.inline_symlink.len()
                    ),
                    "set its size to the target's length".into(),
                );
                if let Some(i) = self.inodes.get_mut(&ino) {
                    i.size_bytes = i.inline_symlink.len() as u64;
                }
                self.dirty_inodes.insert(ino);
            }
            return Ok(true);
        }
        let (items, broken) =
            self.walk_chain(ino, inode.first_block, "symlink target", |b, at| {
                let x = BlobBlock::decode(b, at, InodeId(ino), BlobKind::Symlink)
                    .map_err(|e| e.to_string())?;
                let next = x.next;
                Ok((x.data.len() as u64, next))
            })?;
        let len: u64 = items.iter().map(|(_, l)| *l).sum();
        let blocks: Vec<u64> = items.iter().map(|(b, _)| *b).collect();
        if broken.is_some() || len != inode.size_bytes {
            let why = broken.unwrap_or_else(|| {
                format!("its target holds {len} bytes, not {}", inode.size_bytes)
            });
            self.find(
                FindingKind::BadChecksum,
                format!("symbolic link {}: {why}", ip(ino)),
                "removed the symbolic link".into(),
            );
            for b in blocks {
                self.meta_owner.remove(&b);
            }
            self.clear_inode(ino);
            return Ok(false);
        }
        self.blobs.insert(ino, blocks);
        Ok(true)
    }

    fn load_xattrs(&mut self, ino: u64, inode: &Inode) -> Result<u64, FsckError> {
        if usize::try_from(inode.xattr_len).is_ok_and(|l| l <= INLINE_XATTR_BYTES) {
            return Ok(0);
        }
        let (items, broken) =
            self.walk_chain(ino, inode.xattr_block, "extended attribute", |b, at| {
                let x = BlobBlock::decode(b, at, InodeId(ino), BlobKind::Xattrs)
                    .map_err(|e| e.to_string())?;
                let next = x.next;
                Ok((x.data.len() as u64, next))
            })?;
        let len: u64 = items.iter().map(|(_, l)| *l).sum();
        if broken.is_some() || len != u64::from(inode.xattr_len) {
            let why = broken.unwrap_or_else(|| {
                format!("its attributes hold {len} bytes, not {}", inode.xattr_len)
            });
            self.find(
                FindingKind::BadChecksum,
                format!("extended attributes of {}: {why}", ip(ino)),
                "dropped its extended attributes".into(),
            );
            for (b, _) in &items {
                self.meta_owner.remove(b);
            }
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.xattr_len = 0;
                i.xattr_block = None;
                i.inline_xattrs.clear();
            }
            self.dirty_inodes.insert(ino);
            return Ok(0);
        }
        Ok(items.len() as u64)
    }

    /// Frees an inode: its slot, its clusters and metadata blocks.
    fn clear_inode(&mut self, ino: u64) {
        self.inodes.remove(&ino);
        self.files.remove(&ino);
        self.dirs.remove(&ino);
        self.blobs.remove(&ino);
        self.meta_owner.retain(|_, o| *o != ino);
        self.dirty_inodes.remove(&ino);
        self.cleared.insert(ino);
    }

    // ---- clusters ----------------------------------------------------------------------

    fn cross_links(&mut self) -> Result<(), FsckError> {
        let mut ivs: Vec<(u64, u64, u64)> = Vec::new();
        for (ino, fm) in &self.files {
            for e in &fm.extents {
                ivs.push((e.lun_cluster.0, e.lun_end(), *ino));
            }
        }
        ivs.sort_unstable();
        let mut pairs: BTreeMap<(u64, u64), (u64, u64)> = BTreeMap::new();
        let mut active: Vec<(u64, u64)> = Vec::new(); // (end, ino)
        for (s, e, ino) in ivs {
            active.retain(|(end, _)| *end > s);
            for (end, other) in &active {
                let n = (*end).min(e) - s;
                let key = ((*other).min(ino), (*other).max(ino));
                let entry = pairs.entry(key).or_insert((s, 0));
                entry.1 += n;
            }
            active.push((e, ino));
        }
        if pairs.is_empty() {
            return Ok(());
        }
        for ((a, b), (first, n)) in &pairs {
            let (a, b, first, n) = (*a, *b, *first, *n);
            if a == b {
                self.find(
                    FindingKind::CrossLinkedClusters,
                    format!(
                        "{} uses {n} cluster(s) twice, from data cluster {first}",
                        ip(a)
                    ),
                    "gave the second use its own copy".into(),
                );
            } else {
                self.find(
                    FindingKind::CrossLinkedClusters,
                    format!(
                        "{n} cluster(s) from data cluster {first} belong to both {} and {}",
                        ip(a),
                        ip(b)
                    ),
                    format!("gave {} its own copy of them", ip(b)),
                );
            }
        }
        // Repair: the lowest inode keeps the clusters; later claims get copies.
        let mut owned = self.seen_clusters.clone();
        let mut claimed: BTreeMap<u64, u64> = BTreeMap::new();
        let inos: Vec<u64> = self.files.keys().copied().collect();
        for ino in inos {
            let Some(fm) = self.files.get(&ino).cloned() else {
                continue;
            };
            let mut out = Vec::new();
            let mut changed = false;
            for e in fm.extents {
                let pieces = split_by_claims(&claimed, e);
                for (piece, shared) in pieces {
                    if !shared {
                        claimed_insert(&mut claimed, piece.lun_cluster.0, piece.lun_end());
                        out.push(piece);
                        continue;
                    }
                    changed = true;
                    let mut fc = piece.file_cluster;
                    let mut src = piece.lun_cluster.0;
                    let mut left = u64::from(piece.len_clusters);
                    while left > 0 {
                        let Some((start, got)) =
                            alloc_run(&mut owned, &mut self.cluster_cursor, left)
                        else {
                            return Err(FsckError::Corrupt {
                                what: "no free clusters left to copy cross-linked clusters into"
                                    .into(),
                                at: 0,
                            });
                        };
                        if !piece.unwritten {
                            for k in 0..got {
                                let from = self.g.cluster_offset(ClusterNo(src + k));
                                let to = self.g.cluster_offset(ClusterNo(start + k));
                                let data = self.read(from, usize_of(self.cluster_bytes)?)?;
                                self.write(to, &data)?;
                            }
                        }
                        let len = u32::try_from(got).expect("at most the piece length");
                        let ne = DiskExtent {
                            file_cluster: fc,
                            lun_cluster: ClusterNo(start),
                            len_clusters: len,
                            unwritten: piece.unwritten,
                        };
                        claimed_insert(&mut claimed, start, start + got);
                        out.push(ne);
                        fc += got;
                        src += got;
                        left -= got;
                    }
                }
            }
            if changed {
                if let Some(f) = self.files.get_mut(&ino) {
                    f.extents = out;
                    f.dirty = true;
                }
            }
        }
        Ok(())
    }

    // ---- namespace ---------------------------------------------------------------------

    /// Walks the tree; returns (entries naming each inode, subdirectories of each dir).
    #[allow(clippy::type_complexity)]
    fn namespace(&mut self) -> Result<(HashMap<u64, u32>, HashMap<u64, u32>), FsckError> {
        let root = self.sb.root.0;
        let mut refs: HashMap<u64, u32> = HashMap::new();
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        let mut visited: HashSet<u64> = HashSet::new();
        visited.insert(root);
        self.walk_from(root, &mut visited, &mut refs, &mut subdirs);
        let lf = self.sb.lost_found.0;
        let lf_ok = visited.contains(&lf) && self.dirs.contains_key(&lf);
        loop {
            // Unattached: in use, not root, named by nothing (or only from unreachable dirs).
            let next = self
                .inodes
                .iter()
                .find(|(ino, i)| {
                    **ino != root
                        && !visited.contains(*ino)
                        && refs.get(*ino).copied().unwrap_or(0) == 0
                        && !(i.held && i.nlink == 0)
                })
                .map(|(ino, i)| (*ino, i.kind, i.nlink, i.size_bytes))
                .or_else(|| {
                    self.inodes
                        .iter()
                        .find(|(ino, i)| {
                            i.kind == FileKind::Dir
                                && **ino != root
                                && !visited.contains(*ino)
                                && !(i.held && i.nlink == 0)
                        })
                        .map(|(ino, i)| (*ino, i.kind, i.nlink, i.size_bytes))
                });
            let Some((ino, kind, nlink, size)) = next else {
                break;
            };
            if kind != FileKind::Dir && nlink == 0 {
                self.find(
                    FindingKind::OrphanInode,
                    format!(
                        "inode {ino} ({}, {size} bytes) has no links and is not on the held list",
                        file_kind_name(kind)
                    ),
                    format!("freed inode {ino}"),
                );
                self.clear_inode(ino);
                continue;
            }
            let name = format!("#{ino}").into_bytes();
            if !lf_ok {
                self.pending.push(Pending {
                    kind: FindingKind::OrphanInode,
                    message: format!(
                        "inode {ino} ({}, {size} bytes) is not in any directory",
                        file_kind_name(kind)
                    ),
                    action: "cannot reconnect it: /lost+found is missing".into(),
                    fixable: false,
                });
                visited.insert(ino);
                if kind == FileKind::Dir {
                    self.walk_from(ino, &mut visited, &mut refs, &mut subdirs);
                }
                continue;
            }
            self.find(
                FindingKind::OrphanInode,
                format!(
                    "inode {ino} ({}, {size} bytes) is not in any directory",
                    file_kind_name(kind)
                ),
                format!("moved it to /lost+found/#{ino}"),
            );
            let cookie = {
                let Some(lfi) = self.inodes.get_mut(&lf) else {
                    // Cannot happen (lost+found was walked); never loop on it.
                    visited.insert(ino);
                    *refs.entry(ino).or_insert(0) += 1;
                    continue;
                };
                let c = lfi.next_cookie.max(3);
                lfi.next_cookie = c + 1;
                c
            };
            self.dirty_inodes.insert(lf);
            if let Some(d) = self.dirs.get_mut(&lf) {
                d.entries.push(DirBlockEntry {
                    name: name.clone(),
                    ino: InodeId(ino),
                    kind,
                    cookie,
                });
                d.dirty = true;
            }
            *refs.entry(ino).or_insert(0) += 1;
            self.names.insert(ino, (lf, name));
            if kind == FileKind::Dir {
                *subdirs.entry(lf).or_insert(0) += 1;
                visited.insert(ino);
                if let Some(i) = self.inodes.get_mut(&ino) {
                    i.parent = Some(InodeId(lf));
                }
                self.dirty_inodes.insert(ino);
                self.walk_from(ino, &mut visited, &mut refs, &mut subdirs);
            }
        }
        Ok((refs, subdirs))
    }

    fn walk_from(
        &mut self,
        start: u64,
        visited: &mut HashSet<u64>,
        refs: &mut HashMap<u64, u32>,
        subdirs: &mut HashMap<u64, u32>,
    ) {
        let mut queue = VecDeque::from([start]);
        while let Some(d) = queue.pop_front() {
            let Some(dm) = self.dirs.get(&d) else {
                continue;
            };
            let entries = dm.entries.clone();
            let mut keep = Vec::with_capacity(entries.len());
            let mut dirty = false;
            for mut e in entries {
                let t = e.ino.0;
                let name = String::from_utf8_lossy(&e.name).into_owned();
                let Some(tk) = self.inodes.get(&t).map(|i| i.kind) else {
                    if !self.cleared.contains(&t) {
                        self.find(
                            FindingKind::EntryToFreeInode,
                            format!("entry \"{name}\" in directory {} names inode {t}, which is not in use", ip(d)),
                            "removed the entry".into(),
                        );
                    }
                    dirty = true;
                    continue;
                };
                if e.kind != tk {
                    self.find(
                        FindingKind::DirectoryStructure,
                        format!(
                            "entry \"{name}\" in directory {} says {} but inode {t} is a {}",
                            ip(d),
                            file_kind_name(e.kind),
                            file_kind_name(tk)
                        ),
                        "corrected the entry".into(),
                    );
                    e.kind = tk;
                    dirty = true;
                }
                if tk == FileKind::Dir {
                    if visited.contains(&t) {
                        self.find(
                            FindingKind::DirectoryCycle,
                            format!(
                                "entry \"{name}\" in directory {} links to directory {}, which already has a place in the tree (a cycle or a second link to a directory)",
                                ip(d),
                                ip(t)
                            ),
                            "removed the entry".into(),
                        );
                        dirty = true;
                        continue;
                    }
                    visited.insert(t);
                    self.names.insert(t, (d, e.name.clone()));
                    *subdirs.entry(d).or_insert(0) += 1;
                    queue.push_back(t);
                } else {
                    self.names.entry(t).or_insert_with(|| (d, e.name.clone()));
                }
                *refs.entry(t).or_insert(0) += 1;
                keep.push(e);
            }
            if let Some(dm) = self.dirs.get_mut(&d) {
                dm.entries = keep;
                dm.dirty |= dirty;
            }
        }
    }

    fn link_counts(&mut self, refs: &HashMap<u64, u32>, subdirs: &HashMap<u64, u32>) {
        let root = self.sb.root.0;
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in inos {
            let Some(inode) = self.inodes.get(&ino).cloned() else {
                continue;
            };
            if inode.held && inode.nlink == 0 && !self.names.contains_key(&ino) {
                // Removed but still open somewhere: freed when the last open goes.
                continue;
            }
            let expected = if inode.kind == FileKind::Dir {
                2 + subdirs.get(&ino).copied().unwrap_or(0)
            } else {
                refs.get(&ino).copied().unwrap_or(0)
            };
            if inode.nlink != expected {
                self.find(
                    FindingKind::WrongLinkCount,
                    format!(
                        "{} has link count {} but {expected} is right",
                        ip(ino),
                        inode.nlink
                    ),
                    format!("set the link count to {expected}"),
                );
                if let Some(i) = self.inodes.get_mut(&ino) {
                    i.nlink = expected;
                }
                self.dirty_inodes.insert(ino);
            }
            if inode.kind == FileKind::Dir {
                let want = if ino == root {
                    Some(InodeId(root))
                } else {
                    self.names.get(&ino).map(|(p, _)| InodeId(*p))
                };
                if want.is_some() && inode.parent != want {
                    self.find(
                        FindingKind::DirectoryStructure,
                        format!(
                            "directory {} records parent {} but lives in {}",
                            ip(ino),
                            inode.parent.map_or(0, |p| p.0),
                            want.map_or(0, |p| p.0)
                        ),
                        "corrected its parent".into(),
                    );
                    if let Some(i) = self.inodes.get_mut(&ino) {
                        i.parent = want;
                    }
                    self.dirty_inodes.insert(ino);
                }
            }
        }
    }

    fn held_list(&mut self, refs: &HashMap<u64, u32>) {
        let mut on_list = Vec::new();
        let mut seen = HashSet::new();
        let mut bad = None;
        let mut cur = self.sb.held_head.map(|i| i.0);
        while let Some(ino) = cur {
            if !seen.insert(ino) {
                bad = Some(format!("the held list loops back to inode {ino}"));
                break;
            }
            match self.inodes.get(&ino) {
                Some(i) if i.held => {
                    on_list.push(ino);
                    cur = i.next_held.map(|n| n.0);
                }
                Some(_) => {
                    bad = Some(format!(
                        "the held list contains {}, which is not marked held",
                        ip(ino)
                    ));
                    break;
                }
                None => {
                    bad = Some(format!(
                        "the held list contains inode {ino}, which is not in use"
                    ));
                    break;
                }
            }
        }
        let expected: BTreeSet<u64> = self
            .inodes
            .iter()
            .filter(|(ino, i)| {
                i.opens.iter().any(|o| *o != 0)
                    || (i.nlink == 0 && refs.get(*ino).copied().unwrap_or(0) == 0)
            })
            .map(|(ino, _)| *ino)
            .collect();
        let flagged: BTreeSet<u64> = self
            .inodes
            .iter()
            .filter(|(_, i)| i.held)
            .map(|(ino, _)| *ino)
            .collect();
        let listed: BTreeSet<u64> = on_list.iter().copied().collect();
        if bad.is_none() && listed == expected && flagged == expected {
            return;
        }
        let why = bad.unwrap_or_else(|| {
            let missing: Vec<String> = expected.difference(&listed).map(|i| ip(*i)).collect();
            let extra: Vec<String> = flagged.union(&listed).filter(|i| !expected.contains(i)).map(|i| ip(*i)).collect();
            format!(
                "the held list (open or unlinked inodes) is wrong: missing [{}], not belonging [{}]",
                missing.join(", "),
                extra.join(", ")
            )
        });
        self.find(FindingKind::HeldList, why, "rebuilt the held list".into());
        let order: Vec<u64> = expected.iter().copied().collect();
        for ino in flagged.union(&expected) {
            if let Some(i) = self.inodes.get_mut(ino) {
                i.held = expected.contains(ino);
                i.next_held = None;
            }
            self.dirty_inodes.insert(*ino);
        }
        for w in order.windows(2) {
            if let Some(i) = self.inodes.get_mut(&w[0]) {
                i.next_held = Some(InodeId(w[1]));
            }
        }
        self.sb.held_head = order.first().map(|i| InodeId(*i));
        self.sb_dirty = true;
    }

    // ---- records -----------------------------------------------------------------------

    fn records(&mut self) -> Result<(), FsckError> {
        let lease = self.g.lease;
        for k in 0..lease.len_blocks {
            let at = lease.start_bytes() + k * BLOCK_BYTES;
            let b = self.read(at, 4096)?;
            if let Err(e) = LeaseRecord::decode(&b, at) {
                self.find(
                    FindingKind::BadRecord,
                    format!(
                        "{} record is damaged: {e}",
                        if k == 0 {
                            "the coordinator lease".to_string()
                        } else {
                            format!("the heartbeat of node {k}")
                        }
                    ),
                    "cleared it (it is rewritten by the next coordinator or heartbeat)".into(),
                );
                self.write(at, &[0u8; 4096])?;
            }
        }
        let drc = self.g.drc;
        let slots_per_node = u64::from(self.g.drc_slots_per_node);
        let slots = u64::from(self.g.max_nodes) * slots_per_node;
        let buf = self.read(drc.start_bytes(), usize_of(drc.len_bytes())?)?;
        for s in 0..slots.min(drc.len_bytes() / DRC_SLOT_BYTES) {
            let lo = usize_of(s * DRC_SLOT_BYTES)?;
            let at = drc.start_bytes() + s * DRC_SLOT_BYTES;
            if let Err(e) = DrcSlot::decode(&buf[lo..lo + 512], at) {
                self.find(
                    FindingKind::BadRecord,
                    format!(
                        "duplicate-request slot {} of node {} is damaged: {e}",
                        s % slots_per_node.max(1),
                        s / slots_per_node.max(1) + 1
                    ),
                    "cleared it (a retry of that request may run twice)".into(),
                );
                self.write(at, &[0u8; 512])?;
            }
        }
        Ok(())
    }

    // ---- writing the model back --------------------------------------------------------

    fn alloc_meta(&mut self, ino: u64) -> Result<u64, FsckError> {
        let n = self.g.meta.len_blocks;
        for k in 0..n {
            let idx = (self.meta_cursor + k) % n;
            let b = self.g.meta.start.0 + idx;
            if let std::collections::hash_map::Entry::Vacant(v) = self.meta_owner.entry(b) {
                v.insert(ino);
                self.meta_cursor = idx + 1;
                return Ok(b);
            }
        }
        Err(FsckError::Corrupt {
            what: "no free metadata block left for repairs".into(),
            at: self.g.meta.start_bytes(),
        })
    }

    /// Returns the blocks to use for `n` blocks of a chain of `ino`: `old` ones it owns
    /// first, then new ones; frees the old ones left over.
    fn chain_blocks(&mut self, ino: u64, old: &[u64], n: usize) -> Result<Vec<u64>, FsckError> {
        let mut out = Vec::with_capacity(n);
        for b in old {
            if self.meta_owner.get(b) == Some(&ino) {
                if out.len() < n {
                    out.push(*b);
                } else {
                    self.meta_owner.remove(b);
                }
            }
        }
        while out.len() < n {
            out.push(self.alloc_meta(ino)?);
        }
        Ok(out)
    }

    fn write_model(&mut self) -> Result<(), FsckError> {
        let seed = self.sb.hash_seed;
        // Directories.
        let dir_inos: Vec<u64> = self.dirs.keys().copied().collect();
        for ino in dir_inos {
            let Some(dm) = self.dirs.get(&ino).cloned() else {
                continue;
            };
            let count = dm.entries.len() as u64;
            if let Some(i) = self.inodes.get(&ino) {
                if i.count != count {
                    let mut i = i.clone();
                    i.count = count;
                    self.inodes.insert(ino, i);
                    self.dirty_inodes.insert(ino);
                }
            }
            if !dm.dirty {
                continue;
            }
            let mut entries = dm.entries.clone();
            entries.sort_by_key(|e| e.cookie);
            let Some(blocks) = layout(seed, entries) else {
                self.pending.push(Pending {
                    kind: FindingKind::DirectoryStructure,
                    message: format!("directory {} cannot be laid out", ip(ino)),
                    action: "cannot repair".into(),
                    fixable: false,
                });
                continue;
            };
            let nums = self.chain_blocks(ino, &dm.blocks, blocks.len())?;
            for (k, lb) in blocks.iter().enumerate() {
                let d = DirBlock {
                    dir: InodeId(ino),
                    next: nums.get(k + 1).map(|b| BlockNo(*b)),
                    depth: lb.depth,
                    prefix: lb.prefix,
                    entries: lb.entries.clone(),
                };
                self.write(nums[k] * BLOCK_BYTES, &d.encode())?;
            }
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.first_block = nums.first().map(|b| BlockNo(*b));
            }
            if let Some(d) = self.dirs.get_mut(&ino) {
                d.blocks = nums;
            }
            self.dirty_inodes.insert(ino);
        }
        // Files.
        let file_inos: Vec<u64> = self.files.keys().copied().collect();
        for ino in file_inos {
            let Some(fm) = self.files.get(&ino).cloned() else {
                continue;
            };
            let sum: u64 = fm.extents.iter().map(|e| u64::from(e.len_clusters)).sum();
            if let Some(i) = self.inodes.get_mut(&ino) {
                if i.alloc_clusters != sum {
                    i.alloc_clusters = sum;
                    self.dirty_inodes.insert(ino);
                }
            }
            if !fm.dirty {
                continue;
            }
            let n = fm.extents.len();
            let (inline, chain) = if n <= INLINE_EXTENTS {
                (fm.extents.clone(), Vec::new())
            } else {
                let nb = n.div_ceil(EXTENTS_PER_BLOCK);
                let nums = self.chain_blocks(ino, &fm.chain, nb)?;
                for (k, chunk) in fm.extents.chunks(EXTENTS_PER_BLOCK).enumerate() {
                    let b = ExtentBlock {
                        ino: InodeId(ino),
                        next: nums.get(k + 1).map(|b| BlockNo(*b)),
                        extents: chunk.to_vec(),
                    };
                    self.write(nums[k] * BLOCK_BYTES, &b.encode())?;
                }
                (Vec::new(), nums)
            };
            if inline.len() == n {
                for b in &fm.chain {
                    if self.meta_owner.get(b) == Some(&ino) {
                        self.meta_owner.remove(b);
                    }
                }
            }
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.inline_extents = inline;
                i.first_block = chain.first().map(|b| BlockNo(*b));
                i.count = if chain.is_empty() { 0 } else { n as u64 };
            }
            if let Some(f) = self.files.get_mut(&ino) {
                f.chain = chain;
            }
            self.dirty_inodes.insert(ino);
        }
        // Metadata-block counts follow the final ownership.
        let mut owned: HashMap<u64, u32> = HashMap::new();
        for o in self.meta_owner.values() {
            *owned.entry(*o).or_insert(0) += 1;
        }
        let inos: Vec<u64> = self.inodes.keys().copied().collect();
        for ino in inos {
            let want = owned.get(&ino).copied().unwrap_or(0);
            if let Some(i) = self.inodes.get_mut(&ino) {
                if i.meta_blocks != want {
                    i.meta_blocks = want;
                    self.dirty_inodes.insert(ino);
                }
            }
        }
        for ino in self.dirty_inodes.clone() {
            if let Some(i) = self.inodes.get(&ino) {
                self.write(self.g.inode_offset(InodeId(ino)), &i.encode())?;
            }
        }
        for ino in self.cleared.clone() {
            self.write(
                self.g.inode_offset(InodeId(ino)),
                &Inode::encode_free(InodeId(ino), 0),
            )?;
        }
        Ok(())
    }

    fn bitmaps(&mut self) -> Result<(), FsckError> {
        // What is really owned now, after the repairs.
        let mut clusters = Bits::new(self.g.cluster_count);
        for fm in self.files.values() {
            for e in &fm.extents {
                clusters.set_range(e.lun_cluster.0, e.lun_end(), true);
            }
        }
        let mut meta = Bits::new(self.g.meta.len_blocks);
        for b in self.meta_owner.keys() {
            if let Some(i) = self.g.meta_index(BlockNo(*b)) {
                meta.set(i, true);
            }
        }
        let mut inodes = Bits::new(self.g.inode_count);
        inodes.set(0, true);
        for ino in self.inodes.keys() {
            inodes.set(*ino, true);
        }
        // Report against what was owned before the repairs.
        let mut seen_meta = Bits::new(self.g.meta.len_blocks);
        for b in &self.seen_meta {
            if let Some(i) = self.g.meta_index(BlockNo(*b)) {
                seen_meta.set(i, true);
            }
        }
        let seen_clusters = self.seen_clusters.clone();
        self.compare(BitmapKind::Clusters, &seen_clusters)?;
        self.compare(BitmapKind::Meta, &seen_meta)?;
        for (kind, want) in [
            (BitmapKind::Clusters, &clusters),
            (BitmapKind::Inodes, &inodes),
            (BitmapKind::Meta, &meta),
        ] {
            let r = self.g.bitmap_region(kind);
            let nbits = self.g.bitmap_bits(kind);
            let have = match kind {
                BitmapKind::Clusters => &self.cbits,
                BitmapKind::Inodes => &self.ibits,
                BitmapKind::Meta => &self.mbits,
            };
            let mut writes = Vec::new();
            for idx in 0..r.len_blocks {
                let first = idx * BITMAP_BITS_PER_BLOCK;
                let last = (first + BITMAP_BITS_PER_BLOCK).min(nbits);
                let bad = self.bad_bitmap_blocks[kind_index(kind)].contains(&idx);
                let differs = (first..last).any(|i| have.get(i) != want.get(i));
                if bad || differs {
                    let mut b = BitmapBlock::empty(kind, idx);
                    for i in first..last {
                        if want.get(i) {
                            b.set(i - first, true);
                        }
                    }
                    writes.push((r.start_bytes() + idx * BLOCK_BYTES, b.encode()));
                }
            }
            for (at, bytes) in writes {
                self.write(at, &bytes)?;
            }
        }
        self.final_clusters = Some(clusters);
        Ok(())
    }

    fn compare(&mut self, kind: BitmapKind, owned: &Bits) -> Result<(), FsckError> {
        let (have, bad) = match kind {
            BitmapKind::Clusters => (&self.cbits, &self.bad_bitmap_blocks[0]),
            BitmapKind::Inodes => (&self.ibits, &self.bad_bitmap_blocks[1]),
            BitmapKind::Meta => (&self.mbits, &self.bad_bitmap_blocks[2]),
        };
        let n = self.g.bitmap_bits(kind);
        let mut leaked = (0u64, None);
        let mut unmarked = (0u64, None);
        for i in 0..n {
            if bad.contains(&(i / BITMAP_BITS_PER_BLOCK)) {
                continue;
            }
            let (h, o) = (have.get(i), owned.get(i));
            if h && !o {
                leaked.0 += 1;
                leaked.1.get_or_insert(i);
            } else if o && !h {
                unmarked.0 += 1;
                unmarked.1.get_or_insert(i);
            }
        }
        let (lk, uk, unit) = match kind {
            BitmapKind::Clusters => (
                FindingKind::LeakedClusters,
                FindingKind::OwnedClustersFree,
                "data cluster",
            ),
            _ => (
                FindingKind::MetaBlockAccounting,
                FindingKind::MetaBlockAccounting,
                "metadata block",
            ),
        };
        let base = match kind {
            BitmapKind::Meta => self.g.meta.start.0,
            _ => 0,
        };
        if let (count, Some(first)) = leaked {
            self.find(
                lk,
                format!(
                    "{count} {unit}(s) are marked in use but nothing owns them (first: {})",
                    first + base
                ),
                "marked them free".into(),
            );
        }
        if let (count, Some(first)) = unmarked {
            self.find(
                uk,
                format!(
                    "{count} {unit}(s) are in use but marked free (first: {})",
                    first + base
                ),
                "marked them in use".into(),
            );
        }
        Ok(())
    }
}

fn broken_is_none_and_count_differs(inode: &Inode, dm: &DirModel) -> bool {
    !dm.dirty && inode.count != dm.decoded_entries
}

/// Splits `e` into pieces that are wholly claimed already (`true`) or wholly free.
fn split_by_claims(claimed: &BTreeMap<u64, u64>, e: DiskExtent) -> Vec<(DiskExtent, bool)> {
    let (s, end) = (e.lun_cluster.0, e.lun_end());
    let mut cuts: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = s;
    let start_key = claimed.range(..=s).next_back().map_or(s, |(k, _)| *k);
    for (&cs, &ce) in claimed.range(start_key..end) {
        if ce <= pos {
            continue;
        }
        let cs = cs.max(pos);
        if cs > pos {
            cuts.push((pos, cs, false));
        }
        let ce = ce.min(end);
        cuts.push((cs, ce, true));
        pos = ce;
        if pos >= end {
            break;
        }
    }
    if pos < end {
        cuts.push((pos, end, false));
    }
    cuts.into_iter()
        .map(|(a, b, shared)| {
            let off = a - s;
            (
                DiskExtent {
                    file_cluster: e.file_cluster + off,
                    lun_cluster: ClusterNo(a),
                    len_clusters: u32::try_from(b - a).expect("inside the extent"),
                    unwritten: e.unwritten,
                },
                shared,
            )
        })
        .collect()
}

fn claimed_insert(claimed: &mut BTreeMap<u64, u64>, s: u64, e: u64) {
    let mut start = s;
    let mut end = e;
    let overl: Vec<(u64, u64)> = claimed
        .range(..=e)
        .filter(|(_, ce)| **ce >= s)
        .map(|(a, b)| (*a, *b))
        .collect();
    for (a, b) in overl {
        claimed.remove(&a);
        start = start.min(a);
        end = end.max(b);
    }
    claimed.insert(start, end);
}

/// Allocates up to `want` free consecutive clusters, marking them owned.
fn alloc_run(owned: &mut Bits, cursor: &mut u64, want: u64) -> Option<(u64, u64)> {
    let n = owned.len;
    for k in 0..n {
        let i = (*cursor + k) % n;
        if owned.get(i) {
            continue;
        }
        let mut got = 0;
        while got < want && i + got < n && !owned.get(i + got) {
            owned.set(i + got, true);
            got += 1;
        }
        *cursor = i + got;
        return Some((i, got));
    }
    None
}
