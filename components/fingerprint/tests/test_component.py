"""fingerprint_inputs: digests follow content, not paths."""

import shutil

from components.fingerprint.component import fingerprint_inputs


def test_digests_follow_content(tiny_model_dir, photos, tmp_path):
    model_digest, photos_digest = fingerprint_inputs.python_func(
        base_model=tiny_model_dir, images_uri=str(photos)
    )
    moved = shutil.copytree(photos, tmp_path / "elsewhere")
    assert (
        fingerprint_inputs.python_func(base_model=tiny_model_dir, images_uri=str(moved))[1] == photos_digest
    )
    (moved / "00.png").write_bytes((photos / "01.png").read_bytes())
    assert (
        fingerprint_inputs.python_func(base_model=tiny_model_dir, images_uri=str(moved))[1] != photos_digest
    )
    assert len(model_digest) == 64


def test_local_run(local_kfp, tiny_model_dir, photos):
    task = fingerprint_inputs(base_model=tiny_model_dir, images_uri=str(photos))
    assert task.outputs["images_digest"] == fingerprint_inputs.python_func(tiny_model_dir, str(photos))[1]
