"""The NAT lab: real kernel networks built from namespaces, veth pairs, bridges and nftables.

Everything here needs root. Scenarios live in ``labs/scenarios/`` (one module each, defining
``NAME``, ``DESCRIPTION`` and ``run() -> int``) and are listed and run by ``python -m labs``.
"""
