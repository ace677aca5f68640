"""Link latency, jitter, loss and duplication: statistics over many packets in virtual time."""

from __future__ import annotations

import random
import statistics
import struct

import pytest
import trio

from punchtrio import netsim

N = 2000
SPACING = 0.001


async def measure(link: netsim.Link, *, seed: int = 3) -> tuple[list[float], list[int]]:
    """Send N numbered packets 1 ms apart over ``link``; return the one-way delays and numbers seen."""
    net = netsim.Internet(seed=seed)
    sender = net.add_host("192.0.2.1", link=link)
    receiver = net.add_host("192.0.2.2")
    delays: list[float] = []
    seen: list[int] = []
    async with net, trio.open_nursery() as nursery:
        rx = receiver.udp_socket()
        await rx.bind(("", 9))

        async def receive() -> None:
            while True:
                data = await rx.recv(64)
                number, sent_at = struct.unpack("!Id", data)
                seen.append(number)
                delays.append(trio.current_time() - sent_at)

        nursery.start_soon(receive)
        tx = sender.udp_socket()
        for number in range(N):
            await tx.sendto(struct.pack("!Id", number, trio.current_time()), ("192.0.2.2", 9))
            await trio.sleep(SPACING)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    return delays, seen


async def test_latency_and_jitter(autojump_clock: trio.testing.MockClock) -> None:
    delays, seen = await measure(netsim.Link(latency=0.050, jitter=0.020))
    assert len(seen) == N
    assert statistics.fmean(delays) == pytest.approx(0.050, abs=0.002)
    assert min(delays) >= 0.030 - 1e-9
    assert max(delays) <= 0.070 + 1e-9
    # Uniform on +-20 ms has standard deviation 20/sqrt(3) ms.
    assert statistics.pstdev(delays) == pytest.approx(0.020 / 3**0.5, rel=0.1)
    assert seen != sorted(seen)  # jitter above the spacing reorders packets


async def test_fixed_latency_keeps_order(autojump_clock: trio.testing.MockClock) -> None:
    delays, seen = await measure(netsim.Link(latency=0.030))
    assert seen == list(range(N))
    assert delays == pytest.approx([0.030] * N)


async def test_loss(autojump_clock: trio.testing.MockClock) -> None:
    _, seen = await measure(netsim.Link(latency=0.01, loss=0.1))
    # Binomial(2000, 0.1): mean 200 lost, standard deviation 13.4; allow four of them.
    assert abs((N - len(seen)) - 200) < 54
    assert len(set(seen)) == len(seen)


async def test_duplication(autojump_clock: trio.testing.MockClock) -> None:
    _, seen = await measure(netsim.Link(latency=0.01, jitter=0.005, duplicate=0.2))
    assert set(seen) == set(range(N))
    assert abs((len(seen) - N) - 400) < 72


async def test_links_on_both_sides_add_up(autojump_clock: trio.testing.MockClock) -> None:
    net = netsim.Internet()
    a = net.add_host("192.0.2.1", link=netsim.Link(latency=0.010))
    nat = net.add_nat("198.51.100.1", link=netsim.Link(latency=0.020))
    b = nat.lan.add_host(link=netsim.Link(latency=0.005))
    async with net:
        rx, tx = a.udp_socket(), b.udp_socket()
        await rx.bind(("", 9))
        start = trio.current_time()
        await tx.sendto(b"x", ("192.0.2.1", 9))
        await rx.recv(1)
        assert trio.current_time() - start == pytest.approx(0.035)


def test_a_perfect_link_draws_no_randomness() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    assert netsim.Link().copies(rng) == [0.0]
    assert rng.getstate() == state


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latency": -1},
        {"latency": float("inf")},
        {"loss": 1.5},
        {"duplicate": -0.1},
        {"latency": 0.01, "jitter": 0.02},
    ],
)
def test_link_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(netsim.NetsimError):
        netsim.Link(**kwargs)
