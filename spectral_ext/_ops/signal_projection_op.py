"""signal_projection: receptive-field signals (wrapper, the convolution's
geometry, fake kernel, autograd)."""
from __future__ import annotations

import math

import torch

from .. import _checks, reference
from ._common import _native


def signal_projection(x: torch.Tensor, V: torch.Tensor, s: torch.Tensor, stride=1, padding=0,
                      dilation=1, reduce: str | None = None, kernel_size=None) -> torch.Tensor:
    """Receptive-field signals s_i <v_i, field> (seed 001 section 4.3).

    Differentiable with respect to x.

    Args:
        x: (B, C, H, W) or (C, H, W).
        V: (C*kh*kw, r) right singular vectors of the unfolded weight (columns, in
            `weight.reshape(out, -1)` order).
        s: (r,) the singular values.
        stride: the convolution's stride, an int or a pair (default 1).
        padding: the convolution's padding, an int or a pair (default 0).
        dilation: the convolution's dilation, an int or a pair (default 1).
        reduce: None for the signals per position, or "mean" (default None).
        kernel_size: the kernel's (kh, kw); None for a square kernel (default None).

    Returns:
        A tensor (B, r, H', W') per position, or (B, r) with reduce="mean" (unbatched x drops B).
    """
    _checks.tensor("x", x, ndims=(3, 4), shape="(B, C, H, W) or (C, H, W)", finite=False)
    _checks.tensor("V", V, ndims=(2,), shape="(C*kh*kw, r)", finite=False)
    _checks.tensor("s", s, ndims=(1,), shape="(r,)", finite=False)
    _checks.same_device_dtype(x=x, V=V, s=s)
    if torch.is_grad_enabled() and (V.requires_grad or s.requires_grad):  # refused now, not at backward
        raise ValueError("signal_projection differentiates with respect to x only: V and s must not require "
                         "grad (detach them)")
    if s.shape[0] != V.shape[1]:
        raise ValueError(f"s must have r = V.shape[1] = {V.shape[1]} entries, got {s.shape[0]}")
    if reduce not in (None, "mean"):
        raise ValueError(f"reduce must be None or 'mean', got {reduce!r}")
    stride, padding, dilation = (_checks.int_pair(n, v) for n, v in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be positive and padding non-negative, got stride "
                         f"{stride}, padding {padding}, dilation {dilation}")
    if kernel_size is not None:
        kernel_size = _checks.int_pair("kernel_size", kernel_size)
    kernel_size, (Ho, Wo) = _conv_geometry(x.shape, V.shape[0], stride, padding, dilation, kernel_size)
    if Ho * Wo >= 2**62:  # positions are counted in int64
        raise ValueError(f"stride {stride}, padding {padding} and dilation {dilation} give {Ho} x {Wo} output "
                         "positions, 2**62 or more: check padding")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if _native():
        out = torch.ops.spectral_ext.signal_projection(x, V, s, stride, padding, dilation, reduce,
                                                       kernel_size)
    else:
        out = reference.signal_projection(x, V, s, stride, padding, dilation, reduce, kernel_size)
    _checks.finite(out, x=x, V=V, s=s)
    return out.squeeze(0) if unbatched else out


# ---------------------------------------------------------------- geometry
# Shared by the wrapper, the fake kernel and the backward.

def _as_pairs(stride, padding, dilation, kernel_size):
    """The schema's int[2] arguments, which may arrive with one entry, as pairs."""
    stride, padding, dilation = (tuple(v) * (2 // len(v)) for v in (stride, padding, dilation))
    if kernel_size is not None:
        kernel_size = tuple(kernel_size) * (2 // len(kernel_size))
    return stride, padding, dilation, kernel_size


def _conv_geometry(x_shape, V_rows, stride, padding, dilation, kernel_size):
    """Kernel size (square unless given) and output size of signal_projection."""
    C, H, W = x_shape[-3:]
    if C == 0 or V_rows % C:
        raise ValueError(f"V.shape[0] = {V_rows} must be C*kh*kw for the C = {C} channels of x")
    area = V_rows // C
    if kernel_size is None:
        k = math.isqrt(int(area))  # int() specialises a symbolic size while tracing
        if k * k != area:
            raise ValueError(f"V.shape[0] / C = {area} is not a square kernel area; pass kernel_size")
        kernel_size = (k, k)
    kh, kw = kernel_size
    if kh <= 0 or kw <= 0 or kh * kw != area:
        raise ValueError(f"kernel_size {(kh, kw)} does not match V.shape[0] / C = {area}")
    extent_h = H + 2 * padding[0] - dilation[0] * (kh - 1) - 1
    extent_w = W + 2 * padding[1] - dilation[1] * (kw - 1) - 1
    if extent_h < 0 or extent_w < 0:
        raise ValueError(f"the {kh}x{kw} kernel (dilation {dilation}, padding {padding}) does not fit "
                         f"the {H}x{W} input x")
    return (kh, kw), (extent_h // stride[0] + 1, extent_w // stride[1] + 1)


# ---------------------------------------------------------------- fake kernel

@torch.library.register_fake("spectral_ext::signal_projection")
def _signal_projection_fake(x, V, s, stride=(1, 1), padding=(0, 0), dilation=(1, 1), reduce=None,
                            kernel_size=None):
    stride, padding, dilation, kernel_size = _as_pairs(stride, padding, dilation, kernel_size)
    _, (Ho, Wo) = _conv_geometry(x.shape, V.shape[0], stride, padding, dilation, kernel_size)
    if reduce == "mean":
        return x.new_empty((x.shape[0], V.shape[1]))
    return x.new_empty((x.shape[0], V.shape[1], Ho, Wo))


# ---------------------------------------------------------------- autograd
# The backward is written with plain tensor ops (no autograd inside), so
# torch.compile can trace it; it recomputes what the forward did not keep.

def _signal_projection_setup(ctx, inputs, output):
    x, V, s, stride, padding, dilation, reduce, kernel_size = inputs
    ctx.save_for_backward(V, s)
    ctx.x_shape = x.shape
    ctx.args = (stride, padding, dilation, reduce, kernel_size)


def _signal_projection_backward(ctx, grad):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("signal_projection differentiates with respect to x only: detach V and s")
    V, s = ctx.saved_tensors
    stride, padding, dilation, reduce, kernel_size = ctx.args
    stride, padding, dilation, kernel_size = _as_pairs(stride, padding, dilation, kernel_size)
    (kh, kw), (Ho, Wo) = _conv_geometry(ctx.x_shape, V.shape[0], stride, padding, dilation, kernel_size)
    weight = (V * s).T.reshape(V.shape[1], ctx.x_shape[1], kh, kw)
    if reduce == "mean":
        grad = (grad / (Ho * Wo))[:, :, None, None].expand(-1, -1, Ho, Wo)
    gx = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, stride, padding, dilation)
    return gx, None, None, None, None, None, None, None


torch.library.register_autograd("spectral_ext::signal_projection", _signal_projection_backward,
                                setup_context=_signal_projection_setup)
