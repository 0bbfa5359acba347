//! natfix's test kit, apart from the product: the `BPF_PROG_TEST_RUN`
//! harness, the Rust model of the data plane (a deliberate second
//! implementation, for differential tests), packet builders and generators,
//! the natfix binary as a user runs it, and the kernel's own view of what is
//! attached. Namespaces come from the product's `lab::scratch`, the one
//! scaffolding the lab, these tests and the benches share.
//!
//! Tests that need root (namespaces, BPF) are `#[ignore = "needs root: cargo
//! xtask test"]`: a plain `cargo test` lists them as ignored, `cargo xtask
//! test` runs them with `--include-ignored`, and `require_root` fails them
//! loudly if that is done without root.

pub mod agent;
pub mod cli;
pub mod docker;
pub mod frames;
pub mod harness;
pub mod kernel_view;
pub mod model;
pub mod packet;
pub mod plans;

pub use natfix::lab::scratch::{ScratchNs, bind_udp, run as sh, sock, veth};

/// Fails the calling test unless it runs as root.
///
/// # Panics
///
/// When not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, BPF): run it with `cargo xtask test`"
    );
}

/// Mounts bpffs when the machine has none (fresh CI machines).
///
/// # Panics
///
/// If the mount fails.
pub fn ensure_bpffs() {
    let ok = nix::sys::statfs::statfs("/sys/fs/bpf").is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if !ok {
        let st = std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status().expect("mount");
        assert!(st.success(), "cannot mount bpffs");
    }
}

/// A root test's set-up: root, bpffs.
pub fn root_setup() {
    require_root();
    ensure_bpffs();
}

/// A scratch namespace for a test (`ScratchNs::unique`), or a failed test.
///
/// # Panics
///
/// If the namespace cannot be made.
#[must_use]
pub fn scratch_ns(tag: &str) -> ScratchNs {
    ScratchNs::unique(tag).expect("ip netns add")
}

/// Runs `f` on a thread inside a fresh scratch namespace (deleted after).
///
/// # Panics
///
/// If the namespace cannot be made or entered.
pub fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = scratch_ns("fresh");
    ns.run(move || Ok(f())).expect("run in a scratch namespace")
}

pub use cli::{Daemon, DetachOnDrop, natfix, natfix_bin, output_within, stat};
pub use kernel_view::{tcx_prog_ids, xdp_prog_id};

/// Sends `count` datagrams from `bind` to `to`, inside `ns`.
pub fn send_udp(ns: &ScratchNs, bind: std::net::SocketAddr, to: std::net::SocketAddr, count: u32) -> anyhow::Result<()> {
    ns.send_udp(bind, to, count)
}

/// Binds `bind` inside `ns` and counts the datagrams arriving within `wait`.
pub fn count_udp(
    ns: &ScratchNs,
    bind: std::net::SocketAddr,
    wait: std::time::Duration,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<u32>>> {
    let received = ns.recv_udp(bind, wait)?;
    Ok(std::thread::spawn(move || {
        let from = received.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        Ok(u32::try_from(from.len())?)
    }))
}

/// Reports the calling test skipped, with why: it returns without having
/// checked anything, and must not count as passed. `cargo xtask test` sets
/// `NATFIX_SKIP_LOG` and lists these lines as skipped in its summary.
///
/// # Panics
///
/// If `$NATFIX_SKIP_LOG` is set but cannot be written.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("NATFIX_SKIP_LOG") {
        let line = format!("{test}: {reason}\n");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        file.and_then(|mut f| f.write_all(line.as_bytes())).expect("write NATFIX_SKIP_LOG");
    }
}

/// `promtool check metrics` on a scrape. Fails (never skips) without
/// promtool: validating the exposition is the point.
///
/// # Panics
///
/// When promtool is missing or rejects `text`.
pub fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}): install it with `apt-get install -y prometheus`"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics rejects the scrape:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
