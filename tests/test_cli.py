"""The `dreambooth` command: examples in every --help, --json output, exit 2 + one line for user errors."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import typer.main
from typer.testing import CliRunner

from dreambooth_lib import config as configs
from dreambooth_lib.cli import app
from dreambooth_lib.testing.synthetic import make_subject_images

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _commands(typer_app, prefix=()):
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
        [
            "identifier",
            "--model",
            str(tmp_path / "m"),
            "--class-noun",
            "dog",
            "--json",
            "--exclude",
            data["identifier"],
        ],
    )
    assert json.loads(other.stdout)["identifier"] != data["identifier"]


def test_user_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreambooth_lib.cli",
            "identifier",
            "--model",
            str(tmp_path / "missing"),
            "--class-noun",
            "dog",
        ],
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
    cfg = configs.load_run_config(preset)
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


# --- options bound to config fields: the model's default and description, and only what the user gave --------

REQUIRED_ARGS = {
    "ingest": ["SRC", "OUT", "--class-noun", "dog"],
    "identifier": ["--model", "M", "--class-noun", "dog"],
    "prior": ["--model", "M", "--class-noun", "dog", "--root", "R"],
    "train": ["--model", "M", "--instance-dir", "I", "--prior-dir", "P", "--identifier", "zwx",
              "--class-noun", "dog", "--out", "O"],
    "evaluate": ["--model", "M", "--real-images", "I", "--identifier", "zwx", "--class-noun", "dog",
                 "--out", "O"],
}  # fmt: skip
CONFIG_OF = {
    "ingest": configs.IngestConfig,
    "identifier": configs.IdentifierConfig,
    "prior": configs.PriorConfig,
    "train": configs.TrainConfig,
    "evaluate": configs.EvalConfig,
}
# the module whose `run` each command calls, and where its config arrives (a keyword, else a position)
STEP_OF = {
    "ingest": ("dreambooth_lib.ingest", 2),
    "identifier": ("dreambooth_lib.identifier", 2),
    "prior": ("dreambooth_lib.prior", 2),
    "train": ("dreambooth_lib.train", 5),
    "evaluate": ("dreambooth_lib.evaluate", 5),
    "generate": ("dreambooth_lib.generate", None),
    "run": ("dreambooth_lib.runs.personalize", 0),
}


class AnyResult(mock.MagicMock):
    """A step's result for commands whose step is replaced: any attribute, formatted with any spec."""

    def __format__(self, spec):
        return "0"


@pytest.fixture
def step_calls(monkeypatch):
    """Replace each step's `run` by a recorder: {command: (args, kwargs)} of the last call, nothing is run."""
    import importlib

    calls = {}
    for command, (module, _) in STEP_OF.items():

        def record(*args, _command=command, **kwargs):
            calls[_command] = (args, kwargs)
            return AnyResult(name=f"{_command} result")

        monkeypatch.setattr(importlib.import_module(module), "run", record)
    return calls


def _config_passed(calls, command):
    args, _ = calls[command]
    return args[STEP_OF[command][1]]


def _command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("command", sorted(CONFIG_OF))
def test_options_left_out_leave_every_config_default_in_place(command, step_calls):
    result = runner.invoke(app, [command, *REQUIRED_ARGS[command], "--json"])
    assert result.exit_code == 0, result.output
    config, empty = _config_passed(step_calls, command), CONFIG_OF[command]()
    # the CLI set no field (only what the model fills in itself): a changed default reaches the step as is
    assert config.model_fields_set == empty.model_fields_set and config == empty


def test_an_option_given_sets_only_its_field(step_calls):
    result = runner.invoke(app, ["train", *REQUIRED_ARGS["train"], "--steps", "7", "--no-compile", "--json"])
    assert result.exit_code == 0, result.output
    config = _config_passed(step_calls, "train")
    assert config.model_fields_set == {"steps", "compile"} | configs.TrainConfig().model_fields_set
    assert config.steps == 7 and config.compile is False


def test_lora_without_a_learning_rate_gets_the_config_default_for_lora(step_calls):
    result = runner.invoke(app, ["train", *REQUIRED_ARGS["train"], "--mode", "lora", "--json"])
    assert result.exit_code == 0, result.output
    config = _config_passed(step_calls, "train")
    assert (
        config.learning_rate
        == configs.TrainConfig(mode="lora").learning_rate
        != configs.TrainConfig(mode="full").learning_rate
    )


@pytest.mark.parametrize("command", sorted(CONFIG_OF))
def test_option_help_shows_the_config_default_and_description(command):
    model, cmd = CONFIG_OF[command], _command(command)
    params = {p.name: p for p in cmd.params}
    bound = [name for name, p in params.items() if name in model.model_fields and not p.required]
    assert len(bound) >= 2, bound
    ctx = cmd.make_context(command, list(REQUIRED_ARGS[command]))
    for name in bound:
        field = model.model_fields[name]
        help_text = params[name].get_help_record(ctx)[1]
        if field.description and name != "resolution":  # prior's --resolution says what None means there
            assert field.description in help_text, name
        if isinstance(field.default, bool):
            assert f"[default: ({'' if field.default else 'no-'}{name.replace('_', '-')})]" in help_text, name
        elif field.default is not None:
            assert f"[default: ({field.default})]" in help_text, name
        else:
            assert "[default:" not in help_text, name


def test_train_options_override_a_config_file(tmp_path, step_calls):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("steps: 300\nlora_rank: 8\nmode: lora\n")
    args = ["train", *REQUIRED_ARGS["train"], "--config", str(config_file), "--steps", "20", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = _config_passed(step_calls, "train")
    assert (config.mode, config.lora_rank, config.steps) == ("lora", 8, 20)


# --- bugs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noun", ["", " "])
def test_ingest_refuses_an_empty_class_noun_naming_the_flag(tmp_path, noun):
    photos = make_subject_images(tmp_path / "photos", n=3, size=64)
    args = ["ingest", str(photos), str(tmp_path / "out"), "--class-noun", noun, "--min-side", "32"]
    result = runner.invoke(app, [*args, "--resolution", "64"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --class-noun") and "e.g." in lines[0]
    assert not (tmp_path / "out").exists()


def test_identifier_requires_a_class_noun(tiny_model):
    result = runner.invoke(app, ["identifier", "--model", tiny_model, "--json"])
    assert result.exit_code == 2
    assert "--class-noun" in result.output


MODEL_COMMANDS = {
    "identifier": REQUIRED_ARGS["identifier"],
    "prior": REQUIRED_ARGS["prior"],
    "train": REQUIRED_ARGS["train"],
    "generate": ["--model", "M", "--prompt", "a zwx dog", "--out", "O"],
    "evaluate": REQUIRED_ARGS["evaluate"],
}


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_every_command_that_loads_a_model_passes_allow_pickle_on(command, step_calls):
    result = runner.invoke(app, [command, *MODEL_COMMANDS[command], "--json"])
    assert result.exit_code == 0, result.output
    assert step_calls[command][1]["allow_pickle"] is False
    result = runner.invoke(app, [command, *MODEL_COMMANDS[command], "--allow-pickle", "--json"])
    assert result.exit_code == 0, result.output
    assert step_calls[command][1]["allow_pickle"] is True


def test_run_allow_pickle_sets_the_run_config(tmp_path, step_calls):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("base_model: m\nrun_dir: r\nsubject: {name: d, class_noun: dog, images: p}\n")
    assert runner.invoke(app, ["run", "--config", str(config_file), "--json"]).exit_code == 0
    assert _config_passed(step_calls, "run").allow_pickle is False
    result = runner.invoke(app, ["run", "--config", str(config_file), "--allow-pickle", "--json"])
    assert result.exit_code == 0, result.output
    assert _config_passed(step_calls, "run").allow_pickle is True


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_base_model_reaches_the_step(command, step_calls):
    result = runner.invoke(app, [command, *MODEL_COMMANDS[command], "--base-model", "B", "--json"])
    assert result.exit_code == 0, result.output
    assert step_calls[command][1]["base_model"] == "B"
