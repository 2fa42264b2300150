"""A stand-in for the KFP v2 driver and launcher: a compiled pipeline spec run task by task, each task a pod.

On Kubeflow Pipelines every task is its own pod in its own image. The driver resolves the task's inputs (pipeline
parameters, constants, upstream output parameters and artifacts) into an ExecutorInput; the launcher in the pod
downloads only the task's *declared* input artifacts from the object store to the local paths the executor derives
from their URIs (gs://b/p -> /gcs/b/p), runs the container's command, then uploads each output artifact's local
contents to its gs:// URI and reports the output parameters. A retried pod starts on an empty disk with the same
ExecutorInput. `kfp.local` shares one filesystem between tasks, so it cannot show a task reading something it did
not declare; this harness can:

- each task attempt gets a new, empty root (cwd, HOME, TMPDIR, DREAMBOOTH_CACHE, HF_HOME inside it), a fresh
  process in its own process group and an environment built from scratch (nothing of the test process leaks in);
- artifacts live only in the object store (fake-gcs-server through STORAGE_EMULATOR_HOST) between tasks; the
  root is deleted after the task, so a path string naming another task's files names nothing;
- the container command and args come from the spec's deploymentSpec, placeholders substituted as the launcher
  does, with this interpreter in place of `python3` (the image's Python is this venv here).

The one liberty: the launcher's pod sees the object store at `/gcs/`, one prefix per pod. Here tasks share the
machine, so the executor is started through `python kfp_launcher.py` (the shim at the bottom), which points kfp's
`artifact_types._GCS_LOCAL_MOUNT_PREFIX` at `<task root>/gcs/` before calling kfp's own `executor_main` -- the
same patch kfp's executor tests use. That models the per-pod mount without root privileges or a mount namespace
(which needs CAP_SYS_ADMIN and a /gcs directory on the host). The local paths thus differ per attempt, which is
stricter than the launcher: anything keyed on a local path rather than content would show up here too.

Not modelled: caching (every task runs), retry backoff (a retry starts at once), ParallelFor iterators, exit
handlers and task final status, resources and kfp-kubernetes platform config (node selectors, secrets).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GCS = "gs://"
MOUNT_ENV = "KFP_LAUNCHER_GCS_MOUNT"  # the shim reads the task's private mount prefix from here
EXECUTOR_MAIN = "python3 -m kfp.dsl.executor_main"  # what the lightweight-component command runs
REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.05  # how often a running task's monitor is asked whether to act (an event wait, not a timing)


# --- the object store -------------------------------------------------------------------------------------------


class ObjectStore:
    """The launcher's view of gs://: download a prefix to a folder, upload a folder to a prefix, list, read."""

    def __init__(self) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        if not os.environ.get("STORAGE_EMULATOR_HOST"):
            raise RuntimeError("the harness talks to an emulator only: set STORAGE_EMULATOR_HOST")
        self._client = gcs.Client(project="test", credentials=AnonymousCredentials())

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        if not uri.startswith(GCS):
            raise ValueError(f"{uri}: not a gs:// URI")
        bucket, _, name = uri[len(GCS) :].partition("/")
        return bucket, name.strip("/")

    def list(self, prefix: str) -> list[str]:
        """Object names (full URIs) at `prefix` itself or below `prefix/`."""
        bucket, name = self.split(prefix)
        found = []
        for blob in self._client.list_blobs(bucket, prefix=name):
            if blob.name == name or not name or blob.name.startswith(name + "/"):
                found.append(f"{GCS}{bucket}/{blob.name}")
        return sorted(found)

    def read_bytes(self, uri: str) -> bytes:
        bucket, name = self.split(uri)
        return self._client.bucket(bucket).blob(name).download_as_bytes()

    def exists(self, uri: str) -> bool:
        bucket, name = self.split(uri)
        return self._client.bucket(bucket).blob(name).exists()

    def upload(self, local: str | Path, uri: str) -> list[str]:
        """A file to the object `uri`, or a folder's files below `uri/`. Returns the objects written."""
        local = Path(local)
        bucket, name = self.split(uri)
        files = [(local, name)] if local.is_file() else []
        if local.is_dir():
            files = [
                (p, f"{name}/{p.relative_to(local).as_posix()}")
                for p in sorted(local.rglob("*"))
                if p.is_file()
            ]
        for path, object_name in files:
            self._client.bucket(bucket).blob(object_name).upload_from_filename(str(path))
        return [f"{GCS}{bucket}/{n}" for _, n in files]

    def download(self, uri: str, local: str | Path) -> int:
        """The object `uri` to the file `local`, or the objects below `uri/` into the folder `local`."""
        local = Path(local)
        bucket, name = self.split(uri)
        count = 0
        for blob in self._client.list_blobs(bucket, prefix=name):
            if blob.name == name:
                target = local
            elif blob.name.startswith(name + "/"):
                target = local / blob.name[len(name) + 1 :]
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target))
            count += 1
        return count


# --- records of a run -------------------------------------------------------------------------------------------


@dataclass
class RuntimeArtifact:
    """An artifact as the driver passes it between tasks: where it lives and what the producer said about it."""

    uri: str
    metadata: dict[str, Any]
    schema_title: str
    schema_version: str = "0.0.1"

    def executor_fields(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "uri": self.uri,
            "metadata": self.metadata,
            "type": {"schemaTitle": self.schema_title, "schemaVersion": self.schema_version},
        }


@dataclass
class Attempt:
    """One pod of a task: its root (deleted afterwards), exit status and log."""

    root: Path
    returncode: int | None = None
    log: str = ""
    wall_s: float = 0.0  # staging in, the process and staging out


@dataclass
class TaskRecord:
    name: str  # the task's path in the DAG, e.g. "condition-1/register-model"
    state: str = "PENDING"  # SUCCEEDED, FAILED, SKIPPED
    executor_input: dict[str, Any] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, RuntimeArtifact] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class RunResult:
    run_id: str
    outputs: dict[str, RuntimeArtifact]  # the pipeline's output artifacts
    tasks: dict[str, TaskRecord]

    def task(self, name: str) -> TaskRecord:
        """A task by its name in its own DAG (the last part of its path)."""
        found = [r for path, r in self.tasks.items() if path.split("/")[-1] == name]
        if len(found) != 1:
            raise KeyError(
                f"{name!r}: {len(found)} tasks of that name ran or were skipped; tasks: {sorted(self.tasks)}"
            )
        return found[0]


class TaskFailed(RuntimeError):
    """A task's last attempt exited non-zero (as the run's failed node in the KFP UI)."""

    def __init__(self, task: str, attempt: Attempt, attempts: int) -> None:
        self.task, self.attempt = task, attempt
        tail = attempt.log[-6000:]
        super().__init__(
            f"task {task!r} failed (exit code {attempt.returncode}, attempt {attempts}):\n{tail}"
        )


class RunningTask:
    """What a monitor sees of a running attempt: the task, the attempt number and its process group."""

    def __init__(self, name: str, attempt: int, proc: subprocess.Popen, root: Path) -> None:
        self.name, self.attempt, self.proc, self.root = name, attempt, proc, root
        self.killed = False

    def kill(self) -> None:
        """SIGKILL the whole process group, as a preempted node takes the pod down."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.killed = True


Monitor = Callable[[RunningTask], None]


# --- the driver and launcher --------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> dict[str, Any]:
    """The PipelineSpec (the first YAML document of a compiled file; the platform config is not used here)."""
    import yaml

    return next(iter(yaml.safe_load_all(Path(path).read_text())))


class Launcher:
    """Runs a compiled pipeline spec the way the KFP v2 backend does, task by task in isolated roots.

    `env`: what the image and the pod spec would set (thread counts, offline flags); STORAGE_EMULATOR_HOST is
    passed on. `work_dir`: where task roots are made (each deleted after its task). `honor_retries`: rerun a failed
    task per its retryPolicy (without the backoff wait), else fail on the first failure. `monitors`: {task name:
    fn(RunningTask)}, called while that task runs (e.g. to kill it mid-way)."""

    def __init__(
        self,
        spec: dict[str, Any],
        pipeline_root: str,
        work_dir: str | Path,
        *,
        env: dict[str, str] | None = None,
        honor_retries: bool = False,
        monitors: dict[str, Monitor] | None = None,
    ) -> None:
        if not pipeline_root.startswith(GCS):
            raise ValueError(
                f"{pipeline_root}: the pipeline root must be gs:// (artifacts live in the object store)"
            )
        self.spec = spec
        self.pipeline_root = pipeline_root.rstrip("/")
        self.work_dir = Path(work_dir)
        self.extra_env = dict(env or {})
        self.honor_retries = honor_retries
        self.monitors = dict(monitors or {})
        self.store = ObjectStore()
        self.pipeline_name = spec["pipelineInfo"]["name"]

    # --- the run ---

    def run(self, arguments: dict[str, Any], run_id: str | None = None) -> RunResult:
        """Run the root DAG with `arguments` (the pipeline parameters); raises TaskFailed on a failed task."""
        run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
        root = self.spec["root"]
        params = self._pipeline_parameters(root.get("inputDefinitions", {}), arguments)
        records: dict[str, TaskRecord] = {}
        outputs = self._run_dag(root["dag"], {"parameters": params, "artifacts": {}}, run_id, "", records)
        return RunResult(run_id=run_id, outputs=outputs["artifacts"], tasks=records)

    def rerun_task(self, result: RunResult, name: str, parameters: dict[str, Any], run_id: str) -> TaskRecord:
        """Run one finished task of `result` again with some input parameters replaced, outputs under `run_id`.

        Its input artifacts are the same objects in the store; it is a new pod like any other."""
        record = result.task(name)
        executor_input = json.loads(json.dumps(record.executor_input))
        executor_input["inputs"]["parameterValues"].update(parameters)
        old = f"/{self.pipeline_name}/{result.run_id}/"
        for output in executor_input["outputs"]["artifacts"].values():
            for artifact in output["artifacts"]:
                artifact["uri"] = artifact["uri"].replace(old, f"/{self.pipeline_name}/{run_id}/")
        task_spec, component = self._find_task(self.spec["root"]["dag"], name)
        again = TaskRecord(name=f"{record.name}@{run_id}", executor_input=executor_input)
        self._launch(again, component, task_spec)
        return again

    def _find_task(self, dag: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        for task_name, task in dag["tasks"].items():
            component = self.spec["components"][task["componentRef"]["name"]]
            if task_name == name:
                return task, component
            if "dag" in component:
                try:
                    return self._find_task(component["dag"], name)
                except KeyError:
                    pass
        raise KeyError(name)

    @staticmethod
    def _pipeline_parameters(definitions: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
        declared = definitions.get("parameters", {})
        unknown = sorted(set(arguments) - set(declared))
        if unknown:  # the API server refuses a run with parameters the pipeline does not declare
            raise ValueError(f"pipeline parameters {unknown} are not declared by the pipeline")
        values = {}
        for name, definition in declared.items():
            if name in arguments:
                values[name] = _typed(arguments[name], definition["parameterType"])
            elif "defaultValue" in definition:
                values[name] = _typed(definition["defaultValue"], definition["parameterType"])
            elif not definition.get("isOptional"):
                raise ValueError(f"pipeline parameter {name!r} is required")
        return values

    def _run_dag(
        self,
        dag: dict[str, Any],
        dag_inputs: dict[str, dict[str, Any]],
        run_id: str,
        prefix: str,
        records: dict[str, TaskRecord],
    ) -> dict[str, dict[str, Any]]:
        """Every task of `dag` in dependency order, given its inputs; returns its outputs. Inputs and outputs are
        {"parameters": {name: value}, "artifacts": {name: RuntimeArtifact}}."""
        tasks = dag["tasks"]
        done: dict[str, TaskRecord] = {}
        for name in _dependency_order(tasks):
            task = tasks[name]
            path = f"{prefix}{name}"
            record = TaskRecord(name=path)
            records[path] = record
            done[name] = record
            if any(done[d].state == "SKIPPED" for d in task.get("dependentTasks", [])):
                record.state = "SKIPPED"  # KFP skips what depends on a skipped condition branch
                continue
            inputs = self._resolve_inputs(task, dag_inputs, done, path)
            component = self.spec["components"][task["componentRef"]["name"]]
            if "iteratorPolicy" in task or "parameterIterator" in task or "artifactIterator" in task:
                raise NotImplementedError(f"{path}: ParallelFor is not modelled by this harness")
            condition = task.get("triggerPolicy", {}).get("condition")
            if condition and not _condition_holds(condition, inputs["parameters"]):
                record.state = "SKIPPED"
                continue
            if "dag" in component:
                out = self._run_dag(component["dag"], inputs, run_id, f"{path}/", records)
                record.parameters, record.artifacts = out["parameters"], out["artifacts"]
                record.state = "SUCCEEDED"
                continue
            record.executor_input = self._executor_input(component, inputs, run_id, path)
            self._launch(record, component, task)
        return self._dag_outputs(dag, done)

    @staticmethod
    def _dag_outputs(dag: dict[str, Any], done: dict[str, TaskRecord]) -> dict[str, dict[str, Any]]:
        outputs: dict[str, dict[str, Any]] = {"parameters": {}, "artifacts": {}}
        for name, selector in dag.get("outputs", {}).get("artifacts", {}).items():
            for choice in selector["artifactSelectors"]:
                producer = done[choice["producerSubtask"]]
                if choice["outputArtifactKey"] in producer.artifacts:
                    outputs["artifacts"][name] = producer.artifacts[choice["outputArtifactKey"]]
        for name, selector in dag.get("outputs", {}).get("parameters", {}).items():
            source = selector.get("valueFromParameter")
            if source is None:
                raise NotImplementedError(
                    f"DAG output parameter {name!r}: only valueFromParameter is modelled"
                )
            producer = done[source["producerSubtask"]]
            if source["outputParameterKey"] in producer.parameters:
                outputs["parameters"][name] = producer.parameters[source["outputParameterKey"]]
        return outputs

    def _resolve_inputs(
        self,
        task: dict[str, Any],
        dag_inputs: dict[str, dict[str, Any]],
        done: dict[str, TaskRecord],
        path: str,
    ) -> dict[str, dict[str, Any]]:
        """The driver's job: each declared input of the task from the DAG's inputs, constants or upstream tasks."""
        resolved: dict[str, dict[str, Any]] = {"parameters": {}, "artifacts": {}}
        for name, source in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in source:
                key = source["componentInputParameter"]
                if key in dag_inputs["parameters"]:
                    resolved["parameters"][name] = dag_inputs["parameters"][key]
            elif "runtimeValue" in source:
                resolved["parameters"][name] = source["runtimeValue"]["constant"]
            elif producer := source.get("taskOutputParameter"):
                upstream = self._finished_upstream(done, producer["producerTask"], name, path)
                resolved["parameters"][name] = upstream.parameters[producer["outputParameterKey"]]
            else:
                raise NotImplementedError(f"{path}: input parameter {name!r} source {sorted(source)}")
        for name, source in task.get("inputs", {}).get("artifacts", {}).items():
            if "componentInputArtifact" in source:
                resolved["artifacts"][name] = dag_inputs["artifacts"][source["componentInputArtifact"]]
            elif producer := source.get("taskOutputArtifact"):
                upstream = self._finished_upstream(done, producer["producerTask"], name, path)
                resolved["artifacts"][name] = upstream.artifacts[producer["outputArtifactKey"]]
            else:
                raise NotImplementedError(f"{path}: input artifact {name!r} source {sorted(source)}")
        return resolved

    @staticmethod
    def _finished_upstream(done: dict[str, TaskRecord], task: str, name: str, path: str) -> TaskRecord:
        """The upstream task an input comes from, which must have succeeded (the DAG order guarantees it)."""
        upstream = done[task]
        if upstream.state != "SUCCEEDED":
            raise RuntimeError(f"{path}: input {name!r} comes from {upstream.name}, which has not run")
        return upstream

    def _executor_input(
        self, component: dict[str, Any], inputs: dict[str, dict[str, Any]], run_id: str, path: str
    ) -> dict[str, Any]:
        """The ExecutorInput the driver hands the launcher; the pod-local paths are filled in per attempt."""
        definitions = component.get("inputDefinitions", {})
        values = {}
        for name, definition in definitions.get("parameters", {}).items():
            if name in inputs["parameters"]:
                values[name] = _typed(inputs["parameters"][name], definition["parameterType"])
            elif "defaultValue" in definition:
                values[name] = _typed(definition["defaultValue"], definition["parameterType"])
            elif not definition.get("isOptional"):
                raise ValueError(f"{path}: input parameter {name!r} has no value")
        in_artifacts = {}
        for name in definitions.get("artifacts", {}):
            if name in inputs["artifacts"]:
                in_artifacts[name] = {"artifacts": [inputs["artifacts"][name].executor_fields(name)]}
        out_artifacts = {}
        for name, definition in component.get("outputDefinitions", {}).get("artifacts", {}).items():
            kind = definition["artifactType"]
            uri = f"{self.pipeline_root}/{self.pipeline_name}/{run_id}/{path}/{name}"
            out_artifacts[name] = {
                "artifacts": [
                    RuntimeArtifact(
                        uri=uri,
                        metadata={},
                        schema_title=kind["schemaTitle"],
                        schema_version=kind.get("schemaVersion", "0.0.1"),
                    ).executor_fields(name)
                ]
            }
        out_parameters = {name: {} for name in component.get("outputDefinitions", {}).get("parameters", {})}
        return {
            "inputs": {"parameterValues": values, "artifacts": in_artifacts},
            "outputs": {"artifacts": out_artifacts, "parameters": out_parameters},
        }

    # --- the pod ---

    def _launch(self, record: TaskRecord, component: dict[str, Any], task: dict[str, Any]) -> None:
        """Run the task's pod, again on failure while its retry policy allows; fills in the record's outputs."""
        retries = int(task.get("retryPolicy", {}).get("maxRetryCount", 0)) if self.honor_retries else 0
        executor = self.spec["deploymentSpec"]["executors"][component["executorLabel"]]
        if "container" not in executor:
            raise NotImplementedError(f"{record.name}: only container executors are modelled")
        for number in range(1, retries + 2):
            attempt = self._attempt(record, executor["container"], number, component)
            record.attempts.append(attempt)
            if attempt.returncode == 0:
                record.state = "SUCCEEDED"
                return
        record.state = "FAILED"
        raise TaskFailed(record.name, record.attempts[-1], len(record.attempts))

    def _attempt(
        self, record: TaskRecord, container: dict[str, Any], number: int, component: dict[str, Any]
    ) -> Attempt:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", record.name)
        root = Path(tempfile.mkdtemp(prefix=f"{slug}-attempt{number}-", dir=self.work_dir))
        attempt = Attempt(root=root)
        started = time.perf_counter()
        try:
            mount = root / "gcs"
            layout = {d: root / d for d in ("work", "home", "tmp", "cache", "kfp_outputs")}
            for d in (mount, *layout.values()):
                d.mkdir()
            executor_input = json.loads(json.dumps(record.executor_input))
            outputs = executor_input["outputs"]
            outputs["outputFile"] = str(layout["kfp_outputs"] / "output_metadata.json")
            for name, parameter in outputs["parameters"].items():
                parameter["outputFile"] = str(layout["kfp_outputs"] / "parameters" / name)
            # stage in: only the declared input artifacts, to the paths the executor will derive from their URIs
            for entry in executor_input["inputs"]["artifacts"].values():
                for artifact in entry["artifacts"]:
                    self.store.download(artifact["uri"], _local_path(mount, artifact["uri"]))
            command = _substitute(
                [*container.get("command", []), *container.get("args", [])], executor_input, mount
            )
            env = self._pod_env(root, layout, mount, container)
            attempt.returncode, attempt.log = self._run_pod(
                record.name, number, command, env, layout["work"], root
            )
            if attempt.returncode != 0:
                return attempt
            self._collect_outputs(record, executor_input, mount, component)
            return attempt
        finally:
            attempt.wall_s = round(time.perf_counter() - started, 2)
            shutil.rmtree(root, ignore_errors=True)  # a pod's disk is gone with the pod

    def _pod_env(
        self, root: Path, layout: dict[str, Path], mount: Path, container: dict[str, Any]
    ) -> dict[str, str]:
        """An environment from scratch: the image's (PATH, the package on PYTHONPATH), the pod's, the task root."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            # the image has the package installed; here the checkout's copy stands in for it
            "PYTHONPATH": str(REPO),
            "HOME": str(layout["home"]),
            "TMPDIR": str(layout["tmp"]),
            "XDG_CACHE_HOME": str(layout["cache"]),
            "DREAMBOOTH_CACHE": str(layout["cache"] / "dreambooth"),
            "HF_HOME": str(layout["cache"] / "huggingface"),
            "STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"],
            MOUNT_ENV: str(mount) + "/",
        }
        env.update(self.extra_env)
        for variable in container.get("env", []):
            env[variable["name"]] = variable.get("value", "")
        return env

    def _run_pod(
        self, name: str, number: int, command: list[str], env: dict[str, str], cwd: Path, root: Path
    ) -> tuple[int, str]:
        log_path = root / "pod.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            running = RunningTask(name.split("/")[-1], number, proc, root)
            monitor = self.monitors.get(running.name)
            try:
                while proc.poll() is None:
                    if monitor is not None:
                        monitor(running)
                    try:
                        proc.wait(timeout=POLL_S)
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                if proc.poll() is None:  # the test itself failed: take the pod down with it
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return proc.returncode, log_path.read_text(errors="replace")

    def _collect_outputs(
        self, record: TaskRecord, executor_input: dict[str, Any], mount: Path, component: dict[str, Any]
    ) -> None:
        """Stage out: upload each output artifact's local files to its URI; read the output parameters."""
        output_file = Path(executor_input["outputs"]["outputFile"])
        reported = json.loads(output_file.read_text()) if output_file.exists() else {}
        for name, entry in executor_input["outputs"]["artifacts"].items():
            (declared,) = entry["artifacts"]
            (returned,) = reported.get("artifacts", {}).get(name, {}).get("artifacts", [declared])
            uri = returned.get("uri") or declared["uri"]
            local = _local_path(mount, uri)
            if local.exists():
                self.store.upload(local, uri)
            record.artifacts[name] = RuntimeArtifact(
                uri=uri,
                metadata=dict(returned.get("metadata") or {}),
                schema_title=declared["type"]["schemaTitle"],
                schema_version=declared["type"].get("schemaVersion", "0.0.1"),
            )
        definitions = component.get("outputDefinitions", {}).get("parameters", {})
        for name, value in reported.get("parameterValues", {}).items():
            record.parameters[name] = value
        for name, parameter in executor_input["outputs"]["parameters"].items():
            path = Path(parameter["outputFile"])
            if name not in record.parameters and path.exists():
                text = path.read_text()
                kind = definitions[name]["parameterType"]
                record.parameters[name] = text if kind == "STRING" else json.loads(text)


# --- the driver's small print -----------------------------------------------------------------------------------


def _typed(value: Any, kind: str) -> Any:
    """A parameter value as the driver serializes it: protobuf numbers are doubles, integers go out as integers."""
    if kind == "NUMBER_INTEGER":
        return int(value)
    if kind == "NUMBER_DOUBLE":
        return float(value)
    if kind == "BOOLEAN":
        return bool(value)
    if kind == "STRING":
        return str(value)
    return value


def _dependency_order(tasks: dict[str, Any]) -> list[str]:
    order: list[str] = []
    remaining = dict(tasks)
    while remaining:
        ready = sorted(n for n, t in remaining.items() if set(t.get("dependentTasks", [])) <= set(order))
        if not ready:
            raise ValueError(f"a cycle among tasks {sorted(remaining)}")
        order.extend(ready)
        for n in ready:
            del remaining[n]
    return order


_COMPARISON = re.compile(r"^inputs\.parameter_values\['([^']+)'\]\s*(==|!=)\s*(.+)$")


def _condition_holds(condition: str, params: dict[str, Any]) -> bool:
    """The trigger conditions `dsl.If` compiles for simple comparisons (the backend evaluates them as CEL)."""
    holds = True
    for clause in condition.split("&&"):
        clause = clause.strip().removeprefix("(").removesuffix(")").strip()
        match = _COMPARISON.match(clause)
        if not match:
            raise NotImplementedError(
                f"trigger condition {condition!r}: only == / != comparisons are modelled"
            )
        name, op, literal = match.groups()
        literal = literal.strip()
        if literal.startswith("'") and literal.endswith("'"):
            expected: Any = literal[1:-1]
        else:
            expected = json.loads(literal)
        actual = params.get(name)
        holds = holds and ((actual == expected) if op == "==" else (actual != expected))
    return holds


def _local_path(mount: Path, uri: str) -> Path:
    """Where kfp's executor looks for the artifact at `uri` inside this pod (gs://b/p -> <mount>/b/p)."""
    if not uri.startswith(GCS):
        raise ValueError(f"{uri}: only gs:// artifact URIs are modelled")
    return mount / uri[len(GCS) :]


_PLACEHOLDER = re.compile(r"\{\{\$(?:\.([a-z_]+)\.([a-z_]+)\['([^']+)'\](?:\.([a-z_]+))?)?\}\}")


def _substitute(argv: list[str], executor_input: dict[str, Any], mount: Path) -> list[str]:
    """The launcher's placeholder substitution; `python3 -m kfp.dsl.executor_main` becomes this interpreter + shim."""

    def value(match: re.Match) -> str:
        section, kind, name, attribute = match.groups()
        if section is None:
            return json.dumps(executor_input)
        if (section, kind) == ("inputs", "parameters"):
            v = executor_input["inputs"]["parameterValues"][name]
            return v if isinstance(v, str) else json.dumps(v)
        if kind == "artifacts":
            (artifact,) = executor_input[section]["artifacts"][name]["artifacts"]
            if attribute == "uri":
                return artifact["uri"]
            if attribute == "path":
                return str(_local_path(mount, artifact["uri"]))
        if (section, kind, attribute) == ("outputs", "parameters", "output_file"):
            return executor_input["outputs"]["parameters"][name]["outputFile"]
        raise NotImplementedError(f"placeholder {match.group(0)}")

    shim = f'"{sys.executable}" "{Path(__file__).resolve()}"'
    out = []
    for arg in argv:
        if EXECUTOR_MAIN in arg:
            arg = arg.replace(EXECUTOR_MAIN, shim)
        out.append(_PLACEHOLDER.sub(value, arg))
    return out


# --- the shim: kfp's executor with this pod's private /gcs/ ---------------------------------------------------------


def _executor_main_with_private_mount() -> None:
    """`python kfp_launcher.py <executor_main args>`: kfp's executor_main, its /gcs/ prefix moved into the pod's
    root (the launcher's per-pod mount). The shim's own folder leaves sys.path: the image does not have it."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    from kfp.dsl.types import artifact_types

    artifact_types._GCS_LOCAL_MOUNT_PREFIX = os.environ[MOUNT_ENV]
    from kfp.dsl import executor_main

    executor_main.executor_main()


if __name__ == "__main__":
    _executor_main_with_private_mount()
