"""The paper's Eq. 2: the denoising loss on the subject plus lambda times the loss on the model's own class samples.

    E[ w_t ||x̂(α_t x + σ_t ε, c) - x||² + λ w_t' ||x̂(α_t' x_pr + σ_t' ε', c_pr) - x_pr||² ]

The first term binds the identifier prompt c ("a [V] dog") to the subject images x; the second, on images x_pr the
frozen base model generated for the class prompt c_pr ("a dog"), keeps the class prior from drifting (language
drift) and the outputs diverse. Each term has its own noise ε, ε' and timesteps t, t'. What the denoiser predicts
instead of x (the noise, the velocity) is its model family's (`ModelFamily.noised`); the weighting w_t is the usual
constant of the simplified objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean squared error of one term, in float32; each row weighted by its w_t when `weights` [rows] are given
    (flow-matching families weight timesteps; DDPM's simplified objective does not)."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    squared = (pred.float() - target.float()) ** 2
    return (weights.float().view(-1, *([1] * (squared.dim() - 1))) * squared).mean()


def dreambooth_loss(
    model_pred_inst: torch.Tensor,
    target_inst: torch.Tensor,
    model_pred_prior: torch.Tensor | None,
    target_prior: torch.Tensor | None,
    prior_loss_weight: float,
    weights_inst: torch.Tensor | None = None,
    weights_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 2: MSE(subject) + λ·MSE(prior), in float32 whatever the autocast dtype of the predictions.

    With λ = 0 (or no prior batch) the prior term is absent, not multiplied by zero: the caller does not even
    compute the prior predictions then.
    """
    loss = denoising_loss(model_pred_inst, target_inst, weights_inst)
    if prior_loss_weight > 0 and model_pred_prior is not None:
        if target_prior is None:
            raise ValueError("model_pred_prior was given without target_prior")
        loss = loss + prior_loss_weight * denoising_loss(model_pred_prior, target_prior, weights_prior)
    return loss
