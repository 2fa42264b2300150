"""One subject end to end, in-process: ingest → identifier → prior → train → samples → evaluate → register.

The same steps the Kubeflow pipeline runs as separate tasks, called one after another with every intermediate
under one run directory (local or gs://), laid out as docs/architecture.md describes. A rerun of the same run
directory reuses the chosen identifier (the model is bound to it) and the prior cache, and `resume` continues
training from its newest complete checkpoint. With `reuse_training`, a model already trained into `train/` for
this very run (same identifier, class, train settings and base model: e.g. by a batch's packed LoRA step) is used
as is instead of training again.

Prior preservation is off when `prior.num_images` or `train.prior_loss_weight` is 0: no prior image is sampled
and training runs with λ = 0 (`prior.preservation`); the run's record says so. A registry with gate thresholds
needs the evaluation that checks them: `evaluate: false` with thresholds is refused before anything runs, and
without thresholds the model is registered as not evaluated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from dreambooth_lib import artifacts, prior, storage
from dreambooth_lib.config import RunConfig, TrainConfig, parse_config
from dreambooth_lib.errors import ConfigError, DreamboothError, GateFailed

log = logging.getLogger(__name__)
T = TypeVar("T")

# GateConfig fields that make a registration conditional on the evaluation (compare_to_base: a DINO threshold)
GATE_THRESHOLDS = ("min_dino", "min_clip_i", "min_clip_t", "max_pres", "min_div")


class RunResult(BaseModel):
    run_dir: str
    subject: str
    identifier: str
    prompt: str
    model_uri: str
    num_instance_images: int
    prior_uri: str | None
    samples_dir: str | None
    metrics: dict[str, Any] | None = None  # None: not evaluated (`evaluate: false`)
    gate: dict[str, Any] | None = None
    report_html: str | None = None
    registered: dict[str, Any] | None = None
    wall_time_s: float
    step_times_s: dict[str, float]
    reused_training: bool = False  # train/ already held this run's model (e.g. trained in a batch's pack)
    prior_preservation: bool = True  # False: trained without class-prior images, λ = 0
    prior_mode: str = "sampled"  # "model_output": the prior term against the frozen model, no images
    warnings: list[str] = Field(default_factory=list)  # settings the run read differently than they say
    chosen_step: int | None = None  # train.select: the step whose weights were exported

    def summary(self) -> str:
        lines = [
            f"subject {self.subject}: prompt with '{self.prompt}'",
            f"  model    {self.model_uri}",
            f"  samples  {self.samples_dir}",
        ]
        if self.chosen_step is not None:
            lines.append(f"  step     {self.chosen_step} (chosen by train.select)")
        if not self.prior_preservation:
            lines.append("  prior    off (no class-prior images, λ = 0)")
        elif self.prior_mode == "model_output":
            lines.append("  prior    the frozen model's own predictions (no class-prior images)")
        if self.metrics is not None:
            shown = "  ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items()
            )
            lines.append(f"  metrics  {shown}")
            lines.append(f"  report   {self.report_html}")
        if self.gate is not None:
            verdict = (
                "passed" if self.gate.get("passed") else "failed: " + "; ".join(self.gate.get("reasons", []))
            )
            lines.append(f"  gate     {verdict}")
        if self.registered is not None:
            unevaluated = ", not evaluated" if self.metrics is None else ""
            lines.append(
                f"  registry {self.registered.get('uri')} (v{self.registered.get('version')}{unevaluated})"
            )
        lines += [f"  warning  {w}" for w in self.warnings]
        lines.append(f"  wall time {self.wall_time_s:.1f} s")
        return "\n".join(lines)


class StepClock:
    """The wall time of each step a run executed, in seconds (`RunResult.step_times_s`)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def timed(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - start, 3)
        return out


def fill_template(template: str, identifier: str, class_noun: str) -> str:
    return template.format(identifier, class_noun)


# --- what the configuration means ----------------------------------------------------------------------------


def check_config(config: RunConfig) -> None:
    """Refuse, before any work, what only a whole run can judge: gate thresholds that would never be checked.

    The registry refuses a model only on an evaluation's verdict, so `evaluate: false` with thresholds set would
    register the model unchecked; the user set the thresholds to prevent exactly that.
    """
    gate = config.eval.gate
    thresholds = [f"eval.gate.{name}" for name in GATE_THRESHOLDS if getattr(gate, name) is not None]
    thresholds += ["eval.gate.compare_to_base"] if gate.compare_to_base else []
    if config.registry is not None and not config.evaluate and thresholds:
        raise ConfigError(
            f"evaluate is false but {', '.join(thresholds)} set a quality gate for the registry "
            f"({config.registry.uri}): the model would be registered without the gate; set evaluate: true to "
            "check it, or remove the gate thresholds to register the model as not evaluated"
        )


def training_config(config: RunConfig) -> tuple[TrainConfig, prior.Preservation]:
    """The TrainConfig the run trains with (λ = 0 when prior preservation is off) and the decision itself."""
    decision = prior.preservation(
        config.prior.num_images, config.train.prior_loss_weight, mode=config.prior.mode
    )
    if decision.prior_loss_weight == config.train.prior_loss_weight:
        return config.train, decision
    return config.train.model_copy(update={"prior_loss_weight": decision.prior_loss_weight}), decision


def class_prior(config: RunConfig) -> prior.PriorResult:
    """The run's class-prior set, found in (or added to) the cache under prior.root (default <run_dir>/priors)."""
    return prior.run(
        config.base_model,
        config.subject.class_noun,
        config.prior,
        root=config.prior.root or storage.join(config.run_dir, "priors"),
        resolution=config.prior.resolution or config.train.resolution,
        allow_pickle=config.allow_pickle,
    )


def reusable_training(config: RunConfig, identifier: str, train_config: TrainConfig | None = None):
    """The TrainResult in `<run_dir>/train/` when it is this run's model (its model folder exists and its
    identifier, class, train settings and base model digest match), else None: then the run trains.
    `train_config`: the settings the run trains with (default: `training_config(config)`)."""
    from dreambooth_lib import models, train

    train_config = train_config or training_config(config)[0]
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
        and done.mode == train_config.mode
        and done.config.model_dump(mode="json") == train_config.model_dump(mode="json")
        and storage.exists(storage.join(done.model_uri, models.LORA_MARKER_NAME if done.mode == "lora"
                                        else "model_index.json"))
        and done.base_model_digest == models.model_digest(config.base_model, allow_pickle=config.allow_pickle)
    )  # fmt: skip
    return done if matches else None


# --- the steps, in the order they run ------------------------------------------------------------------------


def run(config: RunConfig, resume: bool = False, reuse_training: bool = False) -> RunResult:
    """Every step of one subject under `config.run_dir`; returns (and writes as run_result.json) what it made.

    A failed gate raises GateFailed after run_result.json is written: the run's artifacts are kept, only the
    registration is refused.
    """
    from dreambooth_lib import ingest

    check_config(config)
    t0 = time.perf_counter()
    clock = StepClock()
    rd, subject = config.run_dir, config.subject
    storage.write_json(storage.join(rd, artifacts.RUN_CONFIG_NAME), config.model_dump(mode="json"))
    train_config, preservation = training_config(config)
    if preservation.warning:
        log.warning(preservation.warning)

    ingest_dir = storage.join(rd, "ingest")
    ingested = clock.timed(
        "ingest", ingest.run, subject.images, ingest_dir, config.ingest, class_noun=subject.class_noun,
        subject_kind=subject.kind, consent=subject.consent,
    )  # fmt: skip
    chosen = bound_identifier(config, clock)
    prior_result = clock.timed("prior", class_prior, config) if preservation.samples else None
    if prior_result is not None:
        prior_result.write(storage.join(rd, artifacts.RUN_PRIOR_NAME))
    trained, reused = train_subject(config, train_config, chosen.identifier, prior_result, clock,
                                    resume=resume, reuse_training=reuse_training)  # fmt: skip
    result = RunResult(
        run_dir=rd,
        subject=subject.name,
        identifier=chosen.identifier,
        prompt=chosen.prompt,
        model_uri=trained.model_uri,
        chosen_step=(trained.selection or {}).get("chosen_step"),
        num_instance_images=len(ingested.images),
        prior_uri=prior_result.uri if prior_result else None,
        samples_dir=render_samples(config, trained.model_uri, chosen.identifier, clock),
        wall_time_s=0.0,
        step_times_s=clock.times,
        reused_training=reused,
        prior_preservation=preservation.on,
        prior_mode=config.prior.mode,
        warnings=[preservation.warning] if preservation.warning else [],
    )
    if config.evaluate:
        evaluate_run(config, result, ingest_dir, prior_result, clock)
    gate_error = register_if_configured(config, result, clock)
    result.wall_time_s = round(time.perf_counter() - t0, 3)
    result.step_times_s = clock.times  # pydantic copied the dict: evaluate and register came after
    storage.write_json(storage.join(rd, artifacts.RUN_RESULT_NAME), result.model_dump(mode="json"))
    if gate_error is not None:  # the run's artifacts are kept; only the registration is refused
        raise gate_error
    return result


def bound_identifier(config: RunConfig, clock: StepClock):
    """The run directory's identifier: chosen once and kept (its model is bound to it), or chosen now."""
    from dreambooth_lib import identifier

    id_uri = storage.join(config.run_dir, artifacts.IDENTIFIER_NAME)
    if storage.exists(id_uri):
        return identifier.IdentifierResult.model_validate(storage.read_json(id_uri))
    chosen = clock.timed(
        "identifier",
        identifier.run,
        config.base_model,
        config.subject.class_noun,
        config.identifier,
        registry_uri=config.registry.uri if config.registry else None,
        allow_pickle=config.allow_pickle,
    )
    storage.write_json(id_uri, chosen.model_dump(mode="json"))
    return chosen


def train_subject(
    config: RunConfig,
    train_config: TrainConfig,
    identifier: str,
    prior_result: prior.PriorResult | None,
    clock: StepClock,
    *,
    resume: bool,
    reuse_training: bool,
):
    """(TrainResult, reused): the model trained into <run_dir>/train, or the one already there for this run."""
    from dreambooth_lib import train

    done = reusable_training(config, identifier, train_config) if reuse_training else None
    if done is not None:
        clock.times["train"] = 0.0
        return done, True
    trained = clock.timed(
        "train",
        train.run,
        config.base_model,
        storage.join(config.run_dir, "ingest"),
        prior_result.uri if prior_result else None,
        identifier,
        config.subject.class_noun,
        train_config,
        storage.join(config.run_dir, "train"),
        resume=resume,
        allow_pickle=config.allow_pickle,
        prior_images=prior_result.images if prior_result else None,
        prior_key=prior_result.key if prior_result else None,  # spares re-reading the set to key checkpoints
        live=config.subject.live,
    )
    return trained, False


def render_samples(config: RunConfig, model_uri: str, identifier: str, clock: StepClock) -> str | None:
    """`samples_per_prompt` images of each sample prompt into <run_dir>/samples; None when none are asked for."""
    from dreambooth_lib import generate

    if config.samples_per_prompt <= 0 or not config.sample_prompts:
        return None
    samples_dir = storage.join(config.run_dir, "samples")
    clock.timed(
        "samples",
        generate.run,
        model_uri,
        [fill_template(t, identifier, config.subject.class_noun) for t in config.sample_prompts],
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
    return samples_dir


def evaluate_run(
    config: RunConfig,
    result: RunResult,
    ingest_dir: str,
    prior_result: prior.PriorResult | None,
    clock: StepClock,
) -> None:
    """The paper's metrics and the gate into <run_dir>/eval, recorded on `result`."""
    from dreambooth_lib import evaluate

    eval_config = config.eval
    if eval_config.resolution is None:
        eval_config = eval_config.model_copy(update={"resolution": config.train.resolution})
    evaluated = clock.timed(
        "evaluate",
        evaluate.run,
        result.model_uri,
        ingest_dir,
        result.identifier,
        config.subject.class_noun,
        config.subject.live,
        eval_config,
        storage.join(config.run_dir, "eval"),
        base_model=config.base_model,
        allow_pickle=config.allow_pickle,
        prior_images=prior_result.images[:8] if prior_result else None,
        subject_name=config.subject.name,
    )
    result.metrics = dict(evaluated.metrics)
    result.gate = evaluated.gate.model_dump(mode="json")
    result.report_html = storage.join(config.run_dir, "eval", "report.html")


def register_if_configured(config: RunConfig, result: RunResult, clock: StepClock) -> GateFailed | None:
    """Register into the configured registry (if any), recorded on `result`; a failed gate is returned, not
    raised, so the caller writes the run's record first."""
    if config.registry is None:
        return None
    try:
        registered = clock.timed("register", register_run, config.run_dir, config.registry.uri, config=config)
    except GateFailed as err:
        return err
    result.registered = registered.model_dump(mode="json")
    return None


def register_run(
    run_dir: str,
    registry_uri: str,
    *,
    subject: str | None = None,
    require_gate: bool = True,
    config: RunConfig | None = None,
):
    """Register the model of a finished run directory (reads config.json, ingest/, train/, eval/).

    The evaluation is attached only when the run evaluated (`evaluate: true`): an eval/ left by an earlier run of
    the same directory belongs to another model. Otherwise the model is registered as not evaluated.
    """
    from dreambooth_lib import registry

    if config is None:
        config_uri = storage.join(run_dir, artifacts.RUN_CONFIG_NAME)
        if not storage.exists(config_uri):
            raise DreamboothError(f"{run_dir}: no config.json; is this the run_dir of a `dreambooth run`?")
        config = parse_config(RunConfig, storage.read_json(config_uri), config_uri)
    eval_dir = storage.join(run_dir, "eval")
    evaluated = config.evaluate and storage.exists(storage.join(eval_dir, "metrics.json"))
    return registry.register_from_dirs(
        registry_uri,
        subject=subject or config.subject.name,
        class_noun=config.subject.class_noun,
        train_dir=storage.join(run_dir, "train"),
        eval_dir=eval_dir if evaluated else None,
        ingest_dir=storage.join(run_dir, "ingest"),
        require_gate=require_gate,
        run_config=config.model_dump(mode="json"),
        backend=config.registry.backend if config.registry else "file",
    )
