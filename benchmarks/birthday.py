"""Birthday punching: success rate, probes and time per success, easy NAT x hard NAT, seeded.

Each trial runs the sans-IO birthday core (:class:`punchtrio.punch.BirthdaySchedule`,
:func:`~punchtrio.punch.probe_ports`, :func:`~punchtrio.punch.predicted_ports`) against two
:class:`punchtrio.netsim.NatTable` models, packet by packet in time order, with a one-way delay
of 20 ms: the hard NAT maps per destination and port (random, sequential or preserving
allocation), the easy NAT maps endpoint-independently (full, restricted or port-restricted cone).
Before the attempt the hard side asks two STUN servers (its two server-reflexive ports are what
the easy side predicts from), pings the easy side's endpoint from its main socket, and other hosts
behind the hard NAT open 0-20 mappings of their own. A trial succeeds when a ping crosses both
NATs and its answer gets back. It is pure and seeded: the same seed gives the same table.

The arithmetic's prediction beside it: :func:`punchtrio.punch.birthday_success`, and the pure
simulation :func:`punchtrio.punch.simulate_birthday` (random ports only, no NAT model).
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import random
import statistics
from dataclasses import dataclass

from punchtrio.netsim import Filtering, Mapping, NatBehavior, NatTable, PortAllocation
from punchtrio.punch import (
    BirthdaySchedule,
    BirthdaySettings,
    birthday_success,
    predicted_ports,
    probe_ports,
    simulate_birthday,
)

NAME = "birthday"

EASY = {
    "full cone": NatBehavior.full_cone(),
    "restricted cone": NatBehavior.restricted_cone(),
    "port-restricted cone": NatBehavior.port_restricted_cone(),
}
"""The easy NATs: endpoint-independent mapping, each filtering."""
HARD = {
    "random": PortAllocation.RANDOM,
    "sequential": PortAllocation.SEQUENTIAL,
    "preserving": PortAllocation.PRESERVING,
}
"""The hard NAT's port allocation (its mapping and filtering are address-and-port-dependent)."""

DELAY = 0.02
"""One-way delay between the NATs, seconds."""
HARD_IP = ipaddress.ip_address("198.51.100.1")
EASY_IP = ipaddress.ip_address("192.0.2.1")
STUN = ((ipaddress.ip_address("203.0.113.10"), 3478), (ipaddress.ip_address("203.0.113.11"), 3479))
MAIN_PORT = 51820


@dataclass(frozen=True)
class Trial:
    """One trial's outcome: whether a ping crossed (``hit``), the easy side's probes sent by
    then, and the seconds from the attempt's start to the answer's arrival."""

    hit: bool
    probes: int
    seconds: float


def trial(
    easy: NatBehavior, allocation: PortAllocation, seed: int, settings: BirthdaySettings
) -> Trial:
    """Run one seeded birthday attempt between an ``easy`` NAT and a hard NAT (see the module)."""
    rng = random.Random(seed)
    hard_nat = NatTable(
        HARD_IP,
        NatBehavior(
            mapping=Mapping.ADDRESS_AND_PORT_DEPENDENT,
            filtering=Filtering.ADDRESS_AND_PORT_DEPENDENT,
            port_allocation=allocation,
        ),
        rng,
    )
    easy_nat = NatTable(EASY_IP, easy, rng)
    hard_main = (ipaddress.ip_address("10.0.0.2"), MAIN_PORT)
    easy_main = (ipaddress.ip_address("10.1.0.2"), MAIN_PORT)
    # Gathering: both sides ask the STUN servers; the hard side's two answers differ.
    reflexive = []
    for server in STUN:
        mapped = hard_nat.outbound(hard_main, server, 0.0)
        assert mapped is not None
        reflexive.append(mapped[1])
        easy_nat.outbound(easy_main, server, 0.0)
    easy_public = easy_nat.outbound(easy_main, STUN[0], 0.0)
    assert easy_public is not None
    # The ordinary punch: each side pings the other's server-reflexive endpoints.
    hard_nat.outbound(hard_main, easy_public, 0.1)
    for port in reflexive:
        easy_nat.outbound(easy_main, (HARD_IP, port), 0.1)
    for n in range(rng.randint(0, 20)):  # other hosts behind the hard NAT
        hard_nat.outbound((ipaddress.ip_address("10.0.0.9"), 40000 + n), STUN[0], 0.2)
    start = 1.0
    hard = BirthdaySchedule("hard", range(settings.sockets), start, settings)
    ports = probe_ports(rng, predicted_ports(reflexive, settings), settings)
    easy_side = BirthdaySchedule("easy", ports, start, settings)
    sockets = {j: (hard_main[0], MAIN_PORT + 1 + j) for j in range(settings.sockets)}
    at_hard = {internal: j for j, internal in sockets.items()}
    # Events: (time, order, kind, item): a schedule's tick sends what is due, an arrival
    # happens DELAY after its send.
    events: list[tuple[float, int, str, int]] = [
        (hard.next_deadline(), 0, "tick-hard", 0),
        (easy_side.next_deadline(), 1, "tick-easy", 0),
    ]
    order = 2
    sent = 0
    while events:
        t, _, kind, item = heapq.heappop(events)
        order += 1
        if kind in ("tick-hard", "tick-easy"):
            schedule = hard if kind == "tick-hard" else easy_side
            for due in schedule.due(t):
                if schedule is hard:  # ping from hard socket ``due`` to the easy side's endpoint
                    out = hard_nat.outbound(sockets[due], easy_public, t)
                    if out is not None:
                        heapq.heappush(events, (t + DELAY, order, "at-easy", out[1]))
                else:  # ping from the easy side to a port of the hard NAT
                    sent += 1
                    easy_nat.outbound(easy_main, (HARD_IP, due), t)
                    heapq.heappush(events, (t + DELAY, order, "at-hard", due))
                order += 1
            if not schedule.exhausted:
                heapq.heappush(events, (schedule.next_deadline(), order, kind, 0))
        elif kind == "at-hard":
            internal, _ = hard_nat.inbound(easy_public, item, t)
            if internal in at_hard:  # the answer goes back through that mapping
                back = hard_nat.outbound(internal, easy_public, t)
                assert back is not None
                got, _ = easy_nat.inbound((HARD_IP, back[1]), easy_public[1], t + DELAY)
                if got == easy_main:
                    return Trial(True, sent, t + DELAY - start)
        elif kind == "at-easy":  # a hard side's ping reaches the easy NAT
            got, _ = easy_nat.inbound((HARD_IP, item), easy_public[1], t)
            if got == easy_main:
                easy_nat.outbound(easy_main, (HARD_IP, item), t)  # the pong
                internal, _ = hard_nat.inbound(easy_public, item, t + DELAY)
                if internal in at_hard:
                    return Trial(True, sent, t + DELAY - start)
    return Trial(False, sent, settings.duration)


def matrix(
    trials: int, settings: BirthdaySettings | None = None, seed: int = 0
) -> dict[tuple[str, str], list[Trial]]:
    """Run ``trials`` seeded trials for every easy NAT x hard allocation."""
    s = settings if settings is not None else BirthdaySettings()
    out = {}
    for e, (easy_name, easy) in enumerate(EASY.items()):
        for h, (hard_name, allocation) in enumerate(HARD.items()):
            base = seed * 1_000_003 + (e * 3 + h) * 10_007
            out[(easy_name, hard_name)] = [
                trial(easy, allocation, base + n, s) for n in range(trials)
            ]
    return out


def table(results: dict[tuple[str, str], list[Trial]]) -> str:
    """A Markdown table: success rate, median probes and median seconds per cell."""
    lines = [
        "| easy NAT | hard NAT allocation | trials | direct | median probes | median time |",
        "|---|---|---|---|---|---|",
    ]
    for (easy, hard), runs in results.items():
        hits = [r for r in runs if r.hit]
        probes = statistics.median(r.probes for r in hits) if hits else float("nan")
        seconds = statistics.median(r.seconds for r in hits) if hits else float("nan")
        lines.append(
            f"| {easy} | {hard} | {len(runs)} | {100 * len(hits) / len(runs):.1f}% | "
            f"{probes:.0f} | {seconds:.2f} s |"
        )
    return "\n".join(lines)


def run() -> str:
    """The benchmark: the matrix over 200 trials per cell, then the arithmetic beside it."""
    s = BirthdaySettings()
    text = [
        "## Birthday punching against netsim's NAT models (`benchmarks/birthday.py`)",
        "",
        "Birthday punching in the sans-IO core against netsim's NAT models "
        f"({s.sockets} mappings, {s.rate:.0f} probes/s, at most {s.max_probes} probes; "
        "`python -m benchmarks birthday`):",
        "",
        table(matrix(200, s)),
        "",
        "The arithmetic for random ports 1025-65535 (64 511 ports), 256 mappings, beside the pure "
        "seeded simulation (`simulate_birthday`, 5000 trials):",
        "",
        "| probes | predicted | simulated | median probes per success |",
        "|---|---|---|---|",
    ]
    for probes in (1024, 2048):
        p = dataclasses.replace(s, max_probes=probes, port_range=(1025, 65535))
        result = simulate_birthday(5000, probes, p)
        text.append(
            f"| {probes} | {100 * birthday_success(256, probes, 64511):.2f}% | "
            f"{100 * result.rate:.2f}% | {result.median_probes:.0f} |"
        )
    return "\n".join(text)
