"""The toy world's probe: a small CNN trained on the generator's own labels (shape, colour, background), in
`probe.safetensors`; and the toy DINO stand-in, a small ViT trained on the same labels, saved as a transformers
ViTModel folder (its features are the CLS token after the last layernorm, what `DinoEmbedder` reads).

Measured: the ViT learns colour and background at once but shape slowly (54 % held out after 1,500 steps, where
the CNN reaches ~99 % in less time), so the CNN is the classifier and the ViT only an embedding.

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

from dreambooth_lib.artifacts import EVALUATOR_LABEL_NAME
from dreambooth_lib.testing.toyworld import world

HEADS_FILE = "probe_heads.safetensors"  # the ViT's heads (kept for inspection; the CNN is the classifier)
PROBE_FILE = "probe.safetensors"
CONV_PROBE_STEPS = 4000
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


class _Classifier(torch.nn.Module):
    @torch.no_grad()
    def classify(self, images, batch: int = 64) -> dict[str, list[str]]:
        """The reading of each image: {"shape": [...], "color": [...], "background": [...]}."""
        self.eval()
        x = pixels(images)
        out: dict[str, list[str]] = {k: [] for k in ATTRIBUTES}
        for i in range(0, len(x), batch):
            logits = self(x[i : i + batch])
            for k, names in ATTRIBUTES.items():
                out[k] += [names[j] for j in logits[k].argmax(-1).tolist()]
        return out


class ConvProbe(_Classifier):
    """The classifier: four 3x3 conv layers (32 -> 4 px), global average pool, one linear head per attribute."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for out, stride in ((32, 1), (64, 2), (64, 2), (128, 2)):
            layers += [torch.nn.Conv2d(width, out, 3, stride, 1), torch.nn.GroupNorm(8, out), torch.nn.SiLU()]
            width = out
        self.body = torch.nn.Sequential(*layers)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(pixel_values).mean(dim=(2, 3))
        return {k: head(features) for k, head in self.heads.items()}


class Probe(_Classifier):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        width = vit.config.hidden_size
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]
        return {k: head(features) for k, head in self.heads.items()}


def _fit(
    probe,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int,
    log,
    name: str,
    lr: float = 1e-3,
    warmup: int = 0,
) -> dict:
    """Train on the world's images (light pixel noise, so that a generated image's grain does not fool it);
    returns the accuracy on a held-out tail."""
    x_all = pixels(images)
    y_all = torch.from_numpy(labels).long()
    hold = min(512, len(images) // 4)  # the held-out tail: the probe's accuracy on clean world images
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    probe.train()
    for step in range(steps):
        for g in opt.param_groups:
            ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
            g["lr"] = lr * ramp * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(x_all) - hold, (64,), generator=gen)
        x = x_all[idx] + 0.15 * torch.randn(x_all[idx].shape, generator=gen)
        logits = probe(x)
        loss = sum(F.cross_entropy(logits[k], y_all[idx, i]) for i, k in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"{name} {step} loss {loss.item():.4f}")
    probe.eval()
    with torch.no_grad():
        logits = probe(x_all[-hold:])
    held_out = {
        k: float((logits[k].argmax(-1) == y_all[-hold:, i]).float().mean()) for i, k in enumerate(ATTRIBUTES)
    }
    log(f"{name} held-out accuracy on world images {held_out}")
    return held_out


def train_probe(
    out_dir,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int,
    log=print,
    conv_steps: int = CONV_PROBE_STEPS,
) -> Path:
    """The CNN classifier (`probe.safetensors`) and the ViT DINO stand-in (a ViTModel folder with its heads and
    label file), both trained on the world's labels, written to `out_dir`."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    conv = ConvProbe()
    # shape comes last and slowly (66 % held out after 1,500 steps at 1e-3): the CNN gets more steps
    conv_held_out = _fit(conv, images, labels, conv_steps, seed, log, "probe", lr=2e-3, warmup=100)
    torch.manual_seed(seed)
    probe = Probe(_vit(seed))
    held_out = _fit(probe, images, labels, steps, seed, log, "dino stand-in")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, str(out / PROBE_FILE))
    probe.vit.save_pretrained(out, safe_serialization=True)
    save_file({f"{k}.{n}": p.detach().contiguous() for k, h in probe.heads.items() for n, p in h.named_parameters()},
              str(out / HEADS_FILE))  # fmt: skip
    (out / EVALUATOR_LABEL_NAME).write_text(
        json.dumps(
            {
                "evaluator": "toy-world DINO stand-in",
                "what": "a 3-layer ViT trained to classify the toy world's shape, colour and background; "
                "not DINO: its scores mean something only on toy-world images. probe.safetensors beside it is "
                "the attribute classifier (a small CNN) that measures prompt following",
                "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
                "held_out_accuracy": held_out,
                "probe_held_out_accuracy": conv_held_out,
            },
            indent=2,
        )
        + "\n"
    )
    return out


def load_probe(probe_dir) -> ConvProbe:
    """The attribute classifier saved beside the DINO stand-in."""
    from safetensors.torch import load_file

    probe = ConvProbe()
    probe.load_state_dict({k: v.float() for k, v in load_file(str(Path(probe_dir) / PROBE_FILE)).items()})
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
