"""Pydantic models of every step's configuration, with the paper's defaults, and one RunConfig that holds them."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dreambooth_lib.errors import ConfigError

SUBJECT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
Sampler = Literal["dpm++", "ddim", "euler", "unipc", "pndm"]


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PERSON_NEEDS_CONSENT = (
    "is a person (kind: person) but has no consent record; add consent: {given_by: <name>, date: YYYY-MM-DD, "
    "reference: <where the signed record is kept>}, or do not personalize this person"
)


class Consent(_Strict):
    """A person's consent to be personalized: who gave it, when, and where the signed record is kept."""

    given_by: str = Field(min_length=1, description="the person pictured, or their legal guardian")
    date: datetime.date = Field(description="when consent was given (YYYY-MM-DD)")
    reference: str = Field(
        min_length=1, description="where the signed record is kept: a document URI, ticket or form id"
    )


class Subject(_Strict):
    """The thing to personalize: its photos and the class noun that ties it to the model's prior."""

    name: str = Field(
        pattern=SUBJECT_NAME_PATTERN, description="slug: lowercase letters, digits, '_', '-', '.'"
    )
    class_noun: str = Field(min_length=1, max_length=40, description="e.g. 'dog', 'backpack'")
    images: str = Field(min_length=1, description="folder or gs:// prefix holding 3-5 photos of the subject")
    live: bool = Field(
        False, description="live subject (animal, person) or object: picks the paper's prompt list"
    )
    kind: Literal["object", "animal", "person"] = Field(
        "object", description="a person needs `consent`; animal and person subjects are live"
    )
    consent: Consent | None = Field(None, description="required for kind person: who consented, when, where")

    @field_validator("class_noun")
    @classmethod
    def _noun_is_plain(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c in v for c in "{}[]\n\t"):
            raise ValueError("a class noun is plain words such as 'dog' or 'teddy bear'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _animals_and_people_are_live(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in ("animal", "person") and "live" not in data:
            data = {**data, "live": True}
        return data

    @model_validator(mode="after")
    def _people_need_consent(self) -> Subject:
        # refused here, when the config is read: before any photo is copied or any GPU is asked for
        if self.kind == "person" and self.consent is None:
            raise ValueError(f"subject {self.name!r} {PERSON_NEEDS_CONSENT}")
        return self


class IngestConfig(_Strict):
    resolution: int = Field(512, ge=32, le=2048, description="side of the square training images")
    min_side: int = Field(256, ge=1, description="reject images whose shorter side is below this")
    min_images: int = Field(3, ge=1, description="fewest usable images for a run")
    allow_few: bool = Field(
        False, description="accept 1-2 images (with a warning) when min_images is not met"
    )
    strict: bool = Field(False, description="any bad file fails the run instead of being skipped")
    near_duplicate_distance: int = Field(
        6,
        ge=0,
        le=64,
        description="perceptual-hash Hamming distance at or below which two images are duplicates",
    )
    max_pixels: int = Field(
        89_478_485, ge=1, description="decompression-bomb limit (Pillow's default), in pixels"
    )


class IdentifierConfig(_Strict):
    identifier: str | None = Field(
        None, description="use this identifier instead of searching (still validated)"
    )
    seed: int = 0
    max_chars: int = Field(3, ge=1, le=3)
    letters_only: bool = True
    # CLIP's BPE vocabulary lists merges in order of frequency: ids >= 40000 are the last-learnt merges, the
    # rarest strings of the training corpus (the paper's 5000-10000 range was for T5 and holds common words on CLIP).
    min_token_id: int = Field(40000, ge=0)
    max_token_id: int | None = Field(
        None, description="exclusive upper bound; default: end of the regular vocabulary"
    )
    blocklist: list[str] = Field(default_factory=list, description="extra strings never to use")


PriorMode = Literal["sampled", "model_output"]


class PriorConfig(_Strict):
    mode: PriorMode = Field(
        "sampled",
        description="sampled: the paper's class-prior images, sampled from the frozen model; model_output: no "
        "images, the prior term's target is the frozen model's own prediction for the class prompt on the same "
        "noisy subject latents (one extra forward per step, nothing sampled)",
    )
    num_images: int = Field(200, ge=0, le=100_000, description="class-prior images (the paper: 200-1000)")
    sampler: Sampler = "dpm++"
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float | None = Field(
        None, ge=0, description="None: the base model's pipeline default (7.5)"
    )
    resolution: int | None = Field(None, ge=32, le=2048, description="None: the training resolution")
    batch_size: int = Field(4, ge=1, le=256)
    seed: int = 0
    root: str | None = Field(None, description="prior cache root (local or gs://); None: <run_dir>/priors")
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = Field(
        False,
        description="torch.compile the UNet (+ channels-last on CUDA): minutes up front, worth it for ~1000 images",
    )


DEFAULT_LEARNING_RATES = {"full": 5e-6, "lora": 1e-4}


ProbeMetric = Literal["dino", "clip_i", "clip_t", "div", "weighted"]


class SelectConfig(_Strict):
    """Choosing the best step: a small fixed probe sampled and scored (DINO, CLIP-I, CLIP-T, PRES, DIV) every
    `every` steps, and the rule that picks the step whose weights are exported.

    The rule: among the probes that keep CLIP-T >= base - clip_t_tolerance and PRES <= base + pres_tolerance (the
    base: the probe of step 0, the untrained model), the one with the highest `metric`; with metric "weighted",
    the highest sum of weights[m] * m (give PRES a negative weight). `patience`: stop training once that many
    probes in a row did not improve the best."""

    every: int = Field(
        200, ge=1, description="probe every N steps (and at step 0, the base reference, and the last)"
    )
    prompts: int = Field(
        3, ge=1, le=25, description="DreamBench prompts of the subject's kind, evenly spread"
    )
    images_per_prompt: int = Field(2, ge=1, le=16, description="fixed seeds per prompt")
    class_images: int = Field(4, ge=0, le=64, description="'a [class]' images for PRES (0: PRES unscored)")
    steps: int = Field(20, ge=1, le=1000, description="sampler steps per probe image")
    sampler: Sampler = "dpm++"
    guidance_scale: float | None = Field(None, ge=0, description="None: the model family's default")
    batch_size: int = Field(8, ge=1, le=256)
    seed: int = 0
    metric: ProbeMetric = "dino"
    weights: dict[Literal["dino", "clip_i", "clip_t", "pres", "div"], float] = Field(
        default_factory=dict, description="metric 'weighted': score = sum of weight x metric"
    )
    clip_t_tolerance: float | None = Field(
        0.02, ge=0, description="CLIP-T may fall at most this far below the base's (None: no bound)"
    )
    pres_tolerance: float | None = Field(
        0.1, ge=0, description="PRES may rise at most this far above the base's (None: no bound)"
    )
    patience: int | None = Field(None, ge=1, description="early stop after N probes without improvement")
    dino_model: str | None = Field(None, description="None: eval.dino_model")
    clip_model: str | None = Field(None, description="None: eval.clip_model")
    lpips_weights: str | None = Field(None, description="None: eval.lpips_weights (no weights: DIV unscored)")

    @model_validator(mode="after")
    def _weighted_needs_weights(self) -> SelectConfig:
        if self.metric == "weighted" and not self.weights:
            raise ValueError("metric 'weighted' needs weights, e.g. {dino: 1.0, clip_t: 1.0, pres: -0.5}")
        return self

    def with_evaluators(self, dino_model: str, clip_model: str, lpips_weights: str | None) -> SelectConfig:
        """This config with the evaluation's evaluators wherever its own are unset."""
        return self.model_copy(
            update={
                "dino_model": self.dino_model or dino_model,
                "clip_model": self.clip_model or clip_model,
                "lpips_weights": self.lpips_weights or lpips_weights,
            }
        )


class TrainConfig(_Strict):
    mode: Literal["full", "lora"] = "full"
    steps: int = Field(1000, ge=1, le=1_000_000)
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="None: by mode, the paper's 5e-6 for a full fine-tune, 1e-4 for LoRA (as diffusers' LoRA "
        "script: few, zero-initialised parameters need ~20x the rate)",
    )
    prior_loss_weight: float = Field(1.0, ge=0, description="lambda of Eq. 2; 0 turns prior preservation off")
    prior_mode: PriorMode = Field(
        "sampled", description="the prior term's target (a run sets it from prior.mode): see PriorConfig.mode"
    )
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = Field(None, gt=0)
    lora_rank: int = Field(4, ge=1, le=512)
    lora_alpha: float | None = Field(None, gt=0, description="None: equal to the rank (scale 1)")
    batch_size: int = Field(
        1, ge=1, le=64, description="subject images per step (the same number of prior images)"
    )
    resolution: int = Field(512, ge=32, le=2048)
    random_flip: bool = False
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on devices that support it, fp32 elsewhere"
    )
    compile: bool = Field(
        False, description="torch.compile the UNet (minutes to compile; pays off over ~1500 steps)"
    )
    cuda_graph: bool = Field(
        False,
        description="CUDA only: capture the whole step (forward, backward, clipping, AdamW) as one CUDA graph and "
        "replay it; needs bf16 or fp32, torch AdamW, no gradient checkpointing",
    )
    gradient_checkpointing: bool = False
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] | None = Field(
        None,
        description="flow-matching families only (SD3, FLUX.1): the timestep density and loss weighting; None: "
        "the family's default (FLUX.1 none, SD3 logit_normal, as diffusers' DreamBooth scripts)",
    )
    logit_mean: float = Field(0.0, description="weighting_scheme logit_normal: mean of the normal")
    logit_std: float = Field(1.0, gt=0, description="weighting_scheme logit_normal: its standard deviation")
    mode_scale: float = Field(1.29, description="weighting_scheme mode: the scale of the mode density")
    guidance_scale: float = Field(
        3.5, ge=0, description="FLUX.1-dev only: the guidance its distilled guidance embedding is trained at"
    )
    lora_target_modules: list[str] | None = Field(
        None,
        description="module names the LoRA adapters wrap in the denoiser; None: the family's (attention "
        "projections; FLUX.1 adds the double-stream blocks' feed-forward)",
    )
    use_8bit_adam: bool = False
    base_precision: Literal["fp32", "bf16", "nf4", "fp8"] = Field(
        "fp32",
        description="LoRA only: the frozen base's weights. bf16 halves their memory; nf4 (bitsandbytes) and fp8 "
        "(torchao) quantize the frozen denoiser further (CUDA only; FLUX.1 LoRA on 24-48 GB). All train under bf16 "
        "autocast; the adapters stay fp32",
    )
    max_grad_norm: float | None = Field(1.0, gt=0)
    adam_weight_decay: float = Field(1e-2, ge=0)
    checkpoint_every: int = Field(250, ge=0, description="0: no intermediate checkpoints")
    keep_checkpoints: int = Field(1, ge=1)
    keep_checkpoints_on_success: bool = Field(
        False, description="keep the run's checkpoints after the model is exported (default: delete them)"
    )
    log_every: int = Field(10, ge=1)
    select: SelectConfig | None = Field(
        None, description="score probes while training and export the best step (None: the last step)"
    )
    device: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _learning_rate_follows_the_mode(cls, data: Any) -> Any:
        # filled in here, not left None, so every summary, fingerprint and checkpoint records the rate that ran
        if isinstance(data, dict) and data.get("learning_rate") is None:
            data = {**data, "learning_rate": DEFAULT_LEARNING_RATES.get(data.get("mode", "full"), 5e-6)}
        return data

    @model_validator(mode="after")
    def _cuda_graph_is_capturable(self) -> TrainConfig:
        # what cannot live inside a captured CUDA graph: each syncs with the host or allocates during capture
        refused = [
            name
            for name, on in (
                ("mixed_precision: fp16 (its GradScaler reads found_inf on the host; use bf16)", self.mixed_precision == "fp16"),
                ("use_8bit_adam: true (bitsandbytes' optimizer is not capture-safe)", self.use_8bit_adam),
                ("gradient_checkpointing: true (recomputation stashes RNG state on the host)", self.gradient_checkpointing),
            )
            if on and self.cuda_graph
        ]  # fmt: skip
        if refused:
            raise ValueError(
                "cuda_graph: true cannot be combined with " + "; ".join(refused) + "; turn those off or set "
                "cuda_graph: false"
            )
        return self

    @model_validator(mode="after")
    def _low_precision_base_is_for_lora(self) -> TrainConfig:
        if self.base_precision != "fp32" and self.mode != "lora":
            raise ValueError(
                f"base_precision {self.base_precision} keeps a frozen base in low precision, but mode full trains "
                "every weight: use mode: lora, or base_precision: fp32"
            )
        return self


class GateConfig(_Strict):
    """Thresholds a model must meet to be registered. None disables a check."""

    min_dino: float | None = Field(None, ge=-1, le=1)
    min_clip_i: float | None = Field(None, ge=-1, le=1)
    min_clip_t: float | None = Field(None, ge=-1, le=1)
    max_pres: float | None = Field(None, ge=-1, le=1)
    min_div: float | None = Field(None, ge=0)
    compare_to_base: bool = Field(False, description="also evaluate the base model and require DINO above it")
    min_dino_gain_vs_base: float = Field(0.0, description="with compare_to_base: required DINO gain")


class EvalConfig(_Strict):
    prompts: list[str] | None = Field(
        None,
        description="templates with {0}=identifier, {1}=class noun; None: the paper's 25 for the subject kind",
    )
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts")
    images_per_prompt: int = Field(4, ge=1, le=64)
    pres_images: int = Field(8, ge=0, description="'a [class]' images sampled for PRES")
    sampler: Sampler = "dpm++"
    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    resolution: int | None = Field(None, ge=32, le=2048)
    batch_size: int = Field(4, ge=1, le=256)
    seed: int = 0
    compile: bool = Field(False, description="torch.compile the sampling UNet (see prior.compile)")
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "openai/clip-vit-base-patch32"
    lpips_weights: str | None = Field(
        None,
        description="LPIPS weights (a safetensors file of the published format); None: DIV is not computed",
    )
    device: str = "auto"
    gate: GateConfig = Field(default_factory=GateConfig)


class RegistryConfig(_Strict):
    uri: str = Field(min_length=1, description="registry root: a local folder or gs:// prefix")
    backend: Literal["file"] = "file"


class RunConfig(_Strict):
    """One personalization run: ingest -> identifier -> prior -> train -> samples -> evaluate -> register."""

    base_model: str = Field(min_length=1, description="local diffusers folder, gs:// prefix, or hub id")
    subject: Subject
    run_dir: str = Field(min_length=1, description="where every intermediate is written (local or gs://)")
    allow_pickle: bool = Field(
        False, description="allow .bin/.ckpt weights (pickle can run code); off by default"
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    identifier: IdentifierConfig = Field(default_factory=IdentifierConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig | None = None
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["a {0} {1}", "a {0} {1} on the beach"],
        description="templates rendered after training ({0}=identifier, {1}=class noun)",
    )
    samples_per_prompt: int = Field(2, ge=0, le=64)
    evaluate: bool = True

    @model_validator(mode="after")
    def _training_follows_the_prior_mode(self) -> RunConfig:
        if self.train.prior_mode != self.prior.mode:
            self.train.prior_mode = self.prior.mode
        return self

    @model_validator(mode="after")
    def _probes_score_with_the_evaluators(self) -> RunConfig:
        select = self.train.select
        if select is not None and None in (select.dino_model, select.clip_model):
            e = self.eval
            self.train.select = select.with_evaluators(e.dino_model, e.clip_model, e.lpips_weights)
        return self

    @model_validator(mode="after")
    def _resolutions_agree(self) -> RunConfig:
        if self.ingest.resolution != self.train.resolution:
            raise ValueError(
                f"ingest.resolution ({self.ingest.resolution}) and train.resolution ({self.train.resolution}) "
                "must be equal: training reads the ingested images as they are"
            )
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    """One message listing every bad field: its dotted path, the bad value and what is allowed."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the docs of this section)"
        elif e["type"] == "missing":
            parts.append(f"{loc}: missing (required)")
            continue
        parts.append(f"{loc}: got {shown}; {msg}")
    return f"{source}: invalid configuration: " + "; ".join(parts)


def parse_config(model: type[BaseModel], data: Any, source: str = "config") -> Any:
    """Validate `data` into `model`, turning pydantic's error into a ConfigError naming each field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config_text(text: str, source: str) -> Any:
    try:
        if source.endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{source}: not valid YAML/JSON: {err}") from None


def load_run_config(uri: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a RunConfig from a YAML or JSON file (local or gs://); `overrides` are dotted keys ('train.steps')."""
    from dreambooth_lib import storage

    uri = str(uri)
    if not storage.exists(uri):
        raise ConfigError(f"{uri}: config file not found")
    data = load_config_text(storage.read_text(uri), uri)
    if not isinstance(data, dict):
        raise ConfigError(f"{uri}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, p in enumerate(parents):
            if node.get(p) is None:  # absent, or `registry: null`: the override creates the section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"{uri}: cannot set {dotted}: {where} is {type(node).__name__}, not a section; "
                    f"set {where} itself instead"
                )
        node[leaf] = value
    return parse_config(RunConfig, data, uri)
