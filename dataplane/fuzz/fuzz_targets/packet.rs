//! Everything the data plane parses from the network, fed arbitrary bytes: the header,
//! the DATA prefix, a decrypted inner message's datagram (PAYLOAD, FLOW_PAYLOAD), a
//! channel's open (replay window and AEAD, committing and not), the replay window driven
//! by the input's counters, an IP packet's addresses as cryptokey routing reads them
//! (uplink check, downlink owner), the balancer's client-address prefix from a trusted
//! and an untrusted source, a read from an offloading TUN (virtio-net header, TCP/UDP
//! super-packet), the coalescing of a batch of packets (TCP and UDP runs) and the rejoining
//! of a batch's IPv4 fragments. No input may panic; every refusal is a DropReason; a
//! refused packet never moves the window.
#![no_main]

use jvpn_dataplane::balancer::{self, Trusted, PREFIX_LEN};
use jvpn_dataplane::channel::Channel;
use jvpn_dataplane::frag;
use jvpn_dataplane::offload;
use jvpn_dataplane::reasons::DropReason;
use jvpn_dataplane::replay::ReplayWindow;
use jvpn_dataplane::route::{self, Downlink, Owners, Prefix, Route, TunnelDrop};
use jvpn_dataplane::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The input as a datagram from a balancer, trusted and not: the message after a valid
    // prefix is the rest of the input; a refusal is one of the two prefix reasons.
    let trusted = Trusted::new([("10.0.0.0".parse().expect("v4"), 8)]).expect("len");
    for from in ["10.1.2.3:4000", "192.0.2.1:4000"] {
        match balancer::sender(&trusted, data, from.parse().expect("addr")) {
            Ok(s) => {
                assert!(s.msg.len() == data.len() || s.msg.len() + PREFIX_LEN == data.len());
                assert!(s.client.port() != 0 || s.via.is_none());
            }
            Err(r) => assert!(matches!(r, DropReason::MissingPrefix | DropReason::UntrustedPrefix)),
        }
    }
    let _ = wire::peek_header(data);
    let parsed = wire::parse_data(data);
    // A channel of the packet's own session and epoch, so the input reaches the replay
    // window and the AEAD instead of stopping at the session check.
    let (sid, epoch) = match parsed {
        Ok(h) => (h.session_id, h.epoch),
        Err(_) => ([0u8; 16], 0),
    };
    let mut ch = Channel::new(&[1; 32], &[2; 32], sid, epoch).expect("distinct keys");
    let mut buf = data.to_vec();
    let before = ch.highest_received();
    if let Err(_reason) = ch.open_in_place(&mut buf, false) {
        assert_eq!(buf, data, "a refused packet is left as it came");
    }
    assert_eq!(ch.highest_received(), before, "verification alone never moves the window");
    let opened = ch.open_in_place(&mut buf, true);
    if opened.is_err() {
        assert_eq!(ch.highest_received(), before, "a refused packet never moves the window");
    }

    // The input as a decrypted inner message: a PAYLOAD's or a FLOW_PAYLOAD's datagram lies
    // inside it, after its prefix, with a flow id in 1..=MAX_FLOWS (0 for a PAYLOAD).
    if let Some((flow, at)) = wire::inner_datagram(data) {
        assert!(at <= data.len() && data.len() - at <= wire::MAX_PAYLOAD_SIZE);
        assert_eq!(flow == 0, data[0] == wire::INNER_PAYLOAD);
        assert!(flow <= wire::MAX_FLOWS);
    }

    // The input as an IP packet (what a TUN or a tunnel hands the engine).
    let own = ["10.77.0.5".parse().expect("v4"), "fd77::5".parse().expect("v6")];
    let r = Route { own, prefixes: vec![Prefix::new("10.0.0.0".parse().expect("v4"), 8).expect("len")] };
    let verdict = r.check_uplink(data);
    match route::addresses(data) {
        None => assert_eq!(verdict, Some(TunnelDrop::Malformed)),
        Some((src, dst)) => assert_eq!(verdict.is_none(), r.owns(&src) && r.allows(&dst)),
    }
    let mut owners = Owners::default();
    owners.add([7; 16], &r);
    if let Downlink::Session(sid, _) = owners.owner(data) {
        assert_eq!(sid, [7; 16]);
    }

    // The input as a read from an offloading TUN (virtio-net header and packet, from the
    // kernel: what local applications sent): refused, or cut into whole IP packets, each
    // no longer than the input, and nothing left behind by a refusal.
    let mut segs = offload::Packets::new();
    match offload::split(data, &mut segs) {
        Ok(n) => {
            assert_eq!(n, segs.len());
            assert!(n >= 1 && n <= offload::MAX_SEGMENTS);
            for i in 0..n {
                assert!(segs.get(i).len() + offload::VNET_HDR_LEN <= data.len());
            }
        }
        Err(_) => assert!(segs.is_empty() && segs.buf.is_empty()),
    }
    // The input (and its segments) as a batch opened from the tunnel: whatever runs the
    // plan merges, each merged packet is a whole super-packet of the run's bytes.
    let mut batch = offload::Packets::new();
    batch.push(data);
    for i in 0..segs.len() {
        batch.push(segs.get(i));
    }
    batch.push(data);
    let mut plan = Vec::new();
    offload::plan(&batch, true, &mut plan);
    let mut covered = 0;
    let mut merged = Vec::new();
    for w in &plan {
        match *w {
            offload::Write::Alone(i) => {
                assert_eq!(i, covered);
                covered += 1;
            }
            offload::Write::Merged(i, k) | offload::Write::MergedUdp(i, k) => {
                assert_eq!(i, covered);
                assert!(k >= 2 && k <= offload::MAX_COALESCE_SEGMENTS);
                let len = offload::merge(&batch, i, k, &mut merged);
                assert!(len - offload::VNET_HDR_LEN <= offload::MAX_COALESCED);
                // cut again as the kernel would: the run's packets come back
                let mut again = offload::Packets::new();
                assert_eq!(offload::split(&merged, &mut again), Ok(k));
                for j in 0..k {
                    assert!(offload::same_after_resegmentation(batch.get(i + j), again.get(j)));
                }
                covered += k;
            }
        }
    }
    assert_eq!(covered, batch.len());

    // The input as IPv4 fragments opened from the tunnel: two pieces cut where its first
    // byte says, and itself, each piece's header checksum made valid so that the rest of
    // the rejoining's checks are reached. Whatever is rejoined, no byte is lost but the
    // headers of the pieces after a chain's first, and a rejoined datagram is one valid
    // IPv4 packet; with nothing rejoined the batch comes back as it went.
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut pieces = offload::Packets::new();
    for piece in [&data[..cut], &data[cut..], data] {
        let mut p = piece.to_vec();
        if p.len() >= 20 {
            p[10..12].fill(0);
            let c = !offload::fold(offload::sum(&p[..20], 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        pieces.push(&p);
    }
    let mut whole = offload::Packets::new();
    let rejoined = frag::rejoin(&pieces, &mut whole);
    let bytes = |p: &offload::Packets| (0..p.len()).map(|i| p.get(i).len()).sum::<usize>();
    assert_eq!(bytes(&pieces) - bytes(&whole), 20 * (pieces.len() - whole.len()));
    assert!(rejoined <= (pieces.len() - whole.len()));
    if rejoined == 0 {
        assert!((0..3).all(|i| pieces.get(i) == whole.get(i)));
    }
    for i in 0..whole.len() {
        let p = whole.get(i);
        if p.len() >= 20 && p[0] == 0x45 && p[6..8] == [0, 0] && rejoined > 0 {
            assert_eq!(offload::fold(offload::sum(&p[..20], 0)), 0xffff);
        }
    }

    // The input as counters: the window's answers stay consistent with each other.
    let mut w = ReplayWindow::new();
    let mut highest: Option<u64> = None;
    for chunk in data.chunks_exact(8) {
        let c = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let would = w.check(c);
        assert_eq!(w.update(c), would, "check answers what update does");
        assert!(!w.check(c), "a counter is accepted at most once");
        if would {
            highest = Some(highest.map_or(c, |h| h.max(c)));
        }
        assert_eq!(w.highest(), highest);
    }
});
