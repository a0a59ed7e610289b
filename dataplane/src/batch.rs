//! Batched UDP I/O: `recvmmsg` and `sendmmsg` over caller-owned buffers, one system call
//! per batch. `unsafe` lives only here, around the system calls.

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

/// Datagrams per system call.
pub const BATCH: usize = 64;
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

    /// Send everything queued with as few `sendmmsg` calls as the kernel takes; returns
    /// (sent, dropped, system calls). A full socket buffer drops the rest (UDP semantics).
    pub fn flush(&mut self, fd: RawFd) -> (usize, usize, usize) {
        let total = self.count;
        for i in 0..total {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.lens[i] };
            let (ref mut ss, len) = self.addrs[i];
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = if len == 0 { std::ptr::null_mut() } else { (ss as *mut libc::sockaddr_storage).cast() };
            h.msg_namelen = len;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        let (mut sent, mut calls) = (0usize, 0usize);
        let mut dropped = 0usize;
        while sent + dropped < total && calls < 4 * BATCH {
            let start = sent + dropped;
            // SAFETY: headers [start, total) point at buffers and addresses owned by self,
            // with their true lengths; the kernel only reads them.
            let n = unsafe {
                libc::sendmmsg(fd, self.hdrs[start..].as_mut_ptr(), (total - start) as libc::c_uint, libc::MSG_DONTWAIT)
            };
            calls += 1;
            if n > 0 {
                sent += n as usize;
            } else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                dropped += 1; // this datagram cannot go (a full buffer, an unreachable peer)
            }
        }
        dropped += total - sent - dropped;
        self.count = 0;
        (sent, dropped, calls)
    }
}
