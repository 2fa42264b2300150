"""Fidelity against diffusers' examples/dreambooth/train_dreambooth.py: does our full fine-tune learn as it does?

    python -m benchmarks.fidelity --anchor PATH/train_dreambooth.py [--seeds 4] [--steps 60] [--lr 5e-6]

The anchor script is not part of this repository: pass the path of a copy (diffusers' repository,
examples/dreambooth/train_dreambooth.py). It runs in this process, unchanged, through its own `parse_args` and
`main`, with four things around it: a stand-in for the few torchvision transforms it imports (identities at the
training resolution, which is the images' size; torchvision is not installed here), an Accelerator without
trackers that keeps the loss it logs each step, no progress bar, and (for the matched-draw check) a recorder on
`DDPMScheduler.add_noise`, the one call that sees every random draw of its step: the scaled VAE latents, the noise
and the timesteps.

What it measures, on a tiny random-weight model (dreambooth_lib.testing), fp32, CPU, batch size 1, prior
preservation, the same learning rate and steps for both:

1. matched draws: our step (`step_on_batch`, the code `train.run` runs) fed the anchor's own draws, step by step.
   Equal losses and weights (to float rounding) mean the two do the same math; what is left is how they draw.
2. per seed, both trainers as shipped (ours through `train.run`): the training-loss drop, 1 - mean(last 10 steps)
   / mean(first 10 steps) (the issue's figure), and the drop of a low-noise held-out loss: Eq. 2 of the base
   and the trained UNet on one fixed bank of draws (every image, stratified timesteps, fixed noise), the same
   bank for every run.
3. the same for our trainer with the anchor's sampling (`--variants epochs`): images drawn from shuffled epochs
   (a DataLoader(shuffle=True) over max(#instance, #class) indices, instance i % #instance paired with class
   i % #class) instead of with replacement, by patching `step.draw_batch` in this process only.

The library never imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

IDENTIFIER, CLASS_NOUN = "sks", "box"
INSTANCE_PROMPT, CLASS_PROMPT = f"a {IDENTIFIER} {CLASS_NOUN}", f"a {CLASS_NOUN}"
WINDOW = 10  # steps averaged at each end of the training-loss curve
BANK_SEED = 1234  # the held-out bank's draws: the same for every run of every trainer
BANK_ROWS = 64  # instance/class row pairs in the held-out bank


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the data: a tiny model, a subject, a class set ---------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    model: str
    instance_dir: str
    class_dir: str
    resolution: int
    num_instance: int
    num_class: int


def prepare(root: Path, num_instance: int = 4, num_class: int = 8, resolution: int = 64) -> Setup:
    """A tiny SD model whose UNet works at resolution/2 latents, `num_instance` subject photos (a red square) and
    `num_class` class photos (squares of other colours), all at the training resolution."""
    from dreambooth_lib.testing.synthetic import make_subject_images
    from dreambooth_lib.testing.tiny_models import build_tiny_model

    model = build_tiny_model(root / "model", seed=0, sample_size=resolution // 2)
    inst = make_subject_images(root / "instance", n=num_instance, size=resolution, seed=1)
    cls = root / "class"
    colors = [(30, 30, 220), (30, 200, 30), (220, 200, 30), (150, 30, 200)]
    for i in range(num_class):  # one image per folder call, named so that sorted order is a stable labelling
        tmp = make_subject_images(
            root / f"_class{i}", n=1, size=resolution, color=colors[i % 4], seed=100 + i
        )
        cls.mkdir(parents=True, exist_ok=True)
        (tmp / "00.png").rename(cls / f"{i:02d}.png")
        tmp.rmdir()
    return Setup(str(model), str(inst), str(cls), resolution, num_instance, num_class)


def _png(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix == ".png")


# --- the anchor: diffusers' script, run in this process ------------------------------------------------------------


def _torchvision_stub() -> types.ModuleType:
    """The transforms train_dreambooth.py builds, exact where the image already has the training size (Resize and
    crops are then identities; anything else is refused rather than approximated)."""
    import numpy as np

    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tr = types.ModuleType("torchvision.transforms")
    tr.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)

    class InterpolationMode:
        BILINEAR = "bilinear"

    def _same_size(size):
        def check(img):
            if img.size != (size, size):
                raise ValueError(f"fidelity harness: images must already be {size}x{size}, got {img.size}")
            return img

        return check

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    def to_tensor(img):  # torchvision's ToTensor for an RGB PIL image: CHW float in [0, 1]
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean[0], std[0]

        def __call__(self, x):
            return (x - self.mean) / self.std

    tr.InterpolationMode = InterpolationMode
    tr.Compose = Compose
    tr.Resize = lambda size, interpolation=None: _same_size(size)
    tr.CenterCrop = _same_size
    tr.RandomCrop = _same_size
    tr.ToTensor = lambda: to_tensor
    tr.Normalize = Normalize
    tv.transforms = tr
    return tv


def load_anchor(path: str) -> types.ModuleType:
    """The anchor script as a module (its `main` not run)."""
    # everything the script imports that looks for torchvision is imported before the stand-in exists
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import AutoTokenizer, CLIPTextModel  # noqa: F401

    stub = _torchvision_stub()
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms")}
    sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms})
    try:
        spec = importlib.util.spec_from_file_location("fidelity_anchor_train_dreambooth", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@dataclass
class AnchorDraw:
    latents: torch.Tensor  # [2, C, h, w]: the instance row, then the class row (scaled VAE samples)
    noise: torch.Tensor
    timesteps: torch.Tensor
    images: list[str]  # file names of its instance and class image
    vae_noise: torch.Tensor  # the standard normal draw of its latent_dist.sample()


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run_anchor(
    anchor: types.ModuleType, s: Setup, seed: int, steps: int, lr: float, out: Path, record: bool = False
) -> tuple[list[float], list[AnchorDraw]]:
    """Run the anchor script once; its per-step losses, and its draws when `record`. Its model lands in out/."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    losses: list[float] = []
    draws: list[AnchorDraw] = []
    pending_images: list[str] = []
    pending_vae_noise: list[torch.Tensor] = []

    class RecordingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "log_with": None})

        def log(self, values, step=None, log_kwargs=None):
            losses.append(float(values["loss"]))

    original_add_noise = DDPMScheduler.add_noise

    def recording_add_noise(self, original_samples, noise, timesteps):
        draws.append(AnchorDraw(original_samples.detach().clone(), noise.clone(), timesteps.clone(),
                                pending_images[:2], pending_vae_noise.pop()))  # fmt: skip
        del pending_images[:2]  # (accelerate's loader fetches one batch ahead: a queue, oldest first)
        return original_add_noise(self, original_samples, noise, timesteps)

    original_sample = DiagonalGaussianDistribution.sample

    def recording_sample(self, generator=None):
        x = original_sample(self, generator)
        pending_vae_noise.append(((x - self.mean) / self.std).detach().clone())
        return x

    original_getitem = anchor.DreamBoothDataset.__getitem__

    def recording_getitem(self, index):
        pending_images.append(Path(self.instance_images_path[index % self.num_instance_images]).name)
        pending_images.append(Path(self.class_images_path[index % self.num_class_images]).name)
        return original_getitem(self, index)

    args = anchor.parse_args(
        [
            f"--pretrained_model_name_or_path={s.model}",
            f"--instance_data_dir={s.instance_dir}",
            f"--class_data_dir={s.class_dir}",
            "--with_prior_preservation",
            "--prior_loss_weight=1.0",
            f"--num_class_images={s.num_class}",
            f"--instance_prompt={INSTANCE_PROMPT}",
            f"--class_prompt={CLASS_PROMPT}",
            f"--resolution={s.resolution}",
            "--train_batch_size=1",
            f"--learning_rate={lr}",
            "--lr_scheduler=constant",
            "--lr_warmup_steps=0",
            f"--max_train_steps={steps}",
            f"--checkpointing_steps={steps + 1}",
            f"--seed={seed}",
            "--mixed_precision=no",
            f"--output_dir={out}",
        ]
    )
    AcceleratorState._reset_state()
    GradientState._reset_state()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(anchor, "Accelerator", RecordingAccelerator))
        stack.enter_context(_patched(anchor, "tqdm", lambda *a, **k: tqdm(*a, **{**k, "disable": True})))
        stack.enter_context(_patched(diffusers_logging, "set_verbosity_info", lambda: None))  # its log: noise
        logging.getLogger(anchor.__name__).setLevel(logging.WARNING)
        if record:
            stack.enter_context(_patched(DDPMScheduler, "add_noise", recording_add_noise))
            stack.enter_context(_patched(anchor.DreamBoothDataset, "__getitem__", recording_getitem))
            stack.enter_context(_patched(DiagonalGaussianDistribution, "sample", recording_sample))
        anchor.main(args)
    return losses, draws


# --- ours ----------------------------------------------------------------------------------------------------------


def our_config(seed: int, steps: int, lr: float, resolution: int):
    from dreambooth_lib.config import TrainConfig

    return TrainConfig(
        mode="full",
        steps=steps,
        learning_rate=lr,
        resolution=resolution,
        batch_size=1,
        prior_loss_weight=1.0,
        seed=seed,
        mixed_precision="no",
        device="cpu",
        checkpoint_every=0,
        log_every=1,
    )


SAMPLINGS = ("replacement", "epochs", "replacement-crn", "epochs-crn")


def sampled_draw_batch(sampling: str, index_seed: int = 0) -> Callable:
    """`step.draw_batch` with another way of picking images (the latent noise, noise and timesteps are drawn as
    ours draws them, from the subject's generator):

    - "epochs": the anchor's sampling: indices from a shuffled epoch of max(#instance, #prior), instance
      i % #instance beside prior i % #prior, a new permutation each epoch (a DataLoader(shuffle=True));
    - "replacement-crn" / "epochs-crn": ours (torch.randint, with replacement) / the anchor's, with the indices
      from a generator of their own (seeded `index_seed`): common random numbers, so two runs of the same seed
      differ in the images they pick and in nothing else.
    """
    queues: dict[int, list[int]] = {}
    own: dict[int, torch.Generator] = {}

    def draw_batch(data, gen, bs, t):
        device = t.speed.device
        prior = t.prior_loss_weight > 0
        index_gen = own.setdefault(id(gen), torch.Generator(device).manual_seed(index_seed)) \
            if sampling.endswith("-crn") else gen  # fmt: skip
        if sampling.startswith("replacement"):
            picks = [torch.randint(len(data.instance), (bs,), generator=index_gen, device=device)]
            if prior:
                picks.append(torch.randint(len(data.prior), (bs,), generator=index_gen, device=device))
        else:
            length = max(len(data.instance), len(data.prior) if prior else 0)
            queue = queues.setdefault(id(gen), [])
            picked = []
            while len(picked) < bs:
                if not queue:
                    queue.extend(torch.randperm(length, generator=index_gen, device=device).tolist())
                picked.append(queue.pop(0))
            index = torch.tensor(picked, device=device)
            picks = [index % len(data.instance)] + ([index % len(data.prior)] if prior else [])
        latents = [data.instance.sample(picks[0], gen)]
        if prior:
            latents.append(data.prior.sample(picks[1], gen))
        latents = torch.cat(latents)
        noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
        timesteps = t.family.draw_timesteps(t.noise_scheduler, latents.shape[0], gen, device)
        return latents, noise, timesteps

    return draw_batch


def run_ours(
    s: Setup, seed: int, steps: int, lr: float, out: Path, sampling: str = "replacement"
) -> list[float]:
    """train.run as shipped (sampling="replacement") or with another sampling (`sampled_draw_batch`); its
    per-step losses."""
    from dreambooth_lib.train import run
    from dreambooth_lib.train import step as step_module

    draw = (
        step_module.draw_batch if sampling == "replacement" else sampled_draw_batch(sampling, 10_000 + seed)
    )
    with _patched(step_module, "draw_batch", draw):
        result = run(s.model, s.instance_dir, s.class_dir, IDENTIFIER, CLASS_NOUN,
                     our_config(seed, steps, lr, s.resolution), str(out))  # fmt: skip
    return [loss for _, loss in result.losses]


# --- 1. matched draws ------------------------------------------------------------------------------------------------


def _trainer(s: Setup, seed: int, steps: int, lr: float):
    from dreambooth_lib import models
    from dreambooth_lib.train.subjects import TrainSubject
    from dreambooth_lib.train.trainer import setup_trainer

    pipe = models.load_pipeline(s.model)
    subject = TrainSubject(instance_dir=s.instance_dir, prior_dir=s.class_dir, identifier=IDENTIFIER,
                           class_noun=CLASS_NOUN, out="unused")  # fmt: skip
    config = our_config(seed, steps, lr, s.resolution)
    return setup_trainer(pipe, [subject], [(_png(s.instance_dir), _png(s.class_dir))], config, "cpu")


def _unet_params(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def replaying_draw_batch(draws: list[AnchorDraw], s: Setup, latent_errors: list[float]) -> Callable:
    """`step.draw_batch` that returns the anchor's draws, step by step: its noise and timesteps, and latents made
    by our cache (LatentCache.sample's formula) from the same images with the anchor's VAE noise."""
    inst_names = [Path(p).name for p in _png(s.instance_dir)]
    cls_names = [Path(p).name for p in _png(s.class_dir)]
    queue = list(draws)

    def draw_batch(data, gen, bs, t):
        d = queue.pop(0)
        i, c = inst_names.index(d.images[0]), cls_names.index(d.images[1])
        mean = torch.cat([data.instance.mean[i : i + 1], data.prior.mean[c : c + 1]])
        std = torch.cat([data.instance.std[i : i + 1], data.prior.std[c : c + 1]])
        latents = (mean + std * d.vae_noise - data.instance.shift_factor) * data.instance.scaling_factor
        latent_errors.append(float((latents - d.latents).abs().max() / d.latents.abs().max()))
        return latents, d.noise, d.timesteps

    return draw_batch


def matched_draws(anchor, s: Setup, seed: int, steps: int, lr: float, root: Path) -> dict[str, Any]:
    """The anchor's run, then `train.run` on the anchor's recorded draws; how far apart losses and weights end."""
    from dreambooth_lib.train import run
    from dreambooth_lib.train import step as step_module

    anchor_losses, draws = run_anchor(anchor, s, seed, steps, lr, root / "anchor", record=True)
    latent_errors: list[float] = []
    with _patched(step_module, "draw_batch", replaying_draw_batch(draws, s, latent_errors)):
        result = run(s.model, s.instance_dir, s.class_dir, IDENTIFIER, CLASS_NOUN,
                     our_config(seed, steps, lr, s.resolution), str(root / "ours"))  # fmt: skip
    ours = [loss for _, loss in result.losses]
    start = _unet_params(Path(s.model))
    ours_end, anchor_end = _unet_params(root / "ours" / "model"), _unet_params(root / "anchor")
    update = math.sqrt(sum(float((anchor_end[k] - start[k]).pow(2).sum()) for k in start))
    gap = math.sqrt(sum(float((anchor_end[k] - ours_end[k]).pow(2).sum()) for k in start))
    loss_rel = max(abs(a - b) / abs(a) for a, b in zip(anchor_losses, ours, strict=True))
    return {
        "steps": len(draws),
        "max_rel_latent_diff": max(latent_errors),
        "max_rel_loss_diff": loss_rel,
        "weight_gap_over_update": gap / update,
        "update_norm": update,
        "anchor_losses": anchor_losses,
        "our_losses": ours,
    }


# --- 2. the held-out loss --------------------------------------------------------------------------------------------


class HeldOut:
    """Eq. 2 on one fixed bank of draws: every instance and class image in turn, stratified timesteps over the
    whole schedule, fixed VAE and diffusion noise. The same bank scores every UNet."""

    def __init__(self, s: Setup):
        t = _trainer(s, 0, 1, 1e-6)
        self.t = t
        data, gen = t.data[0], torch.Generator().manual_seed(BANK_SEED)
        rows = torch.arange(BANK_ROWS)
        self.latents = torch.cat(
            [
                data.instance.sample(rows % len(data.instance), gen),
                data.prior.sample(rows % len(data.prior), gen),
            ]
        )
        self.noise = torch.randn(self.latents.shape, generator=gen)
        n = t.noise_scheduler.config.num_train_timesteps
        strata = (torch.arange(BANK_ROWS) * n) // BANK_ROWS
        jitter = torch.randint(0, n // BANK_ROWS, (2 * BANK_ROWS,), generator=gen)
        self.timesteps = torch.cat([strata, strata[torch.randperm(BANK_ROWS, generator=gen)]]) + jitter
        sched = t.noise_scheduler  # DDPM: the tiny model's (and the anchor's) noising and target, spelt out
        self.inputs = sched.add_noise(self.latents, self.noise, self.timesteps)
        self.targets = (
            self.noise
            if sched.config.prediction_type == "epsilon"
            else sched.get_velocity(self.latents, self.noise, self.timesteps)
        )
        embeds = t.prompts.embeds  # row 0: the instance prompt, row 1: the class prompt
        self.embeds = torch.cat(
            [embeds[0:1].expand(BANK_ROWS, -1, -1), embeds[1:2].expand(BANK_ROWS, -1, -1)]
        )
        self.base = self.score(None)

    @torch.no_grad()
    def score(self, params: dict[str, torch.Tensor] | None) -> float:
        unet = self.t.denoiser
        saved = {k: v.clone() for k, v in unet.state_dict().items()} if params is not None else None
        if params is not None:
            unet.load_state_dict(params)
        unet.eval()
        preds = []
        for lo in range(0, 2 * BANK_ROWS, 32):
            hi = lo + 32
            preds.append(
                unet(self.inputs[lo:hi], self.timesteps[lo:hi], self.embeds[lo:hi], return_dict=False)[0]
            )
        pred = torch.cat(preds)
        if saved is not None:
            unet.load_state_dict(saved)
        b = BANK_ROWS  # Eq. 2 with lambda = 1, as both trainers are run
        return float(F.mse_loss(pred[:b], self.targets[:b]) + F.mse_loss(pred[b:], self.targets[b:]))


# --- 3. per-seed runs and the table --------------------------------------------------------------------------------


def drop(losses: list[float], window: int = WINDOW) -> float:
    """The issue's figure: 1 - mean(last `window` losses) / mean(first `window`)."""
    return 1 - statistics.fmean(losses[-window:]) / statistics.fmean(losses[:window])


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def compare(
    anchor_path: str,
    seeds: list[int],
    steps: int,
    lr: float,
    variants: list[str],
    root: Path,
    num_class: int = 8,
    resolution: int = 64,
    matched: bool = True,
) -> dict[str, Any]:
    s = prepare(root / "data", num_class=num_class, resolution=resolution)
    anchor = load_anchor(anchor_path) if matched or "anchor" in variants else None
    result: dict[str, Any] = {"steps": steps, "lr": lr, "seeds": seeds, "setup": s.__dict__}
    if matched:
        _progress("matched draws: the anchor, then train.run on its draws")
        result["matched"] = matched_draws(anchor, s, seeds[0], steps, lr, root / "matched")
    held = HeldOut(s)
    result["held_out_base"] = held.base
    runs: dict[str, list[dict[str, Any]]] = {v if v == "anchor" else f"ours-{v}": [] for v in variants}
    for seed in seeds:
        for name in runs:
            started = time.perf_counter()
            out = root / f"{name}-{seed}"
            if name == "anchor":
                losses, _ = run_anchor(anchor, s, seed, steps, lr, out)
                params = _unet_params(out)
            else:
                losses = run_ours(s, seed, steps, lr, out, sampling=name.removeprefix("ours-"))
                params = _unet_params(out / "model")
            score = held.score(params)
            runs[name].append({"seed": seed, "train_drop": drop(losses), "held_out": score,
                               "held_out_drop": 1 - score / held.base, "losses": losses})  # fmt: skip
            _progress(f"seed {seed} {name}: train drop {runs[name][-1]['train_drop']:+.4f}, held-out "
                      f"{score:.5f} ({time.perf_counter() - started:.0f} s)")  # fmt: skip
    result["runs"] = runs
    result["summary"] = summarize(runs)
    return result


def _block_means(rows: list[dict[str, Any]], key: str, size: int) -> list[float]:
    return [
        statistics.fmean(r[key] for r in rows[i : i + size]) for i in range(0, len(rows) - size + 1, size)
    ]


def summarize(runs: dict[str, list[dict[str, Any]]], block: int = 4) -> dict[str, Any]:
    """Means ± standard errors; every run minus the reference (the anchor, else the first), seed by seed; and what
    an experiment of `block` seeds sees: the relative gap 1 - drop/drop(reference) of each block of seeds, beside
    the same gap between disjoint blocks of the reference's own seeds (the noise of such an experiment)."""
    keys = ("train_drop", "held_out_drop")
    ref_name = "anchor" if "anchor" in runs else next(iter(runs))
    ref = runs[ref_name]
    summary: dict[str, Any] = {"reference": ref_name, "block": block}
    for name, rows in runs.items():
        summary[name] = {k: _mean_se([r[k] for r in rows]) for k in keys}
        for k in keys:
            if name != ref_name:
                summary[name][f"{k}_minus_ref"] = _mean_se(
                    [r[k] - a[k] for r, a in zip(rows, ref, strict=True)]
                )
                summary[name][f"{k}_block_gaps"] = [
                    1 - o / a
                    for o, a in zip(_block_means(rows, k, block), _block_means(ref, k, block), strict=True)
                ]
            else:
                means = _block_means(ref, k, block)
                summary[name][f"{k}_block_gaps"] = [
                    1 - means[j] / means[i] for i in range(len(means)) for j in range(i + 1, len(means))
                ]
    return summary


def render(result: dict[str, Any]) -> str:
    lines = [f"fidelity vs diffusers train_dreambooth.py: {result['steps']} steps, lr {result['lr']:g}, "
             f"{len(result['seeds'])} seeds, tiny SD, fp32 CPU, batch 1 + prior"]  # fmt: skip
    if "matched" in result:
        m = result["matched"]
        lines += [
            "",
            "matched draws (train.run fed the anchor's images, VAE noise, noise and timesteps, step by step):",
            f"  latents from our cache vs the anchor's: max relative difference {m['max_rel_latent_diff']:.2e}",
            f"  max relative loss difference "
            f"{m['max_rel_loss_diff']:.2e}; |weights(ours) - weights(anchor)| / |update| = "
            f"{m['weight_gap_over_update']:.2e}",
        ]
    names = list(result["runs"])
    lines += ["", "loss drop per seed: training curve 1 - last10/first10 | held-out bank 1 - trained/base",
              "seed  " + "  ".join(f"{n:>24}" for n in names)]  # fmt: skip
    for i, seed in enumerate(result["seeds"]):
        cells = [
            f"{r[i]['train_drop']:+8.2%} | {r[i]['held_out_drop']:+8.3%}" for r in result["runs"].values()
        ]
        lines.append(f"{seed:<4}  " + "  ".join(f"{c:>24}" for c in cells))
    lines.append("mean  " + "  ".join(
        f"{result['summary'][n]['train_drop'][0]:+8.2%} | {result['summary'][n]['held_out_drop'][0]:+8.3%}"
        for n in names))  # fmt: skip
    lines.append("±se   " + "  ".join(
        f"{result['summary'][n]['train_drop'][1]:8.2%} | {result['summary'][n]['held_out_drop'][1]:8.3%}"
        for n in names))  # fmt: skip
    lines.append("")
    ref = result["summary"]["reference"]
    for n in names:
        if n == ref:
            continue
        sm = result["summary"][n]
        (td, tse), (hd, hse) = sm["train_drop_minus_ref"], sm["held_out_drop_minus_ref"]
        lines.append(f"{n} - {ref}, paired by seed: training drop {td:+.2%} ± {tse:.2%} (se, t = "
                     f"{td / tse:+.1f}); held-out drop {hd:+.3%} ± {hse:.3%} (se, t = {hd / hse:+.1f})")  # fmt: skip
    block = result["summary"]["block"]
    if len(result["seeds"]) >= 2 * block:
        lines += [
            "",
            f"what a {block}-seed experiment sees: relative gap 1 - drop/drop({ref}), per block of seeds",
        ]
        for n in names:
            for k, label in (("train_drop", "training"), ("held_out_drop", "held-out")):
                gaps = result["summary"][n][f"{k}_block_gaps"]
                who = f"{n} vs {ref}" if n != ref else f"{ref} vs {ref} (disjoint seeds)"
                lines.append(f"  {who:<36} {label:<8}: {len(gaps):>2} gaps, mean {statistics.fmean(gaps):+7.2%}, "
                             f"sd {statistics.pstdev(gaps):6.2%}, range {min(gaps):+7.2%} .. {max(gaps):+7.2%}")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--anchor", help="path of diffusers' examples/dreambooth/train_dreambooth.py")
    p.add_argument("--from-json", help="print the table of an earlier run's --json file (runs nothing)")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-6, help="both trainers' learning rate (ours' full default)")
    p.add_argument("--class-images", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--variants", default="anchor,replacement",
                   help="comma list: anchor (diffusers' script); ours with replacement (as shipped), epochs (the "
                   "anchor's sampling patched in), replacement-crn, epochs-crn (the two with common random numbers)")  # fmt: skip
    p.add_argument("--no-matched", action="store_true", help="skip the matched-draw check")
    p.add_argument("--json", dest="json_out", help="also write every figure (per-step losses too) here")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    if a.from_json:
        result = json.loads(Path(a.from_json).read_text())
        result["summary"] = summarize(result["runs"])
        print(render(result), end="")
        return 0

    from dreambooth_lib.cli import quiet_libraries

    quiet_libraries()
    logging.getLogger("dreambooth_lib").setLevel(logging.WARNING)  # else a log line per step of every run
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    variants = [v for v in a.variants.split(",") if v]
    if unknown := set(variants) - {"anchor", *SAMPLINGS}:
        p.error(f"--variants: unknown {sorted(unknown)}")
    if (not a.no_matched or "anchor" in variants) and not a.anchor:
        p.error("--anchor PATH is needed (diffusers' examples/dreambooth/train_dreambooth.py)")
    with contextlib.ExitStack() as stack:
        root = Path(a.workdir) if a.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        result = compare(a.anchor, seeds, a.steps, a.lr, variants, root, a.class_images, a.resolution,
                         matched=not a.no_matched)  # fmt: skip
    print(render(result), end="")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
