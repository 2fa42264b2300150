"""The `dreambooth` command: examples in every --help, --json output, exit 2 + one line for user errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dreambooth_lib.cli import app
from dreambooth_lib.config import load_run_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    stack = [(prefix, group)]
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            stack.extend((path + (name,), c) for name, c in subs.items())
        else:
            yield path


def test_every_command_has_an_example_in_its_help():
    names = list(_commands(app))
    assert {("ingest",), ("identifier",), ("tiny-model",), ("run",), ("train",), ("prior",)} <= set(names)
    for path in names:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example:" in result.output, f"{' '.join(path)} --help has no example"


def test_tiny_model_and_identifier_json(tmp_path):
    result = runner.invoke(app, ["tiny-model", str(tmp_path / "m"), "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(tmp_path / "m")
    assert (tmp_path / "m" / "model_index.json").exists()
    out = runner.invoke(app, ["identifier", "--model", str(tmp_path / "m"), "--class-noun", "dog", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["prompt"] == f"a {data['identifier']} dog" and data["token_id"] >= 40000
    again = runner.invoke(
        app, ["identifier", "--model", str(tmp_path / "m"), "--class-noun", "dog", "--json"]
    )
    assert json.loads(again.stdout)["identifier"] == data["identifier"]
    other = runner.invoke(
        app,
        ["identifier", "--model", str(tmp_path / "m"), "--json", "--exclude", data["identifier"]],
    )
    assert json.loads(other.stdout)["identifier"] != data["identifier"]


def test_user_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_lib.cli", "identifier", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "missing" in lines[-1] and "no such folder" in lines[-1]


def test_bad_config_names_the_field(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "base_model: m\nrun_dir: r\nsubject: {name: d, class_noun: dog, images: p}\ntrain: {steps: 0}\n"
    )
    result = runner.invoke(app, ["run", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "train.steps" in result.output and "got 0" in result.output


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_run_config(preset)
    assert cfg.train.resolution == cfg.ingest.resolution
    text = preset.read_text()
    assert text.startswith("#") and "dreambooth run --config" in text  # opens with the command that runs it


def test_train_refuses_a_cuda_graph_with_fp16_in_one_line(tmp_path):
    result = runner.invoke(
        app,
        ["train", "--model", str(tmp_path / "m"), "--instance-dir", str(tmp_path), "--prior-dir", str(tmp_path),
         "--identifier", "zwx", "--class-noun", "dog", "--out", str(tmp_path / "out"),
         "--cuda-graph", "--mixed-precision", "fp16"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "cuda_graph: true cannot be combined with mixed_precision: fp16" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_tiny_sdxl_model_has_two_text_encoders_and_an_identifier(tmp_path):
    result = runner.invoke(app, ["tiny-model", str(tmp_path / "xl"), "--sdxl", "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    out = runner.invoke(app, ["identifier", "--model", str(tmp_path / "xl"), "--class-noun", "dog", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["token_id"] >= 40000
