//! The tracepoint side of a trace (`trace_tp.bpf.c`): BTF tracepoint
//! programs on `skb:kfree_skb` (drops, with the kernel's reason and the
//! freeing function), `net:net_dev_start_xmit` (sent out of a device) and
//! `sock:sk_data_ready` (queued to a socket; Linux >= 6.3). They see every
//! namespace at once and are detached when this process exits: their links
//! are file descriptors only it holds.
//!
//! Drop reason numbers differ between kernels (`enum skb_drop_reason` is not
//! uAPI), so their names are read from the running kernel's BTF.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, BorrowedFd},
};

use anyhow::{Context, Result};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf},
    programs::BtfTracePoint,
};
use natfix_ebpf::trace::{self as abi, TraceEvent, TraceFilter, TraceTuple};

use super::{filter::Filter, tuple::Tuple};
use crate::error::UserError;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The loaded, attached programs.
pub struct Probes {
    /// Holds the programs and their links (detached on drop).
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    flows: BpfHashMap<MapData, TraceTuple, u8>,
    /// `sock:sk_data_ready` was attached (deliveries are seen).
    pub deliveries: bool,
    /// Program ids, for their run time (`bpf_stats`).
    pub prog_ids: Vec<(String, u32)>,
}

fn unsupported(what: String) -> anyhow::Error {
    UserError::Unsupported(what).into()
}

impl Probes {
    /// Loads and attaches the programs, their filter set to `filter`.
    pub fn attach(filter: &Filter) -> Result<Self> {
        let btf = Btf::from_sys_fs().map_err(|e| {
            unsupported(format!(
                "the kernel has no BTF ({VMLINUX_BTF}: {e}): natfix trace's tracepoint programs (tp_btf) need CONFIG_DEBUG_INFO_BTF"
            ))
        })?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .load(abi::OBJECT)
            .map_err(|e| unsupported(format!("the kernel refused natfix trace's BPF object: {e}")))?;
        let mut rules = TraceFilter::default();
        for (slot, r) in rules.rules.iter_mut().zip(filter.bpf_rules()) {
            *slot = r;
            rules.nr_rules += 1;
        }
        let mut map: Array<&mut MapData, TraceFilter> =
            Array::try_from(ebpf.map_mut(abi::FILTER_MAP).context("trace filter map missing")?)?;
        map.set(0, rules, 0).context("cannot set the trace filter")?;
        let mut deliveries = false;
        let mut prog_ids = Vec::new();
        for (name, tracepoint) in abi::PROGRAMS {
            let prog: &mut BtfTracePoint = ebpf.program_mut(name).context("trace program missing")?.try_into()?;
            let loaded = prog.load(tracepoint, &btf).and_then(|()| prog.attach().map(|_| ()));
            match loaded {
                Ok(()) => {
                    deliveries |= tracepoint == "sk_data_ready";
                    if let Ok(info) = prog.info() {
                        prog_ids.push((tracepoint.to_owned(), info.id()));
                    }
                }
                // Linux < 6.3: deliveries are inferred (no drop after the last hop).
                Err(e) if tracepoint == "sk_data_ready" => {
                    tracing::info!("no sock:sk_data_ready tracepoint ({e}): socket deliveries are inferred");
                }
                Err(e) => {
                    return Err(unsupported(format!(
                        "the kernel refused a BPF tracepoint program on {tracepoint} (tp_btf): {e:#}"
                    )));
                }
            }
        }
        let ring = RingBuf::try_from(ebpf.take_map(abi::EVENTS_MAP).context("trace ring missing")?)?;
        let flows = BpfHashMap::try_from(ebpf.take_map(abi::FLOWS_MAP).context("trace flows map missing")?)?;
        Ok(Self { _ebpf: ebpf, ring, flows, deliveries, prog_ids })
    }

    /// Drops of these exact tuples are reported too (NAT'd forms of a flow).
    pub fn add_flows(&mut self, tuples: &[Tuple]) {
        for t in tuples {
            // A full map only loses drop reports of unmarked packets.
            let _ = self.flows.insert(t.to_bpf(), 1, 0);
        }
    }

    /// Every event waiting in the ring.
    pub fn drain(&mut self) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            out.extend(TraceEvent::from_bytes(&item));
        }
        out
    }
}

impl AsFd for Probes {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// `enum skb_drop_reason` of the running kernel: value -> name without
/// `SKB_DROP_REASON_`. Empty when its BTF cannot be read.
#[must_use]
pub fn drop_reason_names() -> BTreeMap<u32, String> {
    std::fs::read(VMLINUX_BTF).map(|b| parse_drop_reasons(&b)).unwrap_or_default()
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// Bytes of kind-specific data after a 12-byte `btf_type`.
fn btf_extra(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        1 | 14 | 17 => 4,              // INT, VAR, DECL_TAG
        3 => 12,                       // ARRAY
        4 | 5 | 15 | 19 => 12 * vlen,  // STRUCT, UNION, DATASEC, ENUM64
        6 | 13 => 8 * vlen,            // ENUM, FUNC_PROTO
        2 | 7..=12 | 16 | 18 => 0,     // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        _ => return None,
    })
}

/// Finds `enum skb_drop_reason` in raw (little-endian) BTF by walking its
/// types: aya-obj keeps its type table private.
#[must_use]
pub fn parse_drop_reasons(btf: &[u8]) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let header = || -> Option<(usize, usize, usize)> {
        if u16::from_le_bytes([*btf.first()?, *btf.get(1)?]) != 0xeb9f {
            return None;
        }
        let hdr = u32_at(btf, 4)? as usize;
        let types = hdr.checked_add(u32_at(btf, 8)? as usize)?;
        let end = types.checked_add(u32_at(btf, 12)? as usize)?;
        Some((types, end, hdr.checked_add(u32_at(btf, 16)? as usize)?))
    };
    let Some((mut at, end, strs)) = header() else { return out };
    let name = |off: u32| -> Option<&str> {
        let s = btf.get(strs.checked_add(off as usize)?..)?;
        std::str::from_utf8(&s[..s.iter().position(|&c| c == 0)?]).ok()
    };
    while at + 12 <= end {
        let (Some(name_off), Some(info)) = (u32_at(btf, at), u32_at(btf, at + 4)) else { break };
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let Some(extra) = btf_extra(kind, vlen) else { break };
        if (kind == 6 || kind == 19) && name(name_off) == Some("skb_drop_reason") {
            let step = if kind == 6 { 8 } else { 12 };
            for i in 0..vlen {
                let v = at + 12 + i * step;
                if let (Some(n), Some(value)) = (u32_at(btf, v).and_then(name), u32_at(btf, v + 4)) {
                    out.insert(value, n.strip_prefix("SKB_DROP_REASON_").unwrap_or(n).to_owned());
                }
            }
            break;
        }
        at += 12 + extra;
    }
    out
}

/// Kernel text symbols (`/proc/kallsyms`), to name the function a drop's
/// `location` is in. Without root (or with `kptr_restrict` 2) the addresses
/// are zero and locations print raw.
#[derive(Debug, Default)]
pub struct Kallsyms {
    syms: Vec<(u64, String)>,
}

impl Kallsyms {
    #[must_use]
    pub fn load() -> Self {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Self::parse(&text)
    }

    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                (addr != 0 && matches!(kind, "t" | "T" | "w" | "W")).then(|| (addr, name.to_owned()))
            })
            .collect();
        syms.sort();
        Self { syms }
    }

    /// `function+0xoff`, or the raw address.
    #[must_use]
    pub fn symbolize(&self, addr: u64) -> String {
        match self.syms.partition_point(|(a, _)| *a <= addr) {
            0 => format!("{addr:#x}"),
            i => format!("{}+{:#x}", self.syms[i - 1].1, addr - self.syms[i - 1].0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with an INT, then `enum skb_drop_reason { NOT_SPECIFIED = 2, UDP_CSUM = 11 }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0skb_drop_reason\0SKB_DROP_REASON_NOT_SPECIFIED\0SKB_DROP_REASON_UDP_CSUM\0";
        let mut types = Vec::new();
        for w in [1u32, 1 << 24, 4, 32] {
            types.extend_from_slice(&w.to_le_bytes()); // INT "int", size 4, encoding word
        }
        for w in [5u32, (6 << 24) | 2, 4, 21, 2, 51, 11] {
            types.extend_from_slice(&w.to_le_bytes()); // ENUM, 2 values
        }
        let mut b = Vec::new();
        b.extend_from_slice(&0xeb9fu16.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, u32::try_from(types.len()).unwrap(), u32::try_from(types.len()).unwrap(), u32::try_from(strings.len()).unwrap()] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&types);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn drop_reasons_come_from_btf() {
        let names = parse_drop_reasons(&blob());
        assert_eq!(names.get(&2).map(String::as_str), Some("NOT_SPECIFIED"));
        assert_eq!(names.get(&11).map(String::as_str), Some("UDP_CSUM"));
        // Truncated or garbled input gives what it can, never a panic.
        let b = blob();
        for cut in 0..b.len() {
            let _ = parse_drop_reasons(&b[..cut]);
        }
    }

    #[test]
    fn the_running_kernels_reasons_are_found() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            return; // nothing to read here; the blob test above covers the walk
        }
        let names = drop_reason_names();
        assert!(names.values().any(|n| n == "NO_SOCKET"), "{names:?}");
        assert!(names.values().any(|n| n == "NETFILTER_DROP"));
    }

    /// Marked loopback UDP in a fresh namespace: sent out of lo, then
    /// dropped for want of a socket, then (with one) queued to it.
    #[test]
    #[ignore = "needs root: cargo xtask test"]
    fn the_programs_see_a_marked_packet_leave_drop_and_arrive() {
        let filter = Filter::parse("udp and port 47001").unwrap();
        let mut probes = Probes::attach(&filter).unwrap();
        let inode = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let run = |args: &[&str]| assert!(std::process::Command::new(args[0]).args(&args[1..]).status().unwrap().success());
            run(&["ip", "link", "set", "lo", "up"]);
            run(&["nft", "add table inet t; add chain inet t o { type filter hook output priority -350; }; add rule inet t o udp dport 47001 meta nftrace set 1"]);
            let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.send_to(b"x", "127.0.0.1:47001").unwrap();
            let rx = std::net::UdpSocket::bind("127.0.0.1:47001").unwrap();
            tx.send_to(b"y", "127.0.0.1:47001").unwrap();
            let mut buf = [0u8; 4];
            rx.recv(&mut buf).unwrap();
            crate::sys::netns::current_inode().unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let reasons = drop_reason_names();
        let ours: Vec<_> = probes.drain().into_iter().filter(|e| u64::from(e.netns) == inode || e.netns == 0).collect();
        let kinds: Vec<(u32, String)> = ours.iter().map(|e| (e.kind, reasons.get(&e.reason).cloned().unwrap_or_default())).collect();
        let devs: Vec<(u32, String, u32, u32)> = ours.iter().map(|e| (e.kind, e.dev_name(), e.ifindex, e.netns)).collect();
        assert!(ours.iter().any(|e| e.kind == abi::KIND_XMIT && e.dev_name() == "lo"), "{devs:?}");
        assert!(kinds.iter().any(|(k, r)| *k == abi::KIND_DROP && r == "NO_SOCKET"), "{kinds:?}");
        if probes.deliveries {
            assert!(ours.iter().any(|e| e.kind == abi::KIND_DELIVER && u64::from(e.netns) == inode), "{kinds:?}");
        }
        let t = Tuple::from_bpf(&ours[0].tuple).unwrap();
        assert_eq!((t.proto, t.dport), (17, 47001));
    }

    #[test]
    fn locations_name_their_function() {
        let k = Kallsyms::parse("ffffffff81000000 T _stext\nffffffff81a00000 t __udp4_lib_rcv\nffffffff81a01000 T udp_rcv\n0000000000000000 T zero\n");
        assert_eq!(k.symbolize(0xffff_ffff_81a0_01eb), "__udp4_lib_rcv+0x1eb");
        assert_eq!(k.symbolize(0x10), "0x10");
    }
}
