//! Metadata requests and responses. Every request is executed by the coordinator's store on
//! behalf of a [`Caller`]; `(caller.node, caller.request)` makes a retried request run once.

use crate::types::{
    Attr, DirEntry, Epoch, Extent, FallocMode, FileKind, InodeId, NodeId, RenameFlags, RequestId,
    SetAttr, StatFs, XattrMode,
};
use serde::{Deserialize, Serialize};

/// Who sends a request: the node, its request id, and the credentials of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The node that sent the request.
    pub node: NodeId,
    /// Unique per node for the life of the volume; reused only by a retry of the same request.
    pub request: RequestId,
    /// Effective uid of the calling process (owner of created inodes).
    pub uid: u32,
    /// Effective gid of the calling process.
    pub gid: u32,
}

/// A byte range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// Start, in bytes.
    pub offset_bytes: u64,
    /// Length, in bytes.
    pub len_bytes: u64,
}

/// A metadata request. Names are raw bytes (1..=255, no '/' and no NUL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Find `name` in directory `parent`. Answer: `Attr`.
    Lookup {
        /// Directory.
        parent: InodeId,
        /// Name.
        name: Vec<u8>,
    },
    /// Attributes of an inode. Answer: `Attr`.
    GetAttr {
        /// Inode.
        ino: InodeId,
    },
    /// Change attributes; a size change truncates or extends. Answer: `Attr`.
    SetAttr {
        /// Inode.
        ino: InodeId,
        /// What to change.
        set: SetAttr,
    },
    /// Create a file, directory, device, fifo or socket (create, mkdir, mknod).
    /// Answer: `Attr`. With `exclusive` false and a regular file already present, the
    /// existing file is returned (O_CREAT without O_EXCL).
    Create {
        /// Directory.
        parent: InodeId,
        /// Name.
        name: Vec<u8>,
        /// Kind of the new inode (not `Symlink`).
        kind: FileKind,
        /// Permission bits, umask already applied.
        perm: u32,
        /// Device number for devices.
        rdev: u32,
        /// Fail with `Exists` when the name exists.
        exclusive: bool,
    },
    /// Create a symbolic link. Answer: `Attr`.
    Symlink {
        /// Directory.
        parent: InodeId,
        /// Name.
        name: Vec<u8>,
        /// Target bytes (at most 4095).
        target: Vec<u8>,
    },
    /// Target of a symbolic link. Answer: `Bytes`.
    ReadLink {
        /// Inode.
        ino: InodeId,
    },
    /// Add a hard link. Answer: `Attr` of the inode.
    Link {
        /// Existing inode (not a directory).
        ino: InodeId,
        /// Directory of the new name.
        new_parent: InodeId,
        /// New name.
        new_name: Vec<u8>,
    },
    /// Remove a non-directory name. Answer: `Done`.
    Unlink {
        /// Directory.
        parent: InodeId,
        /// Name.
        name: Vec<u8>,
    },
    /// Remove an empty directory. Answer: `Done`.
    Rmdir {
        /// Directory.
        parent: InodeId,
        /// Name.
        name: Vec<u8>,
    },
    /// Rename, with renameat2 flags. Answer: `Done`.
    Rename {
        /// Source directory.
        parent: InodeId,
        /// Source name.
        name: Vec<u8>,
        /// Target directory.
        new_parent: InodeId,
        /// Target name.
        new_name: Vec<u8>,
        /// NOREPLACE / EXCHANGE.
        flags: RenameFlags,
    },
    /// List a directory after `after_cookie` (0 = from the start, including "." and "..").
    /// Answer: `Entries`, with attributes when `plus`.
    ReadDir {
        /// Directory.
        ino: InodeId,
        /// Continue after this cookie.
        after_cookie: u64,
        /// At most this many entries.
        max_entries: u32,
        /// Also return each entry's attributes (readdirplus).
        plus: bool,
    },
    /// Volume usage. Answer: `StatFs`.
    StatFs,
    /// Read an extended attribute. Answer: `Bytes`.
    GetXattr {
        /// Inode.
        ino: InodeId,
        /// Attribute name.
        name: Vec<u8>,
    },
    /// Set an extended attribute. Answer: `Done`.
    SetXattr {
        /// Inode.
        ino: InodeId,
        /// Attribute name.
        name: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Create / replace rules.
        mode: XattrMode,
    },
    /// Names of the extended attributes. Answer: `Names`.
    ListXattr {
        /// Inode.
        ino: InodeId,
    },
    /// Remove an extended attribute. Answer: `Done`.
    RemoveXattr {
        /// Inode.
        ino: InodeId,
        /// Attribute name.
        name: Vec<u8>,
    },
    /// The caller's node opens the inode. Answer: `Mapped` with the whole extent map.
    Open {
        /// Inode.
        ino: InodeId,
        /// Opened for writing.
        write: bool,
    },
    /// The caller's node closes one open of the inode; the last close cluster-wide of an
    /// unlinked inode frees it. Answer: `Done`.
    Release {
        /// Inode.
        ino: InodeId,
    },
    /// Extents overlapping a range (holes are absent). Answer: `Mapped`.
    GetExtents {
        /// Inode.
        ino: InodeId,
        /// Range start.
        offset_bytes: u64,
        /// Range length.
        len_bytes: u64,
    },
    /// Make sure clusters back the range; new ones are unwritten. `hint_bytes` asks for a
    /// larger preallocation for a sequential writer. Claims the range's unwritten clusters
    /// for the caller (PROTOCOL.md §5.1). Answer: `Mapped` for the range, without the
    /// unwritten clusters another node holds the claim of.
    Allocate {
        /// Inode.
        ino: InodeId,
        /// Range start.
        offset_bytes: u64,
        /// Range length.
        len_bytes: u64,
        /// Preallocate up to this many bytes past the range for a sequential writer.
        hint_bytes: u64,
    },
    /// The node's data for these ranges is durable on the LUN: clear their unwritten marks,
    /// raise the size to at least `size_bytes`, set mtime/ctime, and release the caller's
    /// claims on the inode (PROTOCOL.md §5.1). Answer: `Attr`.
    Commit {
        /// Inode.
        ino: InodeId,
        /// Ranges now durably written.
        written: Vec<ByteRange>,
        /// New minimum size.
        size_bytes: u64,
    },
    /// Allocate, punch or zero a range. Answer: `Attr`.
    Fallocate {
        /// Inode.
        ino: InodeId,
        /// Range start.
        offset_bytes: u64,
        /// Range length.
        len_bytes: u64,
        /// What to do.
        mode: FallocMode,
    },
    /// Everything acknowledged about the inode is durable in the journal. Answer: `Done`.
    Fsync {
        /// Inode.
        ino: InodeId,
    },
    /// `Create` of a regular file followed by `Open` of it by the caller's node, in one
    /// journal transaction (open(2) with O_CREAT). With `exclusive` false and a regular file
    /// already present, that file is opened. Answer: `Mapped` with the whole extent map.
    /// Since protocol version 3.
    CreateOpen {
        /// Directory.
        parent: InodeId,
        /// Name.
        name: Vec<u8>,
        /// Permission bits, umask already applied.
        perm: u32,
        /// Fail with `Exists` when the name exists.
        exclusive: bool,
        /// Opened for writing.
        write: bool,
    },
    /// After a coordinator takeover (epoch change): the open handles the caller's node
    /// holds, per inode, so the new coordinator counts them again (from protocol version 4
    /// open counts live in the coordinator's memory, not on disk). Ignored unless `epoch` is
    /// the coordinator's own: a resend of an older re-announcement would count stale
    /// figures. Answer: `Done`. Since protocol version 4.
    Reopen {
        /// The coordinator epoch the figures are for.
        epoch: Epoch,
        /// Inode and number of handles open on the node.
        opens: Vec<(InodeId, u32)>,
    },
}

impl Request {
    /// True for requests that change nothing (`Fsync` only waits for the journal).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Lookup { .. }
                | Request::GetAttr { .. }
                | Request::ReadLink { .. }
                | Request::ReadDir { .. }
                | Request::StatFs
                | Request::GetXattr { .. }
                | Request::ListXattr { .. }
                | Request::GetExtents { .. }
                | Request::Fsync { .. }
        )
    }

    /// The first protocol version that carries this request; a node must not send it on a
    /// session of an older version.
    pub fn since_version(&self) -> u32 {
        match self {
            Request::CreateOpen { .. } => 3,
            Request::Reopen { .. } => 4,
            _ => 1,
        }
    }
}

/// The answer to a [`Request`] that succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Success with nothing to return.
    Done,
    /// Attributes of the inode concerned.
    Attr(Attr),
    /// Directory entries, each with attributes when asked for.
    Entries(Vec<(DirEntry, Option<Attr>)>),
    /// Raw bytes: a symlink target or an attribute value.
    Bytes(Vec<u8>),
    /// Attribute names.
    Names(Vec<Vec<u8>>),
    /// Volume usage.
    StatFs(StatFs),
    /// Attributes and extents of a file.
    Mapped {
        /// Attributes.
        attr: Attr,
        /// Extents, sorted by file offset, not overlapping.
        extents: Vec<Extent>,
    },
    /// The answer to a namespace change, with the new attributes of the directories it
    /// changed (and, for a rename, of the directory it moved), so the node can keep a cached
    /// copy of them current. Sent only on sessions of version 4 or later; an older session
    /// receives `answer` alone. Since protocol version 4.
    WithAttrs {
        /// The answer itself.
        answer: Box<Response>,
        /// Current attributes of the other inodes the change touched.
        attrs: Vec<Attr>,
    },
}

impl Response {
    /// The answer without the attributes a [`Response::WithAttrs`] carries along.
    pub fn into_answer(self) -> Response {
        match self {
            Response::WithAttrs { answer, .. } => answer.into_answer(),
            other => other,
        }
    }

    /// The answer itself, by reference (see [`Response::into_answer`]).
    pub fn answer(&self) -> &Response {
        match self {
            Response::WithAttrs { answer, .. } => answer.answer(),
            other => other,
        }
    }
}
