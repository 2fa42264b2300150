"""Both DAGs as a cluster runs them: every task in its own container of the built images (kfp.local's
DockerRunner), as an arbitrary non-root uid, with nothing shared but the mounted pipeline root — and the same
results as the SubprocessRunner runs of `make test`.

The inputs (tiny model and evaluators, synthetic photos, the batch manifest) are made under the pipeline root,
the only folder DockerRunner mounts. How the pipelines are called lives in `pipelines/demo.py` (run_personalize,
run_batch), shared with `make demo`: a change of the pipelines' parameters is made there once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.containers,
    # kfp.local ignores resources and accelerators, and says so for every task
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
]

RUN_AS = (4242, 4242)  # neither root nor the image's own uid 1000
READER = "5151:5151"  # another uid, as a shared registry's reader would be
# Interleaved rounds (container, subprocess, container, ...): timing noise on a shared machine shows as spread.
ROUNDS = int(os.environ.get("DREAMBOOTH_CONTAINER_ROUNDS", "1"))
# What the container sees of the host: nothing but these (DockerRunner passes no host environment).
TASK_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("container-dags")
    os.chown(root, *RUN_AS)  # the pods' uid owns the pipeline root, as a volume's fsGroup would arrange
    root.chmod(0o755)  # pytest makes it 0700: others could not even look in
    return root


@pytest.fixture(scope="module")
def inputs(pipeline_root):
    from pipelines import demo

    base = pipeline_root / "inputs"
    paths = demo.build_models(base)
    subjects = {
        "red-square": demo.make_subject(base / "subjects" / "red-square", color=(220, 30, 30), seed=0),
        "blue-square": demo.make_subject(base / "subjects" / "blue-square", color=(30, 60, 220), seed=1),
    }
    # safetensors (0.8) writes weights 0600 whatever the umask; the tasks run as another uid and must read the
    # models, as they would read a shared model store.
    for f in base.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return paths, subjects


def _run_both_dags(runner, pipeline_root: Path, out: Path, inputs) -> dict:
    """personalize (one subject) then batch_personalize (two), as `make demo` runs them, under `runner`."""
    import warnings

    from kfp import local

    from pipelines import demo

    paths, subjects = inputs
    out.mkdir(parents=True)
    os.chown(out, *RUN_AS)
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    local.init(runner=runner, pipeline_root=str(pipeline_root))
    registry = out / "registry"
    t0 = time.perf_counter()
    personalize = demo.run_personalize(out, paths, subjects["red-square"], registry)
    t1 = time.perf_counter()
    entries = [{"name": n, "class_noun": "square", "images": str(p)} for n, p in subjects.items()]
    batch = demo.run_batch(out, paths, entries, registry)
    t2 = time.perf_counter()
    return {
        "personalize": personalize,
        "batch": batch,
        "registry": registry,
        "personalize_s": t1 - t0,
        "batch_s": t2 - t1,
    }


@pytest.fixture(scope="module")
def runs(pipeline_root, inputs, images, measure):
    """Container and subprocess runs of both DAGs, interleaved; {'docker': [...], 'subprocess': [...]}."""
    from kfp import local

    docker_runner = local.DockerRunner(user=f"{RUN_AS[0]}:{RUN_AS[1]}", environment=TASK_ENV)
    subprocess_runner = local.SubprocessRunner(use_venv=False)
    results = {"docker": [], "subprocess": []}
    for i in range(ROUNDS):
        for name, runner in (("docker", docker_runner), ("subprocess", subprocess_runner)):
            results[name].append(_run_both_dags(runner, pipeline_root, pipeline_root / f"{name}-{i}", inputs))
    for name, rounds in results.items():
        shown = ", ".join(f"{r['personalize_s']:.1f} + {r['batch_s']:.1f} s" for r in rounds)
        measure(f"{name:10s} personalize + batch_personalize wall time: {shown}")
    if not images["cuda_built"]:
        measure(f"GPU steps ran on the CPU image under the name {images['cuda']} (no CUDA image built)")
    return results


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_personalize_in_containers_registers_a_model_with_metrics(runs):
    from dreambooth_lib.registry import open_registry

    run = runs["docker"][0]
    p = run["personalize"]
    model = Path(p["model"])
    assert (model / "model" / "model_index.json").exists() and (model / "train_summary.json").exists()
    assert not [f for f in model.rglob("*") if "checkpoint" in f.name], (
        "checkpoints left in the model artifact"
    )
    assert {"dino", "clip_i", "clip_t", "pres", "div"} <= set(p["metrics"])
    assert all(math.isfinite(v) for v in _numbers(p["metrics"]).values())
    metrics_json = json.loads(Path(p["metrics_json"]).read_text())
    assert metrics_json["metrics"]["dino"] == p["metrics"]["dino"] and "gate" in metrics_json
    entries = {(m.subject, m.version): m for m in open_registry(str(run["registry"])).list_models()}
    assert Path(entries["red-square", 1].model_uri, "model_index.json").exists()
    # written by the container's uid, not by this (root) process
    assert model.stat().st_uid == RUN_AS[0] and Path(p["report_html"]).stat().st_uid == RUN_AS[0]


def test_batch_in_containers_registers_every_subject(runs):
    from dreambooth_lib.registry import open_registry

    run = runs["docker"][0]
    subjects = run["batch"]["subjects"]
    assert {n: s["status"] for n, s in subjects.items()} == {
        "red-square": "registered",
        "blue-square": "registered",
    }
    assert all({"dino", "clip_t"} <= set(s["metrics"]) for s in subjects.values())
    assert Path(run["batch"]["summary_md"]).read_text().count("registered") >= 2
    registered = {(m.subject, m.version) for m in open_registry(str(run["registry"])).list_models()}
    assert {("red-square", 2), ("blue-square", 1)} <= registered  # red-square: the personalize run's v1 first


def test_outputs_are_readable_by_another_uid(runs, images, run_in, pipeline_root):
    """report.html, metrics and the registered models, read by a third uid from a read-only mount."""
    from dreambooth_lib.registry import open_registry

    run = runs["docker"][0]
    p = run["personalize"]
    registered = [Path(m.model_uri) for m in open_registry(str(run["registry"])).list_models()]
    files = [p["report_html"], p["metrics_json"], run["batch"]["summary_md"]]
    files += [str(f) for model in registered for f in model.rglob("*") if f.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    volumes = {str(pipeline_root): {"bind": str(pipeline_root), "mode": "ro"}}
    read_all = 'for f in "$@"; do head -c 64 "$f" >/dev/null || exit 1; done; echo ok'
    out = run_in(images["cpu"], ["sh", "-c", read_all, "sh", *files], user=READER, volumes=volumes)
    assert out.strip() == "ok"
    assert "<html" in Path(p["report_html"]).read_text().lower()


def _metric_sets(run: dict) -> dict[str, dict]:
    sets = {"personalize": _numbers(run["personalize"]["metrics"])}
    for name, subject in run["batch"]["subjects"].items():
        sets[f"batch {name}"] = _numbers(subject["metrics"])
    return sets


def test_containers_give_the_subprocess_runners_metrics(runs, measure):
    """Same inputs, same seeds, same torch build: every run's numbers, in containers or subprocesses, are the
    first subprocess run's."""
    reference = _metric_sets(runs["subprocess"][0])
    worst = 0.0
    for name, rounds in runs.items():
        for i, run in enumerate(rounds):
            sets = _metric_sets(run)
            assert set(sets) == set(reference), f"{name} round {i}"
            for label, metrics in sets.items():
                assert set(metrics) == set(reference[label]), f"{name} round {i}: {label}"
                for key, value in metrics.items():
                    expected = reference[label][key]
                    assert value == pytest.approx(expected, rel=1e-5, abs=1e-6), f"{name} {i} {label} {key}"
                    worst = max(worst, abs(value - expected))
    measure(
        f"metrics of {sum(map(len, runs.values()))} runs against the first subprocess run: largest difference "
        f"{worst:.3g} over {len(reference)} metric sets each"
    )
