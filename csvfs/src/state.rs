//! `csvfs state`: what the LUN says about the volume's nodes, in the manner of
//! Get-ClusterSharedVolumeState. Reads the superblock and the lease area; needs no
//! coordinator. Free space comes from the live coordinator (statfs through a mount of the
//! same LUN on this machine) when one answers within [`STATFS_TIMEOUT`], else from the
//! on-disk cluster bitmap, which lags while the volume is mounted (it is written at
//! checkpoints), and the output says which.

use crate::mount::{open_volume, MountError};
use block_client::BlockDevice;
use metadata_server::format::lease::LeaseRecord;
use metadata_server::format::{
    BitmapBlock, BitmapKind, Superblock, BITMAP_BITS_PER_BLOCK, BLOCK_BYTES, BLOCK_LEN,
};
use metadata_server::lease::{self, LeaseError, SlotInfo};
use metadata_server::types::Timestamp;
use std::path::PathBuf;
use std::time::Duration;

/// Why the state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The LUN or its superblock could not be used.
    #[error(transparent)]
    Volume(#[from] MountError),
    /// The lease area could not be read.
    #[error("read the lease area")]
    Lease(#[source] LeaseError),
    /// The cluster bitmap could not be read or is damaged.
    #[error("read the cluster bitmap block {index}")]
    Bitmap {
        /// Block index within the bitmap.
        index: u64,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The volume as `csvfs state` reports it.
#[derive(Debug, Clone)]
pub struct VolumeState {
    /// The LUN it was read from.
    pub lun: String,
    /// The superblock.
    pub superblock: Superblock,
    /// The coordinator lease record, if ever written.
    pub lease: Option<LeaseRecord>,
    /// Every node that ever heartbeated.
    pub slots: Vec<SlotInfo>,
    /// Free data clusters.
    pub free_clusters: u64,
    /// Where `free_clusters` comes from.
    pub free_source: FreeSource,
    /// Wall-clock now, to age heartbeats.
    pub now: Timestamp,
}

/// Where the free-space figure of `csvfs state` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreeSource {
    /// The coordinator answered statfs through this node's mount at the path.
    Coordinator(PathBuf),
    /// The on-disk bitmap, as of the coordinator's last checkpoint.
    Bitmap,
}

/// How long `csvfs state` waits for the coordinator's statfs before it falls back to the
/// on-disk bitmap.
pub const STATFS_TIMEOUT: Duration = Duration::from_secs(2);

/// Free clusters as the live coordinator counts them, asked through a local mount of
/// `lun_uri` (statfs of a csvfs mount reports clusters as blocks), within
/// [`STATFS_TIMEOUT`].
fn live_free_clusters(lun_uri: &str) -> Option<(u64, PathBuf)> {
    let mp = crate::local::mounts_of(lun_uri).into_iter().next()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let path = mp.clone();
    // A thread, so a coordinator that does not answer only costs the timeout.
    std::thread::Builder::new()
        .name("state-statfs".into())
        .spawn(move || {
            let _ = tx.send(nix::sys::statvfs::statvfs(&path));
        })
        .ok()?;
    match rx.recv_timeout(STATFS_TIMEOUT) {
        Ok(Ok(st)) => Some((st.blocks_free(), mp)),
        _ => None,
    }
}

/// Reads the volume's state from the LUN.
pub fn read_state(lun_uri: &str) -> Result<VolumeState, StateError> {
    let (lun, sb) = open_volume(lun_uri)?;
    let area = lease::read_all(&lun).map_err(StateError::Lease)?;
    let (free_clusters, free_source) = match live_free_clusters(lun_uri) {
        Some((n, mp)) => (n, FreeSource::Coordinator(mp)),
        None => (count_free_clusters(lun.as_ref(), &sb)?, FreeSource::Bitmap),
    };
    Ok(VolumeState {
        lun: lun_uri.to_string(),
        superblock: sb,
        lease: area.lease,
        slots: area.slots,
        free_clusters,
        free_source,
        now: lease::now(),
    })
}

fn count_free_clusters(lun: &dyn BlockDevice, sb: &Superblock) -> Result<u64, StateError> {
    let g = &sb.geometry;
    let region = g.bitmap_region(BitmapKind::Clusters);
    let bits = g.bitmap_bits(BitmapKind::Clusters);
    let mut used = 0u64;
    let mut buf = vec![0u8; BLOCK_LEN];
    let blocks = bits.div_ceil(BITMAP_BITS_PER_BLOCK).min(region.len_blocks);
    for index in 0..blocks {
        let at = region.start_bytes() + index * BLOCK_BYTES;
        lun.read_at(&mut buf, at).map_err(|e| StateError::Bitmap {
            index,
            source: Box::new(e),
        })?;
        let block = BitmapBlock::decode(&buf, at, BitmapKind::Clusters, index).map_err(|e| {
            StateError::Bitmap {
                index,
                source: Box::new(e),
            }
        })?;
        let first = index * BITMAP_BITS_PER_BLOCK;
        let n = (bits - first).min(BITMAP_BITS_PER_BLOCK);
        used += (0..n).filter(|&i| block.get(i)).count() as u64;
    }
    Ok(g.cluster_count.saturating_sub(used))
}
