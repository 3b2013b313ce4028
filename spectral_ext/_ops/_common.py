"""What several operators share: the compiled library, the backend switch,
Ctrl-C in CPU loops, the finiteness check of a result and the refusal of
what would not fit in memory."""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from .. import _C  # noqa: F401  (the compiled library: its schemas must exist before anything registers on them)
from .. import _checks

BACKENDS = ("native", "reference")
OPERATORS = ("conv_adjacency", "signal_projection", "sinkhorn", "max_kernel_gram", "sinkhorn_scaling",
             "linear_sum_assignment", "network_simplex")
CPU_ONLY = ("sinkhorn_scaling", "linear_sum_assignment", "network_simplex")  # CUDA: the twin, or the CPU kernel
_backend = contextvars.ContextVar("spectral_ext_backend", default="native")
_CHUNK_ELEMENTS = 1 << 22  # the backward passes build temporaries of about this many elements


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the operators on the backend `name` inside a with block.

    "native" runs the compiled kernels (the default), "reference" the plain-PyTorch twins in
    spectral_ext.reference::

        with spectral_ext.use_backend("reference"):
            a = spectral_ext.conv_adjacency(U, V)

    Args:
        name: "native" or "reference" (any other name raises ValueError).

    Returns:
        A context manager; the previous backend is restored on leaving it.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    """The backend the operators run on now.

    Args:
        None.

    Returns:
        "native" (the compiled kernels) or "reference" (the plain-PyTorch twins), as set by use_backend.
    """
    return _backend.get()


def _native() -> bool:
    return _backend.get() == "native"


def _interruptible(op, *args):
    """Call a compiled operator whose CPU loop polls for Ctrl-C (csrc/interrupt.h)
    and turn its "interrupted" error back into KeyboardInterrupt."""
    try:
        return op(*args)
    except RuntimeError as error:
        if "spectral_ext: interrupted" in str(error):
            raise KeyboardInterrupt from None
        raise


def _finite(output: torch.Tensor, **inputs: torch.Tensor) -> None:
    """_checks.finite's refusals (NaN or infinite inputs by name, an output
    that overflowed from finite ones) from each tensor's extremes: aminmax
    reads a tensor once and copies nothing (a float64 sum copies a float32
    tensor, and materialises an expanded one), one host synchronisation."""
    tensors = [t for t in (*inputs.values(), output) if t is not None and t.numel()]
    if not tensors or _checks.data_free(*tensors):
        return
    extremes = torch.stack([e.to(torch.float64) for t in tensors for e in torch.aminmax(t)])
    if bool(torch.isfinite(extremes).all()):
        return
    for name, value in inputs.items():
        if value.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(value))).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    raise ValueError(f"{' and '.join(inputs)} are finite but the result overflows "
                     f"{str(output.dtype).replace('torch.', '')}: rescale them or use float64")


def _refuse_unallocatable(needed: int, device, what: str, advice: str, *tensors: torch.Tensor) -> None:
    """Refuse, before any work, an operator whose result and the intermediates
    its route allocates (`needed` bytes) exceed the free memory of `device`
    (_checks.memory: MemAvailable on Linux, the free CUDA memory; with 25%
    slack) instead of failing in the allocator, or being killed, after the fact."""
    if _checks.data_free(*tensors):
        return
    _checks.memory(needed, device, what, advice)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"
