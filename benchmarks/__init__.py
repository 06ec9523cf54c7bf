"""Benchmarks: scripts that measure streamconv against baselines taken in the same run.  Never imported by
the package; run with ``python -m benchmarks``."""
