"""What is trained: a subject's photos, its prior set, its identifier prompt, and where its model is written."""

from __future__ import annotations

from pydantic import BaseModel

from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import ConfigError
from dreambooth_lib.train.data import list_png


class TrainSubject(BaseModel):
    """One subject of a training run (a run trains one, or K packed into one batch)."""

    name: str = "subject"
    instance_dir: str
    prior_dir: str | None
    identifier: str
    class_noun: str
    live: bool = False  # an animal or person: train.select probes with the paper's live prompts
    out: str  # out/model and out/train_summary.json are written here
    instance_images: list[str] | None = None  # default: the PNGs directly inside instance_dir
    prior_images: list[str] | None = None  # default: the PNGs directly inside prior_dir
    prior_key: str | None = (
        None  # the prior set's content key: spares hashing its images for the checkpoint key
    )

    @property
    def instance_prompt(self) -> str:
        return f"a {self.identifier} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_noun}"


def subject_images(
    subject: TrainSubject, config: TrainConfig, label: str = ""
) -> tuple[list[str], list[str]]:
    """(instance image URIs, prior image URIs) of a subject; the prior ones only when Eq. 2's prior term is on and
    its target is the sampled images (prior_mode "sampled"). `label` prefixes error messages (a pack's subject)."""
    instance = (
        list(subject.instance_images)
        if subject.instance_images is not None
        else list_png(subject.instance_dir)
    )
    if not instance:
        raise ConfigError(
            f"{label}{subject.instance_dir}: no .png subject images; run `dreambooth ingest` into this folder first"
        )
    prior: list[str] = []
    if config.prior_loss_weight > 0 and config.prior_mode == "sampled":
        if subject.prior_images is not None:
            prior = list(subject.prior_images)
        elif subject.prior_dir is not None:
            prior = list_png(subject.prior_dir)
        if not prior:
            raise ConfigError(
                f"{label}prior_dir {subject.prior_dir!r}: no class-prior images, but train.prior_loss_weight is "
                f"{config.prior_loss_weight}; generate a prior set (`dreambooth prior`) or set prior_loss_weight: 0"
            )
    return instance, prior
