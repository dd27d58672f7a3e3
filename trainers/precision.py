"""The one rule for ``precision: auto``, shared by training and sampling.

'auto' means bf16 on GPUs that support it (A100, H100/H200), else fp16 on GPU, and fp32 on
CPU (CPU half precision is slow and lossy). Any other value is taken as given.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def choose_precision(precision: str, on_gpu: bool, bf16_ok: bool) -> str:
    """'fp32', 'fp16' or 'bf16' for a precision setting on a device described by two flags
    (a pure function, for config builders such as DeepSpeed's ``ds_config``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if not on_gpu:
        return "fp32"
    return "bf16" if bf16_ok else "fp16"


def resolve_precision_name(precision: str, device: torch.device | str) -> str:
    """'fp32', 'fp16' or 'bf16' for a precision setting on ``device`` (bf16 support is asked
    of CUDA only when the device is a GPU)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    bf16_ok = on_gpu and precision == "auto" and torch.cuda.is_bf16_supported()
    return choose_precision(precision, on_gpu, bf16_ok)


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype for a precision setting on ``device``: 'auto' -> bf16 on GPUs that
    have it, else fp16 on GPU; fp32 on CPU."""
    return DTYPES[resolve_precision_name(precision, device)]
