"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") in pure torch.

The `lpips` package cannot be installed beside this project's torch (it pulls torchvision), so the metric is
re-implemented here on the published weights. LPIPS v0.1 of two images x0, x1 in [-1, 1]:

    d(x0, x1) = sum_l  mean_{h,w}  w_l . ( f_l(x0)_{hw} / ||f_l(x0)_{hw}|| - f_l(x1)_{hw} / ||f_l(x1)_{hw}|| )^2

where f_l are five ReLU stages of an ImageNet backbone applied to (x - shift) / scale (the ScalingLayer), the
norm is over channels (eps 1e-10 added to the norm), and w_l >= 0 is the per-channel 1x1 linear head `lin_l`.

Weights file: ONE safetensors file holding
- the backbone with torchvision's layer indexing: `features.<i>.weight`, `features.<i>.bias` for the conv layers
  of `alexnet().features` (i in 0, 3, 6, 8, 10) or `vgg16().features` (i in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21,
  24, 26, 28), i.e. torchvision's ImageNet state dict without `classifier.*`;
- the linear heads as the lpips package stores them: `lin0.model.1.weight` ... `lin4.model.1.weight`, shape
  (1, C_l, 1, 1);
- metadata {"lpips_net": "alex" | "vgg"} (one key: safetensors orders several keys arbitrarily, and the file must
  be byte-for-byte reproducible; without it the net is read from the keys).
`convert_lpips_checkpoint` writes it from the published .pth files (torchvision's backbone checkpoint and the
lpips package's `weights/v0.1/<net>.pth`), run once; the pickles are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dreambooth_lib import storage
from dreambooth_lib.errors import ModelLoadError

# The ScalingLayer of the lpips package: inputs in [-1, 1] are re-centred to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


@dataclass(frozen=True)
class _Net:
    """A backbone as torchvision lays out `features`: conv index -> (in, out, kernel, stride, padding)."""

    convs: dict[int, tuple[int, int, int, int, int]]
    pools: tuple[int, ...]  # indices of MaxPool2d layers
    pool_kernel: int
    slice_ends: tuple[int, ...]  # LPIPS taps the output of features[:end] for each end
    channels: tuple[int, ...]


# torchvision's VGG-16 ("D") as its config writes it: a width is a 3x3 conv (stride 1, padding 1) and its ReLU,
# "M" a 2x2 max pool; LPIPS taps it after each block's last ReLU.
_VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg_convs(widths: tuple[int | str, ...]) -> dict[int, tuple[int, int, int, int, int]]:
    """{features index: (in, out, kernel, stride, padding)} of each conv, at torchvision's indices."""
    convs, index, cin = {}, 0, 3
    for width in widths:
        if width == "M":
            index += 1
            continue
        convs[index] = (cin, int(width), 3, 1, 1)
        cin, index = int(width), index + 2
    return convs


NETS = {
    "alex": _Net(
        convs={
            0: (3, 64, 11, 4, 2),
            3: (64, 192, 5, 1, 2),
            6: (192, 384, 3, 1, 1),
            8: (384, 256, 3, 1, 1),
            10: (256, 256, 3, 1, 1),
        },
        pools=(2, 5),
        pool_kernel=3,
        slice_ends=(2, 5, 8, 10, 12),
        channels=(64, 192, 384, 256, 256),
    ),
    "vgg": _Net(
        convs=_vgg_convs(_VGG16_WIDTHS),
        pools=(4, 9, 16, 23),
        pool_kernel=2,
        slice_ends=(4, 9, 16, 23, 30),
        channels=(64, 128, 256, 512, 512),
    ),
}


def _features(net: _Net) -> nn.Sequential:
    """torchvision's `features` stack up to the last tapped layer, same indices (so its state-dict keys map)."""
    layers: list[nn.Module] = []
    for i in range(net.slice_ends[-1]):
        if i in net.convs:
            cin, cout, k, s, p = net.convs[i]
            layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
        elif i in net.pools:
            layers.append(nn.MaxPool2d(net.pool_kernel, stride=2))
        else:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _LinHead(nn.Module):
    """lpips' NetLinLayer: Dropout then a 1x1 conv to one channel without bias (keys `model.1.weight`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """The LPIPS v0.1 distance of one backbone; `forward(x0, x1)` gives one distance per image pair."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net {net!r} is unknown; use one of {', '.join(NETS)}")
        self.net = net
        self._spec = NETS[net]
        self.features = _features(self._spec)
        for i, ch in enumerate(self._spec.channels):
            self.add_module(f"lin{i}", _LinHead(ch))
        # constants, not weights: kept out of the state dict like the lpips package's own checkpoints do
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def normalized_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations of images in [-1, 1], each unit-normalized over channels."""
        h = (x - self.shift) / self.scale
        out = []
        start = 0
        for end in self._spec.slice_ends:
            for layer in self.features[start:end]:
                h = layer(h)
            start = end
            out.append(h / (torch.sqrt(torch.sum(h**2, dim=1, keepdim=True)) + EPS))
        return out

    def distance_from_features(self, f0: list[torch.Tensor], f1: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for i, (a, b) in enumerate(zip(f0, f1, strict=True)):
            lin = getattr(self, f"lin{i}").model[1]
            total = total + lin((a - b) ** 2).mean(dim=(2, 3), keepdim=False)[:, 0]
        return total

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return self.distance_from_features(self.normalized_features(x0), self.normalized_features(x1))


def images_to_lpips_tensor(images: list[Any]) -> torch.Tensor:
    """PIL images as (N, 3, H, W) floats in [-1, 1], the range LPIPS expects."""
    import numpy as np

    arr = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images]) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def expected_keys(net: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the weights file of `net` and its shape."""
    spec = NETS[net]
    keys: dict[str, tuple[int, ...]] = {}
    for i, (cin, cout, k, _, _) in spec.convs.items():
        keys[f"features.{i}.weight"] = (cout, cin, k, k)
        keys[f"features.{i}.bias"] = (cout,)
    for i, ch in enumerate(spec.channels):
        keys[f"lin{i}.model.1.weight"] = (1, ch, 1, 1)
    return keys


def _infer_net(state: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> str:
    net = metadata.get("lpips_net")
    if net is None:  # vgg16 has a conv at index 28, alexnet stops at 10
        net = "vgg" if "features.28.weight" in state else "alex"
    if net not in NETS:
        raise ModelLoadError(
            f"{source}: LPIPS net {net!r} is unknown; the weights file must be 'alex' or 'vgg'"
        )
    return net


def _check_state(state: dict[str, torch.Tensor], net: str, source: str) -> None:
    want = expected_keys(net)
    missing = sorted(set(want) - set(state))
    wrong = sorted(k for k in want if k in state and tuple(state[k].shape) != want[k])
    if missing or wrong:
        detail = f"missing {missing[:4]}" if missing else f"wrong shapes for {wrong[:4]}"
        raise ModelLoadError(
            f"{source}: not an LPIPS-{net} weights file ({detail}); write it with "
            "dreambooth_lib.evaluate.lpips.convert_lpips_checkpoint from the published .pth files"
        )


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (8-byte little-endian header length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def lpips_from_state_dict(
    state: dict[str, torch.Tensor], net: str | None = None, source: str = "state"
) -> LPIPS:
    net = net or _infer_net(state, {}, source)
    _check_state(state, net, source)
    model = LPIPS(net)
    model.load_state_dict({k: v.float() for k, v in state.items() if k in expected_keys(net)}, strict=True)
    return model


def load_lpips(uri: str) -> tuple[LPIPS, str]:
    """The LPIPS model of a weights file (local path or gs://) and the sha256 of the file."""
    from safetensors.torch import load as load_safetensors

    if str(uri).endswith((".pth", ".pt", ".bin", ".ckpt")):
        raise ModelLoadError(
            f"{uri}: a pickle checkpoint; convert it once with dreambooth_lib.evaluate.lpips.convert_lpips_checkpoint "
            "and point eval.lpips_weights at the .safetensors file it writes"
        )
    data = storage.read_bytes(uri)
    try:
        state = load_safetensors(data)
        metadata = _safetensors_metadata(data)
    except Exception as err:  # safetensors raises its own error types for a corrupt or foreign file
        raise ModelLoadError(f"{uri}: not a safetensors file ({err}); eval.lpips_weights needs one") from None
    net = _infer_net(state, metadata, uri)
    return lpips_from_state_dict(state, net, uri), hashlib.sha256(data).hexdigest()


def save_lpips_weights(state: dict[str, torch.Tensor], net: str, out: str) -> str:
    """Write a complete LPIPS state (backbone + lin heads) as the documented safetensors file; returns `out`."""
    from safetensors.torch import save as save_safetensors

    _check_state(state, net, out)
    tensors = {k: state[k].detach().to(torch.float32).contiguous() for k in expected_keys(net)}
    storage.write_bytes(out, save_safetensors(tensors, metadata={"lpips_net": net}))
    return out


_SLICE_KEY = re.compile(r"^(?:net\.)?slice\d\.(\d+)\.(weight|bias)$")


def _load_state(obj: dict | str, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        return obj
    data = storage.read_bytes(obj)
    import io

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # no code runs on load
    if not isinstance(state, dict):
        raise ModelLoadError(
            f"{obj}: expected a state dict in the {what} checkpoint, got {type(state).__name__}"
        )
    return state.get("state_dict", state)


def convert_lpips_checkpoint(backbone_state: dict | str, lin_state: dict | str, out: str) -> str:
    """Merge the published LPIPS checkpoints into the one safetensors file `load_lpips` reads.

    backbone_state: torchvision's ImageNet state dict of alexnet or vgg16 (`features.*` keys; `classifier.*` is
    dropped), or an lpips module's own `net.sliceK.<i>.*` keys. lin_state: the lpips package's
    `weights/v0.1/alex.pth` or `vgg.pth` (`linN.model.1.weight`). Either may be a path (local or gs://) of a .pth
    file, read with `torch.load(weights_only=True)`. Returns `out`.
    """
    backbone = _load_state(backbone_state, "backbone")
    lins = _load_state(lin_state, "lin")
    merged: dict[str, torch.Tensor] = {}
    for key, value in backbone.items():
        m = _SLICE_KEY.match(key)
        if m:
            key = f"features.{m.group(1)}.{m.group(2)}"
        if key.startswith("features."):
            merged[key] = value
    for key, value in lins.items():
        key = key.removeprefix("module.")
        if re.match(r"^lin\d\.model\.1\.weight$", key):
            merged[key] = value
    net = _infer_net(merged, {}, out)
    return save_lpips_weights(merged, net, out)


def random_lpips_state(net: str = "alex", seed: int = 0) -> dict[str, Any]:
    """Random weights of the file's layout (He-scaled convs, non-negative heads as LPIPS trains them)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_keys(net).items():
        if key.startswith("lin"):
            state[key] = torch.rand(shape, generator=gen) * 0.1
        elif key.endswith(".bias"):
            state[key] = torch.randn(shape, generator=gen) * 0.01
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return state
