//! User-facing output on stdout: the one module allowed to print there.
#![allow(clippy::print_stdout)]

use crate::state::{FreeSource, VolumeState};
use metadata_server::lease::{NodeState, SlotInfo};
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

/// A node whose last heartbeat is older than this many heartbeat periods is shown as
/// Unavailable: it was stopped, crashed, or lost its path to the LUN.
const STALE_HEARTBEATS: i64 = 5;

/// Milliseconds from `then` to `now` (negative when `then` is ahead: clock skew).
pub(crate) fn age_ms(now: Timestamp, then: Timestamp) -> i64 {
    (now.secs - then.secs) * 1000 + (i64::from(now.nanos) - i64::from(then.nanos)) / 1_000_000
}

fn age(now: Timestamp, then: Timestamp) -> String {
    let ms = age_ms(now, then);
    if ms < 0 {
        "in the future (clock skew)".to_string()
    } else if ms < 60_000 {
        format!("{:.1} s ago", ms as f64 / 1000.0)
    } else {
        format!("{} min ago", ms / 60_000)
    }
}

/// StateInfo and the two redirection reasons shown for `slot` at wall time `now`. A slot
/// whose heartbeat is stale is Unavailable, with the reasons it last gave.
fn shown_state(slot: &SlotInfo, now: Timestamp) -> (&str, &str, &str) {
    let (state, fs_reason, block_reason) = match &slot.state {
        NodeState::Direct => ("Direct", "NotFileSystemRedirected", "NotBlockRedirected"),
        NodeState::Redirected { reason } => (
            "BlockRedirected",
            "NotFileSystemRedirected",
            reason.as_str(),
        ),
    };
    let stale_ms = STALE_HEARTBEATS * i64::try_from(crate::mount::HEARTBEAT_MS).unwrap_or(1000);
    if age_ms(now, slot.time) > stale_ms {
        ("Unavailable", fs_reason, block_reason)
    } else {
        (state, fs_reason, block_reason)
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
        let (state, fs_reason, block_reason) = shown_state(slot, s.now);
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

#[cfg(test)]
mod tests {
    use super::*;
    use metadata_server::types::{Epoch, NodeId};

    #[test]
    fn a_node_without_recent_heartbeats_is_unavailable() {
        let now = Timestamp {
            secs: 1_000,
            nanos: 0,
        };
        let slot = |secs_ago: i64, state: NodeState| SlotInfo {
            node: NodeId(2),
            state,
            counter: 9,
            epoch: Epoch(3),
            time: Timestamp {
                secs: now.secs - secs_ago,
                nanos: 0,
            },
        };
        assert_eq!(
            shown_state(&slot(1, NodeState::Direct), now),
            ("Direct", "NotFileSystemRedirected", "NotBlockRedirected")
        );
        assert_eq!(
            shown_state(&slot(6, NodeState::Direct), now).0,
            "Unavailable"
        );
        let lost = NodeState::Redirected {
            reason: "LUN path lost".into(),
        };
        assert_eq!(
            shown_state(&slot(2, lost.clone()), now),
            (
                "BlockRedirected",
                "NotFileSystemRedirected",
                "LUN path lost"
            )
        );
        assert_eq!(
            shown_state(&slot(60, lost), now),
            ("Unavailable", "NotFileSystemRedirected", "LUN path lost")
        );
    }
}
