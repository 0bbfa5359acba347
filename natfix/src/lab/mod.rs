//! `natfix lab`: throwaway namespaces that reproduce the seed failures and
//! show natfix fixing them. The end-to-end tests build the same topologies.

pub mod scratch;
pub mod topology;

use std::{process::Command, time::Duration};

use anyhow::{Context, Result};

use crate::{
    config::{AttachSpec, GuardSpec, IfaceSel, PortRange},
    loader::{self, AttachPlan},
    observe::stats,
};
use scratch::{ScratchNs, sock};
use topology::{CONTAINER_IP, GuardTopology, HOST_EXT_IF, HOST_IP, REMOTE_IP};

/// What one guard run observed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuardOutcome {
    /// The container's source port as the remote saw it (25000 means kept).
    pub seen_port: Option<u16>,
    /// The remote's reply reached the container.
    pub reply_delivered: bool,
}

/// The seed-000 sequence: remote probes host:25000, container then talks
/// from :25000 to the remote, the remote answers.
pub fn guard_sequence(t: &GuardTopology) -> Result<GuardOutcome> {
    t.remote_probe(25000, 7000)?;
    std::thread::sleep(Duration::from_millis(50));
    let seen = t.container_flow_source(25000)?;
    let rx = t.container.recv_udp(sock(CONTAINER_IP, 25000), Duration::from_millis(600));
    // The container's socket above is closed; this one receives the reply.
    let rx = rx?;
    if let Some(src) = seen {
        t.remote.send_udp(sock(REMOTE_IP, 7000), sock(HOST_IP, src.port()), 1)?;
    }
    let got = rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(GuardOutcome { seen_port: seen.map(|s| s.port()), reply_delivered: !got.is_empty() })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "BROKEN" }
}

/// `natfix lab --scenario guard`.
pub fn run_guard_lab() -> Result<bool> {
    println!("== seed 000: unsolicited UDP steals a container's NAT port ==");
    println!("   container {CONTAINER_IP} -> host {HOST_IP} (masquerade) -> remote {REMOTE_IP}");
    let t = GuardTopology::build("natfix-lab")?;
    let before = guard_sequence(&t)?;
    println!(
        "   without natfix: remote probed host:25000 first; the container's flow from :25000 left as :{} ({})",
        before.seen_port.map_or_else(|| "nothing".into(), |p| p.to_string()),
        if before.seen_port == Some(25000) { "kept: the problem did not reproduce" } else { "port stolen, hole punching breaks" }
    );

    // The host now suffers: the probe's entry holds :25000. Only the
    // container's remapped flow goes (a live one keeps its port until it
    // idles out); natfix's attach must delete the probe's entry itself.
    t.host.exec(&["conntrack", "-D", "-p", "udp", "-s", CONTAINER_IP]).ok();
    let spec = AttachSpec {
        iface: IfaceSel::Name(HOST_EXT_IF.parse().map_err(anyhow::Error::msg)?),
        netns: None,
        guard: Some(GuardSpec { ranges: vec![PortRange { first: 20000, last: 30000 }], ..GuardSpec::default() }),
        overlay: None,
        events_per_sec: crate::config::DEFAULT_EVENTS_PER_SEC,
    };
    let plan = AttachPlan::new(&spec, t.host.netns()?, false, false)?;
    if let Some(g) = &plan.guard {
        println!("   attaching natfix: guard 20000-30000 on {HOST_EXT_IF}, flow source {} ({})", g.source.name(), g.source_reason);
    }
    let att = loader::attach(plan)?;
    let reaped = att.meta.guard.as_ref().map_or(0, |g| g.reaped);
    println!("   natfix deleted {reaped} conntrack entries that unsolicited UDP left on guarded ports (they held the port)");
    let after = guard_sequence(&t);
    let counters = stats::read_counters(&att.pin_dir, &att.meta);
    att.detach()?;
    let after = after?;
    let fixed = after.seen_port == Some(25000) && after.reply_delivered && reaped > 0;
    println!(
        "   with natfix: the container's flow left as :{}, the remote's reply {} the container ({})",
        after.seen_port.map_or_else(|| "nothing".into(), |p| p.to_string()),
        if after.reply_delivered { "reached" } else { "did not reach" },
        verdict(fixed)
    );
    for row in counters?.iter().filter(|r| r.packets > 0) {
        println!("     counter {:<6} {:<20} {}", row.program.name(), row.reason, row.packets);
    }
    Ok(fixed && before.seen_port != Some(25000))
}

/// The overlay scenario scripts, shared with the qemu VM (tests/vm/).
const ESP_NAT_SH: &str = include_str!("../../../tests/vm/esp-nat.sh");
const LIB_SH: &str = include_str!("../../../tests/vm/lib.sh");

/// Can this kernel build an ESP SA with Docker's AEAD? Tried in a throwaway namespace.
fn kernel_has_esp() -> Result<bool> {
    let ns = ScratchNs::create("natfix-lab-esp-probe")?;
    Ok(ns
        .exec(&[
            "ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x100",
            "mode", "transport", "aead", "rfc4106(gcm(aes))", "0x000102030405060708090a0b0c0d0e0f10111213", "64",
        ])
        .is_ok())
}

/// `natfix lab --scenario overlay`: runs the VM's scenario script natively
/// when the kernel has ESP, inside a private mount namespace (its own
/// /run/netns and bpffs), so it cannot touch the host's namespaces or pins.
/// None: the kernel has no ESP, nothing was run.
pub fn run_overlay_lab() -> Result<Option<bool>> {
    println!("== seed 001: encrypted overlay (VXLAN in ESP) through 1:1 NAT ==");
    if !kernel_has_esp()? {
        println!("   this kernel cannot run ESP with rfc4106(gcm(aes)) (no xfrm/ESP crypto): the scenario needs it.");
        println!("   run it in a VM instead: `cargo xtask vm --scenario esp-nat --mode baseline,natfix-auto`");
        println!("   (boots a Debian 6.1 kernel in qemu; `cargo xtask lab` does it for you)");
        return Ok(None);
    }
    let dir = std::env::temp_dir().join(format!("natfix-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("esp-nat.sh"), ESP_NAT_SH)?;
    std::fs::write(dir.join("lib.sh"), LIB_SH)?;
    let exe = std::env::current_exe()?;
    let path = format!(
        "{}:{}",
        exe.parent().map_or_else(String::new, |p| p.display().to_string()),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mkdir -p /run/netns && mount -t tmpfs lab /run/netns && mount -t bpf bpf /sys/fs/bpf && exec sh \"$0\"/esp-nat.sh baseline,natfix-auto")
        .arg(&dir)
        .env("SCENARIO_DIR", &dir)
        .env("PATH", path)
        .env("GRO", "1")
        .output()
        .context("cannot run the overlay scenario")?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let results: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("the scenario printed no result: {}", String::from_utf8_lossy(&out.stderr)))?;
    let replies = |m: &serde_json::Value, dir: &str| -> (i64, i64) {
        let get = |size: &str, k: &str| m[dir][size][k].as_i64().unwrap_or(0);
        (get("small", "received") + get("large", "received"), get("small", "sent") + get("large", "sent"))
    };
    let mut ok = true;
    for m in results.as_array().into_iter().flatten() {
        let (ab, ab_sent) = replies(m, "a_to_b");
        let (ba, ba_sent) = replies(m, "b_to_a");
        let mode = m["mode"].as_str().unwrap_or("?");
        println!("   {mode:<12} overlay pings A->B {ab}/{ab_sent}, B->A {ba}/{ba_sent}");
        ok &= match mode {
            "baseline" => ab == 0 && ba == 0,
            _ => ab == ab_sent && ba == ba_sent && ab_sent > 0,
        };
    }
    println!("   {}", if ok { "reproduced without natfix, fixed with `natfix attach --overlay-fix` (ok)" } else { "BROKEN" });
    Ok(Some(ok))
}
