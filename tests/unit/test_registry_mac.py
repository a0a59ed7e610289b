"""Client registry entries are MAC'd under a key derived from the KEK (store.policy)."""

from __future__ import annotations

import pytest

from session.keys import registry_key
from session.quality import QualityThresholds
from store.policy import ClientPolicy, RegistryEntryRefused, decode_policy, encode_policy

KEY = registry_key(b"K" * 32)
PK = bytes(range(32))
POLICY = ClientPolicy(PK, name="alice", ttl_s=60.0, reattach_rate=10, transports=("udp",),
                      upstreams=("10.0.0.1:53", "10.0.0.2:53"), created_ms=1234,
                      quality=QualityThresholds())


def _raw(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_round_trip() -> None:
    fields = encode_policy(POLICY, KEY)
    assert len(bytes.fromhex(fields["mac"])) == 32
    assert decode_policy(PK, _raw(fields), KEY) == POLICY


@pytest.mark.parametrize("name", ["name", "ttl_s", "reattach_rate", "transports", "upstreams",
                                  "created", "quality"])
def test_every_field_is_covered(name: str) -> None:
    fields = encode_policy(POLICY, KEY)
    fields[name] = fields[name] + "0" if name != "upstreams" else "1.2.3.4:5"
    with pytest.raises(RegistryEntryRefused, match="bad MAC"):
        decode_policy(PK, _raw(fields), KEY)


def test_added_or_removed_field_missing_mac_other_key_other_kek() -> None:
    fields = encode_policy(POLICY, KEY)
    with pytest.raises(RegistryEntryRefused):
        decode_policy(PK, _raw({**fields, "extra": "1"}), KEY)
    with pytest.raises(RegistryEntryRefused):
        decode_policy(PK, _raw({k: v for k, v in fields.items() if k != "quality"}), KEY)
    with pytest.raises(RegistryEntryRefused, match="no MAC"):
        decode_policy(PK, _raw({k: v for k, v in fields.items() if k != "mac"}), KEY)
    with pytest.raises(RegistryEntryRefused):
        decode_policy(PK, _raw({**fields, "mac": "zz"}), KEY)
    with pytest.raises(RegistryEntryRefused):  # copied onto another key
        decode_policy(bytes(32), _raw(fields), KEY)
    with pytest.raises(RegistryEntryRefused):  # MAC'd under another KEK
        decode_policy(PK, _raw(fields), registry_key(b"L" * 32))
