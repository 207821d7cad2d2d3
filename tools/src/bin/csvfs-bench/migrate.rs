//! `csvfs-bench migrate`: live migration of hv-runner side by side with QEMU, in one run.
//!
//! Each case boots a guest of the given RAM size that either stays idle (RAM all zero),
//! fills every page, or fills every page and then rewrites a 16 or 64 MiB region
//! continuously, and migrates it over loopback. hv-runner runs its test guest
//! (fixtures/guest) and is driven through its CLI (`run`, `receive`, `migrate`); QEMU
//! (`qemu-system-x86_64 -accel kvm`) runs a boot-sector guest assembled here from source
//! that does the same, and is driven over QMP (`migrate`, `query-migrate`), once with its
//! defaults and once with max-bandwidth raised to 100 GB/s. Downtime is source pause to
//! destination resume: hv-runner's report (measured on the source's clock up to the
//! destination's "resumed" message), QEMU's `downtime`. hv-runner figures are medians and
//! 95th percentiles over `--runs`, QEMU's medians over `--qemu-runs`; ratios are
//! hv-runner / QEMU (raised bandwidth). Without qemu-system-x86_64 the run says so and
//! leaves the QEMU columns empty.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::output::{json_number, json_string, line, progress};

/// Options of `csvfs-bench migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Only the 256 MiB cases. Default: off.
    #[arg(long)]
    pub quick: bool,
    /// Runs per case; the median and 95th percentile are reported. Default: 1.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// QEMU runs per case (each with defaults and with raised bandwidth). Default: --runs.
    #[arg(long)]
    pub qemu_runs: Option<u32>,
    /// Only these cases (repeatable): idle_1g, filled_1g, busy16_1g, busy64_1g, idle_256m,
    /// filled_256m, busy16_256m, busy64_256m. Default: all (or all 256 MiB with --quick).
    #[arg(long = "case")]
    pub cases: Vec<String>,
    /// Skip QEMU (when qemu-system-x86_64 is not installed). Default: off.
    #[arg(long)]
    pub no_qemu: bool,
    /// Print one JSON object on stdout instead of a table. Default: off.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for a QEMU migration with default settings before cancelling it
    /// (it may never converge). Default: 60.
    #[arg(long, default_value_t = 60)]
    pub qemu_timeout_s: u64,
    /// Working directory (removed afterwards). Default: the temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// hv-runner binary. Default: `hv-runner` beside this binary.
    #[arg(long, env = "HV_RUNNER_BIN")]
    pub hv_runner: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    label: &'static str,
    key: &'static str,
    ram_mib: u64,
    fill: bool,
    dirty_mib: u64,
}

const CASES: [Case; 8] = [
    Case {
        label: "1 GiB idle",
        key: "idle_1g",
        ram_mib: 1024,
        fill: false,
        dirty_mib: 0,
    },
    Case {
        label: "1 GiB filled",
        key: "filled_1g",
        ram_mib: 1024,
        fill: true,
        dirty_mib: 0,
    },
    Case {
        label: "1 GiB filled + 16 MiB rewritten",
        key: "busy16_1g",
        ram_mib: 1024,
        fill: true,
        dirty_mib: 16,
    },
    Case {
        label: "1 GiB filled + 64 MiB rewritten",
        key: "busy64_1g",
        ram_mib: 1024,
        fill: true,
        dirty_mib: 64,
    },
    Case {
        label: "256 MiB idle",
        key: "idle_256m",
        ram_mib: 256,
        fill: false,
        dirty_mib: 0,
    },
    Case {
        label: "256 MiB filled",
        key: "filled_256m",
        ram_mib: 256,
        fill: true,
        dirty_mib: 0,
    },
    Case {
        label: "256 MiB filled + 16 MiB rewritten",
        key: "busy16_256m",
        ram_mib: 256,
        fill: true,
        dirty_mib: 16,
    },
    Case {
        label: "256 MiB filled + 64 MiB rewritten",
        key: "busy64_256m",
        ram_mib: 256,
        fill: true,
        dirty_mib: 64,
    },
];

/// One migration's figures; `None` fields mean it did not complete.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
}

/// A child process killed and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// hv-runner's default downtime budget (`--max-downtime-ms`), which the bench uses.
const BUDGET_MS: f64 = 50.0;

/// The `pct` percentile (nearest rank) of `v`.
fn percentile(v: &[f64], pct: usize) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (pct * v.len()).div_ceil(100).clamp(1, v.len());
    Some(v[rank - 1])
}

fn median(v: &[f64]) -> Option<f64> {
    percentile(v, 50)
}

/// Extracts `"key":number` from a flat JSON object.
fn json_field(json: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let start = json.find(&pat)? + pat.len();
    let rest = json[start..].trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e' || c == '+'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

struct HvRunner {
    bin: PathBuf,
    root: PathBuf,
}

impl HvRunner {
    fn cmd(&self, node: &str) -> Command {
        let mut c = Command::new(&self.bin);
        c.env(
            "HV_RUNNER_RUNTIME_DIR",
            self.root.join(format!("run-{node}")),
        )
        .env("HV_RUNNER_NODE", node)
        .env("RUST_LOG", "warn");
        c
    }

    fn one(&self, case: &Case, n: u32) -> anyhow::Result<Figures> {
        let volume = self.root.join("volume");
        std::fs::create_dir_all(&volume)?;
        let name = format!("{}-{n}", case.key);
        let mem = format!("{}M", case.ram_mib);
        let dirty = format!("{}M", case.dirty_mib);
        let rate = if case.dirty_mib > 0 { "max" } else { "0" };
        let mut create = self.cmd("a");
        create.args([
            "create",
            "--name",
            &name,
            "--memory",
            &mem,
            "--dirty",
            &dirty,
            "--dirty-rate",
            rate,
            "--heartbeat-ms",
            "100",
        ]);
        create.arg("--volume").arg(&volume);
        if case.fill {
            create.arg("--fill");
        }
        let o = create.output()?;
        if !o.status.success() {
            bail!("hv-runner create: {}", String::from_utf8_lossy(&o.stderr));
        }
        let dir = volume.join(&name);
        let _src = Proc(
            self.cmd("a")
                .arg("run")
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()?,
        );
        let console = dir.join("console.log");
        let ready = if case.fill { "fill done" } else { "seq=1\n" };
        wait_until(Duration::from_secs(300), "guest start", || {
            std::fs::read_to_string(&console).is_ok_and(|c| c.contains(ready))
        })?;
        if case.dirty_mib > 0 {
            // Let the rewriting run for a while so the working set is hot.
            let deadline = Instant::now() + Duration::from_secs(1);
            wait_until(Duration::from_secs(5), "warm-up", || {
                Instant::now() >= deadline
            })?;
        }
        let mut recv = self.cmd("b");
        recv.args(["receive", "--listen", "127.0.0.1:0", "--volume"])
            .arg(&volume);
        let mut child = recv.stdout(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().context("receive stdout")?;
        let _dst = Proc(child);
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        reader.read_line(&mut first)?;
        // Keep draining so the receiver never writes into a closed pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        let addr = first
            .strip_prefix("listening ")
            .context("receive address")?
            .trim()
            .to_owned();
        let o = self
            .cmd("a")
            .args(["migrate", &name, "--to", &addr])
            .output()?;
        if !o.status.success() {
            progress(&format!(
                "hv-runner {}: {}",
                case.label,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return Ok(Figures::default());
        }
        let out = String::from_utf8_lossy(&o.stdout);
        let json = out
            .lines()
            .find(|l| l.starts_with('{'))
            .context("migrate report")?;
        let _ = self.cmd("b").args(["stop", &name]).output();
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Figures {
            total_ms: json_field(json, "total_ms"),
            downtime_ms: json_field(json, "downtime_ms"),
        })
    }
}

/// The QEMU guest: a boot sector that enters 32-bit protected mode, fills every page
/// above 1 MiB (when asked), prints `F` on COM1, then rewrites one word per page of its
/// dirty region forever (or halts). Parameters live at offset 0x1f0 of the sector.
const BOOT_ASM: &str = r#"
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    in $0x92, %al
    or $2, %al
    out %al, $0x92
    lgdtl gdtdesc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $pm
    .code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %esp
    mov ram_end, %ebx
    cmpb $0, fill
    je 2f
    mov $0x100000, %edi
1:  mov %edi, %eax
    xor $0x5a5a5a5a, %eax
    mov %eax, (%edi)
    add $4096, %edi
    cmp %ebx, %edi
    jb 1b
2:  mov $0x3f8, %dx
    mov $'F', %al
    out %al, %dx
    mov dirty, %ecx
    test %ecx, %ecx
    jz 5f
    xor %esi, %esi
3:  mov $0x100000, %edi
    lea (%edi,%ecx), %ebp
4:  inc %esi
    mov %esi, (%edi)
    add $4096, %edi
    cmp %ebp, %edi
    jb 4b
    jmp 3b
5:  hlt
    jmp 5b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdtdesc:
    .word 23
    .long gdt
    .org 0x1f0
ram_end: .long 0
dirty:   .long 0
fill:    .byte 0
    .org 510
    .byte 0x55, 0xaa
"#;

fn build_boot_sector(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let src = dir.join("boot.S");
    std::fs::write(&src, BOOT_ASM)?;
    let obj = dir.join("boot.o");
    let st = Command::new("gcc")
        .args(["-c", "-m32", "-o"])
        .arg(&obj)
        .arg(&src)
        .status()
        .context("run gcc")?;
    if !st.success() {
        bail!("assembling the QEMU boot sector failed");
    }
    let elf = dir.join("boot.elf");
    let st = Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-Ttext",
            "0x7c00",
            "--oformat",
            "binary",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj)
        .status()
        .context("run ld")?;
    if !st.success() {
        bail!("linking the QEMU boot sector failed");
    }
    let bin = std::fs::read(&elf)?;
    if bin.len() != 512 {
        bail!("boot sector is {} bytes, not 512", bin.len());
    }
    Ok(bin)
}

struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Self> {
        let mut s = None;
        wait_until(Duration::from_secs(20), "qmp socket", || {
            s = UnixStream::connect(path).ok();
            s.is_some()
        })?;
        let w = s.context("qmp connect")?;
        let mut q = Self {
            r: BufReader::new(w.try_clone()?),
            w,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.call(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn call(&mut self, cmd: &str) -> anyhow::Result<String> {
        self.w.write_all(cmd.as_bytes())?;
        self.w.write_all(b"\n")?;
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l)? == 0 {
                bail!("qmp closed");
            }
            if l.contains("\"event\"") {
                continue;
            }
            if l.contains("\"error\"") {
                bail!("qmp {cmd}: {}", l.trim());
            }
            return Ok(l);
        }
    }
}

struct Qemu {
    root: PathBuf,
    boot: Vec<u8>,
    timeout: Duration,
}

impl Qemu {
    fn spawn(
        &self,
        tag: &str,
        case: &Case,
        incoming: Option<&str>,
    ) -> anyhow::Result<(Proc, PathBuf, PathBuf)> {
        let mut boot = self.boot.clone();
        let ram_end = u32::try_from(case.ram_mib << 20).context("ram size")?;
        let dirty = u32::try_from(case.dirty_mib << 20).context("dirty size")?;
        boot[0x1f0..0x1f4].copy_from_slice(&ram_end.to_le_bytes());
        boot[0x1f4..0x1f8].copy_from_slice(&dirty.to_le_bytes());
        boot[0x1f8] = u8::from(case.fill);
        boot.resize(1 << 20, 0);
        let img = self.root.join(format!("{tag}.img"));
        std::fs::write(&img, &boot)?;
        let qmp = self.root.join(format!("{tag}.qmp"));
        let serial = self.root.join(format!("{tag}.serial"));
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&serial);
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-accel",
            "kvm",
            "-m",
            &format!("{}M", case.ram_mib),
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", img.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
        if let Some(uri) = incoming {
            c.args(["-incoming", uri]);
        }
        let p = Proc(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start qemu-system-x86_64")?,
        );
        Ok((p, qmp, serial))
    }

    fn one(&self, case: &Case, raised: bool, port: u16) -> anyhow::Result<Figures> {
        let uri = format!("tcp:127.0.0.1:{port}");
        let (_src, src_qmp, serial) = self.spawn("src", case, None)?;
        let (_dst, dst_qmp, _) = self.spawn("dst", case, Some(&uri))?;
        wait_until(Duration::from_secs(300), "qemu guest start", || {
            std::fs::read(&serial).is_ok_and(|s| s.contains(&b'F'))
        })?;
        if case.dirty_mib > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let mut q = Qmp::connect(&src_qmp)?;
        let _qd = Qmp::connect(&dst_qmp)?;
        if raised {
            q.call(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":100000000000}}"#)?;
        }
        q.call(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#
        ))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let r = q.call(r#"{"execute":"query-migrate"}"#)?;
            if r.contains("\"completed\"") {
                return Ok(Figures {
                    total_ms: json_field(&r, "total-time"),
                    downtime_ms: json_field(&r, "downtime"),
                });
            }
            if r.contains("\"failed\"") || r.contains("\"cancelled\"") {
                progress(&format!(
                    "qemu {}: migration failed: {}",
                    case.label,
                    r.trim()
                ));
                return Ok(Figures::default());
            }
            if Instant::now() > deadline {
                let _ = q.call(r#"{"execute":"migrate_cancel"}"#);
                progress(&format!(
                    "qemu {}: not finished after {:?}, cancelled",
                    case.label, self.timeout
                ));
                return Ok(Figures::default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".to_string(),
    }
}

/// Runs the benchmark and prints the table (or JSON).
pub fn run(args: &MigrateArgs) -> anyhow::Result<()> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = base.join(format!("csvfs-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = run_in(args, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run_in(args: &MigrateArgs, root: &Path) -> anyhow::Result<()> {
    let bin = match &args.hv_runner {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("hv-runner"),
    };
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p hv-runner` or pass --hv-runner",
            bin.display()
        );
    }
    let hv = HvRunner {
        bin,
        root: root.join("hv"),
    };
    let qemu_found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    let qemu = if args.no_qemu {
        None
    } else if !qemu_found {
        progress("qemu-system-x86_64 not found: the QEMU columns stay empty (install QEMU, or pass --no-qemu)");
        None
    } else {
        Some(Qemu {
            root: root.to_owned(),
            boot: build_boot_sector(root)?,
            timeout: Duration::from_secs(args.qemu_timeout_s),
        })
    };
    for c in &args.cases {
        if !CASES.iter().any(|k| k.key == c) {
            bail!("unknown case {c:?}");
        }
    }
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| !args.quick || c.ram_mib == 256)
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|k| k == c.key))
        .collect();
    let qemu_runs = args.qemu_runs.unwrap_or(args.runs);
    let mut rows = Vec::new();
    let mut port = 47_000u16;
    for case in cases {
        let mut ours = (Vec::new(), Vec::new());
        let mut qd = (Vec::new(), Vec::new());
        let mut qr = (Vec::new(), Vec::new());
        for n in 0..args.runs {
            progress(&format!("{} run {}: hv-runner", case.label, n + 1));
            let f = hv.one(case, n)?;
            ours.0.extend(f.total_ms);
            ours.1.extend(f.downtime_ms);
        }
        if let Some(q) = &qemu {
            for n in 0..qemu_runs {
                for (raised, acc) in [(false, &mut qd), (true, &mut qr)] {
                    port += 1;
                    progress(&format!(
                        "{} run {}: qemu ({})",
                        case.label,
                        n + 1,
                        if raised { "100 GB/s" } else { "defaults" }
                    ));
                    let f = q.one(case, raised, port)?;
                    acc.0.extend(f.total_ms);
                    acc.1.extend(f.downtime_ms);
                }
            }
        }
        let in_budget = ours.1.iter().filter(|&&d| d <= 1.2 * BUDGET_MS).count();
        rows.push(Row {
            case,
            hv_total: median(&ours.0),
            hv_down: median(&ours.1),
            hv_total_p95: percentile(&ours.0, 95),
            hv_down_p95: percentile(&ours.1, 95),
            hv_done: ours.1.len(),
            hv_in_budget: in_budget,
            qd_total: median(&qd.0),
            qd_down: median(&qd.1),
            qr_total: median(&qr.0),
            qr_down: median(&qr.1),
        });
    }
    if args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let num = |x: Option<f64>| x.map_or_else(|| "null".to_string(), json_number);
                format!(
                    "{}:{{\"hv_total_ms\":{},\"hv_downtime_ms\":{},\"hv_total_p95_ms\":{},\"hv_downtime_p95_ms\":{},\"hv_completed\":{},\"hv_within_1_2x_budget\":{},\"qemu_default_total_ms\":{},\"qemu_default_downtime_ms\":{},\"qemu_total_ms\":{},\"qemu_downtime_ms\":{}}}",
                    json_string(r.case.key),
                    num(r.hv_total), num(r.hv_down), num(r.hv_total_p95), num(r.hv_down_p95),
                    r.hv_done, r.hv_in_budget,
                    num(r.qd_total), num(r.qd_down), num(r.qr_total), num(r.qr_down)
                )
            })
            .collect();
        line(&format!(
            "{{\"runs\":{},\"qemu_runs\":{},\"qemu\":{},\"cases\":{{{}}}}}",
            args.runs,
            qemu_runs,
            qemu.is_some(),
            items.join(",")
        ));
        return Ok(());
    }
    line(&format!(
        "live migration over loopback; hv-runner: median and p95 of {} run(s), QEMU: median of {} run(s){}; times in ms; ratio = hv-runner median / QEMU (100 GB/s) median; budget = downtime <= 1.2 x {BUDGET_MS} ms",
        args.runs,
        qemu_runs,
        if qemu.is_none() { " (QEMU not run)" } else { "" }
    ));
    line(&format!(
        "{:<34} {:>8} {:>8} {:>8} {:>8} {:>7} | {:>8} {:>7} | {:>9} {:>7} | {:>7} {:>7}",
        "case",
        "hv total",
        "p95",
        "hv down",
        "p95",
        "budget",
        "qemu-def",
        "qd down",
        "qemu-100G",
        "q down",
        "total x",
        "down x"
    ));
    for r in &rows {
        line(&format!(
            "{:<34} {:>8} {:>8} {:>8} {:>8} {:>7} | {:>8} {:>7} | {:>9} {:>7} | {:>7} {:>7}",
            r.case.label,
            fmt_ms(r.hv_total),
            fmt_ms(r.hv_total_p95),
            fmt_ms(r.hv_down),
            fmt_ms(r.hv_down_p95),
            format!("{}/{}", r.hv_in_budget, args.runs),
            fmt_ms(r.qd_total),
            fmt_ms(r.qd_down),
            fmt_ms(r.qr_total),
            fmt_ms(r.qr_down),
            ratio(r.hv_total, r.qr_total),
            ratio(r.hv_down, r.qr_down)
        ));
    }
    Ok(())
}

/// Figures of one case.
struct Row<'a> {
    case: &'a Case,
    hv_total: Option<f64>,
    hv_down: Option<f64>,
    hv_total_p95: Option<f64>,
    hv_down_p95: Option<f64>,
    hv_done: usize,
    hv_in_budget: usize,
    qd_total: Option<f64>,
    qd_down: Option<f64>,
    qr_total: Option<f64>,
    qr_down: Option<f64>,
}
