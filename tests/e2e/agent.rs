//! `natfix agent` in namespaces (Docker's part is in `docker_agent.rs`): it
//! attaches what its config lists, waits for what does not exist yet,
//! attaches again when a namespace is recreated, changes settings in place
//! on reload without losing a packet, keeps running attachments through a
//! bad reload, serves every attachment's metrics, and leaves nothing behind.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use natfix_testkit::{
    ScratchNs,
    agent::{AgentProc, records},
    count_udp, ensure_bpffs, root_setup, scratch_ns, send_udp, veth, xdp_prog_id,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A host namespace with `h0` (10.N.0.1) towards a peer (10.N.0.2).
fn pair(tag: &str, n: u8) -> (ScratchNs, ScratchNs) {
    let host = scratch_ns(tag);
    let peer = scratch_ns(&format!("{tag}p"));
    veth(&host, "h0", &format!("10.{n}.0.1/24"), &peer, "p0", &format!("10.{n}.0.2/24")).unwrap();
    (host, peer)
}

/// Unsolicited UDP from the peer to host:`port` reaches the host?
fn reaches(host: &ScratchNs, peer: &ScratchNs, n: u8, port: u16) -> bool {
    let rx = count_udp(host, addr(&format!("10.{n}.0.1:{port}")), Duration::from_millis(300)).unwrap();
    send_udp(peer, addr(&format!("10.{n}.0.2:7000")), addr(&format!("10.{n}.0.1:{port}")), 3).unwrap();
    rx.join().unwrap().unwrap() == 3
}

fn record_of<'a>(all: &'a [serde_json::Value], netns: &str) -> Option<&'a serde_json::Value> {
    all.iter().find(|r| r["netns"] == netns)
}

fn scrape(agent: &AgentProc) -> String {
    ureq::get(&format!("http://{}/metrics", agent.metrics)).call().unwrap().into_body().read_to_string().unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn agent_attaches_waits_serves_and_detaches_on_stop() {
    root_setup();
    let (host, peer) = pair("agt", 101);
    let late = format!("{}-late", host.name);
    let config = format!(
        "[[attach]]\nnetns = \"{}\"\niface = \"h0\"\nguard = \"20000-30000\"\nflow-source = \"own\"\n\n[[attach]]\nnetns = \"{late}\"\niface = \"eth0\"\nguard = [\"20000-30000\"]\n",
        host.name
    );
    let agent = AgentProc::start("main", 19481, &config).unwrap();
    let h = agent.health().unwrap();
    let states: Vec<&str> = h["attachments"].as_array().unwrap().iter().map(|e| e["state"].as_str().unwrap()).collect();
    assert_eq!(states.len(), 2, "{h}");
    // The first attaches at start; the second waits for its namespace, saying why.
    let end = Instant::now() + Duration::from_secs(10);
    while agent.health().unwrap()["attachments"][0]["state"] != "attached" {
        assert!(Instant::now() < end, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let h = agent.health().unwrap();
    assert_eq!(h["attachments"][1]["state"], "waiting", "{h}");
    assert!(h["attachments"][1]["detail"].as_str().unwrap().contains(&late), "{h}");
    let all = records();
    let rec = record_of(&all, &host.name).expect("recorded");
    assert_eq!(rec["state"], "pinned");
    assert_eq!(rec["managed"]["config"], agent.config.display().to_string(), "recorded as the agent's: {rec}");
    assert!(!reaches(&host, &peer, 101, 25000), "the guard drops unsolicited UDP");

    // One scrape has every attachment and what the agent is configured for.
    let text = scrape(&agent);
    assert!(text.contains(&format!("natfix_configured_attached{{iface=\"h0\",netns=\"{}\"}} 1", host.name)), "{text}");
    assert!(text.contains(&format!("natfix_configured_attached{{iface=\"eth0\",netns=\"{late}\"}} 0")), "{text}");
    assert!(text.contains(&format!("natfix_packets_total{{iface=\"h0\",netns=\"{}\",program=\"guard\",reason=\"dropped_unsolicited\"}} 3", host.name)), "{text}");

    // The namespace appears, its interface a moment later: attached once both exist.
    let late_ns = ScratchNs::create(&late).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    late_ns.exec(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]).unwrap();
    late_ns.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
    let took = agent.wait_attached(Duration::from_secs(5)).unwrap();
    assert!(took < Duration::from_secs(2), "attached {took:?} after the interface appeared");

    assert!(agent.stop().unwrap().success());
    let all = records();
    assert!(record_of(&all, &host.name).is_none() && record_of(&all, &late).is_none(), "nothing left: {all:#?}");
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), None, "the XDP program is gone");
    assert!(reaches(&host, &peer, 101, 25000), "fail-open after stop");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_recreated_namespace_is_attached_again_within_2_s() {
    root_setup();
    let peer = scratch_ns("agrp");
    let name = format!("{}-x", peer.name);
    // As Docker does: the namespace file, then its interface.
    let make = || {
        let host = ScratchNs::create(&name).unwrap();
        veth(&host, "v0", "10.102.0.1/24", &peer, "w0", "10.102.0.2/24").unwrap();
        host
    };
    let mut host = Some(make());
    let agent = AgentProc::start("recreate", 19482, &format!("[[attach]]\nnetns = \"{name}\"\niface = \"v0\"\nguard = \"20000-30000\"\n")).unwrap();
    agent.wait_attached(Duration::from_secs(10)).unwrap();
    let mut worst = Duration::ZERO;
    for round in 0..3 {
        drop(host.take());
        std::thread::sleep(Duration::from_millis(500));
        let created = Instant::now();
        host = Some(make());
        agent.wait_attached(Duration::from_secs(10)).unwrap();
        worst = worst.max(created.elapsed());
        let all = records();
        let ours: Vec<_> = all.iter().filter(|r| r["netns"] == name.as_str()).collect();
        assert_eq!(ours.len(), 1, "round {round}: one record, nothing stale: {all:#?}");
        assert_eq!(ours[0]["state"], "pinned", "round {round}: {}", ours[0]);
        let rx = count_udp(host.as_ref().unwrap(), addr("10.102.0.1:25000"), Duration::from_millis(300)).unwrap();
        send_udp(&peer, addr("10.102.0.2:7000"), addr("10.102.0.1:25000"), 3).unwrap();
        assert_eq!(rx.join().unwrap().unwrap(), 0, "round {round}: guarded again");
    }
    eprintln!("attached again at worst {worst:?} after the namespace appeared");
    assert!(worst <= Duration::from_secs(2), "attached again {worst:?} after the namespace appeared");
    assert!(agent.stop().unwrap().success());
    assert!(records().iter().all(|r| r["netns"] != name.as_str()));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn reload_changes_settings_in_place_losing_nothing_and_refuses_a_bad_config() {
    root_setup();
    ensure_bpffs();
    let (host, peer) = pair("agrl", 103);
    let entry = |ranges: &str| format!("[[attach]]\nnetns = \"{}\"\niface = \"h0\"\nguard = [{ranges}]\nflow-source = \"own\"\n", host.name);
    // Conntrack active in the host, as on any Docker host: the flow below sent
    // once, before its port was guarded; the reload learns it from conntrack.
    host.nft("table ip t { chain c { type filter hook input priority 0; ct state established accept; }; }").unwrap();
    let agent = AgentProc::start("reload", 19483, &entry("\"20000-21000\"")).unwrap();
    agent.wait_attached(Duration::from_secs(10)).unwrap();
    let prog = xdp_prog_id(&host, "h0").unwrap();

    // A solicited flow on 25000, outside the range at first: the host talks, the peer answers.
    let stop = Arc::new(AtomicBool::new(false));
    let hs = host.run(|| Ok(natfix_testkit::bind_udp(addr("10.103.0.1:25000"))?)).unwrap();
    hs.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    hs.send_to(b"hi", addr("10.103.0.2:7000")).unwrap();
    let ps = peer.run(|| Ok(natfix_testkit::bind_udp(addr("10.103.0.2:7000"))?)).unwrap();
    let sender = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ps.send_to(&n.to_be_bytes(), addr("10.103.0.1:25000")).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            n
        })
    };
    let receiver = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut got = 0u64;
            let mut buf = [0u8; 16];
            loop {
                match hs.recv_from(&mut buf) {
                    Ok((8, _)) => got += 1,
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Ok(_) | Err(_) => {}
                }
            }
            got
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The range grows over the running flow, and back, five times.
    for _ in 0..5 {
        for ranges in ["\"20000-21000\", \"25000-26000\"", "\"20000-21000\""] {
            agent.reload(&entry(ranges)).unwrap();
            let want = if ranges.contains("25000") { 2 } else { 1 };
            let end = Instant::now() + Duration::from_secs(5);
            while records().iter().find(|r| r["netns"] == host.name.as_str()).map_or(0, |r| r["guard"]["ranges"].as_array().map_or(0, Vec::len)) != want {
                assert!(Instant::now() < end, "reload not applied: {}", agent.log());
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, got) = (sender.join().unwrap(), receiver.join().unwrap());
    assert!(sent > 1000, "the flow ran: {sent}");
    assert_eq!(got, sent, "not one datagram of the solicited flow lost across 10 reloads");
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), prog, "changed in place: the same program");
    assert!(agent.log().contains("settings changed in place"), "{}", agent.log());

    out_of_band_set_is_put_back(&agent, &host, &peer, prog);

    // A bad config is refused; the attachment stays as it was.
    agent.reload("[[attach]]\nguard = \"30000-20000\"\n").unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !agent.log().contains("config not reloaded") {
        assert!(Instant::now() < end, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(agent.log().contains("natfix.toml:3:9: range `30000-20000` is reversed"), "names file, line, column: {}", agent.log());
    assert_eq!(agent.health().unwrap()["attachments"][0]["state"], "attached");
    assert!(!reaches(&host, &peer, 103, 20500), "still guarded");

    // An entry removed from the config is detached.
    agent.reload("").unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while records().iter().any(|r| r["netns"] == host.name.as_str()) {
        assert!(Instant::now() < end, "not detached: {}", agent.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(reaches(&host, &peer, 103, 20500));
    assert!(agent.stop().unwrap().success());
}

/// An out-of-band `natfix set` on a kept attachment is warned about, and
/// the agent puts its config back at its next full pass (every 10 s).
fn out_of_band_set_is_put_back(agent: &AgentProc, host: &ScratchNs, peer: &ScratchNs, prog: Option<u64>) {
    let changed = natfix_testkit::natfix(&["set", "--netns", &host.name, "--iface", "h0", "--allow-port", "+20500"]);
    assert!(changed.status.success(), "{}", String::from_utf8_lossy(&changed.stderr));
    assert!(String::from_utf8_lossy(&changed.stderr).contains("kept by natfix agent"), "warned: {}", String::from_utf8_lossy(&changed.stderr));
    assert!(reaches(host, peer, 103, 20500), "the set took effect");
    let end = Instant::now() + Duration::from_secs(15);
    while records().iter().find(|r| r["netns"] == host.name.as_str()).is_some_and(|r| r["guard"]["allow_ports"].as_array().is_some_and(|a| !a.is_empty())) {
        assert!(Instant::now() < end, "config not put back: {}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!reaches(host, peer, 103, 20500), "guarded again as the config says");
    assert_eq!(xdp_prog_id(host, "h0").unwrap(), prog, "put back in place: the same program");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_restarted_agent_keeps_its_attachments_in_place() {
    root_setup();
    let (host, peer) = pair("agpn", 104);
    let entry = format!("[[attach]]\nnetns = \"{}\"\niface = \"h0\"\nguard = \"20000-30000\"\n", host.name);
    let agent = AgentProc::start("pin", 19484, &format!("pin = true\n{entry}")).unwrap();
    agent.wait_attached(Duration::from_secs(10)).unwrap();
    let prog = xdp_prog_id(&host, "h0").unwrap().expect("attached");
    assert!(agent.stop().unwrap().success());
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), Some(prog), "pin = true: the attachment outlives the agent");
    assert!(!reaches(&host, &peer, 104, 25000));

    // Killed without cleaning up, then started again: it keeps what it finds.
    let agent = AgentProc::start("pin2", 19484, &entry).unwrap();
    agent.wait_attached(Duration::from_secs(10)).unwrap();
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), Some(prog), "adopted, not reloaded");
    agent.kill().unwrap();
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), Some(prog), "a killed agent leaves protection in place");
    let agent = AgentProc::start("pin3", 19484, &entry).unwrap();
    agent.wait_attached(Duration::from_secs(10)).unwrap();
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), Some(prog));
    assert!(agent.stop().unwrap().success());
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), None, "pin = false: detached at stop");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn ports_the_namespace_starts_to_dnat_are_exempted() {
    root_setup();
    let (host, peer) = pair("agdn", 105);
    let agent = AgentProc::start("dnat", 19485, &format!("[[attach]]\nnetns = \"{}\"\niface = \"h0\"\nguard = \"20000-30000\"\n", host.name)).unwrap();
    agent.wait_attached(Duration::from_secs(10)).unwrap();
    assert!(!reaches(&host, &peer, 105, 25600));
    // As `docker run -p 25600:25600/udp` would: a DNAT rule (to the host itself here).
    host.nft("table ip pub { chain pre { type nat hook prerouting priority -100; udp dport 25600 dnat to 10.105.0.1:25601; }; }").unwrap();
    let end = Instant::now() + Duration::from_secs(15);
    while records().iter().find(|r| r["netns"] == host.name.as_str()).is_none_or(|r| r["guard"]["published"] != serde_json::json!([25600])) {
        assert!(Instant::now() < end, "the DNAT'd port was not exempted: {}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let rx = count_udp(&host, addr("10.105.0.1:25601"), Duration::from_millis(300)).unwrap();
    send_udp(&peer, addr("10.105.0.2:7000"), addr("10.105.0.1:25600"), 3).unwrap();
    assert_eq!(rx.join().unwrap().unwrap(), 3, "new flows to the published port pass");
    assert!(!reaches(&host, &peer, 105, 25602), "its neighbours stay guarded");
    assert!(agent.stop().unwrap().success());
}
