//! `natfix trace` end to end, in namespaces: a Docker bridge host (Docker's
//! rules from a fixture), seed 000 (the stolen port, then natfix's guard),
//! drops by a rule and by `rp_filter`, bad input, concurrency and cleanup.
//! Each test asserts steps of the `--json` output, in order.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::UdpSocket,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use natfix::lab::{
    scratch::{ScratchNs, bind_udp, veth},
    topology::{GuardTopology, HOST_EXT_IF, REMOTE_IP},
};
use natfix_testkit::{Daemon, docker, natfix_bin, root_setup, scratch_ns};
use serde_json::Value;

/// A running `natfix trace`.
struct Trace {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

/// What a finished trace said.
struct Traced {
    code: Option<i32>,
    steps: Vec<Value>,
    stdout: String,
    stderr: String,
}

impl Trace {
    /// Starts `natfix trace ARGS` and waits until it is tracing.
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(natfix_bin())
            .arg("trace")
            .args(args)
            .env("NATFIX_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run natfix trace");
        let (ready_tx, ready) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err, pipe) = (stderr.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains("tracing `") {
                    let _ = ready_tx.send(());
                }
                let mut e = err.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        let (out_tx, stdout) = mpsc::channel();
        let mut pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            let _ = out_tx.send(s);
        });
        let mut t = Self { child, stdout, stderr };
        if ready.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = t.child.kill();
            panic!("natfix trace did not start: {}", t.stderr.lock().unwrap());
        }
        t
    }

    /// The program ids it logged.
    fn prog_ids(&self) -> Vec<u32> {
        let err = self.stderr.lock().unwrap();
        let line = err.lines().find_map(|l| l.split_once("(ids: ")).map_or("", |(_, ids)| ids).to_owned();
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect()
    }

    /// Waits for it to end on its own.
    fn finish(mut self) -> Traced {
        let end = Instant::now() + Duration::from_mins(1);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "natfix trace did not end: {}", self.stderr.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = self.stdout.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        let steps = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let stderr = self.stderr.lock().unwrap().clone();
        Traced { code: status.code(), steps, stdout, stderr }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()), sig).unwrap();
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nothing of trace `pid` is left: no marking table in `namespaces`, none of its programs loaded.
fn assert_nothing_left(pid: u32, prog_ids: &[u32], namespaces: &[&ScratchNs]) {
    let table = format!("natfix_trace_{pid}");
    for ns in namespaces {
        let tables = ns.exec(&["nft", "list", "tables"]).unwrap();
        assert!(!tables.contains(&table), "{table} left in {}: {tables}", ns.name);
    }
    // The kernel frees a program after its last reference goes, deferred
    // (RCU, a work item): give it a moment before calling it left.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let loaded: Vec<u32> = aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
        let left: Vec<&u32> = prog_ids.iter().filter(|id| loaded.contains(id)).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "programs {left:?} of trace {pid} are still loaded 5 s after it exited");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Index of the first step at or after `from` satisfying `pred`, or a failure listing the steps.
fn find(steps: &[Value], from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> usize {
    steps.iter().enumerate().skip(from).find(|(_, s)| pred(s)).map_or_else(|| {
        let listed: Vec<String> = steps.iter().map(|s| format!("{} {}.{} [{}] {}", s["direction"], s["packet"], s["step"], s["netns"], s["text"])).collect();
        panic!("no step after #{from}: {what}\n{}", listed.join("\n"))
    }, |(i, _)| i)
}

fn text(s: &Value) -> &str {
    s["text"].as_str().unwrap_or("")
}

/// Runs `f` in `ns` on its own thread (e.g. a server), returning at once.
fn spawn_in<T: Send + 'static>(ns: &ScratchNs, f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let netns = ns.netns().unwrap();
    std::thread::spawn(move || netns.run(f))
}

/// A UDP echo server on `addr` for `secs`.
fn echo(ns: &ScratchNs, addr: &'static str, secs: u64) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let h = spawn_in(ns, move || {
        let s = bind_udp(addr.parse()?)?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let end = Instant::now() + Duration::from_secs(secs);
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                s.send_to(&buf[..n], from)?;
            }
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    h
}

/// Sends one datagram per request from `from` to `to`, waiting for each answer; returns the answers' sources.
fn ask(ns: &ScratchNs, from: &'static str, to: &'static str, requests: u32) -> Vec<std::net::SocketAddr> {
    spawn_in(ns, move || {
        let s: UdpSocket = bind_udp(from.parse()?)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..requests {
            s.send_to(b"hello", to)?;
            if let Ok((_, src)) = s.recv_from(&mut buf) {
                got.push(src);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(got)
    })
    .join()
    .unwrap()
    .unwrap()
}

/// The seed topology: external --[x0|ext0]-- host (Docker's rules) --br-nfx--[vethc|eth0]-- container.
struct DockerBridge {
    ext: ScratchNs,
    host: ScratchNs,
    ctr: ScratchNs,
}

fn docker_bridge() -> DockerBridge {
    let t = DockerBridge { ext: scratch_ns("trx"), host: scratch_ns("trh"), ctr: scratch_ns("trc") };
    veth(&t.ext, "x0", "198.51.100.20/24", &t.host, "ext0", "198.51.100.10/24").unwrap();
    t.host.exec(&["ip", "link", "add", "br-nfx", "type", "bridge"]).unwrap();
    t.host.exec(&["ip", "addr", "add", "172.20.0.1/16", "dev", "br-nfx"]).unwrap();
    t.host.exec(&["ip", "link", "set", "br-nfx", "up"]).unwrap();
    veth(&t.ctr, "eth0", "172.20.0.4/16", &t.host, "vethc", "169.254.99.1/32").unwrap();
    t.host.exec(&["ip", "addr", "flush", "dev", "vethc"]).unwrap();
    t.host.exec(&["ip", "link", "set", "vethc", "master", "br-nfx"]).unwrap();
    t.ctr.exec(&["ip", "route", "add", "default", "via", "172.20.0.1"]).unwrap();
    t.host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/docker-bridge.iptables")).unwrap();
    let mut restore = Command::new("ip")
        .args(["netns", "exec", &t.host.name, "iptables-nft-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut restore.stdin.take().unwrap(), rules.as_bytes()).unwrap();
    assert!(restore.wait().unwrap().success(), "iptables-nft-restore of Docker's rules");
    t
}

#[test]
#[ignore = "needs root: cargo xtask test"]
#[expect(clippy::many_single_char_names, clippy::similar_names, reason = "x, h, c: the three namespaces, named as in the fixture's diagram")]
fn a_request_to_a_published_port_and_its_reply_through_dockers_rules() {
    root_setup();
    let t = docker_bridge();
    let server = echo(&t.ctr, "0.0.0.0:1812", 8);
    let (x, h, c) = (t.ext.name.clone(), t.host.name.clone(), t.ctr.name.clone());
    let trace = Trace::start(&["--netns", &x, "--netns", &h, "--netns", &c, "--count", "2", "--timeout", "20", "--json", "udp", "and", "port", "1812"]);
    let (pid, ids) = (trace.child.id(), trace.prog_ids());
    assert_eq!(ids.len(), 3, "three tracepoint programs: {}", trace.stderr.lock().unwrap());
    let answers = ask(&t.ext, "198.51.100.20:40000", "198.51.100.10:1812", 2);
    assert_eq!(answers.len(), 2, "the container answered both requests");
    let out = trace.finish();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let s = &out.steps;
    let is = |s: &Value, ns: &str, kind: &str| s["netns"] == ns && s["kind"] == kind;

    // The request: Docker's DNAT, the forward accept, delivery in the container.
    let dnat = find(s, 0, "the DNAT rule in nat/DOCKER", |s| {
        is(s, &h, "rule") && s["table"] == "nat" && s["chain"] == "DOCKER" && s["hook"] == "prerouting" && text(s).contains("-j DNAT --to-destination 172.20.0.4:1812") && s["verdict"] == "accept"
    });
    assert!(text(&s[dnat]).contains("iptables-nft"), "rules iptables-nft wrote say so: {}", text(&s[dnat]));
    assert_eq!(s[dnat]["rule"], "iifname != \"br-nfx\" udp dport 1812 counter dnat to 172.20.0.4:1812", "nft's text too");
    let route = find(s, dnat, "routing: forward to the bridge", |s| is(s, &h, "route") && text(s) == "routing: forward, out via br-nfx");
    let user = find(s, route, "FORWARD jumps to DOCKER-USER", |s| is(s, &h, "rule") && s["chain"] == "FORWARD" && s["verdict"] == "jump DOCKER-USER");
    let iso = find(s, user, "then to DOCKER-ISOLATION-STAGE-1", |s| s["chain"] == "FORWARD" && s["verdict"] == "jump DOCKER-ISOLATION-STAGE-1");
    let accept = find(s, iso, "filter/DOCKER accepts", |s| is(s, &h, "rule") && s["table"] == "filter" && s["chain"] == "DOCKER" && s["hook"] == "forward" && s["verdict"] == "accept");
    let ct = find(s, accept, "conntrack's new entry with the DNAT", |s| {
        is(s, &h, "conntrack") && s["ct"]["nat"] == "destination 198.51.100.10:1812 -> 172.20.0.4:1812 (DNAT)" && s["ct"]["reply"]["src"] == "172.20.0.4:1812"
    });
    let out_br = find(s, ct, "sent out of the bridge port", |s| is(s, &h, "xmit") && s["dev"] == "vethc");
    let arrive = find(s, out_br, "arrival in the container", |s| is(s, &c, "arrive") && s["dev"] == "eth0");
    let delivered = find(s, arrive, "delivery to the container's socket", |s| {
        is(s, &c, "deliver") && s["tuple"]["dst"] == "172.20.0.4:1812" && s["direction"] == "request"
    });
    assert!(s[..=delivered].iter().all(|s| s["packet"] == 1), "one packet so far");

    // The reply: conntrack reverses the DNAT, FORWARD accepts, the client gets the original addresses.
    let sent = find(s, delivered, "the container answers", |s| is(s, &c, "send") && s["direction"] == "reply" && s["packet"] == 2);
    let fwd = find(s, sent, "the reply's forward accept", |s| is(s, &h, "rule") && s["hook"] == "forward" && s["verdict"] == "accept");
    let denat = find(s, sent, "conntrack's de-NAT of the reply", |s| is(s, &h, "denat") && text(s).contains("source 172.20.0.4:1812 -> 198.51.100.10:1812") && text(s).contains("no nat chain"));
    assert!(!s[sent..denat].iter().any(|s| s["table"] == "nat"), "no nat chain runs for the reply");
    let back = find(s, fwd.max(denat), "the reply leaves towards the client", |s| is(s, &h, "xmit") && s["dev"] == "ext0" && s["tuple"]["src"] == "198.51.100.10:1812");
    find(s, back, "delivery to the client with the original addresses", |s| {
        is(s, &x, "deliver") && s["tuple"]["src"] == "198.51.100.10:1812" && s["tuple"]["dst"] == "198.51.100.20:40000" && s["packet"] == 2
    });
    // The second request rides the established flow.
    let second = find(s, back, "the second request", |s| s["packet"] == 3 && s["direction"] == "request");
    find(s, second, "forward accept by ct state established", |s| {
        is(s, &h, "rule") && s["hook"] == "forward" && text(s).contains("--ctstate RELATED,ESTABLISHED -j ACCEPT") && s["verdict"] == "accept"
    });
    assert!(!out.stdout.contains("natfix_trace_"), "natfix's own marking chains stay hidden");
    server.join().unwrap().unwrap();
    assert_nothing_left(pid, &ids, &[&t.ext, &t.host, &t.ctr]);
}

fn guard_world(tag: &str) -> GuardTopology {
    GuardTopology::build(&format!("nft-tg{tag}{}", std::process::id() % 100_000)).expect("seed 000 topology")
}

/// Traces seed 000's sequence (the remote's probe of host:25000, the
/// container's punch from :25000, the remote's answer) in all three namespaces.
fn trace_seed000(t: &GuardTopology) -> (Traced, u32, Vec<u32>) {
    let (c, h, r) = (t.container.name.clone(), t.host.name.clone(), t.remote.name.clone());
    let trace = Trace::start(&["--netns", &c, "--netns", &h, "--netns", &r, "--count", "2", "--timeout", "20", "--json", "udp", "and", "host", REMOTE_IP]);
    let (pid, ids) = (trace.child.id(), trace.prog_ids());
    natfix::lab::guard_sequence(t).unwrap();
    (trace.finish(), pid, ids)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn seed_000_the_probe_takes_the_port_and_natfixs_guard_gives_it_back() {
    root_setup();
    let t = guard_world("a");
    let h = t.host.name.clone();
    let (out, pid, ids) = trace_seed000(&t);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let s = &out.steps;
    // The probe creates an entry on the host and dies there (nobody listens on 25000).
    let probe = find(s, 0, "the probe's conntrack entry", |s| {
        s["netns"] == h && s["kind"] == "conntrack" && s["ct"]["orig"]["dst"] == "198.51.100.10:25000" && s["packet"] == 1
    });
    find(s, probe, "the probe dropped for want of a socket", |s| s["kind"] == "drop" && s["reason"] == "NO_SOCKET" && s["packet"] == 1);
    // The punch: masquerade picks another port, because of the probe's entry.
    let punch = find(s, probe, "masquerade moved the punch's port", |s| {
        s["netns"] == h && s["kind"] == "conntrack" && s["ct"]["orig"]["src"] == "10.77.0.2:25000" && s["ct"]["reply"]["dst"] != "198.51.100.10:25000"
    });
    let why = &s[punch];
    assert!(text(why).contains("port 25000 was taken"), "{}", text(why));
    assert_eq!(why["ct"]["port_holder"]["orig"]["src"], "198.51.100.20:7000", "the probe's entry holds it: {why}");
    assert_eq!(why["ct"]["port_holder"]["orig"]["dst"], "198.51.100.10:25000");
    let moved = why["ct"]["reply"]["dst"].as_str().unwrap().to_owned();
    find(s, punch, "the punch leaves on the other port", |s| s["kind"] == "xmit" && s["dev"] == HOST_EXT_IF && s["tuple"]["src"] == moved.as_str());
    assert_nothing_left(pid, &ids, &[&t.container, &t.host, &t.remote]);
    // diagnose names the trace that shows this.
    let diag = Command::new(natfix_bin()).args(["diagnose", "--netns", &h, "--json", "--sample", "1"]).env("NATFIX_LOG", "warn").output().unwrap();
    let report: Value = serde_json::from_slice(&diag.stdout).unwrap();
    let finding = report["findings"].as_array().unwrap().iter().find(|f| f["check"] == "guard.port-moved").unwrap();
    assert_eq!(finding["trace"], "natfix trace --count 2 'udp and host 198.51.100.20 and port 25000'", "{finding}");

    // natfix's guard: the probe is dropped in XDP, the punch keeps 25000.
    t.host.exec(&["conntrack", "-F"]).unwrap();
    let daemon = Daemon::start(&["--iface", HOST_EXT_IF, "--netns", &h, "--guard", "20000-30000"]).expect("natfix attach");
    let (out, pid, ids) = trace_seed000(&t);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let s = &out.steps;
    let dropped = find(s, 0, "natfix's drop of the probe", |s| {
        s["kind"] == "natfix" && s["program"] == "guard" && s["reason"] == "dropped_unsolicited" && s["tuple"]["dst"] == "198.51.100.10:25000"
    });
    assert!(text(&s[dropped]).contains("natfix guard (xdp) on ext: dropped"), "{}", text(&s[dropped]));
    let kept = find(s, dropped, "the punch keeps its port", |s| {
        s["kind"] == "conntrack" && s["ct"]["orig"]["src"] == "10.77.0.2:25000" && s["ct"]["reply"]["dst"] == "198.51.100.10:25000"
    });
    assert!(s[kept]["ct"].get("port_holder").is_none(), "nothing held 25000");
    let left = find(s, kept, "the punch leaves on 25000", |s| s["kind"] == "xmit" && s["dev"] == HOST_EXT_IF && s["tuple"]["src"] == "198.51.100.10:25000");
    find(s, left, "the guard passes the answer", |s| s["kind"] == "natfix" && text(s).contains("passed, solicited"));
    drop(daemon);
    assert_nothing_left(pid, &ids, &[&t.container, &t.host, &t.remote]);
}

/// Two namespaces on a veth: a (10.88.0.1, da0) and b (10.88.0.2, db0).
fn pair(tag: &str) -> (ScratchNs, ScratchNs) {
    let (a, b) = (scratch_ns(&format!("{tag}a")), scratch_ns(&format!("{tag}b")));
    veth(&a, "da0", "10.88.0.1/24", &b, "db0", "10.88.0.2/24").unwrap();
    (a, b)
}

fn send_one(ns: &ScratchNs, from: &'static str, to: &'static str) {
    spawn_in(ns, move || Ok(bind_udp(from.parse()?)?.send_to(b"x", to)?)).join().unwrap().unwrap();
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_drop_rule_and_rp_filter_show_the_rule_and_the_reason() {
    root_setup();
    let (a, b) = pair("trd");
    b.nft("table inet trdrop {\n chain in {\n  type filter hook input priority 0;\n  udp dport 5555 counter drop\n }\n}\n").unwrap();
    let trace = Trace::start(&["--netns", &a.name, "--netns", &b.name, "--timeout", "20", "--json", "udp", "and", "port", "5555"]);
    send_one(&a, "10.88.0.1:41000", "10.88.0.2:5555");
    let out = trace.finish();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let s = &out.steps;
    let rule = find(s, 0, "the drop rule", |s| {
        s["netns"] == b.name.as_str() && s["kind"] == "rule" && s["table"] == "trdrop" && s["chain"] == "in" && s["hook"] == "input" && s["verdict"] == "drop"
    });
    assert_eq!(s[rule]["rule"], "udp dport 5555 counter drop");
    let dropped = find(s, rule, "the kernel's drop", |s| s["kind"] == "drop" && s["reason"] == "NETFILTER_DROP");
    assert!(s[dropped]["location"].as_str().unwrap().starts_with("nft_do_chain"), "{}", s[dropped]);

    // rp_filter: a source b has no route back to through db0.
    for key in ["net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.db0.rp_filter=1"] {
        b.exec(&["sysctl", "-qw", key]).unwrap();
    }
    a.exec(&["ip", "addr", "add", "10.99.9.9/32", "dev", "lo"]).unwrap();
    let trace = Trace::start(&["--netns", &a.name, "--netns", &b.name, "--timeout", "20", "--json", "udp", "and", "dst", "port", "5556"]);
    send_one(&a, "10.99.9.9:41001", "10.88.0.2:5556");
    let out = trace.finish();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let arrived = find(&out.steps, 0, "arrival in b", |s| s["netns"] == b.name.as_str() && s["kind"] == "arrive" && s["dev"] == "db0");
    find(&out.steps, arrived, "the rp_filter drop", |s| s["kind"] == "drop" && s["reason"] == "IP_RPFILTER" && s["tuple"]["src"] == "10.99.9.9:41001");
}

/// Runs `natfix ARGS`, checks exit code and message.
fn refused(args: &[&str], code: i32, says: &str) {
    let out = Command::new(natfix_bin()).args(args).env("NATFIX_LOG", "warn").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(says), "{args:?} should say {says:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    // clap adds its usage hint to usage errors; natfix's own errors are one line.
    assert!(code == 2 || err.trim().lines().count() == 1, "{args:?}: one line: {err}");
}

fn no_marking_table(ns: &ScratchNs) {
    let tables = ns.exec(&["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("natfix_trace_"), "left in {}: {tables}", ns.name);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn bad_input_gets_a_clear_error_and_leaves_nothing() {
    root_setup();
    let ns = scratch_ns("trbad");
    let n = ns.name.as_str();
    refused(&["trace", "--netns", n, "udp", "or", "tcp"], 2, "`or` is not supported");
    refused(&["trace", "--netns", n, "port", "99999"], 2, "not a port");
    refused(&["trace", "--netns", n, "--count", "0", "udp"], 2, "--count");
    refused(&["trace", "--netns", n], 2, "FILTER");
    refused(&["trace", "--netns", "no-such-ns-trace", "udp"], 3, "not found");
    refused(&["trace", "--netns", n, "--iface", "nope0", "udp"], 3, "no traced namespace has an interface `nope0`");
    refused(&["trace", "--netns", n, "--timeout", "1", "udp", "and", "port", "9"], 3, "no packet matched `udp and port 9` within 1 s");
    no_marking_table(&ns);
    // A kernel without BTF (here: its file hidden in a mount namespace) cannot run tp_btf programs.
    let bin = natfix_bin().display().to_string();
    let script = format!("mount --bind /dev/null /sys/kernel/btf/vmlinux && exec {bin} trace --netns {n} --timeout 2 udp");
    let out = Command::new("unshare").args(["-m", "sh", "-c", &script]).env("NATFIX_LOG", "warn").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "no BTF: {err}");
    assert!(err.contains("BTF") && err.contains("CONFIG_DEBUG_INFO_BTF"), "names the feature: {err}");
    no_marking_table(&ns);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn two_traces_at_once_each_see_their_own_packets() {
    root_setup();
    let (a, b) = pair("trtwo");
    let one = Trace::start(&["--netns", &a.name, "--netns", &b.name, "--timeout", "20", "--json", "udp", "and", "port", "5601"]);
    let two = Trace::start(&["--netns", &a.name, "--netns", &b.name, "--timeout", "20", "--json", "udp", "and", "port", "5602"]);
    send_one(&a, "10.88.0.1:41601", "10.88.0.2:5601");
    send_one(&a, "10.88.0.1:41602", "10.88.0.2:5602");
    for (trace, port) in [(one, "5601"), (two, "5602")] {
        let (pid, ids) = (trace.child.id(), trace.prog_ids());
        let out = trace.finish();
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let dst = format!("10.88.0.2:{port}");
        find(&out.steps, 0, "its packet's drop (no socket)", |s| s["kind"] == "drop" && s["reason"] == "NO_SOCKET" && s["tuple"]["dst"] == dst.as_str());
        assert!(out.steps.iter().all(|s| s["tuple"].is_null() || s["tuple"]["dst"] == dst.as_str() || s["tuple"]["src"] == dst.as_str()), "only its own packet: {}", out.stdout);
        assert_nothing_left(pid, &ids, &[&a, &b]);
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn sigterm_and_sigkill_leave_nothing_installed() {
    root_setup();
    let (a, b) = pair("trsig");
    let trace = Trace::start(&["--netns", &a.name, "--netns", &b.name, "--timeout", "30", "udp", "and", "port", "5700"]);
    let (pid, ids) = (trace.child.id(), trace.prog_ids());
    assert!(b.exec(&["nft", "list", "tables"]).unwrap().contains(&format!("natfix_trace_{pid}")), "the marking table is there while tracing");
    trace.signal(nix::sys::signal::Signal::SIGTERM);
    let out = trace.finish();
    assert_eq!(out.code, Some(3), "SIGTERM before any packet: nothing matched: {}", out.stderr);
    assert!(out.stderr.contains("no packet matched"), "{}", out.stderr);
    assert_nothing_left(pid, &ids, &[&a, &b]);

    // Killed outright: the kernel removes the owner table when its nft goes, and the programs with the last fd.
    let trace = Trace::start(&["--netns", &a.name, "--netns", &b.name, "--timeout", "30", "udp", "and", "port", "5700"]);
    let (pid, ids) = (trace.child.id(), trace.prog_ids());
    trace.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = trace.finish();
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && b.exec(&["nft", "list", "tables"]).unwrap().contains("natfix_trace_") {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_nothing_left(pid, &ids, &[&a, &b]);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn with_a_real_docker_engine_the_trace_names_dockers_chains() {
    root_setup();
    if let Some(why) = docker::unavailable() {
        return natfix_testkit::skip(&why);
    }
    let _turn = docker::exclusive();
    let image = docker::ensure_busybox().unwrap();
    let container = docker::Container::run(&["-p", "1812:1812/udp", image, "sleep", "120"]).unwrap();
    let inspect = |format: &str| docker::docker(&["inspect", "-f", format, &container.id]).unwrap().trim().to_owned();
    let (sandbox, ip) = (inspect("{{.NetworkSettings.SandboxKey}}"), inspect("{{.NetworkSettings.IPAddress}}"));
    // An external peer: a namespace on a veth to this (Docker's) namespace, on a /30 of its own.
    let ext = scratch_ns("trdk");
    let host_if = format!("nfxdk{}", std::process::id() % 100_000);
    natfix::lab::scratch::run(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", "dk0", "netns", &ext.name]).unwrap();
    let _cleanup = DeleteLink(host_if.clone());
    natfix::lab::scratch::run(&["ip", "addr", "add", "10.254.77.1/30", "dev", &host_if]).unwrap();
    natfix::lab::scratch::run(&["ip", "link", "set", &host_if, "up"]).unwrap();
    ext.exec(&["ip", "addr", "add", "10.254.77.2/30", "dev", "dk0"]).unwrap();
    ext.exec(&["ip", "link", "set", "dk0", "up"]).unwrap();

    let trace = Trace::start(&["--netns", "self", "--netns", &sandbox, "--netns", &ext.name, "--timeout", "20", "--json", "udp", "and", "port", "1812"]);
    send_one(&ext, "10.254.77.2:41812", "10.254.77.1:1812");
    let out = trace.finish();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let s = &out.steps;
    let dnat = find(s, 0, "Docker's DNAT in nat/DOCKER", |s| {
        s["kind"] == "rule" && s["table"] == "nat" && s["chain"] == "DOCKER" && text(s).contains(&format!("{ip}:1812")) && s["verdict"] == "accept"
    });
    let user = find(s, dnat, "FORWARD -> DOCKER-USER", |s| s["chain"] == "FORWARD" && s["verdict"] == "jump DOCKER-USER");
    let iso = find(s, user, "-> DOCKER-ISOLATION-STAGE-1", |s| s["chain"] == "FORWARD" && s["verdict"] == "jump DOCKER-ISOLATION-STAGE-1");
    let accept = find(s, iso, "filter/DOCKER accepts", |s| s["table"] == "filter" && s["chain"] == "DOCKER" && s["verdict"] == "accept");
    find(s, accept, "into the container's namespace", |s| s["netns"] == sandbox.as_str() && s["tuple"]["dst"] == format!("{ip}:1812").as_str());
}

/// Deletes a link of natfix's own namespace on drop.
struct DeleteLink(String);

impl Drop for DeleteLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_directional_filter_still_follows_the_reply() {
    root_setup();
    let (a, b) = pair("trdir");
    let server = echo(&b, "10.88.0.2:5800", 6);
    let trace = Trace::start(&["--netns", &a.name, "--netns", &b.name, "--timeout", "20", "--json", "udp", "and", "dst", "port", "5800"]);
    assert_eq!(ask(&a, "10.88.0.1:41800", "10.88.0.2:5800", 1).len(), 1);
    let out = trace.finish();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let s = &out.steps;
    let req = find(s, 0, "the request delivered in b", |s| s["netns"] == b.name.as_str() && s["kind"] == "deliver" && s["direction"] == "request");
    let sent = find(s, req, "b answers", |s| s["netns"] == b.name.as_str() && s["kind"] == "send" && s["direction"] == "reply");
    find(s, sent, "the answer delivered in a", |s| s["netns"] == a.name.as_str() && s["kind"] == "deliver" && s["tuple"]["src"] == "10.88.0.2:5800");
    server.join().unwrap().unwrap();
}
