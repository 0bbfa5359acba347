//! The settings an operator changes on a running attachment, written into
//! its maps: which ports are guarded, exempt and learned (`guard_ports` bit
//! planes), dry-run and the allow-src switch (`guard_settings`), the
//! allow-src prefixes (LPM tries), the events budget, and the overlay's VXLAN
//! ports and reqid (`overlay_settings`). The loader writes them before
//! attach; `natfix set` (and the agent's reload) rewrites them live, with no
//! program reload: counters, flows and caches stay.
//!
//! Each writer compares with what the map holds and writes only what
//! differs, so a change touches few words and readers see each word before
//! or after it.

use std::{borrow::BorrowMut, net::IpAddr};

use anyhow::{Context, Result};
use aya::maps::{Array, LpmTrie, MapData, lpm_trie::Key};

use crate::{
    abi::{self, GuardSettings, LpmV4, LpmV6, OverlaySettings},
    config::{Cidr, PortRange},
};

/// The guard's live settings, as a record and a command describe them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardLive {
    pub ranges: Vec<PortRange>,
    pub allow_ports: Vec<u16>,
    /// Published ports inside the ranges, exempt like `allow_ports` (the
    /// record keeps them apart: they follow Docker, not the operator).
    pub published: Vec<u16>,
    pub allow_src: Vec<Cidr>,
    pub dry_run: bool,
    pub flow_timeout_ns: u64,
}

impl GuardLive {
    /// The ports that take new flows: exempt ones and published ones.
    #[must_use]
    pub fn exempt(&self) -> Vec<u16> {
        let mut all = self.allow_ports.clone();
        all.extend(&self.published);
        all.sort_unstable();
        all.dedup();
        all
    }

    #[must_use]
    pub fn settings(&self) -> GuardSettings {
        let mut flags = 0;
        if self.dry_run {
            flags |= abi::GUARD_S_DRY_RUN;
        }
        if !self.allow_src.is_empty() {
            flags |= abi::GUARD_S_ALLOW_SRC;
        }
        GuardSettings { flags, pad: 0, flow_timeout_ns: self.flow_timeout_ns }
    }
}

/// The words of one bit plane with `ports` set.
fn plane(ports: impl IntoIterator<Item = u16>) -> Vec<u64> {
    let mut words = vec![0u64; abi::PORT_WORDS as usize];
    for p in ports {
        words[usize::from(p >> 6)] |= 1 << (p & 63);
    }
    words
}

fn range_ports(ranges: &[PortRange]) -> impl Iterator<Item = u16> + '_ {
    ranges.iter().flat_map(|r| r.first..=r.last)
}

/// Writes the words of plane `index` that differ from `words`.
fn write_plane<T: BorrowMut<MapData>>(map: &mut Array<T, u64>, index: u32, words: &[u64]) -> Result<()> {
    for (i, want) in (0u32..).zip(words) {
        let key = index * abi::PORT_WORDS + i;
        if map.get(&key, 0).context("cannot read guard_ports")? != *want {
            map.set(key, *want, 0).context("cannot write guard_ports")?;
        }
    }
    Ok(())
}

/// Sets the LEARN plane to `learn` (own flow table: flows from these ports are learned).
pub fn write_learned<T: BorrowMut<MapData>>(map: &mut Array<T, u64>, learn: &[PortRange]) -> Result<()> {
    write_plane(map, abi::PORT_PLANE_LEARN, &plane(range_ports(learn)))
}

/// Sets the GUARDED and EXEMPT planes.
pub fn write_guarded<T: BorrowMut<MapData>>(map: &mut Array<T, u64>, ranges: &[PortRange], exempt: &[u16]) -> Result<()> {
    // Exemptions first: a port becoming guarded is never judged without its exemption.
    write_plane(map, abi::PORT_PLANE_EXEMPT, &plane(exempt.iter().copied()))?;
    write_plane(map, abi::PORT_PLANE_GUARDED, &plane(range_ports(ranges)))
}

pub fn write_guard_settings<T: BorrowMut<MapData>>(map: &mut Array<T, GuardSettings>, live: &GuardLive) -> Result<()> {
    map.set(0, live.settings(), 0).context("cannot write guard_settings")
}

// The LPM key types of the C side are {prefixlen, addr}; aya's Key<K> adds
// the prefix itself, so K is just the address bytes.
type LpmV4Key = u32;
const _: () = assert!(size_of::<Key<LpmV4Key>>() == size_of::<LpmV4>());
const _: () = assert!(size_of::<Key<[u8; 16]>>() == size_of::<LpmV6>());

/// Makes an allow-src trie hold exactly the prefixes `want` (as (prefix
/// length, address key)): inserts what is missing first, then removes the
/// rest, so a prefix kept across a change never leaves the trie.
fn sync_trie<T: BorrowMut<MapData>, K: aya::Pod + PartialEq>(trie: &mut LpmTrie<T, K, u8>, want: &[(u32, K)]) -> Result<()> {
    let have: Vec<(u32, K)> = trie.keys().filter_map(Result::ok).map(|k| (k.prefix_len(), k.data())).collect();
    for (len, addr) in want.iter().filter(|w| !have.contains(w)) {
        trie.insert(&Key::new(*len, *addr), 1, 0).context("cannot add an --allow-src prefix (at most 1,024 per family)")?;
    }
    for (len, addr) in have.iter().filter(|h| !want.contains(h)) {
        trie.remove(&Key::new(*len, *addr)).context("cannot remove an --allow-src prefix")?;
    }
    Ok(())
}

/// Makes the IPv4 allow-src trie hold exactly the IPv4 prefixes of `allow`.
pub fn write_allow_src4<T: BorrowMut<MapData>>(trie: &mut LpmTrie<T, LpmV4Key, u8>, allow: &[Cidr]) -> Result<()> {
    let want: Vec<(u32, LpmV4Key)> = allow
        .iter()
        .filter_map(|c| match c.addr {
            IpAddr::V4(a) => Some((u32::from(c.prefix_len), u32::from_ne_bytes(a.octets()))),
            IpAddr::V6(_) => None,
        })
        .collect();
    sync_trie(trie, &want)
}

/// Makes the IPv6 allow-src trie hold exactly the IPv6 prefixes of `allow`.
pub fn write_allow_src6<T: BorrowMut<MapData>>(trie: &mut LpmTrie<T, [u8; 16], u8>, allow: &[Cidr]) -> Result<()> {
    let want: Vec<(u32, [u8; 16])> = allow
        .iter()
        .filter_map(|c| match c.addr {
            IpAddr::V6(a) => Some((u32::from(c.prefix_len), a.octets())),
            IpAddr::V4(_) => None,
        })
        .collect();
    sync_trie(trie, &want)
}

pub fn write_event_rate<T: BorrowMut<MapData>>(map: &mut Array<T, u32>, per_sec: u32) -> Result<()> {
    map.set(0, per_sec, 0).context("cannot write natfix_event_rate")
}

/// The overlay's live settings.
#[must_use]
pub fn overlay_settings(ports: &[u16], reqid: Option<u32>) -> OverlaySettings {
    let mut s = OverlaySettings {
        nr_ports: u32::try_from(ports.len().min(abi::MAX_VXLAN_PORTS)).unwrap_or(0),
        reqid: reqid.unwrap_or(0),
        flags: if reqid.is_some() { abi::OVERLAY_S_MATCH_REQID } else { 0 },
        ..OverlaySettings::default()
    };
    for (slot, port) in s.vxlan_ports.iter_mut().zip(ports) {
        *slot = *port;
    }
    s
}

pub fn write_overlay_settings<T: BorrowMut<MapData>>(map: &mut Array<T, OverlaySettings>, ports: &[u16], reqid: Option<u32>) -> Result<()> {
    map.set(0, overlay_settings(ports, reqid), 0).context("cannot write overlay_settings")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planes_set_one_bit_per_port() {
        let words = plane(range_ports(&[PortRange { first: 63, last: 65 }]).chain([65535]));
        assert_eq!(words.len(), 1024);
        assert_eq!(words[0], 1 << 63);
        assert_eq!(words[1], 0b11);
        assert_eq!(words[1023], 1 << 63);
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 4);
    }

    #[test]
    fn settings_carry_dry_run_and_the_allow_src_switch() {
        let live = GuardLive { ranges: vec![], allow_ports: vec![], published: vec![], allow_src: vec![], dry_run: true, flow_timeout_ns: 7 };
        assert_eq!(live.settings(), GuardSettings { flags: abi::GUARD_S_DRY_RUN, pad: 0, flow_timeout_ns: 7 });
        let live = GuardLive { dry_run: false, allow_src: vec!["10.0.0.0/8".parse().unwrap()], ..live };
        assert_eq!(live.settings().flags, abi::GUARD_S_ALLOW_SRC);
        let o = overlay_settings(&[4789, 4777], Some(0x00D0_C4E3));
        assert_eq!((o.nr_ports, o.vxlan_ports[1], o.flags, o.reqid), (2, 4777, abi::OVERLAY_S_MATCH_REQID, 0x00D0_C4E3));
    }
}
