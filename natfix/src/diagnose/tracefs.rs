//! Drop reasons from the `skb:kfree_skb` tracepoint, through a private tracefs
//! instance so the user's own tracing is left alone.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::facts::DropSample;

const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// `{ 11, "UDP_CSUM" }` pairs of the `reason` field's `__print_symbolic` in a tracepoint format.
#[must_use]
pub fn parse_reason_symbols(format: &str) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let Some(start) = format.find("__print_symbolic(REC->reason") else {
        return out;
    };
    for part in format[start..].split('{').skip(1) {
        let Some((num, rest)) = part.split_once(',') else {
            continue;
        };
        let Some(name) = rest.split('"').nth(1) else { continue };
        if let Ok(n) = num.trim().parse() {
            out.insert(n, name.to_owned());
        }
    }
    out
}

/// Counts `reason: X` in trace output lines, most frequent first.
#[must_use]
pub fn count_trace_reasons(trace: &str) -> Vec<(String, u64)> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for line in trace
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("kfree_skb:"))
    {
        if let Some((_, reason)) = line.rsplit_once("reason: ") {
            *counts.entry(reason.trim().to_owned()).or_default() += 1;
        }
    }
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

const TRACE_INSTANCE_PREFIX: &str = "natfix-diagnose-";

/// Removes instances left by diagnose runs that were killed mid-sample
/// (their event would otherwise keep filling a buffer nobody reads).
fn remove_stale_instances(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TRACE_INSTANCE_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::write(e.path().join("events/skb/kfree_skb/enable"), "0");
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

pub(super) struct DropTracer {
    instance: PathBuf,
}

impl DropTracer {
    /// Enables `kfree_skb` (IP packets only) in a fresh tracefs instance; Err says why not.
    pub(super) fn start() -> Result<Self, String> {
        let Some(root) = TRACEFS_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
        else {
            return Err(
                "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing to enable this check)".into(),
            );
        };
        let format = std::fs::read_to_string(root.join("events/skb/kfree_skb/format"))
            .map_err(|e| format!("no skb:kfree_skb tracepoint ({e})"))?;
        if parse_reason_symbols(&format).is_empty() {
            return Err("this kernel's skb:kfree_skb has no drop reasons (Linux < 5.17)".into());
        }
        remove_stale_instances(&root.join("instances"));
        let instance = root
            .join("instances")
            .join(format!("{TRACE_INSTANCE_PREFIX}{}", std::process::id()));
        std::fs::create_dir(&instance).map_err(|e| format!("cannot create {}: {e}", instance.display()))?;
        let tracer = Self { instance };
        tracer.setup().map_err(|e| format!("{e:#}"))?;
        Ok(tracer)
    }

    fn setup(&self) -> Result<()> {
        let ev = self.instance.join("events/skb/kfree_skb");
        let write =
            |p: PathBuf, v: &str| std::fs::write(&p, v).with_context(|| format!("cannot write {}", p.display()));
        write(self.instance.join("buffer_size_kb"), "1024")?;
        // ETH_P_IP / ETH_P_IPV6, in host order as the tracepoint records them.
        write(ev.join("filter"), "protocol == 2048 || protocol == 34525")?;
        write(ev.join("enable"), "1")?;
        Ok(())
    }

    pub(super) fn finish(self) -> DropSample {
        let _ = std::fs::write(self.instance.join("events/skb/kfree_skb/enable"), "0");
        match std::fs::read_to_string(self.instance.join("trace")) {
            Ok(t) => DropSample::Counts(count_trace_reasons(&t)),
            Err(e) => DropSample::NotChecked(format!("cannot read the trace buffer: {e}")),
        }
        // Drop removes the instance.
    }
}

impl Drop for DropTracer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.instance.join("events/skb/kfree_skb/enable"), "0");
        if let Err(e) = std::fs::remove_dir(&self.instance) {
            tracing::warn!("cannot remove tracefs instance {}: {e}", self.instance.display());
        }
    }
}

