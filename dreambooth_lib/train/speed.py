"""How a step runs on this device: every speed option of TrainConfig is resolved here, once, and nowhere else."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    """How the step runs on this device. Every speed flag of TrainConfig is resolved here and nowhere else."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not
    fused_adam: bool
    adam_8bit: bool
    compile: bool
    cuda_graph: bool  # the whole step as one CUDA graph (cuda_graph.GraphedStep); resolved to False off CUDA
    gradient_checkpointing: bool

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The step's autocast dtype on `device`; None: plain fp32."""
    if config.mixed_precision == "auto":
        # bf16 autocast where the hardware has it; fp32 on CPU, where bf16 matmuls are emulated and slower
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]


def speed_options(config: TrainConfig, device: str | torch.device) -> SpeedOptions:
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = autocast_dtype(config, device)
    cuda_graph = config.cuda_graph and cuda
    if config.cuda_graph and not cuda:
        log.warning("train.cuda_graph applies on CUDA devices only; on %s the step runs eagerly", device)
    return SpeedOptions(
        device=device,
        autocast_dtype=dtype,
        grad_scaler=dtype is torch.float16,
        fused_adam=cuda and not config.use_8bit_adam,
        adam_8bit=config.use_8bit_adam,
        compile=config.compile,
        cuda_graph=cuda_graph,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def make_optimizer(param_groups: list[dict[str, Any]], config: TrainConfig, speed: SpeedOptions):
    if speed.adam_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "train.use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes (CUDA only), "
                "or set use_8bit_adam: false"
            ) from None
        return bnb.optim.AdamW8bit(param_groups, weight_decay=config.adam_weight_decay)
    extra = {"fused": True} if speed.fused_adam else {"foreach": True}
    if speed.cuda_graph:
        extra["capturable"] = True  # the step counter lives on the device, so the update can be replayed
    return torch.optim.AdamW(param_groups, weight_decay=config.adam_weight_decay, **extra)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
