//! The gateway engine behind a balancer (a fake one: a loopback socket that puts the
//! client's address before each datagram) and at the keys' reject-after age.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use jvpn_dataplane::balancer::{Trusted, PREFIX_MAGIC};
use jvpn_dataplane::channel::Channel;
use jvpn_dataplane::engine::{monotonic, Engine, HandUp, PeerKeys};
use jvpn_dataplane::reasons::DropReason;

mod common;
use common::{drained, recv, recv_within, seal, socket, until};

const SID: [u8; 16] = [9; 16];
const EPOCH: u32 = 2;

/// What nginx's filter puts before a datagram of an IPv4 client.
fn prefixed(client: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(a) = client else { panic!("IPv4 only here") };
    let mut v = PREFIX_MAGIC.to_vec();
    v.extend([4, 0]);
    v.extend(a.port().to_be_bytes());
    v.extend(a.ip().octets());
    v.extend([0u8; 12]);
    v.extend(msg);
    v
}

fn drops(e: &Engine, r: DropReason) -> u64 {
    e.shared.counters.drops[r.code() as usize].load(Ordering::Relaxed)
}

struct Setup {
    listener: UdpSocket,
    upstream: UdpSocket,
    engine: Engine,
    cli: Channel,
    gw: Arc<Mutex<Channel>>,
}

fn setup() -> Setup {
    let listener = socket("127.0.0.1");
    let upstream = socket("127.0.0.1");
    let engine = Engine::new(listener.as_raw_fd(), 64).unwrap();
    let (c2g, g2c) = ([3u8; 32], [4u8; 32]);
    let cli = Channel::new(&c2g, &g2c, SID, EPOCH).unwrap();
    let gw = Arc::new(Mutex::new(Channel::new(&g2c, &c2g, SID, EPOCH).unwrap()));
    Setup { listener, upstream, engine, cli, gw }
}

/// Open the binding's upstream socket (the machine's first payload) and learn its address.
fn open_upstream(s: &Setup) -> SocketAddr {
    s.engine.to_upstream(&SID, 0, s.upstream.local_addr().unwrap(), b"first").unwrap();
    let (data, from) = recv_within(&s.upstream, "the machine's first payload");
    assert_eq!(data, b"first");
    from
}

#[test]
fn behind_a_balancer_the_prefix_names_the_peer_and_replies_go_to_the_balancer() {
    let mut s = setup();
    let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
    let nginx = socket("127.0.0.1");
    let stranger = socket("127.0.0.2");
    for sock in [&nginx, &stranger] {
        sock.connect(s.listener.local_addr().unwrap()).unwrap();
    }
    let via = nginx.local_addr().unwrap();
    s.engine.set_trusted(Trusted::new([("127.0.0.1".parse().unwrap(), 32)]).unwrap());
    let t0 = monotonic();
    s.engine.set_lease(t0 + 60.0, t0);
    let extra = PeerKeys { via: Some(via), keys_made_ms: None };
    s.engine.install_with(SID, s.gw.clone(), EPOCH, client, true, t0, None, extra);
    let from_engine = open_upstream(&s);

    // the plain case through the balancer: forwarded, and the sealed reply goes back to
    // the balancer's socket without a prefix (nginx relays it to the client unchanged)
    nginx.send(&prefixed(client, &seal(&mut s.cli, b"\x01through nginx"))).unwrap();
    assert_eq!(recv_within(&s.upstream, "the forwarded payload").0, b"through nginx");
    s.upstream.send_to(b"reply", from_engine).unwrap();
    let (mut back, _) = recv_within(&nginx, "the sealed reply at the balancer");
    let r = s.cli.open_in_place(&mut back, true).unwrap();
    assert_eq!(&back[r], b"\x01reply");
    assert_eq!(s.engine.shared.counters.forwarded.load(Ordering::Relaxed), 1);

    // from the balancer without a prefix: a misconfiguration, dropped and counted
    nginx.send(&seal(&mut s.cli, b"\x01bare")).unwrap();
    until("MISSING_PREFIX", || drops(&s.engine, DropReason::MissingPrefix) == 1);
    // a prefix from anyone else: a forgery, dropped and counted
    stranger.send(&prefixed(client, &seal(&mut s.cli, b"\x01forged"))).unwrap();
    until("UNTRUSTED_PREFIX", || drops(&s.engine, DropReason::UntrustedPrefix) == 1);
    assert!(recv(&s.upstream).is_none());
    assert!(s.engine.drain(64).is_empty());

    // not the binding's peer: another client behind the balancer, the same client through
    // another balancer socket (a reload), the client's packet straight from elsewhere; each
    // goes up as it came (prefix and all) for the machine to decide
    let other = "203.0.113.8:40000".parse().unwrap();
    let reloaded = socket("127.0.0.1");
    reloaded.connect(s.listener.local_addr().unwrap()).unwrap();
    let cases = [
        (&nginx, prefixed(other, &seal(&mut s.cli, b"\x01another client"))),
        (&reloaded, prefixed(client, &seal(&mut s.cli, b"\x01new flow"))),
        (&stranger, seal(&mut s.cli, b"\x01direct")),
    ];
    for (sock, data) in &cases {
        sock.send(data).unwrap();
        match &drained(&s.engine, 1)[0] {
            HandUp::Datagram { data: up, from } => {
                assert_eq!(up, data);
                assert_eq!(*from, sock.local_addr().unwrap());
            }
            _ => panic!("expected a datagram"),
        }
    }
    assert!(recv(&s.upstream).is_none());
    assert_eq!(s.engine.shared.counters.forwarded.load(Ordering::Relaxed), 1);
}

#[test]
fn past_reject_after_nothing_is_carried_either_way() {
    let mut s = setup();
    let client = socket("127.0.0.1");
    client.connect(s.listener.local_addr().unwrap()).unwrap();
    let peer = client.local_addr().unwrap();
    let t0 = monotonic();
    s.engine.set_lease(t0 + 60.0, t0);
    let reject_after_ms = 180_000.0;
    let offset_ms = 5_000_000.0; // the store's clock ahead of ours
    s.engine.set_keys_clock(offset_ms, reject_after_ms);
    let store_now = t0 * 1000.0 + offset_ms;
    let fresh = PeerKeys { via: None, keys_made_ms: Some(store_now - 1_000.0) };
    s.engine.install_with(SID, s.gw.clone(), EPOCH, peer, true, t0, None, fresh);
    let from_engine = open_upstream(&s);
    client.send(&seal(&mut s.cli, b"\x01young keys")).unwrap();
    assert_eq!(recv_within(&s.upstream, "the forwarded payload").0, b"young keys");
    s.upstream.send_to(b"reply", from_engine).unwrap();
    recv_within(&client, "the sealed reply");

    // the same binding, its secret made more than reject-after ago: the payload and the
    // reply go to the machine (which refuses both with KEYS_EXPIRED), nothing is carried
    let old = PeerKeys { via: None, keys_made_ms: Some(store_now - reject_after_ms - 1_000.0) };
    s.engine.install_with(SID, s.gw.clone(), EPOCH, peer, true, t0, None, old);
    let late = seal(&mut s.cli, b"\x01old keys");
    client.send(&late).unwrap();
    assert!(matches!(&drained(&s.engine, 1)[0], HandUp::Datagram { data, .. } if data == &late));
    s.upstream.send_to(b"late reply", from_engine).unwrap();
    assert!(matches!(&drained(&s.engine, 1)[0],
                     HandUp::Upstream { session_id, flow: 0, data } if *session_id == SID && data == b"late reply"));
    assert!(recv(&s.upstream).is_none());
    assert!(recv(&client).is_none());
    assert_eq!(s.engine.shared.counters.forwarded.load(Ordering::Relaxed), 1);
    assert_eq!(s.engine.shared.counters.returned.load(Ordering::Relaxed), 1);
    // the packet handed up was only verified: the machine can still open it
    let mut copy = late.clone();
    assert!(s.gw.lock().unwrap().open_in_place(&mut copy, true).is_ok());
}
