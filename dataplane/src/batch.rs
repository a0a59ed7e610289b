//! Batched UDP I/O: `recvmmsg` and `sendmmsg` over caller-owned buffers, one system call
//! per batch. `unsafe` lives only here, around the system calls.
//!
//! UDP GSO on send (`flush_gso`): consecutive datagrams to one destination of one size
//! (the last of a run may be shorter) go as one message with a `UDP_SEGMENT` control
//! message, which the kernel cuts into datagrams below the socket, so the stack is
//! walked once per run instead of once per datagram. A kernel or device that refuses it
//! (EIO, EINVAL, EOPNOTSUPP, ENOPROTOOPT) turns it off for the batch's life and the
//! datagrams go one message each.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use crate::wire::MAX_MESSAGE_SIZE;

/// Add one to an eventfd (wakes whoever waits on it). Nonblocking: a saturated counter
/// only means the waiter is already woken.
pub fn poke(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd the caller owns.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Bytes asked for each UDP socket's receive and send buffers (the kernel caps them at
/// net.core.[rw]mem_max). The 208 KiB default holds ~150 full-size datagrams: a burst the
/// engine's thread meets late (another process on its core) overflows it, and loss, not
/// CPU, then bounds the engine's rate. The gateway's listener asks the same.
pub const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Ask for `SOCKET_BUFFER` both ways on a UDP socket the engine reads or writes. Best
/// effort: a refusal leaves the default, as for the listener.
pub fn grow_buffers(fd: RawFd) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt with a live c_int of the size passed; fd is a socket the caller owns.
        unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&SOCKET_BUFFER as *const libc::c_int).cast(), 4)
        };
    }
}

/// Datagrams per system call.
pub const BATCH: usize = 64;
/// `linux/udp.h`: the segment size of a GSO send (a control message of `SOL_UDP`).
const UDP_SEGMENT: libc::c_int = 103;
/// Bytes one GSO message may carry (a UDP datagram's payload limit, with room to spare).
const GSO_MAX_BYTES: usize = 65_000;
/// Segments per GSO message (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Receive room per datagram: a datagram longer than any message is truncated by the
/// kernel (MSG_TRUNC flags it) and dropped as OVERSIZED.
pub const SLOT: usize = MAX_MESSAGE_SIZE + 1;

pub fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

pub fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the kernel wrote a sockaddr_in here.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the kernel wrote a sockaddr_in6 here.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Receive buffers for one batch, reused for every call.
pub struct RecvBatch {
    bufs: Vec<[u8; SLOT]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    pub count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![[0u8; SLOT]; BATCH],
            // SAFETY: plain old data, all-zero is valid.
            addrs: vec![unsafe { zeroed() }; BATCH],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH],
            // SAFETY: plain old data, all-zero is valid (pointers null, lengths 0).
            hdrs: vec![unsafe { zeroed() }; BATCH],
            count: 0,
        }
    }

    /// One `recvmmsg` without blocking: how many datagrams arrived (0 when none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: SLOT };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers owned by self that outlive the call, with
        // their true lengths; the kernel writes at most that much into each.
        let n = unsafe {
            libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            self.count = 0;
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.count = n as usize;
        Ok(self.count)
    }

    /// Datagram `i` of the last batch: its bytes (mutable: opened in place), its sender, and
    /// whether the kernel truncated it.
    pub fn get(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>, bool) {
        let len = (self.hdrs[i].msg_len as usize).min(SLOT);
        let truncated = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let addr = from_sockaddr(&self.addrs[i]);
        (&mut self.bufs[i][..len], addr, truncated)
    }
}

/// Datagrams queued for one `sendmmsg`, each with its own destination (or none on a
/// connected socket).
pub struct SendBatch {
    bufs: Vec<[u8; SLOT]>,
    lens: Vec<usize>,
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// One `UDP_SEGMENT` control message per header (room for a cmsghdr and a u16).
    ctrl: Vec<[u64; 4]>,
    /// The datagrams of each header: (first, how many).
    runs: Vec<(usize, usize)>,
    /// The kernel refused a GSO send: every datagram goes alone from then on.
    pub gso_refused: bool,
    pub count: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            bufs: vec![[0u8; SLOT]; BATCH],
            lens: vec![0; BATCH],
            // SAFETY: plain old data, all-zero is valid.
            addrs: vec![(unsafe { zeroed() }, 0); BATCH],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH],
            // SAFETY: plain old data, all-zero is valid.
            hdrs: vec![unsafe { zeroed() }; BATCH],
            ctrl: vec![[0u64; 4]; BATCH],
            runs: vec![(0, 0); BATCH],
            gso_refused: false,
            count: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    /// The next free slot's buffer, to be filled and then committed with `push`.
    pub fn slot(&mut self) -> &mut [u8; SLOT] {
        &mut self.bufs[self.count]
    }

    /// Queue the first `len` bytes of the current slot, to `to` (None: connected socket).
    pub fn push(&mut self, len: usize, to: Option<&SocketAddr>) {
        let i = self.count;
        self.lens[i] = len;
        self.addrs[i] = match to {
            Some(a) => to_sockaddr(a),
            // SAFETY: plain old data, all-zero is valid.
            None => (unsafe { zeroed() }, 0),
        };
        self.count += 1;
    }

    /// Forget everything queued (nothing sent); returns how many datagrams that was.
    pub fn discard(&mut self) -> usize {
        std::mem::replace(&mut self.count, 0)
    }

    /// Send everything queued with as few `sendmmsg` calls as the kernel takes; returns
    /// (sent, dropped, system calls). A full socket buffer drops the rest (UDP semantics).
    pub fn flush(&mut self, fd: RawFd) -> (usize, usize, usize) {
        self.send_all(fd, false)
    }

    /// As `flush`, with runs of same-destination, same-size datagrams sent as one GSO
    /// message each (unless the kernel refused GSO before).
    pub fn flush_gso(&mut self, fd: RawFd) -> (usize, usize, usize) {
        let gso = !self.gso_refused;
        self.send_all(fd, gso)
    }

    fn same_destination(&self, i: usize, j: usize) -> bool {
        let ((a, alen), (b, blen)) = (&self.addrs[i], &self.addrs[j]);
        if alen != blen {
            return false;
        }
        // SAFETY: both are live sockaddr_storage values (plain old data) of at least alen bytes.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts((a as *const libc::sockaddr_storage).cast::<u8>(), *alen as usize),
                std::slice::from_raw_parts((b as *const libc::sockaddr_storage).cast::<u8>(), *blen as usize),
            )
        };
        a == b
    }

    /// Headers for datagrams [from, count): one per datagram, or with `gso` one per run.
    /// Returns how many headers.
    fn build(&mut self, from: usize, gso: bool) -> usize {
        let total = self.count;
        for i in from..total {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.lens[i] };
        }
        let (mut i, mut m) = (from, 0usize);
        while i < total {
            let seg = self.lens[i];
            let mut j = i + 1;
            if gso {
                while j < total
                    && j - i < GSO_MAX_SEGMENTS
                    && (j - i + 1) * seg <= GSO_MAX_BYTES
                    && self.lens[j] <= seg
                    && self.same_destination(i, j)
                {
                    j += 1;
                    if self.lens[j - 1] < seg {
                        break; // a shorter datagram ends a run
                    }
                }
            }
            let (ref mut ss, len) = self.addrs[i];
            let h = &mut self.hdrs[m].msg_hdr;
            h.msg_name = if len == 0 { std::ptr::null_mut() } else { (ss as *mut libc::sockaddr_storage).cast() };
            h.msg_namelen = len;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = j - i;
            h.msg_flags = 0;
            if j - i > 1 {
                let ctrl = &mut self.ctrl[m];
                h.msg_control = ctrl.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE of a u16 (24 bytes) fits the 32-byte, 8-aligned buffer;
                // CMSG_FIRSTHDR then points at its start.
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            self.runs[m] = (i, j - i);
            m += 1;
            i = j;
        }
        m
    }

    fn send_all(&mut self, fd: RawFd, mut gso: bool) -> (usize, usize, usize) {
        let total = self.count;
        let mut msgs = self.build(0, gso);
        let (mut sent, mut calls, mut next) = (0usize, 0usize, 0usize);
        while next < msgs && calls < 4 * BATCH {
            // SAFETY: headers [next, msgs) point at buffers, addresses and control messages
            // owned by self, with their true lengths; the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(fd, self.hdrs[next..].as_mut_ptr(), (msgs - next) as libc::c_uint, libc::MSG_DONTWAIT)
            };
            calls += 1;
            if n > 0 {
                for k in next..next + n as usize {
                    sent += self.runs[k].1;
                }
                next += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let (first, len) = self.runs[next];
            let refused = matches!(
                e.raw_os_error(),
                Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT)
            );
            if gso && len > 1 && refused {
                // the kernel or the device does not do GSO here: one message per datagram
                self.gso_refused = true;
                gso = false;
                msgs = self.build(first, false);
                next = 0;
                continue;
            }
            next += 1; // this message's datagrams cannot go (a full buffer, an unreachable peer)
        }
        self.count = 0;
        (sent, total - sent, calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn receiver() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// Runs of one destination and one size go as GSO messages; every datagram arrives
    /// whole, in order, at its own destination (the receivers read without GRO).
    #[test]
    fn gso_runs_arrive_as_the_datagrams_queued() {
        let (a, b) = (receiver(), receiver());
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut batch = SendBatch::new();
        let mut want_a = Vec::new();
        let mut want_b = Vec::new();
        // 40 to a (equal, then one shorter, then equal again), 10 to b, 14 to a
        for i in 0..BATCH {
            let (to, want) = if (40..50).contains(&i) { (&to_b, &mut want_b) } else { (&to_a, &mut want_a) };
            let len = if i == 20 { 700 } else { 1400 };
            let body: Vec<u8> = (0..len).map(|k| (i * 7 + k) as u8).collect();
            batch.slot()[..len].copy_from_slice(&body);
            batch.push(len, Some(to));
            want.push(body);
        }
        let (sent, dropped, calls) = batch.flush_gso(tx.as_raw_fd());
        assert_eq!((sent, dropped), (BATCH, 0));
        assert_eq!(calls, 1);
        assert!(!batch.gso_refused, "loopback takes UDP GSO (Linux >= 4.18)");
        assert_eq!(batch.count, 0, "the batch is empty after a flush");
        for (sock, want) in [(&a, want_a), (&b, want_b)] {
            for w in want {
                let mut buf = [0u8; 2048];
                let n = sock.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], &w[..]);
            }
        }
    }

    /// A socket the kernel refuses GSO on (no UDP checksum: SO_NO_CHECK) still sends every
    /// datagram, one message each, and the batch stops asking.
    #[test]
    fn a_refused_gso_falls_back_to_one_message_per_datagram() {
        let rx = receiver();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let one: libc::c_int = 1;
        // SAFETY: an int socket option from a live int, on a socket we own.
        let r = unsafe {
            libc::setsockopt(tx.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, (&one as *const libc::c_int).cast(), 4)
        };
        assert_eq!(r, 0);
        let to = rx.local_addr().unwrap();
        let mut batch = SendBatch::new();
        for i in 0..8u8 {
            batch.slot()[..300].fill(i);
            batch.push(300, Some(&to));
        }
        assert_eq!(batch.flush_gso(tx.as_raw_fd()).0, 8);
        assert!(batch.gso_refused);
        for i in 0..8u8 {
            let mut buf = [0u8; 2048];
            assert_eq!(rx.recv(&mut buf).unwrap(), 300);
            assert!(buf[..300].iter().all(|&b| b == i));
        }
    }

    #[test]
    fn runs_split_where_the_destination_or_size_changes() {
        let mut batch = SendBatch::new();
        let x: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let y: SocketAddr = "127.0.0.1:10".parse().unwrap();
        for (len, to) in [(100, x), (100, x), (50, x), (100, x), (100, y), (100, y), (120, y)] {
            batch.push(len, Some(&to));
        }
        let m = batch.build(0, true);
        assert_eq!(&batch.runs[..m], &[(0, 3), (3, 1), (4, 2), (6, 1)]);
        assert_eq!(batch.build(0, false), 7);
        batch.count = 0;
    }
}
