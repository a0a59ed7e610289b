"""A registered client's policy (the allowlist entry), and its hash encoding.

The type, ``ClientPolicy``, is the machines' (``session.storeops``); its
encoding is the store's. Stored as the hash
``jvpn:client:<public key hex>`` with readable field names (there are few
clients, unlike sessions).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from session.quality import QualityThresholds
from session.storeops import PUBLIC_KEY_LEN, TRANSPORT_NAMES, ClientPolicy

__all__ = ["PUBLIC_KEY_LEN", "TRANSPORT_NAMES", "ClientPolicy", "decode_policy", "encode_policy"]

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
