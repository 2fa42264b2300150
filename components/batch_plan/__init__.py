"""The batch_plan component."""
