"""Evaluation: sample the paper's prompts, score DINO / CLIP-I / CLIP-T / PRES / DIV, gate, and report."""

from dreambooth_lib.evaluate.evaluation import (
    BASE_DIR,
    METRIC_KEYS,
    METRICS_NAME,
    PRES_DIR,
    REPORT_NAME,
    EvalResult,
    GateVerdict,
    PromptMetrics,
    eval_templates,
    evaluate_gate,
    load_metrics,
    prompt_slug,
    real_image_uris,
    run,
    training_summary_of,
)
