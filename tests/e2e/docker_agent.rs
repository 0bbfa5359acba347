//! `natfix agent` against a real Docker engine: ports Docker publishes stay
//! open inside guarded ranges without `allow-port` (containers started
//! before and after the agent, and their removal), and swarm's ingress
//! namespace is attached again when `docker swarm leave --force && docker
//! swarm init` recreates it. Skipped, with the reason, without Docker.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use natfix::sys::netns::Netns;
use natfix_testkit::{
    ScratchNs,
    agent::{AgentProc, records},
    docker::{Container, Swarm, ensure_busybox, exclusive, unavailable},
    root_setup, scratch_ns, send_udp, sh, skip,
};

const HOST_IP: &str = "203.0.113.1";
const PEER_IP: &str = "203.0.113.2";

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A peer namespace behind a veth whose host side is in the host namespace
/// (where Docker's DNAT rules are); removed on drop.
struct Peer {
    ns: ScratchNs,
    host_if: String,
}

impl Peer {
    fn new() -> Self {
        let ns = scratch_ns("dkp");
        let host_if = format!("nfxdk{}", std::process::id() % 100_000);
        sh(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", "p0", "netns", &ns.name]).unwrap();
        sh(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", &host_if]).unwrap();
        sh(&["ip", "link", "set", &host_if, "up"]).unwrap();
        ns.exec(&["ip", "addr", "add", &format!("{PEER_IP}/24"), "dev", "p0"]).unwrap();
        ns.exec(&["ip", "link", "set", "p0", "up"]).unwrap();
        Self { ns, host_if }
    }

    /// Datagrams the peer sends to host:`port` that a socket bound in
    /// `netns` on `port` receives (3 sent).
    fn delivered(&self, netns: &Netns, port: u16) -> usize {
        let sock = netns.run(move || Ok(natfix_testkit::bind_udp(addr("0.0.0.0", port))?)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        send_udp(&self.ns, addr(PEER_IP, 7000), addr(HOST_IP, port), 3).unwrap();
        let mut buf = [0u8; 64];
        let mut n = 0;
        while sock.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        let _ = sh(&["conntrack", "-D", "-s", PEER_IP]);
    }
}

fn published_of(netns_label: &str) -> Vec<u64> {
    records()
        .iter()
        .find(|r| r["netns"] == netns_label)
        .map(|r| r["guard"]["published"].as_array().map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect()).unwrap_or_default())
        .unwrap_or_default()
}

/// Waits until the record of `netns_label` lists exactly `want` as published.
fn wait_published(netns_label: &str, want: &[u64], agent: &AgentProc) -> Duration {
    let start = Instant::now();
    while published_of(netns_label) != want {
        assert!(start.elapsed() < Duration::from_secs(15), "published ports not {want:?}: {:?}\n{}", published_of(netns_label), agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn published_ports_stay_open_without_allow_port() {
    root_setup();
    if let Some(why) = unavailable() {
        return skip(&why);
    }
    let _turn = exclusive();
    let image = ensure_busybox().unwrap();
    let peer = Peer::new();
    let before = Container::run(&["-p", "25600:25600/udp", image, "sleep", "600"]).unwrap();
    let config = format!("[[attach]]\niface = \"{}\"\nguard = \"25000-26000\"\n", peer.host_if);
    let agent = AgentProc::start("docker", 19491, &config).unwrap();
    agent.wait_attached(Duration::from_secs(10)).unwrap();
    wait_published("self", &[25600], &agent);
    let host = Netns::resolve(None).unwrap();
    let in_before = Netns::resolve(Some(&format!("pid:{}", before.pid().unwrap()))).unwrap();
    assert_eq!(peer.delivered(&in_before, 25600), 3, "a port published before the agent started takes new flows");
    assert_eq!(peer.delivered(&host, 25601), 0, "its unpublished neighbour is guarded");

    // Published after the agent started: followed through Docker's events.
    let after = Container::run(&["-p", "25602:25602/udp", image, "sleep", "600"]).unwrap();
    let took = wait_published("self", &[25600, 25602], &agent);
    assert!(took < Duration::from_secs(5), "followed {took:?} after `docker run` returned");
    let in_after = Netns::resolve(Some(&format!("pid:{}", after.pid().unwrap()))).unwrap();
    assert_eq!(peer.delivered(&in_after, 25602), 3, "a port published after the agent started takes new flows");

    // Unpublished when the container goes: guarded again.
    drop(after);
    wait_published("self", &[25600], &agent);
    assert_eq!(peer.delivered(&host, 25602), 0, "guarded again once unpublished");
    assert!(agent.stop().unwrap().success());
    assert!(records().iter().all(|r| r["iface"] != peer.host_if.as_str()), "nothing left");
    drop(before);
}

const INGRESS: &str = "/var/run/docker/netns/ingress_sbox";

/// The cookie of the namespace mounted on `ingress_sbox`, once there is one
/// (its inode may be the previous namespace's: the kernel reuses them).
fn ingress_cookie() -> Option<u64> {
    // The file exists before Docker mounts the namespace on it: until then
    // it is no namespace and `resolve` refuses it.
    let ns = Netns::resolve(Some(INGRESS)).ok()?;
    ns.run(|| Ok(natfix::sys::netns::current_cookie())).ok().flatten()
}

fn wait_ingress(not: Option<u64>) -> (u64, Instant) {
    let end = Instant::now() + Duration::from_mins(1);
    loop {
        if let Some(cookie) = ingress_cookie().filter(|c| Some(*c) != not) {
            return (cookie, Instant::now());
        }
        assert!(Instant::now() < end, "swarm's ingress namespace did not appear (again)");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn swarm_ingress_is_attached_again_when_recreated() {
    root_setup();
    if let Some(why) = unavailable() {
        return skip(&why);
    }
    let _turn = exclusive();
    if let Some(why) = Swarm::unavailable() {
        return skip(&why);
    }
    let image = ensure_busybox().unwrap();
    let service = format!("natfix-t{}", std::process::id());
    let swarm = Swarm::init(image, &service);
    let (first, _) = wait_ingress(None);
    let agent = AgentProc::start("swarm", 19492, "[[attach]]\nnetns = \"ingress\"\niface = \"eth0\"\nguard = \"25000-26000\"\n").unwrap();
    agent.wait_attached(Duration::from_secs(20)).unwrap();
    let rec: Vec<_> = records().into_iter().filter(|r| r["netns"] == "ingress").collect();
    assert_eq!((rec.len(), rec[0]["netns_cookie"].as_u64()), (1, Some(first)), "{rec:#?}");
    // Swarm's ingress port is exempt there too, from Docker's service list.
    wait_published("ingress", &[25700], &agent);

    drop(swarm);
    let swarm = Swarm::init(image, &service);
    let (second, appeared) = wait_ingress(Some(first));
    let on_second = || records().iter().any(|r| r["netns"] == "ingress" && r["netns_cookie"].as_u64() == Some(second) && r["state"] == "pinned");
    while !on_second() {
        assert!(appeared.elapsed() < Duration::from_secs(20), "not attached in the new ingress namespace\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = appeared.elapsed();
    eprintln!("attached again {took:?} after ingress_sbox appeared");
    assert!(took <= Duration::from_secs(2), "attached again {took:?} after ingress_sbox appeared\n{}", agent.log());
    let rec: Vec<_> = records().into_iter().filter(|r| r["netns"] == "ingress").collect();
    assert_eq!(rec.len(), 1, "one record, nothing stale: {rec:#?}");
    assert_eq!((rec[0]["netns_cookie"].as_u64(), rec[0]["state"].as_str()), (Some(second), Some("pinned")), "{}", rec[0]);
    assert!(agent.stop().unwrap().success());
    assert!(records().iter().all(|r| r["netns"] != "ingress"), "nothing left");
    drop(swarm);
}
