//! What `natfix trace` costs other traffic: 64-byte UDP datagrams into a
//! veth at the full rate of one core, read by an application, with a
//! `natfix trace` running in the receiver's namespace whose filter matches
//! none of them, against no trace; each trace window between two baseline
//! windows (flanked, as the flood bench's solicited-UDP rows). On a Docker
//! node's netfilter (hooks and conntrack on already: where natfix runs) and
//! on a bare receiver (the trace's table turns the prerouting and output
//! hooks on). Then the tracepoint programs' own time per run on that
//! traffic (kernel `bpf_stats`), and the overhead per traced packet (a filter
//! matching the traffic, against none).
//!
//! Where the marking table's cost comes from, as rows of their own: an empty
//! chain at its hook and priority (the hook), its rules with `counter` in
//! place of `meta nftrace set 1` (the rules), and one never-matching rule
//! with `meta nftrace set 1` (the kernel's trace switch: any such rule turns
//! on nftables tracing's checks in every chain of the host).
//!
//! The generator is `BPF_PROG_TEST_RUN` in XDP live-frames mode on CPU 0 (the
//! receive softirq runs there too, so its time covers the path up to the
//! socket); the receiving veth carries the rig's counting XDP program (veth
//! needs one to take XDP-transmitted frames), which counts what arrived.
//! `NATFIX_TRACE_ROUNDS` (default 20) and `NATFIX_TRACE_WINDOW` (frames,
//! default 1,000,000) size it; `NATFIX_BIN` picks the natfix binary.

#![expect(clippy::cast_precision_loss, reason = "packet counts and nanoseconds of a bench run, far below 2^52")]

mod common;

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use common::TrafficWindow;
use natfix::lab::scratch::{ScratchNs, bind_udp, sock, veth};
use natfix_ebpf::rig;
use natfix_testkit::{harness::pin_to_cpu, packet};

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The natfix binary: `$NATFIX_BIN`, else the workspace's release build, else its debug build.
fn natfix_bin() -> String {
    if let Ok(p) = std::env::var("NATFIX_BIN") {
        return p;
    }
    let release = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/natfix");
    if std::path::Path::new(release).exists() { release.into() } else { natfix_testkit::natfix_bin().display().to_string() }
}

struct Rig {
    gen_ns: ScratchNs,
    rx_ns: ScratchNs,
    frame: Vec<u8>,
    gen_ifindex: u32,
}

fn rig(tag: &str) -> Rig {
    let gen_ns = ScratchNs::create(&format!("nfb-tgen-{tag}")).unwrap();
    let rx_ns = ScratchNs::create(&format!("nfb-trx-{tag}")).unwrap();
    veth(&gen_ns, "fg0", "198.51.100.20/24", &rx_ns, "fr0", "198.51.100.10/24").unwrap();
    let mac_of = |ns: &ScratchNs, dev: &str| -> (Vec<u8>, u32) {
        let v: serde_json::Value = serde_json::from_str(&ns.exec(&["ip", "-j", "link", "show", dev]).unwrap()).unwrap();
        let mac = v[0]["address"].as_str().unwrap().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
        (mac, u32::try_from(v[0]["ifindex"].as_u64().unwrap()).unwrap())
    };
    let (mac, _) = mac_of(&rx_ns, "fr0");
    let (_, gen_ifindex) = mac_of(&gen_ns, "fg0");
    let mut frame = packet::udp4(Ipv4Addr::new(198, 51, 100, 20), 7000, Ipv4Addr::new(198, 51, 100, 10), 25000, &[0u8; 18]);
    packet::set_dst_mac(&mut frame, mac.try_into().unwrap());
    Rig { gen_ns, rx_ns, frame, gen_ifindex }
}

/// A generator thread in the generator's namespace on CPU 0: each request
/// sends that many frames and answers with the seconds they took.
struct Generator {
    requests: std::sync::mpsc::Sender<u32>,
    seconds: std::sync::mpsc::Receiver<f64>,
}

impl Generator {
    fn start(rig: &Rig) -> Self {
        let (requests, jobs) = std::sync::mpsc::channel::<u32>();
        let (answer, seconds) = std::sync::mpsc::channel();
        let (frame, ifindex, netns) = (rig.frame.clone(), rig.gen_ifindex, rig.gen_ns.netns().unwrap());
        std::thread::spawn(move || {
            netns.run(move || {
                pin_to_cpu(0)?;
                let mut ebpf = aya::Ebpf::load(rig::OBJECT)?;
                let p: &mut Xdp = ebpf.program_mut(rig::GEN_XDP).unwrap().try_into()?;
                p.load()?;
                let md = common::xdp_md(frame.len(), ifindex);
                let ctx = &md[..];
                for n in jobs {
                    let t = Instant::now();
                    let opts = TestRunOptions { data_in: Some(&frame), ctx_in: Some(ctx), repeat: n, attrs: TestRunAttrs::new().xdp_live_frames(64), ..TestRunOptions::default() };
                    p.test_run(opts)?;
                    if answer.send(t.elapsed().as_secs_f64()).is_err() {
                        break;
                    }
                }
                Ok(())
            })
        });
        Self { requests, seconds }
    }

    fn seconds_for(&self, n: u32) -> f64 {
        self.requests.send(n).unwrap();
        self.seconds.recv().expect("generator thread failed")
    }
}

/// A running `natfix trace` (its own process, as users run it).
struct TraceRun(Child);

impl TraceRun {
    fn start(netns: &str, filter: &str) -> Self {
        let mut child = Command::new(natfix_bin())
            .args(["trace", "--netns", netns, "--timeout", "3600", "--count", "1000000000"])
            .args(filter.split_whitespace())
            .env("NATFIX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("natfix trace");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut ids = String::new();
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some((_, i)) = line.split_once("(ids: ") {
                i.clone_into(&mut ids);
            }
            if line.contains("tracing `") {
                break;
            }
        }
        assert!(!ids.is_empty(), "natfix trace did not start");
        std::thread::spawn(move || for _ in lines {});
        Self(child)
    }

}

impl Drop for TraceRun {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap()), nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// The receiver: the counting XDP program on fr0 and an application reading on CPU 1.
struct Receiver {
    _ebpf: aya::Ebpf,
    passes: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    done: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Self {
        let mut ebpf = aya::Ebpf::load(rig::OBJECT).unwrap();
        let p: &mut Xdp = ebpf.program_mut(rig::COUNT_PASS_XDP).unwrap().try_into().unwrap();
        p.load().unwrap();
        p.attach("fr0", XdpMode::Driver).unwrap();
        let passes = aya::maps::PerCpuArray::try_from(ebpf.take_map("natfix_bench_passes").unwrap()).unwrap();
        let socket = bind_udp(sock("198.51.100.10", 25000)).unwrap();
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20)).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let reader = std::thread::spawn(move || {
            pin_to_cpu(1).unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Acquire) {
                let _ = socket.recv(&mut buf);
            }
        });
        Self { _ebpf: ebpf, passes, done, reader: Some(reader) }
    }

    fn passed(&self) -> u64 {
        self.passes.get(&0, 0).unwrap().iter().sum()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// What a window runs with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Window {
    Baseline,
    /// `natfix trace` as users run it (its filter matching nothing).
    Trace,
    /// Its tracepoint programs alone (loaded by the bench through the library).
    Probes,
    /// Its marking table alone.
    Marks,
    /// Empty programs on the same three tracepoints: what a program there costs at all.
    EmptyTp,
    /// An empty chain at the marking table's hook and priority.
    NftHook,
    /// The marking table's rules, `counter` in place of `meta nftrace set 1`.
    NftRulesNoTrace,
    /// One never-matching rule with `meta nftrace set 1`: the trace switch alone.
    NftTraceSwitch,
}

const SUBJECTS: [Window; 7] =
    [Window::Trace, Window::Probes, Window::Marks, Window::EmptyTp, Window::NftHook, Window::NftRulesNoTrace, Window::NftTraceSwitch];

/// What a window attached; dropping it detaches.
#[expect(dead_code, reason = "held for their drop, which detaches")]
#[expect(clippy::large_enum_variant, reason = "one per window, held, never moved in a loop")]
enum Attached {
    None,
    Trace(TraceRun),
    Probes(natfix::trace::drops::Probes),
    Marks(natfix::trace::marking::MarkTable),
    EmptyTp(aya::Ebpf),
    Nft(VariantTable),
}

/// A variant of the marking table (`nft -f`), deleted on drop.
struct VariantTable;

const VARIANT_TABLE: &str = "natfix_bench_variant";

impl VariantTable {
    fn install(w: Window, plan: &natfix::trace::marking::MarkPlan) -> Self {
        let t = format!("inet {VARIANT_TABLE}");
        let hook = format!("add table {t}\nadd chain {t} pre {{ type filter hook prerouting priority {}; }}\n", plan.priority());
        let script = match w {
            Window::NftHook => hook,
            // Never matches: the rule's presence is what is measured.
            Window::NftTraceSwitch => format!("{hook}add rule {t} pre meta mark 0x4e465854 meta nftrace set 1\n"),
            _ => plan.script().replace(&format!("inet {}", plan.table), &t).replace(" { flags owner; }", "").replace("meta nftrace set 1", "counter"),
        };
        let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft refused the variant table:\n{script}");
        Self
    }
}

impl Drop for VariantTable {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", VARIANT_TABLE]).status();
    }
}

fn empty_tp() -> aya::Ebpf {
    let btf = aya::Btf::from_sys_fs().unwrap();
    let mut ebpf = aya::Ebpf::load(rig::OBJECT).unwrap();
    for (name, tp) in rig::EMPTY_TP {
        let p: &mut aya::programs::BtfTracePoint = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load(tp, &btf).unwrap();
        p.attach().unwrap();
    }
    ebpf
}

/// Attaches window `w` (in the receiver's namespace: the marking table goes there).
fn enter(w: Window, rx: &str, filter: &natfix::trace::Filter, with_ct: bool) -> Attached {
    use natfix::trace::marking::{MarkPlan, MarkTable};
    match w {
        Window::Baseline => Attached::None,
        Window::Trace => Attached::Trace(TraceRun::start(rx, filter.text())),
        Window::Probes => Attached::Probes(natfix::trace::drops::Probes::attach(filter).unwrap()),
        Window::Marks => Attached::Marks(MarkTable::install(&MarkPlan::new(filter, None, with_ct)).unwrap()),
        Window::EmptyTp => Attached::EmptyTp(empty_tp()),
        Window::NftHook | Window::NftRulesNoTrace | Window::NftTraceSwitch => {
            Attached::Nft(VariantTable::install(w, &MarkPlan::new(filter, None, with_ct)))
        }
    }
}

/// B s1 B s2 ... B per round (subjects rotated each round), then a last B.
fn sequence(subjects: &[Window], rounds: usize) -> Vec<Window> {
    let mut seq = Vec::new();
    for round in 0..rounds {
        let mut order = subjects.to_vec();
        order.rotate_left(round % subjects.len());
        for w in order {
            seq.extend([Window::Baseline, w]);
        }
    }
    seq.push(Window::Baseline);
    seq
}

struct Measured {
    seq: Vec<(Window, TrafficWindow)>,
}

impl Measured {
    fn of(&self, w: Window) -> Vec<TrafficWindow> {
        self.seq.iter().filter(|(x, _)| *x == w).map(|(_, t)| *t).collect()
    }

    /// Each window of `w` against the mean rate of the baseline windows beside it.
    fn flanked(&self, w: Window) -> Vec<f64> {
        let rate = |t: &TrafficWindow| t.frames / t.secs;
        let s = &self.seq;
        (1..s.len().saturating_sub(1))
            .filter(|&i| s[i].0 == w && s[i - 1].0 == Window::Baseline && s[i + 1].0 == Window::Baseline)
            .map(|i| rate(&s[i].1) / f64::midpoint(rate(&s[i - 1].1), rate(&s[i + 1].1)))
            .collect()
    }
}

fn measure(rig: &Rig, generator: &Generator, receiver: &Receiver, filter: &str, subjects: &[Window], rounds: usize, window: u32) -> Measured {
    let filter = natfix::trace::Filter::parse(filter).unwrap();
    let with_ct = natfix::trace::ruleset::RuleSet::load().is_ok_and(|r| r.uses_conntrack);
    let mut seq = Vec::new();
    for w in sequence(subjects, rounds) {
        let attached = enter(w, &rig.rx_ns.name, &filter, with_ct);
        let before = receiver.passed();
        let secs = generator.seconds_for(window);
        seq.push((w, TrafficWindow { frames: (receiver.passed() - before) as f64, secs }));
        drop(attached);
    }
    Measured { seq }
}

/// ns per run of each program over one window of traffic (kernel `bpf_stats`): natfix trace's and the empty ones.
fn program_costs(generator: &Generator, filter: &str, window: u32, rounds: usize) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(STATS).unwrap();
    std::fs::write(STATS, "1").unwrap();
    let filter = natfix::trace::Filter::parse(filter).unwrap();
    let stats = |ids: &[(String, u32)]| -> Vec<(u64, u64)> {
        ids.iter()
            .map(|(_, id)| {
                let p = aya::programs::loaded_programs().filter_map(Result::ok).find(|p| p.id() == *id).unwrap();
                (u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX), p.run_count())
            })
            .collect()
    };
    let per_run = |a: &[(u64, u64)], b: &[(u64, u64)]| -> Vec<Option<f64>> {
        a.iter().zip(b).map(|((t0, n0), (t1, n1))| (n1 > n0).then(|| (t1 - t0) as f64 / (n1 - n0) as f64)).collect()
    };
    let mut out: Vec<(String, Vec<f64>, Vec<f64>)> = natfix_ebpf::trace::PROGRAMS.iter().map(|(_, tp)| ((*tp).to_owned(), Vec::new(), Vec::new())).collect();
    for _ in 0..rounds {
        let probes = natfix::trace::drops::Probes::attach(&filter).unwrap();
        let ids = probes.prog_ids.clone();
        let a = stats(&ids);
        generator.seconds_for(window);
        for (tp, cost) in ids.iter().zip(per_run(&a, &stats(&ids))) {
            if let (Some(c), Some(row)) = (cost, out.iter_mut().find(|r| r.0 == tp.0)) {
                row.1.push(c);
            }
        }
        drop(probes);
        let empty = empty_tp();
        let ids: Vec<(String, u32)> = rig::EMPTY_TP.iter().map(|(name, tp)| ((*tp).to_owned(), empty.program(name).unwrap().info().unwrap().id())).collect();
        let a = stats(&ids);
        generator.seconds_for(window);
        for (tp, cost) in ids.iter().zip(per_run(&a, &stats(&ids))) {
            if let (Some(c), Some(row)) = (cost, out.iter_mut().find(|r| r.0 == tp.0)) {
                row.2.push(c);
            }
        }
    }
    std::fs::write(STATS, before.trim()).unwrap();
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Host {
    DockerNode,
    Bare,
}

fn window_name(w: Window) -> &'static str {
    match w {
        Window::Trace => "natfix trace running (filter matching nothing) in the receiver's namespace",
        Window::Probes => "natfix trace's tracepoint programs alone",
        Window::Marks => "natfix trace's marking table alone",
        Window::EmptyTp => "empty programs on the same tracepoints",
        Window::NftHook => "an empty nftables chain at the marking table's hook and priority",
        Window::NftRulesNoTrace => "the marking table's rules with `counter` in place of `meta nftrace set 1`",
        Window::NftTraceSwitch => "one never-matching rule with `meta nftrace set 1` (the kernel's trace switch alone)",
        Window::Baseline => "no trace",
    }
}

fn run_host(host: Host, rounds: usize, window: u32) {
    let tag = if host == Host::DockerNode { "d" } else { "b" };
    let rig = rig(tag);
    if host == Host::DockerNode {
        rig.rx_ns.nft(include_str!("data/docker-node.nft")).unwrap();
    }
    let rx = rig.rx_ns.netns().unwrap();
    let generator = Generator::start(&rig);
    let rig = Arc::new(rig);
    let r = rig.clone();
    let (m, costs, traced) = rx
        .run(move || {
            let receiver = Receiver::start();
            generator.seconds_for(window); // warm-up: neighbour tables, caches
            let m = measure(&r, &generator, &receiver, "udp and port 9", &SUBJECTS, rounds, window);
            let costs = program_costs(&generator, "udp and port 9", window, rounds.min(5));
            // Traced packets: a filter matching every frame, in short windows (each marked packet costs trace messages).
            let small = (window / 20).max(10_000);
            let traced = measure(&r, &generator, &receiver, "udp and port 25000", &[Window::Trace], rounds.min(5), small);
            Ok((m, costs, traced))
        })
        .unwrap();
    let on = if host == Host::DockerNode { "a Docker node's netfilter" } else { "a bare receiver (no netfilter: the marking table turns the hooks on)" };
    for w in SUBJECTS {
        let name = format!("64-byte UDP read by an application on {on}: {}", window_name(w));
        common::report_flanked("trace", &name, "packets/s", &m.of(w), "no trace", &m.of(Window::Baseline), &m.flanked(w));
    }
    for (tp, ours, empty) in costs.into_iter().filter(|(_, o, e)| !o.is_empty() && !e.is_empty()) {
        let name = format!("natfix trace's program on {tp}, own time per run on the traffic above ({on}; bpf_stats)");
        common::report_paired("trace", &name, "ns/run", &ours, &format!("an empty program on {tp}"), &empty, false);
    }
    // What a traced packet costs beyond an untraced one: 1/rate difference.
    let base = m.of(Window::Baseline).iter().map(|w| w.frames / w.secs).collect::<Vec<f64>>();
    let (base_rate, _, _) = common::summary(&mut base.clone());
    let mut per_packet: Vec<f64> = traced.flanked(Window::Trace).iter().map(|r| (1.0 / r - 1.0) * 1e9 / base_rate).collect();
    let (med, min, max) = common::summary(&mut per_packet);
    let row = serde_json::json!({"group": "trace", "name": format!("time per traced packet beyond an untraced one (filter matching every frame; {on})"), "unit": "ns/packet", "runs": per_packet.len(), "median": med, "min": min, "max": max, "higher_is_better": false});
    println!("{row}");
    drop(rig);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    natfix_testkit::require_root();
    natfix_testkit::ensure_bpffs();
    let rounds = env_u32("NATFIX_TRACE_ROUNDS", 20) as usize;
    let window = env_u32("NATFIX_TRACE_WINDOW", 1_000_000);
    run_host(Host::DockerNode, rounds, window);
    run_host(Host::Bare, rounds, window);
}
