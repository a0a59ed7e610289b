"""Key layout. Every key of one session shares the hash tag ``{<sid hex>}``.

- ``jvpn:{<sid>}``        hash: the session record (short field names, see api.py)
- ``jvpn:{<sid>}:n``      hash: recent reattach nonces -> recorded decision
- ``jvpn:{<sid>}:nt``     sorted set: the same nonces scored by decision time (prunes ``:n``)
- ``jvpn:expiry``         sorted set: sid hex scored by a lower bound of its deadline (a hint)
- ``jvpn:client:<pk>``    hash: one registered client's policy (the allowlist)
- ``jvpn:hs:<digest>``    string: a consumed handshake (replay guard), expires
- ``jvpn:gen``            string: the store generation, stamped into every record
- ``jvpn:node:<node>``    string: a gateway node's registration (admin address), expires
- ``jvpn:bindings``       pub/sub channel: binding moved to another node
- ``jvpn:audit``          stream: the cluster-wide audit log
- ``jvpn:{pool}``         hash: the inner-address pools (``spec``, ``next`` unused index)
- ``jvpn:{pool}:f``       set: freed pool indexes (taken before ``next`` grows)
- ``jvpn:{pool}:o``       hash: pool index -> session id hex (who holds an inner address)
- ``jvpn:{pool}:s``       hash: session id hex -> "index:claimed ms"
- ``jvpn:relays``         hash: node id -> its relay address "host:port" (routed egress)
- ``jvpn:{egress}:lead``  string: the node answering for the routed return address (a lease)
"""

from __future__ import annotations

PREFIX = "jvpn"
EXPIRY_INDEX = f"{PREFIX}:expiry"
GENERATION = f"{PREFIX}:gen"
BINDINGS_CHANNEL = f"{PREFIX}:bindings"
AUDIT_STREAM = f"{PREFIX}:audit"
CLIENT_PREFIX = f"{PREFIX}:client:"
HANDSHAKE_PREFIX = f"{PREFIX}:hs:"
NODE_PREFIX = f"{PREFIX}:node:"
NODE_MATCH = f"{NODE_PREFIX}*"
SESSION_MATCH = f"{PREFIX}:{{*}}"  # SCAN pattern: records only (nonce keys end in ':n')
CLIENT_MATCH = f"{CLIENT_PREFIX}*"

POOL_KEYS = (f"{PREFIX}:{{pool}}", f"{PREFIX}:{{pool}}:f", f"{PREFIX}:{{pool}}:o",
             f"{PREFIX}:{{pool}}:s")  # one slot: every allocation is one script

RELAYS = f"{PREFIX}:relays"
EGRESS_LEAD = f"{PREFIX}:{{egress}}:lead"

SESSION_ID_LEN = 16


def session_hex(session_id: bytes) -> str:
    """The lowercase hex used inside the hash tag; checks the length."""
    if len(session_id) != SESSION_ID_LEN:
        raise ValueError(f"session_id must be {SESSION_ID_LEN} bytes, got {len(session_id)}")
    return session_id.hex()


def record_key(session_id: bytes) -> str:
    return f"{PREFIX}:{{{session_hex(session_id)}}}"


def nonce_key(session_id: bytes) -> str:
    return f"{PREFIX}:{{{session_hex(session_id)}}}:n"


def nonce_times_key(session_id: bytes) -> str:
    return f"{PREFIX}:{{{session_hex(session_id)}}}:nt"


def session_keys(session_id: bytes) -> tuple[str, str, str]:
    """(record key, nonce hash, nonce time index): the KEYS of every per-session script."""
    tag = f"{PREFIX}:{{{session_hex(session_id)}}}"
    return tag, tag + ":n", tag + ":nt"


def session_id_from_key(key: bytes | str) -> bytes | None:
    """The session id of a record key, or None if ``key`` is not one."""
    text = key.decode() if isinstance(key, bytes) else key
    head = f"{PREFIX}:{{"
    if not (text.startswith(head) and text.endswith("}")):
        return None
    try:
        sid = bytes.fromhex(text[len(head) : -1])
    except ValueError:
        return None
    return sid if len(sid) == SESSION_ID_LEN else None


def client_key(public_key: bytes) -> str:
    return CLIENT_PREFIX + public_key.hex()


def node_key(node: str) -> str:
    return NODE_PREFIX + node


def handshake_key(digest: bytes) -> str:
    return HANDSHAKE_PREFIX + digest.hex()


def client_sessions_key(client_id: str) -> str:
    """The client's live sessions (zset: session id hex -> latest end ms), for its quota.

    Its own hash tag: one client's quota is one key, whatever slots its sessions are in;
    named by the first half of the client's key (a short name: one key per client).
    """
    return f"{PREFIX}:{{c{client_id[:32]}}}:s"
