//! deploy/compose.yml and deploy/swarm-stack.yml brought up as written on a
//! real Docker engine, from `natfix:latest`: the agent attaches what its
//! configuration asks for, `/metrics` from the host passes `promtool` and
//! shows the attachment, and `docker-compose down` / `docker stack rm`
//! leave nothing natfix made (fail-open), unless the configuration pins.
//!
//! Each file is copied unchanged into a scratch directory, with a
//! configuration beside it that guards only what the test made (a scratch
//! namespace's veth; the swarm's ingress namespace), never the host's uplink.
//! Skipped, with the reason, without an engine, the image or Compose.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use natfix_testkit::{
    ScratchNs,
    agent::records,
    count_udp,
    docker::{self, Swarm, docker},
    natfix, promtool_check, root_setup, scratch_ns, send_udp, skip, veth, xdp_prog_id,
};
use serde_json::Value;

/// The address the deploy files' configurations serve, and the image's
/// `HEALTHCHECK` asks.
const METRICS: &str = "127.0.0.1:9477";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `deploy/FILE` copied into a scratch directory, with `config` written
/// beside it as `config_name`; removed on drop.
struct DeployDir(PathBuf);

impl DeployDir {
    fn new(file: &str, config_name: &str, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("natfix-deploy-{}-{}", file.replace('.', "-"), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
        std::fs::copy(&source, dir.join(file)).unwrap();
        std::fs::write(dir.join(config_name), config).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for DeployDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Debian's `docker-compose` (1.29), else the compose plugin.
fn compose() -> Option<Vec<&'static str>> {
    let works = |cmd: &[&str]| Command::new(cmd[0]).args(&cmd[1..]).arg("version").output().is_ok_and(|o| o.status.success());
    [&["docker-compose"][..], &["docker", "compose"][..]].into_iter().find(|c| works(c)).map(<[&str]>::to_vec)
}

fn run(cmd: &[&str], args: &[&str]) -> std::process::Output {
    Command::new(cmd[0]).args(&cmd[1..]).args(args).output().unwrap()
}

/// The record of natfix's attachment on `iface` in `netns`, as `status` shows it.
fn record(netns: &str, iface: &str) -> Option<Value> {
    records().into_iter().find(|r| r["netns"] == netns && r["iface"] == iface)
}

/// Waits until that record's state is `state`; the container's log on failure.
fn wait_state(netns: &str, iface: &str, state: &str, logs: impl Fn() -> String) -> Value {
    let end = Instant::now() + Duration::from_mins(1);
    loop {
        if let Some(r) = record(netns, iface).filter(|r| r["state"] == state) {
            return r;
        }
        assert!(Instant::now() < end, "no {state} attachment on {iface} in {netns}: {:?}\n{}", record(netns, iface), logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `/metrics` of the agent in the container (it shares the host's network),
/// once it reports the configured attachment on `iface` in `netns` attached
/// (the agent updates that after its pass, a moment after the record).
fn scrape_attached(netns: &str, iface: &str) -> String {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let text = ureq::get(&format!("http://{METRICS}/metrics")).call().map(|r| r.into_body().read_to_string().unwrap());
        match text {
            Ok(t) if has_sample(&t, "natfix_configured_attached", &[("netns", netns), ("iface", iface)], "1") => return t,
            Ok(t) => assert!(Instant::now() < end, "natfix_configured_attached{{netns={netns},iface={iface}}} is not 1:\n{t}"),
            Err(e) => assert!(Instant::now() < end, "cannot scrape {METRICS}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the scrape has `name{...}` with every label in `labels` and value `value`.
fn has_sample(text: &str, name: &str, labels: &[(&str, &str)], value: &str) -> bool {
    text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).any(|l| {
        labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))) && l.rsplit(' ').next() == Some(value)
    })
}

/// Unsolicited UDP from `peer` to host:`port` reaches the host?
fn reaches(host: &ScratchNs, peer: &ScratchNs, port: u16) -> bool {
    let rx = count_udp(host, addr(&format!("10.131.0.1:{port}")), Duration::from_millis(300)).unwrap();
    send_udp(peer, addr("10.131.0.2:7000"), addr(&format!("10.131.0.1:{port}")), 3).unwrap();
    rx.join().unwrap().unwrap() == 3
}

/// `docker-compose down` on drop, whatever happened.
struct ComposeDown<'a> {
    compose: &'a [&'static str],
    file: PathBuf,
    project: String,
}

impl ComposeDown<'_> {
    fn args<'b>(&'b self, more: &[&'b str]) -> Vec<&'b str> {
        let mut a = vec!["-f", self.file.to_str().unwrap(), "-p", &self.project];
        a.extend_from_slice(more);
        a
    }
}

impl Drop for ComposeDown<'_> {
    fn drop(&mut self) {
        let _ = run(self.compose, &self.args(&["down", "--timeout", "30"]));
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn compose_up_runs_the_agent_and_down_leaves_nothing() {
    root_setup();
    if let Some(why) = docker::image_unavailable() {
        return skip(&why);
    }
    let Some(compose) = compose() else {
        return skip("neither docker-compose nor the compose plugin answers (cargo xtask deps installs docker-compose)");
    };
    docker::ensure_shared_root();
    let _turn = docker::exclusive();
    let host = scratch_ns("dkcm");
    let peer = scratch_ns("dkcmp");
    veth(&host, "h0", "10.131.0.1/24", &peer, "p0", "10.131.0.2/24").unwrap();
    let config = format!("metrics = \"{METRICS}\"\n\n[[attach]]\nnetns = \"{}\"\niface = \"h0\"\nguard = [\"20000-30000\"]\n", host.name);
    let dir = DeployDir::new("compose.yml", "natfix.toml", &config);
    let up = ComposeDown { compose: &compose, file: dir.file("compose.yml"), project: format!("natfixtest{}", std::process::id()) };
    let out = run(&compose, &up.args(&["up", "-d"]));
    assert!(out.status.success(), "compose up: {}", String::from_utf8_lossy(&out.stderr));
    let container = String::from_utf8_lossy(&run(&compose, &up.args(&["ps", "-q"])).stdout).trim().to_owned();
    let logs = || String::from_utf8_lossy(&Command::new("docker").args(["logs", &container]).output().unwrap().stderr).into_owned();

    // The agent pins what it attaches (pin = false: it detaches at stop), recorded as its own.
    let rec = wait_state(&host.name, "h0", "pinned", logs);
    assert_eq!(rec["managed"]["config"], "/etc/natfix/natfix.toml", "{rec}");
    assert!(!reaches(&host, &peer, 25000), "guarded from the container");
    let text = scrape_attached(&host.name, "h0");
    promtool_check(&text);
    assert!(text.lines().any(|l| l.starts_with("natfix_packets_total{") && l.contains("iface=\"h0\"")), "the attachment's counters: {text}");
    // The image's HEALTHCHECK (`natfix health`) runs its first check after its interval (30 s).
    let end = Instant::now() + Duration::from_secs(75);
    while docker(&["inspect", "-f", "{{.State.Health.Status}}", &container]).unwrap().trim() != "healthy" {
        assert!(Instant::now() < end, "the container's health check never passed: {}", docker(&["inspect", "-f", "{{json .State.Health}}", &container]).unwrap());
        std::thread::sleep(Duration::from_millis(500));
    }

    // down: SIGTERM, the agent detaches what it made; the host fails open.
    let out = run(&compose, &up.args(&["down", "--timeout", "30"]));
    assert!(out.status.success(), "compose down: {}", String::from_utf8_lossy(&out.stderr));
    assert!(record(&host.name, "h0").is_none(), "no record left: {:?}", record(&host.name, "h0"));
    assert_eq!(xdp_prog_id(&host, "h0").unwrap(), None, "no program left on h0");
    assert!(!Path::new("/sys/fs/bpf/natfix").read_dir().into_iter().flatten().flatten().any(|d| d.path().join("h0").exists()), "no pins left");
    assert!(reaches(&host, &peer, 25000), "fail-open after down");
}

/// The swarm's ingress namespace, as the agent names it in its records.
const INGRESS: &str = "ingress";

#[test]
#[ignore = "needs root: cargo xtask test"]
fn swarm_stack_runs_the_agent_in_ingress_and_its_pins_outlive_stack_rm() {
    root_setup();
    if let Some(why) = docker::image_unavailable() {
        return skip(&why);
    }
    docker::ensure_shared_root();
    let _turn = docker::exclusive();
    if let Some(why) = Swarm::unavailable() {
        return skip(&why);
    }
    let busybox = docker::ensure_busybox().unwrap();
    let swarm = Swarm::init(busybox, &format!("natfix-s{}", std::process::id()));
    // The stack's own configuration, with the host's uplink entry left out.
    let config = format!("metrics = \"{METRICS}\"\npin = true\n\n[[attach]]\nnetns = \"{INGRESS}\"\niface = \"eth0\"\nguard = [\"20000-30000\"]\n");
    let dir = DeployDir::new("swarm-stack.yml", "natfix-swarm.toml", &config);
    let stack = format!("natfixtest{}", std::process::id());
    let out = run(&["docker"], &["stack", "deploy", "-c", dir.file("swarm-stack.yml").to_str().unwrap(), &stack]);
    assert!(out.status.success(), "stack deploy: {}", String::from_utf8_lossy(&out.stderr));
    let logs = || String::from_utf8_lossy(&run(&["docker"], &["service", "logs", &format!("{stack}_natfix")]).stdout).into_owned();

    let rec = wait_state(INGRESS, "eth0", "pinned", logs);
    assert!(rec["pid"].is_null(), "pinned: no pid from the task's own pid namespace: {rec}");
    let text = scrape_attached(INGRESS, "eth0");
    promtool_check(&text);
    // Swarm's published port is exempt in ingress, from Docker's service list.
    let end = Instant::now() + Duration::from_secs(20);
    while !record(INGRESS, "eth0").is_some_and(|r| r["guard"]["published"].as_array().is_some_and(|p| p.iter().any(|x| x == 25700))) {
        assert!(Instant::now() < end, "25700 not exempt: {:?}\n{}", record(INGRESS, "eth0"), logs());
        std::thread::sleep(Duration::from_millis(200));
    }

    // stack rm: pin = true, so the protection stays, as the stack's file says.
    let out = run(&["docker"], &["stack", "rm", &stack]);
    assert!(out.status.success(), "stack rm: {}", String::from_utf8_lossy(&out.stderr));
    let end = Instant::now() + Duration::from_mins(1);
    while !docker(&["ps", "-q", "--filter", &format!("label=com.docker.stack.namespace={stack}")]).unwrap().trim().is_empty() {
        assert!(Instant::now() < end, "the stack's task did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(record(INGRESS, "eth0").map(|r| r["state"].clone()), Some(Value::from("pinned")), "pinned: protection outlives the agent");
    let out = natfix(&["detach", "--netns", INGRESS, "--iface", "eth0"]);
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(record(INGRESS, "eth0").is_none(), "nothing left after detach");
    drop(swarm);
}
