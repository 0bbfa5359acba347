//! `natfix set` changes a running attachment's settings in place: a solicited
//! flow loses nothing while settings flip back and forth, each flood batch is
//! judged by the setting in force, and the record and status follow; bad
//! changes are refused and leave the settings in force.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use natfix_testkit::{ScratchNs, count_udp, natfix, root_setup, scratch_ns, send_udp, stat, veth};
use serde_json::Value;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn record(ns: &ScratchNs) -> Value {
    let out = natfix(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["attachments"].as_array().unwrap().iter().find(|a| a["netns"] == ns.name.as_str()).cloned().expect("attachment listed")
}

fn set(ns: &ScratchNs, args: &[&str]) -> std::process::Output {
    let mut all = vec!["set", "--netns", &ns.name, "--iface", "ls0"];
    all.extend_from_slice(args);
    natfix(&all)
}

fn rig(tag: &str, subnet: u8, hook: &str) -> (ScratchNs, ScratchNs) {
    let host = scratch_ns(tag);
    let peer = scratch_ns(&format!("{tag}p"));
    veth(&host, "ls0", &format!("10.{subnet}.0.1/24"), &peer, "ls1", &format!("10.{subnet}.0.2/24")).unwrap();
    let out = natfix(&["attach", "--netns", &host.name, "--iface", "ls0", "--guard", "20000-30000", "--guard-hook", hook, "--flow-source", "own", "--pin"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (host, peer)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn settings_flip_100_times_under_a_flow_and_a_flood() {
    root_setup();
    for (hook, subnet) in [("xdp", 80), ("tc", 81)] {
        let (host, peer) = rig(&format!("live{hook}"), subnet, hook);
        let (h, p) = (format!("10.{subnet}.0.1"), format!("10.{subnet}.0.2"));
        // The solicited flow: the host's :25000 talks first, then the peer streams replies.
        let hsock = host.run({
            let (h, p) = (h.clone(), p.clone());
            move || {
                let s = natfix::lab::scratch::bind_udp(format!("{h}:25000").parse()?)?;
                s.send_to(b"hello", format!("{p}:7000"))?;
                s.set_read_timeout(Some(Duration::from_millis(300)))?;
                Ok(s)
            }
        })
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU32::new(0));
        let streamer = {
            let (stop, sent) = (stop.clone(), sent.clone());
            let psock = peer.run({
                let p = p.clone();
                move || Ok(natfix::lab::scratch::bind_udp(format!("{p}:7000").parse()?)?)
            })
            .unwrap();
            let to: SocketAddr = format!("{h}:25000").parse().unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    psock.send_to(&sent.load(Ordering::Relaxed).to_be_bytes(), to).unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let received = std::thread::spawn(move || {
            let mut n = 0u32;
            let mut buf = [0u8; 64];
            let mut quiet = 0;
            while quiet < 5 {
                match hsock.recv(&mut buf) {
                    Ok(_) => {
                        n += 1;
                        quiet = 0;
                    }
                    Err(_) => quiet += 1,
                }
            }
            n
        });
        let flood_to = addr(&format!("{h}:26000"));
        let flood_from = addr(&format!("{p}:9000"));
        for i in 0..100 {
            flip_round(&host, &peer, hook, i, flood_from, flood_to);
        }
        stop.store(true, Ordering::Relaxed);
        streamer.join().unwrap();
        let got = received.join().unwrap();
        let sent = sent.load(Ordering::Relaxed);
        assert!(sent > 100, "{hook}: the flow ran: {sent} sent");
        assert_eq!(got, sent, "{hook}: the solicited flow lost nothing across 100 changes");
        assert!(natfix(&["detach", "--netns", &host.name, "--iface", "ls0"]).status.success());
    }
}

/// Round `i` of the flips: one `natfix set`, then a flood batch to
/// `flood_to` judged by the setting now in force, and the record following.
fn flip_round(host: &ScratchNs, peer: &ScratchNs, hook: &str, i: u32, flood_from: SocketAddr, flood_to: SocketAddr) {
    // Even rounds: 26000 exempt; odd: not, and every fourth round dry-run.
    let (exempt, dry) = (i.is_multiple_of(2), i % 4 == 1);
    let change: Vec<&str> = match (exempt, dry) {
        (true, _) if i == 0 => vec!["--allow-port", "+26000"],
        (true, _) if i % 4 == 2 => vec!["--allow-port", "+26000", "--dry-run", "off"],
        (true, _) => vec!["--allow-port", "+26000"],
        (false, true) => vec!["--allow-port", "-26000", "--dry-run", "on"],
        (false, false) => vec!["--allow-port", "-26000"],
    };
    let out = set(host, &change);
    assert!(out.status.success(), "{hook} round {i}: {change:?}: {}", String::from_utf8_lossy(&out.stderr));
    let reason = match (exempt, dry) {
        (true, _) => "exempt_port",
        (false, true) => "would_drop",
        (false, false) => "dropped_unsolicited",
    };
    let before = stat(&host.name, "ls0", "guard", reason);
    let rx = count_udp(host, flood_to, Duration::from_millis(150)).unwrap();
    send_udp(peer, flood_from, flood_to, 5).unwrap();
    let got = rx.join().unwrap().unwrap();
    assert_eq!(stat(&host.name, "ls0", "guard", reason), before + 5, "{hook} round {i}: 5 counted {reason}");
    assert_eq!(got, if reason == "dropped_unsolicited" { 0 } else { 5 }, "{hook} round {i}: {reason}");
    let r = record(host);
    let allow: Vec<u64> = r["guard"]["allow_ports"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert_eq!(allow.contains(&26000), exempt, "{hook} round {i}: record: {r}");
    assert_eq!(r["guard"]["dry_run"] == true, dry, "{hook} round {i}: record: {r}");
    assert_eq!(r["state"], "pinned", "{hook} round {i}: {r}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn bad_changes_are_refused_and_change_nothing() {
    root_setup();
    let (host, peer) = rig("livebad", 82, "xdp");
    assert!(set(&host, &["--allow-port", "25000", "--allow-src", "192.0.2.0/24"]).status.success());
    let before = record(&host);
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--allow-port", "40000"], 2, "outside every --guard range"),
        (&["--allow-port", "-25001"], 2, "is not an exempt port"),
        (&["--allow-src", "-198.51.100.0/24"], 2, "is not an allowed source"),
        (&["--allow-src", "+10.0.0.0/33"], 2, "prefix length"),
        (&["--guard", "20000-24000"], 2, "outside every --guard range"),
        (&["--vxlan-port", "4789"], 2, "has no overlay fix"),
        (&["--dry-run", "maybe"], 2, "is not on or off"),
        (&[], 2, "nothing to change"),
    ];
    for (args, code, says) in cases {
        let out = set(&host, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = natfix(&["set", "--netns", &host.name, "--iface", "nope0", "--dry-run", "on"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    // A change the kernel refuses half way (the IPv4 allow-src trie holds 1,024
    // prefixes) puts the previous settings back.
    let many: Vec<String> = (0..1100).map(|i| format!("+10.{}.{}.0/24", i / 256, i % 256)).collect();
    let mut args = vec!["set", "--netns", host.name.as_str(), "--iface", "ls0", "--dry-run", "on"];
    for m in &many {
        args.extend(["--allow-src", m.as_str()]);
    }
    let out = natfix(&args);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let after = record(&host);
    assert_eq!(after["guard"], before["guard"], "the record is as before");
    // And the kernel: unsolicited UDP is still dropped (dry-run did not stay on),
    // from a source the failed change would have allowed.
    let rx = count_udp(&host, addr("10.82.0.1:26000"), Duration::from_millis(300)).unwrap();
    send_udp(&peer, addr("10.82.0.2:9000"), addr("10.82.0.1:26000"), 3).unwrap();
    assert_eq!(rx.join().unwrap().unwrap(), 0, "the previous settings are in force");
    assert!(natfix(&["detach", "--netns", &host.name, "--iface", "ls0"]).status.success());
}
