"""Benchmarks: run with ``make bench-lifecycle`` (see bench/README.md)."""
