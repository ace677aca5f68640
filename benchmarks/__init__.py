"""Benchmarks run by ``nox -s bench``: one module per subject, each with ``NAME`` and ``run() -> str``.

``run`` measures its subject and a baseline in the same run and returns a Markdown section with the
ratios; ``python -m benchmarks`` prints each section and writes them all to ``docs/benchmarks.md``.
"""
