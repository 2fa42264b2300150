"""The toy world's probe: a small ViT trained on the generator's own labels (shape, colour, background), saved as
a transformers ViTModel folder so that it also stands in for DINO in evaluation (its features are the CLS token
after the last layernorm, what `DinoEmbedder` reads), with the three linear heads in `probe_heads.safetensors`.

`prompt_following` samples every caption of the world from a diffusers folder and reports how often the probe
reads back what the prompt asked for: the toy world's measure of prompt following.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth_lib.testing.toyworld import world

HEADS_FILE = "probe_heads.safetensors"
LABEL_FILE = "toyworld.json"
ATTRIBUTES = {"shape": world.SHAPES, "color": tuple(world.COLORS), "background": tuple(world.BACKGROUNDS)}


def _vit(seed: int):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=world.SIZE,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        qkv_bias=True,
    )
    return ViTModel(config, add_pooling_layer=False)


def pixels(images) -> torch.Tensor:
    """Images (PIL list or uint8 array) preprocessed exactly as the DINO embedder does for a 32 px ViT."""
    from PIL import Image

    from dreambooth_lib.evaluate.embedders import dino_preprocess, preprocess_images

    if isinstance(images, np.ndarray):
        images = [Image.fromarray(a) for a in images]
    return preprocess_images(images, dino_preprocess(world.SIZE))


class Probe(torch.nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        width = vit.config.hidden_size
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]
        return {k: head(features) for k, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, images, batch: int = 64) -> dict[str, list[str]]:
        """The probe's reading of each image: {"shape": [...], "color": [...], "background": [...]}."""
        self.eval()
        x = pixels(images)
        out: dict[str, list[str]] = {k: [] for k in ATTRIBUTES}
        for i in range(0, len(x), batch):
            logits = self(x[i : i + batch])
            for k, names in ATTRIBUTES.items():
                out[k] += [names[j] for j in logits[k].argmax(-1).tolist()]
        return out


def train_probe(out_dir, images: np.ndarray, labels: np.ndarray, steps: int, seed: int, log=print) -> Path:
    """Train on the world's images (light pixel noise, so that a generated image's grain does not fool it) and
    save the ViT folder with the heads and the label file."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    probe = Probe(_vit(seed))
    x_all = pixels(images)
    y_all = torch.from_numpy(labels).long()
    hold = min(512, len(images) // 4)  # the held-out tail: the probe's accuracy on clean world images
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    probe.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(x_all) - hold, (64,), generator=gen)
        x = x_all[idx] + 0.15 * torch.randn(x_all[idx].shape, generator=gen)
        logits = probe(x)
        loss = sum(F.cross_entropy(logits[k], y_all[idx, i]) for i, k in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"probe {step} loss {loss.item():.4f}")
    probe.eval()
    with torch.no_grad():
        logits = probe(x_all[-hold:])
    held_out = {
        k: float((logits[k].argmax(-1) == y_all[-hold:, i]).float().mean()) for i, k in enumerate(ATTRIBUTES)
    }
    log(f"probe held-out accuracy on world images {held_out}")
    out = Path(out_dir)
    probe.vit.save_pretrained(out, safe_serialization=True)
    save_file({f"{k}.{n}": p.detach().contiguous() for k, h in probe.heads.items() for n, p in h.named_parameters()},
              str(out / HEADS_FILE))  # fmt: skip
    (out / LABEL_FILE).write_text(
        json.dumps(
            {
                "evaluator": "toy-world DINO stand-in",
                "what": "a 3-layer ViT trained to classify the toy world's shape, colour and background; "
                "not DINO: its scores mean something only on toy-world images",
                "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
                "held_out_accuracy": held_out,
            },
            indent=2,
        )
        + "\n"
    )
    return out


def load_probe(probe_dir) -> Probe:
    from safetensors.torch import load_file
    from transformers import ViTModel

    vit = ViTModel.from_pretrained(str(probe_dir), add_pooling_layer=False, torch_dtype=torch.float32)
    probe = Probe(vit)
    heads = load_file(str(Path(probe_dir) / HEADS_FILE))
    probe.heads.load_state_dict({k: v.float() for k, v in heads.items()})
    return probe.eval()


def load_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_following(model_dir, probe_dir, per_caption: int = 4, seed: int = 0, steps: int = 25) -> dict:
    """Sample `per_caption` images of each of the world's captions (the project's sampler: DPM++ 25 steps, the
    pipeline's default guidance) and score the probe's readings against the prompt: accuracy per attribute and
    of all three at once, with chance beside."""
    from dreambooth_lib.models.sampling import image_seed, sample_images

    pipe = load_pipeline(model_dir)
    probe = load_probe(probe_dir)
    wanted = [(s, c, b) for s in world.SHAPES for c in world.COLORS for b in world.BACKGROUNDS]
    prompts = [world.caption(*w) for w in wanted for _ in range(per_caption)]
    seeds = [image_seed(seed, i) for i in range(len(prompts))]
    images = sample_images(pipe, prompts, seeds, steps=steps, resolution=world.SIZE, batch_size=16)
    read = probe.classify(images)
    truth = [w for w in wanted for _ in range(per_caption)]
    result = {}
    for i, k in enumerate(ATTRIBUTES):
        result[k] = round(float(np.mean([t[i] == r for t, r in zip(truth, read[k], strict=True)])), 4)
        result[f"{k}_chance"] = round(1 / len(ATTRIBUTES[k]), 4)
    result["all_three"] = round(
        float(np.mean([t == (a, b, c) for t, a, b, c in zip(truth, read["shape"], read["color"], read["background"], strict=True)])), 4
    )  # fmt: skip
    result["samples"] = len(prompts)
    return result
