"""Benchmarks run by `make bench-*`: scripts that measure, never timed assertions."""
