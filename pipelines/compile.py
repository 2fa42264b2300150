"""Compile both pipelines for both targets into pipelines/compiled/ (`make compile`).

    python -m pipelines.compile                          # KFP on GKE (1x L4 nodes) + Vertex AI (1x L4)
    python -m pipelines.compile --kfp-preset gke-a100 --vertex-preset vertex-a100 --model sdxl
    python -m pipelines.compile --kfp-preset onprem --placement my-cluster.yaml
    python -m pipelines.compile --explain                # print the node shapes, pod sizes and step policy
    python -m pipelines.compile --check                  # exit 1 if the committed YAML is out of date

Writes `<pipeline>.kfp.yaml` (KFP on Kubernetes: `nvidia.com/gpu`, node selectors, tolerations, secrets via
kfp-kubernetes) and `<pipeline>.vertex.yaml` (Vertex AI: accelerator enum names, no Kubernetes config). The
container images come from DREAMBOOTH_IMAGE_REGISTRY / DREAMBOOTH_IMAGE_TAG (default tag: the package version).
Presets, node shapes and the per-step policy (timeouts, scratch disk, retries): pipelines/placement.py and
docs/placement.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipelines.placement import PRESETS, Placement, describe, load_placement

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
PIPELINES = ("personalize", "batch_personalize")


def build(name: str, placement: Placement):
    if name == "personalize":
        from pipelines.personalize import build_personalize

        return build_personalize(placement)
    from pipelines.batch_personalize import build_batch_personalize

    return build_batch_personalize(placement)


def compile_all(out_dir: str | Path, kfp: Placement, vertex: Placement) -> list[Path]:
    """Write every pipeline for both targets; returns the written files."""
    from kfp import compiler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PIPELINES:
        for placement in (kfp, vertex):
            path = out / f"{name}.{placement.target}.yaml"
            compiler.Compiler().compile(build(name, placement), str(path))
            written.append(path)
    return written


def stale_files(committed: str | Path, kfp: Placement, vertex: Placement) -> list[str]:
    """Names of compiled files that differ from (or are missing in) `committed`."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_all(tmp, kfp, vertex)
        return [
            p.name
            for p in fresh
            if not (Path(committed) / p.name).exists()
            or (Path(committed) / p.name).read_text() != p.read_text()
        ]


def _placement_file(path: str | None) -> dict:
    if not path:
        return {}
    from dreambooth_lib import storage
    from dreambooth_lib.config import load_config_text
    from dreambooth_lib.errors import ConfigError

    data = load_config_text(storage.read_text(path), path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of placement sections (gpu:, cpu:, steps:, ...)")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(COMPILED_DIR))
    kfp_presets = [n for n, p in PRESETS.items() if p["target"] == "kfp"]
    vertex_presets = [n for n, p in PRESETS.items() if p["target"] == "vertex"]
    parser.add_argument("--kfp-preset", default="gke", help=f"one of {', '.join(kfp_presets)} (default gke)")
    parser.add_argument(
        "--vertex-preset", default="vertex", help=f"one of {', '.join(vertex_presets)} (default vertex)"
    )
    parser.add_argument(
        "--placement", help="YAML/JSON overrides for the KFP placement (gpu:, cpu:, steps:, ...)"
    )
    parser.add_argument("--vertex-placement", help="YAML/JSON overrides for the Vertex placement")
    parser.add_argument(
        "--model",
        choices=["sd15", "sdxl", "sd3", "flux"],
        help="base-model family (sizes scratch disks and timeouts)",
    )
    parser.add_argument("--explain", action="store_true", help="print what the placements ask, write nothing")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing")
    args = parser.parse_args(argv)
    from dreambooth_lib.errors import ConfigError, DreamboothError

    try:
        kfp_overrides, vertex_overrides = (
            _placement_file(args.placement),
            _placement_file(args.vertex_placement),
        )
        if args.model:
            kfp_overrides, vertex_overrides = (
                {**kfp_overrides, "model": args.model},
                {**vertex_overrides, "model": args.model},
            )
        if args.kfp_preset in PRESETS and PRESETS[args.kfp_preset]["target"] != "kfp":
            raise ConfigError(
                f"--kfp-preset {args.kfp_preset}: a Vertex preset; choose {', '.join(kfp_presets)}"
            )
        if args.vertex_preset in PRESETS and PRESETS[args.vertex_preset]["target"] != "vertex":
            raise ConfigError(
                f"--vertex-preset {args.vertex_preset}: a KFP preset; choose {', '.join(vertex_presets)}"
            )
        kfp = load_placement(args.kfp_preset, kfp_overrides)
        vertex = load_placement(args.vertex_preset, vertex_overrides)
        if kfp.target != "kfp" or vertex.target != "vertex":
            raise ConfigError("--placement must keep target: kfp and --vertex-placement target: vertex")
        if args.explain:
            print(describe(kfp), describe(vertex), sep="\n")
            return 0
        if args.check:
            stale = stale_files(args.out, kfp, vertex)
            if stale:
                print(f"out of date in {args.out}: {', '.join(stale)}; run `make compile`", file=sys.stderr)
                return 1
            print(f"{args.out}: up to date")
            return 0
        for path in compile_all(args.out, kfp, vertex):
            print(path)
    except DreamboothError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
