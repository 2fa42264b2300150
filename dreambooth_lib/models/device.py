"""Where and how models run: the device, the inference dtype, and torch.compile's backend."""

from __future__ import annotations

# torch.compile's backend for every compiled module (training and sampling UNets). Tests swap in "aot_eager": the
# same graph capture and call path, without the minutes of C++/Triton code generation inductor spends on a UNet.
COMPILE_BACKEND = "inductor"


def compile_module(module):
    """`torch.compile(module)` with the project's backend; compiles lazily, at the first call."""
    import torch

    return torch.compile(module, backend=COMPILE_BACKEND)


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for inference: `auto` is fp16 on GPUs (half the memory and time), fp32 on CPUs (no fast
    fp16 kernels there)."""
    import torch

    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def peak_memory_bytes(device) -> int:
    """The peak memory of this process on `device`: CUDA's max_memory_allocated, else the peak RSS."""
    import resource

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
