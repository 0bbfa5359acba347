//! The encrypted-overlay checksum fix as the operator configures it.

use serde::{Deserialize, Serialize};

use crate::abi::MAX_VXLAN_PORTS;

/// Default VXLAN port (IANA), Docker's unless `--data-path-port` says otherwise.
pub const VXLAN_PORT: u16 = 4789;
/// The reqid of the SAs Docker's encrypted overlay installs.
pub const DOCKER_REQID: u32 = 0x00D0_C4E3;

/// How the checksum is repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsumMode {
    /// IPv4: set the UDP checksum to 0 (IPv6 is always recomputed).
    #[default]
    Zero,
    /// Recompute the UDP checksum (IPv4 and IPv6).
    Recompute,
}

impl CsumMode {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero",
            Self::Recompute => "recompute",
        }
    }
}

/// Which mechanism repairs the checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsumBackend {
    /// Decided at attach: the nftables rule for IPv4; `both` with recompute or a
    /// global IPv6 address on the interface (IPv6 needs the tc program).
    #[default]
    Auto,
    /// tc program only (needs the ESP GRO path: `esp4_offload`/`esp6_offload` and GRO).
    Tc,
    /// nftables rule only (IPv4): repairs every path, costs least.
    Nft,
    /// tc program (IPv4 and IPv6, finer counters, events) plus the nftables rule
    /// for IPv4 packets that never reach tc (fragments, no GRO).
    Both,
}

impl CsumBackend {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tc => "tc",
            Self::Nft => "nft",
            Self::Both => "both",
        }
    }

    /// Call once `auto` is decided: `auto` is not a mechanism.
    #[must_use]
    pub const fn uses_tc(self) -> bool {
        matches!(self, Self::Tc | Self::Both)
    }

    #[must_use]
    pub const fn uses_nft(self) -> bool {
        matches!(self, Self::Nft | Self::Both)
    }

    /// What `auto` attaches, and why. The nftables rule alone repairs IPv4
    /// on every path (fragments and non-GRO included) and costs other
    /// traffic least (BENCHMARKS.md); the tc program is added only where a
    /// zero checksum cannot do: IPv6, and an explicit recompute.
    #[must_use]
    pub const fn auto_choice(recompute: bool, has_global_ipv6: bool) -> (Self, &'static str) {
        if recompute {
            (Self::Both, "--csum recompute needs the tc program; the nftables rule covers IPv4 packets that miss tc")
        } else if has_global_ipv6 {
            (Self::Both, "the interface has a global IPv6 address: IPv6 needs the tc program's recompute")
        } else {
            (Self::Nft, "IPv4 only: the nftables rule repairs every path at the least cost")
        }
    }
}

/// The overlay fix's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlaySpec {
    /// VXLAN UDP ports; empty means auto: the ports of the VXLAN devices
    /// found at attach (`sys::vxlan::discover`), else 4789.
    pub vxlan_ports: Vec<u16>,
    /// Only packets decrypted by SAs with this reqid.
    pub reqid: Option<u32>,
    pub csum: CsumMode,
    pub backend: CsumBackend,
}

impl OverlaySpec {
    /// Whether the ports are found on the host rather than named.
    #[must_use]
    pub fn vxlan_auto(&self) -> bool {
        self.vxlan_ports.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.vxlan_ports.len() > MAX_VXLAN_PORTS {
            return Err(format!("at most {MAX_VXLAN_PORTS} --vxlan-port values"));
        }
        if self.vxlan_ports.contains(&0) {
            return Err("--vxlan-port 0 is not a port".into());
        }
        if self.backend == CsumBackend::Nft && self.csum == CsumMode::Recompute {
            return Err("--csum-backend nft can only zero the checksum (IPv4); use --csum zero or another backend".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_backend_adds_tc_only_for_recompute_or_ipv6() {
        assert_eq!(CsumBackend::auto_choice(false, false).0, CsumBackend::Nft);
        assert_eq!(CsumBackend::auto_choice(false, true).0, CsumBackend::Both);
        assert_eq!(CsumBackend::auto_choice(true, false).0, CsumBackend::Both);
    }

    #[test]
    fn validation() {
        OverlaySpec::default().validate().unwrap();
        assert!(OverlaySpec::default().vxlan_auto(), "no port named: auto");
        let nft_recompute = OverlaySpec { backend: CsumBackend::Nft, csum: CsumMode::Recompute, ..OverlaySpec::default() };
        assert!(nft_recompute.validate().unwrap_err().contains("only zero"));
        let many = OverlaySpec { vxlan_ports: (1..=9).collect(), ..OverlaySpec::default() };
        assert!(many.validate().unwrap_err().contains("at most 8"));
    }
}
