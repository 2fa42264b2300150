"""Runs of several steps in one process: `personalize` (one subject, every step) and `batch` (many subjects)."""
