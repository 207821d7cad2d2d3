//! The FUSE side of a node: turns kernel requests into metadata requests and data-path
//! calls, and coordinator invalidations into kernel cache invalidations.
//!
//! The mount runs [`fuse_threads`] event loops, of which [`fuse_readers`] read requests
//! at once; a loop whose handler is about to wait hands its turn to a parked one. A
//! request that waits for the coordinator (metadata, and the data slow path's setup) runs
//! on the event loop that read it, which replies itself: no hand-off to another thread
//! and back. At most `INLINE_MAX` event loops wait like that at once; past that a request
//! is handed to a worker pool (tokio's blocking pool) with its reply object, so some event
//! loops always keep reading requests (the data fast path needs no coordinator and keeps
//! running while none is reachable). The data fast
//! path: a read or write that lies in one written extent of a file whose layout is fresh is
//! sent to the LUN by the event loop itself and answered by the LUN's completion thread (no
//! worker, no waiting thread); anything else, and any such request the LUN fails, goes to a
//! worker. A fast-path read of `SPLICE_READ_MIN_BYTES` or more is answered without its data
//! entering this process: the LUN's reply is spliced from the NBD socket into a pipe behind
//! the FUSE reply header, and the pipe into `/dev/fuse` (fuser's `ReplyData::splice`, a
//! patch of ours: csvfs/vendor/fuser/PATCHED.md), so the kernel copies the data once, into
//! the reader's pages. A fast-path write of `WAIT_WRITE_MIN_BYTES` or more waits for the LUN
//! on its event loop and is sent by reference from the kernel's request buffer (vmsplice and
//! splice into the NBD socket: no copy in this process); should the path to the LUN be lost
//! meanwhile, the event loop retires that buffer (fuser's `retire_request_buffer`, also a
//! patch of ours), since the pages may still sit in socket queues, to be read by a LUN
//! server cut off from this node. A write the LUN answered with an error was read in full
//! and keeps its buffer. Regular files are always opened with direct I/O so no node serves a file from its
//! page cache, and parallel direct writes and asynchronous direct I/O are enabled so many
//! requests of one file are in flight at once.

use crate::data::{check_loss, DataPath, OpenFile, PipeReader, SeekTarget, WriteOutcome};
use crate::errno::{errno_of, NodeError};
use crate::meta::{unexpected, Metadata};
use block_client::Pipe;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, TimeOrNow,
};
use metadata_server::proto::{Request, Response};
use metadata_server::types::{
    Attr, FallocMode, FileKind, FsError, InodeId, RenameFlags as WireRenameFlags, SetAttr, TimeSet,
    Timestamp, XattrMode,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug_span, warn};

/// Largest write the kernel sends in one request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// Directory entries asked for per readdir round trip.
const READDIR_BATCH: u32 = 512;
/// FUSE event loops (threads reading the kernel's requests) of a mount whose loops read
/// `readers` at a time ([`fuse_readers`]): enough for `INLINE_MAX` waiting ones plus the
/// readers.
pub fn fuse_threads(readers: usize) -> usize {
    INLINE_MAX + readers
}

/// Event loops that wait in read(2) on `/dev/fuse` at once: one per CPU, from 2 to 8. The
/// others park in the node until a reading loop's handler is about to wait (fuser's
/// `leave_readers`, a patch of ours). The kernel wakes a sleeping reader for every request
/// it queues: with all 36 loops reading, nearly every 4 KiB read woke one (a third of a
/// 2-CPU machine went to wake-ups and thread switches). A few readers that keep their
/// turn while their handlers are quick mostly find the next request queued and take it
/// without sleeping; more than one per CPU could not run at once anyway.
pub fn fuse_readers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}
/// Event loops that may wait (for the coordinator, or a large write for the LUN) at once;
/// the others keep reading. As many as the 32 requests a VM's disk or fio keeps in flight,
/// so such a stream of large writes is sent from the kernel's buffer without a copy
/// (measured with 12 of 16: about a quarter of 1 MiB writes at QD32 took the copying path,
/// 4% of the machine in memmove and page faults).
const INLINE_MAX: usize = 32;
/// Writes from this size up wait for the LUN on their event loop (while one may wait) instead
/// of keeping a copy of their data for the blocking path.
const WAIT_WRITE_MIN_BYTES: usize = 64 << 10;
/// Reads from this size up are answered by splicing the LUN's reply through a pipe into
/// `/dev/fuse` (one copy in the kernel) instead of copying it into this process and out
/// again. Below it the buffered way is faster (measured: 64 KiB reads 16–39% slower
/// spliced, 128 KiB 8–10% faster): much of a small reply already sits in the NBD reply
/// reader's 64 KiB buffer, so splicing it only adds a copy into the pipe and system calls.
const SPLICE_READ_MIN_BYTES: u32 = 128 << 10;
/// Size asked for each splice pipe: room for the largest read and its reply header, with
/// slots to spare for socket data that fills a slot with less than a page. Without
/// CAP_SYS_RESOURCE the kernel gives at most `fs.pipe-max-size` (1 MiB by default).
const SPLICE_PIPE_BYTES: usize = 4 * MAX_WRITE_BYTES as usize;
/// Idle splice pipes kept for reuse.
const SPLICE_PIPES_KEPT: usize = 64;
/// How long a worker waits for the kernel to apply one invalidation.
const INVALIDATION_WAIT: Duration = Duration::from_millis(100);

/// What a file handle refers to.
#[derive(Debug)]
struct Handle {
    file: Arc<OpenFile>,
    /// Opened with O_SYNC or O_DSYNC: every write is committed before it returns.
    sync: bool,
    /// The file's [`OpenFile::losses`] this handle has reported (or found at its open).
    seen_loss: Arc<AtomicU64>,
}

/// A read answered by splicing the LUN's reply into the kernel's (see
/// [`DataPath::read_to_pipe`]).
struct SplicedRead {
    reply: ReplyData,
    inner: Arc<Inner>,
    /// Reads on the blocking path and replies, when the pipe does not serve.
    blocking: Box<dyn FnOnce(ReplyData) + Send>,
    ino: u64,
    offset: u64,
}

impl PipeReader for SplicedRead {
    type Head = [u8; ReplyData::SPLICE_HEADER_BYTES];

    fn head(&self, len: u32) -> Option<Self::Head> {
        self.reply.splice_header(usize::try_from(len).ok()?).ok()
    }

    fn done(self, got: Option<(Pipe, u32)>) {
        let Some((pipe, len)) = got else {
            return (self.blocking)(self.reply);
        };
        let total = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .saturating_add(ReplyData::SPLICE_HEADER_BYTES);
        match self.reply.splice(pipe.read_end(), total) {
            Ok(()) => self.inner.return_pipe(pipe),
            Err((reply, e)) => {
                tracing::debug!(error = %e, inode = self.ino, offset = self.offset, "spliced read reply refused; reading again");
                (self.blocking)(reply);
            }
        }
    }
}

/// The state shared by the event loops and the workers.
struct Inner {
    meta: Arc<dyn Metadata>,
    data: Arc<DataPath>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    ttl: Duration,
    blksize_bytes: u32,
    /// The node's span (volume, node, epoch); request spans are its children.
    span: tracing::Span,
    /// Event loops running a request themselves now (at most `INLINE_MAX`).
    inline: AtomicUsize,
    /// Empty pipes for spliced read replies.
    pipes: Mutex<Vec<Pipe>>,
}

impl Inner {
    /// An empty pipe for a spliced read of `size` bytes, if such a read fits one.
    fn pipe_for(&self, size: u32) -> Option<Pipe> {
        if size < SPLICE_READ_MIN_BYTES || size > self.data.lun().pipe_read_max_bytes() {
            return None;
        }
        let pipe = match self.pipes.lock().pop() {
            Some(p) => p,
            None => match Pipe::new(SPLICE_PIPE_BYTES) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for a spliced read");
                    return None;
                }
            },
        };
        // Socket data usually fills a slot with more than a page (see `capacity_bytes`), and
        // a read that finds the pipe full is read again on the blocking path. A pipe too
        // small for this read stays in the pool for smaller ones.
        if usize::try_from(size).is_ok_and(|s| s <= pipe.capacity_bytes()) {
            Some(pipe)
        } else {
            self.return_pipe(pipe);
            None
        }
    }

    /// Keeps an emptied pipe for the next spliced read.
    fn return_pipe(&self, pipe: Pipe) {
        let mut pipes = self.pipes.lock();
        if pipes.len() < SPLICE_PIPES_KEPT {
            pipes.push(pipe);
        }
    }
}

/// The FUSE file system of one node.
pub struct CsvFs {
    inner: Arc<Inner>,
    pool: tokio::runtime::Handle,
}

impl std::fmt::Debug for CsvFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsvFs").finish_non_exhaustive()
    }
}

fn systime(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    match u64::try_from(t.secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs) + nanos,
        Err(_) => UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos,
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() == 0 {
                Timestamp {
                    secs: -secs,
                    nanos: 0,
                }
            } else {
                Timestamp {
                    secs: -secs - 1,
                    nanos: 1_000_000_000 - d.subsec_nanos(),
                }
            }
        }
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::File | FileKind::Invalid => FileType::RegularFile,
    }
}

fn kind_of_mode(mode: u32) -> Option<FileKind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Some(FileKind::File),
        libc::S_IFDIR => Some(FileKind::Dir),
        libc::S_IFCHR => Some(FileKind::CharDev),
        libc::S_IFBLK => Some(FileKind::BlockDev),
        libc::S_IFIFO => Some(FileKind::Fifo),
        libc::S_IFSOCK => Some(FileKind::Socket),
        _ => None,
    }
}

/// Kernel attributes for `a`.
pub fn file_attr(a: &Attr, blksize_bytes: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size_bytes,
        blocks: a.allocated_bytes.div_ceil(512),
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: systime(a.crtime),
        kind: file_type(a.kind),
        perm: u16::try_from(a.perm & 0o7777).unwrap_or(0),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: blksize_bytes,
        flags: 0,
    }
}

fn errno(e: &NodeError) -> Errno {
    Errno::from_i32(errno_of(e))
}

/// Logs a failed operation at the level its errno deserves and returns the errno.
fn fail(op: &'static str, e: &NodeError) -> Errno {
    let code = errno(e);
    if code == Errno::EIO {
        tracing::error!(op, error = %e, "operation failed");
    } else {
        tracing::debug!(op, error = %e, "operation refused");
    }
    code
}

fn name_bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

impl Inner {
    fn call(&self, uid: u32, gid: u32, req: Request) -> Result<Response, NodeError> {
        Ok(self.meta.call(uid, gid, req)?)
    }

    fn attr_of(&self, what: &str, resp: Response) -> Result<Attr, NodeError> {
        match resp {
            Response::Attr(a) => Ok(self.data.overlay_attr(a)),
            Response::Mapped { attr, .. } => Ok(self.data.overlay_attr(attr)),
            other => Err(unexpected(what, &other).into()),
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, op: &'static str, r: Result<Attr, NodeError>) {
        match r {
            Ok(a) => reply.entry(
                &self.ttl,
                &file_attr(&a, self.blksize_bytes),
                Generation(a.generation),
            ),
            Err(e) => reply.error(fail(op, &e)),
        }
    }

    fn reply_empty(reply: ReplyEmpty, op: &'static str, r: Result<(), NodeError>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(op, &e)),
        }
    }

    fn handle(&self, fh: FileHandle) -> Result<(Arc<OpenFile>, bool), NodeError> {
        self.handles
            .lock()
            .get(&fh.0)
            .map(|h| (h.file.clone(), h.sync))
            .ok_or(NodeError::BadHandle { fh: fh.0 })
    }

    /// The file of a handle and the losses of its writes the handle has reported.
    fn handle_loss(&self, fh: FileHandle) -> Result<(Arc<OpenFile>, Arc<AtomicU64>), NodeError> {
        self.handles
            .lock()
            .get(&fh.0)
            .map(|h| (h.file.clone(), h.seen_loss.clone()))
            .ok_or(NodeError::BadHandle { fh: fh.0 })
    }

    fn add_handle(&self, file: Arc<OpenFile>, flags: i32) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let seen_loss = Arc::new(AtomicU64::new(file.losses()));
        self.handles.lock().insert(
            fh,
            Handle {
                file,
                sync,
                seen_loss,
            },
        );
        FileHandle(fh)
    }

    fn open_flags() -> FopenFlags {
        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
    }
}

impl CsvFs {
    /// A file system over `meta` and `data`, running its work on `pool`'s blocking
    /// threads. Attributes and entries are cached by the kernel for `ttl` (coordinator
    /// invalidations end them earlier). Request spans are children of `span`.
    pub fn new(
        meta: Arc<dyn Metadata>,
        data: Arc<DataPath>,
        pool: tokio::runtime::Handle,
        ttl: Duration,
        span: tracing::Span,
    ) -> CsvFs {
        let blksize_bytes = u32::try_from(data.cluster_bytes().min(1 << 20)).unwrap_or(1 << 20);
        CsvFs {
            inner: Arc::new(Inner {
                meta,
                data,
                handles: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                ttl,
                blksize_bytes,
                span,
                inline: AtomicUsize::new(0),
                pipes: Mutex::new(Vec::new()),
            }),
            pool,
        }
    }

    /// Runs `f` on this event loop, in a request span, unless `INLINE_MAX` event loops
    /// are running requests already: then on a worker, and the event loop returns at once.
    fn spawn<F>(&self, op: &'static str, ino: u64, f: F)
    where
        F: FnOnce(&Inner) + Send + 'static,
    {
        if let Some(_slot) = self.inner.may_wait() {
            run_in_span(&self.inner, op, ino, f);
        } else {
            spawn_on(&self.pool, self.inner.clone(), op, ino, f);
        }
    }
}

/// One of the `INLINE_MAX` event loops allowed to wait; given back on drop.
struct WaitSlot<'a>(&'a AtomicUsize);

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// A slot for this event loop to wait in (for the coordinator or the LUN), or `None`
    /// when `INLINE_MAX` event loops wait already.
    ///
    /// An event loop that gets a slot stops reading `/dev/fuse` (another starts in its
    /// place) until its handler returns.
    fn may_wait(&self) -> Option<WaitSlot<'_>> {
        let slot = WaitSlot(&self.inline);
        let granted = self.inline.fetch_add(1, Ordering::AcqRel) < INLINE_MAX;
        if granted {
            fuser::leave_readers();
        }
        granted.then_some(slot)
    }
}

/// A write for the blocking path: everything but its data.
struct BlockingWrite {
    uid: u32,
    gid: u32,
    ino: u64,
    file: Arc<OpenFile>,
    offset: u64,
    /// Bytes the kernel asked to write.
    len: u32,
    sync: bool,
    /// With `sync`: the handle's reported losses, for [`check_loss`] after the commit.
    seen_loss: Option<Arc<AtomicU64>>,
}

impl BlockingWrite {
    /// Writes `data` (or, with `commit_only`, commits the asynchronous write that already
    /// wrote it; `data` is then unused) and answers the kernel.
    fn run(self, i: &Inner, data: &[u8], commit_only: bool, reply: ReplyWrite) {
        let r = if commit_only {
            i.data
                .commit(self.uid, self.gid, &self.file)
                .map(|()| self.len)
        } else {
            i.data
                .write(self.uid, self.gid, &self.file, self.offset, data, self.sync)
                .and_then(|n| match &self.seen_loss {
                    Some(seen) => check_loss(&self.file, seen).map(|()| n),
                    None => Ok(n),
                })
        };
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fail("write", &e)),
        }
    }
}

impl CsvFs {
    /// Runs `w` on this event loop when one may wait (the data stays the kernel's buffer),
    /// else on a worker with a copy of the data.
    fn write_blocking(&self, w: BlockingWrite, data: &[u8], commit_only: bool, reply: ReplyWrite) {
        if let Some(_slot) = self.inner.may_wait() {
            run_in_span(&self.inner, "write", w.ino, |i| {
                w.run(i, data, commit_only, reply);
            });
        } else {
            let (ino, data) = (w.ino, data.to_vec());
            spawn_on(&self.pool, self.inner.clone(), "write", ino, move |i| {
                w.run(i, &data, commit_only, reply);
            });
        }
    }
}

/// Runs `f` on one of `pool`'s workers, in a request span.
fn spawn_on<F>(pool: &tokio::runtime::Handle, inner: Arc<Inner>, op: &'static str, ino: u64, f: F)
where
    F: FnOnce(&Inner) + Send + 'static,
{
    drop(pool.spawn_blocking(move || run_in_span(&inner, op, ino, f)));
}

/// Runs `f` in the request span of `op` on inode `ino`, a child of the node's span.
fn run_in_span<F>(inner: &Inner, op: &'static str, ino: u64, f: F)
where
    F: FnOnce(&Inner),
{
    let span = debug_span!(parent: &inner.span, "fuse", op, inode = ino);
    let _g = span.enter();
    f(inner);
}

impl Filesystem for CsvFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
            InitFlags::FUSE_HANDLE_KILLPRIV,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::debug!(?missing, "kernel lacks a FUSE capability");
            }
        }
        if let Err(max) = config.set_max_write(MAX_WRITE_BYTES) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        Ok(())
    }

    fn lookup(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (uid, gid, name) = (req.uid(), req.gid(), name_bytes(name));
        self.spawn("lookup", parent.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Lookup {
                        parent: InodeId(parent.0),
                        name,
                    },
                )
                .and_then(|resp| i.attr_of("lookup", resp));
            match r {
                // An error, not a negative entry with a lifetime: the kernel looks the name
                // up again next time. The coordinator counts on it and tells other nodes of
                // a missing name's creation only through the directory (PROTOCOL.md §6).
                Err(NodeError::Fs(FsError::NotFound)) => reply.error(Errno::ENOENT),
                r => i.reply_entry(reply, "lookup", r),
            }
        });
    }

    fn getattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("getattr", ino.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::GetAttr {
                        ino: InodeId(ino.0),
                    },
                )
                .and_then(|resp| i.attr_of("getattr", resp));
            match r {
                Ok(a) => reply.attr(&i.ttl, &file_attr(&a, i.blksize_bytes)),
                Err(e) => reply.error(fail("getattr", &e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (cuid, cgid) = (req.uid(), req.gid());
        let time = |t: TimeOrNow| match t {
            TimeOrNow::Now => TimeSet::Now,
            TimeOrNow::SpecificTime(t) => TimeSet::At(timestamp(t)),
        };
        let set = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size_bytes: size,
            atime: atime.map(time),
            mtime: mtime.map(time),
        };
        self.spawn("setattr", ino.0, move |i| {
            match i.data.set_attr(cuid, cgid, InodeId(ino.0), set) {
                Ok(a) => reply.attr(&i.ttl, &file_attr(&a, i.blksize_bytes)),
                Err(e) => reply.error(fail("setattr", &e)),
            }
        });
    }

    fn readlink(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyData) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("readlink", ino.0, move |i| {
            match i.call(
                uid,
                gid,
                Request::ReadLink {
                    ino: InodeId(ino.0),
                },
            ) {
                Ok(Response::Bytes(b)) => reply.data(&b),
                Ok(other) => reply.error(fail("readlink", &unexpected("readlink", &other).into())),
                Err(e) => reply.error(fail("readlink", &e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(kind) = kind_of_mode(mode) else {
            reply.error(Errno::EINVAL);
            return;
        };
        self.create_node(req, parent, name, kind, mode, rdev, reply, "mknod");
    }

    fn mkdir(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.create_node(req, parent, name, FileKind::Dir, mode, 0, reply, "mkdir");
    }

    fn unlink(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (uid, gid, name) = (req.uid(), req.gid(), name_bytes(name));
        self.spawn("unlink", parent.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Unlink {
                        parent: InodeId(parent.0),
                        name,
                    },
                )
                .map(|_| ());
            Inner::reply_empty(reply, "unlink", r);
        });
    }

    fn rmdir(&self, req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (uid, gid, name) = (req.uid(), req.gid(), name_bytes(name));
        self.spawn("rmdir", parent.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Rmdir {
                        parent: InodeId(parent.0),
                        name,
                    },
                )
                .map(|_| ());
            Inner::reply_empty(reply, "rmdir", r);
        });
    }

    fn symlink(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        let name = name_bytes(link_name);
        let target = target.as_os_str().as_bytes().to_vec();
        self.spawn("symlink", parent.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Symlink {
                        parent: InodeId(parent.0),
                        name,
                        target,
                    },
                )
                .and_then(|resp| i.attr_of("symlink", resp));
            i.reply_entry(reply, "symlink", r);
        });
    }

    fn rename(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let wire = WireRenameFlags {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        let (uid, gid) = (req.uid(), req.gid());
        let (name, new_name) = (name_bytes(name), name_bytes(newname));
        self.spawn("rename", parent.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Rename {
                        parent: InodeId(parent.0),
                        name,
                        new_parent: InodeId(newparent.0),
                        new_name,
                        flags: wire,
                    },
                )
                .map(|_| ());
            Inner::reply_empty(reply, "rename", r);
        });
    }

    fn link(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (uid, gid, new_name) = (req.uid(), req.gid(), name_bytes(newname));
        self.spawn("link", ino.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Link {
                        ino: InodeId(ino.0),
                        new_parent: InodeId(newparent.0),
                        new_name,
                    },
                )
                .and_then(|resp| i.attr_of("link", resp));
            i.reply_entry(reply, "link", r);
        });
    }

    fn open(&self, req: &fuser::Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (uid, gid) = (req.uid(), req.gid());
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        self.spawn("open", ino.0, move |i| {
            match i.data.open(uid, gid, InodeId(ino.0), write) {
                Ok((file, _attr)) => {
                    let fh = i.add_handle(file, flags.0);
                    reply.opened(fh, Inner::open_flags());
                }
                Err(e) => reply.error(fail("open", &e)),
            }
        });
    }

    fn read(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        let span = debug_span!(parent: &self.inner.span, "fuse", op = "read", inode = ino.0);
        let _g = span.enter();
        let file = match self.inner.handle(fh) {
            Ok((file, _)) => file,
            Err(e) => return reply.error(fail("read", &e)),
        };
        // Reads inside written clusters go straight to the LUN from this thread and are
        // answered by the LUN's completion thread; the rest take a worker. Large ones have
        // the LUN's reply spliced into the kernel's reply.
        let (pool, inner) = (self.pool.clone(), self.inner.clone());
        let f = file.clone();
        let blocking = move |reply: ReplyData| {
            spawn_on(&pool, inner, "read", ino.0, move |i| {
                match i.data.read(uid, gid, &f, offset, size) {
                    Ok(buf) => reply.data(&buf),
                    Err(e) => reply.error(fail("read", &e)),
                }
            });
        };
        if let Some(pipe) = self.inner.pipe_for(size) {
            let to = SplicedRead {
                reply,
                inner: self.inner.clone(),
                blocking: Box::new(blocking),
                ino: ino.0,
                offset,
            };
            self.inner.data.read_to_pipe(&file, offset, size, pipe, to);
            return;
        }
        let inner = self.inner.clone();
        let done = Box::new(move |got: Option<Vec<u8>>| match got {
            Some(buf) => {
                reply.data(&buf);
                inner.data.lun().recycle_buffer(buf);
            }
            None => blocking(reply),
        });
        self.inner.data.read_async(&file, offset, size, done);
    }

    fn write(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        let span = debug_span!(parent: &self.inner.span, "fuse", op = "write", inode = ino.0);
        let _g = span.enter();
        let (file, handle_sync) = match self.inner.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(fail("write", &e)),
        };
        let sync = handle_sync || flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let Ok(len) = u32::try_from(data.len()) else {
            return reply.error(Errno::EFBIG);
        };
        let w = BlockingWrite {
            uid,
            gid,
            ino: ino.0,
            file: file.clone(),
            offset,
            len,
            sync,
            seen_loss: if sync {
                self.inner.handle_loss(fh).ok().map(|(_, seen)| seen)
            } else {
                None
            },
        };
        if sync {
            return self.write_blocking(w, data, false, reply);
        }
        // Writes inside written clusters go straight to the LUN from this thread. A large
        // one is waited for here while an event loop may wait, and its data goes to the
        // LUN by reference, straight from the kernel's buffer (no copy in this process):
        // the buffer is not reused before the LUN has answered. Should the LUN fail it,
        // the blocking path still has that buffer; if the path was lost the event loop
        // then retires it: the pages may still sit in socket queues, to be read by a LUN
        // server cut off from this node. Otherwise the LUN's completion thread answers, and a copy is kept for
        // the blocking path.
        let slot = (data.len() >= WAIT_WRITE_MIN_BYTES)
            .then(|| self.inner.may_wait())
            .flatten();
        if let Some(slot) = slot {
            let (tx, rx) = mpsc::sync_channel(1);
            self.inner.data.write_async(
                &file,
                offset,
                data,
                true,
                Box::new(move |outcome| {
                    let _ = tx.send(outcome);
                }),
            );
            let outcome = rx.recv().unwrap_or(WriteOutcome::Redo { data_held: true });
            // Given back first: the blocking path takes a slot of its own.
            drop(slot);
            return match outcome {
                WriteOutcome::Written { commit_now: false } => reply.written(len),
                WriteOutcome::Written { commit_now: true } => {
                    self.write_blocking(w, &[], true, reply)
                }
                WriteOutcome::Redo { data_held } => {
                    if data_held {
                        tracing::info!(
                            inode = ino.0,
                            offset,
                            len,
                            "request buffer retired: the path to the LUN was lost while a \
                             write was sent from it by reference; the write is redone on the \
                             blocking path"
                        );
                        fuser::retire_request_buffer();
                    }
                    self.write_blocking(w, data, false, reply)
                }
            };
        }
        let (pool, inner, copy) = (self.pool.clone(), self.inner.clone(), data.to_vec());
        let done = Box::new(move |outcome: WriteOutcome| {
            let commit_only = match outcome {
                WriteOutcome::Written { commit_now: false } => return reply.written(len),
                WriteOutcome::Written { commit_now: true } => true,
                WriteOutcome::Redo { .. } => false,
            };
            spawn_on(&pool, inner, "write", w.ino, move |i| {
                w.run(i, if commit_only { &[] } else { &copy }, commit_only, reply);
            });
        });
        self.inner
            .data
            .write_async(&file, offset, data, false, done);
    }

    fn flush(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("flush", ino.0, move |i| {
            // A close reports a loss of the file's writes as close(2) reports a
            // write-back error.
            let r = i.handle_loss(fh).and_then(|(f, seen)| {
                i.data.commit(uid, gid, &f)?;
                check_loss(&f, &seen)
            });
            Inner::reply_empty(reply, "flush", r);
        });
    }

    fn release(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("release", ino.0, move |i| {
            let handle = i.handles.lock().remove(&fh.0);
            let r = match handle {
                Some(h) => i.data.release(uid, gid, &h.file),
                None => Err(NodeError::BadHandle { fh: fh.0 }),
            };
            Inner::reply_empty(reply, "release", r);
        });
    }

    fn fsync(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("fsync", ino.0, move |i| {
            let r = i.handle_loss(fh).and_then(|(f, seen)| {
                i.data.fsync(uid, gid, &f)?;
                check_loss(&f, &seen)
            });
            Inner::reply_empty(reply, "fsync", r);
        });
    }

    fn opendir(&self, _req: &fuser::Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("readdir", ino.0, move |i| {
            let mut after = offset;
            loop {
                let r = i.call(
                    uid,
                    gid,
                    Request::ReadDir {
                        ino: InodeId(ino.0),
                        after_cookie: after,
                        max_entries: READDIR_BATCH,
                        plus: false,
                    },
                );
                let entries = match r {
                    Ok(Response::Entries(e)) => e,
                    Ok(other) => {
                        reply.error(fail("readdir", &unexpected("readdir", &other).into()));
                        return;
                    }
                    Err(e) => {
                        reply.error(fail("readdir", &e));
                        return;
                    }
                };
                if entries.is_empty() {
                    break;
                }
                for (e, _) in entries {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino.0), e.cookie, file_type(e.kind), name) {
                        reply.ok();
                        return;
                    }
                    after = e.cookie;
                }
            }
            reply.ok();
        });
    }

    fn fsyncdir(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("fsyncdir", ino.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Fsync {
                        ino: InodeId(ino.0),
                    },
                )
                .map(|_| ());
            Inner::reply_empty(reply, "fsyncdir", r);
        });
    }

    fn statfs(&self, req: &fuser::Request, ino: INodeNo, reply: ReplyStatfs) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("statfs", ino.0, move |i| {
            match i.call(uid, gid, Request::StatFs) {
                Ok(Response::StatFs(s)) => reply.statfs(
                    s.total_clusters,
                    s.free_clusters,
                    s.free_clusters,
                    s.total_inodes,
                    s.free_inodes,
                    s.cluster_size_bytes,
                    s.max_name_bytes,
                    s.cluster_size_bytes,
                ),
                Ok(other) => reply.error(fail("statfs", &unexpected("statfs", &other).into())),
                Err(e) => reply.error(fail("statfs", &e)),
            }
        });
    }

    fn setxattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        let (uid, gid, name, value) = (req.uid(), req.gid(), name_bytes(name), value.to_vec());
        self.spawn("setxattr", ino.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::SetXattr {
                        ino: InodeId(ino.0),
                        name,
                        value,
                        mode,
                    },
                )
                .map(|_| ());
            Inner::reply_empty(reply, "setxattr", r);
        });
    }

    fn getxattr(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let (uid, gid, name) = (req.uid(), req.gid(), name_bytes(name));
        self.spawn("getxattr", ino.0, move |i| {
            let r = i.call(
                uid,
                gid,
                Request::GetXattr {
                    ino: InodeId(ino.0),
                    name,
                },
            );
            match r {
                Ok(Response::Bytes(b)) => reply_xattr(reply, size, &b),
                Ok(other) => reply.error(fail("getxattr", &unexpected("getxattr", &other).into())),
                Err(e) => reply.error(fail("getxattr", &e)),
            }
        });
    }

    fn listxattr(&self, req: &fuser::Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("listxattr", ino.0, move |i| {
            match i.call(
                uid,
                gid,
                Request::ListXattr {
                    ino: InodeId(ino.0),
                },
            ) {
                Ok(Response::Names(names)) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(&n);
                        buf.push(0);
                    }
                    reply_xattr(reply, size, &buf);
                }
                Ok(other) => {
                    reply.error(fail("listxattr", &unexpected("listxattr", &other).into()))
                }
                Err(e) => reply.error(fail("listxattr", &e)),
            }
        });
    }

    fn removexattr(&self, req: &fuser::Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (uid, gid, name) = (req.uid(), req.gid(), name_bytes(name));
        self.spawn("removexattr", ino.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::RemoveXattr {
                        ino: InodeId(ino.0),
                        name,
                    },
                )
                .map(|_| ());
            Inner::reply_empty(reply, "removexattr", r);
        });
    }

    fn access(&self, _req: &fuser::Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (uid, gid, name) = (req.uid(), req.gid(), name_bytes(name));
        let exclusive = flags & libc::O_EXCL != 0;
        let truncate = flags & libc::O_TRUNC != 0;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        self.spawn("create", parent.0, move |i| {
            let r = (|| {
                // One request and one journal transaction creates the file (or finds it,
                // without O_EXCL) and opens it.
                let (resp, stamp) = i.meta.call_stamped(
                    uid,
                    gid,
                    Request::CreateOpen {
                        parent: InodeId(parent.0),
                        name,
                        perm: mode & 0o7777,
                        exclusive,
                        write,
                    },
                );
                let resp = resp?;
                let Response::Mapped { attr, extents } = resp else {
                    return Err(unexpected("create", &resp).into());
                };
                if attr.kind != FileKind::File {
                    return Err(NodeError::Fs(FsError::IsDir));
                }
                let (file, mut attr) = i.data.created(attr.ino, attr, extents, stamp);
                let fh = i.add_handle(file, flags);
                if truncate && attr.size_bytes > 0 {
                    let set = SetAttr {
                        size_bytes: Some(0),
                        ..SetAttr::default()
                    };
                    match i.data.set_attr(uid, gid, attr.ino, set) {
                        Ok(a) => attr = a,
                        Err(e) => {
                            // Not opened after all: give the open back.
                            if let Some(h) = i.handles.lock().remove(&fh.0) {
                                if let Err(re) = i.data.release(uid, gid, &h.file) {
                                    warn!(error = %re, "release after a failed truncate failed");
                                }
                            }
                            return Err(e);
                        }
                    }
                }
                Ok((fh, attr))
            })();
            match r {
                Ok((fh, a)) => reply.created(
                    &i.ttl,
                    &file_attr(&a, i.blksize_bytes),
                    Generation(a.generation),
                    fh,
                    Inner::open_flags(),
                ),
                Err(e) => reply.error(fail("create", &e)),
            }
        });
    }

    fn fallocate(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
        let fmode = match rest {
            0 if keep => FallocMode::KeepSize,
            0 => FallocMode::Allocate,
            libc::FALLOC_FL_PUNCH_HOLE if keep => FallocMode::PunchHole,
            libc::FALLOC_FL_ZERO_RANGE => FallocMode::ZeroRange,
            _ => {
                reply.error(Errno::from_i32(errno_of(&NodeError::Unsupported {
                    what: "this fallocate mode",
                })));
                return;
            }
        };
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("fallocate", ino.0, move |i| {
            let r = i
                .data
                .fallocate(uid, gid, InodeId(ino.0), offset, length, fmode)
                .map(|_| ());
            Inner::reply_empty(reply, "fallocate", r);
        });
    }

    fn lseek(
        &self,
        req: &fuser::Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let target = match whence {
            libc::SEEK_DATA => SeekTarget::Data,
            libc::SEEK_HOLE => SeekTarget::Hole,
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        let Ok(offset) = u64::try_from(offset) else {
            reply.error(Errno::ENXIO);
            return;
        };
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("lseek", ino.0, move |i| {
            let r = i
                .handle(fh)
                .and_then(|(f, _)| i.data.seek(uid, gid, &f, offset, target));
            match r.map(i64::try_from) {
                Ok(Ok(pos)) => reply.offset(pos),
                Ok(Err(_)) => reply.error(Errno::EOVERFLOW),
                Err(e) => reply.error(fail("lseek", &e)),
            }
        });
    }
}

impl CsvFs {
    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &self,
        req: &fuser::Request,
        parent: INodeNo,
        name: &OsStr,
        kind: FileKind,
        mode: u32,
        rdev: u32,
        reply: ReplyEntry,
        op: &'static str,
    ) {
        let (uid, gid, name) = (req.uid(), req.gid(), name_bytes(name));
        self.spawn(op, parent.0, move |i| {
            let r = i
                .call(
                    uid,
                    gid,
                    Request::Create {
                        parent: InodeId(parent.0),
                        name,
                        kind,
                        perm: mode & 0o7777,
                        rdev,
                        exclusive: true,
                    },
                )
                .and_then(|resp| i.attr_of(op, resp));
            i.reply_entry(reply, op, r);
        });
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    let Ok(len) = u32::try_from(value.len()) else {
        reply.error(Errno::E2BIG);
        return;
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// One kernel cache invalidation.
#[derive(Debug)]
enum KernelInval {
    Inode(InodeId),
    Entry(InodeId, Vec<u8>),
}

/// Applies one kernel invalidation (the FUSE notifier in a mount; a stand-in in tests).
type Apply = Box<dyn Fn(&KernelInval) -> std::io::Result<()> + Send + Sync>;

/// A kernel invalidation for a worker and, when the caller waits, where to say it is done.
type Queued = (KernelInval, Option<mpsc::SyncSender<()>>);

/// Turns coordinator invalidations into data-path and kernel cache invalidations.
///
/// The kernel applies an entry invalidation under the directory's lock. While this node
/// changes a name in that directory (create, unlink, rename...), the kernel holds the lock
/// for the whole request, and the request may be waiting for the coordinator, which may be
/// waiting for this very invalidation: applying it inline would deadlock, and waiting for
/// it would stall both changes. So:
/// - kernel invalidations go to worker threads, entries and inodes to separate ones (an
///   inode invalidation takes no directory lock and never queues behind an entry one);
/// - an entry invalidation in a directory this node is changing right now (`changing`) is
///   acknowledged at once and applied by the kernel when the change releases the lock; so
///   is one that finds an earlier entry invalidation still waiting for its directory's lock
///   (the requests of this node queued for that lock go first, and each of them may wait
///   for the coordinator in turn);
/// - otherwise the caller waits for it, at most `INVALIDATION_WAIT` (100 ms): the lock may
///   be held by a request that needs no other node (a lookup, a readdir).
#[derive(Debug)]
pub struct Invalidator {
    notifier: Arc<OnceLock<Notifier>>,
    data: OnceLock<Arc<DataPath>>,
    inodes: Mutex<mpsc::Sender<Queued>>,
    entries: Mutex<mpsc::Sender<Queued>>,
    /// Entry invalidations handed to their worker and not applied yet.
    entry_backlog: Arc<AtomicUsize>,
    /// Directories this node is changing a name in, with the number of such requests.
    changing: Mutex<HashMap<InodeId, usize>>,
}

/// Starts a worker thread that applies what it is sent, in order, and counts down
/// `backlog` for each.
fn invalidation_worker(
    name: &str,
    apply: Arc<Apply>,
    backlog: Arc<AtomicUsize>,
) -> std::io::Result<mpsc::Sender<Queued>> {
    let (tx, rx) = mpsc::channel::<Queued>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for (inv, done) in rx {
                // ENOENT: the kernel had nothing cached; not a problem.
                if let Err(e) = apply(&inv) {
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        tracing::debug!(?inv, error = %e, "kernel invalidation failed");
                    }
                }
                backlog.fetch_sub(1, Ordering::AcqRel);
                if let Some(done) = done {
                    let _ = done.try_send(());
                }
            }
        })?;
    Ok(tx)
}

/// The directories whose lock the kernel holds while it waits for the answer to `req`.
fn locked_dirs(req: &Request) -> Vec<InodeId> {
    match req {
        Request::Create { parent, .. }
        | Request::CreateOpen { parent, .. }
        | Request::Symlink { parent, .. }
        | Request::Unlink { parent, .. }
        | Request::Rmdir { parent, .. } => vec![*parent],
        Request::Link { new_parent, .. } => vec![*new_parent],
        Request::Rename {
            parent, new_parent, ..
        } => {
            if parent == new_parent {
                vec![*parent]
            } else {
                vec![*parent, *new_parent]
            }
        }
        _ => Vec::new(),
    }
}

/// Marks directories as being changed by this node until dropped.
#[must_use = "the directories count as changing only while this lives"]
#[derive(Debug)]
pub struct Changing<'a> {
    inv: &'a Invalidator,
    dirs: Vec<InodeId>,
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        let mut changing = self.inv.changing.lock();
        for d in &self.dirs {
            if let Some(n) = changing.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    changing.remove(d);
                }
            }
        }
    }
}

impl Invalidator {
    /// A new invalidator with its worker threads. Kernel invalidations start once
    /// [`Invalidator::set_notifier`] is called; until then the kernel has nothing cached.
    pub fn new() -> std::io::Result<Arc<Invalidator>> {
        let notifier: Arc<OnceLock<Notifier>> = Arc::new(OnceLock::new());
        let n = notifier.clone();
        let apply: Apply = Box::new(move |inv| {
            let Some(n) = n.get() else {
                return Ok(());
            };
            match inv {
                KernelInval::Inode(ino) => n.inval_inode(INodeNo(ino.0), 0, 0),
                KernelInval::Entry(parent, name) => {
                    n.inval_entry(INodeNo(parent.0), OsStr::from_bytes(name))
                }
            }
        });
        Self::with_apply(notifier, apply)
    }

    fn with_apply(notifier: Arc<OnceLock<Notifier>>, apply: Apply) -> std::io::Result<Arc<Self>> {
        let apply = Arc::new(apply);
        let entry_backlog = Arc::new(AtomicUsize::new(0));
        Ok(Arc::new(Invalidator {
            notifier,
            data: OnceLock::new(),
            inodes: Mutex::new(invalidation_worker(
                "invalidate",
                apply.clone(),
                Arc::new(AtomicUsize::new(0)),
            )?),
            entries: Mutex::new(invalidation_worker(
                "invalidate-name",
                apply,
                entry_backlog.clone(),
            )?),
            entry_backlog,
            changing: Mutex::new(HashMap::new()),
        }))
    }

    /// Marks the directories whose lock the kernel holds for `req` (a change of a name) as
    /// being changed by this node, until the returned guard is dropped.
    pub fn changing(&self, req: &Request) -> Changing<'_> {
        let dirs = locked_dirs(req);
        if !dirs.is_empty() {
            let mut changing = self.changing.lock();
            for d in &dirs {
                *changing.entry(*d).or_insert(0) += 1;
            }
        }
        Changing { inv: self, dirs }
    }

    /// Starts sending kernel invalidations through `notifier`.
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// The data path whose layouts this invalidates, once set.
    pub fn data(&self) -> Option<Arc<DataPath>> {
        self.data.get().cloned()
    }

    /// Starts invalidating the layouts of `data`'s open files.
    pub fn set_data(&self, data: Arc<DataPath>) {
        let _ = self.data.set(data);
    }

    /// Hands `inv` to its worker; waits until it is applied (at most
    /// `INVALIDATION_WAIT`) when `wait`.
    fn send(&self, inv: KernelInval, wait: bool) {
        let (worker, kind, ino) = match &inv {
            KernelInval::Inode(ino) => (&self.inodes, "inode", *ino),
            KernelInval::Entry(parent, _) => {
                self.entry_backlog.fetch_add(1, Ordering::AcqRel);
                (&self.entries, "entry in directory", *parent)
            }
        };
        let (done_tx, done_rx) = if wait {
            let (tx, rx) = mpsc::sync_channel(1);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        if worker.lock().send((inv, done_tx)).is_err() {
            warn!("invalidation thread is gone");
            return;
        }
        if let Some(rx) = done_rx {
            if rx.recv_timeout(INVALIDATION_WAIT).is_err() {
                tracing::debug!(
                    kind,
                    %ino,
                    wait_ms = INVALIDATION_WAIT.as_millis(),
                    "the kernel has not applied an invalidation yet; acknowledging it anyway"
                );
            }
        }
    }

    /// The inode's attributes, layout or contents changed elsewhere.
    pub fn inode(&self, ino: InodeId) {
        if let Some(d) = self.data.get() {
            d.invalidate(ino);
        }
        self.send(KernelInval::Inode(ino), true);
    }

    /// The coordinator cannot name what went stale: drop every open file's layout and
    /// attributes (names expire with their TTL).
    pub fn all(&self) {
        if let Some(d) = self.data.get() {
            for f in d.open_files() {
                d.invalidate(f.ino());
                self.send(KernelInval::Inode(f.ino()), true);
            }
        }
        self.send(KernelInval::Inode(InodeId::ROOT), true);
    }

    /// The name `name` in directory `parent` changed elsewhere.
    /// Not waited for while this node changes a name in `parent`, or while an earlier one
    /// waits for the kernel (see the type's docs).
    pub fn entry(&self, parent: InodeId, name: &[u8]) {
        let wait = self.entry_backlog.load(Ordering::Acquire) == 0
            && !self.changing.lock().contains_key(&parent);
        self.send(KernelInval::Entry(parent, name.to_vec()), wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123,
            },
            Timestamp {
                secs: -5,
                nanos: 500,
            },
        ] {
            assert_eq!(timestamp(systime(t)), t);
        }
    }

    #[test]
    fn mode_kinds() {
        assert_eq!(kind_of_mode(libc::S_IFIFO | 0o644), Some(FileKind::Fifo));
        assert_eq!(kind_of_mode(0o644), Some(FileKind::File));
        assert_eq!(kind_of_mode(libc::S_IFLNK), None);
    }

    /// What a stand-in kernel applied, and a gate that holds entry invalidations back the
    /// way the kernel does while the directory's lock is taken.
    #[derive(Default)]
    struct FakeKernel {
        applied: Mutex<Vec<String>>,
        locked: Mutex<bool>,
        unlocked: parking_lot::Condvar,
    }

    fn fake_invalidator() -> (Arc<Invalidator>, Arc<FakeKernel>) {
        let k = Arc::new(FakeKernel::default());
        let k2 = k.clone();
        let apply: Apply = Box::new(move |inv| {
            let what = match inv {
                KernelInval::Inode(ino) => format!("inode {}", ino.0),
                KernelInval::Entry(parent, name) => {
                    let mut locked = k2.locked.lock();
                    while *locked {
                        k2.unlocked.wait(&mut locked);
                    }
                    format!("entry {} {}", parent.0, String::from_utf8_lossy(name))
                }
            };
            k2.applied.lock().push(what);
            Ok(())
        });
        let inv = Invalidator::with_apply(Arc::new(OnceLock::new()), apply).unwrap();
        (inv, k)
    }

    /// Waits until the fake kernel applied `n` invalidations.
    fn applied(k: &FakeKernel, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while k.applied.lock().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                k.applied.lock()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        k.applied.lock().clone()
    }

    fn set_lock(k: &FakeKernel, locked: bool) {
        *k.locked.lock() = locked;
        k.unlocked.notify_all();
    }

    #[test]
    fn entry_invalidations_that_would_wait_for_this_node_are_not_waited_for() {
        let (inv, k) = fake_invalidator();
        // This node unlinks in directory 7; the kernel holds 7's lock meanwhile.
        set_lock(&k, true);
        let unlink = inv.changing(&Request::Unlink {
            parent: InodeId(7),
            name: b"a".to_vec(),
        });
        let t = std::time::Instant::now();
        inv.entry(InodeId(7), b"x");
        assert!(
            t.elapsed() < INVALIDATION_WAIT,
            "waited for a directory lock this node holds"
        );
        // An inode invalidation does not queue behind the entry the kernel holds back.
        inv.inode(InodeId(9));
        assert_eq!(applied(&k, 1), vec!["inode 9".to_string()]);
        drop(unlink);
        assert!(inv.changing.lock().is_empty());
        // Directory 8 is not being changed here, but the entry before it still waits for a
        // lock: this one is not waited for either.
        let t = std::time::Instant::now();
        inv.entry(InodeId(8), b"y");
        assert!(t.elapsed() < INVALIDATION_WAIT, "waited behind a held lock");
        // The lock is released: both entries reach the kernel, in order.
        set_lock(&k, false);
        assert_eq!(
            applied(&k, 3),
            vec![
                "inode 9".to_string(),
                "entry 7 x".to_string(),
                "entry 8 y".to_string()
            ]
        );
        // Nothing pending and no change here: the caller waits for the kernel, which here
        // holds the lock for longer than the bound.
        set_lock(&k, true);
        let t = std::time::Instant::now();
        inv.entry(InodeId(8), b"z");
        assert!(t.elapsed() >= INVALIDATION_WAIT);
        set_lock(&k, false);
        assert_eq!(applied(&k, 4).last().map(String::as_str), Some("entry 8 z"));
        // Applied at once when the kernel can: the caller waits just that long.
        let t = std::time::Instant::now();
        inv.entry(InodeId(8), b"w");
        assert!(t.elapsed() < INVALIDATION_WAIT);
        assert_eq!(applied(&k, 5).last().map(String::as_str), Some("entry 8 w"));
    }

    #[test]
    fn the_kernel_holds_the_directories_a_name_change_names() {
        let (inv, _k) = fake_invalidator();
        let rename = |parent: u64, new_parent: u64| Request::Rename {
            parent: InodeId(parent),
            name: b"a".to_vec(),
            new_parent: InodeId(new_parent),
            new_name: b"b".to_vec(),
            flags: WireRenameFlags::default(),
        };
        assert_eq!(locked_dirs(&rename(3, 4)), vec![InodeId(3), InodeId(4)]);
        assert_eq!(locked_dirs(&rename(3, 3)), vec![InodeId(3)]);
        let link = Request::Link {
            ino: InodeId(5),
            new_parent: InodeId(6),
            new_name: b"l".to_vec(),
        };
        assert_eq!(locked_dirs(&link), vec![InodeId(6)]);
        let lookup = Request::Lookup {
            parent: InodeId(3),
            name: b"a".to_vec(),
        };
        assert!(locked_dirs(&lookup).is_empty());
        // Two changes in one directory: it stays marked until both are done.
        let one = inv.changing(&rename(3, 3));
        let two = inv.changing(&rename(3, 4));
        drop(one);
        assert!(inv.changing.lock().contains_key(&InodeId(3)));
        drop(two);
        assert!(inv.changing.lock().is_empty());
    }
}
