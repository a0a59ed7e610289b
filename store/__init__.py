"""The authoritative session table on Redis: every mutation is one Lua script.

Public API: ``store.api`` (``SessionStore`` and its result types),
``store.errors`` (``StoreError``, ``StoreUnavailable``), ``store.policy``
(``ClientPolicy``), ``store.embedded`` (a private redis-server child),
``store.cluster`` (Redis Cluster routing, selected by a ``redis+cluster://`` URL).
"""
