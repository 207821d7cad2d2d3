//! The direct data path: file data goes between this node and the LUN without passing
//! through the coordinator.
//!
//! Per open inode the node keeps an [`OpenFile`]: the extent map the coordinator handed
//! out at open, the byte ranges written here but not yet committed, and the size this node
//! has written up to. Reads split a range into pieces: holes and unwritten clusters read
//! as zeros (except bytes this node wrote and has not committed), written clusters are
//! read from the LUN. Writes to unmapped ranges first ask the coordinator to allocate
//! (with a preallocation hint for sequential writers), then write the LUN directly.
//! Commits are batched: on fsync, flush, release, periodically and when many ranges are
//! pending. A commit zeroes the unwritten remainder of every partially written,
//! previously unwritten cluster (the unwritten mark is per cluster, FORMAT.md), flushes
//! the LUN, then sends `Commit`. Overwrites of written clusters are not pending ranges:
//! they only make the next commit date the file, and a commit with nothing else to do
//! does not flush the LUN (fsync and O_SYNC writes still do). So that this zeroing never
//! hits another node's data, a node writes into an unwritten cluster only while it holds
//! the cluster's claim (PROTOCOL.md §5.1): `Allocate` hands claims out, one node per
//! cluster, and `Commit` hands them back; a write into a cluster another node holds
//! commits this node's writes and asks again until the holder has committed.
//!
//! Locking per file: `io` is shared by reads and writes and taken exclusively by commits,
//! truncates and fallocate, so a commit never races a write into the cluster remainder it
//! zeroes; `meta` serializes the extent-map round trips (refetch, allocate) so a refetch
//! never drops extents another thread just allocated; `state` is a short mutex.

use crate::errno::NodeError;
use crate::extents::{Backing, ExtentMap, Piece, RangeSet};
use crate::meta::{unexpected, Metadata};
use block_client::{AsyncIo, BlockDevice, BlockError, Pipe, WriteFlags};
use metadata_server::proto::{Request, Response};
use metadata_server::types::{Attr, Epoch, Extent, FallocMode, FsError, InodeId, SetAttr};
use parking_lot::{Condvar, Mutex, RwLock, RwLockWriteGuard};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Length used to ask for "every extent of the file".
const WHOLE_FILE_BYTES: u64 = 1 << 62;
/// Commit inline once this many disjoint ranges are pending.
const MAX_PENDING_RANGES: usize = 4096;
/// Commit inline once this many bytes are pending.
const MAX_PENDING_BYTES: u64 = 1 << 30;
/// First pause before asking again for a cluster another node holds the claim of.
const CLAIM_BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Longest pause between two such asks.
const CLAIM_BACKOFF_MAX: Duration = Duration::from_millis(50);
/// How long a write waits for another node to commit a cluster it holds the claim of
/// (nodes commit every second) before it fails.
const CLAIM_WAIT: Duration = Duration::from_secs(60);

/// Mutable state of one open inode.
#[derive(Debug)]
struct FileState {
    /// Extents as last fetched or allocated.
    map: ExtentMap,
    /// Bumped by every coordinator invalidation of the inode.
    inval_gen: u64,
    /// `inval_gen` at the last complete refetch.
    fetched_gen: u64,
    /// Attributes as the coordinator last reported them.
    attr: Attr,
    /// Written here into holes or unwritten clusters, not committed: the ranges the
    /// next commit marks written.
    pending: RangeSet,
    /// Written here into written clusters since the last commit, which only has to
    /// bring the coordinator's mtime up to date (no LUN flush, no ranges).
    times_dirty: bool,
    /// Size this node has written up to and not committed (0 when nothing is pending).
    pending_size_bytes: u64,
    /// End of the last write, to detect sequential writers.
    seq_end_bytes: u64,
    /// Start of the current sequential run of writes.
    seq_start_bytes: u64,
    /// Clusters this node preallocated for a sequential writer and has not written yet;
    /// handed back at the last close on this node.
    prealloc: RangeSet,
    /// Unwritten clusters whose claim this node holds at the coordinator (PROTOCOL.md
    /// §5.1), since its last commit: the only unwritten clusters it may write into.
    claimed: RangeSet,
    /// Opens of the inode on this node.
    opens: u32,
    /// The LUN's write loss count ([`BlockDevice::write_loss_count`]) taken before the
    /// first write of this file that no LUN flush has covered yet; `None` when every
    /// write was covered.
    loss_mark: Option<u64>,
    /// Bumped by every recorded write, so that a flush clears `loss_mark` only when no
    /// write was recorded while it ran.
    loss_gen: u64,
}

impl FileState {
    /// True when a commit has something to do: ranges to mark written, times to bring up
    /// to date, a larger size, or claims to hand back.
    fn has_pending(&self) -> bool {
        !self.pending.is_empty()
            || self.times_dirty
            || self.pending_size_bytes > self.attr.size_bytes
            || !self.claimed.is_empty()
    }
}

/// One inode open on this node, shared by all of its file handles.
#[derive(Debug)]
pub struct OpenFile {
    ino: InodeId,
    io: RwLock<()>,
    meta: Mutex<()>,
    state: Mutex<FileState>,
    /// Asynchronous LUN requests in flight (started under `io` shared, see
    /// [`DataPath::read_async`]); exclusive holders of `io` wait for them to finish.
    in_flight: Mutex<u32>,
    /// Signalled when `in_flight` drops to zero.
    idle: Condvar,
    /// How many times a flush found that writes of the file acknowledged by the LUN were
    /// lost with their path before it could cover them. File handles report each loss
    /// once, at their next fsync or close (see [`check_loss`]), as a write-back error is.
    losses: AtomicU64,
}

impl OpenFile {
    /// The inode.
    pub fn ino(&self) -> InodeId {
        self.ino
    }

    /// `io` exclusively, once no asynchronous request of the file is in flight.
    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        let g = self.io.write();
        let mut n = self.in_flight.lock();
        while *n > 0 {
            self.idle.wait(&mut n);
        }
        g
    }

    /// One asynchronous request ended.
    fn async_ended(&self) {
        let mut n = self.in_flight.lock();
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// How many losses of the file's writes flushes found so far (see [`check_loss`]).
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::SeqCst)
    }

    /// True when this node holds uncommitted writes for the file (new ranges, or
    /// overwrites that date it), or claims that a commit would hand back.
    pub fn has_pending(&self) -> bool {
        self.state.lock().has_pending()
    }
}

/// What `lseek` looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTarget {
    /// SEEK_DATA.
    Data,
    /// SEEK_HOLE.
    Hole,
}

/// Outcome of [`DataPath::read_async`]: the bytes read, or `None` when the read has to be
/// done on the blocking path ([`DataPath::read`]).
pub type ReadDone = Box<dyn FnOnce(Option<Vec<u8>>) + Send>;

/// Who answers a read into a pipe ([`DataPath::read_to_pipe`]).
pub trait PipeReader: Send + 'static {
    /// What goes into the pipe ahead of the data.
    type Head: AsRef<[u8]>;
    /// The bytes ahead of `len` bytes of data, or `None` to decline the pipe.
    fn head(&self, len: u32) -> Option<Self::Head>;
    /// The outcome: the pipe, holding the head and then the bytes read, with the number
    /// of bytes read; or `None` when the read has to be done on the blocking path
    /// ([`DataPath::read`]) (the pipe is then gone).
    fn done(self, got: Option<(Pipe, u32)>);
}

/// Outcome of [`DataPath::write_async`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// On the LUN and recorded; `commit_now`: commit at the coordinator before replying.
    Written {
        /// Commit now (the file is synchronous, or its pending writes reached a limit).
        commit_now: bool,
    },
    /// Not done: it has to be done on the blocking path ([`DataPath::write`]).
    Redo {
        /// The write went to the LUN by reference and its path was lost, so the LUN may
        /// still read the data's memory at any later time: never change it again. A
        /// write the LUN answered with an error, or that never left, holds nothing.
        data_held: bool,
    },
}

/// Receives the [`WriteOutcome`] of [`DataPath::write_async`].
pub type WriteDone = Box<dyn FnOnce(WriteOutcome) + Send>;

/// The node's data path for one mounted volume.
pub struct DataPath {
    lun: Arc<dyn BlockDevice>,
    meta: Arc<dyn Metadata>,
    cluster_bytes: u64,
    prealloc_bytes: u64,
    files: Arc<Mutex<HashMap<InodeId, Arc<OpenFile>>>>,
    /// `Open` requests sent and not yet answered, per inode: counted as open handles when
    /// the node re-announces its opens to a new coordinator (an open resent across the
    /// takeover is then counted twice, which only keeps an unlinked file a little longer;
    /// never fewer than the handles this node really holds). Lock order: `files` first.
    opening: Mutex<HashMap<InodeId, u32>>,
    /// The last re-announcement of this node's opens to a new coordinator, so that a file
    /// created and opened across the takeover is counted there too (see
    /// [`created`](Self::created)). Lock order: before `files`.
    announce: Mutex<Announce>,
}

/// What the node last re-announced to a new coordinator ([`DataPath::reopen_snapshot`]).
#[derive(Debug, Default)]
struct Announce {
    /// Invalidation stamp of the takeover the snapshot was taken for. An open answered
    /// before it (a lower stamp) was counted by the old coordinator only; if it is recorded
    /// after the snapshot, the snapshot missed it.
    stamp: u64,
    /// The new coordinator's epoch.
    epoch: Epoch,
    /// The new coordinator counted the snapshot.
    counted: bool,
    /// Files the snapshot missed, opened once each at the new coordinator when it has
    /// counted the snapshot.
    missed: Vec<InodeId>,
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath")
            .field("lun", &self.lun)
            .field("cluster_bytes", &self.cluster_bytes)
            .finish_non_exhaustive()
    }
}

fn align_down(v: u64, a: u64) -> u64 {
    v - v % a
}

fn align_up(v: u64, a: u64) -> u64 {
    align_down(v.saturating_add(a - 1), a)
}

fn to_usize(v: u64) -> Result<usize, NodeError> {
    usize::try_from(v).map_err(|_| NodeError::Fs(FsError::FileTooLarge))
}

impl DataPath {
    /// A data path writing `lun`, asking `meta` for layouts. `cluster_bytes` is the
    /// volume's cluster size; sequential writers preallocate `prealloc_bytes` ahead.
    pub fn new(
        lun: Arc<dyn BlockDevice>,
        meta: Arc<dyn Metadata>,
        cluster_bytes: u64,
        prealloc_bytes: u64,
    ) -> DataPath {
        DataPath {
            lun,
            meta,
            cluster_bytes: cluster_bytes.max(4096),
            prealloc_bytes,
            files: Arc::new(Mutex::new(HashMap::new())),
            opening: Mutex::new(HashMap::new()),
            announce: Mutex::new(Announce::default()),
        }
    }

    /// The volume's cluster size in bytes.
    pub fn cluster_bytes(&self) -> u64 {
        self.cluster_bytes
    }

    /// The LUN.
    pub fn lun(&self) -> &Arc<dyn BlockDevice> {
        &self.lun
    }

    /// The open-file state of `ino` on this node, if it is open here.
    pub fn get(&self, ino: InodeId) -> Option<Arc<OpenFile>> {
        self.files.lock().get(&ino).cloned()
    }

    /// Every inode open on this node.
    pub fn open_files(&self) -> Vec<Arc<OpenFile>> {
        self.files.lock().values().cloned().collect()
    }

    /// Opens `ino` on this node (one `Open` at the coordinator per call).
    pub fn open(
        &self,
        uid: u32,
        gid: u32,
        ino: InodeId,
        write: bool,
    ) -> Result<(Arc<OpenFile>, Attr), NodeError> {
        *self.opening.lock().entry(ino).or_insert(0) += 1;
        // The kernel looked the inode up; if it is gone by now (unlinked and freed
        // elsewhere), ESTALE makes the VFS walk the path again instead of failing.
        let resp = self
            .meta
            .call(uid, gid, Request::Open { ino, write })
            .map_err(|e| match e {
                FsError::NotFound => FsError::Stale,
                e => e,
            });
        let (attr, extents) = match resp {
            Ok(Response::Mapped { attr, extents }) => (attr, extents),
            other => {
                self.done_opening(ino);
                return Err(match other {
                    Ok(r) => unexpected("open", &r).into(),
                    Err(e) => e.into(),
                });
            }
        };
        Ok(self.record_open(ino, attr, extents, true))
    }

    /// An `Open` of `ino` was answered (and counted in the file's `opens` if it succeeded).
    fn done_opening(&self, ino: InodeId) {
        let mut opening = self.opening.lock();
        if let Some(n) = opening.get_mut(&ino) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                opening.remove(&ino);
            }
        }
    }

    /// The open handles this node holds (or is opening), per inode: what it re-announces
    /// to a new coordinator.
    pub fn open_counts(&self) -> Vec<(InodeId, u32)> {
        let files = self.files.lock();
        let mut counts = self.opening.lock().clone();
        for (ino, f) in files.iter() {
            let n = f.state.lock().opens;
            if n > 0 {
                *counts.entry(*ino).or_insert(0) += n;
            }
        }
        let mut v: Vec<(InodeId, u32)> = counts.into_iter().collect();
        v.sort_unstable();
        v
    }

    /// The open handles to re-announce to the coordinator of `epoch`, which took over at
    /// invalidation stamp `stamp` ([`open_counts`](Self::open_counts)). Files created
    /// before the takeover and recorded after this snapshot are opened there once the
    /// snapshot is counted ([`reopen_counted`](Self::reopen_counted)).
    pub fn reopen_snapshot(&self, stamp: u64, epoch: Epoch) -> Vec<(InodeId, u32)> {
        let mut a = self.announce.lock();
        let counts = self.open_counts();
        if epoch >= a.epoch {
            // A retry takes a new snapshot: whatever an earlier one missed is in it now.
            *a = Announce {
                stamp,
                epoch,
                counted: false,
                missed: Vec::new(),
            };
        }
        counts
    }

    /// The coordinator of `epoch` counted the snapshot: opens there, once each, the files
    /// the snapshot missed that are still open here. Returns how many it opened.
    pub fn reopen_counted(&self, epoch: Epoch) -> usize {
        let missed = {
            let mut a = self.announce.lock();
            if a.epoch != epoch {
                return 0;
            }
            a.counted = true;
            std::mem::take(&mut a.missed)
        };
        let mut opened = 0;
        for ino in missed {
            // Released here since (and its release counted): nothing to add.
            let open = self.get(ino).is_some_and(|f| f.state.lock().opens > 0);
            if open && self.count_missed_open(ino) {
                opened += 1;
            }
        }
        opened
    }

    /// Opens `ino` once more at the coordinator, for a handle a re-announcement missed; the
    /// answer only confirms the count. False if the coordinator did not count it.
    fn count_missed_open(&self, ino: InodeId) -> bool {
        match self.meta.call(0, 0, Request::Open { ino, write: false }) {
            Ok(_) => {
                tracing::info!(inode = %ino, "a file opened across the takeover is counted at the new coordinator");
                true
            }
            Err(e) => {
                tracing::warn!(inode = %ino, error = %e, "could not count a file opened across the takeover");
                false
            }
        }
    }

    /// Records an open of `ino` that the coordinator already counted (the answer to
    /// `Open` or `CreateOpen`): the file's attributes and whole extent map.
    pub fn opened(&self, ino: InodeId, attr: Attr, extents: Vec<Extent>) -> (Arc<OpenFile>, Attr) {
        self.record_open(ino, attr, extents, false)
    }

    /// [`opened`](Self::opened) for the answer to a `CreateOpen` with invalidation stamp
    /// `stamp`. A node cannot count a file it is creating among its opens before it knows
    /// the inode, so a takeover between the old coordinator's answer and this record leaves
    /// the open out of the node's re-announcement; then it is opened once at the new
    /// coordinator: at once when that coordinator counted the re-announcement already,
    /// else right after it does.
    pub fn created(
        &self,
        ino: InodeId,
        attr: Attr,
        extents: Vec<Extent>,
        stamp: u64,
    ) -> (Arc<OpenFile>, Attr) {
        let mut a = self.announce.lock();
        let r = self.record_open(ino, attr, extents, false);
        if stamp >= a.stamp {
            return r;
        }
        if !a.counted {
            a.missed.push(ino);
            return r;
        }
        drop(a);
        self.count_missed_open(ino);
        r
    }

    fn record_open(
        &self,
        ino: InodeId,
        attr: Attr,
        extents: Vec<Extent>,
        was_opening: bool,
    ) -> (Arc<OpenFile>, Attr) {
        let mut files = self.files.lock();
        let file = files
            .entry(ino)
            .or_insert_with(|| {
                Arc::new(OpenFile {
                    ino,
                    io: RwLock::new(()),
                    meta: Mutex::new(()),
                    in_flight: Mutex::new(0),
                    idle: Condvar::new(),
                    losses: AtomicU64::new(0),
                    state: Mutex::new(FileState {
                        map: ExtentMap::new(),
                        inval_gen: 0,
                        fetched_gen: 0,
                        attr: attr.clone(),
                        pending: RangeSet::new(),
                        loss_mark: None,
                        loss_gen: 0,
                        times_dirty: false,
                        pending_size_bytes: 0,
                        seq_end_bytes: u64::MAX,
                        seq_start_bytes: 0,
                        prealloc: RangeSet::new(),
                        claimed: RangeSet::new(),
                        opens: 0,
                    }),
                })
            })
            .clone();
        drop(files);
        let attr = {
            let _m = file.meta.lock();
            let mut st = file.state.lock();
            st.opens += 1;
            st.map.clear();
            for e in extents {
                st.map.insert(e);
            }
            st.attr = attr;
            st.fetched_gen = st.inval_gen;
            overlay(&st)
        };
        if was_opening {
            // Counted in `opens` now; until this line both count (never too few).
            self.done_opening(ino);
        }
        (file, attr)
    }

    /// Closes one open of the file: commits what is pending and tells the coordinator. The
    /// coordinator's answer is not waited for (the kernel does not wait for a release
    /// either): the open counts here until the coordinator has counted its release, and
    /// the file is forgotten then if it was the last open on this node. So a new
    /// coordinator hears of the open (`open_counts`) unless the old one had counted the
    /// release. The result is the commit's.
    pub fn release(&self, uid: u32, gid: u32, file: &Arc<OpenFile>) -> Result<(), NodeError> {
        let committed = self.commit(uid, gid, file);
        if committed.is_ok() {
            self.trim_prealloc(uid, gid, file);
        }
        let (files, f) = (self.files.clone(), file.clone());
        self.meta.call_detached(
            uid,
            gid,
            Request::Release { ino: file.ino },
            Box::new(move |released| {
                if let Err(e) = released {
                    tracing::warn!(inode = %f.ino, error = %e, "the coordinator did not count a release");
                }
                let mut files = files.lock();
                let mut st = f.state.lock();
                st.opens = st.opens.saturating_sub(1);
                if st.opens == 0 && st.pending.is_empty() && !st.times_dirty {
                    files.remove(&f.ino);
                }
            }),
        );
        committed
    }

    /// At the last close on this node, hands back preallocated clusters that were never
    /// written (a punch of clusters that are still unwritten at the coordinator). Failure
    /// only leaves the clusters allocated, so it is logged, not reported.
    fn trim_prealloc(&self, uid: u32, gid: u32, file: &OpenFile) {
        let ranges: Vec<(u64, u64)> = {
            let mut st = file.state.lock();
            if st.opens > 1 || st.prealloc.is_empty() {
                return;
            }
            let r = st.prealloc.iter().collect();
            st.prealloc = RangeSet::new();
            r
        };
        let _io = file.exclusive();
        for (start, end) in ranges {
            let still_unwritten = match self.meta.call(
                uid,
                gid,
                Request::GetExtents {
                    ino: file.ino,
                    offset_bytes: start,
                    len_bytes: end - start,
                },
            ) {
                Ok(Response::Mapped { extents, .. }) => extents,
                Ok(_) | Err(_) => continue,
            };
            for e in still_unwritten.iter().filter(|e| e.unwritten) {
                let a = e.file_offset_bytes.max(start);
                let b = (e.file_offset_bytes + e.len_bytes).min(end);
                if a >= b {
                    continue;
                }
                let r = self.meta.call(
                    uid,
                    gid,
                    Request::Fallocate {
                        ino: file.ino,
                        offset_bytes: a,
                        len_bytes: b - a,
                        mode: FallocMode::PunchHole,
                    },
                );
                match r {
                    Ok(_) => file.state.lock().map.punch(a, b),
                    Err(e) => {
                        tracing::warn!(ino = %file.ino, error = %e, "handing back preallocation failed");
                    }
                }
            }
        }
    }

    /// A coordinator invalidation of `ino`: the next access refetches its layout and size.
    pub fn invalidate(&self, ino: InodeId) {
        if let Some(f) = self.get(ino) {
            f.state.lock().inval_gen += 1;
        }
    }

    /// `attr` with this node's uncommitted size applied, when the file is open here.
    pub fn overlay_attr(&self, attr: Attr) -> Attr {
        match self.get(attr.ino) {
            Some(f) => {
                let mut st = f.state.lock();
                st.attr = attr;
                overlay(&st)
            }
            None => attr,
        }
    }

    /// Refetches the extent map and attributes if an invalidation came in since the last
    /// fetch. Caller holds `io` (shared or exclusive).
    fn ensure_fresh(&self, uid: u32, gid: u32, file: &OpenFile) -> Result<(), NodeError> {
        let fresh = {
            let st = file.state.lock();
            st.fetched_gen == st.inval_gen
        };
        if fresh {
            return Ok(());
        }
        let _m = file.meta.lock();
        let gen = {
            let st = file.state.lock();
            if st.fetched_gen == st.inval_gen {
                return Ok(());
            }
            st.inval_gen
        };
        let resp = self.meta.call(
            uid,
            gid,
            Request::GetExtents {
                ino: file.ino,
                offset_bytes: 0,
                len_bytes: WHOLE_FILE_BYTES,
            },
        )?;
        let Response::Mapped { attr, extents } = resp else {
            return Err(unexpected("get extents", &resp).into());
        };
        let mut st = file.state.lock();
        st.map.clear();
        for e in extents {
            st.map.insert(e);
        }
        st.attr = attr;
        st.fetched_gen = gen;
        Ok(())
    }

    /// Reads up to `size_bytes` at `offset_bytes`, short at end of file.
    pub fn read(
        &self,
        uid: u32,
        gid: u32,
        file: &OpenFile,
        offset_bytes: u64,
        size_bytes: u32,
    ) -> Result<Vec<u8>, NodeError> {
        let _io = file.io.read();
        self.ensure_fresh(uid, gid, file)?;
        let (pieces, pending) = {
            let st = file.state.lock();
            let eof = st.attr.size_bytes.max(st.pending_size_bytes);
            if offset_bytes >= eof {
                return Ok(Vec::new());
            }
            let end = eof.min(offset_bytes.saturating_add(u64::from(size_bytes)));
            let pieces = st.map.pieces(offset_bytes, end);
            let pending: Vec<Vec<(u64, u64)>> = pieces
                .iter()
                .map(|p| match p.backing {
                    Backing::Unwritten { .. } => st
                        .pending
                        .intersect(p.file_offset_bytes, p.file_offset_bytes + p.len_bytes),
                    _ => Vec::new(),
                })
                .collect();
            (pieces, pending)
        };
        let total: u64 = pieces.iter().map(|p| p.len_bytes).sum();
        let mut buf = vec![0u8; to_usize(total)?];
        for (p, written) in pieces.iter().zip(pending) {
            let at = to_usize(p.file_offset_bytes - offset_bytes)?;
            match p.backing {
                Backing::Hole => {}
                Backing::Written { lun_offset_bytes } => {
                    let len = to_usize(p.len_bytes)?;
                    self.lun
                        .read_at(&mut buf[at..at + len], lun_offset_bytes)
                        .map_err(NodeError::lun("read"))?;
                }
                Backing::Unwritten { lun_offset_bytes } => {
                    for (s, e) in written {
                        let from = to_usize(s - offset_bytes)?;
                        let to = to_usize(e - offset_bytes)?;
                        self.lun
                            .read_at(
                                &mut buf[from..to],
                                lun_offset_bytes + (s - p.file_offset_bytes),
                            )
                            .map_err(NodeError::lun("read"))?;
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Writes `data` at `offset_bytes`, allocating clusters for unmapped parts first.
    /// With `sync` the write is committed before it returns (O_SYNC / O_DSYNC).
    pub fn write(
        &self,
        uid: u32,
        gid: u32,
        file: &OpenFile,
        offset_bytes: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<u32, NodeError> {
        let len = u64::try_from(data.len()).map_err(|_| FsError::FileTooLarge)?;
        let reply_len = u32::try_from(data.len()).map_err(|_| FsError::FileTooLarge)?;
        if len == 0 {
            return Ok(0);
        }
        let end = offset_bytes.checked_add(len).ok_or(FsError::FileTooLarge)?;
        let mut backoff = CLAIM_BACKOFF_MIN;
        let deadline = Instant::now() + CLAIM_WAIT;
        let commit_now = loop {
            if let Some(commit_now) =
                self.write_once((uid, gid), file, offset_bytes..end, data, sync)?
            {
                break commit_now;
            }
            // Another node holds the claim of an unwritten cluster of the range. Commit
            // this node's writes (so it never holds claims the other is waiting for while
            // it waits itself) and ask again when the holder has committed.
            self.commit(uid, gid, file)?;
            if Instant::now() >= deadline {
                return Err(FsError::Io(format!(
                    "clusters of {} at {offset_bytes}..{end} stayed claimed by another node for {} s",
                    file.ino,
                    CLAIM_WAIT.as_secs()
                ))
                .into());
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(CLAIM_BACKOFF_MAX);
        };
        if commit_now {
            let _io = file.exclusive();
            self.commit_locked(uid, gid, file, sync)?;
        }
        Ok(reply_len)
    }

    /// One attempt at a write: `None` when another node holds the claim of an unwritten
    /// cluster of the range (nothing was written), else whether to commit now.
    fn write_once(
        &self,
        (uid, gid): (u32, u32),
        file: &OpenFile,
        range: std::ops::Range<u64>,
        data: &[u8],
        sync: bool,
    ) -> Result<Option<bool>, NodeError> {
        let (offset_bytes, end) = (range.start, range.end);
        {
            let _io = file.io.read();
            self.ensure_fresh(uid, gid, file)?;
            let Some(pieces) = self.mapped_pieces(uid, gid, file, offset_bytes, end)? else {
                return Ok(None);
            };
            let loss_mark = self.lun.write_loss_count();
            for p in &pieces {
                let lun_offset_bytes = match p.backing {
                    Backing::Written { lun_offset_bytes }
                    | Backing::Unwritten { lun_offset_bytes } => lun_offset_bytes,
                    Backing::Hole => {
                        return Err(FsError::Io(format!(
                            "allocation left {} bytes at {} of {} unmapped",
                            p.len_bytes, p.file_offset_bytes, file.ino
                        ))
                        .into())
                    }
                };
                let from = to_usize(p.file_offset_bytes - offset_bytes)?;
                let to = from + to_usize(p.len_bytes)?;
                self.lun
                    .write_at(&data[from..to], lun_offset_bytes, WriteFlags::default())
                    .map_err(NodeError::lun("write"))?;
            }
            let mut st = file.state.lock();
            Ok(Some(
                record_write(&mut st, self.cluster_bytes, (offset_bytes, end), loss_mark) || sync,
            ))
        }
    }

    /// The LUN byte offset and length of an asynchronous request on `[offset_bytes,
    /// offset_bytes + len_bytes)`, counted in flight; `None` when it needs the blocking
    /// path: `io` busy, layout stale, past end of file, or not all of it in one written
    /// extent. A read (`write` false) is cut at end of file; a write may also lie in one
    /// unwritten extent whose claim this node holds (the next commit, which waits for it,
    /// zeroes the cluster remainders and marks the clusters written).
    fn async_target(
        &self,
        file: &OpenFile,
        offset_bytes: u64,
        len_bytes: u64,
        write: bool,
    ) -> Option<(u64, u32)> {
        let _io = file.io.try_read()?;
        let st = file.state.lock();
        if st.fetched_gen != st.inval_gen {
            return None;
        }
        let mut end = offset_bytes.checked_add(len_bytes)?;
        if !write {
            end = end.min(st.attr.size_bytes.max(st.pending_size_bytes));
        }
        if end <= offset_bytes {
            return None;
        }
        let pieces = st.map.pieces(offset_bytes, end);
        let lun_offset_bytes = match pieces[..] {
            [Piece {
                backing: Backing::Written { lun_offset_bytes },
                ..
            }] => lun_offset_bytes,
            [Piece {
                backing: Backing::Unwritten { lun_offset_bytes },
                ..
            }] if write && st.claimed.contains(offset_bytes, end) => lun_offset_bytes,
            _ => return None,
        };
        let len = u32::try_from(end - offset_bytes).ok()?;
        *file.in_flight.lock() += 1;
        Some((lun_offset_bytes, len))
    }

    /// Starts a read that needs neither the coordinator nor zero-filling: the layout is
    /// fresh and the range, cut at end of file, lies in one written extent. The LUN's
    /// completion thread hands the data to `done`; any other read gets `done(None)` at
    /// once, and so does a read the LUN fails (the blocking path then reports the error).
    pub fn read_async(
        &self,
        file: &Arc<OpenFile>,
        offset_bytes: u64,
        size_bytes: u32,
        done: ReadDone,
    ) {
        let Some((lun_offset_bytes, len)) =
            self.async_target(file, offset_bytes, u64::from(size_bytes), false)
        else {
            return done(None);
        };
        let f = file.clone();
        let started = self.lun.submit(
            AsyncIo::Read {
                offset_bytes: lun_offset_bytes,
                len_bytes: len,
            },
            Box::new(move |r| {
                f.async_ended();
                done(r.ok());
            }),
        );
        if let Err(refused) = started {
            refused(Err(BlockError::Unsupported {
                op: "asynchronous read",
            }));
        }
    }

    /// Like [`read_async`](Self::read_async), but the LUN puts the data into `pipe`
    /// (spliced from its socket: it does not pass through this process) after the bytes
    /// `to.head` gives for the read's length (cut at end of file). `to.done` gets the
    /// pipe and that length, or `None` for the blocking path: also when the LUN cannot
    /// read into a pipe, when the read is not one written extent, or when `head` declines.
    pub fn read_to_pipe(
        &self,
        file: &Arc<OpenFile>,
        offset_bytes: u64,
        size_bytes: u32,
        pipe: Pipe,
        to: impl PipeReader,
    ) {
        let Some((lun_offset_bytes, len)) =
            self.async_target(file, offset_bytes, u64::from(size_bytes), false)
        else {
            return to.done(None);
        };
        let head_written = to.head(len).is_some_and(|h| {
            let h = h.as_ref();
            // An empty pipe takes a short head whole.
            pipe.write(h).is_ok_and(|n| n == h.len())
        });
        if !head_written {
            file.async_ended();
            return to.done(None);
        }
        let f = file.clone();
        let started = self.lun.submit_read_to_pipe(
            lun_offset_bytes,
            len,
            pipe,
            Box::new(move |r| {
                f.async_ended();
                to.done(r.ok().map(|p| (p, len)));
            }),
        );
        if let Err((_, refused)) = started {
            refused(Err(BlockError::Unsupported {
                op: "read into a pipe",
            }));
        }
    }

    /// Starts a write (without O_SYNC) that needs neither the coordinator nor a new claim:
    /// the layout is fresh and the range lies in one written extent, or in one unwritten
    /// extent whose claim this node holds. Once the LUN acknowledged it and it is recorded
    /// as pending, `done` gets [`WriteOutcome::Written`]; any other write gets
    /// [`WriteOutcome::Redo`], and so does a write the LUN fails.
    ///
    /// With `by_reference` the LUN may send `data`'s pages without copying them (see
    /// [`BlockDevice::submit_write_by_reference`]): the caller keeps them unchanged until
    /// `done` runs, and after `Redo { data_held: true }` never changes them again.
    pub fn write_async(
        &self,
        file: &Arc<OpenFile>,
        offset_bytes: u64,
        data: &[u8],
        by_reference: bool,
        done: WriteDone,
    ) {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let Some((lun_offset_bytes, _)) = self.async_target(file, offset_bytes, len, true) else {
            return done(WriteOutcome::Redo { data_held: false });
        };
        let (f, cl, end) = (file.clone(), self.cluster_bytes, offset_bytes + len);
        let loss_mark = self.lun.write_loss_count();
        let done: block_client::Completion = Box::new(move |r| {
            let outcome = match r {
                Ok(_) => WriteOutcome::Written {
                    commit_now: record_write(
                        &mut f.state.lock(),
                        cl,
                        (offset_bytes, end),
                        loss_mark,
                    ),
                },
                // Only a request that may still sit in a lost connection's socket queues
                // can be read later; an answered one was read in full.
                Err(e) => WriteOutcome::Redo {
                    data_held: by_reference && e.is_path_lost(),
                },
            };
            f.async_ended();
            done(outcome);
        });
        let started = if by_reference {
            self.lun
                .submit_write_by_reference(data, lun_offset_bytes, done)
        } else {
            self.lun.submit(
                AsyncIo::Write {
                    buf: data,
                    offset_bytes: lun_offset_bytes,
                },
                done,
            )
        };
        if let Err(refused) = started {
            // Handed back unused: nothing of `data` was taken.
            refused(Err(BlockError::Unsupported {
                op: "asynchronous write",
            }));
        }
    }

    /// Pieces of `[start, end)` this node may write: allocates what is unmapped and claims
    /// unwritten clusters it does not hold yet. `None` when another node holds the claim
    /// of one of them. Caller holds `io` shared.
    fn mapped_pieces(
        &self,
        uid: u32,
        gid: u32,
        file: &OpenFile,
        start: u64,
        end: u64,
    ) -> Result<Option<Vec<Piece>>, NodeError> {
        let (pieces, run_bytes, asks) = {
            let st = file.state.lock();
            let run = if st.seq_end_bytes == start {
                end - st.seq_start_bytes
            } else {
                0
            };
            let pieces = st.map.pieces(start, end);
            let asks: Vec<bool> = pieces.iter().map(|p| needs_claim(&st, p)).collect();
            (pieces, run, asks)
        };
        let asked: Vec<&Piece> = pieces
            .iter()
            .zip(&asks)
            .filter_map(|(p, &ask)| ask.then_some(p))
            .collect();
        let (Some(first), Some(last)) = (asked.first(), asked.last()) else {
            return Ok(Some(pieces));
        };
        let alloc_start = align_down(first.file_offset_bytes, self.cluster_bytes);
        let alloc_end = align_up(last.file_offset_bytes + last.len_bytes, self.cluster_bytes);
        // A sequential run of writes gets a window as long as the run so far (up to
        // `prealloc_bytes`), so small files and short runs never hold large
        // preallocations. What the window adds is remembered and handed back at close.
        let hint_bytes = if run_bytes > end - start {
            self.prealloc_bytes
                .min(align_up(run_bytes, self.cluster_bytes))
        } else {
            0
        };
        let new_holes: Vec<(u64, u64)> = if hint_bytes > 0 {
            let st = file.state.lock();
            st.map
                .pieces(alloc_end, alloc_end.saturating_add(hint_bytes))
                .into_iter()
                .filter(|p| p.backing == Backing::Hole)
                .map(|p| (p.file_offset_bytes, p.file_offset_bytes + p.len_bytes))
                .collect()
        } else {
            Vec::new()
        };
        let _m = file.meta.lock();
        // Another writer may have allocated or claimed the range while this one waited.
        {
            let st = file.state.lock();
            let now = st.map.pieces(start, end);
            if !now.iter().any(|p| needs_claim(&st, p)) {
                return Ok(Some(now));
            }
        }
        let resp = self.meta.call(
            uid,
            gid,
            Request::Allocate {
                ino: file.ino,
                offset_bytes: alloc_start,
                len_bytes: alloc_end - alloc_start,
                hint_bytes,
            },
        )?;
        let Response::Mapped { extents, .. } = resp else {
            return Err(unexpected("allocate", &resp).into());
        };
        let mut st = file.state.lock();
        for e in &extents {
            st.map.insert(*e);
            // The answer holds the unwritten clusters of the range only where this node
            // holds their claim.
            if e.unwritten {
                st.claimed
                    .insert(e.file_offset_bytes, e.file_offset_bytes + e.len_bytes);
            }
        }
        for (a, b) in new_holes {
            st.prealloc.insert(a, b);
        }
        drop(st);
        // Build the answer from the extents this call returned, so that a refetch racing
        // with it cannot make the range look unmapped again. A hole left in it is a
        // cluster another node holds the claim of.
        let mut fresh = ExtentMap::new();
        for e in extents {
            fresh.insert(e);
        }
        let mut out = Vec::with_capacity(pieces.len());
        for (p, ask) in pieces.into_iter().zip(asks) {
            if !ask {
                out.push(p);
                continue;
            }
            for q in fresh.pieces(p.file_offset_bytes, p.file_offset_bytes + p.len_bytes) {
                if q.backing == Backing::Hole {
                    return Ok(None);
                }
                out.push(q);
            }
        }
        Ok(Some(out))
    }

    /// Commits this node's pending writes of `file`: zeroes the unwritten remainder of
    /// partially written clusters, flushes the LUN, and sends `Commit`. When only
    /// overwrites of written clusters are pending, the commit dates the file and does not
    /// flush the LUN (nothing it sends points at new data).
    pub fn commit(&self, uid: u32, gid: u32, file: &OpenFile) -> Result<(), NodeError> {
        // Waits for asynchronous writes too: one into a claimed unwritten cluster must land
        // before the commit zeroes that cluster's remainder or hands its claim back.
        let _io = file.exclusive();
        self.commit_locked(uid, gid, file, false)
    }

    /// A commit under `io` held exclusively; with `durable`, the LUN is flushed even when
    /// only overwrites are pending (an O_SYNC write).
    fn commit_locked(
        &self,
        uid: u32,
        gid: u32,
        file: &OpenFile,
        durable: bool,
    ) -> Result<(), NodeError> {
        let (ranges, size_bytes, zero, flush) = {
            let mut st = file.state.lock();
            if !st.has_pending() {
                st.pending_size_bytes = 0;
                drop(st);
                if durable {
                    self.flush_for(file)?;
                }
                return Ok(());
            }
            let ranges = std::mem::take(&mut st.pending);
            let size_bytes = st.pending_size_bytes.max(st.attr.size_bytes);
            let zero = self.remainders_to_zero(&st.map, &ranges);
            // New data the commit makes visible (marked written, or below a larger size)
            // must be on stable storage first; a commit that only dates the file need not.
            let flush = durable
                || !ranges.is_empty()
                || !zero.is_empty()
                || size_bytes > st.attr.size_bytes;
            st.times_dirty = false;
            (ranges, size_bytes, zero, flush)
        };
        let result = self.send_commit((uid, gid), file, &ranges, size_bytes, &zero, flush);
        let mut st = file.state.lock();
        match result {
            Ok(attr) => {
                for (s, e) in ranges.iter() {
                    st.map.mark_written(
                        align_down(s, self.cluster_bytes),
                        align_up(e, self.cluster_bytes),
                    );
                }
                st.attr = attr;
                // The coordinator released this node's claims on the file with the commit.
                st.claimed = RangeSet::new();
                if st.pending.is_empty() {
                    st.pending_size_bytes = 0;
                }
                Ok(())
            }
            Err(e) => {
                // Keep the writes visible to this node's readers; the caller reports the
                // failure (a failed commit is never retried behind the caller's back).
                for (s, end) in ranges.iter() {
                    st.pending.insert(s, end);
                }
                st.pending_size_bytes = st.pending_size_bytes.max(size_bytes);
                st.times_dirty = true;
                Err(e)
            }
        }
    }

    fn send_commit(
        &self,
        (uid, gid): (u32, u32),
        file: &OpenFile,
        ranges: &RangeSet,
        size_bytes: u64,
        zero: &[(u64, u64)],
        flush: bool,
    ) -> Result<Attr, NodeError> {
        for &(lun_offset_bytes, len_bytes) in zero {
            self.lun
                .write_zeroes(lun_offset_bytes, len_bytes)
                .map_err(NodeError::lun("zero cluster remainder"))?;
        }
        if flush {
            // Writes lost with their path are reported at the next fsync or close of the
            // file; their ranges are committed all the same (the LUN most likely holds
            // them, and the application that hears of the loss writes them again).
            self.flush_for(file)?;
        }
        let resp = self.meta.call(
            uid,
            gid,
            Request::Commit {
                ino: file.ino,
                written: ranges.to_byte_ranges(),
                size_bytes,
            },
        )?;
        match resp {
            Response::Attr(attr) => Ok(attr),
            other => Err(unexpected("commit", &other).into()),
        }
    }

    /// LUN ranges `(offset, len)` to zero before committing `ranges`: the parts of
    /// partially written clusters that are still unwritten and not written here.
    fn remainders_to_zero(&self, map: &ExtentMap, ranges: &RangeSet) -> Vec<(u64, u64)> {
        let cl = self.cluster_bytes;
        let mut edge_clusters = BTreeSet::new();
        for (s, e) in ranges.iter() {
            if s % cl != 0 {
                edge_clusters.insert(align_down(s, cl));
            }
            if e % cl != 0 {
                edge_clusters.insert(align_down(e, cl));
            }
        }
        let mut out = Vec::new();
        for c in edge_clusters {
            for p in map.pieces(c, c + cl) {
                let Backing::Unwritten { lun_offset_bytes } = p.backing else {
                    continue;
                };
                let mut uncovered = RangeSet::new();
                uncovered.insert(p.file_offset_bytes, p.file_offset_bytes + p.len_bytes);
                for (s, e) in
                    ranges.intersect(p.file_offset_bytes, p.file_offset_bytes + p.len_bytes)
                {
                    uncovered.remove(s, e);
                }
                for (s, e) in uncovered.iter() {
                    out.push((lun_offset_bytes + (s - p.file_offset_bytes), e - s));
                }
            }
        }
        out
    }

    /// fsync: commit pending writes, flush the LUN, and make the inode's metadata durable.
    /// A loss of writes the flush finds is counted in [`OpenFile::losses`], for the
    /// caller's [`check_loss`].
    pub fn fsync(&self, uid: u32, gid: u32, file: &OpenFile) -> Result<(), NodeError> {
        self.commit(uid, gid, file)?;
        self.flush_for(file)?;
        self.meta.call(uid, gid, Request::Fsync { ino: file.ino })?;
        Ok(())
    }

    /// Flushes the LUN for the writes of `file`, and counts in [`OpenFile::losses`] a loss
    /// of writes of the file that a path to the LUN acknowledged and lost before the flush
    /// could cover them.
    fn flush_for(&self, file: &OpenFile) -> Result<(), NodeError> {
        let (mark, gen) = {
            let st = file.state.lock();
            (st.loss_mark, st.loss_gen)
        };
        self.lun.flush().map_err(NodeError::lun("flush"))?;
        let lost = mark.is_some_and(|m| self.lun.write_loss_count() > m);
        let mut st = file.state.lock();
        if st.loss_gen == gen {
            st.loss_mark = None;
        }
        if lost {
            file.losses.fetch_add(1, Ordering::SeqCst);
            tracing::error!(
                inode = %file.ino,
                "writes of the file may not be durable: a connection to the LUN that acknowledged them was lost before a flush; the next fsync or close of each of its handles fails"
            );
        }
        Ok(())
    }

    /// Commits every open file with pending writes (periodic flusher, unmount).
    /// Returns the first error.
    pub fn commit_all(&self) -> Result<(), NodeError> {
        let mut first = Ok(());
        for f in self.open_files() {
            if f.has_pending() {
                if let Err(e) = self.commit(0, 0, &f) {
                    tracing::warn!(ino = %f.ino, error = %e, "background commit failed");
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
        first
    }

    /// setattr. A size change commits this node's pending writes first; the coordinator
    /// zeroes the written tail of the last cluster past a smaller end (FORMAT.md,
    /// unwritten rule), so a later extension reads zeros.
    pub fn set_attr(
        &self,
        uid: u32,
        gid: u32,
        ino: InodeId,
        set: SetAttr,
    ) -> Result<Attr, NodeError> {
        let Some(new_size) = set.size_bytes else {
            let resp = self.meta.call(uid, gid, Request::SetAttr { ino, set })?;
            return match resp {
                Response::Attr(a) => Ok(self.overlay_attr(a)),
                other => Err(unexpected("setattr", &other).into()),
            };
        };
        let file = self.get(ino);
        let _io = file.as_ref().map(|f| f.exclusive());
        if let Some(f) = &file {
            self.commit_locked(uid, gid, f, false)?;
        }
        let resp = self.meta.call(uid, gid, Request::SetAttr { ino, set })?;
        let Response::Attr(attr) = resp else {
            return Err(unexpected("setattr", &resp).into());
        };
        if let Some(f) = &file {
            let mut st = f.state.lock();
            st.map
                .punch(align_up(new_size, self.cluster_bytes), u64::MAX);
            st.attr = attr.clone();
            st.pending_size_bytes = 0;
            st.inval_gen += 1;
        }
        Ok(attr)
    }

    /// fallocate. Commits this node's pending writes first; the coordinator zeroes the
    /// written partial clusters at the edges of a punch-hole or zero-range (FORMAT.md).
    pub fn fallocate(
        &self,
        uid: u32,
        gid: u32,
        ino: InodeId,
        offset_bytes: u64,
        len_bytes: u64,
        mode: FallocMode,
    ) -> Result<Attr, NodeError> {
        let file = self.get(ino);
        let _io = file.as_ref().map(|f| f.exclusive());
        if let Some(f) = &file {
            self.commit_locked(uid, gid, f, false)?;
        }
        let resp = self.meta.call(
            uid,
            gid,
            Request::Fallocate {
                ino,
                offset_bytes,
                len_bytes,
                mode,
            },
        )?;
        let Response::Attr(attr) = resp else {
            return Err(unexpected("fallocate", &resp).into());
        };
        if let Some(f) = &file {
            let mut st = f.state.lock();
            st.attr = attr.clone();
            st.inval_gen += 1;
        }
        Ok(attr)
    }

    /// SEEK_DATA / SEEK_HOLE from `offset_bytes`. Unwritten clusters count as holes
    /// except where this node has uncommitted writes.
    pub fn seek(
        &self,
        uid: u32,
        gid: u32,
        file: &OpenFile,
        offset_bytes: u64,
        target: SeekTarget,
    ) -> Result<u64, NodeError> {
        let _io = file.io.read();
        self.ensure_fresh(uid, gid, file)?;
        let st = file.state.lock();
        let eof = st.attr.size_bytes.max(st.pending_size_bytes);
        if offset_bytes >= eof {
            return Err(NodeError::NoDataAfter { offset_bytes });
        }
        // Data ranges in [offset, eof), in order.
        let mut data = RangeSet::new();
        for p in st.map.pieces(offset_bytes, eof) {
            let end = p.file_offset_bytes + p.len_bytes;
            match p.backing {
                Backing::Written { .. } => data.insert(p.file_offset_bytes, end),
                Backing::Unwritten { .. } => {
                    for (s, e) in st.pending.intersect(p.file_offset_bytes, end) {
                        data.insert(s, e);
                    }
                }
                Backing::Hole => {}
            }
        }
        match target {
            SeekTarget::Data => data
                .iter()
                .next()
                .map(|(s, _)| s)
                .ok_or(NodeError::NoDataAfter { offset_bytes }),
            SeekTarget::Hole => {
                let mut pos = offset_bytes;
                for (s, e) in data.iter() {
                    if s > pos {
                        break;
                    }
                    pos = pos.max(e);
                }
                Ok(pos.min(eof))
            }
        }
    }
}

/// Records a write of `[offset_bytes, end)` now on the LUN: as pending, or as an overwrite
/// that only dates the file; true when enough is pending to commit now.
/// `loss_mark` is the LUN's write loss count taken before the write was sent.
fn record_write(
    st: &mut FileState,
    cluster_bytes: u64,
    (offset_bytes, end): (u64, u64),
    loss_mark: u64,
) -> bool {
    st.loss_mark = Some(st.loss_mark.map_or(loss_mark, |m| m.min(loss_mark)));
    st.loss_gen += 1;
    // An overwrite of written clusters has nothing for the coordinator to mark: it only
    // dates the file. Keeping it out of `pending` keeps random overwrites from filling
    // the set and forcing a commit (and its LUN flush) every few thousand writes.
    if st.map.is_written(offset_bytes, end) {
        st.times_dirty = true;
    } else {
        st.pending.insert(offset_bytes, end);
    }
    st.pending_size_bytes = st.pending_size_bytes.max(end).max(st.attr.size_bytes);
    if st.seq_end_bytes != offset_bytes {
        st.seq_start_bytes = offset_bytes;
    }
    st.seq_end_bytes = end;
    if !st.prealloc.is_empty() {
        st.prealloc.remove(
            align_down(offset_bytes, cluster_bytes),
            align_up(end, cluster_bytes),
        );
    }
    st.pending.count_ranges() > MAX_PENDING_RANGES || st.pending.len_bytes() > MAX_PENDING_BYTES
}

/// Fails (EIO) once per file handle for each loss of the file's writes found since the
/// handle last reported one: `seen` is the handle's [`OpenFile::losses`] as of its open or
/// last report. A handle's fsync, close and O_SYNC writes call it after their flush.
pub fn check_loss(file: &OpenFile, seen: &AtomicU64) -> Result<(), NodeError> {
    let now = file.losses();
    if seen.fetch_max(now, Ordering::SeqCst) < now {
        return Err(FsError::Io(format!(
            "writes of {} acknowledged by the LUN were lost with their path before a flush; they may not be durable",
            file.ino
        ))
        .into());
    }
    Ok(())
}

/// True when this node must ask the coordinator before writing into `p`: a hole, or an
/// unwritten run whose claim it does not hold.
fn needs_claim(st: &FileState, p: &Piece) -> bool {
    match p.backing {
        Backing::Hole => true,
        Backing::Unwritten { .. } => !st
            .claimed
            .contains(p.file_offset_bytes, p.file_offset_bytes + p.len_bytes),
        Backing::Written { .. } => false,
    }
}

/// The attributes a reader on this node should see: the coordinator's, with the size
/// raised to what this node has written and not committed.
fn overlay(st: &FileState) -> Attr {
    let mut attr = st.attr.clone();
    attr.size_bytes = attr.size_bytes.max(st.pending_size_bytes);
    attr
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use block_client::testing::MemDevice;
    use metadata_server::proto::{ByteRange, Caller};
    use metadata_server::types::{Extent, FileKind, NodeId, RequestId, Timestamp};
    use metadata_server::MetadataStore;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// An in-memory metadata store for files only: enough of the contract to drive the
    /// data path (open, extents, allocate, commit, setattr size, fallocate, fsync).
    /// Follows the coordinator's side of the unwritten rule: zeroes the written partial
    /// clusters at the edges of a truncate or punch on `lun`.
    #[derive(Default)]
    pub(crate) struct MemStore {
        inner: Mutex<MemInner>,
        lun: Option<Arc<MemDevice>>,
    }

    #[derive(Default)]
    struct MemInner {
        cluster_bytes: u64,
        free_next: u64,
        total_clusters: u64,
        files: HashMap<InodeId, (Attr, ExtentMap)>,
        commits: u64,
        /// `Open` requests run.
        opens: u64,
    }

    pub(crate) fn file_attr(ino: InodeId) -> Attr {
        Attr {
            ino,
            generation: 1,
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size_bytes: 0,
            allocated_bytes: 0,
            rdev: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
        }
    }

    impl MemStore {
        pub(crate) fn new(
            cluster_bytes: u64,
            total_clusters: u64,
            lun: Arc<MemDevice>,
        ) -> MemStore {
            MemStore {
                lun: Some(lun),
                ..MemStore::without_lun(cluster_bytes, total_clusters)
            }
        }

        /// A store that does not zero anything on the LUN (no truncate or punch in the
        /// test that uses it).
        pub(crate) fn without_lun(cluster_bytes: u64, total_clusters: u64) -> MemStore {
            let s = MemStore::default();
            {
                let mut i = s.inner.lock();
                i.cluster_bytes = cluster_bytes;
                i.total_clusters = total_clusters;
            }
            s
        }

        pub(crate) fn add_file(&self, ino: InodeId) {
            self.inner
                .lock()
                .files
                .insert(ino, (file_attr(ino), ExtentMap::new()));
        }

        pub(crate) fn allocated_clusters(&self, ino: InodeId) -> u64 {
            let inner = self.inner.lock();
            let (_, m) = &inner.files[&ino];
            m.pieces(0, 1 << 40)
                .iter()
                .filter(|p| p.backing != Backing::Hole)
                .map(|p| p.len_bytes / inner.cluster_bytes)
                .sum()
        }

        fn zero_written(&self, map: &ExtentMap, start: u64, end: u64) {
            for p in map.pieces(start, end) {
                if let (Backing::Written { lun_offset_bytes }, Some(lun)) = (p.backing, &self.lun) {
                    lun.write_zeroes(lun_offset_bytes, p.len_bytes).unwrap();
                }
            }
        }

        fn all_extents(map: &ExtentMap, start: u64, end: u64) -> Vec<Extent> {
            map.pieces(start, end)
                .into_iter()
                .filter_map(|p| match p.backing {
                    Backing::Hole => None,
                    Backing::Written { lun_offset_bytes } => Some(Extent {
                        file_offset_bytes: p.file_offset_bytes,
                        lun_offset_bytes,
                        len_bytes: p.len_bytes,
                        unwritten: false,
                    }),
                    Backing::Unwritten { lun_offset_bytes } => Some(Extent {
                        file_offset_bytes: p.file_offset_bytes,
                        lun_offset_bytes,
                        len_bytes: p.len_bytes,
                        unwritten: true,
                    }),
                })
                .collect()
        }
    }

    impl MetadataStore for MemStore {
        fn execute(&self, _caller: &Caller, req: &Request) -> Result<Response, FsError> {
            let mut guard = self.inner.lock();
            let inner = &mut *guard;
            let cl = inner.cluster_bytes;
            if matches!(req, Request::Open { .. }) {
                inner.opens += 1;
            }
            match req {
                Request::Open { ino, .. } | Request::GetAttr { ino } => {
                    let (a, m) = inner.files.get(ino).ok_or(FsError::NotFound)?;
                    Ok(Response::Mapped {
                        attr: a.clone(),
                        extents: Self::all_extents(m, 0, 1 << 62),
                    })
                }
                Request::GetExtents {
                    ino,
                    offset_bytes,
                    len_bytes,
                } => {
                    let (a, m) = inner.files.get(ino).ok_or(FsError::NotFound)?;
                    let start = align_down(*offset_bytes, cl);
                    let end = align_up(offset_bytes.saturating_add(*len_bytes), cl);
                    Ok(Response::Mapped {
                        attr: a.clone(),
                        extents: Self::all_extents(m, start, end),
                    })
                }
                Request::Allocate {
                    ino,
                    offset_bytes,
                    len_bytes,
                    hint_bytes,
                } => {
                    let start = align_down(*offset_bytes, cl);
                    let end = align_up(offset_bytes + len_bytes + hint_bytes, cl);
                    let (a, m) = inner.files.get_mut(ino).ok_or(FsError::NotFound)?;
                    let holes: Vec<Piece> = m
                        .pieces(start, end)
                        .into_iter()
                        .filter(|p| p.backing == Backing::Hole)
                        .collect();
                    for p in holes {
                        let n = p.len_bytes / cl;
                        if inner.free_next + n > inner.total_clusters {
                            return Err(FsError::NoSpace);
                        }
                        m.insert(Extent {
                            file_offset_bytes: p.file_offset_bytes,
                            lun_offset_bytes: inner.free_next * cl,
                            len_bytes: p.len_bytes,
                            unwritten: true,
                        });
                        inner.free_next += n;
                        a.allocated_bytes += p.len_bytes;
                    }
                    Ok(Response::Mapped {
                        attr: a.clone(),
                        extents: Self::all_extents(m, start, end),
                    })
                }
                Request::Commit {
                    ino,
                    written,
                    size_bytes,
                } => {
                    inner.commits += 1;
                    let (a, m) = inner.files.get_mut(ino).ok_or(FsError::NotFound)?;
                    for ByteRange {
                        offset_bytes,
                        len_bytes,
                    } in written
                    {
                        m.mark_written(
                            align_down(*offset_bytes, cl),
                            align_up(offset_bytes + len_bytes, cl),
                        );
                    }
                    a.size_bytes = a.size_bytes.max(*size_bytes);
                    Ok(Response::Attr(a.clone()))
                }
                Request::SetAttr { ino, set } => {
                    let (a, m) = inner.files.get_mut(ino).ok_or(FsError::NotFound)?;
                    if let Some(s) = set.size_bytes {
                        if s < a.size_bytes {
                            self.zero_written(m, s, align_up(s, cl));
                        }
                        m.punch(align_up(s, cl), u64::MAX);
                        a.size_bytes = s;
                    }
                    Ok(Response::Attr(a.clone()))
                }
                Request::Fallocate {
                    ino,
                    offset_bytes,
                    len_bytes,
                    mode,
                } => {
                    let (a, m) = inner.files.get_mut(ino).ok_or(FsError::NotFound)?;
                    if *mode == FallocMode::PunchHole {
                        let end = offset_bytes + len_bytes;
                        self.zero_written(m, *offset_bytes, align_up(*offset_bytes, cl).min(end));
                        self.zero_written(m, align_down(end, cl).max(*offset_bytes), end);
                        m.punch(
                            align_up(*offset_bytes, cl),
                            align_down(offset_bytes + len_bytes, cl),
                        );
                    }
                    Ok(Response::Attr(a.clone()))
                }
                Request::Release { .. } | Request::Fsync { .. } => Ok(Response::Done),
                other => Err(FsError::Invalid(format!("mem store: {other:?}"))),
            }
        }

        fn node_gone(&self, _node: NodeId) -> Result<(), FsError> {
            Ok(())
        }
    }

    /// [`Metadata`] over a store, as one node.
    pub(crate) struct StoreMeta {
        pub(crate) store: Arc<MemStore>,
        next: AtomicU64,
    }

    impl StoreMeta {
        pub(crate) fn new(store: Arc<MemStore>) -> StoreMeta {
            StoreMeta {
                store,
                next: AtomicU64::new(1),
            }
        }
    }

    impl Metadata for StoreMeta {
        fn call(&self, uid: u32, gid: u32, req: Request) -> Result<Response, FsError> {
            let caller = Caller {
                node: NodeId(1),
                request: RequestId(self.next.fetch_add(1, Ordering::Relaxed)),
                uid,
                gid,
            };
            self.store.execute(&caller, &req)
        }
    }

    const CL: u64 = 64 * 1024;

    fn setup() -> (DataPath, Arc<MemStore>, Arc<MemDevice>) {
        let lun = Arc::new(MemDevice::new(CL * 64));
        let store = Arc::new(MemStore::new(CL, 64, lun.clone()));
        store.add_file(InodeId(10));
        // Stale data everywhere: nothing may leak into a file.
        lun.write_at(
            &vec![0xEE; to_usize(CL * 64).unwrap()],
            0,
            WriteFlags::default(),
        )
        .unwrap();
        let meta = Arc::new(StoreMeta::new(store.clone()));
        let dp = DataPath::new(lun.clone(), meta, CL, 2 * CL);
        (dp, store, lun)
    }

    #[test]
    fn a_file_created_across_a_takeover_is_opened_at_the_new_coordinator() {
        let (dp, store, _lun) = setup();
        for ino in 11..=18 {
            store.add_file(InodeId(ino));
        }
        let create = |ino: u64, stamp: u64| {
            dp.created(InodeId(ino), file_attr(InodeId(ino)), Vec::new(), stamp)
                .0
        };
        let opens = || store.inner.lock().opens;
        create(11, 0);
        // The coordinator of epoch 2 took over at invalidation stamp 5.
        let snap = dp.reopen_snapshot(5, Epoch(2));
        assert_eq!(snap, vec![(InodeId(11), 1)]);
        // Answered by the old coordinator (stamp 3), recorded after the snapshot: waits
        // until the snapshot is counted. Answered by the new one (stamp 6): counted there.
        create(12, 3);
        create(13, 6);
        assert_eq!(opens(), 0, "opened before the re-announcement was counted");
        assert_eq!(dp.reopen_counted(Epoch(3)), 0, "another epoch's count");
        assert_eq!(dp.reopen_counted(Epoch(2)), 1);
        assert_eq!(opens(), 1, "the file the snapshot missed was not opened");
        // Late once the snapshot is counted: opened at once.
        create(14, 4);
        assert_eq!(opens(), 2);
        // A retried snapshot holds what an earlier one missed; a file released before the
        // snapshot is counted is not opened again.
        dp.reopen_snapshot(9, Epoch(4));
        create(15, 7);
        create(16, 8);
        let snap = dp.reopen_snapshot(9, Epoch(4));
        assert!(snap.contains(&(InodeId(15), 1)) && snap.contains(&(InodeId(16), 1)));
        assert_eq!(dp.reopen_counted(Epoch(4)), 0);
        dp.reopen_snapshot(12, Epoch(5));
        create(17, 10);
        let f18 = create(18, 11);
        dp.release(0, 0, &f18).unwrap();
        assert_eq!(dp.reopen_counted(Epoch(5)), 1, "only the file still open");
        assert_eq!(opens(), 3);
    }

    /// Records how a read into a pipe ended.
    struct PipeOutcome {
        head: bool,
        tx: std::sync::mpsc::Sender<Option<(Vec<u8>, u32)>>,
    }

    impl PipeReader for PipeOutcome {
        type Head = Vec<u8>;

        fn head(&self, len: u32) -> Option<Vec<u8>> {
            self.head.then(|| format!("head {len:08}").into_bytes())
        }

        fn done(self, got: Option<(Pipe, u32)>) {
            let got = got.map(|(pipe, len)| (pipe.read_available().unwrap(), len));
            self.tx.send(got).unwrap();
        }
    }

    fn read_to_pipe(
        dp: &DataPath,
        f: &Arc<OpenFile>,
        offset: u64,
        size: u32,
        head: bool,
    ) -> Option<(Vec<u8>, u32)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = Pipe::new(4 << 20).unwrap();
        dp.read_to_pipe(f, offset, size, pipe, PipeOutcome { head, tx });
        let got = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(*f.in_flight.lock(), 0, "left counted in flight");
        got
    }

    #[test]
    fn reads_into_a_pipe_carry_the_head_and_the_files_bytes_cut_at_end_of_file() {
        // The LUN reached over NBD, which reads into pipes; the store sees the same device.
        let (_, store, lun) = setup();
        let listen = block_client::nbd::ListenAddr::Unix(
            std::env::temp_dir().join(format!("csvfs-data-pipe-{}.sock", std::process::id())),
        );
        let server =
            block_client::nbd::serve_device(lun.clone(), &listen, Default::default()).unwrap();
        let nbd = block_client::NbdClient::open(&server.uri(), Default::default()).unwrap();
        let meta = Arc::new(StoreMeta::new(store.clone()));
        let dp = DataPath::new(Arc::new(nbd), meta, CL, 2 * CL);
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        let data: Vec<u8> = (0..3 * CL).map(|i| (i % 249) as u8).collect();
        let size = to_usize(3 * CL - 1000).unwrap();
        dp.write(0, 0, &f, 0, &data[..size], true).unwrap();
        let (got, len) = read_to_pipe(&dp, &f, 4096, 65_536, true).unwrap();
        assert_eq!(len, 65_536);
        assert_eq!(&got[..13], b"head 00065536");
        assert!(got[13..] == data[4096..4096 + 65_536]);
        // A read past the end of the file is cut there; the head says so.
        let at = 2 * CL + 10;
        let (got, len) = read_to_pipe(&dp, &f, at, 1 << 20, true).unwrap();
        let want = &data[to_usize(at).unwrap()..size];
        assert_eq!(to_usize(u64::from(len)).unwrap(), want.len());
        assert_eq!(got[..13], *format!("head {:08}", want.len()).as_bytes());
        assert!(got[13..] == *want);
        // A reader that declines the head gets the blocking path.
        assert!(read_to_pipe(&dp, &f, 0, 65_536, false).is_none());
        drop(dp);
        server.shutdown().unwrap();
    }

    #[test]
    fn a_read_into_a_pipe_the_lun_cannot_take_goes_to_the_blocking_path() {
        // A memory LUN has no pipe path: the read is refused, nothing stays in flight, and
        // a commit (which waits for requests in flight) goes through.
        let (dp, _store, _lun) = setup();
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        dp.write(0, 0, &f, 0, &vec![5u8; to_usize(CL).unwrap()], true)
            .unwrap();
        assert!(read_to_pipe(&dp, &f, 0, 65_536, true).is_none());
        dp.write(0, 0, &f, 0, b"again", false).unwrap();
        dp.commit(0, 0, &f).unwrap();
    }

    #[test]
    fn write_then_read_back_with_holes_as_zeros() {
        let (dp, _store, _lun) = setup();
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        dp.write(0, 0, &f, 5 * CL + 100, b"hello", false).unwrap();
        let buf = dp
            .read(0, 0, &f, 0, u32::try_from(6 * CL).unwrap())
            .unwrap();
        assert_eq!(buf.len(), to_usize(5 * CL + 105).unwrap());
        let at = to_usize(5 * CL + 100).unwrap();
        assert_eq!(&buf[at..at + 5], b"hello");
        assert!(
            buf[..at].iter().all(|&b| b == 0),
            "hole or unwritten leaked"
        );
    }

    #[test]
    fn commit_zeroes_cluster_remainder_and_survives_reopen() {
        let (dp, store, _lun) = setup();
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        dp.write(0, 0, &f, 100, b"abc", false).unwrap();
        dp.release(0, 0, &f).unwrap();
        assert_eq!(store.inner.lock().commits, 1);
        // A second node's view: fresh data path over the same store and LUN.
        let (f, attr) = dp.open(0, 0, InodeId(10), false).unwrap();
        assert_eq!(attr.size_bytes, 103);
        // Extend the size: the committed cluster's remainder must read as zeros.
        dp.set_attr(
            0,
            0,
            InodeId(10),
            SetAttr {
                size_bytes: Some(CL),
                ..SetAttr::default()
            },
        )
        .unwrap();
        let buf = dp.read(0, 0, &f, 0, u32::try_from(CL).unwrap()).unwrap();
        assert_eq!(&buf[100..103], b"abc");
        assert!(buf[..100].iter().all(|&b| b == 0));
        assert!(
            buf[103..].iter().all(|&b| b == 0),
            "stale bytes past the write"
        );
    }

    #[test]
    fn sequential_writes_preallocate() {
        let (dp, store, _lun) = setup();
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        let chunk = vec![7u8; to_usize(CL / 2).unwrap()];
        for i in 0..4u64 {
            dp.write(0, 0, &f, i * CL / 2, &chunk, false).unwrap();
        }
        // Cluster 0 without a hint, then cluster 1 with a window as long as the run.
        assert_eq!(store.inner.lock().free_next, 4);
        dp.fsync(0, 0, &f).unwrap();
        // The window's unused cluster goes back at close.
        let (g, _) = dp.open(0, 0, InodeId(10), false).unwrap();
        dp.release(0, 0, &f).unwrap();
        assert_eq!(
            store.allocated_clusters(InodeId(10)),
            4,
            "handed back while open"
        );
        dp.release(0, 0, &g).unwrap();
        assert_eq!(store.allocated_clusters(InodeId(10)), 2);
        let (f, _) = dp.open(0, 0, InodeId(10), false).unwrap();
        let buf = dp
            .read(0, 0, &f, 0, u32::try_from(4 * CL).unwrap())
            .unwrap();
        assert_eq!(buf.len(), to_usize(2 * CL).unwrap());
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn truncate_down_then_up_reads_zeros() {
        let (dp, _store, _lun) = setup();
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        dp.write(0, 0, &f, 0, &vec![9u8; 1000], false).unwrap();
        for size in [10, 2000] {
            dp.set_attr(
                0,
                0,
                InodeId(10),
                SetAttr {
                    size_bytes: Some(size),
                    ..SetAttr::default()
                },
            )
            .unwrap();
        }
        let buf = dp.read(0, 0, &f, 0, 4096).unwrap();
        assert_eq!(buf.len(), 2000);
        assert!(buf[..10].iter().all(|&b| b == 9));
        assert!(buf[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn punch_hole_zeroes_partial_clusters() {
        let (dp, _store, _lun) = setup();
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        dp.write(0, 0, &f, 0, &vec![5u8; to_usize(3 * CL).unwrap()], false)
            .unwrap();
        dp.fallocate(0, 0, InodeId(10), CL / 2, 2 * CL, FallocMode::PunchHole)
            .unwrap();
        let buf = dp
            .read(0, 0, &f, 0, u32::try_from(3 * CL).unwrap())
            .unwrap();
        let a = to_usize(CL / 2).unwrap();
        let b = to_usize(CL / 2 + 2 * CL).unwrap();
        assert!(buf[..a].iter().all(|&x| x == 5));
        assert!(buf[a..b].iter().all(|&x| x == 0));
        assert!(buf[b..].iter().all(|&x| x == 5));
        // The edges were zeroed in place and stay data; the middle cluster is a hole.
        assert_eq!(dp.seek(0, 0, &f, 0, SeekTarget::Hole).unwrap(), CL);
        assert_eq!(dp.seek(0, 0, &f, CL, SeekTarget::Data).unwrap(), CL + CL);
    }

    /// Starts `write_async` (by reference or not) and waits for its outcome.
    fn write_async_outcome(
        dp: &DataPath,
        f: &Arc<OpenFile>,
        at: u64,
        data: &[u8],
        by_reference: bool,
    ) -> WriteOutcome {
        let (tx, rx) = std::sync::mpsc::channel();
        dp.write_async(
            f,
            at,
            data,
            by_reference,
            Box::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// A data path on `served` (over `mem`) through a real NBD server and client, with
    /// inode 10 open and written sequentially for two clusters, so that the second write
    /// claimed clusters 2 and 3 ahead.
    fn sequential_over_nbd(
        served: Arc<dyn BlockDevice>,
        mem: Arc<MemDevice>,
        tag: &str,
    ) -> (
        block_client::nbd::ServerHandle,
        Arc<MemStore>,
        DataPath,
        Arc<OpenFile>,
    ) {
        use block_client::nbd::{serve_device, ListenAddr, NbdClient, NbdClientOptions};
        let sock = std::env::temp_dir().join(format!("csvfs-{tag}-{}.sock", std::process::id()));
        let server = serve_device(served, &ListenAddr::Unix(sock), Default::default()).unwrap();
        // A request the LUN never answers fails soon instead of after the default 30 s.
        let options = NbdClientOptions {
            request_timeout_ms: 1500,
            ..NbdClientOptions::default()
        };
        let lun = Arc::new(NbdClient::open(&server.uri(), options).unwrap());
        let store = Arc::new(MemStore::new(CL, 64, mem));
        store.add_file(InodeId(10));
        let dp = DataPath::new(lun, Arc::new(StoreMeta::new(store.clone())), CL, 2 * CL);
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        dp.write(0, 0, &f, 0, &chunk(1), false).unwrap();
        dp.write(0, 0, &f, CL, &chunk(2), false).unwrap();
        (server, store, dp, f)
    }

    /// One cluster of `b`.
    fn chunk(b: u8) -> Vec<u8> {
        vec![b; to_usize(CL).unwrap()]
    }

    /// fsync of `f`, retried while the flush itself is cut by a restart (a flush in flight
    /// is never resent); then the handle's report.
    fn fsync_then_report(dp: &DataPath, f: &OpenFile, seen: &AtomicU64) -> Result<(), i32> {
        let t = Instant::now();
        while let Err(e) = dp.fsync(0, 0, f) {
            assert!(t.elapsed() < Duration::from_secs(20), "fsync: {e}");
        }
        check_loss(f, seen).map_err(|e| crate::errno::errno_of(&e))
    }

    #[test]
    fn writes_a_lost_connection_acknowledged_fail_each_handles_fsync_once() {
        use block_client::nbd::{serve_device, ListenAddr};
        let mem = Arc::new(MemDevice::new(CL * 64));
        let (server, store, dp, f) = sequential_over_nbd(mem.clone(), mem.clone(), "loss");
        let sock = std::env::temp_dir().join(format!("csvfs-loss-{}.sock", std::process::id()));
        // Two handles of file 10; file 11 written and fsynced before the loss.
        let (a, b) = (AtomicU64::new(f.losses()), AtomicU64::new(f.losses()));
        store.add_file(InodeId(11));
        let (g, _) = dp.open(0, 0, InodeId(11), true).unwrap();
        let g_seen = AtomicU64::new(g.losses());
        dp.write(0, 0, &g, 0, &chunk(9), false).unwrap();
        assert_eq!(fsync_then_report(&dp, &g, &g_seen), Ok(()));
        assert_eq!(fsync_then_report(&dp, &f, &a), Ok(()));
        // An overwrite of a written cluster: acknowledged, not flushed (no commit flushes
        // it), then the LUN server restarts and the connection that took it is gone.
        dp.write(0, 0, &f, 0, &chunk(5), false).unwrap();
        server.shutdown().unwrap();
        let server =
            serve_device(mem.clone(), &ListenAddr::Unix(sock), Default::default()).unwrap();
        // Each handle of the file hears of it once; the other file not at all.
        assert_eq!(fsync_then_report(&dp, &f, &a), Err(libc::EIO));
        assert_eq!(fsync_then_report(&dp, &f, &a), Ok(()));
        assert_eq!(
            check_loss(&f, &b).map_err(|e| crate::errno::errno_of(&e)),
            Err(libc::EIO)
        );
        assert_eq!(
            check_loss(&f, &b).map_err(|e| crate::errno::errno_of(&e)),
            Ok(())
        );
        assert_eq!(fsync_then_report(&dp, &g, &g_seen), Ok(()));
        // A handle opened after the loss does not report it; writes after it are durable.
        let c = AtomicU64::new(f.losses());
        dp.write(0, 0, &f, CL, &chunk(6), false).unwrap();
        assert_eq!(fsync_then_report(&dp, &f, &c), Ok(()));
        assert_eq!(fsync_then_report(&dp, &f, &a), Ok(()));
        let back = dp
            .read(0, 0, &f, 0, u32::try_from(2 * CL).unwrap())
            .unwrap();
        assert!(back[..to_usize(CL).unwrap()].iter().all(|&x| x == 5));
        assert!(back[to_usize(CL).unwrap()..].iter().all(|&x| x == 6));
        drop(dp);
        server.shutdown().unwrap();
    }

    #[test]
    fn async_writes_by_reference_say_whether_the_lun_may_still_read_the_data() {
        use block_client::testing::{FailKind, FlakyDisk, OpClass};
        let mem = Arc::new(MemDevice::new(CL * 64));
        let flaky = Arc::new(FlakyDisk::new(mem.clone()));
        let faults = flaky.handle();
        let (_server, _store, dp, f) = sequential_over_nbd(flaky, mem, "byref");
        // Into a claimed cluster: handed to the LUN, and on it.
        assert_eq!(
            write_async_outcome(&dp, &f, 2 * CL, &chunk(3), true),
            WriteOutcome::Written { commit_now: false }
        );
        let back = dp
            .read(0, 0, &f, 2 * CL, u32::try_from(CL).unwrap())
            .unwrap();
        assert!(back.iter().all(|&b| b == 3));
        // A write the LUN answered with an error was read in full: its memory is free.
        faults.fail_nth(OpClass::Write, 1, FailKind::Device(libc::EIO));
        assert_eq!(
            write_async_outcome(&dp, &f, 2 * CL, &chunk(4), true),
            WriteOutcome::Redo { data_held: false }
        );
        faults.heal();
        // Off the fast path (a hole past the claims): not handed over at all.
        assert_eq!(
            write_async_outcome(&dp, &f, 8 * CL, &chunk(5), true),
            WriteOutcome::Redo { data_held: false }
        );
        // A write the LUN never answers: its connection is declared dead. Copied, it holds
        // nothing; by reference, the LUN may still read it from that connection's queues.
        faults.hang(OpClass::Write);
        assert_eq!(
            write_async_outcome(&dp, &f, 2 * CL, &chunk(6), false),
            WriteOutcome::Redo { data_held: false }
        );
        assert_eq!(
            write_async_outcome(&dp, &f, 2 * CL, &chunk(7), true),
            WriteOutcome::Redo { data_held: true }
        );
        assert!(faults.hung_ops() >= 2);
        faults.heal();
    }

    #[test]
    fn async_writes_go_into_claimed_unwritten_clusters_only() {
        let mem = Arc::new(MemDevice::new(CL * 64));
        mem.write_at(
            &vec![0xEE; to_usize(CL * 64).unwrap()],
            0,
            WriteFlags::default(),
        )
        .unwrap();
        // Two sequential blocking writes: the second claims clusters 2 and 3 ahead.
        let (_server, store, dp, f) = sequential_over_nbd(mem.clone(), mem, "data");
        assert_eq!(store.allocated_clusters(InodeId(10)), 4);
        // Into a claimed unwritten cluster: the fast path takes it.
        assert_eq!(
            write_async_outcome(&dp, &f, 2 * CL, &chunk(3), false),
            WriteOutcome::Written { commit_now: false }
        );
        let read_all = |f: &OpenFile| dp.read(0, 0, f, 0, u32::try_from(4 * CL).unwrap()).unwrap();
        let buf = read_all(&f);
        assert_eq!(buf.len(), to_usize(3 * CL).unwrap());
        assert!(buf[to_usize(2 * CL).unwrap()..].iter().all(|&b| b == 3));
        // The commit marks it written and hands the claims back: cluster 3 is unwritten
        // and no longer claimed, so a write into it takes the blocking path.
        dp.commit(0, 0, &f).unwrap();
        let written = store.inner.lock().files[&InodeId(10)]
            .1
            .pieces(2 * CL, 3 * CL)
            .iter()
            .all(|p| matches!(p.backing, Backing::Written { .. }));
        assert!(written);
        assert_eq!(
            write_async_outcome(&dp, &f, 3 * CL, &chunk(4), false),
            WriteOutcome::Redo { data_held: false }
        );
        dp.release(0, 0, &f).unwrap();
        let (g, attr) = dp.open(0, 0, InodeId(10), false).unwrap();
        assert_eq!(attr.size_bytes, 3 * CL);
        let buf = read_all(&g);
        for (i, want) in [1u8, 2, 3].into_iter().enumerate() {
            let c = to_usize(CL).unwrap();
            assert!(
                buf[i * c..(i + 1) * c].iter().all(|&b| b == want),
                "cluster {i}"
            );
        }
        dp.release(0, 0, &g).unwrap();
    }

    #[test]
    fn overwrites_of_written_clusters_commit_without_a_lun_flush() {
        let disk = Arc::new(block_client::testing::CrashDisk::new(CL * 64));
        let store = Arc::new(MemStore::without_lun(CL, 64));
        store.add_file(InodeId(10));
        let meta = Arc::new(StoreMeta::new(store.clone()));
        let dp = DataPath::new(disk.clone(), meta, CL, 2 * CL);
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        dp.write(0, 0, &f, 0, &vec![1u8; to_usize(4 * CL).unwrap()], false)
            .unwrap();
        dp.commit(0, 0, &f).unwrap();
        let (flushes, commits) = (disk.flushes_seen(), store.inner.lock().commits);

        // More disjoint overwrites than the pending-range limit: none of them is a range
        // the coordinator must mark, so none forces a commit.
        let n = u64::try_from(MAX_PENDING_RANGES).unwrap() + 100;
        assert!(n * 48 < 4 * CL);
        for i in 0..n {
            dp.write(0, 0, &f, i * 48, &[2u8; 16], false).unwrap();
        }
        assert_eq!(
            store.inner.lock().commits,
            commits,
            "overwrites forced a commit"
        );
        assert!(
            f.has_pending(),
            "the file's mtime is not brought up to date"
        );
        dp.commit(0, 0, &f).unwrap();
        assert_eq!(store.inner.lock().commits, commits + 1);
        assert_eq!(
            disk.flushes_seen(),
            flushes,
            "a commit that only dates the file flushed the LUN"
        );
        assert!(!f.has_pending());

        // An O_SYNC overwrite is durable when it returns (the file starts at LUN 0).
        dp.write(0, 0, &f, 100, b"sync", true).unwrap();
        assert!(disk.flushes_seen() > flushes);
        assert_eq!(&disk.durable_image()[100..104], b"sync");
        let mut want = vec![1u8; 144];
        for at in [0, 48, 96] {
            want[at..at + 16].fill(2);
        }
        want[100..104].copy_from_slice(b"sync");
        assert_eq!(dp.read(0, 0, &f, 0, 144).unwrap(), want);
    }

    #[test]
    fn no_space_is_reported() {
        let (dp, _store, _lun) = setup();
        let (f, _) = dp.open(0, 0, InodeId(10), true).unwrap();
        let big = vec![1u8; to_usize(70 * CL).unwrap()];
        let err = dp.write(0, 0, &f, 0, &big, false).unwrap_err();
        assert!(matches!(err, NodeError::Fs(FsError::NoSpace)));
    }
}
