//! Directory index helpers: checking that a directory's blocks partition the hash space,
//! and laying entries out afresh (extendible hashing, FORMAT.md §8) when fsck rebuilds a
//! directory.

use std::collections::HashSet;

use metadata_server::format::{
    dir_entry_bytes, name_hash, DirBlockEntry, DIR_ENTRIES_BYTES, DIR_MAX_DEPTH,
};

/// True when blocks with these (depth, prefix) pairs cover every hash exactly once.
pub fn partitions(blocks: &[(u8, u64)]) -> bool {
    if blocks.is_empty() {
        return true;
    }
    let mut sorted = blocks.to_vec();
    sorted.sort_unstable();
    let mut seen: HashSet<(u8, u64)> = HashSet::new();
    let mut covered: u128 = 0;
    for &(d, p) in &sorted {
        if d > DIR_MAX_DEPTH {
            return false;
        }
        for k in 0..=d {
            let mask = (1u64 << k) - 1;
            if seen.contains(&(k, p & mask)) {
                return false;
            }
        }
        seen.insert((d, p));
        covered += 1u128 << (u32::from(DIR_MAX_DEPTH) - u32::from(d));
    }
    covered == 1u128 << DIR_MAX_DEPTH
}

/// One block of a laid-out directory.
#[derive(Debug, Clone)]
pub struct LaidBlock {
    /// Local depth.
    pub depth: u8,
    /// Hash prefix.
    pub prefix: u64,
    /// Entries.
    pub entries: Vec<DirBlockEntry>,
}

fn used(entries: &[DirBlockEntry]) -> usize {
    entries.iter().map(|e| dir_entry_bytes(e.name.len())).sum()
}

/// Lays `entries` out into blocks that each fit, splitting by hash bits. `None` when the
/// entries cannot be placed (more than a block's worth share all 32 hash bits).
pub fn layout(seed: u64, entries: Vec<DirBlockEntry>) -> Option<Vec<LaidBlock>> {
    if entries.is_empty() {
        return Some(Vec::new());
    }
    let mut done = Vec::new();
    let mut todo = vec![LaidBlock {
        depth: 0,
        prefix: 0,
        entries,
    }];
    while let Some(b) = todo.pop() {
        if used(&b.entries) <= DIR_ENTRIES_BYTES {
            done.push(b);
            continue;
        }
        if b.depth >= DIR_MAX_DEPTH {
            return None;
        }
        let bit = 1u64 << b.depth;
        let (hi, lo): (Vec<_>, Vec<_>) = b
            .entries
            .into_iter()
            .partition(|e| name_hash(seed, &e.name) & bit != 0);
        todo.push(LaidBlock {
            depth: b.depth + 1,
            prefix: b.prefix,
            entries: lo,
        });
        todo.push(LaidBlock {
            depth: b.depth + 1,
            prefix: b.prefix | bit,
            entries: hi,
        });
    }
    done.sort_by_key(|b| (b.depth, b.prefix));
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metadata_server::types::{FileKind, InodeId};

    #[test]
    fn layout_splits_and_partitions() {
        let entries: Vec<_> = (0..2000u64)
            .map(|i| DirBlockEntry {
                name: format!("file-{i:05}").into_bytes(),
                ino: InodeId(i + 10),
                kind: FileKind::File,
                cookie: i + 3,
            })
            .collect();
        let blocks = layout(42, entries).unwrap();
        assert!(blocks.len() > 5);
        let pairs: Vec<_> = blocks.iter().map(|b| (b.depth, b.prefix)).collect();
        assert!(partitions(&pairs));
        for b in &blocks {
            assert!(used(&b.entries) <= DIR_ENTRIES_BYTES);
            let mask = (1u64 << b.depth) - 1;
            assert!(b
                .entries
                .iter()
                .all(|e| name_hash(42, &e.name) & mask == b.prefix));
        }
        assert_eq!(blocks.iter().map(|b| b.entries.len()).sum::<usize>(), 2000);
        assert!(!partitions(&[(1, 0)]));
        assert!(!partitions(&[(0, 0), (1, 1)]));
        assert!(partitions(&[(1, 0), (2, 1), (2, 3)]));
    }
}
