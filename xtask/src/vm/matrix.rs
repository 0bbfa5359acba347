//! `cargo xtask vm --matrix`: every kernel it can get, each scenario, into KERNELS.md.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{
    Choice, Mode, Scenario, VmArgs, choose_kernels,
    kernel::{DebianKernel, Flavour, Line},
    run_on,
    verdict::{Verdict, check},
    workspace_root,
};

/// The Debian kernels of the matrix: the newest package of each line and flavour. The oldest
/// 6.1 still served (`--debian 6.1-oldest`) behaved as the newest when last compared (see
/// KERNELS.md), so it stays out to keep the run short.
const MATRIX_KERNELS: [DebianKernel; 4] = [
    DebianKernel::newest(Line::V6_1, Flavour::Amd64),
    DebianKernel::newest(Line::V6_1, Flavour::CloudAmd64),
    DebianKernel::newest(Line::V6_12, Flavour::Amd64),
    DebianKernel::newest(Line::V6_12, Flavour::CloudAmd64),
];

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
    let items: Vec<&Value> = result.as_array().map_or_else(|| vec![result], |a| a.iter().collect());
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
pub(super) fn matrix(args: &VmArgs) -> Result<()> {
    let workspace = workspace_root();
    let cache = workspace.join("vm-cache");
    fs::create_dir_all(&cache)?;
    let kernels = choose_kernels(args, &cache, &MATRIX_KERNELS, false);
    let mut md = String::from(
        "# natfix across kernels\n\nWritten by `cargo xtask vm --matrix`. The host kernel runs the scenarios that need no \
         ESP (namespaces: `cargo test -p natfix-tests`); each VM kernel runs the guard scenario (tests/vm/guard.sh) \
         and the encrypted-overlay scenario (tests/vm/esp-nat.sh) under qemu/TCG. `fallback` lists what natfix reported missing or fell back from.\n\n\
         | kernel | scenario | result | fallback / missing |\n|---|---|---|---|\n",
    );
    let mut failed = 0;
    md.push_str(&host_rows(&workspace, &mut failed));
    for Choice { label, kernel } in &kernels {
        let kernel = match kernel {
            Ok(kernel) => kernel,
            Err(e) => {
                let _ = writeln!(md, "| {label} | - | not run: {} | - |", format!("{e:#}").replace('|', "/"));
                continue;
            }
        };
        let guard_args = VmArgs { scenario: Scenario::Guard, ..args.clone() };
        match run_on(&guard_args, kernel, &GUARD_MODES) {
            Err(e) => {
                failed += 1;
                let _ = writeln!(md, "| {label} | guard | **error**: {} | - |", format!("{e:#}").replace('|', "/"));
            }
            Ok(result) => md.push_str(&matrix_rows(label, &result, &mut failed)),
        }
        let overlay_args = VmArgs { scenario: Scenario::EspNat, ..args.clone() };
        match run_on(&overlay_args, kernel, &MATRIX_MODES) {
            Err(e) => {
                failed += 1;
                let _ = writeln!(md, "| {label} | esp-nat | **error**: {} | - |", format!("{e:#}").replace('|', "/"));
            }
            Ok(result) => md.push_str(&matrix_rows(label, &result, &mut failed)),
        }
    }
    let path = args.matrix_out.clone().unwrap_or_else(|| workspace.join("KERNELS.md"));
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
        .map_or_else(|| "natfix diagnose did not run".into(), |v| kernel_findings(&v));
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

/// `check: summary` of the `kernel.*` findings of `natfix diagnose --json`.
fn kernel_findings(diagnose: &Value) -> String {
    diagnose["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["check"].as_str().is_some_and(|c| c.starts_with("kernel.")))
        .map(|f| format!("{}: {}", f["check"].as_str().unwrap_or(""), f["summary"].as_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join("; ")
}
