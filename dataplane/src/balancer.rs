//! The client's address behind a balancer, as `gateway/balancer.py` reads it.
//!
//! Behind nginx every client -> gateway datagram starts with a fixed 24-byte prefix:
//!
//! ```text
//! magic "JVPA" | family u8 (4 or 6) | reserved u8 (0) | port u16 | address 16 bytes
//! ```
//!
//! (IPv4: 4 bytes then 12 zero bytes). The gateway believes it only from the networks it
//! is told are balancers (`trusted_balancers`). From a trusted balancer a datagram without
//! a valid prefix is dropped (`MISSING_PREFIX`); from anyone else a datagram starting with
//! the magic is dropped (`UNTRUSTED_PREFIX`); everything else is an ordinary message from
//! its sender. Replies go back unchanged to the balancer's socket (the peer's `via`).
//! The same accept/reject and reason as the Python reference, proven by differential tests.

use std::net::{IpAddr, SocketAddr};

use crate::reasons::DropReason;

pub const PREFIX_MAGIC: &[u8; 4] = b"JVPA";
pub const PREFIX_LEN: usize = 24;

/// The client's address and the message after the prefix; None if `data` is not a
/// well-formed prefixed datagram (`gateway.balancer.parse_prefix`).
pub fn parse_prefix(data: &[u8]) -> Option<(SocketAddr, &[u8])> {
    if data.len() < PREFIX_LEN || &data[..4] != PREFIX_MAGIC || data[5] != 0 {
        return None;
    }
    let port = u16::from_be_bytes([data[6], data[7]]);
    if port == 0 {
        return None;
    }
    let raw: [u8; 16] = data[8..PREFIX_LEN].try_into().expect("16 bytes");
    let ip = match data[4] {
        4 if raw[4..].iter().all(|&b| b == 0) => IpAddr::from([raw[0], raw[1], raw[2], raw[3]]),
        6 => unmapped(IpAddr::from(raw)), // a dual-stack listener's IPv4 client is IPv4
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), &data[PREFIX_LEN..]))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; any other unchanged.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The networks whose sources may speak for a client (`trusted_balancers`); empty: none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trusted {
    nets: Vec<(IpAddr, u8)>,
}

impl Trusted {
    /// Networks as (address, prefix length); the host bits are ignored (Python's
    /// `ip_network(strict=False)`). None if a length is beyond the family's width.
    pub fn new(nets: impl IntoIterator<Item = (IpAddr, u8)>) -> Option<Trusted> {
        let mut out = Vec::new();
        for (ip, len) in nets {
            if len > width(&ip) {
                return None;
            }
            out.push((ip, len));
        }
        Some(Trusted { nets: out })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` (an IPv4-mapped address as its IPv4 address) lies in one of the networks.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        if self.nets.is_empty() {
            return false;
        }
        let ip = unmapped(ip);
        self.nets.iter().any(|(net, len)| within(&ip, net, *len))
    }
}

fn width(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn within(ip: &IpAddr, net: &IpAddr, len: u8) -> bool {
    let (a, b) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(*a)) << 96, u128::from(u32::from(*b)) << 96),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(*a), u128::from(*b)),
        _ => return false,
    };
    len == 0 || (a ^ b) >> (128 - u32::from(len)) == 0
}

/// Who sent a datagram read from the listener, as the machine's peer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sender<'a> {
    /// The message (after the prefix, if any).
    pub msg: &'a [u8],
    /// The client's address: the prefix's, or the datagram's source.
    pub client: SocketAddr,
    /// The balancer's socket the datagram came from (replies go there); None: direct.
    pub via: Option<SocketAddr>,
}

/// The sender of a datagram from `from`, or why it is dropped (`MISSING_PREFIX`,
/// `UNTRUSTED_PREFIX`), as `gateway/node.py`'s `_UdpProtocol.datagram_received` decides.
pub fn sender<'a>(trusted: &Trusted, data: &'a [u8], from: SocketAddr) -> Result<Sender<'a>, DropReason> {
    if trusted.trusts(from.ip()) {
        return match parse_prefix(data) {
            Some((client, msg)) => Ok(Sender { msg, client, via: Some(from) }),
            None => Err(DropReason::MissingPrefix),
        };
    }
    if data.len() >= 4 && &data[..4] == PREFIX_MAGIC {
        return Err(DropReason::UntrustedPrefix);
    }
    Ok(Sender { msg: data, client: from, via: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(family: u8, port: u16, raw: [u8; 16]) -> Vec<u8> {
        let mut v = PREFIX_MAGIC.to_vec();
        v.extend([family, 0]);
        v.extend(port.to_be_bytes());
        v.extend(raw);
        v
    }

    fn v4raw(a: [u8; 4]) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&a);
        r
    }

    fn nets(items: &[(&str, u8)]) -> Trusted {
        Trusted::new(items.iter().map(|(a, l)| (a.parse().unwrap(), *l))).unwrap()
    }

    #[test]
    fn parses_both_families_and_refuses_the_malformed() {
        let mut d = prefix(4, 4242, v4raw([198, 51, 100, 7]));
        d.extend(b"msg");
        let (client, msg) = parse_prefix(&d).unwrap();
        assert_eq!(client, "198.51.100.7:4242".parse().unwrap());
        assert_eq!(msg, b"msg");
        let v6: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
        assert_eq!(parse_prefix(&prefix(6, 9, v6.octets())).unwrap().0, "[2001:db8::5]:9".parse().unwrap());
        let mapped = std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped();
        assert_eq!(parse_prefix(&prefix(6, 9, mapped.octets())).unwrap().0, "10.0.0.1:9".parse().unwrap());
        let mut stray = v4raw([1, 2, 3, 4]);
        stray[15] = 1;
        assert!(parse_prefix(&prefix(4, 9, stray)).is_none()); // IPv4 with non-zero padding
        assert!(parse_prefix(&prefix(4, 0, v4raw([1, 2, 3, 4]))).is_none()); // port 0
        assert!(parse_prefix(&prefix(5, 9, v4raw([1, 2, 3, 4]))).is_none()); // family
        let mut reserved = prefix(4, 9, v4raw([1, 2, 3, 4]));
        reserved[5] = 1;
        assert!(parse_prefix(&reserved).is_none());
        assert!(parse_prefix(&prefix(4, 9, v4raw([1, 2, 3, 4]))[..23]).is_none()); // short
    }

    #[test]
    fn trust_is_by_network_and_family() {
        let t = nets(&[("10.1.0.0", 16), ("fd00::", 8)]);
        assert!(t.trusts("10.1.200.3".parse().unwrap()));
        assert!(t.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!t.trusts("10.2.0.1".parse().unwrap()));
        assert!(t.trusts("fd12::1".parse().unwrap()));
        assert!(!t.trusts("fe80::1".parse().unwrap()));
        assert!(!Trusted::default().trusts("10.1.0.1".parse().unwrap()));
        assert!(nets(&[("0.0.0.0", 0)]).trusts("203.0.113.9".parse().unwrap()));
        assert!(!nets(&[("0.0.0.0", 0)]).trusts("2001:db8::1".parse().unwrap()));
        assert!(Trusted::new([("10.0.0.0".parse().unwrap(), 33)]).is_none());
    }

    #[test]
    fn sender_decides_as_the_adapter() {
        let t = nets(&[("10.1.0.1", 32)]);
        let nginx: SocketAddr = "10.1.0.1:5000".parse().unwrap();
        let other: SocketAddr = "10.9.0.1:5000".parse().unwrap();
        let mut d = prefix(4, 4242, v4raw([198, 51, 100, 7]));
        d.extend(b"msg");
        let s = sender(&t, &d, nginx).unwrap();
        assert_eq!((s.msg, s.client, s.via), (&b"msg"[..], "198.51.100.7:4242".parse().unwrap(), Some(nginx)));
        assert_eq!(sender(&t, &d, other), Err(DropReason::UntrustedPrefix));
        assert_eq!(sender(&t, b"plain", nginx), Err(DropReason::MissingPrefix));
        let s = sender(&t, b"plain", other).unwrap();
        assert_eq!((s.msg, s.client, s.via), (&b"plain"[..], other, None));
        assert_eq!(sender(&t, b"JVP", other).unwrap().msg, b"JVP"); // not the whole magic
    }
}
