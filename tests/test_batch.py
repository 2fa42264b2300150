"""dreambooth_lib.runs.batch: manifest validation, identifier planning, per-subject isolation, the summary table."""

from __future__ import annotations

import json

import pytest

from dreambooth_lib import identifier
from dreambooth_lib.config import IdentifierConfig
from dreambooth_lib.errors import ConfigError, GateFailed, IngestError
from dreambooth_lib.runs import personalize
from dreambooth_lib.runs.batch.manifest import load_manifest
from dreambooth_lib.runs.batch.pack import train_pack
from dreambooth_lib.runs.batch.plan import PlannedSubject, distinct_classes, plan_batch
from dreambooth_lib.runs.batch.status import SubjectStatus, read_statuses, with_unfinished, write_status
from dreambooth_lib.runs.batch.subject import BatchSettings, run_subject, subject_run_dir, subject_run_values
from dreambooth_lib.runs.batch.summary import render_status, render_summary, summary_record

# A narrow id range keeps each search fast while leaving enough candidates for several subjects.
FAST_IDS = IdentifierConfig(min_token_id=47000, seed=0)


def _manifest(tmp_path, text: str, name: str = "m.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- the manifest ----------------------------------------------------------------------------------------------


def test_manifest_errors_name_the_entry_and_the_field(tmp_path):
    uri = _manifest(
        tmp_path,
        """subjects:
  - {name: rex, class_noun: dog, images: /data/rex, live: true}
  - {name: Not A Slug, class_noun: dog, images: /data/x}
  - {name: pack, images: /data/pack}
  - {name: cup, class_noun: cup, images: /data/cup, imgs: oops}
  - {name: rex, class_noun: dog, images: /data/rex2}
  - just a string
  - {name: can, class_noun: can, images: /data/can, identifier: zwx}
""",
    )
    manifest = load_manifest(uri)
    assert [e.name for e in manifest.entries] == ["rex", "can"] and manifest.indices == [0, 6]
    assert manifest.entries[0].live is True and manifest.entries[1].identifier == "zwx"
    assert manifest.names == ["rex", "Not A Slug", "pack", "cup", "rex", "subjects[5]", "can"]
    errors = {r.index: r.error for r in manifest.rejected}
    assert set(errors) == {1, 2, 3, 4, 5}
    assert "subjects[1]" in errors[1] and 'name: got "Not A Slug"' in errors[1]
    assert "subjects[2]" in errors[2] and "class_noun: missing (required)" in errors[2]
    assert "subjects[3]" in errors[3] and "imgs: got" in errors[3] and "unknown field" in errors[3]
    assert "subjects[4]" in errors[4] and "'rex' appears twice" in errors[4]
    assert "subjects[5] is not a mapping" in errors[5]
    assert all(e.startswith(uri) for e in errors.values())


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("{}", "m.json", "non-empty list under 'subjects'"),
        ("subjects: []", "m.yaml", "non-empty list under 'subjects'"),
        ("subjects: [unclosed", "m.yaml", "not valid YAML/JSON"),
    ],
)
def test_unusable_manifest_is_a_config_error(tmp_path, text, name, message):
    with pytest.raises(ConfigError, match=message):
        load_manifest(_manifest(tmp_path, text, name))


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"none\.yaml: manifest not found"):
        load_manifest(str(tmp_path / "none.yaml"))


# --- planning --------------------------------------------------------------------------------------------------


def test_identifiers_are_distinct_and_avoid_the_registry(tmp_path, tiny_model, monkeypatch):
    tokenizer = identifier.load_tokenizer(tiny_model)
    # what every subject would get on its own (same seed, same class): the registry already holds it
    taken = identifier.choose_identifier(tokenizer, "dog", FAST_IDS).identifier
    monkeypatch.setattr(identifier, "registry_identifiers", lambda uri, model, allow_pickle=False: {taken})
    fixed = identifier.choose_identifier(tokenizer, "cat", FAST_IDS, exclude={taken}).identifier
    entries = [{"name": f"dog-{i}", "class_noun": "dog", "images": f"/d/{i}"} for i in range(4)]
    entries += [
        {"name": "fixed", "class_noun": "cat", "images": "/d/f", "identifier": fixed},
        {"name": "clash", "class_noun": "cat", "images": "/d/c", "identifier": taken},
        {"name": "bad name!", "class_noun": "cat", "images": "/d/b"},
    ]
    uri = _manifest(tmp_path, json.dumps({"subjects": entries}), "m.json")
    plan = plan_batch(
        load_manifest(uri),
        tiny_model,
        str(tmp_path / "b"),
        identifier_config=FAST_IDS,
        registry_uri="reg",
    )
    ids = {s.name: s.identifier for s in plan.subjects}
    assert list(ids) == ["dog-0", "dog-1", "dog-2", "dog-3", "fixed"]
    assert len(set(ids.values())) == 5 and taken not in ids.values() and ids["fixed"] == fixed
    assert plan.classes == ["cat", "dog"]
    assert {s.prior_root for s in plan.subjects} == {str(tmp_path / "b" / "priors")}
    assert {s.base_model_digest for s in plan.subjects} == {plan.base_model_digest}
    assert len(plan.base_model_digest) == 64
    failed = {s.subject: s for s in plan.failed}
    assert list(failed) == ["clash", "bad name!"]  # manifest order
    assert (
        failed["clash"].status == "failed" and failed["clash"].step == "plan" and failed["clash"].entry == 5
    )
    assert "subjects[5] (clash)" in failed["clash"].error and "already taken" in failed["clash"].error
    assert failed["bad name!"].entry == 6 and "subjects[6]" in failed["bad name!"].error


def test_distinct_classes_one_item_per_class():
    common = {"base_model_digest": "d", "prior_root": "gs://b/priors", "images": "x", "identifier": "zwx"}
    subjects = [{"name": n, "class_noun": c, **common} for n, c in [("a", "dog"), ("b", "cat"), ("c", "dog")]]
    items = distinct_classes(subjects)
    assert [i.model_dump() for i in items] == [
        {"class_noun": "cat", "base_model_digest": "d", "prior_root": "gs://b/priors"},
        {"class_noun": "dog", "base_model_digest": "d", "prior_root": "gs://b/priors"},
    ]


# --- one subject -----------------------------------------------------------------------------------------------


def _planned(name: str) -> PlannedSubject:
    return PlannedSubject(
        name=name, class_noun="dog", images=f"/d/{name}", identifier=f"v{name[0]}", base_model_digest="md",
        prior_root="/p",
    )  # fmt: skip


def _result(config, **_) -> personalize.RunResult:
    return personalize.RunResult(
        run_dir=config.run_dir, subject=config.subject.name, identifier=config.identifier.identifier,
        prompt="a v dog", model_uri=f"{config.run_dir}/train/model", num_instance_images=4, prior_uri=None,
        samples_dir=None, metrics={"dino": 0.5, "clip_i": 0.6, "clip_t": 0.2}, gate={"passed": True, "reasons": []},
        report_html=f"{config.run_dir}/eval/report.html",
        registered={"uri": f"reg/{config.subject.name}/1"} if config.registry else None,
        wall_time_s=1.0, step_times_s={},
    )  # fmt: skip


def test_a_failing_subject_is_a_status_and_the_others_succeed(tmp_path, monkeypatch):
    from dreambooth_lib import storage

    seen = {}

    def fake_run(config, resume=False, reuse_training=False):
        seen[config.subject.name] = config
        if config.subject.name == "broken":
            raise IngestError(f"{config.subject.images}: folder not found")
        if config.subject.name == "gated":
            result = _result(config).model_copy(update={"gate": {"passed": False, "reasons": ["DINO low"]}})
            storage.write_json(
                storage.join(config.run_dir, "run_result.json"), result.model_dump(mode="json")
            )
            raise GateFailed("gate failed: DINO low")
        if config.subject.name == "buggy":
            raise RuntimeError("CUDA out of memory")
        return _result(config)

    monkeypatch.setattr(personalize, "run", fake_run)
    options = {
        "train": {"steps": 3, "resolution": 64},
        "ingest": {"resolution": 64},
        "identifier": {"seed": 4},
    }
    statuses = {
        name: run_subject(
            _planned(name), str(tmp_path / name), BatchSettings("base", options, registry_uri="reg")
        )
        for name in ("good", "broken", "gated", "buggy")
    }
    good = statuses["good"]
    assert good.status == "registered" and good.ok and good.error is None
    assert good.identifier == "vg" and good.metrics["dino"] == 0.5 and good.registered["uri"] == "reg/good/1"
    assert good.run_dir == str(tmp_path / "good") and good.base_model_digest == "md"
    broken = statuses["broken"]
    assert broken.status == "failed" and not broken.ok
    assert broken.error == "IngestError: /d/broken: folder not found" and broken.identifier == "vb"
    gated = statuses["gated"]
    assert gated.status == "gate failed" and gated.error == "gate failed: DINO low"
    assert gated.gate == {"passed": False, "reasons": ["DINO low"]} and gated.metrics["clip_t"] == 0.2
    assert (
        statuses["buggy"].status == "failed" and "RuntimeError: CUDA out of memory" in statuses["buggy"].error
    )
    # the RunConfig each subject ran: its identifier fixed, the run options kept, the registry set
    config = seen["good"]
    assert config.identifier.identifier == "vg" and config.identifier.seed == 4
    assert (
        config.train.steps == 3 and config.registry.uri == "reg" and config.run_dir == str(tmp_path / "good")
    )
    assert options["identifier"] == {"seed": 4}  # the caller's options are not modified


def test_a_bad_run_option_fails_only_that_subject(tmp_path, monkeypatch):
    monkeypatch.setattr(personalize, "run", _result)
    status = run_subject(_planned("x"), str(tmp_path / "x"), BatchSettings("base", {"train": {"stepz": 3}}))
    assert status.status == "failed" and "train.stepz" in status.error and "unknown field" in status.error
    ok = run_subject(_planned("y"), str(tmp_path / "y"), BatchSettings("base", {}))
    assert ok.status == "trained" and ok.registered is None


def test_status_records_round_trip_without_overwriting(tmp_path):
    directory = str(tmp_path / "status")
    ok = SubjectStatus(subject="rex", status="trained", identifier="zwx")
    duplicate = SubjectStatus(subject="rex", status="failed", step="plan", entry=4, error="appears twice")
    escaping = SubjectStatus(subject="../../evil", status="failed", step="plan", entry=5, error="bad name")
    uris = [write_status(directory, s) for s in (ok, duplicate, escaping)]
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["rex.json", "_rejected-4.json", "_rejected-5.json"]
    read = sorted(read_statuses(directory), key=lambda s: s.entry or -1)
    assert read == [ok, duplicate, escaping]
    assert read_statuses(str(tmp_path / "none")) == []


# --- packed LoRA training --------------------------------------------------------------------------------------

PACK_RES = 32


def _pack_options(mode: str = "lora", prior_size: int = 2) -> dict:
    """A batch's run options as the pipeline builds them: tiny LoRA training with a 2-image prior set."""
    return subject_run_values(
        {
            "ingest": {"min_side": PACK_RES, "allow_few": True},
            "train": {"lora_rank": 2, "checkpoint_every": 0, "log_every": 1, "device": "cpu",
                      "learning_rate": 1e-3},
            "prior": {"device": "cpu"},
            "samples_per_prompt": 0,
            "evaluate": False,
        },
        resolution=PACK_RES, steps=2, prior_loss_weight=1.0, prior_size=prior_size, prior_root="", mode=mode,
        prior_options={"steps": 2, "batch_size": 2},
    )  # fmt: skip


def _pack_subjects(tmp_path, prior_root: str, model: str) -> list[PlannedSubject]:
    """Two subjects with photos and one without, with identifiers the tokenizer keeps whole."""
    from dreambooth_lib.testing.synthetic import make_subject_images

    tokenizer = identifier.load_tokenizer(model)
    first = identifier.choose_identifier(tokenizer, "square", FAST_IDS).identifier
    second = identifier.choose_identifier(tokenizer, "square", FAST_IDS, exclude={first}).identifier

    made = [
        PlannedSubject(
            name=name, class_noun="square", identifier=ident, base_model_digest="md", prior_root=prior_root,
            images=str(make_subject_images(tmp_path / "photos" / name, n=2, size=PACK_RES, color=color, seed=i)),
        )
        for i, (name, ident, color) in enumerate([("red", first, (220, 30, 30)), ("green", second, (30, 200, 30))])
    ]  # fmt: skip
    missing = PlannedSubject(
        name="lost", class_noun="square", identifier=second, base_model_digest="md", prior_root=prior_root,
        images=str(tmp_path / "nowhere"),
    )  # fmt: skip
    return [*made, missing]


def test_train_pack_trains_lora_subjects_together_and_run_subject_reuses_them(
    tmp_path, tiny_model, monkeypatch
):
    from dreambooth_lib import train
    from dreambooth_lib.train import multi_subject as packed

    root, prior_root = str(tmp_path / "b"), str(tmp_path / "priors")
    subjects = _pack_subjects(tmp_path, prior_root, tiny_model)
    options = _pack_options()
    options["prior"]["root"] = prior_root
    packs = []
    real_packed = packed.run_packed
    monkeypatch.setattr(
        packed, "run_packed", lambda *a, **k: packs.append([s.name for s in a[1]]) or real_packed(*a, **k)
    )

    statuses = train_pack(subjects, tiny_model, root, "j1", options, pack_size=2)
    assert packs == [["red", "green"]]  # one UNet batch for both; the subject without photos left out
    by_name = {s.subject: s for s in statuses}
    assert by_name["red"].packed and by_name["green"].packed
    assert not by_name["lost"].packed and "nowhere" in by_name["lost"].reason
    for name, ident in ((s.name, s.identifier) for s in subjects[:2]):
        train_dir = tmp_path / "b" / "j1" / "subjects" / name / "train"
        summary = json.loads((train_dir / "train_summary.json").read_text())
        assert (
            summary["identifier"] == ident and summary["mode"] == "lora" and summary["num_prior_images"] == 2
        )
        assert (train_dir / "model" / "pytorch_lora_weights.safetensors").exists()
        assert by_name[name].model_uri == str(train_dir / "model")
    record = json.loads((tmp_path / "b" / "j1" / "packed.json").read_text())
    assert record["pack_size"] == 2 and [s["packed"] for s in record["subjects"]] == [True, True, False]
    assert len(list((tmp_path / "priors").glob("*/prior_set.json"))) == 1  # one class, one prior set

    # the subject step uses the packed model: training must not run again
    def no_training(*args, **kwargs):
        raise AssertionError("train.run called although the pack trained this subject")

    monkeypatch.setattr(train, "run", no_training)
    run_dir = subject_run_dir(root, "j1", "red")
    status = run_subject(subjects[0], run_dir, BatchSettings(tiny_model, options))
    assert status.status == "trained" and status.packed is True, status.error
    assert status.model_uri == by_name["red"].model_uri
    result = json.loads((tmp_path / "b" / "j1" / "subjects" / "red" / "run_result.json").read_text())
    assert result["reused_training"] is True and result["step_times_s"]["train"] == 0.0
    assert "Trained in packs (several LoRA subjects per UNet batch): red" in render_summary([status])[0]

    # other train settings than the pack's: the packed model is not this run's, so the subject trains alone
    other = {**options, "train": {**options["train"], "steps": 3}}
    status = run_subject(subjects[1], subject_run_dir(root, "j1", "green"), BatchSettings(tiny_model, other))
    assert status.status == "failed" and "train.run called" in status.error


def test_a_packed_batch_with_train_select_exports_and_lists_each_chosen_step(
    tmp_path, tiny_model, tiny_evaluators
):
    """run_options.train.select in a batch: the pack probes each subject with eval's evaluators, each subject's
    run reuses its packed model with the chosen step, and the summary lists the step."""
    root, prior_root = str(tmp_path / "b"), str(tmp_path / "priors")
    subjects = _pack_subjects(tmp_path, prior_root, tiny_model)[:2]
    options = _pack_options()
    options["prior"]["root"] = prior_root
    options["train"] |= {
        "steps": 4,
        "select": {"every": 2, "prompts": 1, "images_per_prompt": 2, "class_images": 2, "steps": 2},
    }
    options["eval"] = {"dino_model": tiny_evaluators["dino"], "clip_model": tiny_evaluators["clip"]}
    packed = {s.subject: s for s in train_pack(subjects, tiny_model, root, "j1", options, pack_size=2)}
    statuses = []
    for s in subjects:
        summary = json.loads(
            (tmp_path / "b" / "j1" / "subjects" / s.name / "train" / "train_summary.json").read_text()
        )
        chosen = summary["selection"]["chosen_step"]
        assert packed[s.name].packed and [p["step"] for p in summary["selection"]["probes"]] == [0, 2, 4]
        status = run_subject(s, subject_run_dir(root, "j1", s.name), BatchSettings(tiny_model, options))
        assert status.status == "trained" and status.packed and status.chosen_step == chosen in (2, 4)
        statuses.append(status)
    markdown, _ = render_summary(statuses)
    assert "| step |" in markdown
    assert all(f"| {s.chosen_step} |" in markdown for s in statuses)


def test_train_pack_leaves_full_fine_tunes_and_single_packs_to_the_subject_loop(
    tmp_path, tiny_model, monkeypatch
):
    from dreambooth_lib import ingest
    from dreambooth_lib.train import multi_subject as packed

    def never(*args, **kwargs):
        raise AssertionError("train_pack must do nothing here")

    monkeypatch.setattr(packed, "train_packed_subjects", never)
    monkeypatch.setattr(ingest, "run", never)
    subjects = _pack_subjects(tmp_path, str(tmp_path / "priors"), tiny_model)
    root = str(tmp_path / "b")
    assert train_pack(subjects, tiny_model, root, "j1", _pack_options("full"), pack_size=2) == []
    assert train_pack(subjects, tiny_model, root, "j1", _pack_options(), pack_size=1) == []
    # pack size 0: chosen from the device's memory; on CPU that is 1 (nothing to gain), so no packing
    assert train_pack(subjects, tiny_model, root, "j1", _pack_options(), pack_size=0) == []
    assert not (tmp_path / "b").exists()


def test_train_pack_without_a_prior_trains_and_run_subject_reuses_the_model(
    tmp_path, tiny_model, monkeypatch
):
    """prior_size 0 with the default λ: the pack trains without prior images (λ 0), and each subject's run sees
    the same settings, so it reuses the packed model instead of training again."""
    from dreambooth_lib import prior, train

    def never(*args, **kwargs):
        raise AssertionError("called although prior preservation is off or the pack trained the subject")

    monkeypatch.setattr(prior, "run", never)
    root = str(tmp_path / "b")
    red, green, _ = _pack_subjects(tmp_path, str(tmp_path / "priors"), tiny_model)
    options = _pack_options(prior_size=0)
    statuses = train_pack([red, green], tiny_model, root, "j1", options, pack_size=2)
    assert [(s.subject, s.packed) for s in statuses] == [("red", True), ("green", True)], statuses
    summary = json.loads(
        (tmp_path / "b" / "j1" / "subjects" / "red" / "train" / "train_summary.json").read_text()
    )
    assert summary["num_prior_images"] == 0 and summary["config"]["prior_loss_weight"] == 0.0

    monkeypatch.setattr(train, "run", never)
    status = run_subject(red, subject_run_dir(root, "j1", "red"), BatchSettings(tiny_model, options))
    assert status.status == "trained" and status.packed is True, status.error


def test_gate_thresholds_without_evaluation_fail_each_subject_before_any_work(tmp_path, monkeypatch):
    """`evaluate: false` in the run options with gate thresholds and a registry: each subject is refused with the
    reason, neither packed nor run (it would be registered without the gate it asks for)."""
    monkeypatch.setattr(personalize, "run", _result)
    options = subject_run_values(
        {"evaluate": False}, prior_root="/p", resolution=64, steps=3, prior_loss_weight=1.0, prior_size=2,
        mode="lora", gate_thresholds={"min_clip_t": 0.2},
    )  # fmt: skip
    status = run_subject(
        _planned("rex"), str(tmp_path / "rex"), BatchSettings("base", options, registry_uri="reg")
    )
    assert status.status == "failed" and "evaluate is false but eval.gate.min_clip_t" in status.error
    packs = train_pack([_planned("rex"), _planned("cup")], "base", str(tmp_path / "b"), "j1", options,
                       pack_size=2, registry_uri="reg")  # fmt: skip
    assert packs == [] and not (tmp_path / "b").exists()
    without_registry = run_subject(_planned("cup"), str(tmp_path / "cup"), BatchSettings("base", options))
    assert without_registry.status == "trained"  # the thresholds guard no registration: the subject runs


def test_a_batch_trains_packed_lora_by_default():
    """Without a mode, a batch's subjects train LoRA adapters (which the pack step trains K per task), with the
    config models' defaults for the rest."""
    from dreambooth_lib.config import PriorConfig, TrainConfig

    values = subject_run_values({}, prior_root="/p")
    assert values["train"]["mode"] == "lora"
    defaults = TrainConfig()
    assert values["train"]["steps"] == defaults.steps and values["train"]["resolution"] == defaults.resolution
    assert values["train"]["prior_loss_weight"] == defaults.prior_loss_weight
    assert values["prior"]["num_images"] == PriorConfig().num_images


# --- the summary -----------------------------------------------------------------------------------------------


def test_summary_has_identifier_metrics_gate_and_links():
    statuses = [
        SubjectStatus(
            subject="rex", status="registered", class_noun="dog", identifier="zwx",
            metrics={"dino": 0.61234, "clip_i": 0.7, "clip_t": 0.3}, gate={"passed": True, "reasons": []},
            registered={"uri": "gs://r/rex/1"}, report_html="gs://b/rex/eval/report.html", chosen_step=400,
        ),
        SubjectStatus(
            subject="cup", status="gate failed", class_noun="cup", identifier="qyv", error="DINO 0.1 < 0.5",
            metrics={"dino": 0.1, "clip_i": 0.2, "clip_t": None}, gate={"passed": False, "reasons": ["DINO 0.1 < 0.5"]},
            model_uri="gs://b/cup/train/model",
        ),
        SubjectStatus(subject="a|b <x>", status="failed", step="plan", entry=2, error="bad name"),
    ]  # fmt: skip
    statuses = with_unfinished(statuses, ["rex", "cup", "a|b <x>", "late"], run_error="pod evicted")
    markdown, page = render_summary(statuses, job_id="j1", run_error="pod evicted")
    assert markdown.startswith("# Batch j1: 1 of 4 subjects succeeded\n")
    assert (
        "| rex | dog | zwx | registered | 0.612 | 0.700 | 0.300 | 400 | passed | gs://r/rex/1 "
        "| gs://b/rex/eval/report.html |" in markdown
    )
    assert (
        "| cup | cup | qyv | gate failed (DINO 0.1 < 0.5) | 0.100 | 0.200 |  |  | failed: DINO 0.1 < 0.5 "
        "| gs://b/cup/train/model |  |" in markdown
    )
    assert "| a\\|b <x> |" in markdown  # a pipe in a name does not break the table
    assert "| late |  |  | not finished (did not finish: pod evicted) |" in markdown
    assert markdown.rstrip().endswith("Run error: pod evicted")
    assert "<td>zwx</td><td>registered</td><td>0.612</td>" in page
    assert "<a href='gs://b/rex/eval/report.html'>gs://b/rex/eval/report.html</a>" in page
    assert "<td>a|b &lt;x&gt;</td>" in page and "<x>" not in page
    record = summary_record(statuses, job_id="j1")
    assert record["title"] == "Batch j1: 1 of 4 subjects succeeded"
    assert set(record["subjects"]) == {"rex", "cup", "a|b <x>", "late"}
    assert record["subjects"]["cup"]["metrics"]["dino"] == 0.1


def test_render_status_lists_what_a_user_needs():
    text = render_status(
        SubjectStatus(subject="rex", status="failed", identifier="zwx", error="IngestError: no photos")
    )
    assert text.startswith("# rex: failed\n") and '- **error**: `"IngestError: no photos"`' in text
