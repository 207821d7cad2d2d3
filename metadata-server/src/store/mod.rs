//! The journaled metadata store: the coordinator's single writer of metadata. Implements
//! [`MetadataStore`] over a formatted volume (see FORMAT.md).
//!
//! ```text
//!  Store::open(dev, epoch)
//!    read superblock (backup if the primary is damaged)
//!    Journal::open -> records after the tail -> write each transaction home -> flush
//!    -> checkpoint; load bitmaps, DRC and the held list; free orphans nobody holds;
//!    mark the volume in use (one transaction)
//!
//!  execute(caller, req)                                   (one store lock)
//!    read-only request ─► answer from the cache (Fsync waits for the last Lsn)
//!    mutation: DRC hit? ─► wait for the journal, answer the recorded outcome
//!              run on the cache ─► error: reload touched state from disk + overlay
//!              ok: DRC slot + every touched structure ─► one Transaction
//!                  ─► journal.submit (in lock order) ─► overlay
//!                  ─► journal more than half full? checkpoint
//!              unlock ─► journal.wait_durable(lsn) (group commit) ─► answer
//!
//!  checkpoint: wait durable, write the overlay home, flush, journal.checkpoint
//!  shutdown:   state = clean (one transaction), checkpoint, refuse further work
//! ```
//!
//! Any failed journal or device write makes the store refuse all further work (sticky),
//! like the journal itself; the coordinator reopens it (replay) to continue.
//!
//! Fencing: a coordinator gives the store its [`LeaseGuard`] ([`Store::set_lease_guard`]).
//! Every request and every shutdown checks it first; once the lease is lost or not renewed
//! for half its timeout, the store refuses all further work (sticky, like a failed write)
//! and writes nothing more, so a paused or cut-off coordinator never writes metadata after
//! another node may have taken the volume over. [`Store::fence`] does the same on demand.

mod claims;
mod extmap;
mod meta;
mod ops;

use std::collections::HashMap;
use std::sync::Arc;

use block_client::{BlockDevice, BlockError, WriteFlags};
use journal::{Journal, JournalError, ReplayError};
use parking_lot::Mutex;

use crate::format::{
    DecodeError, DrcPayload, DrcSlot, Geometry, Superblock, SuperblockError, Transaction,
    VolumeState,
};
use crate::lease::LeaseGuard;
use crate::proto::{Caller, Request, Response};
use crate::types::{Attr, Epoch, FileKind, FsError, InodeId, Lsn, NodeId, VolumeId};
use crate::{MetadataStore, Submitted};
use meta::Meta;
pub use meta::StoreStats;
pub use ops::{MAX_LINKS, MAX_XATTR_TOTAL_BYTES, MAX_XATTR_VALUE_BYTES};

/// Why a store could not be opened or shut down.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The superblock could not be read or is not usable.
    #[error("read superblock")]
    Superblock(#[from] SuperblockError),
    /// Replaying the journal failed (includes being fenced by a newer epoch).
    #[error("open journal")]
    Replay(#[from] ReplayError),
    /// A journal record's payload is not a valid transaction.
    #[error("journal record {lsn} is not a valid transaction")]
    Record {
        /// The record.
        lsn: Lsn,
        /// What is wrong.
        #[source]
        source: DecodeError,
    },
    /// Writing a replayed transaction home failed.
    #[error("write replayed {lsn} home at byte {at}")]
    ApplyRecord {
        /// The record.
        lsn: Lsn,
        /// Byte offset.
        at: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Flushing the device failed.
    #[error("flush device")]
    Flush {
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// A journal operation failed (checkpoint or the first transaction).
    #[error("journal")]
    Journal(#[from] JournalError),
    /// Loading or checking metadata failed; carries the file-system error (Corrupt or Io).
    #[error("load metadata")]
    Load(#[source] FsError),
    /// A damaged structure found while opening.
    #[error("corrupt {what} at byte {at}")]
    Corrupt {
        /// What is damaged.
        what: String,
        /// Byte offset.
        at: u64,
    },
}

#[derive(Debug)]
struct Inner {
    meta: Meta,
    last_lsn: Lsn,
    failed: Option<String>,
    closed: bool,
}

/// The journaled metadata store of one volume. Thread-safe; see the module documentation.
#[derive(Debug)]
pub struct Store {
    dev: Arc<dyn BlockDevice>,
    journal: Option<Journal>,
    inner: Mutex<Inner>,
    read_only: bool,
    volume: VolumeId,
    geometry: Geometry,
    /// The coordinator lease this store runs under, once set.
    guard: std::sync::OnceLock<LeaseGuard>,
    /// The epoch this store was opened with (a `Reopen` for another epoch is ignored).
    epoch: Epoch,
}

/// From this protocol version nodes re-announce their opens after a takeover, so their
/// open counts are kept in memory; older nodes' counts are journaled in the inode.
pub const REOPEN_VERSION: u32 = 4;

/// How the reason a store stopped starts when it was fenced (its lease lapsed, or a newer
/// coordinator took over), as opposed to failing on its own.
const FENCED: &str = "fenced: ";

fn is_mutation(req: &Request) -> bool {
    !req.is_read_only()
}

fn journal_err(e: &JournalError) -> FsError {
    FsError::Io(format!("journal: {e}"))
}

impl Store {
    /// Opens the volume on `dev` as its coordinator with epoch `epoch`: replays the journal
    /// and loads the metadata. Orphans (unlinked inodes) left by a crash or a takeover stay
    /// until [`Store::reap_orphans`] or until a release of them: nodes still mounted may hold
    /// them open (see [`Store::hold_orphans`]). A volume with unknown
    /// read-only-compatible features opens read-only (mutations fail with `ReadOnly`); its
    /// journal is replayed in memory only.
    pub fn open(dev: Arc<dyn BlockDevice>, epoch: Epoch) -> Result<Store, StoreError> {
        let first = Superblock::read(dev.as_ref())?;
        let g = first.superblock.geometry;
        let (jstart, jlen) = (g.journal.start_bytes(), g.journal.len_bytes());
        if first.read_only {
            let summary = Journal::replay_read_only(dev.as_ref(), jstart, jlen)?;
            let mut overlay = HashMap::new();
            for rec in &summary.records {
                let t = Transaction::decode(&rec.payload, rec.lsn.0).map_err(|source| {
                    StoreError::Record {
                        lsn: rec.lsn,
                        source,
                    }
                })?;
                for w in t.writes {
                    overlay.insert(w.offset_bytes, w.bytes);
                }
            }
            let meta = Meta::load(dev.clone(), first.superblock.clone(), overlay)
                .map_err(StoreError::Load)?;
            tracing::info!(volume = %first.superblock.volume, "metadata store opened read-only (unknown ro-compat features)");
            return Ok(Store {
                dev,
                journal: None,
                inner: Mutex::new(Inner {
                    meta,
                    last_lsn: Lsn(0),
                    failed: None,
                    closed: false,
                }),
                read_only: true,
                volume: first.superblock.volume,
                geometry: g,
                guard: std::sync::OnceLock::new(),
                epoch,
            });
        }
        let (journal, records) = Journal::open(dev.clone(), jstart, jlen, epoch)?;
        let replayed = records.len();
        let mut last = None;
        let mark = dev.write_loss_count();
        for rec in &records {
            let t = Transaction::decode(&rec.payload, rec.lsn.0).map_err(|source| {
                StoreError::Record {
                    lsn: rec.lsn,
                    source,
                }
            })?;
            for w in &t.writes {
                dev.write_at(&w.bytes, w.offset_bytes, WriteFlags::default())
                    .map_err(|source| StoreError::ApplyRecord {
                        lsn: rec.lsn,
                        at: w.offset_bytes,
                        source,
                    })?;
            }
            last = Some(rec.lsn);
        }
        if let Some(l) = last {
            block_client::flush_since(&*dev, mark)
                .map_err(|source| StoreError::Flush { source })?;
            journal.checkpoint(l)?;
        }
        // The superblock may have been rewritten by the replay.
        let r = Superblock::read(dev.as_ref())?;
        let sb = r.superblock;
        if sb.volume != first.superblock.volume {
            return Err(StoreError::Corrupt {
                what: "superblock changed volume during replay".into(),
                at: 0,
            });
        }
        let mut meta =
            Meta::load(dev.clone(), sb.clone(), HashMap::new()).map_err(StoreError::Load)?;
        meta.stats.replayed_records = replayed as u64;
        // Orphans are freed by `reap_orphans`: nodes that stayed mounted may still hold them
        // open (their counts were in the previous coordinator's memory).
        let orphans = meta.held_prev.len();
        meta.sb.state = VolumeState::InUse;
        meta.txn.sb = true;
        let mut last_lsn = journal.durable_lsn();
        if let Some(t) = meta.finish_txn().map_err(StoreError::Load)? {
            let lsn = journal.append(t.encode())?;
            for w in t.writes {
                meta.overlay.insert(w.offset_bytes, w.bytes);
            }
            last_lsn = lsn;
        }
        tracing::info!(volume = %sb.volume, %epoch, replayed, held = orphans, "metadata store opened");
        Ok(Store {
            dev,
            journal: Some(journal),
            inner: Mutex::new(Inner {
                meta,
                last_lsn,
                failed: None,
                closed: false,
            }),
            read_only: false,
            volume: sb.volume,
            geometry: g,
            guard: std::sync::OnceLock::new(),
            epoch,
        })
    }

    /// Makes every later request and shutdown check `guard` first (see the module doc).
    /// Only the first guard set counts.
    pub fn set_lease_guard(&self, guard: LeaseGuard) {
        let _ = self.guard.set(guard);
    }

    /// Grants no conversion claim on unwritten clusters for `grace`: what a coordinator that
    /// took over calls right after opening, since claims the old one handed out are not
    /// known (see `claims`). Allocations still succeed; nodes ask again for the claims.
    pub fn hold_claims_for(&self, grace: std::time::Duration) {
        self.inner
            .lock()
            .meta
            .claims
            .hold_until(std::time::Instant::now() + grace);
    }

    /// Refuses all further work from now on (sticky): this node is no longer coordinator.
    pub fn fence(&self, reason: &str) {
        let mut g = self.inner.lock();
        if g.failed.is_none() {
            tracing::warn!(reason, "metadata store fenced: refusing further work");
            g.failed = Some(format!("{FENCED}{reason}"));
        }
    }

    /// The volume's UUID.
    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    /// The volume's layout.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// True when the store refuses mutations (unknown read-only-compatible features).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Counters for tests and monitoring.
    pub fn stats(&self) -> StoreStats {
        self.inner.lock().meta.stats
    }

    /// Nodes that hold at least one open handle on some inode, as recorded on disk. A new
    /// coordinator should call [`MetadataStore::node_gone`] for each of them that does not
    /// come back within its grace period, and for a node that mounts anew (its previous
    /// mount's handles are gone), so unlinked inodes they held are freed.
    pub fn nodes_holding_opens(&self) -> Vec<NodeId> {
        let mut g = self.inner.lock();
        let held: Vec<_> = g.meta.held_prev.keys().copied().collect();
        let mut nodes = std::collections::BTreeSet::new();
        for ino in held {
            if let Ok(c) = g.meta.inode(ino) {
                for (i, n) in c.inode.opens.iter().enumerate() {
                    if *n > 0 {
                        if let Ok(id) = u32::try_from(i + 1) {
                            nodes.insert(NodeId(id));
                        }
                    }
                }
            }
        }
        nodes.into_iter().collect()
    }

    /// Writes every committed change home and empties the journal.
    pub fn checkpoint(&self) -> Result<(), FsError> {
        let mut g = self.inner.lock();
        self.checkpoint_locked(&mut g)
    }

    fn checkpoint_locked(&self, g: &mut Inner) -> Result<(), FsError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        if g.meta.overlay.is_empty() {
            return Ok(());
        }
        let upto = g.last_lsn;
        let r = j
            .wait_durable(upto)
            .map_err(|e| journal_err(&e))
            .and_then(|()| meta::write_home(self.dev.as_ref(), &g.meta.overlay))
            .and_then(|()| j.checkpoint(upto).map_err(|e| journal_err(&e)));
        if let Err(e) = r {
            tracing::error!(error = %e, "checkpoint failed; the store refuses further work");
            g.failed = Some(e.to_string());
            return Err(e);
        }
        g.meta.overlay.clear();
        g.meta.stats.checkpoints += 1;
        Ok(())
    }

    /// Marks the volume clean, writes everything home and empties the journal. The store
    /// refuses further work afterwards.
    pub fn shutdown(&self) -> Result<(), FsError> {
        let mut g = self.inner.lock();
        self.check_lease(&mut g)?;
        if let Some(f) = &g.failed {
            return Err(FsError::Io(f.clone()));
        }
        if g.closed || self.read_only {
            g.closed = true;
            return Ok(());
        }
        g.meta.sb.state = VolumeState::Clean;
        g.meta.txn.sb = true;
        self.commit_locked(&mut g)?;
        self.checkpoint_locked(&mut g)?;
        g.closed = true;
        tracing::info!(volume = %self.volume, "metadata store shut down cleanly");
        Ok(())
    }

    /// Submits the current transaction; returns its Lsn (or the last one if empty).
    fn commit_locked(&self, g: &mut Inner) -> Result<Lsn, FsError> {
        let Some(j) = &self.journal else {
            return Err(FsError::ReadOnly);
        };
        let t = match g.meta.finish_txn() {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(g.last_lsn),
            Err(e) => {
                self.rollback(g);
                return Err(e);
            }
        };
        let payload = t.encode();
        g.meta.stats.transactions += 1;
        g.meta.stats.last_txn_bytes = payload.len() as u64;
        g.meta.stats.max_txn_bytes = g.meta.stats.max_txn_bytes.max(payload.len() as u64);
        let lsn = match j.submit(payload.clone()) {
            Ok(l) => l,
            Err(JournalError::Full { .. }) => {
                self.checkpoint_locked(g)?;
                match j.submit(payload) {
                    Ok(l) => l,
                    Err(e) => return Err(self.fail(g, &e)),
                }
            }
            Err(e @ JournalError::RecordTooLarge { .. }) => {
                self.rollback(g);
                return Err(FsError::Io(format!(
                    "transaction too large for the journal: {e}"
                )));
            }
            Err(e) => return Err(self.fail(g, &e)),
        };
        for w in t.writes {
            g.meta.overlay.insert(w.offset_bytes, w.bytes);
        }
        g.last_lsn = lsn;
        if j.used_bytes() > j.free_bytes() {
            self.checkpoint_locked(g)?;
        }
        Ok(lsn)
    }

    fn fail(&self, g: &mut Inner, e: &JournalError) -> FsError {
        tracing::error!(error = %e, "journal write failed; the store refuses further work");
        let err = journal_err(e);
        g.failed = Some(err.to_string());
        err
    }

    /// Throws away uncommitted in-memory changes: reloads from disk + overlay.
    fn rollback(&self, g: &mut Inner) {
        let overlay = std::mem::take(&mut g.meta.overlay);
        let stats = g.meta.stats;
        let claims = std::mem::take(&mut g.meta.claims);
        // Open counts live in memory only: what the failed request did to them stands
        // (it never lowers a count it should not).
        let opens = std::mem::take(&mut g.meta.opens);
        let open_ids = std::mem::take(&mut g.meta.open_ids);
        let reopened = std::mem::take(&mut g.meta.reopened);
        let orphan_grace = g.meta.orphan_grace;
        let sb = g.meta.sb.clone();
        match Meta::load(self.dev.clone(), sb, overlay.clone()) {
            Ok(mut m) => {
                if !overlay.contains_key(&0) {
                    // The superblock on disk is the committed one.
                    if let Ok(r) = Superblock::read(self.dev.as_ref()) {
                        m.sb = r.superblock;
                    }
                    // Reload dependent state with the committed superblock.
                    if let Ok(m2) = Meta::load(self.dev.clone(), m.sb.clone(), overlay) {
                        m = m2;
                    }
                }
                m.stats = stats;
                m.claims = claims;
                m.opens = opens;
                m.open_ids = open_ids;
                m.reopened = reopened;
                m.orphan_grace = orphan_grace;
                g.meta = m;
            }
            Err(e) => {
                tracing::error!(error = %e, "reloading metadata after a failed operation failed");
                g.failed = Some(e.to_string());
                g.meta.overlay = overlay;
                g.meta.opens = opens;
                g.meta.open_ids = open_ids;
                g.meta.reopened = reopened;
            }
        }
    }

    fn wait(&self, lsn: Lsn) -> Result<(), FsError> {
        let Some(j) = &self.journal else {
            return Ok(());
        };
        if lsn == Lsn(0) {
            return Ok(());
        }
        j.wait_durable(lsn).map_err(|e| {
            let err = journal_err(&e);
            self.inner.lock().failed = Some(err.to_string());
            err
        })
    }

    /// Fences the store (sticky) when its lease guard has lapsed.
    fn check_lease(&self, g: &mut Inner) -> Result<(), FsError> {
        match self.guard.get().map(LeaseGuard::check) {
            Some(Err(why)) if g.failed.is_none() => {
                tracing::warn!(reason = %why, "coordinator lease lapsed: the metadata store refuses further work");
                g.failed = Some(format!("{FENCED}{why}"));
                Err(FsError::Io(format!("store fenced: {why}")))
            }
            _ => Ok(()),
        }
    }

    fn check_usable(&self, g: &mut Inner) -> Result<(), FsError> {
        self.check_lease(g)?;
        if let Some(f) = &g.failed {
            return Err(FsError::Io(format!("store failed earlier: {f}")));
        }
        if g.closed {
            return Err(FsError::Io("metadata store is shut down".into()));
        }
        Ok(())
    }

    fn run_read(m: &mut Meta, req: &Request) -> Result<Response, FsError> {
        Ok(match req {
            Request::Lookup { parent, name } => Response::Attr(m.lookup(*parent, name)?),
            Request::GetAttr { ino } => Response::Attr(m.attr(*ino)?),
            Request::ReadLink { ino } => Response::Bytes(m.readlink(*ino)?),
            Request::ReadDir {
                ino,
                after_cookie,
                max_entries,
                plus,
            } => m.readdir(*ino, *after_cookie, *max_entries, *plus)?,
            Request::StatFs => Response::StatFs(m.statfs()),
            Request::GetXattr { ino, name } => Response::Bytes(m.getxattr(*ino, name)?),
            Request::ListXattr { ino } => Response::Names(m.listxattr(*ino)?),
            Request::GetExtents {
                ino,
                offset_bytes,
                len_bytes,
            } => m.mapped(*ino, *offset_bytes, *len_bytes)?,
            Request::Fsync { ino } => {
                m.attr(*ino)?;
                Response::Done
            }
            _ => return Err(FsError::Invalid("not a read-only request".into())),
        })
    }

    /// Runs a mutation. `legacy`: the caller's session is older than [`REOPEN_VERSION`], so
    /// its open counts are journaled.
    fn run_mutation(
        m: &mut Meta,
        caller: &Caller,
        req: &Request,
        legacy: bool,
    ) -> Result<Response, FsError> {
        Ok(match req {
            Request::SetAttr { ino, set } => Response::Attr(m.setattr(*ino, set)?),
            Request::Create {
                parent,
                name,
                kind,
                perm,
                rdev,
                exclusive,
            } => Response::Attr(m.create(caller, *parent, name, *kind, *perm, *rdev, *exclusive)?),
            Request::Symlink {
                parent,
                name,
                target,
            } => Response::Attr(m.symlink(caller, *parent, name, target)?),
            Request::Link {
                ino,
                new_parent,
                new_name,
            } => Response::Attr(m.link(*ino, *new_parent, new_name)?),
            Request::Unlink { parent, name } => {
                m.unlink(*parent, name)?;
                Response::Done
            }
            Request::Rmdir { parent, name } => {
                m.rmdir(*parent, name)?;
                Response::Done
            }
            Request::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                m.rename(*parent, name, *new_parent, new_name, *flags)?;
                Response::Done
            }
            Request::SetXattr {
                ino,
                name,
                value,
                mode,
            } => {
                m.setxattr(*ino, name, value, *mode)?;
                Response::Done
            }
            Request::RemoveXattr { ino, name } => {
                m.removexattr(*ino, name)?;
                Response::Done
            }
            Request::Open { ino, write: _ } => m.open(caller.node, *ino, legacy)?,
            Request::CreateOpen {
                parent,
                name,
                perm,
                exclusive,
                write: _,
            } => {
                let attr = m.create(caller, *parent, name, FileKind::File, *perm, 0, *exclusive)?;
                if !legacy {
                    m.note_open_id(caller.node, caller.request);
                }
                m.open(caller.node, attr.ino, legacy)?
            }
            Request::Release { ino } => {
                m.release(caller.node, *ino, legacy)?;
                Response::Done
            }
            Request::Allocate {
                ino,
                offset_bytes,
                len_bytes,
                hint_bytes,
            } => m.allocate(caller.node, *ino, *offset_bytes, *len_bytes, *hint_bytes)?,
            Request::Commit {
                ino,
                written,
                size_bytes,
            } => {
                let attr = m.commit(*ino, written, *size_bytes)?;
                m.claims.release(*ino, caller.node);
                Response::Attr(attr)
            }
            Request::Fallocate {
                ino,
                offset_bytes,
                len_bytes,
                mode,
            } => Response::Attr(m.fallocate(*ino, *offset_bytes, *len_bytes, *mode)?),
            _ => return Self::run_read(m, req),
        })
    }

    /// The answer to a retried request whose recorded outcome was too large to keep.
    fn replay_answer(m: &mut Meta, caller: &Caller, req: &Request) -> Result<Response, FsError> {
        match req {
            Request::Open { ino, .. } => m.mapped(*ino, 0, u64::MAX),
            // The name led to the file when the request ran; it still does unless a later
            // request of some node renamed or removed it, which the node could not have
            // seen before this answer (the caller still waits for it).
            Request::CreateOpen { parent, name, .. } => {
                let ino = m.lookup(*parent, name)?.ino;
                m.mapped(ino, 0, u64::MAX)
            }
            Request::Allocate {
                ino,
                offset_bytes,
                len_bytes,
                hint_bytes,
            } => m.claimed_map(
                caller.node,
                *ino,
                *offset_bytes,
                len_bytes.saturating_add(*hint_bytes),
            ),
            _ => Err(FsError::Invalid(
                "retried request has no recorded answer".into(),
            )),
        }
    }
}

impl Store {
    /// `Open`, `Release` and `Reopen` of a node of protocol version [`REOPEN_VERSION`] or
    /// later: counts in memory, deduplicated in memory (a resend to this coordinator counts
    /// once; a new coordinator counted nothing). Journaled only when a release frees an
    /// unlinked inode.
    fn submit_opens(&self, caller: &Caller, req: &Request) -> Result<Submitted, FsError> {
        let mut g = self.inner.lock();
        self.check_usable(&mut g)?;
        if self.read_only {
            return Err(FsError::ReadOnly);
        }
        let node = caller.node;
        let fresh = g.meta.note_open_id(node, caller.request);
        let result = match req {
            Request::Open { ino, .. } if fresh => g.meta.open(node, *ino, false),
            Request::Open { ino, .. } => g.meta.mapped(*ino, 0, u64::MAX),
            Request::Release { ino } if fresh => {
                g.meta.release(node, *ino, false).map(|()| Response::Done)
            }
            Request::Reopen { epoch, opens } if fresh && *epoch == self.epoch => {
                tracing::info!(%node, inodes = opens.len(), "node re-announced its opens");
                g.meta.reopen(node, opens).map(|()| Response::Done)
            }
            Request::Reopen { epoch, .. } if fresh => {
                tracing::debug!(%node, %epoch, "ignoring opens re-announced for another epoch");
                Ok(Response::Done)
            }
            _ => Ok(Response::Done),
        };
        if result.is_err() {
            // Nothing was counted: a resend must run again.
            if let Some(ids) = g.meta.open_ids.get_mut(&node) {
                ids.remove(caller.request);
            }
            if g.meta.txn.mutated {
                self.rollback(&mut g);
            } else {
                g.meta.txn = Default::default();
            }
            return Ok(Submitted::now(result));
        }
        if !g.meta.txn.mutated {
            g.meta.txn = Default::default();
            return Ok(Submitted::now(result));
        }
        let lsn = self.commit_locked(&mut g)?;
        Ok(Submitted { result, lsn })
    }

    /// Runs a request and queues its journal record; see [`Submitted`].
    fn submit_inner(
        &self,
        caller: &Caller,
        req: &Request,
        version: u32,
    ) -> Result<Submitted, FsError> {
        let legacy = version < REOPEN_VERSION;
        if !legacy
            && matches!(
                req,
                Request::Open { .. } | Request::Release { .. } | Request::Reopen { .. }
            )
        {
            return self.submit_opens(caller, req);
        }
        let mut g = self.inner.lock();
        self.check_usable(&mut g)?;
        if !is_mutation(req) {
            let r = Self::run_read(&mut g.meta, req);
            if matches!(req, Request::Fsync { .. }) && r.is_ok() {
                return Ok(Submitted {
                    result: r,
                    lsn: g.last_lsn,
                });
            }
            return Ok(Submitted::now(r));
        }
        if self.read_only {
            return Err(FsError::ReadOnly);
        }
        let slots = g.meta.g.drc_slots_per_node;
        let slot = u32::try_from(caller.request.0 % u64::from(slots)).unwrap_or(0);
        let Some(slot_at) = g.meta.g.drc_slot_offset(caller.node, slot) else {
            return Err(FsError::Invalid(format!(
                "{} is not a node of this volume",
                caller.node
            )));
        };
        if let Some(s) = g.meta.drc.get(&(caller.node, slot)) {
            if s.request == caller.request {
                let payload = s.payload.clone();
                let answer = match payload {
                    DrcPayload::Outcome(bytes) => {
                        bincode::deserialize::<Result<Response, FsError>>(&bytes)
                            .map_err(|e| FsError::Corrupt(format!("duplicate-request slot: {e}")))?
                    }
                    DrcPayload::Executed => Self::replay_answer(&mut g.meta, caller, req),
                };
                if let (Request::CreateOpen { .. }, Ok(Response::Mapped { attr, .. }), false) =
                    (req, &answer, legacy)
                {
                    // Ran before a takeover: this coordinator has not counted its open.
                    if g.meta.note_open_id(caller.node, caller.request) {
                        g.meta.count_opens(caller.node, &[(attr.ino, 1)])?;
                    }
                }
                tracing::debug!(node = %caller.node, request = %caller.request, "duplicate request answered from the cache");
                return Ok(Submitted {
                    result: answer,
                    lsn: g.last_lsn,
                });
            }
        }
        let result = Self::run_mutation(&mut g.meta, caller, req, legacy);
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                if g.meta.txn.mutated {
                    self.rollback(&mut g);
                } else {
                    g.meta.txn = Default::default();
                }
                return Err(e);
            }
        };
        let enc = bincode::serialize(&Ok::<&Response, FsError>(&resp))
            .map_err(|e| FsError::Io(format!("encode response: {e}")))?;
        let ds = DrcSlot {
            node: caller.node,
            request: caller.request,
            payload: if enc.len() <= crate::format::DRC_DATA_BYTES {
                DrcPayload::Outcome(enc)
            } else {
                DrcPayload::Executed
            },
        };
        g.meta.txn.raw.insert(slot_at, ds.encode());
        g.meta.txn.mutated = true;
        let prev_slot = g.meta.drc.insert((caller.node, slot), ds);
        let lsn = match self.commit_locked(&mut g) {
            Ok(l) => l,
            Err(e) => {
                if let Some(p) = prev_slot {
                    g.meta.drc.insert((caller.node, slot), p);
                }
                return Err(e);
            }
        };
        Ok(Submitted {
            result: Ok(resp),
            lsn,
        })
    }

    /// Starts the orphan grace after a takeover: until [`Store::reap_orphans`], an unlinked
    /// inode that no node is known to hold open stays (held) instead of being freed, because
    /// the nodes that stayed mounted have not re-announced their opens yet.
    pub fn hold_orphans(&self) {
        self.inner.lock().meta.orphan_grace = true;
    }

    /// Ends the orphan grace (see [`Store::hold_orphans`]): frees every unlinked inode that
    /// no node holds open (counted in memory since, or journaled by older nodes). The
    /// coordinator calls it once the nodes had time to reconnect and re-announce their
    /// opens. Returns how many inodes were freed.
    pub fn reap_orphans(&self) -> Result<u64, FsError> {
        let mut g = self.inner.lock();
        self.check_usable(&mut g)?;
        if self.read_only {
            return Ok(0);
        }
        let n = match g.meta.reap_orphans() {
            Ok(n) => n,
            Err(e) => {
                self.rollback(&mut g);
                return Err(e);
            }
        };
        let lsn = self.commit_locked(&mut g)?;
        drop(g);
        self.wait(lsn)?;
        if n > 0 {
            tracing::info!(freed = n, "freed unlinked inodes that no node holds open");
        }
        Ok(n)
    }
}

impl MetadataStore for Store {
    fn execute(&self, caller: &Caller, req: &Request) -> Result<Response, FsError> {
        self.execute_as(caller, req, crate::proto::PROTOCOL_VERSION)
    }

    fn execute_as(
        &self,
        caller: &Caller,
        req: &Request,
        version: u32,
    ) -> Result<Response, FsError> {
        let s = self.submit_as(caller, req, version);
        self.wait(s.lsn)?;
        s.result
    }

    fn submit_as(&self, caller: &Caller, req: &Request, version: u32) -> Submitted {
        self.submit_inner(caller, req, version)
            .unwrap_or_else(|e| Submitted::now(Err(e)))
    }

    fn wait_durable(&self, lsn: Lsn) -> Result<(), FsError> {
        self.wait(lsn)
    }

    fn changed_attrs(&self, req: &Request) -> Vec<Attr> {
        let (dirs, moved): (Vec<InodeId>, Vec<(InodeId, &[u8])>) = match req {
            Request::Create { parent, .. }
            | Request::CreateOpen { parent, .. }
            | Request::Symlink { parent, .. }
            | Request::Unlink { parent, .. }
            | Request::Rmdir { parent, .. } => (vec![*parent], Vec::new()),
            Request::Link { new_parent, .. } => (vec![*new_parent], Vec::new()),
            Request::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                let mut moved = vec![(*new_parent, new_name.as_slice())];
                if flags.exchange {
                    moved.push((*parent, name.as_slice()));
                }
                (vec![*parent, *new_parent], moved)
            }
            _ => return Vec::new(),
        };
        let mut g = self.inner.lock();
        if self.check_usable(&mut g).is_err() {
            return Vec::new();
        }
        let mut out: Vec<Attr> = Vec::new();
        for ino in dirs {
            if out.iter().all(|a| a.ino != ino) {
                out.extend(g.meta.attr(ino).ok());
            }
        }
        for (parent, name) in moved {
            if let Ok(a) = g.meta.lookup(parent, name) {
                if a.kind == FileKind::Dir && out.iter().all(|o| o.ino != a.ino) {
                    out.push(a);
                }
            }
        }
        out
    }

    fn try_execute_now(
        &self,
        caller: &Caller,
        req: &Request,
        version: u32,
    ) -> Option<Result<Response, FsError>> {
        if req.is_read_only() {
            return self.try_execute_read(caller, req);
        }
        if version < REOPEN_VERSION || self.read_only {
            return None;
        }
        let (Request::Open { ino, .. } | Request::Release { ino }) = req else {
            return None;
        };
        let mut g = self.inner.try_lock()?;
        if let Err(e) = self.check_usable(&mut g) {
            return Some(Err(e));
        }
        let node = caller.node;
        if g.meta.open_id_seen(node, caller.request) {
            // A resend of one that ran: the blocking path answers it without counting.
            return None;
        }
        let result = match req {
            Request::Open { .. } => g.meta.open_cached(node, *ino)?,
            _ => g
                .meta
                .release_cached(node, *ino)
                .map(|()| Ok(Response::Done))?,
        };
        if result.is_ok() {
            g.meta.note_open_id(node, caller.request);
        }
        Some(result)
    }

    fn try_execute_read(
        &self,
        _caller: &Caller,
        req: &Request,
    ) -> Option<Result<Response, FsError>> {
        if is_mutation(req) || matches!(req, Request::Fsync { .. }) {
            return None;
        }
        let mut g = self.inner.try_lock()?;
        if let Err(e) = self.check_usable(&mut g) {
            return Some(Err(e));
        }
        g.meta.without_device_reads(|m| Self::run_read(m, req))
    }

    fn reap_orphans(&self) -> Result<u64, FsError> {
        Store::reap_orphans(self)
    }

    fn fenced(&self) -> Option<String> {
        let mut g = self.inner.lock();
        // Notices a lapsed lease as a request would.
        let _ = self.check_lease(&mut g);
        g.failed.as_ref().filter(|f| f.starts_with(FENCED)).cloned()
    }

    fn awaiting_reopen(&self, nodes: &[NodeId]) -> Vec<NodeId> {
        let g = self.inner.lock();
        if !g.meta.orphan_grace {
            return Vec::new();
        }
        nodes
            .iter()
            .filter(|n| !g.meta.reopened.contains(n))
            .copied()
            .collect()
    }

    fn node_gone(&self, node: NodeId) -> Result<(), FsError> {
        let mut g = self.inner.lock();
        self.check_usable(&mut g)?;
        if self.read_only {
            return Err(FsError::ReadOnly);
        }
        if let Err(e) = g.meta.node_gone(node) {
            self.rollback(&mut g);
            return Err(e);
        }
        let lsn = self.commit_locked(&mut g)?;
        drop(g);
        self.wait(lsn)?;
        tracing::info!(%node, "released the opens of a departed node");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
