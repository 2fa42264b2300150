"""`python -m benchmarks`: the speed benchmarks from a checkout (they are not part of the installed package).

Each command prints its table on stdout, or with --json only one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from dreambooth_lib.cli import option_group

app = typer.Typer(
    help="Speed benchmarks, run from a checkout: printed figures against a baseline run in the same process.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

JsonOpt = Annotated[
    bool, typer.Option("--json", help="print only the figures, as one JSON object, on stdout")
]
ModelOpt = Annotated[str | None, typer.Option(help="base model (default: a fresh tiny model)")]
Sd15Opt = Annotated[bool, typer.Option(help="an SD-1.5-sized random-weight model (GPU runs)")]
ResolutionOpt = Annotated[int | None, typer.Option(help="image side (default: the model's own)")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
OutOpt = Annotated[str | None, typer.Option(help="also write the table as Markdown here (local or gs://)")]

# The base model a benchmark times and where: train_speed.BaseChoice.
BASE_OPTIONS = {
    "model": (ModelOpt, None),
    "sd15_shape": (Sd15Opt, False),
    "resolution": (ResolutionOpt, None),
    "device": (DeviceOpt, "auto"),
}
# The options of `all` that bench_all takes as they are.
ALL_ROWS_OPTIONS = {
    "steps": (Annotated[int, typer.Option(help="timed steps per training row")], 10),
    "warmup": (Annotated[int, typer.Option(help="untimed steps before each training row")], 2),
    "prior_images": (
        Annotated[int | None, typer.Option(help="prior images timed (default: 32 CUDA, 4 CPU)")],
        None,
    ),
    "prior_steps": (
        Annotated[int, typer.Option(help="sampler steps per prior image (at most 4 on CPU)")],
        25,
    ),
    "e2e": (Annotated[bool, typer.Option(help="also one subject end to end")], False),
    "e2e_mode": (Annotated[str, typer.Option(help="lora or full")], "lora"),
    "cuda_graph": (
        Annotated[
            bool, typer.Option(help="on CUDA, also time full/LoRA steps as CUDA graphs (and the e2e run)")
        ],
        True,
    ),
    "prior_compile": (
        Annotated[bool, typer.Option(help="also time prior sampling with a torch.compile'd UNet (minutes)")],
        False,
    ),
}


@app.callback()
def _quiet() -> None:
    from dreambooth_lib.cli import quiet_libraries

    quiet_libraries()


def _emit(result: dict[str, Any], table: str, as_json: bool) -> None:
    typer.echo(json.dumps(result, default=str) if as_json else table, nl=as_json)


@app.command()
@option_group("base", BASE_OPTIONS)
def train(*, base: dict[str, Any], steps: int = 20, as_json: JsonOpt = False):
    """Time a diffusers-style DreamBooth step against ours, same model and device, one process.

    Example: python -m benchmarks train --sd15-shape --resolution 512 --steps 50
    """
    from benchmarks.train_speed import BaseChoice, bench_train, render_train_table

    result = bench_train(BaseChoice(**base), steps=steps)
    _emit(result, render_train_table(result), as_json)


@app.command("all")
@option_group("base", BASE_OPTIONS)
@option_group("rows", ALL_ROWS_OPTIONS)
def all_rows(
    *,
    base: dict[str, Any],
    rows: dict[str, Any],
    ks: Annotated[str, typer.Option(help="packed subject counts, comma-separated")] = "1,4,8,16",
    e2e_steps: Annotated[
        int | None, typer.Option(help="end-to-end training steps (default: 1000 CUDA, 10 CPU)")
    ] = None,
    e2e_priors: Annotated[
        int | None, typer.Option(help="end-to-end prior images (default: 200 CUDA, 4 CPU)")
    ] = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
):
    """Full table: diffusers-style vs our full-FT step, LoRA, packed K-subject LoRA, prior images/s, end to end.

    Example: python -m benchmarks all --sd15-shape --resolution 512 --e2e --out bench.md
    """
    from benchmarks.train_speed import BaseChoice, bench_all

    counts = {"train_steps": e2e_steps, "prior_images": e2e_priors}
    result = bench_all(
        BaseChoice(**base),
        ks=tuple(int(k) for k in ks.split(",") if k.strip()),
        e2e_counts={k: v for k, v in counts.items() if v is not None},
        out_markdown=out,
        **rows,
    )
    _emit(result, result["markdown"], as_json)


@app.command()
@option_group("base", BASE_OPTIONS)
def prior(
    *,
    base: dict[str, Any],
    images: Annotated[int, typer.Option(help="images timed, ours and compiled")] = 32,
    naive_images: Annotated[int, typer.Option(help="images timed one per call")] = 4,
    steps: Annotated[int, typer.Option(help="sampler steps per image")] = 25,
    batch_size: int = 16,
    compiled: Annotated[
        bool, typer.Option(help="also a torch.compile'd UNet (compiling takes minutes)")
    ] = False,
    out: OutOpt = None,
    as_json: JsonOpt = False,
):
    """Class-prior sampling, images/s: one image per call (naive) against ours (batched, fp16 on CUDA).

    Example: python -m benchmarks prior --sd15-shape --resolution 512 --images 64 --batch-size 32 --compiled
    """
    import tempfile
    from pathlib import Path

    from benchmarks.train_speed import BaseChoice, bench_prior, prepare_model, render_prior_table

    choice = BaseChoice(**base)
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as tmp:
        bm = prepare_model(choice, Path(tmp))
        result = bench_prior(
            bm.pipe, choice.device, num_images=images, naive_images=naive_images, steps=steps, batch_size=batch_size,
            resolution=bm.resolution, compiled=compiled,
        )  # fmt: skip
    table = render_prior_table(result)
    if out:
        from dreambooth_lib import storage

        storage.write_text(out, table)
    _emit(result, table, as_json)


@app.command()
@option_group("base", BASE_OPTIONS)
def probes(
    *,
    base: dict[str, Any],
    steps: int = 200,
    every: Annotated[int, typer.Option(help="train.select.every: steps between probes")] = 50,
    mode: Annotated[str, typer.Option(help="lora or full")] = "lora",
    repeats: Annotated[int, typer.Option(help="interleaved runs of each kind (the median is shown)")] = 2,
    out: OutOpt = None,
    as_json: JsonOpt = False,
):
    """What train.select costs: the same training with and without probes (its default probe), interleaved.

    Example: python -m benchmarks probes --sd15-shape --resolution 512 --steps 1000 --every 200
    """
    from benchmarks.probe_overhead import bench_probe_overhead, render_probe_table
    from benchmarks.train_speed import BaseChoice
    from dreambooth_lib import storage

    result = bench_probe_overhead(
        BaseChoice(**base), steps=steps, mode=mode, repeats=repeats, select={"every": every}
    )
    table = render_probe_table(result)
    if out:
        storage.write_text(out, table)
    _emit(result, table, as_json)


@app.command("host-syncs")
def host_syncs(device: DeviceOpt = "cuda", as_json: JsonOpt = False):
    """Check that our eager full and packed training steps read nothing back to the host (CUDA's sync debug mode).

    Example: python -m benchmarks host-syncs --device cuda
    """
    from benchmarks.host_syncs import check_host_syncs

    found = check_host_syncs(device)
    _emit(found, "".join(f"host syncs in {name}: {what}\n" for name, what in found.items()), as_json)


@app.command()
def flux(
    flux_shape: Annotated[
        bool, typer.Option(help="a FLUX.1-dev-sized random transformer (GPU runs)")
    ] = False,
    steps: int = 10,
    warmup: int = 2,
    ks: Annotated[str, typer.Option(help="packed subjects per step, comma-separated")] = "1,4",
    resolution: ResolutionOpt = None,
    device: DeviceOpt = "auto",
    out: OutOpt = None,
    as_json: JsonOpt = False,
):
    """Time our FLUX.1 LoRA step (bf16 frozen base), with gradient checkpointing, and K subjects packed.

    Example: python -m benchmarks flux --flux-shape --device cuda --resolution 512 --ks 1,2,4
    """
    from benchmarks.flux_speed import bench_flux, render_flux_table
    from dreambooth_lib import storage

    rows = bench_flux(flux_shape=flux_shape, device=device, resolution=resolution, steps=steps, warmup=warmup,
                      ks=tuple(int(k) for k in ks.split(",")))  # fmt: skip
    table = render_flux_table(rows)
    if out:
        storage.write_text(out, table)
    _emit({"rows": rows}, table, as_json)
