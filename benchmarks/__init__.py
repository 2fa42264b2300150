"""Benchmarks: printed figures against a baseline in the same run (not part of the runtime package)."""
