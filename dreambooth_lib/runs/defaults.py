"""What the pipelines' parameters default to, read from the config models, so that a pipeline, its components
and `dreambooth run` agree without a number typed twice."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from dreambooth_lib.config import PriorConfig, TrainConfig


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].default


RESOLUTION: int = _default(TrainConfig, "resolution")
STEPS: int = _default(TrainConfig, "steps")
PRIOR_LOSS_WEIGHT: float = _default(TrainConfig, "prior_loss_weight")
PRIOR_SIZE: int = _default(PriorConfig, "num_images")
MODE: str = _default(TrainConfig, "mode")  # one subject: the paper's full fine-tune
# Many subjects: LoRA, so the pack step trains K subjects in one UNet batch per task (a full fine-tune of each
# subject is neither packed nor cheap to store); TrainConfig's learning rate follows the mode.
BATCH_MODE = "lora"
