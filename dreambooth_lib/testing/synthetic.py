"""A synthetic subject for demos and tests: a coloured square on a lightly noisy grey background (no downloads)."""

from __future__ import annotations

from pathlib import Path


def make_subject_images(
    out_dir: str | Path, n: int = 4, size: int = 288, color=(220, 30, 30), seed: int = 0
) -> Path:
    """Write `n` PNG photos of one square subject at shifting positions and sizes, deterministic in `seed`."""
    import numpy as np
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.full((size, size, 3), 128, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
        side = size // 2 + int(rng.integers(-size // 10, size // 10))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        img[y0 : y0 + side, x0 : x0 + side] = color
        Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(out / f"{i:02d}.png")
    return out
