"""Tiny random-weight evaluator models (DINO ViT, CLIP, LPIPS) for tests and the offline demo.

They have the real models' formats (a ViTModel folder, a CLIPModel folder with the real 49408-token tokenizer
and an image-processor config, an LPIPS safetensors file of the documented layout), so evaluation runs through
exactly the loading and preprocessing code it uses on the published weights. All safetensors, deterministic in
`seed`. Their scores mean nothing; they exercise the code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The size of every tiny evaluator's transformer: DINO's ViT and CLIP's text and vision towers alike.
TINY_TRANSFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def label_evaluator(path: str | Path, evaluator: str, what: str) -> None:
    """Write the label the report shows for a stand-in evaluator: inside its folder, or beside its file."""
    from dreambooth_lib.evaluate.evaluation import evaluator_label_uri

    label = Path(evaluator_label_uri(str(path)))
    label.write_text(json.dumps({"evaluator": evaluator, "what": what}, indent=2) + "\n")


RANDOM = "random weights: a test stand-in whose scores mean nothing"


def build_tiny_dino(out_dir: str | Path, seed: int = 0) -> Path:
    """A 2-layer ViT of the DINO ViT-S/16 layout (patch 16, 224 px input), hidden size 32, 2 heads."""
    from transformers import ViTConfig, ViTModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(image_size=224, patch_size=16, intermediate_size=64, qkv_bias=True, **TINY_TRANSFORMER)
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(out, safe_serialization=True)
    label_evaluator(out, "tiny random-weight ViT (DINO layout)", RANDOM)
    return out


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A 2-layer CLIP (vision patch 32 at 224 px, text with the real 49408-token vocabulary), its tokenizer and
    CLIP's published image-processor settings."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dreambooth_lib.models import clip_bpe_vocab_and_merges, write_clip_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, _ = clip_bpe_vocab_and_merges()
    config = CLIPConfig(
        text_config={
            **TINY_TRANSFORMER,
            "vocab_size": len(vocab),
            "intermediate_size": 37,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={**TINY_TRANSFORMER, "image_size": 224, "patch_size": 32, "intermediate_size": 37},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out)
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3
    ).save_pretrained(out)
    label_evaluator(out, "tiny random-weight CLIP", RANDOM)
    return out


def build_tiny_lpips(out_path: str | Path, seed: int = 0, net: str = "alex") -> Path:
    """An LPIPS weights file (backbone + lin heads) with random He-scaled weights, in the published layout."""
    from dreambooth_lib.evaluate.lpips import random_lpips_state, save_lpips_weights

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_lpips_weights(random_lpips_state(net, seed), net, str(out))
    label_evaluator(out, "random-weight LPIPS", RANDOM)
    return out


def build_tiny_evaluators(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """All three under `out_dir` (dino/, clip/, lpips.safetensors): their paths by metric family."""
    out = Path(out_dir)
    return {
        "dino": str(build_tiny_dino(out / "dino", seed=seed)),
        "clip": str(build_tiny_clip(out / "clip", seed=seed)),
        "lpips": str(build_tiny_lpips(out / "lpips.safetensors", seed=seed)),
    }
