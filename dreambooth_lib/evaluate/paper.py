"""The paper's published evaluation numbers (Ruiz et al. 2023), the yardstick metrics.json and the reports show
a model's metrics against: Table 1 (DreamBench, 30 subjects x 25 prompts x 4 images) and Table 3 (PRES / DIV,
Imagen)."""

from __future__ import annotations

PAPER_REFERENCE: dict[str, dict[str, float]] = {
    # real images of the subject against each other: the ceiling a generator can reach on subject fidelity
    # (CLIP-T has no real-image counterpart)
    "real_images": {"dino": 0.774, "clip_i": 0.885},
    "dreambooth_stable_diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "dreambooth_imagen": {"dino": 0.696, "clip_i": 0.812, "clip_t": 0.306},
    "prior_preservation_imagen": {
        "pres_with_ppl": 0.493,
        "pres_without_ppl": 0.664,
        "div_with_ppl": 0.391,
        "div_without_ppl": 0.371,
    },
}
# the two rows the metric tables show beside a model's numbers
PAPER_SD_DREAMBOOTH = PAPER_REFERENCE["dreambooth_stable_diffusion"]
PAPER_REAL_IMAGES = PAPER_REFERENCE["real_images"]
