//! The [`Journal`]: submit, group commit, checkpoint.
//!
//! ```text
//!  submit(payload) ─► lsn assigned, record laid out at the head, queued (volatile)
//!                                   │
//!  wait_durable(lsn) ─► durable >= lsn? ── yes ─► Ok
//!        │ no
//!        ├─ nobody flushing: become leader, take the whole queue, write it (one write of
//!        │   consecutive blocks with FUA; when it wraps, two writes and a flush),
//!        │   durable = last lsn of batch, wake everyone
//!        └─ a leader is flushing: sleep; re-check when it finishes (its batch may cover us,
//!            otherwise one of the waiters leads the next batch)
//!
//!  any failed write/flush ─► failed (sticky): every call returns PreviousIoFailed
//!  checkpoint(upto) ─► write header (next generation, alternate copy), flush, free space
//! ```

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use block_client::{BlockDevice, WriteFlags};
use parking_lot::{Condvar, Mutex};

use crate::error::{JournalError, ReplayError};
use crate::format::{
    encode_record, record_span_bytes, HeaderInfo, RecordFields, RecordKind, BLOCK_BYTES,
    RECORD_HEADER_BYTES,
};
use crate::ids::{Epoch, Lsn};
use crate::replay::{self, Record, Region};

/// The write-ahead log on one journal region. Shared between threads (`&self` methods).
#[derive(Debug)]
pub struct Journal {
    dev: Arc<dyn BlockDevice>,
    region: Region,
    nonce: u64,
    session: u64,
    epoch: Epoch,
    state: Mutex<State>,
    flushed: Condvar,
    /// The header in force; held while a header is written so writes are serialized.
    header: Mutex<HeaderInfo>,
}

#[derive(Debug)]
struct State {
    next_lsn: Lsn,
    head_off: u64,
    tail_off: u64,
    tail_lsn: Lsn,
    /// Log-area offset of every record from the tail on (including queued ones).
    offsets: VecDeque<(Lsn, u64)>,
    /// Records laid out but not yet written: (log-area offset, bytes, lsn).
    queued: Vec<(u64, Vec<u8>, Lsn)>,
    durable_lsn: Lsn,
    flushing: bool,
    failed: bool,
}

/// What a read-only replay found (for fsck and tools; nothing is written).
#[derive(Debug, Clone)]
pub struct ReplaySummary {
    /// Complete records after the checkpointed tail, in order.
    pub records: Vec<Record>,
    /// First Lsn not yet checkpointed.
    pub tail_lsn: Lsn,
    /// Lsn the next record would get.
    pub next_lsn: Lsn,
    /// Epoch of the last writer that opened the journal.
    pub epoch: Epoch,
    /// Bytes of the log in use between tail and head.
    pub used_bytes: u64,
    /// Usable size of the log area.
    pub capacity_bytes: u64,
}

fn region_for_format(
    dev: &dyn BlockDevice,
    start_bytes: u64,
    len_bytes: u64,
) -> Result<Region, JournalError> {
    Region::new(dev.size_bytes(), start_bytes, len_bytes).map_err(|reason| {
        JournalError::InvalidRegion {
            start_bytes,
            len_bytes,
            reason,
        }
    })
}

fn region_for_replay(
    dev: &dyn BlockDevice,
    start_bytes: u64,
    len_bytes: u64,
) -> Result<Region, ReplayError> {
    Region::new(dev.size_bytes(), start_bytes, len_bytes).map_err(|reason| {
        ReplayError::InvalidRegion {
            start_bytes,
            len_bytes,
            reason,
        }
    })
}

impl Journal {
    /// Formats an empty journal in `len_bytes` at `start_bytes` of `dev` (both multiples of
    /// 512; at least 16 KiB) and makes it durable. Old records in the region can never be
    /// replayed: the new journal gets a fresh random nonce that every record must carry.
    pub fn format(
        dev: Arc<dyn BlockDevice>,
        start_bytes: u64,
        len_bytes: u64,
        epoch: Epoch,
    ) -> Result<(), JournalError> {
        let region = region_for_format(dev.as_ref(), start_bytes, len_bytes)?;
        let nonce = RandomState::new().hash_one((
            std::time::SystemTime::now(),
            start_bytes,
            std::process::id(),
        ));
        let header = HeaderInfo {
            generation: 1,
            nonce,
            region_len_bytes: len_bytes,
            tail_lsn: Lsn(1),
            tail_offset_bytes: 0,
            session: 0,
            session_start_lsn: Lsn(1),
            epoch,
        };
        // Copy A is cleared so that a header left by an earlier format cannot win.
        let zero = vec![0u8; usize::try_from(BLOCK_BYTES).expect("4096 fits in usize")];
        let mark = dev.write_loss_count();
        for (slot, block) in [(0u64, zero), (1u64, header.encode())] {
            let at_bytes = region.header_at(slot);
            dev.write_at(&block, at_bytes, WriteFlags::default())
                .map_err(|source| JournalError::WriteHeader { at_bytes, source })?;
        }
        block_client::flush_since(&*dev, mark).map_err(|source| JournalError::Flush {
            lsn: Lsn(0),
            source,
        })?;
        tracing::info!(
            start_bytes,
            len_bytes,
            area_bytes = region.area_len_bytes,
            %epoch,
            "journal formatted"
        );
        Ok(())
    }

    /// Replays the journal without writing to the device: what [`Journal::open`] would
    /// return, for fsck in read-only mode and for tools.
    pub fn replay_read_only(
        dev: &dyn BlockDevice,
        start_bytes: u64,
        len_bytes: u64,
    ) -> Result<ReplaySummary, ReplayError> {
        let region = region_for_replay(dev, start_bytes, len_bytes)?;
        let r = replay::replay(dev, region)?;
        let tail_off = r.header.tail_offset_bytes;
        Ok(ReplaySummary {
            records: r.records,
            tail_lsn: r.header.tail_lsn,
            next_lsn: r.next_lsn,
            epoch: r.header.epoch,
            used_bytes: region.used_bytes(tail_off, r.head_offset_bytes),
            capacity_bytes: region.capacity_bytes(),
        })
    }

    /// Opens the journal as its only writer, with coordinator epoch `epoch`: replays it and
    /// starts a new session (a header write + flush) so that nothing left after the head
    /// by an earlier writer can ever be replayed. Returns the journal and the complete
    /// records after the checkpointed tail, in Lsn order; the caller applies them (they
    /// stay in the log until it checkpoints past them).
    ///
    /// Fails with [`ReplayError::Fenced`] when a coordinator of a newer epoch has opened the
    /// journal, and [`ReplayError::Corrupt`] when a record that was durable is damaged.
    pub fn open(
        dev: Arc<dyn BlockDevice>,
        start_bytes: u64,
        len_bytes: u64,
        epoch: Epoch,
    ) -> Result<(Journal, Vec<Record>), ReplayError> {
        let region = region_for_replay(dev.as_ref(), start_bytes, len_bytes)?;
        let r = replay::replay(dev.as_ref(), region)?;
        if r.header.epoch > epoch {
            return Err(ReplayError::Fenced {
                ours: epoch,
                journal: r.header.epoch,
            });
        }
        let header = HeaderInfo {
            generation: r.header.generation + 1,
            session: r.header.session + 1,
            session_start_lsn: r.next_lsn,
            epoch,
            ..r.header.clone()
        };
        let at_bytes = region.header_at(header.generation);
        let mark = dev.write_loss_count();
        dev.write_at(&header.encode(), at_bytes, WriteFlags::default())
            .map_err(|source| ReplayError::WriteHeader { at_bytes, source })?;
        block_client::flush_since(&*dev, mark).map_err(|source| ReplayError::Flush { source })?;
        let tail_off = header.tail_offset_bytes;
        let tail_lsn = header.tail_lsn;
        let durable_lsn = Lsn(r.next_lsn.0 - 1);
        let offsets = r
            .records
            .iter()
            .map(|rec| rec.lsn)
            .zip(r.offsets.iter().copied())
            .collect();
        tracing::info!(
            %epoch,
            session = header.session,
            %tail_lsn,
            next_lsn = %r.next_lsn,
            replayed = r.records.len(),
            "journal opened"
        );
        let journal = Journal {
            dev,
            region,
            nonce: header.nonce,
            session: header.session,
            epoch,
            state: Mutex::new(State {
                next_lsn: r.next_lsn,
                head_off: r.head_offset_bytes,
                tail_off,
                tail_lsn,
                offsets,
                queued: Vec::new(),
                durable_lsn,
                flushing: false,
                failed: false,
            }),
            flushed: Condvar::new(),
            header: Mutex::new(header),
        };
        Ok((journal, r.records))
    }

    /// Largest payload a record can carry in this journal: a record of up to half the log
    /// area always fits into an empty log, wherever its head is.
    pub fn max_payload_bytes(&self) -> u64 {
        (self.region.area_len_bytes / 2 / BLOCK_BYTES * BLOCK_BYTES)
            .saturating_sub(BLOCK_BYTES + RECORD_HEADER_BYTES)
    }

    /// Assigns the next Lsn to `payload` and queues the record behind every earlier one.
    /// Returns at once; the record is durable after [`wait_durable`](Self::wait_durable).
    /// Fails with [`JournalError::Full`] when the log has no room (checkpoint, retry).
    pub fn submit(&self, payload: Vec<u8>) -> Result<Lsn, JournalError> {
        let len_bytes = payload.len() as u64;
        let max_bytes = self.max_payload_bytes();
        let payload_len = match u32::try_from(payload.len()) {
            Ok(n) if len_bytes <= max_bytes => n,
            _ => {
                return Err(JournalError::RecordTooLarge {
                    len_bytes,
                    max_bytes,
                })
            }
        };
        let span = record_span_bytes(len_bytes);
        let area = self.region.area_len_bytes;
        let mut s = self.state.lock();
        if s.failed {
            return Err(JournalError::PreviousIoFailed);
        }
        let wraps = s.head_off + span > area;
        let needed_bytes = if wraps {
            span + (area - s.head_off)
        } else {
            span
        };
        let free_bytes =
            self.region.capacity_bytes() - self.region.used_bytes(s.tail_off, s.head_off);
        if needed_bytes > free_bytes {
            return Err(JournalError::Full {
                needed_bytes,
                free_bytes,
            });
        }
        let lsn = s.next_lsn;
        let fields = RecordFields {
            kind: RecordKind::Wrap,
            lsn,
            epoch: self.epoch,
            session: self.session,
            nonce: self.nonce,
            durable_lsn: s.durable_lsn,
        };
        if wraps {
            let marker = encode_record(fields, &[], 0);
            let off = s.head_off;
            s.queued.push((off, marker, lsn));
            s.head_off = 0;
        }
        let rec = encode_record(
            RecordFields {
                kind: RecordKind::Transaction,
                ..fields
            },
            &payload,
            payload_len,
        );
        let off = s.head_off;
        s.queued.push((off, rec, lsn));
        s.offsets.push_back((lsn, off));
        s.head_off = (off + span) % area;
        s.next_lsn = Lsn(lsn.0 + 1);
        tracing::trace!(%lsn, len_bytes, "journal record queued");
        Ok(lsn)
    }

    /// Returns once record `lsn` (and every earlier one) is durable. Concurrent callers
    /// share writes and flushes: whoever finds no flush in progress writes everything
    /// queued so far in one go and flushes once; the others wait for it.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<(), JournalError> {
        let mut s = self.state.lock();
        loop {
            if s.failed {
                return Err(JournalError::PreviousIoFailed);
            }
            if s.durable_lsn >= lsn {
                return Ok(());
            }
            if lsn >= s.next_lsn {
                return Err(JournalError::NotSubmitted {
                    lsn,
                    next: s.next_lsn,
                });
            }
            if s.flushing {
                self.flushed.wait(&mut s);
                continue;
            }
            s.flushing = true;
            let batch = std::mem::take(&mut s.queued);
            let last = batch.last().map(|b| b.2).expect(
                "a submitted record that is not durable is queued (only a leader empties the queue, and it raises durable_lsn or fails the journal)",
            );
            drop(s);
            let result = self.write_batch(&batch, last);
            s = self.state.lock();
            s.flushing = false;
            match result {
                Ok(()) => {
                    s.durable_lsn = s.durable_lsn.max(last);
                    self.flushed.notify_all();
                }
                Err(e) => {
                    s.failed = true;
                    self.flushed.notify_all();
                    tracing::error!(error = %e, "journal write failed; journal refuses further work until reopened");
                    return Err(e);
                }
            }
        }
    }

    /// Writes a batch as runs of consecutive blocks, then flushes once. A batch that is one
    /// run (it does not wrap) is one write with FUA instead: durable when it returns, one
    /// request to the LUN rather than a write and then a flush.
    fn write_batch(&self, batch: &[(u64, Vec<u8>, Lsn)], last: Lsn) -> Result<(), JournalError> {
        let one_run = batch
            .windows(2)
            .all(|w| w[0].0 + w[0].1.len() as u64 == w[1].0);
        let flags = if one_run {
            WriteFlags::FUA
        } else {
            WriteFlags::default()
        };
        let mark = self.dev.write_loss_count();
        let mut i = 0;
        while i < batch.len() {
            let (start_off, _, first_lsn) = batch[i];
            let mut buf = Vec::new();
            let mut end_off = start_off;
            while let Some((off, bytes, _)) = batch.get(i) {
                if *off != end_off {
                    break;
                }
                buf.extend_from_slice(bytes);
                end_off += bytes.len() as u64;
                i += 1;
            }
            let at_bytes = self.region.area_start_bytes + start_off;
            self.dev.write_at(&buf, at_bytes, flags).map_err(|source| {
                JournalError::WriteRecords {
                    lsn: first_lsn,
                    at_bytes,
                    source,
                }
            })?;
        }
        if !one_run {
            block_client::flush_since(&*self.dev, mark)
                .map_err(|source| JournalError::Flush { lsn: last, source })?;
        }
        tracing::trace!(%last, records = batch.len(), "journal batch durable");
        Ok(())
    }

    /// Submits `payload` and waits until it is durable.
    pub fn append(&self, payload: Vec<u8>) -> Result<Lsn, JournalError> {
        let lsn = self.submit(payload)?;
        self.wait_durable(lsn)?;
        Ok(lsn)
    }

    /// Releases every record up to and including `upto`: the caller has written their
    /// effects home and flushed. Persists the new tail in the next header copy (a torn
    /// header write leaves the other copy in force), then frees the space.
    pub fn checkpoint(&self, upto: Lsn) -> Result<(), JournalError> {
        let mut header = self.header.lock();
        let (new_tail_lsn, new_tail_off) = {
            let s = self.state.lock();
            if s.failed {
                return Err(JournalError::PreviousIoFailed);
            }
            if upto > s.durable_lsn {
                return Err(JournalError::CheckpointBeyondDurable {
                    upto,
                    durable: s.durable_lsn,
                });
            }
            if upto < s.tail_lsn {
                return Ok(());
            }
            let new_tail_lsn = Lsn(upto.0 + 1);
            let off = s
                .offsets
                .iter()
                .find(|(l, _)| *l == new_tail_lsn)
                .map_or(s.head_off, |(_, o)| *o);
            (new_tail_lsn, off)
        };
        let next = HeaderInfo {
            generation: header.generation + 1,
            tail_lsn: new_tail_lsn,
            tail_offset_bytes: new_tail_off,
            ..header.clone()
        };
        let at_bytes = self.region.header_at(next.generation);
        let mark = self.dev.write_loss_count();
        let written = self
            .dev
            .write_at(&next.encode(), at_bytes, WriteFlags::default())
            .map_err(|source| JournalError::WriteHeader { at_bytes, source })
            .and_then(|()| {
                block_client::flush_since(&*self.dev, mark)
                    .map_err(|source| JournalError::Flush { lsn: upto, source })
            });
        let mut s = self.state.lock();
        if let Err(e) = written {
            s.failed = true;
            self.flushed.notify_all();
            tracing::error!(error = %e, "journal checkpoint failed; journal refuses further work until reopened");
            return Err(e);
        }
        *header = next;
        s.tail_lsn = new_tail_lsn;
        s.tail_off = new_tail_off;
        while s.offsets.front().is_some_and(|(l, _)| *l <= upto) {
            s.offsets.pop_front();
        }
        tracing::debug!(tail = %new_tail_lsn, "journal checkpointed");
        Ok(())
    }

    /// Bytes a new record may still use (its header and padding included).
    pub fn free_bytes(&self) -> u64 {
        let s = self.state.lock();
        self.region.capacity_bytes() - self.region.used_bytes(s.tail_off, s.head_off)
    }

    /// Bytes of the log held by records not yet checkpointed.
    pub fn used_bytes(&self) -> u64 {
        let s = self.state.lock();
        self.region.used_bytes(s.tail_off, s.head_off)
    }

    /// The Lsn the next submitted record gets.
    pub fn next_lsn(&self) -> Lsn {
        self.state.lock().next_lsn
    }

    /// Every record up to this one is durable.
    pub fn durable_lsn(&self) -> Lsn {
        self.state.lock().durable_lsn
    }

    /// First record not yet checkpointed.
    pub fn tail_lsn(&self) -> Lsn {
        self.state.lock().tail_lsn
    }

    /// The epoch this journal writes with.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// True after a failed write or flush (every call fails until reopened).
    pub fn has_failed(&self) -> bool {
        self.state.lock().failed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    use block_client::testing::{CrashDisk, CrashPoint, FailKind, FlakyDisk, MemDevice, OpClass};
    use block_client::BlockError;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const START: u64 = 8192;

    fn payload(tag: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((tag * 131 + i as u64 * 7) % 251).unwrap())
            .collect()
    }

    fn lsns(recs: &[Record]) -> Vec<u64> {
        recs.iter().map(|r| r.lsn.0).collect()
    }

    /// Counts writes and the points where data is made durable (flushes and FUA writes);
    /// those can be slowed down to make batching visible.
    #[derive(Debug)]
    struct Counting {
        inner: MemDevice,
        writes: AtomicU64,
        flushes: AtomicU64,
        flush_delay: std::time::Duration,
    }

    impl BlockDevice for Counting {
        fn size_bytes(&self) -> u64 {
            self.inner.size_bytes()
        }
        fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<(), BlockError> {
            self.inner.read_at(buf, offset_bytes)
        }
        fn write_at(
            &self,
            buf: &[u8],
            offset_bytes: u64,
            flags: WriteFlags,
        ) -> Result<(), BlockError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            if flags.fua {
                self.flushes.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(self.flush_delay);
            }
            self.inner.write_at(buf, offset_bytes, flags)
        }
        fn flush(&self) -> Result<(), BlockError> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.flush_delay);
            self.inner.flush()
        }
        fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
            self.inner.write_zeroes(offset_bytes, len_bytes)
        }
        fn trim(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), BlockError> {
            self.inner.trim(offset_bytes, len_bytes)
        }
    }

    fn fresh(len: u64) -> Arc<CrashDisk> {
        let d = Arc::new(CrashDisk::new(START + len + 4096));
        Journal::format(d.clone(), START, len, Epoch(1)).unwrap();
        d
    }

    #[test]
    fn round_trip_and_checkpoint() {
        let d = fresh(1 << 20);
        let (j, recs) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        assert!(recs.is_empty());
        assert_eq!(j.used_bytes(), 0);
        for i in 1..=10u64 {
            let lsn = j
                .append(payload(i, usize::try_from(i * 1000).unwrap()))
                .unwrap();
            assert_eq!(lsn, Lsn(i));
        }
        assert!(j.used_bytes() > 0);
        d.power_cut();
        let (j, recs) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        assert_eq!(lsns(&recs), (1..=10).collect::<Vec<_>>());
        for r in &recs {
            assert_eq!(
                r.payload,
                payload(r.lsn.0, usize::try_from(r.lsn.0 * 1000).unwrap())
            );
            assert_eq!(r.epoch, Epoch(1));
        }
        let before = j.used_bytes();
        j.checkpoint(Lsn(5)).unwrap();
        assert!(j.used_bytes() < before);
        assert_eq!(j.free_bytes() + j.used_bytes(), (1 << 20) - 3 * 4096);
        assert!(matches!(
            j.checkpoint(Lsn(11)),
            Err(JournalError::CheckpointBeyondDurable { .. })
        ));
        assert_eq!(j.append(b"x".to_vec()).unwrap(), Lsn(11));
        d.power_cut();
        let (_, recs) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        assert_eq!(lsns(&recs), (6..=11).collect::<Vec<_>>());
        let ro = Journal::replay_read_only(d.as_ref(), START, 1 << 20).unwrap();
        assert_eq!(lsns(&ro.records), (6..=11).collect::<Vec<_>>());
        assert_eq!(ro.next_lsn, Lsn(12));
    }

    #[test]
    fn wrap_around_with_full_and_checkpoint() {
        let len = 64 * 1024;
        let d = fresh(len);
        let (mut j, _) = Journal::open(d.clone(), START, len, Epoch(1)).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut live: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut fulls = 0;
        for i in 0..600u64 {
            let p = payload(i, rng.gen_range(0..9000));
            match j.append(p.clone()) {
                Ok(lsn) => {
                    live.insert(lsn.0, p);
                }
                Err(JournalError::Full { .. }) => {
                    fulls += 1;
                    let upto = j.durable_lsn();
                    j.checkpoint(upto).unwrap();
                    live.retain(|l, _| *l > upto.0);
                    let lsn = j.append(p.clone()).unwrap();
                    live.insert(lsn.0, p);
                }
                Err(e) => panic!("{e}"),
            }
            if i % 37 == 0 {
                d.power_cut();
                let (nj, recs) = Journal::open(d.clone(), START, len, Epoch(1)).unwrap();
                let got: BTreeMap<u64, Vec<u8>> =
                    recs.into_iter().map(|r| (r.lsn.0, r.payload)).collect();
                assert_eq!(got, live, "after append {i}");
                j = nj;
            }
        }
        assert!(fulls > 20, "the log wrapped many times ({fulls})");
        assert!(matches!(
            j.submit(vec![0; 40 * 1024]),
            Err(JournalError::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn torn_tail_ends_replay() {
        let d = fresh(1 << 20);
        let (j, _) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        for i in 1..=3 {
            j.append(payload(i, 5000)).unwrap();
        }
        d.tear_writes(Some(1));
        d.crash_at(CrashPoint::Write(1));
        assert!(j.append(payload(4, 9000)).is_err());
        assert!(matches!(
            j.append(vec![1]),
            Err(JournalError::PreviousIoFailed)
        ));
        d.power_cut();
        let (j, recs) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        assert_eq!(lsns(&recs), [1, 2, 3]);
        assert_eq!(j.append(vec![9]).unwrap(), Lsn(4));
    }

    fn record_offset(d: &CrashDisk, lsn: Lsn) -> usize {
        let img = d.durable_image();
        let area = usize::try_from(START + 2 * BLOCK_BYTES).unwrap();
        (area..img.len() - 4096)
            .step_by(4096)
            .find(|&o| {
                crate::format::parse_record_header(&img[o..o + 64])
                    .is_some_and(|h| h.lsn == lsn && h.kind == RecordKind::Transaction)
            })
            .unwrap()
    }

    fn flip(d: &CrashDisk, at: usize) -> Arc<CrashDisk> {
        let mut img = d.durable_image();
        img[at] ^= 0x40;
        Arc::new(CrashDisk::from_image(img))
    }

    #[test]
    fn damaged_durable_record_followed_by_good_ones_is_corruption() {
        let d = fresh(1 << 20);
        let (j, _) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        for i in 1..=5 {
            j.append(payload(i, 3000)).unwrap();
        }
        drop(j);
        let bad = flip(&d, record_offset(&d, Lsn(2)) + 100);
        let e = Journal::open(bad.clone(), START, 1 << 20, Epoch(1)).unwrap_err();
        assert!(matches!(e, ReplayError::Corrupt { .. }), "{e}");
        assert!(matches!(
            Journal::replay_read_only(bad.as_ref(), START, 1 << 20),
            Err(ReplayError::Corrupt { .. })
        ));
        // The last record of the last batch: indistinguishable from a torn write.
        let last = flip(&d, record_offset(&d, Lsn(5)) + 70);
        let (_, recs) = Journal::open(last, START, 1 << 20, Epoch(1)).unwrap();
        assert_eq!(lsns(&recs), [1, 2, 3, 4]);
        // Once a later open replayed record 5, losing it is corruption too.
        let (_, recs) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        assert_eq!(recs.len(), 5);
        let e = Journal::open(
            flip(&d, record_offset(&d, Lsn(5)) + 70),
            START,
            1 << 20,
            Epoch(1),
        )
        .unwrap_err();
        assert!(matches!(e, ReplayError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn torn_batch_is_not_corruption_and_its_leftovers_stay_dead() {
        let d = fresh(1 << 20);
        let (j, _) = Journal::open(d.clone(), START, 1 << 20, Epoch(1)).unwrap();
        for i in 1..=3 {
            j.append(payload(i, 3000)).unwrap();
        }
        // One batch of 4 and 5; the sectors of 4 never reached the disk, 5's did.
        j.submit(payload(4, 3000)).unwrap();
        let l5 = j.submit(payload(5, 3000)).unwrap();
        j.wait_durable(l5).unwrap();
        drop(j);
        let torn = flip(&d, record_offset(&d, Lsn(4)) + 10);
        let (j, recs) = Journal::open(torn.clone(), START, 1 << 20, Epoch(1)).unwrap();
        assert_eq!(lsns(&recs), [1, 2, 3]);
        // A new record 4 of the same size puts the old 5 exactly where 5 would go.
        assert_eq!(j.append(payload(40, 3000)).unwrap(), Lsn(4));
        drop(j);
        let (_, recs) = Journal::open(torn.clone(), START, 1 << 20, Epoch(1)).unwrap();
        assert_eq!(lsns(&recs), [1, 2, 3, 4]);
        assert_eq!(recs[3].payload, payload(40, 3000));
    }

    #[test]
    fn failover_replays_older_epoch_and_ignores_fenced_leftovers() {
        let d = fresh(1 << 20);
        let (a, _) = Journal::open(d.clone(), START, 1 << 20, Epoch(5)).unwrap();
        for i in 1..=3 {
            a.append(payload(i, 100)).unwrap();
        }
        // B takes over with epoch 6 and replays A's records, which are valid.
        let (b, recs) = Journal::open(d.clone(), START, 1 << 20, Epoch(6)).unwrap();
        assert_eq!(lsns(&recs), [1, 2, 3]);
        assert!(recs.iter().all(|r| r.epoch == Epoch(5)));
        // A, fenced but not yet stopped, writes 4, 5, 6; B then writes its own 4 over A's.
        for i in 4..=6 {
            a.append(payload(i, 100)).unwrap();
        }
        assert_eq!(b.append(payload(44, 100)).unwrap(), Lsn(4));
        let (_, recs) = Journal::open(d.clone(), START, 1 << 20, Epoch(7)).unwrap();
        assert_eq!(lsns(&recs), [1, 2, 3, 4]);
        assert_eq!(recs[3].epoch, Epoch(6));
        assert_eq!(recs[3].payload, payload(44, 100));
        // An old coordinator cannot open a journal a newer one has opened.
        assert!(matches!(
            Journal::open(d.clone(), START, 1 << 20, Epoch(6)),
            Err(ReplayError::Fenced {
                ours: Epoch(6),
                journal: Epoch(7)
            })
        ));
        // A stale handle's record right at the head of a session that wrote nothing yet
        // (same epoch: only the session tells them apart).
        let d2 = fresh(1 << 20);
        let (a, _) = Journal::open(d2.clone(), START, 1 << 20, Epoch(5)).unwrap();
        for i in 1..=3 {
            a.append(payload(i, 100)).unwrap();
        }
        let (_b, _) = Journal::open(d2.clone(), START, 1 << 20, Epoch(5)).unwrap();
        assert_eq!(a.append(payload(4, 100)).unwrap(), Lsn(4));
        let (_, recs) = Journal::open(d2.clone(), START, 1 << 20, Epoch(5)).unwrap();
        assert_eq!(lsns(&recs), [1, 2, 3]);
    }

    #[test]
    fn group_commit_batches_writes_and_flushes() {
        let dev = Arc::new(Counting {
            inner: MemDevice::new(START + (8 << 20)),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush_delay: std::time::Duration::from_millis(2),
        });
        Journal::format(dev.clone(), START, 8 << 20, Epoch(1)).unwrap();
        let (j, _) = Journal::open(dev.clone(), START, 8 << 20, Epoch(1)).unwrap();
        let (w0, f0) = (
            dev.writes.load(Ordering::SeqCst),
            dev.flushes.load(Ordering::SeqCst),
        );
        let mut last = Lsn(0);
        for i in 0..10 {
            last = j.submit(payload(i, 200)).unwrap();
        }
        j.wait_durable(last).unwrap();
        assert_eq!(dev.writes.load(Ordering::SeqCst) - w0, 1);
        assert_eq!(dev.flushes.load(Ordering::SeqCst) - f0, 1);
        j.wait_durable(Lsn(3)).unwrap();
        assert_eq!(
            dev.flushes.load(Ordering::SeqCst) - f0,
            1,
            "already durable"
        );

        let f1 = dev.flushes.load(Ordering::SeqCst);
        let j = Arc::new(j);
        let threads = 16u64;
        let per = 25u64;
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        j.append(payload(t * 1000 + i, 300)).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let flushes = dev.flushes.load(Ordering::SeqCst) - f1;
        assert!(
            flushes * 3 < threads * per,
            "{flushes} flushes for {} appends",
            threads * per
        );
        drop(j);
        let (_, recs) = Journal::open(dev.clone(), START, 8 << 20, Epoch(1)).unwrap();
        assert_eq!(recs.len() as u64, 10 + threads * per);
    }

    #[test]
    fn failed_durable_write_is_sticky_until_reopen() {
        let flaky = Arc::new(FlakyDisk::new(MemDevice::new(START + (1 << 20))));
        Journal::format(flaky.clone(), START, 1 << 20, Epoch(1)).unwrap();
        let (j, _) = Journal::open(flaky.clone(), START, 1 << 20, Epoch(1)).unwrap();
        j.append(vec![1]).unwrap();
        // A batch that does not wrap is made durable by its write (FUA), not by a flush.
        flaky
            .handle()
            .fail_nth(OpClass::Write, 1, FailKind::Device(5));
        assert!(matches!(
            j.append(vec![2]),
            Err(JournalError::WriteRecords { .. })
        ));
        assert!(j.has_failed());
        assert!(matches!(
            j.append(vec![3]),
            Err(JournalError::PreviousIoFailed)
        ));
        assert!(matches!(
            j.submit(vec![3]),
            Err(JournalError::PreviousIoFailed)
        ));
        assert!(matches!(
            j.checkpoint(Lsn(1)),
            Err(JournalError::PreviousIoFailed)
        ));
        flaky.handle().heal();
        let (j, recs) = Journal::open(flaky.clone(), START, 1 << 20, Epoch(1)).unwrap();
        // Record 2's write failed: it never reached the device.
        assert_eq!(lsns(&recs), [1]);
        let four = j.append(vec![4]).unwrap();
        flaky
            .handle()
            .fail_nth(OpClass::Write, 1, FailKind::Device(5));
        assert!(matches!(
            j.checkpoint(four),
            Err(JournalError::WriteHeader { .. })
        ));
        assert!(matches!(
            j.append(vec![5]),
            Err(JournalError::PreviousIoFailed)
        ));
    }

    #[test]
    fn bad_region_and_headers_are_refused() {
        let d = Arc::new(CrashDisk::new(1 << 20));
        assert!(matches!(
            Journal::format(d.clone(), 0, 2 << 20, Epoch(1)),
            Err(JournalError::InvalidRegion { .. })
        ));
        assert!(matches!(
            Journal::format(d.clone(), 0, 16384, Epoch(1)),
            Err(JournalError::InvalidRegion { .. })
        ));
        assert!(matches!(
            Journal::open(d.clone(), 0, 1 << 19, Epoch(1)),
            Err(ReplayError::Corrupt { .. })
        ));
        Journal::format(d.clone(), 0, 1 << 19, Epoch(1)).unwrap();
        assert!(matches!(
            Journal::open(d.clone(), 0, 1 << 18, Epoch(1)),
            Err(ReplayError::Corrupt { .. })
        ));
        // A torn header write leaves the other copy in force.
        let (j, _) = Journal::open(d.clone(), 0, 1 << 19, Epoch(1)).unwrap();
        j.append(vec![1]).unwrap();
        j.append(vec![2]).unwrap();
        d.crash_at(CrashPoint::Write(1));
        assert!(j.checkpoint(Lsn(1)).is_err());
        d.power_cut();
        let (_, recs) = Journal::open(d.clone(), 0, 1 << 19, Epoch(1)).unwrap();
        assert_eq!(lsns(&recs), [1, 2]);
    }

    /// One run of a seeded workload against `d`, stopping at the first error. Returns the
    /// acknowledged records (lsn -> payload) and the highest Lsn a checkpoint was asked for. `known` holds what every submitted Lsn carries (updated here).
    fn workload(
        d: &Arc<CrashDisk>,
        len: u64,
        seed: u64,
        steps: u64,
        known: &mut BTreeMap<u64, Vec<u8>>,
        acked: &mut BTreeMap<u64, Vec<u8>>,
        checkpointed: &mut u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let Ok((mut j, _)) = Journal::open(d.clone(), START, len, Epoch(1)) else {
            return;
        };
        for step in 0..steps {
            let r = rng.gen_range(0..100);
            if r < 8 {
                // Reopen without a crash.
                match Journal::open(d.clone(), START, len, Epoch(1)) {
                    Ok((nj, _)) => j = nj,
                    Err(_) => return,
                }
                continue;
            }
            if r < 20 {
                // The caller wrote everything up to `upto` home before it asked, so a
                // checkpoint that failed may still have moved the tail.
                let upto = j.durable_lsn();
                *checkpointed = (*checkpointed).max(upto.0);
                if j.checkpoint(upto).is_err() {
                    return;
                }
                continue;
            }
            let n = if r < 40 { rng.gen_range(2..6) } else { 1 };
            let mut subs = Vec::new();
            for k in 0..n {
                let p = payload(seed * 1_000_000 + step * 10 + k, rng.gen_range(0..7000));
                match j.submit(p.clone()) {
                    Ok(lsn) => {
                        known.insert(lsn.0, p.clone());
                        subs.push((lsn, p));
                    }
                    Err(JournalError::Full { .. }) => {
                        let upto = j.durable_lsn();
                        *checkpointed = (*checkpointed).max(upto.0);
                        if j.checkpoint(upto).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            if let Some((last, _)) = subs.last() {
                if j.wait_durable(*last).is_err() {
                    return;
                }
                for (lsn, p) in subs {
                    acked.insert(lsn.0, p);
                }
            }
        }
    }

    fn check_recovered(
        d: &Arc<CrashDisk>,
        len: u64,
        known: &mut BTreeMap<u64, Vec<u8>>,
        acked: &mut BTreeMap<u64, Vec<u8>>,
        checkpointed: u64,
        what: &str,
    ) {
        let (_, recs) = Journal::open(d.clone(), START, len, Epoch(1))
            .unwrap_or_else(|e| panic!("{what}: open after crash: {e}"));
        let got: BTreeMap<u64, Vec<u8>> =
            recs.iter().map(|r| (r.lsn.0, r.payload.clone())).collect();
        let l = lsns(&recs);
        assert!(
            l.windows(2).all(|w| w[1] == w[0] + 1),
            "{what}: gap in {l:?}"
        );
        for (lsn, p) in acked.iter() {
            if *lsn > checkpointed {
                assert!(
                    got.get(lsn) == Some(p),
                    "{what}: acknowledged lsn {lsn} lost"
                );
            }
        }
        for r in &recs {
            assert!(
                known.get(&r.lsn.0) == Some(&r.payload),
                "{what}: {} is not what was submitted",
                r.lsn
            );
        }
        // What replayed is now the truth; Lsns after it will be reused.
        let next = l.last().map_or(0, |x| x + 1);
        if next > 0 {
            known.retain(|k, _| *k < next);
            acked.retain(|k, _| *k < next);
        }
        for (lsn, p) in got {
            acked.insert(lsn, p);
        }
    }

    #[test]
    fn power_cut_at_every_write_keeps_every_acknowledged_record() {
        let len = 96 * 1024;
        // Count the writes of an uninterrupted run.
        let d = fresh(len);
        let base = d.writes_seen();
        let (mut k, mut a, mut c) = (BTreeMap::new(), BTreeMap::new(), 0);
        workload(&d, len, 1, 120, &mut k, &mut a, &mut c);
        let total = d.writes_seen() - base;
        assert!(total > 100, "workload too small: {total} writes");
        let mut runs = 0;
        for tear in [None, Some(1), Some(3)] {
            for n in 1..=total + 1 {
                let d = fresh(len);
                d.tear_writes(tear);
                d.crash_at(CrashPoint::Write(n));
                let (mut known, mut acked, mut cp) = (BTreeMap::new(), BTreeMap::new(), 0);
                workload(&d, len, 1, 120, &mut known, &mut acked, &mut cp);
                d.power_cut();
                let what = format!("crash at write {n} tear {tear:?}");
                check_recovered(&d, len, &mut known, &mut acked, cp, &what);
                // Keep going on the recovered journal and crash again further on.
                d.crash_at(CrashPoint::Write(n % 17 + 3));
                workload(&d, len, 2, 40, &mut known, &mut acked, &mut cp);
                d.power_cut();
                check_recovered(
                    &d,
                    len,
                    &mut known,
                    &mut acked,
                    cp,
                    &format!("{what}, then again"),
                );
                runs += 1;
            }
        }
        assert!(runs > 300);
    }
}
