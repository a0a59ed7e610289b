"""The store's vocabulary, as the machines see it: operations, answers, statuses.

Theory of operation. The gateway machine (``session.gateway``) never talks to
Redis: it asks for a store operation by emitting one of the ``*Op`` values
below with a call id, and is later handed the answer, one of the ``*Result``
values (or ``StoreFailure``), with the same call id. ``store/`` executes the
operations as Lua scripts and decodes every script reply into these types in
one place (``store.api``), by field name. Results are plain slotted
dataclasses, to be treated as read-only values: a frozen dataclass's
``__init__`` costs several microseconds more per object, and reattach and
refresh results are built at the rate of the whole cluster.

The status codes are injected into every script as the Lua table ``ST`` (see
``store.scripts``), so Python and Lua can never disagree. They are also
persisted for a short while inside recorded reattach decisions (the nonce
hash), so a value never changes meaning once shipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from session.inner import parse_prefixes
from session.quality import QualityThresholds
from session.reasons import RejectReason, TerminateReason
from session.states import SessionEvent, SessionState
from session.wire import TransportKind

PUBLIC_KEY_LEN = 32
TRANSPORT_NAMES = tuple(k.name.lower() for k in TransportKind)
DEFAULT_MAX_AGE_S = 86400.0  # a session's whole life, reattaches and refreshes included
DEFAULT_MAX_SESSIONS = 0  # no quota: a quota costs one small sorted set per client
class StoreStatus(IntEnum):
    """The store's verdict on one script call."""

    OK = 0
    UNKNOWN_SESSION = 1  # no record (never born, or garbage-collected)
    EXPIRED = 2  # tombstone with reason EXPIRED (see ``expired_now``)
    TERMINATED = 3  # tombstone with any other reason
    CLOCK_SKEW = 4  # proof timestamp outside the window
    REPLAYED_NONCE = 5  # nonce already used, from another address tag
    RATE_LIMITED = 6  # reattach rate per minute exceeded (or nonce cache full)
    POLICY_DENIED = 7  # transport kind not in the session's policy
    STALE_VERSION = 8  # expected state_version is not the current one
    DUAL_ACTIVE_CONFLICT = 9  # two claimants raced for one version
    ILLEGAL_TRANSITION = 10  # the transition table has no entry for (state, event)
    NOT_OWNER = 11  # refresh by a node/epoch that no longer holds the binding
    EXISTS = 12  # birth of a session id that already exists
    GENERATION_MOVED = 13  # the record is of another store generation than the caller's
    KEY_MOVED = 14  # a proof under a session secret the store no longer holds (rekeyed)
    POOL_EXHAUSTED = 15  # no inner address left in the cluster's pools
    POOL_MISMATCH = 16  # the caller's pools are not the ones the store allocates from


_TOMBSTONE_STATUSES = (StoreStatus.TERMINATED, StoreStatus.EXPIRED)


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """What one client key may do: session TTL, maximum age, reattach rate, transports,
    upstreams.

    ``max_age_s`` bounds a session's whole life, however often it reattaches or refreshes:
    at ``created + max_age`` the store ends it as an expiry (``store/lua/common.lua``,
    ``end_ms``). Always set (default 24 h; 1 ms to 365 days): there is no unlimited age.
    """

    public_key: bytes
    name: str = ""
    ttl_s: float = 300.0
    reattach_rate: int = 30  # successful or refused reattach attempts per minute
    transports: tuple[str, ...] = TRANSPORT_NAMES  # "udp", "tcp", "quic"
    upstreams: tuple[str, ...] = ()  # "host:port" the client may reach
    quality: QualityThresholds | None = None
    created_ms: int = 0
    max_age_s: float = DEFAULT_MAX_AGE_S
    max_sessions: int = DEFAULT_MAX_SESSIONS  # live sessions this key may hold; 0: no quota
    # L3 mode: the destination prefixes its sessions may reach (and the routes its agent
    # installs); empty: no L3 session for this key
    prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.public_key) != PUBLIC_KEY_LEN:
            raise ValueError(f"public_key must be {PUBLIC_KEY_LEN} bytes")
        if not 0.001 <= self.ttl_s <= 365 * 86400:
            raise ValueError(f"ttl_s out of range: {self.ttl_s}")
        if not 0.001 <= self.max_age_s <= 365 * 86400:  # also refuses NaN
            raise ValueError(f"max_age_s out of range: {self.max_age_s}")
        if not 0 <= self.max_sessions <= 1_000_000:
            raise ValueError(f"max_sessions out of range: {self.max_sessions}")
        if not 1 <= self.reattach_rate <= 100_000:
            raise ValueError(f"reattach_rate out of range: {self.reattach_rate}")
        for t in self.transports:
            if t not in TRANSPORT_NAMES:
                raise ValueError(f"unknown transport {t!r} (expected one of {TRANSPORT_NAMES})")
        for u in self.upstreams:
            if not u or "," in u or ":" not in u:
                raise ValueError(f"upstream must be host:port, got {u!r}")
        parse_prefixes(self.prefixes)

    @property
    def client_id(self) -> str:
        """The hex of the public key: the session record's ``cid``."""
        return self.public_key.hex()

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)

    @property
    def max_age_ms(self) -> int:
        """The record's ``ma``: the session ends at ``created + max_age_ms``."""
        return max(1, int(self.max_age_s * 1000))

    @property
    def transport_kinds(self) -> frozenset[TransportKind]:
        return frozenset(TransportKind[t.upper()] for t in self.transports)

    @property
    def transport_mask(self) -> int:
        """The record's ``tk``: bit ``1 << kind`` per allowed TransportKind."""
        mask = 0
        for kind in self.transport_kinds:
            mask |= 1 << int(kind)
        return mask


@dataclass(slots=True)
class BirthResult:
    status: StoreStatus  # OK | EXISTS | POLICY_DENIED | ILLEGAL_TRANSITION
    version: int
    epoch: int
    state: SessionState | None
    server_ms: int
    deadline_ms: int

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


@dataclass(slots=True)
class ReattachResult:
    """The reattach CAS decision (see store/lua/reattach.lua for every field)."""

    status: StoreStatus
    reason: RejectReason | None  # the wire reason of a rejection; None on success
    version: int
    epoch: int
    binding_id: bytes  # the new binding on success (or the recorded one on a retry)
    node: str
    prev_node: str  # previous owner to tell (pub/sub); '' on a retry
    server_ms: int
    state: SessionState | None  # after the call; None if no record
    retry: bool  # an idempotent retransmission: the recorded decision, nothing changed
    expired_now: bool  # this call wrote the EXPIRED tombstone: emit the event
    binding_current: bool  # the returned binding is the session's current one
    terminate_reason: TerminateReason | None
    prev_state: SessionState | None  # before the call
    prev_kind: TransportKind | None  # transport kind of the previous binding
    binding_pending: bool = False  # the returned binding is PENDING (activate.lua makes it ACTIVE)
    decided_ms: int = 0  # the store's TIME of the decision (a retry's: the first run's)
    recovered: bool = False  # outcome was unknown and re-read from the store

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


@dataclass(slots=True)
class TransitionResult:
    status: StoreStatus  # OK | STALE_VERSION | ILLEGAL_TRANSITION | UNKNOWN_SESSION | TERMINATED | EXPIRED
    version: int  # after the call (current on a refusal)
    state: SessionState | None
    prev_state: SessionState | None
    expired_now: bool  # the deadline had passed: this call wrote the EXPIRED tombstone
    terminate_reason: TerminateReason | None
    epoch: int
    server_ms: int
    event: SessionEvent  # the caller's event (not in the script's reply)
    recovered: bool = False

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK

    @property
    def detail(self) -> str:
        """A human reason naming the event and the state."""
        state = self.prev_state.name if self.prev_state is not None else "-"
        if self.status is StoreStatus.ILLEGAL_TRANSITION:
            return f"ILLEGAL_TRANSITION: no {self.event.name} from state {state}"
        if self.status is StoreStatus.STALE_VERSION:
            return f"STALE_VERSION: {self.event.name} refused, current version {self.version}"
        return f"{self.status.name}: {self.event.name} in state {state}"


@dataclass(slots=True)
class RefreshResult:
    status: StoreStatus  # OK | NOT_OWNER | UNKNOWN_SESSION | TERMINATED | EXPIRED
    version: int
    state: SessionState | None
    epoch: int  # current epoch (the new owner's on NOT_OWNER)
    node: str  # current owner
    deadline_ms: int
    server_ms: int
    expired_now: bool
    terminate_reason: TerminateReason | None

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


@dataclass(slots=True)
class ActivateResult:
    """A PENDING binding made ACTIVE (see store/lua/activate.lua for every field)."""

    status: StoreStatus  # OK | NOT_OWNER | UNKNOWN_SESSION | TERMINATED | EXPIRED
    version: int
    state: SessionState | None
    epoch: int  # current epoch (ours on OK; the owner's on NOT_OWNER)
    node: str
    prev_epoch: int  # the binding this call ended (0 if there was none to end)
    prev_node: str
    server_ms: int
    expired_now: bool
    terminate_reason: TerminateReason | None
    activated_ms: int = 0  # the store's TIME of the activation (a repeated call: the first's)

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


@dataclass(slots=True)
class RekeyResult:
    """A REKEY's new secret installed (see store/lua/rekey.lua for every field)."""

    status: StoreStatus  # OK | NOT_OWNER | STALE_VERSION | UNKNOWN_SESSION | TERMINATED | EXPIRED
    version: int
    state: SessionState | None
    epoch: int  # the new binding's on OK; the current one otherwise
    node: str
    generation: int  # the key generation now
    server_ms: int
    expired_now: bool
    terminate_reason: TerminateReason | None

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


@dataclass(slots=True)
class TerminateResult:
    status: StoreStatus  # OK (written now) | TERMINATED | EXPIRED (already) | UNKNOWN_SESSION
    version: int
    prev_state: SessionState | None
    terminate_reason: TerminateReason | None
    epoch: int
    node: str
    server_ms: int

    @property
    def ok(self) -> bool:
        """The session is a tombstone now (written by this call or before)."""
        return self.status is StoreStatus.OK or self.status in _TOMBSTONE_STATUSES

    @property
    def already(self) -> bool:
        """It was a tombstone before this call (nothing changed)."""
        return self.status in _TOMBSTONE_STATUSES


@dataclass(slots=True)
class ExpireResult:
    status: StoreStatus  # EXPIRED | OK (live) | TERMINATED | UNKNOWN_SESSION
    expired_now: bool
    version: int
    deadline_ms: int
    epoch: int
    node: str
    prev_state: SessionState | None
    server_ms: int
    client_id: str


@dataclass(slots=True)
class ExpiredSession:
    """A session the sweeper terminated (the caller emits the event)."""

    session_id: bytes
    version: int  # the tombstone's
    epoch: int
    node: str
    prev_state: SessionState
    client_id: str
    deadline_ms: int
    server_ms: int


@dataclass(slots=True)
class SessionRecord:
    """One decoded session record (live or tombstone) as read at ``server_ms``."""

    session_id: bytes
    state: SessionState
    version: int
    epoch: int
    binding_id: bytes
    node: str
    kind: TransportKind | None
    upstream: str
    client_id: str
    wrapped_secret: bytes = field(repr=False)
    ttl_ms: int
    deadline_ms: int
    created_ms: int
    server_ms: int
    reattach_rate: int
    transports_mask: int
    generation: int
    terminate_reason: TerminateReason | None
    terminated_ms: int | None
    lost_version: int | None  # version before a gateway-observed TRANSPORT_LOST
    last_reattach_ms: int | None
    max_age_ms: int | None = None  # ``ma``; None: born before maximum ages (no limit)
    pending_epoch: int = 0  # the newest epoch a reattach granted (PENDING until activated)
    pending_node: str = ""  # its node, while it is PENDING ('' once active)
    pending_binding_id: bytes = b""
    wrapped_control: bytes = field(default=b"", repr=False)  # ``wc``: tombstones keep only it
    key_generation: int = 0  # REKEYs so far (``kg``)
    keys_ms: int = 0  # when the current secret was made (``kt``; birth: ``cr``)
    previous_wrapped: bytes = field(default=b"", repr=False)  # ``wsp``: until the client confirms
    previous_keys_ms: int = 0
    inner: str = ""  # ``ia``: the L3 session's inner addresses (InnerAddresses.text); '' in UDP mode
    prefixes: str = ""  # ``ap``: its allowed destination prefixes, comma-separated

    @property
    def terminated(self) -> bool:
        return self.state is SessionState.TERMINATED

    @property
    def ends_ms(self) -> int:
        """When the session ends unless renewed: its deadline, capped at created + max age."""
        if self.max_age_ms:
            return min(self.deadline_ms, self.created_ms + self.max_age_ms)
        return self.deadline_ms

    @property
    def remaining_ms(self) -> int:
        """Time left before the session ends (0 if past it or terminated)."""
        return 0 if self.terminated else max(0, self.ends_ms - self.server_ms)

    @property
    def last_seen_ms(self) -> int:
        """When the deadline was last pushed (birth, reattach or refresh)."""
        return self.deadline_ms - self.ttl_ms

    @property
    def idle_ms(self) -> int:
        """Time since the last birth, reattach or refresh."""
        return max(0, self.server_ms - self.last_seen_ms)


# ---- operations ------------------------------------------------------------------------------
# What the gateway machine asks of the store; ``gateway/`` maps each to one SessionStore call.


@dataclass(slots=True)
class GetRecordOp:
    """Read one session record (``SessionRecord`` or None)."""

    session_id: bytes


@dataclass(slots=True)
class GetClientOp:
    """Read one client's registry entry (``ClientPolicy`` or None)."""

    client_id: str


@dataclass(slots=True)
class ClaimHandshakeOp:
    """Record a handshake's digest once (True if it was fresh)."""

    digest: bytes
    ttl_ms: int


@dataclass(slots=True)
class BirthOp:
    """Create a session (``BirthResult``)."""

    session_id: bytes
    wrapped_secret: bytes = field(repr=False)
    client_id: str
    node: str
    binding_id: bytes
    kind: TransportKind
    upstream: str
    policy: ClientPolicy
    wrapped_control: bytes = field(default=b"", repr=False)
    inner: str = ""  # the L3 session's inner addresses (InnerAddresses.text), claimed before


@dataclass(slots=True)
class ReattachOp:
    """The reattach compare-and-set (``ReattachResult``)."""

    session_id: bytes
    expected_version: int
    nonce: bytes
    timestamp_ms: int
    kind: TransportKind
    node: str
    binding_id: bytes
    addr_tag: str
    window_ms: int
    dual_active_window_ms: int
    proof_generation: int = -1  # the key generation the proof verified under


@dataclass(slots=True)
class TransitionOp:
    """Apply one event of the transition table at a version (``TransitionResult``)."""

    session_id: bytes
    expected_version: int
    event: SessionEvent


@dataclass(slots=True)
class RefreshOp:
    """Confirm ownership and push the deadline (``RefreshResult``)."""

    session_id: bytes
    epoch: int
    node: str


@dataclass(slots=True)
class ActivateOp:
    """Make a PENDING binding the session's ACTIVE one (``ActivateResult``)."""

    session_id: bytes
    epoch: int
    binding_id: bytes
    node: str


@dataclass(slots=True)
class RekeyOp:
    """Install a REKEY's new session secret (``RekeyResult``)."""

    session_id: bytes
    epoch: int
    binding_id: bytes
    node: str
    generation: int  # the key generation the client rekeys from
    wrapped_secret: bytes = field(repr=False)
    wrapped_control: bytes = field(repr=False)
    new_binding_id: bytes


@dataclass(slots=True)
class ConfirmKeyOp:
    """The client proved key ``generation``: forget the previous secret (a bool)."""

    session_id: bytes
    generation: int


@dataclass(slots=True)
class TerminateOp:
    """Write the tombstone (``TerminateResult``)."""

    session_id: bytes
    reason: TerminateReason


@dataclass(slots=True)
class PublishMoveOp:
    """Tell the cluster that ``node`` now holds the session at ``epoch`` (an int: receivers)."""

    session_id: bytes
    node: str
    epoch: int


@dataclass(slots=True)
class ClaimSlotOp:
    """Count a new session against its client's quota (``SlotResult``): refused at ``limit``
    live sessions; ``end_ms`` is the latest the session can live (its maximum age)."""

    client_id: str
    session_id: bytes
    limit: int
    end_ms: int


@dataclass(slots=True)
class ReleaseSlotOp:
    """The session ended: it no longer counts against its client's quota (an int)."""

    client_id: str
    session_id: bytes


@dataclass(slots=True)
class SlotResult:
    ok: bool
    count: int  # the client's live sessions after the call


@dataclass(slots=True)
class ClaimAddressesOp:
    """Allocate the session's inner addresses from the cluster's pools (``AddressResult``).

    Idempotent per session: a second claim returns the same index."""

    session_id: bytes
    pool: str  # InnerPool.spec
    size: int  # InnerPool.size


@dataclass(slots=True)
class ReleaseAddressesOp:
    """The session ended: its inner addresses go back to the pool (an int: 1 if freed)."""

    session_id: bytes


@dataclass(slots=True)
class AddressResult:
    status: StoreStatus  # OK | POOL_EXHAUSTED | POOL_MISMATCH
    index: int  # the session's pool index (InnerPool.addresses); -1 unless OK
    used: int  # addresses held after the call

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.OK


@dataclass(slots=True)
class ServerTimeOp:
    """Read the store's clock (an int, ms): the health check and the lease."""


@dataclass(slots=True)
class SweepOp:
    """Expire due sessions (a list of ``ExpiredSession``)."""

    limit: int


StoreOp = (GetRecordOp | GetClientOp | ClaimHandshakeOp | BirthOp | ReattachOp | ActivateOp
           | RekeyOp | ConfirmKeyOp | TransitionOp | RefreshOp | TerminateOp | PublishMoveOp | ServerTimeOp | SweepOp | ClaimSlotOp
           | ReleaseSlotOp | ClaimAddressesOp | ReleaseAddressesOp)


@dataclass(slots=True)
class StoreFailure:
    """The store could not be reached, or answered what cannot be read: fail closed."""

    detail: str
    unreadable: bool = False  # an answer we cannot decode (a bug or a foreign store), not an outage
