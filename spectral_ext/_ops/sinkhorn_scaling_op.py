"""sinkhorn_scaling: Sinkhorn-Knopp scaling with marginals (CPU kernel; CUDA
and gradients run the twin). Its public wrapper is sinkhorn (sinkhorn_op);
here are the fake kernel and the helpers for the marginals and the kernel
exp(-M / reg)."""
from __future__ import annotations

import math

import torch

from .. import _checks


def _marginal(name: str, value, batch: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """a or b as (B, size): ones when None (the paper's doubly stochastic target)."""
    if value is None:
        return like.new_ones((batch, size))
    _checks.tensor(name, value, ndims=(1, 2), shape=f"({size},) or ({batch}, {size})", finite=False)
    _checks.same_device_dtype(P=like, **{name: value})
    if value.shape[-1] != size or (value.dim() == 2 and value.shape[0] != batch):
        raise ValueError(f"{name} must have shape ({size},) or ({batch}, {size}) for P of shape "
                         f"{tuple(like.shape)}, got {tuple(value.shape)}")
    return value.expand(batch, size)


def _kernel_out_of_range(L: torch.Tensor, reg: float, M: torch.Tensor) -> bool:
    """Whether exp(L), L = -M / reg, leaves the normal range of L's dtype (one
    host synchronisation); refuses a reg for which M / reg overflows or the
    costs' spread over reg exceeds 1 / eps, where the log domain's potentials
    (of that size) keep no digit of the plan."""
    if not L.numel() or _checks.data_free(L):
        return False
    info = torch.finfo(L.dtype)
    flat = L.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    finite, low_all, high_all, spread = torch.stack([
        torch.isfinite(L).all().to(L.dtype), low.min(), high.max(), (high - low).max()]).tolist()
    dtype = str(L.dtype).replace("torch.", "")
    if not finite:
        raise ValueError(f"M / reg overflows {dtype} (max |M| = {float(M.abs().max()):.3g}, reg = {reg:.3g}): raise "
                         "reg, or subtract a constant from M (the plan does not change)")
    if spread * info.eps > 1:
        raise ValueError(f"reg = {reg:.3g} is too small for these costs: their spread over reg is {spread:.3g}, "
                         f"beyond the 1 / eps = {1 / info.eps:.3g} that {dtype} resolves even with log_domain=True "
                         "(the plan would be rounding noise); raise reg")
    return low_all < math.log(info.tiny) or high_all > math.log(info.max)


# ---------------------------------------------------------------- fake kernel

@torch.library.register_fake("spectral_ext::sinkhorn_scaling")
def _sinkhorn_scaling_fake(K, a, b, iters, stop_threshold=0.0, check_every=10, log_domain=False):
    B, n, m = K.shape
    checks = 0 if iters == 0 else (iters - 1) // check_every + 1
    return (torch.empty_like(K, memory_format=torch.contiguous_format), K.new_empty((B, n)), K.new_empty((B, m)),
            K.new_empty((B,), dtype=torch.int64), K.new_empty((B, checks)))
