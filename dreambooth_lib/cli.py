"""The `dreambooth` command: each command parses flags into a config and calls one step of the library.

User errors (DreamboothError) print one line on stderr and exit 2; bugs keep their traceback. Options bound to a
config field are made from the pydantic model (`config_fields`): their type, help and the default they show; an
option the user leaves out is not passed, so the config's own default applies. Options several commands share
are written once (`option_group`). The speed benchmark is not part of the installed package: from a checkout,
`python -m benchmarks --help`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from dreambooth_lib.config import (
    EvalConfig,
    IdentifierConfig,
    IngestConfig,
    PriorConfig,
    RunConfig,
    TrainConfig,
)

app = typer.Typer(
    help="DreamBooth personalization of text-to-image models, as a library, a CLI and Kubeflow pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def config_option(model: type, field: str, *param_decls: str, help: str | None = None) -> Any:
    """A typer option bound to `model.field`: its help is the field's description and the default it shows is
    the field's default, both read from the model. The parameter itself defaults to None, which `_config` drops:
    an option the user did not give leaves the config's default in place, whatever that default becomes."""
    info = model.model_fields[field]
    default = info.get_default(call_default_factory=True)
    if isinstance(default, bool):  # shown as the flag that equals it, as click shows a boolean flag's default
        shown: bool | str = ("" if default else "no-") + field.replace("_", "-")
    else:
        shown = False if default is None else str(default)
    return typer.Option(*param_decls, help=help or info.description, show_default=shown)


def option_group(name: str, options: dict[str, tuple[Any, Any]]):
    """A decorator: the command's parameter `name` stands for the typer options `options` ({option: (annotation,
    default)}), which take its place in the signature typer reads; the command receives the values given as one
    dict under `name`. An option list that several commands share is written once."""

    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        parameters = []
        for p in signature.parameters.values():
            if p.name != name:
                parameters.append(p)
                continue
            parameters += [
                inspect.Parameter(option, p.kind, annotation=annotation, default=default)
                for option, (annotation, default) in options.items()
            ]

        @functools.wraps(fn)
        def command(*args, **kwargs):
            group = {option: kwargs.pop(option) for option in options if option in kwargs}
            return fn(*args, **kwargs, **{name: group})

        command.__signature__ = signature.replace(parameters=parameters)
        return command

    return decorate


def _option_type(model: type, field: str) -> Any:
    """The type typer parses a field's option as: the field's type without None, and a Literal's as the type of
    its values (the model checks the value, and its error names the choices)."""
    annotation = model.model_fields[field].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def config_fields(model: type, *fields: str, into: str = "options", help: dict[str, str] | None = None):
    """A decorator: the options of `model`'s `fields` (each a `config_option`, None when left out) in the place
    of the command's parameter `into`, which receives them as {field: value}; `help` overrides a field's."""
    help = help or {}
    return option_group(
        into,
        {
            field: (
                Annotated[
                    _option_type(model, field) | None, config_option(model, field, help=help.get(field))
                ],
                None,
            )
            for field in fields
        },
    )


JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as one JSON object on stdout")]
BaseModelOpt = Annotated[str, typer.Option("--model", help="base model: folder, gs:// prefix or hub id")]
AllowPickleOpt = Annotated[
    bool, typer.Option("--allow-pickle", help=RunConfig.model_fields["allow_pickle"].description)
]


def quiet_libraries() -> None:
    """Only errors from the libraries underneath, and no progress bars of theirs: a command's output is its own."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": noise on every load
    transformers_logging.disable_progress_bar()  # "Loading weights", per component
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "diffusers", "httpx", "urllib3", "google", "kfp"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def user_errors(fn):
    """Turn DreamboothError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dreambooth_lib.errors import DreamboothError

        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except DreamboothError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _emit(result: Any, as_json: bool, summary: str) -> None:
    if as_json:
        data = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
        typer.echo(json.dumps(data, default=str))
    else:
        typer.echo(summary)


def _config(model, source: str, config_file: str | None = None, **options):
    """`model` from the YAML/JSON `config_file` (if any) with the options the user gave (not None) on top."""
    from dreambooth_lib import storage
    from dreambooth_lib.config import load_config_text, parse_config
    from dreambooth_lib.errors import ConfigError

    data = load_config_text(storage.read_text(config_file), config_file) if config_file else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file}: expected a mapping of {model.__name__} fields at the top level")
    data.update({k: v for k, v in options.items() if v is not None})
    return parse_config(model, data, config_file or source)


def _class_noun(value: str) -> str:
    """The --class-noun value, stripped; an empty one is refused here, naming the flag."""
    from dreambooth_lib.errors import ConfigError

    noun = value.strip()
    if not noun:
        raise ConfigError("--class-noun is empty; give the subject's class, e.g. --class-noun dog")
    return noun


@app.command("tiny-model")
@user_errors
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the diffusers pipeline to")],
    seed: Annotated[int, typer.Option(help="weights are deterministic in the seed")] = 0,
    evaluators: Annotated[bool, typer.Option(help="also write tiny DINO, CLIP and LPIPS evaluators")] = False,
    family: Annotated[
        str,
        typer.Option(
            help="the base-model family to build: sd (SD 1.x-shaped), sdxl, sd3 or flux (FLUX.1-dev)"
        ),
    ] = "sd",
    sdxl: Annotated[bool, typer.Option(help="the same as --family sdxl")] = False,
    as_json: JsonOpt = False,
):
    """Write a tiny random-weight pipeline of a family with the real CLIP vocabulary (tests, demos; no download).

    Example: dreambooth tiny-model /tmp/tiny-flux --family flux
    """
    from dreambooth_lib.errors import ConfigError
    from dreambooth_lib.testing.tiny_models import TINY_BUILDERS

    family = "sdxl" if sdxl else family
    if family not in TINY_BUILDERS:
        raise ConfigError(f"--family {family!r} is unknown; use one of {', '.join(TINY_BUILDERS)}")
    out = TINY_BUILDERS[family](out_dir, seed=seed)
    result: dict[str, Any] = {"model": str(out), "family": family}
    if evaluators:
        from dreambooth_lib.testing import evaluators as ev

        result.update(ev.build_tiny_evaluators(out_dir / "evaluators", seed=seed))
    _emit(result, as_json, f"wrote a tiny model to {out}")


@app.command()
@user_errors
@config_fields(
    IngestConfig,
    "resolution",
    "min_images",
    "min_side",
    "near_duplicate_distance",
    "max_pixels",
    "allow_few",
    "strict",
)
def ingest(
    src: Annotated[str, typer.Argument(help="folder or gs:// prefix with the subject's photos")],
    out: Annotated[
        str, typer.Argument(help="folder or gs:// prefix for the validated images + manifest.json")
    ],
    class_noun: Annotated[
        str, typer.Option(help="the subject's class, e.g. 'dog' (recorded in the manifest)")
    ],
    *,
    options: dict[str, Any],
    kind: Annotated[
        str, typer.Option(help="object, animal or person (a person needs the three --consent-* options)")
    ] = "object",
    consent_given_by: Annotated[
        str | None, typer.Option(help="who consented: the person, or a guardian")
    ] = None,
    consent_date: Annotated[str | None, typer.Option(help="when consent was given, YYYY-MM-DD")] = None,
    consent_reference: Annotated[str | None, typer.Option(help="where the signed record is kept")] = None,
    as_json: JsonOpt = False,
):
    """Validate and normalise subject photos: decode, fix orientation/mode, reject bad files and duplicates.

    Example: dreambooth ingest photos/ gs://bucket/runs/dog/ingest --class-noun dog --resolution 512
    """
    from dreambooth_lib import ingest as step

    class_noun = _class_noun(class_noun)
    cfg = _config(IngestConfig, "ingest options", **options)
    consent = {"given_by": consent_given_by, "date": consent_date, "reference": consent_reference}
    consent = {k: v for k, v in consent.items() if v is not None}
    result = step.run(src, out, cfg, class_noun=class_noun, subject_kind=kind, consent=consent or None)
    for r in result.rejections:
        typer.echo(f"skipped {r.source}: {r.reason}", err=True)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    _emit(result, as_json, f"{len(result.images)} images ready in {out} ({len(result.rejections)} rejected)")


@app.command()
@user_errors
@config_fields(IdentifierConfig, "seed", "min_token_id", "max_token_id")
def identifier(
    model: BaseModelOpt,
    class_noun: Annotated[str, typer.Option(help="class noun the identifier precedes, e.g. 'dog'")],
    *,
    options: dict[str, Any],
    exclude: Annotated[list[str] | None, typer.Option(help="identifiers not to use (repeatable)")] = None,
    registry: Annotated[str | None, typer.Option(help="registry whose identifiers are excluded")] = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
):
    """Choose a rare-token identifier [V] from the model's own tokenizer (the paper's look-up).

    Example: dreambooth identifier --model ./tiny --class-noun dog --seed 0
    """
    from dreambooth_lib import identifier as step

    class_noun = _class_noun(class_noun)
    cfg = _config(IdentifierConfig, "identifier options", **options)
    result = step.run(
        model, class_noun, cfg, exclude=exclude or [], registry_uri=registry, allow_pickle=allow_pickle
    )
    _emit(
        result,
        as_json,
        f"{result.identifier} (token {result.token_id}; {result.candidates} candidates in ids "
        f"[{result.range[0]}, {result.range[1]})); prompt: '{result.prompt}'",
    )


DEFAULT_TRAIN_RESOLUTION = TrainConfig.model_fields["resolution"].default


@app.command()
@user_errors
@config_fields(
    PriorConfig,
    "num_images",
    "resolution",
    "steps",
    "sampler",
    "guidance_scale",
    "batch_size",
    "seed",
    "device",
    help={"resolution": f"side of the images (default: the training default, {DEFAULT_TRAIN_RESOLUTION})"},
)
def prior(
    model: BaseModelOpt,
    class_noun: Annotated[str, typer.Option(help="class noun: images of 'a <class>' are sampled")],
    root: Annotated[str, typer.Option(help="prior cache root (local or gs://), shared across subjects")],
    *,
    options: dict[str, Any],
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
):
    """Generate (or reuse, or extend) the class-prior set of 'a <class>' images from the frozen base model.

    Example: dreambooth prior --model ./tiny --class-noun dog --root gs://bucket/priors --num-images 200
    """
    from dreambooth_lib import prior as step

    class_noun = _class_noun(class_noun)
    cfg = _config(PriorConfig, "prior options", **options)
    result = step.run(
        model, class_noun, cfg, root=root, resolution=DEFAULT_TRAIN_RESOLUTION, allow_pickle=allow_pickle
    )
    _emit(result, as_json, f"{result.num_images} prior images at {result.uri} ({result.generated} new)")


@app.command()
@user_errors
@config_fields(
    TrainConfig,
    "mode",
    "steps",
    "learning_rate",
    "prior_loss_weight",
    "train_text_encoder",
    "lora_rank",
    "batch_size",
    "resolution",
    "seed",
    "mixed_precision",
    "compile",
    "cuda_graph",
    "gradient_checkpointing",
    "use_8bit_adam",
    "checkpoint_every",
    "device",
)
def train(
    model: BaseModelOpt,
    instance_dir: Annotated[str, typer.Option(help="output of `dreambooth ingest`")],
    identifier: Annotated[str, typer.Option(help="the rare-token identifier [V]")],
    class_noun: Annotated[str, typer.Option(help="class noun")],
    out: Annotated[str, typer.Option(help="output folder (local or gs://)")],
    prior_dir: Annotated[
        str | None, typer.Option(help="prior-set folder (omit with --prior-loss-weight 0)")
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="a YAML/JSON TrainConfig; options given here override its fields")
    ] = None,
    *,
    options: dict[str, Any],
    resume: Annotated[bool, typer.Option(help="continue from the newest complete checkpoint in OUT")] = False,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
):
    """Fine-tune with prior preservation (the paper's Eq. 2): full UNet or LoRA; resumable.

    Example: dreambooth train --model ./tiny --instance-dir run/ingest --prior-dir run/priors/KEY
    --identifier muh --class-noun dog --out run/train --steps 1000
    """
    from dreambooth_lib import train as step

    class_noun = _class_noun(class_noun)
    cfg = _config(TrainConfig, "train options", config, **options)
    result = step.run(
        model,
        instance_dir,
        prior_dir,
        identifier,
        class_noun,
        cfg,
        out,
        resume=resume,
        allow_pickle=allow_pickle,
    )
    _emit(
        result,
        as_json,
        f"trained {result.steps} steps ({result.s_per_step:.3f} s/step); model at {result.model_uri}",
    )


LoraBaseOpt = Annotated[
    str | None,
    typer.Option(help="base model of a LoRA folder that does not name its own (default: the one it records)"),
]


@app.command()
@user_errors
def generate(
    model: Annotated[str, typer.Option(help="trained model folder (full or LoRA), or any diffusers model")],
    prompt: Annotated[list[str], typer.Option(help="prompt text (repeatable)")],
    out: Annotated[str, typer.Option(help="output folder (local or gs://)")],
    n: Annotated[int, typer.Option("-n", "--n", help="images per prompt")] = 4,
    seed: int = 0,
    steps: int = 25,
    sampler: str = "dpm++",
    guidance_scale: float | None = None,
    resolution: int | None = None,
    base_model: LoraBaseOpt = None,
    device: str = "auto",
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
):
    """Render images from a trained model (or a base model + LoRA).

    Example: dreambooth generate --model run/train/model --prompt "a muh dog on the beach" -n 4 --out samples
    """
    from dreambooth_lib import generate as step

    result = step.run(
        model, prompt, out, n=n, seed=seed, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
        resolution=resolution, device=device, allow_pickle=allow_pickle, base_model=base_model,
    )  # fmt: skip
    _emit(result, as_json, f"wrote {len(result.images)} images to {out}")


@app.command()
@user_errors
@config_fields(
    EvalConfig, "images_per_prompt", "max_prompts", "steps", "dino_model", "clip_model", "lpips_weights"
)
def evaluate(
    model: Annotated[str, typer.Option(help="trained model folder (full or LoRA)")],
    real_images: Annotated[str, typer.Option(help="the subject's ingested images (output of ingest)")],
    identifier: Annotated[str, typer.Option(help="the identifier the model was trained with")],
    class_noun: Annotated[str, typer.Option(help="class noun")],
    out: Annotated[str, typer.Option(help="output folder: metrics.json, images/, report.html")],
    live: Annotated[bool, typer.Option(help="live subject (uses the paper's live-subject prompts)")] = False,
    config: Annotated[
        str | None, typer.Option(help="a YAML/JSON EvalConfig; options given here override its fields")
    ] = None,
    *,
    options: dict[str, Any],
    base_model: Annotated[
        str | None,
        typer.Option(
            help="base model of a LoRA folder that does not name its own; with gate.compare_to_base, the "
            "model compared against (default: the LoRA's recorded base)"
        ),
    ] = None,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
):
    """Evaluate by the paper's protocol: DINO, CLIP-I, CLIP-T, PRES, DIV, the real-image ceiling and the gate.

    Example: dreambooth evaluate --model run/train/model --real-images run/ingest --identifier muh
    --class-noun dog --live --out run/eval
    """
    from dreambooth_lib import evaluate as step
    from dreambooth_lib import storage
    from dreambooth_lib.artifacts import REPORT_NAME

    class_noun = _class_noun(class_noun)
    cfg = _config(EvalConfig, "evaluate options", config, **options)
    result = step.run(
        model,
        real_images,
        identifier,
        class_noun,
        live,
        cfg,
        out,
        base_model=base_model,
        allow_pickle=allow_pickle,
    )
    m = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in result.metrics.items()}
    verdict = "passed" if result.gate.passed else "FAILED: " + "; ".join(result.gate.reasons)
    _emit(
        result,
        as_json,
        f"DINO {m.get('dino')}  CLIP-I {m.get('clip_i')}  CLIP-T {m.get('clip_t')}  PRES {m.get('pres')}  "
        f"DIV {m.get('div')}  gate {verdict}; report: {storage.join(out, REPORT_NAME)}",
    )


@app.command()
@user_errors
def register(
    registry: Annotated[str, typer.Option(help="registry root (local folder or gs:// prefix)")],
    run_dir: Annotated[str, typer.Option(help="a `dreambooth run` directory (ingest/, train/, eval/)")],
    subject: Annotated[str | None, typer.Option(help="subject name (default: from the run's config)")] = None,
    require_gate: Annotated[bool, typer.Option(help="refuse a model whose quality gate failed")] = True,
    as_json: JsonOpt = False,
):
    """Register a trained, evaluated model as a new immutable version (refused when its gate failed).

    Example: dreambooth register --registry gs://bucket/registry --run-dir gs://bucket/runs/dog
    """
    from dreambooth_lib.runs import personalize

    result = personalize.register_run(run_dir, registry, subject=subject, require_gate=require_gate)
    _emit(result, as_json, f"registered {result.subject} v{result.version} at {result.uri}")


@app.command()
@user_errors
def run(
    config: Annotated[str, typer.Option(help="a RunConfig YAML/JSON (local or gs://)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: --set train.steps=200 (repeatable)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue training from the newest checkpoint")] = False,
    allow_pickle: AllowPickleOpt = False,
    as_json: JsonOpt = False,
):
    """Run one subject end to end, in-process: ingest → identifier → prior → train → samples → evaluate → register.

    Example: dreambooth run --config configs/tiny.yaml --set run_dir=/tmp/run1
    """
    import yaml

    from dreambooth_lib.config import load_run_config
    from dreambooth_lib.errors import ConfigError
    from dreambooth_lib.runs import personalize

    overrides = {}
    for item in set_ or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=200")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    if allow_pickle:
        overrides["allow_pickle"] = True
    cfg = load_run_config(config, overrides)
    result = personalize.run(cfg, resume=resume)
    _emit(result, as_json, result.summary())


@models_app.command("list")
@user_errors
def models_list(
    registry: Annotated[str, typer.Option(help="registry root")],
    subject: str | None = None,
    as_json: JsonOpt = False,
):
    """List registered models. Example: dreambooth models list --registry gs://bucket/registry"""
    from dreambooth_lib.registry import open_registry

    entries = open_registry(registry).list_models(subject)
    if as_json:
        typer.echo(json.dumps([e.model_dump(mode="json") for e in entries], default=str))
        return
    for e in entries:
        typer.echo(f"{e.subject}\tv{e.version}\t{e.identifier}\t{e.class_noun}\t{e.uri}")


@models_app.command("show")
@user_errors
def models_show(
    registry: Annotated[str, typer.Option(help="registry root")],
    subject: Annotated[str, typer.Argument(help="subject name")],
    version: int | None = None,
    as_json: JsonOpt = False,
):
    """Show one registered model (latest version by default). Example: dreambooth models show dog --registry reg/"""
    from dreambooth_lib.registry import open_registry

    entry = open_registry(registry).show(subject, version)
    _emit(entry, as_json, json.dumps(entry.model_dump(mode="json"), indent=2, default=str))


# --- Kubeflow Pipelines: submit, schedule, upload ----------------------------------------------------------------

KfpHostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="KF_PIPELINES_ENDPOINT",
        help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline (default $KF_PIPELINES_ENDPOINT)",
    ),
]
KfpTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--existing-token",
        envvar="KFP_EXISTING_TOKEN",
        help="bearer token for the KFP API (default $KFP_EXISTING_TOKEN, the variable the kfp CLI reads too)",
    ),
]
KfpTokenFileOpt = Annotated[
    str | None,
    typer.Option(
        "--token-file",
        help="file holding the bearer token, re-read on every request (default $KF_PIPELINES_SA_TOKEN_PATH, "
        "else Kubeflow's in-pod token path when it exists, as kfp.Client reads it)",
    ),
]
KfpCookiesOpt = Annotated[
    str | None,
    typer.Option(
        "--cookies", help="Cookie header for an authenticating proxy, e.g. 'authservice_session=...'"
    ),
]
KfpNamespaceOpt = Annotated[
    str | None, typer.Option(help="Kubeflow profile namespace (multi-user deployments), e.g. kubeflow-user")
]
KfpRootOpt = Annotated[
    str | None,
    typer.Option(
        help="pipeline root for this run's artifacts (gs://, s3:// or minio://); default: the cluster's"
    ),
]
KfpServiceAccountOpt = Annotated[
    str | None, typer.Option(help="Kubernetes service account the run's pods use (default: the profile's)")
]
ParamsOpt = Annotated[str | None, typer.Option(help="YAML/JSON file of pipeline parameters")]


# The options that say which KFP API a command talks to (KfpEndpoint), and where a run goes and with what.
KFP_ENDPOINT_OPTIONS = {
    "host": (KfpHostOpt, None),
    "namespace": (KfpNamespaceOpt, None),
    "existing_token": (KfpTokenOpt, None),
    "token_file": (KfpTokenFileOpt, None),
    "cookies": (KfpCookiesOpt, None),
}
KFP_RUN_OPTIONS = {
    "params": (ParamsOpt, None),
    "experiment": (str | None, None),
    "pipeline_root": (KfpRootOpt, None),
    "service_account": (KfpServiceAccountOpt, None),
}


def _endpoint(options: dict[str, Any]):
    """The KfpEndpoint of the KFP_ENDPOINT_OPTIONS given."""
    from dreambooth_lib.submit import KfpAuth, KfpEndpoint

    auth = {key: options[key] for key in ("existing_token", "token_file", "cookies")}
    return KfpEndpoint(host=options["host"], namespace=options["namespace"], auth=KfpAuth(**auth))


def _run_options(pipeline: str, options: dict[str, Any]) -> dict[str, Any]:
    """The KFP_RUN_OPTIONS given, as submit_run and schedule_run take them: `params` read from its file."""
    from dreambooth_lib import submit as kfp_submit

    params = options["params"]
    return {**options, "params": kfp_submit.load_params(params, pipeline) if params else {}}


@app.command()
@user_errors
@option_group("endpoint", KFP_ENDPOINT_OPTIONS)
@option_group("run_options", KFP_RUN_OPTIONS)
def submit(
    pipeline: Annotated[str, typer.Argument(help="compiled pipeline YAML (pipelines/compiled/...)")],
    *,
    endpoint: dict[str, Any],
    run_options: dict[str, Any],
    run_name: str | None = None,
    as_json: JsonOpt = False,
):
    """Submit a compiled pipeline as a run on Kubeflow Pipelines (parameters sent typed).

    Example: dreambooth submit pipelines/compiled/personalize.kfp.yaml --host $KFP_HOST --params run.yaml
    """
    from dreambooth_lib import submit as kfp_submit

    result = kfp_submit.submit_run(
        pipeline, _endpoint(endpoint), run_name=run_name, **_run_options(pipeline, run_options)
    )
    _emit(result, as_json, f"submitted run {result}")


@app.command()
@user_errors
@option_group("endpoint", KFP_ENDPOINT_OPTIONS)
@option_group("run_options", KFP_RUN_OPTIONS)
def schedule(
    pipeline: Annotated[str, typer.Argument(help="compiled pipeline YAML")],
    cron: Annotated[str, typer.Option(help="6-field cron: 'SEC MIN HOUR DOM MON DOW', e.g. '0 0 2 * * *'")],
    *,
    endpoint: dict[str, Any],
    run_options: dict[str, Any],
    job_name: str | None = None,
    max_concurrency: int = 1,
    as_json: JsonOpt = False,
):
    """Create an enabled recurring run (parameters sent typed, unlike `kfp recurring-run create`).

    Example: dreambooth schedule pipelines/compiled/batch_personalize.kfp.yaml --host $KFP_HOST
    --cron '0 0 2 * * *' --params batch.yaml
    """
    from dreambooth_lib import submit as kfp_submit

    result = kfp_submit.schedule_run(
        pipeline,
        _endpoint(endpoint),
        cron=cron,
        job_name=job_name,
        max_concurrency=max_concurrency,
        **_run_options(pipeline, run_options),
    )
    _emit(result, as_json, f"scheduled recurring run {result}")


@app.command()
@user_errors
@option_group("endpoint", KFP_ENDPOINT_OPTIONS)
def upload(
    pipeline: Annotated[str, typer.Argument(help="compiled pipeline YAML")],
    *,
    endpoint: dict[str, Any],
    name: Annotated[
        str | None, typer.Option(help="pipeline name in the UI (default: the compiled name)")
    ] = None,
    version_name: Annotated[
        str | None, typer.Option(help="name of the new version (default: <package version>-<file digest>)")
    ] = None,
    description: str | None = None,
    as_json: JsonOpt = False,
):
    """Upload a compiled pipeline to the Pipelines UI; a pipeline of that name gets a new version instead.

    Example: dreambooth upload pipelines/compiled/personalize.kfp.yaml --host $KFP_HOST
    """
    from dreambooth_lib import submit as kfp_submit

    result = kfp_submit.upload_pipeline(
        pipeline, _endpoint(endpoint), name=name, description=description, version_name=version_name
    )
    _emit(result, as_json, f"uploaded {result}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
