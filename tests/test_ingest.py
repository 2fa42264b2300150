"""ingest: real DreamBench photos (MPO, a shifted duplicate) and one generated broken file per failure kind."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import _ingest_corpus as corpus
import numpy as np
import pytest
from PIL import Image

from dreambooth_lib import ingest, storage
from dreambooth_lib.config import IngestConfig
from dreambooth_lib.errors import IngestError

RES = 64


def cfg(**kwargs) -> IngestConfig:
    return IngestConfig(resolution=RES, **kwargs)


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def good(n: int, start: int = 0) -> dict[str, bytes]:
    """n distinct valid photos named 00.jpg, 01.jpg, ..."""
    return {f"{i:02d}.jpg": corpus.jpeg(start + i) for i in range(n)}


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def only_rejection(result: ingest.IngestResult, name: str) -> ingest.Rejection:
    matches = [r for r in result.rejections if storage.basename(r.source) == name]
    assert len(result.rejections) == 1 and len(matches) == 1, result.rejections
    return matches[0]


def run_with_one_bad(tmp_path: Path, name: str, data: bytes, **kwargs) -> ingest.IngestResult:
    src = make_folder(tmp_path / "src", {**good(3), name: data})
    result = ingest.run(str(src), str(tmp_path / "out"), cfg(**kwargs))
    assert len(result.images) == 3
    return result


# --- real photos -----------------------------------------------------------------------------------------------


def test_dreambench_dog_is_ingested_as_square_pngs_with_a_manifest(dreambench, tmp_path):
    out = tmp_path / "ingest"
    result = ingest.run(str(dreambench / "dataset" / "dog"), str(out), cfg())

    assert [img.file for img in result.images] == [f"{i:02d}.png" for i in range(5)]
    assert [storage.basename(img.source) for img in result.images] == [f"{i:02d}.jpg" for i in range(5)]
    assert result.rejections == [] and result.warnings == []
    assert all(img.fixups == [] for img in result.images)
    assert result.images[4].original_size == (687, 687)
    for img in result.images:
        data = (out / img.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == img.sha256
        src_bytes = Path(img.source).read_bytes()
        assert hashlib.sha256(src_bytes).hexdigest() == img.source_sha256
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (RES, RES))
    assert sorted(p.name for p in out.iterdir()) == [f"{i:02d}.png" for i in range(5)] + ["manifest.json"]
    assert ingest.load_manifest(str(out)) == result
    assert ingest.instance_image_uris(str(out)) == [str(out / f"{i:02d}.png") for i in range(5)]
    expected = hashlib.sha256("".join(f"{i.file}\0{i.sha256}\n" for i in result.images).encode()).hexdigest()
    assert result.digest == expected


def test_dreambench_mpo_photos_use_their_first_frame(dreambench, tmp_path):
    src = dreambench / "dataset" / "bear_plushie"
    with Image.open(src / "00.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2  # the premise: phone photos with a second frame
    result = ingest.run(str(src), str(tmp_path / "out"), cfg())
    assert len(result.images) == 5
    assert all(img.fixups == ["mpo_first_frame"] for img in result.images)
    assert all(img.original_size == (2048, 2048) for img in result.images)


def test_dreambench_cat_shifted_copy_is_a_near_duplicate(dreambench, tmp_path):
    # cat/02 and cat/03 are one shot framed 28% apart: pHash distance 34, so only the alignment check sees it.
    result = ingest.run(str(dreambench / "dataset" / "cat"), str(tmp_path / "out"), cfg())
    assert [storage.basename(i.source) for i in result.images] == ["00.jpg", "01.jpg", "02.jpg", "04.jpg"]
    rejection = only_rejection(result, "03.jpg")
    assert rejection.reason.startswith("near duplicate of 02.jpg: the same photo cropped at another offset")
    assert storage.basename(rejection.duplicate_of) == "02.jpg"
    # ... and the default pHash threshold keeps every distinct photo of the subject apart
    phashes = [
        int(a.phash, 16) ^ int(b.phash, 16) for a in result.images for b in result.images if a is not b
    ]
    assert min(bin(x).count("1") for x in phashes) > IngestConfig().near_duplicate_distance


# --- one test per failure kind ---------------------------------------------------------------------------------


def test_empty_file_is_rejected(tmp_path):
    rejection = only_rejection(run_with_one_bad(tmp_path, "zz.jpg", b""), "zz.jpg")
    assert rejection.reason == "empty file (0 bytes)"


def test_html_saved_as_jpg_is_rejected_as_not_an_image(tmp_path):
    rejection = only_rejection(run_with_one_bad(tmp_path, "dog.jpg", corpus.html_page()), "dog.jpg")
    assert rejection.reason.startswith("not an image: the content is HTML")


def test_truncated_jpeg_is_rejected(tmp_path):
    rejection = only_rejection(run_with_one_bad(tmp_path, "cut.jpg", corpus.truncated_jpeg(9)), "cut.jpg")
    assert rejection.reason.startswith("truncated or corrupt image data")
    assert "truncated" in rejection.reason


def test_decompression_bomb_is_rejected_without_changing_pillow_globals(tmp_path):
    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    files = {**good(3, start=10), "huge.png": corpus.png(1, 400, 400)}  # 160,000 px; the good ones are 90,000
    src = make_folder(tmp_path / "src", files)
    result = ingest.run(str(src), str(tmp_path / "out"), cfg(max_pixels=100_000))
    rejection = only_rejection(result, "huge.png")
    assert rejection.reason.startswith("decompression bomb:")
    assert "160000 pixels" in rejection.reason and "max_pixels" in rejection.reason
    assert Image.MAX_IMAGE_PIXELS == before_limit and warnings.filters == before_filters


def test_too_small_image_is_rejected(tmp_path):
    small = corpus.jpeg(20, width=400, height=200)
    rejection = only_rejection(run_with_one_bad(tmp_path, "small.jpg", small, min_side=256), "small.jpg")
    assert rejection.reason.startswith("too small: 400x200, shorter side 200 px < min_side=256")


def test_exact_duplicate_keeps_the_first_in_sorted_order(tmp_path):
    result = run_with_one_bad(tmp_path, "zz_copy.jpg", corpus.jpeg(2))  # same bytes as 02.jpg
    rejection = only_rejection(result, "zz_copy.jpg")
    assert rejection.reason == "exact duplicate of 02.jpg (same bytes)"
    assert storage.basename(rejection.duplicate_of) == "02.jpg"


def test_near_duplicate_is_rejected_by_perceptual_hash(tmp_path):
    result = run_with_one_bad(tmp_path, "resaved.jpg", corpus.near_copy(1))  # 01.jpg resized and re-encoded
    rejection = only_rejection(result, "resaved.jpg")
    assert rejection.reason.startswith("near duplicate of 01.jpg (perceptual-hash distance")
    assert rejection.reason.endswith("<= near_duplicate_distance=6)")


def test_shifted_crop_of_one_photo_is_a_near_duplicate(tmp_path):
    first, second = corpus.shifted_crops(30)
    src = make_folder(tmp_path / "src", {**good(3), "a.png": first, "b.png": second})
    result = ingest.run(str(src), str(tmp_path / "out"), cfg())
    assert len(result.images) == 4
    rejection = only_rejection(result, "b.png")
    assert rejection.reason.startswith("near duplicate of a.png: the same photo cropped at another offset")
    assert "shifted 27% across, 0% down" in rejection.reason


@pytest.mark.parametrize(
    ("make", "fixups"),
    [
        (corpus.cmyk_jpeg, ["cmyk_to_rgb"]),
        (corpus.palette_png, ["palette_to_rgb"]),
        (corpus.rgba_png, ["alpha_on_white"]),
        (corpus.la_png, ["alpha_on_white"]),
        (corpus.gray16_png, ["16bit_to_8bit", "grayscale_to_rgb"]),
        (corpus.rgb16_png, ["16bit_to_8bit"]),
    ],
    ids=["cmyk", "palette", "rgba", "la", "gray16", "rgb16"],
)
def test_unusual_modes_are_accepted_as_rgb_with_their_fixup(tmp_path, make, fixups):
    src = make_folder(
        tmp_path / "src", {"00.img": make(40), "01.jpg": corpus.jpeg(1), "02.jpg": corpus.jpeg(2)}
    )
    out = tmp_path / "out"
    result = ingest.run(str(src), str(out), cfg())
    assert result.rejections == []
    assert result.images[0].fixups == fixups
    with Image.open(out / "00.png") as im:
        assert (im.mode, im.size) == ("RGB", (RES, RES))
        arr = np.asarray(im)
    if fixups == ["alpha_on_white"]:  # the transparent left third is white, not the black under the alpha
        assert arr[:, :15].min() >= 250
    else:  # the picture survived the conversion: not flat, not black
        assert arr.std() > 20 and 30 < arr.mean() < 225


def test_exif_orientation_is_applied(tmp_path):
    src = make_folder(
        tmp_path / "src",
        {"00.jpg": corpus.rotated_jpeg(), "01.jpg": corpus.jpeg(1), "02.jpg": corpus.jpeg(2)},
    )
    out = tmp_path / "out"
    result = ingest.run(str(src), str(out), cfg(min_side=256))
    first = result.images[0]
    assert first.fixups == ["exif_transpose"] and first.original_size == (400, 300)
    with Image.open(out / "00.png") as im:
        corners = [im.getpixel((x, y)) for y in (4, RES - 5) for x in (4, RES - 5)]
    # stored landscape, red left and blue right; upright it is portrait, red on top and blue below
    red, blue = (lambda p: p[0] > 180 and p[2] < 80), (lambda p: p[2] > 180 and p[0] < 80)
    assert [red(p) for p in corners] == [True, True, False, False]
    assert [blue(p) for p in corners] == [False, False, True, True]


# --- policies --------------------------------------------------------------------------------------------------


def test_strict_mode_fails_on_any_bad_file_and_writes_nothing(tmp_path):
    src = make_folder(tmp_path / "src", {**good(4), "broken.jpg": corpus.truncated_jpeg(7)})
    out = tmp_path / "out"
    with pytest.raises(IngestError) as err:
        ingest.run(str(src), str(out), cfg(strict=True))
    msg = str(err.value)
    assert msg.startswith(
        f"{src}: strict mode: 1 file(s) rejected: broken.jpg: truncated or corrupt image data"
    )
    assert not out.exists()


def test_too_few_images_names_the_source_count_and_rejections(tmp_path):
    src = make_folder(tmp_path / "src", {**good(2), "page.jpg": corpus.html_page()})
    out = tmp_path / "out"
    with pytest.raises(IngestError) as err:
        ingest.run(str(src), str(out), cfg())
    msg = str(err.value)
    assert msg.startswith(f"{src}: too few images: 2 usable image(s), need min_images=3")
    assert "page.jpg: not an image" in msg and "allow_few" in msg
    assert not out.exists()


def test_allow_few_accepts_two_images_with_a_warning(tmp_path):
    src = make_folder(tmp_path / "src", good(2))
    out = tmp_path / "out"
    result = ingest.run(str(src), str(out), cfg(allow_few=True))
    assert len(result.images) == 2
    assert len(result.warnings) == 1 and result.warnings[0].startswith(
        "only 2 usable image(s) (min_images=3)"
    )
    assert ingest.load_manifest(str(out)).warnings == result.warnings


def test_no_usable_image_is_an_error_even_with_allow_few(tmp_path):
    src = make_folder(tmp_path / "src", {"a.jpg": b"", "b.jpg": corpus.html_page()})
    with pytest.raises(IngestError, match=r"no usable images \(0 usable image\(s\)"):
        ingest.run(str(src), str(tmp_path / "out"), cfg(allow_few=True))


def test_hidden_files_and_a_manifest_in_the_source_are_ignored(tmp_path):
    src = make_folder(
        tmp_path / "src", {**good(3), ".DS_Store": b"\0\0\0\1Bud1", "manifest.json": b"{}", "._00.jpg": b"x"}
    )
    result = ingest.run(str(src), str(tmp_path / "out"), cfg())
    assert len(result.images) == 3 and result.rejections == []


def test_output_into_the_source_folder_is_refused(tmp_path):
    src = make_folder(tmp_path / "src", {f"{i:02d}.png": corpus.png(i) for i in range(3)})
    before = tree_digest(src)
    with pytest.raises(IngestError, match="the output folder is the source folder"):
        ingest.run(str(src), str(src) + "/", cfg())
    assert tree_digest(src) == before


def test_input_folder_is_never_modified(tmp_path):
    src = make_folder(
        tmp_path / "src", {**good(3), "bad.jpg": corpus.truncated_jpeg(3), "c.png": corpus.rgba_png(5)}
    )
    before = tree_digest(src)
    ingest.run(str(src), str(tmp_path / "out"), cfg())
    assert tree_digest(src) == before


def test_reingest_removes_stale_images_and_a_failed_run_keeps_the_old_set(tmp_path):
    out = tmp_path / "out"
    ingest.run(str(make_folder(tmp_path / "five", good(5))), str(out), cfg())
    (out / "notes.txt").write_text("mine")
    second = ingest.run(str(make_folder(tmp_path / "three", good(3, start=20))), str(out), cfg())
    assert sorted(p.name for p in out.iterdir()) == [
        "00.png",
        "01.png",
        "02.png",
        "manifest.json",
        "notes.txt",
    ]
    assert [i.sha256 for i in second.images] == [
        hashlib.sha256((out / i.file).read_bytes()).hexdigest() for i in second.images
    ]

    before = tree_digest(out)
    with pytest.raises(IngestError):
        ingest.run(str(make_folder(tmp_path / "one", good(1, start=40))), str(out), cfg())
    assert tree_digest(out) == before


def test_same_photos_give_the_same_digest(tmp_path):
    src = make_folder(tmp_path / "src", good(3))
    a = ingest.run(str(src), str(tmp_path / "a"), cfg())
    b = ingest.run(str(src), str(tmp_path / "b"), cfg())
    c = ingest.run(str(src), str(tmp_path / "c"), cfg(min_side=100))  # settings that do not change pixels
    other = ingest.run(str(src), str(tmp_path / "d"), IngestConfig(resolution=32))
    assert a.digest == b.digest == c.digest != other.digest


def test_load_manifest_without_an_ingest_says_to_run_it(tmp_path):
    with pytest.raises(IngestError, match=r"no manifest\.json; run `dreambooth ingest SRC .*` first"):
        ingest.load_manifest(str(tmp_path / "empty"))
    with pytest.raises(IngestError, match="no manifest.json"):
        ingest.instance_image_uris(str(tmp_path / "empty"))


def test_gcs_round_trip(gcs_bucket):
    files = {**good(3), "broken.jpg": b""}
    for name, data in files.items():
        storage.write_bytes(f"{gcs_bucket}/photos/{name}", data)
    out = f"{gcs_bucket}/run/ingest"
    result = ingest.run(f"{gcs_bucket}/photos", out, cfg())
    assert [i.source for i in result.images] == [f"{gcs_bucket}/photos/{i:02d}.jpg" for i in range(3)]
    assert only_rejection(result, "broken.jpg").reason == "empty file (0 bytes)"
    assert storage.list_files(out) == [f"{out}/{n}" for n in ("00.png", "01.png", "02.png", "manifest.json")]
    assert ingest.load_manifest(out) == result
    uris = ingest.instance_image_uris(out)
    assert uris == [f"{out}/{i:02d}.png" for i in range(3)]
    for uri, img in zip(uris, result.images, strict=True):
        data = storage.read_bytes(uri)
        assert hashlib.sha256(data).hexdigest() == img.sha256
        assert Image.open(io.BytesIO(data)).size == (RES, RES)
    assert all(storage.read_bytes(f"{gcs_bucket}/photos/{n}") == d for n, d in files.items())
