use std::cell::Cell;
use std::mem::align_of;
use std::mem::size_of;
use std::ptr::NonNull;

use crate::ll::fuse_abi as abi;
use crate::session::MAX_WRITE_SIZE;

/// Size of the buffer for reading a request from the kernel. Since the kernel may send
/// up to `MAX_WRITE_SIZE` bytes in a write request, we use that value plus some extra space.
const BUFFER_SIZE: usize = MAX_WRITE_SIZE + 4096;

/// csvfs patch: the size of a transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// csvfs patch: where a request starts in a mapped buffer, so that a write's data (after
/// its two headers) begins on a page boundary: a 1 MiB write then spans 256 whole pages
/// instead of 257 pieces, for anything that hands those pages on by reference.
const WRITE_DATA_SKIP: usize =
    4096 - size_of::<abi::fuse_in_header>() - size_of::<abi::fuse_write_in>();

thread_local! {
    /// csvfs patch: set by [`retire_request_buffer`] for the event loop of this thread.
    static RETIRE: Cell<bool> = const { Cell::new(false) };
}

/// csvfs patch: asks the event loop running on this thread to stop using the buffer of
/// the request being handled once the handler returns: it is unmapped (never written
/// again) and a new one is made for the next request.
///
/// For a handler that handed the pages of a write's data to the kernel by reference (for
/// example with vmsplice(2) into a socket) and cannot know when the kernel is done with
/// them: reusing the buffer would change data the kernel may still send. Unmapping it
/// leaves the kernel's references to the pages valid and their contents unchanged.
/// Called from any other thread, it has no effect on any event loop.
pub fn retire_request_buffer() {
    RETIRE.with(|r| r.set(true));
}

/// csvfs patch: whether the handler that just ran asked to retire the buffer; clears it.
pub(crate) fn take_retired() -> bool {
    RETIRE.with(|r| r.replace(false))
}

/// A buffer that provides an aligned sub-slice for FUSE operations.
///
/// csvfs patch: the buffer is its own anonymous mapping, aligned to `HUGE_PAGE` and
/// advised `MADV_HUGEPAGE`. The kernel copies each request into it one page at a time,
/// looking up (and pinning) every destination page on the way; with the buffer in huge
/// pages that lookup stops one page-table level early and the pages it pins share one
/// folio. Where the mapping cannot be made it is a `Vec<u8>` as upstream.
#[derive(Debug)]
pub(crate) struct FuseReadBuf {
    mem: Mem,
}

#[derive(Debug)]
enum Mem {
    /// `BUFFER_SIZE` bytes from `start`, inside the mapping of `map_len` bytes at `base`.
    Mapped {
        base: NonNull<u8>,
        map_len: usize,
        start: NonNull<u8>,
    },
    Heap(Vec<u8>),
}

impl FuseReadBuf {
    /// Creates a new `FuseReadBuf` with the default buffer size.
    ///
    /// The actual buffer may be slightly larger to accommodate alignment requirements.
    pub(crate) fn new() -> Self {
        Self {
            mem: Self::map().unwrap_or_else(|| Mem::Heap(vec![0; BUFFER_SIZE])),
        }
    }

    /// csvfs patch: an anonymous mapping with room to align `BUFFER_SIZE` bytes to
    /// `HUGE_PAGE`, advised to be backed by huge pages (advice the kernel may ignore).
    fn map() -> Option<Mem> {
        let map_len = BUFFER_SIZE + WRITE_DATA_SKIP + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping at an address the kernel chooses; it
        // aliases nothing and is unmapped only in `Drop`.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = NonNull::new(base.cast::<u8>())?;
        let skip = (HUGE_PAGE - base.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE;
        // SAFETY: `skip < HUGE_PAGE`, so `huge..huge + WRITE_DATA_SKIP + BUFFER_SIZE` lies
        // inside the mapping of `BUFFER_SIZE + WRITE_DATA_SKIP + HUGE_PAGE` bytes.
        let huge = unsafe { base.add(skip) };
        // SAFETY: advice only, on whole huge pages from `huge` to the mapping's end; an
        // error leaves the mapping in small pages, which is still correct.
        unsafe {
            libc::madvise(
                huge.as_ptr().cast(),
                (map_len - skip) / HUGE_PAGE * HUGE_PAGE,
                libc::MADV_HUGEPAGE,
            );
        }
        // SAFETY: as above, `start + BUFFER_SIZE` is inside the mapping.
        let start = unsafe { huge.add(WRITE_DATA_SKIP) };
        Some(Mem::Mapped {
            base,
            map_len,
            start,
        })
    }

    /// csvfs patch: gives the buffer up for good (see [`retire_request_buffer`]): a
    /// mapping is unmapped, so nothing can write its pages again; a heap buffer is leaked,
    /// so the allocator never hands its memory out again.
    pub(crate) fn retire(mut self) {
        if let Mem::Heap(v) = &mut self.mem {
            std::mem::forget(std::mem::take(v));
        }
        // A mapping is unmapped by `Drop`.
    }

    /// Returns a mutable reference to the aligned portion of the buffer.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        let buffer: &mut [u8] = match &mut self.mem {
            // SAFETY: `start..start + BUFFER_SIZE` lies inside the live mapping this buffer
            // owns alone (see `map`); anonymous memory is initialized (zero-filled), and the
            // borrow of `self` keeps anyone else from touching it.
            Mem::Mapped { start, .. } => unsafe {
                std::slice::from_raw_parts_mut(start.as_ptr(), BUFFER_SIZE)
            },
            Mem::Heap(v) => v,
        };
        let alignment = align_of::<abi::fuse_in_header>();
        let off = alignment - (buffer.as_ptr() as usize) % alignment;
        if off == alignment {
            buffer
        } else {
            &mut buffer[off..]
        }
    }
}

impl Drop for FuseReadBuf {
    fn drop(&mut self) {
        if let Mem::Mapped { base, map_len, .. } = self.mem {
            // SAFETY: `base` and `map_len` are exactly the mapping made in `map`, which
            // nothing borrows any more (`as_mut` borrows `self`).
            unsafe {
                libc::munmap(base.as_ptr().cast(), map_len);
            }
        }
    }
}
