"""The identifier component."""
