"""The speed paths: torch.compile'd training and sampling, and the whole-step CUDA graph.

On CPU, compiling uses the "aot_eager" backend: dynamo traces the very modules and call paths the product
compiles (graph breaks, guards and all), without the minutes of code generation inductor spends. The CUDA-graph
tests need a GPU (`make test-gpu`); on CPU only the configuration rules and the eager fallback are checked.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lib import models, prior
from dreambooth_lib.config import PriorConfig, TrainConfig, parse_config
from dreambooth_lib.errors import ConfigError
from dreambooth_lib.models import sampling
from dreambooth_lib.testing.synthetic import make_subject_images
from dreambooth_lib.testing.tiny_models import tiny_train_config
from dreambooth_lib.train import TrainSubject, cuda_graph, step, trainer
from dreambooth_lib.train.data import list_png
from dreambooth_lib.train.speed import speed_options
from dreambooth_lib.train.tracking import LossTracker

RES = 32


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(models.device, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list[str], list[str]]:
    root = tmp_path_factory.mktemp("fast-data")
    instance = make_subject_images(root / "instance", n=3, size=RES)
    prior_dir = make_subject_images(root / "prior", n=3, size=RES, color=(30, 30, 220), seed=1)
    return list_png(str(instance)), list_png(str(prior_dir))


def _config(**overrides) -> TrainConfig:
    return tiny_train_config(**{"steps": 3, "log_every": 1, **overrides})


def _setup(tiny_model, data, config: TrainConfig) -> trainer.Trainer:
    subject = TrainSubject(instance_dir="", prior_dir="", identifier="sks", class_noun="square", out="")
    return trainer.setup_trainer(models.load_pipeline(tiny_model), [subject], [data], config, config.device)


def _train(tiny_model, data, config: TrainConfig, steps: int = 3):
    t = _setup(tiny_model, data, config)
    losses = [float(step.train_step(t)) for _ in range(steps)]
    return losses, {name: p.detach().clone() for name, p in t.named_trainable.items()}, t


# --- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("mixed_precision", "fp16", "GradScaler"),
        ("use_8bit_adam", True, "bitsandbytes"),
        ("gradient_checkpointing", True, "RNG state"),
    ],
)
def test_cuda_graph_refuses_what_cannot_be_captured(field, value, named):
    with pytest.raises(ConfigError, match=rf"train: .*cuda_graph: true cannot be combined with .*{named}"):
        parse_config(TrainConfig, {"cuda_graph": True, field: value}, "train")
    parse_config(TrainConfig, {"cuda_graph": False, field: value}, "train")  # fine without the graph


def test_cuda_graph_on_cpu_falls_back_to_the_eager_step(tiny_model, data, caplog):
    with caplog.at_level(logging.WARNING, logger="dreambooth_lib.train"):
        speed = speed_options(_config(cuda_graph=True), "cpu")
    assert speed.cuda_graph is False
    assert "cuda_graph applies on CUDA devices only" in caplog.text
    eager_losses, eager_weights, _ = _train(tiny_model, data, _config())
    graph_losses, graph_weights, t = _train(tiny_model, data, _config(cuda_graph=True))
    assert graph_losses == eager_losses
    assert all(torch.equal(eager_weights[k], graph_weights[k]) for k in eager_weights)
    assert "capturable" not in t.optimizer.defaults or not t.optimizer.defaults["capturable"]


def test_the_step_is_its_draws_then_the_update(tiny_model, data):
    """train_step = draw_step_batch (what a CUDA graph leaves out) + step_on_batch (what it captures)."""
    _, whole_weights, whole = _train(tiny_model, data, _config(), steps=2)
    t = _setup(tiny_model, data, _config())
    for _ in range(2):
        step.step_on_batch(t, *step.draw_step_batch(t))
    assert all(torch.equal(whole_weights[k], p) for k, p in t.named_trainable.items())
    assert torch.equal(whole.generators[0].get_state(), t.generators[0].get_state())


# --- torch.compile ------------------------------------------------------------------------------------------------


def test_compiled_training_step_matches_eager(tiny_model, data, aot_eager):
    eager_losses, eager_weights, _ = _train(tiny_model, data, _config())
    compiled_losses, compiled_weights, t = _train(tiny_model, data, _config(compile=True))
    assert isinstance(t.denoiser_forward, torch._dynamo.eval_frame.OptimizedModule)
    assert t.denoiser_forward._orig_mod is t.denoiser  # the saved module is the plain one
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    for name, p in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], p, rtol=1e-4, atol=1e-6)


def test_compiled_prior_sampling_gives_the_same_images(tiny_model, tmp_path, aot_eager):
    config = PriorConfig(num_images=2, steps=2, batch_size=2, device="cpu")
    plain = prior.run(tiny_model, "dog", config, str(tmp_path / "plain"), resolution=RES)
    compiled = prior.run(
        tiny_model, "dog", config.model_copy(update={"compile": True}), str(tmp_path / "compiled"), RES
    )
    assert compiled.key == plain.key  # compiling does not change what the set is
    for a, b in zip(plain.images, compiled.images, strict=True):
        diff = np.abs(np.asarray(Image.open(a), int) - np.asarray(Image.open(b), int))
        assert diff.max() <= 1  # float rounding of a different kernel order, at most one grey level


def test_compile_for_sampling_wraps_only_the_unet(tiny_model, aot_eager):
    pipe = models.load_pipeline(tiny_model)
    unet, vae = pipe.unet, pipe.vae
    sampling.compile_for_sampling(pipe)
    assert pipe.unet._orig_mod is unet and pipe.vae is vae


# --- the CUDA graph (GPU only) ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_graphed_step_repeats_the_eager_run(tiny_model, data, mode):
    """Same draws, same kernels: a graphed run's losses and weights follow the eager run's (bf16 autocast)."""
    config = _config(mode=mode, device="cuda", mixed_precision="bf16", learning_rate=1e-4)
    eager_losses, eager_weights, _ = _train(tiny_model, data, config, steps=8)
    t = _setup(tiny_model, data, config.model_copy(update={"cuda_graph": True}))
    graphed = cuda_graph.make_step_fn(t)
    assert isinstance(graphed, cuda_graph.GraphedStep)
    losses = [float(graphed()) for _ in range(8)]
    assert graphed.graph is not None  # steps 4-8 were replays
    np.testing.assert_allclose(losses, eager_losses, rtol=2e-2)
    for name, p in t.named_trainable.items():
        torch.testing.assert_close(p.detach(), eager_weights[name], rtol=2e-2, atol=1e-4)


@pytest.mark.gpu
@cuda
def test_graphed_training_has_no_host_syncs_after_capture(tiny_model, data):
    t = _setup(tiny_model, data, _config(device="cuda", cuda_graph=True))
    graphed = cuda_graph.make_step_fn(t)
    tracker = LossTracker(1, torch.device("cuda"))
    for i in range(5):
        tracker.add(graphed(), i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tracker.add(graphed(), 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
