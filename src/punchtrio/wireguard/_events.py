"""What a :class:`~punchtrio.wireguard.Device` reports through ``next_event()``."""

from __future__ import annotations

from dataclasses import dataclass

from ._config import Address


@dataclass(frozen=True)
class HandshakeCompleted:
    """A new session with ``peer`` (public key) is usable; ``endpoint`` is where the peer is."""

    peer: bytes
    endpoint: Address


@dataclass(frozen=True)
class HandshakeFailed:
    """No handshake with ``peer`` succeeded for ``Timers.rekey_attempt_time``; queued packets dropped."""

    peer: bytes


@dataclass(frozen=True)
class EndpointChanged:
    """An authenticated packet from ``peer`` arrived from ``new``; replies now go there (roaming)."""

    peer: bytes
    old: Address | None
    new: Address


@dataclass(frozen=True)
class KeysZeroed:
    """All session keys of ``peer`` were dropped after 3 x REJECT_AFTER_TIME without a new session."""

    peer: bytes


Event = HandshakeCompleted | HandshakeFailed | EndpointChanged | KeysZeroed
"""Every event type a device emits."""
