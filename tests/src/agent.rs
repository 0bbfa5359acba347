//! `natfix agent` as an operator runs it: a config file, the process, its
//! `/healthz` (asked through `natfix health`), SIGHUP and SIGTERM.

use std::{
    io::Read as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cli::{natfix, natfix_bin};

/// A running agent; SIGTERM'd (then killed) on drop.
pub struct AgentProc {
    child: Child,
    pub config: PathBuf,
    pub metrics: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl AgentProc {
    /// Writes `config` (with `metrics = "127.0.0.1:PORT"` added), starts the
    /// agent, and waits until its `/healthz` answers.
    ///
    /// # Errors
    ///
    /// When the agent exits or does not answer within 20 s.
    pub fn start(tag: &str, port: u16, config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("natfix-agent-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("natfix.toml");
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        std::fs::write(&path, format!("metrics = \"{metrics}\"\n{config}"))?;
        let mut child = Command::new(natfix_bin())
            .args(["agent", "--config"])
            .arg(&path)
            .env("NATFIX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().context("stderr")?;
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let mut agent = Self { child, config: path, metrics, log, _dir: TempDir(dir) };
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Some(status) = agent.child.try_wait()? {
                bail!("natfix agent exited early ({status}): {}", agent.log());
            }
            if agent.health().is_ok() {
                return Ok(agent);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("natfix agent did not answer on {metrics} within 20 s: {}", agent.log())
    }

    /// What the agent logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// `/healthz`, through `natfix health`.
    ///
    /// # Errors
    ///
    /// When the agent does not answer 200 or the body is not JSON.
    pub fn health(&self) -> Result<Value> {
        let out = natfix(&["health", "--addr", &self.metrics.to_string()]);
        if !out.status.success() {
            bail!("natfix health: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// How long until every configured attachment reports `attached`.
    ///
    /// # Errors
    ///
    /// When that does not happen within `limit` (the last `/healthz` is in the message).
    pub fn wait_attached(&self, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < limit {
            if let Ok(h) = self.health() {
                let all = h["attachments"].as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|e| e["state"] == "attached"));
                if all {
                    return Ok(start.elapsed());
                }
                last = h;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("not every attachment attached within {limit:?}: {last}\n{}", self.log())
    }

    /// Replaces the config (`metrics` kept) and sends SIGHUP.
    ///
    /// # Errors
    ///
    /// If the file cannot be written or the signal sent.
    pub fn reload(&self, config: &str) -> Result<()> {
        // Written beside and renamed over: the agent never reads half a file.
        let tmp = self.config.with_extension("new");
        std::fs::write(&tmp, format!("metrics = \"{}\"\n{config}", self.metrics))?;
        std::fs::rename(&tmp, &self.config)?;
        self.signal(nix::sys::signal::Signal::SIGHUP)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?), sig)?;
        Ok(())
    }

    /// SIGTERM, and the exit status.
    ///
    /// # Errors
    ///
    /// If it does not exit within 30 s.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("natfix agent ignored SIGTERM: {}", self.log())
    }

    /// SIGKILL: the agent dies without cleaning up.
    ///
    /// # Errors
    ///
    /// If it cannot be killed.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.signal(nix::sys::signal::Signal::SIGTERM);
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// natfix's records on the host (`status --json`).
///
/// # Panics
///
/// If `natfix status` does not print JSON.
#[must_use]
pub fn records() -> Vec<Value> {
    let out = natfix(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    v["attachments"].as_array().cloned().unwrap_or_default()
}
