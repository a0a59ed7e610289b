"""A registered client's policy (the allowlist entry), and its hash encoding.

There is no policy type in ``session/`` yet, so it lives here. Quality
thresholds reuse ``session.quality.QualityThresholds``. Stored as the hash
``jvpn:client:<public key hex>`` with readable field names (there are few
clients, unlike sessions).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from session.quality import QualityThresholds
from session.wire import TransportKind

PUBLIC_KEY_LEN = 32
TRANSPORT_NAMES = tuple(k.name.lower() for k in TransportKind)


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """What one client key may do: session TTL, reattach rate, transports, upstreams."""

    public_key: bytes
    name: str = ""
    ttl_s: float = 300.0
    reattach_rate: int = 30  # successful or refused reattach attempts per minute
    transports: tuple[str, ...] = TRANSPORT_NAMES  # "udp", "tcp"
    upstreams: tuple[str, ...] = ()  # "host:port" the client may reach
    quality: QualityThresholds | None = None
    created_ms: int = 0

    def __post_init__(self) -> None:
        if len(self.public_key) != PUBLIC_KEY_LEN:
            raise ValueError(f"public_key must be {PUBLIC_KEY_LEN} bytes")
        if not 0.001 <= self.ttl_s <= 365 * 86400:
            raise ValueError(f"ttl_s out of range: {self.ttl_s}")
        if not 1 <= self.reattach_rate <= 100_000:
            raise ValueError(f"reattach_rate out of range: {self.reattach_rate}")
        for t in self.transports:
            if t not in TRANSPORT_NAMES:
                raise ValueError(f"unknown transport {t!r} (expected one of {TRANSPORT_NAMES})")
        for u in self.upstreams:
            if not u or "," in u or ":" not in u:
                raise ValueError(f"upstream must be host:port, got {u!r}")

    @property
    def client_id(self) -> str:
        """The hex of the public key: the session record's ``cid``."""
        return self.public_key.hex()

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)

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


def encode_policy(policy: ClientPolicy) -> dict[str, str]:
    """The hash fields of a client entry."""
    fields = {
        "name": policy.name,
        "ttl_s": repr(float(policy.ttl_s)),
        "reattach_rate": str(policy.reattach_rate),
        "transports": ",".join(policy.transports),
        "upstreams": ",".join(policy.upstreams),
        "created": str(policy.created_ms),
    }
    if policy.quality is not None:
        fields["quality"] = json.dumps(dataclasses.asdict(policy.quality), sort_keys=True)
    return fields


def decode_policy(public_key: bytes, raw: Mapping[bytes, bytes]) -> ClientPolicy:
    """A client entry from its hash fields (raises ValueError if malformed)."""
    f = {k.decode(): v.decode() for k, v in raw.items()}
    quality = None
    if f.get("quality"):
        known = {fl.name for fl in dataclasses.fields(QualityThresholds)}
        data = {k: float(v) for k, v in json.loads(f["quality"]).items() if k in known}
        quality = QualityThresholds(**data)
    return ClientPolicy(
        public_key=public_key,
        name=f.get("name", ""),
        ttl_s=float(f.get("ttl_s", "300")),
        reattach_rate=int(f.get("reattach_rate", "30")),
        transports=tuple(t for t in f.get("transports", "").split(",") if t),
        upstreams=tuple(u for u in f.get("upstreams", "").split(",") if u),
        quality=quality,
        created_ms=int(f.get("created", "0")),
    )
