//! Command-line interface: clap derive types and the parsers of their values.

use std::{net::IpAddr, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::abi::{MAX_PORT_RANGES, PortRange};

#[derive(Debug, Parser)]
#[command(name = "natfix", version, about = "eBPF data-plane fixes for container hosts behind NAT")]
pub struct Cli {
    /// Log filter (also NATFIX_LOG), e.g. `debug` or `natfix=trace`.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
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
}

#[derive(Debug, Clone, Args)]
pub struct MonitorArgs {
    /// Only this interface.
    #[arg(long)]
    pub iface: Option<String>,
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
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = parse_positive_secs)]
    pub sample: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Interface, as named inside the namespace.
    #[arg(long)]
    pub iface: String,
    /// Network namespace: a name under /var/run/docker/netns (or `ingress`), a name under
    /// /run/netns, an absolute path, or pid:N. Default: natfix's own namespace.
    #[arg(long)]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Only this interface.
    #[arg(long)]
    pub iface: Option<String>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardHook {
    /// XDP, native mode; tc ingress where the driver has none (see --xdp-mode).
    Xdp,
    /// tc ingress (tcx on kernels >= 6.6, clsact below).
    Tc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowSource {
    /// conntrack kfunc where the kernel has it, else own.
    Auto,
    /// natfix's own flow table, learned on egress and seeded from conntrack.
    Own,
    /// The kernel's conntrack table via the bpf_*_ct_lookup kfuncs.
    Conntrack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Exact 5-tuple: only the peer the local port sent to may answer.
    PortRestricted,
    /// Any peer may answer once the local port has sent out (RFC 4787).
    EndpointIndependent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpModeArg {
    /// Native; where that fails (no driver support, MTU, another program), tc ingress with a warning.
    Auto,
    /// Native or an error.
    Native,
    /// Generic (skb) XDP: runs later than native and turns GRO off on the device.
    Generic,
}

#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Pin programs, links and maps under /sys/fs/bpf/natfix and exit, leaving them attached.
    #[arg(long)]
    pub pin: bool,

    /// With --pin: upgrade an existing pinned attachment in place (atomic program swap; counters and flows kept).
    #[arg(long, requires = "pin")]
    pub replace: bool,

    /// Sampled drop/rewrite events per CPU per second for `natfix monitor` (0: none);
    /// rewrites are sampled first (the first on each CPU, then every 64th).
    #[arg(long, value_name = "N", default_value_t = crate::loader::DEFAULT_EVENTS_PER_SEC)]
    pub events_rate: u32,

    /// Log the sampled events (the ring buffer has one reader: this or `natfix monitor`).
    #[arg(long, conflicts_with = "pin")]
    pub log_events: bool,

    /// Serve Prometheus metrics on http://ADDR/metrics while attached (e.g. 127.0.0.1:9477).
    #[arg(long, value_name = "ADDR", conflicts_with = "pin")]
    pub metrics: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub guard: GuardArgs,

    #[command(flatten)]
    pub overlay: OverlayArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsumMode {
    /// IPv4: set the UDP checksum to 0 (IPv6 is always recomputed).
    Zero,
    /// Recompute the UDP checksum (IPv4 and IPv6).
    Recompute,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsumBackend {
    /// Decided at attach: the nftables rule for IPv4; `both` with --csum recompute or a
    /// global IPv6 address on the interface (IPv6 needs the tc program).
    Auto,
    /// tc program only (needs the ESP GRO path: esp4_offload/esp6_offload and GRO).
    Tc,
    /// nftables rule only (IPv4): repairs every path, costs least.
    Nft,
    /// tc program (IPv4 and IPv6, finer counters, events) plus the nftables rule
    /// for IPv4 packets that never reach tc (fragments, no GRO).
    Both,
}

impl CsumBackend {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tc => "tc",
            Self::Nft => "nft",
            Self::Both => "both",
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Encrypted-overlay checksum fix")]
pub struct OverlayArgs {
    /// Repair the UDP checksum of decrypted VXLAN (encrypted overlay behind 1:1 NAT).
    #[arg(long)]
    pub overlay_fix: bool,
    /// VXLAN UDP port (repeatable, up to 8; default 4789).
    #[arg(long = "vxlan-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub vxlan_ports: Vec<u16>,
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

/// Default VXLAN port (IANA); Docker's data-path port may differ.
pub const VXLAN_PORT: u16 = 4789;

impl OverlayArgs {
    #[must_use]
    pub fn ports(&self) -> Vec<u16> {
        if self.vxlan_ports.is_empty() { vec![VXLAN_PORT] } else { self.vxlan_ports.clone() }
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

/// Checks of the overlay options clap cannot express.
pub fn validate_overlay(args: &OverlayArgs) -> Result<(), String> {
    let touched = !args.vxlan_ports.is_empty()
        || args.reqid.is_some()
        || args.csum != CsumMode::Zero
        || args.csum_backend != CsumBackend::Auto;
    if touched && !args.overlay_fix {
        return Err("--vxlan-port, --reqid, --csum and --csum-backend need --overlay-fix".into());
    }
    if args.vxlan_ports.len() > crate::abi::MAX_VXLAN_PORTS {
        return Err(format!("at most {} --vxlan-port values", crate::abi::MAX_VXLAN_PORTS));
    }
    if args.csum_backend == CsumBackend::Nft && args.csum == CsumMode::Recompute {
        return Err("--csum-backend nft can only zero the checksum (IPv4); use --csum zero or another backend".into());
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Unsolicited-UDP guard")]
pub struct GuardArgs {
    /// Guard these destination ports: `20000-30000` or `5000` (repeatable, up to 16).
    #[arg(long = "guard", value_name = "RANGE", value_parser = parse_port_range)]
    pub ranges: Vec<PortRange>,
    /// Where the guard runs.
    #[arg(long, value_enum, default_value_t = GuardHook::Xdp)]
    pub guard_hook: GuardHook,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// How the guard knows which flows are solicited.
    #[arg(long, value_enum, default_value_t = FlowSource::Auto)]
    pub flow_source: FlowSource,
    /// Filtering of the own flow table.
    #[arg(long, value_enum, default_value_t = Filtering::PortRestricted)]
    pub filtering: Filtering,
    /// Idle time after which an own-table flow stops admitting replies (seconds).
    #[arg(long, value_name = "SECS", default_value = "180", value_parser = parse_positive_secs)]
    pub flow_timeout: Duration,
    /// Capacity of the own flow table (LRU).
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(64..=16_777_216))]
    pub flow_table_size: u32,
    /// Published (DNAT'd) UDP port that accepts new flows (repeatable).
    #[arg(long = "allow-port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub allow_ports: Vec<u16>,
    /// Source prefix whose unsolicited UDP is let through (repeatable), e.g. 10.0.0.0/8.
    #[arg(long = "allow-src", value_name = "CIDR", value_parser = parse_cidr)]
    pub allow_src: Vec<Cidr>,
    /// Count what would be dropped; drop nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl GuardArgs {
    /// The guard is enabled by giving at least one range.
    #[must_use]
    pub fn enabled(&self) -> bool {
        !self.ranges.is_empty()
    }
}

/// An IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an IP address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("prefix length `{l}` in `{s}` must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix_len })
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
}

/// `A-B` or `P`, 1 <= A <= B <= 65535.
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{p}` is not a port (1-65535)")),
            Ok(p) => Ok(p),
        }
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!("range `{s}` is reversed: write {last}-{first}"));
    }
    Ok(PortRange { first, last })
}

fn parse_positive_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

/// Checks across options that clap cannot express.
pub fn validate_guard(args: &GuardArgs) -> Result<(), String> {
    if args.ranges.len() > MAX_PORT_RANGES {
        return Err(format!(
            "{} --guard ranges given; at most {MAX_PORT_RANGES} are supported",
            args.ranges.len()
        ));
    }
    for port in &args.allow_ports {
        if !args.ranges.iter().any(|r| (r.first..=r.last).contains(port)) {
            return Err(format!("--allow-port {port} is outside every --guard range; it would have no effect"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_reject() {
        let cases: &[(&str, Result<(u16, u16), ()>)] = &[
            ("20000-30000", Ok((20000, 30000))),
            ("5000", Ok((5000, 5000))),
            (" 1 - 65535 ", Ok((1, 65535))),
            ("30000-20000", Err(())),
            ("0-10", Err(())),
            ("70000", Err(())),
            ("a-b", Err(())),
            ("", Err(())),
            ("1-", Err(())),
        ];
        for (input, want) in cases {
            let got = parse_port_range(input).map(|r| (r.first, r.last)).map_err(|_| ());
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    #[test]
    fn cidrs_parse_and_reject() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().prefix_len, 8);
        assert_eq!("2001:db8::/32".parse::<Cidr>().unwrap().prefix_len, 32);
        assert_eq!("192.0.2.1".parse::<Cidr>().unwrap().prefix_len, 32);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("example.com/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn attach_parses_and_validates() {
        let cli = Cli::try_parse_from([
            "natfix", "attach", "--iface", "eth0", "--netns", "ingress", "--guard", "20000-30000",
            "--guard", "40000", "--allow-port", "25000", "--allow-src", "10.0.0.0/8", "--dry-run",
            "--guard-hook", "tc", "--flow-source", "own",
        ])
        .unwrap();
        let Command::Attach(a) = cli.command else { panic!("not attach") };
        assert_eq!(a.target.netns.as_deref(), Some("ingress"));
        assert_eq!(a.guard.ranges.len(), 2);
        assert_eq!(a.guard.guard_hook, GuardHook::Tc);
        assert!(a.guard.dry_run);
        validate_guard(&a.guard).unwrap();
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
            &["natfix", "stats", "--watch", "-1"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "accepted {args:?}");
        }
        let cli = Cli::try_parse_from(["natfix", "attach", "--iface", "e", "--guard", "1-10", "--allow-port", "20"])
            .unwrap();
        let Command::Attach(a) = cli.command else { panic!() };
        assert!(validate_guard(&a.guard).unwrap_err().contains("outside"));
        let many: Vec<String> = (1..=17).map(|p| format!("--guard={p}")).collect();
        let mut argv = vec!["natfix".to_owned(), "attach".into(), "--iface".into(), "e".into()];
        argv.extend(many);
        let Command::Attach(a) = Cli::try_parse_from(argv).unwrap().command else { panic!() };
        assert!(validate_guard(&a.guard).unwrap_err().contains("at most 16"));
    }
}
