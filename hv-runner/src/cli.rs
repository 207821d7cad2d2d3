//! Command line of `hv-runner`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::migration::NoConverge;

/// Runs KVM VMs kept in folders of a (shared) volume and live-migrates them between nodes.
#[derive(Debug, Parser)]
#[command(name = "hv-runner", version)]
pub struct Cli {
    /// Directory of the per-VM control sockets. Default: /run/hv-runner.
    #[arg(
        long,
        global = true,
        env = "HV_RUNNER_RUNTIME_DIR",
        default_value = "/run/hv-runner"
    )]
    pub runtime_dir: PathBuf,
    /// Name of this node, recorded in the VM's owner record. Default: the host name.
    #[arg(long, global = true, env = "HV_RUNNER_NODE")]
    pub node: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a VM folder `<volume>/<name>` with vm.toml and a sparse disk.img.
    Create {
        /// Volume (or any directory) that holds VM folders.
        #[arg(long)]
        volume: PathBuf,
        /// VM name (folder name).
        #[arg(long)]
        name: String,
        /// Guest RAM, e.g. 64M, 1G (binary units). Default: 64M.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        memory: u64,
        /// Number of vCPUs, 1..=8 (the test guest gives each its share of the dirty
        /// region; vCPU 0 also writes the disk records). Default: 1.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Disk size, e.g. 16M (binary units). Default: 16M.
        #[arg(long, default_value = "16M", value_parser = parse_size)]
        disk_size: u64,
        /// Test guest: size of the RAM region it rewrites continuously, e.g. 8M; 0 = none.
        /// Default: 8M.
        #[arg(long, default_value = "8M", value_parser = parse_size)]
        dirty: u64,
        /// Test guest: pages per second it rewrites; 0 = idle, `max` (10^9) = as fast as it can.
        /// Default: 2000.
        #[arg(long, default_value = "2000", value_parser = parse_rate)]
        dirty_rate: u64,
        /// Test guest: fill all RAM above 2 MiB at boot. Default: off.
        #[arg(long)]
        fill: bool,
        /// Test guest: heartbeat period in ms (one disk record and one `seq=N` line).
        /// Default: 50.
        #[arg(long, default_value_t = 50)]
        heartbeat_ms: u64,
    },
    /// Boot the VM in folder DIR/NAME and serve it until it is stopped, saved or migrated.
    Run {
        /// The VM folder.
        dir: PathBuf,
    },
    /// Show the VMs running on this node (those with a control socket in the runtime dir).
    Status {
        /// Only this VM.
        name: Option<String>,
    },
    /// Stop a running VM (its disk is flushed and closed).
    Stop {
        /// VM name.
        name: String,
    },
    /// Live-migrate a running VM to a runner started with `receive` on another node.
    Migrate {
        /// VM name.
        name: String,
        /// Destination HOST:PORT.
        #[arg(long)]
        to: String,
        /// Downtime budget in ms. Default: 50.
        #[arg(long, default_value_t = 50)]
        max_downtime_ms: u64,
        /// Cap on dirty-page rounds. Default: 30.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// What to do with a guest that does not converge (detected after 5 rounds or 10 s).
        /// Default: cancel.
        #[arg(long, value_enum, default_value_t = NoConverge::Cancel)]
        on_no_converge: NoConverge,
        /// Debug: both sides dump guest RAM at switch-over into DIR (src.ram, dst.ram).
        #[arg(long)]
        debug_dump_dir: Option<PathBuf>,
        /// Cap on the migration stream in MB/s, as on a slower link; 0 = none. Default: 0.
        #[arg(long, default_value_t = 0)]
        max_bandwidth_mbps: u64,
    },
    /// Wait for one incoming migration on ADDR, then run the VM from `<volume>/<name>`.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7070 (port 0 picks one; the address is printed).
        #[arg(long)]
        listen: String,
        /// Volume that holds the VM folder on this node.
        #[arg(long)]
        volume: PathBuf,
    },
    /// Save a running VM into its folder (state.hvm) and stop it.
    Save {
        /// VM name.
        name: String,
    },
    /// Resume a saved VM from DIR/NAME on this node.
    Restore {
        /// The VM folder.
        dir: PathBuf,
    },
    /// Check the test guest's disk records in DIR/NAME: every record valid, and one for
    /// every heartbeat on its console (exit status 1 otherwise).
    VerifyDisk {
        /// The VM folder.
        dir: PathBuf,
        /// Number of heartbeats whose records must be present. Default: the complete
        /// `seq=N` lines of the folder's console.log.
        #[arg(long)]
        heartbeats: Option<u64>,
    },
}

/// Parses `123`, `64K`, `64M`, `1G`, `1GiB` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_rate(s: &str) -> Result<u64, String> {
    if s == "max" {
        return Ok(1_000_000_000);
    }
    s.parse().map_err(|_| format!("bad rate {s:?}"))
}
