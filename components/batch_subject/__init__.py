"""The batch_subject component."""
