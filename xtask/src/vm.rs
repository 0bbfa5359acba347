//! `cargo xtask vm`: boots a Debian kernel under qemu with a busybox initramfs built here, runs a
//! scenario script from `tests/vm/` inside it and reads its one-line JSON result back from the
//! serial console.
//!
//! qemu runs with TCG only: `-enable-kvm` hangs on the machines this project is developed on.
//! The VM has no network device; every packet stays in namespaces inside the guest.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use serde_json::Value;

/// Kernel modules the scenarios need; their dependencies (modules.dep) and soft dependencies
/// (modules.softdep, resolved through modules.alias) are added. Names that are built in are
/// reported and skipped.
const MODULES: &[&str] = &[
    // ESP and the xfrm netlink API `ip xfrm` uses.
    "xfrm_algo",
    "xfrm_user",
    "esp4",
    // GRO path of ESP: not auto-loaded for SAs without hardware offload.
    "esp4_offload",
    "esp6",
    "esp6_offload",
    // rfc4106(gcm(aes)), and the IV generators whose salt comes from the default RNG (drbg).
    "aes_generic",
    "gcm",
    "ghash_generic",
    "ctr",
    "seqiv",
    "echainiv",
    "drbg",
    "jitterentropy_rng",
    // The default stdrng is drbg_nopr_hmac_sha512; jitterentropy (its seed) conditions with SHA3.
    "sha512_generic",
    "sha3_generic",
    // The overlay and the namespaces' links.
    "veth",
    "vxlan",
    "udp_tunnel",
    "ip6_udp_tunnel",
    // The 1:1 NAT router and the nftables fix (`meta ipsec` is nf_tables' meta; nft_xfrm is
    // the `ipsec in ...` expression).
    "nfnetlink",
    "nf_tables",
    "nf_conntrack",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_nat",
    "nft_chain_nat",
    // The guard scenario's masquerading host, and ctnetlink (natfix reads conntrack over netlink).
    "nft_masq",
    "nf_conntrack_netlink",
    "nft_nat",
    "nft_ct",
    "nft_xfrm",
    // natfix's tc attachment on kernels < 6.6 (clsact qdisc + cls_bpf).
    "sch_ingress",
    "cls_bpf",
];

/// Host programs copied into the initramfs (with their shared libraries), and where to look.
const HOST_PROGRAMS: &[(&str, &[&str])] = &[
    ("ip", &["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]),
    ("nft", &["/usr/sbin/nft", "/sbin/nft"]),
    ("ethtool", &["/usr/sbin/ethtool", "/sbin/ethtool"]),
    // natfix runs `tc` to manage clsact qdiscs on kernels without tcx.
    ("tc", &["/usr/sbin/tc", "/sbin/tc"]),
    // Overlay throughput (mode `throughput`).
    ("iperf3", &["/usr/bin/iperf3"]),
    // UDP datagrams from chosen ports (scenario guard); busybox nc has no UDP.
    ("socat", &["/usr/bin/socat"]),
];

/// Bump when the initramfs layout changes, to invalidate cached images.
const INITRAMFS_FORMAT: u32 = 1;

/// The line /init prints with the result.
const RESULT_MARKER: &str = "NATFIX-RESULT ";

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
    /// Overlay TCP throughput (iperf3): natfix (auto) against the noudpcsum workaround, same boot.
    Throughput,
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
pub struct VmArgs {
    /// Scenario script (tests/vm/<scenario>.sh) to run inside the VM.
    #[arg(long, value_enum, default_value_t = Scenario::EspNat)]
    scenario: Scenario,
    /// Kernel: a bzImage, a kernel .deb, or a directory holding an unpacked kernel .deb.
    /// Default: the newest Debian linux-image-6.1.0-N-amd64, fetched with apt-get.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Modules for a bare bzImage: a lib/modules/<version> directory or a root holding one.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
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
    /// Do not compare the result with each mode's expected outcome.
    #[arg(long)]
    no_check: bool,
    /// Run the scenarios on every kernel available (the host's, each Debian 6.1 flavour the
    /// package lists offer, and --kernel) and write KERNELS.md.
    #[arg(long)]
    matrix: bool,
}

pub fn run(args: &VmArgs) -> Result<()> {
    if args.matrix {
        return matrix(args);
    }
    let workspace = workspace_root();
    let cache = workspace.join("vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let kernel = resolve_kernel(args, &cache)?;
    let result = run_on(args, &kernel, &args.mode)?;
    report(&result, !args.no_check)
}

/// The overlay modes each kernel of the matrix runs.
const MATRIX_MODES: [Mode; 8] = [
    Mode::Cleartext,
    Mode::Baseline,
    Mode::NatfixAuto,
    Mode::NatfixTc,
    Mode::NatfixTcRecompute,
    Mode::NatfixNft,
    Mode::NatfixBoth,
    Mode::NatfixWrongReqid,
];

/// The guard modes each kernel of the matrix runs.
const GUARD_MODES: [Mode; 4] = [Mode::GuardBaseline, Mode::GuardXdp, Mode::GuardTc, Mode::GuardConntrackRefused];

/// KERNELS.md rows of one VM run (one per mode).
fn matrix_rows(label: &str, result: &Value, failed: &mut usize) -> String {
    let mut md = String::new();
    let items: Vec<&Value> = result.as_array().map(|a| a.iter().collect()).unwrap_or_else(|| vec![result]);
    for item in items {
        let scenario = item["scenario"].as_str().unwrap_or("?");
        let mode = item["mode"].as_str().unwrap_or("?");
        let verdict = match check(item) {
            Verdict::Pass => "pass".to_owned(),
            Verdict::Informational => "info".to_owned(),
            Verdict::Fail(why) => {
                *failed += 1;
                format!("**FAIL**: {}", why.join("; ").replace('|', "/"))
            }
        };
        let _ = writeln!(md, "| {label} | {scenario}/{mode} | {verdict} | {} |", fallbacks(item));
    }
    md
}

/// `--matrix`: every kernel it can get, each scenario, into KERNELS.md.
fn matrix(args: &VmArgs) -> Result<()> {
    let workspace = workspace_root();
    let cache = workspace.join("vm-cache");
    fs::create_dir_all(&cache)?;
    let mut kernels = Vec::new();
    for flavour in ["amd64", "cloud-amd64"] {
        match debian_kernel_flavour(&cache, flavour) {
            Ok(k) => kernels.push((format!("Debian linux-image-{} ({flavour})", k.version), Some(k))),
            Err(e) => kernels.push((format!("Debian 6.1 {flavour}: not available ({e:#})"), None)),
        }
    }
    if args.kernel.is_some() {
        kernels.push(("--kernel".to_owned(), Some(resolve_kernel(args, &cache)?)));
    }
    let mut md = String::from(
        "# natfix across kernels\n\nWritten by `cargo xtask vm --matrix`. The host kernel runs the scenarios that need no \
         ESP (namespaces: `cargo test -p natfix-tests`); each VM kernel runs the guard scenario (tests/vm/guard.sh) \
         and the encrypted-overlay scenario (tests/vm/esp-nat.sh) under qemu/TCG. `fallback` lists what natfix reported missing or fell back from.\n\n\
         | kernel | scenario | result | fallback / missing |\n|---|---|---|---|\n",
    );
    let mut failed = 0;
    md.push_str(&host_rows(&workspace, &mut failed));
    for (label, kernel) in &kernels {
        let Some(kernel) = kernel else {
            let _ = writeln!(md, "| {label} | - | not run | - |");
            continue;
        };
        let guard_args = VmArgs { scenario: Scenario::Guard, ..args.clone() };
        match run_on(&guard_args, kernel, &GUARD_MODES) {
            Err(e) => {
                failed += 1;
                let _ = writeln!(md, "| {label} | guard | **error**: {} | - |", format!("{e:#}").replace('|', "/"));
            }
            Ok(result) => md.push_str(&matrix_rows(label, &result, &mut failed)),
        }
        match run_on(args, kernel, &MATRIX_MODES) {
            Err(e) => {
                failed += 1;
                let _ = writeln!(md, "| {label} | esp-nat | **error**: {} | - |", format!("{e:#}").replace('|', "/"));
            }
            Ok(result) => md.push_str(&matrix_rows(label, &result, &mut failed)),
        }
    }
    let path = workspace.join("KERNELS.md");
    fs::write(&path, &md).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{md}");
    ensure!(failed == 0, "{failed} kernel/scenario combination(s) failed (see KERNELS.md)");
    Ok(())
}

/// What natfix warned about in a VM mode (fallbacks), and modules that failed to load.
fn fallbacks(item: &Value) -> String {
    let mut notes: Vec<String> = Vec::new();
    for out in [&item["natfix"]["a"]["output"], &item["natfix"]["b"]["output"], &item["natfix"]["output"]] {
        let out = out.as_str().unwrap_or_default();
        for part in out.split("WARN").skip(1) {
            let text = part.split(" natfix").next().unwrap_or(part).trim().to_owned();
            if !notes.contains(&text) {
                notes.push(text);
            }
        }
    }
    if let Some(failed) = item["vm"]["modules_failed"].as_array().filter(|a| !a.is_empty()) {
        notes.push(format!("modules not loaded: {}", failed.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")));
    }
    if notes.is_empty() { "-".into() } else { notes.join("; ").replace('|', "/") }
}

/// The host kernel's rows: the namespace scenarios, and what `natfix diagnose` says of its features.
fn host_rows(workspace: &Path, failed: &mut usize) -> String {
    let release = Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let label = format!("host {release}");
    let mut md = String::new();
    let features = Command::new(workspace.join("target/debug/natfix"))
        .args(["diagnose", "--json", "--sample", "1"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .map(|v| {
            v["findings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["check"].as_str().is_some_and(|c| c.starts_with("kernel.")))
                .map(|f| format!("{}: {}", f["check"].as_str().unwrap_or(""), f["summary"].as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|| "natfix diagnose did not run".into());
    for (scenario, tests) in [("guard (seed 000) in namespaces", "guard_e2e"), ("attach/detach/pin in namespaces", "attach")] {
        let ok = Command::new(env!("CARGO"))
            .args(["test", "-q", "-p", "natfix-tests", "--test", tests])
            .current_dir(workspace)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            *failed += 1;
        }
        let _ = writeln!(md, "| {label} | {scenario} | {} | {} |", if ok { "pass" } else { "**FAIL**" }, features.replace('|', "/"));
    }
    let _ = writeln!(md, "| {label} | esp-nat (encrypted overlay) | not run: no ESP crypto in this kernel | - |");
    md
}

/// Builds the initramfs for `kernel`, boots it with `modes`, returns the result (one object or an array).
fn run_on(args: &VmArgs, kernel: &Kernel, modes: &[Mode]) -> Result<Value> {
    let workspace = workspace_root();
    let cache = workspace.join("vm-cache");
    eprintln!("vm: kernel {} ({})", kernel.version, kernel.image.display());
    if let Some(summary) = config_summary(&kernel) {
        eprintln!("vm: config {summary}");
    }

    let natfix = natfix_binary(args, &workspace)?;
    let initramfs = build_initramfs(&workspace, &cache, kernel, natfix.as_deref())?;
    remove_stale_run_images(&cache);
    let initrd = cache.join(format!("initrd-run-{}.img", std::process::id()));
    // `$NATFIX_ARGS` (whitespace-separated) when no --natfix-arg is given.
    let natfix_args = if args.natfix_args.is_empty() {
        std::env::var("NATFIX_ARGS").map(|v| v.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
    } else {
        args.natfix_args.clone()
    };
    write_run_initrd(&initramfs.path, &natfix_args, &initrd)?;

    let modes = if modes.contains(&Mode::All) {
        value_name(&Mode::All)
    } else if modes.contains(&Mode::NatfixAll) {
        value_name(&Mode::NatfixAll)
    } else {
        modes.iter().map(value_name).collect::<Vec<_>>().join(",")
    };
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet mitigations=off natfix.scenario={} natfix.mode={modes} natfix.gro={} natfix.verbose={}",
        value_name(&args.scenario),
        u8::from(args.gro == Toggle::On),
        u8::from(args.verbose),
    );
    let log_path = cache.join("last-console.log");
    let outcome = boot(&kernel.image, &initrd, &cmdline, Duration::from_secs(args.timeout), args.verbose, &log_path);
    let _ = fs::remove_file(&initrd);
    let outcome = outcome?;
    eprintln!("vm: finished in {:.1} s (console log: {})", outcome.elapsed.as_secs_f64(), log_path.display());

    // serde_json's preserve_order keeps the scenario's key order.
    let top: Value = serde_json::from_str(&outcome.result_json)
        .with_context(|| format!("the VM printed a result that is not JSON (console log: {})", log_path.display()))?;
    let parsed = |key: &str| top[key].clone();
    let host = serde_json::json!({
        "wall_s": (outcome.elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "boot_s": parsed("boot_s"),
        "guest_s": parsed("scenario_s"),
        "initramfs": if initramfs.rebuilt { "built" } else { "cached" },
        "kernel_image": kernel.image.display().to_string(),
        "natfix_bin": natfix.as_ref().map(|p| p.display().to_string()),
        "modules_builtin": initramfs.builtin,
        "modules_failed": parsed("modules_failed"),
    });
    let mut result = parsed("result");
    match &mut result {
        Value::Array(items) => {
            for item in items.iter_mut().filter_map(Value::as_object_mut) {
                item.insert("vm".into(), host.clone());
            }
        }
        Value::Object(item) => {
            item.insert("vm".into(), host);
        }
        _ => bail!("the VM's result is neither an object nor an array"),
    }
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        fs::write(path, format!("{text}\n")).with_context(|| format!("cannot write {}", path.display()))?;
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

// ---------------------------------------------------------------------------------------------
// Kernel

struct Kernel {
    image: PathBuf,
    version: String,
    /// lib/modules/<version>, with modules.dep.
    modules: Option<PathBuf>,
}

/// Kernel options the scenarios depend on (y: built in, m: module).
const CONFIG_SYMBOLS: &[&str] = &[
    "XFRM",
    "XFRM_USER",
    "XFRM_OFFLOAD",
    "INET_ESP",
    "INET_ESP_OFFLOAD",
    "CRYPTO_AES",
    "CRYPTO_GCM",
    "CRYPTO_GHASH",
    "CRYPTO_CTR",
    "CRYPTO_SEQIV",
    "CRYPTO_ECHAINIV",
    "VXLAN",
    "VETH",
    "NF_CONNTRACK",
    "NF_NAT",
    "NF_TABLES",
    "NF_TABLES_NETDEV",
    "NFT_NAT",
    "NFT_CT",
    "NFT_XFRM",
    "NET_SCH_INGRESS",
    "NET_CLS_BPF",
    "BPF_SYSCALL",
    "DEBUG_INFO_BTF",
];

/// `SYMBOL=value` for `CONFIG_SYMBOLS`, from the config file next to the image (Debian ships
/// boot/config-<version>).
fn config_summary(kernel: &Kernel) -> Option<String> {
    let config = kernel.image.parent()?.join(format!("config-{}", kernel.version));
    let text = fs::read_to_string(config).ok()?;
    let values: HashMap<&str, &str> = text.lines().filter_map(|l| l.strip_prefix("CONFIG_")?.split_once('=')).collect();
    Some(
        CONFIG_SYMBOLS
            .iter()
            .map(|s| format!("{s}={}", values.get(s).copied().unwrap_or("n")))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn resolve_kernel(args: &VmArgs, cache: &Path) -> Result<Kernel> {
    let Some(path) = &args.kernel else {
        return debian_kernel(cache);
    };
    // Absolute paths: the initramfs cache key contains them.
    let path = &fs::canonicalize(path).with_context(|| format!("--kernel {} does not exist", path.display()))?;
    let modules_arg = match &args.modules {
        Some(dir) => {
            Some(fs::canonicalize(dir).with_context(|| format!("--modules {} does not exist", dir.display()))?)
        }
        None => None,
    };
    if path.is_dir() {
        return kernel_from_root(path);
    }
    ensure!(path.is_file(), "--kernel {} does not exist", path.display());
    if path.extension().is_some_and(|e| e == "deb") {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let dir = cache.join("deb").join(stem);
        unpack_deb(path, &dir)?;
        return kernel_from_root(&dir.join("root"));
    }
    let version = bzimage_version(&fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
        .with_context(|| format!("{} is not a bzImage", path.display()))?;
    let modules = match &modules_arg {
        None => {
            eprintln!("vm: no --modules for {}: everything must be built in", path.display());
            None
        }
        Some(dir) if dir.join("modules.order").exists() || dir.join("kernel").is_dir() => Some(dir.clone()),
        Some(dir) => Some(dir.join("lib/modules").join(&version)),
    };
    if let Some(dir) = &modules {
        ensure_depmod(dir, &version)?;
    }
    Ok(Kernel { image: path.clone(), version, modules })
}

/// The version string of a bzImage (boot protocol: header field `kernel_version` at 0x20e).
fn bzimage_version(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = usize::from(u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?])) + 0x200;
    let text = image.get(offset..)?;
    let end = text.iter().position(|&b| b == 0)?;
    let version = std::str::from_utf8(&text[..end]).ok()?.split_whitespace().next()?;
    Some(version.to_owned())
}

/// An unpacked kernel package: boot/vmlinuz-<version> and lib/modules/<version>.
fn kernel_from_root(root: &Path) -> Result<Kernel> {
    let boot = root.join("boot");
    let mut images: Vec<PathBuf> = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/ directory", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    images.sort();
    let image = images.pop().with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let version = image.file_name().unwrap_or_default().to_string_lossy()["vmlinuz-".len()..].to_owned();
    let modules = [root.join("lib/modules").join(&version), root.join("usr/lib/modules").join(&version)]
        .into_iter()
        .find(|p| p.is_dir());
    if let Some(dir) = &modules {
        ensure_depmod(dir, &version)?;
    }
    Ok(Kernel { image, version, modules })
}

/// Generates modules.dep & co. (kernel packages do not ship them; their postinst runs depmod).
fn ensure_depmod(modules: &Path, version: &str) -> Result<()> {
    if modules.join("modules.dep").exists() {
        return Ok(());
    }
    // depmod -b BASE looks in BASE/lib/modules/<version>.
    let base = modules.ancestors().nth(3).context("modules directory too shallow")?;
    run_cmd(Command::new("depmod").arg("-b").arg(base).arg(version))
}

fn debian_kernel(cache: &Path) -> Result<Kernel> {
    debian_kernel_flavour(cache, "amd64")
}

/// The newest `linux-image-6.1.0-N-<flavour>` (amd64, cloud-amd64), fetched and unpacked once.
fn debian_kernel_flavour(cache: &Path, flavour: &str) -> Result<Kernel> {
    let dir = cache.join("debian");
    let package = match newest_debian_kernel(flavour) {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!("vm: apt-cache knows no linux-image-6.1.0-N-{flavour}; running apt-get update");
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            newest_debian_kernel(flavour)?.with_context(|| format!("apt-cache finds no linux-image-6.1.0-N-{flavour} package"))?
        }
        Err(e) => {
            // Offline: fall back to the newest kernel already unpacked.
            let cached = newest_cached(&dir, flavour).with_context(|| format!("{e:#}; and no kernel in {}", dir.display()))?;
            eprintln!("vm: apt-cache failed ({e:#}); using cached {cached}");
            cached
        }
    };
    let pkg_dir = dir.join(&package);
    if !pkg_dir.join(".unpacked").exists() {
        fs::create_dir_all(&pkg_dir)?;
        eprintln!("vm: downloading {package}");
        run_cmd(Command::new("apt-get").args(["download", "-qq", &package]).current_dir(&pkg_dir))?;
        let deb = fs::read_dir(&pkg_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", pkg_dir.display()))?;
        unpack_deb(&deb, &pkg_dir)?;
        fs::remove_file(&deb)?;
    }
    kernel_from_root(&pkg_dir.join("root"))
}

/// Unpacks a .deb into DIR/root once (DIR/.unpacked marks completion).
fn unpack_deb(deb: &Path, dir: &Path) -> Result<()> {
    let marker = dir.join(".unpacked");
    if marker.exists() {
        return Ok(());
    }
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    eprintln!("vm: unpacking {}", deb.display());
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    // Checks that it is a kernel package and runs depmod before marking it done.
    kernel_from_root(&root).with_context(|| format!("{} holds no kernel", deb.display()))?;
    fs::write(marker, b"")?;
    Ok(())
}

/// The highest ABI number among `linux-image-6.1.0-N-amd64` packages apt knows.
fn newest_debian_kernel(flavour: &str) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", &format!(r"^linux-image-6\.1\.0-[0-9]+-{flavour}$")])
        .output()
        .context("cannot run apt-cache")?;
    ensure!(out.status.success(), "apt-cache search failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(pick_newest_kernel(&String::from_utf8_lossy(&out.stdout), flavour))
}

fn kernel_abi(package: &str, flavour: &str) -> Option<u32> {
    package.strip_prefix("linux-image-6.1.0-")?.strip_suffix(&format!("-{flavour}"))?.parse().ok()
}

fn pick_newest_kernel(apt_cache_output: &str, flavour: &str) -> Option<String> {
    apt_cache_output
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| kernel_abi(name, flavour).map(|abi| (abi, name.to_owned())))
        .max()
        .map(|(_, name)| name)
}

fn newest_cached(dir: &Path, flavour: &str) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().join(".unpacked").exists())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            kernel_abi(&name, flavour).map(|abi| (abi, name))
        })
        .max()
        .map(|(_, name)| name)
}

// ---------------------------------------------------------------------------------------------
// Modules

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Path inside the initramfs: compressed modules are stored decompressed (busybox insmod
/// cannot be relied on to decompress).
fn uncompressed_path(path: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(p) = path.strip_suffix(ext) {
            return p.to_owned();
        }
    }
    path.to_owned()
}

struct ModuleDb {
    /// name -> (path relative to lib/modules/<version>, dependency names)
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
    /// name -> soft dependencies (module names or aliases)
    softdeps: HashMap<String, Vec<String>>,
    /// exact alias -> module names
    aliases: HashMap<String, Vec<String>>,
    alias_lines: Vec<(String, String)>,
}

impl ModuleDb {
    fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
        let dep_text = fs::read_to_string(dir.join("modules.dep"))
            .with_context(|| format!("no modules.dep in {}", dir.display()))?;
        Ok(Self::parse(&dep_text, &read("modules.builtin"), &read("modules.softdep"), &read("modules.alias")))
    }

    fn parse(dep: &str, builtin: &str, softdep: &str, alias: &str) -> Self {
        let modules = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(path, deps)| {
                (module_name(path), (path.to_owned(), deps.split_whitespace().map(module_name).collect()))
            })
            .collect();
        let builtin = builtin.lines().filter(|l| !l.is_empty()).map(module_name).collect();
        let mut softdeps: HashMap<String, Vec<String>> = HashMap::new();
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(name) = words.next() else { continue };
            let deps = words.filter(|w| !w.ends_with(':')).map(str::to_owned);
            softdeps.entry(module_name(name)).or_default().extend(deps);
        }
        let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
        let mut alias_lines = Vec::new();
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (words.next(), words.next(), words.next()) {
                aliases.entry(a.to_owned()).or_default().push(module_name(m));
                alias_lines.push((a.to_owned(), module_name(m)));
            }
        }
        Self { modules, builtin, softdeps, aliases, alias_lines }
    }

    /// The modules to load for `wanted`, dependencies first; plus the wanted names that are
    /// built in and those that exist neither way.
    fn closure(&self, wanted: &[&str]) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let (mut builtin, mut missing) = (Vec::new(), Vec::new());
        for name in wanted {
            let name = module_name(name);
            if self.modules.contains_key(&name) {
                self.visit(&name, &mut seen, &mut order);
            } else if self.builtin.contains(&name) {
                builtin.push(name);
            } else {
                missing.push(name);
            }
        }
        (order, builtin, missing)
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        for soft in self.softdeps.get(name).into_iter().flatten() {
            let soft_name = module_name(soft);
            if self.modules.contains_key(&soft_name) {
                self.visit(&soft_name, seen, order);
            } else {
                // An alias may name several implementations: the generic one works on any CPU.
                let targets: Vec<&String> = self
                    .aliases
                    .get(soft.as_str())
                    .into_iter()
                    .flatten()
                    .filter(|t| self.modules.contains_key(*t))
                    .collect();
                let generic: Vec<&String> = targets.iter().copied().filter(|t| t.ends_with("_generic")).collect();
                for target in if generic.is_empty() { targets } else { generic } {
                    self.visit(target, seen, order);
                }
            }
        }
        if let Some((_, deps)) = self.modules.get(name) {
            for dep in deps {
                self.visit(dep, seen, order);
            }
        }
        order.push(name.to_owned());
    }
}

// ---------------------------------------------------------------------------------------------
// Initramfs

/// Where an initramfs entry's content comes from.
enum Source {
    Dir,
    /// A host file, copied as is (symlinks followed).
    Host(PathBuf),
    /// A kernel module, decompressed if needed.
    Module(PathBuf),
    /// A host executable with its debug sections stripped (natfix's debug build is ~65 MB).
    Stripped(PathBuf),
    Bytes(Vec<u8>),
    Symlink(String),
    CharDev(u32, u32),
}

struct Entry {
    source: Source,
    mode: u32,
}

/// The initramfs content, by path without the leading `/` (`BTreeMap` order puts every
/// directory before its children, as the kernel's unpacker needs).
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    fn add(&mut self, path: &str, source: Source, mode: u32) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries.entry(p.to_string_lossy().into_owned()).or_insert(Entry { source: Source::Dir, mode: 0o755 });
            parent = p.parent();
        }
        self.entries.insert(path, Entry { source, mode });
    }

    /// A key that changes when any input changes: paths, sizes and mtimes of host files.
    fn fingerprint(&self) -> String {
        let mut h = DefaultHasher::new();
        INITRAMFS_FORMAT.hash(&mut h);
        for (path, entry) in &self.entries {
            path.hash(&mut h);
            entry.mode.hash(&mut h);
            match &entry.source {
                Source::Dir => 0u8.hash(&mut h),
                Source::Host(p) | Source::Module(p) | Source::Stripped(p) => {
                    p.hash(&mut h);
                    if let Ok(meta) = fs::metadata(p) {
                        meta.len().hash(&mut h);
                        meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).hash(&mut h);
                    }
                }
                Source::Bytes(b) => b.hash(&mut h),
                Source::Symlink(t) => t.hash(&mut h),
                Source::CharDev(a, b) => (a, b).hash(&mut h),
            }
        }
        format!("{:016x}", h.finish())
    }

    /// Writes the tree as a newc cpio archive.
    fn write_cpio(&self, out: &mut impl Write, scratch: &Path) -> Result<()> {
        let mut cpio = Cpio::new(out);
        for (path, entry) in &self.entries {
            match &entry.source {
                Source::Dir => cpio.entry(path, 0o040_000 | entry.mode, &[], (0, 0))?,
                Source::Symlink(target) => cpio.entry(path, 0o120_000 | 0o777, target.as_bytes(), (0, 0))?,
                Source::CharDev(major, minor) => cpio.entry(path, 0o020_000 | entry.mode, &[], (*major, *minor))?,
                Source::Bytes(data) => cpio.entry(path, 0o100_000 | entry.mode, data, (0, 0))?,
                Source::Host(p) => {
                    let data = fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                    cpio.entry(path, 0o100_000 | entry.mode, &data, (0, 0))?;
                }
                Source::Module(p) => cpio.entry(path, 0o100_000 | entry.mode, &read_module(p)?, (0, 0))?,
                Source::Stripped(p) => {
                    let data = stripped(p, scratch)?;
                    cpio.entry(path, 0o100_000 | entry.mode, &data, (0, 0))?;
                }
            }
        }
        cpio.finish()
    }
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    };
    let out = Command::new(tool).arg("-dc").arg(path).output().with_context(|| format!("cannot run {tool}"))?;
    ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
    Ok(out.stdout)
}

fn stripped(path: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let tmp = scratch.join("stripped.tmp");
    let ok =
        Command::new("strip").arg("--strip-debug").arg("-o").arg(&tmp).arg(path).status().is_ok_and(|s| s.success());
    let data = fs::read(if ok { &tmp } else { path }).with_context(|| format!("cannot read {}", path.display()))?;
    let _ = fs::remove_file(&tmp);
    Ok(data)
}

/// newc ("070701") cpio writer; mtimes are 0 so that equal inputs give equal archives.
struct Cpio<'a, W: Write> {
    out: &'a mut W,
    ino: u32,
    written: u64,
}

impl<'a, W: Write> Cpio<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Self { out, ino: 1, written: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = usize::try_from((4 - self.written % 4) % 4).unwrap_or(0);
        self.put(&[0u8; 3][..n])
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<()> {
        let size = u32::try_from(data.len()).context("file too large for cpio")?;
        let name_size = u32::try_from(name.len() + 1).context("name too long")?;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn finish(mut self) -> Result<()> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        self.out.flush()?;
        Ok(())
    }
}

struct Initramfs {
    path: PathBuf,
    rebuilt: bool,
    builtin: Vec<String>,
}

fn find_program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Shared libraries of a dynamic executable, as the paths `ldd` resolves them to (the dynamic
/// loader included). Empty for static executables.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().context("cannot run ldd")?;
    if !out.status.success() {
        return Ok(Vec::new()); // "not a dynamic executable"
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn build_initramfs(workspace: &Path, cache: &Path, kernel: &Kernel, natfix: Option<&Path>) -> Result<Initramfs> {
    let mut tree = Tree::default();
    for dir in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "sbin", "usr/bin", "usr/sbin", "var"] {
        tree.add(dir, Source::Dir, 0o755);
    }
    // The kernel opens /dev/console before /init runs (devtmpfs is mounted later).
    tree.add("dev/console", Source::CharDev(5, 1), 0o600);
    tree.add("var/run", Source::Symlink("/run".into()), 0o777);

    // busybox, with a link per applet; /sbin/modprobe is what the kernel calls.
    let busybox = find_program(&["/bin/busybox", "/usr/bin/busybox"]).context("busybox-static is not installed")?;
    tree.add("bin/busybox", Source::Host(busybox.clone()), 0o755);
    let applets = Command::new(&busybox).arg("--list").output().context("cannot run busybox --list")?;
    let replaced: Vec<&str> = HOST_PROGRAMS.iter().map(|(name, _)| *name).collect();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let skip = ["", "busybox", "init", "linuxrc"].contains(&applet) || replaced.contains(&applet);
        if !skip {
            tree.add(&format!("bin/{applet}"), Source::Symlink("busybox".into()), 0o777);
        }
    }
    for applet in ["modprobe", "insmod", "poweroff"] {
        tree.add(&format!("sbin/{applet}"), Source::Symlink("/bin/busybox".into()), 0o777);
    }

    let mut executables = Vec::new();
    for (name, candidates) in HOST_PROGRAMS {
        let path = find_program(candidates).with_context(|| format!("{name} is not installed (cargo xtask deps)"))?;
        tree.add(&format!("usr/sbin/{name}"), Source::Host(path.clone()), 0o755);
        executables.push(path);
    }
    if let Some(natfix) = natfix {
        tree.add("usr/bin/natfix", Source::Stripped(natfix.to_path_buf()), 0o755);
        executables.push(natfix.to_path_buf());
    }
    for exe in &executables {
        for lib in shared_libraries(exe)? {
            // Same path as on the host: the dynamic loader's default search finds it there.
            let path = lib.to_string_lossy().into_owned();
            tree.add(&path, Source::Host(lib), 0o755);
        }
    }
    if Path::new("/etc/protocols").is_file() {
        tree.add("etc/protocols", Source::Host("/etc/protocols".into()), 0o644);
    }

    // Scenario scripts: init.sh is /init, the rest go to /scenarios.
    let scripts = workspace.join("tests/vm");
    let mut found_init = false;
    for entry in fs::read_dir(&scripts).with_context(|| format!("cannot read {}", scripts.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        if path.extension().is_none_or(|e| e != "sh") {
            continue;
        }
        if name == "init.sh" {
            found_init = true;
            tree.add("init", Source::Host(path), 0o755);
        } else {
            tree.add(&format!("scenarios/{name}"), Source::Host(path), 0o755);
        }
    }
    ensure!(found_init, "{} has no init.sh", scripts.display());

    let builtin = add_modules(&mut tree, kernel)?;

    let fingerprint = tree.fingerprint();
    let dir = cache.join("initramfs");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}-{fingerprint}.cpio.gz", kernel.version));
    if path.exists() {
        return Ok(Initramfs { path, rebuilt: false, builtin });
    }
    let started = Instant::now();
    // Older images of this kernel are stale now.
    for old in fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())) {
        if old.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{}-", kernel.version))) {
            let _ = fs::remove_file(old);
        }
    }
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let mut gzip = Command::new("gzip")
        .args(["-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&tmp)?)
        .spawn()
        .context("cannot run gzip")?;
    {
        let mut stdin = std::io::BufWriter::new(gzip.stdin.take().context("gzip stdin")?);
        tree.write_cpio(&mut stdin, &dir)?;
    }
    ensure!(gzip.wait()?.success(), "gzip failed");
    fs::rename(&tmp, &path)?;
    eprintln!(
        "vm: built {} ({:.1} MB) in {:.1} s",
        path.display(),
        f64::from(u32::try_from(fs::metadata(&path)?.len() / 1000).unwrap_or(u32::MAX)) / 1e3,
        started.elapsed().as_secs_f64()
    );
    Ok(Initramfs { path, rebuilt: true, builtin })
}

/// Adds the modules the scenarios need, their dependency files and /etc/natfix/modules (the
/// load order for /init). Returns the wanted modules that are built in.
fn add_modules(tree: &mut Tree, kernel: &Kernel) -> Result<Vec<String>> {
    let Some(dir) = &kernel.modules else {
        tree.add("etc/natfix/modules", Source::Bytes(Vec::new()), 0o644);
        return Ok(Vec::new());
    };
    let db = ModuleDb::load(dir)?;
    let (order, builtin, missing) = db.closure(MODULES);
    if !missing.is_empty() {
        eprintln!("vm: warning: modules neither built in nor present: {}", missing.join(" "));
    }
    let base = format!("lib/modules/{}", kernel.version);
    let included: HashSet<&String> = order.iter().collect();
    let (mut load_list, mut dep_file) = (String::new(), String::new());
    for name in &order {
        let (rel, deps) = &db.modules[name];
        let stored = uncompressed_path(rel);
        tree.add(&format!("{base}/{stored}"), Source::Module(dir.join(rel)), 0o644);
        load_list.push_str(&stored);
        load_list.push('\n');
        let dep_paths: Vec<String> = deps.iter().map(|d| uncompressed_path(&db.modules[d].0)).collect();
        let _ = writeln!(dep_file, "{stored}: {}", dep_paths.join(" "));
    }
    // Aliases and soft dependencies of the included modules, for the kernel's modprobe calls.
    let mut alias_file = String::new();
    for (alias, module) in &db.alias_lines {
        if included.contains(module) && !alias.contains(['*', '?', '[']) {
            let _ = writeln!(alias_file, "alias {alias} {module}");
        }
    }
    let mut softdep_file = String::new();
    for name in &order {
        if let Some(deps) = db.softdeps.get(name) {
            let _ = writeln!(softdep_file, "softdep {name} pre: {}", deps.join(" "));
        }
    }
    tree.add(&format!("{base}/modules.dep"), Source::Bytes(dep_file.into_bytes()), 0o644);
    tree.add(&format!("{base}/modules.alias"), Source::Bytes(alias_file.into_bytes()), 0o644);
    tree.add(&format!("{base}/modules.softdep"), Source::Bytes(softdep_file.into_bytes()), 0o644);
    if dir.join("modules.builtin").is_file() {
        tree.add(&format!("{base}/modules.builtin"), Source::Host(dir.join("modules.builtin")), 0o644);
    }
    tree.add("etc/natfix/modules", Source::Bytes(load_list.into_bytes()), 0o644);
    eprintln!(
        "vm: {} module files; built in: {}",
        order.len(),
        if builtin.is_empty() { "none of the wanted".to_owned() } else { builtin.join(" ") }
    );
    Ok(builtin)
}

/// Run images left by interrupted runs (older than an hour: a concurrent run may own newer ones).
fn remove_stale_run_images(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else { return };
    for entry in entries.filter_map(Result::ok) {
        let stale = entry.file_name().to_string_lossy().starts_with("initrd-run-")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_hours(1)));
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The cached initramfs plus a small uncompressed cpio with this run's settings (the kernel
/// unpacks concatenated archives in order; an uncompressed one must start 4-byte aligned).
fn write_run_initrd(base: &Path, natfix_args: &[String], out: &Path) -> Result<()> {
    let mut image = fs::read(base).with_context(|| format!("cannot read {}", base.display()))?;
    image.resize(image.len().next_multiple_of(4), 0);
    let mut args = String::new();
    for arg in natfix_args {
        ensure!(!arg.contains('\n'), "--natfix-arg values cannot contain newlines");
        args.push_str(arg);
        args.push('\n');
    }
    let mut tree = Tree::default();
    tree.add("etc/natfix/natfix-args", Source::Bytes(args.into_bytes()), 0o644);
    tree.write_cpio(&mut image, out.parent().unwrap_or(Path::new(".")))?;
    fs::write(out, image).with_context(|| format!("cannot write {}", out.display()))
}

// ---------------------------------------------------------------------------------------------
// Boot

struct Outcome {
    result_json: String,
    elapsed: Duration,
}

fn boot(
    image: &Path,
    initrd: &Path,
    cmdline: &str,
    timeout: Duration,
    verbose: bool,
    log_path: &Path,
) -> Result<Outcome> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run qemu-system-x86_64 (cargo xtask deps)")?;

    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("qemu stdout")?;
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
            if tx.send(text).is_err() {
                break;
            }
            line.clear();
        }
    });
    let mut stderr = child.stderr.take().context("qemu stderr")?;
    let stderr_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut log = fs::File::create(log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let deadline = started + timeout;
    let (mut result, mut panic, mut timed_out) = (None, None, false);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if verbose {
                    eprintln!("| {line}");
                }
                if let Some(json) = extract_result(&line) {
                    result = Some(json.to_owned());
                }
                if panic.is_none() && line.contains("Kernel panic") {
                    panic = Some(line);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let elapsed = started.elapsed();
    let tail = || tail_lines(log_path, 30);
    if timed_out {
        bail!("the VM did not finish within {} s; last console lines:\n{}", timeout.as_secs(), tail());
    }
    if let Some(line) = panic {
        bail!("kernel panic: {line}\n{}", tail());
    }
    match result {
        Some(result_json) => Ok(Outcome { result_json, elapsed }),
        None => bail!(
            "the VM exited ({status}) without a {} line; qemu: {}\nlast console lines:\n{}",
            RESULT_MARKER.trim(),
            qemu_stderr.trim(),
            tail()
        ),
    }
}

fn extract_result(line: &str) -> Option<&str> {
    line.find(RESULT_MARKER).map(|i| line[i + RESULT_MARKER.len()..].trim())
}

fn tail_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot run {shown}"))?;
    ensure!(status.success(), "{shown} failed ({status})");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Expected outcomes

enum Verdict {
    Pass,
    Fail(Vec<String>),
    /// No expectation: mode `natfix` runs whatever --natfix-arg says.
    Informational,
}

fn num(v: &Value, path: &[&str]) -> i64 {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_i64).unwrap_or(-1)
}

const DIRECTIONS: [&str; 2] = ["a_to_b", "b_to_a"];
const SIZES: [&str; 2] = ["small", "large"];

fn summarize(item: &Value) -> String {
    let mut s = format!("{}/{}:", item["scenario"].as_str().unwrap_or("?"), item["mode"].as_str().unwrap_or("?"));
    if item["scenario"] == "guard" {
        let _ = write!(
            s,
            " external port {}, reply delivered {}, natfix exit {}, dropped {}",
            item["external_port"], item["reply_delivered"], item["natfix"]["exit"], item["natfix"]["dropped_unsolicited"]
        );
        return s;
    }
    if item["mode"] == "throughput" {
        let _ = write!(s, " noudpcsum {} Mbit/s, natfix {} Mbit/s", item["noudpcsum_mbps"], item["natfix_mbps"]);
        return s;
    }
    if item["mode"] == "lab" {
        let output = item["output"].as_str().unwrap_or_default();
        let tail: String = output.chars().rev().take(90).collect::<Vec<_>>().into_iter().rev().collect();
        let _ = write!(s, " natfix lab exit {}: ...{tail}", item["exit"]);
        return s;
    }
    for dir in DIRECTIONS {
        let _ = write!(s, " {dir}");
        for size in SIZES {
            let _ = write!(s, " {}/{}", num(item, &[dir, size, "received"]), num(item, &[dir, size, "sent"]));
        }
    }
    for node in ["a", "b"] {
        let before = num(item, &["udp_csum_errors", node, "before"]);
        let after = num(item, &["udp_csum_errors", node, "after"]);
        let _ = write!(s, " csum_err_{node}+{}", after - before);
    }
    let _ = write!(s, " esp_fragmented={}", item["esp_fragmented"]);
    s
}

fn check(item: &Value) -> Verdict {
    let mode = item["mode"].as_str().unwrap_or_default();
    let mut why = Vec::new();
    if let Some(errors) = item["errors"].as_array().filter(|e| !e.is_empty()) {
        if mode == "natfix" {
            return Verdict::Informational;
        }
        let lines: Vec<&str> = errors.iter().filter_map(Value::as_str).collect();
        why.push(format!("setup errors:\n        {}", lines.join("\n        ")));
    }
    let all_ok = |why: &mut Vec<String>| {
        for dir in DIRECTIONS {
            for size in SIZES {
                let (sent, received) = (num(item, &[dir, size, "sent"]), num(item, &[dir, size, "received"]));
                if sent <= 0 || received != sent {
                    why.push(format!("{dir} {size}: {received}/{sent} replies, expected all"));
                }
            }
        }
    };
    let csum_rise =
        |node: &str| num(item, &["udp_csum_errors", node, "after"]) - num(item, &["udp_csum_errors", node, "before"]);
    match mode {
        "cleartext" | "noudpcsum" => all_ok(&mut why),
        "nft" => {
            all_ok(&mut why);
            if item["esp_fragmented"] != Value::Bool(true) {
                why.push("the large pings did not fragment the ESP packets".into());
            }
        }
        "baseline" => {
            for dir in DIRECTIONS {
                for size in SIZES {
                    if num(item, &[dir, size, "received"]) != 0 || num(item, &[dir, size, "requests_delivered"]) != 0 {
                        why.push(format!("{dir} {size}: something got through without a fix"));
                    }
                }
            }
            for node in ["a", "b"] {
                if csum_rise(node) <= 0 {
                    why.push(format!("UdpInCsumErrors did not rise on {node}"));
                }
                let decrypted: i64 = item["xfrm"][node]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|sa| sa["dir"] == "in")
                    .filter_map(|sa| sa["packets"].as_i64())
                    .sum();
                if decrypted <= 0 {
                    why.push(format!("{node}'s inbound SA decrypted nothing"));
                }
            }
        }
        "nft-one-side" => {
            // B has the rule: what B receives (A's requests) gets through; what A receives does not.
            for size in SIZES {
                let sent = num(item, &["a_to_b", size, "sent"]);
                if sent <= 0 || num(item, &["a_to_b", size, "requests_delivered"]) != sent {
                    why.push(format!("a_to_b {size}: A's requests did not all reach B"));
                }
                if num(item, &["a_to_b", size, "received"]) != 0 {
                    why.push(format!("a_to_b {size}: B's replies reached A without a rule on A"));
                }
                if num(item, &["b_to_a", size, "requests_delivered"]) != 0 {
                    why.push(format!("b_to_a {size}: B's requests reached A without a rule on A"));
                }
            }
            if csum_rise("a") <= 0 || csum_rise("b") != 0 {
                why.push("expected UdpInCsumErrors on A only".into());
            }
        }
        "natfix" => return Verdict::Informational,
        m if m.starts_with("natfix-") => check_natfix(item, m, &mut why, all_ok),
        m if m.starts_with("guard-") => check_guard(item, m, &mut why),
        "lab" => {
            let output = item["output"].as_str().unwrap_or_default();
            if num(item, &["exit"]) != 0 || !output.contains("fixed with `natfix attach --overlay-fix` (ok)") {
                why.push(format!("natfix lab --scenario overlay did not show the fix: exit {}: {output}", item["exit"]));
            }
        }
        "throughput" => {
            for k in ["noudpcsum_mbps", "natfix_mbps"] {
                let v = item[k].as_array().map_or(0.0, |a| a.iter().filter_map(Value::as_f64).fold(0.0, f64::max));
                if v <= 0.0 {
                    why.push(format!("{k}: no throughput measured"));
                }
            }
        }
        other => why.push(format!("unknown mode {other}")),
    }
    if why.is_empty() { Verdict::Pass } else { Verdict::Fail(why) }
}

/// Expectations of the guard scenario (tests/vm/guard.sh).
fn check_guard(item: &Value, mode: &str, why: &mut Vec<String>) {
    let port = item["external_port"].as_i64();
    match mode {
        "guard-baseline" => {
            if port.is_none() || port == Some(25000) {
                why.push(format!("the failure did not reproduce: external port {port:?}"));
            }
        }
        "guard-xdp" | "guard-tc" => {
            if num(item, &["natfix", "exit"]) != 0 {
                why.push(format!("natfix attach failed: {}", item["natfix"]["output"]));
            }
            if port != Some(25000) {
                why.push(format!("the container's flow left on port {port:?}, not 25000"));
            }
            if item["reply_delivered"] != Value::Bool(true) {
                why.push("the remote's reply did not reach the container".into());
            }
            if num(item, &["natfix", "dropped_unsolicited"]) < 1 {
                why.push("the probe was not counted as dropped".into());
            }
        }
        "guard-conntrack-refused" => {
            let out = item["natfix"]["output"].as_str().unwrap_or_default();
            if num(item, &["natfix", "exit"]) != 5 || !out.contains("--flow-source own") {
                why.push(format!("expected exit 5 pointing to --flow-source own: {}", item["natfix"]));
            }
        }
        _ => why.push(format!("unknown mode {mode}")),
    }
}

/// Expectations of natfix's overlay modes (see tests/vm/esp-nat.sh).
fn check_natfix(item: &Value, mode: &str, why: &mut Vec<String>, all_ok: impl Fn(&mut Vec<String>)) {
    let nodes: &[&str] = if mode == "natfix-one-side" { &["b"] } else { &["a", "b"] };
    for node in nodes {
        if num(item, &["natfix", node, "exit"]) != 0 {
            why.push(format!("natfix attach on {node} failed: {}", item["natfix"][node]["output"]));
        }
        let d = &item["natfix_detach"][*node];
        if num(d, &["exit"]) != 0 || num(d, &["nft_left"]) != 0 || num(d, &["tc_left"]) != 0 {
            why.push(format!("natfix detach on {node} left something behind: {d}"));
        }
    }
    let counter = |node: &str, reason: &str| num(item, &["natfix_counters", node, reason]).max(0);
    let small_ok = |why: &mut Vec<String>| {
        for dir in DIRECTIONS {
            let (sent, received) = (num(item, &[dir, "small", "sent"]), num(item, &[dir, "small", "received"]));
            if sent <= 0 || received != sent {
                why.push(format!("{dir} small: {received}/{sent} replies, expected all"));
            }
        }
    };
    match mode {
        "natfix-auto" | "natfix-auto-recompute" | "natfix-nft" | "natfix-both" => {
            all_ok(why);
            if item["esp_fragmented"] != Value::Bool(true) {
                why.push("the large pings did not fragment the ESP packets".into());
            }
        }
        // Fragmented ESP is reassembled and decrypted off the GRO path: tc never sees it.
        "natfix-tc" | "natfix-tc-recompute" => small_ok(why),
        "natfix-one-side" => {
            for size in SIZES {
                let sent = num(item, &["a_to_b", size, "sent"]);
                if sent <= 0 || num(item, &["a_to_b", size, "requests_delivered"]) != sent {
                    why.push(format!("a_to_b {size}: A's requests did not all reach B"));
                }
                if num(item, &["a_to_b", size, "received"]) != 0 || num(item, &["b_to_a", size, "requests_delivered"]) != 0 {
                    why.push(format!("{size}: something reached A, which has no fix"));
                }
            }
        }
        "natfix-wrong-reqid" => {
            for dir in DIRECTIONS {
                for size in SIZES {
                    if num(item, &[dir, size, "received"]) != 0 {
                        why.push(format!("{dir} {size}: fixed although the SA's reqid is not natfix's"));
                    }
                }
            }
            for node in nodes {
                if counter(node, "other_sa") == 0 || counter(node, "zeroed") != 0 {
                    why.push(format!("{node}: expected other_sa and no zeroed packets"));
                }
            }
        }
        "natfix-cleartext" => {
            all_ok(why);
            for node in nodes {
                if counter(node, "zeroed") + counter(node, "recomputed") != 0 || counter(node, "cleartext_skipped") == 0 {
                    why.push(format!("{node}: cleartext VXLAN must be counted as skipped and never rewritten"));
                }
            }
        }
        _ => why.push(format!("unknown mode {mode}")),
    }
    // The nftables rule (every mode but tc-only) reports what it rewrote,
    // read by `natfix stats` from the rule's own counter: decrypted VXLAN of
    // the right SA reaches it on every path; cleartext and other SAs never.
    let nft_zeroed = |node: &str| item["natfix_counters"][node]["nft_zeroed"].as_u64();
    for node in nodes {
        match (mode, nft_zeroed(node)) {
            ("natfix-tc" | "natfix-tc-recompute", _) | ("natfix-wrong-reqid" | "natfix-cleartext", Some(0)) => {}
            ("natfix-wrong-reqid" | "natfix-cleartext", n) => why.push(format!("{node}: the nftables rule must rewrite nothing here, counted {n:?}")),
            (_, Some(1..)) => {}
            (_, n) => why.push(format!("{node}: the nftables rule's counter reads {n:?}, expected rewrites")),
        }
    }
    // IPv4 without recompute: auto attaches the nftables rule alone (no eBPF
    // program, so the only overlay counter is the rule's).
    if matches!(mode, "natfix-auto" | "natfix-nft" | "natfix-one-side") {
        for node in nodes {
            let keys: Vec<&String> = item["natfix_counters"][*node].as_object().map(|o| o.keys().collect()).unwrap_or_default();
            if keys != ["nft_zeroed"] {
                why.push(format!("{node}: expected the nftables rule alone, natfix reported overlay counters {keys:?}"));
            }
        }
    }
    // The tc program must have done the work on the GRO path where it runs.
    let tc_reason = match mode {
        "natfix-tc" | "natfix-both" => Some("zeroed"),
        "natfix-tc-recompute" | "natfix-auto-recompute" => Some("recomputed"),
        _ => None,
    };
    if let Some(reason) = tc_reason {
        for node in nodes {
            if counter(node, reason) == 0 {
                why.push(format!("{node}: the tc program counted no {reason} packets"));
            }
        }
    }
    // Pings 0.2 s apart fall within a learned delta's second: most are incremental.
    if matches!(mode, "natfix-tc-recompute" | "natfix-auto-recompute") {
        for node in nodes {
            if counter(node, "recomputed_incremental") == 0 {
                why.push(format!("{node}: no datagram was fixed with a learned checksum delta"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_highest_abi_not_the_last_line() {
        let out =
            "linux-image-6.1.0-9-amd64 - Linux 6.1\nlinux-image-6.1.0-56-amd64 - x\nlinux-image-6.1.0-47-amd64 - y\n";
        assert_eq!(pick_newest_kernel(out, "amd64").as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(pick_newest_kernel("linux-image-6.1.0-56-rt-amd64 - rt\n", "amd64"), None);
        assert_eq!(
            pick_newest_kernel("linux-image-6.1.0-55-cloud-amd64 - c\nlinux-image-6.1.0-56-amd64 - a\n", "cloud-amd64").as_deref(),
            Some("linux-image-6.1.0-55-cloud-amd64")
        );
    }

    #[test]
    fn module_closure_puts_dependencies_and_softdeps_first() {
        let dep = "kernel/a/nf_conntrack.ko.xz: kernel/lib/libcrc32c.ko.xz\nkernel/lib/libcrc32c.ko.xz:\n\
                   kernel/crypto/crc32c_generic.ko.xz:\nkernel/crypto/ghash-generic.ko.xz:\n";
        let db = ModuleDb::parse(
            dep,
            "kernel/crypto/aes_generic.ko\n",
            "softdep libcrc32c pre: crc32c\n",
            "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n",
        );
        let (order, builtin, missing) = db.closure(&["nf_conntrack", "ghash_generic", "aes_generic", "nope"]);
        assert_eq!(order, ["crc32c_generic", "libcrc32c", "nf_conntrack", "ghash_generic"]);
        assert_eq!(builtin, ["aes_generic"]);
        assert_eq!(missing, ["nope"]);
        assert_eq!(uncompressed_path("kernel/a/x.ko.xz"), "kernel/a/x.ko");
    }

    #[test]
    fn ldd_output_gives_library_and_loader_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(out),
            [PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_parents_come_first() {
        let mut tree = Tree::default();
        tree.add("/usr/bin/x", Source::Bytes(b"abcde".to_vec()), 0o755);
        assert_eq!(tree.entries.keys().collect::<Vec<_>>(), ["usr", "usr/bin", "usr/bin/x"]);
        let mut out = Vec::new();
        tree.write_cpio(&mut out, Path::new("/tmp")).unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("usr/bin/x\0"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn bzimage_version_is_read_from_the_setup_header() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        image[0x300..0x313].copy_from_slice(b"6.1.0-56-amd64 (x)\0");
        assert_eq!(bzimage_version(&image).as_deref(), Some("6.1.0-56-amd64"));
    }

    #[test]
    fn result_line_is_found_after_console_noise() {
        assert_eq!(extract_result("\r[  1.0] x NATFIX-RESULT {\"a\":1} "), Some("{\"a\":1}"));
        assert_eq!(extract_result("NATFIX-RESULT"), None);
    }
}
