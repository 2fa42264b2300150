"""A frozen base in less memory for LoRA training: bf16 weights, or a quantized denoiser (NF4, fp8).

LoRA trains a few million parameters on top of a base it never changes, so the base need not be kept in fp32: in
bf16 it takes half the memory (FLUX.1's 12 B-parameter transformer: 24 GB instead of 48), quantized to 4 bits
(bitsandbytes NF4) or 8 (torchao fp8) a quarter or half of that again, which is what fits FLUX.1 LoRA on a
24-48 GB GPU. The adapters stay fp32 and train under bf16 autocast. Quantizing is CUDA-only and needs its package;
both are checked before any work, with a message saying what to do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from dreambooth_lib.errors import ConfigError

QUANTIZED = {"nf4": "bitsandbytes", "fp8": "torchao"}  # base_precision -> the package that quantizes


def check_base_precision(base_precision: str, device: torch.device, autocast_dtype) -> None:
    """Refuse, naming the setting and the fix, a frozen-base precision this machine cannot train with."""
    if base_precision == "fp32":
        return
    if autocast_dtype is not torch.bfloat16:
        raise ConfigError(
            f"train.base_precision {base_precision} keeps the frozen base in low precision, which trains under "
            "bf16 autocast only; set train.mixed_precision: bf16 (or auto on a GPU with bf16), or base_precision: fp32"
        )
    if base_precision in QUANTIZED:
        package = QUANTIZED[base_precision]
        if device.type != "cuda":
            raise ConfigError(
                f"train.base_precision {base_precision} quantizes the base with {package}, which runs on CUDA "
                f"only (this device: {device.type}); use base_precision: bf16 or fp32 here"
            )
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"train.base_precision {base_precision} needs the {package} package: pip install {package} (in the "
                "CUDA image), or use base_precision: bf16"
            )


def quantized_denoiser(model_dir: Path, denoiser_name: str, base_precision: str) -> Any:
    """The pipeline's denoiser loaded from its folder with diffusers' quantizer for `base_precision` (NF4 via
    bitsandbytes, fp8 weights via torchao), computing in bf16; the pipeline is then loaded around it."""
    import json

    import diffusers

    library, class_name = json.loads((model_dir / "model_index.json").read_text())[denoiser_name]
    if base_precision == "nf4":
        quantization = diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    else:  # fp8 weights, bf16 compute: torchao's config object (diffusers 0.42 takes it, not a name)
        from torchao.quantization import Float8WeightOnlyConfig

        quantization = diffusers.TorchAoConfig(Float8WeightOnlyConfig())
    model_class = getattr(diffusers, class_name)
    return model_class.from_pretrained(
        str(model_dir / denoiser_name), quantization_config=quantization, torch_dtype=torch.bfloat16
    )


def cast_frozen_to_bf16(denoiser: torch.nn.Module) -> None:
    """The frozen weights in bf16 (before the adapters are added: they are made, and trained, in fp32)."""
    denoiser.to(dtype=torch.bfloat16)


def upcast_trainable(module: torch.nn.Module) -> None:
    """Trainable parameters (the adapters) in fp32, whatever the frozen weights' dtype: AdamW's updates of a few
    million parameters cost nothing in fp32 and lose nothing to rounding."""
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
