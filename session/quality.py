"""Path quality from keepalive probes: RTT (smoothed), jitter and loss.

Theory of operation. Every keepalive carries a sequence number; its echo gives
one RTT sample. SRTT and RTTVAR follow RFC 6298; jitter is the RFC 3550 mean
deviation of successive samples. Loss is the fraction of the last
``LOSS_WINDOW`` probes that got no echo within ``LOSS_GRACE_RTTS`` smoothed RTTs
(at least ``min_grace`` seconds). Time is always passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from session.states import SessionState

LOSS_WINDOW = 32
LOSS_GRACE_RTTS = 3.0


@dataclass(frozen=True)
class QualityThresholds:
    """Policy thresholds that move a session between ATTACHED, VOLATILE and DEGRADED."""

    volatile_loss_pct: float = 5.0
    volatile_rtt_ms: float = 300.0
    volatile_jitter_ms: float = 50.0
    degraded_loss_pct: float = 20.0
    degraded_rtt_ms: float = 1000.0
    recover_factor: float = 0.8  # hysteresis: all figures below factor x threshold to recover


class PathQuality:
    """Probe bookkeeping for one path."""

    def __init__(self, min_grace: float = 0.5) -> None:
        self.min_grace = min_grace
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.jitter = 0.0
        self.last_rtt: float | None = None
        self._outstanding: OrderedDict[int, float] = OrderedDict()
        self._outcomes: list[bool] = []  # True = answered, newest last
        self.samples = 0

    def on_probe_sent(self, seq: int, now: float) -> None:
        """Record a keepalive sent at ``now``."""
        self._outstanding[seq] = now
        while len(self._outstanding) > LOSS_WINDOW * 2:
            self._outstanding.popitem(last=False)
            self._record(False)

    def on_probe_answered(self, seq: int, now: float) -> float | None:
        """Record an echo; return the RTT sample or None for an unknown/late seq."""
        sent = self._outstanding.pop(seq, None)
        if sent is None:
            return None
        rtt = max(0.0, now - sent)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        if self.last_rtt is not None:
            self.jitter += (abs(rtt - self.last_rtt) - self.jitter) / 16
        self.last_rtt = rtt
        self.samples += 1
        self._record(True)
        return rtt

    def expire(self, now: float) -> None:
        """Count probes unanswered past the grace period as lost."""
        grace = max(self.min_grace, LOSS_GRACE_RTTS * (self.srtt or 0.0))
        while self._outstanding:
            seq, sent = next(iter(self._outstanding.items()))
            if now - sent < grace:
                break
            del self._outstanding[seq]
            self._record(False)

    def _record(self, answered: bool) -> None:
        self._outcomes.append(answered)
        if len(self._outcomes) > LOSS_WINDOW:
            del self._outcomes[0]

    @property
    def loss_pct(self) -> float:
        if not self._outcomes:
            return 0.0
        return 100.0 * self._outcomes.count(False) / len(self._outcomes)

    @property
    def rtt_ms(self) -> float | None:
        return None if self.srtt is None else self.srtt * 1000

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000

    def classify(self, t: QualityThresholds, current: SessionState) -> SessionState:
        """The live state this path's figures call for (ATTACHED, VOLATILE or DEGRADED)."""
        rtt = self.rtt_ms or 0.0
        loss = self.loss_pct
        if loss >= t.degraded_loss_pct or rtt >= t.degraded_rtt_ms:
            return SessionState.DEGRADED
        if loss >= t.volatile_loss_pct or rtt >= t.volatile_rtt_ms or self.jitter_ms >= t.volatile_jitter_ms:
            return SessionState.VOLATILE
        if current in (SessionState.VOLATILE, SessionState.DEGRADED):
            f = t.recover_factor
            calm = (
                loss < t.volatile_loss_pct * f
                and rtt < t.volatile_rtt_ms * f
                and self.jitter_ms < t.volatile_jitter_ms * f
            )
            return SessionState.ATTACHED if calm else current
        return SessionState.ATTACHED
