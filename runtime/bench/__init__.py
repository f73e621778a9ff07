"""Benchmarks on the lab (`scripts/bench-*`). Not tests: they measure and report."""
