//! The command line: clap structs, and their conversion into the `config`
//! types the commands take. The only module that knows clap.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::PossibleValue};

use crate::config::{
    AttachSpec, Cidr, CsumBackend, CsumMode, DEFAULT_EVENTS_PER_SEC, DEFAULT_TRACE_COUNT, DEFAULT_TRACE_TIMEOUT_SECS, Delta,
    Filtering, FlowSource, GuardHook, GuardSpec, IfaceName, IfaceSel, OverlaySpec, Port, PortRange, SettingsChange, TraceSpec,
    XdpMode, parse_port_range,
};

#[derive(Debug, Parser)]
#[command(
    name = "natfix",
    // The commit too (natfix/build.rs): which build a node runs.
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NATFIX_COMMIT"), ")"),
    about = "eBPF data-plane fixes for container hosts behind NAT"
)]
pub struct Cli {
    /// Log filter, e.g. `debug` or `natfix=trace` [default: RUST_LOG, else info].
    #[expect(clippy::doc_markdown, reason = "clap shows this doc verbatim as --help text")]
    #[arg(long, global = true, env = "NATFIX_LOG")]
    pub log: Option<String>,
    /// More log: -v debug, -vv trace (over --log).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Less log: -q warnings and errors only, -qq errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// Log lines as text, or one JSON object each (for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach natfix to an interface; stays in the foreground until SIGINT/SIGTERM unless --pin.
    Attach(AttachArgs),
    /// Remove an attachment (pinned, or owned by a running `natfix attach`).
    Detach(TargetArgs),
    /// List every natfix attachment on this host.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the per-reason packet counters of attachments.
    Stats(StatsArgs),
    /// Build throwaway namespaces that reproduce the NAT problems and show natfix fixing them.
    Lab(LabArgs),
    /// Inspect this host for the problems natfix fixes, and say which command fixes each.
    Diagnose(DiagnoseArgs),
    /// Stream sampled drop and rewrite events of attachments (like `cilium monitor`).
    Monitor(MonitorArgs),
    /// Change a running or pinned attachment's settings in place (no reload: counters and flows stay).
    Set(SetArgs),
    /// Delete the conntrack entries unsolicited UDP already created to guarded ports (attach does it too).
    Reap(ReapArgs),
    /// Run the node agent: keep the attachments a config file lists, follow Docker, serve metrics.
    Agent {
        /// The config file (TOML; keys are `attach`'s options; see README "Deploy").
        #[arg(long, default_value = crate::agent::config::DEFAULT_PATH)]
        config: std::path::PathBuf,
    },
    /// Ask a running agent whether it is healthy (exit 0) or not (exit 1): for container health checks.
    Health {
        /// The agent's `metrics` address.
        #[arg(long, default_value = crate::commands::health::DEFAULT_ADDR)]
        addr: std::net::SocketAddr,
    },
    /// Print a shell completion script (e.g. `natfix completions bash > /etc/bash_completion.d/natfix`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): natfix(1), or a command's, e.g. `natfix man attach | man -l -`.
    Man {
        /// The command whose page to print (natfix-COMMAND(1)).
        command: Option<String>,
    },
    /// Follow packets matching FILTER, and their replies, hook by hook through every traced namespace.
    Trace(TraceArgs),
}

/// The command line's definition, for what renders it (completions, man pages).
#[must_use]
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Clone, Args)]
pub struct ReapArgs {
    /// Network namespace (same forms as for attach). Default: natfix's own.
    #[arg(long)]
    pub netns: Option<String>,
    /// Only this interface's guard; with --guard, the interface outsiders arrive by (default: the default route's).
    #[arg(long, value_parser = parse_iface)]
    pub iface: Option<IfaceName>,
    /// Reap these port ranges instead of each attached guard's (repeatable).
    #[arg(long = "guard", value_name = "RANGE", value_parser = parse_port_range)]
    pub ranges: Vec<PortRange>,
    /// With --guard: a published port whose entries stay (repeatable).
    #[arg(long = "allow-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..), requires = "ranges")]
    pub allow_ports: Vec<u16>,
    /// With --guard: a trusted source prefix whose entries stay (repeatable).
    #[arg(long = "allow-src", value_name = "CIDR", requires = "ranges")]
    pub allow_src: Vec<Cidr>,
    /// List what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SetArgs {
    /// Interface, as named inside the namespace.
    #[arg(long, value_parser = parse_iface)]
    pub iface: IfaceName,
    /// Network namespace (same forms as for attach). Default: natfix's own.
    #[arg(long)]
    pub netns: Option<String>,
    /// Guard exactly these ranges (repeatable; replaces the ranges in force).
    #[arg(long = "guard", value_name = "RANGE", value_parser = parse_port_range)]
    pub ranges: Vec<PortRange>,
    /// Exempt a published port (`+P` or `P`), or stop exempting it (`-P`). Repeatable.
    #[arg(long = "allow-port", value_name = "[+|-]PORT", allow_hyphen_values = true)]
    pub allow_ports: Vec<Delta<Port>>,
    /// Let a source prefix's unsolicited UDP through (`+CIDR`), or stop (`-CIDR`). Repeatable.
    #[arg(long = "allow-src", value_name = "[+|-]CIDR", allow_hyphen_values = true)]
    pub allow_src: Vec<Delta<Cidr>>,
    /// Count what would be dropped and drop nothing (on), or drop (off).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub dry_run: Option<bool>,
    /// Own flow table: idle time after which a flow stops admitting replies (seconds).
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    pub flow_timeout: Option<Duration>,
    /// Sampled events per CPU per second (0: none).
    #[arg(long, value_name = "N")]
    pub events_rate: Option<u32>,
    /// The overlay fix's VXLAN ports (repeatable; replaces the ports in force), or `auto`.
    #[arg(long = "vxlan-port", value_name = "PORT|auto", value_parser = parse_vxlan_port)]
    pub vxlan_ports: Vec<VxlanPort>,
    /// Only packets decrypted by SAs with this reqid; `any` to match every SA again.
    #[arg(long, value_name = "REQID|any", value_parser = parse_reqid_or_any)]
    pub reqid: Option<Option<u32>>,
    /// Keep conntrack entries unsolicited UDP made to ports this change guards (default: delete them).
    #[arg(long)]
    pub no_reap: bool,
    /// Print the record in force afterwards as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// One `--vxlan-port` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VxlanPort {
    Auto,
    Port(u16),
}

fn parse_vxlan_port(s: &str) -> Result<VxlanPort, String> {
    if s == "auto" {
        return Ok(VxlanPort::Auto);
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{s}` is neither a port (1-65535) nor `auto`")),
        Ok(p) => Ok(VxlanPort::Port(p)),
    }
}

/// The ports named; empty for `auto` (which stands alone).
fn vxlan_ports(args: &[VxlanPort]) -> Result<Vec<u16>, String> {
    let ports: Vec<u16> = args.iter().filter_map(|a| if let VxlanPort::Port(p) = a { Some(*p) } else { None }).collect();
    if args.contains(&VxlanPort::Auto) && !ports.is_empty() {
        return Err("--vxlan-port auto cannot be combined with port numbers".into());
    }
    Ok(ports)
}

impl SetArgs {
    pub fn change(&self) -> Result<SettingsChange, String> {
        Ok(SettingsChange {
            ranges: (!self.ranges.is_empty()).then(|| self.ranges.clone()),
            allow_ports: self.allow_ports.clone(),
            allow_src: self.allow_src.clone(),
            dry_run: self.dry_run,
            flow_timeout: self.flow_timeout,
            events_per_sec: self.events_rate,
            vxlan_ports: if self.vxlan_ports.is_empty() { None } else { Some(vxlan_ports(&self.vxlan_ports)?) },
            reqid: self.reqid,
            no_reap: self.no_reap,
        })
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("`{s}` is not on or off")),
    }
}

fn parse_reqid_or_any(s: &str) -> Result<Option<u32>, String> {
    if s == "any" { Ok(None) } else { parse_u32_any_base(s).map(Some) }

}

#[derive(Debug, Clone, Args)]
#[command(after_help = TRACE_HELP)]
pub struct TraceArgs {
    /// Trace in this namespace (repeatable; the forms of attach's --netns, `self` for natfix's own).
    /// Default: natfix's own, every Docker namespace and every `ip netns` namespace.
    #[arg(long)]
    pub netns: Vec<String>,
    /// Only packets entering or leaving a traced namespace through this interface start a trace.
    #[arg(long, value_parser = parse_iface)]
    pub iface: Option<IfaceName>,
    /// Stop after N packets (their replies not counted).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TRACE_COUNT, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Stop after S seconds.
    #[arg(long, value_name = "S", default_value_t = DEFAULT_TRACE_TIMEOUT_SECS, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// One JSON object per step (schema in the README).
    #[arg(long)]
    pub json: bool,
    /// Which packets, pcap-filter style, e.g. `udp and port 1812` (see below).
    #[arg(value_name = "FILTER", required = true, num_args = 1..)]
    pub filter: Vec<String>,
}

const TRACE_HELP: &str = "FILTER: primitives joined by `and` (or `&&`): udp, tcp, sctp, icmp, icmp6, ip, ip6, \
[src|dst] host ADDR, [src|dst] net CIDR, [src|dst] port N (IPv4 or IPv6); at most 3 primitives without src/dst. \
Not supported: or, not, parentheses, portrange, ether, vlan.

Prints, per packet and its reply: natfix's verdicts, every nftables/iptables-nft rule that matched (nftables \
tracing), conntrack's entry, NAT mapping and de-NAT, the routing decision, and where it ended (sent out of a \
device, delivered to a socket, or dropped with the kernel's drop reason). Exit codes: 0 traced, 2 bad usage, \
3 no packet matched before --timeout (or an unknown namespace or interface), 4 missing privileges, 5 the \
kernel lacks a feature (BTF, tracepoints, nftables tracing).";

impl TraceArgs {
    #[must_use]
    pub fn spec(&self) -> TraceSpec {
        TraceSpec {
            filter: self.filter.join(" "),
            netns: self.netns.clone(),
            iface: self.iface.clone(),
            count: self.count,
            timeout: Duration::from_secs(self.timeout),
            json: self.json,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MonitorArgs {
    /// Only this interface.
    #[arg(long, value_parser = parse_iface)]
    pub iface: Option<IfaceName>,
    /// Only attachments in this namespace (same forms as for attach).
    #[arg(long)]
    pub netns: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    /// Namespace to inspect (same forms as for attach). Default: natfix's own.
    #[arg(long)]
    pub netns: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Seconds to watch rising counters (UdpInCsumErrors, drops).
    #[expect(clippy::doc_markdown, reason = "clap shows this doc verbatim as --help text")]
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_positive_secs)]
    pub sample: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Interface, as named inside the namespace.
    #[arg(long, value_parser = parse_iface)]
    pub iface: IfaceName,
    /// Network namespace: a name under /var/run/docker/netns (or `ingress`), a name under
    /// /run/netns, an absolute path, or pid:N. Default: natfix's own namespace.
    #[arg(long)]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Only this interface.
    #[arg(long, value_parser = parse_iface)]
    pub iface: Option<IfaceName>,
    /// Only attachments in this namespace (same forms as for attach).
    #[arg(long)]
    pub netns: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Print again every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    pub watch: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct LabArgs {
    /// Which seed problem to reproduce and fix.
    #[arg(long, value_enum, default_value_t = LabScenario::All)]
    pub scenario: LabScenario,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LabScenario {
    /// Seed 000: unsolicited UDP steals a container's NAT port.
    Guard,
    /// Seed 001: encrypted overlay through 1:1 NAT.
    Overlay,
    All,
}

#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// Interface, as named inside the namespace; `auto`: the interface of the default route.
    #[arg(long, value_parser = parse_iface_sel)]
    pub iface: IfaceSel,
    /// Network namespace: a name under /var/run/docker/netns (or `ingress`), a name under
    /// /run/netns, an absolute path, or pid:N. Default: natfix's own namespace.
    #[arg(long)]
    pub netns: Option<String>,

    /// Pin programs, links and maps under /sys/fs/bpf/natfix and exit, leaving them attached.
    #[arg(long)]
    pub pin: bool,

    /// With --pin: upgrade an existing pinned attachment in place (atomic program swap; counters and flows kept).
    #[arg(long, requires = "pin")]
    pub replace: bool,

    /// Sampled drop/rewrite events per CPU per second for `natfix monitor` (0: none);
    /// rewrites are sampled first (the first on each CPU, then every 64th).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_EVENTS_PER_SEC)]
    pub events_rate: u32,

    /// Log the sampled events (the ring buffer has one reader: this or `natfix monitor`).
    #[arg(long, conflicts_with = "pin")]
    pub log_events: bool,

    /// Serve Prometheus metrics on http://ADDR/metrics while attached (e.g. 127.0.0.1:9477).
    #[expect(clippy::doc_markdown, reason = "clap shows this doc verbatim as --help text")]
    #[arg(long, value_name = "ADDR", conflicts_with = "pin")]
    pub metrics: Option<SocketAddr>,

    #[command(flatten)]
    pub guard: GuardArgs,

    #[command(flatten)]
    pub overlay: OverlayArgs,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Unsolicited-UDP guard")]
pub struct GuardArgs {
    /// Guard these destination ports: `20000-30000` or `5000` (repeatable, up to 64).
    #[arg(long = "guard", value_name = "RANGE", value_parser = parse_port_range)]
    pub ranges: Vec<PortRange>,
    /// Where the guard runs.
    #[arg(long, value_enum, default_value_t = GuardHook::Xdp)]
    pub guard_hook: GuardHook,
    /// XDP attach mode [default: auto] (with --guard-hook xdp).
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpMode>,
    /// How the guard knows which flows are solicited.
    #[arg(long, value_enum, default_value_t = FlowSource::Auto)]
    pub flow_source: FlowSource,
    /// Filtering of the own flow table.
    #[arg(long, value_enum, default_value_t = Filtering::PortRestricted)]
    pub filtering: Filtering,
    /// Idle time after which an own-table flow stops admitting replies, seconds [default: 180].
    #[arg(long, value_name = "SECS", value_parser = parse_positive_secs)]
    pub flow_timeout: Option<Duration>,
    /// Capacity of the own flow table (LRU) [default: 65536].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub flow_table_size: Option<u32>,
    /// Published (DNAT'd) UDP port that accepts new flows (repeatable).
    #[arg(long = "allow-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub allow_ports: Vec<u16>,
    /// Source prefix whose unsolicited UDP is let through (repeatable), e.g. 10.0.0.0/8.
    #[arg(long = "allow-src", value_name = "CIDR", value_parser = parse_cidr)]
    pub allow_src: Vec<Cidr>,
    /// Count what would be dropped; drop nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the conntrack entries unsolicited UDP created before attach (by default they are deleted).
    #[arg(long)]
    pub no_reap: bool,
    /// Guard published UDP ports too (by default the ports Docker publishes and the namespace DNATs take new flows).
    #[arg(long)]
    pub no_allow_published: bool,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Encrypted-overlay checksum fix")]
pub struct OverlayArgs {
    /// Repair the UDP checksum of decrypted VXLAN (encrypted overlay behind 1:1 NAT).
    #[arg(long)]
    pub overlay_fix: bool,
    /// VXLAN UDP port (repeatable, up to 8), or `auto` (default): the ports of
    /// the VXLAN devices on the host and in Docker's namespaces, else 4789.
    #[arg(long = "vxlan-port", value_name = "PORT|auto", value_parser = parse_vxlan_port)]
    pub vxlan_ports: Vec<VxlanPort>,
    /// Only packets decrypted by SAs with this reqid (Docker uses 0xD0C4E3).
    #[arg(long, value_name = "REQID", value_parser = parse_u32_any_base)]
    pub reqid: Option<u32>,
    /// How the checksum is repaired.
    #[arg(long, value_enum, default_value_t = CsumMode::Zero)]
    pub csum: CsumMode,
    /// Which mechanism repairs it.
    #[arg(long, value_enum, default_value_t = CsumBackend::Auto)]
    pub csum_backend: CsumBackend,
}

impl Cli {
    /// The log filter: -v/-q, else --log (or `NATFIX_LOG`), else `RUST_LOG`, else info.
    #[must_use]
    pub fn log_filter(&self) -> String {
        match (self.verbose, self.quiet) {
            (0, 0) => self.log.clone().or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".into()),
            (1, _) => "debug".into(),
            (v, _) if v >= 2 => "trace".into(),
            (_, 1) => "warn".into(),
            _ => "error".into(),
        }
    }
}

impl GuardArgs {
    /// The guard's spec; None when no range was given (the guard is off).
    #[must_use]
    pub fn spec(&self) -> Option<GuardSpec> {
        (!self.ranges.is_empty()).then(|| GuardSpec {
            ranges: self.ranges.clone(),
            hook: self.guard_hook,
            xdp_mode: self.xdp_mode,
            flow_source: self.flow_source,
            filtering: self.filtering,
            flow_timeout: self.flow_timeout,
            flow_table_size: self.flow_table_size,
            allow_ports: self.allow_ports.clone(),
            allow_src: self.allow_src.clone(),
            dry_run: self.dry_run,
            no_reap: self.no_reap,
            no_allow_published: self.no_allow_published,
        })
    }
}

impl OverlayArgs {
    /// The overlay fix's spec; None without --overlay-fix. Its options
    /// without the flag are refused rather than ignored.
    pub fn spec(&self) -> Result<Option<OverlaySpec>, String> {
        let touched = !self.vxlan_ports.is_empty()
            || self.reqid.is_some()
            || self.csum != CsumMode::Zero
            || self.csum_backend != CsumBackend::Auto;
        if !self.overlay_fix {
            return if touched { Err("--vxlan-port, --reqid, --csum and --csum-backend need --overlay-fix".into()) } else { Ok(None) };
        }
        Ok(Some(OverlaySpec {
            vxlan_ports: vxlan_ports(&self.vxlan_ports)?,
            reqid: self.reqid,
            csum: self.csum,
            backend: self.csum_backend,
        }))
    }
}

impl AttachArgs {
    /// The attachment asked for, validated.
    pub fn spec(&self) -> Result<AttachSpec, String> {
        let spec = AttachSpec {
            iface: self.iface.clone(),
            netns: self.netns.clone(),
            guard: self.guard.spec(),
            overlay: self.overlay.spec()?,
            events_per_sec: self.events_rate,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// `0xD0C4E3` or `13681891`.
fn parse_u32_any_base(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("`{s}` is not a number (decimal or 0x-hex)"))
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
}

fn parse_iface(s: &str) -> Result<IfaceName, String> {
    s.parse()
}

fn parse_iface_sel(s: &str) -> Result<IfaceSel, String> {
    s.parse()
}

fn parse_positive_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

/// `ValueEnum` for the config enums: their names and help come from one
/// table here, the enums themselves stay free of clap.
macro_rules! value_enum {
    ($ty:ty { $($variant:ident => $name:literal: $help:literal),+ $(,)? }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$ty>::$variant),+]
            }
            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(match self {
                    $(<$ty>::$variant => PossibleValue::new($name).help($help)),+
                })
            }
        }
    };
}

value_enum!(GuardHook {
    Xdp => "xdp": "XDP, native mode; tc ingress where the driver has none (see --xdp-mode)",
    Tc => "tc": "tc ingress (tcx on kernels >= 6.6, clsact below)",
});
value_enum!(XdpMode {
    Auto => "auto": "Native; where that fails (no driver support, MTU, another program), tc ingress with a warning",
    Native => "native": "Native or an error",
    Generic => "generic": "Generic (skb) XDP: runs later than native and turns GRO off on the device",
});
value_enum!(FlowSource {
    Auto => "auto": "conntrack kfunc where the kernel has it, else own",
    Own => "own": "natfix's own flow table, learned on egress and seeded from conntrack",
    Conntrack => "conntrack": "The kernel's conntrack table via the bpf_*_ct_lookup kfuncs",
});
value_enum!(Filtering {
    PortRestricted => "port-restricted": "Exact 5-tuple: only the peer the local port sent to may answer",
    EndpointIndependent => "endpoint-independent": "Any peer may answer once the local port has sent out (RFC 4787)",
});
value_enum!(CsumMode {
    Zero => "zero": "IPv4: set the UDP checksum to 0 (IPv6 is always recomputed)",
    Recompute => "recompute": "Recompute the UDP checksum (IPv4 and IPv6)",
});
value_enum!(CsumBackend {
    Auto => "auto": "Decided at attach: the nftables rule for IPv4; `both` with --csum recompute or a global IPv6 address on the interface (IPv6 needs the tc program)",
    Tc => "tc": "tc program only (needs the ESP GRO path: esp4_offload/esp6_offload and GRO)",
    Nft => "nft": "nftables rule only (IPv4): repairs every path, costs least",
    Both => "both": "tc program (IPv4 and IPv6, finer counters, events) plus the nftables rule for IPv4 packets that never reach tc (fragments, no GRO)",
});

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(args: &[&str]) -> AttachArgs {
        let mut cmdline = vec!["natfix", "attach"];
        cmdline.extend_from_slice(args);
        let Command::Attach(a) = Cli::try_parse_from(cmdline).unwrap().command else { panic!("not attach") };
        a
    }

    #[test]
    fn attach_parses_into_a_spec() {
        let a = attach(&[
            "--iface", "eth0", "--netns", "ingress", "--guard", "20000-30000", "--guard", "40000", "--allow-port",
            "25000", "--allow-src", "10.0.0.0/8", "--dry-run", "--guard-hook", "tc", "--flow-source", "own",
        ]);
        let spec = a.spec().unwrap();
        assert_eq!(spec.netns.as_deref(), Some("ingress"));
        let g = spec.guard.unwrap();
        assert_eq!(g.ranges.len(), 2);
        assert_eq!(g.hook, GuardHook::Tc);
        assert!(g.dry_run);
        assert!(spec.overlay.is_none());
        assert_eq!(attach(&["--iface", "auto", "--overlay-fix"]).spec().unwrap().iface, IfaceSel::DefaultRoute);
    }

    #[test]
    fn bad_attach_invocations_are_rejected() {
        for args in [
            &["natfix", "attach", "--guard", "1-2"][..],            // no --iface
            &["natfix", "attach", "--iface", "e", "--guard", "9-1"], // reversed
            &["natfix", "attach", "--iface", "e", "--guard-hook", "ebpf"],
            &["natfix", "attach", "--iface", "e", "--flow-timeout", "0"],
            &["natfix", "attach", "--iface", "e", "--flow-table-size", "1"],
            &["natfix", "attach", "--iface", "e", "--allow-port", "0"],
            &["natfix", "attach", "--iface", "../x", "--guard", "1"],
            &["natfix", "detach", "--iface", "a/b"],
            &["natfix", "stats", "--watch", "-1"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "accepted {args:?}");
        }
        let spec_err = |args: &[&str]| attach(args).spec().unwrap_err();
        assert!(spec_err(&["--iface", "e", "--guard", "1-10", "--allow-port", "20"]).contains("outside"));
        assert!(spec_err(&["--iface", "e"]).contains("nothing to attach"));
        assert!(spec_err(&["--iface", "e", "--guard", "1", "--reqid", "5"]).contains("need --overlay-fix"));
        assert!(spec_err(&["--iface", "e", "--guard", "1", "--guard-hook", "tc", "--xdp-mode", "native"]).contains("--xdp-mode"));
        assert!(spec_err(&["--iface", "e", "--guard", "1", "--flow-source", "conntrack", "--flow-timeout", "5"]).contains("conntrack"));
        let many: Vec<String> = (1..=65).map(|p| format!("--guard={p}")).collect();
        let many: Vec<&str> = ["--iface", "e"].into_iter().chain(many.iter().map(String::as_str)).collect();
        assert!(spec_err(&many).contains("at most 64"));
    }

    #[test]
    fn value_names_match_the_records() {
        // The CLI's words are the record's words (serde kebab-case).
        for v in FlowSource::value_variants() {
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(json.trim_matches('"'), v.to_possible_value().unwrap().get_name());
        }
        for v in CsumBackend::value_variants() {
            assert_eq!(v.name(), v.to_possible_value().unwrap().get_name());
        }
    }
}
