"""Grouped LoRA: K subjects' adapters in one layer, each row of a batch through its own subject's adapter.

Each targeted Linear (the family's `denoiser_lora_targets`) becomes one `GroupedLoRALinear` holding all K
adapters, A: [K, r, in] and B: [K, out, r]:

    y = base(x) + scale * ((x @ A[idx]^T) @ B[idx]^T)        idx: the adapter of each row,

as two batched matmuls over the gathered per-row weights (not K passes). Gradients are clipped per adapter, as
each subject's single run clips its own (multi_subject.py says why packing equals K single runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dreambooth_lib.models import lora


class AdapterRouter:
    """The adapter index of each row of the next forward, shared by every GroupedLoRALinear of the model."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # [rows] long, on the training device
        self.enabled = True  # False: the base layers alone (the frozen base model's prediction)
        self.only: int | None = None  # every row through this one adapter (sampling one subject's model)


class GroupedLoRALinear(torch.nn.Module):
    """A frozen Linear plus K LoRA adapters; each row of the batch goes through the adapter `router.index` names."""

    def __init__(
        self, base: torch.nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, router
    ):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Parameter(lora_a)  # [K, r, in]
        self.lora_B = torch.nn.Parameter(lora_b)  # [K, out, r]
        self.scaling = float(scaling)
        self.router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.router.enabled:
            return result
        if self.router.only is not None:
            k = self.router.only
            return result + (x @ self.lora_A[k].T @ self.lora_B[k].T) * self.scaling
        index = self.router.index
        if index is None or index.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"GroupedLoRALinear: {x.shape[0]} rows but the router holds "
                f"{None if index is None else index.shape[0]} adapter indices; set router.index first"
            )
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, tokens, in]
        down = torch.bmm(rows, self.lora_A[index].transpose(1, 2))  # [rows, tokens, r]
        up = torch.bmm(down, self.lora_B[index].transpose(1, 2))  # [rows, tokens, out]
        return result + up.reshape(result.shape) * self.scaling


@dataclass
class _Slot:
    """Where a peft LoRA layer sat in the denoiser and the grouped layer that replaces it while training."""

    parent: torch.nn.Module
    child: str
    peft_layer: torch.nn.Module
    grouped: GroupedLoRALinear


class GroupedAdapters:
    """The K adapters of a pack inside the denoiser: made from its peft LoRA layers, each of the K starting as the
    adapter a single run would make, and put back into those layers one subject at a time for export."""

    def __init__(self, denoiser: torch.nn.Module, num_adapters: int):
        self.router = AdapterRouter()
        self.slots: list[_Slot] = []
        for name, module in list(denoiser.named_modules()):
            if not (hasattr(module, "lora_A") and lora.ADAPTER_NAME in getattr(module, "lora_A", {})):
                continue
            a = module.lora_A[lora.ADAPTER_NAME].weight.detach()
            b = module.lora_B[lora.ADAPTER_NAME].weight.detach()
            grouped = GroupedLoRALinear(
                module.base_layer,
                a.unsqueeze(0).repeat(num_adapters, 1, 1),
                b.unsqueeze(0).repeat(num_adapters, 1, 1),
                module.scaling[lora.ADAPTER_NAME],
                self.router,
            )
            parent_name, _, child = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name)
            setattr(parent, child, grouped)
            self.slots.append(_Slot(parent, child, module, grouped))
        if not self.slots:
            raise RuntimeError("no LoRA layers found in the denoiser; add its LoRA adapters first")

    def ungroup(self) -> None:
        """Put the peft layers back in the denoiser (after training; then `load(k)` fills them)."""
        self.router.index = None
        for s in self.slots:
            setattr(s.parent, s.child, s.peft_layer)

    @torch.no_grad()
    def load(self, k: int) -> None:
        """Copy adapter k into the peft layers, so the denoiser is subject k's LoRA model."""
        for s in self.slots:
            s.peft_layer.lora_A[lora.ADAPTER_NAME].weight.copy_(s.grouped.lora_A[k])
            s.peft_layer.lora_B[lora.ADAPTER_NAME].weight.copy_(s.grouped.lora_B[k])


def clip_grad_norm_per_adapter(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` applied to each adapter k alone (slice k of every [K, ...] parameter), as
    each single-subject run clips its own gradients. Returns the [K] norms before clipping, on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's formula, eps included
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms
