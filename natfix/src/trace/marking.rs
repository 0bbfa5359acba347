//! The nftables table that marks the filter's packets for tracing
//! (`meta nftrace set 1`), one per traced namespace: the kernel clears the
//! mark whenever a packet crosses into another namespace.
//!
//! ```text
//! table inet natfix_trace_<pid> {                  # flags owner
//!   chain pre { prerouting P: FILTER's rules; learned flows;
//!               ct direction reply jump ct_reply; ct status dnat jump ct_dnat }
//!   chain out { output P: the same }
//!   chain ct_reply { replies of flows whose original tuple matches FILTER }
//!   chain ct_dnat  { DNAT'd requests whose translated (reply) tuple matches }
//! }
//! ```
//! One base chain per hook, and each rule fails on its first or second
//! expression for other traffic: what every packet of the namespace pays.
//! The conntrack rules exist only where conntrack already runs (natfix would
//! otherwise turn it on for every packet there), and need P = -151 (after
//! conntrack, before mangle and DNAT); elsewhere P = -350 (after
//! defragmentation, before raw), so every other chain of the hook is traced.
//! In a namespace with conntrack, rules of priority below -151 (the raw
//! table) are not traced: a drop there still shows, with its drop reason.
//!
//! The table is made by an `nft -i` child that natfix holds by its stdin:
//! `flags owner` ties the table to that nft's netlink socket, so the kernel
//! deletes it when the child exits, which it does when natfix exits or is
//! killed (its stdin closes). A second `natfix trace` has its own table.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Child, ChildStdin, Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{filter::Filter, tuple::Tuple};

/// Prefix of every marking table (traces hide their chains).
pub const TABLE_PREFIX: &str = "natfix_trace_";

/// What one namespace's table marks.
#[derive(Debug, Clone)]
pub struct MarkPlan {
    pub table: String,
    pub packet_rules: Vec<String>,
    /// Rules on the conntrack entry's original tuple (for replies) and its
    /// reply tuple (for DNAT'd requests); empty where conntrack does not run.
    pub ct_original: Vec<String>,
    pub ct_reply: Vec<String>,
    /// `--iface`: only packets entering (prerouting) or leaving (output) through it.
    pub iface: Option<String>,
}

impl MarkPlan {
    #[must_use]
    pub fn new(filter: &Filter, iface: Option<&str>, with_ct: bool) -> Self {
        // With --iface, flows are followed from what was traced on it (learned flows), not by FILTER.
        let ct = with_ct && iface.is_none();
        Self {
            table: format!("{TABLE_PREFIX}{}", std::process::id()),
            packet_rules: filter.nft_packet_rules(),
            ct_original: if ct { filter.nft_ct_rules("original") } else { Vec::new() },
            ct_reply: if ct { filter.nft_ct_rules("reply") } else { Vec::new() },
            iface: iface.map(str::to_owned),
        }
    }

    /// The base chains' priority (see the module documentation).
    #[must_use]
    pub fn priority(&self) -> i32 {
        if self.ct_original.is_empty() { -350 } else { -151 }
    }

    /// The nft commands that build the table, one per line.
    #[must_use]
    pub fn script(&self) -> String {
        let t = format!("inet {}", self.table);
        let mut s = String::new();
        let _ = writeln!(s, "add table {t} {{ flags owner; }}");
        for (chain, rules) in [("ct_reply", &self.ct_original), ("ct_dnat", &self.ct_reply)] {
            if !rules.is_empty() {
                let _ = writeln!(s, "add chain {t} {chain}");
                for r in rules {
                    let _ = writeln!(s, "add rule {t} {chain} {r} meta nftrace set 1");
                }
            }
        }
        let quoted = |i: &str| format!("\"{}\"", i.replace('"', ""));
        for (chain, hook, dev) in [("pre", "prerouting", "iifname"), ("out", "output", "oifname")] {
            let _ = writeln!(s, "add chain {t} {chain} {{ type filter hook {hook} priority {}; }}", self.priority());
            let dev = self.iface.as_deref().map_or(String::new(), |i| format!("{dev} {} ", quoted(i)));
            for r in &self.packet_rules {
                let _ = writeln!(s, "add rule {t} {chain} {dev}{r} meta nftrace set 1");
            }
            if !self.ct_original.is_empty() {
                let _ = writeln!(s, "add rule {t} {chain} ct direction reply jump ct_reply");
                let _ = writeln!(s, "add rule {t} {chain} ct status dnat jump ct_dnat");
            }
        }
        let _ = writeln!(s, "add set {t} flows4 {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service; }}");
        let _ = writeln!(s, "add set {t} flows6 {{ type ipv6_addr . inet_proto . inet_service . ipv6_addr . inet_service; }}");
        s
    }
}

/// The installed table; dropping it removes the table.
pub struct MarkTable {
    child: Child,
    stdin: Option<ChildStdin>,
    table: String,
    flow_rules: [bool; 2],
}

impl MarkTable {
    /// Installs `plan` in the calling thread's namespace.
    pub fn install(plan: &MarkPlan) -> Result<Self> {
        let script = plan.script();
        // Checked first in one go, for one clear error; `nft -i` only prints errors.
        check(&script)?;
        let mut child = Command::new("nft")
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run nft (install nftables)")?;
        let stdin = child.stdin.take().context("nft stdin")?;
        let mut table = Self { child, stdin: Some(stdin), table: plan.table.clone(), flow_rules: [false; 2] };
        table.send(&script)?;
        table.wait_for_table(&plan.table)?;
        Ok(table)
    }

    fn send(&mut self, commands: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("the marking table is gone")?;
        stdin.write_all(commands.as_bytes()).and_then(|()| stdin.flush()).context("the nft holding the marking table exited")
    }

    /// nft applies what it reads line by line: wait until the last set exists.
    fn wait_for_table(&mut self, name: &str) -> Result<()> {
        for _ in 0..200 {
            let out = Command::new("nft").args(["list", "set", "inet", name, "flows6"]).output()?;
            if out.status.success() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("nft exited ({status}) before the marking table was made");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        bail!("the marking table inet {name} did not appear within 2 s")
    }

    /// Marks the packets of these exact tuples too (a flow's NAT'd forms,
    /// learned from conntrack in another namespace). TCP/UDP/SCTP only.
    pub fn add_flows(&mut self, tuples: &[Tuple]) -> Result<()> {
        let mut cmds = String::new();
        let t = format!("inet {}", self.table);
        for tuple in tuples.iter().filter(|t| t.has_ports()) {
            let (v, set, fam) = if tuple.src.is_ipv4() { (0, "flows4", "ip") } else { (1, "flows6", "ip6") };
            if !self.flow_rules[v] {
                for chain in ["pre", "out"] {
                    let _ = writeln!(
                        cmds,
                        "add rule {t} {chain} {fam} saddr . meta l4proto . th sport . {fam} daddr . th dport @{set} meta nftrace set 1"
                    );
                }
                self.flow_rules[v] = true;
            }
            let _ = writeln!(
                cmds,
                "add element {t} {set} {{ {} . {} . {} . {} . {} }}",
                tuple.src, tuple.proto, tuple.sport, tuple.dst, tuple.dport
            );
        }
        if cmds.is_empty() { Ok(()) } else { self.send(&cmds) }
    }
}

impl Drop for MarkTable {
    fn drop(&mut self) {
        // EOF ends nft; its socket closes and the kernel deletes the owner table.
        drop(self.stdin.take());
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < end {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nft -c -f -`: the script is valid (checked against this namespace's
/// kernel, nothing committed).
fn check(script: &str) -> Result<()> {
    // `flags owner` needs the process to stay: drop it for the check.
    let script = script.replace(" { flags owner; }", "");
    let mut child = Command::new("nft")
        .args(["-c", "-f", "/proc/self/fd/0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (install nftables)")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| l.contains("Error")).unwrap_or("nft refused the marking table");
        bail!("nft refused the trace's marking table: {}", first.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_marks_the_filter_in_both_hooks() {
        let f = Filter::parse("udp and port 1812").unwrap();
        let s = MarkPlan { table: "natfix_trace_1".into(), ..MarkPlan::new(&f, None, true) }.script();
        assert!(s.starts_with("add table inet natfix_trace_1 { flags owner; }\n"));
        assert!(s.contains("add chain inet natfix_trace_1 pre { type filter hook prerouting priority -151; }"));
        assert!(s.contains("add rule inet natfix_trace_1 out meta l4proto udp th dport 1812 meta nftrace set 1"));
        assert!(s.contains("add rule inet natfix_trace_1 pre ct direction reply jump ct_reply"));
        assert!(s.contains("add rule inet natfix_trace_1 ct_reply meta l4proto udp ct original proto-src 1812 meta nftrace set 1"));
        assert!(s.contains("add rule inet natfix_trace_1 ct_dnat meta l4proto udp ct reply proto-dst 1812 meta nftrace set 1"));
        // The jump targets exist before the jumps.
        assert!(s.find("add chain inet natfix_trace_1 ct_reply").unwrap() < s.find("jump ct_reply").unwrap());
        let s = MarkPlan::new(&f, Some("eth0"), true).script();
        assert!(s.contains("pre iifname \"eth0\" meta l4proto udp th sport 1812"));
        assert!(s.contains("out oifname \"eth0\" meta l4proto udp"));
        assert!(!s.contains("ct_reply"), "--iface follows learned flows only");
        let bare = MarkPlan::new(&f, None, false);
        assert_eq!(bare.priority(), -350);
        assert!(!bare.script().contains("ct "));
    }
}
