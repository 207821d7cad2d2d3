//! hv-runner: a small KVM VM runner that keeps each VM in its own folder of a volume and
//! live-migrates running VMs between nodes. It uses the volume only through paths, so it
//! works on csvfs (where every node sees the same folder) and on any local directory.
//! It does not manage networks or real guest kernels: the guest is a tiny test program
//! (fixtures/guest) with a serial console and a virtio-blk disk.
//! Main types: [`vm::Vm`] (one VM), [`migration`] (live migration, save/restore),
//! [`runner`] (process and control socket), [`verify`] (the test guest's disk check).
//! Spec: ../shared/DESIGN.md (hv-runner) and MIGRATION.md.

mod cli;
mod devices;
mod kvm;
mod migration;
mod out;
mod runner;
mod verify;
mod vm;

use std::io::BufReader;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::cli::{Cli, Command};
use crate::runner::Request;
use crate::vm::{OwnerRecord, Vm, VmConfig, VmDir};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    kvm::install_kick_handler().context("install vcpu kick handler")?;
    let node = cli.node.clone().unwrap_or_else(vm::hostname);
    let span = tracing::info_span!("hv-runner", node = %node);
    let _g = span.enter();
    match cli.command {
        Command::Create {
            volume,
            name,
            memory,
            vcpus,
            disk_size,
            dirty,
            dirty_rate,
            fill,
            heartbeat_ms,
        } => {
            let cfg = VmConfig {
                memory_mib: memory >> 20,
                vcpus,
                disk_bytes: disk_size,
                image: "builtin:test-guest".into(),
                dirty_mib: dirty >> 20,
                dirty_pages_per_sec: dirty_rate,
                fill,
                heartbeat_ms,
            };
            let dir = VmDir::new(&volume.join(&name))?;
            dir.create(&cfg)?;
            out::line(&format!("created {}", dir.dir.display()));
        }
        Command::Run { dir } => {
            let dir = VmDir::new(&dir)?;
            let cfg = dir.load_config()?;
            if dir.state_path().exists() {
                return Err(vm::VmError::HasSavedState(dir.name).into());
            }
            OwnerRecord::claim(&dir, &node)?;
            let started = (|| {
                let vm = Vm::create(dir.clone(), cfg, None, true)?;
                vm.claim_owner(&node, false)?;
                vm.boot()?;
                vm.attach_disk()?;
                vm.start()?;
                Ok::<_, vm::VmError>(vm)
            })();
            let vm = match started {
                Ok(vm) => vm,
                Err(e) => {
                    OwnerRecord::release(&dir);
                    return Err(e.into());
                }
            };
            let reason = runner::serve(vm, &node, &cli.runtime_dir)?;
            out::line(&format!("vm {}: {reason}", dir.name));
        }
        Command::Status { name } => status(&cli.runtime_dir, name.as_deref())?,
        Command::Stop { name } => {
            runner::request(&cli.runtime_dir, &name, &Request::Stop, &mut |_| {})?;
            out::line(&format!("stopped {name}"));
        }
        Command::Save { name } => {
            runner::request(&cli.runtime_dir, &name, &Request::Save, &mut |_| {})?;
            out::line(&format!("saved {name}"));
        }
        Command::Migrate {
            name,
            to,
            max_downtime_ms,
            max_rounds,
            on_no_converge,
            debug_dump_dir,
            max_bandwidth_mbps,
        } => {
            let opts = migration::MigrateOptions {
                to,
                max_downtime_ms,
                max_rounds,
                on_no_converge,
                debug_dump_dir,
                max_bandwidth_mbps,
            };
            let reply =
                runner::request(&cli.runtime_dir, &name, &Request::Migrate(opts), &mut |p| {
                    eprintln!("migrate {name}: {p}")
                })?;
            let r = reply.report.unwrap_or_default();
            out::line(&format!(
                "migrated {name}: total {:.1} ms, downtime {:.1} ms, rounds {}, pages {}, zero pages {}, bytes {}, bandwidth {:.0} MB/s, throttle {}%",
                r.total_ms, r.downtime_ms, r.rounds, r.pages_sent, r.zero_pages_sent, r.bytes_sent, r.bandwidth_mbps, r.throttle_pct
            ));
            out::line(&serde_json::to_string(&r)?);
        }
        Command::Receive { listen, volume } => {
            let l = TcpListener::bind(&listen).with_context(|| format!("listen on {listen}"))?;
            out::line(&format!("listening {}", l.local_addr()?));
            loop {
                let (stream, peer) = l.accept().context("accept")?;
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let _ = stream.set_nodelay(true);
                let mut w = stream.try_clone()?;
                let mut r = BufReader::with_capacity(128 << 10, stream);
                match migration::receive(&mut r, Some(&mut w), &volume, &node, None) {
                    Ok(vm) => {
                        tracing::info!(%peer, vm = %vm.dir.name, "migration received, vm resumed");
                        let name = vm.dir.name.clone();
                        let reason = runner::serve(vm, &node, &cli.runtime_dir)?;
                        out::line(&format!("vm {name}: {reason}"));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "incoming migration failed; still listening")
                    }
                }
            }
        }
        Command::Restore { dir } => {
            let dir = VmDir::new(&dir)?;
            let volume = dir.dir.parent().unwrap_or(Path::new("."));
            let path = dir.state_path();
            let f =
                std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            let mut r = BufReader::with_capacity(128 << 10, f);
            let vm = migration::receive(&mut r, None, volume, &node, Some(&dir.name))?;
            std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
            let reason = runner::serve(vm, &node, &cli.runtime_dir)?;
            out::line(&format!("vm {}: {reason}", dir.name));
        }
        Command::VerifyDisk { dir, heartbeats } => {
            let report = verify::verify_disk(&dir, heartbeats)?;
            for l in report.lines(&dir) {
                out::line(&l);
            }
            if !report.problems.is_empty() {
                bail!(
                    "{} bad or missing disk records in {} (first: {})",
                    report.problems.len(),
                    dir.display(),
                    report.problems[0]
                );
            }
        }
    }
    Ok(())
}

fn status(runtime_dir: &Path, only: Option<&str>) -> Result<()> {
    let names: Vec<String> = match only {
        Some(n) => vec![n.to_owned()],
        None => {
            let mut v = Vec::new();
            if let Ok(rd) = std::fs::read_dir(runtime_dir) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "sock") {
                        if let Some(s) = p.file_stem().and_then(|s| s.to_str()) {
                            v.push(s.to_owned());
                        }
                    }
                }
            }
            v.sort();
            v
        }
    };
    if names.is_empty() {
        out::line("no vms running");
    }
    for n in names {
        match runner::request(runtime_dir, &n, &Request::Status, &mut |_| {}) {
            Ok(r) => {
                if let Some(s) = r.status {
                    out::line(&format!(
                        "{} {} node={} pid={} mem={}MiB dir={} disk r/w/f={}/{}/{}",
                        s.name,
                        s.state,
                        s.node,
                        s.pid,
                        s.memory_mib,
                        s.dir.display(),
                        s.disk_ops[0],
                        s.disk_ops[1],
                        s.disk_ops[2]
                    ));
                }
            }
            Err(e) if only.is_some() => bail!(e),
            Err(e) => out::line(&format!("{n} unreachable: {e}")),
        }
    }
    Ok(())
}
