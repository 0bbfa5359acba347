//! The overlay fix's nftables table: decrypted VXLAN gets UDP checksum 0 at
//! prerouting, where the decrypted packet passes again on every path
//! (fragments and the non-GRO path included).

use anyhow::{Context, Result};
use tracing::info;

use crate::{record::OverlayChanges, sys::nft};

/// The nftables table name for an interface (by index: names may hold any byte).
#[must_use]
pub fn table_name(ifindex: u32) -> String {
    format!("natfix_overlay_{ifindex}")
}

/// The ruleset, as nftables JSON: decrypted (secpath) UDP to the VXLAN ports
/// arriving on `iface` gets checksum 0, at prerouting priority mangle, where
/// the decrypted packet passes again (fragments included). With `reqid`,
/// only packets an SA with that reqid decrypted (`ipsec in reqid`).
#[must_use]
pub fn ruleset(table: &str, iface: &str, ports: &[u16], reqid: Option<u32>) -> serde_json::Value {
    let decrypted = match reqid {
        Some(id) => serde_json::json!({ "match": { "op": "==",
            "left": { "ipsec": { "key": "reqid", "dir": "in", "spnum": 0 } }, "right": id } }),
        None => serde_json::json!({ "match": { "op": "==", "left": { "meta": { "key": "ipsec" } }, "right": true } }),
    };
    serde_json::json!({ "nftables": [
        { "add": { "table": { "family": "ip", "name": table } } },
        { "add": { "chain": { "family": "ip", "table": table, "name": "prerouting",
            "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept" } } },
        // The secpath match first: every packet that was not decrypted (all
        // other traffic on the host) fails it and costs one expression.
        { "add": { "rule": { "family": "ip", "table": table, "chain": "prerouting", "expr": [
            decrypted,
            { "match": { "op": "==", "left": { "meta": { "key": "iifname" } }, "right": iface } },
            { "match": { "op": "==", "left": { "payload": { "protocol": "udp", "field": "dport" } },
                "right": { "set": ports } } },
            // Counts what the rule rewrites (read back by `rule_counter`);
            // packets that fail a match above never reach it.
            { "counter": null },
            { "mangle": { "key": { "payload": { "protocol": "udp", "field": "checksum" } }, "value": 0 } }
        ] } } }
    ] })
}

/// Installs (or replaces) the table in the calling thread's namespace.
pub fn install(ifindex: u32, iface: &str, ports: &[u16], reqid: Option<u32>, changes: &mut OverlayChanges) -> Result<()> {
    let table = table_name(ifindex);
    // One transaction: add (no-op if present), delete, then the ruleset, so a
    // table left by a crashed natfix, or an upgrade, is replaced atomically.
    let mut doc = ruleset(&table, iface, ports, reqid);
    if let Some(cmds) = doc["nftables"].as_array_mut() {
        cmds.insert(0, serde_json::json!({ "add": { "table": { "family": "ip", "name": table } } }));
        cmds.insert(1, serde_json::json!({ "delete": { "table": { "family": "ip", "name": table } } }));
    }
    nft::apply_json(&doc)?;
    info!("installed nftables table ip {table}: decrypted IPv4 VXLAN gets UDP checksum 0");
    changes.nft_table = Some(table);
    Ok(())
}

/// Packets and bytes the rule of natfix's table set to checksum 0, summed over
/// the counters in `nft -j list table` output.
pub fn parse_rule_counter(json: &str) -> Result<(u64, u64)> {
    let doc: serde_json::Value = serde_json::from_str(json).context("`nft -j list table` printed invalid JSON")?;
    let mut found = None;
    let rules = doc["nftables"].as_array().into_iter().flatten().filter_map(|item| item.get("rule"));
    for expr in rules.flat_map(|rule| rule["expr"].as_array().into_iter().flatten()) {
        if let Some(counter) = expr.get("counter") {
            let (packets, bytes) = found.unwrap_or((0, 0));
            let field = |name: &str| counter[name].as_u64().with_context(|| format!("nft counter without {name}: {counter}"));
            found = Some((packets + field("packets")?, bytes + field("bytes")?));
        }
    }
    found.context("natfix's nftables rule has no counter (installed by an older natfix: attach again to add it)")
}

/// What the rule of `table` rewrote so far, in the calling thread's namespace.
pub fn rule_counter(table: &str) -> Result<(u64, u64)> {
    let json = nft::list_table("ip", table)
        .context("removed outside natfix? `natfix attach` again restores it")?;
    parse_rule_counter(&json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rule_counter_from_nft_json() {
        // `nft -j list table` (nftables 1.0.6) of a table natfix installed.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "ip", "name": "natfix_overlay_7", "handle": 1}},
            {"chain": {"family": "ip", "table": "natfix_overlay_7", "name": "prerouting", "handle": 1,
                "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "natfix_overlay_7", "chain": "prerouting", "handle": 2, "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "ipsec"}}, "right": true}},
                {"counter": {"packets": 42, "bytes": 6300}},
                {"mangle": {"key": {"payload": {"protocol": "udp", "field": "checksum"}}, "value": 0}}]}}]}"#;
        assert_eq!(parse_rule_counter(json).unwrap(), (42, 6300));
        let without = json.replace(r#"{"counter": {"packets": 42, "bytes": 6300}},"#, "");
        assert!(format!("{:#}", parse_rule_counter(&without).unwrap_err()).contains("no counter"));
        assert!(parse_rule_counter("not json").is_err());
    }

    #[test]
    fn ruleset_json_carries_ports_and_iface_as_data() {
        let doc = ruleset("natfix_overlay_7", "eth0\"; drop", &[4789, 7789], None);
        let rule = &doc["nftables"][2]["add"]["rule"];
        assert_eq!(rule["expr"][1]["match"]["right"], "eth0\"; drop", "names stay data, never syntax");
        assert_eq!(rule["expr"][2]["match"]["right"]["set"], serde_json::json!([4789, 7789]));
        assert!(rule["expr"][3]["counter"].is_null(), "an anonymous counter before the rewrite");
        assert_eq!(rule["expr"][4]["mangle"]["value"], 0);
        assert_eq!(doc["nftables"][1]["add"]["chain"]["prio"], -150);
        assert_eq!(rule["expr"][0]["match"]["left"]["meta"]["key"], "ipsec");
        let docker = ruleset("t", "eth0", &[4789], Some(0x00D0_C4E3));
        let m = &docker["nftables"][2]["add"]["rule"]["expr"][0]["match"];
        assert_eq!((m["left"]["ipsec"]["key"].as_str(), m["right"].as_u64()), (Some("reqid"), Some(13_681_891)));
    }
}
