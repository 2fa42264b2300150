"""`make demo`: the embedded default, end to end through kfp.local — no cluster, no Docker, no downloads.

Builds a tiny random-weight model (real CLIP vocabulary) with tiny DINO/CLIP/LPIPS evaluators and small
synthetic subjects (a coloured square on a noisy grey background), then runs the `personalize` pipeline and a
2-subject `batch_personalize` with kfp.local's SubprocessRunner (the same component code a cluster runs, each
task a subprocess of this venv), and prints where the registered model, the metrics and report.html are.

    python -m pipelines.demo                       # everything, into demo-out/
    python -m pipelines.demo --skip-batch          # personalize only
    python -m pipelines.demo --subject-only demo-out/subject   # just write a synthetic subject folder

The numbers are meaningless (random weights); the run exercises every step, artifact and the registry.
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

RESOLUTION = 64


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
    """The personalize pipeline on one subject (registered when `registry` is given); `arguments` override the
    tiny settings."""
    from pipelines.personalize import personalize

    steps = tiny_step_options(paths)
    task = personalize(
        base_model=paths["model"],
        images_uri=str(subject_dir),
        subject_name="red-square",
        class_noun="square",
        registry_uri=str(registry) if registry else "",
        checkpoint_root=str(out / "checkpoints"),
        ingest_options=steps["ingest"],
        train_options=steps["train"],
        eval_options=steps["eval"],
        **{**tiny_settings(paths), **arguments},
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
    steps = tiny_step_options(paths)
    batch_personalize(
        manifest_uri=str(manifest),
        base_model=paths["model"],
        batch_root=str(batch_root),
        registry_uri=str(registry),
        # train.select on: each subject's probes every 4 steps, its chosen step exported and listed in the summary
        run_options={**steps, "train": {**steps["train"], "select": DEMO_PROBE}, "samples_per_prompt": 0},
        # the batch's default: LoRA adapters, packed (here two subjects per training task; the single-subject
        # demo is a full fine-tune), so both training paths run end to end
        **tiny_settings(paths),
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


def run_demo(out: str | Path = "demo-out", batch: bool = True) -> dict[str, Any]:
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
    paths = build_models(out)
    subjects = {
        "red-square": make_subject(out / "subjects" / "red-square", color=(220, 30, 30), seed=0),
        "blue-square": make_subject(out / "subjects" / "blue-square", color=(30, 60, 220), seed=1),
    }
    registry = out / "registry"
    init_local(out / "kfp-root")
    result: dict[str, Any] = {"registry": str(registry)}
    t1 = time.perf_counter()
    result["personalize"] = run_personalize(out, paths, subjects["red-square"], registry)
    result["personalize_s"] = round(time.perf_counter() - t1, 1)
    if batch:
        t2 = time.perf_counter()
        entries = [{"name": n, "class_noun": "square", "images": str(p)} for n, p in subjects.items()]
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
    parser = argparse.ArgumentParser(description="Run both pipelines on the tiny model through kfp.local.")
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--subject-only", metavar="DIR", help="only write a synthetic subject folder to DIR")
    args = parser.parse_args(argv)
    if args.subject_only:
        print(make_subject(args.subject_only))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # set before the task subprocesses inherit it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dreambooth_lib.errors import DreamboothError

    try:
        result = run_demo(args.out, batch=not args.skip_batch)
    except DreamboothError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
