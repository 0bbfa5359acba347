//! Expected outcomes of the scenarios' modes (tests/vm/*.sh), and a one-line summary of a result.

use std::fmt::Write as _;

use serde_json::Value;

pub(super) enum Verdict {
    Pass,
    Fail(Vec<String>),
    /// No expectation: mode `natfix` runs whatever --natfix-arg says.
    Informational,
}

pub(super) fn num(v: &Value, path: &[&str]) -> i64 {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_i64).unwrap_or(-1)
}

pub(super) const DIRECTIONS: [&str; 2] = ["a_to_b", "b_to_a"];
pub(super) const SIZES: [&str; 2] = ["small", "large"];

pub(super) fn summarize(item: &Value) -> String {
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
    if item["mode"] == "trace" {
        for (k, side) in [("without_fix", "without fix"), ("with_fix", "with natfix")] {
            let t = &item[k];
            let _ = write!(s, " {side}: exit {} steps {} udp_csum_drop {} natfix_rewrote {} delivered {};", t["exit"], t["steps"], t["udp_csum_drop"], t["natfix_rewrote"], t["delivered"]);
        }
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

pub(super) fn check(item: &Value) -> Verdict {
    let mode = item["mode"].as_str().unwrap_or_default();
    let mut why = Vec::new();
    if let Some(errors) = item["errors"].as_array().filter(|e| !e.is_empty()) {
        if mode == "natfix" {
            return Verdict::Informational;
        }
        let lines: Vec<&str> = errors.iter().filter_map(Value::as_str).collect();
        why.push(format!("setup errors:\n        {}", lines.join("\n        ")));
    }
    match mode {
        "natfix" => return Verdict::Informational,
        m if m.starts_with("natfix-") => check_natfix(item, m, &mut why),
        m if m.starts_with("guard-") => check_guard(item, m, &mut why),
        "baseline" => check_baseline(item, &mut why),
        "baseline-4777" => {
            check_baseline(item, &mut why);
            check_vxlan_port(item, 4777, &mut why);
        }
        "lab" => {
            let output = item["output"].as_str().unwrap_or_default();
            if num(item, &["exit"]) != 0 || !output.contains("fixed with `natfix attach --overlay-fix` (ok)") {
                why.push(format!("natfix lab --scenario overlay did not show the fix: exit {}: {output}", item["exit"]));
            }
        }
        "trace" => check_trace(item, &mut why),
        "throughput" => {
            for k in ["noudpcsum_mbps", "natfix_mbps"] {
                let v = item[k].as_array().map_or(0.0, |a| a.iter().filter_map(Value::as_f64).fold(0.0, f64::max));
                if v <= 0.0 {
                    why.push(format!("{k}: no throughput measured"));
                }
            }
        }
        other => check_workaround(item, other, &mut why),
    }
    if why.is_empty() { Verdict::Pass } else { Verdict::Fail(why) }
}

/// Seed 001 traced: without a fix the decrypted VXLAN packet's path ends in
/// a `UDP_CSUM` drop in B; with natfix's overlay fix, natfix's rewrite shows
/// and nothing drops it. The trace cleans up after itself.
fn check_trace(item: &Value, why: &mut Vec<String>) {
    let (without, with) = (&item["without_fix"], &item["with_fix"]);
    if num(without, &["exit"]) != 0 || without["udp_csum_drop"] != true {
        why.push(format!("without a fix the trace did not end in a UDP_CSUM drop: {without}"));
    }
    if num(with, &["exit"]) != 0 || with["natfix_rewrote"] != true || with["udp_csum_drop"] != false {
        why.push(format!("with natfix the trace did not show the rewrite without a drop: {with}"));
    }
    if num(&item["natfix"], &["b", "exit"]) != 0 {
        why.push(format!("natfix attach on B failed: {}", item["natfix"]["b"]));
    }
    if num(item, &["trace_tables_left"]) != 0 {
        why.push(format!("{} natfix_trace tables left in B", item["trace_tables_left"]));
    }
}

/// The scenario ran its VXLAN on `port`.
fn check_vxlan_port(item: &Value, port: i64, why: &mut Vec<String>) {
    if num(item, &["vxlan_port"]) != port {
        why.push(format!("the scenario ran VXLAN on {}, expected {port}", item["vxlan_port"]));
    }
}

/// Every ping of both directions and sizes answered.
fn all_replies(item: &Value, why: &mut Vec<String>) {
    for dir in DIRECTIONS {
        for size in SIZES {
            let (sent, received) = (num(item, &[dir, size, "sent"]), num(item, &[dir, size, "received"]));
            if sent <= 0 || received != sent {
                why.push(format!("{dir} {size}: {received}/{sent} replies, expected all"));
            }
        }
    }
}

/// How much `UdpInCsumErrors` rose on `node` during the pings.
pub(super) fn csum_rise(item: &Value, node: &str) -> i64 {
    num(item, &["udp_csum_errors", node, "after"]) - num(item, &["udp_csum_errors", node, "before"])
}

/// No fix: nothing gets through, both receivers count checksum errors, both SAs decrypt.
fn check_baseline(item: &Value, why: &mut Vec<String>) {
    for dir in DIRECTIONS {
        for size in SIZES {
            if num(item, &[dir, size, "received"]) != 0 || num(item, &[dir, size, "requests_delivered"]) != 0 {
                why.push(format!("{dir} {size}: something got through without a fix"));
            }
        }
    }
    for node in ["a", "b"] {
        if csum_rise(item, node) <= 0 {
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

/// The known workarounds (and cleartext, which needs none).
fn check_workaround(item: &Value, mode: &str, why: &mut Vec<String>) {
    match mode {
        "cleartext" | "noudpcsum" => all_replies(item, why),
        "nft" => {
            all_replies(item, why);
            if item["esp_fragmented"] != Value::Bool(true) {
                why.push("the large pings did not fragment the ESP packets".into());
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
            if csum_rise(item, "a") <= 0 || csum_rise(item, "b") != 0 {
                why.push("expected UdpInCsumErrors on A only".into());
            }
        }
        other => why.push(format!("unknown mode {other}")),
    }
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

/// The nodes natfix attaches to in `mode`.
fn natfix_nodes(mode: &str) -> &'static [&'static str] {
    if mode == "natfix-one-side" { &["b"] } else { &["a", "b"] }
}

/// Packets the overlay program (or the nftables rule: `nft_zeroed`) counted for `reason` on `node`.
fn counter(item: &Value, node: &str, reason: &str) -> i64 {
    num(item, &["natfix_counters", node, reason]).max(0)
}

/// Expectations of natfix's overlay modes (see tests/vm/esp-nat.sh).
fn check_natfix(item: &Value, mode: &str, why: &mut Vec<String>) {
    for node in natfix_nodes(mode) {
        if num(item, &["natfix", node, "exit"]) != 0 {
            why.push(format!("natfix attach on {node} failed: {}", item["natfix"][node]["output"]));
        }
        let d = &item["natfix_detach"][*node];
        if num(d, &["exit"]) != 0 || num(d, &["nft_left"]) != 0 || num(d, &["tc_left"]) != 0 {
            why.push(format!("natfix detach on {node} left something behind: {d}"));
        }
    }
    check_natfix_delivery(item, mode, why);
    check_nft_counter(item, mode, why);
    check_tc_counters(item, mode, why);
}

/// What must get through (or not) with natfix's fix in `mode`.
fn check_natfix_delivery(item: &Value, mode: &str, why: &mut Vec<String>) {
    match mode {
        "natfix-port-4777" => {
            all_replies(item, why);
            check_vxlan_port(item, 4777, why);
            // What natfix recorded: the port found, and that it was found.
            let recs = item["natfix_status"]["attachments"].as_array().cloned().unwrap_or_default();
            if recs.len() != 2 {
                why.push(format!("natfix status listed {} attachments, expected A's and B's", recs.len()));
            }
            for rec in &recs {
                let o = &rec["overlay"];
                if o["vxlan_ports"] != serde_json::json!([4777]) || o["vxlan_auto"] != Value::Bool(true) {
                    why.push(format!("natfix recorded {o}, expected vxlan_ports [4777] found by auto"));
                }
            }
        }
        "natfix-auto" | "natfix-auto-recompute" | "natfix-nft" | "natfix-both" => {
            all_replies(item, why);
            if item["esp_fragmented"] != Value::Bool(true) {
                why.push("the large pings did not fragment the ESP packets".into());
            }
        }
        // Fragmented ESP is reassembled and decrypted off the GRO path: tc never sees it.
        "natfix-tc" | "natfix-tc-recompute" => {
            for dir in DIRECTIONS {
                let (sent, received) = (num(item, &[dir, "small", "sent"]), num(item, &[dir, "small", "received"]));
                if sent <= 0 || received != sent {
                    why.push(format!("{dir} small: {received}/{sent} replies, expected all"));
                }
            }
        }
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
            for node in natfix_nodes(mode) {
                if counter(item, node, "other_sa") == 0 || counter(item, node, "zeroed") != 0 {
                    why.push(format!("{node}: expected other_sa and no zeroed packets"));
                }
            }
        }
        "natfix-cleartext" => {
            all_replies(item, why);
            for node in natfix_nodes(mode) {
                let rewritten = counter(item, node, "zeroed") + counter(item, node, "recomputed");
                if rewritten != 0 || counter(item, node, "cleartext_skipped") == 0 {
                    why.push(format!("{node}: cleartext VXLAN must be counted as skipped and never rewritten"));
                }
            }
        }
        _ => why.push(format!("unknown mode {mode}")),
    }
}

/// The nftables rule (every mode but tc-only) reports what it rewrote, read by `natfix stats`
/// from the rule's own counter: decrypted VXLAN of the right SA reaches it on every path;
/// cleartext and other SAs never.
fn check_nft_counter(item: &Value, mode: &str, why: &mut Vec<String>) {
    for node in natfix_nodes(mode) {
        match (mode, item["natfix_counters"][*node]["nft_zeroed"].as_u64()) {
            ("natfix-tc" | "natfix-tc-recompute", _) | ("natfix-wrong-reqid" | "natfix-cleartext", Some(0)) => {}
            ("natfix-wrong-reqid" | "natfix-cleartext", n) => why.push(format!("{node}: the nftables rule must rewrite nothing here, counted {n:?}")),
            (_, Some(1..)) => {}
            (_, n) => why.push(format!("{node}: the nftables rule's counter reads {n:?}, expected rewrites")),
        }
    }
    // IPv4 without recompute: auto attaches the nftables rule alone (no eBPF program, so the
    // only overlay counter is the rule's).
    if matches!(mode, "natfix-auto" | "natfix-nft" | "natfix-one-side" | "natfix-port-4777") {
        for node in natfix_nodes(mode) {
            let keys: Vec<&String> = item["natfix_counters"][*node].as_object().map(|o| o.keys().collect()).unwrap_or_default();
            if keys != ["nft_zeroed"] {
                why.push(format!("{node}: expected the nftables rule alone, natfix reported overlay counters {keys:?}"));
            }
        }
    }
}

/// The tc program must have done the work on the GRO path where it runs.
fn check_tc_counters(item: &Value, mode: &str, why: &mut Vec<String>) {
    let tc_reason = match mode {
        "natfix-tc" | "natfix-both" => Some("zeroed"),
        "natfix-tc-recompute" | "natfix-auto-recompute" => Some("recomputed"),
        _ => None,
    };
    if let Some(reason) = tc_reason {
        for node in natfix_nodes(mode) {
            if counter(item, node, reason) == 0 {
                why.push(format!("{node}: the tc program counted no {reason} packets"));
            }
        }
    }
    // Pings 0.2 s apart fall within a learned delta's second: most are incremental.
    if matches!(mode, "natfix-tc-recompute" | "natfix-auto-recompute") {
        for node in natfix_nodes(mode) {
            if counter(item, node, "recomputed_incremental") == 0 {
                why.push(format!("{node}: no datagram was fixed with a learned checksum delta"));
            }
        }
    }
}
