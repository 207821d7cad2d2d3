//! Cache coherence: which node caches which inode and directory entry, and delivery of
//! invalidations (with their acknowledgements) before a change is acknowledged.
//!
//! Tracking is learned from answers: every reply a node receives names inodes and entries
//! it may now cache. A mutation computes what it made stale, removes the other nodes that
//! cached it from the tables (they are about to drop it), sends them `Invalidate` frames
//! and waits for their acks (or the timeout) before the originator's reply is sent.
//!
//! Races: a reply computed before a mutation but queued after that mutation's
//! invalidation would let its node cache stale state. Each request remembers the
//! connection's invalidation sequence when it started; when its reply is queued, any
//! invalidation sent since that touches what the reply names is sent again right after
//! the reply (under the same lock, so nothing can slip in between).
//!
//! A node that is disconnected when it should be invalidated has the invalidation kept
//! in its `missed` set (or, past a bound, a flag meaning "everything"), delivered first
//! thing when it reconnects.

use crate::proto::{Frame, Invalidation, Request, Response};
use crate::types::{Attr, FsError, InodeId, NodeId};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// Invalidations remembered per connection for the race check above.
const RECENT_INVALIDATIONS: usize = 4096;
/// Missed invalidations kept per disconnected node before falling back to `All`.
const MAX_MISSED: usize = 100_000;

/// Where the frames of a node's session go. `queue` fixes their order (it is called under
/// the coherence lock); `push` writes what was queued and is called after that lock is
/// released, so no socket write happens under it.
pub(crate) trait FrameSink: Send + Sync {
    /// Queues `f` behind every frame queued before; false when the session is gone.
    fn queue(&self, f: Frame) -> bool;
    /// Writes what was queued (as far as the connection takes it now).
    fn push(&self) {}
}

#[cfg(test)]
impl FrameSink for tokio::sync::mpsc::UnboundedSender<Frame> {
    fn queue(&self, f: Frame) -> bool {
        self.send(f).is_ok()
    }
}

/// Something a node may cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// An inode's attributes, data, extents, listing.
    Inode(InodeId),
    /// A directory entry and the inode it named (`None`: a negative entry).
    Entry(InodeId, Vec<u8>, Option<InodeId>),
}

impl Key {
    fn matches(&self, inv: &Invalidation) -> bool {
        match (self, inv) {
            (_, Invalidation::All) => true,
            (Key::Inode(a), Invalidation::Inode { ino }) => a == ino,
            (Key::Entry(p, n, _), Invalidation::Entry { parent, name }) => p == parent && n == name,
            _ => false,
        }
    }
}

/// The connected session of a node.
struct Link {
    conn: u64,
    /// Closes the session when a newer one of the same node replaces it.
    kick: Arc<Notify>,
    version: u32,
    tx: Arc<dyn FrameSink>,
    next_seq: u64,
    acks: HashMap<u64, oneshot::Sender<()>>,
    recent: VecDeque<(u64, Invalidation)>,
}

#[derive(Default)]
struct NodeState {
    link: Option<Link>,
    /// The node has had a session with this server instance.
    known: bool,
    missed: HashSet<Invalidation>,
    missed_all: bool,
}

#[derive(Default)]
struct EntryCache {
    ino: Option<InodeId>,
    nodes: HashSet<NodeId>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<NodeId, NodeState>,
    inodes: HashMap<InodeId, HashSet<NodeId>>,
    entries: HashMap<(InodeId, Vec<u8>), EntryCache>,
}

impl State {
    /// The node's session while it is connection `conn` (not replaced or closed).
    fn link(&self, node: NodeId, conn: u64) -> Option<&Link> {
        let link = self.nodes.get(&node)?.link.as_ref()?;
        (link.conn == conn).then_some(link)
    }

    /// [`link`](Self::link), to change.
    fn link_mut(&mut self, node: NodeId, conn: u64) -> Option<&mut Link> {
        let link = self.nodes.get_mut(&node)?.link.as_mut()?;
        (link.conn == conn).then_some(link)
    }
}

/// Coherence tracker shared by all connections of one server.
pub(crate) struct Coherence {
    state: Mutex<State>,
    ack_timeout: Duration,
}

/// Version from which a node receives invalidations.
const INVALIDATION_VERSION: u32 = 2;

impl Coherence {
    pub(crate) fn new(ack_timeout: Duration) -> Coherence {
        Coherence {
            state: Mutex::new(State::default()),
            ack_timeout,
        }
    }

    /// A node's session is established. Returns the frames to send it before anything
    /// else: the invalidations it missed. An older session of the same node that is still
    /// registered is replaced (told to close; its pending acks fail). Returns `None`, and
    /// changes nothing, when a newer session (higher `conn`) already holds the node: this
    /// one was overtaken while it was starting and must close.
    pub(crate) fn attach(
        &self,
        node: NodeId,
        conn: u64,
        version: u32,
        resumed: bool,
        tx: Arc<dyn FrameSink>,
        kick: Arc<Notify>,
    ) -> Option<Vec<Frame>> {
        let mut st = self.state.lock();
        let ns = st.nodes.entry(node).or_default();
        if let Some(old) = &ns.link {
            if old.conn > conn {
                return None;
            }
            old.kick.notify_one();
        }
        let mut link = Link {
            conn,
            kick,
            version,
            tx,
            next_seq: 1,
            acks: HashMap::new(),
            recent: VecDeque::new(),
        };
        let mut out = Vec::new();
        if version >= INVALIDATION_VERSION {
            let invs: Vec<Invalidation> = if ns.missed_all || (resumed && !ns.known) {
                vec![Invalidation::All]
            } else {
                ns.missed.drain().collect()
            };
            for inv in invs {
                let seq = link.next_seq;
                link.next_seq += 1;
                out.push(Frame::Invalidate { seq, inv });
            }
        }
        ns.missed.clear();
        ns.missed_all = false;
        ns.known = true;
        ns.link = Some(link);
        Some(out)
    }

    /// The session `conn` of `node` ended. Returns true when it was the node's current one.
    pub(crate) fn detach(&self, node: NodeId, conn: u64) -> bool {
        let mut st = self.state.lock();
        match st.nodes.get_mut(&node) {
            Some(ns) if ns.link.as_ref().is_some_and(|l| l.conn == conn) => {
                ns.link = None;
                true
            }
            _ => false,
        }
    }

    /// True when `node` has a live session.
    pub(crate) fn is_connected(&self, node: NodeId) -> bool {
        let st = self.state.lock();
        st.nodes.get(&node).is_some_and(|n| n.link.is_some())
    }

    /// True while `conn` is the node's current session (not replaced or closed).
    pub(crate) fn is_current(&self, node: NodeId, conn: u64) -> bool {
        self.state.lock().link(node, conn).is_some()
    }

    /// Nodes with a live session.
    pub(crate) fn connected(&self) -> Vec<NodeId> {
        let st = self.state.lock();
        let mut v: Vec<NodeId> = st
            .nodes
            .iter()
            .filter(|(_, n)| n.link.is_some())
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    /// The connection's invalidation sequence now (taken when a request starts).
    pub(crate) fn mark(&self, node: NodeId, conn: u64) -> u64 {
        self.state.lock().link(node, conn).map_or(0, |l| l.next_seq)
    }

    /// An acknowledgement arrived.
    pub(crate) fn ack(&self, node: NodeId, conn: u64, seq: u64) {
        let mut st = self.state.lock();
        if let Some(link) = st.link_mut(node, conn) {
            if let Some(tx) = link.acks.remove(&seq) {
                let _ = tx.send(());
            }
        }
    }

    /// Queues `reply` to the node and records what it may now cache; re-sends, after the
    /// reply, invalidations that raced it. Returns false when the session is gone.
    #[cfg(test)]
    pub(crate) fn reply(
        &self,
        node: NodeId,
        conn: u64,
        start_seq: u64,
        req: &Request,
        reply: Frame,
    ) -> bool {
        match self.reply_queued(node, conn, start_seq, req, reply) {
            Some(sink) => {
                sink.push();
                true
            }
            None => false,
        }
    }

    /// [`reply`](Self::reply) without writing: queues the reply (and what it raced) on the
    /// connection and returns its sink, for the caller to push once for many replies.
    pub(crate) fn reply_queued(
        &self,
        node: NodeId,
        conn: u64,
        start_seq: u64,
        req: &Request,
        reply: Frame,
    ) -> Option<Arc<dyn FrameSink>> {
        let keys = match &reply {
            Frame::Reply { result, .. } => cached_keys(req, result),
            _ => Vec::new(),
        };
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let link = st.link_mut(node, conn)?;
        if !link.tx.queue(reply) {
            return None;
        }
        let sink = link.tx.clone();
        if link.version < INVALIDATION_VERSION {
            return Some(sink);
        }
        let again: Vec<Invalidation> = link
            .recent
            .iter()
            .rev() // newest first; `recent` is in sequence order
            .take_while(|(seq, _)| *seq >= start_seq)
            .filter(|(_, inv)| keys.iter().any(|k| k.matches(inv)))
            .map(|(_, inv)| inv.clone())
            .collect();
        for inv in again {
            let seq = link.next_seq;
            link.next_seq += 1;
            let _ = link.tx.queue(Frame::Invalidate { seq, inv });
        }
        for key in keys {
            match key {
                Key::Inode(ino) => {
                    st.inodes.entry(ino).or_default().insert(node);
                }
                Key::Entry(parent, name, ino) => {
                    let e = st.entries.entry((parent, name)).or_default();
                    e.ino = ino;
                    e.nodes.insert(node);
                }
            }
        }
        drop(guard);
        Some(sink)
    }

    /// Sends the invalidations that the successful mutation `req` (answered `resp`) by
    /// `origin` requires to every other node caching what changed, and waits for their
    /// acks or the timeout. (The server runs the two halves apart.)
    #[cfg(test)]
    pub(crate) async fn invalidate_for(&self, origin: NodeId, req: &Request, resp: &Response) {
        let waits = self.send_invalidations(origin, req, resp);
        self.await_acks(waits).await;
    }

    /// Sends the invalidations a successful mutation requires (see `stale`) and returns
    /// the acks to wait for (none when no other node caches what changed).
    pub(crate) fn send_invalidations(
        &self,
        origin: NodeId,
        req: &Request,
        resp: &Response,
    ) -> Vec<AckWait> {
        let mut waits: Vec<AckWait> = Vec::new();
        let mut sinks: Vec<Arc<dyn FrameSink>> = Vec::new();
        {
            let mut st = self.state.lock();
            let invs = stale(&st, req, resp);
            if invs.is_empty() {
                return waits;
            }
            let mut targets: HashMap<NodeId, Vec<Invalidation>> = HashMap::new();
            for inv in invs {
                let holders: HashSet<NodeId> = match &inv {
                    Invalidation::Inode { ino } => st.inodes.remove(ino).unwrap_or_default(),
                    Invalidation::Entry { parent, name } => st
                        .entries
                        .remove(&(*parent, name.clone()))
                        .map(|e| e.nodes)
                        .unwrap_or_default(),
                    Invalidation::All => HashSet::new(),
                };
                for n in holders {
                    targets.entry(n).or_default().push(inv.clone());
                }
            }
            // The originator learns the new state from its reply; keep it tracked.
            if let Some(mine) = targets.remove(&origin) {
                for inv in mine {
                    retrack(&mut st, origin, &inv);
                }
            }
            for (node, invs) in targets {
                let ns = st.nodes.entry(node).or_default();
                let deliverable = ns
                    .link
                    .as_ref()
                    .is_some_and(|l| l.version >= INVALIDATION_VERSION);
                if let (true, Some(link)) = (deliverable, ns.link.as_mut()) {
                    for inv in invs {
                        let seq = link.next_seq;
                        link.next_seq += 1;
                        let (tx, rx) = oneshot::channel();
                        if link.tx.queue(Frame::Invalidate {
                            seq,
                            inv: inv.clone(),
                        }) {
                            link.acks.insert(seq, tx);
                            link.recent.push_back((seq, inv.clone()));
                            if link.recent.len() > RECENT_INVALIDATIONS {
                                link.recent.pop_front();
                            }
                            waits.push((node, seq, inv, rx));
                        } else {
                            miss(&mut ns.missed, &mut ns.missed_all, inv);
                        }
                    }
                    sinks.push(link.tx.clone());
                } else if ns.link.is_none() {
                    for inv in invs {
                        miss(&mut ns.missed, &mut ns.missed_all, inv);
                    }
                }
                // A version-1 node is never tracked, so it never gets here.
            }
        }
        for sink in sinks {
            sink.push();
        }
        waits
    }

    /// Waits for the acks of invalidations sent by `send_invalidations`, at most the
    /// ack timeout.
    pub(crate) async fn await_acks(&self, waits: Vec<AckWait>) {
        if waits.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.ack_timeout;
        let mut late: HashSet<NodeId> = HashSet::new();
        for (node, seq, inv, rx) in waits {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    // The session closed before acking: deliver on reconnect.
                    let mut st = self.state.lock();
                    let ns = st.nodes.entry(node).or_default();
                    miss(&mut ns.missed, &mut ns.missed_all, inv);
                }
                Err(_) => {
                    // Forget the ack; a late one is ignored.
                    let mut st = self.state.lock();
                    if let Some(link) = st.nodes.get_mut(&node).and_then(|n| n.link.as_mut()) {
                        link.acks.remove(&seq);
                    }
                    drop(st);
                    if late.insert(node) {
                        tracing::warn!(
                            %node,
                            timeout_ms = self.ack_timeout.as_millis(),
                            "node did not acknowledge an invalidation in time; treating it as unresponsive and acknowledging the change anyway"
                        );
                    }
                }
            }
        }
    }
}

/// An invalidation sent and the ack it waits for: (node, seq, what, ack).
pub(crate) type AckWait = (NodeId, u64, Invalidation, oneshot::Receiver<()>);

fn miss(missed: &mut HashSet<Invalidation>, all: &mut bool, inv: Invalidation) {
    if *all {
        return;
    }
    if missed.len() >= MAX_MISSED {
        missed.clear();
        *all = true;
    } else {
        missed.insert(inv);
    }
}

fn retrack(st: &mut State, node: NodeId, inv: &Invalidation) {
    match inv {
        Invalidation::Inode { ino } => {
            st.inodes.entry(*ino).or_default().insert(node);
        }
        Invalidation::Entry { parent, name } => {
            st.entries
                .entry((*parent, name.clone()))
                .or_default()
                .nodes
                .insert(node);
        }
        Invalidation::All => {}
    }
}

fn inode(ino: InodeId) -> Invalidation {
    Invalidation::Inode { ino }
}

fn entry(parent: InodeId, name: &[u8]) -> Invalidation {
    Invalidation::Entry {
        parent,
        name: name.to_vec(),
    }
}

/// What a node may cache after receiving this answer.
pub(crate) fn cached_keys(req: &Request, result: &Result<Response, FsError>) -> Vec<Key> {
    let mut keys = Vec::new();
    // The attributes a `WithAttrs` carries along may be cached too.
    if let Ok(Response::WithAttrs { attrs, .. }) = result {
        keys.extend(attrs.iter().map(|a| Key::Inode(a.ino)));
    }
    let answer = result.as_ref().map(Response::answer);
    let result = &answer;
    let attr_ino = |r: &Response| -> Option<InodeId> {
        match r {
            Response::Attr(a) => Some(a.ino),
            Response::Mapped { attr, .. } => Some(attr.ino),
            _ => None,
        }
    };
    match (req, result) {
        (Request::Lookup { parent, name }, Ok(r)) => {
            let ino = attr_ino(r);
            keys.push(Key::Entry(*parent, name.clone(), ino));
            keys.extend(ino.map(Key::Inode));
        }
        // A name found missing is tracked as its directory: a node keeps no negative entry
        // that the directory's `Inode` invalidation does not drop (the kernel is answered
        // ENOENT, which it looks up again every time; the node's directory cache forgets a
        // directory's names with it). So a create of that name elsewhere sends this node
        // `Inode(parent)` only, never `Entry`: an entry invalidation waits for the node's
        // kernel to take the directory's lock, which that node's own create in the same
        // directory holds while it waits here, and creates from several nodes in one
        // directory would queue up behind each other.
        (Request::Lookup { parent, .. }, Err(FsError::NotFound)) => {
            keys.push(Key::Inode(*parent));
        }
        (
            Request::Create { parent, name, .. }
            | Request::CreateOpen { parent, name, .. }
            | Request::Symlink { parent, name, .. },
            Ok(r),
        ) => {
            let ino = attr_ino(r);
            keys.push(Key::Entry(*parent, name.clone(), ino));
            keys.extend(ino.map(Key::Inode));
        }
        (
            Request::Link {
                ino,
                new_parent,
                new_name,
            },
            Ok(_),
        ) => {
            keys.push(Key::Entry(*new_parent, new_name.clone(), Some(*ino)));
            keys.push(Key::Inode(*ino));
        }
        (Request::ReadDir { ino, .. }, Ok(Response::Entries(list))) => {
            keys.push(Key::Inode(*ino));
            for (e, attr) in list {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                if let Some(Attr { ino: child, .. }) = attr {
                    keys.push(Key::Entry(*ino, e.name.clone(), Some(*child)));
                    keys.push(Key::Inode(*child));
                }
            }
        }
        (_, Ok(r)) => {
            if let Some(ino) = attr_ino(r).or_else(|| subject(req)) {
                keys.push(Key::Inode(ino));
            }
        }
        _ => {}
    }
    keys
}

/// The inode a request is about, if it names one.
fn subject(req: &Request) -> Option<InodeId> {
    match req {
        Request::GetAttr { ino }
        | Request::SetAttr { ino, .. }
        | Request::ReadLink { ino }
        | Request::GetXattr { ino, .. }
        | Request::ListXattr { ino }
        | Request::Open { ino, .. }
        | Request::GetExtents { ino, .. }
        | Request::Allocate { ino, .. }
        | Request::Commit { ino, .. }
        | Request::Fallocate { ino, .. } => Some(*ino),
        _ => None,
    }
}

/// What the successful mutation `req` made stale for other nodes.
fn stale(st: &State, req: &Request, resp: &Response) -> Vec<Invalidation> {
    let known = |parent: InodeId, name: &[u8]| -> Option<InodeId> {
        st.entries.get(&(parent, name.to_vec())).and_then(|e| e.ino)
    };
    let mut v = Vec::new();
    match req {
        Request::SetAttr { ino, .. }
        | Request::SetXattr { ino, .. }
        | Request::RemoveXattr { ino, .. }
        | Request::Allocate { ino, .. }
        | Request::Commit { ino, .. }
        | Request::Fallocate { ino, .. } => v.push(inode(*ino)),
        Request::Create { parent, name, .. }
        | Request::CreateOpen { parent, name, .. }
        | Request::Symlink { parent, name, .. } => {
            v.push(entry(*parent, name));
            v.push(inode(*parent));
        }
        Request::Link {
            ino,
            new_parent,
            new_name,
        } => {
            v.push(entry(*new_parent, new_name));
            v.push(inode(*new_parent));
            v.push(inode(*ino));
        }
        Request::Unlink { parent, name } | Request::Rmdir { parent, name } => {
            v.push(entry(*parent, name));
            v.push(inode(*parent));
            if let Some(child) = known(*parent, name) {
                v.push(inode(child));
            }
        }
        Request::Rename {
            parent,
            name,
            new_parent,
            new_name,
            ..
        } => {
            v.push(entry(*parent, name));
            v.push(entry(*new_parent, new_name));
            v.push(inode(*parent));
            if new_parent != parent {
                v.push(inode(*new_parent));
            }
            for child in [known(*parent, name), known(*new_parent, new_name)]
                .into_iter()
                .flatten()
            {
                v.push(inode(child));
            }
        }
        Request::Lookup { .. }
        | Request::GetAttr { .. }
        | Request::ReadLink { .. }
        | Request::ReadDir { .. }
        | Request::StatFs
        | Request::GetXattr { .. }
        | Request::ListXattr { .. }
        | Request::Open { .. }
        | Request::Release { .. }
        | Request::Reopen { .. }
        | Request::GetExtents { .. }
        | Request::Fsync { .. } => {}
    }
    let _ = resp;
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{FileKind, Timestamp};
    use tokio::sync::mpsc;

    fn attr(ino: u64) -> Attr {
        Attr {
            ino: InodeId(ino),
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

    #[tokio::test]
    async fn racing_reply_is_followed_by_the_invalidation_again() {
        let c = Coherence::new(Duration::from_millis(50));
        let (tx_a, mut rx_a) = mpsc::unbounded_channel();
        let (tx_b, mut rx_b) = mpsc::unbounded_channel();
        assert_eq!(
            c.attach(NodeId(1), 1, 2, false, Arc::new(tx_a), Arc::default()),
            Some(vec![])
        );
        assert_eq!(
            c.attach(NodeId(2), 2, 2, false, Arc::new(tx_b), Arc::default()),
            Some(vec![])
        );
        let getattr = Request::GetAttr { ino: InodeId(5) };
        // Node 2 cached ino 5 earlier.
        assert!(c.reply(
            NodeId(2),
            2,
            c.mark(NodeId(2), 2),
            &getattr,
            Frame::Reply {
                id: crate::types::RequestId(1),
                result: Ok(Response::Attr(attr(5))),
            },
        ));
        assert!(matches!(rx_b.try_recv(), Ok(Frame::Reply { .. })));
        // Node 2 starts a second getattr; meanwhile node 1 changes ino 5.
        let start = c.mark(NodeId(2), 2);
        let setattr = Request::SetAttr {
            ino: InodeId(5),
            set: Default::default(),
        };
        c.invalidate_for(NodeId(1), &setattr, &Response::Attr(attr(5)))
            .await; // times out: nobody acks here
        assert!(matches!(
            rx_b.try_recv(),
            Ok(Frame::Invalidate {
                inv: Invalidation::Inode { ino: InodeId(5) },
                ..
            })
        ));
        // The stale reply goes out after the invalidation: it must be followed by it again.
        assert!(c.reply(
            NodeId(2),
            2,
            start,
            &getattr,
            Frame::Reply {
                id: crate::types::RequestId(2),
                result: Ok(Response::Attr(attr(5))),
            },
        ));
        assert!(matches!(rx_b.try_recv(), Ok(Frame::Reply { .. })));
        assert!(matches!(
            rx_b.try_recv(),
            Ok(Frame::Invalidate {
                inv: Invalidation::Inode { ino: InodeId(5) },
                ..
            })
        ));
        assert!(
            rx_a.try_recv().is_err(),
            "the originator is not invalidated"
        );
    }

    #[tokio::test]
    async fn disconnected_node_gets_missed_invalidations_on_reconnect() {
        let c = Coherence::new(Duration::from_millis(50));
        let (tx_b, _rx_b) = mpsc::unbounded_channel();
        assert!(c
            .attach(NodeId(2), 7, 2, false, Arc::new(tx_b), Arc::default())
            .is_some());
        let lookup = Request::Lookup {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
        };
        c.reply(
            NodeId(2),
            7,
            0,
            &lookup,
            Frame::Reply {
                id: crate::types::RequestId(1),
                result: Err(FsError::NotFound),
            },
        );
        assert!(c.detach(NodeId(2), 7));
        let create = Request::Create {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            exclusive: true,
        };
        c.invalidate_for(NodeId(1), &create, &Response::Attr(attr(9)))
            .await;
        let (tx_b, _rx_b) = mpsc::unbounded_channel();
        let frames = c
            .attach(NodeId(2), 8, 2, true, Arc::new(tx_b), Arc::default())
            .unwrap();
        // The missing name was tracked as its directory.
        assert!(frames.iter().any(|f| matches!(
            f,
            Frame::Invalidate { inv: Invalidation::Inode { ino }, .. } if *ino == InodeId::ROOT
        )));
        assert!(
            !frames.iter().any(|f| matches!(
                f,
                Frame::Invalidate {
                    inv: Invalidation::Entry { .. },
                    ..
                }
            )),
            "{frames:?}"
        );
    }

    #[test]
    fn an_older_session_that_attaches_late_does_not_displace_a_newer_one() {
        let c = Coherence::new(Duration::from_millis(50));
        let (tx_new, _rx_new) = mpsc::unbounded_channel();
        let (tx_old, _rx_old) = mpsc::unbounded_channel();
        assert!(c
            .attach(NodeId(3), 10, 2, false, Arc::new(tx_new), Arc::default())
            .is_some());
        assert!(c
            .attach(NodeId(3), 9, 2, false, Arc::new(tx_old), Arc::default())
            .is_none());
        assert!(!c.detach(NodeId(3), 9));
        assert!(c.detach(NodeId(3), 10));
    }
}
