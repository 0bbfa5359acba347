//! `natfix agent`'s rows: idle memory with four attachments, how long a
//! reload that changes all four takes, and how long after a namespace is
//! recreated it is attached again. The agent's JSON log says when it did
//! what; each row's baseline is the same work done by the CLI in the same run.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{bench::sh, run::workspace};

const ENTRIES: usize = 4;
const METRICS: &str = "127.0.0.1:19499";

fn natfix() -> std::path::PathBuf {
    workspace().join("target/release/natfix")
}

/// `ENTRIES` host namespaces, each with a veth to one peer namespace.
struct Lab {
    hosts: Vec<String>,
    peer: String,
}

impl Lab {
    fn new() -> Result<Self> {
        let peer = "nfx-bag-peer".to_owned();
        let lab = Self { hosts: (0..ENTRIES).map(|i| format!("nfx-bag-{i}")).collect(), peer };
        let _ = sh(&["ip", "netns", "del", &lab.peer]);
        sh(&["ip", "netns", "add", &lab.peer])?;
        for i in 0..ENTRIES {
            lab.make_host(i)?;
        }
        Ok(lab)
    }

    /// (Re)creates host namespace `i` and its veth, as Docker makes a sandbox.
    fn make_host(&self, i: usize) -> Result<()> {
        let ns = &self.hosts[i];
        let _ = sh(&["ip", "netns", "del", ns]);
        sh(&["ip", "netns", "add", ns])?;
        let peer_if = format!("bagp{i}");
        let _ = sh(&["ip", "-n", &self.peer, "link", "del", &peer_if]);
        sh(&["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &peer_if, "netns", &self.peer])?;
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &self.peer, "link", "set", &peer_if, "up"])?;
        Ok(())
    }

    fn config(&self, extra_range: bool) -> String {
        let mut text = format!("metrics = \"{METRICS}\"\n");
        for (i, ns) in self.hosts.iter().enumerate() {
            let guard = if extra_range { "[\"20000-30000\", 40000]" } else { "\"20000-30000\"" };
            let hook = if i % 2 == 0 { "xdp" } else { "tc" };
            let _ = write!(text, "[[attach]]\nnetns = \"{ns}\"\niface = \"eth0\"\nguard = {guard}\nguard-hook = \"{hook}\"\nflow-source = \"own\"\n");
        }
        text
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.peer)) {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// A running agent and the JSON lines it logged (with the wall clock they came at).
struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Agent {
    fn start(config: &std::path::Path) -> Result<Self> {
        let mut child = Command::new(natfix())
            .args(["--log-format", "json", "agent", "--config"])
            .arg(config)
            .env("NATFIX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let err = child.stderr.take().context("stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let (Ok(v), Ok(mut l)) = (serde_json::from_str::<Value>(&line), sink.lock()) {
                    l.push(v);
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// Waits for a log line containing `needle` after line `from`; its index.
    fn wait_for(&self, needle: &str, from: usize, count: usize) -> Result<usize> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let found: Vec<usize> = self
                .lines
                .lock()
                .map(|l| l.iter().enumerate().skip(from).filter(|(_, v)| v["message"].as_str().is_some_and(|m| m.contains(needle))).map(|(i, _)| i).collect())
                .unwrap_or_default();
            if found.len() >= count {
                return Ok(found[count - 1]);
            }
            if Instant::now() > end {
                bail!("the agent did not log `{needle}` ({count}x) within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn line(&self, i: usize) -> Value {
        self.lines.lock().map(|l| l[i].clone()).unwrap_or_default()
    }

    fn count(&self) -> usize {
        self.lines.lock().map_or(0, |l| l.len())
    }

    fn rss_mb(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).context("VmRSS")?;
        Ok(kb / 1024.0)
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status();
    }

    fn stop(mut self) -> Result<()> {
        self.signal("TERM");
        if !self.child.wait()?.success() {
            bail!("natfix agent exited with an error");
        }
        Ok(())
    }
}

/// The wall clock of a log line (its RFC 3339 `timestamp`).
fn logged_at(line: &Value) -> Result<SystemTime> {
    let t = line["timestamp"].as_str().context("a log line without timestamp")?;
    humantime::parse_rfc3339(t).with_context(|| format!("cannot read time {t}"))
}

/// How a row is made (`bench::row`).
type Row = fn(&str, &str, &str, Vec<f64>, &str, Vec<f64>, bool) -> Value;

/// The agent's rows: memory, reload and reattach, each against the CLI doing the same.
pub fn agent_benches(runs: u32, row: Row) -> Result<Vec<Value>> {
    let lab = Lab::new()?;
    let dir = workspace().join("target/bench-agent");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("natfix.toml");
    let mut rows = vec![idle_memory(&lab, &config, runs, row)?];

    std::fs::write(&config, lab.config(false))?;
    let agent = Agent::start(&config)?;
    agent.wait_for("attached (", 0, ENTRIES)?;
    let reload = reloads(&agent, &lab, &dir, runs)?;
    let reattach = reattaches(&agent, &lab, runs)?;
    // Left pinned for the baselines: the same changes through the CLI.
    std::fs::write(&config, format!("pin = true\n{}", lab.config(false)))?;
    let from = agent.count();
    agent.signal("HUP");
    agent.wait_for("reload applied in", from, 1)?;
    agent.stop()?;
    let set = sets(&lab, runs)?;
    let attach = attaches(&lab, runs)?;
    for ns in &lab.hosts {
        let _ = sh(&[natfix().to_str().unwrap_or("natfix"), "detach", "--netns", ns, "--iface", "eth0"]);
    }
    rows.push(row("latency", "`natfix agent` reload changing 4 attachments in place (SIGHUP to applied)", "ms", reload, "4 `natfix set` of the same change", set, false));
    rows.push(row("latency", "`natfix agent` attaching again after a namespace is recreated (veth up to attached)", "ms", reattach, "`natfix attach --pin` of the same", attach, false));
    Ok(rows)
}

/// Idle RSS with four attachments, against an agent with none.
fn idle_memory(lab: &Lab, config: &std::path::Path, runs: u32, row: Row) -> Result<Value> {
    let (mut with4, mut with0) = (Vec::new(), Vec::new());
    for _ in 0..runs.min(3) {
        std::fs::write(config, format!("metrics = \"{METRICS}\"\n"))?;
        let empty = Agent::start(config)?;
        std::thread::sleep(Duration::from_secs(2));
        with0.push(empty.rss_mb()?);
        empty.stop()?;
        std::fs::write(config, lab.config(false))?;
        let agent = Agent::start(config)?;
        agent.wait_for("attached (", 0, ENTRIES)?;
        std::thread::sleep(Duration::from_secs(3));
        with4.push(agent.rss_mb()?);
        agent.stop()?;
    }
    Ok(row("memory", "`natfix agent`, 4 attachments, idle RSS", "MB", with4, "`natfix agent` with none", with0, false))
}

/// SIGHUP to "reload applied", the config alternating between two ranges sets.
fn reloads(agent: &Agent, lab: &Lab, dir: &std::path::Path, runs: u32) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for r in 0..runs {
        let from = agent.count();
        std::fs::write(dir.join("next.toml"), lab.config(r % 2 == 0))?;
        std::fs::rename(dir.join("next.toml"), dir.join("natfix.toml"))?;
        agent.signal("HUP");
        let i = agent.wait_for("reload applied in", from, 1)?;
        agent.wait_for("settings changed in place", from, ENTRIES)?;
        let ms = agent.line(i)["message"].as_str().and_then(|m| m.split_whitespace().nth(3)).and_then(|v| v.parse().ok()).context("reload ms")?;
        out.push(ms);
    }
    Ok(out)
}

/// A namespace deleted and made again: from its veth being up to attached.
fn reattaches(agent: &Agent, lab: &Lab, runs: u32) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let from = agent.count();
        let _ = sh(&["ip", "netns", "del", &lab.hosts[0]]);
        std::thread::sleep(Duration::from_millis(500));
        lab.make_host(0)?;
        let made = SystemTime::now();
        let i = agent.wait_for("attached (", from, 1)?;
        out.push(logged_at(&agent.line(i))?.duration_since(made).unwrap_or_default().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Four `natfix set` of the reloads' change, on the pinned attachments.
fn sets(lab: &Lab, runs: u32) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for r in 0..runs {
        let t = Instant::now();
        for ns in &lab.hosts {
            let mut args = vec!["set", "--netns", ns.as_str(), "--iface", "eth0", "--guard", "20000-30000"];
            if r % 2 == 0 {
                args.extend(["--guard", "40000"]);
            }
            if !Command::new(natfix()).args(&args).env("NATFIX_LOG", "warn").status()?.success() {
                bail!("natfix set failed");
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// `natfix attach --pin` of the first entry (detached in between).
fn attaches(lab: &Lab, runs: u32) -> Result<Vec<f64>> {
    let ns = &lab.hosts[0];
    let _ = sh(&[natfix().to_str().unwrap_or("natfix"), "detach", "--netns", ns, "--iface", "eth0"]);
    let mut out = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let args = ["attach", "--netns", ns, "--iface", "eth0", "--guard", "20000-30000", "--flow-source", "own", "--pin"];
        if !Command::new(natfix()).args(args).env("NATFIX_LOG", "warn").status()?.success() {
            bail!("natfix attach failed");
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        sh(&[natfix().to_str().unwrap_or("natfix"), "detach", "--netns", ns, "--iface", "eth0"])?;
    }
    Ok(out)
}
