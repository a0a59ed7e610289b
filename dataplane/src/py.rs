//! The Python face: `DataChannel` and `ReplayWindow` with the API of their references in
//! `session/framing.py` and `session/replay.py`, raising the core's own exceptions
//! (`session.errors`) with the same `DropReason`. No panic crosses this boundary: every
//! input a caller or the network controls is checked, and errors become exceptions.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyBytes;

use crate::channel::{Channel, SealError, REJECT_AFTER_MESSAGES};
use crate::reasons::{DropReason, ErrorKind};
use crate::replay;
use crate::route::{Downlink, Owners, Prefix, Route, TunnelDrop};
use crate::wire::{self, AEAD_TAG_LEN, DATA_PREFIX_LEN, MAX_INNER_LEN, MAX_MESSAGE_SIZE};

struct Errors {
    decode: PyObject,
    auth: PyObject,
    replay: PyObject,
    local: PyObject,
    reason: PyObject,
}

static ERRORS: GILOnceCell<Errors> = GILOnceCell::new();

fn errors(py: Python<'_>) -> PyResult<&Errors> {
    ERRORS.get_or_try_init(py, || {
        let e = py.import("session.errors")?;
        let r = py.import("session.reasons")?;
        Ok(Errors {
            decode: e.getattr("DecodeError")?.unbind(),
            auth: e.getattr("AuthError")?.unbind(),
            replay: e.getattr("ReplayError")?.unbind(),
            local: e.getattr("LocalProtocolError")?.unbind(),
            reason: r.getattr("DropReason")?.unbind(),
        })
    })
}

/// The core's exception for a drop reason: DecodeError, AuthError or ReplayError.
fn drop_error(py: Python<'_>, reason: DropReason, detail: String) -> PyErr {
    match errors(py) {
        Ok(e) => {
            let cls = match reason.kind() {
                ErrorKind::Decode => &e.decode,
                ErrorKind::Auth => &e.auth,
                ErrorKind::Replay => &e.replay,
            };
            match e.reason.call1(py, (reason.code(),)).and_then(|r| cls.call1(py, (r, detail))) {
                Ok(obj) => PyErr::from_value(obj.into_bound(py)),
                Err(err) => err,
            }
        }
        Err(err) => err,
    }
}

fn session_id(raw: &[u8]) -> PyResult<wire::SessionId> {
    raw.try_into().map_err(|_| PyValueError::new_err("session_id must be 16 bytes"))
}

fn key(raw: &[u8]) -> PyResult<[u8; 32]> {
    raw.try_into().map_err(|_| PyValueError::new_err("traffic keys must be 32 bytes"))
}

/// Seal and open DATA packets of one binding, for one side (`session.framing.DataChannel`).
#[pyclass(module = "jvpn_dataplane", frozen)]
pub struct DataChannel {
    inner: Arc<Mutex<Channel>>,
    #[pyo3(get)]
    session_id: Py<PyBytes>,
    #[pyo3(get)]
    epoch: u32,
}

impl DataChannel {
    fn lock(&self) -> PyResult<MutexGuard<'_, Channel>> {
        self.inner.lock().map_err(|_| PyRuntimeError::new_err("data channel poisoned"))
    }
}

#[pymethods]
impl DataChannel {
    #[new]
    fn new(py: Python<'_>, send_key: &[u8], recv_key: &[u8], session_id_: &[u8], epoch: i64) -> PyResult<Self> {
        let (s, r) = (key(send_key)?, key(recv_key)?);
        let sid = session_id(session_id_)?;
        let epoch = u32::try_from(epoch).map_err(|_| PyValueError::new_err("epoch out of range"))?;
        let ch = Channel::new(&s, &r, sid, epoch).map_err(|_| {
            PyValueError::new_err("send and receive keys must differ (nonce reuse across directions)")
        })?;
        Ok(DataChannel { inner: Arc::new(Mutex::new(ch)), session_id: PyBytes::new(py, &sid).unbind(), epoch })
    }

    /// The counter the next sealed packet will carry.
    #[getter]
    fn next_send_counter(&self) -> PyResult<u64> {
        Ok(self.lock()?.next_send_counter())
    }

    /// The highest counter accepted so far.
    #[getter]
    fn highest_received(&self) -> PyResult<Option<u64>> {
        Ok(self.lock()?.highest_received())
    }

    #[getter]
    fn packets_sent(&self) -> PyResult<u64> {
        Ok(self.lock()?.packets_sent)
    }

    #[getter]
    fn bytes_sent(&self) -> PyResult<u64> {
        Ok(self.lock()?.bytes_sent)
    }

    #[getter]
    fn packets_received(&self) -> PyResult<u64> {
        Ok(self.lock()?.packets_received)
    }

    #[getter]
    fn bytes_received(&self) -> PyResult<u64> {
        Ok(self.lock()?.bytes_received)
    }

    /// Encrypt one inner message into a complete encoded DATA packet.
    fn seal<'py>(&self, py: Python<'py>, inner: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let len = inner.len();
        if len == 0 || len > MAX_INNER_LEN {
            return Err(PyValueError::new_err(format!("inner message of {len} bytes (1..{MAX_INNER_LEN})")));
        }
        let mut ch = self.lock()?;
        if ch.next_send_counter() >= REJECT_AFTER_MESSAGES {
            let e = errors(py)?;
            return Err(PyErr::from_value(
                e.local.call1(py, ("send counter exhausted: start a new epoch",))?.into_bound(py),
            ));
        }
        PyBytes::new_with(py, DATA_PREFIX_LEN + len + AEAD_TAG_LEN, |out| {
            ch.seal_into(inner, out).map(|_| ()).map_err(|e| match e {
                SealError::Exhausted | SealError::BadLength(_) | SealError::NoRoom => {
                    PyRuntimeError::new_err(format!("seal failed: {e:?}"))
                }
            })
        })
    }

    /// Authenticate and decrypt a decoded DATA packet (``raw`` is its encoding; the header
    /// fields are read from it, as the codec decoded them).
    fn open<'py>(&self, py: Python<'py>, msg: &Bound<'py, PyAny>, raw: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let _ = msg;
        self.open_raw(py, raw)
    }

    /// Decode and open a DATA packet in one call.
    fn open_raw<'py>(&self, py: Python<'py>, raw: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        if raw.len() > MAX_MESSAGE_SIZE {
            return Err(drop_error(py, DropReason::Oversized, format!("{} bytes", raw.len())));
        }
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let pkt = &mut buf[..raw.len()];
        pkt.copy_from_slice(raw);
        let h = wire::parse_data(pkt).map_err(|r| drop_error(py, r, "DATA".into()))?;
        let range = self
            .lock()?
            .open_parsed(&h, pkt, true)
            .map_err(|r| drop_error(py, r, format!("counter {}", h.counter)))?;
        Ok(PyBytes::new(py, &pkt[range]))
    }
}

/// Accepts each counter at most once, and none older than the window (`session.replay`).
#[pyclass(module = "jvpn_dataplane", name = "ReplayWindow")]
#[derive(Default)]
pub struct PyReplayWindow {
    w: replay::ReplayWindow,
}

#[pymethods]
impl PyReplayWindow {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    #[getter]
    fn highest(&self) -> Option<u64> {
        self.w.highest()
    }

    /// Would ``update(counter)`` accept it? Changes nothing.
    fn check(&self, counter: &Bound<'_, PyAny>) -> bool {
        match counter.extract::<u64>() {
            Ok(c) => self.w.check(c),
            Err(_) => false, // negative or beyond u64: never acceptable
        }
    }

    /// Mark ``counter`` as seen; False if it is a duplicate, too old or out of range.
    fn update(&mut self, counter: &Bound<'_, PyAny>) -> bool {
        match counter.extract::<u64>() {
            Ok(c) => self.w.update(c),
            Err(_) => false,
        }
    }
}

fn packed_ip(raw: &[u8]) -> PyResult<std::net::IpAddr> {
    match raw.len() {
        4 => Ok(std::net::IpAddr::from(<[u8; 4]>::try_from(raw).expect("4 bytes"))),
        16 => Ok(std::net::IpAddr::from(<[u8; 16]>::try_from(raw).expect("16 bytes"))),
        n => Err(PyValueError::new_err(format!("a packed address is 4 or 16 bytes, not {n}"))),
    }
}

/// One L3 session's inner addresses and allowed prefixes, as the engine checks them
/// (``session.tunnel.SessionRoute``): ``CryptokeyRoute(v4, v6, [(network, length), ...])``,
/// addresses packed.
#[pyclass(module = "jvpn_dataplane", frozen)]
pub struct CryptokeyRoute {
    inner: Arc<Route>,
}

#[pymethods]
impl CryptokeyRoute {
    #[new]
    fn new(v4: &[u8], v6: &[u8], prefixes: Vec<(Vec<u8>, u8)>) -> PyResult<Self> {
        let own = [packed_ip(v4)?, packed_ip(v6)?];
        let mut out = Vec::with_capacity(prefixes.len());
        for (net, len) in prefixes {
            let net = packed_ip(&net)?;
            out.push(Prefix::new(net, len).ok_or_else(|| PyValueError::new_err(format!("prefix length {len}")))?);
        }
        Ok(CryptokeyRoute { inner: Arc::new(Route { own, prefixes: out }) })
    }

    fn owns(&self, packed: &[u8]) -> PyResult<bool> {
        Ok(self.inner.owns(&packed_ip(packed)?))
    }

    fn allows(&self, packed: &[u8]) -> PyResult<bool> {
        Ok(self.inner.allows(&packed_ip(packed)?))
    }

    /// None if the session may send ``packet`` on, else the ``TunnelDrop`` value.
    fn check_uplink(&self, packet: &[u8]) -> Option<u8> {
        self.inner.check_uplink(packet).map(TunnelDrop::code)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.downcast::<CryptokeyRoute>().is_ok_and(|o| *o.get().inner == *self.inner)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.own.hash(&mut h);
        h.finish()
    }
}

/// The engine's map from inner address to session (``session.tunnel.TunnelRouter``), for
/// the differential tests of the downlink routing.
#[pyclass(module = "jvpn_dataplane")]
#[derive(Default)]
pub struct TunnelRouter {
    owners: Owners,
}

#[pymethods]
impl TunnelRouter {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, session_id_: &[u8], route: &CryptokeyRoute) -> PyResult<()> {
        self.owners.add(session_id(session_id_)?, &route.inner);
        Ok(())
    }

    fn remove(&mut self, session_id_: &[u8], route: &CryptokeyRoute) -> PyResult<()> {
        self.owners.remove(&session_id(session_id_)?, &route.inner);
        Ok(())
    }

    /// (session id, packed source) of the session owning ``packet``'s destination, or
    /// (None, TunnelDrop value): NO_ROUTE when no session owns it, MALFORMED.
    fn owner<'py>(&self, py: Python<'py>, packet: &[u8]) -> (Option<Bound<'py, PyBytes>>, PyObject) {
        match self.owners.owner(packet) {
            Downlink::Session(sid, src) => {
                let packed: Vec<u8> = match src {
                    std::net::IpAddr::V4(a) => a.octets().to_vec(),
                    std::net::IpAddr::V6(a) => a.octets().to_vec(),
                };
                (Some(PyBytes::new(py, &sid)), PyBytes::new(py, &packed).into_any().unbind())
            }
            Downlink::NoOwner => (None, TunnelDrop::NoRoute.code().into_pyobject(py).expect("int").into_any().unbind()),
            Downlink::Malformed => (None, TunnelDrop::Malformed.code().into_pyobject(py).expect("int").into_any().unbind()),
        }
    }

    fn __len__(&self) -> usize {
        self.owners.len()
    }
}

/// Parse a DATA packet's cleartext prefix: (session_id, epoch, counter), or the core's
/// DecodeError with the codec's reason.
#[pyfunction]
fn parse_data<'py>(py: Python<'py>, raw: &[u8]) -> PyResult<(Bound<'py, PyBytes>, u32, u64)> {
    let h = wire::parse_data(raw).map_err(|r| drop_error(py, r, "DATA".into()))?;
    Ok((PyBytes::new(py, &h.session_id), h.epoch, h.counter))
}

fn trusted_networks(networks: Vec<(Vec<u8>, u8)>) -> PyResult<crate::balancer::Trusted> {
    let mut nets = Vec::with_capacity(networks.len());
    for (net, len) in networks {
        nets.push((packed_ip(&net)?, len));
    }
    crate::balancer::Trusted::new(nets).ok_or_else(|| PyValueError::new_err("prefix length beyond the address family"))
}

/// Who sent ``data`` from ``from_`` as the engine reads it, given the trusted balancer
/// networks (``(packed address, prefix length)``): ``(None, (host, port) of the client,
/// (host, port) of the balancer or None, the message's offset)``, or ``(DropReason value,
/// None, None, 0)`` when it is dropped (``MISSING_PREFIX``, ``UNTRUSTED_PREFIX``).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn balancer_sender(
    py: Python<'_>,
    data: &[u8],
    from_: &Bound<'_, PyAny>,
    networks: Vec<(Vec<u8>, u8)>,
) -> PyResult<(Option<u8>, PyObject, PyObject, usize)> {
    let trusted = trusted_networks(networks)?;
    let from = peer_addr(from_)?;
    Ok(match crate::balancer::sender(&trusted, data, from) {
        Ok(s) => {
            let via = match s.via {
                Some(v) => py_addr(py, &v)?,
                None => py.None(),
            };
            (None, py_addr(py, &s.client)?, via, data.len() - s.msg.len())
        }
        Err(r) => (Some(r.code()), py.None(), py.None(), 0),
    })
}

#[pymodule]
fn jvpn_dataplane(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataChannel>()?;
    m.add_class::<PyReplayWindow>()?;
    m.add_class::<GatewayEngine>()?;
    m.add_class::<AgentEngine>()?;
    m.add_class::<CryptokeyRoute>()?;
    m.add_class::<TunnelRouter>()?;
    m.add_function(wrap_pyfunction!(parse_data, m)?)?;
    m.add_function(wrap_pyfunction!(balancer_sender, m)?)?;
    m.add("REPLAY_WINDOW", replay::REPLAY_WINDOW)?;
    m.add("MAX_INNER_LEN", MAX_INNER_LEN)?;
    // the engines carry UDP-forward mode's flows (FLOW_PAYLOAD), ids 1..=MAX_FLOWS
    m.add("MAX_FLOWS", wire::MAX_FLOWS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

fn peer_addr(addr: &Bound<'_, PyAny>) -> PyResult<std::net::SocketAddr> {
    let (host, port): (String, u16) = (addr.get_item(0)?.extract()?, addr.get_item(1)?.extract()?);
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| PyValueError::new_err(format!("not an IP address: {host:?}")))?;
    Ok(std::net::SocketAddr::new(ip, port))
}

fn py_addr(py: Python<'_>, addr: &std::net::SocketAddr) -> PyResult<PyObject> {
    Ok((addr.ip().to_string(), addr.port()).into_pyobject(py)?.into_any().unbind())
}

/// The gateway's UDP data path on a Rust thread (`engine.rs`): the machine installs
/// bindings; everything that is not plain forwarding comes back through ``drain``.
#[pyclass(module = "jvpn_dataplane", frozen)]
pub struct GatewayEngine {
    engine: Mutex<Option<crate::engine::Engine>>,
    notify: i32,
}

impl GatewayEngine {
    fn with<T>(&self, f: impl FnOnce(&crate::engine::Engine) -> PyResult<T>) -> PyResult<T> {
        let g = self.engine.lock().map_err(|_| PyRuntimeError::new_err("engine poisoned"))?;
        match g.as_ref() {
            Some(e) => f(e),
            None => Err(PyRuntimeError::new_err("the data plane engine is stopped")),
        }
    }
}

#[pymethods]
impl GatewayEngine {
    /// Start reading the bound UDP socket ``fd`` (the engine reads a duplicate; the caller
    /// keeps sending on its own). ``queue_max``: items waiting for the machine at most.
    #[new]
    #[pyo3(signature = (fd, queue_max = 8192))]
    fn new(fd: i32, queue_max: usize) -> PyResult<Self> {
        let e = crate::engine::Engine::new(fd, queue_max.max(1))
            .map_err(|e| PyRuntimeError::new_err(format!("data plane engine: {e}")))?;
        let notify = e.notify_fd();
        Ok(GatewayEngine { engine: Mutex::new(Some(e)), notify })
    }

    /// The descriptor that is readable while handed-up items wait (an eventfd).
    fn fileno(&self) -> i32 {
        self.notify
    }

    /// Install or update a binding: its channel (a compiled DataChannel: the engine and the
    /// machine share its replay window and send counter), epoch, peer, whether the engine
    /// may forward for it alone, and when (monotonic seconds) the store last confirmed it
    /// (it carries data while the node's lease holds, ``set_lease``, and it was confirmed
    /// since the node last trusted the store).
    ///
    /// ``route`` (L3 sessions): a ``CryptokeyRoute``, the session's inner addresses and
    /// allowed prefixes; the engine then writes its checked uplink packets to the TUN
    /// (``set_tun``) and routes downlink packets for its addresses to it.
    ///
    /// ``via`` (behind a balancer): the balancer's socket the peer's datagrams come from,
    /// prefixed with ``peer`` (the client's address), and its replies go to. ``keys_made_ms``:
    /// when (store ms) the binding's secret was made; past ``set_keys_clock``'s reject-after
    /// the engine carries nothing for it and hands up instead (None: no age enforced).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (session_id_, channel, peer, fast, confirmed_at, route = None, via = None, keys_made_ms = None))]
    fn install(
        &self,
        session_id_: &[u8],
        channel: &DataChannel,
        peer: &Bound<'_, PyAny>,
        fast: bool,
        confirmed_at: f64,
        route: Option<&CryptokeyRoute>,
        via: Option<&Bound<'_, PyAny>>,
        keys_made_ms: Option<f64>,
    ) -> PyResult<()> {
        let sid = session_id(session_id_)?;
        let peer = peer_addr(peer)?;
        let via = via.map(peer_addr).transpose()?;
        let route = route.map(|r| r.inner.clone());
        let extra = crate::engine::PeerKeys { via, keys_made_ms };
        self.with(|e| {
            e.install_with(sid, channel.inner.clone(), channel.epoch, peer, fast, confirmed_at, route, extra);
            Ok(())
        })
    }

    /// The store's clock as the node estimates it (store ms = monotonic ms + ``offset_ms``)
    /// and the secrets' reject-after age in ms: a binding whose keys are older carries
    /// nothing here (its packets go to the machine, which refuses them: KEYS_EXPIRED).
    fn set_keys_clock(&self, offset_ms: f64, reject_after_ms: f64) -> PyResult<()> {
        self.with(|e| {
            e.set_keys_clock(offset_ms, reject_after_ms);
            Ok(())
        })
    }

    /// The node's trusted balancers, ``[(packed network address, prefix length)]``: a
    /// datagram from one must carry the client's address in its prefix (else dropped,
    /// MISSING_PREFIX); from anyone else a datagram with the prefix magic is dropped
    /// (UNTRUSTED_PREFIX). Handed-up datagrams keep their prefix.
    fn set_trusted_balancers(&self, networks: Vec<(Vec<u8>, u8)>) -> PyResult<()> {
        let trusted = trusted_networks(networks)?;
        self.with(|e| {
            e.set_trusted(trusted);
            Ok(())
        })
    }

    /// The node's lease, one value for every binding: until when (monotonic seconds) it may
    /// forward, and since when it trusts the store. Until first set nothing is forwarded.
    fn set_lease(&self, until: f64, trust_since: f64) -> PyResult<()> {
        self.with(|e| {
            e.set_lease(until, trust_since);
            Ok(())
        })
    }

    /// ``(session_id, packets received, packets sent, last receive time, bytes received,
    /// bytes sent)`` for each binding that had traffic since the last call (its counts
    /// restart): proportional to the active bindings, not to all.
    #[allow(clippy::type_complexity)]
    fn take_active<'py>(&self, py: Python<'py>) -> PyResult<Vec<(Bound<'py, PyBytes>, u64, u64, f64, u64, u64)>> {
        let items = self.with(|e| Ok(e.take_active()))?;
        Ok(items
            .into_iter()
            .map(|(sid, s)| (PyBytes::new(py, &sid), s.rx_packets, s.tx_packets, s.last_rx, s.rx_bytes, s.tx_bytes))
            .collect())
    }

    /// Read and write the node's TUN (descriptor ``fd``; the engine uses a duplicate) from
    /// now on; ``None``: stop and close the duplicate.
    #[pyo3(signature = (fd))]
    fn set_tun(&self, py: Python<'_>, fd: Option<i32>) -> PyResult<()> {
        // the engine's thread may hold the descriptor for a batch: wait without the GIL
        py.allow_threads(|| {
            self.with(|e| e.set_tun(fd).map_err(|err| pyo3::exceptions::PyOSError::new_err(err.to_string())))
        })
    }

    /// Remove a binding (and close its upstream socket); False if it was not installed.
    fn remove(&self, session_id_: &[u8]) -> PyResult<bool> {
        let sid = session_id(session_id_)?;
        self.with(|e| Ok(e.remove(&sid)))
    }

    /// The session ids installed.
    fn installed<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        self.with(|e| Ok(e.installed().iter().map(|s| PyBytes::new(py, s)).collect()))
    }

    /// Send a payload of ``flow`` (0: a plain PAYLOAD; UDP-forward mode's flows 1..=256)
    /// to an installed binding's upstream (that flow's socket opened on first use; from
    /// then on the engine carries the flow both ways by itself).
    #[pyo3(signature = (session_id_, upstream, data, flow = 0))]
    fn to_upstream(&self, session_id_: &[u8], upstream: &Bound<'_, PyAny>, data: &[u8], flow: u16) -> PyResult<()> {
        let sid = session_id(session_id_)?;
        let addr = peer_addr(upstream)?;
        self.with(|e| {
            e.to_upstream(&sid, flow, addr, data).map_err(|err| match err.kind() {
                std::io::ErrorKind::InvalidInput => pyo3::exceptions::PyValueError::new_err(err.to_string()),
                _ => pyo3::exceptions::PyOSError::new_err(err.to_string()),
            })
        })
    }

    fn close_upstream(&self, session_id_: &[u8]) -> PyResult<()> {
        let sid = session_id(session_id_)?;
        self.with(|e| {
            e.close_upstream(&sid);
            Ok(())
        })
    }

    /// (packets received, packets sent, last receive time, bytes received, bytes sent) the
    /// engine forwarded for a binding since the last call; None if it is not installed.
    fn take_stats(&self, session_id_: &[u8]) -> PyResult<Option<(u64, u64, f64, u64, u64)>> {
        let sid = session_id(session_id_)?;
        self.with(|e| {
            Ok(e.take_stats(&sid).map(|s| (s.rx_packets, s.tx_packets, s.last_rx, s.rx_bytes, s.tx_bytes)))
        })
    }

    /// Up to ``max`` handed-up items: ``(0, data, (host, port))`` a datagram from the
    /// listener, ``(1, session_id, data)`` a reply from that binding's upstream, ``(2,
    /// packet, None)`` an IP packet from the TUN that no fast binding here owns, ``(3,
    /// session_id, (flow, data))`` a reply from the upstream of one of its flows.
    #[pyo3(signature = (max = 256))]
    fn drain(&self, py: Python<'_>, max: usize) -> PyResult<Vec<(u8, PyObject, PyObject)>> {
        let items = self.with(|e| Ok(e.drain(max)))?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(match item {
                crate::engine::HandUp::Datagram { data, from } => {
                    (0u8, PyBytes::new(py, &data).into_any().unbind(), py_addr(py, &from)?)
                }
                crate::engine::HandUp::Upstream { session_id, flow: 0, data } => (
                    1u8,
                    PyBytes::new(py, &session_id).into_any().unbind(),
                    PyBytes::new(py, &data).into_any().unbind(),
                ),
                crate::engine::HandUp::Upstream { session_id, flow, data } => (
                    3u8,
                    PyBytes::new(py, &session_id).into_any().unbind(),
                    (flow, PyBytes::new(py, &data)).into_pyobject(py)?.into_any().unbind(),
                ),
                crate::engine::HandUp::Tun { data } => (2u8, PyBytes::new(py, &data).into_any().unbind(), py.None()),
            });
        }
        Ok(out)
    }

    /// The engine's counters since it started (packets, bytes, system calls, drops by
    /// DropReason value).
    fn counters(&self) -> PyResult<std::collections::HashMap<String, u64>> {
        use std::sync::atomic::Ordering::Relaxed;
        self.with(|e| {
            let c = &e.shared.counters;
            let mut m = std::collections::HashMap::new();
            for (k, v) in [
                ("rx_packets", &c.rx_packets),
                ("rx_bytes", &c.rx_bytes),
                ("tx_packets", &c.tx_packets),
                ("tx_bytes", &c.tx_bytes),
                ("forwarded", &c.forwarded),
                ("returned", &c.returned),
                ("handed_up", &c.handed_up),
                ("handed_up_bytes", &c.handed_up_bytes),
                ("handed_up_datagrams", &c.handed_up_datagrams),
                ("upstream_tx_drops", &c.upstream_tx_drops),
                ("recv_calls", &c.recv_calls),
                ("send_calls", &c.send_calls),
                ("poll_calls", &c.poll_calls),
                ("tun_reads", &c.tun_reads),
                ("tun_writes", &c.tun_writes),
                ("tun_write_errors", &c.tun_write_errors),
                ("tun_packets_out", &c.tun_packets_out),
                ("tun_gso_reads", &c.tun_gso_reads),
                ("tun_segments", &c.tun_segments),
                ("tun_gso_writes", &c.tun_gso_writes),
                ("tun_offload_drops", &c.tun_offload_drops),
                ("tun_rejoined", &c.tun_rejoined),
            ] {
                m.insert(k.to_string(), v.load(Relaxed));
            }
            for r in DropReason::ALL {
                m.insert(format!("drop_{}", r.code()), c.drops[r.code() as usize].load(Relaxed));
            }
            for r in TunnelDrop::ALL {
                m.insert(format!("tunnel_drop_{}", r.code()), c.tunnel_drops[r.code() as usize].load(Relaxed));
            }
            Ok(m)
        })
    }

    /// Stop the thread and close the engine's descriptors (idempotent).
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.engine.lock().map_err(|_| PyRuntimeError::new_err("engine poisoned"))?.take();
        py.allow_threads(move || drop(taken)); // joins the thread, which may wait on the table
        Ok(())
    }
}

/// The agent's UDP data path on a Rust thread (`agent_engine.rs`): the client machine
/// says which path is current and whether it is fast; the rest comes back through ``drain``.
#[pyclass(module = "jvpn_dataplane", frozen)]
pub struct AgentEngine {
    engine: Mutex<Option<crate::agent_engine::ClientEngine>>,
    notify: i32,
}

impl AgentEngine {
    fn with<T>(&self, f: impl FnOnce(&crate::agent_engine::ClientEngine) -> PyResult<T>) -> PyResult<T> {
        let g = self.engine.lock().map_err(|_| PyRuntimeError::new_err("engine poisoned"))?;
        match g.as_ref() {
            Some(e) => f(e),
            None => Err(PyRuntimeError::new_err("the data plane engine is stopped")),
        }
    }
}

#[pymethods]
impl AgentEngine {
    /// Start reading the application's bound UDP socket ``fd``, or with ``tun`` the agent's
    /// TUN (L3) (a duplicate; the caller keeps sending on its own).
    #[new]
    #[pyo3(signature = (fd, queue_max = 8192, tun = false))]
    fn new(fd: i32, queue_max: usize, tun: bool) -> PyResult<Self> {
        let e = crate::agent_engine::ClientEngine::new(fd, queue_max.max(1), tun)
            .map_err(|e| PyRuntimeError::new_err(format!("data plane engine: {e}")))?;
        let notify = e.notify_fd();
        Ok(AgentEngine { engine: Mutex::new(Some(e)), notify })
    }

    fn fileno(&self) -> i32 {
        self.notify
    }

    /// Read a path's connected UDP socket ``fd`` from now on (a duplicate).
    fn add_path(&self, path_id: u64, fd: i32) -> PyResult<()> {
        self.with(|e| e.add_path(path_id, fd).map_err(|err| pyo3::exceptions::PyOSError::new_err(err.to_string())))
    }

    fn remove_path(&self, path_id: u64) -> PyResult<()> {
        self.with(|e| {
            e.remove_path(path_id);
            Ok(())
        })
    }

    /// The machine's current path and channel, whether the engine may forward alone, and
    /// until when (monotonic seconds) its secret may seal; ``None`` for no current path.
    #[pyo3(signature = (path_id = None, channel = None, fast = false, keys_until = f64::INFINITY))]
    fn set_current(&self, path_id: Option<u64>, channel: Option<&DataChannel>, fast: bool, keys_until: f64) -> PyResult<()> {
        let cur = match (path_id, channel) {
            (Some(p), Some(ch)) => Some((p, ch.inner.clone(), fast, keys_until)),
            _ => None,
        };
        self.with(|e| {
            e.set_current(cur);
            Ok(())
        })
    }

    /// UDP-forward mode: the agent gave ``flow`` (1..=MAX_FLOWS) to the local source
    /// ``addr`` ``(host, port)``; the engine carries that source's datagrams from now on.
    fn set_flow(&self, flow: u16, addr: &Bound<'_, PyAny>) -> PyResult<()> {
        let addr = peer_addr(addr)?;
        self.with(|e| e.set_flow(flow, addr).map_err(|err| pyo3::exceptions::PyValueError::new_err(err.to_string())))
    }

    /// ``[(flow, last)]``: every flow the engine knows and when its source last sent
    /// (monotonic seconds), carried or handed up.
    fn flow_times(&self) -> PyResult<Vec<(u16, f64)>> {
        self.with(|e| Ok(e.flow_times()))
    }

    /// ``(sent, heard)``: when the engine first sealed DATA since the last call, and when
    /// it last accepted the gateway's DATA (monotonic seconds, or None): the client
    /// machine's silence probe reads both (``ClientSession.engine_activity``).
    fn take_activity(&self) -> PyResult<(Option<f64>, Option<f64>)> {
        self.with(|e| Ok(e.take_activity()))
    }

    /// The AEAD tags of the latest packets the engine sealed, oldest first (a gateway's
    /// NOT_BOUND_HERE hint must echo one of the client's packets).
    fn recent_tags<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        self.with(|e| Ok(e.recent_tags().iter().map(|t| PyBytes::new(py, t)).collect()))
    }

    /// Up to ``max`` items: ``(0, data, (host, port))`` from the application, ``(1, path_id,
    /// data)`` from a path, ``(2, packet, None)`` from the TUN.
    #[pyo3(signature = (max = 256))]
    fn drain(&self, py: Python<'_>, max: usize) -> PyResult<Vec<(u8, PyObject, PyObject)>> {
        let items = self.with(|e| Ok(e.drain(max)))?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(match item {
                crate::agent_engine::ClientHandUp::Local { data, from } => {
                    (0u8, PyBytes::new(py, &data).into_any().unbind(), py_addr(py, &from)?)
                }
                crate::agent_engine::ClientHandUp::Path { path_id, data } => (
                    1u8,
                    path_id.into_pyobject(py)?.into_any().unbind(),
                    PyBytes::new(py, &data).into_any().unbind(),
                ),
                crate::agent_engine::ClientHandUp::Tun { data } => {
                    (2u8, PyBytes::new(py, &data).into_any().unbind(), py.None())
                }
            });
        }
        Ok(out)
    }

    fn counters(&self) -> PyResult<std::collections::HashMap<String, u64>> {
        use std::sync::atomic::Ordering::Relaxed;
        self.with(|e| {
            let c = &e.shared.counters;
            let mut m = std::collections::HashMap::new();
            for (k, v) in [
                ("rx_packets", &c.rx_packets),
                ("tx_packets", &c.tx_packets),
                ("forwarded", &c.forwarded),
                ("returned", &c.returned),
                ("handed_up", &c.handed_up),
                ("recv_calls", &c.recv_calls),
                ("send_calls", &c.send_calls),
                ("poll_calls", &c.poll_calls),
                ("tun_reads", &c.tun_reads),
                ("tun_writes", &c.tun_writes),
                ("tun_write_errors", &c.tun_write_errors),
                ("tun_packets_out", &c.tun_packets_out),
                ("tun_gso_reads", &c.tun_gso_reads),
                ("tun_segments", &c.tun_segments),
                ("tun_gso_writes", &c.tun_gso_writes),
                ("tun_offload_drops", &c.tun_offload_drops),
                ("tun_rejoined", &c.tun_rejoined),
                ("upstream_tx_drops", &c.upstream_tx_drops),
            ] {
                m.insert(k.to_string(), v.load(Relaxed));
            }
            for r in DropReason::ALL {
                m.insert(format!("drop_{}", r.code()), c.drops[r.code() as usize].load(Relaxed));
            }
            Ok(m)
        })
    }

    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.engine.lock().map_err(|_| PyRuntimeError::new_err("engine poisoned"))?.take();
        py.allow_threads(move || drop(taken));
        Ok(())
    }
}
