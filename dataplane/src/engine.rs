//! The gateway's UDP data path on its own thread: bindings installed by the machine.
//!
//! Theory of operation. The engine reads the gateway's UDP socket and every binding's
//! upstream socket in batches (epoll, `recvmmsg`), and forwards on its own only the plain
//! case: a DATA packet of an installed binding marked `fast` (the machine marks a binding
//! fast only while it is validated, has no new address under validation and is in a live
//! state), of the binding's epoch, from the binding's own peer, within its lease, that
//! passes the replay window and the AEAD and carries a PAYLOAD: the payload goes to the
//! upstream socket. A reply from the upstream of a fast binding within its lease is
//! sealed and sent to the peer (`sendmmsg`). Everything else is handed to the machine
//! unchanged, through a bounded queue whose eventfd the asyncio adapter watches: every
//! non-DATA message, unknown sessions, other epochs, new addresses (roaming is the
//! machine's decision), unvalidated bindings, keepalives and every other inner message,
//! and upstream replies of bindings that are not fast. A handed-up DATA packet is only
//! verified here, never marked: the machine opens it through the same channel (the
//! same replay window and send counter), so each counter is accepted exactly once
//! whichever path took it. What the engine refuses itself (replays, forgeries, expired
//! leases, a full queue) is dropped and counted by reason. The engine decides nothing:
//! where the machine would refuse or must decide, the machine is asked.
//!
//! L3. A binding installed with a route (the session's inner addresses and allowed
//! prefixes) carries IP packets, and the engine owns the node's TUN once the adapter hands
//! it over (`set_tun`). An uplink PAYLOAD of a fast L3 binding is checked by cryptokey
//! routing (`route`: the inner source must be the session's, the destination within its
//! prefixes; refusals dropped and counted by `TunnelDrop`, the counter spent as in the
//! machine) and written to the TUN. A packet read from the TUN goes to the binding that
//! owns its destination (a map from inner address to session, kept with the bindings),
//! if its source lies in that session's prefixes, sealed and sent in a batch; one that
//! no installed binding owns, or whose binding is not fast, goes up unchanged (the
//! machine relays it to the node holding the session, or drops it).
//!
//! A TUN opened with offloads (`IFF_VNET_HDR`, asked of the descriptor with `TUNGETIFF`)
//! is read as a header and a packet of up to 64 KiB, cut into IP packets before anything
//! else looks at them (`TunBatch`, `offload::split`); the packets opened from one batch of
//! datagrams are written when the batch is done, runs of one TCP flow merged into one
//! super-packet (`TunWriter`, `offload::plan`). A plain TUN reads and writes one packet
//! per call.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::balancer::{self, Trusted};
use crate::batch::{to_sockaddr, RecvBatch, SendBatch, BATCH, SLOT};
use crate::channel::Channel;
use crate::frag;
use crate::offload::{self, Packets, VNET_HDR_LEN};
use crate::reasons::DropReason;
use crate::route::{Downlink, Owners, Route, TunnelDrop};
use crate::wire::{self, SessionId, AEAD_TAG_LEN, DATA_PREFIX_LEN, INNER_PAYLOAD, MAX_FLOWS, TYPE_DATA};

pub use crate::wire::MAX_PAYLOAD_SIZE;
const LISTEN_TOKEN: u64 = u64::MAX;
const WAKE_TOKEN: u64 = u64::MAX - 1;
const TUN_TOKEN: u64 = u64::MAX - 2;
const ROUNDS_PER_WAKE: usize = 8; // batches per ready socket before the others get a turn

/// What the machine must see: a datagram from the listener, or an upstream's reply.
pub enum HandUp {
    Datagram { data: Vec<u8>, from: SocketAddr },
    /// A reply from the upstream socket of one flow of a binding (0: the plain PAYLOAD one).
    Upstream { session_id: SessionId, flow: u16, data: Vec<u8> },
    /// An IP packet read from the node's TUN that the engine does not route itself.
    Tun { data: Vec<u8> },
}

pub struct Binding {
    pub channel: Arc<Mutex<Channel>>,
    pub epoch: u32,
    /// The client's address (behind a balancer: the one its prefix names).
    pub peer: SocketAddr,
    /// Behind a balancer: the balancer's socket the client's datagrams come from and its
    /// replies go to; None: the client speaks directly.
    pub via: Option<SocketAddr>,
    pub fast: bool,
    /// When (store milliseconds) the secret of the binding's keys was made: past the
    /// node's reject-after age nothing is forwarded or sealed here (the machine refuses it
    /// with KEYS_EXPIRED). None: no age is enforced.
    pub keys_made_ms: Option<f64>,
    /// When the store last confirmed the binding (monotonic seconds): it carries data only
    /// while the node's lease holds and it was confirmed since the node last trusted the
    /// store (the machine's `_leased`).
    pub confirmed_at: f64,
    active: bool, // in the table's list of bindings with traffic since the machine asked
    /// L3: the session's inner addresses and allowed prefixes (cryptokey routing).
    pub route: Option<Arc<Route>>,
    /// The connected upstream socket of each flow (0: plain PAYLOADs; UDP-forward mode's
    /// FLOW_PAYLOADs have one per flow, as the node's asyncio path keeps them).
    upstreams: HashMap<u16, RawFd>,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_rx: f64,
}

impl Binding {
    /// Where datagrams to the peer go: the balancer's socket, else the peer's address.
    pub fn send_addr(&self) -> &SocketAddr {
        self.via.as_ref().unwrap_or(&self.peer)
    }

    /// Whether a datagram from `client` (through `via`) comes from this binding's peer.
    fn is_peer(&self, client: &SocketAddr, via: Option<&SocketAddr>) -> bool {
        client.ip() == self.peer.ip() && client.port() == self.peer.port() && via == self.via.as_ref()
    }
}

/// What `install` leaves at its defaults: a direct peer, keys of unenforced age.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerKeys {
    pub via: Option<SocketAddr>,
    pub keys_made_ms: Option<f64>,
}

/// What the engine forwarded for one binding since the machine last asked.
pub struct BindingStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_rx: f64,
}

#[derive(Default)]
pub struct Counters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub forwarded: AtomicU64,
    pub returned: AtomicU64,
    pub handed_up: AtomicU64,
    pub handed_up_datagrams: AtomicU64,
    pub handed_up_bytes: AtomicU64,
    pub upstream_tx_drops: AtomicU64,
    pub recv_calls: AtomicU64,
    pub send_calls: AtomicU64,
    pub poll_calls: AtomicU64,
    pub tun_reads: AtomicU64,
    pub tun_writes: AtomicU64,
    pub tun_write_errors: AtomicU64,
    /// Offloading TUN: packets written (`tun_writes` counts the write calls), super-packets
    /// read and the segments cut from them, super-packets written, reads refused.
    pub tun_packets_out: AtomicU64,
    pub tun_gso_reads: AtomicU64,
    pub tun_segments: AtomicU64,
    pub tun_gso_writes: AtomicU64,
    pub tun_offload_drops: AtomicU64,
    /// Datagrams written whole that arrived as IPv4 fragments (`frag`).
    pub tun_rejoined: AtomicU64,
    pub drops: [AtomicU64; 32],
    /// L3 refusals, by `TunnelDrop` value.
    pub tunnel_drops: [AtomicU64; 8],
}

impl Counters {
    pub(crate) fn drop(&self, r: DropReason) {
        self.drops[r.code() as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tunnel_drop(&self, r: TunnelDrop) {
        self.tunnel_drops[r.code() as usize].fetch_add(1, Ordering::Relaxed);
    }
}

struct Table {
    bindings: HashMap<SessionId, Binding>,
    active: Vec<SessionId>, // bindings with traffic since `take_active`
    upstreams: HashMap<RawFd, (SessionId, u16)>,
    owners: Owners,
}

pub struct Shared {
    table: Mutex<Table>,
    queue: Mutex<VecDeque<HandUp>>,
    queue_max: usize,
    pub counters: Counters,
    listen: RawFd,
    epoll: RawFd,
    notify: RawFd, // eventfd: the adapter's readiness for the queue
    wake: RawFd,   // eventfd: stop
    tun: Mutex<RawFd>, // the node's TUN (L3), a duplicate; -1 without
    tun_vnet: AtomicBool, // it carries a virtio-net header (offloads); set under `tun`'s lock
    // The node's lease, one value for every binding (f64 bits): until when the node may
    // forward, and since when it trusts the store again. Fail closed until first set.
    lease_until: AtomicU64,
    trust_since: AtomicU64,
    // The store's clock (f64 bits): the node's estimate of store minus monotonic
    // milliseconds, and the secrets' reject-after age in ms (infinite until set).
    store_offset_ms: AtomicU64,
    reject_after_ms: AtomicU64,
    /// The balancers whose datagrams carry the client's address (`balancer`).
    trusted: Mutex<Arc<Trusted>>,
    stop: AtomicBool,
}

/// The node's lease as read once per batch.
#[derive(Clone, Copy)]
struct Lease {
    until: f64,
    trust_since: f64,
    store_offset_ms: f64,
    reject_after_ms: f64,
}

impl Lease {
    fn holds(&self, b: &Binding, now: f64) -> bool {
        now < self.until && b.confirmed_at >= self.trust_since
    }

    /// Whether a batch whose bindings were checked under `checked` may still leave at
    /// `now` under this (the current) lease: before its deadline, and with no lapse
    /// renewed since (a new `trust_since` holds none of the bindings confirmed before it).
    fn still_covers(&self, checked: &Lease, now: f64) -> bool {
        now < self.until && self.trust_since == checked.trust_since
    }

    /// Whether the binding's keys are still within reject-after, as the machine decides
    /// (`store_ms(now) - made_ms > reject_after_ms`: expired). Past it the engine carries
    /// nothing for the binding and hands up instead: the machine refuses with its reason.
    fn keys_live(&self, b: &Binding, now: f64) -> bool {
        match b.keys_made_ms {
            None => true,
            Some(made) => (now * 1000.0 + self.store_offset_ms).trunc() - made <= self.reject_after_ms,
        }
    }
}

/// Note that `b` carried traffic, once per `take_active`.
fn touch(active: &mut Vec<SessionId>, b: &mut Binding, sid: SessionId) {
    if !b.active {
        b.active = true;
        active.push(sid);
    }
}

pub fn monotonic() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write into; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn epoll_add(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
    // SAFETY: ev is a valid epoll_event; epoll and fd are descriptors this engine owns.
    cvt(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
}

/// Never block the engine's thread on a descriptor (a TUN opened blocking: its file
/// status is shared with the caller's copy, which the adapters open non-blocking anyway).
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

pub(crate) fn close(fd: RawFd) {
    // SAFETY: fd is a descriptor this engine opened (or dup'ed) and closes exactly once.
    unsafe { libc::close(fd) };
}

/// Payloads for upstream sockets, batched while consecutive packets share one socket.
struct Upstreams {
    batch: SendBatch,
    fd: RawFd,
}

impl Upstreams {
    fn flush(&mut self, c: &Counters) {
        if self.batch.count == 0 {
            return;
        }
        let (_, dropped, calls) = self.batch.flush(self.fd);
        c.send_calls.fetch_add(calls as u64, Ordering::Relaxed);
        c.upstream_tx_drops.fetch_add(dropped as u64, Ordering::Relaxed);
    }
}

/// Where an L3 uplink packet goes: the TUN (written when the batch is done), through a
/// scratch buffer for the plaintext.
struct L3Out<'a> {
    tun: RawFd,
    buf: [u8; SLOT],
    w: &'a mut TunWriter,
}

/// `TUNGETIFF`, and the flag of a TUN opened with a virtio-net header before each packet.
const TUNGETIFF: libc::c_ulong = 0x800454d2;
const IFF_VNET_HDR: u16 = 0x4000;

/// Whether the TUN `fd` was opened with `IFF_VNET_HDR` (its reads and writes then carry a
/// virtio-net header: `offload`). Asked of the descriptor, so the engine never guesses.
pub(crate) fn tun_has_vnet_hdr(fd: RawFd) -> bool {
    let mut ifr = [0u8; 40]; // struct ifreq: the name, then the flags (a short)
    // SAFETY: TUNGETIFF writes a struct ifreq (40 bytes) into the buffer we own.
    let r = unsafe { libc::ioctl(fd, TUNGETIFF, ifr.as_mut_ptr()) };
    r == 0 && u16::from_ne_bytes([ifr[16], ifr[17]]) & IFF_VNET_HDR != 0
}

/// Packets read from a TUN, one `read` each: a plain TUN gives one IP packet per call; an
/// offloading one (`IFF_VNET_HDR`) a header and up to 64 KiB, cut into packets here
/// (`offload::split`). A read the header does not describe is dropped and counted
/// (MALFORMED, and `tun_offload_drops`).
pub(crate) struct TunBatch {
    pkts: Packets,
    raw: Vec<u8>,
    drained: bool,
}

impl TunBatch {
    pub(crate) fn new() -> Self {
        TunBatch { pkts: Packets::new(), raw: vec![0u8; VNET_HDR_LEN + 65_536 + 64], drained: false }
    }

    /// Whether the last `read` emptied the TUN.
    pub(crate) fn drained(&self) -> bool {
        self.drained
    }

    /// Read up to a batch of packets without blocking; how many arrived. A packet larger
    /// than a slot is truncated by the kernel and dropped as OVERSIZED.
    pub(crate) fn read(&mut self, fd: RawFd, vnet: bool, c: &Counters) -> usize {
        self.pkts.clear();
        self.drained = false;
        for _ in 0..BATCH {
            if self.pkts.len() >= BATCH {
                break;
            }
            if vnet {
                // SAFETY: the buffer is ours and as long as said; fd is an open TUN descriptor.
                let r = unsafe { libc::read(fd, self.raw.as_mut_ptr().cast(), self.raw.len()) };
                c.tun_reads.fetch_add(1, Ordering::Relaxed);
                if r < 0 {
                    self.drained = true; // EAGAIN (or an error: the next wake-up tries again)
                    break;
                }
                match offload::split(&self.raw[..r as usize], &mut self.pkts) {
                    Ok(1) => {}
                    Ok(k) => {
                        c.tun_gso_reads.fetch_add(1, Ordering::Relaxed);
                        c.tun_segments.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        c.tun_offload_drops.fetch_add(1, Ordering::Relaxed);
                        c.drop(DropReason::Malformed);
                    }
                }
                continue;
            }
            let at = self.pkts.begin(SLOT);
            // SAFETY: the span from `at` is ours and SLOT bytes long; fd is an open TUN.
            let r = unsafe { libc::read(fd, self.pkts.buf[at..].as_mut_ptr().cast(), SLOT) };
            c.tun_reads.fetch_add(1, Ordering::Relaxed);
            if r < 0 {
                self.pkts.abandon(at);
                self.drained = true;
                break;
            }
            let r = r as usize;
            if r >= SLOT {
                self.pkts.abandon(at);
                c.drop(DropReason::Oversized);
                continue;
            }
            self.pkts.commit(at, r);
        }
        self.pkts.len()
    }

    pub(crate) fn get(&self, i: usize) -> &[u8] {
        self.pkts.get(i)
    }
}

/// IP packets opened from one received batch, written to the TUN when the batch is done:
/// on an offloading TUN, runs of one TCP flow merged into super-packets (`offload::plan`),
/// the rest one write each behind an all-zero header; on a plain TUN one write each.
/// `tun_writes` counts write calls, `tun_packets_out` the packets they carried.
pub(crate) struct TunWriter {
    pkts: Packets,
    /// The batch again, fragments rejoined (`frag::rejoin`); swapped with `pkts`.
    joined: Packets,
    plan: Vec<offload::Write>,
    merged: Vec<u8>,
    /// Whether UDP runs go as one `GSO_UDP_L4` super-packet: until the kernel refuses one
    /// (a kernel before 6.2 does not take them from a TUN), then the runs go alone.
    udp_gso: bool,
}

impl TunWriter {
    pub(crate) fn new() -> Self {
        TunWriter {
            pkts: Packets::new(),
            joined: Packets::new(),
            plan: Vec::with_capacity(BATCH),
            merged: Vec::with_capacity(1 << 17),
            udp_gso: true,
        }
    }

    pub(crate) fn push(&mut self, packet: &[u8]) {
        self.pkts.push(packet);
    }

    fn write_one(fd: RawFd, b: &[u8], packets: u64, c: &Counters) {
        // SAFETY: b is a valid slice; fd is an open TUN descriptor the caller keeps open.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n < 0 {
            c.tun_write_errors.fetch_add(packets, Ordering::Relaxed);
        } else {
            c.tun_writes.fetch_add(1, Ordering::Relaxed);
            c.tun_packets_out.fetch_add(packets, Ordering::Relaxed);
        }
    }

    fn write_alone(&mut self, fd: RawFd, i: usize, c: &Counters) {
        let b = self.pkts.with_room(i);
        b[..VNET_HDR_LEN].fill(0);
        Self::write_one(fd, b, 1, c);
    }

    /// Write everything pushed to `fd` (none if `fd` < 0: then they are forgotten).
    pub(crate) fn flush(&mut self, fd: RawFd, vnet: bool, c: &Counters) {
        if self.pkts.is_empty() || fd < 0 {
            self.pkts.clear();
            return;
        }
        if frag::has_fragments(&self.pkts) {
            let n = frag::rejoin(&self.pkts, &mut self.joined);
            if n > 0 {
                std::mem::swap(&mut self.pkts, &mut self.joined);
                c.tun_rejoined.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        if !vnet {
            for i in 0..self.pkts.len() {
                Self::write_one(fd, self.pkts.get(i), 1, c);
            }
        } else {
            offload::plan(&self.pkts, self.udp_gso, &mut self.plan);
            let plan = std::mem::take(&mut self.plan);
            for w in &plan {
                match *w {
                    offload::Write::Alone(i) => self.write_alone(fd, i, c),
                    offload::Write::Merged(i, k) => {
                        offload::merge(&self.pkts, i, k, &mut self.merged);
                        Self::write_one(fd, &self.merged, k as u64, c);
                        c.tun_gso_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    offload::Write::MergedUdp(i, k) => {
                        offload::merge(&self.pkts, i, k, &mut self.merged);
                        // SAFETY: as in write_one; the error is read right after the call.
                        let n = unsafe { libc::write(fd, self.merged.as_ptr().cast(), self.merged.len()) };
                        if n >= 0 {
                            c.tun_writes.fetch_add(1, Ordering::Relaxed);
                            c.tun_packets_out.fetch_add(k as u64, Ordering::Relaxed);
                            c.tun_gso_writes.fetch_add(1, Ordering::Relaxed);
                        } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                            // the kernel does not take UDP super-packets: from now on alone
                            self.udp_gso = false;
                            for j in i..i + k {
                                self.write_alone(fd, j, c);
                            }
                        } else {
                            c.tun_write_errors.fetch_add(k as u64, Ordering::Relaxed);
                        }
                    }
                }
            }
            self.plan = plan;
        }
        self.pkts.clear();
    }
}

pub struct Engine {
    pub shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// An engine reading `listen` (a bound UDP socket; the engine uses its own duplicate).
    pub fn new(listen: RawFd, queue_max: usize) -> io::Result<Engine> {
        // SAFETY: dup of a descriptor the caller holds open; the copy is ours to close.
        let listen = cvt(unsafe { libc::fcntl(listen, libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: plain system calls creating descriptors this engine owns.
        let epoll = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let notify = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        let wake = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        epoll_add(epoll, listen, LISTEN_TOKEN)?;
        epoll_add(epoll, wake, WAKE_TOKEN)?;
        let shared = Arc::new(Shared {
            table: Mutex::new(Table {
                bindings: HashMap::new(),
                active: Vec::new(),
                upstreams: HashMap::new(),
                owners: Owners::default(),
            }),
            lease_until: AtomicU64::new(f64::NEG_INFINITY.to_bits()),
            trust_since: AtomicU64::new(f64::INFINITY.to_bits()),
            store_offset_ms: AtomicU64::new(0f64.to_bits()),
            reject_after_ms: AtomicU64::new(f64::INFINITY.to_bits()),
            trusted: Mutex::new(Arc::new(Trusted::default())),
            queue: Mutex::new(VecDeque::new()),
            queue_max,
            counters: Counters::default(),
            listen,
            epoll,
            notify,
            wake,
            tun: Mutex::new(-1),
            tun_vnet: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("jvpn-dataplane".into())
            .spawn(move || worker.run())?;
        Ok(Engine { shared, thread: Some(thread) })
    }

    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify
    }

    /// Install or replace a binding of a direct peer (its upstream socket, if any, is kept).
    #[allow(clippy::too_many_arguments)]
    pub fn install(
        &self,
        sid: SessionId,
        channel: Arc<Mutex<Channel>>,
        epoch: u32,
        peer: SocketAddr,
        fast: bool,
        confirmed_at: f64,
        route: Option<Arc<Route>>,
    ) {
        self.install_with(sid, channel, epoch, peer, fast, confirmed_at, route, PeerKeys::default())
    }

    /// Install or replace a binding: also its balancer (`via`) and its keys' age.
    #[allow(clippy::too_many_arguments)]
    pub fn install_with(
        &self,
        sid: SessionId,
        channel: Arc<Mutex<Channel>>,
        epoch: u32,
        peer: SocketAddr,
        fast: bool,
        confirmed_at: f64,
        route: Option<Arc<Route>>,
        extra: PeerKeys,
    ) {
        let mut guard = self.shared.table.lock().expect("table");
        let t = &mut *guard;
        match t.bindings.get_mut(&sid) {
            Some(b) => {
                b.channel = channel;
                b.epoch = epoch;
                b.peer = peer;
                b.via = extra.via;
                b.keys_made_ms = extra.keys_made_ms;
                b.fast = fast;
                b.confirmed_at = confirmed_at;
                if b.route != route {
                    if let Some(old) = &b.route {
                        t.owners.remove(&sid, old);
                    }
                    if let Some(new) = &route {
                        t.owners.add(sid, new);
                    }
                    b.route = route;
                }
            }
            None => {
                if let Some(r) = &route {
                    t.owners.add(sid, r);
                }
                t.bindings.insert(
                    sid,
                    Binding {
                        channel,
                        epoch,
                        peer,
                        via: extra.via,
                        fast,
                        keys_made_ms: extra.keys_made_ms,
                        confirmed_at,
                        active: false,
                        route,
                        upstreams: HashMap::new(),
                        rx_packets: 0,
                        tx_packets: 0,
                        rx_bytes: 0,
                        tx_bytes: 0,
                        last_rx: 0.0,
                    },
                );
            }
        }
    }

    /// Remove a binding and close its upstream socket; false if it was not installed.
    pub fn remove(&self, sid: &SessionId) -> bool {
        let mut t = self.shared.table.lock().expect("table");
        match t.bindings.remove(sid) {
            Some(b) => {
                if let Some(r) = &b.route {
                    t.owners.remove(sid, r);
                }
                for fd in b.upstreams.values() {
                    t.upstreams.remove(fd);
                    close(*fd); // closing also removes it from the epoll set
                }
                true
            }
            None => false,
        }
    }

    /// The node's lease: until when (monotonic seconds) it may forward, and since when it
    /// trusts the store (a binding confirmed before that waits for its next confirmation).
    pub fn set_lease(&self, until: f64, trust_since: f64) {
        // trust_since first: a reader that sees the new deadline sees the trust that came
        // with it (a lapse renewed, and bindings confirmed before it still carry nothing)
        self.shared.trust_since.store(trust_since.to_bits(), Ordering::Release);
        self.shared.lease_until.store(until.to_bits(), Ordering::Release);
    }

    /// The store's clock as the node estimates it (store ms = monotonic ms + `offset_ms`),
    /// and the age (ms) past which a secret's keys carry nothing (the machine's
    /// `keys_reject_after_s`). Until set no age is enforced.
    pub fn set_keys_clock(&self, offset_ms: f64, reject_after_ms: f64) {
        self.shared.store_offset_ms.store(offset_ms.to_bits(), Ordering::Relaxed);
        self.shared.reject_after_ms.store(reject_after_ms.to_bits(), Ordering::Relaxed);
    }

    /// The networks whose datagrams carry the client's address in a prefix (the node's
    /// `trusted_balancers`); empty: none.
    pub fn set_trusted(&self, trusted: Trusted) {
        *self.shared.trusted.lock().expect("trusted") = Arc::new(trusted);
    }

    /// What the engine forwarded since the last call, for the bindings that had traffic
    /// meanwhile only (their counts restart): the machine's silence timers read it.
    pub fn take_active(&self) -> Vec<(SessionId, BindingStats)> {
        let mut guard = self.shared.table.lock().expect("table");
        let t = &mut *guard;
        let mut out = Vec::with_capacity(t.active.len());
        for sid in t.active.drain(..) {
            if let Some(b) = t.bindings.get_mut(&sid) {
                out.push((
                    sid,
                    BindingStats {
                        rx_packets: b.rx_packets,
                        tx_packets: b.tx_packets,
                        rx_bytes: b.rx_bytes,
                        tx_bytes: b.tx_bytes,
                        last_rx: b.last_rx,
                    },
                ));
                (b.rx_packets, b.tx_packets, b.rx_bytes, b.tx_bytes) = (0, 0, 0, 0);
                b.active = false;
            }
        }
        out
    }

    /// What the engine forwarded for a binding since the last call (the counts restart).
    pub fn take_stats(&self, sid: &SessionId) -> Option<BindingStats> {
        let mut t = self.shared.table.lock().expect("table");
        t.bindings.get_mut(sid).map(|b| {
            let out = BindingStats {
                rx_packets: b.rx_packets,
                tx_packets: b.tx_packets,
                rx_bytes: b.rx_bytes,
                tx_bytes: b.tx_bytes,
                last_rx: b.last_rx,
            };
            (b.rx_packets, b.tx_packets, b.rx_bytes, b.tx_bytes) = (0, 0, 0, 0);
            out
        })
    }

    pub fn installed(&self) -> Vec<SessionId> {
        self.shared.table.lock().expect("table").bindings.keys().copied().collect()
    }

    /// Send a payload of `flow` (0: a plain PAYLOAD) to a binding's upstream, opening that
    /// flow's connected socket on first use: from then on the engine forwards the flow's
    /// datagrams and seals its replies by itself. A binding has at most `MAX_FLOWS + 1`.
    pub fn to_upstream(&self, sid: &SessionId, flow: u16, upstream: SocketAddr, data: &[u8]) -> io::Result<()> {
        if flow > MAX_FLOWS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "flow outside 0..=MAX_FLOWS"));
        }
        let mut t = self.shared.table.lock().expect("table");
        let fd = match t.bindings.get(sid).map(|b| b.upstreams.get(&flow).copied()) {
            None => return Err(io::Error::new(io::ErrorKind::NotFound, "no such binding")),
            Some(Some(fd)) => fd,
            Some(None) => {
                let fd = open_upstream(&upstream)?;
                if let Err(e) = epoll_add(self.shared.epoll, fd, fd as u64) {
                    close(fd);
                    return Err(e);
                }
                t.upstreams.insert(fd, (*sid, flow));
                t.bindings.get_mut(sid).expect("checked above").upstreams.insert(flow, fd);
                fd
            }
        };
        // SAFETY: data is a valid slice; fd is a connected UDP socket this engine owns.
        let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            self.shared.counters.upstream_tx_drops.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Close a binding's upstream sockets, every flow's (the binding stays).
    pub fn close_upstream(&self, sid: &SessionId) {
        let mut guard = self.shared.table.lock().expect("table");
        let t = &mut *guard;
        if let Some(b) = t.bindings.get_mut(sid) {
            for (_, fd) in b.upstreams.drain() {
                t.upstreams.remove(&fd);
                close(fd);
            }
        }
    }

    /// Read and write the node's TUN from now on (a duplicate of `fd`), or stop (`None`:
    /// the duplicate is closed, so the interface goes when its owner closes its own).
    pub fn set_tun(&self, fd: Option<RawFd>) -> io::Result<()> {
        let new = match fd {
            // SAFETY: dup of a descriptor the caller holds open; the copy is ours to close.
            Some(fd) => cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?,
            None => -1,
        };
        if new >= 0 {
            if let Err(e) = set_nonblocking(new) {
                close(new);
                return Err(e);
            }
        }
        if new >= 0 {
            if let Err(e) = epoll_add(self.shared.epoll, new, TUN_TOKEN) {
                close(new);
                return Err(e);
            }
        }
        // the worker reads the descriptor under this lock: it is never closed under it
        let vnet = new >= 0 && tun_has_vnet_hdr(new);
        let mut tun = self.shared.tun.lock().expect("tun");
        if *tun >= 0 {
            close(*tun); // also leaves the epoll set
        }
        *tun = new;
        self.shared.tun_vnet.store(vnet, Ordering::SeqCst);
        Ok(())
    }

    /// Up to `max` handed-up items, oldest first.
    pub fn drain(&self, max: usize) -> Vec<HandUp> {
        let mut buf = [0u8; 8];
        // SAFETY: reading an eventfd into an 8-byte buffer resets its count; nonblocking.
        unsafe { libc::read(self.shared.notify, buf.as_mut_ptr().cast(), 8) };
        let mut q = self.shared.queue.lock().expect("queue");
        let n = q.len().min(max);
        let out: Vec<HandUp> = q.drain(..n).collect();
        if !q.is_empty() {
            self.shared.signal(); // more than max waited: stay readable
        }
        out
    }

    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        crate::batch::poke(self.shared.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
        let t = self.shared.table.lock().expect("table");
        for fd in t.upstreams.keys() {
            close(*fd);
        }
        for fd in [self.shared.listen, self.shared.epoll, self.shared.notify, self.shared.wake] {
            close(fd);
        }
        let tun = *self.shared.tun.lock().expect("tun");
        if tun >= 0 {
            close(tun);
        }
    }
}

fn open_upstream(addr: &SocketAddr) -> io::Result<RawFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: creating a socket; the descriptor is ours.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    crate::batch::grow_buffers(fd);
    let (ss, len) = to_sockaddr(addr);
    // SAFETY: ss holds a valid sockaddr of length len for fd's family.
    if let Err(e) = cvt(unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) }) {
        close(fd);
        return Err(e);
    }
    Ok(fd)
}

impl Shared {
    fn lease(&self) -> Lease {
        Lease {
            until: f64::from_bits(self.lease_until.load(Ordering::Acquire)),
            trust_since: f64::from_bits(self.trust_since.load(Ordering::Acquire)),
            store_offset_ms: f64::from_bits(self.store_offset_ms.load(Ordering::Relaxed)),
            reject_after_ms: f64::from_bits(self.reject_after_ms.load(Ordering::Relaxed)),
        }
    }

    fn signal(&self) {
        crate::batch::poke(self.notify);
    }

    fn hand_up(&self, item: HandUp, pending: &mut Vec<HandUp>) {
        let _ = self;
        pending.push(item);
    }

    fn publish(&self, pending: &mut Vec<HandUp>) {
        if pending.is_empty() {
            return;
        }
        let mut q = self.queue.lock().expect("queue");
        let was_empty = q.is_empty();
        for item in pending.drain(..) {
            if q.len() >= self.queue_max {
                self.counters.drop(DropReason::QueueFull);
                continue;
            }
            self.counters.handed_up.fetch_add(1, Ordering::Relaxed);
            if let HandUp::Datagram { data, .. } = &item {
                self.counters.handed_up_datagrams.fetch_add(1, Ordering::Relaxed);
                self.counters.handed_up_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            q.push_back(item);
        }
        drop(q);
        if was_empty {
            self.signal();
        }
    }

    fn run(self: Arc<Self>) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut rx = RecvBatch::new();
        let mut to_peer = SendBatch::new();
        let mut to_upstream = Upstreams { batch: SendBatch::new(), fd: -1 };
        let mut pending: Vec<HandUp> = Vec::with_capacity(64);
        let mut tun_rx = TunBatch::new();
        let mut tun_tx = TunWriter::new();
        while !self.stop.load(Ordering::SeqCst) {
            // SAFETY: events has room for its length; epoll is ours. 200 ms bound: stop is
            // also seen without the wake descriptor.
            let n = unsafe { libc::epoll_wait(self.epoll, events.as_mut_ptr(), events.len() as libc::c_int, 200) };
            self.counters.poll_calls.fetch_add(1, Ordering::Relaxed);
            if n < 0 {
                continue; // EINTR
            }
            for ev in &events[..n as usize] {
                match ev.u64 {
                    WAKE_TOKEN => {}
                    LISTEN_TOKEN => self.read_peers(&mut rx, &mut to_upstream, &mut tun_tx, &mut pending),
                    TUN_TOKEN => self.read_tun(&mut tun_rx, &mut to_peer, &mut pending),
                    fd => self.read_upstream(fd as RawFd, &mut rx, &mut to_peer, &mut pending),
                }
                self.publish(&mut pending);
            }
        }
    }

    /// Datagrams from clients: forward the plain case, hand up the rest.
    fn read_peers(&self, rx: &mut RecvBatch, up: &mut Upstreams, tw: &mut TunWriter, pending: &mut Vec<HandUp>) {
        let c = &self.counters;
        for _ in 0..ROUNDS_PER_WAKE {
            let n = match rx.recv(self.listen) {
                Ok(n) => n,
                Err(_) => return,
            };
            c.recv_calls.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                return;
            }
            let now = monotonic();
            let tun = self.tun.lock().expect("tun"); // held: the descriptor stays open meanwhile
            let mut t = self.table.lock().expect("table");
            let mut l3 = L3Out { tun: *tun, buf: [0u8; SLOT], w: tw };
            let lease = self.lease();
            let trusted = self.trusted.lock().expect("trusted").clone();
            for i in 0..n {
                let (pkt, from, truncated) = rx.get(i);
                let pkt: &[u8] = pkt;
                c.rx_packets.fetch_add(1, Ordering::Relaxed);
                c.rx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                let Some(from) = from else { continue };
                if truncated {
                    c.drop(DropReason::Oversized);
                    continue;
                }
                // Behind a balancer the client's address is in the prefix; what goes up is
                // the datagram as it came, for the adapter to read the same way.
                let s = match balancer::sender(&trusted, pkt, from) {
                    Ok(s) => s,
                    Err(reason) => {
                        c.drop(reason);
                        continue;
                    }
                };
                match self.forward(&mut t, s.msg, &s.client, s.via.as_ref(), now, lease, up, &mut l3) {
                    Ok(()) => {}
                    Err(Some(reason)) => c.drop(reason),
                    Err(None) => self.hand_up(HandUp::Datagram { data: pkt.to_vec(), from }, pending),
                }
            }
            l3.w.flush(l3.tun, self.tun_vnet.load(Ordering::Relaxed), c);
            up.flush(c); // before the table lock goes: a removed binding's socket stays open till then
            if n < BATCH {
                return; // drained: a short batch saves the empty call (epoll wakes us for more)
            }
        }
    }

    /// The plain case, or why not: Err(None) = the machine must see it.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        t: &mut Table,
        pkt: &[u8],
        from: &SocketAddr,
        via: Option<&SocketAddr>,
        now: f64,
        lease: Lease,
        out: &mut Upstreams,
        l3: &mut L3Out<'_>,
    ) -> Result<(), Option<DropReason>> {
        if pkt.len() < wire::HEADER_LEN || pkt[1] != TYPE_DATA {
            return Err(None);
        }
        let h = wire::parse_data(pkt).map_err(|_| None)?; // the machine counts malformed input
        let Table { bindings, active, .. } = t;
        let b = bindings.get_mut(&h.session_id).ok_or(None)?;
        if !b.fast || h.epoch != b.epoch || !b.is_peer(from, via) {
            return Err(None);
        }
        if !lease.holds(b, now) {
            return Err(Some(DropReason::LeaseExpired));
        }
        if !lease.keys_live(b, now) {
            return Err(None); // the machine opens it and refuses a payload with KEYS_EXPIRED
        }
        if let Some(route) = b.route.clone() {
            let done = self.forward_l3(b, &route, &h, pkt, now, l3);
            if done.is_ok() {
                touch(active, b, h.session_id);
            }
            return done;
        }
        if b.upstreams.is_empty() {
            return Err(None); // the machine opens the first
        }
        let mut ch = b.channel.lock().expect("channel");
        // Decrypt into the upstream batch's next slot, changing nothing yet: only a PAYLOAD
        // or FLOW_PAYLOAD forwarded here is marked; anything else goes up intact for the
        // machine to open (an unknown flow too: the machine opens its socket).
        if out.batch.is_full() {
            out.flush(&self.counters);
        }
        let queued = out.batch.count;
        let slot = out.batch.slot();
        let len = ch.open_into(&h, pkt, &mut slot[..]).map_err(Some)?;
        let (flow, at) = wire::inner_datagram(&slot[..len]).ok_or(None)?;
        let up = *b.upstreams.get(&flow).ok_or(None)?;
        if !ch.accept(h.counter, pkt.len()) {
            return Err(Some(DropReason::Replayed)); // unreachable: the lock is held since the check
        }
        drop(ch);
        let n = len - at;
        if up != out.fd && queued > 0 {
            // another flow's socket: the batch so far goes first, this datagram after it
            l3.buf[..n].copy_from_slice(&slot[at..len]);
            out.flush(&self.counters);
            out.batch.slot()[..n].copy_from_slice(&l3.buf[..n]);
        } else {
            slot.copy_within(at..len, 0);
        }
        out.fd = up;
        out.batch.push(n, None);
        b.rx_packets += 1;
        b.rx_bytes += pkt.len() as u64;
        b.last_rx = now;
        touch(active, b, h.session_id);
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// An L3 session's DATA: its IP packet, cryptokey-routed, to the node's TUN. As the
    /// machine does (`_deliver`, `_to_upstream`): a refused packet was the client's (its
    /// counter is spent, the binding heard from) and is dropped and counted by reason.
    fn forward_l3(
        &self,
        b: &mut Binding,
        route: &Route,
        h: &wire::DataHeader,
        pkt: &[u8],
        now: f64,
        l3: &mut L3Out<'_>,
    ) -> Result<(), Option<DropReason>> {
        if l3.tun < 0 {
            return Err(None); // the machine writes it (no TUN handed to the engine)
        }
        let mut ch = b.channel.lock().expect("channel");
        let len = ch.open_into(h, pkt, &mut l3.buf[..]).map_err(Some)?;
        if l3.buf[0] != INNER_PAYLOAD {
            return Err(None); // keepalives, REKEY, CLOSE, FLOW_PAYLOAD (refused there): the machine
        }
        if !ch.accept(h.counter, pkt.len()) {
            return Err(Some(DropReason::Replayed)); // unreachable: the lock is held since the check
        }
        drop(ch);
        b.rx_packets += 1;
        b.rx_bytes += pkt.len() as u64;
        b.last_rx = now;
        let c = &self.counters;
        let packet = &l3.buf[1..len];
        if let Some(why) = route.check_uplink(packet) {
            c.tunnel_drop(why);
            return Ok(());
        }
        l3.w.push(packet); // written with the batch (read_peers), the TUN's lock held till then
        c.forwarded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// IP packets the kernel routed into the node's TUN: each to the session bound here that
    /// owns its destination, sealed, in batches; what no fast binding here owns goes up
    /// unchanged (the machine relays it to the owning node or drops it).
    fn read_tun(&self, rx: &mut TunBatch, out: &mut SendBatch, pending: &mut Vec<HandUp>) {
        let c = &self.counters;
        for _ in 0..ROUNDS_PER_WAKE {
            let tun = self.tun.lock().expect("tun");
            if *tun < 0 {
                return;
            }
            let n = rx.read(*tun, self.tun_vnet.load(Ordering::Relaxed), c);
            drop(tun);
            if n == 0 {
                return;
            }
            let now = monotonic();
            let lease = self.lease();
            let mut guard = self.table.lock().expect("table");
            let t = &mut *guard;
            for i in 0..n {
                let packet = rx.get(i);
                let (sid, src) = match t.owners.owner(packet) {
                    Downlink::Session(sid, src) => (sid, src),
                    Downlink::Malformed => {
                        c.tunnel_drop(TunnelDrop::Malformed);
                        continue;
                    }
                    Downlink::NoOwner => {
                        self.hand_up(HandUp::Tun { data: packet.to_vec() }, pending);
                        continue;
                    }
                };
                let Some(b) = t.bindings.get_mut(&sid) else {
                    self.hand_up(HandUp::Tun { data: packet.to_vec() }, pending);
                    continue;
                };
                let Some(route) = b.route.as_ref() else {
                    self.hand_up(HandUp::Tun { data: packet.to_vec() }, pending);
                    continue;
                };
                if !b.fast || !lease.keys_live(b, now) {
                    // past reject-after: the machine refuses it (KEYS_EXPIRED)
                    self.hand_up(HandUp::Tun { data: packet.to_vec() }, pending);
                    continue;
                }
                if !route.allows(&src) {
                    c.tunnel_drop(TunnelDrop::SourceDenied);
                    continue;
                }
                if packet.len() > MAX_PAYLOAD_SIZE {
                    c.drop(DropReason::NotValidated); // as the machine counts an oversized reply
                    continue;
                }
                if !lease.holds(b, now) {
                    c.drop(DropReason::LeaseExpired);
                    continue;
                }
                let slot = out.slot();
                slot[DATA_PREFIX_LEN] = INNER_PAYLOAD;
                slot[DATA_PREFIX_LEN + 1..DATA_PREFIX_LEN + 1 + packet.len()].copy_from_slice(packet);
                let sealed = b.channel.lock().expect("channel").seal_in_place(&mut slot[..], packet.len() + 1);
                match sealed {
                    Ok(len) => {
                        out.push(len, Some(b.send_addr()));
                        b.tx_packets += 1;
                        b.tx_bytes += len as u64;
                        touch(&mut t.active, b, sid);
                        c.returned.fetch_add(1, Ordering::Relaxed);
                        c.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    // counter exhausted: the machine must rekey; it sees the packet
                    Err(_) => self.hand_up(HandUp::Tun { data: packet.to_vec() }, pending),
                }
                if out.is_full() {
                    self.flush_to_peers(out, &lease);
                }
            }
            drop(guard);
            self.flush_to_peers(out, &lease);
            if rx.drained() {
                return; // the TUN is drained
            }
        }
    }

    /// Replies from a binding's upstream: seal and send them in one batch, or hand up.
    fn read_upstream(&self, fd: RawFd, rx: &mut RecvBatch, out: &mut SendBatch, pending: &mut Vec<HandUp>) {
        let c = &self.counters;
        for _ in 0..ROUNDS_PER_WAKE {
            let n = match rx.recv(fd) {
                Ok(n) => n,
                Err(_) => return, // ECONNREFUSED from an ICMP: the next datagram may pass
            };
            c.recv_calls.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                return;
            }
            let now = monotonic();
            let lease = self.lease();
            let mut guard = self.table.lock().expect("table");
            let t = &mut *guard;
            let Some((sid, flow)) = t.upstreams.get(&fd).copied() else { return };
            let Some(b) = t.bindings.get_mut(&sid) else { return };
            for i in 0..n {
                let (data, _, truncated) = rx.get(i);
                if truncated || data.len() > MAX_PAYLOAD_SIZE {
                    c.drop(DropReason::NotValidated); // as the machine counts an oversized reply
                    continue;
                }
                if !b.fast || !lease.keys_live(b, now) {
                    // past reject-after: the machine refuses it (KEYS_EXPIRED)
                    self.hand_up(HandUp::Upstream { session_id: sid, flow, data: data.to_vec() }, pending);
                    continue;
                }
                if !lease.holds(b, now) {
                    c.drop(DropReason::LeaseExpired);
                    continue;
                }
                let slot = out.slot();
                let at = DATA_PREFIX_LEN + wire::write_inner_prefix(&mut slot[DATA_PREFIX_LEN..], flow);
                slot[at..at + data.len()].copy_from_slice(data);
                let inner = at - DATA_PREFIX_LEN + data.len();
                let sealed = b.channel.lock().expect("channel").seal_in_place(&mut slot[..], inner);
                match sealed {
                    Ok(len) => {
                        debug_assert_eq!(len, DATA_PREFIX_LEN + inner + AEAD_TAG_LEN);
                        out.push(len, Some(b.send_addr()));
                        b.tx_packets += 1;
                        b.tx_bytes += len as u64;
                        touch(&mut t.active, b, sid);
                        c.returned.fetch_add(1, Ordering::Relaxed);
                        c.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        // counter exhausted: the machine must rekey; it sees the reply
                        self.hand_up(HandUp::Upstream { session_id: sid, flow, data: data.to_vec() }, pending);
                    }
                }
                if out.is_full() {
                    self.flush_to_peers(out, &lease);
                }
            }
            drop(guard);
            self.flush_to_peers(out, &lease);
            if n < BATCH {
                return;
            }
        }
    }

    /// Send a batch sealed under `checked` (the lease as read when its packets were).
    fn flush_to_peers(&self, out: &mut SendBatch, checked: &Lease) {
        if out.count == 0 {
            return;
        }
        let c = &self.counters;
        // The lease again, on the clock of now: a node stopped (SIGSTOP, a VM paused) after
        // a batch was sealed must not send it when it resumes past its lease, nor once the
        // machine renewed a lapsed lease meanwhile (this thread may run again only after the
        // node's first store answer: the new trust holds none of the batch's bindings).
        if !self.lease().still_covers(checked, monotonic()) {
            let n = out.discard() as u64;
            c.drops[DropReason::LeaseExpired.code() as usize].fetch_add(n, Ordering::Relaxed);
            return;
        }
        let (sent, dropped, calls) = out.flush_gso(self.listen); // runs to one peer: GSO
        c.tx_packets.fetch_add(sent as u64, Ordering::Relaxed);
        c.send_calls.fetch_add(calls as u64, Ordering::Relaxed);
        if dropped > 0 {
            c.drops[DropReason::QueueFull.code() as usize].fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Lease;

    fn lease(until: f64, trust_since: f64) -> Lease {
        Lease { until, trust_since, store_offset_ms: 0.0, reject_after_ms: f64::INFINITY }
    }

    #[test]
    fn a_sealed_batch_leaves_only_under_the_lease_it_was_checked_under() {
        let checked = lease(10.0, 1.0);
        // unchanged, before the deadline: it leaves
        assert!(lease(10.0, 1.0).still_covers(&checked, 5.0));
        // renewed without a lapse (the deadline moved, the trust did not): it leaves
        assert!(lease(12.0, 1.0).still_covers(&checked, 11.0));
        // past the deadline (the node was paused after sealing): discarded
        assert!(!lease(10.0, 1.0).still_covers(&checked, 10.0));
        // the lease lapsed and was renewed while the batch waited: a fresh deadline, but the
        // new trust holds none of the bindings checked before it: discarded
        assert!(!lease(20.0, 15.0).still_covers(&checked, 16.0));
    }
}
