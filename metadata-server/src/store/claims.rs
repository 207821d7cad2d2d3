//! Conversion claims: which node may turn an unwritten cluster into a written one.
//!
//! A node that writes part of an unwritten cluster zeroes the rest of the cluster before it
//! commits (the unwritten mark is per cluster, FORMAT.md). Two nodes doing that to one
//! cluster at once would zero each other's uncommitted data, so only one node at a time
//! may write into an unwritten cluster: the one holding its claim (PROTOCOL.md §5.1).
//!
//! ```text
//!   unwritten, unclaimed ──Allocate by N──► claimed by N ──Commit by N──► released
//!                                               │          (written or still unwritten)
//!                 Allocate by M ≠ N: left out ◄─┤
//!                 of M's answer, M asks again    └─last Release by N, N gone──► released
//! ```
//!
//! Claims live in coordinator memory only: they protect data that is not committed yet,
//! which does not outlive the session that wrote it. After a failover the new coordinator
//! does not know the claims the old one handed out, while nodes may still be writing under
//! them until their next commit. So a store opened by a takeover grants no claim at all
//! for a grace period ([`Claims::hold_until`]): Allocate answers leave unwritten clusters
//! out and the nodes ask again, and meanwhile every node that held claims reconnects and
//! commits (which ends its claims) before anyone can be given those clusters.

use crate::types::{InodeId, NodeId};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// How far past the start of an Allocate's range it claims clusters that are allocated and
/// unwritten already.
pub(crate) const CLAIM_AHEAD_BYTES: u64 = 64 << 20;

/// The claims of every inode.
#[derive(Debug, Default, Clone)]
pub(crate) struct Claims {
    /// ino -> file cluster -> node holding its conversion.
    by_inode: HashMap<InodeId, BTreeMap<u64, NodeId>>,
    /// No claim is granted before this instant (the grace after a failover).
    held_until: Option<Instant>,
}

impl Claims {
    /// Grants no claim before `until`; see the module doc.
    pub(crate) fn hold_until(&mut self, until: Instant) {
        self.held_until = Some(until);
    }

    /// Claims file cluster `fc` of `ino` for `node` unless another node holds it.
    /// True when `node` holds it afterwards.
    pub(crate) fn take(&mut self, ino: InodeId, fc: u64, node: NodeId) -> bool {
        if let Some(until) = self.held_until {
            if Instant::now() < until {
                return false;
            }
            self.held_until = None;
        }
        *self
            .by_inode
            .entry(ino)
            .or_default()
            .entry(fc)
            .or_insert(node)
            == node
    }

    /// Releases every claim `node` holds on `ino`.
    pub(crate) fn release(&mut self, ino: InodeId, node: NodeId) {
        if let Some(m) = self.by_inode.get_mut(&ino) {
            m.retain(|_, n| *n != node);
            if m.is_empty() {
                self.by_inode.remove(&ino);
            }
        }
    }

    /// Releases every claim `node` holds.
    pub(crate) fn release_node(&mut self, node: NodeId) {
        self.by_inode.retain(|_, m| {
            m.retain(|_, n| *n != node);
            !m.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_claimed_during_the_grace() {
        let mut c = Claims::default();
        let (ino, a) = (InodeId(5), NodeId(1));
        c.hold_until(Instant::now() + std::time::Duration::from_millis(50));
        assert!(!c.take(ino, 3, a));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(c.take(ino, 3, a));
    }

    #[test]
    fn one_holder_per_cluster_until_released() {
        let mut c = Claims::default();
        let (ino, a, b) = (InodeId(5), NodeId(1), NodeId(2));
        assert!(c.take(ino, 3, a));
        assert!(c.take(ino, 3, a), "a holder may ask again");
        assert!(!c.take(ino, 3, b));
        assert!(c.take(ino, 4, b));
        c.release(ino, a);
        assert!(c.take(ino, 3, b));
        assert!(!c.take(ino, 4, a));
        c.release_node(b);
        assert!(c.take(ino, 4, a));
        assert!(c.take(InodeId(6), 4, b), "claims are per inode");
    }
}
