"""The quality gate: the configured thresholds checked against an evaluation's metrics, and the verdict.

A failing gate is recorded, not raised: evaluate writes the verdict into metrics.json and the register step
refuses the model (GateFailed) by reading it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from dreambooth_lib.config import GateConfig


class GateVerdict(BaseModel):
    """The quality gate's decision: each configured check with its value, and why it failed (if it did)."""

    passed: bool
    reasons: list[str] = Field(default_factory=list)
    checks: list[dict[str, Any]] = Field(default_factory=list)


# (gate field, metric key, comparison, label, what to do when the metric was not computed)
THRESHOLDS = (
    ("min_dino", "dino", ">=", "DINO", ""),
    ("min_clip_i", "clip_i", ">=", "CLIP-I", ""),
    ("min_clip_t", "clip_t", ">=", "CLIP-T", ""),
    ("max_pres", "pres", "<=", "PRES", "set eval.pres_images above 0"),
    ("min_div", "div", ">=", "DIV", "set eval.lpips_weights and images_per_prompt >= 2"),
)


def _threshold_check(
    metrics: dict, gate: GateConfig, threshold_row: tuple
) -> tuple[dict[str, Any], str | None]:
    """One configured threshold: its check record and the reason it failed (None when it passed)."""
    field, key, op, label, hint = threshold_row
    threshold = getattr(gate, field)
    value = metrics.get(key)
    reason = None
    if value is None:
        passed = False
        reason = (
            f"{label} was not computed, so gate.{field} cannot be checked: {hint or 'see notes'}"
            f" or remove gate.{field}"
        )
    else:
        passed = value >= threshold if op == ">=" else value <= threshold
        if not passed:
            side = "below" if op == ">=" else "above"
            reason = f"{label} {value:.4f} is {side} gate.{field} = {threshold}"
    check = {"name": field, "metric": key, "op": op, "threshold": threshold, "value": value, "passed": passed}
    return check, reason


def _base_comparison_check(
    metrics: dict, gate: GateConfig, base_metrics: dict | None
) -> tuple[dict[str, Any], str | None]:
    """gate.compare_to_base: DINO must beat the base model's DINO on the same prompts by min_dino_gain_vs_base."""
    base_dino = (base_metrics or {}).get("dino")
    value = metrics.get("dino")
    reason = None
    if base_dino is None or value is None:
        passed, required = False, None
        reason = (
            "gate.compare_to_base is set but the base model's DINO is missing; evaluate with a base_model"
        )
    else:
        required = base_dino + gate.min_dino_gain_vs_base
        passed = value >= required
        if not passed:
            reason = (
                f"DINO {value:.4f} is below the base model's {base_dino:.4f} + "
                f"gate.min_dino_gain_vs_base {gate.min_dino_gain_vs_base} = {required:.4f}"
            )
    check = {
        "name": "dino_vs_base",
        "metric": "dino",
        "op": ">=",
        "threshold": required,
        "value": value,
        "base": base_dino,
        "passed": passed,
    }
    return check, reason


def evaluate_gate(metrics: dict, gate: GateConfig, base_metrics: dict | None = None) -> GateVerdict:
    """Check each configured threshold (None disables one); a threshold on a metric that was not computed fails."""
    results = [
        _threshold_check(metrics, gate, row) for row in THRESHOLDS if getattr(gate, row[0]) is not None
    ]
    if gate.compare_to_base:
        results.append(_base_comparison_check(metrics, gate, base_metrics))
    reasons = [reason for _, reason in results if reason is not None]
    return GateVerdict(passed=not reasons, reasons=reasons, checks=[check for check, _ in results])
