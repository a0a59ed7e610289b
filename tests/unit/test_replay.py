"""RFC 6479 replay window, against a set-based reference model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from session.replay import MAX_COUNTER, REPLAY_WINDOW, ReplayWindow

W = REPLAY_WINDOW


class Reference:
    """The obvious O(n) model: remember everything."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest: int | None = None

    def accepts(self, c: int) -> bool:
        if not 0 <= c <= MAX_COUNTER or c in self.seen:
            return False
        return self.highest is None or c > self.highest or self.highest - c < W

    def update(self, c: int) -> bool:
        ok = self.accepts(c)
        if ok:
            self.seen.add(c)
            self.highest = c if self.highest is None else max(self.highest, c)
        return ok


def test_window_is_large_enough() -> None:
    assert W >= 2048


def test_fresh_duplicate_and_check_has_no_side_effect() -> None:
    w = ReplayWindow()
    assert w.highest is None
    assert w.check(0) and w.check(0)
    assert w.update(0)
    assert not w.check(0) and not w.update(0)
    assert w.check(5) and w.check(5)
    assert w.update(5) and not w.update(5)
    assert w.update(3) and not w.update(3)
    assert w.highest == 5


def test_window_edges() -> None:
    w = ReplayWindow()
    top = 10 * W + 17
    assert w.update(top)
    assert w.check(top - W + 1) and w.update(top - W + 1)
    assert not w.check(top - W) and not w.update(top - W)
    assert not w.update(0)
    # every counter inside the window is still fresh once
    for c in range(top - W + 2, top):
        assert w.update(c)
    for c in range(top - W + 1, top + 1):
        assert not w.check(c)


def test_big_jump_forgets_everything_below_the_window() -> None:
    w = ReplayWindow()
    for c in range(100):
        assert w.update(c)
    assert w.update(10**12)
    assert not w.check(99)
    assert w.update(10**12 - 1)
    assert w.update(10**12 - W + 1)


def test_recycled_words_are_cleared() -> None:
    # stale bits in a recycled ring word would make fresh counters look replayed
    for step in (1, 63, 64, 65, W - 1, W, W + 1, W + 64, 2 * W, 10 * W + 3):
        w = ReplayWindow()
        for c in range(W):
            assert w.update(c)
        top = W - 1 + step
        assert w.update(top)
        for c in range(max(0, top - W - 2), top + 2):
            expected = c > top or (top - c < W and c >= W and c != top)
            assert w.check(c) == expected, (step, c)


def test_counter_range() -> None:
    w = ReplayWindow()
    assert not w.check(-1) and not w.update(-1)
    assert not w.check(MAX_COUNTER + 1) and not w.update(MAX_COUNTER + 1)
    assert w.update(MAX_COUNTER)
    assert not w.update(MAX_COUNTER)
    assert w.update(MAX_COUNTER - W + 1)
    assert not w.update(MAX_COUNTER - W)


def test_reordered_within_window_accepted() -> None:
    w = ReplayWindow()
    order = list(range(0, 3000, 3)) + list(range(1, 3000, 3)) + list(range(2, 3000, 3))
    assert all(w.update(c) for c in order)
    assert not any(w.update(c) for c in order)


# Counters near the current top (reorders, duplicates), jumps of about a window,
# and an occasional huge jump: enough to exercise every branch.
_step = st.one_of(
    st.integers(-W - 70, 70),
    st.integers(W - 70, W + 70),
    st.integers(0, 3 * W),
    st.sampled_from([0, 2**32, 2**63]),
)


@settings(max_examples=300)
@given(st.lists(_step, min_size=1, max_size=400))
def test_matches_reference_model(steps: list[int]) -> None:
    w, ref = ReplayWindow(), Reference()
    cursor = 0
    for step in steps:
        c = min(max(cursor + step, 0), MAX_COUNTER)
        cursor = c
        expected = ref.accepts(c)
        assert w.check(c) == expected
        assert w.check(c) == expected  # check() changed nothing
        assert w.update(c) == ref.update(c) == expected
        assert w.highest == ref.highest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4 * W), min_size=1, max_size=300))
def test_properties(counters: list[int]) -> None:
    w = ReplayWindow()
    accepted: set[int] = set()
    for c in counters:
        highest = w.highest
        fresh_in_window = c not in accepted and (highest is None or c > highest or highest - c < W)
        ok = w.update(c)
        if c in accepted:
            assert not ok  # never a duplicate
        if highest is not None and c <= highest and highest - c >= W:
            assert not ok  # never older than the window
        if fresh_in_window:
            assert ok  # always a fresh counter within the window
        if ok:
            accepted.add(c)
