//! natfix as its users run it: the binary, a foreground `natfix attach`,
//! and what `natfix stats` reports.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// The natfix binary under test: `$NATFIX_BIN`, else the workspace's debug build.
///
/// # Panics
///
/// If neither is set nor built.
#[must_use]
pub fn natfix_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATFIX_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/natfix");
    assert!(p.exists(), "{} missing: run `cargo build -p natfix` first (cargo xtask test does)", p.display());
    p
}

#[must_use]
pub fn natfix(args: &[&str]) -> Output {
    output_within(Command::new(natfix_bin()).args(args).env("NATFIX_LOG", "warn"), Duration::from_mins(2))
}

/// Runs `cmd` to completion like `Command::output`, but kills it and panics if
/// it is still running after `limit`: a command that should have refused its
/// input and instead attached in the foreground fails the test, not hangs it.
///
/// # Panics
///
/// If `cmd` cannot be spawned or outlives `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    // Readers on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= end {
            // SIGTERM first: a foreground attach detaches on it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
                nix::sys::signal::Signal::SIGTERM,
            );
            std::thread::sleep(Duration::from_secs(2));
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out_t.join().expect("reader"), stderr: err_t.join().expect("reader") }
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

/// A running `natfix attach`, killed on drop if still alive.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// Starts `natfix attach <args>` and waits until its record shows up in `natfix status`.
    pub fn start(args: &[&str]) -> Result<Self> {
        use std::io::Read as _;
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
                d.child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                bail!("natfix attach exited early ({status}): {err}");
            }
            let st = natfix(&["status", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
            if v["attachments"].as_array().is_some_and(|a| a.iter().any(|x| x["pid"].as_u64() == Some(u64::from(pid)) && x["state"] == "running")) {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("natfix attach did not come up within 20 s")
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        sigterm(&self.child)?;
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
            let _ = sigterm(&self.child);
            let _ = self.child.wait();
        }
    }
}

/// SIGTERM to `child`: a foreground attach detaches on it.
fn sigterm(child: &Child) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    Ok(())
}

/// Counter value from `natfix stats --json` for (namespace, iface, reason) of program `prog`.
#[must_use]
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
