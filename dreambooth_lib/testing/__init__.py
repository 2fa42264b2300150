"""Test fixtures shipped with the package for tests and the demo: tiny models, tiny evaluators, synthetic subjects."""
