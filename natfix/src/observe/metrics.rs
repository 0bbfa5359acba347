//! Prometheus metrics: `natfix attach --metrics ADDR` serves its
//! attachment's on `http://ADDR/metrics`; the agent serves every natfix
//! attachment on the host there, with `/healthz` beside it.
//!
//! Every scrape reads the attachment's record and its pinned per-CPU counter
//! maps afresh (cheap: a few map lookups) and builds a new registry from them.
//! The kernel's counters only grow while the programs are attached, so the
//! exported counters are monotonic for the daemon's life without userspace
//! keeping any state.
//!
//! The exposition is the Prometheus text format 0.0.4, not `OpenMetrics`:
//! `promtool check metrics` (what operators lint with) reads only the former,
//! and rejects `OpenMetrics` counters (`# TYPE natfix_packets counter` followed
//! by `natfix_packets_total` samples). Prometheus scrapes either.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{debug, info, warn};

use crate::{
    error::UserError,
    pins::PinDir,
    record::AttachmentMeta,
    observe::stats::{self, CounterRow},
};

/// The path metrics are served on; every other path is 404.
pub const PATH: &str = "/metrics";

/// Content type of [`render`]'s output: Prometheus text format 0.0.4, as
/// the Go client sends it (the crate's `TEXT_FORMAT` lacks the charset).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A client that sends no complete request head within this long is dropped,
/// so idle or stalled connections cannot pile up in the daemon.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent answers whether it is working.
pub const HEALTH_PATH: &str = "/healthz";

/// One attachment the agent's config asks for, and whether it is in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    pub netns: String,
    pub iface: String,
    pub attached: bool,
}

/// The exposition of one attachment: its counters (`counters`, already summed
/// over CPUs, as `stats::read_counters` returns them), its programs and the
/// build. Pure: no I/O, so tests can check it without BPF or HTTP.
pub fn render(meta: &AttachmentMeta, counters: &[CounterRow]) -> Result<String> {
    render_many(&[(meta, counters)], &[])
}

/// The exposition of several attachments in one registry (each series once,
/// told apart by `iface` and `netns`), and of what an agent is configured for.
pub fn render_many(items: &[(&AttachmentMeta, &[CounterRow])], configured: &[Configured]) -> Result<String> {
    let registry = Registry::new();
    let counter_labels = ["program", "reason", "iface", "netns"];
    let packets = IntCounterVec::new(
        Opts::new(
            "natfix_packets_total",
            "Packets counted by natfix's eBPF programs since attach, by program and reason (summed over CPUs).",
        ),
        &counter_labels,
    )?;
    let bytes = IntCounterVec::new(
        Opts::new(
            "natfix_bytes_total",
            "Bytes of the packets in natfix_packets_total, by program and reason (summed over CPUs).",
        ),
        &counter_labels,
    )?;
    let attached = IntGaugeVec::new(
        Opts::new("natfix_attached", "1 for each eBPF program natfix has attached, with its hook and mode."),
        &["iface", "netns", "program", "hook", "mode"],
    )?;
    let reaped = IntCounterVec::new(
        Opts::new(
            "natfix_conntrack_reaped_total",
            "Conntrack entries of unsolicited UDP to guarded ports that natfix deleted (at attach, set and reap).",
        ),
        &["iface", "netns"],
    )?;
    for (meta, counters) in items {
        for row in *counters {
            let labels = [row.program.name(), row.reason, meta.iface.as_str(), meta.netns.as_str()];
            packets.with_label_values(&labels).inc_by(row.packets);
            bytes.with_label_values(&labels).inc_by(row.bytes);
        }
        for p in &meta.programs {
            attached
                .with_label_values(&[meta.iface.as_str(), meta.netns.as_str(), p.name.c_name(), p.hook.name(), p.mode.name()])
                .set(1);
        }
        if let Some(g) = &meta.guard {
            reaped.with_label_values(&[meta.iface.as_str(), meta.netns.as_str()]).inc_by(g.reaped);
        }
    }
    if !configured.is_empty() {
        let up = IntGaugeVec::new(
            Opts::new("natfix_configured_attached", "For each attachment the agent's config asks for: 1 when it is attached as recorded, else 0."),
            &["iface", "netns"],
        )?;
        for c in configured {
            up.with_label_values(&[c.iface.as_str(), c.netns.as_str()]).set(i64::from(c.attached));
        }
        registry.register(Box::new(up))?;
    }
    let build_info = IntGaugeVec::new(
        Opts::new("natfix_build_info", "Always 1; labelled with the natfix version and the commit it was built from."),
        &["version", "commit"],
    )?;
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("NATFIX_COMMIT")]).set(1);
    for collector in [packets, bytes, reaped] {
        registry.register(Box::new(collector))?;
    }
    for collector in [attached, build_info] {
        registry.register(Box::new(collector))?;
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// One scrape: the attachment's record and counters as they are now.
fn scrape(dir: &PinDir) -> Result<String> {
    let meta = dir.read_meta()?;
    let counters = stats::read_counters(dir, &meta)?;
    render(&meta, &counters)
}

/// One scrape of every natfix attachment on the host (pinned, foreground,
/// other processes'); one whose counters cannot be read is left out with a
/// warning rather than failing the rest.
pub fn scrape_all(configured: &[Configured]) -> Result<String> {
    let mut items = Vec::new();
    for entry in crate::pins::entries()? {
        if let crate::pins::Entry::Attachment(dir, meta) = entry {
            match stats::read_counters(&dir, &meta) {
                Ok(rows) => items.push((meta, rows)),
                Err(e) => warn!("metrics: {} in namespace `{}`: {e:#}", meta.iface, meta.netns),
            }
        }
    }
    let refs: Vec<(&AttachmentMeta, &[CounterRow])> = items.iter().map(|(m, r)| (m, r.as_slice())).collect();
    render_many(&refs, configured)
}

/// What a metrics endpoint serves: the scrape, and (the agent) its health:
/// healthy or not, and a body that says why.
#[derive(Clone)]
pub struct Endpoints {
    pub scrape: Arc<dyn Fn() -> Result<String> + Send + Sync>,
    pub health: Option<Arc<dyn Fn() -> (bool, String) + Send + Sync>>,
}

impl Endpoints {
    /// One attachment's metrics (a foreground `natfix attach`).
    #[must_use]
    pub fn one(dir: PinDir) -> Self {
        Self { scrape: Arc::new(move || scrape(&dir)), health: None }
    }
}

/// `route_with` without a health check (a foreground attach's endpoint).
#[cfg(test)]
fn route(method: &Method, path: &str, scrape: impl FnOnce() -> Result<String>) -> Response<Full<Bytes>> {
    route_with(method, path, scrape, None::<fn() -> (bool, String)>)
}

/// The response to `method path`; `scrape` runs only for `GET`/`HEAD /metrics`,
/// `health` (where there is one) for `/healthz`.
fn route_with(
    method: &Method,
    path: &str,
    scrape: impl FnOnce() -> Result<String>,
    health: Option<impl FnOnce() -> (bool, String)>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = header::HeaderValue::from_str(content_type) {
            resp.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        resp
    };
    let plain = "text/plain; charset=utf-8";
    let health = health.filter(|_| path == HEALTH_PATH);
    if path != PATH && health.is_none() {
        return reply(StatusCode::NOT_FOUND, plain, format!("not found; metrics are at {PATH}\n"));
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = reply(StatusCode::METHOD_NOT_ALLOWED, plain, "use GET\n".into());
        resp.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    if let Some(health) = health {
        let (ok, body) = health();
        return reply(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, "application/json", body);
    }
    match scrape() {
        Ok(text) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => {
            // A failed scrape must be visible to Prometheus (`up` stays 1 but
            // the scrape fails), never a 200 with missing series.
            warn!("metrics scrape failed: {e:#}");
            reply(StatusCode::INTERNAL_SERVER_ERROR, plain, format!("natfix: {e:#}\n"))
        }
    }
}

/// Binds the metrics address; done before attaching so a taken port fails
/// the command before any program is attached.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
    listener.set_nonblocking(true).context("cannot make the metrics socket non-blocking")?;
    Ok(listener)
}

/// Serves metrics on `listener` until the future is dropped. Per-connection
/// errors are logged and do not stop it, because the daemon detaches when
/// this returns.
pub async fn serve(listener: std::net::TcpListener, endpoints: Endpoints) -> Result<()> {
    let listener = TcpListener::from_std(listener).context("cannot register the metrics socket")?;
    let local = listener.local_addr().context("metrics socket")?;
    info!("serving metrics on http://{local}{PATH}");
    // Connections live in this set, so dropping `serve` aborts them too.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // E.g. EMFILE: transient; back off instead of ending (and detaching).
                        warn!("metrics: cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let ep = endpoints.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let resp = route_with(req.method(), req.uri().path(), || (ep.scrape)(), ep.health.as_ref().map(|h| || h()));
                        std::future::ready(Ok::<_, Infallible>(resp))
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        debug!("metrics connection: {e}");
                    }
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn bind_error(addr: SocketAddr, err: std::io::Error) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::AddrInUse {
        // Something else holds the port: a conflict the user resolves (exit 6).
        return UserError::Conflict(format!(
            "cannot listen on {addr} for --metrics: address in use (pick another port)"
        ))
        .into();
    }
    anyhow::Error::new(err).context(format!("cannot listen on {addr} for --metrics"))
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        process::{Command, Stdio},
    };

    use super::*;
    use crate::{
        abi::Family,
        config::{Filtering, ResolvedFlowSource},
        record::{AttachMode, GuardMeta, Hook, Program, ProgramMeta},
    };

    fn meta(netns: &str) -> AttachmentMeta {
        AttachmentMeta {
            natfix_version: env!("CARGO_PKG_VERSION").into(),
            netns: netns.into(),
            netns_path: "/run/netns/host".into(),
            netns_inode: 4_026_532_000,
            netns_cookie: None,
            iface: "eth0".into(),
            ifindex: 2,
            pid: Some(1234),
            pinned: false,
            created_unix: 0,
            programs: vec![
                ProgramMeta { name: Program::GuardXdp, hook: Hook::Xdp, mode: AttachMode::Native, prog_id: 41, link_id: Some(7) },
                ProgramMeta { name: Program::FlowEgress, hook: Hook::TcEgress, mode: AttachMode::Tcx, prog_id: 42, link_id: Some(8) },
            ],
            guard: Some(GuardMeta {
                ranges: vec!["20000-30000".into()],
                flow_source: ResolvedFlowSource::Own,
                flow_source_reason: "asked".into(),
                filtering: Filtering::PortRestricted,
                dry_run: false,
                allow_ports: vec![],
                allow_src: vec![],
                reaped: 3,
                published: vec![],
                no_allow_published: false,
            }),
            overlay: None,
            created_clsact: false,
            id: "0123456789abcdef".into(),
            events_per_sec: Some(20),
            managed: None,
        }
    }

    fn rows() -> Vec<CounterRow> {
        vec![
            CounterRow { program: Family::Guard, reason: "dropped_unsolicited", packets: 5, bytes: 210 },
            CounterRow { program: Family::Guard, reason: "passed_solicited", packets: 0, bytes: 0 },
            CounterRow { program: Family::Flow, reason: "learned", packets: 7, bytes: 700 },
            // Above 2^32: totals are u64 sums over CPUs.
            CounterRow { program: Family::Guard, reason: "out_of_scope", packets: 5_000_000_000, bytes: 6_000_000_000 },
        ]
    }

    /// `promtool check metrics` on `text`: Ok, or Err with promtool's findings.
    /// promtool is part of the test's contract: missing promtool is a failure, not a skip.
    fn promtool(text: &str) -> std::result::Result<(), String> {
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => panic!("cannot run promtool ({e}): install it with `apt-get install -y prometheus`"),
        };
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }

    #[test]
    fn render_has_every_series_with_labels_and_values() {
        let text = render(&meta("host"), &rows()).unwrap();
        for line in [
            "# TYPE natfix_packets_total counter",
            "# TYPE natfix_bytes_total counter",
            "# TYPE natfix_attached gauge",
            "# TYPE natfix_build_info gauge",
            r#"natfix_packets_total{iface="eth0",netns="host",program="guard",reason="dropped_unsolicited"} 5"#,
            r#"natfix_bytes_total{iface="eth0",netns="host",program="guard",reason="dropped_unsolicited"} 210"#,
            r#"natfix_packets_total{iface="eth0",netns="host",program="guard",reason="passed_solicited"} 0"#,
            r#"natfix_packets_total{iface="eth0",netns="host",program="flow",reason="learned"} 7"#,
            r#"natfix_bytes_total{iface="eth0",netns="host",program="flow",reason="learned"} 700"#,
            r#"natfix_packets_total{iface="eth0",netns="host",program="guard",reason="out_of_scope"} 5000000000"#,
            r#"natfix_attached{hook="xdp",iface="eth0",mode="native",netns="host",program="natfix_guard_xdp"} 1"#,
            r#"natfix_attached{hook="tc-egress",iface="eth0",mode="tcx",netns="host",program="natfix_flow_egress"} 1"#,
            r#"natfix_conntrack_reaped_total{iface="eth0",netns="host"} 3"#,
            &format!(r#"natfix_build_info{{commit="{}",version="{}"}} 1"#, env!("NATFIX_COMMIT"), env!("CARGO_PKG_VERSION")),
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        // One sample per row and per program, nothing invented.
        let samples = |name: &str| text.lines().filter(|l| l.starts_with(&format!("{name}{{"))).count();
        assert_eq!(samples("natfix_packets_total"), 4);
        assert_eq!(samples("natfix_bytes_total"), 4);
        assert_eq!(samples("natfix_attached"), 2);
        assert_eq!(samples("natfix_build_info"), 1);
    }

    #[test]
    fn render_passes_promtool() {
        let text = render(&meta("host"), &rows()).unwrap();
        promtool(&text).unwrap_or_else(|e| panic!("promtool rejects:\n{e}\n{text}"));
        // Labels that need escaping (a netns given as an odd path) stay valid.
        let text = render(&meta("/var/run/x \"q\" \\b\nc"), &rows()).unwrap();
        assert!(text.contains(r#"netns="/var/run/x \"q\" \\b\nc""#), "{text}");
        promtool(&text).unwrap_or_else(|e| panic!("promtool rejects escaped labels:\n{e}\n{text}"));
        // Nothing attached yet / no counters: still a valid exposition.
        let mut empty = meta("self");
        empty.programs.clear();
        promtool(&render(&empty, &[]).unwrap()).unwrap();
    }

    #[test]
    fn promtool_check_is_not_vacuous() {
        // What prometheus-client (OpenMetrics) would emit for the same counter:
        // promtool must reject it, or the checks above prove nothing.
        let openmetrics = "# HELP natfix_packets Packets.\n# TYPE natfix_packets counter\n\
                           natfix_packets_total{program=\"guard\"} 5\n# EOF\n";
        assert!(promtool(openmetrics).is_err());
        assert!(promtool("natfix_packets_total{program=guard} 5\n").is_err());
    }

    #[test]
    fn many_attachments_share_one_registry_and_the_agent_adds_its_gauge() {
        let (a, b) = (meta("host"), meta("ingress"));
        let configured = [
            Configured { netns: "ingress".into(), iface: "eth0".into(), attached: true },
            Configured { netns: "1-abc".into(), iface: "eth0".into(), attached: false },
        ];
        let text = render_many(&[(&a, &rows()), (&b, &rows())], &configured).unwrap();
        assert_eq!(text.matches("# TYPE natfix_packets_total counter").count(), 1, "one family:\n{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("natfix_packets_total{")).count(), 8);
        for line in [
            r#"natfix_configured_attached{iface="eth0",netns="ingress"} 1"#,
            r#"natfix_configured_attached{iface="eth0",netns="1-abc"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        promtool(&text).unwrap();
    }

    #[test]
    fn healthz_only_where_there_is_a_health_check() {
        let ok = || Ok(String::new());
        let r = route_with(&Method::GET, "/healthz", ok, Some(|| (true, "{}".to_owned())));
        assert_eq!(r.status(), StatusCode::OK);
        let r = route_with(&Method::GET, "/healthz", ok, Some(|| (false, "{}".to_owned())));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(route(&Method::GET, "/healthz", ok).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn routes() {
        let ok = || Ok("x 1\n".to_owned());
        let r = route(&Method::GET, "/metrics", ok);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
        assert_eq!(route(&Method::HEAD, "/metrics", ok).status(), StatusCode::OK);
        for path in ["/", "/metrics/", "/metricsx", "/favicon.ico"] {
            let r = route(&Method::GET, path, || panic!("no scrape for {path}"));
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        }
        let r = route(&Method::POST, "/metrics", || panic!("no scrape for POST"));
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        let r = route(&Method::GET, "/metrics", || anyhow::bail!("cannot open /sys/fs/bpf/x"));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn bind_fails_clearly_when_the_address_is_taken() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("cannot listen on {addr}")) && msg.contains("address in use"), "{msg}");
        assert_eq!(crate::error::exit_code(&err), 6, "a conflict: {msg}");
    }
}
