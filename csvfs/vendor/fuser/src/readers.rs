//! csvfs patch: a limit on the event loops that wait in read(2) on `/dev/fuse` at once.
//!
//! The kernel wakes one sleeping reader for every request it queues. With many event loops
//! (enough for most of them to wait inside handlers) nearly every request woke a sleeping
//! thread, even while another loop was about to come back for the next request. With the
//! gate, `readers` loops hold a token and read; a loop keeps its token while its handlers
//! return quickly, so a busy loop usually finds the next request queued and reads it
//! without sleeping. A handler about to wait for long gives its token up with
//! [`leave_readers`], which lets one parked loop start reading; after the handler returns,
//! its loop takes a token again or parks (in this process, not in the kernel) until one is
//! given up.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;

/// Tokens for the loops that may read, and the loops parked for one.
#[derive(Debug)]
pub(crate) struct ReaderGate {
    free: Mutex<usize>,
    given_back: Condvar,
}

thread_local! {
    /// The gate whose token this thread holds, if it holds one.
    static HELD: RefCell<Option<Arc<ReaderGate>>> = const { RefCell::new(None) };
}

impl ReaderGate {
    /// A gate letting `readers` loops read at once (at least one).
    pub(crate) fn new(readers: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(readers.max(1)),
            given_back: Condvar::new(),
        })
    }

    /// Makes sure this thread holds a token of `gate`, parking until one is free.
    pub(crate) fn enter(gate: &Arc<Self>) {
        if HELD.with(|h| h.borrow().is_some()) {
            return;
        }
        {
            let mut free = gate.free.lock().unwrap_or_else(|p| p.into_inner());
            while *free == 0 {
                free = gate
                    .given_back
                    .wait(free)
                    .unwrap_or_else(|p| p.into_inner());
            }
            *free -= 1;
        }
        HELD.with(|h| *h.borrow_mut() = Some(gate.clone()));
    }

    fn give_back(&self) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.given_back.notify_one();
    }
}

/// csvfs patch: the handler running on this event loop is about to wait (for another
/// process, a network peer, a lock): the loop stops counting as a reader of `/dev/fuse`,
/// and a parked loop, if any, starts reading in its place. When the handler returns, its
/// loop takes a token again before it reads (parking while none is free). Without a gate
/// (`Config::readers` unset), or called from a thread that is no event loop or has given
/// its token up already, it does nothing.
pub fn leave_readers() {
    if let Some(gate) = HELD.with(|h| h.borrow_mut().take()) {
        gate.give_back();
    }
}

/// Gives this thread's token back when an event loop ends, however it ends, so that the
/// parked loops wake in turn and see the session end too.
pub(crate) struct LeaveOnDrop;

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        leave_readers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn at_most_readers_hold_tokens_and_leaving_lets_a_parked_loop_in() {
        let gate = ReaderGate::new(2);
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (gate, inside) = (gate.clone(), inside.clone());
                std::thread::spawn(move || {
                    ReaderGate::enter(&gate);
                    inside.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                    leave_readers();
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(inside.load(Ordering::SeqCst), 2, "two tokens, two readers");
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(inside.load(Ordering::SeqCst), 4, "each leave let a parked loop in");
        assert_eq!(*gate.free.lock().unwrap(), 2, "every token given back");
    }

    #[test]
    fn entering_twice_takes_one_token_and_leaving_without_one_does_nothing() {
        let gate = ReaderGate::new(1);
        leave_readers();
        ReaderGate::enter(&gate);
        ReaderGate::enter(&gate);
        assert_eq!(*gate.free.lock().unwrap(), 0);
        leave_readers();
        leave_readers();
        assert_eq!(*gate.free.lock().unwrap(), 1);
    }
}
