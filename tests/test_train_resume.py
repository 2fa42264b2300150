"""Checkpoints: a SIGKILLed run resumes to weights bit-identical to an uninterrupted one; bad resumes are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib import train
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.errors import TrainingError
from dreambooth_lib.train import checkpoint

RES = 32
WORKER = Path(__file__).with_name("_train_worker.py")
CONFIG = TrainConfig(
    steps=12,
    checkpoint_every=3,
    keep_checkpoints=2,
    keep_checkpoints_on_success=True,  # the tests look at them after the run
    log_every=1,
    resolution=RES,
    learning_rate=1e-3,
    train_text_encoder=True,
    device="cpu",
)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, train_data_dirs, tmp_path_factory) -> tuple[Path, train.TrainResult]:
    out = tmp_path_factory.mktemp("uninterrupted") / "train"
    return out, train.run(tiny_model, *train_data_dirs, "sks", "square", CONFIG, str(out))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {
        f"{part}/{k}": v
        for part, name in (
            ("unet", "diffusion_pytorch_model.safetensors"),
            ("text_encoder", "model.safetensors"),
        )
        for k, v in load_file(model_dir / part / name).items()
    }


# the step right after the first checkpoint (3), and the last one before the end (checkpoints at 3, 6, 9, 12)
@pytest.mark.parametrize("kill_at", [4, 11])
def test_sigkilled_run_resumes_bit_identically(tiny_model, train_data_dirs, uninterrupted, tmp_path, kill_at):
    ref_out, ref = uninterrupted
    assert sorted(p.name for p in Path(ref.checkpoint_dir).iterdir()) == ["step-0000009", "step-0000012"]
    assert Path(ref.checkpoint_dir).parent == ref_out / "checkpoints"  # the default root, keyed by content

    out = tmp_path / "train"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), tiny_model, *train_data_dirs, str(out), CONFIG.model_dump_json()],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(WORKER.parent)},
    )
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if line.startswith(f"step {kill_at}/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"worker ended on its own (killing at step {kill_at}): {seen[-3:]}"
    )
    assert not (out / "model").exists() and not (out / "train_summary.json").exists()

    resumed = train.run(tiny_model, *train_data_dirs, "sks", "square", CONFIG, str(out), resume=True)
    # the newest complete checkpoint when the kill landed (the worker may have run on a step or two meanwhile)
    assert resumed.resumed_from in (3, 6, 9, 12) and resumed.resumed_from >= (kill_at // 3 - 1) * 3
    a, b = weights(ref_out / "model"), weights(out / "model")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"killed at step {kill_at}, resumed from {resumed.resumed_from}: {different[:3]}"
    assert resumed.losses == ref.losses


def test_checkpoint_without_manifest_is_ignored(tiny_model, train_data_dirs, tmp_path):
    out = tmp_path / "train"
    config = CONFIG.model_copy(update={"steps": 6, "log_every": 3})
    ckpt_dir = Path(train.run(tiny_model, *train_data_dirs, "sks", "square", config, str(out)).checkpoint_dir)
    torn = ckpt_dir / "step-0000009"  # an interrupted write: files but no manifest
    torn.mkdir()
    (torn / "weights.safetensors").write_bytes(b"half a file")
    assert checkpoint.latest_checkpoint(str(ckpt_dir)).endswith("step-0000006")

    result = train.run(
        tiny_model,
        *train_data_dirs,
        "sks",
        "square",
        config.model_copy(update={"steps": 9}),
        str(out),
        resume=True,
    )
    assert result.resumed_from == 6 and [s for s, _ in result.losses] == [3, 6, 9]
    assert result.checkpoint_dir == str(ckpt_dir)
    assert (ckpt_dir / "step-0000009" / checkpoint.MANIFEST_NAME).exists()


def test_a_different_run_never_resumes_these_checkpoints_and_a_fresh_start_refuses_them(
    tiny_model, train_data_dirs, uninterrupted, tmp_path
):
    ref_out, ref = uninterrupted
    short = {"steps": 2, "checkpoint_every": 0}
    for changed, identifier in (
        (CONFIG.model_copy(update={"learning_rate": 2e-3, **short}), "sks"),
        (CONFIG.model_copy(update=short), "xyz"),
    ):
        other = train.run(tiny_model, *train_data_dirs, identifier, "square", changed, str(tmp_path / identifier),
                          resume=True, checkpoint_root=str(ref_out / "checkpoints"))  # fmt: skip
        assert other.resumed_from is None and other.checkpoint_dir != ref.checkpoint_dir
    assert sorted(p.name for p in Path(ref.checkpoint_dir).iterdir()) == ["step-0000009", "step-0000012"]
    with pytest.raises(TrainingError, match="resume=True"):
        train.run(tiny_model, *train_data_dirs, "sks", "square", CONFIG, str(ref_out))


def test_checkpoints_live_under_the_root_and_are_deleted_after_success(tiny_model, train_data_dirs, tmp_path):
    config = CONFIG.model_copy(
        update={"steps": 4, "checkpoint_every": 2, "keep_checkpoints_on_success": False}
    )
    out, root = tmp_path / "artifact", tmp_path / "durable"
    result = train.run(
        tiny_model, *train_data_dirs, "sks", "square", config, str(out), checkpoint_root=str(root)
    )
    assert sorted(p.name for p in out.iterdir()) == ["model", "train_summary.json"]  # no checkpoint bytes
    assert Path(result.checkpoint_dir).parent == root and not Path(result.checkpoint_dir).exists()


def test_resume_without_checkpoints_starts_fresh(tiny_model, train_data_dirs, tmp_path):
    config = CONFIG.model_copy(update={"steps": 2, "checkpoint_every": 0})
    result = train.run(
        tiny_model, *train_data_dirs, "sks", "square", config, str(tmp_path / "t"), resume=True
    )
    assert result.resumed_from is None and result.steps == 2
