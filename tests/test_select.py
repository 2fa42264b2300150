"""Choosing the best step (train.select): the rule on constructed series, probes on the tiny model, early stop
exporting the chosen step, and resume staying bit-identical with scoring on."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from dreambooth_lib import train
from dreambooth_lib.artifacts import LORA_WEIGHTS_NAME
from dreambooth_lib.config import SelectConfig, TrainConfig
from dreambooth_lib.errors import ConfigError
from dreambooth_lib.train import select

TRAIN_RES = 32


def _probe(step, dino, clip_t=0.30, pres=0.50, **more):
    return {"step": step, "dino": dino, "clip_i": 0.5, "clip_t": clip_t, "pres": pres, "div": None, **more}


# --- the rule ----------------------------------------------------------------------------------------------------


def test_rule_maximizes_dino_within_the_clip_t_and_pres_bounds():
    rule = SelectConfig(clip_t_tolerance=0.02, pres_tolerance=0.10)
    series = [
        _probe(0, 0.10),  # the base: never a candidate, the bounds' reference
        _probe(100, 0.40),
        _probe(200, 0.55, clip_t=0.285),  # CLIP-T 0.015 below the base: inside
        _probe(300, 0.70, clip_t=0.27),  # the highest DINO, but CLIP-T fell 0.03: language drift
        _probe(400, 0.65, pres=0.65),  # PRES rose 0.15: the class collapses onto the subject
    ]
    assert select.choose(series, rule) == 200
    assert select.choose(series, rule.model_copy(update={"clip_t_tolerance": None})) == 300
    no_bounds = rule.model_copy(update={"clip_t_tolerance": None, "pres_tolerance": None})
    assert select.choose(series, no_bounds) == 300


def test_rule_weighted_score_and_ties_and_no_probe_within_bounds():
    weighted = SelectConfig(metric="weighted", weights={"dino": 1.0, "pres": -1.0}, pres_tolerance=None)
    series = [
        _probe(0, 0.1),
        _probe(50, 0.5, pres=0.1),
        _probe(100, 0.7, pres=0.5),
        _probe(150, 0.6, pres=0.1),
    ]
    assert select.choose(series, weighted) == 150  # 0.5 beats 0.4 and 0.2
    tie = [_probe(0, 0.1), _probe(50, 0.6), _probe(100, 0.6)]
    assert select.choose(tie, SelectConfig()) == 50  # the earlier of equal scores: fewer steps, less drift
    drifted = [_probe(0, 0.1), _probe(50, 0.4, clip_t=0.1), _probe(100, 0.6, clip_t=0.1)]
    assert select.choose(drifted, SelectConfig()) == 100  # none inside: the best, and the summary says so
    assert select.choose([_probe(0, 0.1)], SelectConfig()) is None
    with pytest.raises(ValueError, match="weights"):
        SelectConfig(metric="weighted")


def test_rule_that_needs_an_unscored_metric_is_refused():
    with pytest.raises(ConfigError, match="LPIPS"):
        select.check_scorable(SelectConfig(metric="div", dino_model="d", clip_model="c"))
    with pytest.raises(ConfigError, match="class_images"):
        select.check_scorable(
            SelectConfig(
                metric="weighted", weights={"pres": -1}, class_images=0, dino_model="d", clip_model="c"
            )
        )


# --- on the tiny model -------------------------------------------------------------------------------------------


PROBE = {"every": 2, "prompts": 2, "images_per_prompt": 2, "class_images": 2, "steps": 2}  # 2 steps per image


def _config(tiny_evaluators, **select_options) -> TrainConfig:
    rule = SelectConfig(**PROBE, **select_options).with_evaluators(
        tiny_evaluators["dino"], tiny_evaluators["clip"], tiny_evaluators["lpips"]
    )
    return TrainConfig(
        mode="lora", steps=6, resolution=TRAIN_RES, learning_rate=1e-2, checkpoint_every=0, log_every=1,
        device="cpu", select=rule,
    )  # fmt: skip


def _train(model, data_dirs, config, out):
    instance, prior = data_dirs
    return train.run(model, instance, prior, "sks", "square", config, str(out))


def test_probes_run_at_the_interval_and_score_the_same_on_a_rerun(
    tiny_model, tiny_evaluators, train_data_dirs, tmp_path
):
    config = _config(tiny_evaluators)
    first = _train(tiny_model, train_data_dirs, config, tmp_path / "a").selection
    second = _train(tiny_model, train_data_dirs, config, tmp_path / "b").selection
    assert [p["step"] for p in first["probes"]] == [0, 2, 4, 6]
    assert first["probes"] == second["probes"]
    assert all(p[m] is not None for p in first["probes"] for m in select.PROBE_METRICS)
    assert first["chosen_step"] == select.choose(first["probes"], config.select)
    assert first["chosen_step"] in (2, 4, 6) and first["prompts"][0].startswith("a sks square")
    summary = (tmp_path / "a" / "train_summary.json").read_text()
    assert '"chosen_step"' in summary


def _scripted_dino(monkeypatch, by_step: dict[int, float]):
    """Probe scores made up by step (the rule then has a known answer); sampling still runs for real."""
    real_score = select.Selector._score

    def score(self, pipe, t, k):
        metrics = real_score(self, pipe, t, k)
        step = len(self.probes[k]) * self.select.every  # the probes so far say which step this is
        return {**metrics, "dino": by_step[step], "clip_t": 0.3, "pres": 0.5}

    monkeypatch.setattr(select.Selector, "_score", score)


def _exported_weights(out: Path) -> dict:
    """Every tensor the exported model holds (a LoRA file, or a full pipeline's safetensors), by file and name."""
    files = sorted((out / "model").rglob("*.safetensors"))
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", id="full-with-text-encoder")])
def test_early_stop_ends_training_and_exports_the_chosen_step(
    tiny_model, tiny_evaluators, train_data_dirs, tmp_path, monkeypatch, mode
):
    _scripted_dino(monkeypatch, {0: 0.1, 2: 0.6, 4: 0.5, 6: 0.4, 8: 0.3})
    update = {"steps": 12, "mode": mode, "train_text_encoder": mode == "full"}
    config = _config(tiny_evaluators, patience=2).model_copy(update=update)
    result = _train(tiny_model, train_data_dirs, config, tmp_path / "stopped")
    selection = result.selection
    assert [p["step"] for p in selection["probes"]] == [0, 2, 4, 6]  # two probes without a better one: stop
    assert selection["chosen_step"] == 2 and selection["stopped_early_at"] == 6
    assert result.losses[-1][0] == 6  # no step after the stop

    monkeypatch.undo()
    plain = config.model_copy(update={"steps": 2, "select": None})
    _train(tiny_model, train_data_dirs, plain, tmp_path / "two-steps")
    got, want = _exported_weights(tmp_path / "stopped"), _exported_weights(tmp_path / "two-steps")
    assert got.keys() == want.keys() and any("text_encoder" in k for k in want) == (mode == "full")
    assert all((got[k] == want[k]).all() for k in want)  # the weights of step 2, not of step 6


def test_resume_with_scoring_on_is_bit_identical(
    tiny_model, tiny_evaluators, train_data_dirs, tmp_path, preempted_at, monkeypatch
):
    # the best step (2) comes before the preemption: the resumed run must read its weights back
    _scripted_dino(monkeypatch, {0: 0.1, 2: 0.6, 4: 0.5, 6: 0.4, 8: 0.3})
    config = _config(tiny_evaluators).model_copy(update={"checkpoint_every": 2, "steps": 8})
    whole = _train(tiny_model, train_data_dirs, config, tmp_path / "whole")
    out = tmp_path / "resumed"
    preempted_at(6, _train, tiny_model, train_data_dirs, config, out)  # killed after the step-4 checkpoint
    resumed = train.run(tiny_model, *train_data_dirs, "sks", "square", config, str(out), resume=True)
    assert resumed.resumed_from == 4
    assert resumed.selection["probes"] == whole.selection["probes"]
    assert resumed.selection["chosen_step"] == whole.selection["chosen_step"] == 2
    got = load_file(Path(out) / "model" / LORA_WEIGHTS_NAME)
    want = load_file(tmp_path / "whole" / "model" / LORA_WEIGHTS_NAME)
    assert all((got[k] == want[k]).all() for k in want)


def test_probing_leaves_training_unchanged(
    tiny_model, tiny_evaluators, train_data_dirs, tmp_path, monkeypatch
):
    _scripted_dino(monkeypatch, {0: 0.1, 2: 0.2, 4: 0.3, 6: 0.4})  # improving: the last step is chosen
    config = _config(tiny_evaluators)
    probed = _train(tiny_model, train_data_dirs, config, tmp_path / "probed")
    plain = _train(
        tiny_model, train_data_dirs, config.model_copy(update={"select": None}), tmp_path / "plain"
    )
    assert probed.selection["chosen_step"] == 6 and plain.selection is None
    assert probed.losses == plain.losses  # sampling between steps draws nothing from the training RNGs
    got = load_file(tmp_path / "probed" / "model" / LORA_WEIGHTS_NAME)
    want = load_file(tmp_path / "plain" / "model" / LORA_WEIGHTS_NAME)
    assert all((got[k] == want[k]).all() for k in want)


def test_a_pack_probes_each_subject_through_its_own_adapter(
    tiny_model, tiny_evaluators, two_subjects, pack_of, assert_same_lora, tmp_path, monkeypatch
):
    """Each packed subject's probes sample its own adapter (as its single run's model), and each exports its own
    chosen step: the pack's scripted scores pick step 2 for both, so each model is its 2-step single run's."""
    from dreambooth_lib.train import multi_subject

    config = _config(tiny_evaluators, patience=2).model_copy(update={"steps": 8})
    subjects = pack_of(two_subjects, tmp_path / "packed", {"a": "sks", "b": "zwx"})
    outcomes = multi_subject.run_packed(tiny_model, subjects, config)
    single = train.run(tiny_model, subjects[0].instance_dir, subjects[0].prior_dir, "sks", "square", config,
                       str(tmp_path / "single-a"))  # fmt: skip
    packed_probes = outcomes[0].train.selection["probes"]
    assert [p["step"] for p in packed_probes] == [p["step"] for p in single.selection["probes"]]
    for got, want in zip(packed_probes, single.selection["probes"], strict=True):
        assert all(abs(got[m] - want[m]) < 1e-3 for m in select.PROBE_METRICS), (got, want)

    _scripted_dino(monkeypatch, {0: 0.1, 2: 0.6, 4: 0.5, 6: 0.4, 8: 0.3})
    out = tmp_path / "scripted"
    outcomes = multi_subject.run_packed(
        tiny_model, pack_of(two_subjects, out, {"a": "sks", "b": "zwx"}), config
    )
    assert [o.train.selection["chosen_step"] for o in outcomes] == [2, 2]
    assert [o.train.selection["stopped_early_at"] for o in outcomes] == [6, 6]
    monkeypatch.undo()
    two_steps = config.model_copy(update={"steps": 2, "select": None})
    for s, identifier in (("a", "sks"), ("b", "zwx")):
        want = tmp_path / "two-steps" / s
        train.run(tiny_model, str(two_subjects / s), str(two_subjects / "prior"), identifier, "square", two_steps,
                  str(want))  # fmt: skip
        assert_same_lora(out / s / "model", want / "model")


def test_dreambooth_run_exports_the_chosen_step_and_reports_the_curves(
    tiny_model, tiny_evaluators, subject_dir, tmp_path
):
    """`dreambooth run` with train.select: the probe takes eval's evaluators, the run result names the chosen
    step, the summary and the report carry every probe, and evaluate scores the exported (chosen) model."""
    from dreambooth_lib.config import RunConfig
    from dreambooth_lib.runs import personalize

    config = RunConfig.model_validate(
        {
            "base_model": tiny_model,
            "run_dir": str(tmp_path / "run"),
            "subject": {"name": "red-square", "class_noun": "square", "images": str(subject_dir)},
            "ingest": {"resolution": TRAIN_RES, "min_side": TRAIN_RES},
            "prior": {"num_images": 0},
            "train": {
                "mode": "lora", "steps": 4, "resolution": TRAIN_RES, "prior_loss_weight": 0.0,
                "checkpoint_every": 0, "select": {"every": 2, "prompts": 1, "images_per_prompt": 2,
                                                  "class_images": 2, "steps": 2},
            },
            "eval": {"max_prompts": 1, "images_per_prompt": 2, "pres_images": 2, "steps": 2,
                     "dino_model": tiny_evaluators["dino"], "clip_model": tiny_evaluators["clip"]},
            "samples_per_prompt": 0,
        }
    )  # fmt: skip
    assert config.train.select.dino_model == tiny_evaluators["dino"]
    result = personalize.run(config)
    summary = (tmp_path / "run" / "train" / "train_summary.json").read_text()
    chosen = result.chosen_step
    assert chosen in (2, 4) and f'"chosen_step": {chosen}' in summary
    assert f"step     {chosen} (chosen by train.select)" in result.summary()
    page = (tmp_path / "run" / "eval" / "report.html").read_text()
    assert 'id="probe-dino"' in page and 'id="chosen-step"' in page
    assert f"<th>exported step (train.select)</th><td>{chosen}</td>" in page


def test_a_best_weights_write_that_fails_skips_only_that_checkpoint(
    tiny_model, tiny_evaluators, train_data_dirs, tmp_path, monkeypatch
):
    """Storage still failing after its retries when the best weights are written: training goes on without that
    checkpoint (it would name a missing file), and the next checkpoint writes them."""
    from dreambooth_lib import storage
    from dreambooth_lib.errors import StorageError
    from dreambooth_lib.train import checkpoint

    _scripted_dino(monkeypatch, {0: 0.1, 2: 0.6, 4: 0.5, 6: 0.4})
    real_write, failed = storage.write_bytes, []

    def write_bytes(uri, data, **kwargs):
        if "/best/" in str(uri) and not failed:
            failed.append(uri)
            raise StorageError(f"{uri}: upload failed 12 times in 120 s, last with 503")
        return real_write(uri, data, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    config = _config(tiny_evaluators).model_copy(update={"checkpoint_every": 2, "keep_checkpoints": 3,
                                                         "keep_checkpoints_on_success": True})  # fmt: skip
    result = _train(tiny_model, train_data_dirs, config, tmp_path / "run")
    assert failed and result.selection["chosen_step"] == 2
    steps = [step for step, _ in checkpoint.complete_checkpoints(result.checkpoint_dir)]
    assert steps == [4, 6]  # step 2's checkpoint was skipped, not written half
    assert storage.exists(failed[0])  # written again with the step-4 checkpoint
