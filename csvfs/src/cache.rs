//! The node's cache of directories: their attributes and, for a directory whose every
//! name the node knows, its names. With it the node answers the kernel's GETATTR of a
//! directory and a LOOKUP of a name that does not exist without asking the coordinator.
//! Both come with nearly every create: the kernel drops a directory's attributes whenever
//! an entry in it changes, so the next path walk through it asks for them again, and
//! open(O_CREAT) of a new name looks the name up first.
//!
//! The coordinator keeps the cache current. Every answer that names an inode registers
//! this node as caching it, so a change by another node invalidates it here before that
//! change is acknowledged. This node's own changes are applied from their answers: a
//! namespace change answered on a protocol-4 session carries the new attributes of the
//! directories it changed (`Response::WithAttrs`).
//!
//! Races: an answer read before an invalidation but applied after it would bring back
//! stale state. The metadata client stamps every answer with the number of invalidations
//! it had seen when the answer was read, and shows each invalidation to this cache first
//! (`observe`, on the client's reader). The cache keeps the most recent invalidations; an
//! answer is applied only when none newer than its stamp names what it would install.
//!
//! What is known complete: a directory this node made (it was empty), kept up to date
//! with this node's own creates, links, renames and removals in it. Answers are served
//! only while the client is connected; a new coordinator (failover) invalidates all.

use metadata_server::proto::{Invalidation, Request, Response};
use metadata_server::types::{Attr, FileKind, FsError, InodeId};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};

/// Invalidations remembered for the stamp check.
const RECENT: usize = 1024;
/// Directories cached at most; past it the cache starts over.
const MAX_DIRS: usize = 65_536;
/// Names kept in complete directories at most, all directories together.
const MAX_NAMES: usize = 1 << 20;

/// What the node knows of one directory.
#[derive(Debug, Default)]
struct Dir {
    attr: Option<Attr>,
    /// Every name in the directory, when all are known.
    names: Option<HashSet<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct State {
    dirs: HashMap<InodeId, Dir>,
    /// Subdirectories by name, for cached directories: a removal or rename by this node
    /// finds the directory it removed or moved.
    children: HashMap<(InodeId, Vec<u8>), InodeId>,
    names_total: usize,
    /// The last `RECENT` invalidations with their stamps, oldest first.
    recent: VecDeque<(u64, Invalidation)>,
    /// Stamp of the last invalidation seen.
    seen: u64,
}

/// What an answer may teach the cache, taken from its request before it is sent.
#[derive(Debug)]
pub enum Lesson {
    /// Nothing to learn.
    None,
    /// Attributes of an inode (cached only if it is a known directory).
    Attr(InodeId),
    /// A name looked up in a directory.
    Lookup(InodeId, Vec<u8>),
    /// A name made in a directory (create, mkdir, mknod, symlink, link).
    Made(InodeId, Vec<u8>),
    /// A name removed from a directory (unlink, rmdir).
    Removed(InodeId, Vec<u8>),
    /// A rename (`exchange`: both names stay).
    Renamed {
        /// Old directory.
        parent: InodeId,
        /// Old name.
        name: Vec<u8>,
        /// New directory.
        new_parent: InodeId,
        /// New name.
        new_name: Vec<u8>,
        /// RENAME_EXCHANGE.
        exchange: bool,
    },
    /// The inode's attributes changed (extended attributes: its ctime).
    Touched(InodeId),
}

impl Lesson {
    /// What the answer to `req` may teach.
    pub fn of(req: &Request) -> Lesson {
        match req {
            Request::GetAttr { ino } | Request::SetAttr { ino, .. } => Lesson::Attr(*ino),
            Request::Lookup { parent, name } => Lesson::Lookup(*parent, name.clone()),
            Request::Create { parent, name, .. }
            | Request::CreateOpen { parent, name, .. }
            | Request::Symlink { parent, name, .. } => Lesson::Made(*parent, name.clone()),
            Request::Link {
                new_parent,
                new_name,
                ..
            } => Lesson::Made(*new_parent, new_name.clone()),
            Request::Unlink { parent, name } | Request::Rmdir { parent, name } => {
                Lesson::Removed(*parent, name.clone())
            }
            Request::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => Lesson::Renamed {
                parent: *parent,
                name: name.clone(),
                new_parent: *new_parent,
                new_name: new_name.clone(),
                exchange: flags.exchange,
            },
            Request::SetXattr { ino, .. } | Request::RemoveXattr { ino, .. } => {
                Lesson::Touched(*ino)
            }
            _ => Lesson::None,
        }
    }
}

fn names_dir(inv: &Invalidation, ino: InodeId) -> bool {
    match inv {
        Invalidation::All => true,
        Invalidation::Inode { ino: i } => *i == ino,
        Invalidation::Entry { parent, .. } => *parent == ino,
    }
}

impl State {
    /// No invalidation newer than `stamp` names `ino`: an answer read at `stamp` about it
    /// is still current.
    fn current(&self, stamp: u64, ino: InodeId) -> bool {
        if stamp >= self.seen {
            return true;
        }
        // Invalidations between `stamp` and the oldest remembered one are unknown.
        match self.recent.front() {
            Some((oldest, _)) if *oldest <= stamp + 1 => {}
            _ => return false,
        }
        !self
            .recent
            .iter()
            .any(|(s, inv)| *s > stamp && names_dir(inv, ino))
    }

    fn drop_dir(&mut self, ino: InodeId) {
        if let Some(d) = self.dirs.remove(&ino) {
            self.names_total -= d.names.map_or(0, |n| n.len());
        }
    }

    fn drop_names(&mut self, ino: InodeId) {
        if let Some(d) = self.dirs.get_mut(&ino) {
            self.names_total -= d.names.take().map_or(0, |n| n.len());
        }
    }

    /// A directory's entry, made if needed (a full cache starts over first).
    fn dir(&mut self, ino: InodeId) -> &mut Dir {
        if !self.dirs.contains_key(&ino) && self.dirs.len() >= MAX_DIRS {
            self.dirs.clear();
            self.children.clear();
            self.names_total = 0;
        }
        self.dirs.entry(ino).or_default()
    }

    /// Installs `a` for a directory already cached (or the root).
    fn refresh(&mut self, stamp: u64, a: &Attr) {
        if a.kind != FileKind::Dir || !self.current(stamp, a.ino) {
            return;
        }
        if a.ino == InodeId::ROOT || self.dirs.contains_key(&a.ino) {
            self.dir(a.ino).attr = Some(a.clone());
        }
    }

    /// Caches `a` as the subdirectory `name` of `parent` when it is a directory and no
    /// invalidation since `stamp` names either; returns its entry.
    fn install_child(
        &mut self,
        stamp: u64,
        parent: InodeId,
        name: Vec<u8>,
        a: &Attr,
    ) -> Option<&mut Dir> {
        if a.kind != FileKind::Dir || !self.current(stamp, a.ino) || !self.current(stamp, parent) {
            return None;
        }
        self.children.insert((parent, name), a.ino);
        let d = self.dir(a.ino);
        d.attr = Some(a.clone());
        Some(d)
    }

    fn add_name(&mut self, parent: InodeId, name: &[u8]) {
        let full = self.names_total >= MAX_NAMES;
        let Some(d) = self.dirs.get_mut(&parent) else {
            return;
        };
        let Some(names) = d.names.as_mut() else {
            return;
        };
        if full {
            self.names_total -= names.len();
            d.names = None;
        } else if names.insert(name.to_vec()) {
            self.names_total += 1;
        }
    }

    fn remove_name(&mut self, parent: InodeId, name: &[u8]) {
        if let Some(names) = self.dirs.get_mut(&parent).and_then(|d| d.names.as_mut()) {
            if names.remove(name) {
                self.names_total -= 1;
            }
        }
        if let Some(child) = self.children.remove(&(parent, name.to_vec())) {
            self.drop_dir(child);
        }
    }
}

/// The node's directory cache. See the module docs.
#[derive(Debug, Default)]
pub struct DirCache {
    st: Mutex<State>,
}

impl DirCache {
    /// An empty cache.
    pub fn new() -> DirCache {
        DirCache::default()
    }

    /// Sees invalidation number `stamp`: drops what it names, remembers it.
    pub fn observe(&self, stamp: u64, inv: &Invalidation) {
        let mut st = self.st.lock();
        match inv {
            Invalidation::All => {
                st.dirs.clear();
                st.children.clear();
                st.names_total = 0;
            }
            Invalidation::Inode { ino } => st.drop_dir(*ino),
            Invalidation::Entry { parent, name } => {
                st.drop_names(*parent);
                if let Some(child) = st.children.remove(&(*parent, name.clone())) {
                    st.drop_dir(child);
                }
            }
        }
        st.seen = st.seen.max(stamp);
        if st.recent.len() == RECENT {
            st.recent.pop_front();
        }
        st.recent.push_back((stamp, inv.clone()));
    }

    /// The cached attributes of directory `ino`.
    pub fn attr(&self, ino: InodeId) -> Option<Attr> {
        self.st.lock().dirs.get(&ino).and_then(|d| d.attr.clone())
    }

    /// True when `name` is known not to exist in directory `parent`.
    pub fn absent(&self, parent: InodeId, name: &[u8]) -> bool {
        self.st
            .lock()
            .dirs
            .get(&parent)
            .and_then(|d| d.names.as_ref())
            .is_some_and(|n| !n.contains(name))
    }

    /// Learns from the answer `result` (read at invalidation stamp `stamp`) to the request
    /// `lesson` was taken from.
    pub fn learn(&self, lesson: Lesson, result: &Result<Response, FsError>, stamp: u64) {
        if matches!(lesson, Lesson::None) {
            return;
        }
        let Ok(resp) = result else {
            return;
        };
        let answer_attr = match resp.answer() {
            Response::Attr(a) | Response::Mapped { attr: a, .. } => Some(a),
            _ => None,
        };
        let mut st = self.st.lock();
        match lesson {
            Lesson::None => {}
            Lesson::Attr(_) => {
                if let Some(a) = answer_attr {
                    st.refresh(stamp, a);
                }
            }
            Lesson::Lookup(parent, name) => {
                if let Some(a) = answer_attr {
                    st.add_name(parent, &name);
                    st.install_child(stamp, parent, name, a);
                }
            }
            Lesson::Made(parent, name) => {
                st.add_name(parent, &name);
                if let Some(d) = st.dirs.get_mut(&parent) {
                    d.attr = None;
                }
                if let Some(d) = answer_attr.and_then(|a| st.install_child(stamp, parent, name, a))
                {
                    // A directory this node just made: it is empty.
                    d.names = Some(HashSet::new());
                }
            }
            Lesson::Removed(parent, name) => {
                st.remove_name(parent, &name);
                if let Some(d) = st.dirs.get_mut(&parent) {
                    d.attr = None;
                }
            }
            Lesson::Renamed {
                parent,
                name,
                new_parent,
                new_name,
                exchange,
            } => {
                // Directories moved get a new ctime and parent: forget them.
                for key in [(parent, name.clone()), (new_parent, new_name.clone())] {
                    if let Some(child) = st.children.remove(&key) {
                        st.drop_dir(child);
                    }
                }
                if !exchange {
                    st.remove_name(parent, &name);
                    st.add_name(new_parent, &new_name);
                }
                for p in [parent, new_parent] {
                    if let Some(d) = st.dirs.get_mut(&p) {
                        d.attr = None;
                    }
                }
            }
            Lesson::Touched(ino) => {
                if let Some(d) = st.dirs.get_mut(&ino) {
                    d.attr = None;
                }
            }
        }
        if let Response::WithAttrs { attrs, .. } = resp {
            for a in attrs {
                st.refresh(stamp, a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metadata_server::types::Timestamp;

    fn attr(ino: u64, kind: FileKind, mtime: i64) -> Attr {
        Attr {
            ino: InodeId(ino),
            generation: 1,
            kind,
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            size_bytes: 0,
            allocated_bytes: 0,
            rdev: 0,
            atime: Timestamp::default(),
            mtime: Timestamp {
                secs: mtime,
                nanos: 0,
            },
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
        }
    }

    fn mkdir(parent: u64, name: &str) -> Request {
        Request::Create {
            parent: InodeId(parent),
            name: name.as_bytes().to_vec(),
            kind: FileKind::Dir,
            perm: 0o755,
            rdev: 0,
            exclusive: true,
        }
    }

    fn create(parent: u64, name: &str) -> Request {
        Request::CreateOpen {
            parent: InodeId(parent),
            name: name.as_bytes().to_vec(),
            perm: 0o644,
            exclusive: true,
            write: true,
        }
    }

    fn with_parent(answer: Response, parent: Attr) -> Result<Response, FsError> {
        Ok(Response::WithAttrs {
            answer: Box::new(answer),
            attrs: vec![parent],
        })
    }

    #[test]
    fn a_directory_made_here_answers_names_and_attributes() {
        let c = DirCache::new();
        let root = attr(1, FileKind::Dir, 1);
        c.learn(
            Lesson::of(&mkdir(1, "d")),
            &with_parent(Response::Attr(attr(5, FileKind::Dir, 2)), root.clone()),
            0,
        );
        assert!(c.absent(InodeId(5), b"x"));
        assert_eq!(c.attr(InodeId(5)).map(|a| a.mtime.secs), Some(2));
        // The root is refreshed from the answer.
        assert_eq!(c.attr(InodeId(1)), Some(root));
        // A file made in it: the name now exists, the directory's attributes follow.
        c.learn(
            Lesson::of(&create(5, "x")),
            &with_parent(
                Response::Mapped {
                    attr: attr(9, FileKind::File, 3),
                    extents: Vec::new(),
                },
                attr(5, FileKind::Dir, 3),
            ),
            0,
        );
        assert!(!c.absent(InodeId(5), b"x"));
        assert!(c.absent(InodeId(5), b"y"));
        assert_eq!(c.attr(InodeId(5)).map(|a| a.mtime.secs), Some(3));
        // Removed again.
        c.learn(
            Lesson::of(&Request::Unlink {
                parent: InodeId(5),
                name: b"x".to_vec(),
            }),
            &Ok(Response::Done),
            0,
        );
        assert!(c.absent(InodeId(5), b"x"));
        // No attributes came with the answer: they are asked for again.
        assert_eq!(c.attr(InodeId(5)), None);
    }

    #[test]
    fn invalidation_drops_and_a_stale_answer_does_not_come_back() {
        let c = DirCache::new();
        c.learn(
            Lesson::of(&mkdir(1, "d")),
            &Ok(Response::Attr(attr(5, FileKind::Dir, 2))),
            0,
        );
        c.observe(1, &Invalidation::Inode { ino: InodeId(5) });
        assert!(!c.absent(InodeId(5), b"x"));
        assert_eq!(c.attr(InodeId(5)), None);
        // A getattr answer read before that invalidation (stamp 0) is not installed; one
        // read after it (stamp 1) is, for a directory this node knows.
        c.learn(
            Lesson::Lookup(InodeId(1), b"d".to_vec()),
            &Ok(Response::Attr(attr(5, FileKind::Dir, 4))),
            0,
        );
        assert_eq!(c.attr(InodeId(5)), None);
        c.learn(
            Lesson::Lookup(InodeId(1), b"d".to_vec()),
            &Ok(Response::Attr(attr(5, FileKind::Dir, 4))),
            1,
        );
        assert_eq!(c.attr(InodeId(5)).map(|a| a.mtime.secs), Some(4));
        // Only a directory made here is complete; one found by lookup is not.
        assert!(!c.absent(InodeId(5), b"x"));
    }

    #[test]
    fn a_mkdir_answer_overtaken_by_an_invalidation_is_not_complete() {
        let c = DirCache::new();
        // Another node created a name in the new directory after the answer was read.
        c.observe(1, &Invalidation::Inode { ino: InodeId(5) });
        c.learn(
            Lesson::of(&mkdir(1, "d")),
            &Ok(Response::Attr(attr(5, FileKind::Dir, 2))),
            0,
        );
        assert!(!c.absent(InodeId(5), b"x"));
        // Lost track of older invalidations: nothing from before them is installed.
        for s in 2..(RECENT as u64 + 10) {
            c.observe(s, &Invalidation::Inode { ino: InodeId(77) });
        }
        c.learn(
            Lesson::of(&mkdir(1, "e")),
            &Ok(Response::Attr(attr(6, FileKind::Dir, 2))),
            1,
        );
        assert!(!c.absent(InodeId(6), b"x"));
    }

    #[test]
    fn entry_invalidation_and_all_end_completeness() {
        let c = DirCache::new();
        c.learn(
            Lesson::of(&mkdir(1, "d")),
            &Ok(Response::Attr(attr(5, FileKind::Dir, 2))),
            0,
        );
        c.observe(
            1,
            &Invalidation::Entry {
                parent: InodeId(5),
                name: b"x".to_vec(),
            },
        );
        assert!(!c.absent(InodeId(5), b"y"));
        c.learn(
            Lesson::of(&mkdir(1, "e")),
            &Ok(Response::Attr(attr(6, FileKind::Dir, 2))),
            1,
        );
        assert!(c.absent(InodeId(6), b"y"));
        c.observe(2, &Invalidation::All);
        assert!(!c.absent(InodeId(6), b"y"));
        assert_eq!(c.attr(InodeId(6)), None);
    }

    #[test]
    fn rmdir_and_rename_forget_the_directories_they_touch() {
        let c = DirCache::new();
        c.learn(
            Lesson::of(&mkdir(1, "d")),
            &Ok(Response::Attr(attr(5, FileKind::Dir, 2))),
            0,
        );
        c.learn(
            Lesson::of(&mkdir(5, "sub")),
            &Ok(Response::Attr(attr(6, FileKind::Dir, 2))),
            0,
        );
        assert!(c.attr(InodeId(6)).is_some());
        c.learn(
            Lesson::of(&Request::Rename {
                parent: InodeId(5),
                name: b"sub".to_vec(),
                new_parent: InodeId(5),
                new_name: b"moved".to_vec(),
                flags: Default::default(),
            }),
            &Ok(Response::Done),
            0,
        );
        assert_eq!(c.attr(InodeId(6)), None);
        assert!(c.absent(InodeId(5), b"sub"));
        assert!(!c.absent(InodeId(5), b"moved"));
        c.learn(
            Lesson::of(&Request::Rmdir {
                parent: InodeId(1),
                name: b"d".to_vec(),
            }),
            &Ok(Response::Done),
            0,
        );
        assert_eq!(c.attr(InodeId(5)), None);
        assert!(!c.absent(InodeId(5), b"zzz"));
    }
}
