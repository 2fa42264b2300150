"""The batch_classes component."""
