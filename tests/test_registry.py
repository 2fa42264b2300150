"""The model registry: immutable numbered versions, race-free under concurrent writers (local and the GCS
emulator), gate and identifier refusals that leave nothing behind, and the card / lineage a user reads."""

from __future__ import annotations

import json
import multiprocessing
import re
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from PIL import Image

import dreambooth_lib
from dreambooth_lib import registry, storage
from dreambooth_lib.errors import ConfigError, DreamboothError, GateFailed, PreconditionFailed, StorageError
from dreambooth_lib.registry import RegistryBackend, open_registry, register_backend, register_from_dirs
from dreambooth_lib.testing.synthetic import fake_model_folder, register_fake

WRITERS = 16
METRICS = {"dino": 0.7123, "clip_i": 0.81, "clip_t": 0.29, "pres": 0.5, "div": None}
REFERENCE = {"dino": 0.77, "clip_i": 0.88}
PASSED = {"passed": True, "reasons": []}


def _png(path: Path, color) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return str(path)


def _register(root: str, model_dir: str, subject: str = "dog", identifier: str = "zwx", **overrides):
    lineage = {"instance_images": {"uri": "ingest/", "digest": "d1"}}
    fields = dict(subject=subject, identifier=identifier, metrics=METRICS, gate=PASSED, lineage=lineage)
    return register_fake(open_registry(root), model_dir, **{**fields, **overrides})


def _index(root: str) -> list[dict]:
    return storage.read_json(storage.join(root, "index.json"))


# --- what one registration writes ---------------------------------------------------------------------------


def test_register_writes_an_immutable_version_with_card_lineage_report_and_samples(tmp_path):
    root = str(tmp_path / "reg")
    model = fake_model_folder(tmp_path / "model", tag="A")
    samples = [_png(tmp_path / "eval" / f"{i}.png", (10 * i, 0, 0)) for i in range(3)]
    report = tmp_path / "eval" / "report.html"
    report.write_text("<html>report</html>")
    manifest = {"images": [{"name": "00.png", "sha256": "ab" * 32}, {"name": "01.png", "sha256": "cd" * 32}]}

    m = _register(
        root,
        model,
        reference=REFERENCE,
        report_html=str(report),
        sample_grid=samples,
        train_config={"steps": 400, "learning_rate": 5e-6},
        data_manifest=manifest,
    )

    assert (m.subject, m.version, m.mode, m.status) == ("dog", 1, "full", "ready")
    assert m.uri == str(Path(root, "dog", "1")) and m.prompt == "a zwx dog"
    assert (
        storage.read_text(storage.join(m.model_uri, "unet", "diffusion_pytorch_model.safetensors"))
        == "unet-weights-A"
    )
    assert storage.digest_prefix(m.model_uri) == storage.digest_prefix(model)
    assert storage.read_text(m.report_uri) == "<html>report</html>"
    assert storage.read_bytes(storage.join(m.uri, "samples", "02.png")) == Path(samples[2]).read_bytes()

    card = storage.read_text(m.card_uri)
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "org/tiny-sd" and meta["instance_prompt"] == "a zwx dog"
    assert "dreambooth" in meta["tags"] and meta["license"] == "other" and "CC BY 4.0" in meta["license_note"]
    assert meta["dreambooth"]["version"] == 1 and meta["dreambooth"]["base_model_digest"] == "digest-a"
    for section in (
        "## Identifier and class",
        "## How to prompt",
        "## Metrics",
        "## Samples",
        "## Training configuration",
        "## Data",
        "## License",
    ):
        assert section in body
    assert "| DINO | higher | 0.712 | 0.770 | 0.668 | 0.774 |" in body
    assert "| DIV | higher | — | — | — | — |" in body
    assert "![sample 2](samples/02.png)" in body and "samples/03" not in body
    assert "learning_rate: 5.0e-06" in body and f"| `01.png` | `{'cd' * 32}` |" in body
    assert "Unsplash" in body and "Quality gate: passed." in body

    lineage = storage.read_json(m.lineage_uri)
    assert lineage["code_version"] == dreambooth_lib.__version__
    assert lineage["created"] == m.created and lineage["version"] == 1
    assert lineage["model"] == {
        "source_uri": model,
        "digest": storage.digest_prefix(model),
        "uri": m.model_uri,
        "mode": "full",
    }
    assert lineage["base_model"] == {"uri": "org/tiny-sd", "digest": "digest-a"}
    assert lineage["report_html"]["sha256"] == storage.sha256_bytes(report.read_bytes())
    assert [s["source_uri"] for s in lineage["samples"]] == samples
    assert lineage["inputs"]["instance_images"]["digest"] == "d1"
    assert lineage["train_config"]["steps"] == 400 and lineage["data_manifest"]["content"] == manifest

    [entry] = _index(root)
    assert entry["status"] == "ready" and entry["metrics"]["dino"] == 0.7123 and entry["uri"] == m.uri


def test_lora_card_of_an_unevaluated_model(tmp_path):
    m = _register(
        str(tmp_path / "reg"), fake_model_folder(tmp_path / "lora", lora=True), metrics=None, gate=None
    )
    card = open_registry(str(tmp_path / "reg")).model_card("dog")
    assert m.mode == "lora" and "lora" in yaml.safe_load(card.split("---\n")[1])["tags"]
    assert "Not evaluated." in card and "Quality gate: not evaluated." in card


# --- the card's code runs as written ------------------------------------------------------------------------


def _card_code(card: str) -> list[tuple[str, str]]:
    """The (language, code) of each bash and python block of the card's "How to prompt" section."""
    usage = card.split("## How to prompt", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", usage, re.S)


def _run_card_code(card: str, workdir: Path, monkeypatch) -> list:
    """Run the card's code in `workdir` as a user would; returns the image each python block made. There is no
    gcloud here: `gcloud storage cp -r SRC DST` is done by dreambooth_lib.storage, which copies the same way."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(workdir / "cache"))  # where load_pipeline keeps gs:// models
    images = []
    for language, code in _card_code(card):
        if language == "bash":
            for command in code.strip().splitlines():
                copy = re.fullmatch(r"gcloud storage cp -r (gs://\S+) (\./\w+)", command)
                assert copy, f"not a command this test can run: {command}"
                storage.copy_prefix(copy[1], str(workdir / copy[2]))
        else:
            scope: dict = {}
            exec(code, scope)
            images.append(scope["image"])
    return images


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory) -> Path:
    """A diffusers LoRA folder (pytorch_lora_weights.safetensors) for the tiny model, as save_lora_weights writes it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out = tmp_path_factory.mktemp("tiny-lora") / "lora"
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True)
    return out


def _lora_on(base_model: str, lora: Path, folder: Path) -> str:
    """A copy of `lora` whose marker names `base_model`, as training writes it."""
    storage.copy_prefix(str(lora), str(folder))
    storage.write_json(str(folder / "dreambooth_lora.json"), {"base_model": base_model, "identifier": "zwx"})
    return str(folder)


def test_the_card_code_of_a_full_model_runs(tiny_model, tmp_path, monkeypatch):
    m = _register(str(tmp_path / "reg"), tiny_model, base_model=tiny_model, metrics=None, gate=None)
    card = storage.read_text(m.card_uri)
    assert (
        "from diffusers import StableDiffusionPipeline" in card
    )  # the family's class, from model_index.json
    images = _run_card_code(card, tmp_path, monkeypatch)
    assert len(images) == 2 and all(isinstance(image, Image.Image) for image in images)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_the_card_code_of_a_lora_model_runs(where, tiny_model, tiny_lora, tmp_path, request, monkeypatch):
    if where == "gcs":  # base model, trained adapter and registry all under gs:// prefixes, as in a KFP run
        bucket = request.getfixturevalue("gcs_bucket")
        base, root = f"{bucket}/models/tiny-sd/", f"{bucket}/registry"
        storage.copy_prefix(tiny_model, base)
        model = f"{bucket}/runs/dog/model"
        storage.copy_prefix(_lora_on(base, tiny_lora, tmp_path / "lora"), model)
    else:
        base, root = tiny_model, str(tmp_path / "reg")
        model = _lora_on(base, tiny_lora, tmp_path / "lora")
    m = _register(root, model, base_model=base, metrics=None, gate=None)
    card = storage.read_text(m.card_uri)
    assert m.mode == "lora" and "from diffusers import StableDiffusionPipeline" in card
    # diffusers reads local folders and hub ids only: the card never hands it a gs:// URI
    assert 'from_pretrained("gs://' not in card and 'load_lora_weights("gs://' not in card
    images = _run_card_code(card, tmp_path, monkeypatch)
    assert len(images) == 2 and all(isinstance(image, Image.Image) for image in images)


def test_the_card_loads_a_hub_base_as_is_with_its_family_class(tmp_path):
    lora = _register(
        str(tmp_path / "reg"), fake_model_folder(tmp_path / "lora", lora=True), metrics=None, gate=None
    )
    card = storage.read_text(lora.card_uri)
    # a hub id diffusers downloads itself; its family is not looked up, DiffusionPipeline reads model_index.json
    assert (
        f'pipe = DiffusionPipeline.from_pretrained("org/tiny-sd")\npipe.load_lora_weights("{lora.model_uri}")'
        in card
    )
    assert "gcloud" not in card

    sdxl = tmp_path / "sdxl"
    fake_model_folder(sdxl, tag="xl")
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    m = _register(str(tmp_path / "reg"), str(sdxl), subject="cat", identifier="qxv", metrics=None, gate=None)
    assert f'StableDiffusionXLPipeline.from_pretrained("{m.model_uri}")' in storage.read_text(m.card_uri)


def test_versions_list_and_show(tmp_path):
    root = str(tmp_path / "reg")
    reg = open_registry(root)
    assert reg.list_models() == []
    _register(root, fake_model_folder(tmp_path / "m1", "1"))
    _register(root, fake_model_folder(tmp_path / "m2", "2"))
    _register(
        root, fake_model_folder(tmp_path / "m3", "3"), subject="cat", identifier="qxv", class_noun="cat"
    )

    assert [(m.subject, m.version) for m in reg.list_models()] == [("cat", 1), ("dog", 1), ("dog", 2)]
    assert [m.version for m in reg.list_models("dog")] == [1, 2]
    assert reg.show("dog").version == 2 and reg.show("dog", 1).version == 1
    assert (
        storage.read_text(
            storage.join(reg.show("dog", 1).model_uri, "unet", "diffusion_pytorch_model.safetensors")
        )
        == "unet-weights-1"
    )
    assert reg.model_card("cat", 1).startswith("---\n") and "`qxv`" in reg.model_card("cat")
    with pytest.raises(
        DreamboothError, match=r"no registered model for subject 'bird'; known subjects: cat, dog"
    ):
        reg.show("bird")
    with pytest.raises(DreamboothError, match=r"'dog' has no version 7; versions: 1, 2"):
        reg.show("dog", 7)
    with pytest.raises(DreamboothError, match="registry is empty"):
        open_registry(str(tmp_path / "empty")).show("dog")


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="subject 'Bad Name'"):
        _register(str(tmp_path / "reg"), fake_model_folder(tmp_path / "m"), subject="Bad Name")
    with pytest.raises(StorageError, match="no model files"):
        _register(str(tmp_path / "reg"), str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="registry.backend 'mlflow' is unknown; known: file"):
        open_registry(str(tmp_path / "reg"), backend="mlflow")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{not json")
    with pytest.raises(StorageError, match="index.json: not valid JSON"):
        open_registry(str(tmp_path / "broken")).list_models()


def test_a_base_model_this_machine_cannot_read_still_registers(gcs_bucket, tmp_path):
    """The base's family only picks the card's pipeline class: an unreadable base does not fail registering."""
    unreadable = "gs://no-such-bucket-for-the-registry-test/models/sd"
    m = _register(
        str(tmp_path / "reg"), fake_model_folder(tmp_path / "lora", lora=True), base_model=unreadable
    )
    card = storage.read_text(m.card_uri)
    assert f"gcloud storage cp -r {unreadable} ./base" in card
    assert 'pipe = DiffusionPipeline.from_pretrained("./base")' in card


# --- refusals leave nothing ---------------------------------------------------------------------------------


def test_failed_gate_raises_and_registers_nothing(tmp_path):
    root = tmp_path / "reg"
    model = fake_model_folder(tmp_path / "model")
    before = storage.digest_prefix(model)
    gate = {"passed": False, "reasons": ["DINO 0.41 < min_dino 0.5", "CLIP-T 0.2 < min_clip_t 0.25"]}
    with pytest.raises(
        GateFailed, match=r"quality gate failed: DINO 0.41 < min_dino 0.5; CLIP-T 0.2 < min_clip_t 0.25"
    ):
        _register(str(root), model, gate=gate)
    assert not root.exists()
    assert storage.digest_prefix(model) == before

    forced = _register(str(root), model, gate=gate, require_gate=False)
    assert forced.gate_passed is False
    assert "Quality gate: failed (registered with require_gate=False)." in storage.read_text(forced.card_uri)


def test_identifiers_are_unique_per_base_model(tmp_path):
    root = str(tmp_path / "reg")
    reg = open_registry(root)
    _register(root, fake_model_folder(tmp_path / "m1", "1"), subject="dog", identifier="zwx")
    with pytest.raises(DreamboothError, match=r"identifier 'zwx' is already used by subject 'dog' \(v1\)"):
        _register(root, fake_model_folder(tmp_path / "m2", "2"), subject="cat", identifier="zwx")
    assert [m.subject for m in reg.list_models()] == ["dog"]

    _register(
        root,
        fake_model_folder(tmp_path / "m3", "3"),
        subject="cat",
        identifier="zwx",
        base_model_digest="digest-b",
    )
    _register(
        root, fake_model_folder(tmp_path / "m4", "4"), subject="dog", identifier="zwx"
    )  # a new version: fine
    _register(root, fake_model_folder(tmp_path / "m5", "5"), subject="cat", identifier="pqr")
    assert reg.used_identifiers("digest-a") == {"zwx", "pqr"}
    assert reg.used_identifiers("digest-b") == {"zwx"}
    assert reg.used_identifiers("digest-c") == set()
    assert reg.used_identifiers() == {"zwx", "pqr"}


def test_a_failed_write_retires_its_version_and_readers_never_see_a_pending_one(tmp_path, monkeypatch):
    root = str(tmp_path / "reg")
    reg = open_registry(root)
    real_copy_prefix = storage.copy_prefix
    seen_while_copying = {}

    def copy_then_fail(src, dst):
        seen_while_copying["listed"] = reg.list_models()
        seen_while_copying["used"] = reg.used_identifiers("digest-a")
        real_copy_prefix(src, dst)
        raise OSError("disk full")

    monkeypatch.setattr(storage, "copy_prefix", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _register(root, fake_model_folder(tmp_path / "m1", "1"))
    # while the weights were copied the claim was pending: invisible to readers, but its identifier was taken
    assert seen_while_copying == {"listed": [], "used": {"zwx"}}
    assert [(e["version"], e["status"]) for e in _index(root)] == [(1, "failed")]
    assert not Path(root, "dog", "1").exists() and reg.list_models() == []
    assert reg.used_identifiers() == set()

    monkeypatch.setattr(storage, "copy_prefix", real_copy_prefix)
    assert _register(root, fake_model_folder(tmp_path / "m2", "2")).version == 2  # number 1 is never reused


def _register_then_hang(root: str, model_dir: str) -> None:
    """A writer that claims a version, starts copying, and never finishes (killed with SIGKILL by the test)."""
    import time as _time

    real_copy = storage.copy_prefix

    def copy_then_hang(src, dst):
        real_copy(src, dst)
        print("copied", flush=True)
        _time.sleep(600)

    storage.copy_prefix = copy_then_hang
    _register(root, model_dir, subject="cat", identifier="zwx", class_noun="cat")


def test_a_crashed_writer_is_retired_after_its_lease(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    root = str(tmp_path / "reg")
    code = (
        "import sys; sys.path[:0] = [sys.argv[3]]; import test_registry as t; "
        "t._register_then_hang(sys.argv[1], sys.argv[2])"
    )
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            root,
            fake_model_folder(tmp_path / "cat-model", "c"),
            str(Path(__file__).parent),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "copied"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    [claim] = _index(root)
    assert claim["status"] == "pending" and Path(root, "cat", "1", "model").is_dir()  # what a crash leaves

    # within the lease the claim holds its identifier: the writer may still be alive
    with pytest.raises(DreamboothError, match="'zwx' is already used by subject 'cat'"):
        _register(root, fake_model_folder(tmp_path / "dog-model", "d"))
    assert open_registry(root).used_identifiers() == {"zwx"}

    # an hour later (the lease moved into the past): the next registration retires it and takes the identifier
    entries = _index(root)
    entries[0]["lease_expires"] = "2000-01-01T00:00:00+00:00"
    storage.write_json(storage.join(root, "index.json"), entries)
    dog = _register(root, fake_model_folder(tmp_path / "dog-model", "d"))
    assert (dog.subject, dog.version, dog.identifier) == ("dog", 1, "zwx")
    assert [(e["subject"], e["version"], e["status"]) for e in _index(root)] == [
        ("cat", 1, "abandoned"),
        ("dog", 1, "ready"),
    ]
    assert not Path(root, "cat", "1").exists()  # the partial folder is gone
    # the number stays retired: cat's next registration is v2
    assert (
        _register(root, fake_model_folder(tmp_path / "cat2", "c2"), subject="cat", identifier="qxv").version
        == 2
    )


def test_a_writer_past_its_lease_cannot_publish(tmp_path):
    root = str(tmp_path / "reg")
    backend = registry.FileRegistryBackend(root, pending_lease_s=-1)  # every claim born expired
    entry = backend.claim({"subject": "dog", "identifier": "zwx", "base_model": "b"}, lambda entries: None)
    retired = registry.Registry(backend).retire_abandoned()
    assert [(e["version"], e["status"]) for e in retired] == [(1, "abandoned")]
    with pytest.raises(PreconditionFailed, match="'abandoned', not 'pending'"):
        backend.set_status("dog", entry["version"], "ready", expect="pending")
    assert _index(root)[0]["status"] == "abandoned"


def test_registering_the_same_weights_again_returns_the_published_version(tmp_path):
    root = str(tmp_path / "reg")
    model = fake_model_folder(tmp_path / "m", "1")
    first = _register(root, model)
    again = _register(root, model)  # e.g. the register task retried after publishing
    assert again == first and len(_index(root)) == 1
    assert (
        _register(root, fake_model_folder(tmp_path / "m2", "2")).version == 2
    )  # other weights: a new version
    assert _register(root, model, metrics=None).version == 3  # same weights, another record: a new version


# --- concurrency --------------------------------------------------------------------------------------------


def _register_writer(root: str, model_dir: str, i: int) -> int:
    return _register(
        root, model_dir, subject="dog" if i % 4 else "cat", identifier="zwx" if i % 4 else "qxv"
    ).version


def _check_all_landed(root: str, tags: list[str]) -> None:
    """Every writer has its own version, numbered 1..n per subject, holding that writer's own files."""
    entries = _index(root)
    assert len(entries) == len(tags) and all(e["status"] == "ready" for e in entries)
    for subject in ("dog", "cat"):
        versions = sorted(e["version"] for e in entries if e["subject"] == subject)
        assert versions == list(range(1, len(versions) + 1))
    owners = [
        json.loads(storage.read_text(storage.join(e["model_uri"], "model_index.json")))["tag"]
        for e in entries
    ]
    assert sorted(owners) == sorted(tags)
    for e in entries:
        tag = json.loads(storage.read_text(storage.join(e["model_uri"], "model_index.json")))["tag"]
        assert (
            storage.read_text(storage.join(e["model_uri"], "unet", "diffusion_pytorch_model.safetensors"))
            == f"unet-weights-{tag}"
        )
        assert storage.read_json(e["lineage_uri"])["version"] == e["version"]
    assert len(open_registry(root).list_models()) == len(tags)


def _models(tmp_path: Path) -> list[str]:
    return [fake_model_folder(tmp_path / f"m{i}", tag=str(i)) for i in range(WRITERS)]


def test_concurrent_threads_local(tmp_path):
    root, models = str(tmp_path / "reg"), _models(tmp_path)
    with ThreadPoolExecutor(WRITERS) as pool:
        versions = list(pool.map(_register_writer, [root] * WRITERS, models, range(WRITERS)))
    assert sorted(versions) == sorted(list(range(1, 13)) + list(range(1, 5)))
    _check_all_landed(root, [str(i) for i in range(WRITERS)])


def test_concurrent_processes_local(tmp_path):
    root, models = str(tmp_path / "reg"), _models(tmp_path)
    # fork: the children start at once without re-importing anything (the lock is an flock, shared by none)
    with ProcessPoolExecutor(WRITERS, mp_context=multiprocessing.get_context("fork")) as pool:
        versions = list(pool.map(_register_writer, [root] * WRITERS, models, range(WRITERS)))
    assert sorted(versions) == sorted(list(range(1, 13)) + list(range(1, 5)))
    _check_all_landed(root, [str(i) for i in range(WRITERS)])


def test_concurrent_threads_gcs(gcs_bucket, tmp_path):
    root = f"{gcs_bucket}/registry"
    models = []
    for i, local in enumerate(_models(tmp_path)):  # the weights come from gs:// too, as in a KFP run
        models.append(f"{gcs_bucket}/runs/{i}/model")
        storage.copy_prefix(local, models[-1])
    with ThreadPoolExecutor(WRITERS) as pool:
        versions = list(pool.map(_register_writer, [root] * WRITERS, models, range(WRITERS)))
    assert sorted(versions) == sorted(list(range(1, 13)) + list(range(1, 5)))
    _check_all_landed(root, [str(i) for i in range(WRITERS)])
    reg = open_registry(root)
    assert reg.show("dog").version == 12 and reg.show("dog").uri == f"{root}/dog/12"
    assert "instance_prompt: a qxv dog" in reg.model_card("cat", 4)


def test_gcs_claim_retries_when_another_writer_wins(gcs_bucket, tmp_path, monkeypatch):
    """The index write is conditional: a writer that lost the race re-reads and takes the next number."""
    root = f"{gcs_bucket}/registry"
    index = f"{root}/index.json"
    real_write = storage.write_bytes
    raced = threading.Event()

    def racing_write(uri, data, *, if_generation_match=None):
        if uri == index and not raced.is_set():
            raced.set()  # another writer claims dog v1 between our read and our write
            rival = {
                "subject": "dog",
                "version": 1,
                "identifier": "abc",
                "base_model": "x",
                "status": "pending",
            }
            real_write(index, json.dumps([rival]).encode())
        real_write(uri, data, if_generation_match=if_generation_match)

    monkeypatch.setattr(storage, "write_bytes", racing_write)
    m = _register(root, fake_model_folder(tmp_path / "m", "mine"))
    assert raced.is_set() and m.version == 2
    assert [(e["version"], e["status"]) for e in _index(root)] == [(1, "pending"), (2, "ready")]


# --- registering a finished run -----------------------------------------------------------------------------


def _run_dirs(tmp_path: Path, gate: dict) -> dict:
    train = tmp_path / "run" / "train"
    fake_model_folder(train / "model", tag="run")
    summary = {
        "identifier": "zwx",
        "class_noun": "dog",
        "class_prompt": "a dog",
        "base_model": "org/tiny-sd",
        "base_model_digest": "digest-a",
        "config": {"mode": "full", "steps": 400},
        "model_uri": "/elsewhere/at/training/time/model",  # the artifact moved: train/model is used
    }
    storage.write_json(str(train / "train_summary.json"), summary)
    ev = tmp_path / "run" / "eval"
    per_prompt = []
    for p, color in (("beach", (230, 200, 120)), ("snow", (240, 240, 250))):
        rels = [f"images/{p}/{j:02d}.png" for j in range(2)]
        for r in rels:
            _png(ev / r, color)
        per_prompt.append({"prompt": f"a zwx dog on the {p}", "images": rels})
    _png(ev / "images" / "_pres" / "00.png", (0, 0, 0))
    doc = {
        "metrics": METRICS,
        "reference": {**REFERENCE, "n_images": 4},
        "gate": gate,
        "per_prompt": per_prompt,
    }
    storage.write_json(str(ev / "metrics.json"), doc)
    (ev / "report.html").write_text("<html>eval</html>")
    ingest = tmp_path / "run" / "ingest"
    _png(ingest / "00.png", (200, 0, 0))
    storage.write_json(str(ingest / "manifest.json"), {"images": [{"name": "00.png", "sha256": "ef" * 32}]})
    return {"train_dir": str(train), "eval_dir": str(ev), "ingest_dir": str(ingest)}


def test_register_from_dirs(tmp_path):
    root = str(tmp_path / "reg")
    dirs = _run_dirs(tmp_path, PASSED)
    m = register_from_dirs(root, subject="dog", class_noun="dog", run_config={"run_dir": "run"}, **dirs)
    assert (m.version, m.identifier, m.base_model_digest, m.gate_passed) == (1, "zwx", "digest-a", True)
    assert storage.read_json(storage.join(m.model_uri, "model_index.json"))["tag"] == "run"  # train/model's
    assert storage.read_text(m.report_uri) == "<html>eval</html>"
    card = storage.read_text(m.card_uri)
    assert "| CLIP-I | higher | 0.810 | 0.880 | 0.803 | 0.885 |" in card and "steps: 400" in card
    lineage = storage.read_json(m.lineage_uri)
    # one image per prompt first, then the second of each; the PRES images are not samples
    assert [Path(s["source_uri"]).relative_to(dirs["eval_dir"]).as_posix() for s in lineage["samples"]] == [
        "images/beach/00.png",
        "images/snow/00.png",
        "images/beach/01.png",
        "images/snow/01.png",
    ]
    inputs = lineage["inputs"]
    assert inputs["train_summary"]["sha256"] == storage.sha256_bytes(
        Path(dirs["train_dir"], "train_summary.json").read_bytes()
    )
    assert inputs["eval_metrics"]["sha256"] == storage.sha256_bytes(
        Path(dirs["eval_dir"], "metrics.json").read_bytes()
    )
    assert inputs["instance_images"]["digest"] == storage.digest_prefix(dirs["ingest_dir"])
    assert inputs["run_config"] == {"run_dir": "run"} and lineage["reference"] == REFERENCE
    assert lineage["data_manifest"]["content"]["images"][0]["sha256"] == "ef" * 32

    unevaluated = register_from_dirs(root, subject="dog", **{**dirs, "eval_dir": None})
    assert unevaluated.version == 2 and unevaluated.gate_passed is None and unevaluated.metrics is None


def test_register_from_dirs_refuses_a_failed_gate(tmp_path):
    root = tmp_path / "reg"
    dirs = _run_dirs(tmp_path, {"passed": False, "reasons": ["DINO 0.2 < min_dino 0.5"]})
    with pytest.raises(GateFailed, match="DINO 0.2 < min_dino 0.5"):
        register_from_dirs(str(root), subject="dog", class_noun="dog", **dirs)
    assert not root.exists()
    assert register_from_dirs(str(root), subject="dog", require_gate=False, **dirs).gate_passed is False
    with pytest.raises(DreamboothError, match="train_summary.json: not found"):
        register_from_dirs(str(root), subject="dog", **{**dirs, "train_dir": str(tmp_path / "nope")})


# --- another backend plugs in -------------------------------------------------------------------------------


class MemoryBackend(RegistryBackend):
    """The smallest backend: entries in a list under a lock (as a catalogue service would hold them)."""

    def __init__(self, root: str):
        self.root, self._entries, self._lock = root, [], threading.Lock()

    def entries(self):
        with self._lock:
            return [dict(e) for e in self._entries]

    def claim(self, draft, check):
        with self._lock:
            check(self._entries)
            version = 1 + max(
                (e["version"] for e in self._entries if e["subject"] == draft["subject"]), default=0
            )
            entry = {**draft, "version": version, "uri": self.version_uri(draft["subject"], version)}
            entry.update(status="pending", created="now")
            self._entries.append(entry)
            return dict(entry)

    def set_status(self, subject, version, status, updates=None, expect=None):
        with self._lock:
            [entry] = [e for e in self._entries if (e["subject"], e["version"]) == (subject, version)]
            if expect is not None and entry["status"] != expect:
                raise PreconditionFailed(f"{subject} v{version} is {entry['status']}")
            entry.update(updates or {}, status=status)
            return dict(entry)

    def version_uri(self, subject, version):
        return storage.join(self.root, subject, str(version))


def test_a_backend_plugs_in(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.backends._BACKENDS, "memory", MemoryBackend)  # undone after the test
    register_backend("memory", MemoryBackend)
    reg = open_registry(str(tmp_path / "mem"), backend="memory")
    m = register_fake(reg, fake_model_folder(tmp_path / "m"))
    assert m.version == 1 and reg.show("dog").model_uri == m.model_uri
    assert Path(m.card_uri).is_file() and not (tmp_path / "mem" / "index.json").exists()


def test_the_cards_pipeline_classes_are_the_families():
    """The registry names a family's pipeline class without importing torch; it must say what the family says."""
    from dreambooth_lib.models import FAMILIES
    from dreambooth_lib.registry.model_folder import PIPELINE_CLASSES

    assert PIPELINE_CLASSES == {family.name: family.pipeline_class for family in FAMILIES}
