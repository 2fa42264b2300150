"""Send a compiled pipeline to Kubeflow Pipelines: a run, an enabled recurring run, or an upload to the UI.

Wraps kfp's Client (imported inside each function: dreambooth_lib imports no kfp at module level). Parameters
are read from a YAML/JSON file and coerced to the types the pipeline declares, then sent typed — unlike
`kfp recurring-run create`, which sends every value as a string and creates the schedule disabled unless given
`--enabled`. Secrets never travel as parameters: the compiled pipeline reads them from Kubernetes secrets.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import yaml
from pydantic import BaseModel

from dreambooth_lib import storage
from dreambooth_lib.config import load_config_text
from dreambooth_lib.errors import ConfigError, DreamboothError


class SubmitResult(BaseModel):
    run_id: str
    experiment_id: str | None = None
    url: str

    def __str__(self) -> str:
        return f"{self.run_id} ({self.url})"


class ScheduleResult(BaseModel):
    recurring_run_id: str
    cron: str
    enabled: bool
    max_concurrency: int
    url: str

    def __str__(self) -> str:
        state = "enabled" if self.enabled else "DISABLED"
        return f"{self.recurring_run_id} ({state}, cron '{self.cron}', {self.url})"


class UploadResult(BaseModel):
    pipeline_id: str
    name: str


# --- parameters ------------------------------------------------------------------------------------------------


def pipeline_parameters(package_path: str) -> dict[str, dict[str, Any]]:
    """The root inputs a compiled pipeline declares: {name: {"type": 'STRING'|'NUMBER_INTEGER'|..., "optional"}}."""
    if not storage.exists(package_path):
        raise ConfigError(f"{package_path}: compiled pipeline not found; run `make compile`")
    try:
        spec = next(iter(yaml.safe_load_all(storage.read_text(package_path))))  # 2nd doc: platform config
        declared = spec["root"]["inputDefinitions"].get("parameters", {})
    except (yaml.YAMLError, KeyError, TypeError):
        raise ConfigError(f"{package_path}: not a compiled KFP pipeline (no root.inputDefinitions)") from None
    return {
        name: {"type": p.get("parameterType", "STRING"), "optional": bool(p.get("isOptional", False))}
        for name, p in declared.items()
    }


def _coerce(name: str, value: Any, kind: str, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: parameter {name!r}: got {value!r}; expected {expected}")

    if kind == "STRING":
        if isinstance(value, (dict, list)):
            raise bad("a string")
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
    """A YAML/JSON file of pipeline parameters (local or gs://), typed by the pipeline's declared parameters."""
    if not storage.exists(path):
        raise ConfigError(f"{path}: parameters file not found")
    data = load_config_text(storage.read_text(path), path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values")
    return coerce_params(data, package_path, source=path)


# --- the client ------------------------------------------------------------------------------------------------


def _client(host: str, namespace: str | None = None, existing_token: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from kfp import Client

        try:
            return Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token)
        except Exception as err:
            raise DreamboothError(
                f"--host {host}: cannot reach the KFP API ({type(err).__name__}: {err})"
            ) from None


def _api_call(host: str, what: str, fn, *args, **kwargs):
    from kfp_server_api.exceptions import ApiException

    try:
        return fn(*args, **kwargs)
    except ApiException as err:
        raise DreamboothError(f"{host}: {what} refused ({err.status} {err.reason}): {err.body}") from None


def _ui(host: str, fragment: str) -> str:
    return f"{host.rstrip('/')}/#/{fragment}"


def submit_run(
    package_path: str,
    host: str,
    params: dict[str, Any] | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    namespace: str | None = None,
    *,
    enable_caching: bool | None = None,
    service_account: str | None = None,
    existing_token: str | None = None,
) -> SubmitResult:
    """Start one run of a compiled pipeline; `params` are checked and typed against the pipeline first."""
    values = coerce_params(params or {}, package_path)
    client = _client(host, namespace, existing_token)
    result = _api_call(
        host,
        "run creation",
        client.create_run_from_pipeline_package,
        package_path,
        arguments=values,
        run_name=run_name,
        experiment_name=experiment,
        namespace=namespace,
        enable_caching=enable_caching,
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
    host: str,
    params: dict[str, Any] | None = None,
    cron: str = "",
    experiment: str | None = None,
    job_name: str | None = None,
    max_concurrency: int = 1,
    namespace: str | None = None,
    *,
    enabled: bool = True,
    no_catchup: bool = True,
    enable_caching: bool | None = None,
    service_account: str | None = None,
    existing_token: str | None = None,
) -> ScheduleResult:
    """Create a recurring run, ENABLED by default, with typed parameters (see the module docstring's trap)."""
    cron = check_cron(cron)
    if max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {max_concurrency}: must be at least 1")
    values = coerce_params(params or {}, package_path)
    client = _client(host, namespace, existing_token)
    exp = _api_call(
        host, "experiment creation", client.create_experiment, experiment or "Default", namespace=namespace
    )
    name = job_name or storage.basename(package_path).split(".")[0]
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
        enable_caching=enable_caching,
        service_account=service_account,
    )
    mode = str(getattr(created, "mode", "") or ("ENABLE" if enabled else "DISABLE"))
    return ScheduleResult(
        recurring_run_id=created.recurring_run_id,
        cron=cron,
        enabled="DISABLE" not in mode.upper(),
        max_concurrency=max_concurrency,
        url=_ui(host, f"recurringrun/details/{created.recurring_run_id}"),
    )


def upload_pipeline(
    package_path: str,
    host: str,
    name: str | None = None,
    description: str | None = None,
    namespace: str | None = None,
    *,
    existing_token: str | None = None,
) -> UploadResult:
    """Upload a compiled pipeline so it appears in the Pipelines UI (runs can then be started from there)."""
    pipeline_parameters(package_path)  # a clear error for a missing or wrong file
    client = _client(host, namespace, existing_token)
    name = name or storage.basename(package_path).split(".")[0]
    uploaded = _api_call(
        host,
        "pipeline upload",
        client.upload_pipeline,
        package_path,
        pipeline_name=name,
        description=description,
    )
    return UploadResult(pipeline_id=uploaded.pipeline_id, name=name)
