//! Soak: 100 cycles of attach / in-place upgrade (atomic program swap) /
//! detach while a numbered UDP flow and a TCP stream cross the guarded
//! interface. Not one legitimate datagram may be lost or reordered, and the
//! TCP stream must arrive intact.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use natfix::sys::netns::Netns;
use natfix_testkit::{ensure_bpffs, natfix, root_setup, scratch_ns, veth};

const CYCLES: usize = 100;

#[test]
#[ignore = "needs root: cargo xtask test"]
fn attach_upgrade_detach_cycles_lose_no_legitimate_packet() {
    root_setup();
    ensure_bpffs();
    let host = scratch_ns("soak");
    let peer = scratch_ns("soakp");
    veth(&host, "gs0", "10.67.0.1/24", &peer, "gt0", "10.67.0.2/24").unwrap();
    // Conntrack active on the host, as on any Docker host: the own flow table seeds from it.
    host.exec(&["nft", "add table ip t; add chain ip t c { type filter hook input priority 0; }; add rule ip t c ct state established accept"])
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    // The host's UDP socket 10.67.0.1:25000 talks first and keeps talking
    // (as a hole-punching peer does); the peer streams numbered datagrams back.
    let (hs, ps) = (host.netns().unwrap(), peer.netns().unwrap());
    let host_sock = hs.run(|| Ok(natfix::lab::scratch::bind_udp("10.67.0.1:25000".parse()?)?)).unwrap();
    host_sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    host_sock.send_to(b"hello", "10.67.0.2:7000").unwrap();
    let peer_sock = ps.run(|| Ok(natfix::lab::scratch::bind_udp("10.67.0.2:7000".parse()?)?)).unwrap();

    let keepalive = {
        let (sock, stop) = (host_sock.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sock.send_to(b"k", "10.67.0.2:7000").unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                peer_sock.send_to(&n.to_be_bytes(), "10.67.0.1:25000").unwrap();
                n += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            n
        })
    };
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            // Reads until the senders stopped and the socket went quiet: a
            // stall of this busy machine is not a loss; a drop is a gap.
            loop {
                match host_sock.recv_from(&mut buf) {
                    Ok((8, _)) => got.push(u64::from_be_bytes(buf[..8].try_into().unwrap())),
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Ok(_) | Err(_) => {}
                }
            }
            got
        })
    };

    let (tcp_tx, tcp_rx) = tcp_stream(&hs, &ps, &stop);

    std::thread::sleep(Duration::from_millis(200));
    let base = ["--iface", "gs0", "--netns", host.name.as_str(), "--guard", "20000-30000", "--flow-source", "own"];
    for cycle in 0..CYCLES {
        let attach = natfix(&[&["attach"][..], &base, &["--pin"]].concat());
        assert!(attach.status.success(), "cycle {cycle} attach: {}", String::from_utf8_lossy(&attach.stderr));
        // The upgrade brings a different program (another range) over the same links and maps.
        let upgrade = natfix(&[&["attach"][..], &base, &["--guard", "40000", "--pin", "--replace"]].concat());
        assert!(upgrade.status.success(), "cycle {cycle} upgrade: {}", String::from_utf8_lossy(&upgrade.stderr));
        let detach = natfix(&["detach", "--iface", "gs0", "--netns", &host.name]);
        assert!(detach.status.success(), "cycle {cycle} detach: {}", String::from_utf8_lossy(&detach.stderr));
    }

    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    keepalive.join().unwrap();
    let tcp_sent = tcp_tx.join().unwrap();
    let got = receiver.join().unwrap();
    let tcp_got = tcp_rx.join().unwrap();

    assert!(sent > 1000, "the UDP flow ran: {sent}");
    let gaps: Vec<(u64, u64)> = got.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).take(10).collect();
    assert!(gaps.is_empty(), "in order, without gaps: {gaps:?}");
    assert_eq!(got.len() as u64, sent, "every numbered datagram arrived (first {:?}, last {:?})", got.first(), got.last());
    assert_eq!(tcp_got.len() as u64, tcp_sent, "the TCP stream arrived whole");
    assert!(tcp_got.iter().enumerate().all(|(i, b)| u8::try_from(i % 251) == Ok(*b)), "and intact");
}

/// A TCP stream of sequence bytes, peer -> host, until `stop`: the sender
/// returns how many bytes it sent, the receiver what arrived.
fn tcp_stream(hs: &Netns, ps: &Netns, stop: &Arc<AtomicBool>) -> (JoinHandle<u64>, JoinHandle<Vec<u8>>) {
    let listener = hs.run(|| Ok(TcpListener::bind("10.67.0.1:26000")?)).unwrap();
    let tcp_rx = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut all = Vec::new();
        conn.read_to_end(&mut all).unwrap();
        all
    });
    let mut tcp = ps.run(|| Ok(TcpStream::connect("10.67.0.1:26000")?)).unwrap();
    let tcp_tx = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let chunk: Vec<u8> = (sent..sent + 1024).map(|i| (i % 251) as u8).collect();
                tcp.write_all(&chunk).unwrap();
                sent += 1024;
                std::thread::sleep(Duration::from_millis(1));
            }
            sent
        })
    };
    (tcp_tx, tcp_rx)
}
