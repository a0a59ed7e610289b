"""The authoritative session table on Redis: every mutation is one Lua script.

Public API: ``store.api`` (``SessionStore`` and its result types),
``store.errors`` (``StoreError``, ``StoreUnavailable``), ``store.policy``
(``ClientPolicy``), ``store.embedded`` (a private redis-server child),
``store.cluster`` (Redis Cluster routing, selected by a ``redis+cluster://`` URL).

Raw access, for baselines and tools that read Redis directly (re-exported
here so that they need no module of the store's internals): the key layout
(``session_keys``, ``record_key``, ``EXPIRY_INDEX``, ``AUDIT_STREAM``), the
assembled scripts (``load_scripts``: name, source and the SHA1 EVALSHA takes)
and ``pack_evalsha`` (one EVALSHA as the RESP bytes the batcher pipelines).
"""

from store.batcher import pack_evalsha
from store.keys import AUDIT_STREAM, EXPIRY_INDEX, record_key, session_keys
from store.scripts import load_scripts

__all__ = [
    "AUDIT_STREAM", "EXPIRY_INDEX", "load_scripts", "pack_evalsha", "record_key", "session_keys",
]
