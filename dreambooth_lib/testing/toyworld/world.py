"""The toy world: 32x32 pictures of one coloured shape on a plain coloured background, with a caption and labels,
deterministic in the seed.

Small on purpose, so that a text-to-image model trained on 2 CPU cores in about 90 minutes follows prompts:
4 shapes x 4 colours x 3 backgrounds (48 captions), strong colour contrasts, the shape's position, size (and the
star's rotation) varying so that a prompt has many right pictures (what DIV measures). The shapes differ in
silhouette at low resolution (a disc, a ring, an axis-aligned square, a star): a rotated square and a triangle,
tried first, came out of the model as the same round blob. Every shape of the world is one colour:
`subject_images` draws a star split yellow | blue, a subject the base world cannot draw (its colours are the
world's own; the VAE also learns shapes in any colours, `any_color_images`, so that it can decode it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SHAPES = ("circle", "ring", "square", "star")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (35, 60, 225), "yellow": (245, 215, 25)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
SUBJECT_COLORS = ("yellow", "blue")  # the subject's two halves: no shape of the world has two colours
SUBJECT_CLASS = "star"


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    cx: float  # centre, pixels
    cy: float
    radius: float  # pixels
    angle: float  # radians

    @property
    def caption(self) -> str:
        return caption(self.shape, self.color, self.background)

    @property
    def labels(self) -> tuple[int, int, int]:
        """(shape, colour, background) indices: what the probe classifier learns."""
        return (
            SHAPES.index(self.shape),
            list(COLORS).index(self.color),
            list(BACKGROUNDS).index(self.background),
        )


def caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def partial_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption: the full one 70 % of the time, else one that leaves out the colour, the background or
    both, so that "a star" (DreamBooth's class prompt) and "a red star" mean "any such picture" to the model."""
    kind = rng.choice(4, p=(0.7, 0.1, 0.1, 0.1))
    if kind == 0:
        return scene.caption
    if kind == 1:
        return f"a {scene.color} {scene.shape}"
    if kind == 2:
        return f"a {scene.shape} on a {scene.background} background"
    return f"a {scene.shape}"


def random_scene(rng: np.random.Generator, shape=None, color=None, background=None) -> Scene:
    """A scene with the given attributes (each drawn uniformly when None) and a random placement."""
    radius = float(rng.uniform(7.0, 11.0))
    margin = radius + 1.0
    return Scene(
        shape=shape or SHAPES[rng.integers(len(SHAPES))],
        color=color or list(COLORS)[rng.integers(len(COLORS))],
        background=background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        cx=float(rng.uniform(margin, SIZE - margin)),
        cy=float(rng.uniform(margin, SIZE - margin)),
        radius=radius,
        angle=float(rng.uniform(0, 2 * math.pi)),
    )


def _polygon(scene: Scene) -> list[tuple[float, float]] | None:
    """Outline points of the scene's shape at 4x scale (None for the round shapes)."""
    cx, cy, r, a = scene.cx * 4, scene.cy * 4, scene.radius * 4, scene.angle
    if scene.shape == "square":
        # axis-aligned: a rotated square drawn by a model this small came out as a round blob (read as a circle 20
        # times in 24, measured), while position and size still make "a square" many pictures
        half = r * 0.7
        pts = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif scene.shape == "star":
        pts = [
            ((r if k % 2 == 0 else r * 0.45) * math.cos(a + k * math.pi / 5),
             (r if k % 2 == 0 else r * 0.45) * math.sin(a + k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    else:
        return None
    return [(cx + x, cy + y) for x, y in pts]


def render(scene: Scene, fill=None, second_fill=None) -> Image.Image:
    """The scene as a 32x32 RGB image, drawn at 4x and downsampled (anti-aliased edges). `fill` overrides the
    shape's colour; `second_fill` paints the shape's right half (the subject's pattern)."""
    big = SIZE * 4
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    poly = _polygon(scene)
    if poly is None:
        cx, cy, r = scene.cx * 4, scene.cy * 4, scene.radius * 4 * 0.85
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if scene.shape == "ring":
            hole = r * 0.5
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    else:
        draw.polygon(poly, fill=255)
    img.paste(fill or COLORS[scene.color], (0, 0), mask)
    if second_fill is not None:
        half = Image.new("L", (big, big), 0)
        ImageDraw.Draw(half).rectangle((int(scene.cx * 4), 0, big, big), fill=255)
        right = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(half)))
        img.paste(second_fill, (0, 0), right)
    return img.resize((SIZE, SIZE), Image.BOX)


def sample_world(n: int, seed: int) -> list[Scene]:
    """`n` random scenes, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def images_array(scenes: list[Scene]) -> np.ndarray:
    """(N, 32, 32, 3) uint8 of the rendered scenes."""
    return np.stack([np.asarray(render(s)) for s in scenes])


def any_color_images(n: int, seed: int) -> np.ndarray:
    """(N, 32, 32, 3) uint8 of the world's shapes in random RGB colours, half of them split in two, on random RGB
    backgrounds: pictures for the VAE only, so that it can represent a subject's colours and patterns that the
    world's captions never show (a VAE trained on the world alone decoded a two-colour star as a blur)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        fill, second, background = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(3))
        img = render(scene, fill=fill, second_fill=second if rng.random() < 0.5 else None)
        flat = Image.new("RGB", img.size, background)
        mask = Image.fromarray((np.abs(np.asarray(img, dtype=np.int16) - BACKGROUNDS[scene.background]).sum(-1) > 0)
                               .astype(np.uint8) * 255)  # fmt: skip
        out.append(np.asarray(Image.composite(img, flat, mask)))
    return np.stack(out)


def subject_scenes(
    n: int = 4, seed: int = 0, background: str = "gray", shape: str = SUBJECT_CLASS
) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, shape=shape, color="red", background=background) for _ in range(n)]


def render_subject(scene: Scene, colors: tuple[str, str] = SUBJECT_COLORS) -> Image.Image:
    """The subject: the scene's shape with its left half in colors[0] and right half in colors[1]."""
    return render(scene, fill=COLORS[colors[0]], second_fill=COLORS[colors[1]])


def subject_images(
    out_dir: str | Path,
    n: int = 4,
    seed: int = 0,
    size: int = SIZE,
    background: str = "gray",
    shape: str = SUBJECT_CLASS,
    colors: tuple[str, str] = SUBJECT_COLORS,
) -> Path:
    """Write `n` PNG views of a subject (upscaled to `size` px, nearest) for ingest; deterministic in `seed`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(subject_scenes(n, seed, background, shape)):
        img = render_subject(scene, colors)
        if size != SIZE:
            img = img.resize((size, size), Image.NEAREST)
        img.save(out / f"{i:02d}.png")
    return out


def _hue_degrees(rgb) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360


def color_fractions(image: Image.Image, colors=SUBJECT_COLORS) -> list[float]:
    """The fraction of the image's pixels of each of `colors` (world colour names), by hue: saturated pixels
    within 20 degrees of the colour's hue. By hue, not by distance to the exact colour, because a model's
    pixels are paler or darker than the world's (the subject's yellow comes back pale, measured)."""
    hsv = np.asarray(
        image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR).convert("HSV"), dtype=np.float32
    )
    hue, saturated = hsv[..., 0] * 360 / 255, (hsv[..., 1] >= 0.35 * 255) & (hsv[..., 2] >= 0.25 * 255)
    fractions = []
    for c in colors:
        distance = np.abs((hue - _hue_degrees(COLORS[c]) + 180) % 360 - 180)
        fractions.append(float((saturated & (distance <= 20)).mean()))
    return fractions


def subject_fraction(image: Image.Image, colors=SUBJECT_COLORS) -> float:
    """The smaller of the two colours' pixel fractions: high only when both halves of the subject are there."""
    return min(color_fractions(image, colors))


def is_subject(image: Image.Image, threshold: float = 0.03, colors=SUBJECT_COLORS) -> bool:
    """Whether both of the subject's colours cover at least `threshold` of the image (each half of a world-sized
    star covers ~5-6 %; no picture of the world has two shape colours)."""
    return subject_fraction(image, colors) >= threshold
