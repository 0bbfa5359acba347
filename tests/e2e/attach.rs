//! Attach, observe, detach: in a named namespace and in a Docker-style
//! /var/run/docker/netns bind mount, checked against the kernel's own view.

use std::{net::SocketAddr, path::Path, time::Duration};

use aya::programs::TcAttachType;
use natfix_testkit::{
    Daemon, DetachOnDrop, ScratchNs, ensure_bpffs, natfix, root_setup, scratch_ns, send_udp, stat, tcx_prog_ids, veth, xdp_prog_id,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn status_json() -> serde_json::Value {
    serde_json::from_slice(&natfix(&["status", "--json"]).stdout).unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn foreground_attach_in_named_netns_counts_and_cleans_up() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("host");
    let peer = scratch_ns("peer");
    veth(&host, "ga0", "10.61.0.1/24", &peer, "gb0", "10.61.0.2/24").unwrap();

    let d = Daemon::start(&["--iface", "ga0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own"])
        .unwrap();

    // Kernel's view: XDP and tcx egress on ga0 in `host`, nothing on the peer's side.
    let xdp = xdp_prog_id(&host, "ga0").unwrap().expect("XDP program on ga0");
    let egress = tcx_prog_ids(&host, "ga0", TcAttachType::Egress).unwrap();
    assert_eq!(egress.len(), 1, "one tcx egress program");
    let st = status_json();
    let rec = st["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "ga0").unwrap().clone();
    let ids: Vec<u64> = rec["programs"].as_array().unwrap().iter().map(|p| p["prog_id"].as_u64().unwrap()).collect();
    assert!(ids.contains(&xdp) && ids.contains(&u64::from(egress[0])), "status matches the kernel: {rec}");
    assert_eq!(rec["state"], "running");
    assert_eq!(xdp_prog_id(&peer, "gb0").unwrap(), None, "nothing on the peer");
    assert!(tcx_prog_ids(&peer, "gb0", TcAttachType::Ingress).unwrap().is_empty());

    // Counters move with traffic through the veth.
    send_udp(&peer, addr("10.61.0.2:7000"), addr("10.61.0.1:25000"), 5).unwrap();
    send_udp(&peer, addr("10.61.0.2:7000"), addr("10.61.0.1:40000"), 3).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stat(&host.name, "ga0", "guard", "dropped_unsolicited"), 5);
    assert!(stat(&host.name, "ga0", "guard", "out_of_scope") >= 3);

    let exit = d.stop().unwrap();
    assert!(exit.success(), "SIGTERM exits cleanly: {exit}");
    assert_eq!(xdp_prog_id(&host, "ga0").unwrap(), None, "XDP detached");
    assert!(tcx_prog_ids(&host, "ga0", TcAttachType::Egress).unwrap().is_empty(), "tcx detached");
    assert!(!status_json()["attachments"].as_array().unwrap().iter().any(|a| a["iface"] == "ga0"), "record gone");
    let pin_root = Path::new("/sys/fs/bpf/natfix").join(host.netns().unwrap().inode.to_string());
    assert!(!pin_root.exists(), "pins removed: {}", pin_root.display());
}

/// A bind mount under /var/run/docker/netns, as Docker makes them; removed on drop.
struct DockerNs {
    path: std::path::PathBuf,
}

impl DockerNs {
    fn new(of: &ScratchNs) -> Self {
        let dir = Path::new("/var/run/docker/netns");
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("1-{}", &of.name.replace('-', "")[..10.min(of.name.len())]));
        std::fs::write(&path, b"").unwrap();
        natfix_testkit::sh(&["mount", "--bind", of.path().to_str().unwrap(), path.to_str().unwrap()]).unwrap();
        Self { path }
    }

    fn name(&self) -> &str {
        self.path.file_name().unwrap().to_str().unwrap()
    }
}

impl Drop for DockerNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn pinned_tc_attach_in_docker_netns_survives_exit_and_detaches() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("dock");
    let peer = scratch_ns("dpeer");
    veth(&host, "gd0", "10.62.0.1/24", &peer, "ge0", "10.62.0.2/24").unwrap();
    let docker = DockerNs::new(&host);

    let out = natfix(&[
        "attach", "--iface", "gd0", "--netns", docker.name(), "--guard", "20000-30000", "--guard-hook", "tc",
        "--flow-source", "own", "--pin",
    ]);
    assert!(out.status.success(), "pinned attach: {}", String::from_utf8_lossy(&out.stderr));

    // The process is gone; the kernel still has both tcx programs in that namespace.
    let ingress = tcx_prog_ids(&host, "gd0", TcAttachType::Ingress).unwrap();
    let egress = tcx_prog_ids(&host, "gd0", TcAttachType::Egress).unwrap();
    assert_eq!((ingress.len(), egress.len()), (1, 1));
    assert_eq!(xdp_prog_id(&host, "gd0").unwrap(), None, "tc hook means no XDP");
    let rec = status_json()["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "gd0").unwrap().clone();
    assert_eq!(rec["state"], "pinned");
    assert_eq!(rec["netns"], docker.name());

    // Guarding works while natfix is not running.
    send_udp(&peer, addr("10.62.0.2:7000"), addr("10.62.0.1:21000"), 4).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stat(&host.name, "gd0", "guard", "dropped_unsolicited"), 4);

    // A second attach on the same interface is refused while the first lives.
    let again = natfix(&["attach", "--iface", "gd0", "--netns", docker.name(), "--guard", "1000"]);
    assert_eq!(again.status.code(), Some(6), "{}", String::from_utf8_lossy(&again.stderr));

    let out = natfix(&["detach", "--iface", "gd0", "--netns", docker.name()]);
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(tcx_prog_ids(&host, "gd0", TcAttachType::Ingress).unwrap().is_empty());
    assert!(tcx_prog_ids(&host, "gd0", TcAttachType::Egress).unwrap().is_empty());
    assert!(!status_json()["attachments"].as_array().unwrap().iter().any(|a| a["iface"] == "gd0"));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn kill_9_fails_open_and_next_attach_succeeds() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("k9");
    let peer = scratch_ns("k9p");
    veth(&host, "gk0", "10.63.0.1/24", &peer, "gl0", "10.63.0.2/24").unwrap();
    let args = ["--iface", "gk0", "--netns", host.name.as_str(), "--guard", "20000-30000", "--flow-source", "own"];
    let mut d = Daemon::start(&args).unwrap();
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    // Links were file descriptors of the dead process: the kernel detached them.
    assert_eq!(xdp_prog_id(&host, "gk0").unwrap(), None);
    assert!(tcx_prog_ids(&host, "gk0", TcAttachType::Egress).unwrap().is_empty());
    let rec = status_json()["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "gk0").cloned();
    assert_eq!(rec.map(|r| r["state"].clone()), Some("stale".into()), "the orphaned record shows as stale");
    // Traffic to the guarded range flows again (fail-open).
    let rx = natfix_testkit::count_udp(&host, addr("10.63.0.1:25000"), Duration::from_millis(800)).unwrap();
    send_udp(&peer, addr("10.63.0.2:7000"), addr("10.63.0.1:25000"), 3).unwrap();
    assert_eq!(rx.join().unwrap().unwrap(), 3);
    // The next attach takes over the stale record.
    let d2 = Daemon::start(&args).unwrap();
    assert!(xdp_prog_id(&host, "gk0").unwrap().is_some());
    assert!(d2.stop().unwrap().success());
}

/// The overlay fix's nftables rule has no eBPF counter: `natfix stats` reads
/// the rule's own counter from the kernel, inside the attachment's namespace
/// (this test process is outside it). Decrypted ESP needs a VM (tests/vm); here
/// the kernel's counter is given a value through nft to show it is the one read.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn overlay_nft_backend_reports_its_rule_counter() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("ovn");
    let peer = scratch_ns("ovnpeer");
    veth(&host, "go0", "10.63.0.1/24", &peer, "gp0", "10.63.0.2/24").unwrap();
    let out = natfix(&["attach", "--iface", "go0", "--netns", &host.name, "--overlay-fix", "--csum-backend", "nft", "--pin"]);
    assert!(out.status.success(), "pinned attach: {}", String::from_utf8_lossy(&out.stderr));
    let _detach = DetachOnDrop { iface: "go0", netns: &host.name };

    let nft_row = || {
        let out = natfix(&["stats", "--json", "--netns", &host.name, "--iface", "go0"]);
        assert!(out.status.success(), "stats: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = v["attachments"][0]["counters"].as_array().cloned().unwrap_or_default();
        rows.into_iter().find(|c| c["program"] == "overlay" && c["reason"] == "nft_zeroed")
    };
    let row = nft_row().expect("an overlay nft_zeroed row");
    assert_eq!((row["packets"].as_u64(), row["bytes"].as_u64()), (Some(0), Some(0)), "nothing decrypted yet: {row}");

    // Same rule, its counter preset: what stats reports must follow the kernel.
    let tables = natfix_testkit::sh(&["ip", "netns", "exec", &host.name, "nft", "list", "tables"]).unwrap();
    let table = tables.split_whitespace().find(|w| w.starts_with("natfix_overlay_")).expect("natfix's table").to_owned();
    let listed = natfix_testkit::sh(&["ip", "netns", "exec", &host.name, "nft", "-a", "list", "chain", "ip", &table, "prerouting"]).unwrap();
    let handle = listed.lines().find_map(|l| l.split("# handle ").nth(1).filter(|_| l.contains("checksum set 0"))).unwrap().trim().to_owned();
    let rule = "meta ipsec exists iifname \"go0\" udp dport 4789 counter packets 7 bytes 700 udp checksum set 0";
    let replace = format!("replace rule ip {table} prerouting handle {handle} {rule}");
    natfix_testkit::sh(&["ip", "netns", "exec", &host.name, "nft", &replace]).unwrap();
    let row = nft_row().unwrap();
    assert_eq!((row["packets"].as_u64(), row["bytes"].as_u64()), (Some(7), Some(700)), "{row}");

    let out = natfix(&["detach", "--iface", "go0", "--netns", &host.name]);
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    let tables = natfix_testkit::sh(&["ip", "netns", "exec", &host.name, "nft", "list", "tables"]).unwrap();
    assert!(!tables.contains(&table), "table removed: {tables}");
}

/// `--csum-backend auto` decides per interface: the nftables rule alone where
/// the underlay is IPv4 only (it repairs every IPv4 path and costs least), the
/// tc program too once the interface has a global IPv6 address (IPv6 needs a
/// recomputed checksum, which only the tc program writes).
#[test]
#[ignore = "needs root: cargo xtask test"]
fn overlay_auto_backend_adds_the_tc_program_only_for_ipv6() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("ova");
    let peer = scratch_ns("ovapeer");
    veth(&host, "gv0", "10.64.0.1/24", &peer, "gw0", "10.64.0.2/24").unwrap();
    let _detach = DetachOnDrop { iface: "gv0", netns: &host.name };
    let attached = || {
        let out = natfix(&["attach", "--iface", "gv0", "--netns", &host.name, "--overlay-fix", "--pin"]);
        assert!(out.status.success(), "pinned attach: {}", String::from_utf8_lossy(&out.stderr));
        let st = status_json();
        st["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "gv0").unwrap().clone()
    };
    let nft_tables = || natfix_testkit::sh(&["ip", "netns", "exec", &host.name, "nft", "list", "tables"]).unwrap();
    // The kernel adds the link-local address once the link has carrier (linkwatch, up to 1 s).
    let link_local = || natfix_testkit::sh(&["ip", "-n", &host.name, "-6", "addr", "show", "dev", "gv0", "scope", "link"]).unwrap();
    for _ in 0..50 {
        if link_local().contains("fe80::") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(link_local().contains("fe80::"), "gv0 has its link-local address");

    let rec = attached();
    assert_eq!(rec["overlay"]["backend"], "nft", "IPv4 only: {rec}");
    assert!(rec["programs"].as_array().unwrap().is_empty(), "no eBPF program: {rec}");
    assert!(tcx_prog_ids(&host, "gv0", TcAttachType::Ingress).unwrap().is_empty(), "nothing on tc ingress");
    assert!(nft_tables().contains("natfix_overlay_"), "the rule is installed");
    let out = natfix(&["detach", "--iface", "gv0", "--netns", &host.name]);
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!nft_tables().contains("natfix_overlay_"), "table removed");

    // A link-local address (every IPv6 interface has one) does not count; a global one does.
    natfix_testkit::sh(&["ip", "-n", &host.name, "addr", "add", "2001:db8:64::1/64", "dev", "gv0", "nodad"]).unwrap();
    let rec = attached();
    assert_eq!(rec["overlay"]["backend"], "both", "global IPv6: {rec}");
    let ingress = tcx_prog_ids(&host, "gv0", TcAttachType::Ingress).unwrap();
    let ids: Vec<u64> = rec["programs"].as_array().unwrap().iter().map(|p| p["prog_id"].as_u64().unwrap()).collect();
    assert_eq!((ingress.len(), ids.len()), (1, 1), "the overlay tc program: {rec}");
    assert_eq!(u64::from(ingress[0]), ids[0], "status matches the kernel");
    assert!(nft_tables().contains("natfix_overlay_"), "and the rule for IPv4");
}

/// Pins are keyed by the namespace's inode, and the kernel hands a deleted
/// namespace's inode to a later one. A record left by a pinned attachment in
/// a deleted namespace must neither block nor be undone in the namespace that
/// got its inode. The record is made to look like that one by giving it
/// another namespace's cookie, which is what tells namespaces apart.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_record_left_by_a_deleted_namespace_with_this_inode_is_not_this_namespaces() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("reuse");
    let peer = scratch_ns("reusepeer");
    veth(&host, "gr0", "10.65.0.1/24", &peer, "gs0", "10.65.0.2/24").unwrap();
    let _detach = DetachOnDrop { iface: "gr0", netns: &host.name };
    let args = ["attach", "--iface", "gr0", "--netns", &host.name, "--overlay-fix", "--csum-backend", "nft", "--pin"];
    let out = natfix(&args);
    assert!(out.status.success(), "pinned attach: {}", String::from_utf8_lossy(&out.stderr));
    let dir = natfix::pins::PinDir::new(host.netns().unwrap().inode, &"gr0".parse().unwrap());
    let own_cookie = dir.read_meta().unwrap().netns_cookie.expect("the record has the namespace's cookie");
    let as_if_left_by_a_deleted_namespace = || {
        let mut meta = dir.read_meta().unwrap();
        meta.netns_cookie = Some(own_cookie ^ 1);
        dir.write_meta(&meta).unwrap();
    };
    let state = || {
        let st = status_json();
        st["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "gr0").map(|a| a["state"].clone())
    };
    assert_eq!(state(), Some("pinned".into()));

    as_if_left_by_a_deleted_namespace();
    assert_eq!(state(), Some("stale".into()), "status sees the namespace is not the record's");
    // Before natfix compared cookies this was "already attached" (exit 6).
    let out = natfix(&args);
    assert!(out.status.success(), "attach takes the inode over: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dir.read_meta().unwrap().netns_cookie, Some(own_cookie));
    assert_eq!(state(), Some("pinned".into()));

    // detach must not undo a gone namespace's record in this one: the table stays.
    as_if_left_by_a_deleted_namespace();
    let out = natfix(&["detach", "--iface", "gr0", "--netns", &host.name]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("left by a deleted namespace"), "{stderr}");
    assert!(!dir.meta_path().exists(), "the stale record is removed");
    let tables = natfix_testkit::sh(&["ip", "netns", "exec", &host.name, "nft", "list", "tables"]).unwrap();
    assert!(tables.contains("natfix_overlay_"), "this namespace's table is left alone: {tables}");
}

/// A pinned attachment outlives its namespace in bpffs (pins are keyed by
/// inode). Once the namespace is deleted its name no longer resolves, yet
/// `detach` by that name must still release natfix's pins for it.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn detach_releases_the_pins_of_a_deleted_namespace() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("gone");
    let peer = scratch_ns("gonepeer");
    veth(&host, "gz0", "10.66.0.1/24", &peer, "gy0", "10.66.0.2/24").unwrap();
    let out = natfix(&["attach", "--iface", "gz0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own", "--pin"]);
    assert!(out.status.success(), "pinned attach: {}", String::from_utf8_lossy(&out.stderr));
    let dir = natfix::pins::PinDir::new(host.netns().unwrap().inode, &"gz0".parse().unwrap());
    assert!(dir.meta_path().exists());
    let record = || {
        let st = status_json();
        st["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "gz0" && a["netns"] == host.name.as_str()).cloned()
    };

    natfix_testkit::sh(&["ip", "netns", "del", &host.name]).unwrap();
    assert_eq!(record().map(|r| r["state"].clone()), Some("stale".into()), "status sees the namespace is gone");
    let out = natfix(&["detach", "--iface", "gz0", "--netns", &host.name]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "detach by the deleted name: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("that namespace is gone"), "{stdout}");
    assert!(!dir.meta_path().exists() && record().is_none(), "pins released");
    // Nothing left: the same request is now an ordinary "not found".
    assert_eq!(natfix(&["detach", "--iface", "gz0", "--netns", &host.name]).status.code(), Some(3));
}

/// Where the driver has no native XDP (macvlan here), `--xdp-mode auto` (the
/// default) puts the guard at tc ingress, not in generic XDP, which would
/// turn GRO off on the device; it guards there, for both flow sources (the
/// conntrack build is one object per hook), and `--replace` keeps it there.
/// `--xdp-mode native` refuses and says what to use instead.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn without_native_xdp_the_guard_runs_at_tc_ingress() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("nox");
    let peer = scratch_ns("noxpeer");
    // The veth carries no address; the macvlan on it owns one. arp_ignore=1:
    // else the veth answers ARP for the macvlan's address first (macvlan
    // takes broadcasts from a work queue) and the peer's datagrams arrive on
    // the veth, never passing the macvlan's tc ingress.
    natfix_testkit::sh(&["ip", "link", "add", "gn0", "netns", &host.name, "type", "veth", "peer", "name", "gp0", "netns", &peer.name]).unwrap();
    for cmd in [
        &["sysctl", "-qw", "net.ipv4.conf.gn0.arp_ignore=1"][..],
        &["ip", "link", "set", "gn0", "up"],
        &["ip", "link", "add", "mv0", "link", "gn0", "type", "macvlan", "mode", "bridge"],
        &["ip", "addr", "add", "10.67.0.1/24", "dev", "mv0"],
        &["ip", "link", "set", "mv0", "up"],
    ] {
        host.exec(cmd).unwrap();
    }
    peer.exec(&["ip", "addr", "add", "10.67.0.2/24", "dev", "gp0"]).unwrap();
    peer.exec(&["ip", "link", "set", "gp0", "up"]).unwrap();
    // Until carrier is up (linkwatch, up to 1 s) the veth drops what it is given.
    let reachable = || peer.exec(&["ping", "-c1", "-W1", "10.67.0.1"]).is_ok();
    assert!((0..5).any(|_| reachable()), "the peer reaches mv0");
    let json = |out: String| serde_json::from_str::<serde_json::Value>(&out).unwrap();
    let mv0_mac = json(host.exec(&["ip", "-j", "link", "show", "mv0"]).unwrap())[0]["address"].clone();
    let peer_sees = json(peer.exec(&["ip", "-j", "neigh", "show", "10.67.0.1"]).unwrap())[0]["lladdr"].clone();
    assert_eq!(peer_sees, mv0_mac, "the peer sends to mv0, not to the veth under it");
    let _detach = DetachOnDrop { iface: "mv0", netns: &host.name };
    let attach = |extra: &[&str]| {
        let mut args = vec!["attach", "--iface", "mv0", "--netns", &host.name, "--guard", "20000-30000", "--pin"];
        args.extend_from_slice(extra);
        natfix(&args)
    };
    let guard_on_tc = |what: &str| {
        let st = status_json();
        let rec = st["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "mv0").unwrap().clone();
        let guard = rec["programs"].as_array().unwrap().iter().find(|p| p["name"].as_str().unwrap().starts_with("natfix_guard")).unwrap().clone();
        assert_eq!((guard["name"].as_str(), guard["hook"].as_str()), (Some("natfix_guard_tc"), Some("tc-ingress")), "{what}: {rec}");
        let ingress = tcx_prog_ids(&host, "mv0", TcAttachType::Ingress).unwrap();
        assert_eq!(ingress.iter().map(|&id| u64::from(id)).collect::<Vec<_>>(), vec![guard["prog_id"].as_u64().unwrap()], "{what}: the kernel runs it");
        assert_eq!(xdp_prog_id(&host, "mv0").unwrap(), None, "{what}: no generic XDP");
    };

    for source in ["conntrack", "own"] {
        let out = attach(&["--flow-source", source]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{source}: {log}");
        assert!(log.contains("tc ingress instead"), "{source}: the fallback is logged: {log}");
        guard_on_tc(source);
        // It guards there: unsolicited datagrams to a guarded port are dropped.
        send_udp(&peer, addr("10.67.0.2:41000"), addr("10.67.0.1:25000"), 5).unwrap();
        let dropped = || stat(&host.name, "mv0", "guard", "dropped_unsolicited");
        for _ in 0..50 {
            if dropped() >= 5 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let stats = natfix(&["stats", "--netns", &host.name, "--iface", "mv0"]);
        assert_eq!(dropped(), 5, "{source}: dropped at tc ingress: {}", String::from_utf8_lossy(&stats.stdout));
        if source == "own" {
            let out = attach(&["--flow-source", source, "--replace"]);
            assert!(out.status.success(), "--replace: {}", String::from_utf8_lossy(&out.stderr));
            guard_on_tc("after --replace");
        }
        let out = natfix(&["detach", "--iface", "mv0", "--netns", &host.name]);
        assert!(out.status.success(), "{source}: detach: {}", String::from_utf8_lossy(&out.stderr));
    }

    let out = attach(&["--xdp-mode", "native"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("native XDP is not available on mv0") && err.contains("--guard-hook tc"), "says what to use: {err}");
    assert!(tcx_prog_ids(&host, "mv0", TcAttachType::Ingress).unwrap().is_empty(), "nothing left attached");
}
