"""submit/schedule/upload against a stand-in KFP API server on localhost that records what the client sends."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipelines" / "compiled" / "personalize.kfp.yaml"
BATCH_PACKAGE = REPO / "pipelines" / "compiled" / "batch_personalize.kfp.yaml"


class _KfpStandIn(BaseHTTPRequestHandler):
    """Answers the v2beta1 endpoints kfp.Client calls; every request is appended to `server.requests`."""

    def log_message(self, *args):  # quiet
        pass

    def _record(self, body: bytes) -> dict:
        url = urlparse(self.path)
        entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query), "raw": body}
        try:
            entry["json"] = json.loads(body) if body else None
        except ValueError:
            entry["json"] = None
        self.server.requests.append(entry)
        return entry

    def _reply(self, obj: dict, code: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        entry = self._record(b"")
        if entry["path"].endswith("/healthz"):
            return self._reply({"multi_user": False})
        if entry["path"] == "/apis/v2beta1/experiments":
            return self._reply({"experiments": [], "total_size": 0})
        return self._reply({"error": "not found"}, 404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        entry = self._record(body)
        p = entry["path"]
        if p == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": entry["json"]["display_name"]})
        if p == "/apis/v2beta1/runs":
            return self._reply(
                {"run_id": "run-1", "experiment_id": entry["json"].get("experiment_id"), "state": "PENDING"}
            )
        if p == "/apis/v2beta1/recurringruns":
            return self._reply(
                {"recurring_run_id": "rr-1", "mode": entry["json"].get("mode", "MODE_UNSPECIFIED")}
            )
        if p.startswith("/apis/v2beta1/pipelines/upload"):
            return self._reply({"pipeline_id": "pl-1", "display_name": entry["query"].get("name", [""])[0]})
        return self._reply({"error": "not found"}, 404)


@pytest.fixture
def kfp_server(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp's client reads/writes ~/.config/kfp/context.json
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KfpStandIn)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _spec(body: dict) -> dict:
    """The pipeline spec sent; with a platform config (kfp-kubernetes) the client nests both side by side."""
    sent = body["pipeline_spec"]
    return sent.get("pipeline_spec", sent)


def _posts(server, path):
    return [r for r in server.requests if r["method"] == "POST" and r["path"] == path]


def test_module_imports_no_kfp():
    import subprocess

    code = "import sys, dreambooth_lib.submit; print([m for m in sys.modules if m == 'kfp' or m.startswith('kfp.')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_params_file_is_typed_by_the_pipeline(tmp_path):
    from dreambooth_lib import submit

    params = tmp_path / "params.yaml"
    params.write_text(
        "base_model: gs://b/sd15\nimages_uri: gs://b/dog\nsubject_name: dog\nclass_noun: dog\n"
        "steps: '800'\nprior_loss_weight: 1\nlive: 'true'\ngate_thresholds: '{\"min_dino\": 0.5}'\n"
        "eval_prompts: ['a {0} {1}']\n"
    )
    values = submit.load_params(str(params), str(PACKAGE))
    assert values["steps"] == 800 and isinstance(values["steps"], int)
    assert values["prior_loss_weight"] == 1.0 and isinstance(values["prior_loss_weight"], float)
    assert values["live"] is True
    assert values["gate_thresholds"] == {"min_dino": 0.5}
    assert values["eval_prompts"] == ["a {0} {1}"]


def test_params_errors_name_the_parameter(tmp_path):
    from dreambooth_lib import submit
    from dreambooth_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown parameter.*hf_token"):
        submit.coerce_params({"hf_token": "x"}, str(PACKAGE))
    with pytest.raises(ConfigError, match="missing required parameter.*class_noun"):
        submit.coerce_params({"base_model": "m", "images_uri": "i", "subject_name": "s"}, str(PACKAGE))
    base = {"base_model": "m", "images_uri": "i", "subject_name": "s", "class_noun": "dog"}
    with pytest.raises(ConfigError, match="'steps'.*an integer"):
        submit.coerce_params({**base, "steps": "many"}, str(PACKAGE))
    with pytest.raises(ConfigError, match="not found.*make compile"):
        submit.pipeline_parameters(str(tmp_path / "nope.yaml"))


def test_submit_sends_the_spec_and_typed_params(kfp_server):
    from dreambooth_lib import submit

    server, host = kfp_server
    params = {
        "base_model": "gs://b/sd15",
        "images_uri": "gs://b/dog",
        "subject_name": "dog",
        "class_noun": "dog",
    }
    result = submit.submit_run(
        str(PACKAGE), host, {**params, "steps": "400", "live": "true"}, experiment="dogs", run_name="dog-1"
    )
    assert result.run_id == "run-1" and result.url.endswith("/#/runs/details/run-1")
    exp = _posts(server, "/apis/v2beta1/experiments")
    assert exp and exp[0]["json"]["display_name"] == "dogs"
    (run,) = _posts(server, "/apis/v2beta1/runs")
    body = run["json"]
    assert body["display_name"] == "dog-1" and body["experiment_id"] == "exp-1"
    assert _spec(body)["pipelineInfo"]["name"] == "dreambooth-personalize"
    # the Kubernetes placement travels with it (node selector of the GPU steps)
    platform = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]
    assert "cloud.google.com/gke-accelerator" in json.dumps(platform)
    sent = body["runtime_config"]["parameters"]
    assert sent["steps"] == 400 and sent["live"] is True and sent["class_noun"] == "dog"


def test_schedule_is_enabled_with_cron_and_typed_params(kfp_server):
    from dreambooth_lib import submit

    server, host = kfp_server
    params = {"manifest_uri": "gs://b/m.yaml", "base_model": "gs://b/sd15", "batch_root": "gs://b/batches"}
    result = submit.schedule_run(
        str(BATCH_PACKAGE), host, {**params, "prior_size": 100}, cron="0 0 2 * * *", max_concurrency=1
    )
    assert result.enabled and result.recurring_run_id == "rr-1"
    (rr,) = _posts(server, "/apis/v2beta1/recurringruns")
    body = rr["json"]
    assert body["mode"] == "ENABLE"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["runtime_config"]["parameters"]["prior_size"] == 100
    assert _spec(body)["pipelineInfo"]["name"] == "dreambooth-batch-personalize"


def test_schedule_refuses_a_five_field_cron():
    from dreambooth_lib import submit
    from dreambooth_lib.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean '0 0 2 \\* \\* \\*'"):
        submit.schedule_run(str(BATCH_PACKAGE), "http://127.0.0.1:9", {}, cron="0 2 * * *")


def test_upload_posts_the_package(kfp_server):
    from dreambooth_lib import submit

    server, host = kfp_server
    result = submit.upload_pipeline(str(PACKAGE), host, name="dreambooth-personalize")
    assert result.pipeline_id == "pl-1"
    (up,) = [r for r in server.requests if r["path"].startswith("/apis/v2beta1/pipelines/upload")]
    assert b"dreambooth-personalize" in up["raw"] and b"pipelineInfo" in up["raw"]
