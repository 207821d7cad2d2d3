//! `mkfs.csvfs`: checks the target (existing filesystems, a live coordinator lease), then
//! formats it with [`metadata_server::format::mkfs`]. The data region is never written, so
//! a 1 TiB sparse file is formatted in seconds.

pub mod cli;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use block_client::{BlockDevice, BlockError, FileDevice, FileOptions};
use metadata_server::format::lease::LeaseRecord;
use metadata_server::format::{
    mkfs, now, Layout, MkfsError, MkfsOptions, MkfsReport, Superblock, BLOCK_BYTES,
    MAGIC_SUPERBLOCK,
};
use metadata_server::types::Timestamp;

pub use cli::MkfsCli;

/// Lease timeout assumed when a lease record does not say, in ms.
const DEFAULT_LEASE_TIMEOUT_MS: u64 = 10_000;

/// Why `mkfs.csvfs` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MkfsToolError {
    /// The target could not be opened, created or resized.
    #[error("open {target}")]
    Open {
        /// The target.
        target: String,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Creating or resizing the file failed.
    #[error("set the size of {target}")]
    Resize {
        /// The file.
        target: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `--size` was given for something that is not a regular file.
    #[error("--size only works for regular files; {target} is not one")]
    SizeNotFile {
        /// The target.
        target: String,
    },
    /// Reading the target to look for existing data failed.
    #[error("read {target} at byte {at}")]
    Probe {
        /// The target.
        target: String,
        /// Byte offset.
        at: u64,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// The target holds a filesystem, volume or partition table.
    #[error("{target} holds {found}; use -f to format it anyway")]
    InUse {
        /// The target.
        target: String,
        /// What was found.
        found: String,
    },
    /// The target's coordinator lease was renewed recently.
    #[error(
        "{target} is a csvfs volume whose coordinator lease was renewed {age_ms} ms ago by {owner} \
         (epoch {epoch}, {addr}); it is probably mounted. Unmount it on every node first"
    )]
    LiveLease {
        /// The target.
        target: String,
        /// Milliseconds since the last renewal.
        age_ms: u64,
        /// Owner node.
        owner: String,
        /// Lease epoch.
        epoch: u64,
        /// Coordinator address.
        addr: String,
    },
    /// The options or device size do not allow a volume.
    #[error("cannot lay out the volume")]
    Layout(#[source] MkfsError),
    /// Formatting failed.
    #[error("format {target}")]
    Format {
        /// The target.
        target: String,
        /// Cause.
        #[source]
        source: MkfsError,
    },
    /// Writing the secret file failed.
    #[error("write secret file {path}")]
    Secret {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What [`run`] did.
#[derive(Debug)]
pub enum MkfsOutcome {
    /// Dry run: the layout that would be written.
    DryRun(Layout),
    /// The volume was made.
    Made {
        /// What mkfs wrote.
        report: MkfsReport,
        /// Whether a new secret file was written.
        secret_written: bool,
    },
}

/// Converts the command line into format options.
pub fn options_from_cli(cli: &MkfsCli) -> Result<MkfsOptions, MkfsToolError> {
    let cluster_bytes = u32::try_from(cli.cluster_bytes).map_err(|_| {
        MkfsToolError::Layout(MkfsError::InvalidOption(format!(
            "cluster size {} is larger than 64M",
            cli.cluster_bytes
        )))
    })?;
    Ok(MkfsOptions {
        cluster_bytes,
        label: cli.label.clone(),
        max_nodes: cli.max_nodes,
        journal_bytes: cli.journal_bytes,
        inode_count: cli.inodes,
        meta_blocks: cli.meta_blocks,
        ..MkfsOptions::default()
    })
}

fn is_nbd(target: &str) -> bool {
    target.starts_with("nbd://") || target.starts_with("nbd+unix://")
}

/// Opens the target, creating or extending a regular file to `size_bytes` if given.
pub fn open_target(
    target: &str,
    size_bytes: Option<u64>,
    dry_run: bool,
) -> Result<Arc<dyn BlockDevice>, MkfsToolError> {
    let open_err = |source| MkfsToolError::Open {
        target: target.to_string(),
        source,
    };
    if is_nbd(target) {
        if size_bytes.is_some() {
            return Err(MkfsToolError::SizeNotFile {
                target: target.to_string(),
            });
        }
        return block_client::open_device(target).map_err(open_err);
    }
    let path = Path::new(target);
    if let Some(size) = size_bytes {
        let meta = std::fs::metadata(path);
        match meta {
            Ok(m) if !m.file_type().is_file() => {
                return Err(MkfsToolError::SizeNotFile {
                    target: target.to_string(),
                })
            }
            Ok(m) if m.len() >= size || dry_run => {}
            _ if dry_run => {}
            _ => {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|source| MkfsToolError::Resize {
                        target: target.to_string(),
                        source,
                    })?;
                f.set_len(size).map_err(|source| MkfsToolError::Resize {
                    target: target.to_string(),
                    source,
                })?;
            }
        }
        if dry_run && !path.exists() {
            // Nothing to open: a dry run on a file that does not exist yet.
            return Err(open_err(BlockError::Open {
                target: target.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the file does not exist (a dry run does not create it)",
                ),
            }));
        }
    }
    let opts = FileOptions {
        read_only: dry_run,
        ..FileOptions::default()
    };
    Ok(Arc::new(FileDevice::open(path, opts).map_err(open_err)?))
}

/// Looks for known signatures in the first 68 KiB of a device. Returns what it found.
pub fn probe_signatures(head: &[u8]) -> Vec<String> {
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    let mut found = Vec::new();
    if at(0, &MAGIC_SUPERBLOCK.to_le_bytes()) {
        found.push("a csvfs volume".to_string());
    }
    if at(1080, &[0x53, 0xEF]) {
        found.push("an ext2/ext3/ext4 filesystem".into());
    }
    if at(0, b"XFSB") {
        found.push("an XFS filesystem".into());
    }
    if at(3, b"NTFS    ") {
        found.push("an NTFS filesystem".into());
    }
    if at(65536 + 64, b"_BHRfS_M") {
        found.push("a btrfs filesystem".into());
    }
    if (0..4).any(|s| at(s * 512, b"LABELONE")) {
        found.push("an LVM physical volume".into());
    }
    if at(512, b"EFI PART") {
        found.push("a GPT partition table".into());
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        found.push("a swap area".into());
    }
    if at(54, b"FAT") || at(82, b"FAT32") {
        found.push("a FAT filesystem".into());
    }
    if found.is_empty() && at(510, &[0x55, 0xAA]) {
        // A boot sector signature with a non-empty partition entry: an MBR partition table.
        let has_partition = (0..4).any(|i| head.get(446 + i * 16 + 4).is_some_and(|t| *t != 0));
        if has_partition {
            found.push("an MBR partition table".into());
        } else {
            found.push("a boot sector".into());
        }
    }
    found
}

fn age_ms(then: Timestamp, now: Timestamp) -> u64 {
    let t = |x: Timestamp| i128::from(x.secs) * 1000 + i128::from(x.nanos / 1_000_000);
    u64::try_from((t(now) - t(then)).max(0)).unwrap_or(u64::MAX)
}

/// If the target is a csvfs volume whose coordinator lease was renewed within twice its
/// timeout, describes the lease.
pub fn live_lease(
    dev: &dyn BlockDevice,
    target: &str,
) -> Result<Option<MkfsToolError>, MkfsToolError> {
    let Ok(r) = Superblock::read(dev) else {
        return Ok(None);
    };
    let at = r.superblock.geometry.lease_offset();
    let mut buf = vec![0u8; metadata_server::format::BLOCK_LEN];
    dev.read_at(&mut buf, at)
        .map_err(|source| MkfsToolError::Probe {
            target: target.to_string(),
            at,
            source,
        })?;
    let Ok(Some(rec)) = LeaseRecord::decode(&buf, at) else {
        return Ok(None);
    };
    let Some(owner) = rec.node else {
        return Ok(None);
    };
    let timeout = if rec.timeout_ms == 0 {
        DEFAULT_LEASE_TIMEOUT_MS
    } else {
        u64::from(rec.timeout_ms)
    };
    let age = age_ms(rec.time, now());
    if age <= 2 * timeout {
        return Ok(Some(MkfsToolError::LiveLease {
            target: target.to_string(),
            age_ms: age,
            owner: owner.to_string(),
            epoch: rec.epoch.0,
            addr: rec.addr,
        }));
    }
    Ok(None)
}

/// Writes a new random secret (64 hex digits and a newline) with mode 0600 if `path` does
/// not exist. Returns whether it wrote one.
pub fn write_secret(path: &Path) -> Result<bool, MkfsToolError> {
    use rand::RngCore;
    let err = |source| MkfsToolError::Secret {
        path: path.display().to_string(),
        source,
    };
    let mut f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(err(e)),
    };
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    f.write_all(format!("{hex}\n").as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(true)
}

/// Runs mkfs as the command line says. `progress` gets (bytes done, bytes total).
pub fn run(
    cli: &MkfsCli,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MkfsOutcome, MkfsToolError> {
    let options = options_from_cli(cli)?;
    let dev = open_target(&cli.target, cli.size_bytes, cli.dry_run)?;
    let layout = Layout::compute(dev.size_bytes(), &options).map_err(MkfsToolError::Layout)?;
    // Existing contents.
    let probe_len = (68u64 << 10).min(dev.size_bytes() / BLOCK_BYTES * BLOCK_BYTES);
    let mut head = vec![0u8; usize::try_from(probe_len).unwrap_or(0)];
    dev.read_at(&mut head, 0)
        .map_err(|source| MkfsToolError::Probe {
            target: cli.target.clone(),
            at: 0,
            source,
        })?;
    let mut found = probe_signatures(&head);
    if found.is_empty() && Superblock::read(dev.as_ref()).is_ok() {
        // Primary damaged, backup intact.
        found.push("a csvfs volume (backup superblock)".into());
    }
    if !cli.ignore_live_lease {
        if let Some(e) = live_lease(dev.as_ref(), &cli.target)? {
            return Err(e);
        }
    }
    if !found.is_empty() && !cli.force {
        return Err(MkfsToolError::InUse {
            target: cli.target.clone(),
            found: found.join(" and "),
        });
    }
    if cli.dry_run {
        return Ok(MkfsOutcome::DryRun(layout));
    }
    let report = mkfs(dev.clone(), &options, progress).map_err(|source| MkfsToolError::Format {
        target: cli.target.clone(),
        source,
    })?;
    let secret_written = match &cli.secret_file {
        Some(p) => write_secret(p)?,
        None => false,
    };
    Ok(MkfsOutcome::Made {
        report,
        secret_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cli(args: &[&str]) -> MkfsCli {
        MkfsCli::parse_from(std::iter::once("mkfs.csvfs").chain(args.iter().copied()))
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("csvfs-mkfs-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn signatures() {
        let mut h = vec![0u8; 68 << 10];
        assert!(probe_signatures(&h).is_empty());
        h[1080] = 0x53;
        h[1081] = 0xEF;
        assert_eq!(
            probe_signatures(&h),
            vec!["an ext2/ext3/ext4 filesystem".to_string()]
        );
        let mut g = vec![0u8; 68 << 10];
        g[512..520].copy_from_slice(b"EFI PART");
        g[510] = 0x55;
        g[511] = 0xAA;
        assert_eq!(
            probe_signatures(&g),
            vec!["a GPT partition table".to_string()]
        );
        let mut m = vec![0u8; 4096];
        m[510] = 0x55;
        m[511] = 0xAA;
        m[446 + 4] = 0x83;
        assert_eq!(
            probe_signatures(&m),
            vec!["an MBR partition table".to_string()]
        );
        let mut x = vec![0u8; 4096];
        x[..4].copy_from_slice(b"XFSB");
        assert_eq!(probe_signatures(&x), vec!["an XFS filesystem".to_string()]);
    }

    #[test]
    fn sparse_terabyte_refuse_twice_force_and_secret() {
        let img = tmp("tb.img");
        let secret = tmp("secret");
        let target = img.to_str().unwrap().to_string();
        let start = std::time::Instant::now();
        let out = run(
            &cli(&[
                "-s",
                "1T",
                "-L",
                "big",
                "--secret-file",
                secret.to_str().unwrap(),
                &target,
            ]),
            &mut |_, _| {},
        )
        .unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert!(matches!(
            out,
            MkfsOutcome::Made {
                secret_written: true,
                ..
            }
        ));
        assert!(secs < 30.0, "1 TiB mkfs took {secs} s");
        // Sparse: far less than 1% of the file is allocated.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(meta.len(), 1 << 40);
        assert!(
            meta.blocks() * 512 < 256 << 20,
            "allocated {} bytes",
            meta.blocks() * 512
        );
        let dev = FileDevice::open(&img, FileOptions::default()).unwrap();
        let sb = Superblock::read(&dev).unwrap().superblock;
        assert_eq!(sb.label, "big");
        // A second mkfs refuses, -n with -f lays out without writing, -f formats.
        assert!(matches!(
            run(&cli(&[&target]), &mut |_, _| {}),
            Err(MkfsToolError::InUse { .. })
        ));
        assert!(matches!(
            run(&cli(&["-n", "-f", &target]), &mut |_, _| {}),
            Ok(MkfsOutcome::DryRun(_))
        ));
        let again = Superblock::read(&dev).unwrap().superblock;
        assert_eq!(again.volume, sb.volume);
        // The secret exists with mode 0600 and is not replaced.
        use std::os::unix::fs::PermissionsExt;
        let s1 = std::fs::read(&secret).unwrap();
        assert_eq!(s1.len(), 65);
        assert_eq!(
            std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let out = run(
            &cli(&[
                "-f",
                "-s",
                "1G",
                "--secret-file",
                secret.to_str().unwrap(),
                &target,
            ]),
            &mut |_, _| {},
        )
        .unwrap();
        assert!(matches!(
            out,
            MkfsOutcome::Made {
                secret_written: false,
                ..
            }
        ));
        assert_eq!(std::fs::read(&secret).unwrap(), s1);
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&secret);
    }

    #[test]
    fn live_lease_refuses_even_with_force() {
        let img = tmp("lease.img");
        let target = img.to_str().unwrap().to_string();
        run(&cli(&["-s", "256M", &target]), &mut |_, _| {}).unwrap();
        let dev = FileDevice::open(&img, FileOptions::default()).unwrap();
        let sb = Superblock::read(&dev).unwrap().superblock;
        let rec = LeaseRecord {
            kind: metadata_server::format::lease::LeaseKind::Coordinator,
            volume: sb.volume,
            node: Some(metadata_server::types::NodeId(3)),
            timeout_ms: 10_000,
            epoch: metadata_server::types::Epoch(4),
            counter: 9,
            time: now(),
            addr: "127.0.0.1:7000".into(),
        };
        dev.write_at(
            &rec.encode_block().unwrap(),
            sb.geometry.lease_offset(),
            Default::default(),
        )
        .unwrap();
        assert!(matches!(
            run(&cli(&["-f", &target]), &mut |_, _| {}),
            Err(MkfsToolError::LiveLease { .. })
        ));
        // An old renewal is not live.
        let old = LeaseRecord {
            time: Timestamp {
                secs: rec.time.secs - 3600,
                nanos: 0,
            },
            ..rec
        };
        dev.write_at(
            &old.encode_block().unwrap(),
            sb.geometry.lease_offset(),
            Default::default(),
        )
        .unwrap();
        assert!(run(&cli(&["-f", &target]), &mut |_, _| {}).is_ok());
        let _ = std::fs::remove_file(&img);
    }
}
