"""Per-subject losses, summed on the device and read back only at log steps (a read is a device sync)."""

from __future__ import annotations

from typing import Any

import torch


class LossTracker:
    """Loss sums [K] since the last read and the first step whose loss was not finite [K] (-1: none yet)."""

    def __init__(self, num_subjects: int, device: torch.device):
        self.sum = torch.zeros(num_subjects, device=device)
        self.count = 0
        self.first_bad_step = torch.full((num_subjects,), -1, dtype=torch.long, device=device)

    def add(self, losses: torch.Tensor, step: int) -> None:
        self.sum += losses.float()
        self.count += 1
        bad = ~torch.isfinite(losses) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(
            bad, torch.full_like(self.first_bad_step, step), self.first_bad_step
        )

    def non_finite_steps(self) -> list[int]:
        """The first non-finite step of each subject, or -1: one sync."""
        return self.first_bad_step.tolist()

    def read(self) -> list[float]:
        """The mean loss of each subject since the last read (one sync); the sums start again."""
        means = (self.sum / max(self.count, 1)).tolist()
        self.sum.zero_()
        self.count = 0
        return means

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (float32 sums, exact as JSON floats)."""
        return {
            "pending_loss_sum": self.sum.tolist(),
            "pending_loss_count": self.count,
            "first_bad_step": self.first_bad_step.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        device = self.sum.device
        self.sum = torch.tensor(state["pending_loss_sum"], dtype=self.sum.dtype, device=device)
        self.count = state["pending_loss_count"]
        self.first_bad_step = torch.tensor(state["first_bad_step"], dtype=torch.long, device=device)
