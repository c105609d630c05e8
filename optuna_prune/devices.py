"""The one place where device and precision are chosen (CUDA + bf16/fp16 when present, else CPU fp32)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device` if given, else the first CUDA device when one exists, else the CPU."""
    if device is not None and str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for but CUDA is not available; use --device cpu")
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Weights dtype: bf16 on CUDA where supported (fp16 otherwise), fp32 on CPU, unless given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextlib.contextmanager
def inference_mode(device: torch.device) -> Iterator[None]:
    """No-grad inference; on CUDA also bf16/fp16 autocast so fp32 leftovers run at low precision."""
    with torch.inference_mode():
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=pick_dtype(device)):
                yield
        else:
            yield
