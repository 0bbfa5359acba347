//! `natfix diagnose`: inspects a live host for the problems natfix fixes and
//! says which command fixes each.
//!
//! The work is split in two so the judgement can be tested on fixtures:
//! [`gather`] reads the host (kernel features, and per network namespace
//! VXLAN devices, `/proc/net/snmp`, xfrm states, conntrack, NAT rules, GRO)
//! into plain [`Facts`], and [`analyze`] turns those facts into [`Finding`]s
//! without touching the system. The parsers of tool output (`ip`, `nft`,
//! `iptables-save`, `/proc`) are pure functions as well.
//!
//! # Checks
//!
//! | check                   | what it looks at |
//! |-------------------------|------------------|
//! | `kernel.btf`            | `/sys/kernel/btf/vmlinux` |
//! | `kernel.tcx`            | kernel >= 6.6 (tcx links) or clsact |
//! | `kernel.xdp`            | whether the kernel loads XDP programs |
//! | `kernel.ct-kfuncs`      | conntrack lookup kfuncs in vmlinux BTF |
//! | `kernel.esp-offload`    | `esp4_offload` loaded (`/sys/module`) or available (`modinfo`, `/lib/modules`) |
//! | `iface.gro`             | GRO of every interface of the namespace (`ETHTOOL_GGRO`) |
//! | `overlay.xfrm`          | xfrm states (`ip xfrm state`) with Docker's reqid 0xd0c4e3 |
//! | `overlay.vxlan-csum`    | VXLAN devices (target and Docker namespaces) that send UDP checksums |
//! | `overlay.csum-errors`   | `UdpInCsumErrors` rising over `--sample` seconds |
//! | `overlay.drop-reasons`  | `skb:kfree_skb` drop reasons over the sample (needs tracefs mounted) |
//! | `guard.unsolicited`     | conntrack entries created by unsolicited inbound UDP |
//! | `guard.port-moved`      | masqueraded flows whose source port NAT changed, and what held the port |
//! | `guard.random-fully`    | masquerade/SNAT rules that always randomise ports |
//! | `guard.published-ports` | DNAT'd (published) UDP ports, which a guard must exempt |
//! | `natfix.attachments`    | natfix's own attachments in the namespace, checked against the kernel: programs detached, interface gone, another program running before natfix's |
//! | `<group>.collect`       | a data source that could not be read (e.g. `guard.collect`) |
//!
//! # JSON (`--json`), schema version 1
//!
//! ```json
//! {"findings": [
//!   {"check": "guard.port-moved", "severity": "problem",
//!    "summary": "one line",
//!    "evidence": ["one fact per line", "..."],
//!    "fix": "natfix attach --iface ext --guard 25000-25999"}
//! ]}
//! ```
//! `severity` is `info`, `warning` or `problem`; `fix` is absent when no
//! natfix command fixes the finding; `trace` (on the port-moved and checksum
//! findings) is the `natfix trace` command that shows the problem packet by
//! packet. Findings come in the order of the table above; new checks and new
//! keys may be added, existing ones keep their meaning.
//!
//! # Exit codes
//!
//! * 0: no finding of severity `problem` (warnings do not change the code);
//! * 10 (`error::EXIT_PROBLEMS`): at least one `problem` finding; the report is printed in full first;
//! * otherwise natfix's usual error codes (1 internal, 3 namespace not found,
//!   4 missing privileges, ...) when diagnose itself cannot run.

mod analyze;
mod facts;
mod gather;
mod guard;
mod parse;
mod report;
#[cfg(test)]
mod tests;
mod trace_hint;
mod tracefs;

pub use analyze::analyze;
pub use guard::{CtAnalysis, MovedFlow, analyze_conntrack, guard_command, guard_range};
pub use facts::{AttachmentFacts, DropSample, Facts, KernelFacts, ModuleState, NsFacts};
pub use gather::gather;
pub use parse::{
    NatRules, Span, VxlanDev, XfrmState, parse_iptables_save, parse_nft_ruleset, parse_proc_udp, parse_route_dev, parse_snmp_udp,
    parse_vxlan_links, parse_xfrm_states,
};
pub use report::{Finding, Report, Severity, render_table};
pub use tracefs::{count_trace_reasons, parse_reason_symbols};
