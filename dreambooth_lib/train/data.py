"""The training data encoded once: VAE latent distributions of the images and embeddings of the two prompts.

DreamBooth trains on 3-5 subject images and a few hundred prior images, all fixed, with two fixed prompts. Running
the VAE encoder and the text encoder on them every step (as diffusers' example script does) repeats the same work
thousands of times. We encode each image once and keep its latent distribution (mean and std of the VAE's
diagonal Gaussian); each step draws `mean + std * noise` from the training generator, which is exactly
`latent_dist.sample()` — the same distribution, the same augmentation — at the cost of one randn. Everything
stays on the training device, so a step never waits for data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from dreambooth_lib import storage
from dreambooth_lib.errors import IngestError

ENCODE_BATCH = 8  # images per VAE forward while caching: bounds the memory of a 1000-image prior set


@dataclass
class LatentCache:
    """Latent distributions of a set of images, in the VAE's raw (unscaled) space, on the training device."""

    mean: torch.Tensor  # [N, C, h, w]
    std: torch.Tensor  # [N, C, h, w]
    scaling_factor: float
    shift_factor: float = 0.0

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of the images at `indices`, one fresh draw from each one's distribution."""
        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise - self.shift_factor) * self.scaling_factor


@dataclass
class TrainingData:
    """Everything a training step reads: cached latents and the two prompts (token ids and frozen embeddings)."""

    instance: LatentCache
    prior: LatentCache | None  # None: no prior-preservation term
    input_ids: torch.Tensor  # [2, L]: row 0 the instance prompt, row 1 the class prompt
    prompt_embeds: torch.Tensor  # [2, L, D]: the frozen text encoder's output for those rows
    # SDXL's extra UNet conditioning per prompt row: {"text_embeds": [2, D2] pooled, "time_ids": [2, 6]};
    # None on SD 1.x/2.x
    added_cond: dict[str, torch.Tensor] | None = None
    input_ids_2: torch.Tensor | None = None  # SDXL: the same prompts through the second tokenizer


def list_png(folder: str) -> list[str]:
    """The PNG files directly inside a folder (local or gs://), sorted by name."""
    return [u for u in storage.list_files(folder, recursive=False) if u.lower().endswith(".png")]


def load_image(uri: str, resolution: int) -> torch.Tensor:
    """One image as a [3, R, R] float tensor in [-1, 1]; center-cropped to a square and resized when needed."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
    except UnidentifiedImageError:
        raise IngestError(f"{uri}: not an image; re-run ingest on the subject folder") from None
    if image.size != (resolution, resolution):
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_images(
    vae, uris: list[str], resolution: int, device: str | torch.device, *, with_flips: bool = False
) -> LatentCache:
    """Encode image files once into a LatentCache. `with_flips` also caches each image mirrored (N..2N-1), so
    random horizontal flips stay a choice of index instead of a per-step encode."""
    means, stds = [], []
    for start in range(0, len(uris), ENCODE_BATCH):
        pixels = torch.stack([load_image(u, resolution) for u in uris[start : start + ENCODE_BATCH]])
        batches = [pixels, pixels.flip(-1)] if with_flips else [pixels]
        for batch in batches:
            dist = vae.encode(batch.to(device=device, dtype=vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    if with_flips:  # order: all originals, then all mirrors
        means = means[0::2] + means[1::2]
        stds = stds[0::2] + stds[1::2]
    return LatentCache(
        mean=torch.cat(means),
        std=torch.cat(stds),
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
    )


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: str | torch.device):
    """(input_ids [P, L], embeddings [P, L, D]) of the prompts, padded to the tokenizer's max length as in SD."""
    input_ids = _token_ids(tokenizer, prompts, device)
    return input_ids, text_encoder(input_ids)[0].float()


def _token_ids(tokenizer, prompts: list[str], device: str | torch.device) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


@torch.no_grad()
def encode_conditioning(
    pipe, prompts: list[str], device: str | torch.device, resolution: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None, torch.Tensor | None]:
    """(input_ids, prompt embeddings, SDXL's added conditioning or None, SDXL's second tokenizer's input_ids or
    None) of the prompts, as the pipeline itself conditions its UNet at sampling time. SD 1.x/2.x: the text
    encoder's last hidden states. SDXL: the pipeline's own `encode_prompt` (both encoders' penultimate states concatenated, the second's pooled
    projection) and the size/crop ids of a square, uncropped `resolution` image: (R, R, 0, 0, R, R)."""
    from dreambooth_lib.models import is_sdxl

    input_ids, embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, device)
    if not is_sdxl(pipe):
        return input_ids, embeds, None, None
    input_ids_2 = _token_ids(pipe.tokenizer_2, prompts, device)
    pipe.text_encoder_2.to(device).eval()
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    pipe.text_encoder_2.to("cpu")
    size = [resolution, resolution, 0, 0, resolution, resolution]
    time_ids = torch.tensor([size] * len(prompts), device=device, dtype=torch.float32)
    return input_ids, embeds.float(), {"text_embeds": pooled.float(), "time_ids": time_ids}, input_ids_2


def sdxl_text_conditioning(
    text_encoder, text_encoder_2, input_ids: torch.Tensor, input_ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, pooled embeddings) through SDXL's two encoders, differentiably: what the pipeline's
    `encode_prompt` computes (each encoder's penultimate hidden states, concatenated; the second encoder's
    projected pooled output), for training the text encoders."""
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return embeds, second[0]
