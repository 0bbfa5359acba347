//! `cargo xtask vm --matrix`: every kernel it can get, each scenario, into KERNELS.md.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{
    Choice, Mode, Scenario, VmArgs, choose_kernels,
    kernel::{DebianKernel, Flavour, Line},
    kernels_md::{self, HostRun, KernelRun},
    run_on,
    verdict::{Verdict, check},
    workspace_root,
};

/// The Debian kernels of the matrix: the newest package of each line and flavour. The oldest
/// 6.1 still served (`--debian 6.1-oldest`) behaved as the newest when last compared (see
/// `kernels_md::OLDEST_NOTE`), so it stays out to keep the run short.
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

/// `--matrix`: every kernel it can get, each scenario, into KERNELS.md.
pub(super) fn matrix(args: &VmArgs) -> Result<()> {
    let workspace = workspace_root();
    let cache = workspace.join("vm-cache");
    fs::create_dir_all(&cache)?;
    let host = host_run(&workspace);
    let mut runs = Vec::new();
    for Choice { label, kernel } in choose_kernels(args, &cache, &MATRIX_KERNELS, false) {
        let mut run = KernelRun { label, items: Vec::new(), errors: Vec::new() };
        match kernel {
            Err(e) => run.errors.push(format!("not available: {e:#}")),
            Ok(kernel) => {
                for (scenario, modes) in [(Scenario::Guard, &GUARD_MODES[..]), (Scenario::EspNat, &MATRIX_MODES[..])] {
                    let scenario_args = VmArgs { scenario, diagnose: true, ..args.clone() };
                    match run_on(&scenario_args, &kernel, modes) {
                        Ok(Value::Array(items)) => run.items.extend(items),
                        Ok(item) => run.items.push(item),
                        Err(e) => run.errors.push(format!("{}: {e:#}", super::value_name(&scenario))),
                    }
                }
            }
        }
        runs.push(run);
    }
    let md = kernels_md::render(&host, &runs);
    let path = args.matrix_out.clone().unwrap_or_else(|| workspace.join("KERNELS.md"));
    fs::write(&path, &md).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{md}");
    let failed = host.tests.iter().filter(|(_, ok)| !ok).count()
        + runs.iter().map(|r| r.errors.len() + r.items.iter().filter(|i| matches!(check(i), Verdict::Fail(_))).count()).sum::<usize>();
    ensure!(failed == 0, "{failed} kernel/scenario combination(s) failed (see {})", path.display());
    Ok(())
}

/// The host kernel: the namespace scenarios (root-only tests included), and `natfix diagnose`.
fn host_run(workspace: &Path) -> HostRun {
    let release = Command::new("uname").arg("-r").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let diagnose = Command::new(workspace.join("target/debug/natfix"))
        .args(["diagnose", "--json", "--sample", "1"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .unwrap_or(Value::Null);
    let tests = [("guard (seed 000) in namespaces", "guard_e2e"), ("attach/detach/pin in namespaces", "attach")]
        .into_iter()
        .map(|(scenario, test)| {
            let ok = Command::new(env!("CARGO"))
                .args(["test", "-q", "-p", "natfix-testkit", "--test", test, "--", "--include-ignored"])
                .current_dir(workspace)
                .status()
                .is_ok_and(|s| s.success());
            (scenario.to_owned(), ok)
        })
        .collect();
    HostRun { label: format!("host {release}"), diagnose, tests }
}
