"""The single-subject training step as one CUDA graph (`train.cuda_graph: true`).

At 1 subject + 1 prior image a Stable Diffusion step launches a few thousand small kernels and the GPU waits on
the host between them (docs/performance.md: 0.175 s/step eager on an H200, ~3 % of its bf16 peak). A CUDA graph
records those launches once and replays them with one call. What is captured is `step.step_on_batch` whole: noising, the UNet
forward, Eq. 2, backward, gradient clipping and the fused AdamW update (capturable, its step counter on the
device). What is not captured is the step's random draws (`step.draw_step_batch`): they run eagerly from the
run's own generator and are copied into the graph's static inputs, so a graphed run consumes its generator
exactly as an eager one, and checkpoints, resume and the loss tracker work unchanged.

The recipe is PyTorch's "whole network capture" (docs: CUDA semantics → CUDA Graphs): warm-up steps on a side
stream (they are real training steps), gradients set to None before capture so that the captured backward owns
them, and no host syncs, allocations of new shapes or CPU-side control flow inside. `TrainConfig` refuses
what would break that (fp16's GradScaler, 8-bit Adam, gradient checkpointing).
"""

from __future__ import annotations

import logging

import torch

from dreambooth_lib.train.step import draw_step_batch, step_on_batch, train_step
from dreambooth_lib.train.trainer import Trainer

log = logging.getLogger(__name__)


class GraphedStep:
    """Callable like `lambda: step.train_step(t)`, returning the step's [1] loss on the device.

    The first `warmup` calls run eagerly on a side stream; the next one captures the step and replays it; every
    later call is: draw, copy into the static inputs, replay. The returned loss is a fresh tensor each call (the
    graph's own output buffer is overwritten by the next replay)."""

    def __init__(self, t: Trainer, warmup: int = 3):
        if t.speed.device.type != "cuda" or not t.speed.cuda_graph:
            raise ValueError("GraphedStep needs a Trainer set up with cuda_graph on a CUDA device")
        if warmup < 1:
            raise ValueError(
                "GraphedStep needs at least one eager warm-up step (it creates the optimizer state)"
            )
        self.t = t
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_loss: torch.Tensor | None = None
        self.side_stream = torch.cuda.Stream(device=t.speed.device)

    def __call__(self) -> torch.Tensor:
        draws = draw_step_batch(self.t)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._eager(draws)
        if self.graph is None:
            self._capture(draws)
        for static, value in zip(self.static_inputs, draws, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.static_loss.clone()

    def _eager(self, draws) -> torch.Tensor:
        # cuBLAS handles, autotuning and the allocator warm up off the capture stream, as the recipe asks
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            loss = step_on_batch(self.t, *draws)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return loss

    def _capture(self, draws) -> None:
        self.static_inputs = tuple(d.clone() for d in draws)
        self.t.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = step_on_batch(self.t, *self.static_inputs, zero_grad=False)
        self.graph = graph
        log.info("captured the training step as a CUDA graph after %d eager warm-up steps", self.warmup)


def make_step_fn(t: Trainer):
    """The step function the training loop calls: graphed when the Trainer was set up with cuda_graph on CUDA."""
    if t.speed.cuda_graph:
        return GraphedStep(t)
    return lambda: train_step(t)
