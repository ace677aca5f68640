"""Relays: WireGuard through a third party when no direct path exists yet.

Two kinds share one shape (sans-IO cores driven by ``(data, addr, now)``, short Trio shells):

- the hub's own relay (``punchtrio hub --relay IP:PORT``), on UDP and TCP (TLS) on one port,
  forwarding only between authenticated peers of one network;
- TURN (RFC 8656) clients, tested against coturn, over UDP, TCP and TLS.

See ``docs/relay.md``.
"""

# -- the hub's own relay (punchtrio.relay._hub*) ---------------------------------------------
# -- end of the hub's own relay --

# -- TURN (punchtrio.relay._turn*) ------------------------------------------------------------
# -- end of TURN --

__all__: list[str] = []
