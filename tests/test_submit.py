"""The user's way onto a cluster, against a local stand-in of the KFP v2beta1 API (tests/kfp_api_stub.py).

The real kfp client and the real `kfp` CLI talk HTTP to the stand-in; nothing of kfp is mocked. Covered: the
README's `make compile && kfp run create ...` line (what the run receives, with its types), the kfp CLI's traps
(unquoted values JSON-parsed, recurring runs disabled and untyped), and `dreambooth submit / schedule / upload`
with a token, a token file and cookies, `--json` that prints only JSON, and bad input as one line, exit 2.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kfp_api_stub import (
    KfpApiStub,
    ParameterRejected,
    pipeline_spec_of,
    platform_spec_of,
    resolve_root_inputs,
)
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
REQUIRED = {
    "base_model": "gs://b/sd15",
    "images_uri": "gs://b/dog",
    "subject_name": "dog",
    "class_noun": "dog",
}
BATCH_REQUIRED = {
    "manifest_uri": "gs://b/m.yaml",
    "base_model": "gs://b/sd15",
    "batch_root": "gs://b/batches",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Path]:
    """What `make compile` writes for KFP, compiled from the current pipeline code into a scratch folder."""
    from kfp import compiler

    from pipelines.compile import build
    from pipelines.placement import load_placement

    out = tmp_path_factory.mktemp("compiled")
    placement = load_placement("gke", {})
    paths = {}
    for name in ("personalize", "batch_personalize"):
        paths[name] = out / f"{name}.kfp.yaml"
        compiler.Compiler().compile(build(name, placement), str(paths[name]))
    return paths


@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> dict[str, str]:
    """No KFP endpoint, token or context of this machine leaks in; returns the environment for a subprocess."""
    for var in list(os.environ):
        if var.startswith(("KF_PIPELINES_", "KFP_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import kfp.client.client

    # the client reads (and in multi-user mode writes) ~/.config/kfp/context.json, resolved at import time
    monkeypatch.setattr(
        kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "home" / "context.json")
    )
    return dict(os.environ)


@pytest.fixture
def stub(clean_env):
    with KfpApiStub() as server:
        yield server


def _kfp_cli() -> str:
    found = shutil.which("kfp", path=str(Path(sys.executable).parent)) or shutil.which("kfp")
    assert found, "the kfp package's `kfp` command is not installed beside this Python"
    return found


def _documented_command(text: str, start: str) -> str:
    """The shell command in `text` that begins with `start`, its backslash-continued lines joined."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith(start))
    command = []
    for line in lines[first:]:
        command.append(line.strip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(command)


def _one_line_exit_2(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- parameters ------------------------------------------------------------------------------------------------


def test_module_imports_no_kfp():
    code = "import sys, dreambooth_lib.submit; print([m for m in sys.modules if m == 'kfp' or m.startswith('kfp.')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_params_file_is_typed_by_the_pipeline(tmp_path, compiled):
    from dreambooth_lib import submit

    params = tmp_path / "params.yaml"
    params.write_text(
        "base_model: gs://b/sd15\nimages_uri: gs://b/dog\nsubject_name: 007\nclass_noun: dog\n"
        "steps: '800'\nprior_loss_weight: 1\nlive: 'true'\ngate_thresholds: '{\"min_dino\": 0.5}'\n"
        "eval_prompts: ['a {0} {1}']\nprior_root: null\n"
    )
    values = submit.load_params(str(params), str(compiled["personalize"]))
    assert values["subject_name"] == "007"  # as written; YAML alone reads 007 as the number 7
    assert values["steps"] == 800 and isinstance(values["steps"], int)
    assert values["prior_loss_weight"] == 1.0 and isinstance(values["prior_loss_weight"], float)
    assert values["live"] is True
    assert values["gate_thresholds"] == {"min_dino": 0.5}
    assert values["eval_prompts"] == ["a {0} {1}"]
    assert "prior_root" not in values  # null: the pipeline's default


def test_params_errors_name_the_parameter(tmp_path, compiled):
    from dreambooth_lib import submit
    from dreambooth_lib.errors import ConfigError

    package = str(compiled["personalize"])
    with pytest.raises(ConfigError, match="unknown parameter.*hf_token"):
        submit.coerce_params({"hf_token": "x"}, package)
    with pytest.raises(ConfigError, match="missing required parameter.*class_noun"):
        submit.coerce_params({"base_model": "m", "images_uri": "i", "subject_name": "s"}, package)
    with pytest.raises(ConfigError, match="'steps'.*an integer"):
        submit.coerce_params({**REQUIRED, "steps": "many"}, package)
    with pytest.raises(ConfigError, match="not found.*make compile"):
        submit.pipeline_parameters(str(tmp_path / "nope.yaml"))


# --- the README's kfp line, and the kfp CLI's traps ------------------------------------------------------------


@pytest.mark.parametrize(
    "stub_options, env",
    [
        ({"token": "a-token"}, {"KFP_EXISTING_TOKEN": "a-token"}),  # behind a proxy that wants a bearer token
        (
            {"multi_user": True},
            {"KFP_NAMESPACE": "kubeflow-user"},
        ),  # a multi-user Kubeflow: the profile namespace
    ],
)
def test_the_readme_kfp_line_creates_the_run_it_describes(stub_options, env, compiled, clean_env):
    start = "make compile && .venv/bin/kfp "
    line = _documented_command((REPO / "README.md").read_text(), start)
    assert _documented_command((REPO / "docs" / "cluster.md").read_text(), start) == line
    kfp_line = line.removeprefix("make compile && ")
    assert "-f pipelines/compiled/personalize.kfp.yaml" in kfp_line
    command = kfp_line.replace(".venv/bin/kfp", shlex.quote(_kfp_cli()), 1).replace(
        "pipelines/compiled/personalize.kfp.yaml", shlex.quote(str(compiled["personalize"]))
    )
    with KfpApiStub(**stub_options) as api:
        environment = {**clean_env, **env, "KFP_HOST": api.url}
        proc = subprocess.run(
            ["bash", "-c", command], env=environment, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        run = api.only_run()
    if "token" in stub_options:
        assert all(r["headers"].get("authorization") == "Bearer a-token" for r in api.requests)
    experiment = api.experiments[run["experiment_id"]]
    assert experiment["display_name"] == "dreambooth"
    assert experiment["namespace"] == env.get("KFP_NAMESPACE", "")
    assert run["display_name"] == "rex-007"
    spec = pipeline_spec_of(run)
    assert spec["pipelineInfo"]["name"] == "dreambooth-personalize"
    assert spec == pipeline_spec_of({"pipeline_spec": _yaml_docs(compiled["personalize"])})
    assert "nodeSelector" in json.dumps(platform_spec_of(run))  # the Kubernetes placement travels with it
    sent = run["runtime_config"]["parameters"]
    assert sent == {
        "base_model": "gs://my-bucket/models/sd15",
        "images_uri": "gs://my-bucket/subjects/rex",
        "subject_name": "007",
        "class_noun": "dog",
        "live": True,
        "steps": 800,
        "prior_root": "gs://my-bucket/priors",
        "checkpoint_root": "gs://my-bucket/checkpoints",
        "registry_uri": "gs://my-bucket/registry",
        "eval_prompts": ["a {0} {1} on the beach", "a {0} {1} in the snow"],
        "gate_thresholds": {"min_dino": 0.5, "min_clip_t": 0.25},
    }
    assert type(sent["steps"]) is int and type(sent["live"]) is bool
    received = resolve_root_inputs(spec, sent)  # what the tasks get, by the driver's rules
    assert received["subject_name"] == "007" and received["steps"] == 800


def _yaml_docs(path: Path) -> dict:
    import yaml

    spec, platform = yaml.safe_load_all(path.read_text())
    return {"pipeline_spec": spec, "platform_spec": platform}


def test_kfp_cli_reads_an_unquoted_value_as_json(stub, compiled, clean_env):
    """`subject_name=007` arrives as the number 7, and the task sees the string "7" (the deprecated alias
    `kfp run submit` is the same command)."""
    args = [
        f"{k}={v}" for k, v in {**REQUIRED, "subject_name": "007", "steps": "800", "live": "True"}.items()
    ]
    cmd = [
        _kfp_cli(),
        "--endpoint",
        stub.url,
        "run",
        "submit",
        "-e",
        "dogs",
        "-f",
        str(compiled["personalize"]),
    ]
    proc = subprocess.run(cmd + args, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'submit' is deprecated, use 'create'" in proc.stderr
    sent = stub.only_run()["runtime_config"]["parameters"]
    assert sent["subject_name"] == 7 and sent["steps"] == 800 and sent["live"] is True
    assert resolve_root_inputs(pipeline_spec_of(stub.only_run()), sent)["subject_name"] == "7"


def test_kfp_recurring_run_create_is_disabled_and_untyped(stub, compiled, clean_env):
    """The trap `dreambooth schedule` avoids: without --enabled the schedule is off, and every value is a string,
    so an integer input fails in its first task."""
    cmd = [_kfp_cli(), "--endpoint", stub.url, "recurring-run", "create", "--experiment-name", "nightly"]
    cmd += ["--job-name", "nightly", "--cron-expression", "0 0 2 * * *"]
    cmd += ["--pipeline-package-path", str(compiled["batch_personalize"])]
    cmd += [f"{k}={v}" for k, v in {**BATCH_REQUIRED, "steps": "800"}.items()]
    proc = subprocess.run(cmd, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rr = stub.only_recurring_run()
    assert rr["mode"] == "DISABLE"
    assert rr["runtime_config"]["parameters"]["steps"] == "800"
    with pytest.raises(ParameterRejected, match="'steps' type mismatch: expect NUMBER_INTEGER, got string"):
        resolve_root_inputs(pipeline_spec_of(rr), rr["runtime_config"]["parameters"])


# --- dreambooth submit / schedule / upload ---------------------------------------------------------------------


def test_submit_sends_the_spec_and_typed_params(stub, compiled):
    from dreambooth_lib import submit

    result = submit.submit_run(
        str(compiled["personalize"]),
        submit.KfpEndpoint(host=stub.url),
        {**REQUIRED, "steps": "400", "live": "true"},
        experiment="dogs",
        run_name="dog-1",
        pipeline_root="gs://b/pipeline-root",
    )
    run = stub.only_run()
    assert result.run_id == run["run_id"] and result.url.endswith(f"/#/runs/details/{run['run_id']}")
    assert result.experiment_id == run["experiment_id"]
    assert stub.experiments[run["experiment_id"]]["display_name"] == "dogs"
    assert run["display_name"] == "dog-1"
    assert pipeline_spec_of(run)["pipelineInfo"]["name"] == "dreambooth-personalize"
    assert "cloud.google.com/gke-accelerator" in json.dumps(platform_spec_of(run))
    assert run["runtime_config"]["pipeline_root"] == "gs://b/pipeline-root"
    sent = run["runtime_config"]["parameters"]
    assert sent == {**REQUIRED, "steps": 400, "live": True}
    # the compiled per-task caching holds: nothing at submission overrode it
    tasks = pipeline_spec_of(run)["root"]["dag"]["tasks"]
    assert tasks["fingerprint-inputs"]["cachingOptions"] == {}
    assert resolve_root_inputs(pipeline_spec_of(run), sent)["steps"] == 400


def test_submit_json_prints_only_json_with_a_token_file(compiled, clean_env, tmp_path):
    """The console command itself: kfp's "Run details: ..." lines go to stderr; the token comes from the file
    $KF_PIPELINES_SA_TOKEN_PATH names, as kfp.Client reads it."""
    token = tmp_path / "token"
    token.write_text("projected-token\n")
    params = tmp_path / "rex.yaml"
    params.write_text("".join(f"{k}: {v}\n" for k, v in REQUIRED.items()))
    dreambooth = shutil.which("dreambooth", path=str(Path(sys.executable).parent))
    assert dreambooth, "the dreambooth console script is not installed beside this Python"
    with KfpApiStub(token="projected-token") as api:
        host = api.url
        env = {**clean_env, "KF_PIPELINES_SA_TOKEN_PATH": str(token), "KF_PIPELINES_ENDPOINT": host}
        cmd = [dreambooth, "submit", str(compiled["personalize"]), "--params", str(params), "--json"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        run = api.only_run()
    out = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert out == {
        "run_id": run["run_id"],
        "experiment_id": run["experiment_id"],
        "url": f"{host}/#/runs/details/{run['run_id']}",
    }
    assert "Run details:" in proc.stderr
    assert {r["headers"].get("authorization") for r in api.requests} == {"Bearer projected-token"}


def test_existing_token_and_cookies_reach_the_api(compiled, clean_env):
    from dreambooth_lib import submit

    with KfpApiStub(token="tok", cookie="authservice_session=abc") as api:
        auth = submit.KfpAuth(existing_token="tok", cookies="authservice_session=abc")
        submit.submit_run(str(compiled["personalize"]), submit.KfpEndpoint(host=api.url, auth=auth), REQUIRED)
        assert api.only_run()["runtime_config"]["parameters"] == REQUIRED
        for request in api.requests:
            assert request["headers"]["authorization"] == "Bearer tok"
            assert request["headers"]["cookie"] == "authservice_session=abc"


def test_a_refused_credential_is_one_line_exit_2(compiled, clean_env):
    from dreambooth_lib.cli import app

    with KfpApiStub(token="right") as api:
        result = runner.invoke(
            app,
            ["submit", str(compiled["personalize"]), "--params", str(_params_file(compiled, REQUIRED))]
            + ["--host", api.url, "--existing-token", "wrong"],
        )
        assert api.runs == {}
        # one health check, not the client's five attempts 5 s apart
        assert len(api.calls("GET", "/healthz")) == 1
    line = _one_line_exit_2(result)
    assert "401" in line and "--existing-token" in line


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (
            ["--host", "http://127.0.0.1:9"],
            {"KF_PIPELINES_SA_TOKEN_PATH": "{tmp}/absent"},
            r"\$KF_PIPELINES_SA_TOKEN_PATH .*absent",
        ),
        (["--host", "http://127.0.0.1:9", "--token-file", "{tmp}/empty"], {}, r"--token-file .*empty.*empty"),
        ([], {}, r"--host: the KFP API endpoint is required"),
        (
            ["--host", "http://127.0.0.1:9", "--pipeline-root", "/data/root"],
            {},
            r"--pipeline-root /data/root: .*gs://",
        ),
        (["--host", "http://127.0.0.1:9", "--params", "{tmp}/bad.yaml"], {}, r"bad.yaml: not valid YAML"),
        (
            ["--host", "http://127.0.0.1:9", "--params", "{tmp}/unknown.yaml"],
            {},
            r"unknown parameter\(s\) hf_token",
        ),
        (
            ["--host", "http://127.0.0.1:9", "--params", "{tmp}/missing.yaml"],
            {},
            r"missing.yaml: parameters file not found",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args, env, expected, compiled, clean_env, tmp_path, monkeypatch):
    from dreambooth_lib.cli import app

    (tmp_path / "empty").write_text("")
    (tmp_path / "bad.yaml").write_text("steps: [800\n")
    (tmp_path / "unknown.yaml").write_text("hf_token: x\n")
    for var, value in env.items():
        monkeypatch.setenv(var, value.format(tmp=tmp_path))
    args = [a.format(tmp=tmp_path) for a in args]
    if "--params" not in args:  # valid parameters: the failure is the one named
        args += ["--params", str(_params_file(compiled, REQUIRED))]
    result = runner.invoke(app, ["submit", str(compiled["personalize"]), *args])
    assert re.search(expected, _one_line_exit_2(result)), result.stderr


def test_a_missing_package_is_one_line_exit_2(clean_env, tmp_path):
    from dreambooth_lib.cli import app

    for command in (["submit"], ["upload"], ["schedule", "--cron", "0 0 2 * * *"]):
        result = runner.invoke(
            app, [*command, str(tmp_path / "nope.kfp.yaml"), "--host", "http://127.0.0.1:9"]
        )
        assert "nope.kfp.yaml: compiled pipeline not found; run `make compile`" in _one_line_exit_2(result)


def test_multi_user_needs_the_profile_namespace(compiled, clean_env):
    from dreambooth_lib import submit
    from dreambooth_lib.errors import DreamboothError

    with KfpApiStub(multi_user=True) as api:
        with pytest.raises(DreamboothError, match="namespace must be specified"):
            submit.submit_run(str(compiled["personalize"]), submit.KfpEndpoint(host=api.url), REQUIRED)
        in_profile = submit.KfpEndpoint(host=api.url, namespace="kubeflow-user")
        submit.submit_run(str(compiled["personalize"]), in_profile, REQUIRED)
        run = api.only_run()
        assert api.experiments[run["experiment_id"]]["namespace"] == "kubeflow-user"


def test_schedule_is_enabled_with_cron_and_typed_params(stub, compiled):
    from dreambooth_lib.cli import app

    result = runner.invoke(
        app,
        [
            "schedule",
            str(compiled["batch_personalize"]),
            "--host",
            stub.url,
            "--cron",
            "0 0 2 * * *",
            "--params",
            str(_params_file(compiled, {**BATCH_REQUIRED, "prior_size": 100})),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    rr = stub.only_recurring_run()
    assert json.loads(result.stdout)["recurring_run_id"] == rr["recurring_run_id"]
    assert json.loads(result.stdout)["enabled"] is True
    assert rr["mode"] == "ENABLE" and rr["display_name"] == "dreambooth-batch-personalize"
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert int(rr["max_concurrency"]) == 1 and rr["no_catchup"] is True
    assert rr["runtime_config"]["parameters"] == {**BATCH_REQUIRED, "prior_size": 100}
    assert pipeline_spec_of(rr)["pipelineInfo"]["name"] == "dreambooth-batch-personalize"
    resolve_root_inputs(pipeline_spec_of(rr), rr["runtime_config"]["parameters"])  # every type as declared


def _params_file(compiled, values: dict) -> Path:
    path = compiled["personalize"].parent / f"params-{abs(hash(json.dumps(values, sort_keys=True)))}.json"
    path.write_text(json.dumps(values))
    return path


def test_schedule_refuses_a_five_field_cron(compiled):
    from dreambooth_lib import submit
    from dreambooth_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean '0 0 2 \\* \\* \\*'"):
        nowhere = submit.KfpEndpoint(host="http://127.0.0.1:9")
        submit.schedule_run(str(compiled["batch_personalize"]), nowhere, {}, cron="0 2 * * *")


def test_upload_makes_a_pipeline_then_versions_of_it(stub, compiled, tmp_path, clean_env):
    from dreambooth_lib import submit
    from dreambooth_lib.cli import app

    package = tmp_path / "personalize.kfp.yaml"
    package.write_text(compiled["personalize"].read_text())
    endpoint = submit.KfpEndpoint(host=stub.url)
    first = submit.upload_pipeline(str(package), endpoint)
    assert first.created == "pipeline" and first.name == "dreambooth-personalize"
    assert stub.pipelines[first.pipeline_id]["display_name"] == "dreambooth-personalize"

    again = runner.invoke(app, ["upload", str(package), "--host", stub.url, "--json"])
    assert again.exit_code == 0, again.stderr
    second = submit.UploadResult(**json.loads(again.stdout))
    assert second.created == "version" and second.pipeline_id == first.pipeline_id
    assert second.version_name == submit.default_version_name(str(package))
    assert stub.versions[second.pipeline_version_id]["pipeline_spec"] == _yaml_docs(package)["pipeline_spec"]

    same = submit.upload_pipeline(str(package), endpoint)
    assert same.created == "nothing" and same.pipeline_version_id == second.pipeline_version_id

    package.write_text(package.read_text() + "\n# recompiled\n")
    changed = submit.upload_pipeline(str(package), endpoint, version_name="v2")
    assert changed.created == "version" and changed.version_name == "v2"
    assert len(stub.pipelines) == 1 and len(stub.versions) == 3

    # a run of the uploaded version, the way the docs start one with the kfp CLI
    cmd = [_kfp_cli(), "--endpoint", stub.url, "run", "create", "-e", "dogs", "-p", changed.pipeline_id]
    cmd += ["-v", changed.pipeline_version_id, *[f"{k}={v}" for k, v in REQUIRED.items()]]
    proc = subprocess.run(cmd, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert stub.only_run()["pipeline_version_reference"] == {
        "pipeline_id": changed.pipeline_id,
        "pipeline_version_id": changed.pipeline_version_id,
    }
