"""The RFC 6479 replay window against a plain set-based model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.wireguard._replay import WINDOW_SIZE, ReplayWindow


class Model:
    """Accept a counter iff unseen and no more than WINDOW_SIZE below the highest accepted."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = 0

    def accept(self, counter: int) -> bool:
        if counter in self.seen or (
            counter < self.highest and self.highest - counter > WINDOW_SIZE
        ):
            return False
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return True


def test_window_size_is_the_reference_value() -> None:
    assert WINDOW_SIZE == 8128


def test_edges() -> None:
    w = ReplayWindow()
    assert w.accept(0)
    assert not w.accept(0)
    assert w.accept(WINDOW_SIZE + 10)
    assert w.accept(10)  # exactly WINDOW_SIZE below
    assert not w.accept(9)  # one further
    assert not w.accept(10)
    assert w.accept(2**64 - 1)
    assert not w.accept(2**64 - 1)
    assert not w.accept(2**64 - 1 - WINDOW_SIZE - 1)
    assert w.accept(2**64 - 1 - WINDOW_SIZE)


counters = st.one_of(
    st.integers(0, 300),
    st.integers(0, 20_000),
    st.integers(0, 2**64 - 1),
)


@settings(max_examples=500)
@given(st.lists(counters, max_size=300))
def test_matches_set_model(sequence: list[int]) -> None:
    w, m = ReplayWindow(), Model()
    for counter in sequence:
        assert w.accept(counter) == m.accept(counter), counter


@settings(max_examples=200)
@given(st.integers(0, 2**40), st.lists(st.integers(-9000, 9000), max_size=400))
def test_matches_set_model_near_a_moving_edge(base: int, offsets: list[int]) -> None:
    w, m = ReplayWindow(), Model()
    for offset in offsets:
        counter = max(0, base + offset)
        assert w.accept(counter) == m.accept(counter), counter
        base += 37
