//! User-facing output on stdout: the one module allowed to print there.
#![allow(clippy::print_stdout)]

use crate::state::{FreeSource, VolumeState};
use metadata_server::lease::NodeState;
use metadata_server::types::Timestamp;

/// Bytes as a short human figure ("7.5 GiB").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn age(now: Timestamp, then: Timestamp) -> String {
    let ms =
        (now.secs - then.secs) * 1000 + (i64::from(now.nanos) - i64::from(then.nanos)) / 1_000_000;
    if ms < 0 {
        "in the future (clock skew)".to_string()
    } else if ms < 60_000 {
        format!("{:.1} s ago", ms as f64 / 1000.0)
    } else {
        format!("{} min ago", ms / 60_000)
    }
}

/// Renders `csvfs state` output in the manner of Get-ClusterSharedVolumeState: one block
/// per node, then the volume summary.
pub fn render_state(s: &VolumeState) -> String {
    let sb = &s.superblock;
    let g = &sb.geometry;
    let name = if sb.label.is_empty() {
        format!("csvfs {}", sb.volume)
    } else {
        format!("{} ({})", sb.label, sb.volume)
    };
    let coordinator = s.lease.as_ref().and_then(|l| l.node);
    let mut out = String::new();
    for slot in &s.slots {
        let (state, fs_reason, block_reason) = match &slot.state {
            NodeState::Direct => ("Direct", "NotFileSystemRedirected", "NotBlockRedirected"),
            NodeState::Redirected { reason } => (
                "BlockRedirected",
                "NotFileSystemRedirected",
                reason.as_str(),
            ),
        };
        let role = if Some(slot.node) == coordinator {
            " (coordinator)"
        } else {
            ""
        };
        out.push_str(&format!(
            "Name                         : {name}\n\
             Node                         : {}{role}\n\
             StateInfo                    : {state}\n\
             FileSystemRedirectedIOReason : {fs_reason}\n\
             BlockRedirectedIOReason      : {block_reason}\n\
             LastHeartbeat                : {} (#{}, epoch {})\n\n",
            slot.node,
            age(s.now, slot.time),
            slot.counter,
            slot.epoch.0,
        ));
    }
    if s.slots.is_empty() {
        out.push_str("No node has mounted this volume yet.\n\n");
    }
    let total = g.data_bytes();
    let free = s.free_clusters * u64::from(g.cluster_bytes);
    let pct = if total == 0 {
        0.0
    } else {
        free as f64 * 100.0 / total as f64
    };
    match &s.lease {
        Some(l) => match l.node {
            Some(n) => out.push_str(&format!(
                "Coordinator : {n} at {} (epoch {}, lease renewed #{}, {})\n",
                l.addr,
                l.epoch.0,
                l.counter,
                age(s.now, l.time)
            )),
            None => out.push_str(&format!(
                "Coordinator : none (released at epoch {})\n",
                l.epoch.0
            )),
        },
        None => out.push_str("Coordinator : none (never elected)\n"),
    }
    let source = match &s.free_source {
        FreeSource::Coordinator(mp) => {
            format!("from the coordinator (statfs through {})", mp.display())
        }
        FreeSource::Bitmap => {
            "from the on-disk bitmap, as of the coordinator's last checkpoint".to_string()
        }
    };
    out.push_str(&format!(
        "Volume      : {name} on {}\n\
         Free space  : {} of {} ({pct:.1}% free, {} clusters of {};\n              \
         {source})\n",
        s.lun,
        human_bytes(free),
        human_bytes(total),
        s.free_clusters,
        human_bytes(u64::from(g.cluster_bytes)),
    ));
    out
}

/// Prints `csvfs state` output to stdout.
pub fn print_state(s: &VolumeState) {
    print!("{}", render_state(s));
}
