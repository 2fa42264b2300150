"""summarize_batch: a row per manifest subject, finished or not, in Markdown and HTML."""

import json
from pathlib import Path

from kfp.dsl import HTML, Markdown, PipelineTaskFinalStatus

from components.batch_summary.component import summarize_batch
from components.conftest import artifact


def test_summary_table(tmp_path):
    manifest = tmp_path / "m.json"
    names = ["ok-one", "gated", "crashed"]
    manifest.write_text(json.dumps([{"name": n, "class_noun": "dog", "images": "x"} for n in names]))
    status = tmp_path / "b" / "j1" / "status"
    status.mkdir(parents=True)
    ok = {"subject": "ok-one", "class_noun": "dog", "identifier": "zwx", "status": "registered",
          "metrics": {"dino": 0.61, "clip_i": 0.7, "clip_t": 0.3}, "gate": {"passed": True, "reasons": []},
          "registered": {"uri": "gs://r/ok-one/1"}, "report_html": "gs://b/ok-one/eval/report.html"}  # fmt: skip
    gated = {"subject": "gated", "status": "gate failed", "error": "DINO 0.1 < 0.5",
             "gate": {"passed": False, "reasons": ["DINO 0.1 < 0.5"]}}  # fmt: skip
    (status / "ok-one.json").write_text(json.dumps(ok))
    (status / "gated.json").write_text(json.dumps(gated))
    final = PipelineTaskFinalStatus(
        state="FAILED", pipeline_job_resource_name="r", pipeline_task_name="batch", error_code=1,
        error_message="pod evicted",
    )  # fmt: skip
    md, page = artifact(Markdown, tmp_path / "s.md"), artifact(HTML, tmp_path / "s.html")
    summarize_batch.python_func(
        manifest_uri=str(manifest), batch_root=str(tmp_path / "b"), job_id="j1", final_status=final,
        summary=md, summary_html=page,
    )  # fmt: skip
    table = Path(md.path).read_text()
    assert "1 of 3 subjects succeeded" in table
    assert (
        "| ok-one | dog | zwx | registered | 0.610 | 0.700 | 0.300 |  | passed | gs://r/ok-one/1 |" in table
    )
    assert "gate failed (DINO 0.1 < 0.5)" in table and "failed: DINO 0.1 < 0.5" in table
    assert "| crashed |" in table and "did not finish: pod evicted" in table
    assert "<td>ok-one</td>" in Path(page.path).read_text()
    assert (tmp_path / "b" / "j1" / "summary.md").read_text() == table
