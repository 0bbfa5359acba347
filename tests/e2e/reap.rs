//! Seed 000 on a host that already suffers: a peer probed (and keeps
//! probing) before natfix came. The conntrack entries its probes made hold
//! the ports; the guard's attach deletes exactly those (and `natfix reap`
//! on demand, `natfix set` for newly guarded ports), never a solicited one.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use natfix::lab::{
    scratch::{bind_udp, sock},
    topology::{CONTAINER_IP, GuardTopology, HOST_EXT_IF, HOST_IP, PUBLISHED_PORT, REMOTE_IP},
};
use natfix_testkit::{Daemon, ensure_bpffs, natfix, root_setup, stat};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn topology() -> GuardTopology {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    GuardTopology::build(&format!("rp{}x{n}", std::process::id())).expect("topology")
}

/// The hole-punching peer at REMOTE:7000: probes HOST:25000 every 50 ms
/// and notes every source it hears from, until stopped.
struct Peer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<SocketAddr>>,
}

impl Peer {
    fn start(t: &GuardTopology) -> Self {
        let socket: UdpSocket = t.remote.run(|| Ok(bind_udp(sock(REMOTE_IP, 7000))?)).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut heard = Vec::new();
            let mut buf = [0u8; 64];
            while !stopped.load(Ordering::Relaxed) {
                let _ = socket.send_to(b"probe", sock(HOST_IP, 25000));
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    heard.push(from);
                }
            }
            heard
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<SocketAddr> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Entries the test plants that are not unsolicited: each must survive a reap.
const SOLICITED: [[&str; 2]; 4] = [
    ["--orig-port-src", "26000"], // a container's flow through NAT
    ["--orig-port-src", "27000"], // a flow the host opened
    ["--orig-port-dst", "25500"], // a flow to the published port (DNAT)
    ["--orig-port-dst", "28000"], // inbound to a guarded port, replied by the host
];

fn plant_solicited(t: &GuardTopology) {
    t.container.send_udp(sock(CONTAINER_IP, 26000), sock(REMOTE_IP, 7002), 1).unwrap();
    t.host.send_udp(sock(HOST_IP, 27000), sock(REMOTE_IP, 7001), 1).unwrap();
    t.remote.send_udp(sock(REMOTE_IP, 7100), sock(HOST_IP, PUBLISHED_PORT), 1).unwrap();
    let server = t.host.run(|| Ok(bind_udp(sock(HOST_IP, 28000))?)).unwrap();
    server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    t.remote.send_udp(sock(REMOTE_IP, 7003), sock(HOST_IP, 28000), 1).unwrap();
    let mut buf = [0u8; 64];
    let (_, from) = server.recv_from(&mut buf).expect("the host's server hears the remote");
    server.send_to(b"answer", from).unwrap();
    std::thread::sleep(Duration::from_millis(100));
}

fn count(t: &GuardTopology, args: &[&str]) -> usize {
    let mut all = vec!["-p", "udp"];
    all.extend_from_slice(args);
    t.host.conntrack(&all).unwrap().len()
}

fn unsolicited_to(t: &GuardTopology, port: u16) -> usize {
    let port = port.to_string();
    count(t, &["--orig-src", REMOTE_IP, "--orig-port-dst", &port])
}

fn assert_solicited_kept(t: &GuardTopology, why: &str) {
    for args in SOLICITED {
        assert_eq!(count(t, &args), 1, "{why}: the entry {args:?} was removed");
    }
}

/// The container punches from :25000 to the peer; the port the peer sees.
fn punch(t: &GuardTopology) {
    t.container.send_udp(sock(CONTAINER_IP, 25000), sock(REMOTE_IP, 7000), 3).unwrap();
    std::thread::sleep(Duration::from_millis(200));
}

fn status_reaped(netns: &str) -> u64 {
    let out = natfix(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rec = v["attachments"].as_array().unwrap().iter().find(|r| r["netns"] == netns).expect("the attachment is listed");
    rec["guard"]["reaped"].as_u64().unwrap_or(0)
}

fn heals_at_attach(extra: &[&str]) {
    root_setup();
    ensure_bpffs();
    let t = topology();
    let peer = Peer::start(&t);
    // A second probed port, and the host's own traffic, planted before natfix.
    t.remote.send_udp(sock(REMOTE_IP, 7004), sock(HOST_IP, 24000), 1).unwrap();
    plant_solicited(&t);
    assert_eq!(unsolicited_to(&t, 25000), 1, "the peer's probe holds :25000");
    assert_eq!(unsolicited_to(&t, 24000), 1);

    // Dry-run lists them and deletes nothing.
    let host = t.host.name.as_str();
    let out = natfix(&["reap", "--netns", host, "--iface", HOST_EXT_IF, "--guard", "20000-30000", "--allow-port", "25500", "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["count"], 2, "{report}");
    assert_eq!(unsolicited_to(&t, 25000) + unsolicited_to(&t, 24000), 2, "dry-run deleted something");

    let mut args = vec!["--iface", HOST_EXT_IF, "--netns", host, "--guard", "20000-30000", "--allow-port", "25500"];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args).expect("natfix attach");
    std::thread::sleep(Duration::from_millis(300)); // the peer keeps probing
    assert_eq!(unsolicited_to(&t, 25000), 0, "{extra:?}: the probe's entry is gone and stays gone while the peer probes");
    assert_eq!(unsolicited_to(&t, 24000), 0, "{extra:?}");
    assert_solicited_kept(&t, &format!("{extra:?}"));
    assert_eq!(status_reaped(host), 2, "{extra:?}: the record counts what was deleted");
    assert!(stat(host, HOST_EXT_IF, "guard", "dropped_unsolicited") > 0, "{extra:?}: the peer's later probes are dropped");

    punch(&t);
    let heard = peer.stop();
    assert!(heard.contains(&sock(HOST_IP, 25000)), "{extra:?}: the container keeps its port; the peer heard {heard:?}");
    assert!(d.stop().unwrap().success());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn attach_reaps_with_own_flows() {
    heals_at_attach(&["--flow-source", "own"]);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn attach_reaps_with_conntrack_flows() {
    heals_at_attach(&["--guard-hook", "xdp", "--flow-source", "conntrack"]);
}

/// Without the reap (`--no-reap`) the failure stays even with the guard on;
/// the guard still drops the peer's probes (the outsider's own unreplied
/// entry does not make them solicited, with either flow source), and
/// `natfix reap` heals on demand.
fn without_reap(extra: &[&str]) {
    root_setup();
    ensure_bpffs();
    let t = topology();
    let peer = Peer::start(&t);
    plant_solicited(&t);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(unsolicited_to(&t, 25000), 1);
    let host = t.host.name.as_str();
    let mut args = vec!["--iface", HOST_EXT_IF, "--netns", host, "--guard", "20000-30000", "--allow-port", "25500", "--no-reap"];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args).expect("natfix attach");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(unsolicited_to(&t, 25000), 1, "{extra:?}: --no-reap keeps the entry");
    assert!(stat(host, HOST_EXT_IF, "guard", "dropped_unsolicited") >= 3, "{extra:?}: the probes matching the outsider's own entry are dropped");

    punch(&t);
    std::thread::sleep(Duration::from_millis(100));
    let heard_before = peer.stop();
    assert!(!heard_before.is_empty(), "{extra:?}: the punch reached the peer");
    assert!(!heard_before.contains(&sock(HOST_IP, 25000)), "{extra:?}: the failure reproduces: {heard_before:?}");

    // On demand, from the attachment's own settings.
    let out = natfix(&["reap", "--netns", host, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["count"], 1, "{report}");
    assert_eq!(unsolicited_to(&t, 25000), 0);
    assert_solicited_kept(&t, &format!("{extra:?}"));
    assert_eq!(status_reaped(host), 1);
    // The container's remapped flow is the container's: reap leaves it (it
    // idles out); gone, the next punch leaves on its own port.
    t.host.exec(&["conntrack", "-D", "-p", "udp", "--orig-src", CONTAINER_IP, "--orig-port-src", "25000"]).unwrap();
    let peer = Peer::start(&t);
    punch(&t);
    let heard = peer.stop();
    assert!(heard.contains(&sock(HOST_IP, 25000)), "{extra:?}: healed on demand; the peer heard {heard:?}");
    assert!(d.stop().unwrap().success());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn no_reap_keeps_the_failure_and_reap_heals_it_with_own_flows() {
    without_reap(&["--flow-source", "own"]);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn no_reap_keeps_the_failure_and_reap_heals_it_with_conntrack_flows() {
    without_reap(&["--guard-hook", "xdp", "--flow-source", "conntrack"]);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn set_reaps_the_ports_it_starts_guarding() {
    root_setup();
    ensure_bpffs();
    let t = topology();
    t.remote.send_udp(sock(REMOTE_IP, 7004), sock(HOST_IP, 25000), 1).unwrap();
    plant_solicited(&t);
    let host = t.host.name.as_str();
    let d = Daemon::start(&["--iface", HOST_EXT_IF, "--netns", host, "--guard", "20000-21000"]).expect("natfix attach");
    assert_eq!(unsolicited_to(&t, 25000), 1, "outside the range: kept");
    let out = natfix(&["set", "--iface", HOST_EXT_IF, "--netns", host, "--guard", "20000-30000", "--allow-port", "25500"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(unsolicited_to(&t, 25000), 0, "now guarded: reaped");
    assert_solicited_kept(&t, "set");
    assert_eq!(status_reaped(host), 1);
    assert!(d.stop().unwrap().success());
}
