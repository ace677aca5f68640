"""One module per lab scenario: ``NAME``, ``DESCRIPTION`` and ``run() -> int``."""
