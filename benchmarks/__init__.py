"""Benchmarks of kqueue against raw Kombu baselines, run interleaved: ``python -m benchmarks --help``."""
