"""The control-plane history's vocabulary: what a node records about its bindings.

Theory of operation. Every binding decision is written down, so that "at most
one ACTIVE binding per session at any instant" can be checked from records
rather than hoped (``history.check``). A node emits one ``binding`` event per
record through its event sink (``GatewayMachine._record``, the one place):

- ``begin``: the store granted a binding, with its status: ``PENDING`` (a
  reattach's grant, ``granted``, until its path validates) or ``ACTIVE`` (a
  birth's grant; a pending binding made ACTIVE, ``validated``). Its time is the
  store's ``TIME`` inside the script that wrote it (``store_ms``), its node the
  binding's holder (a node instance, ``gw-1#1a2b3c4d``: a restarted process is
  another holder). Only grants carry the version they wrote (an activation
  writes none).
- ``end``: the store write that ended an ACTIVE binding: a newer one became
  ACTIVE (``moved``, at the activation's time, recorded by the node that made it), or
  the session's tombstone (``terminated``, ``expired``), recorded by whichever
  node wrote that. A binding has at most one end.
- ``release``: a holder removed the binding from its local table, and why
  (``moved``, ``revoked``, ``expired``, ``expired_elsewhere``, ``terminated``,
  ``terminated_elsewhere``, ``node_stopped``): what the node really forwards for.
- ``lease_lapsed`` / ``lease_confirmed``: the node stopped forwarding for the
  binding when its lease lapsed, and the store confirmed it again.
- ``node_started``: a new process incarnation (its earlier incarnation, if any,
  is gone, with whatever it held).
- ``engine_install`` / ``engine_remove``: the compiled data plane was given a
  binding's keys (epoch) to carry by itself, and had them taken away: it may
  hold only what its node holds, and must give up what its node released.

Agents write their own records (``epoch_install``, ``agent_summary``) in the
same document shape: the epochs they installed, from which node, and the
packets they dropped for a stale epoch, counted apart.
"""

from __future__ import annotations

from enum import StrEnum

BINDING_ACTION = "binding"  # event.action of every node record
EPOCH_INSTALL_ACTION = "epoch_install"  # an agent installed a binding's keys
AGENT_SUMMARY_ACTION = "agent_summary"  # an agent's counters when it stops


class RecordPhase(StrEnum):
    """What a record says happened (``jvpn.phase``)."""

    BEGIN = "begin"
    END = "end"
    RELEASE = "release"
    LEASE_LAPSED = "lease_lapsed"
    LEASE_CONFIRMED = "lease_confirmed"
    NODE_STARTED = "node_started"
    ENGINE_INSTALL = "engine_install"
    ENGINE_REMOVE = "engine_remove"


class RecordReason(StrEnum):
    """Why (``event.reason`` of a record)."""

    GRANTED = "granted"  # a handshake or a reattach wrote the binding
    VALIDATED = "validated"  # a pending binding's path answered: it became ACTIVE
    MOVED = "moved"  # a newer binding of the session replaced it
    REVOKED = "revoked"  # the store said another binding or node holds the session
    LEASE_LAPSED = "lease_lapsed"
    EXPIRED = "expired"  # this node wrote the EXPIRED tombstone
    EXPIRED_ELSEWHERE = "expired_elsewhere"  # another node (or the sweeper there) did
    TERMINATED = "terminated"  # this node wrote the tombstone (client close, admin, revocation)
    TERMINATED_ELSEWHERE = "terminated_elsewhere"
    NODE_STOPPED = "node_stopped"
    REKEYED = "rekeyed"  # a REKEY replaced it with a new binding (new epoch and keys), same node
    SUPERSEDED = "superseded"  # a PENDING binding a newer grant replaced before it was ACTIVE
    NOT_VALIDATED = "not_validated"  # a PENDING binding whose path never validated
    STARTED = "started"
    ENGINE = "engine"  # the node's compiled engine followed its table


class BindingStatus(StrEnum):
    """The binding's status a ``begin`` record gives it."""

    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
