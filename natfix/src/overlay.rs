//! Which mechanism `--csum-backend auto` picks, the host changes the overlay
//! fix needs, and their undoing: the ESP offload
//! modules and GRO (so decrypted packets reach tc ingress), and the nftables
//! table that covers packets which never take that path (IPv4 fragments).
//! Every change is recorded so detach restores exactly what natfix changed.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// What natfix changed on the host for one overlay attachment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayChanges {
    /// Modules natfix loaded (to unload on detach).
    pub loaded_modules: Vec<String>,
    /// natfix switched GRO on for the interface (to switch off on detach).
    pub enabled_gro: bool,
    /// The nftables table natfix created (`ip` family), if any.
    pub nft_table: Option<String>,
}

fn module_loaded(name: &str) -> bool {
    std::path::Path::new("/sys/module").join(name).exists()
}

/// Loads `esp4_offload` (required) and `esp6_offload` (for IPv6 underlays)
/// where missing; they put decrypted packets back through GRO, the only path
/// on which tc sees them.
pub fn load_esp_offload(changes: &mut OverlayChanges) -> Result<()> {
    for (module, required) in [("esp4_offload", true), ("esp6_offload", false)] {
        if module_loaded(module) {
            continue;
        }
        let out = Command::new("modprobe").arg(module).output().context("cannot run modprobe")?;
        if out.status.success() && module_loaded(module) {
            info!("loaded kernel module {module} (ESP GRO path)");
            changes.loaded_modules.push(module.to_owned());
        } else if required {
            bail!(
                "cannot load {module} ({}): without it decrypted packets never reach tc; use --csum-backend nft (IPv4)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        } else {
            warn!("cannot load {module}: decrypted IPv6 underlay packets will not reach tc (IPv4 is covered)");
        }
    }
    Ok(())
}

/// ethtool's legacy GRO ioctls (ETHTOOL_GGRO / ETHTOOL_SGRO).
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// SIOCETHTOOL on `iface` with `buf`, an ethtool command structure (its
/// first u32 is the command) that the kernel reads and writes in place.
fn ethtool_ioctl(iface: &str, buf: *mut u8) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh, valid fd.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: buf.cast(), _pad: [0; 16] };
    for (dst, src) in req.name.iter_mut().zip(iface.as_bytes().iter().take(libc::IFNAMSIZ - 1)) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCETHTOOL reads req and reads/writes *buf, which the caller
    // sized for the command; both live for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ethtool(iface: &str, cmd: u32, data: u32) -> std::io::Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    ethtool_ioctl(iface, (&raw mut value).cast())?;
    Ok(value.data)
}

const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Whether `iface` has a netdev feature named `name` (as `ethtool -k` lists
/// them) switched on; feature bit numbers differ between kernels, names do not.
pub fn netdev_feature_active(iface: &str, name: &str) -> std::io::Result<bool> {
    // struct ethtool_sset_info { cmd, reserved, u64 sset_mask, u32 data[1] }
    let mut info = [0u8; 20];
    info[..4].copy_from_slice(&ETHTOOL_GSSET_INFO.to_ne_bytes());
    info[8..16].copy_from_slice(&(1u64 << ETH_SS_FEATURES).to_ne_bytes());
    ethtool_ioctl(iface, info.as_mut_ptr())?;
    let count = u32_at(&info, 16) as usize;
    // struct ethtool_gstrings { cmd, string_set, len, u8 data[len * 32] }
    let mut strings = vec![0u8; 12 + count * ETH_GSTRING_LEN];
    strings[..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    strings[4..8].copy_from_slice(&ETH_SS_FEATURES.to_ne_bytes());
    strings[8..12].copy_from_slice(&u32::try_from(count).unwrap_or(0).to_ne_bytes());
    ethtool_ioctl(iface, strings.as_mut_ptr())?;
    let Some(bit) = strings[12..].chunks(ETH_GSTRING_LEN).position(|s| s.split(|b| *b == 0).next() == Some(name.as_bytes())) else {
        return Ok(false);
    };
    // struct ethtool_gfeatures { cmd, size, blocks[size] { available, requested, active, never_changed } }
    let blocks = count.div_ceil(32);
    let mut features = vec![0u8; 8 + blocks * 16];
    features[..4].copy_from_slice(&ETHTOOL_GFEATURES.to_ne_bytes());
    features[4..8].copy_from_slice(&u32::try_from(blocks).unwrap_or(0).to_ne_bytes());
    ethtool_ioctl(iface, features.as_mut_ptr())?;
    let active = u32_at(&features, 8 + (bit / 32) * 16 + 8);
    Ok(active & (1 << (bit % 32)) != 0)
}

/// Whether decrypted packets may reach the overlay program as
/// CHECKSUM_COMPLETE: only when `iface` decrypts ESP in hardware (software
/// decryption, esp_input(), leaves CHECKSUM_NONE). Unknown counts as yes.
#[must_use]
pub fn decrypted_may_be_csum_complete(iface: &str) -> bool {
    netdev_feature_active(iface, "esp-hw-offload").unwrap_or_else(|e| {
        warn!("cannot read {iface}'s features ({e}); assuming ESP hardware offload");
        true
    })
}

/// Whether GRO is on for `iface` (in the calling thread's namespace).
pub fn gro_enabled(iface: &str) -> std::io::Result<bool> {
    ethtool(iface, ETHTOOL_GGRO, 0).map(|v| v != 0)
}

/// Switches GRO on for `iface` (in the calling thread's namespace) if it is off.
pub fn enable_gro(iface: &str, changes: &mut OverlayChanges) -> Result<()> {
    let on = ethtool(iface, ETHTOOL_GGRO, 0).with_context(|| format!("cannot read GRO state of {iface}"))?;
    if on == 0 {
        ethtool(iface, ETHTOOL_SGRO, 1).with_context(|| format!("cannot enable GRO on {iface}"))?;
        info!("enabled GRO on {iface} (ESP GRO path)");
        changes.enabled_gro = true;
    }
    Ok(())
}

/// The nftables table name for an interface (by index: names may hold any byte).
#[must_use]
pub fn nft_table_name(ifindex: u32) -> String {
    format!("natfix_overlay_{ifindex}")
}

/// What `--csum-backend auto` attaches, and why. The nftables rule alone
/// repairs IPv4 on every path (fragments and non-GRO included) and costs
/// other traffic least (BENCHMARKS.md); the tc program is added only where
/// a zero checksum cannot do: IPv6, and an explicit recompute.
#[must_use]
pub fn auto_backend(recompute: bool, has_global_ipv6: bool) -> (crate::cli::CsumBackend, &'static str) {
    use crate::cli::CsumBackend;
    if recompute {
        (CsumBackend::Both, "--csum recompute needs the tc program; the nftables rule covers IPv4 packets that miss tc")
    } else if has_global_ipv6 {
        (CsumBackend::Both, "the interface has a global IPv6 address: IPv6 needs the tc program's recompute")
    } else {
        (CsumBackend::Nft, "IPv4 only: the nftables rule repairs every path at the least cost")
    }
}

/// Whether `iface` has a global-scope IPv6 address in the calling thread's
/// namespace (`/proc/net/if_inet6`: address, index, prefix, scope, flags, name).
#[must_use]
pub fn has_global_ipv6(iface: &str) -> bool {
    // thread-self: /proc/net follows the main thread's namespace, not this thread's.
    std::fs::read_to_string("/proc/thread-self/net/if_inet6").is_ok_and(|text| if_inet6_has_global(&text, iface))
}

fn if_inet6_has_global(text: &str, iface: &str) -> bool {
    text.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() == 6 && f[5] == iface && f[3] == "00"
    })
}

/// The ruleset, as nftables JSON: decrypted (secpath) UDP to the VXLAN ports
/// arriving on `iface` gets checksum 0, at prerouting priority mangle, where
/// the decrypted packet passes again (fragments included). With `reqid`,
/// only packets an SA with that reqid decrypted (`ipsec in reqid`).
#[must_use]
pub fn nft_ruleset(table: &str, iface: &str, ports: &[u16], reqid: Option<u32>) -> serde_json::Value {
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
            // Counts what the rule rewrites (read back by `nft_rule_counter`);
            // packets that fail a match above never reach it.
            { "counter": null },
            { "mangle": { "key": { "payload": { "protocol": "udp", "field": "checksum" } }, "value": 0 } }
        ] } } }
    ] })
}

fn nft_json(doc: &serde_json::Value) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        // /proc/self/fd/0, not `-` (/dev/stdin): minimal /dev trees (containers, initramfs) lack it.
        .args(["-j", "-f", "/proc/self/fd/0"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft (install nftables)")?;
    child.stdin.take().context("nft stdin")?.write_all(doc.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft rejected natfix's ruleset: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Installs the nftables fallback in the calling thread's namespace.
pub fn install_nft(ifindex: u32, iface: &str, ports: &[u16], reqid: Option<u32>, changes: &mut OverlayChanges) -> Result<()> {
    let table = nft_table_name(ifindex);
    // One transaction: add (no-op if present), delete, then the ruleset, so a
    // table left by a crashed natfix, or an upgrade, is replaced atomically.
    let mut doc = nft_ruleset(&table, iface, ports, reqid);
    if let Some(cmds) = doc["nftables"].as_array_mut() {
        cmds.insert(0, serde_json::json!({ "add": { "table": { "family": "ip", "name": table } } }));
        cmds.insert(1, serde_json::json!({ "delete": { "table": { "family": "ip", "name": table } } }));
    }
    nft_json(&doc)?;
    info!("installed nftables table ip {table}: decrypted IPv4 VXLAN gets UDP checksum 0");
    changes.nft_table = Some(table);
    Ok(())
}

/// Packets and bytes the rule of natfix's table set to checksum 0, summed over
/// the counters in `nft -j list table` output.
pub fn parse_nft_rule_counter(json: &str) -> Result<(u64, u64)> {
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

/// What the nftables rule of `table` rewrote so far; runs `nft` in the calling
/// thread's namespace.
pub fn nft_rule_counter(table: &str) -> Result<(u64, u64)> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "ip", table])
        .output()
        .context("cannot run nft (install nftables)")?;
    if !out.status.success() {
        bail!(
            "cannot read nftables table ip {table} (removed outside natfix? `natfix attach` again restores it): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_nft_rule_counter(&String::from_utf8_lossy(&out.stdout))
}

/// Undoes `changes`; runs in the attachment's namespace. Best effort: logs what it could not undo.
pub fn undo(iface: &str, changes: &OverlayChanges) {
    if let Some(table) = &changes.nft_table {
        let ok = Command::new("nft").args(["delete", "table", "ip", table]).output().is_ok_and(|o| o.status.success());
        if !ok {
            warn!("could not delete nftables table ip {table}");
        }
    }
    if changes.enabled_gro {
        if let Err(e) = ethtool(iface, ETHTOOL_SGRO, 0) {
            warn!("could not switch GRO back off on {iface}: {e}");
        }
    }
    for module in changes.loaded_modules.iter().rev() {
        // Fails harmlessly while something else uses the module.
        if !Command::new("modprobe").args(["-r", module]).output().is_ok_and(|o| o.status.success()) {
            warn!("left kernel module {module} loaded (in use)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_backend_adds_tc_only_for_recompute_or_ipv6() {
        assert_eq!(auto_backend(false, false).0, crate::cli::CsumBackend::Nft);
        assert_eq!(auto_backend(false, true).0, crate::cli::CsumBackend::Both);
        assert_eq!(auto_backend(true, false).0, crate::cli::CsumBackend::Both);
    }

    #[test]
    fn only_a_global_ipv6_address_of_the_interface_counts() {
        // Real /proc/net/if_inet6 lines: global on eth0, link-local on eth1, ::1 on lo.
        let text = "\
20010db8000000000000000000000001 02 40 00 80     eth0
fe800000000000000000000000000001 03 40 20 80     eth1
00000000000000000000000000000001 01 80 10 80       lo
";
        assert!(if_inet6_has_global(text, "eth0"));
        assert!(!if_inet6_has_global(text, "eth1"));
        assert!(!if_inet6_has_global(text, "lo"));
        assert!(!if_inet6_has_global(text, "eth00"));
        assert!(!if_inet6_has_global("", "eth0"));
    }


    #[test]
    fn reads_netdev_features_by_name() {
        // lo always has the loopback feature and never offloads ESP.
        assert!(netdev_feature_active("lo", "loopback").unwrap());
        assert!(!netdev_feature_active("lo", "esp-hw-offload").unwrap());
        assert!(!netdev_feature_active("lo", "no-such-feature").unwrap());
        assert!(netdev_feature_active("natfix-no-such-if", "loopback").is_err());
    }

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
        assert_eq!(parse_nft_rule_counter(json).unwrap(), (42, 6300));
        let without = json.replace(r#"{"counter": {"packets": 42, "bytes": 6300}},"#, "");
        assert!(format!("{:#}", parse_nft_rule_counter(&without).unwrap_err()).contains("no counter"));
        assert!(parse_nft_rule_counter("not json").is_err());
    }

    #[test]
    fn ruleset_json_carries_ports_and_iface_as_data() {
        let doc = nft_ruleset("natfix_overlay_7", "eth0\"; drop", &[4789, 7789], None);
        let rule = &doc["nftables"][2]["add"]["rule"];
        assert_eq!(rule["expr"][1]["match"]["right"], "eth0\"; drop", "names stay data, never syntax");
        assert_eq!(rule["expr"][2]["match"]["right"]["set"], serde_json::json!([4789, 7789]));
        assert!(rule["expr"][3]["counter"].is_null(), "an anonymous counter before the rewrite");
        assert_eq!(rule["expr"][4]["mangle"]["value"], 0);
        assert_eq!(doc["nftables"][1]["add"]["chain"]["prio"], -150);
        assert_eq!(rule["expr"][0]["match"]["left"]["meta"]["key"], "ipsec");
        let docker = nft_ruleset("t", "eth0", &[4789], Some(0x00D0_C4E3));
        let m = &docker["nftables"][2]["add"]["rule"]["expr"][0]["match"];
        assert_eq!((m["left"]["ipsec"]["key"].as_str(), m["right"].as_u64()), (Some("reqid"), Some(13_681_891)));
    }
}
