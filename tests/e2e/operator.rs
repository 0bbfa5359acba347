//! What a new operator runs into first: `ip netns exec`, `stats --watch`,
//! wall-clock event times, and the log switches.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use natfix_testkit::{Daemon, DetachOnDrop, count_udp, natfix, natfix_bin, output_within, root_setup, scratch_ns, send_udp, veth};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn ip_netns_exec_attaches_in_the_foreground_and_refuses_to_pin() {
    root_setup();
    let host = scratch_ns("ipx");
    let peer = scratch_ns("ipxp");
    veth(&host, "ix0", "10.91.0.1/24", &peer, "iy0", "10.91.0.2/24").unwrap();
    let bin = natfix_bin();
    let base = ["netns", "exec", host.name.as_str(), bin.to_str().unwrap(), "attach", "--iface", "ix0", "--guard", "20000-30000"];

    // --pin would pin into a bpffs that goes with the command: refused, with the way that works.
    let out = output_within(Command::new("ip").args(base).arg("--pin"), Duration::from_mins(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains(&format!("--netns {}", host.name)), "names the namespace: {err}");

    // In the foreground it works, and says that the host's `status` will not see it.
    let mut child = Command::new("ip").args(base).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the foreground attach runs");
    let rx = count_udp(&host, addr("10.91.0.1:25000"), Duration::from_millis(300)).unwrap();
    send_udp(&peer, addr("10.91.0.2:7000"), addr("10.91.0.1:25000"), 3).unwrap();
    assert_eq!(rx.join().unwrap().unwrap(), 0, "the guard drops unsolicited UDP");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("private bpffs"), "{err}");
    let rx = count_udp(&host, addr("10.91.0.1:25000"), Duration::from_millis(300)).unwrap();
    send_udp(&peer, addr("10.91.0.2:7000"), addr("10.91.0.1:25000"), 3).unwrap();
    assert_eq!(rx.join().unwrap().unwrap(), 3, "detached on SIGTERM");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn stats_watch_prints_rates_and_monitor_prints_wall_clock_time() {
    root_setup();
    let host = scratch_ns("wat");
    let peer = scratch_ns("watp");
    veth(&host, "wa0", "10.92.0.1/24", &peer, "wb0", "10.92.0.2/24").unwrap();
    let d = Daemon::start(&["--iface", "wa0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own"]).unwrap();
    let watch = Command::new(natfix_bin())
        .args(["stats", "--watch", "1", "--netns", &host.name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let monitor = Command::new(natfix_bin())
        .args(["monitor", "--json", "--count", "1", "--netns", &host.name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    // 200 drops inside one watch interval.
    send_udp(&peer, addr("10.92.0.2:7000"), addr("10.92.0.1:25000"), 200).unwrap();
    std::thread::sleep(Duration::from_millis(1800));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(watch.id()).unwrap()), nix::sys::signal::Signal::SIGINT).unwrap();
    let text = String::from_utf8_lossy(&watch.wait_with_output().unwrap().stdout).into_owned();
    let rates: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("dropped_unsolicited") && l.ends_with("pkts/s"))
        .filter_map(|l| l.split_whitespace().rev().nth(1)?.parse().ok())
        .collect();
    assert!(rates.len() >= 2, "a rate beside the total after the first print: {text}");
    assert!(rates.iter().any(|r| *r >= 100.0), "one interval saw the 200 drops: {rates:?}\n{text}");

    let out = monitor.wait_with_output().unwrap();
    let event: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let time = event["time"].as_str().expect("a wall-clock time");
    let at = humantime::parse_rfc3339(time).expect("RFC 3339");
    let off = SystemTime::now().duration_since(at).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_secs(30), "{time} is now");
    assert!(d.stop().unwrap().success());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn log_switches_and_no_colour_in_a_pipe() {
    root_setup();
    let host = scratch_ns("logs");
    let peer = scratch_ns("logsp");
    veth(&host, "lg0", "10.93.0.1/24", &peer, "lh0", "10.93.0.2/24").unwrap();
    let _detach = DetachOnDrop { iface: "lg0", netns: &host.name };
    let attach = |flags: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(natfix_bin());
        cmd.env_remove("NATFIX_LOG").env_remove("RUST_LOG").envs(env.iter().copied()).args(flags);
        cmd.args(["attach", "--iface", "lg0", "--netns", &host.name, "--guard", "20000-30000", "--pin", "--replace"]);
        let out = output_within(&mut cmd, Duration::from_mins(1));
        assert!(out.status.success(), "{flags:?} {env:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let default = attach(&[], &[]);
    assert!(default.contains("INFO"), "info by default: {default}");
    assert!(!default.contains("DEBUG"), "{default}");
    assert!(!default.contains('\x1b'), "no ANSI colour when stderr is not a terminal: {default:?}");
    assert!(attach(&[], &[("RUST_LOG", "debug")]).contains("DEBUG"), "RUST_LOG is honoured");
    assert!(attach(&["-v"], &[]).contains("DEBUG"), "-v is debug");
    let quiet = attach(&["-q"], &[("RUST_LOG", "debug")]);
    assert!(!quiet.contains("INFO") && !quiet.contains("DEBUG"), "-q wins over RUST_LOG: {quiet}");
    assert!(attach(&[], &[("NATFIX_LOG", "debug"), ("RUST_LOG", "warn")]).contains("DEBUG"), "NATFIX_LOG before RUST_LOG");
    assert!(natfix(&["detach", "--iface", "lg0", "--netns", &host.name]).status.success());
}
