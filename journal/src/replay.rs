//! Recovery: reads the newest valid header, then walks the log from the tail.
//!
//! ```text
//!   pick header (valid copy, highest generation)
//!        │
//!        ▼
//!   at (pos, expected lsn) ── valid record, lsn == expected, not stale ──► collect, advance
//!        │                 ── valid wrap marker, lsn == expected ────────► pos = 0
//!        │ anything else (bad magic/nonce/CRC, other lsn, stale session/epoch)
//!        ▼
//!   end of log at (pos, expected) ── was `expected` already replayed by the session's
//!        │                             opener (expected < session_start)? ─► Corrupt
//!        │                         ── is there an intact record of the current session
//!        │                             with a higher lsn written after `expected` was
//!        │                             durable (its durable_lsn >= expected)? ─► Corrupt
//!        ▼
//!   Ok: records tail..expected-1, head = pos
//! ```
//!
//! A record is stale (ends the log, never replayed) when its session is older than the
//! record before it, when it lies in the current session's range (lsn >= session_start)
//! but was written by another session, or when its epoch is older than the record before
//! it. That is how leftovers of a crashed or fenced writer, which can carry consecutive
//! Lsns and good CRCs, never come back to life after the head.

use block_client::BlockDevice;

use crate::error::ReplayError;
use crate::format::{
    parse_record_header, record_crc_ok, HeaderInfo, RecordHeader, RecordKind, BLOCK_BYTES,
    HEADER_COPIES, RECORD_HEADER_BYTES,
};
use crate::ids::{Epoch, Lsn};

/// A complete record returned by replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub lsn: Lsn,
    /// Epoch of the coordinator that wrote it.
    pub epoch: Epoch,
    /// The transaction, as submitted.
    pub payload: Vec<u8>,
}

/// Geometry of a journal region on a device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Region {
    /// Device offset of header copy A.
    pub start_bytes: u64,
    /// Region length as given.
    pub len_bytes: u64,
    /// Device offset of the log area.
    pub area_start_bytes: u64,
    /// Length of the log area (a multiple of the block size).
    pub area_len_bytes: u64,
}

impl Region {
    /// Checks a region against a device; `Err` holds the reason.
    pub fn new(dev_size: u64, start_bytes: u64, len_bytes: u64) -> Result<Region, &'static str> {
        if start_bytes % 512 != 0 || len_bytes % 512 != 0 {
            return Err("start and length must be multiples of 512 bytes");
        }
        match start_bytes.checked_add(len_bytes) {
            Some(end) if end <= dev_size => {}
            _ => return Err("region extends past the end of the device"),
        }
        let header_bytes = HEADER_COPIES * BLOCK_BYTES;
        let area = len_bytes.saturating_sub(header_bytes) / BLOCK_BYTES * BLOCK_BYTES;
        if area < 4 * BLOCK_BYTES {
            return Err("region too small: needs two header blocks and four log blocks (24 KiB)");
        }
        Ok(Region {
            start_bytes,
            len_bytes,
            area_start_bytes: start_bytes + header_bytes,
            area_len_bytes: area,
        })
    }

    /// Device offset of header copy `slot` (0 or 1).
    pub fn header_at(&self, slot: u64) -> u64 {
        self.start_bytes + (slot % HEADER_COPIES) * BLOCK_BYTES
    }

    /// Usable bytes: the log never fills its last block, so head == tail means empty.
    pub fn capacity_bytes(&self) -> u64 {
        self.area_len_bytes - BLOCK_BYTES
    }

    /// Bytes between `tail` and `head` going forward around the area.
    pub fn used_bytes(&self, tail: u64, head: u64) -> u64 {
        (head + self.area_len_bytes - tail) % self.area_len_bytes
    }
}

/// Reads the log area through a window of up to 1 MiB.
struct AreaReader<'a> {
    dev: &'a dyn BlockDevice,
    region: Region,
    win_off: u64,
    win: Vec<u8>,
}

const WINDOW_BYTES: u64 = 1 << 20;

impl<'a> AreaReader<'a> {
    fn new(dev: &'a dyn BlockDevice, region: Region) -> AreaReader<'a> {
        AreaReader {
            dev,
            region,
            win_off: 0,
            win: Vec::new(),
        }
    }

    /// Bytes `off..off+len` of the log area (which must not cross its end).
    fn get(&mut self, off: u64, len: u64) -> Result<&[u8], ReplayError> {
        let win_end = self.win_off + self.win.len() as u64;
        if off < self.win_off || off + len > win_end {
            let want = len.max(WINDOW_BYTES).min(self.region.area_len_bytes - off);
            let want = usize::try_from(want).map_err(|_| ReplayError::Corrupt {
                what: "record length does not fit in memory".to_string(),
                at_bytes: self.region.area_start_bytes + off,
            })?;
            self.win.resize(want, 0);
            let at_bytes = self.region.area_start_bytes + off;
            self.dev
                .read_at(&mut self.win, at_bytes)
                .map_err(|source| ReplayError::Read { at_bytes, source })?;
            self.win_off = off;
        }
        let lo =
            usize::try_from(off - self.win_off).expect("inside the window, which is in memory");
        let n = usize::try_from(len).expect("inside the window, which is in memory");
        Ok(&self.win[lo..lo + n])
    }

    /// The record whose header is at `off`, if it is complete: header parses, nonce
    /// matches, length stays inside the area, CRC matches. Returns header and payload.
    fn record_at(
        &mut self,
        off: u64,
        nonce: u64,
    ) -> Result<Option<(RecordHeader, Vec<u8>)>, ReplayError> {
        let area = self.region.area_len_bytes;
        let head_bytes = self.get(off, RECORD_HEADER_BYTES)?.to_vec();
        let Some(h) = parse_record_header(&head_bytes) else {
            return Ok(None);
        };
        if h.nonce != nonce || off + h.span_bytes() > area {
            return Ok(None);
        }
        let payload = self
            .get(off + RECORD_HEADER_BYTES, u64::from(h.payload_len))?
            .to_vec();
        if !record_crc_ok(&head_bytes, &payload, h.crc) {
            return Ok(None);
        }
        Ok(Some((h, payload)))
    }
}

/// Reads both header copies and returns the valid one with the highest generation.
pub(crate) fn read_header(
    dev: &dyn BlockDevice,
    region: &Region,
) -> Result<(HeaderInfo, u64), ReplayError> {
    let mut best: Option<(HeaderInfo, u64)> = None;
    let mut reasons = Vec::new();
    for slot in 0..HEADER_COPIES {
        let at_bytes = region.header_at(slot);
        let mut buf = vec![0u8; 512];
        dev.read_at(&mut buf, at_bytes)
            .map_err(|source| ReplayError::Read { at_bytes, source })?;
        match HeaderInfo::decode(&buf) {
            Ok(h) => {
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| h.generation > b.generation)
                {
                    best = Some((h, slot));
                }
            }
            Err(why) => {
                tracing::debug!(slot, why, "journal header copy not valid");
                reasons.push(why);
            }
        }
    }
    let Some((h, slot)) = best else {
        return Err(ReplayError::Corrupt {
            what: format!(
                "neither journal header copy is valid ({})",
                reasons.join(", ")
            ),
            at_bytes: region.start_bytes,
        });
    };
    let at_bytes = region.header_at(slot);
    let corrupt = |what: &str| ReplayError::Corrupt {
        what: what.to_string(),
        at_bytes,
    };
    if h.region_len_bytes != region.len_bytes {
        return Err(corrupt(
            "journal header region length differs from the region given",
        ));
    }
    if h.tail_offset_bytes % BLOCK_BYTES != 0 || h.tail_offset_bytes >= region.area_len_bytes {
        return Err(corrupt("journal header tail offset outside the log area"));
    }
    if h.tail_lsn.0 == 0 {
        return Err(corrupt("journal header tail is lsn 0"));
    }
    Ok((h, slot))
}

/// The state found by a replay.
#[derive(Debug, Clone)]
pub(crate) struct Replayed {
    /// Header in force.
    pub header: HeaderInfo,
    /// Complete records from the tail, in order.
    pub records: Vec<Record>,
    /// Log-area offset of each record, in the same order.
    pub offsets: Vec<u64>,
    /// Where the next record goes.
    pub head_offset_bytes: u64,
    /// The Lsn the next record gets.
    pub next_lsn: Lsn,
}

/// Why replay stopped (for logs).
#[derive(Debug, Clone, Copy)]
enum EndReason {
    NoRecord,
    OtherLsn(Lsn),
    StaleSession(u64),
    StaleEpoch(Epoch),
    WrapAtStart,
    OverCapacity,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::NoRecord => write!(f, "no intact record there"),
            EndReason::OtherLsn(l) => write!(f, "found {l} instead"),
            EndReason::StaleSession(s) => write!(f, "record of stale session {s}"),
            EndReason::StaleEpoch(e) => write!(f, "record of stale {e}"),
            EndReason::WrapAtStart => write!(f, "wrap marker at the start of the log area"),
            EndReason::OverCapacity => write!(f, "record would exceed the log capacity"),
        }
    }
}

/// Replays the log of `region` without writing anything.
pub(crate) fn replay(dev: &dyn BlockDevice, region: Region) -> Result<Replayed, ReplayError> {
    let (header, _) = read_header(dev, &region)?;
    let mut rd = AreaReader::new(dev, region);
    let area = region.area_len_bytes;
    let mut pos = header.tail_offset_bytes;
    let mut expect = header.tail_lsn;
    let mut used = 0u64;
    let mut last_session = 0u64;
    let mut last_epoch = Epoch(0);
    let mut records = Vec::new();
    let mut offsets = Vec::new();
    let end = loop {
        if pos == area {
            pos = 0;
        }
        let Some((h, payload)) = rd.record_at(pos, header.nonce)? else {
            break EndReason::NoRecord;
        };
        if h.lsn != expect {
            break EndReason::OtherLsn(h.lsn);
        }
        if h.session > header.session || h.epoch > header.epoch {
            return Err(ReplayError::Corrupt {
                what: format!(
                    "record {} claims session {} / {} beyond the header's session {} / {}",
                    h.lsn, h.session, h.epoch, header.session, header.epoch
                ),
                at_bytes: region.area_start_bytes + pos,
            });
        }
        let in_current = expect >= header.session_start_lsn;
        if h.session < last_session || (in_current && h.session != header.session) {
            break EndReason::StaleSession(h.session);
        }
        if h.epoch < last_epoch || (in_current && h.epoch != header.epoch) {
            break EndReason::StaleEpoch(h.epoch);
        }
        if h.kind == RecordKind::Wrap {
            if pos == 0 {
                break EndReason::WrapAtStart;
            }
            let waste = area - pos;
            if used + waste > region.capacity_bytes() {
                break EndReason::OverCapacity;
            }
            used += waste;
            pos = 0;
            last_session = h.session;
            last_epoch = h.epoch;
            continue;
        }
        let span = h.span_bytes();
        if used + span > region.capacity_bytes() {
            break EndReason::OverCapacity;
        }
        records.push(Record {
            lsn: h.lsn,
            epoch: h.epoch,
            payload,
        });
        offsets.push(pos);
        used += span;
        pos += span;
        expect = Lsn(expect.0 + 1);
        last_session = h.session;
        last_epoch = h.epoch;
    };
    let at_bytes = region.area_start_bytes + pos;
    tracing::debug!(%end, %expect, at_bytes, records = records.len(), "journal replay reached end of log");
    if expect < header.session_start_lsn {
        return Err(ReplayError::Corrupt {
            what: format!(
                "record {expect} was replayed when the journal was last opened but is now unreadable: {end}"
            ),
            at_bytes,
        });
    }
    // Look for evidence that the record at the end of the log had been durable: an intact
    // record of the current session, with a higher Lsn, written after `expect` was flushed.
    let mut off = pos;
    let free = area - used;
    let mut scanned = 0u64;
    while scanned < free {
        if off == area {
            off = 0;
        }
        if let Some((h, _)) = rd.record_at(off, header.nonce)? {
            if h.session == header.session
                && h.epoch == header.epoch
                && h.lsn > expect
                && h.durable_lsn >= expect
            {
                return Err(ReplayError::Corrupt {
                    what: format!(
                        "record {expect} is damaged or missing ({end}) but {}, written after it was durable, is intact at byte {}",
                        h.lsn,
                        region.area_start_bytes + off
                    ),
                    at_bytes,
                });
            }
        }
        off += BLOCK_BYTES;
        scanned += BLOCK_BYTES;
    }
    Ok(Replayed {
        header,
        records,
        offsets,
        head_offset_bytes: pos,
        next_lsn: expect,
    })
}
