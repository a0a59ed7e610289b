//! `jvpn-loadgen`: the datagram bench's compiled load generator and UDP echo (a lab
//! instrument; the product never runs it).
//!
//! Theory of operation. The bench compares data planes whose per-packet path is compiled,
//! so the program that loads them must cost less per datagram than they do, or the bench
//! measures its own driver. Both sides batch their system calls (`recvmmsg`/`sendmmsg`)
//! and allocate nothing per datagram.
//!
//! - `echo` binds a UDP socket, prints `{"udp": [host, port], "pid": N}` on stdout, and sends
//!   every datagram back to its source until its stdin closes or says `stop` (or
//!   `--max-seconds` pass);
//!   then it prints its counters as one JSON line.
//! - `gen` sends numbered datagrams of `--size` bytes to `--target` at `--rate` per second
//!   (paced from one start instant; 0 = as fast as the window allows), never more than
//!   `--window` unanswered, for `--warmup` + `--seconds`; then it waits up to
//!   `--loss-timeout` for the last answers. Each datagram carries its sequence number, its
//!   send time and the run's random id, so an answer is matched without a table lookup and
//!   an answer of another run is refused. A datagram unanswered for `--loss-timeout` is lost
//!   (its window slot is freed). The figures count only the datagrams sent inside the
//!   measured `--seconds`; the result is one JSON line on stdout.
//!
//! Every loop is bounded in time (the run's end, or the echo's `--max-seconds`) and every
//! table in count (`MAX_PACKETS`).

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

const BATCH: usize = 64;
const SLOT: usize = 2048; // bytes per datagram buffer: the largest --size
const HEADER: usize = 24; // seq u64 | send time ns u64 | run id u64, little-endian
const MAX_PACKETS: usize = 32 << 20; // a run's table of send times: 288 MB at most
const SOCKET_BUFFER: libc::c_int = 4 << 20;
const IDLE_WAIT_NS: u64 = 10_000_000; // the longest a gen waits in ppoll
const PACING_QUANTUM_NS: u64 = 50_000; // a paced sender wakes at most this often (timer slack)
const MAX_BACKLOG_S: f64 = 0.02; // a paced sender that fell behind catches up this much, no more

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("echo") => parse(&args[1..], &["bind", "max-seconds"]).and_then(|o| echo(&o)),
        Some("gen") => parse(
            &args[1..],
            &[
                "target",
                "rate",
                "window",
                "seconds",
                "warmup",
                "size",
                "loss-timeout",
            ],
        )
        .and_then(|o| generate(&o)),
        Some("--version") => {
            println!("jvpn-loadgen {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jvpn-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

const USAGE: &str = "usage: jvpn-loadgen echo [--bind HOST:PORT] [--max-seconds S]\n\
  jvpn-loadgen gen --target HOST:PORT [--rate PER_S] [--window N] [--seconds S] [--warmup S]\n\
  \x20                [--size BYTES] [--loss-timeout S]";

/// `--name value` pairs, each name one of `known`, each at most once.
fn parse(args: &[String], known: &[&str]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .filter(|n| known.contains(n))
            .ok_or_else(|| format!("unknown argument {flag:?}\n{USAGE}"))?;
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if out.insert(name.to_string(), value.clone()).is_some() {
            return Err(format!("{flag} given twice"));
        }
    }
    Ok(out)
}

fn num<T: std::str::FromStr + PartialOrd + Copy + std::fmt::Display>(
    o: &HashMap<String, String>,
    name: &str,
    default: T,
    lo: T,
    hi: T,
) -> Result<T, String> {
    let v = match o.get(name) {
        None => default,
        Some(s) => s
            .parse::<T>()
            .map_err(|_| format!("--{name} {s:?}: not a number"))?,
    };
    if v < lo || v > hi {
        return Err(format!("--{name} {v}: out of range {lo}..{hi}"));
    }
    Ok(v)
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn set_buffers(fd: libc::c_int) {
    // The FORCE variants pass rmem_max/wmem_max as root; otherwise the plain ones, capped.
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let v = SOCKET_BUFFER;
        let p = &v as *const libc::c_int as *const libc::c_void;
        let n = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd is an open socket; p points to a c_int of length n.
        unsafe {
            if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, n) != 0 {
                libc::setsockopt(fd, libc::SOL_SOCKET, plain, p, n);
            }
        }
    }
}

/// BATCH datagram buffers with their iovecs, source addresses and message headers, laid out
/// once; `headers()` points the headers at the rest before each call (it never moves).
struct Batch {
    bufs: Box<[u8]>,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    hdrs: Box<[libc::mmsghdr]>,
}

impl Batch {
    fn new() -> Self {
        // SAFETY: iovec, sockaddr_storage and mmsghdr are plain C structs; all-zero is valid.
        let zero_iov: libc::iovec = unsafe { std::mem::zeroed() };
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Batch {
            bufs: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            iovs: vec![zero_iov; BATCH].into_boxed_slice(),
            names: vec![zero_name; BATCH].into_boxed_slice(),
            hdrs: vec![zero_hdr; BATCH].into_boxed_slice(),
        }
    }

    /// Headers for `n` messages of `lens[i]` bytes each (SLOT to receive); with `named`,
    /// each message's address is its slot of `names` (to receive into, or to send back to).
    fn headers(
        &mut self,
        n: usize,
        len: impl Fn(usize) -> usize,
        named: bool,
    ) -> *mut libc::mmsghdr {
        let base = self.bufs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < BATCH, so the slot lies inside bufs.
            self.iovs[i].iov_base = unsafe { base.add(i * SLOT) } as *mut libc::c_void;
            self.iovs[i].iov_len = len(i);
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            if named {
                h.msg_name = &mut self.names[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
                if h.msg_namelen == 0 {
                    h.msg_namelen =
                        std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                }
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            self.hdrs[i].msg_len = 0;
        }
        self.hdrs.as_mut_ptr()
    }

    fn reset_names(&mut self) {
        for h in self.hdrs.iter_mut() {
            h.msg_hdr.msg_namelen = 0;
        }
    }

    fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * SLOT..(i + 1) * SLOT]
    }
}

fn print_line(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

// ---- echo ---------------------------------------------------------------------------------

fn echo(o: &HashMap<String, String>) -> Result<(), String> {
    let bind: SocketAddr = o
        .get("bind")
        .map_or("127.0.0.1:0", String::as_str)
        .parse()
        .map_err(|_| "--bind: expected HOST:PORT".to_string())?;
    let max_seconds = num(o, "max-seconds", 3600.0f64, 0.1, 86_400.0)?;
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let fd = sock.as_raw_fd();
    set_buffers(fd);
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    print_line(&json!({"udp": [local.ip().to_string(), local.port()], "pid": std::process::id()}));

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        // EOF or a "stop" line (the namespace lab's processes are stopped so) ends the echo.
        let mut line = String::new();
        let stdin = std::io::stdin();
        while matches!(stdin.read_line(&mut line), Ok(n) if n > 0) && line.trim() != "stop" {
            line.clear();
        }
        flag.store(true, Ordering::Relaxed);
    });

    let deadline = Instant::now() + Duration::from_secs_f64(max_seconds);
    let mut b = Batch::new();
    let (mut received, mut echoed, mut dropped, mut truncated) = (0u64, 0u64, 0u64, 0u64);
    let (mut recv_calls, mut send_calls) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        b.reset_names();
        let hdrs = b.headers(BATCH, |_| SLOT, true);
        // SAFETY: hdrs points at BATCH headers whose buffers and names live in b.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs,
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        recv_calls += 1;
        if n < 0 {
            match errno() {
                libc::EAGAIN | libc::EINTR => continue,
                _ => return Err(os_error("recvmmsg")),
            }
        }
        let n = n as usize;
        received += n as u64;
        let mut lens = [0usize; BATCH];
        for (i, len) in lens.iter_mut().enumerate().take(n) {
            *len = b.hdrs[i].msg_len as usize;
        }
        truncated += (0..n)
            .filter(|&i| b.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0)
            .count() as u64;
        let hdrs = b.headers(n, |i| lens[i], true); // the received names: back to each source
        let mut off = 0usize;
        let mut tries = 0;
        while off < n && tries < 16 {
            tries += 1;
            // SAFETY: off < n <= BATCH headers prepared above.
            let r = unsafe { libc::sendmmsg(fd, hdrs.add(off), (n - off) as libc::c_uint, 0) };
            send_calls += 1;
            if r < 0 {
                match errno() {
                    libc::EINTR => continue,
                    _ => break, // EAGAIN, ENOBUFS, ECONNREFUSED...: the rest is dropped
                }
            }
            off += r as usize;
        }
        echoed += off as u64;
        dropped += (n - off) as u64;
    }
    print_line(&json!({
        "received": received, "echoed": echoed, "dropped": dropped, "truncated": truncated,
        "recv_calls": recv_calls, "send_calls": send_calls,
    }));
    Ok(())
}

// ---- load generator -----------------------------------------------------------------------

const SENT: u8 = 0;
const ANSWERED: u8 = 1;
const EXPIRED: u8 = 2;

fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: v is 8 writable bytes.
    let n = unsafe { libc::getrandom(v.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    if n == 8 {
        u64::from_le_bytes(v)
    } else {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        (std::process::id() as u64) << 32 ^ t.map_or(0, |d| d.as_nanos() as u64)
    }
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn generate(o: &HashMap<String, String>) -> Result<(), String> {
    let target: SocketAddr = o
        .get("target")
        .ok_or("gen needs --target HOST:PORT")?
        .parse()
        .map_err(|_| "--target: expected HOST:PORT".to_string())?;
    let rate = num(o, "rate", 0.0f64, 0.0, 10_000_000.0)?;
    let window = num(o, "window", 4096usize, 1, 1 << 20)?;
    let seconds = num(o, "seconds", 2.0f64, 0.05, 600.0)?;
    let warmup = num(o, "warmup", 0.5f64, 0.0, 60.0)?;
    let size = num(o, "size", 1400usize, HEADER, SLOT)?;
    let loss_timeout = num(o, "loss-timeout", 0.5f64, 0.01, 10.0)?;

    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let sock = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    sock.connect(target)
        .map_err(|e| format!("connect {target}: {e}"))?;
    let fd = sock.as_raw_fd();
    set_buffers(fd);

    let run = random_u64();
    let s_ns = |s: f64| (s * 1e9) as u64;
    let (warm_end, send_end) = (s_ns(warmup), s_ns(warmup + seconds));
    let loss_ns = s_ns(loss_timeout);
    let end = send_end + loss_ns + s_ns(0.05);
    let backlog = (rate * MAX_BACKLOG_S) as u64 + BATCH as u64;

    let mut send_times: Vec<u64> =
        Vec::with_capacity(((rate * (warmup + seconds)) as usize + BATCH).min(MAX_PACKETS));
    let mut state: Vec<u8> = Vec::with_capacity(send_times.capacity());
    let mut rtts_us: Vec<u32> = Vec::with_capacity(((rate * seconds) as usize).min(MAX_PACKETS));
    let (mut answered, mut expired, mut late, mut duplicates, mut bad) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut send_calls, mut recv_calls, mut poll_calls, mut send_errors) =
        (0u64, 0u64, 0u64, 0u64);
    let (mut skipped, mut window_full, mut capped) = (0u64, 0u64, false);
    let (mut seq_lo, mut seq_hi): (Option<usize>, Option<usize>) = (None, None);
    let mut taken = 0u64; // pacing slots used (sent or skipped)
    let mut oldest = 0usize; // every seq below is answered or expired
    let mut readable = true;
    let mut unread_passes = 0u32;

    let mut out = Batch::new();
    for i in 0..BATCH {
        let slot = out.slot(i);
        for (j, byte) in slot.iter_mut().enumerate().skip(HEADER) {
            *byte = (j as u8) ^ 0x5a;
        }
    }
    let mut inb = Batch::new();
    let t0 = Instant::now();
    let now_ns = || t0.elapsed().as_nanos() as u64;

    loop {
        let now = now_ns();
        if now >= end {
            break;
        }
        while oldest < state.len()
            && (state[oldest] != SENT || now.saturating_sub(send_times[oldest]) > loss_ns)
        {
            if state[oldest] == SENT {
                state[oldest] = EXPIRED;
                expired += 1;
            }
            oldest += 1;
        }
        if now >= send_end {
            seq_hi.get_or_insert(state.len());
            if oldest >= state.len() {
                break; // every datagram answered or expired
            }
        }
        if now >= warm_end {
            seq_lo.get_or_insert(state.len());
        }

        let mut did = false;
        if now < send_end && !capped {
            let due = if rate > 0.0 {
                (now as f64 * rate / 1e9) as u64
            } else {
                u64::MAX
            };
            if rate > 0.0 && due > taken + backlog {
                skipped += due - taken - backlog; // fell behind: those slots are not caught up
                taken = due - backlog;
            }
            let inflight = state.len() as u64 - answered - expired;
            let room = (window as u64).saturating_sub(inflight);
            if room == 0 {
                window_full += 1;
            }
            let k = due
                .saturating_sub(taken)
                .min(room)
                .min(BATCH as u64)
                .min((MAX_PACKETS - state.len()) as u64) as usize;
            if state.len() >= MAX_PACKETS {
                capped = true;
            }
            if k > 0 {
                let first = state.len() as u64;
                for i in 0..k {
                    let slot = out.slot(i);
                    slot[0..8].copy_from_slice(&(first + i as u64).to_le_bytes());
                    slot[8..16].copy_from_slice(&now.to_le_bytes());
                    slot[16..24].copy_from_slice(&run.to_le_bytes());
                }
                let hdrs = out.headers(k, |_| size, false);
                // SAFETY: k <= BATCH headers prepared above; the socket is connected.
                let r = unsafe { libc::sendmmsg(fd, hdrs, k as libc::c_uint, libc::MSG_DONTWAIT) };
                send_calls += 1;
                if r < 0 {
                    send_errors += 1; // EAGAIN/ENOBUFS/ECONNREFUSED: try again on the next pass
                } else {
                    for _ in 0..r {
                        send_times.push(now);
                        state.push(SENT);
                    }
                    taken += r as u64;
                    did = r > 0;
                }
            }
        }

        // Receive only when the socket said it is readable (or the last batch was full):
        // a receive that finds nothing is a wasted system call.
        unread_passes += 1;
        if unread_passes > 2 || (rate == 0.0 && did) {
            readable = true; // a sender busy on every pass still reads its answers
        }
        let n = if readable {
            unread_passes = 0;
            let hdrs = inb.headers(BATCH, |_| SLOT, false);
            // SAFETY: BATCH headers prepared above, their buffers in inb.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs,
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            recv_calls += 1;
            readable = n == BATCH as libc::c_int;
            n
        } else {
            0
        };
        if n > 0 {
            did = true;
            let now = now_ns();
            for i in 0..n as usize {
                let len = inb.hdrs[i].msg_len as usize;
                let slot = inb.slot(i);
                let word = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().unwrap());
                let seq = word(0) as usize;
                if len != size
                    || word(16) != run
                    || seq >= state.len()
                    || word(8) != send_times[seq]
                {
                    bad += 1;
                    continue;
                }
                match state[seq] {
                    SENT => {
                        state[seq] = ANSWERED;
                        answered += 1;
                        if send_times[seq] >= warm_end && send_times[seq] < send_end {
                            rtts_us
                                .push(((now - send_times[seq]) / 1000).min(u32::MAX as u64) as u32);
                        }
                    }
                    ANSWERED => duplicates += 1,
                    _ => late += 1,
                }
            }
        } else if n < 0 && !matches!(errno(), libc::EAGAIN | libc::EINTR | libc::ECONNREFUSED) {
            return Err(os_error("recvmmsg"));
        }

        if !did {
            // Nothing to do now: sleep until the next paced send or an answer, 10 ms at most.
            let now = now_ns();
            let mut wait = IDLE_WAIT_NS;
            if rate > 0.0 && now < send_end {
                let next = ((taken + 1) as f64 * 1e9 / rate) as u64;
                wait = wait.min(next.saturating_sub(now).max(PACING_QUANTUM_NS));
            }
            if rate == 0.0
                && now < send_end
                && state.len() as u64 - answered - expired < window as u64
            {
                wait = 0;
            }
            let ts = libc::timespec {
                tv_sec: (wait / 1_000_000_000) as libc::time_t,
                tv_nsec: (wait % 1_000_000_000) as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if wait > 0 {
                // SAFETY: one pollfd, a valid timespec, no signal mask.
                let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
                poll_calls += 1;
                readable = r > 0 && pfd.revents & libc::POLLIN != 0;
            } else {
                readable = true;
            }
        }
    }

    let elapsed = t0.elapsed().as_secs_f64();
    let lo = seq_lo.unwrap_or(state.len());
    let hi = seq_hi.unwrap_or(state.len()).max(lo);
    let sent = (hi - lo) as u64;
    let got = state[lo..hi].iter().filter(|&&s| s == ANSWERED).count() as u64;
    rtts_us.sort_unstable();
    let us = |q: f64| percentile(&rtts_us, q);
    print_line(&json!({
        "target": target.to_string(), "target_rate": rate, "window": window, "size": size,
        "seconds": seconds, "warmup": warmup, "loss_timeout": loss_timeout,
        "sent": sent, "received": got, "lost": sent - got,
        "loss": if sent > 0 { (sent - got) as f64 / sent as f64 } else { 0.0 },
        "offered_rate": sent as f64 / seconds, "rate": got as f64 / seconds,
        "rtt_p50_us": us(50.0), "rtt_p90_us": us(90.0), "rtt_p99_us": us(99.0),
        "rtt_max_us": rtts_us.last().copied().unwrap_or(0),
        "total_sent": state.len(), "total_answered": answered, "total_expired": expired,
        "late": late, "duplicates": duplicates, "bad": bad, "skipped": skipped,
        "window_full": window_full, "capped": capped, "send_errors": send_errors,
        "send_calls": send_calls, "recv_calls": recv_calls, "poll_calls": poll_calls,
        "elapsed_s": elapsed,
    }));
    Ok(())
}
