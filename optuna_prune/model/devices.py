"""The one place where device and precision are chosen (CUDA + bf16/fp16 when present, else CPU fp32)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}


class DeviceError(ValueError):
    """A device or dtype that does not exist, or is not present on this machine."""


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device of a supported type, without checking that it is present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise DeviceError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N (mps on Apple silicon)")
    return dev


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device` if given (DeviceError unless this machine has it), else the first CUDA device
    when one exists, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} asked for but this machine has no CUDA GPU; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(
                f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s); "
                f"use one of cuda:0..cuda:{count - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} asked for but MPS is not available; use --device cpu")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DeviceError(f"device {str(device)!r} asked for but no XPU is available; use --device cpu")
    return dev


def check_dtype(dtype: str | torch.dtype | None) -> None:
    """DeviceError unless ``dtype`` is None, "auto", a torch dtype or a name in DTYPES."""
    if dtype is not None and not isinstance(dtype, torch.dtype) and dtype != "auto" and dtype not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} (or omit --dtype)")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Weights dtype: bf16 on CUDA where supported (fp16 otherwise), fp32 on CPU, unless given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        check_dtype(dtype)
        return DTYPES[dtype]
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
