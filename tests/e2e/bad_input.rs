//! Bad invocations: each gets one clear error line and its exit code, never
//! a panic, and leaves nothing attached.

use aya::programs::{TcAttachType, Xdp, XdpMode};
use std::time::Duration;

use natfix_testkit::{ensure_bpffs, natfix_bin, output_within, root_setup, scratch_ns, tcx_prog_ids, veth};

struct Case {
    args: Vec<String>,
    code: i32,
    says: &'static str,
}

fn case(args: &str, code: i32, says: &'static str) -> Case {
    Case { args: args.split_whitespace().map(str::to_owned).collect(), code, says }
}

fn check(cmd: &mut std::process::Command, c: &Case) {
    let out = output_within(cmd.args(&c.args).env("NATFIX_LOG", "warn"), Duration::from_mins(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(c.code), "{:?}: exit code; stderr: {err}", c.args);
    assert!(err.contains(c.says), "{:?}: stderr should say {:?}: {err}", c.args, c.says);
    assert!(!err.contains("panicked"), "{:?} panicked: {err}", c.args);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn bad_invocations_exit_with_clear_errors() {
    root_setup();
    ensure_bpffs();
    let ns = scratch_ns("bad");
    let n = ns.name.as_str();
    let cases = [
        case("attach --iface nope0 --guard 20000-30000", 3, "no interface `nope0`"),
        case(&format!("attach --iface nope0 --netns {n} --guard 20000"), 3, "no interface `nope0` in namespace"),
        case("attach --iface lo --netns no-such-ns --guard 20000", 3, "/var/run/docker/netns/no-such-ns"),
        case("attach --iface lo --netns pid:999999999 --guard 20000", 3, "not found"),
        case("attach --iface lo --netns a/b --guard 20000", 2, "neither a namespace name nor an absolute path"),
        case("attach --iface lo --netns /etc/hostname --guard 20000", 3, "not a network namespace"),
        case("attach --iface lo --guard 30000-20000", 2, "reversed"),
        case("attach --iface lo --guard 0", 2, "not a port"),
        case("attach --iface lo --guard 70000", 2, "not a port"),
        case("attach --iface lo --guard 1-2-3", 2, "not a port"),
        case("attach --iface lo", 2, "nothing to attach"),
        case("attach --iface lo --guard 1000-2000 --allow-port 3000", 2, "outside every --guard range"),
        case("attach --iface lo --guard 1000 --allow-src 10.0.0.0/40", 2, "prefix length"),
        case("attach --iface lo --guard 1000 --allow-src host.example/8", 2, "not an IP address"),
        case("attach --iface lo --guard 1000 --flow-timeout 0", 2, "positive number of seconds"),
        case("attach --iface lo --guard 1000 --flow-table-size 1", 2, "--flow-table-size"),
        case("attach --iface lo --guard 1000 --guard-hook ebpf", 2, "invalid value 'ebpf'"),
        case("attach --iface lo --guard 1000 --flow-source magic", 2, "invalid value 'magic'"),
        case("attach --iface lo --guard 1000 --filtering endpoint-independent --flow-source conntrack", 2, "needs --flow-source own"),
        case("attach --guard 1000", 2, "--iface"),
        case("detach --iface nope0", 3, "not attached"),
        case(&format!("detach --iface lo --netns {n}"), 3, "not attached"),
        case("detach --iface lo --netns nowhere", 3, "not found"),
        case("stats --iface nope0", 3, "no natfix attachment matches"),
        case("stats --watch 0", 2, "positive number of seconds"),
        case("frobnicate", 2, "unrecognized subcommand"),
        case("lab --scenario moon", 2, "invalid value 'moon'"),
        case("attach --iface lo --overlay-fix --csum-backend nft --csum recompute", 2, "can only zero"),
        case("attach --iface lo --vxlan-port 4789", 2, "need --overlay-fix"),
        case("attach --iface lo --reqid 0xD0C4E3", 2, "need --overlay-fix"),
        case("attach --iface lo --overlay-fix --vxlan-port 0", 2, "--vxlan-port"),
        case("attach --iface lo --overlay-fix --reqid zz", 2, "not a number"),
        case(
            "attach --iface lo --overlay-fix --vxlan-port 1 --vxlan-port 2 --vxlan-port 3 --vxlan-port 4 --vxlan-port 5 \
             --vxlan-port 6 --vxlan-port 7 --vxlan-port 8 --vxlan-port 9",
            2,
            "at most 8",
        ),
        case("attach --iface lo --overlay-fix --vxlan-port auto --vxlan-port 4777", 2, "cannot be combined"),
        case("attach --iface lo --overlay-fix --vxlan-port sometimes", 2, "neither a port"),
        case("set --iface lo --vxlan-port auto --vxlan-port 4777", 2, "cannot be combined"),
        case("set --iface nope0 --dry-run on", 3, "not attached"),
        case(&format!("reap --netns {n}"), 3, "no natfix guard in namespace"),
        case(&format!("reap --netns {n} --guard 20000-30000"), 2, "no default route"),
        case("reap --allow-port 25000", 2, "--guard"),
        case("reap --guard 30000-20000", 2, "reversed"),
        case("reap --netns nowhere", 3, "not found"),
        case("attach --iface lo --overlay-fix --csum sometimes", 2, "invalid value 'sometimes'"),
        case("attach --iface lo --overlay-fix --csum-backend ebpf", 2, "invalid value 'ebpf'"),
        case("attach --iface lo --guard 1000 --metrics notanaddr", 2, "invalid value 'notanaddr'"),
        case("attach --iface lo --guard 1000 --pin --metrics 127.0.0.1:9477", 2, "cannot be used with"),
        case("attach --iface lo --guard 1000 --pin --log-events", 2, "cannot be used with"),
        case("attach --iface lo --guard 1000 --xdp-mode turbo", 2, "invalid value 'turbo'"),
        case("attach --iface lo --guard 1000 --events-rate many", 2, "invalid value 'many'"),
        case("attach --iface lo --guard 1000 --netns pid:abc", 2, "needs a process id"),
        case("attach --iface lo --guard 1000 --filtering sideways", 2, "invalid value 'sideways'"),
        case("attach --iface lo --guard 1000 --allow-port 70000", 2, "--allow-port"),
        case("detach", 2, "--iface"),
        case("status --bogus", 2, "unexpected argument"),
        // Combinations whose second option would be ignored are refused.
        case("attach --iface lo --guard 1000 --guard-hook tc --xdp-mode native", 2, "--xdp-mode applies to --guard-hook xdp only"),
        case("attach --iface lo --guard 1000 --flow-source conntrack --flow-table-size 1024", 2, "conntrack's own timeouts and size"),
        case("attach --iface lo --guard 1000 --flow-source conntrack --flow-timeout 60", 2, "conntrack's own timeouts and size"),
        // Interface names are checked as the kernel does: never a path.
        case(&format!("detach --netns {n} --iface ../4026531840/lo"), 2, "is not an interface name"),
        case("attach --iface eth0:1 --guard 1000", 2, "is not an interface name"),
        case("attach --iface abcdefghijklmnop --guard 1000", 2, "longer than 15 bytes"),
        case("monitor --iface nope0", 3, "no natfix attachment matches"),
        case("diagnose --netns nowhere", 3, "not found"),
        case("stats --netns nowhere", 3, "not found"),
    ];
    for c in &cases {
        check(&mut std::process::Command::new(natfix_bin()), c);
    }
    // Failed attaches leave no record behind.
    let status = std::process::Command::new(natfix_bin()).args(["status", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(!v["attachments"].as_array().unwrap().iter().any(|a| a["iface"] == "nope0" || a["netns"] == n));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn missing_privileges_are_named() {
    root_setup();
    ensure_bpffs();
    // A record exists: an unprivileged reader must be told it cannot read it, not "none".
    let host = scratch_ns("priv");
    let peer = scratch_ns("privp");
    veth(&host, "pv0", "10.71.0.1/24", &peer, "pv1", "10.71.0.2/24").unwrap();
    let attach = std::process::Command::new(natfix_bin())
        .args(["attach", "--netns", &host.name, "--iface", "pv0", "--guard", "20000", "--flow-source", "own", "--pin"])
        .output()
        .unwrap();
    assert!(attach.status.success(), "{}", String::from_utf8_lossy(&attach.stderr));
    // setpriv drops to nobody with no capabilities.
    let nobody = || {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]).arg(natfix_bin());
        cmd
    };
    check(&mut nobody(), &case("attach --iface lo --guard 20000", 4, "missing CAP_NET_ADMIN"));
    check(&mut nobody(), &case("status", 4, "CAP_BPF"));
    check(&mut nobody(), &case("status --json", 4, "CAP_BPF"));
    check(&mut nobody(), &case("stats", 4, "CAP_BPF"));
    let detach = std::process::Command::new(natfix_bin()).args(["detach", "--netns", &host.name, "--iface", "pv0"]).output().unwrap();
    assert!(detach.status.success(), "{}", String::from_utf8_lossy(&detach.stderr));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_fifo_as_namespace_fails_at_once() {
    root_setup();
    let dir = std::env::temp_dir().join(format!("natfix-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("ns");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let f = fifo.display().to_string();
    for args in [format!("attach --iface lo --netns {f} --guard 20000"), format!("detach --iface lo --netns {f}")] {
        let start = std::time::Instant::now();
        check(std::process::Command::new("timeout").args(["10", &natfix_bin().display().to_string()]), &case(&args, 3, "is not a network namespace"));
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "{args}: took {:?}", start.elapsed());
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn missing_bpffs_is_explained() {
    root_setup();
    ensure_bpffs();
    // A private mount namespace without bpffs; the host's mount is untouched.
    // Every bpffs stacked on the path goes: with one left, attach would succeed and wait.
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", "umount /sys/fs/bpf && while umount /sys/fs/bpf 2>/dev/null; do :; done; exec \"$0\" \"$@\""]).arg(natfix_bin());
    check(&mut cmd, &case("attach --iface lo --guard 20000", 5, "mount -t bpf bpf /sys/fs/bpf"));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn failed_attach_rolls_back_what_it_did() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("rb");
    let peer = scratch_ns("rbp");
    veth(&host, "gr0", "10.64.0.1/24", &peer, "gs0", "10.64.0.2/24").unwrap();
    // Another XDP program owns gr0 (native): natfix's tc egress attaches
    // first, then XDP fails: a conflict (exit 6), and the egress link goes.
    let blocker = host
        .run(|| {
            let mut ebpf = aya::Ebpf::load(natfix_ebpf::rig::OBJECT)?;
            let prog: &mut Xdp = ebpf.program_mut(natfix_ebpf::rig::EMPTY_XDP).unwrap().try_into()?;
            prog.load()?;
            prog.attach("gr0", XdpMode::Driver)?;
            Ok(ebpf)
        })
        .unwrap();
    let c = case(
        &format!("attach --iface gr0 --netns {} --guard 20000-30000 --flow-source own --xdp-mode native", host.name),
        6,
        "another XDP program holds gr0",
    );
    check(&mut std::process::Command::new(natfix_bin()), &c);
    assert!(tcx_prog_ids(&host, "gr0", TcAttachType::Egress).unwrap().is_empty(), "egress link rolled back");
    let pins = std::path::Path::new("/sys/fs/bpf/natfix").join(host.netns().unwrap().inode.to_string());
    assert!(!pins.exists(), "no pins left: {}", pins.display());
    drop(blocker);
}
