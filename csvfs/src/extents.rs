//! A node's view of one file's layout: the extent map the coordinator handed out
//! ([`ExtentMap`]) and the byte ranges this node wrote but has not committed yet
//! ([`RangeSet`]). Pure data structures, no I/O.

use metadata_server::proto::ByteRange;
use metadata_server::types::Extent;
use std::collections::BTreeMap;

/// A set of disjoint, non-adjacent half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end.
    ranges: BTreeMap<u64, u64>,
    /// Bytes covered: the sum of `end - start` over `ranges`, kept as they change.
    bytes: u64,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// True when the set holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of disjoint ranges.
    pub fn count_ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Total bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds `[start, end)`, merging with overlapping or adjacent ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut new_start = start;
        let mut new_end = end;
        // The range starting at or before `start` may overlap or touch.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                new_start = s;
                new_end = new_end.max(e);
            }
        }
        let overlapping: Vec<u64> = self
            .ranges
            .range(new_start..=new_end)
            .map(|(&s, _)| s)
            .collect();
        for s in overlapping {
            if let Some(e) = self.ranges.remove(&s) {
                self.bytes -= e - s;
                new_end = new_end.max(e);
            }
        }
        self.ranges.insert(new_start, new_end);
        self.bytes += new_end - new_start;
    }

    /// Removes `[start, end)` from the set.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let touched: Vec<(u64, u64)> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touched {
            self.ranges.remove(&s);
            self.bytes -= e - s;
            if s < start {
                self.ranges.insert(s, start);
                self.bytes += start - s;
            }
            if e > end {
                self.ranges.insert(end, e);
                self.bytes += e - end;
            }
        }
    }

    /// The parts of `[start, end)` inside the set, in order.
    pub fn intersect(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        for (&s, &e) in self.ranges.range(first..end) {
            let a = s.max(start);
            let b = e.min(end);
            if a < b {
                out.push((a, b));
            }
        }
        out
    }

    /// True when the set covers all of `[start, end)`.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        start >= end
            || self
                .ranges
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e >= end)
    }

    /// Largest end offset in the set (0 when empty).
    pub fn max_end(&self) -> u64 {
        self.ranges.values().next_back().copied().unwrap_or(0)
    }

    /// All ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// The ranges as protocol byte ranges.
    pub fn to_byte_ranges(&self) -> Vec<ByteRange> {
        self.iter()
            .map(|(s, e)| ByteRange {
                offset_bytes: s,
                len_bytes: e - s,
            })
            .collect()
    }
}

/// What backs one piece of a file range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// No cluster: reads as zeros.
    Hole,
    /// A written cluster run at this LUN byte offset.
    Written {
        /// LUN byte offset of the piece's first byte.
        lun_offset_bytes: u64,
    },
    /// An allocated, not yet written run: reads as zeros except where this node has
    /// uncommitted writes.
    Unwritten {
        /// LUN byte offset of the piece's first byte.
        lun_offset_bytes: u64,
    },
}

/// One piece of a file range with a single backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// File byte offset of the piece.
    pub file_offset_bytes: u64,
    /// Length in bytes.
    pub len_bytes: u64,
    /// What backs it.
    pub backing: Backing,
}

/// A file's extents keyed by file offset; extents never overlap.
#[derive(Debug, Clone, Default)]
pub struct ExtentMap {
    extents: BTreeMap<u64, Extent>,
}

impl ExtentMap {
    /// An empty map (a file made only of holes).
    pub fn new() -> ExtentMap {
        ExtentMap::default()
    }

    /// Drops every extent.
    pub fn clear(&mut self) {
        self.extents.clear();
    }

    /// Number of extents held.
    pub fn count_extents(&self) -> usize {
        self.extents.len()
    }

    /// Drops the parts of extents inside `[start, end)`, keeping the parts outside.
    pub fn punch(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let touched: Vec<Extent> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(_, e)| e.file_offset_bytes.saturating_add(e.len_bytes) > start)
            .map(|(_, e)| *e)
            .collect();
        for e in touched {
            self.extents.remove(&e.file_offset_bytes);
            let e_end = e.file_offset_bytes.saturating_add(e.len_bytes);
            if e.file_offset_bytes < start {
                let left = Extent {
                    len_bytes: start - e.file_offset_bytes,
                    ..e
                };
                self.extents.insert(left.file_offset_bytes, left);
            }
            if e_end > end {
                let cut = end - e.file_offset_bytes;
                let right = Extent {
                    file_offset_bytes: end,
                    lun_offset_bytes: e.lun_offset_bytes + cut,
                    len_bytes: e_end - end,
                    unwritten: e.unwritten,
                };
                self.extents.insert(right.file_offset_bytes, right);
            }
        }
    }

    /// Inserts an extent as the coordinator reported it, replacing what the map held for
    /// its range. Empty extents are ignored.
    pub fn insert(&mut self, extent: Extent) {
        if extent.len_bytes == 0 {
            return;
        }
        let end = extent.file_offset_bytes.saturating_add(extent.len_bytes);
        self.punch(extent.file_offset_bytes, end);
        self.extents.insert(extent.file_offset_bytes, extent);
    }

    /// Marks `[start, end)` written wherever it is mapped.
    pub fn mark_written(&mut self, start: u64, end: u64) {
        for p in self.pieces(start, end) {
            if let Backing::Unwritten { lun_offset_bytes } = p.backing {
                self.insert(Extent {
                    file_offset_bytes: p.file_offset_bytes,
                    lun_offset_bytes,
                    len_bytes: p.len_bytes,
                    unwritten: false,
                });
            }
        }
    }

    /// True when all of `[start, end)` lies in written extents (no hole, nothing
    /// unwritten). Allocates nothing: it is asked on every write.
    pub fn is_written(&self, start: u64, end: u64) -> bool {
        let mut pos = start;
        let first = self
            .extents
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        for e in self.extents.range(first..end).map(|(_, e)| e) {
            if pos >= end {
                break;
            }
            let e_end = e.file_offset_bytes.saturating_add(e.len_bytes);
            if e_end <= pos {
                continue;
            }
            if e.file_offset_bytes > pos || e.unwritten {
                return false;
            }
            pos = e_end;
        }
        pos >= end
    }

    /// Splits `[start, end)` into pieces of one backing each, in order, covering the
    /// whole range.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let first = self
            .extents
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        let mut pos = start;
        for e in self.extents.range(first..end).map(|(_, e)| e) {
            let e_end = e.file_offset_bytes.saturating_add(e.len_bytes);
            if e_end <= pos {
                continue;
            }
            if e.file_offset_bytes > pos {
                let hole_end = e.file_offset_bytes.min(end);
                out.push(Piece {
                    file_offset_bytes: pos,
                    len_bytes: hole_end - pos,
                    backing: Backing::Hole,
                });
                pos = hole_end;
                if pos >= end {
                    break;
                }
            }
            let piece_end = e_end.min(end);
            let lun = e.lun_offset_bytes + (pos - e.file_offset_bytes);
            out.push(Piece {
                file_offset_bytes: pos,
                len_bytes: piece_end - pos,
                backing: if e.unwritten {
                    Backing::Unwritten {
                        lun_offset_bytes: lun,
                    }
                } else {
                    Backing::Written {
                        lun_offset_bytes: lun,
                    }
                },
            });
            pos = piece_end;
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push(Piece {
                file_offset_bytes: pos,
                len_bytes: end - pos,
                backing: Backing::Hole,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(file: u64, lun: u64, len: u64, unwritten: bool) -> Extent {
        Extent {
            file_offset_bytes: file,
            lun_offset_bytes: lun,
            len_bytes: len,
            unwritten,
        }
    }

    #[test]
    fn range_set_merges_and_splits() {
        let mut s = RangeSet::new();
        s.insert(10, 20);
        s.insert(30, 40);
        s.insert(20, 30);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(10, 40)]);
        s.remove(15, 25);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(10, 15), (25, 40)]);
        assert_eq!(s.intersect(0, 30), vec![(10, 15), (25, 30)]);
        assert_eq!(s.len_bytes(), 20);
        assert!(s.contains(26, 40) && s.contains(10, 15) && s.contains(7, 7));
        assert!(!s.contains(12, 26) && !s.contains(30, 41) && !s.contains(0, 11));
        s.insert(0, 100);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 100)]);
        assert_eq!(s.max_end(), 100);
    }

    proptest::proptest! {
        /// Any sequence of inserts and removes leaves the set equal to a byte-per-byte
        /// model: same bytes, same total, ranges disjoint and never touching.
        #[test]
        fn range_set_matches_a_byte_model(
            ops in proptest::collection::vec((proptest::bool::ANY, 0usize..256, 0usize..64), 1..64)
        ) {
            let mut s = RangeSet::new();
            let mut model = [false; 320];
            for (add, start, len) in ops {
                let end = start + len;
                if add {
                    s.insert(start as u64, end as u64);
                } else {
                    s.remove(start as u64, end as u64);
                }
                for b in &mut model[start..end] {
                    *b = add;
                }
                let ranges: Vec<(usize, usize)> = s
                    .iter()
                    .map(|(a, b)| (usize::try_from(a).unwrap(), usize::try_from(b).unwrap()))
                    .collect();
                let mut from_set = [false; 320];
                for &(a, b) in &ranges {
                    proptest::prop_assert!(a < b);
                    for x in &mut from_set[a..b] {
                        *x = true;
                    }
                }
                for w in ranges.windows(2) {
                    proptest::prop_assert!(w[0].1 < w[1].0, "ranges {:?} touch", w);
                }
                proptest::prop_assert_eq!(&from_set[..], &model[..]);
                let covered = model.iter().filter(|&&b| b).count() as u64;
                proptest::prop_assert_eq!(s.len_bytes(), covered);
                proptest::prop_assert_eq!(s.count_ranges(), ranges.len());
            }
        }

        /// `is_written` answers what `pieces` says: every piece of the range written.
        #[test]
        fn is_written_agrees_with_pieces(
            extents in proptest::collection::vec(
                (0u64..256, 1u64..48, proptest::bool::ANY), 0..12),
            start in 0u64..300,
            len in 1u64..80,
        ) {
            let mut m = ExtentMap::new();
            for (i, (file, len, unwritten)) in extents.into_iter().enumerate() {
                m.insert(ext(file, 10_000 * (i as u64 + 1), len, unwritten));
            }
            let end = start + len;
            let from_pieces = m
                .pieces(start, end)
                .iter()
                .all(|p| matches!(p.backing, Backing::Written { .. }));
            proptest::prop_assert_eq!(m.is_written(start, end), from_pieces);
        }
    }

    #[test]
    fn pieces_cover_holes_and_extents() {
        let mut m = ExtentMap::new();
        m.insert(ext(100, 1000, 100, false));
        m.insert(ext(300, 5000, 100, true));
        let p = m.pieces(50, 350);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].backing, Backing::Hole);
        assert_eq!((p[0].file_offset_bytes, p[0].len_bytes), (50, 50));
        assert_eq!(
            p[1].backing,
            Backing::Written {
                lun_offset_bytes: 1000
            }
        );
        assert_eq!((p[2].file_offset_bytes, p[2].len_bytes), (200, 100));
        assert_eq!(
            p[3].backing,
            Backing::Unwritten {
                lun_offset_bytes: 5000
            }
        );
        assert_eq!(p[3].len_bytes, 50);
    }

    #[test]
    fn mark_written_splits_extents() {
        let mut m = ExtentMap::new();
        m.insert(ext(0, 1000, 300, true));
        m.mark_written(100, 200);
        let p = m.pieces(0, 300);
        assert_eq!(p.len(), 3);
        assert!(matches!(p[0].backing, Backing::Unwritten { .. }));
        assert_eq!(
            p[1].backing,
            Backing::Written {
                lun_offset_bytes: 1100
            }
        );
        assert_eq!(
            p[2].backing,
            Backing::Unwritten {
                lun_offset_bytes: 1200
            }
        );
        m.punch(0, 150);
        let p = m.pieces(0, 300);
        assert_eq!(p[0].backing, Backing::Hole);
        assert_eq!(p[0].len_bytes, 150);
        assert_eq!(m.count_extents(), 2);
    }
}
