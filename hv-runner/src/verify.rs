//! `hv-runner verify-disk DIR/NAME`: checks the test guest's disk records in a VM folder.
//! The one checker used by the tests and the csvfs demo.
//!
//! The test guest (fixtures/guest/guest.c) writes heartbeat `seq`'s record to sector
//! `seq % sectors` before it prints `seq=N` on the console: words `[magic "RECORDV1", seq,
//! 61 words mix(seq * 64 + i), checksum]`. The check: every sector that starts with the
//! magic holds a valid record (right sector, every word, checksum), and every heartbeat the
//! console shows (complete `seq=N` lines, or `--heartbeats`) has its record, except those
//! already overwritten by a later one in the same sector.

use std::path::{Path, PathBuf};

/// Magic of a disk record ("RECORDV1").
const RECORD_MAGIC: u64 = 0x5245_434f_5244_5631;
/// Bytes of one record (one sector).
const SECTOR_BYTES: usize = 512;
/// Problems listed before the rest are only counted.
const SHOW_PROBLEMS: usize = 20;

/// Errors reading the VM folder.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file of the folder could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the check found.
#[derive(Debug, Default)]
pub struct DiskReport {
    /// Sectors of the disk.
    pub sectors: u64,
    /// Valid records found.
    pub valid: u64,
    /// Heartbeats whose record must be present (`first..count`).
    pub first: u64,
    /// Heartbeats seen (or given).
    pub count: u64,
    /// Bad or missing records, described.
    pub problems: Vec<String>,
}

/// The test guest's record mixer (splitmix64 finalizer, as in fixtures/guest/guest.c).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Number of complete `seq=N` lines in a console log.
fn heartbeats(console: &str) -> u64 {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    let n = complete.lines().filter(|l| l.starts_with("seq=")).count();
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Checks the disk of the VM folder `dir`; `count` overrides the number of heartbeats
/// read from its console log.
pub fn verify_disk(dir: &Path, count: Option<u64>) -> Result<DiskReport, VerifyError> {
    let read_err = |path: PathBuf| move |source| VerifyError::Read { path, source };
    let count = match count {
        Some(c) => c,
        None => {
            let p = dir.join("console.log");
            heartbeats(&std::fs::read_to_string(&p).map_err(read_err(p.clone()))?)
        }
    };
    let p = dir.join("disk.img");
    let data = std::fs::read(&p).map_err(read_err(p.clone()))?;
    Ok(check_records(&data, count))
}

/// Checks the records in the disk image `data` against `count` heartbeats.
fn check_records(data: &[u8], count: u64) -> DiskReport {
    let sectors = u64::try_from(data.len() / SECTOR_BYTES).unwrap_or(u64::MAX);
    let first = count.saturating_sub(sectors);
    let mut r = DiskReport {
        sectors,
        first,
        count,
        ..DiskReport::default()
    };
    if sectors == 0 {
        r.problems.push("disk is smaller than one sector".into());
        return r;
    }
    let mut seen = vec![false; usize::try_from(count - first).unwrap_or(0)];
    for (i, sec) in (0u64..).zip(data.chunks_exact(SECTOR_BYTES)) {
        let w: Vec<u64> = sec
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8-byte chunk")))
            .collect();
        if w[0] != RECORD_MAGIC {
            continue;
        }
        let seq = w[1];
        if seq % sectors != i {
            r.problems.push(format!(
                "sector {i}: record {seq} belongs in sector {}",
                seq % sectors
            ));
            continue;
        }
        let mut sum = RECORD_MAGIC ^ seq;
        let mut bad_word = None;
        for (k, &v) in (0u64..).zip(&w).take(63).skip(2) {
            if bad_word.is_none() && v != mix(seq.wrapping_mul(64).wrapping_add(k)) {
                bad_word = Some(k);
            }
            sum = mix(sum ^ v);
        }
        if let Some(k) = bad_word {
            r.problems
                .push(format!("sector {i}: record {seq} word {k} is wrong"));
            continue;
        }
        if w[63] != sum {
            r.problems
                .push(format!("sector {i}: record {seq} checksum is wrong"));
            continue;
        }
        r.valid += 1;
        if let Some(s) = seq
            .checked_sub(first)
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| seen.get_mut(s))
        {
            *s = true;
        }
    }
    for (seq, _) in (first..).zip(&seen).filter(|(_, s)| !**s) {
        r.problems.push(format!("no record for heartbeat {seq}"));
    }
    r
}

impl DiskReport {
    /// Human-readable lines: problems (the first few) and a summary.
    pub fn lines(&self, dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = self
            .problems
            .iter()
            .take(SHOW_PROBLEMS)
            .map(|p| format!("BAD {p}"))
            .collect();
        if self.problems.len() > SHOW_PROBLEMS {
            out.push(format!(
                "BAD ... and {} more",
                self.problems.len() - SHOW_PROBLEMS
            ));
        }
        let verdict = if self.problems.is_empty() {
            "ok"
        } else {
            "FAILED"
        };
        out.push(format!(
            "verify-disk {}: {verdict}: {} valid records in {} sectors, heartbeats {}..{} required, {} problems",
            dir.display(),
            self.valid,
            self.sectors,
            self.first,
            self.count,
            self.problems.len()
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> Vec<u8> {
        let mut w = vec![RECORD_MAGIC, seq];
        let mut sum = RECORD_MAGIC ^ seq;
        for i in 2..63 {
            let v = mix(seq * 64 + i);
            w.push(v);
            sum = mix(sum ^ v);
        }
        w.push(sum);
        w.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn disk(sectors: usize, seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut d = vec![0u8; sectors * SECTOR_BYTES];
        for s in seqs {
            let at = usize::try_from(s).unwrap() % sectors * SECTOR_BYTES;
            d[at..at + SECTOR_BYTES].copy_from_slice(&record(s));
        }
        d
    }

    #[test]
    fn complete_disk_passes_and_wraps() {
        let r = check_records(&disk(8, 0..5), 5);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.valid, 5);
        // 12 heartbeats on 8 sectors: 0..4 were overwritten by 8..12.
        let r = check_records(&disk(8, 0..12), 12);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!((r.first, r.valid), (4, 8));
    }

    #[test]
    fn missing_and_damaged_records_are_reported() {
        let mut d = disk(8, [0, 1, 3]);
        assert_eq!(
            check_records(&d, 4).problems,
            vec!["no record for heartbeat 2"]
        );
        d[SECTOR_BYTES + 100] ^= 1;
        let p = check_records(&d, 4).problems;
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("record 1 word"), "{p:?}");
        let mut d = disk(8, [0]);
        d[63 * 8] ^= 1;
        assert!(check_records(&d, 1).problems[0].contains("checksum"));
        let mut d = disk(8, [0]);
        d[8] = 3; // claims to be record 3, but sits in sector 0
        assert!(check_records(&d, 0).problems[0].contains("belongs in sector 3"));
    }

    #[test]
    fn heartbeats_count_only_complete_lines() {
        assert_eq!(
            heartbeats("guest: start\nseq=0\nwork cpu1=3\nseq=1\nseq="),
            2
        );
    }
}
