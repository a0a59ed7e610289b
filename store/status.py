"""Status codes returned by the store's Lua scripts.

The numeric values are injected into every script as the Lua table ``ST``
(see ``store.scripts``), so Python and Lua can never disagree. They are also
persisted for a short while inside recorded reattach decisions (the nonce
hash), so a value never changes meaning once shipped.
"""

from __future__ import annotations

from enum import IntEnum


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
