"""Benchmarks: printed figures against a baseline in the same run (not part of the runtime package).

Run from a checkout's root: `python -m benchmarks --help` (train, all, prior, host-syncs); `make bench`;
`bash scripts/gpu_bench.sh` on a GPU machine. docs/performance.md has the figures.
"""
