//! The agent's UDP data path on its own thread: the local application's socket and the
//! session's UDP path sockets, read in batches.
//!
//! Theory of operation. As the gateway's engine (`engine.rs`), it forwards only the plain
//! case and hands everything else to the client machine unchanged: a datagram from the
//! local application is sealed (a FLOW_PAYLOAD of its flow) and sent on the current path when the machine
//! marked that path fast (attached, a live state, a compiled channel); a DATA packet on
//! the current path that opens under the current channel and carries a PAYLOAD goes to the
//! application. Everything else (handshake answers,
//! reattach answers, notices, keepalive answers, challenges, packets on other paths, local
//! datagrams while not fast) goes up, and a DATA packet that goes up is verified only, never
//! marked: the machine opens it through the same channel.
//!
//! In UDP-forward mode each local source address is its own flow (FLOW_PAYLOAD, `flow u16 |
//! datagram`): the agent assigns the ids, never the engine. A datagram from a source the
//! engine has no flow for goes up; the agent assigns it one and installs it (`set_flow`),
//! and from then on the engine seals that source's datagrams as FLOW_PAYLOADs of its flow and
//! sends the gateway's FLOW_PAYLOADs of a flow to its source. A FLOW_PAYLOAD of a flow the
//! engine does not know goes up (the machine opens it; the agent drops it as it would). The
//! engine stamps every source's latest datagram, carried or not, so the agent gives the
//! least recently heard source's id up when every id is taken (`flow_times`).
//!
//! In L3 mode the local side is the agent's TUN instead of a socket: IP packets read from
//! it are sealed and sent on the current path, and payloads of the current path are
//! written to it, by the same rules (with offloads, read super-packets cut and each
//! batch's runs of one TCP flow merged, as in `engine.rs`); what the engine does not carry
//! goes up as a TUN packet. The engine stops forwarding alone when the current secret reaches its
//! reject-after age (`keys_until`): the machine then holds the packets and rekeys.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::batch::{RecvBatch, SendBatch, BATCH};
use crate::channel::Channel;
use crate::engine::{close, cvt, epoll_add, monotonic, tun_has_vnet_hdr, Counters, TunBatch, TunWriter, MAX_PAYLOAD_SIZE};
use crate::reasons::DropReason;
use crate::wire::{self, AEAD_TAG_LEN, DATA_PREFIX_LEN, INNER_PAYLOAD, MAX_FLOWS, TYPE_DATA};

const LOCAL_TOKEN: u64 = u64::MAX;
const WAKE_TOKEN: u64 = u64::MAX - 1;
const ROUNDS_PER_WAKE: usize = 8;

pub enum ClientHandUp {
    Local { data: Vec<u8>, from: SocketAddr },
    Path { path_id: u64, data: Vec<u8> },
    /// An IP packet read from the TUN while the engine does not carry it (L3).
    Tun { data: Vec<u8> },
}

struct Current {
    path_id: u64,
    fd: RawFd,
    channel: Arc<Mutex<Channel>>,
    fast: bool,
    keys_until: f64,
}

struct State {
    paths: HashMap<RawFd, u64>,
    by_id: HashMap<u64, RawFd>,
    current: Option<Current>,
    /// UDP-forward mode: the agent's flow of each local source, and when the source last sent.
    flows: HashMap<SocketAddr, (u16, f64)>,
    /// The source of each flow (the reverse of `flows`).
    sources: HashMap<u16, SocketAddr>,
    /// AEAD tags of the latest packets the engine sealed (a ring): a gateway's NOT_BOUND_HERE
    /// hint echoes one, and the machine believes only hints about its own packets.
    tags: Vec<[u8; AEAD_TAG_LEN]>,
    next_tag: usize,
    /// When the engine first sealed DATA since the machine last asked, and when it last
    /// accepted the gateway's DATA: the machine's silence probe reads both.
    sent: Option<f64>,
    heard: Option<f64>,
}

/// Tags the ring keeps: the machine's own ring is as long (session/client.py SENT_TAGS).
pub const SENT_TAGS: usize = 64;

fn push_tag(tags: &mut Vec<[u8; AEAD_TAG_LEN]>, next: &mut usize, tag: [u8; AEAD_TAG_LEN]) {
    if tags.len() < SENT_TAGS {
        tags.push(tag);
    } else {
        tags[*next] = tag;
    }
    *next = (*next + 1) % SENT_TAGS;
}

pub struct ClientShared {
    state: Mutex<State>,
    queue: Mutex<VecDeque<ClientHandUp>>,
    queue_max: usize,
    pub counters: Counters,
    local: RawFd,
    tun: bool, // local is the agent's TUN (L3), not a UDP socket
    vnet: bool, // the TUN carries a virtio-net header (offloads)
    epoll: RawFd,
    notify: RawFd,
    wake: RawFd,
    stop: AtomicBool,
}

pub struct ClientEngine {
    pub shared: Arc<ClientShared>,
    thread: Option<JoinHandle<()>>,
}

fn dup(fd: RawFd) -> io::Result<RawFd> {
    // SAFETY: dup of a descriptor the caller holds open; the copy is ours to close.
    cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
}

impl ClientEngine {
    /// An engine reading `local` (the application's bound UDP socket, or with `tun` the
    /// agent's TUN; a duplicate).
    pub fn new(local: RawFd, queue_max: usize, tun: bool) -> io::Result<ClientEngine> {
        let local = dup(local)?;
        if let Err(e) = crate::engine::set_nonblocking(local) {
            close(local);
            return Err(e);
        }
        if !tun {
            crate::batch::grow_buffers(local); // the application's port: its bursts wait here
        }
        // SAFETY: plain system calls creating descriptors this engine owns.
        let epoll = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let notify = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        let wake = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        epoll_add(epoll, local, LOCAL_TOKEN)?;
        epoll_add(epoll, wake, WAKE_TOKEN)?;
        let shared = Arc::new(ClientShared {
            state: Mutex::new(State {
                paths: HashMap::new(),
                by_id: HashMap::new(),
                current: None,
                flows: HashMap::new(),
                sources: HashMap::new(),
                tags: Vec::with_capacity(SENT_TAGS),
                next_tag: 0,
                sent: None,
                heard: None,
            }),
            queue: Mutex::new(VecDeque::new()),
            queue_max,
            counters: Counters::default(),
            local,
            tun,
            vnet: tun && tun_has_vnet_hdr(local),
            epoll,
            notify,
            wake,
            stop: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new().name("jvpn-dataplane".into()).spawn(move || worker.run())?;
        Ok(ClientEngine { shared, thread: Some(thread) })
    }

    pub fn notify_fd(&self) -> RawFd {
        self.shared.notify
    }

    /// Read a path's connected UDP socket from now on (a duplicate of `fd`).
    pub fn add_path(&self, path_id: u64, fd: RawFd) -> io::Result<()> {
        let fd = dup(fd)?;
        crate::batch::grow_buffers(fd);
        if let Err(e) = epoll_add(self.shared.epoll, fd, fd as u64) {
            close(fd);
            return Err(e);
        }
        let mut s = self.shared.state.lock().expect("state");
        s.paths.insert(fd, path_id);
        if let Some(old) = s.by_id.insert(path_id, fd) {
            s.paths.remove(&old);
            close(old);
        }
        Ok(())
    }

    /// Stop reading a path (closes the engine's duplicate; the caller closes its own).
    pub fn remove_path(&self, path_id: u64) {
        let mut s = self.shared.state.lock().expect("state");
        if let Some(fd) = s.by_id.remove(&path_id) {
            s.paths.remove(&fd);
            if s.current.as_ref().is_some_and(|c| c.path_id == path_id) {
                s.current = None;
            }
            close(fd);
        }
    }

    /// The machine's current path and channel, and whether the engine may forward alone.
    pub fn set_current(&self, current: Option<(u64, Arc<Mutex<Channel>>, bool, f64)>) {
        let mut s = self.shared.state.lock().expect("state");
        s.current = current.and_then(|(path_id, channel, fast, keys_until)| {
            s.by_id.get(&path_id).map(|&fd| Current { path_id, fd, channel, fast, keys_until })
        });
    }

    /// The agent gave `flow` (1..=MAX_FLOWS) to the local source `addr`: the flow's previous
    /// source, and the source's previous flow, lose theirs.
    pub fn set_flow(&self, flow: u16, addr: SocketAddr) -> io::Result<()> {
        if flow == 0 || flow > MAX_FLOWS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "flow outside 1..=MAX_FLOWS"));
        }
        let mut guard = self.shared.state.lock().expect("state");
        let s = &mut *guard;
        if let Some(old) = s.sources.insert(flow, addr) {
            s.flows.remove(&old);
        }
        if let Some((old, _)) = s.flows.insert(addr, (flow, monotonic())) {
            if old != flow {
                s.sources.remove(&old);
            }
        }
        Ok(())
    }

    /// Every flow the engine knows and when its source last sent (monotonic seconds).
    pub fn flow_times(&self) -> Vec<(u16, f64)> {
        let s = self.shared.state.lock().expect("state");
        s.flows.values().copied().collect()
    }

    /// (first DATA sealed since the last call, last DATA accepted), monotonic seconds; the
    /// first restarts.
    pub fn take_activity(&self) -> (Option<f64>, Option<f64>) {
        let mut s = self.shared.state.lock().expect("state");
        (s.sent.take(), s.heard)
    }

    /// The AEAD tags of the latest packets the engine sealed, oldest first.
    pub fn recent_tags(&self) -> Vec<[u8; AEAD_TAG_LEN]> {
        let s = self.shared.state.lock().expect("state");
        let mut out = Vec::with_capacity(s.tags.len());
        if s.tags.len() < SENT_TAGS {
            out.extend_from_slice(&s.tags);
        } else {
            out.extend_from_slice(&s.tags[s.next_tag..]);
            out.extend_from_slice(&s.tags[..s.next_tag]);
        }
        out
    }

    pub fn drain(&self, max: usize) -> Vec<ClientHandUp> {
        let mut buf = [0u8; 8];
        // SAFETY: reading an eventfd into an 8-byte buffer resets its count; nonblocking.
        unsafe { libc::read(self.shared.notify, buf.as_mut_ptr().cast(), 8) };
        let mut q = self.shared.queue.lock().expect("queue");
        let n = q.len().min(max);
        let out: Vec<ClientHandUp> = q.drain(..n).collect();
        if !q.is_empty() {
            self.shared.signal();
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

impl Drop for ClientEngine {
    fn drop(&mut self) {
        self.stop();
        let s = self.shared.state.lock().expect("state");
        for fd in s.paths.keys() {
            close(*fd);
        }
        for fd in [self.shared.local, self.shared.epoll, self.shared.notify, self.shared.wake] {
            close(fd);
        }
    }
}

impl ClientShared {
    fn signal(&self) {
        crate::batch::poke(self.notify);
    }

    fn publish(&self, pending: &mut Vec<ClientHandUp>) {
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
        let mut out = SendBatch::new();
        let mut pending = Vec::with_capacity(64);
        let mut tun_rx = TunBatch::new();
        let mut tun_tx = TunWriter::new();
        while !self.stop.load(Ordering::SeqCst) {
            // SAFETY: events has room for its length; epoll is ours; 200 ms bound.
            let n = unsafe { libc::epoll_wait(self.epoll, events.as_mut_ptr(), events.len() as libc::c_int, 200) };
            self.counters.poll_calls.fetch_add(1, Ordering::Relaxed);
            if n < 0 {
                continue;
            }
            for ev in &events[..n as usize] {
                match ev.u64 {
                    WAKE_TOKEN => {}
                    LOCAL_TOKEN if self.tun => self.read_tun(&mut tun_rx, &mut out, &mut pending),
                    LOCAL_TOKEN => self.read_local(&mut rx, &mut out, &mut pending),
                    fd => self.read_path(fd as RawFd, &mut rx, &mut out, &mut tun_tx, &mut pending),
                }
                self.publish(&mut pending);
            }
        }
    }

    fn flush(&self, out: &mut SendBatch, fd: RawFd) {
        if out.count == 0 {
            return;
        }
        // the tunnel's path sockets send runs as GSO messages; the application's socket not
        let (sent, dropped, calls) = if fd == self.local { out.flush(fd) } else { out.flush_gso(fd) };
        let c = &self.counters;
        c.tx_packets.fetch_add(sent as u64, Ordering::Relaxed);
        c.send_calls.fetch_add(calls as u64, Ordering::Relaxed);
        c.upstream_tx_drops.fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// From the TUN (L3): each IP packet sealed and sent on the current path, or handed up.
    fn read_tun(&self, rx: &mut TunBatch, out: &mut SendBatch, pending: &mut Vec<ClientHandUp>) {
        let c = &self.counters;
        for _ in 0..ROUNDS_PER_WAKE {
            let n = rx.read(self.local, self.vnet, c);
            if n == 0 {
                return;
            }
            let now = monotonic();
            let mut guard = self.state.lock().expect("state");
            let s = &mut *guard;
            let cur = s.current.as_ref().filter(|c| c.fast && now < c.keys_until);
            let mut fd = -1;
            for i in 0..n {
                let data = rx.get(i);
                c.rx_packets.fetch_add(1, Ordering::Relaxed);
                if data.len() > MAX_PAYLOAD_SIZE {
                    c.drop(DropReason::Oversized);
                    continue;
                }
                let Some(cur) = cur else {
                    pending.push(ClientHandUp::Tun { data: data.to_vec() });
                    continue;
                };
                fd = cur.fd;
                let slot = out.slot();
                slot[DATA_PREFIX_LEN] = INNER_PAYLOAD;
                slot[DATA_PREFIX_LEN + 1..DATA_PREFIX_LEN + 1 + data.len()].copy_from_slice(data);
                match cur.channel.lock().expect("channel").seal_in_place(&mut slot[..], data.len() + 1) {
                    Ok(len) => {
                        let tag: [u8; AEAD_TAG_LEN] = slot[len - AEAD_TAG_LEN..len].try_into().expect("tag length");
                        push_tag(&mut s.tags, &mut s.next_tag, tag);
                        s.sent.get_or_insert(now);
                        out.push(len, None);
                        c.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => pending.push(ClientHandUp::Tun { data: data.to_vec() }),
                }
                if out.is_full() {
                    self.flush(out, fd);
                }
            }
            drop(guard);
            self.flush(out, fd);
            if rx.drained() {
                return;
            }
        }
    }

    /// From the application: seal and send on the current path, or hand up.
    fn read_local(&self, rx: &mut RecvBatch, out: &mut SendBatch, pending: &mut Vec<ClientHandUp>) {
        let c = &self.counters;
        for _ in 0..ROUNDS_PER_WAKE {
            let n = match rx.recv(self.local) {
                Ok(n) => n,
                Err(_) => return,
            };
            c.recv_calls.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                return;
            }
            let now = monotonic();
            let mut guard = self.state.lock().expect("state");
            let s = &mut *guard;
            let mut fd = -1;
            for i in 0..n {
                let (data, from, truncated) = rx.get(i);
                c.rx_packets.fetch_add(1, Ordering::Relaxed);
                let Some(from) = from else { continue };
                if truncated || data.len() > MAX_PAYLOAD_SIZE {
                    c.drop(DropReason::Oversized);
                    continue;
                }
                let flow = match s.flows.get_mut(&from) {
                    Some((flow, last)) => {
                        *last = now;
                        Some(*flow)
                    }
                    None => None, // a new source: the agent assigns its flow
                };
                let cur = s.current.as_ref().filter(|c| c.fast && now < c.keys_until);
                let (Some(cur), Some(flow)) = (cur, flow) else {
                    pending.push(ClientHandUp::Local { data: data.to_vec(), from });
                    continue;
                };
                fd = cur.fd;
                let slot = out.slot();
                let at = DATA_PREFIX_LEN + wire::write_inner_prefix(&mut slot[DATA_PREFIX_LEN..], flow);
                slot[at..at + data.len()].copy_from_slice(data);
                let inner = at - DATA_PREFIX_LEN + data.len();
                match cur.channel.lock().expect("channel").seal_in_place(&mut slot[..], inner) {
                    Ok(len) => {
                        let tag: [u8; AEAD_TAG_LEN] = slot[len - AEAD_TAG_LEN..len].try_into().expect("tag length");
                        push_tag(&mut s.tags, &mut s.next_tag, tag);
                        s.sent.get_or_insert(now);
                        out.push(len, None);
                        c.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => pending.push(ClientHandUp::Local { data: data.to_vec(), from }),
                }
                if out.is_full() {
                    self.flush(out, fd);
                }
            }
            drop(guard);
            self.flush(out, fd);
            if n < BATCH {
                return; // drained: a short batch saves the empty call (epoll wakes us for more)
            }
        }
    }

    /// From a gateway: the current path's payloads to the application, the rest up.
    fn read_path(
        &self,
        fd: RawFd,
        rx: &mut RecvBatch,
        out: &mut SendBatch,
        tw: &mut TunWriter,
        pending: &mut Vec<ClientHandUp>,
    ) {
        let c = &self.counters;
        for _ in 0..ROUNDS_PER_WAKE {
            let n = match rx.recv(fd) {
                Ok(n) => n,
                Err(_) => return, // ECONNREFUSED (ICMP): the machine notices silence
            };
            c.recv_calls.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                return;
            }
            let now = monotonic();
            let mut guard = self.state.lock().expect("state");
            let s = &mut *guard;
            let Some(&path_id) = s.paths.get(&fd) else { return };
            let cur = s.current.as_ref().filter(|c| c.fast && c.path_id == path_id);
            let mut heard = None;
            for i in 0..n {
                let (pkt, _, truncated) = rx.get(i);
                let pkt: &[u8] = pkt;
                c.rx_packets.fetch_add(1, Ordering::Relaxed);
                if truncated {
                    c.drop(DropReason::Oversized);
                    continue;
                }
                let Some(cur) = cur else {
                    pending.push(ClientHandUp::Path { path_id, data: pkt.to_vec() });
                    continue;
                };
                if pkt.len() < wire::HEADER_LEN || pkt[1] != TYPE_DATA {
                    pending.push(ClientHandUp::Path { path_id, data: pkt.to_vec() });
                    continue;
                }
                let Ok(h) = wire::parse_data(pkt) else {
                    pending.push(ClientHandUp::Path { path_id, data: pkt.to_vec() });
                    continue;
                };
                let mut ch = cur.channel.lock().expect("channel");
                let slot = out.slot();
                let opened = ch.open_into(&h, pkt, &mut slot[..]);
                // L3: a PAYLOAD, to the TUN; UDP-forward: a FLOW_PAYLOAD, to its flow's source
                let to = opened.as_ref().ok().and_then(|&len| match wire::inner_datagram(&slot[..len]) {
                    Some((0, at)) if self.tun => Some((at, None)),
                    Some((flow, at)) if !self.tun && flow != 0 => s.sources.get(&flow).map(|a| (at, Some(*a))),
                    _ => None,
                });
                match opened {
                    Ok(len) if to.is_some() => {
                        if ch.accept(h.counter, pkt.len()) {
                            drop(ch);
                            heard = Some(now);
                            match to {
                                Some((at, Some(source))) => {
                                    slot.copy_within(at..len, 0);
                                    out.push(len - at, Some(&source));
                                }
                                Some((at, None)) => tw.push(&slot[at..len]),
                                None => unreachable!("checked by the guard"),
                            }
                            c.returned.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) | Err(DropReason::StaleEpoch) | Err(DropReason::UnknownSession) => {
                        pending.push(ClientHandUp::Path { path_id, data: pkt.to_vec() });
                    }
                    Err(reason) => c.drop(reason),
                }
                if out.is_full() {
                    self.flush(out, self.local);
                }
            }
            if heard.is_some() {
                s.heard = heard;
            }
            drop(guard);
            if self.tun {
                tw.flush(self.local, self.vnet, c); // a batch's segments of one flow: merged
            }
            self.flush(out, self.local);
            if n < BATCH {
                return;
            }
        }
    }
}
