//! KERNELS.md: per kernel, what natfix detected and chose, and how each scenario went. Every
//! cell is read from what the runs reported (the scenario's JSON, `natfix status --json` after
//! each attach, `natfix diagnose --json` in the VM), never written in by hand.

use std::{collections::BTreeSet, fmt::Write as _};

use serde_json::Value;

use super::verdict::{DIRECTIONS, SIZES, Verdict, check, csum_rise, num};

/// The host kernel's part: `natfix diagnose --json`, and the namespace tests by name.
pub(super) struct HostRun {
    pub(super) label: String,
    pub(super) diagnose: Value,
    pub(super) tests: Vec<(String, bool)>,
}

/// One VM kernel: the result items of its boots, and boots that produced none.
pub(super) struct KernelRun {
    pub(super) label: String,
    pub(super) items: Vec<Value>,
    pub(super) errors: Vec<String>,
}

/// Why the oldest 6.1 still served is not in the matrix (from a one-off comparison run).
pub(super) const OLDEST_NOTE: &str = "The oldest 6.1 package Debian still serves, linux-image-6.1.0-47 (6.1.170), was run once \
    with the same scenarios (`cargo xtask vm --matrix --debian 6.1-oldest --matrix-out FILE`): natfix detected and chose the \
    same as on 6.1.0-57 and every mode passed with the same counts, so the matrix leaves it out to keep the run short.";

pub(super) fn render(host: &HostRun, runs: &[KernelRun]) -> String {
    let mut md = String::from(
        "# natfix across kernels\n\n\
         Written by `cargo xtask vm --matrix`. The host kernel runs the scenarios that need no ESP in namespaces \
         (`cargo test -p natfix-testkit`); each VM kernel (Debian's 6.1 and 6.12 lines, amd64 and cloud-amd64, newest \
         package of each, under qemu/TCG) runs the guard scenario (tests/vm/guard.sh) and the encrypted-overlay scenario \
         (tests/vm/esp-nat.sh) with every backend and mode. Each cell comes from the run: the scenario's counters, \
         `natfix status --json` after each attach and `natfix diagnose --json` in the VM.\n\n",
    );
    md.push_str(OLDEST_NOTE);
    md.push_str("\n\n## What natfix detected and chose\n\n");
    md.push_str(
        "| kernel | tc programs attach as | XDP guard | guard flow source (auto) | `--flow-source conntrack` | ESP GRO path | \
         overlay fix, backend auto | nftables rule | modules not loaded |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let _ = writeln!(md, "| {} | {} | - | - | {} | no ESP crypto in this kernel | - | - | - |", host.label, host_tc(&host.diagnose), host_ct(&host.diagnose));
    for run in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.label,
            tc_attach(run),
            xdp_guard(run),
            flow_source(run),
            conntrack_refused(run),
            esp_gro(run),
            auto_backend(run),
            nft_rule(run),
            modules_failed(run),
        );
    }
    md.push_str("\n## Each scenario\n\n");
    md.push_str(
        "`delivered`: replies received/sent, small then large pings, each way (esp-nat); the container's flow and the \
         remote's reply (guard). `UdpInCsumErrors`: the rise on A / B during the pings.\n\n\
         | kernel | scenario/mode | result | UdpInCsumErrors A / B | delivered | natfix attached | natfix warned |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (scenario, ok) in &host.tests {
        let _ = writeln!(md, "| {} | {scenario} | {} | - | - | - | - |", host.label, if *ok { "pass" } else { "**FAIL**" });
    }
    let _ = writeln!(md, "| {} | esp-nat (encrypted overlay) | not run: no ESP crypto in this kernel | - | - | - | - |", host.label);
    for run in runs {
        md.push_str(&scenario_rows(run));
    }
    md.push_str("\n## What `natfix diagnose` says of each kernel\n\n");
    let _ = writeln!(md, "- {}: {}", host.label, kernel_findings(&host.diagnose["findings"]));
    for run in runs {
        let findings = run.items.first().map_or_else(|| "-".into(), |i| kernel_findings(&i["vm"]["kernel_findings"]));
        let _ = writeln!(md, "- {}: {findings}", run.label);
    }
    md
}

fn scenario_rows(run: &KernelRun) -> String {
    let mut md = String::new();
    for error in &run.errors {
        let _ = writeln!(md, "| {} | - | **error**: {} | - | - | - | - |", run.label, cell(error));
    }
    for item in &run.items {
        let verdict = match check(item) {
            Verdict::Pass => "pass".to_owned(),
            Verdict::Informational => "info".to_owned(),
            Verdict::Fail(why) => format!("**FAIL**: {}", why.join("; ")),
        };
        let csum = if item["scenario"] == "esp-nat" {
            format!("+{} / +{}", csum_rise(item, "a"), csum_rise(item, "b"))
        } else {
            "-".into()
        };
        let _ = writeln!(
            md,
            "| {} | {}/{} | {} | {csum} | {} | {} | {} |",
            run.label,
            item["scenario"].as_str().unwrap_or("?"),
            item["mode"].as_str().unwrap_or("?"),
            cell(&verdict),
            delivered(item),
            cell(&attached(item)),
            cell(&warnings(item)),
        );
    }
    md
}

/// Text fit for a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "/").replace('\n', " ")
}

fn delivered(item: &Value) -> String {
    if item["scenario"] == "guard" {
        let port = item["external_port"].as_i64().map_or_else(|| "none".into(), |p| p.to_string());
        let reply = if item["reply_delivered"] == Value::Bool(true) { "reply delivered" } else { "no reply" };
        let dropped = item["natfix"]["dropped_unsolicited"].as_i64().map(|n| format!(", {n} probe(s) dropped")).unwrap_or_default();
        return format!("flow on port {port}, {reply}{dropped}");
    }
    DIRECTIONS
        .iter()
        .map(|dir| {
            let sizes: Vec<String> =
                SIZES.iter().map(|size| format!("{}/{}", num(item, &[dir, size, "received"]), num(item, &[dir, size, "sent"]))).collect();
            format!("{} {}", if *dir == "a_to_b" { "A→B" } else { "B→A" }, sizes.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The records `natfix status --json` showed after the mode's attach.
fn attachments(item: &Value) -> Vec<&Value> {
    let status = if item["scenario"] == "guard" { &item["natfix"]["status"] } else { &item["natfix_status"] };
    status["attachments"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// The mode's programs as `name (hook mode)`, and the overlay fix's nftables rule, A and B alike.
fn attached(item: &Value) -> String {
    let exits: Vec<i64> = [&item["natfix"]["exit"], &item["natfix"]["a"]["exit"], &item["natfix"]["b"]["exit"]]
        .into_iter()
        .filter_map(Value::as_i64)
        .filter(|&e| e != 0)
        .collect();
    if let Some(exit) = exits.first() {
        return format!("refused (exit {exit})");
    }
    let mut parts = BTreeSet::new();
    for att in attachments(item) {
        for p in att["programs"].as_array().into_iter().flatten() {
            parts.insert(format!("{} ({} {})", text(&p["name"]), text(&p["hook"]), text(&p["mode"])));
        }
        if att["overlay"]["changes"]["nft_table"].is_string() {
            parts.insert("nftables rule".to_owned());
        }
    }
    if parts.is_empty() { "-".into() } else { parts.into_iter().collect::<Vec<_>>().join(", ") }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// What natfix logged as WARN while attaching.
fn warnings(item: &Value) -> String {
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
    if notes.is_empty() { "-".into() } else { notes.join("; ") }
}

fn item<'a>(run: &'a KernelRun, mode: &str) -> Option<&'a Value> {
    run.items.iter().find(|i| i["mode"] == mode)
}

/// Attach modes of every tc program any mode attached.
fn tc_attach(run: &KernelRun) -> String {
    let modes: BTreeSet<&str> = run
        .items
        .iter()
        .flat_map(attachments)
        .flat_map(|a| a["programs"].as_array().into_iter().flatten())
        .filter(|p| p["hook"].as_str().is_some_and(|h| h.starts_with("tc-")))
        .filter_map(|p| p["mode"].as_str())
        .collect();
    if modes.is_empty() { "not seen".into() } else { modes.into_iter().collect::<Vec<_>>().join(", ") }
}

fn xdp_guard(run: &KernelRun) -> String {
    item(run, "guard-xdp")
        .into_iter()
        .flat_map(attachments)
        .flat_map(|a| a["programs"].as_array().into_iter().flatten())
        .find(|p| p["hook"] == "xdp")
        .map_or_else(|| "not seen".into(), |p| format!("xdp {}", text(&p["mode"])))
}

fn flow_source(run: &KernelRun) -> String {
    item(run, "guard-xdp")
        .into_iter()
        .flat_map(attachments)
        .map(|a| &a["guard"])
        .find(|g| g.is_object())
        .map_or_else(|| "not seen".into(), |g| cell(&format!("{}: {}", text(&g["flow_source"]), text(&g["flow_source_reason"]))))
}

fn conntrack_refused(run: &KernelRun) -> String {
    item(run, "guard-conntrack-refused").map_or_else(
        || "not run".into(),
        |i| match num(i, &["natfix", "exit"]) {
            0 => "accepted".into(),
            n => format!("refused (exit {n})"),
        },
    )
}

fn esp_gro(run: &KernelRun) -> String {
    let Some(base) = item(run, "baseline") else { return "not run".into() };
    if base["esp4_offload_loaded"] != Value::Bool(true) {
        return "no: esp4_offload not loaded".into();
    }
    let at_ingress = num(base, &["decrypted_at_ingress", "a"]).max(0) + num(base, &["decrypted_at_ingress", "b"]).max(0);
    let tc_zeroed = item(run, "natfix-tc").map_or(0, |i| num(i, &["natfix_counters", "a", "zeroed"]).max(0) + num(i, &["natfix_counters", "b", "zeroed"]).max(0));
    if at_ingress > 0 {
        format!("yes: esp4_offload loaded, {at_ingress} decrypted VXLAN packets at ingress (baseline), tc program zeroed {tc_zeroed}")
    } else {
        "no: esp4_offload loaded, but no decrypted packet reached ingress".into()
    }
}

fn auto_backend(run: &KernelRun) -> String {
    let Some(auto) = item(run, "natfix-auto") else { return "not run".into() };
    let backends: BTreeSet<&str> = attachments(auto).iter().filter_map(|a| a["overlay"]["backend"].as_str()).collect();
    if backends.is_empty() {
        return "not seen".into();
    }
    format!("{} ({})", backends.into_iter().collect::<Vec<_>>().join(", "), attached(auto))
}

fn nft_rule(run: &KernelRun) -> String {
    let Some(nft) = item(run, "natfix-nft") else { return "not run".into() };
    let count = |node: &str| nft["natfix_counters"][node]["nft_zeroed"].as_u64();
    match (count("a"), count("b")) {
        (Some(a), Some(b)) => format!("rewrote {a} (A) / {b} (B) in natfix-nft"),
        _ => "no counter".into(),
    }
}

fn modules_failed(run: &KernelRun) -> String {
    let failed: Vec<&str> = run
        .items
        .first()
        .and_then(|i| i["vm"]["modules_failed"].as_array())
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|line| line.split(':').next().unwrap_or(line))
        .collect();
    if failed.is_empty() { "-".into() } else { failed.join(" ") }
}

/// `check: summary` of the `kernel.*` findings in a `natfix diagnose --json` findings array.
fn kernel_findings(findings: &Value) -> String {
    let text: Vec<String> = findings
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["check"].as_str().is_some_and(|c| c.starts_with("kernel.")))
        .map(|f| format!("{}: {}", f["check"].as_str().unwrap_or(""), f["summary"].as_str().unwrap_or("")))
        .collect();
    if text.is_empty() { "natfix diagnose did not run".into() } else { cell(&text.join("; ")) }
}

/// The host's tc attach mode, as `natfix diagnose` reports it (nothing attaches in the matrix).
fn host_tc(diagnose: &Value) -> String {
    finding(diagnose, "kernel.tcx").map_or_else(|| "-".into(), |s| format!("{} (diagnose)", if s.contains("through tcx links") { "tcx" } else { "clsact" }))
}

fn host_ct(diagnose: &Value) -> String {
    finding(diagnose, "kernel.ct-kfuncs")
        .map_or_else(|| "-".into(), |s| if s.contains("vmlinux BTF") { "possible: kfuncs in vmlinux BTF (diagnose)".into() } else { cell(s) })
}

fn finding<'a>(diagnose: &'a Value, check: &str) -> Option<&'a str> {
    diagnose["findings"].as_array()?.iter().find(|f| f["check"] == check)?["summary"].as_str()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_come_from_the_status_records_of_the_run() {
        let guard_tc = serde_json::json!({
            "scenario": "guard", "mode": "guard-xdp", "external_port": 25000, "reply_delivered": true,
            "natfix": { "exit": 0, "dropped_unsolicited": 1, "status": { "attachments": [{
                "programs": [
                    { "name": "natfix_flow_egress", "hook": "tc-egress", "mode": "tcx" },
                    { "name": "natfix_guard_xdp", "hook": "xdp", "mode": "native" }
                ],
                "guard": { "flow_source": "own", "flow_source_reason": "auto: conntrack is a module" }
            }]}},
            "vm": { "modules_failed": ["crc32c_intel: insmod: No such device"] }
        });
        let refused = serde_json::json!({ "scenario": "guard", "mode": "guard-conntrack-refused", "natfix": { "exit": 5 } });
        let run = KernelRun { label: "k".into(), items: vec![guard_tc.clone(), refused.clone()], errors: Vec::new() };
        assert_eq!(tc_attach(&run), "tcx");
        assert_eq!(xdp_guard(&run), "xdp native");
        assert_eq!(flow_source(&run), "own: auto: conntrack is a module");
        assert_eq!(conntrack_refused(&run), "refused (exit 5)");
        assert_eq!(modules_failed(&run), "crc32c_intel");
        assert_eq!(attached(&guard_tc), "natfix_flow_egress (tc-egress tcx), natfix_guard_xdp (xdp native)");
        assert_eq!(attached(&refused), "refused (exit 5)");
        assert_eq!(delivered(&guard_tc), "flow on port 25000, reply delivered, 1 probe(s) dropped");
    }
}
