//! Throwaway network namespaces and the veths between them: the one
//! scaffolding the lab, the end-to-end tests and the benches build on.
//! A `ScratchNs` deletes its namespace when dropped, even when a test fails.

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::sys::netns::{IP_NETNS_DIR, Netns};

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
/// exec closes the CLOEXEC ones. Scenarios reuse fixed ports back to back, so
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

#[must_use]
pub fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()), port)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A namespace made with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct ScratchNs {
    pub name: String,
}

impl ScratchNs {
    /// The namespace `name`, replacing a leftover of a crashed run.
    pub fn create(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(&["ip", "netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace with a name no other test or run uses (`nft-TAG-PID-N`).
    pub fn unique(tag: &str) -> Result<Self> {
        Self::create(&format!("nft-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)))
    }

    /// Runs `cmd` inside the namespace (`ip netns exec`).
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run(&full)
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from(IP_NETNS_DIR).join(&self.name)
    }

    pub fn netns(&self) -> Result<Netns> {
        Netns::resolve(Some(&self.path().display().to_string()))
    }

    /// Runs `f` inside this namespace on a fresh thread.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        self.netns()?.run(f)
    }

    /// Applies an nftables ruleset (nft -f -) inside the namespace; the text
    /// is the caller's, never user input.
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
        self.run(move || {
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

impl Drop for ScratchNs {
    fn drop(&mut self) {
        // A test may have deleted it already (to show what natfix does then).
        if self.path().exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        }
    }
}

/// A veth pair between two namespaces, named `a_if`/`b_if`, addressed (CIDR) and up.
pub fn veth(a: &ScratchNs, a_if: &str, a_addr: &str, b: &ScratchNs, b_if: &str, b_addr: &str) -> Result<()> {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    let (ta, tb) = (format!("nfv{pid}x{n}a"), format!("nfv{pid}x{n}b"));
    run(&["ip", "link", "add", &ta, "type", "veth", "peer", "name", &tb])?;
    run(&["ip", "link", "set", &ta, "netns", &a.name, "name", a_if])?;
    run(&["ip", "link", "set", &tb, "netns", &b.name, "name", b_if])?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.exec(&["ip", "addr", "add", addr, "dev", ifname])?;
        ns.exec(&["ip", "link", "set", ifname, "up"])?;
    }
    Ok(())
}
