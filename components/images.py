"""The container images components run in, read once at import (compile) time from the environment.

DREAMBOOTH_IMAGE_REGISTRY (default `ghcr.io/dreambooth-kfp`) and DREAMBOOTH_IMAGE_TAG (default: the package
version, the same tag `make images` builds) name `<registry>/dreambooth-cpu:<tag>` for CPU steps and
`<registry>/dreambooth-cuda:<tag>` for GPU steps. The same kfp version compiles the YAML and runs in the image.
"""

from __future__ import annotations

import os
import re

DEFAULT_REGISTRY = "ghcr.io/dreambooth-kfp"
CPU_NAME = "dreambooth-cpu"
CUDA_NAME = "dreambooth-cuda"


def image_tag() -> str:
    """DREAMBOOTH_IMAGE_TAG, or the package version made a valid Docker tag ('0.1.0+x' -> '0.1.0-x')."""
    tag = os.environ.get("DREAMBOOTH_IMAGE_TAG")
    if not tag:
        from dreambooth_lib import __version__

        tag = __version__
    return re.sub(r"[^A-Za-z0-9_.-]", "-", tag)[:128]


def image_registry() -> str:
    return os.environ.get("DREAMBOOTH_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


def cpu_image() -> str:
    return f"{image_registry()}/{CPU_NAME}:{image_tag()}"


def cuda_image() -> str:
    return f"{image_registry()}/{CUDA_NAME}:{image_tag()}"


CPU_IMAGE = cpu_image()
CUDA_IMAGE = cuda_image()


if __name__ == "__main__":  # `make images` tags with exactly what the compiled YAML references
    import sys

    print(
        {"cpu": CPU_IMAGE, "cuda": CUDA_IMAGE}[sys.argv[1]]
        if len(sys.argv) > 1
        else f"{CPU_IMAGE} {CUDA_IMAGE}"
    )
