"""The evaluation's prompts: the paper's prompt templates (DreamBooth, Sec. 4.1: 25 for live subjects, 25 for
objects, in assets/prompts.json), the templates a config selects, and the two texts made from each template: the
prompt sampled (with the identifier) and the text CLIP-T scores against (without it)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from dreambooth_lib.config import EvalConfig
from dreambooth_lib.errors import ConfigError


@lru_cache(maxsize=1)
def _prompt_lists() -> dict[str, Any]:
    return json.loads(resources.files("dreambooth_lib").joinpath("assets/prompts.json").read_text())


def paper_prompts(live: bool) -> list[str]:
    """The paper's 25 prompt templates for live subjects (animals) or objects; {0}=identifier, {1}=class noun."""
    return list(_prompt_lists()["live_subject_prompts" if live else "object_prompts"])


def eval_templates(config: EvalConfig, live: bool) -> list[str]:
    """The prompt templates evaluated: config.prompts or the paper's list, cut to max_prompts."""
    templates = list(config.prompts) if config.prompts is not None else paper_prompts(live)
    if config.max_prompts is not None:
        templates = templates[: config.max_prompts]
    if not templates:
        raise ConfigError("eval.prompts: empty; give at least one template such as 'a {0} {1} on the beach'")
    for t in templates:
        try:
            t.format("sks", "dog")
        except (IndexError, KeyError, ValueError) as err:
            raise ConfigError(
                f"eval.prompts: template {t!r} cannot be rendered ({err}); use only {{0}} (identifier) and "
                "{1} (class noun), and double other braces"
            ) from None
    return templates


def render_prompt(template: str, identifier: str, class_noun: str) -> str:
    """The prompt sampled: the template with identifier and class noun, whitespace collapsed."""
    return " ".join(template.format(identifier, class_noun).split())


def clip_t_text(template: str, class_noun: str) -> str:
    """The prompt CLIP-T scores against: the identifier removed, whitespace collapsed ("a dog on the beach")."""
    return render_prompt(template, "", class_noun)
