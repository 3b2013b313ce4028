"""Partial rank of the Jacobian (seed 003 section 3.2, equation 5,
Algorithm A1, appendix D)."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .. import _checks, _data
from .._hooks import capturing, check_layers, evaluating
from ._common import OUTPUT, _check_eps, _forward_elements, _outputs, _rank_of_singular_values
from .matrix import singular_values_of_rows

def _check_patch(patch, x: torch.Tensor):
    """(row_slice, col_slice) over the last two axes of an image input, or a
    slice over the features of a flat input; None takes the whole input."""
    if x.dim() <= 2:
        if patch is None:
            return (slice(0, x.shape[-1]),)
        if isinstance(patch, slice):
            patch = (patch,)
        if not (isinstance(patch, tuple) and len(patch) == 1 and isinstance(patch[0], slice)):
            raise TypeError(f"patch must be a slice over the features of a flat input, got {patch!r}")
        sizes = (x.shape[-1],)
    else:
        if patch is None:
            return (slice(0, x.shape[-2]), slice(0, x.shape[-1]))
        if not (isinstance(patch, tuple) and len(patch) == 2 and all(isinstance(s, slice) for s in patch)):
            raise TypeError(f"patch must be (row_slice, col_slice), got {patch!r}")
        sizes = (x.shape[-2], x.shape[-1])
    normal = []
    for s, size in zip(patch, sizes):
        start, stop, step = s.indices(size)
        if step != 1 or stop <= start:
            raise ValueError(f"patch {patch!r} must select a non-empty contiguous range of an axis of size {size}")
        normal.append(slice(start, stop))
    return tuple(normal)


def _patch_function(model, x1, patch, captured, order, layers, at):
    """f(p) = captured outputs of model(base + psi(p)), psi the zero padding of
    section 3.2 (the patch's entries at their own positions, zeros around).
    at="patch": base = 0, so f is evaluated at the zero-padded patch
    psi(Sub(x)) as in Algorithm A1; at="image": base is x with the patch
    zeroed, so f is evaluated at x itself. Written without in-place writes
    so that vmap and jvp can trace it."""
    region = (Ellipsis,) + patch
    base = torch.zeros_like(x1) if at == "patch" else x1.clone()
    base[region] = 0
    p0 = x1[region].clone()
    if len(patch) == 2:
        H, W = x1.shape[-2:]
        pad = (patch[1].start, W - patch[1].stop, patch[0].start, H - patch[0].stop)
    else:
        pad = (patch[0].start, x1.shape[-1] - patch[0].stop)

    def f(p):
        outs = _outputs(model, base + nn.functional.pad(p, pad), captured, order, layers)
        return tuple(o.reshape(-1) for o in outs)

    return f, p0


def _jacobian_peak_bytes(K: int, sizes: list[int], itemsize: int, chunk: int, activations: int) -> int:
    """Peak memory of one partial Jacobian: the columns of every output (K x
    features, in the input dtype), the primal and tangent activations of one
    chunk's forward pass (`activations` elements per pass), and the largest
    float64 factorisation (a copy of J and its smaller Gram matrix)."""
    total = sum(sizes)
    factor = max(8 * K * F + 8 * min(K, F) ** 2 for F in sizes)
    return K * total * itemsize + 2 * min(chunk, K) * (activations + total) * itemsize + factor


@dataclass(frozen=True, eq=False)  # DataFrames have no single truth value
class JacobianPartialRank:
    """Result of jacobian_partial_rank (seed 003 section 3.2): the partial
    rank of every chosen sub-network for every sample and patch.

    layers: the rows' layers in forward order, the model output (OUTPUT)
    last; at, rank_of, eps: the options it was computed with; table: one row
    per (sample, patch, layer), columns sample, patch, layer, rank,
    n_features, n_patch_entries."""

    layers: tuple[str, ...]
    at: str
    rank_of: str
    eps: float | None
    table: pd.DataFrame = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The table: columns sample, patch, layer, rank, n_features (the
        output's size), n_patch_entries (K); rows in forward order."""
        return self.table.copy()

    def plot(self, ax=None):
        """Seed 003 Fig. 1 (a-c) (plot.partial_rank)."""
        from ..plot import partial_rank

        return partial_rank(self, ax=ax)


def jacobian_partial_rank(model: nn.Module, layers=None, data=None, patch=None, eps: float | None = None,
                          mode: str = "auto", chunk_size: int | None = 64, progress: bool = True,
                          at: str = "patch", rank_of: str = "gram") -> JacobianPartialRank:
    """Numerical rank of the Jacobian of each chosen sub-network with respect
    to a patch of the input (seed 003 section 3.2, equation 5, Algorithm A1).

    By default as Algorithm A1 (appendix C): the Jacobian of f o psi, psi
    the zero padding of the patch, taken at the zero-padded patch psi(Sub(x))
    (at="patch"; A1 pads a central patch symmetrically, here the patch keeps
    its own position, which is the same for the central patch of section
    4.3), and the rank is that of J^T J (rank_of="gram"): its K eigenvalues
    count when above eps x the largest, eps defaulting to float32 eps x K
    (A1's matrix_rank, section 4.3). at="image" evaluates the Jacobian at x
    itself (the columns of the full Jacobian at the real image); rank_of=
    "jacobian" thresholds the singular values of J instead (equation 4,
    eps x the number of singular values).

    Args:
        model: run in eval mode and given back unchanged.
        layers: qualified module names (None: the model's top-level
            children); the model output is always the last row.
        data: one input, (C, H, W) or (d,) or with a batch axis of 1, or
            several (N, ...) measured one at a time, as a tensor or in any
            form _data.batches takes (labels unused).
        patch: (row_slice, col_slice) over the spatial axes, all channels
            (a slice for flat inputs, None for the whole input; the paper
            uses the central 16 x 16 x 3 patch), or a list of them
            (appendix D).
        eps: the relative rank threshold (None: float32 eps x K, or x the
            number of singular values with rank_of="jacobian").
        mode: "auto", "forward" (jvp) or "reverse" (vjp), as below.
        chunk_size: Jacobian columns (forward) or output rows (reverse) per
            batched product (default 64).
        progress: a tqdm bar, one step per chunk.
        at: "patch" (Algorithm A1: at the zero-padded patch) or "image".
        rank_of: "gram" (the rank of J^T J, Algorithm A1) or "jacobian".

    One pass gives every layer: the Jacobian columns for the K patch entries
    come from K forward-mode products (torch.func.jvp under vmap, chunk_size
    at a time, one progress step per chunk) or, when the outputs together
    are narrower than the patch, from reverse mode (vjp, chunk_size output
    rows at a time). The peak memory (K x the total output size, plus the
    factorisation) is estimated first; when it exceeds the free memory a
    ValueError asks for a smaller patch or fewer layers.

    Returns:
        A JacobianPartialRank; .to_frame() has columns sample, patch, layer,
        rank, n_features (the output's size), n_patch_entries (K), rows in
        forward order, model output last. Lemma 2: along a chain of layers
        the partial rank does not increase."""
    if data is None:
        raise TypeError("jacobian_partial_rank() needs data: a tensor, a DataLoader or an iterable of batches")
    x = _data.gather(data)[0]
    _checks.tensor("data", x, ndims=range(1, 6), shape="(N, C, H, W), (C, H, W), (N, d) or (d,)")
    first_patch = patch[0] if isinstance(patch, list) and patch else patch
    if x.dim() == 1 or (x.dim() == 3 and isinstance(first_patch, tuple) and len(first_patch) == 2):
        x = x[None]  # one unbatched input
    if x.shape[0] == 0:
        raise ValueError("data holds no sample")
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
    if at not in ("patch", "image"):
        raise ValueError(f"at must be 'patch' (Algorithm A1: the zero-padded patch) or 'image', got {at!r}")
    if rank_of not in ("gram", "jacobian"):
        raise ValueError(f"rank_of must be 'gram' (Algorithm A1: rank of J^T J) or 'jacobian', got {rank_of!r}")
    if chunk_size is not None:
        chunk_size = _checks.positive_int("chunk_size", chunk_size)
    _check_eps(eps)
    layers = check_layers(model, layers)
    patches = list(patch) if isinstance(patch, list) else [patch]
    if not patches:
        raise ValueError("patch is an empty list")
    patches = [_check_patch(p, x) for p in patches]
    from tqdm.auto import tqdm

    rows = []
    jobs = [(n, j) for n in range(x.shape[0]) for j in range(len(patches))]
    with capturing(model, layers) as (captured, order), torch.no_grad(), evaluating(model), \
            tqdm(total=0, desc="partial Jacobian rank", disable=not progress, leave=False) as bar:
        for n, j in jobs:
            f, p0 = _patch_function(model, x[n:n + 1], patches[j], captured, order, layers, at)
            result = []
            activations = _forward_elements(model, lambda: result.append(f(p0)))
            outs = result[0]
            names = list(order) + [OUTPUT]
            sizes = [o.numel() for o in outs]
            K = p0.numel()
            use_forward = mode == "forward" or (mode == "auto" and sum(sizes) >= K)
            chunk = chunk_size or (K if use_forward else max(sizes))
            _checks.memory(_jacobian_peak_bytes(K, sizes, x.element_size(), chunk, activations), x.device,
                           f"the partial Jacobian of {K} patch entries into {sum(sizes)} output features",
                           "use a smaller patch (seed 003 uses the central 16 x 16) or fewer layers")
            steps = -(-(K if use_forward else sum(sizes)) // chunk)
            bar.total += steps
            bar.refresh()
            with torch.enable_grad():
                columns = _jacobian_columns(f, p0, use_forward, chunk, sizes, bar.update)
            for name, size, J in zip(names, sizes, columns):
                sigma = singular_values_of_rows(J)  # J is (K, features): J^T
                if rank_of == "gram":  # eigenvalues of J^T J (K of them, zeros beyond the rank)
                    rank = _rank_of_singular_values(sigma.square(), eps, count=K)
                else:
                    rank = _rank_of_singular_values(sigma, eps)
                rows.append({"sample": n, "patch": _patch_label(patches[j]), "layer": name,
                             "rank": int(rank), "n_features": size, "n_patch_entries": K})
    return JacobianPartialRank(tuple(names), at, rank_of, eps, pd.DataFrame(rows))


def _patch_label(patch) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in patch) + "]"


def _jacobian_columns(f, p0, use_forward: bool, chunk: int, sizes: list[int], step):
    """The transposed Jacobians (K, features) of every output of f at p0,
    chunk tangents (forward) or chunk output rows (reverse) at a time;
    step(1) after each chunk."""
    from torch.func import jvp, vjp, vmap

    K = p0.numel()
    if use_forward:
        parts = []
        for start in range(0, K, chunk):
            count = min(chunk, K - start)
            basis = torch.zeros(count, K, dtype=p0.dtype, device=p0.device)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1
            parts.append([c.detach() for c in vmap(lambda t: jvp(f, (p0,), (t,))[1])(basis.reshape(count, *p0.shape))])
            step(1)
        return [torch.cat([part[i] for part in parts]) for i in range(len(sizes))]
    outputs, pullback = vjp(f, p0)
    total = sum(sizes)
    offsets = [0]
    for F in sizes:
        offsets.append(offsets[-1] + F)
    rows = []
    for start in range(0, total, chunk):  # one-hot cotangents over all outputs, chunk rows at a time
        count = min(chunk, total - start)
        eye = torch.zeros(count, total, dtype=outputs[0].dtype, device=outputs[0].device)
        eye[torch.arange(count), torch.arange(start, start + count)] = 1
        cotangents = tuple(eye[:, offsets[k]:offsets[k + 1]] for k in range(len(sizes)))
        rows.append(vmap(pullback)(cotangents)[0].detach().reshape(count, K))
        step(1)
    J = torch.cat(rows)
    return [J[offsets[k]:offsets[k + 1]].T for k in range(len(sizes))]
