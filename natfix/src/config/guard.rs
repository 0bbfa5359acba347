//! The unsolicited-UDP guard as the operator configures it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::net::{Cidr, PortRange, port_range_text, ranges_contain};

/// Ranges an attachment may guard: the data plane keeps ports as bitmaps,
/// so this only bounds what a record and a command line carry.
pub const MAX_PORT_RANGES: usize = 64;

/// Where the guard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardHook {
    /// XDP, native mode; tc ingress where the driver has none (see `XdpMode`).
    #[default]
    Xdp,
    /// tc ingress (tcx on kernels >= 6.6, clsact below).
    Tc,
}

/// How the XDP guard attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Native; where that fails (no driver support, MTU, another program), tc ingress with a warning.
    #[default]
    Auto,
    /// Native or an error.
    Native,
    /// Generic (skb) XDP: runs later than native and turns GRO off on the device.
    Generic,
}

/// How the guard knows which flows are solicited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowSource {
    /// conntrack kfunc where the kernel has it, else own.
    #[default]
    Auto,
    /// natfix's own flow table, learned on egress and seeded from conntrack.
    Own,
    /// The kernel's conntrack table via the `bpf_*_ct_lookup` kfuncs.
    Conntrack,
}

/// The flow source once `auto` is decided: what a record says is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResolvedFlowSource {
    Own,
    Conntrack,
}

impl ResolvedFlowSource {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Own => "own",
            Self::Conntrack => "conntrack",
        }
    }
}

/// Which peers a solicited local port accepts (own flow table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Exact 5-tuple: only the peer the local port sent to may answer.
    #[default]
    PortRestricted,
    /// Any peer may answer once the local port has sent out (RFC 4787).
    EndpointIndependent,
}

impl Filtering {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::PortRestricted => "port-restricted",
            Self::EndpointIndependent => "endpoint-independent",
        }
    }
}

/// Default idle time after which an own-table flow stops admitting replies.
pub const DEFAULT_FLOW_TIMEOUT: Duration = Duration::from_mins(3);
/// Default capacity of the own flow table.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65536;
/// Bounds of the own flow table's capacity.
pub const FLOW_TABLE_SIZES: std::ops::RangeInclusive<u32> = 64..=16_777_216;

/// The guard's settings. `None` in an optional field means "not given":
/// the default applies, and options that only matter with another choice
/// (`xdp_mode` with the tc hook, table settings with conntrack) are refused
/// when given where they would be ignored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuardSpec {
    pub ranges: Vec<PortRange>,
    pub hook: GuardHook,
    pub xdp_mode: Option<XdpMode>,
    pub flow_source: FlowSource,
    pub filtering: Filtering,
    pub flow_timeout: Option<Duration>,
    pub flow_table_size: Option<u32>,
    /// Published (DNAT'd) ports that take new flows.
    pub allow_ports: Vec<u16>,
    /// Sources whose unsolicited UDP is let through.
    pub allow_src: Vec<Cidr>,
    /// Count what would be dropped; drop nothing.
    pub dry_run: bool,
    /// Keep the conntrack entries unsolicited UDP created before attach
    /// (else they are deleted: `reap`).
    pub no_reap: bool,
    /// Guard published ports too (else the ports the namespace DNATs and
    /// Docker publishes take new flows, as `--allow-port` would make them).
    pub no_allow_published: bool,
}

impl GuardSpec {
    #[must_use]
    pub fn xdp_mode(&self) -> XdpMode {
        self.xdp_mode.unwrap_or_default()
    }

    #[must_use]
    pub fn flow_timeout(&self) -> Duration {
        self.flow_timeout.unwrap_or(DEFAULT_FLOW_TIMEOUT)
    }

    #[must_use]
    pub fn flow_table_size(&self) -> u32 {
        self.flow_table_size.unwrap_or(DEFAULT_FLOW_TABLE_SIZE)
    }

    /// The ranges as the user writes them.
    #[must_use]
    pub fn range_texts(&self) -> Vec<String> {
        self.ranges.iter().map(port_range_text).collect()
    }

    /// Checks across fields; the message names the options as the CLI
    /// spells them (the config file uses the same words).
    pub fn validate(&self) -> Result<(), String> {
        if self.ranges.is_empty() {
            return Err("the guard needs at least one port range (--guard RANGE)".into());
        }
        if self.ranges.len() > MAX_PORT_RANGES {
            return Err(format!("{} --guard ranges given; at most {MAX_PORT_RANGES} are supported", self.ranges.len()));
        }
        if let Some(port) = self.allow_ports.iter().find(|p| !ranges_contain(&self.ranges, **p)) {
            return Err(format!("--allow-port {port} is outside every --guard range; it would have no effect"));
        }
        if self.allow_ports.contains(&0) {
            return Err("--allow-port 0 is not a port".into());
        }
        if self.hook == GuardHook::Tc && self.xdp_mode.is_some() {
            return Err("--xdp-mode applies to --guard-hook xdp only; drop it or use --guard-hook xdp".into());
        }
        if self.flow_source == FlowSource::Conntrack {
            if self.flow_timeout.is_some() || self.flow_table_size.is_some() {
                return Err("--flow-timeout and --flow-table-size set natfix's own flow table; with --flow-source conntrack, conntrack's own timeouts and size apply".into());
            }
            if self.filtering == Filtering::EndpointIndependent {
                return Err("--filtering endpoint-independent needs --flow-source own (conntrack matches exact tuples)".into());
            }
        }
        if let Some(size) = self.flow_table_size.filter(|s| !FLOW_TABLE_SIZES.contains(s)) {
            return Err(format!(
                "--flow-table-size {size} is outside {}..={}",
                FLOW_TABLE_SIZES.start(),
                FLOW_TABLE_SIZES.end()
            ));
        }
        if self.flow_timeout.is_some_and(|t| t.is_zero()) {
            return Err("--flow-timeout must be at least one second".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuardSpec {
        GuardSpec { ranges: vec![PortRange { first: 20000, last: 30000 }], ..GuardSpec::default() }
    }

    #[test]
    fn validation_refuses_what_would_be_ignored() {
        spec().validate().unwrap();
        let cases: Vec<(GuardSpec, &str)> = vec![
            (GuardSpec { ranges: vec![], ..spec() }, "at least one"),
            (GuardSpec { allow_ports: vec![20], ..spec() }, "outside every --guard range"),
            (GuardSpec { hook: GuardHook::Tc, xdp_mode: Some(XdpMode::Native), ..spec() }, "--xdp-mode applies"),
            (GuardSpec { flow_source: FlowSource::Conntrack, flow_table_size: Some(1024), ..spec() }, "conntrack's own"),
            (GuardSpec { flow_source: FlowSource::Conntrack, flow_timeout: Some(Duration::from_secs(5)), ..spec() }, "conntrack's own"),
            (
                GuardSpec { flow_source: FlowSource::Conntrack, filtering: Filtering::EndpointIndependent, ..spec() },
                "needs --flow-source own",
            ),
            (GuardSpec { flow_table_size: Some(1), ..spec() }, "outside 64..="),
            (GuardSpec { ranges: vec![PortRange { first: 1, last: 1 }; 65], ..spec() }, "at most 64"),
        ];
        for (bad, want) in cases {
            let err = bad.validate().unwrap_err();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
        // Given where it applies, each option is fine.
        GuardSpec { hook: GuardHook::Xdp, xdp_mode: Some(XdpMode::Native), ..spec() }.validate().unwrap();
        GuardSpec { flow_source: FlowSource::Own, flow_table_size: Some(1024), ..spec() }.validate().unwrap();
        GuardSpec { flow_source: FlowSource::Auto, filtering: Filtering::EndpointIndependent, ..spec() }.validate().unwrap();
    }

    #[test]
    fn record_spellings_are_kebab_case() {
        assert_eq!(serde_json::to_string(&Filtering::EndpointIndependent).unwrap(), "\"endpoint-independent\"");
        assert_eq!(serde_json::to_string(&ResolvedFlowSource::Conntrack).unwrap(), "\"conntrack\"");
        assert_eq!(serde_json::to_string(&GuardHook::Tc).unwrap(), "\"tc\"");
    }
}
