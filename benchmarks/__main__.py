"""`python -m benchmarks ...` from the checkout's root (see benchmarks/cli.py)."""

from benchmarks.cli import app

app(prog_name="python -m benchmarks")
