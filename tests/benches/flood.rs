//! Flood: unsolicited UDP into a guarded veth, measured at the receiver
//! (`receiver`): the receive path runs in the receiving veth's threaded-NAPI
//! kthread on a CPU of its own, the generator on another; every
//! configuration's drop capacity per receiver CPU and CPU time per packet
//! against the seed's iptables INPUT rule in the same run (natfix's XDP and
//! tc guards, an nftables prerouting rule, xdp-filter, XDP drop-all, no
//! filter), then the same flood from 100,000 distinct flows on a Docker
//! node's netfilter (conntrack under pressure). The generator is
//! `BPF_PROG_TEST_RUN` in XDP live-frames mode (an `XDP_TX` program on the
//! sending veth), the mechanism xdp-trafficgen uses (`rig::Generator`).
//!
//! Then legitimate traffic through the same rig (group "throughput"): the
//! frames are replies of a flow in the guard's table, read by an application;
//! natfix's guard (and on tc, its overlay fix, which all underlay traffic
//! passes) run in windows of a million frames, each between two baseline
//! windows (`flanked_sequence`; why so long: `LEGIT_WINDOW`):
//! 64-byte frames on a receiver without netfilter (the worst case), then on
//! a Docker node's netfilter (the XDP guard; the tc configurations with 64-byte
//! and 1,400-byte frames), then 1,400-byte frames on the bare receiver.
//! Before those, bulk TCP through the same configurations (`stream_windows`).
//!
//! `NATFIX_FLOOD_PART` picks parts (comma-separated; all when unset):
//! `flood` (receiver table), `pressure` (conntrack under pressure), `stream`,
//! `legit`, `split` (the tc rows' receiver CPU per packet, `split.rs`;
//! `NATFIX_SPLIT_ROUNDS`, `NATFIX_SPLIT_WINDOW`). `NATFIX_BENCH_RUNS` rounds and `NATFIX_FLOOD_SECS` seconds per
//! flood window; `NATFIX_STREAM_ROUNDS` and `NATFIX_STREAM_WINDOW_MS` size
//! the stream's; `NATFIX_LEGIT_ROUNDS`, `NATFIX_LEGIT_DOCKER_ROUNDS` (the
//! Docker-node runs) and `NATFIX_LEGIT_WINDOW` the solicited-UDP part's.
//! Every run first removes what runs that died left behind
//! (`rig::sweep_leftovers`).

#![expect(clippy::cast_precision_loss, reason = "packet counts, nanoseconds and rates of a bench run, far below 2^52")]

mod common;
#[path = "flood/receiver.rs"]
mod receiver;
#[path = "flood/rig.rs"]
mod rig;
#[path = "flood/split.rs"]
mod split;

use common::TrafficWindow;
use rig::{BpfStatsOn, Generator, Rig, joined};

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId, xdp::XdpLink, Xdp, XdpMode};
use natfix::{
    abi::Counter,
    lab::scratch::{ScratchNs, bind_udp, sock},
    loader::{self, object::load_program},
};
use natfix_ebpf::rig as rig_programs;
use natfix_testkit::harness::{GuardHarness, OverlayHarness, flow_key, monotonic_ns, pin_to_cpu};

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// UDP payload of the flood's and the worst-case legit frames: 64-byte frames.
const SMALL_PAYLOAD: usize = 18;
/// UDP payload of the large legit frames: 1,400-byte frames, the size of the
/// overlay's own (VXLAN in ESP) and of bulk UDP.
const LARGE_PAYLOAD: usize = 1400 - 42;

/// The total of one of the bench object's per-CPU frame counts.
fn bench_count(ebpf: &aya::Ebpf, map: &str) -> u64 {
    let map: aya::maps::PerCpuArray<&aya::maps::MapData, u64> = aya::maps::PerCpuArray::try_from(ebpf.map(map).unwrap()).unwrap();
    map.get(&0, 0).unwrap().iter().sum()
}

fn snmp_udp_noports(ns: &ScratchNs) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let keys: Vec<&str> = udp[0].split_whitespace().collect();
    let vals: Vec<&str> = udp[1].split_whitespace().collect();
    keys.iter().position(|k| *k == "NoPorts").map_or(0, |i| vals[i].parse().unwrap_or(0))
}

fn nft_counter(ns: &ScratchNs) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&ns.exec(&["nft", "-j", "list", "ruleset"]).unwrap()).unwrap();
    v["nftables"].as_array().unwrap().iter().filter_map(|o| o["rule"]["expr"].as_array()).flatten().filter_map(|e| e["counter"]["packets"].as_u64()).sum()
}

fn iptables_counter(ns: &ScratchNs) -> u64 {
    let out = ns.exec(&["iptables", "-L", "INPUT", "-v", "-x", "-n"]).unwrap();
    out.lines().filter(|l| l.contains("DROP")).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

/// The guard of every natfix variant: ports 20000-30000, own flow table.
fn guard_plan(hook: &str) -> loader::GuardPlan {
    natfix_testkit::plans::plan(&["--guard", "20000-30000", "--guard-hook", hook, "--flow-source", "own"])
}

/// Solicited traffic: rates in alternating windows of `window` frames, with
/// natfix's guard program attached to the receiving veth and without it.
///
/// One rig, one flow: the flow is in the guard's table (as the egress
/// learner would have put it) and every frame is a reply of that flow, read
/// by the application on CPU 1. A window's rate is frames that reached the
/// receiver / the generator's time: the receive softirq runs on the
/// generator's CPU as it flushes each batch, so that time covers the whole
/// path up to the socket. Programs are swapped between windows (XDP:
/// `bpf_link_update` on one link; tc: tcx attach/detach), each subject window
/// between two baseline windows (`flanked_sequence`), so machine drift
/// slower than a window cancels out of its ratio (`LegitRates::flanked`).
struct LegitRates {
    /// Every window in the order it ran (`flanked_sequence`).
    sequence: Vec<(Window, TrafficWindow)>,
    read_fraction: f64,
    /// ns per run of each program on the live traffic (`live_costs`), round by round.
    live_ns: std::collections::HashMap<&'static str, Vec<f64>>,
}

impl LegitRates {
    fn new(read_fraction: f64) -> Self {
        Self { sequence: Vec::new(), read_fraction, live_ns: std::collections::HashMap::new() }
    }

    fn push(&mut self, w: Window, t: TrafficWindow) {
        self.sequence.push((w, t));
    }

    /// The windows of `w`, round by round.
    fn of(&self, w: Window) -> Vec<TrafficWindow> {
        self.sequence.iter().filter(|(x, _)| *x == w).map(|(_, t)| *t).collect()
    }

    /// Each window of `w` against the baseline windows right before and
    /// after it (their mean rate), round by round: a slow spell of the
    /// machine that spans the three windows cancels out of the ratio.
    fn flanked(&self, w: Window) -> Vec<f64> {
        let rate = |t: &TrafficWindow| t.frames / t.secs;
        let seq = &self.sequence;
        (1..seq.len().saturating_sub(1))
            .filter(|&i| seq[i].0 == w && seq[i - 1].0 == Window::Baseline && seq[i + 1].0 == Window::Baseline)
            .map(|i| rate(&seq[i].1) / f64::midpoint(rate(&seq[i - 1].1), rate(&seq[i + 1].1)))
            .collect()
    }

    /// `w` against `against` (each flanked by baselines), round by round.
    fn flanked_against(&self, w: Window, against: Window) -> Vec<f64> {
        self.flanked(w).iter().zip(self.flanked(against)).map(|(a, b)| a / b).collect()
    }

    /// Prints the "throughput" row of `w` against `against` (named
    /// `against_name`): the baseline, or another configuration of the run.
    fn report(&self, name: &str, unit: &str, w: Window, against_name: &str, against: Window) {
        let ratios = if against == Window::Baseline { self.flanked(w) } else { self.flanked_against(w, against) };
        common::report_flanked("throughput", name, unit, &self.of(w), against_name, &self.of(against), &ratios);
    }
}

/// What a window runs with.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Window {
    Baseline,
    /// natfix's guard.
    Natfix,
    /// tc only: an empty tc program in natfix's place (the cost of the hook itself).
    EmptyTc,
    /// tc only: natfix's overlay fix with both mechanisms (`--csum-backend
    /// both`, which auto picks for IPv6 or --csum recompute: its tc program
    /// and its nftables rule), which every (here non-VXLAN) frame on the
    /// underlay passes; then each alone (the rule alone is auto for IPv4).
    Overlay,
    OverlayTc,
    OverlayNft,
    /// An nftables base chain at the rule's hook and priority, without
    /// rules: the cost of the netfilter hook itself, as `EmptyTc` is tc's.
    EmptyNft,
    /// TCP rows only: natfix's XDP guard in generic (skb) mode, which
    /// `--xdp-mode auto` no longer falls back to (with the egress learner).
    GenericXdp,
}

/// The empty chain of `Window::EmptyNft`: the same family, hook, priority
/// and policy as natfix's overlay table (`overlay::install_nft`).
const EMPTY_NFT: &str = "table ip natfix_bench_empty {\n chain prerouting {\n  type filter hook prerouting priority -150; policy accept;\n }\n}\n";

/// The bench object's counting pass-all XDP program, loaded and attached to fr0.
fn attach_counting_xdp(base: &mut aya::Ebpf) -> XdpLink {
    let e: &mut Xdp = base.program_mut(rig_programs::COUNT_PASS_XDP).unwrap().try_into().unwrap();
    e.load().unwrap();
    let id = e.attach("fr0", XdpMode::Driver).unwrap();
    e.take_link(id).unwrap()
}

/// Puts `to` in place of the program `link` runs (one `bpf_link_update`); returns the link.
fn move_xdp_link(to: &mut Xdp, link: XdpLink) -> XdpLink {
    let id = to.attach_to_link(link).unwrap();
    to.take_link(id).unwrap()
}

/// natfix's two tc programs a tc window can attach, and the empty one.
struct TcSubjects {
    guard: GuardHarness,
    overlay: OverlayHarness,
    base: aya::Ebpf,
    /// natfix's windows also attach the guard's egress flow learner, as
    /// `attach --flow-source own` does (the TCP rows, whose ACKs pass it).
    with_learner: bool,
    /// The XDP guard for `Window::GenericXdp` (the TCP rows on tc).
    guard_xdp: Option<GuardHarness>,
}

impl TcSubjects {
    fn program(&mut self, w: Window) -> &mut SchedClassifier {
        let p = match w {
            Window::Natfix => self.guard.ingress_program_mut().unwrap(),
            Window::Overlay | Window::OverlayTc => self.overlay.program_mut().unwrap(),
            Window::EmptyTc => self.base.program_mut(rig_programs::EMPTY_TC).unwrap(),
            Window::Baseline | Window::OverlayNft | Window::EmptyNft | Window::GenericXdp => unreachable!("these windows attach no tc program"),
        };
        p.try_into().unwrap()
    }

    /// Attaches what window `w` runs with on fr0 (the XDP guard by
    /// `bpf_link_update` of `xdp_link`, which holds the counting XDP program).
    fn enter(&mut self, w: Window, hook: &str, fr0: u32, xdp_link: &mut Option<XdpLink>) -> Attached {
        let mut attached = Attached::default();
        if matches!(w, Window::Overlay | Window::OverlayNft) {
            natfix::overlay::nft::install(fr0, "fr0", &[4789], None, &mut attached.nft).unwrap();
        }
        if w == Window::EmptyNft {
            nft_here(EMPTY_NFT);
        }
        match (w, hook) {
            (Window::Baseline | Window::OverlayNft | Window::EmptyNft, _) => {}
            (Window::Natfix, "xdp") => {
                let guard_xdp = self.guard.ingress_program_mut().unwrap().try_into().unwrap();
                *xdp_link = Some(move_xdp_link(guard_xdp, xdp_link.take().unwrap()));
            }
            (Window::GenericXdp, _) => {
                let generic: &mut Xdp = self.guard_xdp.as_mut().unwrap().ingress_program_mut().unwrap().try_into().unwrap();
                attached.xdp_generic = Some(generic.attach("fr0", XdpMode::Skb).unwrap());
            }
            _ => attached.tc_ingress = Some(self.program(w).attach("fr0", TcAttachType::Ingress).unwrap()),
        }
        if matches!(w, Window::Natfix | Window::GenericXdp) && self.with_learner {
            let learner: &mut SchedClassifier = self.guard.egress_program_mut().unwrap().try_into().unwrap();
            attached.tc_egress = Some(learner.attach("fr0", TcAttachType::Egress).unwrap());
        }
        attached
    }

    /// The windows of `sequence` in order: each attached, measured by
    /// `measure` (given the window), then taken off.
    fn rotate(&mut self, sequence: &[Window], hook: &str, fr0: u32, xdp_link: &mut Option<XdpLink>, mut measure: impl FnMut(&Self, Window)) {
        for &w in sequence {
            let attached = self.enter(w, hook, fr0, xdp_link);
            measure(self, w);
            self.leave(w, hook, attached, xdp_link);
        }
    }

    /// Takes off what `enter` attached.
    fn leave(&mut self, w: Window, hook: &str, attached: Attached, xdp_link: &mut Option<XdpLink>) {
        natfix::overlay::undo("fr0", &attached.nft);
        if w == Window::EmptyNft {
            nft_here("delete table ip natfix_bench_empty\n");
        }
        match (w, hook) {
            (Window::Baseline | Window::OverlayNft | Window::EmptyNft, _) => {}
            (Window::Natfix, "xdp") => {
                let counting_xdp = self.base.program_mut(rig_programs::COUNT_PASS_XDP).unwrap().try_into().unwrap();
                *xdp_link = Some(move_xdp_link(counting_xdp, xdp_link.take().unwrap()));
            }
            (Window::GenericXdp, _) => {
                let generic: &mut Xdp = self.guard_xdp.as_mut().unwrap().ingress_program_mut().unwrap().try_into().unwrap();
                generic.detach(attached.xdp_generic.unwrap()).unwrap();
            }
            _ => self.program(w).detach(attached.tc_ingress.unwrap()).unwrap(),
        }
        if let Some(link) = attached.tc_egress {
            let learner: &mut SchedClassifier = self.guard.egress_program_mut().unwrap().try_into().unwrap();
            learner.detach(link).unwrap();
        }
    }
}

/// Applies an nftables script in the calling thread's namespace.
fn nft_here(script: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft -f - failed on {script}");
}

/// What one window attached.
#[derive(Default)]
struct Attached {
    tc_ingress: Option<SchedClassifierLinkId>,
    xdp_generic: Option<aya::programs::xdp::XdpLinkId>,
    tc_egress: Option<SchedClassifierLinkId>,
    nft: natfix::record::OverlayChanges,
}

/// The overlay tc program as `natfix attach --overlay-fix --csum-backend both` configures it: zero mode,
/// VXLAN port 4789, secpath gate on.
fn overlay_as_attached() -> OverlayHarness {
    OverlayHarness::load(&natfix_testkit::harness::OverlaySetup::new(0, &[4789], None)).unwrap()
}

/// The receiver's netfilter during the legitimate-traffic windows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Host {
    /// None at all: the worst case for any per-packet cost.
    Bare,
    /// A Docker node's (`data/docker-node.nft`): conntrack and NAT hooks on
    /// every packet, as on every host natfix is for (the port-stealing
    /// problem itself needs conntrack; Docker's overlay runs on such hosts).
    DockerNode,
}

/// Windows of `configs` (each round in a rotating ABBA order) for frames of
/// `payload` UDP bytes through `hook` on a `host` receiver.
/// With `live`, also each program's own time per run on these frames (`live_costs`).
fn legit_windows(hook: &'static str, host: Host, payload: usize, configs: &'static [Window], rounds: usize, window: u32, live: bool) -> LegitRates {
    let tag = format!("l{hook}{}{}", if host == Host::DockerNode { "d" } else { "" }, if payload == SMALL_PAYLOAD { "" } else { "L" });
    let rig = Rig::new(&tag, payload);
    if host == Host::DockerNode {
        rig.rx_ns.nft(include_str!("data/docker-node.nft")).unwrap();
    }
    // Attaching resolves fr0 in the caller's namespace: run it all in the receiver's.
    rig.rx_ns.netns().unwrap().run(move || Ok(legit_in_receiver(&rig, hook, configs, rounds, window, live))).unwrap()
}

fn legit_in_receiver(rig: &Rig, hook: &str, configs: &[Window], rounds: usize, window: u32, live: bool) -> LegitRates {
    use std::sync::{Arc, atomic::{AtomicBool, AtomicU64, Ordering}};

    let mut guard = GuardHarness::load(&guard_plan(hook)).unwrap();
    let local: std::net::IpAddr = Ipv4Addr::new(198, 51, 100, 10).into();
    let peer: std::net::IpAddr = Ipv4Addr::new(198, 51, 100, 20).into();
    guard.insert_flow(&flow_key(local, 25000, Some((peer, 7000))), monotonic_ns()).unwrap();

    let socket = bind_udp(sock("198.51.100.10", 25000)).unwrap();
    // Room for a burst while the reader is scheduled: what is measured is the path, not the reader.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20)).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (got, done) = (got.clone(), done.clone());
        std::thread::spawn(move || {
            pin_to_cpu(1).unwrap(); // the generator and the receive softirq run on CPU 0
            let mut buf = [0u8; 2048];
            loop {
                match socket.recv(&mut buf) {
                    Ok(_) => {
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) if done.load(Ordering::Acquire) => return,
                    Err(_) => {}
                }
            }
        })
    };

    // The veth needs an XDP program to take XDP_TX frames: a counting pass-all
    // one is the XDP baseline, and stays under the tc guard. A window counts
    // the frames that reached the receiver (a full veth ring drops some).
    let mut base = aya::Ebpf::load(rig_programs::OBJECT).unwrap();
    let mut xdp_link = Some(attach_counting_xdp(&mut base));
    load_program::<SchedClassifier>(&mut base, rig_programs::EMPTY_TC).unwrap();
    let mut s = TcSubjects { guard, overlay: overlay_as_attached(), base, with_learner: false, guard_xdp: None };
    let passes = |base: &aya::Ebpf| bench_count(base, "natfix_bench_passes");
    let solicited = |guard: &GuardHarness| guard.counters().unwrap()[Counter::GuardPassSolicited].packets;
    let before_all = passes(&s.base) + solicited(&s.guard);
    let mut generator = Generator::start(rig);
    generator.seconds_for(window); // warm-up: neighbour tables, caches
    let mut rates = LegitRates::new(0.0);
    let fr0 = nix::net::if_::if_nametoindex("fr0").unwrap();
    s.rotate(&flanked_sequence(configs, rounds), hook, fr0, &mut xdp_link, |s, w| {
        // Under the XDP guard the guard's own counter sees the frames.
        let under_xdp_guard = w == Window::Natfix && hook == "xdp";
        let reached = |s: &TcSubjects| if under_xdp_guard { solicited(&s.guard) } else { passes(&s.base) };
        let before = reached(s);
        let secs = generator.seconds_for(window);
        rates.push(w, TrafficWindow { frames: (reached(s) - before) as f64, secs });
    });
    if live {
        rates.live_ns = live_costs(&mut s, hook, fr0, &mut xdp_link, || {
            generator.seconds_for(window);
        });
    }
    std::thread::sleep(Duration::from_millis(500)); // the reader drains its queue
    done.store(true, Ordering::Release);
    reader.join().unwrap();
    let read = got.load(Ordering::Relaxed);
    let delivered = passes(&s.base) + if hook == "xdp" { solicited(&s.guard) } else { 0 } - before_all;
    if hook == "tc" {
        // Every frame the XDP program passed met the tc guard in subject windows: none was dropped.
        let dropped = s.guard.counters().unwrap()[Counter::GuardDropUnsolicited].packets;
        assert_eq!(dropped, 0, "tc: the guard dropped solicited frames");
        // The overlay fix saw its windows' frames as not VXLAN and wrote none.
        let overlay = s.overlay.counters().unwrap();
        assert!(overlay[Counter::OverlayNotVxlan].packets > 0, "tc: the overlay fix saw no frames");
        assert_eq!(overlay[Counter::OverlayZeroed].packets, 0, "tc: the overlay fix rewrote a non-VXLAN frame");
    }
    assert!(read <= delivered, "{hook}: read {read} of {delivered} delivered");
    rates.read_fraction = read as f64 / delivered as f64;
    drop(xdp_link);
    rates
}

/// The order of round `round`'s windows: ABBA (reversed every other round),
/// the start rotated every two rounds, so each configuration takes each
/// position, and follows itself across a round boundary, equally often
/// (windows next to a window of the same configuration measured faster here).
fn window_order(configs: &[Window], round: usize) -> Vec<Window> {
    let mut order = configs.to_vec();
    order.rotate_left((round / 2) % configs.len());
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// `rounds` rounds of `configs` in `window_order`, back to back.
fn rotation_sequence(configs: &[Window], rounds: usize) -> Vec<Window> {
    (0..rounds).flat_map(|round| window_order(configs, round)).collect()
}

/// `rounds` rounds in which every configuration other than the baseline
/// (in `window_order`) runs between two baseline windows: B s1 B s2 ... B sn,
/// and one B after the last round. This machine's neighbours slow it in
/// spells of a few seconds (every configuration's windows, the baseline's
/// included, fall from ~1.4 to ~0.8 million datagrams/s and back), longer
/// than a window but shorter than a round of seven: a subject compared with
/// the baselines right beside it (`LegitRates::flanked`) shares its spell,
/// where a pooled or median rate over rounds does not. Every window follows
/// a swap, so no configuration profits from following itself.
fn flanked_sequence(configs: &[Window], rounds: usize) -> Vec<Window> {
    let subjects: Vec<Window> = configs.iter().copied().filter(|&w| w != Window::Baseline).collect();
    let mut sequence: Vec<Window> = (0..rounds).flat_map(|round| window_order(&subjects, round).into_iter().flat_map(|w| [Window::Baseline, w])).collect();
    sequence.push(Window::Baseline);
    sequence
}

/// Bulk TCP, the throughput iperf3 measures: one connection from the
/// generator's namespace (sender on CPU 0, where the receive softirq runs
/// too) to an application in the receiver's (CPU 1); bytes read in
/// alternating windows of `window`, programs swapped between windows as in
/// `legit_windows`. veth hands the sender's TSO segments over whole, so
/// per-packet costs spread over up to 64 KiB, as GRO spreads them on a NIC.
/// The tc configurations run with no XDP program at all (native XDP on veth
/// gives up that aggregation); the XDP guard against the counting XDP program.
fn stream_windows(hook: &'static str, configs: &'static [Window], rounds: usize, window: Duration) -> LegitRates {
    let rig = Rig::new(&format!("s{hook}"), SMALL_PAYLOAD);
    rig.rx_ns.netns().unwrap().run(move || Ok(stream_in_receiver(&rig, hook, configs, rounds, window))).unwrap()
}

fn stream_in_receiver(rig: &Rig, hook: &str, configs: &[Window], rounds: usize, window: Duration) -> LegitRates {
    use std::{
        io::{Read as _, Write as _},
        sync::{Arc, atomic::{AtomicBool, AtomicU64, Ordering}},
    };

    let listener = std::net::TcpListener::bind(sock("198.51.100.10", 5201)).unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let got = got.clone();
        std::thread::spawn(move || {
            pin_to_cpu(1).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 18];
            // Until the sender closes.
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                got.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let mut sender = Some({
        let (done, netns) = (done.clone(), rig.gen_ns.netns().unwrap());
        std::thread::spawn(move || {
            rig::in_ns(&netns, move || {
                pin_to_cpu(0)?;
                let mut conn = std::net::TcpStream::connect(sock("198.51.100.10", 5201))?;
                let buf = vec![0u8; 1 << 17];
                while !done.load(Ordering::Acquire) {
                    conn.write_all(&buf)?;
                }
                Ok(())
            })
        })
    });

    let mut base = aya::Ebpf::load(rig_programs::OBJECT).unwrap();
    let mut xdp_link = (hook == "xdp").then(|| attach_counting_xdp(&mut base));
    load_program::<SchedClassifier>(&mut base, rig_programs::EMPTY_TC).unwrap();
    let guard = GuardHarness::load(&guard_plan(hook)).unwrap();
    let guard_xdp = (hook == "tc").then(|| GuardHarness::load(&guard_plan("xdp")).unwrap());
    let mut s = TcSubjects { guard, overlay: overlay_as_attached(), base, with_learner: true, guard_xdp };
    let fr0 = nix::net::if_::if_nametoindex("fr0").unwrap();
    std::thread::sleep(Duration::from_secs(1)); // warm-up: slow start, buffer autotuning
    let mut rates = LegitRates::new(1.0);
    s.rotate(&flanked_sequence(configs, rounds), hook, fr0, &mut xdp_link, |_, w| {
        let (before, start) = (got.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(window);
        let gbit = (got.load(Ordering::Relaxed) - before) as f64 * 8.0 / 1e9;
        rates.push(w, TrafficWindow { frames: gbit, secs: start.elapsed().as_secs_f64() });
        // A sender that stopped says why now, not after the windows it left empty.
        if sender.as_ref().is_some_and(std::thread::JoinHandle::is_finished) {
            joined(sender.take().expect("checked"), "the TCP sender");
            panic!("the TCP sender stopped before the windows ended");
        }
    });
    rates.live_ns = live_costs(&mut s, hook, fr0, &mut xdp_link, || std::thread::sleep(window));
    done.store(true, Ordering::Release);
    joined(sender.take().expect("joined only here"), "the TCP sender");
    reader.join().unwrap();
    // natfix's programs saw the stream and left it alone: out of the guard's
    // scope (TCP), not VXLAN for the overlay fix.
    let guard = s.guard.counters().unwrap();
    assert!(guard[Counter::GuardOutOfScope].packets > 0, "{hook}: the guard saw none of the stream");
    assert!(guard[Counter::FlowOutOfScope].packets > 0, "{hook}: the flow learner saw none of the stream's ACKs");
    assert_eq!(guard[Counter::GuardDropUnsolicited].packets, 0, "{hook}: the guard dropped stream packets");
    if hook == "tc" {
        let overlay = s.overlay.counters().unwrap();
        assert!(overlay[Counter::OverlayNotVxlan].packets > 0, "tc: the overlay fix saw none of the stream");
        assert_eq!(overlay[Counter::OverlayZeroed].packets, 0, "tc: the overlay fix rewrote a stream packet");
    }
    drop(xdp_link);
    rates
}

/// `run_time_ns` and `run_cnt` of a loaded program (counted while
/// `kernel.bpf_stats_enabled` is 1), from its fd's fdinfo.
fn run_stats(p: &aya::programs::Program) -> (u64, u64) {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = p.fd().unwrap().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    (field("run_time_ns:"), field("run_cnt:"))
}

/// The ingress (and for natfix's guard, egress) programs' own time per run
/// on live traffic, measured by the kernel (`bpf_stats`) in windows of their
/// own after the throughput rounds: the stats' clock reads would otherwise
/// slow every window. `traffic` runs one window's worth. Separates natfix's
/// per-packet share from the hook's, which the throughput ratios lump
/// together. Keyed by row label.
fn live_costs(
    s: &mut TcSubjects,
    hook: &str,
    fr0: u32,
    xdp_link: &mut Option<XdpLink>,
    mut traffic: impl FnMut(),
) -> std::collections::HashMap<&'static str, Vec<f64>> {
    let stats_on = BpfStatsOn::enable();
    let configs: &[Window] = if hook == "xdp" { &XDP } else { &[Window::EmptyTc, Window::Natfix, Window::OverlayTc] };
    let mut live: std::collections::HashMap<&'static str, Vec<f64>> = std::collections::HashMap::new();
    s.rotate(&rotation_sequence(configs, 10), hook, fr0, xdp_link, |s, w| {
        // Each program the window runs, by row label, with its stats.
        let stats = |s: &TcSubjects| -> Vec<(&'static str, (u64, u64))> {
            let programs = match (w, hook) {
                (Window::Baseline, _) => vec![("counting XDP", s.base.program(rig_programs::COUNT_PASS_XDP).unwrap())],
                (Window::Natfix, _) => vec![
                    (if hook == "xdp" { "guard XDP" } else { "guard tc" }, s.guard.ingress_program().unwrap()),
                    ("flow learner", s.guard.egress_program().unwrap()),
                ],
                (Window::OverlayTc, _) => vec![("overlay tc", s.overlay.loaded_program().unwrap())],
                _ => vec![("empty tc", s.base.program(rig_programs::EMPTY_TC).unwrap())],
            };
            programs.into_iter().map(|(label, p)| (label, run_stats(p))).collect()
        };
        let start = stats(s);
        traffic();
        for ((label, (t0, n0)), (_, (t1, n1))) in start.into_iter().zip(stats(s)) {
            if n1 > n0 {
                live.entry(label).or_default().push((t1 - t0) as f64 / (n1 - n0) as f64);
            }
        }
    });
    drop(stats_on);
    live
}

/// How the Docker-node rows name their receiver.
const DOCKER: &str = "on a Docker node (conntrack and Docker's NAT rules, benches/data/docker-node.nft)";

/// Bulk TCP through each configuration: the throughput target.
fn stream(rounds: usize, window: Duration) {
    let what = |through: &str| format!("TCP bulk stream (one connection, as iperf3) read by the application, through {through}");
    let r = stream_windows("xdp", &XDP, rounds, window);
    let row = what("natfix's XDP guard and its egress flow learner");
    r.report(&row, "Gbit/s", Window::Natfix, "a counting pass-all XDP program on the same veth", Window::Baseline);
    let live = |r: &LegitRates, name: &str| r.live_ns.get(name).cloned().unwrap_or_default();
    let cost = |of: &str| format!("live cost per run on the TCP stream's packets (bpf_stats, windows of their own): {of}");
    common::report_paired("live cost", &cost("natfix's XDP guard"), "ns/run", &live(&r, "guard XDP"), "the counting XDP program", &live(&r, "counting XDP"), false);
    let r = stream_windows("tc", &STREAM_TC, rounds, window);
    for (name, of) in [
        ("guard tc", "natfix's tc guard"),
        ("flow learner", "natfix's egress flow learner (the stream's ACKs)"),
        ("overlay tc", "the overlay fix's tc program"),
    ] {
        common::report_paired("live cost", &cost(of), "ns/run", &live(&r, name), "an empty tc program (ingress)", &live(&r, "empty tc"), false);
    }
    let baseline = "no natfix (no program on the veth)";
    for (w, through) in [
        (Window::Natfix, "natfix's tc guard and its egress flow learner"),
        (Window::Overlay, "natfix's overlay fix with both mechanisms (--csum-backend both: tc program + nftables rule)"),
        (Window::OverlayTc, "the overlay fix's tc program alone (--csum-backend tc)"),
        (Window::OverlayNft, "the overlay fix as attached by default for IPv4 (its nftables rule alone)"),
        (Window::EmptyNft, "an empty nftables chain at the rule's hook (the cost of the netfilter hook itself)"),
        (Window::EmptyTc, "an empty tc program (the cost of the tc hook itself)"),
        (Window::GenericXdp, "natfix's XDP guard in generic mode (--xdp-mode generic, which auto no longer falls back to) and its egress flow learner"),
    ] {
        r.report(&what(through), "Gbit/s", w, baseline, Window::Baseline);
    }
}

fn legit(rounds: usize, window: u32) {
    let baselines = [("xdp", "natfix's XDP guard", "a counting pass-all XDP program on the same veth"), ("tc", "natfix's tc guard", "no tc program (the counting XDP program under both)")];
    for (hook, name, baseline) in baselines {
        let configs: &'static [Window] = if hook == "xdp" { &XDP } else { &ALL_TC };
        let r = legit_windows(hook, Host::Bare, SMALL_PAYLOAD, configs, rounds, window, true);
        let row = format!(
            "solicited UDP replies read by the application (64 B frames, windows of {window}) through {name} ({:.0}% read)",
            r.read_fraction * 100.0
        );
        r.report(&row, "datagrams/s", Window::Natfix, baseline, Window::Baseline);
        // natfix's own time per packet on these frames, apart from the hook's.
        let live = |name: &str| r.live_ns.get(name).cloned().unwrap_or_default();
        let cost = |of: &str| format!("live cost per run on the solicited 64 B UDP replies (bpf_stats, windows of their own): {of}");
        if hook == "xdp" {
            common::report_paired("live cost", &cost("natfix's XDP guard (pass path)"), "ns/run", &live("guard XDP"), "the counting XDP program", &live("counting XDP"), false);
        } else {
            for (name, of) in [("guard tc", "natfix's tc guard (pass path)"), ("overlay tc", "the overlay fix's tc program (not VXLAN)")] {
                common::report_paired("live cost", &cost(of), "ns/run", &live(name), "an empty tc program (ingress)", &live("empty tc"), false);
            }
        }
        if hook == "tc" {
            // The hook's own share, and natfix's share on top of it.
            let row = "solicited UDP replies (as above) through an empty tc program: the cost of the tc hook itself";
            r.report(row, "datagrams/s", Window::EmptyTc, baseline, Window::Baseline);
            let row = "solicited UDP replies (as above) through natfix's tc guard, against an empty tc program";
            r.report(row, "datagrams/s", Window::Natfix, "an empty tc program", Window::EmptyTc);
            // The overlay fix sits on the underlay (tc is the only hook that sees
            // decrypted packets; the nftables rule covers what was fragmented
            // after encryption), so every other packet there passes it: these
            // frames are not VXLAN. Both mechanisms, then each alone.
            let row = format!(
                "solicited UDP replies read by the application (64 B frames, windows of {window}) through natfix's overlay fix with both mechanisms (--csum-backend both: tc program + nftables rule; not VXLAN, passed untouched)"
            );
            r.report(&row, "datagrams/s", Window::Overlay, baseline, Window::Baseline);
            let row = "solicited UDP replies (as above) through the overlay fix's tc program alone (--csum-backend tc)";
            r.report(row, "datagrams/s", Window::OverlayTc, baseline, Window::Baseline);
            let row = "solicited UDP replies (as above) through the overlay fix's tc program alone, against an empty tc program";
            r.report(row, "datagrams/s", Window::OverlayTc, "an empty tc program", Window::EmptyTc);
            // Full name: the IPv4 default is held to the target.
            let row = format!(
                "solicited UDP replies read by the application (64 B frames, windows of {window}) through the overlay fix as attached by default for IPv4 (its nftables rule alone: --overlay-fix, --csum-backend nft)"
            );
            r.report(&row, "datagrams/s", Window::OverlayNft, baseline, Window::Baseline);
            let row = "solicited UDP replies (as above) through an empty nftables chain at the rule's hook: the cost of the netfilter hook itself";
            r.report(row, "datagrams/s", Window::EmptyNft, baseline, Window::Baseline);
            let row = "solicited UDP replies (as above) through the overlay fix's nftables rule alone, against an empty nftables chain at its hook";
            r.report(row, "datagrams/s", Window::OverlayNft, "an empty nftables chain", Window::EmptyNft);
        }
    }
    // The rows again where the rest of the path costs more per packet: on a
    // host configured as natfix's users' hosts are (the port-stealing problem
    // needs conntrack and NAT; Docker's overlay comes with Docker's netfilter
    // rules), with small and with overlay-sized frames; then large frames on
    // the bare receiver.
    // More rounds on the Docker node, whose default rows carry the target.
    let docker_rounds = env_u32("NATFIX_LEGIT_DOCKER_ROUNDS", 60) as usize;
    let r = legit_windows("xdp", Host::DockerNode, SMALL_PAYLOAD, &XDP, docker_rounds, window, false);
    let row = format!("solicited UDP replies read by the application {DOCKER}, 64 B frames (windows of {window}), through natfix's XDP guard ({:.0}% read)", r.read_fraction * 100.0);
    r.report(&row, "datagrams/s", Window::Natfix, "a counting pass-all XDP program on the same veth", Window::Baseline);
    for (host, payload, on) in [
        (Host::DockerNode, SMALL_PAYLOAD, format!("{DOCKER}, 64 B frames")),
        (Host::DockerNode, LARGE_PAYLOAD, format!("{DOCKER}, 1,400 B frames")),
        (Host::Bare, LARGE_PAYLOAD, "with 1,400 B frames".to_owned()),
    ] {
        let rounds = if host == Host::DockerNode { docker_rounds } else { rounds };
        let r = legit_windows("tc", host, payload, &OPERATOR_TC, rounds, window, false);
        let baseline = "no natfix (the counting XDP program under both)";
        let row = format!("solicited UDP replies read by the application {on} (windows of {window}), through natfix's tc guard ({:.0}% read)", r.read_fraction * 100.0);
        r.report(&row, "datagrams/s", Window::Natfix, baseline, Window::Baseline);
        let row = format!("solicited UDP replies read by the application {on}, through natfix's overlay fix with both mechanisms (--csum-backend both: tc program + nftables rule)");
        r.report(&row, "datagrams/s", Window::Overlay, baseline, Window::Baseline);
        let row = format!("solicited UDP replies read by the application {on}, through the overlay fix as attached by default for IPv4 (its nftables rule alone: --overlay-fix, --csum-backend nft)");
        r.report(&row, "datagrams/s", Window::OverlayNft, baseline, Window::Baseline);
        let row = format!("solicited UDP replies {on}, through an empty nftables chain at the rule's hook: the cost of the netfilter hook itself");
        r.report(&row, "datagrams/s", Window::EmptyNft, baseline, Window::Baseline);
    }
}

/// Frames per solicited-UDP window. Each generator burst of more than one
/// batch costs about 15-30 ms of wall time beyond its frames (measured here:
/// 100 frames 15 ms, 50,000 frames 35 ms, 1,000,000 frames 430 ms), the same
/// in every configuration; in short windows that fixed time pulls every
/// ratio towards 1 (50,000-frame windows showed about 60% of the per-frame
/// difference). At a million frames it is under 5% of a window.
const LEGIT_WINDOW: u32 = 1_000_000;

/// The XDP guard and its baseline (a counting XDP program).
const XDP: [Window; 2] = [Window::Baseline, Window::Natfix];
/// Every tc configuration: the hook's own share and natfix's on top of it.
const ALL_TC: [Window; 7] = [Window::Baseline, Window::EmptyTc, Window::Natfix, Window::Overlay, Window::OverlayTc, Window::OverlayNft, Window::EmptyNft];
/// The TCP rows' tc configurations: all of the above, and the XDP guard in
/// generic mode (none of them leaves an XDP program on the veth).
const STREAM_TC: [Window; 8] = [
    Window::Baseline,
    Window::EmptyTc,
    Window::Natfix,
    Window::Overlay,
    Window::OverlayTc,
    Window::OverlayNft,
    Window::EmptyNft,
    Window::GenericXdp,
];
/// What an operator picks between: the tc guard, and the overlay fix with
/// both mechanisms or as attached by default for IPv4 (the nftables rule);
/// and the netfilter hook's own share.
const OPERATOR_TC: [Window; 5] = [Window::Baseline, Window::Natfix, Window::Overlay, Window::OverlayNft, Window::EmptyNft];

fn main() {
    rig::sweep_leftovers();
    let runs = env_u32("NATFIX_BENCH_RUNS", 3) as usize;
    let secs = std::env::var("NATFIX_FLOOD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(2.0);
    let parts = std::env::var("NATFIX_FLOOD_PART").unwrap_or_default();
    let wants = |part: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == part);
    if wants("flood") {
        receiver::flood(runs, secs);
    }
    if wants("pressure") {
        receiver::pressure(runs, secs);
    }
    if wants("stream") {
        stream(env_u32("NATFIX_STREAM_ROUNDS", 60) as usize, Duration::from_millis(env_u32("NATFIX_STREAM_WINDOW_MS", 500).into()));
    }
    if wants("legit") {
        legit(env_u32("NATFIX_LEGIT_ROUNDS", 30) as usize, env_u32("NATFIX_LEGIT_WINDOW", LEGIT_WINDOW));
    }
    if wants("split") {
        split::split(env_u32("NATFIX_SPLIT_ROUNDS", 10) as usize, env_u32("NATFIX_SPLIT_WINDOW", 2_000_000));
    }
}
