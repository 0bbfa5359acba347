//! Network names and numbers as natfix accepts them: interface names,
//! port ranges, address prefixes. Each parser's error is the one line the
//! user sees.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Ports `first..=last`, 1 <= first <= last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// IFNAMSIZ - 1: the longest name the kernel gives an interface.
const IFNAME_MAX: usize = 15;

/// An interface name the kernel would accept (`dev_valid_name()`): 1-15
/// bytes, not `.` or `..`, no `/`, `:` or whitespace. Names become bpffs
/// path components, so this check is what keeps one attachment's path
/// inside its own directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfaceName(String);

impl IfaceName {
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IfaceName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let why = if s.is_empty() {
            Some("is empty")
        } else if s.len() > IFNAME_MAX {
            Some("is longer than 15 bytes")
        } else if s == "." || s == ".." {
            Some("is `.` or `..`")
        } else if s.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace()) {
            Some("contains `/`, `:` or whitespace")
        } else {
            None
        };
        match why {
            Some(why) => Err(format!("`{}` is not an interface name: it {why}", s.escape_debug())),
            None => Ok(Self(s.to_owned())),
        }
    }
}

impl TryFrom<String> for IfaceName {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IfaceName> for String {
    fn from(n: IfaceName) -> Self {
        n.0
    }
}

impl fmt::Display for IfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IfaceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// An IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

// Records and config files carry prefixes as their text.
impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `A-B` or `P`, 1 <= A <= B <= 65535.
pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{p}` is not a port (1-65535)")),
            Ok(p) => Ok(p),
        }
    };
    let (first, last) = if let Some((a, b)) = s.split_once('-') {
        (port(a)?, port(b)?)
    } else {
        let p = port(s)?;
        (p, p)
    };
    if first > last {
        return Err(format!("range `{s}` is reversed: write {last}-{first}"));
    }
    Ok(PortRange { first, last })
}

/// A range as the user writes it: `A-B`, or `P` for a single port.
#[must_use]
pub fn port_range_text(r: &PortRange) -> String {
    if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) }
}

/// Whether any of `ranges` holds `port`.
#[must_use]
pub fn ranges_contain(ranges: &[PortRange], port: u16) -> bool {
    ranges.iter().any(|r| (r.first..=r.last).contains(&port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_reject() {
        // Input and the (first, last) it parses to, or Err(()) if refused.
        type Case = (&'static str, Result<(u16, u16), ()>);
        let cases: &[Case] = &[
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
        assert_eq!(port_range_text(&PortRange { first: 5, last: 5 }), "5");
        assert_eq!(port_range_text(&PortRange { first: 5, last: 9 }), "5-9");
    }

    #[test]
    fn cidrs_parse_reject_and_match() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().prefix_len, 8);
        assert_eq!("2001:db8::/32".parse::<Cidr>().unwrap().prefix_len, 32);
        assert_eq!("192.0.2.1".parse::<Cidr>().unwrap().prefix_len, 32);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("example.com/8".parse::<Cidr>().is_err());
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("192.0.2.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        assert_eq!(serde_json::to_string(&net).unwrap(), "\"10.0.0.0/8\"");
        assert_eq!(serde_json::from_str::<Cidr>("\"10.0.0.0/8\"").unwrap(), net);
    }

    #[test]
    fn interface_names_follow_the_kernel() {
        for ok in ["eth0", "a", "veth123456789ab", "br-1f2e3d4c5b6a", "x.y", "ens3f0np0"] {
            assert!(ok.parse::<IfaceName>().is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../4026531840/eth0", "eth0:1", "eth 0", "abcdefghijklmnop", "\t"] {
            let err = bad.parse::<IfaceName>().unwrap_err();
            assert!(err.contains("is not an interface name"), "{bad}: {err}");
        }
    }
}
