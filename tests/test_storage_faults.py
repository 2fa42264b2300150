"""Storage under faults: every gs:// read and write survives 5xx, 429, resets, stalls and lost answers, and no
reader sees a torn prior set, registry version or checkpoint. A fault proxy (dreambooth_lib.testing.fault_proxy)
sits between the client and fake-gcs-server; each scenario runs fault-free and under a seeded schedule, must give
the same result, and prints requests, faults, retries and the slowdown (`pytest -s` shows them)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from dreambooth_lib import prior, storage, train
from dreambooth_lib.config import PriorConfig
from dreambooth_lib.errors import PreconditionFailed, StorageError
from dreambooth_lib.registry import open_registry
from dreambooth_lib.testing.fault_proxy import FAULT_KINDS, FaultProxy, FaultRule, FaultSchedule
from dreambooth_lib.testing.synthetic import fake_model_folder, register_fake
from dreambooth_lib.testing.tiny_models import tiny_train_config
from dreambooth_lib.train import checkpoint

KiB = 1024
# Milliseconds instead of google's seconds: the same code paths, a test's extra time in seconds. The timeout is
# well above fake-gcs-server's answers and below the proxy's stall.
FAST_RETRIES = storage.RetryPolicy(
    initial_backoff_s=0.005,
    max_backoff_s=0.05,
    deadline_s=60.0,
    max_attempts=25,
    request_timeout_s=0.25,
    multipart_max_bytes=64 * KiB,  # larger objects go resumable, in 256 KiB chunks (GCS's unit)
    chunk_bytes=256 * KiB,
    download_range_bytes=256 * KiB,
    list_page_size=25,
)
STALL_S = 0.6
TEN_PERCENT = 0.1


@pytest.fixture
def proxy(gcs_emulator, monkeypatch):
    """The client pointed at a fault proxy in front of the emulator, with fast retries; no faults until `use`."""
    with FaultProxy(gcs_emulator, stall_s=STALL_S) as fault_proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", fault_proxy.url)
        storage.reset_client()
        with storage.retry_policy_in_effect(FAST_RETRIES):
            yield fault_proxy
    storage.reset_client()


@pytest.fixture
def bucket(proxy) -> str:
    name = f"faults-{uuid.uuid4().hex[:12]}"
    storage._client().create_bucket(name)
    return f"gs://{name}"


@dataclass
class Figures:
    requests: int
    faults: dict[str, int]
    retries: int
    recognised: int
    mismatches: int
    seconds: float

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.faults.items()) or "none"
        return (
            f"{self.requests} requests, {sum(self.faults.values())} faults ({kinds}), {self.retries} retries "
            f"({self.recognised} lost answers recognised as our write, {self.mismatches} checksum mismatches), "
            f"{self.seconds:.2f} s"
        )


def measured(proxy: FaultProxy, schedule: FaultSchedule, work):
    """(work(), its Figures) with `schedule` in the proxy."""
    proxy.use(schedule)
    before = storage.retry_counts()
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    after, stats = storage.retry_counts(), proxy.stats()

    def delta(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    figures = Figures(
        stats["requests"],
        stats["faults"],
        delta("retry"),
        delta("write recognised"),
        delta("checksum mismatch"),
        seconds,
    )
    return result, figures


def report(scenario: str, clean: Figures, faulty: Figures) -> None:
    print(
        f"\n{scenario}\n  fault-free:   {clean.line()}\n  under faults: {faulty.line()}\n"
        f"  slowdown: {faulty.seconds / clean.seconds:.2f}x"
    )


# --- each operation against each fault kind ----------------------------------------------------------------------


def _every_operation(root: str) -> dict:
    """Single-shot and resumable writes, a conditional create and update, reads of both sizes, a paged listing,
    a copy, deletes; what each returned."""
    small = {f"small/{i:02d}.bin": os.urandom(200 + i) for i in range(30)}
    large = os.urandom(600 * KiB)  # resumable: three chunks; read back in three ranges
    for name, data in small.items():
        storage.write_bytes(storage.join(root, name), data)
    storage.write_bytes(storage.join(root, "large.bin"), large)
    index = storage.join(root, "index.json")
    storage.write_json(index, [1], if_generation_match=0)
    _, generation = storage.read_bytes_with_generation(index)
    storage.write_json(index, [1, 2], if_generation_match=generation)
    storage.copy(storage.join(root, "large.bin"), storage.join(root, "copy", "large.bin"))
    storage.delete_prefix(storage.join(root, "small", "1"))  # small/10..19
    return {
        "small": {
            n: storage.read_bytes(storage.join(root, n)) == d for n, d in small.items() if "/1" not in n
        },
        "large": storage.read_bytes(storage.join(root, "large.bin")) == large,
        "copy": storage.sha256_file(storage.join(root, "copy", "large.bin")) == storage.sha256_bytes(large),
        "index": storage.read_json(index),
        "listing": [storage.relative(f, root) for f in storage.list_files(root)],
    }


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_every_operation_survives_each_fault_kind(proxy, bucket, kind):
    clean, _ = measured(proxy, FaultSchedule(), lambda: _every_operation(f"{bucket}/clean"))
    got, figures = measured(
        proxy, FaultSchedule(seed=1, rate=0.15, kinds=(kind,)), lambda: _every_operation(f"{bucket}/faulty")
    )
    assert figures.faults.get(kind, 0) > 0, f"the schedule injected no {kind}"
    assert got == clean
    assert all(got["small"].values()) and got["large"] and got["copy"] and got["index"] == [1, 2]


# --- conditional writes, checksums, and faults that do not go away ------------------------------------------------


def test_a_conditional_write_whose_answer_was_lost_is_ours_not_a_conflict(proxy, bucket):
    uri = f"{bucket}/index.json"
    create, update = r"^POST /upload/\S*ifGenerationMatch=0\b", r"^POST /upload/\S*ifGenerationMatch=[1-9]"
    proxy.use(
        FaultSchedule(rules=[FaultRule("drop_response", create, 1), FaultRule("drop_response", update, 1)])
    )
    before = storage.retry_counts().get("write recognised", 0)

    storage.write_text(uri, "v1", if_generation_match=0)  # committed, answer dropped: the retry finds it ours
    data, generation = storage.read_bytes_with_generation(uri)
    storage.write_text(uri, "v2", if_generation_match=generation)  # the same for an update

    assert storage.read_text(uri) == "v2"
    assert storage.retry_counts().get("write recognised", 0) - before == 2
    assert [fault for method, _, fault in proxy.log if method == "POST"] == [
        "drop_response",
        None,
        "drop_response",
        None,
    ]
    with pytest.raises(PreconditionFailed, match="index.json"):  # a real conflict is still one
        storage.write_text(uri, "v3", if_generation_match=generation)
    assert storage.read_text(uri) == "v2"


def test_a_corrupted_download_is_retried_and_never_returned(proxy, bucket, tmp_path):
    uri = f"{bucket}/weights.bin"
    data = os.urandom(300 * KiB)  # two ranges
    storage.write_bytes(uri, data)
    # the first attempt's two ranges and the second's first: each attempt's whole object is checked once
    proxy.use(FaultSchedule(rules=[FaultRule("corrupt_download", "alt=media", times=3)]))
    before = storage.retry_counts().get("checksum mismatch", 0)
    assert storage.read_bytes(uri) == data
    assert storage.retry_counts().get("checksum mismatch", 0) - before == 2

    proxy.use(FaultSchedule(rules=[FaultRule("corrupt_download", "alt=media")]))
    with pytest.raises(
        StorageError, match=rf"{re.escape(uri)}: verified download failed .* checksum mismatch"
    ):
        storage.download_file(uri, tmp_path / "weights.bin")
    assert list(tmp_path.iterdir()) == []  # nothing returned, not even a temporary file


@pytest.mark.parametrize("kind", ["503", "stall", "reset_upload"])
def test_a_fault_that_does_not_go_away_fails_with_an_error_naming_the_uri(proxy, bucket, kind):
    uri = f"{bucket}/stuck/model.safetensors"
    proxy.use(FaultSchedule(rules=[FaultRule(kind, "stuck")]))  # the object's name, in the URL or the upload
    with storage.retry_policy_in_effect(dataclasses.replace(FAST_RETRIES, max_attempts=4)):
        with pytest.raises(StorageError, match=rf"^{re.escape(uri)}: upload failed 4 times"):
            storage.write_bytes(uri, b"weights")
        storage.write_bytes(f"{bucket}/free.txt", b"other objects still work")


def test_a_listing_resumes_at_the_failed_page(proxy, bucket):
    names = [f"{bucket}/many/{i:03d}.txt" for i in range(80)]  # four pages of 25
    for uri in names:
        storage.write_text(uri, "x")
    proxy.use(FaultSchedule(rules=[FaultRule("503", r"GET /storage/v1/b/\S+/o\?.*pageToken", times=2)]))
    assert storage.list_files(f"{bucket}/many") == names
    listed = [path for method, path, _ in proxy.log if method == "GET" and "prefix=many" in path]
    assert len(listed) == 4 + 2  # each page once, the failed one twice more; no listing started over


# --- 200 prior images written and read back -----------------------------------------------------------------------


@pytest.fixture
def cheap_sampling(monkeypatch):
    """Prior sampling without a pipeline: a deterministic 16x16 image per seed (storage is what is tested)."""
    import numpy as np
    from PIL import Image

    from dreambooth_lib import models
    from dreambooth_lib.models import sampling

    def sample(pipe, prompts, seeds, **kwargs):
        return [
            Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))
            for seed in seeds
        ]

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: object())
    monkeypatch.setattr(sampling, "sample_images", sample)


def _write_and_read_back(tiny_model: str, root: str, n: int) -> dict:
    made = prior.run(
        tiny_model, "dog", PriorConfig(num_images=n, steps=1, batch_size=4, guidance_scale=5.0), root, 16
    )
    images = prior.load_prior_images(made.uri, n)
    return {
        "images": [storage.read_bytes(uri) for uri in images],
        "names": [storage.relative(uri, root) for uri in images],
        "record": {k: v for k, v in storage.read_json(f"{made.uri}/prior_set.json").items() if k != "model"},
    }


def test_200_prior_images_under_faults(proxy, bucket, tiny_model, cheap_sampling):
    clean, clean_figures = measured(
        proxy, FaultSchedule(), lambda: _write_and_read_back(tiny_model, f"{bucket}/clean", 200)
    )
    got, figures = measured(
        proxy,
        FaultSchedule(seed=3, rate=TEN_PERCENT),
        lambda: _write_and_read_back(tiny_model, f"{bucket}/faulty", 200),
    )
    report("200 prior images written and read back", clean_figures, figures)
    assert set(figures.faults) == set(FAULT_KINDS)
    assert got == clean and len(got["images"]) == 200 and got["record"]["count"] == 200


def test_a_reader_sees_the_old_prior_set_or_the_new_one_never_a_mix(
    proxy, bucket, tiny_model, cheap_sampling
):
    root = f"{bucket}/priors"
    config = PriorConfig(num_images=40, steps=1, batch_size=4, guidance_scale=5.0)
    want = _write_and_read_back(tiny_model, f"{bucket}/reference", 80)["images"]
    made = prior.run(tiny_model, "dog", config, root, 16)
    proxy.use(FaultSchedule(seed=5, rate=TEN_PERCENT))
    seen, first_read, done = [], threading.Event(), threading.Event()

    def reader():
        while not done.is_set():
            images = prior.load_prior_images(made.uri)
            seen.append(len(images))
            assert (
                storage.read_bytes(images[-1]) == want[len(images) - 1]
            )  # the newest image it trusts is whole
            first_read.set()

    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(reader)
        first_read.wait(timeout=30)
        extended = prior.run(tiny_model, "dog", config.model_copy(update={"num_images": 80}), root, 16)
        done.set()
        reading.result()
    assert set(seen) <= {40, 80} and 40 in seen  # while images 40..79 were being written, the set was 40
    assert [storage.read_bytes(u) for u in prior.load_prior_images(extended.uri)] == want


# --- 16 concurrent registry publications ------------------------------------------------------------------------

WRITERS = 16


def _publish_16(root: str, models: list[str]) -> list[tuple[str, int, str]]:
    """16 writers at once (12 versions of one subject, 4 of another); (subject, version, tag) of each."""

    def register(i: int):
        subject, identifier = ("dog", "zwx") if i % 4 else ("cat", "qxv")
        m = register_fake(
            open_registry(root), models[i], subject=subject, identifier=identifier, lineage={"writer": i}
        )
        return m.subject, m.version, str(i)

    with ThreadPoolExecutor(WRITERS) as pool:
        return list(pool.map(register, range(WRITERS)))


def _published_state(root: str) -> dict:
    """What a reader trusts: each ready entry and the bytes of its files."""
    out = {}
    for m in open_registry(root).list_models():
        tag = json.loads(storage.read_text(f"{m.model_uri}/model_index.json"))["tag"]
        unet = storage.read_text(f"{m.model_uri}/unet/diffusion_pytorch_model.safetensors")
        assert unet == f"unet-weights-{tag}", f"{m.uri}: torn ({unet!r} beside tag {tag})"
        assert storage.read_json(m.lineage_uri)["version"] == m.version
        assert storage.read_text(m.card_uri)
        out[(m.subject, m.version)] = tag
    return out


def test_16_concurrent_registry_publications_under_faults(proxy, bucket, tmp_path):
    models = []
    for i in range(WRITERS):
        models.append(f"{bucket}/runs/{i}/model")
        storage.copy_prefix(fake_model_folder(tmp_path / str(i), str(i)), models[-1])

    clean, clean_figures = measured(proxy, FaultSchedule(), lambda: _publish_16(f"{bucket}/clean", models))
    reader_saw, done = [], threading.Event()

    def reader():  # a reader during the faulty publications: every version it lists is complete
        while not done.is_set():
            reader_saw.append(_published_state(f"{bucket}/faulty"))

    def publish_while_read():
        with ThreadPoolExecutor(1) as pool:
            reading = pool.submit(reader)
            try:
                return _publish_16(f"{bucket}/faulty", models)
            finally:
                done.set()
                reading.result()

    got, figures = measured(proxy, FaultSchedule(seed=7, rate=TEN_PERCENT), publish_while_read)
    report("16 concurrent registry publications", clean_figures, figures)

    proxy.use(FaultSchedule())
    for published in (got, clean):  # every writer has its own version, numbered 1..n per subject
        assert sorted((s, v) for s, v, _ in published) == sorted(
            [("dog", v) for v in range(1, 13)] + [("cat", v) for v in range(1, 5)]
        )
    state = _published_state(f"{bucket}/faulty")
    assert state == {(s, v): tag for s, v, tag in got}
    entries = storage.read_json(f"{bucket}/faulty/index.json")
    assert [e["status"] for e in entries] == ["ready"] * WRITERS  # no claim twice, none left pending
    assert len(reader_saw) > 1 and all(seen.items() <= state.items() for seen in reader_saw)


def test_a_registry_change_committed_under_a_lost_answer_is_applied_once(gcs_bucket, tmp_path, monkeypatch):
    """The case the write id cannot settle: our index write committed, its answer was lost, and another writer's
    change landed on top before the retry, so storage reports a conflict. The claim and the publication are still
    applied once: one version, published, beside the rival's entries."""
    root = f"{gcs_bucket}/registry"
    index = f"{root}/index.json"
    real_write = storage.write_bytes
    superseded: list[str] = []

    def committed_then_overwritten(uri, data, *, if_generation_match=None):
        real_write(uri, data, if_generation_match=if_generation_match)
        stage = "claim" if not superseded else "publication" if b'"ready"' in data else None
        if uri == index and stage and stage not in superseded:
            superseded.append(stage)
            entries = json.loads(storage.read_bytes(index))
            rival = {"subject": "cat", "version": len(superseded), "identifier": "abc", "base_model": "x"}
            real_write(index, json.dumps([*entries, {**rival, "status": "pending"}]).encode())
            raise PreconditionFailed(f"{index}: changed by another writer (generation precondition failed)")

    monkeypatch.setattr(storage, "write_bytes", committed_then_overwritten)
    m = register_fake(open_registry(root), fake_model_folder(tmp_path / "m", "0"))
    assert superseded == ["claim", "publication"]
    entries = storage.read_json(index)
    assert [(e["subject"], e["version"], e["status"]) for e in entries] == [
        ("dog", 1, "ready"),
        ("cat", 1, "pending"),
        ("cat", 2, "pending"),
    ]
    assert m.version == 1 and open_registry(root).show("dog").model_uri == m.model_uri


# --- training with checkpoints on gs://, and a resume -----------------------------------------------------------

TRAIN = tiny_train_config(mode="lora", steps=8, log_every=1, checkpoint_every=2, keep_checkpoints=2)
TRAIN = TRAIN.model_copy(update={"keep_checkpoints_on_success": True})
PREEMPT_AT = 5  # the 5th step is preempted: checkpoints 2 and 4 were written


def _preempted_then_resumed(tiny_model, data, out: Path, ckpt_root: str, preempted_at, proxy, torn_step=None):
    """Train until preempted at step 5, then resume; the resumed result. With `torn_step`, the faults of the
    first attempt include every write of that checkpoint's rng.safetensors failing for good."""
    schedule = proxy.schedule
    if torn_step is not None:
        torn = FaultRule("503", rf"step-{torn_step:07d}/rng\.safetensors")
        proxy.schedule = FaultSchedule(schedule.seed, schedule.rate, schedule.kinds, [torn])
    args = (tiny_model, *data, "sks", "square", TRAIN, str(out))
    preempted_at(PREEMPT_AT, train.run, *args, checkpoint_root=ckpt_root)
    (key,) = {storage.relative(f, ckpt_root).split("/")[0] for f in storage.list_files(ckpt_root)}
    newest = checkpoint.latest_checkpoint(storage.join(ckpt_root, key))
    proxy.schedule = FaultSchedule(schedule.seed + 1, schedule.rate, schedule.kinds)
    return train.run(*args, checkpoint_root=ckpt_root, resume=True), newest


def test_training_checkpoints_to_gcs_under_faults_and_resumes(
    proxy, bucket, tiny_model, train_data_dirs, preempted_at, tmp_path
):
    import torch
    from safetensors.torch import load_file

    from dreambooth_lib.artifacts import LORA_WEIGHTS_NAME

    clean, clean_figures = measured(
        proxy,
        FaultSchedule(),
        lambda: _preempted_then_resumed(
            tiny_model, train_data_dirs, tmp_path / "clean", f"{bucket}/clean", preempted_at, proxy
        ),
    )
    (got, newest), figures = measured(
        proxy,
        FaultSchedule(seed=11, rate=TEN_PERCENT),
        lambda: _preempted_then_resumed(
            tiny_model,
            train_data_dirs,
            tmp_path / "faulty",
            f"{bucket}/faulty",
            preempted_at,
            proxy,
            torn_step=4,
        ),
    )
    report(
        "training with gs:// checkpoints every 2 steps, preempted at step 5, resumed", clean_figures, figures
    )

    # training went on past the checkpoint it could not write; resume skipped it (no manifest) for step 2
    assert clean[1].endswith("step-0000004") and clean[0].resumed_from == 4
    assert newest.endswith("step-0000002") and got.resumed_from == 2
    assert got.losses == clean[0].losses
    faulty_lora, clean_lora = (
        load_file(tmp_path / run / "model" / LORA_WEIGHTS_NAME) for run in ("faulty", "clean")
    )
    assert faulty_lora.keys() == clean_lora.keys()
    assert all(torch.equal(faulty_lora[k], clean_lora[k]) for k in clean_lora)  # bit-identical
