//! `natfix::conntrack` against the real kernel: each test runs on its own
//! thread inside a fresh network namespace (so its conntrack table starts
//! empty and the host's is untouched), and drives the table with the
//! `conntrack` CLI, which that thread's children inherit.

use std::{
    fmt::Write as _,
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use natfix::conntrack::{
    CtEntry, CtEvent, CtEventKind, CtEventStream, CtTuple, IPS_CONFIRMED, dump_udp, is_events_lost,
};
use natfix_testkit::root_setup;

/// Runs `f` inside a fresh scratch namespace (its conntrack table empty).
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) {
    root_setup();
    natfix_testkit::in_fresh_netns(f);
}

fn conntrack(args: &str) {
    let out = Command::new("conntrack")
        .args(args.split_whitespace())
        .output()
        .expect("cannot run the conntrack CLI");
    assert!(
        out.status.success(),
        "conntrack {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Feeds `conntrack -R -` one command per line (much faster than a process each).
fn conntrack_batch(lines: &str) {
    let mut child = Command::new("conntrack")
        .args(["-R", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the conntrack CLI");
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "conntrack -R: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `conntrack -R` lines inserting one UDP entry to port 53 per source port.
fn udp_batch(src: &str, dst: &str, sports: std::ops::Range<u16>) -> String {
    let mut lines = String::new();
    for sport in sports {
        writeln!(lines, "-I -p udp -s {src} -d {dst} --sport {sport} --dport 53 -t 120").unwrap();
    }
    lines
}

fn t(src: &str, dst: &str, sport: u16, dport: u16) -> CtTuple {
    CtTuple {
        src: src.parse::<IpAddr>().unwrap(),
        dst: dst.parse::<IpAddr>().unwrap(),
        sport,
        dport,
    }
}

fn tuples(e: &CtEntry) -> (CtTuple, CtTuple) {
    (e.orig, e.reply)
}

/// `conntrack -I` arguments for a UDP entry with the given tuples.
fn insert_args(proto: &str, o: CtTuple, r: CtTuple) -> String {
    format!(
        "-I -p {proto} -s {} -d {} --sport {} --dport {} -r {} -q {} --reply-port-src {} --reply-port-dst {} -t 60",
        o.src, o.dst, o.sport, o.dport, r.src, r.dst, r.sport, r.dport
    )
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn dump_returns_exactly_the_udp_entries() {
    in_fresh_netns(|| {
        assert_eq!(dump_udp().unwrap(), vec![], "a fresh netns has an empty table");

        // SNAT-shaped: the reply goes to 203.0.113.5:40000, not back to the origin.
        let v4 = (
            t("198.51.100.20", "198.51.100.10", 7000, 25000),
            t("198.51.100.10", "203.0.113.5", 25000, 40000),
        );
        let v6 = (
            t("2001:db8::20", "2001:db8::10", 7001, 25001),
            t("2001:db8::10", "2001:db8::20", 25001, 7001),
        );
        conntrack(&insert_args("udp", v4.0, v4.1));
        conntrack(&insert_args("udp", v6.0, v6.1));
        // TCP entries, v4 and v6, must be filtered out.
        conntrack(&format!(
            "{} --state ESTABLISHED",
            insert_args(
                "tcp",
                t("198.51.100.20", "198.51.100.10", 7002, 80),
                t("198.51.100.10", "198.51.100.20", 80, 7002)
            )
        ));
        conntrack(&format!(
            "{} --state ESTABLISHED",
            insert_args(
                "tcp",
                t("2001:db8::20", "2001:db8::10", 7003, 443),
                t("2001:db8::10", "2001:db8::20", 443, 7003)
            )
        ));

        let mut got = dump_udp().unwrap();
        got.sort_by_key(tuples);
        let mut want = vec![v4, v6];
        want.sort();
        assert_eq!(got.iter().map(tuples).collect::<Vec<_>>(), want, "{got:#?}");
        for e in &got {
            assert!(e.status & IPS_CONFIRMED != 0, "status {:#x}", e.status);
            let secs = e.timeout_secs.expect("dump entries carry a timeout");
            assert!((1..=60).contains(&secs), "timeout {secs}");
        }
    });
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn multipart_dump_returns_every_entry() {
    in_fresh_netns(|| {
        // ~170 bytes per entry: 600 of them span several 32 KiB dump datagrams.
        const N: u16 = 600;
        conntrack_batch(&udp_batch("10.1.0.1", "10.2.0.2", 10000..10000 + N));
        let got = dump_udp().unwrap();
        let mut sports: Vec<u16> = got.iter().map(|e| e.orig.sport).collect();
        sports.sort_unstable();
        assert_eq!(sports, (10000..10000 + N).collect::<Vec<_>>());
        for e in &got {
            // No NAT given: the reply tuple is the inverted original.
            assert_eq!(e.reply, t("10.2.0.2", "10.1.0.1", 53, e.orig.sport));
        }
    });
}

/// Reads events until `done` holds for what was collected, or the deadline.
fn collect_events(stream: &mut CtEventStream, done: impl Fn(&[CtEvent]) -> bool) -> Vec<CtEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while !done(&events) && Instant::now() < deadline {
        // The read timeout keeps a broken test from hanging.
        if let Some(batch) = stream.try_recv().unwrap() {
            events.extend(batch);
        }
    }
    events
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn events_report_new_and_destroy_of_udp_only() {
    in_fresh_netns(|| {
        let mut stream = CtEventStream::open().unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

        let (o, r) = (
            t("198.51.100.30", "198.51.100.10", 7100, 25100),
            t("198.51.100.10", "203.0.113.5", 25100, 41000),
        );
        let tcp = (
            t("198.51.100.30", "198.51.100.10", 7101, 8080),
            t("198.51.100.10", "198.51.100.30", 8080, 7101),
        );
        conntrack(&format!("{} --state ESTABLISHED", insert_args("tcp", tcp.0, tcp.1)));
        conntrack(&insert_args("udp", o, r));
        conntrack("-D -p tcp --orig-port-dst 8080");
        conntrack(&format!(
            "-D -p udp -s {} -d {} --sport {} --dport {}",
            o.src, o.dst, o.sport, o.dport
        ));

        let events = collect_events(&mut stream, |evs| {
            evs.iter().any(|e| e.kind == CtEventKind::Destroy && e.entry.orig == o)
        });
        let ours: Vec<_> = events.iter().filter(|e| e.entry.orig == o).collect();
        assert!(
            events.iter().all(|e| e.entry.orig.dport != 8080),
            "TCP events leaked: {events:#?}"
        );
        let new = ours
            .iter()
            .position(|e| e.kind == CtEventKind::New)
            .expect("no New event");
        let destroy = ours
            .iter()
            .position(|e| e.kind == CtEventKind::Destroy)
            .expect("no Destroy event");
        assert!(new < destroy, "{ours:#?}");
        for e in [ours[new], ours[destroy]] {
            assert_eq!(tuples(&e.entry), (o, r), "{e:#?}");
        }
        let secs = ours[new].entry.timeout_secs.expect("NEW carries a timeout");
        assert!((1..=60).contains(&secs), "timeout {secs}");
    });
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn overrun_is_reported_and_stream_recovers() {
    in_fresh_netns(|| {
        // The smallest buffer the kernel allows; a burst of events overruns it.
        let mut stream = CtEventStream::open_with_rcvbuf(1).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        conntrack_batch(&udp_batch("10.3.0.1", "10.4.0.2", 20000..20200));

        let mut lost = false;
        loop {
            match stream.try_recv() {
                Ok(Some(_)) => {}
                Ok(None) => break, // drained
                Err(e) => {
                    assert!(is_events_lost(&e), "unexpected error: {e:#}");
                    lost = true;
                }
            }
        }
        assert!(lost, "200 events into a minimal buffer must overrun");

        // After the overrun the stream keeps delivering.
        let o = t("10.5.0.1", "10.6.0.2", 30000, 53);
        conntrack(&format!(
            "-I -p udp -s {} -d {} --sport {} --dport {} -t 60",
            o.src, o.dst, o.sport, o.dport
        ));
        let events = collect_events(&mut stream, |evs| evs.iter().any(|e| e.entry.orig == o));
        assert!(
            events.iter().any(|e| e.kind == CtEventKind::New && e.entry.orig == o),
            "{events:#?}"
        );
    });
}
