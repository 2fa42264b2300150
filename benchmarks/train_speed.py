"""Training-step benchmark: a diffusers-example-style DreamBooth step against ours, same model, device and process.

The reference is written the way diffusers' examples/dreambooth/train_dreambooth.py runs a step: fp16 autocast
with a GradScaler on CUDA (fp32 on CPU), the VAE and the text encoder run every step, plain AdamW, gradient
clipping at 1.0, the loss read back every step for the progress bar. (Its data is given to it as tensors already
on the device, which flatters it: the script decodes and transforms images in a DataLoader.) Ours is
`train.train_step` itself, on a Trainer from `train.setup_training`: the very code `train.run` runs.
"""

from __future__ import annotations

import copy
import gc
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dreambooth_lib import models
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.train import cuda_graph as graphs
from dreambooth_lib.train import setup_training, train_step
from dreambooth_lib.train.data import load_image
from dreambooth_lib.train.loss import diffusion_target, dreambooth_loss

IDENTIFIER, CLASS_NOUN = "sks", "dog"
NUM_IMAGES = 4  # subject images, and as many prior images


def build_sd15_shaped_pipeline(seed: int = 0):
    """An in-memory pipeline with Stable Diffusion 1.5's shapes and random weights (no download): 860M-parameter
    UNet, 84M VAE, 123M CLIP-L text encoder with the real vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    vocab, _ = models.clip_bpe_vocab_and_merges()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(models.write_clip_tokenizer(tmp)))
    return models.sd_pipeline_from_parts(unet, vae, text_encoder, tokenizer)


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


def _time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> tuple[float, int]:
    """(seconds per step, peak memory bytes) over `steps` steps after `warmup` untimed ones."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return (time.perf_counter() - started) / steps, peak


def bench_train(
    model: str | None = None,
    sd15_shape: bool = False,
    steps: int = 20,
    resolution: int | None = None,
    device: str = "auto",
    *,
    batch_size: int = 1,
    warmup: int = 2,
    mode: str = "full",
    compile: bool = False,
) -> dict[str, Any]:
    """Time the reference step and ours on the same model and device; print a table and return the figures.

    model: a base model URI (default: a fresh tiny model); sd15_shape: an SD-1.5-sized random model instead.
    resolution: None = the model's own (64 px tiny, 512 px SD-1.5). On CPU, peak memory is the process's peak
    RSS, which only grows: ours (measured second) includes the reference's.
    """
    from dreambooth_lib.models.sampling import default_resolution

    dev = torch.device(models.resolve_device(device))
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
        if sd15_shape:
            model_name, base = "sd15-shaped (random weights)", build_sd15_shaped_pipeline()
        else:
            model_name = model or "tiny (random weights)"
            uri = model or str(models.build_tiny_model(Path(tmp) / "tiny"))
            base = models.load_pipeline(uri)
        resolution = resolution or default_resolution(base)
        instance_uris = _write_images(Path(tmp) / "instance", NUM_IMAGES, resolution, seed=1)
        prior_uris = _write_images(Path(tmp) / "prior", NUM_IMAGES, resolution, seed=2)
        config = TrainConfig(
            mode=mode,
            resolution=resolution,
            batch_size=batch_size,
            steps=steps,
            device=str(dev),
            compile=compile,
        )

        reference = reference_step_fn(
            copy.deepcopy(base),
            torch.stack([load_image(u, resolution) for u in instance_uris]),
            torch.stack([load_image(u, resolution) for u in prior_uris]),
            config,
            dev,
        )
        ref_s, ref_peak = _time_steps(reference, steps, warmup, dev)
        del reference
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        trainer = setup_training(
            base, instance_uris, prior_uris, f"a {IDENTIFIER} {CLASS_NOUN}", f"a {CLASS_NOUN}", config, dev
        )
        ours_s, ours_peak = _time_steps(lambda: train_step(trainer), steps, warmup, dev)

    ours_label = f"ours ({trainer.speed.precision}, cached latents, {'fused ' if trainer.speed.fused_adam else ''}AdamW)"
    ref_label = f"diffusers-style ({'fp16+GradScaler' if dev.type == 'cuda' else 'fp32'}, VAE+CLIP per step)"
    result = {
        "model": model_name,
        "device": str(dev),
        "resolution": resolution,
        "batch_size": batch_size,
        "mode": mode,
        "steps": steps,
        "reference_s_per_step": ref_s,
        "ours_s_per_step": ours_s,
        "speedup": ref_s / ours_s if ours_s > 0 else float("inf"),
        "reference_peak_memory_bytes": ref_peak,
        "ours_peak_memory_bytes": ours_peak,
        "peak_memory_kind": "cuda max_memory_allocated"
        if dev.type == "cuda"
        else "process peak RSS (cumulative)",
    }
    width = max(len(ours_label), len(ref_label))
    print(
        f"model: {model_name}   device: {dev}   {resolution} px   {batch_size}+{batch_size} images/step   {steps} steps"
    )
    print(f"{'loop':<{width}}  {'s/step':>8}  {'peak memory':>12}")
    print(f"{ref_label:<{width}}  {ref_s:8.4f}  {ref_peak / 2**30:9.2f} GiB")
    print(f"{ours_label:<{width}}  {ours_s:8.4f}  {ours_peak / 2**30:9.2f} GiB")
    print(
        f"speed-up (reference / ours): {result['speedup']:.2f}x   peak memory: {result['peak_memory_kind']}"
    )
    return result


# --- prior sampling, packed LoRA, and everything in one table ------------------------------------------------------

PRIOR_PROMPT = f"a {CLASS_NOUN}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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
            "peak_memory_bytes": _peak(dev),
            "warm_up_s": warm_up_s,
        }
        del pipe
    figures["speedup"] = figures["ours"]["images_per_s"] / figures["naive"]["images_per_s"]
    if compiled:
        figures["compiled"]["compile_s"] = figures["compiled"]["warm_up_s"]
    return figures


def _packed_step_fn(base, k: int, config: TrainConfig, dev: torch.device, folder: Path, resolution: int):
    """A packed K-subject LoRA step on a copy of `base` (each subject NUM_IMAGES images, one shared prior set)."""
    from dreambooth_lib.train import multi_subject as packed

    prior_uris = _write_images(folder / "prior", NUM_IMAGES, resolution, seed=2)
    subjects, inputs = [], []
    for i in range(k):
        uris = _write_images(folder / f"subject{i}", NUM_IMAGES, resolution, seed=100 + i)
        subjects.append(
            packed.PackedSubject(
                name=f"s{i}",
                instance_dir=str(folder / f"subject{i}"),
                prior_dir=str(folder / "prior"),
                identifier=IDENTIFIER,
                class_noun=CLASS_NOUN,
                out=str(folder / "out" / f"s{i}"),
            )
        )
        inputs.append((uris, prior_uris))
    trainer = packed.setup_packed(copy.deepcopy(base), subjects, inputs, config, dev)
    return lambda: packed.packed_step(trainer)


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
    cuda_graph: train with train.cuda_graph (CUDA only; ignored elsewhere, as in any run)."""
    from dreambooth_lib.config import EvalConfig, IngestConfig, PriorConfig, RunConfig, Subject
    from dreambooth_lib.runs import personalize
    from dreambooth_lib.testing import evaluators

    dev = torch.device(models.resolve_device(str(device)))
    with tempfile.TemporaryDirectory(prefix="dreambooth-e2e-", dir=work_dir) as tmp:
        root = Path(tmp)
        _write_images(root / "photos", NUM_IMAGES, resolution, seed=7)
        config = RunConfig(
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
                learning_rate=1e-4 if mode == "lora" else 5e-6,
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
        _reset_peak(dev)
        started = time.perf_counter()
        result = personalize.run(config)
        _sync(dev)
        wall = time.perf_counter() - started
    return {
        "mode": mode,
        "cuda_graph": cuda_graph and dev.type == "cuda",
        "prior_images": prior_images,
        "train_steps": train_steps,
        "eval_images": eval_prompts * images_per_prompt,
        "wall_time_s": wall,
        "step_times_s": result.step_times_s,
        "peak_memory_bytes": _peak(dev),
    }


def bench_all(
    model: str | None = None,
    sd15_shape: bool = False,
    resolution: int | None = None,
    device: str = "auto",
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
    """Every speed figure for one model on one device, in one process, printed as one Markdown table:
    the diffusers-style step, our full fine-tune step, our LoRA step, the packed K-subject LoRA step for each K
    (s/step and subjects·steps/s), prior sampling (naive vs ours, images/s), and with `e2e` one subject end to end.

    model: a base model URI (default: a fresh tiny model); sd15_shape: an SD-1.5-sized random model instead.
    resolution: None = the model's own (64 px tiny, 512 px SD-1.5). prior_images / prior_batch_size: None = 32 / 16
    on CUDA, 4 / 2 on CPU. e2e_counts: overrides of bench_end_to_end's counts (prior_images, train_steps,
    eval_prompts, images_per_prompt, sample_steps); on CPU the defaults are tiny (4 priors, 10 steps, 2 × 1 images).
    cuda_graph: on CUDA, also time the full and LoRA steps as replayed CUDA graphs (train.cuda_graph), and run
    the end-to-end subject with it. prior_compile: also time prior sampling with a torch.compile'd UNet (minutes
    of compiling, reported in the row). out_markdown: also write the table there (local or gs://), after every
    row, so a run cut off by a time limit still leaves what it measured. Peak memory on CPU is the process's peak
    RSS, which only grows; on CUDA each row's own max_memory_allocated.
    """
    from dreambooth_lib import storage
    from dreambooth_lib.models.sampling import default_resolution

    dev = torch.device(models.resolve_device(device))
    cuda = dev.type == "cuda"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
        root = Path(tmp)
        if sd15_shape:
            model_name, base, model_uri = "sd15-shaped (random weights)", build_sd15_shaped_pipeline(), None
        else:
            model_name = model or "tiny (random weights)"
            model_uri = model or str(models.build_tiny_model(root / "tiny"))
            base = models.load_pipeline(model_uri)
        resolution = resolution or default_resolution(base)
        instance_uris = _write_images(root / "instance", NUM_IMAGES, resolution, seed=1)
        prior_uris = _write_images(root / "prior", NUM_IMAGES, resolution, seed=2)
        full = TrainConfig(mode="full", resolution=resolution, steps=steps, device=str(dev))
        lora_config = full.model_copy(update={"mode": "lora", "learning_rate": 1e-4})

        def partial_table() -> None:
            if out_markdown:
                storage.write_text(out_markdown, render_bench_table(rows, f"model: {model_name} (partial)"))

        def timed(label: str, step_fn_factory, subjects: int = 1, extra_warmup: int = 0) -> None:
            _reset_peak(dev)
            step_fn = step_fn_factory()
            s, peak = _time_steps(step_fn, steps, warmup + extra_warmup, dev)
            rows.append(
                {
                    "row": label,
                    "s_per_step": s,
                    "subject_steps_per_s": subjects / s,
                    "peak_memory_bytes": peak,
                }
            )
            print(f"  {label}: {s:.4f} s/step", flush=True)
            del step_fn
            partial_table()

        pixels = (
            torch.stack([load_image(u, resolution) for u in instance_uris]),
            torch.stack([load_image(u, resolution) for u in prior_uris]),
        )
        timed(
            f"diffusers-style full FT ({'fp16+GradScaler' if cuda else 'fp32'}, VAE+CLIP per step)",
            lambda: reference_step_fn(copy.deepcopy(base), *pixels, full, dev),
        )
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        label = f"ours full FT ({precision}, cached latents{', fused AdamW' if cuda else ''})"

        def ours(config: TrainConfig):
            trainer = setup_training(
                copy.deepcopy(base), instance_uris, prior_uris, f"a {IDENTIFIER} {CLASS_NOUN}", f"a {CLASS_NOUN}",
                config, dev,
            )  # fmt: skip
            if trainer.speed.cuda_graph:  # one eager warm-up step, then capture: the timed steps are replays
                return graphs.GraphedStep(trainer, warmup=1)
            return lambda: train_step(trainer)

        graphed = cuda and cuda_graph
        lora_label = f"ours LoRA r{lora_config.lora_rank} ({precision})"
        for row_label, config in ((label, full), (lora_label, lora_config)):
            timed(row_label, lambda config=config: ours(config))
            if graphed:
                graph_config = config.model_copy(update={"cuda_graph": True})
                timed(f"{row_label} + CUDA graph", lambda c=graph_config: ours(c), extra_warmup=1)
        for k in ks:
            folder = root / f"packed-{k}"
            timed(
                f"packed LoRA, K={k} subjects",
                lambda k=k, folder=folder: _packed_step_fn(base, k, lora_config, dev, folder, resolution),
                subjects=k,
            )

        n_prior = prior_images or (32 if cuda else 4)
        prior = bench_prior(
            base,
            dev,
            num_images=n_prior,
            naive_images=max(2, n_prior // 8),
            steps=prior_steps if cuda else min(prior_steps, 4),
            batch_size=prior_batch_size or (16 if cuda else 2),
            resolution=resolution,
            compiled=prior_compile,
        )
        for label in ("naive", "ours", "compiled")[: 3 if prior_compile else 2]:
            p = prior[label]
            how = "torch.compile, " if label == "compiled" else ""
            compile_note = f"; {p['compile_s']:.0f} s to compile" if label == "compiled" else ""
            rows.append(
                {
                    "row": f"prior sampling, {label} ({how}{p['dtype']}, batch {p['batch_size']}, "
                    f"{prior['steps']} steps{compile_note})",
                    "images_per_s": p["images_per_s"],
                    "peak_memory_bytes": p["peak_memory_bytes"],
                }
            )
        partial_table()

        end_to_end = None
        if e2e:
            counts = (
                {}
                if cuda
                else {
                    "prior_images": 4,
                    "train_steps": 10,
                    "eval_prompts": 2,
                    "images_per_prompt": 1,
                    "sample_steps": 2,
                }
            )
            counts |= e2e_counts or {}
            if model_uri is None:  # the run loads its model from a folder, like any run
                model_uri = str(root / "sd15")
                base.save_pretrained(model_uri, safe_serialization=True)
            del base
            gc.collect()
            end_to_end = bench_end_to_end(
                model_uri,
                dev,
                resolution=resolution,
                mode=e2e_mode,
                cuda_graph=graphed,
                work_dir=tmp,
                **counts,
            )
            rows.append(
                {
                    "row": f"one subject end to end ({e2e_mode}{' + CUDA graph' if graphed else ''}: "
                    f"{end_to_end['prior_images']} priors, "
                    f"{end_to_end['train_steps']} steps, {end_to_end['eval_images']} eval images)",
                    "wall_time_s": end_to_end["wall_time_s"],
                    "peak_memory_bytes": end_to_end["peak_memory_bytes"],
                }
            )

    title = f"model: {model_name}   device: {dev}   {resolution} px   1+1 images/step   {steps} timed steps"
    table = render_bench_table(rows, title)
    print(table)
    if out_markdown:
        storage.write_text(out_markdown, table)
    return {
        "model": model_name,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "resolution": resolution,
        "steps": steps,
        "rows": rows,
        "prior": prior,
        "end_to_end": end_to_end,
        "markdown": table,
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
