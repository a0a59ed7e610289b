//! Rejoining the IPv4 fragments of one datagram that arrive in one batch, before the
//! engine writes them to the TUN.
//!
//! Why. A datagram larger than the tunnel's MTU leaves the sender's kernel as fragments,
//! and each fragment crosses the tunnel as its own DATA (the wire carries one inner packet
//! per datagram). Written to the TUN as they came, every fragment costs a write and a walk
//! of the kernel's stack, and a node with NAT egress (conntrack) reassembles them there
//! anyway. The fragments of one datagram nearly always arrive together, in order, in the
//! same received batch: written as the one datagram they make, they cost one write, and
//! the datagrams of one flow then merge into a UDP super-packet (`offload::plan`), as
//! whole datagrams do.
//!
//! What is rejoined, and nothing else: a chain of consecutive packets of the batch that
//! are IPv4 without options, with valid header checksums and lengths, of one datagram
//! (the same source, destination, protocol, identification and TOS), the first at offset
//! 0, each next one starting exactly where the previous one ended (no gap, no overlap),
//! every one but the last with more-fragments set and a payload a multiple of 8, the last
//! without it, at most `MAX_FRAGMENTS` of them and at most 65,535 bytes in all. The result
//! is the first fragment's header with the whole length, no fragment bits and a new
//! checksum, followed by the payloads in order: the datagram the receiver's reassembly
//! would build. Every other packet, including a chain that is incomplete in this batch,
//! goes on as it came and the kernel reassembles it, or not, as before. Nothing is held
//! between batches (no state an attacker could fill), nothing here panics on any input,
//! and the packets were each authenticated and routed (their source address checked
//! against the session's) before they got here.

use crate::offload::{fold, sum, Packets};

/// A chain of more fragments than this is not rejoined (64 KiB in 1,024-byte pieces).
pub const MAX_FRAGMENTS: usize = 64;
const IP_MAX: usize = 65_535;
const MF: u16 = 0x2000;
const OFFSET: u16 = 0x1fff;

/// An IPv4 fragment's offset (bytes) and more-fragments flag; None for anything else, a
/// packet with options, a bad length or checksum, or the reserved or DF bit set.
fn fragment(p: &[u8]) -> Option<(usize, bool)> {
    if p.len() <= 20 || p[0] != 0x45 || u16::from_be_bytes([p[2], p[3]]) as usize != p.len() {
        return None;
    }
    let field = u16::from_be_bytes([p[6], p[7]]);
    if field & !(MF | OFFSET) != 0 || field & (MF | OFFSET) == 0 || fold(sum(&p[..20], 0)) != 0xffff {
        return None;
    }
    Some((((field & OFFSET) as usize) * 8, field & MF != 0))
}

/// Whether `p` may be a fragment (cheap: the flags, no checksum), to skip whole batches.
fn maybe_fragment(p: &[u8]) -> bool {
    p.len() > 20 && p[0] == 0x45 && u16::from_be_bytes([p[6], p[7]]) & (MF | OFFSET) != 0
}

/// The same datagram's fragment: TOS, identification, protocol, source and destination.
fn same_datagram(a: &[u8], b: &[u8]) -> bool {
    a[1] == b[1] && a[4..6] == b[4..6] && a[9] == b[9] && a[12..20] == b[12..20]
}

/// How many packets from `i` on make one whole datagram (0: they do not).
fn chain(pkts: &Packets, i: usize) -> usize {
    let a = pkts.get(i);
    match fragment(a) {
        Some((0, true)) if (a.len() - 20).is_multiple_of(8) => {}
        _ => return 0,
    }
    let mut end = a.len() - 20;
    let mut j = i + 1;
    while j < pkts.len() && j - i < MAX_FRAGMENTS {
        let b = pkts.get(j);
        let Some((offset, more)) = fragment(b) else { return 0 };
        let payload = b.len() - 20;
        if !same_datagram(a, b) || offset != end || 20 + end + payload > IP_MAX {
            return 0;
        }
        end += payload;
        if !more {
            return j - i + 1;
        }
        if !payload.is_multiple_of(8) {
            return 0;
        }
        j += 1;
    }
    0
}

/// Whether any packet of the batch may be a fragment.
pub fn has_fragments(pkts: &Packets) -> bool {
    (0..pkts.len()).any(|i| maybe_fragment(pkts.get(i)))
}

/// `pkts` into `out`, in order, each whole chain of fragments as the datagram it makes:
/// how many datagrams were rejoined.
pub fn rejoin(pkts: &Packets, out: &mut Packets) -> usize {
    out.clear();
    let mut joined = 0;
    let mut i = 0;
    while i < pkts.len() {
        let k = chain(pkts, i);
        if k == 0 {
            out.push(pkts.get(i));
            i += 1;
            continue;
        }
        let total = 20 + (i..i + k).map(|j| pkts.get(j).len() - 20).sum::<usize>();
        let at = out.begin(total);
        out.buf[at..at + 20].copy_from_slice(&pkts.get(i)[..20]);
        let mut w = at + 20;
        for j in i..i + k {
            let payload = &pkts.get(j)[20..];
            out.buf[w..w + payload.len()].copy_from_slice(payload);
            w += payload.len();
        }
        let h = &mut out.buf[at..at + 20];
        h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        h[6..8].fill(0);
        h[10..12].fill(0);
        let c = !fold(sum(h, 0));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        out.commit(at, total);
        joined += 1;
        i += k;
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_checksum(p: &mut [u8]) {
        p[10..12].fill(0);
        let c = !fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }

    /// A whole UDP datagram of `payload` bytes (IPv4, ID `id`, DF clear).
    fn datagram(payload: usize, id: u16) -> Vec<u8> {
        let total = 28 + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 66, 0, 2]);
        p[16..20].copy_from_slice(&[10, 99, 0, 100]);
        p[20..22].copy_from_slice(&5000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        for (k, b) in p[28..].iter_mut().enumerate() {
            *b = (k * 7 + id as usize) as u8;
        }
        set_checksum(&mut p);
        p
    }

    /// `d` cut as a kernel would, each fragment's payload at most `mtu - 20` (a multiple
    /// of 8 but the last).
    fn fragments(d: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        let step = (mtu - 20) / 8 * 8;
        let body = &d[20..];
        let mut out = Vec::new();
        let mut off = 0;
        while off < body.len() {
            let end = (off + step).min(body.len());
            let mut f = d[..20].to_vec();
            f.extend_from_slice(&body[off..end]);
            let more = if end < body.len() { MF } else { 0 };
            let len = f.len() as u16;
            f[2..4].copy_from_slice(&len.to_be_bytes());
            f[6..8].copy_from_slice(&(more | (off / 8) as u16).to_be_bytes());
            set_checksum(&mut f);
            out.push(f);
            off = end;
        }
        out
    }

    fn packets(list: &[Vec<u8>]) -> Packets {
        let mut p = Packets::new();
        for x in list {
            p.push(x);
        }
        p
    }

    fn run(list: &[Vec<u8>]) -> (usize, Vec<Vec<u8>>) {
        let mut out = Packets::new();
        let n = rejoin(&packets(list), &mut out);
        (n, (0..out.len()).map(|i| out.get(i).to_vec()).collect())
    }

    #[test]
    fn fragments_in_a_batch_become_their_datagram_again() {
        let (a, b) = (datagram(1400, 7), datagram(3000, 8));
        let other = datagram(100, 9);
        let mut list = fragments(&a, 1403);
        list.push(other.clone());
        list.extend(fragments(&b, 1403));
        assert_eq!(list.len(), 6);
        assert!(has_fragments(&packets(&list)));
        assert_eq!(run(&list), (2, vec![a, other, b]));
        assert!(!has_fragments(&packets(&[datagram(1400, 1)])));
    }

    #[test]
    fn anything_but_a_whole_clean_chain_goes_on_as_it_came() {
        let d = datagram(2000, 3);
        let f = fragments(&d, 1403);
        let unchanged = |list: Vec<Vec<u8>>| assert_eq!(run(&list), (0, list.clone()));
        unchanged(vec![f[1].clone(), f[0].clone()]); // reordered
        unchanged(vec![f[0].clone()]); // incomplete in this batch
        unchanged(vec![f[1].clone()]);
        unchanged(vec![f[0].clone(), datagram(10, 1), f[1].clone()]); // not consecutive
        let mut other_id = f[1].clone();
        other_id[5] ^= 1;
        set_checksum(&mut other_id);
        unchanged(vec![f[0].clone(), other_id]);
        let mut bad_sum = f[1].clone();
        bad_sum[10] ^= 1;
        unchanged(vec![f[0].clone(), bad_sum]);
        let mut overlap = f[1].clone(); // starts 8 bytes early
        let off = u16::from_be_bytes([overlap[6], overlap[7]]) & OFFSET;
        overlap[6..8].copy_from_slice(&(off - 1).to_be_bytes());
        set_checksum(&mut overlap);
        unchanged(vec![f[0].clone(), overlap]);
        let mut gap = f[1].clone();
        gap[6..8].copy_from_slice(&(off + 1).to_be_bytes());
        set_checksum(&mut gap);
        unchanged(vec![f[0].clone(), gap]);
        let mut short_len = f[1].clone(); // the IP length says less than arrived
        short_len[3] -= 1;
        set_checksum(&mut short_len);
        unchanged(vec![f[0].clone(), short_len]);
        let mut df = f[0].clone();
        df[6] |= 0x40;
        set_checksum(&mut df);
        unchanged(vec![df, f[1].clone()]);
        let mut odd = fragments(&datagram(2000, 3), 1403); // a first piece not a multiple of 8
        odd[0].pop();
        let len = odd[0].len() as u16;
        odd[0][2..4].copy_from_slice(&len.to_be_bytes());
        set_checksum(&mut odd[0]);
        unchanged(odd);
        let too_long = fragments(&datagram(65_000, 4), 1028);
        assert_eq!(too_long.len(), MAX_FRAGMENTS + 1);
        unchanged(too_long);
    }

    #[test]
    fn the_longest_chain_rejoins() {
        let d = datagram(65_535 - 28, 5);
        let f = fragments(&d, 1500);
        assert!(f.len() <= MAX_FRAGMENTS);
        assert_eq!(run(&f), (1, vec![d]));
    }

    #[test]
    fn no_input_panics() {
        // every prefix and a flipped byte of every position of a two-fragment chain
        let f = fragments(&datagram(1500, 2), 1403);
        for cut in 0..f[1].len() {
            run(&[f[0].clone(), f[1][..cut].to_vec()]);
        }
        for at in 0..f[0].len() {
            let mut g = f[0].clone();
            g[at] ^= 0xa5;
            run(&[g, f[1].clone()]);
        }
        run(&[vec![], vec![0x45], vec![0x45; 20]]);
    }
}
