"""The compiled pipelines, loaded back strictly: DAG shape, accelerators, node pools, retries, loops, secrets.

The checks read a fresh compile of the code (the `compiled` fixture); `test_compiled_yaml_is_up_to_date` holds
the committed YAML to it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # components/ and pipelines/ are top-level folders of the checkout
    sys.path.insert(0, str(REPO))
COMPILED = REPO / "pipelines" / "compiled"
COMPILED_NAMES = [f"{p}.{t}.yaml" for p in ("personalize", "batch_personalize") for t in ("kfp", "vertex")]
GPU_EXECUTORS = {
    "exec-make-prior-set",
    "exec-fine-tune",
    "exec-evaluate-model",
    "exec-personalize-subject",
    "exec-train-packed-loras",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """Both pipelines for both targets with the default placements, compiled now from the code."""
    from pipelines.compile import compile_all
    from pipelines.placement import load_placement

    out = tmp_path_factory.mktemp("compiled")
    compile_all(out, load_placement("gke"), load_placement("vertex"))
    return out


def _load(folder: Path, name: str):
    """(PipelineSpec proto, PlatformSpec proto or None, raw dicts) — parsed with unknown fields rejected."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    docs = list(yaml.safe_load_all((folder / name).read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    platform = None
    if len(docs) > 1:
        platform = json_format.ParseDict(
            docs[1], pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False
        )
        for cfg in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
            json_format.ParseDict(cfg, k8s_pb2.KubernetesExecutorConfig(), ignore_unknown_fields=False)
    return spec, platform, docs


def _tasks(spec, component: str | None = None):
    dag = spec.root.dag if component is None else spec.components[component].dag
    return dag.tasks


def _k8s(docs) -> dict:
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_yaml_is_up_to_date():
    from pipelines.compile import stale_files
    from pipelines.placement import load_placement

    if os.environ.get("DREAMBOOTH_IMAGE_REGISTRY") or os.environ.get("DREAMBOOTH_IMAGE_TAG"):
        pytest.skip("image overrides set: the committed YAML uses the defaults")
    stale = stale_files(COMPILED, load_placement("gke"), load_placement("vertex"))
    assert stale == [], f"run `make compile`: {stale} differ from a fresh compile"


def test_personalize_dag_shape_and_content_keys(compiled):
    spec, _, _ = _load(compiled, "personalize.kfp.yaml")
    tasks = _tasks(spec)
    before_training = {"fingerprint-inputs", "ingest-images", "choose-identifier", "make-prior-set"}
    assert set(tasks) >= before_training | {"fine-tune", "evaluate-model"}
    assert set(tasks["fine-tune"].dependent_tasks) == before_training
    assert "fine-tune" in tasks["evaluate-model"].dependent_tasks
    (condition,) = [t for name, t in tasks.items() if name.startswith("condition")]
    assert "registry_uri" in condition.trigger_policy.condition
    register = _tasks(spec, condition.component_ref.name)["register-model"]
    assert register.caching_options.enable_cache is False
    # caching keys on content: the digests are inputs of the cached steps; the uncached ones are uncached
    train_inputs = tasks["fine-tune"].inputs.parameters
    assert train_inputs["base_model_digest"].task_output_parameter.producer_task == "fingerprint-inputs"
    assert train_inputs["instance_digest"].task_output_parameter.producer_task == "ingest-images"
    # nothing crosses tasks but declared artifacts: the prior set is an input artifact of fine-tune and evaluate
    for consumer in ("fine-tune", "evaluate-model"):
        prior_input = tasks[consumer].inputs.artifacts["prior_set"].task_output_artifact
        assert (prior_input.producer_task, prior_input.output_artifact_key) == ("make-prior-set", "prior_set")
    assert not any("prior_uri" in t.inputs.parameters for t in tasks.values())
    assert train_inputs["checkpoint_root"].component_input_parameter == "checkpoint_root"
    assert tasks["ingest-images"].inputs.parameters[
        "images_digest"
    ].task_output_parameter.output_parameter_key == ("images_digest")
    assert tasks["fine-tune"].caching_options.enable_cache is True
    assert tasks["fingerprint-inputs"].caching_options.enable_cache is False
    assert tasks["choose-identifier"].caching_options.enable_cache is False
    assert {t.task_info.name for t in tasks.values()} >= {"fine-tune", "evaluate", "class-prior images"}
    params = spec.root.input_definitions.parameters
    assert {
        "base_model",
        "images_uri",
        "class_noun",
        "steps",
        "prior_loss_weight",
        "prior_size",
        "mode",
        "checkpoint_root",
    } <= set(params)
    assert {"eval_prompts", "gate_thresholds", "registry_uri"} <= set(params)


@pytest.mark.parametrize("name", ["personalize.kfp.yaml", "batch_personalize.kfp.yaml"])
def test_kfp_target_gpu_steps_on_the_gpu_pool(compiled, name):
    from components.images import cpu_image, cuda_image

    spec, platform, docs = _load(compiled, name)
    assert platform is not None
    executors = spec.deployment_spec.fields["executors"]
    k8s = _k8s(docs)
    for exe_name, exe in json.loads(_to_json(executors)).items():
        container = exe["container"]
        resources = container.get("resources", {})
        if exe_name in GPU_EXECUTORS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
            # the default shape, a g2-standard-8 (1x L4): requests within what it can allocate, and limits
            assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == ("6", "8")
            assert (resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == ("24Gi", "24Gi")
            assert k8s[exe_name]["nodeSelector"]["labels"] == {
                "cloud.google.com/gke-accelerator": "nvidia-l4"
            }
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[exe_name][
                "tolerations"
            ]
            assert container["image"] == cuda_image()
        else:
            assert "accelerator" not in resources, exe_name
            assert "tolerations" not in k8s.get(exe_name, {}), (
                f"{exe_name}: a CPU step must not tolerate GPU taints"
            )
            assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == ("1", "6Gi")
            assert container["image"] == cpu_image()
        assert int(k8s[exe_name]["activeDeadlineSeconds"]) > 0, f"{exe_name}: every task has a deadline"
        assert k8s[exe_name]["emptyDirMounts"][0]["mountPath"] == "/tmp", f"{exe_name}: a bounded /tmp"


def _to_json(struct) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(struct)


@pytest.mark.parametrize("name", ["personalize.vertex.yaml", "batch_personalize.vertex.yaml"])
def test_vertex_target_uses_enum_names_and_no_kubernetes_config(compiled, name):
    spec, platform, docs = _load(compiled, name)
    assert platform is None and len(docs) == 1, "Vertex AI rejects kfp-kubernetes platform config"
    executors = json.loads(_to_json(spec.deployment_spec.fields["executors"]))
    gpu = {n for n, e in executors.items() if "accelerator" in e["container"].get("resources", {})}
    assert gpu == GPU_EXECUTORS & set(executors)
    for n in gpu:
        resources = executors[n]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "NVIDIA_L4"
        # the limits choose the VM: a whole g2-standard-8; requests mean nothing on Vertex
        assert (resources["resourceCpuLimit"], resources["resourceMemoryLimit"]) == ("8", "32G")
        assert "resourceCpuRequest" not in resources


def test_retries_on_steps_that_can_fail_transiently(compiled):
    spec, _, _ = _load(compiled, "personalize.kfp.yaml")
    tasks = _tasks(spec)
    for name in ("make-prior-set", "fine-tune", "evaluate-model"):  # GPU pods: preemption
        policy = tasks[name].retry_policy
        assert policy.max_retry_count == 2 and policy.backoff_duration.seconds == 60, name
    # deterministic refusals (a bad photo, a failed gate) fail once, with their message
    for name in ("fingerprint-inputs", "ingest-images", "choose-identifier"):
        assert not tasks[name].HasField("retry_policy"), name
    (condition,) = [t for name, t in tasks.items() if name.startswith("condition")]
    assert not _tasks(spec, condition.component_ref.name)["register-model"].HasField("retry_policy")


def test_batch_loops_exit_handler_and_isolation(compiled):
    spec, _, _ = _load(compiled, "batch_personalize.kfp.yaml")
    root = _tasks(spec)
    summary = root["summarize-batch"]
    assert (
        summary.trigger_policy.strategy == summary.trigger_policy.TriggerStrategy.ALL_UPSTREAM_TASKS_COMPLETED
    )
    assert list(summary.dependent_tasks) == ["exit-handler-1"]
    assert summary.inputs.parameters["final_status"].HasField("task_final_status")
    body = _tasks(spec, "comp-exit-handler-1")
    loops = {n: t for n, t in body.items() if t.HasField("parameter_iterator")}
    assert len(loops) == 2 and all(t.iterator_policy.parallelism_limit == 4 for t in loops.values())
    by_item = {t.parameter_iterator.items.input_parameter: n for n, t in loops.items()}
    classes_loop = by_item["pipelinechannel--list-classes-Output"]
    subjects_loop = by_item["pipelinechannel--plan-batch-Output"]
    # priors are made once per class, then the LoRA subjects are trained in packs, then each subject runs
    pack = body["train-packed-loras"]
    assert classes_loop in pack.dependent_tasks and "plan-batch" in pack.dependent_tasks
    assert "train-packed-loras" in body[subjects_loop].dependent_tasks
    # the verdict, inside the handler, fails the run when no subject succeeded (an exit hook could not)
    assert "check-batch" in body and subjects_loop in body["check-batch"].dependent_tasks
    assert not body["check-batch"].HasField("retry_policy")
    assert pack.inputs.parameters["pack_size"].component_input_parameter == "pipelinechannel--pack_size"
    assert spec.root.input_definitions.parameters["pack_size"].default_value.number_value == 0
    assert pack.retry_policy.max_retry_count == 2, "a GPU step retried like the others"
    assert not summary.HasField("retry_policy") and not body["plan-batch"].HasField("retry_policy")
    assert not body["list-classes"].HasField("retry_policy")
    assert set(_tasks(spec, body[classes_loop].component_ref.name)) == {"make-prior-set"}
    (subject_task,) = _tasks(spec, body[subjects_loop].component_ref.name).values()
    assert subject_task.component_ref.name == "comp-personalize-subject"
    assert not subject_task.HasField("retry_policy"), "the subject task records its failure; no retry"
    assert (
        _tasks(spec, body[classes_loop].component_ref.name)["make-prior-set"].retry_policy.max_retry_count
        == 2
    )


def _classes_loop(spec, body) -> str:
    loops = {
        t.parameter_iterator.items.input_parameter: n
        for n, t in body.items()
        if t.HasField("parameter_iterator")
    }
    return loops["pipelinechannel--list-classes-Output"]


def test_prior_off_reaches_fine_tune_as_a_zero_loss_weight(compiled):
    """prior_size 0 or prior_loss_weight 0 turns prior preservation off: the prior task is told λ (so it samples
    nothing when λ is 0) and hands fine-tune the λ it trains with (0 for an empty set), not the pipeline's λ,
    which training refuses without prior images."""
    spec, _, _ = _load(compiled, "personalize.kfp.yaml")
    tasks = _tasks(spec)
    prior_inputs = tasks["make-prior-set"].inputs.parameters
    assert prior_inputs["prior_loss_weight"].component_input_parameter == "prior_loss_weight"
    weight = tasks["fine-tune"].inputs.parameters["prior_loss_weight"].task_output_parameter
    assert (weight.producer_task, weight.output_parameter_key) == (
        "make-prior-set",
        "train_prior_loss_weight",
    )

    spec, _, _ = _load(compiled, "batch_personalize.kfp.yaml")
    body = _tasks(spec, "comp-exit-handler-1")
    prior = _tasks(spec, body[_classes_loop(spec, body)].component_ref.name)["make-prior-set"]
    assert prior.inputs.parameters["prior_loss_weight"].component_input_parameter == (
        "pipelinechannel--prior_loss_weight"
    )


def test_defaults_are_the_config_models_and_a_batch_trains_packed_lora(compiled):
    """One subject: the paper's full fine-tune; a batch: LoRA, which its pack step trains K subjects per task.
    The other defaults are those of `dreambooth run` (the config models)."""
    from dreambooth_lib.config import PriorConfig, TrainConfig

    train, prior = TrainConfig(), PriorConfig()
    for name, mode in (("personalize.kfp.yaml", "full"), ("batch_personalize.kfp.yaml", "lora")):
        spec, _, _ = _load(compiled, name)
        params = spec.root.input_definitions.parameters
        assert params["mode"].default_value.string_value == mode, name
        assert params["steps"].default_value.number_value == train.steps
        assert params["resolution"].default_value.number_value == train.resolution
        assert params["prior_loss_weight"].default_value.number_value == train.prior_loss_weight
        assert params["prior_size"].default_value.number_value == prior.num_images
    body = _tasks(spec, "comp-exit-handler-1")
    assert (
        body["train-packed-loras"].inputs.parameters["mode"].component_input_parameter
        == "pipelinechannel--mode"
    )


def test_every_compiled_file_is_named():
    assert sorted(p.name for p in COMPILED.glob("*.yaml")) == sorted(COMPILED_NAMES)


@pytest.mark.parametrize("name", COMPILED_NAMES)
def test_no_secret_is_a_parameter(compiled, name):
    spec, _, docs = _load(compiled, name)
    secretish = re.compile(r"token|secret|password|credential|api_key", re.I)
    assert not [p for p in spec.root.input_definitions.parameters if secretish.search(p)]
    if name.endswith(".kfp.yaml"):
        secrets = [cfg["secretAsEnv"] for cfg in _k8s(docs).values() if "secretAsEnv" in cfg]
        assert secrets, "the hub token comes from a Kubernetes secret"
        for entries in secrets:
            assert (
                entries[0]["secretName"] == "hf-token" and entries[0]["keyToEnv"][0]["envVar"] == "HF_TOKEN"
            )


def test_placement_presets_and_mistakes(tmp_path):
    from dreambooth_lib.errors import ConfigError
    from pipelines.compile import compile_all
    from pipelines.placement import load_placement

    with pytest.raises(ConfigError, match="enum name, e.g. 'NVIDIA_L4'"):
        load_placement("vertex", {"gpu": {"accelerator_type": "nvidia.com/gpu"}})
    with pytest.raises(ConfigError, match="resource name, e.g. 'nvidia.com/gpu'"):
        load_placement("gke", {"gpu": {"accelerator_type": "NVIDIA_L4"}})
    with pytest.raises(ConfigError, match="Vertex AI rejects them"):
        load_placement("vertex", {"gpu": {"node_selector": {"a": "b"}}})
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        load_placement("aks")
    with pytest.raises(ConfigError, match=r"accelerator_count 2 does not fit a onprem-gpu node \(1 GPU\)"):
        load_placement("onprem", {"gpu": {"accelerator_count": 2}})
    two_gpus = {"name": "two-gpus", "vcpus": 16, "memory_gib": 64, "gpus": 2}
    two_gpus["node_selector"] = {"nvidia.com/gpu.present": "true"}
    onprem = load_placement("onprem", {"gpu": {"node": two_gpus, "accelerator_count": 2}, "parallelism": 8})
    vertex = load_placement("vertex", {"gpu": {"accelerator_type": "NVIDIA_H100_80GB"}})
    written = compile_all(tmp_path, onprem, vertex)
    assert sorted(p.name for p in written) == sorted(COMPILED_NAMES)
    docs = list(yaml.safe_load_all((tmp_path / "batch_personalize.kfp.yaml").read_text()))
    exe = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-personalize-subject"]
    assert exe["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    res = docs[0]["deploymentSpec"]["executors"]["exec-personalize-subject"]["container"]["resources"]
    assert res["accelerator"]["resourceCount"] == "2"
    assert "parallelismLimit: 8" in (tmp_path / "batch_personalize.kfp.yaml").read_text()
    assert "NVIDIA_H100_80GB" in (tmp_path / "personalize.vertex.yaml").read_text()
