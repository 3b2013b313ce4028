"""Argument validation shared by every public function: each failure names the
argument and says what was expected."""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def tensor(name: str, value, *, ndims: Sequence[int], shape: str, finite: bool = True,
           dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Check that `value` is a tensor of one of `ndims` dimensions, a float dtype
    and (unless `finite=False`) free of NaN and infinity."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}")
    if value.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {str(value.dtype).replace('torch.', '')}")
    # Data-dependent checks cannot run while torch.compile traces with fake tensors,
    # nor on meta tensors (shapes only; the fake kernels answer for them).
    if finite and not data_free(value) and not all_finite(value):
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def data_free(*values: torch.Tensor) -> bool:
    """True when the values cannot be read: tracing under torch.compile, or meta tensors."""
    return torch.compiler.is_compiling() or any(v.device.type == "meta" for v in values)


def all_finite(value: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite. A NaN or infinity makes the sum
    non-finite, so one fast reduction settles the common case; only a sum that
    overflowed needs the elementwise test."""
    if value.numel() == 0:
        return True
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def finite_inputs_behind(output: torch.Tensor, **inputs: torch.Tensor) -> None:
    """For operators whose output is non-finite whenever an input is (a NaN or
    infinity reaches every output it feeds, with no max or mask to hide it):
    validate the inputs only when the smaller output shows a problem. An output
    that overflowed from finite inputs is returned as it is."""
    if data_free(output) or all_finite(output):
        return
    for name, value in inputs.items():
        if not all_finite(value):
            raise ValueError(f"{name} contains NaN or infinite values")


def same_device_dtype(**tensors: torch.Tensor) -> None:
    """All tensors on one device with one dtype."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {first_name} is {first.dtype}; use one dtype")


def int_pair(name: str, value) -> tuple[int, int]:
    """An int or a pair of ints, as torch.nn.Conv2d accepts."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
    return value
