//! The runtime image on a real Docker engine: seed 000 behind Docker's own
//! masquerade, fixed by natfix running from `natfix:latest` in a container
//! started with deploy/compose.yml's capabilities and mounts.
//!
//! A peer in a scratch namespace sits behind a veth made here (host side in
//! the host namespace, TEST-NET-2 addresses); a container on docker0 sends
//! to it, masqueraded by Docker's rule. natfix guards the veth from inside
//! its own container. Everything made here (containers, veth, namespace,
//! conntrack entries of the test's addresses) goes on drop, failure or not.

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use natfix::{lab::scratch::bind_udp, sys::netns::Netns};
use natfix_testkit::{
    ScratchNs,
    docker::{self, docker},
    natfix, root_setup, scratch_ns, sh, skip, sock,
};

const IMAGE: &str = docker::NATFIX_IMAGE;
const GUARDED: u16 = 25000;
const PEER_PORT: u16 = 7000;

/// `docker run` flags for deploy/compose.yml's service: its capabilities,
/// namespaces and host mounts (its natfix.toml aside: `attach` takes flags).
fn compose_run_flags() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose.yml");
    let doc: yaml_serde::Value = yaml_serde::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let service = &doc["services"]["natfix"];
    let mut flags = vec![
        format!("--network={}", service["network_mode"].as_str().unwrap()),
        format!("--pid={}", service["pid"].as_str().unwrap()),
    ];
    for cap in service["cap_add"].as_sequence().unwrap() {
        flags.push(format!("--cap-add={}", cap.as_str().unwrap()));
    }
    for volume in service["volumes"].as_sequence().unwrap() {
        let volume = volume.as_str().unwrap();
        if volume.starts_with('/') {
            flags.push(format!("--volume={volume}"));
        }
    }
    flags
}

/// What the test made on the host, removed on drop.
struct Setup {
    peer: ScratchNs,
    /// Host side of the veth, in the host namespace; its peer is the peer's eth0.
    veth: String,
    host_ip: String,
    peer_ip: String,
    containers: Vec<String>,
    container_ip: Option<String>,
}

impl Setup {
    fn build() -> Result<Self> {
        let id = std::process::id() % 100_000;
        // A /30 of TEST-NET-2 (198.51.100.0/24) per process: concurrent runs do not meet.
        let base = (id % 64) * 4;
        let (host_ip, peer_ip) = (format!("198.51.100.{}", base + 1), format!("198.51.100.{}", base + 2));
        let peer = scratch_ns("dkpeer");
        let veth = format!("nfd{id}h");
        let setup = Self { peer, veth: veth.clone(), host_ip, peer_ip, containers: Vec::new(), container_ip: None };
        let tmp = format!("nfd{id}p");
        sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &tmp])?;
        sh(&["ip", "link", "set", &tmp, "netns", &setup.peer.name, "name", "eth0"])?;
        sh(&["ip", "addr", "add", &format!("{}/30", setup.host_ip), "dev", &veth])?;
        sh(&["ip", "link", "set", &veth, "up"])?;
        setup.peer.exec(&["ip", "addr", "add", &format!("{}/30", setup.peer_ip), "dev", "eth0"])?;
        setup.peer.exec(&["ip", "link", "set", "eth0", "up"])?;
        Ok(setup)
    }

    /// Starts a container; removed on drop.
    fn run_container(&mut self, name: &str, args: &[String]) -> Result<String> {
        let name = format!("natfix-test-{name}-{}", std::process::id());
        let _ = docker(&["rm", "-f", &name]);
        let mut cmd: Vec<&str> = vec!["run", "-d", "--name", &name];
        cmd.extend(args.iter().map(String::as_str));
        docker(&cmd)?;
        self.containers.push(name.clone());
        Ok(name)
    }

    /// An idle container on docker0 whose network namespace the test uses.
    fn client(&mut self) -> Result<Netns> {
        let name = self.run_container("client", &["--network=bridge", "--entrypoint=sleep", IMAGE, "600"].map(str::to_owned))?;
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &name])?;
        self.container_ip = Some(docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name])?.trim().to_owned());
        Netns::resolve(Some(&format!("/proc/{}/ns/net", pid.trim())))
    }

    fn peer_addr(&self, port: u16) -> SocketAddr {
        sock(&self.peer_ip, port)
    }

    fn host_addr(&self, port: u16) -> SocketAddr {
        sock(&self.host_ip, port)
    }

    /// Forgets the test's flows in the host's conntrack (only its own addresses).
    fn flush_conntrack(&self) {
        for ip in std::iter::once(&self.peer_ip).chain(self.container_ip.as_ref()) {
            let _ = Command::new("conntrack").args(["-D", "-p", "udp", "--orig-src", ip]).output();
        }
    }

    /// The host's conntrack entries whose original source is the peer.
    fn entries_from_peer(&self) -> Vec<String> {
        let out = Command::new("conntrack").args(["-L", "-p", "udp", "--orig-src", &self.peer_ip]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        // Deleting one end deletes the pair; the peer's namespace goes with `peer`.
        let _ = Command::new("ip").args(["link", "del", &self.veth]).output();
        self.flush_conntrack();
    }
}

/// Seed 000's sequence: the peer probes host:25000, then the client sends from
/// :25000 to the peer, which answers the port it saw. Returns (the port the
/// peer saw, whether the answer reached the client).
fn seed_000(s: &Setup, client: &Netns) -> Result<(Option<u16>, bool)> {
    s.peer.send_udp(s.peer_addr(PEER_PORT), s.host_addr(GUARDED), 1)?;
    std::thread::sleep(Duration::from_millis(100));
    let heard = s.peer.recv_udp(s.peer_addr(PEER_PORT), Duration::from_millis(1500))?;
    let peer = s.peer_addr(PEER_PORT);
    let client = client.clone();
    let answered = std::thread::spawn(move || {
        client.run(move || {
            let sock = bind_udp(sock("0.0.0.0", GUARDED))?;
            sock.send_to(b"hello", peer)?;
            Ok(wait_for_datagram(&sock, Duration::from_secs(3)))
        })
    });
    let seen = heard.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??.first().copied();
    if let Some(from) = seen {
        // The source the peer saw is the masqueraded one; answer it.
        s.peer.send_udp(s.peer_addr(PEER_PORT), from, 1)?;
    }
    let answered = answered.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    Ok((seen.map(|a| a.port()), answered))
}

fn wait_for_datagram(sock: &UdpSocket, wait: Duration) -> bool {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let end = Instant::now() + wait;
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        if sock.recv_from(&mut buf).is_ok() {
            return true;
        }
    }
    false
}

/// The host's natfix attachment on `iface`, as `natfix status --json` shows it.
fn attachment(iface: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&natfix(&["status", "--json"]).stdout).unwrap_or_default();
    v["attachments"].as_array()?.iter().find(|a| a["iface"] == iface && a["netns"] == "self").cloned()
}

fn guard_counter(iface: &str, reason: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&natfix(&["stats", "--json", "--iface", iface]).stdout).unwrap_or_default();
    v["attachments"][0]["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["program"] == "guard" && c["reason"] == reason)
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or(0)
}

/// Starts natfix from the image, guarding the veth; waits until the host sees it running.
fn start_natfix(s: &mut Setup) -> Result<String> {
    let mut args = compose_run_flags();
    // `attach` serves no /healthz: the image's health check is the agent's.
    args.extend(["--no-healthcheck", IMAGE, "attach", "--iface", &s.veth, "--guard", "20000-30000", "--no-reap"].map(str::to_owned));
    let name = s.run_container("natfix", &args)?;
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if attachment(&s.veth).is_some_and(|a| a["state"] == "running") {
            return Ok(name);
        }
        if docker(&["inspect", "-f", "{{.State.Running}}", &name])?.trim() != "true" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = Command::new("docker").args(["logs", &name]).output().context("docker logs")?;
    bail!("natfix from {IMAGE} did not attach to {}: {}", s.veth, String::from_utf8_lossy(&logs.stderr).trim())
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn natfix_image_fixes_seed_000_behind_dockers_masquerade() {
    root_setup();
    if let Some(why) = docker::image_unavailable() {
        skip(&why);
        return;
    }
    docker::ensure_shared_root();
    let mut s = Setup::build().expect("veth and peer namespace");
    let client = s.client().expect("client container");

    // Without natfix: Docker's masquerade has to move the flow off :25000.
    let (seen, _) = seed_000(&s, &client).unwrap();
    assert!(seen.is_some(), "the client's datagram reached the peer");
    assert_ne!(seen, Some(GUARDED), "the failure must reproduce: the probe's entry holds host:{GUARDED}");
    eprintln!("without natfix: the client's flow from :{GUARDED} left as :{}", seen.unwrap_or_default());
    s.flush_conntrack();

    let natfix_container = start_natfix(&mut s).unwrap();
    let (seen, answered) = seed_000(&s, &client).unwrap();
    assert_eq!(seen, Some(GUARDED), "with natfix the client keeps its port");
    assert!(answered, "the peer's answer reaches the client");
    assert_eq!(guard_counter(&s.veth, "dropped_unsolicited"), 1, "the probe was dropped");

    // 2,000 unsolicited datagrams from 20 peer ports over the guarded range.
    let (peer, host_ip) = (s.peer_addr(0), s.host_ip.clone());
    s.peer
        .run(move || {
            for p in 0..20u16 {
                let from = bind_udp(SocketAddr::new(peer.ip(), 41000 + p))?;
                for d in 0..100u16 {
                    from.send_to(b"probe", sock(&host_ip, 20000 + (p * 487 + d * 97) % 10001))?;
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            Ok(())
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let left = s.entries_from_peer();
    assert!(left.is_empty(), "the flood left conntrack entries: {left:#?}");
    let dropped = guard_counter(&s.veth, "dropped_unsolicited");
    assert!(dropped > 1_900, "the guard dropped the flood ({dropped}; a veth may lose a few)");

    // docker stop sends SIGTERM: natfix detaches and exits 0.
    docker(&["stop", "-t", "30", &natfix_container]).unwrap();
    assert_eq!(docker(&["inspect", "-f", "{{.State.ExitCode}}", &natfix_container]).unwrap().trim(), "0");
    assert!(attachment(&s.veth).is_none(), "natfix detached on SIGTERM");
    let link = sh(&["ip", "-d", "-j", "link", "show", "dev", &s.veth]).unwrap();
    assert!(!link.contains("\"xdp\""), "no XDP program left on {}: {link}", s.veth);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn image_labels_name_the_binarys_version_and_commit() {
    root_setup();
    if let Some(why) = docker::image_unavailable() {
        skip(&why);
        return;
    }
    let version = docker(&["run", "--rm", "--network=none", IMAGE, "--version"]).unwrap();
    let label = |l: &str| docker(&["image", "inspect", "-f", &format!("{{{{index .Config.Labels \"{l}\"}}}}"), IMAGE]).unwrap();
    let (v, c) = (label("org.opencontainers.image.version"), label("org.opencontainers.image.revision"));
    assert_eq!(version.trim(), format!("natfix {} ({})", v.trim(), c.trim()), "labels against `natfix --version`");
    assert_ne!(c.trim(), "unknown", "the image's binary names its commit");
    // What natfix runs at run time is in the image.
    let probe = "for t in nft ip tc modprobe modinfo iptables-save; do command -v $t; done";
    let tools = docker(&["run", "--rm", "--network=none", "--entrypoint=sh", IMAGE, "-c", probe]).unwrap();
    assert_eq!(tools.lines().count(), 6, "{tools}");
}
