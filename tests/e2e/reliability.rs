//! Attach is atomic under concurrency and crashes, status tells what the
//! kernel has, and one natfix never runs beside another on a hook. Each
//! case was found by trying natfix as an adversarial operator would.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
use natfix_testkit::{
    Daemon, ScratchNs, count_udp, natfix, natfix_bin, root_setup, scratch_ns, send_udp, stat, tcx_prog_ids, veth, xdp_prog_id,
};
use serde_json::Value;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn status() -> Value {
    let out = natfix(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The status entries of namespace `ns` (a record left by an earlier
/// namespace with the same inode is not one of them).
fn entries_of(ns: &ScratchNs) -> Vec<Value> {
    let inode = ns.netns().unwrap().inode;
    let ours = |a: &&Value| a["netns_inode"] == inode && (a["netns"].is_null() || a["netns"] == ns.name.as_str());
    status()["attachments"].as_array().unwrap().iter().filter(ours).cloned().collect()
}

fn pair(tag: &str, subnet: u8) -> (ScratchNs, ScratchNs) {
    let host = scratch_ns(tag);
    let peer = scratch_ns(&format!("{tag}p"));
    veth(&host, "rl0", &format!("10.{subnet}.0.1/24"), &peer, "rl1", &format!("10.{subnet}.0.2/24")).unwrap();
    (host, peer)
}

fn attach_cmd(ns: &ScratchNs, extra: &[&str]) -> Command {
    let mut cmd = Command::new(natfix_bin());
    cmd.args(["attach", "--netns", &ns.name, "--iface", "rl0", "--guard", "20000-30000", "--flow-source", "own", "--pin"])
        .args(extra)
        .env("NATFIX_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn detach(ns: &ScratchNs, iface: &str) -> std::process::Output {
    natfix(&["detach", "--netns", &ns.name, "--iface", iface])
}

/// Nothing of natfix on the namespace's hooks, and no record or staging of it.
fn assert_clean(ns: &ScratchNs, iface: &str) {
    assert_eq!(xdp_prog_id(ns, iface).unwrap(), None, "no XDP program left");
    assert!(tcx_prog_ids(ns, iface, TcAttachType::Egress).unwrap().is_empty(), "no tcx egress program left");
    assert!(tcx_prog_ids(ns, iface, TcAttachType::Ingress).unwrap().is_empty(), "no tcx ingress program left");
    assert!(entries_of(ns).is_empty(), "no record left: {:?}", entries_of(ns));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn concurrent_attaches_have_exactly_one_winner() {
    root_setup();
    let (host, _peer) = pair("race", 72);
    for round in 0..8u64 {
        let mut a = attach_cmd(&host, &[]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(round * 10));
        let mut b = attach_cmd(&host, &[]).spawn().unwrap();
        let (ra, rb) = (a.wait().unwrap().code(), b.wait().unwrap().code());
        let mut codes = [ra, rb];
        codes.sort_unstable();
        assert_eq!(codes, [Some(0), Some(6)], "round {round}: one winner, one conflict");
        // The kernel has exactly the winner's programs, and status says so.
        let xdp = xdp_prog_id(&host, "rl0").unwrap().expect("XDP guard attached");
        let egress = tcx_prog_ids(&host, "rl0", TcAttachType::Egress).unwrap();
        assert_eq!(egress.len(), 1, "round {round}: one egress learner");
        let entries = entries_of(&host);
        assert_eq!(entries.len(), 1, "round {round}: one record: {entries:?}");
        assert_eq!(entries[0]["state"], "pinned", "round {round}: {}", entries[0]);
        let ids: Vec<u64> = entries[0]["programs"].as_array().unwrap().iter().map(|p| p["prog_id"].as_u64().unwrap()).collect();
        assert!(ids.contains(&xdp) && ids.contains(&u64::from(egress[0])), "round {round}: record matches the kernel");
        assert!(detach(&host, "rl0").status.success());
        assert_clean(&host, "rl0");
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn an_attach_killed_half_way_is_undone_by_the_next() {
    root_setup();
    let (host, _peer) = pair("kill", 73);
    for delay_ms in [5u64, 20, 40, 60, 90, 150] {
        let mut child = attach_cmd(&host, &["--overlay-fix"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        // Whatever it left, the next attach works and leaves one whole attachment.
        let out = attach_cmd(&host, &["--overlay-fix"]).output().unwrap();
        assert!(out.status.success(), "killed after {delay_ms} ms; next attach: {}", String::from_utf8_lossy(&out.stderr));
        let entries = entries_of(&host);
        assert_eq!(entries.len(), 1, "killed after {delay_ms} ms: {entries:?}");
        assert_eq!(entries[0]["state"], "pinned", "killed after {delay_ms} ms: {}", entries[0]);
        assert!(detach(&host, "rl0").status.success());
        assert_clean(&host, "rl0");
        let tables = host.exec(&["nft", "list", "tables"]).unwrap();
        assert!(!tables.contains("natfix"), "killed after {delay_ms} ms: nftables table left: {tables}");
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_natfix_with_its_own_bpffs_does_not_attach_beside_another() {
    root_setup();
    let (host, _peer) = pair("ownfs", 74);
    let out = attach_cmd(&host, &["--guard-hook", "tc"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // As in a container started without -v /sys/fs/bpf:/sys/fs/bpf: a private bpffs.
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && exec {} attach --netns {} --iface rl0 --guard 20000-30000 --guard-hook tc --flow-source own --pin",
        natfix_bin().display(),
        host.name
    );
    let out = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("another natfix"), "{err}");
    assert_eq!(tcx_prog_ids(&host, "rl0", TcAttachType::Ingress).unwrap().len(), 1, "still one guard at tc ingress");
    assert!(detach(&host, "rl0").status.success());
    assert_clean(&host, "rl0");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn status_follows_the_interface_gone_and_renamed() {
    root_setup();
    let (host, peer) = pair("ifgone", 75);
    assert!(attach_cmd(&host, &[]).output().unwrap().status.success());
    host.exec(&["ip", "link", "del", "rl0"]).unwrap();
    let e = &entries_of(&host)[0];
    assert_eq!(e["state"], "interface-gone", "{e}");
    assert!(e["programs"].as_array().unwrap().iter().all(|p| p["attached"] == false), "{e}");
    // An interface of the same name comes back: attach releases the old record.
    veth(&host, "rl0", "10.75.1.1/24", &peer, "rl2", "10.75.1.2/24").unwrap();
    let out = attach_cmd(&host, &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(entries_of(&host)[0]["state"], "pinned");
    // Renamed: status names it, and detach finds it by its new name.
    host.exec(&["ip", "link", "set", "rl0", "down"]).unwrap();
    host.exec(&["ip", "link", "set", "rl0", "name", "rl9"]).unwrap();
    host.exec(&["ip", "link", "set", "rl9", "up"]).unwrap();
    let e = &entries_of(&host)[0];
    assert_eq!(e["iface_now"], "rl9", "{e}");
    assert_eq!(e["state"], "pinned", "programs stay attached across a rename: {e}");
    let out = detach(&host, "rl9");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_clean(&host, "rl9");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_foreground_attach_outlives_its_namespace_name_and_detaches_cleanly() {
    root_setup();
    let (host, _peer) = pair("nsdel", 76);
    let name = host.name.clone();
    let d = Daemon::start(&["--netns", &name, "--iface", "rl0", "--guard", "20000-30000", "--flow-source", "own"]).unwrap();
    let pid = d.child.id();
    // Someone deletes the namespace's name; the namespace lives on (natfix holds it).
    Command::new("ip").args(["netns", "del", &name]).status().unwrap();
    let out = natfix(&["detach", "--netns", &name, "--iface", "rl0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("pid {pid}")), "the owner was asked: {stdout}");
    let exit = d.stop().unwrap();
    assert!(exit.success(), "the foreground attach detached by its own hold on the namespace: {exit}");
    assert!(!status()["attachments"].as_array().unwrap().iter().any(|a| a["pid"] == pid), "record gone");
}

/// A tc program of another owner that accepts every packet (`TC_ACT_OK`),
/// attached first or last in the tcx chain of `ns`'s rl0.
fn foreign_tc(ns: &ScratchNs, order: LinkOrder) -> aya::Ebpf {
    ns.run(move || {
        let mut ebpf = aya::Ebpf::load(natfix_ebpf::rig::OBJECT)?;
        let prog: &mut SchedClassifier = ebpf.program_mut(natfix_ebpf::rig::ACCEPT_TC).unwrap().try_into()?;
        prog.load()?;
        prog.attach_with_options("rl0", TcAttachType::Ingress, TcAttachOptions::TcxOrder(order))?;
        Ok(ebpf)
    })
    .unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_tc_guard_runs_first_and_status_says_when_it_does_not() {
    root_setup();
    let (host, peer) = pair("shadow", 77);
    // Another program was on the hook first: natfix goes ahead of it.
    let first = foreign_tc(&host, LinkOrder::first());
    assert!(attach_cmd(&host, &["--guard-hook", "tc"]).output().unwrap().status.success());
    let rx = count_udp(&host, addr("10.77.0.1:25000"), Duration::from_millis(600)).unwrap();
    send_udp(&peer, addr("10.77.0.2:7000"), addr("10.77.0.1:25000"), 50).unwrap();
    assert_eq!(rx.join().unwrap().unwrap(), 0, "unsolicited datagrams dropped despite the program added before natfix");
    assert_eq!(stat(&host.name, "rl0", "guard", "dropped_unsolicited"), 50);
    assert_eq!(entries_of(&host)[0]["state"], "pinned");
    // A program put ahead of natfix later decides first: status says so.
    let ahead = foreign_tc(&host, LinkOrder::first());
    let e = &entries_of(&host)[0];
    assert_eq!(e["state"], "shadowed", "{e}");
    let guard = e["programs"].as_array().unwrap().iter().find(|p| p["name"] == "natfix_guard_tc").unwrap();
    assert_eq!(guard["runs_after"][0]["name"], "rig_accept_tc", "{e}");
    assert!(e["problems"][0].as_str().unwrap().contains("runs before natfix_guard_tc"), "{e}");
    // diagnose warns of it too.
    let out = natfix(&["diagnose", "--netns", &host.name, "--json", "--sample", "1"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let finding = report["findings"].as_array().unwrap().iter().find(|f| f["check"] == "natfix.attachments").unwrap().clone();
    assert_eq!(finding["severity"], "warning", "{finding}");
    assert!(finding["evidence"].to_string().contains("rig_accept_tc"), "{finding}");
    drop((first, ahead));
    assert!(detach(&host, "rl0").status.success());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_corrupt_record_hides_no_other_and_is_detached() {
    root_setup();
    let (host, peer) = pair("corrupt", 78);
    veth(&host, "rl3", "10.78.1.1/24", &peer, "rl4", "10.78.1.2/24").unwrap();
    assert!(attach_cmd(&host, &[]).output().unwrap().status.success());
    let mut other = attach_cmd(&host, &[]);
    let args: Vec<String> = other.get_args().map(|a| a.to_string_lossy().replace("rl0", "rl3")).collect();
    other = Command::new(natfix_bin());
    assert!(other.args(&args).output().unwrap().status.success());
    let dir = natfix::pins::PinDir::new(host.netns().unwrap().inode, &"rl0".parse().unwrap());
    let data = aya::maps::MapData::from_pin(dir.meta_path()).unwrap();
    let mut meta: aya::maps::Array<aya::maps::MapData, [u8; 4096]> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
    meta.set(0, [b'{'; 4096], 0).unwrap();
    let entries = entries_of(&host);
    let state_of = |iface: &str| entries.iter().find(|e| e["iface"] == iface).map(|e| e["state"].clone());
    assert_eq!(state_of("rl0"), Some("corrupt".into()), "{entries:?}");
    assert_eq!(state_of("rl3"), Some("pinned".into()), "{entries:?}");
    let stats = natfix(&["stats", "--json"]);
    assert!(stats.status.success(), "stats with a corrupt record: {}", String::from_utf8_lossy(&stats.stderr));
    assert!(String::from_utf8_lossy(&stats.stdout).contains("\"rl3\""));
    // Detach removes what it finds: the pinned links (so the programs), the pins.
    let out = detach(&host, "rl0");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(xdp_prog_id(&host, "rl0").unwrap(), None, "the XDP guard of the corrupt record is detached");
    assert!(tcx_prog_ids(&host, "rl0", TcAttachType::Egress).unwrap().is_empty());
    assert!(!dir.path.exists());
    assert!(detach(&host, "rl3").status.success());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_staging_left_by_a_dead_attach_shows_and_goes() {
    root_setup();
    let (host, _peer) = pair("stage", 79);
    // Stop an attach right after it made its staging directory.
    let mut child = attach_cmd(&host, &[]).spawn().unwrap();
    let inode = host.netns().unwrap().inode;
    let end = Instant::now() + Duration::from_secs(10);
    let staging = loop {
        let found = std::fs::read_dir(natfix::pins::netns_dir(inode))
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("staging:"));
        if let Some(e) = found {
            break e.path();
        }
        assert!(Instant::now() < end, "no staging directory appeared");
        std::thread::sleep(Duration::from_millis(2));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    if staging.exists() {
        let e = entries_of(&host);
        assert!(e.iter().any(|x| x["state"] == "incomplete"), "{e:?}");
    }
    let out = attach_cmd(&host, &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!staging.exists(), "the next attach undid {}", staging.display());
    assert!(detach(&host, "rl0").status.success());
    assert_clean(&host, "rl0");
}
