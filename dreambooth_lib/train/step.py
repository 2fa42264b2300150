"""One training step of Eq. 2 for every subject in the batch: draw, noise, predict, loss, backward, update.

A step is split into its random draws (`draw_step_batch`: each subject's latents, noise and timesteps from its own
generator) and everything else (`step_on_batch`), so a CUDA graph can capture the second part and replay it
while the draws stay eager (cuda_graph.py). Nothing is read back to the host: the [K] losses stay on the device.
"""

from __future__ import annotations

import torch

from dreambooth_lib.models import PromptConditioning
from dreambooth_lib.train.data import TrainingData
from dreambooth_lib.train.loss import dreambooth_loss
from dreambooth_lib.train.trainer import Trainer


def draw_batch(
    data: TrainingData, gen: torch.Generator, bs: int, t: Trainer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, noise, timesteps) of one subject's rows: `bs` subject rows, then `bs` prior rows (when there is
    a prior term), all drawn from `gen` in a fixed order, so a subject's draws never depend on the others'. With
    the model-output prior, the prior rows are the subject rows again (their target comes from the frozen base)."""
    device = t.speed.device
    latents = [
        data.instance.sample(torch.randint(len(data.instance), (bs,), generator=gen, device=device), gen)
    ]
    sampled_prior = t.prior_loss_weight > 0 and t.prior_mode == "sampled"
    if sampled_prior:  # each term with its own images, noise and timesteps, in one batch
        latents.append(
            data.prior.sample(torch.randint(len(data.prior), (bs,), generator=gen, device=device), gen)
        )
    latents = torch.cat(latents)
    noise = torch.randn(latents.shape, generator=gen, device=device, dtype=latents.dtype)
    timesteps = t.family.draw_timesteps(t.noise_scheduler, latents.shape[0], gen, device)
    if t.prior_loss_weight > 0 and not sampled_prior:
        return latents.repeat(2, 1, 1, 1), noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    return latents, noise, timesteps


def draw_step_batch(t: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's random draws: every active subject's rows, in subject order."""
    draws = [draw_batch(t.data[k], t.generators[k], t.batch_size, t) for k in t.active]
    return tuple(torch.cat([d[i] for d in draws]) for i in range(3))


def _conditioning(t: Trainer) -> PromptConditioning:
    if not t.trained_encoders:
        return t.prompts
    embeds, added = t.family.trainable_conditioning(t.trained_encoders, t.prompts)
    return PromptConditioning(embeds=embeds, added=added, input_ids=t.prompts.input_ids)


def step_on_batch(
    t: Trainer,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    zero_grad: bool = True,
) -> torch.Tensor:
    """Forward, each subject's Eq. 2, backward, clipping and the optimizer step on one drawn batch; returns the [K]
    losses on the device (0 for subjects no longer in the batch).

    Capture-safe when `t.speed.cuda_graph` (cuda_graph.GraphedStep captures it with zero_grad=False: the gradients
    a captured backward writes are the graph's static buffers, overwritten by every replay)."""
    adapter_index, prompt_rows, active, prior_rows = t.layout()
    if t.grouped is not None:
        t.grouped.router.index = adapter_index
    model_input, target, weights = t.family.noised(t.noise_scheduler, latents, noise, timesteps)
    dtype = t.speed.autocast_dtype
    with torch.autocast(
        t.speed.device.type,
        dtype=dtype or torch.bfloat16,
        enabled=dtype is not None,
        # the cast-weight cache would hold tensors made during capture and freed after it
        cache_enabled=not t.speed.cuda_graph,
    ):
        embeds, added = _conditioning(t).rows(prompt_rows)
        pred = t.family.predict(t.denoiser_forward, t.noise_scheduler, model_input, timesteps, embeds, added)
        if t.prior_mode == "model_output" and t.prior_loss_weight > 0:
            target = _with_base_targets(t, target, model_input, timesteps, prompt_rows, prior_rows)

    subject_losses = _subject_losses(t, pred, target, weights)
    # the sum: d(total)/d(adapter k) is d(loss k)/d(adapter k), since no other subject's loss reaches adapter k
    total = subject_losses.sum()

    if t.scaler is not None:
        t.scaler.scale(total).backward()
        t.scaler.unscale_(t.optimizer)
    else:
        total.backward()
    t.clip_gradients()
    if t.scaler is not None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.step()
    if zero_grad:
        t.optimizer.zero_grad(set_to_none=True)
    losses = torch.zeros(t.num_subjects, device=t.speed.device)
    losses[active] = subject_losses.detach()
    return losses


def _with_base_targets(t: Trainer, target, model_input, timesteps, prompt_rows, prior_rows) -> torch.Tensor:
    """`target` with each prior row's replaced by the frozen base model's prediction on it: the same noisy subject
    latents and timestep, the class prompt through the frozen text encoders (model-output prior preservation:
    the class prompt must keep meaning what it meant to the base model)."""
    with torch.no_grad(), t.frozen_base() as base:
        embeds, added = t.prompts.rows(prompt_rows[prior_rows])
        base_pred = t.family.predict(
            base, t.noise_scheduler, model_input[prior_rows], timesteps[prior_rows], embeds, added
        )
    return target.index_put((prior_rows,), base_pred.to(target.dtype))


def _subject_losses(t: Trainer, pred, target, weights) -> torch.Tensor:
    """[active subjects] Eq. 2 losses: each subject's rows are its `batch_size` instance rows, then its prior rows."""
    bs, prior = t.batch_size, t.prior_loss_weight > 0
    rows = bs * (2 if prior else 1)

    def term(start: int, stop: int):  # (pred, target, weights) of rows start:stop; Nones for an absent term
        if start == stop:
            return None, None, None
        return pred[start:stop], target[start:stop], weights[start:stop] if weights is not None else None

    losses = []
    for first in range(0, len(t.active) * rows, rows):
        p_inst, y_inst, w_inst = term(first, first + bs)
        p_prior, y_prior, w_prior = term(first + bs, first + rows)
        losses.append(dreambooth_loss(p_inst, y_inst, p_prior, y_prior, t.prior_loss_weight, w_inst, w_prior))
    return torch.stack(losses)


def train_step(t: Trainer) -> torch.Tensor:
    """One optimizer step of Eq. 2 on fresh draws; returns the [K] losses, on the device."""
    return step_on_batch(t, *draw_step_batch(t))
