"""A local stand-in for the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, for the real kfp client and CLI.

It answers the endpoints that kfp 2.17's `Client` and `kfp` CLI call — healthz, experiments, runs, recurring
runs, pipeline upload, pipeline versions — with the JSON the API server's gateway sends (snake_case fields, the
`{error, code, message}` body and HTTP status of a gRPC error), keeps every request and what it created, and can
demand a bearer token or a cookie the way the authenticating proxy in front of a real deployment does.

`resolve_root_inputs` applies the KFP v2 driver's parameter rules (backend/src/v2/driver/resolve.go: a STRING
input takes any value as its JSON text, every other type must arrive with its own JSON kind) to the parameters a
run was sent, so a test can show what a task would receive, or that it would fail, without a cluster.

Run it alone to try the documented `kfp` commands by hand:  python tests/kfp_api_stub.py --port 8888
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"
# google.rpc.Code -> the HTTP status grpc-gateway answers with
_GRPC = {
    "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409),
    "INVALID_ARGUMENT": (3, 400),
    "UNAUTHENTICATED": (16, 401),
}


class ApiError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class KfpApiStub:
    """The server and its state. Use as a context manager; `url` is the endpoint to give kfp (`--endpoint`)."""

    def __init__(self, *, multi_user: bool = False, token: str | None = None, cookie: str | None = None):
        self.multi_user = multi_user
        self.token = token  # when set, every request needs `Authorization: Bearer <token>`
        self.cookie = cookie  # when set, every request needs this `name=value` among its cookies
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- life cycle ----------------------------------------------------------------------------------------------

    def start(self, port: int = 0) -> KfpApiStub:
        stub = self

        class Handler(_Handler):
            def stub(self) -> KfpApiStub:
                return stub

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> KfpApiStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- what a test asks ----------------------------------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == API + path]

    def only_run(self) -> dict:
        (run,) = self.runs.values()
        return run

    def only_recurring_run(self) -> dict:
        (rr,) = self.recurring_runs.values()
        return rr

    # --- the API -------------------------------------------------------------------------------------------------

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers, body: bytes
    ) -> tuple[int, dict]:
        with self._lock:
            self._authenticate(headers)
            q = {k: v[0] for k, v in query.items()}
            parts = path[len(API) :].strip("/").split("/") if path.startswith(API) else []
            route = (method, *parts)
            if route == ("GET", "healthz"):
                return 200, {"multi_user": self.multi_user}
            if route == ("GET", "experiments"):
                found = self._filtered(self.experiments.values(), q)
                if "namespace" in q and q["namespace"]:
                    found = [e for e in found if e.get("namespace") == q["namespace"]]
                return 200, {"experiments": found, "total_size": len(found)}
            if route == ("POST", "experiments"):
                return 200, self._create_experiment(json.loads(body))
            if method == "GET" and parts[:1] == ["experiments"] and len(parts) == 2:
                return 200, self._get(self.experiments, parts[1], "experiment")
            if route == ("POST", "runs"):
                return 200, self._create_run(json.loads(body), self.runs, "run")
            if method == "GET" and parts[:1] == ["runs"] and len(parts) == 2:
                return 200, self._get(self.runs, parts[1], "run")
            if route == ("POST", "recurringruns"):
                return 200, self._create_run(json.loads(body), self.recurring_runs, "recurring_run")
            if method == "GET" and parts[:1] == ["recurringruns"] and len(parts) == 2:
                return 200, self._get(self.recurring_runs, parts[1], "recurring_run")
            if route == ("GET", "pipelines"):
                found = self._filtered(self.pipelines.values(), q)
                found = [p for p in found if p.get("namespace", "") == q.get("namespace", "")]
                return 200, {"pipelines": found, "total_size": len(found)}
            if route == ("POST", "pipelines", "upload"):
                return 200, self._upload_pipeline(q, _uploaded_file(headers, body))
            if route == ("POST", "pipelines", "upload_version"):
                return 200, self._upload_version(q, _uploaded_file(headers, body))
            if method == "GET" and parts[:1] == ["pipelines"] and len(parts) == 2:
                return 200, self._get(self.pipelines, parts[1], "pipeline")
            if method == "GET" and parts[:1] == ["pipelines"] and len(parts) == 3 and parts[2] == "versions":
                self._get(self.pipelines, parts[1], "pipeline")
                mine = [v for v in self.versions.values() if v["pipeline_id"] == parts[1]]
                found = self._filtered(sorted(mine, key=lambda v: v["created_at"]), q)
                if q.get("sort_by", "").endswith("desc"):
                    found.reverse()
                size = int(q.get("page_size") or 0) or len(found)
                return 200, {"pipeline_versions": found[:size], "total_size": len(found)}
            raise ApiError("NOT_FOUND", f"stub: no route {method} {path}")

    def _authenticate(self, headers) -> None:
        if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            raise ApiError("UNAUTHENTICATED", "Request header error: there is no user identity header.")
        if self.cookie is not None:
            cookies = [c.strip() for c in (headers.get("Cookie") or "").split(";")]
            if self.cookie not in cookies:
                raise ApiError("UNAUTHENTICATED", "Request header error: there is no user identity header.")

    @staticmethod
    def _filtered(items, query: dict[str, str]) -> list[dict]:
        """The `display_name EQUALS` predicate the client's look-ups by name send; other filters are not modelled."""
        items = list(items)
        if not query.get("filter"):
            return items
        for pred in json.loads(query["filter"]).get("predicates", []):
            if pred.get("key") == "display_name" and pred.get("operation") in (1, "EQUALS"):
                want = pred.get("stringValue", pred.get("string_value"))
                items = [i for i in items if i.get("display_name") == want]
        return items

    @staticmethod
    def _get(table: dict, key: str, what: str) -> dict:
        if key not in table:
            raise ApiError("NOT_FOUND", f"{what} {key} not found")
        return table[key]

    def _create_experiment(self, body: dict) -> dict:
        name = body.get("display_name") or ""
        if not name:
            raise ApiError(
                "INVALID_ARGUMENT", "Experiment name is empty. Please specify a valid experiment name."
            )
        if self.multi_user and not body.get("namespace"):
            raise ApiError("INVALID_ARGUMENT", "In multi-user mode, experiment namespace must be specified.")
        for e in self.experiments.values():
            if e["display_name"] == name and e.get("namespace") == body.get("namespace"):
                raise ApiError("ALREADY_EXISTS", f"experiment {name} already exists")
        exp = {
            "experiment_id": self._new_id("exp"),
            "display_name": name,
            "description": body.get("description") or "",
            "namespace": body.get("namespace") or "",
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[exp["experiment_id"]] = exp
        return exp

    def _create_run(self, body: dict, table: dict, kind: str) -> dict:
        if bool(body.get("pipeline_spec")) == bool(body.get("pipeline_version_reference")):
            raise ApiError(
                "INVALID_ARGUMENT", "a run needs exactly one of pipeline_spec, pipeline_version_reference"
            )
        if body.get("experiment_id") and body["experiment_id"] not in self.experiments:
            raise ApiError("NOT_FOUND", f"experiment {body['experiment_id']} not found")
        ref = body.get("pipeline_version_reference")
        if ref and ref.get("pipeline_version_id") not in self.versions:
            raise ApiError("NOT_FOUND", f"pipeline version {ref.get('pipeline_version_id')} not found")
        key = f"{kind}_id"
        created = {**body, key: self._new_id(kind.replace("_", "")), "created_at": _now()}
        if kind == "run":
            created.update(state="PENDING", storage_state="AVAILABLE")
        else:
            created["mode"] = body.get("mode") or "MODE_UNSPECIFIED"
            created["status"] = "ENABLED" if created["mode"] == "ENABLE" else "DISABLED"
        table[created[key]] = created
        return created

    def _upload_pipeline(self, q: dict[str, str], package: bytes) -> dict:
        name = q.get("name") or q.get("display_name") or ""
        namespace = q.get("namespace", "")
        if any(p["display_name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise ApiError(
                "ALREADY_EXISTS", f"Failed to create a pipeline: pipeline with name {name} already exists"
            )
        pipeline = {
            "pipeline_id": self._new_id("pipeline"),
            "display_name": name,
            "description": q.get("description", ""),
            "namespace": namespace,
            "created_at": _now(),
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        # the API server makes the first version itself, named after the pipeline
        self._add_version(pipeline["pipeline_id"], name, q.get("description", ""), package)
        return pipeline

    def _upload_version(self, q: dict[str, str], package: bytes) -> dict:
        pipeline_id = q.get("pipelineid") or ""
        self._get(self.pipelines, pipeline_id, "pipeline")
        name = q.get("name") or q.get("display_name") or ""
        if any(v["display_name"] == name and v["pipeline_id"] == pipeline_id for v in self.versions.values()):
            raise ApiError("ALREADY_EXISTS", f"pipeline version with name {name} already exists")
        return self._add_version(pipeline_id, name, q.get("description", ""), package)

    def _add_version(self, pipeline_id: str, name: str, description: str, package: bytes) -> dict:
        docs = [d for d in yaml.safe_load_all(package.decode()) if d is not None]
        if not docs or "root" not in docs[0]:
            raise ApiError("INVALID_ARGUMENT", "Failed to upload a pipeline: not a pipeline spec")
        version = {
            "pipeline_version_id": self._new_id("version"),
            "pipeline_id": pipeline_id,
            "display_name": name,
            "description": description,
            "created_at": _now(),
            "pipeline_spec": docs[0],
            "platform_spec": docs[1] if len(docs) > 1 else None,
        }
        self.versions[version["pipeline_version_id"]] = version
        return {k: v for k, v in version.items() if k != "platform_spec"}


class _Handler(BaseHTTPRequestHandler):
    def stub(self) -> KfpApiStub:  # replaced per server in KfpApiStub.start
        raise NotImplementedError

    def log_message(self, *args):  # quiet: the test reads stub.requests
        pass

    def _serve(self) -> None:
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        stub = self.stub()
        stub.requests.append(
            {
                "method": self.command,
                "path": url.path,
                "query": parse_qs(url.query),
                "headers": {k.lower(): v for k, v in self.headers.items()},  # names are case-insensitive
                "body": body,
            }
        )
        try:
            status, obj = stub.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
        except ApiError as err:
            code, status = _GRPC[err.code]
            obj = {"error": err.message, "code": code, "message": err.message, "details": []}
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve


def _uploaded_file(headers, body: bytes) -> bytes:
    """The `uploadfile` part of a multipart/form-data body (how the client sends a package)."""
    head = f"Content-Type: {headers.get('Content-Type')}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise ApiError("INVALID_ARGUMENT", "Failed to read a file from the request: no uploadfile part")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- what a task would receive ------------------------------------------------------------------------------------


class ParameterRejected(Exception):
    """The driver would fail the run's first task that consumes this parameter."""


def pipeline_spec_of(run: dict) -> dict:
    """The PipelineSpec a run or recurring run carries (the client nests it beside a platform spec when it has one)."""
    sent = run["pipeline_spec"]
    return sent.get("pipeline_spec", sent) if "root" not in sent else sent


def platform_spec_of(run: dict) -> dict | None:
    sent = run["pipeline_spec"]
    return None if "root" in sent else sent.get("platform_spec")


def _json_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        # strconv.FormatFloat(v, 'f', -1, 64): the shortest decimal that reads back, never an exponent
        number = float(value)
        return str(int(number)) if number.is_integer() else format(Decimal(repr(number)), "f")
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def resolve_root_inputs(spec: dict, parameters: dict[str, Any]) -> dict[str, Any]:
    """The value each declared root input takes in the tasks that consume it, by the v2 driver's rules.

    Raises ParameterRejected with the driver's message where a value has the wrong JSON kind (e.g. the string
    "800" for a NUMBER_INTEGER input) or a required input has neither a value nor a default.
    """
    kinds = {"NUMBER_INTEGER": (int, float), "NUMBER_DOUBLE": (int, float), "BOOLEAN": (bool,)}
    kinds.update(LIST=(list,), STRUCT=(dict,))
    resolved = {}
    for name, declared in spec["root"].get("inputDefinitions", {}).get("parameters", {}).items():
        kind = declared.get("parameterType", "STRING")
        if name not in parameters:
            if "defaultValue" not in declared and not declared.get("isOptional"):
                raise ParameterRejected(
                    f"neither value nor default value provided for non-optional parameter {name!r}"
                )
            resolved[name] = declared.get("defaultValue")
            continue
        value = parameters[name]
        if kind == "STRING":
            resolved[name] = value if isinstance(value, str) else _json_text(value)
            continue
        if value is None:
            raise ParameterRejected(f"got null for input parameter {name!r}")
        ok = isinstance(value, kinds.get(kind, (object,)))
        if kind.startswith("NUMBER") and isinstance(value, bool):
            ok = False
        if not ok:
            actual = {str: "string", bool: "bool", list: "list", dict: "struct"}.get(type(value), "number")
            raise ParameterRejected(f"input parameter {name!r} type mismatch: expect {kind}, got {actual}")
        resolved[name] = value
    return resolved


if __name__ == "__main__":  # pragma: no cover - by hand
    import argparse
    import time

    parser = argparse.ArgumentParser(description="A local stand-in for the KFP v2beta1 API.")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--multi-user", action="store_true")
    args = parser.parse_args()
    stub = KfpApiStub(multi_user=args.multi_user).start(args.port)
    print(f"KFP v2beta1 stand-in at {stub.url}; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.stop()
