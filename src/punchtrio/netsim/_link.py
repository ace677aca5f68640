"""Links: the latency, jitter, loss and duplication between a node and the network it sits on."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ._addresses import NetsimError


@dataclass(frozen=True)
class Link:
    """The properties of the link that attaches one node to one network; the default is perfect.

    A packet crossing a network passes the sender's link, then the receiver's link; each applies
    its own loss, duplication and delay, drawn from the simulation's single seeded RNG.

    - ``latency``: one-way delay in seconds (default 0).
    - ``jitter``: the delay is drawn uniformly from ``latency ± jitter`` seconds, so its mean is
      ``latency``; ``jitter`` must not exceed ``latency`` (default 0). Jitter reorders packets.
    - ``loss``: probability in [0, 1] that a packet is lost on this link (default 0).
    - ``duplicate``: probability in [0, 1] that a packet is delivered twice; each copy gets its own
      delay (default 0).

    Raises :class:`NetsimError` for a negative or non-finite value, a probability above 1, or
    ``jitter > latency``.
    """

    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency", "jitter", "loss", "duplicate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise NetsimError(f"link {name} must be a finite number >= 0, got {value!r}")
        for name in ("loss", "duplicate"):
            if getattr(self, name) > 1:
                raise NetsimError(
                    f"link {name} is a probability in [0, 1], got {getattr(self, name)}"
                )
        if self.jitter > self.latency:
            raise NetsimError(
                f"link jitter ({self.jitter} s) must not exceed its latency ({self.latency} s)"
            )

    def copies(self, rng: random.Random) -> list[float]:
        """Return the delays in seconds of the copies of one packet that leave this link.

        An empty list means the packet was lost. The RNG is drawn only for non-zero parameters,
        so a perfect link consumes no randomness.
        """
        if not (self.loss or self.duplicate or self.jitter):
            return [float(self.latency)]
        if self.loss and rng.random() < self.loss:
            return []
        count = 2 if self.duplicate and rng.random() < self.duplicate else 1
        return [self._delay(rng) for _ in range(count)]

    def _delay(self, rng: random.Random) -> float:
        if self.jitter:
            return self.latency + rng.uniform(-self.jitter, self.jitter)
        return float(self.latency)
