"""LPIPS in pure torch: the weights file round trip, the metric's invariants, and parity with a direct computation
of the published formula written here independently (functional torch for the backbone, numpy for the rest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreambooth_lib.errors import ModelLoadError
from dreambooth_lib.evaluate.lpips import convert_lpips_checkpoint, load_lpips, random_lpips_state
from dreambooth_lib.testing.evaluators import build_tiny_lpips

# The backbones as the lpips package slices torchvision's `features`: (op, index) per layer, one list per tap.
ALEX_TAPS = [
    [("conv", 0, 4, 2), ("relu",)],
    [("pool", 3), ("conv", 3, 1, 2), ("relu",)],
    [("pool", 3), ("conv", 6, 1, 1), ("relu",)],
    [("conv", 8, 1, 1), ("relu",)],
    [("conv", 10, 1, 1), ("relu",)],
]


def _vgg_convs(*indices: int) -> list[tuple]:
    """VGG's 3x3 convolutions (stride 1, padding 1) at these `features` indices, each followed by its ReLU."""
    return [op for i in indices for op in (("conv", i, 1, 1), ("relu",))]


VGG_TAPS = [
    _vgg_convs(0, 2),
    [("pool", 2), *_vgg_convs(5, 7)],
    [("pool", 2), *_vgg_convs(10, 12, 14)],
    [("pool", 2), *_vgg_convs(17, 19, 21)],
    [("pool", 2), *_vgg_convs(24, 26, 28)],
]


def direct_lpips(state: dict, taps: list, x0: np.ndarray, x1: np.ndarray) -> float:
    """LPIPS v0.1 of two (3, H, W) images in [-1, 1], straight from the paper's formula."""
    shift = np.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = np.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def taps_of(x):
        h = torch.from_numpy(((x[None] - shift) / scale).astype(np.float32))
        feats = []
        for ops in taps:
            for op in ops:
                if op[0] == "conv":
                    _, i, stride, pad = op
                    h = F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], stride, pad)
                elif op[0] == "relu":
                    h = F.relu(h)
                else:
                    h = F.max_pool2d(h, op[1], stride=2)
            feats.append(h[0].double().numpy())
        return feats

    total = 0.0
    for k, (a, b) in enumerate(zip(taps_of(x0), taps_of(x1), strict=True)):
        a = a / (np.sqrt((a**2).sum(axis=0, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b**2).sum(axis=0, keepdims=True)) + 1e-10)
        w = state[f"lin{k}.model.1.weight"].double().numpy().reshape(-1, 1, 1)
        total += float((w * (a - b) ** 2).sum(axis=0).mean())
    return total


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32))


@pytest.mark.parametrize("net,taps,size", [("alex", ALEX_TAPS, 64), ("vgg", VGG_TAPS, 32)])
def test_matches_direct_formula_on_same_weights(tmp_path, net, taps, size):
    path = build_tiny_lpips(tmp_path / f"{net}.safetensors", seed=3, net=net)
    model, digest = load_lpips(str(path))
    assert model.net == net and len(digest) == 64
    state = random_lpips_state(net, seed=3)  # the weights the file holds
    x = _images(3, size)
    with torch.no_grad():
        got = model(x[:2], x[1:]).double().numpy()
    want = [direct_lpips(state, taps, x[i].numpy(), x[i + 1].numpy()) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert all(w > 0.01 for w in want)  # a non-trivial comparison, not two zeros


def test_invariants(tmp_path):
    model, _ = load_lpips(str(build_tiny_lpips(tmp_path / "alex.safetensors", seed=0)))
    x = _images(2, 64, seed=1)
    with torch.no_grad():
        same = model(x, x)
        d01, d10 = model(x[:1], x[1:]), model(x[1:], x[:1])
        near = model(x[:1], (x[:1] + 0.02).clamp(-1, 1))
    assert torch.all(same == 0)  # d(x, x) = 0
    assert torch.allclose(d01, d10, atol=1e-7)  # symmetric
    assert float(d01) > 0 and float(d01) > float(near) > 0  # positive, larger for more different images


def test_tiny_weights_are_deterministic(tmp_path):
    a = build_tiny_lpips(tmp_path / "a.safetensors", seed=5).read_bytes()
    b = build_tiny_lpips(tmp_path / "b.safetensors", seed=5).read_bytes()
    c = build_tiny_lpips(tmp_path / "c.safetensors", seed=6).read_bytes()
    assert a == b and a != c


def test_convert_published_pth_files(tmp_path):
    """torchvision's backbone .pth (with classifier keys) + the lpips package's lin .pth -> one safetensors file."""
    state = random_lpips_state("alex", seed=2)
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(4, 9216)  # present in torchvision's file, not needed
    lins = {k: v for k, v in state.items() if k.startswith("lin")}
    torch.save(backbone, tmp_path / "alexnet-owt.pth")
    torch.save(lins, tmp_path / "alex.pth")
    out = convert_lpips_checkpoint(
        str(tmp_path / "alexnet-owt.pth"),
        str(tmp_path / "alex.pth"),
        str(tmp_path / "lpips_alex.safetensors"),
    )
    model, _ = load_lpips(out)
    x = _images(2, 64, seed=4)
    with torch.no_grad():
        got = float(model(x[:1], x[1:]))
    assert got == pytest.approx(direct_lpips(state, ALEX_TAPS, x[0].numpy(), x[1].numpy()), rel=1e-5)

    # an lpips module's own state dict names the backbone by slice: net.slice2.3.weight is features.3.weight
    sliced = {}
    slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    for k, v in backbone.items():
        if k.startswith("features."):
            i = int(k.split(".")[1])
            sliced[f"net.slice{slice_of[i]}.{i}.{k.rsplit('.', 1)[1]}"] = v
    out2 = convert_lpips_checkpoint(sliced, lins, str(tmp_path / "from_module.safetensors"))
    assert (tmp_path / "from_module.safetensors").read_bytes() == (
        tmp_path / "lpips_alex.safetensors"
    ).read_bytes()
    assert out2.endswith("from_module.safetensors")


def test_bad_weights_files_are_user_errors(tmp_path):
    from safetensors.torch import save_file

    state = random_lpips_state("alex", seed=0)
    state.pop("lin4.model.1.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError, match="lin4.model.1.weight.*convert_lpips_checkpoint"):
        load_lpips(str(tmp_path / "partial.safetensors"))
    (tmp_path / "alex.pth").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="pickle checkpoint.*convert_lpips_checkpoint"):
        load_lpips(str(tmp_path / "alex.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ModelLoadError, match="junk.safetensors: not a safetensors file"):
        load_lpips(str(tmp_path / "junk.safetensors"))
