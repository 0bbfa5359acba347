//! `natfix lab`: throwaway namespaces that reproduce the seed failures and
//! show natfix fixing them. The end-to-end tests build the same topologies.

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// Runs a command, failing with its stderr.
pub fn run(cmd: &[&str]) -> Result<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("cannot run {}", cmd[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Binds a UDP socket, waiting up to a second while the port is still taken.
///
/// A socket closed a moment ago can still hold its port: a process forked by
/// another thread (any `Command`) keeps a copy of every descriptor until its
/// exec closes the CLOEXEC ones. The lab reuses fixed ports back to back, so
/// without this wait a busy machine fails a bind now and then.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let end = Instant::now() + Duration::from_secs(1);
    loop {
        match UdpSocket::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// A namespace made with `ip netns add`, deleted on drop.
pub struct LabNs {
    pub name: String,
}

impl LabNs {
    pub fn create(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output(); // leftover of a crashed run
        run(&["ip", "netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run(&full)
    }

    pub fn netns(&self) -> Result<Netns> {
        Netns::resolve(Some(&format!("/run/netns/{}", self.name)))
    }

    /// Applies an nftables ruleset (nft -f -) inside the namespace; the text
    /// is ours, never user input.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        child.stdin.take().context("nft stdin")?.write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Sends `count` datagrams from `bind` to `to` inside this namespace.
    pub fn send_udp(&self, bind: SocketAddr, to: SocketAddr, count: u32) -> Result<()> {
        self.netns()?.run(move || {
            let s = bind_udp(bind)?;
            for i in 0..count {
                s.send_to(&i.to_be_bytes(), to)?;
            }
            Ok(())
        })
    }

    /// Binds `bind` and returns a handle yielding the sources of datagrams received within `wait`.
    pub fn recv_udp(&self, bind: SocketAddr, wait: Duration) -> Result<std::thread::JoinHandle<Result<Vec<SocketAddr>>>> {
        let netns = self.netns()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            netns.run(move || {
                let s = bind_udp(bind)?;
                ready_tx.send(()).ok();
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                let end = Instant::now() + wait;
                let mut from = Vec::new();
                let mut buf = [0u8; 2048];
                while Instant::now() < end {
                    if let Ok((_, src)) = s.recv_from(&mut buf) {
                        from.push(src);
                    }
                }
                Ok(from)
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).context("receiver did not start")?;
        Ok(handle)
    }

    /// Conntrack entries (`conntrack -L` lines) matching `args`.
    pub fn conntrack(&self, args: &[&str]) -> Result<Vec<String>> {
        let mut cmd = vec!["conntrack", "-L"];
        cmd.extend_from_slice(args);
        let out = Command::new("ip").args(["netns", "exec", &self.name]).args(&cmd).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
    }
}

impl Drop for LabNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Seed 000's world: a container behind a masquerading host, and a remote peer.
///
/// ```text
/// container 10.77.0.2 --[c0|h0]-- host 10.77.0.1 / 198.51.100.10 --[ext|r0]-- remote 198.51.100.20
/// ```
/// The host masquerades 10.77.0.0/24 out of `ext` and publishes UDP
/// `PUBLISHED_PORT` to the container (DNAT), like `docker run -p`.
pub struct GuardTopology {
    pub container: LabNs,
    pub host: LabNs,
    pub remote: LabNs,
}

pub const CONTAINER_IP: &str = "10.77.0.2";
pub const HOST_IP: &str = "198.51.100.10";
pub const REMOTE_IP: &str = "198.51.100.20";
pub const HOST_EXT_IF: &str = "ext";
pub const PUBLISHED_PORT: u16 = 25500;

impl GuardTopology {
    pub fn build(prefix: &str) -> Result<Self> {
        let t = Self {
            container: LabNs::create(&format!("{prefix}-ctr"))?,
            host: LabNs::create(&format!("{prefix}-host"))?,
            remote: LabNs::create(&format!("{prefix}-remote"))?,
        };
        link(&t.container, "c0", "10.77.0.2/24", &t.host, "h0", "10.77.0.1/24")?;
        link(&t.host, HOST_EXT_IF, "198.51.100.10/24", &t.remote, "r0", "198.51.100.20/24")?;
        t.container.exec(&["ip", "route", "add", "default", "via", "10.77.0.1"])?;
        t.host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        t.host.nft(&format!(
            "table ip lab_nat {{
               chain pre {{ type nat hook prerouting priority -100; iifname \"{HOST_EXT_IF}\" udp dport {PUBLISHED_PORT} dnat to {CONTAINER_IP}:{PUBLISHED_PORT}; }}
               chain post {{ type nat hook postrouting priority 100; ip saddr 10.77.0.0/24 oifname \"{HOST_EXT_IF}\" masquerade; }}
             }}"
        ))?;
        Ok(t)
    }

    /// The container sends from `port` to the remote's 7000; returns the
    /// source the remote saw (the container's external port).
    pub fn container_flow_source(&self, port: u16) -> Result<Option<SocketAddr>> {
        let rx = self.remote.recv_udp(sock(REMOTE_IP, 7000), Duration::from_millis(600))?;
        self.container.send_udp(sock(CONTAINER_IP, port), sock(REMOTE_IP, 7000), 1)?;
        Ok(rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??.first().copied())
    }

    /// The remote probes the host's `port` before the container has sent anything.
    pub fn remote_probe(&self, port: u16, from_port: u16) -> Result<()> {
        self.remote.send_udp(sock(REMOTE_IP, from_port), sock(HOST_IP, port), 1)
    }
}

#[must_use]
pub fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()), port)
}

/// A veth pair between two namespaces, addressed and up.
pub fn link(a: &LabNs, a_if: &str, a_addr: &str, b: &LabNs, b_if: &str, b_addr: &str) -> Result<()> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (ta, tb) = (format!("nfl{}x{n}a", std::process::id()), format!("nfl{}x{n}b", std::process::id()));
    run(&["ip", "link", "add", &ta, "type", "veth", "peer", "name", &tb])?;
    run(&["ip", "link", "set", &ta, "netns", &a.name, "name", a_if])?;
    run(&["ip", "link", "set", &tb, "netns", &b.name, "name", b_if])?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.exec(&["ip", "addr", "add", addr, "dev", ifname])?;
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// What one guard run observed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuardOutcome {
    /// The container's source port as the remote saw it (25000 means kept).
    pub seen_port: Option<u16>,
    /// The remote's reply reached the container.
    pub reply_delivered: bool,
}

/// The seed-000 sequence: remote probes host:25000, container then talks
/// from :25000 to the remote, the remote answers.
pub fn guard_sequence(t: &GuardTopology) -> Result<GuardOutcome> {
    t.remote_probe(25000, 7000)?;
    std::thread::sleep(Duration::from_millis(50));
    let seen = t.container_flow_source(25000)?;
    let rx = t.container.recv_udp(sock(CONTAINER_IP, 25000), Duration::from_millis(600));
    // The container's socket above is closed; this one receives the reply.
    let rx = rx?;
    if let Some(src) = seen {
        t.remote.send_udp(sock(REMOTE_IP, 7000), sock(HOST_IP, src.port()), 1)?;
    }
    let got = rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(GuardOutcome { seen_port: seen.map(|s| s.port()), reply_delivered: !got.is_empty() })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "BROKEN" }
}

/// `natfix lab --scenario guard`.
pub fn run_guard_lab() -> Result<bool> {
    use crate::{cli::{Cli, Command as CliCommand}, loader, stats};
    use clap::Parser as _;

    println!("== seed 000: unsolicited UDP steals a container's NAT port ==");
    println!("   container {CONTAINER_IP} -> host {HOST_IP} (masquerade) -> remote {REMOTE_IP}");
    let t = GuardTopology::build("natfix-lab")?;
    let before = guard_sequence(&t)?;
    println!(
        "   without natfix: remote probed host:25000 first; the container's flow from :25000 left as :{} ({})",
        before.seen_port.map_or_else(|| "nothing".into(), |p| p.to_string()),
        if before.seen_port == Some(25000) { "kept: the problem did not reproduce" } else { "port stolen, hole punching breaks" }
    );

    // Fresh conntrack state, then the same sequence with natfix on the host's external interface.
    t.host.exec(&["conntrack", "-F"]).ok();
    let words = ["natfix", "attach", "--iface", HOST_EXT_IF, "--guard", "20000-30000"];
    let CliCommand::Attach(args) = Cli::try_parse_from(words)?.command else { unreachable!() };
    let plan = loader::plan_guard(&args.guard)?;
    println!("   attaching natfix: guard 20000-30000 on {HOST_EXT_IF}, flow source {} ({})", plan.source.name(), plan.source_reason);
    let att = loader::attach(loader::AttachRequest {
        netns: t.host.netns()?,
        iface: HOST_EXT_IF.into(),
        guard: Some(plan),
        overlay: None,
        pin: false,
        replace: false,
        events_per_sec: loader::DEFAULT_EVENTS_PER_SEC,
    })?;
    let after = guard_sequence(&t);
    let counters = stats::read_counters(&att.pin_dir, &att.meta);
    att.detach()?;
    let after = after?;
    let fixed = after.seen_port == Some(25000) && after.reply_delivered;
    println!(
        "   with natfix: the container's flow left as :{}, the remote's reply {} the container ({})",
        after.seen_port.map_or_else(|| "nothing".into(), |p| p.to_string()),
        if after.reply_delivered { "reached" } else { "did not reach" },
        verdict(fixed)
    );
    for row in counters?.iter().filter(|r| r.packets > 0) {
        println!("     counter {:<6} {:<20} {}", row.program, row.reason, row.packets);
    }
    Ok(fixed && before.seen_port != Some(25000))
}

/// The overlay scenario scripts, shared with the qemu VM (tests/vm/).
const ESP_NAT_SH: &str = include_str!("../../tests/vm/esp-nat.sh");
const LIB_SH: &str = include_str!("../../tests/vm/lib.sh");

/// Can this kernel build an ESP SA with Docker's AEAD? Tried in a throwaway namespace.
fn kernel_has_esp() -> Result<bool> {
    let ns = LabNs::create("natfix-lab-esp-probe")?;
    Ok(ns
        .exec(&[
            "ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp", "spi", "0x100",
            "mode", "transport", "aead", "rfc4106(gcm(aes))", "0x000102030405060708090a0b0c0d0e0f10111213", "64",
        ])
        .is_ok())
}

/// `natfix lab --scenario overlay`: runs the VM's scenario script natively
/// when the kernel has ESP, inside a private mount namespace (its own
/// /run/netns and bpffs), so it cannot touch the host's namespaces or pins.
/// None: the kernel has no ESP, nothing was run.
pub fn run_overlay_lab() -> Result<Option<bool>> {
    println!("== seed 001: encrypted overlay (VXLAN in ESP) through 1:1 NAT ==");
    if !kernel_has_esp()? {
        println!("   this kernel cannot run ESP with rfc4106(gcm(aes)) (no xfrm/ESP crypto): the scenario needs it.");
        println!("   run it in a VM instead: `cargo xtask vm --scenario esp-nat --mode baseline,natfix-auto`");
        println!("   (boots a Debian 6.1 kernel in qemu; `cargo xtask lab` does it for you)");
        return Ok(None);
    }
    let dir = std::env::temp_dir().join(format!("natfix-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("esp-nat.sh"), ESP_NAT_SH)?;
    std::fs::write(dir.join("lib.sh"), LIB_SH)?;
    let exe = std::env::current_exe()?;
    let path = format!(
        "{}:{}",
        exe.parent().map_or_else(String::new, |p| p.display().to_string()),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mkdir -p /run/netns && mount -t tmpfs lab /run/netns && mount -t bpf bpf /sys/fs/bpf && exec sh \"$0\"/esp-nat.sh baseline,natfix-auto")
        .arg(&dir)
        .env("SCENARIO_DIR", &dir)
        .env("PATH", path)
        .env("GRO", "1")
        .output()
        .context("cannot run the overlay scenario")?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let results: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("the scenario printed no result: {}", String::from_utf8_lossy(&out.stderr)))?;
    let replies = |m: &serde_json::Value, dir: &str| -> (i64, i64) {
        let get = |size: &str, k: &str| m[dir][size][k].as_i64().unwrap_or(0);
        (get("small", "received") + get("large", "received"), get("small", "sent") + get("large", "sent"))
    };
    let mut ok = true;
    for m in results.as_array().into_iter().flatten() {
        let (ab, ab_sent) = replies(m, "a_to_b");
        let (ba, ba_sent) = replies(m, "b_to_a");
        let mode = m["mode"].as_str().unwrap_or("?");
        println!("   {mode:<12} overlay pings A->B {ab}/{ab_sent}, B->A {ba}/{ba_sent}");
        ok &= match mode {
            "baseline" => ab == 0 && ba == 0,
            _ => ab == ab_sent && ba == ba_sent && ab_sent > 0,
        };
    }
    println!("   {}", if ok { "reproduced without natfix, fixed with `natfix attach --overlay-fix` (ok)" } else { "BROKEN" });
    Ok(Some(ok))
}
