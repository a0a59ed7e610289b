//! What the engine tests share: sockets, bounded polling, sealing, draining hand-ups.
#![allow(dead_code)] // each test file uses its own subset

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use jvpn_dataplane::channel::Channel;
use jvpn_dataplane::engine::{Engine, HandUp};

pub fn socket(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s
}

/// Poll `f` until it is true, for at most 5 s.
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 4096];
    s.recv_from(&mut buf).ok().map(|(n, a)| (buf[..n].to_vec(), a))
}

pub fn recv_within(s: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = recv(s) {
            return v;
        }
        assert!(Instant::now() < deadline, "nothing received: {what}");
    }
}

pub fn seal(ch: &mut Channel, inner: &[u8]) -> Vec<u8> {
    let mut out = [0u8; 2048];
    let n = ch.seal_into(inner, &mut out).unwrap();
    out[..n].to_vec()
}

pub fn drained(e: &Engine, n: usize) -> Vec<HandUp> {
    let mut got = Vec::new();
    until("hand-ups", || {
        got.extend(e.drain(64));
        got.len() >= n
    });
    got
}
