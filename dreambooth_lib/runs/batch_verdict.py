"""The batch verdict's former home, kept so `from dreambooth_lib.runs import batch_verdict` keeps working: the
code is in dreambooth_lib.runs.batch.verdict."""

from dreambooth_lib.runs.batch.verdict import MAX_LISTED, BatchFailed, check_batch, verdict

__all__ = ["MAX_LISTED", "BatchFailed", "check_batch", "verdict"]
