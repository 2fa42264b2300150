"""The fidelity harness (benchmarks/fidelity.py): its stand-ins are exact where it relies on them, and its sampling
variant draws as a DataLoader(shuffle=True) does. The comparison with diffusers' script itself runs only when
FIDELITY_ANCHOR names a copy of examples/dreambooth/train_dreambooth.py (it is not in this repository)."""

from __future__ import annotations

import os
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks import fidelity
from dreambooth_lib.testing.synthetic import make_subject_images
from dreambooth_lib.train.data import LatentCache, TrainingData, load_image


def test_torchvision_stand_in_is_the_training_transform(tmp_path):
    """The anchor's transform chain, through the stand-in, gives our pixels for an image at the training size."""
    from PIL import Image

    folder = make_subject_images(tmp_path, n=1, size=64, seed=3)
    tr = fidelity._torchvision_stub().transforms
    chain = tr.Compose([tr.Resize(64, interpolation=tr.InterpolationMode.BILINEAR), tr.RandomCrop(64),
                        tr.ToTensor(), tr.Normalize([0.5], [0.5])])  # fmt: skip
    ours = load_image(str(folder / "00.png"), 64)
    assert torch.allclose(chain(Image.open(folder / "00.png").convert("RGB")), ours, atol=1e-6)
    with pytest.raises(ValueError, match="must already be 32x32"):
        tr.RandomCrop(32)(Image.open(folder / "00.png"))


def _cache(n: int) -> LatentCache:
    # image k's latent is the constant k, std 0: a drawn latent names its image
    mean = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return LatentCache(mean=mean, std=torch.zeros_like(mean), scaling_factor=1.0)


def _trainer_stand_in():
    family = types.SimpleNamespace(
        draw_timesteps=lambda sched, n, gen, dev: torch.randint(0, 1000, (n,), generator=gen)
    )
    return types.SimpleNamespace(speed=types.SimpleNamespace(device=torch.device("cpu")), prior_loss_weight=1.0,
                                 family=family, noise_scheduler=None)  # fmt: skip


def test_epochs_sampling_visits_like_a_shuffled_dataloader():
    """Every epoch of max(4, 8) = 8 steps: each class image once, each instance image twice, instance i % 4 beside
    class i % 8; permutations differ between epochs."""
    t = _trainer_stand_in()
    data = TrainingData(instance=_cache(4), prior=_cache(8))
    draw = fidelity.sampled_draw_batch("epochs")
    gen = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(3):
        pairs = []
        for _ in range(8):
            latents, _, _ = draw(data, gen, 1, t)
            pairs.append((int(latents[0, 0, 0, 0]), int(latents[1, 0, 0, 0])))
        assert Counter(c for _, c in pairs) == Counter(range(8))
        assert Counter(i for i, _ in pairs) == Counter({0: 2, 1: 2, 2: 2, 3: 2})
        assert all(i == c % 4 for i, c in pairs)
        epochs.append([c for _, c in pairs])
    assert len({tuple(e) for e in epochs}) > 1


def test_common_random_numbers_differ_only_in_the_images():
    """With -crn the two samplings pick images from a generator of their own: same noise, same timesteps."""
    t, data = _trainer_stand_in(), TrainingData(instance=_cache(4), prior=_cache(8))
    runs = {}
    for sampling in ("replacement-crn", "epochs-crn"):
        draw, gen = fidelity.sampled_draw_batch(sampling, index_seed=7), torch.Generator().manual_seed(0)
        runs[sampling] = [draw(data, gen, 1, t) for _ in range(16)]
    pairs = list(zip(runs["replacement-crn"], runs["epochs-crn"], strict=True))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in pairs)
    assert any(not torch.equal(a[0], b[0]) for a, b in pairs)


def test_drop_is_the_issues_figure():
    assert fidelity.drop([2.0] * 10 + [1.0] * 10) == pytest.approx(0.5)
    assert fidelity.drop([1.0, 3.0, 2.0, 2.0], window=2) == pytest.approx(0.0)


ANCHOR = os.environ.get("FIDELITY_ANCHOR")


@pytest.mark.slow
@pytest.mark.skipif(
    not ANCHOR or not Path(ANCHOR).is_file(), reason="FIDELITY_ANCHOR: no anchor script given"
)
def test_run_on_the_anchors_draws_matches_the_anchor(tmp_path):
    """train.run fed the anchor's own draws ends where the anchor ends: the same math, to float rounding."""
    s = fidelity.prepare(tmp_path / "data", num_instance=2, num_class=2, resolution=32)
    anchor = fidelity.load_anchor(ANCHOR)
    m = fidelity.matched_draws(anchor, s, seed=0, steps=4, lr=1e-4, root=tmp_path / "matched")
    assert m["max_rel_latent_diff"] < 1e-5
    assert m["max_rel_loss_diff"] < 1e-5
    assert m["weight_gap_over_update"] < 1e-3
