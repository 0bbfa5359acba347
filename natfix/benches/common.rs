//! Shared by the benchmarks: statistics and the JSON line each one prints.
#![allow(dead_code, reason = "each bench binary uses a subset")]

use rand::{RngExt as _, SeedableRng as _, rngs::SmallRng};
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
    let mut row = row(group, name, unit, runs, baseline_name, baseline, higher_is_better);
    row["ratio"] = json!(ratio);
    row["delta"] = json!(delta);
    row["paired"] = json!(true);
    println!("{row}");
}

/// The fields every row has: what, the runs' median and range, the baseline's median.
fn row(group: &str, name: &str, unit: &str, runs: &[f64], baseline_name: &str, baseline: &[f64], higher_is_better: bool) -> serde_json::Value {
    let (med, min, max) = summary(&mut runs.to_vec());
    let (bmed, _, _) = summary(&mut baseline.to_vec());
    json!({
        "group": group, "name": name, "unit": unit, "runs": runs.len(),
        "median": med, "min": min, "max": max,
        "baseline": baseline_name, "baseline_median": bmed, "higher_is_better": higher_is_better,
    })
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

/// One window of live traffic: the frames that got through and the seconds they took.
#[derive(Clone, Copy, Debug)]
pub struct TrafficWindow {
    pub frames: f64,
    pub secs: f64,
}

/// All frames over all seconds.
fn pooled_rate(windows: &mut dyn Iterator<Item = TrafficWindow>) -> f64 {
    let (frames, secs) = windows.fold((0.0, 0.0), |(f, s), w| (f + w.frames, s + w.secs));
    frames / secs
}

/// Each window's rate.
fn window_rates(windows: &[TrafficWindow]) -> Vec<f64> {
    windows.iter().map(|w| w.frames / w.secs).collect()
}

/// The ratio of `runs` to `baseline` by `estimate` (over windows of round
/// indices), with a bootstrap 95% interval resampling rounds (fixed seed: the
/// same data gives the same interval).
fn ratio_with_ci(runs: &[TrafficWindow], baseline: &[TrafficWindow], estimate: impl Fn(&mut dyn Iterator<Item = TrafficWindow>) -> f64) -> (f64, [f64; 2]) {
    let ratio_of = |rounds: &[usize]| {
        estimate(&mut rounds.iter().map(|&i| runs[i])) / estimate(&mut rounds.iter().map(|&i| baseline[i]))
    };
    let all: Vec<usize> = (0..runs.len().min(baseline.len())).collect();
    let mut rng = SmallRng::seed_from_u64(1);
    let mut resampled: Vec<f64> = (0..2000)
        .map(|_| {
            let rounds: Vec<usize> = all.iter().map(|_| rng.random_range(0..all.len())).collect();
            ratio_of(&rounds)
        })
        .collect();
    resampled.sort_by(f64::total_cmp);
    (ratio_of(&all), [resampled[resampled.len() * 25 / 1000], resampled[resampled.len() * 975 / 1000]])
}

/// Prints a row of interleaved live-traffic windows (`runs[i]` and
/// `baseline[i]` from round i). Each side's rate is pooled (all frames / all
/// seconds) rather than a median of per-round ratios: short windows come out
/// quantized to scheduler ticks (4 ms steps), and a median of such ratios snaps
/// to those steps. `ci95` is a bootstrap interval of the ratio, resampling
/// rounds (fixed seed: the same data gives the same interval).
pub fn report_pooled(group: &str, name: &str, unit: &str, runs: &[TrafficWindow], baseline_name: &str, baseline: &[TrafficWindow], higher_is_better: bool) {
    let (ratio, ci) = ratio_with_ci(runs, baseline, |ws| pooled_rate(ws));
    let mut row = row(group, name, unit, &window_rates(runs), baseline_name, &window_rates(baseline), higher_is_better);
    row["ratio"] = json!(ratio);
    row["ci95"] = json!(ci);
    row["delta"] = json!(pooled_rate(&mut runs.iter().copied()) - pooled_rate(&mut baseline.iter().copied()));
    row["estimator"] = json!("pooled");
    println!("{row}");
}

/// As `report_pooled`, but each side's rate is the median window's: for
/// windows long enough not to quantize, on a machine whose neighbours now
/// and then take a window's CPU whatever ran in it (seen in every
/// configuration alike), the typical window is what a configuration costs.
/// The pooled ratio is kept in the row beside it.
pub fn report_median(group: &str, name: &str, unit: &str, runs: &[TrafficWindow], baseline_name: &str, baseline: &[TrafficWindow], higher_is_better: bool) {
    let median_rate = |ws: &mut dyn Iterator<Item = TrafficWindow>| summary(&mut window_rates(&ws.collect::<Vec<_>>())).0;
    let (ratio, ci) = ratio_with_ci(runs, baseline, median_rate);
    let pooled = pooled_rate(&mut runs.iter().copied()) / pooled_rate(&mut baseline.iter().copied());
    let mut row = row(group, name, unit, &window_rates(runs), baseline_name, &window_rates(baseline), higher_is_better);
    row["ratio"] = json!(ratio);
    row["ci95"] = json!(ci);
    row["pooled_ratio"] = json!(pooled);
    row["delta"] = json!(row["median"].as_f64().unwrap_or(0.0) - row["baseline_median"].as_f64().unwrap_or(0.0));
    row["estimator"] = json!("median");
    println!("{row}");
}
