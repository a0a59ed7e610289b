"""Client registry entries are MAC'd under a key derived from the KEK (store.policy)."""

from __future__ import annotations

import pytest

from session.keys import registry_key
from session.quality import QualityThresholds
from session.storeops import DEFAULT_MAX_AGE_S
from store.policy import ClientPolicy, RegistryEntryRefused, decode_policy, encode_policy, entry_mac

KEY = registry_key(b"K" * 32)
PK = bytes(range(32))
POLICY = ClientPolicy(PK, name="alice", ttl_s=60.0, reattach_rate=10, transports=("udp",),
                      upstreams=("10.0.0.1:53", "10.0.0.2:53"), created_ms=1234,
                      quality=QualityThresholds(), max_age_s=3600.0)


def _raw(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_round_trip() -> None:
    fields = encode_policy(POLICY, KEY)
    assert len(bytes.fromhex(fields["mac"])) == 32
    assert decode_policy(PK, _raw(fields), KEY) == POLICY


@pytest.mark.parametrize("name", ["name", "ttl_s", "reattach_rate", "transports", "upstreams",
                                  "created", "quality", "max_age_s"])
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


def test_max_age_is_encoded_and_macd() -> None:
    fields = encode_policy(POLICY, KEY)
    assert float(fields["max_age_s"]) == 3600.0
    assert decode_policy(PK, _raw(fields), KEY).max_age_s == 3600.0
    assert ClientPolicy(PK).max_age_s == DEFAULT_MAX_AGE_S == 86400.0
    assert ClientPolicy(PK, max_age_s=0.3).max_age_ms == 300
    stripped = {k: v for k, v in fields.items() if k != "max_age_s"}
    with pytest.raises(RegistryEntryRefused, match="bad MAC"):  # removing it is a change too
        decode_policy(PK, _raw(stripped), KEY)


def test_entry_written_before_max_ages_decodes_with_the_default() -> None:
    """An entry MAC'd without ``max_age_s`` (written before the field existed) stays valid."""
    fields = encode_policy(POLICY, KEY)
    del fields["max_age_s"], fields["mac"]
    fields["mac"] = entry_mac(KEY, PK, fields)
    assert decode_policy(PK, _raw(fields), KEY).max_age_s == DEFAULT_MAX_AGE_S


@pytest.mark.parametrize("bad", [0.0, -1.0, 0.0009, 365 * 86400 + 1, float("nan"),
                                 float("inf")])
def test_max_age_range(bad: float) -> None:
    with pytest.raises(ValueError, match="max_age_s"):
        ClientPolicy(PK, max_age_s=bad)


def test_an_entry_macd_under_a_previous_kek_is_accepted_during_a_rotation() -> None:
    """KEK rotation: an entry MAC'd under a previous KEK's registry key still reads when
    that key is given as previous; never without it, and a forged entry still fails."""
    old, new = registry_key(b"O" * 32), registry_key(b"N" * 32)
    fields = encode_policy(POLICY, old)
    assert decode_policy(PK, _raw(fields), new, (old,)) == POLICY
    assert decode_policy(PK, _raw(encode_policy(POLICY, new)), new, (old,)) == POLICY
    with pytest.raises(RegistryEntryRefused, match="bad MAC"):
        decode_policy(PK, _raw(fields), new)
    with pytest.raises(RegistryEntryRefused, match="bad MAC"):
        decode_policy(PK, _raw({**fields, "upstreams": "1.2.3.4:5"}), new, (old,))
