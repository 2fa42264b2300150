"""Where tasks run and how they may fail, fixed at compile time: node shapes, requests and limits, a bounded
scratch disk, a timeout per task and retries only where a retry can help. docs/placement.md has the numbers
behind every choice (machine shapes, GKE allocatable, sizes) and the policy table of each step.

Two targets differ and get separate YAML:
- `kfp` (Kubeflow Pipelines on Kubernetes): requests and limits per container, the accelerator as the Kubernetes
  resource name (`nvidia.com/gpu`); node selectors, tolerations, a bounded /tmp (emptyDir), the pod deadline and
  secrets go through kfp-kubernetes.
- `vertex` (Vertex AI Pipelines): each task is a CustomJob on its own VM, chosen from the CPU/memory limits and
  the accelerator enum name (`NVIDIA_L4`); no kfp-kubernetes config, which Vertex rejects.

A step's policy comes from its component's name (`task.component_spec.name`) looked up in STEPS, so a pipeline
only says "this task runs on a GPU" (`on_gpu`) or "on a CPU node" (`on_cpu`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dreambooth_lib.errors import ConfigError

K8S_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
VERTEX_ENUM = re.compile(r"^[A-Z][A-Z0-9_]*$")
Family = Literal["sd15", "sdxl", "sd3", "flux"]
FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")


# --- quantities (the subset KFP accepts: CPU "6" / "0.5" / "500m", memory an integer with an optional unit) ---

_CPU = re.compile(r"^(\d*\.?\d+)(m?)$")
_MEMORY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|Pi|Ei|K|M|G|T|P|E)?$")
_MEMORY_UNIT = {
    "": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_DURATION = re.compile(r"^(\d+)(s|m|h|d)?$")
_DURATION_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
GIB = 2**30


def cpu_cores(quantity: str) -> float:
    """'6' -> 6.0, '500m' -> 0.5 (ValueError on anything KFP would refuse)."""
    m = _CPU.match(str(quantity))
    if not m:
        raise ValueError(f"CPU {quantity!r}: write a number of cores ('6', '0.5') or millicores ('500m')")
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def memory_gib(quantity: str) -> float:
    """'24Gi' -> 24.0, '32G' -> 29.8 (ValueError on anything KFP would refuse, e.g. '1.5Gi')."""
    m = _MEMORY.match(str(quantity))
    if not m:
        raise ValueError(f"memory {quantity!r}: write an integer with a unit, e.g. '24Gi' or '512Mi'")
    return int(m.group(1)) * _MEMORY_UNIT[m.group(2) or ""] / GIB


def duration_seconds(value: str | int) -> int:
    """'90s' / '30m' / '6h' / '1d' / 3600 -> seconds."""
    m = _DURATION.match(str(value).strip())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"duration {value!r}: write a positive number with s, m, h or d, e.g. '30m' or '6h'")
    return int(m.group(1)) * _DURATION_UNIT[m.group(2) or ""]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- the nodes GPU steps land on ---------------------------------------------------------------------------------

# What GKE's system DaemonSets on a GPU node (kube-proxy, fluentbit-gke, gke-metrics-agent, pdcsi-node, the NVIDIA
# device plugin, gke-metadata-server under Workload Identity) request together is a few hundred millicores and
# well under 1 GiB; the memory allowance also covers the kernel's share that makes a node's memory capacity a
# little below the machine's nominal size. A pod sized within allocatable minus this leaves room for them.
DAEMONSET_CPU = 0.5
DAEMONSET_MEMORY_GIB = 2.0
EVICTION_MEMORY_GIB = 100 / 1024  # the kubelet's hard eviction threshold memory.available<100Mi


def gke_reserved_cpu(vcpus: float) -> float:
    """GKE's CPU reservation: 6% of the first core, 1% of the next, 0.5% of the next 2, 0.25% of the rest."""
    tiers = [(1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025)]
    return _tiered(vcpus, tiers)


def gke_reserved_memory_gib(memory: float) -> float:
    """GKE's memory reservation: 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next
    112, 2% of the rest (255 MiB under 1 GiB), plus the 100 MiB eviction threshold."""
    if memory < 1:
        return 255 / 1024 + EVICTION_MEMORY_GIB
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)]
    return _tiered(memory, tiers) + EVICTION_MEMORY_GIB


def _tiered(amount: float, tiers: list[tuple[float, float]]) -> float:
    reserved, left = 0.0, amount
    for size, rate in tiers:
        part = min(left, size)
        reserved += part * rate
        left -= part
        if left <= 0:
            break
    return reserved


class NodeShape(_Strict):
    """A GPU node: its capacity, how its allocatable is derived, its label, and the pod size that fits it."""

    name: str
    description: str = ""
    vcpus: float = Field(gt=0)
    memory_gib: float = Field(gt=0, description="memory capacity in GiB")
    gpus: int = Field(1, ge=1, le=16)
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="each GPU's memory; None: unknown, not checked"
    )
    reservation: Literal["gke", "kubelet"] = Field(
        "kubelet", description="'gke': GKE's documented reservations; 'kubelet': the system_reserved_* below"
    )
    system_reserved_cpu: float = Field(
        0.5, ge=0, description="kubelet --system-reserved + --kube-reserved CPU"
    )
    system_reserved_memory_gib: float = Field(1.0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    vertex_accelerator: str | None = Field(None, description="Vertex AI enum of its GPU, e.g. NVIDIA_L4")
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None

    def allocatable(self) -> tuple[float, float]:
        """(CPU cores, memory GiB) the kubelet offers pods on this node."""
        if self.reservation == "gke":
            return (
                self.vcpus - gke_reserved_cpu(self.vcpus),
                self.memory_gib - gke_reserved_memory_gib(self.memory_gib),
            )
        return (
            self.vcpus - self.system_reserved_cpu,
            self.memory_gib - self.system_reserved_memory_gib - EVICTION_MEMORY_GIB,
        )

    def pod_budget(self) -> tuple[float, float]:
        """What one pod may request and still schedule beside the node's DaemonSets."""
        cpu, memory = self.allocatable()
        return cpu - DAEMONSET_CPU, memory - DAEMONSET_MEMORY_GIB

    def default_size(self) -> dict[str, str]:
        """The shape's own sizing, else requests of the whole budget rounded down (memory limit = request:
        memory cannot be reclaimed, so a pod allowed above its request is the first evicted under pressure)."""
        cpu, memory = self.pod_budget()
        memory_request = self.memory_request or f"{max(1, math.floor(memory))}Gi"
        return {
            "cpu_request": self.cpu_request or f"{max(1, math.floor(cpu))}",
            "cpu_limit": self.cpu_limit or f"{self.vcpus:g}",
            "memory_request": memory_request,
            "memory_limit": self.memory_limit or memory_request,
        }


_GKE_GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _gke_gpu_node(
    name: str,
    gpu: str,
    vcpus: int,
    memory_gib: int,
    gpu_memory_gib: int,
    label: str,
    vertex: str,
    cpu_request: str,
    memory_request: str,
) -> NodeShape:
    """A GKE machine with one NVIDIA GPU: GKE's reservations, its accelerator label and Vertex enum, and the pod
    size it fits (the limits are default_size's: all the vCPUs, memory equal to its request)."""
    return NodeShape(
        name=name,
        description=f"GKE {name}: {vcpus} vCPU, {memory_gib} GB, 1x NVIDIA {gpu} {gpu_memory_gib} GB",
        vcpus=vcpus,
        memory_gib=memory_gib,
        reservation="gke",
        gpu_memory_gib=gpu_memory_gib,
        node_selector={"cloud.google.com/gke-accelerator": label},
        vertex_accelerator=vertex,
        cpu_request=cpu_request,
        memory_request=memory_request,
    )


NODE_SHAPES: dict[str, NodeShape] = {
    s.name: s
    for s in (
        #             machine           GPU   vCPU   GB GPU GB  GKE accelerator label  Vertex enum       pod request
        _gke_gpu_node("g2-standard-8",  "L4",     8,  32, 24, "nvidia-l4",         "NVIDIA_L4",         "6", "24Gi"),
        _gke_gpu_node("a2-highgpu-1g",  "A100",  12,  85, 40, "nvidia-tesla-a100", "NVIDIA_TESLA_A100", "10", "64Gi"),
        _gke_gpu_node("a2-ultragpu-1g", "A100",  12, 170, 80, "nvidia-a100-80gb",  "NVIDIA_A100_80GB",  "10", "128Gi"),
        _gke_gpu_node("a3-highgpu-1g",  "H100",  26, 234, 80, "nvidia-h100-80gb",  "NVIDIA_H100_80GB",  "22", "192Gi"),
        NodeShape(
            name="onprem-gpu",
            description="on-prem GPU node labelled by the NVIDIA GPU operator; assumed 8 CPU, 32 GiB, 1 GPU",
            vcpus=8,
            memory_gib=32,
            reservation="kubelet",
            node_selector={"nvidia.com/gpu.present": "true"},
            cpu_request="6",
            memory_request="24Gi",
        ),
    )
}  # fmt: skip


# --- the per-step policy -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPolicy:
    """How one step runs: on which node kind, retried or not (and why), its deadline and scratch disk per family."""

    on: Literal["gpu", "cpu"]
    retry: bool
    why: str
    timeout: dict[str, str]  # family -> duration
    scratch: dict[
        str, str
    ]  # family -> emptyDir sizeLimit; sized for the base model cache + the step's own files


def _same(value: str) -> dict[str, str]:
    return dict.fromkeys(FAMILIES, value)


def _per_family(sd15: str, sdxl: str, sd3: str, flux: str) -> dict[str, str]:
    """A base model's folder: SD 1.5 ~4 GB, SDXL ~7 GB, SD3-medium ~15 GB with its T5, FLUX.1 ~34 GB (a 12 B
    transformer in bf16 and T5-XXL): disks and deadlines grow with it."""
    return {"sd15": sd15, "sdxl": sdxl, "sd3": sd3, "flux": flux}


# What several steps share because they hold the same things: the time to download a base model (or digest it),
# the disk of its folder, the time to sample with it, and the disk of the model with a step's images or adapters.
BASE_MODEL_TIME = _per_family("30m", "1h", "1h", "1h")
BASE_MODEL_DISK = _per_family("12Gi", "32Gi", "48Gi", "80Gi")
SAMPLING_TIME = _per_family("2h", "4h", "4h", "6h")
MODEL_AND_IMAGES_DISK = _per_family("20Gi", "40Gi", "60Gi", "100Gi")
FINE_TUNE_DISK = _per_family("40Gi", "80Gi", "80Gi", "120Gi")  # + a full UNet checkpoint with its AdamW state

STEPS: dict[str, StepPolicy] = {
    "fingerprint-inputs": StepPolicy(
        "cpu", False, "deterministic (a missing model or photo folder); digests stream, nothing is copied",
        BASE_MODEL_TIME, _same("2Gi"),
    ),
    "ingest-images": StepPolicy("cpu", False, "deterministic: a bad photo fails once, with its message", _same("15m"), _same("4Gi")),
    "choose-identifier": StepPolicy(
        "cpu", False, "deterministic; downloads the base model for its tokenizer",
        BASE_MODEL_TIME, BASE_MODEL_DISK,
    ),
    "make-prior-set": StepPolicy(
        "gpu", True, "GPU pod: preemption; a rerun finds the sets already in the prior root",
        SAMPLING_TIME, MODEL_AND_IMAGES_DISK,
    ),
    "fine-tune": StepPolicy(
        "gpu", True, "GPU pod: preemption; a rerun resumes from the newest checkpoint in the checkpoint root",
        _per_family("6h", "12h", "12h", "16h"), FINE_TUNE_DISK,
    ),
    "evaluate-model": StepPolicy(
        "gpu", True, "GPU pod: preemption; evaluation is repeatable (the gate is decided in register)",
        SAMPLING_TIME, MODEL_AND_IMAGES_DISK,
    ),
    "register-model": StepPolicy(
        "cpu", False, "deterministic: a failed gate fails once, with its message", _same("1h"), _same("8Gi"),
    ),
    "plan-batch": StepPolicy(
        "cpu", False, "deterministic: a bad manifest fails once; downloads the base model",
        BASE_MODEL_TIME, BASE_MODEL_DISK,
    ),
    "list-classes": StepPolicy("cpu", False, "deterministic", _same("10m"), _same("1Gi")),
    "train-packed-loras": StepPolicy(
        "gpu", True, "GPU pod: preemption; a rerun retrains the pack (its subjects' failures never fail it)",
        _per_family("12h", "24h", "24h", "36h"), MODEL_AND_IMAGES_DISK,
    ),
    "personalize-subject": StepPolicy(
        "gpu", False, "records its own failure instead of raising; a rerun could register a model twice",
        _per_family("8h", "16h", "16h", "24h"), _per_family("50Gi", "100Gi", "120Gi", "160Gi"),
    ),
    "summarize-batch": StepPolicy("cpu", False, "the exit handler: reports, never retried", _same("15m"), _same("1Gi")),
    "check-batch": StepPolicy(
        "cpu", False, "the batch verdict: fails once when no subject succeeded", _same("10m"), _same("1Gi"),
    ),
}  # fmt: skip

# A step missing from STEPS (a new component) still compiles, with the policy of its node kind; a test lists the
# compiled tasks against STEPS so the gap is seen.
_UNLISTED = {
    "gpu": StepPolicy("gpu", True, "unlisted GPU step", _same("6h"), FINE_TUNE_DISK),
    "cpu": StepPolicy("cpu", False, "unlisted CPU step", _same("1h"), _same("4Gi")),
}


# --- the placement -----------------------------------------------------------------------------------------------


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoExecute", "NoSchedule", "PreferNoSchedule"] | None = None


class Resources(_Strict):
    """A pod's size and where it may land. Unset fields come from the GPU node shape (GPU steps) or the CPU
    defaults; on Vertex only the limits count (they choose the VM)."""

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] = Field(default_factory=list)

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit")
    @classmethod
    def _quantity(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A quantity KFP accepts: CPU cores for cpu_*, memory for memory_* (ValueError names the fix)."""
        if v is not None:
            (cpu_cores if info.field_name.startswith("cpu") else memory_gib)(v)
        return v


class GpuResources(Resources):
    node: str | NodeShape = Field(
        "g2-standard-8", description=f"a node shape ({', '.join(NODE_SHAPES)}) or a NodeShape mapping"
    )
    accelerator_type: str | None = Field(
        None, description="default: nvidia.com/gpu, or the shape's Vertex enum"
    )
    accelerator_count: int | None = Field(None, ge=1, le=16, description="default: the shape's GPUs")

    @field_validator("node")
    @classmethod
    def _known_shape(cls, v: str | NodeShape) -> str | NodeShape:
        if isinstance(v, str) and v not in NODE_SHAPES:
            raise ValueError(
                f"node shape {v!r}: unknown; choose one of {', '.join(NODE_SHAPES)} or describe it"
            )
        return v

    @property
    def shape(self) -> NodeShape:
        return NODE_SHAPES[self.node] if isinstance(self.node, str) else self.node


class StepSettings(_Strict):
    """Per-step overrides of STEPS, e.g. `steps: {fine-tune: {timeout: 10h, scratch: 80Gi}}`."""

    timeout: str | int | None = Field(None, description="pod deadline, e.g. '30m', '6h'")
    scratch: str | None = Field(None, description="scratch emptyDir size limit, e.g. '40Gi'; '0' for none")
    retry: bool | None = None

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            duration_seconds(v)
        return v

    @field_validator("scratch")
    @classmethod
    def _scratch(cls, v: str | None) -> str | None:
        if v is not None and v != "0":
            memory_gib(v)
        return v


SCRATCH_PATH = "/tmp"
CPU_DEFAULTS = {"cpu_request": "1", "cpu_limit": "2", "memory_request": "6Gi", "memory_limit": "6Gi"}
VERTEX_CPU_DEFAULTS = {"cpu_limit": "2", "memory_limit": "8G"}  # Vertex picks the smallest machine with these


# The least GPU memory the GPU steps of a family need with their presets (configs/*.yaml), and why.
MIN_GPU_MEMORY_GIB = {"sd15": 16, "sdxl": 24, "sd3": 24, "flux": 80}
MIN_GPU_MEMORY_WHY = {
    "sd15": "a full fine-tune at 512 px in bf16",
    "sdxl": "LoRA at 1024 px with gradient checkpointing",
    "sd3": "SD3-medium LoRA with a bf16 base",
    "flux": "FLUX.1 LoRA: its 12 B transformer is 24 GB in bf16, T5-XXL and activations on top",
}


class Placement(_Strict):
    target: Literal["kfp", "vertex"] = "kfp"
    model: Family = Field("sd15", description="base-model family: sizes scratch disks, timeouts and the GPU")
    min_gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="the least GPU memory the GPU steps need; None: the family's for its presets (MIN_GPU_MEMORY_GIB)."
        " Lower it for a quantized FLUX.1 (train.base_precision nf4/fp8 fits 24-48 GB)",
    )
    gpu: GpuResources = Field(default_factory=GpuResources)
    cpu: Resources = Field(default_factory=Resources)
    steps: dict[str, StepSettings] = Field(default_factory=dict, description="per-step overrides of STEPS")
    hub_token_secret: str | None = Field(
        "hf-token", description="Kubernetes secret (key 'token') exposed as HF_TOKEN to model-loading steps"
    )
    retries: int = Field(2, ge=0, le=10, description="retries of the steps STEPS marks retryable")
    retry_backoff: str = "60s"
    parallelism: int = Field(
        4, ge=1, le=1000, description="subjects (and classes) trained at once in a batch"
    )

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, v: dict[str, StepSettings]) -> dict[str, StepSettings]:
        unknown = sorted(set(v) - set(STEPS))
        if unknown:
            raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
        return v

    @field_validator("retry_backoff")
    @classmethod
    def _backoff(cls, v: str) -> str:
        duration_seconds(v)
        return v

    @model_validator(mode="after")
    def _fits_target_and_node(self) -> Placement:
        if self.target == "kfp":
            acc = self.gpu.accelerator_type or "nvidia.com/gpu"
            if not K8S_RESOURCE.match(acc):
                raise ValueError(
                    f"gpu.accelerator_type {acc!r}: KFP on Kubernetes uses the resource name, e.g. 'nvidia.com/gpu'"
                )
            self._check_fits("gpu", self.gpu_size(), self.gpu.shape)
            count, shape = self.gpu.accelerator_count or self.gpu.shape.gpus, self.gpu.shape
            if count > shape.gpus:
                raise ValueError(
                    f"gpu.accelerator_count {count} does not fit a {shape.name} node ({shape.gpus} GPU): the pod "
                    "would stay Pending; pick a gpu.node with that many GPUs"
                )
            self._check_fits("cpu", self.cpu_size(), None)
            self._check_gpu_memory()
            return self
        acc = self.gpu.accelerator_type or self.gpu.shape.vertex_accelerator
        if not acc or not VERTEX_ENUM.match(acc):
            raise ValueError(f"gpu.accelerator_type {acc!r}: Vertex AI takes an enum name, e.g. 'NVIDIA_L4'")
        if self.gpu.node_selector or self.gpu.tolerations or self.cpu.node_selector or self.cpu.tolerations:
            raise ValueError("node selectors/tolerations are Kubernetes settings; Vertex AI rejects them")
        self._check_gpu_memory()
        return self

    def _check_gpu_memory(self) -> None:
        need = self.min_gpu_memory_gib or MIN_GPU_MEMORY_GIB[self.model]
        have = self.gpu.shape.gpu_memory_gib
        if have is not None and have < need:
            bigger = ", ".join(s.name for s in NODE_SHAPES.values() if (s.gpu_memory_gib or 0) >= need)
            raise ValueError(
                f"model {self.model} wants a GPU with {need:g} GB ({MIN_GPU_MEMORY_WHY[self.model]}); a "
                f"{self.gpu.shape.name} node has {have:g} GB: pick gpu.node {bigger}, or (a quantized base) set "
                "min_gpu_memory_gib"
            )

    @staticmethod
    def _check_fits(section: str, size: dict[str, str], shape: NodeShape | None) -> None:
        cpu_req, cpu_lim = cpu_cores(size["cpu_request"]), cpu_cores(size["cpu_limit"])
        mem_req, mem_lim = memory_gib(size["memory_request"]), memory_gib(size["memory_limit"])
        if shape is not None:
            Placement._check_node(section, size, shape, cpu_req, mem_req, mem_lim)
        if cpu_req > cpu_lim or mem_req > mem_lim:
            raise ValueError(f"{section}: a request above its limit ({size}); lower the request")

    @staticmethod
    def _check_node(
        section: str, size: dict[str, str], shape: NodeShape, cpu_req: float, mem_req: float, mem_lim: float
    ) -> None:
        cpu_budget, mem_budget = shape.pod_budget()
        if cpu_req > cpu_budget:
            raise ValueError(
                f"{section}.cpu_request {size['cpu_request']} does not fit a {shape.name} node: it can give one "
                f"pod {cpu_budget:.2f} CPU (allocatable {shape.allocatable()[0]:.2f} minus {DAEMONSET_CPU} for "
                "DaemonSets); the pod would stay Pending. Lower it or pick a bigger gpu.node"
            )
        for key, value in (("memory_request", mem_req), ("memory_limit", mem_lim)):
            if value > mem_budget:
                raise ValueError(
                    f"{section}.{key} {size[key]} does not fit a {shape.name} node: it can give one pod "
                    f"{mem_budget:.1f} GiB (allocatable {shape.allocatable()[1]:.1f} GiB minus "
                    f"{DAEMONSET_MEMORY_GIB:g} for DaemonSets). Lower it or pick a bigger gpu.node"
                )

    def gpu_size(self) -> dict[str, str]:
        """requests/limits of GPU steps: what the placement says, else the node shape's size."""
        base = self.gpu.shape.default_size()
        if self.target == "vertex":  # the limits pick the VM: ask for the whole machine
            base = {
                "cpu_limit": f"{self.gpu.shape.vcpus:g}",
                "memory_limit": f"{self.gpu.shape.memory_gib:g}G",
            }
        return _overlay(base, self.gpu)

    def cpu_size(self) -> dict[str, str]:
        return _overlay(CPU_DEFAULTS if self.target == "kfp" else VERTEX_CPU_DEFAULTS, self.cpu)

    def policy(self, step: str, on: Literal["gpu", "cpu"] = "cpu") -> ResolvedPolicy:
        """The step's policy with this placement's overrides and family applied."""
        base = STEPS.get(step) or _UNLISTED[on]
        override = self.steps.get(step, StepSettings())
        scratch = override.scratch if override.scratch is not None else base.scratch[self.model]
        return ResolvedPolicy(
            step=step,
            on=base.on,
            retry=base.retry if override.retry is None else override.retry,
            why=base.why,
            timeout_s=duration_seconds(override.timeout or base.timeout[self.model]),
            scratch=None if scratch == "0" else scratch,
        )


@dataclass(frozen=True)
class ResolvedPolicy:
    step: str
    on: str
    retry: bool
    why: str
    timeout_s: int
    scratch: str | None


def _overlay(base: dict[str, str], resources: Resources) -> dict[str, str]:
    set_fields = {k: getattr(resources, k) for k in base if getattr(resources, k, None) is not None}
    return {**base, **set_fields}


# --- presets -----------------------------------------------------------------------------------------------------

_TOLERATE_GPU = [_GKE_GPU_TAINT]
PRESETS: dict[str, dict] = {
    # GKE GPU node pools carry cloud.google.com/gke-accelerator and are tainted nvidia.com/gpu=present:NoSchedule.
    "gke": {"target": "kfp", "gpu": {"node": "g2-standard-8", "tolerations": _TOLERATE_GPU}},
    "gke-l4": {"target": "kfp", "gpu": {"node": "g2-standard-8", "tolerations": _TOLERATE_GPU}},
    "gke-a100": {"target": "kfp", "gpu": {"node": "a2-highgpu-1g", "tolerations": _TOLERATE_GPU}},
    "gke-a100-80gb": {"target": "kfp", "gpu": {"node": "a2-ultragpu-1g", "tolerations": _TOLERATE_GPU}},
    "gke-h100": {"target": "kfp", "gpu": {"node": "a3-highgpu-1g", "tolerations": _TOLERATE_GPU}},
    # On-prem with the NVIDIA GPU operator: it labels GPU nodes nvidia.com/gpu.present=true.
    "onprem": {"target": "kfp", "gpu": {"node": "onprem-gpu", "tolerations": _TOLERATE_GPU}},
    # Vertex AI Pipelines: the limits and the accelerator choose the machine (g2-standard-8 for one L4).
    "vertex": {"target": "vertex", "gpu": {"node": "g2-standard-8"}, "hub_token_secret": None},
    "vertex-l4": {"target": "vertex", "gpu": {"node": "g2-standard-8"}, "hub_token_secret": None},
    "vertex-a100": {"target": "vertex", "gpu": {"node": "a2-highgpu-1g"}, "hub_token_secret": None},
    "vertex-a100-80gb": {"target": "vertex", "gpu": {"node": "a2-ultragpu-1g"}, "hub_token_secret": None},
    "vertex-h100": {"target": "vertex", "gpu": {"node": "a3-highgpu-1g"}, "hub_token_secret": None},
}


def load_placement(preset: str = "gke", overrides: dict | None = None) -> Placement:
    """A preset with overrides merged section by section (e.g. from a YAML file); a ConfigError names the fix."""
    if preset not in PRESETS:
        raise ConfigError(f"placement preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"placement ({preset}): expected a mapping of sections (gpu:, cpu:, steps:, ...)")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    from dreambooth_lib.config import parse_config

    return parse_config(Placement, data, f"placement ({preset})")


# --- applying it to tasks ----------------------------------------------------------------------------------------


def _apply(
    task, size: dict[str, str], resources: Resources, node_selector: dict[str, str], placement, policy
):
    if placement.target != "kfp":
        return task.set_cpu_limit(size["cpu_limit"]).set_memory_limit(size["memory_limit"])
    from kfp import kubernetes

    task.set_cpu_request(size["cpu_request"]).set_cpu_limit(size["cpu_limit"])
    task.set_memory_request(size["memory_request"]).set_memory_limit(size["memory_limit"])
    for key, value in node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in resources.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    # activeDeadlineSeconds of each pod (a retried pod gets its own): a hung task ends instead of holding a GPU.
    kubernetes.set_timeout(task, policy.timeout_s)
    if policy.scratch:
        _scratch(task, policy.scratch)
    return task


def _scratch(task, size: str) -> None:
    """A bounded emptyDir at /tmp, the temp dir of every step: gs:// downloads and uploads stage there
    (checkpoints, exported models), and so do the compile caches and, where HOME is not writable, the base-model
    cache. The kubelet evicts the pod with a clear message past the limit instead of letting it fill the node's
    disk; an emptyDir is writable by any uid. No environment variable is set: kfp.local passes a task's env to
    local runs, where a cluster-only path would break them, and /tmp exists everywhere."""
    from kfp import kubernetes

    kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH_PATH, size_limit=size)


def _retry(task, placement: Placement, policy: ResolvedPolicy, retry: bool | None) -> None:
    # retry=False turns a listed retry off; nothing turns one on for a step STEPS says must fail once.
    if policy.retry and retry is not False and placement.retries:
        task.set_retry(
            num_retries=placement.retries, backoff_duration=placement.retry_backoff, backoff_factor=2
        )


def _uses_hub(task, placement: Placement):
    """Models may come from a hub id: the token arrives only from a Kubernetes secret, never as a parameter."""
    if placement.target == "kfp" and placement.hub_token_secret:
        from kfp import kubernetes

        kubernetes.use_secret_as_env(task, placement.hub_token_secret, {"token": "HF_TOKEN"}, optional=True)
    return task


def step_name(task) -> str:
    return task.component_spec.name


def on_gpu(task, placement: Placement, *, retry: bool | None = None, loads_model: bool = True):
    """The GPU node pool: accelerator, requests/limits of the node shape, deadline, scratch, retry per STEPS."""
    gpu = placement.gpu
    policy = placement.policy(step_name(task), "gpu")
    selector = gpu.node_selector if gpu.node_selector is not None else gpu.shape.node_selector
    _apply(task, placement.gpu_size(), gpu, selector, placement, policy)
    accelerator = gpu.accelerator_type or (
        "nvidia.com/gpu" if placement.target == "kfp" else gpu.shape.vertex_accelerator
    )
    task.set_accelerator_type(accelerator).set_accelerator_limit(gpu.accelerator_count or gpu.shape.gpus)
    _retry(task, placement, policy, retry)
    if loads_model:
        _uses_hub(task, placement)
    return task


def on_cpu(task, placement: Placement, *, retry: bool | None = None, loads_model: bool = False):
    """CPU nodes: modest requests/limits, no accelerator and no GPU toleration; deadline, scratch, retry per STEPS."""
    policy = placement.policy(step_name(task), "cpu")
    _apply(task, placement.cpu_size(), placement.cpu, placement.cpu.node_selector or {}, placement, policy)
    _retry(task, placement, policy, retry)
    if loads_model:
        _uses_hub(task, placement)
    return task


def policy_table(placement: Placement) -> str:
    """The per-step policy as a Markdown table (docs/placement.md shows it for the default placement)."""
    rows = ["| step | node | retried | timeout | scratch | why |", "|---|---|---|---|---|---|"]
    for name in STEPS:
        p = placement.policy(name)
        retried = f"{placement.retries}x" if p.retry and placement.retries else "no"
        rows.append(
            f"| {name} | {p.on} | {retried} | {_duration(p.timeout_s)} | {p.scratch or '-'} | {p.why} |"
        )
    return "\n".join(rows) + "\n"


def steps_table() -> str:
    """STEPS as the Markdown table of docs/placement.md: every family's timeouts and scratch sizes."""
    families = " / ".join(FAMILIES)
    rows = [
        f"| step | node | KFP retry | timeout {families} | /tmp limit {families} | why |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in STEPS.items():
        timeout = " / ".join(_duration(duration_seconds(p.timeout[f])) for f in FAMILIES)
        scratch = " / ".join(p.scratch[f] for f in FAMILIES)
        rows.append(f"| {name} | {p.on} | {'yes' if p.retry else 'no'} | {timeout} | {scratch} | {p.why} |")
    return "\n".join(rows) + "\n"


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def describe(placement: Placement) -> str:
    """What a compiled pipeline will ask of the cluster: node shape, pod sizes and the per-step policy."""
    shape = placement.gpu.shape
    head = [
        f"target {placement.target}, model family {placement.model}",
        f"GPU node {shape.name}: {shape.description}",
    ]
    if placement.target == "vertex":
        head += [
            f"  GPU tasks: {placement.gpu_size()} + {placement.gpu.accelerator_type or shape.vertex_accelerator}"
            " (the limits and the accelerator choose each task's VM)",
            f"CPU tasks: {placement.cpu_size()}",
            "Timeout and scratch below are Kubernetes settings: on Vertex each task is a CustomJob (its default",
            "timeout, 7 days; a 100 GB pd-ssd boot disk); only the retries apply.",
        ]
    else:
        cpu, memory = shape.allocatable()
        budget_cpu, budget_memory = shape.pod_budget()
        head += [
            f"  allocatable {cpu:.2f} CPU / {memory:.1f} GiB; one pod may request {budget_cpu:.2f} CPU / "
            f"{budget_memory:.1f} GiB",
            f"  GPU pods: {placement.gpu_size()}",
            f"CPU pods: {placement.cpu_size()}",
        ]
    return "\n".join([*head, "", policy_table(placement)])
