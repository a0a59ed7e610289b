"""MAC'd control messages (REATTACH_REQUEST, REATTACH_ACK, REJECT, NOTICE).

The MAC is a keyed BLAKE2s over every byte before it, header included, so the
message type and session_id are covered; requests use the client's proof key,
answers the gateway's control key, so neither can be reflected as the other.
"""

from __future__ import annotations

from session import wire
from session.keys import mac, verify_mac


def seal(msg: wire.Message, key: bytes) -> bytes:
    """Encode ``msg`` with its trailing MAC computed under ``key``."""
    raw = wire.encode(msg)
    return raw[: -wire.MAC_LEN] + mac(key, wire.signed_part(raw))


def verify(raw: bytes, key: bytes) -> bool:
    """Whether the trailing MAC of an encoded control message is valid under ``key``."""
    if len(raw) <= wire.MAC_LEN:
        return False
    return verify_mac(key, wire.signed_part(raw), raw[-wire.MAC_LEN:])
