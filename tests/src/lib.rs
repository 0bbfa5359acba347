//! Test kit for natfix's end-to-end tests: throwaway network namespaces and
//! veth pairs that remove themselves (even when a test fails), the natfix
//! binary, and the kernel's own view of what is attached.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType};

/// The natfix binary under test: $NATFIX_BIN, else the workspace's debug build.
#[must_use]
pub fn natfix_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATFIX_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/natfix");
    assert!(p.exists(), "{} missing: run `cargo build -p natfix` first (cargo xtask test does)", p.display());
    p
}

pub fn natfix(args: &[&str]) -> Output {
    Command::new(natfix_bin()).args(args).env("NATFIX_LOG", "warn").output().expect("run natfix")
}

/// Detaches a pinned attachment when dropped, so a failed assertion does not
/// leave its pin for a later namespace that gets the same inode.
pub struct DetachOnDrop<'a> {
    pub iface: &'a str,
    pub netns: &'a str,
}

impl Drop for DetachOnDrop<'_> {
    fn drop(&mut self) {
        let _ = natfix(&["detach", "--iface", self.iface, "--netns", self.netns]);
    }
}

/// Skips (returns false) unless root: these tests create namespaces and load BPF.
#[must_use]
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIP: needs root (network namespaces, BPF)");
    false
}

/// Mounts bpffs when the machine has none (fresh CI machines).
pub fn ensure_bpffs() {
    let ok = nix::sys::statfs::statfs("/sys/fs/bpf").is_ok_and(|s| s.filesystem_type().0 as i64 == 0xcafe_4a11);
    if !ok {
        let st = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status().expect("mount");
        assert!(st.success(), "cannot mount bpffs");
    }
}

pub fn sh(cmd: &[&str]) -> Result<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A named namespace (`ip netns add`), deleted on drop.
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("nft-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        sh(&["ip", "netns", "add", &name]).expect("ip netns add");
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        sh(&full)
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn netns(&self) -> natfix::netns::Netns {
        natfix::netns::Netns::resolve(Some(self.path().to_str().expect("utf8"))).expect("resolve")
    }

    /// Runs `f` inside this namespace on a fresh thread.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        self.netns().run(f)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        // A test may have deleted it already (to show what natfix does then).
        if self.path().exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }
}

/// Connects `a` and `b` with a veth pair named `a_if`/`b_if`, addresses given as CIDR.
pub fn veth(a: &TestNs, a_if: &str, a_addr: &str, b: &TestNs, b_if: &str, b_addr: &str) -> Result<()> {
    let tmp_a = format!("t{}a{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
    let tmp_b = format!("t{}b{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
    sh(&["ip", "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b])?;
    sh(&["ip", "link", "set", &tmp_a, "netns", &a.name, "name", a_if])?;
    sh(&["ip", "link", "set", &tmp_b, "netns", &b.name, "name", b_if])?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.exec(&["ip", "addr", "add", addr, "dev", ifname])?;
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Sends `count` datagrams from `from` (bound to `bind`) to `to`, inside `ns`.
pub fn send_udp(ns: &TestNs, bind: SocketAddr, to: SocketAddr, count: u32) -> Result<()> {
    ns.run(move || {
        let s = natfix::lab::bind_udp(bind)?;
        for i in 0..count {
            s.send_to(&i.to_be_bytes(), to)?;
        }
        Ok(())
    })
}

/// Binds `bind` inside `ns` and counts datagrams arriving within `wait`.
pub fn count_udp(ns: &TestNs, bind: SocketAddr, wait: Duration) -> Result<std::thread::JoinHandle<Result<u32>>> {
    let netns = ns.netns();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        netns.run(move || {
            let s = natfix::lab::bind_udp(bind)?;
            tx.send(()).ok();
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let end = Instant::now() + wait;
            let mut n = 0;
            let mut buf = [0u8; 2048];
            while Instant::now() < end {
                if s.recv_from(&mut buf).is_ok() {
                    n += 1;
                }
            }
            Ok(n)
        })
    });
    rx.recv_timeout(Duration::from_secs(5)).context("receiver did not start")?;
    Ok(handle)
}

/// Program ids attached through tcx at `iface` in `ns` (kernel's view, BPF_PROG_QUERY).
pub fn tcx_prog_ids(ns: &TestNs, iface: &str, attach: TcAttachType) -> Result<Vec<u32>> {
    let iface = iface.to_owned();
    ns.run(move || {
        let (_, progs) = SchedClassifier::query_tcx(&iface, attach)?;
        Ok(progs.iter().map(aya::programs::ProgramInfo::id).collect())
    })
}

/// The XDP program id on `iface` in `ns` per `ip -j link` (kernel's view), if any.
pub fn xdp_prog_id(ns: &TestNs, iface: &str) -> Result<Option<u64>> {
    let out = ns.exec(&["ip", "-j", "-d", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["xdp"]["prog"]["id"].as_u64())
}

/// A running `natfix attach`, killed on drop if still alive.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// Starts `natfix attach <args>` and waits until its record shows up in `natfix status`.
    pub fn start(args: &[&str]) -> Result<Self> {
        let child = Command::new(natfix_bin())
            .arg("attach")
            .args(args)
            .env("NATFIX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let mut d = Self { child };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Some(status) = d.child.try_wait()? {
                let mut err = String::new();
                use std::io::Read as _;
                d.child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                bail!("natfix attach exited early ({status}): {err}");
            }
            let st = natfix(&["status", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
            if v["attachments"].as_array().is_some_and(|a| a.iter().any(|x| x["pid"].as_u64() == Some(u64::from(pid)))) {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("natfix attach did not come up within 20 s")
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > end {
                bail!("natfix attach ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}

/// Counter value from `natfix stats --json` for (namespace, iface, reason) of program `prog`.
pub fn stat(netns: &str, iface: &str, prog: &str, reason: &str) -> u64 {
    let out = natfix(&["stats", "--json", "--netns", netns, "--iface", iface]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["iface"] == iface)
        .flat_map(|a| a["counters"].as_array().cloned().unwrap_or_default())
        .find(|c| c["program"] == prog && c["reason"] == reason)
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or(0)
}
