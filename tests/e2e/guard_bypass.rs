//! The guard judges every datagram the kernel hands to UDP and conntrack,
//! whatever its encapsulation. Each frame below is first shown to create a
//! conntrack entry without natfix (the kernel accepts it: a real bypass if
//! the guard passed it), then to create none with the guard attached, XDP
//! and tc, counted under its reason.

use std::net::{Ipv4Addr, Ipv6Addr};

use natfix_testkit::{ScratchNs, natfix, packet, root_setup, scratch_ns, stat, veth};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 2);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x70, 0, 0, 0, 0, 1);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x70, 0, 0, 0, 0, 2);

struct Rig {
    host: ScratchNs,
    peer: ScratchNs,
    host_mac: [u8; 6],
}

fn rig() -> Rig {
    let host = scratch_ns("byp");
    let peer = scratch_ns("bypp");
    veth(&host, "bh0", "10.70.0.1/24", &peer, "bp0", "10.70.0.2/24").unwrap();
    host.exec(&["ip", "addr", "add", "2001:db8:70::1/64", "dev", "bh0", "nodad"]).unwrap();
    peer.exec(&["ip", "addr", "add", "2001:db8:70::2/64", "dev", "bp0", "nodad"]).unwrap();
    // A conntrack user on the host, as Docker's rules are.
    host.nft("table inet conntrack_user { chain input { type filter hook input priority 0; ct state new counter; }; }").unwrap();
    let link: serde_json::Value = serde_json::from_str(&host.exec(&["ip", "-j", "link", "show", "bh0"]).unwrap()).unwrap();
    let mac = link[0]["address"].as_str().unwrap();
    let host_mac: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    Rig { host, peer, host_mac: host_mac.try_into().unwrap() }
}

/// Inserts 802.1Q/802.1ad tags (TPID, TCI) after the MAC addresses.
fn tagged(mut frame: Vec<u8>, tags: &[(u16, u16)]) -> Vec<u8> {
    let stack: Vec<u8> = tags.iter().flat_map(|(tpid, tci)| [tpid.to_be_bytes(), tci.to_be_bytes()].concat()).collect();
    frame.splice(12..12, stack);
    frame
}

fn v4(dport: u16) -> Vec<u8> {
    packet::udp4(PEER, 7000, HOST, dport, b"probe")
}

/// IPv6 UDP behind `n` destination-options headers, with a valid checksum.
fn v6_dstopts(n: usize, dport: u16) -> Vec<u8> {
    let exts: Vec<(u8, Vec<u8>)> = (0..n).map(|_| (60, packet::opts_body())).collect();
    let mut f = packet::udp6_with_ext(PEER6, 7000, HOST6, dport, &exts, b"probe");
    packet::fix_udp6_checksum(&mut f, 14 + 40 + 8 * n);
    f
}

/// (what, frame, guard's counter) — each to its own port, to count its entry apart.
fn cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    vec![
        ("802.1Q priority tag", tagged(v4(25001), &[(0x8100, 0x2000)]), "dropped_unsolicited"),
        ("802.1ad VLAN 0 over 802.1Q VLAN 0", tagged(v4(25002), &[(0x88a8, 0), (0x8100, 0)]), "dropped_unsolicited"),
        ("IPv6, 8 destination-options headers", v6_dstopts(8, 25003), "dropped_unsolicited"),
        ("IPv6, 12 destination-options headers", v6_dstopts(12, 25004), "dropped_unsolicited"),
        ("IPv6, 20 destination-options headers", v6_dstopts(20, 25005), "dropped_too_deep"),
    ]
}

fn entries_to(ns: &ScratchNs, dport: u16) -> usize {
    ns.conntrack(&["-p", "udp", "--dport", &dport.to_string()]).unwrap().len()
}

fn send(r: &Rig, frame: &[u8]) {
    let mut f = frame.to_vec();
    packet::set_dst_mac(&mut f, r.host_mac);
    r.peer.run(move || Ok(packet::send_frames("bp0", &[f])?)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
}

fn dport_of(what: &str, frame: &[u8]) -> u16 {
    let at = frame.windows(2).position(|w| w == [0x1b, 0x58]).unwrap_or_else(|| panic!("{what}: source port 7000"));
    u16::from_be_bytes([frame[at + 2], frame[at + 3]])
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn tagged_and_deep_datagrams_create_entries_without_natfix_and_none_with_it() {
    root_setup();
    let r = rig();
    for (what, frame, _) in cases() {
        send(&r, &frame);
        assert_eq!(entries_to(&r.host, dport_of(what, &frame)), 1, "{what}: the kernel hands it to conntrack (without natfix)");
    }
    for hook in ["xdp", "tc"] {
        r.host.exec(&["conntrack", "-F"]).unwrap();
        let out = natfix(&["attach", "--netns", &r.host.name, "--iface", "bh0", "--guard", "20000-30000", "--guard-hook", hook, "--flow-source", "own", "--pin"]);
        assert!(out.status.success(), "{hook}: {}", String::from_utf8_lossy(&out.stderr));
        for (what, frame, reason) in cases() {
            let before = stat(&r.host.name, "bh0", "guard", reason);
            send(&r, &frame);
            assert_eq!(entries_to(&r.host, dport_of(what, &frame)), 0, "{hook}: {what}: no conntrack entry with the guard");
            assert_eq!(stat(&r.host.name, "bh0", "guard", reason), before + 1, "{hook}: {what}: counted as {reason}");
        }
        let out = natfix(&["detach", "--netns", &r.host.name, "--iface", "bh0"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
