"""The KFP launcher's contract: the compiled pipeline run task by task, each task a pod with an empty disk that
sees only its declared input artifacts, staged in from gs:// and its outputs staged out (tests/kfp_launcher.py).

kfp.local shares one filesystem between tasks, so it cannot catch a task reading a path another task produced;
these tests can. The retried-pod test kills fine-tune mid-run and lets the retry (a fresh empty pod with the same
inputs) resume from the durable checkpoint root, as a preempted GPU node would.
"""

# no `from __future__ import annotations`: kfp reads the components' annotations as types
import json
import sys
from pathlib import Path

import pytest
from kfp import compiler, dsl
from kfp.dsl import Artifact, Input, Output
from kfp_launcher import Launcher, ObjectStore, RunningTask, TaskFailed, load_spec

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # components/ and pipelines/ are top-level folders of the checkout
    sys.path.insert(0, str(REPO))

# What the image and the pod spec set: one torch thread per pod (the 2 cores are shared), no model hub.
POD_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
MANIFEST = "checkpoint_manifest.json"


def compile_spec(pipeline, path: Path) -> dict:
    """Compile now, so the test follows the code and not a committed YAML."""
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
    return load_spec(path)


@pytest.fixture(scope="module")
def personalize_spec(tmp_path_factory) -> dict:
    from pipelines.personalize import build_personalize
    from pipelines.placement import load_placement

    path = tmp_path_factory.mktemp("compiled") / "personalize.kfp.yaml"
    return compile_spec(build_personalize(load_placement("gke")), path)


@pytest.fixture(scope="module")
def tiny_evaluators(tmp_path_factory) -> Path:
    from dreambooth_lib.testing import evaluators

    root = tmp_path_factory.mktemp("evaluators")
    evaluators.build_tiny_evaluators(root, seed=0)
    return root


@pytest.fixture
def on_gcs(gcs_bucket, tiny_model, tiny_evaluators, subject_dir) -> dict[str, str]:
    """Everything a cluster run reads, in the object store: the base model, the evaluators, the photos."""
    store = ObjectStore()
    uris = {
        "bucket": gcs_bucket,
        "base_model": f"{gcs_bucket}/models/tiny",
        "images": f"{gcs_bucket}/photos/red-square",
        "dino": f"{gcs_bucket}/models/evaluators/dino",
        "clip": f"{gcs_bucket}/models/evaluators/clip",
        "lpips": f"{gcs_bucket}/models/evaluators/lpips.safetensors",
    }
    store.upload(tiny_model, uris["base_model"])
    store.upload(subject_dir, uris["images"])
    for name in ("dino", "clip", "lpips"):
        local = tiny_evaluators / ("lpips.safetensors" if name == "lpips" else name)
        store.upload(local, uris[name])
    return uris


def tiny_arguments(uris: dict[str, str], **overrides) -> dict:
    """The demo's personalize parameters for the tiny model (64 px, 4 prior images, tiny evaluators), 4 steps."""
    from pipelines.demo import tiny_settings, tiny_step_options

    options = tiny_step_options(uris)  # the evaluators by their gs:// URIs
    return {
        "base_model": uris["base_model"],
        "images_uri": uris["images"],
        "subject_name": "red-square",
        "class_noun": "square",
        **tiny_settings(uris),
        "steps": 4,
        "ingest_options": options["ingest"],
        "train_options": options["train"],
        "eval_options": options["eval"],
        **overrides,
    }


def assert_model_artifact_holds_the_model_only(store: ObjectStore, uri: str) -> None:
    names = [o[len(uri) + 1 :] for o in store.list(uri)]
    assert "train_summary.json" in names and "model/model_index.json" in names, names
    strays = [n for n in names if n != "train_summary.json" and not n.startswith("model/")]
    assert strays == [], f"the Model artifact holds more than model/ and train_summary.json: {strays}"
    assert not [n for n in names if "checkpoint" in n or "/step-" in n], (
        "checkpoint bytes in the Model artifact"
    )


@pytest.mark.slow
def test_personalize_runs_with_nothing_shared_between_tasks_but_artifacts(personalize_spec, on_gcs, tmp_path):
    store = ObjectStore()
    bucket = on_gcs["bucket"]
    launcher = Launcher(personalize_spec, f"{bucket}/pipeline-root", tmp_path / "pods", env=POD_ENV)

    result = launcher.run(tiny_arguments(on_gcs, registry_uri=f"{bucket}/registry"))

    ran = {name: r for name, r in result.tasks.items() if r.attempts}
    assert {name.split("/")[-1] for name in ran} == {
        "fingerprint-inputs",
        "ingest-images",
        "choose-identifier",
        "make-prior-set",
        "fine-tune",
        "evaluate-model",
        "register-model",
    }
    assert all(r.state == "SUCCEEDED" and len(r.attempts) == 1 for r in ran.values())
    roots = [a.root for r in ran.values() for a in r.attempts]
    assert len(set(roots)) == len(roots) and not any(root.exists() for root in roots), (
        "pods share or keep a disk"
    )

    model, metrics, report = (result.outputs[k] for k in ("model", "metrics", "report"))
    assert all(a.uri.startswith(f"{bucket}/pipeline-root/") for a in (model, metrics, report))
    assert_model_artifact_holds_the_model_only(store, model.uri)
    summary = json.loads(store.read_bytes(f"{model.uri}/train_summary.json"))
    assert summary["steps"] == 4 and summary["resumed_from"] is None
    assert "gate_passed" in metrics.metadata and "clip_t" in metrics.metadata, metrics.metadata
    assert b"<html" in store.read_bytes(report.uri).lower()
    evaluation = result.task("evaluate-model").artifacts["evaluation"]
    assert store.exists(f"{evaluation.uri}/metrics.json")

    from dreambooth_lib.registry import open_registry

    (registered,) = open_registry(f"{bucket}/registry").list_models()
    assert registered.subject == "red-square" and registered.version == 1
    assert registered.identifier == result.task("choose-identifier").parameters["identifier"]


def preempt_after_first_checkpoint(store: ObjectStore, checkpoints: str):
    """A monitor that kills the first attempt once a complete checkpoint is in `checkpoints`, as a preempted
    GPU node takes the pod down."""

    def monitor(task: RunningTask) -> None:
        if (
            task.attempt == 1
            and not task.killed
            and any(u.endswith(MANIFEST) for u in store.list(checkpoints))
        ):
            task.kill()

    return monitor


def fine_tune_weights(store: ObjectStore, model_uri: str) -> dict:
    """Every tensor of the trained model's safetensors files, by file and name."""
    from safetensors.torch import load

    files = [u for u in store.list(f"{model_uri}/model") if u.endswith(".safetensors")]
    assert files, f"{model_uri}/model holds no safetensors"
    return {
        f"{u[len(model_uri) :]}:{name}": tensor
        for u in files
        for name, tensor in load(store.read_bytes(u)).items()
    }


@pytest.mark.slow
def test_a_retried_fine_tune_pod_resumes_from_the_checkpoint_root_bit_identically(
    personalize_spec, on_gcs, tmp_path
):
    import torch

    store = ObjectStore()
    bucket = on_gcs["bucket"]
    checkpoints = f"{bucket}/checkpoints"
    steps = 16  # checkpoints every 2 steps: the kill lands well before the end
    train_options = {"learning_rate": 1e-4, "checkpoint_every": 2, "log_every": 2}

    launcher = Launcher(
        personalize_spec,
        f"{bucket}/pipeline-root",
        tmp_path / "pods",
        env=POD_ENV,
        honor_retries=True,  # fine-tune's retryPolicy reruns it in a fresh pod, as KFP does
        monitors={"fine-tune": preempt_after_first_checkpoint(store, checkpoints)},
    )
    result = launcher.run(
        tiny_arguments(on_gcs, steps=steps, checkpoint_root=checkpoints, train_options=train_options)
    )

    fine_tune = result.task("fine-tune")
    assert [a.returncode for a in fine_tune.attempts] == [-9, 0], (
        "fine-tune was not killed once, then retried"
    )
    assert fine_tune.attempts[0].root != fine_tune.attempts[1].root
    assert result.task("evaluate-model").state == "SUCCEEDED"
    # registry_uri '': the dsl.If branch is skipped, so register never runs
    assert result.task("condition-1").state == "SKIPPED"
    assert "condition-1/register-model" not in result.tasks
    model = result.outputs["model"]
    summary = json.loads(store.read_bytes(f"{model.uri}/train_summary.json"))
    assert 0 < (summary["resumed_from"] or 0) < steps, summary["resumed_from"]
    assert_model_artifact_holds_the_model_only(store, model.uri)
    assert store.list(checkpoints) == [], "checkpoints left after success"

    # the same task, uninterrupted, in a fresh pod with its own checkpoint root: the same weights, bit for bit
    reference = launcher.rerun_task(
        result, "fine-tune", {"checkpoint_root": f"{bucket}/checkpoints-reference"}, run_id="uninterrupted"
    )
    reference_model = reference.artifacts["trained_model"]
    assert reference_model.uri != model.uri
    assert json.loads(store.read_bytes(f"{reference_model.uri}/train_summary.json"))["resumed_from"] is None
    resumed, uninterrupted = (
        fine_tune_weights(store, model.uri),
        fine_tune_weights(store, reference_model.uri),
    )
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert differ == [], f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"


@pytest.mark.slow
def test_a_retried_fine_tune_pod_exports_the_same_chosen_step(personalize_spec, on_gcs, tmp_path):
    """train.select across a preemption: the probes and the best weights live beside the checkpoints in the
    durable root, so the retried pod exports the step an uninterrupted run chooses, bit for bit."""
    import torch

    store = ObjectStore()
    bucket = on_gcs["bucket"]
    checkpoints = f"{bucket}/checkpoints"
    rule = {"every": 2, "prompts": 1, "images_per_prompt": 2, "class_images": 2, "steps": 2}
    train_options = {"learning_rate": 1e-4, "checkpoint_every": 2, "log_every": 2, "select": rule}

    preempt = {"fine-tune": preempt_after_first_checkpoint(store, checkpoints)}
    launcher = Launcher(personalize_spec, f"{bucket}/pipeline-root", tmp_path / "pods", env=POD_ENV,
                        honor_retries=True, monitors=preempt)  # fmt: skip
    result = launcher.run(
        tiny_arguments(on_gcs, steps=8, checkpoint_root=checkpoints, train_options=train_options)
    )
    assert [a.returncode for a in result.task("fine-tune").attempts] == [-9, 0]
    model = result.outputs["model"]
    summary = json.loads(store.read_bytes(f"{model.uri}/train_summary.json"))
    assert summary["resumed_from"] and summary["selection"]["chosen_step"] is not None
    assert summary["selection"]["rule"]["dino_model"].startswith(
        bucket
    )  # eval_options' evaluators, from gs://
    selection = result.task("fine-tune").artifacts["selection"]
    assert selection.metadata["chosen_step"] == summary["selection"]["chosen_step"]

    reference = launcher.rerun_task(
        result, "fine-tune", {"checkpoint_root": f"{bucket}/checkpoints-reference"}, run_id="uninterrupted"
    )
    reference_uri = reference.artifacts["trained_model"].uri
    uninterrupted = json.loads(store.read_bytes(f"{reference_uri}/train_summary.json"))["selection"]
    assert uninterrupted["probes"] == summary["selection"]["probes"]
    assert uninterrupted["chosen_step"] == summary["selection"]["chosen_step"]
    resumed, want = fine_tune_weights(store, model.uri), fine_tune_weights(store, reference_uri)
    assert resumed.keys() == want.keys() and all(torch.equal(resumed[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_person_without_consent_fails_at_ingest_once_before_any_gpu_task(
    personalize_spec, on_gcs, tmp_path
):
    bucket = on_gcs["bucket"]
    launcher = Launcher(personalize_spec, f"{bucket}/pipeline-root", tmp_path / "pods", env=POD_ENV,
                        honor_retries=True)  # fmt: skip
    with pytest.raises(TaskFailed) as failed:
        launcher.run(tiny_arguments(on_gcs, subject_kind="person", registry_uri=f"{bucket}/registry"))
    assert failed.value.task.endswith("ingest-images")
    assert "no consent record" in failed.value.attempt.log
    assert "(exit code 1, attempt 1)" in str(failed.value)  # a deterministic refusal is not retried
    assert ObjectStore().list(f"{bucket}/registry") == []


# --- isolation itself: a task that reads what it did not declare fails ------------------------------------------


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def write_note(note: Output[Artifact]) -> str:
    with open(note.path, "w") as f:
        f.write("written by write-note")
    return note.path  # a local path of this pod, not something another pod can open


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def read_declared(note: Input[Artifact]) -> str:
    with open(note.path) as f:
        return f.read()


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def read_by_path(path: str) -> str:
    with open(path) as f:
        return f.read()


@dsl.pipeline(name="isolation-probe")
def declared_read():
    written = write_note()
    read_declared(note=written.outputs["note"])


@dsl.pipeline(name="isolation-probe")
def undeclared_read():
    written = write_note()
    read_by_path(path=written.outputs["Output"])


def test_a_task_reads_a_declared_artifact_but_not_a_path_another_task_wrote(gcs_bucket, tmp_path):
    launcher = Launcher(
        compile_spec(declared_read, tmp_path / "declared.yaml"), gcs_bucket, tmp_path / "pods"
    )
    result = launcher.run({})
    assert result.task("read-declared").parameters["Output"] == "written by write-note"

    launcher = Launcher(
        compile_spec(undeclared_read, tmp_path / "undeclared.yaml"), gcs_bucket, tmp_path / "pods"
    )
    with pytest.raises(TaskFailed) as failed:
        launcher.run({})
    assert failed.value.task == "read-by-path"
    assert "FileNotFoundError" in failed.value.attempt.log
