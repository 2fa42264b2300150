"""Send a compiled pipeline to Kubeflow Pipelines: a run, an enabled recurring run, or an upload (a new pipeline
or a new version of one).

Wraps kfp's Client (imported inside each function: dreambooth_lib imports no kfp at module level). Parameters
are read from a YAML/JSON file and coerced to the types the pipeline declares, then sent typed — unlike
`kfp recurring-run create`, which sends every value as a string and creates the schedule disabled unless given
`--enabled`, and `kfp run create`, which JSON-parses every value (`subject_name=007` arrives as the number 7).
Secrets never travel as parameters: the compiled pipeline reads them from Kubernetes secrets.

Authentication, in the order tried: a bearer token given directly (`existing_token`), a token file (`token_file`,
else $KF_PIPELINES_SA_TOKEN_PATH, else the path Kubeflow mounts a pipelines token at, when it exists) re-read on
every request as kfp.Client reads it in a cluster, and a Cookie header (`cookies`) for an authenticating proxy.
Nothing here writes to stdout: kfp's own "Experiment details: ..." lines go to stderr, so `--json` output is
only JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from dreambooth_lib import storage
from dreambooth_lib.config import load_config_text
from dreambooth_lib.errors import ConfigError, DreamboothError

TOKEN_PATH_ENV = (
    "KF_PIPELINES_SA_TOKEN_PATH"  # the variable kfp.Client reads (kfp.client.KF_PIPELINES_SA_TOKEN_ENV)
)
PIPELINE_ROOT_SCHEMES = ("gs://", "s3://", "minio://")  # what the KFP launcher can store artifacts in


class SubmitResult(BaseModel):
    run_id: str
    experiment_id: str | None = None
    url: str

    def __str__(self) -> str:
        return f"{self.run_id} ({self.url})"


class ScheduleResult(BaseModel):
    recurring_run_id: str
    experiment_id: str | None = None
    cron: str
    enabled: bool
    max_concurrency: int
    url: str

    def __str__(self) -> str:
        state = "enabled" if self.enabled else "DISABLED"
        return f"{self.recurring_run_id} ({state}, cron '{self.cron}', {self.url})"


class UploadResult(BaseModel):
    pipeline_id: str
    pipeline_version_id: str
    name: str
    version_name: str
    created: Literal["pipeline", "version", "nothing"]  # "nothing": this exact version was already there
    url: str

    def __str__(self) -> str:
        what = {"pipeline": "new pipeline", "version": "new version", "nothing": "already uploaded"}[
            self.created
        ]
        return f"{self.name} version {self.version_name!r} ({what}; {self.url})"


class KfpAuth(BaseModel):
    """How to authenticate to the KFP API; all unset: no credentials (a port-forward, an open endpoint)."""

    existing_token: str | None = None
    token_file: str | None = None
    cookies: str | None = None


class KfpEndpoint(BaseModel):
    """The KFP API a call goes to: its host, the profile namespace (multi-user deployments; None: "kubeflow")
    and the credentials."""

    host: str | None = None
    namespace: str | None = None
    auth: KfpAuth = Field(default_factory=KfpAuth)


# --- parameters ------------------------------------------------------------------------------------------------


def _pipeline_doc(package_path: str) -> dict[str, Any]:
    if not storage.exists(package_path):
        raise ConfigError(f"{package_path}: compiled pipeline not found; run `make compile`")
    try:
        spec = next(iter(yaml.safe_load_all(storage.read_text(package_path))))  # 2nd doc: platform config
        spec["root"]["inputDefinitions"]
    except (yaml.YAMLError, KeyError, TypeError, StopIteration):
        raise ConfigError(f"{package_path}: not a compiled KFP pipeline (no root.inputDefinitions)") from None
    return spec


def pipeline_parameters(package_path: str) -> dict[str, dict[str, Any]]:
    """The root inputs a compiled pipeline declares: {name: {"type": 'STRING'|'NUMBER_INTEGER'|..., "optional"}}."""
    declared = _pipeline_doc(package_path)["root"]["inputDefinitions"].get("parameters", {})
    return {
        name: {"type": p.get("parameterType", "STRING"), "optional": bool(p.get("isOptional", False))}
        for name, p in declared.items()
    }


def pipeline_name(package_path: str) -> str:
    """The name the pipeline was compiled with (pipelineInfo.name), e.g. 'dreambooth-personalize'."""
    name = (_pipeline_doc(package_path).get("pipelineInfo") or {}).get("name")
    if not name:
        raise ConfigError(f"{package_path}: no pipelineInfo.name; give --name")
    return name


def _coerce(name: str, value: Any, kind: str, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: parameter {name!r}: got {value!r}; expected {expected}")

    if kind == "STRING":
        if isinstance(value, (dict, list)):
            raise bad("a string")
        if isinstance(value, bool):
            return json.dumps(value)  # the text the KFP driver would make of it: true/false
        return value if isinstance(value, str) else str(value)
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("true or false")
    if kind == "NUMBER_INTEGER":
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if kind == "NUMBER_DOUBLE":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if kind in ("LIST", "STRUCT"):
        expected_type, word = (list, "a list") if kind == "LIST" else (dict, "a mapping")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad(f"{word} (or its JSON text)") from None
        if not isinstance(value, expected_type):
            raise bad(word)
        return value
    return value


def coerce_params(params: dict[str, Any], package_path: str, source: str = "parameters") -> dict[str, Any]:
    """Check names against the pipeline and give every value the declared type; missing required ones fail."""
    declared = pipeline_parameters(package_path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(
            f"{source}: unknown parameter(s) {', '.join(unknown)} for {package_path}; "
            f"it takes: {', '.join(sorted(declared))}"
        )
    missing = sorted(n for n, p in declared.items() if not p["optional"] and n not in params)
    if missing:
        raise ConfigError(f"{source}: missing required parameter(s) {', '.join(missing)} for {package_path}")
    return {name: _coerce(name, value, declared[name]["type"], source) for name, value in params.items()}


def load_params(path: str, package_path: str) -> dict[str, Any]:
    """A YAML/JSON file of pipeline parameters (local or gs://), typed by the pipeline's declared parameters.

    A string parameter takes the text as written: YAML reads `subject_name: 007` as the number 7 (and `010` as
    8, `yes` as true), which would name the subject "7"; here it stays "007". A null value means "not given"
    (the pipeline's default).
    """
    if not storage.exists(path):
        raise ConfigError(f"{path}: parameters file not found")
    text = storage.read_text(path)
    try:
        data = load_config_text(text, path)
    except ConfigError as err:  # the YAML parser's message spans lines; the CLI prints one
        raise ConfigError(" ".join(str(err).split())) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values")
    declared = pipeline_parameters(package_path)
    written = (
        {} if path.endswith(".json") else yaml.load(text, Loader=yaml.BaseLoader) or {}
    )  # scalars as text
    values = {}
    for name, value in data.items():
        if value is None:
            continue
        is_string = declared.get(name, {}).get("type") == "STRING"
        if is_string and not isinstance(value, str) and isinstance(written.get(name), str):
            value = written[name]
        values[name] = value
    return coerce_params(values, package_path, source=path)


# --- the client ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr():
    """kfp.Client print()s links ("Run details: ..."); a library's stdout belongs to its caller (--json)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _default_token_path() -> str:
    from kfp.client import KF_PIPELINES_SA_TOKEN_PATH

    return KF_PIPELINES_SA_TOKEN_PATH


def _client_auth(auth: KfpAuth) -> dict[str, Any]:
    """kfp.Client keyword arguments for `auth` (see the module docstring for the order)."""
    kwargs: dict[str, Any] = {"cookies": auth.cookies or None}
    if auth.existing_token:
        if auth.token_file:
            raise ConfigError("--existing-token and --token-file: give one of them")
        return {**kwargs, "existing_token": auth.existing_token.strip()}
    path, source = auth.token_file, "--token-file"
    if not path and os.environ.get(TOKEN_PATH_ENV):
        path, source = os.environ[TOKEN_PATH_ENV], f"${TOKEN_PATH_ENV}"
    if not path:
        path, source = _default_token_path(), "the in-cluster token path"
        if not os.path.isfile(path):
            return kwargs
    try:
        token = open(path).read().strip()
    except OSError as err:
        raise ConfigError(f"{source} {path}: cannot read the KFP token ({err.strerror})") from None
    if not token:
        raise ConfigError(f"{source} {path}: the token file is empty")
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    # Projected service-account tokens are rotated by the kubelet: re-read the file on every request.
    return {**kwargs, "credentials": ServiceAccountTokenVolumeCredentials(path)}


def _auth_hint(status: int | None) -> str:
    if status in (401, 403):
        return "; check --existing-token, --token-file / $KF_PIPELINES_SA_TOKEN_PATH or --cookies"
    return ""


def _api_message(body: Any) -> str:
    """The API's one-line reason: the `message` of its JSON error body, else the body's text."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        text = json.loads(text).get("message") or text
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:300]


def _client(endpoint: KfpEndpoint):
    host = endpoint.host
    if not host:
        raise ConfigError(
            "--host: the KFP API endpoint is required, e.g. https://kubeflow.example.com/pipeline"
        )
    kwargs = _client_auth(endpoint.auth)
    with _stdout_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from kfp import Client
        from kfp_server_api.exceptions import ApiException

        class OneHealthCheck(Client):
            # kfp.Client asks healthz up to 5 times, 5 s apart, logging a traceback each time; a refused
            # credential or a wrong host deserves one clear answer at once.
            def get_kfp_healthz(self, sleep_duration: int = 5):
                return self._healthz_api.healthz_service_get_healthz()

        try:
            return OneHealthCheck(host=host, namespace=endpoint.namespace or "kubeflow", **kwargs)
        except ApiException as err:
            raise DreamboothError(
                f"--host {host}: the KFP API refused ({err.status} {err.reason}): {_api_message(err.body)}"
                f"{_auth_hint(err.status)}"
            ) from None
        except Exception as err:
            raise DreamboothError(
                f"--host {host}: cannot reach the KFP API ({type(err).__name__}: {' '.join(str(err).split())})"
            ) from None


def _api_call(host: str, what: str, fn, *args, **kwargs):
    import urllib3
    from kfp_server_api.exceptions import ApiException

    with _stdout_to_stderr():
        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            raise DreamboothError(
                f"{host}: {what} refused ({err.status} {err.reason}): {_api_message(err.body)}"
                f"{_auth_hint(err.status)}"
            ) from None
        except urllib3.exceptions.HTTPError as err:
            raise DreamboothError(
                f"{host}: {what}: cannot reach the KFP API ({type(err).__name__})"
            ) from None
        except ValueError as err:  # kfp's own checks, e.g. two experiments or pipelines of one name
            raise DreamboothError(f"{host}: {what}: {err}") from None


def _ui(host: str, fragment: str) -> str:
    return f"{host.rstrip('/')}/#/{fragment}"


def _local_package(package_path: str) -> str:
    if "://" in package_path:
        raise ConfigError(
            f"{package_path}: the compiled pipeline must be a local file (the kfp client reads it)"
        )
    pipeline_parameters(package_path)  # a clear error for a missing or wrong file
    return package_path


def check_pipeline_root(pipeline_root: str | None) -> str | None:
    """None/'' keeps the cluster's default root (the `kfp-launcher` ConfigMap); else an object-store URI.

    On a cluster every task is its own pod: artifacts live only where the launcher uploads them.
    """
    if not pipeline_root:
        return None
    if not pipeline_root.startswith(PIPELINE_ROOT_SCHEMES):
        raise ConfigError(
            f"--pipeline-root {pipeline_root}: must be an object store the KFP launcher writes to "
            f"({', '.join(PIPELINE_ROOT_SCHEMES)}), e.g. gs://my-bucket/pipeline-root; a local path exists only "
            "inside one pod"
        )
    return pipeline_root


def _prepare_run(
    package_path: str, endpoint: KfpEndpoint, params: dict[str, Any] | None, pipeline_root: str | None
) -> tuple[str, dict[str, Any], str | None, Any]:
    """What a run and a recurring run check before the first API call: the package (local, a compiled
    pipeline), the parameters typed against it, the pipeline root; then the client."""
    package_path = _local_package(package_path)
    values = coerce_params(params or {}, package_path)
    return package_path, values, check_pipeline_root(pipeline_root), _client(endpoint)


def submit_run(
    package_path: str,
    endpoint: KfpEndpoint,
    params: dict[str, Any] | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    *,
    pipeline_root: str | None = None,
    service_account: str | None = None,
) -> SubmitResult:
    """Start one run of a compiled pipeline; `params` are checked and typed against the pipeline first.

    No caching override is offered: kfp's `enable_caching` would set every top-level task alike, re-enabling
    caching on the tasks compiled uncached (they read or write the registry).
    """
    package_path, values, pipeline_root, client = _prepare_run(package_path, endpoint, params, pipeline_root)
    host, namespace = endpoint.host, endpoint.namespace
    result = _api_call(
        host,
        "run creation",
        client.create_run_from_pipeline_package,
        package_path,
        arguments=values,
        run_name=run_name,
        experiment_name=experiment,
        namespace=namespace,
        pipeline_root=pipeline_root,
        service_account=service_account,
    )
    return SubmitResult(
        run_id=result.run_id,
        experiment_id=getattr(result.run_info, "experiment_id", None),
        url=_ui(host, f"runs/details/{result.run_id}"),
    )


def check_cron(cron: str) -> str:
    """KFP's scheduler takes 6 fields (seconds first); a 5-field crontab line would fire at the wrong times."""
    fields = cron.split()
    if len(fields) == 5:
        raise ConfigError(
            f"--cron '{cron}': KFP cron has 6 fields 'SEC MIN HOUR DOM MON DOW'; did you mean '0 {cron}'?"
        )
    if len(fields) != 6:
        raise ConfigError(f"--cron '{cron}': expected 6 space-separated fields 'SEC MIN HOUR DOM MON DOW'")
    return " ".join(fields)


def schedule_run(
    package_path: str,
    endpoint: KfpEndpoint,
    params: dict[str, Any] | None = None,
    cron: str = "",
    experiment: str | None = None,
    job_name: str | None = None,
    max_concurrency: int = 1,
    *,
    enabled: bool = True,
    no_catchup: bool = True,
    pipeline_root: str | None = None,
    service_account: str | None = None,
) -> ScheduleResult:
    """Create a recurring run, ENABLED by default, with typed parameters (see the module docstring's trap)."""
    cron = check_cron(cron)
    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {max_concurrency}: must be at least 1")
    package_path, values, pipeline_root, client = _prepare_run(package_path, endpoint, params, pipeline_root)
    host, namespace = endpoint.host, endpoint.namespace
    exp = _api_call(
        host, "experiment creation", client.create_experiment, experiment or "Default", namespace=namespace
    )
    name = job_name or pipeline_name(package_path)
    created = _api_call(
        host,
        "recurring run creation",
        client.create_recurring_run,
        experiment_id=exp.experiment_id,
        job_name=name,
        cron_expression=cron,
        max_concurrency=max_concurrency,
        no_catchup=no_catchup,
        params=values,
        pipeline_package_path=package_path,
        enabled=enabled,
        pipeline_root=pipeline_root,
        service_account=service_account,
    )
    mode = str(getattr(created, "mode", "") or ("ENABLE" if enabled else "DISABLE"))
    return ScheduleResult(
        recurring_run_id=created.recurring_run_id,
        experiment_id=exp.experiment_id,
        cron=cron,
        enabled="DISABLE" not in mode.upper(),
        max_concurrency=max_concurrency,
        url=_ui(host, f"recurringrun/details/{created.recurring_run_id}"),
    )


def default_version_name(package_path: str) -> str:
    """`<package version>-<12 hex of the file's sha256>`: a re-upload of the same file is the same version."""
    from dreambooth_lib import __version__

    digest = hashlib.sha256(open(package_path, "rb").read()).hexdigest()[:12]
    return f"{__version__}-{digest}"


def _by_name(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def upload_pipeline(
    package_path: str,
    endpoint: KfpEndpoint,
    name: str | None = None,
    description: str | None = None,
    *,
    version_name: str | None = None,
) -> UploadResult:
    """Upload a compiled pipeline to the Pipelines UI: a new pipeline, or a new version of the one of that name.

    A pipeline's versions keep every compiled YAML it was given, so runs started from the UI can pick one;
    uploading the same file twice finds its version (named by the file's digest) instead of failing.
    """
    package_path = _local_package(package_path)
    name = name or pipeline_name(package_path)
    client, host, namespace = _client(endpoint), endpoint.host, endpoint.namespace
    listed = _api_call(
        host,
        "pipeline look-up",
        client.list_pipelines,
        filter=_by_name(name),
        namespace=namespace,
        page_size=2,
    )
    existing = listed.pipelines or []
    if len(existing) > 1:
        raise DreamboothError(
            f"{host}: more than one pipeline is named {name!r}; give --name of a unique one"
        )
    if not existing:
        pipeline = _api_call(
            host,
            "pipeline upload",
            client.upload_pipeline,
            package_path,
            pipeline_name=name,
            description=description,
            namespace=namespace,
        )
        newest = _api_call(
            host,
            "pipeline version look-up",
            client.list_pipeline_versions,
            pipeline.pipeline_id,
            sort_by="created_at desc",
            page_size=1,
        )
        (first,) = newest.pipeline_versions or [None]
        if first is None:
            raise DreamboothError(f"{host}: pipeline {name!r} was uploaded but has no version")
        version, created = first, "pipeline"
    else:
        pipeline_id = existing[0].pipeline_id
        version_name = version_name or default_version_name(package_path)
        same = _api_call(
            host,
            "pipeline version look-up",
            client.list_pipeline_versions,
            pipeline_id,
            filter=_by_name(version_name),
            page_size=1,
        )
        if same.pipeline_versions:
            version, created = same.pipeline_versions[0], "nothing"
        else:
            version = _api_call(
                host,
                "pipeline version upload",
                client.upload_pipeline_version,
                package_path,
                pipeline_version_name=version_name,
                pipeline_id=pipeline_id,
                description=description,
            )
            created = "version"
    return UploadResult(
        pipeline_id=version.pipeline_id,
        pipeline_version_id=version.pipeline_version_id,
        name=name,
        version_name=version.display_name,
        created=created,
        url=_ui(host, f"pipelines/details/{version.pipeline_id}/version/{version.pipeline_version_id}"),
    )
