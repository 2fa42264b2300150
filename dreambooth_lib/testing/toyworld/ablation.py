"""DreamBooth on the toy world, measured: the identifier prompt against the class prompt, with and without prior
preservation (the paper's Table 3 in direction, Sec. 4.3).

The subject is a star split yellow | blue; every shape of the world is one colour, so the base model cannot draw
it, and a picture shows it when both colours cover part of it (`world.is_subject`: the subject rate). PRES
and DIV are the project's own metric code on the toy evaluators: PRES the toy DINO (the probe's ViT) between "a
star" samples and the subject's photos; class DIV the LPIPS distance (random-weight LPIPS) among "a star" samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dreambooth_lib.testing.toyworld import world

IDENTIFIER = "sks"


@dataclass
class AblationSettings:
    mode: str = "full"  # or "lora" (rank `lora_rank`)
    lora_rank: int = 8
    steps: int = 400
    learning_rate: float = 5e-4
    batch_size: int = 2
    train_text_encoder: bool = True
    text_encoder_learning_rate: float = 1e-3
    prior_images: int = 16
    samples: int = 12  # per prompt and model
    sample_steps: int = 20
    seed: int = 0


def identifier_prompt(identifier: str = IDENTIFIER) -> str:
    return f"a {identifier} {world.SUBJECT_CLASS}"


def class_prompt() -> str:
    return f"a {world.SUBJECT_CLASS}"


def sample(model: str, prompt: str, n: int, steps: int, seed: int) -> list:
    from dreambooth_lib.models import load_pipeline
    from dreambooth_lib.models.sampling import image_seed, sample_images

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    seeds = [image_seed(seed, i) for i in range(n)]
    return sample_images(pipe, [prompt] * n, seeds, steps=steps, resolution=world.SIZE, batch_size=n)


def class_prior(base: str, out_dir: str | Path, s: AblationSettings) -> Path:
    """The class-prior set as DreamBooth makes it: the base model's own "a star" samples."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(sample(base, class_prompt(), s.prior_images, s.sample_steps, s.seed + 100)):
        image.save(out / f"{i:06d}.png")
    return out


def finetune(base: str, subject_dir, prior_dir, out, s: AblationSettings, prior_loss_weight: float) -> str:
    """A fine-tune (by default full: UNet and text encoder) with the project's training step; λ = 0 without
    prior."""
    from dreambooth_lib import train
    from dreambooth_lib.config import TrainConfig

    config = TrainConfig(
        mode=s.mode,
        lora_rank=s.lora_rank,
        steps=s.steps,
        resolution=world.SIZE,
        learning_rate=s.learning_rate,
        batch_size=s.batch_size,
        train_text_encoder=s.train_text_encoder,
        text_encoder_learning_rate=s.text_encoder_learning_rate,
        prior_loss_weight=prior_loss_weight,
        checkpoint_every=0,
        log_every=100,
        seed=s.seed,
        device="cpu",
    )
    prior = str(prior_dir) if prior_loss_weight > 0 else None
    result = train.run(base, str(subject_dir), prior, IDENTIFIER, world.SUBJECT_CLASS, config, str(out))
    return result.model_uri


def measure(model: str, subject_dir, evaluators: dict[str, str], s: AblationSettings) -> dict[str, float]:
    """Subject rates of the identifier and class prompts, PRES, and the LPIPS diversity of each prompt's samples."""
    from PIL import Image

    from dreambooth_lib.evaluate.embedders import clip_embedder, dino_embedder
    from dreambooth_lib.evaluate.lpips import load_lpips
    from dreambooth_lib.evaluate.scores import Scorer, lpips_diversity

    real = [Image.open(p).convert("RGB") for p in sorted(Path(subject_dir).glob("*.png"))]
    lpips, _ = load_lpips(evaluators["lpips"])
    scorer = Scorer.for_real_images(
        real, dino_embedder(evaluators["dino"]), clip_embedder(evaluators["clip"]), lpips, "cpu"
    )
    with_id = sample(model, identifier_prompt(), s.samples, s.sample_steps, s.seed)
    with_class = sample(model, class_prompt(), s.samples, s.sample_steps, s.seed)
    return {
        "subject_rate_identifier": float(np.mean([world.is_subject(i) for i in with_id])),
        "subject_rate_class": float(np.mean([world.is_subject(i) for i in with_class])),
        "pres": float(scorer.pres(with_class)),
        "div_class": float(lpips_diversity(lpips, with_class)),
        "div_identifier": float(lpips_diversity(lpips, with_id)),
        "dino_identifier": float(scorer.pres(with_id)),  # DINO of the identifier prompt's samples
    }


def run(base: str, evaluators: dict[str, str], out_dir, s: AblationSettings | None = None) -> dict:
    """Fine-tune on the subject's 4 views with λ = 0 and λ = 1 from the same base and seed; measure both and the
    base model: {"settings", "base", "without_prior", "with_prior"}."""
    s = s or AblationSettings()
    out = Path(out_dir)
    subject_dir = world.subject_images(out / "subject", n=4, seed=s.seed)
    prior_dir = class_prior(base, out / "prior", s)
    result = {"settings": asdict(s), "base": measure(base, subject_dir, evaluators, s)}
    for name, weight in (("without_prior", 0.0), ("with_prior", 1.0)):
        model = finetune(base, subject_dir, prior_dir, out / name, s, weight)
        result[name] = measure(model, subject_dir, evaluators, s)
    return result
