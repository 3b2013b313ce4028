"""Argument validation shared by every public function: each failure names the
argument and says what was expected."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def tensor(name: str, value, *, ndims: Sequence[int], shape: str, finite: bool = True,
           dtypes=FLOAT_DTYPES, data: bool = False) -> torch.Tensor:
    """Check that `value` is a tensor of one of `ndims` dimensions, a float dtype
    and (unless `finite=False`) free of NaN and infinity. data=True: a meta
    tensor (shapes only) is refused, for functions whose result is a value."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(value).__name__}")
    if value.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {str(value.dtype).replace('torch.', '')}")
    if data and value.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shapes only): this function needs its values")
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


def number(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (an int, float, numpy scalar or 0-d real tensor;
    not a bool or a string) in [low, high] (ends open on request)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and (value < low or (low_open and value == low))) or (
            high is not None and (value > high or (high_open and value == high))):
        interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, " \
                   f"{'inf' if high is None else high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def integer(name: str, value, *, low=None, high=None) -> int:
    """An integral number (int, numpy integer or 0-d integer tensor; a float
    such as 2.7, a bool or a string is refused) in [low, high]."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}], got {value}")
    return value


def integers(name: str, values, *, low=None, high=None) -> list[int]:
    """A non-empty sequence of integers, each in [low, high]."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of integers, got {type(values).__name__}")
    values = list(values.tolist() if isinstance(values, torch.Tensor) else values)
    if not values:
        raise ValueError(f"{name} is empty")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise TypeError(f"{name} must hold integers, got {type(v).__name__} {v!r}")
        if (low is not None and v < low) or (high is not None and v > high):
            raise ValueError(f"{name} must lie in [{'-inf' if low is None else low}, "
                             f"{'inf' if high is None else high}], got {v}")
        out.append(int(v))
    return out


def free_memory(device) -> int | None:
    """Bytes that can still be allocated on `device`: the free memory of a
    CUDA device, MemAvailable (Linux) for the CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory(needed: int, device, what: str, advice: str) -> None:
    """Refuse, before any work, a computation whose estimated peak `needed`
    (bytes) exceeds the free memory of `device` (better a
    ValueError naming what to reduce than the process killed after minutes)."""
    free = free_memory(device)
    needed = needed * 5 // 4  # slack: the estimates came within 25% of the measured peak (benchmarks/RESULTS.md)
    if free is not None and needed > free:
        raise ValueError(f"{what} needs about {needed / 2 ** 30:.1f} GiB but {free / 2 ** 30:.1f} GiB are free "
                         f"on {torch.device(device)}: {advice}")


def finite(output: torch.Tensor | None = None, **inputs: torch.Tensor) -> None:
    """NaN and infinity in the inputs refused by name, and an output that overflowed
    from finite inputs refused too, with one host synchronisation for
    all of them: a finite sum of every sum means all is finite; only a
    failure (or a sum that overflowed) looks closer."""
    tensors = [t for t in (*inputs.values(), output) if t is not None and t.numel()]
    if not tensors or data_free(*tensors):
        return
    total = torch.stack([t.sum(dtype=torch.float64) for t in tensors]).sum()
    if bool(torch.isfinite(total)):
        return
    for name, value in inputs.items():
        if not all_finite(value):
            raise ValueError(f"{name} contains NaN or infinite values")
    if output is not None and not all_finite(output):
        names = " and ".join(inputs)
        raise ValueError(f"{names} are finite but the result overflows {str(output.dtype).replace('torch.', '')}: "
                         "rescale them or use float64")


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


INT32_MAX = 2**31 - 1


def int_pair(name: str, value, maximum: int = INT32_MAX) -> tuple[int, int]:
    """An int or a pair of ints, as torch.nn.Conv2d accepts, none above `maximum`."""
    pair = _int_pair(name, value)
    if max(abs(pair[0]), abs(pair[1])) > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return pair


def _int_pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def positive_int(name: str, value, *, allow_zero: bool = False, maximum: int | None = None,
                 why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:.0e}, got {value}{why}")
    return value


def positive_float(name: str, value) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def generator(value, name: str = "generator") -> torch.Generator | None:
    """The one form randomness takes in the API (PyTorch's): None draws from
    torch's global generator (torch.manual_seed makes it repeatable), an int
    seeds a fresh CPU generator, a torch.Generator is used as given."""
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a torch.Generator, an int seed or None, got {type(value).__name__}")
    return torch.Generator().manual_seed(int(value))
