//! `natfix diagnose` against conditions built in throwaway namespaces: each
//! condition must be reported with its evidence, and a clean namespace must
//! report no problem.

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use natfix::lab::topology::{GuardTopology, HOST_EXT_IF};
use natfix_testkit::{ScratchNs, natfix, natfix_bin, root_setup, scratch_ns, veth};
use serde_json::Value;

/// `natfix diagnose` exit code when a problem is found (`natfix::diagnose::EXIT_PROBLEMS`).
const EXIT_PROBLEMS: i32 = 10;

fn diagnose(netns: &str, sample: &str) -> (i32, Value) {
    let out = natfix(&["diagnose", "--netns", netns, "--json", "--sample", sample]);
    let code = out.status.code().expect("exit code");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "diagnose printed no JSON ({e}); exit {code}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, v)
}

fn findings<'a>(v: &'a Value, check: &str) -> Vec<&'a Value> {
    v["findings"]
        .as_array()
        .expect("findings array")
        .iter()
        .filter(|f| f["check"] == check)
        .collect()
}

fn one<'a>(v: &'a Value, check: &str) -> &'a Value {
    let f = findings(v, check);
    assert_eq!(f.len(), 1, "want exactly one {check} finding in {v:#}");
    f[0]
}

fn evidence(f: &Value) -> Vec<String> {
    f["evidence"]
        .as_array()
        .expect("evidence array")
        .iter()
        .map(|e| e.as_str().expect("string").to_owned())
        .collect()
}

fn problems(v: &Value) -> Vec<&Value> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "problem")
        .collect()
}

/// Every finding carries the documented keys and types.
fn assert_schema(v: &Value) {
    for f in v["findings"].as_array().expect("findings") {
        assert!(f["check"].is_string() && f["summary"].is_string(), "{f}");
        assert!(
            ["info", "warning", "problem"].contains(&f["severity"].as_str().unwrap_or("")),
            "{f}"
        );
        assert!(
            f["evidence"].as_array().is_some_and(|e| e.iter().all(Value::is_string)),
            "{f}"
        );
        assert!(f.get("fix").is_none_or(Value::is_string), "{f}");
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn clean_namespace_has_no_problem() {
    root_setup();
    let ns = scratch_ns("dgclean");
    let (code, v) = diagnose(ns.path().to_str().unwrap(), "1");
    assert_schema(&v);
    assert!(problems(&v).is_empty(), "problems on a clean namespace: {v:#}");
    assert_eq!(code, 0);
    for check in [
        "guard.unsolicited",
        "guard.port-moved",
        "overlay.csum-errors",
        "overlay.vxlan-csum",
    ] {
        assert_eq!(one(&v, check)["severity"], "info", "{check}: {v:#}");
    }
    // The kernel checks ran too.
    for check in [
        "kernel.btf",
        "kernel.tcx",
        "kernel.xdp",
        "kernel.ct-kfuncs",
        "kernel.esp-offload",
        "iface.gro",
    ] {
        one(&v, check);
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn vxlan_device_sending_checksums_is_reported() {
    root_setup();
    let ns = scratch_ns("dgvx");
    for (name, id, port, csum) in [("vx0", "42", "4789", "udpcsum"), ("vx1", "43", "4790", "noudpcsum")] {
        ns.exec(&[
            "ip", "link", "add", name, "type", "vxlan", "id", id, "dstport", port, "local", "10.0.0.1", "remote",
            "10.0.0.2", csum,
        ])
        .expect("vxlan device");
    }
    let (code, v) = diagnose(ns.path().to_str().unwrap(), "1");
    assert_schema(&v);
    let f = one(&v, "overlay.vxlan-csum");
    let ev = evidence(f);
    let line = |dev: &str| {
        ev.iter()
            .find(|l| l.starts_with(&format!("{dev} ")))
            .unwrap_or_else(|| panic!("{dev} missing: {ev:#?}"))
    };
    assert!(
        line("vx0").contains("vni 42") && line("vx0").contains(", udpcsum") && line("vx0").contains("dstport 4789"),
        "{ev:#?}"
    );
    assert!(line("vx1").contains("noudpcsum"), "{ev:#?}");
    // Docker's own VXLAN devices (a swarm on this host) count too: ours are
    // one sending and one not among them.
    let summary = f["summary"].as_str().unwrap();
    let counts: Vec<usize> = summary.split_whitespace().filter_map(|w| w.parse().ok()).take(2).collect();
    let docker = ev.iter().filter(|l| l.contains("/docker/netns/")).count();
    assert!(summary.contains("VXLAN devices send UDP checksums"), "{f}");
    assert_eq!(counts.get(1), Some(&(2 + docker)), "{f}");
    assert!(counts[0] >= 1 && counts[0] <= 1 + docker, "{f}");
    // No ESP SAs: plain VXLAN through NAT is fine, so this is no problem.
    assert_eq!(f["severity"], "info");
    assert_eq!(code, 0);
}

/// A UDP datagram to `dst`:4789 with a deliberately wrong checksum, sent
/// through a raw socket in the calling thread's namespace.
fn send_bad_csum(dst: [u8; 4]) -> std::io::Result<()> {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut pkt = Vec::new();
    let payload = [0x08u8, 0, 0, 0, 0, 0, 42, 0, b'x', b'x', b'x', b'x'];
    pkt.extend_from_slice(&40000u16.to_be_bytes());
    pkt.extend_from_slice(&4789u16.to_be_bytes());
    pkt.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    pkt.extend_from_slice(&0x1234u16.to_be_bytes()); // wrong (and nonzero: 0 means "no checksum")
    pkt.extend_from_slice(&payload);
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: pkt and addr outlive the call; fd is ours.
    let n = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const addr).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if n < 0 { Err(err) } else { Ok(()) }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn rising_udp_checksum_errors_are_reported() {
    root_setup();
    let (rx, tx) = vxlan_pair();
    let (out, pid) = diagnose_while_bad_csums_arrive(&rx, &tx);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_schema(&v);
    assert_csum_errors_warned(&v, &rx);
    assert_eq!(out.status.code(), Some(0), "warnings only: exit 0");
    assert_drop_reasons(&v, pid);
}

/// A namespace with a VXLAN device on 4789 (checksums on), and its peer.
fn vxlan_pair() -> (ScratchNs, ScratchNs) {
    let rx = scratch_ns("dgcsr");
    let tx = scratch_ns("dgcst");
    veth(&rx, "u0", "10.98.0.1/24", &tx, "p0", "10.98.0.2/24").unwrap();
    rx.exec(&[
        "ip",
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "4789",
        "local",
        "10.98.0.1",
        "remote",
        "10.98.0.2",
        "udpcsum",
    ])
    .unwrap();
    rx.exec(&["ip", "link", "set", "vx0", "up"]).unwrap(); // opens the UDP socket on 4789
    (rx, tx)
}

/// `natfix diagnose --sample 2` on `rx` while `tx` sends it bad checksums:
/// its output and pid.
fn diagnose_while_bad_csums_arrive(rx: &ScratchNs, tx: &ScratchNs) -> (std::process::Output, u32) {
    // Bad datagrams keep arriving while diagnose samples.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU32::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let netns = tx.netns().unwrap();
        std::thread::spawn(move || {
            netns.run(move || {
                while !stop.load(Ordering::Relaxed) {
                    send_bad_csum([10, 98, 0, 1])?;
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            })
        })
    };
    let child = Command::new(natfix_bin())
        .args([
            "diagnose",
            "--netns",
            rx.path().to_str().unwrap(),
            "--json",
            "--sample",
            "2",
        ])
        .env("NATFIX_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run natfix");
    let pid = child.id();
    let out = child.wait_with_output().expect("natfix output");
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap().expect("sender");
    assert!(sent.load(Ordering::Relaxed) > 10, "the sender sent");
    (out, pid)
}

/// No Docker ESP SAs: the rising counter is a warning (not the overlay
/// problem), with no natfix fix.
fn assert_csum_errors_warned(v: &Value, rx: &ScratchNs) {
    let f = one(v, "overlay.csum-errors");
    assert_eq!(f["severity"], "warning", "{f}");
    assert!(f.get("fix").is_none(), "{f}");
    let ev = evidence(f);
    let counter = ev
        .iter()
        .find(|l| l.contains("UdpInCsumErrors"))
        .unwrap_or_else(|| panic!("{ev:#?}"));
    let rise: u64 = counter
        .split("(+")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rise in {counter}"));
    assert!(rise >= 10, "rise {rise}: {counter}");
    assert!(
        counter.contains(rx.path().to_str().unwrap()),
        "names the namespace: {counter}"
    );
    assert!(
        ev.iter().any(|l| l.contains("VXLAN ports in this namespace: 4789")),
        "{ev:#?}"
    );
}

/// Drop reasons come from tracefs when it is mounted (diagnose never mounts it).
fn assert_drop_reasons(v: &Value, pid: u32) {
    let d = one(v, "overlay.drop-reasons");
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|p| std::path::Path::new(p).join("instances").is_dir());
    if tracefs {
        assert!(evidence(d).iter().any(|l| l.starts_with("UDP_CSUM: ")), "{d:#}");
        assert_eq!(d["severity"], "warning", "{d:#}");
        // Its private tracefs instance is gone (other tests' runs may still have theirs).
        for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
            let inst = std::path::Path::new(root).join(format!("instances/natfix-diagnose-{pid}"));
            assert!(!inst.exists(), "{} left behind", inst.display());
        }
    } else {
        assert_eq!(d["summary"], "drop reasons not checked", "{d:#}");
        assert!(evidence(d)[0].contains("tracefs is not mounted"), "{d:#}");
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn seed_000_port_theft_is_reported_with_a_guard_command() {
    root_setup();
    let prefix = format!("dg{}", std::process::id());
    let t = GuardTopology::build(&prefix).expect("topology");
    t.remote_probe(25000, 7000).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let seen = t
        .container_flow_source(25000)
        .unwrap()
        .expect("the container's packet left");
    assert_ne!(seen.port(), 25000, "the failure must reproduce");

    let netns = format!("/run/netns/{prefix}-host");
    let (code, v) = diagnose(&netns, "1");
    assert_schema(&v);
    assert_eq!(code, EXIT_PROBLEMS, "a problem: {v:#}");

    let unsolicited = one(&v, "guard.unsolicited");
    assert_eq!(unsolicited["severity"], "warning", "{unsolicited}");
    assert!(
        evidence(unsolicited)
            .iter()
            .any(|l| l.contains("198.51.100.20:7000 -> 198.51.100.10:25000 [UNREPLIED]")),
        "the probe's entry: {unsolicited:#}"
    );

    let m = one(&v, "guard.port-moved");
    assert_eq!(m["severity"], "problem", "{m}");
    let ev = evidence(m);
    let left = format!(
        "container flow 10.77.0.2:25000 -> 198.51.100.20:7000 left as 198.51.100.10:{} (wanted port 25000)",
        seen.port()
    );
    assert!(ev.contains(&left), "want {left:?} in {ev:#?}");
    assert!(
        ev.iter()
            .any(|l| l.contains("port 25000 held by unsolicited entry udp 198.51.100.20:7000 -> 198.51.100.10:25000")),
        "{ev:#?}"
    );

    // The fix: a guard on the external interface covering 25000; the published
    // port 25500 (DNAT in the lab) falls inside and is exempted.
    let fix = m["fix"].as_str().expect("fix");
    assert!(
        fix.starts_with(&format!("natfix attach --iface {HOST_EXT_IF} --netns {netns} --guard ")),
        "{fix}"
    );
    let range = fix
        .split("--guard ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap();
    let (first, last) = range.split_once('-').unwrap();
    let (first, last): (u16, u16) = (first.parse().unwrap(), last.parse().unwrap());
    assert!(first <= 25000 && 25000 <= last, "{fix}");
    if (first..=last).contains(&natfix::lab::topology::PUBLISHED_PORT) {
        assert!(
            fix.contains(&format!("--allow-port {}", natfix::lab::topology::PUBLISHED_PORT)),
            "{fix}"
        );
    }
    // The suggested command is one natfix accepts.
    let words: Vec<&str> = fix.split_whitespace().collect();
    let parsed = <natfix::cli::Cli as clap::Parser>::try_parse_from(&words).expect("fix parses");
    let natfix::cli::Command::Attach(att) = parsed.command else {
        panic!("not attach")
    };
    att.spec().expect("fix validates");

    let published = one(&v, "guard.published-ports");
    assert!(
        evidence(published)
            .iter()
            .any(|l| l.starts_with("udp 25500: nft ip lab_nat chain pre")),
        "{published:#}"
    );

    // The human table says the same.
    let out = natfix(&["diagnose", "--netns", &netns, "--sample", "1"]);
    assert_eq!(out.status.code(), Some(EXIT_PROBLEMS));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("SEVERITY"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("problem") && l.contains("guard.port-moved")),
        "{text}"
    );
    assert!(text.contains(&format!("fix: {fix}")), "{text}");
}
