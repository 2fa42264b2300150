"""The paper's evaluation metrics (DreamBooth, Ruiz et al. 2023, Sec. 4.1 and 4.3), computed from embeddings.

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

The embedders and their preprocessing are in `dreambooth_lib.evaluate.embedders`, LPIPS in `.lpips`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
from PIL import Image

from dreambooth_lib.evaluate.embedders import ClipEmbedder, DinoEmbedder
from dreambooth_lib.evaluate.lpips import images_to_lpips_tensor

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


# --- one evaluation's scoring ----------------------------------------------------------------------------------


@dataclass
class Scorer:
    """The evaluators and the real images' embeddings, made once per evaluation: every set of generated images
    (the model's, the base model's, PRES) is scored against the same real-image embeddings."""

    dino: DinoEmbedder
    clip: ClipEmbedder
    lpips: Any | None  # an LPIPS model; None leaves DIV uncomputed
    device: str
    real_dino: torch.Tensor
    real_clip: torch.Tensor

    @classmethod
    def for_real_images(
        cls, real: list[Image.Image], dino: DinoEmbedder, clip: ClipEmbedder, lpips: Any | None, device: str
    ) -> Scorer:
        return cls(dino, clip, lpips, device, dino.embed(real), clip.embed_images(real))

    def real_reference(self) -> dict[str, float | None]:
        """DINO / CLIP-I among the real images (self-pairs excluded): the ceiling a model can reach."""
        return {"dino": mean_cosine_within(self.real_dino), "clip_i": mean_cosine_within(self.real_clip)}

    @torch.inference_mode()
    def score_prompts(
        self, groups: list[list[Image.Image]], clip_t_texts: list[str]
    ) -> tuple[list[dict[str, float | None]], dict[str, float | None]]:
        """Per-prompt and overall DINO, CLIP-I, CLIP-T and DIV of one model's images, group i being the images of
        the prompt whose CLIP-T text is clip_t_texts[i]."""
        text_emb = self.clip.embed_texts(clip_t_texts)
        per_prompt, all_dino, all_clip, all_clip_t, divs = [], [], [], [], []
        for i, images in enumerate(groups):
            dino = self.dino.embed(images)
            clip = self.clip.embed_images(images)
            clip_t = paired_cosine(clip, text_emb[i : i + 1].expand(len(images), -1))
            div = lpips_diversity(self.lpips, images, self.device) if self.lpips is not None else None
            all_dino.append(dino)
            all_clip.append(clip)
            all_clip_t.append(clip_t)
            if div is not None:
                divs.append(div)
            per_prompt.append(
                {
                    "dino": mean_pairwise_cosine(dino, self.real_dino),
                    "clip_i": mean_pairwise_cosine(clip, self.real_clip),
                    "clip_t": float(clip_t.mean()),
                    "div": div,
                }
            )
        overall = {
            # every generated image x every real image, pooled over prompts (as the paper averages)
            "dino": mean_pairwise_cosine(torch.cat(all_dino), self.real_dino),
            "clip_i": mean_pairwise_cosine(torch.cat(all_clip), self.real_clip),
            "clip_t": float(torch.cat(all_clip_t).mean()),
            "div": sum(divs) / len(divs) if divs else None,
        }
        return per_prompt, overall

    @torch.inference_mode()
    def pres(self, class_images: list[Image.Image]) -> float | None:
        """PRES: DINO of the fine-tuned model's "a [class noun]" images against the real subject; None without any."""
        return mean_pairwise_cosine(self.dino.embed(class_images), self.real_dino) if class_images else None
