"""Compile both pipelines for both targets into pipelines/compiled/ (`make compile`).

    python -m pipelines.compile                          # KFP on GKE + Vertex AI, the default placements
    python -m pipelines.compile --kfp-preset onprem --placement my-cluster.yaml
    python -m pipelines.compile --check                  # exit 1 if the committed YAML is out of date

Writes `<pipeline>.kfp.yaml` (KFP on Kubernetes: `nvidia.com/gpu`, node selectors, tolerations, secrets via
kfp-kubernetes) and `<pipeline>.vertex.yaml` (Vertex AI: accelerator enum names, no Kubernetes config). The
container images come from DREAMBOOTH_IMAGE_REGISTRY / DREAMBOOTH_IMAGE_TAG (default tag: the package version).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipelines.placement import Placement, load_placement

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

    return load_config_text(storage.read_text(path), path) or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(COMPILED_DIR))
    parser.add_argument("--kfp-preset", default="gke", help="gke or onprem")
    parser.add_argument("--vertex-preset", default="vertex")
    parser.add_argument("--placement", help="YAML/JSON overrides for the KFP placement (gpu:, cpu:, ...)")
    parser.add_argument("--vertex-placement", help="YAML/JSON overrides for the Vertex placement")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing")
    args = parser.parse_args(argv)
    from dreambooth_lib.errors import DreamboothError

    try:
        kfp = load_placement(args.kfp_preset, _placement_file(args.placement))
        vertex = load_placement(args.vertex_preset, _placement_file(args.vertex_placement))
        if kfp.target != "kfp" or vertex.target != "vertex":
            raise DreamboothError("--kfp-preset must target kfp and --vertex-preset vertex")
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
