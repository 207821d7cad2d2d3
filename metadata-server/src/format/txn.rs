//! The payload of a journal record written by the metadata store (FORMAT.md §10): a
//! physical redo transaction, the new contents of byte ranges of the metadata regions.
//! Replay writes every range home in order; replaying twice is harmless.
//!
//! ```text
//! magic u32 "CSVT" | count u32 | count x ( offset_bytes u64 | len_bytes u32 | bytes )
//! ```

use super::{corrupt, DecodeError};

/// Magic of a transaction payload, "CSVT".
pub const TXN_MAGIC: u32 = u32::from_le_bytes(*b"CSVT");

/// One byte range to write home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnWrite {
    /// Byte offset on the LUN.
    pub offset_bytes: u64,
    /// New contents.
    pub bytes: Vec<u8>,
}

/// A transaction: byte ranges written home together, or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    /// The writes, in order.
    pub writes: Vec<TxnWrite>,
}

impl Transaction {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let total: usize = self.writes.iter().map(|w| 12 + w.bytes.len()).sum();
        let mut out = Vec::with_capacity(8 + total);
        out.extend_from_slice(&TXN_MAGIC.to_le_bytes());
        let count = u32::try_from(self.writes.len()).expect("a transaction has < 2^32 writes");
        out.extend_from_slice(&count.to_le_bytes());
        for w in &self.writes {
            out.extend_from_slice(&w.offset_bytes.to_le_bytes());
            let len = u32::try_from(w.bytes.len()).expect("a write is < 4 GiB");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&w.bytes);
        }
        out
    }

    /// Decodes a payload; `at` locates the record (its LSN) in errors.
    pub fn decode(payload: &[u8], at: u64) -> Result<Transaction, DecodeError> {
        const WHAT: &str = "journal transaction";
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], DecodeError> {
            let s = payload
                .get(pos..pos + n)
                .ok_or_else(|| corrupt(WHAT, at, "payload truncated"))?;
            pos += n;
            Ok(s)
        };
        let u32_at = |s: &[u8]| {
            let mut b = [0u8; 4];
            b.copy_from_slice(s);
            u32::from_le_bytes(b)
        };
        let magic = u32_at(take(4)?);
        if magic != TXN_MAGIC {
            return Err(DecodeError::BadMagic {
                what: WHAT,
                at,
                found: magic,
            });
        }
        let count = u32_at(take(4)?);
        let mut writes = Vec::new();
        for _ in 0..count {
            let mut o = [0u8; 8];
            o.copy_from_slice(take(8)?);
            let len = usize::try_from(u32_at(take(4)?))
                .map_err(|_| corrupt(WHAT, at, "length does not fit"))?;
            let bytes = take(len)?.to_vec();
            writes.push(TxnWrite {
                offset_bytes: u64::from_le_bytes(o),
                bytes,
            });
        }
        if pos != payload.len() {
            return Err(corrupt(WHAT, at, "trailing bytes"));
        }
        Ok(Transaction { writes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad() {
        let t = Transaction {
            writes: vec![
                TxnWrite {
                    offset_bytes: 4096,
                    bytes: vec![1; 4096],
                },
                TxnWrite {
                    offset_bytes: 1 << 40,
                    bytes: vec![2; 512],
                },
            ],
        };
        let e = t.encode();
        assert_eq!(Transaction::decode(&e, 1).unwrap(), t);
        assert!(matches!(
            Transaction::decode(&e[..e.len() - 1], 1),
            Err(DecodeError::Corrupt { .. })
        ));
        let mut m = e.clone();
        m[0] = 0;
        assert!(matches!(
            Transaction::decode(&m, 1),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut extra = e.clone();
        extra.push(0);
        assert!(matches!(
            Transaction::decode(&extra, 1),
            Err(DecodeError::Corrupt { .. })
        ));
    }
}
