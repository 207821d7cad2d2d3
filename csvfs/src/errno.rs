//! Errors of node operations and the one place where they become an errno for the kernel.

use block_client::BlockError;
use metadata_server::types::FsError;

/// Why a file-system operation on this node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The coordinator refused or failed the request.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Reading or writing the LUN failed.
    #[error("{op} on the LUN")]
    Lun {
        /// The data-path step that failed.
        op: &'static str,
        /// What the block layer reported.
        #[source]
        source: BlockError,
    },
    /// `lseek(SEEK_DATA/SEEK_HOLE)` found nothing at or after the offset (ENXIO).
    #[error("no data at or after offset {offset_bytes}")]
    NoDataAfter {
        /// The offset asked for.
        offset_bytes: u64,
    },
    /// The operation or flag is not supported (EOPNOTSUPP).
    #[error("{what} is not supported")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },
    /// A file handle the kernel passed is unknown (EBADF).
    #[error("unknown file handle {fh}")]
    BadHandle {
        /// The handle.
        fh: u64,
    },
}

impl NodeError {
    /// Wraps a block-layer error of data-path step `op`.
    pub fn lun(op: &'static str) -> impl FnOnce(BlockError) -> NodeError {
        move |source| NodeError::Lun { op, source }
    }
}

/// The errno (a positive `libc` constant) that reports `err` to the calling process.
pub fn errno_of(err: &NodeError) -> i32 {
    match err {
        NodeError::Fs(fs) => match fs {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoData => libc::ENODATA,
            FsError::TooBig => libc::ERANGE,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NotPermitted => libc::EPERM,
            FsError::FileTooLarge => libc::EFBIG,
            FsError::Stale => libc::ESTALE,
            FsError::ReadOnly => libc::EROFS,
            FsError::Io(_) | FsError::Corrupt(_) => libc::EIO,
        },
        NodeError::Lun { .. } => libc::EIO,
        NodeError::NoDataAfter { .. } => libc::ENXIO,
        NodeError::Unsupported { .. } => libc::EOPNOTSUPP,
        NodeError::BadHandle { .. } => libc::EBADF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_errors_map_to_their_errno() {
        assert_eq!(errno_of(&FsError::NotFound.into()), libc::ENOENT);
        assert_eq!(errno_of(&FsError::NoSpace.into()), libc::ENOSPC);
        assert_eq!(errno_of(&FsError::Io("x".into()).into()), libc::EIO);
        assert_eq!(errno_of(&FsError::NotEmpty.into()), libc::ENOTEMPTY);
        assert_eq!(
            errno_of(&NodeError::NoDataAfter { offset_bytes: 1 }),
            libc::ENXIO
        );
    }
}
