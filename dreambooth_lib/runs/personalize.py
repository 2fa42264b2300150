"""One subject end to end, in-process: ingest → identifier → prior → train → samples → evaluate → register.

The same steps the Kubeflow pipeline runs as separate tasks, called one after another with every intermediate
under one run directory (local or gs://), laid out as docs/architecture.md describes. A rerun of the same run
directory reuses the chosen identifier (the model is bound to it) and the prior cache, and `resume` continues
training from its newest complete checkpoint. With `reuse_training`, a model already trained into `train/` for
this very run (same identifier, class, train settings and base model: e.g. by a batch's packed LoRA step) is used
as is instead of training again.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from dreambooth_lib import storage
from dreambooth_lib.config import RunConfig, parse_config
from dreambooth_lib.errors import DreamboothError, GateFailed


class RunResult(BaseModel):
    run_dir: str
    subject: str
    identifier: str
    prompt: str
    model_uri: str
    num_instance_images: int
    prior_uri: str | None
    samples_dir: str | None
    metrics: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    report_html: str | None = None
    registered: dict[str, Any] | None = None
    wall_time_s: float
    step_times_s: dict[str, float]
    reused_training: bool = False  # train/ already held this run's model (e.g. trained in a batch's pack)

    def summary(self) -> str:
        lines = [
            f"subject {self.subject}: prompt with '{self.prompt}'",
            f"  model    {self.model_uri}",
            f"  samples  {self.samples_dir}",
        ]
        if self.metrics is not None:
            shown = "  ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items()
            )
            lines.append(f"  metrics  {shown}")
            lines.append(f"  report   {self.report_html}")
        if self.gate is not None:
            lines.append(
                f"  gate     {'passed' if self.gate.get('passed') else 'failed: ' + '; '.join(self.gate.get('reasons', []))}"
            )
        if self.registered is not None:
            lines.append(f"  registry {self.registered.get('uri')} (v{self.registered.get('version')})")
        lines.append(f"  wall time {self.wall_time_s:.1f} s")
        return "\n".join(lines)


def fill_template(template: str, identifier: str, class_noun: str) -> str:
    return template.format(identifier, class_noun)


def reusable_training(config: RunConfig, identifier: str):
    """The TrainResult in `<run_dir>/train/` when it is this run's model (its model folder exists and its
    identifier, class, train settings and base model digest match), else None: then the run trains."""
    from dreambooth_lib import models, train

    summary_uri = storage.join(config.run_dir, "train", train.SUMMARY_NAME)
    if not storage.exists(summary_uri):
        return None
    try:
        done = train.TrainResult.model_validate(storage.read_json(summary_uri))
    except ValueError:  # an unreadable or older summary: train again rather than trust it
        return None
    matches = (
        done.identifier == identifier
        and done.class_noun == config.subject.class_noun
        and done.mode == config.train.mode
        and done.config.model_dump(mode="json") == config.train.model_dump(mode="json")
        and storage.exists(storage.join(done.model_uri, models.LORA_MARKER_NAME if done.mode == "lora"
                                        else "model_index.json"))
        and done.base_model_digest == models.model_digest(config.base_model, allow_pickle=config.allow_pickle)
    )  # fmt: skip
    return done if matches else None


def run(config: RunConfig, resume: bool = False, reuse_training: bool = False) -> RunResult:
    from dreambooth_lib import generate, identifier, ingest, prior, train

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    rd = config.run_dir
    subject = config.subject
    storage.write_json(storage.join(rd, "config.json"), config.model_dump(mode="json"))

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] = round(time.perf_counter() - start, 3)
        return out

    ingest_dir = storage.join(rd, "ingest")
    ingested = timed(
        "ingest", ingest.run, subject.images, ingest_dir, config.ingest, class_noun=subject.class_noun
    )

    id_uri = storage.join(rd, "identifier.json")
    if storage.exists(id_uri):  # the model of this run directory is bound to its identifier
        chosen = identifier.IdentifierResult.model_validate(storage.read_json(id_uri))
    else:
        chosen = timed(
            "identifier",
            identifier.run,
            config.base_model,
            subject.class_noun,
            config.identifier,
            registry_uri=config.registry.uri if config.registry else None,
            allow_pickle=config.allow_pickle,
        )
        storage.write_json(id_uri, chosen.model_dump(mode="json"))

    prior_result = None
    if config.train.prior_loss_weight > 0 and config.prior.num_images > 0:
        prior_result = timed(
            "prior",
            prior.run,
            config.base_model,
            subject.class_noun,
            config.prior,
            root=config.prior.root or storage.join(rd, "priors"),
            resolution=config.prior.resolution or config.train.resolution,
            allow_pickle=config.allow_pickle,
        )
        storage.write_json(storage.join(rd, "prior.json"), prior_result.model_dump(mode="json"))

    trained = reusable_training(config, chosen.identifier) if reuse_training else None
    reused = trained is not None
    if reused:
        times["train"] = 0.0
    else:
        trained = timed(
            "train",
            train.run,
            config.base_model,
            ingest_dir,
            prior_result.uri if prior_result else None,
            chosen.identifier,
            subject.class_noun,
            config.train,
            storage.join(rd, "train"),
            resume=resume,
            allow_pickle=config.allow_pickle,
            prior_images=prior_result.images if prior_result else None,
            prior_key=prior_result.key
            if prior_result
            else None,  # spares re-reading the set to key checkpoints
        )

    samples_dir = None
    if config.samples_per_prompt > 0 and config.sample_prompts:
        samples_dir = storage.join(rd, "samples")
        timed(
            "samples",
            generate.run,
            trained.model_uri,
            [fill_template(t, chosen.identifier, subject.class_noun) for t in config.sample_prompts],
            samples_dir,
            n=config.samples_per_prompt,
            seed=config.eval.seed,
            steps=config.eval.steps,
            sampler=config.eval.sampler,
            guidance_scale=config.eval.guidance_scale,
            resolution=config.eval.resolution or config.train.resolution,
            device=config.train.device,
            allow_pickle=config.allow_pickle,
        )

    result = RunResult(
        run_dir=rd,
        subject=subject.name,
        identifier=chosen.identifier,
        prompt=chosen.prompt,
        model_uri=trained.model_uri,
        num_instance_images=len(ingested.images),
        prior_uri=prior_result.uri if prior_result else None,
        samples_dir=samples_dir,
        wall_time_s=0.0,
        step_times_s=times,
        reused_training=reused,
    )

    if config.evaluate:
        from dreambooth_lib import evaluate

        eval_cfg = config.eval
        if eval_cfg.resolution is None:
            eval_cfg = eval_cfg.model_copy(update={"resolution": config.train.resolution})
        evaluated = timed(
            "evaluate",
            evaluate.run,
            trained.model_uri,
            ingest_dir,
            chosen.identifier,
            subject.class_noun,
            subject.live,
            eval_cfg,
            storage.join(rd, "eval"),
            base_model=config.base_model,
            allow_pickle=config.allow_pickle,
            prior_images=prior_result.images[:8] if prior_result else None,
            subject_name=subject.name,
        )
        result.metrics = dict(evaluated.metrics)
        result.gate = evaluated.gate.model_dump(mode="json")
        result.report_html = storage.join(rd, "eval", "report.html")

    gate_error: GateFailed | None = None
    if config.registry is not None:
        try:
            registered = timed("register", register_run, rd, config.registry.uri, config=config)
            result.registered = registered.model_dump(mode="json")
        except GateFailed as err:
            gate_error = err

    result.wall_time_s = round(time.perf_counter() - t0, 3)
    result.step_times_s = times
    storage.write_json(storage.join(rd, "run_result.json"), result.model_dump(mode="json"))
    if gate_error is not None:  # the run's artifacts are kept; only the registration is refused
        raise gate_error
    return result


def register_run(
    run_dir: str,
    registry_uri: str,
    *,
    subject: str | None = None,
    require_gate: bool = True,
    config: RunConfig | None = None,
):
    """Register the model of a finished run directory (reads config.json, ingest/, train/, eval/)."""
    from dreambooth_lib import registry

    if config is None:
        config_uri = storage.join(run_dir, "config.json")
        if not storage.exists(config_uri):
            raise DreamboothError(f"{run_dir}: no config.json; is this the run_dir of a `dreambooth run`?")
        config = parse_config(RunConfig, storage.read_json(config_uri), config_uri)
    eval_dir = storage.join(run_dir, "eval")
    return registry.register_from_dirs(
        registry_uri,
        subject=subject or config.subject.name,
        class_noun=config.subject.class_noun,
        train_dir=storage.join(run_dir, "train"),
        eval_dir=eval_dir if storage.exists(storage.join(eval_dir, "metrics.json")) else None,
        ingest_dir=storage.join(run_dir, "ingest"),
        require_gate=require_gate,
        run_config=config.model_dump(mode="json"),
        backend=config.registry.backend if config.registry else "file",
    )
