"""The image and text embedders the metrics compare: DINO ViT image embeddings and CLIP image / text embeddings,
each with its own preprocessing.

DINO follows DINO's own evaluation transform (resize the shorter side to 256 bicubic, centre-crop 224, ImageNet
mean/std, scaled to the model's input size); CLIP follows its image processor (shorter side to the input size
bicubic, centre crop, CLIP mean/std), read from the model folder's preprocessor_config.json. Both are
reimplemented on PIL because torchvision is not installed beside this project's torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreambooth_lib.errors import ModelLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- preprocessing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize` (bicubic), centre-crop `crop`x`crop`, scale to [0,1], normalize."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def dino_preprocess(image_size: int = 224) -> Preprocess:
    # DINO's eval transform: Resize(256, bicubic) + CenterCrop(224); kept proportional for other input sizes.
    return Preprocess(
        resize=round(image_size * 256 / 224), crop=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


def preprocess_images(images: list[Image.Image], spec: Preprocess) -> torch.Tensor:
    """A float tensor (N, 3, crop, crop) of PIL images, as torchvision's Resize/CenterCrop/Normalize make it."""
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        # torchvision: the shorter side becomes `resize`, the longer int(resize * long / short)
        new_long = int(spec.resize * long / short)
        size = (spec.resize, new_long) if w <= h else (new_long, spec.resize)
        if size != (w, h):
            img = img.resize(size, Image.BICUBIC)
        w, h = img.size
        top = int(round((h - spec.crop) / 2.0))
        left = int(round((w - spec.crop) / 2.0))
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(out)


# --- embedders -------------------------------------------------------------------------------------------------


def _check_model_type(local: Path, expected: tuple[str, ...], uri: str, field: str) -> None:
    """transformers loads a folder of another architecture with random weights and a warning: refuse it here."""
    cfg_path = local / "config.json"
    model_type = json.loads(cfg_path.read_text()).get("model_type") if cfg_path.exists() else None
    if model_type not in expected:
        raise ModelLoadError(
            f"{uri}: {field} must be a {'/'.join(expected)} model folder (config.json model_type), "
            f"found {model_type or 'no config.json'}"
        )


def _features_tensor(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output object (projection in pooler_output) in 5."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def _embed_in_batches(
    images: list[Image.Image],
    spec: Preprocess,
    device: str,
    batch_size: int,
    embed_pixels: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(N, D) float32 CPU embeddings of `images`, preprocessed and embedded `batch_size` at a time."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(images[start : start + batch_size], spec).to(device)
        chunks.append(embed_pixels(pixels).float().cpu())
    return torch.cat(chunks)


class DinoEmbedder:
    """DINO ViT image embeddings: last_hidden_state[:, 0], the CLS token after the final layernorm."""

    def __init__(self, uri: str, device: str = "cpu", allow_pickle: bool = False):
        from transformers import ViTModel

        from dreambooth_lib.models import resolve_model_dir

        local = resolve_model_dir(uri, allow_pickle=allow_pickle)
        _check_model_type(local, ("vit",), uri, "eval.dino_model")
        try:
            self.model = ViTModel.from_pretrained(
                str(local), add_pooling_layer=False, use_safetensors=None if allow_pickle else True
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{uri}: cannot load a DINO ViT model (eval.dino_model): {err}") from None
        self.model.to(device).eval()
        self.device = device
        self.preprocess = dino_preprocess(int(self.model.config.image_size))

    @torch.inference_mode()
    def embed(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        return _embed_in_batches(images, self.preprocess, self.device, batch_size, self._cls_token)

    def _cls_token(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class ClipEmbedder:
    """CLIP image and text embeddings (the projected features that CLIP's contrastive loss compares)."""

    def __init__(self, uri: str, device: str = "cpu", allow_pickle: bool = False):
        from transformers import CLIPModel, CLIPTokenizer

        from dreambooth_lib.models import resolve_model_dir

        local = resolve_model_dir(uri, allow_pickle=allow_pickle)
        _check_model_type(local, ("clip",), uri, "eval.clip_model")
        if not any((local / name).exists() for name in ("tokenizer.json", "vocab.json")):
            raise ModelLoadError(
                f"{uri}: eval.clip_model has no tokenizer (vocab.json or tokenizer.json); "
                "CLIP-T needs CLIP's tokenizer saved beside the model"
            )
        try:
            self.model = CLIPModel.from_pretrained(str(local), use_safetensors=None if allow_pickle else True)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(local))
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"{uri}: cannot load a CLIP model with its tokenizer (eval.clip_model): {err}"
            ) from None
        self.model.to(device).eval()
        self.device = device
        self.preprocess = _clip_preprocess(local, int(self.model.config.vision_config.image_size))

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
        return _embed_in_batches(images, self.preprocess, self.device, batch_size, self._image_features)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features_tensor(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return _features_tensor(out).float().cpu()


def _clip_preprocess(local: Path, image_size: int) -> Preprocess:
    """CLIP's image processing from the folder's preprocessor_config.json; CLIP's published one if absent."""
    cfg_path = local / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    size = cfg.get("size", image_size)
    resize = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
    crop = cfg.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    mean = tuple(cfg.get("image_mean", CLIP_MEAN))
    std = tuple(cfg.get("image_std", CLIP_STD))
    return Preprocess(resize=int(resize), crop=int(crop), mean=mean, std=std)


@lru_cache(maxsize=4)
def dino_embedder(uri: str, device: str = "cpu", allow_pickle: bool = False) -> DinoEmbedder:
    """A cached DinoEmbedder (evaluating the fine-tuned and the base model reuses one)."""
    return DinoEmbedder(uri, device, allow_pickle)


@lru_cache(maxsize=4)
def clip_embedder(uri: str, device: str = "cpu", allow_pickle: bool = False) -> ClipEmbedder:
    return ClipEmbedder(uri, device, allow_pickle)
