"""`make demo`: the embedded default, end to end through kfp.local — no cluster, no Docker, no downloads.

Runs on the toy world (`dreambooth_lib.testing.toyworld`): a text-to-image model trained from scratch on 32x32
pictures of 4 shapes x 4 colours on 3 backgrounds, shipped with the package, which follows prompts such as "a red
circle on a black background". The subject is one the base world cannot draw: a star split yellow | blue (every
shape of the world is one colour), in 4 views. The demo runs the `personalize` pipeline on it (prior
preservation on, λ = 1) and a 2-subject `batch_personalize` (packed LoRA) with kfp.local's SubprocessRunner (the
same component code a cluster runs, each task a subprocess of this venv), and prints where the registered model,
the metrics and report.html are, and how often the subject appears for the identifier prompt and for "a star".

    python -m pipelines.demo                       # everything, into demo-out/
    python -m pipelines.demo --skip-batch          # personalize only
    python -m pipelines.demo --subject-only demo-out/subject   # just write the subject's 4 views

The evaluators are the toy world's, labelled as such in their folders: the probe classifier's ViT stands in for
DINO, a small CLIP trained on the world for CLIP, a random-weight LPIPS for DIV. The numbers mean something on
the toy world only; they are not comparable with the paper's.
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

RESOLUTION = 32  # the toy world's picture size
LORA_LEARNING_RATE = 5e-3
# seeds whose 4 views all pass ingest's near-duplicate check (a circle turned is the same circle)
SUBJECT = {
    "name": "split-star",
    "class_noun": "star",
    "shape": "star",
    "colors": ("yellow", "blue"),
    "seed": 0,
}
SECOND_SUBJECT = {
    "name": "split-circle",
    "class_noun": "circle",
    "shape": "circle",
    "colors": ("red", "green"),
    "seed": 2,
}
# "a [V] star on a ... background": the world's own prompt grammar, with the identifier
EVAL_PROMPTS = [
    "a {0} {1} on a white background",
    "a {0} {1} on a black background",
    "a {0} {1} on a gray background",
    "a {0} {1}",
]


def make_subject(
    out_dir: str | Path, subject: dict | None = None, n: int = 4, seed: int | None = None
) -> Path:
    """The subject's `n` views (32 px PNGs): by default the yellow | blue star on grey."""
    from dreambooth_lib.testing.toyworld import world

    subject = subject or SUBJECT
    seed = subject["seed"] if seed is None else seed
    return world.subject_images(out_dir, n=n, seed=seed, shape=subject["shape"], colors=subject["colors"])


def build_models(out: Path) -> dict[str, str]:
    """Working copies of the shipped toy-world model and its toy evaluators (reused when already there)."""
    from dreambooth_lib.testing.toyworld import shipped

    model = shipped.base_model(out / "toyworld-model")
    return {"model": str(model), **shipped.evaluators(out / "toyworld-evaluators")}


def tiny_settings(paths: dict[str, str]) -> dict[str, Any]:
    """Pipeline arguments shared by both pipelines: the world's 32 px, a short fine-tune, 8 prior images (λ and
    the mode are each pipeline's defaults: a full fine-tune for one subject, packed LoRA for a batch)."""
    return {
        "resolution": RESOLUTION,
        "steps": 300,
        "prior_size": 8,
        "prior_options": {"steps": 20, "batch_size": 8},
        "eval_prompts": EVAL_PROMPTS,
    }


def tiny_step_options(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {
        "ingest": {"min_side": RESOLUTION},
        # measured on the toy world (dreambooth_lib.testing.toyworld.ablation): the base was trained at 1.5e-3
        "train": {"learning_rate": 5e-4, "batch_size": 2, "checkpoint_every": 0, "log_every": 50},
        "eval": {
            "images_per_prompt": 4,
            "pres_images": 8,
            "steps": 20,
            "batch_size": 8,
            "dino_model": paths["dino"],
            "clip_model": paths["clip"],
            "lpips_weights": paths["lpips"],
        },
    }


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
        subject_name=SUBJECT["name"],
        class_noun=SUBJECT["class_noun"],
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
    metrics_json = evaluation / "metrics.json"
    return {
        "model": task.outputs["model"].path,
        "metrics": dict(metrics.metadata),
        "metrics_json": str(metrics_json),
        "report_html": str(evaluation / "report.html")
        if (evaluation / "report.html").exists()
        else report.path,
        "subject_rates": subject_rates(metrics_json) if metrics_json.exists() else None,
    }


def subject_rates(metrics_json: Path) -> dict[str, float]:
    """How often the evaluation's samples show the subject (both its colours, which no picture of the base world has):
    per identifier prompt, and for the class prompt "a star" (the PRES images)."""
    from PIL import Image

    from dreambooth_lib.testing.toyworld import world

    record = json.loads(metrics_json.read_text())
    root = metrics_json.parent

    def rate(paths: list[str]) -> float:
        return round(sum(world.is_subject(Image.open(root / p)) for p in paths) / max(len(paths), 1), 3)

    rates = {row["prompt"]: rate(row["images"]) for row in record["per_prompt"]}
    rates[f"a {record['class_noun']}"] = rate(record["pres_images"])
    return rates


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
        # LoRA's few, zero-initialised parameters need a higher rate than the full fine-tune
        run_options={
            **steps,
            "train": {**steps["train"], "learning_rate": LORA_LEARNING_RATE},
            "samples_per_prompt": 0,
        },
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
        s["name"]: (s["class_noun"], make_subject(out / "subjects" / s["name"], s))
        for s in (SUBJECT, SECOND_SUBJECT)
    }
    registry = out / "registry"
    init_local(out / "kfp-root")
    result: dict[str, Any] = {"registry": str(registry)}
    t1 = time.perf_counter()
    result["personalize"] = run_personalize(out, paths, subjects[SUBJECT["name"]][1], registry)
    result["personalize_s"] = round(time.perf_counter() - t1, 1)
    if batch:
        t2 = time.perf_counter()
        entries = [{"name": n, "class_noun": c, "images": str(p)} for n, (c, p) in subjects.items()]
        result["batch"] = run_batch(out, paths, entries, registry)
        result["batch_s"] = round(time.perf_counter() - t2, 1)
    from dreambooth_lib.registry import open_registry

    result["registered"] = [m.model_dump(mode="json") for m in open_registry(str(registry)).list_models()]
    result["evaluators"] = evaluator_labels(paths)
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return result


def evaluator_labels(paths: dict[str, str]) -> dict[str, str | None]:
    from dreambooth_lib.testing.toyworld.evaluators import evaluator_label

    return {name: evaluator_label(paths[name]) for name in ("dino", "clip", "lpips")}


def _print(result: dict[str, Any]) -> None:
    p = result["personalize"]
    shown = "  ".join(f"{k}={v:.3f}" for k, v in p["metrics"].items() if isinstance(v, (int, float)))
    print("\n== personalize (kfp.local) ==")
    print(f"  trained model   {p['model']}/model")
    print(f"  metrics         {shown}")
    print(f"  metrics.json    {p['metrics_json']}")
    print(f"  report.html     {p['report_html']}")
    if p.get("subject_rates"):
        print("  subject shown   " + "  ".join(f"{k!r}: {v:.0%}" for k, v in p["subject_rates"].items()))
    print("  evaluators      " + ", ".join(f"{k}: {v}" for k, v in result.get("evaluators", {}).items()))
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
    parser = argparse.ArgumentParser(description="Run both pipelines on the toy world through kfp.local.")
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--subject-only", metavar="DIR", help="only write the subject's 4 views to DIR")
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
