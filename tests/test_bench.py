"""The speed benchmark (`bench_all`) and the speed properties it relies on: no host read-back per training step."""

from __future__ import annotations

import os
import traceback

import pytest
import torch

from benchmarks import train_speed as bench
from dreambooth_lib import models, train
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.testing.synthetic import make_subject_images


def test_bench_all_prints_one_table_of_every_figure(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.md"
    result = bench.bench_all(
        model=tiny_model,
        resolution=32,
        device="cpu",
        steps=1,
        ks=(1, 2),
        e2e=True,
        warmup=0,
        prior_images=2,
        prior_steps=2,
        e2e_counts={"prior_images": 2, "train_steps": 2, "eval_prompts": 1},
        out_markdown=str(out),
    )
    assert [r["row"].split(" (")[0] for r in result["rows"]] == [
        "diffusers-style full FT",
        "ours full FT",
        "ours LoRA r4",
        "packed LoRA, K=1 subjects",
        "packed LoRA, K=2 subjects",
        "prior sampling, naive",
        "prior sampling, ours",
        "one subject end to end",
    ]
    packed_rows = [r for r in result["rows"] if r["row"].startswith("packed LoRA")]
    assert [r["row"] for r in packed_rows] == ["packed LoRA, K=1 subjects", "packed LoRA, K=2 subjects"]
    for r in packed_rows:  # subjects·steps/s is K / (s/step)
        k = int(r["row"].split("K=")[1].split()[0])
        assert r["subject_steps_per_s"] == pytest.approx(k / r["s_per_step"])
    assert result["prior"]["naive"]["images_per_s"] > 0 and result["prior"]["ours"]["images_per_s"] > 0
    e2e = result["end_to_end"]
    assert e2e["train_steps"] == 2 and e2e["eval_images"] == 1 and e2e["wall_time_s"] > 0
    assert set(e2e["step_times_s"]) >= {"ingest", "prior", "train", "evaluate"}
    table = out.read_text()
    assert table == result["markdown"] and table in capsys.readouterr().out
    assert table.count("\n| ") == 1 + len(result["rows"])  # header + one line per row, one table


def test_train_step_reads_nothing_back_to_the_host(tiny_model, tmp_path, monkeypatch):
    """train.run reads the loss only at log steps; the step itself never waits for the device. (torch's foreach
    AdamW reads its host-side `step` counter, not a device value; on CUDA fused AdamW keeps it on the device.)"""
    instance = make_subject_images(tmp_path / "i", n=2, size=32)
    prior = make_subject_images(tmp_path / "p", n=2, size=32, seed=1)
    pipe = models.load_pipeline(tiny_model)
    config = TrainConfig(resolution=32, steps=2, device="cpu", checkpoint_every=0)
    t = train.setup_training(
        pipe, train.list_png(str(instance)), train.list_png(str(prior)), "a sks dog", "a dog", config, "cpu"
    )
    train.train_step(t)
    reads = []

    def record(name):
        caller = traceback.extract_stack(limit=3)[0].filename
        if f"torch{os.sep}optim{os.sep}" not in caller:
            reads.append((name, caller))

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: record(_n) or _o(self, *a, **k)
        )
    tracker = train.LossTracker(torch.device("cpu"))
    tracker.add(train.train_step(t), 1)  # what the loop does between log steps
    monkeypatch.undo()
    assert reads == []


def test_bench_prior_times_a_compiled_unet_too(tiny_model, monkeypatch):
    monkeypatch.setattr(
        models.device, "COMPILE_BACKEND", "aot_eager"
    )  # dynamo's tracing without inductor's codegen
    torch._dynamo.reset()
    try:
        p = bench.bench_prior(
            models.load_pipeline(tiny_model), "cpu", num_images=2, naive_images=1, steps=2, batch_size=2,
            resolution=32, compiled=True,
        )  # fmt: skip
    finally:
        torch._dynamo.reset()
    assert set(p) >= {"naive", "ours", "compiled"}
    assert p["compiled"]["images_per_s"] > 0 and p["compiled"]["compile_s"] == p["compiled"]["warm_up_s"] > 0
    assert p["compiled"]["batch_size"] == p["ours"]["batch_size"] == 2
