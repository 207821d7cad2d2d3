//! Identifiers and value types shared by the format, the protocol, the store and the
//! node daemon. Every identifier and on-disk address is a newtype with `Display`.

use serde::{Deserialize, Serialize};
use std::fmt;

pub use journal::{Epoch, Lsn};

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
        )]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// An inode number. 0 is invalid; [`InodeId::ROOT`] is the root directory.
    InodeId(u64),
    "ino "
);
id_newtype!(
    /// A cluster node, 1..=max_nodes. 0 is invalid.
    NodeId(u32),
    "node "
);
id_newtype!(
    /// A 4 KiB metadata block number on the LUN (byte address = n * 4096).
    BlockNo(u64),
    "block "
);
id_newtype!(
    /// A data cluster number (byte address = data region start + n * cluster size).
    ClusterNo(u64),
    "cluster "
);
id_newtype!(
    /// Per-node request id; (node, request) identifies a request across retries.
    RequestId(u64),
    "req "
);

impl InodeId {
    /// The root directory.
    pub const ROOT: InodeId = InodeId(1);
}

/// A volume's UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct VolumeId(pub [u8; 16]);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The kind of an inode. Value 0 is invalid on disk and on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum FileKind {
    /// Never valid; decoders reject it.
    Invalid = 0,
    /// Regular file.
    File = 1,
    /// Directory.
    Dir = 2,
    /// Symbolic link.
    Symlink = 3,
    /// Character device.
    CharDev = 4,
    /// Block device.
    BlockDev = 5,
    /// Named pipe.
    Fifo = 6,
    /// Unix socket.
    Socket = 7,
}

/// A point in time, nanosecond resolution, seconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp {
    /// Seconds since 1970-01-01 UTC.
    pub secs: i64,
    /// Nanoseconds, 0..1_000_000_000.
    pub nanos: u32,
}

/// Attributes of an inode as the node sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// Inode number.
    pub ino: InodeId,
    /// Generation, bumped when an inode number is reused.
    pub generation: u64,
    /// Kind.
    pub kind: FileKind,
    /// Permission bits (07777); the kind is in `kind`.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Bytes of data clusters allocated to the file.
    pub allocated_bytes: u64,
    /// Device number for char/block devices.
    pub rdev: u32,
    /// Last access.
    pub atime: Timestamp,
    /// Last data change.
    pub mtime: Timestamp,
    /// Last status change.
    pub ctime: Timestamp,
    /// Creation.
    pub crtime: Timestamp,
}

/// How to set a time in `setattr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    /// The coordinator's clock at the time of the change.
    Now,
    /// An explicit time.
    At(Timestamp),
}

/// Fields to change in `setattr`; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    /// New permission bits.
    pub perm: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend); clusters past the new end are freed.
    pub size_bytes: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
}

/// One mapped range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Byte offset in the file (cluster aligned).
    pub file_offset_bytes: u64,
    /// Byte offset on the LUN.
    pub lun_offset_bytes: u64,
    /// Length in bytes (a multiple of the cluster size).
    pub len_bytes: u64,
    /// Allocated but not yet written: reads return zeros until a commit clears the flag.
    pub unwritten: bool,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Name bytes (no '/' and no NUL, 1..=255 bytes).
    pub name: Vec<u8>,
    /// The inode it names.
    pub ino: InodeId,
    /// Its kind.
    pub kind: FileKind,
    /// Opaque position to continue a readdir after this entry.
    pub cookie: u64,
}

/// Volume usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    /// Cluster size in bytes.
    pub cluster_size_bytes: u32,
    /// Data clusters in the volume.
    pub total_clusters: u64,
    /// Free data clusters.
    pub free_clusters: u64,
    /// Inodes in the volume.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Longest name in bytes.
    pub max_name_bytes: u32,
}

/// `rename` flags (Linux renameat2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RenameFlags {
    /// RENAME_NOREPLACE: fail with `Exists` if the target exists.
    pub noreplace: bool,
    /// RENAME_EXCHANGE: atomically swap source and target (both must exist).
    pub exchange: bool,
}

/// `setxattr` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum XattrMode {
    /// Create or replace.
    #[default]
    Any,
    /// XATTR_CREATE: fail with `Exists` if present.
    Create,
    /// XATTR_REPLACE: fail with `NoData` if absent.
    Replace,
}

/// `fallocate` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FallocMode {
    /// Allocate (unwritten) clusters and extend the size if needed.
    Allocate,
    /// Allocate without changing the size (FALLOC_FL_KEEP_SIZE).
    KeepSize,
    /// Free the clusters fully inside the range; reads return zeros (PUNCH_HOLE|KEEP_SIZE).
    PunchHole,
    /// Make the range read as zeros, keeping it allocated (ZERO_RANGE).
    ZeroRange,
}

/// A file-system error as the protocol carries it. `csvfs` maps it to errno in one place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FsError {
    /// ENOENT.
    #[error("no such file or directory")]
    NotFound,
    /// EEXIST.
    #[error("file exists")]
    Exists,
    /// ENOTDIR.
    #[error("not a directory")]
    NotDir,
    /// EISDIR.
    #[error("is a directory")]
    IsDir,
    /// ENOTEMPTY.
    #[error("directory not empty")]
    NotEmpty,
    /// ENOSPC: no free clusters or inodes.
    #[error("no space left on volume")]
    NoSpace,
    /// ENAMETOOLONG.
    #[error("name too long")]
    NameTooLong,
    /// EINVAL, with what was invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// ENODATA: no such extended attribute.
    #[error("no such attribute")]
    NoData,
    /// ERANGE / E2BIG: attribute too large.
    #[error("attribute too large")]
    TooBig,
    /// EMLINK.
    #[error("too many links")]
    TooManyLinks,
    /// EPERM.
    #[error("operation not permitted")]
    NotPermitted,
    /// EFBIG: offset or size past the largest file.
    #[error("file too large")]
    FileTooLarge,
    /// ESTALE: the inode was freed or reused.
    #[error("stale inode")]
    Stale,
    /// EROFS: the volume is read-only (unknown ro-compat features, or fsck needed).
    #[error("volume is read-only")]
    ReadOnly,
    /// EIO: the coordinator could not read or write the LUN; carries what failed.
    #[error("i/o error: {0}")]
    Io(String),
    /// EIO: metadata on the LUN is corrupt; carries what and where.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
}
