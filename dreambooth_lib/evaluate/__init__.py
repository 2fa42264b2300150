"""Evaluation: sample the paper's prompts, score DINO / CLIP-I / CLIP-T / PRES / DIV, gate, and report.

One concept a module: `evaluation` (the step), `prompts`, `samples` (sampling and saving the images),
`embedders` (DINO, CLIP), `scores` (the metrics), `lpips`, `gate`, `paper` (the paper's numbers), `report`.
"""

from dreambooth_lib.evaluate.evaluation import (
    BASE_DIR,
    METRIC_KEYS,
    METRICS_NAME,
    PRES_DIR,
    REPORT_NAME,
    EvalResult,
    PromptMetrics,
    load_metrics,
    real_image_uris,
    run,
    training_summary_of,
)
from dreambooth_lib.evaluate.gate import GateVerdict, evaluate_gate
from dreambooth_lib.evaluate.prompts import eval_templates
