//! The gateway engine on real loopback sockets: what it forwards, refuses and hands up.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use jvpn_dataplane::channel::Channel;
use jvpn_dataplane::engine::{monotonic, Engine, HandUp};
use jvpn_dataplane::reasons::DropReason;

mod common;
use common::{drained, recv, seal, until};

fn socket() -> UdpSocket {
    common::socket("127.0.0.1")
}

fn recv_within(s: &UdpSocket, what: &str) -> Vec<u8> {
    common::recv_within(s, what).0
}

const SID: [u8; 16] = [7; 16];
const EPOCH: u32 = 3;

#[test]
fn forwards_refuses_and_hands_up() {
    let listener = socket();
    let client = socket();
    let upstream = socket();
    let engine = Engine::new(listener.as_raw_fd(), 64).unwrap();
    let (c2g, g2c) = ([1u8; 32], [2u8; 32]);
    let mut cli = Channel::new(&c2g, &g2c, SID, EPOCH).unwrap();
    let gw = Arc::new(Mutex::new(Channel::new(&g2c, &c2g, SID, EPOCH).unwrap()));
    let peer = client.local_addr().unwrap();
    let up = upstream.local_addr().unwrap();
    client.connect(listener.local_addr().unwrap()).unwrap();
    let counters = &engine.shared.counters;

    // unknown session: handed up unchanged
    let first = seal(&mut cli, b"\x01hello");
    client.send(&first).unwrap();
    match &drained(&engine, 1)[0] {
        HandUp::Datagram { data, from } => assert!(data == &first && *from == peer),
        HandUp::Upstream { .. } | HandUp::Tun { .. } => panic!("expected a datagram"),
    }

    // installed and fast: the machine opens the upstream, then the engine forwards alone
    let t0 = monotonic();
    engine.set_lease(t0 + 60.0, t0);
    engine.install(SID, gw.clone(), EPOCH, peer, true, t0, None);
    engine.to_upstream(&SID, 0, up, b"hello").unwrap();
    let (_, from_engine) = {
        let mut buf = [0u8; 64];
        let (n, a) = upstream.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        ((), a)
    };
    let pkt = seal(&mut cli, b"\x01payload");
    client.send(&pkt).unwrap();
    assert_eq!(recv_within(&upstream, "the forwarded payload"), b"payload");
    upstream.send_to(b"reply", from_engine).unwrap();
    let mut back = recv_within(&client, "the sealed reply");
    let r = cli.open_in_place(&mut back, true).unwrap();
    assert_eq!(&back[r], b"\x01reply");
    assert_eq!(gw.lock().unwrap().highest_received(), Some(1));
    // what it forwarded, for the bindings with traffic only, once
    let active = engine.take_active();
    assert_eq!(active.len(), 1);
    assert_eq!((active[0].0, active[0].1.rx_packets, active[0].1.tx_packets), (SID, 1, 1));
    assert!(engine.take_active().is_empty());

    // a replay and a forgery are dropped with the machine's reasons
    client.send(&pkt).unwrap();
    let mut forged = seal(&mut cli, b"\x01forged");
    let last = forged.len() - 1;
    forged[last] ^= 1;
    client.send(&forged).unwrap();
    until("the replay and the forgery counted", || {
        counters.drops[DropReason::Replayed.code() as usize].load(Ordering::Relaxed) == 1
            && counters.drops[DropReason::BadAead.code() as usize].load(Ordering::Relaxed) == 1
    });
    assert!(recv(&upstream).is_none());

    // a keepalive goes up intact and unmarked: the machine opens it through the same channel
    let ka = seal(&mut cli, b"\x02keepalive");
    client.send(&ka).unwrap();
    match &drained(&engine, 1)[0] {
        HandUp::Datagram { data, .. } => assert_eq!(data, &ka),
        HandUp::Upstream { .. } | HandUp::Tun { .. } => panic!("expected a datagram"),
    }
    let mut ka2 = ka.clone();
    assert!(gw.lock().unwrap().open_in_place(&mut ka2, true).is_ok());

    // not fast: payloads and replies go to the machine
    engine.install(SID, gw.clone(), EPOCH, peer, false, t0, None);
    let slow = seal(&mut cli, b"\x01slow");
    client.send(&slow).unwrap();
    assert!(matches!(&drained(&engine, 1)[0], HandUp::Datagram { data, .. } if data == &slow));
    upstream.send_to(b"slow reply", from_engine).unwrap();
    assert!(matches!(&drained(&engine, 1)[0], HandUp::Upstream { session_id, flow: 0, data } if *session_id == SID && data == b"slow reply"));

    // the node's lease lapsed: dropped, counted, nothing forwarded
    engine.install(SID, gw.clone(), EPOCH, peer, true, t0, None);
    engine.set_lease(t0 - 1.0, t0);
    client.send(&seal(&mut cli, b"\x01late")).unwrap();
    until("LEASE_EXPIRED", || counters.drops[DropReason::LeaseExpired.code() as usize].load(Ordering::Relaxed) == 1);
    assert!(recv(&upstream).is_none());
    // the lease holds again, but the binding was confirmed before the node trusted the store
    // again: dropped until its next confirmation
    engine.set_lease(monotonic() + 60.0, t0 + 1.0);
    client.send(&seal(&mut cli, b"\x01unconfirmed")).unwrap();
    until("LEASE_EXPIRED again", || counters.drops[DropReason::LeaseExpired.code() as usize].load(Ordering::Relaxed) == 2);
    assert!(recv(&upstream).is_none());

    // removed: the machine's again
    assert!(engine.remove(&SID));
    let gone = seal(&mut cli, b"\x01gone");
    client.send(&gone).unwrap();
    assert!(matches!(&drained(&engine, 1)[0], HandUp::Datagram { data, .. } if data == &gone));
}

#[test]
fn carries_flows_on_their_own_upstream_sockets() {
    let listener = socket();
    let client = socket();
    let upstream = socket();
    let engine = Engine::new(listener.as_raw_fd(), 64).unwrap();
    let (c2g, g2c) = ([1u8; 32], [2u8; 32]);
    let mut cli = Channel::new(&c2g, &g2c, SID, EPOCH).unwrap();
    let gw = Arc::new(Mutex::new(Channel::new(&g2c, &c2g, SID, EPOCH).unwrap()));
    let peer = client.local_addr().unwrap();
    let up = upstream.local_addr().unwrap();
    client.connect(listener.local_addr().unwrap()).unwrap();
    let t0 = monotonic();
    engine.set_lease(t0 + 60.0, t0);
    engine.install(SID, gw.clone(), EPOCH, peer, true, t0, None);

    // a flow without a socket yet: up, intact and unmarked (the machine opens the socket)
    let first = seal(&mut cli, b"\x09\x00\x07first");
    client.send(&first).unwrap();
    assert!(matches!(&drained(&engine, 1)[0], HandUp::Datagram { data, .. } if data == &first));
    assert_eq!(gw.lock().unwrap().highest_received(), None);
    // the machine opens flows 7 and 300 (refused: ids are 0..=256) through the engine
    assert!(engine.to_upstream(&SID, 300, up, b"x").is_err());
    engine.to_upstream(&SID, 7, up, b"first").unwrap();
    engine.to_upstream(&SID, 8, up, b"eighth").unwrap();
    let mut from = std::collections::HashMap::new();
    for _ in 0..2 {
        let mut buf = [0u8; 64];
        let (n, a) = upstream.recv_from(&mut buf).unwrap();
        from.insert(buf[..n].to_vec(), a);
    }
    let (a7, a8) = (from[&b"first".to_vec()], from[&b"eighth".to_vec()]);
    assert_ne!(a7, a8, "one upstream socket per flow");

    // interleaved flows: each datagram from its own flow's socket, in order
    for (flow, body) in [(7u8, "a"), (8, "b"), (8, "c"), (7, "d")] {
        client.send(&seal(&mut cli, &[&[9u8, 0, flow][..], body.as_bytes()].concat())).unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let mut buf = [0u8; 64];
        let (n, a) = upstream.recv_from(&mut buf).unwrap();
        got.push((a, String::from_utf8(buf[..n].to_vec()).unwrap()));
    }
    let of = |a| got.iter().filter(|(x, _)| *x == a).map(|(_, b)| b.as_str()).collect::<Vec<_>>();
    assert_eq!((of(a7), of(a8)), (vec!["a", "d"], vec!["b", "c"]));

    // replies are sealed as FLOW_PAYLOADs of their flow
    upstream.send_to(b"to seven", a7).unwrap();
    let mut back = recv_within(&client, "flow 7's reply");
    let r = cli.open_in_place(&mut back, true).unwrap();
    assert_eq!(&back[r], b"\x09\x00\x07to seven");
    upstream.send_to(b"to eight", a8).unwrap();
    let mut back = recv_within(&client, "flow 8's reply");
    let r = cli.open_in_place(&mut back, true).unwrap();
    assert_eq!(&back[r], b"\x09\x00\x08to eight");

    // a flow id outside 1..=256 and an empty FLOW_PAYLOAD go to the machine, which counts them
    let bad = seal(&mut cli, b"\x09\x01\x01bad");
    client.send(&bad).unwrap();
    assert!(matches!(&drained(&engine, 1)[0], HandUp::Datagram { data, .. } if data == &bad));

    // not fast: a flow's reply goes up with its flow
    engine.install(SID, gw.clone(), EPOCH, peer, false, t0, None);
    upstream.send_to(b"slow", a8).unwrap();
    assert!(matches!(&drained(&engine, 1)[0],
        HandUp::Upstream { session_id, flow: 8, data } if *session_id == SID && data == b"slow"));

    // closing the upstreams closes every flow's: the next FLOW_PAYLOAD is the machine's
    engine.install(SID, gw.clone(), EPOCH, peer, true, t0, None);
    engine.close_upstream(&SID);
    let after = seal(&mut cli, b"\x09\x00\x07after");
    client.send(&after).unwrap();
    assert!(matches!(&drained(&engine, 1)[0], HandUp::Datagram { data, .. } if data == &after));
}

#[test]
fn a_full_queue_drops_and_counts() {
    let listener = socket();
    let client = socket();
    client.connect(listener.local_addr().unwrap()).unwrap();
    let engine = Engine::new(listener.as_raw_fd(), 4).unwrap();
    for i in 0..10u8 {
        client.send(&[1, 1, 0, 0, i]).unwrap(); // not DATA: always the machine's
    }
    let c = &engine.shared.counters;
    until("ten datagrams read, six of them past the queue", || {
        c.rx_packets.load(Ordering::Relaxed) == 10
            && c.drops[DropReason::QueueFull.code() as usize].load(Ordering::Relaxed) == 6
    });
    assert_eq!(engine.drain(100).len(), 4);
}
