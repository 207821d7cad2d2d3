//! Operations on a sorted extent list (file-cluster keyed): split, flag, remove, merge.

use crate::format::DiskExtent;
use crate::types::ClusterNo;

/// Splits extents so that `fc` is an extent boundary.
pub(crate) fn split_at(ext: &mut Vec<DiskExtent>, fc: u64) {
    if let Some(i) = ext
        .iter()
        .position(|e| e.file_cluster < fc && fc < e.file_end())
    {
        let e = ext[i];
        let head = u32::try_from(fc - e.file_cluster).expect("inside an extent of u32 length");
        ext[i].len_clusters = head;
        ext.insert(
            i + 1,
            DiskExtent {
                file_cluster: fc,
                lun_cluster: ClusterNo(e.lun_cluster.0 + u64::from(head)),
                len_clusters: e.len_clusters - head,
                unwritten: e.unwritten,
            },
        );
    }
}

/// Sets the unwritten flag of every cluster in [a, b) that is mapped.
pub(crate) fn set_unwritten(ext: &mut Vec<DiskExtent>, a: u64, b: u64, unwritten: bool) {
    if a >= b {
        return;
    }
    split_at(ext, a);
    split_at(ext, b);
    for e in ext.iter_mut() {
        if e.file_cluster >= a && e.file_end() <= b {
            e.unwritten = unwritten;
        }
    }
    merge(ext);
}

/// Removes the mapping of [a, b); returns the freed data-cluster runs.
pub(crate) fn remove_range(ext: &mut Vec<DiskExtent>, a: u64, b: u64) -> Vec<(ClusterNo, u64)> {
    if a >= b {
        return Vec::new();
    }
    split_at(ext, a);
    split_at(ext, b);
    let mut freed = Vec::new();
    ext.retain(|e| {
        if e.file_cluster >= a && e.file_end() <= b {
            freed.push((e.lun_cluster, u64::from(e.len_clusters)));
            false
        } else {
            true
        }
    });
    freed
}

/// Inserts a new extent (its file range must be a hole), keeping the list sorted.
pub(crate) fn insert(ext: &mut Vec<DiskExtent>, e: DiskExtent) {
    let i = ext.partition_point(|x| x.file_cluster < e.file_cluster);
    ext.insert(i, e);
}

/// Merges neighbours that are contiguous in the file and on the LUN with the same flag.
pub(crate) fn merge(ext: &mut Vec<DiskExtent>) {
    let mut out: Vec<DiskExtent> = Vec::with_capacity(ext.len());
    for e in ext.drain(..) {
        if let Some(last) = out.last_mut() {
            let total = u64::from(last.len_clusters) + u64::from(e.len_clusters);
            if last.file_end() == e.file_cluster
                && last.lun_end() == e.lun_cluster.0
                && last.unwritten == e.unwritten
                && total <= u64::from(u32::MAX)
            {
                last.len_clusters = u32::try_from(total).expect("checked above");
                continue;
            }
        }
        out.push(e);
    }
    *ext = out;
}

/// The holes of [a, b) as (start, end) file-cluster pairs.
pub(crate) fn holes(ext: &[DiskExtent], a: u64, b: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = a;
    for e in ext {
        if e.file_end() <= pos {
            continue;
        }
        if e.file_cluster >= b {
            break;
        }
        if e.file_cluster > pos {
            out.push((pos, e.file_cluster.min(b)));
        }
        pos = pos.max(e.file_end());
        if pos >= b {
            break;
        }
    }
    if pos < b {
        out.push((pos, b));
    }
    out
}

/// The extent covering file cluster `fc`, if any.
pub(crate) fn find(ext: &[DiskExtent], fc: u64) -> Option<DiskExtent> {
    let i = ext.partition_point(|e| e.file_end() <= fc);
    ext.get(i).filter(|e| e.file_cluster <= fc).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(f: u64, l: u64, n: u32, u: bool) -> DiskExtent {
        DiskExtent {
            file_cluster: f,
            lun_cluster: ClusterNo(l),
            len_clusters: n,
            unwritten: u,
        }
    }

    #[test]
    fn split_flag_merge_remove() {
        let mut v = vec![e(0, 100, 10, true)];
        set_unwritten(&mut v, 3, 5, false);
        assert_eq!(
            v,
            vec![e(0, 100, 3, true), e(3, 103, 2, false), e(5, 105, 5, true)]
        );
        set_unwritten(&mut v, 0, 10, false);
        assert_eq!(v, vec![e(0, 100, 10, false)]);
        let freed = remove_range(&mut v, 2, 4);
        assert_eq!(freed, vec![(ClusterNo(102), 2)]);
        assert_eq!(holes(&v, 0, 12), vec![(2, 4), (10, 12)]);
        assert_eq!(find(&v, 5), Some(e(4, 104, 6, false)));
        assert_eq!(find(&v, 3), None);
        insert(&mut v, e(2, 102, 2, false));
        merge(&mut v);
        assert_eq!(v, vec![e(0, 100, 10, false)]);
    }
}
