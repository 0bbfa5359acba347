//! `cargo xtask bench`: runs natfix's benchmarks and writes BENCHMARKS.md.
//! Every row is a ratio to a baseline measured in the same run: these
//! machines are noisy, absolute times alone mean little.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::run::{cargo, setup, workspace};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Runs per row (median, min and max are over these); `test_run` rows take three times as many.
    #[arg(long, default_value_t = 7)]
    pub runs: u32,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: String,
    /// Render the rows (JSON lines, as the bench binaries print them) of
    /// this file instead of running anything: for one part run on its own.
    #[arg(long)]
    pub rows: Option<std::path::PathBuf>,
    /// Run only these parts (comma-separated): datapath, flood, scaling, trace, system, agent, vm.
    /// Their rows replace the same rows of the last run's (`target/bench-rows.jsonl`).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// A benchmark binary's JSON lines.
fn cargo_bench(name: &str, env: &[(&str, String)]) -> Result<Vec<Value>> {
    let out = Command::new(env!("CARGO"))
        .args(["bench", "-q", "-p", "natfix-testkit", "--bench", name])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(workspace())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cargo bench {name}"))?;
    if !out.status.success() {
        bail!("benchmark {name} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("{args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn row(group: &str, name: &str, unit: &str, runs: Vec<f64>, baseline: &str, base: Vec<f64>, higher_is_better: bool) -> Value {
    let n = runs.len();
    let (med, min, max) = summary(runs);
    let (bmed, _, _) = summary(base);
    json!({"group": group, "name": name, "unit": unit, "runs": n, "median": med, "min": min, "max": max,
           "baseline": baseline, "baseline_median": bmed, "ratio": med / bmed, "delta": med - bmed,
           "higher_is_better": higher_is_better})
}

/// Two namespaces joined by a veth pair; removed on drop.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Result<Self> {
        let p = Self { a: "nfx-bench-a".into(), b: "nfx-bench-b".into() };
        for ns in [&p.a, &p.b] {
            let _ = sh(&["ip", "netns", "del", ns]);
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&["ip", "link", "add", "nfxba", "netns", &p.a, "type", "veth", "peer", "name", "nfxbb", "netns", &p.b])?;
        sh(&["ip", "-n", &p.a, "addr", "add", "198.51.100.10/24", "dev", "nfxba"])?;
        sh(&["ip", "-n", &p.b, "addr", "add", "198.51.100.20/24", "dev", "nfxbb"])?;
        sh(&["ip", "-n", &p.a, "link", "set", "nfxba", "up"])?;
        sh(&["ip", "-n", &p.b, "link", "set", "nfxbb", "up"])?;
        Ok(p)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.a]);
        let _ = sh(&["ip", "netns", "del", &self.b]);
    }
}

fn natfix_bin() -> std::path::PathBuf {
    workspace().join("target/release/natfix")
}

fn attach_args(p: &Pair) -> Vec<String> {
    ["attach", "--iface", "nfxba", "--netns", &p.a, "--guard", "20000-30000", "--flow-source", "own"]
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn timed(args: &[String]) -> Result<f64> {
    let t = Instant::now();
    let ok = Command::new(natfix_bin()).args(args).env("NATFIX_LOG", "warn").status()?.success();
    if !ok {
        bail!("natfix {args:?} failed");
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn system_benches(runs: u32) -> Result<Vec<Value>> {
    let p = Pair::new()?;
    let mut rows = Vec::new();

    // Idle RSS of a foreground attach, against `natfix status` (a process that loads nothing).
    let mut daemon = Command::new(natfix_bin()).args(attach_args(&p)).env("NATFIX_LOG", "warn").spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.id()))?;
    let rss_kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0.0);
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let _ = daemon.wait();
    let idle_rss_mb = rss_kb / 1024.0;
    let version = Command::new("/usr/bin/time").args(["-f", "%M"]).arg(natfix_bin()).arg("--version").output()?;
    let base_kb: f64 = String::from_utf8_lossy(&version.stderr).trim().lines().last().and_then(|l| l.parse().ok()).unwrap_or(1.0);
    rows.push(row("memory", "idle RSS of `natfix attach` (guard, own flows, conntrack sync)", "MB", vec![idle_rss_mb], "`natfix --version` max RSS", vec![base_kb / 1024.0], false));

    // Attach and detach latency (pinned), against a process that does nothing (`natfix --version`).
    let (mut att, mut det, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut pin = attach_args(&p);
    pin.push("--pin".into());
    let detach: Vec<String> = ["detach", "--iface", "nfxba", "--netns", &p.a].iter().map(ToString::to_string).collect();
    for _ in 0..runs {
        base.push(timed(&["--version".to_owned()])?);
        att.push(timed(&pin)?);
        det.push(timed(&detach)?);
    }
    rows.push(row("latency", "`natfix attach --pin` (guard, own flows, load + verify + attach)", "ms", att, "`natfix --version`", base.clone(), false));
    rows.push(row("latency", "`natfix detach`", "ms", det, "`natfix --version`", base, false));
    Ok(rows)
}

/// Which rows of a run a benchmark target takes.
type RowFilter = Box<dyn Fn(&Value) -> bool>;

fn target(group: &str, name: &str) -> Option<(&'static str, RowFilter)> {
    let delta = |v: &Value| v["delta"].as_f64().unwrap_or(f64::MAX);
    let ratio = |v: &Value| v["ratio"].as_f64().unwrap_or(0.0);
    let median = |v: &Value| v["median"].as_f64().unwrap_or(f64::MAX);
    if name == "guard xdp own: pass" || name == "guard xdp conntrack: pass" {
        return Some(("<= 15 ns over empty", Box::new(move |v| delta(v) <= 15.0)));
    }
    if name == "overlay zero: 64 B" || name == "overlay zero: 1450 B" {
        return Some(("<= 10 ns over empty", Box::new(move |v| delta(v) <= 10.0)));
    }
    if name == "overlay recompute, steady state (learned delta): 1450 B" {
        return Some(("<= 3x empty", Box::new(move |v| ratio(v) <= 3.0)));
    }
    // The flood: natfix's XDP guard per packet of receiver CPU, against the
    // seed's iptables rule and against an nftables prerouting rule.
    if group == "flood: receiver drop capacity" && name == "natfix XDP guard" {
        return Some((">= 10x iptables", Box::new(move |v| ratio(v) >= 10.0)));
    }
    if group == "flood: receiver drop capacity" && name == "natfix XDP guard against the nftables rule" {
        return Some((">= 3x nftables", Box::new(move |v| ratio(v) >= 3.0)));
    }
    // The issue's >= 97% holds for what natfix attaches by default (the XDP
    // guard; the overlay fix's nftables rule for IPv4) on the hosts natfix is
    // for (a Docker node's netfilter: both problems need conntrack and NAT),
    // and for bulk TCP through every configuration. The other small-packet
    // rows (a receiver without netfilter; the tc guard, `both`) are the
    // cost an operator pays for those choices, split into hook and program.
    let default_on_docker_node = name.starts_with("solicited UDP replies read by the application on a Docker node")
        && (name.contains("through natfix's XDP guard") || name.contains("as attached by default for IPv4"));
    // The generic-XDP row shows why `--xdp-mode auto` does not pick it.
    let legit_traffic = default_on_docker_node
        || (name.starts_with("TCP bulk stream") && !name.contains("through an empty ") && !name.contains("in generic mode"));
    // The trace's target: other traffic keeps its rate while a trace runs on a node.
    let traced_node = group == "trace" && name.starts_with("64-byte UDP read by an application on a Docker node's netfilter: natfix trace running");
    if legit_traffic || traced_node {
        return Some((">= 97% of baseline", Box::new(move |v| ratio(v) >= 0.97)));
    }
    if name.starts_with("idle RSS") || name == "`natfix agent`, 4 attachments, idle RSS" {
        return Some(("<= 20 MB", Box::new(move |v| median(v) <= 20.0)));
    }
    if name.starts_with("`natfix agent` reload changing 4") {
        return Some(("<= 200 ms", Box::new(move |v| median(v) <= 200.0)));
    }
    if name.starts_with("`natfix agent` attaching again") {
        return Some(("<= 2 s", Box::new(move |v| median(v) <= 2000.0)));
    }
    None
}

fn render(rows: &[Value], commands: &[(&str, &str)], host: &str) -> String {
    let mut s = String::from("# natfix benchmarks\n\n");
    let _ = writeln!(s, "Written by `cargo xtask bench` ({host}). Every row is compared with a baseline measured in the same run,");
    s.push_str("interleaved with it where possible; the ratio is what to read (these machines are noisy).\n");
    s.push_str("A ratio marked *paired* is the median of per-round ratios (subject and baseline back to back in each round);\n");
    s.push_str("one marked *pooled* is all subject frames / seconds over all baseline frames / seconds, with a bootstrap interval over rounds;\n");
    s.push_str("one marked *median* is the median window's rate over the baseline's, with a bootstrap interval over rounds (the pooled ratio beside it);\n");
    s.push_str("one marked *flanked* is the median over rounds of a subject window's rate over the mean of the baseline windows right before and after it, with a bootstrap interval over rounds (the pooled ratio beside it).\n\n");
    for (group, cmd) in commands {
        let _ = writeln!(s, "- {group}: `{cmd}`");
    }
    // Each group's rows together, groups in the order they first appear.
    let mut groups: Vec<&str> = Vec::new();
    for r in rows {
        let group = r["group"].as_str().unwrap_or("");
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    let mut current = "";
    for r in groups.iter().flat_map(|g| rows.iter().filter(move |r| r["group"].as_str().unwrap_or("") == *g)) {
        let group = r["group"].as_str().unwrap_or("");
        // Rows that say how they were measured get a column for it.
        let detailed = rows.iter().any(|x| x["group"] == r["group"] && x.get("detail").is_some());
        if group != current {
            current = group;
            let _ = writeln!(s, "\n## {group}\n\n| what | runs | median | min-max | baseline (median) | ratio | delta | target |{}", if detailed { " measured how |" } else { "" });
            let _ = writeln!(s, "|---|---|---|---|---|---|---|---|{}", if detailed { "---|" } else { "" });
        }
        let name = r["name"].as_str().unwrap_or("");
        if let Some(why) = r["skipped"].as_str() {
            let _ = writeln!(s, "| {name} | 0 | not measured: {why} | | | | | |{}", if detailed { " |" } else { "" });
            continue;
        }
        let unit = r["unit"].as_str().unwrap_or("");
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let fmt = |x: f64| if x.abs() >= 1000.0 { format!("{x:.0}") } else { format!("{x:.2}") };
        let verdict = target(group, name).map_or_else(String::new, |(text, ok)| format!("{text}: {}", if ok(r) { "met" } else { "**not met**" }));
        let detail = if detailed { format!(" {} |", r["detail"].as_str().unwrap_or("")) } else { String::new() };
        // A stated cost (no baseline of its own): its value, no ratio.
        if r["baseline"].as_str().is_none_or(str::is_empty) {
            let _ = writeln!(s, "| {name} | {} | {} {unit} | {}-{} | | | | {verdict} |{detail}", r["runs"], fmt(f("median")), fmt(f("min")), fmt(f("max")));
            continue;
        }
        let _ = writeln!(
            s,
            "| {name} | {} | {} {unit} | {}-{} | {} ({}) | {:.3}x{} | {} | {verdict} |{detail}",
            r["runs"], fmt(f("median")), fmt(f("min")), fmt(f("max")), r["baseline"].as_str().unwrap_or(""), fmt(f("baseline_median")), f("ratio"),
            match (r["paired"].as_bool(), r["ci95"].as_array()) {
                (Some(true), _) => " *paired*".to_owned(),
                (_, Some(ci)) => {
                    let ci = format!("95% CI {:.3}-{:.3}", ci[0].as_f64().unwrap_or(f64::NAN), ci[1].as_f64().unwrap_or(f64::NAN));
                    let estimator = r["estimator"].as_str().unwrap_or("pooled");
                    match r["pooled_ratio"].as_f64() {
                        Some(pooled) => format!(" *{estimator}*, {ci} (pooled {pooled:.3})"),
                        None => format!(" *{estimator}*, {ci}"),
                    }
                }
                _ => String::new(),
            },
            fmt(f("delta"))
        );
    }
    s
}

/// Overlay throughput in the qemu VM: natfix against the noudpcsum workaround, same boot.
fn vm_throughput() -> Result<Vec<Value>> {
    let out = std::env::temp_dir().join(format!("natfix-vm-throughput-{}.json", std::process::id()));
    let ok = Command::new(std::env::current_exe()?)
        .args(["vm", "--scenario", "esp-nat", "--mode", "throughput", "--json-out"])
        .arg(&out)
        .status()?
        .success();
    if !ok {
        bail!("the VM throughput run failed");
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let _ = std::fs::remove_file(&out);
    let series = |k: &str| v[k].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>()).unwrap_or_default();
    Ok(vec![row(
        "vm overlay",
        &format!("TCP over the encrypted overlay through 1:1 NAT, natfix --overlay-fix (kernel {}, qemu TCG)", v["kernel"].as_str().unwrap_or("?")),
        "Mbit/s",
        series("natfix_mbps"),
        "noudpcsum workaround, same boot",
        series("noudpcsum_mbps"),
        true,
    )])
}

/// How to read the rows; appended to BENCHMARKS.md.
const NOTES: &str = "
## Reading the rows

- test_run rows use the test configuration where the kernel cannot help: `overlay *` rows skip
  the xfrm secpath gate (BPF_PROG_TEST_RUN cannot attach a secpath); the gate's own cost is the
  `secpath gate (cleartext)` row. Guard rows run with the events budget on (20/s per CPU), as attached.
- `guard * own: pass` hits the per-CPU flow cache (the steady state of a flow); the flow table
  itself is asked at most every 125 ms per flow and CPU. `drop` targets a port that has a flow
  (the table is looked up); `drop, port without flows` is decided by the port map.
- `overlay recompute, steady state` applies the delta learned for the address pair; `full sum`
  is what the first datagram of a pair costs on each CPU, and one datagram a second after that.
- `overlay zero` rows are option-less IPv4, which the program decides in one pass and hands to
  its dedicated zeroing writer; IP options and IPv6 take the general parser and the cb-directed
  writer. Rewrite events are sampled (first and every 64th per CPU) before the budget is asked.
- `overlay zero, ESP-offloading NIC` is the writer with `bpf_csum_update()`, which natfix only
  uses on interfaces with `esp-hw-offload` (software decryption leaves `CHECKSUM_NONE`).
- `solicited UDP replies` rows measure legitimate traffic where the guard does the most work per
  byte: 64-byte replies of a flow the application opened, every one through the guard's pass path,
  read by the application. The generator and the receive softirq share CPU 0, so a row's ratio is
  the share of one core's small-packet rate natfix leaves. natfix's program and the baseline are
  swapped on the live veth between back-to-back windows of 1,000,000 frames (about 0.5-1 s; XDP:
  one link, `bpf_link_update`; tc: tcx attach/detach), and every configuration's window runs
  between two baseline windows (B s1 B s2 ... B sn B, the subjects' order reversed every other
  round and its start rotated). The ratio is *flanked*: per round, the subject window's rate over
  the mean of the two baseline windows beside it; the row gives the median over rounds with a 95%
  bootstrap interval, and the pooled ratio (all frames / all seconds) beside it. Why: this
  machine's neighbours slow it in spells of a few seconds (every configuration's windows, the
  baseline's included, drop from about 1.4-2.0 to 0.8-1.2 million datagrams/s and back), shorter
  than a round of seven configurations, so rates pooled over rounds (this file's estimator until
  session 10) moved by several percent from run to run with the spells each configuration
  happened to catch. Each generator burst cost 15-30 ms of wall time beyond its frames (100
  frames took 15 ms, 1,000,000 took 430 ms), the same in every configuration, until the
  generator's program stayed in the kernel's XDP dispatcher (see `flood`): it pulled ratios
  towards 1 by under 5% of the difference at this window size (files before session 8 used
  50,000-frame windows, where it hid about 40%).
  The tc rows include turning the tc ingress hook (and for the overlay fix the netfilter hook) on
  at all: they run seven configurations (no tc program, an empty tc program, natfix's tc guard,
  natfix's overlay fix with both mechanisms, its tc program alone, its nftables rule alone (the
  default for IPv4), and an empty nftables chain at the rule's hook) so that each hook's own share and natfix's share on
  top of it are rows of their own. Every packet on the underlay passes the overlay fix: for IPv4
  by default its nftables prerouting rule alone (decrypted packets pass prerouting on every path);
  with both mechanisms (IPv6, --csum recompute) also its tc program, which sees decrypted packets
  on the ESP GRO path. These frames are not VXLAN, so they take the program's parse-and-count path
  and fail the rule's first match.
- The `on a Docker node` rows repeat the rows where the rest of the path costs more per packet, as
  on the hosts natfix is for: the receiver carries a Docker node's netfilter
  (`tests/benches/data/docker-node.nft`: conntrack and Docker's NAT chains; the port-stealing
  problem needs conntrack and NAT, and Docker's encrypted overlay comes with Docker's rules). Its
  netfilter hook is on already, so the overlay fix's chain adds only itself. They run the XDP
  guard against its baseline, and the tc configurations (no program, tc guard, overlay fix with
  both mechanisms, its nftables rule alone as attached by default for IPv4, an empty nftables chain) with 64 B frames and with frames of
  the overlay's own size (1,400 B), 60 rounds each; the tc configurations run once more with
  1,400 B frames on the bare receiver (30 rounds, as the bare 64 B rows).
- Which rows carry the issue's `>= 97% of baseline`: what natfix attaches by default (the XDP
  guard, and the overlay fix's nftables rule alone for IPv4) on a Docker node, and bulk TCP through
  every configuration. The other small-packet rows carry no target and are read as costs: the
  receiver without netfilter is the worst case for any per-packet cost but not a host natfix is
  for (both problems need conntrack and NAT), and there the hooks alone (an empty tc program, an
  empty nftables chain) take 2-5% of one core's small-packet rate before natfix runs anything;
  the tc guard (`--guard-hook tc`, for devices where XDP is not wanted) and `--csum-backend both`
  (IPv6, `--csum recompute`) are choices whose small-packet cost these rows state.
- `TCP bulk stream` rows are the throughput iperf3 measures, in the same swapped-window design:
  one TCP connection between the namespaces (sender and receive softirq on CPU 0, the reading
  application on CPU 1), bytes read in 0.5 s windows, natfix's programs swapped between windows
  (natfix's windows include the guard's egress flow learner, which the ACKs pass). veth hands the
  sender's TSO segments over whole (up to 64 KiB), as GRO hands a NIC's over, so per-packet costs
  spread over many bytes. The tc rows run with no XDP program on the veth (native XDP on veth
  gives up that aggregation: about 9 Gbit/s instead of 50), the XDP row against the counting XDP
  program. Every configuration, the baseline included, has windows that a neighbour on this
  shared machine slows by up to 40%; the ratio is flanked, as above, with the pooled ratio beside
  it. These packets are out of the guard's scope (TCP) and not VXLAN. The row of the XDP guard in
  generic mode (`--xdp-mode generic`) carries no target: it shows why `--xdp-mode auto` falls back
  to tc ingress rather than to generic XDP where the driver has no native XDP. Generic XDP needs
  linear skbs with XDP headroom, so it copies veth's whole TSO segments; on a NIC it also turns GRO
  off on the device (`netif_elide_gro`).
- `live cost` rows are each program's own time per run on the TCP stream's packets and on the
  solicited 64 B UDP replies, as the kernel counts it with `kernel.bpf_stats_enabled`
  (`run_time_ns` / `run_cnt` from the program's fdinfo), in windows of their own after the
  throughput rounds (10 rounds; the stats' clock reads on every run would slow the throughput
  windows). Live they come out several times the test_run rows' deltas. The likely reason is the
  cache: test_run runs one packet in a loop with everything hot, while live the rest of the stack
  runs between two packets. This VM exposes no hardware counters to confirm it. They leave out the hook itself: a natfix program
  against an empty one on the same hook is natfix's own per-packet share, which the throughput
  ratios cannot resolve. (The tc guard and the flow learner pulled every TCP segment's head into
  the linear area until this run: about 300 ns per segment, measured the same way.)
- The host line says which CPU ran the rows and its `spec_rstack_overflow` state. On AMD hosts
  where it reads `Vulnerable: Safe RET`, every kernel function return goes through a thunk: each
  helper call, map-lookup call or tail call costs several nanoseconds more, the empty programs
  cost 30-40 ns instead of 7-9, and the tc hook and the nftables chain cost several percent of
  small-packet rate (earlier runs of this file). The data plane avoids calls on its hot paths
  (inlined jiffies and array lookups, the flow cache) for that reason. Ratio targets against an
  empty program (`<= 3x empty`) are stricter on an unmitigated host, where the empty program is
  a few nanoseconds: read the delta beside them.
- `flood` rows are measured at the receiver. The receiving veth's NAPI runs threaded
  (`/sys/class/net/fr0/threaded`), its `napi/fr0-N` kthread pinned to CPU 1 at nice -20; the
  generator (BPF_PROG_TEST_RUN live frames, XDP_TX out of the sending veth) runs SCHED_FIFO on
  CPU 0, so the receive path has a CPU of its own and the generator out-runs it. The receiver's
  CPU time is the kthread's (`/proc/<pid>/schedstat`): the XDP program, the skb, GRO, the IP stack
  and netfilter all run there. *Drop capacity* is the frames the configuration counted per second
  of that CPU time (what one receiving CPU disposes of at saturation); *CPU per packet* its
  inverse. Each configuration runs once per round (5 rounds, 2 s windows, a fresh rig each), and
  its ratio is the median of per-round ratios against the seed's iptables rule. The `measured how`
  column says whether the receiver set the rate in every window: its kthread on the CPU or
  runnable nearly all the window (>= 90%) while the full veth ring refused frames; a window that
  was not says so (its capacity then comes from its CPU time per packet, which a receiver that
  sleeps between frames makes larger). Configurations without an XDP program run the veth with
  GRO on, as a NIC's receive path, which also gives veth NAPI. natfix's guards run with the
  flooded port holding a flow of another peer, so every packet asks the flow table (the costlier
  drop path); the row `flooded port without flows` is the port-map drop. xdp-filter (Debian's
  xdp-tools, a stateless XDP port filter) is loaded with its UDP feature set and the flooded ports
  as destination ports, in a mount namespace with a bpffs of its own (its pins are host-global).
  What the rig adds to every XDP row: the frames' pages belong to the generator's page pool, so
  the receiver returns each page across CPUs into that pool's ring (a spinlock the generator also
  takes for the frames the full ring refused): `perf` put 20-30% of the receiver's samples there
  (`NATFIX_FLOOD_PERF=<dir>` records the receiver's CPU per window). A NIC driver recycles its pages
  on its own CPU. The generator's program stays attached (native XDP) to a spare veth of its
  namespace: test_run then finds it in the kernel's XDP dispatcher and skips the two RCU grace
  periods it otherwise waits per burst.
- `flood: conntrack under pressure` is the same flood from 100,000 distinct flows (50,000 source
  ports × 2 destination ports: `benches/data/flood_gen.bpf.c` rewrites each frame's ports) on a
  Docker node's netfilter (conntrack on). With no filter every flow gets a confirmed conntrack
  entry; the iptables rule lets conntrack allocate an entry for each packet in prerouting and
  frees it, unconfirmed, when INPUT drops the packet (the table stays empty, the allocation is
  paid per packet); natfix's XDP guard drops before the skb exists. The row names give the
  receiver namespace's `nf_conntrack_count` after each window.
- `throughput at the receiver` rows (part `split`) measure the small-packet tc rows as the flood
  is measured: the receive path on CPU 1, each configuration's window between two baseline
  windows, packets per second of receiver CPU against the baseline beside it (the ratio a
  receiver whose CPU is the bottleneck would see), and in `measured how` the difference in ns per
  packet split into the hook's share (an empty tc program; an empty nftables chain at the rule's
  hook) and natfix's programs' share on top of it. The frames end at a bound socket whose buffer
  is full (CPU 1 is the receiver's, no reader runs): the path measured ends at the socket's enqueue.
- `scaling` rows: the guard's cost per packet (`test_run`, `repeat` 1, each packet another flow of
  the table, against an empty XDP program on the same frames) as the own table holds 10^2-10^6
  flows (`--flow-table-size` raised where 65,536 does not hold them) and as conntrack holds
  10^3-10^6 entries (made by outgoing datagrams of a raw socket; `nf_conntrack_max` is raised for
  the run and restored; the hash's buckets are the host's). Single runs are cold where a
  `repeat` loop is hot: they include the cache misses of a packet that meets the program's code
  and maps after other work, and read several times the loop's numbers. Past the default size
  (65,536) the LRU table evicts the flows used longest ago: live flows whose replies the guard
  then drops as unsolicited. The userspace rows run the release binary: attach/detach latency of
  one more attachment with 1, 16 and 64 on the host (each on its own veth, pinned), `status
  --json` and a foreground attach's RSS; the conntrack sync's CPU at 10^4 new conntrack entries
  per second (a raw socket in the attachment's namespace) against `conntrack -E` reading the
  same events.
- `trace` rows: 64-byte UDP read by an application while `natfix trace` runs in the receiver's
  namespace with a filter that matches none of it, each window between two baseline windows
  (flanked). The trace's cost splits into its tracepoint programs and its nftables marking table,
  and the table's into rows of their own: an empty chain at its hook (the hook), its rules with
  `counter` in place of `meta nftrace set 1` (the rules), and one rule that never matches but
  holds `meta nftrace set 1`. That statement is the only way to mark packets for nftables
  tracing, and its presence anywhere turns on the kernel's trace switch (a static key), after
  which every chain of the host, Docker's included, checks each packet for tracing: most of the
  table's cost, which no rule layout avoids. The target (`>= 97%`) is held on a Docker node.
  `time per traced packet` (no baseline) is what a traced packet costs beyond an untraced one:
  the trace messages nftables and the tracepoints send for it.
";

/// Every benchmark's rows.
fn run_all(args: &BenchArgs) -> Result<Vec<Value>> {
    setup()?;
    cargo(&["build", "--release", "-p", "natfix"])?;
    // test_run rows take well under a second per run: three times the runs
    // narrow their medians, which sit within a few ns of their targets.
    let test_run_runs = (args.runs * 3).to_string();
    let part = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    let mut rows = Vec::new();
    if part("datapath") {
        rows.extend(cargo_bench("datapath", &[("NATFIX_BENCH_RUNS", test_run_runs)])?);
    }
    if part("flood") {
        rows.extend(cargo_bench("flood", &[("NATFIX_BENCH_RUNS", args.runs.min(5).to_string())])?);
    }
    if part("scaling") {
        rows.extend(cargo_bench("scaling", &[("NATFIX_BENCH_RUNS", args.runs.min(5).to_string())])?);
    }
    if part("trace") {
        rows.extend(cargo_bench("trace", &[("NATFIX_TRACE_ROUNDS", (args.runs * 2).min(20).to_string())])?);
    }
    if part("system") {
        rows.extend(system_benches(args.runs)?);
    }
    if part("agent") {
        rows.extend(crate::bench_agent::agent_benches(args.runs, row)?);
    }
    if part("vm") {
        rows.extend(vm_throughput()?);
    }
    Ok(rows)
}

/// A part run on its own, merged into the last run's rows: a row of the same
/// group and name is replaced in place, a new row goes after its group's last.
fn merge_rows(old: Vec<Value>, fresh: Vec<Value>) -> Vec<Value> {
    let key = |r: &Value| (r["group"].to_string(), r["name"].to_string());
    let mut rows = old;
    for r in fresh {
        if let Some(i) = rows.iter().position(|o| key(o) == key(&r)) {
            rows[i] = r;
        } else {
            let at = rows.iter().rposition(|o| o["group"] == r["group"]).map_or(rows.len(), |i| i + 1);
            rows.insert(at, r);
        }
    }
    rows
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let read_rows = |file: &std::path::Path| -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    };
    let rows = if let Some(file) = &args.rows {
        read_rows(file)?
    } else {
        let mut rows = run_all(args)?;
        // The raw rows, so that the document can be written again (`--rows`) without rerunning.
        let raw = workspace().join("target/bench-rows.jsonl");
        if !args.only.is_empty() && raw.exists() {
            rows = merge_rows(read_rows(&raw)?, rows);
        }
        let lines: Vec<String> = rows.iter().map(Value::to_string).collect();
        std::fs::write(&raw, lines.join("\n") + "\n").with_context(|| format!("cannot write {}", raw.display()))?;
        rows
    };
    // What the rows depend on most besides the code: the CPU, and whether
    // every kernel return pays a speculation-mitigation thunk.
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())))
        .unwrap_or_else(|| "unknown CPU".into());
    let srso = std::fs::read_to_string("/sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow").unwrap_or_else(|_| "unknown".into());
    let host = format!(
        "{} CPUs ({cpu}; spec_rstack_overflow: {}), kernel {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        srso.trim(),
        sh(&["uname", "-r"]).unwrap_or_default().trim()
    );
    let commands = [
        ("test_run", "cargo bench -p natfix-testkit --bench datapath (BPF_PROG_TEST_RUN, 500,000 repeats per run)"),
        ("flood", "cargo bench -p natfix-testkit --bench flood (NATFIX_FLOOD_PART=flood,pressure; XDP live-frames generator on CPU 0 (SCHED_FIFO), the receiving veth's threaded-NAPI kthread on CPU 1; 2 s windows, every configuration once per round)"),
        ("throughput at the receiver", "cargo bench -p natfix-testkit --bench flood (NATFIX_FLOOD_PART=split; the flood's receiver/generator split; 2,000,000-frame bursts, each configuration's window between two baseline windows, 10 rounds per frame size and host)"),
        ("scaling", "cargo bench -p natfix-testkit --bench scaling (NATFIX_SCALING_PART=own,conntrack,lru,userspace; test_run with a different flow each packet; the release binary in namespaces)"),
        ("throughput, solicited UDP", "cargo bench -p natfix-testkit --bench flood (same generator; 1,000,000-frame windows, each between two baseline windows: 30 rounds on a bare receiver, 60 each on a Docker node's netfilter with 64 B and 1,400 B frames, 30 on the bare receiver with 1,400 B frames; programs swapped between windows)"),
        ("throughput, TCP bulk", "cargo bench -p natfix-testkit --bench flood (one TCP connection; 60 rounds of 0.5 s windows, each configuration's between two baseline windows, programs swapped between windows)"),
        ("trace", "cargo bench -p natfix-testkit --bench trace (the flood's XDP live-frames generator; 1,000,000-frame windows, each between two baseline windows; NATFIX_TRACE_ROUNDS rounds per host)"),
        ("memory, latency", "cargo xtask bench (/proc/PID/status, wall clock of the release binary)"),
        ("vm overlay", "cargo xtask vm --scenario esp-nat --mode throughput (iperf3 3 s, 3 alternating rounds)"),
        ("all of it", "cargo xtask bench"),
    ];
    let mut text = render(&rows, &commands, &host);
    text.push_str(NOTES);
    let out = Path::new(&workspace()).join(&args.out);
    std::fs::write(&out, &text).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_part_run_alone_replaces_its_rows_and_keeps_the_rest() {
        let row = |g: &str, n: &str, v: u32| json!({"group": g, "name": n, "median": v});
        let old = vec![row("memory", "attach", 1), row("memory", "agent", 2), row("trace", "a", 3), row("vm", "x", 4)];
        let fresh = vec![row("trace", "a", 30), row("trace", "b", 31), row("memory", "attach", 10), row("new", "n", 5)];
        let merged = super::merge_rows(old, fresh);
        let want = vec![
            row("memory", "attach", 10),
            row("memory", "agent", 2),
            row("trace", "a", 30),
            row("trace", "b", 31),
            row("vm", "x", 4),
            row("new", "n", 5),
        ];
        assert_eq!(merged, want);
    }
}
