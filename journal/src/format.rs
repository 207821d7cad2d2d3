//! On-disk layout of the journal region: the two header copies and the record framing.
//! Specified byte for byte in metadata-server/FORMAT.md ("Journal").
//!
//! ```text
//! region start                                                        region end
//! | header A (4 KiB) | header B (4 KiB) | log area: records, circular ... | unused |
//!                                        ^ area offset 0                   (< 4 KiB)
//! ```
//!
//! Every record starts on a 4 KiB boundary of the log area and occupies a whole number of
//! 4 KiB journal blocks: a 64-byte record header, the payload, zero padding.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ids::{Epoch, Lsn};

/// Size of a journal block: the unit of record alignment and of each header copy.
pub const BLOCK_BYTES: u64 = 4096;
/// Number of header copies at the start of the region.
pub const HEADER_COPIES: u64 = 2;
/// Magic of a journal header copy.
pub const HEADER_MAGIC: [u8; 8] = *b"CSVJHDR1";
/// Magic of a journal record.
pub const RECORD_MAGIC: [u8; 4] = *b"CJR1";
/// Journal format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the record header that precedes every payload.
pub const RECORD_HEADER_BYTES: u64 = 64;
/// Size of the encoded header structure inside its 4 KiB block.
pub const HEADER_BYTES: u64 = 512;

/// Header copy, at region offset 0 (copy A) and 4096 (copy B).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawJournalHeader {
    /// [`HEADER_MAGIC`].
    pub magic: [u8; 8],
    /// [`FORMAT_VERSION`].
    pub version: U32,
    /// Journal block size in bytes (4096).
    pub block_bytes: U32,
    /// Incremented on every header write; the valid copy with the highest value wins.
    pub generation: U64,
    /// Random identifier chosen at format; every record carries it.
    pub nonce: U64,
    /// Length of the whole journal region in bytes, as formatted.
    pub region_len_bytes: U64,
    /// Lsn of the first record not yet checkpointed (where replay starts).
    pub tail_lsn: U64,
    /// Offset of that record inside the log area, in bytes.
    pub tail_offset_bytes: U64,
    /// Open counter: bumped (and made durable) every time a writer opens the journal.
    pub session: U64,
    /// First Lsn the current session may write (the head when it opened).
    pub session_start_lsn: U64,
    /// Coordinator epoch of the writer that opened the current session.
    pub epoch: U64,
    /// Zero.
    pub reserved: [u8; 428],
    /// CRC32 of bytes 0..508.
    pub crc: U32,
}
const _: () = assert!(size_of::<RawJournalHeader>() == 512);

/// Record header, at the start of every record.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRecordHeader {
    /// [`RECORD_MAGIC`].
    pub magic: [u8; 4],
    /// [`RecordKind`] value.
    pub kind: U16,
    /// Zero.
    pub reserved0: U16,
    /// Payload length in bytes (0 for a wrap record).
    pub payload_len: U32,
    /// Zero.
    pub reserved1: U32,
    /// Sequence number; a wrap record carries the Lsn of the record that follows it.
    pub lsn: U64,
    /// Coordinator epoch of the writer.
    pub epoch: U64,
    /// Session of the writer (see [`RawJournalHeader::session`]).
    pub session: U64,
    /// The journal's nonce.
    pub nonce: U64,
    /// Every record with an Lsn up to this one was durable before this record was written.
    pub durable_lsn: U64,
    /// Zero.
    pub reserved2: U32,
    /// CRC32 of header bytes 0..60 followed by the payload.
    pub crc: U32,
}
const _: () = assert!(size_of::<RawRecordHeader>() == 64);

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// 0 is never valid.
    Invalid = 0,
    /// A metadata transaction (payload opaque to the journal).
    Transaction = 1,
    /// Wrap marker: the record with this Lsn is at log area offset 0.
    Wrap = 2,
}

impl RecordKind {
    fn from_u16(v: u16) -> RecordKind {
        match v {
            1 => RecordKind::Transaction,
            2 => RecordKind::Wrap,
            _ => RecordKind::Invalid,
        }
    }
}

/// A validated journal header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    /// Header write counter.
    pub generation: u64,
    /// Journal nonce.
    pub nonce: u64,
    /// Region length as formatted.
    pub region_len_bytes: u64,
    /// Replay start.
    pub tail_lsn: Lsn,
    /// Replay start offset inside the log area.
    pub tail_offset_bytes: u64,
    /// Current session.
    pub session: u64,
    /// First Lsn of the current session.
    pub session_start_lsn: Lsn,
    /// Epoch of the current session's writer.
    pub epoch: Epoch,
}

impl HeaderInfo {
    /// Encodes into a full 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = RawJournalHeader {
            magic: HEADER_MAGIC,
            version: U32::new(FORMAT_VERSION),
            block_bytes: U32::new(4096),
            generation: U64::new(self.generation),
            nonce: U64::new(self.nonce),
            region_len_bytes: U64::new(self.region_len_bytes),
            tail_lsn: U64::new(self.tail_lsn.0),
            tail_offset_bytes: U64::new(self.tail_offset_bytes),
            session: U64::new(self.session),
            session_start_lsn: U64::new(self.session_start_lsn.0),
            epoch: U64::new(self.epoch.0),
            reserved: [0; 428],
            crc: U32::new(0),
        };
        let crc = crc32fast::hash(&raw.as_bytes()[..508]);
        raw.crc = U32::new(crc);
        let mut block = vec![0u8; 4096];
        block[..512].copy_from_slice(raw.as_bytes());
        block
    }

    /// Decodes a header copy; `Err` says why it is not valid.
    pub fn decode(bytes: &[u8]) -> Result<HeaderInfo, &'static str> {
        let (raw, _) = RawJournalHeader::read_from_prefix(bytes).map_err(|_| "short header")?;
        if raw.magic != HEADER_MAGIC {
            return Err("bad magic");
        }
        let crc = crc32fast::hash(&raw.as_bytes()[..508]);
        if crc != raw.crc.get() {
            return Err("bad crc");
        }
        if raw.version.get() != FORMAT_VERSION {
            return Err("unknown journal format version");
        }
        if u64::from(raw.block_bytes.get()) != BLOCK_BYTES {
            return Err("unsupported journal block size");
        }
        Ok(HeaderInfo {
            generation: raw.generation.get(),
            nonce: raw.nonce.get(),
            region_len_bytes: raw.region_len_bytes.get(),
            tail_lsn: Lsn(raw.tail_lsn.get()),
            tail_offset_bytes: raw.tail_offset_bytes.get(),
            session: raw.session.get(),
            session_start_lsn: Lsn(raw.session_start_lsn.get()),
            epoch: Epoch(raw.epoch.get()),
        })
    }
}

/// The fields of a record header that has the right magic and a known kind. Its CRC is
/// not yet checked (that needs the payload): see [`record_crc_ok`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Kind.
    pub kind: RecordKind,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Sequence number.
    pub lsn: Lsn,
    /// Writer's epoch.
    pub epoch: Epoch,
    /// Writer's session.
    pub session: u64,
    /// Journal nonce.
    pub nonce: u64,
    /// Durable watermark when written.
    pub durable_lsn: Lsn,
    /// Stored CRC.
    pub crc: u32,
}

impl RecordHeader {
    /// Bytes the record occupies in the log area (header + payload, rounded up to a block).
    pub fn span_bytes(&self) -> u64 {
        record_span_bytes(u64::from(self.payload_len))
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies in the log area.
pub fn record_span_bytes(payload_len: u64) -> u64 {
    (RECORD_HEADER_BYTES + payload_len).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
}

/// Parses the first 64 bytes of a block as a record header (magic and kind only).
pub fn parse_record_header(bytes: &[u8]) -> Option<RecordHeader> {
    let (raw, _) = RawRecordHeader::read_from_prefix(bytes).ok()?;
    if raw.magic != RECORD_MAGIC {
        return None;
    }
    let kind = RecordKind::from_u16(raw.kind.get());
    if kind == RecordKind::Invalid {
        return None;
    }
    if kind == RecordKind::Wrap && raw.payload_len.get() != 0 {
        return None;
    }
    Some(RecordHeader {
        kind,
        payload_len: raw.payload_len.get(),
        lsn: Lsn(raw.lsn.get()),
        epoch: Epoch(raw.epoch.get()),
        session: raw.session.get(),
        nonce: raw.nonce.get(),
        durable_lsn: Lsn(raw.durable_lsn.get()),
        crc: raw.crc.get(),
    })
}

/// Checks a record's CRC: `header_bytes` are its first 64 bytes, `payload` its payload.
pub fn record_crc_ok(header_bytes: &[u8], payload: &[u8], stored: u32) -> bool {
    let Some(covered) = header_bytes.get(..60) else {
        return false;
    };
    let mut h = crc32fast::Hasher::new();
    h.update(covered);
    h.update(payload);
    h.finalize() == stored
}

/// Fields of a record to encode.
#[derive(Debug, Clone, Copy)]
pub struct RecordFields {
    /// Kind.
    pub kind: RecordKind,
    /// Sequence number.
    pub lsn: Lsn,
    /// Writer's epoch.
    pub epoch: Epoch,
    /// Writer's session.
    pub session: u64,
    /// Journal nonce.
    pub nonce: u64,
    /// Durable watermark.
    pub durable_lsn: Lsn,
}

/// Encodes a record, padded with zeros to a whole number of blocks. `payload.len()` must
/// fit in a `u32` (checked by the caller).
pub fn encode_record(f: RecordFields, payload: &[u8], payload_len: u32) -> Vec<u8> {
    let mut raw = RawRecordHeader {
        magic: RECORD_MAGIC,
        kind: U16::new(f.kind as u16),
        reserved0: U16::new(0),
        payload_len: U32::new(payload_len),
        reserved1: U32::new(0),
        lsn: U64::new(f.lsn.0),
        epoch: U64::new(f.epoch.0),
        session: U64::new(f.session),
        nonce: U64::new(f.nonce),
        durable_lsn: U64::new(f.durable_lsn.0),
        reserved2: U32::new(0),
        crc: U32::new(0),
    };
    let mut h = crc32fast::Hasher::new();
    h.update(&raw.as_bytes()[..60]);
    h.update(payload);
    raw.crc = U32::new(h.finalize());
    let span = record_span_bytes(u64::from(payload_len));
    let span =
        usize::try_from(span).expect("a record span that fits in a u32 payload fits in usize");
    let mut out = Vec::with_capacity(span);
    out.extend_from_slice(raw.as_bytes());
    out.extend_from_slice(payload);
    out.resize(span, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_crc() {
        let h = HeaderInfo {
            generation: 7,
            nonce: 99,
            region_len_bytes: 1 << 20,
            tail_lsn: Lsn(5),
            tail_offset_bytes: 8192,
            session: 3,
            session_start_lsn: Lsn(4),
            epoch: Epoch(2),
        };
        let mut b = h.encode();
        assert_eq!(HeaderInfo::decode(&b), Ok(h));
        b[100] ^= 1;
        assert_eq!(HeaderInfo::decode(&b), Err("bad crc"));
    }

    #[test]
    fn record_round_trip() {
        let f = RecordFields {
            kind: RecordKind::Transaction,
            lsn: Lsn(3),
            epoch: Epoch(1),
            session: 1,
            nonce: 5,
            durable_lsn: Lsn(2),
        };
        let rec = encode_record(f, b"hello", 5);
        assert_eq!(rec.len(), 4096);
        let h = parse_record_header(&rec).unwrap();
        assert_eq!(h.lsn, Lsn(3));
        assert!(record_crc_ok(&rec, &rec[64..69], h.crc));
        assert!(!record_crc_ok(&rec, b"hellp", h.crc));
        assert_eq!(record_span_bytes(4096 - 64), 4096);
        assert_eq!(record_span_bytes(4096 - 63), 8192);
    }
}
