//! Sampled events: `natfix monitor` streams drops with their addresses, and
//! the kernel's rate limit keeps a flood from flooding userspace while the
//! counters stay exact.

use std::{net::SocketAddr, process::Command, time::Duration};

use natfix_testkit::{Daemon, ensure_bpffs, natfix_bin, root_setup, scratch_ns, send_udp, stat, veth};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn monitor_streams_dropped_packets() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("mon");
    let peer = scratch_ns("monp");
    veth(&host, "gm0", "10.65.0.1/24", &peer, "gn0", "10.65.0.2/24").unwrap();
    let d = Daemon::start(&["--iface", "gm0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own"]).unwrap();
    let monitor = Command::new(natfix_bin())
        .args(["monitor", "--json", "--count", "3", "--netns", &host.name, "--iface", "gm0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    send_udp(&peer, addr("10.65.0.2:7000"), addr("10.65.0.1:25000"), 3).unwrap();
    let out = monitor.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert_eq!(l["program"], "guard");
        assert_eq!(l["reason"], "dropped_unsolicited");
        assert_eq!(l["src"], "10.65.0.2:7000");
        assert_eq!(l["dst"], "10.65.0.1:25000");
        assert_eq!(l["iface"], "gm0");
    }
    assert!(d.stop().unwrap().success());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn events_are_rate_limited_in_the_kernel() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("rl");
    let peer = scratch_ns("rlp");
    veth(&host, "gq0", "10.66.0.1/24", &peer, "gp0", "10.66.0.2/24").unwrap();
    let d = Daemon::start(&[
        "--iface", "gq0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own", "--events-rate", "5",
    ])
    .unwrap();
    send_udp(&peer, addr("10.66.0.2:7000"), addr("10.66.0.1:25000"), 2000).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stat(&host.name, "gq0", "guard", "dropped_unsolicited"), 2000, "counters stay exact");
    // Read what the ring holds: at most 5 per CPU per one-second window.
    let out = Command::new("timeout")
        .args(["2", natfix_bin().to_str().unwrap(), "monitor", "--json", "--netns", &host.name])
        .output()
        .unwrap();
    let n = String::from_utf8_lossy(&out.stdout).lines().count();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    assert!(n >= 1 && n <= 5 * cpus * 2, "{n} events for 2000 drops on {cpus} CPUs");
    assert!(d.stop().unwrap().success());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn attach_log_events_logs_drops_through_tracing() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("lev");
    let peer = scratch_ns("levp");
    veth(&host, "gv0", "10.68.0.1/24", &peer, "gw0", "10.68.0.2/24").unwrap();
    let mut d = Daemon::start(&[
        "--iface", "gv0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own", "--log-events",
    ])
    .unwrap();
    send_udp(&peer, addr("10.68.0.2:7000"), addr("10.68.0.1:25000"), 2).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut stderr = d.child.stderr.take().unwrap();
    assert!(d.stop().unwrap().success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    let events: Vec<&str> = log.lines().filter(|l| l.contains("event:")).collect();
    assert_eq!(events.len(), 2, "{log}");
    assert!(events.iter().all(|l| l.contains("dropped_unsolicited") && l.contains("10.68.0.2:7000 -> 10.68.0.1:25000")));
}
