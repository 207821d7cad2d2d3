//! `csvfs mount` settings: a TOML file and command-line flags, flags winning.

use crate::cli::MountArgs;
use metadata_server::types::NodeId;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The mount settings file (TOML). Every field is optional; flags override them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountConfigFile {
    /// The LUN URI or path. Default: none (required from flag or file).
    pub lun: Option<String>,
    /// This node's id. Default: none (required from flag or file).
    pub node_id: Option<u32>,
    /// Path of the cluster secret file. Default: none (required from flag or file).
    pub secret: Option<PathBuf>,
    /// Metadata server listen address when coordinator. Default: 127.0.0.1:0.
    pub listen: Option<String>,
    /// Kernel attribute and name cache time in milliseconds. Default: 1000.
    pub attr_ttl_ms: Option<u64>,
    /// Sequential-writer preallocation in MiB. Default: 64.
    pub prealloc_mib: Option<u64>,
    /// FUSE worker threads. Default: 64.
    pub workers: Option<usize>,
    /// Metadata request timeout in milliseconds. Default: 30000.
    pub request_timeout_ms: Option<u64>,
    /// As coordinator, the grace for departed nodes and for re-announced opens, in
    /// milliseconds. Default: 30000.
    pub node_grace_ms: Option<u64>,
    /// While this node hosts the coordinator, its own requests reach it inside the process.
    /// Default: true.
    pub local_session: Option<bool>,
    /// Mountpoint. Default: none (required from argument or file).
    pub mountpoint: Option<PathBuf>,
}

/// Settings that make a mount invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("parse config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A required setting is missing.
    #[error("missing setting `{name}` (give --{flag} or set it in the config file)")]
    Missing {
        /// The config key.
        name: &'static str,
        /// The flag.
        flag: &'static str,
    },
    /// A setting has an invalid value.
    #[error("invalid {name}: {why}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Complete, validated mount settings.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The LUN URI or path.
    pub lun: String,
    /// This node.
    pub node: NodeId,
    /// Path of the secret file.
    pub secret: PathBuf,
    /// Metadata server listen address when coordinator.
    pub listen: SocketAddr,
    /// Kernel cache time for attributes and names.
    pub attr_ttl: Duration,
    /// Sequential-writer preallocation in bytes.
    pub prealloc_bytes: u64,
    /// FUSE worker threads.
    pub workers: usize,
    /// Metadata request timeout in milliseconds.
    pub request_timeout_ms: u64,
    /// As coordinator, the grace for departed nodes and re-announced opens, in milliseconds.
    pub node_grace_ms: u64,
    /// While this node hosts the coordinator, its own requests reach it inside the process.
    pub local_session: bool,
    /// Mountpoint.
    pub mountpoint: PathBuf,
}

impl MountConfigFile {
    /// Reads and parses a settings file.
    pub fn load(path: &Path) -> Result<MountConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl MountConfig {
    /// Merges the config file named by `args.config` (if any) with the flags, flags
    /// winning, and validates the result.
    pub fn resolve(args: &MountArgs) -> Result<MountConfig, ConfigError> {
        let file = match &args.config {
            Some(p) => MountConfigFile::load(p)?,
            None => MountConfigFile::default(),
        };
        let lun = args.lun.clone().or(file.lun).ok_or(ConfigError::Missing {
            name: "lun",
            flag: "lun",
        })?;
        let node_id = args.node_id.or(file.node_id).ok_or(ConfigError::Missing {
            name: "node_id",
            flag: "node-id",
        })?;
        let secret = args
            .secret
            .clone()
            .or(file.secret)
            .ok_or(ConfigError::Missing {
                name: "secret",
                flag: "secret",
            })?;
        let mountpoint =
            args.mountpoint
                .clone()
                .or(file.mountpoint)
                .ok_or(ConfigError::Missing {
                    name: "mountpoint",
                    flag: "MOUNTPOINT argument",
                })?;
        let listen_text = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:0".to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|e| ConfigError::Invalid {
            name: "listen",
            why: format!("{listen_text:?}: {e}"),
        })?;
        let cfg = MountConfig {
            lun,
            node: NodeId(node_id),
            secret,
            listen,
            attr_ttl: Duration::from_millis(args.attr_ttl_ms.or(file.attr_ttl_ms).unwrap_or(1000)),
            prealloc_bytes: args.prealloc_mib.or(file.prealloc_mib).unwrap_or(64) << 20,
            workers: args.workers.or(file.workers).unwrap_or(64),
            request_timeout_ms: args
                .request_timeout_ms
                .or(file.request_timeout_ms)
                .unwrap_or(30_000),
            node_grace_ms: args.node_grace_ms.or(file.node_grace_ms).unwrap_or(30_000),
            local_session: args.local_session.or(file.local_session).unwrap_or(true),
            mountpoint,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.0 == 0 {
            return Err(ConfigError::Invalid {
                name: "node_id",
                why: "node ids start at 1".into(),
            });
        }
        if self.workers == 0 || self.workers > 1024 {
            return Err(ConfigError::Invalid {
                name: "workers",
                why: format!("{} is outside 1..=1024", self.workers),
            });
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                name: "request_timeout_ms",
                why: "must be positive".into(),
            });
        }
        if self.node_grace_ms == 0 {
            return Err(ConfigError::Invalid {
                name: "node_grace_ms",
                why: "must be positive".into(),
            });
        }
        if self.prealloc_bytes > (16 << 30) {
            return Err(ConfigError::Invalid {
                name: "prealloc_mib",
                why: "at most 16384".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> MountArgs {
        let mut v = vec!["csvfs", "mount"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(v).command {
            crate::cli::Command::Mount(m) => m,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn local_session_defaults_on_comes_from_the_file_and_a_flag_overrides_it() {
        let base = ["--lun", "x", "--node-id", "1", "--secret", "/s", "/mnt"];
        let cfg = MountConfig::resolve(&args(&base)).unwrap();
        assert!(cfg.local_session);
        let dir = std::env::temp_dir().join(format!("csvfs-cfg-ls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.toml");
        std::fs::write(&path, "local_session = false\n").unwrap();
        let p = path.to_str().unwrap();
        let mut with_file = vec!["--config", p];
        with_file.extend_from_slice(&base);
        assert!(
            !MountConfig::resolve(&args(&with_file))
                .unwrap()
                .local_session
        );
        let mut flag = vec!["--local-session", "true"];
        flag.extend_from_slice(&with_file);
        assert!(MountConfig::resolve(&args(&flag)).unwrap().local_session);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flags_override_file_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("csvfs-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.toml");
        std::fs::write(
            &path,
            "lun = \"nbd://127.0.0.1:1/lun\"\nnode_id = 2\nsecret = \"/s\"\nmountpoint = \"/mnt/x\"\n",
        )
        .unwrap();
        let cfg = MountConfig::resolve(&args(&[
            "--config",
            path.to_str().unwrap(),
            "--node-id",
            "3",
        ]))
        .unwrap();
        assert_eq!(cfg.node, NodeId(3));
        assert_eq!(cfg.lun, "nbd://127.0.0.1:1/lun");
        assert_eq!(cfg.listen.port(), 0);
        std::fs::write(&path, "lun = \"x\"\nbogus = 1\n").unwrap();
        let err = MountConfig::resolve(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        let err = MountConfig::resolve(&args(&["--lun", "x", "/mnt"])).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Missing {
                name: "node_id",
                ..
            }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
