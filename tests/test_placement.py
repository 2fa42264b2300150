"""Placement read back from freshly compiled specs: pods that fit real nodes, a deadline and a bounded /tmp per
task, retries only on the steps a retry can help, Vertex specs without Kubernetes config, and clear mistakes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # components/ and pipelines/ are top-level folders of the checkout
    sys.path.insert(0, str(REPO))

from dreambooth_lib.errors import ConfigError  # noqa: E402
from pipelines.placement import (  # noqa: E402
    NODE_SHAPES,
    PRESETS,
    STEPS,
    cpu_cores,
    duration_seconds,
    load_placement,
    memory_gib,
    steps_table,
)

PIPELINES = ("personalize", "batch_personalize")
KFP_PRESETS = [n for n, p in PRESETS.items() if p["target"] == "kfp"]
VERTEX_PRESETS = [n for n, p in PRESETS.items() if p["target"] == "vertex"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """compiled(kfp_preset, vertex_preset, kfp_overrides) -> folder of the four YAML files (compiled once)."""
    from pipelines.compile import compile_all

    cache: dict[str, Path] = {}

    def get(kfp="gke", vertex="vertex", kfp_overrides=None, vertex_overrides=None) -> Path:
        key = json.dumps([kfp, vertex, kfp_overrides, vertex_overrides], sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp("compiled")
            compile_all(out, load_placement(kfp, kfp_overrides), load_placement(vertex, vertex_overrides))
            cache[key] = out
        return cache[key]

    return get


def _docs(folder: Path, name: str) -> list[dict]:
    return list(yaml.safe_load_all((folder / name).read_text()))


def _step(component_ref: str) -> str:
    """'comp-fine-tune' / 'comp-make-prior-set-2' -> the component's name, the key of STEPS."""
    return re.sub(r"^comp-|-\d+$", "", component_ref)


def _container_tasks(spec: dict) -> list[tuple[str, dict, dict]]:
    """(step, task, executor) of every container task in every DAG of the spec (loops and conditions too)."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    found = []
    for dag in dags:
        for task in dag["tasks"].values():
            component = spec["components"][task["componentRef"]["name"]]
            if "executorLabel" in component:
                executor = spec["deploymentSpec"]["executors"][component["executorLabel"]]
                found.append((_step(task["componentRef"]["name"]), task, executor))
    return found


def _k8s(docs: list[dict], executor_label: str) -> dict:
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].get(executor_label, {})


def _executor_label(spec: dict, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


@pytest.mark.parametrize("preset", KFP_PRESETS)
def test_gpu_pods_fit_the_node_they_are_sent_to(compiled, preset):
    folder = compiled(kfp=preset)
    placement = load_placement(preset)
    shape = placement.gpu.shape
    alloc_cpu, alloc_mem = shape.allocatable()
    for name in PIPELINES:
        docs = _docs(folder, f"{name}.kfp.yaml")
        for step, task, executor in _container_tasks(docs[0]):
            res = executor["container"]["resources"]
            k8s = _k8s(docs, _executor_label(docs[0], task))
            for key in (
                "resourceCpuRequest",
                "resourceCpuLimit",
                "resourceMemoryRequest",
                "resourceMemoryLimit",
            ):
                assert key in res, f"{preset} {step}: {key} missing (requests would default to the limits)"
            cpu_req, cpu_lim = cpu_cores(res["resourceCpuRequest"]), cpu_cores(res["resourceCpuLimit"])
            mem_req, mem_lim = (
                memory_gib(res["resourceMemoryRequest"]),
                memory_gib(res["resourceMemoryLimit"]),
            )
            assert cpu_req <= cpu_lim and mem_req <= mem_lim, step
            if STEPS[step].on == "gpu":
                assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
                assert int(res["accelerator"]["resourceCount"]) <= shape.gpus
                # schedulable beside the node's DaemonSets: requests within allocatable minus their allowance
                assert cpu_req <= alloc_cpu - 0.5 and mem_req <= alloc_mem - 2, (preset, step, res)
                assert mem_lim <= alloc_mem - 2, "a memory limit above what the node has invites OOM kills"
                assert k8s["nodeSelector"]["labels"] == shape.node_selector
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[
                    "tolerations"
                ]
            else:
                assert "accelerator" not in res and "tolerations" not in k8s, (
                    f"{step} must stay off GPU nodes"
                )
                assert cpu_req <= 1 and mem_req <= 8, f"{step}: a CPU step asks for little"


def test_the_named_shapes_and_their_allocatable():
    """The numbers docs/placement.md derives from GKE's reservation rules (capacity -> allocatable)."""
    expected = {  # vCPU, GiB, allocatable CPU, allocatable GiB, GPU label
        "g2-standard-8": (8, 32, 7.91, 28.34, "nvidia-l4"),
        "a2-highgpu-1g": (12, 85, 11.90, 78.16, "nvidia-tesla-a100"),
        "a2-ultragpu-1g": (12, 170, 11.90, 159.74, "nvidia-a100-80gb"),
        "a3-highgpu-1g": (26, 234, 25.865, 222.46, "nvidia-h100-80gb"),
    }
    for name, (vcpus, memory, cpu, mem, label) in expected.items():
        shape = NODE_SHAPES[name]
        assert (shape.vcpus, shape.memory_gib) == (vcpus, memory)
        assert shape.allocatable() == (pytest.approx(cpu, abs=0.005), pytest.approx(mem, abs=0.01))
        assert shape.node_selector == {"cloud.google.com/gke-accelerator": label}
    # GKE's own example (plan-node-sizes): a 4-vCPU node offers 3920m
    from pipelines.placement import gke_reserved_cpu

    assert 4 - gke_reserved_cpu(4) == pytest.approx(3.92)
    assert NODE_SHAPES["onprem-gpu"].node_selector == {"nvidia.com/gpu.present": "true"}
    gke = load_placement("gke").gpu_size()
    assert gke == {"cpu_request": "6", "cpu_limit": "8", "memory_request": "24Gi", "memory_limit": "24Gi"}


def test_every_task_has_a_deadline_and_a_bounded_tmp(compiled):
    for model in ("sd15", "sdxl"):
        folder = compiled(kfp_overrides={"model": model})
        for name in PIPELINES:
            docs = _docs(folder, f"{name}.kfp.yaml")
            for step, task, _ in _container_tasks(docs[0]):
                k8s = _k8s(docs, _executor_label(docs[0], task))
                policy = STEPS[step]
                assert int(k8s["activeDeadlineSeconds"]) == duration_seconds(policy.timeout[model]), step
                (scratch,) = k8s["emptyDirMounts"]
                assert scratch == {
                    "volumeName": "scratch",
                    "mountPath": "/tmp",
                    "sizeLimit": policy.scratch[model],
                }
    gke = load_placement("gke")
    assert gke.policy("ingest-images").timeout_s <= 15 * 60, "ingest takes minutes"
    assert gke.policy("fine-tune").timeout_s >= 4 * 3600, "fine-tune takes hours"
    sdxl = load_placement("gke", {"model": "sdxl"})
    assert memory_gib(sdxl.policy("fine-tune").scratch) > memory_gib(gke.policy("fine-tune").scratch)


def test_retries_only_where_a_retry_can_help(compiled):
    retried = {n for n, p in STEPS.items() if p.retry}
    assert retried == {"make-prior-set", "fine-tune", "evaluate-model", "train-packed-loras"}
    seen = set()
    for name in PIPELINES:
        for step, task, _ in _container_tasks(_docs(compiled(), f"{name}.kfp.yaml")[0]):
            seen.add(step)
            if step in retried:
                policy = task["retryPolicy"]
                assert policy["maxRetryCount"] == 2 and policy["backoffDuration"] == "60s", step
            else:
                assert "retryPolicy" not in task, (
                    f"{step}: a deterministic step must fail once, with its message"
                )
    # every compiled step has a row in STEPS (a new component gets a policy on purpose, not by default)
    assert seen <= set(STEPS), sorted(seen - set(STEPS))
    assert {"ingest-images", "register-model", "plan-batch", "choose-identifier"} <= seen


def test_overrides_per_step_in_the_placement_yaml(compiled):
    overrides = {
        "steps": {
            "fine-tune": {"timeout": "10h", "scratch": "80Gi", "retry": False},
            "ingest-images": {"scratch": "0"},
        },
        "retries": 3,
    }
    docs = _docs(compiled(kfp_overrides=overrides), "personalize.kfp.yaml")
    tasks = {
        step: (task, _k8s(docs, _executor_label(docs[0], task)))
        for step, task, _ in _container_tasks(docs[0])
    }
    fine_tune, fine_tune_k8s = tasks["fine-tune"]
    assert fine_tune_k8s["activeDeadlineSeconds"] == str(10 * 3600)
    assert fine_tune_k8s["emptyDirMounts"][0]["sizeLimit"] == "80Gi"
    assert "retryPolicy" not in fine_tune
    assert "emptyDirMounts" not in tasks["ingest-images"][1]
    assert tasks["evaluate-model"][0]["retryPolicy"]["maxRetryCount"] == 3


@pytest.mark.parametrize("preset", VERTEX_PRESETS)
def test_vertex_specs_choose_the_machine_and_carry_no_kubernetes_config(compiled, preset):
    shape = load_placement(preset).gpu.shape
    folder = compiled(vertex=preset)
    for name in PIPELINES:
        docs = _docs(folder, f"{name}.vertex.yaml")
        assert len(docs) == 1, "Vertex AI rejects kfp-kubernetes platform config"
        for step, task, executor in _container_tasks(docs[0]):
            res = executor["container"]["resources"]
            assert "resourceCpuRequest" not in res and "resourceMemoryRequest" not in res, step
            assert "env" not in executor["container"], step
            if STEPS[step].on == "gpu":
                assert res["accelerator"]["resourceType"] == shape.vertex_accelerator
                assert (
                    res["resourceCpuLimit"] == f"{shape.vcpus:g}"
                    and res["resourceMemoryLimit"] == f"{shape.memory_gib:g}G"
                )
            else:
                assert "accelerator" not in res
            assert (step in {"make-prior-set", "fine-tune", "evaluate-model", "train-packed-loras"}) == (
                "retryPolicy" in task
            ), step


def test_placement_mistakes_name_the_fix():
    with pytest.raises(
        ConfigError, match=r"cpu_request 8 does not fit a g2-standard-8 node.*7\.41 CPU.*Pending"
    ):
        load_placement("gke", {"gpu": {"cpu_request": "8"}})
    with pytest.raises(
        ConfigError, match=r"memory_request 32Gi does not fit a g2-standard-8 node.*26\.3 GiB"
    ):
        load_placement("gke", {"gpu": {"memory_request": "32Gi", "memory_limit": "32Gi"}})
    with pytest.raises(ConfigError, match="memory_limit 40Gi does not fit"):
        load_placement("gke-a100", {"gpu": {"memory_limit": "40Gi", "node": "g2-standard-8"}})
    with pytest.raises(ConfigError, match="a request above its limit"):
        load_placement("gke", {"cpu": {"cpu_request": "4", "cpu_limit": "2"}})
    with pytest.raises(ConfigError, match=r"accelerator_count 2 does not fit a g2-standard-8 node \(1 GPU\)"):
        load_placement("gke", {"gpu": {"accelerator_count": 2}})
    with pytest.raises(ConfigError, match="node shape 'n1-standard-4': unknown; choose one of g2-standard-8"):
        load_placement("gke", {"gpu": {"node": "n1-standard-4"}})
    with pytest.raises(ConfigError, match="unknown step.*fine_tune; steps are fingerprint-inputs"):
        load_placement("gke", {"steps": {"fine_tune": {"timeout": "1h"}}})
    with pytest.raises(ConfigError, match="duration '6 hours'.*'6h'"):
        load_placement("gke", {"steps": {"fine-tune": {"timeout": "6 hours"}}})
    with pytest.raises(ConfigError, match="memory '1.5Gi'.*integer with a unit"):
        load_placement("gke", {"gpu": {"memory_request": "1.5Gi"}})
    with pytest.raises(ConfigError, match="unknown; choose one of gke, gke-l4"):
        load_placement("aks")
    # a node of one's own: its capacity decides what fits
    dgx = {"name": "dgx", "vcpus": 128, "memory_gib": 1024, "gpus": 8, "node_selector": {"pool": "dgx"}}
    big = load_placement("onprem", {"gpu": {"node": dgx, "accelerator_count": 8}})
    assert big.gpu_size()["cpu_request"] == "127" and big.gpu.shape.node_selector == {"pool": "dgx"}


def test_a_family_is_placed_on_a_gpu_that_holds_it():
    """FLUX.1 LoRA wants an 80 GB GPU: an L4 or A100 40 GB placement is refused when it compiles, naming what fits;
    an H100 or A100 80 GB one compiles; a quantized base may say it needs less."""
    with pytest.raises(ConfigError, match=r"model flux wants a GPU with 80 GB .*g2-standard-8 node has 24 GB: pick "
                       r"gpu.node a2-ultragpu-1g, a3-highgpu-1g"):  # fmt: skip
        load_placement("gke", {"model": "flux"})
    with pytest.raises(ConfigError, match="a2-highgpu-1g node has 40 GB"):
        load_placement("vertex-a100", {"model": "flux"})
    for preset in ("gke-h100", "gke-a100-80gb", "vertex-h100", "vertex-a100-80gb"):
        flux = load_placement(preset, {"model": "flux"})
        assert flux.policy("fine-tune").timeout_s > load_placement(preset).policy("fine-tune").timeout_s
    assert (
        load_placement("gke", {"model": "flux", "min_gpu_memory_gib": 24}).gpu.shape.name == "g2-standard-8"
    )
    assert load_placement("gke", {"model": "sd3"}).model == "sd3"  # SD3-medium LoRA fits an L4


def test_compile_cli_presets_and_explain(tmp_path, capsys):
    from pipelines.compile import main

    out_dir = tmp_path / "out"
    assert main(["--kfp-preset", "vertex-a100", "--out", str(out_dir)]) == 2
    assert "a Vertex preset; choose gke" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpu:\n  cpu_request: '16'\n")
    assert main(["--placement", str(bad), "--out", str(out_dir)]) == 2
    assert "cpu_request 16 does not fit a g2-standard-8 node" in capsys.readouterr().err
    assert main(["--kfp-preset", "gke-h100", "--model", "sdxl", "--explain", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "GPU node a3-highgpu-1g" in out and "| fine-tune | gpu | 2x | 12h | 80Gi |" in out
    assert not out_dir.exists(), "--explain and errors write nothing"


def test_docs_show_the_policy_of_every_step():
    text = (REPO / "docs" / "placement.md").read_text()
    assert steps_table() in text, (
        "docs/placement.md: paste pipelines.placement.steps_table() (the table drifted)"
    )
