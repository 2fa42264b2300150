"""One subject of a batch, end to end in one task, catching its own failure so the others go on."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def personalize_subject(
    subject: dict,
    base_model: str,
    base_model_digest: str,
    prior_root: str,
    batch_root: str,
    job_id: str,
    status: Output[Markdown],
    resolution: int = 512,
    steps: int = 1000,
    prior_loss_weight: float = 1.0,
    prior_size: int = 200,
    mode: str = "full",
    eval_prompts: list = [],  # noqa: B006 - KFP reads the literal default into the spec
    gate_thresholds: dict = {},  # noqa: B006
    prior_options: dict = {},  # noqa: B006
    run_options: dict = {},  # noqa: B006
    registry_uri: str = "",
    allow_pickle: bool = False,
) -> NamedTuple("SubjectOutputs", ok=bool, run_dir=str):
    """ingest → train (prior from the shared cache) → evaluate → register, via dreambooth_lib.pipeline_run.

    One task per subject, not one per step: in a batch, a task that fails stops the whole DAG on Argo, so the
    subject's steps run in one process whose failure is caught and written as its status
    (`<batch_root>/<job_id>/status/<subject>.json` and this task's `status` artifact). The prior set was made
    by the class loop before; with the same settings and root it is found in the cache, not sampled again.
    `prior_options` must equal the class loop's, so the cache key matches.
    `run_options` holds any other RunConfig sections (ingest, train, eval, prior, sample_prompts, ...).
    """
    import json
    import traceback

    from dreambooth_lib import pipeline_run, storage
    from dreambooth_lib.config import RunConfig, parse_config
    from dreambooth_lib.errors import GateFailed

    name = subject["name"]
    run_dir = storage.join(batch_root, job_id, "subjects", name)
    record = {
        "subject": name,
        "class_noun": subject.get("class_noun"),
        "identifier": subject.get("identifier"),
    }
    try:
        values = json.loads(json.dumps(run_options))  # a deep copy to fill in
        values.update(
            base_model=base_model,
            run_dir=run_dir,
            allow_pickle=allow_pickle,
            subject={k: subject[k] for k in ("name", "class_noun", "images", "live") if k in subject},
            registry={"uri": registry_uri} if registry_uri else None,
        )
        values.setdefault("identifier", {})["identifier"] = subject["identifier"]
        values.setdefault("ingest", {})["resolution"] = resolution
        values["prior"] = {
            **values.get("prior", {}),
            **prior_options,
            "num_images": prior_size,
            "root": prior_root,
        }
        values.setdefault("train", {}).update(
            steps=steps, prior_loss_weight=prior_loss_weight, mode=mode, resolution=resolution
        )
        eval_values = values.setdefault("eval", {})
        if eval_prompts:
            eval_values["prompts"] = list(eval_prompts)
        eval_values["gate"] = {**eval_values.get("gate", {}), **gate_thresholds}
        config = parse_config(RunConfig, values, "run_options")
        result = pipeline_run.run(config)
        record.update(
            status="registered" if result.registered else "trained", **result.model_dump(mode="json")
        )
    except GateFailed as err:
        record.update(status="gate failed", error=str(err))
        result_uri = storage.join(run_dir, "run_result.json")
        if storage.exists(result_uri):
            record.update({k: v for k, v in storage.read_json(result_uri).items() if k not in record})
    except Exception as err:  # the isolation boundary of one subject: any failure is reported, not raised
        traceback.print_exc()
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
    record["base_model_digest"] = base_model_digest
    record["run_dir"] = run_dir
    storage.write_json(storage.join(batch_root, job_id, "status", f"{name}.json"), record)
    lines = [f"# {name}: {record['status']}", ""]
    for key in (
        "identifier",
        "class_noun",
        "error",
        "model_uri",
        "metrics",
        "gate",
        "report_html",
        "registered",
    ):
        if record.get(key) is not None:
            lines.append(f"- **{key}**: `{json.dumps(record[key], default=str)}`")
    storage.write_text(status.path, "\n".join(lines) + "\n")
    status.metadata.update(
        {k: record.get(k) for k in ("subject", "status", "identifier", "error", "run_dir")}
    )
    print(f"subject {name}: {record['status']}" + (f": {record['error']}" if record.get("error") else ""))
    return (record["status"] in ("registered", "trained"), run_dir)
