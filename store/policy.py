"""A registered client's policy (the allowlist entry), and its hash encoding.

The type, ``ClientPolicy``, is the machines' (``session.storeops``); its
encoding is the store's. Stored as the hash
``jvpn:client:<public key hex>`` with readable field names (there are few
clients, unlike sessions).

Every entry carries ``mac``: a keyed BLAKE2s, under a key derived from the cluster
KEK (``session.keys.registry_key``), over the public key and every other field of
the hash. Whoever can write to the store but holds no KEK cannot add a client,
widen one's upstreams or transports, or copy one key's entry onto another: a
gateway reading such an entry treats the client as unknown.

During a KEK rotation an entry MAC'd under a previous KEK (``KekRing.registry_keys``)
stays valid; ``jvpn clients remac`` rewrites every entry under the current one.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping, Sequence

from session.keys import mac, verify_mac
from session.quality import QualityThresholds
from session.storeops import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_SESSIONS,
    PUBLIC_KEY_LEN,
    TRANSPORT_NAMES,
    ClientPolicy,
)

__all__ = ["PUBLIC_KEY_LEN", "TRANSPORT_NAMES", "ClientPolicy", "RegistryEntryRefused",
           "decode_policy", "encode_policy", "entry_mac"]

MAC_FIELD = "mac"
_LABEL = b"jvpn v1 registry entry"


class RegistryEntryRefused(ValueError):
    """A registry entry without a valid MAC: forged or changed in the store (or MAC'd
    under another KEK). The client it names is treated as unknown."""


def _canonical(public_key: bytes, fields: Mapping[str, str]) -> bytes:
    """The public key and every field but ``mac``, sorted by name, each length-prefixed."""
    parts = [_LABEL, struct.pack("!H", len(public_key)), public_key]
    for name in sorted(f for f in fields if f != MAC_FIELD):
        for raw in (name.encode("utf-8", "surrogatepass"),
                    fields[name].encode("utf-8", "surrogatepass")):
            parts.append(struct.pack("!I", len(raw)) + raw)
    return b"".join(parts)


def entry_mac(key: bytes, public_key: bytes, fields: Mapping[str, str]) -> str:
    """Hex MAC of a client entry's fields (``mac`` itself excluded)."""
    return mac(key, _canonical(public_key, fields)).hex()


def encode_policy(policy: ClientPolicy, key: bytes) -> dict[str, str]:
    """The hash fields of a client entry, MAC'd under ``key`` (``registry_key(kek)``)."""
    fields = {
        "name": policy.name,
        "ttl_s": repr(float(policy.ttl_s)),
        "reattach_rate": str(policy.reattach_rate),
        "transports": ",".join(policy.transports),
        "upstreams": ",".join(policy.upstreams),
        "created": str(policy.created_ms),
        "max_age_s": repr(float(policy.max_age_s)),
        "max_sessions": str(policy.max_sessions),
    }
    if policy.prefixes:  # absent unless set: entries written before L3 keep their MACs
        fields["prefixes"] = ",".join(policy.prefixes)
    if policy.quality is not None:
        fields["quality"] = json.dumps(dataclasses.asdict(policy.quality), sort_keys=True)
    fields[MAC_FIELD] = entry_mac(key, policy.public_key, fields)
    return fields


def decode_policy(public_key: bytes, raw: Mapping[bytes, bytes], key: bytes,
                  previous: Sequence[bytes] = ()) -> ClientPolicy:
    """A client entry from its hash fields, its MAC checked under ``key`` first, else under
    each of ``previous`` (the registry keys of previous KEKs, during a KEK rotation).

    Raises RegistryEntryRefused if the MAC is missing or wrong, ValueError if malformed.
    """
    f = {k.decode("utf-8", "surrogatepass"): v.decode("utf-8", "surrogatepass")
         for k, v in raw.items()}
    tag = f.get(MAC_FIELD, "")
    try:
        tag_raw = bytes.fromhex(tag)
    except ValueError:
        tag_raw = b""
    if not tag:
        raise RegistryEntryRefused("no MAC (written without the KEK, or before entries were MAC'd)")
    canonical = _canonical(public_key, f)
    if not any(verify_mac(k, canonical, tag_raw) for k in (key, *previous)):
        raise RegistryEntryRefused("bad MAC (changed in the store, or MAC'd under another KEK)")
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
        # an entry written before maximum ages has none: the default (its MAC still holds)
        max_age_s=float(f.get("max_age_s", repr(DEFAULT_MAX_AGE_S))),
        max_sessions=int(f.get("max_sessions", str(DEFAULT_MAX_SESSIONS))),
        prefixes=tuple(p for p in f.get("prefixes", "").split(",") if p),
    )
