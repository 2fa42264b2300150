"""check_batch: a batch whose every subject failed fails its run (with each reason); a partial success does not."""

import json
from pathlib import Path

import pytest

from components.batch_summary.component import check_batch, summarize_batch
from dreambooth_lib.runs.batch.verdict import BatchFailed


def _batch(tmp_path: Path, statuses: dict[str, dict], manifest_names: list[str]) -> tuple[str, str]:
    """(manifest_uri, batch_root) with the given status records written as the subjects would."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"name": n, "class_noun": "dog", "images": "x"} for n in manifest_names]))
    status_dir = tmp_path / "batch" / "j1" / "status"
    status_dir.mkdir(parents=True)
    for name, record in statuses.items():
        (status_dir / f"{name}.json").write_text(json.dumps({"subject": name, **record}))
    return str(manifest), str(tmp_path / "batch")


def test_every_subject_failed_fails_with_each_reason(tmp_path):
    manifest, root = _batch(
        tmp_path,
        {
            "rex": {"status": "failed", "error": "ingest: 2 usable photos, need 3"},
            "bag": {"status": "gate failed", "error": "DINO 0.12 < 0.5"},
        },
        ["rex", "bag", "toy"],
    )
    with pytest.raises(BatchFailed) as err:
        check_batch.python_func(manifest_uri=manifest, batch_root=root, job_id="j1")
    message = str(err.value)
    assert message.startswith("Batch j1: 0 of 3 subjects succeeded, so the batch failed")
    assert "rex: failed (ingest: 2 usable photos, need 3)" in message
    assert "bag: gate failed (DINO 0.12 < 0.5)" in message
    assert "toy: not finished" in message, "a manifest subject without a record counts as failed"
    assert message.endswith(f"every subject's row is in {root}/j1/summary.md")


def test_a_partial_success_passes_and_says_how_many(tmp_path):
    manifest, root = _batch(
        tmp_path, {"rex": {"status": "registered"}, "bag": {"status": "failed", "error": "x"}}, ["rex", "bag"]
    )
    line = check_batch.python_func(manifest_uri=manifest, batch_root=root, job_id="j1")
    assert line == "Batch j1: 1 of 2 subjects succeeded"


def test_no_subject_at_all_fails_and_many_failures_are_shortened(tmp_path):
    from dreambooth_lib.runs.batch.verdict import verdict

    with pytest.raises(BatchFailed, match="no subject to run"):
        verdict([], job_id="j1")
    names = [f"s{i}" for i in range(8)]
    with pytest.raises(
        BatchFailed, match=r"s4: not finished \(did not finish \(see the pipeline run\)\); and 3 more"
    ):
        verdict([], names, job_id="j1")


def test_through_kfp_local_the_run_fails_and_the_summary_is_still_written(tmp_path, local_kfp):
    """The shape batch_personalize uses: the verdict inside the exit handler, the summary as its exit task."""
    from kfp import dsl

    @dsl.pipeline
    def verdict_in_exit_handler(manifest_uri: str, batch_root: str):
        summary = summarize_batch(manifest_uri=manifest_uri, batch_root=batch_root, job_id="j1")
        with dsl.ExitHandler(summary, name="batch"):
            check_batch(manifest_uri=manifest_uri, batch_root=batch_root, job_id="j1")

    failed = tmp_path / "failed"
    manifest, root = _batch(failed, {"rex": {"status": "failed", "error": "too few photos"}}, ["rex"])
    with pytest.raises(RuntimeError, match="Inner task failed: .*check-batch"):
        verdict_in_exit_handler(manifest_uri=manifest, batch_root=root)
    assert "0 of 1 subjects succeeded" in (Path(root) / "j1" / "summary.md").read_text()

    partial = tmp_path / "partial"
    manifest, root = _batch(
        partial, {"rex": {"status": "registered"}, "bag": {"status": "failed"}}, ["rex", "bag"]
    )
    verdict_in_exit_handler(manifest_uri=manifest, batch_root=root)  # Succeeded: no exception
    assert "1 of 2 subjects succeeded" in (Path(root) / "j1" / "summary.md").read_text()
