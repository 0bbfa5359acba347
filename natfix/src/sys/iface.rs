//! Interfaces of the calling thread's network namespace, by name and index.

use anyhow::{Result, bail};

use crate::{config::IfaceName, error::UserError};

/// The names of the namespace's interfaces, for error messages.
#[must_use]
pub fn names() -> Vec<String> {
    nix::net::if_::if_nameindex()
        .map(|list| list.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// The interface's index, or `NotFound` naming what the namespace has.
pub fn index(iface: &IfaceName, netns_label: &str) -> Result<u32> {
    match nix::net::if_::if_nametoindex(iface.as_str()) {
        Ok(idx) if idx != 0 => Ok(idx),
        _ => bail!(UserError::NotFound(format!(
            "no interface `{iface}` in namespace `{netns_label}` (it has: {})",
            names().join(", ")
        ))),
    }
}

/// The interface with index `ifindex` now, if any.
#[must_use]
pub fn name_of(ifindex: u32) -> Option<String> {
    nix::net::if_::if_nameindex()
        .ok()?
        .iter()
        .find(|i| i.index() == ifindex)
        .map(|i| i.name().to_string_lossy().into_owned())
}

/// The interface of the calling thread's namespace's IPv4 default route
/// (lowest metric), from `/proc/net/route`.
pub fn default_route() -> Result<Option<IfaceName>> {
    // thread-self: /proc/net follows the main thread's namespace, not this thread's.
    let text = std::fs::read_to_string("/proc/thread-self/net/route")?;
    Ok(default_route_in(&text).and_then(|name| name.parse().ok()))
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`
fn default_route_in(text: &str) -> Option<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| (f[6].parse::<u32>().unwrap_or(u32::MAX), f[0]))
        })
        .min()
        .map(|(_, name)| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_takes_the_lowest_metric() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0
eth0\t00000000\t010011AC\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";
        assert_eq!(default_route_in(text).as_deref(), Some("eth0"));
        assert_eq!(default_route_in("Iface\tDestination\n"), None);
    }
}
