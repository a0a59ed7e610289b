//! Cryptokey routing for L3 sessions, as `session/tunnel.py` does it (the reference).
//!
//! Towards the network (uplink) an IP packet of a session is accepted only if its source
//! is one of the session's own inner addresses and its destination lies in the prefixes
//! its client's policy allows. Towards the client (downlink) a packet goes to the session
//! that owns its destination address (`Owners`), and only if its source lies in that
//! session's allowed prefixes. Pure: no I/O, addresses compared as bytes.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::wire::SessionId;

pub const IPV4_HEADER: usize = 20;
pub const IPV6_HEADER: usize = 40;

/// Why an IP packet was not forwarded: the values of `session.tunnel.TunnelDrop`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TunnelDrop {
    Malformed = 1,
    SpoofedSource = 2,
    PrefixDenied = 3,
    NoRoute = 4,
    SourceDenied = 5,
    NotL3 = 6,
}

impl TunnelDrop {
    pub const ALL: [TunnelDrop; 6] = [
        TunnelDrop::Malformed,
        TunnelDrop::SpoofedSource,
        TunnelDrop::PrefixDenied,
        TunnelDrop::NoRoute,
        TunnelDrop::SourceDenied,
        TunnelDrop::NotL3,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }
}

/// (source, destination) of an IPv4 or IPv6 packet, or None if it is neither.
pub fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let version = packet.first()? >> 4;
    if version == 4 && packet.len() >= IPV4_HEADER {
        let s: [u8; 4] = packet[12..16].try_into().ok()?;
        let d: [u8; 4] = packet[16..20].try_into().ok()?;
        return Some((IpAddr::from(s), IpAddr::from(d)));
    }
    if version == 6 && packet.len() >= IPV6_HEADER {
        let s: [u8; 16] = packet[8..24].try_into().ok()?;
        let d: [u8; 16] = packet[24..40].try_into().ok()?;
        return Some((IpAddr::from(s), IpAddr::from(d)));
    }
    None
}

/// An allowed destination prefix: network address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub net: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// A prefix, or None if the length does not fit the family. Host bits are ignored.
    pub fn new(net: IpAddr, len: u8) -> Option<Prefix> {
        let max = if net.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Prefix { net, len })
    }

    pub fn contains(&self, addr: &IpAddr) -> bool {
        match (self.net, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - self.len as u32) };
                u32::from(n) & mask == u32::from(*a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - self.len as u32) };
                u128::from(n) & mask == u128::from(*a) & mask
            }
            _ => false,
        }
    }
}

/// One L3 session's inner addresses and allowed prefixes (`session.tunnel.SessionRoute`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub own: [IpAddr; 2],
    pub prefixes: Vec<Prefix>,
}

impl Route {
    pub fn owns(&self, addr: &IpAddr) -> bool {
        self.own.contains(addr)
    }

    pub fn allows(&self, addr: &IpAddr) -> bool {
        self.prefixes.iter().any(|p| p.contains(addr))
    }

    /// None if the session may send `packet` on, else why not.
    pub fn check_uplink(&self, packet: &[u8]) -> Option<TunnelDrop> {
        let Some((src, dst)) = addresses(packet) else { return Some(TunnelDrop::Malformed) };
        if !self.owns(&src) {
            return Some(TunnelDrop::SpoofedSource);
        }
        if !self.allows(&dst) {
            return Some(TunnelDrop::PrefixDenied);
        }
        None
    }
}

/// This node's map from inner address to the session bound here that owns it
/// (`session.tunnel.TunnelRouter`).
#[derive(Default)]
pub struct Owners {
    map: HashMap<IpAddr, SessionId>,
}

/// Where a downlink packet goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Downlink {
    /// To this session, from this source.
    Session(SessionId, IpAddr),
    /// No session here owns the destination.
    NoOwner,
    Malformed,
}

impl Owners {
    pub fn add(&mut self, sid: SessionId, route: &Route) {
        for a in route.own {
            self.map.insert(a, sid);
        }
    }

    pub fn remove(&mut self, sid: &SessionId, route: &Route) {
        for a in route.own {
            if self.map.get(&a) == Some(sid) {
                self.map.remove(&a);
            }
        }
    }

    pub fn owner(&self, packet: &[u8]) -> Downlink {
        match addresses(packet) {
            None => Downlink::Malformed,
            Some((src, dst)) => match self.map.get(&dst) {
                Some(sid) => Downlink::Session(*sid, src),
                None => Downlink::NoOwner,
            },
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn uplink_reasons() {
        let r = Route {
            own: ["10.8.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            prefixes: vec![Prefix::new("10.9.0.0".parse().unwrap(), 16).unwrap()],
        };
        assert_eq!(r.check_uplink(&v4([10, 8, 0, 5], [10, 9, 3, 1])), None);
        assert_eq!(r.check_uplink(&v4([10, 8, 0, 6], [10, 9, 3, 1])), Some(TunnelDrop::SpoofedSource));
        assert_eq!(r.check_uplink(&v4([10, 8, 0, 5], [10, 10, 0, 1])), Some(TunnelDrop::PrefixDenied));
        assert_eq!(r.check_uplink(&[0x45; 19]), Some(TunnelDrop::Malformed));
        assert_eq!(r.check_uplink(&[]), Some(TunnelDrop::Malformed));
        let all = Prefix::new("::".parse().unwrap(), 0).unwrap();
        assert!(all.contains(&"2001:db8::1".parse().unwrap()));
        assert!(!all.contains(&"10.0.0.1".parse().unwrap()));
        assert!(Prefix::new("10.0.0.0".parse().unwrap(), 33).is_none());
    }

    #[test]
    fn owners_follow_add_and_remove() {
        let r = Route { own: ["10.8.0.5".parse().unwrap(), "fd00::5".parse().unwrap()], prefixes: vec![] };
        let mut o = Owners::default();
        o.add([1; 16], &r);
        assert_eq!(o.owner(&v4([1, 1, 1, 1], [10, 8, 0, 5])), Downlink::Session([1; 16], "1.1.1.1".parse().unwrap()));
        o.remove(&[2; 16], &r); // not its owner: kept
        assert_eq!(o.len(), 2);
        o.remove(&[1; 16], &r);
        assert_eq!(o.owner(&v4([1, 1, 1, 1], [10, 8, 0, 5])), Downlink::NoOwner);
    }
}
