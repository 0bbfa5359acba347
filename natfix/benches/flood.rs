//! Flood drop rate: unsolicited UDP into a guarded veth, for natfix XDP,
//! natfix tc, the seed's iptables INPUT rule, an nftables prerouting rule and
//! no filter, in the same run. The generator is BPF_PROG_TEST_RUN in XDP
//! live-frames mode (an XDP_TX program on the sending veth), the mechanism
//! xdp-trafficgen uses; the receiving veth carries an XDP program in every
//! variant (veth needs one to receive XDP-transmitted frames).
//! Rate = packets the filter disposed of / time until its counter settled.

mod common;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use clap::Parser as _;
use natfix::{
    cli::{Cli, Command as CliCommand},
    harness::packet,
    lab::{LabNs, link, run},
    loader, netns::Netns, stats,
};
use natfix_ebpf::{objects, programs};

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Ceiling,
    NoFilter,
    NatfixXdp,
    NatfixTc,
    IptablesInput,
    NftPrerouting,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Ceiling => "XDP drop-all, no work (the most this rig can measure)",
            Self::NoFilter => "no filter (packets reach UDP, no socket)",
            Self::NatfixXdp => "natfix guard, XDP",
            Self::NatfixTc => "natfix guard, tc",
            Self::IptablesInput => "seed's iptables INPUT rule",
            Self::NftPrerouting => "nftables prerouting ct state new drop",
        }
    }
}

struct Rig {
    gen_ns: LabNs,
    rx_ns: LabNs,
    frame: Vec<u8>,
    gen_ifindex: u32,
}

fn rig(tag: &str) -> Rig {
    let gen_ns = LabNs::create(&format!("nfb-gen-{tag}")).unwrap();
    let rx_ns = LabNs::create(&format!("nfb-rx-{tag}")).unwrap();
    link(&gen_ns, "fg0", "198.51.100.20/24", &rx_ns, "fr0", "198.51.100.10/24").unwrap();
    let show: serde_json::Value = serde_json::from_str(&rx_ns.exec(&["ip", "-j", "link", "show", "fr0"]).unwrap()).unwrap();
    let mac: Vec<u8> = show[0]["address"].as_str().unwrap().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    let gshow: serde_json::Value = serde_json::from_str(&gen_ns.exec(&["ip", "-j", "link", "show", "fg0"]).unwrap()).unwrap();
    let mut frame = packet::udp4(Ipv4Addr::new(198, 51, 100, 20), 7000, Ipv4Addr::new(198, 51, 100, 10), 25000, &[0u8; 18]);
    packet::set_dst_mac(&mut frame, mac.try_into().unwrap());
    Rig { gen_ns, rx_ns, frame, gen_ifindex: u32::try_from(gshow[0]["ifindex"].as_u64().unwrap()).unwrap() }
}

/// `program` of the bench object, native XDP on the receiver (kept alive by the returned object).
fn receiver_xdp(ns: &Netns, program: &'static str) -> aya::Ebpf {
    ns.run(move || {
        let mut ebpf = aya::Ebpf::load(objects::BENCH_EMPTY)?;
        let p: &mut Xdp = ebpf.program_mut(program).unwrap().try_into()?;
        p.load()?;
        p.attach("fr0", XdpMode::Driver)?;
        Ok(ebpf)
    })
    .unwrap()
}

fn drop_all_count(ebpf: &aya::Ebpf) -> u64 {
    let map: aya::maps::PerCpuArray<&aya::maps::MapData, u64> =
        aya::maps::PerCpuArray::try_from(ebpf.map("natfix_bench_drops").unwrap()).unwrap();
    map.get(&0, 0).unwrap().iter().sum()
}

/// Sends `n` copies of the frame out of the generator's veth.
fn generate(rig: &Rig, n: u32) {
    let frame = rig.frame.clone();
    let ifindex = rig.gen_ifindex;
    rig.gen_ns
        .netns()
        .unwrap()
        .run(move || {
            let mut ebpf = aya::Ebpf::load(objects::BENCH_EMPTY)?;
            let p: &mut Xdp = ebpf.program_mut(programs::GEN_XDP).unwrap().try_into()?;
            p.load()?;
            let md = XdpMd { data_end: u32::try_from(frame.len())?, ingress_ifindex: ifindex, ..XdpMd::default() };
            // SAFETY: XdpMd is repr(C) plain integers.
            let ctx = unsafe { std::slice::from_raw_parts((&raw const md).cast::<u8>(), size_of::<XdpMd>()) };
            p.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(ctx),
                repeat: n,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::default()
            })?;
            Ok(())
        })
        .unwrap();
}

fn snmp_udp_noports(ns: &LabNs) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let keys: Vec<&str> = udp[0].split_whitespace().collect();
    let vals: Vec<&str> = udp[1].split_whitespace().collect();
    keys.iter().position(|k| *k == "NoPorts").map_or(0, |i| vals[i].parse().unwrap_or(0))
}

fn nft_counter(ns: &LabNs) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&ns.exec(&["nft", "-j", "list", "ruleset"]).unwrap()).unwrap();
    v["nftables"].as_array().unwrap().iter().filter_map(|o| o["rule"]["expr"].as_array()).flatten().filter_map(|e| e["counter"]["packets"].as_u64()).sum()
}

fn iptables_counter(ns: &LabNs) -> u64 {
    let out = ns.exec(&["iptables", "-L", "INPUT", "-v", "-x", "-n"]).unwrap();
    out.lines().filter(|l| l.contains("DROP")).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum()
}

/// One measurement: handled packets per second.
fn measure(v: Variant, n: u32, tag: &str) -> (f64, f64) {
    let rig = rig(tag);
    let rx = rig.rx_ns.netns().unwrap();
    let mut keep: Vec<aya::Ebpf> = Vec::new();
    let mut attachment = None;
    match v {
        Variant::NatfixXdp | Variant::NatfixTc => {
            let hook = if v == Variant::NatfixXdp { "xdp" } else { "tc" };
            let argv = ["natfix", "attach", "--iface", "fr0", "--guard", "20000-30000", "--guard-hook", hook, "--flow-source", "own"];
            let CliCommand::Attach(a) = Cli::try_parse_from(argv).unwrap().command else { unreachable!() };
            if v == Variant::NatfixTc {
                keep.push(receiver_xdp(&rx, programs::EMPTY_XDP));
            }
            let plan = loader::plan_guard(&a.guard).unwrap();
            attachment = Some(
                loader::attach(loader::AttachRequest { netns: rx.clone(), iface: "fr0".into(), guard: Some(plan), overlay: None, pin: false, replace: false, events_per_sec: 0 })
                    .unwrap(),
            );
        }
        Variant::IptablesInput => {
            keep.push(receiver_xdp(&rx, programs::EMPTY_XDP));
            rig.rx_ns
                .exec(&["iptables", "-A", "INPUT", "-p", "udp", "--dport", "20000:30000", "-m", "state", "!", "--state", "RELATED,ESTABLISHED", "-j", "DROP"])
                .unwrap();
        }
        Variant::NftPrerouting => {
            keep.push(receiver_xdp(&rx, programs::EMPTY_XDP));
            rig.rx_ns
                .nft("table ip bench {\n chain pre {\n type filter hook prerouting priority -150;\n udp dport 20000-30000 ct state new counter drop\n }\n}\n")
                .unwrap();
        }
        Variant::NoFilter => keep.push(receiver_xdp(&rx, programs::EMPTY_XDP)),
        Variant::Ceiling => keep.push(receiver_xdp(&rx, programs::DROP_XDP)),
    }
    let count = |att: &Option<loader::Attachment>| -> u64 {
        match v {
            Variant::NatfixXdp | Variant::NatfixTc => {
                let a = att.as_ref().unwrap();
                stats::read_counters(&a.pin_dir, &a.meta).unwrap().iter().filter(|r| r.reason == "dropped_unsolicited").map(|r| r.packets).sum()
            }
            Variant::IptablesInput => iptables_counter(&rig.rx_ns),
            Variant::NftPrerouting => nft_counter(&rig.rx_ns),
            Variant::NoFilter => snmp_udp_noports(&rig.rx_ns),
            Variant::Ceiling => drop_all_count(&keep[0]),
        }
    };
    let before = count(&attachment);
    let start = Instant::now();
    generate(&rig, n);
    // Wait for the receiver to settle: the last change marks the end.
    let mut last = count(&attachment);
    let mut end = start.elapsed();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = count(&attachment);
        if now == last {
            break;
        }
        last = now;
        end = start.elapsed();
    }
    let handled = last - before;
    if let Some(a) = attachment {
        a.detach().unwrap();
    }
    drop(keep);
    let _ = run(&["true"]);
    (handled as f64 / end.as_secs_f64(), handled as f64 / f64::from(n))
}

fn main() {
    let runs = env_u32("NATFIX_BENCH_RUNS", 3) as usize;
    let n = env_u32("NATFIX_FLOOD_PACKETS", 1_000_000);
    let variants = [Variant::Ceiling, Variant::NoFilter, Variant::NatfixXdp, Variant::NatfixTc, Variant::IptablesInput, Variant::NftPrerouting];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut reached: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for r in 0..runs {
        for (i, v) in variants.iter().enumerate() {
            let (rate, frac) = measure(*v, n, &format!("{r}{i}"));
            rates[i].push(rate);
            reached[i].push(frac);
        }
    }
    let base = variants.iter().position(|v| *v == Variant::IptablesInput).unwrap();
    // Round r of every variant ran back to back: pair them.
    for (i, v) in variants.iter().enumerate() {
        let (f, _, _) = common::summary(&mut reached[i]);
        common::report_paired("flood", &format!("{} ({:.0}% of {n} frames counted)", v.name(), f * 100.0), "packets/s", &rates[i], Variant::IptablesInput.name(), &rates[base], true);
    }
}
