//! Command line of `mkfs.csvfs` (installed as `mkfs-csvfs`; link it as `mkfs.csvfs` so that
//! `mkfs -t csvfs` finds it).

use std::path::PathBuf;

/// Make a csvfs volume on a file, a block device or an NBD export.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "mkfs.csvfs", version, about)]
pub struct MkfsCli {
    /// Target: a file path, a block device (/dev/...), or an NBD URI (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`).
    pub target: String,

    /// Create the file (or extend it) to this size first; bytes, or with a K/M/G/T suffix
    /// (powers of 1024). Only for regular files. Default: use the existing size.
    #[arg(short = 's', long = "size", value_parser = parse_size)]
    pub size_bytes: Option<u64>,

    /// Cluster (allocation unit) size: a power of two from 4K to 64M. Default: 1M.
    #[arg(short = 'C', long = "cluster-size", value_parser = parse_size, default_value = "1M")]
    pub cluster_bytes: u64,

    /// Volume label, at most 64 bytes. Default: none.
    #[arg(short = 'L', long = "label", default_value = "")]
    pub label: String,

    /// Highest node id that may mount the volume (1..=64). Default: 16.
    #[arg(short = 'N', long = "max-nodes", default_value_t = 16)]
    pub max_nodes: u32,

    /// Journal size; bytes or with a K/M/G suffix. Default: 1/32 of the device, between
    /// 4M and 128M.
    #[arg(short = 'J', long = "journal-size", value_parser = parse_size)]
    pub journal_bytes: Option<u64>,

    /// Number of inodes. Default: one per 256K of device, at most 16M.
    #[arg(short = 'i', long = "inodes")]
    pub inodes: Option<u64>,

    /// Number of 4K metadata blocks (directories, extent maps, xattrs). Default: a quarter
    /// of the number of inodes, at least 256.
    #[arg(short = 'm', long = "meta-blocks")]
    pub meta_blocks: Option<u64>,

    /// Show what would be made and write nothing. Default: off.
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,

    /// Format even if the target holds a csvfs volume or another filesystem signature.
    /// Default: off. Does not override a live coordinator lease.
    #[arg(short = 'f', long = "force")]
    pub force: bool,

    /// Format even if a coordinator renewed the volume's lease recently (the volume is
    /// probably mounted: this destroys it under its users). Default: off.
    #[arg(long = "ignore-live-lease")]
    pub ignore_live_lease: bool,

    /// Write a new random 32-byte cluster secret (hex) to this file, mode 0600, if the file
    /// does not exist yet; an existing file is left as it is. Default: none.
    #[arg(long = "secret-file")]
    pub secret_file: Option<PathBuf>,

    /// Print nothing but errors. Default: off.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
}

/// Parses "4096", "64K", "1M", "10G", "1T" (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G, T or P)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999P").is_err());
    }
}
