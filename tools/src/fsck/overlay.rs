//! [`Overlay`]: a copy-on-write view of a device. Reads see the base device with every write
//! made through the overlay on top; writes stay in memory until [`Overlay::write_back`].
//! fsck replays the journal and repairs into an overlay, so `-n` never writes and `-y`
//! writes everything at the end in a chosen order.

use std::collections::BTreeMap;
use std::sync::Arc;

use block_client::{BlockDevice, BlockError, WriteFlags};
use parking_lot::Mutex;

/// Granularity of the overlay.
const CHUNK: u64 = 4096;

/// A device view whose writes are held in memory.
#[derive(Debug)]
pub struct Overlay {
    base: Arc<dyn BlockDevice>,
    /// 4 KiB chunks written through the overlay, by chunk index.
    chunks: Mutex<BTreeMap<u64, Vec<u8>>>,
}

fn chunk_len() -> usize {
    usize::try_from(CHUNK).expect("4096 fits in usize")
}

impl Overlay {
    /// An overlay with no writes over `base`.
    pub fn new(base: Arc<dyn BlockDevice>) -> Overlay {
        Overlay {
            base,
            chunks: Mutex::new(BTreeMap::new()),
        }
    }

    /// Number of 4 KiB chunks written through the overlay.
    pub fn dirty_chunks(&self) -> usize {
        self.chunks.lock().len()
    }

    /// Writes every dirty chunk to the base device: first those outside `last`, a flush,
    /// then those inside `last` (byte range), a flush. Returns the bytes written.
    pub fn write_back(&self, last: (u64, u64)) -> Result<u64, BlockError> {
        let chunks = self.chunks.lock();
        let in_last = |i: u64| {
            let off = i * CHUNK;
            off >= last.0 && off < last.0 + last.1
        };
        let mut written = 0u64;
        let mark = self.base.write_loss_count();
        for pass_last in [false, true] {
            let mut run: Option<(u64, Vec<u8>)> = None;
            for (i, data) in chunks.iter() {
                if in_last(*i) != pass_last {
                    continue;
                }
                match &mut run {
                    Some((start, buf)) if start.saturating_add(buf.len() as u64) == i * CHUNK => {
                        buf.extend_from_slice(data)
                    }
                    _ => {
                        if let Some((start, buf)) = run.take() {
                            self.base.write_at(&buf, start, WriteFlags::default())?;
                            written += buf.len() as u64;
                        }
                        run = Some((i * CHUNK, data.clone()));
                    }
                }
            }
            if let Some((start, buf)) = run.take() {
                self.base.write_at(&buf, start, WriteFlags::default())?;
                written += buf.len() as u64;
            }
            block_client::flush_since(&*self.base, mark)?;
        }
        Ok(written)
    }
}

impl BlockDevice for Overlay {
    fn size_bytes(&self) -> u64 {
        self.base.size_bytes()
    }

    fn block_size_bytes(&self) -> u32 {
        self.base.block_size_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
        self.check_range("read", offset_bytes, buf.len() as u64)?;
        self.base.read_at(buf, offset_bytes)?;
        let chunks = self.chunks.lock();
        if chunks.is_empty() {
            return Ok(());
        }
        let end = offset_bytes + buf.len() as u64;
        let first = offset_bytes / CHUNK;
        let last = end.div_ceil(CHUNK);
        for (i, data) in chunks.range(first..last) {
            let c_start = i * CHUNK;
            let lo = c_start.max(offset_bytes);
            let hi = (c_start + CHUNK).min(end);
            if lo >= hi {
                continue;
            }
            let dst = usize::try_from(lo - offset_bytes).expect("inside buf");
            let src = usize::try_from(lo - c_start).expect("inside a chunk");
            let n = usize::try_from(hi - lo).expect("inside a chunk");
            buf[dst..dst + n].copy_from_slice(&data[src..src + n]);
        }
        Ok(())
    }

    fn write_at(
        &self,
        buf: &[u8],
        offset_bytes: u64,
        _flags: WriteFlags,
    ) -> Result<(), BlockError> {
        self.check_range("write", offset_bytes, buf.len() as u64)?;
        let end = offset_bytes + buf.len() as u64;
        let mut off = offset_bytes;
        while off < end {
            let i = off / CHUNK;
            let c_start = i * CHUNK;
            let hi = (c_start + CHUNK).min(end);
            let mut chunks = self.chunks.lock();
            if let std::collections::btree_map::Entry::Vacant(v) = chunks.entry(i) {
                let mut data = vec![0u8; chunk_len()];
                let len = CHUNK.min(self.base.size_bytes() - c_start);
                let n = usize::try_from(len).expect("inside a chunk");
                self.base.read_at(&mut data[..n], c_start)?;
                v.insert(data);
            }
            let data = chunks.get_mut(&i).expect("inserted above");
            let dst = usize::try_from(off - c_start).expect("inside a chunk");
            let src = usize::try_from(off - offset_bytes).expect("inside buf");
            let n = usize::try_from(hi - off).expect("inside a chunk");
            data[dst..dst + n].copy_from_slice(&buf[src..src + n]);
            off = hi;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        let mut off = offset_bytes;
        let end = offset_bytes + len_bytes;
        let zero = vec![0u8; 1 << 20];
        while off < end {
            let n = (end - off).min(1 << 20);
            let len = usize::try_from(n).expect("at most 1 MiB");
            self.write_at(&zero[..len], off, WriteFlags::default())?;
            off += n;
        }
        Ok(())
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset_bytes, len_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_client::testing::MemDevice;

    #[test]
    fn overlay_reads_its_writes_and_writes_back() {
        let base = Arc::new(MemDevice::new(64 << 10));
        base.write_at(&[1; 10000], 0, WriteFlags::default())
            .unwrap();
        let o = Overlay::new(base.clone());
        o.write_at(&[2; 100], 4000, WriteFlags::default()).unwrap();
        let mut b = vec![0; 200];
        o.read_at(&mut b, 3950).unwrap();
        assert!(b[..50].iter().all(|&x| x == 1));
        assert!(b[50..150].iter().all(|&x| x == 2));
        assert!(b[150..].iter().all(|&x| x == 1));
        let mut raw = vec![0; 200];
        base.read_at(&mut raw, 3950).unwrap();
        assert!(raw.iter().all(|&x| x == 1), "base untouched");
        assert_eq!(o.dirty_chunks(), 2);
        o.write_back((0, 0)).unwrap();
        base.read_at(&mut raw, 3950).unwrap();
        assert_eq!(raw, b);
    }
}
