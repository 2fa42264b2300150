"""The speed benchmark (`python -m benchmarks`, scripts/gpu_bench.sh) and the speed property it relies on: no host
read-back per training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from benchmarks import train_speed as bench
from benchmarks.cli import app
from dreambooth_lib import models
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.testing.synthetic import make_subject_images
from dreambooth_lib.train.data import list_png
from dreambooth_lib.train.step import train_step
from dreambooth_lib.train.tracking import LossTracker

REPO = Path(__file__).resolve().parents[1]
EVERY_ROW = [
    "diffusers-style full FT",
    "ours full FT",
    "ours LoRA r4",
    "packed LoRA, K=1 subjects",
    "packed LoRA, K=2 subjects",
    "prior sampling, naive",
    "prior sampling, ours",
    "one subject end to end",
]
TINY_ALL = ["--resolution", "32", "--device", "cpu", "--steps", "1", "--warmup", "0", "--ks", "1,2",
            "--prior-images", "2", "--prior-steps", "2", "--e2e", "--e2e-steps", "2", "--e2e-priors", "2"]  # fmt: skip


def _row_names(markdown: str) -> list[str]:
    """The first cell of each body row of a Markdown table (the lines after its header), without details."""
    body = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [line[2:].split(" | ")[0].split(" (")[0] for line in body]


def test_bench_all_json_prints_only_json_with_one_table_of_every_figure(tiny_model, tmp_path):
    out = tmp_path / "bench.md"
    result = CliRunner().invoke(app, ["all", "--model", tiny_model, *TINY_ALL, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)  # stdout is one JSON object and nothing else; progress is on stderr
    assert [r["row"].split(" (")[0] for r in figures["rows"]] == EVERY_ROW
    assert figures["prior"]["naive"]["images_per_s"] > 0 and figures["prior"]["ours"]["images_per_s"] > 0
    e2e = figures["end_to_end"]  # what the run recorded, against what was asked
    assert e2e["train_steps"] == 2 and e2e["prior_images"] == 2 and e2e["wall_time_s"] > 0
    asked = bench.CPU_END_TO_END_COUNTS
    assert e2e["eval_images"] == asked["eval_prompts"] * asked["images_per_prompt"]
    assert set(e2e["step_times_s"]) >= {"ingest", "prior", "train", "evaluate"}
    table = out.read_text()
    assert table == figures["markdown"] and _row_names(table) == EVERY_ROW  # one table, one line per row
    assert "ours full FT" in result.stderr  # progress, row by row


def test_a_row_times_only_the_steps_after_warm_up_and_counts_every_subject():
    now = [0.0]
    durations = iter([30.0, 30.0, 0.5, 0.5, 0.5, 0.5])  # two slow warm-up steps, then four of 0.5 s

    def step():
        now[0] += next(durations)

    row = bench.time_row("packed", step, 4, 2, torch.device("cpu"), subjects=3, clock=lambda: now[0])
    assert row["s_per_step"] == 0.5
    assert row["subject_steps_per_s"] == 6.0  # three subjects trained by each 0.5 s step
    assert next(durations, None) is None  # every step ran, none twice


def test_every_benchmark_command_has_an_example_in_its_help():
    commands = typer.main.get_command(app).commands
    assert set(commands) == {"train", "all", "prior", "host-syncs", "flux", "probes"}
    for name in commands:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Example: python -m benchmarks " + name in result.output, name


def test_train_step_reads_nothing_back_to_the_host(tiny_model, tmp_path, host_reads):
    """train.run reads the loss only at log steps; the step itself never waits for the device. (torch's foreach
    AdamW reads its host-side `step` counter, not a device value; on CUDA fused AdamW keeps it on the device.)"""
    instance = make_subject_images(tmp_path / "i", n=2, size=32)
    prior = make_subject_images(tmp_path / "p", n=2, size=32, seed=1)
    pipe = models.load_pipeline(tiny_model)
    config = TrainConfig(resolution=32, steps=2, device="cpu", checkpoint_every=0)
    t = bench.ours_trainer(
        pipe, [(list_png(str(instance)), list_png(str(prior)))], config, torch.device("cpu")
    )
    train_step(t)
    with host_reads() as reads:
        tracker = LossTracker(1, torch.device("cpu"))
        tracker.add(train_step(t), 1)  # what the loop does between log steps
    assert reads == []


def test_bench_prior_times_a_compiled_unet_too(tiny_model, monkeypatch):
    monkeypatch.setattr(
        models.device, "COMPILE_BACKEND", "aot_eager"
    )  # dynamo's tracing without inductor's codegen
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    started = time.perf_counter()
    try:
        p = bench.bench_prior(
            models.load_pipeline(tiny_model), "cpu", num_images=2, naive_images=1, steps=2, batch_size=2,
            resolution=32, compiled=True,
        )  # fmt: skip
        compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    wall = time.perf_counter() - started
    assert set(p) >= {"naive", "ours", "compiled"} and p["compiled"]["images_per_s"] > 0
    assert compiled_graphs >= 1  # the compiled way ran a graph dynamo compiled, not the eager UNet
    assert 0 < p["compiled"]["compile_s"] < wall  # compiling is reported, within what the call took
    assert p["compiled"]["batch_size"] == p["ours"]["batch_size"] == 2


@pytest.mark.slow
def test_gpu_bench_script_smoke_mode_writes_every_table(tmp_path):
    """scripts/gpu_bench.sh with GPU_BENCH_SMOKE=1 (CPU, tiny model): every step runs and writes its file."""
    out = tmp_path / "bench-out"
    env = {**os.environ, "GPU_BENCH_SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_bench.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = (out / "bench.md").read_text()
    assert _row_names(table) == EVERY_ROW
    assert json.loads((out / "bench.json").read_text())["markdown"] == table
    assert _row_names((out / "prior_compiled.md").read_text()) == ["naive", "ours"]  # compiling is GPU-only
    flux_rows = [r["row"] for r in json.loads((out / "flux.json").read_text())["rows"]]
    assert flux_rows == [
        "ours tiny FLUX.1 LoRA r4 (fp32, 1+1 images)", "  + gradient checkpointing",
        "packed tiny FLUX.1 LoRA, K=2 subjects",
    ]  # fmt: skip
    probes = json.loads((out / "probes.json").read_text())
    assert probes["probes"] == 3 and probes["wall_with_s"] > 0  # steps 0, 2 and 4
    assert "| with train.select |" in (out / "probes.md").read_text()
    assert "host syncs in train_step: not checked on cpu" in (out / "bench.log").read_text()
    assert (
        "tests/test_fast_paths.py::" in (out / "gpu_tests.log").read_text()
    )  # the GPU tests are there to run
