"""Build the whole NAT lab, print how to reach each namespace, and keep it up until Ctrl-C."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

from labs import discovery
from labs.topology import KINDS, NatSpec, build

NAME = "nat-shell"
DESCRIPTION = "keep every NAT kind (plus hairpin and nested NATs) up for manual exploration"


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run() -> int:
    """Build the lab and a ``punchtrio stun-server`` in its hub, then wait for Ctrl-C or SIGTERM."""
    specs = [
        *(NatSpec(kind) for kind in KINDS),
        NatSpec("port", hosts=2, hairpin=True),
        NatSpec("sym", behind=NatSpec("full", hosts=0)),
    ]
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background, where it is ignored
    with tempfile.TemporaryDirectory(prefix="pt-nat-shell-") as tmp, build(specs) as net:
        server = discovery.start_punchtrio_stun(net, log=Path(tmp) / "stun-server.log")
        hub = net.hub
        print(f"lab prefix {net.lab.prefix}; `python -m labs cleanup {net.lab.prefix}` if killed")
        print(f"hub      {hub.ns.name}: {hub.primary_ip}, {hub.alternate_ip}")
        print(
            f"         punchtrio stun-server on {server.endpoint} (alternate port {server.alternate[1]})"
        )
        for nat in net.nats:
            where = f"behind {nat.outer.name}" if nat.outer else "on the wan"
            hairpin = ", hairpinning" if nat.hairpin else ""
            print(f"{nat.name:8} {nat.ns.name}: {nat.kind}{hairpin}, {nat.public_ip} {where}")
            for host in nat.hosts:
                print(f"  {host.name:6} {host.ns.name}: {host.ip}")
        host = net.hosts[0]
        print(f"\ntry: ip netns exec {host.ns.name} punchtrio nat --stun {server.endpoint}")
        print("Ctrl-C tears everything down.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0
