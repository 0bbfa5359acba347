//! The flood bench's rig: two namespaces per measurement joined by a veth,
//! the live-frames generator, and what keeps a failed run from hiding its
//! cause or poisoning the next one.
//!
//! - Every rig thread's error reaches the report with its cause: the
//!   generator keeps its thread's handle and panics with the thread's error
//!   chain (a closed channel says nothing), closures run in a namespace keep
//!   a panic's message (`in_ns`).
//! - Names carry the run's pid (`nfb<pid>-gen-<tag>`): a concurrent run does
//!   not delete them as leftovers. A panicking run cleans up as it unwinds
//!   (`ScratchNs`, `BpfStatsOn`, the receiver's private bpffs); a killed one
//!   cannot, so each run starts by sweeping what dead runs left
//!   (`sweep_leftovers`).

use std::{
    net::Ipv4Addr,
    sync::mpsc,
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use natfix::{
    lab::scratch::{ScratchNs, run, veth},
    sys::netns::Netns,
};
use natfix_ebpf::rig;
use natfix_testkit::{harness::pin_to_cpu, packet};

/// What a rig step returned, or a panic that names the step and the cause.
pub fn ok<T>(r: Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// The message of a panic payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
}

/// Runs `f` in `ns` on a fresh thread; a panic in `f` comes back as an error
/// with its message (`Netns::run` reports only "namespace worker panicked").
pub fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    ns.run(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| Err(anyhow!("panicked: {}", panic_text(&*p)))))
}

/// A rig thread's result; its error (with causes) or panic message in the
/// panic that reports it.
pub fn joined<T>(thread: std::thread::JoinHandle<Result<T>>, what: &str) -> T {
    match thread.join() {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what} failed: {e:#}"),
        Err(p) => panic!("{what} panicked: {}", panic_text(&*p)),
    }
}

/// This run's namespace names: `nfb<pid>-gen-<tag>`, `nfb<pid>-rx-<tag>`.
/// The pid keeps a concurrent run from deleting them as leftovers
/// (`ScratchNs::create` deletes its name first) and tells `sweep_leftovers`
/// whose they are.
pub fn ns_name(role: &str, tag: &str) -> String {
    format!("nfb{}-{role}-{tag}", std::process::id())
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether another flood bench process runs (names from before the pid
/// cannot tell whose they are).
fn other_flood_running() -> bool {
    let own = std::process::id();
    std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
        let pid: Option<u32> = e.file_name().to_str().and_then(|p| p.parse().ok());
        pid.is_some_and(|p| p != own) && std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("flood-"))
    })
}

/// The owner of one of the benches' namespace names is gone:
/// `nfb<pid>-<role>-...` (`gen`, `rx`: the flood's; `att`: the scaling
/// bench's) with a dead pid, or an old-style `nfb-gen-*`/`nfb-rx-*` (names
/// before the pid) when no other flood bench runs.
fn left_by_dead_run(name: &str, other_flood: bool) -> bool {
    let Some(rest) = name.strip_prefix("nfb") else { return false };
    if rest.starts_with("-gen-") || rest.starts_with("-rx-") {
        return !other_flood;
    }
    rest.split_once('-')
        .filter(|(_, role)| ["gen-", "rx-", "att-"].iter().any(|r| role.starts_with(r)))
        .and_then(|(pid, _)| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid != std::process::id() && !alive(pid))
}

/// Removes what runs that died without cleaning up left behind: their
/// namespaces (their veths and XDP/tc programs go with them), natfix pins
/// recorded for a namespace of theirs that is gone (runs before this rig
/// attached with `loader::attach`, which a panic left pinned).
/// (The xdp-filter peer keeps its pins in a bpffs of a mount namespace that
/// dies with its process, `receiver::XdpFilter`: nothing of it outlives a run.)
pub fn sweep_leftovers() {
    let other_flood = other_flood_running();
    let mut names: Vec<String> = std::fs::read_dir("/run/netns").into_iter().flatten().flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
    names.sort();
    for name in names.iter().filter(|n| left_by_dead_run(n, other_flood)) {
        eprintln!("flood: removing namespace {name}, left by a run that did not finish");
        if let Err(e) = run(&["ip", "netns", "del", name]) {
            eprintln!("flood: {e:#}");
        }
    }
    for (dir, meta) in natfix::pins::attachments().unwrap_or_default() {
        let ours = meta.netns_path.starts_with("/run/netns/nfb");
        if ours && !std::path::Path::new(&meta.netns_path).exists() {
            eprintln!("flood: removing {}, pinned by a run that did not finish", dir.path.display());
            if let Err(e) = dir.remove() {
                eprintln!("flood: {e:#}");
            }
        }
    }
}

/// Two namespaces and the veth between them: `fg0` (generator, .20) and
/// `fr0` (receiver, .10); the flood's frame, addressed to fr0.
pub struct Rig {
    pub gen_ns: ScratchNs,
    pub rx_ns: ScratchNs,
    pub frame: Vec<u8>,
    pub gen_ifindex: u32,
}

impl Rig {
    pub fn new(tag: &str, payload: usize) -> Self {
        ok(Self::try_new(tag, payload), &format!("the rig's namespaces ({tag})"))
    }

    fn try_new(tag: &str, payload: usize) -> Result<Self> {
        let gen_ns = ScratchNs::create(&ns_name("gen", tag))?;
        let rx_ns = ScratchNs::create(&ns_name("rx", tag))?;
        veth(&gen_ns, "fg0", "198.51.100.20/24", &rx_ns, "fr0", "198.51.100.10/24")?;
        let mac = link_field(&rx_ns, "fr0", "address")?;
        let mac: Vec<u8> = mac.as_str().context("fr0's address")?.split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>()?;
        let gen_ifindex = u32::try_from(link_field(&gen_ns, "fg0", "ifindex")?.as_u64().context("fg0's ifindex")?)?;
        let mut frame = packet::udp4(Ipv4Addr::new(198, 51, 100, 20), 7000, Ipv4Addr::new(198, 51, 100, 10), 25000, &vec![0u8; payload]);
        packet::set_dst_mac(&mut frame, mac.try_into().map_err(|_| anyhow!("fr0's address is not a MAC"))?);
        // No UDP checksum (legal for IPv4): the generator may rewrite ports.
        frame[40..42].copy_from_slice(&[0, 0]);
        Ok(Self { gen_ns, rx_ns, frame, gen_ifindex })
    }
}

/// One field of `ip -j link show <dev>` in `ns`.
fn link_field(ns: &ScratchNs, dev: &str, field: &str) -> Result<serde_json::Value> {
    let show: serde_json::Value = serde_json::from_str(&ns.exec(&["ip", "-j", "link", "show", dev])?)?;
    Ok(show[0][field].clone())
}

/// Which program transmits the frames.
#[derive(Clone, Copy, Debug)]
pub enum GenProgram {
    /// natfix-ebpf's rig generator: every frame as given.
    Rig,
    /// `data/flood_gen.bpf.c`: frame i becomes flow i mod N (N distinct UDP tuples).
    Flows(u32),
}

/// One burst: wall seconds, and the generator thread's CPU time.
#[derive(Clone, Copy, Debug)]
pub struct Burst {
    pub secs: f64,
    pub cpu_secs: f64,
}

/// A generator thread in the generator's namespace, pinned to CPU 0, its
/// program loaded once: each request sends that many frames and answers
/// with the burst's time.
///
/// The program is also attached (native XDP) to a spare veth of the
/// generator's namespace that carries no traffic: a `test_run` with repeat > 1
/// registers its program in the kernel's XDP dispatcher and unregisters it
/// after, each waiting for an RCU grace period, unless the program is in the
/// dispatcher already (measured: 100,000-frame bursts went from 5.9 to 16
/// million frames in 3 s).
pub struct Generator {
    requests: Option<mpsc::Sender<u32>>,
    answers: mpsc::Receiver<Burst>,
    /// The thread's own result: why it stopped answering, when it did.
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Generator {
    pub fn start(rig: &Rig) -> Self {
        Self::start_with(rig, GenProgram::Rig, false)
    }

    /// With `realtime`, the thread runs `SCHED_FIFO` (priority 1) on CPU 0:
    /// on a host with other work, CFS would give it a share of CPU 0 and
    /// the receiver would idle whenever the generator is off its CPU (the
    /// kernel's RT throttling still leaves others 5% of CPU 0).
    pub fn start_with(rig: &Rig, program: GenProgram, realtime: bool) -> Self {
        let (requests, jobs) = mpsc::channel::<u32>();
        let (answer, answers) = mpsc::channel();
        let (frame, ifindex) = (rig.frame.clone(), rig.gen_ifindex);
        let netns = ok(rig.gen_ns.netns(), "the generator's namespace");
        let object = match program {
            GenProgram::Rig => None,
            GenProgram::Flows(_) => Some(ok(compile_flood_gen(), "compiling the flood generator")),
        };
        // The spare veth that keeps the program in the XDP dispatcher (one per rig).
        if rig.gen_ns.exec(&["ip", "link", "show", "gx0"]).is_err() {
            ok(rig.gen_ns.exec(&["ip", "link", "add", "gx0", "type", "veth", "peer", "name", "gx1"]).map(drop), "the generator's spare veth");
        }
        let thread = std::thread::spawn(move || {
            in_ns(&netns, move || {
                pin_to_cpu(0)?;
                if realtime {
                    let param = libc::sched_param { sched_priority: 1 };
                    // SAFETY: plain syscall on the calling thread.
                    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) } != 0 {
                        eprintln!("flood: the generator stays SCHED_OTHER: sched_setscheduler: {}", std::io::Error::last_os_error());
                    }
                }
                let mut ebpf = match (program, &object) {
                    (GenProgram::Flows(n), Some(bytes)) => aya::EbpfLoader::new().override_global("nr_flows", &n, true).load(bytes)?,
                    _ => aya::Ebpf::load(rig::OBJECT)?,
                };
                let name = if object.is_some() { "flood_gen" } else { rig::GEN_XDP };
                let p: &mut Xdp = ebpf.program_mut(name).context("no generator program")?.try_into()?;
                p.load()?;
                p.attach("gx0", XdpMode::Driver).context("attaching the generator to its spare veth (keeps it in the XDP dispatcher)")?;
                let md = crate::common::xdp_md(frame.len(), ifindex);
                let ctx = &md[..];
                for n in jobs {
                    let (t, cpu) = (Instant::now(), thread_cpu_secs());
                    p.test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(ctx),
                        repeat: n,
                        attrs: TestRunAttrs::new().xdp_live_frames(64),
                        ..TestRunOptions::default()
                    })
                    .map_err(|e| test_run_error(e, n, ifindex))?;
                    let burst = Burst { secs: t.elapsed().as_secs_f64(), cpu_secs: thread_cpu_secs() - cpu };
                    if answer.send(burst).is_err() {
                        break;
                    }
                }
                Ok(())
            })
        });
        Self { requests: Some(requests), answers, thread: Some(thread) }
    }

    /// Seconds one burst of `n` frames took.
    pub fn seconds_for(&mut self, n: u32) -> f64 {
        self.burst(n).secs
    }

    /// One burst of `n` frames.
    pub fn burst(&mut self, n: u32) -> Burst {
        let sent = self.requests.as_ref().is_some_and(|r| r.send(n).is_ok());
        match self.answers.recv() {
            Ok(b) if sent => b,
            // The thread is gone: its error says why (a RecvError says nothing).
            _ => panic!("generator thread failed: {:#}", self.stop().err().unwrap_or_else(|| anyhow!("it ended without an error"))),
        }
    }

    /// Ends the thread and returns its result.
    fn stop(&mut self) -> Result<()> {
        self.requests = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(panic)) => Err(anyhow!("it panicked: {}", panic_text(&*panic))),
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // An error no burst saw (the thread is taken once reported).
        if let Err(e) = self.stop() {
            eprintln!("generator thread failed: {e:#}");
        }
    }
}

/// The calling thread's CPU time.
#[expect(clippy::cast_precision_loss, reason = "seconds and nanoseconds of a thread's CPU time, far below 2^52")]
fn thread_cpu_secs() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// The generator's `test_run` error, with what EPERM means there: nothing on
/// `BPF_PROG_TEST_RUN`'s own path returns it since Linux 5.8 dropped its
/// `CAP_SYS_ADMIN` check (`bpf_prog_test_run_xdp` and the live-frames loop in
/// `net/bpf/test_run.c` answer EINVAL, E2BIG, ENODEV, EFAULT, ENOMEM or
/// EINTR), so the security hook `__sys_bpf` calls first (`security_bpf`)
/// refused the command: `SELinux`'s `bpf` class, or a BPF-LSM program.
fn test_run_error(e: aya::programs::ProgramError, n: u32, ifindex: u32) -> anyhow::Error {
    let eperm = matches!(&e, aya::programs::ProgramError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EPERM));
    let what = format!("live-frames test_run of {n} frames out of ifindex {ifindex}");
    anyhow::Error::from(e).context(if eperm {
        format!(
            "{what}: EPERM, which on Linux >= 5.8 only a security module returns for BPF_PROG_TEST_RUN (security_bpf, before the command runs): \
             SELinux (`getenforce`, `ausearch -m AVC`) or a BPF-LSM program (`bpftool prog show | grep -i lsm`, `cat /sys/kernel/security/lsm`, \
             `bpftool link show`); none of the rig's state takes part"
        )
    } else {
        what
    })
}

/// `data/flood_gen.bpf.c` compiled with the clang that builds natfix-ebpf
/// (`NATFIX_CLANG`, default clang-19) and libbpf's headers.
fn compile_flood_gen() -> Result<Vec<u8>> {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/flood_gen.bpf.c");
    let out = std::env::temp_dir().join(format!("natfix-flood-gen-{}.o", std::process::id()));
    let clang = std::env::var("NATFIX_CLANG").unwrap_or_else(|_| "clang-19".to_owned());
    let multiarch = run(&["gcc", "-print-multiarch"]).map_or_else(|_| "x86_64-linux-gnu".into(), |s| s.trim().to_owned());
    let include = format!("/usr/include/{multiarch}");
    let out_s = out.display().to_string();
    run(&[&clang, "-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-idirafter", &include, "-c", src, "-o", &out_s])
        .with_context(|| format!("{clang} (the toolchain natfix-ebpf's build uses)"))?;
    let bytes = std::fs::read(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(bytes)
}

/// `kernel.bpf_stats_enabled` on until dropped, also when a window panics:
/// left on, every BPF program on the host pays two clock reads per run.
pub struct BpfStatsOn {
    before: String,
}

impl BpfStatsOn {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    pub fn enable() -> Self {
        let before = ok(std::fs::read_to_string(Self::PATH).map_err(Into::into), Self::PATH).trim().to_owned();
        ok(std::fs::write(Self::PATH, "1").map_err(Into::into), Self::PATH);
        Self { before }
    }
}

impl Drop for BpfStatsOn {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(Self::PATH, &self.before) {
            eprintln!("flood: restoring {}: {e}", Self::PATH);
        }
    }
}
