//! Shared by the benchmarks: statistics and the JSON line each one prints.
#![expect(dead_code, reason = "each bench binary uses a subset")]

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
    report_paired_with(group, name, unit, runs, baseline_name, baseline, higher_is_better, &json!({}));
}

/// As `report_paired`, with more fields (`detail`: what the rows' windows
/// showed about the measurement, rendered in a column of its own).
#[expect(clippy::too_many_arguments, reason = "a row's fields")]
pub fn report_paired_with(
    group: &str,
    name: &str,
    unit: &str,
    runs: &[f64],
    baseline_name: &str,
    baseline: &[f64],
    higher_is_better: bool,
    extra: &serde_json::Value,
) {
    let mut ratios: Vec<f64> = runs.iter().zip(baseline).map(|(r, b)| r / b).collect();
    let mut deltas: Vec<f64> = runs.iter().zip(baseline).map(|(r, b)| r - b).collect();
    let (ratio, _, _) = summary(&mut ratios);
    let (delta, _, _) = summary(&mut deltas);
    let mut row = row(group, name, unit, runs, baseline_name, baseline, higher_is_better);
    row["ratio"] = json!(ratio);
    row["delta"] = json!(delta);
    row["paired"] = json!(true);
    if let (Some(row), Some(extra)) = (row.as_object_mut(), extra.as_object()) {
        row.extend(extra.clone());
    }
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

/// Prints a row of live-traffic windows whose ratio is the median of
/// `ratios`: one per round, each a subject window against the baseline
/// windows right beside it (`flanked_sequence` in the flood bench). `ci95`
/// is a bootstrap interval of that median, resampling rounds (fixed seed:
/// the same data gives the same interval); the pooled ratio (all frames /
/// all seconds of each side) is kept beside it. Rates: higher is better.
pub fn report_flanked(group: &str, name: &str, unit: &str, runs: &[TrafficWindow], baseline_name: &str, baseline: &[TrafficWindow], ratios: &[f64]) {
    report_flanked_with(group, name, unit, runs, baseline_name, baseline, ratios, &json!({}));
}

/// As `report_flanked`, with more fields (`detail`).
#[expect(clippy::too_many_arguments, reason = "a row's fields")]
pub fn report_flanked_with(
    group: &str,
    name: &str,
    unit: &str,
    runs: &[TrafficWindow],
    baseline_name: &str,
    baseline: &[TrafficWindow],
    ratios: &[f64],
    extra: &serde_json::Value,
) {
    let median = |v: &mut Vec<f64>| summary(v).0;
    let mut rng = SmallRng::seed_from_u64(1);
    let mut resampled: Vec<f64> = (0..2000)
        .map(|_| median(&mut (0..ratios.len()).map(|_| ratios[rng.random_range(0..ratios.len())]).collect()))
        .collect();
    resampled.sort_by(f64::total_cmp);
    let ci = [resampled[resampled.len() * 25 / 1000], resampled[resampled.len() * 975 / 1000]];
    let pooled = pooled_rate(&mut runs.iter().copied()) / pooled_rate(&mut baseline.iter().copied());
    let mut row = row(group, name, unit, &window_rates(runs), baseline_name, &window_rates(baseline), true);
    row["ratio"] = json!(median(&mut ratios.to_vec()));
    row["ci95"] = json!(ci);
    row["pooled_ratio"] = json!(pooled);
    row["rounds"] = json!(ratios.len());
    row["round_ratios"] = json!(ratios);
    row["delta"] = json!(row["median"].as_f64().unwrap_or(0.0) - row["baseline_median"].as_f64().unwrap_or(0.0));
    row["estimator"] = json!("flanked");
    if let (Some(row), Some(extra)) = (row.as_object_mut(), extra.as_object()) {
        row.extend(extra.clone());
    }
    println!("{row}");
}

/// The `xdp_md` context of an XDP live-frames test run: a `frame_len`-byte
/// frame arriving on `ifindex`, as the bytes `ctx_in` takes.
pub fn xdp_md(frame_len: usize, ifindex: u32) -> [u8; 24] {
    let data_end = u32::try_from(frame_len).expect("a frame under 4 GiB");
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&data_end.to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    md
}
