//! `natfix attach --metrics ADDR`: scraped over real HTTP while attached,
//! linted with `promtool check metrics`, and counting the traffic that passes.

use std::{
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::programs::TcAttachType;
use natfix_testkit::{
    Daemon, ensure_bpffs, natfix, natfix_bin, promtool_check, root_setup, scratch_ns, send_udp, stat, tcx_prog_ids, veth, xdp_prog_id,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A port nothing listens on right now (bound by the kernel, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None) // a proxy from the environment must not see loopback scrapes
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

struct Scrape {
    status: u16,
    content_type: String,
    body: String,
}

fn get(url: &str) -> Result<Scrape, ureq::Error> {
    let mut resp = agent().get(url).call()?;
    Ok(Scrape {
        status: resp.status().as_u16(),
        content_type: resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned(),
        body: resp.body_mut().read_to_string()?,
    })
}

/// GET `url`, retrying while the daemon's listener comes up (its record is
/// written before it binds, so `Daemon::start` can return a moment early).
fn scrape(url: &str) -> Scrape {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match get(url) {
            Ok(s) => return s,
            Err(e) if Instant::now() < end => {
                eprintln!("scrape {url}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot scrape {url}: {e}"),
        }
    }
}

/// `name{labels} value` samples of `text` whose labels include all of `want`.
fn samples(text: &str, name: &str, want: &[(&str, &str)]) -> Vec<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?.strip_prefix('{')?.strip_suffix('}')?;
            // The label values here hold no `",` so splitting on it is exact.
            let have: Vec<&str> = labels.split("\",").map(|kv| kv.trim_end_matches('"')).collect();
            want.iter().all(|(k, v)| have.contains(&format!("{k}=\"{v}").as_str())).then(|| value.parse().unwrap())
        })
        .collect()
}

/// The single sample matching, or a panic showing the scrape.
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    let found = samples(text, name, want);
    assert_eq!(found.len(), 1, "one {name} series with {want:?} expected, got {found:?} in:\n{text}");
    found[0]
}

fn status_json() -> serde_json::Value {
    serde_json::from_slice(&natfix(&["status", "--json"]).stdout).unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
#[expect(clippy::float_cmp, reason = "the samples are counts: whole numbers, exact in f64")]
fn scrape_is_valid_prometheus_text_and_counts_traffic() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("mhost");
    let peer = scratch_ns("mpeer");
    veth(&host, "gm0", "10.66.0.1/24", &peer, "gn0", "10.66.0.2/24").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&[
        "--iface", "gm0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own", "--metrics", &listen,
    ])
    .unwrap();
    let url = format!("http://{listen}/metrics");

    let first = scrape(&url);
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.content_type.starts_with("text/plain; version=0.0.4"), "content type {}", first.content_type);
    promtool_check(&first.body);

    // One natfix_attached series per program in the record, and no others.
    let rec = status_json()["attachments"].as_array().unwrap().iter().find(|a| a["iface"] == "gm0").unwrap().clone();
    let programs = rec["programs"].as_array().unwrap();
    assert!(programs.len() >= 2, "guard and flow programs: {rec}");
    for p in programs {
        let labels = [
            ("iface", "gm0"),
            ("netns", host.name.as_str()),
            ("program", p["name"].as_str().unwrap()),
            ("hook", p["hook"].as_str().unwrap()),
            ("mode", p["mode"].as_str().unwrap()),
        ];
        assert_eq!(sample(&first.body, "natfix_attached", &labels), 1.0);
    }
    assert_eq!(samples(&first.body, "natfix_attached", &[]).len(), programs.len(), "{}", first.body);
    let version = env!("CARGO_PKG_VERSION"); // one workspace version for natfix and its tests
    assert_eq!(sample(&first.body, "natfix_build_info", &[("version", version)]), 1.0);

    let dropped = [("program", "guard"), ("reason", "dropped_unsolicited"), ("iface", "gm0"), ("netns", &host.name)];
    // Every reason is exported from the start, zero or not.
    let packets_before = sample(&first.body, "natfix_packets_total", &dropped);
    let bytes_before = sample(&first.body, "natfix_bytes_total", &dropped);

    // 5 unsolicited datagrams to the guarded range: dropped and counted.
    send_udp(&peer, addr("10.66.0.2:7000"), addr("10.66.0.1:25000"), 5).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let second = scrape(&url);
    assert_eq!(second.status, 200);
    promtool_check(&second.body);
    let packets_after = sample(&second.body, "natfix_packets_total", &dropped);
    let bytes_after = sample(&second.body, "natfix_bytes_total", &dropped);
    assert_eq!(packets_after - packets_before, 5.0, "dropped_unsolicited rose by the 5 datagrams:\n{}", second.body);
    // Each datagram is at least IPv4 + UDP headers + 4 payload bytes.
    assert!(bytes_after - bytes_before >= 5.0 * 32.0, "bytes rose: {bytes_before} -> {bytes_after}");
    // The same totals `natfix stats` reports.
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let from_stats = stat(&host.name, "gm0", "guard", "dropped_unsolicited") as f64;
    assert_eq!(packets_after, from_stats);

    // Only /metrics is served.
    let other = get(&format!("http://{listen}/")).unwrap();
    assert_eq!(other.status, 404);

    let exit = d.stop().unwrap();
    assert!(exit.success(), "SIGTERM exits cleanly: {exit}");
    assert!(get(&url).is_err(), "the metrics listener closes with the daemon");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn metrics_address_in_use_fails_attach_and_leaves_nothing_attached() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("mbusy");
    let peer = scratch_ns("mbusyp");
    veth(&host, "gu0", "10.66.1.1/24", &peer, "gv0", "10.66.1.2/24").unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();

    let mut child = Command::new(natfix_bin())
        .args(["attach", "--iface", "gu0", "--netns", &host.name, "--guard", "20000-30000", "--flow-source", "own"])
        .args(["--metrics", &busy])
        .env("NATFIX_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded wait: a daemon that ignored the failed bind would run forever.
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("natfix attach kept running although --metrics {busy} is in use");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attach must fail: {stderr}");
    assert_eq!(out.status.code(), Some(6), "a conflict (exit 6): {stderr}");
    assert!(stderr.contains(&format!("cannot listen on {busy}")) && stderr.contains("address in use"), "{stderr}");
    drop(taken);

    // Nothing left behind: no record, no programs on the interface, no pins.
    let st = status_json();
    assert!(!st["attachments"].as_array().unwrap().iter().any(|a| a["iface"] == "gu0"), "record gone: {st}");
    assert_eq!(xdp_prog_id(&host, "gu0").unwrap(), None, "XDP detached");
    assert!(tcx_prog_ids(&host, "gu0", TcAttachType::Egress).unwrap().is_empty(), "tcx detached");
    let pin_root = std::path::Path::new("/sys/fs/bpf/natfix").join(host.netns().unwrap().inode.to_string());
    assert!(!pin_root.exists(), "pins removed: {}", pin_root.display());
}
