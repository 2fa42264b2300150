"""The training images encoded once: VAE latent distributions of the subject's photos and of its prior set.

DreamBooth trains on 3-5 subject images and a few hundred prior images, all fixed, with two fixed prompts. Running
the VAE encoder on them every step (as diffusers' example script does) repeats the same work thousands of times
(so does the frozen text encoder: its embeddings are cached too, by `ModelFamily.encode_prompts`). We encode each image once and keep its latent distribution (mean and std of the VAE's
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
    """One subject's images as a step reads them: cached latent distributions of its photos and of its prior set."""

    instance: LatentCache
    prior: LatentCache | None  # None: no prior-preservation term


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
