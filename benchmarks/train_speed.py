"""Training-step benchmark: a diffusers-example-style DreamBooth step against ours, same model, device and process.

The reference is written the way diffusers' examples/dreambooth/train_dreambooth.py runs a step: fp16 autocast
with a GradScaler on CUDA (fp32 on CPU), the VAE and the text encoder run every step, plain AdamW, gradient
clipping at 1.0, the loss read back every step for the progress bar. (Its data is given to it as tensors already
on the device, which flatters it: the script decodes and transforms images in a DataLoader.) Ours is
`train.train_step` itself, on a Trainer from `train.setup_training`: the very code `train.run` runs.

The functions return their figures and print only progress, on stderr; `python -m benchmarks` prints the tables.
"""

from __future__ import annotations

import copy
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreambooth_lib import models
from dreambooth_lib.config import DEFAULT_LEARNING_RATES, TrainConfig
from dreambooth_lib.models.families.sd import diffusion_target
from dreambooth_lib.train import TrainSubject
from dreambooth_lib.train.data import load_image
from dreambooth_lib.train.loss import dreambooth_loss
from dreambooth_lib.train.step import train_step
from dreambooth_lib.train.trainer import Trainer, setup_trainer

IDENTIFIER, CLASS_NOUN = "sks", "dog"
NUM_IMAGES = 4  # subject images, and as many prior images
PRIOR_PROMPT = f"a {CLASS_NOUN}"
TINY_MODEL_NAME = "tiny (random weights)"
SD15_MODEL_NAME = "sd15-shaped (random weights)"


def clip_l_config(num_hidden_layers: int):
    """CLIP ViT-L/14's text encoder (SD 1.x's, FLUX.1's pooled one) with the real vocabulary and `num_hidden_layers`."""
    from transformers import CLIPTextConfig

    vocab, _ = models.clip_bpe_vocab_and_merges()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def build_sd15_shaped_pipeline(seed: int = 0):
    """An in-memory pipeline with Stable Diffusion 1.5's shapes and random weights (no download): 860M-parameter
    UNet, 84M VAE, 123M CLIP-L text encoder with the real vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dreambooth_lib.models.families import StableDiffusion

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(clip_l_config(num_hidden_layers=12))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(models.write_clip_tokenizer(tmp)))
    return StableDiffusion.pipeline_from_parts(unet, vae, text_encoder, tokenizer)


def _write_images(folder: Path, n: int, resolution: int, seed: int) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uris = []
    for i in range(n):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        uris.append(str(folder / f"{i:02d}.png"))
    return uris


@dataclass
class BenchModel:
    """The base pipeline every row works on a copy of, and the subject and prior images it trains on."""

    name: str
    pipe: Any
    uri: str | None  # None: built in memory (the SD-1.5-shaped model), saved only if a row needs a folder
    folder: Path  # a scratch folder for this benchmark's files
    resolution: int
    instance_uris: list[str]
    prior_uris: list[str]

    def pixels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Subject and prior images as tensors: the reference step's input, decoded once."""
        return (
            torch.stack([load_image(u, self.resolution) for u in self.instance_uris]),
            torch.stack([load_image(u, self.resolution) for u in self.prior_uris]),
        )


@dataclass(frozen=True)
class BaseChoice:
    """The base model a benchmark times, and where: `model` (a URI; None: a fresh tiny model) or, with
    `sd15_shape`, an SD-1.5-sized random one, at `resolution` (None: the model's own, 64 px tiny, 512 px SD-1.5),
    on `device`."""

    model: str | None = None
    sd15_shape: bool = False
    resolution: int | None = None
    device: str = "auto"

    def torch_device(self) -> torch.device:
        return torch.device(models.resolve_device(self.device))


def prepare_model(choice: BaseChoice, folder: Path) -> BenchModel:
    """The base model of `choice` and its images in `folder`."""
    from dreambooth_lib.models.sampling import default_resolution
    from dreambooth_lib.testing.tiny_models import build_tiny_model

    if choice.sd15_shape:
        name, pipe, uri = SD15_MODEL_NAME, build_sd15_shaped_pipeline(), None
    else:
        name = choice.model or TINY_MODEL_NAME
        uri = choice.model or str(build_tiny_model(folder / "tiny"))
        pipe = models.load_pipeline(uri)
    resolution = choice.resolution or default_resolution(pipe)
    return BenchModel(
        name=name,
        pipe=pipe,
        uri=uri,
        folder=folder,
        resolution=resolution,
        instance_uris=_write_images(folder / "instance", NUM_IMAGES, resolution, seed=1),
        prior_uris=_write_images(folder / "prior", NUM_IMAGES, resolution, seed=2),
    )


def reference_step_fn(
    pipe, instance: torch.Tensor, prior: torch.Tensor, config: TrainConfig, device: torch.device
):
    """A step as diffusers' train_dreambooth.py runs it (see the module docstring). Returns a step function."""
    from diffusers import DDPMScheduler

    cuda = device.type == "cuda"
    weight_dtype = torch.float16 if cuda else torch.float32  # the script's --mixed_precision fp16 on GPUs
    vae, text_encoder, unet = pipe.vae, pipe.text_encoder, pipe.unet
    vae.requires_grad_(False).to(device, dtype=weight_dtype)
    text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    unet.requires_grad_(True).to(device).train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    bs = config.batch_size
    prompts = [f"a {IDENTIFIER} {CLASS_NOUN}"] * bs + [f"a {CLASS_NOUN}"] * bs
    input_ids = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    instance, prior = instance.to(device), prior.to(device)

    def step() -> float:
        pixel_values = torch.cat(
            [instance[torch.randint(len(instance), (bs,))], prior[torch.randint(len(prior), (bs,))]]
        )
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            latents = (
                vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
            )
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
            )
            noisy = scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(input_ids)[0]
            pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            target = diffusion_target(scheduler, latents, noise, timesteps)
            loss = dreambooth_loss(pred[:bs], target[:bs], pred[bs:], target[bs:], config.prior_loss_weight)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()  # the script logs the loss every step

    return step


def reference_label(device: torch.device, name: str = "diffusers-style") -> str:
    return f"{name} ({'fp16+GradScaler' if device.type == 'cuda' else 'fp32'}, VAE+CLIP per step)"


# --- timing --------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _time_steps(
    step: Callable[[], Any],
    steps: int,
    warmup: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, int]:
    """(seconds per step, peak memory bytes) over `steps` steps after `warmup` untimed ones."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    started = clock()
    for _ in range(steps):
        step()
    _sync(device)
    return (clock() - started) / steps, models.peak_memory_bytes(device)


def time_row(
    label: str,
    step: Callable[[], Any],
    steps: int,
    warmup: int,
    device: torch.device,
    subjects: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """One training row: s/step over `steps` timed steps, and subjects·steps/s (a step trains `subjects`)."""
    s, peak = _time_steps(step, steps, warmup, device, clock)
    return {"row": label, "s_per_step": s, "subject_steps_per_s": subjects / s, "peak_memory_bytes": peak}


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- one training step, reference against ours --------------------------------------------------------------------


def bench_train(
    choice: BaseChoice = BaseChoice(), steps: int = 20, *, warmup: int = 2, **train_options: Any
) -> dict[str, Any]:
    """Time the reference step and ours on the same model and device; return the figures (`render_train_table`).

    train_options: TrainConfig fields both steps train with (mode, batch_size, compile, ...). On CPU, peak memory
    is the process's peak RSS, which only grows: ours (measured second) includes the reference's.
    """
    dev = choice.torch_device()
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
        bm = prepare_model(choice, Path(tmp))
        base, resolution, instance_uris, prior_uris = bm.pipe, bm.resolution, bm.instance_uris, bm.prior_uris
        config = TrainConfig(resolution=resolution, steps=steps, device=str(dev), **train_options)
        reference = reference_step_fn(copy.deepcopy(base), *bm.pixels(), config, dev)
        ref_s, ref_peak = _time_steps(reference, steps, warmup, dev)
        del reference
        _reset_peak(dev)

        trainer = ours_trainer(base, [(instance_uris, prior_uris)], config, dev)
        ours_s, ours_peak = _time_steps(lambda: train_step(trainer), steps, warmup, dev)

    return {
        "model": bm.name,
        "device": str(dev),
        "resolution": resolution,
        "batch_size": config.batch_size,
        "mode": config.mode,
        "steps": steps,
        "reference": reference_label(dev),
        "ours": f"ours ({trainer.speed.precision}, cached latents, "
        f"{'fused ' if trainer.speed.fused_adam else ''}AdamW)",
        "reference_s_per_step": ref_s,
        "ours_s_per_step": ours_s,
        "speedup": ref_s / ours_s if ours_s > 0 else float("inf"),
        "reference_peak_memory_bytes": ref_peak,
        "ours_peak_memory_bytes": ours_peak,
        "peak_memory_kind": "cuda max_memory_allocated"
        if dev.type == "cuda"
        else "process peak RSS (cumulative)",
    }


def render_train_table(result: dict[str, Any]) -> str:
    """bench_train's figures as a plain-text table with the speed-up."""
    r = result
    width = max(len(r["ours"]), len(r["reference"]))
    lines = [
        f"model: {r['model']}   device: {r['device']}   {r['resolution']} px   "
        f"{r['batch_size']}+{r['batch_size']} images/step   {r['steps']} steps",
        f"{'loop':<{width}}  {'s/step':>8}  {'peak memory':>12}",
        f"{r['reference']:<{width}}  {r['reference_s_per_step']:8.4f}  "
        f"{r['reference_peak_memory_bytes'] / 2**30:9.2f} GiB",
        f"{r['ours']:<{width}}  {r['ours_s_per_step']:8.4f}  {r['ours_peak_memory_bytes'] / 2**30:9.2f} GiB",
        f"speed-up (reference / ours): {r['speedup']:.2f}x   peak memory: {r['peak_memory_kind']}",
    ]
    return "\n".join(lines) + "\n"


# --- prior sampling ------------------------------------------------------------------------------------------------


def bench_prior(
    base,
    device: str | torch.device = "auto",
    *,
    num_images: int = 32,
    naive_images: int = 4,
    steps: int = 25,
    batch_size: int = 16,
    resolution: int | None = None,
    guidance_scale: float | None = None,
    compiled: bool = False,
) -> dict[str, Any]:
    """Images/s of class-prior sampling, two ways, same pipeline weights, same process, same sampler and steps:
    naive (fp32, one image per call, as a plain `pipe(prompt)` loop) and ours (prior.run's path: fp16 on CUDA,
    `batch_size` images per call through sampling.sample_images). On CPU both are fp32 (no fast fp16 kernels);
    only the batching differs. One untimed warm-up call each. Classifier-free guidance is on in both.
    compiled: a third way, "compiled": ours plus sampling.compile_for_sampling (torch.compile'd UNet,
    channels-last on CUDA); its warm-up call, which compiles, is reported as `compile_s`."""
    from dreambooth_lib.models import sampling

    dev = torch.device(models.resolve_device(str(device)))
    resolution = resolution or sampling.default_resolution(base)
    figures: dict[str, Any] = {"steps": steps, "resolution": resolution, "batch_size": batch_size}
    ours_dtype = models.resolve_dtype("auto", str(dev))
    ways = [("naive", torch.float32, naive_images, 1), ("ours", ours_dtype, num_images, batch_size)]
    if compiled:
        ways.append(("compiled", ours_dtype, num_images, batch_size))
    for label, dtype, n, bs in ways:
        pipe = copy.deepcopy(base).to(dev, dtype)
        pipe.set_progress_bar_config(disable=True)
        if label == "compiled":
            sampling.compile_for_sampling(pipe)
        _reset_peak(dev)

        def sample(count: int, first_seed: int, pipe=pipe, bs=bs) -> None:
            seeds = [sampling.image_seed(0, first_seed + i) for i in range(count)]
            sampling.sample_images(
                pipe,
                [PRIOR_PROMPT] * count,
                seeds,
                steps=steps,
                guidance_scale=guidance_scale,
                resolution=resolution,
                batch_size=bs,
            )

        warm_started = time.perf_counter()
        sample(bs, 10_000)  # warm-up: kernels, allocator, scheduler set-up (and compiling)
        _sync(dev)
        warm_up_s = time.perf_counter() - warm_started
        started = time.perf_counter()
        sample(n, 0)
        _sync(dev)
        elapsed = time.perf_counter() - started
        figures[label] = {
            "images": n,
            "batch_size": bs,
            "dtype": str(dtype).removeprefix("torch."),
            "images_per_s": n / elapsed,
            "peak_memory_bytes": models.peak_memory_bytes(dev),
            "warm_up_s": warm_up_s,
        }
        del pipe
    figures["speedup"] = figures["ours"]["images_per_s"] / figures["naive"]["images_per_s"]
    if compiled:
        figures["compiled"]["compile_s"] = figures["compiled"]["warm_up_s"]
    return figures


def prior_ways(figures: dict[str, Any]) -> list[str]:
    """The ways bench_prior timed, in its order: naive, ours, and compiled when it was asked for."""
    return [way for way in ("naive", "ours", "compiled") if way in figures]


def prior_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """bench_prior's figures as rows of the one table (images/s and peak memory)."""
    rows = []
    for way in prior_ways(figures):
        p = figures[way]
        how = "torch.compile, " if way == "compiled" else ""
        compile_note = f"; {p['compile_s']:.0f} s to compile" if way == "compiled" else ""
        rows.append(
            {
                "row": f"prior sampling, {way} ({how}{p['dtype']}, batch {p['batch_size']}, "
                f"{figures['steps']} steps{compile_note})",
                "images_per_s": p["images_per_s"],
                "peak_memory_bytes": p["peak_memory_bytes"],
            }
        )
    return rows


def render_prior_table(figures: dict[str, Any]) -> str:
    """bench_prior's figures as their own Markdown table, with each way's warm-up (for compiled: compiling)."""
    lines = [
        f"| prior sampling, {figures['resolution']} px, {figures['steps']} steps | images/s | warm-up s | "
        "peak memory GiB |",
        "|---|---:|---:|---:|",
    ]
    for way in prior_ways(figures):
        f = figures[way]
        lines.append(
            f"| {way} ({f['dtype']}, batch {f['batch_size']}) | {f['images_per_s']:.2f} | {f['warm_up_s']:.1f} | "
            f"{f['peak_memory_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


# --- packed LoRA and one subject end to end ------------------------------------------------------------------------


def ours_trainer(pipe, inputs: list[tuple[list[str], list[str]]], config: TrainConfig, dev) -> Trainer:
    """Our trainer for K = len(inputs) subjects (instance URIs, prior URIs) on `pipe`, set up as `train.run` (K=1)
    or a pack (K>1) sets it up."""
    subjects = [
        TrainSubject(
            name=f"s{i}", instance_dir="", prior_dir="", identifier=IDENTIFIER, class_noun=CLASS_NOUN, out=""
        )
        for i in range(len(inputs))
    ]
    return setup_trainer(pipe, subjects, inputs, config, dev)


def _packed_step_fn(base, k: int, config: TrainConfig, dev: torch.device, folder: Path, resolution: int):
    """A packed K-subject LoRA step on a copy of `base` (each subject NUM_IMAGES images, one shared prior set)."""
    prior_uris = _write_images(folder / "prior", NUM_IMAGES, resolution, seed=2)
    inputs = [
        (_write_images(folder / f"subject{i}", NUM_IMAGES, resolution, seed=100 + i), prior_uris)
        for i in range(k)
    ]
    trainer = ours_trainer(copy.deepcopy(base), inputs, config, dev)
    return lambda: train_step(trainer)


def _end_to_end_config(root: Path, model_uri: str, dev: torch.device, resolution: int, *, mode: str,
                       prior_images: int, train_steps: int, eval_prompts: int, images_per_prompt: int,
                       sample_steps: int, prior_batch_size: int, cuda_graph: bool):  # fmt: skip
    """The RunConfig of bench_end_to_end's subject: photos under `root`, tiny random DINO and CLIP evaluators."""
    from dreambooth_lib.config import EvalConfig, IngestConfig, PriorConfig, RunConfig, Subject
    from dreambooth_lib.testing import evaluators

    _write_images(root / "photos", NUM_IMAGES, resolution, seed=7)
    return RunConfig(
        base_model=model_uri,
        subject=Subject(name="bench", class_noun=CLASS_NOUN, images=str(root / "photos")),
        run_dir=str(root / "run"),
        ingest=IngestConfig(resolution=resolution, min_side=min(256, resolution)),
        prior=PriorConfig(
            num_images=prior_images, steps=sample_steps, batch_size=prior_batch_size, device=str(dev)
        ),
        train=TrainConfig(
            mode=mode,
            steps=train_steps,
            resolution=resolution,
            checkpoint_every=0,
            log_every=max(train_steps // 10, 1),
            device=str(dev),
            cuda_graph=cuda_graph,
        ),
        eval=EvalConfig(
            max_prompts=eval_prompts,
            images_per_prompt=images_per_prompt,
            pres_images=0,
            steps=sample_steps,
            batch_size=prior_batch_size,
            dino_model=str(evaluators.build_tiny_dino(root / "dino")),
            clip_model=str(evaluators.build_tiny_clip(root / "clip")),
            device=str(dev),
        ),
        samples_per_prompt=0,
    )


def bench_end_to_end(
    model_uri: str,
    device: str | torch.device = "auto",
    *,
    resolution: int,
    mode: str = "lora",
    prior_images: int = 200,
    train_steps: int = 1000,
    eval_prompts: int = 25,
    images_per_prompt: int = 4,
    sample_steps: int = 25,
    prior_batch_size: int = 16,
    cuda_graph: bool = False,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """One subject through `dreambooth run` (personalize.run): ingest → identifier → `prior_images` priors →
    `train_steps` steps → evaluation (`eval_prompts` × `images_per_prompt` images). The DINO and CLIP evaluators
    are tiny random models (nothing is downloaded): the real ViT-S/16 and CLIP B/32 cost a few seconds more.
    cuda_graph: train with train.cuda_graph (CUDA only; ignored elsewhere, as in any run). The counts reported
    are what the run recorded (its prior set, its training summary, its metrics.json), not what was asked."""
    from dreambooth_lib import storage
    from dreambooth_lib.artifacts import METRICS_NAME, RUN_PRIOR_NAME, SUMMARY_NAME
    from dreambooth_lib.runs import personalize

    dev = torch.device(models.resolve_device(str(device)))
    with tempfile.TemporaryDirectory(prefix="dreambooth-e2e-", dir=work_dir) as tmp:
        config = _end_to_end_config(
            Path(tmp), model_uri, dev, resolution, mode=mode, prior_images=prior_images, train_steps=train_steps,
            eval_prompts=eval_prompts, images_per_prompt=images_per_prompt, sample_steps=sample_steps,
            prior_batch_size=prior_batch_size, cuda_graph=cuda_graph,
        )  # fmt: skip
        _reset_peak(dev)
        started = time.perf_counter()
        result = personalize.run(config)
        _sync(dev)
        wall = time.perf_counter() - started
        run_dir = config.run_dir
        prior_record = storage.read_json(storage.join(run_dir, RUN_PRIOR_NAME))
        train_record = storage.read_json(storage.join(run_dir, "train", SUMMARY_NAME))
        eval_record = storage.read_json(storage.join(run_dir, "eval", METRICS_NAME))
    return {
        "mode": mode,
        "cuda_graph": cuda_graph and dev.type == "cuda",
        "prior_images": len(prior_record["images"]),
        "train_steps": train_record["steps"],
        "eval_images": eval_record["counts"]["generated"],
        "wall_time_s": wall,
        "step_times_s": result.step_times_s,
        "peak_memory_bytes": models.peak_memory_bytes(dev),
    }


# --- every figure in one table -------------------------------------------------------------------------------------


class BenchTable:
    """The rows measured so far; rewritten to `out_markdown` after every row, so a run cut off by a time limit
    still leaves what it measured."""

    def __init__(self, title: str, out_markdown: str | None) -> None:
        self.title = title
        self.out_markdown = out_markdown
        self.rows: list[dict[str, Any]] = []

    def add(self, *rows: dict[str, Any]) -> None:
        for row in rows:
            self.rows.append(row)
            shown = f"{row['s_per_step']:.4f} s/step" if "s_per_step" in row else "done"
            _progress(f"  {row['row']}: {shown}")
        self.write(self.title + " (partial)")

    def write(self, title: str) -> str:
        table = render_bench_table(self.rows, title)
        if self.out_markdown:
            from dreambooth_lib import storage

            storage.write_text(self.out_markdown, table)
        return table


def _training_rows(
    bm: BenchModel, dev: torch.device, table: BenchTable, *, steps: int, warmup: int,
    ks: tuple[int, ...], cuda_graph: bool,
) -> None:  # fmt: skip
    """The diffusers-style step, our full and LoRA steps (each also as a CUDA graph with `cuda_graph` on CUDA),
    and the packed K-subject LoRA step for each K."""
    cuda = dev.type == "cuda"
    base, resolution, instance_uris, prior_uris = bm.pipe, bm.resolution, bm.instance_uris, bm.prior_uris
    full = TrainConfig(mode="full", resolution=resolution, steps=steps, device=str(dev))
    lora_config = full.model_copy(update={"mode": "lora", "learning_rate": DEFAULT_LEARNING_RATES["lora"]})

    def timed(
        label: str, make_step: Callable[[], Callable[[], Any]], subjects: int = 1, extra_warmup: int = 0
    ):
        _reset_peak(dev)
        step = make_step()
        table.add(time_row(label, step, steps, warmup + extra_warmup, dev, subjects))
        del step

    pixels = bm.pixels()
    timed(
        reference_label(dev, "diffusers-style full FT"),
        lambda: reference_step_fn(copy.deepcopy(base), *pixels, full, dev),
    )

    def ours(config: TrainConfig):
        trainer = ours_trainer(copy.deepcopy(base), [(instance_uris, prior_uris)], config, dev)
        if trainer.speed.cuda_graph:  # one eager warm-up step, then capture: the timed steps are replays
            return cuda_graph.GraphedStep(trainer, warmup=1)
        return lambda: train_step(trainer)

    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    full_label = f"ours full FT ({precision}, cached latents{', fused AdamW' if cuda else ''})"
    lora_label = f"ours LoRA r{lora_config.lora_rank} ({precision})"
    for row_label, config in ((full_label, full), (lora_label, lora_config)):
        timed(row_label, lambda config=config: ours(config))
        if cuda and cuda_graph:
            graph_config = config.model_copy(update={"cuda_graph": True})
            timed(f"{row_label} + CUDA graph", lambda c=graph_config: ours(c), extra_warmup=1)
    for k in ks:
        folder = bm.folder / f"packed-{k}"
        timed(
            f"packed LoRA, K={k} subjects",
            lambda k=k, folder=folder: _packed_step_fn(base, k, lora_config, dev, folder, resolution),
            subjects=k,
        )


# CPU end-to-end counts: tiny, so the row takes seconds; on CUDA bench_end_to_end's defaults (the issue-6 run)
CPU_END_TO_END_COUNTS = {
    "prior_images": 4,
    "train_steps": 10,
    "eval_prompts": 2,
    "images_per_prompt": 1,
    "sample_steps": 2,
}


def _end_to_end_row(
    bm: BenchModel, dev: torch.device, table: BenchTable, *, mode: str, cuda_graph: bool,
    counts: dict[str, int] | None,
) -> dict[str, Any]:  # fmt: skip
    """One subject end to end on the benchmark's model (saved to a folder first if it lives in memory only)."""
    graphed = cuda_graph and dev.type == "cuda"
    if bm.uri is None:  # the run loads its model from a folder, like any run
        bm.uri = str(bm.folder / "sd15")
        bm.pipe.save_pretrained(bm.uri, safe_serialization=True)
    bm.pipe = None  # the run loads its own copy
    gc.collect()
    figures = bench_end_to_end(
        bm.uri,
        dev,
        resolution=bm.resolution,
        mode=mode,
        cuda_graph=graphed,
        work_dir=bm.folder,
        **(({} if dev.type == "cuda" else CPU_END_TO_END_COUNTS) | (counts or {})),
    )
    table.add(
        {
            "row": f"one subject end to end ({mode}{' + CUDA graph' if graphed else ''}: "
            f"{figures['prior_images']} priors, {figures['train_steps']} steps, "
            f"{figures['eval_images']} eval images)",
            "wall_time_s": figures["wall_time_s"],
            "peak_memory_bytes": figures["peak_memory_bytes"],
        }
    )
    return figures


def bench_all(
    choice: BaseChoice = BaseChoice(),
    steps: int = 10,
    ks: tuple[int, ...] = (1, 4, 8, 16),
    e2e: bool = False,
    *,
    warmup: int = 2,
    prior_images: int | None = None,
    prior_steps: int = 25,
    prior_batch_size: int | None = None,
    e2e_mode: str = "lora",
    e2e_counts: dict[str, int] | None = None,
    cuda_graph: bool = True,
    prior_compile: bool = False,
    out_markdown: str | None = None,
) -> dict[str, Any]:
    """Every speed figure for one model on one device, in one process, as one Markdown table (`markdown`):
    the diffusers-style step, our full fine-tune step, our LoRA step, the packed K-subject LoRA step for each K
    (s/step and subjects·steps/s), prior sampling (naive vs ours, images/s), and with `e2e` one subject end to end.

    prior_images / prior_batch_size: None = 32 / 16 on CUDA, 4 / 2 on CPU. e2e_counts: overrides of
    bench_end_to_end's counts (prior_images, train_steps, eval_prompts, images_per_prompt, sample_steps); on CPU
    the defaults are tiny (CPU_END_TO_END_COUNTS).
    cuda_graph: on CUDA, also time the full and LoRA steps as replayed CUDA graphs (train.cuda_graph), and run
    the end-to-end subject with it. prior_compile: also time prior sampling with a torch.compile'd UNet (minutes
    of compiling, reported in the row). out_markdown: also write the table there (local or gs://), after every
    row. Peak memory on CPU is the process's peak RSS, which only grows; on CUDA each row's own
    max_memory_allocated. Progress goes to stderr; nothing is printed on stdout.
    """
    dev = choice.torch_device()
    cuda = dev.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
        bm = prepare_model(choice, Path(tmp))
        title = (
            f"model: {bm.name}   device: {dev}   {bm.resolution} px   1+1 images/step   {steps} timed steps"
        )
        table = BenchTable(title, out_markdown)
        _training_rows(bm, dev, table, steps=steps, warmup=warmup, ks=ks, cuda_graph=cuda_graph)
        n_prior = prior_images or (32 if cuda else 4)
        prior = bench_prior(
            bm.pipe,
            dev,
            num_images=n_prior,
            naive_images=max(2, n_prior // 8),
            steps=prior_steps if cuda else min(prior_steps, 4),
            batch_size=prior_batch_size or (16 if cuda else 2),
            resolution=bm.resolution,
            compiled=prior_compile,
        )
        table.add(*prior_rows(prior))
        end_to_end = (
            _end_to_end_row(bm, dev, table, mode=e2e_mode, cuda_graph=cuda_graph, counts=e2e_counts)
            if e2e
            else None
        )
    return {
        "model": bm.name,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "resolution": bm.resolution,
        "steps": steps,
        "rows": table.rows,
        "prior": prior,
        "end_to_end": end_to_end,
        "markdown": table.write(title),
    }


def render_bench_table(rows: list[dict[str, Any]], title: str) -> str:
    """One Markdown table: s/step and subjects·steps/s for training rows, images/s for prior rows, wall time for
    the end-to-end row, and peak memory for all."""

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else ""

    lines = [
        f"{title}",
        "",
        "| | s/step | subjects·steps/s | images/s | wall time s | peak memory GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['row']} | {cell(row, 's_per_step', '.4f')} | {cell(row, 'subject_steps_per_s', '.2f')} | "
            f"{cell(row, 'images_per_s', '.2f')} | {cell(row, 'wall_time_s', '.1f')} | "
            f"{row['peak_memory_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"
