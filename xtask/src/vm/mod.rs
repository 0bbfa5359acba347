//! `cargo xtask vm`: boots a Debian kernel under qemu with a busybox initramfs built here, runs a
//! scenario script from `tests/vm/` inside it and reads its one-line JSON result back from the
//! serial console.
//!
//! qemu runs with TCG only: `-enable-kvm` hangs on the machines this project is developed on.
//! The VM has no network device; every packet stays in namespaces inside the guest.

//!
//! Modules: `kernel` (which kernel, fetched how), `modules` (which modules, in which order),
//! `initramfs` (the cpio image), `boot` (qemu and the console), `verdict` (each mode's expected
//! outcome) and `matrix` (every kernel, written to KERNELS.md).

mod boot;
mod initramfs;
mod kernel;
mod kernels_md;
mod matrix;
mod modules;
mod verdict;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use serde_json::Value;

use self::{
    boot::{BootSpec, boot},
    initramfs::{build_initramfs, remove_stale_run_images, write_run_initrd},
    kernel::{DebianKernel, Flavour, Kernel, Line, config_summary, debian_kernel, kernel_at},
    verdict::{Verdict, check, summarize},
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Encrypted VXLAN overlay (ESP transport mode) through a 1:1 NAT.
    EspNat,
    /// Seed 000: unsolicited UDP steals a container's NAT port.
    Guard,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// No fix: expected to fail both ways with UDP checksum errors.
    Baseline,
    /// VXLAN devices recreated with noudpcsum on both nodes.
    Noudpcsum,
    /// The nftables `udp checksum set 0` rule on both nodes.
    Nft,
    /// The nftables rule on B only.
    NftOneSide,
    /// `natfix attach --iface <underlay> <--natfix-arg...> --pin` on both nodes.
    Natfix,
    /// VXLAN through the NAT without ESP.
    Cleartext,
    /// natfix's overlay fix, auto backend (IPv4: the nftables rule alone), zero, Docker's reqid.
    NatfixAuto,
    /// natfix's overlay fix, auto backend, recompute (tc + nftables).
    NatfixAutoRecompute,
    /// natfix's overlay fix, tc backend only, zero.
    NatfixTc,
    /// natfix's overlay fix, tc backend only, recompute.
    NatfixTcRecompute,
    /// natfix's overlay fix, nftables backend only.
    NatfixNft,
    /// natfix's overlay fix, tc program and nftables rule, zero.
    NatfixBoth,
    /// natfix's overlay fix on B only.
    NatfixOneSide,
    /// natfix's overlay fix (both backends) on both nodes, VXLAN without ESP: must stay untouched.
    NatfixCleartext,
    /// natfix's overlay fix (both backends) for another reqid: Docker's packets must stay untouched.
    NatfixWrongReqid,
    /// No fix, VXLAN on port 4777 (swarm's --data-path-port): fails as on 4789.
    #[value(name = "baseline-4777")]
    Baseline4777,
    /// VXLAN on 4777, `--overlay-fix` naming no port: `--vxlan-port auto` must find it.
    #[value(name = "natfix-port-4777")]
    NatfixPort4777,
    /// Overlay TCP throughput (iperf3): natfix (auto) against the noudpcsum workaround, same boot.
    Throughput,
    /// `natfix trace` of decrypted VXLAN in B, without a fix (ends in a `UDP_CSUM` drop) and with natfix's.
    Trace,
    /// `natfix lab --scenario overlay`, the demo's native path (this kernel has ESP).
    Lab,
    /// guard scenario: no natfix, the container's flow leaves on another port.
    GuardBaseline,
    /// guard scenario: natfix's XDP guard (flow source auto).
    GuardXdp,
    /// guard scenario: natfix's tc guard.
    GuardTc,
    /// guard scenario: --flow-source conntrack must be refused where kfuncs are in module BTF.
    GuardConntrackRefused,
    /// Every mode without natfix's own fix, in one boot.
    All,
    /// The baseline and every natfix overlay mode, in one boot.
    NatfixAll,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Toggle {
    On,
    Off,
}

fn value_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value().map(|p| p.get_name().to_owned()).unwrap_or_default()
}

#[derive(clap::Args, Clone)]
#[expect(clippy::struct_excessive_bools, reason = "clap flags: each is an independent command-line switch")]
pub struct VmArgs {
    /// Scenario script (tests/vm/<scenario>.sh) to run inside the VM.
    #[arg(long, value_enum, default_value_t = Scenario::EspNat)]
    scenario: Scenario,
    /// Kernel: a bzImage, a kernel .deb, or a directory holding an unpacked kernel .deb. Repeat
    /// it to run on several kernels (one after the other; with --matrix, each is added to it).
    #[arg(long, value_name = "PATH")]
    kernel: Vec<PathBuf>,
    /// Modules for a bare bzImage: a lib/modules/<version> directory or a root holding one. The
    /// n-th --modules goes with the n-th --kernel.
    #[arg(long, value_name = "DIR")]
    modules: Vec<PathBuf>,
    /// Debian kernels to fetch with apt-get and boot (comma-separated or repeated): 6.1, 6.12,
    /// 6.1-cloud, 6.12-cloud (newest package of the line); add -oldest for the oldest still
    /// served, e.g. 6.1-oldest. Default: 6.1 when no --kernel is given; with --matrix, all four.
    #[arg(long, value_name = "LINE[-cloud][-oldest]", value_delimiter = ',')]
    debian: Vec<DebianKernel>,
    /// natfix binary to put in the VM. Default: <target dir>/debug/natfix if it exists.
    #[arg(long, value_name = "PATH")]
    natfix_bin: Option<PathBuf>,
    /// Modes to run in one boot (comma-separated, or `all`).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "baseline")]
    mode: Vec<Mode>,
    /// GRO on the receiving underlay veths (with `esp4_offload`, the decrypting GRO path).
    #[arg(long, value_enum, default_value_t = Toggle::On)]
    gro: Toggle,
    /// Extra argument for `natfix attach` in mode natfix (repeatable). Default: `$NATFIX_ARGS`,
    /// split on whitespace.
    #[arg(long = "natfix-arg", value_name = "ARG", allow_hyphen_values = true)]
    natfix_args: Vec<String>,
    /// Also write the JSON result to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Give up on the VM after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// Echo the serial console, and have /init print the scenario's stderr and dmesg.
    #[arg(long, short)]
    verbose: bool,
    /// Have /init run `natfix diagnose --json` once (its kernel.* findings go to the result's
    /// `vm.kernel_findings`; 3 to 20 s more per boot under TCG). --matrix always does.
    #[arg(long)]
    diagnose: bool,
    /// Do not compare the result with each mode's expected outcome.
    #[arg(long)]
    no_check: bool,
    /// Run the guard and overlay scenarios on every kernel line Debian serves (6.1 and 6.12,
    /// amd64 and cloud-amd64, newest of each; --debian replaces that list) plus each --kernel,
    /// and write KERNELS.md.
    #[arg(long)]
    matrix: bool,
    /// With --matrix: write the table here instead of KERNELS.md.
    #[arg(long, value_name = "FILE", requires = "matrix")]
    matrix_out: Option<PathBuf>,
}

/// A kernel to run on, and what to call it.
struct Choice {
    label: String,
    kernel: Result<Kernel>,
}

/// The kernels `args` asks for: --debian's, then each --kernel. Without --debian, `default`
/// stands in for it (for a plain run only when there is no --kernel either:
/// `kernel_replaces_default`).
fn choose_kernels(args: &VmArgs, cache: &Path, default: &[DebianKernel], kernel_replaces_default: bool) -> Vec<Choice> {
    let debian: &[DebianKernel] = if !args.debian.is_empty() {
        &args.debian
    } else if kernel_replaces_default && !args.kernel.is_empty() {
        &[]
    } else {
        default
    };
    let mut choices = Vec::new();
    for spec in debian {
        match debian_kernel(cache, *spec) {
            Ok((package, kernel)) => choices.push(Choice { label: format!("Debian {package}"), kernel: Ok(kernel) }),
            Err(e) => choices.push(Choice { label: format!("Debian {spec}"), kernel: Err(e) }),
        }
    }
    for (i, path) in args.kernel.iter().enumerate() {
        let kernel = kernel_at(path, args.modules.get(i).map(PathBuf::as_path), cache);
        let label = match &kernel {
            Ok(k) => format!("{} ({})", path.display(), k.version),
            Err(_) => path.display().to_string(),
        };
        choices.push(Choice { label, kernel });
    }
    choices
}

pub fn run(args: &VmArgs) -> Result<()> {
    if args.matrix {
        return matrix::matrix(args);
    }
    let workspace = workspace_root();
    let cache = workspace.join("vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let choices = choose_kernels(args, &cache, &[DebianKernel::newest(Line::V6_1, Flavour::Amd64)], true);
    let (mut results, mut failed) = (Vec::new(), Vec::new());
    for choice in choices {
        let kernel = choice.kernel.with_context(|| format!("kernel {}", choice.label))?;
        let result = run_on(args, &kernel, &args.mode)?;
        if let Err(e) = report(&result, !args.no_check) {
            eprintln!("vm: {}: {e:#}", choice.label);
            failed.push(choice.label);
        }
        results.push(result);
    }
    if let Some(path) = &args.json_out {
        let json = if results.len() == 1 { results.swap_remove(0) } else { Value::Array(results) };
        fs::write(path, format!("{}\n", serde_json::to_string_pretty(&json)?)).with_context(|| format!("cannot write {}", path.display()))?;
    }
    ensure!(failed.is_empty(), "not as expected on {}", failed.join(", "));
    Ok(())
}

/// Builds the initramfs for `kernel`, boots it with `modes`, returns the result (one object or an array).
fn run_on(args: &VmArgs, kernel: &Kernel, modes: &[Mode]) -> Result<Value> {
    let workspace = workspace_root();
    let cache = workspace.join("vm-cache");
    eprintln!("vm: kernel {} ({})", kernel.version, kernel.image.display());
    if let Some(summary) = config_summary(kernel) {
        eprintln!("vm: config {summary}");
    }

    let natfix = natfix_binary(args, &workspace)?;
    let initramfs = build_initramfs(&workspace, &cache, kernel, natfix.as_deref())?;
    remove_stale_run_images(&cache);
    let initrd = cache.join(format!("initrd-run-{}.img", std::process::id()));
    write_run_initrd(&initramfs.path, &natfix_args(args), &initrd)?;

    let log_path = cache.join("last-console.log");
    let cmdline = cmdline(args, modes);
    let spec = BootSpec {
        image: &kernel.image,
        initrd: &initrd,
        cmdline: &cmdline,
        timeout: Duration::from_secs(args.timeout),
        verbose: args.verbose,
        log_path: &log_path,
    };
    let outcome = boot(&spec);
    let _ = fs::remove_file(&initrd);
    let outcome = outcome?;
    eprintln!("vm: finished in {:.1} s (console log: {})", outcome.elapsed.as_secs_f64(), log_path.display());

    // serde_json's preserve_order keeps the scenario's key order.
    let top: Value = serde_json::from_str(&outcome.result_json)
        .with_context(|| format!("the VM printed a result that is not JSON (console log: {})", log_path.display()))?;
    let host = serde_json::json!({
        "wall_s": (outcome.elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "boot_s": top["boot_s"],
        "guest_s": top["scenario_s"],
        "initramfs": if initramfs.rebuilt { "built" } else { "cached" },
        "kernel_image": kernel.image.display().to_string(),
        "natfix_bin": natfix.as_ref().map(|p| p.display().to_string()),
        "modules_builtin": initramfs.builtin,
        "modules_failed": top["modules_failed"],
        // What `natfix diagnose` in the VM says of the kernel (tcx, kfuncs, esp4_offload, ...).
        "kernel_findings": kernel_findings(&top["diagnose"]),
    });
    let result = with_host_facts(top["result"].clone(), &host)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(result)
}

/// The `kernel.*` findings of a `natfix diagnose --json` report (null without one).
fn kernel_findings(diagnose: &Value) -> Value {
    diagnose["findings"].as_array().map_or(Value::Null, |findings| {
        findings.iter().filter(|f| f["check"].as_str().is_some_and(|c| c.starts_with("kernel."))).cloned().collect()
    })
}

/// `--natfix-arg`s, or `$NATFIX_ARGS` (whitespace-separated) when none is given.
fn natfix_args(args: &VmArgs) -> Vec<String> {
    if args.natfix_args.is_empty() {
        std::env::var("NATFIX_ARGS").map(|v| v.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
    } else {
        args.natfix_args.clone()
    }
}

/// The kernel command line: console, and the scenario's settings for /init.
fn cmdline(args: &VmArgs, modes: &[Mode]) -> String {
    let modes = if modes.contains(&Mode::All) {
        value_name(&Mode::All)
    } else if modes.contains(&Mode::NatfixAll) {
        value_name(&Mode::NatfixAll)
    } else {
        modes.iter().map(value_name).collect::<Vec<_>>().join(",")
    };
    format!(
        "console=ttyS0 panic=-1 quiet mitigations=off natfix.scenario={} natfix.mode={modes} natfix.gro={} natfix.verbose={} natfix.diagnose={}",
        value_name(&args.scenario),
        u8::from(args.gro == Toggle::On),
        u8::from(args.verbose),
        u8::from(args.diagnose),
    )
}

/// Adds the host's view of the run (`vm`) to each mode's result.
fn with_host_facts(mut result: Value, host: &Value) -> Result<Value> {
    match &mut result {
        Value::Array(items) => {
            for item in items.iter_mut().filter_map(Value::as_object_mut) {
                item.insert("vm".into(), host.clone());
            }
        }
        Value::Object(item) => {
            item.insert("vm".into(), host.clone());
        }
        _ => bail!("the VM's result is neither an object nor an array"),
    }
    Ok(result)
}

/// One line per mode on stderr; with `check`, fails unless every mode behaved as expected.
fn report(result: &Value, check_expectations: bool) -> Result<()> {
    let items: Vec<&Value> = match result {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let (mut passed, mut failed) = (0, 0);
    for item in items {
        if let Some(err) = item.get("error") {
            bail!("the scenario failed: {err}");
        }
        let summary = summarize(item);
        if !check_expectations {
            eprintln!("vm: {summary}");
            continue;
        }
        match check(item) {
            Verdict::Pass => {
                passed += 1;
                eprintln!("vm: PASS {summary}");
            }
            Verdict::Informational => eprintln!("vm: INFO {summary}"),
            Verdict::Fail(why) => {
                failed += 1;
                eprintln!("vm: FAIL {summary}\n      {}", why.join("\n      "));
            }
        }
    }
    if check_expectations {
        println!("vm: {passed} passed, {failed} failed");
    }
    ensure!(failed == 0, "{failed} mode(s) did not behave as expected");
    Ok(())
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn natfix_binary(args: &VmArgs, workspace: &Path) -> Result<Option<PathBuf>> {
    if let Some(path) = &args.natfix_bin {
        ensure!(path.is_file(), "--natfix-bin {} is not a file", path.display());
        return Ok(Some(fs::canonicalize(path)?));
    }
    // `cargo run` passes CARGO_TARGET_DIR through when the caller set it.
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug/natfix"));
    }
    candidates.push(workspace.join("target/debug/natfix"));
    Ok(candidates.into_iter().find(|p| p.is_file()))
}
