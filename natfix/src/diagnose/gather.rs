//! Reads the host into [`Facts`]: kernel features, and per network
//! namespace VXLAN devices, `/proc/net/snmp`, xfrm states, conntrack, NAT
//! rules and GRO, plus drop reasons over the sample window.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    facts::{AttachmentFacts, DropSample, Facts, KernelFacts, ModuleState, NsFacts},
    parse::{NatRules, VxlanDev, parse_proc_udp, parse_route_dev, parse_snmp_udp, parse_vxlan_links, parse_xfrm_states},
    tracefs::DropTracer,
    guard::analyze_conntrack,
};
use crate::{
    config::DOCKER_REQID,
    sys::netns::{DOCKER_NETNS_DIR, Netns},
};

fn cmd_output(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cmd[0]))?;
    if !out.status.success() {
        // One line: evidence is printed line by line.
        let err = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
        return Err(format!("`{}` failed: {err}", cmd.join(" ")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_csum_errors() -> Result<u64, String> {
    // thread-self: /proc/net follows the main thread's namespace, not this thread's.
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp")
        .map_err(|e| format!("/proc/thread-self/net/snmp: {e}"))?;
    parse_snmp_udp(&text)
        .get("InCsumErrors")
        .copied()
        .ok_or_else(|| "no Udp InCsumErrors in /proc/net/snmp".into())
}

fn read_vxlan() -> Result<Vec<VxlanDev>, String> {
    let json = cmd_output(&["ip", "-d", "-j", "link", "show", "type", "vxlan"])?;
    parse_vxlan_links(&json).map_err(|e| format!("{e:#}"))
}

/// GRO per interface, as the overlay fix reads it.
fn gro_state(iface: &str) -> std::io::Result<bool> {
    crate::sys::ethtool::gro_enabled(iface)
}

fn local_addrs() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|ifa| {
                let a = ifa.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

fn read_nat_rules() -> NatRules {
    crate::nat_rules::read_here()
}

/// The target namespace's facts, apart from the end of the sample window.
fn gather_target(label: String) -> NsFacts {
    let mut n = NsFacts::empty(label);
    n.vxlan = read_vxlan();
    n.xfrm = cmd_output(&["ip", "xfrm", "state"]).map(|t| parse_xfrm_states(&t));
    n.addrs = local_addrs();
    n.conntrack = crate::conntrack::dump_udp().map_err(|e| format!("{e:#}"));
    n.nat = read_nat_rules();
    if let Ok(ifs) = nix::net::if_::if_nameindex() {
        for i in &ifs {
            let name = i.name().to_string_lossy().into_owned();
            if name != "lo" {
                let g = gro_state(&name).map_err(|e| e.to_string());
                n.gro.push((name, g));
            }
        }
    }
    for file in ["/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"] {
        if let Ok(t) = std::fs::read_to_string(file) {
            n.udp_listeners.extend(parse_proc_udp(&t));
        }
    }
    // Routes towards the peers the fix commands name an interface for.
    let mut remotes: BTreeSet<IpAddr> = BTreeSet::new();
    if let Ok(entries) = &n.conntrack {
        remotes.extend(
            analyze_conntrack(entries, &n.addrs)
                .moved
                .iter()
                .map(|m| m.flow.reply.src),
        );
    }
    if let Ok(states) = &n.xfrm {
        for s in states.iter().filter(|s| s.reqid == DOCKER_REQID) {
            remotes.extend([&s.src, &s.dst].into_iter().filter_map(|a| a.parse::<IpAddr>().ok()));
        }
    }
    for r in remotes.into_iter().filter(|r| !n.addrs.contains(r)).take(16) {
        if let Some(dev) = cmd_output(&["ip", "-j", "route", "get", &r.to_string()])
            .ok()
            .and_then(|j| parse_route_dev(&j))
        {
            n.routes.insert(r, dev);
        }
    }
    n
}

/// Runs `f` in `ns`, or right here for natfix's own namespace (no setns,
/// so an unprivileged user still gets the checks that need no privileges).
fn in_ns<T: Send + 'static>(ns: Option<&Netns>, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match ns {
        Some(ns) => ns.run(f),
        None => f(),
    }
}

fn esp_offload_state(release: &str) -> ModuleState {
    if Path::new("/sys/module/esp4_offload").exists() {
        return ModuleState::Loaded;
    }
    if let Ok(out) = cmd_output(&["modinfo", "-F", "filename", "esp4_offload"]) {
        return ModuleState::Available(format!("modinfo: {}", out.trim()));
    }
    let dir = PathBuf::from("/lib/modules").join(release);
    if let Ok(builtin) = std::fs::read_to_string(dir.join("modules.builtin"))
        && builtin.lines().any(|l| l.ends_with("/esp4_offload.ko"))
    {
        return ModuleState::Available(format!("built in ({}/modules.builtin)", dir.display()));
    }
    if let Ok(dep) = std::fs::read_to_string(dir.join("modules.dep"))
        && let Some(line) = dep.lines().find(|l| l.contains("/esp4_offload.ko"))
    {
        return ModuleState::Available(format!("{}/{}", dir.display(), line.split(':').next().unwrap_or("")));
    }
    ModuleState::Missing(format!(
        "not in /sys/module, `modinfo esp4_offload` fails, not under {}",
        dir.display()
    ))
}

fn kernel_facts() -> KernelFacts {
    let release =
        nix::sys::utsname::uname().map_or_else(|_| "unknown".into(), |u| u.release().to_string_lossy().into_owned());
    KernelFacts {
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        tcx: crate::sys::features::has_tcx(),
        xdp: aya::sys::is_program_supported(aya::programs::ProgramType::Xdp).map_err(|e| e.to_string()),
        ct_kfuncs: crate::sys::features::ct_kfuncs(),
        esp_offload: esp_offload_state(&release),
        release,
    }
}

/// Docker's namespaces (files under /var/run/docker/netns), except `skip` (by inode).
fn docker_namespaces(skip: u64) -> Vec<Netns> {
    let Ok(dir) = std::fs::read_dir(DOCKER_NETNS_DIR) else {
        return Vec::new();
    };
    let mut out: Vec<Netns> = dir
        .filter_map(Result::ok)
        .filter_map(|e| Netns::resolve(Some(e.path().to_str()?)).ok())
        .filter(|n| n.inode != skip)
        .collect();
    out.sort_by(|a, b| a.spec.cmp(&b.spec));
    out
}

/// natfix's attachments in namespace `inode`, each checked against the kernel.
fn natfix_attachments(inode: u64) -> Result<Vec<AttachmentFacts>, String> {
    let all = crate::pins::attachments().map_err(|e| format!("{e:#}"))?;
    Ok(all
        .into_iter()
        .filter(|(_, m)| m.netns_inode == inode)
        .map(|(dir, m)| {
            let s = crate::observe::state::check(&m);
            AttachmentFacts {
                flow_table: crate::observe::flow_table::read(&dir).map_err(|e| format!("{e:#}")),
                iface: m.iface,
                state: s.state.name().to_owned(),
                effective: s.state.is_effective(),
                problems: s.problems,
                netns: m.netns,
                guard: m.guard.is_some(),
            }
        })
        .collect())
}

/// Reads the host into [`Facts`]; takes `--sample` seconds.
pub fn gather(netns: Option<&str>, sample: Duration) -> Result<Facts> {
    let target_ns = match netns {
        Some(spec) => Some(Netns::resolve(Some(spec))?),
        None => None,
    };
    let own_inode = crate::sys::netns::current_inode()?;
    let target_inode = target_ns.as_ref().map_or(own_inode, |n| n.inode);
    let label = netns.unwrap_or("self").to_owned();

    let kernel = kernel_facts();
    let mut target = in_ns(target_ns.as_ref(), {
        let label = label.clone();
        move || Ok(gather_target(label))
    })?;
    let mut docker: Vec<(Netns, NsFacts)> = Vec::new();
    let mut docker_errors = Vec::new();
    for ns in docker_namespaces(target_inode) {
        let label = ns.spec.clone();
        match ns.run(move || {
            let mut n = NsFacts::empty(label);
            n.vxlan = read_vxlan();
            Ok(n)
        }) {
            Ok(n) => docker.push((ns, n)),
            Err(e) => docker_errors.push(format!("{}: {e:#}", ns.spec)),
        }
    }

    // The sample window: counters at both ends, drop tracing in between.
    let first = |ns: Option<&Netns>| in_ns(ns, || Ok((read_csum_errors(), Instant::now())));
    let t0 = first(target_ns.as_ref())?;
    let d0: Vec<_> = docker.iter().map(|(ns, _)| first(Some(ns)).ok()).collect();
    let tracer = DropTracer::start();
    std::thread::sleep(sample);
    let drops = match tracer {
        Ok(t) => t.finish(),
        Err(why) => DropSample::NotChecked(why),
    };
    let end = |n: &mut NsFacts, start: (Result<u64, String>, Instant), ns: Option<&Netns>| {
        let (after, t1) = match first(ns) {
            Ok(v) => v,
            Err(e) => (Err(format!("{e:#}")), Instant::now()),
        };
        n.window = t1.duration_since(start.1);
        n.csum_errors = match (start.0, after) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
    };
    end(&mut target, t0, target_ns.as_ref());
    for ((ns, n), start) in docker.iter_mut().zip(d0) {
        if let Some(start) = start {
            end(n, start, Some(ns));
        }
    }
    let mut docker: Vec<NsFacts> = docker.into_iter().map(|(_, n)| n).collect();
    if !docker_errors.is_empty() {
        let mut n = NsFacts::empty(DOCKER_NETNS_DIR.into());
        n.vxlan = Err(format!("cannot inspect: {}", docker_errors.join("; ")));
        docker.push(n);
    }
    Ok(Facts {
        netns_spec: netns.map(str::to_owned),
        kernel,
        target,
        docker,
        drops,
        attachments: natfix_attachments(target_inode),
    })
}

