//! Shared by the benchmarks: statistics and the JSON line each one prints.
#![allow(dead_code, reason = "each bench binary uses a subset")]

use serde_json::json;

/// median, min, max of `v` (sorted in place).
pub fn summary(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Prints one result row as a JSON line for `cargo xtask bench` to collect.
/// Runs are paired with their baseline (`runs[i]` measured right after
/// `baseline[i]`): ratio and delta are medians of the per-run ratios and
/// differences, so drift of a noisy machine cancels out.
pub fn report_paired(group: &str, name: &str, unit: &str, runs: &[f64], baseline_name: &str, baseline: &[f64], higher_is_better: bool) {
    let mut ratios: Vec<f64> = runs.iter().zip(baseline).map(|(r, b)| r / b).collect();
    let mut deltas: Vec<f64> = runs.iter().zip(baseline).map(|(r, b)| r - b).collect();
    let (ratio, _, _) = summary(&mut ratios);
    let (delta, _, _) = summary(&mut deltas);
    let (med, min, max) = summary(&mut runs.to_vec());
    let (bmed, _, _) = summary(&mut baseline.to_vec());
    println!(
        "{}",
        json!({
            "group": group, "name": name, "unit": unit, "runs": runs.len(),
            "median": med, "min": min, "max": max,
            "baseline": baseline_name, "baseline_median": bmed,
            "ratio": ratio, "delta": delta, "higher_is_better": higher_is_better, "paired": true,
        })
    );
}

/// Runs `f` on a thread inside a fresh network namespace of its own.
pub fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let ok = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().is_ok_and(|s| s.success());
        assert!(ok, "ip link set lo up");
        f()
    })
    .join()
    .expect("bench thread")
}
