"""The paper's evaluation metrics (DreamBooth, Ruiz et al. 2023, Sec. 4.1 and 4.3): prompts, embedders, math.

- DINO: mean cosine similarity between the ViT-S/16 DINO embeddings (the CLS token of the last hidden state,
  after the final layernorm; not a pooler) of every generated image and every real subject image. DINO is
  trained without labels, so unlike CLIP it tells apart subjects of the same class: the paper's subject-fidelity
  metric of choice.
- CLIP-I: the same mean pairwise cosine with CLIP image embeddings (the projected image features).
- CLIP-T: prompt fidelity, the mean cosine between each generated image's CLIP embedding and the CLIP text
  embedding of its prompt with the identifier removed ("a dog on the beach"); a raw cosine, not x100.
- PRES (prior preservation, Sec. 4.3): DINO between images of "a [class noun]" sampled from the fine-tuned model
  and the real subject images; lower is better (the model did not turn every dog into the subject).
- DIV (diversity, Sec. 4.3): mean LPIPS distance between images of the same prompt over all unordered pairs,
  averaged over prompts; higher is better.
- The real-image reference: DINO / CLIP-I among the real images themselves, self-pairs excluded (the paper's
  "Real Images" row: 0.774 / 0.885), the ceiling a model can reach.

Preprocessing: DINO follows DINO's own evaluation transform (resize the shorter side to 256 bicubic, centre-crop
224, ImageNet mean/std, scaled to the model's input size); CLIP follows its image processor (shorter side to
the input size bicubic, centre crop, CLIP mean/std), read from the model folder's preprocessor_config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import combinations
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

# The paper's Table 1 (DreamBench, 30 subjects x 25 prompts x 4 images) and Table 3 (PRES/DIV, Imagen).
PAPER_REFERENCE = {
    "real_images": {"dino": 0.774, "clip_i": 0.885},
    "dreambooth_stable_diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "dreambooth_imagen": {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306},
    "prior_preservation_imagen": {
        "pres_with_ppl": 0.493,
        "pres_without_ppl": 0.664,
        "div_with_ppl": 0.391,
        "div_without_ppl": 0.371,
    },
}


# --- prompts ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _prompt_lists() -> dict[str, Any]:
    return json.loads(resources.files("dreambooth_lib").joinpath("assets/prompts.json").read_text())


def paper_prompts(live: bool) -> list[str]:
    """The paper's 25 prompt templates for live subjects (animals) or objects; {0}=identifier, {1}=class noun."""
    return list(_prompt_lists()["live_subject_prompts" if live else "object_prompts"])


def render_prompt(template: str, identifier: str, class_noun: str) -> str:
    return " ".join(template.format(identifier, class_noun).split())


def clip_t_text(template: str, class_noun: str) -> str:
    """The prompt CLIP-T scores against: the identifier removed, whitespace collapsed ("a dog on the beach")."""
    return " ".join(template.format("", class_noun).split())


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


def images_to_lpips_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images as (N, 3, H, W) floats in [-1, 1], the range LPIPS expects."""
    arr = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images]) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


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
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_images(images[start : start + batch_size], self.preprocess).to(self.device)
            chunks.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(chunks)


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
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = preprocess_images(images[start : start + batch_size], self.preprocess).to(self.device)
            chunks.append(_features_tensor(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.cat(chunks)

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


# --- the math --------------------------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosine similarities of every row of `a` with every row of `b` (float64 for stable means)."""
    return _unit(a.double()) @ _unit(b.double()).T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every (a_i, b_j): DINO / CLIP-I of generated images `a` against real images `b`."""
    return float(cosine_matrix(a, b).mean())


def mean_cosine_within(x: torch.Tensor) -> float | None:
    """Mean cosine over every ordered pair (x_i, x_j), i != j: the real-image reference. None for one image."""
    n = x.shape[0]
    if n < 2:
        return None
    sim = cosine_matrix(x, x)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of a_i with b_i (CLIP-T: each image with its own prompt)."""
    return (_unit(a.double()) * _unit(b.double())).sum(dim=-1)


@torch.inference_mode()
def lpips_diversity(lpips_model: Any, images: list[Image.Image], device: str = "cpu") -> float | None:
    """DIV of one prompt: mean LPIPS over all unordered pairs of its images. None below two images."""
    if len(images) < 2:
        return None
    feats = lpips_model.normalized_features(images_to_lpips_tensor(images).to(device))
    pairs = list(combinations(range(len(images)), 2))
    i_idx = torch.tensor([p[0] for p in pairs], device=device)
    j_idx = torch.tensor([p[1] for p in pairs], device=device)
    d = lpips_model.distance_from_features([f[i_idx] for f in feats], [f[j_idx] for f in feats])
    return float(d.double().mean())
