"""`dreambooth run` end to end on the tiny model: every artifact of the run directory, local and on gs://."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from dreambooth_lib import storage
from dreambooth_lib.cli import app

runner = CliRunner()


def tiny_run_config(tiny_model, evaluators, images, run_dir, registry, prior_root=None) -> dict:
    return {
        "base_model": tiny_model,
        "run_dir": run_dir,
        "subject": {"name": "red-square", "class_noun": "square", "images": images},
        "ingest": {"resolution": 64, "min_side": 64},
        "prior": {
            "num_images": 4,
            "steps": 2,
            "batch_size": 4,
            **({"root": prior_root} if prior_root else {}),
        },
        "train": {"steps": 4, "learning_rate": 1e-4, "resolution": 64, "checkpoint_every": 2},
        "eval": {
            "max_prompts": 2,
            "images_per_prompt": 2,
            "pres_images": 2,
            "steps": 2,
            "dino_model": evaluators["dino"],
            "clip_model": evaluators["clip"],
            "lpips_weights": evaluators["lpips"],
        },
        "registry": {"uri": registry},
        "samples_per_prompt": 1,
    }


def _invoke_run(cfg: dict, tmp_path, *extra):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return runner.invoke(app, ["run", "--config", str(path), "--json", *extra])


def test_run_writes_every_artifact_and_registers(tiny_model, tiny_evaluators, subject_dir, tmp_path):
    run_dir, registry = str(tmp_path / "run"), str(tmp_path / "registry")
    cfg = tiny_run_config(tiny_model, tiny_evaluators, str(subject_dir), run_dir, registry)
    result = _invoke_run(cfg, tmp_path)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    ident = json.loads((tmp_path / "run" / "identifier.json").read_text())
    assert out["identifier"] == ident["identifier"] and out["prompt"] == f"a {ident['identifier']} square"
    manifest = json.loads((tmp_path / "run" / "ingest" / "manifest.json").read_text())
    assert len(manifest["images"]) == 4 and manifest["class_noun"] == "square"
    prior = json.loads((tmp_path / "run" / "prior.json").read_text())
    assert prior["num_images"] == 4 and len(storage.list_files(prior["uri"])) >= 4
    summary = json.loads((tmp_path / "run" / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["identifier"] == ident["identifier"]
    assert (tmp_path / "run" / "train" / "model" / "model_index.json").exists()
    samples = json.loads((tmp_path / "run" / "samples" / "generate.json").read_text())
    assert len(samples["images"]) == 2
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    for key in ("dino", "clip_i", "clip_t", "pres", "div"):
        assert isinstance(metrics["metrics"][key], float)
    assert (tmp_path / "run" / "eval" / "report.html").stat().st_size > 1000
    # the report shows the training run beside the metrics: one loss point per logged step
    page = (tmp_path / "run" / "eval" / "report.html").read_text()
    curve = re.search(r'<polyline id="loss-curve"[^>]* points="([^"]+)"', page)
    assert curve and len(curve.group(1).split()) == len(summary["losses"])
    assert 'id="training-facts"' in page and f"<th>steps</th><td>{summary['steps']}</td>" in page
    assert out["registered"]["version"] == 1
    steps = ["ingest", "identifier", "prior", "train", "samples", "evaluate", "register"]
    assert list(out["step_times_s"]) == steps, "every step's wall time, in the order they ran"
    listed = runner.invoke(app, ["models", "list", "--registry", registry, "--json"])
    entries = json.loads(listed.stdout)
    assert [(e["subject"], e["version"], e["identifier"]) for e in entries] == [
        ("red-square", 1, ident["identifier"])
    ]
    # the registered model is a loadable pipeline and renders the identifier prompt
    gen = runner.invoke(
        app,
        [
            "generate",
            "--model",
            entries[0]["model_uri"],
            "--prompt",
            out["prompt"],
            "-n",
            "1",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "g"),
            "--json",
        ],
    )
    assert gen.exit_code == 0, gen.output
    assert len(json.loads(gen.stdout)["images"]) == 1
    # `dreambooth evaluate` and `dreambooth register` work on the output of `dreambooth run`
    ev = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            out["model_uri"],
            "--real-images",
            run_dir + "/ingest",
            "--identifier",
            out["identifier"],
            "--class-noun",
            "square",
            "--out",
            str(tmp_path / "eval2"),
            "--max-prompts",
            "1",
            "--images-per-prompt",
            "2",
            "--steps",
            "2",
            "--dino-model",
            tiny_evaluators["dino"],
            "--clip-model",
            tiny_evaluators["clip"],
            "--json",
        ],
    )
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["gate"]["passed"] is True
    assert (tmp_path / "eval2" / "report.html").exists()
    reg = runner.invoke(app, ["register", "--registry", registry, "--run-dir", run_dir, "--json"])
    assert reg.exit_code == 0, reg.output
    # the same weights again (a retried task): the version already published, not a copy
    assert json.loads(reg.stdout)["version"] == 1
    shown = runner.invoke(app, ["models", "list", "--registry", registry, "--json"])
    assert [m["version"] for m in json.loads(shown.stdout)] == [1]


def test_failed_gate_keeps_artifacts_and_registers_nothing(
    tiny_model, tiny_evaluators, subject_dir, tmp_path
):
    run_dir, registry = str(tmp_path / "run"), str(tmp_path / "registry")
    cfg = tiny_run_config(tiny_model, tiny_evaluators, str(subject_dir), run_dir, registry)
    cfg["eval"]["gate"] = {"min_dino": 0.999}
    cfg["train"]["steps"] = 2
    result = _invoke_run(cfg, tmp_path)
    assert result.exit_code == 2
    assert "gate" in result.output.lower() and "dino" in result.output.lower()
    assert (tmp_path / "run" / "eval" / "metrics.json").exists()
    assert (tmp_path / "run" / "train" / "model" / "model_index.json").exists()
    assert json.loads((tmp_path / "run" / "run_result.json").read_text())["gate"]["passed"] is False
    assert not storage.list_files(str(tmp_path / "registry" / "red-square"))


def test_run_on_gcs(tiny_model, tiny_evaluators, subject_dir, gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    storage.copy_prefix(str(subject_dir), gcs_bucket + "/photos")
    cfg = tiny_run_config(
        tiny_model,
        tiny_evaluators,
        gcs_bucket + "/photos",
        gcs_bucket + "/run",
        gcs_bucket + "/registry",
        prior_root=gcs_bucket + "/priors",
    )
    cfg["evaluate"] = False
    result = _invoke_run(cfg, tmp_path)
    assert result.exit_code == 0, result.output
    names = {storage.relative(f, gcs_bucket + "/run") for f in storage.list_files(gcs_bucket + "/run")}
    for expected in (
        "config.json",
        "identifier.json",
        "ingest/manifest.json",
        "train/train_summary.json",
        "train/model/model_index.json",
        "samples/generate.json",
        "run_result.json",
    ):
        assert expected in names
    assert storage.list_files(gcs_bucket + "/registry/red-square")


# --- what the configuration means: no prior, no evaluation ----------------------------------------------------


def _quick_config(tiny_model, evaluators, images, tmp_path, **sections):
    """A RunConfig of the tiny run that trains 2 steps and neither samples nor evaluates unless told."""
    from dreambooth_lib.config import RunConfig

    cfg = tiny_run_config(tiny_model, evaluators, images, str(tmp_path / "run"), str(tmp_path / "registry"))
    cfg.update(samples_per_prompt=0, evaluate=False)
    cfg["train"]["steps"] = 2
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(values, dict) else values
    return RunConfig.model_validate(cfg)


@pytest.mark.parametrize(
    ("prior_settings", "train_settings", "warned"),
    [
        (
            {"num_images": 0},
            {"prior_loss_weight": 1.0},
            True,
        ),  # no images asked for: λ read as 0, with a warning
        ({"num_images": 200}, {"prior_loss_weight": 0.0}, False),  # λ 0: the 200 images are not sampled
    ],
)
def test_either_setting_zero_turns_prior_preservation_off(
    tiny_model,
    tiny_evaluators,
    subject_dir,
    tmp_path,
    monkeypatch,
    caplog,
    prior_settings,
    train_settings,
    warned,
):
    from dreambooth_lib import prior
    from dreambooth_lib.runs import personalize

    def no_sampling(*args, **kwargs):
        raise AssertionError("prior.run called although prior preservation is off")

    monkeypatch.setattr(prior, "run", no_sampling)
    config = _quick_config(
        tiny_model, tiny_evaluators, str(subject_dir), tmp_path, prior=prior_settings, train=train_settings
    )
    result = personalize.run(config)
    summary = json.loads((tmp_path / "run" / "train" / "train_summary.json").read_text())
    assert summary["num_prior_images"] == 0 and summary["config"]["prior_loss_weight"] == 0.0
    assert result.prior_preservation is False and result.prior_uri is None
    assert not (tmp_path / "run" / "priors").exists() and not (tmp_path / "run" / "prior.json").exists()
    record = json.loads((tmp_path / "run" / "run_result.json").read_text())
    assert record["prior_preservation"] is False and "prior    off" in result.summary()
    if warned:
        (warning,) = record["warnings"]
        assert warning.startswith(
            "prior.num_images is 0 but train.prior_loss_weight is 1.0: prior preservation is off"
        )
        assert "set train.prior_loss_weight: 0" in warning and warning in caplog.text
    else:
        assert record["warnings"] == []


def test_the_model_output_prior_samples_nothing_and_trains_against_the_base(
    tiny_model, tiny_evaluators, subject_dir, tmp_path, monkeypatch
):
    from dreambooth_lib import prior
    from dreambooth_lib.runs import personalize

    def no_sampling(*args, **kwargs):
        raise AssertionError("prior.run called although the model-output prior needs no images")

    monkeypatch.setattr(prior, "run", no_sampling)
    config = _quick_config(
        tiny_model, tiny_evaluators, str(subject_dir), tmp_path, prior={"mode": "model_output"}
    )
    result = personalize.run(config)
    summary = json.loads((tmp_path / "run" / "train" / "train_summary.json").read_text())
    assert summary["config"]["prior_mode"] == "model_output" and summary["config"]["prior_loss_weight"] == 1.0
    assert summary["num_prior_images"] == 0 and result.prior_uri is None
    assert result.prior_preservation is True and result.warnings == []
    assert "the frozen model's own predictions" in result.summary()


def test_gate_thresholds_without_evaluation_are_refused_before_any_work(
    tiny_model, tiny_evaluators, subject_dir, tmp_path
):
    from dreambooth_lib.errors import ConfigError
    from dreambooth_lib.runs import personalize

    config = _quick_config(
        tiny_model, tiny_evaluators, str(subject_dir), tmp_path, eval={"gate": {"min_dino": 0.5}}
    )
    with pytest.raises(ConfigError) as err:
        personalize.run(config)
    message = str(err.value)
    assert message.startswith("evaluate is false but eval.gate.min_dino set a quality gate for the registry")
    assert "set evaluate: true" in message and "remove the gate thresholds" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "registry").exists()
    # without a registry the thresholds guard nothing: the run goes ahead
    personalize.check_config(config.model_copy(update={"registry": None}))


def test_unevaluated_model_is_registered_as_not_evaluated(tiny_model, tiny_evaluators, subject_dir, tmp_path):
    """`evaluate: false` without thresholds registers the model as not evaluated, even when an earlier run of the
    same run directory left an evaluation of another model in eval/."""
    from dreambooth_lib.runs import personalize

    stale = tmp_path / "run" / "eval" / "metrics.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"metrics": {"dino": 0.9}, "gate": {"passed": True, "reasons": []}}))
    config = _quick_config(tiny_model, tiny_evaluators, str(subject_dir), tmp_path)
    result = personalize.run(config)
    registered = result.registered
    assert registered["version"] == 1 and registered["gate_passed"] is None and registered["metrics"] is None
    assert "Quality gate: not evaluated." in storage.read_text(registered["card_uri"])
    assert str(stale) not in storage.read_text(registered["lineage_uri"])
    assert "(v1, not evaluated)" in result.summary()
    assert list(result.step_times_s) == ["ingest", "identifier", "prior", "train", "register"]
