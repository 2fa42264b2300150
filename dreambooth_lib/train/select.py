"""Choosing the best step: score a small fixed probe while training, and export the step the rule picks.

The paper warns that DreamBooth overfits and loses diversity "especially when trained for too long", and the right
number of steps differs by subject. So every `select.every` steps (and at step 0, the untrained model: the
reference of the rule's bounds, and at the last step) the model being trained samples a fixed probe — a few
DreamBench prompts of the subject's kind x a few seeds, plus "a [class]" for PRES — and the probe is scored with the
evaluation's own code (`evaluate.scores.Scorer`): DINO, CLIP-I, CLIP-T, PRES, DIV against the subject's photos.

The rule (SelectConfig): among probes whose CLIP-T stays within `clip_t_tolerance` of the base's and whose PRES
stays within `pres_tolerance` of it, the best `metric`; early stop after `patience` probes without a new best.
The best step's trainable weights are kept (on the host; and beside the checkpoints, so a retried run exports the
same step) and exported instead of the last step's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from dreambooth_lib import storage
from dreambooth_lib.config import SelectConfig
from dreambooth_lib.errors import ConfigError, StorageError
from dreambooth_lib.evaluate.prompts import clip_t_text, paper_prompts, render_prompt
from dreambooth_lib.train.subjects import TrainSubject
from dreambooth_lib.train.trainer import Trainer

log = logging.getLogger(__name__)

PROBE_METRICS = ("dino", "clip_i", "clip_t", "pres", "div")


# --- the rule ----------------------------------------------------------------------------------------------------


def rule_score(metrics: dict[str, float | None], select: SelectConfig) -> float | None:
    """The number the rule maximizes for one probe (None when a metric it needs was not scored)."""
    if select.metric != "weighted":
        return metrics.get(select.metric)
    terms = [(metrics.get(name), weight) for name, weight in select.weights.items()]
    if any(value is None for value, _ in terms):
        return None
    return sum(value * weight for value, weight in terms)


def within_bounds(
    metrics: dict[str, float | None], base: dict[str, float | None], select: SelectConfig
) -> bool:
    """The rule's bounds against the base probe: CLIP-T not below base - δ_t, PRES not above base + δ_p (a bound
    whose metric is unscored holds)."""
    bounds = (
        ("clip_t", select.clip_t_tolerance, lambda v, b, d: v >= b - d),
        ("pres", select.pres_tolerance, lambda v, b, d: v <= b + d),
    )
    for name, tolerance, holds in bounds:
        value, reference = metrics.get(name), base.get(name)
        if tolerance is not None and value is not None and reference is not None:
            if not holds(value, reference, tolerance):
                return False
    return True


def choose(probes: list[dict[str, Any]], select: SelectConfig) -> int | None:
    """The step the rule picks from a probe series (probes[0]: the base at step 0, never a candidate). Ties go to
    the earlier step. When no probe keeps within the bounds, the best-scoring one (the summary says so)."""
    if len(probes) < 2:
        return None
    base, candidates = probes[0], [p for p in probes[1:] if rule_score(p, select) is not None]
    if not candidates:
        return probes[-1]["step"]
    inside = [p for p in candidates if within_bounds(p, base, select)] or candidates
    return max(inside, key=lambda p: (rule_score(p, select), -p["step"]))["step"]


def probes_since_best(probes: list[dict[str, Any]], chosen: int | None) -> int:
    """How many probes came after the chosen one: early stop compares it with `patience`."""
    return sum(1 for p in probes[1:] if chosen is not None and p["step"] > chosen)


def check_scorable(select: SelectConfig) -> None:
    """Refuse, before any training, a rule that needs a metric the probe cannot score."""
    needed = {select.metric} if select.metric != "weighted" else set(select.weights)
    missing = []
    if select.dino_model is None or select.clip_model is None:
        missing.append("train.select.dino_model and clip_model (a run copies eval's; set them for `train`)")
    if "div" in needed and select.lpips_weights is None:
        missing.append("DIV needs LPIPS weights: set train.select.lpips_weights (or eval.lpips_weights)")
    if "div" in needed and select.images_per_prompt < 2:
        missing.append("DIV needs images_per_prompt >= 2")
    if "pres" in needed and select.class_images == 0:
        missing.append("PRES needs class_images >= 1")
    if missing:
        raise ConfigError("train.select cannot score its rule: " + "; ".join(missing))


# --- the probe ---------------------------------------------------------------------------------------------------


def probe_templates(select: SelectConfig, live: bool) -> list[str]:
    """`select.prompts` of the paper's templates for the subject's kind, evenly spread over the list."""
    templates = paper_prompts(live)
    n = min(select.prompts, len(templates))
    return [templates[i * len(templates) // n] for i in range(n)]


@contextmanager
def sampling_view(pipe: Any, t: Trainer, subject: int) -> Iterator[Any]:
    """`pipe` as subject k's model of this moment, ready to sample: the VAE and frozen text encoders on the
    training device, every module in eval mode, a pack's adapter k routed to every row. Everything is put back
    as training left it (devices, modes, the pipeline's scheduler, which sampling replaces)."""
    device, encoders = t.speed.device, t.family.text_encoders(pipe)
    lent = [pipe.vae, *(e for name, e in encoders.items() if name not in t.trained_encoders)]
    trained = [t.denoiser, *t.trained_encoders.values()]
    scheduler = pipe.scheduler
    for module in lent:
        module.to(device)
    for module in (*lent, *trained):
        module.eval()
    if t.grouped is not None:
        t.grouped.router.only = subject
    dtype = t.speed.autocast_dtype
    try:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            yield pipe
    finally:
        if t.grouped is not None:
            t.grouped.router.only = None
        pipe.scheduler = scheduler
        for module in lent:
            module.to("cpu")  # the training set-up keeps them off the device
        for module in trained:
            module.train()


class Selector:
    """The probes of a run (per subject), the best step so far and its weights, and early stopping."""

    def __init__(
        self,
        select: SelectConfig,
        subjects: list[TrainSubject],
        instance_images: list[list[str]],
        resolution: int,
        device: torch.device,
        allow_pickle: bool,
    ):
        from dreambooth_lib.evaluate.evaluation import Evaluators

        check_scorable(select)
        self.select, self.resolution = select, resolution
        evaluators = Evaluators.load(
            select.dino_model, select.clip_model, select.lpips_weights, str(device), allow_pickle
        )
        self.scorers = [evaluators.scorer(uris) for uris in instance_images]
        self.prompts: list[list[str]] = []
        self.clip_t_texts: list[list[str]] = []
        for s in subjects:
            templates = probe_templates(select, s.live)
            self.prompts.append([render_prompt(t, s.identifier, s.class_noun) for t in templates])
            self.clip_t_texts.append([clip_t_text(t, s.class_noun) for t in templates])
        self.class_prompts = [s.class_prompt for s in subjects]
        self.probes: list[list[dict[str, Any]]] = [[] for _ in subjects]
        self.chosen: list[int | None] = [None for _ in subjects]
        self.stopped: dict[int, int] = {}  # subject -> the step it stopped at (early stop)
        self.best_weights: list[dict[str, torch.Tensor] | None] = [None for _ in subjects]
        self._unsaved: set[int] = set()  # subjects whose best weights are newer than the durable copy
        self.probe_seconds = 0.0

    def due(self, step: int, last_step: int) -> bool:
        return step % self.select.every == 0 or step == last_step

    @torch.no_grad()
    def probe(self, pipe: Any, t: Trainer, step: int) -> list[int]:
        """Probe every active subject at `step`; returns the subjects to stop (no new best for `patience`)."""
        started = time.perf_counter()
        stop = []
        for k in list(t.active):
            metrics = self._score(pipe, t, k)
            self.probes[k].append({"step": step, **metrics})
            chosen = choose(self.probes[k], self.select)
            if chosen == step:
                self.best_weights[k] = self._trainable_of(t, k)
                self._unsaved.add(k)
            self.chosen[k] = chosen
            log.info(
                "probe step %d%s: %s (best step %s)",
                step,
                f" subject {k}" if t.num_subjects > 1 else "",
                " ".join(f"{m} {metrics[m]:.4f}" for m in PROBE_METRICS if metrics[m] is not None),
                chosen,
            )
            patience = self.select.patience
            if patience is not None and step > 0 and probes_since_best(self.probes[k], chosen) >= patience:
                self.stopped[k] = step
                stop.append(k)
                log.info(
                    "early stop at step %d: %d probes without a better one (best: %s)", step, patience, chosen
                )
        self.probe_seconds += time.perf_counter() - started
        return stop

    def _score(self, pipe: Any, t: Trainer, k: int) -> dict[str, float | None]:
        from dreambooth_lib.evaluate.samples import sample_prompts

        s = self.select
        with sampling_view(pipe, t, k) as view:
            groups = sample_prompts(view, self.prompts[k], s.images_per_prompt, s, self.resolution)
            class_images = sample_prompts(view, [self.class_prompts[k]], s.class_images, s, self.resolution)[
                0
            ]
        scorer = self.scorers[k]
        _, overall = scorer.score_prompts(groups, self.clip_t_texts[k])
        overall["pres"] = scorer.pres(class_images)
        return {name: overall.get(name) for name in PROBE_METRICS}

    @staticmethod
    def _trainable_of(t: Trainer, k: int) -> dict[str, torch.Tensor]:
        """Subject k's trainable weights now, on the host (a pack's parameters hold K adapters: slice k)."""
        return {
            name: (p[k] if t.grouped is not None else p).detach().to("cpu", copy=True)
            for name, p in t.named_trainable.items()
        }

    # --- what survives a retry: the probes in the checkpoint, the best weights beside it ---

    def save_best(self, ckpt_root: str) -> bool:
        """Write each subject's best weights that changed since the last checkpoint (one object each, before the
        checkpoint that names their step: a checkpoint never points at a missing file). False when storage still
        fails after its retries: the caller skips this checkpoint, and the next one writes them again."""
        from safetensors.torch import save

        for k in sorted(self._unsaved):
            uri = _best_uri(ckpt_root, k, self.chosen[k])
            try:
                storage.write_bytes(uri, save({n: w.contiguous() for n, w in self.best_weights[k].items()}))
            except StorageError as err:
                log.warning("best weights of subject %d not saved, so no checkpoint this time (%s)", k, err)
                return False
            self._unsaved.discard(k)
        return True

    def state(self) -> dict[str, Any]:
        return {
            "probes": self.probes,
            "chosen": self.chosen,
            "stopped": {str(k): v for k, v in self.stopped.items()},
            "probe_seconds": self.probe_seconds,
        }

    def load_state(self, state: dict[str, Any], ckpt_root: str) -> list[int]:
        """Restore the probes and read back the best weights; returns the subjects that had stopped early."""
        from safetensors.torch import load

        self.probes = [[dict(p) for p in subject] for subject in state["probes"]]
        self.chosen = list(state["chosen"])
        self.stopped = {int(k): int(v) for k, v in state["stopped"].items()}
        self.probe_seconds = float(state["probe_seconds"])
        for k, step in enumerate(self.chosen):
            if step is not None:
                self.best_weights[k] = load(storage.read_bytes(_best_uri(ckpt_root, k, step)))
        return sorted(self.stopped)

    # --- export ---

    @torch.no_grad()
    def apply_best(self, t: Trainer, k: int) -> None:
        """Put subject k's chosen weights into the trainable parameters (export then writes them)."""
        best = self.best_weights[k]
        if best is None:
            return
        for name, p in t.named_trainable.items():
            (p[k] if t.grouped is not None else p).copy_(best[name])

    def summary(self, k: int) -> dict[str, Any]:
        """What train_summary.json records: the rule, every probe's scores, the chosen and early-stop steps."""
        probes, chosen = self.probes[k], self.chosen[k]
        base = probes[0] if probes else {}
        chosen_probe = next((p for p in probes if p["step"] == chosen), None)
        return {
            "rule": self.select.model_dump(mode="json"),
            "probes": probes,
            "chosen_step": chosen,
            "chosen_metrics": chosen_probe,
            "within_bounds": within_bounds(chosen_probe, base, self.select) if chosen_probe else None,
            "stopped_early_at": self.stopped.get(k),
            "probe_seconds": round(self.probe_seconds, 3),
            "prompts": self.prompts[k],
            "class_prompt": self.class_prompts[k],
        }


def _best_uri(ckpt_root: str, subject: int, step: int) -> str:
    return storage.join(ckpt_root, "best", f"subject-{subject}-step-{step:08d}.safetensors")


def selection_metrics(selection: dict[str, Any] | None) -> dict[str, float]:
    """A train_summary's selection as flat KFP metrics: the chosen step, its scores, and every probe's scores
    (`probe_<step>_<metric>`); empty when train.select was off."""
    if not selection:
        return {}
    flat: dict[str, float] = {}
    for key in ("chosen_step", "stopped_early_at", "probe_seconds"):
        if selection.get(key) is not None:
            flat[key] = float(selection[key])
    for prefix, probe in [("chosen", selection.get("chosen_metrics"))] + [
        (f"probe_{p['step']}", p) for p in selection.get("probes", [])
    ]:
        for metric in PROBE_METRICS:
            if probe and probe.get(metric) is not None:
                flat[f"{prefix}_{metric}"] = float(probe[metric])
    return flat
