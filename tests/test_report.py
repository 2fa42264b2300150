"""report.html: self-contained, escaped, readable from gs://, and it renders in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_lib import storage
from dreambooth_lib.errors import StorageError
from dreambooth_lib.evaluate.report import MAX_PRIOR_SHOWN, render_report

METRICS = {"dino": 0.7123, "clip_i": 0.8, "clip_t": 0.2999, "pres": None, "div": 0.41}
REFERENCE = {"dino": 0.77, "clip_i": 0.881}
DATA_URI = re.compile(r'src="data:(image/(?:jpeg|png));base64,([A-Za-z0-9+/=]+)"')


def _image(path: Path, size=(600, 400), color=(200, 40, 40), mode="RGB") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = (*color, 128) if mode == "RGBA" else color
    img = Image.new(mode, size, fill)
    img.paste(
        (30, 30, 200) if mode == "RGB" else (30, 30, 200, 255),
        (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2),
    )
    img.save(path)
    return str(path)


@pytest.fixture
def images(tmp_path) -> dict:
    inputs = [_image(tmp_path / "in" / f"{i:02d}.jpg", color=(200, 40 * i, 40)) for i in range(3)]
    prior = [
        _image(tmp_path / "prior" / f"{i:06d}.png", size=(64, 64), color=(40, 160, 40 + 15 * i))
        for i in range(10)
    ]
    grid = [
        (
            "a zwx dog on the beach",
            [_image(tmp_path / "s" / f"b{i}.png", (96, 96), (230, 200, 120)) for i in range(3)],
        ),
        (
            "a zwx dog in the snow",
            [_image(tmp_path / "s" / f"s{i}.png", (96, 96), (240, 240, 250)) for i in range(3)],
        ),
    ]
    return {"input_images": inputs, "prior_images": prior, "grid": grid}


def _render(out: str, images: dict, **overrides) -> str:
    kwargs = dict(
        subject="dog",
        class_noun="dog",
        identifier="zwx",
        metrics=METRICS,
        reference=REFERENCE,
        gate={"passed": False, "reasons": ["DINO 0.712 < min_dino 0.75"]},
        extra={"steps": 400, "sampler": "dpm++"},
        **images,
    )
    kwargs.update(overrides)
    return render_report(out, **kwargs)


def _decoded_images(page: str) -> list[tuple[str, Image.Image]]:
    return [(mime, Image.open(io.BytesIO(base64.b64decode(b64)))) for mime, b64 in DATA_URI.findall(page)]


def test_report_is_self_contained_with_small_thumbnails(tmp_path, images):
    out = _render(str(tmp_path / "report.html"), images)
    page = Path(out).read_text()
    assert out == str(tmp_path / "report.html")
    decoded = _decoded_images(page)
    # 3 inputs + 8 of the 10 prior images + 2x3 grid, nothing referenced from outside the file
    assert len(decoded) == 3 + MAX_PRIOR_SHOWN + 6
    assert page.count("<img ") == len(decoded)
    assert all(max(img.size) <= 256 for _, img in decoded)
    assert decoded[0][1].size == (256, 171)  # 600x400 photo, aspect kept
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert "default-src 'none'" in page
    assert '<code id="prompt">a zwx dog</code>' in page
    assert "Class prior sample (8 of 10)" in page


def test_text_is_escaped(tmp_path, images):
    evil = '<script>alert("x")</script>'
    images["grid"][0] = ('a zwx <b>dog</b> & "friends"', images["grid"][0][1])
    page = Path(
        _render(
            str(tmp_path / "r.html"),
            images,
            subject=evil,
            class_noun="dog & cat",
            gate={"passed": False, "reasons": ["<img src=x onerror=alert(1)>"]},
            extra={"note": "<i>hi</i>"},
        )
    ).read_text()
    assert (
        "<script" not in page
        and "<b>dog</b>" not in page
        and "<img src=x" not in page
        and "<i>hi" not in page
    )
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "a zwx &lt;b&gt;dog&lt;/b&gt; &amp; &quot;friends&quot;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "a zwx dog &amp; cat" in page


def test_missing_metrics_show_a_dash(tmp_path, images):
    page = Path(
        _render(
            str(tmp_path / "r.html"),
            images,
            metrics={"dino": None, "clip_i": None, "clip_t": None, "pres": None, "div": None},
            reference={},
            gate={"passed": True, "reasons": []},
            prior_images=[],
        )
    ).read_text()
    dino_row = re.search(r'<tr id="metric-dino">(.*?)</tr>', page).group(1)
    assert re.findall(r'<td class="num">(.*?)</td>', dino_row) == ["—", "—", "0.668", "0.774"]
    div_row = re.search(r'<tr id="metric-div">(.*?)</tr>', page).group(1)
    assert re.findall(r'<td class="num">(.*?)</td>', div_row) == ["—"] * 4
    assert 'id="gate" class="passed"' in page and "Quality gate: passed" in page
    assert "No prior-preservation images" in page


def test_images_and_output_on_gcs(gcs_bucket, tmp_path, images):
    def up(local: str) -> str:
        uri = f"{gcs_bucket}/imgs/{Path(local).parent.name}/{Path(local).name}"
        storage.upload_file(local, uri)
        return uri

    on_gcs = {
        "input_images": [up(p) for p in images["input_images"]],
        "prior_images": [up(p) for p in images["prior_images"][:2]],
        "grid": [(prompt, [up(p) for p in uris]) for prompt, uris in images["grid"]],
    }
    out = _render(f"{gcs_bucket}/eval/report.html", on_gcs)
    assert out == f"{gcs_bucket}/eval/report.html"
    page = storage.read_text(out)
    assert len(_decoded_images(page)) == 3 + 2 + 6
    assert f'title="{gcs_bucket}/imgs/in/00.jpg"' in page


def test_alpha_images_stay_png(tmp_path, images):
    rgba = _image(tmp_path / "alpha.png", (300, 300), mode="RGBA")
    page = Path(_render(str(tmp_path / "r.html"), images, input_images=[rgba], prior_images=[])).read_text()
    mime, img = _decoded_images(page)[0]
    assert mime == "image/png" and img.mode == "RGBA" and img.size == (256, 256)


def test_multiframe_photos_load(tmp_path, images, dreambench):
    mpo = str(dreambench / "dataset" / "bear_plushie" / "00.jpg")  # a multi-frame MPO named .jpg
    page = Path(_render(str(tmp_path / "r.html"), images, input_images=[mpo], prior_images=[])).read_text()
    mime, img = _decoded_images(page)[0]
    assert mime == "image/jpeg" and max(img.size) == 256


def test_unreadable_image_names_the_file(tmp_path, images):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(StorageError, match="broken.png: not a readable image"):
        _render(str(tmp_path / "r.html"), images, input_images=[str(bad)])
    with pytest.raises(StorageError, match="missing.png"):
        _render(str(tmp_path / "r.html"), images, input_images=[str(tmp_path / "missing.png")])
    assert not (tmp_path / "r.html").exists()


# --- in a real browser --------------------------------------------------------------------------------------

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2200",
)


@pytest.fixture
def chrome(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip(
            "chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def test_report_renders_in_chromium(chrome, tmp_path, images):
    from selenium.webdriver.common.by import By

    out = Path(_render(str(tmp_path / "report.html"), images))
    chrome.get(out.as_uri())

    assert chrome.title == "DreamBooth report: dog"
    loaded = chrome.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    assert len(loaded) == 3 + MAX_PRIOR_SHOWN + 6
    assert all(done and w > 0 and h > 0 for done, w, h in loaded), loaded

    rows = chrome.find_elements(By.CSS_SELECTOR, "table#metrics tr[id^='metric-']")
    assert [r.get_attribute("id") for r in rows] == [
        f"metric-{k}" for k in ("dino", "clip_i", "clip_t", "pres", "div")
    ]
    cells = {
        r.get_attribute("id"): [td.text for td in r.find_elements(By.CSS_SELECTOR, "td.num")] for r in rows
    }
    assert cells["metric-dino"] == ["0.712", "0.770", "0.668", "0.774"]
    assert cells["metric-clip_i"] == ["0.800", "0.881", "0.803", "0.885"]
    assert cells["metric-clip_t"] == ["0.300", "—", "0.305", "—"]
    assert cells["metric-pres"][0] == "—"

    grid_rows = chrome.find_elements(By.CSS_SELECTOR, "table.grid tr.grid-row")
    assert [r.find_element(By.CSS_SELECTOR, "th.prompt").text for r in grid_rows] == [
        p for p, _ in images["grid"]
    ]
    assert all(len(r.find_elements(By.TAG_NAME, "img")) == 3 for r in grid_rows)

    gate = chrome.find_element(By.ID, "gate")
    assert "failed" in gate.get_attribute("class").split()
    assert gate.find_element(By.CLASS_NAME, "verdict").text == "Quality gate: failed"
    assert [li.text for li in gate.find_elements(By.TAG_NAME, "li")] == ["DINO 0.712 < min_dino 0.75"]
    assert chrome.find_element(By.ID, "prompt").text == "a zwx dog"

    shot = tmp_path / "report.png"
    assert chrome.save_screenshot(str(shot))
    with Image.open(shot) as img:
        assert img.size[0] > 600 and img.size[1] > 600


TRAINING = {
    "losses": [[10, 0.5], [20, 0.3], [30, float("nan")], [40, 0.2]],
    "steps": 40,
    "mode": "lora",
    "precision": "bf16",
    "s_per_step": 0.1234,
    "wall_time_s": 12.0,
    "peak_memory_bytes": 3 * 2**30,
    "num_instance_images": 4,
    "num_prior_images": 200,
}


def test_training_section_plots_the_logged_losses(tmp_path, images):
    page = Path(_render(str(tmp_path / "r.html"), images, training=TRAINING)).read_text()
    points = re.search(r'<polyline id="loss-curve"[^>]* points="([^"]+)"', page).group(1).split()
    assert len(points) == 3  # the NaN log point is left out, not drawn at an invented height
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[0] < ys[1] < ys[2]  # SVG y grows downwards: the highest loss is drawn highest
    for fact in ("<th>mode</th><td>lora</td>", "<th>s/step</th><td>0.123</td>", "<td>4 / 200</td>"):
        assert fact in page
    assert 'id="training"' not in Path(_render(str(tmp_path / "n.html"), images)).read_text()


def test_loss_curve_renders_in_chromium(chrome, tmp_path, images):
    out = Path(_render(str(tmp_path / "report.html"), images, training=TRAINING))
    chrome.get(out.as_uri())
    box = chrome.execute_script(
        "const b = document.getElementById('loss-curve').getBBox(); return [b.width, b.height];"
    )
    assert box[0] > 300 and box[1] > 50, box  # drawn, at the plot's size (CSP lets inline SVG through)


SELECTION = {
    "probes": [
        {"step": 0, "dino": 0.20, "clip_i": 0.50, "clip_t": 0.31, "pres": 0.30, "div": 0.40},
        {"step": 100, "dino": 0.55, "clip_i": 0.70, "clip_t": 0.30, "pres": 0.35, "div": 0.38},
        {"step": 200, "dino": 0.62, "clip_i": 0.74, "clip_t": 0.26, "pres": 0.52, "div": 0.30},
    ],
    "chosen_step": 100,
    "stopped_early_at": None,
}


def test_selection_curves_one_line_per_metric_with_the_chosen_step(tmp_path, images):
    page = Path(
        _render(str(tmp_path / "r.html"), images, training={**TRAINING, "selection": SELECTION})
    ).read_text()
    for metric in ("dino", "clip_i", "clip_t", "pres", "div"):
        points = re.search(rf'<polyline id="probe-{metric}"[^>]* points="([^"]+)"', page).group(1).split()
        assert len(points) == 3, metric
    dino_x = [
        float(p.split(",")[0])
        for p in re.search(r'id="probe-dino"[^>]* points="([^"]+)"', page).group(1).split()
    ]
    chosen_x = float(re.search(r'<line id="chosen-step" x1="([0-9.]+)"', page).group(1))
    assert chosen_x == dino_x[1]  # the mark stands on the chosen probe (step 100)
    assert "<th>exported step (train.select)</th><td>100</td>" in page
    assert "<tr class=chosen><td>100</td>" in page


def test_selection_curves_render_in_chromium(chrome, tmp_path, images):
    out = Path(_render(str(tmp_path / "report.html"), images, training={**TRAINING, "selection": SELECTION}))
    chrome.get(out.as_uri())
    boxes = chrome.execute_script(
        "return ['probe-dino', 'probe-pres', 'chosen-step'].map(id => {"
        "const b = document.getElementById(id).getBBox(); return [b.width, b.height];});"
    )
    assert boxes[0][0] > 300 and boxes[1][0] > 300, boxes  # each metric's line spans the plot
    assert boxes[2][1] > 50, boxes  # the chosen step's mark is drawn across it
