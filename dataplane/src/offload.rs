//! TUN offloads: the virtio-net header a TUN opened with `IFF_VNET_HDR` puts before every
//! packet, segmentation of the TCP (and UDP) super-packets the kernel hands over once
//! `TUNSETOFFLOAD` allows it, and the coalescing of in-order TCP segments (and of runs of
//! one UDP flow's datagrams) into one super-packet for the kernel on the way back.
//!
//! Theory of operation. With offloads on, a read from the TUN is a 10-byte header and an
//! IP packet of up to 64 KiB: the kernel skipped segmentation and, where the header says
//! `NEEDS_CSUM`, the transport checksum. `split` does what the kernel skipped, the way its
//! own GSO does it: every segment is a whole IP packet of at most `gso_size` payload bytes
//! with its IP length, IPv4 identification (the first's, plus one per segment) and header
//! checksum, its TCP sequence number, FIN and PSH only on the last segment, CWR only on the
//! first, and a full transport checksum. Each segment is then sealed as the tunnel's
//! ordinary DATA: the wire carries one inner packet per datagram, as without offloads.
//!
//! On the way back, the packets opened from one received batch go through `coalesce`
//! before they are written: a run of consecutive TCP segments of one flow that the
//! kernel's GRO would merge (same addresses, ports, IP fields and TCP options, contiguous
//! sequence numbers, equal ACK and window, only ACK and PSH set and PSH only on the last,
//! a valid checksum, the same payload size except a shorter last one) is written as one
//! super-packet with a GSO header; so is a run of UDP datagrams of one flow (same
//! addresses, ports and IP fields, IPv4 IDs counting up unless DF is set, a valid non-zero
//! checksum, the same payload size except a shorter last one) as one `GSO_UDP_L4`
//! super-packet, which the kernel cuts again before a socket without UDP GRO sees it;
//! every other packet is written alone behind an all-zero header. The kernel then walks
//! its stack once per run instead of once per packet.
//!
//! Everything here parses bytes that come from the kernel (what local applications sent)
//! or from the tunnel (what the peer sealed): a packet that does not parse is refused
//! (`split`) or written alone as it came (`coalesce`); nothing here panics on any input.

/// `struct virtio_net_hdr` without `num_buffers`: the TUN's default header size.
pub const VNET_HDR_LEN: usize = 10;
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// A super-packet cut into more segments than this is refused (the kernel's own TCP never
/// sends an MSS that small; it bounds the work one read can cause).
pub const MAX_SEGMENTS: usize = 1024;
/// The largest super-packet `coalesce` builds: the IPv4 total length's limit.
pub const MAX_COALESCED: usize = 65_535;
/// Segments merged into one super-packet at most (the kernel's GRO merges up to 64).
pub const MAX_COALESCE_SEGMENTS: usize = 64;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// The header before every packet of an `IFF_VNET_HDR` TUN (little-endian: the TUN's byte
/// order on the little-endian machines this runs on, without `TUNSETVNETBE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr { flags: b[0], gso_type: b[1], hdr_len: u(2), gso_size: u(4), csum_start: u(6), csum_offset: u(8) })
    }

    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Why a packet read from the TUN was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitError {
    /// Shorter than the header, or a header that does not describe the packet after it.
    Malformed,
    /// A GSO type this code was not offered to the kernel for (UFO, ECN).
    Unsupported,
}

/// The ones' complement sum of `b` (not folded, not inverted), added to `acc`.
pub fn sum(b: &[u8], mut acc: u64) -> u64 {
    let mut chunks = b.chunks_exact(4);
    for c in &mut chunks {
        acc += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u16::from_be_bytes([rest[i], rest[i + 1]]) as u64;
        i += 2;
    }
    if i < rest.len() {
        acc += (rest[i] as u64) << 8;
    }
    acc
}

/// `acc` folded to 16 bits (not inverted).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of a transport segment of `len` bytes of `proto` between the
/// addresses of the IP packet `ip` (version read from it).
fn pseudo(ip: &[u8], proto: u8, len: usize) -> u64 {
    let acc = if ip[0] >> 4 == 4 { sum(&ip[12..20], 0) } else { sum(&ip[8..40], 0) };
    acc + proto as u64 + len as u64
}

/// Whether the transport checksum of `pkt` (an IP packet, transport header at `l4`) holds.
fn transport_checksum_ok(pkt: &[u8], l4: usize, proto: u8) -> bool {
    fold(sum(&pkt[l4..], pseudo(pkt, proto, pkt.len() - l4))) == 0xffff
}

/// Write the full transport checksum of `pkt` (transport header at `l4`, its checksum at
/// `l4 + off`).
fn set_transport_checksum(pkt: &mut [u8], l4: usize, off: usize, proto: u8) {
    pkt[l4 + off..l4 + off + 2].fill(0);
    let mut c = !fold(sum(&pkt[l4..], pseudo(pkt, proto, pkt.len() - l4)));
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    pkt[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

fn set_ipv4_checksum(pkt: &mut [u8], ihl: usize) {
    pkt[10..12].fill(0);
    let c = !fold(sum(&pkt[..ihl], 0));
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Packets in one buffer: each a span, with `VNET_HDR_LEN` bytes of room before it.
#[derive(Default)]
pub struct Packets {
    pub buf: Vec<u8>,
    pub spans: Vec<(usize, usize)>,
}

impl Packets {
    pub fn new() -> Self {
        Packets { buf: Vec::with_capacity(1 << 17), spans: Vec::with_capacity(256) }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.spans.clear();
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let (at, len) = self.spans[i];
        &self.buf[at..at + len]
    }

    /// Packet `i` with the header room before it.
    pub fn with_room(&mut self, i: usize) -> &mut [u8] {
        let (at, len) = self.spans[i];
        &mut self.buf[at - VNET_HDR_LEN..at + len]
    }

    /// Append a packet (with room for a header before it).
    pub fn push(&mut self, pkt: &[u8]) {
        let at = self.begin(pkt.len());
        self.buf[at..at + pkt.len()].copy_from_slice(pkt);
        self.commit(at, pkt.len());
    }

    /// Room for a packet of up to `cap` bytes at the end: its offset. `commit` keeps `len`.
    pub fn begin(&mut self, cap: usize) -> usize {
        let at = self.buf.len() + VNET_HDR_LEN;
        self.buf.resize(at + cap, 0);
        at
    }

    pub fn commit(&mut self, at: usize, len: usize) {
        self.buf.truncate(at + len);
        self.spans.push((at, len));
    }

    /// Forget room taken by `begin` without a packet.
    pub fn abandon(&mut self, at: usize) {
        self.buf.truncate(at - VNET_HDR_LEN);
    }
}

/// Where the transport header starts, for a packet without IPv6 extension headers or IPv4
/// fragmentation: (version, IP header length, protocol). None when it does not parse.
fn ip_layout(pkt: &[u8]) -> Option<(u8, usize, u8)> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let ihl = ((pkt[0] & 0x0f) as usize) * 4;
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
            if ihl < 20 || pkt.len() < ihl || frag & 0x3fff != 0 {
                return None; // a fragment carries no transport header of its own
            }
            Some((4, ihl, pkt[9]))
        }
        6 if pkt.len() >= 40 => Some((6, 40, pkt[6])),
        _ => None,
    }
}

/// Cut one read from an offloading TUN (`read`: header and packet) into plain IP packets,
/// appended to `out`; how many. A packet without GSO is passed on whole, its checksum
/// completed where the header asks.
pub fn split(read: &[u8], out: &mut Packets) -> Result<usize, SplitError> {
    let h = VnetHdr::parse(read).ok_or(SplitError::Malformed)?;
    let pkt = &read[VNET_HDR_LEN..];
    if pkt.is_empty() {
        return Err(SplitError::Malformed);
    }
    match h.gso_type {
        GSO_NONE => {
            let at = out.begin(pkt.len());
            out.buf[at..at + pkt.len()].copy_from_slice(pkt);
            if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                let (start, off) = (h.csum_start as usize, h.csum_offset as usize);
                if start + off + 2 > pkt.len() {
                    out.abandon(at);
                    return Err(SplitError::Malformed);
                }
                // the field holds the pseudo-header sum: the rest of the sum goes on it
                let p = &mut out.buf[at..at + pkt.len()];
                let c = !fold(sum(&p[start..], 0));
                p[start + off..start + off + 2].copy_from_slice(&c.to_be_bytes());
            }
            out.commit(at, pkt.len());
            Ok(1)
        }
        GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => split_gso(&h, pkt, out),
        _ => Err(SplitError::Unsupported),
    }
}

fn split_gso(h: &VnetHdr, pkt: &[u8], out: &mut Packets) -> Result<usize, SplitError> {
    let (version, ihl, proto) = ip_layout(pkt).ok_or(SplitError::Malformed)?;
    let want = match h.gso_type {
        GSO_TCPV4 => (4, PROTO_TCP),
        GSO_TCPV6 => (6, PROTO_TCP),
        _ => (version, PROTO_UDP),
    };
    if (version, proto) != want || h.csum_start as usize != ihl {
        return Err(SplitError::Malformed);
    }
    let l4_len = if proto == PROTO_TCP {
        if pkt.len() < ihl + 20 {
            return Err(SplitError::Malformed);
        }
        ((pkt[ihl + 12] >> 4) as usize) * 4
    } else {
        8
    };
    let hdr = ihl + l4_len;
    if l4_len < 8 || pkt.len() < hdr {
        return Err(SplitError::Malformed);
    }
    // the IP length must cover the packet (a super-packet's may say more than 64 KiB: no)
    let ip_len = if version == 4 {
        u16::from_be_bytes([pkt[2], pkt[3]]) as usize
    } else {
        40 + u16::from_be_bytes([pkt[4], pkt[5]]) as usize
    };
    if ip_len != pkt.len() {
        return Err(SplitError::Malformed);
    }
    let mss = h.gso_size as usize;
    let payload = pkt.len() - hdr;
    if mss == 0 || payload == 0 || payload.div_ceil(mss) > MAX_SEGMENTS {
        return Err(SplitError::Malformed);
    }
    let count = payload.div_ceil(mss);
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let (seq0, flags0) = if proto == PROTO_TCP {
        (u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]), pkt[ihl + 13])
    } else {
        (0, 0)
    };
    for k in 0..count {
        let from = hdr + k * mss;
        let n = mss.min(pkt.len() - from);
        let len = hdr + n;
        let at = out.begin(len);
        let s = &mut out.buf[at..at + len];
        s[..hdr].copy_from_slice(&pkt[..hdr]);
        s[hdr..].copy_from_slice(&pkt[from..from + n]);
        if version == 4 {
            s[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            s[4..6].copy_from_slice(&id0.wrapping_add(k as u16).to_be_bytes());
            set_ipv4_checksum(s, ihl);
        } else {
            s[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        }
        if proto == PROTO_TCP {
            let seq = seq0.wrapping_add((k * mss) as u32);
            s[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
            let mut f = flags0;
            if k + 1 < count {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if k > 0 {
                f &= !TCP_CWR;
            }
            s[ihl + 13] = f;
            set_transport_checksum(s, ihl, 16, PROTO_TCP);
        } else {
            s[ihl + 4..ihl + 6].copy_from_slice(&((8 + n) as u16).to_be_bytes());
            set_transport_checksum(s, ihl, 6, PROTO_UDP);
        }
        out.commit(at, len);
    }
    Ok(count)
}

/// (version, IP header length) of a packet of `proto` whose IP header the kernel's GRO
/// would merge: a transport header of at least `l4_min` bytes, the IP length the
/// packet's, for IPv4 no options and a valid header checksum. None otherwise.
fn mergeable_ip(pkt: &[u8], proto: u8, l4_min: usize) -> Option<(u8, usize)> {
    let (version, ihl, p) = ip_layout(pkt)?;
    if p != proto || pkt.len() < ihl + l4_min {
        return None;
    }
    let whole = if version == 4 {
        ihl == 20 && u16::from_be_bytes([pkt[2], pkt[3]]) as usize == pkt.len() && fold(sum(&pkt[..20], 0)) == 0xffff
    } else {
        40 + u16::from_be_bytes([pkt[4], pkt[5]]) as usize == pkt.len()
    };
    whole.then_some((version, ihl))
}

/// What `coalesce` needs of a TCP segment to decide whether it joins a run.
struct Seg {
    v6: bool,
    ihl: usize,
    hdr: usize, // IP and TCP headers
    seq: u32,
    flags: u8,
    payload: usize,
}

fn tcp_seg(pkt: &[u8]) -> Option<Seg> {
    let (version, ihl) = mergeable_ip(pkt, PROTO_TCP, 20)?;
    let doff = ((pkt[ihl + 12] >> 4) as usize) * 4;
    if doff < 20 || pkt.len() < ihl + doff {
        return None;
    }
    let flags = pkt[ihl + 13];
    let payload = pkt.len() - ihl - doff;
    if payload == 0 || flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None; // pure ACKs, SYN, FIN, RST, URG, ECN signals: alone
    }
    let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    Some(Seg { v6: version == 6, ihl, hdr: ihl + doff, seq, flags, payload })
}

/// Whether `b` continues the run whose first segment is `a` (`prev_end`: the sequence
/// number after the run so far, `k`: how many segments it has).
fn joins(a: &[u8], sa: &Seg, b: &[u8], sb: &Seg, prev_end: u32, k: usize) -> bool {
    if sa.v6 != sb.v6 || sa.hdr != sb.hdr || sb.seq != prev_end || sb.payload > sa.payload {
        return false;
    }
    let ihl = sa.ihl;
    let ip_same = if sa.v6 {
        // version, traffic class, flow label; next header, hop limit; addresses
        a[..4] == b[..4] && a[6..40] == b[6..40]
    } else {
        let id_a = u16::from_be_bytes([a[4], a[5]]);
        let id_b = u16::from_be_bytes([b[4], b[5]]);
        // version/IHL, TOS; flags; TTL, protocol; addresses; IDs counting up as the
        // kernel's segmentation of the merged packet makes them again
        a[..2] == b[..2]
            && a[6..7] == b[6..7]
            && a[8..10] == b[8..10]
            && a[12..20] == b[12..20]
            && id_b == id_a.wrapping_add(k as u16)
    };
    // ports; ACK number; data offset (flags apart); window; urgent pointer; options
    ip_same
        && a[ihl..ihl + 4] == b[ihl..ihl + 4]
        && a[ihl + 8..ihl + 13] == b[ihl + 8..ihl + 13]
        && a[ihl + 14..ihl + 16] == b[ihl + 14..ihl + 16]
        && a[ihl + 18..sa.hdr] == b[ihl + 18..sb.hdr]
        && transport_checksum_ok(b, ihl, PROTO_TCP)
}

/// What `coalesce` needs of a UDP datagram to decide whether it joins a run.
struct Dgram {
    v6: bool,
    ihl: usize,
    payload: usize,
}

fn udp_dgram(pkt: &[u8]) -> Option<Dgram> {
    let (version, ihl) = mergeable_ip(pkt, PROTO_UDP, 8)?;
    if pkt.len() - ihl > u16::MAX as usize {
        return None;
    }
    let payload = pkt.len() - ihl - 8;
    // the UDP length must be the packet's; no checksum (IPv4's zero) would come back as one
    if u16::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5]]) as usize != pkt.len() - ihl
        || payload == 0
        || pkt[ihl + 6..ihl + 8] == [0, 0]
        || !transport_checksum_ok(pkt, ihl, PROTO_UDP)
    {
        return None;
    }
    Some(Dgram { v6: version == 6, ihl, payload })
}

/// Whether the UDP datagram `b` continues the run whose first datagram is `a` (`k`: how
/// many the run has): the kernel's UDP GRO rules. Same addresses, ports and IP fields, a
/// payload no larger than the first's; IPv4 IDs counting up, as the kernel's segmentation
/// of the merged packet makes them again, unless both have DF set (an atomic datagram's
/// ID means nothing: the kernel's GRO ignores it, and its segmentation counts up from
/// the first's).
fn udp_joins(a: &[u8], sa: &Dgram, b: &[u8], sb: &Dgram, k: usize) -> bool {
    if sa.v6 != sb.v6 || sb.payload > sa.payload {
        return false;
    }
    let ihl = sa.ihl;
    let ip_same = if sa.v6 {
        a[..4] == b[..4] && a[6..40] == b[6..40]
    } else {
        let id_a = u16::from_be_bytes([a[4], a[5]]);
        let id_b = u16::from_be_bytes([b[4], b[5]]);
        let atomic = a[6] & 0x40 != 0;
        a[..2] == b[..2]
            && a[6..7] == b[6..7]
            && a[8..10] == b[8..10]
            && a[12..20] == b[12..20]
            && (atomic || id_b == id_a.wrapping_add(k as u16))
    };
    ip_same && a[ihl..ihl + 4] == b[ihl..ihl + 4]
}

/// What to write for packets `[first, first + count)` of a batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    /// One packet alone, behind an all-zero header.
    Alone(usize),
    /// A run of TCP segments merged into one super-packet: the first packet and how many.
    Merged(usize, usize),
    /// A run of UDP datagrams merged into one super-packet (`GSO_UDP_L4`).
    MergedUdp(usize, usize),
}

/// Plan the writes of `pkts` in order: runs the kernel's GRO would merge, and the rest
/// alone. Order within a flow is kept (a run is consecutive packets). UDP runs only with
/// `udp` (a kernel that takes `GSO_UDP_L4` from a TUN).
pub fn plan(pkts: &Packets, udp: bool, writes: &mut Vec<Write>) {
    writes.clear();
    let n = pkts.len();
    let mut i = 0;
    while i < n {
        let a = pkts.get(i);
        let Some(sa) = tcp_seg(a) else {
            let k = if udp { udp_run(pkts, i) } else { 1 };
            writes.push(if k > 1 { Write::MergedUdp(i, k) } else { Write::Alone(i) });
            i += k;
            continue;
        };
        if sa.flags & TCP_PSH != 0 || !transport_checksum_ok(a, sa.ihl, PROTO_TCP) {
            writes.push(Write::Alone(i));
            i += 1;
            continue;
        }
        let mut j = i + 1;
        let mut end = sa.seq.wrapping_add(sa.payload as u32);
        let mut total = a.len();
        while j < n && j - i < MAX_COALESCE_SEGMENTS {
            let b = pkts.get(j);
            let Some(sb) = tcp_seg(b) else { break };
            if total + sb.payload > MAX_COALESCED || !joins(a, &sa, b, &sb, end, j - i) {
                break;
            }
            end = end.wrapping_add(sb.payload as u32);
            total += sb.payload;
            j += 1;
            if sb.payload < sa.payload || sb.flags & TCP_PSH != 0 {
                break; // a shorter segment or a PSH ends a run
            }
        }
        writes.push(if j - i > 1 { Write::Merged(i, j - i) } else { Write::Alone(i) });
        i = j;
    }
}

/// How many UDP datagrams from `i` on make one run (1: the packet goes alone).
fn udp_run(pkts: &Packets, i: usize) -> usize {
    let a = pkts.get(i);
    let Some(sa) = udp_dgram(a) else { return 1 };
    let mut j = i + 1;
    let mut total = a.len();
    while j < pkts.len() && j - i < MAX_COALESCE_SEGMENTS {
        let b = pkts.get(j);
        let Some(sb) = udp_dgram(b) else { break };
        if total + sb.payload > MAX_COALESCED || !udp_joins(a, &sa, b, &sb, j - i) {
            break;
        }
        total += sb.payload;
        j += 1;
        if sb.payload < sa.payload {
            break; // a shorter datagram ends a run
        }
    }
    j - i
}

/// Build the super-packet of `count` packets from `first` into `out` (header included):
/// its length. The packets are a run `plan` found (`Merged` or `MergedUdp`).
pub fn merge(pkts: &Packets, first: usize, count: usize, out: &mut Vec<u8>) -> usize {
    let a = pkts.get(first);
    let (v6, ihl, hdr, proto, gso_size) = match tcp_seg(a) {
        Some(s) => (s.v6, s.ihl, s.hdr, PROTO_TCP, s.payload),
        None => {
            let d = udp_dgram(a).expect("plan checked it");
            (d.v6, d.ihl, d.ihl + 8, PROTO_UDP, d.payload)
        }
    };
    out.clear();
    out.resize(VNET_HDR_LEN, 0);
    out.extend_from_slice(a);
    let mut flags = if proto == PROTO_TCP { a[ihl + 13] } else { 0 };
    for k in 1..count {
        let b = pkts.get(first + k);
        out.extend_from_slice(&b[hdr..]);
        if proto == PROTO_TCP {
            flags |= b[ihl + 13] & TCP_PSH;
        }
    }
    let len = out.len() - VNET_HDR_LEN;
    let p = &mut out[VNET_HDR_LEN..];
    if v6 {
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        set_ipv4_checksum(p, ihl);
    }
    let (gso_type, csum_offset) = if proto == PROTO_TCP {
        p[ihl + 13] = flags;
        (if v6 { GSO_TCPV6 } else { GSO_TCPV4 }, 16)
    } else {
        // the whole run's UDP length: the kernel's segmentation sets each datagram's own
        p[ihl + 4..ihl + 6].copy_from_slice(&((len - ihl) as u16).to_be_bytes());
        (GSO_UDP_L4, 6)
    };
    // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, the kernel adds the rest
    let seed = fold(pseudo(p, proto, len - ihl));
    p[ihl + csum_offset..ihl + csum_offset + 2].copy_from_slice(&seed.to_be_bytes());
    let h = VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type,
        hdr_len: hdr as u16,
        gso_size: gso_size as u16,
        csum_start: ihl as u16,
        csum_offset: csum_offset as u16,
    };
    h.write(&mut out[..VNET_HDR_LEN]);
    out.len()
}

/// Whether `b` is `a` as the kernel's segmentation of a merged run gives it back: the
/// same bytes, but for an atomic (DF) IPv4 UDP datagram's ID and so its header checksum.
pub fn same_after_resegmentation(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    let atomic_udp = |p: &[u8]| p.len() >= 20 && p[0] >> 4 == 4 && p[9] == PROTO_UDP && p[6] & 0x40 != 0;
    a.len() == b.len()
        && atomic_udp(a)
        && atomic_udp(b)
        && a[..4] == b[..4]
        && a[6..10] == b[6..10]
        && a[12..] == b[12..]
        && fold(sum(&b[..20], 0)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TCP_URG: u8 = 0x20;
    const TCP_ECE: u8 = 0x40;

    fn ipv4_tcp(payload: &[u8], seq: u32, flags: u8, id: u16, opts: &[u8]) -> Vec<u8> {
        let doff = 20 + opts.len();
        let len = 20 + doff + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        set_ipv4_checksum(&mut p, 20);
        tcp_fill(&mut p, 20, seq, flags, opts, payload);
        p
    }

    fn ipv6_tcp(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let len = 40 + 20 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = PROTO_TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        tcp_fill(&mut p, 40, seq, flags, &[], payload);
        p
    }

    fn tcp_fill(p: &mut [u8], l4: usize, seq: u32, flags: u8, opts: &[u8], payload: &[u8]) {
        p[l4..l4 + 2].copy_from_slice(&5201u16.to_be_bytes());
        p[l4 + 2..l4 + 4].copy_from_slice(&40000u16.to_be_bytes());
        p[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        p[l4 + 8..l4 + 12].copy_from_slice(&77u32.to_be_bytes());
        p[l4 + 12] = (((20 + opts.len()) / 4) as u8) << 4;
        p[l4 + 13] = flags;
        p[l4 + 14..l4 + 16].copy_from_slice(&512u16.to_be_bytes());
        p[l4 + 20..l4 + 20 + opts.len()].copy_from_slice(opts);
        p[l4 + 20 + opts.len()..].copy_from_slice(payload);
        set_transport_checksum(p, l4, 16, PROTO_TCP);
    }

    /// What the kernel hands over with TSO: the whole super-packet, the checksum field
    /// holding the pseudo-header sum only.
    fn as_read(pkt: &[u8], gso_type: u8, mss: u16) -> Vec<u8> {
        let (_, ihl, proto) = ip_layout(pkt).unwrap();
        let off = if proto == PROTO_TCP { 16 } else { 6 };
        let mut p = pkt.to_vec();
        let seed = fold(pseudo(&p, proto, p.len() - ihl));
        p[ihl + off..ihl + off + 2].copy_from_slice(&seed.to_be_bytes());
        let h = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type,
            hdr_len: 0,
            gso_size: mss,
            csum_start: ihl as u16,
            csum_offset: off as u16,
        };
        let mut r = vec![0u8; VNET_HDR_LEN];
        h.write(&mut r);
        r.extend_from_slice(&p);
        r
    }

    fn body(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + 7) as u8).collect()
    }

    fn check_segment(s: &[u8]) -> Seg {
        let (v, ihl, _) = ip_layout(s).unwrap();
        if v == 4 {
            assert_eq!(fold(sum(&s[..ihl], 0)), 0xffff, "IPv4 header checksum");
            assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
        } else {
            assert_eq!(u16::from_be_bytes([s[4], s[5]]) as usize + 40, s.len());
        }
        assert!(transport_checksum_ok(s, ihl, PROTO_TCP), "TCP checksum");
        let doff = ((s[ihl + 12] >> 4) as usize) * 4;
        Seg {
            v6: v == 6,
            ihl,
            hdr: ihl + doff,
            seq: u32::from_be_bytes(s[ihl + 4..ihl + 8].try_into().unwrap()),
            flags: s[ihl + 13],
            payload: s.len() - ihl - doff,
        }
    }

    #[test]
    fn a_tcp_super_packet_is_cut_at_the_mss_with_flags_on_the_right_segments() {
        let data = body(5000);
        let sp = ipv4_tcp(&data, 1000, TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR, 9, &[]);
        let mut out = Packets::new();
        assert_eq!(split(&as_read(&sp, GSO_TCPV4, 1448), &mut out), Ok(4));
        let mut got = Vec::new();
        for k in 0..4 {
            let s = out.get(k);
            let seg = check_segment(s);
            assert_eq!(seg.seq, 1000 + (k as u32) * 1448);
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 9 + k as u16, "IPv4 IDs count up");
            assert_eq!(seg.payload, if k < 3 { 1448 } else { 5000 - 3 * 1448 });
            let last = k == 3;
            assert_eq!(seg.flags & (TCP_PSH | TCP_FIN) != 0, last, "PSH and FIN on the last");
            assert_eq!(seg.flags & TCP_CWR != 0, k == 0, "CWR on the first");
            got.extend_from_slice(&s[seg.hdr..]);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn one_segment_odd_sizes_and_ipv6() {
        for (len, mss) in [(1, 1448), (1448, 1448), (1449, 1448), (777, 100), (65_000, 1220)] {
            let data = body(len);
            for v6 in [false, true] {
                let sp = if v6 { ipv6_tcp(&data, 7, TCP_ACK) } else { ipv4_tcp(&data, 7, TCP_ACK, 1, &[]) };
                if sp.len() > 65_535 + 40 {
                    continue;
                }
                let mut out = Packets::new();
                let t = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
                let n = split(&as_read(&sp, t, mss), &mut out).unwrap();
                assert_eq!(n, len.div_ceil(mss as usize));
                let mut got = Vec::new();
                for k in 0..n {
                    let s = check_segment(out.get(k));
                    assert_eq!(s.v6, v6);
                    got.extend_from_slice(&out.get(k)[s.hdr..]);
                }
                assert_eq!(got, data);
            }
        }
    }

    #[test]
    fn a_udp_super_packet_is_cut_into_datagrams() {
        let data = body(3000);
        let mut p = vec![0u8; 28 + data.len()];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[28..].copy_from_slice(&data);
        let mut out = Packets::new();
        assert_eq!(split(&as_read(&p, GSO_UDP_L4, 1200), &mut out), Ok(3));
        for k in 0..3 {
            let s = out.get(k);
            assert_eq!(fold(sum(&s[..20], 0)), 0xffff);
            assert_eq!(u16::from_be_bytes([s[24], s[25]]) as usize, s.len() - 20);
            assert!(transport_checksum_ok(s, 20, PROTO_UDP));
            assert_eq!(&s[28..], &data[k * 1200..(k * 1200 + 1200).min(3000)]);
        }
    }

    #[test]
    fn a_packet_without_gso_gets_its_checksum_completed() {
        let sp = ipv4_tcp(&body(300), 5, TCP_ACK, 1, &[]);
        let mut read = as_read(&sp, GSO_NONE, 0);
        let mut out = Packets::new();
        assert_eq!(split(&read, &mut out), Ok(1));
        assert_eq!(out.get(0), &sp[..]);
        read[0] = 0; // no NEEDS_CSUM: as it came
        out.clear();
        assert_eq!(split(&read, &mut out), Ok(1));
        assert_eq!(out.get(0), &read[VNET_HDR_LEN..]);
    }

    #[test]
    fn malformed_reads_are_refused() {
        let sp = ipv4_tcp(&body(3000), 5, TCP_ACK, 1, &[]);
        let good = as_read(&sp, GSO_TCPV4, 1000);
        let mut out = Packets::new();
        assert_eq!(split(&good[..5], &mut out), Err(SplitError::Malformed));
        assert_eq!(split(&good[..VNET_HDR_LEN], &mut out), Err(SplitError::Malformed));
        let mut bad = good.clone();
        bad[4] = 0; // gso_size 0
        bad[5] = 0;
        assert_eq!(split(&bad, &mut out), Err(SplitError::Malformed));
        let mut bad = good.clone();
        bad[1] = GSO_TCPV6; // the type does not match the packet
        assert_eq!(split(&bad, &mut out), Err(SplitError::Malformed));
        let mut bad = good.clone();
        bad[1] = 3; // UFO: never offered
        assert_eq!(split(&bad, &mut out), Err(SplitError::Unsupported));
        assert_eq!(split(&good[..good.len() - 1], &mut out), Err(SplitError::Malformed), "length");
        let mut bad = good.clone();
        bad[4..6].copy_from_slice(&1u16.to_le_bytes()); // 3000 segments
        assert_eq!(split(&bad, &mut out), Err(SplitError::Malformed));
        let mut bad = as_read(&sp, GSO_NONE, 0);
        bad[8..10].copy_from_slice(&5000u16.to_le_bytes()); // checksum beyond the packet
        assert_eq!(split(&bad, &mut out), Err(SplitError::Malformed));
        assert!(out.is_empty() && out.buf.is_empty(), "nothing left behind by a refusal");
    }

    fn packets(list: &[Vec<u8>]) -> Packets {
        let mut p = Packets::new();
        for x in list {
            p.push(x);
        }
        p
    }

    /// Merge, then cut again the way the kernel would: the segments come back.
    fn roundtrip(pkts: &Packets, first: usize, count: usize) -> Vec<u8> {
        let mut sp = Vec::new();
        merge(pkts, first, count, &mut sp);
        let h = VnetHdr::parse(&sp).unwrap();
        let mut out = Packets::new();
        assert_eq!(split(&sp, &mut out), Ok(count));
        for k in 0..count {
            assert_eq!(out.get(k), pkts.get(first + k), "segment {k} of the merged run");
        }
        assert_eq!(h.gso_size as usize, check_segment(pkts.get(first)).payload);
        sp
    }

    #[test]
    fn consecutive_segments_of_a_flow_are_merged() {
        let segs: Vec<Vec<u8>> = (0..5)
            .map(|k| {
                let n = if k == 4 { 500 } else { 1400 };
                let f = if k == 4 { TCP_ACK | TCP_PSH } else { TCP_ACK };
                ipv4_tcp(&body(n), 100 + k * 1400, f, 40 + k as u16, &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2])
            })
            .collect();
        let p = packets(&segs);
        let mut w = Vec::new();
        plan(&p, true, &mut w);
        assert_eq!(w, vec![Write::Merged(0, 5)]);
        roundtrip(&p, 0, 5);
        let v6: Vec<Vec<u8>> = (0..3).map(|k| ipv6_tcp(&body(1000), 1 + k * 1000, TCP_ACK)).collect();
        let p = packets(&v6);
        plan(&p, true, &mut w);
        assert_eq!(w, vec![Write::Merged(0, 3)]);
        roundtrip(&p, 0, 3);
    }

    #[test]
    fn segments_the_kernel_would_not_merge_are_written_alone() {
        let a = |seq: u32, f: u8, id: u16| ipv4_tcp(&body(1000), seq, f, id, &[]);
        let mut w = Vec::new();
        let cases: Vec<(Vec<Vec<u8>>, Vec<Write>)> = vec![
            // a gap in the sequence
            (vec![a(0, TCP_ACK, 1), a(2000, TCP_ACK, 2)], vec![Write::Alone(0), Write::Alone(1)]),
            // PSH on the first ends it at once
            (vec![a(0, TCP_ACK | TCP_PSH, 1), a(1000, TCP_ACK, 2)], vec![Write::Alone(0), Write::Alone(1)]),
            // FIN, SYN, RST, URG, ECE
            (vec![a(0, TCP_ACK, 1), a(1000, TCP_ACK | TCP_FIN, 2)], vec![Write::Alone(0), Write::Alone(1)]),
            (vec![a(0, TCP_ACK, 1), a(1000, TCP_ACK | TCP_ECE, 2)], vec![Write::Alone(0), Write::Alone(1)]),
            (vec![a(0, TCP_ACK | TCP_URG, 1), a(1000, TCP_ACK, 2)], vec![Write::Alone(0), Write::Alone(1)]),
            // a larger segment after a smaller one
            (vec![ipv4_tcp(&body(500), 0, TCP_ACK, 1, &[]), a(500, TCP_ACK, 2)], vec![Write::Alone(0), Write::Alone(1)]),
        ];
        for (segs, want) in cases {
            plan(&packets(&segs), true, &mut w);
            assert_eq!(w, want);
        }
        // different options (timestamps moved on), a different window, ack, port, a bad checksum
        let base = a(0, TCP_ACK, 1);
        let ts = |v: u8| ipv4_tcp(&body(1000), 1000, TCP_ACK, 2, &[1, 1, 8, 10, 0, 0, 0, v, 0, 0, 0, 0]);
        let ts0 = ipv4_tcp(&body(1000), 0, TCP_ACK, 1, &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0]);
        plan(&packets(&[ts0.clone(), ts(2)]), true, &mut w);
        assert_eq!(w, vec![Write::Alone(0), Write::Alone(1)]);
        plan(&packets(&[ts0, ts(1)]), true, &mut w);
        assert_eq!(w, vec![Write::Merged(0, 2)]);
        for (at, v) in [(20 + 14, 9u8), (20 + 8, 9), (20 + 1, 9)] {
            let mut b = a(1000, TCP_ACK, 2);
            b[at] = v;
            set_transport_checksum(&mut b, 20, 16, PROTO_TCP);
            plan(&packets(&[base.clone(), b]), true, &mut w);
            assert_eq!(w, vec![Write::Alone(0), Write::Alone(1)], "byte {at}");
        }
        let mut b = a(1000, TCP_ACK, 2);
        b[100] ^= 1; // corrupted in flight: the kernel must see it alone (and drop it)
        plan(&packets(&[base.clone(), b]), true, &mut w);
        assert_eq!(w, vec![Write::Alone(0), Write::Alone(1)]);
        // another flow in between: three runs of one
        let other = ipv6_tcp(&body(1000), 0, TCP_ACK);
        plan(&packets(&[base.clone(), other, a(1000, TCP_ACK, 2)]), true, &mut w);
        assert_eq!(w, vec![Write::Alone(0), Write::Alone(1), Write::Alone(2)]);
        // IPv4 IDs that do not count up without DF
        let mut x = a(0, TCP_ACK, 1);
        let mut y = a(1000, TCP_ACK, 7);
        for p in [&mut x, &mut y] {
            p[6] = 0;
            set_ipv4_checksum(p, 20);
        }
        plan(&packets(&[x, y]), true, &mut w);
        assert_eq!(w, vec![Write::Alone(0), Write::Alone(1)]);
        // an IPv4 header checksum that does not hold
        let mut y = a(1000, TCP_ACK, 2);
        y[10] ^= 1;
        plan(&packets(&[a(0, TCP_ACK, 1), y]), true, &mut w);
        assert_eq!(w, vec![Write::Alone(0), Write::Alone(1)]);
        // non-TCP and garbage
        plan(&packets(&[vec![0x45], vec![], base]), true, &mut w);
        assert_eq!(w, vec![Write::Alone(0), Write::Alone(1), Write::Alone(2)]);
    }

    #[test]
    fn a_run_stops_at_64_segments_and_64_kib() {
        let segs: Vec<Vec<u8>> = (0..70).map(|k| ipv4_tcp(&body(100), k * 100, TCP_ACK, k as u16, &[])).collect();
        let mut w = Vec::new();
        plan(&packets(&segs), true, &mut w);
        assert_eq!(w, vec![Write::Merged(0, 64), Write::Merged(64, 6)]);
        let segs: Vec<Vec<u8>> = (0..50).map(|k| ipv4_tcp(&body(1400), k * 1400, TCP_ACK, k as u16, &[])).collect();
        let p = packets(&segs);
        plan(&p, true, &mut w);
        assert_eq!(w, vec![Write::Merged(0, 46), Write::Merged(46, 4)]);
        let mut sp = Vec::new();
        assert!(merge(&p, 0, 46, &mut sp) - VNET_HDR_LEN <= MAX_COALESCED);
    }

    fn ipv4_udp(payload: &[u8], id: u16, df: bool, sport: u16) -> Vec<u8> {
        let len = 28 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        set_ipv4_checksum(&mut p, 20);
        udp_fill(&mut p, 20, sport, payload);
        p
    }

    fn ipv6_udp(payload: &[u8], sport: u16) -> Vec<u8> {
        let len = 48 + payload.len();
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = PROTO_UDP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        udp_fill(&mut p, 40, sport, payload);
        p
    }

    fn udp_fill(p: &mut [u8], l4: usize, sport: u16, payload: &[u8]) {
        let ulen = (p.len() - l4) as u16;
        p[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
        p[l4 + 2..l4 + 4].copy_from_slice(&9000u16.to_be_bytes());
        p[l4 + 4..l4 + 6].copy_from_slice(&ulen.to_be_bytes());
        p[l4 + 8..].copy_from_slice(payload);
        set_transport_checksum(p, l4, 6, PROTO_UDP);
    }

    /// Merge a UDP run, then cut it again the way the kernel would: the datagrams come
    /// back, each with valid checksums (exactly, but for an atomic datagram's IPv4 ID).
    fn udp_roundtrip(pkts: &Packets, first: usize, count: usize) {
        let mut sp = Vec::new();
        merge(pkts, first, count, &mut sp);
        let h = VnetHdr::parse(&sp).unwrap();
        assert_eq!(h.gso_type, GSO_UDP_L4);
        assert_eq!(h.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
        let (_, ihl, _) = ip_layout(pkts.get(first)).unwrap();
        assert_eq!((h.csum_start as usize, h.csum_offset, h.hdr_len as usize), (ihl, 6, ihl + 8));
        assert_eq!(h.gso_size as usize, pkts.get(first).len() - ihl - 8);
        let p = &sp[VNET_HDR_LEN..];
        assert_eq!(u16::from_be_bytes([p[ihl + 4], p[ihl + 5]]) as usize, p.len() - ihl, "the run's UDP length");
        let mut out = Packets::new();
        assert_eq!(split(&sp, &mut out), Ok(count));
        for k in 0..count {
            let (a, b) = (pkts.get(first + k), out.get(k));
            assert!(same_after_resegmentation(a, b), "datagram {k} of the merged run");
            assert!(udp_dgram(b).is_some(), "datagram {k}: lengths and checksums hold");
        }
    }

    #[test]
    fn consecutive_datagrams_of_a_udp_flow_are_merged() {
        // a connected socket's datagrams: IDs counting up, DF or not; a shorter last one
        for df in [false, true] {
            let segs: Vec<Vec<u8>> =
                (0..5).map(|k| ipv4_udp(&body(if k == 4 { 300 } else { 1372 }), 500 + k, df, 4000)).collect();
            let p = packets(&segs);
            let mut w = Vec::new();
            plan(&p, true, &mut w);
            assert_eq!(w, vec![Write::MergedUdp(0, 5)]);
            udp_roundtrip(&p, 0, 5);
            let mut sp = Vec::new();
            merge(&p, 0, 5, &mut sp);
            let mut out = Packets::new();
            split(&sp, &mut out).unwrap();
            for (k, seg) in segs.iter().enumerate() {
                assert_eq!(out.get(k), &seg[..], "counting IDs come back exactly");
            }
            plan(&p, false, &mut w);
            assert_eq!(w.len(), 5, "without UDP GSO every datagram goes alone");
        }
        // an unconnected socket's: DF and ID 0 on every one (atomic: the ID means nothing)
        let segs: Vec<Vec<u8>> = (0..3).map(|_| ipv4_udp(&body(1000), 0, true, 4000)).collect();
        let p = packets(&segs);
        let mut w = Vec::new();
        plan(&p, true, &mut w);
        assert_eq!(w, vec![Write::MergedUdp(0, 3)]);
        udp_roundtrip(&p, 0, 3);
        let v6: Vec<Vec<u8>> = (0..4).map(|_| ipv6_udp(&body(1200), 4000)).collect();
        let p = packets(&v6);
        plan(&p, true, &mut w);
        assert_eq!(w, vec![Write::MergedUdp(0, 4)]);
        udp_roundtrip(&p, 0, 4);
    }

    #[test]
    fn datagrams_the_kernel_would_not_merge_are_written_alone() {
        let d = |id: u16| ipv4_udp(&body(1000), id, true, 4000);
        let alone2 = vec![Write::Alone(0), Write::Alone(1)];
        let mut w = Vec::new();
        let check = |list: &[Vec<u8>], want: &[Write], what: &str| {
            let mut w = Vec::new();
            plan(&packets(list), true, &mut w);
            assert_eq!(w, want, "{what}");
        };
        check(&[d(1), ipv4_udp(&body(1000), 2, true, 4001)], &alone2, "another source port");
        check(&[ipv4_udp(&body(500), 1, true, 4000), d(2)], &alone2, "a larger after a smaller");
        check(&[ipv4_udp(&body(1000), 1, false, 4000), ipv4_udp(&body(1000), 1, false, 4000)], &alone2, "no DF, same ID");
        check(&[ipv4_udp(&body(1000), 1, false, 4000), ipv4_udp(&body(1000), 1, true, 4000)], &alone2, "DF on one");
        check(&[d(1), ipv6_udp(&body(1000), 4000)], &alone2, "another IP version");
        for (at, what) in [(8, "TTL"), (1, "TOS"), (19, "address")] {
            let mut b = d(2);
            b[at] ^= 1;
            set_ipv4_checksum(&mut b, 20);
            set_transport_checksum(&mut b, 20, 6, PROTO_UDP);
            check(&[d(1), b], &alone2, what);
        }
        let mut b = d(2);
        b[100] ^= 1; // corrupted: the kernel must see it alone (and drop it)
        check(&[d(1), b.clone()], &alone2, "a bad UDP checksum");
        check(&[b, d(1)], &alone2, "a bad UDP checksum first");
        let mut b = d(2);
        b[26..28].fill(0); // no checksum: merged it would get one
        check(&[d(1), b], &alone2, "a zero UDP checksum");
        let mut b = d(2);
        b[10] ^= 1;
        check(&[d(1), b], &alone2, "a bad IPv4 header checksum");
        let mut b = d(2);
        b[24..26].copy_from_slice(&900u16.to_be_bytes());
        set_transport_checksum(&mut b, 20, 6, PROTO_UDP);
        check(&[d(1), b], &alone2, "a UDP length that is not the packet's");
        let mut b = ipv4_udp(&body(1000), 2, true, 4000);
        b.truncate(28);
        b[2..4].copy_from_slice(&28u16.to_be_bytes());
        b[24..26].copy_from_slice(&8u16.to_be_bytes());
        set_ipv4_checksum(&mut b, 20);
        set_transport_checksum(&mut b, 20, 6, PROTO_UDP);
        check(&[d(1), b], &alone2, "an empty datagram");
        // a shorter one ends the run; the next run starts after it
        let segs = [d(1), d(2), ipv4_udp(&body(10), 3, true, 4000), d(4), d(5)];
        check(&segs, &[Write::MergedUdp(0, 3), Write::MergedUdp(3, 2)], "a shorter datagram ends a run");
        // TCP between UDP of one flow: order kept, three writes
        let t = ipv4_tcp(&body(1000), 0, TCP_ACK, 1, &[]);
        check(&[d(1), t, d(2)], &[Write::Alone(0), Write::Alone(1), Write::Alone(2)], "a TCP segment between");
        // a run stops at 64 datagrams and at 64 KiB
        let many: Vec<Vec<u8>> = (0..70).map(|k| ipv4_udp(&body(100), k, true, 4000)).collect();
        plan(&packets(&many), true, &mut w);
        assert_eq!(w, vec![Write::MergedUdp(0, 64), Write::MergedUdp(64, 6)]);
        let big: Vec<Vec<u8>> = (0..50).map(|k| ipv4_udp(&body(1400), k, true, 4000)).collect();
        let p = packets(&big);
        plan(&p, true, &mut w);
        assert_eq!(w, vec![Write::MergedUdp(0, 46), Write::MergedUdp(46, 4)]);
        let mut sp = Vec::new();
        assert!(merge(&p, 0, 46, &mut sp) - VNET_HDR_LEN <= MAX_COALESCED);
        udp_roundtrip(&p, 0, 46);
    }

    proptest! {
        /// Any UDP super-packet cut by `split` at any size is merged back by `plan` and
        /// `merge`: cut again, the same datagrams, every checksum recomputed and holding.
        #[test]
        fn udp_split_then_merge_gives_the_datagrams_back(
            len in 1usize..20_000, size in 64u16..2000, v6: bool, df: bool, id: u16, sport: u16,
        ) {
            let data = body(len);
            let sp = if v6 { ipv6_udp(&data, sport) } else { ipv4_udp(&data, id, df, sport) };
            let mut segs = Packets::new();
            let n = split(&as_read(&sp, GSO_UDP_L4, size), &mut segs).unwrap();
            prop_assert_eq!(n, len.div_ceil(size as usize));
            let mut w = Vec::new();
            plan(&segs, true, &mut w);
            let mut got = Vec::new();
            let mut covered = 0;
            for x in &w {
                match *x {
                    Write::Alone(i) => {
                        prop_assert_eq!(i, covered);
                        prop_assert!(udp_dgram(segs.get(i)).is_some());
                        covered += 1;
                    }
                    Write::MergedUdp(i, c) => {
                        prop_assert_eq!(i, covered);
                        udp_roundtrip(&segs, i, c);
                        covered += c;
                    }
                    Write::Merged(..) => prop_assert!(false, "UDP planned as TCP"),
                }
            }
            prop_assert_eq!(covered, n);
            for i in 0..n {
                let ihl = if v6 { 40 } else { 20 };
                got.extend_from_slice(&segs.get(i)[ihl + 8..]);
            }
            prop_assert_eq!(got, data);
            if n > 1 {
                prop_assert!(w.len() < n, "a cut super-packet is merged again");
            }
        }
    }

    proptest! {
        /// Any TCP stream cut by `split` at any MSS is merged back by `plan` and `merge`
        /// into the same super-packet payload; every segment's checksums hold.
        #[test]
        fn split_then_merge_gives_the_stream_back(len in 1usize..20_000, mss in 64u16..2000, v6: bool, seq: u32, psh: bool) {
            let data = body(len);
            let f = TCP_ACK | if psh { TCP_PSH } else { 0 };
            let sp = if v6 { ipv6_tcp(&data, seq, f) } else { ipv4_tcp(&data, seq, f, 3, &[]) };
            let mut segs = Packets::new();
            let n = split(&as_read(&sp, if v6 { GSO_TCPV6 } else { GSO_TCPV4 }, mss), &mut segs).unwrap();
            for k in 0..n {
                check_segment(segs.get(k));
            }
            let mut w = Vec::new();
            plan(&segs, true, &mut w);
            let mut got = Vec::new();
            for x in &w {
                match *x {
                    Write::Alone(i) => {
                        let s = check_segment(segs.get(i));
                        got.extend_from_slice(&segs.get(i)[s.hdr..]);
                    }
                    Write::Merged(i, c) => {
                        let m = roundtrip(&segs, i, c);
                        let hdr = check_segment(segs.get(i)).hdr;
                        got.extend_from_slice(&m[VNET_HDR_LEN + hdr..]);
                    }
                    Write::MergedUdp(..) => prop_assert!(false, "TCP planned as UDP"),
                }
            }
            prop_assert_eq!(got, data);
            if n > 1 {
                prop_assert!(w.len() < n, "a split stream is merged again");
            }
        }

        /// Arbitrary bytes never panic either way.
        #[test]
        fn arbitrary_input_never_panics(read in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let mut out = Packets::new();
            let _ = split(&read, &mut out);
            let mut p = Packets::new();
            p.push(&read);
            p.push(&read);
            let mut w = Vec::new();
            plan(&p, true, &mut w);
            let mut sp = Vec::new();
            for x in &w {
                if let Write::Merged(i, c) | Write::MergedUdp(i, c) = *x {
                    merge(&p, i, c, &mut sp);
                }
            }
        }
    }
}
