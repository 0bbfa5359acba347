//! `cargo xtask lab` and `cargo xtask test`: set-up plus the real work.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{deps, docker, image};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the qemu VM scenarios (they take minutes under TCG).
    #[arg(long)]
    pub no_vm: bool,
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn require_root() -> Result<()> {
    let uid = Command::new("id").arg("-u").output().context("id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("natfix's lab and tests create network namespaces and load eBPF: run as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

/// bpffs at /sys/fs/bpf: fresh machines boot without it.
fn ensure_bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts")?.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    if !mounted {
        let ok = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?.success();
        if !ok {
            bail!("cannot mount bpffs at /sys/fs/bpf");
        }
    }
    Ok(())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let ok = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("cargo {}", args.join(" ")))?
        .success();
    if !ok {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

pub fn setup() -> Result<()> {
    require_root()?;
    deps::install()?;
    ensure_bpffs()?;
    cargo(&["build", "-p", "natfix"])
}

pub fn lab() -> Result<()> {
    setup()?;
    let natfix = workspace().join("target/debug/natfix");
    if !Command::new(&natfix).args(["lab", "--scenario", "guard"]).status()?.success() {
        bail!("natfix lab (guard) failed");
    }
    match Command::new(&natfix).args(["lab", "--scenario", "overlay"]).status()?.code() {
        Some(0) => Ok(()),
        // 5: this kernel has no ESP; show the overlay in the qemu VM instead.
        Some(5) => {
            println!("== seed 001 in a VM (Debian 6.1 kernel with ESP, qemu) ==");
            let ok = Command::new(std::env::current_exe()?)
                .args(["vm", "--scenario", "esp-nat", "--mode", "baseline,natfix-auto,natfix-tc-recompute"])
                .status()?
                .success();
            if !ok {
                bail!("the overlay scenario failed in the VM");
            }
            Ok(())
        }
        _ => bail!("natfix lab (overlay) failed"),
    }
}

/// The VM scenarios `cargo xtask test` runs, in one boot: the failure, the
/// known workarounds, natfix's overlay fix with every backend and mode, and
/// `natfix trace` showing the drop and the fix.
const VM_MODES: &str = "cleartext,baseline,noudpcsum,nft,nft-one-side,natfix-auto,natfix-auto-recompute,\
natfix-tc,natfix-tc-recompute,natfix-nft,natfix-both,natfix-one-side,natfix-cleartext,natfix-wrong-reqid,baseline-4777,\
natfix-port-4777,trace,lab";

/// Runs a command, echoing its stdout, and adds up libtest's and the VM's
/// "N passed; M failed" summaries.
fn run_counting(cmd: &mut Command, totals: &mut (u64, u64)) -> Result<bool> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        println!("{line}");
        let words: Vec<&str> = line.split(|c: char| c.is_whitespace() || c == ';' || c == ',').filter(|w| !w.is_empty()).collect();
        for pair in words.windows(2) {
            match (pair[0].parse::<u64>(), pair[1]) {
                (Ok(n), "passed") => totals.0 += n,
                (Ok(n), "failed") => totals.1 += n,
                _ => {}
            }
        }
    }
    Ok(child.wait()?.success())
}

/// The kernels the VM scenarios boot in CI: the newest of each Debian line,
/// generic flavour (cloud-amd64 and the oldest 6.1 only in `cargo xtask vm
/// --matrix`). Each boot of the overlay scenario takes about 3 minutes under
/// TCG, the guard's under one.
const VM_KERNELS: &str = "6.1,6.12";

const GUARD_VM_MODES: &str = "guard-baseline,guard-xdp,guard-tc,guard-conntrack-refused";

/// Clippy over every target, warnings as errors (pedantic comes from the
/// workspace `[lints]`), so the tree stays clean. After `setup`, since the
/// eBPF build script needs clang; before the tests, so a lint failure costs
/// no test run.
fn lint() -> Result<()> {
    let args = ["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"];
    println!("== cargo {} ==", args.join(" "));
    let ok = Command::new(env!("CARGO")).args(args).current_dir(workspace()).status().context("cargo clippy")?.success();
    if !ok {
        bail!("lint failed: fix the clippy warnings above (or #[expect] one, with a reason), then rerun `cargo xtask test`");
    }
    Ok(())
}

pub fn test(args: &TestArgs) -> Result<()> {
    setup()?;
    lint()?;
    // Stopped when the tests are done, if started here.
    let (_engine, docker_unavailable) = docker_for_tests();
    let mut totals = (0, 0);
    // Tests that could not check what they are for (a kernel or engine
    // without the feature) say so here, and count as skipped, not passed.
    let skip_log = std::env::temp_dir().join(format!("natfix-skipped-{}", std::process::id()));
    let before = HostState::read()?;
    let _ = std::fs::remove_file(&skip_log);
    let unit_ok = run_counting(
        Command::new(env!("CARGO"))
            // Root-only tests are #[ignore]d so that a plain `cargo test` lists
            // them as such; here, as root, they run.
            .args(["test", "--workspace", "--no-fail-fast", "--", "--include-ignored"])
            // The differential tests become the fuzz run: a million frames per program.
            .env("NATFIX_DIFF_CASES", "1000000")
            .env("NATFIX_SKIP_LOG", &skip_log)
            .envs(docker_unavailable.map(|why| ("NATFIX_DOCKER_UNAVAILABLE", why)))
            .current_dir(workspace()),
        &mut totals,
    )?;
    // The host kernel has no ESP: the overlay's end-to-end tests run in qemu,
    // and the guard runs there too, on Debian's two kernel lines: 6.1 (clsact,
    // conntrack as a module) and 6.12 (tcx, conntrack as a module).
    let vm_ok = args.no_vm
        || (run_counting(
            Command::new(std::env::current_exe()?)
                .args(["vm", "--debian", VM_KERNELS, "--scenario", "esp-nat", "--mode", VM_MODES, "--timeout", "900"]),
            &mut totals,
        )? && run_counting(
            Command::new(std::env::current_exe()?).args(["vm", "--debian", VM_KERNELS, "--scenario", "guard", "--mode", GUARD_VM_MODES]),
            &mut totals,
        )?);
    let leftovers = leftovers(&before)?;
    for l in &leftovers {
        println!("left on the host after the tests: {l}");
    }
    let skipped: Vec<String> = std::fs::read_to_string(&skip_log).unwrap_or_default().lines().map(str::to_owned).collect();
    let _ = std::fs::remove_file(&skip_log);
    for line in &skipped {
        println!("skipped: {line}");
    }
    let skipped_count = u64::try_from(skipped.len()).unwrap_or(0);
    println!("all: {} passed, {} failed, {skipped_count} skipped", totals.0.saturating_sub(skipped_count), totals.1);
    if !unit_ok || !vm_ok {
        bail!("tests failed");
    }
    if !leftovers.is_empty() {
        bail!("the tests left natfix state on the host (see above)");
    }
    Ok(())
}

/// An engine and the image for the Docker tests (`tests/e2e/docker_image.rs`);
/// else why not, which those tests report as their reason to skip.
fn docker_for_tests() -> (Option<docker::Engine>, Option<String>) {
    let engine = match docker::Engine::ensure() {
        Ok(engine) => engine,
        Err(e) => return (None, Some(format!("{e:#}"))),
    };
    match image::build() {
        Ok(()) => (Some(engine), None),
        Err(e) => (Some(engine), Some(format!("cargo xtask image failed: {e:#}"))),
    }
}

/// What natfix (or its tests) could leave on the host, read before the tests
/// so that only what they added counts.
///
/// A host that is not fresh (a developer's, or a CI runner shared with an
/// interrupted run) may already hold some: those are named, not counted.
struct HostState {
    clsact: Vec<String>,
    natfix: Vec<String>,
}

impl HostState {
    fn read() -> Result<Self> {
        let clsact = clsact_qdiscs()?;
        let natfix = natfix_state()?;
        for s in &natfix {
            println!("already on the host before the tests (not counted): {s}");
        }
        Ok(Self { clsact, natfix })
    }
}

fn clsact_qdiscs() -> Result<Vec<String>> {
    let out = Command::new("tc").args(["qdisc", "show"]).output().context("tc qdisc show")?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("clsact")).map(str::to_owned).collect())
}

/// natfix state the tests added and left: what `natfix_state` finds that was
/// not there before, and new clsact qdiscs.
fn leftovers(before: &HostState) -> Result<Vec<String>> {
    let mut left: Vec<String> = natfix_state()?.into_iter().filter(|s| !before.natfix.contains(s)).collect();
    left.extend(clsact_qdiscs()?.into_iter().filter(|q| !before.clsact.contains(q)).map(|q| format!("qdisc {q}")));
    Ok(left)
}

/// Pins, loaded programs, nftables tables and scratch namespaces of natfix
/// or its tests, now.
fn natfix_state() -> Result<Vec<String>> {
    let mut left = Vec::new();
    let root = std::path::Path::new("/sys/fs/bpf/natfix");
    for ns in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            left.push(format!("pin {}", entry.path().display()));
        }
    }
    let progs = Command::new("bpftool").args(["-j", "prog", "show"]).output().context("bpftool prog show")?;
    let progs: serde_json::Value = serde_json::from_slice(&progs.stdout).unwrap_or_default();
    for p in progs.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        if name.starts_with("natfix_") || name.starts_with("rig_") {
            left.push(format!("program {name} (id {})", p["id"]));
        }
    }
    let tables = Command::new("nft").args(["list", "tables"]).output().context("nft list tables")?;
    left.extend(String::from_utf8_lossy(&tables.stdout).lines().filter(|l| l.contains("natfix")).map(|l| format!("nftables {l}")));
    // The Docker tests' containers (tests/e2e/docker_image.rs), when an engine answers.
    if let Ok(out) = Command::new("docker").args(["ps", "-a", "--filter", "name=natfix-test-", "--format", "{{.Names}}"]).output() {
        left.extend(String::from_utf8_lossy(&out.stdout).lines().map(|c| format!("container {c}")));
    }
    for ns in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = ns.file_name().to_string_lossy().into_owned();
        if name.starts_with("nft-") || name.starts_with("natfix-lab") || name.starts_with("nfb") {
            left.push(format!("namespace {name}"));
        }
    }
    Ok(left)
}
