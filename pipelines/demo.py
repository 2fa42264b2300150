"""`make demo`: the embedded default, end to end through kfp.local — no cluster, no Docker, no downloads.

Runs the `personalize` pipeline on one subject and a 2-subject `batch_personalize` with kfp.local's
SubprocessRunner (the same component code a cluster runs, each task a subprocess of this venv), and prints where
the registered model, the metrics and report.html are. Two worlds to run on:

- `toyworld` (the default): the toy text-to-image model trained here on CPU and shipped with the package
  (`dreambooth_lib.testing.toyworld`: 32 px shapes, colours, backgrounds), with its toy evaluators. The subject
  is a star split yellow | blue, which the base model never draws; report.html shows "a [V] star on a ...
  background" rendering it while "a star" stays varied. The metrics mean something on the toy world only.
- `tiny`: a tiny random-weight model (real CLIP vocabulary) with random-weight evaluators and coloured-square
  subjects: every picture is noise; the tests and the container runs use it to exercise every step quickly.

    python -m pipelines.demo                       # the toy world, everything, into demo-out/
    python -m pipelines.demo --world tiny --skip-batch
    python -m pipelines.demo --subject-only demo-out/subject   # just write the toy world's subject folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RESOLUTION = 64  # the tiny world's
TOYWORLD = "toyworld"


def make_subject(out_dir: str | Path, color=(220, 30, 30), n: int = 4, size: int = 96, seed: int = 0) -> Path:
    """A synthetic subject: a coloured square at shifting positions on a lightly noisy grey background."""
    from dreambooth_lib.testing.synthetic import make_subject_images

    return make_subject_images(out_dir, n=n, size=size, color=color, seed=seed)


def build_models(out: Path) -> dict[str, str]:
    """The tiny model and evaluators (reused when already built: they are deterministic in the seed)."""
    from dreambooth_lib.testing import evaluators
    from dreambooth_lib.testing.tiny_models import build_tiny_model

    model = out / "tiny-model"
    ev = model / "evaluators"
    if not (model / "model_index.json").exists():
        build_tiny_model(model, seed=0)
    if not (ev / "lpips.safetensors").exists():
        evaluators.build_tiny_dino(ev / "dino", seed=0)
        evaluators.build_tiny_clip(ev / "clip", seed=0)
        evaluators.build_tiny_lpips(ev / "lpips.safetensors", seed=0)
    return {
        "model": str(model),
        "dino": str(ev / "dino"),
        "clip": str(ev / "clip"),
        "lpips": str(ev / "lpips.safetensors"),
    }


def tiny_settings(paths: dict[str, str]) -> dict[str, Any]:
    """Pipeline arguments shared by both pipelines: 64 px, few steps, 4 prior images (the rest, λ and the mode
    included, are each pipeline's defaults: a full fine-tune for one subject, packed LoRA for a batch)."""
    return {
        "resolution": RESOLUTION,
        "steps": 8,
        "prior_size": 4,
        "prior_options": {"steps": 4, "batch_size": 4},
    }


def tiny_step_options(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        "ingest": {"min_side": 64},
        "train": {"learning_rate": 1e-4, "checkpoint_every": 0, "log_every": 4},
        "eval": {
            "max_prompts": 2,
            "images_per_prompt": 2,
            "pres_images": 2,
            "steps": 4,
            "dino_model": paths["dino"],
            "clip_model": paths["clip"],
            "lpips_weights": paths["lpips"],
        },
    }


# a small probe for train.select: 1 prompt x 2 seeds + 2 class images, 4 sampler steps, every 4 training steps
DEMO_PROBE = {"every": 4, "prompts": 1, "images_per_prompt": 2, "class_images": 2, "steps": 4}
SQUARE = {"subject_name": "red-square", "class_noun": "square"}  # the tiny world's subject


# --- the toy world -----------------------------------------------------------------------------------------------
# What binds its subject on 2 CPU cores in about a minute of training (measured with
# dreambooth_lib.testing.toyworld.ablation): a full fine-tune of UNet and text encoder for one subject, LoRA
# adapters packed two per batch for the batch. The toy world draws at 32 px.
TOY_SETTINGS = {
    "resolution": 32,
    "steps": 400,
    "prior_size": 32,
    "prior_options": {"steps": 20, "batch_size": 16},
}
TOY_TRAIN = {"learning_rate": 5e-4, "batch_size": 2, "train_text_encoder": True,
             "text_encoder_learning_rate": 1e-3, "checkpoint_every": 0, "log_every": 50}  # fmt: skip
TOY_BATCH_TRAIN = {"learning_rate": 2e-3, "batch_size": 2, "lora_rank": 8, "checkpoint_every": 0, "log_every": 50,
                   "select": {"every": 100, "prompts": 1, "images_per_prompt": 4, "class_images": 4, "steps": 20}}  # fmt: skip
TOY_BACKGROUNDS = ("white", "black", "gray")


def toyworld_models(out: Path) -> dict[str, str]:
    """Working copies of the shipped toy world's model and evaluators (fp32; reused when already there)."""
    from dreambooth_lib.testing.toyworld import shipped

    root = out / "toyworld"
    return {
        "world": TOYWORLD,
        "model": str(shipped.base_model(root / "model")),
        **shipped.evaluators(root / "evaluators"),
    }


def make_toy_subject(
    out_dir: str | Path, shape: str = "star", colors: tuple[str, str] = ("yellow", "blue")
) -> Path:
    """4 views of a toy-world subject the base model never draws: `shape` split `colors` (left | right), on grey,
    upscaled to 128 px as a photo would be larger than the model's resolution."""
    from dreambooth_lib.testing.toyworld import world

    return world.subject_images(out_dir, n=4, size=128, shape=shape, colors=colors)


def toy_subject_rates(metrics_json: str | Path) -> dict[str, float]:
    """How often the evaluation's samples show the split star (both of its colours, `world.is_subject`): those of
    the identifier prompts, and those of "a star" (PRES's class-prompt samples)."""
    from PIL import Image

    from dreambooth_lib.testing.toyworld import world

    record = json.loads(Path(metrics_json).read_text())
    folder = Path(metrics_json).parent

    def rate(rel_paths: list[str]) -> float:
        return round(
            sum(world.is_subject(Image.open(folder / r)) for r in rel_paths) / max(len(rel_paths), 1), 3
        )

    return {
        "identifier_prompts": rate([r for p in record["per_prompt"] for r in p["images"]]),
        "class_prompt": rate(record["pres_images"]),
    }


def _toy(paths: dict[str, str]) -> bool:
    return paths.get("world") == TOYWORLD


def pipeline_settings(paths: dict[str, str]) -> dict[str, Any]:
    """The pipeline arguments both pipelines take, for the world `paths` come from."""
    return dict(TOY_SETTINGS) if _toy(paths) else tiny_settings(paths)


def step_options(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The ingest / train / eval options of the world `paths` come from (train: the single subject's)."""
    if not _toy(paths):
        return tiny_step_options(paths)
    return {
        "ingest": {"min_side": 64},
        "train": dict(TOY_TRAIN),
        "eval": {
            "prompts": [f"a {{0}} {{1}} on a {b} background" for b in TOY_BACKGROUNDS],
            "images_per_prompt": 4, "pres_images": 8, "steps": 20,
            "dino_model": paths["dino"], "clip_model": paths["clip"], "lpips_weights": paths["lpips"],
        },
    }  # fmt: skip


def init_local(pipeline_root: Path) -> None:
    """kfp.local with the venv's own interpreter: use_venv=True would reinstall kfp per task (~15x slower)."""
    import warnings

    from kfp import local

    # kfp.local warns that our base images are not plain Python images: locally this venv stands in for them.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))


def run_personalize(
    out: Path, paths: dict[str, str], subject_dir: Path, registry: Path | None, **arguments: Any
) -> dict[str, Any]:
    """The personalize pipeline on one subject (registered when `registry` is given) with the settings of the
    world `paths` come from; `arguments` override them."""
    from pipelines.personalize import personalize

    steps = step_options(paths)
    subject = {"subject_name": "split-star", "class_noun": "star"} if _toy(paths) else SQUARE
    task = personalize(
        **{
            "base_model": paths["model"],
            "images_uri": str(subject_dir),
            "registry_uri": str(registry) if registry else "",
            "checkpoint_root": str(out / "checkpoints"),
            "ingest_options": steps["ingest"],
            "train_options": steps["train"],
            "eval_options": steps["eval"],
            **subject,
            **pipeline_settings(paths),
            **arguments,
        }
    )
    metrics = task.outputs["metrics"]
    report = task.outputs["report"]
    evaluation = (
        Path(report.path).parent / "evaluation"
    )  # the evaluate task's folder: metrics.json, report.html
    return {
        "model": task.outputs["model"].path,
        "metrics": dict(metrics.metadata),
        "metrics_json": str(evaluation / "metrics.json"),
        "report_html": str(evaluation / "report.html")
        if (evaluation / "report.html").exists()
        else report.path,
    }


def run_batch(out: Path, paths: dict[str, str], entries: list[dict], registry: Path) -> dict[str, Any]:
    """batch_personalize over manifest `entries` ({name, class_noun, images, ...}); returns its summary."""
    from pipelines.batch_personalize import batch_personalize

    manifest = out / "batch" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"subjects": entries}, indent=2) + "\n")
    batch_root = out / "batches"
    steps = step_options(paths)
    batch_train = dict(TOY_BATCH_TRAIN) if _toy(paths) else {**steps["train"], "select": DEMO_PROBE}
    batch_personalize(
        manifest_uri=str(manifest),
        base_model=paths["model"],
        batch_root=str(batch_root),
        registry_uri=str(registry),
        # train.select on: each subject's probes at intervals, its chosen step exported and listed in the summary
        run_options={**steps, "train": batch_train, "samples_per_prompt": 0},
        # the batch's default: LoRA adapters, packed (here two subjects per training task; the single-subject
        # demo is a full fine-tune), so both training paths run end to end
        **pipeline_settings(paths),
        pack_size=2,
    )
    summaries = sorted(batch_root.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        raise RuntimeError(f"{batch_root}: the batch wrote no summary")
    summary = json.loads(summaries[-1].read_text())
    return {
        "summary_md": str(summaries[-1].with_suffix(".md")),
        "title": summary["title"],
        "subjects": summary["subjects"],
    }


def run_demo(out: str | Path = "demo-out", batch: bool = True, world: str = TOYWORLD) -> dict[str, Any]:
    """Everything `make demo` does; returns where each output is (the test reads this)."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    for stale in (
        "kfp-root",
        "batches",
        "registry",
        "batch",
    ):  # a fresh registry each time: versions start at 1
        shutil.rmtree(out / stale, ignore_errors=True)
    if world == TOYWORLD:
        paths = toyworld_models(out)
        subjects = {  # name: (class noun, photos)
            "split-star": ("star", make_toy_subject(out / "subjects" / "split-star")),
            "split-ring": (
                "ring",
                make_toy_subject(out / "subjects" / "split-ring", "ring", ("red", "green")),
            ),
        }
    else:
        paths = build_models(out)
        subjects = {
            "red-square": (
                "square",
                make_subject(out / "subjects" / "red-square", color=(220, 30, 30), seed=0),
            ),
            "blue-square": (
                "square",
                make_subject(out / "subjects" / "blue-square", color=(30, 60, 220), seed=1),
            ),
        }
    registry = out / "registry"
    init_local(out / "kfp-root")
    result: dict[str, Any] = {"registry": str(registry)}
    t1 = time.perf_counter()
    result["personalize"] = run_personalize(out, paths, next(iter(subjects.values()))[1], registry)
    if world == TOYWORLD:
        result["personalize"]["subject_rate"] = toy_subject_rates(result["personalize"]["metrics_json"])
    result["personalize_s"] = round(time.perf_counter() - t1, 1)
    if batch:
        t2 = time.perf_counter()
        entries = [{"name": n, "class_noun": c, "images": str(p)} for n, (c, p) in subjects.items()]
        result["batch"] = run_batch(out, paths, entries, registry)
        result["batch_s"] = round(time.perf_counter() - t2, 1)
    from dreambooth_lib.registry import open_registry

    result["registered"] = [m.model_dump(mode="json") for m in open_registry(str(registry)).list_models()]
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return result


def _print(result: dict[str, Any]) -> None:
    p = result["personalize"]
    shown = "  ".join(f"{k}={v:.3f}" for k, v in p["metrics"].items() if isinstance(v, (int, float)))
    print("\n== personalize (kfp.local) ==")
    print(f"  trained model   {p['model']}/model")
    print(f"  metrics         {shown}")
    if "subject_rate" in p:
        rate = p["subject_rate"]
        print(f"  the split star  in {rate['identifier_prompts']:.0%} of 'a [V] star ...' samples, "
              f"{rate['class_prompt']:.0%} of 'a star' samples")  # fmt: skip
    print(f"  metrics.json    {p['metrics_json']}")
    print(f"  report.html     {p['report_html']}")
    print(f"  ({result['personalize_s']} s)")
    if "batch" in result:
        b = result["batch"]
        print("\n== batch_personalize (kfp.local) ==")
        print(f"  {b['title']}")
        for name, record in sorted(b["subjects"].items()):
            print(f"  {name:12s} {record['status']:12s} {record.get('identifier') or ''}")
        print(f"  summary         {b['summary_md']}")
        print(f"  ({result['batch_s']} s)")
    print(f"\n== registry {result['registry']} ==")
    for m in result["registered"]:
        print(f"  {m['subject']} v{m['version']}  [{m['identifier']}]  {m['model_uri']}")
    print(f"\nwall time {result['wall_time_s']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run both pipelines through kfp.local on the toy world.")
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--world", choices=(TOYWORLD, "tiny"), default=TOYWORLD)
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--subject-only", metavar="DIR", help="only write the world's subject folder to DIR")
    args = parser.parse_args(argv)
    if args.subject_only:
        print(
            make_toy_subject(args.subject_only) if args.world == TOYWORLD else make_subject(args.subject_only)
        )
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # set before the task subprocesses inherit it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dreambooth_lib.errors import DreamboothError

    try:
        result = run_demo(args.out, batch=not args.skip_batch, world=args.world)
    except DreamboothError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
