"""The batch_summary component."""
