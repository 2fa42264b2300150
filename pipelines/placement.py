"""Where tasks run: accelerators, CPU/memory limits, node pools, secrets and retries, fixed at compile time.

Two targets differ and get separate YAML:
- `kfp` (Kubeflow Pipelines on Kubernetes): the accelerator type is used verbatim as the Kubernetes resource
  name (`nvidia.com/gpu`); node selectors, tolerations and secrets go through kfp-kubernetes.
- `vertex` (Vertex AI Pipelines): accelerator enum names (`NVIDIA_L4`, `NVIDIA_H100_80GB`); no kfp-kubernetes
  platform config, which Vertex rejects (use the job's service account instead of Kubernetes secrets).
GPU steps (prior, train, evaluate, a batch subject) get the GPU settings; CPU steps request no accelerator and
no GPU toleration, so they cannot land on tainted GPU nodes.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dreambooth_lib.errors import ConfigError

K8S_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
VERTEX_ENUM = re.compile(r"^[A-Z][A-Z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoExecute", "NoSchedule", "PreferNoSchedule"] | None = None


class Resources(_Strict):
    cpu_limit: str = "4"
    memory_limit: str = "16G"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class GpuResources(Resources):
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = Field(1, ge=1, le=16)


class Placement(_Strict):
    target: Literal["kfp", "vertex"] = "kfp"
    gpu: GpuResources = Field(default_factory=GpuResources)
    cpu: Resources = Field(default_factory=lambda: Resources(cpu_limit="2", memory_limit="8G"))
    hub_token_secret: str | None = Field(
        "hf-token", description="Kubernetes secret (key 'token') exposed as HF_TOKEN to model-loading steps"
    )
    retries: int = Field(2, ge=0, le=10, description="retries of steps that can fail transiently")
    retry_backoff: str = "60s"
    parallelism: int = Field(
        4, ge=1, le=1000, description="subjects (and classes) trained at once in a batch"
    )

    @model_validator(mode="after")
    def _accelerator_fits_target(self) -> Placement:
        acc = self.gpu.accelerator_type
        if self.target == "kfp" and not K8S_RESOURCE.match(acc):
            raise ValueError(
                f"gpu.accelerator_type {acc!r}: KFP on Kubernetes uses the resource name, e.g. 'nvidia.com/gpu'"
            )
        if self.target == "vertex":
            if not VERTEX_ENUM.match(acc):
                raise ValueError(
                    f"gpu.accelerator_type {acc!r}: Vertex AI takes an enum name, e.g. 'NVIDIA_L4'"
                )
            if (
                self.gpu.node_selector
                or self.gpu.tolerations
                or self.cpu.node_selector
                or self.cpu.tolerations
            ):
                raise ValueError("node selectors/tolerations are Kubernetes settings; Vertex AI rejects them")
        return self


_GPU_TAINT = Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")

PRESETS: dict[str, dict] = {
    # GKE: node pools of L4s carry this label and GKE taints GPU nodes with nvidia.com/gpu.
    "gke": {
        "target": "kfp",
        "gpu": {
            "accelerator_type": "nvidia.com/gpu",
            "cpu_limit": "8",
            "memory_limit": "32G",
            "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            "tolerations": [_GPU_TAINT.model_dump()],
        },
    },
    # On-prem with the NVIDIA GPU operator: it labels GPU nodes nvidia.com/gpu.present=true.
    "onprem": {
        "target": "kfp",
        "gpu": {
            "accelerator_type": "nvidia.com/gpu",
            "cpu_limit": "8",
            "memory_limit": "32G",
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [_GPU_TAINT.model_dump()],
        },
    },
    # Vertex AI Pipelines: one L4 (a g2-standard-8 machine from the 8 CPU / 32G limits).
    "vertex": {
        "target": "vertex",
        "gpu": {"accelerator_type": "NVIDIA_L4", "cpu_limit": "8", "memory_limit": "32G"},
        "hub_token_secret": None,
    },
}


def load_placement(preset: str = "gke", overrides: dict | None = None) -> Placement:
    """A preset (gke, onprem, vertex) with overrides merged section by section (e.g. from a YAML file)."""
    if preset not in PRESETS:
        raise ConfigError(f"placement preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    from dreambooth_lib.config import parse_config

    return parse_config(Placement, data, f"placement ({preset})")


def _apply(task, resources: Resources, placement: Placement):
    task.set_cpu_limit(resources.cpu_limit).set_memory_limit(resources.memory_limit)
    if placement.target != "kfp":
        return task
    from kfp import kubernetes

    for key, value in resources.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in resources.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    return task


def _uses_hub(task, placement: Placement):
    """Models may come from a hub id: the token arrives only from a Kubernetes secret, never as a parameter."""
    if placement.target == "kfp" and placement.hub_token_secret:
        from kfp import kubernetes

        kubernetes.use_secret_as_env(task, placement.hub_token_secret, {"token": "HF_TOKEN"}, optional=True)
    return task


def on_gpu(task, placement: Placement, *, retry: bool = True, loads_model: bool = True):
    """Accelerator + limits + GPU node pool; retried (preemption, transient storage errors)."""
    gpu = placement.gpu
    _apply(task, gpu, placement)
    task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpu.accelerator_count)
    if retry and placement.retries:
        task.set_retry(
            num_retries=placement.retries, backoff_duration=placement.retry_backoff, backoff_factor=2
        )
    if loads_model:
        _uses_hub(task, placement)
    return task


def on_cpu(task, placement: Placement, *, retry: bool = True, loads_model: bool = False):
    _apply(task, placement.cpu, placement)
    if retry and placement.retries:
        task.set_retry(
            num_retries=placement.retries, backoff_duration=placement.retry_backoff, backoff_factor=2
        )
    if loads_model:
        _uses_hub(task, placement)
    return task
