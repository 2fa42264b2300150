"""Packed LoRA training: K subjects in one batch give each subject its single run's adapter; a NaN stops only its own."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib import models, train
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import ConfigError, TrainingError
from dreambooth_lib.testing.synthetic import make_subject_images
from dreambooth_lib.train import checkpoint, grouped_lora, step, trainer
from dreambooth_lib.train import multi_subject as packed
from dreambooth_lib.train import resume as resuming
from dreambooth_lib.train.data import LatentCache
from dreambooth_lib.train.subjects import subject_images

RES = 32  # 16x16 latents
NAMES = ("a", "b", "c")
COLORS = ((220, 30, 30), (30, 200, 30), (240, 240, 20))
CONFIG = TrainConfig(
    mode="lora",
    steps=6,
    resolution=RES,
    learning_rate=1e-2,
    lora_rank=2,
    lora_alpha=4,
    checkpoint_every=0,
    log_every=2,
    max_grad_norm=0.05,  # small enough that clipping acts: per-adapter clipping is part of what is compared
    device="cpu",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packed-data")
    for i, (name, color) in enumerate(zip(NAMES, COLORS, strict=True)):
        make_subject_images(root / name, n=2 + i, size=RES, color=color, seed=10 + i)
    make_subject_images(root / "prior", n=4, size=RES, color=(30, 30, 220), seed=1)
    return root


def subjects(data: Path, out: Path) -> list[train.TrainSubject]:
    return [
        train.TrainSubject(
            name=name,
            instance_dir=str(data / name),
            prior_dir=str(data / "prior"),
            identifier=ident,
            class_noun="square",
            out=str(out / name),
        )
        for name, ident in zip(NAMES, ("sks", "zwx", "qlo"), strict=True)
    ]


@pytest.fixture(scope="module")
def single_runs(tiny_model, data, tmp_path_factory) -> dict[str, tuple[Path, train.TrainResult]]:
    """Each subject trained alone by train.run: the reference a packed subject must equal."""
    out = tmp_path_factory.mktemp("single")
    runs = {}
    for s in subjects(data, out):
        runs[s.name] = (
            Path(s.out),
            train.run(tiny_model, s.instance_dir, s.prior_dir, s.identifier, s.class_noun, CONFIG, s.out),
        )
    return runs


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / models.LORA_WEIGHTS_NAME)


def test_packed_subjects_equal_their_single_runs(tiny_model, data, single_runs, tmp_path, assert_same_lora):
    results = packed.run_packed(tiny_model, subjects(data, tmp_path), CONFIG)

    assert [r.name for r in results] == list(NAMES) and all(r.ok for r in results)
    for r in results:
        single_out, single = single_runs[r.name]
        assert_same_lora(tmp_path / r.name / "model", single_out / "model")
        # the same artifact as a single LoRA run: marker, summary fields, per-subject losses
        assert json.loads((tmp_path / r.name / "model" / models.LORA_MARKER_NAME).read_text()) == json.loads(
            (single_out / "model" / models.LORA_MARKER_NAME).read_text()
        )
        summary = train.TrainResult.model_validate_json(
            (tmp_path / r.name / "train_summary.json").read_text()
        )
        assert summary.model_uri == str(tmp_path / r.name / "model") and summary.mode == "lora"
        assert (summary.identifier, summary.num_instance_images, summary.num_prior_images) == (
            single.identifier,
            single.num_instance_images,
            single.num_prior_images,
        )
        assert [s for s, _ in summary.losses] == [s for s, _ in single.losses] == [2, 4, 6]
        assert [v for _, v in summary.losses] == pytest.approx([v for _, v in single.losses], rel=1e-4)

    # the tolerance is float rounding (Adam divides by sqrt(v)), far below how much subjects differ
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-2

    pipe = models.load_pipeline(results[1].model_uri)  # loads like any LoRA model, with its own adapter
    config_loaded = next(iter(pipe.unet.peft_config.values()))
    assert (config_loaded.r, config_loaded.lora_alpha) == (2, 4)


class PoisonedAt(LatentCache):
    """A subject's cached latents that turn NaN from the `at`-th draw on (as a corrupt image would)."""

    def __init__(self, cache: LatentCache, at: int):
        super().__init__(cache.mean, cache.std, cache.scaling_factor, cache.shift_factor)
        self.at, self.calls = at, 0

    def sample(self, indices, generator):
        self.calls += 1
        latents = super().sample(indices, generator)  # drawn anyway: the generator advances as before
        return latents * float("nan") if self.calls >= self.at else latents


def test_a_nan_stops_only_its_subject(tiny_model, data, single_runs, tmp_path, monkeypatch, assert_same_lora):
    def encode(vae, uris, *args, **kwargs):
        cache = packed_encode(vae, uris, *args, **kwargs)
        return PoisonedAt(cache, at=3) if Path(uris[0]).parent.name == "b" else cache

    packed_encode = trainer.encode_images
    monkeypatch.setattr(trainer, "encode_images", encode)
    results = packed.train_packed_subjects(tiny_model, subjects(data, tmp_path), CONFIG, pack_size=3)

    a, b, c = results
    assert (a.ok, b.ok, c.ok) == (True, False, True)
    assert b.failed_step == 3 and "non-finite (NaN/inf) at step 3" in b.error
    assert not (tmp_path / "b").exists()  # nothing written for the failed subject
    for r in (a, c):
        assert_same_lora(tmp_path / r.name / "model", single_runs[r.name][0] / "model")
        assert [s for s, _ in r.train.losses] == [2, 4, 6]


def test_grouped_lora_routes_each_row_through_its_adapter():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    k, r = 3, 2
    a, b = torch.randn(k, r, 6), torch.randn(k, 5, r)
    router = grouped_lora.AdapterRouter()
    layer = grouped_lora.GroupedLoRALinear(base, a.clone(), b.clone(), 0.5, router)
    x = torch.randn(4, 7, 6)
    router.index = torch.tensor([2, 0, 2, 1])
    y = layer(x)
    for row, idx in enumerate(router.index.tolist()):  # one adapter at a time, as peft computes it
        want = base(x[row]) + (x[row] @ a[idx].T @ b[idx].T) * 0.5
        torch.testing.assert_close(y[row], want)
    y[0].sum().backward()  # row 0 uses adapter 2: no other adapter gets a gradient
    assert layer.lora_A.grad[2].abs().sum() > 0
    assert layer.lora_A.grad[:2].abs().sum() == 0 and layer.lora_B.grad[:2].abs().sum() == 0
    router.index = torch.tensor([0])
    with pytest.raises(RuntimeError, match="4 rows but the router holds 1"):
        layer(x)


def test_per_adapter_clipping_is_each_adapters_own_global_norm_clip():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4, 2)), torch.nn.Parameter(torch.zeros(3, 5))]
    grads = [torch.randn(3, 4, 2), torch.randn(3, 5)]
    grads[0][1] *= 1e-3  # adapter 1 is under the limit and must be left alone
    grads[1][1] *= 1e-3
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    grouped_lora.clip_grad_norm_per_adapter(params, 0.5)
    for k in range(3):
        single = [torch.nn.Parameter(torch.zeros_like(g[k])) for g in grads]
        for p, g in zip(single, grads, strict=True):
            p.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(single, 0.5)
        for p, s in zip(params, single, strict=True):
            torch.testing.assert_close(p.grad[k], s.grad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"mode": "full"}, "set train.mode: lora"),
        ({"train_text_encoder": True}, "train_text_encoder: false"),
        ({"mixed_precision": "fp16"}, "use train.mixed_precision: bf16"),
        ({"use_8bit_adam": True}, "use_8bit_adam: false"),
    ],
)
def test_settings_that_would_couple_subjects_are_refused(tiny_model, data, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        packed.run_packed(tiny_model, subjects(data, tmp_path), CONFIG.model_copy(update=override))


def test_every_setting_that_would_couple_subjects_is_named_at_once(tiny_model, data, tmp_path):
    everything = {
        "mode": "full",
        "train_text_encoder": True,
        "mixed_precision": "fp16",
        "use_8bit_adam": True,
    }
    with pytest.raises(ConfigError) as refused:
        packed.run_packed(tiny_model, subjects(data, tmp_path), CONFIG.model_copy(update=everything))
    for named in (
        "train.mode: lora",
        "train_text_encoder: false",
        "mixed_precision: bf16",
        "use_8bit_adam: false",
    ):
        assert named in str(refused.value)


def test_subject_without_images_is_named(tiny_model, data, tmp_path):
    bad = subjects(data, tmp_path)
    bad[1] = bad[1].model_copy(update={"instance_dir": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="subject b: .*no .png subject images"):
        packed.run_packed(tiny_model, bad, CONFIG)


def test_batch_entry_point_packs_and_isolates(tiny_model, data, tmp_path, monkeypatch):
    assert packed.default_pack_size("cpu") == 1
    packs = []

    def fake_run_packed(base_model, pack, config, allow_pickle=False, checkpoint_root=None, resume=False):
        packs.append([s.name for s in pack])
        if "c" in packs[-1]:
            raise MemoryError("CUDA out of memory")
        return [train.SubjectOutcome(name=s.name, ok=True) for s in pack]

    monkeypatch.setattr(packed, "run_packed", fake_run_packed)
    results = packed.train_packed_subjects(tiny_model, subjects(data, tmp_path), CONFIG, pack_size=2)
    assert packs == [["a", "b"], ["c"]]
    assert [(r.name, r.ok) for r in results] == [("a", True), ("b", True), ("c", False)]
    assert results[2].error == "MemoryError: CUDA out of memory"


def test_packed_step_reads_nothing_back_to_the_host(tiny_model, data, monkeypatch):
    """No .item()/.tolist()/bool() per step: on a GPU each would wait for the step to finish. (torch's foreach
    AdamW reads its `step` counter, which it keeps on the host for that reason; on CUDA fused AdamW keeps it on
    the device. Those reads are not syncs and are left out.)"""
    import traceback

    pipe = models.load_pipeline(tiny_model)
    subs = subjects(data, Path("unused"))
    inputs = [subject_images(s, CONFIG) for s in subs]
    t = trainer.setup_trainer(pipe, subs, inputs, CONFIG, "cpu")
    step.train_step(t)  # the first step builds the layout tensors (once per set of active subjects)
    reads = []

    def record(name):
        caller = traceback.extract_stack(limit=3)[0].filename
        if f"torch{os.sep}optim{os.sep}" not in caller:
            reads.append((name, caller))

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _n=name, _o=original, **k: record(_n) or _o(self, *a, **k),
        )
    losses = step.train_step(t)
    monkeypatch.undo()
    assert reads == [] and losses.shape == (3,)


# --- checkpoints and resume ---------------------------------------------------------------------------------------

CKPT_CONFIG = CONFIG.model_copy(update={"checkpoint_every": 2, "keep_checkpoints": 1})


@pytest.fixture(scope="module")
def interrupted(tiny_model, data, tmp_path_factory, preempted_at) -> Path:
    """A pack of a, b (checkpoints every 2 steps) killed during step 5: its checkpoint folder holds step 4."""
    out = tmp_path_factory.mktemp("interrupted")
    preempted_at(
        5, packed.train_packed_subjects, tiny_model, subjects(data, out)[:2], CKPT_CONFIG, pack_size=2
    )
    return out


def test_preempted_pack_resumes_bit_identically(tiny_model, data, interrupted, tmp_path):
    reference = packed.run_packed(tiny_model, subjects(data, tmp_path)[:2], CKPT_CONFIG)  # no checkpoints

    out = tmp_path / "resumed"
    shutil.copytree(interrupted, out)
    pack = subjects(data, out)[:2]
    (ckpt_dir,) = (out / "checkpoints").iterdir()  # beside the subjects' outs, keyed by the pack's content
    assert ckpt_dir.name.startswith("train-")
    assert [step for step, _ in checkpoint.complete_checkpoints(ckpt_dir)] == [4]  # step 2 pruned after 4
    assert not (out / "a").exists()  # nothing exported by the killed run
    # an interrupted write of a later checkpoint (no manifest) is ignored, not resumed from
    torn = Path(ckpt_dir) / checkpoint.checkpoint_dir_name(6)
    torn.mkdir()
    (torn / "weights.safetensors").write_bytes(b"torn")

    results = packed.train_packed_subjects(tiny_model, pack, CKPT_CONFIG, pack_size=2)

    assert all(r.ok for r in results), [r.error for r in results]
    for r, want in zip(results, reference, strict=True):
        assert r.train.resumed_from == 4 and want.train.resumed_from is None
        assert r.train.losses == want.train.losses and [s for s, _ in r.train.losses] == [2, 4, 6]
        got, ref = adapter(out / r.name), adapter(tmp_path / r.name)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not Path(ckpt_dir).exists()  # every output written: the pack's checkpoints are gone


def test_another_pack_or_config_never_resumes_from_this_packs_checkpoint(
    tiny_model, data, interrupted, tmp_path
):
    out = tmp_path / "other"
    shutil.copytree(interrupted, out)
    pack = subjects(data, out)[:2]
    (ckpt_dir,) = (out / "checkpoints").iterdir()
    with pytest.raises(TrainingError, match="pass resume=True"):  # never silently overwritten
        packed.run_packed(tiny_model, pack, CKPT_CONFIG)
    changed_lr = CKPT_CONFIG.model_copy(update={"learning_rate": 3e-3, "steps": 2})
    renamed = [pack[0], pack[1].model_copy(update={"identifier": "vyx"})]
    for other_pack, config in ((pack, changed_lr), (renamed, CKPT_CONFIG.model_copy(update={"steps": 2}))):
        results = packed.run_packed(tiny_model, other_pack, config, resume=True)
        assert all(r.ok and r.train.resumed_from is None for r in results)  # started afresh, elsewhere
        assert Path(results[0].train.checkpoint_dir) != ckpt_dir
    assert [step for step, _ in checkpoint.complete_checkpoints(str(ckpt_dir))] == [4]  # left as it was


def test_a_checkpoint_that_differs_names_the_subject_and_field(tiny_model, data, tmp_path):
    pack = subjects(data, tmp_path)[:2]
    images = [subject_images(s, CONFIG) for s in pack]
    saved = resuming.fingerprint(CONFIG, "digest", pack, images)
    renamed = [pack[0], pack[1].model_copy(update={"identifier": "vyx"})]
    now = resuming.fingerprint(CONFIG.model_copy(update={"learning_rate": 3e-3}), "digest", renamed, images)
    with pytest.raises(
        TrainingError, match=r"cannot resume.*config\.learning_rate: checkpoint 0\.01, now 0\.003"
    ):
        resuming.check_fingerprint("ckpt", saved, now)
    with pytest.raises(TrainingError, match=r"subject b \(1\) identifier: checkpoint 'zwx', now 'vyx'"):
        resuming.check_fingerprint("ckpt", saved, now)
