"""LoRA adapters (peft) on a denoiser's and text encoders' projections, and the file `load_lora_weights` reads.

LoRA trains a low-rank update W + (alpha/r)·B·A of each targeted projection and freezes everything else: a few
MB to store per subject instead of a whole model, less optimizer memory, and the base model stays shared. Which
projections are targeted is the model family's choice (`ModelFamily.denoiser_lora_targets`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreambooth_lib.artifacts import LORA_MARKER_NAME, LORA_WEIGHTS_NAME

ADAPTER_NAME = "default"


def lora_alpha(rank: int, alpha: float | None) -> float:
    """None means alpha = rank, i.e. a scale of 1."""
    return float(alpha) if alpha is not None else float(rank)


def _config(targets, rank: int, alpha: float | None):
    from peft import LoraConfig

    # B starts at zero, so the adapted model equals the base model at step 0; A is Gaussian ("gaussian" init, as
    # diffusers' DreamBooth LoRA scripts). Draws come from torch's global RNG: seed it first for repeatable runs.
    return LoraConfig(
        r=rank, lora_alpha=lora_alpha(rank, alpha), init_lora_weights="gaussian", target_modules=list(targets)
    )


def add_denoiser_adapter(denoiser, targets, rank: int, alpha: float | None) -> None:
    """Freeze a diffusers denoiser (UNet, transformer) and add trainable LoRA adapters to its `targets`."""
    denoiser.requires_grad_(False)
    denoiser.add_adapter(_config(targets, rank, alpha))


def add_text_encoder_adapter(text_encoder, targets, rank: int, alpha: float | None) -> None:
    """Freeze a transformers text encoder and add trainable LoRA adapters to its `targets`."""
    # peft directly, not transformers' `add_adapter`: transformers 5 refuses peft < 0.22 there, and the
    # adapter is the same LoRA layers either way.
    from peft import inject_adapter_in_model

    text_encoder.requires_grad_(False)
    inject_adapter_in_model(_config(targets, rank, alpha), text_encoder, adapter_name=ADAPTER_NAME)


def save_lora_weights(
    folder: str | Path,
    pipeline_type: type,
    denoiser_name: str,
    denoiser,
    text_encoders: dict[str, Any],
    marker: dict[str, Any],
) -> Path:
    """Write pytorch_lora_weights.safetensors with `pipeline_type.save_lora_weights` (the writer matching that
    pipeline's `load_lora_weights`) and our dreambooth_lora.json marker beside it. The adapters' configs travel in
    the file, so a loader rebuilds the same rank and alpha (not only alpha = rank)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    for name, module in {denoiser_name: denoiser, **text_encoders}.items():
        state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config[ADAPTER_NAME].to_dict()
    pipeline_type.save_lora_weights(
        str(out), weight_name=LORA_WEIGHTS_NAME, safe_serialization=True, **kwargs
    )
    (out / LORA_MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    return out
