"""LoRA adapters (peft) on the UNet's attention projections, and the artifact `models.load_pipeline` reads back.

LoRA trains a low-rank update W + (alpha/r)·B·A of each attention projection and freezes everything else: a few
MB to store per subject instead of a full UNet, less optimizer memory, and the base model stays shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dreambooth_lib.models import LORA_MARKER_NAME, LORA_WEIGHTS_NAME

UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER_NAME = "default"


def lora_alpha(rank: int, alpha: float | None) -> float:
    """None means alpha = rank, i.e. a scale of 1."""
    return float(alpha) if alpha is not None else float(rank)


def add_lora_adapters(unet, text_encoder, rank: int, alpha: float | None) -> None:
    """Freeze the UNet (and the text encoder, if given) and add trainable LoRA adapters to their attention.

    B starts at zero, so the adapted model equals the base model at step 0; A is Gaussian ("gaussian" init, as
    diffusers' DreamBooth LoRA script). Draws come from torch's global RNG: seed it first for repeatable runs.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=lora_alpha(rank, alpha),
            init_lora_weights="gaussian",
            target_modules=UNET_TARGET_MODULES,
        )
    )
    if text_encoder is not None:
        add_text_encoder_adapter(text_encoder, rank, alpha)


def add_text_encoder_adapter(text_encoder, rank: int, alpha: float | None) -> None:
    """Freeze a CLIP text encoder and add trainable LoRA adapters to its attention projections."""
    # peft directly, not transformers' `add_adapter`: transformers 5 refuses peft < 0.22 there, and the
    # adapter is the same LoRA layers either way.
    from peft import LoraConfig, inject_adapter_in_model

    text_encoder.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha(rank, alpha),
        init_lora_weights="gaussian",
        target_modules=TEXT_ENCODER_TARGET_MODULES,
    )
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER_NAME)
    text_encoder._dreambooth_lora_config = config


def lora_state_dict(module, adapter_name: str = ADAPTER_NAME) -> dict:
    """The adapter's weights with peft's key names less the adapter name (what `get_peft_model_state_dict` gives)."""
    return {
        k.replace(f".{adapter_name}.", "."): v.detach()
        for k, v in module.state_dict().items()
        if "lora_" in k and f".{adapter_name}." in k
    }


def save_lora_model(
    out_dir: str | Path,
    unet,
    text_encoder,
    marker: dict[str, Any],
    sdxl: bool = False,
    text_encoder_2=None,
) -> Path:
    """Write pytorch_lora_weights.safetensors (the format `pipe.load_lora_weights` reads) and dreambooth_lora.json.
    sdxl: written by StableDiffusionXLPipeline's writer (the UNet adapter's keys are the same either way)."""
    import json

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "unet_lora_layers": convert_state_dict_to_diffusers(
            get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
        ),
        # the adapter config travels in the file, so a loader rebuilds the same alpha/rank (not only alpha = rank)
        "unet_lora_adapter_metadata": unet.peft_config[ADAPTER_NAME].to_dict(),
    }
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder)
        )
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    if text_encoder_2 is not None:
        kwargs["text_encoder_2_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder_2)
        )
        kwargs["text_encoder_2_lora_adapter_metadata"] = text_encoder_2.peft_config["default"].to_dict()
    writer = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    writer.save_lora_weights(str(out), weight_name=LORA_WEIGHTS_NAME, safe_serialization=True, **kwargs)
    (out / LORA_MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    return out
