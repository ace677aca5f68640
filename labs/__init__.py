"""The NAT lab: real kernel networks built from namespaces, veth pairs, bridges and nftables.

Everything here needs root. Scenarios live in ``labs/scenarios/`` (one module each, defining
``NAME``, ``DESCRIPTION`` and ``run() -> int``) and are listed and run by ``python -m labs``.

- :mod:`labs.netns`: namespaces and veth pairs that are always torn down (from ``punchtrio._netns``);
- :mod:`labs.topology`: NAT topologies (``build(["full", "sym"])``), the NAT kinds, ``cleanup``
  (re-exported from the installed ``punchtrio.natlab``, which ``punchtrio demo`` builds with too);
- :mod:`labs.discovery`: STUN servers in the hub, NAT discovery tools on the hosts, parsed;
- :mod:`labs.udpprobe`: a plain-UDP reflector and probes, the lab's own ground truth.

See ``docs/lab.md``.
"""
