//! The Docker engine the image and its tests need: whether one answers on
//! /var/run/docker.sock, and starting one (`dockerd`, as on these machines
//! no init system runs it) for the length of `cargo xtask test`.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::run::workspace;

/// How to get an engine, for error messages.
pub const START_HINT: &str = "start it with `dockerd &` (or `systemctl start docker`); `cargo xtask deps` installs docker.io";

/// The engine's version when one answers on the default socket.
pub fn server_version() -> Option<String> {
    let out = Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]).stderr(Stdio::null()).output().ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !version.is_empty()).then_some(version)
}

/// Fails unless an engine answers, saying how to start one.
pub fn require_engine() -> Result<String> {
    server_version().with_context(|| format!("dockerd is not answering on /var/run/docker.sock: {START_HINT}"))
}

/// An engine for the tests: the one already running, or one started here
/// and stopped again on drop (only then: someone else's engine stays).
pub struct Engine {
    started: Option<Child>,
    pub version: String,
}

impl Engine {
    pub fn ensure() -> Result<Self> {
        if let Some(version) = server_version() {
            return Ok(Self { started: None, version });
        }
        let log = workspace().join("target/dockerd.log");
        std::fs::create_dir_all(workspace().join("target"))?;
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new("dockerd")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot run dockerd (`cargo xtask deps` installs docker.io); {START_HINT}"))?;
        let mut engine = Self { started: Some(child), version: String::new() };
        let end = Instant::now() + Duration::from_mins(1);
        while Instant::now() < end {
            if let Some(version) = server_version() {
                println!("xtask: started dockerd {version} (log: {})", log.display());
                engine.version = version;
                return Ok(engine);
            }
            if let Some(status) = engine.started.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                engine.started = None;
                bail!("dockerd exited at start ({status}): {}", log_tail(&log));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("dockerd did not answer within 60 s: {}", log_tail(&log))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let Some(mut child) = self.started.take() else { return };
        // SIGTERM: dockerd stops its containers and the containerd it started.
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if matches!(child.try_wait(), Ok(Some(_))) {
                println!("xtask: stopped the dockerd it started");
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        println!("xtask: killed the dockerd it started (no exit 30 s after SIGTERM)");
    }
}

/// The last lines of a log, on one line, for an error message.
fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
