"""Fixtures of the component tests: the tiny model, a synthetic subject, kfp.local with the venv's interpreter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from dreambooth_lib.testing.tiny_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def tiny_evaluators(tmp_path_factory) -> dict[str, str]:
    from dreambooth_lib.testing import evaluators

    paths = evaluators.build_tiny_evaluators(tmp_path_factory.mktemp("evaluators"))
    return {"dino_model": paths["dino"], "clip_model": paths["clip"], "lpips_weights": paths["lpips"]}


@pytest.fixture
def photos(tmp_path) -> Path:
    from dreambooth_lib.testing.synthetic import make_subject_images

    return make_subject_images(tmp_path / "photos", n=4, size=96)


@pytest.fixture
def local_kfp(tmp_path) -> Path:
    """kfp.local with SubprocessRunner(use_venv=False): tasks run in this venv (use_venv=True is ~15x slower)."""
    from kfp import local

    root = tmp_path / "kfp-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def artifact(kind, path: Path):
    """An input/output artifact at a local path, as the KFP executor hands it to the function."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return kind(uri=str(path))


def pytest_configure(config):
    # kfp.local warns that our base images are not plain Python images; locally the venv stands in for them.
    config.addinivalue_line("filterwarnings", "ignore:You may be attemping to run a task:RuntimeWarning")


TINY_TRAIN = {"learning_rate": 1e-4, "checkpoint_every": 0, "log_every": 1}
TINY_EVAL = {"max_prompts": 2, "images_per_prompt": 2, "pres_images": 2, "steps": 2}


@pytest.fixture(scope="session")
def ingested(tmp_path_factory):
    """The ingest component's output Dataset for a synthetic subject (64 px)."""
    from kfp.dsl import Dataset

    from components.ingest.component import ingest_images
    from dreambooth_lib.testing.synthetic import make_subject_images

    root = tmp_path_factory.mktemp("ingested")
    out = artifact(Dataset, root / "instance")
    ingest_images.python_func(
        images_uri=str(make_subject_images(root / "photos", n=4, size=96)), images_digest="", resolution=64, instance_images=out,
        ingest_options={"min_side": 64},
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def no_prior(tiny_model_dir, tmp_path_factory):
    """The class-prior component's output Dataset with prior preservation off (0 images)."""
    from kfp.dsl import Dataset

    from components.prior.component import make_prior_set

    out = artifact(Dataset, tmp_path_factory.mktemp("no-prior") / "prior_set")
    make_prior_set.python_func(
        base_model=tiny_model_dir, base_model_digest="md", class_noun="square", resolution=64, prior_size=0,
        prior_root="", prior_set=out, prior_loss_weight=0.0,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def trained(ingested, no_prior, tiny_model_dir, tmp_path_factory):
    """The fine-tune component's output Model: 2 steps on the tiny model, no prior."""
    from kfp.dsl import Metrics, Model

    from components.train.component import fine_tune

    out = artifact(Model, tmp_path_factory.mktemp("trained") / "model")
    selection = artifact(Metrics, tmp_path_factory.mktemp("trained") / "selection")
    fine_tune.python_func(
        base_model=tiny_model_dir, base_model_digest="md", instance_images=ingested, instance_digest="id",
        prior_set=no_prior, checkpoint_root=str(tmp_path_factory.mktemp("checkpoints")), identifier="zwx",
        class_noun="square", resolution=64, steps=2, prior_loss_weight=0.0, mode="full", trained_model=out,
        selection=selection, train_options=TINY_TRAIN,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def evaluate_with(trained, ingested, no_prior, tiny_model_dir, tiny_evaluators, tmp_path_factory):
    """A function that runs the evaluate component on the trained model with the given gate thresholds
    (GateConfig fields, e.g. {"min_clip_t": 0.2}) and returns its outputs and its return value (passed, reasons)."""
    from kfp.dsl import HTML, Artifact, Metrics

    from components.evaluate.component import evaluate_model

    def evaluate(gate_thresholds: dict):
        root = tmp_path_factory.mktemp("evaluated")
        outs = {
            "metrics": artifact(Metrics, root / "metrics"),
            "report": artifact(HTML, root / "report"),
            "evaluation": artifact(Artifact, root / "evaluation"),
        }
        verdict = evaluate_model.python_func(
            trained_model=trained, instance_images=ingested, base_model=tiny_model_dir, identifier="zwx",
            class_noun="square", live=False, resolution=64, prior_set=no_prior,
            eval_prompts=["a {0} {1}", "a {0} {1} on grass"], gate_thresholds=gate_thresholds,
            eval_options={**TINY_EVAL, **tiny_evaluators}, subject_name="red", **outs,
        )  # fmt: skip
        return outs, verdict

    return evaluate


@pytest.fixture(scope="session")
def evaluated(evaluate_with):
    """The evaluate component's outputs (metrics, report, evaluation) and its return value, with no gate
    thresholds: the default gate, which checks nothing and passes (tests of a real gate use evaluate_with)."""
    return evaluate_with({})
