"""The base-model families we train, each behind the seam of `families.base.ModelFamily`."""

from __future__ import annotations

from typing import Any

from dreambooth_lib.errors import ConfigError
from dreambooth_lib.models.families.base import ModelFamily, PromptConditioning
from dreambooth_lib.models.families.flux import Flux
from dreambooth_lib.models.families.sd import StableDiffusion
from dreambooth_lib.models.families.sd3 import StableDiffusion3
from dreambooth_lib.models.families.sdxl import StableDiffusionXL

FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)


def family_of(pipe: Any) -> ModelFamily:
    """The family of a loaded diffusers pipeline; a ConfigError for a pipeline none of them trains."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family()
    names = ", ".join(f.pipeline_class for f in FAMILIES)
    raise ConfigError(
        f"a {type(pipe).__name__} is not a base model this tool trains; use one of: {names} "
        "(Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, FLUX.1)"
    )


def family_of_model(uri: str, allow_pickle: bool = False) -> ModelFamily:
    """The family of the model at `uri` (a diffusers folder, gs:// prefix, hub id or LoRA folder), read from its
    model_index.json: no weights are loaded."""
    from dreambooth_lib.models.loading import pipeline_class_name

    name = pipeline_class_name(uri, allow_pickle=allow_pickle)
    for family in FAMILIES:
        if family.pipeline_class == name:
            return family()
    names = ", ".join(f.pipeline_class for f in FAMILIES)
    raise ConfigError(f"{uri}: a {name} is not a base model this tool trains; use one of: {names}")


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family()
    raise ConfigError(f"model family {name!r} is unknown; use one of {', '.join(f.name for f in FAMILIES)}")
