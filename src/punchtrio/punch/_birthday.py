"""Birthday-paradox punching, sans-IO: who sprays, which ports, how fast, how long, when again.

When one NAT maps per destination (a "hard" NAT: a new, unpredictable external port for every
destination) and the other maps endpoint-independently (an "easy" NAT), the ordinary punch cannot
work if the easy NAT filters by address and port: the easy side never sends to the port the hard
NAT picks for it. Birthday punching makes the two meet anyway:

- the **hard** side opens ``sockets`` extra UDP sockets (default 256) and sends one authenticated
  ping from each to the easy side's server-reflexive endpoint: the hard NAT opens that many
  mappings, each of which admits the easy side's endpoint;
- the **easy** side sends pings to ports of the hard side's public address, never a port twice,
  ``rate`` per second (default 500), at most ``max_probes`` per attempt (default 2048), until one
  lands on one of those mappings. Its ping then reaches the hard side on that socket, the answer
  goes back through the same mapping, and the easy NAT admits it because the easy side just sent
  there.

With ``n`` mappings among ``P`` possible ports and ``k`` probes, the chance that no probe hits is
``C(P - n, k) / C(P, k)``, about ``(1 - n / P) ** k``: :func:`birthday_success` computes it,
:func:`simulate_birthday` measures it. Where the hard NAT allocates ports predictably (it preserves
the internal port, or counts up), :func:`predicted_ports` puts the ports just above its observed
mappings first.

Everything here is pure: :class:`BirthdaySchedule` says what is due at ``now``; the puncher sends.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .._exceptions import PunchtrioError

Role = Literal["hard", "easy"]
"""Which side of a birthday attempt we are: ``"hard"`` opens mappings, ``"easy"`` sprays ports."""


class BirthdayError(PunchtrioError):
    """Birthday settings are inconsistent (a count below 1, a rate or time that is not positive,
    a port range outside 1-65535)."""


@dataclass(frozen=True)
class BirthdaySettings:
    """Pace and bounds of birthday punching (counts, probes per second, seconds).

    - ``sockets`` 256: extra sockets (so mappings) the hard side opens per attempt;
    - ``open_rate`` 2000.0: pings per second the hard side sends, one from each socket (256 in
      128 ms);
    - ``rate`` 500.0: pings per second the easy side sends to the hard side's ports;
    - ``max_probes`` 2048: pings the easy side sends per attempt at most (about 4.1 s at 500/s;
      with 256 mappings among 64 511 ports the chance of a hit is 99.97%);
    - ``port_range`` (1024, 65535): the hard NAT's ports the easy side may probe;
    - ``predict_spread`` 16 and ``predict_window`` 512: when the hard side's server-reflexive
      ports lie within ``predict_spread`` of each other, its NAT counts up or preserves ports, and
      the ``predict_window`` ports above the lowest of them are probed first;
    - ``delay`` 0.5: a birthday attempt starts this long after the punch attempt, if no direct
      path works by then (the ordinary punch answers within a round trip or two when it can);
    - ``settle`` 0.1: the easy side starts spraying this long after the hard side has opened its
      last mapping (a one-way delay, so early probes do not meet mappings not opened yet);
    - ``linger`` 1.0: how long after the last probe an answer may still arrive;
    - ``retry`` 60.0 and ``retry_max`` 960.0: after a failed attempt, the next one waits this
      long, doubling after each failure up to the maximum (16 minutes).

    Raises :class:`BirthdayError` for values out of range.
    """

    sockets: int = 256
    open_rate: float = 2000.0
    rate: float = 500.0
    max_probes: int = 2048
    port_range: tuple[int, int] = (1024, 65535)
    predict_spread: int = 16
    predict_window: int = 512
    delay: float = 0.5
    settle: float = 0.1
    linger: float = 1.0
    retry: float = 60.0
    retry_max: float = 960.0

    def __post_init__(self) -> None:
        if (
            min(self.sockets, self.max_probes) < 1
            or min(self.predict_spread, self.predict_window) < 0
        ):
            raise BirthdayError("sockets and max_probes must be >= 1, the prediction sizes >= 0")
        finite = (self.open_rate, self.rate, self.retry, self.retry_max)
        if not all(math.isfinite(v) and v > 0 for v in finite):
            raise BirthdayError("open_rate, rate, retry and retry_max must be positive")
        if self.retry > self.retry_max:
            raise BirthdayError("retry must not exceed retry_max")
        if min(self.delay, self.settle, self.linger) < 0:
            raise BirthdayError("delay, settle and linger must be >= 0 seconds")
        low, high = self.port_range
        if not 1 <= low <= high <= 65535:
            raise BirthdayError(f"port_range must satisfy 1 <= low <= high <= 65535: {low}-{high}")

    @property
    def open_time(self) -> float:
        """Seconds the hard side takes to open its mappings (``sockets / open_rate``)."""
        return self.sockets / self.open_rate

    @property
    def spray_start(self) -> float:
        """Seconds from an attempt's start to the easy side's first probe."""
        return self.open_time + self.settle

    @property
    def duration(self) -> float:
        """Seconds an attempt lasts on either side: mappings, settle, every probe, the linger."""
        return self.spray_start + self.max_probes / self.rate + self.linger

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the next attempt after ``failures`` failed ones (>= 1)."""
        return min(self.retry_max, self.retry * 2.0 ** max(0, min(failures - 1, 60)))


def birthday_role(ours_varies: bool | None, theirs_varies: bool | None) -> Role | None:
    """Return our role in a birthday attempt, from both sides' two-server mapping checks.

    ``"hard"`` if our NAT maps per destination and the peer's does not, ``"easy"`` the other way
    round, ``None`` when both or neither map per destination, or when either side does not know
    (fewer than two STUN answers). Both hard is out of reach: about 170 000 probes per side for
    a 99.9% chance.
    """
    if ours_varies is None or theirs_varies is None or ours_varies == theirs_varies:
        return None
    return "hard" if ours_varies else "easy"


def predicted_ports(
    reflexive: Iterable[int], settings: BirthdaySettings | None = None
) -> list[int]:
    """Return the ports to probe first on a hard NAT whose mappings were seen at ``reflexive``.

    When the observed ports lie within ``predict_spread`` of each other the NAT counts up (or
    preserves ports, and the hard side binds its extra sockets just above its main one), so its
    next mappings are just above them: the ``predict_window`` ports above the lowest observed port,
    the observed ones left out, within ``port_range``. Otherwise (a random allocator, or fewer than
    two observations) none.
    """
    s = settings if settings is not None else BirthdaySettings()
    seen = sorted(set(reflexive))
    if len(seen) < 2 or seen[-1] - seen[0] > s.predict_spread:
        return []
    low, high = s.port_range
    skip = set(seen)
    first = seen[0] + 1
    return [
        p
        for p in range(first, min(high, first + s.predict_window - 1) + 1)
        if p not in skip and p >= low
    ]


def probe_ports(
    rng: _random.Random, predicted: Sequence[int] = (), settings: BirthdaySettings | None = None
) -> ProbeOrder:
    """Return the easy side's probe order: ``predicted`` first, then random ports; never one twice.

    At most ``max_probes`` ports, all within ``port_range`` (predicted ports outside it are left
    out). ``rng`` draws the random part as it is needed (seed it for a reproducible order), so an
    attempt that hits early draws little.
    """
    s = settings if settings is not None else BirthdaySettings()
    return ProbeOrder(rng, predicted, s)


class ProbeOrder(Sequence[int]):
    """The ports of one attempt, in probe order (see :func:`probe_ports`); drawn lazily."""

    def __init__(
        self, rng: _random.Random, predicted: Sequence[int], settings: BirthdaySettings
    ) -> None:
        low, high = settings.port_range
        self._low, self._high = low, high
        self._rng = rng
        self._order = list(dict.fromkeys(p for p in predicted if low <= p <= high))
        del self._order[settings.max_probes :]
        self._used = set(self._order)
        self._length = min(settings.max_probes, high - low + 1)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> int:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("probe order indices are integers")
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("probe order index out of range")
        order, used, rng = self._order, self._used, self._rng
        while len(order) <= index:
            port = rng.randint(self._low, self._high)
            if port not in used:
                used.add(port)
                order.append(port)
        return order[index]


class BirthdaySchedule:
    """When each ping of one attempt is due, sans-IO: ``due(now)`` returns what to send now.

    The hard side sends one ping per socket (``items`` is ``range(sockets)``) at ``open_rate`` from
    ``start``; the easy side one per port of ``items`` (from :func:`probe_ports`) at ``rate`` from
    ``start + spray_start``. A late timer sends at most ``burst`` pings at once and lets the rest
    slide instead of bursting. The attempt ends at ``start + duration``.
    """

    def __init__(
        self,
        role: Role,
        items: Sequence[int],
        start: float,
        settings: BirthdaySettings,
        *,
        burst: int = 16,
    ) -> None:
        self.role: Role = role
        self.items = list(items)
        self.start = start
        self.settings = settings
        self.interval = 1.0 / (settings.open_rate if role == "hard" else settings.rate)
        first = start if role == "hard" else start + settings.spray_start
        self._next = first
        self._sent = 0
        self._burst = max(1, burst)
        self.end = start + settings.duration
        """When the attempt is over (success or not)."""

    @property
    def sent(self) -> int:
        """How many of ``items`` were handed out so far."""
        return self._sent

    @property
    def exhausted(self) -> bool:
        """Whether every item has been handed out."""
        return self._sent >= len(self.items)

    def next_deadline(self) -> float:
        """When :meth:`due` next has something, or the end of the attempt once exhausted."""
        return self.end if self.exhausted else self._next

    def due(self, now: float) -> list[int]:
        """Return the items due at ``now`` (at most ``burst``), in order."""
        out: list[int] = []
        while not self.exhausted and self._next <= now + 1e-9 and len(out) < self._burst:
            out.append(self.items[self._sent])
            self._sent += 1
            self._next += self.interval
        if not self.exhausted and self._next < now - self.interval:
            self._next = now  # behind: slide rather than catch up in a burst
        return out


def birthday_success(mappings: int, probes: int, ports: int) -> float:
    """Return the exact chance that ``probes`` distinct random ports out of ``ports`` hit at least
    one of ``mappings`` distinct random ports (1 - C(ports - mappings, probes) / C(ports, probes))."""
    if probes <= 0 or mappings <= 0:
        return 0.0
    if probes > ports - mappings:
        return 1.0
    log_miss = (
        math.lgamma(ports - mappings + 1)
        - math.lgamma(ports - mappings - probes + 1)
        - math.lgamma(ports + 1)
        + math.lgamma(ports - probes + 1)
    )
    return 1.0 - math.exp(log_miss)


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_birthday` measured: ``trials``, how many hit (``hits``), the rate,
    and the probes sent per success (the median and the mean, counting the hitting probe)."""

    trials: int
    hits: int
    median_probes: float
    mean_probes: float

    @property
    def rate(self) -> float:
        """``hits / trials``."""
        return self.hits / self.trials if self.trials else 0.0


def simulate_birthday(
    trials: int, seed: int, settings: BirthdaySettings | None = None
) -> SimulationResult:
    """Measure birthday punching against a NAT with random allocation, pure and seeded.

    Each trial draws ``sockets`` distinct mapped ports from ``port_range`` (the hard NAT) and
    probes in :func:`probe_ports` order (no prediction) up to ``max_probes``; a trial hits when a
    probe lands on a mapping. Raises :class:`BirthdayError` if ``trials`` < 1.
    """
    if trials < 1:
        raise BirthdayError("at least one trial")
    s = settings if settings is not None else BirthdaySettings()
    rng = _random.Random(seed)
    low, high = s.port_range
    hits, counts = 0, []
    for _ in range(trials):
        mapped = set(rng.sample(range(low, high + 1), min(s.sockets, high - low + 1)))
        for n, port in enumerate(probe_ports(rng, (), s), 1):
            if port in mapped:
                hits += 1
                counts.append(n)
                break
    counts.sort()
    median = 0.0
    if counts:
        mid = len(counts) // 2
        median = counts[mid] if len(counts) % 2 else (counts[mid - 1] + counts[mid]) / 2
    mean = sum(counts) / len(counts) if counts else 0.0
    return SimulationResult(trials, hits, float(median), mean)
