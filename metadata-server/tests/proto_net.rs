//! Metadata server and client over real TCP on loopback, against an in-memory store that
//! implements `MetadataStore` here (with its own duplicate-request cache, like the real
//! store): authentication, versions, bad frames, concurrency, restart with resend,
//! invalidations, node-gone, unreachable coordinator; and local sessions, which the node
//! that hosts the coordinator uses instead of a socket.
#![allow(clippy::tests_outside_test_module)]
// Test helpers outside #[test] functions; a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use block_client::testing::MemDevice;
use block_client::BlockDevice;
use metadata_server::client::{
    ClientConfig, ConnectError, CoordinatorLocator, InvalidationHandler, LocalCoordinator,
    MetadataClient,
};
use metadata_server::format::{mkfs, MkfsOptions, Superblock};
use metadata_server::lease::{self, LeaseKeeper, LeaseRole};
use metadata_server::proto::{
    decode_frame, encode_frame, Caller, ClientHello, Frame, Invalidation, Request, Response,
    Transcript, MAX_FRAME_BYTES, NONCE_BYTES,
};
use metadata_server::server::{Server, ServerConfig, ServerHandle};
use metadata_server::types::{
    Attr, DirEntry, Epoch, FileKind, FsError, InodeId, Lsn, NodeId, RequestId, StatFs, Timestamp,
    VolumeId,
};
use metadata_server::{MetadataStore, Submitted};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &[u8] = b"the cluster secret";
const VOLUME: VolumeId = VolumeId([0x11; 16]);

fn attr(ino: InodeId, kind: FileKind) -> Attr {
    Attr {
        ino,
        generation: 1,
        kind,
        perm: 0o755,
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

#[derive(Default)]
struct MemState {
    names: HashMap<(InodeId, Vec<u8>), InodeId>,
    next_ino: u64,
    /// Answers by (node, request): the duplicate-request cache.
    drc: HashMap<(NodeId, RequestId), Result<Response, FsError>>,
    /// How many times each (node, request) really ran.
    executed: HashMap<(NodeId, RequestId), u32>,
    /// Every call to `execute`, in order.
    calls: Vec<(NodeId, RequestId)>,
    gone: Vec<NodeId>,
    /// Unlinked files are held until `reap_orphans` (a coordinator that took over).
    orphan_grace: bool,
    /// Nodes whose `Reopen` ran.
    reopened: HashSet<NodeId>,
    /// When `reap_orphans` ran.
    reaped: Option<Instant>,
}

/// An in-memory namespace (one level is enough here) with a duplicate-request cache.
#[derive(Default)]
struct MemStore {
    st: Mutex<MemState>,
    delay_ms: AtomicU64,
    running: AtomicU64,
    /// How long a journal wait takes (a group commit), in milliseconds.
    journal_delay_ms: AtomicU64,
    /// Requests submitted since the last journal wait; the most seen at one wait.
    unsynced: AtomicU64,
    max_group: AtomicU64,
    last_lsn: AtomicU64,
    /// `awaiting_reopen` panics (a store bug the orphan reap must survive).
    awaiting_panics: AtomicBool,
    /// Set: the store is fenced and refuses everything, as the real one does.
    fenced: Mutex<Option<String>>,
}

impl MemStore {
    fn executed(&self, node: NodeId, id: RequestId) -> u32 {
        self.st
            .lock()
            .unwrap()
            .executed
            .get(&(node, id))
            .copied()
            .unwrap_or(0)
    }
    fn calls_of(&self, node: NodeId, id: RequestId) -> usize {
        let st = self.st.lock().unwrap();
        st.calls.iter().filter(|c| **c == (node, id)).count()
    }
}

impl MetadataStore for MemStore {
    fn submit_as(&self, caller: &Caller, req: &Request, _version: u32) -> Submitted {
        let result = self.execute(caller, req);
        self.unsynced.fetch_add(1, Ordering::SeqCst);
        Submitted {
            result,
            lsn: Lsn(self.last_lsn.fetch_add(1, Ordering::SeqCst) + 1),
        }
    }

    fn wait_durable(&self, _lsn: Lsn) -> Result<(), FsError> {
        let group = self.unsynced.swap(0, Ordering::SeqCst);
        self.max_group.fetch_max(group, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(
            self.journal_delay_ms.load(Ordering::SeqCst),
        ));
        Ok(())
    }

    fn fenced(&self) -> Option<String> {
        self.fenced.lock().unwrap().clone()
    }

    fn execute(&self, caller: &Caller, req: &Request) -> Result<Response, FsError> {
        if let Some(why) = self.fenced() {
            return Err(FsError::Io(format!("store {why}")));
        }
        self.running.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let key = (caller.node, caller.request);
        let mut st = self.st.lock().unwrap();
        st.calls.push(key);
        self.running.fetch_sub(1, Ordering::SeqCst);
        if let Some(r) = st.drc.get(&key) {
            return r.clone();
        }
        *st.executed.entry(key).or_insert(0) += 1;
        let r = match req {
            Request::Lookup { parent, name } => st
                .names
                .get(&(*parent, name.clone()))
                .map(|i| Response::Attr(attr(*i, FileKind::File)))
                .ok_or(FsError::NotFound),
            Request::GetAttr { ino } => Ok(Response::Attr(attr(*ino, FileKind::Dir))),
            Request::Create {
                parent,
                name,
                exclusive,
                ..
            } => {
                if let Some(i) = st.names.get(&(*parent, name.clone())) {
                    if *exclusive {
                        Err(FsError::Exists)
                    } else {
                        Ok(Response::Attr(attr(*i, FileKind::File)))
                    }
                } else {
                    st.next_ino += 1;
                    let ino = InodeId(st.next_ino + 100);
                    st.names.insert((*parent, name.clone()), ino);
                    Ok(Response::Attr(attr(ino, FileKind::File)))
                }
            }
            Request::Unlink { parent, name } => st
                .names
                .remove(&(*parent, name.clone()))
                .map(|_| Response::Done)
                .ok_or(FsError::NotFound),
            Request::ReadDir { ino, .. } => {
                let mut v: Vec<(DirEntry, Option<Attr>)> = st
                    .names
                    .iter()
                    .filter(|((p, _), _)| p == ino)
                    .map(|((_, n), i)| {
                        (
                            DirEntry {
                                name: n.clone(),
                                ino: *i,
                                kind: FileKind::File,
                                cookie: i.0,
                            },
                            Some(attr(*i, FileKind::File)),
                        )
                    })
                    .collect();
                v.sort_by_key(|e| e.0.cookie);
                Ok(Response::Entries(v))
            }
            Request::StatFs => Ok(Response::StatFs(StatFs {
                cluster_size_bytes: 1 << 20,
                total_clusters: 100,
                free_clusters: 50,
                total_inodes: 10,
                free_inodes: 5,
                max_name_bytes: 255,
            })),
            Request::GetXattr { .. } => Ok(Response::Bytes(vec![7; 100])),
            Request::Reopen { .. } => {
                st.reopened.insert(caller.node);
                Ok(Response::Done)
            }
            _ => Err(FsError::Invalid("not in the test store".into())),
        };
        if req_is_mutation(req) {
            st.drc.insert(key, r.clone());
        }
        r
    }

    fn changed_attrs(&self, req: &Request) -> Vec<Attr> {
        match req {
            Request::Create { parent, .. } => vec![attr(*parent, FileKind::Dir)],
            _ => Vec::new(),
        }
    }

    fn node_gone(&self, node: NodeId) -> Result<(), FsError> {
        self.st.lock().unwrap().gone.push(node);
        Ok(())
    }

    fn awaiting_reopen(&self, nodes: &[NodeId]) -> Vec<NodeId> {
        assert!(
            !self.awaiting_panics.load(Ordering::SeqCst),
            "awaiting_reopen fails as asked"
        );
        let st = self.st.lock().unwrap();
        if !st.orphan_grace {
            return Vec::new();
        }
        let waiting = nodes.iter().filter(|n| !st.reopened.contains(n));
        waiting.copied().collect()
    }

    fn reap_orphans(&self) -> Result<u64, FsError> {
        let mut st = self.st.lock().unwrap();
        st.orphan_grace = false;
        st.reaped = Some(Instant::now());
        Ok(0)
    }
}

fn req_is_mutation(req: &Request) -> bool {
    matches!(req, Request::Create { .. } | Request::Unlink { .. })
}

fn server_cfg(addr: SocketAddr) -> ServerConfig {
    ServerConfig {
        invalidation_timeout_ms: 500,
        node_grace_ms: 300,
        ..ServerConfig::new(addr, SECRET.to_vec(), VOLUME, Epoch(3))
    }
}

#[test]
fn a_detached_call_is_resent_across_a_restart_and_answered_once() {
    // The coordinator journals the create but dies before it answers; nobody waits.
    let (store, srv, c) = connected_with_slow_store();
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    c.call_detached(0, 0, create(b"x"), Box::new(move |r| tx.send(r).unwrap()));
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "call_detached waited"
    );
    let srv = restart_while_running(&store, srv);
    let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(matches!(r, Ok(Response::Attr(_))), "{r:?}");
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the continuation ran twice"
    );
    last_call_ran_once(&store);

    // A closed client fails a detached call at once, on the calling thread.
    c.close();
    let (tx, rx) = std::sync::mpsc::channel();
    c.call_detached(0, 0, lookup(b"x"), Box::new(move |r| tx.send(r).unwrap()));
    let r = rx.try_recv().unwrap();
    assert!(
        matches!(&r, Err(FsError::Io(m)) if m.contains("closed")),
        "{r:?}"
    );
    drop(srv);
}

/// A coordinator and node 1 connected to it (one call done), with the store then taking
/// 400 ms per call.
fn connected_with_slow_store() -> (Arc<MemStore>, ServerHandle, Arc<MetadataClient>) {
    connected_with_slow_store_via(None)
}

/// [`connected_with_slow_store`], with node 1 on a local session when `local` is given (it
/// is pointed at the new server).
fn connected_with_slow_store_via(
    local: Option<&Arc<LocalCoordinator>>,
) -> (Arc<MemStore>, ServerHandle, Arc<MetadataClient>) {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let (c, _) = match local {
        Some(lc) => {
            lc.set(Some(srv.local()));
            connect_local(1, srv.local_addr(), lc)
        }
        None => connect(1, srv.local_addr()),
    };
    c.call(0, 0, create(b"warm")).unwrap();
    store.delay_ms.store(400, Ordering::SeqCst);
    (store, srv, c)
}

/// The last request that reached the store reached it more than once (sent, then resent
/// after a restart) and ran once.
fn last_call_ran_once(store: &MemStore) {
    let st = store.st.lock().unwrap();
    let (node, id) = st.calls.last().copied().unwrap();
    drop(st);
    assert!(store.calls_of(node, id) >= 2);
    assert_eq!(store.executed(node, id), 1);
}

/// Once the store runs a call: stops `srv` before it answers, and starts a new server on
/// the same address with the store's delay cleared.
fn restart_while_running(store: &Arc<MemStore>, srv: ServerHandle) -> ServerHandle {
    let addr = srv.local_addr();
    wait_until(
        "the store to start the call",
        Duration::from_secs(2),
        || store.running.load(Ordering::SeqCst) > 0,
    );
    srv.shutdown();
    store.delay_ms.store(0, Ordering::SeqCst);
    let s: Arc<dyn MetadataStore> = store.clone();
    Server::start(s, server_cfg(addr)).unwrap()
}

/// Restarts the coordinator as one that took over: it holds orphans for a grace of
/// `grace_ms`. Waits until node `c` has resumed its session there; returns the new
/// server and when it started.
fn take_over(
    store: &Arc<MemStore>,
    srv: ServerHandle,
    c: &MetadataClient,
    grace_ms: u64,
) -> (ServerHandle, Instant) {
    let addr = srv.local_addr();
    let sessions = c.sessions();
    srv.shutdown();
    {
        let mut st = store.st.lock().unwrap();
        st.orphan_grace = true;
        st.reopened.clear();
        st.reaped = None;
    }
    let s: Arc<dyn MetadataStore> = store.clone();
    let cfg = ServerConfig {
        node_grace_ms: grace_ms,
        ..server_cfg(addr)
    };
    let t0 = Instant::now();
    let srv = Server::start(s, cfg).unwrap();
    wait_until("the node to resume", Duration::from_secs(5), || {
        c.is_connected() && c.sessions() > sessions
    });
    (srv, t0)
}

#[test]
fn the_orphan_reap_waits_for_a_resumed_node_to_re_announce_up_to_a_second_grace() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let (c, _) = connect(1, srv.local_addr());
    c.call(0, 0, Request::StatFs).unwrap();

    // The node resumed but re-announces only after the grace: the reap waits for it.
    let (srv, t0) = take_over(&store, srv, &c, 2000);
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(t0.elapsed()));
    assert_eq!(
        store.st.lock().unwrap().reaped,
        None,
        "reaped before the node re-announced"
    );
    let announced = Instant::now();
    let reopen = Request::Reopen {
        epoch: c.epoch(),
        opens: Vec::new(),
    };
    c.call(0, 0, reopen).unwrap();
    wait_until("the reap", Duration::from_secs(5), || {
        store.st.lock().unwrap().reaped.is_some()
    });
    assert!(store.st.lock().unwrap().reaped.unwrap() >= announced);

    // A node that never re-announces holds the reap back one more grace at most.
    let (srv, t0) = take_over(&store, srv, &c, 300);
    reaped_no_sooner_than(&store, t0, Duration::from_millis(600));
    drop(srv);
}

#[test]
fn a_failing_reopen_check_holds_the_orphan_reap_for_the_second_grace() {
    let store = Arc::new(MemStore::default());
    store.awaiting_panics.store(true, Ordering::SeqCst);
    let srv = start(&store);
    let (c, _) = connect(1, srv.local_addr());
    c.call(0, 0, Request::StatFs).unwrap();
    // The node re-announces at once, but the check that would see it fails: not knowing
    // who re-announced must not free files that may still be open.
    let (srv, t0) = take_over(&store, srv, &c, 300);
    let reopen = Request::Reopen {
        epoch: c.epoch(),
        opens: Vec::new(),
    };
    c.call(0, 0, reopen).unwrap();
    reaped_no_sooner_than(&store, t0, Duration::from_millis(600));
    drop(srv);
}

/// Waits for the orphan reap and checks it came `at_least` after `t0` or later.
fn reaped_no_sooner_than(store: &MemStore, t0: Instant, at_least: Duration) {
    wait_until("the reap", Duration::from_secs(5), || {
        store.st.lock().unwrap().reaped.is_some()
    });
    let at = store.st.lock().unwrap().reaped.unwrap();
    assert!(at >= t0 + at_least, "reaped after {:?}", at - t0);
}

fn start(store: &Arc<MemStore>) -> ServerHandle {
    let s: Arc<dyn MetadataStore> = store.clone();
    Server::start(s, server_cfg("127.0.0.1:0".parse().unwrap())).unwrap()
}

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(Invalidation, Instant)>>,
    hold_ms: AtomicU64,
}

impl Recorder {
    /// What it has been told so far.
    fn invalidations(&self) -> Vec<Invalidation> {
        let seen = self.seen.lock().unwrap();
        seen.iter().map(|(i, _)| i.clone()).collect()
    }
}

impl InvalidationHandler for Recorder {
    fn invalidate(&self, inv: &Invalidation) {
        let hold = self.hold_ms.load(Ordering::SeqCst);
        if hold > 0 {
            std::thread::sleep(Duration::from_millis(hold));
        }
        self.seen
            .lock()
            .unwrap()
            .push((inv.clone(), Instant::now()));
    }
}

fn client_cfg(node: u32, addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        node: NodeId(node),
        secret: SECRET.to_vec(),
        volume: Some(VOLUME),
        locator: CoordinatorLocator::Fixed(addr),
        request_timeout_ms: 2000,
        local: None,
    }
}

fn connect(node: u32, addr: SocketAddr) -> (Arc<MetadataClient>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let c = MetadataClient::connect(client_cfg(node, addr), rec.clone()).unwrap();
    (c, rec)
}

fn create(name: &[u8]) -> Request {
    Request::Create {
        parent: InodeId::ROOT,
        name: name.to_vec(),
        kind: FileKind::File,
        perm: 0o644,
        rdev: 0,
        exclusive: true,
    }
}

fn lookup(name: &[u8]) -> Request {
    Request::Lookup {
        parent: InodeId::ROOT,
        name: name.to_vec(),
    }
}

/// Polls `f` until it is true or the deadline passes.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---- raw wire helpers -------------------------------------------------------------------

fn raw_send(s: &mut TcpStream, f: &Frame) {
    s.write_all(&encode_frame(f, MAX_FRAME_BYTES).unwrap())
        .unwrap();
}

fn raw_recv(s: &mut TcpStream) -> Option<Frame> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let mut p = vec![0u8; u32::from_le_bytes(h) as usize];
    s.read_exact(&mut p).ok()?;
    decode_frame(&p).ok()
}

/// True when the server closes the connection (EOF or reset) within the timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn hello(node: u32, min: u32, max: u32) -> ClientHello {
    ClientHello {
        version: max,
        min_version: min,
        node: NodeId(node),
        volume: Some(VOLUME),
        epoch: Epoch(0),
        resumed: false,
        nonce: [9; NONCE_BYTES],
    }
}

/// Runs a handshake by hand with `secret`; returns the socket and the server's hello, or
/// the frame that refused it.
fn raw_handshake(
    addr: SocketAddr,
    h: ClientHello,
    secret: &[u8],
) -> (TcpStream, Result<u32, Frame>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    raw_send(&mut s, &Frame::ClientHello(h.clone()));
    let sh = match raw_recv(&mut s) {
        Some(Frame::ServerHello(sh)) => sh,
        Some(other) => return (s, Err(other)),
        None => return (s, Err(Frame::Invalid)),
    };
    let t = Transcript::new(&h, sh.version, sh.volume, sh.epoch, sh.nonce);
    raw_send(
        &mut s,
        &Frame::ClientAuth {
            proof: Some(t.client_proof(secret)),
        },
    );
    match raw_recv(&mut s) {
        Some(Frame::AuthOk) => (s, Ok(sh.version)),
        Some(other) => (s, Err(other)),
        None => (s, Err(Frame::Invalid)),
    }
}

// ---- tests ------------------------------------------------------------------------------

#[test]
fn authenticated_calls_work() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let (c, _) = connect(1, srv.local_addr());
    assert_eq!(c.node(), NodeId(1));
    assert_eq!(c.epoch(), Epoch(3));
    assert_eq!(c.coordinator_addr(), srv.local_addr());
    let r = c.call(1000, 1000, create(b"a")).unwrap();
    let Response::Attr(a) = r else {
        panic!("create answered {r:?}")
    };
    assert!(matches!(c.call(0, 0, lookup(b"a")), Ok(Response::Attr(b)) if b.ino == a.ino));
    assert!(matches!(
        c.call(0, 0, lookup(b"missing")),
        Err(FsError::NotFound)
    ));
    assert!(matches!(c.call(0, 0, create(b"a")), Err(FsError::Exists)));
    assert_eq!(srv.connected_nodes(), vec![NodeId(1)]);
}

#[test]
fn client_with_wrong_secret_is_refused() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let mut cfg = client_cfg(1, srv.local_addr());
    cfg.secret = b"not the secret".to_vec();
    let err = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap_err();
    assert!(
        matches!(err, ConnectError::SecretMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("cluster secret"), "{err}");
    // The server side: a proof made with the wrong secret gets AuthRefused, then close.
    let (mut s, r) = raw_handshake(srv.local_addr(), hello(2, 1, 2), b"not the secret");
    assert!(
        matches!(&r, Err(Frame::AuthRefused { reason }) if reason.contains("secret")),
        "{r:?}"
    );
    assert!(closed_by_server(&mut s));
    assert!(srv.connected_nodes().is_empty());
    // And a client that does not get the server's proof right refuses the server.
    let other = Server::start(
        store.clone(),
        ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            b"impostor".to_vec(),
            VOLUME,
            Epoch(3),
        ),
    )
    .unwrap();
    let err = MetadataClient::connect(
        client_cfg(1, other.local_addr()),
        Arc::new(Recorder::default()),
    )
    .unwrap_err();
    assert!(
        matches!(err, ConnectError::SecretMismatch { .. }),
        "{err:?}"
    );
    assert!(other.connected_nodes().is_empty());
}

#[test]
fn wrong_volume_and_stale_epoch_are_refused() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let mut cfg = client_cfg(1, srv.local_addr());
    cfg.volume = Some(VolumeId([0x22; 16]));
    let err = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap_err();
    assert!(
        matches!(&err, ConnectError::Refused { reason, .. } if reason.contains("wrong volume")),
        "{err:?}"
    );
    let mut h = hello(1, 1, 2);
    h.epoch = Epoch(4);
    let (_s, r) = raw_handshake(srv.local_addr(), h, SECRET);
    assert!(
        matches!(&r, Err(Frame::HelloRefused { reason }) if reason.contains("stale")),
        "{r:?}"
    );
}

#[test]
fn current_and_previous_versions_are_accepted_others_refused() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let addr = srv.local_addr();
    assert!(matches!(
        raw_handshake(addr, hello(1, 1, 3), SECRET).1,
        Ok(3)
    ));
    assert!(matches!(
        raw_handshake(addr, hello(7, 1, 2), SECRET).1,
        Ok(2)
    ));
    assert!(matches!(
        raw_handshake(addr, hello(2, 1, 1), SECRET).1,
        Ok(1)
    ));
    // A newer node that still speaks 4 gets 4.
    assert!(matches!(
        raw_handshake(addr, hello(3, 2, 5), SECRET).1,
        Ok(4)
    ));
    // Too new only, or too old.
    assert!(matches!(
        raw_handshake(addr, hello(4, 5, 5), SECRET).1,
        Err(Frame::HelloRefused { .. })
    ));
    assert!(matches!(
        raw_handshake(addr, hello(5, 0, 0), SECRET).1,
        Err(Frame::HelloRefused { .. })
    ));
    // A version-1 session works for requests.
    let (mut s, v) = raw_handshake(addr, hello(6, 1, 1), SECRET);
    assert!(matches!(v, Ok(1)));
    let caller = Caller {
        node: NodeId(6),
        request: RequestId(77),
        uid: 0,
        gid: 0,
    };
    raw_send(
        &mut s,
        &Frame::Request {
            id: RequestId(77),
            caller,
            req: Request::StatFs,
        },
    );
    assert!(matches!(
        raw_recv(&mut s),
        Some(Frame::Reply {
            id: RequestId(77),
            result: Ok(Response::StatFs(_))
        })
    ));
}

#[test]
fn bad_frames_close_only_their_connection() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let addr = srv.local_addr();
    let (good, _) = connect(1, addr);
    good.call(0, 0, create(b"before")).unwrap();

    // Garbage instead of a hello.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[5, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0x01])
        .unwrap();
    assert!(closed_by_server(&mut s), "malformed hello");

    // A length prefix far over the limit.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    assert!(closed_by_server(&mut s), "oversized frame");

    // A request before authenticating.
    let mut s = TcpStream::connect(addr).unwrap();
    raw_send(
        &mut s,
        &Frame::Request {
            id: RequestId(1),
            caller: Caller {
                node: NodeId(9),
                request: RequestId(1),
                uid: 0,
                gid: 0,
            },
            req: Request::StatFs,
        },
    );
    assert!(closed_by_server(&mut s), "unauthenticated request");

    // Authenticated, then garbage; then an oversized frame on another session.
    let (mut s, v) = raw_handshake(addr, hello(7, 1, 2), SECRET);
    assert!(v.is_ok());
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    assert!(closed_by_server(&mut s), "malformed frame after auth");
    let (mut s, v) = raw_handshake(addr, hello(8, 1, 2), SECRET);
    assert!(v.is_ok());
    s.write_all(&(MAX_FRAME_BYTES + 1).to_le_bytes()).unwrap();
    assert!(closed_by_server(&mut s), "oversized frame after auth");

    // A request that claims another node's identity.
    let (mut s, v) = raw_handshake(addr, hello(10, 1, 2), SECRET);
    assert!(v.is_ok());
    raw_send(
        &mut s,
        &Frame::Request {
            id: RequestId(1),
            caller: Caller {
                node: NodeId(1),
                request: RequestId(1),
                uid: 0,
                gid: 0,
            },
            req: Request::StatFs,
        },
    );
    assert!(closed_by_server(&mut s), "spoofed caller");

    // The good client never noticed.
    assert!(good.is_connected());
    good.call(0, 0, create(b"after")).unwrap();
    assert!(matches!(
        good.call(0, 0, lookup(b"before")),
        Ok(Response::Attr(_))
    ));
}

#[test]
fn sixty_four_concurrent_calls_from_eight_threads_share_one_connection() {
    let store = Arc::new(MemStore::default());
    store.journal_delay_ms.store(100, Ordering::SeqCst);
    let srv = start(&store);
    let (c, _) = connect(1, srv.local_addr());
    let t0 = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                let handles: Vec<_> = (0..8)
                    .map(|i| {
                        let c = c.clone();
                        std::thread::spawn(move || {
                            let name = format!("f-{t}-{i}");
                            c.call(0, 0, create(name.as_bytes()))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut inos = std::collections::HashSet::new();
    for t in threads {
        for r in t.join().unwrap() {
            let Ok(Response::Attr(a)) = r else {
                panic!("{r:?}")
            };
            assert!(inos.insert(a.ino));
        }
    }
    let elapsed = t0.elapsed();
    assert_eq!(inos.len(), 64);
    // With a journal wait each this is 6.4 s; pipelined on one connection and run in
    // batches with one journal wait each, it is a few rounds.
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert!(store.max_group.load(Ordering::SeqCst) >= 16);
}

#[test]
fn restart_resends_with_the_same_request_id_and_runs_once() {
    restart_resends_and_runs_once(None);
    // The same for a local session (the node that hosts the coordinator). A reconnect that
    // comes before the new coordinator is published goes over TCP: either way it runs once.
    restart_resends_and_runs_once(Some(LocalCoordinator::new()));
}

fn restart_resends_and_runs_once(local: Option<Arc<LocalCoordinator>>) {
    // The next create is journaled by the store but the coordinator dies before replying.
    let (store, srv, c) = connected_with_slow_store_via(local.as_ref());
    assert_eq!(c.is_local(), local.is_some());
    let c2 = c.clone();
    let call = std::thread::spawn(move || c2.call(0, 0, create(b"x")));
    let srv = restart_while_running(&store, srv);
    if let Some(lc) = &local {
        lc.set(Some(srv.local()));
    }
    let r = call.join().unwrap();
    assert!(matches!(r, Ok(Response::Attr(_))), "{r:?}");
    // The create's request id reached the store more than once (the original, then the
    // resend; one more if the resend caught the old server while it stopped) and ran once.
    last_call_ran_once(&store);
    let st = store.st.lock().unwrap();
    let distinct: HashSet<_> = st.calls.iter().collect();
    assert_eq!(
        distinct.len(),
        2,
        "only the warm-up and the create: {:?}",
        st.calls
    );
    drop(st);
    assert!(c.is_connected());
    // At least one reconnect (one more if it caught the old server while it stopped).
    assert!(c.sessions() >= 2);
    assert!(matches!(c.call(0, 0, lookup(b"x")), Ok(Response::Attr(_))));
    drop(srv);
}

#[test]
fn invalidations_reach_other_nodes_and_are_acked_before_the_change_is() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let (a, rec_a) = connect(1, srv.local_addr());
    let (b, rec_b) = connect(2, srv.local_addr());
    // B caches a negative entry for "f" and the root directory's attributes.
    assert!(matches!(b.call(0, 0, lookup(b"f")), Err(FsError::NotFound)));
    b.call(0, 0, Request::GetAttr { ino: InodeId::ROOT })
        .unwrap();
    rec_b.hold_ms.store(200, Ordering::SeqCst);
    let t0 = Instant::now();
    let Ok(Response::Attr(f)) = a.call(0, 0, create(b"f")) else {
        panic!("create failed")
    };
    let acked = Instant::now();
    let seen = rec_b.seen.lock().unwrap().clone();
    let dir = seen
        .iter()
        .find(|(i, _)| matches!(i, Invalidation::Inode { ino } if *ino == InodeId::ROOT));
    let Some((_, d_at)) = dir else {
        panic!("B saw {seen:?}")
    };
    assert!(*d_at <= acked, "acked before B handled it");
    // B knew "f" only as missing: the directory's invalidation covers that, no entry one.
    assert!(
        !seen
            .iter()
            .any(|(i, _)| matches!(i, Invalidation::Entry { .. })),
        "B saw {seen:?}"
    );
    assert!(acked - t0 >= Duration::from_millis(200));
    assert!(rec_a.seen.lock().unwrap().is_empty(), "not the originator");

    // B now caches f; A unlinks it: B is told about the entry and the inode.
    rec_b.hold_ms.store(0, Ordering::SeqCst);
    rec_b.seen.lock().unwrap().clear();
    assert!(matches!(b.call(0, 0, lookup(b"f")), Ok(Response::Attr(x)) if x.ino == f.ino));
    a.call(
        0,
        0,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
        },
    )
    .unwrap();
    let seen = rec_b.invalidations();
    assert!(
        seen.contains(&Invalidation::Inode { ino: f.ino }),
        "{seen:?}"
    );
    assert!(seen.contains(&Invalidation::Entry {
        parent: InodeId::ROOT,
        name: b"f".to_vec()
    }));

    // Nothing cached by B any more about "g": A's create of g sends B only the dir inode
    // if B cached it again; B has not, so nothing at all.
    rec_b.seen.lock().unwrap().clear();
    a.call(0, 0, create(b"g")).unwrap();
    assert!(rec_b.seen.lock().unwrap().is_empty());
}

#[test]
fn an_unresponsive_node_delays_a_change_only_up_to_the_timeout() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let (a, _) = connect(1, srv.local_addr());
    let (b, rec_b) = connect(2, srv.local_addr());
    b.call(0, 0, lookup(b"slow")).unwrap_err();
    rec_b.hold_ms.store(3000, Ordering::SeqCst);
    let t0 = Instant::now();
    a.call(0, 0, create(b"slow")).unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

fn gone_count(store: &MemStore, node: u32) -> usize {
    let st = store.st.lock().unwrap();
    st.gone.iter().filter(|n| **n == NodeId(node)).count()
}

#[test]
fn a_node_that_does_not_come_back_is_gone() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    // A fresh mount releases what a previous mount of the node held, before it is served.
    let (a, _) = connect(1, srv.local_addr());
    a.call(0, 0, Request::StatFs).unwrap();
    assert_eq!(gone_count(&store, 1), 1);
    drop(a);
    wait_until(
        "node_gone(1) after the grace period",
        Duration::from_secs(3),
        || gone_count(&store, 1) == 2,
    );
    // A node that reconnects (a resumed session) within the grace period is not gone.
    let (first, v) = raw_handshake(
        srv.local_addr(),
        ClientHello {
            resumed: true,
            ..hello(2, 1, 2)
        },
        SECRET,
    );
    assert!(v.is_ok());
    drop(first);
    std::thread::sleep(Duration::from_millis(100));
    let (_again, v) = raw_handshake(
        srv.local_addr(),
        ClientHello {
            resumed: true,
            ..hello(2, 1, 2)
        },
        SECRET,
    );
    assert!(v.is_ok());
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(gone_count(&store, 2), 0);
}

#[test]
fn nodes_holding_opens_at_start_are_gone_unless_they_come_back() {
    let store = Arc::new(MemStore::default());
    let s: Arc<dyn MetadataStore> = store.clone();
    let srv = Server::start(
        s,
        ServerConfig {
            nodes_with_opens: vec![NodeId(4), NodeId(5)],
            ..server_cfg("127.0.0.1:0".parse().unwrap())
        },
    )
    .unwrap();
    // Node 5 comes back (a resumed session after the failover); node 4 never does.
    let (_s5, v) = raw_handshake(
        srv.local_addr(),
        ClientHello {
            resumed: true,
            ..hello(5, 1, 2)
        },
        SECRET,
    );
    assert!(v.is_ok());
    wait_until("node_gone(4)", Duration::from_secs(3), || {
        gone_count(&store, 4) == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gone_count(&store, 5), 0);
}

#[test]
fn unreachable_coordinator_gives_typed_errors() {
    // Nothing listens on this port (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = client_cfg(1, port);
    cfg.request_timeout_ms = 300;
    let t0 = Instant::now();
    let err = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap_err();
    assert!(matches!(err, ConnectError::Unreachable { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let mut cfg = client_cfg(1, srv.local_addr());
    cfg.request_timeout_ms = 400;
    let c = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap();
    c.call(0, 0, Request::StatFs).unwrap();
    srv.shutdown();
    let t0 = Instant::now();
    let r = c.call(0, 0, Request::StatFs);
    assert!(
        matches!(&r, Err(FsError::Io(m)) if m.contains("coordinator unreachable")),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_restarted_coordinator_tells_reconnecting_nodes_to_drop_everything() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let addr = srv.local_addr();
    let (c, rec) = connect(1, addr);
    c.call(0, 0, Request::StatFs).unwrap();
    srv.shutdown();
    let s: Arc<dyn MetadataStore> = store.clone();
    let _srv = Server::start(s, server_cfg(addr)).unwrap();
    c.call(0, 0, Request::StatFs).unwrap();
    wait_until("Invalidation::All", Duration::from_secs(2), || {
        rec.seen
            .lock()
            .unwrap()
            .iter()
            .any(|(i, _)| *i == Invalidation::All)
    });
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn lease_locator_finds_the_coordinator_and_follows_it_when_it_moves() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
    let opts = MkfsOptions {
        max_nodes: 8,
        ..MkfsOptions::default()
    };
    mkfs(dev.clone(), &opts, &mut |_, _| {}).unwrap();
    let volume = Superblock::read(dev.as_ref()).unwrap().superblock.volume;
    let store = Arc::new(MemStore::default());

    let addr1 = free_addr();
    let role = lease::acquire_or_find(&dev, NodeId(1), addr1, 200).unwrap();
    assert_eq!(role, LeaseRole::Coordinator { epoch: Epoch(1) });
    let keeper = LeaseKeeper::start(dev.clone(), NodeId(1), Epoch(1), 50).unwrap();
    let srv1 = Server::start(
        store.clone(),
        ServerConfig::new(addr1, SECRET.to_vec(), volume, Epoch(1)),
    )
    .unwrap();

    let cfg = ClientConfig {
        node: NodeId(3),
        secret: SECRET.to_vec(),
        volume: None,
        locator: CoordinatorLocator::Lease(dev.clone()),
        request_timeout_ms: 3000,
        local: None,
    };
    let c = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap();
    assert_eq!(c.coordinator_addr(), addr1);
    assert_eq!(c.epoch(), Epoch(1));
    assert_eq!(c.volume(), Some(volume));
    c.call(0, 0, Request::StatFs).unwrap();

    // The coordinator hands over: node 2 takes the lease at another address, epoch 2.
    keeper.release().unwrap();
    srv1.shutdown();
    let addr2 = free_addr();
    let role = lease::acquire_or_find(&dev, NodeId(2), addr2, 200).unwrap();
    assert_eq!(role, LeaseRole::Coordinator { epoch: Epoch(2) });
    let _srv2 = Server::start(
        store.clone(),
        ServerConfig::new(addr2, SECRET.to_vec(), volume, Epoch(2)),
    )
    .unwrap();
    c.call(0, 0, Request::StatFs).unwrap();
    assert_eq!(c.coordinator_addr(), addr2);
    assert_eq!(c.epoch(), Epoch(2));

    // A stale coordinator (epoch 1) is refused by the node that has seen epoch 2.
    let stale = Server::start(
        store.clone(),
        ServerConfig::new(free_addr(), SECRET.to_vec(), volume, Epoch(1)),
    )
    .unwrap();
    let (mut s, r) = raw_handshake(
        stale.local_addr(),
        ClientHello {
            epoch: Epoch(2),
            volume: None,
            ..hello(3, 1, 2)
        },
        SECRET,
    );
    assert!(
        matches!(&r, Err(Frame::HelloRefused { reason }) if reason.contains("stale")),
        "{r:?}"
    );
    assert!(closed_by_server(&mut s));
}

#[test]
fn a_second_session_of_the_same_node_replaces_the_first() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let (mut first, v) = raw_handshake(srv.local_addr(), hello(5, 1, 2), SECRET);
    assert!(v.is_ok());
    let (_second, v) = raw_handshake(srv.local_addr(), hello(5, 1, 2), SECRET);
    assert!(v.is_ok());
    assert!(closed_by_server(&mut first));
    assert_eq!(srv.connected_nodes(), vec![NodeId(5)]);
}

#[test]
fn a_silent_session_is_closed_after_the_idle_timeout() {
    let store = Arc::new(MemStore::default());
    let s: Arc<dyn MetadataStore> = store.clone();
    let srv = Server::start(
        s,
        ServerConfig {
            idle_timeout_ms: 800,
            ..server_cfg("127.0.0.1:0".parse().unwrap())
        },
    )
    .unwrap();
    let (mut raw, v) = raw_handshake(srv.local_addr(), hello(4, 1, 2), SECRET);
    assert!(v.is_ok());
    let t0 = Instant::now();
    assert!(closed_by_server(&mut raw));
    assert!(t0.elapsed() >= Duration::from_millis(700));
    // A real client pings (every 100 ms with this timeout), so it stays connected.
    let mut cfg = client_cfg(1, srv.local_addr());
    cfg.request_timeout_ms = 400;
    let c = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    assert!(c.is_connected());
    assert_eq!(c.sessions(), 1, "the session was closed and re-opened");
    assert_eq!(srv.connected_nodes(), vec![NodeId(1)]);
}

#[test]
fn a_version_1_session_gets_no_invalidations() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let (a, _) = connect(1, srv.local_addr());
    let (mut old, v) = raw_handshake(srv.local_addr(), hello(6, 1, 1), SECRET);
    assert!(matches!(v, Ok(1)));
    raw_send(
        &mut old,
        &Frame::Request {
            id: RequestId(1),
            caller: Caller {
                node: NodeId(6),
                request: RequestId(1),
                uid: 0,
                gid: 0,
            },
            req: lookup(b"v1"),
        },
    );
    assert!(matches!(
        raw_recv(&mut old),
        Some(Frame::Reply {
            result: Err(FsError::NotFound),
            ..
        })
    ));
    let t0 = Instant::now();
    a.call(0, 0, create(b"v1")).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "no ack to wait for"
    );
    old.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(raw_recv(&mut old).is_none(), "a v1 node got a frame");
}

#[test]
fn server_and_client_start_from_inside_another_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(MemStore::default());
    rt.block_on(async {
        let srv = start(&store);
        let (c, _) = connect(1, srv.local_addr());
        c.call(0, 0, Request::StatFs).unwrap();
        drop(c);
        drop(srv);
    });
}

/// A TCP proxy whose existing connections can be made to swallow everything (a
/// blackholed link: no error, no data); new connections forward normally.
struct Proxy {
    addr: SocketAddr,
    blackhole: Arc<std::sync::atomic::AtomicBool>,
}

fn proxy(target: SocketAddr) -> Proxy {
    use std::sync::atomic::AtomicBool;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let blackhole = Arc::new(AtomicBool::new(false));
    let bh = blackhole.clone();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { return };
            let Ok(outbound) = TcpStream::connect(target) else {
                continue;
            };
            // This connection is cut when the blackhole is switched on after it started.
            let cut = Arc::new(AtomicBool::new(false));
            bh.store(false, Ordering::SeqCst);
            let (bh1, cut1) = (bh.clone(), cut.clone());
            let pump = move |mut from: TcpStream,
                             mut to: TcpStream,
                             bh: Arc<AtomicBool>,
                             cut: Arc<AtomicBool>| {
                let mut buf = [0u8; 65536];
                loop {
                    let Ok(n) = from.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    if bh.load(Ordering::SeqCst) {
                        cut.store(true, Ordering::SeqCst);
                    }
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            };
            let (i2, o2) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            std::thread::spawn(move || pump(inbound, outbound, bh1, cut1));
            let (bh2, cut2) = (bh.clone(), cut);
            std::thread::spawn(move || pump(o2, i2, bh2, cut2));
        }
    });
    Proxy { addr, blackhole }
}

#[test]
fn a_silent_link_is_detected_and_the_request_resent() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let p = proxy(srv.local_addr());
    let mut cfg = client_cfg(1, p.addr);
    cfg.request_timeout_ms = 1000;
    let c = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap();
    c.call(0, 0, Request::StatFs).unwrap();
    p.blackhole.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let r = c.call(0, 0, create(b"through the hole"));
    assert!(matches!(r, Ok(Response::Attr(_))), "{r:?}");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(c.sessions(), 2);
}

#[test]
fn many_nodes_mutating_shared_names_never_wait_out_an_ack() {
    let store = Arc::new(MemStore::default());
    let s: Arc<dyn MetadataStore> = store.clone();
    let srv = Server::start(
        s,
        ServerConfig {
            invalidation_timeout_ms: 3000,
            ..server_cfg("127.0.0.1:0".parse().unwrap())
        },
    )
    .unwrap();
    let nodes: Vec<_> = (1..=4).map(|n| connect(n, srv.local_addr())).collect();
    let threads: Vec<_> = nodes
        .iter()
        .zip(0u64..)
        .flat_map(|((c, _), n)| {
            (0..4u64).map(move |t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut worst = Duration::ZERO;
                    for k in 0..150u64 {
                        let name = format!("shared-{}", (k * 7 + t + n) % 12);
                        let req = match k % 3 {
                            0 => lookup(name.as_bytes()),
                            1 => create(name.as_bytes()),
                            _ => Request::Unlink {
                                parent: InodeId::ROOT,
                                name: name.into_bytes(),
                            },
                        };
                        let s = Instant::now();
                        let r = c.call(0, 0, req);
                        worst = worst.max(s.elapsed());
                        assert!(!matches!(r, Err(FsError::Io(_))), "transport error: {r:?}");
                    }
                    worst
                })
            })
        })
        .collect();
    let worst = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .max()
        .unwrap();
    // An ack that never came would hold a call for the full 3 s.
    assert!(
        worst < Duration::from_millis(2500),
        "slowest call {worst:?}"
    );
    let seen: usize = nodes
        .iter()
        .map(|(_, r)| r.seen.lock().unwrap().len())
        .sum();
    assert!(seen > 0, "nobody was ever invalidated");
}

/// Sends `req` on a raw session and returns the reply's result.
fn raw_call(s: &mut TcpStream, node: u32, id: u64, req: Request) -> Result<Response, FsError> {
    let caller = Caller {
        node: NodeId(node),
        request: RequestId(id),
        uid: 0,
        gid: 0,
    };
    raw_send(
        s,
        &Frame::Request {
            id: RequestId(id),
            caller,
            req,
        },
    );
    match raw_recv(s) {
        Some(Frame::Reply { id: got, result }) if got == RequestId(id) => result,
        other => panic!("expected the reply to {id}, got {other:?}"),
    }
}

#[test]
fn namespace_changes_carry_directory_attributes_from_version_4_only() {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let addr = srv.local_addr();
    let (mut v4, v) = raw_handshake(addr, hello(1, 1, 4), SECRET);
    assert!(matches!(v, Ok(4)));
    match raw_call(&mut v4, 1, 10, create(b"four")) {
        Ok(Response::WithAttrs { answer, attrs }) => {
            assert!(matches!(*answer, Response::Attr(_)));
            assert_eq!(attrs, vec![attr(InodeId::ROOT, FileKind::Dir)]);
        }
        other => panic!("version 4 create answered {other:?}"),
    }
    // Reads carry nothing extra.
    assert!(matches!(
        raw_call(&mut v4, 1, 11, lookup(b"four")),
        Ok(Response::Attr(_))
    ));
    let (mut v3, v) = raw_handshake(addr, hello(2, 1, 3), SECRET);
    assert!(matches!(v, Ok(3)));
    assert!(matches!(
        raw_call(&mut v3, 2, 20, create(b"three")),
        Ok(Response::Attr(_))
    ));
    // The client stub hands plain answers to callers that do not cache.
    let (client, _) = connect(3, addr);
    assert!(matches!(
        client.call(0, 0, create(b"stub")),
        Ok(Response::Attr(_))
    ));
    let (stamped, _) = client.call_stamped(0, 0, create(b"stamped"));
    assert!(matches!(stamped, Ok(Response::WithAttrs { .. })));
}

// ----- local sessions: the node that hosts the coordinator, without a socket -----

/// A coordinator, published for local sessions as a hosting process does.
fn start_hosted() -> (Arc<MemStore>, ServerHandle, Arc<LocalCoordinator>) {
    let store = Arc::new(MemStore::default());
    let srv = start(&store);
    let lc = LocalCoordinator::new();
    lc.set(Some(srv.local()));
    (store, srv, lc)
}

/// Node `node` of the process that hosts `lc`'s coordinator.
fn connect_local(
    node: u32,
    addr: SocketAddr,
    lc: &Arc<LocalCoordinator>,
) -> (Arc<MetadataClient>, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let cfg = ClientConfig {
        local: Some(lc.clone()),
        ..client_cfg(node, addr)
    };
    let c = MetadataClient::connect(cfg, rec.clone()).unwrap();
    (c, rec)
}

#[test]
fn a_local_session_runs_calls_and_exchanges_invalidations_with_tcp_nodes() {
    let (store, srv, lc) = start_hosted();
    let (a, rec_a) = connect_local(1, srv.local_addr(), &lc);
    assert!(a.is_local());
    assert_eq!(a.epoch(), Epoch(3));
    assert_eq!(a.coordinator_addr(), srv.local_addr());
    // A fresh mount released the node's previous opens, as over TCP.
    assert_eq!(gone_count(&store, 1), 1);
    let (b, rec_b) = connect(2, srv.local_addr());
    assert!(!b.is_local());
    wait_until("both sessions", Duration::from_secs(3), || {
        srv.connected_nodes() == vec![NodeId(1), NodeId(2)]
    });

    // Answered (this store runs everything on the executor; proto_store has the real
    // store's in-place answers), and refused as over TCP.
    let Ok(Response::Attr(f)) = a.call(0, 0, create(b"f")) else {
        panic!("create failed")
    };
    assert!(matches!(a.call(0, 0, lookup(b"f")), Ok(Response::Attr(x)) if x.ino == f.ino));
    assert!(matches!(a.call(0, 0, create(b"f")), Err(FsError::Exists)));
    assert!(matches!(
        a.call(0, 0, lookup(b"nope")),
        Err(FsError::NotFound)
    ));

    // A's change invalidates what B caches, and waits for B's ack.
    assert!(matches!(b.call(0, 0, lookup(b"g")), Err(FsError::NotFound)));
    b.call(0, 0, Request::GetAttr { ino: InodeId::ROOT })
        .unwrap();
    rec_b.hold_ms.store(150, Ordering::SeqCst);
    let t0 = Instant::now();
    a.call(0, 0, create(b"g")).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(150));
    assert!(!rec_b.seen.lock().unwrap().is_empty());
    rec_b.hold_ms.store(0, Ordering::SeqCst);

    // B's change reaches A through the local session, and A's acks reach the coordinator.
    assert!(matches!(a.call(0, 0, lookup(b"f")), Ok(Response::Attr(_))));
    rec_a.hold_ms.store(50, Ordering::SeqCst);
    let t0 = Instant::now();
    b.call(
        0,
        0,
        Request::Unlink {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
        },
    )
    .unwrap();
    // A drops three things (the entry, the root's attributes, the file), 50 ms each; an
    // ack lost on the way would make B wait out the 500 ms ack timeout.
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(50), "{took:?}");
    assert!(took < Duration::from_millis(450), "{took:?}");
    let seen = rec_a.invalidations();
    assert!(
        seen.contains(&Invalidation::Entry {
            parent: InodeId::ROOT,
            name: b"f".to_vec()
        }),
        "{seen:?}"
    );
    rec_a.hold_ms.store(0, Ordering::SeqCst);

    // A detached call gets its answer on a local session too.
    let (tx, rx) = std::sync::mpsc::channel();
    a.call_detached(0, 0, create(b"h"), Box::new(move |r| tx.send(r).unwrap()));
    let r = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(matches!(r, Ok(Response::Attr(_))), "{r:?}");

    // Many threads at once.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let name = format!("t{t}-{i}");
                    a.call(0, 0, create(name.as_bytes())).unwrap();
                    a.call(0, 0, lookup(name.as_bytes())).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    // Closing the client ends its session: the node is gone after the grace period.
    a.close();
    wait_until("node 1 to be gone", Duration::from_secs(3), || {
        gone_count(&store, 1) == 2
    });
    assert_eq!(srv.connected_nodes(), vec![NodeId(2)]);
}

#[test]
fn a_local_session_is_refused_for_what_a_tcp_one_is() {
    let (_store, srv, lc) = start_hosted();
    let mut cfg = ClientConfig {
        local: Some(lc.clone()),
        ..client_cfg(1, srv.local_addr())
    };
    cfg.secret = b"not the secret".to_vec();
    let err = MetadataClient::connect(cfg.clone(), Arc::new(Recorder::default())).unwrap_err();
    assert!(
        matches!(err, ConnectError::SecretMismatch { .. }),
        "{err:?}"
    );
    cfg.secret = SECRET.to_vec();
    cfg.volume = Some(VolumeId([0x22; 16]));
    let err = MetadataClient::connect(cfg, Arc::new(Recorder::default())).unwrap_err();
    assert!(
        matches!(&err, ConnectError::Refused { reason, .. } if reason.contains("wrong volume")),
        "{err:?}"
    );
    assert!(srv.connected_nodes().is_empty());
}

#[test]
fn a_node_whose_coordinator_moves_away_goes_on_over_tcp() {
    let (store, srv, lc) = start_hosted();
    let addr = srv.local_addr();
    let (c, _) = connect_local(1, addr, &lc);
    c.call(0, 0, create(b"a")).unwrap();
    assert!(c.is_local());
    let sessions = c.sessions();
    // This process stops hosting; another serves the volume at the same address.
    lc.set(None);
    srv.shutdown();
    let s: Arc<dyn MetadataStore> = store.clone();
    let srv = Server::start(s, server_cfg(addr)).unwrap();
    wait_until("the node to reconnect", Duration::from_secs(5), || {
        c.is_connected() && c.sessions() > sessions
    });
    assert!(!c.is_local());
    assert!(matches!(c.call(0, 0, lookup(b"a")), Ok(Response::Attr(_))));
    assert_eq!(srv.connected_nodes(), vec![NodeId(1)]);
}

#[test]
fn a_tcp_session_of_the_same_node_replaces_a_local_one_which_comes_back() {
    let (_store, srv, lc) = start_hosted();
    let (c, _) = connect_local(1, srv.local_addr(), &lc);
    let sessions = c.sessions();
    let (mut raw, v) = raw_handshake(
        srv.local_addr(),
        ClientHello {
            resumed: true,
            ..hello(1, 1, 2)
        },
        SECRET,
    );
    assert!(v.is_ok());
    // The local session was told to end; the client reconnects (locally) and its newer
    // session closes the raw one in turn.
    wait_until(
        "the local session to come back",
        Duration::from_secs(5),
        || c.is_connected() && c.sessions() > sessions,
    );
    assert!(c.is_local());
    assert!(closed_by_server(&mut raw));
    assert!(c.call(0, 0, Request::StatFs).is_ok());
    assert_eq!(srv.connected_nodes(), vec![NodeId(1)]);
}

#[test]
fn a_fenced_coordinator_answers_nothing_and_its_nodes_turn_to_the_next() {
    let (store, srv, lc) = start_hosted();
    let addr = srv.local_addr();
    let (a, _) = connect_local(1, addr, &lc);
    let (b, _) = connect(2, addr);
    a.call(0, 0, create(b"before")).unwrap();
    *store.fenced.lock().unwrap() = Some("fenced: lease lost".into());
    let (a2, b2) = (a.clone(), b.clone());
    let ta = std::thread::spawn(move || a2.call(0, 0, create(b"from-a")));
    let tb = std::thread::spawn(move || b2.call(0, 0, create(b"from-b")));
    // The fenced server answers neither (an answer would be the store's error): it closes
    // every session instead.
    wait_until(
        "the fenced server to close its sessions",
        Duration::from_secs(3),
        || srv.connected_nodes().is_empty() && !a.is_connected() && !b.is_connected(),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(!ta.is_finished() && !tb.is_finished());
    // The next coordinator (here: the same address, the store no longer fenced) gets both.
    srv.shutdown();
    *store.fenced.lock().unwrap() = None;
    let s: Arc<dyn MetadataStore> = store.clone();
    let srv = Server::start(s, server_cfg(addr)).unwrap();
    lc.set(Some(srv.local()));
    let ra = ta.join().unwrap();
    let rb = tb.join().unwrap();
    assert!(matches!(ra, Ok(Response::Attr(_))), "{ra:?}");
    assert!(matches!(rb, Ok(Response::Attr(_))), "{rb:?}");
    assert!(matches!(
        b.call(0, 0, lookup(b"from-a")),
        Ok(Response::Attr(_))
    ));
}
